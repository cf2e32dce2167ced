//! Which reads the cache answers, and how it renders them.

use http::HeaderMap;

use super::*;
use crate::store::{Encoding, Store};

fn info(method: &str, uri: &str) -> (RequestInfo, Option<String>) {
    let (path, query) = match uri.split_once('?') {
        Some((p, q)) => (p, Some(q.to_string())),
        None => (uri, None),
    };
    (
        RequestInfo::parse(method, path, query.as_deref()).expect("parses"),
        query,
    )
}

fn plan_for(uri: &str, accept: Option<&str>) -> Result<ReadPlan, Bypass> {
    let (info, query) = info("GET", uri);
    let mut headers = HeaderMap::new();
    if let Some(accept) = accept {
        headers.insert(header::ACCEPT, HeaderValue::from_str(accept).expect("header"));
    }
    plan(&info, query.as_deref(), &headers)
}

#[test]
fn only_reads_the_watch_cache_would_answer_are_planned() {
    let served = [
        "/api/v1/pods?resourceVersion=0",
        "/api/v1/pods?resourceVersion=0&limit=500",
        "/api/v1/namespaces/a/pods?resourceVersion=0&labelSelector=app%3Dweb",
        "/api/v1/namespaces/a/pods/p?resourceVersion=0",
        "/api/v1/pods?resourceVersion=12&resourceVersionMatch=NotOlderThan",
        "/api/v1/pods?resourceVersion=12",
        "/api/v1/pods?watch=true&resourceVersion=12&allowWatchBookmarks=true&timeoutSeconds=300",
        "/api/v1/watch/pods?resourceVersion=0",
        "/apis/stable.example.com/v1/crontabs?resourceVersion=0",
        // The watch cache serves a watch without a version as one at 0.
        "/api/v1/pods?watch=true",
        "/api/v1/pods?watch=true&timeoutSeconds=0",
        // A list ignores timeoutSeconds once it is an integer.
        "/api/v1/pods?resourceVersion=0&timeoutSeconds=-1",
    ];
    for uri in served {
        assert!(
            plan_for(uri, None).is_ok(),
            "{uri}: {:?}",
            plan_for(uri, None).err()
        );
    }
    let forwarded = [
        ("/api/v1/pods", Bypass::ConsistentRead),
        ("/api/v1/pods?limit=500", Bypass::ConsistentRead),
        // A watch naming a match: the API server's 422.
        (
            "/api/v1/pods?watch=true&resourceVersion=5&resourceVersionMatch=NotOlderThan",
            Bypass::Parameters,
        ),
        // Not an int64: the API server's 400.
        (
            "/api/v1/pods?resourceVersion=0&timeoutSeconds=abc",
            Bypass::Parameters,
        ),
        (
            "/api/v1/pods?watch=true&resourceVersion=0&timeoutSeconds=",
            Bypass::Parameters,
        ),
        ("/api/v1/pods?resourceVersion=0&limit=ten", Bypass::Parameters),
        // Watches the API server's handler ends at once, or overflows the timeout of.
        (
            "/api/v1/pods?watch=true&resourceVersion=0&timeoutSeconds=-5",
            Bypass::Parameters,
        ),
        (
            "/api/v1/pods?watch=true&resourceVersion=0&timeoutSeconds=9300000000",
            Bypass::Parameters,
        ),
        (
            "/api/v1/pods?resourceVersion=0&resourceVersionMatch=Exact",
            Bypass::Exact,
        ),
        (
            "/api/v1/pods?resourceVersion=12&resourceVersionMatch=Exact",
            Bypass::Exact,
        ),
        ("/api/v1/pods?resourceVersion=12&limit=10", Bypass::Limit),
        ("/api/v1/pods?resourceVersion=0&continue=abc", Bypass::Continue),
        ("/api/v1/pods?resourceVersion=abc", Bypass::InvalidResourceVersion),
        ("/api/v1/pods?resourceVersion=0&pretty=true", Bypass::Parameters),
        (
            "/api/v1/pods?resourceVersion=0&resourceVersionMatch=Newest",
            Bypass::Parameters,
        ),
        (
            "/api/v1/namespaces/a/pods/p/status?resourceVersion=0",
            Bypass::Subresource,
        ),
        (
            "/api/v1/namespaces/a/pods/p/log?resourceVersion=0",
            Bypass::Subresource,
        ),
        (
            "/api/v1/pods?resourceVersion=0&labelSelector=a%20in%20",
            Bypass::BadSelector,
        ),
        (
            "/api/v1/pods?resourceVersion=0&fieldSelector=a%3D%3D%3Db",
            Bypass::BadSelector,
        ),
        ("/version", Bypass::NotARead),
    ];
    for (uri, reason) in forwarded {
        assert_eq!(plan_for(uri, None).err(), Some(reason), "{uri}");
    }
}

#[test]
fn writes_are_never_planned() {
    for method in ["POST", "PUT", "PATCH", "DELETE"] {
        let (info, query) = info(method, "/api/v1/namespaces/a/configmaps/x?resourceVersion=0");
        assert_eq!(
            plan(&info, query.as_deref(), &HeaderMap::new()).err(),
            Some(Bypass::NotARead),
            "{method}"
        );
    }
}

#[test]
fn only_encodings_the_cache_renders_are_planned() {
    let uri = "/api/v1/pods?resourceVersion=0";
    for accept in [
        "application/json",
        "*/*",
        "application/json, */*",
        "application/json;charset=utf-8",
        "text/html, application/json",
        "application/vnd.kubernetes.protobuf",
        "application/vnd.kubernetes.protobuf,application/json",
        // As, g and v only make tables of built-ins: custom resources get JSON.
        "application/vnd.kubernetes.protobuf;as=Table;v=v1;g=meta.k8s.io,application/json",
    ] {
        assert!(plan_for(uri, Some(accept)).is_ok(), "{accept}");
    }
    for accept in [
        "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json",
        "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1",
        "application/yaml",
        "application/json;pretty=1",
        "text/html",
        "APPLICATION/JSON",
        "application/vnd.kubernetes.protobuf;stream=watch",
    ] {
        assert_eq!(plan_for(uri, Some(accept)).err(), Some(Bypass::Encoding), "{accept}");
    }
}

fn spec_speaking(speaks_protobuf: Option<bool>) -> ResourceSpec {
    ResourceSpec {
        speaks_protobuf,
        custom: speaks_protobuf == Some(false),
        ..spec(false)
    }
}

#[test]
fn the_encoding_is_the_api_servers_choice_for_the_resource() {
    use Encoding::{Json, Protobuf};
    let built_in = spec_speaking(Some(true));
    let custom = spec_speaking(Some(false));
    let aggregated = spec_speaking(None);
    // Pods' own selectable fields are known for v1 only.
    let other_version = ResourceSpec {
        version: "v2".into(),
        resource: "pods".into(),
        kind: "Pod".into(),
        ..built_in.clone()
    };
    let uri = "/api/v1/configmaps?resourceVersion=0";
    let none = Err(Bypass::Encoding);
    /// An `Accept` header and the encoding for each kind of resource.
    type Case<'a> = (Option<&'a str>, [Result<Encoding, Bypass>; 4]);
    #[rustfmt::skip]
    let cases: &[Case<'_>] = &[
        //  Accept                                              built-in       custom      aggregated  fields unknown
        (None,                                                  [Ok(Json),     Ok(Json),   Ok(Json),   Ok(Json)]),
        (Some(""),                                              [Ok(Json),     Ok(Json),   Ok(Json),   Ok(Json)]),
        (Some("application/json"),                              [Ok(Json),     Ok(Json),   Ok(Json),   Ok(Json)]),
        (Some("application/vnd.kubernetes.protobuf"),           [Ok(Protobuf), none,       none,       none]),
        (Some("application/vnd.kubernetes.protobuf,application/json"),
                                                                [Ok(Protobuf), Ok(Json),   none,       none]),
        (Some("application/vnd.kubernetes.protobuf, */*"),      [Ok(Protobuf), Ok(Json),   none,       none]),
        (Some("application/vnd.kubernetes.protobuf;charset=utf-8"),
                                                                [Ok(Protobuf), none,       none,       none]),
        // Higher q first, whatever the order.
        (Some("application/json;q=0.5,application/vnd.kubernetes.protobuf"),
                                                                [Ok(Protobuf), Ok(Json),   none,       none]),
        (Some("application/vnd.kubernetes.protobuf;q=0.5,application/json"),
                                                                [Ok(Json),     Ok(Json),   Ok(Json),   Ok(Json)]),
        // Wildcards after specific types of the same q.
        (Some("*/*,application/vnd.kubernetes.protobuf"),       [Ok(Protobuf), Ok(Json),   none,       none]),
        (Some("application/*"),                                 [Ok(Json),     Ok(Json),   Ok(Json),   Ok(Json)]),
        (Some("application/vnd.kubernetes.protobuf;as=Table;v=v1;g=meta.k8s.io,application/json"),
                                                                [none,         Ok(Json),   none,       none]),
        (Some("application/yaml,application/vnd.kubernetes.protobuf"),
                                                                [none,         none,       none,       none]),
    ];
    for (accept, expected) in cases {
        // Forwarded at planning when no resource could be answered.
        let got = match plan_for(uri, *accept) {
            Ok(plan) => [&built_in, &custom, &aggregated, &other_version].map(|spec| plan.encoding(spec)),
            Err(reason) => [Err(reason); 4],
        };
        assert_eq!(&got, expected, "{accept:?}");
    }
    // stream=watch is a watch's parameter.
    let watch = plan_for(
        "/api/v1/configmaps?watch=true&resourceVersion=0",
        Some("application/vnd.kubernetes.protobuf;stream=watch"),
    )
    .expect("plan");
    assert_eq!(watch.encoding(&built_in), Ok(Protobuf));
}

fn spec(custom: bool) -> ResourceSpec {
    ResourceSpec {
        group: if custom {
            "stable.example.com".into()
        } else {
            String::new()
        },
        version: "v1".into(),
        resource: if custom {
            "crontabs".into()
        } else {
            "configmaps".into()
        },
        kind: if custom {
            "CronTab".into()
        } else {
            "ConfigMap".into()
        },
        namespaced: true,
        custom,
        speaks_protobuf: Some(!custom),
    }
}

fn configmap(ns: &str, name: &str, rv: u64, labels: &[(&str, &str)]) -> Object {
    let labels: serde_json::Map<String, serde_json::Value> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
        .collect();
    let json = format!(
        r#"{{"kind":"ConfigMap","apiVersion":"v1","metadata":{{"name":"{name}","namespace":"{ns}","resourceVersion":"{rv}","labels":{}}},"data":{{"k":"v"}}}}"#,
        serde_json::Value::Object(labels)
    );
    spec(false).object(Bytes::from(json)).expect("object")
}

fn store_with(objects: Vec<Object>, rv: u64) -> Arc<Store> {
    let store = Arc::new(Store::new(100, 100));
    store.replace(objects, rv);
    store
}

/// A list answer in one buffer.
fn list(plan: &ReadPlan, spec: &ResourceSpec, store: &Store, encoding: Encoding) -> Response<Bytes> {
    Response::new(Bytes::from(list_body(plan, spec, store, encoding).to_vec()))
}

fn body_json(response: &Response<Bytes>) -> serde_json::Value {
    serde_json::from_slice(response.body()).expect("json")
}

#[test]
fn lists_render_like_the_api_server() {
    let store = store_with(
        vec![
            configmap("b", "y", 3, &[("app", "web")]),
            configmap("a", "x", 2, &[("app", "db")]),
            configmap("a", "z", 4, &[]),
        ],
        9,
    );
    let plan = plan_for("/api/v1/configmaps?resourceVersion=0&labelSelector=app", None).expect("plan");
    let rendered = body_json(&list(&plan, &spec(false), &store, Encoding::Json));
    assert_eq!(rendered["kind"], "ConfigMapList");
    assert_eq!(rendered["apiVersion"], "v1");
    assert_eq!(rendered["metadata"], serde_json::json!({"resourceVersion": "9"}));
    let names: Vec<_> = rendered["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| i["metadata"]["name"].clone())
        .collect();
    assert_eq!(names, ["x", "y"]);
    assert!(
        rendered["items"][0].get("kind").is_none(),
        "built-in list items carry no type meta"
    );

    let plan = plan_for(
        "/api/v1/namespaces/a/configmaps?resourceVersion=0&fieldSelector=metadata.name%21%3Dx",
        None,
    )
    .expect("plan");
    let rendered = body_json(&list(&plan, &spec(false), &store, Encoding::Json));
    assert_eq!(rendered["items"].as_array().expect("items").len(), 1);
    assert_eq!(rendered["items"][0]["metadata"]["name"], "z");

    let plan = plan_for("/api/v1/namespaces/empty/configmaps?resourceVersion=0", None).expect("plan");
    assert_eq!(
        body_json(&list(&plan, &spec(false), &store, Encoding::Json))["items"],
        serde_json::json!([])
    );
}

#[test]
fn gets_render_the_object_or_the_api_servers_not_found() {
    let store = store_with(vec![configmap("a", "x", 2, &[])], 9);
    let plan = plan_for("/api/v1/namespaces/a/configmaps/x?resourceVersion=0", None).expect("plan");
    let found = get("x", &plan, &spec(false), &store, Encoding::Json);
    assert_eq!(found.status(), 200);
    assert_eq!(body_json(&found)["kind"], "ConfigMap");
    let missing = get("nope", &plan, &spec(false), &store, Encoding::Json);
    assert_eq!(missing.status(), 404);
    assert_eq!(
        body_json(&missing),
        serde_json::json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure",
            "message":"configmaps \"nope\" not found","reason":"NotFound",
            "details":{"name":"nope","kind":"configmaps"},"code":404})
    );
    let crd_missing = get("nope", &plan, &spec(true), &store, Encoding::Json);
    assert_eq!(
        body_json(&crd_missing)["message"],
        "crontabs.stable.example.com \"nope\" not found"
    );
    assert_eq!(body_json(&crd_missing)["details"]["group"], "stable.example.com");
}

#[test]
fn unsupported_field_selectors_are_detected() {
    let plan = plan_for(
        "/api/v1/configmaps?resourceVersion=0&fieldSelector=spec.nodeName%3Dn1",
        None,
    )
    .expect("plan");
    assert!(!fields_supported(&plan.field, &spec(false)));
    let plan = plan_for(
        "/api/v1/configmaps?resourceVersion=0&fieldSelector=metadata.namespace%3Da",
        None,
    )
    .expect("plan");
    assert!(fields_supported(&plan.field, &spec(false)));
    assert!(fields_supported(&plan.field, &spec(true)));
}

/// The JSON events `chunk` completes, with what came before it in
/// `pending` (an event may come in several chunks).
fn lines(pending: &mut Vec<u8>, chunk: &[u8]) -> Vec<serde_json::Value> {
    pending.extend_from_slice(chunk);
    let Some(end) = pending.iter().rposition(|b| *b == b'\n') else {
        return Vec::new();
    };
    let complete: Vec<u8> = pending.drain(..=end).collect();
    complete
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|line| serde_json::from_slice(line).expect("json"))
        .collect()
}

async fn frames(mut response: Response<ChunkStream>, count: usize) -> Vec<serde_json::Value> {
    use futures::StreamExt;
    let mut out = Vec::new();
    let mut pending = Vec::new();
    while out.len() < count {
        let chunk = tokio::time::timeout(Duration::from_secs(5), response.body_mut().next())
            .await
            .expect("frame in time")
            .expect("stream open")
            .expect("no error");
        out.extend(lines(&mut pending, &chunk.into_bytes()));
    }
    out
}

#[tokio::test]
async fn watches_from_zero_start_with_the_state_then_follow_changes() {
    let store = store_with(vec![configmap("a", "x", 2, &[])], 5);
    let plan = plan_for(
        "/api/v1/namespaces/a/configmaps?watch=true&resourceVersion=0",
        None,
    )
    .expect("plan");
    let response = watch(
        plan,
        Arc::new(spec(false)),
        store.clone(),
        Encoding::Json,
        &WatchSettings::default(),
        || {},
    )
    .expect("watch");
    store.apply(EventType::Modified, configmap("a", "x", 6, &[("v", "2")]));
    store.apply(EventType::Added, configmap("other", "y", 7, &[]));
    store.apply(EventType::Deleted, configmap("a", "x", 8, &[("v", "2")]));
    let events = frames(response, 3).await;
    let kinds: Vec<_> = events
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap_or("").to_string(),
                e["object"]["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("ADDED".into(), "2".into()),
            ("MODIFIED".into(), "6".into()),
            ("DELETED".into(), "8".into())
        ]
    );
    assert_eq!(
        events[0]["object"]["kind"], "ConfigMap",
        "watch objects carry type meta"
    );
}

#[tokio::test]
async fn a_watch_counts_the_events_it_sends() {
    let store = store_with(vec![configmap("a", "x", 2, &[]), configmap("a", "y", 3, &[])], 5);
    let uri = "/api/v1/namespaces/a/configmaps?watch=true&resourceVersion=0";
    let response = start_watch(&store, uri, Encoding::Json);
    let counted = response.extensions().get::<Events>().cloned().expect("counted");
    assert_eq!(counted.take(), 0, "nothing sent yet");
    store.apply(EventType::Added, configmap("other", "z", 6, &[]));
    store.apply(EventType::Modified, configmap("a", "x", 7, &[("v", "2")]));
    let events = frames(response, 3).await;
    assert_eq!(events.len(), 3);
    assert_eq!(
        counted.take(),
        3,
        "two replayed objects (each sent in three parts) and one change; none for another namespace"
    );
    assert_eq!(counted.take(), 0, "taken once");
}

#[tokio::test]
async fn at_a_restart_watchers_get_a_last_bookmark_at_the_saved_version_then_end() {
    use futures::StreamExt;
    let store = store_with(vec![configmap("a", "x", 2, &[])], 5);
    let start = |uri: &str| {
        let plan = plan_for(uri, None).expect("plan");
        watch(
            plan,
            Arc::new(spec(false)),
            store.clone(),
            Encoding::Json,
            &WatchSettings::default(),
            || {},
        )
        .expect("watch")
        .into_body()
    };
    let mut with_bookmarks =
        start("/api/v1/configmaps?watch=true&resourceVersion=5&allowWatchBookmarks=true");
    let mut without = start("/api/v1/configmaps?watch=true&resourceVersion=5");
    store.apply(EventType::Modified, configmap("a", "x", 6, &[]));
    store.close_for_restart();
    let mut seen = Vec::new();
    let mut pending = Vec::new();
    while let Some(chunk) = with_bookmarks.next().await {
        for event in lines(&mut pending, &chunk.expect("bytes").into_bytes()) {
            seen.push((
                event["type"].as_str().unwrap_or("").to_string(),
                event["object"]["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
            ));
        }
    }
    assert_eq!(
        seen,
        [
            ("MODIFIED".to_string(), "6".to_string()),
            ("BOOKMARK".into(), "6".into())
        ],
        "the change, the bookmark at the store's version, then the end"
    );
    let mut plain = Vec::new();
    while let Some(chunk) = without.next().await {
        plain.extend(lines(&mut pending, &chunk.expect("bytes").into_bytes()));
    }
    assert_eq!(plain.len(), 1, "no bookmark unless asked for: {plain:?}");
}

#[tokio::test]
async fn an_event_is_rendered_once_and_its_bytes_shared_by_every_watcher() {
    use futures::StreamExt;
    let store = store_with(vec![configmap("a", "x", 2, &[("app", "web")])], 5);
    let start = |uri: &str| {
        let plan = plan_for(uri, None).expect("plan");
        let response = watch(
            plan,
            Arc::new(spec(false)),
            store.clone(),
            Encoding::Json,
            &WatchSettings::default(),
            || {},
        )
        .expect("watch");
        response.into_body()
    };
    let mut watchers: Vec<_> = (0..3)
        .map(|_| start("/api/v1/configmaps?watch=true&resourceVersion=5"))
        .collect();
    let mut selective = start("/api/v1/configmaps?watch=true&resourceVersion=5&labelSelector=app%3Dweb");
    store.apply(EventType::Modified, configmap("a", "x", 6, &[("app", "db")]));
    let mut frames = Vec::new();
    for watcher in &mut watchers {
        frames.push(
            watcher
                .next()
                .await
                .expect("a frame")
                .expect("bytes")
                .into_bytes(),
        );
    }
    assert!(frames.iter().all(|f| f.starts_with(b"{\"type\":\"MODIFIED\"")));
    assert!(
        frames.iter().all(|f| f.as_ptr() == frames[0].as_ptr()),
        "one rendering, shared"
    );
    // The object left the selective watcher's selection: its own frame.
    let left = selective
        .next()
        .await
        .expect("a frame")
        .expect("bytes")
        .into_bytes();
    assert!(left.starts_with(b"{\"type\":\"DELETED\""), "{left:?}");
    assert_ne!(left.as_ptr(), frames[0].as_ptr());
}

#[tokio::test]
async fn selector_transitions_become_added_and_deleted() {
    let store = store_with(vec![configmap("a", "x", 2, &[("app", "web")])], 5);
    let plan = plan_for(
        "/api/v1/configmaps?watch=true&resourceVersion=5&labelSelector=app%3Dweb",
        None,
    )
    .expect("plan");
    let response = watch(
        plan,
        Arc::new(spec(false)),
        store.clone(),
        Encoding::Json,
        &WatchSettings::default(),
        || {},
    )
    .expect("watch");
    store.apply(EventType::Modified, configmap("a", "x", 6, &[("app", "db")]));
    store.apply(
        EventType::Modified,
        configmap("a", "x", 7, &[("app", "db"), ("v", "2")]),
    );
    store.apply(EventType::Modified, configmap("a", "x", 8, &[("app", "web")]));
    let events = frames(response, 2).await;
    assert_eq!(events[0]["type"], "DELETED");
    assert_eq!(
        events[0]["object"]["metadata"]["labels"]["app"], "web",
        "the previous state…"
    );
    assert_eq!(
        events[0]["object"]["metadata"]["resourceVersion"], "6",
        "…at the event's version"
    );
    assert_eq!(events[1]["type"], "ADDED");
    assert_eq!(events[1]["object"]["metadata"]["resourceVersion"], "8");
}

#[tokio::test(start_paused = true)]
async fn bookmarks_are_sent_only_when_asked() {
    let store = store_with(vec![], 5);
    let settings = WatchSettings {
        bookmark_interval: Duration::from_secs(1),
        ..WatchSettings::default()
    };
    let plan = plan_for(
        "/api/v1/configmaps?watch=true&resourceVersion=5&allowWatchBookmarks=true",
        None,
    )
    .expect("plan");
    let response = watch(
        plan,
        Arc::new(spec(false)),
        store.clone(),
        Encoding::Json,
        &settings,
        || {},
    )
    .expect("watch");
    store.progress(11);
    let events = frames(response, 1).await;
    assert_eq!(events[0]["type"], "BOOKMARK");
    assert_eq!(events[0]["object"]["metadata"]["resourceVersion"], "11");

    let plan = plan_for("/api/v1/configmaps?watch=true&resourceVersion=5", None).expect("plan");
    let mut quiet = watch(
        plan,
        Arc::new(spec(false)),
        store.clone(),
        Encoding::Json,
        &settings,
        || {},
    )
    .expect("watch");
    use futures::StreamExt;
    let nothing = tokio::time::timeout(Duration::from_secs(5), quiet.body_mut().next()).await;
    assert!(nothing.is_err(), "no bookmark without allowWatchBookmarks");
}

#[tokio::test]
async fn a_slow_watcher_is_ended_without_delaying_others() {
    use futures::StreamExt;
    // Four notices kept per watcher.
    let store = Arc::new(Store::new(100, 4));
    store.replace(vec![], 1);
    let plan = plan_for("/api/v1/configmaps?watch=true&resourceVersion=1", None).expect("plan");
    let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = ended.clone();
    let mut slow = watch(
        plan.clone(),
        Arc::new(spec(false)),
        store.clone(),
        Encoding::Json,
        &WatchSettings::default(),
        move || flag.store(true, std::sync::atomic::Ordering::SeqCst),
    )
    .expect("watch");
    let fast = watch(
        plan,
        Arc::new(spec(false)),
        store.clone(),
        Encoding::Json,
        &WatchSettings::default(),
        || {},
    )
    .expect("watch");
    let reader = tokio::spawn(frames(fast, 50));
    for rv in 2..52 {
        store.apply(EventType::Added, configmap("a", &format!("o{rv}"), rv, &[]));
        tokio::task::yield_now().await;
    }
    let events = reader.await.expect("reader");
    assert_eq!(events.len(), 50, "the fast watcher got everything");
    // The slow one, reading at last, fell behind by more than its backlog:
    // it gets the end of its stream, not the events it lost.
    let mut pending = Vec::new();
    let mut got = 0;
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(5), slow.body_mut().next())
        .await
        .expect("the slow watcher ends at once")
    {
        got += lines(&mut pending, &chunk.expect("no error").into_bytes()).len();
    }
    assert!(
        got < 50,
        "the slow watcher got {got} events: it should have been ended"
    );
    for _ in 0..200 {
        if ended.load(std::sync::atomic::Ordering::SeqCst) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        ended.load(std::sync::atomic::Ordering::SeqCst),
        "the slow watcher was ended"
    );
}

#[test]
fn too_old_versions_are_refused() {
    let store = Arc::new(Store::new(2, 10));
    store.replace(vec![], 5);
    for rv in 6..10 {
        store.apply(EventType::Added, configmap("a", &format!("o{rv}"), rv, &[]));
    }
    let plan = plan_for("/api/v1/configmaps?watch=true&resourceVersion=5", None).expect("plan");
    assert!(watch(
        plan,
        Arc::new(spec(false)),
        store,
        Encoding::Json,
        &WatchSettings::default(),
        || {}
    )
    .is_err());
}

#[test]
fn field_values_feed_field_selectors() {
    let fields = configmap("a", "x", 2, &[]).fields;
    assert_eq!(fields.get("metadata.name"), Some("x"));
    assert_eq!(fields.get("metadata.namespace"), Some("a"));
}

/// A ConfigMap's protobuf message: ObjectMeta{name, namespace,
/// resourceVersion, labels}, then data {k: v}.
fn pb_configmap(ns: &str, name: &str, rv: u64, labels: &[(&str, &str)]) -> Object {
    fn field(out: &mut Vec<u8>, number: u8, content: &[u8]) {
        out.push(number << 3 | 2);
        out.push(u8::try_from(content.len()).expect("short"));
        out.extend_from_slice(content);
    }
    let mut meta = Vec::new();
    field(&mut meta, 1, name.as_bytes());
    field(&mut meta, 3, ns.as_bytes());
    field(&mut meta, 6, rv.to_string().as_bytes());
    for (k, v) in labels {
        let mut entry = Vec::new();
        field(&mut entry, 1, k.as_bytes());
        field(&mut entry, 2, v.as_bytes());
        field(&mut meta, 11, &entry);
    }
    let mut message = Vec::new();
    field(&mut message, 1, &meta);
    field(&mut message, 2, b"\x0a\x01k\x12\x01v");
    spec(false).protobuf_object(Bytes::from(message)).expect("object")
}

async fn protobuf_events(
    mut response: Response<ChunkStream>,
    count: usize,
) -> Vec<(String, crate::protobuf::Meta, Bytes)> {
    use futures::StreamExt;
    let mut buffer = Vec::new();
    let mut out = Vec::new();
    while out.len() < count {
        let chunk = tokio::time::timeout(Duration::from_secs(5), response.body_mut().next())
            .await
            .expect("frame in time")
            .expect("stream open")
            .expect("no error");
        buffer.extend_from_slice(&chunk.into_bytes());
        let (frames, used) = crate::protobuf::split_frames(&buffer);
        for frame in frames {
            let event = crate::protobuf::watch_event(frame).expect("event");
            assert_eq!(
                (event.object.api_version, event.object.kind),
                (&b"v1"[..], &b"ConfigMap"[..])
            );
            out.push((
                String::from_utf8_lossy(event.kind).into_owned(),
                crate::protobuf::object_meta(event.object.raw).expect("meta"),
                Bytes::copy_from_slice(event.object.raw),
            ));
        }
        buffer.drain(..used);
    }
    out
}

#[tokio::test(start_paused = true)]
async fn protobuf_watches_follow_selector_transitions_and_send_bookmarks() {
    let store = Arc::new(Store::new(100, 100));
    store.replace(vec![pb_configmap("a", "x", 2, &[("app", "web")])], 5);
    let plan = plan_for(
        "/api/v1/configmaps?watch=true&resourceVersion=5&labelSelector=app%3Dweb&allowWatchBookmarks=true",
        Some("application/vnd.kubernetes.protobuf"),
    )
    .expect("plan");
    let settings = WatchSettings {
        bookmark_interval: Duration::from_secs(1),
        ..WatchSettings::default()
    };
    let response = watch(
        plan,
        Arc::new(spec(false)),
        store.clone(),
        Encoding::Protobuf,
        &settings,
        || {},
    )
    .expect("watch");
    store.apply(EventType::Modified, pb_configmap("a", "x", 6, &[("app", "db")]));
    store.apply(EventType::Modified, pb_configmap("a", "x", 8, &[("app", "web")]));
    store.progress(11);
    let events = protobuf_events(response, 3).await;
    let summary: Vec<_> = events
        .iter()
        .map(|(kind, meta, _)| {
            (
                kind.as_str(),
                meta.resource_version.as_str(),
                meta.labels.get("app").cloned(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("DELETED", "6", Some("web".to_string())),
            ("ADDED", "8", Some("web".to_string())),
            ("BOOKMARK", "11", None),
        ],
        "the previous state at the event's version, then the new one, then a bookmark"
    );
    // Without an API server bookmark to copy, only the version is set.
    assert_eq!(events[2].2.as_ref(), b"\x0a\x04\x32\x0211");
}

fn event_summary(events: &[serde_json::Value]) -> Vec<(String, String, String, String)> {
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
    events
        .iter()
        .map(|e| {
            let meta = &e["object"]["metadata"];
            (
                s(&e["type"]),
                s(&meta["name"]),
                s(&meta["resourceVersion"]),
                s(&meta["labels"]["app"]),
            )
        })
        .collect()
}

/// The store before (at 5) and after (a list at 20) a relist, in namespace
/// `a` unless named otherwise: `x` stops matching `app=web`, `y` is deleted,
/// `z` starts matching, `w` is new and matches, `v` is new and does not,
/// `b/q` is in another namespace.
/// Builds a configmap in one encoding: namespace, name, version, labels.
type MakeObject = fn(&str, &str, u64, &[(&str, &str)]) -> Object;

fn relisted_store(object: MakeObject) -> (Arc<Store>, Vec<Object>) {
    let store = Arc::new(Store::new(100, 100));
    store.replace(
        vec![
            object("a", "x", 2, &[("app", "web")]),
            object("a", "y", 3, &[("app", "web")]),
            object("a", "z", 4, &[("app", "db")]),
            object("a", "kept", 1, &[("app", "web")]),
        ],
        5,
    );
    let list = vec![
        object("a", "x", 12, &[("app", "db")]),
        object("a", "z", 13, &[("app", "web")]),
        object("a", "w", 15, &[("app", "web")]),
        object("a", "v", 16, &[("app", "db")]),
        object("b", "q", 17, &[("app", "web")]),
        object("a", "kept", 1, &[("app", "web")]),
    ];
    (store, list)
}

#[tokio::test]
async fn a_relist_reaches_watchers_as_events_through_their_selectors_then_a_bookmark() {
    let (store, list) = relisted_store(configmap);
    let start = |uri: &str| {
        watch(
            plan_for(uri, None).expect("plan"),
            Arc::new(spec(false)),
            store.clone(),
            Encoding::Json,
            &WatchSettings::default(),
            || {},
        )
        .expect("watch")
    };
    let selective = start(
        "/api/v1/namespaces/a/configmaps?watch=true&resourceVersion=5&labelSelector=app%3Dweb&allowWatchBookmarks=true",
    );
    let everything = start("/api/v1/configmaps?watch=true&resourceVersion=5");
    store.replace(list, 20);
    let row = |t: &str, n: &str, rv: &str, app: &str| {
        (t.to_string(), n.to_string(), rv.to_string(), app.to_string())
    };
    assert_eq!(
        event_summary(&frames(selective, 5).await),
        [
            // Stopped matching: its previous state, at the event's version.
            row("DELETED", "x", "12", "web"),
            row("ADDED", "z", "13", "web"),
            row("ADDED", "w", "15", "web"),
            // Gone: the last known object, at the list's version.
            row("DELETED", "y", "20", "web"),
            row("BOOKMARK", "", "20", ""),
        ]
    );
    assert_eq!(
        event_summary(&frames(everything, 6).await),
        [
            row("MODIFIED", "x", "12", "db"),
            row("MODIFIED", "z", "13", "web"),
            row("ADDED", "w", "15", "web"),
            row("ADDED", "v", "16", "db"),
            row("ADDED", "q", "17", "web"),
            row("DELETED", "y", "20", "web"),
        ]
    );
}

#[tokio::test]
async fn a_watch_resuming_from_a_version_a_relist_handed_out_gets_the_rest() {
    let (store, list) = relisted_store(configmap);
    store.replace(list, 20);
    let plan = plan_for(
        "/api/v1/namespaces/a/configmaps?watch=true&resourceVersion=13",
        None,
    )
    .expect("plan");
    let resumed = watch(
        plan,
        Arc::new(spec(false)),
        store.clone(),
        Encoding::Json,
        &WatchSettings::default(),
        || {},
    )
    .expect("watch");
    let rows: Vec<_> = event_summary(&frames(resumed, 3).await)
        .into_iter()
        .map(|(t, n, rv, _)| format!("{t} {n} {rv}"))
        .collect();
    assert_eq!(rows, ["ADDED w 15", "ADDED v 16", "DELETED y 20"]);
}

#[tokio::test]
async fn protobuf_watches_get_a_relists_deletions_at_the_lists_version() {
    let (store, list) = relisted_store(pb_configmap);
    let plan = plan_for(
        "/api/v1/namespaces/a/configmaps?watch=true&resourceVersion=5&labelSelector=app%3Dweb&allowWatchBookmarks=true",
        Some("application/vnd.kubernetes.protobuf"),
    )
    .expect("plan");
    let response = watch(
        plan,
        Arc::new(spec(false)),
        store.clone(),
        Encoding::Protobuf,
        &WatchSettings::default(),
        || {},
    )
    .expect("watch");
    store.replace(list, 20);
    let summary: Vec<_> = protobuf_events(response, 5)
        .await
        .into_iter()
        .map(|(kind, meta, _)| format!("{kind} {} {}", meta.name, meta.resource_version))
        .collect();
    assert_eq!(
        summary,
        [
            "DELETED x 12",
            "ADDED z 13",
            "ADDED w 15",
            "DELETED y 20",
            "BOOKMARK  20"
        ]
    );
}

#[tokio::test]
async fn a_stopped_store_ends_its_watches_and_refuses_new_ones() {
    use futures::StreamExt;
    let store = store_with(vec![configmap("a", "x", 2, &[])], 5);
    let plan = plan_for("/api/v1/configmaps?watch=true&resourceVersion=5", None).expect("plan");
    let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = ended.clone();
    let mut response = watch(
        plan.clone(),
        Arc::new(spec(false)),
        store.clone(),
        Encoding::Json,
        &WatchSettings::default(),
        move || flag.store(true, std::sync::atomic::Ordering::SeqCst),
    )
    .expect("watch");
    store.close();
    let end = tokio::time::timeout(Duration::from_secs(5), response.body_mut().next())
        .await
        .expect("the stream ends at once");
    assert!(end.is_none(), "a clean end, not an error: {end:?}");
    assert!(ended.load(std::sync::atomic::Ordering::SeqCst));
    let refused = watch(
        plan,
        Arc::new(spec(false)),
        store,
        Encoding::Json,
        &WatchSettings::default(),
        || {},
    );
    assert!(matches!(refused, Err(WatchError::Stopped)));
}

// ------------------------------------------------------- watch timing ----
//
// In paused time: every instant below is the API server's schedule, not a
// measured latency.

/// A watch of configmaps with `query` added, on `store`.
fn timed_watch(store: &Arc<Store>, query: &str, settings: &WatchSettings) -> Response<ChunkStream> {
    let plan = plan_for(&format!("/api/v1/configmaps?watch=true&{query}"), None).expect("plan");
    watch(
        plan,
        Arc::new(spec(false)),
        store.clone(),
        Encoding::Json,
        settings,
        || {},
    )
    .expect("watch")
}

/// Everything a watch sends until it ends, as (whole seconds since
/// `started`, event type, the object's resourceVersion), then (second,
/// "END", "") for a clean end of the stream.
async fn timeline(
    mut response: Response<ChunkStream>,
    started: tokio::time::Instant,
) -> Vec<(u64, String, String)> {
    use futures::StreamExt;
    let mut out = Vec::new();
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
    let mut pending = Vec::new();
    while let Some(chunk) = response.body_mut().next().await {
        let chunk = chunk.expect("no error");
        let at = started.elapsed().as_secs();
        for event in lines(&mut pending, &chunk.into_bytes()) {
            out.push((
                at,
                s(&event["type"]),
                s(&event["object"]["metadata"]["resourceVersion"]),
            ));
        }
    }
    out.push((started.elapsed().as_secs(), "END".into(), String::new()));
    out
}

fn row(at: u64, kind: &str, rv: &str) -> (u64, String, String) {
    (at, kind.to_string(), rv.to_string())
}

fn minute_bookmarks() -> WatchSettings {
    WatchSettings {
        bookmark_interval: Duration::from_secs(60),
        ..WatchSettings::default()
    }
}

#[tokio::test(start_paused = true)]
async fn bookmarks_come_every_interval_and_two_seconds_before_the_deadline() {
    let store = store_with(vec![], 5);
    let started = tokio::time::Instant::now();
    let response = timed_watch(
        &store,
        "resourceVersion=5&allowWatchBookmarks=true&timeoutSeconds=150",
        &minute_bookmarks(),
    );
    store.progress(7);
    assert_eq!(
        timeline(response, started).await,
        [
            row(60, "BOOKMARK", "7"),
            // The version did not move since, but it is past the watch's: sent again.
            row(120, "BOOKMARK", "7"),
            row(148, "BOOKMARK", "7"),
            row(150, "END", ""),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn no_bookmark_is_sent_until_the_store_moves_past_the_watchs_version() {
    let store = store_with(vec![configmap("a", "x", 3, &[])], 5);
    let started = tokio::time::Instant::now();
    let at_five = timed_watch(
        &store,
        "resourceVersion=5&allowWatchBookmarks=true&timeoutSeconds=150",
        &minute_bookmarks(),
    );
    // At 0 the watch is at the store's version once its state is sent.
    let at_zero = timed_watch(
        &store,
        "resourceVersion=0&allowWatchBookmarks=true&timeoutSeconds=150",
        &minute_bookmarks(),
    );
    let (at_five, at_zero) = tokio::join!(timeline(at_five, started), timeline(at_zero, started));
    assert_eq!(at_five, [row(150, "END", "")]);
    assert_eq!(at_zero, [row(0, "ADDED", "3"), row(150, "END", "")]);
}

#[tokio::test(start_paused = true)]
async fn a_watch_newer_than_the_store_starts_at_once_and_gets_only_later_events() {
    let store = store_with(vec![], 5);
    let started = tokio::time::Instant::now();
    let query = |rv: u64| format!("resourceVersion={rv}&allowWatchBookmarks=true&timeoutSeconds=100");
    let at_ten = timed_watch(&store, &query(10), &minute_bookmarks());
    let at_twenty = timed_watch(&store, &query(20), &minute_bookmarks());
    for rv in 6..=12 {
        store.apply(EventType::Added, configmap("a", &format!("o{rv}"), rv, &[]));
    }
    let (at_ten, at_twenty) = tokio::join!(timeline(at_ten, started), timeline(at_twenty, started));
    assert_eq!(
        at_ten,
        [
            row(0, "ADDED", "11"),
            row(0, "ADDED", "12"),
            row(60, "BOOKMARK", "12"),
            row(98, "BOOKMARK", "12"),
            row(100, "END", ""),
        ]
    );
    assert_eq!(
        at_twenty,
        [row(100, "END", "")],
        "nothing at or below its version, bookmarks included"
    );
}

#[tokio::test(start_paused = true)]
async fn watches_end_cleanly_at_their_timeout_or_the_random_default() {
    let store = store_with(vec![], 5);
    let started = tokio::time::Instant::now();
    // Too short for a bookmark 2 s before its end.
    let short = timed_watch(
        &store,
        "resourceVersion=5&allowWatchBookmarks=true&timeoutSeconds=1",
        &minute_bookmarks(),
    );
    store.progress(9);
    assert_eq!(timeline(short, started).await, [row(1, "END", "")]);

    let started = tokio::time::Instant::now();
    let settings = WatchSettings::default();
    let unbounded = timed_watch(&store, "resourceVersion=9", &settings);
    let ended = timeline(unbounded, started).await;
    assert_eq!(ended.len(), 1, "{ended:?}");
    let lasted = Duration::from_secs(ended[0].0);
    assert!(
        lasted >= settings.default_timeout && lasted < 2 * settings.default_timeout,
        "{lasted:?}: not in [minRequestTimeout, 2 × minRequestTimeout)"
    );
}

#[tokio::test(start_paused = true)]
async fn a_client_that_stopped_reading_is_still_ended_at_its_deadline() {
    let store = Arc::new(Store::new(100, 1000));
    store.replace(vec![], 5);
    let (unread, ended) = unread_watch(
        &store,
        "/api/v1/configmaps?watch=true&resourceVersion=5&timeoutSeconds=30",
    );
    for rv in 6..=8 {
        store.apply(EventType::Added, configmap("a", &format!("o{rv}"), rv, &[]));
    }
    tokio::time::sleep(Duration::from_secs(29)).await;
    assert!(!ended.load(std::sync::atomic::Ordering::SeqCst), "ended early");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        ended.load(std::sync::atomic::Ordering::SeqCst),
        "still open past its deadline, waiting for its client"
    );
    assert_eq!(Arc::strong_count(&store), 1, "the watcher let go of the store");
    let mut unread = unread;
    assert!(
        matches!(
            futures::poll!(futures::StreamExt::next(unread.body_mut())),
            Poll::Ready(None)
        ),
        "its stream ends when its client reads again"
    );
}

const FROM_ZERO_FOR_AN_HOUR: &str = "/api/v1/configmaps?watch=true&resourceVersion=0&timeoutSeconds=3600";

/// A watch of `store` by `uri` that nobody reads (yet), and the flag its
/// `on_end` sets.
fn unread_watch(
    store: &Arc<Store>,
    uri: &str,
) -> (Response<ChunkStream>, Arc<std::sync::atomic::AtomicBool>) {
    let plan = plan_for(uri, None).expect("plan");
    let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = ended.clone();
    let response = watch(
        plan,
        Arc::new(spec(false)),
        store.clone(),
        Encoding::Json,
        &WatchSettings::default(),
        move || flag.store(true, std::sync::atomic::Ordering::SeqCst),
    )
    .expect("watch");
    (response, ended)
}

#[tokio::test(start_paused = true)]
async fn a_client_that_stopped_reading_lets_go_of_its_replay_once_it_fell_behind() {
    // Four notices kept per watcher, one event retained: only the replay
    // holds an object once it changed.
    let store = Arc::new(Store::new(1, 4));
    store.replace(
        (0..50)
            .map(|i| configmap("a", &format!("o{i}"), i + 2, &[]))
            .collect(),
        60,
    );
    let first = Arc::downgrade(&store.get("a", "o0").0.expect("o0"));
    let (mut unread, ended) = unread_watch(&store, FROM_ZERO_FOR_AN_HOUR);
    // Read once, then not again: the replay is under way.
    let chunk = futures::StreamExt::next(unread.body_mut()).await;
    assert!(chunk.is_some_and(|c| c.is_ok()), "a first chunk of the replay");
    // Four changes: as far behind as the store keeps notices for it.
    for rv in 61..65 {
        store.apply(
            EventType::Modified,
            configmap("a", &format!("o{}", rv - 61), rv, &[]),
        );
    }
    tokio::time::sleep(KEEPER_INTERVAL * 3).await;
    assert!(
        !ended.load(std::sync::atomic::Ordering::SeqCst),
        "let go of before it lost anything"
    );
    assert!(
        first.upgrade().is_some(),
        "the replay still holds what it started from"
    );
    // A fifth: it lost one.
    store.apply(EventType::Modified, configmap("a", "o4", 65, &[]));
    tokio::time::sleep(KEEPER_INTERVAL + Duration::from_secs(1)).await;
    assert!(
        ended.load(std::sync::atomic::Ordering::SeqCst),
        "a watcher that lost notices and was not read is let go of"
    );
    assert!(first.upgrade().is_none(), "the replay's objects are let go of");
    assert_eq!(Arc::strong_count(&store), 1, "and the store");
    assert!(
        matches!(
            futures::poll!(futures::StreamExt::next(unread.body_mut())),
            Poll::Ready(None)
        ),
        "its stream ends when its client reads again"
    );
}

#[tokio::test(start_paused = true)]
async fn a_client_that_stopped_reading_lets_go_of_a_stopped_store() {
    let store = Arc::new(Store::new(100, 1000));
    store.replace(vec![configmap("a", "x", 2, &[])], 5);
    let (unread, ended) = unread_watch(&store, FROM_ZERO_FOR_AN_HOUR);
    store.close();
    // The store's last notice is not taken: one whole interval later, the
    // watcher is let go of.
    tokio::time::sleep(KEEPER_INTERVAL * 2 + Duration::from_secs(1)).await;
    assert!(ended.load(std::sync::atomic::Ordering::SeqCst), "let go of");
    assert_eq!(Arc::strong_count(&store), 1, "the stopped store is let go of");
    drop(unread);
}

#[tokio::test(start_paused = true)]
async fn a_watch_read_as_the_store_stops_ends_by_itself_not_its_keeper() {
    use futures::StreamExt;
    let store = Arc::new(Store::new(100, 1000));
    store.replace(vec![configmap("a", "x", 2, &[])], 5);
    let (mut read, ended) = unread_watch(&store, FROM_ZERO_FOR_AN_HOUR);
    let reader = tokio::spawn(async move {
        let mut frames = 0;
        while let Some(chunk) = read.body_mut().next().await {
            chunk.expect("no error");
            frames += 1;
        }
        frames
    });
    tokio::time::sleep(KEEPER_INTERVAL * 3).await;
    assert!(
        !ended.load(std::sync::atomic::Ordering::SeqCst),
        "a watch that is read stays"
    );
    store.close();
    let frames = tokio::time::timeout(Duration::from_secs(1), reader)
        .await
        .expect("the stream ended at once")
        .expect("reader");
    assert!(frames >= 1, "the replay was read");
    assert!(ended.load(std::sync::atomic::Ordering::SeqCst));
}

#[tokio::test(start_paused = true)]
async fn bookmarks_never_run_ahead_of_the_events_still_on_their_way() {
    use futures::StreamExt;
    const ROUNDS: u64 = 12;
    const BURST: u64 = 5;
    let store = store_with(vec![], 5);
    let settings = WatchSettings {
        bookmark_interval: Duration::from_secs(1),
        ..WatchSettings::default()
    };
    let started = tokio::time::Instant::now();
    let round = move |r: u64, after: Duration| started + Duration::from_secs(10 * r) + after;
    let mut response = timed_watch(
        &store,
        "resourceVersion=5&allowWatchBookmarks=true&timeoutSeconds=600",
        &settings,
    );
    // Each round, a burst of changes fills the client's buffer and the
    // watcher waits with the rest of them in its feed while a bookmark
    // falls due; then the client reads again.
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut rv = 5;
            for r in 0..ROUNDS {
                tokio::time::sleep_until(round(r, Duration::from_millis(100))).await;
                for _ in 0..BURST {
                    rv += 1;
                    store.apply(EventType::Added, configmap("a", &format!("o{rv}"), rv, &[]));
                }
            }
        })
    };
    let mut events = Vec::new();
    let mut added = 0;
    let mut pending = Vec::new();
    for r in 0..ROUNDS {
        tokio::time::sleep_until(round(r, Duration::from_millis(1500))).await;
        while added < (r + 1) * BURST {
            let chunk = response.body_mut().next().await.expect("open").expect("no error");
            for event in lines(&mut pending, &chunk.into_bytes()) {
                let rv: u64 = event["object"]["metadata"]["resourceVersion"]
                    .as_str()
                    .and_then(|rv| rv.parse().ok())
                    .expect("rv");
                let kind = event["type"].as_str().unwrap_or("").to_string();
                added += u64::from(kind == "ADDED");
                events.push((kind, rv));
            }
        }
    }
    writer.await.expect("writer");
    let mut bookmarked = 0;
    let mut delivered = 0;
    for (kind, rv) in &events {
        match kind.as_str() {
            "BOOKMARK" => {
                assert!(
                    *rv <= delivered,
                    "a bookmark at {rv} ahead of the events up to it: {events:?}"
                );
                bookmarked = *rv;
            }
            _ => {
                assert!(
                    *rv > bookmarked,
                    "an event at {rv} after a bookmark at {bookmarked}: {events:?}"
                );
                delivered = *rv;
            }
        }
    }
    assert_eq!(delivered, 5 + ROUNDS * BURST);
    assert!(bookmarked > 0, "no bookmark at all: {events:?}");
}

// ------------------------------------------------------ streaming lists ----
//
// Watches with `sendInitialEvents` (KEP-3157), as a current API server's
// cacher answers them.

/// What client-go's reflector sends for a streaming list (`watchList`),
/// with `extra` query parameters.
fn watch_list_uri(collection: &str, resource_version: &str, extra: &str) -> String {
    format!(
        "{collection}?watch=true&sendInitialEvents=true&allowWatchBookmarks=true\
         &resourceVersionMatch=NotOlderThan&resourceVersion={resource_version}&timeoutSeconds=300{extra}"
    )
}

fn stream_kind(plan: &ReadPlan) -> Option<InitialEvents> {
    match plan.kind {
        ReadKind::Watch { initial_events, .. } => Some(initial_events),
        _ => None,
    }
}

#[test]
fn streaming_lists_are_planned_with_the_version_they_need() {
    let cases = [
        (watch_list_uri("/api/v1/pods", "", ""), MinVersion::Latest),
        (
            "/api/v1/pods?watch=true&sendInitialEvents=true&allowWatchBookmarks=true&resourceVersionMatch=NotOlderThan"
                .to_string(),
            MinVersion::Latest,
        ),
        (watch_list_uri("/api/v1/pods", "0", ""), MinVersion::Any),
        (watch_list_uri("/api/v1/pods", "12", ""), MinVersion::AtLeast(12)),
        (
            watch_list_uri("/api/v1/namespaces/a/pods", "12", "&labelSelector=app%3Dweb"),
            MinVersion::AtLeast(12),
        ),
    ];
    for (uri, version) in cases {
        let plan = plan_for(&uri, None).unwrap_or_else(|e| panic!("{uri}: {e:?}"));
        assert_eq!(plan.invalid, None, "{uri}");
        assert_eq!(plan.version, version, "{uri}");
        assert_eq!(stream_kind(&plan), Some(InitialEvents::Stream), "{uri}");
    }
    // `false`, `0` (any case): no initial events; anything else, even empty: some.
    for (value, kind) in [
        ("false", InitialEvents::Nothing),
        ("FALSE", InitialEvents::Nothing),
        ("0", InitialEvents::Nothing),
        ("1", InitialEvents::Stream),
        ("", InitialEvents::Stream),
    ] {
        let uri = format!(
            "/api/v1/pods?watch=true&sendInitialEvents={value}&resourceVersionMatch=NotOlderThan&resourceVersion=3"
        );
        let plan = plan_for(&uri, None).expect("plan");
        assert_eq!(stream_kind(&plan), Some(kind), "{uri}");
    }
    // The first value counts, as the API server's parameter codec reads it.
    let plan = plan_for(
        "/api/v1/pods?watch=true&sendInitialEvents=false&sendInitialEvents=true&resourceVersionMatch=NotOlderThan",
        None,
    )
    .expect("plan");
    assert_eq!(stream_kind(&plan), Some(InitialEvents::Nothing));
    assert_eq!(plan.version, MinVersion::Latest);
    // Plain watches keep v1.20's meaning; a GET ignores the parameter.
    let plain = plan_for("/api/v1/pods?watch=true", None).expect("plan");
    assert_eq!(
        (stream_kind(&plain), plain.version),
        (Some(InitialEvents::Legacy), MinVersion::Any)
    );
    let get = plan_for(
        "/api/v1/namespaces/a/pods/p?resourceVersion=0&sendInitialEvents=true",
        None,
    )
    .expect("plan");
    assert_eq!(get.invalid, None);
    // A streaming list at a version that is not one: the upstream's answer.
    assert_eq!(
        plan_for(&watch_list_uri("/api/v1/pods", "abc", ""), None).err(),
        Some(Bypass::InvalidResourceVersion)
    );
}

/// The API server's (`ValidateListOptions`) 422 message for a read.
fn invalid_message(uri: &str) -> Option<String> {
    plan_for(uri, None)
        .unwrap_or_else(|e| panic!("{uri}: forwarded ({e:?})"))
        .invalid
        .map(|invalid| invalid.message())
}

#[test]
fn options_a_current_api_server_refuses_get_its_422() {
    let requires = "resourceVersionMatch: Forbidden: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan";
    let cases = [
        // No match: a v1.20 API server would serve a plain watch.
        ("/api/v1/pods?watch=true&sendInitialEvents=true&allowWatchBookmarks=true", requires.to_string()),
        ("/api/v1/pods?watch=true&sendInitialEvents=false&resourceVersion=5", requires.to_string()),
        ("/api/v1/pods?watch=true&sendInitialEvents=true&resourceVersionMatch=", requires.to_string()),
        (
            "/api/v1/pods?watch=true&sendInitialEvents=true&resourceVersionMatch=Exact&resourceVersion=5",
            format!(
                "[{requires}, resourceVersionMatch: Unsupported value: \"Exact\": supported values: \"NotOlderThan\"]"
            ),
        ),
        (
            "/api/v1/pods?watch=true&sendInitialEvents=true&resourceVersionMatch=a%3Cb",
            format!(
                "[{requires}, resourceVersionMatch: Unsupported value: \"a\\u003cb\": supported values: \"NotOlderThan\"]"
            ),
        ),
        (
            "/api/v1/pods?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&continue=abc",
            "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden when continue is provided".into(),
        ),
        // Lists: v1.20 ignores the parameter.
        (
            "/api/v1/pods?resourceVersion=0&sendInitialEvents=true",
            "sendInitialEvents: Forbidden: sendInitialEvents is forbidden for list".into(),
        ),
        (
            "/api/v1/pods?sendInitialEvents=false&resourceVersionMatch=NotOlderThan",
            "[resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden unless resourceVersion is provided, \
             sendInitialEvents: Forbidden: sendInitialEvents is forbidden for list]"
                .into(),
        ),
        (
            "/api/v1/pods?resourceVersion=0&resourceVersionMatch=Exact&sendInitialEvents=true",
            "[resourceVersionMatch: Forbidden: resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\", \
             sendInitialEvents: Forbidden: sendInitialEvents is forbidden for list]"
                .into(),
        ),
        // The API server validates by the `watch` parameter, not the path.
        (
            "/api/v1/watch/pods?sendInitialEvents=true&resourceVersionMatch=NotOlderThan&resourceVersion=5",
            "sendInitialEvents: Forbidden: sendInitialEvents is forbidden for list".into(),
        ),
        // A watch of one object is not served, but its options are checked.
        ("/api/v1/watch/namespaces/a/pods/p?watch=true&sendInitialEvents=true", requires.to_string()),
    ];
    for (uri, errors) in cases {
        assert_eq!(
            invalid_message(uri),
            Some(format!("ListOptions.meta.k8s.io \"\" is invalid: {errors}")),
            "{uri}"
        );
    }
    // What a v1.20 API server refuses itself (a match on a plain watch) is
    // still forwarded to it, as is a valid watch of one object.
    for uri in [
        "/api/v1/pods?watch=true&resourceVersionMatch=NotOlderThan&resourceVersion=5",
        "/api/v1/watch/namespaces/a/pods/p?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan",
    ] {
        assert_eq!(plan_for(uri, None).err(), Some(Bypass::Parameters), "{uri}");
    }
}

/// kache's 422 for options a current API server refuses, in `encoding`.
fn refused_options(uri: &str, encoding: Encoding) -> Response<Bytes> {
    let plan = plan_for(uri, None).expect("plan");
    invalid(plan.invalid.as_ref().expect("invalid"), encoding)
}

#[test]
fn the_422_is_the_api_servers_status_in_the_reads_encoding() {
    const URI: &str = "/api/v1/pods?watch=true&sendInitialEvents=true&allowWatchBookmarks=true";
    let answer = refused_options(URI, Encoding::Json);
    assert_eq!(answer.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(answer.headers()[header::CONTENT_TYPE], "application/json");
    assert_eq!(
        String::from_utf8_lossy(answer.body()),
        "{\"kind\":\"Status\",\"apiVersion\":\"v1\",\"metadata\":{},\"status\":\"Failure\",\
         \"message\":\"ListOptions.meta.k8s.io \\\"\\\" is invalid: resourceVersionMatch: Forbidden: \
         sendInitialEvents requires setting resourceVersionMatch to NotOlderThan\",\"reason\":\"Invalid\",\
         \"details\":{\"group\":\"meta.k8s.io\",\"kind\":\"ListOptions\",\"causes\":[{\"reason\":\
         \"FieldValueForbidden\",\"message\":\"Forbidden: sendInitialEvents requires setting \
         resourceVersionMatch to NotOlderThan\",\"field\":\"resourceVersionMatch\"}]},\"code\":422}\n"
    );
    let answer = refused_options(URI, Encoding::Protobuf);
    assert_eq!(answer.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        answer.headers()[header::CONTENT_TYPE],
        crate::protobuf::CONTENT_TYPE
    );
    let status = crate::protobuf::unwrap(answer.body()).expect("envelope");
    assert_eq!((status.api_version, status.kind), (&b"v1"[..], &b"Status"[..]));
    let (code, message) = crate::protobuf::status(status.raw);
    assert_eq!(code, Some(422));
    assert!(message.contains("sendInitialEvents requires"), "{message}");
    // StatusDetails{name, group, kind, causes: [StatusCause{reason,
    // message, field}], retryAfterSeconds, uid}, in field order.
    let mut cause = Vec::new();
    crate::protobuf::put_field(&mut cause, 1, b"FieldValueForbidden");
    crate::protobuf::put_field(
        &mut cause,
        2,
        b"Forbidden: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
    );
    crate::protobuf::put_field(&mut cause, 3, b"resourceVersionMatch");
    let mut details = vec![0x0a, 0x00];
    crate::protobuf::put_field(&mut details, 2, b"meta.k8s.io");
    crate::protobuf::put_field(&mut details, 3, b"ListOptions");
    crate::protobuf::put_field(&mut details, 4, &cause);
    details.extend_from_slice(&[5 << 3, 0x00, 0x32, 0x00]);
    let mut field = Vec::new();
    crate::protobuf::put_field(&mut field, 5, &details);
    assert!(
        status.raw.windows(field.len()).any(|w| w == field),
        "the details, with the cause"
    );
}

#[test]
fn a_422_has_a_cause_per_error_and_names_each_once() {
    // A list: four errors, as `ValidateListOptions` finds them in order.
    let answer = refused_options(
        "/api/v1/pods?sendInitialEvents=true&resourceVersionMatch=Bogus&continue=abc",
        Encoding::Json,
    );
    let body: serde_json::Value = serde_json::from_slice(answer.body()).expect("json");
    let causes: Vec<(String, String)> = body["details"]["causes"]
        .as_array()
        .expect("causes")
        .iter()
        .map(|c| {
            (
                format!(
                    "{}/{}",
                    c["field"].as_str().unwrap_or(""),
                    c["reason"].as_str().unwrap_or("")
                ),
                c["message"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert_eq!(
        causes,
        [
            (
                "resourceVersionMatch/FieldValueForbidden".to_string(),
                "Forbidden: resourceVersionMatch is forbidden unless resourceVersion is provided".to_string()
            ),
            (
                "resourceVersionMatch/FieldValueForbidden".to_string(),
                "Forbidden: resourceVersionMatch is forbidden when continue is provided".to_string()
            ),
            (
                "resourceVersionMatch/FieldValueNotSupported".to_string(),
                "Unsupported value: \"Bogus\": supported values: \"Exact\", \"NotOlderThan\", \"\""
                    .to_string()
            ),
            (
                "sendInitialEvents/FieldValueForbidden".to_string(),
                "Forbidden: sendInitialEvents is forbidden for list".to_string()
            ),
        ]
    );
    let message = body["message"].as_str().expect("message");
    for (field_reason, cause) in &causes {
        let field = field_reason.split('/').next().unwrap_or("");
        assert_eq!(
            message.matches(&format!("{field}: {cause}")).count(),
            1,
            "{message} names {cause} once"
        );
    }
}

/// Summary of JSON events: (type, name, resourceVersion, initial-events-end annotation).
fn streamed(events: &[serde_json::Value]) -> Vec<(String, String, String, bool)> {
    events
        .iter()
        .map(|e| {
            let meta = &e["object"]["metadata"];
            (
                e["type"].as_str().unwrap_or("").to_string(),
                meta["name"].as_str().unwrap_or("").to_string(),
                meta["resourceVersion"].as_str().unwrap_or("").to_string(),
                meta["annotations"][INITIAL_EVENTS_END] == "true",
            )
        })
        .collect()
}

fn ev(kind: &str, name: &str, rv: &str, end: bool) -> (String, String, String, bool) {
    (kind.into(), name.into(), rv.into(), end)
}

/// A store at 5 of configmaps in `a` (x, y: app=web; z: app=db) and `b` (w: app=web).
fn stream_store(window: usize) -> Arc<Store> {
    let store = Arc::new(Store::new(window, 100));
    store.replace(
        vec![
            configmap("a", "x", 2, &[("app", "web")]),
            configmap("a", "y", 4, &[("app", "web")]),
            configmap("a", "z", 3, &[("app", "db")]),
            configmap("b", "w", 1, &[("app", "web")]),
        ],
        5,
    );
    store
}

fn start_watch(store: &Arc<Store>, uri: &str, encoding: Encoding) -> Response<ChunkStream> {
    let accept = (encoding == Encoding::Protobuf).then_some("application/vnd.kubernetes.protobuf");
    let plan = plan_for(uri, accept).expect("plan");
    watch(
        plan,
        Arc::new(spec(false)),
        store.clone(),
        encoding,
        &WatchSettings::default(),
        || {},
    )
    .expect("watch")
}

#[tokio::test]
async fn a_streaming_list_sends_the_state_through_its_selectors_then_the_end_bookmark_then_changes() {
    // Any version at most the store's is served from the store's state, at
    // the store's version: NotOlderThan, even one older than every event kept.
    for rv in ["0", "3", "5"] {
        let store = stream_store(100);
        let uri = watch_list_uri("/api/v1/namespaces/a/configmaps", rv, "&labelSelector=app%3Dweb");
        let response = start_watch(&store, &uri, Encoding::Json);
        store.apply(EventType::Modified, configmap("a", "z", 6, &[("app", "web")]));
        store.apply(EventType::Added, configmap("b", "v", 7, &[("app", "web")]));
        store.apply(EventType::Deleted, configmap("a", "x", 8, &[("app", "web")]));
        let events = frames(response, 5).await;
        assert_eq!(
            streamed(&events),
            [
                ev("ADDED", "x", "2", false),
                ev("ADDED", "y", "4", false),
                ev("BOOKMARK", "", "5", true),
                ev("ADDED", "z", "6", false),
                ev("DELETED", "x", "8", false),
            ],
            "resourceVersion={rv}"
        );
    }
    // The bookmark is the current API server's, byte for byte.
    let store = stream_store(100);
    let response = start_watch(
        &store,
        &watch_list_uri("/api/v1/configmaps", "0", ""),
        Encoding::Json,
    );
    let mut body = Vec::new();
    let mut response = response;
    use futures::StreamExt;
    while !body.ends_with(b"}}}}\n") {
        let chunk = tokio::time::timeout(Duration::from_secs(5), response.body_mut().next())
            .await
            .expect("frame in time")
            .expect("open")
            .expect("no error");
        body.extend_from_slice(&chunk.into_bytes());
    }
    let last = body[..body.len() - 1]
        .rsplit(|b| *b == b'\n')
        .next()
        .expect("a line");
    assert_eq!(
        String::from_utf8_lossy(last),
        r#"{"type":"BOOKMARK","object":{"kind":"ConfigMap","apiVersion":"v1","metadata":{"resourceVersion":"5","annotations":{"k8s.io/initial-events-end":"true"}}}}"#
    );
    assert_eq!(
        body.iter().filter(|b| **b == b'\n').count(),
        5,
        "the four objects, then the bookmark"
    );
}

#[tokio::test]
async fn without_bookmarks_a_streaming_list_sends_no_end_bookmark() {
    let store = stream_store(100);
    let uri = "/api/v1/namespaces/a/configmaps?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&resourceVersion=0";
    let response = start_watch(&store, uri, Encoding::Json);
    store.apply(EventType::Modified, configmap("a", "y", 6, &[]));
    let events = frames(response, 4).await;
    assert_eq!(
        streamed(&events),
        [
            ev("ADDED", "x", "2", false),
            ev("ADDED", "y", "4", false),
            ev("ADDED", "z", "3", false),
            ev("MODIFIED", "y", "6", false),
        ]
    );
}

#[tokio::test]
async fn send_initial_events_false_sends_only_changes() {
    // At 0: from the store's version; at N: after N.
    for (rv, expected) in [
        ("0", vec![ev("MODIFIED", "y", "6", false)]),
        (
            "3",
            vec![ev("ADDED", "y", "4", false), ev("MODIFIED", "y", "6", false)],
        ),
    ] {
        let store = Arc::new(Store::new(100, 100));
        store.replace(vec![configmap("a", "x", 2, &[])], 3);
        store.apply(EventType::Added, configmap("a", "y", 4, &[]));
        let uri = format!(
            "/api/v1/configmaps?watch=true&sendInitialEvents=false&allowWatchBookmarks=true&resourceVersionMatch=NotOlderThan&resourceVersion={rv}"
        );
        let response = start_watch(&store, &uri, Encoding::Json);
        store.apply(EventType::Modified, configmap("a", "y", 6, &[]));
        let events = frames(response, expected.len()).await;
        assert_eq!(streamed(&events), expected, "resourceVersion={rv}");
    }
}

#[tokio::test]
async fn send_initial_events_false_from_a_version_too_old_gets_the_410_error_event() {
    use futures::StreamExt;
    let store = stream_store(1);
    store.apply(EventType::Modified, configmap("a", "x", 6, &[]));
    store.apply(EventType::Modified, configmap("a", "x", 7, &[]));
    let uri = "/api/v1/configmaps?watch=true&sendInitialEvents=false&resourceVersionMatch=NotOlderThan&resourceVersion=5";
    let plan = plan_for(uri, None).expect("plan");
    let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = ended.clone();
    let mut response = watch(
        plan,
        Arc::new(spec(false)),
        store.clone(),
        Encoding::Json,
        &WatchSettings::default(),
        move || flag.store(true, std::sync::atomic::Ordering::SeqCst),
    )
    .expect("answered here: the upstream would refuse the request");
    assert_eq!(response.status(), StatusCode::OK);
    let frame = response
        .body_mut()
        .next()
        .await
        .expect("a frame")
        .expect("no error")
        .into_bytes();
    assert_eq!(
        String::from_utf8_lossy(&frame),
        "{\"type\":\"ERROR\",\"object\":{\"kind\":\"Status\",\"apiVersion\":\"v1\",\"metadata\":{},\
         \"status\":\"Failure\",\"message\":\"too old resource version: 5 (6)\",\"reason\":\"Expired\",\"code\":410}}\n"
    );
    assert!(response.body_mut().next().await.is_none(), "then the end");
    assert!(ended.load(std::sync::atomic::Ordering::SeqCst));
    // A plain watch keeps being forwarded: the upstream answers it itself.
    let plain = plan_for("/api/v1/configmaps?watch=true&resourceVersion=5", None).expect("plan");
    let refused = watch(
        plain,
        Arc::new(spec(false)),
        store,
        Encoding::Json,
        &WatchSettings::default(),
        || {},
    );
    assert!(matches!(refused, Err(WatchError::TooOld(_))));
}

/// The annotations (field 12 entries) of a protobuf object's metadata.
fn pb_annotations(object: &[u8]) -> Vec<(String, String)> {
    let Some(Ok((1, crate::protobuf::Value::Bytes(meta)))) = crate::protobuf::fields(object).next() else {
        return Vec::new();
    };
    crate::protobuf::fields(meta)
        .filter_map(|f| match f.expect("field") {
            (12, crate::protobuf::Value::Bytes(entry)) => {
                let mut kv = crate::protobuf::fields(entry).map(|f| match f.expect("field") {
                    (_, crate::protobuf::Value::Bytes(b)) => String::from_utf8_lossy(b).into_owned(),
                    _ => String::new(),
                });
                Some((kv.next().unwrap_or_default(), kv.next().unwrap_or_default()))
            }
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn protobuf_streaming_lists_end_their_initial_events_with_an_annotated_bookmark() {
    let store = Arc::new(Store::new(100, 100));
    store.replace(
        vec![
            pb_configmap("a", "x", 2, &[("app", "web")]),
            pb_configmap("a", "z", 3, &[("app", "db")]),
        ],
        5,
    );
    let uri = watch_list_uri("/api/v1/configmaps", "", "&labelSelector=app%3Dweb");
    let response = start_watch(&store, &uri, Encoding::Protobuf);
    store.apply(EventType::Modified, pb_configmap("a", "z", 6, &[("app", "web")]));
    let events = protobuf_events(response, 3).await;
    let summary: Vec<_> = events
        .iter()
        .map(|(kind, meta, raw)| {
            (
                kind.as_str(),
                meta.name.as_str(),
                meta.resource_version.as_str(),
                pb_annotations(raw),
            )
        })
        .collect();
    let end = vec![(INITIAL_EVENTS_END.to_string(), "true".to_string())];
    assert_eq!(
        summary,
        [
            ("ADDED", "x", "2", vec![]),
            ("BOOKMARK", "", "5", end),
            ("ADDED", "z", "6", vec![]),
        ]
    );
    // Without an API server bookmark to copy: ObjectMeta{resourceVersion,
    // annotations} alone.
    assert_eq!(
        events[1].2.as_ref(),
        b"\x0a\x26\x32\x015\x62\x21\x0a\x19k8s.io/initial-events-end\x12\x04true"
    );
}

#[tokio::test]
async fn a_protobuf_end_bookmark_is_the_api_servers_bookmark_with_the_annotation_in_its_place() {
    // A v1.20 bookmark's ConfigMap: every ObjectMeta string written, empty,
    // creationTimestamp, clusterName (15) last.
    let template = b"\x0a\x19\x0a\x00\x12\x00\x1a\x00\x22\x00\x2a\x00\x32\x03123\x38\x00\x42\x04\x08\x00\x10\x00\x7a\x00";
    let store = Arc::new(Store::new(100, 100));
    store.replace(vec![pb_configmap("a", "x", 2, &[])], 5);
    store.remember_bookmark(Bytes::from_static(template));
    let response = start_watch(
        &store,
        &watch_list_uri("/api/v1/configmaps", "0", ""),
        Encoding::Protobuf,
    );
    let events = protobuf_events(response, 2).await;
    assert_eq!(events[1].0, "BOOKMARK");
    assert_eq!(
        events[1].2.as_ref(),
        &b"\x0a\x3a\x0a\x00\x12\x00\x1a\x00\x22\x00\x2a\x00\x32\x015\x38\x00\x42\x04\x08\x00\x10\x00\
           \x62\x21\x0a\x19k8s.io/initial-events-end\x12\x04true\x7a\x00"[..]
    );
    // Among other annotations, in key order; one of the same key is replaced.
    let entry = |k: &str, v: &str| {
        let mut e = vec![0x0a, u8::try_from(k.len()).expect("short")];
        e.extend_from_slice(k.as_bytes());
        e.extend_from_slice(&[0x12, u8::try_from(v.len()).expect("short")]);
        e.extend_from_slice(v.as_bytes());
        let mut f = vec![0x62, u8::try_from(e.len()).expect("short")];
        f.extend_from_slice(&e);
        f
    };
    let object = |entries: &[(&str, &str)]| {
        let mut meta = b"\x32\x015".to_vec();
        for (k, v) in entries {
            meta.extend_from_slice(&entry(k, v));
        }
        meta.extend_from_slice(b"\x7a\x00");
        let mut out = vec![0x0a, u8::try_from(meta.len()).expect("short")];
        out.extend_from_slice(&meta);
        out.extend_from_slice(b"\x12\x00");
        out
    };
    let annotated = crate::protobuf::with_annotation(&object(&[("a", "1"), ("z", "2")]), "k", "true");
    assert_eq!(
        annotated.as_ref(),
        object(&[("a", "1"), ("k", "true"), ("z", "2")])
    );
    let replaced = crate::protobuf::with_annotation(&object(&[("k", "false")]), "k", "true");
    assert_eq!(replaced.as_ref(), object(&[("k", "true")]));
}

// ------------------------------------------ streaming lists: freshness ----

/// An API server whose LIST `?limit=1` says it is at `version` (or fails).
struct CurrentVersion {
    version: Option<u64>,
    asked: std::sync::Mutex<Vec<String>>,
}

impl CurrentVersion {
    fn at(version: Option<u64>) -> CurrentVersion {
        CurrentVersion {
            version,
            asked: std::sync::Mutex::new(Vec::new()),
        }
    }
}

impl crate::upstream::ApiClient for CurrentVersion {
    fn fetch(
        &self,
        request: http::Request<()>,
    ) -> crate::upstream::BoxFuture<'_, Result<Response<Bytes>, crate::upstream::FetchError>> {
        self.asked.lock().expect("lock").push(format!(
            "{} {}",
            request.uri(),
            request.headers()[header::ACCEPT].to_str().expect("ascii")
        ));
        let answer = match self.version {
            Some(rv) => Ok(Response::new(Bytes::from(format!(
                r#"{{"kind":"PartialObjectMetadataList","apiVersion":"meta.k8s.io/v1","metadata":{{"resourceVersion":"{rv}","continue":"x","remainingItemCount":3}},"items":[{{"metadata":{{"name":"x"}}}}]}}"#
            )))),
            None => Err(crate::upstream::FetchError("connection refused".into())),
        };
        Box::pin(async move { answer })
    }

    fn stream(
        &self,
        _: http::Request<()>,
    ) -> crate::upstream::BoxFuture<
        '_,
        Result<Response<crate::upstream::ByteStream>, crate::upstream::FetchError>,
    > {
        Box::pin(async { Err(crate::upstream::FetchError("no watches here".into())) })
    }
}

const FRESH: Duration = Duration::from_secs(3);

async fn prepared(
    store: &Arc<Store>,
    uri: &str,
    api: &CurrentVersion,
) -> Result<Response<ChunkStream>, Response<ChunkStream>> {
    let plan = plan_for(uri, None).expect("plan");
    let plan = prepare_watch(plan, &spec(false), store, Encoding::Json, api, FRESH).await?;
    Ok(watch(
        plan,
        Arc::new(spec(false)),
        store.clone(),
        Encoding::Json,
        &WatchSettings::default(),
        || {},
    )
    .expect("watch"))
}

/// The watch, when [`prepare_watch`] let it start.
fn served(
    prepared: Result<Response<ChunkStream>, Response<ChunkStream>>,
    what: &str,
) -> Response<ChunkStream> {
    prepared.unwrap_or_else(|_| panic!("{what}: refused"))
}

/// The answer of a watch [`prepare_watch`] refused.
fn refused(
    prepared: Result<Response<ChunkStream>, Response<ChunkStream>>,
    what: &str,
) -> Response<ChunkStream> {
    match prepared {
        Ok(_) => panic!("{what}: started"),
        Err(answer) => answer,
    }
}

/// The one ERROR event of a watch that could not start, then its end.
async fn error_event(mut response: Response<ChunkStream>) -> String {
    use futures::StreamExt;
    assert_eq!(response.status(), StatusCode::OK);
    let frame = response
        .body_mut()
        .next()
        .await
        .expect("a frame")
        .expect("no error")
        .into_bytes();
    assert!(response.body_mut().next().await.is_none(), "then the end");
    String::from_utf8_lossy(&frame).into_owned()
}

#[tokio::test(start_paused = true)]
async fn a_streaming_list_without_a_version_waits_for_the_api_servers_current_version() {
    let store = stream_store(100);
    let api = CurrentVersion::at(Some(9));
    let uri = watch_list_uri("/api/v1/namespaces/a/configmaps", "", "");
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            store.apply(EventType::Modified, configmap("a", "x", 9, &[("app", "web")]));
        })
    };
    let started = tokio::time::Instant::now();
    let response = served(prepared(&store, &uri, &api).await, "fresh in time");
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(1),
        "as soon as the store reached 9"
    );
    writer.await.expect("writer");
    let events = frames(response, 4).await;
    assert_eq!(
        streamed(&events),
        [
            ev("ADDED", "x", "9", false),
            ev("ADDED", "y", "4", false),
            ev("ADDED", "z", "3", false),
            ev("BOOKMARK", "", "9", true),
        ]
    );
    assert_eq!(
        *api.asked.lock().expect("lock"),
        ["/api/v1/configmaps?limit=1 application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,application/json"]
    );
}

#[tokio::test(start_paused = true)]
async fn a_quiet_store_in_sync_serves_a_streaming_list_without_a_version_at_its_own_version() {
    // etcd's revision moved with other resources; this one did not change.
    let store = stream_store(100);
    let api = CurrentVersion::at(Some(40));
    let started = tokio::time::Instant::now();
    let response = served(
        prepared(
            &store,
            &watch_list_uri("/api/v1/namespaces/b/configmaps", "", ""),
            &api,
        )
        .await,
        "served",
    );
    assert_eq!(
        started.elapsed(),
        FRESH,
        "after giving the store's watch its chance"
    );
    let events = frames(response, 2).await;
    assert_eq!(
        streamed(&events),
        [ev("ADDED", "w", "1", false), ev("BOOKMARK", "", "5", true)]
    );
    // Out of sync with the API server, it is not fresh enough: the cacher's
    // answer to a cache behind the version.
    store.mark_unsynced();
    let refused = refused(
        prepared(&store, &watch_list_uri("/api/v1/configmaps", "", ""), &api).await,
        "not fresh",
    );
    assert_eq!(
        error_event(refused).await,
        "{\"type\":\"ERROR\",\"object\":{\"kind\":\"Status\",\"apiVersion\":\"v1\",\"metadata\":{},\
         \"status\":\"Failure\",\"message\":\"Timeout: Too large resource version: 40, current: 5\",\
         \"reason\":\"Timeout\",\"details\":{\"causes\":[{\"reason\":\"ResourceVersionTooLarge\",\
         \"message\":\"Too large resource version\"}],\"retryAfterSeconds\":1},\"code\":504}}\n"
    );
}

#[tokio::test(start_paused = true)]
async fn a_streaming_list_at_a_version_waits_for_it_or_gets_too_large_resource_version() {
    let store = stream_store(100);
    let api = CurrentVersion::at(Some(1000));
    // Reached while waiting: served, at the store's version then.
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            store.progress(8);
        })
    };
    let response = served(
        prepared(
            &store,
            &watch_list_uri("/api/v1/namespaces/b/configmaps", "7", ""),
            &api,
        )
        .await,
        "fresh in time",
    );
    writer.await.expect("writer");
    assert_eq!(
        streamed(&frames(response, 2).await),
        [ev("ADDED", "w", "1", false), ev("BOOKMARK", "", "8", true)]
    );
    // Never reached, though in sync: the version is the client's promise.
    let started = tokio::time::Instant::now();
    let refused = refused(
        prepared(&store, &watch_list_uri("/api/v1/configmaps", "12", ""), &api).await,
        "not fresh",
    );
    assert_eq!(started.elapsed(), FRESH);
    assert!(error_event(refused)
        .await
        .contains("\"message\":\"Timeout: Too large resource version: 12, current: 8\""),);
    assert!(
        api.asked.lock().expect("lock").is_empty(),
        "a version needs no question to the API server"
    );
}

#[tokio::test(start_paused = true)]
async fn send_initial_events_false_without_a_version_follows_changes_after_the_api_servers_version() {
    let store = stream_store(100);
    let api = CurrentVersion::at(Some(7));
    let uri = "/api/v1/configmaps?watch=true&sendInitialEvents=false&resourceVersionMatch=NotOlderThan";
    let started = tokio::time::Instant::now();
    let response = served(prepared(&store, uri, &api).await, "served");
    assert_eq!(started.elapsed(), Duration::ZERO, "no wait");
    store.apply(EventType::Modified, configmap("a", "x", 6, &[]));
    store.apply(EventType::Modified, configmap("a", "x", 8, &[]));
    assert_eq!(
        streamed(&frames(response, 1).await),
        [ev("MODIFIED", "x", "8", false)]
    );
}

#[tokio::test]
async fn an_api_server_that_cannot_be_asked_its_version_fails_the_streaming_list() {
    let store = stream_store(100);
    let api = CurrentVersion::at(None);
    let refused = refused(
        prepared(&store, &watch_list_uri("/api/v1/configmaps", "", ""), &api).await,
        "failed",
    );
    let event: serde_json::Value = serde_json::from_str(&error_event(refused).await).expect("json");
    assert_eq!(event["type"], "ERROR");
    assert_eq!(event["object"]["code"], 500);
    assert_eq!(event["object"]["reason"], "InternalError");
    assert_eq!(
        event["object"]["message"],
        "unable to get the current resource version of configmaps: connection refused"
    );
    // At 0 nothing is asked, nothing awaited.
    assert!(
        prepared(&store, &watch_list_uri("/api/v1/configmaps", "0", ""), &api)
            .await
            .is_ok()
    );
}
