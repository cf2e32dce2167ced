//! The command line: `kache serve`, `kache kubeconfig`, `kache check-config`,
//! `kache version` and `kache completions`.
//!
//! Every flag of `serve` can also be given as an environment variable named
//! after it (`--admin-listen` → `KACHE_ADMIN_LISTEN`). clap fills the same
//! field from either, so the merge with the config file cannot tell them
//! apart: precedence is flags, then the environment, then the config file,
//! then the defaults.

use std::path::PathBuf;

use clap::builder::BoolishValueParser;
use clap::{Args, Parser, Subcommand, ValueEnum};

/// Shown after `kache -h`.
const TOP_AFTER_HELP: &str = "\
Every flag of `serve` can also be set by an environment variable named after it:
--listen is KACHE_LISTEN, --admin-listen is KACHE_ADMIN_LISTEN, and so on.
Precedence: flags > environment > config file > defaults.
`kache --help` and `kache serve --help` show examples.";

/// Shown after `kache --help`.
const TOP_AFTER_LONG_HELP: &str = "\
Every flag of `serve` can also be set by an environment variable named after it:
--listen is KACHE_LISTEN, --admin-listen is KACHE_ADMIN_LISTEN, and so on.
Precedence: flags > environment > config file > defaults.

Examples:
  A developer on localhost (kubectl's usual kubeconfig upstream):
    kache serve &
    KUBECONFIG=<(kache kubeconfig) kubectl get pods -A

  A CI job's sidecar, configured through its environment:
    KACHE_KUBECONFIG=/ci/kubeconfig KACHE_ACCESS_TOKEN_FILE=/ci/kache-token kache serve &
    KACHE_ACCESS_TOKEN_FILE=/ci/kache-token kache kubeconfig > /ci/kache.kubeconfig

  A shared proxy for many clients, each authenticated as itself:
    kache serve --config /etc/kache/kache.yaml --mode shared --tls \\
      --listen 0.0.0.0:8443 --client-ca-file /etc/kubernetes/pki/ca.crt

  Check a config file (and flags) without starting anything:
    kache check-config /etc/kache/kache.yaml --mode shared";

/// Shown after `kache serve -h`.
const SERVE_AFTER_HELP: &str = "\
Each flag can be set by an environment variable instead (shown in --help as [env: …]).
Precedence: flags > environment > config file (--config) > defaults.
`kache serve --help` shows examples.";

/// Shown after `kache serve --help`.
const SERVE_AFTER_LONG_HELP: &str = "\
Each flag can be set by an environment variable instead, as shown with it:
--listen is KACHE_LISTEN, --accept-host is KACHE_ACCEPT_HOST (several names
separated by commas), --tls is KACHE_TLS (true or false). A value given both
ways is taken from the flag; one given neither way comes from the config file,
then from the defaults:

  flags > environment (KACHE_*) > config file (--config) > defaults

`kache check-config` prints the configuration this gives, without starting.
SIGHUP rereads the config file and the access token file (the flags and
environment stay those kache started with).

Examples:
  A developer on localhost, in front of the current kubeconfig's cluster:
    kache serve &
    KUBECONFIG=<(kache kubeconfig) kubectl get pods -A

  A CI job's sidecar: loopback only, clients present a token, set up
  through the environment:
    export KACHE_KUBECONFIG=/ci/kubeconfig KACHE_ACCESS_TOKEN_FILE=/ci/kache-token
    kache serve &
    kache kubeconfig > /ci/kache.kubeconfig

  A shared proxy reached over the network, HTTPS with a generated
  certificate, clients authenticated by the cluster's CA or by token:
    kache serve --config /etc/kache/kache.yaml --mode shared --tls \\
      --listen 0.0.0.0:8443 --client-ca-file /etc/kubernetes/pki/ca.crt";

/// A caching reverse proxy for the Kubernetes API server.
#[derive(Debug, Parser)]
#[command(
    name = "kache",
    version,
    about = "A caching reverse proxy for the Kubernetes API server.",
    after_help = TOP_AFTER_HELP,
    after_long_help = TOP_AFTER_LONG_HELP
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy in front of the cluster of a kubeconfig.
    #[command(after_help = SERVE_AFTER_HELP, after_long_help = SERVE_AFTER_LONG_HELP)]
    Serve(ServeArgs),
    /// Print a kubeconfig whose cluster is this proxy.
    Kubeconfig(KubeconfigArgs),
    /// Check a config file as `serve` would and print the configuration it gives.
    ///
    /// The file is merged with any flags and KACHE_* variables as `serve`
    /// merges them, and printed with every default filled in. Starts
    /// nothing, contacts nothing; exits 1 if the configuration is invalid.
    CheckConfig(CheckConfigArgs),
    /// Print the version, the commit and how this binary was built.
    Version(VersionArgs),
    /// Print a shell completion script.
    ///
    /// bash: `source <(kache completions bash)`;
    /// zsh: `kache completions zsh > "${fpath[1]}/_kache"`;
    /// fish: `kache completions fish > ~/.config/fish/completions/kache.fish`.
    Completions(CompletionsArgs),
}

/// Flags of `kache serve`. Unset flags fall back to their environment
/// variable, then to the config file, then to defaults.
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// Kubeconfig of the upstream cluster [default: $KUBECONFIG, ~/.kube/config, in-cluster].
    #[arg(long, env = "KACHE_KUBECONFIG", value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// Context of the kubeconfig to use [default: its current context].
    #[arg(long, env = "KACHE_CONTEXT", value_name = "NAME")]
    pub context: Option<String>,
    /// Address of the client-facing listener [default: 127.0.0.1:8001].
    #[arg(long, env = "KACHE_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,
    /// Address of the admin listener (/livez, /readyz, /metrics) [default: 127.0.0.1:9901].
    #[arg(long, env = "KACHE_ADMIN_LISTEN", value_name = "ADDR")]
    pub admin_listen: Option<String>,
    /// Config file (YAML).
    #[arg(long, env = "KACHE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Serve HTTPS with this certificate (PEM); needs --tls-key.
    #[arg(long, env = "KACHE_TLS_CERT", value_name = "PATH")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) for --tls-cert.
    #[arg(long, env = "KACHE_TLS_KEY", hide_env_values = true, value_name = "PATH")]
    pub tls_key: Option<PathBuf>,
    /// Serve HTTPS with a self-signed certificate kept in the state directory.
    #[arg(long, env = "KACHE_TLS", value_name = "BOOL", num_args = 0..=1,
          require_equals = true, default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub tls: Option<bool>,
    /// Directory for state that outlives the process [default: $XDG_STATE_HOME/kache or ~/.local/state/kache].
    #[arg(long, env = "KACHE_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// File holding a token clients must present as `Authorization: Bearer`.
    #[arg(
        long,
        env = "KACHE_ACCESS_TOKEN_FILE",
        hide_env_values = true,
        value_name = "PATH"
    )]
    pub access_token_file: Option<PathBuf>,
    /// Accepted `Host` header names (repeatable or comma-separated, `*` for any) [default: localhost, 127.0.0.1, [::1]].
    #[arg(
        long = "accept-host",
        env = "KACHE_ACCEPT_HOST",
        value_name = "HOST",
        value_delimiter = ','
    )]
    pub accept_hosts: Vec<String>,
    /// `local`: one trusted user, kache's kubeconfig identity upstream.
    /// `shared`: every client authenticated and served as itself (needs TLS) [default: local].
    #[arg(long, env = "KACHE_MODE", value_enum, value_name = "MODE")]
    pub mode: Option<crate::ModeName>,
    /// Shared mode: PEM bundle of the CAs that sign client certificates (user = CN, groups = O).
    #[arg(long, env = "KACHE_CLIENT_CA_FILE", value_name = "PATH")]
    pub client_ca_file: Option<PathBuf>,
    /// Shared mode: how forwarded requests reach the API server [default: impersonate].
    #[arg(long, env = "KACHE_FORWARD", value_enum, value_name = "HOW")]
    pub forward: Option<crate::ForwardMode>,
    /// Shared mode: how answers from memory are authorized [default: rbac].
    #[arg(long, env = "KACHE_AUTHORIZATION", value_enum, value_name = "HOW")]
    pub authorization: Option<crate::AuthorizationMode>,
    /// Shared mode: requests without credentials are system:anonymous instead of 401.
    #[arg(long, env = "KACHE_ALLOW_ANONYMOUS", value_name = "BOOL", num_args = 0..=1,
          require_equals = true, default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub allow_anonymous: Option<bool>,
    /// Local mode: listen on a non-loopback address without an access token,
    /// letting anyone who can connect use kache's credentials.
    #[arg(long, env = "KACHE_DANGEROUSLY_EXPOSE_CREDENTIALS", value_name = "BOOL", num_args = 0..=1,
          require_equals = true, default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub dangerously_expose_credentials: Option<bool>,
}

/// Flags of `kache kubeconfig`.
#[derive(Debug, Clone, Default, Args)]
pub struct KubeconfigArgs {
    /// URL of the proxy [default: http://<--listen or 127.0.0.1:8001>, https:// with TLS].
    #[arg(long, env = "KACHE_SERVER", value_name = "URL")]
    pub server: Option<String>,
    /// The serve flags the proxy runs with, to derive the URL, certificate and token.
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Arguments of `kache check-config`.
#[derive(Debug, Clone, Default, Args)]
pub struct CheckConfigArgs {
    /// The config file to check [default: --config, $KACHE_CONFIG, else none: flags and defaults only].
    #[arg(value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// The serve flags to check with the file, as `kache serve` would merge them.
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Arguments of `kache version`.
#[derive(Debug, Clone, Default, Args)]
pub struct VersionArgs {
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = VersionFormat::Text)]
    pub output: VersionFormat,
}

/// How `kache version` prints.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum VersionFormat {
    /// One `name: value` line each, for people.
    #[default]
    Text,
    /// One JSON object, for scripts.
    Json,
}

/// Arguments of `kache completions`.
#[derive(Debug, Clone, Args)]
pub struct CompletionsArgs {
    /// The shell to complete in.
    #[arg(value_enum)]
    pub shell: CompletionShell,
}

/// Shells `kache completions` writes scripts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}
