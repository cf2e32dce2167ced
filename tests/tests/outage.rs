//! The API server goes away: with `cache.serveStale`, reads kache can answer
//! from a store it kept in sync are answered from memory — consistent ones
//! included — with a `Warning` saying how far behind, and never beyond the
//! configured staleness; writes and reads it cannot answer get the usual
//! `503`. The shared API server is never stopped: a loopback relay between
//! kache and it is cut instead.

#![allow(clippy::unwrap_used)] // test helpers, not only #[test] fns (STYLE.md)

use std::time::{Duration, Instant};

use kache_tests::{
    cluster, kubeconfig_through, kubectl, poll_until, raw, AuditFilter, Kache, Relay, TestNamespace,
};

/// A kache whose upstream is `relay`, with these extra config lines.
fn kache_behind(relay: &Relay, config: &str) -> (Kache, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = kubeconfig_through(relay, &cluster().admin_kubeconfig, dir.path());
    let config_file = dir.path().join("kache.yaml");
    std::fs::write(&config_file, config).unwrap();
    let kache = Kache::start_with_args(&kubeconfig, &["--config", config_file.to_str().unwrap()]);
    (kache, dir)
}

fn names(list: &serde_json::Value) -> Vec<String> {
    let mut names: Vec<String> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

#[test]
fn with_serve_stale_reads_are_answered_from_memory_while_the_api_server_is_down() {
    let c = cluster();
    let ns = TestNamespace::create("stale");
    for name in ["a", "b"] {
        kubectl(
            &c.admin_kubeconfig,
            &["-n", ns.name(), "create", "configmap", name, "--from-literal=k=v"],
        )
        .ok();
    }
    let relay = Relay::start(c.apiserver_addr);
    let (mut kache, _dir) = kache_behind(&relay, "cache: {serveStale: {maxStalenessSeconds: 4}}\n");
    let list = format!("/api/v1/namespaces/{}/configmaps", ns.name());
    let cached = format!("{list}?resourceVersion=0");
    let get = format!("{list}/a");

    // The store is filled and in sync; a consistent read still goes upstream.
    let warm = poll_until(Duration::from_secs(30), "the configmaps cached", || {
        raw::get(kache.addr(), &cached)
            .ok()
            .filter(|r| r.status == 200 && names(&r.json()) == ["a", "b"])
    });
    assert!(warm.header("warning").is_none());
    let fresh = raw::get(kache.addr(), &list).unwrap();
    assert_eq!(fresh.status, 200, "{}", fresh.text());
    assert!(fresh.header("warning").is_none(), "the API server answered it");

    let discovery = raw::get(kache.addr(), "/api/v1").unwrap();
    assert_eq!(discovery.status, 200, "{}", discovery.text());

    let port = relay.stop();
    let cut = Instant::now();
    // Discovery keeps answering too: from memory, then (once kache has
    // noticed its watches are gone) from its last answers, with the Warning.
    let r = poll_until(Duration::from_secs(3), "discovery answered stale", || {
        raw::get(kache.addr(), "/api/v1").ok().filter(|r| {
            assert_eq!(r.status, 200, "discovery with the API server down: {}", r.text());
            r.header("warning").is_some()
        })
    });
    assert_eq!(r.json()["kind"], "APIResourceList");
    // Consistent LIST and GET: from memory, with the Warning.
    for path in [&list, &get] {
        let r = raw::get(kache.addr(), path).unwrap();
        assert_eq!(r.status, 200, "{path} with the API server down: {}", r.text());
        let warning = r
            .header("warning")
            .unwrap_or_else(|| panic!("{path}: no Warning: {:?}", r.headers));
        assert!(warning.starts_with("299 - "), "{warning}");
        assert!(warning.contains("served from kache's cache"), "{warning}");
        assert!(warning.contains("s behind the API server"), "{warning}");
    }
    let r = raw::get(kache.addr(), &list).unwrap();
    assert_eq!(names(&r.json()), ["a", "b"]);
    // A write is never answered from memory.
    let write = raw::exchange(
        kache.addr(),
        format!(
            "POST {list} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\
             Connection: close\r\n\r\n{{}}"
        )
        .as_bytes(),
    )
    .unwrap();
    assert_eq!(write.status, 503, "{}", write.text());
    // Past the staleness bound, the API server's absence shows.
    let past = poll_until(Duration::from_secs(30), "staleness past its bound", || {
        raw::get(kache.addr(), &list).ok().filter(|r| r.status == 503)
    });
    assert!(
        cut.elapsed() >= Duration::from_secs(4),
        "503 before the bound: {}",
        past.text()
    );
    let metrics = kache.metrics();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("kache_stale_answers_total{kind=\"unreachable\"}") && !l.ends_with(" 0")),
        "{metrics}"
    );

    // Back: answers are fresh again, without a Warning.
    let _relay = Relay::start_on(port, c.apiserver_addr);
    let r = poll_until(Duration::from_secs(30), "the API server to answer again", || {
        raw::get(kache.addr(), &list).ok().filter(|r| r.status == 200)
    });
    assert!(r.header("warning").is_none(), "{:?}", r.headers);
    kache.assert_running();
}

#[test]
fn without_serve_stale_an_unreachable_api_server_is_a_503_even_for_cached_resources() {
    let c = cluster();
    let ns = TestNamespace::create("nostale");
    let relay = Relay::start(c.apiserver_addr);
    let (kache, _dir) = kache_behind(&relay, "");
    let list = format!("/api/v1/namespaces/{}/configmaps", ns.name());
    poll_until(Duration::from_secs(30), "the configmaps cached", || {
        raw::get(kache.addr(), &format!("{list}?resourceVersion=0"))
            .ok()
            .filter(|r| r.status == 200)
    });
    let _port = relay.stop();
    let r = raw::get(kache.addr(), &list).unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.header("warning").is_none());
}

/// A kubeconfig for the test API server as a new service account of `ns`
/// bound to `cluster-admin`: an upstream identity of this test's alone, so
/// its requests can be told apart in the audit log. Returns the file and
/// the user name.
fn own_identity(ns: &str, dir: &std::path::Path) -> (std::path::PathBuf, String) {
    let c = cluster();
    let name = "kache-warm";
    kubectl(&c.admin_kubeconfig, &["-n", ns, "create", "serviceaccount", name]).ok();
    kubectl(
        &c.admin_kubeconfig,
        &[
            "create",
            "clusterrolebinding",
            &format!("{ns}-{name}"),
            "--clusterrole=cluster-admin",
            &format!("--serviceaccount={ns}:{name}"),
        ],
    )
    .ok();
    let request = format!("/api/v1/namespaces/{ns}/serviceaccounts/{name}/token");
    let out = kache_tests::Kubectl::new(&c.admin_kubeconfig)
        .stdin(r#"{"apiVersion":"authentication.k8s.io/v1","kind":"TokenRequest","spec":{}}"#)
        .run(&["create", "--raw", &request, "-f", "-"])
        .ok();
    let token = out.json()["status"]["token"].as_str().unwrap().to_string();
    let text = std::fs::read_to_string(&c.alice_kubeconfig)
        .unwrap()
        .replace(&c.alice_token, &token);
    let path = dir.join("own.kubeconfig");
    std::fs::write(&path, text).unwrap();
    (path, format!("system:serviceaccount:{ns}:{name}"))
}

#[test]
fn a_killed_kache_restarts_from_its_snapshots_with_a_watch_and_no_list() {
    let c = cluster();
    let ns = TestNamespace::create("warm");
    let dir = tempfile::tempdir().unwrap();
    let (kubeconfig, user) = own_identity(ns.name(), dir.path());
    let cleanup = format!("{}-kache-warm", ns.name());
    for name in ["a", "b"] {
        kubectl(
            &c.admin_kubeconfig,
            &["-n", ns.name(), "create", "configmap", name, "--from-literal=k=v"],
        )
        .ok();
    }
    let state = dir.path().join("state");
    let config = dir.path().join("kache.yaml");
    std::fs::write(&config, "cache: {snapshotIntervalSeconds: 1}\n").unwrap();
    let args = [
        "--state-dir",
        state.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ];
    let cached = format!("/api/v1/namespaces/{}/configmaps?resourceVersion=0", ns.name());
    let audit = c.audit();
    let listed_by_kache = AuditFilter::new().user(&user).verb("list");

    let kache = Kache::start_with_args(&kubeconfig, &args);
    poll_until(Duration::from_secs(30), "the configmaps cached", || {
        raw::get(kache.addr(), &cached)
            .ok()
            .filter(|r| r.status == 200 && names(&r.json()) == ["a", "b"])
    });
    // A snapshot of the configmaps' store is written within its interval.
    let snapshots = state.join("snapshots");
    poll_until(Duration::from_secs(30), "a snapshot written", || {
        walk(&snapshots).into_iter().find(|p| {
            p.to_string_lossy().contains("configmaps") && p.extension().is_some_and(|e| e == "ksnap")
        })
    });
    // SIGKILL: no graceful save; what the periodic one wrote must do.
    drop(kache);
    kubectl(
        &c.admin_kubeconfig,
        &["-n", ns.name(), "create", "configmap", "c", "--from-literal=k=v"],
    )
    .ok();

    let mark = audit.mark();
    let kache = Kache::start_with_args(&kubeconfig, &args);
    // The change made while kache was down arrives through the resumed watch.
    poll_until(
        Duration::from_secs(30),
        "the restarted cache to hold the new configmap",
        || {
            raw::get(kache.addr(), &cached)
                .ok()
                .filter(|r| r.status == 200 && names(&r.json()) == ["a", "b", "c"])
        },
    );
    // The restarted kache's watch of configmaps, from the snapshot's version.
    // The API server (v1.20, blocking audit) logs a watch's lines when it
    // ends: stop kache, then wait for them.
    drop(kache);
    let watch = poll_until(
        Duration::from_secs(30),
        "the restarted kache's watch in the audit log",
        || {
            mark.entries().into_iter().find_map(|e| {
                let uri = e["requestURI"].as_str()?.to_string();
                (e["stage"] == "ResponseStarted"
                    && e["verb"] == "watch"
                    && e["user"]["username"] == user.as_str()
                    && uri.starts_with("/api/v1/configmaps?"))
                .then_some(uri)
            })
        },
    );
    assert!(
        watch.contains("resourceVersion=") && !watch.contains("resourceVersion=0&"),
        "not a watch from the snapshot's version: {watch}"
    );
    // A reflector lists before it watches: any LIST is logged by now.
    let lists = mark.matching_after_sentinel(&listed_by_kache);
    let configmap_lists: Vec<_> = lists
        .iter()
        .filter(|e| e.request_uri.starts_with("/api/v1/configmaps"))
        .collect();
    assert!(
        configmap_lists.is_empty(),
        "the restarted kache listed configmaps again: {configmap_lists:#?}"
    );
    // Not vacuous: the same filter sees this identity's other requests.
    assert!(
        mark.matching_after_sentinel(&AuditFilter::new().user(&user))
            .len()
            >= 3,
        "no request of {user} found"
    );
    kubectl(&c.admin_kubeconfig, &["delete", "clusterrolebinding", &cleanup]).ok();
}

/// Every file under `dir`, recursively.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                out.extend(walk(&path));
            } else {
                out.push(path);
            }
        }
    }
    out
}

/// The watch events of a watch's whole body (JSON lines): (type, name, resourceVersion).
fn watch_events(body: &[u8]) -> Vec<(String, String, String)> {
    body.split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| {
            let e: serde_json::Value = serde_json::from_slice(l).unwrap();
            let field = |f: &str| e["object"]["metadata"][f].as_str().unwrap_or("").to_string();
            (
                e["type"].as_str().unwrap().to_string(),
                field("name"),
                field("resourceVersion"),
            )
        })
        .collect()
}

#[test]
fn a_terminated_kache_bookmarks_its_watchers_where_the_restarted_one_resumes_them() {
    let c = cluster();
    let ns = TestNamespace::create("handoff");
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let args = ["--state-dir", state.to_str().unwrap()];
    let create = |name: &str| {
        kubectl(
            &c.admin_kubeconfig,
            &["-n", ns.name(), "create", "configmap", name, "--from-literal=k=v"],
        )
        .ok();
    };
    create("a");
    let cached = format!("/api/v1/namespaces/{}/configmaps?resourceVersion=0", ns.name());
    let agent = kache_tests::unique_name("handoff-watcher");
    let runtime = tokio::runtime::Runtime::new().unwrap();

    let mut kache = Kache::start_with_args(&c.admin_kubeconfig, &args);
    let list = poll_until(Duration::from_secs(30), "the configmaps cached", || {
        let r = raw::get(kache.addr(), &cached).ok()?;
        let hits = kache_tests::metric(
            &kache.metrics(),
            "kache_cache_hits_total",
            &[("resource", "v1/configmaps")],
        );
        (r.status == 200 && hits > 0.0).then(|| r.json())
    });
    let from = list["metadata"]["resourceVersion"].as_str().unwrap().to_string();
    let watch = |kache: &Kache, from: &str, timeout: u32| {
        let url = format!(
            "{}/api/v1/namespaces/{}/configmaps?watch=true&allowWatchBookmarks=true&resourceVersion={from}&timeoutSeconds={timeout}",
            kache.url(),
            ns.name()
        );
        let agent = agent.clone();
        runtime.spawn(async move { kache_tests::http_get(&url, &[("user-agent", agent.as_str())]).await })
    };
    let first = watch(&kache, &from, 600);
    poll_until(Duration::from_secs(30), "the watch served from memory", || {
        let n = kache_tests::metric(
            &kache.metrics(),
            "kache_cache_watchers",
            &[("resource", "v1/configmaps")],
        );
        (n == 1.0).then_some(())
    });
    create("b");
    poll_until(Duration::from_secs(30), "kache to have b", || {
        raw::get(kache.addr(), &cached)
            .ok()
            .filter(|r| names(&r.json()) == ["a", "b"])
    });
    let status = kache.terminate(Duration::from_secs(30));
    assert!(status.success(), "kache exited with {status}");
    let body = runtime.block_on(first).unwrap();
    let events = watch_events(body.body());
    let (kind, _, bookmark) = events.last().cloned().expect("events");
    assert_eq!(kind, "BOOKMARK", "the watch's last event: {events:?}");
    assert!(
        events.iter().any(|(t, name, _)| t == "ADDED" && name == "b"),
        "{events:?}"
    );

    // While kache is down, c; the restarted kache resumes the client from
    // its bookmark out of memory, c included, without forwarding the watch.
    create("c");
    let kache = Kache::start_with_args(&c.admin_kubeconfig, &args);
    let mark = c.audit().mark();
    let resumed = runtime.block_on(watch(&kache, &bookmark, 3)).unwrap();
    assert_eq!(resumed.status(), 200);
    let events = watch_events(resumed.body());
    assert!(
        events.iter().any(|(t, name, _)| t == "ADDED" && name == "c"),
        "the change made while kache was down: {events:?}"
    );
    assert!(
        !events
            .iter()
            .any(|(t, name, _)| t == "ADDED" && (name == "a" || name == "b")),
        "nothing before the bookmark again: {events:?}"
    );
    let forwarded: Vec<_> = mark
        .events_after_sentinel()
        .into_iter()
        .filter(|e| e.user_agent == agent)
        .collect();
    assert!(
        forwarded.is_empty(),
        "the resumed watch reached the API server: {forwarded:?}"
    );
}
