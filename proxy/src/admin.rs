//! The admin listener: `/livez`, `/readyz`, `/metrics`. Kept off the main
//! listener, which forwards those paths to the API server like any other.

use std::sync::Arc;

use http::{header, HeaderValue, Request, Response, StatusCode};

use crate::body::{full, Body};
use crate::metrics::Metrics;

/// Answers an admin request.
pub fn handle<B>(metrics: &Arc<Metrics>, request: &Request<B>) -> Response<Body> {
    let (code, content_type, text) = match request.uri().path() {
        "/livez" | "/healthz" => (StatusCode::OK, "text/plain; charset=utf-8", "ok".to_string()),
        "/readyz" if metrics.is_ready() => (StatusCode::OK, "text/plain; charset=utf-8", "ok".to_string()),
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain; charset=utf-8",
            "the API server has not answered yet".to_string(),
        ),
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

    fn get(metrics: &Arc<Metrics>, path: &str) -> StatusCode {
        handle(metrics, &Request::get(path).body(()).expect("request")).status()
    }

    #[test]
    fn readiness_follows_the_upstream() {
        let metrics = Arc::new(Metrics::new());
        assert_eq!(get(&metrics, "/livez"), 200);
        assert_eq!(get(&metrics, "/readyz"), 503);
        metrics.mark_ready();
        assert_eq!(get(&metrics, "/readyz"), 200);
        assert_eq!(get(&metrics, "/metrics"), 200);
        assert_eq!(get(&metrics, "/nope"), 404);
    }
}
