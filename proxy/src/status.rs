//! Kubernetes `Status` bodies for the answers kache gives itself, shaped
//! exactly like the API server's (`metav1.Status`), so clients print them.

use http::{header, HeaderValue, Response, StatusCode};
use serde::Serialize;

use crate::body::{full, Body};

/// `metav1.Status`, as the API server serializes a failure.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Status<'a> {
    kind: &'static str,
    api_version: &'static str,
    metadata: Empty,
    status: &'static str,
    message: &'a str,
    reason: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<Details>,
    code: u16,
}

#[derive(Debug, Serialize)]
struct Empty {}

/// `metav1.StatusDetails`: empty fields are left out, as Go's `omitempty` does.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Details {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub group: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<u32>,
}

/// The `StatusReason` the API server uses for a code (metav1.StatusReason*).
pub fn reason_for(code: StatusCode) -> &'static str {
    match code.as_u16() {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        406 => "NotAcceptable",
        409 => "Conflict",
        410 => "Expired",
        413 => "RequestEntityTooLarge",
        415 => "UnsupportedMediaType",
        422 => "Invalid",
        429 => "TooManyRequests",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "InternalError",
    }
}

/// A failure response with a `Status` body. `retry_after` adds both the
/// `Retry-After` header and `details.retryAfterSeconds`, which client-go
/// honours by retrying.
pub fn failure(code: StatusCode, message: &str, retry_after: Option<u32>) -> Response<Body> {
    let details = retry_after.map(|s| Details {
        retry_after_seconds: Some(s),
        ..Details::default()
    });
    render(code, message, details, retry_after)
}

/// A failure response with these `details` (always present, even when empty,
/// as the API server's `NewForbidden` gives them).
pub fn failure_with(code: StatusCode, message: &str, details: Details) -> Response<Body> {
    render(code, message, Some(details), None)
}

fn render(
    code: StatusCode,
    message: &str,
    details: Option<Details>,
    retry_after: Option<u32>,
) -> Response<Body> {
    let status = Status {
        kind: "Status",
        api_version: "v1",
        metadata: Empty {},
        status: "Failure",
        message,
        reason: reason_for(code),
        details,
        code: code.as_u16(),
    };
    let mut bytes = serde_json::to_vec(&status).expect("invariant: Status always serializes");
    bytes.push(b'\n');
    let mut response = Response::new(full(bytes));
    *response.status_mut() = code;
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
    async fn failure_bodies_match_the_api_servers_status() {
        let response = failure(StatusCode::SERVICE_UNAVAILABLE, "upstream down", Some(1));
        assert_eq!(response.status(), 503);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        let bytes = response.into_body().collect().await.expect("body").to_bytes();
        let value: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
        assert_eq!(
            value,
            serde_json::json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "upstream down", "reason": "ServiceUnavailable",
                "details": {"retryAfterSeconds": 1}, "code": 503
            })
        );
    }

    #[test]
    fn reasons_follow_metav1() {
        assert_eq!(reason_for(StatusCode::BAD_REQUEST), "BadRequest");
        assert_eq!(reason_for(StatusCode::GATEWAY_TIMEOUT), "Timeout");
        assert_eq!(reason_for(StatusCode::BAD_GATEWAY), "InternalError");
        assert_eq!(reason_for(StatusCode::TOO_MANY_REQUESTS), "TooManyRequests");
    }
}
