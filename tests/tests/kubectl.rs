//! kubectl through kache versus kubectl straight at the API server: same answers,
//! and writes made on one path are visible on the other.

#![allow(clippy::unwrap_used)] // test helpers, not only #[test] fns (STYLE.md)

use std::time::Duration;

use kache_tests::{
    cluster, kubectl, normalize_object, unique_name, without_age_column, Kache, Kubectl, Output,
    TestNamespace,
};

const WATCH_TIMEOUT: Duration = Duration::from_secs(20);

/// Creates two configmaps and a pod (never scheduled: no scheduler runs) directly.
fn seed(ns: &str) {
    let manifest = format!(
        r#"
apiVersion: v1
kind: ConfigMap
metadata: {{name: alpha, namespace: {ns}, labels: {{app: demo}}}}
data: {{greeting: hello, size: "1"}}
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: beta, namespace: {ns}, labels: {{app: other}}}}
data: {{x: "z"}}
---
apiVersion: v1
kind: Pod
metadata: {{name: web, namespace: {ns}, labels: {{app: demo}}}}
spec:
  containers: [{{name: web, image: "registry.invalid/web:1"}}]
"#
    );
    Kubectl::new(&cluster().admin_kubeconfig)
        .stdin(manifest)
        .run(&["apply", "-f", "-"])
        .ok();
}

/// Asserts both runs ended alike and printed the same (after `normalize` of stdout).
#[track_caller]
fn assert_same(what: &str, via: &Output, direct: &Output, normalize: impl Fn(&str) -> String) {
    assert_eq!(
        via.code(),
        direct.code(),
        "{what}: exit codes differ\nthrough kache: {via:?}\ndirect: {direct:?}"
    );
    assert_eq!(
        normalize(&via.stdout),
        normalize(&direct.stdout),
        "{what}: stdout differs\nthrough kache stderr: {}\ndirect stderr: {}",
        via.stderr,
        direct.stderr
    );
}

#[test]
fn kubectl_get_tables_through_kache_match_direct() {
    let c = cluster();
    let ns = TestNamespace::create("kubectl-get");
    seed(ns.name());
    let kache = Kache::start(&c.admin_kubeconfig);
    let n = ns.name();
    let cases: Vec<Vec<&str>> = vec![
        vec!["get", "pods", "-n", n],
        vec!["get", "pods", "-n", n, "-o", "wide"],
        vec!["get", "configmaps", "-n", n],
        vec!["get", "configmaps", "-n", n, "-l", "app=demo"],
        vec![
            "get",
            "configmaps",
            "-n",
            n,
            "--field-selector",
            "metadata.name=beta",
        ],
        vec!["get", "configmaps,pods", "-n", n, "--show-labels"],
        vec!["get", "namespaces", n, "default", "kube-system"],
        vec!["get", "configmap", "alpha", "-n", n],
    ];
    for args in cases {
        let via = kubectl(kache.kubeconfig(), &args);
        let direct = kubectl(&c.admin_kubeconfig, &args);
        assert!(direct.success(), "direct {args:?} failed: {}", direct.stderr);
        assert!(
            !direct.stdout.trim().is_empty(),
            "direct {args:?} printed nothing"
        );
        assert_same(&format!("{args:?}"), &via, &direct, without_age_column);
    }

    // A NotFound error comes through as the API server words it.
    let args = ["get", "configmap", "no-such-thing", "-n", n];
    let via = kubectl(kache.kubeconfig(), &args);
    let direct = kubectl(&c.admin_kubeconfig, &args);
    assert!(!direct.success());
    assert_eq!(via.code(), direct.code());
    assert_eq!(via.stderr.trim(), direct.stderr.trim(), "NotFound errors differ");
}

#[test]
fn kubectl_get_json_and_yaml_through_kache_match_direct() {
    let c = cluster();
    let ns = TestNamespace::create("kubectl-json");
    seed(ns.name());
    let kache = Kache::start(&c.admin_kubeconfig);
    let n = ns.name();
    for resource in ["pods", "configmaps"] {
        for format in ["json", "yaml"] {
            let args = ["get", resource, "-n", n, "-o", format];
            let via = kubectl(kache.kubeconfig(), &args).ok();
            let direct = kubectl(&c.admin_kubeconfig, &args).ok();
            let (via, direct) = if format == "json" {
                (via.json(), direct.json())
            } else {
                (via.yaml(), direct.yaml())
            };
            // Nothing changed in the namespace between the two reads: the items are
            // identical. (The list's own resourceVersion follows the whole cluster.)
            let items = direct["items"].as_array().expect("a list");
            assert!(!items.is_empty(), "{args:?}: the seeded objects are missing");
            assert_eq!(via["kind"], direct["kind"], "{args:?}");
            assert_eq!(via["items"], direct["items"], "{args:?}: items differ");
        }
    }
    for args in [
        vec!["get", "configmap", "alpha", "-n", n, "-o", "json"],
        vec!["get", "pod", "web", "-n", n, "-o", "json"],
        vec!["get", "namespace", n, "-o", "json"],
    ] {
        let via = kubectl(kache.kubeconfig(), &args).ok().json();
        let direct = kubectl(&c.admin_kubeconfig, &args).ok().json();
        assert_eq!(via, direct, "{args:?}: objects differ");
    }
    let args = ["get", "configmap", "alpha", "-n", n, "-o", "yaml"];
    let via = kubectl(kache.kubeconfig(), &args).ok().yaml();
    let direct = kubectl(&c.admin_kubeconfig, &args).ok().yaml();
    assert_eq!(via, direct, "{args:?}: objects differ");
    for args in [
        vec![
            "get",
            "configmap",
            "alpha",
            "-n",
            n,
            "-o",
            "jsonpath={.data.greeting}",
        ],
        vec!["get", "configmaps", "-n", n, "-o", "name"],
    ] {
        let via = kubectl(kache.kubeconfig(), &args).ok();
        let direct = kubectl(&c.admin_kubeconfig, &args).ok();
        assert_same(&format!("{args:?}"), &via, &direct, str::to_string);
    }
}

/// The event type and object name of a `kubectl get -w --output-watch-events` table line.
fn event_of(line: &str) -> (String, String) {
    let mut words = line.split_whitespace();
    (
        words.next().unwrap_or_default().to_string(),
        words.next().unwrap_or_default().to_string(),
    )
}

#[test]
fn kubectl_watch_through_kache_sees_changes_made_directly() {
    let c = cluster();
    let ns = TestNamespace::create("kubectl-watch");
    let n = ns.name();
    kubectl(
        &c.admin_kubeconfig,
        &["create", "configmap", "seed", "-n", n, "--from-literal=k=v"],
    )
    .ok();
    let kache = Kache::start(&c.admin_kubeconfig);

    let mut watch = Kubectl::new(kache.kubeconfig()).spawn(&[
        "get",
        "configmaps",
        "-n",
        n,
        "-w",
        "--output-watch-events",
    ]);
    let is = |ty: &'static str, name: &'static str| {
        move |l: &str| event_of(l) == (ty.to_string(), name.to_string())
    };
    watch.wait_line(WATCH_TIMEOUT, "ADDED seed (initial list)", is("ADDED", "seed"));

    let direct = Kubectl::new(&c.admin_kubeconfig);
    direct
        .run(&["create", "configmap", "fresh", "-n", n, "--from-literal=a=1"])
        .ok();
    watch.wait_line(WATCH_TIMEOUT, "ADDED fresh", is("ADDED", "fresh"));
    direct
        .run(&["label", "configmap", "fresh", "-n", n, "touched=yes"])
        .ok();
    watch.wait_line(WATCH_TIMEOUT, "MODIFIED fresh", is("MODIFIED", "fresh"));
    direct.run(&["delete", "configmap", "fresh", "-n", n]).ok();
    watch.wait_line(WATCH_TIMEOUT, "DELETED fresh", is("DELETED", "fresh"));
    let lines = watch.lines().to_vec();
    assert_eq!(
        lines.iter().filter(|l| event_of(l).1 == "fresh").count(),
        3,
        "expected exactly ADDED, MODIFIED, DELETED for fresh: {lines:#?}"
    );
}

/// The write commands of the differential test, on configmap `name` in `ns`; returns
/// each command with what it printed.
fn write_scenario(k: &Kubectl, ns: &str, name: &str, new_namespace: &str) -> Vec<(String, Output)> {
    let cm = |data: &str| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels: {{app: demo}}\ndata: {data}\n"
        )
    };
    let ssa = |data: &str| {
        format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}-ssa\n  namespace: {ns}\ndata: {data}\n")
    };
    let mut out = Vec::new();
    let mut step = |label: &str, k: Kubectl, args: &[&str]| {
        let o = k.run(args);
        out.push((label.to_string(), o));
    };
    step(
        "apply (create)",
        k.clone().stdin(cm("{a: '1'}")),
        &["apply", "-f", "-"],
    );
    step(
        "apply (configure)",
        k.clone().stdin(cm("{a: '2', b: '1'}")),
        &["apply", "-f", "-"],
    );
    step(
        "apply (unchanged)",
        k.clone().stdin(cm("{a: '2', b: '1'}")),
        &["apply", "-f", "-"],
    );
    step(
        "apply --server-side (create)",
        k.clone().stdin(ssa("{s: '1'}")),
        &["apply", "--server-side", "-f", "-"],
    );
    step(
        "apply --server-side (update)",
        k.clone().stdin(ssa("{s: '2'}")),
        &["apply", "--server-side", "-f", "-"],
    );
    step(
        "apply --server-side (conflict with another manager)",
        k.clone().stdin(ssa("{s: '3'}")),
        &["apply", "--server-side", "--field-manager", "intruder", "-f", "-"],
    );
    step(
        "patch merge",
        k.clone(),
        &[
            "patch",
            "configmap",
            name,
            "-n",
            ns,
            "--type",
            "merge",
            "-p",
            r#"{"data":{"c":"3"}}"#,
        ],
    );
    step(
        "patch json",
        k.clone(),
        &[
            "patch",
            "configmap",
            name,
            "-n",
            ns,
            "--type",
            "json",
            "-p",
            r#"[{"op":"add","path":"/data/d","value":"4"}]"#,
        ],
    );
    step(
        "patch strategic",
        k.clone(),
        &[
            "patch",
            "configmap",
            name,
            "-n",
            ns,
            "-p",
            r#"{"metadata":{"labels":{"p":"q"}}}"#,
        ],
    );
    step(
        "label",
        k.clone(),
        &["label", "configmap", name, "-n", ns, "tier=backend"],
    );
    step(
        "label (exists)",
        k.clone(),
        &["label", "configmap", name, "-n", ns, "tier=frontend"],
    );
    step(
        "annotate",
        k.clone(),
        &["annotate", "configmap", name, "-n", ns, "note=hello"],
    );
    step(
        "get -o json",
        k.clone(),
        &["get", "configmap", name, "-n", ns, "-o", "json"],
    );
    step(
        "get ssa -o json",
        k.clone(),
        &["get", "configmap", &format!("{name}-ssa"), "-n", ns, "-o", "json"],
    );
    step(
        "delete",
        k.clone(),
        &["delete", "configmap", &format!("{name}-ssa"), "-n", ns],
    );
    step(
        "delete (gone)",
        k.clone(),
        &["delete", "configmap", &format!("{name}-ssa"), "-n", ns],
    );
    step(
        "create namespace",
        k.clone(),
        &["create", "namespace", new_namespace],
    );
    step(
        "create namespace (exists)",
        k.clone(),
        &["create", "namespace", new_namespace],
    );
    out
}

#[test]
fn kubectl_writes_through_kache_match_direct_writes_and_are_visible_both_ways() {
    let c = cluster();
    let ns = TestNamespace::create("kubectl-write");
    let n = ns.name();
    let kache = Kache::start(&c.admin_kubeconfig);
    let (ns_via, ns_direct) = (unique_name("via-kache"), unique_name("direct"));
    let _cleanup = (TestNamespace::adopt(&ns_via), TestNamespace::adopt(&ns_direct));

    // Warm discovery caches (one per path): discovery is not what this test is about.
    let (via_cache, direct_cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let via_kubectl = Kubectl::new(kache.kubeconfig()).cache_dir(via_cache.path());
    let direct_kubectl = Kubectl::new(&c.admin_kubeconfig).cache_dir(direct_cache.path());
    let via = write_scenario(&via_kubectl, n, "via-kache", &ns_via);
    let direct = write_scenario(&direct_kubectl, n, "direct", &ns_direct);

    for ((label, v), (_, d)) in via.iter().zip(&direct) {
        assert_eq!(
            v.code(),
            d.code(),
            "{label}: exit codes differ\nthrough kache: {v:?}\ndirect: {d:?}"
        );
        let norm = |s: &str, name: &str, nsname: &str| s.replace(nsname, "NS").replace(name, "NAME");
        if label.starts_with("get") {
            let (mut vo, mut dobj) = (v.json(), d.json());
            let suffix = if label.contains("ssa") { "-ssa" } else { "" };
            normalize_object(&mut vo, &format!("via-kache{suffix}"));
            normalize_object(&mut dobj, &format!("direct{suffix}"));
            assert_eq!(vo, dobj, "{label}: the resulting objects differ");
        } else {
            assert_eq!(
                norm(&v.stdout, "via-kache", &ns_via),
                norm(&d.stdout, "direct", &ns_direct),
                "{label}: stdout differs"
            );
            assert_eq!(
                norm(&v.stderr, "via-kache", &ns_via),
                norm(&d.stderr, "direct", &ns_direct),
                "{label}: stderr differs"
            );
        }
    }
    // The commands above succeeded or failed as kubectl should (checked on the direct side).
    let codes: Vec<(&str, i32)> = direct.iter().map(|(l, o)| (l.as_str(), o.code())).collect();
    for (label, code) in &codes {
        let should_fail = label.contains("conflict") || label.contains("gone") || label.contains("exists");
        assert_eq!(
            *code != 0,
            should_fail,
            "direct {label} exit code {code}: {codes:?}"
        );
    }

    // Writes through kache are visible directly, and the other way round.
    let admin = direct_kubectl;
    let proxied = via_kubectl;
    let jp = |k: &Kubectl, name: &str, path: &str| {
        k.run(&[
            "get",
            "configmap",
            name,
            "-n",
            n,
            "-o",
            &format!("jsonpath={path}"),
        ])
        .ok()
        .stdout
    };
    assert_eq!(
        jp(
            &admin,
            "via-kache",
            "{.data.c}/{.metadata.labels.tier}/{.metadata.annotations.note}"
        ),
        "3/backend/hello"
    );
    assert_eq!(
        jp(
            &proxied,
            "direct",
            "{.data.c}/{.metadata.labels.tier}/{.metadata.annotations.note}"
        ),
        "3/backend/hello"
    );
    admin
        .run(&["label", "configmap", "via-kache", "-n", n, "seen-directly=yes"])
        .ok();
    assert_eq!(
        jp(&proxied, "via-kache", "{.metadata.labels.seen-directly}"),
        "yes"
    );
    proxied
        .run(&[
            "annotate",
            "configmap",
            "direct",
            "-n",
            n,
            "seen-through-kache=yes",
        ])
        .ok();
    assert_eq!(
        jp(&admin, "direct", "{.metadata.annotations.seen-through-kache}"),
        "yes"
    );
    admin.run(&["get", "namespace", &ns_via]).ok();
    proxied.run(&["get", "namespace", &ns_direct]).ok();
    let gone = admin.run(&["get", "configmap", "via-kache-ssa", "-n", n]);
    assert!(
        !gone.success() && gone.stderr.contains("NotFound"),
        "deleted through kache, still there: {gone:?}"
    );
    proxied.run(&["delete", "configmap", "direct", "-n", n]).ok();
    let gone = admin.run(&["get", "configmap", "direct", "-n", n]);
    assert!(
        !gone.success() && gone.stderr.contains("NotFound"),
        "deleted through kache, still there: {gone:?}"
    );
}

#[test]
fn kubectl_discovery_commands_through_kache_match_direct() {
    let c = cluster();
    let kache = Kache::start(&c.admin_kubeconfig);
    for args in [
        vec!["api-resources"],
        vec!["api-resources", "--namespaced=true", "-o", "wide"],
        vec!["api-resources", "--api-group", "apps"],
        vec!["api-versions"],
        vec!["explain", "pods"],
        vec!["explain", "configmaps.data"],
        vec!["explain", "deployments.spec.strategy", "--recursive"],
    ] {
        let via = kubectl(kache.kubeconfig(), &args);
        let direct = kubectl(&c.admin_kubeconfig, &args).ok();
        assert!(
            direct.stdout.lines().count() > 3,
            "{args:?}: direct printed little: {}",
            direct.stdout
        );
        assert_same(&format!("{args:?}"), &via, &direct, str::to_string);
    }
}

#[test]
fn kubectl_auth_can_i_through_kache_answers_for_kaches_identity() {
    let c = cluster();
    let ns = TestNamespace::create("kubectl-cani");
    let n = ns.name();
    let questions: Vec<Vec<&str>> = vec![
        vec!["list", "pods"],
        vec!["create", "configmaps", "-n", n],
        vec!["delete", "namespaces"],
        vec!["get", "secrets", "-n", "kube-system"],
        vec!["watch", "configmaps", "--all-namespaces"],
        vec!["patch", "deployments.apps", "-n", n],
        vec!["get", "/version"],
        vec!["get", "/api"],
        vec!["create", "selfsubjectaccessreviews.authorization.k8s.io"],
    ];
    let mut answers = Vec::new();
    for (who, upstream) in [("admin", &c.admin_kubeconfig), ("alice", &c.alice_kubeconfig)] {
        let kache = Kache::start(upstream);
        // Warm discovery caches (one per path) keep these many runs quick.
        let (via_cache, direct_cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let via_kubectl = Kubectl::new(kache.kubeconfig()).cache_dir(via_cache.path());
        let direct_kubectl = Kubectl::new(upstream).cache_dir(direct_cache.path());
        for q in &questions {
            let args: Vec<&str> = ["auth", "can-i"]
                .iter()
                .copied()
                .chain(q.iter().copied())
                .collect();
            let via = via_kubectl.run(&args);
            let direct = direct_kubectl.run(&args);
            assert!(
                direct.code() == 0 || direct.code() == 1,
                "direct {who} {args:?}: {direct:?}"
            );
            assert_same(&format!("{who}: {args:?}"), &via, &direct, |s| {
                s.trim().to_string()
            });
            answers.push((who, q.clone(), direct.stdout.trim().to_string()));
        }
        let args = ["auth", "can-i", "--list", "-n", n];
        let via = via_kubectl.run(&args);
        let direct = direct_kubectl.run(&args).ok();
        assert_same(&format!("{who}: {args:?}"), &via, &direct, str::to_string);
    }
    // The identities really differ, so equal answers above mean kache used the right one.
    let answer = |who: &str, verb: &str| {
        answers
            .iter()
            .find(|(w, q, _)| *w == who && q[0] == verb && q[1] == "pods")
            .map(|(_, _, a)| a.clone())
    };
    assert_eq!(answer("admin", "list").as_deref(), Some("yes"));
    assert_eq!(answer("alice", "list").as_deref(), Some("no"));
}

#[test]
fn kubectl_get_raw_through_kache_matches_direct() {
    let c = cluster();
    let kache = Kache::start(&c.admin_kubeconfig);
    for path in ["/api/v1/namespaces/default", "/version", "/api", "/apis/apps/v1"] {
        let args = ["get", "--raw", path];
        let via = kubectl(kache.kubeconfig(), &args).ok().json();
        let direct = kubectl(&c.admin_kubeconfig, &args).ok().json();
        assert_eq!(via, direct, "{path}: bodies differ");
    }
    let args = [
        "get",
        "--raw",
        "/api/v1/namespaces/default/configmaps/no-such-thing",
    ];
    let via = kubectl(kache.kubeconfig(), &args);
    let direct = kubectl(&c.admin_kubeconfig, &args);
    assert!(!direct.success());
    assert_eq!(via.code(), direct.code());
    assert_eq!(via.stderr.trim(), direct.stderr.trim(), "errors differ");
}
