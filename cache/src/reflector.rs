//! The writer of a store: LIST then WATCH one resource in one encoding, as an
//! informer does (a protobuf store is fed by protobuf requests, see
//! [`crate::protobuf`]).
//!
//! ```text
//!   LIST ?resourceVersion=0 ──► Store::replace (whole, at the list's version)
//!        │
//!        ▼
//!   WATCH ?allowWatchBookmarks=true&resourceVersion=<store's> ──► Store::apply / progress
//!        │ ends normally ─► watch again from the store's version
//!        │ 410 Gone      ─► relist: Store::replace tells watchers the differences
//!        └ fails         ─► unsynced (readers forward), retry with backoff from the
//!                           store's version; relist if it is gone
//! ```
//!
//! A store restored from a snapshot ([`resume`]) skips the first LIST and
//! starts at the WATCH, from the snapshot's version; it counts as synced only
//! once that watch is established (see [`ESTABLISH_GRACE`]). A failed
//! consistency check (`Store::request_relist`) ends the watch and relists.
//!
//! Watches served from the store outlive all of this: they stay open while
//! the reflector reconnects and go on after a relist (see [`crate::store`]).
//!
//! The LIST asks for `resourceVersion=0`, as client-go's reflectors do, so the
//! API server answers it from its own watch cache rather than etcd.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::header;
use http::{Request, StatusCode};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::store::{parse_resource_version, Encoding, EventType, Object, Store};
use crate::upstream::{ApiClient, FetchError};

/// What kache knows about a cached resource, from discovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceSpec {
    /// Empty for the core group.
    pub group: String,
    pub version: String,
    pub resource: String,
    pub kind: String,
    pub namespaced: bool,
    /// Served by a CustomResourceDefinition: list items keep their type
    /// meta, only `metadata.name`/`metadata.namespace` are selectable fields,
    /// and there is no protobuf.
    pub custom: bool,
    /// Whether the API server answers this resource in protobuf: built-in
    /// types do, custom resources do not, and an aggregated API server
    /// decides for itself (`None`: unknown).
    pub speaks_protobuf: Option<bool>,
}

impl ResourceSpec {
    /// `v1` or `group/version`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The path of the cluster-wide collection (`/api/v1/pods`).
    pub fn collection_path(&self) -> String {
        if self.group.is_empty() {
            format!("/api/{}/{}", self.version, self.resource)
        } else {
            format!("/apis/{}/{}/{}", self.group, self.version, self.resource)
        }
    }

    /// `pods` or `deployments.apps`, as the API server names a resource in messages.
    pub fn qualified_resource(&self) -> String {
        if self.group.is_empty() {
            self.resource.clone()
        } else {
            format!("{}.{}", self.resource, self.group)
        }
    }

    /// The values of the fields a field selector may use, for one object.
    pub fn field_values(&self, object: &serde_json::Value) -> BTreeMap<String, String> {
        if self.custom {
            let mut fields = BTreeMap::new();
            let metadata = &object["metadata"];
            fields.insert(
                "metadata.name".into(),
                metadata["name"].as_str().unwrap_or("").to_string(),
            );
            if self.namespaced {
                fields.insert(
                    "metadata.namespace".into(),
                    metadata["namespace"].as_str().unwrap_or("").to_string(),
                );
            }
            fields
        } else {
            crate::selector::field_values(&self.group, &self.resource, object)
        }
    }

    /// Parses an object as the store keeps it.
    ///
    /// # Errors
    /// The JSON is not an object with a name and resourceVersion.
    pub fn object(&self, json: Bytes) -> Result<Object, crate::store::ObjectError> {
        self.object_with(json, &self.paths())
    }

    /// What [`ResourceSpec::object`] reads of this resource's objects (look
    /// it up once for many objects).
    pub fn paths(&self) -> std::sync::Arc<crate::prune::Paths> {
        crate::prune::Paths::for_resource(&self.group, &self.resource, self.custom)
    }

    /// [`ResourceSpec::object`] with the resource's [`ResourceSpec::paths`] at hand.
    ///
    /// # Errors
    /// As [`ResourceSpec::object`].
    pub fn object_with(
        &self,
        json: Bytes,
        paths: &crate::prune::Paths,
    ) -> Result<Object, crate::store::ObjectError> {
        Object::from_json_pruned(json, !self.custom, paths, |value| self.field_values(value))
    }

    /// Whether the cache may keep this resource in protobuf: a built-in type
    /// whose selectable fields it knows how to read from the messages.
    pub fn protobuf_cacheable(&self) -> bool {
        self.speaks_protobuf == Some(true)
            && crate::protobuf::fields_known(&self.group, &self.version, &self.resource)
    }

    /// Parses an object's protobuf message as the store keeps it.
    ///
    /// # Errors
    /// The message is malformed or has no name and resourceVersion.
    pub fn protobuf_object(&self, message: Bytes) -> Result<Object, crate::store::ObjectError> {
        Object::from_protobuf(message, |m| {
            crate::protobuf::field_values(&self.group, &self.version, &self.resource, m)
        })
    }

    /// The `Accept` header of the reflector's requests.
    fn accept(encoding: Encoding) -> &'static str {
        match encoding {
            Encoding::Json => "application/json",
            Encoding::Protobuf => crate::protobuf::CONTENT_TYPE,
        }
    }
}

/// How the reflector paces itself.
#[derive(Debug, Clone)]
pub struct ReflectorConfig {
    /// Server-side timeout of each WATCH request (renewed when it ends).
    pub watch_timeout: Duration,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for ReflectorConfig {
    fn default() -> Self {
        ReflectorConfig {
            // client-go picks 5–10 minutes; a fixed 5 minutes keeps renewals rare.
            watch_timeout: Duration::from_secs(300),
            min_backoff: Duration::from_millis(200),
            // A restarted API server sees kache's watches again within
            // seconds (the watches kache serves wait for it meanwhile).
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// Keeps `store` in sync with the API server, in `encoding`, until the
/// future is dropped.
pub async fn run(
    client: Arc<dyn ApiClient>,
    spec: Arc<ResourceSpec>,
    store: Arc<Store>,
    config: ReflectorConfig,
    encoding: Encoding,
) {
    follow(client, spec, store, config, encoding, false).await;
}

/// [`run`] for a store restored from a snapshot (`Store::restore`): it
/// starts with a WATCH from the store's version instead of a LIST, and lists
/// only if that version is gone (`410`). The store stays unsynced until the
/// watch is established (see [`ESTABLISH_GRACE`]).
pub async fn resume(
    client: Arc<dyn ApiClient>,
    spec: Arc<ResourceSpec>,
    store: Arc<Store>,
    config: ReflectorConfig,
    encoding: Encoding,
) {
    follow(client, spec, store, config, encoding, true).await;
}

async fn follow(
    client: Arc<dyn ApiClient>,
    spec: Arc<ResourceSpec>,
    store: Arc<Store>,
    config: ReflectorConfig,
    encoding: Encoding,
    mut resuming: bool,
) {
    let mut backoff = config.min_backoff;
    loop {
        if !resuming {
            match list(client.as_ref(), &spec, encoding).await {
                Ok((objects, resource_version)) => {
                    tracing::debug!(resource = %spec.qualified_resource(), objects = objects.len(), resource_version, "listed");
                    store.replace(objects, resource_version);
                    backoff = config.min_backoff;
                }
                Err(ListError::Refused(status)) => {
                    // kache's credentials may not list this resource: waiting
                    // for a sync that cannot come would delay every read of it.
                    tracing::warn!(resource = %spec.qualified_resource(), %status, "not cached: the API server refuses kache's list; reads are forwarded");
                    store.refuse();
                    return;
                }
                Err(ListError::Failed(error)) => {
                    tracing::warn!(resource = %spec.qualified_resource(), %error, "list failed");
                    store.mark_unsynced();
                    tokio::time::sleep(jittered(backoff)).await;
                    backoff = (backoff * 2).min(config.max_backoff);
                    continue;
                }
            }
        }
        resuming = false;
        // Watch from the store's version until it is gone (or a relist is asked for).
        loop {
            let end = tokio::select! {
                end = watch(client.as_ref(), &spec, &store, &config, encoding) => end,
                () = store.relist_requested() => {
                    tracing::info!(resource = %spec.qualified_resource(), encoding = encoding.as_str(), "relisting on request");
                    WatchEnd::Expired
                }
            };
            match end {
                WatchEnd::Renew => {
                    store.mark_synced();
                    backoff = config.min_backoff;
                }
                WatchEnd::Expired => break,
                WatchEnd::Failed(error) => {
                    tracing::warn!(resource = %spec.qualified_resource(), %error, "watch failed");
                    store.mark_unsynced();
                    tokio::time::sleep(jittered(backoff)).await;
                    backoff = (backoff * 2).min(config.max_backoff);
                }
            }
        }
    }
}

/// How long a watch that answered `200` must stay quiet, or deliver a first
/// event, before the store counts as synced. The v1.20 API server answers a
/// watch from a version it no longer has with `200` and then, at once, an
/// ERROR event with code 410 (`cacher.go`, `newErrWatcher`): trusting the
/// `200` alone would let a store restored from an outdated snapshot answer
/// for a moment.
pub const ESTABLISH_GRACE: Duration = Duration::from_millis(500);

/// `401` or `403`: kache may not list the resource (a restricted service
/// account), which retrying will not change soon.
fn is_refusal(status: StatusCode) -> bool {
    status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN
}

/// Between half and all of `backoff`, so that the reflectors of many
/// resources, cut off together, do not come back in step.
fn jittered(backoff: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    backoff.mul_f64(0.5 + f64::from(nanos % 1000) / 2000.0)
}

#[derive(Deserialize)]
struct ListMeta {
    #[serde(default, rename = "resourceVersion")]
    resource_version: String,
}

/// A list's `metadata` (its items are read apart).
#[derive(Deserialize)]
struct ListHead {
    metadata: ListMeta,
}

/// Why a LIST gave no objects.
#[derive(Debug)]
enum ListError {
    /// `401`/`403`: kache may not list the resource.
    Refused(StatusCode),
    /// Anything else (unreachable, `5xx`, undecodable): worth retrying.
    Failed(FetchError),
}

impl From<FetchError> for ListError {
    fn from(error: FetchError) -> Self {
        ListError::Failed(error)
    }
}

/// LIST at `resourceVersion=0`: the objects (JSON with type meta, or
/// protobuf messages) and the list's version.
async fn list(
    client: &dyn ApiClient,
    spec: &ResourceSpec,
    encoding: Encoding,
) -> Result<(Vec<Object>, u64), ListError> {
    let request = Request::get(format!("{}?resourceVersion=0", spec.collection_path()))
        .header(header::ACCEPT, ResourceSpec::accept(encoding))
        .body(())
        .map_err(|e| FetchError(e.to_string()))?;
    let mut progress = ListProgress::new(spec, encoding);
    let mut reading = ListReading::new(spec, encoding);
    let response = client
        .fetch_each(request, &mut |chunk| {
            progress.received(&chunk);
            reading.feed(chunk)
        })
        .await?;
    progress.finished();
    if is_refusal(response.status()) {
        return Err(ListError::Refused(response.status()));
    }
    if response.status() != StatusCode::OK {
        return Err(ListError::Failed(FetchError(format!(
            "LIST {} answered {}",
            spec.collection_path(),
            response.status()
        ))));
    }
    Ok(reading.finish()?)
}

/// A LIST's body as it arrives: each item becomes an object as soon as it
/// is complete (see [`crate::list_stream`]), so the body is never held
/// whole. A body that is not a list (an error `Status`) is only reported by
/// [`ListReading::finish`], after the caller has looked at the status code.
enum ListReading<'a> {
    Json {
        spec: &'a ResourceSpec,
        splitter: crate::list_stream::JsonListSplitter,
        type_meta: String,
        paths: std::sync::Arc<crate::prune::Paths>,
        objects: Vec<Object>,
    },
    Protobuf {
        spec: &'a ResourceSpec,
        splitter: crate::list_stream::ProtobufListSplitter,
        objects: Vec<Object>,
        broken: Option<FetchError>,
    },
}

impl<'a> ListReading<'a> {
    fn new(spec: &'a ResourceSpec, encoding: Encoding) -> ListReading<'a> {
        match encoding {
            Encoding::Json => ListReading::Json {
                spec,
                splitter: crate::list_stream::JsonListSplitter::new(),
                type_meta: type_meta(spec),
                paths: spec.paths(),
                objects: Vec::new(),
            },
            Encoding::Protobuf => ListReading::Protobuf {
                spec,
                splitter: crate::list_stream::ProtobufListSplitter::new(),
                objects: Vec::new(),
                broken: None,
            },
        }
    }

    fn feed(&mut self, chunk: Bytes) -> Result<(), FetchError> {
        match self {
            ListReading::Json {
                spec,
                splitter,
                type_meta,
                paths,
                objects,
            } => splitter.feed(&chunk, |item| {
                let object = spec
                    .object_with(with_type_meta(type_meta, item), paths)
                    .map_err(|e| list_failed(spec, e))?;
                objects.push(object);
                Ok(())
            }),
            ListReading::Protobuf {
                spec,
                splitter,
                objects,
                broken,
            } => {
                if broken.is_some() {
                    return Ok(());
                }
                let read = splitter.feed(&chunk, |item| {
                    // Copied out, so a long-lived object does not keep the
                    // chunk it arrived in alive.
                    let object = spec
                        .protobuf_object(Bytes::copy_from_slice(&item))
                        .map_err(|e| list_failed(spec, e))?;
                    objects.push(object);
                    Ok::<(), FetchError>(())
                });
                if let Err(error) = read {
                    *broken = Some(error);
                }
                Ok(())
            }
        }
    }

    fn finish(self) -> Result<(Vec<Object>, u64), FetchError> {
        match self {
            ListReading::Json {
                spec,
                splitter,
                objects,
                ..
            } => {
                let rest: ListHead =
                    serde_json::from_slice(splitter.rest()).map_err(|e| list_failed(spec, e))?;
                let resource_version = parse_resource_version(&rest.metadata.resource_version)
                    .ok_or_else(|| list_failed(spec, "no resourceVersion"))?;
                Ok((objects, resource_version))
            }
            ListReading::Protobuf {
                spec,
                splitter,
                objects,
                broken,
            } => {
                if let Some(error) = broken {
                    return Err(error);
                }
                let meta = splitter.finish().map_err(|e| list_failed(spec, e))?;
                let mut list = Vec::with_capacity(meta.len() + 8);
                crate::protobuf::put_field(&mut list, 1, &meta);
                let (resource_version, _) =
                    crate::protobuf::list_items(&list).map_err(|e| list_failed(spec, e))?;
                let resource_version = parse_resource_version(&resource_version)
                    .ok_or_else(|| list_failed(spec, "no resourceVersion"))?;
                Ok((objects, resource_version))
            }
        }
    }
}

/// What went wrong reading the resource's LIST.
fn list_failed(spec: &ResourceSpec, error: impl std::fmt::Display) -> FetchError {
    FetchError(format!("LIST {}: {error}", spec.collection_path()))
}

/// `{"kind":…,"apiVersion":…,` of the resource's objects.
fn type_meta(spec: &ResourceSpec) -> String {
    format!(
        "{{\"kind\":{},\"apiVersion\":{},",
        serde_json::Value::from(spec.kind.as_str()),
        serde_json::Value::from(spec.api_version())
    )
}

/// A list item as a watch event or GET carries the object: built-in types'
/// list items come without type meta, which is put back.
fn with_type_meta(type_meta: &str, item: Bytes) -> Bytes {
    if !item.starts_with(b"{\"kind\":") && item.len() > 2 {
        let mut json = Vec::with_capacity(type_meta.len() + item.len());
        json.extend_from_slice(type_meta.as_bytes());
        json.extend_from_slice(&item[1..]);
        Bytes::from(json)
    } else {
        item
    }
}

/// A whole JSON list body (tests: the reflector reads lists as they stream).
#[cfg(test)]
pub(crate) fn json_list(spec: &ResourceSpec, body: &[u8]) -> Result<(Vec<Object>, u64), FetchError> {
    let mut reading = ListReading::new(spec, Encoding::Json);
    reading.feed(Bytes::copy_from_slice(body))?;
    reading.finish()
}

/// A whole protobuf list body (tests: the reflector reads lists as they stream).
#[cfg(test)]
pub(crate) fn protobuf_list(spec: &ResourceSpec, body: &[u8]) -> Result<(Vec<Object>, u64), FetchError> {
    let mut reading = ListReading::new(spec, Encoding::Protobuf);
    reading.feed(Bytes::copy_from_slice(body))?;
    reading.finish()
}

#[derive(Deserialize)]
struct RawEvent<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(borrow)]
    object: &'a RawValue,
}

pub(crate) enum WatchEnd {
    Renew,
    Expired,
    Failed(FetchError),
}

async fn watch(
    client: &dyn ApiClient,
    spec: &ResourceSpec,
    store: &Store,
    config: &ReflectorConfig,
    encoding: Encoding,
) -> WatchEnd {
    let uri = format!(
        "{}?allowWatchBookmarks=true&resourceVersion={}&timeoutSeconds={}&watch=true",
        spec.collection_path(),
        store.resource_version(),
        config.watch_timeout.as_secs().max(1)
    );
    let request = match Request::get(uri)
        .header(header::ACCEPT, ResourceSpec::accept(encoding))
        .body(())
    {
        Ok(request) => request,
        Err(e) => return WatchEnd::Failed(FetchError(e.to_string())),
    };
    let response = match client.stream(request).await {
        Ok(response) => response,
        Err(error) => return WatchEnd::Failed(error),
    };
    match response.status() {
        StatusCode::OK => {}
        StatusCode::GONE => return WatchEnd::Expired,
        status => return WatchEnd::Failed(FetchError(format!("WATCH answered {status}"))),
    }
    let mut body = response.into_body();
    let mut buffer: Vec<u8> = Vec::new();
    // Synced after the first whole event, or a quiet grace period: see ESTABLISH_GRACE.
    let mut established = false;
    let grace = tokio::time::sleep(ESTABLISH_GRACE);
    tokio::pin!(grace);
    loop {
        let chunk = if established {
            body.next().await
        } else {
            tokio::select! {
                chunk = body.next() => chunk,
                () = &mut grace => {
                    established = true;
                    store.mark_synced();
                    continue;
                }
            }
        };
        let Some(chunk) = chunk else { break };
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(error) => return WatchEnd::Failed(error),
        };
        buffer.extend_from_slice(&chunk);
        let consumed = match encoding {
            Encoding::Json => {
                let mut consumed = 0;
                while let Some(end) = buffer[consumed..].iter().position(|b| *b == b'\n') {
                    let line = &buffer[consumed..consumed + end];
                    consumed += end + 1;
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    if let Some(end) = apply_event(spec, store, line) {
                        return end;
                    }
                }
                consumed
            }
            Encoding::Protobuf => {
                let (frames, consumed) = crate::protobuf::split_frames(&buffer);
                for frame in frames {
                    if let Some(end) = apply_protobuf_event(spec, store, frame) {
                        return end;
                    }
                }
                consumed
            }
        };
        if consumed > 0 && !established {
            established = true;
            store.mark_synced();
        }
        buffer.drain(..consumed);
    }
    WatchEnd::Renew
}

/// Applies one watch event line; returns how the watch ends, if it does.
fn apply_event(spec: &ResourceSpec, store: &Store, line: &[u8]) -> Option<WatchEnd> {
    let event: RawEvent<'_> = match serde_json::from_slice(line) {
        Ok(event) => event,
        Err(e) => {
            return Some(WatchEnd::Failed(FetchError(format!(
                "undecodable watch event: {e}"
            ))))
        }
    };
    let object = Bytes::copy_from_slice(event.object.get().as_bytes());
    let kind = match event.kind {
        "ADDED" => EventType::Added,
        "MODIFIED" => EventType::Modified,
        "DELETED" => EventType::Deleted,
        "BOOKMARK" => {
            let value: serde_json::Value = serde_json::from_slice(&object).unwrap_or_default();
            if let Some(rv) = value["metadata"]["resourceVersion"]
                .as_str()
                .and_then(parse_resource_version)
            {
                store.progress(rv);
            }
            return None;
        }
        "ERROR" => {
            let status: serde_json::Value = serde_json::from_slice(&object).unwrap_or_default();
            if status["code"].as_u64() == Some(410) {
                return Some(WatchEnd::Expired);
            }
            return Some(WatchEnd::Failed(FetchError(format!(
                "watch error: {}",
                status["message"]
            ))));
        }
        other => {
            return Some(WatchEnd::Failed(FetchError(format!(
                "unknown watch event type {other:?}"
            ))))
        }
    };
    match spec.object(object) {
        Ok(object) => {
            store.apply(kind, object);
            None
        }
        Err(e) => Some(WatchEnd::Failed(FetchError(format!("watch event object: {e}")))),
    }
}

/// Applies one protobuf watch event (a frame without its length prefix);
/// returns how the watch ends, if it does.
pub(crate) fn apply_protobuf_event(spec: &ResourceSpec, store: &Store, frame: &[u8]) -> Option<WatchEnd> {
    let event = match crate::protobuf::watch_event(frame) {
        Ok(event) => event,
        Err(e) => {
            return Some(WatchEnd::Failed(FetchError(format!(
                "undecodable watch event: {e}"
            ))))
        }
    };
    let kind = match event.kind {
        b"ADDED" => EventType::Added,
        b"MODIFIED" => EventType::Modified,
        b"DELETED" => EventType::Deleted,
        b"BOOKMARK" => {
            let meta = crate::protobuf::object_meta(event.object.raw).unwrap_or_default();
            if let Some(rv) = parse_resource_version(&meta.resource_version) {
                store.remember_bookmark(Bytes::copy_from_slice(event.object.raw));
                store.progress(rv);
            }
            return None;
        }
        b"ERROR" => {
            let (code, message) = crate::protobuf::status(event.object.raw);
            if code == Some(410) {
                return Some(WatchEnd::Expired);
            }
            return Some(WatchEnd::Failed(FetchError(format!("watch error: {message}"))));
        }
        other => {
            return Some(WatchEnd::Failed(FetchError(format!(
                "unknown watch event type {:?}",
                String::from_utf8_lossy(other)
            ))))
        }
    };
    match spec.protobuf_object(Bytes::copy_from_slice(event.object.raw)) {
        Ok(object) => {
            store.apply(kind, object);
            None
        }
        Err(e) => Some(WatchEnd::Failed(FetchError(format!("watch event object: {e}")))),
    }
}

/// How often a LIST still arriving logs how far it got.
const LIST_PROGRESS_PERIOD: Duration = Duration::from_secs(5);

/// A LIST's progress as its body arrives: a long sync (a large resource, a
/// slow link) logs the objects received so far and the rate every
/// [`LIST_PROGRESS_PERIOD`], then its total; a quick one logs nothing.
struct ListProgress<'a> {
    spec: &'a ResourceSpec,
    encoding: Encoding,
    started: tokio::time::Instant,
    next_report: tokio::time::Instant,
    bytes: u64,
    items: ItemCounter,
    reported: bool,
}

/// What a progress line says.
#[derive(Debug, Clone, Copy, PartialEq)]
struct ListReport {
    objects: u64,
    bytes: u64,
    seconds: f64,
}

impl ListReport {
    fn objects_per_second(&self) -> u64 {
        if self.seconds > 0.0 {
            (self.objects as f64 / self.seconds).round() as u64
        } else {
            0
        }
    }

    fn mib(&self) -> String {
        format!("{:.1}", self.bytes as f64 / (1024.0 * 1024.0))
    }
}

impl<'a> ListProgress<'a> {
    fn new(spec: &'a ResourceSpec, encoding: Encoding) -> ListProgress<'a> {
        let now = tokio::time::Instant::now();
        ListProgress {
            spec,
            encoding,
            started: now,
            next_report: now + LIST_PROGRESS_PERIOD,
            bytes: 0,
            items: ItemCounter::new(encoding),
            reported: false,
        }
    }

    /// Counts a chunk of the body, logging the progress when a line is due.
    fn received(&mut self, chunk: &[u8]) {
        if let Some(report) = self.advance(chunk, tokio::time::Instant::now()) {
            tracing::info!(
                resource = %self.spec.qualified_resource(),
                encoding = self.encoding.as_str(),
                objects = report.objects,
                objects_per_second = report.objects_per_second(),
                mib = %report.mib(),
                seconds = report.seconds.round() as u64,
                "listing: objects received so far"
            );
        }
    }

    /// Counts a chunk; the report due at `now`, if one is.
    fn advance(&mut self, chunk: &[u8], now: tokio::time::Instant) -> Option<ListReport> {
        self.bytes += chunk.len() as u64;
        self.items.feed(chunk);
        if now < self.next_report {
            return None;
        }
        self.next_report = now + LIST_PROGRESS_PERIOD;
        self.reported = true;
        Some(self.report(now))
    }

    fn report(&self, now: tokio::time::Instant) -> ListReport {
        ListReport {
            objects: self.items.items(),
            bytes: self.bytes,
            seconds: now.duration_since(self.started).as_secs_f64(),
        }
    }

    /// The body is complete: a LIST that logged its progress logs its total.
    fn finished(&self) {
        if self.reported {
            let report = self.report(tokio::time::Instant::now());
            tracing::info!(
                resource = %self.spec.qualified_resource(),
                encoding = self.encoding.as_str(),
                objects = report.objects,
                objects_per_second = report.objects_per_second(),
                mib = %report.mib(),
                seconds = report.seconds.round() as u64,
                "listing: all objects received"
            );
        }
    }
}

/// Counts a list's items as its body arrives, without parsing it.
///
/// JSON: the objects opening directly in an array that is a member of the
/// top-level object (a List's only such array is `items`). Protobuf: the
/// `items` fields (2) of the list message held in the `raw` field (2) of
/// the `runtime.Unknown` envelope that follows the `k8s\0` magic.
enum ItemCounter {
    Json {
        depth: u32,
        in_string: bool,
        escaped: bool,
        /// Whether the container open at depth 2 is an array.
        array_at_2: bool,
        items: u64,
    },
    Protobuf {
        state: Wire,
        /// Bytes left of the list message, while inside it.
        inner_left: Option<u64>,
        items: u64,
    },
}

/// Where a protobuf reader is in the wire format.
#[derive(Debug, Clone, Copy)]
enum Wire {
    /// Bytes of the magic number read so far.
    Magic(u8),
    /// A field's key (a varint), partly read.
    Key { value: u64, shift: u32 },
    /// A varint field's value.
    Varint,
    /// A length-delimited field's length, partly read.
    Length { field: u64, value: u64, shift: u32 },
    /// Bytes to pass over.
    Skip(u64),
    /// Not a list this reader understands: it stops counting.
    Lost,
}

impl ItemCounter {
    fn new(encoding: Encoding) -> ItemCounter {
        match encoding {
            Encoding::Json => ItemCounter::Json {
                depth: 0,
                in_string: false,
                escaped: false,
                array_at_2: false,
                items: 0,
            },
            Encoding::Protobuf => ItemCounter::Protobuf {
                state: Wire::Magic(0),
                inner_left: None,
                items: 0,
            },
        }
    }

    fn items(&self) -> u64 {
        match self {
            ItemCounter::Json { items, .. } | ItemCounter::Protobuf { items, .. } => *items,
        }
    }

    fn feed(&mut self, chunk: &[u8]) {
        match self {
            ItemCounter::Json {
                depth,
                in_string,
                escaped,
                array_at_2,
                items,
            } => {
                for &b in chunk {
                    if *in_string {
                        if *escaped {
                            *escaped = false;
                        } else if b == b'\\' {
                            *escaped = true;
                        } else if b == b'"' {
                            *in_string = false;
                        }
                        continue;
                    }
                    match b {
                        b'"' => *in_string = true,
                        b'{' | b'[' => {
                            if *depth == 1 {
                                *array_at_2 = b == b'[';
                            } else if *depth == 2 && *array_at_2 && b == b'{' {
                                *items += 1;
                            }
                            *depth += 1;
                        }
                        b'}' | b']' => *depth = depth.saturating_sub(1),
                        _ => {}
                    }
                }
            }
            ItemCounter::Protobuf {
                state,
                inner_left,
                items,
            } => {
                // Bytes read inside the list message count down its length.
                let consumed = |inner_left: &mut Option<u64>, n: u64| {
                    if let Some(left) = inner_left {
                        *left = left.saturating_sub(n);
                        if *left == 0 {
                            *inner_left = None;
                        }
                    }
                };
                let mut i = 0;
                while i < chunk.len() {
                    match *state {
                        Wire::Lost => return,
                        Wire::Magic(read) => {
                            let take = (4 - usize::from(read)).min(chunk.len() - i);
                            if chunk[i..i + take] != crate::protobuf::MAGIC[usize::from(read)..][..take] {
                                *state = Wire::Lost;
                                return;
                            }
                            i += take;
                            let read = read + take as u8;
                            *state = if read == 4 {
                                Wire::Key { value: 0, shift: 0 }
                            } else {
                                Wire::Magic(read)
                            };
                        }
                        Wire::Skip(n) => {
                            let take = n.min((chunk.len() - i) as u64);
                            i += take as usize;
                            consumed(inner_left, take);
                            *state = if take == n {
                                Wire::Key { value: 0, shift: 0 }
                            } else {
                                Wire::Skip(n - take)
                            };
                        }
                        Wire::Varint => {
                            let b = chunk[i];
                            i += 1;
                            consumed(inner_left, 1);
                            if b & 0x80 == 0 {
                                *state = Wire::Key { value: 0, shift: 0 };
                            }
                        }
                        Wire::Key { value, shift } | Wire::Length { value, shift, .. } => {
                            let b = chunk[i];
                            i += 1;
                            consumed(inner_left, 1);
                            let value = value | (u64::from(b & 0x7f) << shift);
                            if b & 0x80 != 0 {
                                *state = match (*state, shift + 7) {
                                    (_, shift) if shift > 63 => Wire::Lost,
                                    (Wire::Length { field, .. }, shift) => {
                                        Wire::Length { field, value, shift }
                                    }
                                    (_, shift) => Wire::Key { value, shift },
                                };
                                continue;
                            }
                            *state = match *state {
                                Wire::Length { field, .. } => {
                                    if inner_left.is_none() && field == 2 {
                                        // The envelope's `raw`: the list message.
                                        *inner_left = (value > 0).then_some(value);
                                        Wire::Key { value: 0, shift: 0 }
                                    } else {
                                        if inner_left.is_some() && field == 2 {
                                            *items += 1;
                                        }
                                        if value == 0 {
                                            Wire::Key { value: 0, shift: 0 }
                                        } else {
                                            Wire::Skip(value)
                                        }
                                    }
                                }
                                _ => match value & 7 {
                                    0 => Wire::Varint,
                                    1 => Wire::Skip(8),
                                    2 => Wire::Length {
                                        field: value >> 3,
                                        value: 0,
                                        shift: 0,
                                    },
                                    5 => Wire::Skip(4),
                                    _ => Wire::Lost,
                                },
                            };
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use http::Response;
    use tokio::sync::mpsc;

    use super::*;
    use crate::store::Notice;
    use crate::upstream::{BoxFuture, ByteStream};

    /// Answers LISTs with the next of `lists`; the first WATCH streams what
    /// the test sends, later ones stay quiet.
    struct Fake {
        lists: Mutex<Vec<String>>,
        first_watch: Mutex<Option<mpsc::UnboundedReceiver<Bytes>>>,
    }

    impl ApiClient for Fake {
        fn fetch(&self, _: Request<()>) -> BoxFuture<'_, Result<Response<Bytes>, FetchError>> {
            let mut lists = self.lists.lock().expect("lock");
            let body = if lists.is_empty() {
                None
            } else {
                Some(lists.remove(0))
            };
            Box::pin(async move {
                match body {
                    Some(body) => Ok(Response::new(Bytes::from(body))),
                    None => futures::future::pending().await,
                }
            })
        }

        fn stream(&self, _: Request<()>) -> BoxFuture<'_, Result<Response<ByteStream>, FetchError>> {
            let lines = self.first_watch.lock().expect("lock").take();
            Box::pin(async move {
                let body: ByteStream = match lines {
                    Some(lines) => Box::pin(futures::stream::unfold(lines, |mut lines| async move {
                        lines.recv().await.map(|line| (Ok(line), lines))
                    })),
                    None => Box::pin(futures::stream::pending()),
                };
                Ok(Response::new(body))
            })
        }
    }

    fn cm(name: &str, rv: u64) -> String {
        format!(r#"{{"metadata":{{"name":"{name}","namespace":"a","resourceVersion":"{rv}"}}}}"#)
    }

    #[tokio::test]
    async fn after_410_the_relist_reaches_watchers_as_events() {
        let first = format!(
            r#"{{"metadata":{{"resourceVersion":"5"}},"items":[{},{}]}}"#,
            cm("a", 2),
            cm("b", 3)
        );
        let second = format!(
            r#"{{"metadata":{{"resourceVersion":"10"}},"items":[{},{}]}}"#,
            cm("a", 8),
            cm("c", 9)
        );
        let (lines, first_watch) = mpsc::unbounded_channel();
        let client = Arc::new(Fake {
            lists: Mutex::new(vec![first, second]),
            first_watch: Mutex::new(Some(first_watch)),
        });
        let spec = Arc::new(ResourceSpec {
            group: String::new(),
            version: "v1".into(),
            resource: "configmaps".into(),
            kind: "ConfigMap".into(),
            namespaced: true,
            custom: false,
            speaks_protobuf: Some(true),
        });
        let store = Arc::new(Store::new(100, 100));
        let reflector = tokio::spawn(run(
            client,
            spec,
            store.clone(),
            ReflectorConfig::default(),
            Encoding::Json,
        ));
        assert!(store.wait_for(5, Duration::from_secs(5)).await);
        let mut watcher = store.watch_from(5, None).expect("watch");
        lines
            .send(Bytes::from_static(
                b"{\"type\":\"ERROR\",\"object\":{\"kind\":\"Status\",\"apiVersion\":\"v1\",\"status\":\"Failure\",\"reason\":\"Expired\",\"code\":410}}\n",
            ))
            .expect("send");
        let notice = tokio::time::timeout(Duration::from_secs(5), watcher.feed.recv())
            .await
            .expect("in time")
            .expect("open");
        let Notice::Relisted {
            events,
            resource_version,
        } = notice
        else {
            panic!("the watcher was not told the relist: {notice:?}");
        };
        let summary: Vec<_> = events
            .iter()
            .map(|e| (e.kind.as_str(), e.object.name.as_str(), e.resource_version))
            .collect();
        assert_eq!(
            (summary, resource_version),
            (
                vec![("MODIFIED", "a", 8), ("ADDED", "c", 9), ("DELETED", "b", 10)],
                10
            )
        );
        reflector.abort();
    }

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{}/testdata/protobuf/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn core_spec(resource: &str, kind: &str, namespaced: bool) -> ResourceSpec {
        ResourceSpec {
            group: String::new(),
            version: "v1".into(),
            resource: resource.into(),
            kind: kind.into(),
            namespaced,
            custom: false,
            speaks_protobuf: Some(true),
        }
    }

    #[test]
    fn list_items_are_counted_as_the_body_arrives_whatever_its_chunks() {
        for (resource, kind, namespaced) in [
            ("configmaps", "ConfigMap", true),
            ("pods", "Pod", true),
            ("secrets", "Secret", true),
            ("namespaces", "Namespace", false),
        ] {
            let spec = core_spec(resource, kind, namespaced);
            let json = fixture(&format!("{resource}.json"));
            let pb = fixture(&format!("{resource}.pb"));
            let expected = json_list(&spec, &json).expect("json list").0.len() as u64;
            assert!(expected > 0, "{resource}: an empty fixture proves nothing");
            assert_eq!(
                protobuf_list(&spec, &pb).expect("protobuf list").0.len() as u64,
                expected
            );
            for (encoding, body) in [(Encoding::Json, &json), (Encoding::Protobuf, &pb)] {
                for size in [1, 2, 3, 5, 64, 1000, body.len()] {
                    let mut counter = ItemCounter::new(encoding);
                    for chunk in body.chunks(size) {
                        counter.feed(chunk);
                    }
                    assert_eq!(
                        counter.items(),
                        expected,
                        "{resource} in {} by chunks of {size}",
                        encoding.as_str()
                    );
                }
            }
        }
    }

    #[test]
    fn json_items_are_counted_past_strings_that_look_like_structure() {
        let body = br#"{"kind":"ConfigMapList","metadata":{"resourceVersion":"3","x":[{"not":"an item"}]},"items":[{"data":{"k":"}]{[\"{\\"}},{"metadata":{"name":"b","list":[{"c":1}]}},{}]}"#;
        let mut counter = ItemCounter::new(Encoding::Json);
        counter.feed(body);
        assert_eq!(counter.items(), 3);
        let mut lost = ItemCounter::new(Encoding::Protobuf);
        lost.feed(b"{\"items\":[{}]}");
        assert_eq!(lost.items(), 0, "not protobuf: nothing counted");
    }

    /// An API server whose LIST sends one object a second.
    struct SlowList {
        objects: usize,
    }

    impl SlowList {
        fn chunks(&self) -> Vec<String> {
            let mut chunks = vec![
                r#"{"kind":"ConfigMapList","apiVersion":"v1","metadata":{"resourceVersion":"99"},"items":["#
                    .to_string(),
            ];
            for n in 0..self.objects {
                let comma = if n == 0 { "" } else { "," };
                chunks.push(format!(
                    r#"{comma}{{"metadata":{{"name":"cm-{n}","namespace":"a","resourceVersion":"{}"}}}}"#,
                    n + 1
                ));
            }
            chunks.push("]}".into());
            chunks
        }
    }

    impl ApiClient for SlowList {
        fn fetch(&self, _: Request<()>) -> BoxFuture<'_, Result<Response<Bytes>, FetchError>> {
            let body = Bytes::from(self.chunks().concat());
            Box::pin(async move { Ok(Response::new(body)) })
        }

        fn fetch_each<'a>(
            &'a self,
            _: Request<()>,
            consume: &'a mut (dyn FnMut(Bytes) -> Result<(), FetchError> + Send),
        ) -> BoxFuture<'a, Result<Response<()>, FetchError>> {
            Box::pin(async move {
                for chunk in self.chunks() {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    consume(Bytes::from(chunk))?;
                }
                Ok(Response::new(()))
            })
        }

        fn stream(&self, _: Request<()>) -> BoxFuture<'_, Result<Response<ByteStream>, FetchError>> {
            Box::pin(futures::future::pending())
        }
    }

    /// Keeps the message and fields of every event logged.
    struct Capture(Arc<Mutex<Vec<String>>>);

    impl tracing::Subscriber for Capture {
        fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, event: &tracing::Event<'_>) {
            struct Fields(String);
            impl tracing::field::Visit for Fields {
                fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                    self.0.push_str(&format!("{}={value:?} ", field.name()));
                }
            }
            let mut fields = Fields(String::new());
            event.record(&mut fields);
            self.0.lock().expect("lock").push(fields.0);
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_list_logs_the_objects_received_and_the_rate_every_few_seconds() {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let _logging = tracing::subscriber::set_default(Capture(lines.clone()));
        let spec = core_spec("configmaps", "ConfigMap", true);
        let client = SlowList { objects: 12 };
        let Ok((objects, resource_version)) = list(&client, &spec, Encoding::Json).await else {
            panic!("the list failed");
        };
        assert_eq!((objects.len(), resource_version), (12, 99));
        let logged: Vec<String> = lines
            .lock()
            .expect("lock")
            .iter()
            .filter(|line| line.contains("listing"))
            .cloned()
            .collect();
        // The header at 1 s, an object a second from 2 s, the end at 14 s.
        let expected = [
            ("so far", 4, 5, 1),
            ("so far", 9, 10, 1),
            ("all objects received", 12, 14, 1),
        ];
        assert_eq!(logged.len(), expected.len(), "{logged:#?}");
        for (line, (message, objects, seconds, rate)) in logged.iter().zip(expected) {
            for field in [
                message.to_string(),
                format!("objects={objects} "),
                format!("seconds={seconds} "),
                format!("objects_per_second={rate} "),
                "resource=configmaps ".to_string(),
            ] {
                assert!(line.contains(&field), "{field} not in {line}");
            }
        }
        // A quick list says nothing.
        lines.lock().expect("lock").clear();
        let quick = SlowList { objects: 2 };
        assert!(list(&quick, &spec, Encoding::Json).await.is_ok());
        assert!(
            !lines.lock().expect("lock").iter().any(|l| l.contains("listing")),
            "{:?}",
            lines.lock().expect("lock")
        );
    }

    #[test]
    fn a_long_list_reports_its_progress_every_period() {
        let spec = core_spec("configmaps", "ConfigMap", true);
        let mut progress = ListProgress::new(&spec, Encoding::Json);
        let start = progress.started;
        let mut reports = Vec::new();
        let header = br#"{"kind":"ConfigMapList","metadata":{"resourceVersion":"9"},"items":["#;
        assert_eq!(progress.advance(header, start), None);
        // One object every 200 ms, for 10 seconds.
        for n in 1..=50u64 {
            let item = format!(
                r#"{}{{"metadata":{{"name":"cm-{n}"}}}}"#,
                if n == 1 { "" } else { "," }
            );
            let at = start + Duration::from_millis(200 * n);
            reports.extend(progress.advance(item.as_bytes(), at));
        }
        assert_eq!(
            progress.advance(b"]}", start + Duration::from_millis(10_100)),
            None
        );
        let seen: Vec<_> = reports
            .iter()
            .map(|r| (r.objects, r.seconds, r.objects_per_second()))
            .collect();
        assert_eq!(seen, [(25, 5.0, 5), (50, 10.0, 5)]);
        assert!(progress.reported, "the total is logged too");
        assert!(reports[1].bytes > reports[0].bytes);
        let quick = ListProgress::new(&spec, Encoding::Json);
        assert!(!quick.reported, "a quick list logs nothing");
    }
}
