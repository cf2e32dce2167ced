//! The request path, written once, top to bottom. Each stage either lets the
//! request continue or answers it (`ControlFlow::Break`).
//!
//! ```text
//!   accept (server.rs) ─► identify ───────► classify ─► route ──────────────────────► respond
//!                         local: guard      RequestInfo  authorize (shared mode) ┐     Status on errors,
//!                         shared: authn.rs               discovery cache     ◄───┤     bodies streamed
//!                         (+ impersonation)              object cache (rv=0…) ◄──┘
//!                                                        admit: seats per client class
//!                                                        coalesced reads
//!                                                        else forward (as the caller)
//! ```
//!
//! Nothing is answered from memory for a caller kache has not authorized:
//! in shared mode every such answer is preceded by the authorizer's
//! decision for the (impersonated) user; in local mode a request that
//! impersonates is always forwarded, for the API server to decide.

use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use futures::TryStreamExt;
use http::{Request, Response};
use http_body_util::StreamBody;
use hyper::body::Frame;
use hyper::body::Incoming;
use kache_cache::discovery::{self, Discovery};
use kache_cache::reads::{Bypass, ReadPlan};
use kache_cache::resources::{Answer, Cache};
use kache_cache::{RequestInfo, Verb};
use kache_config::ClientKeyConfig;
use tracing::{field, Instrument};

use crate::admit::{ClientKey, Demand, Limiter, Permit};
use crate::authn::{Authenticator, Caller, Connection, UpstreamAs};
use crate::authz::Authorizer;
use crate::body::{Body, BoxError};
use crate::coalesce::{self, Coalescer};
use crate::error::{rescue, Denied, ProxyError};
use crate::forward;
use crate::guard::LocalGuard;
use crate::ledger::{Account, Ledger};
use crate::metrics::{ErrorLabels, Metrics, Outcome, RequestLabels, VerbLabels};
use crate::upstream::Upstream;

/// Everything a request needs, shared by all connections: the stages, in
/// the order a request meets them, and their settings.
pub struct Pipeline {
    pub guard: LocalGuard,
    /// Shared mode's authentication and authorization; `None` in local mode.
    pub shared: Option<SharedAuth>,
    pub client_key: ClientKeyConfig,
    pub discovery: Discovery,
    pub cache: Cache,
    pub limiter: Arc<Limiter>,
    pub coalescer: Coalescer,
    pub upstream: Upstream,
    pub metrics: Arc<Metrics>,
    /// What each client asked and what it cost the API server.
    pub ledger: Arc<Ledger>,
    /// The API server's limit on a write's body (`413` above it).
    pub max_request_body_bytes: u64,
    /// Reads the API server cannot answer are answered from memory at most
    /// this far behind it (`cache.serveStale`); `None`: never.
    pub serve_stale: Option<std::time::Duration>,
    /// Turns true when kache shuts down: long-running answers end then.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
}

/// Shared mode's identify and authorize stages, and the connection that
/// carries clients' own credentials (passthrough).
pub struct SharedAuth {
    pub authenticator: Authenticator,
    pub authorizer: Authorizer,
    /// The API server without kache's credentials.
    pub bare_upstream: Upstream,
}

impl Pipeline {
    /// Answers one request. Never fails: kache's own errors become `Status` responses.
    pub async fn handle(self: Arc<Self>, peer: SocketAddr, request: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let span = tracing::info_span!(
            "request",
            client = %peer,
            method = %request.method(),
            path = request.uri().path(),
            verb = field::Empty,
            resource = field::Empty,
            namespace = field::Empty,
            status = field::Empty,
            outcome = field::Empty,
            cache = field::Empty,
            user = field::Empty,
            client_key = field::Empty,
            duration_ms = field::Empty,
        );
        // Counted until answered, or until the client goes away and hyper
        // drops this future mid-way (the guard records that too).
        let mut tracked = Tracked::start(&self.metrics, span.clone(), started);
        let (verb, outcome, response) = self.run(peer, request, &tracked.account).instrument(span).await;
        tracked.finish(verb, outcome, response.status().as_u16());
        match tracked.account.get() {
            Some(account) => {
                if let Some(objects) = response.extensions().get::<kache_cache::reads::Objects>() {
                    account.sent_objects(objects.0);
                }
                let upstream = outcome == Outcome::Forwarded;
                let events = response.extensions().get::<kache_cache::reads::Events>().cloned();
                let account = Arc::clone(account);
                response.map(|body| {
                    crate::body::chunked(crate::body::Counted::new(body, account, upstream, events))
                })
            }
            None => response,
        }
    }

    /// The stages. Returns the verb and outcome for metrics along with the response.
    async fn run(
        &self,
        peer: SocketAddr,
        request: Request<Incoming>,
        account: &OnceLock<Arc<Account>>,
    ) -> (Verb, Outcome, Response<Body>) {
        // identify: only clients this proxy is meant for get through; who they are.
        let caller = match self.identify(&request).await {
            Ok(caller) => caller,
            Err(response) => return (Verb::Unknown, Outcome::Rejected, response),
        };
        let user = caller.user_name(request.headers()).map(str::to_string);
        if let Some(user) = &user {
            tracing::Span::current().record("user", user.as_str());
        }
        let client = ClientKey::identify_with(peer, request.headers(), user.as_deref(), &self.client_key);
        tracing::Span::current().record("client_key", client.as_str());
        let account = Arc::clone(account.get_or_init(|| self.ledger.account(&client)));
        // classify: what the API server would call this request.
        let (info, understood) = classify(&request);
        let verb = info.verb();
        // route: discovery and cacheable reads from memory (authorized for
        // the caller first), identical reads coalesced, everything else to
        // the upstream.
        let zero_copy = request
            .extensions()
            .get::<Arc<Connection>>()
            .is_some_and(|connection| connection.is_zero_copy());
        let plan = (info.is_resource_request && info.verb().is_read()).then(|| {
            self.cache
                .plan(&info, request.uri().query(), request.headers())
                .map(|plan| ReadPlan { zero_copy, ..plan })
        });
        let from_memory = match &plan {
            Some(plan) => plan.is_ok(),
            None => discovery::classify_path(request.uri().path()).is_some(),
        };
        let memory = match self.authorize_memory(&caller, &request, &info, from_memory).await {
            ControlFlow::Break(response) => return (verb, Outcome::Rejected, response),
            ControlFlow::Continue(memory) => memory,
        };
        let request = if memory {
            let request = match self.route_discovery(request, &info).await {
                ControlFlow::Break(response) => return (verb, Outcome::Discovery, response),
                ControlFlow::Continue(request) => request,
            };
            match self.route_cache(request, &info, plan).await {
                ControlFlow::Break(response) => {
                    // Watches from memory end by themselves at shutdown,
                    // after a last bookmark (`Cache::shutdown`).
                    return (verb, Outcome::Cache, response);
                }
                ControlFlow::Continue(request) => request,
            }
        } else {
            request
        };
        // A write's body over the API server's limit: its 413, without asking it.
        let body_limit = self.body_limit(&info);
        if let Some(limit) = body_limit {
            let declared = request
                .headers()
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            if declared.is_some_and(|length| length > limit) {
                return (verb, Outcome::Rejected, self.fail(&ProxyError::TooLarge(limit)));
            }
        }
        // admit + respond: what reaches the upstream takes a seat of the
        // client's class (coalesced reads: one seat per upstream call, taken
        // by the call); the answer streams back, kache's failures as Status.
        let admission = Admission {
            limiter: self.limiter.clone(),
            account,
            client,
            user,
            headers: request.headers().clone(),
            path: request.uri().path().to_string(),
            limits: forward::Limits {
                long_running: info.is_long_running(),
                body: body_limit,
            },
        };
        // A read the API server may fail to answer, kept to answer it from
        // memory then (opt-in, and only for callers memory may answer).
        let stale_candidate = (self.serve_stale.is_some()
            && caller.memory
            && (info.is_resource_request && matches!(info.verb(), Verb::Get | Verb::List)
                || !info.is_resource_request && discovery::classify_path(request.uri().path()).is_some()))
        .then(|| {
            (
                request.method().clone(),
                request.uri().clone(),
                request.headers().clone(),
            )
        });
        // The caller's own credentials go over a connection without kache's.
        let upstream = match (&caller.upstream, &self.shared) {
            (UpstreamAs::Client, Some(shared)) => &shared.bare_upstream,
            _ => &self.upstream,
        };
        let who = caller.upstream;
        let (outcome, result) = match coalesce::key_for(
            &request,
            understood.then_some(&info),
            who.identity(request.headers()),
        ) {
            Some(key) => {
                let upstream = upstream.clone();
                let shutdown = self.shutdown.clone();
                let (role, result) = self
                    .coalescer
                    .run(key, move || async move {
                        let permit = admission.acquire().await?;
                        forward::forward(
                            &upstream,
                            request,
                            &who,
                            admission.limits,
                            Some(permit),
                            &shutdown,
                        )
                        .await
                    })
                    .await;
                (role.outcome(), result.map_err(Shared::Arc))
            }
            None => {
                let result = match admission.acquire().await {
                    Ok(permit) => {
                        forward::forward(
                            upstream,
                            request,
                            &who,
                            admission.limits,
                            Some(permit),
                            &self.shutdown,
                        )
                        .await
                    }
                    Err(error) => Err(error),
                };
                (Outcome::Forwarded, result.map_err(Shared::Owned))
            }
        };
        if let Some((method, uri, headers)) = &stale_candidate {
            if let Some(why) = upstream_could_not_answer(&result) {
                let user = caller.user.as_deref();
                if let Some(response) = self.answer_stale(user, &info, (method, uri, headers), why).await {
                    return (verb, Outcome::Stale, response);
                }
            }
        }
        match result {
            Ok(response) => {
                self.metrics.mark_ready();
                (verb, outcome, self.ending_at_shutdown(response, &info))
            }
            Err(error) => {
                let outcome = match error.as_ref() {
                    ProxyError::TooManyRequests(_)
                    | ProxyError::TooLarge(_)
                    | ProxyError::BadRequest(_)
                    | ProxyError::Forbidden(_)
                    | ProxyError::Unauthenticated => Outcome::Rejected,
                    _ => Outcome::Error,
                };
                (verb, outcome, self.fail(error.as_ref()))
            }
        }
    }

    /// Answers a resource read from the object cache where it can; hands the
    /// request back otherwise.
    async fn route_cache(
        &self,
        request: Request<Incoming>,
        info: &RequestInfo,
        plan: Option<Result<ReadPlan, Bypass>>,
    ) -> ControlFlow<Response<Body>, Request<Incoming>> {
        let Some(plan) = plan else {
            return ControlFlow::Continue(request);
        };
        match self.cache.serve_plan(info, plan).await {
            Ok(answer) => ControlFlow::Break(answer_response(answer)),
            Err(reason) => {
                tracing::Span::current().record("cache", reason.as_str());
                ControlFlow::Continue(request)
            }
        }
    }

    /// Answers discovery from memory where the cache can; hands the request
    /// back otherwise (not discovery, cache out of sync, fetch failed).
    async fn route_discovery(
        &self,
        request: Request<Incoming>,
        info: &RequestInfo,
    ) -> ControlFlow<Response<Body>, Request<Incoming>> {
        if info.is_resource_request || discovery::classify_path(request.uri().path()).is_none() {
            return ControlFlow::Continue(request);
        }
        let (parts, body) = request.into_parts();
        match self.discovery.serve(&parts).await {
            Some(Ok(response)) => {
                self.metrics.mark_ready();
                ControlFlow::Break(response.map(crate::body::full))
            }
            Some(Err(error)) => {
                tracing::debug!(%error, "discovery fetch failed; forwarding");
                ControlFlow::Continue(Request::from_parts(parts, body))
            }
            None => ControlFlow::Continue(Request::from_parts(parts, body)),
        }
    }

    /// Local mode: the guard's checks, and kache's identity upstream.
    /// Shared mode: the authenticated (or impersonated) user.
    async fn identify(&self, request: &Request<Incoming>) -> Result<Caller, Response<Body>> {
        let result = match &self.shared {
            None => self
                .guard
                .check(request)
                .map(|()| Caller::local(request.headers())),
            Some(shared) => {
                let connection = request.extensions().get::<Arc<Connection>>().map(Arc::as_ref);
                shared
                    .authenticator
                    .identify(request.headers(), connection, &shared.authorizer)
                    .await
            }
        };
        result.map_err(|error| self.fail(&error))
    }

    /// Whether this request may be answered from memory. Local mode: unless
    /// it impersonates. Shared mode: a request kache would answer from
    /// memory (discovery, a cacheable read) must first be allowed for the
    /// caller, exactly as the API server's authorizer would decide it; a
    /// denial is the API server's own 403. A decision that cannot be had
    /// leaves the request to be forwarded: the API server authorizes it itself.
    async fn authorize_memory(
        &self,
        caller: &Caller,
        request: &Request<Incoming>,
        info: &RequestInfo,
        from_memory: bool,
    ) -> ControlFlow<Response<Body>, bool> {
        if !caller.memory {
            return ControlFlow::Continue(false);
        }
        let Some(shared) = &self.shared else {
            return ControlFlow::Continue(true);
        };
        let Some(user) = &caller.user else {
            return ControlFlow::Continue(false);
        };
        if !from_memory {
            return ControlFlow::Continue(false);
        }
        let attributes = kache_cache::rbac::Attributes::from_request(info, request.uri().path());
        match shared.authorizer.authorize(user, &attributes).await {
            Ok(decision) if decision.allowed => ControlFlow::Continue(true),
            Ok(decision) => ControlFlow::Break(self.fail(&ProxyError::Forbidden(Box::new(Denied {
                user: user.name.clone(),
                attributes,
                reason: decision.reason,
            })))),
            Err(error) => {
                tracing::warn!(%error, "no authorization decision; forwarding");
                ControlFlow::Continue(false)
            }
        }
    }

    /// Opt-in (`cache.serveStale`): a read the API server could not answer
    /// (`why`) is answered from a store that was in sync at most the
    /// configured time ago, with a `Warning` saying how far behind; in shared
    /// mode only if the caller is authorized for it (which, with the API
    /// server down, local RBAC can tell). `None`: the API server's failure
    /// stands.
    async fn answer_stale(
        &self,
        user: Option<&kache_cache::rbac::UserInfo>,
        info: &RequestInfo,
        (method, uri, headers): (&http::Method, &http::Uri, &http::HeaderMap),
        why: &'static str,
    ) -> Option<Response<Body>> {
        let max_staleness = self.serve_stale?;
        if let Some(shared) = &self.shared {
            let attributes = kache_cache::rbac::Attributes::from_request(info, uri.path());
            match shared.authorizer.authorize(user?, &attributes).await {
                Ok(decision) if decision.allowed => {}
                _ => return None,
            }
        }
        let (mut response, staleness) = if info.is_resource_request {
            let (answer, staleness) = self
                .cache
                .serve_stale(info, uri.query(), headers, max_staleness)
                .await
                .ok()?;
            (answer_response(answer), staleness)
        } else {
            let (mut parts, ()) = Request::new(()).into_parts();
            parts.method = method.clone();
            parts.uri = uri.clone();
            parts.headers = headers.clone();
            let (answer, staleness) = self.discovery.serve_stale(&parts, max_staleness)?;
            (answer.map(crate::body::full), staleness)
        };
        let warning = format!(
            "299 - \"the API server could not answer ({why}); served from kache's cache, {} s behind the API server\"",
            staleness.as_secs()
        );
        if let Ok(value) = http::HeaderValue::from_str(&warning) {
            response.headers_mut().append(http::header::WARNING, value);
        }
        self.metrics
            .stale_answers
            .get_or_create(&ErrorLabels { kind: why })
            .inc();
        tracing::warn!(
            why,
            staleness_s = staleness.as_secs(),
            "answered from memory while the API server could not"
        );
        Some(response)
    }

    /// A watch or another long-running answer ends cleanly when kache shuts
    /// down, so its connection can close within the drain; upgraded
    /// sessions (101) are closed at the drain's deadline instead.
    fn ending_at_shutdown(&self, response: Response<Body>, info: &RequestInfo) -> Response<Body> {
        if !info.is_long_running() || response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
            return response;
        }
        let shutdown = self.shutdown.clone();
        response.map(|body| crate::body::chunked(crate::body::EndAtShutdown::new(body, shutdown)))
    }

    /// The API server reads a resource write's body up to its limit
    /// (`limitedReadBody`); proxied bodies (`.../proxy/...`) are not its to limit.
    fn body_limit(&self, info: &RequestInfo) -> Option<u64> {
        let write = matches!(
            info.verb(),
            Verb::Create | Verb::Update | Verb::Patch | Verb::Delete | Verb::DeleteCollection
        );
        (info.is_resource_request && write && info.subresource != "proxy")
            .then_some(self.max_request_body_bytes)
    }

    fn fail(&self, error: &ProxyError) -> Response<Body> {
        self.metrics
            .errors
            .get_or_create(&ErrorLabels { kind: error.kind() })
            .inc();
        rescue(error)
    }
}

/// A request being answered: counted in flight, and recorded once, when
/// answered or when its client went away before the answer.
struct Tracked<'a> {
    metrics: &'a Metrics,
    span: tracing::Span,
    started: Instant,
    finished: bool,
    /// The client's ledger account, once the client is known.
    account: OnceLock<Arc<Account>>,
}

impl<'a> Tracked<'a> {
    fn start(metrics: &'a Metrics, span: tracing::Span, started: Instant) -> Tracked<'a> {
        metrics.in_flight.inc();
        Tracked {
            metrics,
            span,
            started,
            finished: false,
            account: OnceLock::new(),
        }
    }

    fn finish(&mut self, verb: Verb, outcome: Outcome, code: u16) {
        self.finished = true;
        self.record(verb, outcome, code);
    }

    fn record(&self, verb: Verb, outcome: Outcome, code: u16) {
        let elapsed = self.started.elapsed();
        self.metrics
            .requests
            .get_or_create(&RequestLabels { verb, code, outcome })
            .inc();
        self.metrics
            .duration
            .get_or_create(&VerbLabels { verb })
            .observe(elapsed.as_secs_f64());
        if let Some(account) = self.account.get() {
            account.answered(outcome, code);
            if outcome == Outcome::Forwarded {
                account.upstream_request();
            }
        }
        self.span.record("status", code);
        self.span.record("outcome", outcome.as_str());
        self.span.record("duration_ms", elapsed.as_secs_f64() * 1e3);
        self.span.in_scope(|| tracing::info!("answered"));
    }
}

impl Drop for Tracked<'_> {
    fn drop(&mut self) {
        self.metrics.in_flight.dec();
        if !self.finished {
            // 499, as proxies log a client that closed the request.
            self.record(Verb::Unknown, Outcome::Cancelled, CLIENT_CLOSED_REQUEST);
        }
    }
}

/// The status proxies record for a request whose client went away first.
const CLIENT_CLOSED_REQUEST: u16 = 499;

/// What the admit stage needs, owned, so that a coalesced call can take its
/// seat when (and only if) it is made.
struct Admission {
    limiter: Arc<Limiter>,
    /// Charged the seat's time.
    account: Arc<Account>,
    client: ClientKey,
    /// The authenticated user, for the limits' `users` rules.
    user: Option<String>,
    headers: http::HeaderMap,
    path: String,
    limits: forward::Limits,
}

impl Admission {
    async fn acquire(&self) -> Result<Permit, ProxyError> {
        let demand = Demand::new(
            &self.client,
            self.user.as_deref(),
            &self.headers,
            &self.path,
            self.limits.long_running,
        );
        let mut permit = self.limiter.acquire(demand).await?;
        permit.charge_to(Arc::clone(&self.account));
        Ok(permit)
    }
}

/// A cache answer as a response.
fn answer_response(answer: Answer) -> Response<Body> {
    match answer {
        Answer::Full(response) => response.map(crate::body::full),
        Answer::Stream(response) => response.map(|stream| {
            let frames = stream
                .map_ok(Frame::data)
                .map_err(|e| -> BoxError { Box::new(e) });
            crate::body::chunked(StreamBody::new(frames))
        }),
    }
}

/// Why the API server did not answer a forwarded request, in the terms of
/// `cache.serveStale`, or `None` if it did (an error status of its own
/// choosing, other than 429 and 5xx, is an answer).
fn upstream_could_not_answer(result: &Result<Response<Body>, Shared>) -> Option<&'static str> {
    match result {
        Ok(response) if response.status() == http::StatusCode::TOO_MANY_REQUESTS => Some("throttled"),
        Ok(response) if response.status().is_server_error() => Some("server_error"),
        Ok(_) => None,
        Err(error) => match error.as_ref() {
            ProxyError::UpstreamUnreachable(_) => Some("unreachable"),
            ProxyError::UpstreamTimeout(_) => Some("timeout"),
            ProxyError::UpstreamFailed(_) => Some("failed"),
            _ => None,
        },
    }
}

/// A failure owned by this request, or shared by the requests of a coalesced call.
enum Shared {
    Owned(ProxyError),
    Arc(Arc<ProxyError>),
}

impl AsRef<ProxyError> for Shared {
    fn as_ref(&self) -> &ProxyError {
        match self {
            Shared::Owned(error) => error,
            Shared::Arc(error) => error,
        }
    }
}

/// Classifies a request (once: every stage uses this) and records it on the
/// current span, with whether the API server's rules could classify it. A
/// request they cannot is still forwarded, alone: the API server answers
/// authoritatively.
fn classify(request: &Request<Incoming>) -> (RequestInfo, bool) {
    let uri = request.uri();
    let (info, understood) = match RequestInfo::parse(request.method().as_str(), uri.path(), uri.query()) {
        Ok(info) => (info, true),
        Err(_) => (RequestInfo::default(), false),
    };
    let span = tracing::Span::current();
    span.record("verb", info.verb().as_str());
    if info.is_resource_request {
        span.record("resource", info.resource_path().as_ref());
        if !info.namespace.is_empty() {
            span.record("namespace", info.namespace.as_str());
        }
    }
    (info, understood)
}
