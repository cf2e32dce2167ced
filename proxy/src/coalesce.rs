//! The coalescer: concurrent identical reads that go upstream share one
//! upstream call, and no request is ever answered by a call that was sent
//! before it arrived (DESIGN.md, "Coalescing must stay linearizable").
//!
//! ```text
//!   request ─► key_for ─► Coalescer::run ─┬─ nothing running for the key ─► lead a new call (sent now)
//!                                         └─ a call running ──────────────► join the gathering call,
//!                                                                           sent when the running one completes
//!   spawned task: fetch ─► head, body chunks ─► CallState (watch channel) ─► each waiter's body, own cursor
//! ```
//!
//! Per key there is at most one running call and one gathering call. A call
//! completes when its response body has finished or failed; the gathering
//! call is then sent with everyone who arrived meanwhile. Nothing is kept
//! after a call completes: the next arrival starts a new call.
//!
//! Every waiter of a call is known before the call is sent, so a chunk of
//! its body is kept only until every waiter still reading has taken it:
//! with readers as fast as the API server, a call holds a few chunks, not
//! its whole body (a consistent LIST of 100,000 pods is 400 MB). A reader
//! slower than the API server still has its backlog kept for it.

use std::collections::VecDeque;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use bytes::Bytes;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use futures::future::BoxFuture;
use futures::FutureExt;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use kache_cache::RequestInfo;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tracing::Instrument;

use crate::body::{self, Body, BoxError};
use crate::error::ProxyError;
use crate::forward::is_upgrade;

/// Everything that can change the API server's answer to a coalescable read.
///
/// Two requests with equal keys get byte-identical answers from the API
/// server (up to the state it reads), so they may share one call.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CoalesceKey {
    method: Method,
    /// Path and query exactly as the upstream will see them (not normalized:
    /// two spellings of one query just do not share).
    path_and_query: String,
    /// Every `Accept` value, in order: encoding, `as=Table`, partial metadata.
    accept: Vec<HeaderValue>,
    /// `Impersonate-*` headers, which are forwarded and change who reads; sorted.
    impersonation: Vec<(HeaderName, HeaderValue)>,
    /// The API server pretty-prints JSON for some User-Agents (curl, Wget,
    /// browsers). Only this bit of the User-Agent matters, so kubectl
    /// versions still share with each other.
    pretty_agent: bool,
    /// The identity the upstream call is made with.
    identity: String,
}

/// User-Agent prefixes for which the API server pretty-prints JSON
/// (`isPrettyPrint` in apiserver's handlers/negotiation).
const PRETTY_AGENTS: &[&str] = &["curl", "Wget", "Mozilla/5.0"];

impl CoalesceKey {
    /// The key of a request, whether or not it may be coalesced (see [`key_for`]).
    pub fn new(method: &Method, uri: &Uri, headers: &HeaderMap, identity: impl Into<String>) -> CoalesceKey {
        let mut impersonation: Vec<(HeaderName, HeaderValue)> = headers
            .iter()
            .filter(|(name, _)| name.as_str().starts_with("impersonate-"))
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect();
        impersonation.sort_by(|a, b| (a.0.as_str(), a.1.as_bytes()).cmp(&(b.0.as_str(), b.1.as_bytes())));
        let pretty_agent = headers.get(header::USER_AGENT).is_some_and(|agent| {
            PRETTY_AGENTS
                .iter()
                .any(|p| agent.as_bytes().starts_with(p.as_bytes()))
        });
        CoalesceKey {
            method: method.clone(),
            path_and_query: uri
                .path_and_query()
                .map_or_else(|| uri.path().to_string(), |pq| pq.to_string()),
            accept: headers.get_all(header::ACCEPT).iter().cloned().collect(),
            impersonation,
            pretty_agent,
            identity: identity.into(),
        }
    }
}

/// The coalescing key of a request that may share an upstream call, or `None`
/// for one that must not: anything but GET and HEAD, requests with a body,
/// upgrades, watches (`watch=true`, a bare `?watch`, `/watch/` paths) and the
/// other long-running requests (logs, proxy), whose answers never end in time
/// for a gathering call to be useful. `info` is the request as the API
/// server classifies it (`None`: it could not, and the request goes alone);
/// `identity` names who the upstream call is made as.
pub fn key_for<B: http_body::Body>(
    request: &Request<B>,
    info: Option<&RequestInfo>,
    identity: impl Into<String>,
) -> Option<CoalesceKey> {
    if !matches!(*request.method(), Method::GET | Method::HEAD) || is_upgrade(request) || has_body(request) {
        return None;
    }
    match info {
        Some(info) if !info.read.watch && !info.is_long_running() => {}
        _ => return None,
    }
    Some(CoalesceKey::new(
        request.method(),
        request.uri(),
        request.headers(),
        identity,
    ))
}

fn has_body<B: http_body::Body>(request: &Request<B>) -> bool {
    let headers = request.headers();
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .is_some_and(|length| length.as_bytes() != b"0")
        || headers.contains_key(header::TRANSFER_ENCODING);
    declared || !request.body().is_end_stream()
}

/// How a request took part in its upstream call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Its own `fetch` made the call (later arrivals may have shared it).
    Leader,
    /// It shared a call made with another request's `fetch`.
    Follower,
}

impl Role {
    /// The request's outcome: forwarded (it made the call) or coalesced.
    pub fn outcome(self) -> crate::metrics::Outcome {
        match self {
            Role::Leader => crate::metrics::Outcome::Forwarded,
            Role::Follower => crate::metrics::Outcome::Coalesced,
        }
    }
}

/// The coalescer's metrics.
#[derive(Clone)]
pub struct CoalesceMetrics {
    /// Requests that shared a call made for another request.
    pub coalesced: Counter,
    /// Upstream calls the coalescer made.
    pub upstream_calls: Counter,
    /// Waiters per upstream call, counted when the call is sent.
    pub fan_out: Histogram,
}

impl Default for CoalesceMetrics {
    /// Unregistered metrics (tests, or a coalescer nobody scrapes).
    fn default() -> Self {
        CoalesceMetrics {
            coalesced: Counter::default(),
            upstream_calls: Counter::default(),
            // 1 … 1024 waiters
            fan_out: Histogram::new(exponential_buckets(1.0, 2.0, 11)),
        }
    }
}

impl CoalesceMetrics {
    /// Registers `coalesced_requests_total`, `coalescer_upstream_calls_total`
    /// and `coalescer_fan_out` (prefixed by the registry's prefix).
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = CoalesceMetrics::default();
        registry.register(
            "coalesced_requests",
            "Requests answered by an upstream call made for another, identical request",
            metrics.coalesced.clone(),
        );
        registry.register(
            "coalescer_upstream_calls",
            "Upstream calls made by the coalescer",
            metrics.upstream_calls.clone(),
        );
        registry.register(
            "coalescer_fan_out",
            "Requests waiting for each coalesced upstream call when it was sent",
            metrics.fan_out.clone(),
        );
        metrics
    }
}

/// Shares upstream calls between concurrent identical reads. Cheap to clone.
#[derive(Clone)]
pub struct Coalescer {
    inner: Arc<Inner>,
}

struct Inner {
    /// An entry exists while a call for the key is running.
    calls: DashMap<CoalesceKey, InFlight>,
    metrics: CoalesceMetrics,
}

/// A call is running for the key; `gathering` collects who arrived since.
struct InFlight {
    gathering: Option<Gathering>,
}

/// The next call for a key: not sent yet, waiters subscribed to its progress.
struct Gathering {
    progress: watch::Sender<CallState>,
    /// The first gathered request's fetch (a `Mutex` only to make it `Sync`).
    fetch: Mutex<Fetch>,
    span: tracing::Span,
}

type Fetch = Box<dyn FnOnce() -> BoxFuture<'static, Result<Response<Body>, ProxyError>> + Send>;

/// What one upstream call has produced so far, shared by its waiters.
#[derive(Default)]
struct CallState {
    head: Option<Result<Head, Arc<ProxyError>>>,
    /// The body's chunks from number `first` on: those some waiter has not
    /// taken yet (each reads at its own pace).
    chunks: VecDeque<Bytes>,
    first: usize,
    /// Each waiter's next chunk; a waiter that left no longer counts.
    cursors: Arc<Mutex<Vec<Weak<AtomicUsize>>>>,
    /// Set when the body finished (with its trailers, if any) or failed.
    end: Option<Result<Option<HeaderMap>, Arc<BoxError>>>,
}

impl CallState {
    /// A new waiter, reading from the first chunk: registered before the
    /// call is sent, so no chunk is let go of before it took it.
    fn register(&self) -> Arc<AtomicUsize> {
        let cursor = Arc::new(AtomicUsize::new(0));
        let mut cursors = self.cursors.lock().unwrap_or_else(PoisonError::into_inner);
        cursors.retain(|c| c.strong_count() > 0);
        cursors.push(Arc::downgrade(&cursor));
        cursor
    }

    /// Appends a chunk and lets go of those every waiter still reading took.
    fn push(&mut self, chunk: Bytes) {
        self.chunks.push_back(chunk);
        let taken = {
            let mut cursors = self.cursors.lock().unwrap_or_else(PoisonError::into_inner);
            cursors.retain(|c| c.strong_count() > 0);
            cursors
                .iter()
                .filter_map(Weak::upgrade)
                .map(|c| c.load(Ordering::Acquire))
                .min()
                .unwrap_or(self.first + self.chunks.len())
        };
        while self.first < taken && self.chunks.pop_front().is_some() {
            self.first += 1;
        }
    }

    fn chunk(&self, index: usize) -> Option<&Bytes> {
        index.checked_sub(self.first).and_then(|i| self.chunks.get(i))
    }
}

#[derive(Clone)]
struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
}

impl Coalescer {
    pub fn new(metrics: CoalesceMetrics) -> Coalescer {
        Coalescer {
            inner: Arc::new(Inner {
                calls: DashMap::new(),
                metrics,
            }),
        }
    }

    /// Answers a request with an upstream call that was sent after it
    /// arrived, shared with identical requests: a new call if none is running
    /// for `key`, else the gathering call that is sent when the running one
    /// completes. `fetch` is called only if this request's call is the one
    /// made; it runs in a spawned task, so dropping this future or the
    /// response does not disturb other waiters. The body streams to each
    /// waiter as it arrives from upstream.
    ///
    /// Returns whether this request led its call or followed another's.
    ///
    /// # Errors
    /// The fetch's error, shared by every waiter of the call (also a 502 if the
    /// call was abandoned, e.g. its fetch panicked). A body that fails upstream
    /// fails for every waiter.
    pub async fn run<F, Fut>(
        &self,
        key: CoalesceKey,
        fetch: F,
    ) -> (Role, Result<Response<Body>, Arc<ProxyError>>)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Response<Body>, ProxyError>> + Send + 'static,
    {
        let fetch: Fetch = Box::new(move || fetch().boxed());
        let (role, mut progress, cursor) = self.join(key, fetch);
        if role == Role::Follower {
            self.inner.metrics.coalesced.inc();
        }
        let result = wait_for_head(&mut progress).await.map(|head| {
            let mut response = Response::new(shared_body(progress, cursor));
            *response.status_mut() = head.status;
            *response.version_mut() = head.version;
            *response.headers_mut() = head.headers;
            response
        });
        (role, result)
    }

    /// Subscribes to the call this request may share: a new one, or the gathering one.
    fn join(&self, key: CoalesceKey, fetch: Fetch) -> (Role, watch::Receiver<CallState>, Arc<AtomicUsize>) {
        let mut fetch = Some(fetch);
        let mut start = None;
        // Registered under the map's lock: a gathering call is taken (to be
        // sent) under it too, so every waiter is counted before any chunk.
        let joined = |role, receiver: watch::Receiver<CallState>| {
            let cursor = receiver.borrow().register();
            (role, receiver, cursor)
        };
        let joined = match self.inner.calls.entry(key) {
            Entry::Vacant(vacant) => {
                let key = vacant.key().clone();
                vacant.insert(InFlight { gathering: None });
                let (progress, receiver) = watch::channel(CallState::default());
                start = Some((key, progress));
                joined(Role::Leader, receiver)
            }
            Entry::Occupied(mut occupied) => match &mut occupied.get_mut().gathering {
                Some(gathering) => joined(Role::Follower, gathering.progress.subscribe()),
                empty @ None => {
                    let (progress, receiver) = watch::channel(CallState::default());
                    *empty = Some(Gathering {
                        progress,
                        fetch: Mutex::new(fetch.take().expect("invariant: fetch is taken once")),
                        span: tracing::Span::current(),
                    });
                    joined(Role::Leader, receiver)
                }
            },
        };
        // Spawned with the map's lock released.
        if let Some((key, progress)) = start {
            let fetch = fetch.take().expect("invariant: fetch is taken once");
            let calls = drive(self.inner.clone(), key, progress, fetch, tracing::Span::current());
            tokio::spawn(calls);
        }
        joined
    }
}

/// Runs the calls for one key, one after the other: the call it was started
/// with, then each gathering call in turn, until none is waiting.
async fn drive(
    inner: Arc<Inner>,
    key: CoalesceKey,
    mut progress: watch::Sender<CallState>,
    mut fetch: Fetch,
    mut span: tracing::Span,
) {
    loop {
        inner.metrics.upstream_calls.inc();
        inner.metrics.fan_out.observe(progress.receiver_count() as f64);
        let call = AssertUnwindSafe(send(&progress, fetch)).catch_unwind();
        if call.instrument(span.clone()).await.is_err() {
            span.in_scope(|| tracing::error!("a coalesced upstream call panicked; its waiters get an error"));
        }
        // Dropping the sender tells waiters still missing an end that the call was abandoned.
        drop(progress);

        let next = match inner.calls.entry(key.clone()) {
            Entry::Occupied(mut occupied) => match occupied.get_mut().gathering.take() {
                Some(gathering) if gathering.progress.receiver_count() > 0 => Some(gathering),
                // Nobody gathered, or all gathered requests left: nothing to send.
                _ => {
                    occupied.remove();
                    None
                }
            },
            Entry::Vacant(_) => None, // invariant: only this task removes the entry
        };
        let Some(gathering) = next else { return };
        progress = gathering.progress;
        fetch = gathering
            .fetch
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner);
        span = gathering.span;
    }
}

/// Makes one upstream call and publishes its head and body as they arrive.
/// Stops early, dropping the upstream exchange, once no waiter is left: a read
/// has no side effects, and a large list nobody reads is not worth receiving.
async fn send(progress: &watch::Sender<CallState>, fetch: Fetch) {
    let response = tokio::select! {
        response = fetch() => response,
        () = progress.closed() => return,
    };
    let (parts, mut body) = match response {
        Ok(response) => response.into_parts(),
        Err(error) => {
            progress.send_modify(|state| state.head = Some(Err(Arc::new(error))));
            return;
        }
    };
    let head = Head {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
    };
    progress.send_modify(|state| state.head = Some(Ok(head)));
    let mut trailers = None;
    loop {
        let frame = tokio::select! {
            frame = body.frame() => frame,
            () = progress.closed() => return,
        };
        match frame {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) if data.is_empty() => {}
                Ok(data) => progress.send_modify(|state| state.push(data.into_bytes())),
                Err(frame) => trailers = frame.into_trailers().ok(),
            },
            Some(Err(error)) => {
                progress.send_modify(|state| state.end = Some(Err(Arc::new(error))));
                return;
            }
            None => {
                progress.send_modify(|state| state.end = Some(Ok(trailers)));
                return;
            }
        }
    }
}

/// Waits for the call's response head (or its error).
async fn wait_for_head(progress: &mut watch::Receiver<CallState>) -> Result<Head, Arc<ProxyError>> {
    loop {
        if let Some(head) = &progress.borrow_and_update().head {
            return head.clone();
        }
        if progress.changed().await.is_err() {
            return progress.borrow().head.clone().unwrap_or_else(|| {
                Err(Arc::new(ProxyError::UpstreamFailed(
                    "the shared upstream call was abandoned before its response".into(),
                )))
            });
        }
    }
}

/// A body failure as each waiter sees it.
#[derive(Debug, thiserror::Error)]
enum SharedBodyError {
    /// The upstream body failed: the same error for every waiter.
    #[error(transparent)]
    Upstream(Arc<BoxError>),
    #[error("the shared upstream call was abandoned mid-body")]
    Abandoned,
}

/// One waiter's view of the call's body: a cursor over the shared chunks.
struct Reader {
    progress: watch::Receiver<CallState>,
    next: usize,
    /// `next`, shared with the call: what this reader took may be let go of.
    cursor: Arc<AtomicUsize>,
    done: bool,
}

enum Step {
    Data(Bytes),
    Last(Result<Frame<Bytes>, SharedBodyError>),
    End,
    Wait,
}

impl Reader {
    async fn next_frame(mut self) -> Option<(Result<Frame<Bytes>, SharedBodyError>, Reader)> {
        if self.done {
            return None;
        }
        let mut closed = false;
        loop {
            let step = {
                let state = self.progress.borrow_and_update();
                match (state.chunk(self.next), &state.end) {
                    (Some(chunk), _) => Step::Data(chunk.clone()),
                    (None, Some(Ok(Some(trailers)))) => Step::Last(Ok(Frame::trailers(trailers.clone()))),
                    (None, Some(Ok(None))) => Step::End,
                    (None, Some(Err(error))) => Step::Last(Err(SharedBodyError::Upstream(error.clone()))),
                    (None, None) if closed => Step::Last(Err(SharedBodyError::Abandoned)),
                    (None, None) => Step::Wait,
                }
            };
            match step {
                Step::Data(chunk) => {
                    self.next += 1;
                    self.cursor.store(self.next, Ordering::Release);
                    return Some((Ok(Frame::data(chunk)), self));
                }
                Step::Last(item) => {
                    self.done = true;
                    return Some((item, self));
                }
                Step::End => return None,
                Step::Wait => closed = self.progress.changed().await.is_err(),
            }
        }
    }
}

fn shared_body(progress: watch::Receiver<CallState>, cursor: Arc<AtomicUsize>) -> Body {
    let reader = Reader {
        progress,
        next: 0,
        cursor,
        done: false,
    };
    body::stream(StreamBody::new(futures::stream::unfold(
        reader,
        Reader::next_frame,
    )))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use http_body_util::Empty;
    use tokio::sync::mpsc;

    use super::*;

    const LIST: &str = "/api/v1/namespaces/a/pods?limit=500";

    fn request(method: &str, uri: &str, headers: &[(&str, &str)]) -> Request<Empty<Bytes>> {
        let mut builder = Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(Empty::new()).expect("request")
    }

    /// The key the pipeline computes: the request classified, then keyed.
    fn keyed<B: http_body::Body>(request: &Request<B>, identity: &str) -> Option<CoalesceKey> {
        let uri = request.uri();
        let info = RequestInfo::parse(request.method().as_str(), uri.path(), uri.query()).ok();
        key_for(request, info.as_ref(), identity)
    }

    fn key(uri: &str) -> CoalesceKey {
        keyed(&request("GET", uri, &[]), "admin").expect("coalescable")
    }

    /// A fetch that counts its calls and answers, after `delay`, with the
    /// call's number in a header and in the body.
    fn counted(
        calls: &Arc<AtomicUsize>,
        delay: Duration,
    ) -> impl FnOnce() -> BoxFuture<'static, Result<Response<Body>, ProxyError>> {
        let calls = calls.clone();
        move || {
            async move {
                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::time::sleep(delay).await;
                Ok(Response::builder()
                    .status(StatusCode::OK)
                    .header("x-call", n)
                    .body(body::full(format!("{{\"call\":{n}}}")))
                    .expect("response"))
            }
            .boxed()
        }
    }

    type Chunks = mpsc::UnboundedSender<Result<Bytes, BoxError>>;

    /// A fetch whose body is fed through the returned channel.
    fn streamed(
        calls: &Arc<AtomicUsize>,
    ) -> (
        Chunks,
        impl FnOnce() -> BoxFuture<'static, Result<Response<Body>, ProxyError>>,
    ) {
        let (sender, mut receiver) = mpsc::unbounded_channel::<Result<Bytes, BoxError>>();
        let calls = calls.clone();
        let fetch = move || {
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                let frames = futures::stream::poll_fn(move |cx| {
                    receiver.poll_recv(cx).map(|c| c.map(|c| c.map(Frame::data)))
                });
                Ok(Response::new(body::stream(StreamBody::new(frames))))
            }
            .boxed()
        };
        (sender, fetch)
    }

    async fn text(response: Response<Body>) -> Result<String, BoxError> {
        let bytes = response.into_body().collect().await?.to_bytes();
        Ok(String::from_utf8(bytes.to_vec()).expect("utf-8"))
    }

    type Answer = (Role, Result<Response<Body>, Arc<ProxyError>>);

    fn spawn_run<F>(coalescer: &Coalescer, key: CoalesceKey, fetch: F) -> tokio::task::JoinHandle<Answer>
    where
        F: FnOnce() -> BoxFuture<'static, Result<Response<Body>, ProxyError>> + Send + 'static,
    {
        let coalescer = coalescer.clone();
        tokio::spawn(async move { coalescer.run(key, fetch).await })
    }

    /// Lets every spawned task run until all wait (time is paused: no time passes).
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_hundred_concurrent_identical_requests_make_at_most_two_calls_and_get_identical_answers() {
        let metrics = CoalesceMetrics::default();
        let coalescer = Coalescer::new(metrics.clone());
        let calls = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..100)
            .map(|_| spawn_run(&coalescer, key(LIST), counted(&calls, Duration::from_millis(50))))
            .collect();
        let mut answers = Vec::new();
        let mut followers = 0;
        for task in tasks {
            let (role, response) = task.await.expect("task");
            followers += usize::from(role == Role::Follower);
            let response = response.expect("response");
            let call = response.headers()["x-call"].to_str().expect("ascii").to_string();
            answers.push((
                response.status(),
                call.clone(),
                text(response).await.expect("body"),
            ));
        }
        let made = calls.load(Ordering::SeqCst);
        assert!((1..=2).contains(&made), "{made} calls");
        // Each answer is one call's complete response: head and body agree.
        for (status, call, body) in &answers {
            assert_eq!(*status, StatusCode::OK);
            assert_eq!(body, &format!("{{\"call\":{call}}}"));
        }
        assert_eq!(followers, 100 - made);
        assert_eq!(metrics.coalesced.get(), (100 - made) as u64);
        assert_eq!(metrics.upstream_calls.get(), made as u64);
        assert!(coalescer.inner.calls.is_empty(), "no call left behind");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_arriving_while_a_call_runs_gets_the_next_calls_answer() {
        let coalescer = Coalescer::new(CoalesceMetrics::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let first = spawn_run(&coalescer, key(LIST), counted(&calls, Duration::from_millis(100)));
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(calls.load(Ordering::SeqCst), 1, "the first call is in flight");
        let second = spawn_run(&coalescer, key(LIST), counted(&calls, Duration::from_millis(100)));
        let third = spawn_run(&coalescer, key(LIST), counted(&calls, Duration::from_millis(100)));

        let (role, first) = first.await.expect("task");
        assert_eq!(role, Role::Leader);
        assert_eq!(
            text(first.expect("response")).await.expect("body"),
            r#"{"call":1}"#
        );
        let (role, second) = second.await.expect("task");
        assert_eq!(role, Role::Leader, "its fetch makes the gathering call");
        assert_eq!(
            text(second.expect("response")).await.expect("body"),
            r#"{"call":2}"#
        );
        let (role, third) = third.await.expect("task");
        assert_eq!(role, Role::Follower);
        assert_eq!(
            text(third.expect("response")).await.expect("body"),
            r#"{"call":2}"#
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn the_gathering_call_is_sent_only_when_the_running_calls_body_has_finished() {
        let coalescer = Coalescer::new(CoalesceMetrics::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let (chunks, fetch) = streamed(&calls);
        let (_, first) = coalescer.run(key(LIST), fetch).await;
        let mut first = first.expect("response").into_body();
        // Headers are in, the body is not: the call still runs.
        let second = spawn_run(&coalescer, key(LIST), counted(&calls, Duration::ZERO));
        chunks.send(Ok(Bytes::from_static(b"part"))).expect("send");
        let frame = first.frame().await.expect("frame").expect("data");
        assert_eq!(frame.into_data().expect("data").into_bytes(), "part");
        settle().await;
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "not sent while the first body streams"
        );
        drop(chunks);
        assert!(first.frame().await.is_none());
        let (_, second) = second.await.expect("task");
        assert_eq!(
            text(second.expect("response")).await.expect("body"),
            r#"{"call":2}"#
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_call_completed_a_new_request_makes_a_new_call() {
        let coalescer = Coalescer::new(CoalesceMetrics::default());
        let calls = Arc::new(AtomicUsize::new(0));
        for n in 1..=3 {
            let (role, response) = coalescer
                .run(key(LIST), counted(&calls, Duration::from_millis(5)))
                .await;
            assert_eq!(role, Role::Leader);
            assert_eq!(
                text(response.expect("response")).await.expect("body"),
                format!("{{\"call\":{n}}}")
            );
            settle().await;
        }
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert!(coalescer.inner.calls.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn requests_differing_in_accept_query_or_identity_do_not_share() {
        let coalescer = Coalescer::new(CoalesceMetrics::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let keys = [
            key(LIST),
            keyed(
                &request("GET", LIST, &[("accept", "application/vnd.kubernetes.protobuf")]),
                "admin",
            )
            .expect("key"),
            key("/api/v1/namespaces/a/pods?limit=50"),
            keyed(&request("GET", LIST, &[]), "alice").expect("key"),
        ];
        let tasks: Vec<_> = keys
            .into_iter()
            .map(|key| spawn_run(&coalescer, key, counted(&calls, Duration::from_millis(10))))
            .collect();
        for task in tasks {
            let (role, response) = task.await.expect("task");
            assert_eq!(role, Role::Leader);
            response.expect("response");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    /// What `start` spawns, started while a call of [`LIST`] is running;
    /// that call then completes (its body ends), so identical requests
    /// among them have gathered into one call behind it.
    async fn behind_a_running_call<T>(
        coalescer: &Coalescer,
        calls: &Arc<AtomicUsize>,
        start: impl FnOnce() -> T,
    ) -> T {
        let (blocker, fetch) = streamed(calls);
        let running = spawn_run(coalescer, key(LIST), fetch);
        settle().await;
        let started = start();
        settle().await;
        drop(blocker);
        let _ = running
            .await
            .expect("task")
            .1
            .expect("response")
            .into_body()
            .collect()
            .await;
        started
    }

    /// `n` identical requests gathered into one call, whose body is fed
    /// through the returned channel: a running call holds them back until
    /// it completes (its body ends), then theirs is sent.
    async fn gathered(
        coalescer: &Coalescer,
        calls: &Arc<AtomicUsize>,
        n: usize,
    ) -> (Chunks, Vec<tokio::task::JoinHandle<Answer>>) {
        behind_a_running_call(coalescer, calls, || {
            let (chunks, fetch) = streamed(calls);
            let waiters = std::iter::once(spawn_run(coalescer, key(LIST), fetch))
                .chain((1..n).map(|_| spawn_run(coalescer, key(LIST), counted(calls, Duration::ZERO))))
                .collect();
            (chunks, waiters)
        })
        .await
    }

    /// A chunk that counts, when the last of its copies is dropped, into `released`.
    fn probe(released: &Arc<AtomicUsize>) -> Bytes {
        struct Probe(Arc<AtomicUsize>, [u8; 8]);
        impl AsRef<[u8]> for Probe {
            fn as_ref(&self) -> &[u8] {
                &self.1
            }
        }
        impl Drop for Probe {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        Bytes::from_owner(Probe(released.clone(), *b"chunk..."))
    }

    #[tokio::test(start_paused = true)]
    async fn a_chunk_is_let_go_of_once_every_waiter_still_reading_took_it() {
        let coalescer = Coalescer::new(CoalesceMetrics::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let (chunks, waiters) = gathered(&coalescer, &calls, 3).await;
        let mut bodies = Vec::new();
        for waiter in waiters {
            bodies.push(waiter.await.expect("task").1.expect("response").into_body());
        }
        let released = Arc::new(AtomicUsize::new(0));
        let mut slow = bodies.pop().expect("three waiters");
        for i in 0..50 {
            chunks.send(Ok(probe(&released))).expect("send");
            for body in &mut bodies {
                let frame = body.frame().await.expect("frame").expect("data");
                assert_eq!(frame.into_data().expect("data").len(), 8);
            }
            // The slow reader has taken none: everything is kept for it.
            assert_eq!(released.load(Ordering::SeqCst), 0, "chunk {i}");
        }
        // It catches up; from then on each chunk goes once the next arrives.
        for _ in 0..50 {
            drop(slow.frame().await.expect("frame").expect("data"));
        }
        for i in 0..50 {
            chunks.send(Ok(probe(&released))).expect("send");
            for body in bodies.iter_mut().chain(std::iter::once(&mut slow)) {
                drop(body.frame().await.expect("frame").expect("data"));
            }
            assert_eq!(released.load(Ordering::SeqCst), 50 + i, "chunk {}", 50 + i);
        }
        // A reader that leaves no longer holds chunks back.
        drop(slow);
        for _ in 0..2 {
            chunks.send(Ok(probe(&released))).expect("send");
            for body in &mut bodies {
                drop(body.frame().await.expect("frame").expect("data"));
            }
        }
        assert_eq!(released.load(Ordering::SeqCst), 101);
        drop(chunks);
        for body in bodies {
            assert!(body.collect().await.is_ok());
        }
        assert_eq!(released.load(Ordering::SeqCst), 102);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_dropping_its_response_mid_body_does_not_disturb_the_others() {
        let coalescer = Coalescer::new(CoalesceMetrics::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let (chunks, waiters) = gathered(&coalescer, &calls, 3).await;
        let mut bodies = Vec::new();
        for waiter in waiters {
            bodies.push(waiter.await.expect("task").1.expect("response").into_body());
        }
        chunks.send(Ok(Bytes::from_static(b"one,"))).expect("send");
        let mut quitter = bodies.remove(0);
        let frame = quitter.frame().await.expect("frame").expect("data");
        assert_eq!(frame.into_data().expect("data").into_bytes(), "one,");
        drop(quitter);
        chunks.send(Ok(Bytes::from_static(b"two"))).expect("send");
        drop(chunks);
        for body in bodies {
            assert_eq!(body.collect().await.expect("body").to_bytes(), "one,two");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_all_waiters_but_one_still_completes_the_call_for_it() {
        let coalescer = Coalescer::new(CoalesceMetrics::default());
        let calls = Arc::new(AtomicUsize::new(0));
        // Five gather; the first one's fetch will make their call.
        let mut waiters: Vec<_> = behind_a_running_call(&coalescer, &calls, || {
            (0..5)
                .map(|_| spawn_run(&coalescer, key(LIST), counted(&calls, Duration::from_millis(100))))
                .collect()
        })
        .await;
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(calls.load(Ordering::SeqCst), 2, "the gathered call is in flight");
        let kept = waiters.pop().expect("last");
        for waiter in waiters {
            waiter.abort(); // including the one whose fetch is running
        }
        let (role, response) = kept.await.expect("task");
        assert_eq!(role, Role::Follower);
        assert_eq!(
            text(response.expect("response")).await.expect("body"),
            r#"{"call":2}"#
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_gathering_call_whose_waiters_all_left_is_never_sent() {
        let coalescer = Coalescer::new(CoalesceMetrics::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let mut tasks: Vec<_> = (0..5)
            .map(|_| spawn_run(&coalescer, key(LIST), counted(&calls, Duration::from_millis(100))))
            .collect();
        tokio::time::sleep(Duration::from_millis(10)).await;
        let first = tasks.remove(0);
        for task in tasks {
            task.abort();
        }
        let (_, response) = first.await.expect("task");
        assert_eq!(
            text(response.expect("response")).await.expect("body"),
            r#"{"call":1}"#
        );
        settle().await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(coalescer.inner.calls.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_nobody_waits_for_is_abandoned_and_the_next_request_starts_afresh() {
        let coalescer = Coalescer::new(CoalesceMetrics::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let (chunks, fetch) = streamed(&calls);
        let (_, response) = coalescer.run(key(LIST), fetch).await;
        chunks.send(Ok(Bytes::from_static(b"partial"))).expect("send");
        drop(response);
        tokio::time::timeout(Duration::from_secs(1), chunks.closed())
            .await
            .expect("the upstream body is dropped");
        settle().await;
        assert!(coalescer.inner.calls.is_empty());
        let (role, response) = coalescer.run(key(LIST), counted(&calls, Duration::ZERO)).await;
        assert_eq!(role, Role::Leader);
        assert_eq!(
            text(response.expect("response")).await.expect("body"),
            r#"{"call":2}"#
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_upstream_error_reaches_every_waiter() {
        let coalescer = Coalescer::new(CoalesceMetrics::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let failing = |calls: &Arc<AtomicUsize>| {
            let calls = calls.clone();
            move || -> BoxFuture<'static, Result<Response<Body>, ProxyError>> {
                async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    Err(ProxyError::UpstreamTimeout(Duration::from_secs(30)))
                }
                .boxed()
            }
        };
        let tasks: Vec<_> = (0..5)
            .map(|_| spawn_run(&coalescer, key(LIST), failing(&calls)))
            .collect();
        let mut errors = Vec::new();
        for task in tasks {
            let (_, result) = task.await.expect("task");
            let error = result.expect_err("an error");
            assert_eq!(error.kind(), "upstream_timeout");
            errors.push(error);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert!(Arc::ptr_eq(&errors[1], &errors[4]), "one error, shared");
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_error_mid_stream_reaches_every_waiter() {
        let coalescer = Coalescer::new(CoalesceMetrics::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let (chunks, waiters) = gathered(&coalescer, &calls, 4).await;
        chunks
            .send(Ok(Bytes::from_static(b"{\"items\":[")))
            .expect("send");
        chunks.send(Err("connection reset".into())).expect("send");
        for waiter in waiters {
            let mut body = waiter.await.expect("task").1.expect("response").into_body();
            let frame = body.frame().await.expect("frame").expect("data");
            assert_eq!(frame.into_data().expect("data").into_bytes(), "{\"items\":[");
            let error = body.frame().await.expect("frame").expect_err("an error");
            assert_eq!(error.to_string(), "connection reset");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_receive_the_first_chunk_before_the_upstream_body_has_finished() {
        let coalescer = Coalescer::new(CoalesceMetrics::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let (chunks, waiters) = gathered(&coalescer, &calls, 3).await;
        chunks.send(Ok(Bytes::from_static(b"first"))).expect("send");
        let mut bodies = Vec::new();
        for waiter in waiters {
            let mut body = waiter.await.expect("task").1.expect("response").into_body();
            let frame = tokio::time::timeout(Duration::from_secs(1), body.frame())
                .await
                .expect("the first chunk arrives while upstream is still sending")
                .expect("frame")
                .expect("data");
            assert_eq!(frame.into_data().expect("data").into_bytes(), "first");
            bodies.push(body);
        }
        chunks.send(Ok(Bytes::from_static(b" second"))).expect("send");
        drop(chunks);
        for body in bodies {
            assert_eq!(body.collect().await.expect("body").to_bytes(), " second");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_fetch_fails_its_waiters_and_frees_the_key() {
        let coalescer = Coalescer::new(CoalesceMetrics::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let (_, result) = coalescer.run(key(LIST), || async { panic!("fetch bug") }).await;
        assert_eq!(result.expect_err("an error").kind(), "upstream_failed");
        settle().await;
        let (_, response) = coalescer.run(key(LIST), counted(&calls, Duration::ZERO)).await;
        assert_eq!(
            text(response.expect("response")).await.expect("body"),
            r#"{"call":1}"#
        );
    }

    /// Method, URI, headers, whether it may be coalesced.
    type Case = (
        &'static str,
        &'static str,
        &'static [(&'static str, &'static str)],
        bool,
    );

    #[test]
    fn only_plain_reads_without_a_body_get_a_key() {
        let cases: &[Case] = &[
            ("GET", LIST, &[], true),
            ("GET", "/api/v1/namespaces/a/pods/p", &[], true),
            ("HEAD", LIST, &[], true),
            (
                "GET",
                "/apis/apps/v1/deployments?limit=500",
                &[("accept", "application/json;as=Table;v=v1;g=meta.k8s.io")],
                true,
            ),
            ("GET", "/version", &[], true),
            ("GET", "/api/v1/pods?watch=true", &[], false),
            ("GET", "/api/v1/pods?watch", &[], false),
            ("GET", "/api/v1/pods?watch=1&resourceVersion=5", &[], false),
            ("GET", "/api/v1/watch/pods", &[], false),
            ("GET", "/api/v1/namespaces/a/pods/p/log?follow=true", &[], false),
            ("POST", LIST, &[], false),
            ("PATCH", "/api/v1/namespaces/a/pods/p", &[], false),
            ("PUT", "/api/v1/namespaces/a/pods/p", &[], false),
            ("DELETE", "/api/v1/namespaces/a/pods/p", &[], false),
            (
                "GET",
                "/api/v1/namespaces/a/pods/p/exec?command=sh",
                &[("connection", "Upgrade"), ("upgrade", "SPDY/3.1")],
                false,
            ),
            (
                "GET",
                "/apis/x/v1/things",
                &[("connection", "upgrade"), ("upgrade", "websocket")],
                false,
            ),
            ("GET", LIST, &[("content-length", "2")], false),
            ("GET", LIST, &[("transfer-encoding", "chunked")], false),
            ("GET", LIST, &[("content-length", "0")], true),
        ];
        for (method, uri, headers, coalescable) in cases {
            let key = keyed(&request(method, uri, headers), "admin");
            assert_eq!(key.is_some(), *coalescable, "{method} {uri} {headers:?}");
        }
        let with_body = Request::get(LIST)
            .body(http_body_util::Full::new(Bytes::from_static(b"{}")))
            .expect("request");
        assert!(
            keyed(&with_body, "admin").is_none(),
            "a body without declaring it"
        );
    }

    #[test]
    fn keys_differ_by_everything_that_changes_the_answer() {
        let key_of = |method: &str, uri: &str, headers: &[(&str, &str)], identity: &str| {
            keyed(&request(method, uri, headers), identity).expect("key")
        };
        let base = key_of("GET", LIST, &[("accept", "application/json")], "admin");
        assert_eq!(
            base,
            key_of(
                "GET",
                LIST,
                &[("accept", "application/json"), ("user-agent", "kubectl/v1.30")],
                "admin"
            )
        );
        let different = [
            key_of(
                "GET",
                LIST,
                &[("accept", "application/vnd.kubernetes.protobuf")],
                "admin",
            ),
            key_of("GET", LIST, &[], "admin"),
            key_of("HEAD", LIST, &[("accept", "application/json")], "admin"),
            key_of(
                "GET",
                "/api/v1/namespaces/a/pods?limit=5",
                &[("accept", "application/json")],
                "admin",
            ),
            key_of(
                "GET",
                "/api/v1/namespaces/b/pods?limit=500",
                &[("accept", "application/json")],
                "admin",
            ),
            key_of("GET", LIST, &[("accept", "application/json")], "alice"),
            key_of(
                "GET",
                LIST,
                &[("accept", "application/json"), ("impersonate-user", "bob")],
                "admin",
            ),
            key_of(
                "GET",
                LIST,
                &[("accept", "application/json"), ("user-agent", "curl/8.5.0")],
                "admin",
            ),
        ];
        for key in &different {
            assert_ne!(&base, key);
        }
        // Impersonation headers in another order ask the same thing.
        let groups = |a: &str, b: &str| {
            key_of(
                "GET",
                LIST,
                &[
                    ("impersonate-user", "bob"),
                    ("impersonate-group", a),
                    ("impersonate-group", b),
                ],
                "admin",
            )
        };
        assert_eq!(groups("x", "y"), groups("y", "x"));
    }

    #[test]
    fn metrics_are_registered_under_their_names() {
        let mut registry = Registry::with_prefix("kache");
        let metrics = CoalesceMetrics::register(&mut registry);
        metrics.coalesced.inc();
        metrics.upstream_calls.inc();
        metrics.fan_out.observe(3.0);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(text.contains("kache_coalesced_requests_total 1"), "{text}");
        assert!(text.contains("kache_coalescer_upstream_calls_total 1"), "{text}");
        assert!(text.contains("kache_coalescer_fan_out_bucket"), "{text}");
    }
}
