//! Watches served from kache's memory keep the timing of the API server's
//! watch cache: the same request asked of kache and of the API server gets
//! the same events, the same bookmarks and the same clean end.
//!
//! - A watch that times out gets a BOOKMARK shortly before its end (the
//!   cacher's one 2 s before the deadline) once the resource changed after
//!   the watch's version, none while it stayed quiet; then a clean end.
//! - A watch without a version is the watch cache's, like one at `0`: the
//!   state as ADDED events, then the changes.
//! - A watch from a version older than any kept is the API server's own
//!   `200` + ERROR `410 Expired` (kache forwards it).
//! - A watch from a version newer than any seen is no error: it waits for
//!   later events, then ends.
//!
//! Requests through kache carry a User-Agent of their own; kache forwards a
//! client's User-Agent, so an audit line with it is a watch kache did *not*
//! serve from memory. The resources watched are a CRD of this file's own
//! (nobody else writes to it: its quiet is real) and configmaps in
//! namespaces of its own.
//!
//! No timing is asserted: a bookmark "before the end" is one that arrives
//! before the stream ends, whenever that is.

#![allow(clippy::unwrap_used)] // test helpers, not only #[test] fns (STYLE.md)

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use http::header::CONTENT_TYPE;
use http_body_util::BodyExt;
use kache_tests::{
    client_with_user_agent, cluster, config_from_kubeconfig, metric, rv_of, write_json, AuditFilter,
    AuditMark, Gadgets, Kache, TestNamespace,
};
use kube::client::Body;
use serde_json::{json, Value};
use tokio::time::Instant;

/// Bound on a wait for kache's store or the API server to show a state, and
/// on one request.
const CONVERGE: Duration = Duration::from_secs(60);
/// User-Agent of the requests sent straight to the API server.
const DIRECT_UA: &str = "kache-watch-timing/direct";

/// The same requests asked of kache and of the API server.
struct Sides {
    kache: Kache,
    via: kube::Client,
    via_ua: String,
    direct: kube::Client,
}

impl Sides {
    async fn start() -> Sides {
        let c = cluster();
        let kache = Kache::start(&c.admin_kubeconfig);
        let via_ua = format!("kache-watch-timing/via/{}", kache.addr().port());
        let via = client_with_user_agent(kube::Config::new(kache.url().parse().unwrap()), &via_ua);
        Sides {
            kache,
            via,
            via_ua,
            direct: direct_client(&c.admin_kubeconfig).await,
        }
    }

    /// The watch requests through kache that reached the API server after
    /// `mark` (their own User-Agent), once a sentinel shows the log complete.
    async fn forwarded_watches(&self, mark: &AuditMark, uri_prefix: &str) -> Vec<String> {
        let (mark, filter, ua) = (
            mark.clone(),
            AuditFilter::new().verb("watch").uri_prefix(uri_prefix),
            self.via_ua.clone(),
        );
        tokio::task::spawn_blocking(move || {
            mark.matching_after_sentinel(&filter)
                .into_iter()
                .filter(|e| e.user_agent == ua)
                .map(|e| e.request_uri)
                .collect()
        })
        .await
        .unwrap()
    }

    /// Polls until an rv=0 LIST of `collection` through kache is answered from
    /// its store (`resource`, as its metrics name it) and the API server's
    /// and kache's both hold `names`; returns each side's list version.
    async fn until_both_list(&self, collection: &str, resource: &str, names: &[&str]) -> (u64, u64) {
        let path = format!("{collection}?resourceVersion=0");
        let want: BTreeSet<&str> = names.iter().copied().collect();
        let deadline = Instant::now() + CONVERGE;
        loop {
            let hits = || {
                metric(
                    &self.kache.metrics(),
                    "kache_cache_hits_total",
                    &[("resource", resource)],
                )
            };
            let before = hits();
            let (via, direct) = tokio::join!(get_json(&self.via, &path), get_json(&self.direct, &path));
            let from_memory = hits() > before;
            if from_memory && item_names(&via) == want && item_names(&direct) == want {
                return (rv_of(&via), rv_of(&direct));
            }
            assert!(
                Instant::now() < deadline,
                "{path}: kache (from memory: {from_memory}) and the API server never both listed {want:?}: {:?} / {:?}",
                item_names(&via),
                item_names(&direct)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

async fn direct_client(kubeconfig: &Path) -> kube::Client {
    client_with_user_agent(config_from_kubeconfig(kubeconfig).await, DIRECT_UA)
}

async fn get_json(client: &kube::Client, path: &str) -> Value {
    kache_tests::get_json(client, path, CONVERGE).await
}

fn item_names(list: &Value) -> BTreeSet<&str> {
    list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["metadata"]["name"].as_str())
        .collect()
}

/// A whole watch: its status, Content-Type and every event until the
/// stream ended cleanly (a broken stream fails the test).
#[derive(Debug)]
struct Watched {
    status: u16,
    content_type: String,
    events: Vec<Value>,
}

impl Watched {
    /// (type, name, resourceVersion) of each event.
    fn summary(&self) -> Vec<(String, String, u64)> {
        self.events
            .iter()
            .map(|e| {
                (
                    e["type"].as_str().unwrap_or_default().to_string(),
                    e["object"]["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    rv_of(&e["object"]),
                )
            })
            .collect()
    }

    fn types(&self) -> Vec<String> {
        self.summary().into_iter().map(|(t, _, _)| t).collect()
    }
}

/// Opens a watch: once its answer's head is here, the API server (and kache)
/// has registered the watcher and taken the events it replays, so a change
/// made now reaches it as a live event.
async fn open_watch(client: &kube::Client, path: &str) -> http::Response<Body> {
    let request = http::Request::get(path).body(Body::empty()).unwrap();
    tokio::time::timeout(CONVERGE, client.send(request))
        .await
        .unwrap_or_else(|_| panic!("WATCH {path}: no answer within {CONVERGE:?}"))
        .unwrap_or_else(|e| panic!("WATCH {path}: {e}"))
}

/// Reads a watch until its stream ends; a broken stream fails the test.
async fn read_to_end(path: &str, response: http::Response<Body>) -> Watched {
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let mut body = response.into_body();
    let mut events = Vec::new();
    let mut pending = Vec::new();
    // Every watch here asks for a timeout well under this bound.
    let deadline = Instant::now() + 2 * CONVERGE;
    loop {
        let frame = tokio::time::timeout_at(deadline, body.frame())
            .await
            .unwrap_or_else(|_| panic!("WATCH {path}: still open after {:?}", 2 * CONVERGE));
        let Some(frame) = frame else { break };
        let frame = frame.unwrap_or_else(|e| panic!("WATCH {path}: broken stream: {e}"));
        let Ok(data) = frame.into_data() else { continue };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let event: Value = serde_json::from_slice(&line).unwrap_or_else(|e| {
                panic!("WATCH {path}: not JSON ({e}): {}", String::from_utf8_lossy(&line))
            });
            events.push(event);
        }
    }
    assert!(
        pending.iter().all(u8::is_ascii_whitespace),
        "WATCH {path}: ended inside an event: {}",
        String::from_utf8_lossy(&pending)
    );
    Watched {
        status,
        content_type,
        events,
    }
}

/// Opens `via_path` through kache and `direct_path` at the API server, runs
/// `meanwhile` once both are open, then reads both to their end.
async fn watch_both(
    sides: &Sides,
    via_path: &str,
    direct_path: &str,
    meanwhile: impl std::future::Future<Output = ()>,
) -> (Watched, Watched) {
    let (via, direct) = tokio::join!(
        open_watch(&sides.via, via_path),
        open_watch(&sides.direct, direct_path)
    );
    meanwhile.await;
    tokio::join!(read_to_end(via_path, via), read_to_end(direct_path, direct))
}

// ----------------------------------------------------------------- CRD ----

/// A gadget object of the test's CRD.
fn gadget(crd: &Gadgets, name: &str) -> Value {
    json!({"apiVersion": format!("{}/v1", crd.group), "kind": "Gadget", "metadata": {"name": name}})
}

// --------------------------------------------------------------- tests ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_watch_gets_a_bookmark_before_its_clean_end_only_if_the_resource_moved() {
    let c = cluster();
    let ns = TestNamespace::create("watch-timing");
    let sides = Sides::start().await;
    let crd = Gadgets::create(&sides.direct, "watch-timing").await;
    crd.until_discovered(&sides.via).await;
    let collection = crd.collection(ns.name());
    // A first object, so that the API server's cache of the CRD has handled
    // an event (v1.20 sends no bookmark at all before its first one).
    write_json(&sides.direct, "POST", &collection, Some(&gadget(&crd, "first"))).await;
    let (via_rv, direct_rv) = sides
        .until_both_list(&collection, &crd.metric(), &["first"])
        .await;
    let mark = c.audit().mark();
    let path = |rv: u64, timeout: u64| {
        format!(
            "{collection}?watch=true&resourceVersion={rv}&allowWatchBookmarks=true&timeoutSeconds={timeout}"
        )
    };

    // Quiet: nothing past either side's version, so no bookmark; a clean end.
    let (via, direct) = watch_both(&sides, &path(via_rv, 5), &path(direct_rv, 5), async {}).await;
    assert_eq!((via.status, direct.status), (200, 200));
    assert_eq!(via.content_type, direct.content_type);
    assert_eq!(
        (via.summary(), direct.summary()),
        (vec![], vec![]),
        "a quiet watch sends nothing before its clean end (via kache, direct)"
    );

    // A change after the watches started: its event, then a bookmark at a
    // version no older than it before the end, on both sides.
    let (via, direct) = watch_both(&sides, &path(via_rv, 12), &path(direct_rv, 12), async {
        write_json(&sides.direct, "POST", &collection, Some(&gadget(&crd, "second"))).await;
    })
    .await;
    for (side, watched) in [("via kache", &via), ("direct", &direct)] {
        assert_eq!(
            watched.types(),
            ["ADDED", "BOOKMARK"],
            "{side}: {:?}",
            watched.summary()
        );
        let (_, name, added_rv) = &watched.summary()[0];
        assert_eq!(name, "second", "{side}");
        let bookmark = &watched.events[1]["object"];
        assert!(
            rv_of(bookmark) >= *added_rv,
            "{side}: a bookmark at {} after the event at {added_rv}",
            rv_of(bookmark)
        );
        assert_eq!(bookmark["kind"], "Gadget", "{side}: {bookmark}");
    }
    assert_eq!(
        sides.forwarded_watches(&mark, &collection).await,
        Vec::<String>::new(),
        "the watches through kache were served from its memory"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_without_a_version_gets_the_state_then_the_changes_from_memory() {
    let c = cluster();
    let ns = TestNamespace::create("watch-timing");
    let sides = Sides::start().await;
    let collection = format!("/api/v1/namespaces/{}/configmaps", ns.name());
    let names = ["a", "b", "c"];
    for name in names {
        let body = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}});
        write_json(&sides.direct, "POST", &collection, Some(&body)).await;
    }
    sides.until_both_list(&collection, "v1/configmaps", &names).await;
    let mark = c.audit().mark();
    let path = format!("{collection}?watch=true&timeoutSeconds=8");
    let (via, direct) = watch_both(&sides, &path, &path, async {
        let body = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "d"}});
        write_json(&sides.direct, "POST", &collection, Some(&body)).await;
    })
    .await;
    assert_eq!((via.status, direct.status), (200, 200));
    assert_eq!(via.content_type, direct.content_type);
    // The state in any order (v1.20 replays a Go map), then the change.
    let state = |w: &Watched| {
        let summary = w.summary();
        let (head, tail) = summary.split_at(names.len().min(summary.len()));
        (head.iter().cloned().collect::<BTreeSet<_>>(), tail.to_vec())
    };
    assert_eq!(state(&via), state(&direct), "via kache / direct");
    assert_eq!(
        via.types(),
        ["ADDED", "ADDED", "ADDED", "ADDED"],
        "{:?}",
        via.summary()
    );
    assert_eq!(
        sides.forwarded_watches(&mark, &collection).await,
        Vec::<String>::new(),
        "the watch through kache was served from its memory"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_from_versions_too_old_or_too_new_are_answered_as_the_api_server_answers_them() {
    let c = cluster();
    let ns = TestNamespace::create("watch-timing");
    let sides = Sides::start().await;
    // A CRD of its own: the API server's cache of it starts at the version
    // the CRD was established at, so older versions are gone for sure.
    let crd = Gadgets::create(&sides.direct, "watch-timing").await;
    crd.until_discovered(&sides.via).await;
    let collection = crd.collection(ns.name());
    write_json(&sides.direct, "POST", &collection, Some(&gadget(&crd, "one"))).await;
    let (_, current) = sides.until_both_list(&collection, &crd.metric(), &["one"]).await;
    let mark = c.audit().mark();

    // Older than any version either keeps: the API server's 200, then one
    // ERROR event, 410 Expired, then the end (`too old resource version: 1
    // (N)`, N the oldest it has).
    let too_old = format!("{collection}?watch=true&resourceVersion=1&timeoutSeconds=30");
    let (via, direct) = watch_both(&sides, &too_old, &too_old, async {}).await;
    assert_eq!((via.status, direct.status), (200, 200));
    for (side, watched) in [("via kache", &via), ("direct", &direct)] {
        assert_eq!(watched.types(), ["ERROR"], "{side}: {:?}", watched.events);
        let status = &watched.events[0]["object"];
        assert_eq!(
            (&status["kind"], &status["code"], &status["reason"]),
            (&json!("Status"), &json!(410), &json!("Expired")),
            "{side}: {status}"
        );
        assert!(
            status["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("too old resource version: 1 (")),
            "{side}: {status}"
        );
    }
    assert_eq!(
        sides.forwarded_watches(&mark, &too_old).await,
        [too_old.as_str()],
        "a version kache no longer has is the API server's to answer"
    );

    // Newer than any version: no error, no event; the watch waits, then ends.
    let too_new = format!(
        "{collection}?watch=true&resourceVersion={}&timeoutSeconds=3",
        current + 1_000_000
    );
    let (via, direct) = watch_both(&sides, &too_new, &too_new, async {}).await;
    assert_eq!((via.status, direct.status), (200, 200));
    assert_eq!(
        (via.summary(), direct.summary()),
        (vec![], vec![]),
        "via kache, direct"
    );
}
