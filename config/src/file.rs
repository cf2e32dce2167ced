//! The optional config file (YAML), every field optional and unknown fields rejected.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

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
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_listen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_token_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accept_hosts: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_header_bytes: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_request_body_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header_read_timeout_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "is_default")]
    pub tls: FileTls,
    #[serde(default)]
    pub upstream: FileUpstream,
    #[serde(default)]
    pub discovery: FileDiscovery,
    #[serde(default)]
    pub cache: FileCache,
    #[serde(default)]
    pub limits: crate::limits::FileLimits,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<crate::ModeName>,
    #[serde(default, skip_serializing_if = "is_default")]
    pub shared: crate::shared::FileShared,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dangerously_expose_credentials: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileCache {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync_timeout_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fresh_timeout_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_timeout_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_budget_bytes: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_window: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub watcher_backlog: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bookmark_interval_seconds: Option<u64>,
    #[serde(default)]
    pub preload: Vec<String>,
    /// Save stores to `<stateDir>/snapshots` to start warm (default true).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshots: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_interval_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serve_stale: Option<FileServeStale>,
    /// 0 turns the check off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consistency_check_seconds: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileServeStale {
    pub max_staleness_seconds: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileDiscovery {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_age_seconds: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileTls {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub self_signed: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileUpstream {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_timeout_seconds: Option<u64>,
}

impl FileConfig {
    /// Reads and parses a config file.
    ///
    /// # Errors
    /// A message naming the file and what is wrong with it, with the line
    /// and column where the text is malformed or a field unknown or mistyped.
    pub fn read(path: &Path) -> Result<FileConfig, String> {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("config file {}: {e}", path.display()))?;
        FileConfig::parse(&text).map_err(|e| format!("config file {}: {e}", path.display()))
    }

    /// Parses the text of a config file. Booleans are YAML 1.2's `true` and
    /// `false` only (`yes`, `on` and the like are errors, not guesses).
    ///
    /// # Errors
    /// What is wrong, ending with `at line L, column C`.
    pub fn parse(text: &str) -> Result<FileConfig, String> {
        if text.trim().is_empty() {
            return Ok(FileConfig::default());
        }
        let options = serde_saphyr::options! { strict_booleans: true };
        serde_saphyr::from_str_with_options(text, options).map_err(|e| e.without_snippet().to_string())
    }

    /// The file as YAML, fields in the order of this struct; unset fields are left out.
    ///
    /// # Errors
    /// A path that is not UTF-8 (YAML is text).
    pub fn to_yaml(&self) -> Result<String, String> {
        serde_saphyr::to_string(self).map_err(|e| e.to_string())
    }
}

/// Whether a section is entirely unset, so it can be left out of the YAML.
fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_line_and_column() {
        let cases = [
            (
                "listen: 127.0.0.1:1\nupstream:\n  timeoutSecs: 3\n",
                "unknown field `timeoutSecs`",
                "line 3, column 3",
            ),
            (
                "listen: 127.0.0.1:1\nmaxHeaderBytes: -3\n",
                "invalid",
                "line 2, column 17",
            ),
            ("mode: sharde\n", "unknown variant `sharde`", "line 1, column 7"),
            ("listen: [127.0.0.1\n", "", "line 1"),
            ("listen: a\nlisten: b\n", "duplicate", "line 2, column 1"),
        ];
        for (yaml, what, place) in cases {
            let err = FileConfig::parse(yaml).expect_err(yaml);
            assert!(err.contains(what) && err.contains(place), "{yaml:?}: {err}");
        }
    }

    #[test]
    fn reading_a_file_names_it() {
        let path = std::env::temp_dir().join(format!("kache-file-{}.yaml", std::process::id()));
        std::fs::write(&path, "# kache\ncache:\n  enabled: yes\n").expect("write");
        let err = FileConfig::read(&path).expect_err("yes is not a boolean");
        std::fs::remove_file(&path).ok();
        assert!(
            err.starts_with(&format!("config file {}: ", path.display())),
            "{err}"
        );
        assert!(err.contains("line 3, column 12"), "{err}");
    }

    #[test]
    fn empty_and_comment_only_files_are_all_defaults() {
        for text in ["", "\n  \n", "# nothing set yet\n"] {
            assert_eq!(FileConfig::parse(text), Ok(FileConfig::default()), "{text:?}");
        }
    }

    #[test]
    fn unset_fields_and_sections_are_left_out_of_the_yaml() {
        let file = FileConfig {
            listen: Some("127.0.0.1:1".into()),
            ..FileConfig::default()
        };
        let yaml = file.to_yaml().expect("yaml");
        assert!(
            !yaml.contains("tls") && !yaml.contains("shared") && !yaml.contains("null"),
            "{yaml}"
        );
        assert_eq!(FileConfig::parse(&yaml), Ok(file));
    }
}
