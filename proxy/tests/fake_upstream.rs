//! kache in process in front of a small fake API server that records what
//! reaches it: the deterministic checks of forwarding (headers, streaming,
//! upgrades, timeouts) that a real API server without nodes cannot show.
//! The real API server is exercised by the `kache-tests` crate.

#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use kache_config::{Cli, Command, Config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// What the fake upstream saw.
#[derive(Default)]
struct Seen {
    requests: Mutex<Vec<(String, HeaderMap)>>,
}

/// Watch frames the test releases one at a time.
type Frames = Arc<tokio::sync::Mutex<Option<mpsc::Receiver<Bytes>>>>;

async fn fake_upstream(seen: Arc<Seen>, frames: Frames) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let seen = seen.clone();
            let frames = frames.clone();
            tokio::spawn(async move {
                let service = service_fn(move |mut request: Request<Incoming>| {
                    let seen = seen.clone();
                    let frames = frames.clone();
                    async move {
                        let uri = request.uri().to_string();
                        seen.requests
                            .lock()
                            .unwrap()
                            .push((uri.clone(), request.headers().clone()));
                        let path = request.uri().path().to_string();
                        let response = match path.as_str() {
                            "/api/v1/namespaces/a/configmaps" if uri.contains("watch=true") => {
                                let mut rx = frames.lock().await.take().expect("one watch");
                                let stream = async_stream(move |tx| async move {
                                    while let Some(frame) = rx.recv().await {
                                        if tx.send(Ok::<_, Infallible>(Frame::data(frame))).await.is_err() {
                                            break;
                                        }
                                    }
                                });
                                Response::builder()
                                    .header("content-type", "application/json")
                                    .body(StreamBody::new(stream).boxed_unsync())
                                    .unwrap()
                            }
                            "/api/v1/namespaces/a/configmaps/slow" => {
                                tokio::time::sleep(Duration::from_secs(10)).await;
                                text(StatusCode::OK, "late")
                            }
                            "/api/v1/namespaces/a/pods/p/exec" => {
                                let on_upgrade = hyper::upgrade::on(&mut request);
                                tokio::spawn(async move {
                                    let upgraded = on_upgrade.await.unwrap();
                                    let mut io = TokioIo::new(upgraded);
                                    let mut buf = [0u8; 64];
                                    loop {
                                        let n = io.read(&mut buf).await.unwrap_or(0);
                                        if n == 0 {
                                            break;
                                        }
                                        let mut reply = b"echo:".to_vec();
                                        reply.extend_from_slice(&buf[..n]);
                                        io.write_all(&reply).await.unwrap();
                                    }
                                });
                                Response::builder()
                                    .status(StatusCode::SWITCHING_PROTOCOLS)
                                    .header("connection", "Upgrade")
                                    .header("upgrade", "SPDY/3.1")
                                    .header("x-stream-protocol-version", "v4.channel.k8s.io")
                                    .body(
                                        Full::new(Bytes::new())
                                            .map_err(|never| match never {})
                                            .boxed_unsync(),
                                    )
                                    .unwrap()
                            }
                            "/api/v1/namespaces/a/configmaps" if request.method() == "POST" => {
                                let body = request.into_body().collect().await.unwrap().to_bytes();
                                let mut response = text(StatusCode::CREATED, "");
                                *response.body_mut() =
                                    Full::new(body).map_err(|never| match never {}).boxed_unsync();
                                response
                            }
                            _ => {
                                let mut response =
                                    text(StatusCode::NOT_FOUND, r#"{"kind":"Status","code":404}"#);
                                response
                                    .headers_mut()
                                    .insert("x-upstream", "fake".parse().unwrap());
                                response
                            }
                        };
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

type FakeBody = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

fn text(code: StatusCode, body: &'static str) -> Response<FakeBody> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(
            Full::new(Bytes::from_static(body.as_bytes()))
                .map_err(|never| match never {})
                .boxed_unsync(),
        )
        .unwrap()
}

/// A stream fed by a task, without pulling in an extra crate.
fn async_stream<T, F, Fut>(f: F) -> impl futures::Stream<Item = T>
where
    T: Send + 'static,
    F: FnOnce(mpsc::Sender<T>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(f(tx));
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) })
}

struct Harness {
    kache: SocketAddr,
    metrics: Arc<kache_proxy::metrics::Metrics>,
    seen: Arc<Seen>,
    frames: mpsc::Sender<Bytes>,
    _dir: TempDir,
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

async fn harness(extra_config: &str) -> Harness {
    let (harness, running) = harness_running(extra_config).await;
    // Keep kache running for the rest of the test process.
    std::mem::forget(running);
    harness
}

/// A harness whose kache the test may shut down.
async fn harness_running(extra_config: &str) -> (Harness, kache_proxy::Running) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let seen = Arc::new(Seen::default());
    let (frames_tx, frames_rx) = mpsc::channel(8);
    let upstream = fake_upstream(seen.clone(), Arc::new(tokio::sync::Mutex::new(Some(frames_rx)))).await;

    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("kache-fake-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: 'http://{upstream}'}}}}]\n\
             users: [{{name: kache, user: {{token: kache-own-token}}}}]\n\
             contexts: [{{name: fake, context: {{cluster: fake, user: kache}}}}]\ncurrent-context: fake\n"
        ),
    )
    .unwrap();
    let config_file = dir.join("kache.yaml");
    std::fs::write(&config_file, extra_config).unwrap();
    let cli = <Cli as clap::Parser>::try_parse_from([
        "kache",
        "serve",
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--config",
        config_file.to_str().unwrap(),
    ])
    .unwrap();
    let Command::Serve(args) = cli.command else {
        unreachable!()
    };
    let running = kache_proxy::start(Config::load(&args).unwrap()).await.unwrap();
    let kache = running.addr;
    let metrics = running.metrics.clone();
    let harness = Harness {
        kache,
        metrics,
        seen,
        frames: frames_tx,
        _dir: TempDir(dir),
    };
    (harness, running)
}

fn client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

fn get(kache: SocketAddr, path: &str) -> Request<Full<Bytes>> {
    Request::get(format!("http://{kache}{path}"))
        .body(Full::new(Bytes::new()))
        .unwrap()
}

#[tokio::test]
async fn upstream_sees_identity_encoding_and_kaches_credentials_only() {
    let h = harness("").await;
    let mut request = get(
        h.kache,
        "/api/v1/namespaces/a/configmaps/x?pretty=true&fieldSelector=a%3Db",
    );
    request
        .headers_mut()
        .insert("authorization", "Bearer client-secret".parse().unwrap());
    request
        .headers_mut()
        .insert("accept-encoding", "gzip".parse().unwrap());
    request
        .headers_mut()
        .insert("impersonate-user", "alice".parse().unwrap());
    let response = client().request(request).await.unwrap();
    assert_eq!(response.status(), 404, "the upstream's own answer passes through");
    assert_eq!(response.headers()["x-upstream"], "fake");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], br#"{"kind":"Status","code":404}"#);

    let seen = h.seen.requests.lock().unwrap();
    let (uri, headers) = seen.last().unwrap();
    assert_eq!(
        uri,
        "/api/v1/namespaces/a/configmaps/x?pretty=true&fieldSelector=a%3Db"
    );
    assert_eq!(headers["accept-encoding"], "identity");
    assert_eq!(headers["authorization"], "Bearer kache-own-token");
    assert_eq!(headers["impersonate-user"], "alice");
}

#[tokio::test]
async fn request_bodies_reach_the_upstream_intact() {
    let h = harness("").await;
    let payload = vec![b'x'; 3 << 20];
    let request = Request::post(format!("http://{}/api/v1/namespaces/a/configmaps", h.kache))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(payload.clone())))
        .unwrap();
    let response = client().request(request).await.unwrap();
    assert_eq!(response.status(), 201);
    let echoed = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(echoed.len(), payload.len());
    assert!(echoed.iter().all(|b| *b == b'x'));
}

#[tokio::test]
async fn watch_events_reach_the_client_as_the_upstream_sends_them() {
    let h = harness("").await;
    let response = client()
        .request(get(
            h.kache,
            "/api/v1/namespaces/a/configmaps?watch=true&resourceVersion=5",
        ))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    for n in 0..3 {
        let event = format!("{{\"type\":\"ADDED\",\"n\":{n}}}\n");
        h.frames.send(Bytes::from(event.clone())).await.unwrap();
        // The next frame is not sent until this one arrived: nothing buffers the stream.
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("event delivered while the watch is still open")
            .unwrap()
            .unwrap();
        assert_eq!(frame.into_data().unwrap(), Bytes::from(event));
    }
}

#[tokio::test]
async fn a_slow_upstream_gets_a_timeout_status_and_kache_keeps_serving() {
    let h = harness("upstream: {timeoutSeconds: 1}\n").await;
    let response = client()
        .request(get(h.kache, "/api/v1/namespaces/a/configmaps/slow"))
        .await
        .unwrap();
    assert_eq!(response.status(), 504);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let status: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status["kind"], "Status");
    assert_eq!(status["reason"], "Timeout");
    assert_eq!(status["code"], 504);
    let response = client()
        .request(get(h.kache, "/api/v1/namespaces/a/configmaps/x"))
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
}

#[tokio::test]
async fn upgrades_are_spliced_byte_for_byte() {
    let h = harness("").await;
    let (mut stream, head) = open_exec(h.kache).await;
    let head = head.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: spdy/3.1"), "{head}");
    assert!(
        head.contains("x-stream-protocol-version: v4.channel.k8s.io"),
        "{head}"
    );
    for message in ["hello", "again"] {
        stream.write_all(message.as_bytes()).await.unwrap();
        let mut reply = vec![0u8; 5 + message.len()];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut reply))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(reply, format!("echo:{message}").as_bytes());
    }
    let seen = h.seen.requests.lock().unwrap();
    let (_, headers) = seen.last().unwrap();
    assert_eq!(headers["upgrade"], "SPDY/3.1");
    assert_eq!(headers["connection"], "Upgrade");
}

#[tokio::test]
async fn an_unreachable_upstream_gets_503_with_retry_after() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    // A port nothing listens on.
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let kube_config = kube::Config::new(format!("http://{closed}").parse().unwrap());
    let upstream_config = kache_config::UpstreamConfig {
        kubeconfig: None,
        context: None,
        timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(1),
    };
    let upstream = kache_proxy::upstream::Upstream::from_kube_config(kube_config, &upstream_config).unwrap();
    let request = Request::get("/api").body(kache_proxy::body::empty()).unwrap();
    let error = upstream
        .send(request, kache_proxy::upstream::Exchange::Short)
        .await
        .unwrap_err();
    let response = kache_proxy::error::rescue(&error);
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
}

/// Opens an exec session through kache (SPDY upgrade to the fake's echo)
/// and returns the connection with the response head.
async fn open_exec(kache: SocketAddr) -> (TcpStream, String) {
    let mut stream = TcpStream::connect(kache).await.unwrap();
    stream
        .write_all(
            b"POST /api/v1/namespaces/a/pods/p/exec?command=sh&stdin=true HTTP/1.1\r\nHost: localhost\r\n\
              Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\n\
              Content-Length: 0\r\n\r\n",
        )
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    (stream, String::from_utf8(head).unwrap())
}

/// Sends raw bytes on a new connection (optionally closing its write half
/// after them) and returns everything kache answers until it closes.
async fn raw_exchange(kache: SocketAddr, bytes: &[u8], close_write: bool) -> String {
    let mut stream = TcpStream::connect(kache).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    if close_write {
        stream.shutdown().await.unwrap();
    }
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

fn posts_seen(h: &Harness) -> usize {
    h.seen
        .requests
        .lock()
        .unwrap()
        .iter()
        .filter(|(uri, _)| uri == "/api/v1/namespaces/a/configmaps")
        .count()
}

#[tokio::test]
async fn writes_over_the_api_servers_body_limit_get_its_413() {
    let h = harness("maxRequestBodyBytes: 16\n").await;
    let post = |body: Vec<u8>| {
        Request::post(format!("http://{}/api/v1/namespaces/a/configmaps", h.kache))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    };
    // A declared length over the limit: refused before anything is sent.
    let response = client().request(post(vec![b'x'; 17])).await.unwrap();
    assert_eq!(response.status(), 413);
    let status: serde_json::Value =
        serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(status["message"], "Request entity too large: limit is 16");
    assert_eq!(status["reason"], "RequestEntityTooLarge");
    assert_eq!(posts_seen(&h), 0, "nothing reached the API server");
    // At the limit: forwarded as usual.
    let response = client().request(post(vec![b'x'; 16])).await.unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(posts_seen(&h), 1);
    // Chunked, no declared length: cut off once past the limit, same 413.
    let answer = raw_exchange(
        h.kache,
        b"POST /api/v1/namespaces/a/configmaps HTTP/1.1\r\nHost: localhost\r\n\
          Transfer-Encoding: chunked\r\n\r\n8\r\n12345678\r\n8\r\n12345678\r\n8\r\n12345678\r\n0\r\n\r\n",
        false,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer.contains("Request entity too large: limit is 16"),
        "{answer}"
    );
    // Reads are not writes: a GET's body is not the API server's to limit.
    let response = client()
        .request(get(h.kache, "/api/v1/namespaces/a/configmaps/x"))
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
}

#[tokio::test]
async fn a_request_body_that_breaks_off_is_the_clients_error_not_a_bad_gateway() {
    let h = harness("").await;
    // Declares 100 bytes, sends 7, and closes its side.
    let answer = raw_exchange(
        h.kache,
        b"POST /api/v1/namespaces/a/configmaps HTTP/1.1\r\nHost: localhost\r\n\
          Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"kind\"",
        true,
    )
    .await;
    assert!(!answer.contains(" 502 "), "{answer}");
    // Whether or not the answer can still reach it, kache counts the
    // client's fault as such.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = h.metrics.encode();
        if metrics.contains("kache_errors_total{kind=\"bad_request\"} 1") {
            assert!(!metrics.contains("kind=\"upstream_failed\""), "{metrics}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no bad_request counted:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn at_the_connection_cap_new_connections_wait_for_a_free_one() {
    let h = harness("maxConnections: 2\n").await;
    let request = b"GET /version HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    // Two connections take both slots (and are answered).
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(h.kache).await.unwrap();
        stream
            .write_all(b"GET /version HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 12];
        stream.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"HTTP/1.1 404");
        held.push(stream);
    }
    // A third is connected by the kernel but not served while both are open.
    let mut third = TcpStream::connect(h.kache).await.unwrap();
    third.write_all(request).await.unwrap();
    let mut buf = [0u8; 12];
    let early = tokio::time::timeout(Duration::from_millis(300), third.read_exact(&mut buf)).await;
    assert!(early.is_err(), "served past the cap");
    // Once one closes, it is.
    drop(held.pop());
    tokio::time::timeout(Duration::from_secs(10), third.read_exact(&mut buf))
        .await
        .expect("served once a slot freed")
        .unwrap();
    assert_eq!(&buf, b"HTTP/1.1 404");
}

#[tokio::test]
async fn at_shutdown_watches_end_cleanly_and_upgraded_sessions_close_at_the_deadline() {
    let (h, running) = harness_running("").await;
    // A watch streaming through kache.
    let response = client()
        .request(get(
            h.kache,
            "/api/v1/namespaces/a/configmaps?watch=true&resourceVersion=5",
        ))
        .await
        .unwrap();
    let mut watch = response.into_body();
    h.frames
        .send(Bytes::from("{\"type\":\"ADDED\"}\n"))
        .await
        .unwrap();
    let frame = tokio::time::timeout(Duration::from_secs(5), watch.frame())
        .await
        .unwrap();
    assert!(frame.unwrap().unwrap().is_data());
    // An exec session.
    let (mut exec, head) = open_exec(h.kache).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");

    let stopping = tokio::spawn(running.shutdown());
    // The watch ends as a stream ends (no error), without waiting for a timeout.
    let end = tokio::time::timeout(Duration::from_secs(4), watch.frame())
        .await
        .expect("the watch ended at shutdown");
    assert!(end.is_none(), "a clean end of stream, not an error");
    // The session still works during the grace period, and is closed after it.
    exec.write_all(b"still").await.unwrap();
    let mut reply = [0u8; 10];
    exec.read_exact(&mut reply).await.unwrap();
    assert_eq!(&reply, b"echo:still");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(30), exec.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the session was closed at the deadline");
    tokio::time::timeout(Duration::from_secs(30), stopping)
        .await
        .expect("shutdown finished")
        .unwrap();
}
