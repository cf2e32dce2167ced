//! Authorization of what kache answers itself (shared mode): a request
//! answered from memory, discovery included, is first put to the question
//! the API server's authorizer would ask for it, for the same user.
//!
//! ```text
//!   (user, Attributes) ─► rbac mode: local RBAC (watch-fed) ── allows ──► allowed
//!                         │                 └─ denies ─► SubjectAccessReview (cached briefly) ─► decision
//!                         sar mode: SubjectAccessReview (cached for the TTL, identical reviews made once)
//! ```
//!
//! Authorizers are a union: what RBAC allows is allowed whatever else the
//! cluster runs, but an RBAC denial may be overruled by another authorizer
//! (Node, webhooks), so it is confirmed with the API server. A denial is
//! answered with the API server's own `403` body (`forbiddenMessage` in
//! apiserver's `responsewriters/errors.go`), word for word.

use std::time::Instant;

use http::{Response, StatusCode};
use kache_cache::rbac::{Attributes, Rbac, UserInfo};
use kache_config::{AuthorizationMode, SharedConfig};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

use crate::body::Body;
use crate::error::ProxyError;
use crate::metrics::DecisionMetrics;
use crate::upstream::Upstream;

/// The answer to "may this user do this?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The authorizers' reason, appended to the 403 message when non-empty.
    pub reason: String,
}

/// Where a decision came from, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DecisionSource {
    /// The in-process RBAC evaluator.
    Rbac,
    /// A SubjectAccessReview made for this request.
    Sar,
    /// A SubjectAccessReview's decision made earlier (or concurrently).
    Cache,
}

impl DecisionSource {
    fn as_str(self) -> &'static str {
        match self {
            DecisionSource::Rbac => "rbac",
            DecisionSource::Sar => "sar",
            DecisionSource::Cache => "cache",
        }
    }
}

/// Authorization metrics: decisions by result and source, and their latency.
#[derive(Clone)]
pub struct AuthzMetrics(DecisionMetrics);

impl AuthzMetrics {
    pub fn register(registry: &mut Registry) -> AuthzMetrics {
        AuthzMetrics(DecisionMetrics::register(
            registry,
            (
                "authorization_decisions",
                "Authorization decisions for answers from memory, by result (allowed, denied) and source (rbac, sar, cache)",
            ),
            "authorization_duration_seconds",
            &["allowed", "denied"],
            (&["rbac", "sar", "cache"], &["sar", "cache"]),
        ))
    }

    fn record(&self, decision: &Decision, source: DecisionSource, started: Instant) {
        let result = if decision.allowed { "allowed" } else { "denied" };
        self.0.record(result, source.as_str(), started);
    }
}

/// The shared-mode authorizer.
#[derive(Clone)]
pub struct Authorizer {
    mode: AuthorizationMode,
    rbac: Option<Rbac>,
    /// SubjectAccessReview decisions by (user, attributes), each with the
    /// RBAC generation it was asked at (see [`Authorizer::authorize`]).
    reviews: moka::future::Cache<(UserInfo, Attributes), (Decision, u64)>,
    upstream: Upstream,
    metrics: AuthzMetrics,
}

impl Authorizer {
    /// `rbac` is the watch-fed evaluator (rbac mode; its `run` is driven by the caller).
    pub fn new(
        config: &SharedConfig,
        rbac: Option<Rbac>,
        upstream: Upstream,
        metrics: AuthzMetrics,
    ) -> Authorizer {
        Authorizer {
            mode: config.authorization,
            rbac,
            reviews: moka::future::Cache::builder()
                .max_capacity(config.authorization_cache_size as u64)
                .time_to_live(config.authorization_cache_ttl)
                .build(),
            upstream,
            metrics,
        }
    }

    /// Decides whether `user` may do what `attributes` describe.
    ///
    /// # Errors
    /// A SubjectAccessReview was needed and could not be made.
    pub async fn authorize(&self, user: &UserInfo, attributes: &Attributes) -> Result<Decision, ProxyError> {
        let started = Instant::now();
        if self.mode == AuthorizationMode::Rbac {
            if let Some(rbac) = &self.rbac {
                if rbac.allows(user, attributes) {
                    let decision = Decision {
                        allowed: true,
                        reason: String::new(),
                    };
                    self.metrics.record(&decision, DecisionSource::Rbac, started);
                    return Ok(decision);
                }
            }
        }
        // In rbac mode, a review that allowed what local RBAC denied holds
        // only while the RBAC objects are unchanged: a revoked grant must not
        // outlive the change kache has seen. A review that denied holds for
        // the TTL: a new RBAC grant is allowed by local RBAC without it.
        let generation = match (self.mode, &self.rbac) {
            (AuthorizationMode::Rbac, Some(rbac)) => rbac.generation(),
            _ => 0,
        };
        let key = (user.clone(), attributes.clone());
        if let Some((decision, asked_at)) = self.reviews.get(&key).await {
            if !decision.allowed || asked_at == generation {
                self.metrics.record(&decision, DecisionSource::Cache, started);
                return Ok(decision);
            }
            self.reviews.invalidate(&key).await;
        }
        let entry = self
            .reviews
            .entry(key)
            .or_try_insert_with(async {
                let decision = subject_access_review(&self.upstream, user, attributes).await?;
                Ok::<_, ProxyError>((decision, generation))
            })
            .await
            .map_err(|error| ProxyError::Review(error.to_string()))?;
        let source = if entry.is_fresh() {
            DecisionSource::Sar
        } else {
            DecisionSource::Cache
        };
        let (decision, _) = entry.into_value();
        self.metrics.record(&decision, source, started);
        Ok(decision)
    }

    /// The RBAC evaluator, if this authorizer has one.
    pub fn rbac(&self) -> Option<&Rbac> {
        self.rbac.as_ref()
    }
}

/// The API server's 403 for a denied request, word for word.
pub fn forbidden(user: &str, attributes: &Attributes, reason: &str) -> Response<Body> {
    let what = forbidden_message(user, attributes);
    let message = if reason.is_empty() {
        what
    } else {
        format!("{what}: {reason}")
    };
    let (message, details) = if attributes.resource_request {
        let qualified = if attributes.group.is_empty() {
            attributes.resource.clone()
        } else {
            format!("{}.{}", attributes.resource, attributes.group)
        };
        let message = if attributes.name.is_empty() {
            format!("{qualified} is forbidden: {message}")
        } else {
            format!(
                "{qualified} {} is forbidden: {message}",
                go_quote(&attributes.name)
            )
        };
        let details = crate::status::Details {
            name: &attributes.name,
            group: &attributes.group,
            kind: &attributes.resource,
            ..crate::status::Details::default()
        };
        (message, details)
    } else {
        (format!("forbidden: {message}"), crate::status::Details::default())
    };
    crate::status::failure_with(StatusCode::FORBIDDEN, &message, details)
}

/// `forbiddenMessage` of apiserver's responsewriters, with its HTML escaping.
fn forbidden_message(user: &str, a: &Attributes) -> String {
    let message = if !a.resource_request {
        format!(
            "User {} cannot {} path {}",
            go_quote(user),
            a.verb,
            go_quote(&a.path)
        )
    } else {
        let resource = if a.subresource.is_empty() {
            a.resource.clone()
        } else {
            format!("{}/{}", a.resource, a.subresource)
        };
        if a.namespace.is_empty() {
            format!(
                "User {} cannot {} resource {} in API group {} at the cluster scope",
                go_quote(user),
                a.verb,
                go_quote(&resource),
                go_quote(&a.group)
            )
        } else {
            format!(
                "User {} cannot {} resource {} in API group {} in the namespace {}",
                go_quote(user),
                a.verb,
                go_quote(&resource),
                go_quote(&a.group),
                go_quote(&a.namespace)
            )
        }
    };
    message
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Go's `%q` for the strings that occur here: quotes and backslashes
/// escaped, control characters as escapes, printable Unicode kept.
pub fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SarRequest<'a> {
    api_version: &'static str,
    kind: &'static str,
    spec: SarSpec<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SarSpec<'a> {
    user: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    uid: &'a str,
    groups: &'a [String],
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    extra: &'a std::collections::BTreeMap<String, Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resource_attributes: Option<ResourceAttributes<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    non_resource_attributes: Option<NonResourceAttributes<'a>>,
}

#[derive(Serialize)]
struct ResourceAttributes<'a> {
    namespace: &'a str,
    verb: &'a str,
    group: &'a str,
    version: &'a str,
    resource: &'a str,
    subresource: &'a str,
    name: &'a str,
}

#[derive(Serialize)]
struct NonResourceAttributes<'a> {
    path: &'a str,
    verb: &'a str,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct SarResponse {
    status: SarStatus,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct SarStatus {
    allowed: bool,
    reason: String,
    evaluation_error: String,
}

/// Asks the API server whether `user` may do what `attributes` describe.
async fn subject_access_review(
    upstream: &Upstream,
    user: &UserInfo,
    a: &Attributes,
) -> Result<Decision, ProxyError> {
    let request = SarRequest {
        api_version: "authorization.k8s.io/v1",
        kind: "SubjectAccessReview",
        spec: SarSpec {
            user: &user.name,
            uid: &user.uid,
            groups: &user.groups,
            extra: &user.extra,
            resource_attributes: a.resource_request.then_some(ResourceAttributes {
                namespace: &a.namespace,
                verb: &a.verb,
                group: &a.group,
                version: &a.version,
                resource: &a.resource,
                subresource: &a.subresource,
                name: &a.name,
            }),
            non_resource_attributes: (!a.resource_request).then_some(NonResourceAttributes {
                path: &a.path,
                verb: &a.verb,
            }),
        },
    };
    let response: SarResponse = upstream
        .post_json("/apis/authorization.k8s.io/v1/subjectaccessreviews", &request)
        .await?;
    if !response.status.evaluation_error.is_empty() {
        tracing::debug!(error = %response.status.evaluation_error, "SubjectAccessReview evaluation error");
    }
    Ok(Decision {
        allowed: response.status.allowed,
        reason: response.status.reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use kache_cache::RequestInfo;

    fn attributes_for(info: &RequestInfo, path: &str) -> Attributes {
        Attributes::from_request(info, path)
    }

    fn info(method: &str, path: &str, query: Option<&str>) -> RequestInfo {
        RequestInfo::parse(method, path, query).expect("parses")
    }

    async fn body(response: Response<Body>) -> serde_json::Value {
        let bytes = response.into_body().collect().await.expect("body").to_bytes();
        serde_json::from_slice(&bytes).expect("json")
    }

    #[tokio::test]
    async fn a_denied_namespaced_list_is_the_api_servers_403_word_for_word() {
        let a = attributes_for(
            &info(
                "GET",
                "/api/v1/namespaces/x/configmaps",
                Some("resourceVersion=0"),
            ),
            "/api/v1/namespaces/x/configmaps",
        );
        let response = forbidden("bob", &a, "");
        assert_eq!(response.status(), 403);
        assert_eq!(
            body(response).await,
            serde_json::json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "configmaps is forbidden: User \"bob\" cannot list resource \"configmaps\" in API group \"\" in the namespace \"x\"",
                "reason": "Forbidden", "details": {"kind": "configmaps"}, "code": 403
            })
        );
    }

    #[tokio::test]
    async fn a_denied_cluster_wide_get_of_a_named_object_names_it_and_its_group() {
        let a = attributes_for(
            &info("GET", "/apis/apps/v1/namespaces/n/deployments/web", None),
            "/apis/apps/v1/namespaces/n/deployments/web",
        );
        let value = body(forbidden(
            "system:serviceaccount:n:sa",
            &a,
            "RBAC: role \"r\" not found",
        ))
        .await;
        assert_eq!(
            value["message"],
            "deployments.apps \"web\" is forbidden: User \"system:serviceaccount:n:sa\" cannot get resource \
             \"deployments\" in API group \"apps\" in the namespace \"n\": RBAC: role \"r\" not found"
        );
        assert_eq!(
            value["details"],
            serde_json::json!({"name": "web", "group": "apps", "kind": "deployments"})
        );
        let a = attributes_for(&info("GET", "/api/v1/pods", Some("watch=1")), "/api/v1/pods");
        assert_eq!(
            body(forbidden("alice", &a, "")).await["message"],
            "pods is forbidden: User \"alice\" cannot watch resource \"pods\" in API group \"\" at the cluster scope"
        );
    }

    #[tokio::test]
    async fn a_denied_path_is_forbidden_without_details() {
        let a = attributes_for(&info("GET", "/apis", None), "/apis");
        assert!(!a.resource_request);
        let value = body(forbidden("system:anonymous", &a, "")).await;
        assert_eq!(
            value["message"],
            "forbidden: User \"system:anonymous\" cannot get path \"/apis\""
        );
        assert_eq!(value["details"], serde_json::json!({}));
    }

    #[test]
    fn a_list_pinned_to_one_name_by_its_field_selector_names_it() {
        let a = attributes_for(
            &info(
                "GET",
                "/api/v1/namespaces/x/configmaps",
                Some("fieldSelector=metadata.name%3Dmine&resourceVersion=0"),
            ),
            "",
        );
        assert_eq!((a.verb.as_str(), a.name.as_str()), ("list", "mine"));
        let a = attributes_for(
            &info(
                "GET",
                "/api/v1/namespaces/x/configmaps",
                Some("fieldSelector=metadata.name%21%3Dmine"),
            ),
            "",
        );
        assert_eq!(a.name, "");
    }

    #[test]
    fn go_quoting_escapes_what_go_escapes() {
        assert_eq!(go_quote("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(go_quote("tab\there"), "\"tab\\there\"");
        assert_eq!(go_quote("ünï"), "\"ünï\"");
    }
}
