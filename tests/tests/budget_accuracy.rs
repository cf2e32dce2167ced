//! The memory budget counts what kache's resident memory shows: caching a
//! resource of many small objects (where per-object bookkeeping weighs most)
//! grows kache's RSS by about what `/debug/cache` says the store holds, so
//! the LRU drops stores when it should (a budget that counted half of what
//! a store costs would let kache grow to twice its budget).

#![allow(clippy::unwrap_used)] // test helpers, not only #[test] fns (STYLE.md)

use futures::StreamExt;
use kache_tests::{cluster, http_get, metric, write_json, Kache, TestNamespace};
use serde_json::{json, Value};

const CONFIGMAPS: usize = 3000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_counts_what_resident_memory_shows() {
    let c = cluster();
    let ns = TestNamespace::create("budget");
    let direct = c.admin_client().await;
    let collection = format!("/api/v1/namespaces/{ns}/configmaps");
    futures::stream::iter(0..CONFIGMAPS)
        .for_each_concurrent(16, |i| {
            let (direct, collection) = (direct.clone(), collection.clone());
            async move {
                let labels: serde_json::Map<String, Value> = (0..8)
                    .map(|l| {
                        (
                            format!("example.com/label-{l}"),
                            json!(format!("value-{}", (i + l) % 37)),
                        )
                    })
                    .collect();
                let cm = json!({"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": format!("cm-{i:05}"), "labels": labels},
                    "data": {"config": "k=v\n".repeat(150)}});
                write_json(&direct, "POST", &collection, Some(&cm)).await;
            }
        })
        .await;

    // Memory freed before the fill (the warm-up's) may be taken again by
    // the store without RSS growing: that hides growth, never adds to it.
    // So a trial under the bound is tried again with a fresh kache; one
    // over it fails at once.
    let mut ratios = Vec::new();
    for _ in 0..3 {
        let ratio = trial(&c.admin_kubeconfig, ns.name(), &collection).await;
        assert!(
            ratio < 1.2,
            "the budget counts less than kache's resident memory grew by: {ratio:.2}×"
        );
        ratios.push(ratio);
        if ratio >= 0.85 {
            break;
        }
    }
    // Measured 1.07–1.12× (2.06× when objects were parsed whole and their
    // bookkeeping not counted, 1.23× with labels and fields in trees of
    // owned strings); what is left is the allocator's. The goal is 15 %;
    // the bound leaves RSS's noise a margin and still fails the tree layout.
    assert!(
        ratios.iter().any(|r| (0.85..1.2).contains(r)),
        "resident memory grew by {ratios:.2?}× what the budget counts"
    );
}

/// Caches the collection in a fresh kache: its RSS growth over what the
/// budget counts for it.
async fn trial(kubeconfig: &std::path::Path, ns: &str, collection: &str) -> f64 {
    let kache = Kache::start(kubeconfig);
    let list = format!("{}{collection}?resourceVersion=0&limit=1", kache.url());
    // Warm up kache's other state (discovery, connections) with another
    // resource, and its transport with the same list passed through (a
    // consistent read, forwarded): what streaming a list of this size
    // leaves resident is the transport's, not the store's.
    let _ = http_get(
        &format!("{}/api/v1/namespaces/{ns}/secrets?resourceVersion=0", kache.url()),
        &[],
    )
    .await;
    let forwarded = http_get(&format!("{}{collection}", kache.url()), &[]).await;
    assert_eq!(forwarded.status(), 200);
    let idle = kache.rss_bytes();
    for _ in 0..100 {
        let _ = http_get(&list, &[]).await;
        if metric(
            &kache.metrics(),
            "kache_cache_hits_total",
            &[("resource", "v1/configmaps")],
        ) > 0.0
        {
            break;
        }
    }
    let filled = kache.rss_bytes();
    let view: Value = serde_json::from_slice(
        http_get(&format!("http://{}/debug/cache", kache.admin_addr()), &[])
            .await
            .body(),
    )
    .unwrap();
    let counted: u64 = view["resources"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["resource"] == "configmaps")
        .map(|r| r["bytes"].as_u64().unwrap())
        .sum();
    let growth = filled.saturating_sub(idle);
    let ratio = growth as f64 / counted as f64;
    eprintln!(
        "kache grew by {:.1} MB caching {CONFIGMAPS} configmaps; the budget counts {:.1} MB ({ratio:.2}×)",
        growth as f64 / 1e6,
        counted as f64 / 1e6
    );
    ratio
}
