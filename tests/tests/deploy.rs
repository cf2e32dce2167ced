//! What deploy/ ships, against the real API server and the real binary:
//!
//! * the kustomizations (deploy/base, the overlays deploy/shared and
//!   deploy/local, the standalone deploy/sidecar) render with this kubectl's
//!   kustomize to exactly the objects of their files, in the form kustomize
//!   v2.0.3 (kubectl 1.20) reads too, and every rendering is accepted by a
//!   server-side dry run;
//! * each config file in a ConfigMap is a valid kache config that agrees with
//!   its Deployment's mounts, ports and probes; the pods are locked down; the
//!   NetworkPolicy admits the admin port from the monitoring namespace only;
//! * the shipped RBAC, applied for real, grants each service account what it
//!   needs and nothing that writes (or, for the sidecar, nothing beyond its
//!   jobs' namespace), as the API server's own authorizer decides;
//! * kache started with the shared config and that account's token serves
//!   users as themselves, and the sidecar's kache serves its runner, without
//!   one refusal from the API server to what they need;
//! * deploy/Dockerfile copies the binary cargo builds, and its default
//!   command line is one kache accepts; the CI examples under deploy/ci/ are
//!   valid YAML whose every `kache` command line kache accepts.

#![allow(clippy::unwrap_used)] // test helpers, not only #[test] fns (STYLE.md)

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kache_config::{
    AuthorizationMode, Config, FileConfig, ForwardMode, Mode, ModeName, ServeArgs, TlsConfig,
};
use kache_tests::{
    cluster, kache_bin, kubeconfig_with_server, kubectl, kubectl_bin, metric, poll_until, raw,
    run_with_timeout, unique_name, workspace_root, Kache, Kubectl, TestNamespace,
};
use serde_json::{json, Value};

/// The kustomizations, relative to the workspace root.
const BASE: &str = "deploy/base";
const SHARED: &str = "deploy/shared";
const LOCAL: &str = "deploy/local";
const SIDECAR: &str = "deploy/sidecar";
const KUSTOMIZATIONS: &[&str] = &[BASE, SHARED, LOCAL, SIDECAR];
/// The CI examples: YAML, but not Kubernetes objects.
const CI_EXAMPLES: &str = "deploy/ci";
const GITHUB_ACTIONS: &str = "deploy/ci/github-actions.yaml";
const GITLAB_CI: &str = "deploy/ci/gitlab-ci.yml";
const DOCKERFILE: &str = "deploy/Dockerfile";
/// Where every pod finds the cluster CA (beside its service-account token).
const SERVICE_ACCOUNT_CA: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";
/// How long the API server's RBAC authorizer may take to see new bindings.
const RBAC_PROPAGATION: Duration = Duration::from_secs(20);
/// The fields of a kustomization that kustomize v2.0.3 (kubectl 1.20's)
/// reads as newer ones do: no `components`, no `patches`.
const KUSTOMIZE_V2_FIELDS: &[&str] = &[
    "apiVersion",
    "kind",
    "bases",
    "resources",
    "patchesStrategicMerge",
];

// -------------------------------------------------------------------- YAML ----

/// The documents of a YAML stream, as JSON values (empty and null
/// documents left out).
fn yaml_documents(text: &str, what: &str) -> Vec<Value> {
    serde_saphyr::from_multiple(text).unwrap_or_else(|e| panic!("{what} is not valid YAML: {e}"))
}

fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    yaml_documents(&text, &path.display().to_string())
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
        .map(|d| serde_saphyr::to_string(d).unwrap())
        .collect::<Vec<_>>()
        .join("---\n")
}

/// Every YAML file under `dir`, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
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
    walk(dir, &mut files);
    files.sort();
    files
}

// --------------------------------------------------------------- kustomize ----

/// A kustomization.yaml, checked to use only what kustomize v2.0.3 reads
/// the same way as newer ones: directories only under `bases`, files only
/// under `resources` and `patchesStrategicMerge`.
struct Kustomization {
    dir: PathBuf,
    bases: Vec<PathBuf>,
    resources: Vec<PathBuf>,
    patches: Vec<PathBuf>,
}

fn kustomization(dir: &Path) -> Kustomization {
    let file = dir.join("kustomization.yaml");
    let docs = documents(&file);
    assert_eq!(docs.len(), 1, "{}: one document", file.display());
    let k = &docs[0];
    for field in k.as_object().unwrap().keys() {
        assert!(
            KUSTOMIZE_V2_FIELDS.contains(&field.as_str()),
            "{}: `{field}` is unknown to kustomize v2.0.3 (kubectl 1.20); use only {KUSTOMIZE_V2_FIELDS:?}",
            file.display()
        );
    }
    let list = |field: &str, dirs: bool| -> Vec<PathBuf> {
        k[field]
            .as_array()
            .map(|a| a.as_slice())
            .unwrap_or_default()
            .iter()
            .map(|entry| {
                let entry = entry.as_str().unwrap();
                let path = dir.join(entry);
                if dirs {
                    assert!(
                        path.join("kustomization.yaml").is_file(),
                        "{}: bases entry {entry} is not a kustomization directory",
                        file.display()
                    );
                } else {
                    assert!(
                        path.is_file(),
                        "{}: {field} entry {entry} is not a file (kustomize v2.0.3 takes directories only under bases)",
                        file.display()
                    );
                }
                path
            })
            .collect()
    };
    Kustomization {
        dir: dir.to_path_buf(),
        bases: list("bases", true),
        resources: list("resources", false),
        patches: list("patchesStrategicMerge", false),
    }
}

/// RFC 7386 merge of `patch` into `target`. For maps and scalars it is what
/// a strategic merge patch does; patches with lists (which strategic merge
/// may merge by key) are refused.
fn merge_patch(target: &mut Value, patch: &Value, what: &str) {
    match patch {
        Value::Object(fields) => {
            if !target.is_object() {
                *target = json!({});
            }
            for (key, value) in fields {
                if value.is_null() {
                    target.as_object_mut().unwrap().remove(key);
                } else {
                    merge_patch(&mut target[key.as_str()], value, what);
                }
            }
        }
        Value::Array(_) => panic!("{what}: a patch with a list; this test models map patches only"),
        scalar => *target = scalar.clone(),
    }
}

/// The objects a kustomization stands for, from its files: its bases'
/// objects and its resources, patched by its patches. Nothing else: the
/// kustomizations add no names, labels or namespaces.
fn objects_of_files(dir: &Path) -> BTreeMap<String, Value> {
    let k = kustomization(dir);
    let mut objects = BTreeMap::new();
    for base in &k.bases {
        objects.extend(objects_of_files(base));
    }
    for file in &k.resources {
        for doc in documents(file) {
            let id = identity(&doc);
            assert!(
                objects.insert(id.clone(), doc).is_none(),
                "{id} defined twice (again in {})",
                file.display()
            );
        }
    }
    for file in &k.patches {
        for patch in documents(file) {
            let id = identity(&patch);
            let what = format!("{} ({id})", file.display());
            let target = objects
                .get_mut(&id)
                .unwrap_or_else(|| panic!("{what} patches nothing of {}", k.dir.display()));
            merge_patch(target, &patch, &what);
        }
    }
    objects
}

/// `kubectl kustomize DIR`, as documents (kustomize's deprecation warnings,
/// on stderr, are left aside).
fn render(dir: &str) -> Vec<Value> {
    let out = run_with_timeout(
        {
            let mut cmd = Command::new(kubectl_bin());
            cmd.args(["kustomize", workspace_root().join(dir).to_str().unwrap()])
                .stdin(Stdio::null());
            cmd
        },
        None,
        Duration::from_secs(60),
    )
    .unwrap_or_else(|e| panic!("kubectl kustomize {dir}: {e}"));
    assert!(out.success(), "kubectl kustomize {dir} failed: {}", out.stderr);
    yaml_documents(&out.stdout, &format!("kubectl kustomize {dir}"))
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

#[test]
fn every_kustomization_renders_exactly_its_files_in_a_form_kustomize_v2_reads() {
    // Every YAML file under deploy/ is a kustomization's, or a CI example.
    let mut used = BTreeSet::new();
    for dir in KUSTOMIZATIONS {
        let k = kustomization(&workspace_root().join(dir));
        used.insert(k.dir.join("kustomization.yaml"));
        used.extend(k.resources.into_iter().chain(k.patches));
    }
    for file in yaml_files(&workspace_root().join("deploy")) {
        assert!(
            used.contains(&file) || file.starts_with(workspace_root().join(CI_EXAMPLES)),
            "{} is in no kustomization: no test renders it",
            file.display()
        );
    }

    for dir in KUSTOMIZATIONS {
        let expected = objects_of_files(&workspace_root().join(dir));
        let rendered = render(dir);
        let by_id: BTreeMap<String, Value> = rendered.iter().map(|d| (identity(d), d.clone())).collect();
        assert_eq!(by_id.len(), rendered.len(), "{dir}: an object rendered twice");
        assert_eq!(
            by_id.keys().collect::<Vec<_>>(),
            expected.keys().collect::<Vec<_>>(),
            "{dir}: kubectl kustomize renders other objects than its files hold"
        );
        for (id, object) in &expected {
            assert_eq!(
                &by_id[id], object,
                "{dir}: {id} rendered differently from its file"
            );
        }
    }
}

#[test]
fn every_kustomization_passes_a_server_side_dry_run() {
    let c = cluster();
    let api_versions = kubectl(&c.admin_kubeconfig, &["api-versions"]).ok().stdout;
    let serves_policy_v1 = api_versions.lines().any(|l| l.trim() == "policy/v1");
    let tmp = tempfile::tempdir().unwrap();
    for dir in KUSTOMIZATIONS {
        let mut docs = render(dir);
        assert!(!docs.is_empty(), "{dir} renders no objects");
        // The objects live in the rendered namespaces: a dry run of them
        // needs those to exist (a dry-run Namespace is not there for the
        // next object).
        for ns in docs.iter().filter(|d| d["kind"] == "Namespace") {
            ensure_namespace(ns["metadata"]["name"].as_str().unwrap());
        }
        // PodDisruptionBudget is policy/v1 since Kubernetes 1.21 and
        // policy/v1beta1 is gone since 1.25, so the manifests ship policy/v1;
        // the test API server (1.20) only knows v1beta1, whose schema is the
        // same for what we use. Only that apiVersion is rewritten, loudly.
        if !serves_policy_v1 {
            for doc in docs
                .iter_mut()
                .filter(|d| d["kind"] == "PodDisruptionBudget" && d["apiVersion"] == "policy/v1")
            {
                eprintln!("{dir}: the API server lacks policy/v1; dry-running its PodDisruptionBudget as policy/v1beta1");
                assert!(
                    api_versions.lines().any(|l| l.trim() == "policy/v1beta1"),
                    "the API server serves neither policy/v1 nor policy/v1beta1"
                );
                doc["apiVersion"] = json!("policy/v1beta1");
            }
        }
        let file = tmp.path().join(format!("{}.yaml", dir.replace('/', "-")));
        std::fs::write(&file, yaml_stream(&docs)).unwrap();
        let out = kubectl(
            &c.admin_kubeconfig,
            &[
                "apply",
                "--dry-run=server",
                "-o",
                "json",
                "-f",
                file.to_str().unwrap(),
            ],
        );
        assert!(
            out.success(),
            "{dir} is refused by the API server:\n{}",
            out.stderr
        );
        let answer = out.json();
        let returned: BTreeSet<String> = match answer["kind"].as_str() {
            Some("List") => answer["items"].as_array().unwrap().iter().map(identity).collect(),
            _ => BTreeSet::from([identity(&answer)]),
        };
        let sent: BTreeSet<String> = docs.iter().map(identity).collect();
        assert_eq!(returned, sent, "{dir}: the dry run did not return every object");
    }
}

// ------------------------------------------------------------------- pods ----

/// The pod spec of a Deployment.
fn pod_spec(deployment: &Value) -> &Value {
    &deployment["spec"]["template"]["spec"]
}

/// The container `name` of a Deployment.
#[track_caller]
fn container<'a>(deployment: &'a Value, name: &str) -> &'a Value {
    pod_spec(deployment)["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container named {name}"))
}

/// Where `container` finds the volume whose source satisfies `source`.
#[track_caller]
fn mount_path(
    deployment: &Value,
    container_name: &str,
    what: &str,
    source: impl Fn(&Value) -> bool,
) -> String {
    let volume = pod_spec(deployment)["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| source(v))
        .unwrap_or_else(|| panic!("the Deployment has no volume of {what}"));
    container(deployment, container_name)["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == volume["name"])
        .unwrap_or_else(|| panic!("container {container_name} does not mount the volume of {what}"))
        ["mountPath"]
        .as_str()
        .unwrap()
        .trim_end_matches('/')
        .to_string()
}

/// The path at which `container` sees `key` of ConfigMap `config_map`.
#[track_caller]
fn config_map_file(deployment: &Value, container_name: &str, config_map: &str, key: &str) -> String {
    let holds_key = |v: &Value| {
        v["configMap"]["name"] == config_map
            && v["configMap"]["items"]
                .as_array()
                .is_none_or(|items| items.iter().any(|i| i["key"] == key))
    };
    let volume = pod_spec(deployment)["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| {
            holds_key(v) && {
                container(deployment, container_name)["volumeMounts"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|m| m["name"] == v["name"])
            }
        })
        .unwrap_or_else(|| {
            panic!("container {container_name} mounts no volume with key {key} of ConfigMap {config_map}")
        });
    let path = match volume["configMap"]["items"].as_array() {
        Some(items) => items.iter().find(|i| i["key"] == key).unwrap()["path"]
            .as_str()
            .unwrap()
            .to_string(),
        None => key.to_string(),
    };
    let dir = mount_path(
        deployment,
        container_name,
        &format!("ConfigMap {config_map}"),
        |v| v["name"] == volume["name"],
    );
    format!("{dir}/{path}")
}

/// The containerPort named `name` of a container.
#[track_caller]
fn container_port(container: &Value, name: &str) -> u16 {
    container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no container port named {name}"))["containerPort"]
        .as_u64()
        .unwrap() as u16
}

/// A Kubernetes quantity of bytes ("512Mi", "3Gi", "1000000").
fn bytes(quantity: &str) -> usize {
    let units = [
        ("Ki", 1usize << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
    ];
    for (suffix, unit) in units {
        if let Some(n) = quantity.strip_suffix(suffix) {
            return n.parse::<usize>().unwrap() * unit;
        }
    }
    quantity
        .parse()
        .unwrap_or_else(|e| panic!("quantity {quantity}: {e}"))
}

/// kache's container: non-root, read-only root, no privilege escalation, no
/// capabilities, RuntimeDefault seccomp (its own or the pod's), resources
/// requested and memory limited, readiness and liveness on the admin port.
#[track_caller]
fn assert_kache_container_locked_down(deployment: &Value, what: &str) {
    let pod = pod_spec(deployment);
    let c = container(deployment, "kache");
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true, "{what}");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{what}");
    assert_eq!(sc["readOnlyRootFilesystem"], true, "{what}");
    assert_eq!(sc["allowPrivilegeEscalation"], false, "{what}");
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{what}");
    assert!(sc["capabilities"].get("add").is_none(), "{what}");
    assert!(sc.get("privileged").is_none_or(|p| p == false), "{what}");
    let seccomp = match sc.get("seccompProfile") {
        Some(own) => own,
        None => &pod["securityContext"]["seccompProfile"],
    };
    assert_eq!(seccomp["type"], "RuntimeDefault", "{what}: seccomp");
    let resources = &c["resources"];
    assert!(resources["requests"]["cpu"].is_string(), "{what}: {resources}");
    assert!(resources["requests"]["memory"].is_string(), "{what}: {resources}");
    assert!(resources["limits"]["memory"].is_string(), "{what}: {resources}");
    assert_eq!(
        c["readinessProbe"]["httpGet"],
        json!({"path": "/readyz", "port": "metrics"}),
        "{what}"
    );
    assert_eq!(
        c["livenessProbe"]["httpGet"],
        json!({"path": "/livez", "port": "metrics"}),
        "{what}"
    );
}

/// Stand-ins for the files a config names, so that kache's own validation
/// (which reads some of them) runs outside the pod.
fn with_stand_ins(file: &FileConfig, dir: &Path) -> FileConfig {
    let stand_in = |name: &str| {
        let path = dir.join(name);
        std::fs::write(&path, "stand-in").unwrap();
        path
    };
    let mut local = file.clone();
    if local.tls.cert.is_some() {
        local.tls.cert = Some(stand_in("tls.crt"));
        local.tls.key = Some(stand_in("tls.key"));
    }
    if local.shared.client_ca_file.is_some() {
        local.shared.client_ca_file = Some(stand_in("ca.crt"));
    }
    if local.access_token_file.is_some() {
        local.access_token_file = Some(stand_in("token"));
    }
    local.state_dir = Some(dir.join("state"));
    local
}

/// The config file of ConfigMap `name`, key kache.yaml, in a rendering.
#[track_caller]
fn config_text(docs: &[Value], name: &str) -> String {
    object(docs, "ConfigMap", name)["data"]["kache.yaml"]
        .as_str()
        .unwrap_or_else(|| panic!("ConfigMap {name} has no data key kache.yaml"))
        .to_string()
}

/// A config file's text, parsed as kache parses it.
#[track_caller]
fn parse_config(text: &str, what: &str) -> FileConfig {
    FileConfig::parse(text).unwrap_or_else(|e| panic!("{what}: {e}\n{text}"))
}

/// The checks both in-cluster Deployments (shared and local) pass: `kache
/// serve` on exactly the ConfigMap's file, its files where the Deployment
/// puts them, its ports the ones the container, probes, Service and
/// NetworkPolicy name, a memory budget well below the limit. Returns the
/// file and the merged config.
fn check_in_cluster_config(dir: &str, mode: ModeName) -> (FileConfig, Config) {
    let docs = render(dir);
    let text = config_text(&docs, "kache");
    let file = parse_config(&text, &format!("{dir}: ConfigMap kache's kache.yaml"));
    let deployment = object(&docs, "Deployment", "kache");
    let kache = container(deployment, "kache");

    let config_file = config_map_file(deployment, "kache", "kache", "kache.yaml");
    assert_eq!(
        kache["args"],
        json!(["serve", format!("--config={config_file}")]),
        "{dir}: flags would override the ConfigMap"
    );
    assert_eq!(file.mode, Some(mode), "{dir}");
    assert_eq!(
        file.kubeconfig, None,
        "{dir}: in a pod kache uses its service account"
    );
    assert_eq!(pod_spec(deployment)["serviceAccountName"], "kache", "{dir}");
    assert_ne!(
        pod_spec(deployment)["automountServiceAccountToken"],
        false,
        "{dir}: kache's identity comes from the mounted service account"
    );

    let tls_dir = mount_path(deployment, "kache", "Secret kache-tls", |v| {
        v["secret"]["secretName"] == "kache-tls"
    });
    assert_eq!(
        file.tls.cert,
        Some(PathBuf::from(format!("{tls_dir}/tls.crt"))),
        "{dir}"
    );
    assert_eq!(
        file.tls.key,
        Some(PathBuf::from(format!("{tls_dir}/tls.key"))),
        "{dir}"
    );
    let state_dir = mount_path(deployment, "kache", "an emptyDir", |v| {
        v.get("emptyDir").is_some()
    });
    assert_eq!(file.state_dir, Some(PathBuf::from(state_dir)), "{dir}");

    let listen: SocketAddr = file.listen.as_deref().unwrap().parse().unwrap();
    let admin: SocketAddr = file.admin_listen.as_deref().unwrap().parse().unwrap();
    assert!(
        listen.ip().is_unspecified() && admin.ip().is_unspecified(),
        "{dir}"
    );
    assert_eq!(listen.port(), container_port(kache, "https"), "{dir}");
    assert_eq!(admin.port(), container_port(kache, "metrics"), "{dir}");
    let service = object(&docs, "Service", "kache");
    let ports = service["spec"]["ports"].as_array().unwrap();
    assert!(
        ports.contains(&json!({"name": "https", "port": 443, "targetPort": "https"})),
        "{dir}: {ports:?}"
    );
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    assert_eq!(&deployment["spec"]["selector"]["matchLabels"], labels, "{dir}");
    assert_eq!(&service["spec"]["selector"], labels, "{dir}");
    assert_admin_port_only_from_monitoring(&docs, deployment, "kache", &["https"]);

    // kache accepts it: merged with no flags, with stand-in files at its paths.
    let tmp = tempfile::tempdir().unwrap();
    let config = Config::merge(&ServeArgs::default(), with_stand_ins(&file, tmp.path()))
        .unwrap_or_else(|e| panic!("{dir}: {e}"));
    assert!(
        matches!(config.listener.tls, Some(TlsConfig::Files { .. })),
        "{dir}"
    );
    assert_eq!(config.listener.addr, listen, "{dir}");
    assert_eq!(config.admin.addr, admin, "{dir}");
    // The memory budget leaves room below the container's limit: the
    // process grows by about 1.6x what the stores hold.
    let limit = bytes(kache["resources"]["limits"]["memory"].as_str().unwrap());
    assert!(
        config.cache.memory_budget_bytes <= limit / 2,
        "{dir}: memoryBudgetBytes {} with a {limit}-byte limit",
        config.cache.memory_budget_bytes
    );
    (file, config)
}

/// The NetworkPolicy selecting the pods of `deployment`: the admin port
/// (`metrics`) from the monitoring namespace only; `open` ports from any
/// namespace; nothing else.
#[track_caller]
fn assert_admin_port_only_from_monitoring(docs: &[Value], deployment: &Value, policy: &str, open: &[&str]) {
    let np = object(docs, "NetworkPolicy", policy);
    let what = format!("NetworkPolicy {policy}");
    assert_eq!(
        np["metadata"]["namespace"], deployment["metadata"]["namespace"],
        "{what}"
    );
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    let selector = np["spec"]["podSelector"]["matchLabels"].as_object().unwrap();
    assert!(
        !selector.is_empty() && selector.iter().all(|(k, v)| &labels[k.as_str()] == v),
        "{what} does not select the pods: {selector:?} vs {labels}"
    );
    assert_eq!(np["spec"]["policyTypes"], json!(["Ingress"]), "{what}");
    let monitoring =
        json!([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]);
    let mut admitted = BTreeMap::new();
    for rule in np["spec"]["ingress"].as_array().unwrap() {
        let ports = rule["ports"].as_array().expect("every rule names its ports");
        for port in ports {
            assert_eq!(port["protocol"], "TCP", "{what}");
            let name = port["port"].as_str().expect("ports by name").to_string();
            assert!(
                admitted.insert(name.clone(), rule["from"].clone()).is_none(),
                "{what}: port {name} in two rules"
            );
        }
    }
    assert_eq!(
        admitted.get("metrics"),
        Some(&monitoring),
        "{what}: the admin port"
    );
    for port in open {
        assert_eq!(
            admitted.get(*port),
            Some(&json!([{"namespaceSelector": {}}])),
            "{what}: port {port}"
        );
    }
    assert_eq!(
        admitted.len(),
        open.len() + 1,
        "{what}: other ports admitted: {admitted:?}"
    );
    // Every port the policy names is one the pod's containers name.
    let named: BTreeSet<String> = pod_spec(deployment)["containers"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect();
    for port in admitted.keys() {
        assert!(named.contains(port), "{what}: no container port named {port}");
    }
}

#[test]
fn shared_config_map_is_a_valid_config_that_matches_the_deployment() {
    let (file, config) = check_in_cluster_config(SHARED, ModeName::Shared);
    assert_eq!(
        file.shared.client_ca_file.as_deref(),
        Some(Path::new(SERVICE_ACCOUNT_CA))
    );
    let Mode::Shared(shared) = &config.mode else {
        panic!("not shared mode: {:?}", config.mode)
    };
    assert_eq!(shared.forward, ForwardMode::Impersonate);
    assert_eq!(shared.authorization, AuthorizationMode::Rbac);
    assert!(!shared.allow_anonymous);
    // The admin port is a Service port too (for scrapes).
    let docs = render(SHARED);
    let service = object(&docs, "Service", "kache");
    assert!(service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["targetPort"] == "metrics"));
}

#[test]
fn local_config_map_is_a_valid_config_that_requires_the_access_token() {
    let (file, config) = check_in_cluster_config(LOCAL, ModeName::Local);
    let docs = render(LOCAL);
    let deployment = object(&docs, "Deployment", "kache");
    let token_dir = mount_path(deployment, "kache", "Secret kache-access-token", |v| {
        v["secret"]["secretName"] == "kache-access-token"
    });
    assert_eq!(
        file.access_token_file,
        Some(PathBuf::from(format!("{token_dir}/token")))
    );
    assert_eq!(config.mode, Mode::Local);
    assert!(config.listener.access_token.is_some());
    // The names the Service is reached by are accepted Host names.
    let hosts = file.accept_hosts.clone().unwrap_or_default();
    for host in ["kache.kache.svc", "kache.kache.svc.cluster.local"] {
        assert!(
            hosts.iter().any(|h| h == host),
            "{host} not in acceptHosts {hosts:?}"
        );
    }
    // Without the token, kache refuses the non-loopback listener.
    let tmp = tempfile::tempdir().unwrap();
    let mut tokenless = with_stand_ins(&file, tmp.path());
    tokenless.access_token_file = None;
    let refused = Config::merge(&ServeArgs::default(), tokenless).expect_err("no access token");
    assert!(refused.to_string().contains("access"), "{refused}");
    // Local mode binds kache's account to view: read-only, no Secrets.
    let view = object(&docs, "ClusterRoleBinding", "kache-view");
    assert_eq!(view["roleRef"]["name"], "view");
}

#[test]
fn in_cluster_deployments_are_redundant_and_locked_down() {
    for dir in [SHARED, LOCAL] {
        let docs = render(dir);
        let deployment = object(&docs, "Deployment", "kache");
        assert!(deployment["spec"]["replicas"].as_u64().unwrap() >= 2, "{dir}");
        assert_eq!(
            deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"], 0,
            "{dir}"
        );
        assert_kache_container_locked_down(deployment, dir);
    }
    let docs = render(SHARED);
    let deployment = object(&docs, "Deployment", "kache");
    let pdb = object(&docs, "PodDisruptionBudget", "kache");
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        deployment["spec"]["template"]["metadata"]["labels"]
    );
}

#[test]
fn sidecar_pod_is_locked_down_and_points_the_runner_at_kache() {
    let docs = render(SIDECAR);
    let deployment = object(&docs, "Deployment", "ci-runner");
    let pod = pod_spec(deployment);
    let account = pod["serviceAccountName"].as_str().unwrap();
    assert_eq!(account, "ci-runner");
    object(&docs, "ServiceAccount", account);
    assert_ne!(
        pod["automountServiceAccountToken"], false,
        "kache's identity comes from the mounted service account"
    );
    assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
    assert_kache_container_locked_down(deployment, SIDECAR);
    let kache = container(deployment, "kache");
    assert!(kache["resources"]["limits"]["cpu"].is_string());

    // kache: local mode on loopback, on the ConfigMap's file.
    let config_file = config_map_file(deployment, "kache", "ci-runner-kache", "kache.yaml");
    assert_eq!(
        kache["args"],
        json!(["serve", format!("--config={config_file}")]),
        "flags would override the ConfigMap"
    );
    let file = parse_config(&config_text(&docs, "ci-runner-kache"), "the sidecar's kache.yaml");
    assert_eq!(file.mode, Some(ModeName::Local));
    assert_eq!(file.kubeconfig, None, "kache uses the pod's service account");
    assert_eq!(file.access_token_file, None, "loopback needs no token");
    assert_eq!(
        file.cache.snapshots,
        Some(false),
        "an emptyDir that dies with the pod"
    );
    let listen: SocketAddr = file.listen.as_deref().unwrap().parse().unwrap();
    let admin: SocketAddr = file.admin_listen.as_deref().unwrap().parse().unwrap();
    assert!(listen.ip().is_loopback(), "the pod's containers only: {listen}");
    assert!(
        admin.ip().is_unspecified(),
        "the kubelet probes the pod's address"
    );
    assert_eq!(admin.port(), container_port(kache, "metrics"));
    let state_dir = mount_path(deployment, "kache", "an emptyDir", |v| {
        v.get("emptyDir").is_some()
    });
    assert_eq!(file.state_dir, Some(PathBuf::from(state_dir)));
    let tmp = tempfile::tempdir().unwrap();
    let config = Config::merge(&ServeArgs::default(), with_stand_ins(&file, tmp.path()))
        .unwrap_or_else(|e| panic!("the sidecar's kache.yaml: {e}"));
    assert_eq!(config.mode, Mode::Local);
    assert_eq!(config.listener.tls, None);
    assert_eq!(config.cache.snapshot_dir, None);
    // Answers from memory need cluster-wide list and watch, which the
    // account does not have: the cache is off, reads are forwarded at once.
    assert!(!config.cache.enabled);

    // The runner: KUBECONFIG is the ConfigMap's kubeconfig, whose server is
    // kache's listener and which carries no credentials of its own.
    let runner = pod["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] != "kache")
        .expect("a runner container");
    let runner_name = runner["name"].as_str().unwrap();
    let kubeconfig_path = config_map_file(deployment, runner_name, "ci-runner-kache", "kubeconfig");
    let env: BTreeMap<&str, &str> = runner["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap(), e["value"].as_str().unwrap()))
        .collect();
    assert_eq!(env.get("KUBECONFIG"), Some(&kubeconfig_path.as_str()));
    let kubeconfig: Value = serde_saphyr::from_str(
        object(&docs, "ConfigMap", "ci-runner-kache")["data"]["kubeconfig"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    let current = kubeconfig["current-context"].as_str().unwrap();
    let context = &kubeconfig["contexts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == current)
        .unwrap()["context"];
    let named = |list: &str, name: &Value| {
        kubeconfig[list]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| &c["name"] == name)
            .cloned()
            .unwrap()
    };
    assert_eq!(
        named("clusters", &context["cluster"])["cluster"]["server"],
        format!("http://{listen}")
    );
    assert_eq!(named("users", &context["user"])["user"], json!({}));
    assert_eq!(context["namespace"], deployment["metadata"]["namespace"]);
    let rsc = &runner["securityContext"];
    assert_eq!(rsc["allowPrivilegeEscalation"], false);
    assert_eq!(rsc["capabilities"]["drop"], json!(["ALL"]));
    assert!(runner["resources"]["requests"].is_object());

    assert_admin_port_only_from_monitoring(&docs, deployment, "ci-runner", &[]);
}

// ------------------------------------------------------------------- RBAC ----

/// Shipped RBAC objects, applied for real under unique names and bound to
/// the service account `account` of namespace `ns` (which need not exist),
/// so that concurrent test runs do not share them. Roles and RoleBindings
/// go to `ns`. Deleted on drop, also when the test fails.
struct RbacGuard {
    suffix: String,
    namespace: String,
    account: String,
    /// Names of the (Cluster)Roles applied, before renaming: references to
    /// them are renamed, references to the cluster's own roles kept.
    roles: BTreeSet<String>,
    /// Kind, namespace (empty: cluster-scoped) and name, to delete.
    applied: Vec<(String, String, String)>,
}

impl RbacGuard {
    fn new(namespace: &str, account: &str) -> RbacGuard {
        RbacGuard {
            suffix: unique_name("t"),
            namespace: namespace.to_string(),
            account: account.to_string(),
            roles: BTreeSet::new(),
            applied: Vec::new(),
        }
    }

    /// The service account's user name.
    fn user(&self) -> String {
        format!("system:serviceaccount:{}:{}", self.namespace, self.account)
    }

    /// The groups the API server gives that service account.
    fn groups(&self) -> Vec<String> {
        vec![
            "system:serviceaccounts".into(),
            format!("system:serviceaccounts:{}", self.namespace),
            "system:authenticated".into(),
        ]
    }

    fn renamed(&self, name: &str) -> String {
        format!("{name}-{}", self.suffix)
    }

    /// Applies these RBAC objects of a rendering (roles before bindings).
    fn apply(&mut self, docs: impl IntoIterator<Item = Value>) {
        let mut docs: Vec<Value> = docs.into_iter().collect();
        assert!(!docs.is_empty(), "no RBAC objects to apply");
        docs.sort_by_key(|d| d["kind"].as_str().unwrap().ends_with("Binding"));
        for doc in &mut docs {
            let kind = doc["kind"].as_str().unwrap().to_string();
            let original = doc["metadata"]["name"].as_str().unwrap().to_string();
            let name = self.renamed(&original);
            doc["metadata"]["name"] = json!(name);
            let namespace = match kind.as_str() {
                "Role" | "RoleBinding" => {
                    doc["metadata"]["namespace"] = json!(self.namespace);
                    self.namespace.clone()
                }
                "ClusterRole" | "ClusterRoleBinding" => String::new(),
                other => panic!("not an RBAC object: {other}"),
            };
            if kind.ends_with("Binding") {
                let role = doc["roleRef"]["name"].as_str().unwrap().to_string();
                if self.roles.contains(&role) {
                    doc["roleRef"]["name"] = json!(self.renamed(&role));
                }
                for subject in doc["subjects"].as_array_mut().unwrap() {
                    assert_eq!(subject["kind"], "ServiceAccount", "{original}");
                    assert_eq!(subject["name"], self.account.as_str(), "{original}");
                    subject["namespace"] = json!(self.namespace);
                }
            } else {
                self.roles.insert(original);
            }
            self.applied.push((kind, namespace, name));
        }
        Kubectl::new(&cluster().admin_kubeconfig)
            .stdin(yaml_stream(&docs))
            .run(&["apply", "-f", "-"])
            .ok();
    }

    /// Makes `role` (a ClusterRole of the cluster, such as view) available
    /// under this guard's suffix with its rules filled from its aggregation
    /// rule, as the controller manager's aggregation controller would (the
    /// test API server runs none, so the cluster's own copy is empty).
    fn aggregate(&mut self, role: &str) {
        let admin = &cluster().admin_kubeconfig;
        let original = kubectl(admin, &["get", "clusterrole", role, "-o", "json"])
            .ok()
            .json();
        let mut rules = Vec::new();
        for selector in original["aggregationRule"]["clusterRoleSelectors"]
            .as_array()
            .unwrap_or_else(|| panic!("ClusterRole {role} aggregates nothing"))
        {
            let labels: Vec<String> = selector["matchLabels"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap()))
                .collect();
            let parts = kubectl(
                admin,
                &["get", "clusterroles", "-l", &labels.join(","), "-o", "json"],
            )
            .ok()
            .json();
            for part in parts["items"].as_array().unwrap() {
                rules.extend(part["rules"].as_array().cloned().unwrap_or_default());
            }
        }
        assert!(!rules.is_empty(), "ClusterRole {role}: nothing to aggregate");
        self.apply([json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": role},
            "rules": rules,
        })]);
    }
}

impl Drop for RbacGuard {
    fn drop(&mut self) {
        for (kind, namespace, name) in self.applied.iter().rev() {
            let kind = kind.to_ascii_lowercase();
            let mut args = vec![
                "delete",
                kind.as_str(),
                name,
                "--ignore-not-found",
                "--wait=false",
            ];
            if !namespace.is_empty() {
                args.extend(["-n", namespace.as_str()]);
            }
            let out = kubectl(&cluster().admin_kubeconfig, &args);
            if !out.success() {
                eprintln!("cleanup: deleting {kind} {name} failed: {}", out.stderr);
            }
        }
    }
}

/// The RBAC objects of a rendering, those `keep` selects.
fn rbac_objects(docs: &[Value], keep: impl Fn(&str, &str) -> bool) -> Vec<Value> {
    docs.iter()
        .filter(|d| {
            let kind = d["kind"].as_str().unwrap_or_default();
            ["ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"].contains(&kind)
                && keep(kind, d["metadata"]["name"].as_str().unwrap_or_default())
        })
        .cloned()
        .collect()
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

/// Checks every `needed` is allowed and every `refused` is not, for `user`,
/// with `{ns}` in them standing for `ns`.
#[track_caller]
fn assert_rights(user: &str, ns: &str, needed: &[&str], refused: &[&str]) {
    for args in needed {
        let args = args.replace("{ns}", ns);
        assert!(can_i(user, &args), "{user} may not: {args}");
    }
    for args in refused {
        let args = args.replace("{ns}", ns);
        assert!(!can_i(user, &args), "{user} may: {args}");
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

/// What kache needs in any mode (deploy/base's ClusterRole kache).
const NEEDED_ALWAYS: &[&str] = &[
    "get customresourcedefinitions.apiextensions.k8s.io",
    "list customresourcedefinitions.apiextensions.k8s.io",
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
];

/// What shared mode's account needs besides.
const NEEDED_SHARED: &[&str] = &[
    "create tokenreviews.authentication.k8s.io",
    "create subjectaccessreviews.authorization.k8s.io",
    "list clusterroles.rbac.authorization.k8s.io",
    "watch clusterroles.rbac.authorization.k8s.io",
    "get clusterrolebindings.rbac.authorization.k8s.io",
    "list clusterrolebindings.rbac.authorization.k8s.io",
    "watch clusterrolebindings.rbac.authorization.k8s.io",
    "list roles.rbac.authorization.k8s.io --all-namespaces",
    "watch rolebindings.rbac.authorization.k8s.io --all-namespaces",
    // The cache: list + watch of whatever clients read, cluster-wide.
    "list pods --all-namespaces",
    "watch pods --all-namespaces",
    "list configmaps --all-namespaces",
    "watch secrets --all-namespaces",
    "list deployments.apps --all-namespaces",
    "list nodes",
    "watch namespaces",
];

/// What shared mode's account must not be allowed: no writes but the two
/// reviews, no `get` on arbitrary objects (which would include exec and
/// node proxy).
const REFUSED_SHARED: &[&str] = &[
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

/// What local mode's account (view, and base's kache) may do: read most
/// things cluster-wide, which every holder of the access token then may too.
const NEEDED_LOCAL: &[&str] = &[
    "list pods --all-namespaces",
    "watch deployments.apps --all-namespaces",
    "list configmaps --all-namespaces",
    "get services -n default",
];

/// What it must not: Secrets, writes, exec, reviews, RBAC objects.
const REFUSED_LOCAL: &[&str] = &[
    "list secrets --all-namespaces",
    "watch secrets --all-namespaces",
    "get secrets -n default",
    "create pods",
    "delete configmaps",
    "patch deployments.apps",
    "create pods --subresource=exec",
    "get pods --subresource=exec",
    "create serviceaccounts --subresource=token",
    "create tokenreviews.authentication.k8s.io",
    "create subjectaccessreviews.authorization.k8s.io",
    "list roles.rbac.authorization.k8s.io --all-namespaces",
    "create clusterrolebindings.rbac.authorization.k8s.io",
    "delete customresourcedefinitions.apiextensions.k8s.io",
    "update apiservices.apiregistration.k8s.io",
];

/// What the sidecar's account needs: the example jobs' work in their
/// namespace, and kache's discovery watches.
const NEEDED_SIDECAR: &[&str] = &[
    "list customresourcedefinitions.apiextensions.k8s.io",
    "watch customresourcedefinitions.apiextensions.k8s.io",
    "list apiservices.apiregistration.k8s.io",
    "watch apiservices.apiregistration.k8s.io",
    "get /api",
    "get /apis",
    "get /openapi/v2",
    "get /version",
    "create configmaps -n {ns}",
    "update configmaps -n {ns}",
    "create deployments.apps -n {ns}",
    "patch deployments.apps -n {ns}",
    "delete services -n {ns}",
    "watch deployments.apps -n {ns}",
    "list replicasets.apps -n {ns}",
    "list pods -n {ns}",
    "get pods --subresource=log -n {ns}",
    "list events -n {ns}",
    "get namespaces/{ns} -n {ns}",
];

/// What it must not: anything outside its namespace, Secrets, exec, its own
/// RBAC, tokens, reviews.
const REFUSED_SIDECAR: &[&str] = &[
    "get secrets -n {ns}",
    "list secrets -n {ns}",
    "create pods -n {ns}",
    "create pods --subresource=exec -n {ns}",
    "get pods --subresource=exec -n {ns}",
    "create roles.rbac.authorization.k8s.io -n {ns}",
    "create rolebindings.rbac.authorization.k8s.io -n {ns}",
    "create serviceaccounts --subresource=token -n {ns}",
    "list pods --all-namespaces",
    "list configmaps -n default",
    "create deployments.apps -n default",
    "get namespaces/kube-system",
    "get namespaces/default -n default",
    "list namespaces",
    "list nodes",
    "delete customresourcedefinitions.apiextensions.k8s.io",
    "update apiservices.apiregistration.k8s.io",
    "create clusterrolebindings.rbac.authorization.k8s.io",
    "create tokenreviews.authentication.k8s.io",
];

/// Statically: every ClusterRole rule of a rendering reads, except the two
/// reviews and impersonation, and none gets every resource.
fn assert_cluster_roles_only_read(dir: &str) {
    let reviews = [
        ("authentication.k8s.io", "tokenreviews"),
        ("authorization.k8s.io", "subjectaccessreviews"),
    ];
    for role in render(dir).iter().filter(|d| d["kind"] == "ClusterRole") {
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
                "{dir}: ClusterRole {} has a rule that writes: {rule}",
                role["metadata"]["name"]
            );
            assert!(
                !(verbs.contains(&"get") && resources.contains(&"*")),
                "{dir}: `get` on every resource includes pods/exec and nodes/proxy: {rule}"
            );
        }
    }
}

#[test]
fn shared_rbac_grants_what_kache_needs_and_nothing_that_writes() {
    assert_cluster_roles_only_read(SHARED);
    let docs = render(SHARED);
    let impersonation = |_: &str, name: &str| name == "kache-impersonate";
    let mut rbac = RbacGuard::new(&unique_name("kache-rbac"), "kache");
    rbac.apply(rbac_objects(&docs, |kind, name| !impersonation(kind, name)));
    rbac.apply(rbac_objects(&docs, |kind, name| {
        kind == "ClusterRole" && impersonation(kind, name)
    }));
    let user = rbac.user();
    poll_until(RBAC_PROPAGATION, "the new bindings to take effect", || {
        (can_i(&user, NEEDED_SHARED[0]) && can_i(&user, NEEDED_ALWAYS[0])).then_some(())
    });
    assert_rights(&user, "", NEEDED_ALWAYS, REFUSED_SHARED);
    assert_rights(&user, "", NEEDED_SHARED, &[]);
    // Without impersonate.yaml's binding (passthrough for tokens only), no impersonation.
    for (group, resource, sub, name) in IMPERSONATIONS {
        assert!(
            !may_impersonate(&rbac, group, resource, sub, name),
            "impersonate {group}/{resource}/{sub} allowed without kache-impersonate's binding"
        );
    }
    rbac.apply(rbac_objects(&docs, |kind, name| {
        kind == "ClusterRoleBinding" && impersonation(kind, name)
    }));
    poll_until(RBAC_PROPAGATION, "the impersonate binding to take effect", || {
        may_impersonate(&rbac, "", "users", "", "alice").then_some(())
    });
    for (group, resource, sub, name) in IMPERSONATIONS {
        assert!(
            may_impersonate(&rbac, group, resource, sub, name),
            "kache's account may not impersonate {group}/{resource}/{sub} {name}"
        );
    }
    assert_rights(&user, "", &[], REFUSED_SHARED);
}

#[test]
fn local_rbac_reads_but_never_secrets_and_never_writes() {
    assert_cluster_roles_only_read(LOCAL);
    let docs = render(LOCAL);
    let mut rbac = RbacGuard::new(&unique_name("kache-rbac"), "kache");
    // ClusterRoleBinding kache-view names the cluster's aggregated view.
    rbac.aggregate("view");
    rbac.apply(rbac_objects(&docs, |_, _| true));
    let user = rbac.user();
    poll_until(RBAC_PROPAGATION, "the new bindings to take effect", || {
        (can_i(&user, NEEDED_LOCAL[0]) && can_i(&user, NEEDED_ALWAYS[0])).then_some(())
    });
    assert_rights(&user, "", NEEDED_ALWAYS, REFUSED_LOCAL);
    assert_rights(&user, "", NEEDED_LOCAL, &[]);
    for (group, resource, sub, name) in IMPERSONATIONS {
        assert!(
            !may_impersonate(&rbac, group, resource, sub, name),
            "local mode's account may impersonate {group}/{resource}/{sub} {name}"
        );
    }
}

#[test]
fn sidecar_rbac_grants_the_jobs_and_kache_what_they_need_and_no_more() {
    assert_cluster_roles_only_read(SIDECAR);
    let docs = render(SIDECAR);
    let ns = TestNamespace::create("kache-sidecar-rbac");
    let mut rbac = RbacGuard::new(ns.name(), "ci-runner");
    rbac.apply(rbac_objects(&docs, |_, _| true));
    let user = rbac.user();
    poll_until(RBAC_PROPAGATION, "the new bindings to take effect", || {
        (can_i(&user, NEEDED_SIDECAR[0]) && can_i(&user, &NEEDED_SIDECAR[8].replace("{ns}", ns.name())))
            .then_some(())
    });
    assert_rights(&user, ns.name(), NEEDED_SIDECAR, REFUSED_SIDECAR);
    for (group, resource, sub, name) in IMPERSONATIONS {
        assert!(
            !may_impersonate(&rbac, group, resource, sub, name),
            "the runner's account may impersonate {group}/{resource}/{sub} {name}"
        );
    }
}

// ------------------------------------------------------------ end to end ----

/// A token of service account `account` in `ns`, from the TokenRequest API
/// (`kubectl create token` is kubectl 1.24's; this works with 1.20 too).
fn service_account_token(ns: &str, account: &str) -> String {
    let request = json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {"expirationSeconds": 3600},
    });
    let answer = Kubectl::new(&cluster().admin_kubeconfig)
        .stdin(request.to_string())
        .run(&[
            "create",
            "--raw",
            &format!("/api/v1/namespaces/{ns}/serviceaccounts/{account}/token"),
            "-f",
            "-",
        ])
        .ok()
        .json();
    answer["status"]["token"].as_str().unwrap().to_string()
}

/// A kubeconfig for the test API server with `token`, as kache finds its
/// service account in a pod.
fn account_kubeconfig(dir: &Path, token: &str) -> PathBuf {
    let c = cluster();
    let path = dir.join("account.kubeconfig");
    let kubeconfig = json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "test", "cluster": {"server": c.apiserver_url, "certificate-authority": c.ca_cert}}],
        "users": [{"name": "account", "user": {"token": token}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "account"}}],
        "current-context": "test",
    });
    std::fs::write(&path, serde_saphyr::to_string(&kubeconfig).unwrap()).unwrap();
    path
}

/// The finished requests of audit entries.
fn finished(entries: &[Value]) -> Vec<&Value> {
    entries
        .iter()
        .filter(|e| e["stage"] == "ResponseComplete")
        .collect()
}

/// `kubectl get --raw PATH` with a kubeconfig; the output either way.
fn get_raw(kubeconfig: &Path, path: &str) -> kache_tests::Output {
    kubectl(kubeconfig, &["get", "--raw", path])
}

#[test]
fn kache_with_the_shared_config_and_rights_serves_users_as_themselves() {
    let c = cluster();
    let docs = render(SHARED);
    let ns = TestNamespace::create("kache-deploy");
    let n = ns.name();
    let admin = &c.admin_kubeconfig;

    // kache's service account, with exactly the shipped rights, and a token
    // of it as kache would find it mounted in its pod.
    kubectl(admin, &["-n", n, "create", "serviceaccount", "kache"]).ok();
    let mut rbac = RbacGuard::new(n, "kache");
    rbac.apply(rbac_objects(&docs, |_, _| true));
    let user = rbac.user();
    poll_until(RBAC_PROPAGATION, "the new bindings to take effect", || {
        (can_i(&user, NEEDED_SHARED[0])
            && can_i(&user, NEEDED_ALWAYS[0])
            && may_impersonate(&rbac, "", "users", "", "alice"))
        .then_some(())
    });
    let tmp = tempfile::tempdir().unwrap();
    let sa_kubeconfig = account_kubeconfig(tmp.path(), &service_account_token(n, "kache"));

    // The shipped config, its files replaced by the test cluster's: the API
    // server's certificate (SAN 127.0.0.1) to serve, the cluster CA for clients.
    let mut config: Value = serde_saphyr::from_str(&config_text(&docs, "kache")).unwrap();
    let pki = c.dir.join("pki");
    config["tls"]["cert"] = pki.join("apiserver.crt").to_str().unwrap().into();
    config["tls"]["key"] = pki.join("apiserver.key").to_str().unwrap().into();
    config["shared"]["clientCaFile"] = c.ca_cert.to_str().unwrap().into();
    config["stateDir"] = tmp.path().join("state").to_str().unwrap().into();
    let config_file = tmp.path().join("kache.yaml");
    std::fs::write(&config_file, serde_saphyr::to_string(&config).unwrap()).unwrap();

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

    let mark = c.audit().mark();
    let kache = Kache::start_with_args(&sa_kubeconfig, &["--config", config_file.to_str().unwrap()]);
    let alice = tmp.path().join("alice-via-kache.kubeconfig");
    kubeconfig_with_server(&c.alice_kubeconfig, &format!("https://{}", kache.addr()), &alice);

    // alice's rv=0 list, answered from the cache kache's account keeps.
    let cached = format!("/api/v1/namespaces/{n}/configmaps?resourceVersion=0");
    let deadline = Instant::now() + Duration::from_secs(30);
    let served_from_memory = loop {
        let out = get_raw(&alice, &cached).ok();
        assert!(out.stdout.contains("\"hello\""), "{}", out.stdout);
        let hits = metric(&kache.metrics(), "kache_cache_hits_total", &[]);
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
    let entries = mark.entries_after_sentinel();
    let events = finished(&entries);
    let own: Vec<&Value> = events
        .iter()
        .copied()
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
        ("get", "/api/v1/namespaces/kube-system"),
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

/// Whether a request path is discovery (what kache answers from its
/// discovery cache): `/api`, `/api/v1`, `/apis[/group[/version]]`,
/// `/openapi/…`, `/version`.
fn is_discovery(uri: &str) -> bool {
    let path = uri.split('?').next().unwrap_or_default();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    matches!(
        segments.as_slice(),
        ["api"] | ["api", _] | ["apis"] | ["apis", _] | ["apis", _, _] | ["openapi", ..] | ["version"]
    )
}

#[test]
fn sidecar_kache_serves_the_runner_with_the_pods_account() {
    let c = cluster();
    let docs = render(SIDECAR);
    let deployment = object(&docs, "Deployment", "ci-runner");
    let ns = TestNamespace::create("kache-sidecar");
    let n = ns.name();

    // The runner's service account with the shipped rights, and its token,
    // as kache finds it in the pod.
    kubectl(
        &c.admin_kubeconfig,
        &["-n", n, "create", "serviceaccount", "ci-runner"],
    )
    .ok();
    let mut rbac = RbacGuard::new(n, "ci-runner");
    rbac.apply(rbac_objects(&docs, |_, _| true));
    let user = rbac.user();
    let create_configmaps = format!("create configmaps -n {n}");
    poll_until(RBAC_PROPAGATION, "the new bindings to take effect", || {
        (can_i(&user, NEEDED_SIDECAR[0]) && can_i(&user, &create_configmaps)).then_some(())
    });
    let tmp = tempfile::tempdir().unwrap();
    let upstream = account_kubeconfig(tmp.path(), &service_account_token(n, "ci-runner"));

    // kache on the sidecar's config file (the harness's flags put its
    // listeners on free loopback ports and its state in a directory of its own).
    let config_file = tmp.path().join("kache.yaml");
    std::fs::write(&config_file, config_text(&docs, "ci-runner-kache")).unwrap();
    let mark = c.audit().mark();
    let kache = Kache::start_with_args(&upstream, &["--config", config_file.to_str().unwrap()]);
    // The probes' paths are served by the admin listener.
    for probe in ["readinessProbe", "livenessProbe"] {
        let path = container(deployment, "kache")[probe]["httpGet"]["path"]
            .as_str()
            .unwrap();
        let answer = raw::get(kache.admin_addr(), path).unwrap();
        assert_eq!(answer.status, 200, "{probe} {path}: {}", answer.text());
    }
    poll_until(Duration::from_secs(30), "kache's discovery to be in sync", || {
        (metric(&kache.metrics(), "kache_discovery_synced", &[]) == 1.0).then_some(())
    });

    // The runner's kubeconfig as mounted, its server this kache's address
    // and its namespace the test's.
    let mut kubeconfig: Value = serde_saphyr::from_str(
        object(&docs, "ConfigMap", "ci-runner-kache")["data"]["kubeconfig"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    for cluster in kubeconfig["clusters"].as_array_mut().unwrap() {
        cluster["cluster"]["server"] = json!(kache.url());
    }
    for context in kubeconfig["contexts"].as_array_mut().unwrap() {
        context["context"]["namespace"] = json!(n);
    }
    let runner = tmp.path().join("runner.kubeconfig");
    std::fs::write(&runner, serde_saphyr::to_string(&kubeconfig).unwrap()).unwrap();

    // A job as the example describes: deploy an app, look at it. Each run
    // is a fresh kubectl (no discovery cache), as in a fresh CI job.
    let app = yaml_stream(&[
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "app-config"}, "data": {"greeting": "hi"}}),
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "app"},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": "app"}},
                "template": {
                    "metadata": {"labels": {"app": "app"}},
                    "spec": {"containers": [{"name": "app", "image": "app:1"}]},
                },
            },
        }),
    ]);
    let job = || {
        Kubectl::new(&runner)
            .stdin(app.clone())
            .run(&["apply", "-f", "-"])
            .ok();
        let listed = kubectl(&runner, &["get", "deployments,configmaps,pods", "-o", "name"]).ok();
        assert!(
            listed.stdout.contains("deployment.apps/app") && listed.stdout.contains("configmap/app-config"),
            "{}",
            listed.stdout
        );
        // An informer's first read: forwarded, as the account may not list
        // configmaps cluster-wide.
        let cached = get_raw(
            &runner,
            &format!("/api/v1/namespaces/{n}/configmaps?resourceVersion=0"),
        )
        .ok();
        assert!(cached.stdout.contains("\"app-config\""), "{}", cached.stdout);
    };
    job();
    let second = c.audit().mark();
    job();

    // The second job's discovery came from kache's memory. (What the API
    // server does not have, it is asked for again: /openapi/v3 of a 1.20
    // API server, which kubectl 1.27 and later ask for.)
    let entries = second.entries_after_sentinel();
    let upstream_discovery: Vec<String> = finished(&entries)
        .iter()
        .filter(|e| e["user"]["username"] == user.as_str() && e["responseStatus"]["code"] != 404)
        .filter_map(|e| e["requestURI"].as_str())
        .filter(|uri| is_discovery(uri))
        .map(str::to_string)
        .collect();
    assert!(
        upstream_discovery.is_empty(),
        "the second job's discovery reached the API server: {upstream_discovery:#?}"
    );
    // Nothing the jobs or kache needed was refused: kache's discovery
    // watches listed their resources, and the jobs' reads were forwarded
    // (the cache is off: no cluster-wide list is even tried).
    let entries = mark.entries_after_sentinel();
    let events: Vec<&Value> = finished(&entries)
        .into_iter()
        .filter(|e| e["user"]["username"] == user.as_str())
        .collect();
    for prefix in [
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
        "/apis/apiregistration.k8s.io/v1/apiservices",
    ] {
        assert!(
            events.iter().any(|e| e["verb"] == "list"
                && e["requestURI"].as_str().unwrap_or_default().starts_with(prefix)
                && e["responseStatus"]["code"] == 200),
            "kache's discovery watches: no successful list {prefix}"
        );
    }
    let refused: Vec<String> = events
        .iter()
        .filter(|e| e["responseStatus"]["code"] == 403)
        .map(|e| format!("{} {}", e["verb"], e["requestURI"]))
        .collect();
    assert!(
        refused.is_empty(),
        "the API server refused the runner's account: {refused:#?}"
    );
    drop(kache);
    drop(rbac);
}

// ------------------------------------------------------- the kache binary ----

/// Runs `kache ARGS` where it finds no cluster: no kubeconfig, not in a pod,
/// an empty home and working directory.
fn kache_without_a_cluster(args: &[String]) -> kache_tests::Output {
    let home = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(kache_bin());
    cmd.args(args)
        .env_clear()
        .env("HOME", home.path())
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .current_dir(home.path())
        .stdin(Stdio::null());
    run_with_timeout(cmd, None, Duration::from_secs(30)).unwrap()
}

/// Whether kache accepts a `kache serve` command line: run as is, it
/// validates its flags and config and gets as far as looking for its
/// cluster (which it does not find), before binding anything; and where
/// kache has `check-config`, that accepts the same flags.
fn serve_accepted(args: &[String]) -> Result<(), String> {
    assert_eq!(args.first().map(String::as_str), Some("serve"), "{args:?}");
    let out = kache_without_a_cluster(args);
    if out.success() || !out.stderr.starts_with("Error: upstream:") {
        return Err(format!(
            "`kache {}` ({}): {}",
            args.join(" "),
            out.status,
            out.stderr
        ));
    }
    if kache_subcommands().contains("check-config") {
        let mut check = vec!["check-config".to_string()];
        check.extend_from_slice(&args[1..]);
        let out = kache_without_a_cluster(&check);
        if !out.success() {
            return Err(format!(
                "`kache {}` ({}): {}",
                check.join(" "),
                out.status,
                out.stderr
            ));
        }
    }
    Ok(())
}

/// The subcommands `kache --help` lists.
fn kache_subcommands() -> BTreeSet<String> {
    let help = kache_without_a_cluster(&["--help".into()]);
    assert!(help.success(), "kache --help: {}", help.stderr);
    help.stdout
        .split("Commands:")
        .nth(1)
        .expect("kache --help lists its commands")
        .lines()
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .collect()
}

/// The long flags `kache SUBCOMMAND --help` lists.
fn kache_flags(subcommand: &str) -> BTreeSet<String> {
    let help = kache_without_a_cluster(&[subcommand.into(), "--help".into()]);
    assert!(help.success(), "kache {subcommand} --help: {}", help.stderr);
    help.stdout
        .lines()
        .filter(|l| l.trim_start().starts_with('-'))
        .flat_map(|l| l.split_whitespace())
        .filter(|w| w.starts_with("--"))
        // `--tls[=<BOOL>]`, `--help,`: the name alone.
        .map(|w| w.split(['[', '=', ',']).next().unwrap().to_string())
        .collect()
}

/// The environment variables kache reads its flags from, as `kache serve
/// --help` and `kache kubeconfig --help` list them (`[env: KACHE_…]`).
fn kache_flag_variables() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for subcommand in ["serve", "kubeconfig"] {
        let help = kache_without_a_cluster(&[subcommand.into(), "--help".into()]);
        assert!(help.success(), "kache {subcommand} --help: {}", help.stderr);
        for (at, tag) in help.stdout.match_indices("[env: ") {
            let name: String = help.stdout[at + tag.len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            names.insert(name);
        }
    }
    // Every flag of `serve` has one, named after it: the list is complete.
    for flag in kache_flags("serve") {
        if flag != "--help" {
            let name = format!("KACHE_{}", flag[2..].replace('-', "_").to_ascii_uppercase());
            assert!(
                names.contains(&name),
                "`kache serve --help` shows {flag} without [env: {name}] ({names:?})"
            );
        }
    }
    names
}

/// Checks a kache command line's subcommand and long flags against kache's
/// own help.
#[track_caller]
fn assert_known_to_kache(args: &[String], what: &str) {
    let subcommand = args
        .first()
        .unwrap_or_else(|| panic!("{what}: `kache` without a command"));
    assert!(
        kache_subcommands().contains(subcommand),
        "{what}: kache has no command {subcommand}"
    );
    let flags = kache_flags(subcommand);
    for arg in &args[1..] {
        if let Some(flag) = arg.strip_prefix("--") {
            let name = format!("--{}", flag.split('=').next().unwrap());
            assert!(
                flags.contains(&name),
                "{what}: `kache {subcommand}` has no flag {name} (it has {flags:?})"
            );
        }
    }
}

/// The value of `--flag VALUE` or `--flag=VALUE` in a command line.
fn flag_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    let with_equals = format!("{flag}=");
    args.iter().enumerate().find_map(|(i, arg)| {
        if arg == flag {
            args.get(i + 1).map(String::as_str)
        } else {
            arg.strip_prefix(&with_equals)
        }
    })
}

// -------------------------------------------------------------- Dockerfile ----

/// Dockerfile instructions (BuildKit's list).
const DOCKERFILE_INSTRUCTIONS: &[&str] = &[
    "ADD",
    "ARG",
    "CMD",
    "COPY",
    "ENTRYPOINT",
    "ENV",
    "EXPOSE",
    "FROM",
    "HEALTHCHECK",
    "LABEL",
    "MAINTAINER",
    "ONBUILD",
    "RUN",
    "SHELL",
    "STOPSIGNAL",
    "USER",
    "VOLUME",
    "WORKDIR",
];

/// One instruction of a Dockerfile: its keyword (upper case), its
/// arguments, its line.
struct Instruction {
    keyword: String,
    args: String,
    line: usize,
}

/// The instructions of a Dockerfile: comments and blank lines left out,
/// continued lines (`\` at the end) joined, as BuildKit reads them.
fn dockerfile_instructions(text: &str) -> Vec<Instruction> {
    let mut instructions = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && pending.is_none()) {
            continue;
        }
        let (start, mut joined) = pending.take().unwrap_or((i + 1, String::new()));
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                joined.push_str(part);
                joined.push(' ');
                pending = Some((start, joined));
            }
            None => {
                joined.push_str(trimmed);
                let (keyword, args) = joined.split_once(char::is_whitespace).unwrap_or((&joined, ""));
                instructions.push(Instruction {
                    keyword: keyword.to_ascii_uppercase(),
                    args: args.trim().to_string(),
                    line: start,
                });
            }
        }
    }
    assert!(pending.is_none(), "the Dockerfile ends in a continued line");
    instructions
}

/// The JSON (exec) form of CMD/ENTRYPOINT.
#[track_caller]
fn exec_form(instruction: &Instruction) -> Vec<String> {
    serde_json::from_str(&instruction.args).unwrap_or_else(|e| {
        panic!(
            "{DOCKERFILE}:{}: {} is not in exec form (a JSON array of strings: no shell, signals reach kache): {e}",
            instruction.line, instruction.keyword
        )
    })
}

/// The package and binary target `kache` comes from, by `cargo metadata`.
fn kache_package() -> String {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metadata: Value = serde_json::from_slice(&out.stdout).unwrap();
    let packages: Vec<String> = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| {
            p["targets"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t["name"] == "kache" && t["kind"].as_array().unwrap().iter().any(|k| k == "bin"))
        })
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        packages.len(),
        1,
        "packages with a binary named kache: {packages:?}"
    );
    packages[0].clone()
}

#[test]
fn dockerfile_builds_the_cargo_binary_and_runs_a_command_line_kache_accepts() {
    let text = std::fs::read_to_string(workspace_root().join(DOCKERFILE)).unwrap();
    let instructions = dockerfile_instructions(&text);

    // Syntax: known instructions; FROM first (after ARGs); stages named
    // once; every COPY --from an earlier stage.
    let mut stages: Vec<(Option<String>, Vec<&Instruction>)> = Vec::new();
    for instruction in &instructions {
        let at = format!("{DOCKERFILE}:{}", instruction.line);
        assert!(
            DOCKERFILE_INSTRUCTIONS.contains(&instruction.keyword.as_str()),
            "{at}: unknown instruction {}",
            instruction.keyword
        );
        if instruction.keyword == "FROM" {
            let words: Vec<&str> = instruction.args.split_whitespace().collect();
            let name = match words.as_slice() {
                [_image] => None,
                [_image, as_, name] if as_.eq_ignore_ascii_case("as") => Some(name.to_ascii_lowercase()),
                _ => panic!("{at}: FROM {}", instruction.args),
            };
            assert!(
                name.is_none() || stages.iter().all(|(n, _)| *n != name),
                "{at}: stage {name:?} named twice"
            );
            stages.push((name, Vec::new()));
            continue;
        }
        match stages.last_mut() {
            Some((_, body)) => body.push(instruction),
            None => assert_eq!(instruction.keyword, "ARG", "{at}: before the first FROM"),
        }
        if ["COPY", "ADD"].contains(&instruction.keyword.as_str()) {
            if let Some(from) = instruction
                .args
                .split_whitespace()
                .find_map(|w| w.strip_prefix("--from="))
            {
                let current = stages.len() - 1;
                let earlier = &stages[..current];
                let known = earlier
                    .iter()
                    .any(|(n, _)| n.as_deref() == Some(&from.to_ascii_lowercase()))
                    || from.parse::<usize>().is_ok_and(|i| i < current);
                assert!(known, "{at}: COPY --from={from} names no earlier stage");
            }
        }
    }
    assert!(stages.len() >= 2, "a build stage and a runtime stage");

    // The runtime stage copies what `cargo build --release -p <package>
    // --bin kache` leaves in <WORKDIR>/target/release/kache of the build stage.
    let package = kache_package();
    let (_, runtime) = stages.last().unwrap();
    let copies: Vec<Vec<&str>> = runtime
        .iter()
        .filter(|i| i.keyword == "COPY" && i.args.contains("--from="))
        .map(|i| i.args.split_whitespace().collect())
        .collect();
    assert_eq!(
        copies.len(),
        1,
        "one COPY --from in the runtime stage: {copies:?}"
    );
    let [from, source, destination] = copies[0].as_slice() else {
        panic!("COPY --from=STAGE SOURCE DESTINATION: {:?}", copies[0])
    };
    let from = from.strip_prefix("--from=").unwrap().to_ascii_lowercase();
    let (_, build) = stages
        .iter()
        .find(|(n, _)| n.as_deref() == Some(&from))
        .unwrap_or_else(|| panic!("no stage {from}"));
    let workdir = build
        .iter()
        .rev()
        .find(|i| i.keyword == "WORKDIR")
        .expect("the build stage sets its WORKDIR")
        .args
        .trim_end_matches('/')
        .to_string();
    assert_eq!(*source, format!("{workdir}/target/release/kache"));
    let cargo_build = build
        .iter()
        .find(|i| i.keyword == "RUN" && i.args.contains("cargo build"))
        .expect("the build stage runs cargo build");
    let words: Vec<&str> = cargo_build.args.split_whitespace().collect();
    assert!(words.contains(&"--release"), "{}", cargo_build.args);
    assert!(
        words
            .windows(2)
            .any(|w| (w[0] == "-p" || w[0] == "--package") && w[1] == package),
        "{}: not -p {package}",
        cargo_build.args
    );
    assert!(
        words.windows(2).any(|w| w == ["--bin", "kache"]),
        "{}",
        cargo_build.args
    );
    // The context has no .git: the commit `kache version` names comes from
    // KACHE_GIT_COMMIT (proxy/build.rs), a build argument declared before
    // cargo runs.
    let build_rs = std::fs::read_to_string(workspace_root().join("proxy/build.rs")).unwrap();
    assert!(
        build_rs.contains("env::var(\"KACHE_GIT_COMMIT\")"),
        "proxy/build.rs no longer reads KACHE_GIT_COMMIT"
    );
    assert!(
        build.iter().any(|i| i.keyword == "ARG"
            && i.args.split('=').next() == Some("KACHE_GIT_COMMIT")
            && i.line < cargo_build.line),
        "the build stage takes no KACHE_GIT_COMMIT build argument before cargo build"
    );
    for moves_the_output in [
        "--target",
        "--target-dir",
        "--profile",
        "--out-dir",
        "--artifact-dir",
    ] {
        assert!(!words.contains(&moves_the_output), "{}", cargo_build.args);
    }
    for moves_the_output in ["CARGO_TARGET_DIR", "CARGO_BUILD_TARGET", "CARGO_BUILD_TARGET_DIR"] {
        assert!(
            build.iter().all(|i| !i.args.contains(moves_the_output)),
            "the build stage sets {moves_the_output}"
        );
    }
    for config in [".cargo/config.toml", ".cargo/config"] {
        if let Ok(text) = std::fs::read_to_string(workspace_root().join(config)) {
            assert!(!text.contains("target-dir"), "{config} moves the build output");
        }
    }
    // `--locked` needs Cargo.lock in the build context: the context is the
    // workspace, less what deploy/Dockerfile.dockerignore leaves out.
    if words.contains(&"--locked") {
        assert!(workspace_root().join("Cargo.lock").is_file());
    }
    let ignore = std::fs::read_to_string(workspace_root().join("deploy/Dockerfile.dockerignore")).unwrap();
    let ignored: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert!(
        ignored.contains(&"target/"),
        "the build output is left out of the context"
    );
    for needed in [
        "Cargo.lock",
        "Cargo.toml",
        "config",
        "cache",
        "proxy",
        "tests",
        "benches",
        "*",
        "**",
    ] {
        assert!(
            ignored.iter().all(|p| p.trim_end_matches('/') != needed),
            "deploy/Dockerfile.dockerignore leaves out {needed}"
        );
    }

    // The image runs the copied binary, as a user that is not root.
    let last = |keyword: &str| runtime.iter().rev().find(|i| i.keyword == keyword).copied();
    let entrypoint = exec_form(last("ENTRYPOINT").expect("an ENTRYPOINT"));
    assert_eq!(entrypoint, vec![destination.to_string()]);
    let user = last("USER").expect("a USER").args.clone();
    let uid = user.split(':').next().unwrap();
    assert!(uid != "root" && uid != "0", "USER {user}");

    // Its default command line is one kache accepts, on ports it exposes.
    let command = exec_form(last("CMD").expect("a CMD"));
    assert_known_to_kache(&command, "the Dockerfile's CMD");
    serve_accepted(&command).unwrap_or_else(|e| panic!("the Dockerfile's CMD: {e}"));
    let exposed: BTreeSet<u16> = runtime
        .iter()
        .filter(|i| i.keyword == "EXPOSE")
        .flat_map(|i| i.args.split_whitespace())
        .map(|p| p.trim_end_matches("/tcp").parse().unwrap())
        .collect();
    for flag in ["--listen", "--admin-listen"] {
        let addr: SocketAddr = flag_value(&command, flag)
            .unwrap_or_else(|| panic!("the CMD sets no {flag}"))
            .parse()
            .unwrap();
        assert!(
            addr.ip().is_unspecified(),
            "{flag} {addr}: unreachable from outside the container"
        );
        assert!(
            exposed.contains(&addr.port()),
            "{flag} {addr} not in EXPOSE {exposed:?}"
        );
    }
    // And the check itself tells a refused command line apart: shared mode
    // without TLS is refused before kache looks for a cluster.
    let without_tls: Vec<String> = command.iter().filter(|a| *a != "--tls").cloned().collect();
    assert_ne!(without_tls, command, "the CMD serves TLS");
    let refused = serve_accepted(&without_tls).expect_err("shared mode without TLS");
    assert!(refused.contains("HTTPS"), "{refused}");
}

// ------------------------------------------------------------ CI examples ----

/// A simple command of a shell script: its words (quotes removed, variables
/// expanded) and where its standard output is redirected to.
#[derive(Debug)]
struct ShellCommand {
    words: Vec<String>,
    stdout: Option<String>,
}

/// Splits a POSIX shell script into simple commands, as far as CI scripts
/// need: quotes, `\` line continuations, `$VAR` and `${VAR}` (replaced by
/// `var(NAME)`), `;`, `&&`, `||`, `|`, `&`, `$( … )` and redirections.
fn shell_commands(script: &str, var: &dyn Fn(&str) -> String) -> Vec<ShellCommand> {
    #[derive(Default)]
    struct Parser {
        commands: Vec<ShellCommand>,
        words: Vec<String>,
        stdout: Option<String>,
        word: Option<String>,
        /// The next word is a redirection's target (true: of stdout).
        redirect: Option<bool>,
    }
    impl Parser {
        fn push(&mut self, s: &str) {
            self.word.get_or_insert_with(String::new).push_str(s);
        }
        fn end_word(&mut self) {
            if let Some(word) = self.word.take() {
                match self.redirect.take() {
                    Some(true) => self.stdout = Some(word),
                    Some(false) => {}
                    None => self.words.push(word),
                }
            }
        }
        fn end_command(&mut self) {
            self.end_word();
            let words = std::mem::take(&mut self.words);
            let stdout = self.stdout.take();
            if !words.is_empty() {
                self.commands.push(ShellCommand { words, stdout });
            }
        }
    }
    /// Expands the variable at `chars[i]` (a `$`); returns its value and
    /// the index of its last character.
    fn variable(chars: &[char], i: usize, var: &dyn Fn(&str) -> String) -> (String, usize) {
        let name_char = |c: &char| c.is_ascii_alphanumeric() || *c == '_';
        if chars.get(i + 1) == Some(&'{') {
            let end = (i + 2..chars.len())
                .find(|j| chars[*j] == '}')
                .expect("an unclosed ${");
            (var(&chars[i + 2..end].iter().collect::<String>()), end)
        } else {
            let name: String = chars[i + 1..].iter().take_while(|c| name_char(c)).collect();
            if name.is_empty() {
                ("$".into(), i)
            } else {
                let end = i + name.chars().count();
                (var(&name), end)
            }
        }
    }

    let script = script.replace("\\\n", " ");
    let chars: Vec<char> = script.chars().collect();
    let mut p = Parser::default();
    let mut i = 0;
    while i < chars.len() {
        let next = chars.get(i + 1).copied();
        match chars[i] {
            ' ' | '\t' => p.end_word(),
            '\n' | ';' | '(' | ')' => p.end_command(),
            '&' | '|' => {
                if next == Some(chars[i]) {
                    i += 1;
                }
                p.end_command();
            }
            '#' if p.word.is_none() => {
                while i + 1 < chars.len() && chars[i + 1] != '\n' {
                    i += 1;
                }
            }
            c @ ('>' | '<') => {
                // A file descriptor number before it belongs to the redirection.
                let fd = p.word.take_if(|w| w.chars().all(|c| c.is_ascii_digit()));
                p.end_word();
                let stdout = c == '>' && fd.as_deref().is_none_or(|fd| fd == "1");
                if next == Some('>') {
                    i += 1;
                }
                if chars.get(i + 1) == Some(&'&') {
                    // 2>&1: a duplication, no target word.
                    i += 1;
                    while chars.get(i + 1).is_some_and(|c| c.is_ascii_digit()) {
                        i += 1;
                    }
                } else {
                    p.redirect = Some(stdout);
                }
            }
            '\'' => {
                let end = (i + 1..chars.len())
                    .find(|j| chars[*j] == '\'')
                    .expect("an unclosed '");
                p.push(&chars[i + 1..end].iter().collect::<String>());
                i = end;
            }
            '"' => {
                p.push("");
                i += 1;
                while chars[i] != '"' {
                    match chars[i] {
                        '\\' if matches!(chars[i + 1], '$' | '"' | '\\' | '`') => {
                            i += 1;
                            p.push(&chars[i].to_string());
                        }
                        '$' => {
                            let (value, end) = variable(&chars, i, var);
                            p.push(&value);
                            i = end;
                        }
                        c => p.push(&c.to_string()),
                    }
                    i += 1;
                }
            }
            '$' if next == Some('(') => {
                p.end_command();
                i += 1;
            }
            '$' => {
                let (value, end) = variable(&chars, i, var);
                p.push(&value);
                i = end;
            }
            '\\' => {
                i += 1;
                p.push(&chars[i].to_string());
            }
            c => p.push(&c.to_string()),
        }
        i += 1;
    }
    p.end_command();
    p.commands
}

/// The `kache` command lines among shell commands (after `nohup`, `exec`,
/// `sudo`, `env` and variable assignments), with their stdout target.
fn kache_invocations(commands: &[ShellCommand]) -> Vec<(Vec<String>, Option<String>)> {
    commands
        .iter()
        .filter_map(|c| {
            let is_assignment = |w: &String| {
                w.split_once('=').is_some_and(|(name, _)| {
                    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                })
            };
            let mut words = c.words.iter().skip_while(|w| {
                ["nohup", "exec", "sudo", "env", "time"].contains(&w.as_str()) || is_assignment(w)
            });
            let program = words.next()?;
            (program == "kache" || program.ends_with("/kache"))
                .then(|| (words.cloned().collect(), c.stdout.clone()))
        })
        .collect()
}

/// The shell scripts of a GitHub Actions workflow: every step's `run`.
fn github_scripts(workflow: &Value) -> Vec<String> {
    assert!(
        workflow.get("on").is_some(),
        "a workflow says when it runs (`on`)"
    );
    let jobs = workflow["jobs"].as_object().expect("a workflow has jobs");
    assert!(!jobs.is_empty());
    let mut scripts = Vec::new();
    for (name, job) in jobs {
        assert!(job["runs-on"].is_string(), "job {name}: runs-on");
        for step in job["steps"]
            .as_array()
            .unwrap_or_else(|| panic!("job {name}: steps"))
        {
            assert!(
                step.get("run").is_some() != step.get("uses").is_some(),
                "job {name}: a step either runs or uses: {step}"
            );
            if let Some(run) = step.get("run") {
                scripts.push(run.as_str().unwrap().to_string());
            }
        }
    }
    scripts
}

/// The shell scripts of a .gitlab-ci.yml: every job's before_script, script
/// and after_script, each one shell session (after_script apart).
fn gitlab_scripts(pipeline: &Value) -> Vec<String> {
    let mut scripts = Vec::new();
    let mut jobs = 0;
    for (name, job) in pipeline.as_object().unwrap() {
        if job.get("script").is_none() {
            continue;
        }
        jobs += 1;
        let lines = |key: &str| -> Vec<String> {
            match &job[key] {
                Value::Null => Vec::new(),
                Value::String(s) => vec![s.clone()],
                Value::Array(lines) => lines
                    .iter()
                    .map(|l| {
                        l.as_str()
                            .unwrap_or_else(|| panic!("job {name}: {key} holds a non-string {l}"))
                            .to_string()
                    })
                    .collect(),
                other => panic!("job {name}: {key} is {other}"),
            }
        };
        let mut session = lines("before_script");
        session.extend(lines("script"));
        scripts.push(session.join("\n"));
        scripts.push(lines("after_script").join("\n"));
    }
    assert!(jobs > 0, "a pipeline with no job");
    scripts
}

/// The environment variables a CI example sets: the names in every `env`
/// (GitHub Actions: the workflow's, a job's, a step's) and `variables`
/// (GitLab: the pipeline's, a job's) mapping, and in its scripts every
/// `NAME=value` word (an assignment, an `export`, a line appended to
/// `$GITHUB_ENV`) and every name `export` is given.
fn variables_set(doc: &Value, commands: &[ShellCommand]) -> BTreeSet<String> {
    fn mappings(value: &Value, names: &mut BTreeSet<String>) {
        match value {
            Value::Object(map) => {
                for (key, value) in map {
                    if let ("env" | "variables", Value::Object(variables)) = (key.as_str(), value) {
                        names.extend(variables.keys().cloned());
                    }
                    mappings(value, names);
                }
            }
            Value::Array(items) => items.iter().for_each(|v| mappings(v, names)),
            _ => {}
        }
    }
    let is_name = |name: &str| {
        name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    let mut names = BTreeSet::new();
    mappings(doc, &mut names);
    for command in commands {
        let exports = command.words[0] == "export";
        for word in command.words.iter().skip(usize::from(exports)) {
            let name = match word.split_once('=') {
                Some((name, _)) => name,
                None if exports => word.as_str(),
                None => continue,
            };
            if is_name(name) {
                names.insert(name.to_string());
            }
        }
    }
    names
}

#[test]
fn ci_examples_are_valid_yaml_and_kache_accepts_their_command_lines() {
    let tmp = tempfile::tempdir().unwrap();
    // Variables stand for paths in an empty directory: the upstream
    // kubeconfig does not exist, so `kache serve` stops where it looks for
    // its cluster, after validating everything else.
    let vars = tmp.path().join("vars");
    let var = |name: &str| format!("{}/{name}", vars.display());
    let flag_variables = kache_flag_variables();
    for (file, scripts) in [
        (GITHUB_ACTIONS, github_scripts as fn(&Value) -> Vec<String>),
        (GITLAB_CI, gitlab_scripts),
    ] {
        let docs = documents(&workspace_root().join(file));
        assert_eq!(docs.len(), 1, "{file}: one YAML document");
        let commands: Vec<ShellCommand> = scripts(&docs[0])
            .iter()
            .flat_map(|s| shell_commands(s, &var))
            .collect();
        // kache reads a KACHE_<FLAG> variable as that flag: one the job sets
        // for itself (or for its clients) would configure kache instead.
        let colliding: Vec<String> = variables_set(&docs[0], &commands)
            .intersection(&flag_variables)
            .cloned()
            .collect();
        assert!(
            colliding.is_empty(),
            "{file} sets {colliding:?}, which kache reads as its flags (`kache serve --help`): \
             give the job's own variables other names"
        );
        let invocations = kache_invocations(&commands);
        let serve: Vec<&Vec<String>> = invocations
            .iter()
            .filter(|(args, _)| args.first().is_some_and(|c| c == "serve"))
            .map(|(args, _)| args)
            .collect();
        assert_eq!(serve.len(), 1, "{file}: one `kache serve`: {invocations:?}");
        let serve = serve[0];
        for (args, _) in &invocations {
            assert_known_to_kache(args, file);
        }
        serve_accepted(serve).unwrap_or_else(|e| panic!("{file}: {e}"));
        let listen: SocketAddr = flag_value(serve, "--listen")
            .unwrap_or("127.0.0.1:8001")
            .parse()
            .unwrap();
        let admin: SocketAddr = flag_value(serve, "--admin-listen")
            .unwrap_or("127.0.0.1:9901")
            .parse()
            .unwrap();
        assert!(
            listen.ip().is_loopback(),
            "{file}: local mode without a token listens on loopback"
        );

        // `kache kubeconfig` prints the kubeconfig of that listener, and the
        // job's KUBECONFIG is then that file.
        let kubeconfigs: Vec<&(Vec<String>, Option<String>)> = invocations
            .iter()
            .filter(|(args, _)| args.first().is_some_and(|c| c == "kubeconfig"))
            .collect();
        assert!(!kubeconfigs.is_empty(), "{file}: no `kache kubeconfig`");
        for (args, stdout) in kubeconfigs {
            let out = kache_without_a_cluster(args);
            assert!(
                out.success(),
                "{file}: `kache {}`: {}",
                args.join(" "),
                out.stderr
            );
            let printed: Value = serde_saphyr::from_str(&out.stdout).unwrap();
            assert_eq!(
                printed["clusters"][0]["cluster"]["server"],
                format!("http://{listen}"),
                "{file}: `kache {}` names another server than kache serve's",
                args.join(" ")
            );
            let target = stdout
                .as_deref()
                .unwrap_or_else(|| panic!("{file}: `kache {}` goes to no file", args.join(" ")));
            let exported = format!("KUBECONFIG={target}");
            assert!(
                commands.iter().any(|c| c.words.contains(&exported)),
                "{file}: KUBECONFIG is never set to {target}"
            );
        }

        // The readiness check and the metrics are read from the admin listener.
        let text = std::fs::read_to_string(workspace_root().join(file)).unwrap();
        for (at, _) in text.match_indices("http://") {
            let url = &text[at + "http://".len()..];
            let (host, path) = url.split_once('/').unwrap();
            let path = path
                .split(|c: char| c.is_whitespace() || c == '"' || c == '\'')
                .next()
                .unwrap();
            if ["readyz", "livez", "healthz", "metrics"].contains(&path) {
                assert_eq!(
                    host,
                    admin.to_string(),
                    "{file}: /{path} of another address than --admin-listen"
                );
            }
        }
    }
}

#[test]
fn shell_commands_are_split_as_the_shell_splits_them() {
    let var = |name: &str| format!("<{name}>");
    let commands = shell_commands(
        "nohup kache serve --kubeconfig \"$A\" \\\n  --listen 127.0.0.1:8001 > \"${B}/log\" 2>&1 &\n\
         id=$(docker create 'x y') # comment\n\
         kache kubeconfig --x=1 >> $C && echo \"K=$D/k\" | tee -a e",
        &var,
    );
    let words: Vec<Vec<&str>> = commands
        .iter()
        .map(|c| c.words.iter().map(String::as_str).collect())
        .collect();
    assert_eq!(
        words,
        vec![
            vec![
                "nohup",
                "kache",
                "serve",
                "--kubeconfig",
                "<A>",
                "--listen",
                "127.0.0.1:8001"
            ],
            vec!["id="],
            vec!["docker", "create", "x y"],
            vec!["kache", "kubeconfig", "--x=1"],
            vec!["echo", "K=<D>/k"],
            vec!["tee", "-a", "e"],
        ]
    );
    assert_eq!(commands[0].stdout.as_deref(), Some("<B>/log"));
    assert_eq!(commands[3].stdout.as_deref(), Some("<C>"));
    let invocations = kache_invocations(&commands);
    assert_eq!(invocations.len(), 2);
    assert_eq!(invocations[0].0[0], "serve");
}

#[test]
fn variables_set_are_found_wherever_a_ci_file_sets_them() {
    let doc = json!({
        "env": {"TOP": "1"},
        "variables": {"PIPELINE": "1"},
        "jobs": {"a": {"env": {"JOB": "1"}, "steps": [{"env": {"STEP": "1"}, "run": "true"}]}},
        "deploy": {"variables": {"KACHE_KUBECONFIG": {"value": "x", "description": "y"}}},
    });
    let var = |name: &str| format!("<{name}>");
    let commands = shell_commands(
        "export A=1 B\nC=2 kache serve --listen=127.0.0.1:8001\n\
         echo \"D=$E/k\" >> \"$GITHUB_ENV\"\nkubectl get pods -l app=x\nexport",
        &var,
    );
    let names: Vec<String> = variables_set(&doc, &commands).into_iter().collect();
    assert_eq!(
        names,
        [
            "A",
            "B",
            "C",
            "D",
            "JOB",
            "KACHE_KUBECONFIG",
            "PIPELINE",
            "STEP",
            "TOP",
            "app"
        ]
    );
}
