//! The admin listener: `/` (the status page, [`crate::status_page`]),
//! `/livez`, `/readyz` (with `?verbose`, `?exclude=` and `/readyz/<check>`,
//! as the API server answers them), `/metrics`, `/debug/cache`,
//! `/debug/clients` (the cost ledger). Kept off the main listener, which
//! forwards those paths to the API server like any other.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use serde::Serialize;
use tokio::time::Instant;

use kache_cache::rbac::Rbac;
use kache_cache::resources::Cache;
use kache_cache::upstream::ApiClient;

use crate::body::{full, Body};
use crate::ledger::Ledger;
use crate::metrics::Metrics;

/// Clients `/debug/clients` lists by default (`?limit=N`, at most
/// [`MAX_CLIENTS_LISTED`]); the rest are aggregated.
const CLIENTS_LISTED: usize = 20;
const MAX_CLIENTS_LISTED: usize = 1000;

/// How often the status page's history takes a sample, and how many it
/// keeps (15 minutes' worth, a few kilobytes).
pub const SAMPLE_PERIOD: Duration = Duration::from_secs(5);
pub const HISTORY_SAMPLES: usize = 180;

/// How old the API server's version may get before a look at the status
/// page asks for it again (in the background; the page shows what it has),
/// and how long after asking it asks again when it got no answer.
const VERSION_MAX_AGE: Duration = Duration::from_secs(600);
const VERSION_RETRY: Duration = Duration::from_secs(60);

/// What the admin endpoints read.
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub cache: Cache,
    pub ledger: Arc<Ledger>,
    /// Shared mode's RBAC evaluator: a new replica is not ready before it
    /// has the RBAC objects once (else every answer from memory would need a
    /// SubjectAccessReview). Later resyncs do not take readiness away: the
    /// reviews keep answers right meanwhile.
    pub rbac: Option<Rbac>,
    pub rbac_synced_once: AtomicBool,
    /// The resources `cache.preload` names, as (group, version, resource):
    /// kache is not ready before each has a synced store (once; a later
    /// relist does not take readiness away, reads are forwarded meanwhile).
    pub preload: Vec<(String, String, String)>,
    preload_synced_once: AtomicBool,
    /// What is known of the API server, for the status page.
    pub upstream: Arc<UpstreamInfo>,
    /// Samples of the request counters, for the status page's charts.
    pub history: History,
    /// Whether kache runs in local or shared mode.
    pub mode: &'static str,
    pub started: Instant,
}

impl AdminState {
    /// The state of a kache in local mode with nothing preloaded; `client`
    /// asks the API server its version when the status page needs it.
    pub fn new(
        metrics: Arc<Metrics>,
        cache: Cache,
        ledger: Arc<Ledger>,
        client: Arc<dyn ApiClient>,
    ) -> AdminState {
        AdminState {
            metrics,
            cache,
            ledger,
            rbac: None,
            rbac_synced_once: AtomicBool::new(false),
            preload: Vec::new(),
            preload_synced_once: AtomicBool::new(false),
            upstream: Arc::new(UpstreamInfo::new(client, String::new())),
            history: History::default(),
            mode: "local",
            started: Instant::now(),
        }
    }

    /// The readiness checks that apply, in order, each with why it fails.
    pub fn readiness(&self) -> Vec<(&'static str, Result<(), String>)> {
        let mut checks = vec![("ping", Ok(()))];
        checks.push((
            "upstream",
            if self.metrics.is_ready() {
                Ok(())
            } else {
                Err("the API server has not answered yet".into())
            },
        ));
        checks.push((
            "warm-start",
            if self.cache.warm_started() {
                Ok(())
            } else {
                Err("the cache is restoring its snapshots".into())
            },
        ));
        if let Some(rbac) = &self.rbac {
            checks.push(("rbac", self.rbac_check(rbac)));
        }
        if !self.preload.is_empty() {
            checks.push(("preload", self.preload_check()));
        }
        checks
    }

    fn rbac_check(&self, rbac: &Rbac) -> Result<(), String> {
        if !self.rbac_synced_once.load(Ordering::Relaxed) {
            if !rbac.is_synced() {
                return Err("the RBAC objects are not synced yet".into());
            }
            self.rbac_synced_once.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    fn preload_check(&self) -> Result<(), String> {
        if self.preload_synced_once.load(Ordering::Relaxed) {
            return Ok(());
        }
        let view = self.cache.debug_view();
        if view["enabled"] == false {
            return Ok(());
        }
        let stores = view["resources"].as_array().cloned().unwrap_or_default();
        let missing: Vec<String> = self
            .preload
            .iter()
            .filter(|(group, version, resource)| {
                !stores.iter().any(|s| {
                    s["group"] == group.as_str()
                        && s["version"] == version.as_str()
                        && s["resource"] == resource.as_str()
                        && s["synced"] == true
                })
            })
            .map(|(group, version, resource)| {
                if group.is_empty() {
                    format!("{version}/{resource}")
                } else {
                    format!("{group}/{version}/{resource}")
                }
            })
            .collect();
        if missing.is_empty() {
            self.preload_synced_once.store(true, Ordering::Relaxed);
            Ok(())
        } else {
            Err(format!(
                "preloaded resources not synced yet: {}",
                missing.join(", ")
            ))
        }
    }

    /// Takes a sample for the history every [`SAMPLE_PERIOD`], until dropped.
    pub async fn run_sampler(self: Arc<Self>) {
        let mut ticker = tokio::time::interval(SAMPLE_PERIOD);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            self.history
                .record(crate::status_page::sample(&self.metrics, self.started.elapsed()));
        }
    }
}

/// The API server as the status page shows it: its URL and version.
pub struct UpstreamInfo {
    client: Arc<dyn ApiClient>,
    pub url: String,
    version: Mutex<Option<(UpstreamVersion, Instant)>>,
    /// When the status page last asked.
    asked: Mutex<Option<Instant>>,
}

/// The fields of the API server's `/version` the status page shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamVersion {
    #[serde(default)]
    pub git_version: String,
    #[serde(default)]
    pub platform: String,
}

impl UpstreamInfo {
    pub fn new(client: Arc<dyn ApiClient>, url: String) -> UpstreamInfo {
        UpstreamInfo {
            client,
            url,
            version: Mutex::new(None),
            asked: Mutex::new(None),
        }
    }

    /// Records a `/version` answer (the readiness probe's, or the refresh's).
    pub fn learn_version(&self, body: &[u8]) {
        match serde_json::from_slice::<UpstreamVersion>(body) {
            Ok(version) => {
                *self.version.lock().unwrap_or_else(PoisonError::into_inner) =
                    Some((version, Instant::now()));
            }
            Err(error) => tracing::debug!(%error, "the API server's /version is not a version"),
        }
    }

    /// The version last learned, and how long ago.
    pub fn version(&self) -> Option<(UpstreamVersion, Duration)> {
        self.version
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|(version, at)| (version.clone(), at.elapsed()))
    }

    /// Asks the API server its version again, in the background, if the
    /// last answer is older than [`VERSION_MAX_AGE`] (or there is none) and
    /// it was not asked in the last [`VERSION_RETRY`]: one request a minute
    /// at most, and only while someone looks at the page.
    pub fn refresh_if_old(self: &Arc<Self>) {
        if self.version().is_some_and(|(_, age)| age < VERSION_MAX_AGE) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        {
            let mut asked = self.asked.lock().unwrap_or_else(PoisonError::into_inner);
            if asked.is_some_and(|at| at.elapsed() < VERSION_RETRY) {
                return;
            }
            *asked = Some(Instant::now());
        }
        let info = Arc::clone(self);
        runtime.spawn(async move {
            let request = Request::get("/version")
                .header(header::ACCEPT, "application/json")
                .body(())
                .expect("invariant: a static request is valid");
            match info.client.fetch(request).await {
                Ok(response) if response.status() == StatusCode::OK => info.learn_version(response.body()),
                Ok(response) => {
                    tracing::debug!(status = %response.status(), "the API server did not say its version")
                }
                Err(error) => tracing::debug!(%error, "the API server did not say its version"),
            }
        });
    }
}

/// A point of the status page's history: the request counters at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Sample {
    /// Seconds since kache started.
    pub at_seconds: u64,
    /// Requests answered without an upstream call of their own (cache,
    /// discovery, coalesced, stale), since start.
    pub spared: u64,
    /// Requests forwarded to the API server, since start.
    pub forwarded: u64,
}

/// The last [`HISTORY_SAMPLES`] samples, oldest first.
#[derive(Debug, Default)]
pub struct History(Mutex<VecDeque<Sample>>);

impl History {
    pub fn record(&self, sample: Sample) {
        let mut samples = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if samples.len() == HISTORY_SAMPLES {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    pub fn samples(&self) -> Vec<Sample> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .copied()
            .collect()
    }
}

/// The query's values for `key` (`verbose` alone counts as present).
fn query_values<'a>(query: Option<&'a str>, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter_map(move |pair| match pair.split_once('=') {
            Some((k, v)) if k == key => Some(v),
            None if pair == key => Some(""),
            _ => None,
        })
}

/// `/livez`, `/readyz` and their single checks, in the API server's format
/// (`staging/src/k8s.io/apiserver/pkg/server/healthz/healthz.go`): `ok`, or
/// with `?verbose` a line per check then `<name> check passed`; on failure
/// always the lines, `<name> check failed` and 503 (the API server answers
/// 500). Unlike the API server, a failed check says why: the admin
/// listener is for operators. `?exclude=<check>` skips a check.
fn health(
    name: &str,
    checks: Vec<(&'static str, Result<(), String>)>,
    single: Option<&str>,
    query: Option<&str>,
) -> (StatusCode, String) {
    if let Some(single) = single {
        return match checks.into_iter().find(|(check, _)| *check == single) {
            Some((_, Ok(()))) => (StatusCode::OK, "ok".into()),
            Some((_, Err(why))) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("internal server error: {why}\n"),
            ),
            None => (StatusCode::NOT_FOUND, "not found".into()),
        };
    }
    let mut excluded: Vec<&str> = query_values(query, "exclude").filter(|v| !v.is_empty()).collect();
    let mut lines = String::new();
    let mut failed = false;
    for (check, result) in checks {
        if let Some(at) = excluded.iter().position(|e| *e == check) {
            excluded.remove(at);
            lines.push_str(&format!("[+]{check} excluded: ok\n"));
            continue;
        }
        match result {
            Ok(()) => lines.push_str(&format!("[+]{check} ok\n")),
            Err(why) => {
                failed = true;
                lines.push_str(&format!("[-]{check} failed: {why}\n"));
            }
        }
    }
    if !excluded.is_empty() {
        let names: Vec<String> = excluded.iter().map(|e| format!("{e:?}")).collect();
        lines.push_str(&format!(
            "warn: some health checks cannot be excluded: no matches for {}\n",
            names.join(",")
        ));
    }
    if failed {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{lines}{name} check failed\n"),
        );
    }
    if query_values(query, "verbose").next().is_none() {
        return (StatusCode::OK, "ok".into());
    }
    (StatusCode::OK, format!("{lines}{name} check passed\n"))
}

/// Answers an admin request.
pub fn handle<B>(state: &AdminState, request: &Request<B>) -> Response<Body> {
    let metrics = &state.metrics;
    let path = request.uri().path();
    let query = request.uri().query();
    const TEXT: &str = "text/plain; charset=utf-8";
    let (code, content_type, text): (StatusCode, &str, Bytes) = match path {
        "/" => {
            state.upstream.refresh_if_old();
            let status = crate::status_page::gather(state);
            if query_values(query, "format").any(|f| f == "json") {
                (
                    StatusCode::OK,
                    "application/json",
                    serde_json::to_string_pretty(&status)
                        .expect("invariant: the status serializes")
                        .into(),
                )
            } else {
                (
                    StatusCode::OK,
                    "text/html; charset=utf-8",
                    crate::status_page::render(&status).into(),
                )
            }
        }
        "/livez" | "/healthz" | "/readyz" => {
            let name = &path[1..];
            let checks = if name == "readyz" {
                state.readiness()
            } else {
                vec![("ping", Ok(()))]
            };
            let (code, text) = health(name, checks, None, query);
            (code, TEXT, text.into())
        }
        _ if path.starts_with("/livez/") || path.starts_with("/healthz/") || path.starts_with("/readyz/") => {
            let (name, single) = path[1..]
                .split_once('/')
                .expect("invariant: the path has a slash");
            let checks = if name == "readyz" {
                state.readiness()
            } else {
                vec![("ping", Ok(()))]
            };
            let (code, text) = health(name, checks, Some(single), query);
            (code, TEXT, text.into())
        }
        "/debug/cache" => (
            StatusCode::OK,
            "application/json",
            serde_json::to_string_pretty(&state.cache.debug_view())
                .expect("invariant: a Value serializes")
                .into(),
        ),
        "/debug/clients" => {
            let limit = query_values(query, "limit")
                .find_map(|v| v.parse::<usize>().ok())
                .unwrap_or(CLIENTS_LISTED)
                .min(MAX_CLIENTS_LISTED);
            (
                StatusCode::OK,
                "application/json",
                serde_json::to_string_pretty(&state.ledger.view(limit))
                    .expect("invariant: the view serializes")
                    .into(),
            )
        }
        "/metrics" => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode().into(),
        ),
        _ => (StatusCode::NOT_FOUND, TEXT, Bytes::from_static(b"not found")),
    };
    let mut response = Response::new(full(text));
    *response.status_mut() = code;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(content_type).expect("invariant: content types are valid headers"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if path == "/" {
        // Nothing on the page is loaded from elsewhere, and nothing runs.
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            ),
        );
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use kache_cache::discovery::{Discovery, DiscoveryMetrics};
    use kache_cache::resources::CacheMetrics;
    use kache_cache::upstream::{BoxFuture, ByteStream, FetchError};

    /// An upstream that is never reached.
    struct Unreachable;

    impl ApiClient for Unreachable {
        fn fetch(&self, _: Request<()>) -> BoxFuture<'_, Result<Response<bytes::Bytes>, FetchError>> {
            Box::pin(async { Err(FetchError("unreachable".into())) })
        }
        fn stream(&self, _: Request<()>) -> BoxFuture<'_, Result<Response<ByteStream>, FetchError>> {
            Box::pin(async { Err(FetchError("unreachable".into())) })
        }
    }

    fn state() -> AdminState {
        let client: Arc<dyn ApiClient> = Arc::new(Unreachable);
        let discovery = Discovery::new(client.clone(), Default::default(), DiscoveryMetrics::default());
        AdminState::new(
            Arc::new(Metrics::new()),
            Cache::new(
                client.clone(),
                discovery,
                Default::default(),
                CacheMetrics::default(),
            ),
            Arc::new(Ledger::default()),
            client,
        )
    }

    #[tokio::test]
    async fn the_clients_view_lists_the_top_clients_and_aggregates_the_rest() {
        let state = state();
        for (name, calls) in [("a", 3), ("b", 2), ("c", 1)] {
            let account = state.ledger.account(&crate::admit::ClientKey::new(name));
            for _ in 0..calls {
                account.answered(crate::metrics::Outcome::Forwarded, 200);
                account.upstream_request();
            }
        }
        let response = get(&state, "/debug/clients?limit=2");
        assert_eq!(response.status(), 200);
        let bytes = response.into_body().collect().await.expect("body").to_bytes();
        let view: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
        assert_eq!(view["tracked"], 3);
        let clients: Vec<_> = view["clients"]
            .as_array()
            .expect("clients")
            .iter()
            .map(|c| c["client"].clone())
            .collect();
        assert_eq!(clients, ["a", "b"]);
        assert_eq!(view["clients"][0]["upstreamRequests"], 3);
        assert_eq!(view["clients"][0]["requests"]["forwarded"], 3);
        assert_eq!(view["others"]["clients"], 1);
        assert_eq!(view["others"]["upstreamRequests"], 1);
    }

    fn get(state: &AdminState, path: &str) -> Response<Body> {
        handle(state, &Request::get(path).body(()).expect("request"))
    }

    async fn text(state: &AdminState, path: &str) -> (u16, String) {
        let response = get(state, path);
        let code = response.status().as_u16();
        let body = response.into_body().collect().await.expect("body").to_bytes();
        (code, String::from_utf8(body.to_vec()).expect("utf-8"))
    }

    #[tokio::test]
    async fn readiness_follows_the_upstream() {
        let state = state();
        assert_eq!(get(&state, "/livez").status(), 200);
        assert_eq!(get(&state, "/readyz").status(), 503);
        state.metrics.mark_ready();
        assert_eq!(get(&state, "/readyz").status(), 200);
        assert_eq!(get(&state, "/metrics").status(), 200);
        assert_eq!(get(&state, "/nope").status(), 404);
    }

    #[tokio::test]
    async fn verbose_readiness_lists_each_check_as_the_api_server_does() {
        let state = state();
        assert_eq!(
            text(&state, "/readyz").await,
            (
                503,
                "[+]ping ok\n[-]upstream failed: the API server has not answered yet\n[+]warm-start ok\nreadyz check failed\n"
                    .into()
            ),
            "a failure is always verbose"
        );
        assert_eq!(
            text(&state, "/readyz?verbose").await,
            text(&state, "/readyz").await
        );
        assert_eq!(
            text(&state, "/readyz/upstream").await,
            (
                503,
                "internal server error: the API server has not answered yet\n".into()
            )
        );
        assert_eq!(text(&state, "/readyz/ping").await, (200, "ok".into()));
        assert_eq!(text(&state, "/readyz/nonesuch").await.0, 404);
        assert_eq!(
            text(&state, "/readyz?exclude=upstream&exclude=nonesuch&verbose").await,
            (
                200,
                "[+]ping ok\n[+]upstream excluded: ok\n[+]warm-start ok\n\
                 warn: some health checks cannot be excluded: no matches for \"nonesuch\"\n\
                 readyz check passed\n"
                    .into()
            )
        );
        state.metrics.mark_ready();
        assert_eq!(text(&state, "/readyz").await, (200, "ok".into()));
        assert_eq!(
            text(&state, "/readyz?verbose").await,
            (
                200,
                "[+]ping ok\n[+]upstream ok\n[+]warm-start ok\nreadyz check passed\n".into()
            )
        );
        assert_eq!(text(&state, "/readyz/upstream").await, (200, "ok".into()));
        assert_eq!(
            text(&state, "/livez?verbose").await,
            (200, "[+]ping ok\nlivez check passed\n".into())
        );
        assert_eq!(text(&state, "/healthz").await, (200, "ok".into()));
        assert_eq!(text(&state, "/livez/ping").await, (200, "ok".into()));
        let response = get(&state, "/readyz?verbose");
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "text/plain; charset=utf-8"
        );
        assert_eq!(response.headers()[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
    }

    #[tokio::test]
    async fn readiness_waits_for_the_preloaded_resources_once() {
        let mut state = state();
        state.metrics.mark_ready();
        state.preload = vec![
            (String::new(), "v1".into(), "configmaps".into()),
            ("apps".into(), "v1".into(), "deployments".into()),
        ];
        let (code, body) = text(&state, "/readyz?verbose").await;
        assert_eq!(code, 503);
        assert!(
            body.contains(
                "[-]preload failed: preloaded resources not synced yet: v1/configmaps, apps/v1/deployments\n"
            ),
            "{body}"
        );
        assert!(body.ends_with("readyz check failed\n"), "{body}");
        assert_eq!(
            text(&state, "/readyz?exclude=preload").await,
            (200, "ok".into()),
            "an operator may choose not to wait"
        );
        assert_eq!(text(&state, "/readyz/preload").await.0, 503);
        // Once passed, the check stays passed.
        state.preload_synced_once.store(true, Ordering::Relaxed);
        assert_eq!(text(&state, "/readyz").await, (200, "ok".into()));
    }

    #[tokio::test]
    async fn shared_mode_is_ready_once_the_rbac_objects_were_synced() {
        let mut state = state();
        let rbac = Rbac::new(Arc::new(Unreachable));
        state.rbac = Some(rbac);
        state.metrics.mark_ready();
        assert_eq!(get(&state, "/readyz").status(), 503, "RBAC not synced");
        let (_, body) = text(&state, "/readyz").await;
        assert!(
            body.contains("[-]rbac failed: the RBAC objects are not synced yet\n"),
            "{body}"
        );
        state.rbac = Some(Rbac::from_objects([]));
        assert_eq!(get(&state, "/readyz").status(), 200);
        state.rbac = Some(Rbac::new(Arc::new(Unreachable)));
        assert_eq!(
            get(&state, "/readyz").status(),
            200,
            "a later resync keeps readiness"
        );
    }

    #[tokio::test]
    async fn the_cache_debug_view_is_json() {
        let response = get(&state(), "/debug/cache");
        assert_eq!(response.status(), 200);
        let body = response.into_body().collect().await.expect("body").to_bytes();
        let view: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(view["resources"], serde_json::json!([]));
        assert_eq!(view["enabled"], true);
    }

    #[tokio::test]
    async fn the_status_page_is_html_that_loads_nothing_from_elsewhere() {
        let state = state();
        let response = get(&state, "/");
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "text/html; charset=utf-8"
        );
        let policy = response.headers()[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .expect("ascii");
        assert!(policy.starts_with("default-src 'none'"), "{policy}");
        let (_, html) = text(&state, "/").await;
        assert!(html.starts_with("<!DOCTYPE html>"), "{html}");
        assert!(html.contains(r#"<meta http-equiv="refresh" content="5">"#));
        let (code, json) = text(&state, "/?format=json").await;
        assert_eq!(code, 200);
        let status: serde_json::Value = serde_json::from_str(&json).expect("json");
        assert_eq!(status["ready"], false);
        assert_eq!(status["checks"][1]["name"], "upstream");
    }

    #[test]
    fn the_history_keeps_the_last_samples_only() {
        let history = History::default();
        for n in 0..(HISTORY_SAMPLES as u64 + 10) {
            history.record(Sample {
                at_seconds: n,
                spared: n,
                forwarded: 0,
            });
        }
        let samples = history.samples();
        assert_eq!(samples.len(), HISTORY_SAMPLES);
        assert_eq!(samples[0].at_seconds, 10);
        assert_eq!(
            samples[HISTORY_SAMPLES - 1].at_seconds,
            HISTORY_SAMPLES as u64 + 9
        );
    }

    #[test]
    fn the_version_is_read_from_the_api_servers_answer() {
        let info = UpstreamInfo::new(Arc::new(Unreachable), "https://k".into());
        assert_eq!(info.version(), None);
        info.learn_version(br#"{"major":"1","minor":"20","gitVersion":"v1.20.2","platform":"linux/amd64"}"#);
        let (version, _) = info.version().expect("learned");
        assert_eq!(version.git_version, "v1.20.2");
        assert_eq!(version.platform, "linux/amd64");
        info.learn_version(b"<html>not json</html>");
        assert_eq!(info.version().map(|(v, _)| v.git_version), Some("v1.20.2".into()));
    }
}
