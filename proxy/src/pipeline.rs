//! The request path, written once, top to bottom. Each stage either lets the
//! request continue or answers it (`ControlFlow::Break`).
//!
//! ```text
//!   accept (server.rs) ─► identify ─► classify ─► route ────────────► respond
//!                         guard       RequestInfo  discovery cache    Status on errors,
//!                                                  else forward       bodies streamed
//! ```

use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Instant;

use http::{Request, Response};
use hyper::body::Incoming;
use kache_cache::discovery::{self, Discovery};
use kache_cache::RequestInfo;
use tracing::{field, Instrument};

use crate::body::Body;
use crate::error::{rescue, ProxyError};
use crate::forward;
use crate::guard::LocalGuard;
use crate::metrics::{ErrorLabels, Metrics, RequestLabels, VerbLabels};
use crate::upstream::Upstream;

/// Everything a request needs, shared by all connections.
pub struct Pipeline {
    guard: LocalGuard,
    discovery: Discovery,
    upstream: Upstream,
    metrics: Arc<Metrics>,
}

impl Pipeline {
    pub fn new(
        guard: LocalGuard,
        discovery: Discovery,
        upstream: Upstream,
        metrics: Arc<Metrics>,
    ) -> Pipeline {
        Pipeline {
            guard,
            discovery,
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
            duration_ms = field::Empty,
        );
        self.metrics.in_flight.inc();
        let (verb, outcome, response) = self.run(request).instrument(span.clone()).await;
        self.metrics.in_flight.dec();

        let elapsed = started.elapsed();
        let code = response.status().as_u16();
        self.metrics
            .requests
            .get_or_create(&RequestLabels { verb, code, outcome })
            .inc();
        self.metrics
            .duration
            .get_or_create(&VerbLabels { verb })
            .observe(elapsed.as_secs_f64());
        span.record("status", code);
        span.record("outcome", outcome);
        span.record("duration_ms", elapsed.as_secs_f64() * 1e3);
        span.in_scope(|| tracing::info!("answered"));
        response
    }

    /// The stages. Returns the verb and outcome for metrics along with the response.
    async fn run(&self, request: Request<Incoming>) -> (&'static str, &'static str, Response<Body>) {
        // identify: only clients this proxy is meant for get through.
        if let ControlFlow::Break(response) = self.identify(&request) {
            return ("unknown", "rejected", response);
        }
        // classify: what the API server would call this request.
        let info = classify(&request);
        let verb = info.verb().as_str();
        // route: discovery from its cache; everything else to the upstream.
        let request = match self.route_discovery(request, &info).await {
            ControlFlow::Break(response) => return (verb, "discovery", response),
            ControlFlow::Continue(request) => request,
        };
        // respond: stream the upstream's answer, or a Status for kache's own failures.
        match forward::forward(&self.upstream, request, info.is_long_running()).await {
            Ok(response) => {
                self.metrics.mark_ready();
                (verb, "forwarded", response)
            }
            Err(error) => (verb, "error", self.fail(&error)),
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
