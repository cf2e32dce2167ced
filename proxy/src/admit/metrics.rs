//! The admit stage's metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::RejectReason;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct ClassLabel {
    pub(super) class: String,
}

impl ClassLabel {
    pub(super) fn new(class: &str) -> ClassLabel {
        ClassLabel {
            class: class.to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct RejectedLabels {
    pub(super) class: String,
    pub(super) reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct WaitLabels {
    pub(super) class: String,
    /// `true` if the request went on to execute, `false` if it was rejected.
    pub(super) execute: &'static str,
}

/// APF's buckets for both waits and executions (seconds).
pub(super) const DURATION_BUCKETS: [f64; 12] =
    [0.005, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 30.0];

pub(super) fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

/// The admit stage's metrics, named after APF's `apiserver_flowcontrol_*`
/// and labelled by class (bounded by the config), never by client.
#[derive(Debug, Clone)]
pub struct AdmitMetrics {
    pub(super) executing: Family<ClassLabel, Gauge>,
    pub(super) long_running: Family<ClassLabel, Gauge>,
    pub(super) queued: Family<ClassLabel, Gauge>,
    pub(super) limit: Family<ClassLabel, Gauge>,
    pub(super) dispatched: Family<ClassLabel, Counter>,
    pub(super) rejected: Family<RejectedLabels, Counter>,
    pub(super) wait: Family<WaitLabels, Histogram>,
    pub(super) execution: Family<ClassLabel, Histogram>,
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
    pub(super) fn class(&self, name: &str) -> ClassMetrics {
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

pub(super) struct ClassMetrics {
    pub(super) executing: Gauge,
    pub(super) long_running: Gauge,
    pub(super) queued: Gauge,
    pub(super) limit: Gauge,
    pub(super) dispatched: Counter,
    pub(super) rejected: [Counter; 3],
    pub(super) wait_admitted: Histogram,
    pub(super) wait_rejected: Histogram,
    pub(super) execution: Histogram,
}
