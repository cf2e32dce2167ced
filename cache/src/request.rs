//! Classification of a request into the API server's vocabulary: verb,
//! group/version/resource, namespace, name, subresource and read options.
//!
//! A port of the API server's `RequestInfoFactory.NewRequestInfo`
//! (k8s.io/apiserver/pkg/endpoints/request/requestinfo.go), so that kache and
//! the API server agree on what a request is.

use std::borrow::Cow;

/// The verb of a request, as the API server's authorizer and metrics name it.
///
/// Resource requests use the Kubernetes verbs; non-resource requests (`/version`,
/// `/apis`, `/healthz`) use the lower-cased HTTP method, as the API server does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verb {
    Get,
    List,
    Watch,
    Create,
    Update,
    Patch,
    Delete,
    DeleteCollection,
    /// The deprecated `/api/v1/proxy/...` form.
    Proxy,
    /// Non-resource `POST`.
    Post,
    /// Non-resource `PUT`.
    Put,
    /// Non-resource `HEAD`.
    Head,
    /// Non-resource `OPTIONS`.
    Options,
    /// A method the API server has no verb for.
    Unknown,
}

impl Verb {
    /// The verb's name as the API server writes it (`get`, `list`, `deletecollection`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::List => "list",
            Verb::Watch => "watch",
            Verb::Create => "create",
            Verb::Update => "update",
            Verb::Patch => "patch",
            Verb::Delete => "delete",
            Verb::DeleteCollection => "deletecollection",
            Verb::Proxy => "proxy",
            Verb::Post => "post",
            Verb::Put => "put",
            Verb::Head => "head",
            Verb::Options => "options",
            Verb::Unknown => "unknown",
        }
    }

    /// Whether the verb only reads.
    pub fn is_read(self) -> bool {
        matches!(self, Verb::Get | Verb::List | Verb::Watch | Verb::Head)
    }
}

impl std::fmt::Display for Verb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A metric label: the verb's name, as in logs and the API server's metrics.
impl prometheus_client::encoding::EncodeLabelValue for Verb {
    fn encode(&self, encoder: &mut prometheus_client::encoding::LabelValueEncoder<'_>) -> std::fmt::Result {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

/// The read-related query parameters of a request, decoded, first value wins
/// (as the API server's parameter codec does).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadOptions {
    pub watch: bool,
    pub resource_version: Option<String>,
    pub resource_version_match: Option<String>,
    pub limit: Option<String>,
    pub continue_token: Option<String>,
    pub label_selector: Option<String>,
    pub field_selector: Option<String>,
    pub timeout_seconds: Option<String>,
    pub allow_watch_bookmarks: bool,
    /// A `*bool` in the API server's options: absent (`None`) is not `false`.
    pub send_initial_events: Option<bool>,
}

/// What a request is, in the API server's terms.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestInfo {
    /// `/api`-or-`/apis` request naming a resource (`/api/v1/pods`), as opposed
    /// to discovery, `/version`, `/healthz` and other non-resource paths.
    pub is_resource_request: bool,
    pub verb: Option<Verb>,
    /// `api` or `apis` for resource requests.
    pub api_prefix: String,
    /// Empty for the core group.
    pub group: String,
    pub version: String,
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
    pub read: ReadOptions,
}

/// The path names a special verb but nothing after it (`/api/v1/watch`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError(pub String);

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "unable to determine kind and namespace from url {}", self.0)
    }
}

impl std::error::Error for ParseError {}

/// The API groups kube-apiserver serves itself, including those of its
/// embedded apiextensions and aggregator servers: protobuf-capable, list
/// items without type meta, per-resource field selectors. Any other group is
/// a CustomResourceDefinition's or an aggregated API server's.
pub const BUILT_IN_GROUPS: &[&str] = &[
    "",
    "admissionregistration.k8s.io",
    "apiextensions.k8s.io",
    "apiregistration.k8s.io",
    "apps",
    "authentication.k8s.io",
    "authorization.k8s.io",
    "autoscaling",
    "batch",
    "certificates.k8s.io",
    "coordination.k8s.io",
    "discovery.k8s.io",
    "events.k8s.io",
    "extensions",
    "flowcontrol.apiserver.k8s.io",
    "internal.apiserver.k8s.io",
    "networking.k8s.io",
    "node.k8s.io",
    "policy",
    "rbac.authorization.k8s.io",
    "resource.k8s.io",
    "scheduling.k8s.io",
    "storage.k8s.io",
    "storagemigration.k8s.io",
];

/// Namespace subresources: `/api/v1/namespaces/{name}/{status,finalize}`
/// address the namespace itself, not a resource inside it.
const NAMESPACE_SUBRESOURCES: &[&str] = &["status", "finalize"];
/// Subresources the API server treats as long-running (no request timeout).
const LONG_RUNNING_SUBRESOURCES: &[&str] = &["attach", "exec", "proxy", "log", "portforward"];

impl RequestInfo {
    /// Classifies a request from its method, its (still percent-encoded) path
    /// and its raw query string.
    ///
    /// # Errors
    /// A path that names a special verb (`watch`, `proxy`) and nothing after
    /// it; the API server rejects those too.
    pub fn parse(method: &str, path: &str, query: Option<&str>) -> Result<RequestInfo, ParseError> {
        let read = ReadOptions::parse(query.unwrap_or(""));
        let mut info = RequestInfo {
            verb: Some(non_resource_verb(method)),
            read,
            ..RequestInfo::default()
        };
        let decoded = percent_encoding::percent_decode_str(path).decode_utf8_lossy();
        let mut parts: Vec<&str> = decoded.trim_matches('/').split('/').collect();
        if parts.len() < 3 || !matches!(parts[0], "api" | "apis") {
            return Ok(info);
        }
        let prefix = parts.remove(0);
        if prefix == "apis" {
            if parts.len() < 3 {
                return Ok(info);
            }
            info.group = parts.remove(0).to_string();
        }
        info.api_prefix = prefix.to_string();
        info.is_resource_request = true;
        info.version = parts.remove(0).to_string();

        let mut verb = match parts[0] {
            "watch" | "proxy" => {
                if parts.len() < 2 {
                    return Err(ParseError(path.to_string()));
                }
                let special = if parts.remove(0) == "watch" {
                    Verb::Watch
                } else {
                    Verb::Proxy
                };
                Some(special)
            }
            _ => match method {
                "POST" => Some(Verb::Create),
                "GET" | "HEAD" => Some(Verb::Get),
                "PUT" => Some(Verb::Update),
                "PATCH" => Some(Verb::Patch),
                "DELETE" => Some(Verb::Delete),
                _ => None,
            },
        };

        if parts[0] == "namespaces" && parts.len() > 1 {
            info.namespace = parts[1].to_string();
            if parts.len() > 2 && !NAMESPACE_SUBRESOURCES.contains(&parts[2]) {
                parts.drain(..2);
            }
        }
        if parts.len() >= 3 && verb != Some(Verb::Proxy) {
            info.subresource = parts[2].to_string();
        }
        if parts.len() >= 2 {
            info.name = parts[1].to_string();
        }
        info.resource = parts[0].to_string();

        if info.name.is_empty() && verb == Some(Verb::Get) {
            verb = Some(if info.read.watch { Verb::Watch } else { Verb::List });
        }
        if info.name.is_empty() && verb == Some(Verb::Delete) {
            verb = Some(Verb::DeleteCollection);
        }
        info.verb = verb;
        Ok(info)
    }

    /// The verb, `unknown` where the API server would have none.
    pub fn verb(&self) -> Verb {
        self.verb.unwrap_or(Verb::Unknown)
    }

    /// Whether the API server exempts this request from its request timeout:
    /// watches, proxying, and the streaming subresources.
    pub fn is_long_running(&self) -> bool {
        self.is_resource_request
            && (matches!(self.verb, Some(Verb::Watch | Verb::Proxy))
                || LONG_RUNNING_SUBRESOURCES.contains(&self.subresource.as_str()))
    }

    /// `resource` or `resource/subresource`, for logs and metrics.
    pub fn resource_path(&self) -> Cow<'_, str> {
        if self.subresource.is_empty() {
            Cow::Borrowed(&self.resource)
        } else {
            Cow::Owned(format!("{}/{}", self.resource, self.subresource))
        }
    }
}

fn non_resource_verb(method: &str) -> Verb {
    match method {
        "GET" => Verb::Get,
        "POST" => Verb::Post,
        "PUT" => Verb::Put,
        "PATCH" => Verb::Patch,
        "DELETE" => Verb::Delete,
        "HEAD" => Verb::Head,
        "OPTIONS" => Verb::Options,
        _ => Verb::Unknown,
    }
}

impl ReadOptions {
    /// Decodes the read-related parameters of a raw query string.
    pub fn parse(query: &str) -> ReadOptions {
        let mut options = ReadOptions::default();
        let mut seen = std::collections::HashSet::new();
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            if !seen.insert(key.clone()) {
                continue;
            }
            let value = value.into_owned();
            match key.as_ref() {
                "watch" => options.watch = query_bool(&value),
                "allowWatchBookmarks" => options.allow_watch_bookmarks = query_bool(&value),
                "sendInitialEvents" => options.send_initial_events = Some(query_bool(&value)),
                "resourceVersion" => options.resource_version = Some(value),
                "resourceVersionMatch" => options.resource_version_match = Some(value),
                "limit" => options.limit = Some(value),
                "continue" => options.continue_token = Some(value),
                "labelSelector" => options.label_selector = Some(value),
                "fieldSelector" => options.field_selector = Some(value),
                "timeoutSeconds" => options.timeout_seconds = Some(value),
                _ => {}
            }
        }
        options
    }
}

/// The API server's query boolean: anything but `0` and `false` (any case) is true,
/// including an empty value (`?watch`).
fn query_bool(value: &str) -> bool {
    !(value == "0" || value.eq_ignore_ascii_case("false"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(method: &str, uri: &str) -> RequestInfo {
        let (path, query) = match uri.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (uri, None),
        };
        RequestInfo::parse(method, path, query).expect("parses")
    }

    /// Cases from the API server's own `TestGetAPIRequestInfo` table.
    #[test]
    fn resource_requests_match_the_api_servers_table() {
        type Case = (
            &'static str,
            &'static str,
            &'static str,
            &'static str,
            &'static str,
            &'static str,
            &'static str,
            &'static str,
            &'static str,
        );
        #[rustfmt::skip]
        let cases: &[Case] = &[
            // method, url, verb, prefix, group, version, namespace, resource, name / subresource
            ("GET", "/api/v1/namespaces", "list", "api", "", "v1", "", "namespaces", ""),
            ("GET", "/api/v1/namespaces/other", "get", "api", "", "v1", "other", "namespaces", "other"),
            ("GET", "/api/v1/namespaces/other/pods", "list", "api", "", "v1", "other", "pods", ""),
            ("GET", "/api/v1/namespaces/other/pods/foo", "get", "api", "", "v1", "other", "pods", "foo"),
            ("HEAD", "/api/v1/namespaces/other/pods/foo", "get", "api", "", "v1", "other", "pods", "foo"),
            ("GET", "/api/v1/pods", "list", "api", "", "v1", "", "pods", ""),
            ("HEAD", "/api/v1/pods", "list", "api", "", "v1", "", "pods", ""),
            ("GET", "/api/v1/namespaces/other/pods/foo", "get", "api", "", "v1", "other", "pods", "foo"),
            ("GET", "/api/v1/namespaces/other/pods", "list", "api", "", "v1", "other", "pods", ""),
            ("GET", "/api/v1/proxy/namespaces/other/pods/foo", "proxy", "api", "", "v1", "other", "pods", "foo"),
            ("GET", "/api/v1/watch/pods", "watch", "api", "", "v1", "", "pods", ""),
            ("GET", "/api/v1/pods?watch=true", "watch", "api", "", "v1", "", "pods", ""),
            ("GET", "/api/v1/pods?watch=false", "list", "api", "", "v1", "", "pods", ""),
            ("GET", "/api/v1/watch/namespaces/other/pods", "watch", "api", "", "v1", "other", "pods", ""),
            ("GET", "/api/v1/namespaces/other/pods?watch=1", "watch", "api", "", "v1", "other", "pods", ""),
            ("GET", "/api/v1/namespaces/other/pods?watch=0", "list", "api", "", "v1", "other", "pods", ""),
            ("GET", "/apis/extensions/v1beta1/namespaces/other/pods", "list", "apis", "extensions", "v1beta1", "other", "pods", ""),
            ("PUT", "/api/v1/namespaces/other/pods/foo", "update", "api", "", "v1", "other", "pods", "foo"),
            ("PATCH", "/api/v1/namespaces/other/pods/foo", "patch", "api", "", "v1", "other", "pods", "foo"),
            ("POST", "/api/v1/namespaces/other/pods", "create", "api", "", "v1", "other", "pods", ""),
            ("DELETE", "/api/v1/namespaces/other/pods/foo", "delete", "api", "", "v1", "other", "pods", "foo"),
            ("DELETE", "/api/v1/namespaces/other/pods", "deletecollection", "api", "", "v1", "other", "pods", ""),
        ];
        for &(method, url, verb, prefix, group, version, namespace, resource, name) in cases {
            let info = parse(method, url);
            assert!(info.is_resource_request, "{url}");
            assert_eq!(info.verb().as_str(), verb, "{method} {url}");
            assert_eq!(info.api_prefix, prefix, "{url}");
            assert_eq!(info.group, group, "{url}");
            assert_eq!(info.version, version, "{url}");
            assert_eq!(info.namespace, namespace, "{url}");
            assert_eq!(info.resource, resource, "{url}");
            assert_eq!(info.name, name, "{url}");
        }
    }

    #[test]
    fn subresources_are_recognised() {
        #[rustfmt::skip]
        let cases: &[(&str, &str, &str, &str, &str)] = &[
            ("GET", "/api/v1/namespaces/other/pods/foo/log", "get", "pods", "log"),
            ("POST", "/api/v1/namespaces/other/pods/foo/exec", "create", "pods", "exec"),
            ("GET", "/api/v1/namespaces/other/pods/foo/exec", "get", "pods", "exec"),
            ("PUT", "/api/v1/namespaces/other/finalize", "update", "namespaces", "finalize"),
            ("PUT", "/api/v1/namespaces/other/status", "update", "namespaces", "status"),
            ("GET", "/apis/apps/v1/namespaces/other/deployments/d/scale", "get", "deployments", "scale"),
            // Everything past the subresource is not interpreted.
            ("GET", "/api/v1/namespaces/other/pods/foo/proxy/a/b", "get", "pods", "proxy"),
        ];
        for &(method, url, verb, resource, subresource) in cases {
            let info = parse(method, url);
            assert_eq!(info.verb().as_str(), verb, "{url}");
            assert_eq!(info.resource, resource, "{url}");
            assert_eq!(info.subresource, subresource, "{url}");
        }
    }

    #[test]
    fn non_resource_requests_use_the_lowercased_method() {
        for (method, url, verb) in [
            ("GET", "/api", "get"),
            ("GET", "/api/v1", "get"),
            ("GET", "/apis", "get"),
            ("GET", "/apis/apps", "get"),
            ("GET", "/apis/apps/v1", "get"),
            ("GET", "/version", "get"),
            ("GET", "/openapi/v2", "get"),
            ("POST", "/healthz", "post"),
            ("GET", "/", "get"),
            ("BREW", "/coffee", "unknown"),
        ] {
            let info = parse(method, url);
            assert!(!info.is_resource_request, "{url}");
            assert_eq!(info.verb().as_str(), verb, "{url}");
        }
    }

    #[test]
    fn special_verb_without_a_resource_is_an_error() {
        assert!(RequestInfo::parse("GET", "/api/v1/watch", None).is_err());
        assert!(RequestInfo::parse("GET", "/apis/apps/v1/proxy", None).is_err());
    }

    #[test]
    fn long_running_requests_are_watches_proxies_and_streams() {
        assert!(parse("GET", "/api/v1/pods?watch=true").is_long_running());
        assert!(parse("GET", "/api/v1/watch/pods").is_long_running());
        assert!(parse("POST", "/api/v1/namespaces/a/pods/p/exec").is_long_running());
        assert!(parse("GET", "/api/v1/namespaces/a/pods/p/log").is_long_running());
        assert!(parse("POST", "/api/v1/namespaces/a/pods/p/portforward").is_long_running());
        assert!(!parse("GET", "/api/v1/pods").is_long_running());
        assert!(!parse("GET", "/api/v1/namespaces/a/pods/p/status").is_long_running());
        assert!(!parse("GET", "/version").is_long_running());
    }

    #[test]
    fn read_options_follow_the_parameter_codec() {
        let o = ReadOptions::parse(
            "watch&resourceVersion=0&resourceVersion=9&labelSelector=app%3Dweb%2Ctier+in+(a)&limit=500",
        );
        assert!(o.watch, "a bare `watch` is true");
        assert_eq!(o.resource_version.as_deref(), Some("0"), "first value wins");
        assert_eq!(o.label_selector.as_deref(), Some("app=web,tier in (a)"));
        assert_eq!(o.limit.as_deref(), Some("500"));
        assert!(!ReadOptions::parse("watch=FALSE").watch);
        assert!(ReadOptions::parse("watch=yes").watch);
        assert!(ReadOptions::parse("allowWatchBookmarks=true").allow_watch_bookmarks);
    }

    #[test]
    fn percent_encoded_paths_are_decoded() {
        let info = parse("GET", "/api/v1/namespaces/a/configmaps/my%2Dcm");
        assert_eq!(info.name, "my-cm");
    }

    #[test]
    fn arbitrary_input_never_panics() {
        for path in [
            "",
            "/",
            "//",
            "/api//",
            "/apis///",
            "/api/v1/namespaces",
            "/api/v1/namespaces/",
        ] {
            for method in ["GET", "POST", "DELETE", ""] {
                let _ = RequestInfo::parse(method, path, Some("%%%&=&watch=%ZZ"));
            }
        }
    }
}
