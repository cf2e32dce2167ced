//! The optional config file (YAML), every field optional and unknown fields rejected.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The config file as written by the user. Field names are camelCase, as in
/// Kubernetes manifests.
///
/// ```yaml
/// listen: 127.0.0.1:8001
/// adminListen: 127.0.0.1:9901
/// kubeconfig: /etc/kache/kubeconfig
/// context: prod
/// acceptHosts: [localhost, kache.example.internal]
/// maxHeaderBytes: 1048576
/// headerReadTimeoutSeconds: 30
/// tls: {cert: /etc/kache/tls.crt, key: /etc/kache/tls.key}
/// upstream: {timeoutSeconds: 60, connectTimeoutSeconds: 10}
/// discovery: {enabled: true, maxAgeSeconds: 600}
/// cache: {enabled: true, memoryBudgetBytes: 2147483648, idleTimeoutSeconds: 900}
/// limits: {maxInFlight: 400, default: {queueLength: 50}}   # see limits.rs
/// ```
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<String>,
    pub admin_listen: Option<String>,
    pub kubeconfig: Option<PathBuf>,
    pub context: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub access_token_file: Option<PathBuf>,
    pub accept_hosts: Option<Vec<String>>,
    pub max_header_bytes: Option<usize>,
    pub max_request_body_bytes: Option<u64>,
    pub max_connections: Option<usize>,
    pub header_read_timeout_seconds: Option<u64>,
    #[serde(default)]
    pub tls: FileTls,
    #[serde(default)]
    pub upstream: FileUpstream,
    #[serde(default)]
    pub discovery: FileDiscovery,
    #[serde(default)]
    pub cache: FileCache,
    #[serde(default)]
    pub limits: crate::limits::FileLimits,
    pub mode: Option<crate::ModeName>,
    #[serde(default)]
    pub shared: crate::shared::FileShared,
    pub dangerously_expose_credentials: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileCache {
    pub enabled: Option<bool>,
    pub sync_timeout_seconds: Option<u64>,
    pub fresh_timeout_seconds: Option<u64>,
    pub idle_timeout_seconds: Option<u64>,
    pub memory_budget_bytes: Option<usize>,
    pub event_window: Option<usize>,
    pub watcher_backlog: Option<usize>,
    pub bookmark_interval_seconds: Option<u64>,
    #[serde(default)]
    pub preload: Vec<String>,
    /// Save stores to `<stateDir>/snapshots` to start warm (default true).
    pub snapshots: Option<bool>,
    pub snapshot_interval_seconds: Option<u64>,
    pub serve_stale: Option<FileServeStale>,
    /// 0 turns the check off.
    pub consistency_check_seconds: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileServeStale {
    pub max_staleness_seconds: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileDiscovery {
    pub enabled: Option<bool>,
    pub max_age_seconds: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileTls {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub self_signed: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileUpstream {
    pub timeout_seconds: Option<u64>,
    pub connect_timeout_seconds: Option<u64>,
}

impl FileConfig {
    /// Reads and parses a config file.
    ///
    /// # Errors
    /// A message naming the file and what is wrong with it.
    pub fn read(path: &Path) -> Result<FileConfig, String> {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("config file {}: {e}", path.display()))?;
        if text.trim().is_empty() {
            return Ok(FileConfig::default());
        }
        serde_yaml::from_str(&text).map_err(|e| format!("config file {}: {e}", path.display()))
    }
}
