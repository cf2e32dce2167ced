//! Which reads the cache may answer, and their answers: LIST and GET as the
//! API server's watch cache renders them, WATCH as a stream of events from
//! the store, filtered per watcher.
//!
//! The rules mirror the v1.20 cacher (`storage/cacher/cacher.go`): a read
//! with no `resourceVersion` is a consistent (etcd) read, and so are `Exact`,
//! `continue`, and `limit` with a version other than `0`; those are never
//! answered here. Anything the cache cannot render exactly (tables, partial
//! metadata, YAML, pretty JSON, unknown parameters) is forwarded too.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use tokio::sync::{broadcast, mpsc};

use crate::reflector::ResourceSpec;
use crate::request::{RequestInfo, Verb};
use crate::selector::{FieldSelector, LabelSelector};
use crate::store::{parse_resource_version, Event, EventType, Notice, Object, Store, TooOld};
use crate::upstream::{ByteStream, FetchError};

/// Why a read is forwarded rather than answered from the cache (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Bypass {
    NotARead,
    Subresource,
    ConsistentRead,
    Exact,
    Continue,
    Limit,
    InvalidResourceVersion,
    Parameters,
    Encoding,
    BadSelector,
    UnsupportedField,
    NotCacheable,
    NotSynced,
    NotFresh,
    TooOld,
    OverBudget,
    Disabled,
}

impl Bypass {
    pub fn as_str(self) -> &'static str {
        match self {
            Bypass::NotARead => "not_a_read",
            Bypass::Subresource => "subresource",
            Bypass::ConsistentRead => "consistent_read",
            Bypass::Exact => "exact",
            Bypass::Continue => "continue",
            Bypass::Limit => "limit",
            Bypass::InvalidResourceVersion => "invalid_resource_version",
            Bypass::Parameters => "parameters",
            Bypass::Encoding => "encoding",
            Bypass::BadSelector => "bad_selector",
            Bypass::UnsupportedField => "unsupported_field",
            Bypass::NotCacheable => "not_cacheable",
            Bypass::NotSynced => "not_synced",
            Bypass::NotFresh => "not_fresh",
            Bypass::TooOld => "too_old",
            Bypass::OverBudget => "over_budget",
            Bypass::Disabled => "disabled",
        }
    }
}

/// What the read asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadKind {
    Get {
        name: String,
    },
    List,
    Watch {
        bookmarks: bool,
        timeout: Option<Duration>,
    },
}

/// The version a read may be answered at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MinVersion {
    /// `resourceVersion=0`: any state.
    Any,
    /// `resourceVersion=N` (not older than N); for a watch, events after N.
    AtLeast(u64),
}

/// A read the cache may answer.
#[derive(Debug, Clone)]
pub struct ReadPlan {
    pub kind: ReadKind,
    /// Empty for cluster-wide reads.
    pub namespace: String,
    pub label: LabelSelector,
    pub field: FieldSelector,
    pub version: MinVersion,
}

/// Query parameters a cached answer honours (or, like `limit` at version 0,
/// ignores exactly as the API server does).
const KNOWN_PARAMETERS: &[&str] = &[
    "resourceVersion",
    "resourceVersionMatch",
    "labelSelector",
    "fieldSelector",
    "limit",
    "timeout",
    "timeoutSeconds",
    "allowWatchBookmarks",
    "watch",
    "continue",
];

/// Decides whether a resource read may be answered from the cache.
///
/// # Errors
/// The reason it may not.
pub fn plan(info: &RequestInfo, query: Option<&str>, headers: &HeaderMap) -> Result<ReadPlan, Bypass> {
    if !info.is_resource_request {
        return Err(Bypass::NotARead);
    }
    if !info.subresource.is_empty() {
        return Err(Bypass::Subresource);
    }
    let read = &info.read;
    for (key, _) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        if !KNOWN_PARAMETERS.contains(&key.as_ref()) {
            return Err(Bypass::Parameters);
        }
    }
    if !accepts_plain_json(headers) {
        return Err(Bypass::Encoding);
    }
    let kind = match info.verb() {
        Verb::Get => ReadKind::Get {
            name: info.name.clone(),
        },
        Verb::List => ReadKind::List,
        Verb::Watch if !info.name.is_empty() => return Err(Bypass::Parameters),
        Verb::Watch => ReadKind::Watch {
            bookmarks: read.allow_watch_bookmarks,
            timeout: read
                .timeout_seconds
                .as_deref()
                .and_then(|t| t.parse::<u64>().ok())
                .filter(|t| *t > 0)
                .map(Duration::from_secs),
        },
        _ => return Err(Bypass::NotARead),
    };
    let version = match (
        read.resource_version.as_deref(),
        read.resource_version_match.as_deref(),
    ) {
        (None | Some(""), _) => return Err(Bypass::ConsistentRead),
        (_, Some("Exact")) => return Err(Bypass::Exact),
        (_, Some(m)) if m != "NotOlderThan" => return Err(Bypass::Parameters),
        (Some("0"), _) => MinVersion::Any,
        (Some(rv), _) => {
            MinVersion::AtLeast(parse_resource_version(rv).ok_or(Bypass::InvalidResourceVersion)?)
        }
    };
    if read.continue_token.as_deref().is_some_and(|c| !c.is_empty()) {
        return Err(Bypass::Continue);
    }
    let limited = read.limit.as_deref().is_some_and(|l| !l.is_empty() && l != "0");
    if limited && version != MinVersion::Any && !matches!(kind, ReadKind::Watch { .. }) {
        return Err(Bypass::Limit);
    }
    let label = LabelSelector::parse(read.label_selector.as_deref().unwrap_or(""))
        .map_err(|_| Bypass::BadSelector)?;
    let field = FieldSelector::parse(read.field_selector.as_deref().unwrap_or(""))
        .map_err(|_| Bypass::BadSelector)?;
    Ok(ReadPlan {
        kind,
        namespace: info.namespace.clone(),
        label,
        field,
        version,
    })
}

/// Whether the client takes plain JSON: no `Accept`, `*/*`, `application/*`
/// or `application/json` (parameters other than charset — `as=Table`,
/// `as=PartialObjectMetadataList` — ask for another rendering), first
/// acceptable type winning as in the API server's negotiation.
fn accepts_plain_json(headers: &HeaderMap) -> bool {
    let Some(accept) = headers.get(header::ACCEPT) else {
        return true;
    };
    let Ok(accept) = accept.to_str() else { return false };
    if accept.trim().is_empty() {
        return true;
    }
    for range in accept.split(',') {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or("").to_ascii_lowercase();
        let params: Vec<&str> = parts.filter(|p| !p.is_empty()).collect();
        let plain = params.iter().all(|p| {
            let name = p.split('=').next().unwrap_or("").trim().to_ascii_lowercase();
            name == "charset" || name == "q"
        });
        let zero_quality = params
            .iter()
            .any(|p| p.replace(' ', "").eq_ignore_ascii_case("q=0"));
        if zero_quality {
            continue;
        }
        match media.as_str() {
            "application/json" | "*/*" | "application/*" => return plain,
            // Another encoding the API server would pick first.
            "application/vnd.kubernetes.protobuf"
            | "application/yaml"
            | "application/vnd.kubernetes.protobuf;stream=watch" => return false,
            _ => continue,
        }
    }
    false
}

/// Whether every field of the selector is one the resource supports.
pub fn fields_supported(field: &FieldSelector, spec: &ResourceSpec) -> bool {
    let supported: &[&str] = if spec.custom {
        crate::selector::custom_resource_fields(spec.namespaced)
    } else {
        crate::selector::supported_fields(&spec.group, &spec.resource)
            .unwrap_or_else(|| crate::selector::custom_resource_fields(spec.namespaced))
    };
    field.fields().all(|f| supported.contains(&f))
}

fn matches(plan: &ReadPlan, object: &Object) -> bool {
    plan.label.matches(&object.labels) && plan.field.matches(&object.fields)
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Bytes> {
    let mut response = Response::new(Bytes::from(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, private"),
    );
    response
}

/// The API server's answer to a LIST at the store's current state.
pub fn list(plan: &ReadPlan, spec: &ResourceSpec, store: &Store) -> Response<Bytes> {
    let namespace = (!plan.namespace.is_empty()).then_some(plan.namespace.as_str());
    let snapshot = store.snapshot(namespace, |o| matches(plan, o));
    let size: usize = snapshot.objects.iter().map(|o| o.json().len() + 1).sum();
    let mut body = Vec::with_capacity(size + 160);
    body.extend_from_slice(b"{\"kind\":");
    write_json_string(&mut body, &format!("{}List", spec.kind));
    body.extend_from_slice(b",\"apiVersion\":");
    write_json_string(&mut body, &spec.api_version());
    body.extend_from_slice(b",\"metadata\":{\"resourceVersion\":\"");
    body.extend_from_slice(snapshot.resource_version.to_string().as_bytes());
    body.extend_from_slice(b"\"},\"items\":[");
    for (i, object) in snapshot.objects.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        object.write_item(&mut body);
    }
    body.extend_from_slice(b"]}\n");
    json_response(StatusCode::OK, body)
}

/// The API server's answer to a GET: the object, or its `NotFound` Status.
pub fn get(name: &str, plan: &ReadPlan, spec: &ResourceSpec, store: &Store) -> Response<Bytes> {
    match store.get(&plan.namespace, name).0 {
        Some(object) => {
            let mut body = object.json().to_vec();
            body.push(b'\n');
            json_response(StatusCode::OK, body)
        }
        None => not_found(name, spec),
    }
}

fn not_found(name: &str, spec: &ResourceSpec) -> Response<Bytes> {
    let mut details = serde_json::json!({ "name": name, "kind": spec.resource });
    if !spec.group.is_empty() {
        details["group"] = serde_json::Value::from(spec.group.as_str());
    }
    let status = serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": format!("{} \"{}\" not found", spec.qualified_resource(), name),
        "reason": "NotFound",
        "details": details,
        "code": 404,
    });
    let mut body = serde_json::to_vec(&status).expect("invariant: a Status serializes");
    body.push(b'\n');
    json_response(StatusCode::NOT_FOUND, body)
}

fn write_json_string(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(&mut *out, s).expect("invariant: writing to a Vec cannot fail");
}

/// Settings of watches served from the cache.
#[derive(Debug, Clone)]
pub struct WatchSettings {
    /// How often a watcher that asked for bookmarks gets one.
    pub bookmark_interval: Duration,
    /// Frames buffered per watcher before it is considered slow.
    pub buffer: usize,
    /// A watch without `timeoutSeconds` ends after this (plus jitter), as the
    /// API server ends it after its minimum request timeout.
    pub default_timeout: Duration,
}

impl Default for WatchSettings {
    fn default() -> Self {
        WatchSettings {
            bookmark_interval: Duration::from_secs(60),
            buffer: 256,
            default_timeout: Duration::from_secs(1800),
        }
    }
}

/// Starts a watch served from the store. `on_end` runs when the watch ends
/// (client gone, timeout, too slow, store reset).
///
/// # Errors
/// The requested version is older than the retained events.
pub fn watch(
    plan: ReadPlan,
    spec: Arc<ResourceSpec>,
    store: Arc<Store>,
    settings: &WatchSettings,
    on_end: impl FnOnce() + Send + 'static,
) -> Result<Response<ByteStream>, TooOld> {
    let (bookmarks, timeout) = match &plan.kind {
        ReadKind::Watch { bookmarks, timeout } => (*bookmarks, *timeout),
        _ => (false, None),
    };
    let from = match plan.version {
        MinVersion::Any => 0,
        MinVersion::AtLeast(rv) => rv,
    };
    let start = store.watch_from(from)?;
    let timeout = timeout.unwrap_or_else(|| jittered(settings.default_timeout));
    let (tx, rx) = mpsc::channel::<Result<Bytes, FetchError>>(settings.buffer.max(1));
    let interval = settings.bookmark_interval;
    tokio::spawn(async move {
        let _guard = OnEnd(Some(on_end));
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        let mut last_sent = start.resource_version;
        for event in &start.initial {
            if let Some(frame) = frame_for(&plan, event) {
                if tx.send(Ok(frame)).await.is_err() {
                    return;
                }
            }
        }
        let mut feed = start.feed;
        loop {
            tokio::select! {
                notice = feed.recv() => match notice {
                    Ok(Notice::Event(event)) => {
                        last_sent = event.resource_version;
                        if let Some(frame) = frame_for(&plan, &event) {
                            if !deliver(&tx, frame, &feed, store.backlog()).await {
                                return;
                            }
                        }
                    }
                    Ok(Notice::Progress(_)) => {}
                    // Rebuilt store, or this watcher fell too far behind: end
                    // the watch; the client resumes or relists.
                    Ok(Notice::Reset) | Err(broadcast::error::RecvError::Lagged(_)) | Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = ticker.tick(), if bookmarks => {
                    let rv = store.resource_version().max(last_sent);
                    if tx.send(Ok(bookmark(&spec, rv))).await.is_err() {
                        return;
                    }
                }
                () = &mut deadline => return,
                () = tx.closed() => return,
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    let mut response = Response::new(Box::pin(stream) as ByteStream);
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, private"),
    );
    Ok(response)
}

/// Sends a live frame to the client, or gives up on a client that stopped
/// reading: once the events waiting for it fill its share of the broadcast,
/// it has fallen too far behind and its watch ends (the client relists).
async fn deliver(
    tx: &mpsc::Sender<Result<Bytes, FetchError>>,
    frame: Bytes,
    feed: &broadcast::Receiver<Notice>,
    backlog: usize,
) -> bool {
    let mut frame = Some(frame);
    loop {
        tokio::select! {
            permit = tx.reserve() => {
                return match (permit, frame.take()) {
                    (Ok(permit), Some(frame)) => {
                        permit.send(Ok(frame));
                        true
                    }
                    _ => false,
                };
            }
            () = tokio::time::sleep(SLOW_CHECK) => {
                if feed.len() >= backlog {
                    return false;
                }
            }
        }
    }
}

/// How often a blocked delivery checks whether its watcher fell behind.
const SLOW_CHECK: Duration = Duration::from_millis(100);

struct OnEnd<F: FnOnce()>(Option<F>);

impl<F: FnOnce()> Drop for OnEnd<F> {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

fn jittered(base: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    base + base.mul_f64(f64::from(nanos % 1000) / 1000.0)
}

/// The frame a watcher gets for an event, if any, with the API server's
/// selector transitions: an object that starts matching is ADDED, one that
/// stops matching is DELETED (its previous state at the event's version).
fn frame_for(plan: &ReadPlan, event: &Event) -> Option<Bytes> {
    let in_scope = |o: &Object| plan.namespace.is_empty() || o.namespace == plan.namespace;
    if !in_scope(&event.object) {
        return None;
    }
    let now = event.kind != EventType::Deleted && matches(plan, &event.object);
    let before = event.prev.as_deref().is_some_and(|prev| matches(plan, prev));
    match (event.kind, now, before) {
        (EventType::Deleted, _, _) => {
            let passes = event
                .prev
                .as_deref()
                .map_or_else(|| matches(plan, &event.object), |prev| matches(plan, prev));
            passes.then(|| event_frame("DELETED", event.object.json()))
        }
        (_, true, false) => Some(event_frame("ADDED", event.object.json())),
        (_, true, true) => Some(event_frame("MODIFIED", event.object.json())),
        (_, false, true) => {
            let prev = event.prev.as_deref()?;
            Some(event_frame(
                "DELETED",
                &with_resource_version(prev.json(), event.resource_version),
            ))
        }
        (_, false, false) => None,
    }
}

fn event_frame(kind: &str, object: &[u8]) -> Bytes {
    let mut frame = Vec::with_capacity(object.len() + 32);
    frame.extend_from_slice(b"{\"type\":\"");
    frame.extend_from_slice(kind.as_bytes());
    frame.extend_from_slice(b"\",\"object\":");
    frame.extend_from_slice(object);
    frame.extend_from_slice(b"}\n");
    Bytes::from(frame)
}

fn with_resource_version(json: &[u8], resource_version: u64) -> Bytes {
    match serde_json::from_slice::<serde_json::Value>(json) {
        Ok(mut value) => {
            value["metadata"]["resourceVersion"] = serde_json::Value::from(resource_version.to_string());
            Bytes::from(serde_json::to_vec(&value).expect("invariant: a Value serializes"))
        }
        Err(_) => Bytes::copy_from_slice(json),
    }
}

fn bookmark(spec: &ResourceSpec, resource_version: u64) -> Bytes {
    let object = serde_json::json!({
        "kind": spec.kind,
        "apiVersion": spec.api_version(),
        "metadata": {"resourceVersion": resource_version.to_string(), "creationTimestamp": null},
    });
    event_frame(
        "BOOKMARK",
        &serde_json::to_vec(&object).expect("invariant: a Value serializes"),
    )
}

#[cfg(test)]
mod tests;
