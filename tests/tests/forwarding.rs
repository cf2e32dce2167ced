//! Forwarded long-running requests against the real API server: however
//! many watches kache forwards at once, each is answered, and they hold up
//! nothing else. An API server lets an HTTP/2 connection carry a bounded
//! number of streams (250 on v1.20, 100 on current releases); a proxy that
//! multiplexed every client's requests over one such connection would leave
//! the next request waiting for a watch to end — up to its timeout.

#![allow(clippy::unwrap_used)] // test helpers, not only #[test] fns (STYLE.md)

use std::time::{Duration, Instant};

use kache_tests::{cluster, http_get, Kache, TestNamespace};

/// More than the streams an API server allows on one HTTP/2 connection.
const WATCHES: usize = 300;
/// Clients (User-Agents) sharing them: each may hold 100 long-running
/// requests (`maxLongRunningPerClient`).
const CLIENTS: usize = 5;
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_forwarded_watches_than_an_http2_connection_carries_hold_up_nothing() {
    let c = cluster();
    let ns = TestNamespace::create("forwarded-watches");
    // Nothing from memory: every watch is forwarded.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kache.yaml");
    std::fs::write(&config, "cache:\n  enabled: false\n").unwrap();
    let mut kache = Kache::start_with_args(&c.admin_kubeconfig, &["--config", config.to_str().unwrap()]);
    let url = format!(
        "{}/api/v1/namespaces/{ns}/configmaps?watch=true&timeoutSeconds=300",
        kache.url()
    );

    let idle = kache.rss_bytes();
    let mut open = Vec::new();
    for i in 0..WATCHES {
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http::<http_body_util::Empty<bytes::Bytes>>();
        let request = http::Request::get(&url)
            .header("user-agent", format!("forwarded-watch-{}", i % CLIENTS))
            .body(http_body_util::Empty::new())
            .unwrap();
        let response = tokio::time::timeout(ANSWER_TIMEOUT, client.request(request))
            .await
            .unwrap_or_else(|_| panic!("watch {i} of {WATCHES}: no answer within {ANSWER_TIMEOUT:?}"))
            .unwrap();
        assert_eq!(response.status(), 200, "watch {i}");
        // Held open: the client and the unread body.
        open.push((client, response.into_body()));
    }

    let per_watch = kache.rss_bytes().saturating_sub(idle) / WATCHES as u64;
    eprintln!("kache holds {per_watch} bytes per forwarded watch");

    // While they are all open, a plain read is forwarded and answered.
    let started = Instant::now();
    let list = tokio::time::timeout(
        ANSWER_TIMEOUT,
        http_get(&format!("{}/api/v1/namespaces/{ns}/configmaps", kache.url()), &[]),
    )
    .await
    .expect("a LIST behind the open watches was answered");
    assert_eq!(list.status(), 200);
    eprintln!(
        "{WATCHES} forwarded watches open; a LIST through kache took {:?}",
        started.elapsed()
    );
    kache.assert_running();
    drop(open);
}
