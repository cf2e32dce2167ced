//! A kube-rs client through kache (plain HTTP, no credentials) versus a kube-rs client
//! straight at the API server with the admin kubeconfig.

#![allow(clippy::unwrap_used)] // test helpers, not only #[test] fns (STYLE.md)

use std::collections::BTreeMap;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kache_tests::{cluster, Kache, TestNamespace};
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams, WatchEvent, WatchParams};
use kube::runtime::watcher;
use serde_json::Value;

const EVENT_TIMEOUT: Duration = Duration::from_secs(20);

fn configmap(name: &str, data: &[(&str, &str)]) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(BTreeMap::from([(
                "app".to_string(),
                "kube-client-test".to_string(),
            )])),
            ..Default::default()
        },
        data: Some(data.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
        ..Default::default()
    }
}

/// The objects as JSON, in (namespace, name) order.
fn sorted_by_name(mut items: Vec<ConfigMap>) -> Value {
    items.sort_by_key(|cm| (cm.metadata.namespace.clone(), cm.metadata.name.clone()));
    serde_json::to_value(items).unwrap()
}

fn data_of(cm: &ConfigMap) -> BTreeMap<String, String> {
    cm.data.clone().unwrap_or_default()
}

#[tokio::test]
async fn kube_client_through_kache_lists_and_gets_what_a_direct_client_sees() {
    let c = cluster();
    let ns = TestNamespace::create("kube-read");
    let kache = Kache::start(&c.admin_kubeconfig);
    let direct: Api<ConfigMap> = Api::namespaced(c.admin_client().await, ns.name());
    let via: Api<ConfigMap> = Api::namespaced(kache.client(), ns.name());
    for i in 0..5 {
        direct
            .create(
                &PostParams::default(),
                &configmap(&format!("cm-{i}"), &[("i", &i.to_string())]),
            )
            .await
            .unwrap();
    }

    // Consistent reads (no resourceVersion): equal at once.
    for lp in [
        ListParams::default(),
        ListParams::default().labels("app=kube-client-test"),
        ListParams::default().fields("metadata.name=cm-3"),
    ] {
        let (v, d) = (via.list(&lp).await.unwrap(), direct.list(&lp).await.unwrap());
        assert!(!d.items.is_empty(), "{lp:?}: nothing listed directly");
        assert_eq!(
            serde_json::to_value(&v.items).unwrap(),
            serde_json::to_value(&d.items).unwrap(),
            "{lp:?}"
        );
    }
    // resourceVersion=0 means "any state": a watch cache may lag a moment behind the
    // writes, so wait until both paths show all five. Its order is unspecified too
    // (v1.20's watch cache lists in hash-map order), so compare sorted.
    let lp = ListParams::default().match_any();
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    loop {
        let (v, d) = (via.list(&lp).await.unwrap(), direct.list(&lp).await.unwrap());
        let (v, d) = (sorted_by_name(v.items), sorted_by_name(d.items));
        if v == d && d.as_array().map(Vec::len) == Some(5) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "rv=0 lists never converged:\nvia kache {v}\ndirect {d}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Paginated: the continue token from kache works with kache.
    let page = via.list(&ListParams::default().limit(2)).await.unwrap();
    assert_eq!(page.items.len(), 2);
    let token = page.metadata.continue_.clone().expect("a continue token");
    let rest = via
        .list(&ListParams::default().limit(10).continue_token(&token))
        .await
        .unwrap();
    assert_eq!(rest.items.len(), 3);

    let (v, d) = (via.get("cm-2").await.unwrap(), direct.get("cm-2").await.unwrap());
    assert_eq!(
        serde_json::to_value(&v).unwrap(),
        serde_json::to_value(&d).unwrap()
    );

    // Errors come through as the API server's Status.
    let (v, d) = (
        via.get("missing").await.unwrap_err(),
        direct.get("missing").await.unwrap_err(),
    );
    match (v, d) {
        (kube::Error::Api(v), kube::Error::Api(d)) => {
            assert_eq!((v.code, &v.reason, &v.message), (d.code, &d.reason, &d.message));
            assert_eq!(v.code, 404);
        }
        (v, d) => panic!("expected API errors, got {v:?} / {d:?}"),
    }

    let namespaces: Api<Namespace> = Api::all(kache.client());
    let direct_ns: Api<Namespace> = Api::all(c.admin_client().await);
    assert_eq!(
        serde_json::to_value(namespaces.get(ns.name()).await.unwrap()).unwrap(),
        serde_json::to_value(direct_ns.get(ns.name()).await.unwrap()).unwrap()
    );
}

#[tokio::test]
async fn kube_client_writes_through_kache_are_seen_by_a_direct_client() {
    let c = cluster();
    let ns = TestNamespace::create("kube-write");
    let kache = Kache::start(&c.admin_kubeconfig);
    let direct: Api<ConfigMap> = Api::namespaced(c.admin_client().await, ns.name());
    let via: Api<ConfigMap> = Api::namespaced(kache.client(), ns.name());

    let created = via
        .create(&PostParams::default(), &configmap("w", &[("v", "1")]))
        .await
        .unwrap();
    assert_eq!(data_of(&direct.get("w").await.unwrap()), data_of(&created));
    assert_eq!(created.metadata.namespace.as_deref(), Some(ns.name()));

    // Creating it again is a 409 AlreadyExists, on both paths.
    let err = via
        .create(&PostParams::default(), &configmap("w", &[]))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 409 && s.reason == "AlreadyExists"),
        "{err:?}"
    );

    let mut changed = created.clone();
    changed.data = Some(BTreeMap::from([("v".to_string(), "2".to_string())]));
    let replaced = via.replace("w", &PostParams::default(), &changed).await.unwrap();
    assert_ne!(
        replaced.metadata.resource_version,
        created.metadata.resource_version
    );
    assert_eq!(direct.get("w").await.unwrap().data.unwrap()["v"], "2");

    // A replace with a stale resourceVersion is a conflict through kache too.
    let err = via
        .replace("w", &PostParams::default(), &changed)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 409 && s.reason == "Conflict"),
        "{err:?}"
    );

    // A direct write is read back through kache at once (no stale read).
    let mut again = direct.get("w").await.unwrap();
    again.data = Some(BTreeMap::from([("v".to_string(), "3".to_string())]));
    direct.replace("w", &PostParams::default(), &again).await.unwrap();
    assert_eq!(via.get("w").await.unwrap().data.unwrap()["v"], "3");

    via.delete("w", &DeleteParams::default()).await.unwrap();
    let err = direct.get("w").await.unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 404),
        "deleted through kache, still there: {err:?}"
    );
}

/// Waits for the next event from `stream`, skipping bookmarks.
async fn next_event<S>(stream: &mut S) -> WatchEvent<ConfigMap>
where
    S: futures::Stream<Item = kube::Result<WatchEvent<ConfigMap>>> + Unpin,
{
    loop {
        let ev = tokio::time::timeout(EVENT_TIMEOUT, stream.next())
            .await
            .expect("no watch event within the timeout")
            .expect("the watch ended")
            .expect("a watch error");
        if !matches!(ev, WatchEvent::Bookmark(_)) {
            return ev;
        }
    }
}

#[tokio::test]
async fn kube_watch_through_kache_sees_changes_made_directly() {
    let c = cluster();
    let ns = TestNamespace::create("kube-watch");
    let kache = Kache::start(&c.admin_kubeconfig);
    let direct: Api<ConfigMap> = Api::namespaced(c.admin_client().await, ns.name());
    let via: Api<ConfigMap> = Api::namespaced(kache.client(), ns.name());

    let rv = via
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut events = via
        .watch(&WatchParams::default().timeout(120), &rv)
        .await
        .unwrap()
        .boxed();

    direct
        .create(&PostParams::default(), &configmap("watched", &[("v", "1")]))
        .await
        .unwrap();
    match next_event(&mut events).await {
        WatchEvent::Added(cm) => assert_eq!(cm.metadata.name.as_deref(), Some("watched")),
        ev => panic!("expected Added, got {ev:?}"),
    }
    let mut cm = direct.get("watched").await.unwrap();
    cm.data = Some(BTreeMap::from([("v".to_string(), "2".to_string())]));
    direct
        .replace("watched", &PostParams::default(), &cm)
        .await
        .unwrap();
    match next_event(&mut events).await {
        WatchEvent::Modified(cm) => assert_eq!(data_of(&cm)["v"], "2"),
        ev => panic!("expected Modified, got {ev:?}"),
    }
    direct.delete("watched", &DeleteParams::default()).await.unwrap();
    match next_event(&mut events).await {
        WatchEvent::Deleted(cm) => assert_eq!(cm.metadata.name.as_deref(), Some("watched")),
        ev => panic!("expected Deleted, got {ev:?}"),
    }
}

async fn next_watcher_event<S>(stream: &mut S) -> watcher::Event<ConfigMap>
where
    S: futures::Stream<Item = watcher::Result<watcher::Event<ConfigMap>>> + Unpin,
{
    tokio::time::timeout(EVENT_TIMEOUT, stream.try_next())
        .await
        .expect("no watcher event within the timeout")
        .expect("watcher error")
        .expect("the watcher ended")
}

#[tokio::test]
async fn kube_runtime_watcher_through_kache_lists_then_follows_direct_changes() {
    let c = cluster();
    let ns = TestNamespace::create("kube-watcher");
    let kache = Kache::start(&c.admin_kubeconfig);
    let direct: Api<ConfigMap> = Api::namespaced(c.admin_client().await, ns.name());
    let via: Api<ConfigMap> = Api::namespaced(kache.client(), ns.name());
    direct
        .create(&PostParams::default(), &configmap("before", &[]))
        .await
        .unwrap();

    let mut stream = watcher(via, watcher::Config::default()).boxed();
    // The initial list may be served from a watch cache that has not seen "before"
    // yet (resourceVersion=0); then it arrives as an Apply right after InitDone.
    let is = |cm: &ConfigMap, name: &str| cm.metadata.name.as_deref() == Some(name);
    let (mut init_done, mut have_before) = (false, false);
    while !(init_done && have_before) {
        match next_watcher_event(&mut stream).await {
            watcher::Event::Init if !init_done => {}
            watcher::Event::InitApply(cm) if !init_done && is(&cm, "before") => have_before = true,
            watcher::Event::InitDone if !init_done => init_done = true,
            watcher::Event::Apply(cm) if init_done && is(&cm, "before") => have_before = true,
            ev => panic!("unexpected watcher event {ev:?} (init done: {init_done})"),
        }
    }

    direct
        .create(&PostParams::default(), &configmap("after", &[("v", "1")]))
        .await
        .unwrap();
    match next_watcher_event(&mut stream).await {
        watcher::Event::Apply(cm) => assert_eq!(cm.metadata.name.as_deref(), Some("after")),
        ev => panic!("expected Apply(after), got {ev:?}"),
    }
    direct.delete("before", &DeleteParams::default()).await.unwrap();
    match next_watcher_event(&mut stream).await {
        watcher::Event::Delete(cm) => assert_eq!(cm.metadata.name.as_deref(), Some("before")),
        ev => panic!("expected Delete(before), got {ev:?}"),
    }
}

#[tokio::test]
async fn kube_client_raw_requests_through_kache_match_direct() {
    let c = cluster();
    let kache = Kache::start(&c.admin_kubeconfig);
    let (via, direct) = (kache.client(), c.admin_client().await);
    for path in ["/version", "/api", "/apis", "/api/v1/namespaces/default"] {
        let req = || http::Request::get(path).body(Vec::new()).unwrap();
        let v: Value = via.request(req()).await.unwrap();
        let d: Value = direct.request(req()).await.unwrap();
        assert_eq!(v, d, "{path}");
    }
    let v = via.apiserver_version().await.unwrap();
    assert_eq!(
        v.git_version,
        direct.apiserver_version().await.unwrap().git_version
    );
}
