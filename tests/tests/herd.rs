//! A herd of watchers through kache across the upstream's worst: 50 watches
//! of pods — half of them reflectors written the way client-go's are (raw
//! HTTP: LIST `?limit=500&resourceVersion=0`, then WATCH from the list's
//! version with bookmarks), half kube-runtime watchers — some namespaced,
//! some cluster-wide, with label and field selectors. While pods come, go and
//! move in and out of the selections, the API server restarts, then kache's
//! path to it is cut, the API server is stopped for 30 s and etcd compacted
//! meanwhile, so kache must relist when it gets back (`410`). Through all of
//! it no client's watch ends, no client relists, and after every step each
//! client's view (name → resourceVersion and labels) equals the API server's
//! list through the same selectors.
//!
//! The test restarts its API server, so it starts a cluster of its own
//! (`target/kache-cluster-herd`).

#![allow(clippy::unwrap_used)] // test helpers, not only #[test] fns (STYLE.md)

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use http_body_util::BodyExt;
use k8s_openapi::api::core::v1::Pod;
use kache_tests::{
    client_from_kubeconfig, http_get, kubeconfig_through, metric, target_dir, unique_name, write_json,
    AuditFilter, AuditMark, Kache, OwnCluster, Relay,
};
use kube::api::Api;
use kube::client::Body;
use kube::runtime::{watcher, WatchStreamExt};
use serde_json::{json, Value};
use tokio::sync::Barrier;
use tokio::time::Instant;

/// Watchers: half client-go style, half kube-runtime.
const WATCHERS: usize = 50;
/// Pods in the test namespace at the start.
const PODS: usize = 150;
/// How long the API server stays down.
const OUTAGE: Duration = Duration::from_secs(30);
/// Bound on any wait for the clients to converge. Generous: the machine's
/// cores are shared with builds and other test binaries.
const CONVERGE: Duration = Duration::from_secs(120);
/// Bound on one request's answer (not on a watch's body).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// client-go's reflector asks for `timeoutSeconds` between this and twice
/// this (`minWatchTimeout * (1 + rand)`, with 5 min); here longer than the
/// whole test, so any watch that ends before the test does is kache's doing.
const MIN_WATCH_TIMEOUT: u64 = 1200;
/// Writes in flight at once while churning.
const WRITERS: usize = 8;
/// The user kache reaches the API server as; the test's own requests go
/// straight to the API server as `admin-token`.
const KACHE_USER: &str = "admin";

// ------------------------------------------------------------ selections ----

/// What a watcher watches: where, and through which selectors. Every one
/// matches the sentinel pod (labels `app=web,tier=a`, node `node-a`, phase
/// `Running`), so every watcher sees each of its marks.
#[derive(Debug, Clone, Copy)]
struct Selection {
    all_namespaces: bool,
    label: Option<&'static str>,
    field: Option<&'static str>,
}

const fn sel(all_namespaces: bool, label: Option<&'static str>, field: Option<&'static str>) -> Selection {
    Selection {
        all_namespaces,
        label,
        field,
    }
}

const SELECTIONS: [Selection; 10] = [
    sel(false, None, None),
    sel(false, Some("app=web"), None),
    sel(false, Some("tier in (a,b)"), None),
    sel(false, Some("app=web,tier!=c"), None),
    sel(false, Some("!gone"), None),
    sel(false, None, Some("spec.nodeName=node-a")),
    sel(false, None, Some("status.phase=Running")),
    sel(
        false,
        Some("app=web"),
        Some("spec.nodeName=node-a,metadata.name!=p-1"),
    ),
    sel(true, None, None),
    sel(true, Some("tier in (a,b)"), Some("status.phase!=Succeeded")),
];

impl Selection {
    fn collection(&self, ns: &str) -> String {
        if self.all_namespaces {
            "/api/v1/pods".into()
        } else {
            format!("/api/v1/namespaces/{ns}/pods")
        }
    }

    /// The collection's URL with the selectors and `params`, keys sorted
    /// and values escaped as Go's `url.Values.Encode` writes them.
    fn url(&self, ns: &str, params: &[(&str, &str)]) -> String {
        let mut all: Vec<(&str, &str)> = params.to_vec();
        all.extend(self.field.map(|f| ("fieldSelector", f)));
        all.extend(self.label.map(|l| ("labelSelector", l)));
        all.sort();
        let query: Vec<String> = all
            .iter()
            .map(|(k, v)| format!("{k}={}", query_escape(v)))
            .collect();
        let collection = self.collection(ns);
        if query.is_empty() {
            collection
        } else {
            format!("{collection}?{}", query.join("&"))
        }
    }
}

impl std::fmt::Display for Selection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.all_namespaces { "all" } else { "ns" })?;
        if let Some(l) = self.label {
            write!(f, " labels {l:?}")?;
        }
        if let Some(s) = self.field {
            write!(f, " fields {s:?}")?;
        }
        Ok(())
    }
}

/// Go's `url.QueryEscape`.
fn query_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            b' ' => "+".into(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

// ------------------------------------------------------------ views ----

/// `namespace/name` → (resourceVersion, labels).
type View = BTreeMap<String, (String, BTreeMap<String, String>)>;

fn entry(object: &Value) -> (String, (String, BTreeMap<String, String>)) {
    let meta = &object["metadata"];
    let key = format!(
        "{}/{}",
        meta["namespace"].as_str().unwrap_or_default(),
        meta["name"].as_str().unwrap_or_default()
    );
    let labels = meta["labels"]
        .as_object()
        .map(|l| {
            l.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default();
    let rv = meta["resourceVersion"].as_str().unwrap_or_default().to_string();
    (key, (rv, labels))
}

fn view_of(items: &[Value]) -> View {
    items.iter().map(entry).collect()
}

/// The API server's view through a selection: a consistent LIST, straight.
async fn truth(direct: &kube::Client, ns: &str, selection: Selection) -> View {
    let path = selection.url(ns, &[]);
    let request = http::Request::get(&path).body(Vec::new()).unwrap();
    let list: Value = tokio::time::timeout(REQUEST_TIMEOUT, direct.request(request))
        .await
        .unwrap_or_else(|_| panic!("LIST {path}: no answer"))
        .unwrap_or_else(|e| panic!("LIST {path}: {e}"));
    view_of(list["items"].as_array().unwrap())
}

// ------------------------------------------------------------ watchers ----

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    ClientGo,
    KubeRuntime,
}

/// What one client has seen.
#[derive(Default)]
struct Seen {
    view: View,
    /// Its first list is in.
    listed: bool,
    /// ADDED / MODIFIED / DELETED (kube-runtime: Apply / Delete) after it.
    events: usize,
    /// client-go: watches that ended or could not start (each re-watched or
    /// relisted). kube-runtime: errors it reported.
    ended: usize,
    /// Lists after the first.
    relists: usize,
    /// What happened, for the failure message (the first few).
    notes: Vec<String>,
}

impl Seen {
    fn note(&mut self, what: String) {
        if self.notes.len() < 5 {
            self.notes.push(what);
        }
    }
}

struct Watcher {
    name: String,
    kind: Kind,
    /// Its index in [`SELECTIONS`].
    selection: usize,
    seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The `i`th watcher: even ones client-go style, odd ones kube-runtime,
/// each pair with the next of [`SELECTIONS`]. It starts at the barrier.
fn spawn_watcher(i: usize, client: kube::Client, ns: &str, barrier: Arc<Barrier>) -> Watcher {
    let slot = (i / 2) % SELECTIONS.len();
    let selection = SELECTIONS[slot];
    let kind = if i.is_multiple_of(2) {
        Kind::ClientGo
    } else {
        Kind::KubeRuntime
    };
    let seen = Arc::new(Mutex::new(Seen::default()));
    let ns = ns.to_string();
    let task = {
        let seen = seen.clone();
        tokio::spawn(async move {
            barrier.wait().await;
            match kind {
                Kind::ClientGo => client_go_reflector(client, &ns, selection, &seen).await,
                Kind::KubeRuntime => kube_runtime_watcher(client, &ns, selection, &seen).await,
            }
        })
    };
    Watcher {
        name: format!(
            "{}#{i:02}",
            match kind {
                Kind::ClientGo => "client-go",
                Kind::KubeRuntime => "kube-runtime",
            }
        ),
        kind,
        selection: slot,
        seen,
        task,
    }
}

/// Why a LIST failed.
enum ListError {
    /// `410`: the version asked for is gone.
    Gone,
    Other(String),
}

/// One LIST as client-go's pager sends it: `limit=500` where it pages
/// (`resourceVersion` `0` or empty), following `continue`.
async fn list_pages(
    client: &kube::Client,
    ns: &str,
    selection: Selection,
    rv: &str,
) -> Result<(Vec<Value>, String), ListError> {
    let mut items = Vec::new();
    let mut next: Option<String> = None;
    loop {
        let url = match &next {
            Some(token) => selection.url(ns, &[("continue", token), ("limit", "500")]),
            None if rv.is_empty() => selection.url(ns, &[("limit", "500")]),
            None if rv == "0" => selection.url(ns, &[("limit", "500"), ("resourceVersion", "0")]),
            None => selection.url(ns, &[("resourceVersion", rv)]),
        };
        let request = http::Request::get(url)
            .header(http::header::ACCEPT, "application/json, */*")
            .body(Vec::new())
            .unwrap();
        let list: Value = match tokio::time::timeout(REQUEST_TIMEOUT, client.request(request)).await {
            Err(_) => return Err(ListError::Other("LIST: no answer".into())),
            Ok(Err(kube::Error::Api(status))) if status.code == 410 => return Err(ListError::Gone),
            Ok(Err(e)) => return Err(ListError::Other(format!("LIST: {e}"))),
            Ok(Ok(list)) => list,
        };
        items.extend(list["items"].as_array().cloned().unwrap_or_default());
        match list["metadata"]["continue"].as_str() {
            Some(token) if !token.is_empty() => next = Some(token.to_string()),
            _ => {
                let rv = list["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                return Ok((items, rv));
            }
        }
    }
}

/// How one watch ended.
enum WatchEnd {
    /// The stream closed; `short`: within a second and without an event
    /// (client-go then relists: "very short watch").
    Closed { short: bool, why: String },
    /// It could not be sent (client-go backs off and watches again).
    Unsent(String),
    /// A non-200 answer or an ERROR event: client-go relists.
    Failed(String),
}

/// client-go's `Reflector.ListAndWatch` (tools/cache/reflector.go, v1.20):
/// LIST at `0` (then at the last version, and at `""` if that is gone),
/// replace the store, WATCH from the list's version with bookmarks and a
/// randomized `timeoutSeconds`, apply each event and keep its version; a
/// watch that closes is sent again from the last version, an error relists.
async fn client_go_reflector(client: kube::Client, ns: &str, selection: Selection, seen: &Mutex<Seen>) {
    // relistResourceVersion(): "0" at first, then the last synced version.
    let mut relist_rv = "0".to_string();
    loop {
        let (items, mut last) = match list_pages(&client, ns, selection, &relist_rv).await {
            Ok(listed) => listed,
            Err(ListError::Gone) => {
                // The version is unavailable: list at the most recent.
                relist_rv = String::new();
                continue;
            }
            Err(ListError::Other(e)) => {
                seen.lock().unwrap().note(e);
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        {
            let mut seen = seen.lock().unwrap();
            if seen.listed {
                seen.relists += 1;
            }
            seen.listed = true;
            seen.view = view_of(&items);
        }
        loop {
            let end = watch_once(&client, ns, selection, &mut last, seen).await;
            let relist = {
                let mut seen = seen.lock().unwrap();
                seen.ended += 1;
                match end {
                    WatchEnd::Closed { short, why } => {
                        seen.note(format!(
                            "watch closed ({why}){}",
                            if short { ", very short" } else { "" }
                        ));
                        short
                    }
                    WatchEnd::Unsent(e) => {
                        seen.note(format!("watch not sent: {e}"));
                        false
                    }
                    WatchEnd::Failed(e) => {
                        seen.note(e);
                        true
                    }
                }
            };
            if relist {
                break;
            }
            // client-go's backoff between watches of a failing upstream.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        relist_rv = last;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// One WATCH from `last`, its events applied to `seen` and `last` kept at
/// the newest version seen (bookmarks included).
async fn watch_once(
    client: &kube::Client,
    ns: &str,
    selection: Selection,
    last: &mut String,
    seen: &Mutex<Seen>,
) -> WatchEnd {
    let jitter = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
        % MIN_WATCH_TIMEOUT;
    let timeout = MIN_WATCH_TIMEOUT + jitter;
    let path = selection.url(
        ns,
        &[
            ("allowWatchBookmarks", "true"),
            ("resourceVersion", last),
            ("timeoutSeconds", &timeout.to_string()),
            ("watch", "true"),
        ],
    );
    let request = http::Request::get(&path)
        .header(http::header::ACCEPT, "application/json, */*")
        .body(Body::empty())
        .unwrap();
    let started = Instant::now();
    let response = match tokio::time::timeout(REQUEST_TIMEOUT, client.send(request)).await {
        Err(_) => return WatchEnd::Unsent("no answer".into()),
        Ok(Err(e)) => return WatchEnd::Unsent(e.to_string()),
        Ok(Ok(response)) => response,
    };
    if response.status() != 200 {
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        return WatchEnd::Failed(format!(
            "WATCH answered {status}: {}",
            String::from_utf8_lossy(&body)
        ));
    }
    let mut body = response.into_body();
    let mut buffer = Vec::new();
    let mut events = 0;
    let why = loop {
        match body.frame().await {
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else { continue };
                buffer.extend_from_slice(&data);
            }
            Some(Err(e)) => break format!("error: {e}"),
            None => break "EOF".to_string(),
        }
        for line in kache_tests::take_lines(&mut buffer) {
            let Ok(event) = serde_json::from_slice::<Value>(&line) else {
                return WatchEnd::Failed(format!("undecodable event: {}", String::from_utf8_lossy(&line)));
            };
            let object = &event["object"];
            let kind = event["type"].as_str().unwrap_or_default();
            if kind == "ERROR" {
                return WatchEnd::Failed(format!("ERROR event: {object}"));
            }
            let (key, (rv, labels)) = entry(object);
            events += 1;
            let mut seen = seen.lock().unwrap();
            match kind {
                "ADDED" | "MODIFIED" => {
                    seen.events += 1;
                    seen.view.insert(key, (rv.clone(), labels));
                }
                "DELETED" => {
                    seen.events += 1;
                    seen.view.remove(&key);
                }
                "BOOKMARK" => {}
                other => return WatchEnd::Failed(format!("unknown event {other}: {object}")),
            }
            *last = rv;
        }
    };
    WatchEnd::Closed {
        short: events == 0 && started.elapsed() < Duration::from_secs(1),
        why,
    }
}

/// kube-runtime's watcher (with its default backoff, as controllers run
/// it), listing at `resourceVersion=0` (`any_semantic`; unpaginated: a
/// paginated list is a consistent read, which kache forwards). Its `Init`
/// after the first is a relist; the errors it reports count as ended
/// watches; a watch it resumes silently shows in kache's count of watch
/// requests, which the test checks.
async fn kube_runtime_watcher(client: kube::Client, ns: &str, selection: Selection, seen: &Mutex<Seen>) {
    let api: Api<Pod> = if selection.all_namespaces {
        Api::all(client)
    } else {
        Api::namespaced(client, ns)
    };
    let mut config = watcher::Config::default()
        .any_semantic()
        .timeout(u32::try_from(MIN_WATCH_TIMEOUT).unwrap());
    config.page_size = None;
    if let Some(l) = selection.label {
        config = config.labels(l);
    }
    if let Some(f) = selection.field {
        config = config.fields(f);
    }
    let mut stream = std::pin::pin!(watcher(api, config).default_backoff());
    let mut buffer: Option<View> = None;
    while let Some(event) = stream.next().await {
        let mut seen = seen.lock().unwrap();
        match event {
            Ok(watcher::Event::Init) => {
                if seen.listed || buffer.is_some() {
                    seen.relists += 1;
                    seen.note("relisted (Init)".into());
                }
                buffer = Some(View::new());
            }
            Ok(watcher::Event::InitApply(pod)) => {
                let (key, value) = entry(&serde_json::to_value(&pod).unwrap());
                buffer.get_or_insert_with(View::new).insert(key, value);
            }
            Ok(watcher::Event::InitDone) => {
                seen.view = buffer.take().unwrap_or_default();
                seen.listed = true;
            }
            Ok(watcher::Event::Apply(pod)) => {
                let (key, value) = entry(&serde_json::to_value(&pod).unwrap());
                seen.events += 1;
                seen.view.insert(key, value);
            }
            Ok(watcher::Event::Delete(pod)) => {
                let (key, _) = entry(&serde_json::to_value(&pod).unwrap());
                seen.events += 1;
                seen.view.remove(&key);
            }
            Err(e) => {
                seen.ended += 1;
                seen.note(format!("watcher error: {e}"));
            }
        }
    }
    let mut seen = seen.lock().unwrap();
    seen.ended += 1;
    seen.note("the watcher's stream ended".into());
}

// ------------------------------------------------------------ pods ----

const APPS: [&str; 2] = ["web", "db"];
const TIERS: [&str; 3] = ["a", "b", "c"];
const PHASES: [&str; 2] = ["Running", "Pending"];

fn pod_labels(n: usize) -> Value {
    let (app, tier) = (APPS[n % 2], TIERS[(n / 2) % 3]);
    let mut labels = json!({"app": app, "tier": tier});
    if n.is_multiple_of(7) {
        labels["gone"] = json!("yes");
    }
    labels
}

fn pod(name: &str, labels: Value, node: Option<&str>) -> Value {
    let mut pod = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {"containers": [{"name": "c", "image": "registry.invalid/none:1"}]}});
    if let Some(node) = node {
        pod["spec"]["nodeName"] = json!(node);
    }
    pod
}

fn pod_node(n: usize) -> Option<&'static str> {
    match n % 5 {
        0 | 1 => Some("node-a"),
        2 => Some("node-b"),
        _ => None,
    }
}

/// One write straight to the API server.
struct Write {
    method: &'static str,
    path: String,
    body: Option<Value>,
}

/// Runs writes, [`WRITERS`] at a time; none of them may touch the same pod.
async fn write_all(direct: &kube::Client, writes: Vec<Write>) {
    futures::stream::iter(writes)
        .for_each_concurrent(WRITERS, |w| async move {
            write_json(direct, w.method, &w.path, w.body.as_ref()).await;
        })
        .await;
}

/// Deletion without grace: a pod bound to a node otherwise waits for a
/// kubelet that never comes.
fn no_grace() -> Value {
    json!({"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0})
}

/// The test namespace's pods as the test changes them.
struct Churn {
    ns: String,
    /// Live pods made by the churn (the sentinel is not among them).
    alive: Vec<String>,
    /// The number of the next pod to create.
    next: usize,
    round: usize,
    /// A cheap pseudo-random sequence (an LCG), the same on every run.
    seed: u64,
}

impl Churn {
    fn new(ns: &str) -> Churn {
        Churn {
            ns: ns.to_string(),
            alive: Vec::new(),
            next: 0,
            round: 0,
            seed: 0x2545_f491_4f6c_dd1d,
        }
    }

    fn collection(&self) -> String {
        format!("/api/v1/namespaces/{}/pods", self.ns)
    }

    fn object(&self, name: &str) -> String {
        format!("{}/{name}", self.collection())
    }

    fn create(&mut self, prefix: &str) -> Write {
        let n = self.next;
        self.next += 1;
        let name = format!("{prefix}-{n}");
        self.alive.push(name.clone());
        Write {
            method: "POST",
            path: self.collection(),
            body: Some(pod(&name, pod_labels(n), pod_node(n))),
        }
    }

    fn random(&mut self, below: usize) -> usize {
        self.seed = self
            .seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        usize::try_from(self.seed >> 33).unwrap() % below
    }

    /// Takes a random live pod out of `alive`.
    fn take(&mut self) -> String {
        let i = self.random(self.alive.len());
        self.alive.swap_remove(i)
    }

    /// The initial pods, half of them `Running` (set through the status
    /// subresource: no kubelet runs).
    async fn populate(&mut self, direct: &kube::Client) {
        let creates: Vec<Write> = (0..PODS).map(|_| self.create("p")).collect();
        write_all(direct, creates).await;
        let running: Vec<Write> = (0..PODS)
            .filter(|n| n.is_multiple_of(2))
            .map(|n| Write {
                method: "PATCH",
                path: format!("{}/status", self.object(&format!("p-{n}"))),
                body: Some(json!({"status": {"phase": "Running"}})),
            })
            .collect();
        write_all(direct, running).await;
    }

    /// One round of changes: pods created and deleted, labels changed so
    /// pods move in and out of the selections, phases flipped, and one pod
    /// created and deleted at once.
    async fn round(&mut self, direct: &kube::Client) {
        let r = self.round;
        self.round += 1;
        let mut writes = Vec::new();
        // Pods touched this round are out of `alive` until its writes are
        // sent, so none is picked twice (the writes run concurrently); new
        // pods join after the picks, so none is touched before it exists.
        let mut picked = Vec::new();
        for _ in 0..5 {
            let name = self.take();
            writes.push(Write {
                method: "DELETE",
                path: self.object(&name),
                body: Some(no_grace()),
            });
        }
        for k in 0..10 {
            let name = self.take();
            picked.push(name.clone());
            let gone = if (r + k).is_multiple_of(3) {
                json!("yes")
            } else {
                Value::Null
            };
            writes.push(Write {
                method: "PATCH",
                path: self.object(&name),
                body: Some(json!({"metadata": {"labels": {
                    "app": APPS[(r + k) % 2],
                    "tier": TIERS[(r + 2 * k) % 3],
                    "gone": gone,
                }}})),
            });
        }
        for k in 0..5 {
            let name = self.take();
            picked.push(name.clone());
            writes.push(Write {
                method: "PATCH",
                path: format!("{}/status", self.object(&name)),
                body: Some(json!({"status": {"phase": PHASES[(r + k) % 2]}})),
            });
        }
        self.alive.extend(picked);
        for _ in 0..5 {
            writes.push(self.create("n"));
        }
        write_all(direct, writes).await;
        // Here and gone between two looks.
        let brief = format!("brief-{r}");
        write_json(
            direct,
            "POST",
            &self.collection(),
            Some(&pod(&brief, json!({"app": "web", "tier": "a"}), Some("node-a"))),
        )
        .await;
        write_json(direct, "DELETE", &self.object(&brief), Some(&no_grace())).await;
    }

    async fn sentinel(&self, direct: &kube::Client, mark: &str) {
        write_json(
            direct,
            "PATCH",
            &self.object("sentinel"),
            Some(&json!({"metadata": {"labels": {"mark": mark}}})),
        )
        .await;
    }
}

// ------------------------------------------------------------ kache ----

async fn pod_metric(kache: &Kache, name: &str) -> f64 {
    kache_metric(kache, name, &[("resource", "v1/pods"), ("encoding", "json")]).await
}

async fn kache_metric(kache: &Kache, name: &str, labels: &[(&str, &str)]) -> f64 {
    let r = http_get(&format!("http://{}/metrics", kache.admin_addr()), &[]).await;
    assert_eq!(r.status(), 200, "kache /metrics");
    metric(&String::from_utf8_lossy(r.body()), name, labels)
}

/// Polls until `check` holds, up to [`CONVERGE`].
async fn until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + CONVERGE;
    loop {
        match check().await {
            Ok(()) => return,
            Err(last) => assert!(Instant::now() < deadline, "{what}: {last}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// kache's requests for pods that reached the API server after `mark`
/// (counted up to a sentinel request's audit line): (LISTs, finished
/// WATCHes).
async fn kache_upstream_pod_requests(mark: &AuditMark) -> (usize, usize) {
    let mark = mark.clone();
    tokio::task::spawn_blocking(move || {
        let events =
            mark.matching_after_sentinel(&AuditFilter::new().user(KACHE_USER).uri_prefix("/api/v1/pods?"));
        let lists = events.iter().filter(|e| e.verb == "list").count();
        let watches = events.iter().filter(|e| e.verb == "watch").count();
        (lists, watches)
    })
    .await
    .unwrap()
}

// ------------------------------------------------------------ checks ----

/// Waits until every watcher has the sentinel at `mark` (the positive sign
/// that it has caught up: the sentinel is written last), then checks that
/// no watch ended, nobody relisted, and every view equals the API server's.
async fn checkpoint(watchers: &[Watcher], direct: &kube::Client, ns: &str, mark: &str) {
    let sentinel = format!("{ns}/sentinel");
    until(&format!("{mark}: every watcher sees the sentinel"), || async {
        let lagging: Vec<String> = watchers
            .iter()
            .filter(|w| {
                let seen = w.seen.lock().unwrap();
                seen.view
                    .get(&sentinel)
                    .is_none_or(|(_, labels)| labels.get("mark").map(String::as_str) != Some(mark))
            })
            .map(describe)
            .collect();
        if lagging.is_empty() {
            Ok(())
        } else {
            Err(format!("{} lagging:\n{}", lagging.len(), lagging.join("\n")))
        }
    })
    .await;
    let mut failures = Vec::new();
    for w in watchers {
        let (ended, relists) = {
            let seen = w.seen.lock().unwrap();
            (seen.ended, seen.relists)
        };
        if ended > 0 || relists > 0 {
            failures.push(describe(w));
        }
    }
    let mut truths = Vec::new();
    for selection in SELECTIONS {
        truths.push(truth(direct, ns, selection).await);
    }
    for w in watchers {
        let want = &truths[w.selection];
        let have = w.seen.lock().unwrap().view.clone();
        if have != *want {
            let missing: Vec<_> = want.keys().filter(|k| !have.contains_key(*k)).collect();
            let extra: Vec<_> = have.keys().filter(|k| !want.contains_key(*k)).collect();
            let stale: Vec<_> = want
                .iter()
                .filter(|(k, v)| have.get(*k).is_some_and(|h| h != *v))
                .map(|(k, v)| format!("{k}: have {:?}, want {v:?}", have[k]))
                .collect();
            failures.push(format!(
                "{}: view differs from the API server's: missing {missing:?}, extra {extra:?}, stale {stale:?}",
                w.name
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{mark}: {} failure(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
    eprintln!(
        "{mark}: all {} watchers converged, none ended or relisted",
        watchers.len()
    );
}

fn describe(w: &Watcher) -> String {
    let seen = w.seen.lock().unwrap();
    format!(
        "{} [{}]: {} objects, {} events, {} ended, {} relists {:?}",
        w.name,
        SELECTIONS[w.selection],
        seen.view.len(),
        seen.events,
        seen.ended,
        seen.relists,
        seen.notes
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_watchers_through_kache_outlive_a_restart_an_outage_and_a_compaction() {
    let started = Instant::now();
    let own = tokio::task::spawn_blocking(|| OwnCluster::up(&target_dir().join("kache-cluster-herd")))
        .await
        .unwrap();
    let c = &own.cluster;
    // The test's own requests as `admin-token`: `admin` is kache alone.
    let direct = client_from_kubeconfig(&c.admin_token_kubeconfig).await;
    let audit = c.audit();
    // kache reaches the API server through a relay the test can cut.
    let mut relay = Relay::start(c.apiserver_addr);
    let scratch = tempfile::tempdir().unwrap();
    let kache = Kache::start(&kubeconfig_through(&relay, &c.admin_kubeconfig, scratch.path()));

    let ns = unique_name("herd");
    write_json(
        &direct,
        "POST",
        "/api/v1/namespaces",
        Some(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})),
    )
    .await;
    let mut churn = Churn::new(&ns);
    churn.populate(&direct).await;
    // The sentinel matches every selection.
    write_json(
        &direct,
        "POST",
        &churn.collection(),
        Some(&pod(
            "sentinel",
            json!({"app": "web", "tier": "a", "mark": "0"}),
            Some("node-a"),
        )),
    )
    .await;
    write_json(
        &direct,
        "PATCH",
        &format!("{}/status", churn.object("sentinel")),
        Some(&json!({"status": {"phase": "Running"}})),
    )
    .await;

    // kache caches pods before the watchers start, so their watches are
    // served from its cache (a forwarded one would end with the upstream).
    let warm = kache.client();
    let list = format!("{}?resourceVersion=0", churn.collection());
    until("kache answers pod lists from its cache", || async {
        let before = pod_metric(&kache, "kache_cache_hits_total").await;
        let request = http::Request::get(&list).body(Body::empty()).unwrap();
        let _ = warm.send(request).await.map_err(|e| e.to_string())?;
        if pod_metric(&kache, "kache_cache_hits_total").await > before {
            Ok(())
        } else {
            Err("not yet".into())
        }
    })
    .await;

    // The herd, each client with its own connections, released together.
    let barrier = Arc::new(Barrier::new(WATCHERS));
    let watchers: Vec<Watcher> = (0..WATCHERS)
        .map(|i| spawn_watcher(i, kache.client(), &ns, barrier.clone()))
        .collect();
    until("every watch is served from kache's cache", || async {
        let n = pod_metric(&kache, "kache_cache_watchers").await;
        if n == WATCHERS as f64 {
            Ok(())
        } else {
            Err(format!("{n} watchers in kache"))
        }
    })
    .await;
    let lists = kache_metric(&kache, "kache_http_requests_total", &[("verb", "list")]).await;
    let watches = kache_metric(&kache, "kache_http_requests_total", &[("verb", "watch")]).await;
    assert_eq!(watches, WATCHERS as f64, "one WATCH per client");
    churn.sentinel(&direct, "start").await;
    checkpoint(&watchers, &direct, &ns, "start").await;
    let ready = started.elapsed();

    // 1. Steady churn.
    for _ in 0..2 {
        churn.round(&direct).await;
    }
    churn.sentinel(&direct, "steady").await;
    checkpoint(&watchers, &direct, &ns, "steady").await;

    // 2. The API server restarts (etcd untouched); kache's watch ends with
    //    it, and its version is older than the new watch cache (410).
    let mark = audit.mark();
    churn.round(&direct).await;
    own.restart_apiserver().await;
    churn.round(&direct).await;
    churn.sentinel(&direct, "restart").await;
    checkpoint(&watchers, &direct, &ns, "restart").await;
    let (restart_lists, restart_watches) = kache_upstream_pod_requests(&mark).await;

    // 3. kache's path is cut while pods change; the API server stops, etcd
    //    is compacted past kache's version while it is down; it comes back,
    //    more changes; then kache's path is restored: 410, kache relists,
    //    and its watchers get the difference as ordinary events.
    let mark = audit.mark();
    let port = relay.stop();
    churn.round(&direct).await;
    own.stop_apiserver().await;
    let down = Instant::now();
    // etcd stays up: everything kache's store holds is compacted away.
    let compacted = own.compact();
    tokio::time::sleep(OUTAGE.saturating_sub(down.elapsed())).await;
    own.start_apiserver().await;
    churn.round(&direct).await;
    churn.round(&direct).await;
    churn.sentinel(&direct, "outage").await;
    relay = Relay::start_on(port, c.apiserver_addr);
    checkpoint(&watchers, &direct, &ns, "outage").await;
    let (outage_lists, outage_watches) = kache_upstream_pod_requests(&mark).await;
    assert!(
        outage_lists >= 1,
        "kache never relisted pods after etcd was compacted at revision {compacted}"
    );

    // 4. And ordinary events still flow afterwards.
    churn.round(&direct).await;
    churn.sentinel(&direct, "after").await;
    checkpoint(&watchers, &direct, &ns, "after").await;

    assert_eq!(
        pod_metric(&kache, "kache_cache_watchers").await,
        WATCHERS as f64,
        "kache still serves every watch"
    );
    assert_eq!(
        kache_metric(&kache, "kache_http_requests_total", &[("verb", "watch")]).await,
        watches,
        "a client watched again (kube-runtime resumes an ended watch silently)"
    );
    assert_eq!(
        kache_metric(&kache, "kache_http_requests_total", &[("verb", "list")]).await,
        lists,
        "a client listed again"
    );

    let mut summary = String::new();
    for kind in [Kind::ClientGo, Kind::KubeRuntime] {
        let events: Vec<usize> = watchers
            .iter()
            .filter(|w| w.kind == kind)
            .map(|w| w.seen.lock().unwrap().events)
            .collect();
        summary.push_str(&format!("{:?}: events per watcher {events:?}\n", kind));
    }
    eprintln!(
        "herd: {WATCHERS} watchers, {} pods at the end, ready after {:.0?}, total {:.0?}\n{summary}\
         kache's pod requests upstream (LIST / finished WATCH): after the restart {restart_lists} / {restart_watches}, \
         after the outage and compaction at revision {compacted} {outage_lists} / {outage_watches}",
        churn.alive.len() + 1,
        ready,
        started.elapsed()
    );
    drop(watchers);
    drop(relay);
    drop(kache);
    drop(own);
}
