//! Shared mode against the real API server: every client is itself. The
//! same request, with the same credentials, is asked of kache and of the API
//! server, and the answers must be the same — status, `Status` body, and the
//! items returned — whether kache answered from memory, forwarded, or
//! refused. And local mode never answers an impersonating request from memory.
//!
//! The test cluster's users: `admin` (client certificate, system:masters; also
//! kache's own identity upstream), `admin-token`, `alice` and `bob` (static
//! tokens; alice and bob have no grants but what these tests give them), a
//! service account whose token comes from the TokenRequest API, and
//! anonymous requests (the API server has anonymous authentication on).

#![allow(clippy::unwrap_used)] // test helpers, not only #[test] fns (STYLE.md)

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use http::header::CONTENT_TYPE;
use kache_tests::{client_from_kubeconfig, cluster, metric, AuditFilter, Kache, TestNamespace};
use kube::client::Body;
use serde_json::{json, Value};

/// Bound on one request (a watch asks for 2 s).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A whole answer.
#[derive(Debug, Clone)]
struct Reply {
    status: u16,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends a request and returns the whole answer, whatever its status.
async fn send(
    client: &kube::Client,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> Reply {
    let mut request = http::Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let request = match body {
        Some(body) => request
            .header(CONTENT_TYPE, "application/json")
            .body(Body::from(serde_json::to_vec(body).unwrap()))
            .unwrap(),
        None => request.body(Body::empty()).unwrap(),
    };
    let response = tokio::time::timeout(REQUEST_TIMEOUT, client.send(request))
        .await
        .unwrap_or_else(|_| panic!("{method} {uri}: no answer within {REQUEST_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("{method} {uri}: {e}"));
    let status = response.status().as_u16();
    let body = tokio::time::timeout(REQUEST_TIMEOUT, response.into_body().collect_bytes())
        .await
        .unwrap_or_else(|_| panic!("{method} {uri}: body incomplete"))
        .unwrap_or_else(|e| panic!("{method} {uri}: reading the body: {e}"))
        .to_vec();
    Reply { status, body }
}

async fn admin() -> kube::Client {
    cluster().admin_client().await
}

/// A write as admin, straight to the API server; must succeed.
async fn admin_write(method: &str, uri: &str, body: Value) -> Value {
    let reply = send(&admin().await, method, uri, &[], Some(&body)).await;
    assert!(
        reply.status < 300,
        "{method} {uri}: {} {}",
        reply.status,
        reply.text()
    );
    reply.json()
}

async fn admin_delete(uri: &str) {
    let reply = send(&admin().await, "DELETE", uri, &[], None).await;
    assert!(
        reply.status < 300 || reply.status == 404,
        "DELETE {uri}: {} {}",
        reply.status,
        reply.text()
    );
}

/// A Role granting `verbs` on configmaps in `ns` (optionally only some names),
/// bound to `subject`.
async fn grant_configmaps(ns: &str, name: &str, verbs: &[&str], names: &[&str], subject: Value) {
    let mut rule = json!({"apiGroups": [""], "resources": ["configmaps"], "verbs": verbs});
    if !names.is_empty() {
        rule["resourceNames"] = json!(names);
    }
    admin_write(
        "POST",
        &format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles"),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
               "metadata": {"name": name}, "rules": [rule]}),
    )
    .await;
    admin_write(
        "POST",
        &format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings"),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": name},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
               "subjects": [subject]}),
    )
    .await;
}

fn user(name: &str) -> Value {
    json!({"kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": name})
}

/// The identities of the matrix: a name, a client of kache and one of the
/// API server with the same credentials.
struct Identity {
    name: &'static str,
    via: kube::Client,
    direct: kube::Client,
}

/// A namespace with two configmaps that alice and a service account may
/// read, bob may not; a second namespace nobody but admin may read.
struct World {
    ns: TestNamespace,
    other: TestNamespace,
    sa_token: String,
}

async fn world(prefix: &str) -> World {
    let ns = TestNamespace::create(prefix);
    let other = TestNamespace::create(&format!("{prefix}-other"));
    for namespace in [ns.name(), other.name()] {
        for cm in ["cm-a", "cm-b"] {
            admin_write(
                "POST",
                &format!("/api/v1/namespaces/{namespace}/configmaps"),
                json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": cm}, "data": {"k": cm}}),
            )
            .await;
        }
    }
    grant_configmaps(
        ns.name(),
        "alice-reads",
        &["get", "list", "watch"],
        &[],
        user("alice"),
    )
    .await;
    admin_write(
        "POST",
        &format!("/api/v1/namespaces/{}/serviceaccounts", ns.name()),
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "robot"}}),
    )
    .await;
    grant_configmaps(
        ns.name(),
        "robot-reads",
        &["list"],
        &[],
        json!({"kind": "ServiceAccount", "name": "robot", "namespace": ns.name()}),
    )
    .await;
    let token = admin_write(
        "POST",
        &format!("/api/v1/namespaces/{}/serviceaccounts/robot/token", ns.name()),
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {}}),
    )
    .await;
    let sa_token = token["status"]["token"].as_str().unwrap().to_string();
    World { ns, other, sa_token }
}

/// The API server directly, with a bearer token (or none).
fn direct_with_token(token: Option<&str>) -> kube::Client {
    let c = cluster();
    let mut config = kube::Config::new(c.apiserver_url.parse().unwrap());
    config.root_cert = c.root_cert();
    config.auth_info.token = token.map(|t| t.to_string().into());
    config.default_retry = false;
    kube::Client::try_from(config).unwrap()
}

async fn identities(kache: &Kache, world: &World, anonymous: bool) -> Vec<Identity> {
    let c = cluster();
    let mut out = vec![
        Identity {
            name: "admin (certificate)",
            via: kache.client_as(&c.admin_kubeconfig).await,
            direct: client_from_kubeconfig(&c.admin_kubeconfig).await,
        },
        Identity {
            name: "admin-token",
            via: kache.client_as(&c.admin_token_kubeconfig).await,
            direct: client_from_kubeconfig(&c.admin_token_kubeconfig).await,
        },
        Identity {
            name: "alice",
            via: kache.client_with_token(Some(&c.alice_token)),
            direct: direct_with_token(Some(&c.alice_token)),
        },
        Identity {
            name: "bob",
            via: kache.client_with_token(Some(&c.bob_token)),
            direct: direct_with_token(Some(&c.bob_token)),
        },
        Identity {
            name: "service account",
            via: kache.client_with_token(Some(&world.sa_token)),
            direct: direct_with_token(Some(&world.sa_token)),
        },
    ];
    if anonymous {
        out.push(Identity {
            name: "anonymous",
            via: kache.client_with_token(None),
            direct: direct_with_token(None),
        });
    }
    out
}

/// One request of the matrix.
struct Ask {
    method: &'static str,
    uri: String,
    body: Option<Value>,
}

fn asks(world: &World) -> Vec<Ask> {
    let (ns, other) = (world.ns.name(), world.other.name());
    let get = |uri: String| Ask {
        method: "GET",
        uri,
        body: None,
    };
    vec![
        get(format!("/api/v1/namespaces/{ns}/configmaps?resourceVersion=0")),
        get(format!("/api/v1/namespaces/{other}/configmaps?resourceVersion=0")),
        get("/api/v1/configmaps?resourceVersion=0".to_string()),
        get(format!(
            "/api/v1/namespaces/{ns}/configmaps/cm-a?resourceVersion=0"
        )),
        get(format!(
            "/api/v1/namespaces/{other}/configmaps/cm-a?resourceVersion=0"
        )),
        get(format!(
            "/api/v1/namespaces/{ns}/configmaps/missing?resourceVersion=0"
        )),
        get(format!(
            "/api/v1/namespaces/{ns}/configmaps?resourceVersion=0&fieldSelector=metadata.name%3Dcm-b"
        )),
        get(format!(
            "/api/v1/namespaces/{ns}/configmaps?watch=1&resourceVersion=0&timeoutSeconds=2"
        )),
        get(format!(
            "/api/v1/namespaces/{other}/configmaps?watch=1&resourceVersion=0&timeoutSeconds=2"
        )),
        get(format!("/api/v1/namespaces/{ns}/configmaps")),
        get("/api/v1/configmaps?limit=500".to_string()),
        Ask {
            method: "POST",
            uri: format!("/api/v1/namespaces/{ns}/configmaps?dryRun=All"),
            body: Some(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "new"}})),
        },
        get("/api".to_string()),
        get("/apis".to_string()),
        get("/apis/apps/v1".to_string()),
        get("/api/v1".to_string()),
        get("/version".to_string()),
        get("/openapi/v2".to_string()),
    ]
}

/// What of an answer must be equal: the status, the `Status` body of a
/// failure, the set of items of a list, the objects of a watch, the object
/// of a GET (rv=0 lists come in arbitrary order on v1.20: sets).
fn essence(ask: &Ask, reply: &Reply) -> Value {
    if reply.status >= 400 || ask.uri.starts_with("/version") || !ask.uri.starts_with("/api") {
        return json!({"status": reply.status, "body": reply.json()});
    }
    if ask.uri.contains("watch=1") {
        let names: BTreeSet<String> = reply
            .text()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let event: Value = serde_json::from_str(l).unwrap();
                let object = &event["object"]["metadata"];
                format!("{} {}/{}", event["type"], object["namespace"], object["name"])
            })
            .collect();
        return json!({"status": reply.status, "events": names});
    }
    let value = reply.json();
    if ask.method == "POST" {
        return json!({"status": reply.status, "name": value["metadata"]["name"]});
    }
    match value["items"].as_array() {
        Some(items) => {
            let names: BTreeSet<String> = items
                .iter()
                .map(|i| format!("{}/{}", i["metadata"]["namespace"], i["metadata"]["name"]))
                .collect();
            json!({"status": reply.status, "kind": value["kind"], "items": names})
        }
        None if ask.uri.starts_with("/api/v1/namespaces")
            || ask.uri.starts_with("/apis/") && ask.uri.contains("/namespaces/") =>
        {
            json!({"status": reply.status, "object": value})
        }
        None => json!({"status": reply.status, "body": value}),
    }
}

/// Asks every identity every question, of kache and of the API server.
async fn assert_matrix(kache: &Kache, world: &World, anonymous: bool) {
    let identities = identities(kache, world, anonymous).await;
    let asks = asks(world);
    let mut mismatches = Vec::new();
    let mut answered = 0;
    for identity in &identities {
        let checks = asks.iter().map(|ask| async move {
            let (via, direct) = tokio::join!(
                send(&identity.via, ask.method, &ask.uri, &[], ask.body.as_ref()),
                send(&identity.direct, ask.method, &ask.uri, &[], ask.body.as_ref()),
            );
            (ask, via, direct)
        });
        for (ask, via, direct) in futures::future::join_all(checks).await {
            answered += 1;
            let (v, d) = (essence(ask, &via), essence(ask, &direct));
            if v != d {
                mismatches.push(format!(
                    "{} {} {}:\n  kache:  {v}\n  direct: {d}",
                    identity.name, ask.method, ask.uri
                ));
            }
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {answered} answers differ:\n{}\n--- kache stderr ---\n{}",
        mismatches.len(),
        mismatches.join("\n"),
        kache.stderr()
    );
}

/// The matrix must not be vacuous: the granted users really were answered
/// from memory, and the denied ones really were denied by kache.
fn assert_memory_was_used(kache: &Kache) {
    let metrics = kache.metrics();
    let decisions = |result| {
        metric(
            &metrics,
            "kache_authorization_decisions_total",
            &[("result", result)],
        )
    };
    assert!(
        metric(&metrics, "kache_cache_hits_total", &[]) > 0.0,
        "no cache hit:\n{metrics}"
    );
    assert!(decisions("denied") > 0.0, "no denial by kache:\n{metrics}");
    assert!(decisions("allowed") > 0.0, "nothing allowed by kache:\n{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_user_gets_through_shared_kache_what_the_api_server_gives_it_rbac_and_impersonation() {
    let world = world("shared-rbac").await;
    let kache = Kache::start_shared(&cluster().admin_kubeconfig, &["--allow-anonymous"]);
    assert_matrix(&kache, &world, true).await;
    assert_memory_was_used(&kache);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_user_gets_through_shared_kache_what_the_api_server_gives_it_sar_and_passthrough() {
    let world = world("shared-sar").await;
    let kache = Kache::start_shared(
        &cluster().admin_kubeconfig,
        &[
            "--allow-anonymous",
            "--authorization",
            "sar",
            "--forward",
            "passthrough",
        ],
    );
    assert_matrix(&kache, &world, true).await;
    assert_memory_was_used(&kache);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_credentials_are_401_unless_anonymous_is_allowed() {
    let kache = Kache::start_shared(&cluster().admin_kubeconfig, &[]);
    let anonymous = kache.client_with_token(None);
    for uri in [
        "/api",
        "/version",
        "/api/v1/namespaces/default/configmaps?resourceVersion=0",
    ] {
        let reply = send(&anonymous, "GET", uri, &[], None).await;
        assert_eq!(reply.status, 401, "{uri}: {}", reply.text());
        assert_eq!(
            reply.json(),
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                   "message": "Unauthorized", "reason": "Unauthorized", "code": 401})
        );
    }
    // An invalid token is 401 too, and the same as the API server's.
    let invalid = "not-a-valid-token";
    let via = send(&kache.client_with_token(Some(invalid)), "GET", "/api", &[], None).await;
    let direct = send(&direct_with_token(Some(invalid)), "GET", "/api", &[], None).await;
    assert_eq!((via.status, via.json()), (direct.status, direct.json()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_mode_never_answers_impersonating_reads_from_memory() {
    let world = world("local-as").await;
    let kache = Kache::start(&cluster().admin_kubeconfig);
    let via = kache.client();
    let direct = admin().await;
    let list = format!(
        "/api/v1/namespaces/{}/configmaps?resourceVersion=0",
        world.ns.name()
    );
    let watch = format!(
        "/api/v1/namespaces/{}/configmaps?watch=1&resourceVersion=0&timeoutSeconds=2",
        world.other.name()
    );
    // Warm the cache with kache's own (admin) view, so a leak would show.
    assert_eq!(send(&via, "GET", &list, &[], None).await.status, 200);
    for uri in [&list, &watch] {
        for headers in [
            &[("Impersonate-User", "bob")][..],
            &[("Impersonate-User", "alice"), ("Impersonate-Group", "devs")][..],
        ] {
            let v = send(&via, "GET", uri, headers, None).await;
            let d = send(&direct, "GET", uri, headers, None).await;
            let ask = Ask {
                method: "GET",
                uri: uri.clone(),
                body: None,
            };
            assert_eq!(essence(&ask, &v), essence(&ask, &d), "{uri} {headers:?}");
        }
    }
    // bob is refused both; alice reads her namespace (granted by a Role).
    let bob = send(&via, "GET", &list, &[("Impersonate-User", "bob")], None).await;
    assert_eq!(bob.status, 403, "{}", bob.text());
    let alice = send(&via, "GET", &list, &[("Impersonate-User", "alice")], None).await;
    assert_eq!(alice.status, 200, "{}", alice.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_mode_honours_a_clients_impersonation_only_where_the_api_server_would() {
    let world = world("shared-as").await;
    let c = cluster();
    for forward in ["impersonate", "passthrough"] {
        let kache = Kache::start_shared(&c.admin_kubeconfig, &["--forward", forward]);
        let list = format!(
            "/api/v1/namespaces/{}/configmaps?resourceVersion=0",
            world.ns.name()
        );
        let ask = Ask {
            method: "GET",
            uri: list.clone(),
            body: None,
        };
        let sa = format!("system:serviceaccount:{}:robot", world.ns.name());
        let cases = [
            Case {
                name: "alice as bob",
                via: kache.client_with_token(Some(&c.alice_token)),
                direct: direct_with_token(Some(&c.alice_token)),
                as_user: "bob",
            },
            Case {
                name: "admin-token as alice",
                via: kache.client_as(&c.admin_token_kubeconfig).await,
                direct: client_from_kubeconfig(&c.admin_token_kubeconfig).await,
                as_user: "alice",
            },
            Case {
                name: "admin-token as bob",
                via: kache.client_as(&c.admin_token_kubeconfig).await,
                direct: client_from_kubeconfig(&c.admin_token_kubeconfig).await,
                as_user: "bob",
            },
            Case {
                name: "admin as the service account",
                via: kache.client_as(&c.admin_kubeconfig).await,
                direct: client_from_kubeconfig(&c.admin_kubeconfig).await,
                as_user: &sa,
            },
        ];
        for Case {
            name,
            via,
            direct,
            as_user,
        } in cases
        {
            let headers = [("Impersonate-User", as_user)];
            for uri in [list.clone(), format!("{list}&watch=1&timeoutSeconds=1")] {
                let ask = Ask {
                    uri,
                    ..ask_clone(&ask)
                };
                let v = send(&via, "GET", &ask.uri, &headers, None).await;
                let d = send(&direct, "GET", &ask.uri, &headers, None).await;
                assert_eq!(
                    essence(&ask, &v),
                    essence(&ask, &d),
                    "{forward}: {name} {}\n{}",
                    ask.uri,
                    kache.stderr()
                );
            }
        }
    }
}

/// A client impersonating `as_user`, through kache and directly.
struct Case<'a> {
    name: &'static str,
    via: kube::Client,
    direct: kube::Client,
    as_user: &'a str,
}

fn ask_clone(ask: &Ask) -> Ask {
    Ask {
        method: ask.method,
        uri: ask.uri.clone(),
        body: ask.body.clone(),
    }
}

/// Polls kache until `done` says its answer changed; returns how long it took.
async fn time_until(
    client: &kube::Client,
    uri: &str,
    timeout: Duration,
    done: impl Fn(&Reply) -> bool,
) -> Duration {
    let started = Instant::now();
    loop {
        let reply = send(client, "GET", uri, &[], None).await;
        if done(&reply) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < timeout,
            "still {} after {timeout:?}: {}",
            reply.status,
            reply.text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_binding_denies_reads_from_memory_once_kache_has_seen_it() {
    let c = cluster();
    // sar mode: decisions are reused for 2 s here; the delete must show within that.
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(config.path(), "shared: {authorizationCacheTtlSeconds: 2}\n").unwrap();
    let config = config.path().to_str().unwrap();
    for (mode, bound) in [
        ("rbac", Duration::from_secs(30)),
        ("sar", Duration::from_secs(2 + 5)),
    ] {
        let world = world(&format!("revoke-{mode}")).await;
        let kache = Kache::start_shared(
            &c.admin_kubeconfig,
            &["--authorization", mode, "--config", config],
        );
        let alice = kache.client_with_token(Some(&c.alice_token));
        let list = format!(
            "/api/v1/namespaces/{}/configmaps?resourceVersion=0",
            world.ns.name()
        );
        let first = send(&alice, "GET", &list, &[], None).await;
        assert_eq!(first.status, 200, "{}", first.text());
        admin_delete(&format!(
            "/apis/rbac.authorization.k8s.io/v1/namespaces/{}/rolebindings/alice-reads",
            world.ns.name()
        ))
        .await;
        let delay = time_until(&alice, &list, bound, |r| r.status == 403).await;
        eprintln!("{mode}: alice's reads from memory denied {delay:?} after her RoleBinding was deleted");
        let direct = send(&direct_with_token(Some(&c.alice_token)), "GET", &list, &[], None).await;
        let via = send(&alice, "GET", &list, &[], None).await;
        assert_eq!((via.status, via.json()), (direct.status, direct.json()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_requests_by_one_token_make_a_bounded_number_of_reviews() {
    let c = cluster();
    let world = world("reviews").await;
    // kache's upstream identity here is the admin-token user, so its reviews
    // can be told apart from other tests' in the audit log.
    let kache = Kache::start_shared(&c.admin_token_kubeconfig, &[]);
    let alice = kache.client_with_token(Some(&c.alice_token));
    let bob = kache.client_with_token(Some(&c.bob_token));
    let list = format!(
        "/api/v1/namespaces/{}/configmaps?resourceVersion=0",
        world.ns.name()
    );
    let audit = c.audit();
    let mark = audit.mark();
    let started = Instant::now();
    for round in 0..10 {
        let batch = (0..100).map(|i| {
            let client = if i % 10 == 0 { &bob } else { &alice };
            let list = &list;
            async move { send(client, "GET", list, &[], None).await.status }
        });
        let statuses = futures::future::join_all(batch).await;
        for (i, status) in statuses.iter().enumerate() {
            let want = if i % 10 == 0 { 403 } else { 200 };
            assert_eq!(*status, want, "request {i} of round {round}");
        }
    }
    // An invalid token is refused every time, never answered from a cache.
    let invalid = kache.client_with_token(Some("invalid-token"));
    for _ in 0..5 {
        assert_eq!(send(&invalid, "GET", &list, &[], None).await.status, 401);
    }
    // A sentinel request's audit line proves every earlier line is written.
    let sentinel = format!(
        "/api/v1/namespaces/{}/configmaps/sentinel-{}",
        world.ns.name(),
        std::process::id()
    );
    send(&admin().await, "GET", &sentinel, &[], None).await;
    let marker = AuditFilter::new().uri(&sentinel);
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    while mark.matching(&marker).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the sentinel never reached the audit log"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let by_kache = AuditFilter::new().user("admin-token");
    let events = mark.matching(&by_kache);
    let token_reviews = events
        .iter()
        .filter(|e| e.request_uri.contains("/tokenreviews"))
        .count();
    let access_reviews = events
        .iter()
        .filter(|e| e.request_uri.contains("/subjectaccessreviews"))
        .count();
    let lists = mark
        .matching(&AuditFilter::new().uri_prefix(&list))
        .into_iter()
        .filter(|e| e.username != "system:apiserver")
        .count();
    let elapsed = started.elapsed();
    eprintln!(
        "1,005 requests in {elapsed:?}: {token_reviews} TokenReviews, {access_reviews} SubjectAccessReviews, \
         {lists} lists upstream"
    );
    // alice's and bob's tokens once each, the invalid one once (its
    // rejection is remembered for 10 s); bob's denial confirmed once per
    // 10 s decision TTL; alice is allowed by local RBAC, without a review.
    let ttls = 1 + elapsed.as_secs() as usize / 10;
    assert!(token_reviews <= 2 + ttls, "{token_reviews} TokenReviews");
    assert!(access_reviews <= ttls, "{access_reviews} SubjectAccessReviews");
    assert!(lists <= 1, "{lists} LISTs reached the API server");
}

/// `kache_flowcontrol_dispatched_requests_total` of one class, 0 if absent.
fn dispatched(kache: &Kache, class: &str) -> f64 {
    metric(
        &kache.metrics(),
        "kache_flowcontrol_dispatched_requests_total",
        &[("class", class)],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limits_users_rule_matches_the_authenticated_or_impersonated_user() {
    let c = cluster();
    let world = world("limits-user").await;
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        config.path(),
        "limits: {classes: [{name: alices, match: {users: [alice]}, seats: 10}]}\n",
    )
    .unwrap();
    let config = config.path().to_str().unwrap();
    // A consistent LIST is forwarded, so it passes the limits.
    let list = format!("/api/v1/namespaces/{}/configmaps", world.ns.name());

    let shared = Kache::start_shared(&c.admin_kubeconfig, &["--config", config]);
    let bob = send(
        &shared.client_with_token(Some(&c.bob_token)),
        "GET",
        &list,
        &[],
        None,
    )
    .await;
    assert_eq!(bob.status, 403, "{}", bob.text());
    assert_eq!(dispatched(&shared, "alices"), 0.0, "bob is not alice");
    let alice = send(
        &shared.client_with_token(Some(&c.alice_token)),
        "GET",
        &list,
        &[],
        None,
    )
    .await;
    assert_eq!(alice.status, 200, "{}", alice.text());
    assert_eq!(
        dispatched(&shared, "alices"),
        1.0,
        "alice's request in alice's class"
    );

    let local = Kache::start_with_args(&c.admin_kubeconfig, &["--config", config]);
    let plain = send(&local.client(), "GET", &list, &[], None).await;
    assert_eq!(plain.status, 200, "{}", plain.text());
    assert_eq!(
        dispatched(&local, "alices"),
        0.0,
        "kache's own identity is not alice"
    );
    let as_alice = send(
        &local.client(),
        "GET",
        &list,
        &[("Impersonate-User", "alice")],
        None,
    )
    .await;
    assert_eq!(as_alice.status, 200, "{}", as_alice.text());
    assert_eq!(
        dispatched(&local, "alices"),
        1.0,
        "a request impersonating alice is alice's"
    );
}

/// A small deterministic generator (xorshift64*), seeded per run and printed,
/// so a failing leak hunt can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

const HUNT_RESOURCES: &[&str] = &["configmaps", "secrets", "serviceaccounts"];
const HUNT_VERBS: &[&str] = &["get", "list", "watch"];

/// Keeps the items and events of the hunt's own namespaces: a cluster-wide
/// answer also holds other tests' objects, which change between the two asks.
fn only_namespaces(mut essence: Value, namespaces: &[TestNamespace]) -> Value {
    for key in ["items", "events"] {
        if let Some(list) = essence[key].as_array_mut() {
            list.retain(|entry| {
                let entry = entry.as_str().unwrap_or_default();
                namespaces
                    .iter()
                    .any(|ns| entry.contains(&format!("\"{}\"/", ns.name())))
            });
        }
    }
    essence
}

/// Cluster-scoped RBAC objects of the hunt, deleted however the test ends.
struct ClusterRbac(Vec<String>);

impl Drop for ClusterRbac {
    fn drop(&mut self) {
        for uri in &self.0 {
            let _ = kache_tests::kubectl(&cluster().admin_kubeconfig, &["delete", "--raw", uri.as_str()]);
        }
    }
}

/// A random Role (or ClusterRole reference) for `user` in `ns`: some verbs
/// on some of the hunt's resources, sometimes only some names.
async fn random_grant(rng: &mut Rng, id: &str, ns: &str, user_name: &str, subject: &Value) {
    // At least one of each: the API server refuses a rule without.
    let mut resources: Vec<&str> = HUNT_RESOURCES
        .iter()
        .copied()
        .filter(|_| rng.chance(60))
        .collect();
    if resources.is_empty() {
        resources.push(*rng.pick(HUNT_RESOURCES));
    }
    let mut verbs: Vec<&str> = HUNT_VERBS.iter().copied().filter(|_| rng.chance(60)).collect();
    if verbs.is_empty() {
        verbs.push(*rng.pick(HUNT_VERBS));
    }
    let mut rule = json!({"apiGroups": [""], "resources": resources, "verbs": verbs});
    if rng.chance(25) {
        rule["resourceNames"] = json!([format!("c-{}", rng.below(4)), format!("s-{}", rng.below(2))]);
    }
    let name = format!("{id}-{user_name}");
    let role_uri = format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles");
    let binding_uri = format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings");
    admin_delete(&format!("{role_uri}/{name}")).await;
    admin_delete(&format!("{binding_uri}/{name}")).await;
    if rng.chance(30) {
        return; // revoked
    }
    // Sometimes the binding names a ClusterRole instead of the Role.
    let role_ref = if rng.chance(20) {
        json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": format!("{id}-cluster")})
    } else {
        admin_write(
            "POST",
            &role_uri,
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                   "metadata": {"name": name}, "rules": [rule]}),
        )
        .await;
        json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name})
    };
    admin_write(
        "POST",
        &binding_uri,
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": name}, "roleRef": role_ref, "subjects": [subject]}),
    )
    .await;
}

/// Waits until kache (as `token`) and the API server both see the phase's
/// markers: a Role + RoleBinding and a ClusterRole + ClusterRoleBinding
/// created after every other change of the phase. Each RBAC kind is watched
/// in order, so once a marker grant works, every earlier change of its kinds
/// has been seen.
async fn settle(
    kache: &Kache,
    (token, subject): (&str, &Value),
    id: &str,
    ns: &str,
    phase: usize,
    cleanup: &mut ClusterRbac,
) {
    let marker = format!("{id}-marker-{phase}");
    grant_configmaps(ns, &marker, &["get"], &[&marker], subject.clone()).await;
    let cluster_marker = format!("{marker}-c");
    admin_write(
        "POST",
        "/apis/rbac.authorization.k8s.io/v1/clusterroles",
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
               "metadata": {"name": cluster_marker},
               "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"],
                          "resourceNames": [cluster_marker]}]}),
    )
    .await;
    admin_write(
        "POST",
        "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
               "metadata": {"name": cluster_marker},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_marker},
               "subjects": [subject]}),
    )
    .await;
    for kind in ["clusterroles", "clusterrolebindings"] {
        cleanup.0.push(format!(
            "/apis/rbac.authorization.k8s.io/v1/{kind}/{cluster_marker}"
        ));
    }
    let via = kache.client_with_token(Some(token));
    let direct = direct_with_token(Some(token));
    for name in [&marker, &cluster_marker] {
        let uri = format!("/api/v1/namespaces/{ns}/configmaps/{name}?resourceVersion=0");
        for client in [&via, &direct] {
            time_until(client, &uri, Duration::from_secs(30), |r| r.status == 404).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leak_hunt_finds_no_answer_the_api_server_would_refuse() {
    let c = cluster();
    let seed = std::env::var("KACHE_LEAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("leak hunt seed: KACHE_LEAK_SEED={seed}");
    let mut rng = Rng(seed);
    let namespaces: Vec<TestNamespace> = (0..3)
        .map(|i| TestNamespace::create(&format!("leak{i}")))
        .collect();
    let id = format!("leak-{}", &namespaces[0].name()[5..]);
    let mut cleanup = ClusterRbac(Vec::new());
    for ns in &namespaces {
        let ns = ns.name();
        for i in 0..4 {
            let tier = ["a", "b"][i % 2];
            admin_write(
                "POST",
                &format!("/api/v1/namespaces/{ns}/configmaps"),
                json!({"apiVersion": "v1", "kind": "ConfigMap",
                       "metadata": {"name": format!("c-{i}"), "labels": {"tier": tier}}}),
            )
            .await;
        }
        for i in 0..2 {
            admin_write(
                "POST",
                &format!("/api/v1/namespaces/{ns}/secrets"),
                json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": format!("s-{i}")},
                       "stringData": {"password": format!("hunter{i}")}}),
            )
            .await;
            admin_write(
                "POST",
                &format!("/api/v1/namespaces/{ns}/serviceaccounts"),
                json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": format!("sa-{i}")}}),
            )
            .await;
        }
    }
    // A ClusterRole some RoleBindings point at, and (sometimes) a cluster-wide grant.
    let cluster_role = format!("{id}-cluster");
    admin_write(
        "POST",
        "/apis/rbac.authorization.k8s.io/v1/clusterroles",
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
               "metadata": {"name": cluster_role},
               "rules": [{"apiGroups": [""], "resources": ["configmaps", "secrets"], "verbs": ["get", "list", "watch"]}]}),
    )
    .await;
    cleanup.0.push(format!(
        "/apis/rbac.authorization.k8s.io/v1/clusterroles/{cluster_role}"
    ));
    cleanup.0.push(format!(
        "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/{cluster_role}"
    ));

    let kache = Kache::start_shared(&c.admin_kubeconfig, &[]);
    // The hunters are service accounts of the hunt's own, so that its grants
    // (cluster-wide ones too) touch no other test's users.
    let home = namespaces[0].name();
    let mut users = Vec::new();
    for name in ["hunter-a", "hunter-b"] {
        admin_write(
            "POST",
            &format!("/api/v1/namespaces/{home}/serviceaccounts"),
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}}),
        )
        .await;
        let token = admin_write(
            "POST",
            &format!("/api/v1/namespaces/{home}/serviceaccounts/{name}/token"),
            json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {}}),
        )
        .await;
        let token = token["status"]["token"].as_str().unwrap().to_string();
        let subject = json!({"kind": "ServiceAccount", "name": name, "namespace": home});
        users.push((name, token, subject));
    }
    let clients: Vec<(&str, kube::Client, kube::Client)> = users
        .iter()
        .map(|(name, token, _)| {
            (
                *name,
                kache.client_with_token(Some(token)),
                direct_with_token(Some(token)),
            )
        })
        .collect();

    const PHASES: usize = 10;
    const PER_PHASE: usize = 200;
    let (mut answered, mut allowed, mut leaks) = (0, 0, Vec::new());
    for phase in 0..PHASES {
        // Change the RBAC objects: each user's grant in each namespace is
        // redrawn (or revoked), and the cluster-wide grant comes and goes.
        for ns in &namespaces {
            for (user_name, _, subject) in &users {
                if rng.chance(50) {
                    random_grant(&mut rng, &id, ns.name(), user_name, subject).await;
                }
            }
        }
        let binding = format!("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/{cluster_role}");
        admin_delete(&binding).await;
        if rng.chance(30) {
            admin_write(
                "POST",
                "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
                json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                       "metadata": {"name": cluster_role},
                       "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_role},
                       "subjects": [users[rng.below(2)].2]}),
            )
            .await;
        }
        settle(
            &kache,
            (&users[0].1, &users[0].2),
            &id,
            namespaces[0].name(),
            phase,
            &mut cleanup,
        )
        .await;

        // Random reads, asked of kache and of the API server.
        let asks: Vec<(usize, Ask)> = (0..PER_PHASE)
            .map(|_| {
                let who = rng.below(2);
                let resource = *rng.pick(HUNT_RESOURCES);
                let ns = rng.pick(&namespaces).name().to_string();
                let base = if rng.chance(20) {
                    format!("/api/v1/{resource}")
                } else {
                    format!("/api/v1/namespaces/{ns}/{resource}")
                };
                let rv = if rng.chance(80) { "resourceVersion=0" } else { "" };
                let prefix = &resource[..1];
                let name = format!("{prefix}-{}", rng.below(3));
                let name = if resource == "serviceaccounts" {
                    format!("sa-{}", rng.below(3))
                } else {
                    name
                };
                let uri = match rng.below(20) {
                    0 => format!("{base}?watch=1&resourceVersion=0&timeoutSeconds=1"),
                    1 | 2 => format!("{base}?{rv}&fieldSelector=metadata.name%3D{name}"),
                    3 => format!("{base}?{rv}&labelSelector=tier%3Da"),
                    4..=9 if !base.starts_with("/api/v1/namespaces/") => format!("{base}?{rv}"),
                    4..=9 => format!("{base}/{name}?{rv}"),
                    _ => format!("{base}?{rv}"),
                };
                (
                    who,
                    Ask {
                        method: "GET",
                        uri,
                        body: None,
                    },
                )
            })
            .collect();
        for chunk in asks.chunks(8) {
            let results = futures::future::join_all(chunk.iter().map(|(who, ask)| {
                let (_, via, direct) = &clients[*who];
                async move {
                    let v = send(via, "GET", &ask.uri, &[], None).await;
                    let d = send(direct, "GET", &ask.uri, &[], None).await;
                    (v, d)
                }
            }))
            .await;
            for ((who, ask), (v, d)) in chunk.iter().zip(results) {
                answered += 1;
                if v.status < 300 {
                    allowed += 1;
                }
                let (ev, ed) = (
                    only_namespaces(essence(ask, &v), &namespaces),
                    only_namespaces(essence(ask, &d), &namespaces),
                );
                if ev != ed {
                    leaks.push(format!(
                        "phase {phase}, {} GET {}:\n  kache:  {ev}\n  direct: {ed}",
                        clients[*who].0, ask.uri
                    ));
                }
            }
        }
    }
    eprintln!(
        "leak hunt: {answered} requests over {PHASES} RBAC phases, {allowed} allowed, {} differences",
        leaks.len()
    );
    assert!(
        leaks.is_empty(),
        "seed {seed}: {} of {answered} answers differ from the API server's:\n{}",
        leaks.len(),
        leaks.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
    // Not vacuous: both allowed and refused answers were compared.
    assert!(
        allowed > answered / 20 && allowed < answered - answered / 20,
        "{allowed} of {answered} allowed"
    );
    drop(cleanup);
}

/// A kubeconfig for the test API server whose user is a client certificate
/// for `subject`, signed by the cluster's CA (as `tests/cluster/up.sh` signs admin's).
fn certificate_kubeconfig(dir: &Path, name: &str, subject: &str) -> std::path::PathBuf {
    let c = cluster();
    let pki = c.dir.join("pki");
    let key = dir.join(format!("{name}.key"));
    let csr = dir.join(format!("{name}.csr"));
    let crt = dir.join(format!("{name}.crt"));
    let ext = dir.join(format!("{name}.ext"));
    std::fs::write(
        &ext,
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n",
    )
    .unwrap();
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let p = |p: &Path| p.to_str().unwrap().to_string();
    openssl(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        &p(&key),
    ]);
    openssl(&[
        "req",
        "-new",
        "-key",
        &p(&key),
        "-subj",
        subject,
        "-out",
        &p(&csr),
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        &p(&csr),
        "-CA",
        &p(&pki.join("ca.crt")),
        "-CAkey",
        &p(&pki.join("ca.key")),
        "-CAcreateserial",
        "-CAserial",
        &p(&dir.join("ca.srl")),
        "-days",
        "1",
        "-sha256",
        "-extfile",
        &p(&ext),
        "-out",
        &p(&crt),
    ]);
    let b64 = |path: &Path| {
        let out = std::process::Command::new("base64")
            .arg("-w0")
            .arg(path)
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    let kubeconfig = dir.join(format!("{name}.kubeconfig"));
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: '{}', certificate-authority-data: {}}}}}]\n\
             users: [{{name: u, user: {{client-certificate-data: {}, client-key-data: {}}}}}]\n\
             contexts: [{{name: x, context: {{cluster: c, user: u}}}}]\ncurrent-context: x\n",
            c.apiserver_url,
            b64(&c.ca_cert),
            b64(&crt),
            b64(&key)
        ),
    )
    .unwrap();
    kubeconfig
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_is_its_cn_in_its_o_groups_in_both_forward_modes() {
    let world = world("cert").await;
    let dir = tempfile::tempdir().unwrap();
    let group = format!("devs-{}", world.ns.name());
    let kubeconfig = certificate_kubeconfig(dir.path(), "carol", &format!("/CN=carol/O={group}/O=other"));
    grant_configmaps(
        world.ns.name(),
        "devs-read",
        &["get", "list", "watch"],
        &[],
        json!({"kind": "Group", "apiGroup": "rbac.authorization.k8s.io", "name": group}),
    )
    .await;
    let direct = client_from_kubeconfig(&kubeconfig).await;
    for forward in ["impersonate", "passthrough"] {
        let kache = Kache::start_shared(&cluster().admin_kubeconfig, &["--forward", forward]);
        let via = kache.client_as(&kubeconfig).await;
        for uri in [
            format!(
                "/api/v1/namespaces/{}/configmaps?resourceVersion=0",
                world.ns.name()
            ),
            format!(
                "/api/v1/namespaces/{}/configmaps/cm-a?resourceVersion=0",
                world.ns.name()
            ),
            format!(
                "/api/v1/namespaces/{}/configmaps?resourceVersion=0",
                world.other.name()
            ),
            format!("/api/v1/namespaces/{}/configmaps", world.ns.name()),
            format!("/api/v1/namespaces/{}/configmaps", world.other.name()),
            "/api".to_string(),
        ] {
            let ask = Ask {
                method: "GET",
                uri,
                body: None,
            };
            let v = send(&via, "GET", &ask.uri, &[], None).await;
            let d = send(&direct, "GET", &ask.uri, &[], None).await;
            assert_eq!(essence(&ask, &v), essence(&ask, &d), "{forward}: {}", ask.uri);
        }
        // The granted read really came from memory, the other one was denied by kache.
        assert_memory_was_used(&kache);
        assert!(kache.stderr().contains("user=\"carol\""), "{}", kache.stderr());
    }
}
