//! The protobuf framing against bytes captured from kube-apiserver v1.20
//! (`testdata/protobuf/`, see its README).

use std::sync::Arc;

use http::{HeaderMap, HeaderValue};

use super::*;
use crate::reads::{self, ReadPlan, WatchSettings};
use crate::reflector::{self, ResourceSpec};
use crate::store::{Encoding, Store};
use crate::RequestInfo;

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/testdata/protobuf/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn spec(group: &str, version: &str, resource: &str, kind: &str, namespaced: bool) -> ResourceSpec {
    ResourceSpec {
        group: group.into(),
        version: version.into(),
        resource: resource.into(),
        kind: kind.into(),
        namespaced,
        custom: false,
        speaks_protobuf: Some(true),
    }
}

/// Each captured collection: fixture name, its resource, and its path.
fn collections() -> Vec<(&'static str, ResourceSpec, &'static str)> {
    vec![
        (
            "configmaps",
            spec("", "v1", "configmaps", "ConfigMap", true),
            "/api/v1/namespaces/kache-pb/configmaps",
        ),
        (
            "pods",
            spec("", "v1", "pods", "Pod", true),
            "/api/v1/namespaces/kache-pb/pods",
        ),
        (
            "secrets",
            spec("", "v1", "secrets", "Secret", true),
            "/api/v1/namespaces/kache-pb/secrets",
        ),
        (
            "replicationcontrollers",
            spec("", "v1", "replicationcontrollers", "ReplicationController", true),
            "/api/v1/namespaces/kache-pb/replicationcontrollers",
        ),
        (
            "events",
            spec("", "v1", "events", "Event", true),
            "/api/v1/namespaces/kache-pb/events",
        ),
        ("nodes", spec("", "v1", "nodes", "Node", false), "/api/v1/nodes"),
        (
            "namespaces",
            spec("", "v1", "namespaces", "Namespace", false),
            "/api/v1/namespaces",
        ),
        (
            "jobs",
            spec("batch", "v1", "jobs", "Job", true),
            "/apis/batch/v1/namespaces/kache-pb/jobs",
        ),
        (
            "events.k8s.io-v1",
            spec("events.k8s.io", "v1", "events", "Event", true),
            "/apis/events.k8s.io/v1/namespaces/kache-pb/events",
        ),
        (
            "events.k8s.io-v1beta1",
            spec("events.k8s.io", "v1beta1", "events", "Event", true),
            "/apis/events.k8s.io/v1beta1/namespaces/kache-pb/events",
        ),
    ]
}

fn protobuf_plan(uri: &str) -> ReadPlan {
    let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
    let info = RequestInfo::parse("GET", path, Some(query)).expect("parses");
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::ACCEPT,
        HeaderValue::from_static("application/vnd.kubernetes.protobuf,application/json"),
    );
    reads::plan(&info, Some(query), &headers).expect("plan")
}

fn protobuf_store(spec: &ResourceSpec, list: &[u8]) -> Arc<Store> {
    let (objects, rv) = reflector::protobuf_list(spec, list).expect("the API server's list parses");
    let store = Arc::new(Store::new(100, 100));
    store.replace(objects, rv);
    store
}

fn offset_in(outer: &[u8], inner: &[u8]) -> usize {
    inner.as_ptr() as usize - outer.as_ptr() as usize
}

#[test]
fn envelopes_lists_and_object_meta_parse() {
    let body = fixture("configmaps.pb");
    let list = unwrap(&body).expect("envelope");
    assert_eq!((list.api_version, list.kind), (&b"v1"[..], &b"ConfigMapList"[..]));
    let (rv, items) = list_items(list.raw).expect("list");
    assert_eq!(rv, "766");
    let metas: Vec<Meta> = items.iter().map(|i| object_meta(i).expect("meta")).collect();
    let alpha = metas.iter().find(|m| m.name == "alpha").expect("alpha");
    assert_eq!(alpha.namespace, "kache-pb");
    assert_eq!(alpha.resource_version, "623");
    assert_eq!(
        alpha
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>(),
        ["app=web", "tier=front", "v=2"]
    );
    assert!(
        unwrap(b"{\"kind\":\"ConfigMapList\"}").is_err(),
        "JSON is not protobuf"
    );
    assert!(list_items(&[0x12, 0x05, 0x00]).is_err(), "truncated");
}

#[test]
fn list_items_are_the_objects_own_messages() {
    let list = fixture("configmaps.pb");
    let get = fixture("configmap-alpha.pb");
    let (_, items) = list_items(unwrap(&list).expect("list").raw).expect("items");
    let object = unwrap(&get).expect("object");
    assert_eq!((object.api_version, object.kind), (&b"v1"[..], &b"ConfigMap"[..]));
    assert!(
        items.contains(&object.raw),
        "a list item is byte for byte the GET's raw message"
    );
}

/// The strongest check: kache's list of a store filled from the API server's
/// protobuf list is that very list, items in (namespace, name) order (v1.20's
/// watch cache lists in no particular order).
#[test]
fn assembled_lists_are_the_api_servers_lists_in_key_order() {
    for (name, spec, path) in collections() {
        let body = fixture(&format!("{name}.pb"));
        let store = protobuf_store(&spec, &body);
        let plan = protobuf_plan(&format!("{path}?resourceVersion=0&limit=500"));
        assert_eq!(plan.encoding(&spec), Ok(Encoding::Protobuf), "{name}");
        let response = reads::list(&plan, &spec, &store, Encoding::Protobuf);
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()[http::header::CONTENT_TYPE],
            "application/vnd.kubernetes.protobuf"
        );
        let length = response.headers()[http::header::CONTENT_LENGTH].clone();
        let response = reads::list_body(&plan, &spec, &store, Encoding::Protobuf).to_vec();
        assert_eq!(length, response.len().to_string(), "{name}");

        // The API server's body with its item fields sorted by key: same
        // envelope and ListMeta bytes, same total length.
        let list = unwrap(&body).expect("envelope").raw;
        let mut item_fields: Vec<(Meta, &[u8])> = Vec::new();
        let mut items_start = None;
        for field in raw_fields(list) {
            let (number, bytes, value) = field.expect("field");
            if number == 2 {
                items_start.get_or_insert(offset_in(&body, bytes));
                let Value::Bytes(item) = value else { panic!("item") };
                item_fields.push((object_meta(item).expect("meta"), bytes));
            }
        }
        item_fields.sort_by(|(a, _), (b, _)| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let start = items_start.unwrap_or(offset_in(&body, list) + list.len());
        let end = offset_in(&body, list) + list.len();
        let mut expected = body[..start].to_vec();
        for (_, bytes) in &item_fields {
            expected.extend_from_slice(bytes);
        }
        expected.extend_from_slice(&body[end..]);
        assert_eq!(&response[..], &expected[..], "{name}");
    }
}

#[test]
fn gets_and_not_found_are_the_api_servers_bytes() {
    let spec = spec("", "v1", "configmaps", "ConfigMap", true);
    let store = protobuf_store(&spec, &fixture("configmaps.pb"));
    let plan = protobuf_plan("/api/v1/namespaces/kache-pb/configmaps/alpha?resourceVersion=0");
    let found = reads::get("alpha", &plan, &spec, &store, Encoding::Protobuf);
    assert_eq!(found.status(), 200);
    assert_eq!(
        found.headers()[http::header::CONTENT_TYPE],
        "application/vnd.kubernetes.protobuf"
    );
    assert_eq!(found.body().as_ref(), &fixture("configmap-alpha.pb")[..]);

    let missing = reads::get("nope", &plan, &spec, &store, Encoding::Protobuf);
    assert_eq!(missing.status(), 404);
    assert_eq!(missing.body().as_ref(), &fixture("configmap-notfound.pb")[..]);
    let (code, message) = status(unwrap(missing.body()).expect("status").raw);
    assert_eq!(
        (code, message.as_str()),
        (Some(404), "configmaps \"nope\" not found")
    );

    let plan = protobuf_plan("/api/v1/namespaces/nothing-here/configmaps?resourceVersion=0");
    let empty = Store::new(10, 10);
    empty.replace(vec![], 766);
    let list = reads::list_body(&plan, &spec, &empty, Encoding::Protobuf).to_vec();
    assert_eq!(&list[..], &fixture("configmaps-empty.pb")[..]);
}

#[test]
fn labels_and_fields_read_from_protobuf_match_those_read_from_json() {
    for (name, spec, _) in collections() {
        assert!(fields_known(&spec.group, &spec.version, &spec.resource), "{name}");
        let (from_protobuf, pb_rv) =
            reflector::protobuf_list(&spec, &fixture(&format!("{name}.pb"))).expect("pb");
        let (from_json, json_rv) =
            reflector::json_list(&spec, &fixture(&format!("{name}.json"))).expect("json");
        assert_eq!(pb_rv, json_rv, "{name}: captured at the same version");
        assert_eq!(from_protobuf.len(), from_json.len(), "{name}");
        for json in &from_json {
            let pb = from_protobuf
                .iter()
                .find(|o| (&o.namespace, &o.name) == (&json.namespace, &json.name))
                .unwrap_or_else(|| panic!("{name}: {}/{}", json.namespace, json.name));
            assert_eq!(pb.resource_version, json.resource_version, "{name}/{}", json.name);
            assert_eq!(pb.labels, json.labels, "{name}/{}", json.name);
            assert_eq!(pb.fields, json.fields, "{name}/{}", json.name);
            assert_eq!(pb.encoding(), Encoding::Protobuf);
        }
    }
    // The fixtures exercise the interesting fields, not only empty ones.
    let (pods, _) =
        reflector::protobuf_list(&spec("", "v1", "pods", "Pod", true), &fixture("pods.pb")).expect("pods");
    let p1 = pods.iter().find(|p| p.name == "p1").expect("p1");
    for (field, value) in [
        ("spec.nodeName", "node-a"),
        ("spec.host", "node-a"),
        ("status.phase", "Running"),
        ("status.podIP", "10.0.0.7"),
        ("status.nominatedNodeName", "node-n"),
        ("spec.restartPolicy", "Always"),
        ("spec.schedulerName", "default-scheduler"),
    ] {
        assert_eq!(p1.fields.get(field), Some(value), "{field}");
    }
    let p3 = pods.iter().find(|p| p.name == "p3").expect("p3");
    assert_eq!(p3.fields.get("spec.serviceAccountName"), Some("default"));
    assert_eq!(p3.fields.get("status.phase"), Some("Failed"));
    let (nodes, _) = reflector::protobuf_list(&spec("", "v1", "nodes", "Node", false), &fixture("nodes.pb"))
        .expect("nodes");
    let cordoned: Vec<_> = nodes
        .iter()
        .map(|n| {
            (
                n.name.as_str(),
                n.fields.get("spec.unschedulable").unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(cordoned, [("kache-pb-node", "true"), ("kache-pb-node2", "false")]);
}

#[test]
fn fields_are_known_only_where_the_table_has_every_selectable_field() {
    assert!(fields_known("", "v1", "pods"));
    assert!(fields_known("apps", "v1", "deployments"));
    assert!(fields_known(
        "certificates.k8s.io",
        "v1beta1",
        "certificatesigningrequests"
    ));
    assert!(!fields_known("events.k8s.io", "v2", "events"), "unknown version");
    assert!(!fields_known("", "v2", "pods"), "unknown version");
    assert!(
        !fields_known("stable.example.com", "v1", "crontabs"),
        "not built in"
    );
}

#[test]
fn watch_streams_are_the_api_servers_frames() {
    let spec = Arc::new(spec("", "v1", "configmaps", "ConfigMap", true));
    let stream = fixture("configmaps-watch.pb");
    let (frames, consumed) = split_frames(&stream);
    assert_eq!(consumed, stream.len());
    let kinds: Vec<_> = frames
        .iter()
        .map(|f| String::from_utf8_lossy(watch_event(f).expect("event").kind).into_owned())
        .collect();
    assert_eq!(
        kinds,
        ["ADDED", "ADDED", "ADDED", "MODIFIED", "DELETED", "BOOKMARK"]
    );
    // Every frame is the length prefix and a WatchEvent, re-encoded exactly.
    for frame in &frames {
        let event = watch_event(frame).expect("event");
        let kind = std::str::from_utf8(event.kind).expect("utf8");
        let mut framed = (frame.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(frame);
        assert_eq!(
            watch_frame(kind, "v1", "ConfigMap", event.object.raw).as_ref(),
            &framed[..]
        );
        // And in parts around the message, as a replay sends it.
        let mut parts = watch_frame_head(kind, "v1", "ConfigMap", event.object.raw.len());
        parts.extend_from_slice(event.object.raw);
        parts.extend_from_slice(ENVELOPE_END);
        assert_eq!(parts, framed);
    }
    // Split anywhere, frames come out whole.
    let (partial, used) = split_frames(&stream[..stream.len() - 1]);
    assert_eq!(partial.len(), frames.len() - 1);
    assert_eq!(used, stream.len() - frames[frames.len() - 1].len() - 4);

    // The reflector applies the stream to a store; the bookmark is remembered.
    let store = Store::new(100, 100);
    store.replace(vec![], 600);
    for frame in &frames {
        assert!(reflector::apply_protobuf_event(&spec, &store, frame).is_none());
    }
    assert_eq!(store.resource_version(), 624);
    let names: Vec<_> = store
        .snapshot(None, |_| true)
        .objects
        .iter()
        .map(|o| (o.name.to_string(), o.resource_version))
        .collect();
    assert_eq!(names, [("alpha".to_string(), 623), ("beta".to_string(), 614)]);
    let bookmark = watch_event(frames[5]).expect("bookmark").object.raw;
    assert_eq!(store.bookmark().as_deref(), Some(bookmark));
}

/// kache's own watch, from the same store state and events, sends the API
/// server's bytes.
#[tokio::test]
async fn served_watches_send_the_api_servers_frames() {
    use futures::StreamExt;
    let spec = Arc::new(spec("", "v1", "configmaps", "ConfigMap", true));
    let stream = fixture("configmaps-watch.pb");
    let (frames, _) = split_frames(&stream);
    let objects: Vec<_> = frames[..5]
        .iter()
        .map(|f| {
            let event = watch_event(f).expect("event");
            spec.protobuf_object(Bytes::copy_from_slice(event.object.raw))
                .expect("object")
        })
        .collect();
    let mut objects = objects.into_iter();
    let mut next = || objects.next().expect("object");
    let store = Arc::new(Store::new(100, 100));
    let initial = vec![next(), next(), next()];
    store.replace(initial, 621);
    let plan = protobuf_plan("/api/v1/namespaces/kache-pb/configmaps?watch=true&resourceVersion=0");
    let mut response = reads::watch(
        plan,
        spec.clone(),
        store.clone(),
        Encoding::Protobuf,
        &WatchSettings::default(),
        || {},
    )
    .expect("watch");
    assert_eq!(
        response.headers()[http::header::CONTENT_TYPE],
        "application/vnd.kubernetes.protobuf;stream=watch"
    );
    store.apply(crate::store::EventType::Modified, next());
    store.apply(crate::store::EventType::Deleted, next());
    let expected_len: usize = frames[..5].iter().map(|f| f.len() + 4).sum();
    let mut got = Vec::new();
    while got.len() < expected_len {
        let chunk = tokio::time::timeout(std::time::Duration::from_secs(5), response.body_mut().next())
            .await
            .expect("in time")
            .expect("open")
            .expect("chunk");
        got.extend_from_slice(&chunk.into_bytes());
    }
    assert_eq!(got, stream[..expected_len]);
}

#[test]
fn bookmarks_use_the_api_servers_empty_object() {
    let stream = fixture("pods-watch.pb");
    let (frames, _) = split_frames(&stream);
    let bookmark = frames
        .iter()
        .map(|f| watch_event(f).expect("event"))
        .find(|e| e.kind == b"BOOKMARK")
        .expect("a bookmark");
    let template = bookmark.object.raw;
    assert_eq!(object_meta(template).expect("meta").resource_version, "777");
    // Re-versioned, the template is the API server's bookmark at that version.
    assert_eq!(bookmark_object(Some(template), 777).as_ref(), template);
    let later = bookmark_object(Some(template), 123_456);
    assert_eq!(object_meta(&later).expect("meta").resource_version, "123456");
    assert_eq!(later.len(), template.len() + 3);
    let spec_at = |m: &[u8]| at(m, &[2]).and_then(Value::bytes).map(<[u8]>::to_vec);
    assert_eq!(spec_at(&later), spec_at(template), "the empty spec is kept");
    // Without one: only the version, which decodes to the same object.
    let minimal = bookmark_object(None, 777);
    assert_eq!(minimal.as_ref(), &[0x0a, 0x05, 0x32, 0x03, b'7', b'7', b'7']);
}

#[test]
fn resource_versions_are_replaced_in_place() {
    let body = fixture("configmap-alpha.pb");
    let object = unwrap(&body).expect("object").raw;
    let moved = with_resource_version(object, 9_999);
    let meta = object_meta(&moved).expect("meta");
    assert_eq!(
        (meta.name.as_str(), meta.resource_version.as_str()),
        ("alpha", "9999")
    );
    assert_eq!(meta.labels, object_meta(object).expect("meta").labels);
    assert_eq!(moved.len(), object.len() + 1);
    assert_eq!(with_resource_version(&moved, 623).as_ref(), object);
    // Data after the metadata is untouched.
    assert_eq!(at(&moved, &[2]), at(object, &[2]));
}

#[test]
fn malformed_messages_are_errors_not_panics() {
    for bytes in [
        &[0x0a][..],
        &[0x0a, 0x05, 0x01],
        &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
        &[0x0b],
    ] {
        assert!(fields(bytes).any(|f| f.is_err()), "{bytes:?}");
        assert!(object_meta(bytes).is_err(), "{bytes:?}");
        assert!(watch_event(bytes).is_err(), "{bytes:?}");
    }
    assert!(split_frames(&[0, 0, 0, 9, 1]).0.is_empty());
}
