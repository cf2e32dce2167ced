//! The restarts and outages benchmark behind `benches/e2e/restarts.sh`:
//!
//! - `restarts-setup`: the namespaces and the sentinel pods the scenarios use.
//! - `first-cached-list`: how long after kache was started its first rv=0
//!   LIST answered from memory arrived (cold or warm start).
//! - `audit-mark`, `audit-since`: the upstream requests the API server logged
//!   from a mark up to a sentinel request's own line, by kind; `open-watches`:
//!   the pod watches open at the API server.
//! - `etcd-compact`: compacts etcd at its current revision (JSON gateway).
//! - `informers`: informer-style clients (LIST, then WATCH with bookmarks,
//!   resuming and relisting as client-go's v1.20 reflector does) around a
//!   disruption (commands run in order), then the time until each saw a
//!   sentinel change made after it.
//! - `chaos`: informers, rv=0 LIST/GET loops, consistent LISTs and writes
//!   through kache for a bounded time while a script disrupts kache and the
//!   API server; then each informer's view is compared with a direct LIST.
//!
//! Every loop is bounded in time; times in the output are Unix epoch seconds
//! so the script's own timeline (`date +%s.%N`) lines up with them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::Args;
use http::{header, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::{
    audit_kind, audit_mark, audit_scan, describe_list, exchange, exchange_timeout, pod, AuditPos, Http,
    Target,
};

/// The pod every watched namespace holds for the sentinel changes; its labels
/// match every selector the scenarios use.
const SENTINEL_POD: &str = "kache-sentinel";
/// The annotation a sentinel change sets.
const SENTINEL_ANNOTATION: &str = "kache-bench/sentinel";
/// User-Agent of the requests that set the stage (sentinels, setup): left
/// out of the upstream counts.
const CONTROL_AGENT: &str = "kache-e2e/control";
/// How long to wait for an audit-log sentinel's line.
const AUDIT_SENTINEL_TIMEOUT: Duration = Duration::from_secs(30);
/// At most this many client-side incidents are kept for the timeline.
const MAX_INCIDENTS: usize = 200_000;

fn now_epoch() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The API server as admin (`BENCH_TOKEN`).
fn apiserver(url: &str, ca: Option<&PathBuf>) -> Target {
    Target {
        url: url.to_string(),
        ca: ca.cloned(),
        token: std::env::var("BENCH_TOKEN").ok(),
        no_auth: false,
    }
}

/// A request with its own User-Agent (and a merge-patch body for PATCH).
fn request_as(
    target: &Target,
    agent: &str,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<Request<Full<Bytes>>> {
    let patch = method == Method::PATCH;
    let mut request = target.request(method, path, Some("application/json"), body)?;
    request
        .headers_mut()
        .insert(header::USER_AGENT, HeaderValue::from_str(agent)?);
    if patch {
        request.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/merge-patch+json"),
        );
    }
    Ok(request)
}

/// Percent-encodes a query value (label selectors hold spaces, commas, parentheses).
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// What kind of transport failure an error is: `refused` (nothing listens:
/// the process is down), `timeout`, else `transport`.
fn transport_kind(error: &anyhow::Error) -> &'static str {
    for cause in error.chain() {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return "refused";
            }
        }
    }
    let text = format!("{error:#}");
    if text.contains("Connection refused") {
        "refused"
    } else if text.contains("timed out") {
        "timeout"
    } else {
        "transport"
    }
}

/// A small xorshift generator: jitter and choices, no crate needed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        Rng((seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(nanos)) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// client-go's `ExponentialBackoffManager(800ms, 30s, 2min, 2.0, jitter 1.0)`,
/// the reflector's: 0.8 s doubling up to 30 s, each wait plus up to 100 %
/// jitter, back to 0.8 s after two minutes without a wait.
struct Backoff {
    next: Duration,
    last: Option<Instant>,
}

impl Backoff {
    const INITIAL: Duration = Duration::from_millis(800);
    const CAP: Duration = Duration::from_secs(30);
    const RESET: Duration = Duration::from_secs(120);

    fn new() -> Self {
        Backoff {
            next: Self::INITIAL,
            last: None,
        }
    }

    fn wait(&mut self, rng: &mut Rng) -> Duration {
        let now = Instant::now();
        if self.last.is_none_or(|last| now - last > Self::RESET) {
            self.next = Self::INITIAL;
        }
        self.last = Some(now);
        let base = self.next;
        self.next = (self.next * 2).min(Self::CAP);
        base.mul_f64(1.0 + rng.unit())
    }
}

/// Sleeps unless told to stop first; `true` when stopped.
async fn sleep_or_stop(duration: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    if *stop.borrow() {
        return true;
    }
    tokio::select! {
        () = tokio::time::sleep(duration) => *stop.borrow(),
        _ = stop.changed() => true,
    }
}

// ---------------------------------------------------------------- incidents

/// Client-side events worth a timestamp (watch ends, relists, failed
/// requests), kept for the report to place against the script's timeline.
#[derive(Default)]
struct Incidents {
    lines: Mutex<Vec<Value>>,
    dropped: AtomicUsize,
}

impl Incidents {
    fn push(&self, client: &str, what: &str, detail: &str) {
        let mut lines = self.lines.lock().expect("incidents");
        if lines.len() >= MAX_INCIDENTS {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        lines.push(json!({"t": now_epoch(), "client": client, "what": what, "detail": detail}));
    }

    fn write(&self, path: &std::path::Path) -> Result<()> {
        let mut out = std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        );
        for line in self.lines.lock().expect("incidents").iter() {
            serde_json::to_writer(&mut out, line)?;
            out.write_all(b"\n")?;
        }
        out.flush()?;
        Ok(())
    }
}

// ---------------------------------------------------------------- restarts-setup

#[derive(Args)]
pub(crate) struct RestartsSetup {
    /// The API server, as admin.
    #[command(flatten)]
    target: Target,
    /// Namespaces that get a sentinel pod (created if missing).
    #[arg(long, value_delimiter = ',', required = true)]
    sentinel_namespaces: Vec<String>,
}

/// A pod of the benchmark's shape, with its own name and `team` label.
fn named_pod(namespace: &str, name: &str, team: u64) -> Value {
    let mut p = pod(namespace, 1, 1);
    p["metadata"]["name"] = json!(name);
    p["metadata"]["labels"]["team"] = json!(format!("team-{team}"));
    p
}

pub(crate) async fn restarts_setup(c: RestartsSetup) -> Result<Value> {
    let client = c.target.client()?;
    let (mut namespaces, mut sentinels) = (0, 0);
    for ns in &c.sentinel_namespaces {
        let body =
            serde_json::to_vec(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}))?;
        let r = exchange(
            &client,
            request_as(
                &c.target,
                CONTROL_AGENT,
                Method::POST,
                "/api/v1/namespaces",
                Some(body),
            )?,
            false,
        )
        .await?;
        match r.status {
            s if s.is_success() => namespaces += 1,
            StatusCode::CONFLICT => {}
            s => bail!("creating namespace {ns}: {s}"),
        }
        let body = serde_json::to_vec(&named_pod(ns, SENTINEL_POD, 1))?;
        let r = exchange(
            &client,
            request_as(
                &c.target,
                CONTROL_AGENT,
                Method::POST,
                &format!("/api/v1/namespaces/{ns}/pods"),
                Some(body),
            )?,
            false,
        )
        .await?;
        match r.status {
            s if s.is_success() => sentinels += 1,
            StatusCode::CONFLICT => {}
            s => bail!("creating the sentinel pod in {ns}: {s}"),
        }
    }
    Ok(json!({"namespacesCreated": namespaces, "sentinelsCreated": sentinels}))
}

// ---------------------------------------------------------------- first-cached-list

#[derive(Args)]
pub(crate) struct FirstCachedList {
    /// kache (plain HTTP, local mode).
    #[command(flatten)]
    target: Target,
    /// kache's `/metrics`: tells an answer from memory from a forwarded one.
    #[arg(long)]
    metrics: String,
    #[arg(long, default_value = "/api/v1/pods?resourceVersion=0")]
    path: String,
    /// Items the list must hold.
    #[arg(long)]
    expect_items: usize,
    /// When kache was started (Unix epoch seconds).
    #[arg(long)]
    started_at: f64,
    /// Send the first LIST only once this URL (kache's `/readyz`) answers 200.
    #[arg(long)]
    ready_url: Option<String>,
    /// Send the first LIST only once this URL (kache's `/debug/cache`) lists
    /// a pod store (a store restored from a snapshot shows before it syncs).
    #[arg(long)]
    store_url: Option<String>,
    #[arg(long, default_value_t = 180)]
    timeout: u64,
}

/// Polls `url` every 10 ms until `done(status, body)` (at most until `deadline`).
async fn poll_until(
    client: &Http,
    url: &str,
    deadline: Instant,
    done: impl Fn(StatusCode, &[u8]) -> bool,
) -> Result<f64> {
    loop {
        let request = Request::get(url).body(Full::new(Bytes::new()))?;
        if let Ok(r) = exchange_timeout(client, request, true, 10).await {
            if done(r.status, r.body.as_deref().unwrap_or_default()) {
                return Ok(now_epoch());
            }
        }
        if Instant::now() > deadline {
            bail!("{url}: not there in time");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether kache's `/debug/cache` lists a JSON pod store.
fn has_pod_store(body: &[u8]) -> bool {
    serde_json::from_slice::<Value>(body).is_ok_and(|view| {
        view["resources"].as_array().is_some_and(|resources| {
            resources.iter().any(|r| {
                r["resource"] == "pods"
                    && r["group"] == ""
                    && r["encoding"].as_str().unwrap_or("json") == "json"
            })
        })
    })
}

/// `kache_http_requests_total` of `list` requests answered from memory.
async fn cached_lists(client: &Http, url: &str) -> Option<f64> {
    let request = Request::get(url).body(Full::new(Bytes::new())).ok()?;
    let r = exchange_timeout(client, request, true, 10).await.ok()?;
    if !r.status.is_success() {
        return None;
    }
    let text = String::from_utf8_lossy(r.body.as_deref().unwrap_or_default()).into_owned();
    Some(
        text.lines()
            .filter(|l| {
                l.starts_with("kache_http_requests_total{")
                    && l.contains("verb=\"list\"")
                    && l.contains("outcome=\"cache\"")
            })
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum(),
    )
}

pub(crate) async fn first_cached_list(c: FirstCachedList) -> Result<Value> {
    let client = c.target.client()?;
    let metrics_client = c.target.client()?;
    let deadline = Instant::now() + Duration::from_secs(c.timeout);
    let (mut refused, mut other_errors, mut forwarded) = (0usize, BTreeMap::<String, usize>::new(), 0usize);
    let mut first_answer: Option<f64> = None;
    let ready_at = match &c.ready_url {
        Some(url) => Some(
            poll_until(&metrics_client, url, deadline, |status, _| status.is_success()).await? - c.started_at,
        ),
        None => None,
    };
    let store_at = match &c.store_url {
        Some(url) => Some(
            poll_until(&metrics_client, url, deadline, |status, body| {
                status.is_success() && has_pod_store(body)
            })
            .await?
                - c.started_at,
        ),
        None => None,
    };
    loop {
        if Instant::now() > deadline {
            bail!(
                "no rv=0 LIST answered from memory within {} s (refused {refused}, forwarded {forwarded}, errors {other_errors:?})",
                c.timeout
            );
        }
        let before = cached_lists(&metrics_client, &c.metrics).await.unwrap_or(0.0);
        let request = c
            .target
            .request(Method::GET, &c.path, Some("application/json"), None)?;
        match exchange_timeout(&client, request, true, 120).await {
            Err(e) => {
                match transport_kind(&e) {
                    "refused" => refused += 1,
                    kind => *other_errors.entry(kind.to_string()).or_default() += 1,
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(r) if !r.status.is_success() => {
                *other_errors.entry(r.status.to_string()).or_default() += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(r) => {
                let at = now_epoch();
                first_answer.get_or_insert(at - c.started_at);
                let list = describe_list(r.body.as_deref().unwrap_or_default());
                let after = cached_lists(&metrics_client, &c.metrics).await.unwrap_or(0.0);
                if after > before && list["items"].as_u64() == Some(c.expect_items as u64) {
                    return Ok(json!({
                        "seconds": at - c.started_at,
                        "readySeconds": ready_at,
                        "storeSeconds": store_at,
                        "firstAnswerSeconds": first_answer,
                        "refused": refused,
                        "forwarded": forwarded,
                        "errors": other_errors,
                        "list": list,
                        "listSeconds": r.elapsed.as_secs_f64(),
                    }));
                }
                forwarded += 1;
            }
        }
    }
}

// ---------------------------------------------------------------- audit

#[derive(Args)]
pub(crate) struct AuditMark {
    #[arg(long)]
    audit_log: PathBuf,
}

pub(crate) fn audit_mark_now(c: &AuditMark) -> Result<Value> {
    let mark = audit_mark(&c.audit_log)?;
    Ok(json!({"mark": format!("{}:{}", mark.ino, mark.offset), "at": now_epoch()}))
}

#[derive(Args)]
pub(crate) struct AuditSince {
    /// The API server, as admin: the sentinel request, and its `/metrics`.
    #[command(flatten)]
    target: Target,
    #[arg(long)]
    audit_log: PathBuf,
    /// `INODE:OFFSET`, from `audit-mark`.
    #[arg(long)]
    mark: String,
    /// Only requests received at or after this time (Unix epoch seconds).
    #[arg(long)]
    since: Option<f64>,
    /// First wait (at most 30 s) until the API server has no more open pod
    /// watches than `--baseline-watches`, so that every watch's line
    /// (written when it ends) is in the log.
    #[arg(long)]
    quiesce_watches: bool,
    /// Open pod watches that are not ours (the API server's own loopback client).
    #[arg(long, default_value_t = 0.0)]
    baseline_watches: f64,
    /// Also write each request (time, user, agent, kind, code) as JSON here.
    #[arg(long)]
    records: Option<PathBuf>,
}

/// An RFC 3339 UTC timestamp (`2026-11-29T23:04:22.984978Z`) as Unix seconds.
fn parse_timestamp(s: &str) -> Option<f64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (h, min, sec) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3_600 + min * 60) as f64 + sec)
}

/// Open pod watches at the API server (`apiserver_longrunning_gauge`).
async fn open_pod_watches(client: &Http, target: &Target) -> Result<f64> {
    let r = exchange_timeout(
        client,
        request_as(target, CONTROL_AGENT, Method::GET, "/metrics", None)?,
        true,
        30,
    )
    .await?;
    if !r.status.is_success() {
        bail!("GET /metrics: {}", r.status);
    }
    let text = String::from_utf8_lossy(r.body.as_deref().unwrap_or_default()).into_owned();
    Ok(text
        .lines()
        .filter(|l| {
            l.starts_with("apiserver_longrunning_gauge{")
                && l.contains("resource=\"pods\"")
                && l.contains("verb=\"WATCH\"")
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum())
}

#[derive(Args)]
pub(crate) struct OpenWatches {
    /// The API server, as admin.
    #[command(flatten)]
    target: Target,
}

pub(crate) async fn open_watches(c: OpenWatches) -> Result<Value> {
    let client = c.target.client()?;
    Ok(json!({"openPodWatches": open_pod_watches(&client, &c.target).await?}))
}

/// The API server's pod traffic since it started: `apiserver_response_sizes`
/// of LIST and GET, and the watch events it sent (count and bytes).
async fn apiserver_pod_bytes(client: &Http, target: &Target) -> Result<Value> {
    let r = exchange_timeout(
        client,
        request_as(target, CONTROL_AGENT, Method::GET, "/metrics", None)?,
        true,
        30,
    )
    .await?;
    if !r.status.is_success() {
        bail!("GET /metrics: {}", r.status);
    }
    let text = String::from_utf8_lossy(r.body.as_deref().unwrap_or_default()).into_owned();
    let sum = |prefix: &str, wanted: &[&str]| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(prefix) && wanted.iter().all(|w| l.contains(w)))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    };
    Ok(json!({
        "listBytes": sum("apiserver_response_sizes_sum{", &["resource=\"pods\"", "verb=\"LIST\""]),
        "lists": sum("apiserver_response_sizes_count{", &["resource=\"pods\"", "verb=\"LIST\""]),
        "getBytes": sum("apiserver_response_sizes_sum{", &["resource=\"pods\"", "verb=\"GET\""]),
        "watchEventBytes": sum("apiserver_watch_events_sizes_sum{", &["kind=\"Pod\""]),
        "watchEvents": sum("apiserver_watch_events_total{", &["kind=\"Pod\""]),
    }))
}

pub(crate) async fn audit_since(c: AuditSince) -> Result<Value> {
    let (ino, offset) = c.mark.split_once(':').context("--mark INODE:OFFSET")?;
    let from = AuditPos {
        ino: ino.parse()?,
        offset: offset.parse()?,
    };
    let client = c.target.client()?;
    let mut open_watches = Value::Null;
    if c.quiesce_watches {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let open = open_pod_watches(&client, &c.target).await?;
            if open <= c.baseline_watches || Instant::now() > deadline {
                open_watches = json!(open);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    let name = format!(
        "kache-restarts-sentinel-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let path = format!("/api/v1/namespaces/default/configmaps/{name}");
    let r = exchange_timeout(
        &client,
        request_as(&c.target, CONTROL_AGENT, Method::GET, &path, None)?,
        false,
        30,
    )
    .await?;
    if r.status != StatusCode::NOT_FOUND {
        bail!("sentinel GET {path}: {} (expected 404)", r.status);
    }
    let deadline = Instant::now() + AUDIT_SENTINEL_TIMEOUT;
    let (mut pos, mut found) = (from, false);
    let mut lines = Vec::new();
    loop {
        pos = audit_scan(&c.audit_log, pos, |line, _, _| {
            if !line.contains("\"stage\":\"ResponseComplete\"") {
                return false;
            }
            if line.contains(&name) {
                found = true;
                return true;
            }
            if let Ok(v) = serde_json::from_str::<Value>(line) {
                lines.push(v);
            }
            false
        })?;
        if found {
            break;
        }
        if Instant::now() > deadline {
            bail!("the sentinel {path} did not reach the audit log within {AUDIT_SENTINEL_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut records = Vec::new();
    let mut by_user = BTreeMap::<String, BTreeMap<String, usize>>::new();
    for line in &lines {
        let agent = line["userAgent"].as_str().unwrap_or("");
        let uri = line["requestURI"].as_str().unwrap_or("");
        // Ours, and the cluster scripts' readiness polls (`curl …/readyz`).
        if agent == CONTROL_AGENT || (agent.starts_with("curl/") && uri == "/readyz") {
            continue;
        }
        let received = line["requestReceivedTimestamp"]
            .as_str()
            .and_then(parse_timestamp)
            .unwrap_or(0.0);
        if c.since.is_some_and(|since| received < since) {
            continue;
        }
        let user = line["user"]["username"].as_str().unwrap_or("").to_string();
        let code = line["responseStatus"]["code"].as_u64().unwrap_or(0);
        let mut kind = audit_kind(line);
        if code >= 400 {
            kind = format!("{kind} ({code})");
        }
        *by_user
            .entry(user.clone())
            .or_default()
            .entry(kind.clone())
            .or_default() += 1;
        records.push(json!({
            "t": received,
            "end": line["stageTimestamp"].as_str().and_then(parse_timestamp),
            "user": user,
            "agent": agent,
            "kind": kind,
            "code": code,
            "rv": query_param(uri, "resourceVersion"),
            "uri": uri.split('?').next().unwrap_or(""),
        }));
    }
    if let Some(path) = &c.records {
        std::fs::write(path, serde_json::to_vec(&records)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(json!({"byUser": by_user, "total": records.len(), "openPodWatches": open_watches}))
}

fn query_param(uri: &str, key: &str) -> Option<String> {
    let query = uri.split_once('?')?.1;
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.to_string())
}

// ---------------------------------------------------------------- etcd-compact

#[derive(Args)]
pub(crate) struct EtcdCompact {
    /// etcd's client URL (`http://127.0.0.1:PORT`, its JSON gateway).
    #[arg(long)]
    etcd: String,
}

pub(crate) async fn etcd_compact(c: EtcdCompact) -> Result<Value> {
    let target = Target {
        url: c.etcd.clone(),
        ca: None,
        token: None,
        no_auth: true,
    };
    let client = target.client()?;
    let call = |path: &str, body: Value| {
        let target = &target;
        let client = &client;
        let path = path.to_string();
        async move {
            let r = exchange_timeout(
                client,
                target.request(Method::POST, &path, None, Some(serde_json::to_vec(&body)?))?,
                true,
                30,
            )
            .await?;
            let text = String::from_utf8_lossy(r.body.as_deref().unwrap_or_default()).into_owned();
            if !r.status.is_success() {
                bail!("etcd {path}: {}: {text}", r.status);
            }
            Ok::<Value, anyhow::Error>(serde_json::from_str(&text)?)
        }
    };
    let range = call("/v3/kv/range", json!({"key": "AA=="})).await?;
    let revision: u64 = range["header"]["revision"]
        .as_str()
        .and_then(|r| r.parse().ok())
        .context("etcd's revision")?;
    call(
        "/v3/kv/compaction",
        json!({"revision": revision.to_string(), "physical": true}),
    )
    .await?;
    Ok(json!({"revision": revision, "at": now_epoch()}))
}

// ---------------------------------------------------------------- informers

/// What an informer watches: pods of one namespace (or all) through a label selector.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Spec {
    namespace: Option<String>,
    selector: String,
}

impl Spec {
    fn path(&self, params: &[(&str, &str)]) -> String {
        let mut path = match &self.namespace {
            Some(ns) => format!("/api/v1/namespaces/{ns}/pods"),
            None => "/api/v1/pods".to_string(),
        };
        let mut query: Vec<String> = params.iter().map(|(k, v)| format!("{k}={}", encode(v))).collect();
        if !self.selector.is_empty() {
            query.push(format!("labelSelector={}", encode(&self.selector)));
        }
        if !query.is_empty() {
            path.push('?');
            path.push_str(&query.join("&"));
        }
        path
    }

    fn label(&self) -> String {
        format!(
            "{} {}",
            self.namespace.as_deref().unwrap_or("all namespaces"),
            if self.selector.is_empty() {
                "(no selector)"
            } else {
                &self.selector
            }
        )
    }
}

#[derive(Default, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct Stats {
    /// LIST requests (pages) by resourceVersion: `rv=0`, `rv=N`, `consistent`.
    lists: BTreeMap<String, usize>,
    /// LIST requests that failed, by status or transport failure.
    list_failures: BTreeMap<String, usize>,
    /// LISTs after the first sync (client-go's `ListAndWatch` run again), by cause.
    relists: BTreeMap<String, usize>,
    /// WATCH requests answered 200.
    watches: usize,
    /// WATCH requests that failed, by status or transport failure.
    watch_failures: BTreeMap<String, usize>,
    /// How watches ended: `closed` (the server ended it cleanly), `broken`
    /// (the connection failed), `timeout` (its timeoutSeconds), `expired`
    /// (an ERROR event, 410), `error NNN`, `short` (under a second, no event).
    watch_ends: BTreeMap<String, usize>,
    events: usize,
    bytes: u64,
}

impl Stats {
    fn add(&mut self, other: &Stats) {
        let merge = |a: &mut BTreeMap<String, usize>, b: &BTreeMap<String, usize>| {
            for (k, v) in b {
                *a.entry(k.clone()).or_default() += v;
            }
        };
        merge(&mut self.lists, &other.lists);
        merge(&mut self.list_failures, &other.list_failures);
        merge(&mut self.relists, &other.relists);
        merge(&mut self.watch_failures, &other.watch_failures);
        merge(&mut self.watch_ends, &other.watch_ends);
        self.watches += other.watches;
        self.events += other.events;
        self.bytes += other.bytes;
    }
}

#[derive(Default)]
struct State {
    /// `namespace/name` → resourceVersion.
    store: HashMap<String, u64>,
    stats: Stats,
    /// When the first LIST was done and the first WATCH answered.
    synced_at: Option<f64>,
    /// (namespace, sentinel value) → when first seen.
    sentinels: HashMap<(String, String), f64>,
}

struct Informer {
    name: String,
    spec: Spec,
    agent: String,
    state: Mutex<State>,
}

#[derive(Deserialize, Default)]
struct Meta {
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    name: String,
    #[serde(default, rename = "resourceVersion")]
    resource_version: String,
    #[serde(default, rename = "continue")]
    continue_token: String,
    #[serde(default)]
    annotations: Option<HashMap<String, String>>,
}

#[derive(Deserialize, Default)]
struct Item {
    #[serde(default)]
    metadata: Meta,
}

#[derive(Deserialize)]
struct List {
    #[serde(default)]
    metadata: Meta,
    #[serde(default)]
    items: Vec<Item>,
}

#[derive(Deserialize, Default)]
struct EventObject {
    #[serde(default)]
    metadata: Meta,
    code: Option<u16>,
}

#[derive(Deserialize)]
struct Event {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    object: EventObject,
}

enum ListFailure {
    /// 410, or a version the server has not reached: list again consistently.
    Unavailable(String),
    Other(String),
}

enum WatchEnd {
    Stopped,
    /// Leave `ListAndWatch`: relist after the backoff, for this reason.
    Relist(String),
}

impl Informer {
    fn key(meta: &Meta) -> String {
        format!("{}/{}", meta.namespace, meta.name)
    }

    fn note_sentinel(state: &mut State, meta: &Meta) {
        if meta.name != SENTINEL_POD {
            return;
        }
        if let Some(value) = meta.annotations.as_ref().and_then(|a| a.get(SENTINEL_ANNOTATION)) {
            state
                .sentinels
                .entry((meta.namespace.clone(), value.clone()))
                .or_insert_with(now_epoch);
        }
    }

    /// One LIST as client-go's pager makes it: `limit=500` for rv=0 and
    /// consistent lists (following `continue`), none for rv=N.
    async fn list(
        &self,
        client: &Http,
        target: &Target,
        rv: &str,
    ) -> Result<(String, HashMap<String, u64>), ListFailure> {
        let paginate = rv.is_empty() || rv == "0";
        let label = match rv {
            "" => "consistent",
            "0" => "rv=0",
            _ => "rv=N",
        };
        let mut continue_token = String::new();
        let mut items = HashMap::new();
        loop {
            let mut params = Vec::new();
            if !continue_token.is_empty() {
                params.push(("continue", continue_token.as_str()));
            } else if !rv.is_empty() {
                params.push(("resourceVersion", rv));
            }
            if paginate {
                params.push(("limit", "500"));
            }
            let path = self.spec.path(&params);
            let request = request_as(target, &self.agent, Method::GET, &path, None)
                .map_err(|e| ListFailure::Other(e.to_string()))?;
            let result = exchange_timeout(client, request, true, 120).await;
            let body = {
                let mut state = self.state.lock().expect("informer");
                *state.stats.lists.entry(label.to_string()).or_default() += 1;
                let r = match result {
                    Ok(r) => r,
                    Err(e) => {
                        let kind = format!("transport: {}", transport_kind(&e));
                        *state.stats.list_failures.entry(kind.clone()).or_default() += 1;
                        return Err(ListFailure::Other(kind));
                    }
                };
                state.stats.bytes += r.bytes as u64;
                let body = r.body.unwrap_or_default();
                if r.status.is_success() {
                    Ok(body)
                } else {
                    let kind = r.status.as_u16().to_string();
                    *state.stats.list_failures.entry(kind.clone()).or_default() += 1;
                    let too_large = r.status == StatusCode::GATEWAY_TIMEOUT
                        && String::from_utf8_lossy(&body).contains("ResourceVersionTooLarge");
                    Err((r.status, kind, too_large))
                }
            };
            let body = match body {
                Ok(body) => body,
                // The pager's fallback when a continuation expired: the whole list at once.
                Err((StatusCode::GONE, _, _)) if !continue_token.is_empty() => {
                    return Box::pin(self.list_unpaged(client, target)).await;
                }
                Err((status, kind, too_large)) => {
                    return Err(if status == StatusCode::GONE || too_large {
                        ListFailure::Unavailable(kind)
                    } else {
                        ListFailure::Other(kind)
                    });
                }
            };
            let list: List =
                serde_json::from_slice(&body).map_err(|e| ListFailure::Other(format!("decoding: {e}")))?;
            for item in &list.items {
                let rv = item.metadata.resource_version.parse().unwrap_or(0);
                items.insert(Self::key(&item.metadata), rv);
            }
            if list.items.iter().any(|i| i.metadata.name == SENTINEL_POD) {
                let mut state = self.state.lock().expect("informer");
                for item in &list.items {
                    Self::note_sentinel(&mut state, &item.metadata);
                }
            }
            if list.metadata.continue_token.is_empty() {
                return Ok((list.metadata.resource_version, items));
            }
            continue_token = list.metadata.continue_token;
        }
    }

    async fn list_unpaged(
        &self,
        client: &Http,
        target: &Target,
    ) -> Result<(String, HashMap<String, u64>), ListFailure> {
        let path = self.spec.path(&[]);
        let request = request_as(target, &self.agent, Method::GET, &path, None)
            .map_err(|e| ListFailure::Other(e.to_string()))?;
        let result = exchange_timeout(client, request, true, 120).await;
        let mut state = self.state.lock().expect("informer");
        *state.stats.lists.entry("consistent".to_string()).or_default() += 1;
        let r = result.map_err(|e| ListFailure::Other(format!("transport: {}", transport_kind(&e))))?;
        state.stats.bytes += r.bytes as u64;
        if !r.status.is_success() {
            return Err(ListFailure::Other(r.status.as_u16().to_string()));
        }
        let list: List = serde_json::from_slice(r.body.as_deref().unwrap_or_default())
            .map_err(|e| ListFailure::Other(format!("decoding: {e}")))?;
        let mut items = HashMap::new();
        for item in &list.items {
            items.insert(
                Self::key(&item.metadata),
                item.metadata.resource_version.parse().unwrap_or(0),
            );
            Self::note_sentinel(&mut state, &item.metadata);
        }
        Ok((list.metadata.resource_version, items))
    }

    /// client-go's `Reflector.Run`: `ListAndWatch`, again after a backoff
    /// whenever it returns, until stopped.
    async fn run(
        self: Arc<Self>,
        target: Arc<Target>,
        incidents: Arc<Incidents>,
        mut stop: watch::Receiver<bool>,
    ) {
        let client = match target.client() {
            Ok(c) => c,
            Err(e) => {
                incidents.push(&self.name, "error", &format!("{e:#}"));
                return;
            }
        };
        let mut rng = Rng::new(
            self.name
                .bytes()
                .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b))),
        );
        let (mut backoff, mut connect_backoff) = (Backoff::new(), Backoff::new());
        let mut last_sync = String::new();
        let mut unavailable = false;
        let mut cause: Option<String> = None;
        loop {
            if *stop.borrow() {
                return;
            }
            if let Some(cause) = cause.take() {
                let mut state = self.state.lock().expect("informer");
                *state.stats.relists.entry(cause.clone()).or_default() += 1;
                drop(state);
                incidents.push(&self.name, "relist", &cause);
            }
            let outcome = self
                .list_and_watch(
                    &client,
                    &target,
                    &incidents,
                    &mut stop,
                    &mut rng,
                    &mut connect_backoff,
                    &mut last_sync,
                    &mut unavailable,
                )
                .await;
            match outcome {
                None => return,
                Some(reason) => cause = Some(reason),
            }
            if sleep_or_stop(backoff.wait(&mut rng), &mut stop).await {
                return;
            }
        }
    }

    /// One `ListAndWatch`: `None` when stopped, else why it returned.
    #[allow(clippy::too_many_arguments)]
    async fn list_and_watch(
        &self,
        client: &Http,
        target: &Target,
        incidents: &Incidents,
        stop: &mut watch::Receiver<bool>,
        rng: &mut Rng,
        connect_backoff: &mut Backoff,
        last_sync: &mut String,
        unavailable: &mut bool,
    ) -> Option<String> {
        let rv = if *unavailable {
            String::new()
        } else if last_sync.is_empty() {
            "0".to_string()
        } else {
            last_sync.clone()
        };
        let listed = tokio::select! {
            r = self.list(client, target, &rv) => r,
            _ = stop.changed() => return None,
        };
        let (list_rv, items) = match listed {
            Ok(l) => l,
            Err(ListFailure::Unavailable(kind)) => {
                *unavailable = true;
                incidents.push(&self.name, "list failed", &kind);
                let again = tokio::select! {
                    r = self.list(client, target, "") => r,
                    _ = stop.changed() => return None,
                };
                match again {
                    Ok(l) => l,
                    Err(ListFailure::Unavailable(kind) | ListFailure::Other(kind)) => {
                        incidents.push(&self.name, "list failed", &kind);
                        return Some(format!("list failed: {kind}"));
                    }
                }
            }
            Err(ListFailure::Other(kind)) => {
                incidents.push(&self.name, "list failed", &kind);
                return Some(format!("list failed: {kind}"));
            }
        };
        *unavailable = false;
        {
            let mut state = self.state.lock().expect("informer");
            state.store = items;
        }
        *last_sync = list_rv.clone();
        let mut rv = list_rv;
        loop {
            if *stop.borrow() {
                return None;
            }
            let timeout = 300 + rng.below(300);
            let path = self.spec.path(&[
                ("allowWatchBookmarks", "true"),
                ("resourceVersion", &rv),
                ("timeoutSeconds", &timeout.to_string()),
                ("watch", "true"),
            ]);
            let request = match request_as(target, &self.agent, Method::GET, &path, None) {
                Ok(r) => r,
                Err(e) => return Some(format!("{e:#}")),
            };
            let started = Instant::now();
            let response = tokio::select! {
                r = tokio::time::timeout(Duration::from_secs(60), client.request(request)) => r,
                _ = stop.changed() => return None,
            };
            let response = match response {
                Err(_) => Err(anyhow::anyhow!("timed out")),
                Ok(r) => r.map_err(anyhow::Error::from),
            };
            let response = match response {
                Ok(r) if r.status() == StatusCode::OK => r,
                Ok(r) => {
                    let kind = r.status().as_u16().to_string();
                    self.state
                        .lock()
                        .expect("informer")
                        .stats
                        .watch_failures
                        .entry(kind.clone())
                        .and_modify(|n| *n += 1)
                        .or_insert(1);
                    incidents.push(&self.name, "watch failed", &kind);
                    return Some(format!("watch failed: {kind}"));
                }
                Err(e) => {
                    let kind = transport_kind(&e);
                    *self
                        .state
                        .lock()
                        .expect("informer")
                        .stats
                        .watch_failures
                        .entry(format!("transport: {kind}"))
                        .or_default() += 1;
                    incidents.push(&self.name, "watch failed", &format!("transport: {kind}"));
                    if kind == "refused" {
                        // client-go: the server is most likely restarting; watch
                        // again from the same version after a backoff, no relist.
                        if sleep_or_stop(connect_backoff.wait(rng), stop).await {
                            return None;
                        }
                        continue;
                    }
                    return Some(format!("watch failed: transport: {kind}"));
                }
            };
            {
                let mut state = self.state.lock().expect("informer");
                state.stats.watches += 1;
                state.synced_at.get_or_insert_with(now_epoch);
            }
            let mut body = response.into_body();
            let (mut buffer, mut events) = (Vec::<u8>::new(), 0usize);
            let end: Result<WatchEnd, String> = loop {
                let frame = tokio::select! {
                    f = body.frame() => f,
                    _ = stop.changed() => break Ok(WatchEnd::Stopped),
                };
                let data = match frame {
                    None => {
                        break Err(if started.elapsed().as_secs() + 1 >= timeout {
                            "timeout"
                        } else {
                            "closed"
                        }
                        .to_string())
                    }
                    Some(Err(_)) => break Err("broken".to_string()),
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(data) => data,
                        Err(_) => continue,
                    },
                };
                self.state.lock().expect("informer").stats.bytes += data.len() as u64;
                buffer.extend_from_slice(&data);
                let mut outcome = None;
                while let Some(newline) = buffer.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buffer.drain(..=newline).collect();
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    let event: Event = match serde_json::from_slice(&line) {
                        Ok(e) => e,
                        Err(e) => {
                            outcome = Some(WatchEnd::Relist(format!("undecodable event: {e}")));
                            break;
                        }
                    };
                    events += 1;
                    let mut state = self.state.lock().expect("informer");
                    state.stats.events += 1;
                    match event.kind.as_str() {
                        "ADDED" | "MODIFIED" => {
                            let v = event.object.metadata.resource_version.parse().unwrap_or(0);
                            state.store.insert(Self::key(&event.object.metadata), v);
                            Self::note_sentinel(&mut state, &event.object.metadata);
                        }
                        "DELETED" => {
                            state.store.remove(&Self::key(&event.object.metadata));
                        }
                        "BOOKMARK" => {}
                        "ERROR" => {
                            let code = event.object.code.unwrap_or(0);
                            let kind = if code == 410 {
                                "expired".to_string()
                            } else {
                                format!("error {code}")
                            };
                            *state.stats.watch_ends.entry(kind.clone()).or_default() += 1;
                            drop(state);
                            incidents.push(&self.name, "watch ended", &kind);
                            outcome = Some(WatchEnd::Relist(format!("watch ended: {kind}")));
                            break;
                        }
                        other => {
                            drop(state);
                            outcome = Some(WatchEnd::Relist(format!("unknown event type {other}")));
                            break;
                        }
                    }
                    if !event.object.metadata.resource_version.is_empty() {
                        rv = event.object.metadata.resource_version.clone();
                        last_sync.clone_from(&rv);
                    }
                }
                if let Some(outcome) = outcome {
                    break Ok(outcome);
                }
            };
            match end {
                Ok(WatchEnd::Stopped) => return None,
                Ok(WatchEnd::Relist(reason)) => return Some(reason),
                Err(kind) => {
                    // client-go's StreamWatcher closes quietly on EOF and on a
                    // broken connection (IsProbableEOF): watch again from the
                    // last version, unless the watch was very short.
                    let short = started.elapsed() < Duration::from_secs(1) && events == 0;
                    let kind = if short { format!("short ({kind})") } else { kind };
                    *self
                        .state
                        .lock()
                        .expect("informer")
                        .stats
                        .watch_ends
                        .entry(kind.clone())
                        .or_default() += 1;
                    incidents.push(&self.name, "watch ended", &kind);
                    if short {
                        return Some(format!("watch ended: {kind}"));
                    }
                }
            }
        }
    }
}

/// Starts `specs.len()` informers and waits until each has listed and
/// watches (at most `timeout`).
async fn start_informers(
    specs: &[Spec],
    agent: &str,
    target: &Arc<Target>,
    incidents: &Arc<Incidents>,
    stop: &watch::Receiver<bool>,
    timeout: Duration,
) -> Result<(Vec<Arc<Informer>>, Vec<tokio::task::JoinHandle<()>>)> {
    let mut informers = Vec::new();
    let mut tasks = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let informer = Arc::new(Informer {
            name: format!("informer-{i:03}"),
            spec: spec.clone(),
            agent: agent.to_string(),
            state: Mutex::new(State::default()),
        });
        informers.push(informer.clone());
        tasks.push(tokio::spawn(informer.run(
            target.clone(),
            incidents.clone(),
            stop.clone(),
        )));
        // Spread the initial lists a little, as pods starting would.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let deadline = Instant::now() + timeout;
    loop {
        let pending = informers
            .iter()
            .filter(|i| i.state.lock().expect("informer").synced_at.is_none())
            .count();
        if pending == 0 {
            return Ok((informers, tasks));
        }
        if Instant::now() > deadline {
            bail!("{pending} informers did not list and watch within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sets the sentinel annotation on each namespace's sentinel pod, directly at
/// the API server (retrying while it cannot answer); returns when each
/// namespace's change was sent (its last attempt, the one that succeeded).
async fn write_sentinels(
    api: &Target,
    client: &Http,
    namespaces: &[String],
    value: &str,
    timeout: Duration,
) -> Result<HashMap<String, f64>> {
    let deadline = Instant::now() + timeout;
    let body = serde_json::to_vec(&json!({"metadata": {"annotations": {SENTINEL_ANNOTATION: value}}}))?;
    let mut sent = HashMap::new();
    for ns in namespaces {
        let path = format!("/api/v1/namespaces/{ns}/pods/{SENTINEL_POD}");
        loop {
            let request = request_as(api, CONTROL_AGENT, Method::PATCH, &path, Some(body.clone()))?;
            let at = now_epoch();
            match exchange_timeout(client, request, false, 30).await {
                Ok(r) if r.status.is_success() => {
                    sent.insert(ns.clone(), at);
                    break;
                }
                Ok(r) if Instant::now() > deadline => bail!("sentinel PATCH {path}: {}", r.status),
                Err(e) if Instant::now() > deadline => bail!("sentinel PATCH {path}: {e:#}"),
                _ => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }
    Ok(sent)
}

/// The namespaces whose sentinel an informer must see.
fn required_sentinels(spec: &Spec, all: &[String]) -> Vec<String> {
    match &spec.namespace {
        Some(ns) => vec![ns.clone()],
        None => all.to_vec(),
    }
}

/// Waits until every informer saw `value` on every sentinel it watches (at
/// most `timeout`); returns how long after each change was sent each saw it
/// (the slowest of its namespaces; `None`: not in time).
async fn await_sentinel(
    informers: &[Arc<Informer>],
    sent: &HashMap<String, f64>,
    value: &str,
    timeout: Duration,
) -> Vec<Option<f64>> {
    let mut namespaces: Vec<String> = sent.keys().cloned().collect();
    namespaces.sort();
    let deadline = Instant::now() + timeout;
    loop {
        let seen: Vec<Option<f64>> = informers
            .iter()
            .map(|informer| {
                let state = informer.state.lock().expect("informer");
                required_sentinels(&informer.spec, &namespaces)
                    .iter()
                    .map(|ns| {
                        let at = state.sentinels.get(&(ns.clone(), value.to_string())).copied()?;
                        Some(at - sent.get(ns).copied().unwrap_or(at))
                    })
                    .try_fold(0.0f64, |slowest, t| t.map(|t| slowest.max(t)))
            })
            .collect();
        if seen.iter().all(Option::is_some) || Instant::now() > deadline {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn total_stats(informers: &[Arc<Informer>]) -> Stats {
    let mut total = Stats::default();
    for informer in informers {
        total.add(&informer.state.lock().expect("informer").stats);
    }
    total
}

fn seconds_summary(mut values: Vec<f64>) -> Value {
    values.sort_by(f64::total_cmp);
    let pick = |p: f64| -> Value {
        if values.is_empty() {
            return Value::Null;
        }
        let rank = ((p * values.len() as f64).ceil() as usize).clamp(1, values.len());
        json!(values[rank - 1])
    };
    json!({"n": values.len(), "min": pick(0.0), "p50": pick(0.5), "p90": pick(0.9), "max": pick(1.0)})
}

#[derive(Args)]
pub(crate) struct Informers {
    /// Where the informers connect (the API server, or kache with `--no-auth`).
    #[command(flatten)]
    target: Target,
    /// The API server (admin): sentinel changes and its `/metrics`.
    #[arg(long)]
    apiserver_url: String,
    #[arg(long)]
    apiserver_ca: Option<PathBuf>,
    #[arg(long, default_value_t = 50)]
    watchers: usize,
    /// Namespaces watched, round robin (each holds a sentinel pod).
    #[arg(long, value_delimiter = ',', required = true)]
    namespaces: Vec<String>,
    /// Label selectors, round robin after the namespaces (repeatable; `""`: none).
    #[arg(long = "selector")]
    selectors: Vec<String>,
    /// Commands run one after the other (`bash -c`) once every informer watches.
    #[arg(long = "step", required = true)]
    steps: Vec<String>,
    #[arg(long, default_value_t = 180)]
    sync_timeout: u64,
    #[arg(long, default_value_t = 180)]
    sentinel_timeout: u64,
    /// Seconds between the informers' sync and the first step.
    #[arg(long, default_value_t = 3.0)]
    settle: f64,
    /// Client-side incidents (JSON lines) go here.
    #[arg(long)]
    incidents: Option<PathBuf>,
}

/// Runs commands one after the other with `bash -c`; their times.
async fn run_steps(steps: &[String]) -> Result<Vec<Value>> {
    let mut done = Vec::new();
    for step in steps {
        let start = now_epoch();
        eprintln!("kache-e2e: {step}");
        let status = tokio::process::Command::new("bash")
            .arg("-c")
            .arg(step)
            .stdin(std::process::Stdio::null())
            .status()
            .await
            .with_context(|| format!("running {step}"))?;
        if !status.success() {
            bail!("{step}: {status}");
        }
        done.push(json!({"step": step, "start": start, "end": now_epoch()}));
    }
    Ok(done)
}

pub(crate) async fn informers(c: Informers) -> Result<Value> {
    c.target.check()?;
    let api = apiserver(&c.apiserver_url, c.apiserver_ca.as_ref());
    let api_client = api.client()?;
    let selectors = if c.selectors.is_empty() {
        vec![String::new()]
    } else {
        c.selectors.clone()
    };
    let specs: Vec<Spec> = (0..c.watchers)
        .map(|i| Spec {
            namespace: Some(c.namespaces[i % c.namespaces.len()].clone()),
            selector: selectors[(i / c.namespaces.len()) % selectors.len()].clone(),
        })
        .collect();
    let target = Arc::new(c.target.clone());
    let incidents = Arc::new(Incidents::default());
    let (stop_tx, stop) = watch::channel(false);
    let started = now_epoch();
    let (informers, tasks) = start_informers(
        &specs,
        "kache-e2e/informer",
        &target,
        &incidents,
        &stop,
        Duration::from_secs(c.sync_timeout),
    )
    .await?;
    let synced = now_epoch();
    eprintln!(
        "kache-e2e: {} informers list and watch ({:.1} s)",
        informers.len(),
        synced - started
    );
    tokio::time::sleep(Duration::from_secs_f64(c.settle)).await;
    let before = total_stats(&informers);
    let disrupted_at = now_epoch();
    let steps = run_steps(&c.steps).await;
    let steps_done = now_epoch();
    let steps = match steps {
        Ok(s) => s,
        Err(e) => {
            let _ = stop_tx.send(true);
            return Err(e);
        }
    };
    let value = format!("{}-{}", std::process::id(), (steps_done * 1000.0) as u64);
    let mut namespaces: Vec<String> = c.namespaces.clone();
    namespaces.sort();
    namespaces.dedup();
    let sent = write_sentinels(&api, &api_client, &namespaces, &value, Duration::from_secs(120)).await?;
    let seen = await_sentinel(&informers, &sent, &value, Duration::from_secs(c.sentinel_timeout)).await;
    let written = sent.values().copied().fold(0.0f64, f64::max);
    let apiserver_bytes = apiserver_pod_bytes(&api_client, &api)
        .await
        .unwrap_or_else(|e| json!({"error": format!("{e:#}")}));
    let _ = stop_tx.send(true);
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }
    let after = total_stats(&informers);
    // The counts the disruption caused: after minus before.
    let diff = |a: &BTreeMap<String, usize>, b: &BTreeMap<String, usize>| -> BTreeMap<String, usize> {
        a.iter()
            .map(|(k, v)| (k.clone(), v - b.get(k).copied().unwrap_or(0)))
            .filter(|(_, v)| *v > 0)
            .collect()
    };
    let missing = seen.iter().filter(|s| s.is_none()).count();
    if let Some(path) = &c.incidents {
        incidents.write(path)?;
    }
    Ok(json!({
        "watchers": c.watchers,
        "specs": specs.iter().map(Spec::label).collect::<BTreeSet<_>>(),
        "startedAt": started,
        "syncSeconds": synced - started,
        "disruptedAt": disrupted_at,
        "steps": steps,
        "stepsSeconds": steps_done - disrupted_at,
        "sentinelWrittenAt": written,
        "sentinelSeenAfterWrite": seconds_summary(seen.iter().flatten().copied().collect()),
        "sentinelMissing": missing,
        "caused": {
            "lists": diff(&after.lists, &before.lists),
            "listFailures": diff(&after.list_failures, &before.list_failures),
            "relists": diff(&after.relists, &before.relists),
            "watches": after.watches - before.watches,
            "watchFailures": diff(&after.watch_failures, &before.watch_failures),
            "watchEnds": diff(&after.watch_ends, &before.watch_ends),
            "events": after.events - before.events,
            "bytes": after.bytes - before.bytes,
        },
        "clientsWithWatchEnds": informers.iter().filter(|i| !i.state.lock().expect("informer").stats.watch_ends.is_empty()).count(),
        "clientsThatRelisted": informers.iter().filter(|i| !i.state.lock().expect("informer").stats.relists.is_empty()).count(),
        "apiserverSinceRestart": apiserver_bytes,
    }))
}

// ---------------------------------------------------------------- chaos

#[derive(Args)]
pub(crate) struct Chaos {
    /// kache (the clients' only way in).
    #[command(flatten)]
    target: Target,
    /// The API server (admin): the writers' starting point, the final
    /// sentinel and the direct LISTs the informers' views are compared with.
    #[arg(long)]
    apiserver_url: String,
    #[arg(long)]
    apiserver_ca: Option<PathBuf>,
    #[arg(long, default_value_t = 100)]
    informers: usize,
    /// rv=0 LISTs of a namespace's pods through a selector, in loops.
    #[arg(long, default_value_t = 40)]
    list_loops: usize,
    /// rv=0 GETs of one pod, in loops.
    #[arg(long, default_value_t = 40)]
    get_loops: usize,
    /// Consistent LISTs (no resourceVersion), in loops.
    #[arg(long, default_value_t = 10)]
    consistent_loops: usize,
    /// Writers: each creates, relabels and deletes pods of its own.
    #[arg(long, default_value_t = 10)]
    writers: usize,
    /// Namespaces `chaos-0`… the writers work in (each holds a sentinel pod).
    #[arg(long, default_value_t = 4)]
    chaos_namespaces: usize,
    /// Benchmark namespaces also watched (each holds a sentinel pod).
    #[arg(long, value_delimiter = ',', default_value = "bench-00,bench-01")]
    bench_namespaces: Vec<String>,
    /// Pods created by `create-pods` (the GET loops read those).
    #[arg(long, default_value_t = 10_000)]
    pods: usize,
    /// Seconds the loops and writers run once every informer watches.
    #[arg(long, default_value_t = 210.0)]
    duration: f64,
    /// Pause between a loop's requests, milliseconds.
    #[arg(long, default_value_t = 250)]
    think_ms: u64,
    /// Written (with the time) once the clients run: the script's schedule starts then.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Client-side incidents (JSON lines) go here.
    #[arg(long)]
    incidents: Option<PathBuf>,
    #[arg(long, default_value_t = 180)]
    sync_timeout: u64,
    #[arg(long, default_value_t = 120)]
    sentinel_timeout: u64,
}

/// Requests by client kind and outcome: `ok`, the status code, or `transport: …`.
#[derive(Default)]
struct Outcomes(Mutex<BTreeMap<String, BTreeMap<String, usize>>>);

impl Outcomes {
    fn record(&self, kind: &str, outcome: &str) {
        *self
            .0
            .lock()
            .expect("outcomes")
            .entry(kind.to_string())
            .or_default()
            .entry(outcome.to_string())
            .or_default() += 1;
    }
}

/// One loop's request and what came of it (`ok` for 2xx, `expected` for the
/// given statuses).
async fn loop_request(
    client: &Http,
    request: Request<Full<Bytes>>,
    kind: &str,
    expected: &[StatusCode],
    outcomes: &Outcomes,
    incidents: &Incidents,
    name: &str,
) -> Option<StatusCode> {
    match exchange_timeout(client, request, false, 30).await {
        Ok(r) if r.status.is_success() => {
            outcomes.record(kind, "ok");
            Some(r.status)
        }
        Ok(r) if expected.contains(&r.status) => {
            outcomes.record(kind, &format!("expected {}", r.status.as_u16()));
            Some(r.status)
        }
        Ok(r) => {
            let outcome = r.status.as_u16().to_string();
            outcomes.record(kind, &outcome);
            incidents.push(name, kind, &outcome);
            Some(r.status)
        }
        Err(e) => {
            let outcome = format!("transport: {}", transport_kind(&e));
            outcomes.record(kind, &outcome);
            incidents.push(name, kind, &outcome);
            None
        }
    }
}

/// A writer's pods: `w<NN>-<k>` in its namespace, created, relabelled
/// (`team` among team-0…team-3, so selectors see objects come and go) and
/// deleted at random.
struct Writer {
    id: usize,
    namespace: String,
    present: Vec<bool>,
}

const WRITER_PODS: usize = 20;

impl Writer {
    fn name(&self, k: usize) -> String {
        format!("w{:02}-{k:02}", self.id)
    }

    async fn step(
        &mut self,
        client: &Http,
        target: &Target,
        rng: &mut Rng,
        outcomes: &Outcomes,
        incidents: &Incidents,
    ) {
        let k = rng.below(WRITER_PODS as u64) as usize;
        let name = self.name(k);
        let who = format!("writer-{:02}", self.id);
        let base = format!("/api/v1/namespaces/{}/pods", self.namespace);
        let agent = "kache-e2e/writer";
        if !self.present[k] {
            let body =
                serde_json::to_vec(&named_pod(&self.namespace, &name, rng.below(4))).unwrap_or_default();
            let Ok(request) = request_as(target, agent, Method::POST, &base, Some(body)) else {
                return;
            };
            match loop_request(
                client,
                request,
                "write",
                &[StatusCode::CONFLICT],
                outcomes,
                incidents,
                &who,
            )
            .await
            {
                Some(s) if s.is_success() || s == StatusCode::CONFLICT => self.present[k] = true,
                _ => {}
            }
        } else if rng.below(3) == 0 {
            let Ok(request) = request_as(target, agent, Method::DELETE, &format!("{base}/{name}"), None)
            else {
                return;
            };
            match loop_request(
                client,
                request,
                "write",
                &[StatusCode::NOT_FOUND],
                outcomes,
                incidents,
                &who,
            )
            .await
            {
                Some(s) if s.is_success() || s == StatusCode::NOT_FOUND => self.present[k] = false,
                _ => {}
            }
        } else {
            let body = serde_json::to_vec(
                &json!({"metadata": {"labels": {"team": format!("team-{}", rng.below(4))}}}),
            )
            .unwrap_or_default();
            let Ok(request) = request_as(
                target,
                agent,
                Method::PATCH,
                &format!("{base}/{name}"),
                Some(body),
            ) else {
                return;
            };
            if let Some(StatusCode::NOT_FOUND) = loop_request(
                client,
                request,
                "write",
                &[StatusCode::NOT_FOUND],
                outcomes,
                incidents,
                &who,
            )
            .await
            {
                self.present[k] = false;
            }
        }
    }
}

/// The pods of a LIST, `namespace/name` → resourceVersion (direct, consistent).
async fn direct_view(client: &Http, api: &Target, spec: &Spec) -> Result<HashMap<String, u64>> {
    let r = exchange_timeout(
        client,
        request_as(api, CONTROL_AGENT, Method::GET, &spec.path(&[]), None)?,
        true,
        120,
    )
    .await?;
    if !r.status.is_success() {
        bail!("direct LIST {}: {}", spec.label(), r.status);
    }
    let list: List = serde_json::from_slice(r.body.as_deref().unwrap_or_default())?;
    Ok(list
        .items
        .iter()
        .map(|i| {
            (
                Informer::key(&i.metadata),
                i.metadata.resource_version.parse().unwrap_or(0),
            )
        })
        .collect())
}

pub(crate) async fn chaos(c: Chaos) -> Result<Value> {
    c.target.check()?;
    let api = apiserver(&c.apiserver_url, c.apiserver_ca.as_ref());
    let api_client = api.client()?;
    let chaos_namespaces: Vec<String> = (0..c.chaos_namespaces).map(|i| format!("chaos-{i}")).collect();
    let mut sentinel_namespaces = chaos_namespaces.clone();
    sentinel_namespaces.extend(c.bench_namespaces.iter().cloned());
    // Informers: most watch a chaos namespace (every selector), some a
    // benchmark namespace's team-1/team-2 pods, one in twenty all namespaces'.
    let chaos_selectors = ["", "team in (team-1,team-2)", "kache-bench=true,team!=team-3"];
    let specs: Vec<Spec> = (0..c.informers)
        .map(|i| {
            if i % 20 == 19 {
                Spec {
                    namespace: None,
                    selector: "team in (team-1,team-2)".into(),
                }
            } else if i % 5 == 4 && !c.bench_namespaces.is_empty() {
                Spec {
                    namespace: Some(c.bench_namespaces[i % c.bench_namespaces.len()].clone()),
                    selector: "team in (team-1,team-2)".into(),
                }
            } else {
                Spec {
                    namespace: Some(chaos_namespaces[i % chaos_namespaces.len()].clone()),
                    selector: chaos_selectors[(i / chaos_namespaces.len()) % chaos_selectors.len()].into(),
                }
            }
        })
        .collect();

    // The writers learn which of their pods exist from the API server.
    let mut writers = Vec::new();
    for id in 0..c.writers {
        let namespace = chaos_namespaces[id % chaos_namespaces.len()].clone();
        let mut writer = Writer {
            id,
            namespace: namespace.clone(),
            present: vec![false; WRITER_PODS],
        };
        let existing = direct_view(
            &api_client,
            &api,
            &Spec {
                namespace: Some(namespace),
                selector: String::new(),
            },
        )
        .await?;
        for k in 0..WRITER_PODS {
            writer.present[k] = existing.contains_key(&format!("{}/{}", writer.namespace, writer.name(k)));
        }
        writers.push(writer);
    }
    let get_names: Vec<(String, String)> = (0..200)
        .map(|j| {
            let i = (j * 7919) % c.pods.max(1);
            let ns = format!("bench-{:02}", i % 10);
            let name = pod(&ns, i, 1)["metadata"]["name"]
                .as_str()
                .unwrap_or("")
                .to_string();
            (ns, name)
        })
        .collect();

    let target = Arc::new(c.target.clone());
    let incidents = Arc::new(Incidents::default());
    let outcomes = Arc::new(Outcomes::default());
    let (stop_informers, informer_stop) = watch::channel(false);
    let started = now_epoch();
    let (informers, informer_tasks) = start_informers(
        &specs,
        "kache-e2e/informer",
        &target,
        &incidents,
        &informer_stop,
        Duration::from_secs(c.sync_timeout),
    )
    .await?;
    let synced = now_epoch();
    eprintln!(
        "kache-e2e: {} informers list and watch ({:.1} s)",
        informers.len(),
        synced - started
    );

    // The loops and writers, until the duration is over.
    let stop_loops = Arc::new(AtomicBool::new(false));
    let think = Duration::from_millis(c.think_ms);
    let mut loop_tasks = Vec::new();
    let loops: Vec<(&str, usize)> = vec![
        ("rv=0 list", c.list_loops),
        ("rv=0 get", c.get_loops),
        ("consistent list", c.consistent_loops),
    ];
    for (kind, n) in loops {
        for i in 0..n {
            let (target, outcomes, incidents, stop) = (
                target.clone(),
                outcomes.clone(),
                incidents.clone(),
                stop_loops.clone(),
            );
            let chaos_namespaces = chaos_namespaces.clone();
            let get_names = get_names.clone();
            let client = target.client()?;
            let name = format!("{}-{i:02}", kind.replace(['=', ' '], "-"));
            let agent = format!("kache-e2e/{}", kind.replace(['=', ' '], "-"));
            loop_tasks.push(tokio::spawn(async move {
                let mut rng = Rng::new(i as u64 + 1000);
                let mut sent = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let path = match kind {
                        "rv=0 list" => Spec {
                            namespace: Some(chaos_namespaces[i % chaos_namespaces.len()].clone()),
                            selector: format!("team=team-{}", rng.below(4)),
                        }
                        .path(&[("resourceVersion", "0")]),
                        "rv=0 get" => {
                            let (ns, pod) = &get_names[rng.below(get_names.len() as u64) as usize];
                            format!("/api/v1/namespaces/{ns}/pods/{pod}?resourceVersion=0")
                        }
                        _ => Spec {
                            namespace: Some(chaos_namespaces[i % chaos_namespaces.len()].clone()),
                            selector: "team=team-1".into(),
                        }
                        .path(&[]),
                    };
                    let Ok(request) = request_as(&target, &agent, Method::GET, &path, None) else {
                        break;
                    };
                    loop_request(&client, request, kind, &[], &outcomes, &incidents, &name).await;
                    sent += 1;
                    // Consistent LISTs come less often.
                    let pause = if kind == "consistent list" {
                        think * 4
                    } else {
                        think
                    };
                    tokio::time::sleep(pause.mul_f64(0.5 + rng.unit())).await;
                }
                sent
            }));
        }
    }
    for mut writer in writers {
        let (target, outcomes, incidents, stop) = (
            target.clone(),
            outcomes.clone(),
            incidents.clone(),
            stop_loops.clone(),
        );
        let client = target.client()?;
        loop_tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(writer.id as u64 + 5000);
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                writer
                    .step(&client, &target, &mut rng, &outcomes, &incidents)
                    .await;
                sent += 1;
                tokio::time::sleep((think * 2).mul_f64(0.5 + rng.unit())).await;
            }
            sent
        }));
    }
    let loops_started = now_epoch();
    if let Some(path) = &c.ready_file {
        std::fs::write(path, format!("{loops_started}\n"))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let end = Instant::now() + Duration::from_secs_f64(c.duration);
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_secs(1).min(end.saturating_duration_since(Instant::now()))).await;
    }
    stop_loops.store(true, Ordering::Relaxed);
    let mut loop_requests = 0u64;
    for task in loop_tasks {
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(40), task).await {
            loop_requests += n;
        }
    }
    let loops_stopped = now_epoch();
    eprintln!("kache-e2e: loops stopped after {loop_requests} requests; checking convergence");

    // Convergence: one last change to every sentinel, directly; once each
    // informer saw it, its view must be the API server's.
    let value = format!("chaos-{}-{}", std::process::id(), (loops_stopped * 1000.0) as u64);
    let sent = write_sentinels(
        &api,
        &api_client,
        &sentinel_namespaces,
        &value,
        Duration::from_secs(120),
    )
    .await?;
    let seen = await_sentinel(&informers, &sent, &value, Duration::from_secs(c.sentinel_timeout)).await;
    let written = sent.values().copied().fold(0.0f64, f64::max);
    let mut views = BTreeMap::<Spec, HashMap<String, u64>>::new();
    for spec in specs.iter().collect::<BTreeSet<_>>() {
        views.insert(spec.clone(), direct_view(&api_client, &api, spec).await?);
    }
    let mut failures = Vec::new();
    for (informer, seen) in informers.iter().zip(&seen) {
        let state = informer.state.lock().expect("informer");
        let want = &views[&informer.spec];
        let missing: Vec<&String> = want.keys().filter(|k| !state.store.contains_key(*k)).collect();
        let extra: Vec<&String> = state.store.keys().filter(|k| !want.contains_key(*k)).collect();
        let stale: Vec<&String> = want
            .iter()
            .filter(|(k, rv)| state.store.get(*k).is_some_and(|have| have != *rv))
            .map(|(k, _)| k)
            .collect();
        if seen.is_none() || !missing.is_empty() || !extra.is_empty() || !stale.is_empty() {
            failures.push(json!({
                "informer": informer.name,
                "spec": informer.spec.label(),
                "sawSentinel": seen.is_some(),
                "objects": state.store.len(),
                "expected": want.len(),
                "missing": missing.iter().take(5).collect::<Vec<_>>(),
                "missingCount": missing.len(),
                "extra": extra.iter().take(5).collect::<Vec<_>>(),
                "extraCount": extra.len(),
                "stale": stale.iter().take(5).collect::<Vec<_>>(),
                "staleCount": stale.len(),
            }));
        }
    }
    let _ = stop_informers.send(true);
    for task in informer_tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }
    let stats = total_stats(&informers);
    if let Some(path) = &c.incidents {
        incidents.write(path)?;
    }
    let per_client: Vec<Value> = informers
        .iter()
        .map(|i| {
            let s = i.state.lock().expect("informer");
            json!({"name": i.name, "spec": i.spec.label(), "watchEnds": s.stats.watch_ends, "relists": s.stats.relists})
        })
        .collect();
    let outcomes = outcomes.0.lock().expect("outcomes").clone();
    Ok(json!({
        "informers": c.informers,
        "loops": {"rv=0 list": c.list_loops, "rv=0 get": c.get_loops, "consistent list": c.consistent_loops, "write": c.writers},
        "clients": c.informers + c.list_loops + c.get_loops + c.consistent_loops + c.writers,
        "specs": specs.iter().map(Spec::label).collect::<BTreeSet<_>>(),
        "startedAt": started,
        "syncSeconds": synced - started,
        "loopsStartedAt": loops_started,
        "loopsStoppedAt": loops_stopped,
        "loopRequests": loop_requests,
        "outcomes": outcomes,
        "informerStats": stats,
        "perInformer": per_client,
        "incidentsDropped": incidents.dropped.load(Ordering::Relaxed),
        "sentinelWrittenAt": written,
        "sentinelSeenAfterWrite": seconds_summary(seen.iter().flatten().copied().collect()),
        "converged": failures.is_empty(),
        "failures": failures,
        "directViews": views.iter().map(|(s, v)| (s.label(), v.len())).collect::<BTreeMap<_, _>>(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_timestamps_are_unix_seconds() {
        let t = parse_timestamp("2026-11-29T23:04:22.984978Z").unwrap();
        // date -u -d 2026-11-29T23:04:22Z +%s
        assert!((t - 1_795_993_462.984_978).abs() < 1e-6, "{t}");
        assert_eq!(parse_timestamp("1970-01-01T00:00:00Z"), Some(0.0));
        assert_eq!(parse_timestamp("2000-03-01T00:00:00Z"), Some(951_868_800.0));
    }

    #[test]
    fn selectors_are_percent_encoded_in_paths() {
        let spec = Spec {
            namespace: Some("chaos-0".into()),
            selector: "team in (team-1,team-2)".into(),
        };
        assert_eq!(
            spec.path(&[("resourceVersion", "0")]),
            "/api/v1/namespaces/chaos-0/pods?resourceVersion=0&labelSelector=team%20in%20%28team-1%2Cteam-2%29"
        );
        let all = Spec {
            namespace: None,
            selector: String::new(),
        };
        assert_eq!(all.path(&[]), "/api/v1/pods");
    }

    #[test]
    fn backoff_doubles_from_800ms_to_a_30s_cap_with_up_to_double_jitter() {
        let (mut backoff, mut rng) = (Backoff::new(), Rng::new(1));
        let mut bases = Vec::new();
        for _ in 0..8 {
            let d = backoff.wait(&mut rng);
            bases.push(d);
        }
        assert!(bases[0] >= Duration::from_millis(800) && bases[0] <= Duration::from_millis(1600));
        assert!(bases[1] >= Duration::from_millis(1600) && bases[1] <= Duration::from_millis(3200));
        assert!(bases[7] >= Duration::from_secs(30) && bases[7] <= Duration::from_secs(60));
    }
}
