//! Discovery served from memory: `/api`, `/api/<v>`, `/apis`, `/apis/<g>`,
//! `/apis/<g>/<v>`, `/version`, `/openapi/v2`, `/openapi/v3[/<path>]`.
//!
//! ```text
//!  request ─► classify_path ─► Key{path, query, Accept} ─► entry fresh? ─► answer (304 on If-None-Match)
//!                                                            │ no
//!                                                            ▼
//!                                              one upstream GET per key (single flight),
//!                                              cached only if 200 and nothing was invalidated meanwhile
//!
//!  watch customresourcedefinitions ─┐
//!  watch apiservices ───────────────┴─► invalidate the group's entries (now, and again once the
//!                                        API server's discovery has settled); lost watch ⇒ flush all
//! ```
//!
//! The cache answers only while both watches are established: without them
//! kache could not know that an answer went stale, so it forwards instead.
//! Entries also expire after a maximum age, as a safety net.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use futures::future::{FutureExt, Shared};
use futures::StreamExt;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use kache_config::DiscoveryConfig;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use tokio::time::Instant;

use crate::upstream::{ApiClient, BoxFuture, FetchError};

/// The kinds of discovery endpoint, for metrics and invalidation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EndpointKind {
    /// `/api`
    Api,
    /// `/api/<version>`
    CoreVersion,
    /// `/apis`
    Apis,
    /// `/apis/<group>`
    Group,
    /// `/apis/<group>/<version>`
    GroupVersion,
    /// `/version`
    Version,
    /// `/openapi/v2`
    OpenApiV2,
    /// `/openapi/v3` and `/openapi/v3/<path>`
    OpenApiV3,
}

impl EndpointKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EndpointKind::Api => "api",
            EndpointKind::CoreVersion => "api_version",
            EndpointKind::Apis => "apis",
            EndpointKind::Group => "group",
            EndpointKind::GroupVersion => "group_version",
            EndpointKind::Version => "version",
            EndpointKind::OpenApiV2 => "openapi_v2",
            EndpointKind::OpenApiV3 => "openapi_v3",
        }
    }
}

/// Which discovery endpoint a path is, if any. Paths are matched exactly, as
/// the API server's mux does (no trailing slashes, no empty segments).
pub fn classify_path(path: &str) -> Option<EndpointKind> {
    let rest = path.strip_prefix('/')?;
    let segments: Vec<&str> = rest.split('/').collect();
    if segments.iter().any(|s| s.is_empty()) {
        return None;
    }
    match segments.as_slice() {
        ["api"] => Some(EndpointKind::Api),
        ["api", _] => Some(EndpointKind::CoreVersion),
        ["apis"] => Some(EndpointKind::Apis),
        ["apis", _] => Some(EndpointKind::Group),
        ["apis", _, _] => Some(EndpointKind::GroupVersion),
        ["version"] => Some(EndpointKind::Version),
        ["openapi", "v2"] => Some(EndpointKind::OpenApiV2),
        ["openapi", "v3", ..] => Some(EndpointKind::OpenApiV3),
        _ => None,
    }
}

/// Everything that changes a discovery answer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    path: String,
    query: String,
    accept: String,
    /// The API server indents JSON for curl, Wget and browsers (its `isPrettyPrint`).
    pretty: bool,
}

impl Key {
    fn of(request: &http::request::Parts) -> Key {
        Key {
            path: request.uri.path().to_string(),
            query: request.uri.query().unwrap_or("").to_string(),
            accept: request
                .headers
                .get(header::ACCEPT)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .unwrap_or_default(),
            pretty: request
                .headers
                .get(header::USER_AGENT)
                .and_then(|ua| ua.to_str().ok())
                .is_some_and(|ua| PRETTY_USER_AGENTS.iter().any(|p| ua.starts_with(p))),
        }
    }
}

/// User-Agent prefixes the API server pretty-prints JSON for.
const PRETTY_USER_AGENTS: &[&str] = &["curl", "Wget", "Mozilla/5.0"];

/// What kache sends upstream to get the pretty rendering a client would get.
const PRETTY_FETCH_USER_AGENT: &str = "curl/kache";

/// A cached 200 answer.
#[derive(Debug)]
struct Entry {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    fetched_at: Instant,
}

/// Response headers replayed from a cached entry; per-request ones (Audit-Id,
/// Date, priority-and-fairness UIDs) are not.
const REPLAYED_HEADERS: &[HeaderName] = &[
    header::CONTENT_TYPE,
    header::ETAG,
    header::LAST_MODIFIED,
    header::CACHE_CONTROL,
    header::EXPIRES,
    header::VARY,
    header::X_CONTENT_TYPE_OPTIONS,
];

/// How long after a CRD or APIService change the entries of its group are
/// invalidated once more: the API server updates its own discovery
/// asynchronously (a controller reacts to the same event), so an answer
/// fetched right after the event may not include the change yet.
const SETTLE_DELAYS: &[Duration] = &[Duration::from_secs(1), Duration::from_secs(4)];

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

/// Discovery cache metrics.
#[derive(Clone, Default)]
pub struct DiscoveryMetrics {
    hits: Family<KindLabels, Counter>,
    misses: Family<KindLabels, Counter>,
    refreshes: Family<KindLabels, Counter>,
    bypassed: Family<KindLabels, Counter>,
    invalidations: Counter,
    entries: Gauge,
    synced: Gauge,
}

impl DiscoveryMetrics {
    pub fn register(registry: &mut Registry) -> DiscoveryMetrics {
        let metrics = DiscoveryMetrics::default();
        registry.register(
            "discovery_hits",
            "Discovery answers served from memory",
            metrics.hits.clone(),
        );
        registry.register(
            "discovery_misses",
            "Discovery requests fetched upstream because nothing was cached",
            metrics.misses.clone(),
        );
        registry.register(
            "discovery_refreshes",
            "Discovery entries fetched again because they passed their maximum age",
            metrics.refreshes.clone(),
        );
        registry.register(
            "discovery_bypassed",
            "Discovery requests forwarded because the cache was not in sync",
            metrics.bypassed.clone(),
        );
        registry.register(
            "discovery_invalidations",
            "Invalidations caused by CRD/APIService changes or lost watches",
            metrics.invalidations.clone(),
        );
        registry.register(
            "discovery_entries",
            "Discovery entries held",
            metrics.entries.clone(),
        );
        registry.register(
            "discovery_synced",
            "1 while the CRD and APIService watches are established",
            metrics.synced.clone(),
        );
        metrics
    }
}

type Flight = Shared<BoxFuture<'static, Result<Arc<Entry>, FetchError>>>;

/// The discovery cache. Cheap to clone.
#[derive(Clone)]
pub struct Discovery {
    inner: Arc<Inner>,
}

struct Inner {
    client: Arc<dyn ApiClient>,
    config: DiscoveryConfig,
    entries: DashMap<Key, Arc<Entry>>,
    /// The last answer stored for each key, kept when the watches are lost
    /// (not when a change invalidates it), to answer from during an outage.
    last_known: DashMap<Key, Arc<Entry>>,
    /// When the CRD/APIService watches were last lost (`None` while in sync).
    lost_sync_at: std::sync::Mutex<Option<std::time::Instant>>,
    flights: DashMap<Key, Flight>,
    /// Bumped by every invalidation: a fetch that started before one is not stored.
    generation: AtomicU64,
    crds_synced: AtomicBool,
    apiservices_synced: AtomicBool,
    metrics: DiscoveryMetrics,
}

/// A resource as discovery describes it (`APIResourceList` entry).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiResource {
    pub name: String,
    #[serde(default)]
    pub namespaced: bool,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub verbs: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct ApiResourceList {
    #[serde(default)]
    resources: Vec<ApiResource>,
}

impl Discovery {
    /// A cache that is not in sync yet: it forwards until [`Discovery::run`]
    /// has established its watches.
    pub fn new(client: Arc<dyn ApiClient>, config: DiscoveryConfig, metrics: DiscoveryMetrics) -> Discovery {
        Discovery {
            inner: Arc::new(Inner {
                client,
                config,
                entries: DashMap::new(),
                last_known: DashMap::new(),
                lost_sync_at: std::sync::Mutex::new(None),
                flights: DashMap::new(),
                generation: AtomicU64::new(0),
                crds_synced: AtomicBool::new(false),
                apiservices_synced: AtomicBool::new(false),
                metrics,
            }),
        }
    }

    /// Whether the cache may answer now.
    pub fn is_synced(&self) -> bool {
        self.inner.config.enabled
            && self.inner.crds_synced.load(Ordering::Acquire)
            && self.inner.apiservices_synced.load(Ordering::Acquire)
    }

    /// Answers a discovery request from memory (fetching it once if needed).
    ///
    /// Returns `None` when the request is not discovery or the cache is not in
    /// sync, and `Some(Err)` when the fetch failed: in both cases the caller
    /// forwards the request, which answers authoritatively.
    pub async fn serve(&self, request: &http::request::Parts) -> Option<Result<Response<Bytes>, FetchError>> {
        if request.method != Method::GET && request.method != Method::HEAD {
            return None;
        }
        let kind = classify_path(request.uri.path())?;
        let labels = KindLabels { kind: kind.as_str() };
        if !self.is_synced() {
            self.inner.metrics.bypassed.get_or_create(&labels).inc();
            return None;
        }
        let key = Key::of(request);
        let entry = match self.lookup(&key) {
            Lookup::Fresh(entry) => {
                self.inner.metrics.hits.get_or_create(&labels).inc();
                entry
            }
            Lookup::Expired => {
                self.inner.metrics.refreshes.get_or_create(&labels).inc();
                match self.fetch(key).await {
                    Ok(entry) => entry,
                    Err(error) => return Some(Err(error)),
                }
            }
            Lookup::Absent => {
                self.inner.metrics.misses.get_or_create(&labels).inc();
                match self.fetch(key).await {
                    Ok(entry) => entry,
                    Err(error) => return Some(Err(error)),
                }
            }
        };
        Some(Ok(render(&entry, request)))
    }

    /// During an outage (`cache.serveStale`): the last answer kache had for
    /// this discovery request, if it was still valid when the CRD/APIService
    /// watches were lost at most `max_staleness` ago, with how long ago that
    /// was. While in sync, only a current (possibly expired) entry qualifies.
    pub fn serve_stale(
        &self,
        request: &http::request::Parts,
        max_staleness: std::time::Duration,
    ) -> Option<(Response<Bytes>, std::time::Duration)> {
        if !self.inner.config.enabled || request.method != Method::GET && request.method != Method::HEAD {
            return None;
        }
        classify_path(request.uri.path())?;
        let key = Key::of(request);
        let lost = *self
            .inner
            .lost_sync_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (entry, staleness) = match lost {
            None if self.is_synced() => (self.inner.entries.get(&key)?.clone(), std::time::Duration::ZERO),
            None => return None,
            Some(at) => (self.inner.last_known.get(&key)?.clone(), at.elapsed()),
        };
        (staleness <= max_staleness).then(|| (render(&entry, request), staleness))
    }

    fn lookup(&self, key: &Key) -> Lookup {
        match self.inner.entries.get(key) {
            Some(entry) if entry.fetched_at.elapsed() < self.inner.config.max_age => {
                Lookup::Fresh(entry.clone())
            }
            Some(_) => Lookup::Expired,
            None => Lookup::Absent,
        }
    }

    /// One upstream GET per key at a time; the fetch runs in its own task so
    /// that a client giving up does not cancel it for the others.
    async fn fetch(&self, key: Key) -> Result<Arc<Entry>, FetchError> {
        let flight = self
            .inner
            .flights
            .entry(key.clone())
            .or_insert_with(|| {
                let inner = self.inner.clone();
                let generation = inner.generation.load(Ordering::Acquire);
                let task = tokio::spawn(async move {
                    let result = inner.fetch_entry(&key).await;
                    if let Ok(entry) = &result {
                        // Stored only if nothing was invalidated while the request was out.
                        if entry.status == StatusCode::OK
                            && inner.generation.load(Ordering::Acquire) == generation
                            && inner.is_synced()
                        {
                            inner.entries.insert(key.clone(), entry.clone());
                            inner.last_known.insert(key.clone(), entry.clone());
                            inner.metrics.entries.set(inner.entries.len() as i64);
                        }
                    }
                    inner.flights.remove(&key);
                    result
                });
                let flight: BoxFuture<'static, Result<Arc<Entry>, FetchError>> =
                    Box::pin(task.map(|joined| {
                        joined.unwrap_or_else(|e| Err(FetchError(format!("discovery fetch failed: {e}"))))
                    }));
                flight.shared()
            })
            .clone();
        flight.await
    }

    /// Drops the entries a change in `group` can affect: `/apis`, the group's
    /// own documents and the OpenAPI documents.
    pub fn invalidate_group(&self, group: &str) {
        self.inner.forget(|path| {
            path == "/apis"
                || path.starts_with("/openapi/")
                || path
                    .strip_prefix("/apis/")
                    .is_some_and(|rest| rest == group || rest.starts_with(&format!("{group}/")))
        });
    }

    /// Drops every entry.
    pub fn invalidate_all(&self) {
        self.inner.invalidate(|_| true);
    }

    /// The resources of a group version, from the (cached) discovery document.
    ///
    /// # Errors
    /// The document could not be fetched or parsed, or the upstream answered
    /// with an error status.
    pub async fn resources(&self, group: &str, version: &str) -> Result<Vec<ApiResource>, FetchError> {
        let path = if group.is_empty() {
            format!("/api/{version}")
        } else {
            format!("/apis/{group}/{version}")
        };
        let key = Key {
            path,
            query: String::new(),
            accept: "application/json".to_string(),
            pretty: false,
        };
        let entry = match self.lookup(&key) {
            Lookup::Fresh(entry) if self.is_synced() => entry,
            _ => self.fetch(key.clone()).await?,
        };
        if entry.status != StatusCode::OK {
            return Err(FetchError(format!("{} answered {}", key.path, entry.status)));
        }
        let list: ApiResourceList = serde_json::from_slice(&entry.body)
            .map_err(|e| FetchError(format!("{}: not an APIResourceList: {e}", key.path)))?;
        Ok(list.resources)
    }

    /// Keeps the cache in sync: watches CRDs and APIServices until dropped.
    pub async fn run(self) {
        let crds = watch_loop(
            self.clone(),
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
            |inner| &inner.crds_synced,
        );
        let apiservices = watch_loop(
            self.clone(),
            "/apis/apiregistration.k8s.io/v1/apiservices",
            |inner| &inner.apiservices_synced,
        );
        futures::join!(crds, apiservices);
    }
}

enum Lookup {
    Fresh(Arc<Entry>),
    Expired,
    Absent,
}

impl Inner {
    fn is_synced(&self) -> bool {
        self.config.enabled
            && self.crds_synced.load(Ordering::Acquire)
            && self.apiservices_synced.load(Ordering::Acquire)
    }

    /// Invalidates what a change made wrong: not even an outage may answer it.
    fn forget(&self, affected: impl Fn(&str) -> bool) {
        self.last_known.retain(|key, _| !affected(&key.path));
        self.invalidate(affected);
    }

    fn invalidate(&self, affected: impl Fn(&str) -> bool) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.entries.retain(|key, _| !affected(&key.path));
        self.metrics.entries.set(self.entries.len() as i64);
        self.metrics.invalidations.inc();
    }

    async fn fetch_entry(&self, key: &Key) -> Result<Arc<Entry>, FetchError> {
        let uri = if key.query.is_empty() {
            key.path.clone()
        } else {
            format!("{}?{}", key.path, key.query)
        };
        let mut request = Request::get(uri);
        if !key.accept.is_empty() {
            request = request.header(header::ACCEPT, key.accept.as_str());
        }
        if key.pretty {
            request = request.header(header::USER_AGENT, PRETTY_FETCH_USER_AGENT);
        }
        let request = request
            .body(())
            .map_err(|e| FetchError(format!("invalid discovery request: {e}")))?;
        let response = self.client.fetch(request).await?;
        let (parts, body) = response.into_parts();
        let mut headers = HeaderMap::new();
        for name in REPLAYED_HEADERS {
            for value in parts.headers.get_all(name) {
                headers.append(name.clone(), value.clone());
            }
        }
        Ok(Arc::new(Entry {
            status: parts.status,
            headers,
            body,
            fetched_at: Instant::now(),
        }))
    }
}

/// The answer for a request from an entry: 304 when the client already has
/// this version (`If-None-Match` with the entry's `ETag`), no body for HEAD.
fn render(entry: &Entry, request: &http::request::Parts) -> Response<Bytes> {
    let etag = entry.headers.get(header::ETAG);
    let not_modified = match (etag, request.headers.get(header::IF_NONE_MATCH)) {
        (Some(etag), Some(wanted)) => if_none_match_matches(wanted, etag),
        _ => false,
    };
    let (status, body) = if not_modified {
        (StatusCode::NOT_MODIFIED, Bytes::new())
    } else if request.method == Method::HEAD {
        (entry.status, Bytes::new())
    } else {
        (entry.status, entry.body.clone())
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = entry.headers.clone();
    if not_modified {
        response.headers_mut().remove(header::CONTENT_TYPE);
    } else if request.method == Method::HEAD {
        response
            .headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(entry.body.len()));
    }
    response
}

/// `If-None-Match: "a", W/"b"` or `*` against an `ETag` (weak comparison, RFC 9110 §13.1.2).
fn if_none_match_matches(wanted: &HeaderValue, etag: &HeaderValue) -> bool {
    let Ok(wanted) = wanted.to_str() else { return false };
    let Ok(etag) = etag.to_str() else { return false };
    let strip = |t: &str| t.trim().trim_start_matches("W/").to_string();
    let etag = strip(etag);
    wanted
        .split(',')
        .any(|candidate| candidate.trim() == "*" || strip(candidate) == etag)
}

#[derive(Debug, Deserialize)]
struct WatchEvent {
    #[serde(rename = "type")]
    kind: String,
    object: serde_json::Value,
}

/// How long one watch request lasts before kache renews it.
const WATCH_TIMEOUT_SECONDS: u32 = 300;
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// LIST (for a resourceVersion) then WATCH one kind of object, invalidating
/// on every change; relists on 410 and after errors, with backoff.
async fn watch_loop(discovery: Discovery, path: &'static str, flag: fn(&Inner) -> &AtomicBool) {
    let inner = discovery.inner.clone();
    let mut backoff = Duration::from_millis(250);
    let mut warned = false;
    loop {
        let resource_version = match list_resource_version(inner.client.as_ref(), path).await {
            Ok(rv) => rv,
            Err(error) => {
                if !warned {
                    tracing::warn!(path, %error, "cannot list for discovery freshness; discovery is forwarded");
                    warned = true;
                }
                set_synced(&inner, flag, false);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        if !flag(&inner).load(Ordering::Acquire) {
            // Anything may have changed while we were not watching.
            discovery.invalidate_all();
            set_synced(&inner, flag, true);
            tracing::info!(path, "discovery cache in sync");
        }
        warned = false;
        let mut resource_version = resource_version;
        loop {
            match watch_once(&discovery, path, &mut resource_version).await {
                WatchEnd::Renew => backoff = Duration::from_millis(250),
                WatchEnd::Expired => break,
                WatchEnd::Failed(error) => {
                    tracing::warn!(path, %error, "discovery watch lost; flushing");
                    set_synced(&inner, flag, false);
                    discovery.invalidate_all();
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    break;
                }
            }
        }
    }
}

fn set_synced(inner: &Inner, flag: fn(&Inner) -> &AtomicBool, synced: bool) {
    let was = inner.is_synced();
    flag(inner).store(synced, Ordering::Release);
    let now = inner.is_synced();
    let mut lost = inner
        .lost_sync_at
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if now {
        *lost = None;
    } else if was {
        *lost = Some(std::time::Instant::now());
    }
    inner.metrics.synced.set(i64::from(now));
}

async fn list_resource_version(client: &dyn ApiClient, path: &str) -> Result<String, FetchError> {
    let request = Request::get(format!("{path}?limit=1"))
        .header(header::ACCEPT, "application/json")
        .body(())
        .map_err(|e| FetchError(e.to_string()))?;
    let response = client.fetch(request).await?;
    if response.status() != StatusCode::OK {
        return Err(FetchError(format!("LIST {path} answered {}", response.status())));
    }
    let list: serde_json::Value =
        serde_json::from_slice(response.body()).map_err(|e| FetchError(format!("LIST {path}: {e}")))?;
    list["metadata"]["resourceVersion"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| FetchError(format!("LIST {path}: no resourceVersion")))
}

enum WatchEnd {
    /// The server ended the watch normally: watch again from the last version.
    Renew,
    /// 410 Gone: relist.
    Expired,
    Failed(FetchError),
}

async fn watch_once(discovery: &Discovery, path: &str, resource_version: &mut String) -> WatchEnd {
    let uri = format!(
        "{path}?watch=true&allowWatchBookmarks=true&timeoutSeconds={WATCH_TIMEOUT_SECONDS}&resourceVersion={resource_version}"
    );
    let request = match Request::get(uri)
        .header(header::ACCEPT, "application/json")
        .body(())
    {
        Ok(request) => request,
        Err(e) => return WatchEnd::Failed(FetchError(e.to_string())),
    };
    let response = match discovery.inner.client.stream(request).await {
        Ok(response) => response,
        Err(error) => return WatchEnd::Failed(error),
    };
    match response.status() {
        StatusCode::OK => {}
        StatusCode::GONE => return WatchEnd::Expired,
        status => return WatchEnd::Failed(FetchError(format!("WATCH {path} answered {status}"))),
    }
    let mut body = response.into_body();
    let mut buffer = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(error) => return WatchEnd::Failed(error),
        };
        buffer.extend_from_slice(&chunk);
        while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=end).collect();
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let event: WatchEvent = match serde_json::from_slice(&line) {
                Ok(event) => event,
                Err(error) => {
                    return WatchEnd::Failed(FetchError(format!("WATCH {path}: bad event: {error}")))
                }
            };
            if event.kind == "ERROR" {
                if event.object["code"].as_u64() == Some(410) {
                    return WatchEnd::Expired;
                }
                return WatchEnd::Failed(FetchError(format!("WATCH {path}: {}", event.object["message"])));
            }
            if let Some(rv) = event.object["metadata"]["resourceVersion"].as_str() {
                *resource_version = rv.to_string();
            }
            if event.kind == "BOOKMARK" {
                continue;
            }
            let group = event.object["spec"]["group"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            tracing::info!(
                path,
                event = event.kind.as_str(),
                name = event.object["metadata"]["name"].as_str().unwrap_or_default(),
                group = group.as_str(),
                "discovery changed"
            );
            discovery.invalidate_group(&group);
            let later = discovery.clone();
            tokio::spawn(async move {
                for delay in SETTLE_DELAYS {
                    tokio::time::sleep(*delay).await;
                    later.invalidate_group(&group);
                }
            });
        }
    }
    WatchEnd::Renew
}

#[cfg(test)]
mod tests;
