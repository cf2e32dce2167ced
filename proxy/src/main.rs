//! The `kache` binary: parse the command line, set up logging, run.

mod commands;

use std::process::ExitCode;

use clap::FromArgMatches;
use kache_config::{Cli, Command, Config, ServeArgs};
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<ExitCode> {
    let matches = commands::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // One crypto provider for every TLS use (upstream, listener).
    let _ = rustls::crypto::ring::default_provider().install_default();
    match cli.command {
        Command::Kubeconfig(args) => {
            print!("{}", kache_proxy::kubeconfig::render(&args)?);
        }
        Command::CheckConfig(args) => return Ok(commands::check_config(args, &matches)),
        Command::Version(args) => commands::version(&args),
        Command::Completions(args) => commands::completions(&args),
        Command::Serve(args) => {
            let config = Config::load(&args)?;
            tracing_subscriber::fmt()
                .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .init();
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(serve(args, config))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn serve(args: ServeArgs, config: Config) -> anyhow::Result<()> {
    let running = kache_proxy::start(config).await?;
    wait_for_signals(|| match Config::load(&args) {
        // SIGHUP: apply what can change without a restart.
        Ok(config) => running.reload(&config),
        Err(error) => tracing::error!(%error, "configuration not reloaded"),
    })
    .await;
    tracing::info!("shutting down");
    running.shutdown().await;
    Ok(())
}

/// Returns on SIGINT or SIGTERM; calls `reload` on every SIGHUP.
#[cfg(unix)]
async fn wait_for_signals(reload: impl Fn()) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate =
        signal(SignalKind::terminate()).expect("invariant: installing a SIGTERM handler succeeds");
    let mut hangup = signal(SignalKind::hangup()).expect("invariant: installing a SIGHUP handler succeeds");
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return,
            _ = terminate.recv() => return,
            _ = hangup.recv() => reload(),
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signals(_reload: impl Fn()) {
    let _ = tokio::signal::ctrl_c().await;
}
