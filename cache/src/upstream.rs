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

    /// Sends `request` and hands its body to `consume` chunk by chunk as it
    /// arrives, keeping none of it (a large LIST, read as it streams);
    /// returns the response head. No deadline on the whole body, only on
    /// its silences (the API server bounds the request itself). By default
    /// [`ApiClient::fetch`]'s whole body in one chunk.
    ///
    /// # Errors
    /// The request failed, the body broke off or stalled, or `consume` said
    /// stop.
    fn fetch_each<'a>(
        &'a self,
        request: http::Request<()>,
        consume: &'a mut (dyn FnMut(Bytes) -> Result<(), FetchError> + Send),
    ) -> BoxFuture<'a, Result<http::Response<()>, FetchError>> {
        Box::pin(async move {
            let (parts, body) = self.fetch(request).await?.into_parts();
            consume(body)?;
            Ok(http::Response::from_parts(parts, ()))
        })
    }

    /// Sends `request` and returns the response head as soon as it arrives,
    /// the body as a stream (for watches).
    fn stream(
        &self,
        request: http::Request<()>,
    ) -> BoxFuture<'_, Result<http::Response<ByteStream>, FetchError>>;
}
