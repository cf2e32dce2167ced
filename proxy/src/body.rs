//! The one body type that flows through the proxy, streamed end to end.

use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty, Full};
use kache_cache::chunk::Chunk;

/// Errors of any body in the pipeline.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A streamed body: the client's request body on its way up, the API server's
/// response body on its way down, an answer from memory (its frames are
/// [`Chunk`]s of several slices, written with one `writev`), or one of
/// kache's own small answers.
pub type Body = UnsyncBoxBody<Chunk, BoxError>;

/// A body of known bytes.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(Chunk::from(bytes.into()))
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An empty body.
pub fn empty() -> Body {
    Empty::<Chunk>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Boxes any body whose errors can be boxed, frame by frame (nothing is buffered).
pub fn stream<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_frame(|frame| frame.map_data(Chunk::from))
        .map_err(Into::into)
        .boxed_unsync()
}

/// Boxes a body already in [`Chunk`]s.
pub fn chunked<B>(body: B) -> Body
where
    B: http_body::Body<Data = Chunk> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

pin_project_lite::pin_project! {
    /// A response body on its way to the client, counted into the client's
    /// ledger account as it streams: bytes sent; for a forwarded answer, the
    /// same bytes as upstream response bytes; for a watch from memory, each
    /// event as an object.
    pub struct Counted<B> {
        #[pin]
        inner: B,
        account: std::sync::Arc<crate::ledger::Account>,
        upstream: bool,
        events: Option<kache_cache::reads::Events>,
    }
}

impl<B> Counted<B> {
    pub fn new(
        inner: B,
        account: std::sync::Arc<crate::ledger::Account>,
        upstream: bool,
        events: Option<kache_cache::reads::Events>,
    ) -> Counted<B> {
        Counted {
            inner,
            account,
            upstream,
            events,
        }
    }
}

impl<B: http_body::Body<Data = Chunk>> http_body::Body for Counted<B> {
    type Data = Chunk;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Chunk>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                this.account.sent(data.len());
                if *this.upstream {
                    this.account.upstream_bytes(data.len());
                }
                if let Some(events) = this.events {
                    this.account.sent_objects(events.take());
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// A long-running response (a watch, a log stream) that ends cleanly,
    /// after the frame in progress, once kache shuts down: clients see the
    /// stream end and re-watch elsewhere instead of waiting for a timeout.
    pub struct EndAtShutdown<B> {
        #[pin]
        inner: B,
        shutdown: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
        ended: bool,
    }
}

impl<B> EndAtShutdown<B> {
    pub fn new(inner: B, mut shutdown: tokio::sync::watch::Receiver<bool>) -> EndAtShutdown<B> {
        EndAtShutdown {
            inner,
            shutdown: Box::pin(async move {
                // A dropped sender means the process is going away too.
                let _ = shutdown.wait_for(|stop| *stop).await;
            }),
            ended: false,
        }
    }
}

impl<B: http_body::Body> http_body::Body for EndAtShutdown<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        let this = self.project();
        if *this.ended || this.shutdown.as_mut().poll(cx).is_ready() {
            *this.ended = true;
            return std::task::Poll::Ready(None);
        }
        this.inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }
}

/// Why a client's request body could not be sent on: the client's fault,
/// so the client gets a `4xx`, not the `502` of a broken upstream exchange.
#[derive(Debug, thiserror::Error)]
pub enum ClientBodyError {
    /// More bytes than the API server accepts for a write: its own `413` text.
    #[error("Request entity too large: limit is {0}")]
    TooLarge(u64),
    /// The body ended early or was malformed (bad chunked encoding, a reset).
    #[error("the request body could not be read: {0}")]
    Broken(BoxError),
}

pin_project_lite::pin_project! {
    /// A client's request body on its way upstream: counted against a limit,
    /// its failures marked as the client's.
    pub struct ClientBody<B> {
        #[pin]
        inner: B,
        limit: Option<u64>,
        seen: u64,
    }
}

impl<B> ClientBody<B> {
    pub fn new(inner: B, limit: Option<u64>) -> ClientBody<B> {
        ClientBody {
            inner,
            limit,
            seen: 0,
        }
    }
}

impl<B> http_body::Body for ClientBody<B>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, ClientBodyError>>> {
        let this = self.project();
        match std::task::ready!(this.inner.poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    *this.seen += data.len() as u64;
                    if let Some(limit) = *this.limit {
                        if *this.seen > limit {
                            return std::task::Poll::Ready(Some(Err(ClientBodyError::TooLarge(limit))));
                        }
                    }
                }
                std::task::Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(error)) => std::task::Poll::Ready(Some(Err(ClientBodyError::Broken(error.into())))),
            None => std::task::Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The client-body failure somewhere in an error's chain of sources, if any.
pub fn client_body_error<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a ClientBodyError> {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(found) = error.downcast_ref::<ClientBodyError>() {
            return Some(found);
        }
        current = error.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_long_running_body_ends_cleanly_at_shutdown() {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let (frames, frame_rx) =
            tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, std::io::Error>>(4);
        let stream =
            futures::stream::unfold(frame_rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
        let mut body = std::pin::pin!(EndAtShutdown::new(http_body_util::StreamBody::new(stream), rx));
        frames
            .send(Ok(http_body::Frame::data(Bytes::from("event 1\n"))))
            .await
            .expect("send");
        let first = body
            .frame()
            .await
            .expect("a frame")
            .expect("ok")
            .into_data()
            .expect("data");
        assert_eq!(first, "event 1\n");
        tx.send_replace(true);
        assert!(body.frame().await.is_none(), "the stream ends, without error");
        assert!(http_body::Body::is_end_stream(&*body));
    }

    #[tokio::test]
    async fn a_body_over_the_limit_fails_as_too_large_and_one_within_passes() {
        let chunks = || {
            futures::stream::iter(
                ["12345", "67890"].map(|c| Ok::<_, std::io::Error>(http_body::Frame::data(Bytes::from(c)))),
            )
        };
        let within = ClientBody::new(http_body_util::StreamBody::new(chunks()), Some(10));
        assert_eq!(within.collect().await.expect("within").to_bytes(), "1234567890");
        let over = ClientBody::new(http_body_util::StreamBody::new(chunks()), Some(9));
        let error = over.collect().await.expect_err("over");
        assert!(matches!(error, ClientBodyError::TooLarge(9)), "{error}");
        assert_eq!(error.to_string(), "Request entity too large: limit is 9");
    }

    #[tokio::test]
    async fn a_broken_body_is_the_clients_fault_and_found_in_an_error_chain() {
        let broken = futures::stream::iter([
            Ok(http_body::Frame::data(Bytes::from("{"))),
            Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "early eof",
            )),
        ]);
        let error = ClientBody::new(http_body_util::StreamBody::new(broken), None)
            .collect()
            .await
            .expect_err("broken");
        assert!(matches!(error, ClientBodyError::Broken(_)), "{error}");
        #[derive(Debug, thiserror::Error)]
        #[error("wrapper")]
        struct Wrapper(#[source] ClientBodyError);
        let wrapped = Wrapper(error);
        assert!(client_body_error(&wrapped).is_some());
        assert!(client_body_error(&std::io::Error::other("unrelated")).is_none());
    }
}
