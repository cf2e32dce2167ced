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
//!
//! # Surviving restarts
//!
//! With [`Cache::enable_snapshots`] (the proxy passes its upstream URL and
//! the cluster's [`cluster_identity`]), [`Cache::run_snapshots`] saves every
//! synced store every `snapshot_interval` (and [`Cache::save_snapshots`] at
//! shutdown) with [`crate::snapshot`], and [`Cache::run_preload`] first
//! restores them ([`Cache::warm_start`]): each store is refilled from its
//! snapshot and WATCHes from the snapshot's version, with no LIST, answering
//! only once that watch is established (a `410` relists). A store dropped
//! (idle, over the budget) takes its snapshot along, so the next start
//! restores only what was in use.
//!
//! # Stale reads and consistency checks
//!
//! [`Cache::serve_stale`] answers any LIST or GET from a store that synced
//! once and is at most a given time behind the API server (the proxy's
//! opt-in answer when the API server is unreachable).
//! [`Cache::run_consistency_checks`] compares each store with the API
//! server's own list at the store's resourceVersion (KEP-4988) and relists
//! a store that differs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
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

use crate::chunk::{Chunk, ChunkStream};
use crate::discovery::Discovery;
use crate::reads::{self, Bypass, MinVersion, ReadKind, ReadPlan, WatchSettings};
use crate::reflector::{self, ReflectorConfig, ResourceSpec};
use crate::request::RequestInfo;
use crate::snapshot::{self, Expectation, SnapshotHeader};
use crate::store::{Encoding, Object, Store, WatchError};
use crate::upstream::{ApiClient, FetchError};

/// How long a resource found not cacheable (or evicted) is forwarded before
/// kache looks again.
const NEGATIVE_TTL: Duration = Duration::from_secs(60);
/// How often preloaded resources are checked (and restarted if dropped);
/// well under the idle timeout, so they never go idle.
const PRELOAD_PERIOD: Duration = Duration::from_secs(30);
/// How often idle resources and the memory budget are checked.
const JANITOR_PERIOD: Duration = Duration::from_secs(10);
/// How long an unfiltered list's memory file is kept with no answer taking
/// it (see [`crate::filed`]); the janitor checks it each period.
const LIST_FILE_IDLE: Duration = Duration::from_secs(30);
/// At most one warning per this period about snapshots that cannot be
/// saved (a full or read-only disk would otherwise warn every interval, for
/// every resource).
const SAVE_WARNING_PERIOD: Duration = Duration::from_secs(300);
/// How long a read that would start a store waits for the warm start (the
/// cluster's identity, then reading the snapshots): past it, the store starts
/// cold rather than keep the client waiting.
const WARM_START_WAIT: Duration = Duration::from_secs(10);
/// How long a consistency check of a quiet resource (its version compacted)
/// gives the store to receive changes up to the API server's current state.
const CHECK_SETTLE: Duration = if cfg!(test) {
    Duration::from_millis(50)
} else {
    Duration::from_secs(3)
};
/// Differences a failed consistency check logs, of each kind.
const MISMATCHES_LOGGED: usize = 10;

/// A cached answer.
pub enum Answer {
    Full(Response<Bytes>),
    Stream(Response<ChunkStream>),
}

impl Answer {
    /// The whole answer in one buffer (for tests and tools; the proxy
    /// streams it).
    ///
    /// # Errors
    /// The stream failed.
    pub async fn collect(self) -> Result<Response<Bytes>, FetchError> {
        match self {
            Answer::Full(response) => Ok(response),
            Answer::Stream(response) => {
                use futures::TryStreamExt;
                let (parts, stream) = response.into_parts();
                let chunks: Vec<Chunk> = stream.try_collect().await?;
                let mut whole = Chunk::default();
                chunks.into_iter().for_each(|chunk| whole.append(chunk));
                Ok(Response::from_parts(parts, whole.into_bytes()))
            }
        }
    }
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
    /// The resourceVersion of the store's snapshot on disk (0: none), so an
    /// unchanged store is not written again.
    saved_version: AtomicU64,
    /// Reads of the resource forwarded while this store existed (not
    /// rv=0, not synced, not fresh enough…), for its hit ratio.
    forwarded: AtomicU64,
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

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CheckLabels {
    resource: String,
    result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct MismatchLabels {
    resource: String,
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
    consistency_checks: Family<CheckLabels, Counter>,
    consistency_mismatches: Family<MismatchLabels, Counter>,
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
        registry.register(
            "cache_consistency_checks",
            "Stores compared with the API server's list at their resourceVersion, by resource and result \
             (consistent, mismatch, compacted, moved, error)",
            m.consistency_checks.clone(),
        );
        registry.register(
            "cache_consistency_mismatches",
            "Consistency checks that found the store differing from the API server (it relists), by resource",
            m.consistency_mismatches.clone(),
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
    /// Set by [`Cache::enable_snapshots`]: snapshots are saved and loaded
    /// only for this upstream and cluster.
    identity: OnceLock<Identity>,
    /// Milliseconds since `started` of the last warning about a failed save.
    save_warned: AtomicU64,
    /// True once the previous run's snapshots were restored (or there is
    /// nothing to restore): until then a read does not start a store cold,
    /// which would LIST what a snapshot is about to give.
    warm_started: tokio::sync::watch::Sender<bool>,
}

/// Whose state the snapshots hold.
#[derive(Debug, Clone)]
struct Identity {
    dir: PathBuf,
    upstream_url: String,
    cluster_uid: String,
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
            ..WatchSettings::default()
        };
        let config_snapshot_dir_is_none = config.snapshot_dir.is_none();
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
                identity: OnceLock::new(),
                save_warned: AtomicU64::new(u64::MAX),
                warm_started: tokio::sync::watch::Sender::new(config_snapshot_dir_is_none),
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
                self.count_forwarded(info);
            }
            Err(_) => {}
        }
        result.map(|(answer, _)| answer)
    }

    /// Counts a forwarded read against the resource's store (its JSON one
    /// first), if it has one: resources never cached are not counted.
    fn count_forwarded(&self, info: &RequestInfo) {
        if self.inner.resources.is_empty() {
            return;
        }
        let gvr = Gvr {
            group: info.group.clone(),
            version: info.version.clone(),
            resource: info.resource.clone(),
        };
        for encoding in [Encoding::Json, Encoding::Protobuf] {
            let key = Key {
                gvr: gvr.clone(),
                encoding,
            };
            if let Some(cached) = self.inner.resources.get(&key) {
                cached.forwarded.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    }

    async fn try_serve(&self, info: &RequestInfo, mut plan: ReadPlan) -> Result<(Answer, Encoding), Bypass> {
        let gvr = Gvr {
            group: info.group.clone(),
            version: info.version.clone(),
            resource: info.resource.clone(),
        };
        let spec = self.spec(&gvr).await?;
        Cache::scope(info, &spec, &mut plan)?;
        let encoding = plan.encoding(&spec)?;
        if let Some(invalid) = &plan.invalid {
            return Ok((Answer::Full(reads::invalid(invalid, encoding)), encoding));
        }
        if !reads::fields_supported(&plan.field, &spec) {
            return Err(Bypass::UnsupportedField);
        }
        let cached = self.resource(Key { gvr, encoding }, spec).await?;
        let answer = self.answer(plan, &cached).await?;
        Ok((answer, encoding))
    }

    /// Scopes a plan to the resource: `/api/v1/namespaces/{name}` names the
    /// namespace itself; any other cluster-scoped resource under a namespace
    /// is not a path the API server serves: let it answer.
    fn scope(info: &RequestInfo, spec: &ResourceSpec, plan: &mut ReadPlan) -> Result<(), Bypass> {
        if !spec.namespaced && !plan.namespace.is_empty() {
            if info.resource != "namespaces" {
                return Err(Bypass::Parameters);
            }
            plan.namespace.clear();
        }
        Ok(())
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
            ReadKind::List => Ok(Answer::Stream(reads::list(&plan, &cached.spec, store, encoding))),
            ReadKind::Get { name } => Ok(Answer::Full(reads::get(
                name,
                &plan,
                &cached.spec,
                store,
                encoding,
            ))),
            ReadKind::Watch { .. } => {
                // A version newer than the store's (from a consistent list)
                // starts at once, as on the API server's watch cache: the
                // watch sends only what comes after it (`reads::watch`). A
                // streaming list first waits for a store fresh enough.
                let (client, fresh) = (self.inner.client.as_ref(), self.inner.config.fresh_timeout);
                let prepared = reads::prepare_watch(plan, &cached.spec, store, encoding, client, fresh);
                let plan = match prepared.await {
                    Ok(plan) => plan,
                    Err(refused) => return Ok(Answer::Stream(refused)),
                };
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
        if !self.warm_started() {
            let mut done = self.inner.warm_started.subscribe();
            let _ = tokio::time::timeout(WARM_START_WAIT, done.wait_for(|done| *done)).await;
            // The warm start may have restored this very store meanwhile.
            let restored = self.inner.resources.get(&key).map(|cached| Arc::clone(&cached));
            if let Some(cached) = restored {
                return self.until_synced(cached).await;
            }
        }
        let cached = self
            .inner
            .resources
            .entry(key.clone())
            .or_insert_with(|| self.start(&key, spec, None))
            .clone();
        self.until_synced(cached).await
    }

    /// A new store and its reflector: cold (LIST, then WATCH), or restored
    /// from a snapshot's objects at its version (WATCH from it).
    fn start(&self, key: &Key, spec: Arc<ResourceSpec>, restored: Option<(Vec<Object>, u64)>) -> Arc<Cached> {
        let encoding = key.encoding;
        let store = Arc::new(Store::new(
            self.inner.config.event_window,
            self.inner.config.watcher_backlog,
        ));
        let saved_version = restored.as_ref().map_or(0, |(_, rv)| *rv);
        let task = match restored {
            None => {
                tracing::info!(resource = %spec.qualified_resource(), version = %spec.version, encoding = encoding.as_str(), "caching");
                tokio::spawn(reflector::run(
                    self.inner.client.clone(),
                    spec.clone(),
                    store.clone(),
                    self.inner.reflector.clone(),
                    encoding,
                ))
            }
            Some((objects, resource_version)) => {
                tracing::info!(resource = %spec.qualified_resource(), version = %spec.version, encoding = encoding.as_str(), objects = objects.len(), resource_version, "caching from a snapshot");
                store.restore(objects, resource_version);
                tokio::spawn(reflector::resume(
                    self.inner.client.clone(),
                    spec.clone(),
                    store.clone(),
                    self.inner.reflector.clone(),
                    encoding,
                ))
            }
        };
        Arc::new(Cached {
            spec,
            encoding,
            store,
            reflector: task.abort_handle(),
            last_used: AtomicU64::new(self.inner.now_ms()),
            watchers: Arc::new(AtomicUsize::new(0)),
            saved_version: AtomicU64::new(saved_version),
            forwarded: AtomicU64::new(0),
        })
    }

    async fn until_synced(&self, cached: Arc<Cached>) -> Result<Arc<Cached>, Bypass> {
        if cached.store.is_synced() || cached.store.wait_for(1, self.inner.config.sync_timeout).await {
            return Ok(cached);
        }
        if cached.store.is_refused() {
            // Forwarded until the negative entry expires; then kache tries
            // again (its permissions may have been widened).
            let key = Key {
                gvr: Gvr {
                    group: cached.spec.group.clone(),
                    version: cached.spec.version.clone(),
                    resource: cached.spec.resource.clone(),
                },
                encoding: cached.encoding,
            };
            self.inner
                .resources
                .remove_if(&key, |_, current| Arc::ptr_eq(current, &cached));
            self.inner.negative.insert(
                (key.gvr, Some(key.encoding)),
                (Instant::now() + NEGATIVE_TTL, Bypass::Refused),
            );
            return Err(Bypass::Refused);
        }
        Err(Bypass::NotSynced)
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
    ///
    /// With snapshots enabled ([`Cache::enable_snapshots`], called before
    /// this starts), it first restores the stores saved by the previous run
    /// ([`Cache::warm_start`]), so preloaded resources resume from theirs.
    pub async fn run_preload(self) {
        self.warm_start().await;
        if !self.inner.config.enabled || self.inner.config.preload.is_empty() {
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
        let mut dropped = Vec::new();
        inner.resources.retain(|key, cached| {
            let idle = now.saturating_sub(cached.last_used.load(Ordering::Relaxed)) > idle_ms
                && cached.watchers.load(Ordering::Relaxed) == 0;
            if idle {
                tracing::info!(resource = %cached.spec.qualified_resource(), "idle: no longer cached");
                cached.stop();
                dropped.push(key.clone());
            }
            !idle
        });
        for cached in inner.resources.iter() {
            cached.store.release_idle_lists(LIST_FILE_IDLE);
        }
        let measure = || -> Vec<(Key, usize, u64)> {
            inner
                .resources
                .iter()
                .map(|e| {
                    (
                        e.key().clone(),
                        e.store.size().1,
                        e.last_used.load(Ordering::Relaxed),
                    )
                })
                .collect()
        };
        let mut sizes = measure();
        let mut total: usize = sizes.iter().map(|(_, bytes, _)| bytes).sum();
        if total > inner.config.memory_budget_bytes {
            // Lists' files go first: the next list files them again.
            for cached in inner.resources.iter() {
                cached.store.release_idle_lists(Duration::ZERO);
            }
            sizes = measure();
            total = sizes.iter().map(|(_, bytes, _)| bytes).sum();
        }
        sizes.sort_by_key(|(_, _, last_used)| *last_used);
        for (key, bytes, _) in sizes {
            if total <= inner.config.memory_budget_bytes {
                break;
            }
            tracing::warn!(resource = %key.gvr.resource, group = %key.gvr.group, encoding = key.encoding.as_str(), bytes, "over the memory budget: dropping");
            if let Some((_, cached)) = inner.resources.remove(&key) {
                cached.stop();
                dropped.push(key.clone());
            }
            inner.negative.insert(
                (key.gvr, Some(key.encoding)),
                (Instant::now() + NEGATIVE_TTL, Bypass::OverBudget),
            );
            inner.metrics.evictions.inc();
            total -= bytes;
        }
        for key in &dropped {
            self.forget_snapshot(key);
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

    /// A JSON view of what is cached, for the admin listener's `/debug/cache`
    /// and status page. Fields are only ever added: `hits` (reads answered
    /// from the store), `forwardedReads` (reads of the resource forwarded
    /// while the store existed), `hitRatio` (`null` before any read),
    /// `stalenessSeconds` (0 while synced, the time since it last was
    /// otherwise, `null` before its first sync).
    pub fn debug_view(&self) -> serde_json::Value {
        let now = self.inner.now_ms();
        let mut resources: Vec<serde_json::Value> = self
            .inner
            .resources
            .iter()
            .map(|e| {
                let (objects, bytes) = e.store.size();
                let hits = self
                    .inner
                    .metrics
                    .hits
                    .get_or_create(&ResourceLabels {
                        resource: resource_label(&e.spec.group, &e.spec.version, &e.spec.resource),
                        encoding: e.encoding.as_str(),
                    })
                    .get();
                let forwarded = e.forwarded.load(Ordering::Relaxed);
                let reads = hits + forwarded;
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
                    "hits": hits,
                    "forwardedReads": forwarded,
                    "hitRatio": (reads > 0).then(|| hits as f64 / reads as f64),
                    "stalenessSeconds": e.store.staleness().map(|s| s.as_secs()),
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

/// The identity of the cluster behind `client`: the UID of its `kube-system`
/// namespace (a namespace that always exists and is never recreated), which
/// stamps snapshots so a state directory moved to another cluster is never
/// served.
///
/// # Errors
/// The API server could not be asked, did not answer `200`, or answered
/// without a `metadata.uid`.
pub async fn cluster_identity(client: &dyn ApiClient) -> Result<String, FetchError> {
    const PATH: &str = "/api/v1/namespaces/kube-system";
    let request = Request::get(PATH)
        .header(http::header::ACCEPT, "application/json")
        .body(())
        .map_err(|e| FetchError(e.to_string()))?;
    let response = client.fetch(request).await?;
    if response.status() != StatusCode::OK {
        return Err(FetchError(format!("GET {PATH} answered {}", response.status())));
    }
    let namespace: serde_json::Value =
        serde_json::from_slice(response.body()).map_err(|e| FetchError(format!("GET {PATH}: {e}")))?;
    match namespace["metadata"]["uid"].as_str() {
        Some(uid) if !uid.is_empty() => Ok(uid.to_string()),
        _ => Err(FetchError(format!("GET {PATH}: no metadata.uid"))),
    }
}

/// Which store a snapshot file holds, from its name (the inverse of
/// [`snapshot::path`]; `None` for a name it would not produce, such as the
/// shortened name of a very long resource).
fn snapshot_key(dir: &Path, path: &Path) -> Option<Key> {
    let name = path.file_name()?.to_str()?.strip_suffix(".ksnap")?;
    let parts: Vec<String> = name
        .split('_')
        .map(|part| {
            percent_encoding::percent_decode_str(part)
                .decode_utf8()
                .ok()
                .map(|p| p.into_owned())
        })
        .collect::<Option<_>>()?;
    let [group, version, resource, encoding] = <[String; 4]>::try_from(parts).ok()?;
    let encoding = match encoding.as_str() {
        "json" => Encoding::Json,
        "protobuf" => Encoding::Protobuf,
        _ => return None,
    };
    let key = Key {
        gvr: Gvr {
            group,
            version,
            resource,
        },
        encoding,
    };
    let expected = snapshot::path(
        dir,
        &Expectation {
            upstream_url: String::new(),
            cluster_uid: String::new(),
            group: key.gvr.group.clone(),
            version: key.gvr.version.clone(),
            resource: key.gvr.resource.clone(),
            encoding: encoding.as_str().to_string(),
        },
    );
    (expected == path).then_some(key)
}

/// `period` give or take `fraction` of it, so that many timers started
/// together do not fire in step.
fn jittered(period: Duration, fraction: f64) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let unit = f64::from(nanos % 10_000) / 10_000.0; // [0, 1)
    period.mul_f64(1.0 - fraction + 2.0 * fraction * unit)
}

/// Where a store's content differs from the API server's list at the same
/// version, by (namespace, name) → resourceVersion.
#[derive(Debug, Default, PartialEq, Eq)]
struct Divergence {
    /// Listed upstream, not in the store.
    missing: Vec<(String, String)>,
    /// In the store, not listed upstream.
    extra: Vec<(String, String)>,
    /// In both, at other versions: (key, store's, upstream's).
    changed: Vec<((String, String), u64, u64)>,
}

impl Divergence {
    fn between(
        store: &BTreeMap<(String, String), u64>,
        upstream: &BTreeMap<(String, String), u64>,
    ) -> Divergence {
        let mut d = Divergence::default();
        for (key, rv) in upstream {
            match store.get(key) {
                None => d.missing.push(key.clone()),
                Some(ours) if ours != rv => d.changed.push((key.clone(), *ours, *rv)),
                Some(_) => {}
            }
        }
        d.extra = store
            .keys()
            .filter(|k| !upstream.contains_key(*k))
            .cloned()
            .collect();
        d
    }

    fn is_empty(&self) -> bool {
        self.missing.is_empty() && self.extra.is_empty() && self.changed.is_empty()
    }
}

/// A bounded description of keys, for a log line.
fn some_keys<'a>(keys: impl Iterator<Item = &'a (String, String)>) -> String {
    keys.take(MISMATCHES_LOGGED)
        .map(|(ns, name)| {
            if ns.is_empty() {
                name.clone()
            } else {
                format!("{ns}/{name}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// What one consistency check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CheckResult {
    Consistent,
    /// Logged, counted, and the store relists.
    Mismatch,
    /// The store's version is no longer in etcd and the store moved while
    /// it was compared with the current state: skipped this round.
    Compacted,
    /// The store is not synced: skipped this round.
    NotSynced,
    Error,
}

impl CheckResult {
    fn as_str(self) -> &'static str {
        match self {
            CheckResult::Consistent => "consistent",
            CheckResult::Mismatch => "mismatch",
            CheckResult::Compacted => "compacted",
            CheckResult::NotSynced => "not_synced",
            CheckResult::Error => "error",
        }
    }
}

/// The `Accept` of a consistency check's LIST: only each object's
/// metadata, in protobuf where the resource speaks it (built-in types), else
/// in JSON (custom resources).
const METADATA_LIST: &str =
    "application/vnd.kubernetes.protobuf;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,\
                             application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1";

impl Cache {
    /// Turns snapshots on for the cluster `cluster_uid` (see
    /// [`cluster_identity`]) behind `upstream_url`, if the configuration
    /// names a snapshot directory. Call it once, before spawning
    /// [`Cache::run_preload`] (which restores the saved stores first) and
    /// [`Cache::run_snapshots`] (which saves them); later calls are ignored.
    /// Without it (the identity could not be fetched), snapshots stay off.
    pub fn enable_snapshots(&self, upstream_url: String, cluster_uid: String) {
        let Some(dir) = self.inner.config.snapshot_dir.clone() else {
            return;
        };
        if !self.inner.config.enabled {
            return;
        }
        // One directory per cluster: kaches of several clusters sharing a
        // state directory (one per kubeconfig context) never see, and so never
        // remove, each other's snapshots. The stamp inside each file is still
        // checked.
        let subdir: String = cluster_uid
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let _ = self.inner.identity.set(Identity {
            dir: dir.join(subdir),
            upstream_url,
            cluster_uid,
        });
    }

    fn expectation(identity: &Identity, key: &Key) -> Expectation {
        Expectation {
            upstream_url: identity.upstream_url.clone(),
            cluster_uid: identity.cluster_uid.clone(),
            group: key.gvr.group.clone(),
            version: key.gvr.version.clone(),
            resource: key.gvr.resource.clone(),
            encoding: key.encoding.as_str().to_string(),
        }
    }

    /// Restores the stores saved by an earlier run: each snapshot in the
    /// directory that reads back whole, for this cluster and upstream, of a
    /// resource discovery still lists as cacheable, becomes a store holding
    /// its objects at its resourceVersion, whose reflector WATCHes from that
    /// version (no LIST; a `410` relists). Until that watch is established
    /// the store answers nothing: reads wait for it, as for a first sync.
    /// Any other snapshot is removed with a warning; leftovers of
    /// interrupted writes are removed. Reads that would start a store wait
    /// for this (at most [`WARM_START_WAIT`]), so a restored resource is not
    /// also listed. Restores nothing unless [`Cache::enable_snapshots`] was
    /// called.
    pub async fn warm_start(&self) {
        self.restore_snapshots().await;
        self.inner.warm_started.send_replace(true);
    }

    /// Whether the warm start is over (or there was none to make): kache is
    /// not ready before, since reads would wait for it.
    pub fn warm_started(&self) -> bool {
        *self.inner.warm_started.borrow()
    }

    async fn restore_snapshots(&self) {
        let Some(identity) = self.inner.identity.get().cloned() else {
            return;
        };
        let dir = identity.dir.clone();
        let paths = tokio::task::spawn_blocking(move || {
            match snapshot::remove_temporaries(&dir) {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(dir = %dir.display(), removed = n, "removed unfinished snapshot files")
                }
                Err(error) => tracing::warn!(%error, "cannot remove unfinished snapshot files"),
            }
            snapshot::list(&dir)
        })
        .await
        .unwrap_or_default();
        let mut restored = 0;
        for path in paths {
            match self.restore(&identity, &path).await {
                Ok(true) => restored += 1,
                Ok(false) => {}
                Err(reason) => {
                    tracing::warn!(path = %path.display(), %reason, "snapshot ignored and removed: starting that resource cold");
                    if let Err(error) = snapshot::remove(&path) {
                        tracing::warn!(%error, "cannot remove an unusable snapshot");
                    }
                }
            }
        }
        if restored > 0 {
            tracing::info!(stores = restored, "warm start: stores restored from snapshots");
        }
    }

    /// Restores one snapshot file: `Ok(false)` if its store already exists.
    async fn restore(&self, identity: &Identity, path: &Path) -> Result<bool, String> {
        let key = snapshot_key(&identity.dir, path).ok_or("not a name kache writes")?;
        if self.inner.resources.contains_key(&key) {
            return Ok(false);
        }
        let spec = self
            .spec(&key.gvr)
            .await
            .map_err(|reason| format!("resource not cacheable now ({})", reason.as_str()))?;
        if key.encoding == Encoding::Protobuf && !spec.protobuf_cacheable() {
            return Err("resource no longer cached in protobuf".into());
        }
        let expect = Cache::expectation(identity, &key);
        let owned_path = path.to_owned();
        let read = tokio::task::spawn_blocking(move || snapshot::read(&owned_path, &expect))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let resource_version = read.header.resource_version;
        if resource_version == 0 {
            return Err("no resourceVersion".into());
        }
        let paths = spec.paths();
        let objects = read
            .objects
            .into_iter()
            .map(|bytes| match key.encoding {
                Encoding::Json => spec.object_with(bytes, &paths),
                Encoding::Protobuf => spec.protobuf_object(bytes),
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("undecodable object: {e}"))?;
        let mut started = false;
        self.inner.resources.entry(key.clone()).or_insert_with(|| {
            started = true;
            self.start(&key, spec, Some((objects, resource_version)))
        });
        Ok(started)
    }

    /// Hands the stores over to the next run, at shutdown: every reflector
    /// stops (the stores hold still), the stores are saved, and their
    /// watchers get a last bookmark at the saved version before they end
    /// ([`crate::store::Notice::Closing`]), so clients resume inside the
    /// window of the store the next run restores instead of too far back
    /// for it. Reads of a closed store are forwarded meanwhile.
    pub async fn shutdown(&self) {
        let stores: Vec<Arc<Cached>> = self
            .inner
            .resources
            .iter()
            .map(|e| Arc::clone(e.value()))
            .collect();
        for cached in &stores {
            cached.reflector.abort();
        }
        self.save_snapshots().await;
        for cached in &stores {
            cached.store.close_for_restart();
        }
    }

    /// Saves every synced store to its snapshot file (in blocking tasks, one
    /// store at a time), stamped with its resourceVersion and this cluster's
    /// identity. A store that cannot be saved (disk full, read-only
    /// directory) is warned about (at most once per few minutes) and serving
    /// goes on; its previous snapshot, if any, is left as it was. Does
    /// nothing unless [`Cache::enable_snapshots`] was called. Part of
    /// [`Cache::shutdown`].
    pub async fn save_snapshots(&self) {
        let Some(identity) = self.inner.identity.get().cloned() else {
            return;
        };
        let stores: Vec<(Key, Arc<Cached>)> = self
            .inner
            .resources
            .iter()
            .map(|e| (e.key().clone(), Arc::clone(e.value())))
            .collect();
        for (key, cached) in stores {
            if !cached.store.is_synced() {
                continue;
            }
            let view = cached.store.snapshot(None, |_| true);
            if view.resource_version == cached.saved_version.load(Ordering::Relaxed) {
                continue;
            }
            let resource_version = view.resource_version;
            let header = SnapshotHeader::new(&Cache::expectation(&identity, &key), view.resource_version);
            let dir = identity.dir.clone();
            let written = tokio::task::spawn_blocking(move || {
                let objects: Vec<&[u8]> = view.objects.iter().map(|o| &o.bytes()[..]).collect();
                snapshot::write(&dir, &header, &objects)
            })
            .await;
            match written {
                Ok(Ok(path)) => {
                    tracing::debug!(path = %path.display(), resource_version, "snapshot saved");
                    cached.saved_version.store(resource_version, Ordering::Relaxed);
                    // Dropped meanwhile: its snapshot must not outlive it.
                    if !self.inner.resources.contains_key(&key) {
                        self.forget_snapshot(&key);
                    }
                }
                Ok(Err(error)) => self.warn_save(&key, &error.to_string()),
                Err(error) => self.warn_save(&key, &error.to_string()),
            }
        }
    }

    fn warn_save(&self, key: &Key, error: &str) {
        let now = self.inner.now_ms();
        let last = self.inner.save_warned.load(Ordering::Relaxed);
        let period = u64::try_from(SAVE_WARNING_PERIOD.as_millis()).unwrap_or(u64::MAX);
        if last == u64::MAX || now.saturating_sub(last) >= period {
            self.inner.save_warned.store(now, Ordering::Relaxed);
            tracing::warn!(resource = %key.gvr.resource, group = %key.gvr.group, encoding = key.encoding.as_str(), %error,
                "cannot save a snapshot (serving is not affected; further failures are quiet for a while)");
        } else {
            tracing::debug!(resource = %key.gvr.resource, %error, "cannot save a snapshot");
        }
    }

    /// Removes the snapshot of a store that is no longer cached (idle,
    /// evicted), so the next start does not restore — and watch — a resource
    /// nobody reads, from a version likely gone by then.
    fn forget_snapshot(&self, key: &Key) {
        let Some(identity) = self.inner.identity.get() else {
            return;
        };
        let path = snapshot::path(&identity.dir, &Cache::expectation(identity, key));
        if let Err(error) = snapshot::remove(&path) {
            tracing::debug!(%error, "cannot remove the snapshot of a dropped store");
        }
    }

    /// Saves the stores every `snapshot_interval` (jittered ±10 %), until
    /// dropped. Returns at once unless [`Cache::enable_snapshots`] was called.
    pub async fn run_snapshots(self) {
        if self.inner.identity.get().is_none() {
            return;
        }
        loop {
            tokio::time::sleep(jittered(self.inner.config.snapshot_interval, 0.1)).await;
            self.save_snapshots().await;
        }
    }

    /// Answers a LIST or GET from a store already cached and synced at least
    /// once, whatever the read's resourceVersion semantics (consistent reads,
    /// `Exact`, `limit` — the whole list, as at version 0), if the store is at
    /// most `max_staleness` behind the API server; returns the answer and
    /// how stale it may be (zero while the store is in sync). For a proxy
    /// that cannot reach the API server and was told to serve stale data.
    /// Never starts caching a resource, and never answers a watch.
    ///
    /// # Errors
    /// The [`Bypass`] reason: not a LIST or GET, a `continue`, a rendering
    /// the cache does not do (tables, partial metadata, YAML, selectors it
    /// cannot evaluate), no store for the resource ([`Bypass::NotSynced`]),
    /// or a store staler than allowed ([`Bypass::NotFresh`]).
    pub async fn serve_stale(
        &self,
        info: &RequestInfo,
        query: Option<&str>,
        headers: &HeaderMap,
        max_staleness: Duration,
    ) -> Result<(Answer, Duration), Bypass> {
        if !self.inner.config.enabled {
            return Err(Bypass::Disabled);
        }
        if info.verb() == crate::request::Verb::Watch {
            return Err(Bypass::NotARead);
        }
        let mut relaxed = info.clone();
        relaxed.read.resource_version = Some("0".into());
        relaxed.read.resource_version_match = None;
        relaxed.read.limit = None;
        let mut plan = reads::plan(&relaxed, query, headers)?;
        let gvr = Gvr {
            group: info.group.clone(),
            version: info.version.clone(),
            resource: info.resource.clone(),
        };
        let spec = [Encoding::Json, Encoding::Protobuf]
            .into_iter()
            .find_map(|encoding| {
                self.inner
                    .resources
                    .get(&Key {
                        gvr: gvr.clone(),
                        encoding,
                    })
                    .map(|c| c.spec.clone())
            })
            .ok_or(Bypass::NotSynced)?;
        Cache::scope(info, &spec, &mut plan)?;
        let encoding = plan.encoding(&spec)?;
        if !reads::fields_supported(&plan.field, &spec) {
            return Err(Bypass::UnsupportedField);
        }
        let cached = self
            .inner
            .resources
            .get(&Key { gvr, encoding })
            .map(|c| Arc::clone(&c))
            .ok_or(Bypass::NotSynced)?;
        let staleness = cached.store.staleness().ok_or(Bypass::NotSynced)?;
        if staleness > max_staleness {
            return Err(Bypass::NotFresh);
        }
        cached.last_used.store(self.inner.now_ms(), Ordering::Relaxed);
        let answer = match &plan.kind {
            ReadKind::List => Answer::Stream(reads::list(&plan, &cached.spec, &cached.store, encoding)),
            ReadKind::Get { name } => {
                Answer::Full(reads::get(name, &plan, &cached.spec, &cached.store, encoding))
            }
            ReadKind::Watch { .. } => return Err(Bypass::NotARead),
        };
        Ok((answer, staleness))
    }

    /// Checks every synced store against the API server every
    /// `consistency_check` (jittered ±10 %), until dropped; returns at once
    /// if the check is off. See [`Cache::check_consistency`].
    pub async fn run_consistency_checks(self) {
        let Some(period) = self.inner.config.consistency_check else {
            return;
        };
        if !self.inner.config.enabled {
            return;
        }
        loop {
            tokio::time::sleep(jittered(period, 0.1)).await;
            self.check_consistency().await;
        }
    }

    /// One round of consistency checks (KEP-4988): for each synced store,
    /// its (namespace, name, resourceVersion) set at its resourceVersion is
    /// compared with a metadata-only LIST of the API server at exactly that
    /// version (`resourceVersionMatch=Exact`, read from etcd, in JSON). A
    /// difference is logged (a bounded sample), counted, and the store
    /// relists. A version etcd compacted (`410`) — on v1.20 that is every
    /// quiet resource's, as the API server sends no bookmarks for a resource
    /// that did not change — is replaced by a consistent LIST of the current
    /// state, compared after a few seconds if the store has not moved (else
    /// the store is skipped this round).
    pub async fn check_consistency(&self) {
        let stores: Vec<Arc<Cached>> = self
            .inner
            .resources
            .iter()
            .map(|e| Arc::clone(e.value()))
            .collect();
        for cached in stores {
            let result = self.check_store(&cached).await;
            let resource = resource_label(&cached.spec.group, &cached.spec.version, &cached.spec.resource);
            tracing::debug!(%resource, encoding = cached.encoding.as_str(), result = result.as_str(), "consistency check");
            if result == CheckResult::Mismatch {
                self.inner
                    .metrics
                    .consistency_mismatches
                    .get_or_create(&MismatchLabels {
                        resource: resource.clone(),
                    })
                    .inc();
            }
            self.inner
                .metrics
                .consistency_checks
                .get_or_create(&CheckLabels {
                    resource,
                    result: result.as_str(),
                })
                .inc();
        }
    }

    /// A metadata-only LIST of `uri`: (namespace, name) → resourceVersion.
    async fn metadata_list(
        &self,
        spec: &ResourceSpec,
        uri: &str,
    ) -> Result<BTreeMap<(String, String), u64>, CheckResult> {
        let request = Request::get(uri)
            .header(http::header::ACCEPT, METADATA_LIST)
            .body(())
            .map_err(|_| CheckResult::Error)?;
        let response = self.inner.client.fetch(request).await.map_err(|error| {
            tracing::debug!(resource = %spec.qualified_resource(), %error, "consistency check: LIST failed");
            CheckResult::Error
        })?;
        match response.status() {
            StatusCode::OK => {}
            StatusCode::GONE => return Err(CheckResult::Compacted),
            status => {
                tracing::debug!(resource = %spec.qualified_resource(), %status, "consistency check: LIST refused");
                return Err(CheckResult::Error);
            }
        }
        metadata_list(response.body()).ok_or_else(|| {
            tracing::warn!(resource = %spec.qualified_resource(), "consistency check: undecodable metadata list");
            CheckResult::Error
        })
    }

    async fn check_store(&self, cached: &Cached) -> CheckResult {
        let store = &cached.store;
        if !store.is_synced() {
            return CheckResult::NotSynced;
        }
        // The store's state and version, taken together: the API server is
        // asked for exactly that version, so the store may move on meanwhile.
        let view = store.snapshot(None, |_| true);
        if view.resource_version == 0 {
            return CheckResult::NotSynced;
        }
        let spec = &cached.spec;
        let exact = format!(
            "{}?resourceVersion={}&resourceVersionMatch=Exact",
            spec.collection_path(),
            view.resource_version
        );
        let upstream = match self.metadata_list(spec, &exact).await {
            Ok(upstream) => upstream,
            Err(CheckResult::Compacted) => {
                // A quiet resource: its store's version is as old as its last
                // change, and v1.20 sends no bookmarks for a resource that did
                // not change, so etcd soon compacts it. Compare with the
                // current state instead, once the store has had time to
                // receive any change made up to it: if it has not moved, it
                // should equal that state.
                let current = match self.metadata_list(spec, &spec.collection_path()).await {
                    Ok(current) => current,
                    Err(result) => return result,
                };
                tokio::time::sleep(CHECK_SETTLE).await;
                if store.resource_version() != view.resource_version || !store.is_synced() {
                    return CheckResult::Compacted;
                }
                current
            }
            Err(result) => return result,
        };
        let ours: BTreeMap<(String, String), u64> = view
            .objects
            .iter()
            .map(|o| ((o.namespace.to_string(), o.name.to_string()), o.resource_version))
            .collect();
        let divergence = Divergence::between(&ours, &upstream);
        if divergence.is_empty() {
            return CheckResult::Consistent;
        }
        let changed: Vec<String> = divergence
            .changed
            .iter()
            .take(MISMATCHES_LOGGED)
            .map(|((ns, name), ours, theirs)| format!("{ns}/{name} cached at {ours}, upstream at {theirs}"))
            .collect();
        tracing::warn!(
            resource = %spec.qualified_resource(),
            encoding = cached.encoding.as_str(),
            resource_version = view.resource_version,
            missing = divergence.missing.len(),
            extra = divergence.extra.len(),
            changed = divergence.changed.len(),
            missing_sample = %some_keys(divergence.missing.iter()),
            extra_sample = %some_keys(divergence.extra.iter()),
            changed_sample = %changed.join(", "),
            "consistency check: the cache differs from the API server at the same resourceVersion; relisting"
        );
        store.request_relist();
        CheckResult::Mismatch
    }
}

/// The (namespace, name) → resourceVersion of a `PartialObjectMetadataList`,
/// in protobuf or JSON; `None` if it is not one.
fn metadata_list(body: &[u8]) -> Option<BTreeMap<(String, String), u64>> {
    let rv = crate::store::parse_resource_version;
    if let Ok(list) = crate::protobuf::unwrap(body) {
        let (_, items) = crate::protobuf::list_items(list.raw).ok()?;
        return items
            .into_iter()
            .map(|item| {
                let meta = crate::protobuf::object_meta(item).ok()?;
                let resource_version = rv(&meta.resource_version)?;
                (!meta.name.is_empty()).then_some(((meta.namespace, meta.name), resource_version))
            })
            .collect();
    }
    let list: serde_json::Value = serde_json::from_slice(body).ok()?;
    list["items"]
        .as_array()?
        .iter()
        .map(|item| {
            let meta = &item["metadata"];
            Some((
                (
                    meta["namespace"].as_str().unwrap_or("").to_string(),
                    meta["name"].as_str()?.to_string(),
                ),
                rv(meta["resourceVersion"].as_str()?)?,
            ))
        })
        .collect()
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

    use crate::upstream::ByteStream;

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
            let Ok(answer) = cache.serve(&info, query.as_deref(), &headers).await else {
                panic!("{accept}: not answered from the cache");
            };
            let response = answer.collect().await.expect("collected");
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

    #[tokio::test]
    async fn the_debug_view_counts_each_stores_hits_and_the_reads_it_could_not_answer() {
        let fake = Arc::new(Fake::default());
        let client: Arc<dyn ApiClient> = fake.clone();
        let discovery = Discovery::new(client.clone(), Default::default(), DiscoveryMetrics::default());
        let cache = Cache::new(client, discovery, CacheConfig::default(), CacheMetrics::default());
        let read = |uri: &str| {
            let (info, query, headers) = request(uri, "application/json");
            let cache = cache.clone();
            async move { cache.serve(&info, query.as_deref(), &headers).await.is_ok() }
        };
        // Before any store: not counted against any resource.
        assert!(!read("/api/v1/namespaces/kache-pb/configmaps").await);
        assert!(read("/api/v1/namespaces/kache-pb/configmaps?resourceVersion=0").await);
        assert!(read("/api/v1/configmaps?resourceVersion=0").await);
        assert!(
            !read("/api/v1/namespaces/kache-pb/configmaps").await,
            "a consistent read"
        );
        let view = cache.debug_view();
        let store = &view["resources"][0];
        assert_eq!(store["resource"], "configmaps");
        assert_eq!(store["hits"], 2);
        assert_eq!(store["forwardedReads"], 1);
        assert_eq!(store["hitRatio"], 2.0 / 3.0);
        assert_eq!(store["stalenessSeconds"], 0, "synced");
        // The fields it always had are still there.
        for field in [
            "objects",
            "bytes",
            "resourceVersion",
            "watchers",
            "idleSeconds",
            "synced",
        ] {
            assert!(!store[field].is_null(), "{field} missing: {store}");
        }
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
            events += chunk.into_bytes().iter().filter(|b| **b == b'\n').count();
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

    /// A scriptable API server for snapshots, serve-stale and consistency
    /// checks: configmaps only; records every request (`fetch` and `stream`
    /// alike) by URI.
    struct Scripted {
        seen: Mutex<Vec<String>>,
        /// The answer to `LIST ?resourceVersion=0`.
        list: Mutex<String>,
        list_status: Mutex<StatusCode>,
        /// The answer to a consistency check's metadata LIST at the store's version.
        metadata: Mutex<(StatusCode, String)>,
        /// The answer to its metadata LIST of the current state.
        current: Mutex<(StatusCode, String)>,
        /// How the next WATCHes answer; then 200 and quiet.
        watches: Mutex<std::collections::VecDeque<WatchScript>>,
    }

    /// One WATCH: held until `gate` fires (if any), then `status` and `lines`,
    /// then the stream stays open.
    struct WatchScript {
        gate: Option<tokio::sync::oneshot::Receiver<()>>,
        status: StatusCode,
        lines: Vec<String>,
    }

    const CONFIGMAPS: &[u8] = br#"{"kind":"APIResourceList","groupVersion":"v1","resources":[{"name":"configmaps","namespaced":true,"kind":"ConfigMap","verbs":["get","list","watch"]}]}"#;

    fn configmap(ns: &str, name: &str, rv: u64) -> String {
        format!(
            r#"{{"kind":"ConfigMap","apiVersion":"v1","metadata":{{"name":"{name}","namespace":"{ns}","resourceVersion":"{rv}"}},"data":{{"k":"v"}}}}"#
        )
    }

    fn list_body(rv: u64, items: &[(&str, &str, u64)]) -> String {
        let items: Vec<String> = items.iter().map(|(ns, n, rv)| configmap(ns, n, *rv)).collect();
        format!(
            r#"{{"kind":"ConfigMapList","apiVersion":"v1","metadata":{{"resourceVersion":"{rv}"}},"items":[{}]}}"#,
            items.join(",")
        )
    }

    fn metadata_body(items: &[(&str, &str, u64)]) -> String {
        let items: Vec<String> = items
            .iter()
            .map(|(ns, n, rv)| {
                format!(
                    r#"{{"kind":"PartialObjectMetadata","apiVersion":"meta.k8s.io/v1","metadata":{{"name":"{n}","namespace":"{ns}","resourceVersion":"{rv}"}}}}"#
                )
            })
            .collect();
        format!(
            r#"{{"kind":"PartialObjectMetadataList","apiVersion":"meta.k8s.io/v1","metadata":{{"resourceVersion":"1"}},"items":[{}]}}"#,
            items.join(",")
        )
    }

    impl Scripted {
        fn new(list: String) -> Arc<Scripted> {
            Arc::new(Scripted {
                seen: Mutex::new(Vec::new()),
                list: Mutex::new(list),
                list_status: Mutex::new(StatusCode::OK),
                metadata: Mutex::new((StatusCode::OK, metadata_body(&[]))),
                current: Mutex::new((StatusCode::OK, metadata_body(&[]))),
                watches: Mutex::new(Default::default()),
            })
        }

        fn script_watch(&self, script: WatchScript) {
            self.watches.lock().expect("lock").push_back(script);
        }

        fn seen(&self, prefix: &str) -> Vec<String> {
            self.seen
                .lock()
                .expect("lock")
                .iter()
                .filter(|uri| uri.starts_with(prefix))
                .cloned()
                .collect()
        }

        fn lists(&self) -> usize {
            self.seen("/api/v1/configmaps?resourceVersion=0").len()
        }
    }

    impl ApiClient for Scripted {
        fn fetch(&self, request: Request<()>) -> BoxFuture<'_, Result<Response<Bytes>, FetchError>> {
            let uri = request.uri().to_string();
            self.seen.lock().expect("lock").push(uri.clone());
            let (status, body) = match uri.as_str() {
                "/api/v1" => (StatusCode::OK, Bytes::from_static(CONFIGMAPS)),
                "/api/v1/namespaces/kube-system" => (
                    StatusCode::OK,
                    Bytes::from_static(
                        br#"{"kind":"Namespace","metadata":{"name":"kube-system","uid":"uid-1"}}"#,
                    ),
                ),
                "/api/v1/configmaps?resourceVersion=0" => (
                    *self.list_status.lock().expect("lock"),
                    Bytes::from(self.list.lock().expect("lock").clone()),
                ),
                u if u.ends_with("&resourceVersionMatch=Exact") => {
                    let accept = request.headers()[http::header::ACCEPT].to_str().unwrap_or("");
                    assert_eq!(accept, METADATA_LIST);
                    let (status, body) = self.metadata.lock().expect("lock").clone();
                    (status, Bytes::from(body))
                }
                "/api/v1/configmaps" => {
                    let accept = request.headers()[http::header::ACCEPT].to_str().unwrap_or("");
                    assert_eq!(accept, METADATA_LIST);
                    let (status, body) = self.current.lock().expect("lock").clone();
                    (status, Bytes::from(body))
                }
                _ => (StatusCode::NOT_FOUND, Bytes::new()),
            };
            Box::pin(async move {
                let mut response = Response::new(body);
                *response.status_mut() = status;
                Ok(response)
            })
        }

        fn stream(&self, request: Request<()>) -> BoxFuture<'_, Result<Response<ByteStream>, FetchError>> {
            self.seen.lock().expect("lock").push(request.uri().to_string());
            let script = self.watches.lock().expect("lock").pop_front();
            Box::pin(async move {
                use futures::StreamExt;
                let Some(script) = script else {
                    return Ok(Response::new(Box::pin(futures::stream::pending()) as ByteStream));
                };
                if let Some(gate) = script.gate {
                    let _ = gate.await;
                }
                let lines = futures::stream::iter(
                    script
                        .lines
                        .into_iter()
                        .map(|l| Ok(Bytes::from(format!("{l}\n")))),
                );
                let mut response =
                    Response::new(Box::pin(lines.chain(futures::stream::pending())) as ByteStream);
                *response.status_mut() = script.status;
                Ok(response)
            })
        }
    }

    fn cache_with(client: Arc<Scripted>, config: CacheConfig) -> Cache {
        let client: Arc<dyn ApiClient> = client;
        let discovery = Discovery::new(client.clone(), Default::default(), DiscoveryMetrics::default());
        Cache::new(client, discovery, config, CacheMetrics::default())
    }

    fn snapshot_config(dir: &Path) -> CacheConfig {
        CacheConfig {
            snapshot_dir: Some(dir.to_path_buf()),
            sync_timeout: Duration::from_millis(100),
            ..CacheConfig::default()
        }
    }

    const LIST_ALL: &str = "/api/v1/configmaps?resourceVersion=0";

    /// The (namespace/name, resourceVersion) of a JSON list answer, and its version.
    fn listed(answer: Result<Answer, Bypass>) -> (Vec<(String, String)>, String) {
        let Ok(answer) = answer else {
            panic!("not answered from the cache");
        };
        let response = futures::executor::block_on(answer.collect()).expect("collected");
        let list: serde_json::Value = serde_json::from_slice(response.body()).expect("json");
        let items = list["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|i| {
                (
                    i["metadata"]["name"].as_str().unwrap_or("").to_string(),
                    i["metadata"]["resourceVersion"]
                        .as_str()
                        .unwrap_or("")
                        .to_string(),
                )
            })
            .collect();
        (
            items,
            list["metadata"]["resourceVersion"]
                .as_str()
                .unwrap_or("")
                .to_string(),
        )
    }

    /// A cache that cached configmaps (listed at 10) and saved them to `dir`.
    async fn saved(dir: &Path) {
        let fake = Scripted::new(list_body(10, &[("a", "x", 5), ("a", "y", 7)]));
        let cache = cache_with(fake.clone(), snapshot_config(dir));
        let uid = cluster_identity(fake.as_ref()).await.expect("identity");
        assert_eq!(uid, "uid-1");
        cache.enable_snapshots("https://upstream".into(), uid);
        let (info, query, headers) = request(LIST_ALL, "application/json");
        let (items, _) = listed(cache.serve(&info, query.as_deref(), &headers).await);
        assert_eq!(items.len(), 2);
        cache.save_snapshots().await;
        assert_eq!(
            snapshot::list(&dir.join("uid-1")).len(),
            1,
            "one snapshot saved, in its cluster's directory"
        );
    }

    #[tokio::test]
    async fn a_saved_cache_restarts_with_a_watch_from_its_version_and_no_list() {
        let dir = tempfile::tempdir().expect("tempdir");
        saved(dir.path()).await;

        let fake = Scripted::new(list_body(99, &[]));
        let (release, gate) = tokio::sync::oneshot::channel();
        fake.script_watch(WatchScript {
            gate: Some(gate),
            status: StatusCode::OK,
            lines: vec![format!(
                r#"{{"type":"ADDED","object":{}}}"#,
                configmap("a", "z", 11)
            )],
        });
        let cache = cache_with(fake.clone(), snapshot_config(dir.path()));
        cache.enable_snapshots("https://upstream".into(), "uid-1".into());
        cache.warm_start().await;
        let mut watches = Vec::new();
        for _ in 0..100 {
            watches = fake.seen("/api/v1/configmaps?allowWatchBookmarks=true");
            if !watches.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(watches.len(), 1, "{watches:?}");
        assert!(watches[0].contains("resourceVersion=10&"), "{}", watches[0]);

        // Until the watch is established, the restored store answers nothing.
        let (info, query, headers) = request(LIST_ALL, "application/json");
        assert!(matches!(
            cache.serve(&info, query.as_deref(), &headers).await,
            Err(Bypass::NotSynced)
        ));
        release.send(()).expect("release the watch");
        let (info, query, headers) = request("/api/v1/configmaps?resourceVersion=11", "application/json");
        let (items, rv) = listed(cache.serve(&info, query.as_deref(), &headers).await);
        assert_eq!(
            items,
            [
                ("x".to_string(), "5".to_string()),
                ("y".into(), "7".into()),
                ("z".into(), "11".into())
            ]
        );
        assert_eq!(rv, "11");
        assert_eq!(fake.lists(), 0, "no LIST: {:?}", fake.seen(""));
    }

    #[tokio::test]
    async fn a_resource_kache_may_not_list_is_forwarded_at_once_and_not_listed_again_for_a_while() {
        let fake = Scripted::new(r#"{"kind":"Status","code":403}"#.to_string());
        *fake.list_status.lock().expect("lock") = StatusCode::FORBIDDEN;
        // A sync timeout longer than the test: only the refusal can end the wait.
        let config = CacheConfig {
            sync_timeout: Duration::from_secs(3600),
            ..CacheConfig::default()
        };
        let cache = cache_with(fake.clone(), config);
        let (info, query, headers) = request(LIST_ALL, "application/json");
        for _ in 0..3 {
            let answer = tokio::time::timeout(
                Duration::from_secs(60),
                cache.serve(&info, query.as_deref(), &headers),
            )
            .await
            .expect("answered before the sync timeout");
            assert!(matches!(answer, Err(Bypass::Refused)), "{:?}", answer.err());
        }
        assert_eq!(
            fake.lists(),
            1,
            "refused once, not listed again: {:?}",
            fake.seen("")
        );
    }

    #[tokio::test]
    async fn a_read_before_the_warm_start_waits_for_it_instead_of_listing() {
        let dir = tempfile::tempdir().expect("tempdir");
        saved(dir.path()).await;

        let fake = Scripted::new(list_body(99, &[]));
        fake.script_watch(WatchScript {
            gate: None,
            status: StatusCode::OK,
            lines: vec![],
        });
        // Long enough for the restored store's watch to count as established.
        let config = CacheConfig {
            sync_timeout: Duration::from_secs(5),
            ..snapshot_config(dir.path())
        };
        let cache = cache_with(fake.clone(), config);
        assert!(!cache.warm_started(), "snapshots configured: a warm start is due");
        // The read comes while kache still learns the cluster's identity.
        let reader = {
            let cache = cache.clone();
            tokio::spawn(async move {
                let (info, query, headers) = request(LIST_ALL, "application/json");
                cache.serve(&info, query.as_deref(), &headers).await
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!reader.is_finished(), "the read waits for the warm start");
        cache.enable_snapshots("https://upstream".into(), "uid-1".into());
        cache.warm_start().await;
        assert!(cache.warm_started());
        let (items, _) = listed(reader.await.expect("reader"));
        assert_eq!(items.len(), 2, "{items:?}");
        assert_eq!(fake.lists(), 0, "answered from the snapshot: {:?}", fake.seen(""));
    }

    #[tokio::test]
    async fn a_restored_store_whose_version_is_gone_relists() {
        let dir = tempfile::tempdir().expect("tempdir");
        saved(dir.path()).await;

        let fake = Scripted::new(list_body(40, &[("a", "x", 30)]));
        // As v1.20 answers a watch from a compacted version: 200, then ERROR 410.
        fake.script_watch(WatchScript {
            gate: None,
            status: StatusCode::OK,
            lines: vec![r#"{"type":"ERROR","object":{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"Expired","code":410}}"#.into()],
        });
        let cache = cache_with(fake.clone(), snapshot_config(dir.path()));
        cache.enable_snapshots("https://upstream".into(), "uid-1".into());
        cache.warm_start().await;
        let (info, query, headers) = request(LIST_ALL, "application/json");
        let mut answer = cache.serve(&info, query.as_deref(), &headers).await;
        for _ in 0..50 {
            if answer.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            answer = cache.serve(&info, query.as_deref(), &headers).await;
        }
        let (items, rv) = listed(answer);
        assert_eq!(
            (items, rv),
            (vec![("x".to_string(), "30".to_string())], "40".to_string())
        );
        assert_eq!(fake.lists(), 1);
    }

    #[tokio::test]
    async fn corrupt_and_foreign_snapshots_are_removed_and_the_resource_lists() {
        for damage in ["corrupt", "truncated", "foreign"] {
            let dir = tempfile::tempdir().expect("tempdir");
            saved(dir.path()).await;
            let path = snapshot::list(&dir.path().join("uid-1")).remove(0);
            let mut uid = "uid-1";
            match damage {
                "corrupt" => {
                    let mut bytes = std::fs::read(&path).expect("read");
                    let middle = bytes.len() / 2;
                    bytes[middle] ^= 0xff;
                    std::fs::write(&path, bytes).expect("write");
                }
                "truncated" => {
                    let bytes = std::fs::read(&path).expect("read");
                    std::fs::write(&path, &bytes[..bytes.len() - 7]).expect("write");
                }
                // Another cluster's snapshot in this cluster's directory (a
                // state directory copied around): its stamp gives it away.
                _ => {
                    uid = "uid-2";
                    let theirs = dir.path().join("uid-2");
                    std::fs::create_dir_all(&theirs).expect("mkdir");
                    std::fs::rename(&path, theirs.join(path.file_name().expect("a file name")))
                        .expect("move");
                }
            }
            let fake = Scripted::new(list_body(50, &[("a", "w", 45)]));
            let cache = cache_with(fake.clone(), snapshot_config(dir.path()));
            cache.enable_snapshots("https://upstream".into(), uid.into());
            cache.warm_start().await;
            assert!(cache.inner.resources.is_empty(), "{damage}: nothing restored");
            assert!(
                snapshot::list(&dir.path().join(uid)).is_empty(),
                "{damage}: the snapshot was removed"
            );
            let (info, query, headers) = request(LIST_ALL, "application/json");
            let (items, rv) = listed(cache.serve(&info, query.as_deref(), &headers).await);
            assert_eq!(
                (items.len(), rv.as_str()),
                (1, "50"),
                "{damage}: served from a LIST"
            );
            assert_eq!(fake.lists(), 1, "{damage}");
        }
    }

    #[tokio::test]
    async fn snapshots_that_cannot_be_saved_do_not_disturb_serving() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"not a directory").expect("write");
        let fake = Scripted::new(list_body(10, &[("a", "x", 5)]));
        let cache = cache_with(fake.clone(), snapshot_config(&file.join("snapshots")));
        cache.enable_snapshots("https://upstream".into(), "uid-1".into());
        let (info, query, headers) = request(LIST_ALL, "application/json");
        listed(cache.serve(&info, query.as_deref(), &headers).await);
        cache.save_snapshots().await;
        cache.save_snapshots().await;
        let (items, _) = listed(cache.serve(&info, query.as_deref(), &headers).await);
        assert_eq!(items.len(), 1);
        assert_eq!(fake.lists(), 1);
    }

    #[tokio::test]
    async fn a_dropped_store_takes_its_snapshot_along() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fake = Scripted::new(list_body(10, &[("a", "x", 5)]));
        let config = CacheConfig {
            idle_timeout: Duration::ZERO,
            ..snapshot_config(dir.path())
        };
        let cache = cache_with(fake, config);
        cache.enable_snapshots("https://upstream".into(), "uid-1".into());
        let (info, query, headers) = request(LIST_ALL, "application/json");
        listed(cache.serve(&info, query.as_deref(), &headers).await);
        cache.save_snapshots().await;
        assert_eq!(snapshot::list(&dir.path().join("uid-1")).len(), 1);
        tokio::time::sleep(Duration::from_millis(5)).await;
        cache.sweep();
        assert!(cache.inner.resources.is_empty(), "idle: dropped");
        assert!(snapshot::list(&dir.path().join("uid-1")).is_empty());
    }

    #[test]
    fn snapshot_file_names_read_back_as_their_store() {
        let dir = Path::new("/state");
        for (group, resource, encoding) in [
            ("", "configmaps", Encoding::Json),
            ("stable.example.com", "crontabs", Encoding::Json),
            ("apps", "deployments", Encoding::Protobuf),
            ("Weird_Group", "Odd%Name", Encoding::Json),
        ] {
            let key = Key {
                gvr: Gvr {
                    group: group.into(),
                    version: "v1".into(),
                    resource: resource.into(),
                },
                encoding,
            };
            let identity = Identity {
                dir: dir.into(),
                upstream_url: String::new(),
                cluster_uid: String::new(),
            };
            let path = snapshot::path(dir, &Cache::expectation(&identity, &key));
            assert_eq!(snapshot_key(dir, &path), Some(key), "{}", path.display());
        }
        assert_eq!(snapshot_key(dir, Path::new("/state/junk.ksnap")), None);
        assert_eq!(snapshot_key(dir, Path::new("/state/a_b_c_yaml.ksnap")), None);
    }

    // ── serve stale ──

    #[tokio::test]
    async fn stale_reads_are_answered_from_a_store_synced_before_within_the_bound() {
        let fake = Scripted::new(list_body(10, &[("a", "x", 5), ("b", "y", 7)]));
        let cache = cache_with(fake.clone(), CacheConfig::default());
        let max = Duration::from_secs(60);
        // Not cached: no store is started for it.
        let (info, query, headers) = request("/api/v1/configmaps", "application/json");
        assert!(matches!(
            cache.serve_stale(&info, query.as_deref(), &headers, max).await,
            Err(Bypass::NotSynced)
        ));
        assert!(cache.inner.resources.is_empty() && fake.lists() == 0);
        // Cached: consistent reads, Exact and limits are answered, selectors honoured.
        let (warm, q, h) = request(LIST_ALL, "application/json");
        listed(cache.serve(&warm, q.as_deref(), &h).await);
        for uri in [
            "/api/v1/configmaps",
            "/api/v1/configmaps?resourceVersion=10&resourceVersionMatch=Exact",
            "/api/v1/configmaps?limit=1",
            "/api/v1/configmaps?resourceVersion=999",
        ] {
            let (info, query, headers) = request(uri, "application/json");
            let (answer, staleness) = cache
                .serve_stale(&info, query.as_deref(), &headers, max)
                .await
                .unwrap_or_else(|b| panic!("{uri}: {b:?}"));
            assert_eq!(staleness, Duration::ZERO, "in sync");
            assert_eq!(listed(Ok(answer)).0.len(), 2, "{uri}");
        }
        let (info, query, headers) = request("/api/v1/namespaces/b/configmaps/y", "application/json");
        let Ok((Answer::Full(get), _)) = cache.serve_stale(&info, query.as_deref(), &headers, max).await
        else {
            panic!("GET not answered");
        };
        assert_eq!(get.status(), StatusCode::OK);
        let (info, query, headers) =
            request("/api/v1/configmaps?labelSelector=app%3Dweb", "application/json");
        let Ok((answer, _)) = cache.serve_stale(&info, query.as_deref(), &headers, max).await else {
            panic!("selector");
        };
        assert!(listed(Ok(answer)).0.is_empty());
        // Renderings the cache does not do, continues and watches are not answered.
        for (uri, accept) in [
            (
                "/api/v1/configmaps",
                "application/json;as=Table;v=v1;g=meta.k8s.io",
            ),
            ("/api/v1/configmaps?continue=abc", "application/json"),
            ("/api/v1/configmaps?watch=true", "application/json"),
        ] {
            let (info, query, headers) = request(uri, accept);
            assert!(
                cache
                    .serve_stale(&info, query.as_deref(), &headers, max)
                    .await
                    .is_err(),
                "{uri} {accept}"
            );
        }
        // The upstream is lost: answered while within the bound, with its staleness.
        let store = cache.inner.resources.iter().next().expect("store").store.clone();
        store.mark_unsynced();
        let (info, query, headers) = request("/api/v1/configmaps", "application/json");
        assert!(matches!(
            cache.serve(&info, query.as_deref(), &headers).await,
            Err(Bypass::ConsistentRead)
        ));
        tokio::time::sleep(Duration::from_millis(30)).await;
        let (_, staleness) = cache
            .serve_stale(&info, query.as_deref(), &headers, max)
            .await
            .unwrap_or_else(|b| panic!("{b:?}"));
        assert!(staleness >= Duration::from_millis(30), "{staleness:?}");
        assert!(matches!(
            cache
                .serve_stale(&info, query.as_deref(), &headers, Duration::from_millis(10))
                .await,
            Err(Bypass::NotFresh)
        ));
    }

    #[tokio::test]
    async fn a_restored_store_that_never_synced_is_not_served_stale() {
        let dir = tempfile::tempdir().expect("tempdir");
        saved(dir.path()).await;
        let fake = Scripted::new(list_body(99, &[]));
        let (_release, gate) = tokio::sync::oneshot::channel::<()>();
        fake.script_watch(WatchScript {
            gate: Some(gate),
            status: StatusCode::OK,
            lines: Vec::new(),
        });
        let cache = cache_with(fake, snapshot_config(dir.path()));
        cache.enable_snapshots("https://upstream".into(), "uid-1".into());
        cache.warm_start().await;
        assert_eq!(cache.inner.resources.len(), 1);
        let (info, query, headers) = request("/api/v1/configmaps", "application/json");
        assert!(matches!(
            cache
                .serve_stale(&info, query.as_deref(), &headers, Duration::from_secs(3600))
                .await,
            Err(Bypass::NotSynced)
        ));
    }

    // ── consistency checks ──

    async fn checked(upstream: &[(&str, &str, u64)]) -> (Arc<Scripted>, Cache) {
        let fake = Scripted::new(list_body(10, &[("a", "x", 5), ("a", "y", 7)]));
        let cache = cache_with(fake.clone(), CacheConfig::default());
        let (info, query, headers) = request(LIST_ALL, "application/json");
        listed(cache.serve(&info, query.as_deref(), &headers).await);
        *fake.metadata.lock().expect("lock") = (StatusCode::OK, metadata_body(upstream));
        cache.check_consistency().await;
        (fake, cache)
    }

    fn checks(cache: &Cache, result: &'static str) -> u64 {
        cache
            .inner
            .metrics
            .consistency_checks
            .get_or_create(&CheckLabels {
                resource: "v1/configmaps".into(),
                result,
            })
            .get()
    }

    async fn relisted(fake: &Scripted) -> bool {
        for _ in 0..100 {
            if fake.lists() > 1 {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    #[tokio::test]
    async fn a_store_identical_to_the_api_server_passes_its_check() {
        let (fake, cache) = checked(&[("a", "x", 5), ("a", "y", 7)]).await;
        assert_eq!(checks(&cache, "consistent"), 1);
        assert_eq!(
            fake.seen("/api/v1/configmaps?resourceVersion=10&resourceVersionMatch=Exact")
                .len(),
            1,
            "asked at exactly the store's version"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(fake.lists(), 1, "no relist");
    }

    #[tokio::test]
    async fn a_store_that_diverged_is_detected_and_relisted() {
        for upstream in [
            &[("a", "x", 5)][..],                               // y is extra in the store
            &[("a", "x", 5), ("a", "y", 7), ("b", "z", 9)][..], // z is missing
            &[("a", "x", 5), ("a", "y", 8)][..],                // y at another version
        ] {
            let (fake, cache) = checked(upstream).await;
            assert_eq!(checks(&cache, "mismatch"), 1, "{upstream:?}");
            let mismatches = cache
                .inner
                .metrics
                .consistency_mismatches
                .get_or_create(&MismatchLabels {
                    resource: "v1/configmaps".into(),
                })
                .get();
            assert_eq!(mismatches, 1);
            assert!(relisted(&fake).await, "{upstream:?}: relisted");
        }
    }

    /// A cache holding configmaps x@5 and y@7 at 10, whose version the API
    /// server compacted; `current` is its list of the current state.
    async fn compacted(current: &[(&str, &str, u64)], moves: bool) -> (Arc<Scripted>, Cache) {
        let fake = Scripted::new(list_body(10, &[("a", "x", 5), ("a", "y", 7)]));
        let cache = cache_with(fake.clone(), CacheConfig::default());
        let (info, query, headers) = request(LIST_ALL, "application/json");
        listed(cache.serve(&info, query.as_deref(), &headers).await);
        *fake.metadata.lock().expect("lock") = (StatusCode::GONE, String::new());
        *fake.current.lock().expect("lock") = (StatusCode::OK, metadata_body(current));
        if moves {
            let store = cache.inner.resources.iter().next().expect("store").store.clone();
            tokio::spawn(async move {
                tokio::time::sleep(CHECK_SETTLE / 4).await;
                let json = Bytes::from(configmap("a", "z", 12));
                let spec = ResourceSpec {
                    group: String::new(),
                    version: "v1".into(),
                    resource: "configmaps".into(),
                    kind: "ConfigMap".into(),
                    namespaced: true,
                    custom: false,
                    speaks_protobuf: Some(true),
                };
                store.apply(crate::store::EventType::Added, spec.object(json).expect("object"));
            });
        }
        cache.check_consistency().await;
        (fake, cache)
    }

    #[tokio::test]
    async fn a_quiet_store_whose_version_was_compacted_is_checked_against_the_current_state() {
        let (fake, cache) = compacted(&[("a", "x", 5), ("a", "y", 7)], false).await;
        assert_eq!(checks(&cache, "consistent"), 1);
        assert_eq!(
            fake.seen("/api/v1/configmaps")
                .iter()
                .filter(|u| *u == "/api/v1/configmaps")
                .count(),
            1
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(fake.lists(), 1, "no relist");

        let (fake, cache) = compacted(&[("a", "x", 5)], false).await;
        assert_eq!(checks(&cache, "mismatch"), 1);
        assert!(relisted(&fake).await);
    }

    #[tokio::test]
    async fn a_compacted_version_skips_the_check_if_the_store_moves_meanwhile() {
        let (fake, cache) = compacted(&[("a", "x", 5), ("a", "y", 7), ("a", "z", 12)], true).await;
        assert_eq!(checks(&cache, "compacted"), 1);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(fake.lists(), 1, "no relist");
    }

    #[test]
    fn divergences_name_missing_extra_and_changed_objects() {
        let map = |items: &[(&str, u64)]| -> BTreeMap<(String, String), u64> {
            items
                .iter()
                .map(|(n, rv)| ((String::new(), n.to_string()), *rv))
                .collect()
        };
        let d = Divergence::between(
            &map(&[("a", 1), ("b", 2), ("c", 3)]),
            &map(&[("b", 2), ("c", 4), ("d", 5)]),
        );
        assert_eq!(d.missing, [(String::new(), "d".to_string())]);
        assert_eq!(d.extra, [(String::new(), "a".to_string())]);
        assert_eq!(d.changed, [((String::new(), "c".to_string()), 3, 4)]);
        assert!(Divergence::between(&map(&[("a", 1)]), &map(&[("a", 1)])).is_empty());
    }

    #[test]
    fn metadata_lists_read_the_same_in_protobuf_and_json() {
        let pb = metadata_list(&fixture("pods-metadata.pb")).expect("protobuf");
        let json = metadata_list(&fixture("pods-metadata.json")).expect("json");
        assert_eq!(pb.len(), 30);
        assert_eq!(pb, json);
        assert!(pb.keys().all(|(ns, name)| !ns.is_empty() && !name.is_empty()));
        assert_eq!(metadata_list(b"{\"items\":[{\"metadata\":{}}]}"), None);
        assert_eq!(metadata_list(b"nonsense"), None);
    }

    #[test]
    fn jitter_stays_within_its_fraction() {
        for _ in 0..100 {
            let d = jittered(Duration::from_secs(100), 0.1);
            assert!(
                d >= Duration::from_secs(90) && d <= Duration::from_secs(110),
                "{d:?}"
            );
        }
    }
}
