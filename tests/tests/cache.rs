//! The object cache against the real API server: kache's answers to
//! `resourceVersion=0` reads and to watches are compared with the API
//! server's own answers to the same requests (differential tests), and the
//! load kache takes off the API server is counted in its audit log.
//!
//! Requests through kache carry a User-Agent of their own ([`via_user_agent`],
//! one per kache, as the tests run in parallel), direct ones [`DIRECT_UA`].
//! kache forwards a client's User-Agent, so an audit line with a kache's
//! User-Agent is a read that kache did *not* answer from its cache; kache's
//! own reflector requests say `kache/<version>`.
//!
//! Every test but one shares the suite's API server with other test files:
//! they use namespaces, names, CRD groups and labels of their own, and count
//! only their own requests. The restart/410 test disturbs its API server, so
//! it starts a cluster of its own (`target/kache-cluster-restart`).

#![allow(clippy::unwrap_used)] // test helpers, not only #[test] fns (STYLE.md)

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::header::{ACCEPT, CONTENT_TYPE};
use http_body_util::BodyExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kache_tests::{
    client_with_user_agent, cluster, config_from_kubeconfig, http_get, kubectl, metric, rv_of, target_dir,
    unique_name, write_json, AuditLog, AuditMark, Kache, OwnCluster, TestNamespace,
};
use kube::api::Api;
use kube::client::Body;
use kube::runtime::{reflector, watcher, WatchStreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Prefix of the User-Agent of requests sent through kache.
const VIA_UA: &str = "kache-cache-test/via";
/// User-Agent of every request sent straight to the API server.
const DIRECT_UA: &str = "kache-cache-test/direct";
/// Bound on any wait for two caches to converge. Generous: the machine's two
/// cores are shared with builds and other test binaries.
const CONVERGE: Duration = Duration::from_secs(60);
/// Bound on one request, and on the wait for one watch event.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

// ------------------------------------------------------------- clients ----

/// The User-Agent of this test's requests through `kache`.
fn via_user_agent(kache: &Kache) -> String {
    format!("{VIA_UA}/{}", kache.addr().port())
}

/// A client of kache (plain HTTP, no credentials), User-Agent [`via_user_agent`].
fn via_client(kache: &Kache) -> kube::Client {
    client_with_user_agent(
        kube::Config::new(kache.url().parse().unwrap()),
        &via_user_agent(kache),
    )
}

/// A client of the API server with a kubeconfig's credentials, User-Agent [`DIRECT_UA`].
async fn direct_client(kubeconfig: &Path) -> kube::Client {
    client_with_user_agent(config_from_kubeconfig(kubeconfig).await, DIRECT_UA)
}

/// The same request asked of kache and of the API server.
#[derive(Clone)]
struct Sides {
    via: kube::Client,
    direct: kube::Client,
}

/// A whole answer.
#[derive(Debug, Clone)]
struct Reply {
    status: u16,
    content_type: String,
    body: Bytes,
}

impl Reply {
    #[track_caller]
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "the {} answer is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// `GET path` with extra headers; the whole answer, whatever its status.
async fn get(client: &kube::Client, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut request = http::Request::get(path);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let request = request.body(Body::empty()).unwrap();
    let response = tokio::time::timeout(REQUEST_TIMEOUT, client.send(request))
        .await
        .unwrap_or_else(|_| panic!("GET {path}: no answer within {REQUEST_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = tokio::time::timeout(REQUEST_TIMEOUT, response.into_body().collect_bytes())
        .await
        .unwrap_or_else(|_| panic!("GET {path}: body incomplete after {REQUEST_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("GET {path}: reading the body: {e}"));
    Reply {
        status,
        content_type,
        body,
    }
}

/// A JSON write straight to the API server (see [`write_json`]).
async fn write(client: &kube::Client, method: &str, path: &str, body: Option<&Value>) -> Value {
    write_json(client, method, path, body).await
}

fn name_of(v: &Value) -> &str {
    v["metadata"]["name"].as_str().unwrap_or_default()
}

fn namespace_of(v: &Value) -> &str {
    v["metadata"]["namespace"].as_str().unwrap_or_default()
}

fn key_of(v: &Value) -> (String, String) {
    (namespace_of(v).to_string(), name_of(v).to_string())
}

fn items(list: &Value) -> Vec<Value> {
    list["items"].as_array().cloned().unwrap_or_default()
}

/// (namespace/name@resourceVersion) of each item, for messages.
fn summary(items: &[Value]) -> Vec<String> {
    items
        .iter()
        .map(|i| format!("{}/{}@{}", namespace_of(i), name_of(i), rv_of(i)))
        .collect()
}

/// Percent-encodes a query value.
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// `path?k=v&…` with the values encoded; empty values are left out.
fn with_query(path: &str, params: &[(&str, &str)]) -> String {
    let query: Vec<String> = params
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("{k}={}", enc(v)))
        .collect();
    if query.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", query.join("&"))
    }
}

/// A resource's paths, and its label in kache's metrics.
#[derive(Debug, Clone)]
struct Res {
    group: String,
    version: String,
    plural: String,
    namespaced: bool,
}

impl Res {
    fn new(group: &str, version: &str, plural: &str, namespaced: bool) -> Res {
        Res {
            group: group.into(),
            version: version.into(),
            plural: plural.into(),
            namespaced,
        }
    }

    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    fn prefix(&self) -> String {
        if self.group.is_empty() {
            format!("/api/{}", self.version)
        } else {
            format!("/apis/{}/{}", self.group, self.version)
        }
    }

    /// The collection in `namespace`, or cluster-wide.
    fn collection(&self, namespace: Option<&str>) -> String {
        match namespace {
            Some(ns) => format!("{}/namespaces/{ns}/{}", self.prefix(), self.plural),
            None => format!("{}/{}", self.prefix(), self.plural),
        }
    }

    fn object(&self, namespace: Option<&str>, name: &str) -> String {
        format!("{}/{name}", self.collection(namespace))
    }

    /// `resource` label of `kache_cache_*` metrics.
    fn metric(&self) -> String {
        format!("{}/{}", self.api_version(), self.plural)
    }
}

// ------------------------------------------------------------- metrics ----

async fn kache_metrics(kache: &Kache) -> String {
    let r = http_get(&format!("http://{}/metrics", kache.admin_addr()), &[]).await;
    assert_eq!(r.status(), 200, "kache /metrics");
    String::from_utf8_lossy(r.body()).into_owned()
}

async fn cache_hits(kache: &Kache, res: &Res) -> f64 {
    metric(
        &kache_metrics(kache).await,
        "kache_cache_hits_total",
        &[("resource", &res.metric()), ("encoding", "json")],
    )
}

async fn cache_watchers(kache: &Kache, res: &Res) -> f64 {
    metric(
        &kache_metrics(kache).await,
        "kache_cache_watchers",
        &[("resource", &res.metric()), ("encoding", "json")],
    )
}

fn items_named(v: &Value) -> Vec<Value> {
    v.as_array().cloned().unwrap_or_default()
}

/// Polls until an rv=0 LIST of `path` through kache was answered from its
/// cache (its hit counter moved) and shows at least `at_least`.
async fn until_served_from_cache(
    kache: &Kache,
    via: &kube::Client,
    res: &Res,
    path: &str,
    at_least: u64,
) -> Value {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let before = cache_hits(kache, res).await;
        let reply = get(via, path, &[]).await;
        let after = cache_hits(kache, res).await;
        if reply.status == 200 && after > before && rv_of(&reply.json()) >= at_least {
            return reply.json();
        }
        assert!(
            Instant::now() < deadline,
            "{path} never answered from kache's cache (last: {} {})",
            reply.status,
            reply.text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ----------------------------------------------------------- audit log ----

/// The audit lines after `mark` (every stage: a watch has its `ResponseComplete`
/// line only when it ends), up to a sentinel request that shows every earlier line
/// written (the harness's `AuditMark::entries_after_sentinel`).
async fn audit_after_sentinel(mark: &AuditMark) -> Vec<Value> {
    let mark = mark.clone();
    tokio::task::spawn_blocking(move || mark.entries_after_sentinel())
        .await
        .unwrap()
}

/// The lines with the User-Agent `via_ua` after `mark` (see [`audit_after_sentinel`]):
/// requests through kache that it forwarded instead of answering from its cache.
async fn forwarded_by(mark: &AuditMark, via_ua: &str) -> Vec<Value> {
    let mut entries = audit_after_sentinel(mark).await;
    entries.retain(|e| audit_ua(e) == via_ua);
    entries
}

/// Like [`audit_after_sentinel`], keeping the lines that pass `filter`; first waits
/// (up to `timeout`) until at least `expected` of them are in the log, for requests
/// that end on their own time (a watch ends when kache goes).
async fn settled(
    mark: &AuditMark,
    expected: usize,
    timeout: Duration,
    filter: &dyn Fn(&Value) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + timeout;
    while mark.entries().iter().filter(|e| filter(e)).count() < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut entries = audit_after_sentinel(mark).await;
    entries.retain(|e| filter(e));
    entries
}

fn audit_uri(e: &Value) -> &str {
    e["requestURI"].as_str().unwrap_or_default()
}

fn audit_ua(e: &Value) -> &str {
    e["userAgent"].as_str().unwrap_or_default()
}

/// A request of kache's own (its reflector or discovery): user `admin`,
/// User-Agent `kache/<version>`.
fn by_kache(e: &Value) -> bool {
    e["user"]["username"] == "admin" && audit_ua(e).starts_with("kache/")
}

fn finished(e: &Value) -> bool {
    e["stage"] == "ResponseComplete"
}

fn started(e: &Value) -> bool {
    e["stage"] == "ResponseStarted"
}

fn brief(entries: &[Value]) -> Vec<String> {
    entries
        .iter()
        .map(|e| {
            format!(
                "{} {} {} ua={:?}",
                e["stage"],
                e["verb"],
                audit_uri(e),
                audit_ua(e)
            )
        })
        .collect()
}

// ----------------------------------------------------------- watching ----

/// A watch whose events are read as they arrive by a task of its own.
struct Watch {
    what: String,
    events: mpsc::UnboundedReceiver<Value>,
}

/// Starts a watch; panics unless it is answered 200.
async fn watch(client: &kube::Client, path: &str) -> Watch {
    let request = http::Request::get(path).body(Body::empty()).unwrap();
    let response = tokio::time::timeout(REQUEST_TIMEOUT, client.send(request))
        .await
        .unwrap_or_else(|_| panic!("WATCH {path}: no answer within {REQUEST_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("WATCH {path}: {e}"));
    let status = response.status();
    let mut body = response.into_body();
    if status != 200 {
        let text = body.collect_bytes().await.unwrap_or_default();
        panic!(
            "WATCH {path} answered {status}: {}",
            String::from_utf8_lossy(&text)
        );
    }
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut buffer = Vec::new();
        while let Some(Ok(frame)) = body.frame().await {
            let Ok(data) = frame.into_data() else { continue };
            buffer.extend_from_slice(&data);
            for line in kache_tests::take_lines(&mut buffer) {
                let event = serde_json::from_slice::<Value>(&line).unwrap_or_else(
                    |e| json!({"type": "UNPARSABLE", "error": e.to_string(), "line": String::from_utf8_lossy(&line)}),
                );
                if tx.send(event).is_err() {
                    return;
                }
            }
        }
    });
    Watch {
        what: path.to_string(),
        events: rx,
    }
}

impl Watch {
    /// The next event; `None` once the watch ended. Panics after `timeout`.
    async fn next_within(&mut self, timeout: Duration) -> Option<Value> {
        tokio::time::timeout(timeout, self.events.recv())
            .await
            .unwrap_or_else(|_| panic!("WATCH {}: no event within {timeout:?}", self.what))
    }

    /// The next event, `Err` on timeout, `Ok(None)` once the watch ended.
    async fn try_next(&mut self, timeout: Duration) -> Result<Option<Value>, ()> {
        tokio::time::timeout(timeout, self.events.recv())
            .await
            .map_err(|_| ())
    }

    /// Events up to and including the first that satisfies `last`, bookmarks left out.
    async fn until(&mut self, what: &str, mut last: impl FnMut(&Value) -> bool) -> Vec<Value> {
        let mut seen = Vec::new();
        loop {
            match self.next_within(REQUEST_TIMEOUT).await {
                Some(e) if e["type"] == "BOOKMARK" => {}
                Some(e) => {
                    let done = last(&e);
                    seen.push(e);
                    if done {
                        return seen;
                    }
                }
                None => panic!(
                    "WATCH {} ended before {what}; got {:?}",
                    self.what,
                    event_summary(&seen)
                ),
            }
        }
    }
}

/// (type, name, resourceVersion) of each event.
fn event_summary(events: &[Value]) -> Vec<(String, String, u64)> {
    events
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap_or_default().to_string(),
                name_of(&e["object"]).to_string(),
                rv_of(&e["object"]),
            )
        })
        .collect()
}

fn is_event(e: &Value, kind: &str, name: &str) -> bool {
    e["type"] == kind && name_of(&e["object"]) == name
}

// --------------------------------------------------------- differential ----

/// The differences a differential test found, each kind once with the
/// requests that showed it: one difference does not hide the others.
#[derive(Default)]
struct Findings(std::sync::Mutex<BTreeMap<String, Vec<String>>>);

impl Findings {
    fn record(&self, difference: String, request: &str) {
        self.0
            .lock()
            .unwrap()
            .entry(difference)
            .or_default()
            .push(request.to_string());
    }

    /// Fails the test with every difference found.
    #[track_caller]
    fn assert_none(&self) {
        let found = self.0.lock().unwrap();
        if found.is_empty() {
            return;
        }
        let report: Vec<String> = found
            .iter()
            .map(|(difference, requests)| {
                format!(
                    "* {difference}\n  in {} request(s), e.g. {}",
                    requests.len(),
                    requests
                        .iter()
                        .take(3)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join("\n    ")
                )
            })
            .collect();
        panic!(
            "kache's answers differ from the API server's:\n{}",
            report.join("\n")
        );
    }
}

/// Asserts that kache's items are in (namespace, name) order.
#[track_caller]
fn assert_sorted(items: &[Value], what: &str) {
    let keys: Vec<(String, String)> = items.iter().map(key_of).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(
        keys, sorted,
        "{what}: kache's items are not in (namespace, name) order"
    );
}

/// Polls until kache's and the API server's answers to the rv=0 LIST `path`
/// both reflect `at_least` (their list resourceVersion), then asserts they
/// are equal: kind, apiVersion, list metadata but its resourceVersion, and
/// the items `keep` selects, as sets (the API server's watch cache lists in no
/// particular order; kache's order is checked to be sorted). Returns those items.
async fn assert_same_list(
    sides: &Sides,
    path: &str,
    at_least: u64,
    keep: &dyn Fn(&Value) -> bool,
    findings: &Findings,
) -> Vec<Value> {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let (v, d) = tokio::join!(get(&sides.via, path, &[]), get(&sides.direct, path, &[]));
        assert_eq!(
            (v.status, d.status),
            (200, 200),
            "LIST {path}: via kache {} {}, direct {} {}",
            v.status,
            v.text(),
            d.status,
            d.text()
        );
        let (mut vj, mut dj) = (v.json(), d.json());
        let (vrv, drv) = (rv_of(&vj), rv_of(&dj));
        if vrv >= at_least && drv >= at_least {
            if v.content_type != d.content_type {
                findings.record(
                    format!(
                        "LIST Content-Type: via kache {:?}, direct {:?}",
                        v.content_type, d.content_type
                    ),
                    path,
                );
            }
            let (vi, di) = (items(&vj), items(&dj));
            assert_sorted(&vi, path);
            for list in [&mut vj, &mut dj] {
                let list = list.as_object_mut().unwrap();
                list.remove("items");
                if let Some(meta) = list.get_mut("metadata").and_then(Value::as_object_mut) {
                    meta.remove("resourceVersion");
                }
            }
            if vj != dj {
                findings.record(
                    format!("LIST outside its items (resourceVersion aside): via kache {vj}, direct {dj}"),
                    path,
                );
            }
            let vi: Vec<Value> = vi.into_iter().filter(|i| keep(i)).collect();
            let mut di: Vec<Value> = di.into_iter().filter(|i| keep(i)).collect();
            di.sort_by_key(key_of);
            if vi != di {
                let first = vi
                    .iter()
                    .zip(&di)
                    .find(|(a, b)| a != b)
                    .map(|(a, b)| format!("\nfirst difference:\nvia kache {a}\ndirect    {b}"))
                    .unwrap_or_default();
                findings.record(
                    format!(
                        "LIST items (both at ≥ {at_least}):\n  via kache {:?}\n  direct    {:?}{first}",
                        summary(&vi),
                        summary(&di)
                    ),
                    path,
                );
            }
            return vi;
        }
        assert!(
            Instant::now() < deadline,
            "LIST {path}: the caches never reached resourceVersion {at_least} (via kache {vrv}, direct {drv})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls until kache's and the API server's answers to the rv=0 GET `path`
/// both show the object at `expected` (its resourceVersion, at least), or both
/// are 404 for `None`; then asserts the answers are equal.
async fn assert_same_get(sides: &Sides, path: &str, expected: Option<u64>, findings: &Findings) {
    let deadline = Instant::now() + CONVERGE;
    let settled = |r: &Reply| match expected {
        Some(rv) => r.status == 200 && rv_of(&r.json()) >= rv,
        None => r.status == 404,
    };
    // Once the API server shows the state, kache gets a while longer to show it too.
    let mut direct_settled_at: Option<Instant> = None;
    loop {
        let (v, d) = tokio::join!(get(&sides.via, path, &[]), get(&sides.direct, path, &[]));
        if settled(&d) {
            let since = *direct_settled_at.get_or_insert_with(Instant::now);
            if !settled(&v) && since.elapsed() > Duration::from_secs(15) {
                findings.record(
                    format!(
                        "GET never answered as the API server does: via kache {} {}\n  direct {} {}",
                        v.status,
                        v.text().trim(),
                        d.status,
                        d.text().trim()
                    ),
                    path,
                );
                return;
            }
        }
        if settled(&v) && settled(&d) {
            if v.content_type != d.content_type {
                findings.record(
                    format!(
                        "GET Content-Type: via kache {:?}, direct {:?}",
                        v.content_type, d.content_type
                    ),
                    path,
                );
            }
            let (vj, dj) = (v.json(), d.json());
            if vj != dj {
                findings.record(format!("GET {}: via kache {vj}\n  direct {dj}", v.status), path);
            }
            return;
        }
        assert!(
            Instant::now() < deadline,
            "GET {path} never settled at {expected:?}: via kache {} {}, direct {} {}",
            v.status,
            v.text(),
            d.status,
            d.text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ----------------------------------------------------- cluster fixtures ----

/// A namespaced CustomResourceDefinition `widgets.<unique group>` (kind
/// `Widget`, any fields), deleted with its objects on drop.
struct Crd {
    res: Res,
    name: String,
}

impl Crd {
    async fn create(direct: &kube::Client, prefix: &str) -> Crd {
        let group = format!("{}.example.com", unique_name(prefix));
        let name = format!("widgets.{group}");
        let body = json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": name},
            "spec": {
                "group": group,
                "scope": "Namespaced",
                "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "listKind": "WidgetList"},
                "versions": [{
                    "name": "v1", "served": true, "storage": true,
                    "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}},
                }],
            },
        });
        let crds = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions";
        write(direct, "POST", crds, Some(&body)).await;
        let crd = Crd {
            res: Res::new(&group, "v1", "widgets", true),
            name,
        };
        let deadline = Instant::now() + CONVERGE;
        loop {
            let got = get(direct, &format!("{crds}/{}", crd.name), &[]).await.json();
            let established = got["status"]["conditions"].as_array().is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Established" && c["status"] == "True")
            });
            if established && get(direct, &crd.res.collection(None), &[]).await.status == 200 {
                return crd;
            }
            assert!(
                Instant::now() < deadline,
                "CRD {} never became established",
                crd.name
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until kache's discovery serves the CRD's group version, so that
    /// kache does not decide the resource is unknown (and forward it for a while).
    async fn until_discovered(&self, via: &kube::Client) {
        let path = self.res.prefix();
        let deadline = Instant::now() + CONVERGE;
        loop {
            let r = get(via, &path, &[]).await;
            if r.status == 200
                && items_named(&r.json()["resources"])
                    .iter()
                    .any(|x| x["name"] == "widgets")
            {
                return;
            }
            assert!(Instant::now() < deadline, "kache's discovery never served {path}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn widget(&self, namespace: &str, name: &str, labels: Value) -> Value {
        json!({
            "apiVersion": self.res.api_version(),
            "kind": "Widget",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"size": name.len(), "colour": "blue"},
        })
    }
}

impl Drop for Crd {
    fn drop(&mut self) {
        let out = kubectl(
            &cluster().admin_kubeconfig,
            &["delete", "crd", &self.name, "--wait=false", "--ignore-not-found"],
        );
        if !out.success() {
            eprintln!("cleanup: deleting CRD {} failed: {}", self.name, out.stderr);
        }
    }
}

/// Cluster-scoped objects to delete on drop (`kubectl delete KIND NAME…`).
struct Cleanup {
    kind: &'static str,
    names: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if self.names.is_empty() {
            return;
        }
        let mut args = vec!["delete", self.kind];
        args.extend(self.names.iter().map(String::as_str));
        args.extend(["--wait=false", "--ignore-not-found"]);
        let out = kubectl(&cluster().admin_kubeconfig, &args);
        if !out.success() {
            eprintln!(
                "cleanup: deleting {} {:?} failed: {}",
                self.kind, self.names, out.stderr
            );
        }
    }
}

// ===================================================== 1. LIST and GET ====

const LABEL_SELECTORS: &[&str] = &[
    "",
    "tier=front",
    "tier==front",
    "tier!=front",
    "tier in (front,back)",
    "tier notin (front)",
    "tier",
    "!tier",
    "tier=front,track=stable",
    "tier,!track",
    "track in (stable,canary),tier notin (back)",
    "tier in (cache)",
    "tier=nowhere",
];

/// Field selectors every pod supports, besides metadata.name/namespace (v1.20's
/// `pod.ToSelectableFields`).
const POD_FIELD_SELECTORS: &[&str] = &[
    "spec.nodeName=node-a",
    "spec.nodeName==node-a",
    "spec.nodeName=",
    "spec.nodeName!=node-a",
    "spec.nodeName!=",
    "status.phase=Pending",
    "status.phase=Running",
    "status.phase!=Pending",
    "spec.nodeName=node-a,status.phase=Running",
    "spec.nodeName=node-b,metadata.name!=c",
    "spec.restartPolicy=Always",
    "spec.restartPolicy=Never",
    "spec.schedulerName=default-scheduler",
    "spec.serviceAccountName=",
    "status.podIP=",
    "status.nominatedNodeName=",
];

/// Builds the object to create from its namespace, name and labels.
type MakeObject<'a> = Box<dyn Fn(Option<&str>, &str, Value) -> Value + Send + Sync + 'a>;

/// The objects of one resource that [`exercise`] creates: per scope, `a`…`f`.
struct Scenario<'a> {
    res: Res,
    /// Namespaces of a namespaced resource; `[None]` for a cluster-scoped one.
    scopes: Vec<Option<&'a str>>,
    /// Prefix of the names (cluster-scoped objects need unique names).
    prefix: String,
    /// Label every object gets, to find ours in cluster-wide lists.
    run: (String, String),
    /// The object to create, from its name and labels.
    make: MakeObject<'a>,
    /// Field selectors particular to the resource.
    fields: Vec<String>,
}

impl Scenario<'_> {
    fn name(&self, short: &str) -> String {
        format!("{}{short}", self.prefix)
    }

    fn ours(&self, item: &Value) -> bool {
        item["metadata"]["labels"][&self.run.0] == self.run.1.as_str()
    }
}

/// Creates, updates and deletes objects of one resource directly, then
/// compares kache's rv=0 LISTs (label and field selectors, namespaced and
/// cluster-wide) and GETs (present and missing objects) with the API
/// server's. Returns how many reads were compared.
async fn exercise(sides: &Sides, s: &Scenario<'_>, findings: &Findings) -> usize {
    let res = &s.res;
    let direct = &sides.direct;
    // name → resourceVersion of its last write (None: deleted).
    let mut state: BTreeMap<(Option<&str>, String), Option<u64>> = BTreeMap::new();
    let run = json!({ &s.run.0: &s.run.1 });
    let with_run = |labels: Value| {
        let mut l = run.clone();
        l.as_object_mut()
            .unwrap()
            .extend(labels.as_object().unwrap().clone());
        l
    };
    let initial = [
        ("a", json!({"tier": "front", "track": "stable"})),
        ("b", json!({"tier": "back"})),
        ("c", json!({"tier": "front", "track": "canary"})),
        ("d", json!({})),
        ("e", json!({"track": "stable"})),
    ];
    for &scope in &s.scopes {
        for (short, labels) in &initial {
            let name = s.name(short);
            let created = write(
                direct,
                "POST",
                &res.collection(scope),
                Some(&(s.make)(scope, &name, with_run(labels.clone()))),
            )
            .await;
            state.insert((scope, name), Some(rv_of(&created)));
        }
    }
    let mut changes: Vec<(&str, Value)> = vec![
        ("b", json!({"metadata": {"labels": {"tier": "front"}}})),
        ("c", json!({"metadata": {"labels": {"track": null}}})),
    ];
    if res.plural == "pods" {
        // No kubelet runs: set phases by hand, through the status subresource.
        changes.push(("a/status", json!({"status": {"phase": "Running"}})));
        changes.push(("d/status", json!({"status": {"phase": "Succeeded"}})));
    }
    for &scope in &s.scopes {
        for (short, patch) in &changes {
            let (short, sub) = short.split_once('/').unwrap_or((short, ""));
            let name = s.name(short);
            let mut path = res.object(scope, &name);
            if !sub.is_empty() {
                path = format!("{path}/{sub}");
            }
            let updated = write(direct, "PATCH", &path, Some(patch)).await;
            state.insert((scope, name), Some(rv_of(&updated)));
        }
        let e = s.name("e");
        write(direct, "DELETE", &res.object(scope, &e), None).await;
        state.insert((scope, e), None);
        let f = s.name("f");
        let created = write(
            direct,
            "POST",
            &res.collection(scope),
            Some(&(s.make)(scope, &f, with_run(json!({"tier": "cache"})))),
        )
        .await;
        state.insert((scope, f), Some(rv_of(&created)));
    }
    // A last write, after the deletes: once a cache is at its version, it has
    // seen every change above (a resource's events are applied in order).
    let last_scope = *s.scopes.last().unwrap();
    let a = s.name("a");
    let touched = write(
        direct,
        "PATCH",
        &res.object(last_scope, &a),
        Some(&json!({"metadata": {"annotations": {"touched": "yes"}}})),
    )
    .await;
    let last_rv = rv_of(&touched);
    state.insert((last_scope, a), Some(last_rv));

    let mut compared = 0;
    let namespaces: BTreeSet<&str> = s.scopes.iter().flatten().copied().collect();
    let ours_here =
        |item: &Value| s.ours(item) && (!res.namespaced || namespaces.contains(namespace_of(item)));
    let mut scopes: Vec<Option<&str>> = s.scopes.clone();
    if res.namespaced {
        scopes.push(None);
    }
    let mut field_selectors: Vec<String> = vec![
        String::new(),
        format!("metadata.name={}", s.name("a")),
        format!("metadata.name!={}", s.name("a")),
        format!("metadata.name=={}", s.name("b")),
        format!("metadata.name={}", s.name("e")),
    ];
    if res.namespaced {
        let first = s.scopes[0].unwrap();
        let last = last_scope.unwrap();
        field_selectors.extend([
            format!("metadata.namespace={first}"),
            format!("metadata.namespace!={first}"),
            format!("metadata.namespace={last},metadata.name={}", s.name("c")),
        ]);
    }
    field_selectors.extend(s.fields.iter().cloned());
    for &scope in &scopes {
        let collection = res.collection(scope);
        for label in LABEL_SELECTORS {
            let path = with_query(&collection, &[("resourceVersion", "0"), ("labelSelector", label)]);
            let got = assert_same_list(sides, &path, last_rv, &ours_here, findings).await;
            if label.is_empty() && scope.is_some() {
                let expected: Vec<String> = state
                    .iter()
                    .filter(|((sc, _), rv)| *sc == scope && rv.is_some())
                    .map(|((_, n), _)| n.clone())
                    .collect();
                let names: Vec<String> = got.iter().map(|i| name_of(i).to_string()).collect();
                assert_eq!(names, expected, "{path}: not the objects written");
            }
            compared += 1;
        }
        for field in &field_selectors {
            let path = with_query(&collection, &[("resourceVersion", "0"), ("fieldSelector", field)]);
            assert_same_list(sides, &path, last_rv, &ours_here, findings).await;
            compared += 1;
        }
        // Both kinds of selector at once, and the `limit` an informer sends
        // (ignored at resourceVersion=0).
        let path = with_query(
            &collection,
            &[
                ("resourceVersion", "0"),
                ("labelSelector", "tier in (front,cache)"),
                ("fieldSelector", &format!("metadata.name!={}", s.name("c"))),
                ("limit", "2"),
            ],
        );
        assert_same_list(sides, &path, last_rv, &ours_here, findings).await;
        compared += 1;
    }
    // Our objects in cluster-wide lists, restricted by our label.
    let path = with_query(
        &res.collection(None),
        &[
            ("resourceVersion", "0"),
            ("labelSelector", &format!("{}={},tier", s.run.0, s.run.1)),
        ],
    );
    let got = assert_same_list(sides, &path, last_rv, &|_| true, findings).await;
    assert!(!got.is_empty(), "{path}: none of our objects");
    compared += 1;

    for ((scope, name), rv) in &state {
        let path = format!("{}?resourceVersion=0", res.object(*scope, name));
        assert_same_get(sides, &path, *rv, findings).await;
        compared += 1;
    }
    let missing = format!(
        "{}?resourceVersion=0",
        res.object(last_scope, &s.name("never-was"))
    );
    assert_same_get(sides, &missing, None, findings).await;
    compared + 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rv0_lists_and_gets_through_kache_equal_the_api_servers_answers() {
    let c = cluster();
    let (ns1, ns2) = (
        TestNamespace::create("cache-diff"),
        TestNamespace::create("cache-diff"),
    );
    let direct = direct_client(&c.admin_kubeconfig).await;
    // The CRD exists before kache starts, so its discovery knows it from the start.
    let crd = Crd::create(&direct, "kache-diff").await;
    let kache = Kache::start(&c.admin_kubeconfig);
    let via_ua = via_user_agent(&kache);
    let sides = Sides {
        via: via_client(&kache),
        direct: direct.clone(),
    };
    crd.until_discovered(&sides.via).await;
    let run = ("kache-cache-test".to_string(), unique_name("run"));
    let scopes = vec![Some(ns1.name()), Some(ns2.name())];

    let configmaps = Res::new("", "v1", "configmaps", true);
    let pods = Res::new("", "v1", "pods", true);
    let clusterroles = Res::new("rbac.authorization.k8s.io", "v1", "clusterroles", false);
    let namespaces = Res::new("", "v1", "namespaces", false);
    let scenarios = vec![
        Scenario {
            res: configmaps.clone(),
            scopes: scopes.clone(),
            prefix: String::new(),
            run: run.clone(),
            make: Box::new(|_, name, labels| {
                json!({"apiVersion": "v1", "kind": "ConfigMap",
                       "metadata": {"name": name, "labels": labels}, "data": {"name": name}})
            }),
            fields: vec![],
        },
        Scenario {
            res: pods.clone(),
            scopes: scopes.clone(),
            prefix: String::new(),
            run: run.clone(),
            make: Box::new(|_, name, labels| {
                let mut pod = json!({
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": name, "labels": labels},
                    "spec": {"containers": [{"name": "c", "image": "registry.k8s.io/pause:3.9"}]},
                });
                // Pods bound to (nonexistent) nodes; the others stay unscheduled.
                let node = match name {
                    "a" | "f" => Some("node-a"),
                    "c" => Some("node-b"),
                    _ => None,
                };
                if let Some(node) = node {
                    pod["spec"]["nodeName"] = json!(node);
                }
                if name == "b" {
                    pod["spec"]["restartPolicy"] = json!("Never");
                }
                pod
            }),
            fields: POD_FIELD_SELECTORS.iter().map(|f| f.to_string()).collect(),
        },
        Scenario {
            res: crd.res.clone(),
            scopes: scopes.clone(),
            prefix: String::new(),
            run: run.clone(),
            make: Box::new(|scope, name, labels| crd.widget(scope.unwrap(), name, labels)),
            fields: vec![],
        },
        Scenario {
            res: clusterroles.clone(),
            scopes: vec![None],
            prefix: format!("{}-", run.1),
            run: run.clone(),
            make: Box::new(|_, name, labels| {
                json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                       "metadata": {"name": name, "labels": labels},
                       "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}]})
            }),
            fields: vec![],
        },
    ];
    let _cleanup = Cleanup {
        kind: "clusterroles",
        names: ["a", "b", "c", "d", "e", "f"]
            .iter()
            .map(|n| format!("{}-{n}", run.1))
            .collect(),
    };

    // The stores start on first use: once each resource has been answered
    // from kache's cache, nothing that follows may reach the API server.
    for res in [&configmaps, &pods, &crd.res, &clusterroles, &namespaces] {
        let path = format!("{}?resourceVersion=0", res.collection(None));
        until_served_from_cache(&kache, &sides.via, res, &path, 0).await;
    }
    let audit = c.audit().mark();
    let hits_before = cache_hits(&kache, &configmaps).await;

    let findings = Findings::default();
    let mut compared = 0;
    for s in &scenarios {
        compared += exercise(&sides, s, &findings).await;
    }

    // Namespaces (cluster-scoped, with a field of their own): ours, labelled.
    let mut last_rv = 0;
    for ns in [&ns1, &ns2] {
        let patched = write(
            &direct,
            "PATCH",
            &namespaces.object(None, ns.name()),
            Some(&json!({"metadata": {"labels": {&run.0: &run.1}}})),
        )
        .await;
        last_rv = last_rv.max(rv_of(&patched));
    }
    // ns2 was patched last: its version is last_rv.
    let ours = |i: &Value| i["metadata"]["labels"][&run.0] == run.1.as_str();
    for (label, field) in [
        (format!("{}={}", run.0, run.1), String::new()),
        (String::new(), format!("metadata.name={}", ns1.name())),
        (String::new(), "status.phase=Active".to_string()),
        (run.0.clone(), "status.phase!=Terminating".to_string()),
        (String::new(), String::new()),
    ] {
        let path = with_query(
            &namespaces.collection(None),
            &[
                ("resourceVersion", "0"),
                ("labelSelector", &label),
                ("fieldSelector", &field),
            ],
        );
        assert_same_list(&sides, &path, last_rv, &ours, &findings).await;
        compared += 1;
    }
    for (name, expected) in [(ns2.name(), Some(last_rv)), ("kache-no-such-namespace", None)] {
        let path = format!("{}?resourceVersion=0", namespaces.object(None, name));
        assert_same_get(&sides, &path, expected, &findings).await;
        compared += 1;
    }

    // Served from the cache: the hit counter moved, and no read of ours
    // reached the API server (kache forwards the client's User-Agent).
    let hits = cache_hits(&kache, &configmaps).await - hits_before;
    assert!(hits >= 40.0, "only {hits} configmap reads were cache hits");
    let logged = audit_after_sentinel(&audit).await;
    let forwarded: Vec<Value> = logged.iter().filter(|e| audit_ua(e) == via_ua).cloned().collect();
    assert!(
        forwarded.is_empty(),
        "{} of {compared} reads through kache reached the API server:\n{:#?}",
        forwarded.len(),
        brief(&forwarded)
    );
    // Nor did kache relist any of them (its reflectors list cluster-wide; our CRD is ours alone).
    let relists: Vec<Value> = logged
        .into_iter()
        .filter(|e| {
            finished(e) && e["verb"] == "list" && by_kache(e) && audit_uri(e).starts_with(&crd.res.prefix())
        })
        .collect();
    assert!(relists.is_empty(), "kache relisted: {:#?}", brief(&relists));
    eprintln!("compared {compared} reads; {hits} configmap cache hits");
    findings.assert_none();
}

// ============================================================ 2. WATCH ====

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_through_kache_deliver_what_direct_watches_deliver() {
    let c = cluster();
    let ns = TestNamespace::create("cache-watch");
    let kache = Kache::start(&c.admin_kubeconfig);
    let via_ua = via_user_agent(&kache);
    let direct = direct_client(&c.admin_kubeconfig).await;
    let sides = Sides {
        via: via_client(&kache),
        direct: direct.clone(),
    };
    let cms = Res::new("", "v1", "configmaps", true);
    let coll = cms.collection(Some(ns.name()));
    let cm = |name: &str, x: Option<&str>| {
        let labels = x.map_or(json!({}), |x| json!({ "x": x }));
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "labels": labels}, "data": {"v": "1"}})
    };
    for name in ["pre-1", "pre-2"] {
        write(&direct, "POST", &coll, Some(&cm(name, Some("1")))).await;
    }
    let list =
        until_served_from_cache(&kache, &sides.via, &cms, &format!("{coll}?resourceVersion=0"), 0).await;
    let rv = rv_of(&list).to_string();
    let audit = c.audit().mark();

    let paths = [
        with_query(&coll, &[("watch", "true"), ("resourceVersion", &rv)]),
        with_query(
            &coll,
            &[
                ("watch", "true"),
                ("resourceVersion", &rv),
                ("labelSelector", "x=1"),
            ],
        ),
        with_query(
            &coll,
            &[
                ("watch", "true"),
                ("resourceVersion", &rv),
                ("labelSelector", "x notin (2)"),
            ],
        ),
    ];
    let mut watches = Vec::new();
    for path in &paths {
        watches.push((watch(&sides.via, path).await, watch(&sides.direct, path).await));
    }
    let watchers = cache_watchers(&kache, &cms).await;
    assert_eq!(watchers, 3.0, "kache serves the three watches from its cache");

    // Objects leave and re-enter the selector x=1.
    let obj = |name: &str| cms.object(Some(ns.name()), name);
    let labels = |x: Value| json!({"metadata": {"labels": {"x": x}}});
    write(&direct, "POST", &coll, Some(&cm("a", Some("1")))).await;
    write(&direct, "POST", &coll, Some(&cm("b", Some("2")))).await;
    write(&direct, "PATCH", &obj("a"), Some(&labels(json!("2")))).await; // a leaves
    write(&direct, "PATCH", &obj("a"), Some(&labels(json!("1")))).await; // a re-enters
    write(&direct, "PATCH", &obj("b"), Some(&labels(json!("1")))).await; // b enters
    write(&direct, "PATCH", &obj("a"), Some(&json!({"data": {"v": "2"}}))).await; // stays
    write(&direct, "DELETE", &obj("a"), None).await;
    write(&direct, "PATCH", &obj("b"), Some(&labels(Value::Null))).await; // b leaves
    write(&direct, "DELETE", &obj("b"), None).await;
    write(&direct, "DELETE", &obj("pre-1"), None).await;
    write(&direct, "POST", &coll, Some(&cm("zz-end", Some("1")))).await;

    let mut sequences = Vec::new();
    for ((via, direct), path) in watches.iter_mut().zip(&paths) {
        let end = |e: &Value| is_event(e, "ADDED", "zz-end");
        let (v, d) = (via.until("zz-end", end).await, direct.until("zz-end", end).await);
        assert_eq!(
            event_summary(&v),
            event_summary(&d),
            "{path}: (type, name, resourceVersion) of the events differ (left: via kache)"
        );
        assert_eq!(v, d, "{path}: the events differ (left: via kache)");
        sequences.push(event_summary(&v));
    }
    let types = |s: &[(String, String, u64)]| -> Vec<String> {
        s.iter().map(|(t, n, _)| format!("{t} {n}")).collect()
    };
    assert_eq!(
        types(&sequences[0]),
        [
            "ADDED a",
            "ADDED b",
            "MODIFIED a",
            "MODIFIED a",
            "MODIFIED b",
            "MODIFIED a",
            "DELETED a",
            "MODIFIED b",
            "DELETED b",
            "DELETED pre-1",
            "ADDED zz-end"
        ]
    );
    assert_eq!(
        types(&sequences[1]),
        [
            "ADDED a",
            "DELETED a",
            "ADDED a",
            "ADDED b",
            "MODIFIED a",
            "DELETED a",
            "DELETED b",
            "DELETED pre-1",
            "ADDED zz-end"
        ],
        "selector x=1: leaving is DELETED, entering is ADDED"
    );

    // resourceVersion=0: the current objects as ADDED first (in no particular order).
    let zz = get(&direct, &obj("zz-end"), &[]).await.json();
    let findings = Findings::default();
    assert_same_list(
        &sides,
        &format!("{coll}?resourceVersion=0"),
        rv_of(&zz),
        &|_| true,
        &findings,
    )
    .await;
    findings.assert_none();
    for selector in ["", "x=1"] {
        let path = with_query(
            &coll,
            &[
                ("watch", "true"),
                ("resourceVersion", "0"),
                ("labelSelector", selector),
            ],
        );
        let (mut v, mut d) = (watch(&sides.via, &path).await, watch(&sides.direct, &path).await);
        let sentinel = format!("zz-sentinel-{}", selector.len());
        write(&direct, "POST", &coll, Some(&cm(&sentinel, Some("1")))).await;
        let end = |e: &Value| is_event(e, "ADDED", &sentinel);
        let (mut ve, mut de) = (
            event_summary(&v.until(&sentinel, end).await),
            event_summary(&d.until(&sentinel, end).await),
        );
        assert_eq!(ve.last(), de.last(), "{path}");
        ve.sort();
        de.sort();
        assert_eq!(ve, de, "{path}: the initial events differ (left: via kache)");
        assert!(ve.iter().all(|(t, _, _)| t == "ADDED"), "{path}: {ve:?}");
        assert!(ve.iter().any(|(_, n, _)| n == "zz-end"), "{path}: {ve:?}");
    }

    let forwarded = forwarded_by(&audit, &via_ua).await;
    assert!(
        forwarded.is_empty(),
        "watches reached the API server: {:#?}",
        brief(&forwarded)
    );
}

// ============================================================= 3. LOAD ====

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_lists_and_fifty_watches_cost_the_api_server_one_list_and_one_watch() {
    const CLIENTS: usize = 50;
    const OBJECTS: usize = 20;
    let c = cluster();
    let ns = TestNamespace::create("cache-load");
    let direct = direct_client(&c.admin_kubeconfig).await;
    let crd = Crd::create(&direct, "kache-load").await;
    for i in 0..OBJECTS {
        let w = crd.widget(ns.name(), &format!("w-{i:02}"), json!({"i": i.to_string()}));
        write(&direct, "POST", &crd.res.collection(Some(ns.name())), Some(&w)).await;
    }
    // A first list waits for the store to sync instead of being forwarded: the
    // default (3 s) can pass on a busy machine, and this test counts LISTs.
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(config.path(), "cache:\n  syncTimeoutSeconds: 60\n").unwrap();
    let kache = Kache::start_with_args(
        &c.admin_kubeconfig,
        &["--config", config.path().to_str().unwrap()],
    );
    crd.until_discovered(&via_client(&kache)).await;
    let via_ua = via_user_agent(&kache);

    let group_metric = |text: &str, verb: &str| {
        metric(
            text,
            "apiserver_request_total",
            &[("group", &crd.res.group), ("resource", "widgets"), ("verb", verb)],
        )
    };
    let before = get(&direct, "/metrics", &[]).await.text();
    let audit = c.audit().mark();
    let upstream = |verb: &'static str| {
        let prefix = crd.res.prefix() + "/";
        move |e: &Value| e["verb"] == verb && audit_uri(e).starts_with(&prefix)
    };

    let cluster_wide = format!("{}?resourceVersion=0", crd.res.collection(None));
    let namespaced = format!("{}?resourceVersion=0", crd.res.collection(Some(ns.name())));
    let mut lists = Vec::new();
    let mut watches = Vec::new();
    for i in 0..CLIENTS {
        let client = via_client(&kache);
        let path = if i % 2 == 0 {
            cluster_wide.clone()
        } else {
            namespaced.clone()
        };
        lists.push(tokio::spawn(async move { get(&client, &path, &[]).await }));
        let client = via_client(&kache);
        let path = format!(
            "{}&watch=true",
            if i % 2 == 0 { &cluster_wide } else { &namespaced }
        );
        watches.push(tokio::spawn(async move {
            let mut w = watch(&client, &path).await;
            let mut n = 0;
            let initial = w
                .until("the initial objects", |_| {
                    n += 1;
                    n == OBJECTS
                })
                .await;
            (initial, w)
        }));
    }
    for (i, list) in futures::future::join_all(lists).await.into_iter().enumerate() {
        let reply = list.unwrap();
        assert_eq!(reply.status, 200, "client {i}: {}", reply.text());
        let got = reply.json();
        let names: BTreeSet<String> = items(&got).iter().map(|i| name_of(i).to_string()).collect();
        assert_eq!(
            names.len(),
            OBJECTS,
            "client {i} did not get the full list: {names:?}"
        );
        assert_eq!(got["kind"], "WidgetList");
    }
    let mut open = Vec::new();
    for (i, w) in futures::future::join_all(watches).await.into_iter().enumerate() {
        let (initial, w) = w.unwrap();
        let mut kinds: Vec<(String, String, u64)> = event_summary(&initial);
        kinds.sort();
        kinds.dedup();
        assert_eq!(kinds.len(), OBJECTS, "watch {i}: {kinds:?}");
        assert!(kinds.iter().all(|(t, _, _)| t == "ADDED"), "watch {i}: {kinds:?}");
        open.push(w);
    }
    // One change reaches every watcher.
    let late = crd.widget(ns.name(), "late", json!({}));
    write(&direct, "POST", &crd.res.collection(Some(ns.name())), Some(&late)).await;
    for w in &mut open {
        w.until("ADDED late", |e| is_event(e, "ADDED", "late")).await;
    }

    let logged = audit_after_sentinel(&audit).await;
    let upstream_lists: Vec<Value> = logged
        .iter()
        .filter(|e| finished(e) && upstream("list")(e))
        .cloned()
        .collect();
    assert_eq!(
        upstream_lists.len(),
        1,
        "{CLIENTS} LISTs through kache: {:#?}",
        brief(&upstream_lists)
    );
    assert!(by_kache(&upstream_lists[0]), "{:#?}", brief(&upstream_lists));
    let via: Vec<Value> = logged.iter().filter(|e| audit_ua(e) == via_ua).cloned().collect();
    assert!(
        via.is_empty(),
        "client requests reached the API server: {:#?}",
        brief(&via)
    );
    let crd_gets: Vec<Value> = logged
        .iter()
        .filter(|e| finished(e) && audit_uri(e).contains(&crd.name))
        .cloned()
        .collect();
    eprintln!(
        "kache's own GETs of the CRD while {CLIENTS}+{CLIENTS} clients arrived: {}",
        crd_gets.len()
    );

    // The API server's own counters agree. LISTs are counted as they end; a
    // watch is counted (and audited, even its ResponseStarted line) only when
    // it ends, so open watches are seen in the gauges.
    let after = get(&direct, "/metrics", &[]).await.text();
    assert_eq!(
        group_metric(&after, "LIST") - group_metric(&before, "LIST"),
        1.0,
        "apiserver_request_total LIST for {}",
        crd.res.group
    );
    let registered = metric(
        &after,
        "apiserver_registered_watchers",
        &[("group", &crd.res.group), ("kind", "Widget")],
    );
    assert_eq!(
        registered, 1.0,
        "apiserver_registered_watchers for {}",
        crd.res.group
    );
    let long_running = metric(
        &after,
        "apiserver_longrunning_gauge",
        &[
            ("group", &crd.res.group),
            ("resource", "widgets"),
            ("verb", "WATCH"),
        ],
    );
    assert_eq!(
        long_running, 1.0,
        "apiserver_longrunning_gauge WATCH for {}",
        crd.res.group
    );

    // Stopping kache ends its one upstream watch: now the audit log shows it.
    drop(open);
    drop(kache);
    let upstream_watches = settled(&audit, 1, REQUEST_TIMEOUT, &|e| {
        finished(e) && upstream("watch")(e)
    })
    .await;
    assert_eq!(
        upstream_watches.len(),
        1,
        "{CLIENTS} watches through kache: {:#?}",
        brief(&upstream_watches)
    );
    assert!(by_kache(&upstream_watches[0]), "{:#?}", brief(&upstream_watches));
}

// ======================================================= 4. INFORMERS ====

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_runtime_reflector_and_client_go_informer_through_kache_converge_to_the_api_server() {
    let c = cluster();
    let ns = TestNamespace::create("cache-informer");
    let kache = Kache::start(&c.admin_kubeconfig);
    let via_ua = via_user_agent(&kache);
    let direct = direct_client(&c.admin_kubeconfig).await;
    let via = via_client(&kache);
    let cms = Res::new("", "v1", "configmaps", true);
    let coll = cms.collection(Some(ns.name()));
    let cm = |name: &str, v: &str| json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"v": v}});
    for i in 0..5 {
        write(&direct, "POST", &coll, Some(&cm(&format!("cm-{i}"), "0"))).await;
    }
    // The truth: a consistent LIST straight from the API server.
    let truth = || async {
        let list = get(&direct, &coll, &[]).await.json();
        items(&list)
            .iter()
            .map(|i| (name_of(i).to_string(), rv_of(i)))
            .collect::<BTreeMap<String, u64>>()
    };
    let hits_before = cache_hits(&kache, &cms).await;
    let audit = c.audit().mark();

    // kube-runtime's reflector, listing at resourceVersion=0 (`any_semantic`).
    // kube-core leaves `resourceVersion=0` out of a LIST that has a `limit`
    // (kube-runtime's default page size is 500): that is a consistent read,
    // which kache rightly forwards. Without pagination it asks for rv=0.
    let api: Api<ConfigMap> = Api::namespaced(via.clone(), ns.name());
    let (store, writer) = reflector::store::<ConfigMap>();
    let mut config = watcher::Config::default().any_semantic();
    config.page_size = None;
    let stream = reflector::reflector(writer, watcher(api, config));
    let task = tokio::spawn(stream.applied_objects().for_each(|_| async {}));
    let reflected = || {
        store
            .state()
            .iter()
            .map(|cm| {
                (
                    cm.metadata.name.clone().unwrap_or_default(),
                    cm.metadata
                        .resource_version
                        .as_deref()
                        .and_then(|r| r.parse().ok())
                        .unwrap_or(0u64),
                )
            })
            .collect::<BTreeMap<String, u64>>()
    };
    let converge = |what: &'static str| {
        let truth = &truth;
        let reflected = &reflected;
        async move {
            let deadline = Instant::now() + CONVERGE;
            loop {
                let (want, have) = (truth().await, reflected());
                if want == have {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "{what}: the reflector never converged:\nreflector {have:?}\nAPI server {want:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    converge("initial list").await;
    write(&direct, "POST", &coll, Some(&cm("new", "1"))).await;
    write(
        &direct,
        "PATCH",
        &cms.object(Some(ns.name()), "cm-1"),
        Some(&json!({"data": {"v": "2"}})),
    )
    .await;
    write(&direct, "DELETE", &cms.object(Some(ns.name()), "cm-2"), None).await;
    converge("after create, update, delete").await;

    // client-go's informer, by hand: LIST ?limit=500&resourceVersion=0, then
    // WATCH from the list's version with bookmarks; apply the events.
    let list = get(&via, &format!("{coll}?limit=500&resourceVersion=0"), &[]).await;
    assert_eq!(list.status, 200, "{}", list.text());
    let list = list.json();
    assert_eq!(
        list["metadata"].get("continue"),
        None,
        "rv=0 lists are not paginated"
    );
    let mut local: BTreeMap<String, u64> = items(&list)
        .iter()
        .map(|i| (name_of(i).to_string(), rv_of(i)))
        .collect();
    let mut informer = watch(
        &via,
        &format!(
            "{coll}?allowWatchBookmarks=true&resourceVersion={}&timeoutSeconds=60&watch=true",
            rv_of(&list)
        ),
    )
    .await;
    for i in 0..3 {
        write(&direct, "POST", &coll, Some(&cm(&format!("late-{i}"), "1"))).await;
    }
    write(&direct, "DELETE", &cms.object(Some(ns.name()), "cm-0"), None).await;
    write(
        &direct,
        "PATCH",
        &cms.object(Some(ns.name()), "new"),
        Some(&json!({"data": {"v": "3"}})),
    )
    .await;
    let deadline = Instant::now() + CONVERGE;
    loop {
        let want = truth().await;
        if local == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the informer never converged:\ninformer {local:?}\nAPI server {want:?}"
        );
        match informer.try_next(Duration::from_millis(500)).await {
            Ok(Some(e)) => {
                let o = &e["object"];
                match e["type"].as_str().unwrap_or_default() {
                    "ADDED" | "MODIFIED" => {
                        local.insert(name_of(o).to_string(), rv_of(o));
                    }
                    "DELETED" => {
                        local.remove(name_of(o));
                    }
                    "BOOKMARK" => assert!(rv_of(o) >= rv_of(&list), "bookmark {e}"),
                    _ => panic!("unexpected event {e}"),
                }
            }
            Ok(None) => panic!("the informer's watch ended"),
            Err(()) => {}
        }
    }
    converge("the reflector too").await;
    task.abort();

    // Both were served by kache: hits, and none of their requests upstream.
    let hits = cache_hits(&kache, &cms).await - hits_before;
    assert!(hits >= 4.0, "only {hits} cache hits for 2 lists and 2 watches");
    let forwarded = forwarded_by(&audit, &via_ua).await;
    assert!(
        forwarded.is_empty(),
        "reads reached the API server: {:#?}",
        brief(&forwarded)
    );
}

// ====================================================== 5. DISRUPTION ====

/// Polls until kache answers the rv=0 LIST `path` from its cache with exactly
/// the objects a consistent LIST of the API server shows (names and versions).
async fn until_cache_matches_api_server(kache: &Kache, sides: &Sides, res: &Res, path: &str, what: &str) {
    let collection = path.split('?').next().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = String::new();
    loop {
        let before = cache_hits(kache, res).await;
        let v = get(&sides.via, path, &[]).await;
        let hit = cache_hits(kache, res).await > before;
        let d = get(&sides.direct, collection, &[]).await;
        if v.status == 200 && d.status == 200 {
            let (vi, mut di) = (items(&v.json()), items(&d.json()));
            di.sort_by_key(key_of);
            if hit && summary(&vi) == summary(&di) {
                return;
            }
            last = format!(
                "hit: {hit}\nvia kache  {:?}\nAPI server {:?}",
                summary(&vi),
                summary(&di)
            );
        }
        assert!(
            Instant::now() < deadline,
            "{what}: kache's cache never matched the API server:\n{last}\nkache stderr:\n{}",
            kache.stderr()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kache_follows_the_api_server_through_a_restart_and_relists_after_410() {
    let own = tokio::task::spawn_blocking(|| OwnCluster::up(&target_dir().join("kache-cluster-restart")))
        .await
        .unwrap();
    let admin = PathBuf::from(own.var("KACHE_ADMIN_KUBECONFIG"));
    let audit_log = AuditLog::new(own.var("KACHE_AUDIT_LOG"), &admin);
    let direct = direct_client(&admin).await;
    let kache = Kache::start(&admin);
    let sides = Sides {
        via: via_client(&kache),
        direct: direct.clone(),
    };
    let ns = unique_name("restart");
    write(
        &direct,
        "POST",
        "/api/v1/namespaces",
        Some(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})),
    )
    .await;
    let cms = Res::new("", "v1", "configmaps", true);
    let coll = cms.collection(Some(&ns));
    let obj = |name: &str| cms.object(Some(&ns), name);
    let cm = |name: &str| json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"v": name}});
    let list_path = format!("{coll}?resourceVersion=0");
    for name in ["a", "b"] {
        write(&direct, "POST", &coll, Some(&cm(name))).await;
    }
    until_cache_matches_api_server(&kache, &sides, &cms, &list_path, "before any restart").await;
    let relists = |entries: &[Value]| -> Vec<Value> {
        entries
            .iter()
            .filter(|e| {
                finished(e)
                    && e["verb"] == "list"
                    && by_kache(e)
                    && audit_uri(e) == "/api/v1/configmaps?resourceVersion=0"
            })
            .cloned()
            .collect()
    };

    // (a) The API server restarts; changes made afterwards reach kache's cache.
    let list = get(&sides.via, &list_path, &[]).await.json();
    let mut before_restart = watch(
        &sides.via,
        &format!("{coll}?watch=true&resourceVersion={}", rv_of(&list)),
    )
    .await;
    assert_eq!(
        cache_watchers(&kache, &cms).await,
        1.0,
        "the watch is served by kache"
    );
    let audit = audit_log.mark();
    own.restart_apiserver().await;
    write(&direct, "POST", &coll, Some(&cm("c"))).await;
    write(&direct, "DELETE", &obj("a"), None).await;
    until_cache_matches_api_server(&kache, &sides, &cms, &list_path, "after a restart").await;
    // A watch kache served across the restart either ended (kache relisted:
    // the client must relist too) or delivered the changes — never silence.
    let mut seen = Vec::new();
    let ended = loop {
        match before_restart.try_next(Duration::from_secs(10)).await {
            Ok(Some(e)) if e["type"] == "BOOKMARK" => {}
            Ok(Some(e)) => seen.push(e),
            Ok(None) => break true,
            Err(()) => break false,
        }
    };
    let summary_seen = event_summary(&seen);
    if !ended {
        assert!(
            seen.iter().any(|e| is_event(e, "ADDED", "c"))
                && seen.iter().any(|e| is_event(e, "DELETED", "a")),
            "a watch served across the restart neither ended nor delivered the changes: {summary_seen:?}"
        );
    }
    eprintln!(
        "after a restart: kache's watch {}; kache relisted {} time(s)",
        if ended { "ended" } else { "went on" },
        relists(&audit_after_sentinel(&audit).await).len()
    );

    // (b) Many changes, etcd compacted, the API server restarted: its watch
    // cache starts at the compacted revision, kache's resume from its older
    // version gets 410 Gone, and kache must relist.
    for i in 0..30 {
        write(&direct, "POST", &coll, Some(&cm(&format!("bulk-{i:02}")))).await;
    }
    for i in 0..10 {
        write(&direct, "DELETE", &obj(&format!("bulk-{i:02}")), None).await;
    }
    until_cache_matches_api_server(&kache, &sides, &cms, &list_path, "after bulk changes").await;
    let at_old_rv = get(&sides.via, &list_path, &[]).await.json();
    let old_rv = rv_of(&at_old_rv);
    let mut seen_across_410: BTreeSet<String> = at_old_rv["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    let mut across_410 = watch(&sides.via, &format!("{coll}?watch=true&resourceVersion={old_rv}")).await;
    // Writes to another resource move etcd past every configmap version.
    for i in 0..3 {
        let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": format!("bump-{i}")}, "stringData": {"k": "v"}});
        write(
            &direct,
            "POST",
            &format!("/api/v1/namespaces/{ns}/secrets"),
            Some(&secret),
        )
        .await;
    }
    let revision = own.etcd_revision();
    assert!(revision > old_rv, "etcd at {revision}, kache at {old_rv}");
    own.etcd(
        "/v3/kv/compaction",
        &json!({"revision": revision.to_string(), "physical": true}),
    );
    let audit = audit_log.mark();
    own.restart_apiserver().await;
    let gone_path = format!("{coll}?watch=true&resourceVersion={old_rv}");
    let mut gone = watch(&direct, &gone_path).await;
    let event = gone.next_within(REQUEST_TIMEOUT).await.expect("an ERROR event");
    assert_eq!(
        (
            &event["type"],
            &event["object"]["code"],
            &event["object"]["reason"]
        ),
        (&json!("ERROR"), &json!(410), &json!("Expired")),
        "a watch from {old_rv} after compaction: {event}"
    );
    write(&direct, "POST", &coll, Some(&cm("d"))).await;
    write(&direct, "DELETE", &obj("b"), None).await;
    write(&direct, "DELETE", &obj("bulk-15"), None).await;
    until_cache_matches_api_server(&kache, &sides, &cms, &list_path, "after 410").await;
    let logged = audit_after_sentinel(&audit).await;
    let relisted = relists(&logged);
    assert!(!relisted.is_empty(), "kache never relisted after the restart");
    let resumed = logged.iter().any(|e| {
        started(e) && by_kache(e) && e["verb"] == "watch" && audit_uri(e).starts_with("/api/v1/configmaps?")
    });
    assert!(resumed, "kache never watched again: {:#?}", brief(&logged));
    // The store was rebuilt from a new list: the watch kache served from it
    // went on, and the difference reached it as ordinary events, so the
    // client's view (the list at the old version plus the events) is the API
    // server's, without a relist.
    let now: BTreeSet<String> = get(&direct, &coll, &[]).await.json()["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    let deadline = Instant::now() + CONVERGE;
    while seen_across_410 != now {
        assert!(
            Instant::now() < deadline,
            "the watch across the 410 never caught up: {seen_across_410:?} vs {now:?}"
        );
        let event = match across_410.try_next(REQUEST_TIMEOUT).await {
            Ok(Some(event)) => event,
            Ok(None) => panic!("the watch kache served across the relist ended"),
            Err(()) => continue,
        };
        let name = event["object"]["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        match event["type"].as_str() {
            Some("ADDED" | "MODIFIED") => {
                seen_across_410.insert(name);
            }
            Some("DELETED") => {
                seen_across_410.remove(&name);
            }
            Some("BOOKMARK") => {}
            _ => panic!("unexpected event across the relist: {event}"),
        }
    }
    // And a watch from that version through kache is still served from the
    // event window (the API server itself would say 410 Expired).
    let mut via_old = watch(&sides.via, &gone_path).await;
    let via_event = via_old.next_within(REQUEST_TIMEOUT).await.expect("an event");
    assert_ne!(via_event["type"], "ERROR", "{via_event}");
    drop(kache);
    drop(own);
}

// ========================================================== 6. BYPASS ====

/// Table rows without the Age cells (they move with the clock), sorted by name.
fn normalized_table(mut table: Value) -> Value {
    let age = table["columnDefinitions"]
        .as_array()
        .and_then(|cols| cols.iter().position(|c| c["name"] == "Age"));
    if let Some(rows) = table["rows"].as_array_mut() {
        for row in rows.iter_mut() {
            if let (Some(age), Some(cells)) = (age, row["cells"].as_array_mut()) {
                cells.remove(age);
            }
        }
        rows.sort_by_key(|r| name_of(&r["object"]).to_string());
    }
    if let Some(meta) = table["metadata"].as_object_mut() {
        meta.remove("resourceVersion");
    }
    table
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_the_cache_cannot_answer_are_forwarded_and_answered_like_direct() {
    let c = cluster();
    let ns = TestNamespace::create("cache-bypass");
    let kache = Kache::start(&c.admin_kubeconfig);
    let via_ua = via_user_agent(&kache);
    let direct = direct_client(&c.admin_kubeconfig).await;
    let sides = Sides {
        via: via_client(&kache),
        direct: direct.clone(),
    };
    let cms = Res::new("", "v1", "configmaps", true);
    let coll = cms.collection(Some(ns.name()));
    let mut last_rv = 0;
    for name in ["one", "two", "three"] {
        let created = write(
            &direct,
            "POST",
            &coll,
            Some(&json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "labels": {"a": name}}, "data": {"v": name}})),
        )
        .await;
        last_rv = rv_of(&created);
    }
    // Both caches have our objects, kache's store is running.
    until_served_from_cache(
        &kache,
        &sides.via,
        &cms,
        &format!("{coll}?resourceVersion=0"),
        last_rv,
    )
    .await;
    let exact_rv = rv_of(&get(&direct, &coll, &[]).await.json()).to_string();
    let table = "application/json;as=Table;v=v1;g=meta.k8s.io";
    // (reason kache forwards it for, path, headers)
    type Case<'a> = (&'a str, String, Vec<(&'a str, &'a str)>);
    let cases: Vec<Case<'_>> = vec![
        (
            "bad_selector",
            format!("{coll}?resourceVersion=0&labelSelector=a%20in%20"),
            vec![],
        ),
        (
            "bad_selector",
            format!("{coll}?resourceVersion=0&fieldSelector=metadata.name%3Da%5Cb"),
            vec![],
        ),
        (
            "unsupported_field",
            format!("{coll}?resourceVersion=0&fieldSelector=spec.foo%3Dx"),
            vec![],
        ),
        (
            "continue",
            format!("{coll}?resourceVersion=0&limit=1&continue=x"),
            vec![],
        ),
        ("consistent_read", coll.clone(), vec![]),
        ("consistent_read", format!("{coll}?limit=2"), vec![]),
        (
            "exact",
            format!("{coll}?resourceVersion={exact_rv}&resourceVersionMatch=Exact"),
            vec![],
        ),
        (
            "encoding",
            format!("{coll}?resourceVersion=0"),
            vec![(ACCEPT.as_str(), table)],
        ),
        (
            "encoding",
            format!("{}/one?resourceVersion=0", coll),
            vec![(ACCEPT.as_str(), table)],
        ),
        (
            "encoding",
            format!("{coll}?resourceVersion=0"),
            vec![(ACCEPT.as_str(), "application/yaml")],
        ),
        (
            "parameters",
            format!("{coll}?resourceVersion=0&pretty=true"),
            vec![],
        ),
        (
            "invalid_resource_version",
            format!("{coll}?resourceVersion=abc"),
            vec![],
        ),
    ];
    let before = kache_metrics(&kache).await;
    let audit = c.audit().mark();
    let mut expected: BTreeMap<&str, f64> = BTreeMap::new();
    for (reason, path, headers) in &cases {
        *expected.entry(reason).or_default() += 1.0;
        let (v, d) = (
            get(&sides.via, path, headers).await,
            get(&sides.direct, path, headers).await,
        );
        let what = format!("{path} {headers:?}");
        assert_eq!(
            v.status,
            d.status,
            "{what}: via kache {}\ndirect {}",
            v.text(),
            d.text()
        );
        assert_eq!(v.content_type, d.content_type, "{what}: Content-Type");
        if d.status >= 400 {
            assert_eq!(v.json(), d.json(), "{what}: the Status bodies differ");
            continue;
        }
        if d.content_type.contains("yaml") {
            let (vy, dy): (Value, Value) = (
                serde_saphyr::from_slice(&v.body).unwrap(),
                serde_saphyr::from_slice(&d.body).unwrap(),
            );
            assert_eq!(items(&vy).len(), items(&dy).len(), "{what}");
            continue;
        }
        let (vj, dj) = (v.json(), d.json());
        if dj["kind"] == "Table" {
            assert_eq!(normalized_table(vj), normalized_table(dj), "{what}");
            continue;
        }
        let (mut vi, mut di) = (items(&vj), items(&dj));
        vi.sort_by_key(key_of);
        di.sort_by_key(key_of);
        assert_eq!(vj["kind"], dj["kind"], "{what}");
        assert_eq!(vi, di, "{what}: the items differ");
        assert_eq!(
            vj["metadata"].get("continue").is_some(),
            dj["metadata"].get("continue").is_some(),
            "{what}"
        );
    }
    // Each went to the API server, with the client's User-Agent, for the right reason.
    let forwarded: Vec<Value> = audit_after_sentinel(&audit)
        .await
        .into_iter()
        .filter(|e| finished(e) && audit_ua(e) == via_ua)
        .collect();
    assert_eq!(forwarded.len(), cases.len(), "{:#?}", brief(&forwarded));
    let after = kache_metrics(&kache).await;
    for (reason, count) in expected {
        let labels = [("reason", reason)];
        let moved = metric(&after, "kache_cache_forwarded_total", &labels)
            - metric(&before, "kache_cache_forwarded_total", &labels);
        assert_eq!(moved, count, "kache_cache_forwarded_total{{reason=\"{reason}\"}}");
    }
}

// ====================================================== 7. SLOW WATCHER ===

/// The most a TCP socket's send buffer grows to (`net.ipv4.tcp_wmem`).
fn tcp_wmem_max() -> usize {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|s| s.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(4 << 20)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_stops_reading_is_ended_without_delaying_the_others() {
    // Room for the reading client to fall behind while the machine is busy
    // (its reader shares two cores with the writers, kache and the API
    // server); the stalled one, which never reads, runs out of it anyway.
    const BACKLOG: usize = 64;
    const MAX_UPDATES: usize = 1200;
    let c = cluster();
    let ns = TestNamespace::create("cache-slow");
    let direct = direct_client(&c.admin_kubeconfig).await;
    // A resource of its own: every event in the store is one of this test's
    // writes (a store's events all pass every watcher, whatever its namespace).
    let crd = Crd::create(&direct, "kache-slow").await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kache.yaml");
    std::fs::write(&config, format!("cache:\n  watcherBacklog: {BACKLOG}\n")).unwrap();
    let mut kache = Kache::start_with_args(&c.admin_kubeconfig, &["--config", config.to_str().unwrap()]);
    let via_ua = via_user_agent(&kache);
    let via = via_client(&kache);
    crd.until_discovered(&via).await;
    let widgets = crd.res.clone();
    let coll = widgets.collection(Some(ns.name()));
    let list = until_served_from_cache(&kache, &via, &widgets, &format!("{coll}?resourceVersion=0"), 0).await;
    let from = rv_of(&list);
    let watch_path = format!("{coll}?watch=true&resourceVersion={from}");

    // The stalled client never reads past the headers; its tiny receive buffer
    // keeps the kernel from absorbing megabytes of events on kache's behalf.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(kache.addr()).await.unwrap();
    stalled
        .write_all(
            format!(
                "GET {watch_path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: {via_ua}\r\n\r\n",
                kache.addr()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let n = tokio::time::timeout(REQUEST_TIMEOUT, stalled.read(&mut byte))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 1, "kache closed the stalled watch before answering");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut reader = watch(&via, &watch_path).await;
    assert_eq!(
        cache_watchers(&kache, &widgets).await,
        2.0,
        "both watches are served by kache"
    );

    // Big objects, updated over and over: more than the stalled watch can
    // hold anywhere — its backlog in the store's broadcast, its connection's
    // write queue (under 1 MiB plus one chunk of at most 64 events) and the
    // kernel's socket buffers — so it must lose events. A stalled
    // connection is not polled: the watch's keeper finds that out within
    // its interval (10 s) and lets go of the watcher, without waiting for
    // the client to read; the reading one must get every event meanwhile.
    const BLOB: usize = 30_000;
    let socket_buffers = tcp_wmem_max() + 4096;
    let can_hold = (socket_buffers + (1 << 20)) / BLOB + 64 + BACKLOG;
    let updates_needed = (2 * can_hold).min(MAX_UPDATES);
    let blob = |round: usize| format!("{round:06}").repeat(BLOB / 6);
    let objects: Vec<String> = (0..20).map(|i| format!("big-{i:02}")).collect();
    let mut written: BTreeSet<u64> = BTreeSet::new();
    let mut received: BTreeSet<u64> = BTreeSet::new();
    let mut reader_ended = false;
    let drain = |reader: &mut Watch, received: &mut BTreeSet<u64>, ended: &mut bool| loop {
        match reader.events.try_recv() {
            Ok(e) if e["type"] != "BOOKMARK" => {
                received.insert(rv_of(&e["object"]));
            }
            Ok(_) => {}
            Err(mpsc::error::TryRecvError::Empty) => break,
            Err(mpsc::error::TryRecvError::Disconnected) => {
                *ended = true;
                break;
            }
        }
    };
    let mut updates = 0;
    let mut round = 0;
    let started = Instant::now();
    while updates < updates_needed {
        let writes = objects.iter().map(|name| {
            let direct = direct.clone();
            let (coll, obj) = (coll.clone(), widgets.object(Some(ns.name()), name));
            let body = crd.widget(ns.name(), name, json!({}));
            let patch = json!({"spec": {"blob": blob(round)}});
            async move {
                if round == 0 {
                    write(&direct, "POST", &coll, Some(&body)).await;
                }
                write(&direct, "PATCH", &obj, Some(&patch)).await
            }
        });
        // Four writers at a time, as a busy controller might write.
        let results: Vec<Value> = futures::stream::iter(writes).buffer_unordered(4).collect().await;
        written.extend(results.iter().map(rv_of));
        updates += results.len();
        round += 1;
        drain(&mut reader, &mut received, &mut reader_ended);
        assert!(
            !reader_ended,
            "the reading watch was ended after {updates} updates"
        );
    }
    eprintln!(
        "{updates} updates of 30 KB written while one watch stalled ({:?})",
        started.elapsed()
    );
    // The reading client got every event (within REQUEST_TIMEOUT).
    let marker = write(
        &direct,
        "POST",
        &coll,
        Some(&crd.widget(ns.name(), "marker", json!({}))),
    )
    .await;
    written.insert(rv_of(&marker));
    let marker_written = Instant::now();
    let deadline = marker_written + REQUEST_TIMEOUT;
    while !received.contains(&rv_of(&marker)) {
        assert!(Instant::now() < deadline, "the reading watch fell behind");
        match reader.try_next(Duration::from_millis(200)).await {
            Ok(Some(e)) if e["type"] != "BOOKMARK" => {
                received.insert(rv_of(&e["object"]));
            }
            Ok(Some(_)) | Err(()) => {}
            Ok(None) => panic!("the reading watch was ended"),
        }
    }
    eprintln!("the last event arrived after {:?}", marker_written.elapsed());
    let missed: Vec<&u64> = written.difference(&received).collect();
    assert!(
        missed.is_empty(),
        "the reading watch missed {} events: {missed:?}",
        missed.len()
    );

    // The stalled watch was let go of while its client still did not read:
    // kache counts only the reading one.
    let deadline = Instant::now() + Duration::from_secs(10) + REQUEST_TIMEOUT;
    while cache_watchers(&kache, &widgets).await > 1.0 {
        assert!(
            Instant::now() < deadline,
            "the stalled watch is still held, its client not reading"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Once read, its response ends (chunked terminator or close) after
    // fewer events than were written.
    let mut rest = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let closed = tokio::time::timeout(REQUEST_TIMEOUT, async {
        loop {
            let n = stalled.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                return "closed";
            }
            rest.extend_from_slice(&buf[..n]);
            if rest.ends_with(b"\r\n0\r\n\r\n") {
                return "ended";
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "the stalled watch's response never ended once read ({} bytes)",
            rest.len()
        )
    });
    let events = rest.windows(9).filter(|w| w == b"{\"type\":\"").count();
    assert!(
        events < written.len(),
        "the stalled watch got all {events} events: it was never ended"
    );
    eprintln!(
        "the stalled watch ({closed}) had {events} of {} events",
        written.len()
    );
    assert_eq!(
        cache_watchers(&kache, &widgets).await,
        1.0,
        "the reading watch stays"
    );

    // kache is fine.
    kache.assert_running();
    until_served_from_cache(
        &kache,
        &via,
        &widgets,
        &format!("{coll}?resourceVersion=0"),
        rv_of(&marker),
    )
    .await;
    assert_eq!(cache_watchers(&kache, &widgets).await, 1.0);
}
