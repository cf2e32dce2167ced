//! Coalescing and concurrency limits against the real API server: identical
//! concurrent reads share upstream LISTs (counted in the audit log) without ever
//! answering a read with a call sent before it arrived; per-client fair queueing
//! keeps a polite client served while a greedy one gets 429s; seats survive
//! clients that give up; upstream failures reach every waiter of a shared call;
//! SIGHUP applies new limits.
//!
//! Every kache here reaches the API server as user `admin-token` and reads only
//! namespaces of its own, so the audit counts are this file's alone. The tests
//! take turns (`serial`): their timing claims should not compete for the two cores
//! with each other.

#![allow(clippy::unwrap_used)] // test helpers, not only #[test] fns (STYLE.md)

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use http::{HeaderMap, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kache_tests::{
    assert_status_body, cluster, kubeconfig_with_server, AuditFilter, AuditMark, Kache, Kubectl,
    TestNamespace,
};
use kube::api::{Api, PostParams};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

/// kubectl's `Accept` for `kubectl get` (server-side printing).
const TABLE_ACCEPT: &str =
    "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json";
/// The user of `admin-token.kubeconfig`: every kache of this file goes upstream as it.
const UPSTREAM_USER: &str = "admin-token";
/// Bound for one request through kache (generous: two busy cores).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound for kache's gauges and counters to reach an expected value.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------- helpers ----

/// Runs the tests of this file one at a time (a failed test must not stop the others).
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(PoisonError::into_inner)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

type Sender = SendRequest<Full<Bytes>>;

/// An HTTP/1.1 connection to `addr`, established now (so that a burst of requests
/// on many connections arrives together instead of after a burst of handshakes).
async fn connect(addr: SocketAddr) -> Sender {
    let stream = tokio::time::timeout(REQUEST_TIMEOUT, tokio::net::TcpStream::connect(addr))
        .await
        .unwrap_or_else(|_| panic!("connecting to {addr} timed out"))
        .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    stream.set_nodelay(true).unwrap();
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    sender
}

/// One request's outcome as its client saw it.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: HeaderMap,
    /// The whole body, or why it could not be read to its end.
    body: Result<Bytes, String>,
    latency: Duration,
}

impl Reply {
    #[track_caller]
    fn bytes(&self) -> &Bytes {
        match &self.body {
            Ok(b) => b,
            Err(e) => panic!("status {} with a broken body: {e}", self.status),
        }
    }

    #[track_caller]
    fn json(&self) -> Value {
        serde_json::from_slice(self.bytes()).unwrap_or_else(|e| {
            panic!(
                "status {}: body is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(self.bytes())
            )
        })
    }

    /// "200", "429", "503 broken body" …: what kind of answer this was.
    fn kind(&self) -> String {
        match &self.body {
            Ok(_) => self.status.to_string(),
            Err(_) => format!("{} broken body", self.status),
        }
    }
}

/// A request to send through kache.
#[derive(Debug, Clone)]
struct Call {
    method: Method,
    path: String,
    headers: Vec<(String, String)>,
    body: Bytes,
}

impl Call {
    fn get(path: impl Into<String>) -> Call {
        Call {
            method: Method::GET,
            path: path.into(),
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    fn header(mut self, name: &str, value: &str) -> Call {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    fn post_json(path: impl Into<String>, body: &Value) -> Call {
        Call {
            method: Method::POST,
            path: path.into(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: Bytes::from(body.to_string()),
        }
    }
}

/// Sends `call` on `sender` and reads the whole answer. `Err` when no response
/// head arrived (connection refused, reset, timeout).
async fn send(sender: &mut Sender, addr: SocketAddr, call: &Call) -> Result<Reply, String> {
    let started = Instant::now();
    let exchange = async {
        sender
            .ready()
            .await
            .map_err(|e| format!("connection not ready: {e}"))?;
        let mut request = Request::builder()
            .method(call.method.clone())
            .uri(&call.path)
            .header(http::header::HOST, addr.to_string());
        for (name, value) in &call.headers {
            request = request.header(name, value);
        }
        let request = request.body(Full::new(call.body.clone())).unwrap();
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("no response: {e}"))?;
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|e| format!("{e} ({:?})", std::error::Error::source(&e)));
        Ok(Reply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
            latency: started.elapsed(),
        })
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("no complete answer within {REQUEST_TIMEOUT:?}")))
}

/// Sends `call` on a connection of its own.
async fn send_once(addr: SocketAddr, call: &Call) -> Result<Reply, String> {
    send(&mut connect(addr).await, addr, call).await
}

/// Opens one connection per call, then sends all calls at once (released together
/// by a barrier). Results in the order of `calls`.
async fn burst(addr: SocketAddr, calls: Vec<Call>) -> Vec<Result<Reply, String>> {
    let senders = futures::future::join_all(calls.iter().map(|_| connect(addr))).await;
    let barrier = Arc::new(tokio::sync::Barrier::new(calls.len()));
    let tasks: Vec<_> = senders
        .into_iter()
        .zip(calls)
        .map(|(mut sender, call)| {
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                send(&mut sender, addr, &call).await
            })
        })
        .collect();
    let mut replies = Vec::new();
    for task in tasks {
        replies.push(task.await.unwrap());
    }
    replies
}

/// kache's `/metrics`, fetched without blocking the runtime.
async fn metrics_text(admin: SocketAddr) -> String {
    let reply = send_once(admin, &Call::get("/metrics")).await.unwrap();
    assert_eq!(reply.status, 200, "/metrics: {:?}", reply.body);
    String::from_utf8(reply.bytes().to_vec()).unwrap()
}

/// Sums the samples of a Prometheus metric whose labels include every `label`
/// (0 when there is none).
fn metric(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let rest = series.strip_prefix(name)?;
            (rest.is_empty() || rest.starts_with('{')).then_some(())?;
            labels
                .iter()
                .all(|want| rest.contains(want))
                .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// Polls kache's metrics until `pred` holds; returns them. Panics after `SETTLE_TIMEOUT`.
async fn wait_metrics(admin: SocketAddr, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let text = metrics_text(admin).await;
        if pred(&text) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {SETTLE_TIMEOUT:?} waiting for {what}; metrics:\n{}",
            flow_lines(&text)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The admission and coalescing lines of a metrics text (for failure messages).
fn flow_lines(metrics: &str) -> String {
    metrics
        .lines()
        .filter(|l| {
            !l.starts_with('#')
                && (l.contains("flowcontrol_current")
                    || l.contains("rejected")
                    || l.contains("in_flight")
                    || l.contains("coalesce"))
                && !l.contains("fan_out")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn gauge_executing(m: &str) -> f64 {
    metric(
        m,
        "kache_flowcontrol_current_executing_requests",
        &["class=\"default\""],
    )
}

fn gauge_queued(m: &str) -> f64 {
    metric(
        m,
        "kache_flowcontrol_current_inqueue_requests",
        &["class=\"default\""],
    )
}

fn gauge_in_flight(m: &str) -> f64 {
    metric(m, "kache_http_requests_in_flight", &[])
}

fn rejected_total(m: &str) -> f64 {
    metric(m, "kache_flowcontrol_rejected_requests_total", &[])
}

/// The `p`-quantile (0..=1) of some durations, by the nearest-rank method.
fn quantile(durations: &[Duration], p: f64) -> Duration {
    let mut sorted = durations.to_vec();
    sorted.sort();
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// A JSON body with `metadata.resourceVersion` removed: two reads of the same
/// objects at different times differ only there (a list's RV is the store's).
/// What two upstream answers read a moment apart may differ in besides their
/// objects: the list's resourceVersion, and in a Table the `Age` cells, which
/// the API server computes from the time it answers.
fn without_list_rv(mut v: Value) -> Value {
    if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("resourceVersion");
    }
    if v["kind"] == "Table" {
        let age = v["columnDefinitions"]
            .as_array()
            .and_then(|columns| columns.iter().position(|c| c["name"] == "Age"));
        if let (Some(age), Some(rows)) = (age, v.get_mut("rows").and_then(Value::as_array_mut)) {
            for row in rows {
                if let Some(cell) = row.get_mut("cells").and_then(|c| c.get_mut(age)) {
                    *cell = Value::Null;
                }
            }
        }
    }
    v
}

/// An object's or list's `metadata.resourceVersion` as a number (v1.20's are etcd
/// revisions: comparable, which this test may rely on and clients may not).
fn rv_of(v: &Value) -> u64 {
    v["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|rv| rv.parse().ok())
        .unwrap_or_else(|| panic!("no numeric metadata.resourceVersion in {v}"))
}

/// Creates `count` pods named `p-000…` in `ns` directly as admin, each carrying
/// `payload` bytes in an annotation (so that a LIST of them takes a while to send).
async fn create_pods(ns: &str, count: usize, payload: usize) {
    let pods: Api<Pod> = Api::namespaced(cluster().admin_client().await, ns);
    let filler = "x".repeat(payload);
    let results: Vec<_> = futures::stream::iter(0..count)
        .map(|i| {
            let pods = pods.clone();
            let pod: Pod = serde_json::from_value(json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": format!("p-{i:03}"), "annotations": {"payload": filler}},
                "spec": {"containers": [{"name": "c", "image": "registry.invalid/none:1"}]},
            }))
            .unwrap();
            async move { pods.create(&PostParams::default(), &pod).await }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    for r in results {
        r.unwrap();
    }
}

/// Creates configmaps `names` in `ns` directly as admin, each with `payload` bytes of data.
async fn create_configmaps(ns: &str, names: impl IntoIterator<Item = String>, payload: usize) {
    let cms: Api<ConfigMap> = Api::namespaced(cluster().admin_client().await, ns);
    let filler = "y".repeat(payload);
    let results: Vec<_> = futures::stream::iter(names)
        .map(|name| {
            let cms = cms.clone();
            let cm: ConfigMap = serde_json::from_value(json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": name},
                "data": {"payload": filler},
            }))
            .unwrap();
            async move { cms.create(&PostParams::default(), &cm).await }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    for r in results {
        r.unwrap();
    }
}

/// Counts the LISTs of exactly `uri` kache sent upstream after `mark`, once a
/// sentinel request shows the audit log complete.
fn upstream_lists(mark: &AuditMark, uri: &str) -> usize {
    let filter = AuditFilter::new().user(UPSTREAM_USER).verb("list").uri(uri);
    mark.count_after_sentinel(&filter)
}

/// Writes a kache config file at `path` holding this `limits:` section (YAML, indented).
fn write_config(path: &Path, limits: &str) {
    std::fs::write(path, format!("limits:\n{limits}")).unwrap();
}

/// The pid of the `kache serve` child of this test process started with `config`
/// (the harness does not expose it): its parent is us and its command line names
/// the config file, which is unique to the test.
fn kache_pid(config: &Path) -> u32 {
    let me = std::process::id();
    let config = config.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid …; comm may contain spaces and parentheses.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid != Some(me) {
            continue;
        }
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.iter().any(|a| a == "serve") && args.contains(&config) {
            found.push(pid);
        }
    }
    assert_eq!(found.len(), 1, "kache children started with {config}: {found:?}");
    found[0]
}

/// Sends SIGHUP to `pid` and waits until kache's stderr shows one more line with
/// `expect` than before (kache logs every reload attempt).
fn sighup_and_wait(kache: &Kache, pid: u32, expect: &str) {
    let before = kache.stderr().matches(expect).count();
    let status = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -HUP {pid}: {status}");
    kache_tests::poll_until(SETTLE_TIMEOUT, &format!("kache to log {expect:?}"), || {
        (kache.stderr().matches(expect).count() > before).then_some(())
    });
}

// ------------------------------------------------------------------ relay ----

/// A loopback TCP relay between kache and the API server that can hold the bytes
/// coming back from the API server (`pause`), cut every connection (`cut`), cut them
/// once a number of bytes has come back (`cut_after`), and stop listening (`stop`).
/// The bytes are TLS: the relay knows nothing of requests, only of connections.
struct GateRelay {
    addr: SocketAddr,
    gate: Arc<Gate>,
    accept: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct Gate {
    stop: AtomicBool,
    paused: AtomicBool,
    /// Bytes from the API server still to relay before cutting every connection;
    /// negative: not armed.
    budget: AtomicI64,
    conns: Mutex<Vec<TcpStream>>,
    cuts: AtomicUsize,
}

impl Gate {
    fn cut(&self) {
        self.cuts.fetch_add(1, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

impl GateRelay {
    fn start(target: SocketAddr) -> GateRelay {
        Self::start_on(0, target)
    }

    fn start_on(port: u16, target: SocketAddr) -> GateRelay {
        let listener = kache_tests::poll_until(Duration::from_secs(10), "binding the relay port", || {
            TcpListener::bind(("127.0.0.1", port)).ok()
        });
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let gate = Arc::new(Gate::default());
        gate.budget.store(-1, Ordering::SeqCst);
        let accept = {
            let gate = gate.clone();
            std::thread::spawn(move || {
                while !gate.stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((down, _)) => {
                            let _ = down.set_nonblocking(false);
                            let Ok(up) = TcpStream::connect(target) else {
                                continue;
                            };
                            let _ = down.set_nodelay(true);
                            let _ = up.set_nodelay(true);
                            let (Ok(down2), Ok(up2)) = (down.try_clone(), up.try_clone()) else {
                                continue;
                            };
                            {
                                let mut conns = gate.conns.lock().unwrap();
                                conns.push(down.try_clone().unwrap());
                                conns.push(up.try_clone().unwrap());
                            }
                            let g = gate.clone();
                            std::thread::spawn(move || pump(down, up2, &g, false));
                            let g = gate.clone();
                            std::thread::spawn(move || pump(up, down2, &g, true));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
            })
        };
        GateRelay {
            addr,
            gate,
            accept: Some(accept),
        }
    }

    fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Holds everything the API server sends until `resume` (requests still go up).
    fn pause(&self) {
        self.gate.paused.store(true, Ordering::SeqCst);
    }

    fn resume(&self) {
        self.gate.paused.store(false, Ordering::SeqCst);
    }

    /// Cuts every connection once `bytes` more have come back from the API server.
    fn cut_after(&self, bytes: i64) {
        self.gate.budget.store(bytes, Ordering::SeqCst);
    }

    fn cuts(&self) -> usize {
        self.gate.cuts.load(Ordering::SeqCst)
    }

    /// Stops listening and cuts every connection; returns the port.
    fn stop(mut self) -> u16 {
        self.shutdown();
        self.port()
    }

    fn shutdown(&mut self) {
        self.gate.stop.store(true, Ordering::SeqCst);
        self.gate.paused.store(false, Ordering::SeqCst);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        self.gate.cut();
    }
}

impl Drop for GateRelay {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Copies `from` to `to` until either end closes. `from_upstream`: the bytes come
/// from the API server, so they are held while paused and count against the budget.
fn pump(mut from: TcpStream, mut to: TcpStream, gate: &Gate, from_upstream: bool) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if from_upstream {
            while gate.paused.load(Ordering::SeqCst) && !gate.stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        if from_upstream && gate.budget.load(Ordering::SeqCst) >= 0 {
            let left = gate.budget.fetch_sub(n as i64, Ordering::SeqCst) - n as i64;
            if left <= 0 && left + n as i64 > 0 {
                gate.budget.store(-1, Ordering::SeqCst);
                gate.cut();
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// kache in front of `relay`, as `admin-token`, with extra flags.
fn kache_behind(relay: &GateRelay, dir: &Path, extra: &[&str]) -> Kache {
    let kubeconfig = dir.join("relay.kubeconfig");
    kubeconfig_with_server(
        &cluster().admin_token_kubeconfig,
        &format!("https://127.0.0.1:{}", relay.port()),
        &kubeconfig,
    );
    Kache::start_with_args(&kubeconfig, extra)
}

// ------------------------------------------------------- 1. coalescing bound ----

/// Pods in the namespace of the burst test, and the bytes each carries: a LIST of
/// them is a few megabytes, so the first upstream call is still running when the
/// last of the hundred requests arrives — the condition for the two-call bound.
const BURST_PODS: usize = 60;
const BURST_POD_PAYLOAD: usize = 40 * 1024;
const BURST: usize = 100;

/// Fires `BURST` identical reads at kache; asserts they all got one of at most two
/// answers (one per upstream call) and returns the distinct bodies and the upstream count.
fn assert_burst_shares_two_calls(
    rt: &tokio::runtime::Runtime,
    kache: &Kache,
    call: &Call,
    what: &str,
) -> (Vec<Value>, usize) {
    let c = cluster();
    let before = rt.block_on(metrics_text(kache.admin_addr()));
    let mark = c.audit().mark();
    let started = Instant::now();
    let replies = rt.block_on(burst(kache.addr(), vec![call.clone(); BURST]));
    let took = started.elapsed();
    let after = rt.block_on(metrics_text(kache.admin_addr()));
    let calls_by_kache = (metric(&after, "kache_coalescer_upstream_calls_total", &[])
        - metric(&before, "kache_coalescer_upstream_calls_total", &[])) as usize;
    let upstream = upstream_lists(&mark, &call.path);

    let mut distinct: BTreeMap<Bytes, usize> = BTreeMap::new();
    let mut latencies = Vec::new();
    for (i, reply) in replies.into_iter().enumerate() {
        let reply = reply.unwrap_or_else(|e| panic!("{what}: request {i}: {e}"));
        assert_eq!(reply.status, 200, "{what}: request {i}: {:?}", reply.body);
        latencies.push(reply.latency);
        *distinct.entry(reply.bytes().clone()).or_default() += 1;
    }
    eprintln!(
        "{what}: {BURST} concurrent identical reads -> {upstream} upstream LISTs (kache counted {calls_by_kache} calls), \
         {} distinct bodies of {} bytes (sharing {:?}), burst {took:?}, latency p50 {:?} max {:?}",
        distinct.len(),
        distinct.keys().next().map_or(0, Bytes::len),
        distinct.values().collect::<Vec<_>>(),
        quantile(&latencies, 0.5),
        quantile(&latencies, 1.0),
    );
    assert!(
        (1..=2).contains(&upstream),
        "{what}: {BURST} concurrent identical reads made {upstream} upstream LISTs (at most 2: one running, one gathering)"
    );
    assert_eq!(
        upstream, calls_by_kache,
        "{what}: the audit log and kache's kache_coalescer_upstream_calls_total disagree"
    );
    assert!(
        distinct.len() <= upstream,
        "{what}: {} distinct bodies from {upstream} upstream calls",
        distinct.len()
    );
    let bodies: Vec<Value> = distinct
        .keys()
        .map(|b| serde_json::from_slice(b).unwrap_or_else(|e| panic!("{what}: body is not JSON: {e}")))
        .collect();
    for b in &bodies[1..] {
        assert_eq!(
            without_list_rv(b.clone()),
            without_list_rv(bodies[0].clone()),
            "{what}: the bodies of the two calls differ beyond the list's resourceVersion"
        );
    }
    (bodies, upstream)
}

#[test]
fn a_hundred_concurrent_identical_reads_make_at_most_two_upstream_lists() {
    let _serial = serial();
    let rt = runtime();
    let c = cluster();
    let ns = TestNamespace::create("coalesce-burst");
    rt.block_on(create_pods(ns.name(), BURST_PODS, BURST_POD_PAYLOAD));
    let kache = Kache::start(&c.admin_token_kubeconfig);
    let expected: BTreeSet<String> = (0..BURST_PODS).map(|i| format!("p-{i:03}")).collect();

    // A consistent LIST (no resourceVersion) in JSON: the cache does not answer it.
    let list = Call::get(format!("/api/v1/namespaces/{ns}/pods")).header("accept", "application/json");
    let (bodies, _) = assert_burst_shares_two_calls(&rt, &kache, &list, "JSON list");
    for body in &bodies {
        assert_eq!(body["kind"], "PodList", "{}", body["kind"]);
        let names: BTreeSet<String> = body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(names, expected, "JSON list: not every pod is in the body");
    }

    // kubectl get's Table request.
    let table = Call::get(format!("/api/v1/namespaces/{ns}/pods?limit=500")).header("accept", TABLE_ACCEPT);
    let (bodies, _) = assert_burst_shares_two_calls(&rt, &kache, &table, "Table list");
    for body in &bodies {
        assert_eq!(body["kind"], "Table", "{}", body["kind"]);
        let names: BTreeSet<String> = body["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["object"]["metadata"]["name"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(names, expected, "Table list: not every pod is a row");
    }
}

#[test]
fn a_hundred_kubectl_processes_make_fewer_than_a_hundred_upstream_lists() {
    const RUNS: usize = 100;
    let _serial = serial();
    let rt = runtime();
    let c = cluster();
    let ns = TestNamespace::create("coalesce-kubectl");
    rt.block_on(create_pods(ns.name(), 5, 64));
    let kache = Kache::start(&c.admin_token_kubeconfig);
    // One discovery cache for all runs, filled once: the runs then differ only in their LIST.
    let cache = tempfile::tempdir().unwrap();
    let kubectl = Kubectl::new(kache.kubeconfig())
        .cache_dir(cache.path())
        .timeout(Duration::from_secs(150));
    kubectl.run(&["get", "pods", "-A", "-o", "json"]).ok();

    let mark = c.audit().mark();
    let started = Instant::now();
    let runs: Vec<_> = (0..RUNS)
        .map(|_| {
            let kubectl = kubectl.clone();
            std::thread::spawn(move || kubectl.run(&["get", "pods", "-A", "-o", "json"]))
        })
        .collect();
    let outputs: Vec<_> = runs.into_iter().map(|r| r.join().unwrap()).collect();
    let took = started.elapsed();
    let upstream = upstream_lists(&mark, "/api/v1/pods?limit=500");

    let mut distinct: BTreeMap<String, usize> = BTreeMap::new();
    for (i, out) in outputs.into_iter().enumerate() {
        assert!(out.success(), "kubectl run {i} failed: {}", out.stderr);
        *distinct.entry(out.stdout).or_default() += 1;
    }
    eprintln!(
        "{RUNS} concurrent `kubectl get pods -A -o json` processes: {upstream} upstream LISTs in {took:?}, {} distinct outputs",
        distinct.len()
    );
    assert!(
        (1..RUNS).contains(&upstream),
        "{RUNS} kubectl processes made {upstream} upstream LISTs of /api/v1/pods?limit=500"
    );
    // Each upstream answer is printed the same by every kubectl that shared it. Other
    // test files create pods meanwhile, so answers of different calls may differ
    // elsewhere; this namespace's pods are the same in all.
    assert!(
        distinct.len() <= upstream,
        "{} distinct outputs from {upstream} upstream LISTs",
        distinct.len()
    );
    let mine: BTreeSet<String> = distinct
        .keys()
        .map(|out| {
            let v: Value = serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"));
            let items: Vec<&Value> = v["items"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|p| p["metadata"]["namespace"] == ns.name())
                .collect();
            assert_eq!(items.len(), 5, "the pods of {ns} in one output: {items:?}");
            serde_json::to_string(&items).unwrap()
        })
        .collect();
    assert_eq!(mine.len(), 1, "the pods of {ns} differ between outputs");
}

// -------------------------------------------------------- 2. linearizable ----

#[test]
fn a_write_is_always_seen_by_the_next_read_while_identical_reads_are_in_flight() {
    const READERS: usize = 50;
    const ROUNDS: usize = 20;
    let _serial = serial();
    let rt = runtime();
    let c = cluster();
    let ns = TestNamespace::create("coalesce-linear");
    let kache = Kache::start(&c.admin_token_kubeconfig);
    let addr = kache.addr();
    let list = Call::get(format!("/api/v1/namespaces/{ns}/configmaps")).header("accept", "application/json");

    rt.block_on(async {
        let before = metrics_text(kache.admin_addr()).await;
        // Readers asking the same thing as the writer's reads, continuously.
        let stop = Arc::new(AtomicBool::new(false));
        let background_reads = Arc::new(AtomicUsize::new(0));
        let readers: Vec<_> = (0..READERS)
            .map(|_| {
                let (stop, count, list) = (stop.clone(), background_reads.clone(), list.clone());
                tokio::spawn(async move {
                    let mut sender = connect(addr).await;
                    while !stop.load(Ordering::SeqCst) {
                        let reply = send(&mut sender, addr, &list).await.unwrap();
                        assert_eq!(reply.status, 200, "{:?}", reply.body);
                        reply.bytes();
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(300)).await;

        let mut writer = connect(addr).await;
        for round in 0..ROUNDS {
            let name = format!("w-{round:02}");
            let created = send(
                &mut writer,
                addr,
                &Call::post_json(
                    format!("/api/v1/namespaces/{ns}/configmaps"),
                    &json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"round": round.to_string()}}),
                ),
            )
            .await
            .unwrap();
            assert_eq!(created.status, 201, "create {name}: {:?}", created.body);
            let written_rv = rv_of(&created.json());

            let read = send(&mut writer, addr, &list).await.unwrap();
            assert_eq!(read.status, 200, "{:?}", read.body);
            let read = read.json();
            let names: Vec<&str> = read["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|cm| cm["metadata"]["name"].as_str().unwrap())
                .collect();
            assert!(
                names.contains(&name.as_str()),
                "round {round}: the LIST right after creating {name} (rv {written_rv}) does not show it: {names:?} (list rv {})",
                read["metadata"]["resourceVersion"]
            );
            assert!(
                rv_of(&read) >= written_rv,
                "round {round}: the LIST after the write is older than the write: list rv {} < {written_rv}",
                rv_of(&read)
            );
            let got = send(&mut writer, addr, &Call::get(format!("/api/v1/namespaces/{ns}/configmaps/{name}")))
                .await
                .unwrap();
            assert_eq!(got.status, 200, "round {round}: GET {name} right after creating it: {:?}", got.body);
        }

        stop.store(true, Ordering::SeqCst);
        for r in readers {
            r.await.unwrap();
        }
        let after = metrics_text(kache.admin_addr()).await;
        let coalesced = metric(&after, "kache_coalesced_requests_total", &[])
            - metric(&before, "kache_coalesced_requests_total", &[]);
        let calls = metric(&after, "kache_coalescer_upstream_calls_total", &[])
            - metric(&before, "kache_coalescer_upstream_calls_total", &[]);
        let reads = background_reads.load(Ordering::SeqCst);
        eprintln!(
            "linearizability: {ROUNDS} write-then-read rounds among {reads} background reads; \
             {coalesced} requests coalesced into {calls} upstream calls"
        );
        assert!(
            coalesced >= (ROUNDS as f64),
            "too little coalescing for the test to mean anything: {coalesced} coalesced requests"
        );
    });
}

// ------------------------------------------------------ 3. greedy vs polite ----

#[test]
fn a_polite_client_is_served_while_a_greedy_one_gets_429s() {
    const GREEDY: usize = 200;
    const POLITE_TASKS: usize = 2;
    const MIN_POLITE_ROUNDS: usize = 5;
    let _serial = serial();
    let rt = runtime();
    let c = cluster();
    let ns = TestNamespace::create("limits-fair");
    // A LIST of these is ~3 MB: each greedy read holds its seat for a while.
    rt.block_on(create_configmaps(
        ns.name(),
        (0..30).map(|i| format!("bulk-{i:02}")),
        100 * 1024,
    ));
    rt.block_on(create_configmaps(
        ns.name(),
        (0..POLITE_TASKS).map(|i| format!("polite-{i}")),
        16,
    ));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kache.yaml");
    write_config(
        &config,
        "  maxInFlight: 4\n  default: {maxInFlightPerClient: 4, queueLength: 10, queueTimeoutSeconds: 5}\n",
    );
    let kache = Kache::start_with_args(&c.admin_token_kubeconfig, &["--config", config.to_str().unwrap()]);
    let (addr, admin) = (kache.addr(), kache.admin_addr());

    rt.block_on(async {
        let before = metrics_text(admin).await;
        // Distinct label selectors: 200 different uncacheable reads, none shared.
        let greedy_calls: Vec<Call> = (0..GREEDY)
            .map(|i| {
                Call::get(format!("/api/v1/namespaces/{ns}/configmaps?labelSelector=greedy-{i}%21%3Dx"))
                    .header("user-agent", "greedy/1.0")
                    .header("accept", "application/json")
            })
            .collect();
        let outstanding = Arc::new(AtomicUsize::new(GREEDY));
        let greedy = {
            let outstanding = outstanding.clone();
            tokio::spawn(async move {
                let senders = futures::future::join_all(greedy_calls.iter().map(|_| connect(addr))).await;
                let barrier = Arc::new(tokio::sync::Barrier::new(GREEDY));
                let tasks: Vec<_> = senders
                    .into_iter()
                    .zip(greedy_calls)
                    .map(|(mut sender, call)| {
                        let (barrier, outstanding) = (barrier.clone(), outstanding.clone());
                        tokio::spawn(async move {
                            barrier.wait().await;
                            let reply = send(&mut sender, addr, &call).await;
                            outstanding.fetch_sub(1, Ordering::SeqCst);
                            reply
                        })
                    })
                    .collect();
                futures::future::join_all(tasks).await
            })
        };
        // The polite client starts once the greedy one holds every seat.
        wait_metrics(admin, "the greedy client to hold all 4 seats", |m| gauge_executing(m) >= 4.0).await;

        let polite_tasks: Vec<_> = (0..POLITE_TASKS)
            .map(|task| {
                let outstanding = outstanding.clone();
                let call = Call::get(format!("/api/v1/namespaces/{ns}/configmaps/polite-{task}"))
                    .header("user-agent", "polite/1.0")
                    .header("accept", "application/json");
                tokio::spawn(async move {
                    let mut sender = connect(addr).await;
                    let mut replies = Vec::new();
                    let mut saturated = 0;
                    while replies.len() < MIN_POLITE_ROUNDS || (outstanding.load(Ordering::SeqCst) > 0 && replies.len() < 200) {
                        if outstanding.load(Ordering::SeqCst) >= 4 {
                            saturated += 1;
                        }
                        replies.push(send(&mut sender, addr, &call).await);
                    }
                    (replies, saturated)
                })
            })
            .collect();
        let mut polite = Vec::new();
        let mut polite_while_saturated = 0;
        for t in polite_tasks {
            let (replies, saturated) = t.await.unwrap();
            polite.extend(replies);
            polite_while_saturated += saturated;
        }
        let greedy: Vec<_> = greedy.await.unwrap().into_iter().map(|r| r.unwrap()).collect();

        // The polite client: never rejected. Its latencies are reported, not asserted:
        // the machine's cores are shared with other tests and builds.
        let mut latencies = Vec::new();
        for (i, reply) in polite.iter().enumerate() {
            let reply = reply.as_ref().unwrap_or_else(|e| panic!("polite request {i}: {e}"));
            assert_eq!(reply.status, 200, "polite request {i}: {:?}", reply.body);
            reply.bytes();
            latencies.push(reply.latency);
        }
        // The greedy client: exactly one answer each, 200 or 429 with Retry-After and a Status.
        let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
        let mut greedy_ok_latencies = Vec::new();
        for (i, reply) in greedy.iter().enumerate() {
            let reply = reply.as_ref().unwrap_or_else(|e| panic!("greedy request {i} got no answer: {e}"));
            *by_status.entry(reply.status).or_default() += 1;
            match reply.status {
                200 => {
                    assert_eq!(reply.json()["kind"], "ConfigMapList");
                    greedy_ok_latencies.push(reply.latency);
                }
                429 => {
                    let retry_after = reply
                        .headers
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok());
                    assert!(
                        retry_after.is_some_and(|s| s >= 1),
                        "greedy 429 without a usable Retry-After: {:?}",
                        reply.headers
                    );
                    assert_status_body(&reply.json(), 429, Some("TooManyRequests"));
                }
                other => panic!("greedy request {i}: unexpected status {other}: {:?}", reply.body),
            }
        }
        let ok = by_status.get(&200).copied().unwrap_or(0);
        let rejected = by_status.get(&429).copied().unwrap_or(0);
        let after = metrics_text(admin).await;
        let rejected_metric = rejected_total(&after) - rejected_total(&before);
        let p99 = quantile(&latencies, 0.99);
        eprintln!(
            "greedy vs polite: greedy {ok} x 200 (p50 {:?}, max {:?}), {rejected} x 429; polite {} requests \
             ({polite_while_saturated} sent while the greedy client had >= 4 outstanding), latency p50 {:?} p99 {p99:?} max {:?}; \
             rejected metric +{rejected_metric}\n{}",
            quantile(&greedy_ok_latencies, 0.5),
            quantile(&greedy_ok_latencies, 1.0),
            latencies.len(),
            quantile(&latencies, 0.5),
            quantile(&latencies, 1.0),
            after.lines().filter(|l| l.starts_with("kache_flowcontrol_rejected_requests_total")).collect::<Vec<_>>().join("\n"),
        );
        assert_eq!(ok + rejected, GREEDY, "greedy answers by status: {by_status:?}");
        assert!(rejected >= 1, "the greedy client was never rejected: {by_status:?}");
        assert!(ok >= 4, "the greedy client got almost nothing through: {by_status:?}");
        assert!(
            polite_while_saturated >= 1,
            "no polite request was sent while the greedy client saturated the seats"
        );
        assert_eq!(
            rejected_metric, rejected as f64,
            "kache_flowcontrol_rejected_requests_total grew by {rejected_metric}, the greedy client saw {rejected} 429s"
        );
    });
}

// ------------------------------------------------- 4. clients that give up ----

#[test]
fn clients_that_give_up_while_waiting_or_executing_leave_no_seat_behind() {
    const SEATS: usize = 2;
    const QUEUE: usize = 20;
    let _serial = serial();
    let rt = runtime();
    let c = cluster();
    let ns = TestNamespace::create("limits-quit");
    rt.block_on(create_configmaps(
        ns.name(),
        (0..3).map(|i| format!("cm-{i}")),
        16,
    ));
    let relay = GateRelay::start(c.apiserver_addr);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kache.yaml");
    write_config(
        &config,
        &format!(
            "  maxInFlight: {SEATS}\n  default: {{maxInFlightPerClient: {SEATS}, queueLength: {QUEUE}, queueTimeoutSeconds: 30}}\n"
        ),
    );
    let mut kache = kache_behind(&relay, dir.path(), &["--config", config.to_str().unwrap()]);
    let (addr, admin) = (kache.addr(), kache.admin_addr());

    rt.block_on(async {
        let quiet = wait_metrics(admin, "no request in flight after startup", |m| {
            gauge_executing(m) == 0.0 && gauge_queued(m) == 0.0
        })
        .await;
        let base_in_flight = gauge_in_flight(&quiet);

        // The API server's answers are held: whatever takes a seat keeps it.
        relay.pause();
        let request = |path: String| {
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: quitter/1.0\r\nAccept: application/json\r\n\r\n")
        };
        let mut quitters = Vec::new();
        // Two take the seats …
        for i in 0..SEATS {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(request(format!("/api/v1/namespaces/{ns}/configmaps/cm-0?holder={i}")).as_bytes())
                .await
                .unwrap();
            quitters.push(s);
        }
        wait_metrics(admin, "two requests holding the seats", |m| gauge_executing(m) == SEATS as f64).await;
        // … eight distinct ones queue, and five identical ones: one queued call, four gathered behind it.
        for i in 0..8 {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(request(format!("/api/v1/namespaces/{ns}/configmaps/cm-1?queued={i}")).as_bytes())
                .await
                .unwrap();
            quitters.push(s);
        }
        for _ in 0..5 {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(request(format!("/api/v1/namespaces/{ns}/configmaps/cm-2")).as_bytes())
                .await
                .unwrap();
            quitters.push(s);
        }
        let waiting = wait_metrics(admin, "nine requests queued and four gathered", |m| {
            gauge_queued(m) == 9.0
                && metric(m, "kache_coalesced_requests_total", &[]) == 3.0
                && gauge_in_flight(m) == base_in_flight + 15.0
        })
        .await;
        eprintln!("saturated, before the clients give up:\n{}", flow_lines(&waiting));

        // Every client gives up: the connections close while their requests wait or execute.
        drop(quitters);
        let settled = wait_metrics(admin, "the seats and queue to empty after the clients left", |m| {
            gauge_executing(m) == 0.0 && gauge_queued(m) == 0.0
        })
        .await;
        eprintln!("after the clients gave up:\n{}", flow_lines(&settled));
        relay.resume();

        // A full set — every seat and every queue place — still gets through.
        let burst_calls: Vec<Call> = (0..SEATS + QUEUE)
            .map(|i| {
                Call::get(format!("/api/v1/namespaces/{ns}/configmaps/cm-{}?after={i}", i % 3))
                    .header("user-agent", "quitter/1.0")
                    .header("accept", "application/json")
            })
            .collect();
        let replies = burst(addr, burst_calls).await;
        let statuses: Vec<String> = replies
            .iter()
            .map(|r| r.as_ref().map_or_else(|e| e.clone(), Reply::kind))
            .collect();
        assert!(
            statuses.iter().all(|s| s == "200"),
            "a full set of requests after the quitters left: {statuses:?}"
        );
        let end = wait_metrics(admin, "the gauges back at zero", |m| {
            gauge_executing(m) == 0.0 && gauge_queued(m) == 0.0
        })
        .await;
        // kache's own count of requests in progress must not keep the ones that were dropped.
        // (The admin listener's /metrics requests are not counted there.)
        let in_flight = gauge_in_flight(&end) - base_in_flight;
        assert_eq!(
            in_flight,
            0.0,
            "kache_http_requests_in_flight stays raised by the 15 requests whose clients disconnected \
             (2 executing, 9 queued, 4 gathered), although every request has ended:\n{}",
            flow_lines(&end)
        );
    });
    kache.assert_running();
}

// --------------------------------------------- 5. upstream failures, shared ----

/// A LIST of ~3 MB, so that a cut after a few hundred kilobytes is mid-body.
fn bulky_namespace(rt: &tokio::runtime::Runtime, prefix: &str) -> TestNamespace {
    let ns = TestNamespace::create(prefix);
    rt.block_on(create_configmaps(
        ns.name(),
        (0..30).map(|i| format!("bulk-{i:02}")),
        100 * 1024,
    ));
    ns
}

#[test]
fn an_upstream_cut_mid_body_fails_every_waiter_of_the_shared_call_alike() {
    const WAITERS: usize = 20;
    const CUT_INTO_BODY: usize = 256 * 1024;
    let _serial = serial();
    let rt = runtime();
    let c = cluster();
    let ns = bulky_namespace(&rt, "coalesce-cut");
    let relay = GateRelay::start(c.apiserver_addr);
    let dir = tempfile::tempdir().unwrap();
    let mut kache = kache_behind(&relay, dir.path(), &[]);
    let (addr, admin) = (kache.addr(), kache.admin_addr());
    let list = Call::get(format!("/api/v1/namespaces/{ns}/configmaps")).header("accept", "application/json");

    rt.block_on(async {
        let warm = send_once(addr, &list).await.unwrap();
        assert_eq!(warm.status, 200, "{:?}", warm.body);
        let full_len = warm.bytes().len();

        // A first call whose answer is held at the relay …
        let before = metrics_text(admin).await;
        let calls_before = metric(&before, "kache_coalescer_upstream_calls_total", &[]);
        let coalesced_before = metric(&before, "kache_coalesced_requests_total", &[]);
        relay.pause();
        let first = {
            let list = list.clone();
            tokio::spawn(async move { send_once(addr, &list).await })
        };
        wait_metrics(admin, "the first call to be sent", |m| {
            metric(m, "kache_coalescer_upstream_calls_total", &[]) == calls_before + 1.0
        })
        .await;
        // … so that all the waiters gather behind it into one call.
        let waiters = {
            let list = list.clone();
            tokio::spawn(async move { burst(addr, vec![list; WAITERS]).await })
        };
        wait_metrics(admin, "every waiter to join the gathering call", |m| {
            metric(m, "kache_coalesced_requests_total", &[]) == coalesced_before + (WAITERS - 1) as f64
        })
        .await;

        // The first call's answer goes through whole; the gathered call is sent right
        // after it, and the connection is cut a few hundred kilobytes into its body.
        // (Cutting before an answer would not do: kache sends a failed read again.)
        // The first answer costs its JSON plus under 1 % of TLS and HTTP/2 framing.
        relay.cut_after((full_len + CUT_INTO_BODY) as i64);
        relay.resume();
        let first = first.await.unwrap().expect("an answer for the first request");
        let replies = waiters.await.unwrap();
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for r in &replies {
            let what = match r {
                Ok(r) => format!("{} then {}", r.status, r.body.as_ref().err().map_or("a whole body", |e| e.as_str())),
                Err(e) => e.clone(),
            };
            *seen.entry(what).or_default() += 1;
        }
        eprintln!(
            "cut {CUT_INTO_BODY} bytes into the gathered call's body: first request {}; the {WAITERS} gathered waiters: {seen:#?} (full body {full_len} bytes)",
            first.kind(),
        );
        assert_eq!(first.status, 200, "the first call: {:?}", first.body);
        assert_eq!(first.bytes().len(), full_len, "the first call's body was cut, not the gathered one's");
        assert_eq!(relay.cuts(), 1, "the relay did not cut the gathered call");

        // Every waiter's answer breaks off: the connection closes after the head and part
        // of the body, or — when hyper had not flushed the head yet — before any of it.
        // Never a complete-looking answer (a truncated body that ends cleanly), never
        // some waiters served and others not.
        let kinds: BTreeSet<String> = replies
            .iter()
            .map(|r| match r {
                Err(e) if e.starts_with("no response") => "broken".to_string(),
                Ok(r) if r.status == 200 && r.body.is_err() => "broken".to_string(),
                Err(e) => format!("no answer: {e}"),
                Ok(r) => format!(
                    "{} with a complete body of {} bytes",
                    r.status,
                    r.body.as_ref().map_or(0, Bytes::len)
                ),
            })
            .collect();
        assert_eq!(
            kinds,
            BTreeSet::from(["broken".to_string()]),
            "the {WAITERS} waiters of the cut call"
        );

        // kache is still up, and the next requests are answered in full.
        let replies = burst(addr, vec![list.clone(); WAITERS]).await;
        for r in &replies {
            let r = r.as_ref().unwrap();
            assert_eq!(r.status, 200, "after the cut: {:?}", r.body);
            assert_eq!(r.json()["items"].as_array().unwrap().len(), 30);
        }
    });
    kache.assert_running();
}

#[test]
fn an_unreachable_upstream_fails_every_waiter_with_503_and_kache_recovers() {
    const WAITERS: usize = 20;
    let _serial = serial();
    let rt = runtime();
    let c = cluster();
    let ns = bulky_namespace(&rt, "coalesce-down");
    let relay = GateRelay::start(c.apiserver_addr);
    let dir = tempfile::tempdir().unwrap();
    let mut kache = kache_behind(&relay, dir.path(), &[]);
    let addr = kache.addr();
    let list = Call::get(format!("/api/v1/namespaces/{ns}/configmaps")).header("accept", "application/json");

    rt.block_on(async {
        let warm = send_once(addr, &list).await.unwrap();
        assert_eq!(warm.status, 200, "{:?}", warm.body);

        let port = relay.stop();
        let replies = burst(addr, vec![list.clone(); WAITERS]).await;
        for (i, r) in replies.iter().enumerate() {
            let r = r
                .as_ref()
                .unwrap_or_else(|e| panic!("waiter {i} got no answer: {e}"));
            assert_eq!(r.status, 503, "waiter {i} with the upstream down: {:?}", r.body);
            assert!(
                r.headers.contains_key("retry-after"),
                "503 without Retry-After: {:?}",
                r.headers
            );
            assert_status_body(&r.json(), 503, Some("ServiceUnavailable"));
        }

        let _relay = GateRelay::start_on(port, c.apiserver_addr);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = send_once(addr, &list).await;
            if r.as_ref().is_ok_and(|r| r.status == 200 && r.body.is_ok()) {
                break;
            }
            assert!(Instant::now() < deadline, "kache did not recover: {r:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let replies = burst(addr, vec![list.clone(); WAITERS]).await;
        let bodies: BTreeSet<String> = replies
            .iter()
            .map(|r| {
                let r = r.as_ref().unwrap();
                assert_eq!(r.status, 200, "after recovery: {:?}", r.body);
                without_list_rv(r.json()).to_string()
            })
            .collect();
        assert_eq!(
            bodies.len(),
            1,
            "answers after recovery differ beyond the list's resourceVersion"
        );
    });
    kache.assert_running();
}

// ------------------------------------------------------- 6. SIGHUP reload ----

#[test]
fn limits_rewritten_in_the_config_file_apply_on_sighup() {
    const BURST_SIZE: usize = 10;
    let _serial = serial();
    let rt = runtime();
    let c = cluster();
    let ns = bulky_namespace(&rt, "limits-reload");
    let dir = tempfile::tempdir().unwrap();
    let config: PathBuf = dir.path().join("kache.yaml");
    write_config(
        &config,
        "  maxInFlight: 50\n  default: {maxInFlightPerClient: 2, queueLength: 0, queueTimeoutSeconds: 5}\n",
    );
    let mut kache =
        Kache::start_with_args(&c.admin_token_kubeconfig, &["--config", config.to_str().unwrap()]);
    let pid = kache_pid(&config);
    let (addr, admin) = (kache.addr(), kache.admin_addr());
    // Ten distinct slow-ish reads (~3 MB lists) from one client.
    let calls: Vec<Call> = (0..BURST_SIZE)
        .map(|i| {
            Call::get(format!(
                "/api/v1/namespaces/{ns}/configmaps?labelSelector=burst-{i}%21%3Dx"
            ))
            .header("user-agent", "bursty/1.0")
            .header("accept", "application/json")
        })
        .collect();
    let statuses = |replies: Vec<Result<Reply, String>>| -> BTreeMap<String, usize> {
        let mut by_kind = BTreeMap::new();
        for r in replies {
            *by_kind
                .entry(r.map_or_else(|e| format!("error: {e}"), |r| r.kind()))
                .or_default() += 1;
        }
        by_kind
    };

    // Two in flight, no queue: a burst of ten is partly refused.
    let first = rt.block_on(burst(addr, calls.clone()));
    let first = statuses(first);
    eprintln!("limits 2 per client, queue 0: {first:?}");
    assert!(
        first.get("429").is_some_and(|n| *n >= 1),
        "no 429 under 2 in flight per client, queue 0: {first:?}"
    );
    assert!(first.get("200").is_some_and(|n| *n >= 2), "{first:?}");

    write_config(
        &config,
        "  maxInFlight: 50\n  default: {maxInFlightPerClient: 20, queueLength: 50, queueTimeoutSeconds: 30}\n",
    );
    sighup_and_wait(&kache, pid, "limits reloaded");
    let rejected_before = rt.block_on(async { rejected_total(&metrics_text(admin).await) });
    for round in 0..3 {
        let replies = statuses(rt.block_on(burst(addr, calls.clone())));
        eprintln!("after SIGHUP (20 per client, queue 50), round {round}: {replies:?}");
        assert_eq!(
            replies.get("200"),
            Some(&BURST_SIZE),
            "round {round} after the reload: {replies:?}"
        );
    }
    let rejected_after = rt.block_on(async { rejected_total(&metrics_text(admin).await) });
    assert_eq!(
        rejected_after, rejected_before,
        "429s after the limits were raised"
    );

    // A broken file on SIGHUP leaves the last good limits in force.
    std::fs::write(&config, "limits: {maxInFlight: [not a number]}\n").unwrap();
    sighup_and_wait(&kache, pid, "configuration not reloaded");
    let replies = statuses(rt.block_on(burst(addr, calls.clone())));
    assert_eq!(
        replies.get("200"),
        Some(&BURST_SIZE),
        "after a failed reload: {replies:?}"
    );
    kache.assert_running();
}
