//! `kache-watch-bench`: the clients behind `benches/e2e/watch.sh`.
//!
//! Subcommands (each prints one JSON object on stdout, progress on stderr):
//!
//! - `pod-watches`: the pod watches open at the API server.
//! - `setup`: a namespace of ~4 KB pods (the same template as `kache-e2e
//!   create-pods`) for the fan-out.
//! - `fanout`: WATCHERS watches of that namespace's pods, each on its own
//!   HTTP/1.1 connection, then a writer patching the pods at a fixed rate
//!   straight at the API server. Each watcher notes when each change reached
//!   it; the report has the delivery latency (from the writer's PATCH
//!   response, one clock), what each watcher missed or got out of order, the
//!   server's RSS before and after the watchers connected and after the
//!   changes, the CPU time of kache, the API server and etcd over the
//!   changes, and the pod watches open at the API server.
//! - `sync`: SYNCERS clients released together that each sync every pod,
//!   either as an informer does (rv=0 LIST, then WATCH from its version) or
//!   as a streaming list (`sendInitialEvents`, KEP-3157), while kache's RSS is
//!   sampled every 50 ms; each client's set (names and resourceVersions) is
//!   compared with a LIST straight from the API server.
//!
//! The clients are lean so that a thousand of them in one process do not
//! distort what is measured: one task per watcher, and events are not
//! parsed but searched for the few bytes the bench needs (the change's
//! annotation; an item's name, namespace and resourceVersion).
//!
//! Only loopback URLs are accepted. Bearer tokens come from `BENCH_TOKEN`,
//! never the command line.

// The fan-out report is one `json!` object of many fields.
#![recursion_limit = "256"]

use std::collections::BTreeMap;
use std::io::{BufRead, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand, ValueEnum};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kache_benches::{cpu_seconds, fields, Http, Target};
use serde_json::{json, Value};
use tokio::sync::{watch, Barrier, Semaphore};

/// The annotation each change sets: its id (`cell * CELL_IDS + index`).
const CHANGE_ANNOTATION: &str = "kache-bench/change";
/// The annotation with the writer's send time (Unix microseconds).
const SENT_ANNOTATION: &str = "kache-bench/sent";
/// Change ids of one cell: `cell * CELL_IDS ..`; every cell's patches differ
/// from the last, so each is a change.
const CELL_IDS: u64 = 10_000_000;
const PROTOBUF: &str = "application/vnd.kubernetes.protobuf";
const INITIAL_EVENTS_END: &str = "k8s.io/initial-events-end";
/// User-Agent of the bench's own control requests (sentinels, metrics).
const CONTROL_AGENT: &str = "kache-watch-bench/control";
const AGENT: &str = "kache-watch-bench/0.1";

#[derive(Parser)]
#[command(
    name = "kache-watch-bench",
    about = "watch fan-out and sync-memory benchmark for kache"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    PodWatches(ApiServer),
    Setup(Setup),
    Fanout(Fanout),
    Sync(Sync),
}

/// The API server itself, as admin (`BENCH_TOKEN`): writes, `/metrics`, reference LISTs.
#[derive(Args, Clone)]
struct ApiServer {
    #[arg(long)]
    apiserver_url: String,
    #[arg(long)]
    apiserver_ca: Option<PathBuf>,
}

impl ApiServer {
    fn target(&self) -> Target {
        Target {
            url: self.apiserver_url.clone(),
            ca: self.apiserver_ca.clone(),
            token: std::env::var("BENCH_TOKEN").ok(),
            no_auth: false,
        }
    }
}

#[derive(Args)]
struct Setup {
    #[command(flatten)]
    api: ApiServer,
    #[arg(long, default_value = "watch-bench")]
    namespace: String,
    #[arg(long, default_value_t = 300)]
    objects: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Encoding {
    Json,
    Protobuf,
}

impl Encoding {
    fn accept(self) -> &'static str {
        match self {
            Encoding::Json => "application/json",
            Encoding::Protobuf => PROTOBUF,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Encoding::Json => "json",
            Encoding::Protobuf => "protobuf",
        }
    }
}

#[derive(Args)]
struct Fanout {
    /// Where the watchers connect: kache, or the API server itself.
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    api: ApiServer,
    /// kache's admin URL, when the target is kache: its store and watcher metrics.
    #[arg(long)]
    kache_admin: Option<String>,
    #[arg(long, default_value = "watch-bench")]
    namespace: String,
    #[arg(long, default_value_t = 1000)]
    watchers: usize,
    #[arg(long, default_value_t = 1000)]
    changes: usize,
    /// Changes per second (an open loop: each is sent at its time).
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    #[arg(long, value_enum, default_value = "json")]
    encoding: Encoding,
    /// This cell's number (for the change ids).
    #[arg(long, default_value_t = 1)]
    cell: u64,
    /// The process serving the watchers (kache, or the API server): its RSS.
    #[arg(long)]
    server_pid: u32,
    /// `NAME=PID`: a process whose CPU time over the changes is reported (repeatable).
    #[arg(long = "cpu", value_name = "NAME=PID")]
    cpu: Vec<String>,
    /// Pod watches open at the API server before kache started (its own and others').
    #[arg(long, default_value_t = 0.0)]
    baseline_watches: f64,
    /// Watchers connecting at once.
    #[arg(long, default_value_t = 50)]
    connect_concurrency: usize,
    /// Watches per HTTP/2 connection, as client-go multiplexes its watches
    /// to a host; 0: each watch on its own HTTP/1.1 connection.
    #[arg(long, default_value_t = 0)]
    http2_streams: usize,
    /// Writes in flight at most.
    #[arg(long, default_value_t = 32)]
    write_concurrency: usize,
    /// How long the changes may take to reach every watcher after the last write, seconds.
    #[arg(long, default_value_t = 60)]
    drain_timeout: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// rv=0 LIST, then WATCH from its resourceVersion (client-go's informers until WatchList).
    Classic,
    /// `watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan` (WatchList).
    Stream,
}

#[derive(Args)]
struct Sync {
    /// kache.
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    api: ApiServer,
    #[arg(long)]
    kache_admin: String,
    #[arg(long, value_enum)]
    mode: Mode,
    #[arg(long, default_value_t = 50)]
    syncers: usize,
    /// The collection every client syncs.
    #[arg(long, default_value = "/api/v1/pods")]
    path: String,
    /// kache's process: its RSS and peak.
    #[arg(long)]
    pid: u32,
    /// `NAME=PID`: a process whose CPU time over the sync is reported (repeatable).
    #[arg(long = "cpu", value_name = "NAME=PID")]
    cpu: Vec<String>,
    /// The API server's audit log: the requests kache sent during the sync.
    #[arg(long)]
    audit_log: Option<PathBuf>,
    #[arg(long, default_value_t = 50)]
    sample_ms: u64,
    /// Bound on every client's sync, seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let out = runtime.block_on(async {
        match cli.command {
            Command::PodWatches(c) => {
                let api = c.target();
                let client = Target::client_on(&api.connector()?);
                Ok(json!({"podWatches": apiserver_pod_watches(&client, &api).await?}))
            }
            Command::Setup(c) => setup(c).await,
            Command::Fanout(c) => fanout(c).await,
            Command::Sync(c) => sync(c).await,
        }
    })?;
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}

// ---------------------------------------------------------------- HTTP

/// Sends a request and reads the whole body, within `timeout`.
async fn fetch(
    client: &Http,
    request: Request<Full<Bytes>>,
    timeout: Duration,
) -> Result<(StatusCode, Vec<u8>)> {
    let uri = request.uri().clone();
    tokio::time::timeout(timeout, async {
        let response = client.request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        Ok::<_, anyhow::Error>((status, body.to_vec()))
    })
    .await
    .map_err(|_| anyhow::anyhow!("{uri}: no answer within {timeout:?}"))?
    .with_context(|| format!("{uri}"))
}

async fn get_ok(client: &Http, target: &Target, path: &str, accept: Option<&str>) -> Result<Vec<u8>> {
    let (status, body) = fetch(
        client,
        target.request_as(Method::GET, path, accept, None, CONTROL_AGENT)?,
        Duration::from_secs(120),
    )
    .await?;
    if !status.is_success() {
        bail!(
            "GET {path}: {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(300)])
        );
    }
    Ok(body)
}

// ---------------------------------------------------------------- processes

/// A `/proc/PID/status` field in kB (`VmRSS`, `VmHWM`).
fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Resets the process's peak RSS (`VmHWM`) to its current RSS (Linux ≥ 4.0).
fn reset_hwm(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// CPU time of named processes over a stretch of the run.
struct CpuWatch(Vec<(String, String, f64)>);

impl CpuWatch {
    fn start(specs: &[String]) -> Result<CpuWatch> {
        let mut out = vec![("client".to_string(), "self".to_string(), cpu_seconds("self")?)];
        for spec in specs {
            let (name, pid) = spec.split_once('=').context("--cpu NAME=PID")?;
            out.push((name.to_string(), pid.to_string(), cpu_seconds(pid)?));
        }
        Ok(CpuWatch(out))
    }

    fn since(&self) -> Value {
        let mut out = serde_json::Map::new();
        for (name, pid, before) in &self.0 {
            out.insert(name.clone(), json!(cpu_seconds(pid).ok().map(|now| now - before)));
        }
        Value::Object(out)
    }
}

// ---------------------------------------------------------------- metrics

/// The sum of a Prometheus metric's samples whose label set contains every `labels` pair.
fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

async fn metrics_text(client: &Http, target: &Target, path: &str) -> Result<String> {
    Ok(String::from_utf8_lossy(&get_ok(client, target, path, None).await?).into_owned())
}

/// Pod watches open at the API server (`apiserver_longrunning_gauge`).
async fn apiserver_pod_watches(client: &Http, api: &Target) -> Result<f64> {
    let text = metrics_text(client, api, "/metrics").await?;
    Ok(metric_sum(
        &text,
        "apiserver_longrunning_gauge",
        &[("resource", "pods"), ("verb", "WATCH")],
    ))
}

/// kache's watchers served from its pod store in `encoding`.
async fn kache_pod_watchers(client: &Http, admin: &Target, encoding: Encoding) -> Result<f64> {
    let text = metrics_text(client, admin, "/metrics").await?;
    Ok(metric_sum(
        &text,
        "kache_cache_watchers",
        &[("resource", "v1/pods"), ("encoding", encoding.as_str())],
    ))
}

/// The pod store in `encoding` per kache's `/debug/cache`: (synced, objects).
async fn kache_pod_store(client: &Http, admin: &Target, encoding: Encoding) -> Result<(bool, u64)> {
    let body = get_ok(client, admin, "/debug/cache", None).await?;
    let cache: Value = serde_json::from_slice(&body)?;
    let store = cache["resources"].as_array().and_then(|resources| {
        resources.iter().find(|r| {
            r["resource"] == "pods"
                && r["group"] == ""
                && r["encoding"].as_str().unwrap_or("json") == encoding.as_str()
        })
    });
    Ok(store.map_or((false, 0), |s| {
        (
            s["synced"].as_bool().unwrap_or(false),
            s["objects"].as_u64().unwrap_or(0),
        )
    }))
}

/// Polls `check` every `every` until it holds, for at most `within`.
async fn until<F, Fut>(what: &str, every: Duration, within: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(every).await;
    }
}

/// Waits until kache's pod store in `encoding` is in sync with at least `objects` objects.
async fn kache_store_synced(
    client: &Http,
    admin: &Target,
    via: &Target,
    encoding: Encoding,
    objects: u64,
) -> Result<()> {
    // A first rv=0 LIST starts the store.
    let _ = get_ok(
        client,
        via,
        "/api/v1/pods?resourceVersion=0&limit=1",
        Some(encoding.accept()),
    )
    .await;
    until(
        &format!("kache's {} pod store", encoding.as_str()),
        Duration::from_millis(200),
        Duration::from_secs(180),
        || async {
            let (synced, have) = kache_pod_store(client, admin, encoding).await?;
            Ok(synced && have >= objects)
        },
    )
    .await
}

// ---------------------------------------------------------------- statistics

fn percentile<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    // Nearest rank.
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// Percentiles of microsecond values, in milliseconds.
fn summary_us(mut values: Vec<i64>) -> Value {
    values.sort_unstable();
    let ms = |p: f64| percentile(&values, p).map(|v| v as f64 / 1e3);
    json!({
        "n": values.len(),
        "min_ms": ms(0.0),
        "p50_ms": ms(0.50),
        "p90_ms": ms(0.90),
        "p99_ms": ms(0.99),
        "max_ms": ms(1.0),
        "negative": values.iter().filter(|v| **v < 0).count(),
    })
}

/// The 1-minute load average (`/proc/loadavg`): how busy the shared machine was.
fn loadavg() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn now_epoch_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

// ---------------------------------------------------------------- byte search

/// The first `byte` in `bytes` (32 bytes compared at a time).
fn find_byte(bytes: &[u8], byte: u8) -> Option<usize> {
    let mut chunks = bytes.chunks_exact(32);
    let mut base = 0;
    for chunk in &mut chunks {
        let chunk: &[u8; 32] = chunk.try_into().expect("invariant: chunks_exact(32)");
        if chunk.iter().fold(false, |found, b| found | (*b == byte)) {
            return chunk.iter().position(|b| *b == byte).map(|i| base + i);
        }
        base += 32;
    }
    chunks
        .remainder()
        .iter()
        .position(|b| *b == byte)
        .map(|i| base + i)
}

fn find_newline(bytes: &[u8]) -> Option<usize> {
    find_byte(bytes, b'\n')
}

/// The first occurrence of `needle` (not empty) in `haystack`: candidates
/// are found by one of its bytes that JSON holds rarely (an upper-case
/// letter, `{` or `/`; else its first), then checked whole.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    let pivot = needle
        .iter()
        .position(|b| b.is_ascii_uppercase() || matches!(b, b'{' | b'/'))
        .unwrap_or(0);
    let mut from = 0;
    loop {
        let at = from + pivot + find_byte(haystack.get(from + pivot..)?, needle[pivot])?;
        let start = at - pivot;
        if haystack[start..].starts_with(needle) {
            return Some(start);
        }
        from = start + 1;
    }
}

/// The bytes of a JSON string value that starts at `at`, up to its closing quote.
fn string_at(bytes: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let len = bytes.get(at..)?.iter().position(|b| *b == b'"')?;
    Some((&bytes[at..at + len], at + len + 1))
}

fn parse_u64(bytes: &[u8]) -> Option<u64> {
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

// ---------------------------------------------------------------- protobuf

fn field(buf: &[u8], number: u64) -> Option<&[u8]> {
    let mut found = None;
    fields(buf, |n, v| {
        if n == number && found.is_none() {
            found = Some(v);
        }
    })?;
    found
}

/// The object of a `k8s\0` envelope (`runtime.Unknown.raw`).
fn unknown_raw(envelope: &[u8]) -> Option<&[u8]> {
    field(envelope.strip_prefix(b"k8s\0")?, 2)
}

/// A protobuf list's `metadata.resourceVersion`.
fn protobuf_list_version(body: &[u8]) -> Option<u64> {
    let list = unknown_raw(body)?;
    parse_u64(field(field(list, 1)?, 2)?)
}

// ---------------------------------------------------------------- events

/// What a watcher makes of one event.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    /// A MODIFIED (or ADDED) event carrying this change id.
    Change(u64),
    /// A MODIFIED/ADDED/DELETED event without one.
    Other,
    Bookmark,
    Error,
}

/// A JSON watch event's type (`{"type":"…"` opens every event).
fn event_type(line: &[u8]) -> &[u8] {
    line.strip_prefix(b"{\"type\":\"")
        .and_then(|rest| string_at(rest, 0))
        .map_or(&b""[..], |(kind, _)| kind)
}

/// A JSON watch event (one line): its type and change annotation.
fn json_event(line: &[u8], marker: &[u8]) -> Seen {
    match event_type(line) {
        b"BOOKMARK" => Seen::Bookmark,
        b"ERROR" => Seen::Error,
        b"MODIFIED" | b"ADDED" => find(line, marker)
            .and_then(|at| string_at(line, at + marker.len()))
            .and_then(|(id, _)| parse_u64(id))
            .map_or(Seen::Other, Seen::Change),
        _ => Seen::Other,
    }
}

/// A protobuf watch event (a frame without its length): its type and change annotation.
fn protobuf_event(frame: &[u8]) -> Seen {
    let kind = field(frame, 1).unwrap_or_default();
    match kind {
        b"BOOKMARK" => return Seen::Bookmark,
        b"ERROR" => return Seen::Error,
        b"MODIFIED" | b"ADDED" => {}
        _ => return Seen::Other,
    }
    let meta = field(frame, 2)
        .and_then(|raw_extension| field(raw_extension, 1))
        .and_then(unknown_raw)
        .and_then(|object| field(object, 1));
    let mut id = None;
    if let Some(meta) = meta {
        let _ = fields(meta, |n, entry| {
            if n == 12 && field(entry, 1) == Some(CHANGE_ANNOTATION.as_bytes()) {
                id = field(entry, 2).and_then(parse_u64);
            }
        });
    }
    id.map_or(Seen::Other, Seen::Change)
}

/// Splits a watch's byte stream into events: newline-ended JSON lines, or
/// protobuf frames each after its 4-byte big-endian length.
struct Framer {
    encoding: Encoding,
    pending: Vec<u8>,
}

impl Framer {
    fn new(encoding: Encoding) -> Framer {
        Framer {
            encoding,
            pending: Vec::new(),
        }
    }

    /// Calls `f` with each whole event in `data` (and what was left before).
    fn feed(&mut self, data: &[u8], mut f: impl FnMut(&[u8])) {
        let mut rest = data;
        if !self.pending.is_empty() {
            // Complete the event begun in an earlier chunk first.
            let need = match self.encoding {
                Encoding::Json => find_newline(rest).map(|i| i + 1),
                Encoding::Protobuf => self.protobuf_need(rest),
            };
            match need {
                Some(n) => {
                    self.pending.extend_from_slice(&rest[..n]);
                    rest = &rest[n..];
                    let event = std::mem::take(&mut self.pending);
                    f(self.frame_body(&event));
                    self.pending = event;
                    self.pending.clear();
                }
                None => {
                    self.pending.extend_from_slice(rest);
                    return;
                }
            }
        }
        loop {
            let len = match self.encoding {
                Encoding::Json => find_newline(rest).map(|i| i + 1),
                Encoding::Protobuf => rest
                    .get(..4)
                    .map(|l| 4 + u32::from_be_bytes(l.try_into().expect("invariant: 4 bytes")) as usize)
                    .filter(|len| *len <= rest.len()),
            };
            match len {
                Some(n) => {
                    f(self.frame_body(&rest[..n]));
                    rest = &rest[n..];
                }
                None => {
                    self.pending.extend_from_slice(rest);
                    return;
                }
            }
        }
    }

    /// How many bytes of `more` complete the pending protobuf frame, if it completes.
    fn protobuf_need(&self, more: &[u8]) -> Option<usize> {
        let have = self.pending.len();
        let mut head = [0u8; 4];
        for (i, b) in head.iter_mut().enumerate() {
            *b = if i < have {
                self.pending[i]
            } else {
                *more.get(i - have)?
            };
        }
        let total = 4 + u32::from_be_bytes(head) as usize;
        let need = total.saturating_sub(have);
        (need <= more.len()).then_some(need)
    }

    fn frame_body<'a>(&self, frame: &'a [u8]) -> &'a [u8] {
        match self.encoding {
            Encoding::Json => frame,
            Encoding::Protobuf => &frame[4.min(frame.len())..],
        }
    }
}

// ---------------------------------------------------------------- setup

/// A realistic Deployment-made pod, padded with labels, annotations and env
/// to about 4 KB as stored (`kache-e2e create-pods`'s template).
fn pod(namespace: &str, index: usize) -> Value {
    let app = format!("svc-{:03}", index % 200);
    let hash = format!(
        "{:010x}",
        (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 24
    );
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": format!("{app}-{hash}-{index:05}"),
            "namespace": namespace,
            "labels": {
                "app.kubernetes.io/name": app,
                "app.kubernetes.io/instance": format!("{app}-prod"),
                "app.kubernetes.io/version": "1.24.3",
                "app.kubernetes.io/component": "backend",
                "pod-template-hash": hash,
                "team": format!("team-{}", index % 17),
                "kache-bench": "true",
            },
            "annotations": {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": "9090",
                "checksum/config": format!("{:064x}", (index as u128).wrapping_mul(0x2545_f491_4f6c_dd1d_9e37_79b9_7f4a_7c15)),
            },
        },
        "spec": {
            "serviceAccountName": "default",
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "containers": [
                {
                    "name": "app",
                    "image": format!("registry.example.com/kache-bench/{app}:1.24.3"),
                    "args": ["--config=/etc/app/config.yaml", "--port=8080"],
                    "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}, {"name": "metrics", "containerPort": 9090, "protocol": "TCP"}],
                    "env": [
                        {"name": "APP_SETTING_00", "value": format!("value-00-{index:05}-abcdefghij")},
                        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                    ],
                    "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "1", "memory": "512Mi"}},
                    "volumeMounts": [{"name": "config", "mountPath": "/etc/app", "readOnly": true}],
                    "readinessProbe": {"httpGet": {"path": "/readyz", "port": 8080}, "periodSeconds": 10},
                },
            ],
            "volumes": [{"name": "config", "configMap": {"name": format!("{app}-config")}}],
        },
    })
}

async fn setup(c: Setup) -> Result<Value> {
    let api = c.api.target();
    let connector = api.connector()?;
    let client = Target::client_on(&connector);
    let start = Instant::now();
    let ns = serde_json::to_vec(
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": c.namespace}}),
    )?;
    let (status, body) = fetch(
        &client,
        api.request_as(
            Method::POST,
            "/api/v1/namespaces",
            None,
            Some(("application/json", ns)),
            CONTROL_AGENT,
        )?,
        Duration::from_secs(60),
    )
    .await?;
    if !(status.is_success() || status == StatusCode::CONFLICT) {
        bail!(
            "creating namespace {}: {status}: {}",
            c.namespace,
            String::from_utf8_lossy(&body)
        );
    }
    let next = Arc::new(AtomicUsize::new(0));
    let (created, existed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (api, next, created, existed, namespace) = (
            api.clone(),
            next.clone(),
            created.clone(),
            existed.clone(),
            c.namespace.clone(),
        );
        let client = Target::client_on(&connector);
        let count = c.objects;
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return Ok::<(), anyhow::Error>(());
                }
                let body = serde_json::to_vec(&pod(&namespace, i))?;
                let path = format!("/api/v1/namespaces/{namespace}/pods");
                let request = api.request_as(
                    Method::POST,
                    &path,
                    None,
                    Some(("application/json", body)),
                    CONTROL_AGENT,
                )?;
                let (status, body) = fetch(&client, request, Duration::from_secs(60)).await?;
                match status {
                    s if s.is_success() => created.fetch_add(1, Ordering::Relaxed),
                    StatusCode::CONFLICT => existed.fetch_add(1, Ordering::Relaxed),
                    s => bail!("creating pod {i}: {s}: {}", String::from_utf8_lossy(&body)),
                };
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    let sample = serde_json::to_vec(&pod(&c.namespace, 0))?.len();
    Ok(json!({
        "namespace": c.namespace,
        "created": created.load(Ordering::Relaxed),
        "existed": existed.load(Ordering::Relaxed),
        "seconds": start.elapsed().as_secs_f64(),
        "requestBodyBytes": sample,
    }))
}

// ---------------------------------------------------------------- fanout

/// One watcher's record: each change it saw (index in the cell, receive
/// time in µs since the cell's start), in order, and everything else.
#[derive(Default)]
struct Record {
    changes: Vec<(u32, u32)>,
    bookmarks: u32,
    other: u32,
    errors: u32,
    /// Changes of another cell (or with a malformed id).
    foreign: u32,
    bytes: u64,
    /// The watch ended before the cell did (and why).
    ended: Option<String>,
}

/// What a writer's change became.
struct Write {
    sent_us: u64,
    answered_us: u64,
    resource_version: u64,
}

/// What every watcher of a cell shares.
struct Cell {
    encoding: Encoding,
    /// Receive times count from here.
    base: Instant,
    /// The cell's first change id.
    id_base: u64,
    changes: usize,
    /// Changes seen, summed over watchers.
    delivered: AtomicU64,
}

/// Opens one watch; the task that reads it returns its record once `stop` turns true.
async fn open_watcher(
    client: Http,
    request: Request<Full<Bytes>>,
    cell: Arc<Cell>,
    mut stop: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<Record>> {
    let response = tokio::time::timeout(Duration::from_secs(60), client.request(request))
        .await
        .map_err(|_| anyhow::anyhow!("no answer within 60 s"))??;
    if response.status() != StatusCode::OK {
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        bail!(
            "{status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(300)])
        );
    }
    let mut body: Incoming = response.into_body();
    Ok(tokio::spawn(async move {
        let _client = client;
        let Cell {
            encoding,
            base,
            id_base,
            changes,
            ref delivered,
        } = *cell;
        let marker = format!("\"{CHANGE_ANNOTATION}\":\"");
        let mut framer = Framer::new(encoding);
        let mut record = Record {
            changes: Vec::with_capacity(changes),
            ..Record::default()
        };
        loop {
            let frame = tokio::select! {
                frame = body.frame() => frame,
                _ = stop.wait_for(|stop| *stop) => break,
            };
            let data = match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => data,
                    Err(_) => continue,
                },
                Some(Err(e)) => {
                    record.ended = Some(format!("broken stream: {e}"));
                    break;
                }
                None => {
                    record.ended = Some("ended".to_string());
                    break;
                }
            };
            let at = base.elapsed().as_micros() as u32;
            record.bytes += data.len() as u64;
            let mut seen_now = 0;
            framer.feed(&data, |event| {
                let seen = match encoding {
                    Encoding::Json => json_event(event, marker.as_bytes()),
                    Encoding::Protobuf => protobuf_event(event),
                };
                match seen {
                    Seen::Change(id) => match id.checked_sub(id_base).filter(|i| *i < changes as u64) {
                        Some(index) => {
                            record.changes.push((index as u32, at));
                            seen_now += 1;
                        }
                        None => record.foreign += 1,
                    },
                    Seen::Other => record.other += 1,
                    Seen::Bookmark => record.bookmarks += 1,
                    Seen::Error => record.errors += 1,
                }
            });
            if seen_now > 0 {
                delivered.fetch_add(seen_now, Ordering::Relaxed);
            }
        }
        record
    }))
}

async fn fanout(c: Fanout) -> Result<Value> {
    let api = c.api.target();
    let api_connector = api.connector()?;
    let control = Target::client_on(&api_connector);
    let via_connector = c.target.connector()?;
    let via_control = Target::client_on(&via_connector);
    let admin = c.kache_admin.as_ref().map(|url| Target {
        url: url.clone(),
        ca: None,
        token: None,
        no_auth: true,
    });
    let collection = format!("/api/v1/namespaces/{}/pods", c.namespace);
    let loadavg_start = loadavg();

    // The pods, as the API server has them (a consistent LIST): the writer's
    // targets, and how many the watchers' list must hold.
    let names: Vec<String> = {
        let body = get_ok(&control, &api, &collection, None).await?;
        let list: Value = serde_json::from_slice(&body)?;
        list["items"]
            .as_array()
            .context("not a list")?
            .iter()
            .filter_map(|i| i["metadata"]["name"].as_str().map(str::to_string))
            .collect()
    };
    if names.is_empty() {
        bail!("no pods in {}", c.namespace);
    }
    let watches_at_start = apiserver_pod_watches(&control, &api).await?;
    if let Some(admin) = &admin {
        eprintln!("fanout: waiting for kache's {} pod store", c.encoding.as_str());
        kache_store_synced(&via_control, admin, &c.target, c.encoding, names.len() as u64).await?;
    }
    // The watchers' starting point: an rv=0 LIST through the target.
    let list_path = format!("{collection}?resourceVersion=0");
    let body = get_ok(&via_control, &c.target, &list_path, Some(c.encoding.accept())).await?;
    let from = match c.encoding {
        Encoding::Json => {
            let list: Value = serde_json::from_slice(&body)?;
            list["metadata"]["resourceVersion"]
                .as_str()
                .and_then(|v| v.parse::<u64>().ok())
                .context("the list's resourceVersion")?
        }
        Encoding::Protobuf => protobuf_list_version(&body).context("the protobuf list's resourceVersion")?,
    };
    drop(body);
    // Let the server settle after the list (its allocator, its store's first serving).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_idle = status_kb(c.server_pid, "VmRSS");
    let apiserver_pid = c
        .cpu
        .iter()
        .find_map(|s| s.strip_prefix("apiserver="))
        .and_then(|p| p.parse::<u32>().ok());
    let apiserver_rss_idle = apiserver_pid.and_then(|p| status_kb(p, "VmRSS"));

    // The watchers, each on its own connection or, over HTTP/2,
    // `http2_streams` to a connection.
    let base = Instant::now();
    let id_base = c.cell * CELL_IDS;
    let cell = Arc::new(Cell {
        encoding: c.encoding,
        base,
        id_base,
        changes: c.changes,
        delivered: AtomicU64::new(0),
    });
    let delivered = &cell.delivered;
    let (stop_tx, stop_rx) = watch::channel(false);
    let watch_path = format!("{collection}?watch=true&resourceVersion={from}&allowWatchBookmarks=true");
    eprintln!(
        "fanout: {} watchers of {} from {from} ({})",
        c.watchers,
        c.target.url,
        c.encoding.as_str()
    );
    let gate = Arc::new(Semaphore::new(c.connect_concurrency.max(1)));
    let mut opening = Vec::new();
    let connect_start = Instant::now();
    let http2_connector = c.target.http2_connector()?;
    let mut client = None;
    for i in 0..c.watchers {
        let client = match c.http2_streams {
            0 => Target::client_on(&via_connector),
            streams => {
                if i % streams == 0 {
                    client = Some(Target::http2_client_on(&http2_connector));
                }
                client.clone().expect("invariant: made at the first watcher")
            }
        };
        let request =
            c.target
                .request_as(Method::GET, &watch_path, Some(c.encoding.accept()), None, AGENT)?;
        let (gate, cell, stop) = (gate.clone(), cell.clone(), stop_rx.clone());
        opening.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await?;
            open_watcher(client, request, cell, stop).await
        }));
    }
    let mut watchers = Vec::new();
    let mut connect_errors = BTreeMap::<String, usize>::new();
    for task in opening {
        match task.await? {
            Ok(handle) => watchers.push(handle),
            Err(e) => *connect_errors.entry(format!("{e:#}")).or_default() += 1,
        }
    }
    let connect_seconds = connect_start.elapsed().as_secs_f64();
    let connected = watchers.len();
    eprintln!("fanout: {connected} watchers connected in {connect_seconds:.1} s; errors {connect_errors:?}");
    // Registered at the server: kache's metric, or the API server's gauge.
    let registered_since = Instant::now();
    let registered = match &admin {
        Some(admin) => {
            until(
                "every watcher registered in kache",
                Duration::from_millis(100),
                Duration::from_secs(60),
                || async {
                    Ok(kache_pod_watchers(&via_control, admin, c.encoding).await? >= connected as f64)
                },
            )
            .await
        }
        None => {
            until(
                "every watch open at the API server",
                Duration::from_millis(250),
                Duration::from_secs(60),
                || async {
                    Ok(apiserver_pod_watches(&control, &api).await? >= watches_at_start + connected as f64)
                },
            )
            .await
        }
    };
    if let Err(e) = &registered {
        eprintln!("fanout: {e:#}");
    }
    let registered_seconds = registered_since.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_connected = status_kb(c.server_pid, "VmRSS");
    let apiserver_rss_connected = apiserver_pid.and_then(|p| status_kb(p, "VmRSS"));
    let watches_connected = apiserver_pod_watches(&control, &api).await?;
    let kache_watchers = match &admin {
        Some(admin) => Some(kache_pod_watchers(&via_control, admin, c.encoding).await?),
        None => None,
    };
    let delivered_before = delivered.load(Ordering::Relaxed);

    // The writer: an open loop at `rate`, straight at the API server.
    eprintln!("fanout: {} changes at {}/s", c.changes, c.rate);
    let cpu = CpuWatch::start(&c.cpu)?;
    let writes_start = Instant::now();
    let write_gate = Arc::new(Semaphore::new(c.write_concurrency.max(1)));
    let write_client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(c.write_concurrency.max(1))
        .build(api_connector.clone());
    let mut writes = Vec::with_capacity(c.changes);
    for i in 0..c.changes {
        let due = writes_start + Duration::from_secs_f64(i as f64 / c.rate);
        tokio::time::sleep_until(due.into()).await;
        let permit = write_gate.clone().acquire_owned().await?;
        let name = &names[i % names.len()];
        let id = id_base + i as u64;
        let sent_epoch = now_epoch_us();
        let patch = json!({"metadata": {"annotations": {
            CHANGE_ANNOTATION: id.to_string(),
            SENT_ANNOTATION: sent_epoch.to_string(),
        }}});
        let request = api.request_as(
            Method::PATCH,
            &format!("{collection}/{name}"),
            Some("application/json"),
            Some(("application/merge-patch+json", serde_json::to_vec(&patch)?)),
            CONTROL_AGENT,
        )?;
        let client = write_client.clone();
        writes.push(tokio::spawn(async move {
            let _permit = permit;
            let sent_us = base.elapsed().as_micros() as u64;
            let (status, body) = fetch(&client, request, Duration::from_secs(60)).await?;
            let answered_us = base.elapsed().as_micros() as u64;
            if !status.is_success() {
                bail!(
                    "PATCH: {status}: {}",
                    String::from_utf8_lossy(&body[..body.len().min(300)])
                );
            }
            let object: Value = serde_json::from_slice(&body)?;
            let resource_version = object["metadata"]["resourceVersion"]
                .as_str()
                .and_then(|v| v.parse().ok())
                .context("the patched pod's resourceVersion")?;
            Ok::<_, anyhow::Error>(Write {
                sent_us,
                answered_us,
                resource_version,
            })
        }));
    }
    let mut written: Vec<Option<Write>> = Vec::with_capacity(c.changes);
    let mut write_errors = BTreeMap::<String, usize>::new();
    for task in writes {
        match task.await? {
            Ok(w) => written.push(Some(w)),
            Err(e) => {
                *write_errors.entry(format!("{e:#}")).or_default() += 1;
                written.push(None);
            }
        }
    }
    let writes_seconds = writes_start.elapsed().as_secs_f64();
    let ok_writes = written.iter().flatten().count();
    eprintln!("fanout: {ok_writes} changes written in {writes_seconds:.1} s; waiting for delivery");

    // Until every connected watcher has every change, or nothing moves for a while.
    let expected = (connected * ok_writes) as u64;
    let drain_deadline = Instant::now() + Duration::from_secs(c.drain_timeout);
    let (mut last, mut last_moved) = (delivered.load(Ordering::Relaxed), Instant::now());
    loop {
        let now = delivered.load(Ordering::Relaxed);
        if now >= expected + delivered_before || Instant::now() > drain_deadline {
            break;
        }
        if now != last {
            (last, last_moved) = (now, Instant::now());
        } else if last_moved.elapsed() > Duration::from_secs(15) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let delivery_seconds = writes_start.elapsed().as_secs_f64();
    let cpu_seconds = cpu.since();
    let rss_after = status_kb(c.server_pid, "VmRSS");
    let hwm_after = status_kb(c.server_pid, "VmHWM");
    let apiserver_rss_after = apiserver_pid.and_then(|p| status_kb(p, "VmRSS"));
    let _ = stop_tx.send(true);
    let mut records = Vec::with_capacity(connected);
    for handle in watchers {
        records.push(handle.await?);
    }

    // Delivery: latency per event per watcher, and what each missed.
    let mut order: Vec<usize> = (0..c.changes).filter(|i| written[*i].is_some()).collect();
    order.sort_by_key(|i| written[*i].as_ref().map_or(0, |w| w.resource_version));
    let mut rank = vec![usize::MAX; c.changes];
    for (r, i) in order.iter().enumerate() {
        rank[*i] = r;
    }
    let (mut from_answer, mut from_send) = (Vec::new(), Vec::new());
    let (mut missing, mut out_of_order, mut duplicates, mut unexpected) = (0usize, 0usize, 0usize, 0usize);
    let (mut complete, mut ended) = (0usize, BTreeMap::<String, usize>::new());
    let (mut bookmarks, mut other, mut errors, mut foreign, mut bytes) = (0u64, 0u64, 0u64, 0u64, 0u64);
    for record in &records {
        let mut got = vec![false; c.changes];
        let mut last_rank = None;
        for &(index, at) in &record.changes {
            let index = index as usize;
            let Some(w) = written[index].as_ref() else {
                unexpected += 1;
                continue;
            };
            if got[index] {
                duplicates += 1;
                continue;
            }
            got[index] = true;
            if last_rank.is_some_and(|last| rank[index] < last) {
                out_of_order += 1;
            }
            last_rank = Some(rank[index]);
            from_answer.push(i64::from(at) - w.answered_us as i64);
            from_send.push(i64::from(at) - w.sent_us as i64);
        }
        let seen = order.iter().filter(|i| got[**i]).count();
        missing += ok_writes - seen;
        if seen == ok_writes {
            complete += 1;
        }
        if let Some(why) = &record.ended {
            *ended.entry(why.clone()).or_default() += 1;
        }
        bookmarks += u64::from(record.bookmarks);
        other += u64::from(record.other);
        errors += u64::from(record.errors);
        foreign += u64::from(record.foreign);
        bytes += record.bytes;
    }
    missing += (c.watchers - connected) * ok_writes;
    let delivered_events = from_answer.len();
    let mut write_latency: Vec<i64> = written
        .iter()
        .flatten()
        .map(|w| (w.answered_us - w.sent_us) as i64)
        .collect();
    write_latency.sort_unstable();

    // Stop and wait (bounded) until the server has let the watchers go, so
    // the next cell starts clean.
    drop(records);
    let released = match &admin {
        Some(admin) => until(
            "the watchers gone from kache",
            Duration::from_millis(200),
            Duration::from_secs(30),
            || async { Ok(kache_pod_watchers(&via_control, admin, c.encoding).await? == 0.0) },
        )
        .await
        .is_ok(),
        None => until(
            "the watches gone from the API server",
            Duration::from_millis(500),
            Duration::from_secs(60),
            || async { Ok(apiserver_pod_watches(&control, &api).await? <= watches_at_start) },
        )
        .await
        .is_ok(),
    };

    Ok(json!({
        "side": if admin.is_some() { "kache" } else { "direct" },
        "encoding": c.encoding.as_str(),
        "http2Streams": c.http2_streams,
        "watchers": c.watchers,
        "connected": connected,
        "connectErrors": connect_errors,
        "connectSeconds": connect_seconds,
        "registeredSeconds": registered_seconds,
        "registered": registered.is_ok(),
        "objects": names.len(),
        "from": from,
        "changes": c.changes,
        "rate": c.rate,
        "written": ok_writes,
        "writeErrors": write_errors,
        "writeSeconds": writes_seconds,
        "achievedRate": ok_writes as f64 / writes_seconds,
        "writeLatency": {
            "p50_ms": percentile(&write_latency, 0.5).map(|v| v as f64 / 1e3),
            "p99_ms": percentile(&write_latency, 0.99).map(|v| v as f64 / 1e3),
            "max_ms": percentile(&write_latency, 1.0).map(|v| v as f64 / 1e3),
        },
        "deliverySeconds": delivery_seconds,
        "delivered": delivered_events,
        "expected": c.watchers * ok_writes,
        "eventsBeforeChanges": delivered_before,
        "completeWatchers": complete,
        "missing": missing,
        "outOfOrder": out_of_order,
        "duplicates": duplicates,
        "unexpected": unexpected,
        "foreign": foreign,
        "bookmarks": bookmarks,
        "otherEvents": other,
        "errorEvents": errors,
        "watchesEnded": ended,
        "bytesReceived": bytes,
        "latencyFromAnswer": summary_us(from_answer),
        "latencyFromSend": summary_us(from_send),
        "cpuSeconds": cpu_seconds,
        "rssIdleKb": rss_idle,
        "rssConnectedKb": rss_connected,
        "rssAfterKb": rss_after,
        "hwmAfterKb": hwm_after,
        "apiserverRssIdleKb": apiserver_rss_idle,
        "apiserverRssConnectedKb": apiserver_rss_connected,
        "apiserverRssAfterKb": apiserver_rss_after,
        "apiserverPodWatches": {
            "baseline": c.baseline_watches,
            "atStart": watches_at_start,
            "connected": watches_connected,
        },
        "kacheWatchers": kache_watchers,
        "released": released,
        "loadavgStart": loadavg_start,
        "loadavgEnd": loadavg(),
    }))
}

// ---------------------------------------------------------------- sync

/// An item's identity in a synced set: a hash of `namespace/name` and its resourceVersion.
fn item_key(namespace: &[u8], name: &[u8], resource_version: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in namespace.iter().chain(b"/").chain(name).chain(b"@") {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    for b in resource_version.to_le_bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

const META: &[u8] = b"\"metadata\":{\"name\":\"";
const NAMESPACE: &[u8] = b",\"namespace\":\"";
const RESOURCE_VERSION: &[u8] = b"\"resourceVersion\":\"";

/// An object's name, namespace and resourceVersion, from its metadata at
/// `at` (where [`META`] starts) in a JSON body: the API server writes
/// `ObjectMeta` in field order (name, generateName, namespace, selfLink,
/// uid, resourceVersion, …). `Err(())` if the bytes end first; `Ok(None)`
/// if the metadata is not shaped so.
fn meta_at(bytes: &[u8], at: usize) -> Result<Option<(u64, usize)>, ()> {
    let Some((name, next)) = string_at(bytes, at + META.len()) else {
        return Err(());
    };
    let rest = bytes.get(next..).ok_or(())?;
    if rest.len() < NAMESPACE.len() {
        return Err(());
    }
    let namespace_at = if rest.starts_with(NAMESPACE) {
        next + NAMESPACE.len()
    } else {
        // Cluster-scoped or generateName first: look a little further.
        match find(&rest[..rest.len().min(512)], NAMESPACE) {
            Some(i) => next + i + NAMESPACE.len(),
            None if rest.len() < 512 => return Err(()),
            None => return Ok(None),
        }
    };
    let Some((namespace, next)) = string_at(bytes, namespace_at) else {
        return Err(());
    };
    let rest = &bytes[next..];
    let Some(rv_at) = find(&rest[..rest.len().min(1024)], RESOURCE_VERSION) else {
        return if rest.len() < 1024 { Err(()) } else { Ok(None) };
    };
    let Some((rv, end)) = string_at(bytes, next + rv_at + RESOURCE_VERSION.len()) else {
        return Err(());
    };
    Ok(parse_u64(rv).map(|rv| (item_key(namespace, name, rv), end)))
}

/// Reads a JSON LIST's items as the body streams in, keeping only their keys.
#[derive(Default)]
struct ListScanner {
    pending: Vec<u8>,
    version: Option<u64>,
    keys: Vec<u64>,
    malformed: usize,
}

impl ListScanner {
    fn feed(&mut self, data: &[u8]) {
        self.pending.extend_from_slice(data);
        let mut pos = 0;
        if self.version.is_none() {
            // The list's own metadata comes first: its resourceVersion is the first one.
            match find(&self.pending, RESOURCE_VERSION)
                .and_then(|at| string_at(&self.pending, at + RESOURCE_VERSION.len()))
            {
                Some((rv, end)) => {
                    self.version = Some(parse_u64(rv).unwrap_or(0));
                    pos = end;
                }
                None => return,
            }
        }
        loop {
            match find(&self.pending[pos..], META) {
                Some(i) => match meta_at(&self.pending, pos + i) {
                    Ok(Some((key, end))) => {
                        self.keys.push(key);
                        pos = end;
                    }
                    Ok(None) => {
                        self.malformed += 1;
                        pos += i + META.len();
                    }
                    Err(()) => {
                        pos += i;
                        break;
                    }
                },
                None => {
                    pos = pos.max(self.pending.len().saturating_sub(META.len()));
                    break;
                }
            }
        }
        self.pending.drain(..pos);
    }
}

/// What one syncing client did.
#[derive(Default)]
struct SyncRecord {
    keys: Vec<u64>,
    bytes: u64,
    synced_after: Option<Duration>,
    /// The LIST (classic) took this long.
    list_after: Option<Duration>,
    error: Option<String>,
    malformed: usize,
}

async fn read_some(body: &mut Incoming, deadline: tokio::time::Instant) -> Result<Option<Bytes>> {
    loop {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => bail!("timed out"),
            Ok(None) => return Ok(None),
            Ok(Some(frame)) => {
                if let Ok(data) = frame?.into_data() {
                    return Ok(Some(data));
                }
            }
        }
    }
}

/// Opens `path` on `client`: its body, if 200.
async fn open(
    client: &Http,
    request: Request<Full<Bytes>>,
    deadline: tokio::time::Instant,
) -> Result<Incoming> {
    let response = tokio::time::timeout_at(deadline, client.request(request))
        .await
        .map_err(|_| anyhow::anyhow!("no answer in time"))??;
    let status = response.status();
    if status != StatusCode::OK {
        let body = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        bail!(
            "{status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(300)])
        );
    }
    Ok(response.into_body())
}

/// What every syncing client shares.
struct SyncRun {
    target: Target,
    mode: Mode,
    path: String,
    /// Releases the clients together.
    barrier: Barrier,
    /// Clients done (synced or failed).
    synced: AtomicUsize,
    timeout: Duration,
}

/// One client's sync; once synced it holds its watch open until `stop`.
async fn sync_one(client: Http, run: Arc<SyncRun>, mut stop: watch::Receiver<bool>) -> SyncRecord {
    let SyncRun {
        target, mode, path, ..
    } = &*run;
    let mut record = SyncRecord::default();
    run.barrier.wait().await;
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + run.timeout;
    let outcome: Result<Incoming> = async {
        match mode {
            Mode::Classic => {
                let request = target.request_as(
                    Method::GET,
                    &format!("{path}?resourceVersion=0"),
                    Some("application/json"),
                    None,
                    AGENT,
                )?;
                let mut body = open(&client, request, deadline).await?;
                let mut scanner = ListScanner::default();
                while let Some(data) = read_some(&mut body, deadline).await? {
                    record.bytes += data.len() as u64;
                    scanner.feed(&data);
                }
                record.list_after = Some(start.elapsed());
                let version = scanner.version.context("no resourceVersion in the list")?;
                (record.keys, record.malformed) = (scanner.keys, scanner.malformed);
                let request = target.request_as(
                    Method::GET,
                    &format!("{path}?watch=true&resourceVersion={version}&allowWatchBookmarks=true"),
                    Some("application/json"),
                    None,
                    AGENT,
                )?;
                let watch = open(&client, request, deadline).await?;
                record.synced_after = Some(start.elapsed());
                Ok(watch)
            }
            Mode::Stream => {
                let request = target.request_as(
                    Method::GET,
                    &format!(
                        "{path}?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan\
                         &allowWatchBookmarks=true&resourceVersion="
                    ),
                    Some("application/json"),
                    None,
                    AGENT,
                )?;
                let mut body = open(&client, request, deadline).await?;
                let mut framer = Framer::new(Encoding::Json);
                let end_marker = format!("\"{INITIAL_EVENTS_END}\":\"true\"");
                let (mut keys, mut malformed, mut done, mut failed) = (Vec::new(), 0, false, None);
                while !done {
                    let Some(data) = read_some(&mut body, deadline).await? else {
                        bail!("the watch ended before its initial events did");
                    };
                    record.bytes += data.len() as u64;
                    framer.feed(&data, |line| {
                        if done || failed.is_some() {
                            return;
                        }
                        match event_type(line) {
                            b"BOOKMARK" => {
                                if find(line, end_marker.as_bytes()).is_some() {
                                    done = true;
                                }
                            }
                            b"ADDED" => match find(line, META).map(|at| meta_at(line, at)) {
                                Some(Ok(Some((key, _)))) => keys.push(key),
                                _ => malformed += 1,
                            },
                            _ => failed = Some(String::from_utf8_lossy(line).into_owned()),
                        }
                    });
                    if let Some(failed) = failed.take() {
                        bail!(
                            "{} among the initial events",
                            failed.chars().take(300).collect::<String>()
                        );
                    }
                }
                record.synced_after = Some(start.elapsed());
                (record.keys, record.malformed) = (keys, malformed);
                Ok(body)
            }
        }
    }
    .await;
    match outcome {
        Ok(mut watch) => {
            run.synced.fetch_add(1, Ordering::Relaxed);
            // Held open (and read) until every client is done.
            loop {
                tokio::select! {
                    _ = stop.wait_for(|stop| *stop) => break,
                    frame = watch.frame() => match frame {
                        Some(Ok(_)) => {}
                        _ => break,
                    },
                }
            }
        }
        Err(e) => {
            record.error = Some(format!("{e:#}"));
            run.synced.fetch_add(1, Ordering::Relaxed);
        }
    }
    record
}

async fn sync(c: Sync) -> Result<Value> {
    let api = c.api.target();
    let control = Target::client_on(&api.connector()?);
    let admin = Target {
        url: c.kache_admin.clone(),
        ca: None,
        token: None,
        no_auth: true,
    };
    let via_connector = c.target.connector()?;
    let via_control = Target::client_on(&via_connector);

    // The reference: a consistent LIST straight from the API server, fully parsed.
    let body = get_ok(&control, &api, &c.path, Some("application/json")).await?;
    let list: Value = serde_json::from_slice(&body)?;
    let mut expected: Vec<u64> = list["items"]
        .as_array()
        .context("not a list")?
        .iter()
        .map(|i| {
            let meta = &i["metadata"];
            item_key(
                meta["namespace"].as_str().unwrap_or("").as_bytes(),
                meta["name"].as_str().unwrap_or("").as_bytes(),
                meta["resourceVersion"]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
            )
        })
        .collect();
    expected.sort_unstable();
    // The clients' scanner must read the same body the same way.
    let mut check = ListScanner::default();
    for chunk in body.chunks(16 * 1024) {
        check.feed(chunk);
    }
    check.keys.sort_unstable();
    let scanner_agrees = check.keys == expected && check.malformed == 0;
    if !scanner_agrees {
        bail!(
            "the list scanner reads {} items ({} malformed) where serde reads {}",
            check.keys.len(),
            check.malformed,
            expected.len()
        );
    }
    drop((body, list, check));

    eprintln!("sync: waiting for kache's pod store ({} pods)", expected.len());
    kache_store_synced(
        &via_control,
        &admin,
        &c.target,
        Encoding::Json,
        expected.len() as u64,
    )
    .await?;
    // The same set through kache, once, before the clients (not timed).
    let body = get_ok(
        &via_control,
        &c.target,
        &format!("{}?resourceVersion=0", c.path),
        Some("application/json"),
    )
    .await?;
    let mut prefill = ListScanner::default();
    prefill.feed(&body);
    prefill.keys.sort_unstable();
    let prefill_matches = prefill.keys == expected;
    drop((body, prefill));
    tokio::time::sleep(Duration::from_secs(2)).await;

    let loadavg_start = loadavg();
    let hwm_reset = reset_hwm(c.pid);
    let rss_before = status_kb(c.pid, "VmRSS");
    let hwm_before = status_kb(c.pid, "VmHWM");
    let mark = c.audit_log.as_deref().map(audit_mark).transpose()?;

    // The sampler: kache's RSS every sample_ms until the clients are done.
    let (done_tx, mut done_rx) = watch::channel(false);
    let (pid, every) = (c.pid, Duration::from_millis(c.sample_ms.max(1)));
    let sampler = tokio::spawn(async move {
        let start = Instant::now();
        let mut samples = Vec::new();
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = done_rx.wait_for(|d| *d) => break,
            }
            if let Some(kb) = status_kb(pid, "VmRSS") {
                samples.push((start.elapsed().as_millis() as u64, kb));
            }
        }
        samples
    });

    let cpu = CpuWatch::start(&c.cpu)?;
    let run = Arc::new(SyncRun {
        target: c.target.clone(),
        mode: c.mode,
        path: c.path.clone(),
        barrier: Barrier::new(c.syncers),
        synced: AtomicUsize::new(0),
        timeout: Duration::from_secs(c.timeout),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    eprintln!(
        "sync: {} clients, {}",
        c.syncers,
        if c.mode == Mode::Classic {
            "LIST+WATCH"
        } else {
            "streaming list"
        }
    );
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..c.syncers {
        tasks.push(tokio::spawn(sync_one(
            Target::client_on(&via_connector),
            run.clone(),
            stop_rx.clone(),
        )));
    }
    until(
        "every client synced",
        Duration::from_millis(20),
        Duration::from_secs(c.timeout + 30),
        || async { Ok(run.synced.load(Ordering::Relaxed) >= c.syncers) },
    )
    .await?;
    let wall = start.elapsed().as_secs_f64();
    let cpu_seconds = cpu.since();
    let _ = done_tx.send(true);
    let samples = sampler.await?;
    let rss_synced = status_kb(c.pid, "VmRSS");
    let hwm_synced = status_kb(c.pid, "VmHWM");
    let _ = stop_tx.send(true);
    let mut records = Vec::new();
    for task in tasks {
        records.push(task.await?);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_released = status_kb(c.pid, "VmRSS");

    let (mut synced_ms, mut list_ms, mut bytes) = (Vec::new(), Vec::new(), Vec::new());
    let (mut matching, mut errors, mut missing, mut extra, mut malformed) =
        (0usize, BTreeMap::<String, usize>::new(), 0usize, 0usize, 0usize);
    for mut record in records {
        if let Some(e) = record.error {
            *errors.entry(e).or_default() += 1;
            continue;
        }
        record.keys.sort_unstable();
        if record.keys == expected {
            matching += 1;
        } else {
            let (m, x) = difference(&expected, &record.keys);
            missing += m;
            extra += x;
        }
        malformed += record.malformed;
        synced_ms.extend(record.synced_after.map(|d| d.as_micros() as i64));
        list_ms.extend(record.list_after.map(|d| d.as_micros() as i64));
        bytes.push(record.bytes);
    }
    bytes.sort_unstable();
    let upstream = match (&c.audit_log, mark) {
        (Some(log), Some(mark)) => audit_since(&control, &api, log, mark).await?,
        _ => Value::Null,
    };
    let peak = samples.iter().map(|(_, kb)| *kb).max();
    Ok(json!({
        "mode": if c.mode == Mode::Classic { "classic" } else { "stream" },
        "syncers": c.syncers,
        "path": c.path,
        "items": expected.len(),
        "prefillMatches": prefill_matches,
        "matching": matching,
        "errors": errors,
        "missing": missing,
        "extra": extra,
        "malformed": malformed,
        "wallSeconds": wall,
        "timeToSynced": summary_us(synced_ms),
        "listTime": summary_us(list_ms),
        "bytesPerClient": {"min": bytes.first(), "max": bytes.last(), "total": bytes.iter().sum::<u64>()},
        "cpuSeconds": cpu_seconds,
        "hwmReset": hwm_reset,
        "rssBeforeKb": rss_before,
        "hwmBeforeKb": hwm_before,
        "rssPeakSampledKb": peak,
        "rssSyncedKb": rss_synced,
        "hwmSyncedKb": hwm_synced,
        "rssReleasedKb": rss_released,
        "samples": samples.len(),
        "rssTimelineKb": samples.iter().step_by((samples.len() / 200).max(1)).map(|(ms, kb)| json!([ms, kb])).collect::<Vec<_>>(),
        "upstream": upstream,
        "loadavgStart": loadavg_start,
        "loadavgEnd": loadavg(),
    }))
}

/// How many of `expected` are not in `got`, and of `got` not in `expected` (both sorted).
fn difference(expected: &[u64], got: &[u64]) -> (usize, usize) {
    let (mut i, mut j, mut missing, mut extra) = (0, 0, 0, 0);
    while i < expected.len() || j < got.len() {
        match (expected.get(i), got.get(j)) {
            (Some(a), Some(b)) if a == b => (i, j) = (i + 1, j + 1),
            (Some(a), Some(b)) if a < b => (i, missing) = (i + 1, missing + 1),
            (Some(_), None) => (i, missing) = (i + 1, missing + 1),
            _ => (j, extra) = (j + 1, extra + 1),
        }
    }
    (missing, extra)
}

// ---------------------------------------------------------------- audit log

/// A place in the audit log: its file (inode) and a byte offset in it.
#[derive(Clone, Copy)]
struct AuditPos {
    ino: u64,
    offset: u64,
}

fn audit_mark(log: &Path) -> Result<AuditPos> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(log).with_context(|| format!("audit log {}", log.display()))?;
    Ok(AuditPos {
        ino: meta.ino(),
        offset: meta.len(),
    })
}

/// The finished requests the API server logged after `mark`, up to a
/// sentinel request of ours (a GET of a configmap that does not exist,
/// whose line comes after every earlier one), by verb and resource and
/// User-Agent; ours and the cluster scripts' readiness polls left out.
async fn audit_since(client: &Http, api: &Target, log: &Path, mark: AuditPos) -> Result<Value> {
    use std::os::unix::fs::MetadataExt;
    let name = format!(
        "kache-watch-bench-sentinel-{}-{}",
        std::process::id(),
        now_epoch_us()
    );
    let path = format!("/api/v1/namespaces/default/configmaps/{name}");
    let (status, _) = fetch(
        client,
        api.request_as(Method::GET, &path, None, None, CONTROL_AGENT)?,
        Duration::from_secs(30),
    )
    .await?;
    if status != StatusCode::NOT_FOUND {
        bail!("sentinel GET {path}: {status} (expected 404)");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if std::fs::metadata(log)?.ino() != mark.ino {
            return Ok(json!({"error": "the audit log was rotated"}));
        }
        let mut file = std::fs::File::open(log)?;
        file.seek(SeekFrom::Start(mark.offset))?;
        let mut by_kind = BTreeMap::<String, usize>::new();
        let mut found = false;
        for line in std::io::BufReader::new(file).lines() {
            let line = line?;
            if !line.contains("\"stage\":\"ResponseComplete\"") {
                continue;
            }
            if line.contains(&name) {
                found = true;
                break;
            }
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            let agent = v["userAgent"].as_str().unwrap_or("");
            let uri = v["requestURI"].as_str().unwrap_or("");
            if agent == CONTROL_AGENT || (agent.starts_with("curl/") && uri == "/readyz") {
                continue;
            }
            let kind = format!(
                "{} {}{}",
                v["verb"].as_str().unwrap_or(""),
                without_versions(uri),
                if agent.is_empty() {
                    String::new()
                } else {
                    format!(" ({agent})")
                }
            );
            *by_kind.entry(kind).or_default() += 1;
        }
        if found {
            return Ok(json!({"total": by_kind.values().sum::<usize>(), "byKind": by_kind}));
        }
        if Instant::now() > deadline {
            bail!("the sentinel {path} did not reach the audit log within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A request URI with each `resourceVersion` value (but an empty one) written `N`.
fn without_versions(uri: &str) -> String {
    let Some((path, query)) = uri.split_once('?') else {
        return uri.to_string();
    };
    let query: Vec<String> = query
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some(("resourceVersion", v)) if !v.is_empty() => "resourceVersion=N".to_string(),
            _ => kv.to_string(),
        })
        .collect();
    format!("{path}?{}", query.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_newline_agrees_with_a_plain_search_at_every_offset() {
        for len in 0..100 {
            for at in 0..=len {
                let mut bytes = vec![b'x'; len];
                if at < len {
                    bytes[at] = b'\n';
                }
                let want = bytes.iter().position(|b| *b == b'\n');
                assert_eq!(find_newline(&bytes), want, "len {len}, at {at}");
            }
        }
    }

    #[test]
    fn find_agrees_with_a_plain_search() {
        let haystack = br#"{"a":{"metadata":{"name":"x"},"metadata":{"name":"y","resourceVersion":"5"}}"#;
        for needle in [META, RESOURCE_VERSION, b"\"name\":\"y", b"zz", b"{", b"5\"}}"] {
            for from in 0..haystack.len() {
                let want = haystack[from..].windows(needle.len()).position(|w| w == needle);
                assert_eq!(
                    find(&haystack[from..], needle),
                    want,
                    "{:?} from {from}",
                    String::from_utf8_lossy(needle)
                );
            }
        }
    }

    #[test]
    fn json_events_give_their_change_id() {
        let marker = format!("\"{CHANGE_ANNOTATION}\":\"");
        let line = format!(
            r#"{{"type":"MODIFIED","object":{{"kind":"Pod","metadata":{{"name":"a","annotations":{{"{CHANGE_ANNOTATION}":"10000042","{SENT_ANNOTATION}":"1"}}}}}}}}"#
        );
        assert_eq!(
            json_event(line.as_bytes(), marker.as_bytes()),
            Seen::Change(10_000_042)
        );
        let plain = r#"{"type":"MODIFIED","object":{"kind":"Pod","metadata":{"name":"a"}}}"#;
        assert_eq!(json_event(plain.as_bytes(), marker.as_bytes()), Seen::Other);
        let bookmark = r#"{"type":"BOOKMARK","object":{"kind":"Pod","metadata":{"resourceVersion":"5"}}}"#;
        assert_eq!(json_event(bookmark.as_bytes(), marker.as_bytes()), Seen::Bookmark);
    }

    fn message(fields: &[(u64, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (number, value) in fields {
            out.push(((number << 3) | 2) as u8);
            let mut len = value.len();
            while len >= 0x80 {
                out.push((len as u8) | 0x80);
                len >>= 7;
            }
            out.push(len as u8);
            out.extend_from_slice(value);
        }
        out
    }

    #[test]
    fn protobuf_events_give_their_change_id() {
        let entry = message(&[(1, CHANGE_ANNOTATION.as_bytes()), (2, b"20000007")]);
        let other = message(&[(1, b"prometheus.io/port"), (2, b"9090")]);
        let meta = message(&[(1, b"pod-a"), (6, b"123"), (12, &other), (12, &entry)]);
        let pod = message(&[(1, &meta)]);
        let mut raw = b"k8s\0".to_vec();
        raw.extend(message(&[(1, b""), (2, &pod)]));
        let event = message(&[(1, b"MODIFIED"), (2, &message(&[(1, &raw)]))]);
        assert_eq!(protobuf_event(&event), Seen::Change(20_000_007));
        let bookmark = message(&[(1, b"BOOKMARK")]);
        assert_eq!(protobuf_event(&bookmark), Seen::Bookmark);
    }

    #[test]
    fn the_framer_joins_events_split_across_chunks() {
        for encoding in [Encoding::Json, Encoding::Protobuf] {
            let events: Vec<Vec<u8>> = (0..5)
                .map(|i| format!("{{\"event\":{i}}}").into_bytes())
                .collect();
            let mut stream = Vec::new();
            for e in &events {
                match encoding {
                    Encoding::Json => {
                        stream.extend_from_slice(e);
                        stream.push(b'\n');
                    }
                    Encoding::Protobuf => {
                        stream.extend_from_slice(&(e.len() as u32).to_be_bytes());
                        stream.extend_from_slice(e);
                    }
                }
            }
            for size in 1..stream.len() {
                let mut framer = Framer::new(encoding);
                let mut got = Vec::new();
                for chunk in stream.chunks(size) {
                    framer.feed(chunk, |event| {
                        got.push(event.strip_suffix(b"\n").unwrap_or(event).to_vec());
                    });
                }
                assert_eq!(got, events, "chunks of {size}");
            }
        }
    }

    #[test]
    fn the_list_scanner_reads_items_across_chunk_boundaries() {
        let list = r#"{"kind":"PodList","apiVersion":"v1","metadata":{"resourceVersion":"77"},"items":[
            {"metadata":{"name":"a","namespace":"ns1","uid":"u","resourceVersion":"5","labels":{"x":"y"}},"spec":{}},
            {"metadata":{"name":"b","generateName":"b-","namespace":"ns2","uid":"u","resourceVersion":"6"},"spec":{}}]}"#;
        let want = vec![item_key(b"ns1", b"a", 5), item_key(b"ns2", b"b", 6)];
        for size in 1..list.len() {
            let mut scanner = ListScanner::default();
            for chunk in list.as_bytes().chunks(size) {
                scanner.feed(chunk);
            }
            assert_eq!(scanner.version, Some(77), "chunks of {size}");
            assert_eq!(scanner.keys, want, "chunks of {size}");
            assert_eq!(scanner.malformed, 0);
        }
    }

    #[test]
    fn audit_kinds_leave_out_versions() {
        assert_eq!(without_versions("/api/v1/pods?limit=1"), "/api/v1/pods?limit=1");
        assert_eq!(
            without_versions("/api/v1/pods?resourceVersion=123&watch=true&resourceVersion="),
            "/api/v1/pods?resourceVersion=N&watch=true&resourceVersion="
        );
    }

    #[test]
    fn difference_counts_both_sides() {
        assert_eq!(difference(&[1, 2, 3], &[1, 2, 3]), (0, 0));
        assert_eq!(difference(&[1, 2, 3], &[2, 4]), (2, 1));
        assert_eq!(difference(&[], &[1]), (0, 1));
    }
}
