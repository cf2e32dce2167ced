//! The discovery cache against a fake upstream that serves documents of a
//! v1.30 API server (see `testdata/`) and lets tests drive the CRD and
//! APIService watches.

use std::collections::HashMap;
use std::sync::Mutex;

use futures::stream;
use tokio::sync::mpsc;

use super::*;
use crate::upstream::ByteStream;

const AGGREGATED_V2: &str = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";
const AGGREGATED_V2BETA1: &str = "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList";
const CRDS: &str = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions";
const APISERVICES: &str = "/apis/apiregistration.k8s.io/v1/apiservices";

/// One canned answer: status, headers, body.
#[derive(Clone)]
struct Canned {
    status: StatusCode,
    headers: Vec<(&'static str, String)>,
    body: Bytes,
}

fn canned(status: u16, content_type: &str, body: impl Into<Bytes>) -> Canned {
    Canned {
        status: StatusCode::from_u16(status).expect("status"),
        headers: vec![("content-type", content_type.to_string())],
        body: body.into(),
    }
}

#[derive(Default)]
struct Fake {
    /// (path, accept) → answer; accept "" matches any request without a more specific entry.
    routes: Mutex<HashMap<(String, String), Canned>>,
    /// Every fetch: "path?query" and its Accept.
    fetched: Mutex<Vec<(String, String)>>,
    /// Open watches by resource path.
    watches: Mutex<HashMap<String, mpsc::UnboundedSender<Result<Bytes, FetchError>>>>,
    /// Status the next watch requests get (410 to force a relist).
    watch_status: Mutex<Option<StatusCode>>,
    delay: Mutex<Duration>,
    /// Bumped for every fetch so tests can tell answers apart.
    counter: AtomicU64,
}

impl Fake {
    fn route(&self, path: &str, accept: &str, answer: Canned) {
        self.routes
            .lock()
            .expect("lock")
            .insert((path.to_string(), accept.to_string()), answer);
    }

    fn fetches_of(&self, path: &str) -> usize {
        self.fetched
            .lock()
            .expect("lock")
            .iter()
            .filter(|(p, _)| p.split('?').next() == Some(path))
            .count()
    }

    fn push(&self, resource: &str, event: serde_json::Value) {
        let mut line = serde_json::to_vec(&event).expect("json");
        line.push(b'\n');
        let watches = self.watches.lock().expect("lock");
        watches
            .get(resource)
            .expect("watch open")
            .send(Ok(Bytes::from(line)))
            .expect("watch alive");
    }

    fn break_watch(&self, resource: &str) {
        let sender = self
            .watches
            .lock()
            .expect("lock")
            .remove(resource)
            .expect("watch open");
        sender
            .send(Err(FetchError("connection reset".into())))
            .expect("watch alive");
    }

    fn watch_open(&self, resource: &str) -> bool {
        self.watches
            .lock()
            .expect("lock")
            .get(resource)
            .is_some_and(|s| !s.is_closed())
    }
}

impl ApiClient for Fake {
    fn fetch(&self, request: Request<()>) -> BoxFuture<'_, Result<Response<Bytes>, FetchError>> {
        Box::pin(async move {
            let delay = *self.delay.lock().expect("lock");
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let uri = request.uri().to_string();
            let path = request.uri().path().to_string();
            let accept = request
                .headers()
                .get(header::ACCEPT)
                .map(|v| v.to_str().expect("ascii").to_string())
                .unwrap_or_default();
            self.fetched.lock().expect("lock").push((uri, accept.clone()));
            let n = self.counter.fetch_add(1, Ordering::SeqCst);
            if path == CRDS || path == APISERVICES {
                let list = format!(
                    r#"{{"kind":"List","metadata":{{"resourceVersion":"{}"}},"items":[]}}"#,
                    100 + n
                );
                return Ok(Response::new(Bytes::from(list)));
            }
            let routes = self.routes.lock().expect("lock");
            let answer = routes
                .get(&(path.clone(), accept))
                .or_else(|| routes.get(&(path.clone(), String::new())))
                .cloned()
                .unwrap_or_else(|| canned(404, "application/json", r#"{"kind":"Status","code":404}"#));
            let mut response = Response::new(answer.body);
            *response.status_mut() = answer.status;
            for (name, value) in answer.headers {
                response
                    .headers_mut()
                    .append(name, HeaderValue::from_str(&value).expect("header"));
            }
            response.headers_mut().insert("audit-id", HeaderValue::from(n));
            Ok(response)
        })
    }

    fn stream(&self, request: Request<()>) -> BoxFuture<'_, Result<Response<ByteStream>, FetchError>> {
        Box::pin(async move {
            let path = request.uri().path().to_string();
            if let Some(status) = self.watch_status.lock().expect("lock").take() {
                let mut response = Response::new(Box::pin(stream::empty()) as ByteStream);
                *response.status_mut() = status;
                return Ok(response);
            }
            let (tx, rx) = mpsc::unbounded_channel();
            self.watches.lock().expect("lock").insert(path, tx);
            let body = stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
            Ok(Response::new(Box::pin(body) as ByteStream))
        })
    }
}

fn fake() -> Arc<Fake> {
    let fake = Arc::new(Fake::default());
    fake.route(
        "/apis",
        AGGREGATED_V2,
        Canned {
            status: StatusCode::OK,
            headers: vec![
                ("content-type", AGGREGATED_V2.to_string()),
                ("etag", "\"6B5A3D1F\"".to_string()),
                ("vary", "Accept".to_string()),
            ],
            body: Bytes::from_static(include_bytes!("../../testdata/aggregated-v2-apis.json")),
        },
    );
    fake.route(
        "/apis",
        AGGREGATED_V2BETA1,
        Canned {
            status: StatusCode::OK,
            headers: vec![
                ("content-type", AGGREGATED_V2BETA1.to_string()),
                ("etag", "\"9C2E7A44\"".to_string()),
            ],
            body: Bytes::from_static(include_bytes!("../../testdata/aggregated-v2beta1-apis.json")),
        },
    );
    fake.route(
        "/apis",
        "",
        canned(
            200,
            "application/json",
            r#"{"kind":"APIGroupList","apiVersion":"v1","groups":[{"name":"apps","versions":[{"groupVersion":"apps/v1","version":"v1"}],"preferredVersion":{"groupVersion":"apps/v1","version":"v1"}}]}"#,
        ),
    );
    fake.route(
        "/api/v1",
        "",
        canned(
            200,
            "application/json",
            r#"{"kind":"APIResourceList","groupVersion":"v1","resources":[{"name":"pods","singularName":"","namespaced":true,"kind":"Pod","verbs":["create","delete","deletecollection","get","list","patch","update","watch"],"shortNames":["po"]},{"name":"pods/log","singularName":"","namespaced":true,"kind":"Pod","verbs":["get"]},{"name":"namespaces","singularName":"","namespaced":false,"kind":"Namespace","verbs":["create","delete","get","list","patch","update","watch"]}]}"#,
        ),
    );
    fake.route(
        "/apis/stable.example.com/v1",
        "",
        canned(
            200,
            "application/json",
            r#"{"kind":"APIResourceList","apiVersion":"v1","groupVersion":"stable.example.com/v1","resources":[{"name":"crontabs","singularName":"crontab","namespaced":true,"kind":"CronTab","verbs":["delete","deletecollection","get","list","patch","create","update","watch"]}]}"#,
        ),
    );
    fake.route(
        "/version",
        "",
        canned(
            200,
            "application/json",
            r#"{"major":"1","minor":"30","gitVersion":"v1.30.0"}"#,
        ),
    );
    fake.route(
        "/openapi/v3",
        "",
        canned(
            200,
            "application/json",
            &include_bytes!("../../testdata/openapi-v3-root.json")[..],
        ),
    );
    fake.route(
        "/openapi/v3/apis/apps/v1",
        "",
        Canned {
            status: StatusCode::OK,
            headers: vec![
                ("content-type", "application/json".to_string()),
                ("etag", "\"C1D4E7F0A3B6C9D2\"".to_string()),
                ("cache-control", "public, immutable".to_string()),
                ("expires", "Thu, 23 Nov 2027 11:00:00 GMT".to_string()),
            ],
            body: Bytes::from_static(include_bytes!("../../testdata/openapi-v3-apps-v1.json")),
        },
    );
    fake.route(
        "/apis/broken.example.com/v1",
        "",
        canned(503, "application/json", r#"{"kind":"Status","code":503}"#),
    );
    fake
}

fn config(max_age: Duration) -> DiscoveryConfig {
    DiscoveryConfig {
        enabled: true,
        max_age,
    }
}

/// A discovery cache over `fake`, its watches running, in sync.
async fn synced(fake: &Arc<Fake>, max_age: Duration) -> Discovery {
    let discovery = Discovery::new(fake.clone(), config(max_age), DiscoveryMetrics::default());
    tokio::spawn(discovery.clone().run());
    wait_for(|| discovery.is_synced() && fake.watch_open(CRDS) && fake.watch_open(APISERVICES)).await;
    discovery
}

async fn wait_for(condition: impl Fn() -> bool) {
    for _ in 0..2000 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("condition not reached");
}

fn request(method: &str, uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
    let mut builder = Request::builder().method(method).uri(uri);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(()).expect("request").into_parts().0
}

async fn get(discovery: &Discovery, uri: &str, headers: &[(&str, &str)]) -> Response<Bytes> {
    discovery
        .serve(&request("GET", uri, headers))
        .await
        .expect("discovery request")
        .expect("answer")
}

const HOUR: Duration = Duration::from_secs(3600);

#[test]
fn discovery_paths_are_classified_exactly() {
    let cases = [
        ("/api", Some(EndpointKind::Api)),
        ("/api/v1", Some(EndpointKind::CoreVersion)),
        ("/apis", Some(EndpointKind::Apis)),
        ("/apis/apps", Some(EndpointKind::Group)),
        ("/apis/apps/v1", Some(EndpointKind::GroupVersion)),
        ("/version", Some(EndpointKind::Version)),
        ("/openapi/v2", Some(EndpointKind::OpenApiV2)),
        ("/openapi/v3", Some(EndpointKind::OpenApiV3)),
        ("/openapi/v3/apis/apps/v1", Some(EndpointKind::OpenApiV3)),
        ("/api/v1/pods", None),
        ("/apis/apps/v1/deployments", None),
        ("/api/", None),
        ("/apis//v1", None),
        ("/versionz", None),
        ("/openapi/v1", None),
        ("/healthz", None),
        ("", None),
    ];
    for (path, kind) in cases {
        assert_eq!(classify_path(path), kind, "{path}");
    }
}

#[tokio::test]
async fn an_unsynced_cache_forwards_everything() {
    let fake = fake();
    let discovery = Discovery::new(fake.clone(), config(HOUR), DiscoveryMetrics::default());
    assert!(discovery.serve(&request("GET", "/apis", &[])).await.is_none());
    assert_eq!(fake.fetches_of("/apis"), 0);
}

#[tokio::test]
async fn non_discovery_requests_and_writes_are_not_served() {
    let fake = fake();
    let discovery = synced(&fake, HOUR).await;
    assert!(discovery
        .serve(&request("GET", "/api/v1/pods", &[]))
        .await
        .is_none());
    assert!(discovery.serve(&request("POST", "/apis", &[])).await.is_none());
    assert!(discovery
        .serve(&request("DELETE", "/version", &[]))
        .await
        .is_none());
}

#[tokio::test]
async fn repeated_requests_are_answered_from_memory() {
    let fake = fake();
    let discovery = synced(&fake, HOUR).await;
    let first = get(&discovery, "/api/v1", &[]).await;
    for _ in 0..5 {
        let again = get(&discovery, "/api/v1", &[]).await;
        assert_eq!(again.body(), first.body());
        assert_eq!(again.headers()["content-type"], "application/json");
        assert!(
            !again.headers().contains_key("audit-id"),
            "per-request headers are not replayed"
        );
    }
    assert_eq!(fake.fetches_of("/api/v1"), 1);
}

#[tokio::test]
async fn aggregated_discovery_v2_and_v2beta1_are_cached_apart_from_plain_json() {
    let fake = fake();
    let discovery = synced(&fake, HOUR).await;
    for _ in 0..2 {
        let v2 = get(&discovery, "/apis", &[("accept", AGGREGATED_V2)]).await;
        assert_eq!(v2.headers()["content-type"], AGGREGATED_V2);
        let list: serde_json::Value = serde_json::from_slice(v2.body()).expect("json");
        assert_eq!(list["kind"], "APIGroupDiscoveryList");
        assert_eq!(list["apiVersion"], "apidiscovery.k8s.io/v2");

        let beta = get(&discovery, "/apis", &[("accept", AGGREGATED_V2BETA1)]).await;
        assert_eq!(beta.headers()["content-type"], AGGREGATED_V2BETA1);
        let list: serde_json::Value = serde_json::from_slice(beta.body()).expect("json");
        assert_eq!(list["apiVersion"], "apidiscovery.k8s.io/v2beta1");

        let plain = get(&discovery, "/apis", &[("accept", "application/json")]).await;
        let list: serde_json::Value = serde_json::from_slice(plain.body()).expect("json");
        assert_eq!(list["kind"], "APIGroupList");
    }
    assert_eq!(fake.fetches_of("/apis"), 3, "one fetch per Accept");
}

#[tokio::test]
async fn the_query_is_part_of_the_key() {
    let fake = fake();
    let discovery = synced(&fake, HOUR).await;
    get(&discovery, "/version", &[]).await;
    get(&discovery, "/version?timeout=32s", &[]).await;
    get(&discovery, "/version?timeout=32s", &[]).await;
    assert_eq!(fake.fetches_of("/version"), 2);
}

#[tokio::test]
async fn if_none_match_with_the_current_etag_gets_304() {
    let fake = fake();
    let discovery = synced(&fake, HOUR).await;
    let uri = "/openapi/v3/apis/apps/v1?hash=C1D4E7F0A3B6C9D2";
    let full = get(&discovery, uri, &[]).await;
    assert_eq!(full.status(), 200);
    assert_eq!(full.headers()["etag"], "\"C1D4E7F0A3B6C9D2\"");
    assert_eq!(full.headers()["cache-control"], "public, immutable");

    let same = get(&discovery, uri, &[("if-none-match", "\"C1D4E7F0A3B6C9D2\"")]).await;
    assert_eq!(same.status(), 304);
    assert!(same.body().is_empty());
    assert_eq!(same.headers()["etag"], "\"C1D4E7F0A3B6C9D2\"");

    let weak = get(
        &discovery,
        uri,
        &[("if-none-match", "W/\"old\", W/\"C1D4E7F0A3B6C9D2\"")],
    )
    .await;
    assert_eq!(weak.status(), 304);
    let other = get(&discovery, uri, &[("if-none-match", "\"old\"")]).await;
    assert_eq!(other.status(), 200);
    assert_eq!(other.body(), full.body());
    assert_eq!(fake.fetches_of("/openapi/v3/apis/apps/v1"), 1);
}

#[tokio::test]
async fn head_requests_get_headers_without_a_body() {
    let fake = fake();
    let discovery = synced(&fake, HOUR).await;
    let full = get(&discovery, "/openapi/v3", &[]).await;
    let head = discovery
        .serve(&request("HEAD", "/openapi/v3", &[]))
        .await
        .expect("served")
        .expect("answer");
    assert_eq!(head.status(), 200);
    assert!(head.body().is_empty());
    assert_eq!(
        head.headers()["content-length"],
        full.body().len().to_string().as_str()
    );
}

#[tokio::test]
async fn concurrent_misses_make_one_upstream_request() {
    let fake = fake();
    let discovery = synced(&fake, HOUR).await;
    *fake.delay.lock().expect("lock") = Duration::from_millis(50);
    let answers = futures::future::join_all((0..50).map(|_| get(&discovery, "/api/v1", &[]))).await;
    assert_eq!(fake.fetches_of("/api/v1"), 1);
    assert!(answers
        .iter()
        .all(|a| a.body() == answers[0].body() && a.status() == 200));
}

#[tokio::test]
async fn a_client_giving_up_does_not_cancel_the_fetch_for_others() {
    let fake = fake();
    let discovery = synced(&fake, HOUR).await;
    *fake.delay.lock().expect("lock") = Duration::from_millis(50);
    let impatient = tokio::time::timeout(Duration::from_millis(5), get(&discovery, "/api/v1", &[])).await;
    assert!(impatient.is_err());
    let patient = get(&discovery, "/api/v1", &[]).await;
    assert_eq!(patient.status(), 200);
    assert_eq!(
        fake.fetches_of("/api/v1"),
        1,
        "the second request joined the first one's fetch"
    );
}

#[tokio::test]
async fn upstream_errors_are_passed_on_and_not_cached() {
    let fake = fake();
    let discovery = synced(&fake, HOUR).await;
    for _ in 0..2 {
        let answer = get(&discovery, "/apis/broken.example.com/v1", &[]).await;
        assert_eq!(answer.status(), 503);
        assert_eq!(answer.body().as_ref(), br#"{"kind":"Status","code":503}"#);
    }
    assert_eq!(fake.fetches_of("/apis/broken.example.com/v1"), 2);
}

#[tokio::test]
async fn a_crd_change_invalidates_its_group_and_openapi_but_not_the_rest() {
    let fake = fake();
    let discovery = synced(&fake, HOUR).await;
    for uri in [
        "/apis/stable.example.com/v1",
        "/api/v1",
        "/apis",
        "/openapi/v3",
        "/version",
    ] {
        get(&discovery, uri, &[]).await;
    }
    fake.push(
        CRDS,
        serde_json::json!({"type": "ADDED", "object": {
            "kind": "CustomResourceDefinition",
            "metadata": {"name": "crontabs.stable.example.com", "resourceVersion": "200"},
            "spec": {"group": "stable.example.com"}}}),
    );
    wait_for(|| discovery.inner.entries.len() == 2).await;
    for uri in [
        "/apis/stable.example.com/v1",
        "/api/v1",
        "/apis",
        "/openapi/v3",
        "/version",
    ] {
        get(&discovery, uri, &[]).await;
    }
    assert_eq!(fake.fetches_of("/apis/stable.example.com/v1"), 2);
    assert_eq!(fake.fetches_of("/apis"), 2);
    assert_eq!(fake.fetches_of("/openapi/v3"), 2);
    assert_eq!(fake.fetches_of("/api/v1"), 1);
    assert_eq!(fake.fetches_of("/version"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_change_invalidates_again_once_the_api_server_has_settled() {
    let fake = fake();
    let discovery = synced(&fake, HOUR).await;
    fake.push(
        APISERVICES,
        serde_json::json!({"type": "MODIFIED", "object": {
            "kind": "APIService", "metadata": {"name": "v1.stable.example.com", "resourceVersion": "300"},
            "spec": {"group": "stable.example.com"}}}),
    );
    wait_for(|| discovery.inner.metrics.invalidations.get() >= 2).await;
    // Fetched right after the event: may predate the API server's own update.
    get(&discovery, "/apis/stable.example.com/v1", &[]).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    get(&discovery, "/apis/stable.example.com/v1", &[]).await;
    assert_eq!(fake.fetches_of("/apis/stable.example.com/v1"), 2);
}

#[tokio::test]
async fn bookmarks_move_the_resource_version_without_invalidating() {
    let fake = fake();
    let discovery = synced(&fake, HOUR).await;
    get(&discovery, "/apis", &[]).await;
    let before = discovery.inner.metrics.invalidations.get();
    fake.push(
        CRDS,
        serde_json::json!({"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "500"}}}),
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(discovery.inner.metrics.invalidations.get(), before);
    get(&discovery, "/apis", &[]).await;
    assert_eq!(fake.fetches_of("/apis"), 1);
}

#[tokio::test]
async fn a_lost_watch_flushes_and_forwards_until_resynced() {
    let fake = fake();
    let discovery = synced(&fake, HOUR).await;
    get(&discovery, "/api/v1", &[]).await;
    let lists_before = fake.fetches_of(CRDS);
    fake.break_watch(CRDS);
    wait_for(|| !discovery.is_synced() || fake.fetches_of(CRDS) > lists_before).await;
    // Resynced by a relist, with everything flushed.
    wait_for(|| discovery.is_synced() && fake.watch_open(CRDS)).await;
    assert!(fake.fetches_of(CRDS) > lists_before, "relisted");
    get(&discovery, "/api/v1", &[]).await;
    assert_eq!(fake.fetches_of("/api/v1"), 2);
}

#[tokio::test]
async fn a_410_relists_and_resumes() {
    let fake = fake();
    let discovery = synced(&fake, HOUR).await;
    let lists_before = fake.fetches_of(APISERVICES);
    *fake.watch_status.lock().expect("lock") = Some(StatusCode::GONE);
    // End the current watch normally: the renewal gets 410 and must relist.
    fake.watches.lock().expect("lock").remove(APISERVICES);
    wait_for(|| fake.fetches_of(APISERVICES) > lists_before && fake.watch_open(APISERVICES)).await;
    assert!(discovery.is_synced());
}

#[tokio::test]
async fn a_watch_error_event_with_410_relists() {
    let fake = fake();
    let _discovery = synced(&fake, HOUR).await;
    let lists_before = fake.fetches_of(CRDS);
    fake.push(
        CRDS,
        serde_json::json!({"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired",
            "message": "too old resource version: 1 (200)"}}),
    );
    wait_for(|| fake.fetches_of(CRDS) > lists_before).await;
}

#[tokio::test(start_paused = true)]
async fn entries_past_their_maximum_age_are_refreshed() {
    let fake = fake();
    let discovery = synced(&fake, Duration::from_secs(60)).await;
    get(&discovery, "/version", &[]).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    get(&discovery, "/version", &[]).await;
    assert_eq!(fake.fetches_of("/version"), 1);
    tokio::time::sleep(Duration::from_secs(31)).await;
    get(&discovery, "/version", &[]).await;
    assert_eq!(fake.fetches_of("/version"), 2);
    assert_eq!(
        discovery
            .inner
            .metrics
            .refreshes
            .get_or_create(&KindLabels { kind: "version" })
            .get(),
        1
    );
}

#[tokio::test]
async fn disabled_discovery_caching_forwards() {
    let fake = fake();
    let discovery = Discovery::new(
        fake.clone(),
        DiscoveryConfig {
            enabled: false,
            max_age: HOUR,
        },
        DiscoveryMetrics::default(),
    );
    tokio::spawn(discovery.clone().run());
    wait_for(|| fake.watch_open(CRDS)).await;
    assert!(discovery.serve(&request("GET", "/apis", &[])).await.is_none());
}

#[tokio::test]
async fn the_catalogue_reads_resources_from_discovery() {
    let fake = fake();
    let discovery = synced(&fake, HOUR).await;
    let core = discovery.resources("", "v1").await.expect("core");
    let pods = core.iter().find(|r| r.name == "pods").expect("pods");
    assert!(pods.namespaced);
    assert_eq!(pods.kind, "Pod");
    assert!(pods.verbs.iter().any(|v| v == "watch"));
    let namespaces = core.iter().find(|r| r.name == "namespaces").expect("namespaces");
    assert!(!namespaces.namespaced);
    let crd = discovery
        .resources("stable.example.com", "v1")
        .await
        .expect("crd");
    assert_eq!(crd[0].kind, "CronTab");
    discovery.resources("", "v1").await.expect("again");
    assert_eq!(
        fake.fetches_of("/api/v1"),
        1,
        "the catalogue shares the discovery cache"
    );
    assert!(discovery.resources("broken.example.com", "v1").await.is_err());
}

#[tokio::test]
async fn curl_and_browsers_get_their_own_pretty_entries() {
    let fake = fake();
    let discovery = synced(&fake, HOUR).await;
    for ua in [
        "kubectl/v1.32.4",
        "curl/8.5.0",
        "curl/7.88",
        "Mozilla/5.0 (X11)",
        "kube-rs/5",
    ] {
        get(&discovery, "/version", &[("user-agent", ua)]).await;
    }
    assert_eq!(
        fake.fetches_of("/version"),
        2,
        "one compact entry, one pretty entry"
    );
}

#[tokio::test]
async fn during_an_outage_the_last_answers_are_served_stale_within_the_bound_but_not_changed_ones() {
    let fake = fake();
    let discovery = synced(&fake, HOUR).await;
    let core = request("GET", "/api/v1", &[]);
    let group = request("GET", "/apis/stable.example.com/v1", &[]);
    let first = get(&discovery, "/api/v1", &[]).await;
    get(&discovery, "/apis/stable.example.com/v1", &[]).await;
    // In sync: the current entry, 0 s behind.
    let (answer, behind) = discovery.serve_stale(&core, HOUR).expect("current");
    assert_eq!((answer.status(), behind), (StatusCode::OK, Duration::ZERO));
    // A CRD change: its group's answer is wrong now, even for an outage.
    fake.push(
        CRDS,
        serde_json::json!({"type": "ADDED", "object": {
            "kind": "CustomResourceDefinition",
            "metadata": {"name": "crontabs.stable.example.com", "resourceVersion": "200"},
            "spec": {"group": "stable.example.com"}}}),
    );
    wait_for(|| discovery.inner.last_known.len() == 1).await;
    // The watches are lost: entries are flushed, the last answers kept.
    set_synced(&discovery.inner, |inner| &inner.crds_synced, false);
    discovery.invalidate_all();
    assert!(discovery.inner.entries.is_empty());
    let (answer, behind) = discovery.serve_stale(&core, HOUR).expect("the last answer");
    assert_eq!(answer.status(), StatusCode::OK);
    assert_eq!(answer.body(), first.body());
    assert!(behind < HOUR);
    assert!(
        discovery.serve_stale(&group, HOUR).is_none(),
        "changed: never served"
    );
    std::thread::sleep(Duration::from_millis(5));
    assert!(
        discovery.serve_stale(&core, Duration::from_millis(1)).is_none(),
        "never beyond the bound"
    );
    assert!(discovery
        .serve_stale(&request("POST", "/api/v1", &[]), HOUR)
        .is_none());
}
