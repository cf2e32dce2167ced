//! Rendering an rv=0 LIST from the store: what every cache hit costs.
//! 10,000 pods of about 4 KB, the end-to-end benchmark's workload, rendered
//! whole and with a label selector that keeps a tenth of them; against the
//! naive baseline of re-serializing every object with serde_json. And
//! caching an object: the pruned parse against the whole JSON tree.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use http::HeaderMap;
use kache_cache::list::Items;
use kache_cache::reads::{self, ReadPlan};
use kache_cache::reflector::ResourceSpec;
use kache_cache::store::{Encoding, Store};
use kache_cache::RequestInfo;

const PODS: usize = 10_000;

fn pod(i: usize) -> Bytes {
    let ns = format!("ns-{:02}", i % 10);
    let padding = "x".repeat(2800);
    let json = serde_json::json!({
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {
            "name": format!("pod-{i:05}"), "namespace": ns, "uid": format!("uid-{i}"),
            "resourceVersion": (1000 + i).to_string(), "creationTimestamp": "2026-11-23T10:00:00Z",
            "labels": {"app": format!("app-{}", i % 10), "tier": "web"},
            "annotations": {"note": padding},
        },
        "spec": {"nodeName": format!("node-{}", i % 50), "restartPolicy": "Always", "schedulerName": "default-scheduler",
                 "serviceAccountName": "default",
                 "containers": [{"name": "main", "image": "registry.example/app:1.2.3", "args": ["--port=8080"],
                                 "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}}]},
        "status": {"phase": "Pending", "qosClass": "Burstable"},
    });
    let text = serde_json::to_string(&json).expect("json");
    // The API server's order: type meta first.
    let body = text.trim_start_matches('{');
    let without = body
        .replacen("\"apiVersion\":\"v1\",", "", 1)
        .replacen("\"kind\":\"Pod\",", "", 1);
    Bytes::from(format!("{{\"kind\":\"Pod\",\"apiVersion\":\"v1\",{without}"))
}

fn spec() -> ResourceSpec {
    ResourceSpec {
        group: String::new(),
        version: "v1".into(),
        resource: "pods".into(),
        kind: "Pod".into(),
        namespaced: true,
        custom: false,
        speaks_protobuf: Some(true),
    }
}

fn plan(uri: &str) -> ReadPlan {
    let (path, query) = uri.split_once('?').expect("query");
    let info = RequestInfo::parse("GET", path, Some(query)).expect("parses");
    reads::plan(&info, Some(query), &HeaderMap::new()).expect("cacheable")
}

fn render(c: &mut Criterion) {
    let spec = spec();
    let raw: Vec<Bytes> = (0..PODS).map(pod).collect();
    let total: usize = raw.iter().map(Bytes::len).sum();
    let objects = raw
        .iter()
        .map(|json| spec.object(json.clone()).expect("pod"))
        .collect();
    let store = Store::from_objects(objects, 20_000);

    let mut group = c.benchmark_group("list_10k_pods");
    group.throughput(Throughput::Bytes(total as u64));
    group.sample_size(20);
    let all = plan("/api/v1/pods?resourceVersion=0");
    // The chunks a client's answer is streamed as: the store's items,
    // assembled by the first list and shared by the others.
    group.bench_function("kache_json", |b| {
        b.iter(|| {
            let body = reads::list_body(&all, &spec, &store, Encoding::Json);
            black_box(body.chunks().map(|chunk| chunk.len()).sum::<usize>())
        })
    });
    // Assembling the items, as after every change to the store.
    group.bench_function("kache_json_assembling", |b| {
        b.iter(|| {
            let snapshot = store.snapshot(None, |_| true);
            black_box(Items::new(snapshot.objects.iter()).count())
        })
    });
    group.bench_function("kache_json_copied", |b| {
        b.iter(|| black_box(reads::list_body(&all, &spec, &store, Encoding::Json).to_vec()))
    });
    let selected = plan("/api/v1/pods?resourceVersion=0&labelSelector=app%3Dapp-3");
    group.bench_function("kache_json_label_selector", |b| {
        b.iter(|| {
            let body = reads::list_body(&selected, &spec, &store, Encoding::Json);
            black_box(body.chunks().map(|chunk| chunk.len()).sum::<usize>())
        })
    });
    // Baseline: decode and re-encode every object, as a server holding
    // decoded objects does on each LIST.
    let decoded: Vec<serde_json::Value> = raw
        .iter()
        .map(|json| serde_json::from_slice(json).expect("json"))
        .collect();
    group.bench_function("naive_reserialize", |b| {
        b.iter(|| {
            let list = serde_json::json!({"kind": "PodList", "apiVersion": "v1",
                "metadata": {"resourceVersion": "20000"}, "items": &decoded});
            black_box(serde_json::to_vec(&list).expect("json"))
        })
    });
    group.finish();
}

/// Caching an object: what a sync costs per object. The pruned parse (what
/// the reflector does) against building the whole object's JSON tree.
fn parse(c: &mut Criterion) {
    let spec = spec();
    let raw: Vec<Bytes> = (0..1000).map(pod).collect();
    let total: usize = raw.iter().map(Bytes::len).sum();
    let mut group = c.benchmark_group("cache_1k_pods");
    group.throughput(Throughput::Bytes(total as u64));
    group.sample_size(20);
    group.bench_function("pruned", |b| {
        b.iter(|| {
            for json in &raw {
                black_box(spec.object(json.clone()).expect("pod"));
            }
        })
    });
    group.bench_function("whole_tree", |b| {
        b.iter(|| {
            for json in &raw {
                let object =
                    kache_cache::store::Object::from_json(json.clone(), true, |v| spec.field_values(v));
                black_box(object.expect("pod"));
            }
        })
    });
    group.finish();
}

criterion_group!(benches, render, parse);
criterion_main!(benches);
