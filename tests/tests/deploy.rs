//! The manifests under deploy/ against the real API server: each is accepted
//! by a server-side dry run; the shared-mode config in its ConfigMap is a
//! valid kache config that agrees with the Deployment's mounts and ports; the
//! shipped ClusterRoles, applied for real, grant kache's service account what
//! it needs and nothing that writes; and kache started with that config and
//! that account's token serves users as themselves without one refusal from
//! the API server to kache itself.

#![allow(clippy::unwrap_used)] // test helpers, not only #[test] fns (STYLE.md)

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kache_config::{
    AuthorizationMode, Config, FileConfig, ForwardMode, Mode, ModeName, ServeArgs, TlsConfig,
};
use kache_tests::{
    cluster, kubeconfig_with_server, kubectl, poll_until, unique_name, workspace_root, Kache, Kubectl,
    TestNamespace,
};
// serde through k8s-openapi's re-export: this crate does not depend on it directly.
use k8s_openapi::serde::Deserialize;
use serde_json::{json, Value};

/// The shared-mode manifests, relative to the workspace root.
const SHARED: &str = "deploy/shared/kache.yaml";
const IMPERSONATE: &str = "deploy/shared/impersonate.yaml";
/// The local-mode manifest.
const LOCAL: &str = "deploy/kubernetes.yaml";
/// Where every pod finds the cluster CA (beside its service-account token).
const SERVICE_ACCOUNT_CA: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";
/// How long the API server's RBAC authorizer may take to see new bindings.
const RBAC_PROPAGATION: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------- manifests ----

/// Every YAML file under deploy/, sorted.
fn manifest_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(&workspace_root().join("deploy"), &mut files);
    files.sort();
    for expected in [SHARED, IMPERSONATE, LOCAL] {
        assert!(
            files.contains(&workspace_root().join(expected)),
            "{expected} is missing from {files:?}"
        );
    }
    files
}

/// The documents of a YAML stream, as JSON values (empty documents left out).
fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| {
            let doc = serde_yaml::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()));
            serde_json::to_value(doc).unwrap()
        })
        .filter(|doc| !doc.is_null())
        .collect()
}

fn shipped(relative: &str) -> Vec<Value> {
    documents(&workspace_root().join(relative))
}

/// The one document of this kind and name.
#[track_caller]
fn object<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    let found: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {kind} {name}, found {}",
        found.len()
    );
    found[0]
}

/// kind/namespace/name of a manifest document or an object the server returned.
fn identity(doc: &Value) -> String {
    format!(
        "{}/{}/{}",
        doc["kind"].as_str().unwrap_or_default(),
        doc["metadata"]["namespace"].as_str().unwrap_or_default(),
        doc["metadata"]["name"].as_str().unwrap_or_default()
    )
}

/// Documents as one YAML stream, for `kubectl -f -`.
fn yaml_stream(docs: &[Value]) -> String {
    docs.iter()
        .map(|d| serde_yaml::to_string(d).unwrap())
        .collect::<Vec<_>>()
        .join("---\n")
}

/// Creates a namespace unless it exists, and checks it accepts objects.
/// Left in place afterwards: without a namespace controller (the test API
/// server runs none) a deleted namespace would stay `Terminating`.
fn ensure_namespace(name: &str) {
    let admin = &cluster().admin_kubeconfig;
    let get = || {
        kubectl(
            admin,
            &["get", "namespace", name, "-o", "json", "--ignore-not-found"],
        )
        .ok()
    };
    if get().stdout.trim().is_empty() {
        let created = kubectl(admin, &["create", "namespace", name]);
        assert!(
            created.success() || created.stderr.contains("AlreadyExists"),
            "cannot create namespace {name}: {}",
            created.stderr
        );
    }
    let ns = get().json();
    assert_eq!(
        ns["status"]["phase"], "Active",
        "namespace {name} exists but is not usable: {ns}"
    );
}

// --------------------------------------------------------------- dry run ----

#[test]
fn every_manifest_under_deploy_passes_a_server_side_dry_run() {
    let c = cluster();
    // The manifests' objects live in namespace kache: a dry run of them needs
    // it to exist (a dry-run Namespace is not there for the next object).
    ensure_namespace("kache");
    let api_versions = kubectl(&c.admin_kubeconfig, &["api-versions"]).ok().stdout;
    let serves_policy_v1 = api_versions.lines().any(|l| l.trim() == "policy/v1");
    let tmp = tempfile::tempdir().unwrap();
    for file in manifest_files() {
        let mut docs = documents(&file);
        assert!(!docs.is_empty(), "{} has no objects", file.display());
        // PodDisruptionBudget is policy/v1 since Kubernetes 1.21 and
        // policy/v1beta1 is gone since 1.25, so the manifests ship policy/v1;
        // the test API server (1.20) only knows v1beta1, whose schema is the
        // same for what we use. Only that apiVersion is rewritten, loudly.
        let mut rewritten = false;
        if !serves_policy_v1 {
            for doc in docs
                .iter_mut()
                .filter(|d| d["kind"] == "PodDisruptionBudget" && d["apiVersion"] == "policy/v1")
            {
                doc["apiVersion"] = json!("policy/v1beta1");
                rewritten = true;
            }
        }
        let path = if rewritten {
            eprintln!(
                "{}: the API server lacks policy/v1; dry-running its PodDisruptionBudget as policy/v1beta1",
                file.display()
            );
            assert!(
                api_versions.lines().any(|l| l.trim() == "policy/v1beta1"),
                "the API server serves neither policy/v1 nor policy/v1beta1"
            );
            let copy = tmp.path().join(file.file_name().unwrap());
            std::fs::write(&copy, yaml_stream(&docs)).unwrap();
            copy
        } else {
            file.clone()
        };
        let out = kubectl(
            &c.admin_kubeconfig,
            &[
                "apply",
                "--dry-run=server",
                "-o",
                "json",
                "-f",
                path.to_str().unwrap(),
            ],
        );
        assert!(
            out.success(),
            "{} is refused by the API server:\n{}",
            file.display(),
            out.stderr
        );
        let answer = out.json();
        let returned: BTreeSet<String> = match answer["kind"].as_str() {
            Some("List") => answer["items"].as_array().unwrap().iter().map(identity).collect(),
            _ => BTreeSet::from([identity(&answer)]),
        };
        let sent: BTreeSet<String> = docs.iter().map(identity).collect();
        assert_eq!(
            returned,
            sent,
            "{}: the dry run did not return every object",
            file.display()
        );
    }
}

// ---------------------------------------------------------- shared config ----

/// The container named kache of a Deployment.
fn kache_container(deployment: &Value) -> &Value {
    deployment["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "kache")
        .expect("a container named kache")
}

/// Where the kache container mounts the volume whose source satisfies `source`.
#[track_caller]
fn mount_path(deployment: &Value, what: &str, source: impl Fn(&Value) -> bool) -> String {
    let volume = deployment["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| source(v))
        .unwrap_or_else(|| panic!("the Deployment has no volume of {what}"));
    kache_container(deployment)["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == volume["name"])
        .unwrap_or_else(|| panic!("the kache container does not mount the volume of {what}"))["mountPath"]
        .as_str()
        .unwrap()
        .trim_end_matches('/')
        .to_string()
}

/// The containerPort named `name` of the kache container.
#[track_caller]
fn container_port(deployment: &Value, name: &str) -> u16 {
    kache_container(deployment)["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no container port named {name}"))["containerPort"]
        .as_u64()
        .unwrap() as u16
}

/// The config file of the shared manifest's ConfigMap, as text.
fn shipped_shared_config() -> String {
    let docs = shipped(SHARED);
    object(&docs, "ConfigMap", "kache")["data"]["kache.yaml"]
        .as_str()
        .expect("ConfigMap kache has a data key kache.yaml")
        .to_string()
}

#[test]
fn shared_config_map_is_a_valid_config_that_matches_the_deployment() {
    let docs = shipped(SHARED);
    let text = shipped_shared_config();
    let file: FileConfig =
        serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("the ConfigMap's kache.yaml: {e}\n{text}"));
    let deployment = object(&docs, "Deployment", "kache");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = kache_container(deployment);

    // The Deployment runs `kache serve` on exactly this file.
    let config_dir = mount_path(deployment, "ConfigMap kache", |v| {
        v["configMap"]["name"] == "kache"
    });
    assert_eq!(
        container["args"],
        json!(["serve", format!("--config={config_dir}/kache.yaml")]),
        "flags would override the ConfigMap"
    );
    assert_eq!(file.mode, Some(ModeName::Shared));
    assert_eq!(file.kubeconfig, None, "in a pod kache uses its service account");

    // Its files are where the Deployment puts them.
    let tls_dir = mount_path(deployment, "Secret kache-tls", |v| {
        v["secret"]["secretName"] == "kache-tls"
    });
    assert_eq!(file.tls.cert, Some(PathBuf::from(format!("{tls_dir}/tls.crt"))));
    assert_eq!(file.tls.key, Some(PathBuf::from(format!("{tls_dir}/tls.key"))));
    assert_eq!(
        file.shared.client_ca_file.as_deref(),
        Some(Path::new(SERVICE_ACCOUNT_CA))
    );
    assert_ne!(
        pod["automountServiceAccountToken"], false,
        "kache's identity and client CA come from the mounted service account"
    );
    let state_dir = mount_path(deployment, "an emptyDir", |v| v.get("emptyDir").is_some());
    assert_eq!(file.state_dir, Some(PathBuf::from(state_dir)));

    // Its ports are the ones the container, the probes and the Service name.
    let listen: SocketAddr = file.listen.as_deref().unwrap().parse().unwrap();
    let admin: SocketAddr = file.admin_listen.as_deref().unwrap().parse().unwrap();
    assert!(listen.ip().is_unspecified() && admin.ip().is_unspecified());
    assert_eq!(listen.port(), container_port(deployment, "https"));
    assert_eq!(admin.port(), container_port(deployment, "metrics"));
    assert_eq!(
        container["readinessProbe"]["httpGet"],
        json!({"path": "/readyz", "port": "metrics"})
    );
    assert_eq!(
        container["livenessProbe"]["httpGet"],
        json!({"path": "/livez", "port": "metrics"})
    );
    let service = object(&docs, "Service", "kache");
    let ports = service["spec"]["ports"].as_array().unwrap();
    assert!(ports.contains(&json!({"name": "https", "port": 443, "targetPort": "https"})));
    assert!(ports.iter().any(|p| p["targetPort"] == "metrics"));

    // And kache accepts it: merged with no flags, with stand-in files at its paths.
    let tmp = tempfile::tempdir().unwrap();
    let stand_in = |name: &str| {
        let path = tmp.path().join(name);
        std::fs::write(&path, "stand-in").unwrap();
        path
    };
    let mut local = file.clone();
    local.tls.cert = Some(stand_in("tls.crt"));
    local.tls.key = Some(stand_in("tls.key"));
    local.shared.client_ca_file = Some(stand_in("ca.crt"));
    local.state_dir = Some(tmp.path().join("state"));
    let config = Config::merge(&ServeArgs::default(), local).unwrap_or_else(|e| panic!("{e}"));
    let Mode::Shared(shared) = &config.mode else {
        panic!("not shared mode: {:?}", config.mode)
    };
    assert_eq!(shared.forward, ForwardMode::Impersonate);
    assert_eq!(shared.authorization, AuthorizationMode::Rbac);
    assert!(!shared.allow_anonymous);
    assert!(matches!(config.listener.tls, Some(TlsConfig::Files { .. })));
    assert_eq!(config.listener.addr, listen);
    assert_eq!(config.admin.addr, admin);
    // The memory budget leaves room below the container's limit.
    let limit = &container["resources"]["limits"]["memory"];
    assert_eq!(limit, "3Gi", "update the budget check with the limit");
    assert!(config.cache.memory_budget_bytes <= (3usize << 30) / 2);
}

#[test]
fn shared_deployment_is_redundant_and_locked_down() {
    let docs = shipped(SHARED);
    let deployment = object(&docs, "Deployment", "kache");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = kache_container(deployment);
    assert!(deployment["spec"]["replicas"].as_u64().unwrap() >= 2);
    assert_eq!(pod["serviceAccountName"], "kache");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let sc = &container["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert!(sc["capabilities"].get("add").is_none());
    assert!(container["resources"]["requests"].is_object());
    let pdb = object(&docs, "PodDisruptionBudget", "kache");
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    assert_eq!(&deployment["spec"]["selector"]["matchLabels"], labels);
    assert_eq!(&pdb["spec"]["selector"]["matchLabels"], labels);
    assert_eq!(&object(&docs, "Service", "kache")["spec"]["selector"], labels);
}

// ------------------------------------------------------------------- RBAC ----

/// The shipped ClusterRoles and ClusterRoleBindings, applied for real under
/// unique names and bound to the service account `kache` of namespace `ns`
/// (which need not exist), so that concurrent test runs do not share them.
/// Deleted on drop, also when the test fails.
struct RbacGuard {
    suffix: String,
    namespace: String,
    applied: Vec<(String, String)>,
}

impl RbacGuard {
    fn new(namespace: &str) -> RbacGuard {
        RbacGuard {
            suffix: unique_name("t"),
            namespace: namespace.to_string(),
            applied: Vec::new(),
        }
    }

    /// The service account's user name.
    fn user(&self) -> String {
        format!("system:serviceaccount:{}:kache", self.namespace)
    }

    /// The groups the API server gives that service account.
    fn groups(&self) -> Vec<String> {
        vec![
            "system:serviceaccounts".into(),
            format!("system:serviceaccounts:{}", self.namespace),
            "system:authenticated".into(),
        ]
    }

    /// Applies the RBAC objects of a shipped manifest (kinds: `ClusterRole`,
    /// `ClusterRoleBinding`, or both).
    fn apply(&mut self, manifest: &str, kinds: &[&str]) {
        let mut docs: Vec<Value> = shipped(manifest)
            .into_iter()
            .filter(|d| kinds.contains(&d["kind"].as_str().unwrap_or_default()))
            .collect();
        assert!(!docs.is_empty(), "{manifest} has no {kinds:?}");
        for doc in &mut docs {
            let name = format!("{}-{}", doc["metadata"]["name"].as_str().unwrap(), self.suffix);
            doc["metadata"]["name"] = json!(name);
            if doc["kind"] == "ClusterRoleBinding" {
                let role = format!("{}-{}", doc["roleRef"]["name"].as_str().unwrap(), self.suffix);
                doc["roleRef"]["name"] = json!(role);
                for subject in doc["subjects"].as_array_mut().unwrap() {
                    assert_eq!(subject["kind"], "ServiceAccount");
                    assert_eq!(subject["name"], "kache");
                    subject["namespace"] = json!(self.namespace);
                }
            }
            self.applied
                .push((doc["kind"].as_str().unwrap().to_string(), name));
        }
        Kubectl::new(&cluster().admin_kubeconfig)
            .stdin(yaml_stream(&docs))
            .run(&["apply", "-f", "-"])
            .ok();
    }
}

impl Drop for RbacGuard {
    fn drop(&mut self) {
        for (kind, name) in self.applied.iter().rev() {
            let out = kubectl(
                &cluster().admin_kubeconfig,
                &[
                    "delete",
                    &kind.to_ascii_lowercase(),
                    name,
                    "--ignore-not-found",
                    "--wait=false",
                ],
            );
            if !out.success() {
                eprintln!("cleanup: deleting {kind} {name} failed: {}", out.stderr);
            }
        }
    }
}

/// `kubectl auth can-i ARGS --as=USER`: true for yes, false for no.
#[track_caller]
fn can_i(user: &str, args: &str) -> bool {
    let mut argv = vec!["auth", "can-i"];
    argv.extend(args.split_whitespace());
    let as_user = format!("--as={user}");
    argv.push(&as_user);
    let out = kubectl(&cluster().admin_kubeconfig, &argv);
    match out.stdout.trim() {
        "yes" if out.success() => true,
        answer if answer.starts_with("no") && out.code() == 1 => false,
        _ => panic!("kubectl auth can-i {args}: {out:?}"),
    }
}

/// A SubjectAccessReview for `impersonate` of `resource[/subresource]` in
/// `group`. (`kubectl auth can-i` cannot ask this: it resolves resources
/// through discovery, and users, groups, userextras and uids are not served.)
fn may_impersonate(rbac: &RbacGuard, group: &str, resource: &str, subresource: &str, name: &str) -> bool {
    let review = json!({
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": rbac.user(),
            "groups": rbac.groups(),
            "resourceAttributes": {
                "group": group, "resource": resource, "subresource": subresource,
                "name": name, "verb": "impersonate",
            },
        },
    });
    let out = Kubectl::new(&cluster().admin_kubeconfig)
        .stdin(review.to_string())
        .run(&["create", "-f", "-", "-o", "json"])
        .ok();
    out.json()["status"]["allowed"] == true
}

/// The impersonations kache makes: a user, their groups, a service account,
/// their extras (one subresource per key) and their UID.
const IMPERSONATIONS: &[(&str, &str, &str, &str)] = &[
    ("", "users", "", "alice"),
    ("", "groups", "", "system:masters"),
    ("", "serviceaccounts", "", "default"),
    ("authentication.k8s.io", "userextras", "scopes", "view"),
    (
        "authentication.k8s.io",
        "userextras",
        "authentication.kubernetes.io/pod-name",
        "web-0",
    ),
    (
        "authentication.k8s.io",
        "uids",
        "",
        "0d5ce4d4-1b6f-4e8c-9a7e-3c1f54b0a6c2",
    ),
];

/// What kache's account must be allowed (`kubectl auth can-i` arguments).
const NEEDED: &[&str] = &[
    "create tokenreviews.authentication.k8s.io",
    "create subjectaccessreviews.authorization.k8s.io",
    "list clusterroles.rbac.authorization.k8s.io",
    "watch clusterroles.rbac.authorization.k8s.io",
    "get clusterrolebindings.rbac.authorization.k8s.io",
    "list clusterrolebindings.rbac.authorization.k8s.io",
    "watch clusterrolebindings.rbac.authorization.k8s.io",
    "list roles.rbac.authorization.k8s.io --all-namespaces",
    "watch rolebindings.rbac.authorization.k8s.io --all-namespaces",
    "get customresourcedefinitions.apiextensions.k8s.io",
    "watch customresourcedefinitions.apiextensions.k8s.io",
    "list apiservices.apiregistration.k8s.io",
    "watch apiservices.apiregistration.k8s.io",
    "get /api",
    "get /apis",
    "get /apis/apps/v1",
    "get /openapi/v2",
    "get /openapi/v3/apis/apps/v1",
    "get /version",
    // The cluster's identity, for the snapshots' stamp.
    "get namespaces/kube-system",
    // The cache: list + watch of whatever clients read, cluster-wide.
    "list pods --all-namespaces",
    "watch pods --all-namespaces",
    "list configmaps --all-namespaces",
    "watch secrets --all-namespaces",
    "list deployments.apps --all-namespaces",
    "list nodes",
    "watch namespaces",
];

/// What kache's account must not be allowed: no writes but the two reviews,
/// no `get` on arbitrary objects (which would include exec and node proxy).
const REFUSED: &[&str] = &[
    "create pods",
    "delete configmaps",
    "deletecollection secrets --all-namespaces",
    "update deployments.apps",
    "patch nodes",
    "create namespaces",
    "patch clusterroles.rbac.authorization.k8s.io",
    "create clusterrolebindings.rbac.authorization.k8s.io",
    "escalate clusterroles.rbac.authorization.k8s.io",
    "bind clusterroles.rbac.authorization.k8s.io",
    "delete customresourcedefinitions.apiextensions.k8s.io",
    "update apiservices.apiregistration.k8s.io",
    "get secrets --all-namespaces",
    "get namespaces/default",
    "get pods --subresource=exec",
    "create pods --subresource=exec",
    "get nodes --subresource=proxy",
    "create serviceaccounts --subresource=token",
    "create certificatesigningrequests.certificates.k8s.io",
    "post /apis",
];

#[test]
fn shipped_cluster_roles_grant_what_kache_needs_and_nothing_that_writes() {
    // Statically: every rule reads, except the two reviews and impersonation.
    let reviews = [
        ("authentication.k8s.io", "tokenreviews"),
        ("authorization.k8s.io", "subjectaccessreviews"),
    ];
    for manifest in [SHARED, IMPERSONATE] {
        for role in shipped(manifest).iter().filter(|d| d["kind"] == "ClusterRole") {
            for rule in role["rules"].as_array().unwrap() {
                let list = |k: &str| -> Vec<&str> {
                    rule[k]
                        .as_array()
                        .map(|a| a.iter().map(|v| v.as_str().unwrap()).collect())
                        .unwrap_or_default()
                };
                let (verbs, groups, resources) = (list("verbs"), list("apiGroups"), list("resources"));
                let reads = verbs.iter().all(|v| ["get", "list", "watch"].contains(v));
                let review = verbs == ["create"]
                    && groups.len() == 1
                    && resources.len() == 1
                    && reviews.contains(&(groups[0], resources[0]));
                let impersonation = verbs == ["impersonate"];
                assert!(
                    reads || review || impersonation,
                    "{manifest}: ClusterRole {} has a rule that writes: {rule}",
                    role["metadata"]["name"]
                );
                assert!(
                    !(verbs.contains(&"get") && resources.contains(&"*")),
                    "{manifest}: `get` on every resource includes pods/exec and nodes/proxy: {rule}"
                );
            }
        }
    }

    // For real: the API server's own RBAC authorizer decides.
    let mut rbac = RbacGuard::new(&unique_name("kache-rbac"));
    rbac.apply(SHARED, &["ClusterRole", "ClusterRoleBinding"]);
    rbac.apply(IMPERSONATE, &["ClusterRole"]);
    let user = rbac.user();
    poll_until(RBAC_PROPAGATION, "the new bindings to take effect", || {
        can_i(&user, NEEDED[0]).then_some(())
    });
    for args in NEEDED {
        assert!(can_i(&user, args), "kache's account may not: {args}");
    }
    for args in REFUSED {
        assert!(!can_i(&user, args), "kache's account may: {args}");
    }
    // Without impersonate.yaml's binding (passthrough for tokens only), no impersonation.
    for (group, resource, sub, name) in IMPERSONATIONS {
        assert!(
            !may_impersonate(&rbac, group, resource, sub, name),
            "impersonate {group}/{resource}/{sub} allowed without kache-impersonate's binding"
        );
    }
    rbac.apply(IMPERSONATE, &["ClusterRoleBinding"]);
    poll_until(RBAC_PROPAGATION, "the impersonate binding to take effect", || {
        may_impersonate(&rbac, "", "users", "", "alice").then_some(())
    });
    for (group, resource, sub, name) in IMPERSONATIONS {
        assert!(
            may_impersonate(&rbac, group, resource, sub, name),
            "kache's account may not impersonate {group}/{resource}/{sub} {name}"
        );
    }
    for args in REFUSED {
        assert!(
            !can_i(&user, args),
            "with impersonation, kache's account may: {args}"
        );
    }
}

// ------------------------------------------------------------ end to end ----

/// The audit log's finished requests after byte `offset`, as JSON.
fn audit_since(offset: u64) -> Vec<Value> {
    let bytes = std::fs::read(&cluster().audit_log).unwrap();
    let tail = bytes.get(offset as usize..).unwrap_or_default();
    tail.split(|b| *b == b'\n')
        .filter_map(|l| serde_json::from_slice::<Value>(l).ok())
        .filter(|e| e["stage"] == "ResponseComplete")
        .collect()
}

/// `kubectl get --raw PATH` with a kubeconfig; the output either way.
fn get_raw(kubeconfig: &Path, path: &str) -> kache_tests::Output {
    kubectl(kubeconfig, &["get", "--raw", path])
}

#[test]
fn kache_with_the_shipped_config_and_rights_serves_users_as_themselves() {
    let c = cluster();
    let ns = TestNamespace::create("kache-deploy");
    let n = ns.name();
    let admin = &c.admin_kubeconfig;

    // kache's service account, with exactly the shipped rights, and a token
    // of it as kache would find it mounted in its pod.
    kubectl(admin, &["-n", n, "create", "serviceaccount", "kache"]).ok();
    let mut rbac = RbacGuard::new(n);
    rbac.apply(SHARED, &["ClusterRole", "ClusterRoleBinding"]);
    rbac.apply(IMPERSONATE, &["ClusterRole", "ClusterRoleBinding"]);
    let user = rbac.user();
    poll_until(RBAC_PROPAGATION, "the new bindings to take effect", || {
        // The impersonate binding was applied last: once it counts, all do.
        (can_i(&user, NEEDED[0]) && may_impersonate(&rbac, "", "users", "", "alice")).then_some(())
    });
    let token = kubectl(admin, &["-n", n, "create", "token", "kache", "--duration=1h"])
        .ok()
        .stdout
        .trim()
        .to_string();
    let tmp = tempfile::tempdir().unwrap();
    let sa_kubeconfig = tmp.path().join("kache-sa.kubeconfig");
    let kubeconfig = json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "test", "cluster": {"server": c.apiserver_url, "certificate-authority": c.ca_cert}}],
        "users": [{"name": "kache", "user": {"token": token}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "kache"}}],
        "current-context": "test",
    });
    std::fs::write(&sa_kubeconfig, serde_yaml::to_string(&kubeconfig).unwrap()).unwrap();

    // The shipped config, its files replaced by the test cluster's: the API
    // server's certificate (SAN 127.0.0.1) to serve, the cluster CA for clients.
    let mut config: serde_yaml::Value = serde_yaml::from_str(&shipped_shared_config()).unwrap();
    let pki = c.dir.join("pki");
    config["tls"]["cert"] = pki.join("apiserver.crt").to_str().unwrap().into();
    config["tls"]["key"] = pki.join("apiserver.key").to_str().unwrap().into();
    config["shared"]["clientCaFile"] = c.ca_cert.to_str().unwrap().into();
    config["stateDir"] = tmp.path().join("state").to_str().unwrap().into();
    let config_file = tmp.path().join("kache.yaml");
    std::fs::write(&config_file, serde_yaml::to_string(&config).unwrap()).unwrap();

    // alice may read configmaps in this namespace only.
    kubectl(
        admin,
        &[
            "-n",
            n,
            "create",
            "role",
            "read-configmaps",
            "--verb=get,list,watch",
            "--resource=configmaps",
        ],
    )
    .ok();
    kubectl(
        admin,
        &[
            "-n",
            n,
            "create",
            "rolebinding",
            "alice-reads",
            "--role=read-configmaps",
            "--user=alice",
        ],
    )
    .ok();
    kubectl(
        admin,
        &[
            "-n",
            n,
            "create",
            "configmap",
            "hello",
            "--from-literal=greeting=hi",
        ],
    )
    .ok();

    let audit_offset = std::fs::metadata(&c.audit_log).map(|m| m.len()).unwrap_or(0);
    let kache = Kache::start_with_args(&sa_kubeconfig, &["--config", config_file.to_str().unwrap()]);
    let alice = tmp.path().join("alice-via-kache.kubeconfig");
    kubeconfig_with_server(&c.alice_kubeconfig, &format!("https://{}", kache.addr()), &alice);

    // alice's rv=0 list, answered from the cache kache's account keeps.
    let cached = format!("/api/v1/namespaces/{n}/configmaps?resourceVersion=0");
    let deadline = Instant::now() + Duration::from_secs(30);
    let served_from_memory = loop {
        let out = get_raw(&alice, &cached).ok();
        assert!(out.stdout.contains("\"hello\""), "{}", out.stdout);
        let hits: f64 = kache
            .metrics()
            .lines()
            .filter(|l| l.starts_with("kache_cache_hits_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        if hits > 0.0 || Instant::now() > deadline {
            break hits > 0.0;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    // Answers from memory are alice's: not another namespace's.
    let other = get_raw(
        &alice,
        "/api/v1/namespaces/kube-system/configmaps?resourceVersion=0",
    );
    assert!(
        !other.success() && other.stderr.contains("Forbidden"),
        "alice read kube-system through kache: {other:?}"
    );
    // Discovery from memory, and a consistent read forwarded as alice.
    get_raw(&alice, "/apis").ok();
    get_raw(&alice, &format!("/api/v1/namespaces/{n}/configmaps/hello")).ok();

    // The API server never refused kache's own account; it did the work.
    std::thread::sleep(Duration::from_millis(500)); // audit lines follow responses
    let events = audit_since(audit_offset);
    let own: Vec<&Value> = events
        .iter()
        .filter(|e| e["user"]["username"] == user.as_str() && e.get("impersonatedUser").is_none())
        .collect();
    let refused: Vec<String> = own
        .iter()
        .filter(|e| e["responseStatus"]["code"] == 403)
        .map(|e| format!("{} {}", e["verb"], e["requestURI"]))
        .collect();
    assert!(
        refused.is_empty(),
        "the API server refused kache's account: {refused:#?}"
    );
    assert!(
        served_from_memory,
        "alice's rv=0 list was never answered from memory"
    );
    for (verb, prefix) in [
        ("create", "/apis/authentication.k8s.io/v1/tokenreviews"),
        ("list", "/api/v1/configmaps?"),
        ("list", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"),
        ("list", "/apis/apiregistration.k8s.io/v1/apiservices"),
        ("list", "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings"),
    ] {
        assert!(
            own.iter().any(|e| e["verb"] == verb
                && e["requestURI"].as_str().unwrap_or_default().starts_with(prefix)
                && e["responseStatus"]["code"].as_u64().is_some_and(|c| c < 300)),
            "no successful {verb} {prefix} by kache's account; its requests: {:#?}",
            own.iter()
                .map(|e| format!(
                    "{} {} {}",
                    e["verb"], e["requestURI"], e["responseStatus"]["code"]
                ))
                .collect::<Vec<_>>()
        );
    }
    assert!(
        events.iter().any(|e| e["user"]["username"] == user.as_str()
            && e["impersonatedUser"]["username"] == "alice"
            && e["requestURI"] == format!("/api/v1/namespaces/{n}/configmaps/hello")
            && e["responseStatus"]["code"] == 200),
        "alice's consistent read did not reach the API server as alice, impersonated by kache"
    );
    drop(kache);
    drop(rbac);
}
