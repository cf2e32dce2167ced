//! `KACHE_*` environment variables are flags given another way: the merge
//! sees them exactly as it sees flags, a flag beats its variable, and both
//! beat the config file.
//!
//! One test in its own process: it sets environment variables, which every
//! other parse in the same process would see.

use std::path::PathBuf;

use clap::{CommandFactory, Parser};
use kache_config::{Cli, Command, Config, Mode, ServeArgs, TlsConfig};

fn serve(args: &[&str]) -> Result<ServeArgs, clap::Error> {
    match Cli::try_parse_from(["kache", "serve"].iter().chain(args))?.command {
        Command::Serve(args) => Ok(args),
        other => panic!("expected serve, got {other:?}"),
    }
}

fn set(vars: &[(&str, &str)]) {
    for (name, value) in vars {
        std::env::set_var(name, value);
    }
}

fn clear() {
    let names: Vec<String> = std::env::vars()
        .map(|(name, _)| name)
        .filter(|name| name.starts_with("KACHE_"))
        .collect();
    for name in names {
        std::env::remove_var(name);
    }
}

#[test]
fn environment_variables_are_flags_given_another_way() {
    clear();
    let dir = std::env::temp_dir().join(format!("kache-env-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("kache.yaml");
    std::fs::write(
        &file,
        "listen: 127.0.0.1:7000\ncontext: from-file\nkubeconfig: /from-file\nadminListen: 127.0.0.1:7001\n\
         tls: {selfSigned: true}\nstateDir: /state\n",
    )
    .expect("write");

    // The file alone.
    set(&[("KACHE_CONFIG", file.to_str().expect("utf-8"))]);
    let config = Config::load(&serve(&[]).expect("flags")).expect("valid");
    assert_eq!(config.listener.addr.port(), 7000);
    assert_eq!(config.upstream.context.as_deref(), Some("from-file"));
    assert!(matches!(config.listener.tls, Some(TlsConfig::SelfSigned { .. })));

    // The environment over the file; the file where the environment is silent.
    set(&[
        ("KACHE_LISTEN", "127.0.0.1:7100"),
        ("KACHE_CONTEXT", "from-env"),
        ("KACHE_TLS", "false"),
        ("KACHE_ACCEPT_HOST", "a.example,b.example"),
    ]);
    let config = Config::load(&serve(&[]).expect("flags")).expect("valid");
    assert_eq!(config.listener.addr.port(), 7100);
    assert_eq!(config.upstream.context.as_deref(), Some("from-env"));
    assert_eq!(config.upstream.kubeconfig, Some(PathBuf::from("/from-file")));
    assert_eq!(config.admin.addr.port(), 7001);
    assert_eq!(
        config.listener.tls, None,
        "KACHE_TLS=false beats the file's selfSigned: true"
    );
    for host in ["a.example", "b.example"] {
        assert!(config.listener.accept_hosts.contains(&host.to_string()), "{host}");
    }

    // Flags over the environment.
    let config = Config::load(
        &serve(&[
            "--listen",
            "127.0.0.1:7200",
            "--tls",
            "--accept-host",
            "c.example",
        ])
        .expect("flags"),
    )
    .expect("valid");
    assert_eq!(config.listener.addr.port(), 7200);
    assert_eq!(config.upstream.context.as_deref(), Some("from-env"));
    assert!(matches!(config.listener.tls, Some(TlsConfig::SelfSigned { .. })));
    assert!(config.listener.accept_hosts.contains(&"c.example".to_string()));
    assert!(!config.listener.accept_hosts.contains(&"a.example".to_string()));

    // A shared-mode setting from the environment is as much an error in
    // local mode as the flag would be, and as valid in shared mode.
    set(&[("KACHE_FORWARD", "passthrough")]);
    let err = Config::load(&serve(&[]).expect("flags")).expect_err("shared-only setting");
    assert!(err.to_string().contains("shared mode only"), "{err}");
    set(&[("KACHE_MODE", "shared"), ("KACHE_TLS", "true")]);
    let config = Config::load(&serve(&[]).expect("flags")).expect("valid");
    let Mode::Shared(shared) = config.mode else {
        panic!("expected shared mode");
    };
    assert_eq!(shared.forward, kache_config::ForwardMode::Passthrough);
    let config = Config::load(&serve(&["--mode", "local", "--forward", "impersonate"]).expect("flags"));
    assert!(config.is_err(), "the flag, not the variable, decides the mode");

    // A bad value names the flag it stands for.
    set(&[("KACHE_MODE", "sharde")]);
    let err = serve(&[]).expect_err("invalid mode");
    assert!(err.to_string().contains("--mode"), "{err}");

    // Help shows where a value comes from, but not the values of secret-bearing variables.
    set(&[
        ("KACHE_MODE", "shared"),
        ("KACHE_ACCESS_TOKEN_FILE", "/secret/token-path"),
        ("KACHE_TLS_KEY", "/secret/key-path"),
    ]);
    let mut cli = Cli::command();
    let help = cli
        .find_subcommand_mut("serve")
        .expect("serve")
        .render_long_help()
        .to_string();
    assert!(help.contains("KACHE_LISTEN=127.0.0.1:7100"), "{help}");
    assert!(help.contains("KACHE_ACCESS_TOKEN_FILE"), "{help}");
    assert!(!help.contains("/secret/"), "{help}");
    assert!(
        help.contains("flags > environment (KACHE_*) > config file"),
        "{help}"
    );

    clear();
    std::fs::remove_dir_all(&dir).ok();
}
