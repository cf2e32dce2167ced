//! The subcommands that print something and exit — `check-config`,
//! `version`, `completions` — and the build facts behind `--version`.

use std::io::Write;
use std::process::ExitCode;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory};
use kache_config::{
    CheckConfigArgs, Cli, CompletionShell, CompletionsArgs, Config, VersionArgs, VersionFormat,
};

/// The crate's version.
const VERSION: &str = env!("CARGO_PKG_VERSION");
/// `HEAD`'s short hash when built (`-dirty` if tracked files differed), or `unknown`.
const COMMIT: &str = env!("KACHE_BUILD_COMMIT");
/// When it was built (`SOURCE_DATE_EPOCH` when set), UTC.
const BUILD_DATE: &str = env!("KACHE_BUILD_DATE");
/// `rustc --version` of the compiler that built it.
const RUSTC: &str = env!("KACHE_BUILD_RUSTC");
/// The target triple it was built for.
const TARGET: &str = env!("KACHE_BUILD_TARGET");

/// `kache -V`.
const SHORT_VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("KACHE_BUILD_COMMIT"), ")");
/// `kache --version` and `kache version`, after "kache ".
const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    "\ncommit: ",
    env!("KACHE_BUILD_COMMIT"),
    "\nbuilt:  ",
    env!("KACHE_BUILD_DATE"),
    "\nrustc:  ",
    env!("KACHE_BUILD_RUSTC"),
    "\ntarget: ",
    env!("KACHE_BUILD_TARGET"),
);

/// The command line of the binary: the derived one, with the build facts as its version.
pub fn command() -> clap::Command {
    Cli::command().version(SHORT_VERSION).long_version(LONG_VERSION)
}

/// `kache check-config`: loads the configuration exactly as `kache serve`
/// does (same flags, variables, file and validation) and prints it as a
/// config file with every default filled in. Exits 1 if it is invalid.
pub fn check_config(mut args: CheckConfigArgs, matches: &ArgMatches) -> ExitCode {
    let config_flag_given = matches
        .subcommand_matches("check-config")
        .and_then(|m| m.value_source("config"))
        == Some(ValueSource::CommandLine);
    if args.file.is_some() && config_flag_given {
        eprintln!("error: the config file is given twice: as FILE and with --config");
        return ExitCode::from(2);
    }
    if let Some(file) = args.file.take() {
        args.serve.config = Some(file);
    }
    let yaml = Config::load(&args.serve)
        .map_err(|e| e.to_string())
        .and_then(|config| {
            config
                .to_yaml()
                .map_err(|e| format!("cannot print the configuration: {e}"))
        });
    match yaml {
        Ok(yaml) => {
            let source = match &args.serve.config {
                Some(path) => format!("config file {}", path.display()),
                None => "no config file".to_string(),
            };
            print!(
                "# The configuration `kache serve` runs with: flags, then KACHE_* variables,\n\
                 # then {source}, then defaults.\n{yaml}"
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(1)
        }
    }
}

/// `kache version`.
pub fn version(args: &VersionArgs) {
    let text = match args.output {
        VersionFormat::Text => format!("kache {LONG_VERSION}\n"),
        VersionFormat::Json => format!("{}\n", version_json()),
    };
    // A closed stdout (`kache version | head -0`) is not worth a panic.
    let _ = std::io::stdout().write_all(text.as_bytes());
}

fn version_json() -> serde_json::Value {
    let (commit, dirty) = match COMMIT {
        "unknown" => (None, None),
        commit => match commit.strip_suffix("-dirty") {
            Some(hash) => (Some(hash), Some(true)),
            None => (Some(commit), Some(false)),
        },
    };
    serde_json::json!({
        "version": VERSION,
        "commit": commit,
        "dirty": dirty,
        "buildDate": BUILD_DATE,
        "rustc": RUSTC,
        "target": TARGET,
    })
}

/// `kache completions SHELL`.
pub fn completions(args: &CompletionsArgs) {
    let shell = match args.shell {
        CompletionShell::Bash => clap_complete::Shell::Bash,
        CompletionShell::Zsh => clap_complete::Shell::Zsh,
        CompletionShell::Fish => clap_complete::Shell::Fish,
    };
    clap_complete::generate(shell, &mut command(), "kache", &mut std::io::stdout());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_names_the_build() {
        let text = format!("kache {LONG_VERSION}");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], format!("kache {VERSION}"));
        for (line, prefix) in lines[1..]
            .iter()
            .zip(["commit: ", "built:  ", "rustc:  ", "target: "])
        {
            assert!(line.starts_with(prefix) && line.len() > prefix.len(), "{line:?}");
        }
        assert!(RUSTC.starts_with("rustc "), "{RUSTC}");
        let date = BUILD_DATE.as_bytes();
        assert_eq!(date.len(), "2024-01-01T00:00:00Z".len(), "{BUILD_DATE}");
        assert!(BUILD_DATE.ends_with('Z') && date[10] == b'T', "{BUILD_DATE}");
    }

    #[test]
    fn the_json_version_splits_commit_and_dirtiness() {
        let json = version_json();
        assert_eq!(json["version"], VERSION);
        assert_eq!(json["target"], TARGET);
        match COMMIT {
            "unknown" => assert!(json["commit"].is_null() && json["dirty"].is_null(), "{json}"),
            commit => {
                let hash = json["commit"].as_str().expect("commit");
                assert!(!hash.ends_with("-dirty"), "{json}");
                assert_eq!(json["dirty"], commit.ends_with("-dirty"), "{json}");
            }
        }
    }

    #[test]
    fn the_command_line_is_consistent() {
        command().debug_assert();
    }

    #[test]
    fn completions_cover_every_subcommand() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut command(), "kache", &mut script);
            let script = String::from_utf8(script).expect("utf-8");
            for word in [
                "serve",
                "kubeconfig",
                "check-config",
                "version",
                "completions",
                "admin-listen",
            ] {
                assert!(script.contains(word), "{shell}: no {word}");
            }
        }
    }
}
