//! Request classification runs on every request: it must cost far less than
//! the network hop it sits in front of.

use criterion::{criterion_group, criterion_main, Criterion};
use kache_cache::RequestInfo;
use std::hint::black_box;

fn classify(c: &mut Criterion) {
    let requests = [
        (
            "GET",
            "/api/v1/namespaces/kube-system/pods",
            Some("limit=500&resourceVersion=0"),
        ),
        (
            "GET",
            "/apis/apps/v1/namespaces/default/deployments",
            Some("allowWatchBookmarks=true&resourceVersion=12345&timeoutSeconds=412&watch=true"),
        ),
        (
            "PATCH",
            "/api/v1/namespaces/default/configmaps/settings",
            Some("fieldManager=kubectl-client-side-apply"),
        ),
        ("GET", "/apis", None),
    ];
    c.bench_function("classify/typical_mix", |b| {
        b.iter(|| {
            for (method, path, query) in requests {
                black_box(RequestInfo::parse(black_box(method), black_box(path), black_box(query)).ok());
            }
        })
    });
}

criterion_group!(benches, classify);
criterion_main!(benches);
