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
//!
//! Layout: this module holds the stage's entry point ([`Limiter`]), what it
//! is asked ([`Demand`]) and how it refuses ([`Rejected`]); `client_key`
//! says who a request counts against, `classes` which class it falls in,
//! `queue` holds a class's seats, flows and fair dispatch, `permit` the seat
//! a request holds, `metrics` the `flowcontrol_*` series.

mod classes;
mod client_key;
mod metrics;
mod permit;
mod queue;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};

use http::{header, HeaderMap};
use kache_config::{LimitsConfig, EXEMPT_CLASS};
use prometheus_client::metrics::gauge::Gauge;
use tokio::time::Instant;

use self::{classes::Table, metrics::ClassLabel, permit::Held, permit::Kind, queue::Entry, queue::Waiting};

pub use client_key::ClientKey;
pub use metrics::AdmitMetrics;
pub use permit::Permit;

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

/// A request the limits refused: the client gets a 429 with `Retry-After`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("too many requests, please try again later: {reason} (priority class {class:?})")]
pub struct Rejected {
    pub reason: RejectReason,
    pub class: Arc<str>,
    /// Seconds, for `Retry-After` and `details.retryAfterSeconds`.
    pub retry_after: u32,
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
    /// [`Rejected`] when the client's queue is full, the wait timed out, or
    /// the client holds too many long-running requests.
    pub async fn acquire(&self, demand: Demand<'_>) -> Result<Permit, Rejected> {
        let class = {
            let table = self.table.read().unwrap_or_else(PoisonError::into_inner);
            match table.class_of(&demand) {
                Some(class) => class.clone(),
                None => {
                    self.exempt_executing.inc();
                    return Ok(Permit {
                        held: Held::Exempt(self.exempt_executing.clone()),
                        charged: None,
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
