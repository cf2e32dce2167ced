//! Warm starts that must not be trusted: snapshots whose version the API
//! server has compacted away, snapshots that are damaged, of another cluster
//! or of an older format, and a state directory kache cannot write. Each time
//! kache must answer what the API server holds now — relisting once where it
//! has to, never serving a snapshot's stale content — and keep running.
//!
//! ```text
//!   kache ─(snapshots every 1 s)─► <stateDir>/snapshots/<cluster UID>/_v1_<resource>_json.ksnap
//!     │ SIGKILL; objects change; the test compacts etcd / damages the files
//!     ▼
//!   kache again, same state dir ─► audit log: the LISTs it sent (closed by a sentinel)
//!                                ─► its rv=0 answers == the API server's lists
//! ```
//!
//! The compaction and damage cases run against a cluster of their own (the
//! API server is restarted; the audit log then holds only this file's
//! requests), one at a time; the shared cluster provides the other cluster
//! whose snapshot is "foreign".

#![allow(clippy::unwrap_used)] // test helpers, not only #[test] fns (STYLE.md)

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use kache_tests::{
    client_from_kubeconfig, cluster, metric, poll_until, raw, target_dir, unique_name, write_json,
    AuditFilter, AuditLog, AuditMark, Kache, OwnCluster, TestNamespace, Value,
};
use serde_json::json;

/// The identity every kache in front of the own cluster uses upstream
/// (`admin-token.kubeconfig`); the test reads directly as `admin`.
const KACHE_USER: &str = "admin-token";
/// Where the tests of this file that need a cluster of their own run it.
const OWN_CLUSTER: &str = "kache-cluster-warm";
/// Bound for kache to cache a resource, write a snapshot, log a line.
const SETTLE: Duration = Duration::from_secs(30);
/// The first bytes of a snapshot: magic (8), format version (u32 LE).
const PREFIX_LEN: usize = 12;
/// kache's snapshot layout version (cache/src/snapshot.rs FORMAT_VERSION).
const FORMAT_VERSION: u32 = 1;

/// The tests that run the own cluster, one at a time (one restarts its API
/// server); a failed test must not stop the next one.
fn own_cluster() -> (MutexGuard<'static, ()>, OwnCluster) {
    static LOCK: Mutex<()> = Mutex::new(());
    let guard = LOCK.lock().unwrap_or_else(PoisonError::into_inner);
    (guard, OwnCluster::up(&target_dir().join(OWN_CLUSTER)))
}

// ------------------------------------------------------------- resources ----

/// A core (`v1`) namespaced resource the tests create objects of.
#[derive(Clone, Copy)]
struct Res {
    plural: &'static str,
    kind: &'static str,
}

const CONFIGMAPS: Res = Res {
    plural: "configmaps",
    kind: "ConfigMap",
};
const SECRETS: Res = Res {
    plural: "secrets",
    kind: "Secret",
};
const PODTEMPLATES: Res = Res {
    plural: "podtemplates",
    kind: "PodTemplate",
};
const ENDPOINTS: Res = Res {
    plural: "endpoints",
    kind: "Endpoints",
};

impl Res {
    fn collection(&self, ns: &str) -> String {
        format!("/api/v1/namespaces/{ns}/{}", self.plural)
    }

    /// What a client reads from kache's cache: the list at version 0.
    fn cached(&self, ns: &str) -> String {
        format!("{}?resourceVersion=0", self.collection(ns))
    }

    /// The URI of kache's reflector LIST of this resource.
    fn reflector_list(&self) -> String {
        format!("/api/v1/{}?resourceVersion=0", self.plural)
    }

    /// The `kache_cache_*` metrics' `resource` label.
    fn metric(&self) -> String {
        format!("v1/{}", self.plural)
    }

    /// The name of its JSON store's snapshot (cache/src/snapshot.rs: the
    /// core group is the empty first part).
    fn snapshot_name(&self) -> String {
        format!("_v1_{}_json.ksnap", self.plural)
    }

    fn object(&self, name: &str) -> Value {
        let mut object = json!({"apiVersion": "v1", "kind": self.kind, "metadata": {"name": name}});
        let body = match self.kind {
            "ConfigMap" => json!({"data": {"k": name}}),
            "Secret" => json!({"stringData": {"k": name}}),
            "PodTemplate" => {
                json!({"template": {"spec": {"containers": [{"name": "c", "image": "busybox"}]}}})
            }
            _ => json!({"subsets": [{"addresses": [{"ip": "10.0.0.1"}], "ports": [{"port": 80}]}]}),
        };
        for (k, v) in body.as_object().unwrap() {
            object[k] = v.clone();
        }
        object
    }
}

// ---------------------------------------------------------------- direct ----

/// Reads and writes straight to an API server, as admin.
struct Direct {
    runtime: tokio::runtime::Runtime,
    client: kube::Client,
}

impl Direct {
    fn new(admin_kubeconfig: &Path) -> Direct {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let client = runtime.block_on(client_from_kubeconfig(admin_kubeconfig));
        Direct { runtime, client }
    }

    fn write(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        self.runtime
            .block_on(write_json(&self.client, method, path, body))
    }

    fn get(&self, path: &str) -> Value {
        let request = http::Request::get(path).body(Vec::new()).unwrap();
        self.runtime
            .block_on(self.client.request::<Value>(request))
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    fn create_namespace(&self, name: &str) {
        let namespace = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
        self.write("POST", "/api/v1/namespaces", Some(&namespace));
    }

    fn create(&self, res: Res, ns: &str, name: &str) {
        self.write("POST", &res.collection(ns), Some(&res.object(name)));
    }

    /// Deletes `a`, changes `b`, adds `d`: a snapshot taken before holds a
    /// deleted object and an old version.
    fn change(&self, res: Res, ns: &str) {
        let collection = res.collection(ns);
        self.write("DELETE", &format!("{collection}/a"), None);
        let patch = json!({"metadata": {"labels": {"changed": "while-kache-was-down"}}});
        self.write("PATCH", &format!("{collection}/b"), Some(&patch));
        self.create(res, ns, "d");
    }

    /// The UID of `kube-system`: the cluster identity snapshots carry.
    fn cluster_uid(&self) -> String {
        self.get("/api/v1/namespaces/kube-system")["metadata"]["uid"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

/// A list's items by name, without type meta (the API server leaves it out
/// of built-in types' items; v1.20's rv=0 lists come in any order).
fn items(list: &Value) -> BTreeMap<String, Value> {
    list["items"]
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .map(|item| {
            let mut item = item.clone();
            let fields = item.as_object_mut().unwrap();
            fields.remove("kind");
            fields.remove("apiVersion");
            (item["metadata"]["name"].as_str().unwrap().to_string(), item)
        })
        .collect()
}

/// `(name, resourceVersion)` of each item, for messages.
fn versions(items: &BTreeMap<String, Value>) -> Vec<(String, String)> {
    items
        .iter()
        .map(|(name, item)| {
            let rv = item["metadata"]["resourceVersion"].as_str().unwrap_or_default();
            (name.clone(), rv.to_string())
        })
        .collect()
}

/// Reads `res` in `ns` through kache until one answer came from its cache,
/// asserting that every answer (cached or forwarded) is the API server's
/// list — whole objects, no object or version of a snapshot.
/// Returns the list's resourceVersion (the store's).
fn assert_answers_are_direct(kache: &Kache, direct: &Direct, res: Res, ns: &str, when: &str) -> u64 {
    let hits = || {
        metric(
            &kache.metrics(),
            "kache_cache_hits_total",
            &[("resource", &res.metric()), ("encoding", "json")],
        )
    };
    let before = hits();
    poll_until(
        SETTLE,
        &format!("{} {when}: an answer from kache's cache", res.plural),
        || {
            let r = raw::get(kache.addr(), &res.cached(ns)).ok()?;
            if r.status != 200 {
                return None;
            }
            let via = r.json();
            let now = direct.get(&res.collection(ns));
            let (via_items, direct_items) = (items(&via), items(&now));
            assert!(
                via_items == direct_items,
                "{} {when}: kache answered\n  {:?}\nthe API server holds\n  {:?}\n{via}\n{now}",
                res.plural,
                versions(&via_items),
                versions(&direct_items)
            );
            (hits() > before).then(|| rv_of(&via))
        },
    )
}

fn rv_of(list: &Value) -> u64 {
    list["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|rv| rv.parse().ok())
        .unwrap_or_else(|| panic!("no resourceVersion: {list}"))
}

// ------------------------------------------------------------- snapshots ----

/// What a snapshot file's header says (cache/src/snapshot.rs: after the
/// prefix, postcard's encoding of `SnapshotHeader` — varints and
/// length-prefixed strings, in field order).
#[derive(Debug)]
struct Header {
    format_version: u64,
    cluster_uid: String,
    resource: String,
    resource_version: u64,
}

fn read_header(bytes: &[u8]) -> Option<Header> {
    fn varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
        let mut n = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *bytes.get(*at)?;
            *at += 1;
            n |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(n);
            }
        }
        None
    }
    fn string(bytes: &[u8], at: &mut usize) -> Option<String> {
        let len = usize::try_from(varint(bytes, at)?).ok()?;
        let s = std::str::from_utf8(bytes.get(*at..*at + len)?).ok()?.to_string();
        *at += len;
        Some(s)
    }
    if bytes.get(..8)? != b"KACHESNP" {
        return None;
    }
    let mut at = PREFIX_LEN;
    let format_version = varint(bytes, &mut at)?;
    let [_upstream, cluster_uid, _group, _version, resource, _encoding] =
        [(); 6].map(|()| string(bytes, &mut at));
    Some(Header {
        format_version,
        cluster_uid: cluster_uid?,
        resource: resource?,
        resource_version: varint(bytes, &mut at)?,
    })
}

/// CRC-32 (IEEE), as the snapshot's last four bytes hold it.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for byte in bytes {
        crc ^= u32::from(*byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// The directory kache keeps a cluster's snapshots in.
fn snapshot_dir(state: &Path, cluster_uid: &str) -> PathBuf {
    state.join("snapshots").join(cluster_uid)
}

/// Waits until the snapshot at `path` holds its store at `resource_version`
/// or later.
fn await_snapshot(path: &Path, resource_version: u64) {
    poll_until(
        SETTLE,
        &format!("{} at version {resource_version} or later", path.display()),
        || {
            let header = read_header(&std::fs::read(path).ok()?)?;
            (header.resource_version >= resource_version).then_some(())
        },
    );
}

/// Rewrites a sound snapshot as a kache of format version 0 would have
/// written it: both version fields changed, the checksum recomputed, so
/// only the format check can refuse it.
fn rewrite_as_format_zero(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let body = bytes.len() - 4;
    let stored = u32::from_le_bytes(bytes[body..].try_into().unwrap());
    assert_eq!(
        stored,
        crc32(&bytes[..body]),
        "{}: not a sound snapshot",
        path.display()
    );
    assert_eq!(bytes[8..PREFIX_LEN], FORMAT_VERSION.to_le_bytes());
    // The header's first field, a one-byte varint.
    assert_eq!(bytes[PREFIX_LEN], 1);
    bytes[8..PREFIX_LEN].copy_from_slice(&0u32.to_le_bytes());
    bytes[PREFIX_LEN] = 0;
    let crc = crc32(&bytes[..body]);
    bytes[body..].copy_from_slice(&crc.to_le_bytes());
    assert_eq!(read_header(&bytes).unwrap().format_version, 0);
    std::fs::write(path, bytes).unwrap();
}

/// A kache with snapshots every second in `state` (its config file is
/// written to `config`).
fn kache_with_state(kubeconfig: &Path, state: &Path, config: &Path) -> Kache {
    std::fs::write(config, "cache: {snapshotIntervalSeconds: 1}\n").unwrap();
    Kache::start_with_args(
        kubeconfig,
        &[
            "--state-dir",
            state.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ],
    )
}

/// Waits until kache's log has a line containing every one of `parts`; returns it.
fn await_log_line(kache: &Kache, parts: &[&str]) -> String {
    poll_until(SETTLE, &format!("kache to log {parts:?}"), || {
        kache
            .stderr()
            .lines()
            .find(|l| parts.iter().all(|p| l.contains(p)))
            .map(str::to_string)
    })
}

/// kache's reflector LISTs of each of `resources` after `mark`, up to a sentinel.
fn reflector_lists(mark: &AuditMark, resources: &[Res]) -> BTreeMap<&'static str, usize> {
    let by_kache = mark.matching_after_sentinel(&AuditFilter::new().user(KACHE_USER).verb("list"));
    resources
        .iter()
        .map(|res| {
            let uri = res.reflector_list();
            (
                res.plural,
                by_kache.iter().filter(|e| e.request_uri == uri).count(),
            )
        })
        .collect()
}

// ----------------------------------------------------------------- tests ----

#[test]
fn a_warm_start_past_a_compaction_and_an_api_server_restart_relists_each_resource_once() {
    let (_serial, own) = own_cluster();
    let admin = PathBuf::from(own.var("KACHE_ADMIN_KUBECONFIG"));
    let kubeconfig = PathBuf::from(own.var("KACHE_ADMIN_TOKEN_KUBECONFIG"));
    let direct = Direct::new(&admin);
    let audit = AuditLog::new(own.var("KACHE_AUDIT_LOG"), &admin);
    let resources = [CONFIGMAPS, SECRETS];
    let ns = unique_name("warm-compacted");
    direct.create_namespace(&ns);
    for res in resources {
        for name in ["a", "b", "c"] {
            direct.create(res, &ns, name);
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = dir.path().join("kache.yaml");
    let snapshots = snapshot_dir(&state, &direct.cluster_uid());

    // Both stores cached and saved.
    let kache = kache_with_state(&kubeconfig, &state, &config);
    let mut saved = BTreeMap::new();
    for res in resources {
        let rv = assert_answers_are_direct(&kache, &direct, res, &ns, "before the kill");
        let path = snapshots.join(res.snapshot_name());
        await_snapshot(&path, rv);
        saved.insert(res.plural, read_header(&std::fs::read(&path).unwrap()).unwrap());
    }
    // SIGKILL: the periodic snapshots are what the next start finds.
    drop(kache);

    // While kache is down: the objects change, etcd forgets every version
    // the snapshots hold, and the API server's watch cache starts over.
    for res in resources {
        direct.change(res, &ns);
    }
    let compacted = own.compact();
    for header in saved.values() {
        assert!(
            header.resource_version < compacted,
            "compacted at {compacted}: {header:?}"
        );
    }
    direct.runtime.block_on(own.restart_apiserver());

    let mark = audit.mark();
    let kache = kache_with_state(&kubeconfig, &state, &config);
    // The restore comes first (a read before it would start the store cold).
    await_log_line(
        &kache,
        &["warm start: stores restored from snapshots", "stores=2"],
    );
    for res in resources {
        assert_answers_are_direct(&kache, &direct, res, &ns, "after the warm start");
    }
    // Each store resumed with a WATCH from its snapshot's version, which the
    // API server refused (its lines are logged: it ended at once)...
    for res in resources {
        let from = format!("resourceVersion={}&", saved[res.plural].resource_version);
        let prefix = format!("/api/v1/{}?", res.plural);
        let watch = poll_until(
            SETTLE,
            &format!("the watch of {} from the snapshot's version", res.plural),
            || {
                mark.events().into_iter().find(|e| {
                    e.username == KACHE_USER
                        && e.verb == "watch"
                        && e.request_uri.starts_with(&prefix)
                        && e.request_uri.contains(&from)
                })
            },
        );
        eprintln!("resumed and refused: {} ({:?})", watch.request_uri, watch.code);
    }
    // ...and listed once.
    let lists = reflector_lists(&mark, &resources);
    let expected: BTreeMap<_, _> = resources.iter().map(|r| (r.plural, 1)).collect();
    eprintln!("kache's LISTs after the warm start: {lists:?}");
    assert_eq!(lists, expected, "kache's LISTs after the warm start");
    assert!(
        mark.matching_after_sentinel(&AuditFilter::new().user(KACHE_USER))
            .len()
            > lists.len(),
        "no request of {KACHE_USER} found"
    );
}

#[test]
fn damaged_foreign_and_old_snapshots_are_ignored_with_a_warning_and_listed_afresh() {
    let shared = cluster();
    let shared_direct = Direct::new(&shared.admin_kubeconfig);
    let (_serial, own) = own_cluster();
    let admin = PathBuf::from(own.var("KACHE_ADMIN_KUBECONFIG"));
    let kubeconfig = PathBuf::from(own.var("KACHE_ADMIN_TOKEN_KUBECONFIG"));
    let direct = Direct::new(&admin);
    let audit = AuditLog::new(own.var("KACHE_AUDIT_LOG"), &admin);
    // One namespace name in both clusters: a foreign snapshot, if served,
    // would show the shared cluster's objects in it.
    let ns = TestNamespace::create("warm-damaged");
    let ns = ns.name();
    direct.create_namespace(ns);
    let resources = [CONFIGMAPS, SECRETS, PODTEMPLATES, ENDPOINTS];
    for res in resources {
        for name in ["a", "b", "c"] {
            direct.create(res, ns, name);
        }
    }
    for name in ["a", "only-in-the-shared-cluster"] {
        shared_direct.create(ENDPOINTS, ns, name);
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = dir.path().join("kache.yaml");
    let snapshots = snapshot_dir(&state, &direct.cluster_uid());

    // Every store cached and saved, then SIGKILL.
    let kache = kache_with_state(&kubeconfig, &state, &config);
    for res in resources {
        let rv = assert_answers_are_direct(&kache, &direct, res, ns, "before the kill");
        await_snapshot(&snapshots.join(res.snapshot_name()), rv);
    }
    drop(kache);
    // A kache in front of the shared cluster saves its endpoints.
    let foreign_state = dir.path().join("foreign-state");
    let foreign = {
        let kache = kache_with_state(&shared.admin_kubeconfig, &foreign_state, &config);
        let rv = assert_answers_are_direct(&kache, &shared_direct, ENDPOINTS, ns, "in the shared cluster");
        let path = snapshot_dir(&foreign_state, &shared_direct.cluster_uid()).join(ENDPOINTS.snapshot_name());
        await_snapshot(&path, rv);
        path
    };

    // One damage per resource.
    let path = |res: Res| snapshots.join(res.snapshot_name());
    let truncated = std::fs::read(path(CONFIGMAPS)).unwrap();
    std::fs::write(path(CONFIGMAPS), &truncated[..truncated.len() / 2]).unwrap();
    // A bit of the last object (it ends just before the 4-byte checksum).
    let mut flipped = std::fs::read(path(SECRETS)).unwrap();
    let at = flipped.len() - 6;
    flipped[at] ^= 0x04;
    std::fs::write(path(SECRETS), flipped).unwrap();
    rewrite_as_format_zero(&path(PODTEMPLATES));
    let foreign_header = read_header(&std::fs::read(&foreign).unwrap()).unwrap();
    assert_eq!(foreign_header.resource, "endpoints");
    assert_ne!(foreign_header.cluster_uid, direct.cluster_uid());
    std::fs::copy(&foreign, path(ENDPOINTS)).unwrap();
    // And the objects change while kache is down.
    for res in resources {
        direct.change(res, ns);
    }

    let mark = audit.mark();
    let mut kache = kache_with_state(&kubeconfig, &state, &config);
    // Each file is named in a warning, with why it was refused (before any
    // read: a read first would start the store cold without looking).
    let why = [
        (CONFIGMAPS, "truncated snapshot"),
        (SECRETS, "checksum mismatch"),
        (
            PODTEMPLATES,
            "snapshot format version 0, this kache reads version 1",
        ),
        (ENDPOINTS, "snapshot of another cluster"),
    ];
    for (res, reason) in why {
        let file = path(res).display().to_string();
        let line = await_log_line(&kache, &["snapshot ignored", &file]);
        assert!(line.contains("WARN"), "not a warning: {line}");
        assert!(
            line.contains(reason),
            "{}: expected {reason:?}: {line}",
            res.plural
        );
        eprintln!("{line}");
    }
    for res in resources {
        assert_answers_are_direct(&kache, &direct, res, ns, "after the warm start");
    }
    let lists = reflector_lists(&mark, &resources);
    let expected: BTreeMap<_, _> = resources.iter().map(|r| (r.plural, 1)).collect();
    eprintln!("kache's LISTs after refusing the snapshots: {lists:?}");
    assert_eq!(lists, expected, "kache's LISTs after refusing the snapshots");
    let stderr = kache.stderr();
    assert!(
        !stderr.contains("caching from a snapshot"),
        "a refused snapshot was restored:\n{stderr}"
    );
    kache.assert_running();
}

#[test]
fn with_an_unwritable_state_directory_kache_serves_from_its_cache_and_warns() {
    let c = cluster();
    let direct = Direct::new(&c.admin_kubeconfig);
    let ns = TestNamespace::create("warm-unwritable");
    let ns = ns.name();
    direct.create(CONFIGMAPS, ns, "a");
    let dir = tempfile::tempdir().unwrap();
    // Two ways a state directory cannot hold snapshots (chmod does not stop
    // root): its `snapshots` is a file, or the directory is under a file.
    let snapshots_is_a_file = dir.path().join("state");
    std::fs::create_dir(&snapshots_is_a_file).unwrap();
    std::fs::write(snapshots_is_a_file.join("snapshots"), "not a directory").unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, "not a directory").unwrap();
    let under_a_file = file.join("state");
    let config = dir.path().join("kache.yaml");

    for (case, state) in [
        ("snapshots is a file", &snapshots_is_a_file),
        ("state dir under a file", &under_a_file),
    ] {
        let mut kache = kache_with_state(&c.admin_kubeconfig, state, &config);
        assert_answers_are_direct(&kache, &direct, CONFIGMAPS, ns, case);
        let line = await_log_line(&kache, &["cannot save a snapshot"]);
        assert!(line.contains("WARN"), "{case}: not a warning: {line}");
        assert!(line.contains("configmaps"), "{case}: {line}");
        eprintln!("{case}: {line}");
        // Still following the API server, still answering from memory.
        let name = unique_name("after");
        direct.create(CONFIGMAPS, ns, &name);
        poll_until(SETTLE, &format!("{case}: the new configmap cached"), || {
            let r = raw::get(kache.addr(), &CONFIGMAPS.cached(ns)).ok()?;
            (r.status == 200 && items(&r.json()).contains_key(&name)).then_some(())
        });
        assert_answers_are_direct(&kache, &direct, CONFIGMAPS, ns, case);
        kache.assert_running();
        // A graceful stop tries to save once more, and still exits cleanly.
        let status = kache.terminate(SETTLE);
        let stderr = kache.stderr();
        assert!(status.success(), "{case}: kache exited {status}:\n{stderr}");
        assert!(!stderr.contains("panicked"), "{case}:\n{stderr}");
        assert!(
            !state.join("snapshots").is_dir(),
            "{case}: a snapshot directory appeared"
        );
    }
}
