//! The `kache` command line as a user meets it: `check-config` on good and
//! bad files, `version`, shell completions, and `KACHE_*` environment
//! variables — checked with the built binary, and `serve` configured through
//! its environment alone, reached in front of the real API server.

#![allow(clippy::unwrap_used)] // test helpers, not only #[test] fns (STYLE.md)

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use kache_tests::{cluster, kache_bin, poll_until, raw, workspace_root, Value, KACHE_READY_TIMEOUT};

/// Runs `kache ARGS` with these environment variables (and no inherited `KACHE_*` flag variables).
fn kache(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(kache_bin());
    cmd.args(args).stdin(Stdio::null());
    for (name, _) in std::env::vars() {
        if name.starts_with("KACHE_") {
            cmd.env_remove(name);
        }
    }
    cmd.envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", kache_bin().display()))
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `kache check-config ARGS`, expected to succeed: its YAML.
#[track_caller]
fn effective(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut all = vec!["check-config"];
    all.extend_from_slice(args);
    let out = kache(&all, env);
    assert!(
        out.status.success(),
        "kache {all:?} failed ({}):\n{}",
        out.status,
        stderr(&out)
    );
    stdout(&out)
}

/// Whether the YAML has this line exactly.
fn has_line(yaml: &str, line: &str) -> bool {
    yaml.lines().any(|l| l == line)
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("utf-8 temporary path")
}

#[test]
fn check_config_prints_the_effective_configuration_of_a_good_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "kache.yaml",
        "# a CI proxy\nlisten: 127.0.0.1:7300\ncache:\n  preload: [v1/pods]\nlimits:\n  maxInFlight: 80\n",
    );
    let yaml = effective(&[path_str(&file), "--state-dir", "/var/lib/kache"], &[]);
    for line in [
        "listen: 127.0.0.1:7300",
        "adminListen: 127.0.0.1:9901",
        "stateDir: /var/lib/kache",
        "  - v1/pods",
        "  maxInFlight: 80",
        "  memoryBudgetBytes: 2147483648",
        "  timeoutSeconds: 60",
        "mode: local",
    ] {
        assert!(has_line(&yaml, line), "no {line:?} in:\n{yaml}");
    }

    // Flags merge in as they do for `serve`.
    let shared = effective(
        &[path_str(&file), "--mode", "shared", "--tls", "--state-dir", "/s"],
        &[],
    );
    for line in [
        "mode: shared",
        "  selfSigned: true",
        "  forward: impersonate",
        "  authorization: rbac",
    ] {
        assert!(has_line(&shared, line), "no {line:?} in:\n{shared}");
    }

    // What it prints is itself a config file that gives the same configuration.
    let printed = write(dir.path(), "printed.yaml", &yaml);
    let again = effective(&[path_str(&printed)], &[]);
    let body = |y: &str| {
        y.lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(body(&again), body(&yaml));
}

#[test]
fn check_config_rejects_bad_files_naming_the_field_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "listen: 127.0.0.1:7300\nupstream:\n  timeoutSecs: 3\n",
            &["unknown field `timeoutSecs`", "line 3, column 3"][..],
        ),
        ("cache:\n  enabled: yes\n", &["line 2, column 12"][..]),
        ("listen: [127.0.0.1\n", &["line 1"][..]),
        (
            "maxHeaderBytes: 10\nlimits: {maxInFlight: 0}\n",
            &[
                "maxHeaderBytes 10 is below the minimum",
                "limits.maxInFlight must be at least 1",
            ][..],
        ),
        ("mode: shared\n", &["HTTPS"][..]),
    ];
    for (i, (text, expected)) in cases.iter().enumerate() {
        let file = write(dir.path(), &format!("bad-{i}.yaml"), text);
        let out = kache(&["check-config", path_str(&file)], &[]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{text:?}: {err}");
        assert!(out.stdout.is_empty(), "{text:?}: printed {}", stdout(&out));
        assert!(err.starts_with("error: invalid configuration"), "{text:?}: {err}");
        for what in *expected {
            assert!(err.contains(what), "{text:?}: no {what:?} in: {err}");
        }
    }
    let missing = dir.path().join("missing.yaml");
    let out = kache(&["check-config", path_str(&missing)], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains(path_str(&missing)), "{}", stderr(&out));
}

#[test]
fn precedence_is_flags_then_environment_then_file_then_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "kache.yaml",
        "listen: 127.0.0.1:7401\ncontext: file\ntls: {selfSigned: true}\nstateDir: /from-file\n",
    );
    let file = path_str(&file);
    let env = [("KACHE_LISTEN", "127.0.0.1:7402"), ("KACHE_TLS", "false")];

    let from_file = effective(&[file], &[]);
    assert!(has_line(&from_file, "listen: 127.0.0.1:7401"), "{from_file}");
    assert!(has_line(&from_file, "  selfSigned: true"), "{from_file}");

    let from_env = effective(&[file], &env);
    assert!(has_line(&from_env, "listen: 127.0.0.1:7402"), "{from_env}");
    assert!(
        !from_env.contains("selfSigned"),
        "KACHE_TLS=false over the file:\n{from_env}"
    );
    assert!(
        has_line(&from_env, "context: file"),
        "the file where the environment is silent:\n{from_env}"
    );

    let from_flags = effective(&[file, "--listen", "127.0.0.1:7403", "--tls"], &env);
    assert!(has_line(&from_flags, "listen: 127.0.0.1:7403"), "{from_flags}");
    assert!(has_line(&from_flags, "  selfSigned: true"), "{from_flags}");

    // The file itself may come from the environment.
    let via_env = effective(&[], &[("KACHE_CONFIG", file)]);
    assert!(has_line(&via_env, "context: file"), "{via_env}");
    let defaults = effective(&[], &[]);
    assert!(has_line(&defaults, "listen: 127.0.0.1:8001"), "{defaults}");

    // An environment variable is as much a given setting as its flag.
    let out = kache(&["check-config", file], &[("KACHE_FORWARD", "passthrough")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("shared mode only"), "{}", stderr(&out));
}

#[test]
fn help_says_what_kache_and_each_command_are() {
    const ABOUT: &str = "A caching reverse proxy for the Kubernetes API server.";
    for args in [&["--help"][..], &["-h"], &["help"]] {
        let out = kache(args, &[]);
        assert!(out.status.success(), "kache {args:?}: {}", stderr(&out));
        let help = stdout(&out);
        assert_eq!(help.lines().next(), Some(ABOUT), "kache {args:?}:\n{help}");
    }
    // Each command's help starts with its own one-line summary (the same
    // `kache --help` lists it with), never the top-level line or a crate's
    // description.
    let top = stdout(&kache(&["--help"], &[]));
    for (command, summary) in [
        ("serve", "Run the proxy in front of the cluster of a kubeconfig"),
        ("kubeconfig", "Print a kubeconfig whose cluster is this proxy"),
        (
            "check-config",
            "Check a config file as `serve` would and print the configuration it gives",
        ),
        (
            "version",
            "Print the version, the commit and how this binary was built",
        ),
        ("completions", "Print a shell completion script"),
    ] {
        assert!(
            top.lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>().join(" ") == format!("{command} {summary}")),
            "kache --help does not list `{command}` as {summary:?}:\n{top}"
        );
        let help = stdout(&kache(&[command, "-h"], &[]));
        assert_eq!(help.lines().next(), Some(summary), "kache {command} -h:\n{help}");
        let long = stdout(&kache(&[command, "--help"], &[]));
        let first = long.lines().next().unwrap_or_default();
        assert!(
            first.trim_end_matches('.') == summary,
            "kache {command} --help starts with {first:?}"
        );
    }
}

#[test]
fn version_names_the_commit_it_was_built_from() {
    let text = kache(&["version"], &[]);
    assert!(text.status.success(), "{}", stderr(&text));
    let text = stdout(&text);
    let long = stdout(&kache(&["--version"], &[]));
    assert_eq!(long, text, "--version and `version` print the same");
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("kache "), "{text}");
    for prefix in ["commit: ", "built:  ", "rustc:  rustc ", "target: "] {
        assert!(
            lines.iter().any(|l| l.starts_with(prefix)),
            "no {prefix:?} in:\n{text}"
        );
    }

    let out = kache(&["version", "-o", "json"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(lines[0], format!("kache {}", json["version"].as_str().unwrap()));
    let date = json["buildDate"].as_str().unwrap();
    assert!(
        date.len() == 20 && date.ends_with('Z') && date.as_bytes()[10] == b'T',
        "{date}"
    );
    assert!(json["target"].as_str().unwrap().contains('-'), "{json}");

    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git")
            .arg("-C")
            .arg(workspace_root())
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let Some(head) = git(&["rev-parse", "HEAD"]) else {
        // Built from a tarball: no commit to name, and it says so.
        assert!(json["commit"].is_null(), "{json}");
        return;
    };
    let commit = json["commit"]
        .as_str()
        .unwrap_or_else(|| panic!("built from a git checkout, yet no commit: {json}"));
    let dirty = json["dirty"].as_bool().unwrap();
    let suffix = if dirty { "-dirty" } else { "" };
    assert!(has_line(&text, &format!("commit: {commit}{suffix}")), "{text}");
    let full = git(&["rev-parse", "--verify", &format!("{commit}^{{commit}}")])
        .unwrap_or_else(|| panic!("{commit} is no commit of this checkout"));
    if full != head {
        // Others may have committed since this binary was built: then its
        // commit is an ancestor of HEAD, and every commit after it was made
        // no earlier than the build.
        let ancestor = git(&["merge-base", "--is-ancestor", &full, "HEAD"]).is_some();
        assert!(
            ancestor,
            "the binary names {commit}, not an ancestor of HEAD {head}"
        );
        let built_at = unix_time(date);
        let later = git(&["log", "--format=%ct", &format!("{full}..HEAD")]).unwrap();
        for t in later.lines() {
            assert!(
                t.parse::<i64>().unwrap() >= built_at,
                "the binary names {commit}, but HEAD {head} was committed before its build ({date}): \
                 rebuild it with `cargo build -p kache-proxy --bin kache`"
            );
        }
    }
}

/// Seconds since the epoch of a `YYYY-MM-DDTHH:MM:SSZ` time.
fn unix_time(date: &str) -> i64 {
    let n = |range: std::ops::Range<usize>| -> i64 { date[range].parse().unwrap() };
    let (y, m, d) = (n(0..4), n(5..7), n(8..10));
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    days * 86_400 + n(11..13) * 3600 + n(14..16) * 60 + n(17..19)
}

#[test]
fn completions_are_scripts_for_each_shell() {
    let dir = tempfile::tempdir().unwrap();
    for shell in ["bash", "zsh", "fish"] {
        let out = kache(&["completions", shell], &[]);
        assert!(out.status.success(), "{shell}: {}", stderr(&out));
        let script = stdout(&out);
        for word in [
            "serve",
            "kubeconfig",
            "check-config",
            "version",
            "completions",
            "admin-listen",
        ] {
            assert!(script.contains(word), "{shell}: no {word} in the script");
        }
        if shell == "bash" {
            let path = write(dir.path(), "kache.bash", &script);
            let check = Command::new("bash").arg("-n").arg(&path).output().unwrap();
            assert!(
                check.status.success(),
                "bash -n rejects the script: {}",
                String::from_utf8_lossy(&check.stderr)
            );
        }
    }
    assert!(stdout(&kache(&["completions", "zsh"], &[])).starts_with("#compdef kache"));
    assert!(stdout(&kache(&["completions", "fish"], &[])).contains("complete -c kache"));
    let out = kache(&["completions", "tcsh"], &[]);
    assert_eq!(out.status.code(), Some(2), "an unknown shell is a usage error");
}

/// A `kache serve` child process, killed on drop (its stderr shown if the test fails).
struct Serving {
    child: Child,
    stderr: PathBuf,
}

impl Serving {
    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("----- kache stderr -----\n{}----- end -----", self.stderr());
        }
    }
}

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

#[test]
fn serve_is_configured_by_its_environment_alone() {
    let c = cluster();
    let dir = tempfile::tempdir().unwrap();
    // The file's listen address is held by this test: a kache that used it
    // instead of KACHE_LISTEN could not start.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    for attempt in 1..=3 {
        let (listen, admin) = (free_port(), free_port());
        let file = write(
            dir.path(),
            "kache.yaml",
            &format!("listen: {}\nadminListen: {admin}\n", taken.local_addr().unwrap()),
        );
        let stderr = dir.path().join(format!("kache-{attempt}.stderr"));
        let mut cmd = Command::new(kache_bin());
        for (name, _) in std::env::vars() {
            if name.starts_with("KACHE_") {
                cmd.env_remove(name);
            }
        }
        let child = cmd
            .arg("serve")
            .env_remove("KUBECONFIG")
            .env("KACHE_KUBECONFIG", &c.admin_kubeconfig)
            .env("KACHE_LISTEN", listen.to_string())
            .env("KACHE_CONFIG", &file)
            .env("KACHE_STATE_DIR", dir.path().join("state"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let mut serving = Serving { child, stderr };
        let ready = poll_until(KACHE_READY_TIMEOUT, "kache's /readyz", || {
            if let Some(status) = serving.child.try_wait().unwrap() {
                return Some(Err(status));
            }
            match raw::get(admin, "/readyz") {
                Ok(r) if r.status == 200 => Some(Ok(())),
                _ => None,
            }
        });
        if let Err(status) = ready {
            let err = serving.stderr();
            if err.contains("in use") && attempt < 3 {
                continue; // another process took a port between probing and binding
            }
            panic!("kache exited ({status}):\n{err}");
        }
        // Reached on KACHE_LISTEN, through the cluster of KACHE_KUBECONFIG;
        // the admin address came from the file KACHE_CONFIG names.
        let r = raw::get(listen, "/api/v1/namespaces/default").unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["metadata"]["name"], "default");
        return;
    }
}
