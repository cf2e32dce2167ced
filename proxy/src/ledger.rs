//! The cost ledger: for each client (its [`ClientKey`]: the authenticated
//! user, the client-id header, a token's hash, or address + User-Agent, as
//! the limits see it), what it asked of kache and what that cost the API
//! server, counted since start — the answer to "which client costs the API
//! server what", which the API server's own metrics stopped giving when they
//! dropped the client label.
//!
//! Recording is a map lookup and a few relaxed atomic adds per request; the
//! map is bounded ([`MAX_CLIENTS`]): when full, the client idle longest is
//! folded into one aggregate row, so memory stays flat however many clients
//! come and go. Views ([`Ledger::view`]) sort by upstream cost and show the
//! top N with the rest aggregated; the Prometheus view ([`LedgerCollector`])
//! shows only the top [`METRIC_CLIENTS`], so its cardinality is bounded.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use dashmap::DashMap;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::MetricType;
use serde::Serialize;
use tokio::time::Instant;

use crate::admit::ClientKey;
use crate::metrics::Outcome;

/// Clients kept apart; more are folded into the aggregate row.
pub const MAX_CLIENTS: usize = 10_000;
/// Clients shown by name in `/metrics` (the rest as `client="(others)"`).
pub const METRIC_CLIENTS: usize = 10;
/// The name of the aggregate row.
pub const OTHERS: &str = "(others)";

/// One client's account. Every field only grows.
#[derive(Debug, Default)]
pub struct Account {
    /// Requests by [`Outcome`], in [`Outcome::ALL`] order.
    requests: [AtomicU64; Outcome::ALL.len()],
    bytes_sent: AtomicU64,
    objects_sent: AtomicU64,
    upstream_requests: AtomicU64,
    upstream_bytes: AtomicU64,
    /// Microseconds of upstream seats held (from admission to the end of
    /// the response body).
    seat_micros: AtomicU64,
    /// `429` answers the client got (kache's limits or the API server's APF).
    throttled: AtomicU64,
    /// Milliseconds since the ledger started, at the last request.
    last_seen_ms: AtomicU64,
}

impl Account {
    /// A request answered, with its outcome and status code.
    pub fn answered(&self, outcome: Outcome, code: u16) {
        self.requests[outcome as usize].fetch_add(1, Ordering::Relaxed);
        if code == 429 {
            self.throttled.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Response bytes written to the client.
    pub fn sent(&self, bytes: usize) {
        self.bytes_sent.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Objects kache rendered for the client itself (items of a list, a GET,
    /// watch events from memory).
    pub fn sent_objects(&self, objects: usize) {
        self.objects_sent.fetch_add(objects as u64, Ordering::Relaxed);
    }

    /// An upstream call made for the client (forwarded, or the call a
    /// coalesced group shared, charged to the request that made it).
    pub fn upstream_request(&self) {
        self.upstream_requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Bytes of an upstream response the client's call received.
    pub fn upstream_bytes(&self, bytes: usize) {
        self.upstream_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// A seat of the API server's held this long on the client's behalf.
    pub fn held_seat(&self, held: Duration) {
        self.seat_micros.fetch_add(
            u64::try_from(held.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    fn row(&self, client: &str, clients: u64) -> ClientRow {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ClientRow {
            client: client.to_string(),
            clients,
            requests: Outcome::ALL
                .iter()
                .map(|o| (o.as_str(), load(&self.requests[*o as usize])))
                .collect(),
            bytes_sent: load(&self.bytes_sent),
            objects_sent: load(&self.objects_sent),
            upstream_requests: load(&self.upstream_requests),
            upstream_bytes: load(&self.upstream_bytes),
            upstream_seat_seconds: load(&self.seat_micros) as f64 / 1e6,
            throttled: load(&self.throttled),
        }
    }

    /// Adds another account's counts to this one (folding into the aggregate).
    fn absorb(&self, other: &Account) {
        let add = |to: &AtomicU64, from: &AtomicU64| {
            to.fetch_add(from.load(Ordering::Relaxed), Ordering::Relaxed);
        };
        for (to, from) in self.requests.iter().zip(&other.requests) {
            add(to, from);
        }
        add(&self.bytes_sent, &other.bytes_sent);
        add(&self.objects_sent, &other.objects_sent);
        add(&self.upstream_requests, &other.upstream_requests);
        add(&self.upstream_bytes, &other.upstream_bytes);
        add(&self.seat_micros, &other.seat_micros);
        add(&self.throttled, &other.throttled);
    }
}

/// A client's row in [`LedgerView`]: counts since kache started.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientRow {
    pub client: String,
    /// How many clients the row stands for (1, or those aggregated).
    pub clients: u64,
    /// Requests by outcome (`cache`, `discovery`, `coalesced`, `forwarded`,
    /// `stale`, `rejected`, `error`, `cancelled`).
    pub requests: BTreeMap<&'static str, u64>,
    pub bytes_sent: u64,
    pub objects_sent: u64,
    pub upstream_requests: u64,
    pub upstream_bytes: u64,
    pub upstream_seat_seconds: f64,
    pub throttled: u64,
}

impl ClientRow {
    /// Total requests.
    pub fn total(&self) -> u64 {
        self.requests.values().sum()
    }

    /// Requests kept off the API server (answered from memory or by a
    /// call another request made).
    pub fn spared(&self) -> u64 {
        ["cache", "discovery", "coalesced", "stale"]
            .iter()
            .map(|o| self.requests.get(o).copied().unwrap_or(0))
            .sum()
    }

    /// The sort key: upstream seat time, then upstream requests, then bytes.
    fn cost(&self) -> (u64, u64, u64) {
        (
            (self.upstream_seat_seconds * 1e6) as u64,
            self.upstream_requests,
            self.upstream_bytes,
        )
    }
}

/// What `/debug/clients` shows.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LedgerView {
    /// Seconds the ledger has been counting.
    pub since_seconds: u64,
    /// Clients with their own account.
    pub tracked: usize,
    /// The top clients by upstream cost, most expensive first.
    pub clients: Vec<ClientRow>,
    /// Everyone else: clients past the top N, and clients folded away when
    /// the ledger was full. `None` when there is no one else.
    pub others: Option<ClientRow>,
}

/// Every client's account.
#[derive(Debug)]
pub struct Ledger {
    accounts: DashMap<ClientKey, Arc<Account>>,
    /// Clients folded away when the ledger was full, and how many.
    folded: Mutex<(u64, Arc<Account>)>,
    started: Instant,
    max_clients: usize,
}

impl Default for Ledger {
    fn default() -> Self {
        Ledger::new(MAX_CLIENTS)
    }
}

impl Ledger {
    pub fn new(max_clients: usize) -> Ledger {
        Ledger {
            accounts: DashMap::new(),
            folded: Mutex::new((0, Arc::new(Account::default()))),
            started: Instant::now(),
            max_clients: max_clients.max(1),
        }
    }

    /// The client's account, opened on its first request.
    pub fn account(&self, client: &ClientKey) -> Arc<Account> {
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        if let Some(account) = self.accounts.get(client) {
            account.last_seen_ms.store(now, Ordering::Relaxed);
            return Arc::clone(&account);
        }
        if self.accounts.len() >= self.max_clients {
            self.fold_idlest();
        }
        let account = Arc::clone(&self.accounts.entry(client.clone()).or_default());
        account.last_seen_ms.store(now, Ordering::Relaxed);
        account
    }

    /// Folds the client seen longest ago into the aggregate. Its requests
    /// still in flight keep counting into the folded account they hold,
    /// which is added now: the little they add afterwards is lost, the
    /// price of a bounded ledger.
    fn fold_idlest(&self) {
        let idlest = self
            .accounts
            .iter()
            .min_by_key(|e| e.value().last_seen_ms.load(Ordering::Relaxed))
            .map(|e| e.key().clone());
        if let Some((_, account)) = idlest.and_then(|key| self.accounts.remove(&key)) {
            let mut folded = self.folded.lock().unwrap_or_else(PoisonError::into_inner);
            folded.0 += 1;
            folded.1.absorb(&account);
        }
    }

    /// The top `limit` clients by upstream cost, the rest aggregated.
    pub fn view(&self, limit: usize) -> LedgerView {
        let mut rows: Vec<(ClientRow, Arc<Account>)> = self
            .accounts
            .iter()
            .map(|e| (e.value().row(e.key().as_str(), 1), Arc::clone(e.value())))
            .collect();
        rows.sort_by(|(a, _), (b, _)| b.cost().cmp(&a.cost()).then_with(|| a.client.cmp(&b.client)));
        let tracked = rows.len();
        let rest = rows.split_off(limit.min(rows.len()));
        let others = {
            let folded = self.folded.lock().unwrap_or_else(PoisonError::into_inner);
            let aggregate = Account::default();
            aggregate.absorb(&folded.1);
            for (_, account) in &rest {
                aggregate.absorb(account);
            }
            let count = folded.0 + rest.len() as u64;
            (count > 0).then(|| aggregate.row(OTHERS, count))
        };
        LedgerView {
            since_seconds: self.started.elapsed().as_secs(),
            tracked,
            clients: rows.into_iter().map(|(row, _)| row).collect(),
            others,
        }
    }
}

/// The ledger's Prometheus view: `kache_client_*_total` for the top
/// [`METRIC_CLIENTS`] clients by upstream cost, and `client="(others)"`.
#[derive(Debug)]
pub struct LedgerCollector(pub Arc<Ledger>);

impl Collector for LedgerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let view = self.0.view(METRIC_CLIENTS);
        let rows: Vec<&ClientRow> = view.clients.iter().chain(view.others.as_ref()).collect();
        type Field = fn(&ClientRow) -> f64;
        let series: [(&str, &str, Field); 5] = [
            (
                "client_requests",
                "Requests of the top clients by upstream cost (ledger; the rest as client=\"(others)\")",
                |r| r.total() as f64,
            ),
            (
                "client_spared_requests",
                "Requests of the top clients kept off the API server (cache, discovery, coalesced, stale)",
                |r| r.spared() as f64,
            ),
            (
                "client_upstream_requests",
                "Upstream calls made for the top clients",
                |r| r.upstream_requests as f64,
            ),
            (
                "client_upstream_seat_seconds",
                "API server seat time held for the top clients",
                |r| r.upstream_seat_seconds,
            ),
            (
                "client_throttled_requests",
                "429 answers the top clients got",
                |r| r.throttled as f64,
            ),
        ];
        for (name, help, field) in series {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for row in &rows {
                let labels = [("client", row.client.as_str())];
                let metric = family.encode_family(&labels)?;
                ConstCounter::new(field(row)).encode(metric)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(name: &str) -> ClientKey {
        ClientKey::new(name)
    }

    #[test]
    fn rows_sort_by_upstream_cost_and_the_rest_is_aggregated() {
        let ledger = Ledger::new(100);
        for (name, seat_ms, calls) in [("cheap", 1, 1), ("dear", 900, 3), ("middling", 40, 9)] {
            let account = ledger.account(&client(name));
            account.answered(Outcome::Forwarded, 200);
            account.held_seat(Duration::from_millis(seat_ms));
            for _ in 0..calls {
                account.upstream_request();
            }
        }
        ledger.account(&client("cheap")).answered(Outcome::Cache, 200);
        let view = ledger.view(2);
        let names: Vec<_> = view.clients.iter().map(|r| r.client.as_str()).collect();
        assert_eq!(names, ["dear", "middling"]);
        assert_eq!(view.tracked, 3);
        let others = view.others.expect("the cheap client, aggregated");
        assert_eq!((others.client.as_str(), others.clients), (OTHERS, 1));
        assert_eq!(others.requests["cache"], 1);
        assert_eq!(others.requests["forwarded"], 1);
        assert_eq!(others.spared(), 1);
        assert!((view.clients[0].upstream_seat_seconds - 0.9).abs() < 1e-9);
    }

    #[test]
    fn a_full_ledger_folds_its_idlest_client_and_loses_no_count() {
        let ledger = Ledger::new(2);
        for name in ["a", "b", "c", "d"] {
            let account = ledger.account(&client(name));
            account.answered(Outcome::Forwarded, 429);
            account.sent(10);
        }
        let view = ledger.view(10);
        assert_eq!(view.tracked, 2, "bounded");
        let total: u64 = view
            .clients
            .iter()
            .chain(view.others.as_ref())
            .map(ClientRow::total)
            .sum();
        assert_eq!(total, 4);
        let throttled: u64 = view
            .clients
            .iter()
            .chain(view.others.as_ref())
            .map(|r| r.throttled)
            .sum();
        assert_eq!(throttled, 4);
        let others = view.others.expect("folded clients");
        assert_eq!(others.clients, 2);
        assert_eq!(others.bytes_sent, 20);
    }

    #[test]
    fn the_metrics_view_names_at_most_the_top_clients() {
        let ledger = Arc::new(Ledger::new(1000));
        for i in 0..(METRIC_CLIENTS + 5) {
            let account = ledger.account(&client(&format!("c{i:02}")));
            account.upstream_request();
            account.held_seat(Duration::from_millis(i as u64 + 1));
        }
        let mut registry = prometheus_client::registry::Registry::with_prefix("kache");
        registry.register_collector(Box::new(LedgerCollector(ledger)));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        let series = text
            .lines()
            .filter(|l| l.starts_with("kache_client_upstream_requests_total{"))
            .count();
        assert_eq!(series, METRIC_CLIENTS + 1, "{text}");
        assert!(
            text.contains("kache_client_upstream_requests_total{client=\"(others)\"} 5"),
            "{text}"
        );
        assert!(text.contains("client=\"c14\""), "the dearest is named: {text}");
        assert!(!text.contains("client=\"c00\""), "the cheapest is not: {text}");
    }
}
