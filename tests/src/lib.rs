//! Harness for kache's integration tests against a real kube-apiserver.
//!
//! ```text
//!   test ──kubectl / kube::Client / raw HTTP──▶ Kache (child process, free ports)
//!     │                                            │ kubeconfig identity
//!     │                                            ▼
//!     └──────────────── direct (admin, alice…) ──▶ kube-apiserver + etcd (tests/cluster/up.sh)
//!                                                  │
//!                   AuditMark::count_after_sentinel ◀── audit.log (one line per request)
//! ```
//!
//! * [`cluster`] starts (or reuses) the real API server once per test process.
//! * [`Kache`] runs the `kache` binary in front of a kubeconfig and stops it on drop.
//! * [`Kubectl`] runs kubectl with a fresh discovery cache.
//! * [`AuditMark`] counts the requests that reached the API server after a point in time;
//!   a sentinel request of its own proves the log complete before it counts.
//! * [`TestNamespace`] gives each test its own namespace and removes it afterwards.
//! * [`Relay`] is a loopback TCP relay that can be cut and restored (upstream failures).
//! * [`raw`] is a tiny blocking HTTP/1.1 client that sends exactly the bytes it is given.
//!
//! Missing prerequisites (API server binary, kubectl, the `kache` binary) fail the
//! tests with a clear message: nothing here skips.

// Test support code: a failed step is a failed test, and `unwrap()` is the test idiom
// (STYLE.md); the messages that matter are given with `unwrap_or_else(|e| panic!(…))`.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use serde_json::Value;

/// How long a started kache may take to answer `/readyz` with 200.
pub const KACHE_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Default bound for one kubectl run.
pub const KUBECTL_TIMEOUT: Duration = Duration::from_secs(60);

// ------------------------------------------------------------------ paths ----

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("invariant: the tests crate lives inside the workspace")
            .to_path_buf()
    })
}

/// The cargo target directory: `$CARGO_TARGET_DIR`, else `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        }
        _ => workspace_root().join("target"),
    }
}

/// A name unique across concurrently running tests and test processes, usable as a
/// Kubernetes object name (lowercase, digits, dashes; at most 63 characters).
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let name = format!("{prefix}-{:x}-{:x}{n}", std::process::id(), nanos & 0xfffff);
    assert!(name.len() <= 63, "name too long for Kubernetes: {name}");
    name
}

/// Polls `f` every 50 ms until it returns `Some`, or panics after `timeout` with `what`.
pub fn poll_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------- cluster ----

/// The real API server the tests run against (see tests/cluster/README.md).
#[derive(Debug, Clone)]
pub struct Cluster {
    pub dir: PathBuf,
    /// `https://127.0.0.1:PORT`
    pub apiserver_url: String,
    pub apiserver_addr: SocketAddr,
    pub audit_log: PathBuf,
    pub ca_cert: PathBuf,
    /// Client certificate, user `admin`, group `system:masters`.
    pub admin_kubeconfig: PathBuf,
    /// Bearer token, user `admin-token`, group `system:masters`.
    pub admin_token_kubeconfig: PathBuf,
    /// Bearer token, user `alice`, no RBAC grants.
    pub alice_kubeconfig: PathBuf,
    /// Bearer token, user `bob`, no RBAC grants.
    pub bob_kubeconfig: PathBuf,
    pub alice_token: String,
    pub bob_token: String,
    /// Every `KACHE_*` variable of `DIR/env`.
    pub env: HashMap<String, String>,
}

/// The cluster for this test process, started on first use.
///
/// If `$KACHE_CLUSTER_DIR/env` exists it is used as is. Otherwise
/// `tests/cluster/up.sh <target>/kache-cluster` runs under `flock`, so concurrent test
/// processes start one cluster and share it (up.sh reuses a healthy one in ≈0.1 s).
///
/// # Panics
/// When the cluster cannot be started: tests never skip for a missing API server.
pub fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();
    let cluster = CLUSTER.get_or_init(|| {
        catch_panic_message(|| {
            let given = std::env::var_os("KACHE_CLUSTER_DIR")
                .filter(|d| !d.is_empty())
                .map(PathBuf::from)
                .filter(|d| d.join("env").is_file());
            let env_file = match given {
                Some(dir) => dir.join("env"),
                None => start_cluster(),
            };
            load_cluster_env(&env_file)
        })
    });
    match cluster {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    }
}

/// Runs `f`, turning a panic into its message: a failed one-time setup is then
/// reported by every test instead of being retried by each.
fn catch_panic_message<T>(f: impl FnOnce() -> T + std::panic::UnwindSafe) -> Result<T, String> {
    std::panic::catch_unwind(f).map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "setup panicked".to_string())
    })
}

fn start_cluster() -> PathBuf {
    let target = target_dir();
    let dir = target.join("kache-cluster");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    let lock = target.join("kache-cluster.lock");
    let script = workspace_root().join("tests/cluster/up.sh");
    // `-o`: the lock stays with flock itself; up.sh's daemons must not inherit it
    // (they would hold it for as long as the cluster runs).
    let out = Command::new("flock")
        .arg("-o")
        .arg(&lock)
        .arg(&script)
        .arg(&dir)
        .env_remove("KACHE_CLUSTER_DIR")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `flock {} {}` (util-linux flock is required): {e}",
                lock.display(),
                script.display()
            )
        });
    assert!(
        out.status.success(),
        "tests/cluster/up.sh failed ({}); the integration tests need a real kube-apiserver.\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    let env_file = env_file_printed_by_up(&printed, &dir);
    assert!(
        env_file.is_file(),
        "up.sh printed {printed:?}, which is not the env file"
    );
    env_file
}

/// The env file tests/cluster/up.sh printed (its last line), or `DIR/env`.
pub fn env_file_printed_by_up(printed: &str, dir: &Path) -> PathBuf {
    printed
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| PathBuf::from(l.trim()))
        .unwrap_or_else(|| dir.join("env"))
}

/// Reads a cluster's `DIR/env` (as written by tests/cluster/up.sh).
///
/// # Panics
/// An unreadable file, a missing variable or kubeconfig.
pub fn load_cluster_env(env_file: &Path) -> Cluster {
    // Let bash parse its own `printf %q` quoting.
    let out = Command::new("bash")
        .args(["-c", "set -a; source \"$1\" >/dev/null; env -0", "_"])
        .arg(env_file)
        .output()
        .unwrap_or_else(|e| panic!("cannot run bash to read {}: {e}", env_file.display()));
    assert!(
        out.status.success(),
        "cannot source {}: {}",
        env_file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let env: HashMap<String, String> = out
        .stdout
        .split(|b| *b == 0)
        .filter_map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            let (k, v) = kv.split_once('=')?;
            k.starts_with("KACHE_").then(|| (k.to_string(), v.to_string()))
        })
        .collect();
    let var = |k: &str| -> String {
        env.get(k)
            .cloned()
            .unwrap_or_else(|| panic!("{} does not define {k}", env_file.display()))
    };
    let apiserver_url = var("KACHE_APISERVER_URL");
    let hostport = apiserver_url
        .strip_prefix("https://")
        .unwrap_or_else(|| panic!("KACHE_APISERVER_URL {apiserver_url} is not https://"));
    let apiserver_addr: SocketAddr = hostport
        .trim_end_matches('/')
        .parse()
        .unwrap_or_else(|e| panic!("KACHE_APISERVER_URL {apiserver_url}: {e}"));
    let cluster = Cluster {
        dir: var("KACHE_CLUSTER_DIR").into(),
        apiserver_url,
        apiserver_addr,
        audit_log: var("KACHE_AUDIT_LOG").into(),
        ca_cert: var("KACHE_CA_CERT").into(),
        admin_kubeconfig: var("KACHE_ADMIN_KUBECONFIG").into(),
        admin_token_kubeconfig: var("KACHE_ADMIN_TOKEN_KUBECONFIG").into(),
        alice_kubeconfig: var("KACHE_ALICE_KUBECONFIG").into(),
        bob_kubeconfig: var("KACHE_BOB_KUBECONFIG").into(),
        alice_token: var("KACHE_ALICE_TOKEN"),
        bob_token: var("KACHE_BOB_TOKEN"),
        env,
    };
    for f in [
        &cluster.admin_kubeconfig,
        &cluster.alice_kubeconfig,
        &cluster.bob_kubeconfig,
        &cluster.ca_cert,
    ] {
        assert!(
            f.is_file(),
            "{} is missing; is the cluster in {} healthy?",
            f.display(),
            cluster.dir.display()
        );
    }
    cluster
}

impl Cluster {
    /// The audit log, to count requests that reached the API server.
    pub fn audit(&self) -> AuditLog {
        AuditLog::new(&self.audit_log, &self.admin_kubeconfig)
    }

    /// A kube client talking to the API server directly with the admin client certificate.
    pub async fn admin_client(&self) -> kube::Client {
        client_from_kubeconfig(&self.admin_kubeconfig).await
    }

    /// The test cluster's CA, as a kube client's `root_cert`.
    pub fn root_cert(&self) -> Option<Vec<Vec<u8>>> {
        Some(vec![pem_to_der(&std::fs::read_to_string(&self.ca_cert).unwrap())])
    }

    /// A kube client for the API server that presents no credentials at all.
    pub fn anonymous_client(&self) -> kube::Client {
        let mut config = kube::Config::new(self.apiserver_url.parse().expect("invariant: checked at load"));
        config.root_cert = Some(vec![pem_to_der(&std::fs::read_to_string(&self.ca_cert).unwrap())]);
        config.default_retry = false;
        kube::Client::try_from(config).unwrap()
    }
}

/// A kube client for the current context of a kubeconfig file.
pub async fn client_from_kubeconfig(path: &Path) -> kube::Client {
    kube::Client::try_from(config_from_kubeconfig(path).await).unwrap()
}

/// The kube client configuration of a kubeconfig file's current context.
pub async fn config_from_kubeconfig(path: &Path) -> kube::Config {
    let kubeconfig = kube::config::Kubeconfig::read_from(path)
        .unwrap_or_else(|e| panic!("cannot read kubeconfig {}: {e}", path.display()));
    kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
        .await
        .unwrap_or_else(|e| panic!("bad kubeconfig {}: {e}", path.display()))
}

/// A kube client for `config` whose requests say `User-Agent: user_agent`
/// (so that the audit log tells them apart), without retries.
pub fn client_with_user_agent(mut config: kube::Config, user_agent: &str) -> kube::Client {
    config.default_retry = false;
    config.headers.push((
        http::header::USER_AGENT,
        http::HeaderValue::from_str(user_agent).unwrap(),
    ));
    kube::Client::try_from(config).unwrap()
}

/// `metadata.resourceVersion` of an object or list as a number (0 if absent).
pub fn rv_of(v: &Value) -> u64 {
    v["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn pem_to_der(pem: &str) -> Vec<u8> {
    let b64: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    base64_decode(&b64)
}

fn base64_decode(s: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes().filter(|c| !c.is_ascii_whitespace() && *c != b'=') {
        let v = ALPHABET
            .iter()
            .position(|a| *a == c)
            .expect("invalid base64 in PEM") as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// Writes a copy of the kubeconfig at `src` whose clusters all point at `server`.
/// The CA and credentials stay, so a relay on 127.0.0.1 still verifies (the serving
/// certificate has SAN IP:127.0.0.1).
pub fn kubeconfig_with_server(src: &Path, server: &str, dest: &Path) {
    let text = std::fs::read_to_string(src).unwrap_or_else(|e| panic!("cannot read {}: {e}", src.display()));
    let mut doc: Value = serde_saphyr::from_str(&text).unwrap();
    let clusters = doc
        .get_mut("clusters")
        .and_then(|c| c.as_array_mut())
        .unwrap_or_else(|| panic!("{} has no clusters", src.display()));
    for c in clusters {
        c["cluster"]["server"] = Value::from(server);
    }
    std::fs::write(dest, serde_saphyr::to_string(&doc).unwrap()).unwrap();
}

// ------------------------------------------------------------ kache binary ----

/// Path of the `kache` binary: `$KACHE_BIN` (relative to the workspace root), else
/// built once per test process with `cargo build -p kache-proxy --bin kache` into the
/// target directory (a no-op when it is up to date).
pub fn kache_bin() -> &'static Path {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match BIN.get_or_init(|| catch_panic_message(find_or_build_kache)) {
        Ok(b) => b,
        Err(e) => panic!("{e}"),
    }
}

fn find_or_build_kache() -> PathBuf {
    if let Some(bin) = std::env::var_os("KACHE_BIN").filter(|b| !b.is_empty()) {
        // Test binaries run in the crate's directory: a relative path is taken
        // from the workspace root, where `cargo test` is usually typed.
        let bin = workspace_root().join(bin);
        assert!(bin.is_file(), "KACHE_BIN={} does not exist", bin.display());
        return bin;
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(&cargo)
        .args(["build", "-p", "kache-proxy", "--bin", "kache"])
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cargo:?} build: {e}"));
    assert!(
        out.status.success(),
        "`cargo build -p kache-proxy --bin kache` failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bin = target_dir().join("debug").join("kache");
    assert!(
        bin.is_file(),
        "cargo built kache but {} does not exist",
        bin.display()
    );
    bin
}

// ------------------------------------------------------------------- kache ----

/// Removes every `KACHE_*` variable from a kache child's environment: kache
/// reads each flag from a `KACHE_<FLAG>` variable too, so one left in the
/// shell that runs the tests (`KACHE_MODE=shared`) would change every kache
/// they start. kache reads none of the harness's own (`KACHE_BIN`,
/// `KACHE_CLUSTER_DIR`, …).
fn without_kache_variables(cmd: &mut Command) -> &mut Command {
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("KACHE_") {
            cmd.env_remove(name);
        }
    }
    cmd
}

/// A running `kache serve` in front of a kubeconfig's cluster, on free loopback ports.
/// Killed on drop; its stderr is printed when the test is failing.
pub struct Kache {
    child: Child,
    /// The CA of kache's own serving certificate, when it serves HTTPS.
    tls_ca: Option<PathBuf>,
    addr: SocketAddr,
    admin_addr: SocketAddr,
    kubeconfig: PathBuf,
    stderr_path: PathBuf,
    dir: tempfile::TempDir,
}

impl Kache {
    /// Starts kache in front of `upstream_kubeconfig` and waits until `/readyz` is 200.
    pub fn start(upstream_kubeconfig: &Path) -> Kache {
        Self::start_with_args(upstream_kubeconfig, &[])
    }

    /// Like [`Kache::start`], with extra `kache serve` flags.
    pub fn start_with_args(upstream_kubeconfig: &Path, extra: &[&str]) -> Kache {
        let bin = kache_bin();
        let mut last_err = String::new();
        for _attempt in 0..3 {
            match Self::try_start(bin, upstream_kubeconfig, extra) {
                Ok(k) => return k,
                // Another process took one of the ports between probing and binding.
                Err(e) if e.contains("in use") => last_err = e,
                Err(e) => panic!("{e}"),
            }
        }
        panic!("{last_err}");
    }

    fn try_start(bin: &Path, upstream: &Path, extra: &[&str]) -> Result<Kache, String> {
        let dir = tempfile::Builder::new().prefix("kache-test-").tempdir().unwrap();
        let (addr, admin_addr) = {
            let a = TcpListener::bind("127.0.0.1:0").unwrap();
            let b = TcpListener::bind("127.0.0.1:0").unwrap();
            (a.local_addr().unwrap(), b.local_addr().unwrap())
        };
        let stderr_path = dir.path().join("kache.stderr");
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let stdout = std::fs::File::create(dir.path().join("kache.stdout")).unwrap();
        let mut cmd = Command::new(bin);
        // Its own state directory: generated certificates and snapshots are
        // this kache's, never another test's.
        if extra.contains(&"--state-dir") {
            cmd.arg("serve");
        } else {
            cmd.arg("serve").arg("--state-dir").arg(dir.path().join("state"));
        }
        cmd.arg("--kubeconfig")
            .arg(upstream)
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--admin-listen")
            .arg(admin_addr.to_string())
            .args(extra)
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        without_kache_variables(&mut cmd);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let tls_ca = extra.contains(&"--tls").then(|| dir.path().join("state/ca.crt"));
        let mut kache = Kache {
            child,
            tls_ca,
            addr,
            admin_addr,
            kubeconfig: dir.path().join("client.kubeconfig"),
            stderr_path,
            dir,
        };
        let deadline = Instant::now() + KACHE_READY_TIMEOUT;
        loop {
            if let Some(status) = kache.child.try_wait().unwrap() {
                let stderr = kache.stderr();
                return Err(format!("kache exited during startup ({status}):\n{stderr}"));
            }
            if let Ok(r) = raw::get(kache.admin_addr, "/readyz") {
                if r.status == 200 {
                    break;
                }
            }
            if Instant::now() >= deadline {
                let stderr = kache.stderr();
                return Err(format!(
                    "kache did not answer 200 on http://{admin_addr}/readyz within {KACHE_READY_TIMEOUT:?}; stderr:\n{stderr}"
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = without_kache_variables(&mut Command::new(bin))
            .args(["kubeconfig", "--server", &kache.url()])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        if !out.status.success() {
            return Err(format!(
                "`kache kubeconfig --server {}` failed: {}",
                kache.url(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        std::fs::write(&kache.kubeconfig, &out.stdout).unwrap();
        Ok(kache)
    }

    /// Starts kache in shared mode (HTTPS with a generated certificate,
    /// client certificates of the test cluster's CA accepted) with extra flags.
    pub fn start_shared(upstream_kubeconfig: &Path, extra: &[&str]) -> Kache {
        let ca = cluster().ca_cert.to_str().expect("utf-8 path").to_string();
        let mut args = vec!["--mode", "shared", "--tls", "--client-ca-file", ca.as_str()];
        args.extend_from_slice(extra);
        Self::start_with_args(upstream_kubeconfig, &args)
    }

    /// `http://127.0.0.1:PORT` (or `https://` with TLS) of the client-facing listener.
    pub fn url(&self) -> String {
        match self.tls_ca {
            Some(_) => format!("https://{}", self.addr),
            None => format!("http://{}", self.addr),
        }
    }

    /// A kube client for this proxy (HTTPS with its CA when it serves TLS)
    /// presenting `token`, or no credentials at all.
    pub fn client_with_token(&self, token: Option<&str>) -> kube::Client {
        let mut config = kube::Config::new(self.url().parse().unwrap());
        if let Some(ca) = &self.tls_ca {
            config.root_cert = Some(vec![pem_to_der(&std::fs::read_to_string(ca).unwrap())]);
        }
        config.auth_info.token = token.map(|t| t.to_string().into());
        config.default_retry = false;
        kube::Client::try_from(config).unwrap()
    }

    /// A kube client for this proxy presenting the credentials (token or
    /// client certificate) of a kubeconfig of the test cluster.
    pub async fn client_as(&self, kubeconfig: &Path) -> kube::Client {
        let mut config = config_from_kubeconfig(kubeconfig).await;
        config.cluster_url = self.url().parse().unwrap();
        config.root_cert = self
            .tls_ca
            .as_ref()
            .map(|ca| vec![pem_to_der(&std::fs::read_to_string(ca).unwrap())]);
        config.default_retry = false;
        kube::Client::try_from(config).unwrap()
    }

    /// Address of the client-facing listener.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Address of the admin listener (`/readyz`, `/livez`, `/metrics`).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// A kubeconfig (written by `kache kubeconfig`) whose current context is this proxy.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// A scratch directory that lives as long as this kache.
    pub fn scratch_dir(&self) -> &Path {
        self.dir.path()
    }

    /// A kube client for this proxy: plain HTTP, no credentials.
    pub fn client(&self) -> kube::Client {
        let mut config = kube::Config::new(self.url().parse().unwrap());
        config.default_retry = false;
        kube::Client::try_from(config).unwrap()
    }

    /// Everything kache wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// `/metrics` of the admin listener.
    pub fn metrics(&self) -> String {
        let r = raw::get(self.admin_addr, "/metrics").expect("GET /metrics");
        assert_eq!(r.status, 200, "/metrics answered {}: {}", r.status, r.text());
        r.text()
    }

    /// The process's id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process's resident memory now (`VmRSS`, bytes).
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .expect("VmRSS in /proc/<pid>/status")
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Panics (with kache's stderr) if the process has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("kache exited ({status}); stderr:\n{}", self.stderr());
        }
    }
}

impl Drop for Kache {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let stderr = self.stderr();
            let tail: Vec<&str> = stderr.lines().rev().take(200).collect();
            eprintln!(
                "----- kache {} stderr (last {} lines) -----",
                self.addr,
                tail.len()
            );
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
            eprintln!("----- end of kache stderr -----");
        }
    }
}

// ----------------------------------------------------------------- kubectl ----

/// The kubectl binary: `$KUBECTL`, else `/usr/bin/kubectl`, else `kubectl` on PATH.
pub fn kubectl_bin() -> PathBuf {
    if let Some(k) = std::env::var_os("KUBECTL").filter(|k| !k.is_empty()) {
        return k.into();
    }
    let usr = Path::new("/usr/bin/kubectl");
    if usr.is_file() {
        usr.to_path_buf()
    } else {
        "kubectl".into()
    }
}

/// What a finished command printed.
#[derive(Debug, Clone)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// The exit code (-1 when killed by a signal).
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or(-1)
    }

    /// Returns self, or panics with stderr if the command failed.
    #[track_caller]
    pub fn ok(self) -> Self {
        assert!(
            self.success(),
            "command failed ({}):\nstdout: {}\nstderr: {}",
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }

    /// stdout parsed as JSON.
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", self.stdout))
    }

    /// stdout parsed as YAML, as a JSON value.
    #[track_caller]
    pub fn yaml(&self) -> Value {
        serde_saphyr::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not YAML ({e}): {}", self.stdout))
    }
}

/// A kubectl invocation with a fixed kubeconfig. By default every run gets a fresh,
/// empty `--cache-dir` (as a CI job would), so discovery is always asked for.
#[derive(Debug, Clone)]
pub struct Kubectl {
    kubeconfig: PathBuf,
    cache_dir: Option<PathBuf>,
    stdin: Option<Vec<u8>>,
    timeout: Duration,
}

/// Runs kubectl with `kubeconfig`, a fresh cache directory and `args`.
pub fn kubectl(kubeconfig: &Path, args: &[&str]) -> Output {
    Kubectl::new(kubeconfig).run(args)
}

impl Kubectl {
    pub fn new(kubeconfig: impl AsRef<Path>) -> Self {
        Kubectl {
            kubeconfig: kubeconfig.as_ref().to_path_buf(),
            cache_dir: None,
            stdin: None,
            timeout: KUBECTL_TIMEOUT,
        }
    }

    /// Use (and keep) this discovery cache directory instead of a fresh one.
    pub fn cache_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.cache_dir = Some(dir.as_ref().to_path_buf());
        self
    }

    /// Feed this to kubectl's stdin (for `-f -`).
    pub fn stdin(mut self, input: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(input.into());
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn command(&self, args: &[&str], cache_dir: &Path) -> Command {
        let mut cmd = Command::new(kubectl_bin());
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(cache_dir)
            .args(args)
            .env_remove("KUBECONFIG")
            .env("KUBECTL_COMMAND_HEADERS", "false");
        cmd
    }

    /// Runs kubectl to completion (killing it after the timeout).
    pub fn run(&self, args: &[&str]) -> Output {
        let fresh = tempfile::Builder::new()
            .prefix("kubectl-cache-")
            .tempdir()
            .unwrap();
        let cache_dir = self
            .cache_dir
            .clone()
            .unwrap_or_else(|| fresh.path().to_path_buf());
        let mut cmd = self.command(args, &cache_dir);
        cmd.stdin(if self.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        run_with_timeout(cmd, self.stdin.clone(), self.timeout)
            .unwrap_or_else(|e| panic!("kubectl {args:?}: {e} (is kubectl installed? set KUBECTL)"))
    }

    /// Starts a long-running kubectl (e.g. `get -w`) whose stdout is read line by line.
    pub fn spawn(&self, args: &[&str]) -> KubectlProcess {
        let cache = tempfile::Builder::new()
            .prefix("kubectl-cache-")
            .tempdir()
            .unwrap();
        let cache_dir = self
            .cache_dir
            .clone()
            .unwrap_or_else(|| cache.path().to_path_buf());
        let mut cmd = self.command(args, &cache_dir);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start kubectl {args:?}: {e}"));
        let stdout = child.stdout.take().expect("invariant: stdout is piped");
        let stderr = child.stderr.take().expect("invariant: stderr is piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                match line {
                    Ok(l) => {
                        if tx.send(l).is_err() {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
        });
        let stderr_buf = Arc::new(Mutex::new(String::new()));
        let sink = stderr_buf.clone();
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = BufReader::new(stderr).read_to_string(&mut s);
            sink.lock().unwrap().push_str(&s);
        });
        KubectlProcess {
            child,
            lines: rx,
            seen: Vec::new(),
            stderr: stderr_buf,
            _cache: cache,
        }
    }
}

/// A running kubectl; killed on drop.
pub struct KubectlProcess {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
    stderr: Arc<Mutex<String>>,
    _cache: tempfile::TempDir,
}

impl KubectlProcess {
    /// Waits for a stdout line satisfying `pred`; returns it. Panics after `timeout`,
    /// showing everything printed so far.
    pub fn wait_line(&mut self, timeout: Duration, what: &str, pred: impl Fn(&str) -> bool) -> String {
        if let Some(l) = self.seen.iter().find(|l| pred(l)) {
            return l.clone();
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if pred(&l) {
                        return l;
                    }
                }
                Err(e) => panic!(
                    "kubectl never printed {what} ({e:?}); stdout so far:\n{}\nstderr:\n{}",
                    self.seen.join("\n"),
                    self.stderr.lock().unwrap()
                ),
            }
        }
    }

    /// All stdout lines received so far.
    pub fn lines(&mut self) -> &[String] {
        while let Ok(l) = self.lines.try_recv() {
            self.seen.push(l);
        }
        &self.seen
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for KubectlProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `cmd` with piped stdout/stderr, killing it after `timeout`.
pub fn run_with_timeout(
    mut cmd: Command,
    stdin: Option<Vec<u8>>,
    timeout: Duration,
) -> std::io::Result<Output> {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    if let Some(input) = stdin {
        let mut pipe = child
            .stdin
            .take()
            .expect("invariant: stdin is piped when input is given");
        std::thread::spawn(move || {
            let _ = pipe.write_all(&input);
        });
    }
    let mut out_pipe = child.stdout.take().expect("invariant: stdout is piped");
    let mut err_pipe = child.stderr.take().expect("invariant: stderr is piped");
    let out_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = out_pipe.read_to_end(&mut b);
        b
    });
    let err_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = err_pipe.read_to_end(&mut b);
        b
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let s = child.wait()?;
            let stderr = String::from_utf8_lossy(&err_t.join().unwrap_or_default()).into_owned();
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("still running after {timeout:?} (killed, {s}); stderr: {stderr}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stdout = String::from_utf8_lossy(&out_t.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err_t.join().unwrap_or_default()).into_owned();
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Removes the `AGE` column (computed by kubectl from the clock at print time) from
/// kubectl's table output, so two reads of the same state compare equal.
pub fn without_age_column(table: &str) -> String {
    let mut lines = table.lines();
    let Some(header) = lines.next() else {
        return String::new();
    };
    let Some(at) = header.find("AGE") else {
        return table.to_string();
    };
    std::iter::once(header)
        .chain(lines)
        .map(|l| {
            let cut: String = l.chars().take(at).collect();
            cut.trim_end().to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

// --------------------------------------------------------------- namespace ----

/// A namespace of its own for one test, created directly as admin; on drop its
/// contents and itself are removed (and finalized: no namespace controller runs).
pub struct TestNamespace {
    name: String,
    admin_kubeconfig: PathBuf,
}

impl TestNamespace {
    pub fn create(prefix: &str) -> TestNamespace {
        let c = cluster();
        let name = unique_name(prefix);
        kubectl(&c.admin_kubeconfig, &["create", "namespace", &name]).ok();
        TestNamespace {
            name,
            admin_kubeconfig: c.admin_kubeconfig.clone(),
        }
    }

    /// Takes over the cleanup of a namespace created some other way (e.g. by the test).
    pub fn adopt(name: &str) -> TestNamespace {
        TestNamespace {
            name: name.to_string(),
            admin_kubeconfig: cluster().admin_kubeconfig.clone(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl std::fmt::Display for TestNamespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

/// Deletes `namespace` with everything the tests create in it, then finalizes it.
/// Best effort: cleanup failures are reported on stderr, not as test failures.
pub fn delete_namespace(admin_kubeconfig: &Path, namespace: &str) {
    let cache = tempfile::tempdir().unwrap();
    let k = Kubectl::new(admin_kubeconfig).cache_dir(cache.path());
    let report = |what: &str, o: &Output| {
        if !o.success() {
            eprintln!("cleanup of namespace {namespace}: {what} failed: {}", o.stderr);
        }
    };
    let o = k.run(&[
        "delete",
        "configmaps,secrets,pods,services,serviceaccounts,roles,rolebindings",
        "--all",
        "-n",
        namespace,
        "--wait=false",
        "--ignore-not-found",
    ]);
    report("deleting contents", &o);
    let o = k.run(&[
        "delete",
        "namespace",
        namespace,
        "--wait=false",
        "--ignore-not-found",
    ]);
    report("deleting the namespace", &o);
    let got = k.run(&["get", "namespace", namespace, "-o", "json", "--ignore-not-found"]);
    if got.success() && !got.stdout.trim().is_empty() {
        let mut ns = got.json();
        ns["spec"]["finalizers"] = Value::Array(vec![]);
        let o = k.clone().stdin(ns.to_string()).run(&[
            "replace",
            "--raw",
            &format!("/api/v1/namespaces/{namespace}/finalize"),
            "-f",
            "-",
        ]);
        report("finalizing", &o);
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        delete_namespace(&self.admin_kubeconfig, &self.name);
    }
}

// --------------------------------------------------------------- audit log ----

/// How long a sentinel request may take to show up in the audit log.
pub const SENTINEL_TIMEOUT: Duration = Duration::from_secs(30);

/// The API server's audit log (one JSON line per request and stage), and the
/// kubeconfig that sends sentinel requests to that API server.
///
/// The API server rotates the file (to `audit-<time>.log` in the same directory)
/// when it reaches 100 MB, whatever `--audit-log-maxsize` says; an [`AuditMark`]
/// follows it across rotations.
#[derive(Debug, Clone)]
pub struct AuditLog {
    path: PathBuf,
    /// Sends the sentinels of [`AuditMark::entries_after_sentinel`]; `None`: none can be sent.
    sentinel_kubeconfig: Option<PathBuf>,
}

/// One finished request as the API server recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    pub stage: String,
    pub verb: String,
    pub request_uri: String,
    pub username: String,
    pub code: Option<u16>,
    pub user_agent: String,
}

impl AuditLog {
    /// The audit log at `path` of the API server that `admin_kubeconfig` reaches
    /// (the sentinels are sent with it).
    pub fn new(path: impl Into<PathBuf>, admin_kubeconfig: impl Into<PathBuf>) -> AuditLog {
        AuditLog {
            path: path.into(),
            sentinel_kubeconfig: Some(admin_kubeconfig.into()),
        }
    }

    /// Remembers the current end of the log (the file, by inode, and its length);
    /// [`AuditMark`] reads what comes after.
    pub fn mark(&self) -> AuditMark {
        let at = std::fs::metadata(&self.path).ok().map(|m| {
            use std::os::unix::fs::MetadataExt;
            (m.ino(), m.len())
        });
        AuditMark {
            log: self.clone(),
            at,
        }
    }
}

/// A point in the audit log.
#[derive(Debug, Clone)]
pub struct AuditMark {
    log: AuditLog,
    /// Inode and length of the log file when marked; `None` when there was none.
    at: Option<(u64, u64)>,
}

/// Which audit events to count. Empty fields match anything.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub user: Option<String>,
    pub verb: Option<String>,
    pub uri_prefix: Option<String>,
    pub uri: Option<String>,
}

impl AuditFilter {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn user(mut self, u: &str) -> Self {
        self.user = Some(u.into());
        self
    }
    pub fn verb(mut self, v: &str) -> Self {
        self.verb = Some(v.into());
        self
    }
    /// Matches `requestURI` starting with `p` (the URI includes the query).
    pub fn uri_prefix(mut self, p: &str) -> Self {
        self.uri_prefix = Some(p.into());
        self
    }
    /// Matches `requestURI` exactly (including the query).
    pub fn uri(mut self, u: &str) -> Self {
        self.uri = Some(u.into());
        self
    }
    pub fn matches(&self, e: &AuditEvent) -> bool {
        self.user.as_ref().is_none_or(|u| *u == e.username)
            && self.verb.as_ref().is_none_or(|v| *v == e.verb)
            && self
                .uri_prefix
                .as_ref()
                .is_none_or(|p| e.request_uri.starts_with(p.as_str()))
            && self.uri.as_ref().is_none_or(|u| *u == e.request_uri)
    }
}

impl AuditMark {
    /// Every complete line (any stage) logged after the mark, in order, read across
    /// rotations: the rest of the marked file, every file rotated after it, then the
    /// current one. If the marked file is gone (a fresh cluster), or the current file
    /// is shorter than the mark, the current file is read from its start.
    pub fn entries(&self) -> Vec<Value> {
        let bytes = self.bytes_since();
        let complete = match bytes.iter().rposition(|b| *b == b'\n') {
            Some(i) => &bytes[..=i],
            None => return Vec::new(),
        };
        complete
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .filter_map(|l| serde_json::from_slice::<Value>(l).ok())
            .collect()
    }

    /// Every finished (`ResponseComplete`) request logged after the mark, in order.
    /// Only complete lines are read.
    pub fn events(&self) -> Vec<AuditEvent> {
        finished_events(&self.entries())
    }

    /// The finished requests after the mark that match `filter`.
    pub fn matching(&self, filter: &AuditFilter) -> Vec<AuditEvent> {
        self.events().into_iter().filter(|e| filter.matches(e)).collect()
    }

    /// The lines after the mark, up to a sentinel: sends a request of its own straight
    /// to the API server (a GET of a ConfigMap that does not exist, at a URI nobody
    /// else uses) and waits until its line is in the log. With
    /// `--audit-log-mode=blocking` lines are written in completion order, so every
    /// request that completed before the sentinel was sent is then in the log: what
    /// is not there did not reach the API server. Lines after the sentinel's are left
    /// out, so repeated calls never count a later request, nor the sentinels.
    ///
    /// A request still running upstream when the sentinel is sent (an open watch,
    /// or one that a client gave up on) may be missing: wait for those first.
    ///
    /// # Panics
    /// When the sentinel's line does not appear within [`SENTINEL_TIMEOUT`], or the
    /// log has no API server to send it to ([`AuditLog::new`]).
    pub fn entries_after_sentinel(&self) -> Vec<Value> {
        let kubeconfig = self.log.sentinel_kubeconfig.as_ref().unwrap_or_else(|| {
            panic!(
                "no API server to send a sentinel to for {}",
                self.log.path.display()
            )
        });
        let uri = format!(
            "/api/v1/namespaces/kache-sentinel/configmaps/{}",
            unique_name("sentinel")
        );
        // A 404 is the expected answer: only its audit line matters.
        let sent = kubectl(kubeconfig, &["get", "--raw", &uri]);
        let deadline = Instant::now() + SENTINEL_TIMEOUT;
        loop {
            let mut entries = self.entries();
            let sentinel = entries
                .iter()
                .position(|e| e["stage"] == "ResponseComplete" && e["requestURI"] == uri.as_str());
            if let Some(i) = sentinel {
                entries.truncate(i);
                return entries;
            }
            assert!(
                Instant::now() < deadline,
                "the sentinel GET {uri} did not reach the audit log {} within {SENTINEL_TIMEOUT:?}; kubectl: {}",
                self.log.path.display(),
                sent.stderr.trim()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The finished requests after the mark and before a sentinel (see
    /// [`AuditMark::entries_after_sentinel`]).
    pub fn events_after_sentinel(&self) -> Vec<AuditEvent> {
        finished_events(&self.entries_after_sentinel())
    }

    /// The finished requests matching `filter` after the mark and before a sentinel
    /// (see [`AuditMark::entries_after_sentinel`]).
    pub fn matching_after_sentinel(&self, filter: &AuditFilter) -> Vec<AuditEvent> {
        self.events_after_sentinel()
            .into_iter()
            .filter(|e| filter.matches(e))
            .collect()
    }

    /// How many finished requests matching `filter` reached the API server after the
    /// mark, counted once a sentinel's line is in the log (see
    /// [`AuditMark::entries_after_sentinel`]). Assert on it with `assert_eq!`.
    pub fn count_after_sentinel(&self, filter: &AuditFilter) -> usize {
        self.matching_after_sentinel(filter).len()
    }

    /// The bytes logged after the mark, across rotations (see [`AuditMark::entries`]).
    fn bytes_since(&self) -> Vec<u8> {
        use std::os::unix::fs::MetadataExt;
        // The current file is opened first: if it is rotated after that, it is read
        // through this handle and not again among the rotated ones.
        let mut current = std::fs::File::open(&self.log.path).ok();
        let current_at = current
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map(|m| (m.ino(), m.len()));
        let mut out = Vec::new();
        let from = match (self.at, current_at) {
            (None, _) => 0,
            // Shorter than the mark: truncated in place, read it all.
            (Some((ino, offset)), Some((now, len))) if ino == now => {
                if len < offset {
                    0
                } else {
                    offset
                }
            }
            (Some((ino, offset)), _) => {
                let rotated = self.rotated_files();
                // Not among them: a fresh log (a new cluster), read from its start.
                let first = rotated.iter().position(|(_, i)| *i == ino);
                for (k, (path, i)) in rotated[first.unwrap_or(rotated.len())..].iter().enumerate() {
                    if current_at.is_some_and(|(now, _)| now == *i) {
                        break;
                    }
                    if let Ok(mut f) = std::fs::File::open(path) {
                        read_from(&mut f, if k == 0 { offset } else { 0 }, &mut out);
                        if out.last().is_some_and(|b| *b != b'\n') {
                            out.push(b'\n');
                        }
                    }
                }
                0
            }
        };
        if let Some(f) = current.as_mut() {
            read_from(f, from, &mut out);
        }
        out
    }

    /// The rotated logs beside the log (`<stem>-<time>.<ext>`), oldest first (the
    /// time in the name sorts), with their inodes.
    fn rotated_files(&self) -> Vec<(PathBuf, u64)> {
        use std::os::unix::fs::MetadataExt;
        let path = &self.log.path;
        let (Some(dir), Some(stem)) = (path.parent(), path.file_stem().and_then(|s| s.to_str())) else {
            return Vec::new();
        };
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or_default();
        let (prefix, suffix) = (format!("{stem}-"), format!(".{ext}"));
        let Ok(read_dir) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut rotated: Vec<(PathBuf, u64)> = read_dir
            .filter_map(Result::ok)
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(&suffix))
            })
            .filter_map(|e| Some((e.path(), e.metadata().ok()?.ino())))
            .collect();
        rotated.sort();
        rotated
    }
}

/// Appends everything in `file` from `offset` on to `out` (nothing if it is shorter).
fn read_from(file: &mut std::fs::File, offset: u64, out: &mut Vec<u8>) {
    use std::io::{Seek, SeekFrom};
    if file.seek(SeekFrom::Start(offset)).is_ok() {
        let _ = file.read_to_end(out);
    }
}

/// The `ResponseComplete` lines among `entries`, as events.
fn finished_events(entries: &[Value]) -> Vec<AuditEvent> {
    entries
        .iter()
        .filter(|v| v["stage"] == "ResponseComplete")
        .map(|v| AuditEvent {
            stage: v["stage"].as_str().unwrap_or_default().to_string(),
            verb: v["verb"].as_str().unwrap_or_default().to_string(),
            request_uri: v["requestURI"].as_str().unwrap_or_default().to_string(),
            username: v["user"]["username"].as_str().unwrap_or_default().to_string(),
            code: v["responseStatus"]["code"]
                .as_u64()
                .and_then(|c| u16::try_from(c).ok()),
            user_agent: v["userAgent"].as_str().unwrap_or_default().to_string(),
        })
        .collect()
}

// ------------------------------------------------------------------- relay ----

/// A loopback TCP relay to `target`: lets a test cut the path between kache and the
/// API server without disturbing the shared API server. Stopped on drop.
pub struct Relay {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    thread: Option<JoinHandle<()>>,
}

impl Relay {
    /// Starts a relay on a free loopback port.
    pub fn start(target: SocketAddr) -> Relay {
        Self::start_on(0, target)
    }

    /// Starts a relay on `port` of 127.0.0.1 (e.g. the port of a relay stopped before).
    pub fn start_on(port: u16, target: SocketAddr) -> Relay {
        let listener = poll_until(
            Duration::from_secs(10),
            &format!("binding relay port {port}"),
            || TcpListener::bind(("127.0.0.1", port)).ok(),
        );
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let thread = {
            let stop = stop.clone();
            let conns = conns.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((down, _)) => {
                            let _ = down.set_nonblocking(false);
                            let Ok(up) = TcpStream::connect(target) else {
                                continue;
                            };
                            let _ = down.set_nodelay(true);
                            let _ = up.set_nodelay(true);
                            let mut guard = conns.lock().unwrap();
                            for (from, to) in [(&down, &up), (&up, &down)] {
                                let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
                                    continue;
                                };
                                std::thread::spawn(move || {
                                    let _ = std::io::copy(&mut from, &mut to);
                                    let _ = to.shutdown(Shutdown::Write);
                                });
                            }
                            guard.push(down);
                            guard.push(up);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
                // The listener is dropped here: new connections are refused.
            })
        };
        Relay {
            addr,
            stop,
            conns,
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Closes the listener and every relayed connection; returns the port.
    pub fn stop(mut self) -> u16 {
        self.shutdown();
        self.addr.port()
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shutdown();
    }
}

// --------------------------------------------------------------------- raw ----

/// A tiny blocking HTTP/1.1 client: sends exactly the given bytes, reads one response
/// (Content-Length, chunked, or until close). For kache's plain-HTTP listeners.
pub mod raw {
    use super::*;

    /// How long a raw exchange may take.
    pub const TIMEOUT: Duration = Duration::from_secs(30);

    #[derive(Debug, Clone)]
    pub struct Response {
        pub status: u16,
        /// Header names lowercased, in order.
        pub headers: Vec<(String, String)>,
        pub body: Vec<u8>,
    }

    impl Response {
        /// The first header named `name` (case-insensitive).
        pub fn header(&self, name: &str) -> Option<&str> {
            let name = name.to_ascii_lowercase();
            self.headers
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.as_str())
        }

        pub fn text(&self) -> String {
            String::from_utf8_lossy(&self.body).into_owned()
        }

        #[track_caller]
        pub fn json(&self) -> Value {
            serde_json::from_slice(&self.body).unwrap_or_else(|e| {
                panic!(
                    "body of the {} response is not JSON ({e}): {}",
                    self.status,
                    self.text()
                )
            })
        }
    }

    /// `GET path` with `Host: <addr>` and `Connection: close`.
    pub fn get(addr: SocketAddr, path: &str) -> std::io::Result<Response> {
        get_with(addr, path, &[])
    }

    /// `GET path` with extra headers (a given `Host` replaces the default one).
    pub fn get_with(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> std::io::Result<Response> {
        let mut req = format!("GET {path} HTTP/1.1\r\n");
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            req.push_str(&format!("Host: {addr}\r\n"));
        }
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("Connection: close\r\n\r\n");
        exchange(addr, req.as_bytes())
    }

    /// Sends `request` verbatim and reads one response. The request is written from
    /// another thread while the response is read, so a server that answers early
    /// (e.g. 431 before the headers end) is still heard.
    pub fn exchange(addr: SocketAddr, request: &[u8]) -> std::io::Result<Response> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(TIMEOUT))?;
        stream.set_write_timeout(Some(TIMEOUT))?;
        let mut writer = stream.try_clone()?;
        let request = request.to_vec();
        let w = std::thread::spawn(move || {
            let _ = writer.write_all(&request);
            let _ = writer.flush();
        });
        let r = read_response(BufReader::new(stream));
        let _ = w.join();
        r
    }

    fn bad(msg: impl Into<String>) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into())
    }

    /// Reads one HTTP/1.1 response.
    pub fn read_response(mut r: impl BufRead) -> std::io::Result<Response> {
        let mut line = String::new();
        r.read_line(&mut line)?;
        if line.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed before a response",
            ));
        }
        let mut parts = line.split_whitespace();
        let version = parts.next().unwrap_or_default();
        if !version.starts_with("HTTP/1.") {
            return Err(bad(format!("not an HTTP/1 status line: {line:?}")));
        }
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(format!("bad status line {line:?}")))?;
        let mut headers = Vec::new();
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let l = line.trim_end_matches(['\r', '\n']);
            if l.is_empty() {
                break;
            }
            let (k, v) = l
                .split_once(':')
                .ok_or_else(|| bad(format!("bad header line {l:?}")))?;
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
        let mut resp = Response {
            status,
            headers,
            body: Vec::new(),
        };
        let chunked = resp
            .header("transfer-encoding")
            .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
        if chunked {
            loop {
                line.clear();
                r.read_line(&mut line)?;
                let size_hex = line.trim().split(';').next().unwrap_or_default();
                let size = usize::from_str_radix(size_hex, 16)
                    .map_err(|_| bad(format!("bad chunk size {line:?}")))?;
                if size == 0 {
                    // Trailers, then the final empty line.
                    loop {
                        line.clear();
                        if r.read_line(&mut line)? == 0 || line.trim().is_empty() {
                            break;
                        }
                    }
                    break;
                }
                let start = resp.body.len();
                resp.body.resize(start + size, 0);
                r.read_exact(&mut resp.body[start..])?;
                line.clear();
                r.read_line(&mut line)?;
            }
        } else if let Some(len) = resp.header("content-length") {
            let len: usize = len.parse().map_err(|_| bad("bad content-length"))?;
            resp.body.resize(len, 0);
            r.read_exact(&mut resp.body)?;
        } else if !(status == 204 || status == 304 || (100..200).contains(&status)) {
            r.read_to_end(&mut resp.body)?;
        }
        Ok(resp)
    }
}

// -------------------------------------------------------------- async http ----

/// `GET url` over plain HTTP with hyper-util's client and extra headers; the whole
/// body is collected. No header is added but `Host`.
pub async fn http_get(url: &str, headers: &[(&str, &str)]) -> http::Response<bytes::Bytes> {
    use http_body_util::BodyExt;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let mut req = http::Request::get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(http_body_util::Empty::new()).unwrap();
    let resp = tokio::time::timeout(raw::TIMEOUT, client.request(req))
        .await
        .unwrap_or_else(|_| panic!("GET {url}: no response within {:?}", raw::TIMEOUT))
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(raw::TIMEOUT, body.collect())
        .await
        .unwrap_or_else(|_| panic!("GET {url}: body not complete within {:?}", raw::TIMEOUT))
        .unwrap_or_else(|e| panic!("GET {url}: reading the body: {e}"))
        .to_bytes();
    http::Response::from_parts(parts, body)
}

// ---------------------------------------------------------------- asserts ----

/// Asserts `body` is a Kubernetes `Status` failure with this code (and reason, if given).
#[track_caller]
pub fn assert_status_body(body: &Value, code: u16, reason: Option<&str>) {
    assert_eq!(body["kind"], "Status", "not a Status: {body}");
    assert_eq!(body["apiVersion"], "v1", "not a v1 Status: {body}");
    assert_eq!(body["status"], "Failure", "not a failure Status: {body}");
    assert_eq!(body["code"], u64::from(code), "wrong code in Status: {body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "Status without message: {body}"
    );
    if let Some(reason) = reason {
        assert_eq!(body["reason"], reason, "wrong reason in Status: {body}");
    }
}

/// Removes the fields that differ between two otherwise identical objects created
/// separately (identity, versions, timestamps), and renames `name` to `NAME`.
pub fn normalize_object(obj: &mut Value, name: &str) {
    if let Some(meta) = obj.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        for f in [
            "uid",
            "resourceVersion",
            "creationTimestamp",
            "selfLink",
            "generation",
        ] {
            meta.remove(f);
        }
        if meta.get("name").and_then(|n| n.as_str()) == Some(name) {
            meta.insert("name".into(), "NAME".into());
        }
        if let Some(mf) = meta.get_mut("managedFields").and_then(|m| m.as_array_mut()) {
            for e in mf {
                if let Some(e) = e.as_object_mut() {
                    e.remove("time");
                }
            }
        }
        if let Some(ann) = meta.get_mut("annotations").and_then(|a| a.as_object_mut()) {
            if let Some(last) = ann.get_mut("kubectl.kubernetes.io/last-applied-configuration") {
                if let Some(s) = last.as_str() {
                    *last = Value::String(s.replace(name, "NAME"));
                }
            }
        }
    }
}

// ---------------------------------------------------------------- metrics ----

/// The sum of the samples of `name` in a `/metrics` text whose labels
/// include all of `labels`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric_name, label_text) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            (metric_name == name
                && labels
                    .iter()
                    .all(|(k, v)| label_text.split(',').any(|kv| kv == format!("{k}=\"{v}\""))))
            .then(|| value.parse::<f64>().ok())
            .flatten()
        })
        .sum()
}

// ------------------------------------------------------------ own cluster ----

/// A cluster of a test's own (tests/cluster/up.sh in `dir`), for tests that
/// restart its API server or compact its etcd, which the shared one must
/// never see. Stopped on drop.
pub struct OwnCluster {
    dir: PathBuf,
    pub cluster: Cluster,
}

impl OwnCluster {
    /// Starts (or reuses a healthy) cluster in `dir`.
    ///
    /// # Panics
    /// When up.sh fails.
    pub fn up(dir: &Path) -> OwnCluster {
        std::fs::create_dir_all(dir).unwrap();
        let script = workspace_root().join("tests/cluster/up.sh");
        let out = Command::new(&script)
            .arg(dir)
            .env_remove("KACHE_CLUSTER_DIR")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} {} failed:\n{}",
            script.display(),
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let env_file = env_file_printed_by_up(&String::from_utf8_lossy(&out.stdout), dir);
        OwnCluster {
            dir: dir.to_path_buf(),
            cluster: load_cluster_env(&env_file),
        }
    }

    /// A variable of the cluster's env file.
    pub fn var(&self, key: &str) -> String {
        self.cluster
            .env
            .get(key)
            .cloned()
            .unwrap_or_else(|| panic!("{}/env does not define {key}", self.dir.display()))
    }

    /// Restarts kube-apiserver (etcd and its data stay).
    pub async fn restart_apiserver(&self) {
        let dir = self.dir.clone();
        let out = tokio::task::spawn_blocking(move || {
            Command::new(workspace_root().join("tests/cluster/restart-apiserver.sh"))
                .arg(&dir)
                .stdin(Stdio::null())
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        assert!(
            out.status.success(),
            "restart-apiserver.sh failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A call to etcd's JSON gateway (`/v3/...`); no etcdctl needed.
    pub fn etcd(&self, path: &str, body: &Value) -> Value {
        let endpoint = self.var("KACHE_ETCD_ENDPOINT");
        let addr: SocketAddr = endpoint
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .unwrap();
        let body = body.to_string();
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let r = raw::exchange(addr, request.as_bytes()).unwrap_or_else(|e| panic!("etcd {path}: {e}"));
        assert_eq!(r.status, 200, "etcd {path}: {}", r.text());
        r.json()
    }

    /// etcd's current revision.
    pub fn etcd_revision(&self) -> u64 {
        self.etcd("/v3/kv/range", &serde_json::json!({"key": "AA=="}))["header"]["revision"]
            .as_str()
            .and_then(|r| r.parse().ok())
            .expect("etcd's revision")
    }

    /// Compacts etcd at its current revision: every older version is gone.
    pub fn compact(&self) -> u64 {
        let revision = self.etcd_revision();
        self.etcd(
            "/v3/kv/compaction",
            &serde_json::json!({"revision": revision.to_string(), "physical": true}),
        );
        revision
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let out = Command::new(workspace_root().join("tests/cluster/down.sh"))
            .arg(&self.dir)
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "down.sh {}: {}",
                self.dir.display(),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => eprintln!("down.sh {}: {e}", self.dir.display()),
        }
    }
}

/// Sends a JSON write (POST, PUT, PATCH, DELETE) and returns the answer's
/// JSON. Transport errors (an API server restarting) are retried for a
/// while; API errors fail the test.
pub async fn write_json(client: &kube::Client, method: &str, path: &str, body: Option<&Value>) -> Value {
    let content_type = if method == "PATCH" {
        "application/merge-patch+json"
    } else {
        "application/json"
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let request = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::CONTENT_TYPE, content_type)
            .body(body.map(|b| serde_json::to_vec(b).unwrap()).unwrap_or_default())
            .unwrap();
        match tokio::time::timeout(Duration::from_secs(30), client.request::<Value>(request)).await {
            Ok(Ok(answer)) => return answer,
            Ok(Err(kube::Error::Api(status))) => panic!("{method} {path}: {status:?}"),
            Ok(Err(e)) if Instant::now() < deadline => {
                eprintln!("{method} {path}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Ok(Err(e)) => panic!("{method} {path}: {e}"),
            Err(_) => panic!("{method} {path}: no answer within 30 s"),
        }
    }
}

/// Creates `count` configmaps `cm-0000`… in `namespace`, each holding
/// `data_bytes` of data (16 at a time): a collection whose list is large.
pub async fn create_configmaps(client: &kube::Client, namespace: &str, count: usize, data_bytes: usize) {
    use futures::StreamExt;
    let data = "x".repeat(data_bytes);
    let collection = format!("/api/v1/namespaces/{namespace}/configmaps");
    futures::stream::iter(0..count)
        .for_each_concurrent(16, |i| {
            let (collection, data) = (&collection, &data);
            async move {
                let cm = serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": format!("cm-{i:04}")}, "data": {"blob": data}});
                write_json(client, "POST", collection, Some(&cm)).await;
            }
        })
        .await;
}

/// A copy of the kubeconfig `src` in `dir` whose server is `relay` (same CA
/// and credentials: the serving certificate's SAN IP:127.0.0.1 matches it).
pub fn kubeconfig_through(relay: &Relay, src: &Path, dir: &Path) -> PathBuf {
    let kubeconfig = dir.join("relay.kubeconfig");
    kubeconfig_with_server(src, &format!("https://127.0.0.1:{}", relay.port()), &kubeconfig);
    kubeconfig
}

// ---------------------------------------------------------- kache: SIGTERM ----

impl Kache {
    /// Sends SIGTERM (a graceful shutdown: drains, saves snapshots) and
    /// waits for the process to exit; returns how it exited.
    ///
    /// # Panics
    /// When the signal cannot be sent, or kache is still running after `timeout`.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(sent.success(), "kill -TERM {pid}: {sent}");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "kache still running {timeout:?} after SIGTERM; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

// ------------------------------------------------ API server stop/start ----

impl OwnCluster {
    /// Stops kube-apiserver and leaves it down (etcd keeps running); see
    /// [`OwnCluster::start_apiserver`].
    pub async fn stop_apiserver(&self) {
        self.apiserver_script("--stop").await;
    }

    /// Starts the stopped kube-apiserver again with the same command line
    /// and waits until it is ready (a no-op when it already is).
    pub async fn start_apiserver(&self) {
        self.apiserver_script("--start").await;
    }

    async fn apiserver_script(&self, mode: &'static str) {
        let dir = self.dir.clone();
        let out = tokio::task::spawn_blocking(move || {
            Command::new(workspace_root().join("tests/cluster/restart-apiserver.sh"))
                .arg(mode)
                .arg(&dir)
                .stdin(Stdio::null())
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        assert!(
            out.status.success(),
            "restart-apiserver.sh {mode} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

// ------------------------------------------------------------ watch lines ----

/// Takes the complete lines at the front of `buffer` out of it (a JSON
/// watch's events as its body arrives), leaving a partial last line;
/// blank lines are dropped.
pub fn take_lines(buffer: &mut Vec<u8>) -> Vec<Vec<u8>> {
    let mut lines = Vec::new();
    while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
        let line: Vec<u8> = buffer.drain(..=end).collect();
        if !line.iter().all(u8::is_ascii_whitespace) {
            lines.push(line);
        }
    }
    lines
}

// ------------------------------------------------------ custom resources ----

/// A GET whose answer is JSON, within `timeout`.
///
/// # Panics
/// No answer in time, or an error status.
pub async fn get_json(client: &kube::Client, path: &str, timeout: Duration) -> Value {
    let request = http::Request::get(path).body(Vec::new()).unwrap();
    tokio::time::timeout(timeout, client.request::<Value>(request))
        .await
        .unwrap_or_else(|_| panic!("GET {path}: no answer within {timeout:?}"))
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// A namespaced CRD `gadgets.<unique group>` (kind `Gadget`, any fields) of
/// a test's own, deleted on drop.
pub struct Gadgets {
    pub group: String,
    pub name: String,
}

/// How long a CRD may take to become established or discovered.
const CRD_TIMEOUT: Duration = Duration::from_secs(60);

impl Gadgets {
    /// Creates the CRD (its group named after `prefix`) and waits until it is established.
    pub async fn create(direct: &kube::Client, prefix: &str) -> Gadgets {
        let group = format!("{}.example.com", unique_name(prefix));
        let name = format!("gadgets.{group}");
        let body = serde_json::json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": name},
            "spec": {
                "group": group,
                "scope": "Namespaced",
                "names": {"plural": "gadgets", "singular": "gadget", "kind": "Gadget", "listKind": "GadgetList"},
                "versions": [{
                    "name": "v1", "served": true, "storage": true,
                    "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}},
                }],
            },
        });
        let crds = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions";
        write_json(direct, "POST", crds, Some(&body)).await;
        let crd = Gadgets { group, name };
        let deadline = Instant::now() + CRD_TIMEOUT;
        loop {
            let got = get_json(direct, &format!("{crds}/{}", crd.name), CRD_TIMEOUT).await;
            let established = got["status"]["conditions"].as_array().is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Established" && c["status"] == "True")
            });
            if established {
                return crd;
            }
            assert!(
                Instant::now() < deadline,
                "CRD {} never became established",
                crd.name
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn collection(&self, namespace: &str) -> String {
        format!("/apis/{}/v1/namespaces/{namespace}/gadgets", self.group)
    }

    /// The resource's label in kache's metrics.
    pub fn metric(&self) -> String {
        format!("{}/v1/gadgets", self.group)
    }

    /// Waits until kache's discovery serves the group version (else kache
    /// would forward the resource as unknown for a while).
    pub async fn until_discovered(&self, via: &kube::Client) {
        let path = format!("/apis/{}/v1", self.group);
        let deadline = Instant::now() + CRD_TIMEOUT;
        loop {
            let request = http::Request::get(&path).body(Vec::new()).unwrap();
            if let Ok(Ok(list)) = tokio::time::timeout(CRD_TIMEOUT, via.request::<Value>(request)).await {
                if list["resources"]
                    .as_array()
                    .is_some_and(|rs| rs.iter().any(|r| r["name"] == "gadgets"))
                {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "kache's discovery never served {path}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Gadgets {
    fn drop(&mut self) {
        let out = kubectl(
            &cluster().admin_kubeconfig,
            &["delete", "crd", &self.name, "--wait=false", "--ignore-not-found"],
        );
        if !out.success() {
            eprintln!("cleanup: deleting CRD {} failed: {}", self.name, out.stderr);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An audit line of a finished GET of `/n/<n>`.
    fn line(n: usize) -> String {
        format!(
            "{{\"stage\":\"ResponseComplete\",\"verb\":\"get\",\"requestURI\":\"/n/{n}\",\"user\":{{\"username\":\"u\"}}}}\n"
        )
    }

    fn append(path: &Path, lines: impl IntoIterator<Item = usize>) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        for n in lines {
            f.write_all(line(n).as_bytes()).unwrap();
        }
    }

    fn numbers(mark: &AuditMark) -> Vec<usize> {
        mark.events()
            .iter()
            .map(|e| e.request_uri.trim_start_matches("/n/").parse().unwrap())
            .collect()
    }

    fn log_at(path: &Path) -> AuditLog {
        AuditLog {
            path: path.to_path_buf(),
            sentinel_kubeconfig: None,
        }
    }

    #[test]
    fn audit_mark_finds_every_event_after_it_exactly_once_across_rotations() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        // A rotation from before the mark, which must not be read.
        append(&dir.path().join("audit-2026-01-01T00-00-00.000.log"), 900..905);
        append(&path, 0..3);
        let mark = log_at(&path).mark();
        append(&path, 3..6);
        assert_eq!(numbers(&mark), (3..6).collect::<Vec<_>>());

        // Rotated as the API server does: renamed, then a new file.
        std::fs::rename(&path, dir.path().join("audit-2026-01-02T00-00-00.000.log")).unwrap();
        assert_eq!(
            numbers(&mark),
            (3..6).collect::<Vec<_>>(),
            "between the rename and the new file"
        );
        append(&path, 6..9);
        assert_eq!(numbers(&mark), (3..9).collect::<Vec<_>>());

        // Twice: the files rotated after the mark are read in the order of their names.
        std::fs::rename(&path, dir.path().join("audit-2026-01-03T00-00-00.000.log")).unwrap();
        append(&path, 9..11);
        assert_eq!(numbers(&mark), (3..11).collect::<Vec<_>>());

        // A mark taken after a rotation reads only the current file.
        let later = log_at(&path).mark();
        append(&path, 11..12);
        assert_eq!(numbers(&later), [11]);
    }

    #[test]
    fn audit_mark_reads_a_replaced_log_from_its_start_and_only_complete_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        append(&path, 0..5);
        let mark = log_at(&path).mark();
        // A fresh cluster: the old file removed, a new one started.
        std::fs::remove_file(&path).unwrap();
        append(&path, 0..2);
        let partial = line(2);
        let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&partial.as_bytes()[..10]).unwrap();
        assert_eq!(numbers(&mark), [0, 1], "the partial line is not read");
        f.write_all(&partial.as_bytes()[10..]).unwrap();
        assert_eq!(numbers(&mark), [0, 1, 2]);
    }

    #[test]
    fn audit_mark_of_a_log_that_did_not_exist_reads_it_from_its_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let mark = log_at(&path).mark();
        assert!(mark.events().is_empty());
        append(&path, 0..2);
        assert_eq!(numbers(&mark), [0, 1]);
    }
}
