//! Prometheus metrics, registered once, with bounded label sets: verbs,
//! status codes and outcome names, never raw paths or client addresses.

use std::sync::atomic::{AtomicBool, Ordering};

use kache_cache::Verb;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// How kache answered a request: the `outcome` of its metrics and log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// From the object cache (rv=0 reads, watches from memory).
    Cache,
    /// From the discovery cache.
    Discovery,
    /// Shared an upstream call made for an identical request.
    Coalesced,
    /// Sent to the API server, which answered (whatever its status).
    Forwarded,
    /// From memory because the API server could not answer (`cache.serveStale`).
    Stale,
    /// Refused by kache before reaching the API server (authentication,
    /// authorization, limits, a body over the limit, a bad request).
    Rejected,
    /// The API server could not be reached or broke the exchange.
    Error,
    /// The client went away before the answer (code 499).
    Cancelled,
}

impl Outcome {
    /// Every outcome, in the order the documentation lists them.
    pub const ALL: [Outcome; 8] = [
        Outcome::Cache,
        Outcome::Discovery,
        Outcome::Coalesced,
        Outcome::Forwarded,
        Outcome::Stale,
        Outcome::Rejected,
        Outcome::Error,
        Outcome::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Cache => "cache",
            Outcome::Discovery => "discovery",
            Outcome::Coalesced => "coalesced",
            Outcome::Forwarded => "forwarded",
            Outcome::Stale => "stale",
            Outcome::Rejected => "rejected",
            Outcome::Error => "error",
            Outcome::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl EncodeLabelValue for Outcome {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    pub verb: Verb,
    pub code: u16,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct VerbLabels {
    pub verb: Verb,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DecisionLabels {
    result: &'static str,
    source: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SourceLabels {
    source: &'static str,
}

/// The outcomes of one kind of check (authentication, authorization) by
/// result and source, and the time each took. Every series is made at
/// registration (so dashboards see zeros, not gaps) and recording is a
/// lookup in a short table: this runs on every request of shared mode.
#[derive(Clone)]
pub struct DecisionMetrics {
    results: Vec<((&'static str, &'static str), Counter)>,
    durations: Vec<(&'static str, Histogram)>,
}

impl DecisionMetrics {
    /// Registers `<name>_total` (by `result` and `source`) for these
    /// results and sources, and `<duration_name>` (by `source`) for the
    /// `timed` ones: those that do work worth timing (a review, a cache
    /// lookup); the sub-microsecond ones are only counted, to keep the hot
    /// path free of clock reads and histogram locks.
    pub fn register(
        registry: &mut Registry,
        (name, help): (&str, &str),
        duration_name: &str,
        results: &[&'static str],
        (sources, timed): (&[&'static str], &[&'static str]),
    ) -> DecisionMetrics {
        let counters = Family::<DecisionLabels, Counter>::default();
        // 1 µs … ~4 s: a remembered decision takes microseconds, a review milliseconds.
        let histograms = Family::<SourceLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(1e-6, 4.0, 12))
        });
        registry.register(name, help, counters.clone());
        registry.register(
            duration_name,
            format!("Time to the decision counted in kache_{name}_total, by source"),
            histograms.clone(),
        );
        let results = results
            .iter()
            .flat_map(|&result| sources.iter().map(move |&source| (result, source)))
            .map(|(result, source)| {
                let counter = counters.get_or_create(&DecisionLabels { result, source }).clone();
                ((result, source), counter)
            })
            .collect();
        let durations = timed
            .iter()
            .map(|&source| (source, histograms.get_or_create(&SourceLabels { source }).clone()))
            .collect();
        DecisionMetrics { results, durations }
    }

    /// Counts a decision and the time since `started`.
    ///
    /// # Panics
    /// Never for a result and source given at registration; others are
    /// not counted (and fail debug builds).
    pub fn record(&self, result: &'static str, source: &'static str, started: std::time::Instant) {
        match self
            .results
            .iter()
            .find(|((r, s), _)| *r == result && *s == source)
        {
            Some((_, counter)) => {
                counter.inc();
            }
            None => debug_assert!(false, "unregistered decision {result}/{source}"),
        }
        if let Some((_, histogram)) = self.durations.iter().find(|(s, _)| *s == source) {
            histogram.observe(started.elapsed().as_secs_f64());
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ErrorLabels {
    pub kind: &'static str,
}

/// Every metric kache exports.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    /// Time to response headers: for watches and upgrades, the time to start streaming.
    pub duration: Family<VerbLabels, Histogram>,
    pub errors: Family<ErrorLabels, Counter>,
    /// Reads answered from memory because the API server could not answer
    /// them (`cache.serveStale`), by why it could not.
    pub stale_answers: Family<ErrorLabels, Counter>,
    pub in_flight: Gauge,
    pub upstream_ready: Gauge,
    ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("kache");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "Requests answered on the main listener, by verb, status code and outcome",
            requests.clone(),
        );
        let duration = Family::<VerbLabels, Histogram>::new_with_constructor(|| {
            // 1 ms … ~16 s
            Histogram::new(exponential_buckets(0.001, 2.0, 15))
        });
        registry.register(
            "http_request_duration_seconds",
            "Time from request to response headers, by verb",
            duration.clone(),
        );
        let errors = Family::<ErrorLabels, Counter>::default();
        registry.register("errors", "kache's own error answers, by kind", errors.clone());
        let stale_answers = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "stale_answers",
            "Reads the API server could not answer, answered from memory (cache.serveStale), by why \
             (unreachable, timeout, failed, throttled, server_error)",
            stale_answers.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "http_requests_in_flight",
            "Requests being answered now",
            in_flight.clone(),
        );
        let upstream_ready = Gauge::default();
        registry.register(
            "upstream_ready",
            "1 once the API server has answered, else 0",
            upstream_ready.clone(),
        );
        Metrics {
            registry,
            requests,
            duration,
            errors,
            stale_answers,
            in_flight,
            upstream_ready,
            ready: AtomicBool::new(false),
        }
    }

    /// The registry, for components that register their own metrics at start.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Records that the API server answered (readiness).
    pub fn mark_ready(&self) {
        if !self.ready.swap(true, Ordering::Relaxed) {
            self.upstream_ready.set(1);
            tracing::info!("upstream answered: ready");
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// The registry in the Prometheus/OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("invariant: writing to a String cannot fail");
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_metrics_name_verbs_and_codes() {
        let metrics = Metrics::new();
        metrics
            .requests
            .get_or_create(&RequestLabels {
                verb: Verb::List,
                code: 200,
                outcome: Outcome::Forwarded,
            })
            .inc();
        metrics
            .duration
            .get_or_create(&VerbLabels { verb: Verb::List })
            .observe(0.01);
        metrics.mark_ready();
        let text = metrics.encode();
        assert!(
            text.contains(r#"kache_http_requests_total{verb="list",code="200",outcome="forwarded"} 1"#),
            "{text}"
        );
        assert!(
            text.contains("kache_http_request_duration_seconds_bucket"),
            "{text}"
        );
        assert!(text.contains("kache_upstream_ready 1"), "{text}");
    }
}
