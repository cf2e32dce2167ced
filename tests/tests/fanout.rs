//! Fan-out at scale: a thousand watches of one namespace's configmaps
//! through kache, each from `0` (a replay of the state first), while the
//! configmaps change a hundred times — each watch on its own HTTP/1.1
//! connection, and again multiplexed over HTTP/2 connections as client-go
//! opens them. Every watcher gets every event, in order, and kache holds
//! them on one upstream watch; once its replay is sent, an idle watcher
//! costs kache little memory (a watch that kept what it replayed would show
//! here).

#![allow(clippy::unwrap_used)] // test helpers, not only #[test] fns (STYLE.md)

use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use kache_tests::{cluster, metric, write_json, Kache, TestNamespace};
use serde_json::{json, Value};
use tokio::sync::Mutex;

/// What a watcher saw: ("TYPE name", resourceVersion), in order.
type Events = Vec<(String, String)>;

const WATCHERS: usize = 1000;
const CONFIGMAPS: usize = 20;
const CHANGES: usize = 100;
/// Bound on the wait for every watcher to see every change.
const CONVERGE: Duration = Duration::from_secs(60);

/// How the watchers connect.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Transport {
    /// One HTTP/1.1 connection per watch.
    Http1,
    /// HTTP/2 (cleartext, prior knowledge), [`STREAMS`] watches per
    /// connection, as client-go multiplexes its watches over TLS.
    Http2,
}

/// Bound on kache's memory per idle watcher over HTTP/2.
const BOUND_H2: u64 = 8 * 1024;

/// Watches per HTTP/2 connection: under kache's limit of concurrent streams
/// (hyper's 200), as client-go opens another connection at the server's.
const STREAMS: usize = 125;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_watchers_each_get_every_event_in_order() {
    fan_out(Transport::Http1, "fanout").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_watchers_over_http2_each_get_every_event_in_order() {
    fan_out(Transport::Http2, "fanout-h2").await;
}

async fn fan_out(transport: Transport, namespace: &str) {
    let c = cluster();
    let ns = TestNamespace::create(namespace);
    let direct = c.admin_client().await;
    let collection = format!("/api/v1/namespaces/{ns}/configmaps");
    for i in 0..CONFIGMAPS {
        let cm = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": format!("cm-{i:02}")}, "data": {"v": "0"}});
        write_json(&direct, "POST", &collection, Some(&cm)).await;
    }
    let kache = Kache::start(&c.admin_kubeconfig);
    let list_url = format!("{}{collection}?resourceVersion=0", kache.url());
    let list = until("configmaps cached", || async {
        let r = kache_tests::http_get(&list_url, &[]).await;
        let hits = metric(
            &kache.metrics(),
            "kache_cache_hits_total",
            &[("resource", "v1/configmaps")],
        );
        (r.status() == 200 && hits > 0.0).then(|| serde_json::from_slice::<Value>(r.body()).unwrap())
    })
    .await;
    let mut state: Events = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| {
            (
                format!("ADDED {}", item["metadata"]["name"].as_str().unwrap()),
                item["metadata"]["resourceVersion"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    state.sort();
    assert_eq!(state.len(), CONFIGMAPS);
    let idle_before = kache.rss_bytes();

    // A thousand watches, each from `0`.
    let url = format!(
        "{}{collection}?watch=true&resourceVersion=0&timeoutSeconds=600",
        kache.url()
    );
    let seen: Arc<Vec<Mutex<Events>>> = Arc::new((0..WATCHERS).map(|_| Mutex::new(Vec::new())).collect());
    let mut tasks = Vec::new();
    let mut client = None;
    for i in 0..WATCHERS {
        // A client per connection: its own pool.
        if transport == Transport::Http1 || i % STREAMS == 0 {
            client = Some(
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .http2_only(transport == Transport::Http2)
                    .build_http::<http_body_util::Empty<bytes::Bytes>>(),
            );
        }
        let client = client.clone().unwrap();
        let request = http::Request::get(&url)
            .body(http_body_util::Empty::new())
            .unwrap();
        let response = client.request(request).await.unwrap();
        assert_eq!(response.status(), 200, "watch {i}");
        let seen = seen.clone();
        tasks.push(tokio::spawn(async move {
            let mut body = response.into_body();
            let mut buffer = Vec::new();
            while let Some(Ok(frame)) = body.frame().await {
                let Ok(data) = frame.into_data() else { continue };
                buffer.extend_from_slice(&data);
                for line in kache_tests::take_lines(&mut buffer) {
                    let event: Value = serde_json::from_slice(&line).unwrap();
                    let name = event["object"]["metadata"]["name"]
                        .as_str()
                        .unwrap_or("")
                        .to_string();
                    let rv = event["object"]["metadata"]["resourceVersion"]
                        .as_str()
                        .unwrap_or("")
                        .to_string();
                    seen[i]
                        .lock()
                        .await
                        .push((format!("{} {name}", event["type"].as_str().unwrap_or("")), rv));
                }
            }
        }));
    }
    until("every watch served from memory", || async {
        let n = metric(
            &kache.metrics(),
            "kache_cache_watchers",
            &[("resource", "v1/configmaps")],
        );
        (n == WATCHERS as f64).then_some(())
    })
    .await;
    until("every replay received", || async {
        for watcher in seen.iter() {
            if watcher.lock().await.len() < CONFIGMAPS {
                return None;
            }
        }
        Some(())
    })
    .await;
    let idle_after = kache.rss_bytes();
    let per_watcher = idle_after.saturating_sub(idle_before) / WATCHERS as u64;
    eprintln!(
        "kache RSS {:.1} MB before, {:.1} MB with {WATCHERS} idle watchers ({transport:?}): {per_watcher} bytes per watcher",
        idle_before as f64 / 1e6,
        idle_after as f64 / 1e6
    );
    // Measured with the test's debug build: about 18 KB over HTTP/1.1
    // (17-18 KB release), nearly all of it the connection's — hyper's read
    // and write buffers (8 KB each) and its task; kache's own part of a
    // watch is under a kilobyte. Over HTTP/2 a watch is a stream of a
    // shared connection: about 3 KB. A watch that kept its replay (an ADDED
    // frame per object), or a connection that kept a slot the size of the
    // pipeline's future (9 KB, see the server), would exceed the bounds.
    let bound = match transport {
        Transport::Http1 => 32 * 1024,
        Transport::Http2 => BOUND_H2,
    };
    assert!(
        per_watcher < bound,
        "{per_watcher} bytes of kache's memory per idle watcher ({transport:?})"
    );

    // A hundred changes, in order, straight to the API server.
    let mut expected = state.clone();
    for round in 0..CHANGES {
        let name = format!("cm-{:02}", round % CONFIGMAPS);
        let patch = json!({"data": {"v": (round + 1).to_string()}});
        let answer = write_json(&direct, "PATCH", &format!("{collection}/{name}"), Some(&patch)).await;
        let rv = answer["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .to_string();
        expected.push((format!("MODIFIED {name}"), rv));
    }
    let deadline = tokio::time::Instant::now() + CONVERGE;
    loop {
        let mut behind = 0;
        for watcher in seen.iter() {
            if watcher.lock().await.len() < CONFIGMAPS + CHANGES {
                behind += 1;
            }
        }
        if behind == 0 {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            let first = seen[0].lock().await.clone();
            let finished = tasks.iter().filter(|t| t.is_finished()).count();
            panic!(
                "{behind} of {WATCHERS} watchers have not seen all {CHANGES} changes; {finished} watch tasks ended; the first saw {} events: {:?}",
                first.len(),
                first.iter().take(5).collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (i, watcher) in seen.iter().enumerate() {
        let mut got = watcher.lock().await.clone();
        // The replay in any order (as the API server's), then the changes in order.
        got[..CONFIGMAPS].sort();
        assert_eq!(
            got, expected,
            "watcher {i}: the state, then every change in order, nothing else"
        );
    }
    let text = kache.metrics();
    assert_eq!(
        metric(&text, "kache_cache_watchers", &[("resource", "v1/configmaps")]),
        WATCHERS as f64,
        "no watch ended"
    );
    for task in &tasks {
        assert!(!task.is_finished(), "a watch ended");
    }
    drop(kache);
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }
}

/// Polls `check` until it gives a value, for at most a minute.
async fn until<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
