//! The admit stage: per-client concurrency limits with fair queueing for
//! requests that will reach the API server, modelled on API Priority and
//! Fairness (APF).
//!
//! ```text
//!  Demand ─► exempt? (health, /version, configured) ─────────────────► Permit (no seat)
//!    │
//!    └─► class (first configured match, else "default")
//!          long-running? ─► per-client cap ─ over ─► 429 long_running_limit
//!          │                       └─ under ───────────────────────► Permit (no seat)
//!          └─► free seat, client under its cap ───────────────────► Permit (seat)
//!              else the client's own FIFO queue ─ full ─► 429 queue_full
//!                   │   seats freed go to the waiting client holding the fewest
//!                   └─► granted ─► Permit (seat) │ deadline ─► 429 timeout
//! ```
//!
//! # Design
//!
//! - **Classes** are APF's priority levels: each has its own seats, taken
//!   out of the global `maxInFlight` (the default class keeps what the named
//!   ones leave), its own per-client queues and limits. A busy class can never
//!   take another's seats. Requests are sorted into classes by the config's
//!   rules (user, `User-Agent` prefix, path prefix), the first match winning.
//! - **Exact per-client flows, not shuffle sharding.** APF hashes flows onto
//!   a fixed set of queues (64 queues, hand size 8, queue length 50) because
//!   an API server has unboundedly many flows and must bound its memory. Here
//!   a flow's state exists only while the client has requests running or
//!   waiting, so memory is already bounded by the requests in the proxy, and
//!   an exact queue per client gives what sharding only approximates: no two
//!   clients ever share a queue, so a greedy one cannot fill a polite one's
//!   queue, and the per-client limits (in flight, queue length) are exact.
//! - **Fair dispatch by seats held.** When a seat frees, it goes to the
//!   waiting client currently holding the fewest seats of the class (ties:
//!   the longest-waiting request first). That is max-min fair sharing of
//!   the seats between the clients that want them, which APF's virtual-time
//!   fair queuing approximates by estimating each request's work: the proxy
//!   knows how many seats each client actually holds, so it needs no
//!   estimate, and a client with slow requests automatically gets fewer new
//!   seats. Choosing costs a scan of the class's active clients (a few
//!   hundred at most) per dispatch, under the class's lock.
//! - Every request costs one seat (APF charges a LIST up to 10): kache does
//!   not yet know what a forwarded request will cost the API server.
//! - **Long-running requests** (watch, exec, log, port-forward) take no seat
//!   and never queue, like APF, which releases a watch's seat once it is set
//!   up; instead each client may hold a bounded number open. Over that cap
//!   the request is rejected at once.
//! - **Exempt**: `/livez`, `/readyz`, `/healthz`, `/version` (and their
//!   sub-paths) and the configured users, user agents and paths bypass every
//!   limit, as APF's `exempt` level does for health probes and
//!   `system:masters`.
//! - **Reconfiguration** ([`Limiter::reconfigure`]) changes a class's limits
//!   in place, keeping its queues and running requests; raised limits admit
//!   waiting requests at once, lowered ones take effect as requests finish.
//!   A class that disappears keeps serving what it already holds.
//!
//! A [`Permit`] is a value tied to the work, as tower's `ConcurrencyLimit`
//! does it: the seat is released when the permit is dropped — after success,
//! on an error path, when the client disconnects while its request waits (the
//! dropped [`Limiter::acquire`] future leaves its queue, and a seat granted to
//! it in the same instant is given back) and, held in the response with
//! [`Permit::attach`], when the body ends or is dropped.
//!
//! Metrics are labelled by class, never by client key.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use kache_config::{ClassLimits, ClientKeyConfig, ClientMatch, LimitsConfig, DEFAULT_CLASS, EXEMPT_CLASS};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::body::{Body, BoxError};
use crate::error::ProxyError;

/// `Retry-After` for a full queue or a timed-out wait: the API server's own
/// value for its concurrency rejections (`--max-requests-inflight` and APF).
/// Seats free up within a request's time, and client-go retries 429s
/// honouring this header.
pub const RETRY_AFTER_SECONDS: u32 = 1;
/// `Retry-After` when a client holds too many long-running requests: one of
/// them has to end first, and watches last minutes, so hurrying back is futile.
pub const LONG_RUNNING_RETRY_AFTER_SECONDS: u32 = 5;
/// Paths that are never limited (with their sub-paths such as `/readyz/etcd`):
/// probes must see the truth even when the proxy is saturated.
pub const EXEMPT_PATHS: &[&str] = &["/livez", "/readyz", "/healthz", "/version"];

/// Who a request counts against: a bounded string (at most
/// [`ClientKey::MAX_LEN`] bytes), cheap to clone. Never a metrics label.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ClientKey(Arc<str>);

impl ClientKey {
    pub const MAX_LEN: usize = 256;

    /// A key from any string, cut to [`ClientKey::MAX_LEN`] bytes.
    pub fn new(key: &str) -> ClientKey {
        let mut end = key.len().min(Self::MAX_LEN);
        while !key.is_char_boundary(end) {
            end -= 1;
        }
        ClientKey(Arc::from(&key[..end]))
    }

    /// The client a request comes from: the authenticated user where known
    /// (`user:<name>`); else the bearer token it presented (the proxy's access
    /// token), as a per-process fingerprint that cannot be turned back into
    /// the token, with its `User-Agent` (`token:<hex> <user-agent>`); else its
    /// peer address with its `User-Agent` (`<ip> <user-agent>`).
    ///
    /// The `User-Agent` keeps programs apart that share a token or an address
    /// — in local mode every client is on 127.0.0.1 and presents the same
    /// access token, and fairness between `kubectl` and a runaway script is the
    /// point. A client that varies its `User-Agent` gets several flows, which
    /// still cannot exceed its class's seats.
    pub fn identify(peer: SocketAddr, headers: &HeaderMap, user: Option<&str>) -> ClientKey {
        ClientKey::identify_with(peer, headers, user, &ClientKeyConfig::default())
    }

    /// [`ClientKey::identify`] under a configured key: a client-id header
    /// ranks after the user and before the token; the User-Agent may be left out.
    pub fn identify_with(
        peer: SocketAddr,
        headers: &HeaderMap,
        user: Option<&str>,
        config: &ClientKeyConfig,
    ) -> ClientKey {
        if let Some(user) = user.filter(|u| !u.is_empty()) {
            return ClientKey::new(&format!("user:{user}"));
        }
        let named = config
            .header
            .as_deref()
            .and_then(|name| headers.get(name))
            .map(|v| String::from_utf8_lossy(v.as_bytes()).trim().to_string())
            .filter(|v| !v.is_empty());
        if let Some(named) = named {
            return ClientKey::new(&format!("client:{named}"));
        }
        let agent = headers
            .get(header::USER_AGENT)
            .map(|v| String::from_utf8_lossy(v.as_bytes()))
            .filter(|v| !v.is_empty());
        let agent = if config.user_agent {
            format!(" {}", agent.as_deref().unwrap_or("-"))
        } else {
            String::new()
        };
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty());
        match token {
            Some(token) => {
                static KEYS: OnceLock<RandomState> = OnceLock::new();
                let fingerprint = KEYS.get_or_init(RandomState::new).hash_one(token);
                ClientKey::new(&format!("token:{fingerprint:016x}{agent}"))
            }
            None => ClientKey::new(&format!("{}{agent}", peer.ip())),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// What the admit stage needs to know about a request.
#[derive(Debug, Clone, Copy)]
pub struct Demand<'a> {
    pub client: &'a ClientKey,
    /// The authenticated user, for class rules.
    pub user: Option<&'a str>,
    pub user_agent: Option<&'a str>,
    pub path: &'a str,
    /// Watch, exec, attach, log, port-forward, proxy: takes no seat.
    pub long_running: bool,
}

impl<'a> Demand<'a> {
    /// A demand for a request with these headers (for its `User-Agent`).
    pub fn new(
        client: &'a ClientKey,
        user: Option<&'a str>,
        headers: &'a HeaderMap,
        path: &'a str,
        long_running: bool,
    ) -> Demand<'a> {
        Demand {
            client,
            user,
            user_agent: headers.get(header::USER_AGENT).and_then(|v| v.to_str().ok()),
            path,
            long_running,
        }
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// The client's queue in its class was full.
    QueueFull,
    /// The request waited its class's queue timeout without getting a seat.
    Timeout,
    /// The client already holds its class's number of long-running requests.
    LongRunningLimit,
}

impl RejectReason {
    /// The metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::QueueFull => "queue_full",
            RejectReason::Timeout => "timeout",
            RejectReason::LongRunningLimit => "long_running_limit",
        }
    }

    fn retry_after(self) -> u32 {
        match self {
            RejectReason::QueueFull | RejectReason::Timeout => RETRY_AFTER_SECONDS,
            RejectReason::LongRunningLimit => LONG_RUNNING_RETRY_AFTER_SECONDS,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RejectReason::QueueFull => "this client's queue is full",
            RejectReason::Timeout => "this client's request waited too long for its turn",
            RejectReason::LongRunningLimit => {
                "this client has too many long-running requests (watch, exec, log, port-forward) open"
            }
        })
    }
}

/// The concurrency limits of the proxy: classes, their seats and their
/// per-client queues. Shared by all connections (`Arc<Limiter>`).
pub struct Limiter {
    table: RwLock<Arc<Table>>,
    metrics: AdmitMetrics,
    exempt_executing: Gauge,
}

impl fmt::Debug for Limiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limiter").finish_non_exhaustive()
    }
}

impl Limiter {
    pub fn new(config: &LimitsConfig, metrics: AdmitMetrics) -> Limiter {
        let exempt_executing = metrics
            .executing
            .get_or_create_owned(&ClassLabel::new(EXEMPT_CLASS));
        let table = Table::build(config, &metrics, None);
        Limiter {
            table: RwLock::new(Arc::new(table)),
            metrics,
            exempt_executing,
        }
    }

    /// Applies new limits to future admissions. Queued and running requests
    /// are neither dropped nor moved: a class that keeps its name keeps its
    /// queues under the new limits (raised limits admit waiting requests at
    /// once), a class that is gone drains what it holds.
    pub fn reconfigure(&self, config: &LimitsConfig) {
        let mut table = self.table.write().unwrap_or_else(PoisonError::into_inner);
        let next = Table::build(config, &self.metrics, Some(&table));
        *table = Arc::new(next);
    }

    /// Waits for the right to send a request upstream.
    ///
    /// Cancel-safe: dropping the future while it waits leaves the queue, and
    /// gives back a seat granted in the meantime.
    ///
    /// # Errors
    /// [`ProxyError::TooManyRequests`] when the client's queue is full, the
    /// wait timed out, or the client holds too many long-running requests.
    pub async fn acquire(&self, demand: Demand<'_>) -> Result<Permit, ProxyError> {
        let class = {
            let table = self.table.read().unwrap_or_else(PoisonError::into_inner);
            match table.class_of(&demand) {
                Some(class) => class.clone(),
                None => {
                    self.exempt_executing.inc();
                    return Ok(Permit {
                        held: Held::Exempt(self.exempt_executing.clone()),
                    });
                }
            }
        };
        let key = demand.client;
        if demand.long_running {
            return if class.enter_long_running(key) {
                Ok(Permit::new(class, key.clone(), Kind::LongRunning))
            } else {
                Err(class.reject(RejectReason::LongRunningLimit))
            };
        }
        let asked = Instant::now();
        let (ticket, granted, deadline) = match class.enter(key) {
            Entry::Admitted => {
                class.metrics.wait_admitted.observe(0.0);
                return Ok(Permit::new(class, key.clone(), Kind::Short));
            }
            Entry::Rejected => return Err(class.reject(RejectReason::QueueFull)),
            Entry::Queued {
                ticket,
                granted,
                deadline,
            } => (ticket, granted, deadline),
        };
        let mut waiting = Waiting {
            class,
            key: key.clone(),
            ticket,
            granted,
            settled: false,
        };
        let admitted = match tokio::time::timeout_at(deadline, &mut waiting.granted).await {
            Ok(Ok(())) => true,
            // Timed out, unless the grant came in the same instant.
            Ok(Err(_)) | Err(_) => waiting.class.settle(&waiting.key, ticket, &mut waiting.granted),
        };
        waiting.settled = true;
        let waited = asked.elapsed().as_secs_f64();
        let class = waiting.class.clone();
        if admitted {
            class.metrics.wait_admitted.observe(waited);
            Ok(Permit::new(class, key.clone(), Kind::Short))
        } else {
            class.metrics.wait_rejected.observe(waited);
            Err(class.reject(RejectReason::Timeout))
        }
    }
}

/// The right to have one request in flight upstream. Dropping it releases
/// its seat (or long-running slot) and hands the seat to the next waiting
/// request.
#[must_use = "the seat is released as soon as the permit is dropped"]
pub struct Permit {
    held: Held,
}

enum Held {
    Exempt(Gauge),
    Counted {
        class: Arc<Class>,
        key: ClientKey,
        kind: Kind,
        since: Instant,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Short,
    LongRunning,
}

impl Permit {
    fn new(class: Arc<Class>, key: ClientKey, kind: Kind) -> Permit {
        Permit {
            held: Held::Counted {
                class,
                key,
                kind,
                since: Instant::now(),
            },
        }
    }

    /// The class the request was admitted in (`exempt` for exempt requests).
    pub fn class(&self) -> &str {
        match &self.held {
            Held::Exempt(_) => EXEMPT_CLASS,
            Held::Counted { class, .. } => &class.name,
        }
    }

    /// Ties the permit to a response body: it is released when the body has
    /// yielded its last frame, fails, or is dropped unfinished. For upgraded
    /// connections (exec, port-forward), move the permit into the task that
    /// splices them instead.
    pub fn attach(self, body: Body) -> Body {
        PermitBody {
            inner: body,
            permit: Some(self),
        }
        .boxed_unsync()
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        match &self.held {
            Held::Exempt(executing) => {
                executing.dec();
            }
            Held::Counted {
                class,
                key,
                kind,
                since,
            } => {
                if *kind == Kind::Short {
                    class.metrics.execution.observe(since.elapsed().as_secs_f64());
                }
                class.release(key, *kind);
            }
        }
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut debug = f.debug_struct("Permit");
        debug.field("class", &self.class());
        if let Held::Counted { key, kind, .. } = &self.held {
            debug.field("client", key).field("kind", kind);
        }
        debug.finish()
    }
}

/// A body that holds a [`Permit`] until it ends.
struct PermitBody {
    inner: Body,
    permit: Option<Permit>,
}

impl http_body::Body for PermitBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        let ended = match &polled {
            Poll::Pending => false,
            Poll::Ready(Some(Ok(_))) => this.inner.is_end_stream(),
            Poll::Ready(None | Some(Err(_))) => true,
        };
        if ended {
            this.permit.take();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The classes in matching order, swapped whole on reconfiguration.
struct Table {
    exempt: ClientMatch,
    classes: Vec<(ClientMatch, Arc<Class>)>,
    default: Arc<Class>,
}

impl Table {
    /// Builds the classes of `config`, reusing (and updating) those of
    /// `previous` that keep their name, so their queues and seats carry over.
    fn build(config: &LimitsConfig, metrics: &AdmitMetrics, previous: Option<&Table>) -> Table {
        let class = |name: &str, limits: &ClassLimits| match previous.and_then(|t| t.find(name)) {
            Some(class) => {
                class.set_limits(limits.clone());
                class.clone()
            }
            None => Arc::new(Class::new(name, limits.clone(), metrics)),
        };
        Table {
            exempt: config.exempt.clone(),
            classes: config
                .classes
                .iter()
                .map(|c| (c.matches.clone(), class(&c.name, &c.limits)))
                .collect(),
            default: class(DEFAULT_CLASS, &config.default),
        }
    }

    fn find(&self, name: &str) -> Option<&Arc<Class>> {
        std::iter::once(&self.default)
            .chain(self.classes.iter().map(|(_, c)| c))
            .find(|c| &*c.name == name)
    }

    /// The class a request belongs to; `None` when it is exempt.
    fn class_of(&self, demand: &Demand<'_>) -> Option<&Arc<Class>> {
        let matches = |m: &ClientMatch| m.matches(demand.user, demand.user_agent, demand.path);
        if is_exempt_path(demand.path) || matches(&self.exempt) {
            return None;
        }
        let class = self.classes.iter().find(|(m, _)| matches(m)).map(|(_, c)| c);
        Some(class.unwrap_or(&self.default))
    }
}

fn is_exempt_path(path: &str) -> bool {
    EXEMPT_PATHS.iter().any(|p| {
        path.strip_prefix(p)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    })
}

/// A priority class: its seats and its clients' queues.
struct Class {
    name: Arc<str>,
    metrics: ClassMetrics,
    state: Mutex<State>,
}

struct State {
    limits: ClassLimits,
    /// Seats in use.
    executing: usize,
    /// Requests waiting, over all flows.
    queued: usize,
    /// Clients with requests running or waiting; idle ones are removed.
    flows: HashMap<ClientKey, Flow>,
    /// Arrival order of waiting requests, across flows.
    next_ticket: u64,
}

#[derive(Default)]
struct Flow {
    executing: usize,
    long_running: usize,
    queue: VecDeque<Waiter>,
}

impl Flow {
    fn is_idle(&self) -> bool {
        self.executing == 0 && self.long_running == 0 && self.queue.is_empty()
    }
}

struct Waiter {
    ticket: u64,
    grant: oneshot::Sender<()>,
}

enum Entry {
    Admitted,
    Queued {
        ticket: u64,
        granted: oneshot::Receiver<()>,
        deadline: Instant,
    },
    Rejected,
}

/// A request in a queue. Dropped before it is settled (the client went
/// away), it leaves the queue, or gives back the seat granted to it.
struct Waiting {
    class: Arc<Class>,
    key: ClientKey,
    ticket: u64,
    granted: oneshot::Receiver<()>,
    settled: bool,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if !self.settled && self.class.settle(&self.key, self.ticket, &mut self.granted) {
            self.class.release(&self.key, Kind::Short);
        }
    }
}

impl Class {
    fn new(name: &str, limits: ClassLimits, metrics: &AdmitMetrics) -> Class {
        let metrics = metrics.class(name);
        metrics.limit.set(limits.seats as i64);
        Class {
            name: Arc::from(name),
            metrics,
            state: Mutex::new(State {
                limits,
                executing: 0,
                queued: 0,
                flows: HashMap::new(),
                next_ticket: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the state consistent before any call
        // that could panic, so a poisoned lock holds valid state.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_limits(&self, limits: ClassLimits) {
        let mut state = self.lock();
        self.metrics.limit.set(limits.seats as i64);
        state.limits = limits;
        self.dispatch(&mut state);
    }

    /// Takes a seat if one is free and the client is under its cap, else
    /// queues the request (or refuses it when the client's queue is full).
    fn enter(&self, key: &ClientKey) -> Entry {
        let mut guard = self.lock();
        let state = &mut *guard;
        let limits = &state.limits;
        let flow = state.flows.entry(key.clone()).or_default();
        // Seats are handed to waiters whenever they free up, so a free seat
        // means nobody who could take it is waiting: taking it is fair.
        if state.executing < limits.seats
            && flow.executing < limits.max_in_flight_per_client
            && flow.queue.is_empty()
        {
            flow.executing += 1;
            state.executing += 1;
            self.metrics.executing.inc();
            self.metrics.dispatched.inc();
            return Entry::Admitted;
        }
        if flow.queue.len() >= limits.queue_length {
            if flow.is_idle() {
                state.flows.remove(key);
            }
            return Entry::Rejected;
        }
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        let (grant, granted) = oneshot::channel();
        flow.queue.push_back(Waiter { ticket, grant });
        state.queued += 1;
        self.metrics.queued.inc();
        let now = Instant::now();
        Entry::Queued {
            ticket,
            granted,
            deadline: now
                .checked_add(limits.queue_timeout)
                .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365)),
        }
    }

    /// Counts a long-running request if the client is under its cap.
    fn enter_long_running(&self, key: &ClientKey) -> bool {
        let mut guard = self.lock();
        let state = &mut *guard;
        let flow = state.flows.entry(key.clone()).or_default();
        if flow.long_running >= state.limits.max_long_running_per_client {
            if flow.is_idle() {
                state.flows.remove(key);
            }
            return false;
        }
        flow.long_running += 1;
        self.metrics.long_running.inc();
        true
    }

    /// Ends a wait: true if the seat was granted (it is the caller's now),
    /// false if the request was still queued (it is not any more).
    fn settle(&self, key: &ClientKey, ticket: u64, granted: &mut oneshot::Receiver<()>) -> bool {
        let mut guard = self.lock();
        // Grants are sent under this lock, so this answer is final.
        if granted.try_recv().is_ok() {
            return true;
        }
        let state = &mut *guard;
        if let Some(flow) = state.flows.get_mut(key) {
            if let Some(at) = flow.queue.iter().position(|w| w.ticket == ticket) {
                flow.queue.remove(at);
                state.queued -= 1;
                self.metrics.queued.dec();
            }
            if flow.is_idle() {
                state.flows.remove(key);
            }
        }
        false
    }

    fn release(&self, key: &ClientKey, kind: Kind) {
        let mut guard = self.lock();
        let state = &mut *guard;
        let Some(flow) = state.flows.get_mut(key) else {
            debug_assert!(
                false,
                "invariant: a permit's flow lives until the permit is dropped"
            );
            return;
        };
        match kind {
            Kind::Short => {
                flow.executing -= 1;
                state.executing -= 1;
                self.metrics.executing.dec();
            }
            Kind::LongRunning => {
                flow.long_running -= 1;
                self.metrics.long_running.dec();
            }
        }
        if flow.is_idle() {
            state.flows.remove(key);
        }
        if kind == Kind::Short {
            self.dispatch(state);
        }
    }

    /// Hands free seats to waiting requests: each to the head of the queue
    /// of the client holding the fewest seats (ties: the earliest arrival),
    /// among clients under their per-client cap.
    fn dispatch(&self, state: &mut State) {
        while state.executing < state.limits.seats {
            let cap = state.limits.max_in_flight_per_client;
            let next = state
                .flows
                .iter()
                .filter(|(_, flow)| flow.executing < cap)
                .filter_map(|(key, flow)| flow.queue.front().map(|w| ((flow.executing, w.ticket), key)))
                .min_by_key(|(rank, _)| *rank)
                .map(|(_, key)| key.clone());
            let Some(key) = next else { break };
            let flow = state
                .flows
                .get_mut(&key)
                .expect("invariant: the flow was just found");
            let waiter = flow.queue.pop_front().expect("invariant: the flow has a waiter");
            state.queued -= 1;
            self.metrics.queued.dec();
            // The receiver lives until its waiter left the queue (`settle`),
            // so this only fails if a `Waiting` was leaked.
            if waiter.grant.send(()).is_ok() {
                flow.executing += 1;
                state.executing += 1;
                self.metrics.executing.inc();
                self.metrics.dispatched.inc();
            } else if flow.is_idle() {
                state.flows.remove(&key);
            }
        }
    }

    fn reject(&self, reason: RejectReason) -> ProxyError {
        self.metrics.rejected[reason.index()].inc();
        ProxyError::TooManyRequests {
            reason,
            class: self.name.clone(),
            retry_after: reason.retry_after(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ClassLabel {
    class: String,
}

impl ClassLabel {
    fn new(class: &str) -> ClassLabel {
        ClassLabel {
            class: class.to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RejectedLabels {
    class: String,
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct WaitLabels {
    class: String,
    /// `true` if the request went on to execute, `false` if it was rejected.
    execute: &'static str,
}

/// APF's buckets for both waits and executions (seconds).
const DURATION_BUCKETS: [f64; 12] = [0.005, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 30.0];

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

/// The admit stage's metrics, named after APF's `apiserver_flowcontrol_*`
/// and labelled by class (bounded by the config), never by client.
#[derive(Debug, Clone)]
pub struct AdmitMetrics {
    executing: Family<ClassLabel, Gauge>,
    long_running: Family<ClassLabel, Gauge>,
    queued: Family<ClassLabel, Gauge>,
    limit: Family<ClassLabel, Gauge>,
    dispatched: Family<ClassLabel, Counter>,
    rejected: Family<RejectedLabels, Counter>,
    wait: Family<WaitLabels, Histogram>,
    execution: Family<ClassLabel, Histogram>,
}

impl AdmitMetrics {
    /// Creates the metrics and registers them (names start `flowcontrol_`).
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = AdmitMetrics {
            executing: Family::default(),
            long_running: Family::default(),
            queued: Family::default(),
            limit: Family::default(),
            dispatched: Family::default(),
            rejected: Family::default(),
            wait: Family::new_with_constructor(duration_histogram),
            execution: Family::new_with_constructor(duration_histogram),
        };
        registry.register(
            "flowcontrol_current_executing_requests",
            "Requests holding a seat upstream, by class (exempt requests included, long-running ones not)",
            metrics.executing.clone(),
        );
        registry.register(
            "flowcontrol_current_long_running_requests",
            "Long-running requests (watch, exec, log, port-forward) open, by class",
            metrics.long_running.clone(),
        );
        registry.register(
            "flowcontrol_current_inqueue_requests",
            "Requests waiting for a seat, by class",
            metrics.queued.clone(),
        );
        registry.register(
            "flowcontrol_request_concurrency_limit",
            "Seats of each class",
            metrics.limit.clone(),
        );
        registry.register(
            "flowcontrol_dispatched_requests",
            "Requests given a seat, by class",
            metrics.dispatched.clone(),
        );
        registry.register(
            "flowcontrol_rejected_requests",
            "Requests refused with 429, by class and reason (queue_full, timeout, long_running_limit)",
            metrics.rejected.clone(),
        );
        registry.register(
            "flowcontrol_request_wait_duration_seconds",
            "Time requests waited for a seat, by class and whether they then executed",
            metrics.wait.clone(),
        );
        registry.register(
            "flowcontrol_request_execution_seconds",
            "Time requests held their seat (to the end of the response body), by class",
            metrics.execution.clone(),
        );
        metrics
    }

    /// The handles of one class, looked up once so that admission does not
    /// allocate label sets.
    fn class(&self, name: &str) -> ClassMetrics {
        let label = ClassLabel::new(name);
        let rejected = |reason: RejectReason| {
            self.rejected.get_or_create_owned(&RejectedLabels {
                class: name.to_string(),
                reason: reason.as_str(),
            })
        };
        let wait = |execute: &'static str| {
            self.wait.get_or_create_owned(&WaitLabels {
                class: name.to_string(),
                execute,
            })
        };
        ClassMetrics {
            executing: self.executing.get_or_create_owned(&label),
            long_running: self.long_running.get_or_create_owned(&label),
            queued: self.queued.get_or_create_owned(&label),
            limit: self.limit.get_or_create_owned(&label),
            dispatched: self.dispatched.get_or_create_owned(&label),
            // In `RejectReason::index` order.
            rejected: [
                rejected(RejectReason::QueueFull),
                rejected(RejectReason::Timeout),
                rejected(RejectReason::LongRunningLimit),
            ],
            wait_admitted: wait("true"),
            wait_rejected: wait("false"),
            execution: self.execution.get_or_create_owned(&label),
        }
    }
}

struct ClassMetrics {
    executing: Gauge,
    long_running: Gauge,
    queued: Gauge,
    limit: Gauge,
    dispatched: Counter,
    rejected: [Counter; 3],
    wait_admitted: Histogram,
    wait_rejected: Histogram,
    execution: Histogram,
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{FutureExt, StreamExt};
    use kache_config::ClassConfig;

    const SERVICE: Duration = Duration::from_millis(100);

    fn limits(seats: usize, per_client: usize, queue_length: usize) -> ClassLimits {
        ClassLimits {
            seats,
            max_in_flight_per_client: per_client,
            queue_length,
            queue_timeout: Duration::from_secs(15),
            max_long_running_per_client: 2,
        }
    }

    fn config(seats: usize, per_client: usize, queue_length: usize) -> LimitsConfig {
        LimitsConfig {
            max_in_flight: seats,
            default: limits(seats, per_client, queue_length),
            classes: Vec::new(),
            exempt: ClientMatch::default(),
            client_key: ClientKeyConfig::default(),
        }
    }

    fn limiter(config: &LimitsConfig) -> (Arc<Limiter>, Registry) {
        let mut registry = Registry::with_prefix("kache");
        let metrics = AdmitMetrics::register(&mut registry);
        (Arc::new(Limiter::new(config, metrics)), registry)
    }

    fn short(client: &ClientKey) -> Demand<'_> {
        Demand {
            client,
            user: None,
            user_agent: Some("kubectl/v1.30.0"),
            path: "/api/v1/pods",
            long_running: false,
        }
    }

    fn watch(client: &ClientKey) -> Demand<'_> {
        Demand {
            long_running: true,
            ..short(client)
        }
    }

    /// (seats in use, requests queued, active clients) of a class.
    fn counts(limiter: &Limiter, class: &str) -> (usize, usize, usize) {
        let table = limiter.table.read().expect("lock");
        let class = table.find(class).expect("class exists").clone();
        let state = class.lock();
        (state.executing, state.queued, state.flows.len())
    }

    fn rejection(result: Result<Permit, ProxyError>) -> (RejectReason, u32) {
        match result {
            Err(ProxyError::TooManyRequests {
                reason, retry_after, ..
            }) => (reason, retry_after),
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    fn admitted(result: Option<Result<Permit, ProxyError>>) -> Permit {
        match result {
            Some(Ok(permit)) => permit,
            other => panic!("expected an immediate admission, got {other:?}"),
        }
    }

    /// A streamed body holding `permit`, fed through the returned sender.
    fn streamed(permit: Permit) -> (futures::channel::mpsc::UnboundedSender<Bytes>, Body) {
        let (tx, rx) = futures::channel::mpsc::unbounded::<Bytes>();
        let stream = http_body_util::StreamBody::new(rx.map(|b| Ok::<_, BoxError>(Frame::data(b))));
        (tx, permit.attach(crate::body::stream(stream)))
    }

    fn encode(registry: &Registry) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).expect("encode");
        text
    }

    #[tokio::test(start_paused = true)]
    async fn a_greedy_client_cannot_starve_a_polite_one() {
        let (limiter, registry) = limiter(&config(10, 100, 50));
        let client = |name: &'static str, requests: usize| {
            let limiter = limiter.clone();
            tokio::spawn(async move {
                let key = ClientKey::new(name);
                let mut outcomes = Vec::new();
                for _ in 0..requests {
                    let asked = Instant::now();
                    let outcome = match limiter.acquire(short(&key)).await {
                        Ok(permit) => {
                            let waited = asked.elapsed();
                            tokio::time::sleep(SERVICE).await;
                            drop(permit);
                            Ok(waited)
                        }
                        Err(error) => Err(rejection(Err(error))),
                    };
                    outcomes.push(outcome);
                }
                outcomes
            })
        };
        // 200 concurrent requests, one each; then 2 concurrent loops of 3
        // requests, arriving while the greedy backlog keeps every seat busy.
        let greedy: Vec<_> = (0..200).map(|_| client("greedy", 1)).collect();
        let polite: Vec<_> = (0..2).map(|_| client("polite", 3)).collect();
        let mut collect = Vec::new();
        for task in greedy.into_iter().chain(polite) {
            collect.push(task.await.expect("task"));
        }
        let (greedy, polite) = collect.split_at(200);
        let greedy: Vec<_> = greedy.iter().flatten().collect();
        let polite: Vec<_> = polite.iter().flatten().collect();

        assert_eq!(
            greedy.len() + polite.len(),
            206,
            "every request has exactly one outcome"
        );
        assert!(
            polite.iter().all(|o| o.is_ok()),
            "polite never rejected: {polite:?}"
        );
        let polite_wait = polite.iter().filter_map(|o| o.as_ref().ok()).max().expect("some");
        assert!(
            *polite_wait <= SERVICE,
            "the polite client waits at most for the next seat to free: {polite_wait:?}"
        );
        let greedy_admitted: Vec<_> = greedy.iter().filter_map(|o| o.as_ref().ok()).collect();
        let greedy_rejected: Vec<_> = greedy.iter().filter_map(|o| o.as_ref().err()).collect();
        assert_eq!(greedy_admitted.len(), 10 + 50, "10 seats, then its queue of 50");
        assert_eq!(greedy_rejected.len(), 140);
        assert!(greedy_rejected
            .iter()
            .all(|r| **r == (RejectReason::QueueFull, RETRY_AFTER_SECONDS)));
        let greedy_wait = greedy_admitted.iter().max().expect("some");
        assert!(**greedy_wait > *polite_wait, "{greedy_wait:?}");

        assert_eq!(counts(&limiter, DEFAULT_CLASS), (0, 0, 0), "nothing leaked");
        let text = encode(&registry);
        for line in [
            r#"kache_flowcontrol_dispatched_requests_total{class="default"} 66"#,
            r#"kache_flowcontrol_rejected_requests_total{class="default",reason="queue_full"} 140"#,
            r#"kache_flowcontrol_current_executing_requests{class="default"} 0"#,
            r#"kache_flowcontrol_current_inqueue_requests{class="default"} 0"#,
            r#"kache_flowcontrol_request_wait_duration_seconds_count{class="default",execute="true"} 66"#,
            r#"kache_flowcontrol_request_execution_seconds_count{class="default"} 66"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        assert!(
            !text.contains("greedy") && !text.contains("polite"),
            "no client labels"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_over_its_in_flight_limit_queues_while_others_pass() {
        let (limiter, _registry) = limiter(&config(10, 2, 50));
        let (a, b) = (ClientKey::new("a"), ClientKey::new("b"));
        let first = admitted(limiter.acquire(short(&a)).now_or_never());
        let _second = admitted(limiter.acquire(short(&a)).now_or_never());
        let mut third = Box::pin(limiter.acquire(short(&a)));
        assert!(
            futures::poll!(&mut third).is_pending(),
            "over its cap, with seats free"
        );
        let _other = admitted(limiter.acquire(short(&b)).now_or_never());
        assert_eq!(counts(&limiter, DEFAULT_CLASS), (3, 1, 2));
        drop(first);
        let _third = third.await.expect("admitted once under its cap");
        assert_eq!(counts(&limiter, DEFAULT_CLASS), (3, 0, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_a_permit_after_success_releases_its_seat_to_the_next_waiter() {
        let (limiter, _registry) = limiter(&config(1, 1, 50));
        let (a, b) = (ClientKey::new("a"), ClientKey::new("b"));
        let permit = limiter.acquire(short(&a)).await.expect("admitted");
        let mut next = Box::pin(limiter.acquire(short(&b)));
        assert!(futures::poll!(&mut next).is_pending());
        drop(permit);
        let next = admitted(next.now_or_never());
        assert_eq!(next.class(), DEFAULT_CLASS);
        drop(next);
        assert_eq!(counts(&limiter, DEFAULT_CLASS), (0, 0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_permit_is_released_when_the_handler_fails() {
        async fn handler(limiter: &Limiter, key: &ClientKey) -> Result<(), ProxyError> {
            let _permit = limiter.acquire(short(key)).await?;
            Err(ProxyError::BadRequest("the upstream said no".into()))
        }
        let (limiter, _registry) = limiter(&config(1, 1, 0));
        let a = ClientKey::new("a");
        for _ in 0..3 {
            let error = handler(&limiter, &a).await.expect_err("fails");
            assert!(matches!(error, ProxyError::BadRequest(_)), "never a 429: {error}");
            assert_eq!(counts(&limiter, DEFAULT_CLASS), (0, 0, 0));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_dropped_while_queued_leaves_no_waiter_and_no_seat_behind() {
        let (limiter, registry) = limiter(&config(1, 1, 1));
        let (a, b) = (ClientKey::new("a"), ClientKey::new("b"));
        let held = limiter.acquire(short(&a)).await.expect("admitted");
        let mut queued = Box::pin(limiter.acquire(short(&b)));
        assert!(futures::poll!(&mut queued).is_pending());
        assert_eq!(counts(&limiter, DEFAULT_CLASS), (1, 1, 2));
        drop(queued); // the client disconnected
        assert_eq!(counts(&limiter, DEFAULT_CLASS), (1, 0, 1));
        // Its queue slot is free again (queue length 1)...
        let mut again = Box::pin(limiter.acquire(short(&b)));
        assert!(futures::poll!(&mut again).is_pending(), "queued, not rejected");
        // ...and the seat goes to the live waiter, not to the one that left.
        drop(held);
        drop(admitted(again.now_or_never()));
        assert_eq!(counts(&limiter, DEFAULT_CLASS), (0, 0, 0));
        let text = encode(&registry);
        assert!(
            text.contains(r#"kache_flowcontrol_current_inqueue_requests{class="default"} 0"#),
            "{text}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_seat_granted_to_a_request_dropped_before_it_noticed_is_given_back() {
        let (limiter, _registry) = limiter(&config(1, 1, 50));
        let (a, b, c) = (ClientKey::new("a"), ClientKey::new("b"), ClientKey::new("c"));
        let held = limiter.acquire(short(&a)).await.expect("admitted");
        let mut queued = Box::pin(limiter.acquire(short(&b)));
        assert!(futures::poll!(&mut queued).is_pending());
        drop(held); // grants the seat to `queued`, which is never polled again
        assert_eq!(counts(&limiter, DEFAULT_CLASS), (1, 0, 1));
        drop(queued);
        assert_eq!(counts(&limiter, DEFAULT_CLASS), (0, 0, 0), "the seat came back");
        drop(admitted(limiter.acquire(short(&c)).now_or_never()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_permit_held_by_a_body_is_released_at_the_end_of_the_body() {
        let (limiter, _registry) = limiter(&config(1, 1, 0));
        let a = ClientKey::new("a");

        // A body of known length ends with its last data frame.
        let permit = limiter.acquire(short(&a)).await.expect("admitted");
        let mut body = permit.attach(crate::body::full("{}"));
        assert_eq!(counts(&limiter, DEFAULT_CLASS).0, 1);
        let frame = body.frame().await.expect("a frame").expect("data");
        assert_eq!(frame.into_data().expect("data"), "{}");
        assert_eq!(
            counts(&limiter, DEFAULT_CLASS),
            (0, 0, 0),
            "released, body still alive"
        );
        assert!(body.frame().await.is_none());

        // A streamed body ends when its stream does.
        let permit = limiter.acquire(short(&a)).await.expect("admitted");
        let (tx, mut body) = streamed(permit);
        tx.unbounded_send(Bytes::from_static(b"event")).expect("send");
        body.frame().await.expect("a frame").expect("data");
        assert_eq!(counts(&limiter, DEFAULT_CLASS).0, 1, "held while streaming");
        drop(tx);
        assert!(body.frame().await.is_none());
        assert_eq!(counts(&limiter, DEFAULT_CLASS), (0, 0, 0), "released at the end");
    }

    #[tokio::test(start_paused = true)]
    async fn a_permit_held_by_a_body_is_released_when_the_body_is_dropped_early() {
        let (limiter, _registry) = limiter(&config(1, 1, 0));
        let a = ClientKey::new("a");
        let permit = limiter.acquire(short(&a)).await.expect("admitted");
        let (tx, mut body) = streamed(permit);
        tx.unbounded_send(Bytes::from_static(b"partial")).expect("send");
        body.frame().await.expect("a frame").expect("data");
        assert_eq!(counts(&limiter, DEFAULT_CLASS).0, 1);
        drop(body); // the client went away mid-body
        assert_eq!(counts(&limiter, DEFAULT_CLASS), (0, 0, 0));
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_waits_too_long_is_rejected_with_reason_timeout() {
        let (limiter, registry) = limiter(&config(1, 1, 50));
        let (a, b) = (ClientKey::new("a"), ClientKey::new("b"));
        let _held = limiter.acquire(short(&a)).await.expect("admitted");
        let asked = Instant::now();
        let result = limiter.acquire(short(&b)).await;
        assert_eq!(
            asked.elapsed(),
            Duration::from_secs(15),
            "the class's queue timeout"
        );
        assert_eq!(rejection(result), (RejectReason::Timeout, RETRY_AFTER_SECONDS));
        assert_eq!(counts(&limiter, DEFAULT_CLASS), (1, 0, 1), "it left the queue");
        let text = encode(&registry);
        for line in [
            r#"kache_flowcontrol_rejected_requests_total{class="default",reason="timeout"} 1"#,
            r#"kache_flowcontrol_request_wait_duration_seconds_count{class="default",execute="false"} 1"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn long_running_requests_take_no_short_seats_and_have_their_own_per_client_cap() {
        let (limiter, registry) = limiter(&config(1, 1, 0));
        let (a, b) = (ClientKey::new("a"), ClientKey::new("b"));
        let _short = limiter.acquire(short(&a)).await.expect("admitted");
        let (reason, _) = rejection(limiter.acquire(short(&b)).await);
        assert_eq!(reason, RejectReason::QueueFull, "the short seats are saturated");

        let first = admitted(limiter.acquire(watch(&a)).now_or_never());
        let _second = admitted(limiter.acquire(watch(&a)).now_or_never());
        assert_eq!(
            rejection(limiter.acquire(watch(&a)).await),
            (RejectReason::LongRunningLimit, LONG_RUNNING_RETRY_AFTER_SECONDS)
        );
        let _other = admitted(limiter.acquire(watch(&b)).now_or_never());
        assert_eq!(counts(&limiter, DEFAULT_CLASS).0, 1, "watches took no seat");
        drop(first);
        let _again = admitted(limiter.acquire(watch(&a)).now_or_never());
        let text = encode(&registry);
        for line in [
            r#"kache_flowcontrol_current_long_running_requests{class="default"} 3"#,
            r#"kache_flowcontrol_rejected_requests_total{class="default",reason="long_running_limit"} 1"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn exempt_requests_bypass_the_limits_even_when_saturated() {
        let mut config = config(1, 1, 0);
        config.exempt = ClientMatch {
            users: vec!["admin".into()],
            user_agent_prefixes: vec!["kube-probe/".into()],
            path_prefixes: Vec::new(),
        };
        let (limiter, registry) = limiter(&config);
        let a = ClientKey::new("a");
        let _held = limiter.acquire(short(&a)).await.expect("admitted");
        let mut permits = Vec::new();
        for path in ["/livez", "/readyz", "/readyz/etcd", "/healthz", "/version"] {
            let demand = Demand { path, ..short(&a) };
            permits.push(admitted(limiter.acquire(demand).now_or_never()));
        }
        let by_user = Demand {
            user: Some("admin"),
            ..short(&a)
        };
        let by_agent = Demand {
            user_agent: Some("kube-probe/1.30"),
            long_running: true,
            ..short(&a)
        };
        for demand in [by_user, by_agent] {
            permits.push(admitted(limiter.acquire(demand).now_or_never()));
        }
        assert!(permits.iter().all(|p| p.class() == EXEMPT_CLASS));
        assert!(
            encode(&registry).contains(r#"kache_flowcontrol_current_executing_requests{class="exempt"} 7"#)
        );
        let lookalike = Demand {
            path: "/livezz",
            ..short(&a)
        };
        assert_eq!(
            rejection(limiter.acquire(lookalike).await).0,
            RejectReason::QueueFull
        );
        drop(permits);
        assert!(
            encode(&registry).contains(r#"kache_flowcontrol_current_executing_requests{class="exempt"} 0"#)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn raising_the_limits_admits_queued_requests_at_once() {
        let (limiter, registry) = limiter(&config(1, 1, 50));
        let (a, b, c) = (ClientKey::new("a"), ClientKey::new("b"), ClientKey::new("c"));
        let _held = limiter.acquire(short(&a)).await.expect("admitted");
        let mut queued = Box::pin(limiter.acquire(short(&b)));
        assert!(futures::poll!(&mut queued).is_pending());
        limiter.reconfigure(&config(3, 1, 50));
        let _queued = admitted(queued.now_or_never());
        let _new = admitted(limiter.acquire(short(&c)).now_or_never());
        assert_eq!(counts(&limiter, DEFAULT_CLASS), (3, 0, 3));
        assert!(
            encode(&registry).contains(r#"kache_flowcontrol_request_concurrency_limit{class="default"} 3"#)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn lowering_the_limits_lets_running_and_queued_requests_complete() {
        let (limiter, _registry) = limiter(&config(3, 1, 50));
        let keys: Vec<_> = (0..5).map(|i| ClientKey::new(&format!("c{i}"))).collect();
        let mut running = Vec::new();
        for key in &keys[..3] {
            running.push(limiter.acquire(short(key)).await.expect("admitted"));
        }
        let mut before = Box::pin(limiter.acquire(short(&keys[3])));
        assert!(futures::poll!(&mut before).is_pending());

        limiter.reconfigure(&config(1, 1, 1));
        assert_eq!(counts(&limiter, DEFAULT_CLASS), (3, 1, 4), "nothing dropped");
        let mut after = Box::pin(limiter.acquire(short(&keys[4])));
        assert!(
            futures::poll!(&mut after).is_pending(),
            "over the new limit: queued"
        );
        running.pop();
        running.pop();
        assert!(futures::poll!(&mut before).is_pending(), "1 running, new limit 1");
        running.pop();
        let before = before.await.expect("the request queued before completes");
        assert!(futures::poll!(&mut after).is_pending());
        drop(before);
        drop(after.await.expect("the request queued after completes"));
        assert_eq!(counts(&limiter, DEFAULT_CLASS), (0, 0, 0));
    }

    fn with_ci_class(mut config: LimitsConfig, seats: usize) -> LimitsConfig {
        config.default.seats -= seats;
        config.classes.push(ClassConfig {
            name: "ci".into(),
            matches: ClientMatch {
                user_agent_prefixes: vec!["argocd/".into()],
                ..ClientMatch::default()
            },
            limits: limits(seats, 1, 50),
        });
        config
    }

    #[tokio::test(start_paused = true)]
    async fn each_class_has_its_own_seats_and_queues() {
        let (limiter, registry) = limiter(&with_ci_class(config(2, 1, 50), 1));
        let (a, b, c) = (ClientKey::new("a"), ClientKey::new("b"), ClientKey::new("c"));
        let _default = limiter.acquire(short(&a)).await.expect("admitted");
        let mut waiting = Box::pin(limiter.acquire(short(&b)));
        assert!(
            futures::poll!(&mut waiting).is_pending(),
            "the default class's one seat is taken"
        );
        let ci = Demand {
            user_agent: Some("argocd/v2.9"),
            ..short(&c)
        };
        let in_ci = admitted(limiter.acquire(ci).now_or_never());
        assert_eq!(in_ci.class(), "ci");
        assert_eq!(counts(&limiter, "ci"), (1, 0, 1));
        assert_eq!(counts(&limiter, DEFAULT_CLASS), (1, 1, 2));
        drop(in_ci);
        assert!(
            futures::poll!(&mut waiting).is_pending(),
            "a ci seat is not a default seat"
        );
        assert!(encode(&registry).contains(r#"kache_flowcontrol_request_concurrency_limit{class="ci"} 1"#));
    }

    #[tokio::test(start_paused = true)]
    async fn a_class_added_by_reconfiguration_takes_new_requests_only() {
        let (limiter, _registry) = limiter(&config(2, 1, 50));
        let (a, b, c) = (ClientKey::new("a"), ClientKey::new("b"), ClientKey::new("c"));
        let held = limiter.acquire(short(&a)).await.expect("admitted");
        let other = limiter.acquire(short(&c)).await.expect("admitted");
        let ci = Demand {
            user_agent: Some("argocd/v2.9"),
            ..short(&b)
        };
        let mut queued = Box::pin(limiter.acquire(ci));
        assert!(futures::poll!(&mut queued).is_pending(), "in the default class");

        limiter.reconfigure(&with_ci_class(config(2, 1, 50), 1));
        assert_eq!(
            counts(&limiter, DEFAULT_CLASS),
            (2, 1, 3),
            "the queued request stays"
        );
        let new_ci = admitted(limiter.acquire(ci).now_or_never());
        assert_eq!(new_ci.class(), "ci");
        drop(held);
        assert!(
            futures::poll!(&mut queued).is_pending(),
            "the default class now has one seat"
        );
        drop(other);
        assert_eq!(queued.await.expect("completes").class(), DEFAULT_CLASS);
    }

    #[test]
    fn client_keys_prefer_the_user_then_the_token_then_address_and_user_agent() {
        let peer: SocketAddr = "127.0.0.1:50000".parse().expect("addr");
        let mut headers = HeaderMap::new();
        headers.insert(
            header::USER_AGENT,
            "kubectl/v1.30.0 (linux/amd64)".parse().expect("value"),
        );
        assert_eq!(
            ClientKey::identify(peer, &headers, None).as_str(),
            "127.0.0.1 kubectl/v1.30.0 (linux/amd64)"
        );
        let other_port: SocketAddr = "127.0.0.1:50001".parse().expect("addr");
        assert_eq!(
            ClientKey::identify(peer, &headers, None),
            ClientKey::identify(other_port, &headers, None),
            "one client over several connections"
        );

        headers.insert(
            header::AUTHORIZATION,
            "Bearer s3cret-token".parse().expect("value"),
        );
        let by_token = ClientKey::identify(peer, &headers, None);
        assert!(by_token.as_str().starts_with("token:"), "{by_token}");
        assert!(
            !by_token.as_str().contains("s3cret"),
            "the token itself never appears"
        );
        assert!(
            by_token.as_str().ends_with(" kubectl/v1.30.0 (linux/amd64)"),
            "{by_token}"
        );
        assert_eq!(
            by_token,
            ClientKey::identify(other_port, &headers, None),
            "stable"
        );
        headers.insert(header::AUTHORIZATION, "Bearer another".parse().expect("value"));
        assert_ne!(by_token, ClientKey::identify(peer, &headers, None));

        assert_eq!(
            ClientKey::identify(peer, &headers, Some("alice")).as_str(),
            "user:alice"
        );
        assert_eq!(
            ClientKey::identify(peer, &HeaderMap::new(), Some("")).as_str(),
            "127.0.0.1 -",
            "no user, no token, no User-Agent"
        );
    }

    #[test]
    fn client_keys_are_bounded() {
        let long = "é".repeat(ClientKey::MAX_LEN);
        let key = ClientKey::new(&long);
        assert!(key.as_str().len() <= ClientKey::MAX_LEN);
        assert!(long.starts_with(key.as_str()), "cut at a character boundary");
        let peer: SocketAddr = "[::1]:1".parse().expect("addr");
        let mut headers = HeaderMap::new();
        headers.insert(header::USER_AGENT, "x".repeat(8192).parse().expect("value"));
        assert!(ClientKey::identify(peer, &headers, None).as_str().len() <= ClientKey::MAX_LEN);
    }

    #[test]
    fn a_configured_client_id_header_and_the_user_agent_choice_shape_the_key() {
        let peer: SocketAddr = "127.0.0.1:4000".parse().expect("addr");
        let mut headers = HeaderMap::new();
        headers.insert(header::USER_AGENT, "kubectl/v1.32".parse().expect("value"));
        let by_header = ClientKeyConfig {
            header: Some("x-ci-job".into()),
            user_agent: true,
        };
        assert_eq!(
            ClientKey::identify_with(peer, &headers, None, &by_header).as_str(),
            "127.0.0.1 kubectl/v1.32"
        );
        headers.insert("x-ci-job", "job-17".parse().expect("value"));
        assert_eq!(
            ClientKey::identify_with(peer, &headers, None, &by_header).as_str(),
            "client:job-17"
        );
        assert_eq!(
            ClientKey::identify_with(peer, &headers, Some("alice"), &by_header).as_str(),
            "user:alice"
        );
        let without_agent = ClientKeyConfig {
            header: None,
            user_agent: false,
        };
        assert_eq!(
            ClientKey::identify_with(peer, &headers, None, &without_agent).as_str(),
            "127.0.0.1"
        );
    }

    #[test]
    fn a_demand_reads_the_user_agent_from_the_headers() {
        let key = ClientKey::new("k");
        let mut headers = HeaderMap::new();
        headers.insert(header::USER_AGENT, "helm/3.14".parse().expect("value"));
        let demand = Demand::new(&key, Some("bob"), &headers, "/api", true);
        assert_eq!(
            (demand.user_agent, demand.user, demand.path, demand.long_running),
            (Some("helm/3.14"), Some("bob"), "/api", true)
        );
    }
}
