//! The `limits` section: concurrency limits and fair queueing of requests
//! that reach the API server (the proxy's admit stage), in the file's
//! shape ([`FileLimits`]) and validated ([`LimitsConfig`]).
//!
//! ```yaml
//! limits:
//!   maxInFlight: 400              # seats shared by every class
//!   default:                      # requests no class matches
//!     maxInFlightPerClient: 100
//!     queueLength: 50
//!     queueTimeoutSeconds: 15
//!     maxLongRunningPerClient: 100
//!   classes:                      # first match wins, in this order
//!     - name: ci
//!       match: {userAgentPrefixes: [argocd/], users: [ci-bot], pathPrefixes: [/apis/batch/]}
//!       seats: 40                 # taken out of maxInFlight; the default class keeps the rest
//!       maxInFlightPerClient: 10  # omitted fields inherit the default class's
//!   exempt:                       # never limited (health and /version always are)
//!     users: [admin]
//! ```

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The API server's own `--max-requests-inflight` default: kache never sends
/// more concurrent requests than a single API server accepts by default, and
/// when it has to say no it does so fairly per client, which the API server
/// cannot (all of kache's traffic is one flow there, with kache's identity).
pub const DEFAULT_MAX_IN_FLIGHT: usize = 400;
/// A quarter of the seats: fair dispatch only rebalances as seats free up, so
/// without a cap one client that arrives first could take every seat and the
/// next client would wait for one of its requests to finish (up to the 60 s
/// upstream timeout). With this cap it takes four busy clients to saturate.
pub const DEFAULT_MAX_IN_FLIGHT_PER_CLIENT: usize = 100;
/// APF's default queue length limit (`queueLengthLimit: 50`).
pub const DEFAULT_QUEUE_LENGTH: usize = 50;
/// APF's wait limit: a quarter of the API server's 60 s `--request-timeout`.
/// A request still queued then would leave too little of a client's patience
/// (client-go's and kubectl's own timeouts) for the request itself.
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(15);
/// Watches, exec, logs and port-forwards a single client may hold open.
/// kube-controller-manager, about the busiest client there is, keeps some 50
/// watches open; more than 100 from one client is a leak, not a workload.
pub const DEFAULT_MAX_LONG_RUNNING_PER_CLIENT: usize = 100;
/// Name of the class of requests no configured class matches.
pub const DEFAULT_CLASS: &str = "default";
/// Name of the class of requests that bypass every limit.
pub const EXEMPT_CLASS: &str = "exempt";

/// The validated `limits` section. The proxy can apply a new one at run time
/// (`Limiter::reconfigure`).
#[derive(Debug, Clone, PartialEq)]
pub struct LimitsConfig {
    /// Seats (requests in flight upstream, long-running ones excepted) over all classes.
    pub max_in_flight: usize,
    /// The class of requests no other class matches. Its `seats` are what
    /// `max_in_flight` leaves after the named classes took theirs.
    pub default: ClassLimits,
    /// Named classes, in matching order: the first that matches a request wins.
    pub classes: Vec<ClassConfig>,
    /// Requests that bypass every limit, besides the built-in health and
    /// version paths.
    pub exempt: ClientMatch,
    /// How clients are told apart.
    pub client_key: ClientKeyConfig,
}

/// How the admit stage tells clients apart: the authenticated user where
/// there is one; else the value of `header` where configured and present
/// (a client id that automation sets, e.g. CI runners behind one proxy);
/// else the access token the client presented; else its address. With
/// `user_agent`, the User-Agent is part of token and address keys, so that
/// programs sharing a token or an address (every local client is
/// 127.0.0.1) get flows of their own.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientKeyConfig {
    pub header: Option<String>,
    pub user_agent: bool,
}

impl Default for ClientKeyConfig {
    fn default() -> Self {
        ClientKeyConfig {
            header: None,
            user_agent: true,
        }
    }
}

/// A named priority class: which requests it takes and its own limits.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassConfig {
    /// Unique; `[a-z0-9-]`, at most 63 characters (it is a metrics label).
    pub name: String,
    pub matches: ClientMatch,
    pub limits: ClassLimits,
}

/// The limits of one class.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassLimits {
    /// Requests of this class in flight upstream at once (long-running ones excepted).
    pub seats: usize,
    /// Of those, how many one client may hold; its further requests queue.
    pub max_in_flight_per_client: usize,
    /// Requests one client may have waiting; beyond that, 429 at once.
    pub queue_length: usize,
    /// Longest wait for a seat; then 429.
    pub queue_timeout: Duration,
    /// Long-running requests (watch, exec, log, port-forward) one client may
    /// hold open; they take no seat and never queue.
    pub max_long_running_per_client: usize,
}

/// Which requests a class (or the exemption) takes: any one criterion matching suffices.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClientMatch {
    /// Authenticated user names, matched exactly.
    pub users: Vec<String>,
    /// Prefixes of the `User-Agent` header.
    pub user_agent_prefixes: Vec<String>,
    /// Prefixes of the request path.
    pub path_prefixes: Vec<String>,
}

impl ClientMatch {
    /// Whether no criterion is set (such a match takes nothing).
    pub fn is_empty(&self) -> bool {
        self.users.is_empty() && self.user_agent_prefixes.is_empty() && self.path_prefixes.is_empty()
    }

    /// Whether a request with this user, `User-Agent` and path matches.
    pub fn matches(&self, user: Option<&str>, user_agent: Option<&str>, path: &str) -> bool {
        user.is_some_and(|u| self.users.iter().any(|x| x == u))
            || user_agent.is_some_and(|ua| {
                self.user_agent_prefixes
                    .iter()
                    .any(|p| ua.starts_with(p.as_str()))
            })
            || self.path_prefixes.iter().any(|p| path.starts_with(p.as_str()))
    }
}

impl Default for ClassLimits {
    fn default() -> Self {
        ClassLimits {
            seats: DEFAULT_MAX_IN_FLIGHT,
            max_in_flight_per_client: DEFAULT_MAX_IN_FLIGHT_PER_CLIENT,
            queue_length: DEFAULT_QUEUE_LENGTH,
            queue_timeout: DEFAULT_QUEUE_TIMEOUT,
            max_long_running_per_client: DEFAULT_MAX_LONG_RUNNING_PER_CLIENT,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            default: ClassLimits::default(),
            classes: Vec::new(),
            exempt: ClientMatch::default(),
            client_key: ClientKeyConfig::default(),
        }
    }
}

/// The `limits` section as written.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileLimits {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<usize>,
    #[serde(default)]
    pub default: FileClassLimits,
    #[serde(default)]
    pub classes: Vec<FileClass>,
    #[serde(default)]
    pub exempt: FileMatch,
    #[serde(default)]
    pub client_key: FileClientKey,
}

/// `limits.clientKey` as written.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileClientKey {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<bool>,
}

/// The default class's limits as written.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileClassLimits {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_in_flight_per_client: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_length: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_timeout_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_long_running_per_client: Option<usize>,
}

/// A named class as written; omitted limits inherit the default class's.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileClass {
    pub name: String,
    #[serde(rename = "match", default)]
    pub matches: FileMatch,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seats: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_in_flight_per_client: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_length: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_timeout_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_long_running_per_client: Option<usize>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileMatch {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub user_agent_prefixes: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub path_prefixes: Vec<String>,
}

impl FileLimits {
    /// Validates the section, pushing every problem onto `errors` (each
    /// naming its field); the returned value is meaningful only when none was pushed.
    pub fn validate(&self, errors: &mut Vec<String>) -> LimitsConfig {
        let max_in_flight = self.max_in_flight.unwrap_or(DEFAULT_MAX_IN_FLIGHT);
        if max_in_flight == 0 {
            errors.push("limits.maxInFlight must be at least 1".into());
        }
        let d = &self.default;
        let mut default = ClassLimits {
            seats: 0,
            max_in_flight_per_client: d
                .max_in_flight_per_client
                .unwrap_or(DEFAULT_MAX_IN_FLIGHT_PER_CLIENT),
            queue_length: d.queue_length.unwrap_or(DEFAULT_QUEUE_LENGTH),
            queue_timeout: d
                .queue_timeout_seconds
                .map(Duration::from_secs)
                .unwrap_or(DEFAULT_QUEUE_TIMEOUT),
            max_long_running_per_client: d
                .max_long_running_per_client
                .unwrap_or(DEFAULT_MAX_LONG_RUNNING_PER_CLIENT),
        };
        check_positive(
            "limits.default",
            [d.max_in_flight_per_client, d.max_long_running_per_client],
            d.queue_timeout_seconds,
            errors,
        );

        let mut classes = Vec::with_capacity(self.classes.len());
        for (i, class) in self.classes.iter().enumerate() {
            let at = format!("limits.classes[{i}] ({:?})", class.name);
            if !is_label(&class.name) {
                errors.push(format!("{at}: name must be 1 to 63 characters of a-z, 0-9 and -"));
            } else if class.name == DEFAULT_CLASS || class.name == EXEMPT_CLASS {
                errors.push(format!("{at}: name {:?} is reserved", class.name));
            } else if self.classes[..i].iter().any(|c| c.name == class.name) {
                errors.push(format!("{at}: name is used by an earlier class"));
            }
            let limits = ClassLimits {
                seats: class.seats.unwrap_or(0),
                max_in_flight_per_client: class
                    .max_in_flight_per_client
                    .unwrap_or(default.max_in_flight_per_client),
                queue_length: class.queue_length.unwrap_or(default.queue_length),
                queue_timeout: class
                    .queue_timeout_seconds
                    .map(Duration::from_secs)
                    .unwrap_or(default.queue_timeout),
                max_long_running_per_client: class
                    .max_long_running_per_client
                    .unwrap_or(default.max_long_running_per_client),
            };
            match class.seats {
                None => errors.push(format!("{at}: seats is required")),
                Some(0) => errors.push(format!("{at}: seats must be at least 1")),
                Some(_) => {}
            }
            check_positive(
                &at,
                [class.max_in_flight_per_client, class.max_long_running_per_client],
                class.queue_timeout_seconds,
                errors,
            );
            let matches = check_match(&format!("{at}: match"), &class.matches, errors);
            if matches.is_empty() {
                errors.push(format!(
                    "{at}: match needs users, userAgentPrefixes or pathPrefixes"
                ));
            }
            classes.push(ClassConfig {
                name: class.name.clone(),
                matches,
                limits,
            });
        }
        let taken: usize = classes.iter().map(|c| c.limits.seats).sum();
        match max_in_flight.checked_sub(taken) {
            Some(left) if left > 0 => default.seats = left,
            _ if max_in_flight > 0 => errors.push(format!(
                "limits.classes: seats add up to {taken}, leaving none of limits.maxInFlight \
                 {max_in_flight} for the default class"
            )),
            _ => {}
        }
        let exempt = check_match("limits.exempt", &self.exempt, errors);
        let header = self
            .client_key
            .header
            .as_deref()
            .map(str::trim)
            .filter(|h| !h.is_empty());
        if let Some(header) = header {
            let valid = header
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
            if !valid {
                errors.push(format!(
                    "limits.clientKey.header {header:?} is not a valid header name"
                ));
            }
        }
        let client_key = ClientKeyConfig {
            header: header.map(str::to_ascii_lowercase),
            user_agent: self.client_key.user_agent.unwrap_or(true),
        };
        LimitsConfig {
            max_in_flight,
            default,
            classes,
            exempt,
            client_key,
        }
    }
}

/// Checks the explicitly set fields that must be positive (defaults are).
/// Inherited values are not checked again, so each mistake is reported once.
fn check_positive(
    at: &str,
    [per_client, long_running]: [Option<usize>; 2],
    queue_timeout_seconds: Option<u64>,
    errors: &mut Vec<String>,
) {
    for (field, value) in [
        ("maxInFlightPerClient", per_client.map(|v| v as u64)),
        ("maxLongRunningPerClient", long_running.map(|v| v as u64)),
        ("queueTimeoutSeconds", queue_timeout_seconds),
    ] {
        if value == Some(0) {
            errors.push(format!("{at}.{field} must be at least 1"));
        }
    }
}

fn check_match(at: &str, file: &FileMatch, errors: &mut Vec<String>) -> ClientMatch {
    let lists = [
        ("users", &file.users),
        ("userAgentPrefixes", &file.user_agent_prefixes),
        ("pathPrefixes", &file.path_prefixes),
    ];
    for (field, list) in lists {
        if list.iter().any(String::is_empty) {
            errors.push(format!("{at}.{field}: an empty entry would match everything"));
        }
    }
    for prefix in &file.path_prefixes {
        if !prefix.is_empty() && !prefix.starts_with('/') {
            errors.push(format!("{at}.pathPrefixes: {prefix:?} must start with /"));
        }
    }
    ClientMatch {
        users: file.users.clone(),
        user_agent_prefixes: file.user_agent_prefixes.clone(),
        path_prefixes: file.path_prefixes.clone(),
    }
}

fn is_label(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Config, FileConfig, ServeArgs};

    fn validate(yaml: &str) -> Result<LimitsConfig, Vec<String>> {
        let file: FileLimits = serde_saphyr::from_str(yaml).expect("valid yaml");
        let mut errors = Vec::new();
        let limits = file.validate(&mut errors);
        if errors.is_empty() {
            Ok(limits)
        } else {
            Err(errors)
        }
    }

    #[test]
    fn an_absent_section_gives_the_documented_defaults() {
        let limits = validate("{}").expect("valid");
        assert_eq!(limits, LimitsConfig::default());
        assert_eq!(limits.default.seats, DEFAULT_MAX_IN_FLIGHT);
        assert_eq!(limits.default.queue_length, 50);
        assert_eq!(limits.default.queue_timeout, Duration::from_secs(15));
    }

    #[test]
    fn named_classes_take_their_seats_and_inherit_the_default_limits() {
        let limits = validate(
            "maxInFlight: 100\n\
             default: {maxInFlightPerClient: 7, queueLength: 3, queueTimeoutSeconds: 9}\n\
             classes:\n\
             - name: ci\n  match: {userAgentPrefixes: [argocd/]}\n  seats: 30\n  queueLength: 5\n\
             - name: batch\n  match: {pathPrefixes: [/apis/batch/], users: [bot]}\n  seats: 20\n\
             exempt: {users: [admin]}\n",
        )
        .expect("valid");
        assert_eq!(limits.max_in_flight, 100);
        assert_eq!(limits.default.seats, 50, "what the named classes leave");
        let ci = &limits.classes[0];
        assert_eq!((ci.name.as_str(), ci.limits.seats), ("ci", 30));
        assert_eq!(ci.limits.queue_length, 5);
        assert_eq!(ci.limits.max_in_flight_per_client, 7, "inherited");
        assert_eq!(ci.limits.queue_timeout, Duration::from_secs(9), "inherited");
        assert!(ci.matches.matches(None, Some("argocd/v2.9"), "/api"));
        assert!(!ci.matches.matches(Some("argocd"), Some("kubectl/v1.30"), "/api"));
        assert!(limits.classes[1].matches.matches(Some("bot"), None, "/api"));
        assert!(limits.classes[1]
            .matches
            .matches(None, None, "/apis/batch/v1/jobs"));
        assert_eq!(limits.exempt.users, ["admin"]);
    }

    #[test]
    fn every_limits_error_is_reported_with_its_field() {
        let errors = validate(
            "maxInFlight: 10\n\
             default: {maxInFlightPerClient: 0, queueTimeoutSeconds: 0}\n\
             classes:\n\
             - {name: Bad_Name, match: {users: [x]}, seats: 5}\n\
             - {name: default, match: {users: [y]}, seats: 5}\n\
             - {name: ci, seats: 0, maxLongRunningPerClient: 0}\n\
             - {name: ci, match: {pathPrefixes: [apis, \"\"]}}\n\
             exempt: {userAgentPrefixes: [\"\"]}\n",
        )
        .expect_err("invalid");
        let text = errors.join("\n");
        let expected = [
            "limits.default.maxInFlightPerClient must be at least 1",
            "limits.default.queueTimeoutSeconds must be at least 1",
            "limits.classes[0] (\"Bad_Name\"): name must be",
            "limits.classes[1] (\"default\"): name \"default\" is reserved",
            "limits.classes[2] (\"ci\"): seats must be at least 1",
            "limits.classes[2] (\"ci\").maxLongRunningPerClient must be at least 1",
            "limits.classes[2] (\"ci\"): match needs users",
            "limits.classes[3] (\"ci\"): name is used by an earlier class",
            "limits.classes[3] (\"ci\"): seats is required",
            "limits.classes[3] (\"ci\"): match.pathPrefixes: \"apis\" must start with /",
            "limits.classes[3] (\"ci\"): match.pathPrefixes: an empty entry would match everything",
            "limits.classes: seats add up to 10, leaving none of limits.maxInFlight 10",
            "limits.exempt.userAgentPrefixes: an empty entry",
        ];
        for expected in expected {
            assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
        }
        assert_eq!(errors.len(), expected.len(), "each mistake once:\n{text}");
    }

    #[test]
    fn seats_must_leave_some_for_the_default_class() {
        let errors = validate("maxInFlight: 10\nclasses: [{name: ci, match: {users: [a]}, seats: 10}]\n")
            .expect_err("no seat left");
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("leaving none"), "{errors:?}");
        assert!(validate("maxInFlight: 0\n").expect_err("zero")[0].contains("maxInFlight"));
    }

    #[test]
    fn unknown_limits_fields_are_rejected() {
        for yaml in [
            "maxInflight: 1\n",
            "default: {seats: 3}\n",
            "classes: [{name: a, seats: 1, match: {user: [x]}}]\n",
        ] {
            assert!(serde_saphyr::from_str::<FileLimits>(yaml).is_err(), "{yaml}");
        }
    }

    #[test]
    fn limits_errors_are_reported_with_the_others() {
        let file = FileConfig::parse(
            "maxHeaderBytes: 10\nlimits: {maxInFlight: 0, default: {queueTimeoutSeconds: 0}}\n",
        )
        .expect("valid yaml");
        let err = Config::merge(&ServeArgs::default(), file).expect_err("invalid");
        let text = err.to_string();
        assert_eq!(err.0.len(), 3, "{text}");
        assert!(text.contains("maxHeaderBytes"), "{text}");
        assert!(text.contains("limits.maxInFlight"), "{text}");
        assert!(text.contains("limits.default.queueTimeoutSeconds"), "{text}");
    }

    #[test]
    fn the_merged_config_carries_the_limits() {
        let file =
            FileConfig::parse("limits: {maxInFlight: 20, default: {queueLength: 0}}\n").expect("valid yaml");
        let config = Config::merge(&ServeArgs::default(), file).expect("valid");
        assert_eq!(config.limits.max_in_flight, 20);
        assert_eq!(config.limits.default.seats, 20);
        assert_eq!(
            config.limits.default.queue_length, 0,
            "0 means: reject rather than queue"
        );
    }
}
