//! Responses carrying the `Status` bodies of the answers kache gives itself
//! (the bodies are written by [`kache_cache::status`], shared with the
//! cache's own `NotFound`).

use http::{header, HeaderValue, Response, StatusCode};
pub use kache_cache::status::Details;
use kache_cache::status::Status;

use crate::body::{full, Body};

/// A failure response with a `Status` body. `retry_after` adds both the
/// `Retry-After` header and `details.retryAfterSeconds`, which client-go
/// honours by retrying.
pub fn failure(code: StatusCode, message: &str, retry_after: Option<u32>) -> Response<Body> {
    let mut status = Status::failure(code, message);
    if let Some(seconds) = retry_after {
        status = status.with_details(Details {
            retry_after_seconds: Some(seconds),
            ..Details::default()
        });
    }
    render(&status, retry_after)
}

/// A failure response with these `details` (always present, even when empty,
/// as the API server's `NewForbidden` gives them).
pub fn failure_with(code: StatusCode, message: &str, details: Details<'_>) -> Response<Body> {
    render(&Status::failure(code, message).with_details(details), None)
}

fn render(status: &Status<'_>, retry_after: Option<u32>) -> Response<Body> {
    let mut response = Response::new(full(status.to_json()));
    *response.status_mut() = status.code;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, private"),
    );
    if let Some(seconds) = retry_after {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn failures_carry_the_shared_status_body_and_retry_after() {
        let response = failure(StatusCode::SERVICE_UNAVAILABLE, "upstream down", Some(1));
        assert_eq!(response.status(), 503);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        let bytes = response.into_body().collect().await.expect("body").to_bytes();
        let expected =
            Status::failure(StatusCode::SERVICE_UNAVAILABLE, "upstream down").with_details(Details {
                retry_after_seconds: Some(1),
                ..Details::default()
            });
        assert_eq!(bytes, expected.to_json());
        let bare = failure(StatusCode::UNAUTHORIZED, "Unauthorized", None);
        assert!(!bare.headers().contains_key(header::RETRY_AFTER));
    }
}
