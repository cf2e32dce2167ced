//! One resource's objects in one encoding, as the API server's watch cache
//! holds them: ordered by (namespace, name), each with its bytes (JSON, or
//! the protobuf message) and pre-extracted labels and selectable fields; the
//! store's resourceVersion; a window of recent events for watches; and a
//! broadcast of new events.
//!
//! One writer (the reflector) applies events under a short write lock;
//! readers take a short read lock to copy `Arc`s (a point-in-time view with
//! its resourceVersion) and render without holding it. The initial list is
//! built aside and swapped in whole, so no reader sees a half-filled store.
//!
//! # Relists
//!
//! When the upstream forgets the store's version (`410 Gone`) the reflector
//! lists again, and [`Store::replace`] turns the difference between the store
//! and the new list into ordinary events, so watches served from the store
//! go on instead of ending (the v1.20 cacher ends all its watchers whenever
//! its reflector restarts, and clients relist; `cacher.go`, `startCaching`).
//! The events are made to be resumable, as clients set their version from
//! each event's object:
//!
//! - ADDED and MODIFIED carry the listed object, with its own (real)
//!   resourceVersion, which is newer than the store's old version; they go
//!   first, oldest first.
//! - DELETED carries the last known object, stamped with the list's version:
//!   the only version at which the deletion is known to have happened (an
//!   older one could be older than the real deletion, and a client resuming
//!   from it at the API server would never hear of it). Several DELETED may
//!   share that version, so a watch resuming *at* it gets them again (a
//!   DELETED for an object the client no longer holds is harmless).
//! - Then watchers that asked for bookmarks get a BOOKMARK at the list's
//!   version.
//!
//! The events join the event window, so a version a client received, before
//! or during the relist, stays resumable while the window covers it. A client
//! holding the real state at a version between the old one and the list's
//! (a list forwarded while the store was resyncing) is right too: it gets the
//! changes newer than its version and every deletion. One case is not: a
//! client cut off in the middle of the relist's events that resumes at the API
//! server itself (kache restarted, the store evicted) may miss deletions that
//! happened before its version. A list older than the store (the upstream's
//! versions went backwards: a restored etcd, a lagging API server) cannot be
//! told as events: watchers end and the window restarts at the list.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{broadcast, watch};

use crate::atom::{Atom, Pairs};
use crate::list::Items;

/// A store's key: namespace and name, the object's own atoms.
type Key = (Atom, Atom);

/// The objects a read covers: one namespace's (a range of the store's
/// keys), or all.
enum Scope {
    All,
    /// The namespace's first key (`""` sorts first), if it exists at all.
    Namespace(Option<Key>),
}

impl Scope {
    /// Looked up before the store's lock is taken: no object is in a
    /// namespace that was never interned.
    fn of(namespace: Option<&str>) -> Scope {
        namespace.map_or(Scope::All, |ns| {
            Scope::Namespace(Atom::existing(ns).map(|ns| (ns, Atom::new(""))))
        })
    }

    fn objects<'a>(
        &'a self,
        objects: &'a BTreeMap<Key, Arc<Object>>,
    ) -> Box<dyn Iterator<Item = &'a Arc<Object>> + 'a> {
        match self {
            Scope::All => Box::new(objects.values()),
            Scope::Namespace(None) => Box::new(std::iter::empty()),
            Scope::Namespace(Some(first)) => Box::new(
                objects
                    .range(first..)
                    .take_while(move |((object_ns, _), _)| *object_ns == first.0)
                    .map(|(_, o)| o),
            ),
        }
    }
}

/// How a store's objects are encoded (and its answers rendered).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    Json,
    /// Built-in types only: see [`crate::protobuf`].
    Protobuf,
}

impl Encoding {
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Json => "json",
            Encoding::Protobuf => "protobuf",
        }
    }
}

/// An object as cached.
#[derive(Debug)]
pub struct Object {
    pub namespace: Atom,
    pub name: Atom,
    pub resource_version: u64,
    /// JSON: the object as the API server sends it in a watch event or a
    /// GET, with `kind` and `apiVersion`. Protobuf: the object's message,
    /// which never carries type meta (the envelope does).
    bytes: Bytes,
    /// The JSON object as a list item, where that differs (built-in types'
    /// list items carry no `kind`/`apiVersion`): the offset in `bytes` where
    /// the item's fields start after the type meta, so no second copy is kept.
    item_offset: Option<usize>,
    encoding: Encoding,
    /// [`Object::size`], fixed when the object is made: a store subtracts
    /// exactly what it added.
    size: usize,
    pub labels: Pairs,
    pub fields: Pairs,
}

/// Why an object could not be cached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ObjectError(pub String);

impl Object {
    /// Builds an object from its full JSON (with `kind` and `apiVersion`).
    /// With `strip_type_meta`, list items are rendered without them, as the
    /// API server does for built-in types.
    ///
    /// # Errors
    /// Not a JSON object, or no `metadata.name` / `metadata.resourceVersion`.
    pub fn from_json(
        json: Bytes,
        strip_type_meta: bool,
        fields: impl FnOnce(&serde_json::Value) -> BTreeMap<String, String>,
    ) -> Result<Object, ObjectError> {
        let value: serde_json::Value =
            serde_json::from_slice(&json).map_err(|e| ObjectError(format!("invalid object JSON: {e}")))?;
        Object::from_parsed(json, strip_type_meta, &value, fields)
    }

    /// [`Object::from_json`] reading only what lies on `paths` (see
    /// [`crate::prune`]): `fields` must read nothing else.
    ///
    /// # Errors
    /// As [`Object::from_json`].
    pub fn from_json_pruned(
        json: Bytes,
        strip_type_meta: bool,
        paths: &crate::prune::Paths,
        fields: impl FnOnce(&serde_json::Value) -> BTreeMap<String, String>,
    ) -> Result<Object, ObjectError> {
        let value = crate::prune::parse(&json, paths)
            .map_err(|e| ObjectError(format!("invalid object JSON: {e}")))?;
        Object::from_parsed(json, strip_type_meta, &value, fields)
    }

    /// The object of `json`, whose parsed value (whole or pruned) is `value`.
    fn from_parsed(
        json: Bytes,
        strip_type_meta: bool,
        value: &serde_json::Value,
        fields: impl FnOnce(&serde_json::Value) -> BTreeMap<String, String>,
    ) -> Result<Object, ObjectError> {
        let metadata = &value["metadata"];
        let name = metadata["name"]
            .as_str()
            .ok_or_else(|| ObjectError("object without metadata.name".into()))?;
        let resource_version = parse_resource_version(metadata["resourceVersion"].as_str().unwrap_or(""))
            .ok_or_else(|| ObjectError(format!("object {name} without a valid metadata.resourceVersion")))?;
        let labels = metadata["labels"]
            .as_object()
            .map(|labels| {
                labels
                    .iter()
                    .filter_map(|(k, v)| v.as_str().map(|v| (k, v)))
                    .collect()
            })
            .unwrap_or_default();
        let item_offset = if strip_type_meta {
            type_meta_end(&json, value)
        } else {
            None
        };
        let (json, item_offset) = match (strip_type_meta, item_offset) {
            // Unusual field order: re-encode once with the type meta first
            // (from the whole object: `value` may be pruned).
            (true, None) => {
                let whole: serde_json::Value = serde_json::from_slice(&json)
                    .map_err(|e| ObjectError(format!("invalid object JSON: {e}")))?;
                let normalized = with_type_meta_first(&whole)?;
                let offset = type_meta_end(&normalized, value);
                (normalized, offset)
            }
            (_, offset) => (json, offset),
        };
        Ok(Object {
            namespace: Atom::new(metadata["namespace"].as_str().unwrap_or("")),
            name: Atom::new(name),
            resource_version,
            fields: fields(value).iter().collect(),
            bytes: json,
            item_offset,
            encoding: Encoding::Json,
            size: 0,
            labels,
        }
        .sized())
    }

    /// Builds an object from a built-in object's protobuf message (the `raw`
    /// of its envelope, or a list item); `fields` reads its selectable fields.
    ///
    /// # Errors
    /// Not a well-formed message, or no `metadata.name` /
    /// `metadata.resourceVersion`.
    pub fn from_protobuf(
        message: Bytes,
        fields: impl FnOnce(&[u8]) -> BTreeMap<String, String>,
    ) -> Result<Object, ObjectError> {
        let meta = crate::protobuf::object_meta(&message)
            .map_err(|e| ObjectError(format!("invalid object protobuf: {e}")))?;
        if meta.name.is_empty() {
            return Err(ObjectError("object without metadata.name".into()));
        }
        let resource_version = parse_resource_version(&meta.resource_version).ok_or_else(|| {
            ObjectError(format!(
                "object {} without a valid metadata.resourceVersion",
                meta.name
            ))
        })?;
        Ok(Object {
            namespace: Atom::new(&meta.namespace),
            name: Atom::new(&meta.name),
            resource_version,
            fields: fields(&message).iter().collect(),
            bytes: message,
            item_offset: None,
            encoding: Encoding::Protobuf,
            size: 0,
            labels: meta.labels.iter().collect(),
        }
        .sized())
    }

    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// The object as GET answers and watch events carry it: JSON with `kind`
    /// and `apiVersion`, or the protobuf message (to be put in an envelope).
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// Appends the object as a list item: JSON without type meta for
    /// built-in types; the protobuf message as it is (the list frames it).
    pub fn write_item(&self, out: &mut Vec<u8>) {
        match self.item_offset {
            Some(offset) => {
                out.push(b'{');
                out.extend_from_slice(&self.bytes[offset..]);
            }
            None => out.extend_from_slice(&self.bytes),
        }
    }

    /// The object as a list item without copying it: whether an opening
    /// `{` must precede, and the bytes that follow (a slice of the stored
    /// object; see [`Object::write_item`]).
    pub fn item_parts(&self) -> (bool, Bytes) {
        match self.item_offset {
            Some(offset) => (true, self.bytes.slice(offset..)),
            None => (false, self.bytes.clone()),
        }
    }

    /// The shape of [`Object::item_parts`] without taking the bytes: whether
    /// a `{` precedes, and how many bytes follow.
    pub fn item_shape(&self) -> (bool, usize) {
        match self.item_offset {
            Some(offset) => (true, self.bytes.len() - offset),
            None => (false, self.bytes.len()),
        }
    }

    /// Bytes held for this object (for the memory budget): its bytes, and
    /// the bookkeeping around them that weighs as much as the object itself
    /// for small objects — the `Object` and its `Arc`, the store's entry,
    /// the labels and fields, each atom's share (see [`Atom::share`]), and
    /// the allocator's share of every allocation.
    pub fn size(&self) -> usize {
        self.size
    }

    fn sized(mut self) -> Object {
        /// An allocation's header and rounding, on average.
        const ALLOCATION: usize = 16;
        /// The store's entry: its key (two atoms) and value, with its share
        /// of the tree's node.
        const ENTRY: usize = 2 * std::mem::size_of::<Atom>() + std::mem::size_of::<Arc<Object>>() + 16;
        self.size = std::mem::size_of::<Object>()
            + 2 * std::mem::size_of::<usize>() // the Arc's counts
            + ALLOCATION
            + self.bytes.len()
            + ALLOCATION
            + ENTRY
            + self.namespace.share()
            + self.name.share()
            + self.labels.heap_size()
            + self.fields.heap_size();
        self
    }

    fn key(&self) -> Key {
        (self.namespace.clone(), self.name.clone())
    }
}

/// The API server's resourceVersions are etcd revisions: decimal integers.
pub fn parse_resource_version(rv: &str) -> Option<u64> {
    if rv.is_empty() || !rv.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    rv.parse().ok()
}

/// Where the fields after `{"kind":"…","apiVersion":"…",` start, if the JSON
/// begins exactly so (the API server's encoding order).
fn type_meta_end(json: &[u8], value: &serde_json::Value) -> Option<usize> {
    let kind = value["kind"].as_str()?;
    let api_version = value["apiVersion"].as_str()?;
    let prefix = format!(
        "{{\"kind\":{},\"apiVersion\":{},",
        serde_json::to_string(kind).ok()?,
        serde_json::to_string(api_version).ok()?
    );
    json.starts_with(prefix.as_bytes()).then_some(prefix.len())
}

fn with_type_meta_first(value: &serde_json::Value) -> Result<Bytes, ObjectError> {
    let object = value
        .as_object()
        .ok_or_else(|| ObjectError("not a JSON object".into()))?;
    let encode = |v: &serde_json::Value| serde_json::to_vec(v).map_err(|e| ObjectError(e.to_string()));
    let mut out = Vec::with_capacity(256);
    out.push(b'{');
    let mut first = true;
    let type_meta = ["kind", "apiVersion"]
        .into_iter()
        .filter_map(|k| object.get_key_value(k));
    let rest = object.iter().filter(|(k, _)| *k != "kind" && *k != "apiVersion");
    for (key, field) in type_meta.chain(rest) {
        if !first {
            out.push(b',');
        }
        first = false;
        out.extend_from_slice(&encode(&serde_json::Value::String(key.clone()))?);
        out.push(b':');
        out.extend_from_slice(&encode(field)?);
    }
    out.push(b'}');
    Ok(Bytes::from(out))
}

/// What happened to an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// A change, with the object before it (for selector transitions).
///
/// `resource_version` is the event's version; it differs from the object's
/// own only for a DELETED a relist made up (see the module's doc), whose
/// object is the last one known and is sent stamped with the event's version.
#[derive(Debug)]
pub struct Event {
    pub kind: EventType,
    pub object: Arc<Object>,
    pub prev: Option<Arc<Object>>,
    pub resource_version: u64,
    /// The event's frames as watchers receive them, rendered by the first
    /// watcher that needs each and shared by every other (a store has one
    /// encoding, so an event has one rendering per [`FrameKind`]).
    pub frames: EventFrames,
}

/// The ways an event reaches a watcher, by what it selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// The object entered the watcher's selection (or was created).
    Added,
    /// The object changed within the selection.
    Modified,
    /// The object was deleted.
    Deleted,
    /// The object left the selection: its previous state, DELETED at the
    /// event's version.
    Left,
}

/// An event's rendered frames, one per [`FrameKind`], made once.
#[derive(Debug, Default)]
pub struct EventFrames([std::sync::OnceLock<Bytes>; 4]);

impl EventFrames {
    /// The frame of this kind, rendered by `render` the first time.
    pub fn get_or_render(&self, kind: FrameKind, render: impl FnOnce() -> Bytes) -> Bytes {
        self.0[kind as usize].get_or_init(render).clone()
    }
}

impl Event {
    /// A DELETED made up by a relist: several may share one version, so a
    /// watch resuming at that version is sent them again.
    fn replayed_at_own_version(&self) -> bool {
        self.kind == EventType::Deleted && self.object.resource_version != self.resource_version
    }
}

/// What a watcher receives on the broadcast.
#[derive(Debug, Clone)]
pub enum Notice {
    Event(Arc<Event>),
    /// The store's resourceVersion moved without an object change.
    Progress(u64),
    /// The store was rebuilt from a list at `resource_version`: `events` (in
    /// order) take a watcher from the old state to the new one; then it is at
    /// the list's version (a BOOKMARK for watchers that asked for them).
    Relisted {
        events: Arc<[Arc<Event>]>,
        resource_version: u64,
    },
    /// Watchers must end (their clients watch again): the store was stopped,
    /// or rebuilt from a list its events cannot lead to.
    End,
    /// kache is shutting down, its state saved at the store's version:
    /// watchers that asked for bookmarks get one at that version, so their
    /// clients resume there — inside the next run's event window, which
    /// starts at the saved version — then every watcher ends.
    Closing,
}

/// A watch asked for events older than the store retains.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("too old resource version: {requested} ({oldest})")]
pub struct TooOld {
    pub requested: u64,
    pub oldest: u64,
}

/// Why a store cannot serve a watch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WatchError {
    #[error(transparent)]
    TooOld(#[from] TooOld),
    /// The store was stopped (evicted, idle): it no longer follows the upstream.
    #[error("the store was stopped")]
    Stopped,
}

#[derive(Default)]
struct State {
    objects: BTreeMap<Key, Arc<Object>>,
    resource_version: u64,
    /// Events after `window_start`, oldest first.
    events: VecDeque<Arc<Event>>,
    /// The resourceVersion from which `events` is complete.
    window_start: u64,
    synced: bool,
    /// A list was applied: watchers may exist, a new list is told as events.
    listed: bool,
    /// Stopped for good ([`Store::close`]).
    closed: bool,
    bytes: usize,
    /// The object of the API server's last BOOKMARK (protobuf stores: the
    /// type's empty message, see [`crate::protobuf::bookmark_object`]).
    bookmark: Option<Bytes>,
    /// The last instant the store was known to be in sync with the API
    /// server (a list, an established watch, an event or a bookmark; frozen
    /// when the watch fails). `None` until it first synced.
    in_sync_at: Option<std::time::Instant>,
    /// Every object's list items, assembled by the first unfiltered list
    /// since the objects last changed ([`Store::items`]).
    items: Mutex<Option<Arc<Items>>>,
}

impl State {
    /// The objects changed: their assembled items are let go of (answers
    /// still sending them keep them until they are done).
    fn objects_changed(&mut self) {
        *self.items.get_mut().unwrap_or_else(PoisonError::into_inner) = None;
    }
}

/// One resource's cached state. Readers hold an `Arc<Store>`.
pub struct Store {
    state: RwLock<State>,
    notices: broadcast::Sender<Notice>,
    /// Notices sent so far (under the state's write lock, as they are sent):
    /// a watcher that took fewer than this less the broadcast's capacity has
    /// lost some.
    sent: std::sync::atomic::AtomicU64,
    version: watch::Sender<u64>,
    window: usize,
    backlog: usize,
    /// Asks the reflector to list again (a failed consistency check).
    relist: tokio::sync::Notify,
    /// The API server refused kache's own LIST (401/403): the store will
    /// never sync, and [`Store::wait_for`] says so at once.
    refused: std::sync::atomic::AtomicBool,
    /// Asking the API server for its current version, shared by
    /// concurrent streaming lists of the resource.
    latest: crate::flight::Flight,
}

/// A point-in-time view for a LIST.
#[derive(Debug)]
pub struct Snapshot {
    pub objects: Vec<Arc<Object>>,
    pub resource_version: u64,
}

/// How a watch starts: what it must replay, and the live feed.
#[derive(Debug)]
pub struct WatchStart {
    /// From `0`: the current state, each object to be sent as ADDED (the
    /// watcher frames each one as it sends it: nothing is made per object
    /// under the store's lock, and nothing kept once sent).
    pub state: Vec<Arc<Object>>,
    /// From a version: the retained events after it.
    pub initial: Vec<Arc<Event>>,
    pub resource_version: u64,
    pub feed: broadcast::Receiver<Notice>,
    /// The notices sent before `feed` subscribed: the watcher's position
    /// once it has taken none (see [`Store::lost_notices`]).
    pub position: u64,
}

impl Store {
    /// An empty, unsynced store keeping `window` recent events and buffering
    /// up to `backlog` notices per watcher.
    pub fn new(window: usize, backlog: usize) -> Store {
        let (notices, _) = broadcast::channel(backlog.max(1));
        let (version, _) = watch::channel(0);
        Store {
            state: RwLock::new(State::default()),
            notices,
            sent: std::sync::atomic::AtomicU64::new(0),
            version,
            window: window.max(1),
            backlog: backlog.max(1),
            relist: tokio::sync::Notify::new(),
            refused: std::sync::atomic::AtomicBool::new(false),
            latest: crate::flight::Flight::default(),
        }
    }

    /// The API server's current version of the resource, by `fetch` or by
    /// a concurrent reader's fetch started after this call (see
    /// [`crate::flight`]).
    ///
    /// # Errors
    /// The fetch's.
    pub async fn latest_version<F, Fut>(&self, fetch: F) -> Result<u64, String>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<u64, String>>,
    {
        self.latest.get(fetch).await
    }

    /// The API server refused to let kache list the resource: the store is
    /// closed, and readers waiting for it to sync stop waiting.
    pub(crate) fn refuse(&self) {
        self.refused.store(true, std::sync::atomic::Ordering::Relaxed);
        self.close();
        // Wakes `wait_for`, whose condition reads the flag.
        self.version.send_modify(|_| {});
    }

    /// Whether the API server refused kache's LIST of the resource.
    pub fn is_refused(&self) -> bool {
        self.refused.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Notices buffered per watcher: one further behind has lost events.
    pub fn backlog(&self) -> usize {
        self.backlog
    }

    /// Broadcasts `notice` to the watchers. Called with the state's write
    /// lock held, so that a watcher subscribing under the read lock knows
    /// which notices it gets.
    fn notify(&self, notice: Notice) {
        self.sent.fetch_add(1, std::sync::atomic::Ordering::Release);
        let _ = self.notices.send(notice);
    }

    /// Whether a watcher that has taken the notices up to `position` (see
    /// [`WatchStart::position`]) has lost some: it fell further behind
    /// than the broadcast keeps (`backlog`, rounded up to a power of two
    /// as the channel does).
    pub fn lost_notices(&self, position: u64) -> bool {
        self.notices_sent().saturating_sub(position) > self.backlog.next_power_of_two() as u64
    }

    /// Notices sent so far: a watcher that has taken them all is at this position.
    pub fn notices_sent(&self) -> u64 {
        self.sent.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether the store was stopped (evicted, idle, refused, or for a restart).
    pub fn is_closed(&self) -> bool {
        self.read().closed
    }

    pub fn is_synced(&self) -> bool {
        self.read().synced
    }

    pub fn resource_version(&self) -> u64 {
        self.read().resource_version
    }

    /// Objects held and their bytes (with their assembled list items).
    pub fn size(&self) -> (usize, usize) {
        let state = self.read();
        let items = state
            .items
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map_or(0, |items| items.overhead());
        (state.objects.len(), state.bytes + items)
    }

    /// A synced store holding `objects` at `resource_version`, with no writer:
    /// for rendering a fixed state (benchmarks, tools).
    pub fn from_objects(objects: Vec<Object>, resource_version: u64) -> Store {
        let store = Store::new(1, 1);
        store.replace(objects, resource_version);
        store
    }

    /// Replaces the whole content with a fresh list at `resource_version`.
    /// The first list is swapped in whole. Later ones are told to watchers as
    /// the events that lead from the store to the list, which join the event
    /// window (see the module's doc); a list older than the store ends the
    /// watchers and restarts the window.
    pub(crate) fn replace(&self, objects: Vec<Object>, resource_version: u64) {
        let mut map = BTreeMap::new();
        let mut bytes = 0;
        for object in objects {
            bytes += object.size();
            map.insert(object.key(), Arc::new(object));
        }
        let mut state = self.write();
        if state.listed {
            if let Some(events) = difference(&state.objects, &map, state.resource_version, resource_version) {
                state.objects = map;
                state.objects_changed();
                state.bytes = bytes;
                state.resource_version = resource_version;
                state.synced = !state.closed;
                state.in_sync_at = Some(std::time::Instant::now());
                for event in &events {
                    state.events.push_back(event.clone());
                }
                self.trim(&mut state);
                self.notify(Notice::Relisted {
                    events: events.into(),
                    resource_version,
                });
                drop(state);
                self.version.send_replace(resource_version);
                return;
            }
            tracing::info!(
                store = state.resource_version,
                list = resource_version,
                "a list the store's events cannot lead to: its watchers end"
            );
            self.notify(Notice::End);
        }
        let bookmark = state.bookmark.take();
        let closed = state.closed;
        *state = State {
            objects: map,
            resource_version,
            events: VecDeque::new(),
            window_start: resource_version,
            synced: !closed,
            listed: true,
            closed,
            bytes,
            bookmark,
            in_sync_at: Some(std::time::Instant::now()),
            items: Mutex::default(),
        };
        drop(state);
        self.version.send_replace(resource_version);
    }

    /// Fills an empty store with `objects` at `resource_version` from a
    /// snapshot saved by an earlier run, *unsynced*: it answers nothing and
    /// its version is not published to [`Store::wait_for`] until its
    /// reflector has resumed watching from that version ([`Store::mark_synced`]).
    /// Its first list, if the version turns out gone, is told to watchers as
    /// events like any relist (there are none yet: reads are forwarded).
    pub(crate) fn restore(&self, objects: Vec<Object>, resource_version: u64) {
        let mut map = BTreeMap::new();
        let mut bytes = 0;
        for object in objects {
            bytes += object.size();
            map.insert(object.key(), Arc::new(object));
        }
        let mut state = self.write();
        if state.listed || state.closed {
            return;
        }
        *state = State {
            objects: map,
            resource_version,
            events: VecDeque::new(),
            window_start: resource_version,
            synced: false,
            listed: true,
            closed: false,
            bytes,
            bookmark: None,
            in_sync_at: None,
            items: Mutex::default(),
        };
    }

    /// How far behind the API server the store may be: zero while synced,
    /// the time since it was last known in sync otherwise; `None` if it never
    /// synced (a store restored from a snapshot, until its watch resumed).
    pub fn staleness(&self) -> Option<Duration> {
        let state = self.read();
        match (state.synced, state.in_sync_at) {
            (_, None) => None,
            (true, Some(_)) => Some(Duration::ZERO),
            (false, Some(at)) => Some(at.elapsed()),
        }
    }

    /// Asks the reflector to list again (its watchers are told the
    /// differences, or end; see the module's doc).
    pub(crate) fn request_relist(&self) {
        self.relist.notify_one();
    }

    /// Resolves when [`Store::request_relist`] was called (at most once per
    /// request, even if it was called before this waited).
    pub(crate) async fn relist_requested(&self) {
        self.relist.notified().await;
    }

    /// Drops the oldest events beyond the window.
    fn trim(&self, state: &mut State) {
        while state.events.len() > self.window {
            if let Some(dropped) = state.events.pop_front() {
                // A resume at a relist's DELETED's version needs it again.
                state.window_start = if dropped.replayed_at_own_version() {
                    dropped.resource_version + 1
                } else {
                    dropped.resource_version
                };
            }
        }
    }

    /// Stops the store for a restart (see [`Notice::Closing`]): its watchers
    /// get a last bookmark at its version, then end; it serves no new ones.
    pub(crate) fn close_for_restart(&self) {
        let mut state = self.write();
        if state.closed {
            return;
        }
        state.closed = true;
        state.synced = false;
        self.notify(Notice::Closing);
    }

    /// Stops the store for good (evicted, idle): its watchers end at once, and
    /// it serves no new ones.
    pub(crate) fn close(&self) {
        let mut state = self.write();
        if state.closed {
            return;
        }
        state.closed = true;
        state.synced = false;
        self.notify(Notice::End);
    }

    /// Applies one watch event. Events at or below the store's version are
    /// ignored (replays after a reconnect).
    pub(crate) fn apply(&self, kind: EventType, object: Object) {
        let mut state = self.write();
        let resource_version = object.resource_version;
        if resource_version <= state.resource_version {
            return;
        }
        let object = Arc::new(object);
        let key = object.key();
        let prev = match kind {
            EventType::Deleted => state.objects.remove(&key),
            EventType::Added | EventType::Modified => state.objects.insert(key, object.clone()),
        };
        state.objects_changed();
        if let Some(prev) = &prev {
            state.bytes = state.bytes.saturating_sub(prev.size());
        }
        if kind != EventType::Deleted {
            state.bytes += object.size();
        }
        // A watch may report ADDED for an object we hold (after a reconnect)
        // or MODIFIED for one we do not: describe the change as it is here.
        let kind = match (kind, &prev) {
            (EventType::Deleted, _) => EventType::Deleted,
            (_, Some(_)) => EventType::Modified,
            (_, None) => EventType::Added,
        };
        let event = Arc::new(Event {
            kind,
            object,
            prev,
            resource_version,
            frames: EventFrames::default(),
        });
        state.resource_version = resource_version;
        if state.synced {
            state.in_sync_at = Some(std::time::Instant::now());
        }
        state.events.push_back(event.clone());
        self.trim(&mut state);
        self.notify(Notice::Event(event));
        drop(state);
        self.version.send_replace(resource_version);
    }

    /// Moves the store's version forward without a change (a BOOKMARK).
    pub(crate) fn progress(&self, resource_version: u64) {
        let mut state = self.write();
        if state.synced {
            state.in_sync_at = Some(std::time::Instant::now());
        }
        if resource_version <= state.resource_version {
            return;
        }
        state.resource_version = resource_version;
        self.notify(Notice::Progress(resource_version));
        drop(state);
        self.version.send_replace(resource_version);
    }

    /// Keeps the object of a BOOKMARK the API server sent, as the model of
    /// the bookmarks this store's watchers get.
    pub(crate) fn remember_bookmark(&self, object: Bytes) {
        let mut state = self.write();
        if state.bookmark.as_ref() != Some(&object) {
            state.bookmark = Some(object);
        }
    }

    /// The object of the last BOOKMARK the API server sent, if any.
    pub fn bookmark(&self) -> Option<Bytes> {
        self.read().bookmark.clone()
    }

    /// Marks the store synced again after its reflector resumed watching
    /// from the store's version (nothing was missed).
    pub(crate) fn mark_synced(&self) {
        let mut state = self.write();
        let was_synced = state.synced;
        state.synced = state.listed && !state.closed;
        if state.synced {
            state.in_sync_at = Some(std::time::Instant::now());
        }
        let first = state.synced && !was_synced && *self.version.borrow() < state.resource_version;
        let resource_version = state.resource_version;
        drop(state);
        if first {
            // A restored store's version, published once it is confirmed.
            self.version.send_replace(resource_version);
        }
    }

    /// Marks the store unsynced (its reflector lost the upstream): readers
    /// forward until it has resynced. Its watchers stay open meanwhile (until
    /// their own timeouts) and resume with the events that follow.
    pub(crate) fn mark_unsynced(&self) {
        let mut state = self.write();
        if state.synced {
            state.in_sync_at = Some(std::time::Instant::now());
        }
        state.synced = false;
    }

    /// Every object, in (namespace, name) order, that `keep` accepts,
    /// with the store's resourceVersion at that instant.
    pub fn snapshot(&self, namespace: Option<&str>, mut keep: impl FnMut(&Object) -> bool) -> Snapshot {
        let scope = Scope::of(namespace);
        let state = self.read();
        Snapshot {
            objects: scope
                .objects(&state.objects)
                .filter(|o| keep(o))
                .cloned()
                .collect(),
            resource_version: state.resource_version,
        }
    }

    /// Every object's list items with the store's resourceVersion, for an
    /// unfiltered list: assembled once and shared by every list until an
    /// object changes (see [`crate::list`]).
    pub fn items(&self) -> (Arc<Items>, u64) {
        let state = self.read();
        let items = state
            .items
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert_with(|| Arc::new(Items::new(state.objects.values())))
            .clone();
        (items, state.resource_version)
    }

    /// Lets go of the unfiltered list's memory file if no answer took it
    /// for `idle` (see [`Items::release_idle`]).
    pub fn release_idle_lists(&self, idle: std::time::Duration) {
        let state = self.read();
        let items = state.items.lock().unwrap_or_else(PoisonError::into_inner).clone();
        drop(state);
        if let Some(items) = items {
            items.release_idle(idle);
        }
    }

    /// One object and the store's resourceVersion.
    pub fn get(&self, namespace: &str, name: &str) -> (Option<Arc<Object>>, u64) {
        // Every held name is interned: a name that is not cannot be here.
        let key = Atom::existing(namespace).zip(Atom::existing(name));
        let state = self.read();
        let object = key.and_then(|key| state.objects.get(&key).cloned());
        (object, state.resource_version)
    }

    /// Starts a watch from `resource_version`: `0` replays the current state
    /// (of `namespace`, or all) as ADDED events; otherwise the retained
    /// events after it (and a relist's DELETED at it, see the module's doc).
    ///
    /// # Errors
    /// The version is older than the retained window, or the store was stopped.
    pub fn watch_from(
        &self,
        resource_version: u64,
        namespace: Option<&str>,
    ) -> Result<WatchStart, WatchError> {
        let scope = Scope::of(namespace);
        let state = self.read();
        if state.closed {
            return Err(WatchError::Stopped);
        }
        // Subscribed under the lock: no event between replay and feed is lost.
        let feed = self.notices.subscribe();
        let position = self.notices_sent();
        let (state_objects, initial) = if resource_version == 0 {
            (scope.objects(&state.objects).cloned().collect(), Vec::new())
        } else {
            if resource_version < state.window_start {
                return Err(WatchError::TooOld(TooOld {
                    requested: resource_version,
                    oldest: state.window_start,
                }));
            }
            let events = state
                .events
                .iter()
                .filter(|e| {
                    e.resource_version > resource_version
                        || (e.resource_version == resource_version && e.replayed_at_own_version())
                })
                .cloned()
                .collect();
            (Vec::new(), events)
        };
        Ok(WatchStart {
            state: state_objects,
            initial,
            resource_version: state.resource_version,
            feed,
            position,
        })
    }

    /// Waits until the store has reached `resource_version`, up to `timeout`
    /// (`false` at once if the store was refused).
    pub async fn wait_for(&self, resource_version: u64, timeout: Duration) -> bool {
        let mut version = self.version.subscribe();
        let reached = tokio::time::timeout(
            timeout,
            version.wait_for(|v| *v >= resource_version || self.is_refused()),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        reached && !self.is_refused()
    }
}

/// The events that take a watcher from `old` (at `old_version`) to `new`
/// (a list at `new_version`), in the order the module's doc describes;
/// `None` if the list cannot be reached by events: it is older than the store,
/// or holds a change the store should already have seen.
fn difference(
    old: &BTreeMap<Key, Arc<Object>>,
    new: &BTreeMap<Key, Arc<Object>>,
    old_version: u64,
    new_version: u64,
) -> Option<Vec<Arc<Event>>> {
    if new_version < old_version {
        return None;
    }
    let mut changes = Vec::new();
    for (key, object) in new {
        let prev = old.get(key);
        let kind = match prev {
            None => EventType::Added,
            Some(prev) if prev.resource_version != object.resource_version => EventType::Modified,
            Some(_) => continue,
        };
        if object.resource_version <= old_version || object.resource_version > new_version {
            return None;
        }
        changes.push(Arc::new(Event {
            kind,
            object: object.clone(),
            prev: prev.cloned(),
            resource_version: object.resource_version,
            frames: EventFrames::default(),
        }));
    }
    changes.sort_by_key(|e| e.resource_version);
    for (key, object) in old {
        if !new.contains_key(key) {
            if new_version <= old_version {
                return None;
            }
            changes.push(Arc::new(Event {
                kind: EventType::Deleted,
                object: object.clone(),
                prev: Some(object.clone()),
                resource_version: new_version,
                frames: EventFrames::default(),
            }));
        }
    }
    Some(changes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(ns: &str, name: &str, rv: u64, labels: &[(&str, &str)]) -> Object {
        let labels: serde_json::Map<String, serde_json::Value> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
            .collect();
        let json = serde_json::json!({
            "kind": "ConfigMap", "apiVersion": "v1",
            "metadata": {"name": name, "namespace": ns, "resourceVersion": rv.to_string(), "labels": labels},
            "data": {"k": "v"}
        });
        Object::from_json(Bytes::from(serde_json::to_vec(&json).unwrap()), true, |_| {
            BTreeMap::new()
        })
        .unwrap()
    }

    #[test]
    fn list_items_drop_the_type_meta_without_a_second_copy() {
        let o = object("a", "x", 5, &[("app", "web")]);
        let mut item = Vec::new();
        o.write_item(&mut item);
        let item: serde_json::Value = serde_json::from_slice(&item).unwrap();
        assert!(item.get("kind").is_none() && item.get("apiVersion").is_none());
        assert_eq!(item["metadata"]["name"], "x");
        let full: serde_json::Value = serde_json::from_slice(o.bytes()).unwrap();
        assert_eq!(full["kind"], "ConfigMap");
        assert_eq!(o.labels.get("app"), Some("web"));
    }

    #[test]
    fn list_items_are_assembled_once_until_an_object_changes() {
        let store = Store::new(100, 16);
        store.replace(vec![object("a", "x", 2, &[]), object("a", "y", 3, &[])], 3);
        let (_, objects_only) = store.size();
        let (items, rv) = store.items();
        assert_eq!(store.size().1, objects_only + items.overhead(), "counted");
        assert_eq!((items.count(), rv), (2, 3));
        let (again, _) = store.items();
        assert!(Arc::ptr_eq(&items, &again), "shared while nothing changed");
        store.progress(4);
        let (after_bookmark, rv) = store.items();
        assert!(
            Arc::ptr_eq(&items, &after_bookmark),
            "a new version alone changes no item"
        );
        assert_eq!(rv, 4);
        store.apply(EventType::Modified, object("a", "x", 5, &[("app", "web")]));
        let (changed, _) = store.items();
        assert!(!Arc::ptr_eq(&items, &changed), "assembled again after a change");
        store.apply(EventType::Deleted, object("a", "y", 6, &[]));
        assert_eq!(store.items().0.count(), 1);
        store.replace(vec![object("a", "z", 7, &[])], 7);
        assert_eq!(store.items().0.count(), 1);
        assert_eq!(
            Arc::strong_count(&changed),
            1,
            "the store let go of the old items"
        );
    }

    #[test]
    fn objects_in_another_field_order_are_normalized() {
        let json = br#"{"metadata":{"name":"x","resourceVersion":"3"},"apiVersion":"v1","kind":"ConfigMap","data":{}}"#;
        let o = Object::from_json(Bytes::from_static(json), true, |_| BTreeMap::new()).unwrap();
        let mut item = Vec::new();
        o.write_item(&mut item);
        let item: serde_json::Value = serde_json::from_slice(&item).unwrap();
        assert_eq!(
            item,
            serde_json::json!({"metadata":{"name":"x","resourceVersion":"3"},"data":{}})
        );
    }

    #[test]
    fn custom_resources_keep_their_type_meta_in_lists() {
        let json = br#"{"apiVersion":"stable.example.com/v1","kind":"CronTab","metadata":{"name":"x","resourceVersion":"3"}}"#;
        let o = Object::from_json(Bytes::from_static(json), false, |_| BTreeMap::new()).unwrap();
        let mut item = Vec::new();
        o.write_item(&mut item);
        assert_eq!(item, json.to_vec());
    }

    #[test]
    fn objects_without_name_or_version_are_rejected() {
        for json in [
            &br#"{"metadata":{"resourceVersion":"1"}}"#[..],
            br#"{"metadata":{"name":"x"}}"#,
            b"[]",
            b"{",
        ] {
            assert!(Object::from_json(Bytes::from_static(json), true, |_| BTreeMap::new()).is_err());
        }
    }

    #[test]
    fn snapshots_are_ordered_by_namespace_then_name_and_filtered_by_namespace() {
        let store = Store::new(10, 10);
        store.replace(
            vec![
                object("b", "z", 3, &[]),
                object("a", "y", 2, &[]),
                object("b", "a", 4, &[]),
                object("", "n", 1, &[]),
            ],
            10,
        );
        let all: Vec<_> = store
            .snapshot(None, |_| true)
            .objects
            .iter()
            .map(|o| format!("{}/{}", o.namespace, o.name))
            .collect();
        assert_eq!(all, ["/n", "a/y", "b/a", "b/z"]);
        let b: Vec<_> = store
            .snapshot(Some("b"), |_| true)
            .objects
            .iter()
            .map(|o| o.name.clone())
            .collect();
        assert_eq!(b, ["a", "z"]);
        assert!(store.snapshot(Some("c"), |_| true).objects.is_empty());
        assert_eq!(store.snapshot(None, |_| true).resource_version, 10);
    }

    #[test]
    fn events_update_objects_and_the_version_and_replays_are_ignored() {
        let store = Store::new(10, 10);
        store.replace(vec![object("a", "x", 3, &[])], 5);
        store.apply(EventType::Modified, object("a", "x", 6, &[("v", "2")]));
        store.apply(EventType::Added, object("a", "y", 7, &[]));
        store.apply(EventType::Modified, object("a", "x", 6, &[("v", "stale")]));
        store.apply(EventType::Deleted, object("a", "y", 8, &[]));
        let (x, rv) = store.get("a", "x");
        assert_eq!(x.unwrap().labels.get("v"), Some("2"));
        assert_eq!(rv, 8);
        assert!(store.get("a", "y").0.is_none());
    }

    #[test]
    fn watches_replay_the_window_or_the_state_and_too_old_versions_fail() {
        let store = Store::new(2, 10);
        store.replace(vec![object("a", "x", 3, &[])], 5);
        for rv in 6..=9 {
            store.apply(EventType::Modified, object("a", "x", rv, &[]));
        }
        let start = store.watch_from(7, None).unwrap();
        let rvs: Vec<_> = start.initial.iter().map(|e| e.resource_version).collect();
        assert_eq!(rvs, [8, 9]);
        assert_eq!(
            store.watch_from(5, None).unwrap_err(),
            WatchError::TooOld(TooOld {
                requested: 5,
                oldest: 7
            })
        );
        let from_zero = store.watch_from(0, None).unwrap();
        assert!(from_zero.initial.is_empty());
        assert_eq!(from_zero.state.len(), 1);
        assert_eq!(from_zero.state[0].resource_version, 9);
    }

    #[tokio::test]
    async fn watchers_receive_new_events_and_progress() {
        let store = Store::new(10, 10);
        store.replace(vec![], 5);
        let mut start = store.watch_from(5, None).unwrap();
        store.apply(EventType::Added, object("a", "x", 6, &[]));
        match start.feed.recv().await.unwrap() {
            Notice::Event(e) => assert_eq!((e.kind, e.resource_version), (EventType::Added, 6)),
            other => panic!("{other:?}"),
        }
        store.progress(9);
        assert!(matches!(start.feed.recv().await.unwrap(), Notice::Progress(9)));
    }

    fn summary(events: &[Arc<Event>]) -> Vec<(EventType, String, u64, u64)> {
        events
            .iter()
            .map(|e| {
                (
                    e.kind,
                    e.object.name.to_string(),
                    e.resource_version,
                    e.object.resource_version,
                )
            })
            .collect()
    }

    #[tokio::test]
    async fn a_relist_is_told_to_watchers_as_the_differences() {
        let store = Store::new(100, 10);
        store.replace(
            vec![
                object("a", "kept", 2, &[]),
                object("a", "changed", 3, &[]),
                object("a", "gone", 4, &[]),
                object("b", "gone-too", 5, &[]),
            ],
            10,
        );
        let mut start = store.watch_from(10, None).unwrap();
        store.replace(
            vec![
                object("a", "kept", 2, &[]),
                object("a", "new", 14, &[]),
                object("a", "changed", 12, &[]),
            ],
            20,
        );
        let Notice::Relisted {
            events,
            resource_version,
        } = start.feed.recv().await.unwrap()
        else {
            panic!("not a relist");
        };
        assert_eq!(resource_version, 20);
        assert_eq!(
            summary(&events),
            [
                (EventType::Modified, "changed".into(), 12, 12),
                (EventType::Added, "new".into(), 14, 14),
                (EventType::Deleted, "gone".into(), 20, 4),
                (EventType::Deleted, "gone-too".into(), 20, 5),
            ],
            "changes oldest first with their own versions, then deletions at the list's"
        );
        assert_eq!(events[0].prev.as_ref().unwrap().resource_version, 3);
        assert_eq!(store.resource_version(), 20);
        assert!(store.is_synced());
        let names: Vec<_> = store
            .snapshot(None, |_| true)
            .objects
            .iter()
            .map(|o| o.name.clone())
            .collect();
        assert_eq!(names, ["changed", "kept", "new"]);
    }

    #[test]
    fn versions_from_before_and_during_a_relist_stay_resumable() {
        let store = Store::new(100, 10);
        store.replace(vec![object("a", "x", 3, &[]), object("a", "y", 4, &[])], 5);
        store.apply(EventType::Added, object("a", "z", 6, &[]));
        store.replace(vec![object("a", "x", 9, &[]), object("a", "w", 8, &[])], 12);
        let resumed = |rv| summary(&store.watch_from(rv, None).unwrap().initial);
        let all = [
            (EventType::Added, "w".to_string(), 8, 8),
            (EventType::Modified, "x".into(), 9, 9),
            (EventType::Deleted, "y".into(), 12, 4),
            (EventType::Deleted, "z".into(), 12, 6),
        ];
        // From before the relist: its own event, then the relist's.
        let mut from_5 = vec![(EventType::Added, "z".to_string(), 6, 6)];
        from_5.extend(all.iter().cloned());
        assert_eq!(resumed(5), from_5);
        assert_eq!(resumed(6), all);
        // A version handed out during the relist: the rest of it.
        assert_eq!(resumed(8), all[1..]);
        // The list's version: the deletions again (there may be several at it).
        assert_eq!(resumed(12), all[2..]);
        assert!(store.watch_from(4, None).is_err(), "older than the window");
    }

    #[tokio::test]
    async fn a_list_older_than_the_store_ends_its_watchers() {
        let store = Store::new(100, 10);
        store.replace(vec![object("a", "x", 3, &[])], 10);
        let mut start = store.watch_from(10, None).unwrap();
        store.replace(vec![object("a", "x", 3, &[])], 8);
        assert!(matches!(start.feed.recv().await.unwrap(), Notice::End));
        assert_eq!(store.resource_version(), 8);
        assert!(store.watch_from(9, None).unwrap().initial.is_empty());
        assert!(
            store.watch_from(7, None).is_err(),
            "the window restarts at the list"
        );
    }

    #[tokio::test]
    async fn a_relist_without_changes_only_moves_the_version() {
        let store = Store::new(100, 10);
        store.replace(vec![object("a", "x", 3, &[])], 10);
        let mut start = store.watch_from(10, None).unwrap();
        store.replace(vec![object("a", "x", 3, &[])], 15);
        match start.feed.recv().await.unwrap() {
            Notice::Relisted {
                events,
                resource_version,
            } => assert_eq!((events.len(), resource_version), (0, 15)),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn losing_the_upstream_keeps_watchers_and_closing_ends_them() {
        let store = Store::new(100, 10);
        store.replace(vec![], 10);
        let mut start = store.watch_from(10, None).unwrap();
        store.mark_unsynced();
        assert!(!store.is_synced());
        assert!(start.feed.try_recv().is_err(), "nothing said to watchers");
        store.mark_synced();
        store.apply(EventType::Added, object("a", "x", 11, &[]));
        assert!(matches!(start.feed.recv().await.unwrap(), Notice::Event(_)));
        store.close();
        assert!(matches!(start.feed.recv().await.unwrap(), Notice::End));
        assert!(!store.is_synced());
        assert_eq!(store.watch_from(11, None).unwrap_err(), WatchError::Stopped);
        store.mark_synced();
        store.replace(vec![], 20);
        assert!(!store.is_synced(), "a stopped store stays stopped");
    }

    #[test]
    fn a_window_cut_inside_a_relists_deletions_refuses_their_version() {
        let store = Store::new(2, 10);
        store.replace(
            vec![
                object("a", "x", 3, &[]),
                object("a", "y", 4, &[]),
                object("a", "z", 4, &[]),
            ],
            5,
        );
        store.replace(vec![], 9);
        // Three deletions at 9, two kept: a resume at 9 would miss one.
        assert!(matches!(
            store.watch_from(9, None),
            Err(WatchError::TooOld(TooOld { oldest: 10, .. }))
        ));
    }

    #[tokio::test]
    async fn readers_can_wait_for_a_version() {
        let store = Arc::new(Store::new(10, 10));
        store.replace(vec![], 5);
        assert!(store.wait_for(5, Duration::from_millis(1)).await);
        assert!(!store.wait_for(6, Duration::from_millis(10)).await);
        let writer = store.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            writer.progress(7);
        });
        assert!(store.wait_for(6, Duration::from_secs(5)).await);
    }

    /// A randomized model check against a plain BTreeMap.
    #[test]
    fn the_store_agrees_with_a_plain_map_under_random_events() {
        let store = Store::new(50, 1000);
        store.replace(vec![], 1);
        let mut model: BTreeMap<(String, String), u64> = BTreeMap::new();
        let mut seed = 0x2545F4914F6CDD1Du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut rv = 1;
        for _ in 0..5000 {
            rv += 1 + next() % 3;
            let ns = format!("ns{}", next() % 3);
            let name = format!("o{}", next() % 20);
            let key = (ns.clone(), name.clone());
            match next() % 4 {
                0 => {
                    store.apply(EventType::Deleted, object(&ns, &name, rv, &[]));
                    model.remove(&key);
                }
                _ => {
                    store.apply(EventType::Modified, object(&ns, &name, rv, &[]));
                    model.insert(key, rv);
                }
            }
            if next() % 100 == 0 {
                let snapshot = store.snapshot(None, |_| true);
                let seen: Vec<_> = snapshot
                    .objects
                    .iter()
                    .map(|o| ((o.namespace.to_string(), o.name.to_string()), o.resource_version))
                    .collect();
                let expected: Vec<_> = model.iter().map(|(k, v)| (k.clone(), *v)).collect();
                assert_eq!(seen, expected);
            }
        }
        let (count, _) = store.size();
        assert_eq!(count, model.len());
    }
}
