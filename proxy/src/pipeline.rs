//! The request path, written once, top to bottom. Each stage either lets the
//! request continue or answers it (`ControlFlow::Break`).
//!
//! ```text
//!   accept (server.rs) ─► identify ─► classify ─► route ─────────────────► respond
//!                         guard       RequestInfo  discovery cache         Status on errors,
//!                                                  object cache (rv=0…)    bodies streamed
//!                                                  admit: seats per client class
//!                                                  coalesced reads
//!                                                  else forward
//! ```

use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Instant;

use futures::TryStreamExt;
use http::{Request, Response};
use http_body_util::StreamBody;
use hyper::body::Frame;
use hyper::body::Incoming;
use kache_cache::discovery::{self, Discovery};
use kache_cache::resources::{Answer, Cache};
use kache_cache::RequestInfo;
use kache_config::ClientKeyConfig;
use tracing::{field, Instrument};

use crate::admit::{ClientKey, Demand, Limiter, Permit};
use crate::body::{Body, BoxError};
use crate::coalesce::{self, Coalescer};
use crate::error::{rescue, ProxyError};
use crate::forward;
use crate::guard::LocalGuard;
use crate::metrics::{ErrorLabels, Metrics, RequestLabels, VerbLabels};
use crate::upstream::Upstream;

/// Everything a request needs, shared by all connections.
pub struct Pipeline {
    guard: LocalGuard,
    client_key: ClientKeyConfig,
    discovery: Discovery,
    cache: Cache,
    limiter: Arc<Limiter>,
    coalescer: Coalescer,
    upstream: Upstream,
    metrics: Arc<Metrics>,
}

/// The parts a pipeline is built from.
pub struct Stages {
    pub guard: LocalGuard,
    pub client_key: ClientKeyConfig,
    pub discovery: Discovery,
    pub cache: Cache,
    pub limiter: Arc<Limiter>,
    pub coalescer: Coalescer,
    pub upstream: Upstream,
    pub metrics: Arc<Metrics>,
}

/// The upstream identity kache uses in local mode, as a coalescing key part:
/// every client's request goes up with the kubeconfig's credentials.
const LOCAL_IDENTITY: &str = "kubeconfig";

impl Pipeline {
    pub fn new(stages: Stages) -> Pipeline {
        let Stages {
            guard,
            client_key,
            discovery,
            cache,
            limiter,
            coalescer,
            upstream,
            metrics,
        } = stages;
        Pipeline {
            guard,
            client_key,
            discovery,
            cache,
            limiter,
            coalescer,
            upstream,
            metrics,
        }
    }

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
            client_key = field::Empty,
            duration_ms = field::Empty,
        );
        // Counted until answered, or until the client goes away and hyper
        // drops this future mid-way (the guard records that too).
        let mut tracked = Tracked::start(&self.metrics, span.clone(), started);
        let (verb, outcome, response) = self.run(peer, request).instrument(span).await;
        tracked.finish(verb, outcome, response.status().as_u16());
        response
    }

    /// The stages. Returns the verb and outcome for metrics along with the response.
    async fn run(
        &self,
        peer: SocketAddr,
        request: Request<Incoming>,
    ) -> (&'static str, &'static str, Response<Body>) {
        // identify: only clients this proxy is meant for get through; who they are.
        if let ControlFlow::Break(response) = self.identify(&request) {
            return ("unknown", "rejected", response);
        }
        let client = ClientKey::identify_with(peer, request.headers(), None, &self.client_key);
        tracing::Span::current().record("client_key", client.as_str());
        // classify: what the API server would call this request.
        let info = classify(&request);
        let verb = info.verb().as_str();
        // route: discovery and cacheable reads from memory, identical reads
        // coalesced, everything else to the upstream.
        let request = match self.route_discovery(request, &info).await {
            ControlFlow::Break(response) => return (verb, "discovery", response),
            ControlFlow::Continue(request) => request,
        };
        let request = match self.route_cache(request, &info).await {
            ControlFlow::Break(response) => return (verb, "cache", response),
            ControlFlow::Continue(request) => request,
        };
        // admit + respond: what reaches the upstream takes a seat of the
        // client's class (coalesced reads: one seat per upstream call, taken
        // by the call); the answer streams back, kache's failures as Status.
        let admission = Admission {
            limiter: self.limiter.clone(),
            client,
            headers: request.headers().clone(),
            path: request.uri().path().to_string(),
            long_running: info.is_long_running(),
        };
        let (outcome, result) = match coalesce::key_for(&request, LOCAL_IDENTITY) {
            Some(key) => {
                let upstream = self.upstream.clone();
                let (role, result) = self
                    .coalescer
                    .run(key, move || async move {
                        let permit = admission.acquire().await?;
                        forward::forward(&upstream, request, admission.long_running, Some(permit)).await
                    })
                    .await;
                (role.outcome(), result.map_err(Shared::Arc))
            }
            None => {
                let result = match admission.acquire().await {
                    Ok(permit) => {
                        forward::forward(&self.upstream, request, admission.long_running, Some(permit)).await
                    }
                    Err(error) => Err(error),
                };
                ("forwarded", result.map_err(Shared::Owned))
            }
        };
        match result {
            Ok(response) => {
                self.metrics.mark_ready();
                (verb, outcome, response)
            }
            Err(error) => {
                let outcome = match error.as_ref() {
                    ProxyError::TooManyRequests { .. } => "rejected",
                    _ => "error",
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
    ) -> ControlFlow<Response<Body>, Request<Incoming>> {
        if !info.is_resource_request || !info.verb().is_read() {
            return ControlFlow::Continue(request);
        }
        match self
            .cache
            .serve(info, request.uri().query(), request.headers())
            .await
        {
            Ok(Answer::Full(response)) => ControlFlow::Break(response.map(crate::body::full)),
            Ok(Answer::Stream(response)) => ControlFlow::Break(response.map(|stream| {
                let frames = stream
                    .map_ok(Frame::data)
                    .map_err(|e| -> BoxError { Box::new(e) });
                crate::body::stream(StreamBody::new(frames))
            })),
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

    fn identify(&self, request: &Request<Incoming>) -> ControlFlow<Response<Body>> {
        match self.guard.check(request) {
            Ok(()) => ControlFlow::Continue(()),
            Err(error) => ControlFlow::Break(self.fail(&error)),
        }
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
}

impl<'a> Tracked<'a> {
    fn start(metrics: &'a Metrics, span: tracing::Span, started: Instant) -> Tracked<'a> {
        metrics.in_flight.inc();
        Tracked {
            metrics,
            span,
            started,
            finished: false,
        }
    }

    fn finish(&mut self, verb: &'static str, outcome: &'static str, code: u16) {
        self.finished = true;
        self.record(verb, outcome, code);
    }

    fn record(&self, verb: &'static str, outcome: &'static str, code: u16) {
        let elapsed = self.started.elapsed();
        self.metrics
            .requests
            .get_or_create(&RequestLabels { verb, code, outcome })
            .inc();
        self.metrics
            .duration
            .get_or_create(&VerbLabels { verb })
            .observe(elapsed.as_secs_f64());
        self.span.record("status", code);
        self.span.record("outcome", outcome);
        self.span.record("duration_ms", elapsed.as_secs_f64() * 1e3);
        self.span.in_scope(|| tracing::info!("answered"));
    }
}

impl Drop for Tracked<'_> {
    fn drop(&mut self) {
        self.metrics.in_flight.dec();
        if !self.finished {
            // 499, as proxies log a client that closed the request.
            self.record("unknown", "cancelled", CLIENT_CLOSED_REQUEST);
        }
    }
}

/// The status proxies record for a request whose client went away first.
const CLIENT_CLOSED_REQUEST: u16 = 499;

/// What the admit stage needs, owned, so that a coalesced call can take its
/// seat when (and only if) it is made.
struct Admission {
    limiter: Arc<Limiter>,
    client: ClientKey,
    headers: http::HeaderMap,
    path: String,
    long_running: bool,
}

impl Admission {
    async fn acquire(&self) -> Result<Permit, ProxyError> {
        let demand = Demand::new(&self.client, None, &self.headers, &self.path, self.long_running);
        self.limiter.acquire(demand).await
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

/// Classifies a request and records it on the current span. A path the API
/// server itself cannot classify is still forwarded: it answers authoritatively.
fn classify(request: &Request<Incoming>) -> RequestInfo {
    let uri = request.uri();
    let info = RequestInfo::parse(request.method().as_str(), uri.path(), uri.query()).unwrap_or_default();
    let span = tracing::Span::current();
    span.record("verb", info.verb().as_str());
    if info.is_resource_request {
        span.record("resource", info.resource_path().as_ref());
        if !info.namespace.is_empty() {
            span.record("namespace", info.namespace.as_str());
        }
    }
    info
}
