//! The admin listener: `/livez`, `/readyz`, `/metrics`, `/debug/cache`,
//! `/debug/clients` (the cost ledger). Kept off the main listener, which
//! forwards those paths to the API server like any other.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use http::{header, HeaderValue, Request, Response, StatusCode};

use kache_cache::rbac::Rbac;
use kache_cache::resources::Cache;

use crate::body::{full, Body};
use crate::ledger::Ledger;
use crate::metrics::Metrics;

/// Clients `/debug/clients` lists by default (`?limit=N`, at most
/// [`MAX_CLIENTS_LISTED`]); the rest are aggregated.
const CLIENTS_LISTED: usize = 20;
const MAX_CLIENTS_LISTED: usize = 1000;

/// What the admin endpoints read.
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub cache: Cache,
    pub ledger: Arc<Ledger>,
    /// Shared mode's RBAC evaluator: a new replica is not ready before it
    /// has the RBAC objects once (else every answer from memory would need a
    /// SubjectAccessReview). Later resyncs do not take readiness away: the
    /// reviews keep answers right meanwhile.
    pub rbac: Option<Rbac>,
    pub rbac_synced_once: AtomicBool,
}

impl AdminState {
    /// Why kache is not ready, or `None` when it is.
    fn not_ready(&self) -> Option<&'static str> {
        if !self.metrics.is_ready() {
            return Some("the API server has not answered yet");
        }
        if !self.cache.warm_started() {
            return Some("the cache is restoring its snapshots");
        }
        if let Some(rbac) = &self.rbac {
            if !self.rbac_synced_once.load(Ordering::Relaxed) {
                if !rbac.is_synced() {
                    return Some("the RBAC objects are not synced yet");
                }
                self.rbac_synced_once.store(true, Ordering::Relaxed);
            }
        }
        None
    }
}

/// Answers an admin request.
pub fn handle<B>(state: &AdminState, request: &Request<B>) -> Response<Body> {
    let metrics = &state.metrics;
    let (code, content_type, text) = match request.uri().path() {
        "/livez" | "/healthz" => (StatusCode::OK, "text/plain; charset=utf-8", "ok".to_string()),
        "/readyz" => match state.not_ready() {
            None => (StatusCode::OK, "text/plain; charset=utf-8", "ok".to_string()),
            Some(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain; charset=utf-8",
                why.to_string(),
            ),
        },
        "/debug/cache" => (
            StatusCode::OK,
            "application/json",
            serde_json::to_string_pretty(&state.cache.debug_view()).expect("invariant: a Value serializes"),
        ),
        "/debug/clients" => {
            let limit = request
                .uri()
                .query()
                .into_iter()
                .flat_map(|q| q.split('&'))
                .find_map(|pair| pair.strip_prefix("limit="))
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(CLIENTS_LISTED)
                .min(MAX_CLIENTS_LISTED);
            (
                StatusCode::OK,
                "application/json",
                serde_json::to_string_pretty(&state.ledger.view(limit))
                    .expect("invariant: the view serializes"),
            )
        }
        "/metrics" => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found".to_string(),
        ),
    };
    let mut response = Response::new(full(text));
    *response.status_mut() = code;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use kache_cache::discovery::{Discovery, DiscoveryMetrics};
    use kache_cache::resources::CacheMetrics;
    use kache_cache::upstream::{ApiClient, BoxFuture, ByteStream, FetchError};

    /// An upstream that is never reached.
    struct Unreachable;

    impl ApiClient for Unreachable {
        fn fetch(&self, _: Request<()>) -> BoxFuture<'_, Result<Response<bytes::Bytes>, FetchError>> {
            Box::pin(async { Err(FetchError("unreachable".into())) })
        }
        fn stream(&self, _: Request<()>) -> BoxFuture<'_, Result<Response<ByteStream>, FetchError>> {
            Box::pin(async { Err(FetchError("unreachable".into())) })
        }
    }

    fn state() -> AdminState {
        let client: Arc<dyn ApiClient> = Arc::new(Unreachable);
        let discovery = Discovery::new(client.clone(), Default::default(), DiscoveryMetrics::default());
        AdminState {
            metrics: Arc::new(Metrics::new()),
            cache: Cache::new(client, discovery, Default::default(), CacheMetrics::default()),
            ledger: Arc::new(Ledger::default()),
            rbac: None,
            rbac_synced_once: AtomicBool::new(false),
        }
    }

    #[tokio::test]
    async fn the_clients_view_lists_the_top_clients_and_aggregates_the_rest() {
        use http_body_util::BodyExt;
        let state = state();
        for (name, calls) in [("a", 3), ("b", 2), ("c", 1)] {
            let account = state.ledger.account(&crate::admit::ClientKey::new(name));
            for _ in 0..calls {
                account.answered(crate::metrics::Outcome::Forwarded, 200);
                account.upstream_request();
            }
        }
        let response = get(&state, "/debug/clients?limit=2");
        assert_eq!(response.status(), 200);
        let bytes = response.into_body().collect().await.expect("body").to_bytes();
        let view: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
        assert_eq!(view["tracked"], 3);
        let clients: Vec<_> = view["clients"]
            .as_array()
            .expect("clients")
            .iter()
            .map(|c| c["client"].clone())
            .collect();
        assert_eq!(clients, ["a", "b"]);
        assert_eq!(view["clients"][0]["upstreamRequests"], 3);
        assert_eq!(view["clients"][0]["requests"]["forwarded"], 3);
        assert_eq!(view["others"]["clients"], 1);
        assert_eq!(view["others"]["upstreamRequests"], 1);
    }

    fn get(state: &AdminState, path: &str) -> Response<Body> {
        handle(state, &Request::get(path).body(()).expect("request"))
    }

    #[tokio::test]
    async fn readiness_follows_the_upstream() {
        let state = state();
        assert_eq!(get(&state, "/livez").status(), 200);
        assert_eq!(get(&state, "/readyz").status(), 503);
        state.metrics.mark_ready();
        assert_eq!(get(&state, "/readyz").status(), 200);
        assert_eq!(get(&state, "/metrics").status(), 200);
        assert_eq!(get(&state, "/nope").status(), 404);
    }

    #[tokio::test]
    async fn shared_mode_is_ready_once_the_rbac_objects_were_synced() {
        let mut state = state();
        let rbac = Rbac::new(Arc::new(Unreachable));
        state.rbac = Some(rbac);
        state.metrics.mark_ready();
        assert_eq!(get(&state, "/readyz").status(), 503, "RBAC not synced");
        state.rbac = Some(Rbac::from_objects([]));
        assert_eq!(get(&state, "/readyz").status(), 200);
        state.rbac = Some(Rbac::new(Arc::new(Unreachable)));
        assert_eq!(
            get(&state, "/readyz").status(),
            200,
            "a later resync keeps readiness"
        );
    }

    #[tokio::test]
    async fn the_cache_debug_view_is_json() {
        use http_body_util::BodyExt;
        let response = get(&state(), "/debug/cache");
        assert_eq!(response.status(), 200);
        let body = response.into_body().collect().await.expect("body").to_bytes();
        let view: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(view["resources"], serde_json::json!([]));
        assert_eq!(view["enabled"], true);
    }
}
