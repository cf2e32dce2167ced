//! Streaming lists (KEP-3157) served from kache's memory, in front of a
//! v1.20 API server that knows nothing of them.
//!
//! - A client doing what client-go's reflector does in `watchList` (raw
//!   HTTP: `watch=true&sendInitialEvents=true&allowWatchBookmarks=true&
//!   resourceVersionMatch=NotOlderThan`, no version the first time) gets the
//!   state as ADDED events, then a BOOKMARK annotated
//!   `k8s.io/initial-events-end`: that state equals a LIST straight from the
//!   API server, even for an object created just before (a consistent read),
//!   and the changes made after follow. Resuming at the bookmark's version
//!   works the same way. Through it all, nothing of the client reaches the
//!   API server, and the only LIST kache sends is its `limit=1` question for
//!   the API server's current version: no list of the objects.
//! - The same in protobuf, through a label selector.
//! - A kube-runtime `watcher` configured with `streaming_lists()` syncs
//!   through kache to the API server's state, then follows a change.
//! - What a current API server refuses with 422 (and v1.20 would misread)
//!   gets kache's own 422.
//!
//! Requests through kache carry a User-Agent of their own; kache forwards a
//! client's User-Agent, so an audit line with it is a request kache did not
//! serve from memory. The first test's resource is a CRD of its own, so
//! every request for it in the audit log is this test's or its kache's.

#![allow(clippy::unwrap_used)] // test helpers, not only #[test] fns (STYLE.md)

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use http::header::{ACCEPT, CONTENT_TYPE};
use http_body_util::BodyExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kache_tests::{
    client_with_user_agent, cluster, config_from_kubeconfig, metric, rv_of, write_json, AuditMark, Gadgets,
    Kache, TestNamespace,
};
use kube::api::Api;
use kube::client::Body;
use kube::runtime::watcher;
use serde_json::{json, Value};
use tokio::time::Instant;

/// Bound on a wait for a state, on one request's answer and on one event.
const CONVERGE: Duration = Duration::from_secs(60);
/// User-Agent of the requests sent straight to the API server.
const DIRECT_UA: &str = "kache-watchlist/direct";
const PROTOBUF: &str = "application/vnd.kubernetes.protobuf";
const INITIAL_EVENTS_END: &str = "k8s.io/initial-events-end";

async fn direct_client(kubeconfig: &Path) -> kube::Client {
    client_with_user_agent(config_from_kubeconfig(kubeconfig).await, DIRECT_UA)
}

/// A client of `kache` with a User-Agent of its own (returned too).
fn client_via(kache: &Kache, who: &str) -> (kube::Client, String) {
    let ua = format!("kache-watchlist/{who}/{}", kache.addr().port());
    (
        client_with_user_agent(kube::Config::new(kache.url().parse().unwrap()), &ua),
        ua,
    )
}

async fn get_json(client: &kube::Client, path: &str) -> Value {
    kache_tests::get_json(client, path, CONVERGE).await
}

/// name → resourceVersion of a list's items.
fn versions(list: &Value) -> BTreeMap<String, u64> {
    list["items"]
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .map(|i| (i["metadata"]["name"].as_str().unwrap().to_string(), rv_of(i)))
        .collect()
}

/// What client-go's reflector asks in `watchList`: at `resource_version`
/// (none the first time), with `extra` query parameters.
fn watch_list_path(collection: &str, resource_version: Option<u64>, extra: &str) -> String {
    let version = resource_version.map_or(String::new(), |rv| format!("&resourceVersion={rv}"));
    format!(
        "{collection}?allowWatchBookmarks=true&resourceVersionMatch=NotOlderThan&sendInitialEvents=true\
         &timeoutSeconds=300&watch=true{version}{extra}"
    )
}

/// Polls until an rv=0 LIST of `collection` through kache in `accept` is
/// answered from its store (`resource` in its metrics) and holds what the
/// API server's consistent LIST holds.
async fn until_served_from_memory(
    kache: &Kache,
    via: &kube::Client,
    direct: &kube::Client,
    collection: &str,
    resource: &str,
    accept: &str,
) {
    let path = format!("{collection}?resourceVersion=0");
    let encoding = if accept == PROTOBUF { "protobuf" } else { "json" };
    let deadline = Instant::now() + CONVERGE;
    loop {
        let hits = || {
            metric(
                &kache.metrics(),
                "kache_cache_hits_total",
                &[("resource", resource), ("encoding", encoding)],
            )
        };
        let before = hits();
        let request = http::Request::get(&path)
            .header(ACCEPT, accept)
            .body(Body::empty())
            .unwrap();
        let answer = tokio::time::timeout(CONVERGE, via.send(request))
            .await
            .unwrap()
            .unwrap();
        let served = answer.status() == 200 && hits() > before;
        let names_via = if accept == PROTOBUF {
            None
        } else {
            let body = answer.into_body().collect().await.unwrap().to_bytes();
            Some(versions(&serde_json::from_slice(&body).unwrap()))
        };
        let direct_list = versions(&get_json(direct, collection).await);
        if served && names_via.as_ref().is_none_or(|v| *v == direct_list) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{path} ({accept}) was never served from kache's memory with the API server's state"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every audit line (any stage: an open watch too) after `mark` sent with
/// `user_agent`, once a sentinel shows the log complete.
async fn reached_api_server(mark: &AuditMark, user_agent: &str) -> Vec<String> {
    let (mark, ua) = (mark.clone(), user_agent.to_string());
    tokio::task::spawn_blocking(move || {
        mark.entries_after_sentinel()
            .into_iter()
            .filter(|e| e["userAgent"] == ua.as_str())
            .map(|e| format!("{} {} {}", e["stage"], e["verb"], e["requestURI"]))
            .collect()
    })
    .await
    .unwrap()
}

// ---------------------------------------------------------------- watch ----

/// One event of a watch, in either encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Event {
    kind: String,
    name: String,
    resource_version: u64,
    /// The BOOKMARK is annotated `k8s.io/initial-events-end: "true"`.
    initial_events_end: bool,
    /// An ERROR's Status code.
    code: Option<u64>,
}

/// A watch being read event by event.
struct Watch {
    path: String,
    body: Body,
    pending: Vec<u8>,
    protobuf: bool,
}

impl Watch {
    async fn open(client: &kube::Client, path: &str, accept: &str) -> Watch {
        let request = http::Request::get(path)
            .header(ACCEPT, accept)
            .body(Body::empty())
            .unwrap();
        let response = tokio::time::timeout(CONVERGE, client.send(request))
            .await
            .unwrap_or_else(|_| panic!("WATCH {path}: no answer within {CONVERGE:?}"))
            .unwrap_or_else(|e| panic!("WATCH {path}: {e}"));
        assert_eq!(response.status(), 200, "WATCH {path}");
        let content_type = response.headers()[CONTENT_TYPE].to_str().unwrap().to_string();
        let protobuf = accept == PROTOBUF;
        let expected = if protobuf {
            "application/vnd.kubernetes.protobuf;stream=watch"
        } else {
            "application/json"
        };
        assert_eq!(content_type, expected, "WATCH {path}");
        Watch {
            path: path.to_string(),
            body: response.into_body(),
            pending: Vec::new(),
            protobuf,
        }
    }

    async fn next(&mut self) -> Event {
        let deadline = Instant::now() + CONVERGE;
        loop {
            if let Some(event) = self.take() {
                return event;
            }
            let frame = tokio::time::timeout_at(deadline, self.body.frame())
                .await
                .unwrap_or_else(|_| panic!("WATCH {}: no event within {CONVERGE:?}", self.path))
                .unwrap_or_else(|| panic!("WATCH {}: ended", self.path))
                .unwrap_or_else(|e| panic!("WATCH {}: broken stream: {e}", self.path));
            if let Ok(data) = frame.into_data() {
                self.pending.extend_from_slice(&data);
            }
        }
    }

    /// The next whole event in the buffer, if any.
    fn take(&mut self) -> Option<Event> {
        if self.protobuf {
            let len = u32::from_be_bytes(self.pending.get(..4)?.try_into().unwrap()) as usize;
            let frame: Vec<u8> = self.pending.get(4..4 + len)?.to_vec();
            self.pending.drain(..4 + len);
            return Some(protobuf_event(&frame));
        }
        let end = self.pending.iter().position(|b| *b == b'\n')?;
        let line: Vec<u8> = self.pending.drain(..=end).collect();
        let event: Value =
            serde_json::from_slice(&line).unwrap_or_else(|e| panic!("WATCH {}: not JSON ({e})", self.path));
        let object = &event["object"];
        Some(Event {
            kind: event["type"].as_str().unwrap_or_default().to_string(),
            name: object["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            resource_version: rv_of(object),
            initial_events_end: object["metadata"]["annotations"][INITIAL_EVENTS_END] == "true",
            code: object["code"].as_u64(),
        })
    }

    /// The initial events up to the bookmark that ends them: name →
    /// resourceVersion, and the bookmark's version.
    async fn initial_state(&mut self) -> (BTreeMap<String, u64>, u64) {
        let mut state = BTreeMap::new();
        loop {
            let event = self.next().await;
            match event.kind.as_str() {
                "ADDED" => {
                    assert!(!event.initial_events_end, "{event:?}");
                    let previous = state.insert(event.name.clone(), event.resource_version);
                    assert_eq!(previous, None, "WATCH {}: {} sent twice", self.path, event.name);
                }
                "BOOKMARK" if event.initial_events_end => return (state, event.resource_version),
                _ => panic!("WATCH {}: {event:?} among the initial events", self.path),
            }
        }
    }
}

// --------------------------------------------------------------- protobuf ----

enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

fn varint(buf: &mut &[u8]) -> u64 {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (byte, rest) = buf.split_first().expect("truncated varint");
        *buf = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            break;
        }
    }
    value
}

/// The fields of a protobuf message (varints and length-delimited only, as
/// in every message read here).
fn fields(mut buf: &[u8]) -> Vec<(u64, Field<'_>)> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let key = varint(&mut buf);
        let field = match key & 7 {
            0 => Field::Varint(varint(&mut buf)),
            2 => {
                let len = usize::try_from(varint(&mut buf)).unwrap();
                let (bytes, rest) = buf.split_at(len);
                buf = rest;
                Field::Bytes(bytes)
            }
            other => panic!("wire type {other}"),
        };
        out.push((key >> 3, field));
    }
    out
}

fn bytes_of(message: &[u8], number: u64) -> Vec<&[u8]> {
    fields(message)
        .into_iter()
        .filter_map(|(n, f)| match f {
            Field::Bytes(b) if n == number => Some(b),
            _ => None,
        })
        .collect()
}

fn text(message: &[u8], number: u64) -> String {
    bytes_of(message, number)
        .first()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_default()
}

/// A `WatchEvent{type, object: RawExtension{raw: k8s\0 + Unknown{…, raw}}}`.
fn protobuf_event(frame: &[u8]) -> Event {
    let kind = text(frame, 1);
    let raw = bytes_of(bytes_of(frame, 2)[0], 1)[0];
    let unknown = raw.strip_prefix(b"k8s\0").expect("magic");
    let object = bytes_of(unknown, 2)[0];
    if kind == "ERROR" {
        let code = fields(object).into_iter().find_map(|(n, f)| match f {
            Field::Varint(v) if n == 6 => Some(v),
            _ => None,
        });
        return Event {
            kind,
            name: String::new(),
            resource_version: 0,
            initial_events_end: false,
            code,
        };
    }
    let meta = bytes_of(object, 1).first().copied().unwrap_or_default();
    let initial_events_end = bytes_of(meta, 12)
        .into_iter()
        .any(|entry| text(entry, 1) == INITIAL_EVENTS_END && text(entry, 2) == "true");
    Event {
        kind,
        name: text(meta, 1),
        resource_version: text(meta, 6).parse().unwrap_or(0),
        initial_events_end,
        code: None,
    }
}

// ----------------------------------------------------------------- CRD ----

/// A gadget object of the test's CRD.
fn gadget(crd: &Gadgets, name: &str, tier: &str) -> Value {
    json!({
        "apiVersion": format!("{}/v1", crd.group), "kind": "Gadget",
        "metadata": {"name": name, "labels": {"tier": tier}},
    })
}

/// The next event of a kube-runtime watcher; an error fails the test.
async fn next_event<S>(events: &mut S) -> watcher::Event<ConfigMap>
where
    S: futures::Stream<Item = Result<watcher::Event<ConfigMap>, watcher::Error>> + Unpin,
{
    tokio::time::timeout(CONVERGE, events.next())
        .await
        .unwrap_or_else(|_| panic!("no watcher event within {CONVERGE:?}"))
        .expect("the watcher goes on")
        .unwrap_or_else(|e| panic!("watcher error: {e}"))
}

// --------------------------------------------------------------- tests ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_go_watch_list_syncs_from_memory_without_listing_then_follows_changes() {
    let c = cluster();
    let ns = TestNamespace::create("watchlist");
    let direct = direct_client(&c.admin_kubeconfig).await;
    let crd = Gadgets::create(&direct, "watchlist").await;
    let collection = crd.collection(ns.name());
    for i in 0..20 {
        let tier = if i % 2 == 0 { "web" } else { "db" };
        write_json(
            &direct,
            "POST",
            &collection,
            Some(&gadget(&crd, &format!("g{i}"), tier)),
        )
        .await;
    }
    let kache = Kache::start(&c.admin_kubeconfig);
    let (via, via_ua) = client_via(&kache, "client-go");
    crd.until_discovered(&via).await;
    until_served_from_memory(
        &kache,
        &via,
        &direct,
        &collection,
        &crd.metric(),
        "application/json",
    )
    .await;
    let mark = c.audit().mark();

    // The first sync has no version: a consistent read, so an object
    // created just before is in it. A write to another resource after it
    // moves etcd's revision past the gadgets' own version, which a v1.20
    // API server never moves on: the store cannot reach the API server's
    // current version, and is served once its watch has had its chance.
    write_json(&direct, "POST", &collection, Some(&gadget(&crd, "late", "web"))).await;
    let elsewhere = format!("/api/v1/namespaces/{}/configmaps", ns.name());
    write_json(
        &direct,
        "POST",
        &elsewhere,
        Some(&json!({"metadata": {"name": "elsewhere"}})),
    )
    .await;
    let mut watch = Watch::open(&via, &watch_list_path(&collection, None, ""), "application/json").await;
    let (state, synced_at) = watch.initial_state().await;
    let listed = get_json(&direct, &collection).await;
    assert_eq!(state, versions(&listed), "the streamed state is the API server's");
    assert!(state.contains_key("late"), "{state:?}");
    assert!(
        state.values().all(|rv| *rv <= synced_at) && synced_at <= rv_of(&listed),
        "the bookmark is at the state's version: {synced_at}, objects {state:?}, list at {}",
        rv_of(&listed)
    );

    // Then the changes, as they happen.
    let item = |name: &str| format!("{collection}/{name}");
    let patched = write_json(
        &direct,
        "PATCH",
        &item("g0"),
        Some(&json!({"metadata": {"labels": {"tier": "db"}}})),
    )
    .await;
    write_json(&direct, "DELETE", &item("g1"), None).await;
    let modified = watch.next().await;
    assert_eq!(
        (
            modified.kind.as_str(),
            modified.name.as_str(),
            modified.resource_version
        ),
        ("MODIFIED", "g0", rv_of(&patched))
    );
    let deleted = watch.next().await;
    assert_eq!((deleted.kind.as_str(), deleted.name.as_str()), ("DELETED", "g1"));
    assert!(deleted.resource_version > modified.resource_version);
    drop(watch);

    // Resuming at the bookmark's version (client-go's next sync): at least
    // as fresh, through a label selector.
    let web = "&labelSelector=tier%3Dweb";
    let mut resumed = Watch::open(
        &via,
        &watch_list_path(&collection, Some(synced_at), web),
        "application/json",
    )
    .await;
    let (state, resumed_at) = resumed.initial_state().await;
    assert_eq!(
        state,
        versions(&get_json(&direct, &format!("{collection}?labelSelector=tier%3Dweb")).await)
    );
    assert!(!state.contains_key("g0"), "g0 left the selection: {state:?}");
    assert!(resumed_at >= deleted.resource_version, "{resumed_at}");
    drop(resumed);

    // What a current API server refuses: its 422, from kache.
    let request = http::Request::get(format!("{collection}?watch=true&sendInitialEvents=true"))
        .body(Body::empty())
        .unwrap();
    let refused = via.send(request).await.unwrap();
    assert_eq!(refused.status(), 422);
    let status: Value =
        serde_json::from_slice(&refused.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(status["reason"], "Invalid");
    assert_eq!(
        status["message"],
        "ListOptions.meta.k8s.io \"\" is invalid: resourceVersionMatch: Forbidden: \
         sendInitialEvents requires setting resourceVersionMatch to NotOlderThan"
    );
    assert_eq!(
        status["details"],
        json!({
            "group": "meta.k8s.io",
            "kind": "ListOptions",
            "causes": [{
                "reason": "FieldValueForbidden",
                "message": "Forbidden: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
                "field": "resourceVersionMatch",
            }],
        }),
        "errors.NewInvalid's details: a cause per field error"
    );

    // Nothing of the client's reached the API server, and kache itself
    // asked only the first sync's question: no LIST of the objects.
    let (mark2, group) = (mark.clone(), crd.group.clone());
    let kaches_own: Vec<String> = tokio::task::spawn_blocking(move || {
        mark2
            .events_after_sentinel()
            .into_iter()
            .filter(|e| e.verb == "list" && e.request_uri.starts_with(&format!("/apis/{group}/")))
            .filter(|e| e.user_agent != DIRECT_UA)
            .map(|e| format!("{} {}", e.verb, e.request_uri))
            .collect()
    })
    .await
    .unwrap();
    assert_eq!(reached_api_server(&mark, &via_ua).await, Vec::<String>::new());
    assert_eq!(
        kaches_own,
        [format!("list /apis/{}/v1/gadgets?limit=1", crd.group)],
        "kache's LISTs of the resource while the client synced"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protobuf_watch_list_through_a_selector_gets_the_annotated_bookmark() {
    let c = cluster();
    let ns = TestNamespace::create("watchlist-pb");
    let direct = direct_client(&c.admin_kubeconfig).await;
    let collection = format!("/api/v1/namespaces/{}/configmaps", ns.name());
    for i in 0..12 {
        let app = if i % 3 == 0 { "db" } else { "web" };
        let body = json!({"metadata": {"name": format!("c{i}"), "labels": {"app": app}}, "data": {"i": i.to_string()}});
        write_json(&direct, "POST", &collection, Some(&body)).await;
    }
    let kache = Kache::start(&c.admin_kubeconfig);
    let (via, via_ua) = client_via(&kache, "protobuf");
    until_served_from_memory(&kache, &via, &direct, &collection, "v1/configmaps", PROTOBUF).await;
    let mark = c.audit().mark();

    let web = "&labelSelector=app%3Dweb";
    let mut watch = Watch::open(&via, &watch_list_path(&collection, Some(0), web), PROTOBUF).await;
    let (state, synced_at) = watch.initial_state().await;
    let listed = get_json(&direct, &format!("{collection}?labelSelector=app%3Dweb")).await;
    assert_eq!(state, versions(&listed));
    assert_eq!(state.len(), 8);
    assert!(
        state.values().all(|rv| *rv <= synced_at),
        "{synced_at}: {state:?}"
    );

    // A configmap joins the selection, another leaves it.
    let item = |name: &str| format!("{collection}/{name}");
    let joined = write_json(
        &direct,
        "PATCH",
        &item("c0"),
        Some(&json!({"metadata": {"labels": {"app": "web"}}})),
    )
    .await;
    let left = write_json(
        &direct,
        "PATCH",
        &item("c1"),
        Some(&json!({"metadata": {"labels": {"app": "db"}}})),
    )
    .await;
    let events = [watch.next().await, watch.next().await];
    let seen: Vec<(&str, &str, u64)> = events
        .iter()
        .map(|e| (e.kind.as_str(), e.name.as_str(), e.resource_version))
        .collect();
    assert_eq!(
        seen,
        [("ADDED", "c0", rv_of(&joined)), ("DELETED", "c1", rv_of(&left))]
    );
    drop(watch);
    assert_eq!(reached_api_server(&mark, &via_ua).await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kube_runtime_watcher_with_streaming_lists_syncs_through_kache() {
    let c = cluster();
    let ns = TestNamespace::create("watchlist-kube");
    let direct = direct_client(&c.admin_kubeconfig).await;
    let collection = format!("/api/v1/namespaces/{}/configmaps", ns.name());
    for i in 0..15 {
        let body = json!({"metadata": {"name": format!("k{i}")}, "data": {"i": i.to_string()}});
        write_json(&direct, "POST", &collection, Some(&body)).await;
    }
    let kache = Kache::start(&c.admin_kubeconfig);
    let (via, via_ua) = client_via(&kache, "kube-runtime");
    until_served_from_memory(
        &kache,
        &via,
        &direct,
        &collection,
        "v1/configmaps",
        "application/json",
    )
    .await;
    let mark = c.audit().mark();

    let api: Api<ConfigMap> = Api::namespaced(via, ns.name());
    let mut events = watcher(api, watcher::Config::default().streaming_lists()).boxed();
    let rv = |cm: &ConfigMap| {
        cm.metadata
            .resource_version
            .as_deref()
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    let mut state = BTreeMap::new();
    loop {
        match next_event(&mut events).await {
            watcher::Event::Init => {}
            watcher::Event::InitApply(cm) => {
                state.insert(cm.metadata.name.clone().unwrap(), rv(&cm));
            }
            watcher::Event::InitDone => break,
            other => panic!("{other:?} before the initial state was complete"),
        }
    }
    assert_eq!(state, versions(&get_json(&direct, &collection).await));

    let patched = write_json(
        &direct,
        "PATCH",
        &format!("{collection}/k3"),
        Some(&json!({"data": {"i": "changed"}})),
    )
    .await;
    match next_event(&mut events).await {
        watcher::Event::Apply(cm) => {
            assert_eq!(
                (cm.metadata.name.as_deref(), rv(&cm)),
                (Some("k3"), rv_of(&patched))
            );
        }
        other => panic!("{other:?} instead of the change"),
    }
    drop(events);
    assert_eq!(reached_api_server(&mark, &via_ua).await, Vec::<String>::new());
}
