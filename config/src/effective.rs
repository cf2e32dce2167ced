//! A validated [`Config`] written back as a config file, every setting
//! spelled out: what `kache check-config` prints. Read back, the file gives
//! the same `Config` with no flags at all.

use std::path::PathBuf;

use crate::file::{FileCache, FileDiscovery, FileServeStale, FileTls, FileUpstream};
use crate::limits::{FileClass, FileClassLimits, FileClientKey, FileLimits, FileMatch};
use crate::shared::FileShared;
use crate::{ClassLimits, ClientMatch, Config, FileConfig, Mode, ModeName, TlsConfig};

impl Config {
    /// The config file that gives this configuration on its own, defaults
    /// filled in. Settings that are unset (no access token, the
    /// kubeconfig's own discovery) are left out; the access token appears
    /// as the file it came from, never as its value.
    pub fn to_file(&self) -> FileConfig {
        let listener = &self.listener;
        let (tls, self_signed_dir) = match &listener.tls {
            Some(TlsConfig::Files { cert, key }) => (
                FileTls {
                    cert: Some(cert.clone()),
                    key: Some(key.clone()),
                    self_signed: None,
                },
                None,
            ),
            Some(TlsConfig::SelfSigned { dir }) => (
                FileTls {
                    cert: None,
                    key: None,
                    self_signed: Some(true),
                },
                Some(dir.clone()),
            ),
            None => (FileTls::default(), None),
        };
        // The state directory holds the generated certificate and the
        // snapshots; it matters only when one of them is on.
        let state_dir = self_signed_dir.or_else(|| {
            self.cache
                .snapshot_dir
                .as_ref()
                .and_then(|dir| dir.parent().map(PathBuf::from))
        });
        let (mode, shared, exposed) = match &self.mode {
            Mode::Local => {
                // Valid only because it was asked for: say so again.
                let exposed = !listener.addr.ip().is_loopback() && listener.access_token.is_none();
                (ModeName::Local, FileShared::default(), exposed.then_some(true))
            }
            Mode::Shared(shared) => (
                ModeName::Shared,
                FileShared {
                    forward: Some(shared.forward),
                    authorization: Some(shared.authorization),
                    allow_anonymous: Some(shared.allow_anonymous),
                    client_ca_file: shared.client_ca_file.clone(),
                    token_cache_ttl_seconds: Some(shared.token_cache_ttl.as_secs()),
                    token_failure_cache_ttl_seconds: Some(shared.token_failure_cache_ttl.as_secs()),
                    token_cache_size: Some(shared.token_cache_size),
                    authorization_cache_ttl_seconds: Some(shared.authorization_cache_ttl.as_secs()),
                    authorization_cache_size: Some(shared.authorization_cache_size),
                },
                None,
            ),
        };
        let cache = &self.cache;
        FileConfig {
            listen: Some(listener.addr.to_string()),
            admin_listen: Some(self.admin.addr.to_string()),
            kubeconfig: self.upstream.kubeconfig.clone(),
            context: self.upstream.context.clone(),
            state_dir,
            access_token_file: listener.access_token_file.clone(),
            accept_hosts: Some(listener.accept_hosts.clone()),
            max_header_bytes: Some(listener.max_header_bytes),
            max_request_body_bytes: Some(listener.max_request_body_bytes),
            max_connections: Some(listener.max_connections),
            header_read_timeout_seconds: Some(listener.header_read_timeout.as_secs()),
            tls,
            upstream: FileUpstream {
                timeout_seconds: Some(self.upstream.timeout.as_secs()),
                connect_timeout_seconds: Some(self.upstream.connect_timeout.as_secs()),
            },
            discovery: FileDiscovery {
                enabled: Some(self.discovery.enabled),
                max_age_seconds: Some(self.discovery.max_age.as_secs()),
            },
            cache: FileCache {
                enabled: Some(cache.enabled),
                sync_timeout_seconds: Some(cache.sync_timeout.as_secs()),
                fresh_timeout_seconds: Some(cache.fresh_timeout.as_secs()),
                idle_timeout_seconds: Some(cache.idle_timeout.as_secs()),
                memory_budget_bytes: Some(cache.memory_budget_bytes),
                event_window: Some(cache.event_window),
                watcher_backlog: Some(cache.watcher_backlog),
                bookmark_interval_seconds: Some(cache.bookmark_interval.as_secs()),
                preload: cache
                    .preload
                    .iter()
                    .map(|(group, version, resource)| match group.as_str() {
                        "" => format!("{version}/{resource}"),
                        group => format!("{group}/{version}/{resource}"),
                    })
                    .collect(),
                snapshots: Some(cache.snapshot_dir.is_some()),
                snapshot_interval_seconds: Some(cache.snapshot_interval.as_secs()),
                serve_stale: cache.serve_stale.map(|max| FileServeStale {
                    max_staleness_seconds: max.as_secs(),
                }),
                consistency_check_seconds: Some(cache.consistency_check.map_or(0, |every| every.as_secs())),
            },
            limits: limits_file(&self.limits),
            mode: Some(mode),
            shared,
            dangerously_expose_credentials: exposed,
        }
    }

    /// [`Config::to_file`] as YAML.
    ///
    /// # Errors
    /// A path that is not UTF-8 (YAML is text).
    pub fn to_yaml(&self) -> Result<String, String> {
        self.to_file().to_yaml()
    }
}

fn limits_file(limits: &crate::LimitsConfig) -> FileLimits {
    let class_limits = |l: &ClassLimits| FileClassLimits {
        max_in_flight_per_client: Some(l.max_in_flight_per_client),
        queue_length: Some(l.queue_length),
        queue_timeout_seconds: Some(l.queue_timeout.as_secs()),
        max_long_running_per_client: Some(l.max_long_running_per_client),
    };
    let matches = |m: &ClientMatch| FileMatch {
        users: m.users.clone(),
        user_agent_prefixes: m.user_agent_prefixes.clone(),
        path_prefixes: m.path_prefixes.clone(),
    };
    FileLimits {
        max_in_flight: Some(limits.max_in_flight),
        default: class_limits(&limits.default),
        classes: limits
            .classes
            .iter()
            .map(|class| {
                let l = class_limits(&class.limits);
                FileClass {
                    name: class.name.clone(),
                    matches: matches(&class.matches),
                    seats: Some(class.limits.seats),
                    max_in_flight_per_client: l.max_in_flight_per_client,
                    queue_length: l.queue_length,
                    queue_timeout_seconds: l.queue_timeout_seconds,
                    max_long_running_per_client: l.max_long_running_per_client,
                }
            })
            .collect(),
        exempt: matches(&limits.exempt),
        client_key: FileClientKey {
            header: limits.client_key.header.clone(),
            user_agent: Some(limits.client_key.user_agent),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Cli, Command, ServeArgs};
    use clap::Parser;

    fn serve(args: &[&str]) -> ServeArgs {
        match Cli::try_parse_from(["kache", "serve"].iter().chain(args))
            .expect("valid flags")
            .command
        {
            Command::Serve(args) => args,
            other => panic!("expected serve, got {other:?}"),
        }
    }

    /// Merges, writes the result as a file, reads that back with no flags:
    /// the configuration must be the same.
    fn assert_reads_back(args: &[&str], yaml: &str) -> String {
        let config =
            Config::merge(&serve(args), FileConfig::parse(yaml).expect("valid yaml")).expect("valid");
        let written = config.to_yaml().expect("yaml");
        let file = FileConfig::parse(&written).unwrap_or_else(|e| panic!("{e}:\n{written}"));
        let again = Config::merge(&ServeArgs::default(), file).unwrap_or_else(|e| panic!("{e}:\n{written}"));
        assert_eq!(again, config, "{written}");
        written
    }

    #[test]
    fn the_defaults_are_written_out_in_full_and_read_back_the_same() {
        let written = assert_reads_back(&["--state-dir", "/s"], "");
        for line in [
            "listen: 127.0.0.1:8001",
            "adminListen: 127.0.0.1:9901",
            "stateDir: /s",
            "maxHeaderBytes: 1048576",
            "  timeoutSeconds: 60",
            "  maxAgeSeconds: 600",
            "  memoryBudgetBytes: 2147483648",
            "  consistencyCheckSeconds: 600",
            "  maxInFlight: 400",
            "    queueLength: 50",
            "mode: local",
        ] {
            assert!(written.lines().any(|l| l == line), "no {line:?} in:\n{written}");
        }
        for absent in [
            "kubeconfig",
            "accessTokenFile",
            "shared",
            "tls",
            "serveStale",
            "dangerously",
        ] {
            assert!(!written.contains(absent), "{absent} in:\n{written}");
        }
    }

    #[test]
    fn a_shared_config_with_classes_reads_back_the_same() {
        let dir = std::env::temp_dir().join(format!("kache-effective-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let ca = dir.join("ca.crt");
        std::fs::write(&ca, "not parsed here").expect("write");
        let written = assert_reads_back(
            &["--mode", "shared", "--client-ca-file", ca.to_str().expect("utf-8")],
            "listen: 0.0.0.0:8443\ntls: {cert: /t.crt, key: /t.key}\nkubeconfig: /k\ncontext: prod\n\
             acceptHosts: [Kache.Example]\n\
             shared: {forward: passthrough, authorization: sar, tokenCacheTtlSeconds: 30}\n\
             cache: {preload: [v1/pods, apps/v1/deployments], snapshots: false, serveStale: {maxStalenessSeconds: 60}, \
             consistencyCheckSeconds: 0}\n\
             limits: {maxInFlight: 50, classes: [{name: ci, match: {userAgentPrefixes: [argocd/]}, seats: 10, \
             queueLength: 3}], exempt: {users: [admin]}, clientKey: {header: X-CI-Job, userAgent: false}}\n",
        );
        std::fs::remove_dir_all(&dir).ok();
        for line in [
            "mode: shared",
            "  forward: passthrough",
            "  authorization: sar",
            "  tokenCacheTtlSeconds: 30",
            "  allowAnonymous: false",
            "- kache.example",
            "  - v1/pods",
            "  - apps/v1/deployments",
            "  snapshots: false",
            "  consistencyCheckSeconds: 0",
            "    maxStalenessSeconds: 60",
            "    header: x-ci-job",
        ] {
            assert!(written.lines().any(|l| l == line), "no {line:?} in:\n{written}");
        }
        assert!(!written.contains("stateDir"), "no state is kept:\n{written}");
    }

    #[test]
    fn the_access_token_is_written_as_its_file_and_never_as_its_value() {
        let path = std::env::temp_dir().join(format!("kache-effective-token-{}", std::process::id()));
        std::fs::write(&path, "s3cret-value\n").expect("write");
        let written = assert_reads_back(
            &[
                "--listen",
                "0.0.0.0:8001",
                "--access-token-file",
                path.to_str().expect("utf-8"),
            ],
            "",
        );
        std::fs::remove_file(&path).ok();
        assert!(!written.contains("s3cret"), "{written}");
        assert!(
            written.contains(&format!("accessTokenFile: {}", path.display())),
            "{written}"
        );
    }

    #[test]
    fn exposed_credentials_are_written_out_so_the_file_stays_valid() {
        let written = assert_reads_back(
            &["--listen", "0.0.0.0:8001", "--dangerously-expose-credentials"],
            "",
        );
        assert!(
            written.contains("dangerouslyExposeCredentials: true"),
            "{written}"
        );
    }

    #[test]
    fn self_signed_tls_is_written_with_its_state_dir() {
        let written = assert_reads_back(&["--tls", "--state-dir", "/state"], "cache: {snapshots: false}\n");
        assert!(written.contains("selfSigned: true"), "{written}");
        assert!(written.contains("stateDir: /state"), "{written}");
    }
}
