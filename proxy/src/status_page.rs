//! The admin listener's status page (`/`, and its JSON twin `/?format=json`):
//! what an operator wants at a glance — readiness, the API server's health
//! and version, the requests kache answered and what that spared the API
//! server, every cached resource, discovery, the limits of each class and
//! the clients that cost the API server most.
//!
//! ```text
//!  Metrics::encode ──┐
//!  Cache::debug_view ┼─► gather ─► Status ─┬─► render: HTML (inline CSS and SVG)
//!  Ledger::view ─────┤                     └─► serde: JSON
//!  readiness, version, history ─┘
//! ```
//!
//! Server-rendered, refreshed by the browser every few seconds (`<meta
//! http-equiv="refresh">`): no script, nothing loaded from elsewhere (the
//! admin listener also sends a `Content-Security-Policy` saying so), and
//! every string that comes from clients or the cluster (client keys,
//! resource names, versions, reasons) is escaped.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::admin::{AdminState, Sample};
use crate::ledger::{ClientRow, LedgerView};
use crate::metrics::{Metrics, Outcome};

/// Clients listed by name; the rest share a row.
const CLIENTS_SHOWN: usize = 10;
/// Seconds between the browser's reloads of the page.
const REFRESH_SECONDS: u32 = 5;

/// Outcomes that spared the API server a request of its own.
const SPARING: [Outcome; 4] = [
    Outcome::Cache,
    Outcome::Discovery,
    Outcome::Coalesced,
    Outcome::Stale,
];

/// Everything the page shows.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub kache_version: &'static str,
    pub mode: &'static str,
    pub uptime_seconds: u64,
    pub ready: bool,
    pub checks: Vec<Check>,
    pub upstream: Upstream,
    pub requests: Requests,
    /// Samples of the request counters, oldest first (see [`Sample`]).
    pub history: Vec<Sample>,
    pub cache: CacheState,
    pub discovery: DiscoveryState,
    pub classes: Vec<ClassState>,
    pub clients: LedgerView,
}

/// A readiness check, as `/readyz?verbose` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Upstream {
    pub url: String,
    /// The API server has answered since kache started.
    pub answered: bool,
    pub version: Option<String>,
    pub platform: Option<String>,
    pub version_age_seconds: Option<u64>,
    /// kache's answers for an upstream that failed, by kind
    /// (`upstream_unreachable`, `upstream_timeout`, …).
    pub errors: Vec<(String, u64)>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Requests {
    /// In [`Outcome::ALL`] order.
    pub by_outcome: Vec<(&'static str, u64)>,
    pub total: u64,
    /// Answered without an upstream request of their own.
    pub spared: u64,
    pub forwarded: u64,
    pub in_flight: u64,
}

impl Requests {
    /// The share of requests that spared the API server, once there are any.
    pub fn spared_ratio(&self) -> Option<f64> {
        (self.total > 0).then(|| self.spared as f64 / self.total as f64)
    }
}

/// A store of the object cache, as `/debug/cache` shows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ResourceRow {
    pub group: String,
    pub version: String,
    pub resource: String,
    pub kind: String,
    pub encoding: String,
    pub synced: bool,
    pub objects: u64,
    pub bytes: u64,
    pub resource_version: String,
    pub watchers: u64,
    pub hits: u64,
    pub forwarded_reads: u64,
    pub hit_ratio: Option<f64>,
    pub idle_seconds: u64,
    pub staleness_seconds: Option<u64>,
}

impl ResourceRow {
    /// `v1/pods`, `apps/v1/deployments`: as the metrics label it.
    pub fn label(&self) -> String {
        if self.group.is_empty() {
            format!("{}/{}", self.version, self.resource)
        } else {
            format!("{}/{}/{}", self.group, self.version, self.resource)
        }
    }
}

/// A resource kache forwards for a while, and why.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct NotCachedRow {
    pub group: String,
    pub version: String,
    pub resource: String,
    pub encoding: Option<String>,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CacheState {
    pub enabled: bool,
    pub memory_budget_bytes: u64,
    pub resources: Vec<ResourceRow>,
    pub not_cached: Vec<NotCachedRow>,
    /// Resource reads forwarded, by why.
    pub forwarded_by_reason: Vec<(String, u64)>,
    pub evictions: u64,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DiscoveryState {
    /// The CRD and APIService watches are established: discovery answers
    /// from memory.
    pub synced: bool,
    pub entries: u64,
    pub invalidations: u64,
    pub kinds: Vec<DiscoveryKind>,
}

#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DiscoveryKind {
    pub kind: String,
    pub hits: u64,
    pub misses: u64,
    pub refreshes: u64,
    pub bypassed: u64,
}

/// A priority class of the limits (`kache_flowcontrol_*`).
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClassState {
    pub class: String,
    /// `None` for the exempt class, which has no seats.
    pub seats: Option<u64>,
    pub executing: u64,
    pub long_running: u64,
    pub queued: u64,
    pub dispatched: u64,
    pub rejected: u64,
    pub rejected_by_reason: Vec<(String, u64)>,
}

// ----------------------------------------------------------------- gather ----

/// Reads what the page shows from the admin state.
pub fn gather(state: &AdminState) -> Status {
    let readings = Readings::parse(&state.metrics.encode());
    let checks: Vec<Check> = state
        .readiness()
        .into_iter()
        .map(|(name, result)| Check {
            name,
            ok: result.is_ok(),
            reason: result.err(),
        })
        .collect();
    let version = state.upstream.version();
    let view = state.cache.debug_view();
    let outcomes = readings.by("kache_http_requests_total", "outcome");
    let count = |outcome: Outcome| outcomes.get(outcome.as_str()).copied().unwrap_or(0.0) as u64;
    let by_outcome: Vec<(&'static str, u64)> = Outcome::ALL.iter().map(|o| (o.as_str(), count(*o))).collect();
    Status {
        kache_version: env!("CARGO_PKG_VERSION"),
        mode: state.mode,
        uptime_seconds: state.started.elapsed().as_secs(),
        ready: checks.iter().all(|c| c.ok),
        checks,
        upstream: Upstream {
            url: state.upstream.url.clone(),
            answered: state.metrics.is_ready(),
            version: version.as_ref().map(|(v, _)| v.git_version.clone()),
            platform: version.as_ref().map(|(v, _)| v.platform.clone()),
            version_age_seconds: version.as_ref().map(|(_, age)| age.as_secs()),
            errors: readings
                .by("kache_errors_total", "kind")
                .into_iter()
                .filter(|(kind, _)| kind.starts_with("upstream_"))
                .map(|(kind, n)| (kind, n as u64))
                .collect(),
        },
        requests: Requests {
            total: by_outcome.iter().map(|(_, n)| n).sum(),
            spared: SPARING.iter().map(|o| count(*o)).sum(),
            forwarded: count(Outcome::Forwarded),
            by_outcome,
            in_flight: readings.sum("kache_http_requests_in_flight", &[]) as u64,
        },
        history: state.history.samples(),
        cache: CacheState {
            enabled: view["enabled"].as_bool().unwrap_or(false),
            memory_budget_bytes: view["memoryBudgetBytes"].as_u64().unwrap_or(0),
            resources: serde_json::from_value(view["resources"].clone()).unwrap_or_default(),
            not_cached: serde_json::from_value(view["forwarded"].clone()).unwrap_or_default(),
            forwarded_by_reason: readings
                .by("kache_cache_forwarded_total", "reason")
                .into_iter()
                .map(|(reason, n)| (reason, n as u64))
                .collect(),
            evictions: readings.sum("kache_cache_evictions_total", &[]) as u64,
        },
        discovery: discovery_state(&readings),
        classes: classes(&readings),
        clients: state.ledger.view(CLIENTS_SHOWN),
    }
}

fn discovery_state(readings: &Readings) -> DiscoveryState {
    let mut kinds: BTreeMap<String, DiscoveryKind> = BTreeMap::new();
    for (name, field) in [
        ("kache_discovery_hits_total", 0),
        ("kache_discovery_misses_total", 1),
        ("kache_discovery_refreshes_total", 2),
        ("kache_discovery_bypassed_total", 3),
    ] {
        for (kind, n) in readings.by(name, "kind") {
            let row = kinds.entry(kind.clone()).or_insert_with(|| DiscoveryKind {
                kind,
                ..DiscoveryKind::default()
            });
            let n = n as u64;
            match field {
                0 => row.hits = n,
                1 => row.misses = n,
                2 => row.refreshes = n,
                _ => row.bypassed = n,
            }
        }
    }
    DiscoveryState {
        synced: readings.sum("kache_discovery_synced", &[]) > 0.0,
        entries: readings.sum("kache_discovery_entries", &[]) as u64,
        invalidations: readings.sum("kache_discovery_invalidations_total", &[]) as u64,
        kinds: kinds.into_values().collect(),
    }
}

fn classes(readings: &Readings) -> Vec<ClassState> {
    fn row<'a>(classes: &'a mut BTreeMap<String, ClassState>, class: &str) -> &'a mut ClassState {
        classes.entry(class.to_string()).or_insert_with(|| ClassState {
            class: class.to_string(),
            ..ClassState::default()
        })
    }
    let mut classes: BTreeMap<String, ClassState> = BTreeMap::new();
    for (class, n) in readings.by("kache_flowcontrol_request_concurrency_limit", "class") {
        row(&mut classes, &class).seats = Some(n as u64);
    }
    for (class, n) in readings.by("kache_flowcontrol_current_executing_requests", "class") {
        row(&mut classes, &class).executing = n as u64;
    }
    for (class, n) in readings.by("kache_flowcontrol_current_long_running_requests", "class") {
        row(&mut classes, &class).long_running = n as u64;
    }
    for (class, n) in readings.by("kache_flowcontrol_current_inqueue_requests", "class") {
        row(&mut classes, &class).queued = n as u64;
    }
    for (class, n) in readings.by("kache_flowcontrol_dispatched_requests_total", "class") {
        row(&mut classes, &class).dispatched = n as u64;
    }
    for series in readings.named("kache_flowcontrol_rejected_requests_total") {
        let (Some(class), Some(reason)) = (series.label("class"), series.label("reason")) else {
            continue;
        };
        let state = row(&mut classes, class);
        state.rejected += series.value as u64;
        state
            .rejected_by_reason
            .push((reason.to_string(), series.value as u64));
    }
    classes.into_values().collect()
}

/// A sample for the history: the request counters now. Encodes only the
/// requests family, not the whole registry (whose ledger view sorts every
/// client), so sampling stays cheap.
pub fn sample(metrics: &Metrics, uptime: Duration) -> Sample {
    let mut registry = prometheus_client::registry::Registry::with_prefix("kache");
    registry.register("http_requests", "", metrics.requests.clone());
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)
        .expect("invariant: writing to a String cannot fail");
    let outcomes = Readings::parse(&text).by("kache_http_requests_total", "outcome");
    let count = |outcome: Outcome| outcomes.get(outcome.as_str()).copied().unwrap_or(0.0) as u64;
    Sample {
        at_seconds: uptime.as_secs(),
        spared: SPARING.iter().map(|o| count(*o)).sum(),
        forwarded: count(Outcome::Forwarded),
    }
}

// --------------------------------------------------------------- metrics ----

/// One series of the metrics text and its value.
#[derive(Debug, Clone, PartialEq)]
struct Series {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

impl Series {
    fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// The series of a Prometheus/OpenMetrics text, as kache writes it.
struct Readings(Vec<Series>);

impl Readings {
    fn parse(text: &str) -> Readings {
        Readings(
            text.lines()
                .filter(|line| !line.starts_with('#') && !line.is_empty())
                .filter_map(parse_series)
                .collect(),
        )
    }

    fn named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Series> + 'a {
        self.0.iter().filter(move |s| s.name == name)
    }

    /// The sum of the series of `name` that carry all of `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.named(name)
            .filter(|s| labels.iter().all(|(k, v)| s.label(k) == Some(v)))
            .map(|s| s.value)
            .sum()
    }

    /// The series of `name` summed by the value of one label.
    fn by(&self, name: &str, label: &str) -> BTreeMap<String, f64> {
        let mut sums = BTreeMap::new();
        for series in self.named(name) {
            if let Some(value) = series.label(label) {
                *sums.entry(value.to_string()).or_insert(0.0) += series.value;
            }
        }
        sums
    }
}

/// `name{key="value",…} value`, label values unescaped (`\\`, `\"`, `\n`).
fn parse_series(line: &str) -> Option<Series> {
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_string();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        rest = inner;
        loop {
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, after) = rest.split_once("=\"")?;
            let mut value = String::new();
            let mut end = None;
            let mut chars = after.char_indices();
            while let Some((at, c)) = chars.next() {
                match c {
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    '"' => {
                        end = Some(at);
                        break;
                    }
                    c => value.push(c),
                }
            }
            rest = &after[end? + 1..];
            rest = rest.strip_prefix(',').unwrap_or(rest);
            labels.push((key.to_string(), value));
        }
    }
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Series { name, labels, value })
}

// ----------------------------------------------------------------- render ----

/// Escapes text for HTML content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn duration(seconds: u64) -> String {
    match seconds {
        s if s < 60 => format!("{s} s"),
        s if s < 3600 => format!("{} min {} s", s / 60, s % 60),
        s if s < 86_400 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        s => format!("{} d {} h", s / 86_400, s % 86_400 / 3600),
    }
}

fn percent(ratio: f64) -> String {
    format!("{:.0}%", ratio * 100.0)
}

/// The colour of an outcome in the charts.
fn colour(outcome: &str) -> &'static str {
    match outcome {
        "cache" => "#2e7d32",
        "discovery" => "#66bb6a",
        "coalesced" => "#9ccc65",
        "stale" => "#c0ca33",
        "forwarded" => "#90a4ae",
        "rejected" => "#ef6c00",
        "error" => "#c62828",
        _ => "#bdbdbd",
    }
}

/// A horizontal bar filled to `ratio`.
fn ratio_bar(ratio: f64, label: &str) -> String {
    let width = 100.0;
    let filled = (ratio.clamp(0.0, 1.0) * width).round();
    format!(
        r##"<svg class="bar" width="100" height="10" viewBox="0 0 100 10" role="img" aria-label="{}"><rect width="100" height="10" fill="#e0e0e0"/><rect width="{filled}" height="10" fill="#2e7d32"/></svg>"##,
        escape(label)
    )
}

/// The requests by outcome as one stacked bar, with its legend.
fn outcome_bar(requests: &Requests) -> String {
    let mut svg = String::from(
        r#"<svg class="outcomes" width="100%" height="18" viewBox="0 0 1000 18" preserveAspectRatio="none" role="img" aria-label="requests by outcome">"#,
    );
    let mut legend = String::from(r#"<ul class="legend">"#);
    if requests.total == 0 {
        svg.push_str(r##"<rect width="1000" height="18" fill="#e0e0e0"/>"##);
    }
    let mut x = 0.0;
    for (outcome, n) in &requests.by_outcome {
        if *n == 0 {
            continue;
        }
        let width = *n as f64 / requests.total as f64 * 1000.0;
        let _ = write!(
            svg,
            r#"<rect x="{x:.1}" width="{width:.1}" height="18" fill="{}"><title>{outcome}: {n}</title></rect>"#,
            colour(outcome)
        );
        x += width;
        let _ = write!(
            legend,
            r#"<li><span class="swatch" style="background:{}"></span>{outcome} <b>{n}</b></li>"#,
            colour(outcome)
        );
    }
    svg.push_str("</svg>");
    legend.push_str("</ul>");
    svg + &legend
}

/// Requests spared and forwarded per sampling interval, as two lines.
fn sparkline(history: &[Sample]) -> String {
    if history.len() < 2 {
        return r#"<p class="muted">collecting samples…</p>"#.to_string();
    }
    let steps: Vec<(u64, u64, u64)> = history
        .windows(2)
        .map(|w| {
            (
                w[1].at_seconds,
                w[1].spared.saturating_sub(w[0].spared),
                w[1].forwarded.saturating_sub(w[0].forwarded),
            )
        })
        .collect();
    let (width, height) = (600.0, 60.0);
    let top = steps
        .iter()
        .map(|(_, s, f)| (*s).max(*f))
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    // One step is drawn as a flat line across.
    let drawn: Vec<(u64, u64, u64)> = if steps.len() == 1 {
        vec![steps[0], steps[0]]
    } else {
        steps.clone()
    };
    let span = (drawn.len() - 1) as f64;
    let points = |pick: &dyn Fn(&(u64, u64, u64)) -> u64| -> String {
        drawn
            .iter()
            .enumerate()
            .map(|(i, step)| {
                let x = i as f64 / span * width;
                let y = height - pick(step) as f64 / top * (height - 2.0) - 1.0;
                format!("{x:.1},{y:.1}")
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    let first = history.first().map_or(0, |s| s.at_seconds);
    let last = history.last().map_or(0, |s| s.at_seconds);
    let spared: u64 = steps.iter().map(|(_, s, _)| s).sum();
    let forwarded: u64 = steps.iter().map(|(_, _, f)| f).sum();
    format!(
        r##"<svg class="spark" width="100%" height="60" viewBox="0 0 600 60" preserveAspectRatio="none" role="img" aria-label="upstream requests saved per {period} s"><polyline fill="none" stroke="#90a4ae" stroke-width="1.5" points="{fwd}"/><polyline fill="none" stroke="#2e7d32" stroke-width="2" points="{saved}"/></svg><p class="muted"><span class="swatch" style="background:#2e7d32"></span>saved <b>{spared}</b> <span class="swatch" style="background:#90a4ae"></span>forwarded <b>{forwarded}</b> over the last {window} (per {period} s, peak {top})</p>"##,
        period = crate::admin::SAMPLE_PERIOD.as_secs(),
        fwd = points(&|s| s.2),
        saved = points(&|s| s.1),
        window = duration(last.saturating_sub(first)),
        top = top as u64,
    )
}

const STYLE: &str = "
body{font:14px/1.4 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;color:#212121;background:#fafafa}
header{background:#263238;color:#fff;padding:12px 24px;display:flex;gap:24px;align-items:baseline;flex-wrap:wrap}
header h1{margin:0;font-size:20px}
header a{color:#b0bec5}
main{padding:16px 24px;max-width:1400px}
section{background:#fff;border:1px solid #e0e0e0;border-radius:6px;padding:12px 16px;margin:0 0 16px}
h2{font-size:16px;margin:0 0 8px}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(320px,1fr));gap:16px}
.grid section{margin:0}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #eee;vertical-align:middle}
th{font-weight:600;color:#546e7a;font-size:12px;text-transform:uppercase}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-weight:600;font-size:12px}
.ok{background:#e8f5e9;color:#1b5e20}.failed{background:#ffebee;color:#b71c1c}
.muted{color:#78909c;margin:4px 0}
ul.checks,ul.legend{list-style:none;padding:0;margin:4px 0;display:flex;flex-wrap:wrap;gap:6px 16px}
.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin:0 4px 0 0}
.big{font-size:28px;font-weight:600}
svg.bar{vertical-align:middle;margin-right:6px}
code{font-size:12px;word-break:break-all}
";

fn yes_no(ok: bool) -> &'static str {
    if ok {
        r#"<span class="badge ok">yes</span>"#
    } else {
        r#"<span class="badge failed">no</span>"#
    }
}

/// The page.
pub fn render(status: &Status) -> String {
    let mut html = String::with_capacity(16 * 1024);
    let _ = write!(
        html,
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="{REFRESH_SECONDS}">
<meta name="viewport" content="width=device-width,initial-scale=1"><title>kache {state}</title><style>{STYLE}</style></head>
<body><header><h1>kache</h1><span>{version} · {mode} mode · up {uptime}</span><span id="ready" class="badge {class}">{state}</span>
<a href="/readyz?verbose">readyz</a> <a href="/metrics">metrics</a> <a href="/debug/cache">debug/cache</a> <a href="/debug/clients">debug/clients</a> <a href="/?format=json">json</a></header><main>
"#,
        version = escape(status.kache_version),
        mode = status.mode,
        uptime = duration(status.uptime_seconds),
        class = if status.ready { "ok" } else { "failed" },
        state = if status.ready { "ready" } else { "not ready" },
    );
    readiness_section(&mut html, status);
    html.push_str(r#"<div class="grid">"#);
    upstream_section(&mut html, status);
    requests_section(&mut html, status);
    html.push_str("</div><p></p>");
    resources_section(&mut html, &status.cache);
    html.push_str(r#"<div class="grid">"#);
    classes_section(&mut html, &status.classes);
    discovery_section(&mut html, &status.discovery);
    html.push_str("</div><p></p>");
    clients_section(&mut html, &status.clients);
    let _ = writeln!(
        html,
        r#"<p class="muted">This page reloads every {REFRESH_SECONDS} s.</p></main></body></html>"#
    );
    html
}

fn readiness_section(html: &mut String, status: &Status) {
    html.push_str(r#"<section id="checks"><h2>Readiness</h2><ul class="checks">"#);
    for check in &status.checks {
        let (class, text) = if check.ok {
            ("ok", "ok".to_string())
        } else {
            (
                "failed",
                format!("failed: {}", escape(check.reason.as_deref().unwrap_or(""))),
            )
        };
        let _ = write!(
            html,
            r#"<li class="check" data-check="{name}"><span class="badge {class}">{name}</span> {text}</li>"#,
            name = check.name
        );
    }
    html.push_str("</ul></section>");
}

fn upstream_section(html: &mut String, status: &Status) {
    let upstream = &status.upstream;
    let version = match (
        &upstream.version,
        &upstream.platform,
        upstream.version_age_seconds,
    ) {
        (Some(version), platform, age) => format!(
            r#"<span id="upstream-version">{}</span> {} <span class="muted">(asked {} ago)</span>"#,
            escape(version),
            escape(platform.as_deref().unwrap_or("")),
            duration(age.unwrap_or(0))
        ),
        _ => r#"<span class="muted">not known yet</span>"#.to_string(),
    };
    let _ = write!(
        html,
        r#"<section id="upstream"><h2>API server</h2><table>
<tr><th>URL</th><td><code>{url}</code></td></tr>
<tr><th>answered</th><td>{answered}</td></tr>
<tr><th>version</th><td>{version}</td></tr>
<tr><th>discovery watches</th><td>{watches}</td></tr>
"#,
        url = escape(&upstream.url),
        answered = yes_no(upstream.answered),
        watches = yes_no(status.discovery.synced),
    );
    let synced = status.cache.resources.iter().filter(|r| r.synced).count();
    let _ = write!(
        html,
        "<tr><th>stores in sync</th><td>{synced} of {}</td></tr>",
        status.cache.resources.len()
    );
    if upstream.errors.iter().all(|(_, n)| *n == 0) {
        html.push_str("<tr><th>upstream errors</th><td>none</td></tr>");
    } else {
        for (kind, n) in &upstream.errors {
            let _ = write!(html, "<tr><th>{}</th><td>{n}</td></tr>", escape(kind));
        }
    }
    html.push_str("</table></section>");
}

fn requests_section(html: &mut String, status: &Status) {
    let requests = &status.requests;
    let _ = write!(
        html,
        r#"<section id="requests"><h2>Requests</h2>
<p><span class="big" id="spared">{spared}</span> of <b id="total">{total}</b> requests spared the API server ({ratio}): answered from memory or by an identical request's call. <b>{forwarded}</b> forwarded, <b>{in_flight}</b> in flight now.</p>
{bar}<h2>Upstream requests saved over time</h2>{spark}</section>"#,
        spared = requests.spared,
        total = requests.total,
        ratio = requests.spared_ratio().map_or_else(|| "—".to_string(), percent),
        forwarded = requests.forwarded,
        in_flight = requests.in_flight,
        bar = outcome_bar(requests),
        spark = sparkline(&status.history),
    );
}

fn resources_section(html: &mut String, cache: &CacheState) {
    let held: u64 = cache.resources.iter().map(|r| r.bytes).sum();
    let _ = write!(
        html,
        r#"<section id="resources"><h2>Cached resources</h2><p class="muted">{state} · {held} held of a {budget} budget · {evictions} evicted over the budget</p>"#,
        state = if cache.enabled {
            "cache enabled"
        } else {
            "cache disabled"
        },
        held = bytes(held),
        budget = bytes(cache.memory_budget_bytes),
        evictions = cache.evictions,
    );
    if cache.resources.is_empty() {
        html.push_str(r#"<p class="muted">Nothing cached yet: a store starts with the first cacheable read of its resource (a LIST or WATCH at resourceVersion=0, a GET from a watch cache).</p>"#);
    } else {
        html.push_str(
            r#"<table><thead><tr><th>resource</th><th>kind</th><th>encoding</th><th>synced</th><th class="num">objects</th><th class="num">bytes</th><th class="num">resourceVersion</th><th class="num">watchers</th><th class="num">hits</th><th class="num">forwarded</th><th>hit ratio</th><th class="num">idle</th></tr></thead><tbody>"#,
        );
        for r in &cache.resources {
            let label = r.label();
            let synced = match (r.synced, r.staleness_seconds) {
                (true, _) => yes_no(true).to_string(),
                (false, Some(s)) => format!("{} {} behind", yes_no(false), duration(s)),
                (false, None) => format!("{} never", yes_no(false)),
            };
            let ratio = match r.hit_ratio {
                Some(ratio) => format!(
                    "{}{}",
                    ratio_bar(ratio, &format!("hit ratio {}", percent(ratio))),
                    percent(ratio)
                ),
                None => r#"<span class="muted">no reads</span>"#.to_string(),
            };
            let _ = write!(
                html,
                r#"<tr class="resource" data-resource="{label}" data-encoding="{encoding}"><td class="name">{label}</td><td class="kind">{kind}</td><td class="encoding">{encoding}</td><td class="synced">{synced}</td><td class="num objects">{objects}</td><td class="num bytes">{bytes}</td><td class="num rv">{rv}</td><td class="num watchers">{watchers}</td><td class="num hits">{hits}</td><td class="num forwarded">{forwarded}</td><td class="ratio">{ratio}</td><td class="num idle">{idle}</td></tr>"#,
                label = escape(&label),
                kind = escape(&r.kind),
                encoding = escape(&r.encoding),
                objects = r.objects,
                bytes = bytes(r.bytes),
                rv = escape(&r.resource_version),
                watchers = r.watchers,
                hits = r.hits,
                forwarded = r.forwarded_reads,
                idle = duration(r.idle_seconds),
            );
        }
        html.push_str("</tbody></table>");
    }
    if !cache.forwarded_by_reason.is_empty() {
        html.push_str(r#"<p class="muted">Resource reads forwarded, by why: "#);
        let reasons: Vec<String> = cache
            .forwarded_by_reason
            .iter()
            .map(|(reason, n)| format!("{} <b>{n}</b>", escape(reason)))
            .collect();
        html.push_str(&reasons.join(" · "));
        html.push_str("</p>");
    }
    if !cache.not_cached.is_empty() {
        html.push_str(r#"<p class="muted">Forwarded for a while: "#);
        let rows: Vec<String> = cache
            .not_cached
            .iter()
            .map(|r| {
                let resource = if r.group.is_empty() {
                    format!("{}/{}", r.version, r.resource)
                } else {
                    format!("{}/{}/{}", r.group, r.version, r.resource)
                };
                format!(
                    "{}{} ({})",
                    escape(&resource),
                    r.encoding
                        .as_deref()
                        .map(|e| format!(" in {}", escape(e)))
                        .unwrap_or_default(),
                    escape(&r.reason)
                )
            })
            .collect();
        html.push_str(&rows.join(" · "));
        html.push_str("</p>");
    }
    html.push_str("</section>");
}

fn classes_section(html: &mut String, classes: &[ClassState]) {
    html.push_str(
        r#"<section id="classes"><h2>Limits per class</h2><table><thead><tr><th>class</th><th class="num">seats</th><th class="num">in flight</th><th class="num">long-running</th><th class="num">queued</th><th class="num">dispatched</th><th class="num">rejected</th></tr></thead><tbody>"#,
    );
    for class in classes {
        let rejected = if class.rejected == 0 {
            "0".to_string()
        } else {
            let reasons: Vec<String> = class
                .rejected_by_reason
                .iter()
                .filter(|(_, n)| *n > 0)
                .map(|(reason, n)| format!("{} {n}", escape(reason)))
                .collect();
            format!(
                r#"{} <span class="muted">({})</span>"#,
                class.rejected,
                reasons.join(", ")
            )
        };
        let _ = write!(
            html,
            r#"<tr class="class" data-class="{name}"><td class="name">{name}</td><td class="num seats">{seats}</td><td class="num executing">{executing}</td><td class="num long-running">{long_running}</td><td class="num queued">{queued}</td><td class="num dispatched">{dispatched}</td><td class="num rejected">{rejected}</td></tr>"#,
            name = escape(&class.class),
            seats = class.seats.map_or_else(|| "—".to_string(), |s| s.to_string()),
            executing = class.executing,
            long_running = class.long_running,
            queued = class.queued,
            dispatched = class.dispatched,
        );
    }
    html.push_str("</tbody></table></section>");
}

fn discovery_section(html: &mut String, discovery: &DiscoveryState) {
    let _ = write!(
        html,
        r#"<section id="discovery"><h2>Discovery cache</h2><p>answering from memory: {synced} · <b>{entries}</b> entries · <b>{invalidations}</b> invalidations</p>"#,
        synced = yes_no(discovery.synced),
        entries = discovery.entries,
        invalidations = discovery.invalidations,
    );
    if !discovery.kinds.is_empty() {
        html.push_str(
            r#"<table><thead><tr><th>endpoint</th><th class="num">hits</th><th class="num">misses</th><th class="num">refreshes</th><th class="num">bypassed</th><th>hit ratio</th></tr></thead><tbody>"#,
        );
        for kind in &discovery.kinds {
            let asked = kind.hits + kind.misses + kind.refreshes + kind.bypassed;
            let ratio = if asked == 0 {
                String::new()
            } else {
                let ratio = kind.hits as f64 / asked as f64;
                format!(
                    "{}{}",
                    ratio_bar(ratio, &format!("hit ratio {}", percent(ratio))),
                    percent(ratio)
                )
            };
            let _ = write!(
                html,
                r#"<tr class="discovery-kind"><td>{kind}</td><td class="num">{hits}</td><td class="num">{misses}</td><td class="num">{refreshes}</td><td class="num">{bypassed}</td><td>{ratio}</td></tr>"#,
                kind = escape(&kind.kind),
                hits = kind.hits,
                misses = kind.misses,
                refreshes = kind.refreshes,
                bypassed = kind.bypassed,
            );
        }
        html.push_str("</tbody></table>");
    }
    html.push_str("</section>");
}

fn client_row(html: &mut String, row: &ClientRow, class: &str) {
    let _ = write!(
        html,
        r#"<tr class="{class}"><td class="client"><code>{client}</code>{count}</td><td class="num requests">{requests}</td><td class="num spared">{spared}</td><td class="num upstream">{upstream}</td><td class="num upstream-bytes">{upstream_bytes}</td><td class="num seat">{seat:.3}</td><td class="num throttled">{throttled}</td><td class="num sent">{sent}</td></tr>"#,
        client = escape(&row.client),
        count = if row.clients > 1 {
            format!(r#" <span class="muted">({} clients)</span>"#, row.clients)
        } else {
            String::new()
        },
        requests = row.total(),
        spared = row.spared(),
        upstream = row.upstream_requests,
        upstream_bytes = bytes(row.upstream_bytes),
        seat = row.upstream_seat_seconds,
        throttled = row.throttled,
        sent = bytes(row.bytes_sent),
    );
}

fn clients_section(html: &mut String, clients: &LedgerView) {
    let _ = write!(
        html,
        r#"<section id="clients"><h2>Top clients by upstream cost</h2><p class="muted">{tracked} clients seen in the last {since}; the top {shown} by seat time held at the API server, then upstream calls.</p>"#,
        tracked = clients.tracked,
        since = duration(clients.since_seconds),
        shown = CLIENTS_SHOWN,
    );
    if clients.clients.is_empty() {
        html.push_str(r#"<p class="muted">No client yet.</p></section>"#);
        return;
    }
    html.push_str(
        r#"<table><thead><tr><th>client</th><th class="num">requests</th><th class="num">spared</th><th class="num">upstream calls</th><th class="num">upstream bytes</th><th class="num">seat seconds</th><th class="num">429s</th><th class="num">sent</th></tr></thead><tbody>"#,
    );
    for row in &clients.clients {
        client_row(html, row, "client");
    }
    if let Some(others) = &clients.others {
        client_row(html, others, "client others");
    }
    html.push_str("</tbody></table></section>");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_text_is_read_with_its_labels_unescaped() {
        let readings = Readings::parse(
            "# HELP x y\n# TYPE a counter\na_total{k=\"v\",q=\"say \\\"hi\\\" \\\\ \\n\"} 3\na_total{k=\"w\"} 4.5\nb 7\n# EOF\n",
        );
        assert_eq!(readings.0.len(), 3);
        assert_eq!(readings.0[0].label("q"), Some("say \"hi\" \\ \n"));
        assert_eq!(readings.sum("a_total", &[]), 7.5);
        assert_eq!(readings.sum("a_total", &[("k", "w")]), 4.5);
        assert_eq!(readings.sum("b", &[]), 7.0);
        assert_eq!(
            readings.by("a_total", "k").into_iter().collect::<Vec<_>>(),
            [("v".to_string(), 3.0), ("w".to_string(), 4.5)]
        );
    }

    #[test]
    fn samples_count_what_spared_the_api_server_and_what_did_not() {
        use crate::metrics::RequestLabels;
        use kache_cache::Verb;
        let metrics = Metrics::new();
        let count = |outcome, n| {
            metrics
                .requests
                .get_or_create(&RequestLabels {
                    verb: Verb::List,
                    code: 200,
                    outcome,
                })
                .inc_by(n);
        };
        count(Outcome::Cache, 5);
        count(Outcome::Discovery, 2);
        count(Outcome::Coalesced, 1);
        count(Outcome::Forwarded, 3);
        count(Outcome::Rejected, 4);
        assert_eq!(
            sample(&metrics, Duration::from_secs(12)),
            Sample {
                at_seconds: 12,
                spared: 8,
                forwarded: 3
            }
        );
    }

    fn status() -> Status {
        Status {
            kache_version: "0.0.0",
            mode: "local",
            uptime_seconds: 75,
            ready: true,
            checks: vec![Check {
                name: "ping",
                ok: true,
                reason: None,
            }],
            upstream: Upstream {
                url: "https://127.0.0.1:6443".into(),
                answered: true,
                version: Some("v1.20.2".into()),
                platform: Some("linux/amd64".into()),
                version_age_seconds: Some(3),
                errors: vec![],
            },
            requests: Requests {
                by_outcome: vec![("cache", 3), ("forwarded", 1)],
                total: 4,
                spared: 3,
                forwarded: 1,
                in_flight: 0,
            },
            history: vec![
                Sample {
                    at_seconds: 0,
                    spared: 0,
                    forwarded: 0,
                },
                Sample {
                    at_seconds: 5,
                    spared: 3,
                    forwarded: 1,
                },
            ],
            cache: CacheState {
                enabled: true,
                memory_budget_bytes: 1 << 30,
                resources: vec![ResourceRow {
                    version: "v1".into(),
                    resource: "configmaps".into(),
                    kind: "ConfigMap".into(),
                    encoding: "json".into(),
                    synced: true,
                    objects: 7,
                    bytes: 2048,
                    resource_version: "1234".into(),
                    hits: 3,
                    forwarded_reads: 1,
                    hit_ratio: Some(0.75),
                    ..ResourceRow::default()
                }],
                not_cached: vec![],
                forwarded_by_reason: vec![],
                evictions: 0,
            },
            discovery: DiscoveryState {
                synced: true,
                entries: 2,
                invalidations: 0,
                kinds: vec![],
            },
            classes: vec![ClassState {
                class: "default".into(),
                seats: Some(400),
                ..ClassState::default()
            }],
            clients: LedgerView {
                since_seconds: 75,
                tracked: 1,
                clients: vec![],
                others: None,
            },
        }
    }

    #[test]
    fn the_page_shows_each_resource_class_and_check() {
        let html = render(&status());
        for needle in [
            r#"<tr class="resource" data-resource="v1/configmaps" data-encoding="json">"#,
            r#"<td class="num objects">7</td>"#,
            r#"<td class="num rv">1234</td>"#,
            r#"aria-label="hit ratio 75%""#,
            r#"<tr class="class" data-class="default"><td class="name">default</td><td class="num seats">400</td>"#,
            r#"<li class="check" data-check="ping"><span class="badge ok">ping</span> ok</li>"#,
            r#"<span id="upstream-version">v1.20.2</span>"#,
            r#"<polyline"#,
        ] {
            assert!(html.contains(needle), "{needle} not in:\n{html}");
        }
        assert!(!html.contains("<script"), "the page runs nothing");
        assert!(!html.contains("src="), "the page loads nothing");
    }

    #[test]
    fn strings_from_clients_and_the_cluster_are_escaped() {
        let evil = r#"<script>alert("x")</script><img src=x onerror='y'>&"#;
        let mut status = status();
        status.clients.clients = vec![ClientRow {
            client: format!("127.0.0.1 {evil}"),
            clients: 1,
            requests: BTreeMap::from([("cache", 1)]),
            bytes_sent: 0,
            objects_sent: 0,
            upstream_requests: 0,
            upstream_bytes: 0,
            upstream_seat_seconds: 0.0,
            throttled: 0,
        }];
        status.cache.resources[0].resource = evil.into();
        status.cache.resources[0].kind = evil.into();
        status.cache.resources[0].resource_version = evil.into();
        status.cache.not_cached = vec![NotCachedRow {
            group: evil.into(),
            version: "v1".into(),
            resource: evil.into(),
            encoding: Some(evil.into()),
            reason: evil.into(),
        }];
        status.cache.forwarded_by_reason = vec![(evil.into(), 1)];
        status.classes[0].class = evil.into();
        status.upstream.url = evil.into();
        status.upstream.version = Some(evil.into());
        status.upstream.platform = Some(evil.into());
        status.upstream.errors = vec![(evil.into(), 1)];
        status.discovery.kinds = vec![DiscoveryKind {
            kind: evil.into(),
            hits: 1,
            ..DiscoveryKind::default()
        }];
        status.checks.push(Check {
            name: "preload",
            ok: false,
            reason: Some(evil.into()),
        });
        let html = render(&status);
        assert!(!html.contains("<script"), "{html}");
        assert!(!html.contains("<img"), "{html}");
        assert!(!html.contains("onerror='"), "{html}");
        assert!(
            html.contains(
                "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&lt;img src=x onerror=&#39;y&#39;&gt;&amp;"
            ),
            "{html}"
        );
    }

    #[test]
    fn sizes_and_durations_read_as_a_person_would_say_them() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(2048), "2.0 KiB");
        assert_eq!(bytes(5 * 1024 * 1024 + 1024 * 512), "5.5 MiB");
        assert_eq!(duration(42), "42 s");
        assert_eq!(duration(192), "3 min 12 s");
        assert_eq!(duration(7500), "2 h 5 min");
        assert_eq!(duration(3 * 86_400 + 4 * 3600), "3 d 4 h");
        assert_eq!(percent(2.0 / 3.0), "67%");
    }
}
