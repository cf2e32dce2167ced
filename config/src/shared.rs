//! The mode kache runs in, and the settings of shared mode: how clients
//! authenticate, how their requests reach the API server, and how answers
//! from memory are authorized.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Who kache serves.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    /// One trusted user (or program) on this machine: every request reaches
    /// the API server with the kubeconfig's identity.
    Local,
    /// A proxy reached over the network by many clients: each is
    /// authenticated and gets exactly what the API server would give it.
    Shared(SharedConfig),
}

impl Mode {
    pub fn is_shared(&self) -> bool {
        matches!(self, Mode::Shared(_))
    }

    /// The name used on the command line and in logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            Mode::Local => "local",
            Mode::Shared(_) => "shared",
        }
    }
}

/// How a shared proxy's forwarded requests reach the API server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "camelCase")]
pub enum ForwardMode {
    /// The client's own bearer token goes upstream unchanged: the API server
    /// authenticates, authorizes and audits the real user. Clients
    /// authenticated by certificate (which cannot be passed on) and anonymous
    /// ones are forwarded as in `impersonate`.
    Passthrough,
    /// kache's identity with `Impersonate-User`/`-Group`/`-Extra-*` of the
    /// authenticated user (kache's account needs the `impersonate` verb).
    Impersonate,
}

impl ForwardMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ForwardMode::Passthrough => "passthrough",
            ForwardMode::Impersonate => "impersonate",
        }
    }
}

/// How answers from memory are authorized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "camelCase")]
pub enum AuthorizationMode {
    /// An in-process RBAC evaluator fed by watches of the RBAC objects;
    /// a denial is confirmed with a SubjectAccessReview (the cluster may run
    /// other authorizers).
    Rbac,
    /// Every decision from a SubjectAccessReview, cached for a short time.
    Sar,
}

impl AuthorizationMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthorizationMode::Rbac => "rbac",
            AuthorizationMode::Sar => "sar",
        }
    }
}

/// Shared mode's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedConfig {
    pub forward: ForwardMode,
    pub authorization: AuthorizationMode,
    /// Requests without credentials are `system:anonymous` (in
    /// `system:unauthenticated`) instead of being refused with 401.
    pub allow_anonymous: bool,
    /// PEM bundle of the CAs whose client certificates authenticate users
    /// (the cluster's own `--client-ca-file`); none: certificates are not asked for.
    pub client_ca_file: Option<PathBuf>,
    /// How long a successful TokenReview is trusted.
    pub token_cache_ttl: Duration,
    /// How long a rejected token stays rejected without asking again.
    pub token_failure_cache_ttl: Duration,
    /// Tokens remembered at most (least recently used go first).
    pub token_cache_size: usize,
    /// How long a SubjectAccessReview's decision is reused.
    pub authorization_cache_ttl: Duration,
    /// Decisions remembered at most.
    pub authorization_cache_size: usize,
}

/// The API server's own webhook token authenticator caches for 2 minutes
/// (`--authentication-token-webhook-cache-ttl`).
pub const DEFAULT_TOKEN_CACHE_TTL: Duration = Duration::from_secs(120);
/// A rejected token may become valid (a new static token, a clock skew):
/// ask again soon, but not on every request of a misconfigured client.
pub const DEFAULT_TOKEN_FAILURE_CACHE_TTL: Duration = Duration::from_secs(10);
/// Distinct tokens of a large fleet of automation.
pub const DEFAULT_TOKEN_CACHE_SIZE: usize = 10_000;
/// A revoked permission stops being honoured from memory within this long
/// (sar mode; in rbac mode only confirmations of local denials are cached).
pub const DEFAULT_AUTHORIZATION_CACHE_TTL: Duration = Duration::from_secs(10);
/// Distinct (user, request attributes) decisions remembered.
pub const DEFAULT_AUTHORIZATION_CACHE_SIZE: usize = 100_000;

impl Default for SharedConfig {
    fn default() -> Self {
        SharedConfig {
            forward: ForwardMode::Impersonate,
            authorization: AuthorizationMode::Rbac,
            allow_anonymous: false,
            client_ca_file: None,
            token_cache_ttl: DEFAULT_TOKEN_CACHE_TTL,
            token_failure_cache_ttl: DEFAULT_TOKEN_FAILURE_CACHE_TTL,
            token_cache_size: DEFAULT_TOKEN_CACHE_SIZE,
            authorization_cache_ttl: DEFAULT_AUTHORIZATION_CACHE_TTL,
            authorization_cache_size: DEFAULT_AUTHORIZATION_CACHE_SIZE,
        }
    }
}

/// `shared:` in the config file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileShared {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forward: Option<ForwardMode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authorization: Option<AuthorizationMode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_anonymous: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ca_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_cache_ttl_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_failure_cache_ttl_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_cache_size: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authorization_cache_ttl_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authorization_cache_size: Option<usize>,
}

/// `mode:` in the config file and `--mode` on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "camelCase")]
pub enum ModeName {
    Local,
    Shared,
}
