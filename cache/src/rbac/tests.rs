//! The RBAC evaluator against tables of rules, bindings and requests whose
//! answers are kube-apiserver v1.20's, and the reflector against a fake
//! upstream whose watch streams arrive in arbitrary chunks.

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::Bytes;
use futures::stream;
use http::Response;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::*;
use crate::upstream::{BoxFuture, ByteStream};

// ---------------------------------------------------------------------------
// Builders.

fn user(name: &str, groups: &[&str]) -> UserInfo {
    UserInfo {
        name: name.to_string(),
        groups: groups.iter().map(|g| g.to_string()).collect(),
        ..UserInfo::default()
    }
}

/// A resource request; `resource` may be `resource/subresource`.
fn request(verb: &str, group: &str, resource: &str, namespace: &str, name: &str) -> Attributes {
    let (resource, subresource) = resource.split_once('/').unwrap_or((resource, ""));
    Attributes {
        verb: verb.to_string(),
        resource_request: true,
        group: group.to_string(),
        version: "v1".to_string(),
        resource: resource.to_string(),
        subresource: subresource.to_string(),
        namespace: namespace.to_string(),
        name: name.to_string(),
        path: String::new(),
    }
}

fn non_resource(verb: &str, path: &str) -> Attributes {
    Attributes {
        verb: verb.to_string(),
        path: path.to_string(),
        ..Attributes::default()
    }
}

fn rule(verbs: &[&str], groups: &[&str], resources: &[&str]) -> Value {
    json!({"verbs": verbs, "apiGroups": groups, "resources": resources})
}

fn role(namespace: &str, name: &str, rules: Value) -> Value {
    json!({
        "kind": "Role", "apiVersion": "rbac.authorization.k8s.io/v1",
        "metadata": {"name": name, "namespace": namespace, "resourceVersion": "1"},
        "rules": rules,
    })
}

fn cluster_role(name: &str, rules: Value) -> Value {
    json!({
        "kind": "ClusterRole", "apiVersion": "rbac.authorization.k8s.io/v1",
        "metadata": {"name": name, "resourceVersion": "1"},
        "rules": rules,
    })
}

fn role_binding(namespace: &str, name: &str, role_kind: &str, role: &str, subjects: Value) -> Value {
    json!({
        "kind": "RoleBinding", "apiVersion": "rbac.authorization.k8s.io/v1",
        "metadata": {"name": name, "namespace": namespace, "resourceVersion": "1"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": role},
        "subjects": subjects,
    })
}

fn cluster_role_binding(name: &str, role_kind: &str, role: &str, subjects: Value) -> Value {
    json!({
        "kind": "ClusterRoleBinding", "apiVersion": "rbac.authorization.k8s.io/v1",
        "metadata": {"name": name, "resourceVersion": "1"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": role},
        "subjects": subjects,
    })
}

fn user_subject(name: &str) -> Value {
    json!([{"kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": name}])
}

fn group_subject(name: &str) -> Value {
    json!([{"kind": "Group", "apiGroup": "rbac.authorization.k8s.io", "name": name}])
}

// ---------------------------------------------------------------------------
// Rules.

#[test]
fn rules_match_verbs_groups_resources_names_and_urls_as_the_api_server_does() {
    let named = |names: &[&str]| json!({"verbs": ["get", "list"], "apiGroups": [""], "resources": ["pods"], "resourceNames": names});
    let urls = |verbs: &[&str], urls: &[&str]| json!({"verbs": verbs, "nonResourceURLs": urls});
    #[rustfmt::skip]
    let cases: Vec<(&str, Value, Attributes, bool)> = vec![
        ("verb * allows any verb", rule(&["*"], &[""], &["pods"]), request("delete", "", "pods", "", "x"), true),
        ("a listed verb allows it", rule(&["get", "list"], &[""], &["pods"]), request("list", "", "pods", "", ""), true),
        ("an unlisted verb is denied", rule(&["get"], &[""], &["pods"]), request("list", "", "pods", "", ""), false),
        ("verbs are case-sensitive", rule(&["GET"], &[""], &["pods"]), request("get", "", "pods", "", "x"), false),
        ("empty verbs match nothing", rule(&[], &["*"], &["*"]), request("get", "", "pods", "", "x"), false),
        ("apiGroup * allows apps", rule(&["get"], &["*"], &["deployments"]), request("get", "apps", "deployments", "", "x"), true),
        ("apiGroup * allows the core group", rule(&["get"], &["*"], &["pods"]), request("get", "", "pods", "", "x"), true),
        ("the core group does not cover apps", rule(&["get"], &[""], &["deployments"]), request("get", "apps", "deployments", "", "x"), false),
        ("apps does not cover the core group", rule(&["get"], &["apps"], &["pods"]), request("get", "", "pods", "", "x"), false),
        ("empty apiGroups match nothing", rule(&["*"], &[], &["*"]), request("get", "", "pods", "", "x"), false),
        ("resource * allows any resource", rule(&["get"], &[""], &["*"]), request("get", "", "secrets", "", "x"), true),
        ("resource * allows any subresource", rule(&["get"], &[""], &["*"]), request("get", "", "pods/log", "", "x"), true),
        ("empty resources match nothing", rule(&["*"], &["*"], &[]), request("get", "", "pods", "", "x"), false),
        ("*/scale allows deployments/scale", rule(&["get"], &["apps"], &["*/scale"]), request("get", "apps", "deployments/scale", "", "x"), true),
        ("*/scale does not allow deployments", rule(&["get"], &["apps"], &["*/scale"]), request("get", "apps", "deployments", "", "x"), false),
        ("*/scale does not allow deployments/status", rule(&["get"], &["apps"], &["*/scale"]), request("get", "apps", "deployments/status", "", "x"), false),
        ("pods/log allows pods/log", rule(&["get"], &[""], &["pods/log"]), request("get", "", "pods/log", "ns", "x"), true),
        ("pods/log does not allow pods", rule(&["get"], &[""], &["pods/log"]), request("get", "", "pods", "ns", "x"), false),
        ("pods/log does not allow pods/exec", rule(&["get"], &[""], &["pods/log"]), request("get", "", "pods/exec", "ns", "x"), false),
        ("pods does not allow pods/log", rule(&["get"], &[""], &["pods"]), request("get", "", "pods/log", "ns", "x"), false),
        ("pods/* is not a wildcard", rule(&["get"], &[""], &["pods/*"]), request("get", "", "pods/log", "ns", "x"), false),
        ("podsx/log is not pods/log", rule(&["get"], &[""], &["podsx/log"]), request("get", "", "pods/log", "ns", "x"), false),
        ("resourceNames allow a get by that name", named(&["web"]), request("get", "", "pods", "ns", "web"), true),
        ("resourceNames deny another name", named(&["web"]), request("get", "", "pods", "ns", "db"), false),
        ("resourceNames deny a list without a name", named(&["web"]), request("list", "", "pods", "ns", ""), false),
        ("empty resourceNames allow any name", named(&[]), request("get", "", "pods", "ns", "db"), true),
        ("a resource rule does not allow non-resource URLs", rule(&["*"], &["*"], &["*"]), non_resource("get", "/healthz"), false),
        ("a non-resource rule does not allow resources", urls(&["*"], &["*"]), request("get", "", "pods", "", ""), false),
        ("URL * allows any path", urls(&["get"], &["*"]), non_resource("get", "/anything"), true),
        ("an exact URL allows that path", urls(&["get"], &["/healthz"]), non_resource("get", "/healthz"), true),
        ("an exact URL is not a prefix", urls(&["get"], &["/healthz"]), non_resource("get", "/healthz/etcd"), false),
        ("a URL with * is a prefix", urls(&["get"], &["/healthz/*"]), non_resource("get", "/healthz/etcd"), true),
        ("a URL prefix needs its slash", urls(&["get"], &["/healthz/*"]), non_resource("get", "/healthz"), false),
        ("a URL prefix need not end at a slash", urls(&["get"], &["/api*"]), non_resource("get", "/apis/apps"), true),
        ("all trailing stars go, as TrimRight does", urls(&["get"], &["/logs**"]), non_resource("get", "/logs/x"), true),
        ("a URL rule checks the verb", urls(&["get"], &["*"]), non_resource("post", "/healthz"), false),
        ("empty URLs match nothing", urls(&["*"], &[]), non_resource("get", "/healthz"), false),
    ];
    for (description, rule, attributes, expected) in cases {
        let rbac = Rbac::from_objects([
            cluster_role("subject-of-test", json!([rule])),
            cluster_role_binding(
                "subject-of-test",
                "ClusterRole",
                "subject-of-test",
                user_subject("u"),
            ),
        ]);
        assert_eq!(
            rbac.allows(&user("u", &[]), &attributes),
            expected,
            "{description}"
        );
    }
}

// ---------------------------------------------------------------------------
// Bindings and subjects.
fn cluster() -> Rbac {
    Rbac::from_objects([
        cluster_role(
            "pod-reader",
            json!([rule(&["get", "list", "watch"], &[""], &["pods"])]),
        ),
        cluster_role("secret-reader", json!([rule(&["get"], &[""], &["secrets"])])),
        cluster_role("node-lister", json!([rule(&["list"], &[""], &["nodes"])])),
        cluster_role(
            "health",
            json!([{"verbs": ["get"], "nonResourceURLs": ["/healthz", "/metrics/*"]}]),
        ),
        role(
            "dev",
            "configmap-editor",
            json!([rule(&["*"], &[""], &["configmaps"])]),
        ),
        role(
            "prod",
            "configmap-editor",
            json!([rule(&["get"], &[""], &["configmaps"])]),
        ),
        role("prod", "prod-only", json!([rule(&["*"], &["*"], &["*"])])),
        role_binding(
            "dev",
            "alice-configmaps",
            "Role",
            "configmap-editor",
            user_subject("alice"),
        ),
        role_binding(
            "dev",
            "alice-pods",
            "ClusterRole",
            "pod-reader",
            user_subject("alice"),
        ),
        role_binding(
            "dev",
            "builder",
            "ClusterRole",
            "secret-reader",
            json!([{"kind": "ServiceAccount", "name": "builder"}]),
        ),
        role_binding(
            "dev",
            "deployer",
            "ClusterRole",
            "pod-reader",
            json!([{"kind": "ServiceAccount", "name": "deployer", "namespace": "ci"}]),
        ),
        role_binding(
            "dev",
            "missing-role",
            "Role",
            "does-not-exist",
            user_subject("carol"),
        ),
        role_binding(
            "dev",
            "role-of-another-namespace",
            "Role",
            "prod-only",
            user_subject("dave"),
        ),
        role_binding("dev", "team", "ClusterRole", "pod-reader", group_subject("team")),
        cluster_role_binding("erin-nodes", "ClusterRole", "node-lister", user_subject("erin")),
        cluster_role_binding(
            "health",
            "ClusterRole",
            "health",
            group_subject("system:authenticated"),
        ),
        cluster_role_binding("to-a-role", "Role", "configmap-editor", user_subject("frank")),
        cluster_role_binding(
            "robot-without-namespace",
            "ClusterRole",
            "node-lister",
            json!([{"kind": "ServiceAccount", "name": "robot"}]),
        ),
        cluster_role_binding(
            "robot",
            "ClusterRole",
            "node-lister",
            json!([{"kind": "ServiceAccount", "name": "robot", "namespace": "kube-system"}]),
        ),
        cluster_role_binding(
            "lowercase-kind",
            "ClusterRole",
            "node-lister",
            json!([{"kind": "user", "name": "gina"}]),
        ),
        cluster_role_binding(
            "missing-cluster-role",
            "ClusterRole",
            "nope",
            user_subject("henry"),
        ),
    ])
}

#[test]
fn bindings_grant_what_the_api_server_grants_and_nothing_more() {
    let rbac = cluster();
    let alice = || user("alice", &["system:authenticated"]);
    let anyone = || user("anyone", &["system:authenticated"]);
    let sa = |namespace: &str, name: &str| user(&format!("system:serviceaccount:{namespace}:{name}"), &[]);
    #[rustfmt::skip]
    let cases: Vec<(&str, UserInfo, Attributes, bool)> = vec![
        ("a RoleBinding grants its Role in its namespace", alice(), request("get", "", "configmaps", "dev", "x"), true),
        ("a Role's verb * covers delete", alice(), request("delete", "", "configmaps", "dev", "x"), true),
        ("a RoleBinding's Role does not reach another namespace", alice(), request("delete", "", "configmaps", "prod", "x"), false),
        ("a RoleBinding grants a ClusterRole in its namespace", alice(), request("list", "", "pods", "dev", ""), true),
        ("a RoleBinding's ClusterRole does not reach another namespace", alice(), request("list", "", "pods", "prod", ""), false),
        ("a namespace-only user cannot list cluster-wide", alice(), request("list", "", "pods", "", ""), false),
        ("a namespace-only user cannot watch cluster-wide", alice(), request("watch", "", "pods", "", ""), false),
        ("a namespace-only user gets no cluster-scoped resources", alice(), request("list", "", "nodes", "", ""), false),
        ("a ClusterRoleBinding grants cluster-wide", user("erin", &[]), request("list", "", "nodes", "", ""), true),
        ("a ClusterRoleBinding grants in every namespace", user("erin", &[]), request("list", "", "nodes", "dev", ""), true),
        ("a ClusterRoleBinding grants only its role's verbs", user("erin", &[]), request("get", "", "nodes", "", "n1"), false),
        ("user names are case-sensitive", user("Alice", &[]), request("list", "", "pods", "dev", ""), false),
        ("a bare ServiceAccount subject is in the binding's namespace", sa("dev", "builder"), request("get", "", "secrets", "dev", "t"), true),
        ("that ServiceAccount's grant stays in the binding's namespace", sa("dev", "builder"), request("get", "", "secrets", "prod", "t"), false),
        ("an account of another namespace does not match a bare subject", sa("prod", "builder"), request("get", "", "secrets", "dev", "t"), false),
        ("a ServiceAccount subject with a namespace matches that account", sa("ci", "deployer"), request("list", "", "pods", "dev", ""), true),
        ("a ServiceAccount subject with a namespace ignores the binding's", sa("dev", "deployer"), request("list", "", "pods", "dev", ""), false),
        ("a ClusterRoleBinding's ServiceAccount with a namespace matches", sa("kube-system", "robot"), request("list", "", "nodes", "", ""), true),
        ("a ClusterRoleBinding's bare ServiceAccount matches nobody", sa("default", "robot"), request("list", "", "nodes", "", ""), false),
        ("a ServiceAccount name must match whole", sa("kube-system", "robot2"), request("list", "", "nodes", "", ""), false),
        ("a Group subject matches members", user("zed", &["team"]), request("list", "", "pods", "dev", ""), true),
        ("a Group subject does not match others", user("zed", &["other"]), request("list", "", "pods", "dev", ""), false),
        ("a Group subject does not match by user name", user("team", &[]), request("list", "", "pods", "dev", ""), false),
        ("system:authenticated gets /healthz", anyone(), non_resource("get", "/healthz"), true),
        ("system:authenticated gets under /metrics/", anyone(), non_resource("get", "/metrics/cpu"), true),
        ("/metrics/* does not cover /metrics", anyone(), non_resource("get", "/metrics"), false),
        ("the URL grant is for get only", anyone(), non_resource("post", "/healthz"), false),
        ("without the group there is no URL grant", user("anyone", &[]), non_resource("get", "/healthz"), false),
        ("system:masters may do anything", user("root", &["system:masters"]), request("delete", "", "nodes", "", "n1"), true),
        ("system:masters may get any URL", user("root", &["system:masters"]), non_resource("get", "/debug"), true),
        ("a missing Role grants nothing", user("carol", &[]), request("get", "", "pods", "dev", "x"), false),
        ("a Role is looked up in the binding's namespace", user("dave", &[]), request("get", "", "pods", "dev", "x"), false),
        ("nor does it grant in the Role's own namespace", user("dave", &[]), request("get", "", "pods", "prod", "x"), false),
        ("a ClusterRoleBinding cannot grant a Role", user("frank", &[]), request("get", "", "configmaps", "dev", "x"), false),
        ("an unknown subject kind matches nobody", user("gina", &[]), request("list", "", "nodes", "", ""), false),
        ("a missing ClusterRole grants nothing", user("henry", &[]), request("get", "", "pods", "dev", "x"), false),
        ("a stranger gets nothing", user("mallory", &[]), request("get", "", "pods", "dev", "x"), false),
    ];
    for (description, user, attributes, expected) in cases {
        assert_eq!(rbac.allows(&user, &attributes), expected, "{description}");
        // Asked again, from the memo.
        assert_eq!(
            rbac.allows(&user, &attributes),
            expected,
            "{description} (memoized)"
        );
    }
}

#[test]
fn aggregated_cluster_roles_grant_only_their_stored_rules() {
    let aggregated = |name: &str, rules: Value| {
        let mut role = cluster_role(name, rules);
        role["aggregationRule"] = json!({"clusterRoleSelectors": [{"matchLabels": {"aggregate": "true"}}]});
        role
    };
    let mut labelled = cluster_role("labelled", json!([rule(&["get"], &[""], &["secrets"])]));
    labelled["metadata"]["labels"] = json!({"aggregate": "true"});
    let rbac = Rbac::from_objects([
        aggregated("unfilled", Value::Null),
        aggregated("filled", json!([rule(&["list"], &[""], &["pods"])])),
        labelled,
        cluster_role_binding("unfilled", "ClusterRole", "unfilled", user_subject("u")),
        cluster_role_binding("filled", "ClusterRole", "filled", user_subject("v")),
    ]);
    let cases = [
        (
            "an unfilled aggregated role grants nothing",
            "u",
            request("get", "", "secrets", "ns", "s"),
            false,
        ),
        (
            "a filled one grants its stored rules",
            "v",
            request("list", "", "pods", "ns", ""),
            true,
        ),
        (
            "but not those of the roles it selects",
            "v",
            request("get", "", "secrets", "ns", "s"),
            false,
        ),
    ];
    for (description, name, attributes, expected) in cases {
        assert_eq!(
            rbac.allows(&user(name, &[]), &attributes),
            expected,
            "{description}"
        );
    }
}

#[test]
fn group_order_and_duplicates_do_not_change_the_answer() {
    let rbac = cluster();
    let attributes = request("list", "", "pods", "dev", "");
    for groups in [
        &["team", "a"][..],
        &["a", "team"],
        &["team", "team"],
        &["z", "team", "a"],
    ] {
        assert!(rbac.allows(&user("zed", groups), &attributes), "{groups:?}");
    }
    assert!(!rbac.allows(&user("zed", &["a", "z"]), &attributes));
}

#[test]
fn more_identities_than_the_memo_holds_are_all_answered_right() {
    let rbac = cluster();
    let attributes = request("list", "", "pods", "dev", "");
    for i in 0..MEMO_CAPACITY + 50 {
        let groups: &[&str] = if i % 2 == 0 { &["team"] } else { &["other"] };
        assert_eq!(
            rbac.allows(&user(&format!("user-{i}"), groups), &attributes),
            i % 2 == 0,
            "{i}"
        );
    }
    assert!(rbac.inner.memo.read().expect("lock").entries.len() <= MEMO_CAPACITY);
}

// ---------------------------------------------------------------------------
// Changes.

#[test]
fn deleting_a_role_binding_revokes_at_once_and_bumps_the_generation() {
    let rbac = cluster();
    let alice = user("alice", &[]);
    let attributes = request("list", "", "pods", "dev", "");
    assert!(rbac.allows(&alice, &attributes));
    let before = rbac.generation();
    rbac.apply(
        "DELETED",
        role_binding(
            "dev",
            "alice-pods",
            "ClusterRole",
            "pod-reader",
            user_subject("alice"),
        ),
    );
    assert!(rbac.generation() > before);
    assert!(!rbac.allows(&alice, &attributes));
    // Other grants of the same user are untouched.
    assert!(rbac.allows(&alice, &request("get", "", "configmaps", "dev", "x")));
}

#[test]
fn a_modified_role_narrows_what_it_grants() {
    let rbac = cluster();
    let alice = user("alice", &[]);
    assert!(rbac.allows(&alice, &request("list", "", "pods", "dev", "")));
    assert!(rbac.allows(&alice, &request("delete", "", "configmaps", "dev", "x")));
    let before = rbac.generation();
    rbac.apply(
        "MODIFIED",
        cluster_role("pod-reader", json!([rule(&["get"], &[""], &["pods"])])),
    );
    rbac.apply(
        "MODIFIED",
        role(
            "dev",
            "configmap-editor",
            json!([rule(&["get"], &[""], &["configmaps"])]),
        ),
    );
    assert!(rbac.generation() > before);
    let cases = [
        (
            "the cluster role no longer lists",
            request("list", "", "pods", "dev", ""),
            false,
        ),
        (
            "the cluster role still gets",
            request("get", "", "pods", "dev", "x"),
            true,
        ),
        (
            "the role no longer deletes",
            request("delete", "", "configmaps", "dev", "x"),
            false,
        ),
        (
            "the role still gets",
            request("get", "", "configmaps", "dev", "x"),
            true,
        ),
    ];
    for (description, attributes, expected) in cases {
        assert_eq!(rbac.allows(&alice, &attributes), expected, "{description}");
    }
}

#[test]
fn a_deleted_then_re_added_binding_grants_again() {
    let rbac = cluster();
    let erin = user("erin", &[]);
    let attributes = request("list", "", "nodes", "", "");
    let binding = cluster_role_binding("erin-nodes", "ClusterRole", "node-lister", user_subject("erin"));
    assert!(rbac.allows(&erin, &attributes));
    rbac.apply("DELETED", binding.clone());
    assert!(!rbac.allows(&erin, &attributes));
    let deleted = rbac.generation();
    rbac.apply("ADDED", binding);
    assert!(rbac.generation() > deleted);
    assert!(rbac.allows(&erin, &attributes));
}

#[test]
fn a_role_added_after_its_binding_grants_once_it_arrives() {
    let rbac = cluster();
    let carol = user("carol", &[]);
    let attributes = request("get", "", "pods", "dev", "x");
    assert!(!rbac.allows(&carol, &attributes));
    rbac.apply(
        "ADDED",
        role("dev", "does-not-exist", json!([rule(&["get"], &[""], &["pods"])])),
    );
    assert!(rbac.allows(&carol, &attributes));
}

#[test]
fn an_unreadable_modification_removes_the_object_rather_than_keeping_its_old_grant() {
    let rbac = cluster();
    let alice = user("alice", &[]);
    let attributes = request("list", "", "pods", "dev", "");
    assert!(rbac.allows(&alice, &attributes));
    rbac.apply("MODIFIED", cluster_role("pod-reader", json!([{"verbs": "list"}])));
    assert!(!rbac.allows(&alice, &attributes));
}

#[test]
fn events_of_other_kinds_change_nothing() {
    let rbac = cluster();
    let before = rbac.generation();
    rbac.apply(
        "ADDED",
        json!({"kind": "Pod", "metadata": {"name": "p", "namespace": "dev"}}),
    );
    rbac.apply("ADDED", json!({"metadata": {"name": "no-kind"}}));
    assert_eq!(rbac.generation(), before);
    assert!(rbac.allows(&user("alice", &[]), &request("list", "", "pods", "dev", "")));
}

#[test]
fn an_unsynced_view_denies_all_but_system_masters() {
    let rbac = Rbac::new(Arc::new(Fake::new(Vec::new())));
    rbac.apply(
        "ADDED",
        cluster_role("all", json!([rule(&["*"], &["*"], &["*"])])),
    );
    rbac.apply(
        "ADDED",
        cluster_role_binding("all", "ClusterRole", "all", user_subject("u")),
    );
    assert!(!rbac.is_synced());
    assert!(!rbac.allows(&user("u", &[]), &request("get", "", "pods", "dev", "x")));
    assert!(rbac.allows(
        &user("root", &["system:masters"]),
        &request("get", "", "pods", "dev", "x")
    ));
}

#[test]
fn attributes_from_a_request_are_the_api_servers() {
    let cases = [
        (
            "GET",
            "/api/v1/namespaces/dev/pods/web/log",
            request("get", "", "pods/log", "dev", "web"),
        ),
        (
            "GET",
            "/apis/apps/v1/deployments",
            request("list", "apps", "deployments", "", ""),
        ),
    ];
    for (method, path, mut expected) in cases {
        let info = RequestInfo::parse(method, path, None).expect("parses");
        expected.path = path.to_string();
        assert_eq!(Attributes::from_request(&info, path), expected, "{path}");
    }
    let info = RequestInfo::parse("GET", "/healthz/etc%64", None).expect("parses");
    assert_eq!(
        Attributes::from_request(&info, "/healthz/etc%64"),
        non_resource("get", "/healthz/etcd")
    );
}

// ---------------------------------------------------------------------------
// The reflectors, against a fake upstream.

/// One scripted answer to a WATCH request.
enum Watch {
    Status(u16),
    Body(Vec<Result<Bytes, FetchError>>),
}

/// Canned LIST answers per resource (the last repeats) and WATCH answers
/// the test hands out one at a time (a watch request waits for its answer).
struct Fake {
    lists: Mutex<HashMap<String, VecDeque<(u16, String)>>>,
    senders: HashMap<String, mpsc::UnboundedSender<Watch>>,
    receivers: HashMap<String, tokio::sync::Mutex<mpsc::UnboundedReceiver<Watch>>>,
    /// Every request's path and query.
    log: Mutex<Vec<String>>,
}

impl Fake {
    fn new(lists: Vec<(&str, Vec<(u16, String)>)>) -> Fake {
        let mut senders = HashMap::new();
        let mut receivers = HashMap::new();
        for kind in Kind::ALL {
            let (tx, rx) = mpsc::unbounded_channel();
            senders.insert(kind.resource().to_string(), tx);
            receivers.insert(kind.resource().to_string(), tokio::sync::Mutex::new(rx));
        }
        let lists = lists
            .into_iter()
            .map(|(resource, answers)| (resource.to_string(), answers.into()))
            .collect();
        Fake {
            lists: Mutex::new(lists),
            senders,
            receivers,
            log: Mutex::new(Vec::new()),
        }
    }

    fn answer_watch(&self, resource: &str, watch: Watch) {
        self.senders[resource].send(watch).expect("receiver alive");
    }

    fn requests(&self, resource: &str, watch: bool) -> Vec<String> {
        let collection = format!("{RBAC_PATH}/{resource}");
        self.log
            .lock()
            .expect("lock")
            .iter()
            .filter(|uri| uri.split('?').next() == Some(collection.as_str()))
            .filter(|uri| uri.contains("watch=true") == watch)
            .cloned()
            .collect()
    }
}

fn resource_of(request: &Request<()>) -> String {
    request
        .uri()
        .path()
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_string()
}

impl ApiClient for Fake {
    fn fetch(&self, request: Request<()>) -> BoxFuture<'_, Result<Response<Bytes>, FetchError>> {
        Box::pin(async move {
            assert_eq!(request.headers()[header::ACCEPT], "application/json");
            self.log.lock().expect("lock").push(request.uri().to_string());
            let mut lists = self.lists.lock().expect("lock");
            let answers = lists
                .get_mut(&resource_of(&request))
                .expect("a scripted resource");
            let (status, body) = if answers.len() > 1 {
                answers.pop_front().expect("not empty")
            } else {
                answers.front().cloned().expect("a scripted list")
            };
            let mut response = Response::new(Bytes::from(body));
            *response.status_mut() = StatusCode::from_u16(status).expect("status");
            Ok(response)
        })
    }

    fn stream(&self, request: Request<()>) -> BoxFuture<'_, Result<Response<ByteStream>, FetchError>> {
        Box::pin(async move {
            self.log.lock().expect("lock").push(request.uri().to_string());
            let mut receiver = self.receivers[&resource_of(&request)].lock().await;
            let Some(watch) = receiver.recv().await else {
                return std::future::pending().await;
            };
            Ok(match watch {
                Watch::Status(status) => {
                    let mut response = Response::new(Box::pin(stream::empty()) as ByteStream);
                    *response.status_mut() = StatusCode::from_u16(status).expect("status");
                    response
                }
                Watch::Body(chunks) => Response::new(Box::pin(stream::iter(chunks)) as ByteStream),
            })
        })
    }
}

fn list(kind: &str, resource_version: &str, items: &[Value]) -> String {
    // The API server leaves type meta out of built-in list items.
    let items: Vec<Value> = items
        .iter()
        .map(|item| {
            let mut item = item.clone();
            if let Some(object) = item.as_object_mut() {
                object.remove("kind");
                object.remove("apiVersion");
            }
            item
        })
        .collect();
    json!({"kind": format!("{kind}List"), "apiVersion": "rbac.authorization.k8s.io/v1",
           "metadata": {"resourceVersion": resource_version}, "items": items})
    .to_string()
}

fn with_version(mut object: Value, resource_version: &str) -> Value {
    object["metadata"]["resourceVersion"] = json!(resource_version);
    object
}

/// Watch event lines, cut every `size` bytes (so lines split anywhere).
fn chunks(events: &[Value], size: usize) -> Vec<Result<Bytes, FetchError>> {
    let text: String = events.iter().map(|e| format!("{e}\n")).collect();
    text.as_bytes()
        .chunks(size)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect()
}

async fn eventually(what: &str, condition: impl Fn() -> bool) {
    let wait = async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), wait)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting until {what}"));
}

#[tokio::test(start_paused = true)]
async fn the_reflectors_list_watch_resume_and_relist_on_410() {
    let reader = role("dev", "reader", json!([rule(&["get", "list"], &[""], &["pods"])]));
    let alice_binding = role_binding("dev", "alice", "Role", "reader", user_subject("alice"));
    let bob_binding = role_binding("dev", "bob", "Role", "reader", user_subject("bob"));
    let fake = Arc::new(Fake::new(vec![
        ("roles", vec![(200, list("Role", "10", &[reader]))]),
        ("clusterroles", vec![(200, list("ClusterRole", "10", &[]))]),
        (
            "clusterrolebindings",
            vec![(200, list("ClusterRoleBinding", "10", &[]))],
        ),
        (
            "rolebindings",
            vec![
                (200, list("RoleBinding", "10", &[])),
                (500, r#"{"kind":"Status","code":500}"#.to_string()),
                (
                    200,
                    list("RoleBinding", "30", &[alice_binding.clone(), bob_binding.clone()]),
                ),
            ],
        ),
    ]));
    let rbac = Rbac::new(fake.clone());
    let task = tokio::spawn(rbac.clone().run());
    let alice = user("alice", &[]);
    let bob = user("bob", &[]);
    let get_pods = request("get", "", "pods", "dev", "x");

    // Listed, and each resource watched from its list's version.
    eventually("synced", || rbac.is_synced()).await;
    assert!(!rbac.allows(&alice, &get_pods));
    eventually("rolebindings watched", || {
        fake.requests("rolebindings", true).len() == 1
    })
    .await;
    let first = &fake.requests("rolebindings", true)[0];
    for part in [
        "resourceVersion=10",
        "allowWatchBookmarks=true",
        "timeoutSeconds=",
    ] {
        assert!(first.contains(part), "{first}");
    }
    assert!(fake.requests("rolebindings", false)[0]
        .find("resourceVersion")
        .is_none());

    // An event and a bookmark, cut mid-line; then the watch ends and resumes
    // from the bookmark.
    fake.answer_watch(
        "rolebindings",
        Watch::Body(chunks(
            &[
                json!({"type": "ADDED", "object": with_version(alice_binding.clone(), "11")}),
                json!({"type": "BOOKMARK", "object": {"kind": "RoleBinding", "metadata": {"resourceVersion": "15"}}}),
            ],
            7,
        )),
    );
    eventually("alice allowed", || rbac.allows(&alice, &get_pods)).await;
    eventually("watch renewed", || fake.requests("rolebindings", true).len() == 2).await;
    assert!(fake.requests("rolebindings", true)[1].contains("resourceVersion=15"));
    assert_eq!(fake.requests("rolebindings", false).len(), 1);

    // ERROR 410: unsynced until relisted (the first relist fails).
    let generation = rbac.generation();
    fake.answer_watch(
        "rolebindings",
        Watch::Body(chunks(
            &[json!({"type": "ERROR", "object": {"kind": "Status", "status": "Failure", "reason": "Expired", "code": 410, "message": "too old resource version: 15 (20)"}})],
            5,
        )),
    );
    eventually("relist attempted", || {
        fake.requests("rolebindings", false).len() == 2
    })
    .await;
    assert!(!rbac.is_synced());
    assert!(!rbac.allows(&alice, &get_pods));
    eventually("relisted", || rbac.is_synced()).await;
    assert_eq!(fake.requests("rolebindings", false).len(), 3);
    assert!(rbac.generation() > generation);
    assert!(rbac.allows(&alice, &get_pods));
    assert!(rbac.allows(&bob, &get_pods));
    eventually("watched from the relist", || {
        fake.requests("rolebindings", true).len() == 3
    })
    .await;
    assert!(fake.requests("rolebindings", true)[2].contains("resourceVersion=30"));

    // A refused watch: unsynced while reconnecting, from the same version.
    fake.answer_watch("rolebindings", Watch::Status(500));
    eventually("reconnecting", || fake.requests("rolebindings", true).len() == 4).await;
    assert!(!rbac.is_synced());
    assert!(fake.requests("rolebindings", true)[3].contains("resourceVersion=30"));

    // Reconnected: a deletion arrives, then the connection breaks.
    let mut chunked = chunks(
        &[json!({"type": "DELETED", "object": with_version(bob_binding.clone(), "31")})],
        11,
    );
    chunked.push(Err(FetchError("connection reset".into())));
    fake.answer_watch("rolebindings", Watch::Body(chunked));
    eventually("bob revoked", || {
        !rbac.allows(&bob, &get_pods) && !rbac.is_synced()
    })
    .await;
    eventually("reconnecting again", || {
        fake.requests("rolebindings", true).len() == 5
    })
    .await;
    assert!(fake.requests("rolebindings", true)[4].contains("resourceVersion=31"));

    // A bookmark on the new watch: synced again, nothing else changed.
    let generation = rbac.generation();
    fake.answer_watch(
        "rolebindings",
        Watch::Body(chunks(
            &[json!({"type": "BOOKMARK", "object": {"kind": "RoleBinding", "metadata": {"resourceVersion": "40"}}})],
            3,
        )),
    );
    eventually("resumed after the bookmark", || {
        fake.requests("rolebindings", true).len() == 6
    })
    .await;
    assert!(fake.requests("rolebindings", true)[5].contains("resourceVersion=40"));
    assert!(rbac.is_synced());
    assert_eq!(rbac.generation(), generation);
    assert!(rbac.allows(&alice, &get_pods));
    assert!(!rbac.allows(&bob, &get_pods));
    for resource in ["roles", "clusterroles", "clusterrolebindings"] {
        assert_eq!(fake.requests(resource, false).len(), 1, "{resource}");
    }
    assert!(!task.is_finished());
    task.abort();
}

#[tokio::test(start_paused = true)]
async fn a_view_without_a_client_runs_forever_and_stays_synced() {
    let rbac = Rbac::from_objects([]);
    let ran = tokio::time::timeout(Duration::from_secs(3600), rbac.clone().run()).await;
    assert!(ran.is_err());
    assert!(rbac.is_synced());
}
