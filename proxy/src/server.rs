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
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

use crate::authn::Connection;
use crate::body::Body;
use crate::socket::Socket;

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
    let protocols = Arc::new(Protocols::new(&settings));
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
        let protocols = protocols.clone();
        let handler = handler.clone();
        let open = open.clone();
        let shutdown = shutdown.clone();
        let span = tracing::debug_span!("connection", listener = settings.name, client = %peer);
        tokio::spawn(
            async move {
                connection(stream, peer, settings, protocols, handler, shutdown).await;
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

/// Serves one accepted client until its connection ends.
///
/// The future is what kache holds for every open connection, each idle
/// keep-alive client and each watcher: its states are kept apart from the
/// plain HTTP/1 one where they are larger (see
/// `a_plain_connection_task_stays_small`).
async fn connection<H, F>(
    stream: TcpStream,
    peer: SocketAddr,
    settings: ListenerSettings,
    protocols: Arc<Protocols>,
    handler: H,
    shutdown: watch::Receiver<bool>,
) where
    H: Fn(SocketAddr, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    // What the connection shows of its identity (verified client
    // certificates, the last token) goes with each of its requests.
    let service = |connection: Arc<Connection>| {
        service_fn(move |mut request: Request<Incoming>| {
            request.extensions_mut().insert(connection.clone());
            // Boxed: hyper keeps a slot the size of the service's future for
            // as long as an HTTP/1 connection is open, not only while a
            // request runs, and the pipeline's future is 9 KB: every idle
            // keep-alive connection and every watch would hold that much.
            let response: Pin<Box<dyn Future<Output = Response<Body>> + Send>> =
                Box::pin(handler(peer, request));
            async move { Ok::<_, std::convert::Infallible>(response.await) }
        })
    };
    match settings.tls {
        None => {
            if let Some(version) = detect(&stream, settings.header_read_timeout).await {
                // Lists go by `sendfile` on plain HTTP/1 only: HTTP/2 would
                // send a file in 16 KB frames, each a write of its own after
                // its frame header.
                let connection = match version {
                    Version::Http1 => Connection::zero_copy(),
                    Version::Http2 => Connection::new(None),
                };
                let service = service(Arc::new(connection));
                protocols
                    .serve(version, Socket::new(stream), service, shutdown)
                    .await;
            }
        }
        // Boxed, as every state but plain HTTP/1's (the TLS handshake, TLS
        // streams, HTTP/2): a connection's task is as large as its largest
        // state, and this one's (the TLS stream alone is 1.2 KB) would be
        // every plain connection's as well.
        Some(acceptor) => {
            Box::pin(async move {
                if let Some(tls) = tls_accept(&acceptor, stream).await {
                    let (tls, version, certificates) = negotiated(tls);
                    let service = service(Arc::new(Connection::new(certificates)));
                    // Boxed apart: `serve` keeps its arguments for as long
                    // as it runs.
                    protocols.serve(version, Box::pin(tls), service, shutdown).await;
                }
            })
            .await
        }
    }
}

type TlsStream = tokio_rustls::server::TlsStream<TcpStream>;

async fn tls_accept(acceptor: &TlsAcceptor, stream: TcpStream) -> Option<TlsStream> {
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

/// What a TLS client settled in its handshake: the HTTP version ALPN chose
/// (RFC 9113 §3.2) and its verified certificates. The stream goes in and
/// out by value: borrowed in the connection's task, it would keep a slot
/// there across every later await.
fn negotiated(tls: TlsStream) -> (TlsStream, Version, Option<Vec<CertificateDer<'static>>>) {
    let (_, session) = tls.get_ref();
    let certificates = session
        .peer_certificates()
        .map(|chain| chain.iter().map(|c| c.clone().into_owned()).collect());
    let version = match session.alpn_protocol() {
        Some(b"h2") => Version::Http2,
        _ => Version::Http1,
    };
    (tls, version, certificates)
}

/// The HTTP versions kache serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    Http1,
    Http2,
}

/// The client's first bytes on a cleartext HTTP/2 connection (prior
/// knowledge, RFC 9113 §3.3).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Which HTTP version a cleartext client speaks, from its first bytes,
/// looked at without taking them (so the connection's own reader gets its
/// request whole, in one read); `None` if it closes or says nothing in time.
///
/// hyper-util's `auto` builder does the same by reading them and handing
/// them back first, which made every HTTP/1 connection's read buffer grow
/// to 16 KB on its second read, and sized every connection's task for the
/// HTTP/2 state as well: 5 KB more resident per idle connection (23 KB
/// against 18), so per watcher.
async fn detect(stream: &TcpStream, timeout: Duration) -> Option<Version> {
    let detect = async {
        let mut first = [0u8; PREFACE.len()];
        loop {
            let n = stream.peek(&mut first).await.ok()?;
            if n == 0 {
                return None;
            }
            if first[..n] != PREFACE[..n] {
                return Some(Version::Http1);
            }
            if n == PREFACE.len() {
                return Some(Version::Http2);
            }
            // A part of the preface: peeking again at once would see the
            // same bytes; let the rest arrive.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(timeout, detect).await.ok().flatten()
}

/// The HTTP/1 and HTTP/2 connection settings of a listener.
struct Protocols {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
}

impl Protocols {
    fn new(settings: &ListenerSettings) -> Protocols {
        // Go's server reads a request's head through a limit of
        // `MaxHeaderBytes` + 4096 ("bufio slop", `initialReadLimitSize`) and
        // answers 431 past it: the API server takes a 1 MiB + 4 KB head. The
        // head's size is checked once parsed (`max_header_size`), so the
        // limit does not depend on how the bytes were cut into reads.
        let head_limit = settings.max_header_bytes + 4096;
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(settings.header_read_timeout)
            .max_header_size(head_limit)
            .max_buf_size(head_limit);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(settings.max_header_bytes).unwrap_or(u32::MAX))
            .keep_alive_interval(Some(Duration::from_secs(30)));
        Protocols { http1, http2 }
    }

    /// Serves `io` in `version` until the connection ends; once kache shuts
    /// down, it finishes its in-flight requests and takes no new ones.
    async fn serve<I, S>(&self, version: Version, io: I, service: S, shutdown: watch::Receiver<bool>)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: hyper::service::Service<
                Request<Incoming>,
                Response = Response<Body>,
                Error = std::convert::Infallible,
            > + Send
            + 'static,
        S::Future: Send + 'static,
    {
        let io = TokioIo::new(io);
        match version {
            Version::Http1 => {
                let connection = std::pin::pin!(self.http1.serve_connection(io, service).with_upgrades());
                drive(connection, shutdown, |c| c.graceful_shutdown()).await;
            }
            // Boxed: see `connection`.
            Version::Http2 => {
                let mut connection = Box::pin(self.http2.serve_connection(io, service));
                drive(connection.as_mut(), shutdown, |c| c.graceful_shutdown()).await;
            }
        }
    }
}

/// Drives a connection until it ends, or until kache shuts down and it has
/// finished its in-flight requests.
///
/// The connection is pinned where its caller holds it: an async fn keeps
/// its arguments for as long as it runs, so one taken by value and pinned
/// here would be held twice, in every connection's task (hyper's HTTP/1
/// connection is 640 bytes).
async fn drive<C>(
    mut connection: Pin<&mut C>,
    mut shutdown: watch::Receiver<bool>,
    graceful: impl FnOnce(Pin<&mut C>),
) where
    C: Future<Output = Result<(), hyper::Error>>,
{
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = async { shutdown.wait_for(|stop| *stop).await.map(|_| ()) } => {
            graceful(connection.as_mut());
            connection.await
        }
    };
    if let Err(error) = result {
        // Malformed requests, oversize headers, slow clients, resets: the
        // connection ends (hyper answered 400/431 where it could); kache goes on.
        tracing::debug!(%error, "connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    /// A plain listener's settings.
    fn plain_settings() -> ListenerSettings {
        ListenerSettings {
            name: "test",
            tls: None,
            header_read_timeout: Duration::from_secs(5),
            max_header_bytes: 1 << 20,
            max_connections: 16,
        }
    }

    /// A connected pair: the client's end and the server's.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr"));
        let (client, accepted) = tokio::join!(client, listener.accept());
        (client.expect("connect"), accepted.expect("accept").0)
    }

    #[tokio::test]
    async fn the_version_is_told_from_the_first_bytes_which_stay_unread() {
        let timeout = Duration::from_secs(5);
        let (mut client, server) = pair().await;
        client
            .write_all(b"GET /version HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        assert_eq!(detect(&server, timeout).await, Some(Version::Http1));
        let mut first = [0u8; 3];
        assert_eq!(server.peek(&mut first).await.expect("peek"), 3);
        assert_eq!(&first, b"GET", "nothing taken");

        let (mut client, server) = pair().await;
        client.write_all(PREFACE).await.expect("write");
        assert_eq!(detect(&server, timeout).await, Some(Version::Http2));

        // The preface in parts; a request that starts like it, then differs.
        let (mut client, server) = pair().await;
        let writer = tokio::spawn(async move {
            for part in PREFACE.chunks(5) {
                client.write_all(part).await.expect("write");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            client
        });
        assert_eq!(detect(&server, timeout).await, Some(Version::Http2));
        drop(writer.await);
        let (mut client, server) = pair().await;
        client.write_all(b"PRI * HTTP/1.1\r\n").await.expect("write");
        assert_eq!(detect(&server, timeout).await, Some(Version::Http1));

        // Closed, or silent past the timeout: nothing to serve.
        let (client, server) = pair().await;
        drop(client);
        assert_eq!(detect(&server, timeout).await, None);
        let (_client, server) = pair().await;
        assert_eq!(detect(&server, Duration::from_millis(100)).await, None);
    }

    /// kache holds a connection's task for as long as the client stays
    /// connected: for each idle keep-alive client and each watcher. Its
    /// largest state sets its size, so the TLS handshake's, a TLS stream's
    /// and HTTP/2's are boxed apart, and hyper's connection is held once.
    /// 1.3 KB; with the TLS states in it, 3.0 KB; with hyper's connection
    /// taken by value into `drive` (a second copy), 2.1 KB.
    #[tokio::test]
    async fn a_plain_connection_task_stays_small() {
        let (_client, server) = pair().await;
        let peer = server.peer_addr().expect("peer");
        let settings = plain_settings();
        let protocols = Arc::new(Protocols::new(&settings));
        let (_stop, stopped) = watch::channel(false);
        let handler = |_, _: Request<Incoming>| async { Response::new(crate::body::empty()) };
        let task = connection(server, peer, settings, protocols, handler, stopped);
        let size = std::mem::size_of_val(&task);
        assert!(size <= 1600, "a connection's task is {size} bytes");
    }

    #[tokio::test]
    async fn http1_and_cleartext_http2_clients_are_both_served() {
        use http_body_util::BodyExt;
        use hyper_util::client::legacy::{connect::HttpConnector, Client};

        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/version", listener.local_addr().expect("addr"));
        let settings = plain_settings();
        let (stop, stopped) = watch::channel(false);
        let server = tokio::spawn(serve(
            listener,
            settings,
            |_, request: Request<Incoming>| async move {
                Response::new(crate::body::full(format!("{:?}", request.version())))
            },
            stopped,
        ));
        for http2 in [false, true] {
            let client: Client<_, crate::body::Body> = Client::builder(TokioExecutor::new())
                .http2_only(http2)
                .build(HttpConnector::new());
            let request = Request::get(url.as_str())
                .body(crate::body::empty())
                .expect("request");
            let response = client.request(request).await.expect("an answer");
            let body = response.into_body().collect().await.expect("body").to_bytes();
            assert_eq!(body, if http2 { "HTTP/2.0" } else { "HTTP/1.1" });
        }
        stop.send_replace(true);
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("stops")
            .expect("no panic");
    }
}
