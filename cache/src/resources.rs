//! The registry of cached resources: one store and reflector per resource,
//! started by the first cacheable read, stopped when idle, dropped
//! least-recently-used first when over the memory budget.
//!
//! ```text
//!   read ─► reads::plan ─► resource in the catalogue, listable and watchable?
//!                               │ yes
//!                               ▼
//!           store (start its reflector on first use, wait ≤ sync timeout)
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
use crate::reads::{self, Bypass, MinVersion, ReadKind, WatchSettings};
use crate::reflector::{self, ReflectorConfig, ResourceSpec};
use crate::request::RequestInfo;
use crate::store::Store;
use crate::upstream::{ApiClient, ByteStream};

/// Groups served by the API server itself (protobuf-capable, list items
/// without type meta, per-resource field selectors). Any other group is
/// checked against the CustomResourceDefinitions.
const BUILT_IN_GROUPS: &[&str] = &[
    "",
    "admissionregistration.k8s.io",
    "apiextensions.k8s.io",
    "apiregistration.k8s.io",
    "apps",
    "authentication.k8s.io",
    "authorization.k8s.io",
    "autoscaling",
    "batch",
    "certificates.k8s.io",
    "coordination.k8s.io",
    "discovery.k8s.io",
    "events.k8s.io",
    "extensions",
    "flowcontrol.apiserver.k8s.io",
    "internal.apiserver.k8s.io",
    "networking.k8s.io",
    "node.k8s.io",
    "policy",
    "rbac.authorization.k8s.io",
    "resource.k8s.io",
    "scheduling.k8s.io",
    "storage.k8s.io",
    "storagemigration.k8s.io",
];

/// How long a resource found not cacheable (or evicted) is forwarded before
/// kache looks again.
const NEGATIVE_TTL: Duration = Duration::from_secs(60);
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

struct Cached {
    spec: Arc<ResourceSpec>,
    store: Arc<Store>,
    reflector: AbortHandle,
    /// Milliseconds since the registry started, of the last read.
    last_used: AtomicU64,
    watchers: Arc<AtomicUsize>,
}

impl Drop for Cached {
    fn drop(&mut self) {
        self.reflector.abort();
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResourceLabels {
    resource: String,
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
            "Reads answered from the object cache, by resource",
            m.hits.clone(),
        );
        registry.register(
            "cache_forwarded",
            "Resource reads forwarded instead of answered from the cache, by reason",
            m.forwarded.clone(),
        );
        registry.register("cache_objects", "Objects held, by resource", m.objects.clone());
        registry.register(
            "cache_bytes",
            "Bytes of objects held, by resource",
            m.bytes.clone(),
        );
        registry.register(
            "cache_resource_version",
            "The store's resourceVersion, by resource",
            m.resource_version.clone(),
        );
        registry.register(
            "cache_synced",
            "1 while the resource's store is in sync",
            m.synced.clone(),
        );
        registry.register(
            "cache_watchers",
            "Watches served from the cache, by resource",
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
    resources: DashMap<Gvr, Arc<Cached>>,
    /// Resources not to try again before the instant.
    negative: DashMap<Gvr, (Instant, Bypass)>,
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
        let result = self.try_serve(info, query, headers).await;
        match &result {
            Ok(_) => {
                let labels = ResourceLabels {
                    resource: resource_label(&info.group, &info.version, &info.resource),
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
        result
    }

    async fn try_serve(
        &self,
        info: &RequestInfo,
        query: Option<&str>,
        headers: &HeaderMap,
    ) -> Result<Answer, Bypass> {
        if !self.inner.config.enabled {
            return Err(Bypass::Disabled);
        }
        let plan = reads::plan(info, query, headers)?;
        let cached = self.resource(info).await?;
        if !reads::fields_supported(&plan.field, &cached.spec) {
            return Err(Bypass::UnsupportedField);
        }
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
        match &plan.kind {
            ReadKind::List => Ok(Answer::Full(reads::list(&plan, &cached.spec, store))),
            ReadKind::Get { name } => Ok(Answer::Full(reads::get(name, &plan, &cached.spec, store))),
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
                    &self.inner.watch,
                    on_end,
                )
                .map(Answer::Stream)
                .map_err(|_| Bypass::TooOld)
            }
        }
    }

    /// The cached resource for a request: started on first use.
    async fn resource(&self, info: &RequestInfo) -> Result<Arc<Cached>, Bypass> {
        let gvr = Gvr {
            group: info.group.clone(),
            version: info.version.clone(),
            resource: info.resource.clone(),
        };
        if let Some(cached) = self.inner.resources.get(&gvr) {
            let cached = cached.clone();
            return self.until_synced(cached).await;
        }
        if let Some(entry) = self.inner.negative.get(&gvr) {
            let (until, reason) = *entry;
            if Instant::now() < until {
                return Err(reason);
            }
        }
        let spec = match self.spec_for(&gvr).await {
            Ok(spec) => spec,
            Err(reason) => {
                self.inner
                    .negative
                    .insert(gvr, (Instant::now() + NEGATIVE_TTL, reason));
                return Err(reason);
            }
        };
        let cached = self
            .inner
            .resources
            .entry(gvr)
            .or_insert_with(|| {
                let store = Arc::new(Store::new(
                    self.inner.config.event_window,
                    self.inner.config.watcher_backlog,
                ));
                let spec = Arc::new(spec);
                tracing::info!(resource = %spec.qualified_resource(), version = %spec.version, "caching");
                let task = tokio::spawn(reflector::run(
                    self.inner.client.clone(),
                    spec.clone(),
                    store.clone(),
                    self.inner.reflector.clone(),
                ));
                Arc::new(Cached {
                    spec,
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
        let custom = !BUILT_IN_GROUPS.contains(&gvr.group.as_str()) && self.is_custom(gvr).await?;
        Ok(ResourceSpec {
            group: gvr.group.clone(),
            version: gvr.version.clone(),
            resource: gvr.resource.clone(),
            kind: resource.kind,
            namespaced: resource.namespaced,
            custom,
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
            }
            !idle
        });
        let mut sizes: Vec<(Gvr, usize, u64)> = inner
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
        for (gvr, bytes, _) in sizes {
            if total <= inner.config.memory_budget_bytes {
                break;
            }
            tracing::warn!(resource = %gvr.resource, group = %gvr.group, bytes, "over the memory budget: dropping");
            inner.resources.remove(&gvr);
            inner
                .negative
                .insert(gvr, (Instant::now() + NEGATIVE_TTL, Bypass::OverBudget));
            inner.metrics.evictions.inc();
            total -= bytes;
        }
        inner.negative.retain(|_, (until, _)| Instant::now() < *until);
        for entry in inner.resources.iter() {
            let labels = ResourceLabels {
                resource: resource_label(&entry.spec.group, &entry.spec.version, &entry.spec.resource),
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
                    "synced": e.store.is_synced(),
                    "resourceVersion": e.store.resource_version().to_string(),
                    "objects": objects,
                    "bytes": bytes,
                    "watchers": e.watchers.load(Ordering::Relaxed),
                    "idleSeconds": now.saturating_sub(e.last_used.load(Ordering::Relaxed)) / 1000,
                })
            })
            .collect();
        resources.sort_by_key(|r| (r["group"].to_string(), r["resource"].to_string()));
        let negative: Vec<serde_json::Value> = self
            .inner
            .negative
            .iter()
            .map(|e| serde_json::json!({"group": e.key().group, "version": e.key().version, "resource": e.key().resource, "reason": e.value().1.as_str()}))
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
