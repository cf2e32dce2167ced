//! The small interface through which the caches talk to the API server, so
//! they can be tested without a network. The proxy implements it over its
//! real upstream connection (kache's own identity, identity encoding).

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use futures::Stream;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A response body arriving chunk by chunk (watch streams).
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, FetchError>> + Send>>;

/// The API server could not be asked, or broke the exchange. Responses with
/// error status codes are not `FetchError`s: they are answers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FetchError(pub String);

/// Requests the caches make to the API server.
pub trait ApiClient: Send + Sync + 'static {
    /// Sends `request` (a path and query, headers; no body) and returns the
    /// whole response.
    fn fetch(&self, request: http::Request<()>) -> BoxFuture<'_, Result<http::Response<Bytes>, FetchError>>;

    /// [`ApiClient::fetch`], showing the body to `observe` chunk by chunk as
    /// it arrives (a long LIST's progress). By default the whole body at
    /// once, when it is complete.
    fn fetch_observed<'a>(
        &'a self,
        request: http::Request<()>,
        observe: &'a mut (dyn FnMut(&[u8]) + Send),
    ) -> BoxFuture<'a, Result<http::Response<Bytes>, FetchError>> {
        Box::pin(async move {
            let response = self.fetch(request).await?;
            observe(response.body());
            Ok(response)
        })
    }

    /// Sends `request` and returns the response head as soon as it arrives,
    /// the body as a stream (for watches).
    fn stream(
        &self,
        request: http::Request<()>,
    ) -> BoxFuture<'_, Result<http::Response<ByteStream>, FetchError>>;
}
