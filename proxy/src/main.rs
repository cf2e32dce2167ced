//! The `kache` binary: parse the command line, set up logging, run.

use clap::Parser;
use kache_config::{Cli, Command, Config};
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // One crypto provider for every TLS use (upstream, listener).
    let _ = rustls::crypto::ring::default_provider().install_default();
    match cli.command {
        Command::Kubeconfig(args) => {
            print!("{}", kache_proxy::kubeconfig::render(&args)?);
            Ok(())
        }
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
                .block_on(serve(config))
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let running = kache_proxy::start(config).await?;
    shutdown_signal().await;
    tracing::info!("shutting down");
    running.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("invariant: installing a SIGTERM handler succeeds");
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
