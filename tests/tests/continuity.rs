//! Watch continuity against the real API server: watches kache serves from
//! its cache outlive kache's own upstream watch. kache's path to the API
//! server is cut (a [`Relay`]) while configmaps change, the API server
//! restarts, and etcd is compacted so kache's version is gone (`410`, kache
//! relists); through all of it the clients' watches stay open, no client
//! relists, and each client's view ends equal to the API server's.
//!
//! The test restarts its API server, so it starts a cluster of its own
//! (`target/kache-cluster-continuity`).

#![allow(clippy::unwrap_used)] // test helpers, not only #[test] fns (STYLE.md)

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use http_body_util::BodyExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kache_tests::{
    http_get, kubeconfig_with_server, metric, target_dir, unique_name, write_json, Kache, OwnCluster, Relay,
};
use kube::api::Api;
use kube::client::Body;
use kube::runtime::watcher;
use serde_json::{json, Value};
use tokio::time::Instant;

/// Bound on any wait for the clients to converge. Generous: the machine's
/// cores are shared with builds and other test binaries.
const CONVERGE: Duration = Duration::from_secs(120);
/// Bound on one request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The raw watches' `timeoutSeconds`: longer than the test, so any end
/// before it is kache's doing.
const RAW_WATCH_TIMEOUT: u64 = 1200;
/// The label the selective watcher selects on.
const SELECTED: &str = "keep=yes";

// ------------------------------------------------------------ cluster ----

/// The audit log from a point on: kache's relists of configmaps.
struct AuditSince {
    path: PathBuf,
    offset: u64,
}

impl AuditSince {
    fn mark(path: &Path) -> AuditSince {
        AuditSince {
            path: path.to_path_buf(),
            offset: std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
        }
    }

    fn relists(&self) -> usize {
        let text = std::fs::read(&self.path).unwrap_or_default();
        let start = usize::try_from(self.offset).unwrap().min(text.len());
        String::from_utf8_lossy(&text[start..])
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| {
                e["stage"] == "ResponseComplete"
                    && e["verb"] == "list"
                    && e["requestURI"] == "/api/v1/configmaps?resourceVersion=0"
            })
            .count()
    }
}

// ------------------------------------------------------------ clients ----

async fn client_from(kubeconfig: &Path) -> kube::Client {
    let file = kube::config::Kubeconfig::read_from(kubeconfig).unwrap();
    let mut config = kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
        .await
        .unwrap();
    config.default_retry = false;
    kube::Client::try_from(config).unwrap()
}

fn via_client(kache: &Kache) -> kube::Client {
    let mut config = kube::Config::new(kache.url().parse().unwrap());
    config.default_retry = false;
    kube::Client::try_from(config).unwrap()
}

/// A JSON write straight to the API server (see [`write_json`]).
async fn write(client: &kube::Client, method: &str, path: &str, body: Option<&Value>) -> Value {
    write_json(client, method, path, body).await
}

/// name → data of configmaps.
type View = BTreeMap<String, Value>;

/// The API server's view (a consistent LIST), optionally through a selector.
async fn truth(direct: &kube::Client, ns: &str, selector: Option<&str>) -> View {
    let api: Api<ConfigMap> = Api::namespaced(direct.clone(), ns);
    let mut params = kube::api::ListParams::default();
    if let Some(selector) = selector {
        params = params.labels(selector);
    }
    let list = tokio::time::timeout(REQUEST_TIMEOUT, api.list(&params))
        .await
        .unwrap()
        .unwrap();
    list.items.iter().map(view_entry).collect()
}

fn view_entry(cm: &ConfigMap) -> (String, Value) {
    (
        cm.metadata.name.clone().unwrap_or_default(),
        serde_json::to_value(cm.data.clone().unwrap_or_default()).unwrap(),
    )
}

/// What one client watching through kache has seen.
#[derive(Default)]
struct Seen {
    view: View,
    /// Raw watches: the stream ended. kube-rs: errors it reported.
    ended: Option<String>,
    /// kube-rs: how many times it (re)started with a list.
    inits: usize,
}

struct Watcher {
    name: String,
    selector: Option<&'static str>,
    seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A raw `?watch=1&resourceVersion=0` stream through kache, applied to a view.
async fn raw_watcher(
    via: &kube::Client,
    ns: &str,
    name: &str,
    selector: Option<&'static str>,
    extra: &str,
) -> Watcher {
    let mut path = format!("/api/v1/namespaces/{ns}/configmaps?watch=1&resourceVersion=0&timeoutSeconds={RAW_WATCH_TIMEOUT}{extra}");
    if let Some(selector) = selector {
        path.push_str(&format!("&labelSelector={}", selector.replace('=', "%3D")));
    }
    let request = http::Request::get(&path).body(Body::empty()).unwrap();
    let response = tokio::time::timeout(REQUEST_TIMEOUT, via.send(request))
        .await
        .unwrap_or_else(|_| panic!("WATCH {path}: no answer"))
        .unwrap_or_else(|e| panic!("WATCH {path}: {e}"));
    assert_eq!(response.status(), 200, "WATCH {path}");
    let mut body = response.into_body();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let task = {
        let seen = seen.clone();
        tokio::spawn(async move {
            let mut buffer = Vec::new();
            let end = loop {
                match body.frame().await {
                    Some(Ok(frame)) => {
                        let Ok(data) = frame.into_data() else { continue };
                        buffer.extend_from_slice(&data);
                    }
                    Some(Err(e)) => break format!("error: {e}"),
                    None => break "EOF".to_string(),
                }
                for line in kache_tests::take_lines(&mut buffer) {
                    let event: Value = serde_json::from_slice(&line).unwrap();
                    let object = &event["object"];
                    let name = object["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string();
                    let data = object.get("data").cloned().unwrap_or_else(|| json!({}));
                    let mut seen = seen.lock().unwrap();
                    match event["type"].as_str().unwrap_or_default() {
                        "ADDED" | "MODIFIED" => {
                            seen.view.insert(name, data);
                        }
                        "DELETED" => {
                            seen.view.remove(&name);
                        }
                        "BOOKMARK" => {}
                        other => {
                            seen.ended = Some(format!("{other} event: {object}"));
                        }
                    }
                }
            };
            seen.lock().unwrap().ended.get_or_insert(end);
        })
    };
    Watcher {
        name: name.to_string(),
        selector,
        seen,
        task,
    }
}

/// kube-runtime's watcher through kache, listing at `resourceVersion=0`
/// (`any_semantic`, no pagination: a paginated list is a consistent read,
/// which kache forwards).
fn kube_watcher(via: &kube::Client, ns: &str) -> Watcher {
    let api: Api<ConfigMap> = Api::namespaced(via.clone(), ns);
    let mut config = watcher::Config::default()
        .any_semantic()
        .timeout(RAW_WATCH_TIMEOUT as u32 / 2);
    config.page_size = None;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let task = {
        let seen = seen.clone();
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(watcher(api, config));
            while let Some(event) = stream.next().await {
                let mut seen = seen.lock().unwrap();
                match event {
                    Ok(watcher::Event::Init) => {
                        seen.inits += 1;
                        seen.view.clear();
                    }
                    Ok(watcher::Event::InitApply(cm) | watcher::Event::Apply(cm)) => {
                        let (name, data) = view_entry(&cm);
                        seen.view.insert(name, data);
                    }
                    Ok(watcher::Event::Delete(cm)) => {
                        seen.view.remove(&view_entry(&cm).0);
                    }
                    Ok(watcher::Event::InitDone) => {}
                    Err(e) => {
                        seen.ended.get_or_insert(format!("watcher error: {e}"));
                    }
                }
            }
        })
    };
    Watcher {
        name: "kube-runtime watcher".into(),
        selector: None,
        seen,
        task,
    }
}

// ------------------------------------------------------------ kache ----

async fn configmap_metric(kache: &Kache, name: &str) -> f64 {
    let r = http_get(&format!("http://{}/metrics", kache.admin_addr()), &[]).await;
    assert_eq!(r.status(), 200, "kache /metrics");
    metric(
        &String::from_utf8_lossy(r.body()),
        name,
        &[("resource", "v1/configmaps"), ("encoding", "json")],
    )
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

/// Waits until every watcher shows the sentinel at `mark` (the positive
/// marker that it has caught up), then checks that none ended, the kube-rs
/// watcher never relisted, and each view equals the API server's.
async fn assert_continuous(watchers: &[Watcher], direct: &kube::Client, ns: &str, mark: &str, kache: &Kache) {
    until(&format!("{mark}: every watcher sees the sentinel"), || async {
        let lagging: Vec<_> = watchers
            .iter()
            .filter(|w| {
                let seen = w.seen.lock().unwrap();
                seen.ended.is_none() && seen.view.get("sentinel") != Some(&json!({"mark": mark}))
            })
            .map(|w| w.name.clone())
            .collect();
        if lagging.is_empty() {
            Ok(())
        } else {
            Err(format!("lagging: {lagging:?}\nkache stderr:\n{}", kache.stderr()))
        }
    })
    .await;
    for w in watchers {
        let seen = w.seen.lock().unwrap();
        assert_eq!(seen.ended, None, "{mark}: {}'s watch ended", w.name);
        if w.name.starts_with("kube-runtime") {
            assert_eq!(seen.inits, 1, "{mark}: the kube-runtime watcher relisted");
        }
    }
    for w in watchers {
        let want = truth(direct, ns, w.selector).await;
        let have = w.seen.lock().unwrap().view.clone();
        assert_eq!(
            have, want,
            "{mark}: {}'s view differs from the API server's",
            w.name
        );
    }
}

/// Some changes of every kind, made straight to the API server: creates,
/// updates, deletes, and an object moving out of and into the selector.
async fn changes(direct: &kube::Client, ns: &str, round: usize) {
    let coll = format!("/api/v1/namespaces/{ns}/configmaps");
    let obj = |name: &str| format!("{coll}/{name}");
    let cm = |name: &str, keep: &str| {
        json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "labels": {"keep": keep}}, "data": {"v": name}})
    };
    write(direct, "POST", &coll, Some(&cm(&format!("new-{round}-a"), "yes"))).await;
    write(direct, "POST", &coll, Some(&cm(&format!("new-{round}-b"), "no"))).await;
    write(direct, "DELETE", &obj(&format!("cm-{round}")), None).await;
    let patch = |data: &str, keep: &str| json!({"metadata": {"labels": {"keep": keep}}, "data": {"v": data}});
    write(
        direct,
        "PATCH",
        &obj("mover"),
        Some(&patch(
            &format!("{round}"),
            if round.is_multiple_of(2) { "no" } else { "yes" },
        )),
    )
    .await;
    write(
        direct,
        "PATCH",
        &obj("counter"),
        Some(&patch(&format!("{round}"), "yes")),
    )
    .await;
    write(direct, "POST", &coll, Some(&cm(&format!("brief-{round}"), "yes"))).await;
    write(direct, "DELETE", &obj(&format!("brief-{round}")), None).await;
}

async fn set_sentinel(direct: &kube::Client, ns: &str, mark: &str) {
    write(
        direct,
        "PATCH",
        &format!("/api/v1/namespaces/{ns}/configmaps/sentinel"),
        Some(&json!({"data": {"mark": mark}})),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_watches_through_kache_outlive_cuts_restarts_and_relists() {
    let own = tokio::task::spawn_blocking(|| OwnCluster::up(&target_dir().join("kache-cluster-continuity")))
        .await
        .unwrap();
    let c = &own.cluster;
    let direct = client_from(&c.admin_kubeconfig).await;
    // kache reaches the API server through a relay the test can cut.
    let mut relay = Relay::start(c.apiserver_addr);
    let scratch = tempfile::tempdir().unwrap();
    let kubeconfig = scratch.path().join("relay.kubeconfig");
    kubeconfig_with_server(
        &c.admin_kubeconfig,
        &format!("https://127.0.0.1:{}", relay.port()),
        &kubeconfig,
    );
    let kache = Kache::start(&kubeconfig);
    let via = via_client(&kache);

    let ns = unique_name("continuity");
    write(
        &direct,
        "POST",
        "/api/v1/namespaces",
        Some(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})),
    )
    .await;
    let coll = format!("/api/v1/namespaces/{ns}/configmaps");
    let cm = |name: &str, data: Value| {
        json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "labels": {"keep": "yes"}}, "data": data})
    };
    for i in 0..5 {
        write(
            &direct,
            "POST",
            &coll,
            Some(&cm(&format!("cm-{i}"), json!({"v": i.to_string()}))),
        )
        .await;
    }
    for name in ["mover", "counter"] {
        write(&direct, "POST", &coll, Some(&cm(name, json!({"v": "start"})))).await;
    }
    write(
        &direct,
        "POST",
        &coll,
        Some(&cm("sentinel", json!({"mark": "start"}))),
    )
    .await;

    // kache caches configmaps before the watchers start, so their watches
    // are served from its cache (a forwarded one would end with the upstream).
    let list = format!("{coll}?resourceVersion=0");
    until("kache answers configmap lists from its cache", || async {
        let before = configmap_metric(&kache, "kache_cache_hits_total").await;
        let request = http::Request::get(&list).body(Body::empty()).unwrap();
        let _ = via.send(request).await.map_err(|e| e.to_string())?;
        if configmap_metric(&kache, "kache_cache_hits_total").await > before {
            Ok(())
        } else {
            Err("not yet".into())
        }
    })
    .await;

    let watchers = vec![
        kube_watcher(&via, &ns),
        raw_watcher(&via, &ns, "raw watch", None, "").await,
        raw_watcher(
            &via,
            &ns,
            "raw watch with bookmarks",
            None,
            "&allowWatchBookmarks=true",
        )
        .await,
        raw_watcher(
            &via,
            &ns,
            "raw watch of keep=yes",
            Some(SELECTED),
            "&allowWatchBookmarks=true",
        )
        .await,
    ];
    until("every watch is served from kache's cache", || async {
        let n = configmap_metric(&kache, "kache_cache_watchers").await;
        if n == watchers.len() as f64 {
            Ok(())
        } else {
            Err(format!("{n} watchers in kache"))
        }
    })
    .await;
    set_sentinel(&direct, &ns, "0").await;
    assert_continuous(&watchers, &direct, &ns, "0", &kache).await;

    // 1. kache's upstream is cut while things change; it resumes from its
    //    version (the API server still has the events).
    let port = relay.stop();
    changes(&direct, &ns, 0).await;
    set_sentinel(&direct, &ns, "1").await;
    relay = Relay::start_on(port, c.apiserver_addr);
    assert_continuous(&watchers, &direct, &ns, "1", &kache).await;

    // 2. Cut, changes, the API server restarts: its watch cache starts afresh,
    //    kache's version is too old for it (410), kache relists.
    let audit = AuditSince::mark(&c.audit_log);
    let port = relay.stop();
    changes(&direct, &ns, 1).await;
    own.restart_apiserver().await;
    changes(&direct, &ns, 2).await;
    set_sentinel(&direct, &ns, "2").await;
    relay = Relay::start_on(port, c.apiserver_addr);
    assert_continuous(&watchers, &direct, &ns, "2", &kache).await;
    eprintln!("after the restart, kache relisted {} time(s)", audit.relists());

    // 3. Cut, changes, etcd compacted past kache's version, the API server
    //    restarted: kache must relist, and its watchers get the difference.
    let audit = AuditSince::mark(&c.audit_log);
    let port = relay.stop();
    changes(&direct, &ns, 3).await;
    let revision = own.compact();
    own.restart_apiserver().await;
    set_sentinel(&direct, &ns, "3").await;
    relay = Relay::start_on(port, c.apiserver_addr);
    assert_continuous(&watchers, &direct, &ns, "3", &kache).await;
    assert!(
        audit.relists() >= 1,
        "kache never relisted after etcd was compacted at {revision}"
    );

    // And ordinary events still flow afterwards.
    changes(&direct, &ns, 4).await;
    set_sentinel(&direct, &ns, "4").await;
    assert_continuous(&watchers, &direct, &ns, "4", &kache).await;
    assert_eq!(
        configmap_metric(&kache, "kache_cache_watchers").await,
        watchers.len() as f64,
        "kache still serves every watch"
    );
    drop(watchers);
    drop(relay);
    drop(kache);
    drop(own);
}
