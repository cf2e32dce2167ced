//! The cost ledger against the real API server: what `/debug/clients` says
//! each client cost the API server equals what the API server's audit log
//! saw from that client (kache forwards the client's `User-Agent`, which the
//! audit log records), and what it says kache sent equals what the clients
//! received.

#![allow(clippy::unwrap_used)] // test helpers, not only #[test] fns (STYLE.md)

use std::collections::BTreeMap;

use kache_tests::{cluster, http_get, metric, unique_name, Kache, TestNamespace};
use serde_json::Value;

/// What one client received: requests answered, body bytes.
#[derive(Debug, Default)]
struct Received {
    requests: u64,
    bytes: u64,
}

async fn get(
    kache: &Kache,
    agent: &str,
    path: &str,
    received: &mut Received,
) -> http::Response<bytes::Bytes> {
    let response = http_get(
        &format!("{}{path}", kache.url()),
        &[("user-agent", agent), ("accept", "application/json")],
    )
    .await;
    received.requests += 1;
    received.bytes += response.body().len() as u64;
    response
}

async fn clients(kache: &Kache) -> Value {
    let response = http_get(
        &format!("http://{}/debug/clients?limit=100", kache.admin_addr()),
        &[],
    )
    .await;
    assert_eq!(response.status(), 200);
    serde_json::from_slice(response.body()).unwrap()
}

fn row<'a>(view: &'a Value, client: &str) -> &'a Value {
    view["clients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["client"] == client)
        .unwrap_or_else(|| panic!("no row for {client:?} in {view:#}"))
}

fn by_outcome(row: &Value) -> BTreeMap<String, u64> {
    row["requests"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
        .filter(|(_, n)| *n > 0)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_charges_each_client_what_the_audit_log_saw_from_it() {
    let c = cluster();
    let ns = TestNamespace::create("ledger");
    for i in 0..3 {
        kache_tests::kubectl(
            &c.admin_kubeconfig,
            &[
                "-n",
                ns.name(),
                "create",
                "configmap",
                &format!("cm-{i}"),
                "--from-literal=k=v",
            ],
        )
        .ok();
    }
    let kache = Kache::start(&c.admin_kubeconfig);
    let audit = c.audit();
    let (reader, writer) = (unique_name("ledger-reader"), unique_name("ledger-writer"));
    let list = format!("/api/v1/namespaces/{ns}/configmaps?resourceVersion=0");

    // The reader's rv=0 lists and GETs are answered from memory once kache
    // has the configmaps (the first may be forwarded while it syncs).
    let mut from_reader = Received::default();
    let mut warm = false;
    for _ in 0..100 {
        let response = get(&kache, &reader, &list, &mut from_reader).await;
        assert_eq!(response.status(), 200);
        let text = kache.metrics();
        if metric(&text, "kache_cache_hits_total", &[("resource", "v1/configmaps")]) > 0.0 {
            warm = true;
            break;
        }
    }
    assert!(warm, "kache never answered a configmap list from memory");
    let mark = audit.mark();
    let before = clients(&kache).await;
    let before = row(&before, &format!("127.0.0.1 {reader}")).clone();
    let mut received = Received::default();
    for _ in 0..10 {
        let response = get(&kache, &reader, &list, &mut received).await;
        assert_eq!(response.status(), 200);
    }
    for i in 0..2 {
        let path = format!("/api/v1/namespaces/{ns}/configmaps/cm-{i}?resourceVersion=0");
        assert_eq!(get(&kache, &reader, &path, &mut received).await.status(), 200);
    }
    // A watch from memory, from `0`: the three configmaps, then its end at
    // its timeout.
    let watch = format!("/api/v1/namespaces/{ns}/configmaps?watch=true&resourceVersion=0&timeoutSeconds=1");
    let response = get(&kache, &reader, &watch, &mut received).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.body().iter().filter(|b| **b == b'\n').count(),
        3,
        "{response:?}"
    );
    // Consistent reads: forwarded.
    for _ in 0..3 {
        let path = format!("/api/v1/namespaces/{ns}/configmaps");
        assert_eq!(get(&kache, &reader, &path, &mut received).await.status(), 200);
    }
    // Another client: only consistent GETs, one of a missing object.
    let mut from_writer = Received::default();
    for i in 0..4 {
        let path = format!("/api/v1/namespaces/{ns}/configmaps/cm-{i}");
        let response = get(&kache, &writer, &path, &mut from_writer).await;
        assert_eq!(response.status(), if i < 3 { 200 } else { 404 });
    }

    let events = mark.events_after_sentinel();
    let seen_upstream = |agent: &str| events.iter().filter(|e| e.user_agent == agent).count() as u64;
    let (reader_upstream, writer_upstream) = (seen_upstream(&reader), seen_upstream(&writer));
    assert_eq!(
        reader_upstream, 3,
        "only the consistent lists reached the API server"
    );
    assert_eq!(writer_upstream, 4);

    let view = clients(&kache).await;
    let reader_row = row(&view, &format!("127.0.0.1 {reader}"));
    let writer_row = row(&view, &format!("127.0.0.1 {writer}"));
    let delta = |field: &str| reader_row[field].as_u64().unwrap() - before[field].as_u64().unwrap();
    assert_eq!(delta("upstreamRequests"), reader_upstream, "{view:#}");
    assert_eq!(writer_row["upstreamRequests"].as_u64().unwrap(), writer_upstream);
    let mut outcomes = by_outcome(reader_row);
    for (outcome, n) in by_outcome(&before) {
        *outcomes.get_mut(&outcome).unwrap() -= n;
    }
    outcomes.retain(|_, n| *n > 0);
    assert_eq!(
        outcomes,
        BTreeMap::from([("cache".to_string(), 13), ("forwarded".to_string(), 3)]),
        "{view:#}"
    );
    assert_eq!(
        by_outcome(writer_row),
        BTreeMap::from([("forwarded".to_string(), 4)])
    );
    // Every body byte the clients received, and the objects kache rendered
    // itself: 10 lists of 3 configmaps, 2 GETs and a watch's 3 events.
    assert_eq!(delta("bytesSent"), received.bytes, "{view:#}");
    assert_eq!(writer_row["bytesSent"].as_u64().unwrap(), from_writer.bytes);
    assert_eq!(delta("objectsSent"), 10 * 3 + 2 + 3);
    assert_eq!(
        writer_row["objectsSent"], 0,
        "kache renders none of a forwarded answer"
    );
    // What the API server answered the writer went through kache whole.
    assert_eq!(writer_row["upstreamBytes"].as_u64().unwrap(), from_writer.bytes);
    assert!(writer_row["upstreamSeatSeconds"].as_f64().unwrap() > 0.0);
    assert_eq!(writer_row["throttled"], 0);
    // The API server's costliest client comes first.
    let first = view["clients"][0]["upstreamSeatSeconds"].as_f64().unwrap();
    assert!(view["clients"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["upstreamSeatSeconds"].as_f64().unwrap() <= first));

    // The Prometheus view names these clients (fewer than ten here).
    let text = kache.metrics();
    assert_eq!(
        metric(
            &text,
            "kache_client_upstream_requests_total",
            &[("client", &format!("127.0.0.1 {writer}"))]
        ),
        4.0,
        "{text}"
    );
    // And each request's log line carries the ledger key.
    let log = kache.stderr();
    assert!(
        log.lines().any(|l| l.contains("answered") && l.contains(&writer)),
        "no log line names the client:\n{log}"
    );
    assert!(from_reader.requests > 0);
}
