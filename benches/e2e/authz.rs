//! `authz-setup` and `authz-load`: the authorization-overhead benchmark behind
//! `benches/e2e/authz.sh`. Many users, each with its own service-account
//! token, read the same cached objects through kache (local or shared mode)
//! or from the API server directly; the upstream reviews (TokenReviews and
//! SubjectAccessReviews) are counted in the API server's audit log between
//! two sentinel requests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::Args;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};

use crate::{
    audit_kind, audit_mark, audit_scan, cpu_seconds, describe_list, exchange, exchange_timeout,
    latency_summary, watched_processes, AuditPos, Http, Target,
};

/// The Role every benchmark user is bound to.
const ROLE: &str = "configmap-reader";

/// How long to wait for a sentinel's line in the audit log.
const SENTINEL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Args)]
pub(crate) struct AuthzSetup {
    /// The API server, as admin (`BENCH_TOKEN`).
    #[command(flatten)]
    target: Target,
    #[arg(long, default_value = "kache-authz")]
    namespace: String,
    /// Service accounts `reader-00`…, each bound to a Role that may get, list
    /// and watch the namespace's configmaps.
    #[arg(long, default_value_t = 10)]
    users: usize,
    /// Configmaps `cm-000`… in the namespace.
    #[arg(long, default_value_t = 100)]
    configmaps: usize,
    /// Bytes of data in each configmap.
    #[arg(long, default_value_t = 512)]
    configmap_bytes: usize,
}

#[derive(Args)]
pub(crate) struct AuthzLoad {
    /// Where the measured requests go (`--no-auth`: send no token, for kache in local mode).
    #[command(flatten)]
    target: Target,
    /// The API server, for tokens and the audit-log sentinels (as admin, `BENCH_TOKEN`).
    #[arg(long)]
    apiserver_url: String,
    #[arg(long)]
    apiserver_ca: Option<PathBuf>,
    #[arg(long, default_value = "kache-authz")]
    namespace: String,
    /// Users, one closed-loop client each, with a token freshly issued for this cell.
    #[arg(long, default_value_t = 10)]
    users: usize,
    #[arg(long)]
    path: String,
    #[arg(long, default_value = "application/json")]
    accept: String,
    /// Stop starting requests after this many seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Stop starting requests after this many (across all users).
    #[arg(long, default_value_t = 500_000)]
    max_requests: usize,
    /// Per-request timeout, seconds.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    /// The API server's audit log: upstream requests between the sentinels.
    #[arg(long)]
    audit_log: PathBuf,
    /// kache's `/metrics` URL: authentication, authorization and answers during the cell.
    #[arg(long)]
    kache_metrics: Option<String>,
    /// `NAME=PID`: the CPU time the process used during the timed loop (repeatable).
    #[arg(long = "cpu", value_name = "NAME=PID")]
    cpu: Vec<String>,
}

// ---------------------------------------------------------------- setup

/// POSTs an object; an existing one (409) is fine.
async fn create(client: &Http, admin: &Target, path: &str, object: Value) -> Result<bool> {
    let r = exchange(
        client,
        admin.request(Method::POST, path, None, Some(serde_json::to_vec(&object)?))?,
        true,
    )
    .await?;
    match r.status {
        s if s.is_success() => Ok(true),
        StatusCode::CONFLICT => Ok(false),
        s => bail!(
            "POST {path}: {s}: {}",
            String::from_utf8_lossy(r.body.as_deref().unwrap_or_default())
        ),
    }
}

pub(crate) async fn authz_setup(c: AuthzSetup) -> Result<Value> {
    let client = c.target.client()?;
    let admin = &c.target;
    let ns = &c.namespace;
    let start = Instant::now();
    create(
        &client,
        admin,
        "/api/v1/namespaces",
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
    )
    .await?;
    let mut created = 0;
    let data: String = "abcdefghijklmnopqrstuvwxyz0123456789\n"
        .chars()
        .cycle()
        .take(c.configmap_bytes)
        .collect();
    for i in 0..c.configmaps {
        let cm = json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": format!("cm-{i:03}"), "labels": {"app": "kache-authz-bench", "shard": format!("{}", i % 10)}},
            "data": {"config.yaml": data},
        });
        created +=
            usize::from(create(&client, admin, &format!("/api/v1/namespaces/{ns}/configmaps"), cm).await?);
    }
    create(
        &client,
        admin,
        &format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles"),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
               "metadata": {"name": ROLE},
               "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch"]}]}),
    )
    .await?;
    for i in 0..c.users {
        let name = user_name(i);
        create(
            &client,
            admin,
            &format!("/api/v1/namespaces/{ns}/serviceaccounts"),
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}}),
        )
        .await?;
        create(
            &client,
            admin,
            &format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings"),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                   "metadata": {"name": name},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": ROLE},
                   "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}]}),
        )
        .await?;
    }
    Ok(json!({
        "namespace": ns,
        "users": c.users,
        "configmaps": c.configmaps,
        "configmapsCreated": created,
        "configmapBytes": c.configmap_bytes,
        "seconds": start.elapsed().as_secs_f64(),
    }))
}

fn user_name(i: usize) -> String {
    format!("reader-{i:02}")
}

/// A fresh token for each user (TokenRequest API): kache has never seen it.
async fn issue_tokens(client: &Http, admin: &Target, ns: &str, users: usize) -> Result<Vec<String>> {
    let mut tokens = Vec::new();
    for i in 0..users {
        let path = format!("/api/v1/namespaces/{ns}/serviceaccounts/{}/token", user_name(i));
        let body = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                          "spec": {"expirationSeconds": 3600}});
        let r = exchange(
            client,
            admin.request(Method::POST, &path, None, Some(serde_json::to_vec(&body)?))?,
            true,
        )
        .await?;
        let body: Value =
            serde_json::from_slice(r.body.as_deref().unwrap_or_default()).unwrap_or(Value::Null);
        match (r.status.is_success(), body["status"]["token"].as_str()) {
            (true, Some(token)) => tokens.push(token.to_string()),
            _ => bail!("POST {path}: {}: {body}", r.status),
        }
    }
    Ok(tokens)
}

// ---------------------------------------------------------------- audit-log sentinels

/// Sends a request with a unique URI to the API server and waits (bounded)
/// until its `ResponseComplete` line is in the audit log, reading from
/// `from`: every request that finished before the sentinel was sent is
/// logged before it. Returns where the line ends, and the finished requests
/// logged between `from` and the sentinel, by kind (`create tokenreviews`,
/// `get configmaps`, …).
async fn sentinel(
    client: &Http,
    admin: &Target,
    ns: &str,
    log: &Path,
    from: AuditPos,
) -> Result<(AuditPos, BTreeMap<String, usize>)> {
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    let name = format!(
        "kache-authz-sentinel-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let path = format!("/api/v1/namespaces/{ns}/configmaps/{name}");
    let r = exchange_timeout(client, admin.request(Method::GET, &path, None, None)?, false, 30).await?;
    if r.status != StatusCode::NOT_FOUND {
        bail!("sentinel GET {path}: {} (expected 404)", r.status);
    }
    let deadline = Instant::now() + SENTINEL_TIMEOUT;
    let (mut pos, mut by_kind, mut found) = (from, BTreeMap::<String, usize>::new(), false);
    loop {
        pos = audit_scan(log, pos, |line, _, _| {
            if !line.contains("\"stage\":\"ResponseComplete\"") {
                return false;
            }
            if line.contains(&name) {
                found = true;
                return true;
            }
            if let Ok(v) = serde_json::from_str::<Value>(line) {
                *by_kind.entry(audit_kind(&v)).or_default() += 1;
            }
            false
        })?;
        if found {
            return Ok((pos, by_kind));
        }
        if Instant::now() > deadline {
            bail!("the sentinel {path} did not reach the audit log within {SENTINEL_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------- kache's metrics

/// The series of kache's `/metrics` this benchmark reads (histogram buckets left out).
fn wanted(series: &str) -> bool {
    let name = series.split('{').next().unwrap_or(series);
    (name.starts_with("kache_authentication_")
        || name.starts_with("kache_authorization_")
        || name.starts_with("kache_http_request"))
        && !name.ends_with("_bucket")
        && !name.ends_with("_created")
}

async fn metrics_snapshot(client: &Http, url: &str) -> Result<BTreeMap<String, f64>> {
    let request = Request::get(url).body(Full::new(Bytes::new()))?;
    let r = exchange(client, request, true).await?;
    if !r.status.is_success() {
        bail!("GET {url}: {}", r.status);
    }
    let text = String::from_utf8_lossy(r.body.as_deref().unwrap_or_default()).into_owned();
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(series, _)| wanted(series))
        .filter_map(|(series, value)| Some((series.to_string(), value.parse::<f64>().ok()?)))
        .collect())
}

// ---------------------------------------------------------------- load

pub(crate) async fn authz_load(c: AuthzLoad) -> Result<Value> {
    c.target.check()?;
    let admin = Target {
        url: c.apiserver_url.clone(),
        ca: c.apiserver_ca.clone(),
        token: c.target.token.clone(),
        no_auth: false,
    };
    let admin_client = admin.client()?;
    let tokens = if c.target.no_auth {
        vec![String::new(); c.users]
    } else {
        issue_tokens(&admin_client, &admin, &c.namespace, c.users).await?
    };
    let mut workers = Vec::new();
    for token in tokens {
        let mut target = c.target.clone();
        target.token = Some(token);
        let client = target.client()?;
        workers.push((Arc::new(target), client));
    }
    let metrics_client = c.target.client()?;
    let log = c.audit_log.as_path();
    let from = audit_mark(log)?;

    // The counted window opens here: each user's first request (untimed; it
    // also makes the connection) is in it, so a cold token or decision is counted.
    let metrics_before = match &c.kache_metrics {
        Some(url) => Some(metrics_snapshot(&metrics_client, url).await?),
        None => None,
    };
    let (mark, _) = sentinel(&admin_client, &admin, &c.namespace, log, from).await?;
    let window = Instant::now();
    let accept = Some(c.accept.as_str());
    let first = futures::future::join_all(workers.iter().map(|(target, client)| async {
        exchange_timeout(
            client,
            target.request(Method::GET, &c.path, accept, None)?,
            true,
            c.timeout,
        )
        .await
    }))
    .await;
    let mut sample = Value::Null;
    for (i, r) in first.into_iter().enumerate() {
        let r = r.with_context(|| format!("{}'s first request", user_name(i)))?;
        if !r.status.is_success() {
            bail!(
                "{}'s first GET {}: {}: {}",
                user_name(i),
                c.path,
                r.status,
                String::from_utf8_lossy(r.body.as_deref().unwrap_or_default())
            );
        }
        if i == 0 {
            let body = r.body.as_deref().unwrap_or_default();
            sample = describe_list(body);
            if let Ok(v) = serde_json::from_slice::<Value>(body) {
                sample["kind"] = v["kind"].clone();
            }
            sample["status"] = json!(r.status.as_u16());
            sample["bytes"] = json!(r.bytes);
        }
    }

    let (watched, cpu_before) = watched_processes(&c.cpu)?;
    let issued = Arc::new(AtomicUsize::new(0));
    let duration = Duration::from_secs_f64(c.duration);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (target, client) in workers {
        let (issued, path, accept) = (issued.clone(), c.path.clone(), c.accept.clone());
        let (max, timeout) = (c.max_requests, c.timeout);
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = BTreeMap::<String, usize>::new();
            while start.elapsed() < duration && issued.fetch_add(1, Ordering::Relaxed) < max {
                let request = match target.request(Method::GET, &path, Some(&accept), None) {
                    Ok(r) => r,
                    Err(e) => {
                        *errors.entry(e.to_string()).or_default() += 1;
                        break;
                    }
                };
                match exchange_timeout(&client, request, false, timeout).await {
                    Ok(r) if r.status.is_success() => latencies.push(r.elapsed),
                    Ok(r) => *errors.entry(r.status.to_string()).or_default() += 1,
                    Err(e) => *errors.entry(format!("{e:#}")).or_default() += 1,
                }
            }
            (latencies, errors)
        }));
    }
    let (mut latencies, mut errors, mut per_user) =
        (Vec::new(), BTreeMap::<String, usize>::new(), Vec::new());
    for task in tasks {
        let (l, e) = task.await?;
        per_user.push(l.len());
        latencies.extend(l);
        for (k, v) in e {
            *errors.entry(k).or_default() += v;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let window_seconds = window.elapsed().as_secs_f64();
    let mut cpu = serde_json::Map::new();
    for ((name, pid), before) in watched.iter().zip(cpu_before) {
        cpu.insert(name.clone(), json!(cpu_seconds(pid)? - before));
    }

    // The window closes when the second sentinel is logged.
    let (_, upstream) = sentinel(&admin_client, &admin, &c.namespace, log, mark).await?;
    let count = |resource: &str| {
        upstream
            .iter()
            .filter(|(kind, _)| kind.ends_with(resource))
            .map(|(_, n)| n)
            .sum::<usize>()
    };
    let (token_reviews, access_reviews) = (count("tokenreviews"), count("subjectaccessreviews"));
    let kache_metrics = match (&c.kache_metrics, metrics_before) {
        (Some(url), Some(before)) => {
            let after = metrics_snapshot(&metrics_client, url).await?;
            let diff: BTreeMap<String, f64> = after
                .into_iter()
                .map(|(k, v)| {
                    let d = v - before.get(&k).copied().unwrap_or(0.0);
                    (k, d)
                })
                .filter(|(_, d)| *d != 0.0)
                .collect();
            json!(diff)
        }
        _ => Value::Null,
    };
    let ok = latencies.len();
    Ok(json!({
        "url": c.target.url,
        "path": c.path,
        "users": c.users,
        "seconds": seconds,
        "requests": ok,
        "firstRequests": c.users,
        "perUserMin": per_user.iter().min(),
        "perUserMax": per_user.iter().max(),
        "errors": errors,
        "rps": ok as f64 / seconds,
        "latency": latency_summary(latencies),
        // From the first request to the last answer: the time the reviews were made in.
        "windowSeconds": window_seconds,
        "tokenReviews": token_reviews,
        "subjectAccessReviews": access_reviews,
        "upstream": upstream,
        "kacheMetrics": kache_metrics,
        "cpuSeconds": cpu,
        "sample": sample,
    }))
}
