//! The audit-log counting the load tests rely on: N requests through kache that must
//! reach the API server are found exactly N times.

#![allow(clippy::unwrap_used)] // test helpers, not only #[test] fns (STYLE.md)

use kache_tests::{cluster, kubectl, AuditFilter, Kache, TestNamespace};

const N: usize = 5;

#[test]
fn n_raw_gets_through_kache_are_n_audited_gets_by_kaches_user() {
    let c = cluster();
    // A namespace of its own, so no other test's requests match the URI.
    let ns = TestNamespace::create("audit");
    let path = format!("/api/v1/namespaces/{}", ns.name());
    let kache = Kache::start(&c.admin_kubeconfig);

    let mark = c.audit().mark();
    for _ in 0..N {
        let out = kubectl(kache.kubeconfig(), &["get", "--raw", &path]).ok();
        assert_eq!(out.json()["metadata"]["name"], ns.name());
    }
    let gets = AuditFilter::new().user("admin").verb("get").uri(&path);
    let seen = mark.matching_after_sentinel(&gets);
    assert_eq!(seen.len(), N, "{seen:#?}");
    let codes: Vec<_> = seen.into_iter().map(|e| e.code).collect();
    assert_eq!(codes, vec![Some(200); N]);

    // The same counting sees direct requests too (and tells users apart).
    let direct_mark = c.audit().mark();
    kubectl(&c.alice_kubeconfig, &["get", "--raw", &path]);
    let by_alice = AuditFilter::new().user("alice").uri(&path);
    let events = direct_mark.events_after_sentinel();
    let alices: Vec<_> = events.iter().filter(|e| by_alice.matches(e)).collect();
    assert_eq!(alices.len(), 1, "{events:#?}");
    assert_eq!(alices[0].code, Some(403));
    assert_eq!(
        events.iter().filter(|e| gets.matches(e)).count(),
        0,
        "alice's request was counted as admin's"
    );
}

/// Sums the samples of a Prometheus counter whose labels include every `label`.
fn counter_sum(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let rest = series.strip_prefix(name)?;
            (rest.is_empty() || rest.starts_with('{')).then_some(())?;
            labels
                .iter()
                .all(|want| rest.contains(want))
                .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

#[test]
fn metrics_count_the_requests_kache_served() {
    let c = cluster();
    let kache = Kache::start(&c.admin_kubeconfig);
    let before = counter_sum(&kache.metrics(), "kache_http_requests_total", &["code=\"200\""]);
    for _ in 0..N {
        kubectl(
            kache.kubeconfig(),
            &["get", "--raw", "/api/v1/namespaces/default"],
        )
        .ok();
    }
    let metrics = kache.metrics();
    assert!(
        metrics.contains("kache_http_requests_total"),
        "no kache_http_requests_total in:\n{metrics}"
    );
    let after = counter_sum(&metrics, "kache_http_requests_total", &["code=\"200\""]);
    assert!(
        after - before >= N as f64,
        "{N} requests served, counter went {before} -> {after}:\n{metrics}"
    );
    let series = metrics
        .lines()
        .find(|l| l.starts_with("kache_http_requests_total{"))
        .unwrap();
    assert!(
        series.contains("verb=") && series.contains("code="),
        "labels verb and code expected: {series}"
    );
}

#[test]
fn kaches_own_requests_name_kache_and_forwarded_ones_keep_the_clients_user_agent() {
    let c = cluster();
    let ns = TestNamespace::create("audit-agent");
    let kache = Kache::start(&c.admin_kubeconfig);
    let mark = c.audit().mark();
    // The first rv=0 read of configmaps makes kache list and watch them;
    // the namespace GET is forwarded.
    let list = format!("/api/v1/namespaces/{}/configmaps?resourceVersion=0", ns.name());
    kubectl(kache.kubeconfig(), &["get", "--raw", &list]).ok();
    let path = format!("/api/v1/namespaces/{}", ns.name());
    kubectl(kache.kubeconfig(), &["get", "--raw", &path]).ok();
    let events = mark.events_after_sentinel();
    let own: Vec<_> = events
        .iter()
        .filter(|e| {
            AuditFilter::new()
                .user("admin")
                .uri_prefix("/api/v1/configmaps")
                .matches(e)
        })
        .collect();
    assert!(
        own.iter().any(|e| e.verb == "list"),
        "kache's LIST of configmaps: {events:#?}"
    );
    for event in &own {
        assert!(
            event.user_agent.starts_with("kache/"),
            "kache's own {} says it is {:?}",
            event.verb,
            event.user_agent
        );
    }
    let forwarded: Vec<_> = events
        .iter()
        .filter(|e| AuditFilter::new().verb("get").uri(&path).matches(e))
        .collect();
    assert_eq!(forwarded.len(), 1, "{events:#?}");
    assert!(
        forwarded[0].user_agent.starts_with("kubectl"),
        "a forwarded request keeps its client's User-Agent: {:?}",
        forwarded[0].user_agent
    );
}
