//! Listeners: the accept loop, TLS, HTTP/1.1 and HTTP/2 on one port, the
//! limits that keep bad clients from hurting the process, and graceful
//! shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

use crate::authn::Connection;
use crate::body::Body;

/// A client that has not finished its TLS handshake by then is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long in-flight requests get to finish at shutdown; watches never
/// finish by themselves, so this is a bound, not a wait for all.
pub const GRACEFUL_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Connection-level settings of one listener.
#[derive(Clone)]
pub struct ListenerSettings {
    pub name: &'static str,
    pub tls: Option<TlsAcceptor>,
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    /// Connections open at once; at the cap, no new one is accepted until
    /// one closes (they wait in the kernel's backlog).
    pub max_connections: usize,
}

/// Serves `handler` on `listener` until `shutdown` turns true.
pub async fn serve<H, F>(
    listener: TcpListener,
    settings: ListenerSettings,
    handler: H,
    mut shutdown: watch::Receiver<bool>,
) where
    H: Fn(SocketAddr, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .max_buf_size(settings.max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(settings.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let builder = Arc::new(builder);
    // Every connection task holds a clone of `open`; when all are dropped,
    // `closed` yields None: the connections are gone.
    let (open, mut closed) = mpsc::channel::<()>(1);

    let slots = Arc::new(tokio::sync::Semaphore::new(settings.max_connections));
    // At most one warning per interval while the cap keeps being reached.
    let mut last_warning: Option<tokio::time::Instant> = None;
    loop {
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                if last_warning.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
                    tracing::warn!(
                        listener = settings.name,
                        max_connections = settings.max_connections,
                        "at the connection cap: not accepting until a connection closes"
                    );
                    last_warning = Some(tokio::time::Instant::now());
                }
                tokio::select! {
                    slot = slots.clone().acquire_owned() => slot.expect("invariant: the semaphore is never closed"),
                    _ = async { shutdown.wait_for(|stop| *stop).await.map(|_| ()) } => break,
                }
            }
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(listener = settings.name, %error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = async { shutdown.wait_for(|stop| *stop).await.map(|_| ()) } => break,
        };
        stream.set_nodelay(true).ok();
        let settings = settings.clone();
        let builder = builder.clone();
        let handler = handler.clone();
        let open = open.clone();
        let shutdown = shutdown.clone();
        let span = tracing::debug_span!("connection", listener = settings.name, client = %peer);
        tokio::spawn(
            async move {
                // What the connection shows of its identity (verified client
                // certificates, the last token) goes with each of its requests.
                let service = |connection: Arc<Connection>| {
                    service_fn(move |mut request: Request<Incoming>| {
                        request.extensions_mut().insert(connection.clone());
                        // Boxed: hyper keeps a slot the size of the service's
                        // future for as long as an HTTP/1 connection is open,
                        // not only while a request runs, and the pipeline's
                        // future is tens of kilobytes: every idle keep-alive
                        // connection and every watch would hold that much.
                        let response: Pin<Box<dyn Future<Output = Response<Body>> + Send>> =
                            Box::pin(handler(peer, request));
                        async move { Ok::<_, std::convert::Infallible>(response.await) }
                    })
                };
                match settings.tls {
                    None => {
                        serve_io(
                            &builder,
                            shutdown,
                            stream,
                            service(Arc::new(Connection::new(None))),
                        )
                        .await
                    }
                    Some(acceptor) => {
                        if let Some(tls) = tls_accept(&acceptor, stream).await {
                            let certificates = tls
                                .get_ref()
                                .1
                                .peer_certificates()
                                .map(|chain| chain.iter().map(|c| c.clone().into_owned()).collect());
                            let connection = Arc::new(Connection::new(certificates));
                            // Boxed: the task of every connection is as large as
                            // its largest state, and a TLS stream's is 2.4 KB
                            // more than a plain one's.
                            Box::pin(serve_io(&builder, shutdown, tls, service(connection))).await
                        }
                    }
                }
                drop(open);
                drop(slot);
            }
            .instrument(span),
        );
    }

    drop(listener);
    drop(open);
    if tokio::time::timeout(GRACEFUL_SHUTDOWN_TIMEOUT, closed.recv())
        .await
        .is_err()
    {
        tracing::info!(
            listener = settings.name,
            "closing connections still open after the grace period"
        );
    }
}

async fn tls_accept(
    acceptor: &TlsAcceptor,
    stream: TcpStream,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(error)) => {
            tracing::debug!(%error, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!("TLS handshake timed out");
            None
        }
    }
}

async fn serve_io<I, S>(
    builder: &auto::Builder<TokioExecutor>,
    mut shutdown: watch::Receiver<bool>,
    io: I,
    service: S,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            Request<Incoming>,
            Response = Response<Body>,
            Error = std::convert::Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = async { shutdown.wait_for(|stop| *stop).await.map(|_| ()) } => {
            // Finish in-flight requests, take no new ones.
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = result {
        // Malformed requests, oversize headers, slow clients, resets: the
        // connection ends (hyper answered 400/431 where it could); kache goes on.
        tracing::debug!(%error, "connection ended with an error");
    }
}
