//! A class's seats and its clients' queues: admission and fair dispatch.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use kache_config::ClassLimits;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{
    client_key::ClientKey, metrics::AdmitMetrics, metrics::ClassMetrics, permit::Kind, RejectReason, Rejected,
};

/// A priority class: its seats and its clients' queues.
pub(super) struct Class {
    pub(super) name: Arc<str>,
    pub(super) metrics: ClassMetrics,
    pub(super) state: Mutex<State>,
}

pub(super) struct State {
    pub(super) limits: ClassLimits,
    /// Seats in use.
    pub(super) executing: usize,
    /// Requests waiting, over all flows.
    pub(super) queued: usize,
    /// Clients with requests running or waiting; idle ones are removed.
    pub(super) flows: HashMap<ClientKey, Flow>,
    /// Arrival order of waiting requests, across flows.
    pub(super) next_ticket: u64,
}

#[derive(Default)]
pub(super) struct Flow {
    pub(super) executing: usize,
    pub(super) long_running: usize,
    pub(super) queue: VecDeque<Waiter>,
}

impl Flow {
    pub(super) fn is_idle(&self) -> bool {
        self.executing == 0 && self.long_running == 0 && self.queue.is_empty()
    }
}

pub(super) struct Waiter {
    pub(super) ticket: u64,
    pub(super) grant: oneshot::Sender<()>,
}

pub(super) enum Entry {
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
pub(super) struct Waiting {
    pub(super) class: Arc<Class>,
    pub(super) key: ClientKey,
    pub(super) ticket: u64,
    pub(super) granted: oneshot::Receiver<()>,
    pub(super) settled: bool,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if !self.settled && self.class.settle(&self.key, self.ticket, &mut self.granted) {
            self.class.release(&self.key, Kind::Short);
        }
    }
}

impl Class {
    pub(super) fn new(name: &str, limits: ClassLimits, metrics: &AdmitMetrics) -> Class {
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

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the state consistent before any call
        // that could panic, so a poisoned lock holds valid state.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn set_limits(&self, limits: ClassLimits) {
        let mut state = self.lock();
        self.metrics.limit.set(limits.seats as i64);
        state.limits = limits;
        self.dispatch(&mut state);
    }

    /// Takes a seat if one is free and the client is under its cap, else
    /// queues the request (or refuses it when the client's queue is full).
    pub(super) fn enter(&self, key: &ClientKey) -> Entry {
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
    pub(super) fn enter_long_running(&self, key: &ClientKey) -> bool {
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
    pub(super) fn settle(&self, key: &ClientKey, ticket: u64, granted: &mut oneshot::Receiver<()>) -> bool {
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

    pub(super) fn release(&self, key: &ClientKey, kind: Kind) {
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
    pub(super) fn dispatch(&self, state: &mut State) {
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

    pub(super) fn reject(&self, reason: RejectReason) -> Rejected {
        self.metrics.rejected[reason.index()].inc();
        Rejected {
            reason,
            class: self.name.clone(),
            retry_after: reason.retry_after(),
        }
    }
}
