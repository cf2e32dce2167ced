//! The registry of cached resources: one store and reflector per (resource,
//! encoding), started by the first cacheable read in that encoding, stopped
//! when idle, dropped least-recently-used first when over the memory budget.
//! A resource only ever read in JSON is only held in JSON; a built-in one
//! read in protobuf gets a protobuf store of its own (see [`crate::protobuf`]).
//!
//! ```text
//!   read ─► reads::plan ─► resource in the catalogue, listable and watchable?
//!                               │ yes
//!                               ▼
//!           encoding the API server would answer in (JSON, or protobuf for built-ins)
//!                               │
//!                               ▼
//!           (resource, encoding) store (start its reflector on first use,
//!                                       wait ≤ sync timeout)
//!                               │ synced
//!                               ▼
//!           reads::list / get / watch ─► answer            (any "no" ─► Bypass: forward)
//! ```

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use http::header::HeaderMap;
use http::{Request, Response, StatusCode};
use kache_config::CacheConfig;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::discovery::Discovery;
use crate::reads::{self, Bypass, MinVersion, ReadKind, ReadPlan, WatchSettings};
use crate::reflector::{self, ReflectorConfig, ResourceSpec};
use crate::request::RequestInfo;
use crate::store::{Encoding, Store, WatchError};
use crate::upstream::{ApiClient, ByteStream};

/// How long a resource found not cacheable (or evicted) is forwarded before
/// kache looks again.
const NEGATIVE_TTL: Duration = Duration::from_secs(60);
/// How often preloaded resources are checked (and restarted if dropped);
/// well under the idle timeout, so they never go idle.
const PRELOAD_PERIOD: Duration = Duration::from_secs(30);
/// How often idle resources and the memory budget are checked.
const JANITOR_PERIOD: Duration = Duration::from_secs(10);

/// A cached answer.
pub enum Answer {
    Full(Response<Bytes>),
    Stream(Response<ByteStream>),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Gvr {
    group: String,
    version: String,
    resource: String,
}

/// What a store holds: one resource, in one encoding.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    gvr: Gvr,
    encoding: Encoding,
}

struct Cached {
    spec: Arc<ResourceSpec>,
    encoding: Encoding,
    store: Arc<Store>,
    reflector: AbortHandle,
    /// Milliseconds since the registry started, of the last read.
    last_used: AtomicU64,
    watchers: Arc<AtomicUsize>,
}

impl Cached {
    /// Stops following the upstream; watches served from the store end at
    /// once (their clients watch again: forwarded, or cached anew).
    fn stop(&self) {
        self.reflector.abort();
        self.store.close();
    }
}

impl Drop for Cached {
    fn drop(&mut self) {
        self.stop();
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResourceLabels {
    resource: String,
    encoding: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BypassLabels {
    reason: &'static str,
}

/// Per-resource cache metrics.
#[derive(Clone, Default)]
pub struct CacheMetrics {
    hits: Family<ResourceLabels, Counter>,
    forwarded: Family<BypassLabels, Counter>,
    objects: Family<ResourceLabels, Gauge>,
    bytes: Family<ResourceLabels, Gauge>,
    resource_version: Family<ResourceLabels, Gauge>,
    synced: Family<ResourceLabels, Gauge>,
    watchers: Family<ResourceLabels, Gauge>,
    evictions: Counter,
}

impl CacheMetrics {
    pub fn register(registry: &mut Registry) -> CacheMetrics {
        let m = CacheMetrics::default();
        registry.register(
            "cache_hits",
            "Reads answered from the object cache, by resource and encoding",
            m.hits.clone(),
        );
        registry.register(
            "cache_forwarded",
            "Resource reads forwarded instead of answered from the cache, by reason",
            m.forwarded.clone(),
        );
        registry.register(
            "cache_objects",
            "Objects held, by resource and encoding",
            m.objects.clone(),
        );
        registry.register(
            "cache_bytes",
            "Bytes of objects held, by resource and encoding",
            m.bytes.clone(),
        );
        registry.register(
            "cache_resource_version",
            "The store's resourceVersion, by resource and encoding",
            m.resource_version.clone(),
        );
        registry.register(
            "cache_synced",
            "1 while the resource's store is in sync, by resource and encoding",
            m.synced.clone(),
        );
        registry.register(
            "cache_watchers",
            "Watches served from the cache, by resource and encoding",
            m.watchers.clone(),
        );
        registry.register(
            "cache_evictions",
            "Resources dropped to stay within the memory budget",
            m.evictions.clone(),
        );
        m
    }
}

/// The object cache. Cheap to clone.
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

struct Inner {
    client: Arc<dyn ApiClient>,
    discovery: Discovery,
    config: CacheConfig,
    watch: WatchSettings,
    reflector: ReflectorConfig,
    resources: DashMap<Key, Arc<Cached>>,
    /// Not to try again before the instant: a whole resource (`None`: not
    /// cacheable) or one of its stores (evicted over the budget).
    negative: DashMap<(Gvr, Option<Encoding>), (Instant, Bypass)>,
    started: Instant,
    metrics: CacheMetrics,
}

impl Cache {
    pub fn new(
        client: Arc<dyn ApiClient>,
        discovery: Discovery,
        config: CacheConfig,
        metrics: CacheMetrics,
    ) -> Cache {
        let watch = WatchSettings {
            bookmark_interval: config.bookmark_interval,
            buffer: config.watcher_backlog,
            ..WatchSettings::default()
        };
        Cache {
            inner: Arc::new(Inner {
                client,
                discovery,
                watch,
                reflector: ReflectorConfig::default(),
                resources: DashMap::new(),
                negative: DashMap::new(),
                started: Instant::now(),
                metrics,
                config,
            }),
        }
    }

    /// Answers a resource read from the cache, or says why it must be forwarded.
    ///
    /// # Errors
    /// The [`Bypass`] reason; the caller forwards the request.
    pub async fn serve(
        &self,
        info: &RequestInfo,
        query: Option<&str>,
        headers: &HeaderMap,
    ) -> Result<Answer, Bypass> {
        self.serve_plan(info, self.plan(info, query, headers)).await
    }

    /// What a read asks of the cache, or why the cache cannot answer it
    /// (cheap: no store is touched). [`Cache::serve_plan`] answers it; a
    /// caller that must decide something between the two (shared mode
    /// authorizes exactly the reads the cache would answer) plans once.
    ///
    /// # Errors
    /// The cache is disabled, or the request is not one the cache answers.
    pub fn plan(
        &self,
        info: &RequestInfo,
        query: Option<&str>,
        headers: &HeaderMap,
    ) -> Result<ReadPlan, Bypass> {
        if !self.inner.config.enabled {
            return Err(Bypass::Disabled);
        }
        reads::plan(info, query, headers)
    }

    /// [`Cache::serve`] for a request already planned with [`Cache::plan`].
    ///
    /// # Errors
    /// As [`Cache::serve`].
    pub async fn serve_plan(
        &self,
        info: &RequestInfo,
        plan: Result<ReadPlan, Bypass>,
    ) -> Result<Answer, Bypass> {
        let result = match plan {
            Ok(plan) => self.try_serve(info, plan).await,
            Err(reason) => Err(reason),
        };
        match &result {
            Ok((_, encoding)) => {
                let labels = ResourceLabels {
                    resource: resource_label(&info.group, &info.version, &info.resource),
                    encoding: encoding.as_str(),
                };
                self.inner.metrics.hits.get_or_create(&labels).inc();
            }
            Err(reason) if *reason != Bypass::NotARead => {
                self.inner
                    .metrics
                    .forwarded
                    .get_or_create(&BypassLabels {
                        reason: reason.as_str(),
                    })
                    .inc();
            }
            Err(_) => {}
        }
        result.map(|(answer, _)| answer)
    }

    async fn try_serve(&self, info: &RequestInfo, mut plan: ReadPlan) -> Result<(Answer, Encoding), Bypass> {
        let gvr = Gvr {
            group: info.group.clone(),
            version: info.version.clone(),
            resource: info.resource.clone(),
        };
        let spec = self.spec(&gvr).await?;
        if !spec.namespaced && !plan.namespace.is_empty() {
            // `/api/v1/namespaces/{name}` names the namespace itself; any
            // other cluster-scoped resource under a namespace is not a path
            // the API server serves: let it answer.
            if info.resource != "namespaces" {
                return Err(Bypass::Parameters);
            }
            plan.namespace.clear();
        }
        let encoding = plan.encoding(&spec)?;
        if !reads::fields_supported(&plan.field, &spec) {
            return Err(Bypass::UnsupportedField);
        }
        let cached = self.resource(Key { gvr, encoding }, spec).await?;
        let answer = self.answer(plan, &cached).await?;
        Ok((answer, encoding))
    }

    /// Answers a planned read from a cached store.
    async fn answer(&self, plan: reads::ReadPlan, cached: &Cached) -> Result<Answer, Bypass> {
        cached.last_used.store(self.inner.now_ms(), Ordering::Relaxed);
        let store = &cached.store;
        if !store.is_synced() {
            return Err(Bypass::NotSynced);
        }
        if let (MinVersion::AtLeast(rv), false) = (plan.version, matches!(plan.kind, ReadKind::Watch { .. }))
        {
            if !store.wait_for(rv, self.inner.config.fresh_timeout).await {
                return Err(Bypass::NotFresh);
            }
        }
        let encoding = cached.encoding;
        match &plan.kind {
            ReadKind::List => Ok(Answer::Full(reads::list(&plan, &cached.spec, store, encoding))),
            ReadKind::Get { name } => Ok(Answer::Full(reads::get(
                name,
                &plan,
                &cached.spec,
                store,
                encoding,
            ))),
            ReadKind::Watch { .. } => {
                if let MinVersion::AtLeast(rv) = plan.version {
                    // A version from a fresher list than the store: wait briefly.
                    if !store.wait_for(rv, self.inner.config.fresh_timeout).await {
                        return Err(Bypass::NotFresh);
                    }
                }
                let watchers = cached.watchers.clone();
                watchers.fetch_add(1, Ordering::Relaxed);
                let gauge = self.inner.metrics.watchers.get_or_create(&ResourceLabels {
                    resource: resource_label(&cached.spec.group, &cached.spec.version, &cached.spec.resource),
                    encoding: encoding.as_str(),
                });
                gauge.inc();
                let gauge = gauge.clone();
                let on_end = move || {
                    watchers.fetch_sub(1, Ordering::Relaxed);
                    gauge.dec();
                };
                // A version the store no longer has events for is forwarded:
                // the API server may still have it, or answers 410 itself.
                reads::watch(
                    plan,
                    cached.spec.clone(),
                    store.clone(),
                    encoding,
                    &self.inner.watch,
                    on_end,
                )
                .map(Answer::Stream)
                .map_err(|error| match error {
                    WatchError::TooOld(_) => Bypass::TooOld,
                    WatchError::Stopped => Bypass::NotSynced,
                })
            }
        }
    }

    /// What is known of a resource: from one of its stores, else from
    /// discovery (a resource found not cacheable is remembered for a while).
    async fn spec(&self, gvr: &Gvr) -> Result<Arc<ResourceSpec>, Bypass> {
        for encoding in [Encoding::Json, Encoding::Protobuf] {
            let key = Key {
                gvr: gvr.clone(),
                encoding,
            };
            if let Some(cached) = self.inner.resources.get(&key) {
                return Ok(cached.spec.clone());
            }
        }
        if let Some(entry) = self.inner.negative.get(&(gvr.clone(), None)) {
            let (until, reason) = *entry;
            if Instant::now() < until {
                return Err(reason);
            }
        }
        match self.spec_for(gvr).await {
            Ok(spec) => Ok(Arc::new(spec)),
            Err(reason) => {
                self.inner
                    .negative
                    .insert((gvr.clone(), None), (Instant::now() + NEGATIVE_TTL, reason));
                Err(reason)
            }
        }
    }

    /// The store of a resource in an encoding: started on first use.
    /// No map guard is held across an await: a shard's lock held while
    /// waiting for a sync would block every thread that touches the shard.
    async fn resource(&self, key: Key, spec: Arc<ResourceSpec>) -> Result<Arc<Cached>, Bypass> {
        let existing = self.inner.resources.get(&key).map(|cached| Arc::clone(&cached));
        if let Some(cached) = existing {
            return self.until_synced(cached).await;
        }
        if let Some(entry) = self.inner.negative.get(&(key.gvr.clone(), Some(key.encoding))) {
            let (until, reason) = *entry;
            if Instant::now() < until {
                return Err(reason);
            }
        }
        let encoding = key.encoding;
        let cached = self
            .inner
            .resources
            .entry(key)
            .or_insert_with(|| {
                let store = Arc::new(Store::new(
                    self.inner.config.event_window,
                    self.inner.config.watcher_backlog,
                ));
                tracing::info!(resource = %spec.qualified_resource(), version = %spec.version, encoding = encoding.as_str(), "caching");
                let task = tokio::spawn(reflector::run(
                    self.inner.client.clone(),
                    spec.clone(),
                    store.clone(),
                    self.inner.reflector.clone(),
                    encoding,
                ));
                Arc::new(Cached {
                    spec,
                    encoding,
                    store,
                    reflector: task.abort_handle(),
                    last_used: AtomicU64::new(self.inner.now_ms()),
                    watchers: Arc::new(AtomicUsize::new(0)),
                })
            })
            .clone();
        self.until_synced(cached).await
    }

    async fn until_synced(&self, cached: Arc<Cached>) -> Result<Arc<Cached>, Bypass> {
        if cached.store.is_synced() || cached.store.wait_for(1, self.inner.config.sync_timeout).await {
            Ok(cached)
        } else {
            Err(Bypass::NotSynced)
        }
    }

    /// What discovery says of a resource; `NotCacheable` unless it can be listed and watched.
    async fn spec_for(&self, gvr: &Gvr) -> Result<ResourceSpec, Bypass> {
        let resources = self.inner.discovery.resources(&gvr.group, &gvr.version).await.map_err(|error| {
            tracing::debug!(%error, group = %gvr.group, version = %gvr.version, "no discovery for the resource");
            Bypass::NotCacheable
        })?;
        let resource = resources
            .into_iter()
            .find(|r| r.name == gvr.resource)
            .ok_or(Bypass::NotCacheable)?;
        let can = |verb: &str| resource.verbs.iter().any(|v| v == verb);
        if !(can("list") && can("watch") && can("get")) {
            return Err(Bypass::NotCacheable);
        }
        let built_in = crate::request::BUILT_IN_GROUPS.contains(&gvr.group.as_str());
        let custom = !built_in && self.is_custom(gvr).await?;
        Ok(ResourceSpec {
            group: gvr.group.clone(),
            version: gvr.version.clone(),
            resource: gvr.resource.clone(),
            kind: resource.kind,
            namespaced: resource.namespaced,
            custom,
            speaks_protobuf: if built_in {
                Some(true)
            } else if custom {
                Some(false)
            } else {
                None
            },
        })
    }

    /// Whether a CustomResourceDefinition serves the resource (else an aggregated API server does).
    async fn is_custom(&self, gvr: &Gvr) -> Result<bool, Bypass> {
        let path = format!(
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{}.{}",
            gvr.resource, gvr.group
        );
        let request = Request::get(path)
            .header(http::header::ACCEPT, "application/json")
            .body(())
            .map_err(|_| Bypass::NotCacheable)?;
        match self.inner.client.fetch(request).await {
            Ok(response) if response.status() == StatusCode::OK => Ok(true),
            Ok(response) if response.status() == StatusCode::NOT_FOUND => Ok(false),
            _ => Err(Bypass::NotCacheable),
        }
    }

    /// Starts the resources the configuration preloads and keeps them cached
    /// (retrying those that cannot be cached yet), until dropped.
    pub async fn run_preload(self) {
        if self.inner.config.preload.is_empty() {
            return;
        }
        let mut ticker = tokio::time::interval(PRELOAD_PERIOD);
        let mut reported = std::collections::HashSet::new();
        loop {
            ticker.tick().await;
            for (group, version, resource) in &self.inner.config.preload {
                let gvr = Gvr {
                    group: group.clone(),
                    version: version.clone(),
                    resource: resource.clone(),
                };
                match self.warm(gvr).await {
                    Ok(()) => {
                        reported.remove(&(group, version, resource));
                    }
                    Err(reason) => {
                        if reported.insert((group, version, resource)) {
                            tracing::warn!(group = %group, version = %version, resource = %resource, reason = reason.as_str(), "cannot preload");
                        }
                    }
                }
            }
        }
    }

    /// Starts a resource's JSON store if needed and marks it used now.
    async fn warm(&self, gvr: Gvr) -> Result<(), Bypass> {
        let spec = self.spec(&gvr).await?;
        let cached = self
            .resource(
                Key {
                    gvr,
                    encoding: Encoding::Json,
                },
                spec,
            )
            .await?;
        cached.last_used.store(self.inner.now_ms(), Ordering::Relaxed);
        Ok(())
    }

    /// Stops idle resources and keeps within the memory budget, until dropped.
    pub async fn run_janitor(self) {
        let mut ticker = tokio::time::interval(JANITOR_PERIOD);
        loop {
            ticker.tick().await;
            self.sweep();
        }
    }

    /// One pass of the janitor (also refreshes the per-resource gauges).
    pub fn sweep(&self) {
        let inner = &self.inner;
        let now = inner.now_ms();
        let idle_ms = u64::try_from(inner.config.idle_timeout.as_millis()).unwrap_or(u64::MAX);
        inner.resources.retain(|_, cached| {
            let idle = now.saturating_sub(cached.last_used.load(Ordering::Relaxed)) > idle_ms
                && cached.watchers.load(Ordering::Relaxed) == 0;
            if idle {
                tracing::info!(resource = %cached.spec.qualified_resource(), "idle: no longer cached");
                cached.stop();
            }
            !idle
        });
        let mut sizes: Vec<(Key, usize, u64)> = inner
            .resources
            .iter()
            .map(|e| {
                (
                    e.key().clone(),
                    e.store.size().1,
                    e.last_used.load(Ordering::Relaxed),
                )
            })
            .collect();
        let mut total: usize = sizes.iter().map(|(_, bytes, _)| bytes).sum();
        sizes.sort_by_key(|(_, _, last_used)| *last_used);
        for (key, bytes, _) in sizes {
            if total <= inner.config.memory_budget_bytes {
                break;
            }
            tracing::warn!(resource = %key.gvr.resource, group = %key.gvr.group, encoding = key.encoding.as_str(), bytes, "over the memory budget: dropping");
            if let Some((_, cached)) = inner.resources.remove(&key) {
                cached.stop();
            }
            inner.negative.insert(
                (key.gvr, Some(key.encoding)),
                (Instant::now() + NEGATIVE_TTL, Bypass::OverBudget),
            );
            inner.metrics.evictions.inc();
            total -= bytes;
        }
        inner.negative.retain(|_, (until, _)| Instant::now() < *until);
        for entry in inner.resources.iter() {
            let labels = ResourceLabels {
                resource: resource_label(&entry.spec.group, &entry.spec.version, &entry.spec.resource),
                encoding: entry.encoding.as_str(),
            };
            let (objects, bytes) = entry.store.size();
            inner.metrics.objects.get_or_create(&labels).set(objects as i64);
            inner.metrics.bytes.get_or_create(&labels).set(bytes as i64);
            inner
                .metrics
                .resource_version
                .get_or_create(&labels)
                .set(entry.store.resource_version() as i64);
            inner
                .metrics
                .synced
                .get_or_create(&labels)
                .set(i64::from(entry.store.is_synced()));
        }
    }

    /// A JSON view of what is cached, for the admin listener's `/debug/cache`.
    pub fn debug_view(&self) -> serde_json::Value {
        let now = self.inner.now_ms();
        let mut resources: Vec<serde_json::Value> = self
            .inner
            .resources
            .iter()
            .map(|e| {
                let (objects, bytes) = e.store.size();
                serde_json::json!({
                    "group": e.spec.group,
                    "version": e.spec.version,
                    "resource": e.spec.resource,
                    "kind": e.spec.kind,
                    "namespaced": e.spec.namespaced,
                    "custom": e.spec.custom,
                    "encoding": e.encoding.as_str(),
                    "synced": e.store.is_synced(),
                    "resourceVersion": e.store.resource_version().to_string(),
                    "objects": objects,
                    "bytes": bytes,
                    "watchers": e.watchers.load(Ordering::Relaxed),
                    "idleSeconds": now.saturating_sub(e.last_used.load(Ordering::Relaxed)) / 1000,
                })
            })
            .collect();
        resources.sort_by_key(|r| {
            (
                r["group"].to_string(),
                r["resource"].to_string(),
                r["encoding"].to_string(),
            )
        });
        let negative: Vec<serde_json::Value> = self
            .inner
            .negative
            .iter()
            .map(|e| {
                let (gvr, encoding) = e.key();
                serde_json::json!({"group": gvr.group, "version": gvr.version, "resource": gvr.resource,
                    "encoding": encoding.map(Encoding::as_str), "reason": e.value().1.as_str()})
            })
            .collect();
        serde_json::json!({
            "enabled": self.inner.config.enabled,
            "memoryBudgetBytes": self.inner.config.memory_budget_bytes,
            "resources": resources,
            "forwarded": negative,
        })
    }
}

impl Inner {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

fn resource_label(group: &str, version: &str, resource: &str) -> String {
    if group.is_empty() {
        format!("{version}/{resource}")
    } else {
        format!("{group}/{version}/{resource}")
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use bytes::Bytes;
    use http::{HeaderValue, Request, Response};

    use super::*;
    use crate::discovery::DiscoveryMetrics;
    use crate::upstream::{BoxFuture, FetchError};

    /// An API server holding the captured configmaps, in JSON and protobuf;
    /// watches stay open and quiet. Records each request's URI and `Accept`.
    #[derive(Default)]
    struct Fake {
        seen: Mutex<Vec<(String, String)>>,
    }

    fn fixture(name: &str) -> Bytes {
        let path = format!("{}/testdata/protobuf/{name}", env!("CARGO_MANIFEST_DIR"));
        Bytes::from(std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}")))
    }

    impl ApiClient for Fake {
        fn fetch(&self, request: Request<()>) -> BoxFuture<'_, Result<Response<Bytes>, FetchError>> {
            let accept = request
                .headers()
                .get(http::header::ACCEPT)
                .and_then(|a| a.to_str().ok())
                .unwrap_or("")
                .to_string();
            let uri = request.uri().to_string();
            self.seen
                .lock()
                .expect("lock")
                .push((uri.clone(), accept.clone()));
            let body = match uri.as_str() {
                "/api/v1" => Bytes::from_static(
                    br#"{"kind":"APIResourceList","groupVersion":"v1","resources":[{"name":"configmaps","namespaced":true,"kind":"ConfigMap","verbs":["get","list","watch"]}]}"#,
                ),
                "/api/v1/configmaps?resourceVersion=0" if accept == crate::protobuf::CONTENT_TYPE => {
                    fixture("configmaps.pb")
                }
                "/api/v1/configmaps?resourceVersion=0" => fixture("configmaps.json"),
                _ => return Box::pin(async { Err(FetchError("unexpected".into())) }),
            };
            Box::pin(async move { Ok(Response::new(body)) })
        }

        fn stream(&self, request: Request<()>) -> BoxFuture<'_, Result<Response<ByteStream>, FetchError>> {
            self.seen
                .lock()
                .expect("lock")
                .push((request.uri().to_string(), String::new()));
            Box::pin(async { Ok(Response::new(Box::pin(futures::stream::pending()) as ByteStream)) })
        }
    }

    fn request(uri: &str, accept: &str) -> (RequestInfo, Option<String>, HeaderMap) {
        let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
        let info = RequestInfo::parse("GET", path, Some(query)).expect("parses");
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::ACCEPT,
            HeaderValue::from_str(accept).expect("header"),
        );
        (info, Some(query.to_string()), headers)
    }

    #[tokio::test]
    async fn protobuf_reads_are_answered_from_a_protobuf_store_of_their_own() {
        let fake = Arc::new(Fake::default());
        let client: Arc<dyn ApiClient> = fake.clone();
        let discovery = Discovery::new(client.clone(), Default::default(), DiscoveryMetrics::default());
        let cache = Cache::new(client, discovery, CacheConfig::default(), CacheMetrics::default());
        let uri = "/api/v1/namespaces/kache-pb/configmaps?resourceVersion=0";
        let core = "application/vnd.kubernetes.protobuf,application/json";
        for accept in [core, core, "application/json"] {
            let (info, query, headers) = request(uri, accept);
            let Ok(Answer::Full(response)) = cache.serve(&info, query.as_deref(), &headers).await else {
                panic!("{accept}: not answered from the cache");
            };
            let body = response.body();
            if accept == core {
                assert_eq!(
                    response.headers()[http::header::CONTENT_TYPE],
                    crate::protobuf::CONTENT_TYPE
                );
                let list = crate::protobuf::unwrap(body).expect("protobuf");
                assert_eq!(list.kind, b"ConfigMapList");
                let (rv, items) = crate::protobuf::list_items(list.raw).expect("list");
                assert_eq!((rv.as_str(), items.len()), ("766", 2));
            } else {
                let list: serde_json::Value = serde_json::from_slice(body).expect("json");
                assert_eq!(list["items"].as_array().map(Vec::len), Some(2));
            }
        }
        // A watch in protobuf from the same store.
        let (info, query, headers) = request(
            "/api/v1/namespaces/kache-pb/configmaps?watch=true&resourceVersion=0",
            "application/vnd.kubernetes.protobuf",
        );
        let Ok(Answer::Stream(watch)) = cache.serve(&info, query.as_deref(), &headers).await else {
            panic!("watch not served from the cache");
        };
        assert_eq!(
            watch.headers()[http::header::CONTENT_TYPE],
            crate::protobuf::WATCH_CONTENT_TYPE
        );

        let lists: Vec<_> = fake
            .seen
            .lock()
            .expect("lock")
            .iter()
            .filter(|(uri, _)| uri == "/api/v1/configmaps?resourceVersion=0")
            .map(|(_, accept)| accept.clone())
            .collect();
        assert_eq!(
            lists,
            [crate::protobuf::CONTENT_TYPE, "application/json"],
            "one LIST per encoding"
        );
        let view = cache.debug_view();
        let encodings: Vec<_> = view["resources"]
            .as_array()
            .expect("resources")
            .iter()
            .map(|r| r["encoding"].as_str().unwrap_or("").to_string())
            .collect();
        assert_eq!(encodings, ["json", "protobuf"]);
    }

    /// Answers discovery; its LISTs never answer, so stores never sync.
    struct NeverLists;

    impl ApiClient for NeverLists {
        fn fetch(&self, request: Request<()>) -> BoxFuture<'_, Result<Response<Bytes>, FetchError>> {
            if request.uri() == "/api/v1" {
                let body = Bytes::from_static(
                    br#"{"kind":"APIResourceList","groupVersion":"v1","resources":[{"name":"configmaps","namespaced":true,"kind":"ConfigMap","verbs":["get","list","watch"]}]}"#,
                );
                return Box::pin(async move { Ok(Response::new(body)) });
            }
            Box::pin(futures::future::pending())
        }

        fn stream(&self, _: Request<()>) -> BoxFuture<'_, Result<Response<ByteStream>, FetchError>> {
            Box::pin(futures::future::pending())
        }
    }

    #[tokio::test]
    async fn a_read_waiting_for_a_sync_holds_no_lock_on_the_registry() {
        let client: Arc<dyn ApiClient> = Arc::new(NeverLists);
        let discovery = Discovery::new(client.clone(), Default::default(), DiscoveryMetrics::default());
        let config = CacheConfig {
            sync_timeout: Duration::from_secs(60),
            ..CacheConfig::default()
        };
        let cache = Cache::new(client, discovery, config, CacheMetrics::default());
        let (info, query, headers) = request(
            "/api/v1/namespaces/a/configmaps?resourceVersion=0",
            "application/json",
        );
        // The first read starts the store and waits for its sync…
        let mut first = std::pin::pin!(cache.serve(&info, query.as_deref(), &headers));
        for _ in 0..100 {
            assert!(futures::poll!(&mut first).is_pending());
            if !cache.inner.resources.is_empty() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(cache.inner.resources.len(), 1, "the store was started");
        // …and so does a second one, which finds the store in the registry.
        let mut second = std::pin::pin!(cache.serve(&info, query.as_deref(), &headers));
        assert!(futures::poll!(&mut second).is_pending());
        // Meanwhile the registry can be written (the janitor takes every
        // shard's write lock): a guard held across the wait would block it.
        let (done, finished) = std::sync::mpsc::channel();
        let janitor = cache.clone();
        std::thread::spawn(move || {
            janitor.sweep();
            let _ = done.send(());
        });
        assert!(
            finished.recv_timeout(Duration::from_secs(10)).is_ok(),
            "the janitor was blocked by a read waiting for a sync"
        );
    }

    #[tokio::test]
    async fn watches_of_an_evicted_store_end_at_once() {
        use futures::StreamExt;
        let fake = Arc::new(Fake::default());
        let client: Arc<dyn ApiClient> = fake.clone();
        let discovery = Discovery::new(client.clone(), Default::default(), DiscoveryMetrics::default());
        let config = CacheConfig {
            memory_budget_bytes: 1,
            ..CacheConfig::default()
        };
        let cache = Cache::new(client, discovery, config, CacheMetrics::default());
        let (info, query, headers) = request(
            "/api/v1/namespaces/kache-pb/configmaps?watch=true&resourceVersion=0",
            "application/json",
        );
        let Ok(Answer::Stream(mut watch)) = cache.serve(&info, query.as_deref(), &headers).await else {
            panic!("watch not served from the cache");
        };
        let mut events = 0;
        while events < 2 {
            let chunk = tokio::time::timeout(Duration::from_secs(5), watch.body_mut().next())
                .await
                .expect("the initial events")
                .expect("open")
                .expect("no error");
            events += chunk.split(|b| *b == b'\n').filter(|l| !l.is_empty()).count();
        }
        assert_eq!(cache.debug_view()["resources"][0]["watchers"], 1);
        cache.sweep();
        assert_eq!(cache.debug_view()["resources"], serde_json::json!([]), "evicted");
        let end = tokio::time::timeout(Duration::from_secs(5), watch.body_mut().next())
            .await
            .expect("the watch ends at once, not at its timeout");
        assert!(end.is_none(), "a clean end: {end:?}");
        // The client's next watch is forwarded for now.
        assert!(matches!(
            cache.serve(&info, query.as_deref(), &headers).await,
            Err(Bypass::OverBudget)
        ));
    }
}
