//! `kache-e2e`: the load generator behind `benches/e2e/run.sh`.
//!
//! Subcommands (each prints one JSON object on stdout, progress on stderr):
//!
//! - `create-pods`: creates namespaces and ~4 KB pods, concurrently, as admin.
//! - `list-size`: one LIST, then the body size and the sum of the items' JSON sizes
//!   (and, with `--save`, the body itself, e.g. for nginx to serve the same bytes).
//! - `load`: closed-loop load at a fixed concurrency for a bounded time and count:
//!   requests/s, MB/s, p50/p99 latency (time to the last byte of the body).
//! - `burst`: N identical requests released at once from one program, with the
//!   upstream request count from the API server's audit log.
//! - `procs`: runs a command N times (all at once, or one after the other),
//!   e.g. kubectl, with per-run wall time and the audit-log count.
//! - `authz-setup`, `authz-load`: the authorization-overhead benchmark
//!   (`benches/e2e/authz.sh`, see `authz.rs`): users with their own tokens in
//!   closed loops, and the upstream reviews they cost.
//! - `restarts-setup`, `first-cached-list`, `audit-mark`, `audit-since`,
//!   `open-watches`, `etcd-compact`, `informers`, `chaos`: the restarts and
//!   outages benchmark (`benches/e2e/restarts.sh`, see `restarts.rs`): cold
//!   and warm starts, informer-style clients across API server restarts, and
//!   a bounded chaos run.
//!
//! Only loopback URLs are accepted. Bearer tokens come from `BENCH_TOKEN`, never
//! the command line.

use std::collections::BTreeMap;
use std::io::{BufRead, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use kache_benches::{cpu_seconds, fields, Http, Target};
use serde_json::{json, Value};

mod authz;
mod restarts;

#[derive(Parser)]
#[command(name = "kache-e2e", about = "load generator for kache's end-to-end benchmark")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    CreatePods(CreatePods),
    ListSize(ListSize),
    Load(Load),
    Burst(Burst),
    Procs(Procs),
    AuthzSetup(authz::AuthzSetup),
    AuthzLoad(authz::AuthzLoad),
    RestartsSetup(restarts::RestartsSetup),
    FirstCachedList(restarts::FirstCachedList),
    AuditMark(restarts::AuditMark),
    AuditSince(restarts::AuditSince),
    OpenWatches(restarts::OpenWatches),
    EtcdCompact(restarts::EtcdCompact),
    Informers(restarts::Informers),
    Chaos(restarts::Chaos),
}

#[derive(Args)]
struct CreatePods {
    #[command(flatten)]
    target: Target,
    #[arg(long, default_value_t = 10_000)]
    count: usize,
    #[arg(long, default_value_t = 10)]
    namespaces: usize,
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Number of padding environment variables per container (tunes the size).
    #[arg(long, default_value_t = 1)]
    env_vars: usize,
}

#[derive(Args)]
struct ListSize {
    #[command(flatten)]
    target: Target,
    #[arg(long, default_value = "/api/v1/pods?resourceVersion=0")]
    path: String,
    #[arg(long, default_value = "application/json")]
    accept: String,
    /// Write the body to this file.
    #[arg(long)]
    save: Option<PathBuf>,
}

#[derive(Args)]
struct Load {
    #[command(flatten)]
    target: Target,
    #[arg(long)]
    path: String,
    #[arg(long)]
    accept: Option<String>,
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Stop starting requests after this many seconds.
    #[arg(long, default_value_t = 20.0)]
    duration: f64,
    /// Stop starting requests after this many (across all workers).
    #[arg(long, default_value_t = 2_000)]
    max_requests: usize,
    /// Per-request timeout, seconds.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// The API server's audit log, to count upstream requests during the timed loop.
    #[arg(long)]
    audit_log: Option<PathBuf>,
    /// kache's `/metrics` URL: how kache answered (cache, coalesced, forwarded) during the loop.
    #[arg(long)]
    kache_metrics: Option<String>,
    /// `NAME=PID`: report the CPU time the process used during the loop
    /// (repeatable; the processes given one NAME are summed, e.g. nginx's workers).
    #[arg(long = "cpu", value_name = "NAME=PID")]
    cpu: Vec<String>,
}

#[derive(Args)]
struct Burst {
    #[command(flatten)]
    target: Target,
    #[arg(long)]
    path: String,
    #[arg(long)]
    accept: Option<String>,
    #[arg(long, default_value_t = 100)]
    n: usize,
    /// The API server's audit log, to count upstream requests.
    #[arg(long)]
    audit_log: Option<PathBuf>,
    #[arg(long, default_value_t = 300)]
    timeout: u64,
}

#[derive(Args)]
struct Procs {
    /// How many runs.
    #[arg(long, default_value_t = 1)]
    n: usize,
    /// Start every run at once (else one after the other).
    #[arg(long)]
    parallel: bool,
    /// Append `--cache-dir <fresh empty dir>` to each run's arguments.
    #[arg(long)]
    fresh_cache_dir: bool,
    #[arg(long)]
    audit_log: Option<PathBuf>,
    /// Per-run timeout, seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let out = runtime.block_on(async {
        match cli.command {
            Command::CreatePods(c) => create_pods(c).await,
            Command::ListSize(c) => list_size(c).await,
            Command::Load(c) => load(c).await,
            Command::Burst(c) => burst(c).await,
            Command::Procs(c) => procs(c).await,
            Command::AuthzSetup(c) => authz::authz_setup(c).await,
            Command::AuthzLoad(c) => authz::authz_load(c).await,
            Command::RestartsSetup(c) => restarts::restarts_setup(c).await,
            Command::FirstCachedList(c) => restarts::first_cached_list(c).await,
            Command::AuditMark(c) => restarts::audit_mark_now(&c),
            Command::AuditSince(c) => restarts::audit_since(c).await,
            Command::OpenWatches(c) => restarts::open_watches(c).await,
            Command::EtcdCompact(c) => restarts::etcd_compact(c).await,
            Command::Informers(c) => restarts::informers(c).await,
            Command::Chaos(c) => restarts::chaos(c).await,
        }
    })?;
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}

// ---------------------------------------------------------------- HTTP

/// What one exchange returned.
struct Exchange {
    status: StatusCode,
    content_type: String,
    bytes: usize,
    body: Option<Vec<u8>>,
    elapsed: Duration,
}

/// Sends a request and reads the whole body (kept only when `keep`).
async fn exchange(client: &Http, request: Request<Full<Bytes>>, keep: bool) -> Result<Exchange> {
    let start = Instant::now();
    let response = client.request(request).await?;
    let status = response.status();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let mut body = response.into_body();
    let mut bytes = 0;
    let mut kept = keep.then(Vec::new);
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            bytes += data.len();
            if let Some(kept) = &mut kept {
                kept.extend_from_slice(&data);
            }
        }
    }
    Ok(Exchange {
        status,
        content_type,
        bytes,
        body: kept,
        elapsed: start.elapsed(),
    })
}

async fn exchange_timeout(
    client: &Http,
    request: Request<Full<Bytes>>,
    keep: bool,
    timeout: u64,
) -> Result<Exchange> {
    tokio::time::timeout(Duration::from_secs(timeout), exchange(client, request, keep))
        .await
        .map_err(|_| anyhow::anyhow!("timed out after {timeout} s"))?
}

// ---------------------------------------------------------------- statistics

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    // Nearest rank.
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1e3
}

fn latency_summary(mut latencies: Vec<Duration>) -> Value {
    latencies.sort();
    json!({
        "n": latencies.len(),
        "p50_ms": percentile(&latencies, 0.50),
        "p99_ms": percentile(&latencies, 0.99),
        "min_ms": percentile(&latencies, 0.0),
        "max_ms": percentile(&latencies, 1.0),
    })
}

// ---------------------------------------------------------------- body checks

/// What a list body holds: kind and number of items, JSON or protobuf.
fn describe_list(body: &[u8]) -> Value {
    if let Some(rest) = body.strip_prefix(b"k8s\0") {
        return match protobuf_list(rest) {
            Some((kind, items, item_bytes, hash)) => json!({
                "encoding": "protobuf",
                "kind": kind,
                "items": items,
                "itemBytes": item_bytes,
                "itemsHash": format!("{hash:016x}"),
            }),
            None => json!({"encoding": "protobuf", "error": "not a runtime.Unknown list"}),
        };
    }
    #[derive(serde::Deserialize)]
    struct List<'a> {
        kind: Option<String>,
        #[serde(borrow, default)]
        items: Vec<&'a serde_json::value::RawValue>,
    }
    match serde_json::from_slice::<List<'_>>(body) {
        Ok(list) => json!({
            "encoding": "json",
            "kind": list.kind,
            "items": list.items.len(),
            "itemBytes": list.items.iter().map(|i| i.get().len()).sum::<usize>(),
            "itemsHash": format!(
                "{:016x}",
                list.items.iter().fold(0u64, |h, i| h.wrapping_add(fnv(FNV_OFFSET, i.get().as_bytes())))
            ),
        }),
        Err(e) => json!({"encoding": "unknown", "error": e.to_string()}),
    }
}

/// A fingerprint of a whole body (FNV-1a): equal for byte-identical answers.
fn body_hash(body: &[u8]) -> String {
    format!("{:016x}", fnv(FNV_OFFSET, body))
}

/// `runtime.Unknown{typeMeta=1{apiVersion=1, kind=2}, raw=2}`; raw is the list: items = field 2.
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a over the bytes, continuing from `hash`. The items' fingerprint is the
/// wrapping sum of each item's: it tells whether two answers hold the same
/// byte-identical items, in any order (v1.20's watch cache lists in hash-map
/// order; kache in namespace/name order).
fn fnv(hash: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(hash, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

fn protobuf_list(unknown: &[u8]) -> Option<(String, usize, usize, u64)> {
    let (mut kind, mut raw) = (String::new(), None);
    fields(unknown, |field, value| match field {
        1 => {
            let _ = fields(value, |f, v| {
                if f == 2 {
                    kind = String::from_utf8_lossy(v).into_owned();
                }
            });
        }
        2 => raw = Some(value),
        _ => {}
    })?;
    let (mut items, mut item_bytes, mut hash) = (0, 0, 0u64);
    fields(raw?, |field, value| {
        if field == 2 {
            items += 1;
            item_bytes += value.len();
            hash = hash.wrapping_add(fnv(FNV_OFFSET, value));
        }
    })?;
    Some((kind, items, item_bytes, hash))
}

// ---------------------------------------------------------------- create-pods

/// A realistic Deployment-made pod, padded with labels, annotations and env to about 4 KB as stored.
fn pod(namespace: &str, index: usize, env_vars: usize) -> Value {
    let app = format!("svc-{:03}", index % 200);
    let hash = format!(
        "{:010x}",
        (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 24
    );
    let env: Vec<Value> = (0..env_vars)
        .map(|i| json!({"name": format!("APP_SETTING_{i:02}"), "value": format!("value-{i:02}-{index:05}-abcdefghij")}))
        .chain([
            json!({"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}),
            json!({"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}),
        ])
        .collect();
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
                    "env": env,
                    "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "1", "memory": "512Mi"}},
                    "volumeMounts": [{"name": "config", "mountPath": "/etc/app", "readOnly": true}],
                    "readinessProbe": {"httpGet": {"path": "/readyz", "port": 8080}, "periodSeconds": 10},
                },
            ],
            "volumes": [{"name": "config", "configMap": {"name": format!("{app}-config")}}],
        },
    })
}

async fn create_pods(c: CreatePods) -> Result<Value> {
    let client = c.target.client()?;
    let start = Instant::now();
    let namespaces: Vec<String> = (0..c.namespaces).map(|i| format!("bench-{i:02}")).collect();
    for ns in &namespaces {
        let body =
            serde_json::to_vec(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}))?;
        let r = exchange(
            &client,
            c.target
                .request(Method::POST, "/api/v1/namespaces", None, Some(body))?,
            false,
        )
        .await?;
        if !(r.status.is_success() || r.status == StatusCode::CONFLICT) {
            bail!("creating namespace {ns}: {}", r.status);
        }
    }
    let next = Arc::new(AtomicUsize::new(0));
    let (created, existed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut tasks = Vec::new();
    for _ in 0..c.concurrency {
        let (target, namespaces, next, created, existed) = (
            c.target.clone(),
            namespaces.clone(),
            next.clone(),
            created.clone(),
            existed.clone(),
        );
        let client = target.client()?;
        let (count, env_vars) = (c.count, c.env_vars);
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return Ok::<(), anyhow::Error>(());
                }
                let ns = &namespaces[i % namespaces.len()];
                let body = serde_json::to_vec(&pod(ns, i, env_vars))?;
                let path = format!("/api/v1/namespaces/{ns}/pods");
                let mut attempt = 0;
                loop {
                    let r = exchange_timeout(
                        &client,
                        target.request(Method::POST, &path, None, Some(body.clone()))?,
                        false,
                        60,
                    )
                    .await;
                    match r {
                        Ok(r) if r.status.is_success() => {
                            created.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) if r.status == StatusCode::CONFLICT => {
                            existed.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r)
                            if attempt < 5
                                && (r.status == StatusCode::TOO_MANY_REQUESTS
                                    || r.status.is_server_error()) =>
                        {
                            attempt += 1;
                            tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
                            continue;
                        }
                        Ok(r) => bail!("creating pod {i}: {}", r.status),
                        Err(e) if attempt < 5 => {
                            attempt += 1;
                            eprintln!("create-pods: pod {i}: {e:#}; retrying");
                            tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
                            continue;
                        }
                        Err(e) => return Err(e),
                    }
                    break;
                }
                if (i + 1) % 1000 == 0 {
                    eprintln!("create-pods: {} / {count}", i + 1);
                }
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    let seconds = start.elapsed().as_secs_f64();
    let sample = serde_json::to_vec(&pod(&namespaces[0], 0, c.env_vars))?.len();
    Ok(json!({
        "created": created.load(Ordering::Relaxed),
        "existed": existed.load(Ordering::Relaxed),
        "seconds": seconds,
        "createsPerSecond": created.load(Ordering::Relaxed) as f64 / seconds,
        "requestBodyBytes": sample,
    }))
}

// ---------------------------------------------------------------- list-size

async fn list_size(c: ListSize) -> Result<Value> {
    let client = c.target.client()?;
    let r = exchange(
        &client,
        c.target.request(Method::GET, &c.path, Some(&c.accept), None)?,
        true,
    )
    .await?;
    if !r.status.is_success() {
        bail!("GET {}: {}", c.path, r.status);
    }
    let body = r.body.as_deref().unwrap_or_default();
    if let Some(path) = &c.save {
        std::fs::write(path, body).with_context(|| format!("writing {}", path.display()))?;
    }
    let mut out = describe_list(body);
    out["bodyBytes"] = json!(r.bytes);
    out["bodyHash"] = json!(body_hash(body));
    out["contentType"] = json!(r.content_type);
    out["seconds"] = json!(r.elapsed.as_secs_f64());
    Ok(out)
}

// ---------------------------------------------------------------- load

async fn load(c: Load) -> Result<Value> {
    let target = Arc::new(c.target.clone());
    let accept = c.accept.clone();
    // Every worker connects first (untimed); worker 0 also reads one full
    // response to say what the endpoint answers (kind, items, encoding).
    let mut clients = Vec::new();
    for _ in 0..c.concurrency {
        let client = target.client()?;
        let r = exchange_timeout(
            &client,
            target.request(Method::GET, "/version", None, None)?,
            false,
            c.timeout,
        )
        .await?;
        if !r.status.is_success() {
            bail!("warm-up GET /version: {}", r.status);
        }
        clients.push(client);
    }
    let first = exchange_timeout(
        &clients[0],
        target.request(Method::GET, &c.path, accept.as_deref(), None)?,
        true,
        c.timeout,
    )
    .await?;
    let mut sample = describe_list(first.body.as_deref().unwrap_or_default());
    sample["bodyHash"] = json!(body_hash(first.body.as_deref().unwrap_or_default()));
    sample["status"] = json!(first.status.as_u16());
    sample["contentType"] = json!(first.content_type);
    sample["bytes"] = json!(first.bytes);
    drop(first);

    let metrics_before = match &c.kache_metrics {
        Some(url) => Some(kache_outcomes(&clients[0], url).await?),
        None => None,
    };
    let mark = c.audit_log.as_deref().map(audit_mark).transpose()?;
    let (watched, cpu_before) = watched_processes(&c.cpu)?;
    let rss = RssSampler::start(&watched);
    let issued = Arc::new(AtomicUsize::new(0));
    let duration = Duration::from_secs_f64(c.duration);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for client in clients {
        let (target, accept, issued, path) = (target.clone(), accept.clone(), issued.clone(), c.path.clone());
        let (max, timeout) = (c.max_requests, c.timeout);
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let (mut bytes, mut errors) = (0usize, BTreeMap::<String, usize>::new());
            while start.elapsed() < duration && issued.fetch_add(1, Ordering::Relaxed) < max {
                let request = match target.request(Method::GET, &path, accept.as_deref(), None) {
                    Ok(r) => r,
                    Err(e) => {
                        *errors.entry(e.to_string()).or_default() += 1;
                        break;
                    }
                };
                match exchange_timeout(&client, request, false, timeout).await {
                    Ok(r) if r.status.is_success() => {
                        latencies.push(r.elapsed);
                        bytes += r.bytes;
                    }
                    Ok(r) => *errors.entry(r.status.to_string()).or_default() += 1,
                    Err(e) => *errors.entry(format!("{e:#}")).or_default() += 1,
                }
            }
            (latencies, bytes, errors)
        }));
    }
    let (mut latencies, mut bytes, mut errors) = (Vec::new(), 0, BTreeMap::<String, usize>::new());
    for task in tasks {
        let (l, b, e) = task.await?;
        latencies.extend(l);
        bytes += b;
        for (k, v) in e {
            *errors.entry(k).or_default() += v;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let ok = latencies.len();
    let mut cpu = BTreeMap::<String, f64>::new();
    for ((name, pid), before) in watched.iter().zip(cpu_before) {
        *cpu.entry(name.clone()).or_default() += cpu_seconds(pid)? - before;
    }
    let rss = rss.finish().await;
    let upstream = match (&c.audit_log, mark) {
        (Some(log), Some(mark)) => audit_count(log, mark).await?,
        _ => Value::Null,
    };
    let kache_answers = match (&c.kache_metrics, metrics_before) {
        (Some(url), Some(before)) => {
            let client = target.client()?;
            let after = kache_outcomes(&client, url).await?;
            let diff: BTreeMap<String, f64> = after
                .into_iter()
                .map(|(k, v)| {
                    let d = v - before.get(&k).copied().unwrap_or(0.0);
                    (k, d)
                })
                .filter(|(_, d)| *d > 0.0)
                .collect();
            json!(diff)
        }
        _ => Value::Null,
    };
    Ok(json!({
        "upstream": upstream,
        "kacheAnswers": kache_answers,
        "cpuSeconds": cpu,
        "rssKb": rss,
        "path": c.path,
        "accept": c.accept,
        "concurrency": c.concurrency,
        "seconds": seconds,
        "requests": ok,
        "errors": errors,
        "bytes": bytes,
        "rps": ok as f64 / seconds,
        "mbps": bytes as f64 / 1e6 / seconds,
        "latency": latency_summary(latencies),
        "sample": sample,
    }))
}

/// User + system CPU time of a process (`self` or a pid) so far, from `/proc/PID/stat`.
/// A process a cell measures: its name in the report and its PID (`self`).
type Watched = (String, String);

/// The processes whose CPU time a cell measures (the load generator itself,
/// and each `--cpu NAME=PID`), with their CPU seconds so far.
fn watched_processes(specs: &[String]) -> Result<(Vec<Watched>, Vec<f64>)> {
    let mut watched: Vec<Watched> = vec![("loadgen".into(), "self".into())];
    for spec in specs {
        let (name, pid) = spec.split_once('=').context("--cpu NAME=PID")?;
        watched.push((name.to_string(), pid.to_string()));
    }
    let before = watched
        .iter()
        .map(|(_, pid)| cpu_seconds(pid))
        .collect::<Result<_>>()?;
    Ok((watched, before))
}

/// `VmRSS` of a process in kB (0 once it is gone).
fn rss_kb(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Samples the watched processes' RSS every 100 ms during a cell: what they
/// held at the start and at most, per name (the processes of a name summed).
struct RssSampler {
    start: BTreeMap<String, u64>,
    peak: Arc<std::sync::Mutex<BTreeMap<String, u64>>>,
    task: tokio::task::JoinHandle<()>,
}

impl RssSampler {
    fn sample(watched: &[Watched]) -> BTreeMap<String, u64> {
        let mut now = BTreeMap::<String, u64>::new();
        for (name, pid) in watched {
            *now.entry(name.clone()).or_default() += rss_kb(pid);
        }
        now
    }

    fn start(watched: &[Watched]) -> RssSampler {
        let start = Self::sample(watched);
        let peak = Arc::new(std::sync::Mutex::new(start.clone()));
        let (watched, shared) = (watched.to_vec(), peak.clone());
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let now = Self::sample(&watched);
                let mut peak = shared.lock().unwrap_or_else(|e| e.into_inner());
                for (name, kb) in now {
                    let p = peak.entry(name).or_default();
                    *p = (*p).max(kb);
                }
            }
        });
        RssSampler { start, peak, task }
    }

    async fn finish(self) -> Value {
        self.task.abort();
        let _ = self.task.await;
        let peak = self.peak.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let out: serde_json::Map<String, Value> = self
            .start
            .iter()
            .map(|(name, start)| (name.clone(), json!({"start": start, "peak": peak.get(name)})))
            .collect();
        Value::Object(out)
    }
}

/// kache's `http_requests_total` summed by `outcome` (cache, coalesced, forwarded, …).
async fn kache_outcomes(client: &Http, url: &str) -> Result<BTreeMap<String, f64>> {
    let request = Request::get(url).body(Full::new(Bytes::new()))?;
    let r = exchange(client, request, true).await?;
    if !r.status.is_success() {
        bail!("GET {url}: {}", r.status);
    }
    let text = String::from_utf8_lossy(r.body.as_deref().unwrap_or_default()).into_owned();
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("kache_http_requests_total{"))
    {
        let Some((labels, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Some(outcome) = labels
            .split("outcome=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
        else {
            continue;
        };
        *out.entry(outcome.to_string()).or_default() += value.parse::<f64>().unwrap_or(0.0);
    }
    Ok(out)
}

// ---------------------------------------------------------------- audit log

/// A place in the audit log that survives its rotation (the API server's
/// lumberjack renames `audit.log` to `audit-<time>.log` at 100 MB, even with
/// `--audit-log-maxsize=0`): the file, by inode, and a byte offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AuditPos {
    ino: u64,
    offset: u64,
}

/// The audit log's current end: requests are counted from here.
fn audit_mark(log: &Path) -> Result<AuditPos> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(log).with_context(|| format!("audit log {}", log.display()))?;
    Ok(AuditPos {
        ino: meta.ino(),
        offset: meta.len(),
    })
}

/// The audit log's files, oldest first: those it was rotated to
/// (`<stem>-<time>.<ext>`, names that sort by time), then the log itself.
fn audit_files(log: &Path) -> Result<Vec<(PathBuf, u64)>> {
    use std::os::unix::fs::MetadataExt;
    let dir = log.parent().unwrap_or_else(|| Path::new("."));
    let (stem, ext) = (
        log.file_stem().and_then(|s| s.to_str()).unwrap_or_default(),
        log.extension().and_then(|s| s.to_str()).unwrap_or_default(),
    );
    let mut rotated = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&format!("{stem}-")) && name.ends_with(&format!(".{ext}")) {
            rotated.push((entry.path(), entry.metadata()?.ino()));
        }
    }
    rotated.sort();
    let current = std::fs::metadata(log).with_context(|| format!("audit log {}", log.display()))?;
    rotated.push((log.to_path_buf(), current.ino()));
    Ok(rotated)
}

/// Calls `f(line, start, end)` for each complete line of the audit log from
/// `from`, across rotations, until `f` returns `true` or the lines end.
/// Returns where the next read starts (after the last line handed to `f`).
fn audit_scan(
    log: &Path,
    from: AuditPos,
    mut f: impl FnMut(&str, AuditPos, AuditPos) -> bool,
) -> Result<AuditPos> {
    let files = audit_files(log)?;
    let first = files
        .iter()
        .position(|(_, ino)| *ino == from.ino)
        .with_context(|| {
            format!(
                "the audit log file of the mark is gone (rotated away from {})",
                log.display()
            )
        })?;
    let mut pos = from;
    for (i, (path, ino)) in files.iter().enumerate().skip(first) {
        if i > first {
            pos = AuditPos { ino: *ino, offset: 0 };
        }
        let mut file = std::fs::File::open(path).with_context(|| format!("audit log {}", path.display()))?;
        file.seek(SeekFrom::Start(pos.offset))?;
        let mut reader = std::io::BufReader::new(file);
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = reader.read_until(b'\n', &mut line)?;
            if n == 0 || line.last() != Some(&b'\n') {
                break; // the end, or a line still being written: read again later
            }
            let start = pos;
            pos.offset += n as u64;
            if f(&String::from_utf8_lossy(&line), start, pos) {
                return Ok(pos);
            }
        }
    }
    Ok(pos)
}

/// Finished requests (`ResponseComplete`) after `mark`, by category; waits
/// until the count is stable for a second (the line is written after the
/// response), at most 20 s.
async fn audit_count(log: &Path, mark: AuditPos) -> Result<Value> {
    let read = || -> Result<Vec<Value>> {
        let mut lines = Vec::new();
        audit_scan(log, mark, |line, _, _| {
            if line.contains("\"stage\":\"ResponseComplete\"") {
                if let Ok(v) = serde_json::from_str::<Value>(line) {
                    lines.push(v);
                }
            }
            false
        })?;
        Ok(lines)
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = read()?.len();
    let mut stable_since = Instant::now();
    while Instant::now() < deadline && stable_since.elapsed() < Duration::from_secs(1) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = read()?.len();
        if now != last {
            last = now;
            stable_since = Instant::now();
        }
    }
    let lines = read()?;
    let mut by_kind = BTreeMap::<String, usize>::new();
    for line in &lines {
        *by_kind.entry(audit_kind(line)).or_default() += 1;
    }
    Ok(json!({"total": lines.len(), "byKind": by_kind}))
}

/// What an audit line's request was: `version`, `openapi`, `discovery`,
/// `<verb> <resource>` (`list pods`, `create tokenreviews`), else `other`.
fn audit_kind(line: &Value) -> String {
    let verb = line["verb"].as_str().unwrap_or("");
    let uri = line["requestURI"].as_str().unwrap_or("");
    let path = uri.split('?').next().unwrap_or("");
    if path == "/version" {
        "version".to_string()
    } else if path.starts_with("/openapi") {
        "openapi".to_string()
    } else if is_discovery(path) {
        "discovery".to_string()
    } else if matches!(
        verb,
        "list" | "get" | "watch" | "create" | "update" | "patch" | "delete"
    ) {
        format!("{verb} {}", resource_of(path))
    } else {
        "other".to_string()
    }
}

/// `/api`, `/api/v1`, `/apis`, `/apis/<group>`, `/apis/<group>/<version>`.
fn is_discovery(path: &str) -> bool {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match parts.first() {
        Some(&"api") => parts.len() <= 2,
        Some(&"apis") => parts.len() <= 3,
        _ => false,
    }
}

/// The resource of an API path: `/api/v1/namespaces/x/pods` → `pods`.
fn resource_of(path: &str) -> String {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let rest = match parts.first() {
        Some(&"api") => parts.get(2..),
        Some(&"apis") => parts.get(3..),
        _ => None,
    }
    .unwrap_or_default();
    let rest = if rest.first() == Some(&"namespaces") && rest.len() > 2 {
        &rest[2..]
    } else {
        rest
    };
    rest.first()
        .map_or_else(|| path.to_string(), |r| (*r).to_string())
}

// ---------------------------------------------------------------- burst

async fn burst(c: Burst) -> Result<Value> {
    let target = Arc::new(c.target.clone());
    let mut clients = Vec::new();
    for _ in 0..c.n {
        clients.push(target.client()?);
    }
    // Connect (and TLS-handshake) every client before the burst.
    let warm = futures::future::join_all(clients.iter().map(|client| {
        let target = target.clone();
        async move {
            exchange(
                client,
                target.request(Method::GET, "/version", None, None)?,
                false,
            )
            .await
        }
    }))
    .await;
    for r in warm {
        let r = r?;
        if !r.status.is_success() {
            bail!("warm-up GET /version: {}", r.status);
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mark = c.audit_log.as_deref().map(audit_mark).transpose()?;
    let barrier = Arc::new(tokio::sync::Barrier::new(c.n));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for client in clients {
        let (target, barrier, path, accept, timeout) = (
            target.clone(),
            barrier.clone(),
            c.path.clone(),
            c.accept.clone(),
            c.timeout,
        );
        tasks.push(tokio::spawn(async move {
            let request = target.request(Method::GET, &path, accept.as_deref(), None)?;
            barrier.wait().await;
            exchange_timeout(&client, request, false, timeout).await
        }));
    }
    let (mut latencies, mut errors, mut bytes) = (Vec::new(), BTreeMap::<String, usize>::new(), Vec::new());
    for task in tasks {
        match task.await? {
            Ok(r) if r.status.is_success() => {
                latencies.push(r.elapsed);
                bytes.push(r.bytes);
            }
            Ok(r) => *errors.entry(r.status.to_string()).or_default() += 1,
            Err(e) => *errors.entry(format!("{e:#}")).or_default() += 1,
        }
    }
    let wall = start.elapsed().as_secs_f64();
    let upstream = match (&c.audit_log, mark) {
        (Some(log), Some(mark)) => audit_count(log, mark).await?,
        _ => Value::Null,
    };
    bytes.sort_unstable();
    Ok(json!({
        "path": c.path,
        "n": c.n,
        "ok": latencies.len(),
        "errors": errors,
        "wallSeconds": wall,
        "bodyBytesMin": bytes.first(),
        "bodyBytesMax": bytes.last(),
        "latency": latency_summary(latencies),
        "upstream": upstream,
    }))
}

// ---------------------------------------------------------------- procs

async fn procs(c: Procs) -> Result<Value> {
    let (program, args) = c.command.split_first().context("no command")?;
    let scratch = std::env::temp_dir().join(format!("kache-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let mark = c.audit_log.as_deref().map(audit_mark).transpose()?;
    let run = |i: usize| {
        let mut command = tokio::process::Command::new(program);
        command.args(args);
        if c.fresh_cache_dir {
            command.arg("--cache-dir").arg(scratch.join(format!("cache-{i}")));
        }
        command
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let timeout = Duration::from_secs(c.timeout);
        async move {
            let start = Instant::now();
            let child = command.spawn()?;
            let output = tokio::time::timeout(timeout, child.wait_with_output())
                .await
                .map_err(|_| anyhow::anyhow!("run {i} timed out"))??;
            Ok::<_, anyhow::Error>((start.elapsed(), output))
        }
    };
    let start = Instant::now();
    let results = if c.parallel {
        let mut tasks = Vec::new();
        for i in 0..c.n {
            tasks.push(tokio::spawn(run(i)));
        }
        let mut results = Vec::new();
        for task in tasks {
            results.push(task.await?);
        }
        results
    } else {
        let mut results = Vec::new();
        for i in 0..c.n {
            results.push(run(i).await);
        }
        results
    };
    let wall = start.elapsed().as_secs_f64();
    let (mut latencies, mut failures, mut stdout_bytes) = (Vec::new(), Vec::new(), Vec::new());
    for result in results {
        match result {
            Ok((elapsed, output)) if output.status.success() => {
                latencies.push(elapsed);
                stdout_bytes.push(output.stdout.len());
            }
            Ok((_, output)) => failures.push(
                String::from_utf8_lossy(&output.stderr)
                    .chars()
                    .take(300)
                    .collect::<String>(),
            ),
            Err(e) => failures.push(format!("{e:#}")),
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    let upstream = match (&c.audit_log, mark) {
        (Some(log), Some(mark)) => audit_count(log, mark).await?,
        _ => Value::Null,
    };
    stdout_bytes.sort_unstable();
    failures.truncate(5);
    Ok(json!({
        "n": c.n,
        "parallel": c.parallel,
        "ok": latencies.len(),
        "failures": failures,
        "wallSeconds": wall,
        "stdoutBytesMin": stdout_bytes.first(),
        "stdoutBytesMax": stdout_bytes.last(),
        "latency": latency_summary(latencies),
        "upstream": upstream,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines_from(log: &Path, from: AuditPos) -> (Vec<String>, AuditPos) {
        let mut lines = Vec::new();
        let end = audit_scan(log, from, |line, _, _| {
            lines.push(line.trim_end().to_string());
            false
        })
        .unwrap();
        (lines, end)
    }

    #[test]
    fn audit_scan_follows_the_log_across_a_rotation_and_skips_a_partial_line() {
        let dir = std::env::temp_dir().join(format!("kache-e2e-audit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("audit.log");
        std::fs::write(&log, "a\nb\n").unwrap();
        let mark = AuditPos {
            ino: audit_mark(&log).unwrap().ino,
            offset: 2,
        };
        // Rotated as lumberjack does: renamed with a timestamp, a new file in its place.
        std::fs::write(&log, "a\nb\nc\n").unwrap();
        std::fs::rename(&log, dir.join("audit-2026-11-29T21-55-49.976.log")).unwrap();
        std::fs::write(&log, "d\ne").unwrap();
        let (lines, end) = lines_from(&log, mark);
        assert_eq!(lines, ["b", "c", "d"]);
        assert_eq!(end.ino, audit_mark(&log).unwrap().ino);
        assert_eq!(end.offset, 2, "the unfinished line is read next time");
        let (lines, _) = lines_from(&log, audit_mark(&log).unwrap());
        assert!(lines.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
