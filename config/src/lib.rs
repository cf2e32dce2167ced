//! kache's configuration: the command line and an optional config file, merged
//! into one validated [`Config`].
//!
//! ```text
//!   defaults ──┐
//!   --config ──┼──► merge ──► validate ──► Config { upstream, listener, admin }
//!   flags    ──┘        (later wins)        (every error reported at once)
//! ```
//!
//! This crate is plain data: it reads files, nothing else. The upstream's
//! credentials are not interpreted here; the proxy hands the kubeconfig path
//! and context to the `kube` crate.

mod cli;
mod effective;
mod file;
mod limits;
mod shared;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use cli::{
    CheckConfigArgs, Cli, Command, CompletionShell, CompletionsArgs, KubeconfigArgs, ServeArgs, VersionArgs,
    VersionFormat,
};
pub use file::FileConfig;
pub use limits::{
    ClassConfig, ClassLimits, ClientKeyConfig, ClientMatch, FileLimits, LimitsConfig, DEFAULT_CLASS,
    DEFAULT_MAX_IN_FLIGHT, DEFAULT_MAX_IN_FLIGHT_PER_CLIENT, DEFAULT_MAX_LONG_RUNNING_PER_CLIENT,
    DEFAULT_QUEUE_LENGTH, DEFAULT_QUEUE_TIMEOUT, EXEMPT_CLASS,
};
pub use shared::{
    AuthorizationMode, FileShared, ForwardMode, Mode, ModeName, SharedConfig,
    DEFAULT_AUTHORIZATION_CACHE_SIZE, DEFAULT_AUTHORIZATION_CACHE_TTL, DEFAULT_TOKEN_CACHE_SIZE,
    DEFAULT_TOKEN_CACHE_TTL, DEFAULT_TOKEN_FAILURE_CACHE_TTL,
};

/// kubectl proxy's familiar port, so kubeconfigs written for it keep working.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8001";
/// Admin endpoints (health, metrics) live on their own port so the main
/// listener stays a faithful mirror of the API server's paths.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9901";
/// The API server's own limit on request headers (Go's `http.Server.MaxHeaderBytes`
/// as set by the generic API server): 1 MiB.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 1 << 20;
/// The API server's own limit on a write's request body
/// (`MaxRequestBodyBytes` of the generic API server): 3 MiB. Larger bodies
/// get its `413` without reaching it.
pub const DEFAULT_MAX_REQUEST_BODY_BYTES: u64 = 3 * 1024 * 1024;
/// Open client connections at most; past it, kache stops accepting until
/// one closes (new ones wait in the kernel's backlog). Each costs a file
/// descriptor: raise `ulimit -n` to match.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// A client that has not sent its full request head by then is disconnected,
/// so slow or stuck clients cannot pin connections forever.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// The API server ends non-long-running requests after 60 s
/// (`--request-timeout`); waiting longer than that for response headers
/// only hides a dead upstream.
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(60);
/// A TCP+TLS handshake with a healthy API server takes milliseconds.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Host names a loopback proxy accepts by default, as `kubectl proxy --accept-hosts` does:
/// a page served from elsewhere cannot reach kache through DNS rebinding.
/// Safety net behind the CRD/APIService watches: even with no change seen,
/// discovery entries are refetched after this long. kubectl's own disk cache
/// trusts discovery for 10 minutes (6 hours in recent versions).
pub const DEFAULT_DISCOVERY_MAX_AGE: Duration = Duration::from_secs(600);
pub const DEFAULT_ACCEPT_HOSTS: &[&str] = &["localhost", "127.0.0.1", "[::1]", "::1"];

/// The validated configuration of `kache serve`.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Local (one trusted user) or shared (every client is itself).
    pub mode: Mode,
    pub upstream: UpstreamConfig,
    pub listener: ListenerConfig,
    pub admin: AdminConfig,
    pub discovery: DiscoveryConfig,
    /// Concurrency limits and fair queueing of requests that reach the API server.
    pub limits: LimitsConfig,
    pub cache: CacheConfig,
}

/// The watch-fed object cache (`resourceVersion=0` reads, watches).
#[derive(Debug, Clone, PartialEq)]
pub struct CacheConfig {
    /// When false, every resource read is forwarded.
    pub enabled: bool,
    /// How long a read waits for a resource's first list before it is forwarded.
    pub sync_timeout: Duration,
    /// How long a `resourceVersion=N` read waits for the store to reach N.
    pub fresh_timeout: Duration,
    /// A resource nobody read or watched for this long stops being watched.
    pub idle_timeout: Duration,
    /// Bytes of objects held across all resources; past it, the least
    /// recently used resources are dropped and their reads forwarded.
    pub memory_budget_bytes: usize,
    /// Recent events kept per resource for watches that resume.
    pub event_window: usize,
    /// Events buffered per watcher before it is ended as too slow.
    pub watcher_backlog: usize,
    /// How often watchers that asked for bookmarks get one.
    pub bookmark_interval: Duration,
    /// Resources cached from the start and kept cached, as
    /// `(group, version, resource)`; the core group is empty.
    pub preload: Vec<(String, String, String)>,
    /// Where stores are saved, to start warm; `None`: no snapshots.
    pub snapshot_dir: Option<std::path::PathBuf>,
    /// How often each store is saved (and always at shutdown).
    pub snapshot_interval: Duration,
    /// Answer reads from memory when the API server cannot, at most this far
    /// behind it; `None`: never (the default).
    pub serve_stale: Option<Duration>,
    /// How often each store is compared with the API server's own list at
    /// the store's version (jittered); `None`: never.
    pub consistency_check: Option<Duration>,
}

/// Stores are saved this often, so a crash loses at most this much of the
/// window a warm start can resume from (the API server keeps ~5 minutes of
/// etcd history by default).
pub const DEFAULT_CACHE_SNAPSHOT_INTERVAL: Duration = Duration::from_secs(60);
/// The API server's own watch-cache consistency check (KEP-4988) runs
/// every few minutes; ten keeps the extra LISTs negligible.
pub const DEFAULT_CACHE_CONSISTENCY_CHECK: Duration = Duration::from_secs(600);

/// A first list of a typical resource takes well under a second; a read
/// should not wait much longer than forwarding it would take.
pub const DEFAULT_CACHE_SYNC_TIMEOUT: Duration = Duration::from_secs(3);
/// The API server's own cacher waits up to 3 s for a requested version.
pub const DEFAULT_CACHE_FRESH_TIMEOUT: Duration = Duration::from_secs(3);
/// Informers re-list and re-watch within minutes; a resource untouched for
/// 15 minutes is not worth a watch.
pub const DEFAULT_CACHE_IDLE_TIMEOUT: Duration = Duration::from_secs(900);
/// 2 GiB: the watch caches of a large API server hold a few GiB.
pub const DEFAULT_CACHE_MEMORY_BUDGET: usize = 2 << 30;
/// Ten times the API server's default watch cache size (100) per resource:
/// watches resuming after a short disconnect rarely need more.
pub const DEFAULT_CACHE_EVENT_WINDOW: usize = 1000;
/// Per watcher; a watcher this far behind is ended so its client relists.
pub const DEFAULT_CACHE_WATCHER_BACKLOG: usize = 1024;
/// The API server sends bookmarks about once a minute.
pub const DEFAULT_CACHE_BOOKMARK_INTERVAL: Duration = Duration::from_secs(60);

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            enabled: true,
            sync_timeout: DEFAULT_CACHE_SYNC_TIMEOUT,
            fresh_timeout: DEFAULT_CACHE_FRESH_TIMEOUT,
            idle_timeout: DEFAULT_CACHE_IDLE_TIMEOUT,
            memory_budget_bytes: DEFAULT_CACHE_MEMORY_BUDGET,
            event_window: DEFAULT_CACHE_EVENT_WINDOW,
            watcher_backlog: DEFAULT_CACHE_WATCHER_BACKLOG,
            bookmark_interval: DEFAULT_CACHE_BOOKMARK_INTERVAL,
            preload: Vec::new(),
            snapshot_dir: None,
            snapshot_interval: DEFAULT_CACHE_SNAPSHOT_INTERVAL,
            serve_stale: None,
            consistency_check: Some(DEFAULT_CACHE_CONSISTENCY_CHECK),
        }
    }
}

/// The discovery cache (`/api`, `/apis`, `/openapi/*`, `/version`).
#[derive(Debug, Clone, PartialEq)]
pub struct DiscoveryConfig {
    /// When false, discovery is forwarded like any other request.
    pub enabled: bool,
    /// Entries older than this are refetched even if no change was seen.
    pub max_age: Duration,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            enabled: true,
            max_age: DEFAULT_DISCOVERY_MAX_AGE,
        }
    }
}

/// Where the API server is and how to reach it.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    /// Kubeconfig to read; `None` means `$KUBECONFIG`, `~/.kube/config`, then in-cluster.
    pub kubeconfig: Option<PathBuf>,
    /// Context in the kubeconfig; `None` means its current context.
    pub context: Option<String>,
    /// Longest wait for response headers of a request that is not long-running.
    pub timeout: Duration,
    /// Longest wait for a new connection to the API server.
    pub connect_timeout: Duration,
}

/// The main (client-facing) listener.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerConfig {
    pub addr: SocketAddr,
    pub tls: Option<TlsConfig>,
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    /// Request bodies of resource writes over this get `413`.
    pub max_request_body_bytes: u64,
    /// Client connections open at once.
    pub max_connections: usize,
    /// `Host` header names accepted; `*` accepts any.
    pub accept_hosts: Vec<String>,
    /// When set, clients must present `Authorization: Bearer <token>`.
    pub access_token: Option<String>,
    /// The file `access_token` was read from.
    pub access_token_file: Option<PathBuf>,
}

/// How the main listener gets its serving certificate.
#[derive(Debug, Clone, PartialEq)]
pub enum TlsConfig {
    /// PEM files given by the user.
    Files { cert: PathBuf, key: PathBuf },
    /// A self-signed certificate generated at start, kept in `dir` so that it
    /// survives restarts and `kache kubeconfig` can embed it.
    SelfSigned { dir: PathBuf },
}

/// The admin listener: `/livez`, `/readyz`, `/metrics`.
#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    pub addr: SocketAddr,
}

/// Everything wrong with a configuration, reported at once.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
pub struct ConfigError(pub Vec<String>);

impl TlsConfig {
    /// Paths of the certificate and key this configuration serves with.
    pub fn paths(&self) -> (PathBuf, PathBuf) {
        match self {
            TlsConfig::Files { cert, key } => (cert.clone(), key.clone()),
            TlsConfig::SelfSigned { dir } => (dir.join("serving.crt"), dir.join("serving.key")),
        }
    }
}

/// Where kache keeps state that outlives a process (the generated certificate).
pub fn default_state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("kache");
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(home) => PathBuf::from(home).join(".local/state/kache"),
        None => PathBuf::from(".kache"),
    }
}

impl Config {
    /// Merges defaults, the config file named by `--config` (if any) and the
    /// flags, in that order, and validates the result.
    ///
    /// # Errors
    /// Every problem found: unreadable or malformed file, unparsable
    /// addresses, inconsistent TLS settings, unreadable token file.
    pub fn load(args: &ServeArgs) -> Result<Config, ConfigError> {
        let file = match &args.config {
            Some(path) => FileConfig::read(path).map_err(|e| ConfigError(vec![e]))?,
            None => FileConfig::default(),
        };
        Config::merge(args, file)
    }

    /// Merges an already-read file with the flags (flags win) and validates.
    ///
    /// # Errors
    /// See [`Config::load`].
    pub fn merge(args: &ServeArgs, file: FileConfig) -> Result<Config, ConfigError> {
        let mut errors = Vec::new();
        let mut addr = |what: &str, flag: &Option<String>, file: &Option<String>, default: &str| {
            let raw = flag.as_deref().or(file.as_deref()).unwrap_or(default);
            raw.parse::<SocketAddr>()
                .map_err(|e| errors.push(format!("{what} {raw:?}: {e} (expected IP:PORT)")))
                .ok()
        };
        let listen = addr("listen address", &args.listen, &file.listen, DEFAULT_LISTEN);
        let admin = addr(
            "admin listen address",
            &args.admin_listen,
            &file.admin_listen,
            DEFAULT_ADMIN_LISTEN,
        );

        let tls_cert = args.tls_cert.clone().or(file.tls.cert.clone());
        let tls_key = args.tls_key.clone().or(file.tls.key.clone());
        let self_signed = args.tls.or(file.tls.self_signed).unwrap_or(false);
        let tls = match (tls_cert, tls_key) {
            (Some(cert), Some(key)) => Some(TlsConfig::Files { cert, key }),
            (None, None) if self_signed => Some(TlsConfig::SelfSigned {
                dir: args
                    .state_dir
                    .clone()
                    .or(file.state_dir.clone())
                    .unwrap_or_else(default_state_dir),
            }),
            (None, None) => None,
            _ => {
                errors.push("TLS needs both a certificate and a key (--tls-cert and --tls-key)".into());
                None
            }
        };

        let access_token_file = args.access_token_file.clone().or(file.access_token_file.clone());
        let access_token = match &access_token_file {
            Some(path) => match std::fs::read_to_string(path) {
                Ok(token) if !token.trim().is_empty() => Some(token.trim().to_string()),
                Ok(_) => {
                    errors.push(format!("access token file {} is empty", path.display()));
                    None
                }
                Err(e) => {
                    errors.push(format!("access token file {}: {e}", path.display()));
                    None
                }
            },
            None => None,
        };

        // Loopback names are always accepted (they cannot be a rebinding
        // attack); configured names come in addition, flags over the file.
        let configured = if !args.accept_hosts.is_empty() {
            args.accept_hosts.clone()
        } else {
            file.accept_hosts.clone().unwrap_or_default()
        };
        let mut accept_hosts: Vec<String> = DEFAULT_ACCEPT_HOSTS.iter().map(|h| h.to_string()).collect();
        for host in configured {
            let host = host.trim().to_ascii_lowercase();
            if host.is_empty() {
                errors.push("accept hosts must not be empty names (use \"*\" to accept any Host)".into());
            } else if !accept_hosts.contains(&host) {
                accept_hosts.push(host);
            }
        }

        let max_header_bytes = file.max_header_bytes.unwrap_or(DEFAULT_MAX_HEADER_BYTES);
        if max_header_bytes < 8192 {
            errors.push(format!(
                "maxHeaderBytes {max_header_bytes} is below the minimum of 8192"
            ));
        }
        let max_request_body_bytes = file
            .max_request_body_bytes
            .unwrap_or(DEFAULT_MAX_REQUEST_BODY_BYTES);
        let max_connections = file.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
        if max_connections == 0 {
            errors.push("maxConnections must be at least 1".into());
        }
        let secs = |v: Option<u64>, default: Duration| v.map(Duration::from_secs).unwrap_or(default);
        let header_read_timeout = secs(file.header_read_timeout_seconds, DEFAULT_HEADER_READ_TIMEOUT);
        let timeout = secs(file.upstream.timeout_seconds, DEFAULT_UPSTREAM_TIMEOUT);
        let connect_timeout = secs(file.upstream.connect_timeout_seconds, DEFAULT_CONNECT_TIMEOUT);
        let discovery = DiscoveryConfig {
            enabled: file.discovery.enabled.unwrap_or(true),
            max_age: secs(file.discovery.max_age_seconds, DEFAULT_DISCOVERY_MAX_AGE),
        };
        let limits = file.limits.validate(&mut errors);
        let c = &file.cache;
        let cache = CacheConfig {
            enabled: c.enabled.unwrap_or(true),
            sync_timeout: secs(c.sync_timeout_seconds, DEFAULT_CACHE_SYNC_TIMEOUT),
            fresh_timeout: secs(c.fresh_timeout_seconds, DEFAULT_CACHE_FRESH_TIMEOUT),
            idle_timeout: secs(c.idle_timeout_seconds, DEFAULT_CACHE_IDLE_TIMEOUT),
            memory_budget_bytes: c.memory_budget_bytes.unwrap_or(DEFAULT_CACHE_MEMORY_BUDGET),
            event_window: c.event_window.unwrap_or(DEFAULT_CACHE_EVENT_WINDOW),
            watcher_backlog: c.watcher_backlog.unwrap_or(DEFAULT_CACHE_WATCHER_BACKLOG),
            bookmark_interval: secs(c.bookmark_interval_seconds, DEFAULT_CACHE_BOOKMARK_INTERVAL),
            preload: c
                .preload
                .iter()
                .filter_map(|entry| match entry.split('/').collect::<Vec<_>>().as_slice() {
                    [version, resource] if !version.is_empty() && !resource.is_empty() => {
                        Some((String::new(), version.to_string(), resource.to_string()))
                    }
                    [group, version, resource] if [group, version, resource].iter().all(|s| !s.is_empty()) => {
                        Some((group.to_string(), version.to_string(), resource.to_string()))
                    }
                    _ => {
                        errors.push(format!(
                            "cache.preload entry {entry:?}: expected version/resource (core) or group/version/resource"
                        ));
                        None
                    }
                })
                .collect(),
            snapshot_dir: match c.snapshots {
                Some(false) => None,
                _ => Some(
                    args.state_dir
                        .clone()
                        .or(file.state_dir.clone())
                        .unwrap_or_else(default_state_dir)
                        .join("snapshots"),
                ),
            },
            snapshot_interval: secs(c.snapshot_interval_seconds, DEFAULT_CACHE_SNAPSHOT_INTERVAL),
            serve_stale: c
                .serve_stale
                .as_ref()
                .map(|stale| Duration::from_secs(stale.max_staleness_seconds)),
            consistency_check: match c.consistency_check_seconds {
                Some(0) => None,
                Some(seconds) => Some(Duration::from_secs(seconds)),
                None => Some(DEFAULT_CACHE_CONSISTENCY_CHECK),
            },
        };
        if cache.serve_stale.is_some_and(|d| d.is_zero()) {
            errors.push("cache.serveStale.maxStalenessSeconds must be at least 1".into());
        }
        for (name, value) in [
            ("cache.eventWindow", cache.event_window),
            ("cache.watcherBacklog", cache.watcher_backlog),
        ] {
            if value == 0 {
                errors.push(format!("{name} must be at least 1"));
            }
        }
        for (name, value) in [
            ("cache.syncTimeoutSeconds", cache.sync_timeout),
            ("cache.idleTimeoutSeconds", cache.idle_timeout),
            ("cache.bookmarkIntervalSeconds", cache.bookmark_interval),
            ("cache.snapshotIntervalSeconds", cache.snapshot_interval),
            ("discovery.maxAgeSeconds", discovery.max_age),
            ("headerReadTimeoutSeconds", header_read_timeout),
            ("upstream.timeoutSeconds", timeout),
            ("upstream.connectTimeoutSeconds", connect_timeout),
        ] {
            if value.is_zero() {
                errors.push(format!("{name} must be at least 1"));
            }
        }

        // Whether a token is configured, read or not (an unreadable file is its own error).
        let token_configured = access_token_file.is_some();
        let mode = merge_mode(args, &file, &tls, token_configured, listen, &mut errors);

        match (listen, admin) {
            (Some(listen), Some(admin)) if errors.is_empty() => {
                if listen == admin && listen.port() != 0 {
                    return Err(ConfigError(vec![format!(
                        "listen and admin listen addresses are both {listen}"
                    )]));
                }
                Ok(Config {
                    mode,
                    upstream: UpstreamConfig {
                        kubeconfig: args.kubeconfig.clone().or(file.kubeconfig),
                        context: args.context.clone().or(file.context),
                        timeout,
                        connect_timeout,
                    },
                    listener: ListenerConfig {
                        addr: listen,
                        tls,
                        header_read_timeout,
                        max_header_bytes,
                        max_request_body_bytes,
                        max_connections,
                        accept_hosts,
                        access_token,
                        access_token_file,
                    },
                    admin: AdminConfig { addr: admin },
                    discovery,
                    cache,
                    limits,
                })
            }
            _ => Err(ConfigError(errors)),
        }
    }
}

/// The mode and its settings, flags over the file, with the rules that keep
/// kache's credentials from reaching clients they are not meant for.
fn merge_mode(
    args: &ServeArgs,
    file: &FileConfig,
    tls: &Option<TlsConfig>,
    token_configured: bool,
    listen: Option<SocketAddr>,
    errors: &mut Vec<String>,
) -> Mode {
    let f = &file.shared;
    let shared_settings = [
        (
            "--client-ca-file / shared.clientCaFile",
            args.client_ca_file.is_some() || f.client_ca_file.is_some(),
        ),
        (
            "--forward / shared.forward",
            args.forward.is_some() || f.forward.is_some(),
        ),
        (
            "--authorization / shared.authorization",
            args.authorization.is_some() || f.authorization.is_some(),
        ),
        (
            "--allow-anonymous / shared.allowAnonymous",
            args.allow_anonymous.is_some() || f.allow_anonymous.is_some(),
        ),
    ];
    match args.mode.or(file.mode).unwrap_or(ModeName::Local) {
        ModeName::Local => {
            for (name, set) in shared_settings {
                if set {
                    errors.push(format!("{name} applies to shared mode only (--mode shared)"));
                }
            }
            let exposed = args
                .dangerously_expose_credentials
                .or(file.dangerously_expose_credentials)
                .unwrap_or(false);
            if let Some(listen) = listen {
                if !listen.ip().is_loopback() && !token_configured && !exposed {
                    errors.push(format!(
                        "local mode listening on {listen} (not loopback) without an access token would let anyone \
                         who can connect use kache's credentials: set --access-token-file, use --mode shared, \
                         or pass --dangerously-expose-credentials"
                    ));
                }
            }
            Mode::Local
        }
        ModeName::Shared => {
            if tls.is_none() {
                errors.push(
                    "shared mode serves clients over the network and needs HTTPS: --tls, or --tls-cert and --tls-key"
                        .into(),
                );
            }
            if token_configured {
                errors.push(
                    "--access-token-file is for local mode; in shared mode every client authenticates as itself"
                        .into(),
                );
            }
            let secs = |v: Option<u64>, default: Duration| v.map(Duration::from_secs).unwrap_or(default);
            let shared = SharedConfig {
                forward: args.forward.or(f.forward).unwrap_or(ForwardMode::Impersonate),
                authorization: args
                    .authorization
                    .or(f.authorization)
                    .unwrap_or(AuthorizationMode::Rbac),
                allow_anonymous: args.allow_anonymous.or(f.allow_anonymous).unwrap_or(false),
                client_ca_file: args.client_ca_file.clone().or(f.client_ca_file.clone()),
                token_cache_ttl: secs(f.token_cache_ttl_seconds, DEFAULT_TOKEN_CACHE_TTL),
                token_failure_cache_ttl: secs(
                    f.token_failure_cache_ttl_seconds,
                    DEFAULT_TOKEN_FAILURE_CACHE_TTL,
                ),
                token_cache_size: f.token_cache_size.unwrap_or(DEFAULT_TOKEN_CACHE_SIZE),
                authorization_cache_ttl: secs(
                    f.authorization_cache_ttl_seconds,
                    DEFAULT_AUTHORIZATION_CACHE_TTL,
                ),
                authorization_cache_size: f
                    .authorization_cache_size
                    .unwrap_or(DEFAULT_AUTHORIZATION_CACHE_SIZE),
            };
            if let Some(path) = &shared.client_ca_file {
                if let Err(e) = std::fs::metadata(path) {
                    errors.push(format!("client CA file {}: {e}", path.display()));
                }
            }
            for (name, value) in [
                ("shared.tokenCacheSize", shared.token_cache_size),
                ("shared.authorizationCacheSize", shared.authorization_cache_size),
            ] {
                if value == 0 {
                    errors.push(format!("{name} must be at least 1"));
                }
            }
            Mode::Shared(shared)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn serve(args: &[&str]) -> ServeArgs {
        let cli = Cli::try_parse_from(["kache", "serve"].iter().chain(args)).expect("valid flags");
        match cli.command {
            Command::Serve(args) => args,
            other => panic!("expected serve, got {other:?}"),
        }
    }

    #[test]
    fn defaults_listen_on_loopback_without_tls() {
        let config = Config::merge(&serve(&[]), FileConfig::default()).expect("valid");
        assert_eq!(config.listener.addr.to_string(), DEFAULT_LISTEN);
        assert_eq!(config.admin.addr.to_string(), DEFAULT_ADMIN_LISTEN);
        assert_eq!(config.listener.tls, None);
        assert_eq!(config.listener.max_header_bytes, DEFAULT_MAX_HEADER_BYTES);
        assert!(config.listener.accept_hosts.contains(&"localhost".to_string()));
        assert_eq!(config.upstream.kubeconfig, None);
    }

    #[test]
    fn flags_override_the_file() {
        let file = FileConfig::parse("listen: 127.0.0.1:7000\ncontext: from-file\nkubeconfig: /file\n")
            .expect("valid yaml");
        let config =
            Config::merge(&serve(&["--listen", "127.0.0.1:7001", "--context", "flag"]), file).expect("valid");
        assert_eq!(config.listener.addr.port(), 7001);
        assert_eq!(config.upstream.context.as_deref(), Some("flag"));
        assert_eq!(config.upstream.kubeconfig, Some(PathBuf::from("/file")));
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let file =
            FileConfig::parse("maxHeaderBytes: 10\nupstream: {timeoutSeconds: 0}\n").expect("valid yaml");
        let err =
            Config::merge(&serve(&["--listen", "nonsense", "--tls-cert", "/c"]), file).expect_err("invalid");
        let text = err.to_string();
        assert_eq!(err.0.len(), 4, "{text}");
        assert!(text.contains("nonsense"), "{text}");
        assert!(text.contains("--tls-key"), "{text}");
        assert!(text.contains("maxHeaderBytes"), "{text}");
        assert!(text.contains("upstream.timeoutSeconds"), "{text}");
    }

    #[test]
    fn accepted_hosts_add_to_the_loopback_names() {
        let config =
            Config::merge(&serve(&["--accept-host", "Kache.Example"]), FileConfig::default()).expect("valid");
        for host in ["localhost", "127.0.0.1", "[::1]", "kache.example"] {
            assert!(config.listener.accept_hosts.contains(&host.to_string()), "{host}");
        }
        let err =
            Config::merge(&serve(&["--accept-host", " "]), FileConfig::default()).expect_err("empty name");
        assert!(err.to_string().contains("empty"), "{err}");
    }

    #[test]
    fn preloaded_resources_name_a_group_version_and_resource() {
        let file =
            FileConfig::parse("cache: {preload: [v1/pods, apps/v1/deployments]}\n").expect("valid yaml");
        let config = Config::merge(&serve(&[]), file).expect("valid");
        assert_eq!(
            config.cache.preload,
            [
                (String::new(), "v1".to_string(), "pods".to_string()),
                ("apps".to_string(), "v1".to_string(), "deployments".to_string())
            ]
        );
        let file = FileConfig::parse("cache: {preload: [pods, a//b]}\n").expect("valid yaml");
        let err = Config::merge(&serve(&[]), file).expect_err("invalid");
        assert_eq!(err.0.len(), 2, "{err}");
    }

    #[test]
    fn snapshots_serve_stale_and_consistency_checks_are_configured_in_the_cache_section() {
        let config = Config::merge(&serve(&["--state-dir", "/s"]), FileConfig::default()).expect("valid");
        assert_eq!(config.cache.snapshot_dir, Some(PathBuf::from("/s/snapshots")));
        assert_eq!(config.cache.serve_stale, None, "serving stale is opt-in");
        assert_eq!(
            config.cache.consistency_check,
            Some(DEFAULT_CACHE_CONSISTENCY_CHECK)
        );
        let file = FileConfig::parse(
            "cache: {snapshots: false, serveStale: {maxStalenessSeconds: 120}, consistencyCheckSeconds: 0}\n",
        )
        .expect("valid yaml");
        let config = Config::merge(&serve(&[]), file).expect("valid");
        assert_eq!(config.cache.snapshot_dir, None);
        assert_eq!(config.cache.serve_stale, Some(Duration::from_secs(120)));
        assert_eq!(config.cache.consistency_check, None, "0 turns the check off");
        let file = FileConfig::parse("cache: {serveStale: {maxStalenessSeconds: 0}}\n").expect("valid yaml");
        assert!(Config::merge(&serve(&[]), file).is_err());
    }

    #[test]
    fn unknown_file_fields_are_rejected() {
        let err = FileConfig::parse("lisen: 127.0.0.1:1\n").expect_err("unknown field");
        assert!(err.to_string().contains("lisen"), "{err}");
    }

    #[test]
    fn self_signed_tls_uses_the_state_dir() {
        let config =
            Config::merge(&serve(&["--tls", "--state-dir", "/s"]), FileConfig::default()).expect("valid");
        let tls = config.listener.tls.expect("tls");
        assert_eq!(
            tls.paths(),
            (PathBuf::from("/s/serving.crt"), PathBuf::from("/s/serving.key"))
        );
    }

    #[test]
    fn same_listen_and_admin_address_is_rejected() {
        let err = Config::merge(
            &serve(&["--listen", "127.0.0.1:9000", "--admin-listen", "127.0.0.1:9000"]),
            FileConfig::default(),
        )
        .expect_err("clash");
        assert!(err.to_string().contains("both"), "{err}");
    }

    #[test]
    fn local_mode_refuses_a_non_loopback_listener_without_a_token() {
        let err = Config::merge(&serve(&["--listen", "0.0.0.0:8001"]), FileConfig::default())
            .expect_err("credentials exposed");
        assert!(
            err.to_string().contains("--dangerously-expose-credentials"),
            "{err}"
        );
        let config = Config::merge(
            &serve(&["--listen", "0.0.0.0:8001", "--dangerously-expose-credentials"]),
            FileConfig::default(),
        )
        .expect("explicitly allowed");
        assert_eq!(config.mode, Mode::Local);
        let config =
            Config::merge(&serve(&["--listen", "[::1]:8001"]), FileConfig::default()).expect("loopback");
        assert_eq!(config.mode, Mode::Local);
    }

    #[test]
    fn shared_mode_needs_tls_and_takes_its_settings_from_flags_over_the_file() {
        let err = Config::merge(&serve(&["--mode", "shared"]), FileConfig::default()).expect_err("no TLS");
        assert!(err.to_string().contains("HTTPS"), "{err}");
        let file = FileConfig::parse(
            "mode: shared\nlisten: 0.0.0.0:8443\ntls: {selfSigned: true}\n\
             shared: {forward: passthrough, authorization: sar, tokenCacheTtlSeconds: 30}\n",
        )
        .expect("valid yaml");
        let config =
            Config::merge(&serve(&["--authorization", "rbac", "--allow-anonymous"]), file).expect("valid");
        let Mode::Shared(shared) = config.mode else {
            panic!("expected shared mode");
        };
        assert_eq!(shared.forward, ForwardMode::Passthrough);
        assert_eq!(shared.authorization, AuthorizationMode::Rbac);
        assert!(shared.allow_anonymous);
        assert_eq!(shared.token_cache_ttl, Duration::from_secs(30));
        assert_eq!(shared.authorization_cache_ttl, DEFAULT_AUTHORIZATION_CACHE_TTL);
    }

    #[test]
    fn shared_settings_in_local_mode_are_errors() {
        let err = Config::merge(&serve(&["--forward", "passthrough"]), FileConfig::default())
            .expect_err("shared-only flag");
        assert!(err.to_string().contains("shared mode only"), "{err}");
    }

    #[test]
    fn access_token_is_read_from_its_file() {
        let path = std::env::temp_dir().join(format!("kache-token-{}", std::process::id()));
        std::fs::write(&path, "s3cret\n").expect("write");
        let config = Config::merge(
            &serve(&["--access-token-file", path.to_str().expect("utf-8")]),
            FileConfig::default(),
        )
        .expect("valid");
        std::fs::remove_file(&path).ok();
        assert_eq!(config.listener.access_token.as_deref(), Some("s3cret"));
    }

    #[test]
    fn boolean_flags_given_false_override_the_file() {
        let file =
            FileConfig::parse("mode: shared\ntls: {selfSigned: true}\nshared: {allowAnonymous: true}\n")
                .expect("valid yaml");
        let err = Config::merge(&serve(&["--tls=false"]), file.clone()).expect_err("shared mode without TLS");
        assert!(err.to_string().contains("HTTPS"), "{err}");
        let config = Config::merge(&serve(&["--allow-anonymous=no"]), file.clone()).expect("valid");
        let Mode::Shared(shared) = config.mode else {
            panic!("expected shared mode");
        };
        assert!(!shared.allow_anonymous);
        let config = Config::merge(&serve(&[]), file).expect("valid");
        let Mode::Shared(shared) = config.mode else {
            panic!("expected shared mode");
        };
        assert!(shared.allow_anonymous, "the file's, when no flag is given");
    }

    #[test]
    fn accept_hosts_may_be_given_comma_separated() {
        let config = Config::merge(
            &serve(&[
                "--accept-host",
                "a.example,b.example",
                "--accept-host",
                "c.example",
            ]),
            FileConfig::default(),
        )
        .expect("valid");
        for host in ["a.example", "b.example", "c.example"] {
            assert!(config.listener.accept_hosts.contains(&host.to_string()), "{host}");
        }
    }

    #[test]
    fn check_config_takes_a_file_and_the_serve_flags() {
        let cli = Cli::try_parse_from(["kache", "check-config", "/k.yaml", "--mode", "shared", "--tls"])
            .expect("valid");
        let Command::CheckConfig(args) = cli.command else {
            panic!("expected check-config");
        };
        assert_eq!(args.file, Some(PathBuf::from("/k.yaml")));
        assert_eq!(args.serve.mode, Some(ModeName::Shared));
        assert_eq!(args.serve.tls, Some(true));
        let cli = Cli::try_parse_from(["kache", "version", "-o", "json"]).expect("valid");
        assert!(matches!(
            cli.command,
            Command::Version(VersionArgs {
                output: VersionFormat::Json
            })
        ));
        assert!(Cli::try_parse_from(["kache", "completions", "tcsh"]).is_err());
    }

    #[test]
    fn an_unreadable_token_file_is_one_error_not_also_a_missing_token() {
        let err = Config::merge(
            &serve(&[
                "--listen",
                "0.0.0.0:8001",
                "--access-token-file",
                "/nonexistent/token",
            ]),
            FileConfig::default(),
        )
        .expect_err("unreadable token");
        assert_eq!(err.0.len(), 1, "{err}");
        assert!(err.0[0].contains("/nonexistent/token"), "{err}");
    }
}
