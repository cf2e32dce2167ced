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

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{broadcast, watch};

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
    pub namespace: String,
    pub name: String,
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
    pub labels: BTreeMap<String, String>,
    pub fields: BTreeMap<String, String>,
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
                    .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        let item_offset = if strip_type_meta {
            type_meta_end(&json, &value)
        } else {
            None
        };
        let (json, item_offset) = match (strip_type_meta, item_offset) {
            // Unusual field order: re-encode once with the type meta first.
            (true, None) => {
                let normalized = with_type_meta_first(&value)?;
                let offset = type_meta_end(&normalized, &value);
                (normalized, offset)
            }
            (_, offset) => (json, offset),
        };
        Ok(Object {
            namespace: metadata["namespace"].as_str().unwrap_or("").to_string(),
            name: name.to_string(),
            resource_version,
            fields: fields(&value),
            bytes: json,
            item_offset,
            encoding: Encoding::Json,
            labels,
        })
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
            namespace: meta.namespace,
            name: meta.name,
            resource_version,
            fields: fields(&message),
            bytes: message,
            item_offset: None,
            encoding: Encoding::Protobuf,
            labels: meta.labels,
        })
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

    /// Bytes held for this object (for the memory budget).
    pub fn size(&self) -> usize {
        self.bytes.len()
            + self.namespace.len()
            + self.name.len()
            + self.labels.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
            + self.fields.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
    }

    fn key(&self) -> (String, String) {
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
#[derive(Debug)]
pub struct Event {
    pub kind: EventType,
    pub object: Arc<Object>,
    pub prev: Option<Arc<Object>>,
    pub resource_version: u64,
}

/// What a watcher receives on the broadcast.
#[derive(Debug, Clone)]
pub enum Notice {
    Event(Arc<Event>),
    /// The store's resourceVersion moved without an object change.
    Progress(u64),
    /// The store was rebuilt from a new list: watchers cannot continue.
    Reset,
}

/// A watch asked for events older than the store retains.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("too old resource version: {requested} ({oldest})")]
pub struct TooOld {
    pub requested: u64,
    pub oldest: u64,
}

#[derive(Default)]
struct State {
    objects: BTreeMap<(String, String), Arc<Object>>,
    resource_version: u64,
    /// Events after `window_start`, oldest first.
    events: VecDeque<Arc<Event>>,
    /// The resourceVersion from which `events` is complete.
    window_start: u64,
    synced: bool,
    bytes: usize,
    /// The object of the API server's last BOOKMARK (protobuf stores: the
    /// type's empty message, see [`crate::protobuf::bookmark_object`]).
    bookmark: Option<Bytes>,
}

/// One resource's cached state. Readers hold an `Arc<Store>`.
pub struct Store {
    state: RwLock<State>,
    notices: broadcast::Sender<Notice>,
    version: watch::Sender<u64>,
    window: usize,
    backlog: usize,
}

/// A point-in-time view for a LIST.
#[derive(Debug)]
pub struct Snapshot {
    pub objects: Vec<Arc<Object>>,
    pub resource_version: u64,
}

/// How a watch starts: the events it must replay, and the live feed.
#[derive(Debug)]
pub struct WatchStart {
    pub initial: Vec<Arc<Event>>,
    pub resource_version: u64,
    pub feed: broadcast::Receiver<Notice>,
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
            version,
            window: window.max(1),
            backlog: backlog.max(1),
        }
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

    pub fn is_synced(&self) -> bool {
        self.read().synced
    }

    pub fn resource_version(&self) -> u64 {
        self.read().resource_version
    }

    /// Objects held and their bytes.
    pub fn size(&self) -> (usize, usize) {
        let state = self.read();
        (state.objects.len(), state.bytes)
    }

    /// Replaces the whole content with a fresh list: existing watchers are
    /// told to end (their clients relist), the event window restarts here.
    /// A synced store holding `objects` at `resource_version`, with no writer:
    /// for rendering a fixed state (benchmarks, tools).
    pub fn from_objects(objects: Vec<Object>, resource_version: u64) -> Store {
        let store = Store::new(1, 1);
        store.replace(objects, resource_version);
        store
    }

    pub(crate) fn replace(&self, objects: Vec<Object>, resource_version: u64) {
        let mut map = BTreeMap::new();
        let mut bytes = 0;
        for object in objects {
            bytes += object.size();
            map.insert(object.key(), Arc::new(object));
        }
        let mut state = self.write();
        let had_watchers = state.synced;
        let bookmark = state.bookmark.take();
        *state = State {
            objects: map,
            resource_version,
            events: VecDeque::new(),
            window_start: resource_version,
            synced: true,
            bytes,
            bookmark,
        };
        if had_watchers {
            let _ = self.notices.send(Notice::Reset);
        }
        self.version.send_replace(resource_version);
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
        });
        state.resource_version = resource_version;
        state.events.push_back(event.clone());
        while state.events.len() > self.window {
            if let Some(dropped) = state.events.pop_front() {
                state.window_start = dropped.resource_version;
            }
        }
        let _ = self.notices.send(Notice::Event(event));
        drop(state);
        self.version.send_replace(resource_version);
    }

    /// Moves the store's version forward without a change (a BOOKMARK).
    pub(crate) fn progress(&self, resource_version: u64) {
        let mut state = self.write();
        if resource_version <= state.resource_version {
            return;
        }
        state.resource_version = resource_version;
        let _ = self.notices.send(Notice::Progress(resource_version));
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
        self.write().synced = true;
    }

    /// Marks the store unsynced (its reflector lost the upstream): readers
    /// forward until it has resynced.
    pub(crate) fn mark_unsynced(&self) {
        self.write().synced = false;
    }

    /// Every object, in (namespace, name) order, that `keep` accepts,
    /// with the store's resourceVersion at that instant.
    pub fn snapshot(&self, namespace: Option<&str>, mut keep: impl FnMut(&Object) -> bool) -> Snapshot {
        let state = self.read();
        let objects = match namespace {
            Some(ns) => state
                .objects
                .range((ns.to_string(), String::new())..)
                .take_while(|((object_ns, _), _)| object_ns == ns)
                .map(|(_, o)| o)
                .filter(|o| keep(o))
                .cloned()
                .collect(),
            None => state.objects.values().filter(|o| keep(o)).cloned().collect(),
        };
        Snapshot {
            objects,
            resource_version: state.resource_version,
        }
    }

    /// One object and the store's resourceVersion.
    pub fn get(&self, namespace: &str, name: &str) -> (Option<Arc<Object>>, u64) {
        let state = self.read();
        let object = state
            .objects
            .get(&(namespace.to_string(), name.to_string()))
            .cloned();
        (object, state.resource_version)
    }

    /// Starts a watch from `resource_version`: `0` replays the current state
    /// as ADDED events; otherwise the retained events after it.
    ///
    /// # Errors
    /// The version is older than the retained window.
    pub fn watch_from(&self, resource_version: u64) -> Result<WatchStart, TooOld> {
        let state = self.read();
        // Subscribed under the lock: no event between replay and feed is lost.
        let feed = self.notices.subscribe();
        let initial = if resource_version == 0 {
            state
                .objects
                .values()
                .map(|o| {
                    Arc::new(Event {
                        kind: EventType::Added,
                        object: o.clone(),
                        prev: None,
                        resource_version: o.resource_version,
                    })
                })
                .collect()
        } else {
            if resource_version < state.window_start {
                return Err(TooOld {
                    requested: resource_version,
                    oldest: state.window_start,
                });
            }
            state
                .events
                .iter()
                .filter(|e| e.resource_version > resource_version)
                .cloned()
                .collect()
        };
        Ok(WatchStart {
            initial,
            resource_version: state.resource_version,
            feed,
        })
    }

    /// Waits until the store has reached `resource_version`, up to `timeout`.
    pub async fn wait_for(&self, resource_version: u64, timeout: Duration) -> bool {
        let mut version = self.version.subscribe();
        tokio::time::timeout(timeout, version.wait_for(|v| *v >= resource_version))
            .await
            .is_ok_and(|r| r.is_ok())
    }
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
        assert_eq!(o.labels["app"], "web");
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
        assert_eq!(x.unwrap().labels["v"], "2");
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
        let start = store.watch_from(7).unwrap();
        let rvs: Vec<_> = start.initial.iter().map(|e| e.resource_version).collect();
        assert_eq!(rvs, [8, 9]);
        assert_eq!(
            store.watch_from(5).unwrap_err(),
            TooOld {
                requested: 5,
                oldest: 7
            }
        );
        let from_zero = store.watch_from(0).unwrap();
        assert_eq!(from_zero.initial.len(), 1);
        assert_eq!(from_zero.initial[0].kind, EventType::Added);
        assert_eq!(from_zero.initial[0].object.resource_version, 9);
    }

    #[tokio::test]
    async fn watchers_receive_new_events_and_a_reset_on_relist() {
        let store = Store::new(10, 10);
        store.replace(vec![], 5);
        let mut start = store.watch_from(5).unwrap();
        store.apply(EventType::Added, object("a", "x", 6, &[]));
        match start.feed.recv().await.unwrap() {
            Notice::Event(e) => assert_eq!((e.kind, e.resource_version), (EventType::Added, 6)),
            other => panic!("{other:?}"),
        }
        store.progress(9);
        assert!(matches!(start.feed.recv().await.unwrap(), Notice::Progress(9)));
        store.replace(vec![], 20);
        assert!(matches!(start.feed.recv().await.unwrap(), Notice::Reset));
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
                    .map(|o| ((o.namespace.clone(), o.name.clone()), o.resource_version))
                    .collect();
                let expected: Vec<_> = model.iter().map(|(k, v)| (k.clone(), *v)).collect();
                assert_eq!(seen, expected);
            }
        }
        let (count, _) = store.size();
        assert_eq!(count, model.len());
    }
}
