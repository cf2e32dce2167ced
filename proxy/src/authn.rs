//! Who a request is from (shared mode), as the API server's authentication
//! chain and impersonation filter would say, and how it goes upstream.
//!
//! ```text
//!   client certificate (verified against --client-ca-file) ─► user = CN, groups = O
//!   else Authorization: Bearer <token> ─► TokenReview (cached by SHA-256 of the token,
//!                                         identical reviews made once) ─► user, uid, groups, extra
//!   else ─► allowAnonymous? system:anonymous in system:unauthenticated : 401
//!        + system:authenticated for every authenticated user
//!   Impersonate-* headers ─► each impersonation authorized for that user (verb impersonate)
//!                          ─► the impersonated user, as apiserver's filters/impersonation.go builds it
//! ```
//!
//! Local mode has no authentication of its own (the guard's optional access
//! token aside): every request goes up as kache's kubeconfig identity, and a
//! request carrying `Impersonate-*` headers is never answered from memory.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::time::{Duration, Instant};

use http::{header, HeaderMap, HeaderName, HeaderValue};
use kache_cache::rbac::{Attributes, UserInfo};
use kache_config::{ForwardMode, SharedConfig};
use prometheus_client::registry::Registry;
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

use crate::authz::Authorizer;
use crate::error::{Denied, ProxyError};
use crate::metrics::DecisionMetrics;
use crate::upstream::Upstream;

pub const ANONYMOUS: &str = "system:anonymous";
pub const ALL_UNAUTHENTICATED: &str = "system:unauthenticated";
pub const ALL_AUTHENTICATED: &str = "system:authenticated";
const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";
const IMPERSONATE_USER: &str = "impersonate-user";
const IMPERSONATE_GROUP: &str = "impersonate-group";
const IMPERSONATE_UID: &str = "impersonate-uid";
const IMPERSONATE_EXTRA_PREFIX: &str = "impersonate-extra-";

/// What one client connection has shown of its identity, shared by its
/// requests (the listener puts it on each): the certificate chain it
/// presented (already verified against the client CAs), and the last bearer
/// token authenticated on it. A connection (HTTP/1.1 keep-alive or HTTP/2)
/// nearly always carries one identity, so most requests are recognized with
/// a byte comparison instead of a hash and a cache lookup.
#[derive(Debug, Default)]
pub struct Connection {
    certificates: Option<Vec<CertificateDer<'static>>>,
    certificate_user: OnceLock<Option<Arc<UserInfo>>>,
    last_token: RwLock<Option<RememberedToken>>,
    /// Plain HTTP/1 on a [`crate::socket::Socket`]: lists may be sent from
    /// their memory files.
    zero_copy: bool,
}

#[derive(Debug)]
struct RememberedToken {
    /// The whole `Authorization` header value, compared byte for byte.
    authorization: HeaderValue,
    user: Arc<UserInfo>,
    /// The token's review is trusted until then (as in the token cache).
    until: Instant,
}

impl Connection {
    /// A connection that presented these certificates (none: plain HTTP, or
    /// TLS without a client certificate).
    pub fn new(certificates: Option<Vec<CertificateDer<'static>>>) -> Connection {
        Connection {
            certificates: certificates.filter(|chain| !chain.is_empty()),
            ..Connection::default()
        }
    }

    /// A plain HTTP/1 connection whose socket sends filed lists with
    /// `sendfile` (see [`crate::socket`]).
    pub fn zero_copy() -> Connection {
        Connection {
            zero_copy: true,
            ..Connection::default()
        }
    }

    /// Whether answers may be sent from memory files.
    pub fn is_zero_copy(&self) -> bool {
        self.zero_copy
    }

    /// The user of the connection's client certificate, parsed once.
    fn certificate_user(&self) -> Option<Arc<UserInfo>> {
        self.certificate_user
            .get_or_init(|| {
                let leaf = self.certificates.as_ref()?.first()?;
                certificate_user(leaf).map(Arc::new)
            })
            .clone()
    }

    /// The user of this `Authorization` value, if it is the one last
    /// authenticated on this connection and its review still holds.
    fn remembered(&self, authorization: &HeaderValue) -> Option<Arc<UserInfo>> {
        let last = self.last_token.read().unwrap_or_else(PoisonError::into_inner);
        last.as_ref()
            .filter(|t| t.authorization.as_bytes() == authorization.as_bytes() && Instant::now() < t.until)
            .map(|t| t.user.clone())
    }

    fn remember(&self, authorization: &HeaderValue, user: &Arc<UserInfo>, until: Instant) {
        // A copy: a clone would share the buffer hyper read the request head
        // into, and keep all of it (8 KB or more) for the connection's life.
        let Ok(authorization) = HeaderValue::from_bytes(authorization.as_bytes()) else {
            return;
        };
        *self.last_token.write().unwrap_or_else(PoisonError::into_inner) = Some(RememberedToken {
            authorization,
            user: user.clone(),
            until,
        });
    }
}

/// How a request reaches the API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamAs {
    /// kache's own kubeconfig identity, the request's headers as sent
    /// (local mode: the API server checks any `Impersonate-*` itself).
    Kubeconfig,
    /// No credentials of kache's: the client's own `Authorization` and
    /// `Impersonate-*` headers, unchanged (shared mode, passthrough).
    Client,
    /// kache's identity impersonating this user; the client's own
    /// credentials and impersonation headers are replaced.
    Impersonate(Arc<UserInfo>),
}

impl UpstreamAs {
    /// Names the identity an upstream call is made as, for the coalescer:
    /// calls made as different identities never share.
    pub fn identity(&self, headers: &HeaderMap) -> String {
        match self {
            UpstreamAs::Kubeconfig => "kubeconfig".into(),
            UpstreamAs::Client => match headers.get(header::AUTHORIZATION) {
                Some(value) => format!("client:{}", hex(&sha256(value.as_bytes()))),
                None => "client:anonymous".into(),
            },
            UpstreamAs::Impersonate(user) => format!("as:{user:?}"),
        }
    }
}

/// Who a request is from.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The user the API server would act as (after impersonation); `None` in
    /// local mode, where it is the kubeconfig's user.
    pub user: Option<Arc<UserInfo>>,
    /// Whether kache may answer this caller from memory (after authorizing
    /// `user` in shared mode). Local mode: not when it impersonates.
    pub memory: bool,
    pub upstream: UpstreamAs,
}

impl Caller {
    /// A local-mode caller: kache's identity; impersonating requests are the
    /// API server's to decide.
    pub fn local(headers: &HeaderMap) -> Caller {
        Caller {
            user: None,
            memory: !has_impersonation(headers),
            upstream: UpstreamAs::Kubeconfig,
        }
    }

    /// The user name for limits and logs: the authenticated (or
    /// impersonated) user; in local mode the user a request impersonates.
    pub fn user_name<'a>(&'a self, headers: &'a HeaderMap) -> Option<&'a str> {
        match &self.user {
            Some(user) => Some(&user.name),
            None => headers.get(IMPERSONATE_USER).and_then(|v| v.to_str().ok()),
        }
    }
}

/// Whether a request carries any `Impersonate-*` header.
pub fn has_impersonation(headers: &HeaderMap) -> bool {
    headers
        .keys()
        .any(|name| name.as_str().starts_with("impersonate-"))
}

/// How a user was authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthnSource {
    Certificate,
    /// A TokenReview made for this request.
    TokenReview,
    /// A TokenReview's answer made earlier (or concurrently).
    Cache,
    /// The token last authenticated on the same connection.
    Connection,
    Anonymous,
}

impl AuthnSource {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthnSource::Certificate => "certificate",
            AuthnSource::TokenReview => "tokenreview",
            AuthnSource::Cache => "cache",
            AuthnSource::Connection => "connection",
            AuthnSource::Anonymous => "anonymous",
        }
    }
}

/// Authentication metrics: results by source, and latency.
#[derive(Clone)]
pub struct AuthnMetrics(DecisionMetrics);

impl AuthnMetrics {
    pub fn register(registry: &mut Registry) -> AuthnMetrics {
        AuthnMetrics(DecisionMetrics::register(
            registry,
            (
                "authentication_attempts",
                "Authentication results (success, failure) by source (certificate, tokenreview, cache, connection, anonymous, none)",
            ),
            "authentication_duration_seconds",
            &["success", "failure"],
            (
                &["certificate", "tokenreview", "cache", "connection", "anonymous", "none"],
                &["certificate", "tokenreview", "cache"],
            ),
        ))
    }

    fn record(&self, success: bool, source: &'static str, started: Instant) {
        self.0
            .record(if success { "success" } else { "failure" }, source, started);
    }
}

/// What a TokenReview said about a token.
#[derive(Debug, Clone)]
enum TokenOutcome {
    /// Trusted until `until` (the review's time plus the token TTL).
    Authenticated {
        user: Arc<UserInfo>,
        until: Instant,
    },
    Rejected,
}

/// Successes live for the token TTL, rejections for the (shorter) failure TTL.
struct TokenExpiry {
    success: Duration,
    failure: Duration,
}

impl moka::Expiry<[u8; 32], TokenOutcome> for TokenExpiry {
    fn expire_after_create(
        &self,
        _key: &[u8; 32],
        value: &TokenOutcome,
        _now: std::time::Instant,
    ) -> Option<Duration> {
        Some(match value {
            TokenOutcome::Authenticated { .. } => self.success,
            TokenOutcome::Rejected => self.failure,
        })
    }
}

/// Shared mode's authenticator.
#[derive(Clone)]
pub struct Authenticator {
    forward: ForwardMode,
    allow_anonymous: bool,
    tokens: moka::future::Cache<[u8; 32], TokenOutcome>,
    token_ttl: Duration,
    upstream: Upstream,
    metrics: AuthnMetrics,
}

impl Authenticator {
    /// `upstream` is kache's own identity (it makes the TokenReviews).
    pub fn new(config: &SharedConfig, upstream: Upstream, metrics: AuthnMetrics) -> Authenticator {
        Authenticator {
            forward: config.forward,
            allow_anonymous: config.allow_anonymous,
            tokens: moka::future::Cache::builder()
                .max_capacity(config.token_cache_size as u64)
                .expire_after(TokenExpiry {
                    success: config.token_cache_ttl,
                    failure: config.token_failure_cache_ttl,
                })
                .build(),
            token_ttl: config.token_cache_ttl,
            upstream,
            metrics,
        }
    }

    /// Authenticates a request, checks its impersonation, and says how it
    /// goes upstream.
    ///
    /// # Errors
    /// No or invalid credentials (401); an impersonation the user may not
    /// make (403); malformed impersonation headers (400); a review that
    /// could not be made (503).
    pub async fn identify(
        &self,
        headers: &HeaderMap,
        connection: Option<&Connection>,
        authorizer: &Authorizer,
    ) -> Result<Caller, ProxyError> {
        let (authenticated, via) = self.authenticate(headers, connection).await?;
        let impersonated = impersonation(headers)?;
        let user = match impersonated {
            None => authenticated,
            Some(requests) => {
                for attributes in &requests.checks {
                    let decision = authorizer.authorize(&authenticated, attributes).await?;
                    if !decision.allowed {
                        return Err(ProxyError::Forbidden(Box::new(Denied {
                            user: authenticated.name.clone(),
                            attributes: attributes.clone(),
                            reason: decision.reason,
                        })));
                    }
                }
                Arc::new(requests.user)
            }
        };
        // A bearer token can go on as it is; a certificate cannot, and an
        // anonymous request goes on without credentials.
        let upstream = match (self.forward, via) {
            (
                ForwardMode::Passthrough,
                AuthnSource::TokenReview
                | AuthnSource::Cache
                | AuthnSource::Connection
                | AuthnSource::Anonymous,
            ) => UpstreamAs::Client,
            _ => UpstreamAs::Impersonate(user.clone()),
        };
        Ok(Caller {
            user: Some(user),
            memory: true,
            upstream,
        })
    }

    async fn authenticate(
        &self,
        headers: &HeaderMap,
        connection: Option<&Connection>,
    ) -> Result<(Arc<UserInfo>, AuthnSource), ProxyError> {
        let started = Instant::now();
        // The API server's chain tries client certificates before tokens.
        if let Some(user) = connection.and_then(Connection::certificate_user) {
            self.metrics
                .record(true, AuthnSource::Certificate.as_str(), started);
            return Ok((user, AuthnSource::Certificate));
        }
        match bearer_token(headers) {
            Some(token) => {
                let authorization = headers
                    .get(header::AUTHORIZATION)
                    .expect("invariant: a bearer token comes from the Authorization header");
                if let Some(user) = connection.and_then(|c| c.remembered(authorization)) {
                    self.metrics
                        .record(true, AuthnSource::Connection.as_str(), started);
                    return Ok((user, AuthnSource::Connection));
                }
                let key = sha256(token.as_bytes());
                let token = token.to_string();
                let entry = self
                    .tokens
                    .entry(key)
                    .or_try_insert_with(token_review(&self.upstream, token, self.token_ttl))
                    .await
                    .map_err(|error| ProxyError::Review(error.to_string()))?;
                let source = if entry.is_fresh() {
                    AuthnSource::TokenReview
                } else {
                    AuthnSource::Cache
                };
                match entry.into_value() {
                    TokenOutcome::Authenticated { user, until } => {
                        if let Some(connection) = connection {
                            connection.remember(authorization, &user, until);
                        }
                        self.metrics.record(true, source.as_str(), started);
                        Ok((user, source))
                    }
                    // An invalid token is 401 even where anonymous requests are allowed.
                    TokenOutcome::Rejected => {
                        self.metrics.record(false, source.as_str(), started);
                        Err(ProxyError::Unauthenticated)
                    }
                }
            }
            None if self.allow_anonymous => {
                self.metrics.record(true, "anonymous", started);
                let user = UserInfo {
                    name: ANONYMOUS.into(),
                    groups: vec![ALL_UNAUTHENTICATED.into()],
                    ..UserInfo::default()
                };
                Ok((Arc::new(user), AuthnSource::Anonymous))
            }
            None => {
                self.metrics.record(false, "none", started);
                Err(ProxyError::Unauthenticated)
            }
        }
    }
}

/// The token of `Authorization: Bearer <token>` (scheme case-insensitive),
/// as apiserver's bearertoken authenticator reads it; an empty one is none.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    Some(token.trim()).filter(|t| !t.is_empty())
}

/// The x509 authenticator's user: CN the name, each O a group.
pub fn certificate_user(certificate: &CertificateDer<'_>) -> Option<UserInfo> {
    let (_, parsed) = x509_parser::parse_x509_certificate(certificate.as_ref()).ok()?;
    let subject = parsed.subject();
    let name = subject.iter_common_name().next()?.as_str().ok()?.to_string();
    if name.is_empty() {
        return None;
    }
    let mut groups: Vec<String> = subject
        .iter_organization()
        .filter_map(|o| o.as_str().ok().map(str::to_string))
        .collect();
    add_authenticated(&mut groups);
    Some(UserInfo {
        name,
        groups,
        ..UserInfo::default()
    })
}

/// Adds `system:authenticated`, as the API server's group adder does for
/// every authenticated user.
fn add_authenticated(groups: &mut Vec<String>) {
    if !groups.iter().any(|g| g == ALL_AUTHENTICATED) {
        groups.push(ALL_AUTHENTICATED.into());
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TokenReviewRequest {
    api_version: &'static str,
    kind: &'static str,
    spec: TokenReviewSpec,
}

#[derive(Serialize)]
struct TokenReviewSpec {
    token: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct TokenReviewResponse {
    status: TokenReviewStatus,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct TokenReviewStatus {
    authenticated: bool,
    user: ReviewedUser,
    error: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ReviewedUser {
    username: String,
    uid: String,
    groups: Vec<String>,
    extra: BTreeMap<String, Vec<String>>,
}

/// Asks the API server who a token belongs to.
async fn token_review(upstream: &Upstream, token: String, ttl: Duration) -> Result<TokenOutcome, ProxyError> {
    let reviewed = Instant::now();
    let request = TokenReviewRequest {
        api_version: "authentication.k8s.io/v1",
        kind: "TokenReview",
        spec: TokenReviewSpec { token },
    };
    let response: TokenReviewResponse = upstream
        .post_json("/apis/authentication.k8s.io/v1/tokenreviews", &request)
        .await?;
    let status = response.status;
    if !status.authenticated || status.user.username.is_empty() {
        if !status.error.is_empty() {
            tracing::debug!(error = %status.error, "token rejected");
        }
        return Ok(TokenOutcome::Rejected);
    }
    let mut groups = status.user.groups;
    add_authenticated(&mut groups);
    Ok(TokenOutcome::Authenticated {
        user: Arc::new(UserInfo {
            name: status.user.username,
            uid: status.user.uid,
            groups,
            extra: status.user.extra,
        }),
        until: reviewed + ttl,
    })
}

/// The impersonation a request asks for: the checks to make, in the API
/// server's order, and the user that results.
struct Impersonation {
    checks: Vec<Attributes>,
    user: UserInfo,
}

/// Reads `Impersonate-*` headers as apiserver's impersonation filter does.
///
/// # Errors
/// Groups, extras or a UID without a user (400).
fn impersonation(headers: &HeaderMap) -> Result<Option<Impersonation>, ProxyError> {
    if !has_impersonation(headers) {
        return Ok(None);
    }
    let text = |v: &HeaderValue| String::from_utf8_lossy(v.as_bytes()).into_owned();
    let user_name = headers.get(IMPERSONATE_USER).map(text).filter(|u| !u.is_empty());
    let groups: Vec<String> = headers.get_all(IMPERSONATE_GROUP).iter().map(text).collect();
    let uid = headers.get(IMPERSONATE_UID).map(text);
    let mut extra: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in headers {
        if let Some(key) = name.as_str().strip_prefix(IMPERSONATE_EXTRA_PREFIX) {
            let key = percent_encoding::percent_decode_str(key)
                .decode_utf8_lossy()
                .into_owned();
            extra.entry(key).or_default().push(text(value));
        }
    }
    let Some(user_name) = user_name else {
        return Err(ProxyError::BadRequest(
            "impersonating groups, extras or a UID requires impersonating a user (Impersonate-User)".into(),
        ));
    };

    let mut checks = Vec::new();
    let resource = |group: &str, resource: &str, subresource: &str, namespace: &str, name: &str| Attributes {
        verb: "impersonate".into(),
        resource_request: true,
        group: group.into(),
        version: "v1".into(),
        resource: resource.into(),
        subresource: subresource.into(),
        namespace: namespace.into(),
        name: name.into(),
        path: String::new(),
    };
    let mut user_groups = groups.clone();
    match service_account(&user_name) {
        Some((namespace, name)) => {
            checks.push(resource("", "serviceaccounts", "", namespace, name));
            if groups.is_empty() {
                user_groups = vec![
                    "system:serviceaccounts".into(),
                    format!("system:serviceaccounts:{namespace}"),
                ];
            }
        }
        None => checks.push(resource("", "users", "", "", &user_name)),
    }
    for group in &groups {
        checks.push(resource("", "groups", "", "", group));
    }
    for (key, values) in &extra {
        for value in values {
            checks.push(resource("authentication.k8s.io", "userextras", key, "", value));
        }
    }
    if let Some(uid) = &uid {
        checks.push(resource("authentication.k8s.io", "uids", "", "", uid));
    }
    let marker = if user_name == ANONYMOUS {
        ALL_UNAUTHENTICATED
    } else {
        ALL_AUTHENTICATED
    };
    if !user_groups
        .iter()
        .any(|g| g == ALL_AUTHENTICATED || g == ALL_UNAUTHENTICATED)
    {
        user_groups.push(marker.into());
    }
    Ok(Some(Impersonation {
        checks,
        user: UserInfo {
            name: user_name,
            uid: uid.unwrap_or_default(),
            groups: user_groups,
            extra,
        },
    }))
}

/// `system:serviceaccount:<namespace>:<name>` → (namespace, name).
fn service_account(user: &str) -> Option<(&str, &str)> {
    let rest = user.strip_prefix(SERVICE_ACCOUNT_PREFIX)?;
    let (namespace, name) = rest.split_once(':')?;
    (!namespace.is_empty() && !name.is_empty() && !name.contains(':')).then_some((namespace, name))
}

/// The headers that make kache's identity act as `user`.
pub fn impersonation_headers(user: &UserInfo) -> Vec<(HeaderName, HeaderValue)> {
    let mut headers = Vec::new();
    let mut push = |name: HeaderName, value: &str| match HeaderValue::from_str(value) {
        Ok(value) => headers.push((name, value)),
        Err(_) => tracing::warn!(%name, "an identity value is not a valid header value; left out"),
    };
    push(HeaderName::from_static(IMPERSONATE_USER), &user.name);
    for group in &user.groups {
        push(HeaderName::from_static(IMPERSONATE_GROUP), group);
    }
    if !user.uid.is_empty() {
        push(HeaderName::from_static(IMPERSONATE_UID), &user.uid);
    }
    for (key, values) in &user.extra {
        let encoded = percent_encoding::utf8_percent_encode(key, EXTRA_KEY).to_string();
        let Ok(name) = HeaderName::from_bytes(format!("{IMPERSONATE_EXTRA_PREFIX}{encoded}").as_bytes())
        else {
            tracing::warn!(key = %key, "an extra key cannot be a header name; left out");
            continue;
        };
        for value in values {
            push(name.clone(), value);
        }
    }
    headers
}

/// Characters escaped in `Impersonate-Extra-` keys (client-go escapes all
/// but RFC 7230 token characters; apiserver unescapes).
const EXTRA_KEY: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'!')
    .remove(b'#')
    .remove(b'$')
    .remove(b'&')
    .remove(b'\'')
    .remove(b'*')
    .remove(b'+')
    .remove(b'.')
    .remove(b'^')
    .remove(b'_')
    .remove(b'`')
    .remove(b'|')
    .remove(b'~');

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::forward::tests::headers;

    #[test]
    fn bearer_tokens_are_read_as_the_api_server_reads_them() {
        assert_eq!(
            bearer_token(&headers(&[("authorization", "Bearer abc")])),
            Some("abc")
        );
        assert_eq!(
            bearer_token(&headers(&[("authorization", "bearer  abc ")])),
            Some("abc")
        );
        assert_eq!(bearer_token(&headers(&[("authorization", "Bearer ")])), None);
        assert_eq!(bearer_token(&headers(&[("authorization", "Basic YTpi")])), None);
        assert_eq!(bearer_token(&headers(&[])), None);
    }

    #[test]
    fn impersonating_a_user_checks_user_groups_and_extras_and_adds_authenticated() {
        let request = impersonation(&headers(&[
            ("impersonate-user", "alice"),
            ("impersonate-group", "devs"),
            ("impersonate-extra-scopes", "view"),
            ("impersonate-extra-example.com%2fteam", "a"),
        ]))
        .expect("valid")
        .expect("impersonates");
        let checks: Vec<(String, String, String)> = request
            .checks
            .iter()
            .map(|a| (a.resource.clone(), a.subresource.clone(), a.name.clone()))
            .collect();
        assert_eq!(
            checks,
            [
                ("users".into(), "".into(), "alice".into()),
                ("groups".into(), "".into(), "devs".into()),
                ("userextras".into(), "example.com/team".into(), "a".into()),
                ("userextras".into(), "scopes".into(), "view".into()),
            ]
        );
        assert_eq!(request.user.groups, ["devs", ALL_AUTHENTICATED]);
        assert_eq!(request.user.extra["example.com/team"], ["a"]);
    }

    #[test]
    fn impersonating_a_service_account_gives_its_groups_and_checks_it_in_its_namespace() {
        let request = impersonation(&headers(&[(
            "impersonate-user",
            "system:serviceaccount:ci:builder",
        )]))
        .expect("valid")
        .expect("impersonates");
        let check = &request.checks[0];
        assert_eq!(
            (
                check.resource.as_str(),
                check.namespace.as_str(),
                check.name.as_str()
            ),
            ("serviceaccounts", "ci", "builder")
        );
        assert_eq!(
            request.user.groups,
            [
                "system:serviceaccounts",
                "system:serviceaccounts:ci",
                ALL_AUTHENTICATED
            ]
        );
    }

    #[test]
    fn impersonating_anonymous_adds_unauthenticated_and_groups_need_a_user() {
        let request = impersonation(&headers(&[("impersonate-user", ANONYMOUS)]))
            .expect("valid")
            .expect("impersonates");
        assert_eq!(request.user.groups, [ALL_UNAUTHENTICATED]);
        let error = impersonation(&headers(&[("impersonate-group", "devs")]))
            .err()
            .expect("no user");
        assert_eq!(error.status(), 400);
        assert!(impersonation(&headers(&[])).expect("valid").is_none());
    }

    #[test]
    fn impersonation_headers_carry_the_whole_user_with_escaped_extra_keys() {
        let mut extra = BTreeMap::new();
        extra.insert(
            "example.com/team".to_string(),
            vec!["a".to_string(), "b".to_string()],
        );
        let user = UserInfo {
            name: "alice".into(),
            uid: "u-1".into(),
            groups: vec!["devs".into(), ALL_AUTHENTICATED.into()],
            extra,
        };
        let sent: Vec<(String, String)> = impersonation_headers(&user)
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_str().expect("ascii").to_string()))
            .collect();
        let want: Vec<(String, String)> = [
            ("impersonate-user", "alice"),
            ("impersonate-group", "devs"),
            ("impersonate-group", ALL_AUTHENTICATED),
            ("impersonate-uid", "u-1"),
            ("impersonate-extra-example.com%2fteam", "a"),
            ("impersonate-extra-example.com%2fteam", "b"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(sent, want);
        // What kache sends is what it reads back.
        let mut map = HeaderMap::new();
        for (k, v) in impersonation_headers(&user) {
            map.append(k, v);
        }
        let back = impersonation(&map).expect("valid").expect("impersonates");
        assert_eq!(back.user, user);
    }

    #[test]
    fn certificates_map_cn_to_the_user_and_o_to_groups() {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(rcgen::DnType::CommonName, "carol");
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "devs");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("cert");
        let user = certificate_user(cert.der()).expect("a user");
        assert_eq!(user.name, "carol");
        assert_eq!(user.groups, ["devs", ALL_AUTHENTICATED]);
    }

    #[test]
    fn a_connection_remembers_its_last_token_until_its_review_expires() {
        let connection = Connection::new(None);
        let alice = Arc::new(UserInfo {
            name: "alice".into(),
            ..UserInfo::default()
        });
        let token = HeaderValue::from_static("Bearer a");
        assert!(connection.remembered(&token).is_none());
        connection.remember(&token, &alice, Instant::now() + Duration::from_secs(60));
        assert_eq!(connection.remembered(&token), Some(alice.clone()));
        assert!(connection
            .remembered(&HeaderValue::from_static("Bearer b"))
            .is_none());
        assert!(connection
            .remembered(&HeaderValue::from_static("Bearer a "))
            .is_none());
        connection.remember(&token, &alice, Instant::now());
        assert!(connection.remembered(&token).is_none(), "expired");
        assert!(connection.certificate_user().is_none());
    }

    #[test]
    fn coalescing_identities_differ_by_token_and_by_impersonated_user() {
        let a = headers(&[("authorization", "Bearer a")]);
        let b = headers(&[("authorization", "Bearer b")]);
        assert_ne!(UpstreamAs::Client.identity(&a), UpstreamAs::Client.identity(&b));
        assert!(!UpstreamAs::Client.identity(&a).contains("Bearer"));
        let alice = UpstreamAs::Impersonate(Arc::new(UserInfo {
            name: "alice".into(),
            ..UserInfo::default()
        }));
        let bob = UpstreamAs::Impersonate(Arc::new(UserInfo {
            name: "bob".into(),
            ..UserInfo::default()
        }));
        assert_ne!(alice.identity(&a), bob.identity(&a));
    }
}
