//! kache's own failures, and the one place (`rescue`) where they become
//! responses. Error responses of the API server are not kache errors: they
//! are forwarded byte for byte.

use std::time::Duration;

use http::{Response, StatusCode};

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
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("the API server is unreachable: {0}")]
    UpstreamUnreachable(#[source] BoxError),
    #[error("the API server did not answer within {0:?}")]
    UpstreamTimeout(Duration),
    #[error("cannot obtain credentials for the API server: {0}")]
    UpstreamCredentials(#[source] BoxError),
    #[error("the connection to the API server failed: {0}")]
    UpstreamFailed(#[source] BoxError),
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
            | ProxyError::BadRequest(_) => ErrorSource::Downstream,
            ProxyError::UpstreamUnreachable(_)
            | ProxyError::UpstreamTimeout(_)
            | ProxyError::UpstreamCredentials(_)
            | ProxyError::UpstreamFailed(_) => ErrorSource::Upstream,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::HostNotAccepted(_) | ProxyError::CrossOrigin(_) => StatusCode::FORBIDDEN,
            ProxyError::Unauthorized => StatusCode::UNAUTHORIZED,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::UpstreamUnreachable(_) | ProxyError::UpstreamCredentials(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
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
            ProxyError::BadRequest(_) => "bad_request",
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
    match error.source_side() {
        ErrorSource::Downstream => tracing::info!(%error, code = code.as_u16(), "rejected"),
        ErrorSource::Upstream => tracing::warn!(%error, code = code.as_u16(), "upstream failure"),
    }
    let retry_after = match error {
        ProxyError::UpstreamUnreachable(_) => Some(UNREACHABLE_RETRY_AFTER_SECONDS),
        _ => None,
    };
    status::failure(code, &error.to_string(), retry_after)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_maps_to_the_api_servers_code() {
        let io = || -> BoxError { "boom".into() };
        let cases = [
            (ProxyError::HostNotAccepted("evil".into()), 403),
            (ProxyError::CrossOrigin("https://evil".into()), 403),
            (ProxyError::Unauthorized, 401),
            (ProxyError::BadRequest("x".into()), 400),
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
                matches!(error, ProxyError::UpstreamUnreachable(_)),
                "{error}"
            );
        }
    }
}
