//! kache's own failures, and the one place (`rescue`) where they become
//! responses. Error responses of the API server are not kache errors: they
//! are forwarded byte for byte.

use std::time::Duration;

use http::{Response, StatusCode};

use crate::admit::Rejected;
use crate::body::{Body, BoxError};
use crate::status;

/// Which side of the proxy a failure came from, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorSource {
    /// The client sent something kache will not forward.
    Downstream,
    /// The API server could not be reached or broke the exchange.
    Upstream,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("Host {0:?} is not accepted by this proxy (see --accept-host)")]
    HostNotAccepted(String),
    #[error("cross-origin requests from {0:?} are not allowed")]
    CrossOrigin(String),
    #[error("Unauthorized: this proxy requires its access token")]
    Unauthorized,
    /// Shared mode: no valid credentials (the API server's own 401).
    #[error("Unauthorized")]
    Unauthenticated,
    /// Shared mode: the authorizer denied what kache would have answered
    /// itself, or an impersonation the client is not allowed.
    #[error("{}", .0.message())]
    Forbidden(Box<Denied>),
    /// A TokenReview or SubjectAccessReview could not be made.
    #[error("cannot verify the request with the API server: {0}")]
    Review(String),
    #[error("bad request: {0}")]
    BadRequest(String),
    /// A write's body over the API server's limit.
    #[error("Request entity too large: limit is {0}")]
    TooLarge(u64),
    /// The admit stage's concurrency limits said no (a queue was full, a wait
    /// timed out, too many long-running requests).
    #[error(transparent)]
    TooManyRequests(#[from] Rejected),
    #[error("the API server is unreachable: {0}")]
    UpstreamUnreachable(#[source] BoxError),
    #[error("the API server did not answer within {0:?}")]
    UpstreamTimeout(Duration),
    #[error("cannot obtain credentials for the API server: {0}")]
    UpstreamCredentials(#[source] BoxError),
    #[error("the connection to the API server failed: {0}")]
    UpstreamFailed(#[source] BoxError),
}

/// A request the authorizer refused: who, what, and the authorizers' reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    pub user: String,
    pub attributes: kache_cache::rbac::Attributes,
    pub reason: String,
}

impl Denied {
    fn message(&self) -> String {
        format!(
            "{} may not {} {}",
            self.user,
            self.attributes.verb,
            if self.attributes.resource_request {
                &self.attributes.resource
            } else {
                &self.attributes.path
            }
        )
    }
}

/// The `Retry-After` kache suggests when the API server is unreachable: short,
/// because client-go retries transparently and restarts are quick.
const UNREACHABLE_RETRY_AFTER_SECONDS: u32 = 1;

impl ProxyError {
    pub fn source_side(&self) -> ErrorSource {
        match self {
            ProxyError::HostNotAccepted(_)
            | ProxyError::CrossOrigin(_)
            | ProxyError::Unauthorized
            | ProxyError::Unauthenticated
            | ProxyError::Forbidden(_)
            | ProxyError::BadRequest(_)
            | ProxyError::TooLarge(_)
            | ProxyError::TooManyRequests(_) => ErrorSource::Downstream,
            ProxyError::UpstreamUnreachable(_)
            | ProxyError::UpstreamTimeout(_)
            | ProxyError::UpstreamCredentials(_)
            | ProxyError::UpstreamFailed(_)
            | ProxyError::Review(_) => ErrorSource::Upstream,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::HostNotAccepted(_) | ProxyError::CrossOrigin(_) => StatusCode::FORBIDDEN,
            ProxyError::Unauthorized | ProxyError::Unauthenticated => StatusCode::UNAUTHORIZED,
            ProxyError::Forbidden(_) => StatusCode::FORBIDDEN,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::UpstreamUnreachable(_)
            | ProxyError::UpstreamCredentials(_)
            | ProxyError::Review(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::UpstreamFailed(_) => StatusCode::BAD_GATEWAY,
        }
    }

    /// A label for metrics: bounded, stable names.
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyError::HostNotAccepted(_) => "host_not_accepted",
            ProxyError::CrossOrigin(_) => "cross_origin",
            ProxyError::Unauthorized => "unauthorized",
            ProxyError::Unauthenticated => "unauthenticated",
            ProxyError::Forbidden(_) => "forbidden",
            ProxyError::Review(_) => "review_failed",
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::TooLarge(_) => "request_too_large",
            ProxyError::TooManyRequests(_) => "too_many_requests",
            ProxyError::UpstreamUnreachable(_) => "upstream_unreachable",
            ProxyError::UpstreamTimeout(_) => "upstream_timeout",
            ProxyError::UpstreamCredentials(_) => "upstream_credentials",
            ProxyError::UpstreamFailed(_) => "upstream_failed",
        }
    }
}

/// Turns a failure into the response the client gets, and logs it (once, here).
pub fn rescue(error: &ProxyError) -> Response<Body> {
    let code = error.status();
    if let ProxyError::Forbidden(denied) = error {
        let a = &denied.attributes;
        tracing::info!(
            user = %denied.user,
            verb = %a.verb,
            group = %a.group,
            resource = %a.resource,
            subresource = %a.subresource,
            namespace = %a.namespace,
            name = %a.name,
            path = %a.path,
            reason = %denied.reason,
            "denied"
        );
        return crate::authz::forbidden(&denied.user, a, &denied.reason);
    }
    match error.source_side() {
        ErrorSource::Downstream => tracing::info!(%error, code = code.as_u16(), "rejected"),
        ErrorSource::Upstream => tracing::warn!(%error, code = code.as_u16(), "upstream failure"),
    }
    let retry_after = match error {
        ProxyError::UpstreamUnreachable(_) | ProxyError::Review(_) => Some(UNREACHABLE_RETRY_AFTER_SECONDS),
        ProxyError::TooManyRequests(rejected) => Some(rejected.retry_after),
        _ => None,
    };
    status::failure(code, &error.to_string(), retry_after)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admit::RejectReason;

    fn too_many(reason: RejectReason, retry_after: u32) -> ProxyError {
        ProxyError::TooManyRequests(Rejected {
            reason,
            class: "default".into(),
            retry_after,
        })
    }

    #[test]
    fn every_error_maps_to_the_api_servers_code() {
        let io = || -> BoxError { "boom".into() };
        let cases = [
            (ProxyError::HostNotAccepted("evil".into()), 403),
            (ProxyError::CrossOrigin("https://evil".into()), 403),
            (ProxyError::Unauthorized, 401),
            (ProxyError::Unauthenticated, 401),
            (ProxyError::Review("x".into()), 503),
            (ProxyError::BadRequest("x".into()), 400),
            (ProxyError::TooLarge(3), 413),
            (too_many(RejectReason::QueueFull, 1), 429),
            (ProxyError::UpstreamUnreachable(io()), 503),
            (ProxyError::UpstreamCredentials(io()), 503),
            (ProxyError::UpstreamTimeout(Duration::from_secs(1)), 504),
            (ProxyError::UpstreamFailed(io()), 502),
        ];
        for (error, code) in cases {
            let response = rescue(&error);
            assert_eq!(response.status().as_u16(), code, "{error}");
            assert_eq!(
                response.headers().contains_key(http::header::RETRY_AFTER),
                matches!(
                    error,
                    ProxyError::UpstreamUnreachable(_)
                        | ProxyError::TooManyRequests(_)
                        | ProxyError::Review(_)
                ),
                "{error}"
            );
        }
    }

    #[tokio::test]
    async fn rejections_by_the_limits_are_429_status_with_retry_after_and_the_reason() {
        use http_body_util::BodyExt;
        for (reason, retry_after, says) in [
            (RejectReason::QueueFull, 1, "queue is full"),
            (RejectReason::Timeout, 1, "waited too long"),
            (
                RejectReason::LongRunningLimit,
                5,
                "too many long-running requests",
            ),
        ] {
            let response = rescue(&too_many(reason, retry_after));
            assert_eq!(response.status(), 429);
            assert_eq!(
                response.headers()[http::header::RETRY_AFTER],
                retry_after.to_string()
            );
            let bytes = response.into_body().collect().await.expect("body").to_bytes();
            let status: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
            assert_eq!(status["kind"], "Status");
            assert_eq!(status["reason"], "TooManyRequests");
            assert_eq!(status["code"], 429);
            assert_eq!(status["details"]["retryAfterSeconds"], retry_after);
            let message = status["message"].as_str().expect("message");
            assert!(
                message.starts_with("too many requests, please try again later"),
                "{message}"
            );
            assert!(message.contains(says), "{message}");
            assert!(message.contains("\"default\""), "{message}");
        }
    }
}
