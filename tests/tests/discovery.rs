//! The discovery cache against the real API server: kubectl's discovery costs
//! nothing upstream the second time, CRDs appear and disappear within seconds,
//! answers are keyed by `Accept`, `If-None-Match` gets 304, errors are never
//! cached, and the metrics say so — each answer checked against the API
//! server's own.
//!
//! Counting: each test runs kache as a user of its own (a client certificate
//! minted from the test cluster's CA, group `system:masters`), so the audit log
//! tells its upstream requests from those of every other kache. A CRD or
//! APIService change anywhere in the cluster legitimately empties part of the
//! cache, so the tests of this file run one at a time, and the counting ones
//! start over with a fresh kache when kache reports an invalidation that
//! happened during the run (another test process changed a CRD).

#![allow(clippy::unwrap_used)] // test helpers, not only #[test] fns (STYLE.md)

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kache_tests::{
    cluster, kubectl, poll_until, raw, run_with_timeout, unique_name, without_age_column, AuditEvent,
    AuditMark, Kache, Kubectl, Output, TestNamespace, Value,
};

/// How long kache may take to establish its CRD and APIService watches.
const SYNC_TIMEOUT: Duration = Duration::from_secs(30);
/// How long audit lines may take to appear (written after the response).
const AUDIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long after a CRD change discovery through kache may still show the old state.
const CRD_DEADLINE: Duration = Duration::from_secs(15);
/// Runs of a counting scenario before giving up on a quiet cluster.
const ATTEMPTS: usize = 5;

/// An aggregated-discovery `Accept` of newer clients (kubectl 1.32 also lists
/// `v2beta1`); v1.20 ignores the aggregated type and answers `APIGroupList`.
const AGGREGATED_ACCEPT: &str =
    "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json";
/// What kubectl sends for `/openapi/v2` when it wants the protobuf document.
const OPENAPI_PROTOBUF: &str = "application/com.github.proto-openapi.spec.v2@v1.0+protobuf";
/// User-Agent of direct requests: the API server pretty-prints JSON for `curl/…`,
/// which kache (asking with its own User-Agent) never gets.
const DIRECT_USER_AGENT: &str = "kache-tests/discovery";

/// Keeps the tests of this file apart: the CRD test's changes would empty the
/// other tests' caches in the middle of their counts.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ------------------------------------------------------------- identity ----

/// A user of its own for one kache: a client certificate signed by the test
/// cluster's CA (`CN=<user>`, `O=system:masters`) and a kubeconfig that uses it.
struct Identity {
    user: String,
    kubeconfig: PathBuf,
    _dir: tempfile::TempDir,
}

impl Identity {
    fn mint(prefix: &str) -> Identity {
        let c = cluster();
        let user = unique_name(prefix);
        let ca_key = c.dir.join("pki").join("ca.key");
        assert!(
            ca_key.is_file(),
            "{} is missing: the tests mint per-test users with the cluster's CA",
            ca_key.display()
        );
        let dir = tempfile::Builder::new().prefix("kache-user-").tempdir().unwrap();
        let (key, csr, crt, ext) = (
            dir.path().join("user.key"),
            dir.path().join("user.csr"),
            dir.path().join("user.crt"),
            dir.path().join("user.ext"),
        );
        // X.509 v3 with client-auth usage: rustls rejects v1 certificates.
        std::fs::write(
            &ext,
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n",
        )
        .unwrap();
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
        let serial_number = format!("0x{nanos:x}");
        let subject = format!("/O=system:masters/CN={user}");
        openssl(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            path(&key),
        ]);
        openssl(&[
            "req",
            "-new",
            "-key",
            path(&key),
            "-subj",
            &subject,
            "-out",
            path(&csr),
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            path(&csr),
            "-CA",
            path(&c.ca_cert),
            "-CAkey",
            path(&ca_key),
            "-set_serial",
            &serial_number,
            "-days",
            "2",
            "-extfile",
            path(&ext),
            "-out",
            path(&crt),
        ]);
        let quoted = |p: &Path| serde_json::to_string(path(p)).unwrap();
        let kubeconfig = dir.path().join("user.kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\n\
                 clusters:\n- name: kache-test\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\n\
                 users:\n- name: {user}\n  user:\n    client-certificate: {crt}\n    client-key: {key}\n\
                 contexts:\n- name: {user}\n  context:\n    cluster: kache-test\n    user: {user}\n    namespace: default\n\
                 current-context: {user}\n",
                server = serde_json::to_string(&c.apiserver_url).unwrap(),
                ca = quoted(&c.ca_cert),
                crt = quoted(&crt),
                key = quoted(&key),
            ),
        )
        .unwrap();
        Identity {
            user,
            kubeconfig,
            _dir: dir,
        }
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}

fn openssl(args: &[&str]) {
    let mut cmd = Command::new("openssl");
    cmd.args(args);
    run_with_timeout(cmd, None, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("openssl {args:?}: {e} (openssl is required)"))
        .ok();
}

// ---------------------------------------------------------------- kache ----

/// Starts kache as `id` and waits until its discovery cache answers (both
/// watches established) and its startup `/version` probe is in the audit log,
/// so that no startup request is counted as the test's.
fn start_kache(id: &Identity) -> Kache {
    let mark = cluster().audit().mark();
    let kache = Kache::start(&id.kubeconfig);
    poll_until(SYNC_TIMEOUT, "kache_discovery_synced 1", || {
        (metric(&kache.metrics(), "kache_discovery_synced", &[]) == 1.0).then_some(())
    });
    poll_until(
        AUDIT_TIMEOUT,
        "kache's startup /version probe in the audit log",
        || {
            mark.events()
                .iter()
                .any(|e| e.username == id.user && e.request_uri == "/version")
                .then_some(())
        },
    );
    kache
}

/// Runs `scenario` with a fresh kache as `id`; again (up to [`ATTEMPTS`] times)
/// if kache invalidated discovery during the run, i.e. some CRD or APIService
/// of the shared cluster changed meanwhile and the counts mean nothing.
fn quietly<T>(id: &Identity, mut scenario: impl FnMut(&Kache) -> T) -> T {
    for attempt in 1..=ATTEMPTS {
        let kache = start_kache(id);
        let before = metric(&kache.metrics(), "kache_discovery_invalidations_total", &[]);
        let result = scenario(&kache);
        let after = metric(&kache.metrics(), "kache_discovery_invalidations_total", &[]);
        if before == after {
            return result;
        }
        eprintln!(
            "{}: attempt {attempt}: a CRD or APIService changed during the run \
             ({before} -> {after} invalidations); starting over with a fresh kache",
            std::thread::current().name().unwrap_or("test")
        );
    }
    panic!("the cluster's CRDs/APIServices changed during each of {ATTEMPTS} runs; cannot count");
}

/// The sum of the samples of `name` whose labels include every `(label, value)`.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let rest = series.strip_prefix(name)?;
            (rest.is_empty() || rest.starts_with('{')).then_some(())?;
            labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
                .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

// ------------------------------------------------------------ audit log ----

/// Whether a request URI is discovery: `/api`, `/api/<v>`, `/apis`, `/apis/<g>`,
/// `/apis/<g>/<v>`, `/version`, `/openapi/…` (any query).
fn is_discovery_uri(uri: &str) -> bool {
    let path = uri.split('?').next().unwrap_or_default();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    matches!(
        segments.as_slice(),
        ["api"] | ["api", _] | ["apis"] | ["apis", _] | ["apis", _, _] | ["version"] | ["openapi", ..]
    )
}

/// The discovery requests `user` made after `mark`, counted once a sentinel
/// request shows the audit log complete.
fn settled_discovery(mark: &AuditMark, user: &str) -> Vec<AuditEvent> {
    mark.events_after_sentinel()
        .into_iter()
        .filter(|e| e.username == user && is_discovery_uri(&e.request_uri))
        .collect()
}

fn uris(events: &[AuditEvent]) -> Vec<String> {
    events
        .iter()
        .map(|e| format!("{} {:?}", e.request_uri, e.code))
        .collect()
}

// ----------------------------------------------------------------- http ----

/// One HTTP answer, as received.
#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    /// Names lowercased.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn content_type(&self) -> Option<&str> {
        self.header("content-type")
    }

    fn etag(&self) -> Option<&str> {
        self.header("etag")
    }

    fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// Status, content type and a short start of the body, for messages.
    fn summary(&self) -> String {
        let text = String::from_utf8_lossy(&self.body);
        let start: String = text.chars().take(160).collect();
        format!(
            "{} {:?} {} bytes: {start:?}",
            self.status,
            self.content_type(),
            self.body.len()
        )
    }
}

/// `GET path` through kache (plain HTTP, exactly these headers).
fn via(kache: &Kache, path: &str, headers: &[(&str, &str)]) -> Answer {
    let r = raw::get_with(kache.addr(), path, headers)
        .unwrap_or_else(|e| panic!("GET {path} through kache: {e}"));
    Answer {
        status: r.status,
        headers: r.headers,
        body: r.body,
    }
}

/// `GET path` straight at the API server as `admin` (client certificate), with
/// curl: no compression, no header added but these, Host and User-Agent.
fn direct(path: &str, headers: &[(&str, &str)]) -> Answer {
    let c = cluster();
    let dir = tempfile::tempdir().unwrap();
    let (head, body) = (dir.path().join("head"), dir.path().join("body"));
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--http1.1", "-A", DIRECT_USER_AGENT, "--cacert"])
        .arg(&c.ca_cert)
        .arg("--cert")
        .arg(c.env.get("KACHE_ADMIN_CERT").expect("KACHE_ADMIN_CERT"))
        .arg("--key")
        .arg(c.env.get("KACHE_ADMIN_KEY").expect("KACHE_ADMIN_KEY"))
        .arg("-D")
        .arg(&head)
        .arg("-o")
        .arg(&body);
    for (k, v) in headers {
        cmd.arg("-H").arg(format!("{k}: {v}"));
    }
    cmd.arg(format!("{}{path}", c.apiserver_url));
    run_with_timeout(cmd, None, Duration::from_secs(30))
        .expect("curl is required")
        .ok();
    let head = std::fs::read_to_string(head).unwrap();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("GET {path} directly: no status line in {head:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Answer {
        status,
        headers,
        body: std::fs::read(body).unwrap_or_default(),
    }
}

/// Why two answers to the same discovery request differ (status, content type,
/// then the JSON value, or the bytes when either is not JSON); `None` if alike.
fn difference(via: &Answer, direct: &Answer) -> Option<String> {
    if via.status != direct.status || via.content_type() != direct.content_type() {
        return Some(format!(
            "through kache {}\ndirectly     {}",
            via.summary(),
            direct.summary()
        ));
    }
    let same = match (via.json(), direct.json()) {
        (Some(v), Some(d)) => v == d,
        _ => via.body == direct.body,
    };
    (!same).then(|| {
        format!(
            "bodies differ:\nthrough kache {}\ndirectly     {}",
            String::from_utf8_lossy(&via.body),
            String::from_utf8_lossy(&direct.body)
        )
    })
}

/// Polls until `paths` (JSON) answer through kache as they do directly; returns how
/// long that took. Panics with the differences after [`CRD_DEADLINE`].
fn converge(kache: &Kache, paths: &[&str], when: &str) -> Duration {
    let start = Instant::now();
    let accept = [("Accept", "application/json")];
    loop {
        let diffs: Vec<String> = paths
            .iter()
            .filter_map(|p| {
                difference(&via(kache, p, &accept), &direct(p, &accept)).map(|d| format!("{p}: {d}"))
            })
            .collect();
        if diffs.is_empty() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < CRD_DEADLINE,
            "{when}: discovery through kache still differs from direct after {CRD_DEADLINE:?}:\n{}",
            diffs.join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

// ---------------------------------------------------------------- tests ----

#[test]
fn second_kubectl_round_through_kache_costs_no_discovery_upstream_and_prints_what_direct_prints() {
    let _serial = serial();
    let c = cluster();
    let ns = TestNamespace::create("disc-kubectl");
    let n = ns.name();
    // One pod (never scheduled), so that `get pods` prints a table on stdout.
    Kubectl::new(&c.admin_kubeconfig)
        .stdin(format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: web, namespace: {n}}}\n\
             spec: {{containers: [{{name: web, image: registry.invalid/web:1}}]}}\n"
        ))
        .run(&["apply", "-f", "-"])
        .ok();
    let commands: Vec<Vec<&str>> = vec![
        vec!["api-resources"],
        vec!["api-versions"],
        vec!["explain", "pods"],
        vec!["get", "pods", "-n", n],
    ];
    let normalize = |args: &[&str], stdout: &str| {
        if args[0] == "get" {
            without_age_column(stdout)
        } else {
            stdout.to_string()
        }
    };
    let id = Identity::mint("disc-kubectl");

    // Every kubectl run (Kubectl's default) starts with an empty --cache-dir.
    let (direct_outputs, rounds) = quietly(&id, |kache| {
        let direct: Vec<Output> = commands
            .iter()
            .map(|args| kubectl(&c.admin_kubeconfig, args).ok())
            .collect();
        let mut rounds: Vec<(Vec<Output>, Vec<AuditEvent>, Duration)> = Vec::new();
        for _ in 0..2 {
            let mark = c.audit().mark();
            let started = Instant::now();
            let outputs: Vec<Output> = commands
                .iter()
                .map(|args| kubectl(kache.kubeconfig(), args))
                .collect();
            let took = started.elapsed();
            // Counted up to a sentinel sent before the next round's mark.
            let events = settled_discovery(&mark, &id.user);
            rounds.push((outputs, events, took));
        }
        (direct, rounds)
    });

    for (round, (outputs, _, _)) in rounds.iter().enumerate() {
        for ((args, via), direct) in commands.iter().zip(outputs).zip(&direct_outputs) {
            assert!(
                via.success(),
                "round {}: {args:?} through kache failed: {via:?}",
                round + 1
            );
            assert!(
                !direct.stdout.trim().is_empty(),
                "{args:?}: direct printed nothing"
            );
            assert_eq!(
                normalize(args, &via.stdout),
                normalize(args, &direct.stdout),
                "round {}: {args:?}: stdout through kache differs from direct\nkache stderr: {}\ndirect stderr: {}",
                round + 1,
                via.stderr,
                direct.stderr
            );
        }
    }

    let (_, first, first_took) = &rounds[0];
    let first_uris = uris(first);
    println!(
        "round 1: {} discovery requests upstream in {first_took:?}",
        first.len()
    );
    for wanted in [
        "/version?",
        "/api?",
        "/apis?",
        "/api/v1?",
        "/apis/apps/v1?",
        "/openapi/v2?",
    ] {
        assert!(
            first.iter().any(|e| e.request_uri.starts_with(wanted)),
            "the cold round should have fetched {wanted}… upstream as {}; it fetched {first_uris:#?}",
            id.user
        );
    }

    // The second round is served from memory. The one exception is kubectl
    // explain's probe of /openapi/v3, which v1.20 answers 404: errors are
    // never cached (see discovery_errors_are_passed_through_and_never_cached).
    let (_, second, second_took) = &rounds[1];
    let (probes, others): (Vec<AuditEvent>, Vec<AuditEvent>) = second
        .iter()
        .cloned()
        .partition(|e| e.request_uri.starts_with("/openapi/v3") && e.code == Some(404));
    println!(
        "round 2: {} discovery requests upstream in {second_took:?} ({} of them /openapi/v3 404s)",
        second.len(),
        probes.len()
    );
    assert!(
        others.is_empty(),
        "the second round made {} discovery requests upstream (besides {} /openapi/v3 404s): {:#?}",
        others.len(),
        probes.len(),
        uris(&others)
    );
    assert!(
        probes.len() <= 1,
        "only `kubectl explain` probes /openapi/v3: {:#?}",
        uris(&probes)
    );
}

/// A CRD of a group of its own. On drop it is deleted (if the test did not get
/// to it), and the APIService the API server registered for its group is
/// waited for until gone: that removal is asynchronous, and would otherwise
/// disturb the counts of the next test of this file.
struct Crd {
    name: String,
    group: String,
}

impl Drop for Crd {
    fn drop(&mut self) {
        let admin = &cluster().admin_kubeconfig;
        let o = kubectl(
            admin,
            &["delete", "crd", &self.name, "--ignore-not-found", "--wait=false"],
        );
        if !o.success() {
            eprintln!("cleanup of CRD {}: {}", self.name, o.stderr);
        }
        let apiservice = format!("v1.{}", self.group);
        let deadline = Instant::now() + CRD_DEADLINE;
        while Instant::now() < deadline {
            let o = kubectl(admin, &["get", "apiservice", &apiservice, "--ignore-not-found"]);
            if o.success() && o.stdout.trim().is_empty() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!(
            "cleanup of CRD {}: APIService {apiservice} still there",
            self.name
        );
    }
}

/// Polls `via_shows` and `direct_shows` (each until it first holds) until both
/// have; returns when each first did, measured from `since`. Panics after
/// [`CRD_DEADLINE`].
fn until_both(
    since: Instant,
    what: &str,
    via_shows: impl Fn() -> bool,
    direct_shows: impl Fn() -> bool,
) -> (Duration, Duration) {
    let (mut via_at, mut direct_at) = (None, None);
    loop {
        if via_at.is_none() && via_shows() {
            via_at = Some(since.elapsed());
        }
        if direct_at.is_none() && direct_shows() {
            direct_at = Some(since.elapsed());
        }
        if let (Some(v), Some(d)) = (via_at, direct_at) {
            return (v, d);
        }
        assert!(
            since.elapsed() < CRD_DEADLINE,
            "{what}: not seen within {CRD_DEADLINE:?} (through kache: {via_at:?}, directly: {direct_at:?})"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn crds_appear_in_and_disappear_from_discovery_through_kache_within_seconds() {
    let _serial = serial();
    let c = cluster();
    let id = Identity::mint("disc-crd");
    let kache = start_kache(&id);
    let ns = TestNamespace::create("disc-crd");
    let group = format!("{}.kache.example", unique_name("g"));
    let crd = Crd {
        name: format!("widgets.{group}"),
        group: group.clone(),
    };
    let group_version = format!("/apis/{group}/v1");
    let paths = ["/apis", group_version.as_str()];
    let admin = Kubectl::new(&c.admin_kubeconfig);
    let json = [("Accept", "application/json")];
    let api_resources = ["api-resources", "--api-group", group.as_str()];
    let has_widgets = |o: Output| o.ok().stdout.lines().any(|l| l.starts_with("widgets "));
    let lists_group = |a: Answer| {
        assert_eq!(a.status, 200, "/apis: {}", a.summary());
        a.json().expect("/apis is JSON")["groups"]
            .as_array()
            .expect("/apis lists groups")
            .iter()
            .any(|g| g["name"] == group.as_str())
    };
    let via_lists = || lists_group(via(&kache, "/apis", &json));
    let direct_lists = || lists_group(direct("/apis", &json));
    let via_shows = || has_widgets(kubectl(kache.kubeconfig(), &api_resources));
    let direct_shows = || has_widgets(kubectl(&c.admin_kubeconfig, &api_resources));
    let same_api_resources = |when: &str| {
        let via_out = kubectl(kache.kubeconfig(), &api_resources).ok();
        let direct_out = kubectl(&c.admin_kubeconfig, &api_resources).ok();
        assert_eq!(
            via_out.stdout, direct_out.stdout,
            "{when}: api-resources --api-group {group} through kache differs from direct"
        );
    };

    // Before: nothing, both ways.
    assert!(!via_shows() && !via_lists());
    same_api_resources("before the CRD exists");
    converge(&kache, &paths, "before the CRD exists");
    assert_eq!(via(&kache, &group_version, &json).status, 404);

    // Created directly: shows up through kache within seconds.
    let manifest = format!(
        "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\n\
         metadata: {{name: {name}}}\n\
         spec:\n  group: {group}\n  scope: Namespaced\n\
         \x20 names: {{plural: widgets, singular: widget, kind: Widget, listKind: WidgetList, shortNames: [wdg]}}\n\
         \x20 versions:\n  - name: v1\n    served: true\n    storage: true\n\
         \x20   schema: {{openAPIV3Schema: {{type: object, x-kubernetes-preserve-unknown-fields: true}}}}\n",
        name = crd.name
    );
    admin.clone().stdin(manifest).run(&["create", "-f", "-"]).ok();
    let created = Instant::now();
    let (via_at, direct_at) = until_both(created, "the new group in /apis", via_lists, direct_lists);
    println!("CRD created: its group in /apis through kache after {via_at:?} (directly after {direct_at:?})");
    let (via_at, direct_at) = until_both(
        created,
        "the new resource in api-resources",
        via_shows,
        direct_shows,
    );
    println!("CRD created: in `kubectl api-resources` through kache after {via_at:?} (directly after {direct_at:?})");
    same_api_resources("after the CRD was created");
    let took = converge(&kache, &paths, "after the CRD was created");
    println!("CRD created: /apis and {group_version} through kache equal direct (checked in {took:?})");

    // The new resource works through kache.
    let widget = format!(
        "apiVersion: {group}/v1\nkind: Widget\nmetadata: {{name: w1, namespace: {n}}}\nspec: {{size: 3}}\n",
        n = ns.name()
    );
    poll_until(CRD_DEADLINE, "creating a Widget directly", || {
        admin
            .clone()
            .stdin(widget.clone())
            .run(&["create", "-f", "-"])
            .success()
            .then_some(())
    });
    for args in [
        vec!["get", "widgets", "-n", ns.name()],
        vec!["get", "wdg", "-n", ns.name(), "-o", "name"],
    ] {
        let via_out = kubectl(kache.kubeconfig(), &args).ok();
        let direct_out = kubectl(&c.admin_kubeconfig, &args).ok();
        assert!(via_out.stdout.contains("w1"), "{args:?}: {}", via_out.stdout);
        assert_eq!(
            without_age_column(&via_out.stdout),
            without_age_column(&direct_out.stdout),
            "{args:?} through kache differs from direct"
        );
    }

    // Deleted directly (kubectl waits until it is gone): disappears within seconds.
    let deleting = Instant::now();
    admin.run(&["delete", "crd", &crd.name]).ok();
    let deleted = Instant::now();
    println!("CRD deleted: `kubectl delete crd` took {:?}", deleted - deleting);
    let (via_at, direct_at) = until_both(
        deleted,
        "the group gone from /apis",
        || !via_lists(),
        || !direct_lists(),
    );
    println!("CRD deleted: its group gone from /apis through kache after {via_at:?} (directly after {direct_at:?})");
    let (via_at, direct_at) = until_both(
        deleted,
        "the resource gone from api-resources",
        || !via_shows(),
        || !direct_shows(),
    );
    println!(
        "CRD deleted: gone from `kubectl api-resources` through kache after {via_at:?} (directly after {direct_at:?})"
    );
    same_api_resources("after the CRD was deleted");
    let took = converge(&kache, &paths, "after the CRD was deleted");
    println!("CRD deleted: /apis and {group_version} through kache equal direct (checked in {took:?})");
    assert_eq!(via(&kache, &group_version, &json).status, 404);
}

#[test]
fn discovery_answers_are_keyed_by_accept_and_equal_direct_bytes_and_content_type() {
    let _serial = serial();
    let c = cluster();
    let id = Identity::mint("disc-accept");
    let cases = [
        ("/apis", "application/json"),
        ("/apis", AGGREGATED_ACCEPT),
        ("/openapi/v2", OPENAPI_PROTOBUF),
        ("/openapi/v2", "application/json"),
    ];
    let (first, second, upstream_first, upstream_second, directs) = quietly(&id, |kache| {
        let mark = c.audit().mark();
        let ask = || -> Vec<Answer> {
            cases
                .iter()
                .map(|(p, accept)| via(kache, p, &[("Accept", accept)]))
                .collect()
        };
        let first = ask();
        let upstream_first = settled_discovery(&mark, &id.user);
        let second = ask();
        let upstream_second = settled_discovery(&mark, &id.user);
        let directs: Vec<Answer> = cases
            .iter()
            .map(|(p, accept)| direct(p, &[("Accept", accept)]))
            .collect();
        (first, second, upstream_first, upstream_second, directs)
    });

    for (i, (p, accept)) in cases.iter().enumerate() {
        let d = &directs[i];
        assert_eq!(d.status, 200, "{p} ({accept}) directly: {}", d.summary());
        for (which, v) in [("first", &first[i]), ("second", &second[i])] {
            let what = format!("{p} with Accept: {accept}, {which} request through kache");
            assert_eq!(v.status, d.status, "{what}: {}", v.summary());
            assert_eq!(v.content_type(), d.content_type(), "{what}: Content-Type");
            assert!(
                v.body == d.body,
                "{what}: body differs from direct ({} vs {} bytes)\nthrough kache {}\ndirectly     {}",
                v.body.len(),
                d.body.len(),
                v.summary(),
                d.summary()
            );
        }
    }
    // What v1.20 does with these Accept headers (so the cases mean what they say).
    let apis_aggregated = directs[1].json().expect("JSON");
    assert_eq!(
        apis_aggregated["kind"], "APIGroupList",
        "v1.20 ignores the aggregated type"
    );
    assert!(
        directs[2].body != directs[3].body && directs[2].json().is_none() && directs[3].json().is_some(),
        "/openapi/v2: the protobuf and JSON documents should differ"
    );

    // One upstream request per (path, Accept); none for the repeats.
    let count = |events: &[AuditEvent], p: &str| events.iter().filter(|e| e.request_uri == p).count();
    assert_eq!(
        (
            count(&upstream_first, "/apis"),
            count(&upstream_first, "/openapi/v2")
        ),
        (2, 2),
        "first requests: one upstream GET per Accept: {:#?}",
        uris(&upstream_first)
    );
    assert_eq!(
        upstream_second.len(),
        upstream_first.len(),
        "the repeated requests reached the upstream: {:#?}",
        uris(&upstream_second[upstream_first.len().min(upstream_second.len())..])
    );
}

#[test]
fn openapi_etag_and_if_none_match_behave_as_direct() {
    let _serial = serial();
    let c = cluster();
    let id = Identity::mint("disc-etag");
    let accept = ("Accept", "application/json");
    let conditional = |etag: &str| {
        [
            "\"not-the-etag\"".to_string(),
            etag.to_string(),
            format!("\"nope\", {etag}"),
        ]
    };

    // Direct and through kache in the same quiet window: the document (and its
    // ETag) changes with every CRD change.
    let (d, d_conditional, v_first, v_plain, v_conditional, upstream) = quietly(&id, |kache| {
        // Directly: v1.20 sends an ETag and honours If-None-Match.
        let d = direct("/openapi/v2", &[accept]);
        assert_eq!(d.status, 200, "{}", d.summary());
        let etag = d
            .etag()
            .expect("v1.20 sends an ETag with /openapi/v2")
            .to_string();
        let d_conditional: Vec<(String, Answer)> = conditional(&etag)
            .into_iter()
            .map(|inm| {
                let a = direct("/openapi/v2", &[accept, ("If-None-Match", &inm)]);
                (inm, a)
            })
            .collect();

        let mark = c.audit().mark();
        // The very first request through kache is conditional: fetched, then answered 304.
        let first = via(kache, "/openapi/v2", &[accept, ("If-None-Match", &etag)]);
        let plain = via(kache, "/openapi/v2", &[accept]);
        let v_conditional: Vec<Answer> = d_conditional
            .iter()
            .map(|(inm, _)| via(kache, "/openapi/v2", &[accept, ("If-None-Match", inm)]))
            .collect();
        let upstream = settled_discovery(&mark, &id.user);
        (d, d_conditional, first, plain, v_conditional, upstream)
    });

    let etag = d.etag().unwrap();
    assert_eq!(
        d_conditional.iter().map(|(_, a)| a.status).collect::<Vec<_>>(),
        [200, 304, 304],
        "direct answers to If-None-Match {:?}",
        d_conditional.iter().map(|(inm, _)| inm).collect::<Vec<_>>()
    );
    assert_eq!(v_plain.status, 200, "{}", v_plain.summary());
    assert_eq!(v_plain.etag(), Some(etag), "ETag through kache");
    assert_eq!(
        v_plain.content_type(),
        d.content_type(),
        "Content-Type through kache"
    );
    assert!(v_plain.body == d.body, "body through kache differs from direct");
    assert_eq!(
        v_first.status,
        304,
        "cold request with a matching If-None-Match: {}",
        v_first.summary()
    );
    for ((inm, dc), v) in d_conditional.iter().zip(&v_conditional) {
        assert_eq!(v.status, dc.status, "If-None-Match: {inm}: {}", v.summary());
        assert_eq!(v.etag(), dc.etag(), "If-None-Match: {inm}: ETag");
        assert_eq!(
            v.content_type(),
            dc.content_type(),
            "If-None-Match: {inm}: Content-Type"
        );
        if dc.status == 304 {
            assert!(v.body.is_empty(), "If-None-Match: {inm}: a 304 with a body");
        } else {
            assert!(v.body == d.body, "If-None-Match: {inm}: body differs from direct");
        }
    }
    assert_eq!(
        uris(&upstream),
        ["/openapi/v2 Some(200)"],
        "one upstream GET; every other answer from memory"
    );
}

#[test]
fn discovery_errors_are_passed_through_and_never_cached() {
    let _serial = serial();
    let c = cluster();
    let id = Identity::mint("disc-errors");
    let kache = start_kache(&id);
    let accept = ("Accept", "application/json, */*");
    let paths = [
        "/apis/nonexistent.example.com/v1",
        "/apis/nonexistent.example.com",
        "/api/v0",
        "/openapi/v3",
    ];
    let mark = c.audit().mark();
    for p in paths {
        let d = direct(p, &[accept]);
        assert_eq!(d.status, 404, "{p} directly: {}", d.summary());
        for round in 1..=2 {
            let v = via(&kache, p, &[accept]);
            assert_eq!(
                (v.status, v.content_type()),
                (d.status, d.content_type()),
                "{p}, request {round} through kache: {}",
                v.summary()
            );
            assert!(
                v.body == d.body,
                "{p}, request {round}: body through kache differs from direct\nthrough kache {}\ndirectly     {}",
                v.summary(),
                d.summary()
            );
        }
    }
    let upstream = settled_discovery(&mark, &id.user);
    for p in paths {
        let codes: Vec<Option<u16>> = upstream
            .iter()
            .filter(|e| e.request_uri == p)
            .map(|e| e.code)
            .collect();
        assert_eq!(
            codes,
            [Some(404), Some(404)],
            "{p}: both requests through kache should reach the API server: {:#?}",
            uris(&upstream)
        );
    }
    assert_eq!(upstream.len(), 2 * paths.len(), "{:#?}", uris(&upstream));
}

#[test]
fn discovery_metrics_count_hits_and_misses_per_kind() {
    let _serial = serial();
    let c = cluster();
    let id = Identity::mint("disc-metrics");
    // (path, times asked, kind, expected hits, expected misses of this path)
    let plan: [(&str, u32, &str, f64, f64); 9] = [
        ("/apis", 3, "apis", 2.0, 1.0),
        ("/api", 2, "api", 1.0, 1.0),
        ("/api/v1", 2, "api_version", 1.0, 1.0),
        ("/apis/apps", 2, "group", 1.0, 1.0),
        ("/apis/apps/v1", 2, "group_version", 1.0, 1.0),
        ("/version", 2, "version", 1.0, 1.0),
        ("/openapi/v2", 2, "openapi_v2", 1.0, 1.0),
        // Errors: every request is a miss.
        ("/openapi/v3", 2, "openapi_v3", 0.0, 2.0),
        ("/apis/nonexistent.example.com/v1", 2, "group_version", 0.0, 2.0),
    ];
    let (before, after, upstream) = quietly(&id, |kache| {
        let before = kache.metrics();
        let mark = c.audit().mark();
        for (p, times, ..) in plan {
            for _ in 0..times {
                via(kache, p, &[("Accept", "application/json")]);
            }
        }
        let upstream = settled_discovery(&mark, &id.user);
        (before, kache.metrics(), upstream)
    });

    let delta = |name: &str, kind: &str| {
        metric(&after, name, &[("kind", kind)]) - metric(&before, name, &[("kind", kind)])
    };
    let mut kinds: Vec<&str> = plan.iter().map(|(_, _, k, ..)| *k).collect();
    kinds.sort_unstable();
    kinds.dedup();
    for kind in kinds {
        let expected = plan
            .iter()
            .filter(|(_, _, k, ..)| *k == kind)
            .fold((0.0, 0.0), |(h, m), (.., eh, em)| (h + eh, m + em));
        assert_eq!(
            (
                delta("kache_discovery_hits_total", kind),
                delta("kache_discovery_misses_total", kind)
            ),
            expected,
            "(hits, misses) of kind {kind}; metrics:\n{after}"
        );
    }
    assert_eq!(
        metric(&after, "kache_discovery_bypassed_total", &[]),
        0.0,
        "the cache was in sync"
    );
    assert_eq!(
        metric(&after, "kache_discovery_entries", &[]),
        7.0,
        "one entry per successful path asked: {after}"
    );
    // Every miss, and nothing else, reached the API server.
    let misses = metric(&after, "kache_discovery_misses_total", &[])
        - metric(&before, "kache_discovery_misses_total", &[]);
    assert_eq!(
        upstream.len() as f64,
        misses,
        "upstream discovery requests vs misses: {:#?}",
        uris(&upstream)
    );
}
