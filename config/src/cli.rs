//! The command line: `kache serve` and `kache kubeconfig`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// A caching reverse proxy for the Kubernetes API server.
#[derive(Debug, Parser)]
#[command(name = "kache", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy in front of the cluster of a kubeconfig.
    Serve(ServeArgs),
    /// Print a kubeconfig whose cluster is this proxy.
    Kubeconfig(KubeconfigArgs),
}

/// Flags of `kache serve`. Unset flags fall back to the config file, then to defaults.
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// Kubeconfig of the upstream cluster [default: $KUBECONFIG, ~/.kube/config, in-cluster].
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// Context of the kubeconfig to use [default: its current context].
    #[arg(long, value_name = "NAME")]
    pub context: Option<String>,
    /// Address of the client-facing listener [default: 127.0.0.1:8001].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Address of the admin listener (/livez, /readyz, /metrics) [default: 127.0.0.1:9901].
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<String>,
    /// Config file (YAML).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Serve HTTPS with this certificate (PEM); needs --tls-key.
    #[arg(long, value_name = "PATH")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) for --tls-cert.
    #[arg(long, value_name = "PATH")]
    pub tls_key: Option<PathBuf>,
    /// Serve HTTPS with a self-signed certificate kept in the state directory.
    #[arg(long)]
    pub tls: bool,
    /// Directory for state that outlives the process [default: $XDG_STATE_HOME/kache or ~/.local/state/kache].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// File holding a token clients must present as `Authorization: Bearer`.
    #[arg(long, value_name = "PATH")]
    pub access_token_file: Option<PathBuf>,
    /// Accepted `Host` header names (repeatable, `*` for any) [default: localhost, 127.0.0.1, [::1]].
    #[arg(long = "accept-host", value_name = "HOST")]
    pub accept_hosts: Vec<String>,
    /// `local`: one trusted user, kache's kubeconfig identity upstream.
    /// `shared`: every client authenticated and served as itself (needs TLS) [default: local].
    #[arg(long, value_enum, value_name = "MODE")]
    pub mode: Option<crate::ModeName>,
    /// Shared mode: PEM bundle of the CAs that sign client certificates (user = CN, groups = O).
    #[arg(long, value_name = "PATH")]
    pub client_ca_file: Option<PathBuf>,
    /// Shared mode: how forwarded requests reach the API server [default: impersonate].
    #[arg(long, value_enum, value_name = "HOW")]
    pub forward: Option<crate::ForwardMode>,
    /// Shared mode: how answers from memory are authorized [default: rbac].
    #[arg(long, value_enum, value_name = "HOW")]
    pub authorization: Option<crate::AuthorizationMode>,
    /// Shared mode: requests without credentials are system:anonymous instead of 401.
    #[arg(long)]
    pub allow_anonymous: bool,
    /// Local mode: listen on a non-loopback address without an access token,
    /// letting anyone who can connect use kache's credentials.
    #[arg(long)]
    pub dangerously_expose_credentials: bool,
}

/// Flags of `kache kubeconfig`.
#[derive(Debug, Clone, Default, Args)]
pub struct KubeconfigArgs {
    /// URL of the proxy [default: http://<--listen or 127.0.0.1:8001>, https:// with TLS].
    #[arg(long, value_name = "URL")]
    pub server: Option<String>,
    /// The serve flags the proxy runs with, to derive the URL, certificate and token.
    #[command(flatten)]
    pub serve: ServeArgs,
}
