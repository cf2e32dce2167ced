//! LIST answers streamed from a snapshot without copying the objects.
//!
//! A cached object is kept as the bytes the API server sent (`Bytes`,
//! reference-counted). A list answer is those bytes in order between a small
//! head and tail: the head, then per item its separator (JSON: `,` and the
//! `{` that replaces the dropped type meta; protobuf: the field header, cut
//! from one buffer made for the whole list) and a slice of the object, then
//! the tail. The separators and slices are the list's [`Items`], assembled
//! once into one shared array of parts; an answer is its head, chunks that
//! each share a range of that array, and its tail. The total length is
//! known up front, so the answer carries `Content-Length` like the API
//! server's.
//!
//! A store keeps the [`Items`] of all its objects until they change
//! ([`crate::store::Store::items`]): every unfiltered list of an unchanged
//! store, however many clients ask and however often, sends the same
//! parts, and answering costs a reference count per chunk of
//! [`MAX_SLICES`] parts — no pass over the objects, nothing copied in
//! memory. Measured with `perf` while serving a 10,000-pod list: walking
//! the objects to take a reference to each one's bytes, per answer, was a
//! fifth of kache's CPU (a cache miss or two per object); with the items
//! shared, kache's own code is 2 % of it and the kernel's copy into the
//! socket 40 %. That copy goes too once the same items are asked for again
//! over plain HTTP/1: they are copied once into a memory file and sent from
//! it with `sendfile` ([`Items::filed`], [`crate::filed`]). Filtered lists
//! assemble their items per answer. The bytes are exactly those [`crate::reads`] rendered
//! into one buffer before (and the API server sends): see the tests.
//!
//! On the wire a chunk is one body frame and one `writev` of up to 64
//! slices; each part a frame of its own cost a trip through every body
//! layer — 20,000 for 10,000 pods. A slow reader's connection holds at
//! most 16 chunks (hyper's write queue), which copy nothing: what an answer
//! holds beyond the store is a reference to its items.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use crate::chunk::{Chunk, ChunkStream, Parts, MAX_SLICES};
use crate::protobuf::{begin_envelope, end_envelope, field_len, put_field, put_header};
use crate::store::{Encoding, Object};
use crate::upstream::FetchError;

/// A list's items as the parts that go on the wire: per object its
/// separator (if any) and its bytes, none of them empty.
#[derive(Debug)]
pub struct Items {
    parts: Parts,
    /// The parts' total length.
    len: usize,
    count: usize,
    /// The protobuf field headers' buffer.
    prefix_bytes: usize,
    /// The parts copied into a memory file, for answers sent with
    /// `sendfile` (see [`crate::filed`]).
    filing: Arc<Mutex<Filing>>,
    /// When the items were assembled: since then the store has not changed.
    made: Instant,
}

/// How long items must have stood unchanged before they are copied into a
/// file (see [`Items::filed`]).
pub const FILE_AFTER: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
struct Filing {
    /// Answers that could have been sent from the file.
    asked: u32,
    filed: Option<Bytes>,
    /// Being copied into a file (on a blocking thread).
    copying: bool,
    /// When an answer last took the file.
    used: Option<Instant>,
    /// Filing failed once: these items are sent from their parts.
    failed: bool,
}

impl Items {
    /// The items of `objects`, in order, each in its own encoding (a store's
    /// objects all have the store's).
    pub fn new<'a>(objects: impl ExactSizeIterator<Item = &'a Arc<Object>> + Clone) -> Items {
        let count = objects.len();
        // Protobuf field headers, back to back in one buffer the parts slice.
        let mut prefixes = Vec::new();
        for object in objects.clone().filter(|o| o.encoding() == Encoding::Protobuf) {
            put_header(&mut prefixes, 2, object.bytes().len());
        }
        let prefixes = Bytes::from(prefixes);
        let prefix_bytes = prefixes.len();
        let mut prefix_start = 0;
        let mut parts = Vec::with_capacity(2 * count);
        for (i, object) in objects.enumerate() {
            match object.encoding() {
                Encoding::Json => {
                    let (brace, bytes) = object.item_parts();
                    let separator: &'static [u8] = match (i > 0, brace) {
                        (false, false) => b"",
                        (false, true) => b"{",
                        (true, false) => b",",
                        (true, true) => b",{",
                    };
                    if !separator.is_empty() {
                        parts.push(Bytes::from_static(separator));
                    }
                    parts.push(bytes);
                }
                Encoding::Protobuf => {
                    let len = object.bytes().len();
                    let end = prefix_start + field_len(len) - len;
                    parts.push(prefixes.slice(prefix_start..end));
                    prefix_start = end;
                    parts.push(object.bytes().clone());
                }
            }
        }
        parts.retain(|part| !part.is_empty());
        Items {
            len: parts.iter().map(Bytes::len).sum(),
            parts: parts.into(),
            count,
            prefix_bytes,
            filing: Arc::default(),
            made: Instant::now(),
        }
    }

    /// The items in one memory file, for an answer its socket sends with
    /// `sendfile`, once there is one.
    ///
    /// The copy is started by an answer that finds the items asked for
    /// before and at least [`FILE_AFTER`] old: a store that stood still
    /// that long is likely to be listed again at the same version, while
    /// under churn each version is listed a few times at most and a copy
    /// would cost more than it saves. It runs on a blocking thread: no
    /// answer waits for it, they are sent from the parts until it is done
    /// (outside a runtime it is copied at once). The file is kept for the
    /// answers after it until [`Items::release_idle`]. Never for items too
    /// small to be worth a file, nor once filing failed.
    pub fn filed(&self) -> Option<Bytes> {
        if self.len < crate::filed::MIN_LEN {
            return None;
        }
        let mut filing = self.filing.lock().unwrap_or_else(PoisonError::into_inner);
        filing.asked = filing.asked.saturating_add(1);
        if filing.filed.is_none()
            && filing.asked >= 2
            && self.made.elapsed() >= FILE_AFTER
            && !filing.copying
            && !filing.failed
        {
            filing.copying = true;
            let (parts, len, state) = (Arc::clone(&self.parts), self.len, Arc::clone(&self.filing));
            let copy = move || {
                if Arc::strong_count(&state) == 1 {
                    return; // The items were let go of meanwhile.
                }
                let filed = crate::filed::file(&parts, len);
                let mut filing = state.lock().unwrap_or_else(PoisonError::into_inner);
                filing.copying = false;
                match filed {
                    Ok(filed) => {
                        filing.filed = Some(filed);
                        filing.used = Some(Instant::now());
                    }
                    Err(error) => {
                        tracing::warn!(%error, bytes = len, "cannot file a list: sending it from memory");
                        filing.failed = true;
                    }
                }
            };
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn_blocking(copy)),
                Err(_) => {
                    drop(filing);
                    copy();
                    filing = self.filing.lock().unwrap_or_else(PoisonError::into_inner);
                }
            }
        }
        let filed = filing.filed.clone()?;
        filing.used = Some(Instant::now());
        Some(filed)
    }

    /// Lets go of the items' file if no answer took it for `idle` (answers
    /// still sending it keep it until they are done).
    pub fn release_idle(&self, idle: Duration) {
        let mut filing = self.filing.lock().unwrap_or_else(PoisonError::into_inner);
        if filing.used.is_some_and(|used| used.elapsed() >= idle) {
            filing.filed = None;
            filing.used = None;
            filing.asked = 0;
        }
    }

    /// How many objects.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Bytes held beyond the objects' own (for the memory budget): the
    /// parts, and the file if there is one.
    pub fn overhead(&self) -> usize {
        let filed = self
            .filing
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .filed
            .as_ref()
            .map_or(0, Bytes::len);
        std::mem::size_of::<Items>()
            + self.parts.len() * std::mem::size_of::<Bytes>()
            + self.prefix_bytes
            + filed
    }
}

/// A list answer: a head, the items, a tail.
#[derive(Debug)]
pub struct ListBody {
    head: Bytes,
    items: Arc<Items>,
    /// The items' file, for a socket that sends it with `sendfile`.
    filed: Option<Bytes>,
    tail: Bytes,
    encoding: Encoding,
    len: usize,
}

impl ListBody {
    /// A JSON list: `{"kind":…,"apiVersion":…,"metadata":{…},"items":[…]}`.
    /// `custom`: the apiextensions server's lists, which always carry an
    /// empty `continue`.
    pub fn json(
        kind: &str,
        api_version: &str,
        resource_version: u64,
        custom: bool,
        items: Arc<Items>,
    ) -> ListBody {
        let mut head = Vec::with_capacity(128);
        head.extend_from_slice(b"{\"kind\":");
        write_json_string(&mut head, kind);
        head.extend_from_slice(b",\"apiVersion\":");
        write_json_string(&mut head, api_version);
        if custom {
            head.extend_from_slice(b",\"metadata\":{\"continue\":\"\",\"resourceVersion\":\"");
        } else {
            head.extend_from_slice(b",\"metadata\":{\"resourceVersion\":\"");
        }
        head.extend_from_slice(resource_version.to_string().as_bytes());
        head.extend_from_slice(b"\"},\"items\":[");
        ListBody::new(head, items, Bytes::from_static(b"]}\n"), Encoding::Json)
    }

    /// A protobuf list: the `kind` with a `ListMeta` at `resource_version`
    /// and the items' messages (see [`crate::protobuf::list_body`]).
    pub fn protobuf(kind: &str, api_version: &str, resource_version: u64, items: Arc<Items>) -> ListBody {
        let rv = resource_version.to_string();
        // ListMeta{selfLink: "", resourceVersion, continue: ""}.
        let mut list_meta = Vec::with_capacity(8 + rv.len());
        list_meta.extend_from_slice(&[0x0a, 0x00]);
        put_field(&mut list_meta, 2, rv.as_bytes());
        list_meta.extend_from_slice(&[0x1a, 0x00]);
        let raw_len = field_len(list_meta.len()) + items.len;
        let mut head = Vec::with_capacity(64 + list_meta.len());
        begin_envelope(&mut head, api_version, kind, raw_len);
        put_field(&mut head, 1, &list_meta);
        let mut tail = Vec::with_capacity(4);
        end_envelope(&mut tail);
        ListBody::new(head, items, Bytes::from(tail), Encoding::Protobuf)
    }

    fn new(head: Vec<u8>, items: Arc<Items>, tail: Bytes, encoding: Encoding) -> ListBody {
        ListBody {
            len: head.len() + items.len + tail.len(),
            head: Bytes::from(head),
            items,
            filed: None,
            tail,
            encoding,
        }
    }

    /// The answer's length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the answer is empty (never: a list has a head).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How many objects the list holds.
    pub fn objects(&self) -> usize {
        self.items.count
    }

    /// Sends the items from their memory file where there is one (see
    /// [`Items::filed`]): for an answer whose socket writer sends filed
    /// bytes with `sendfile`. The bytes are the same.
    #[must_use]
    pub fn from_file(mut self) -> ListBody {
        self.filed = self.items.filed();
        self
    }

    /// The answer's bytes, in order: the head, the items (their file in one
    /// chunk, or chunks of [`MAX_SLICES`] shared parts), the tail; nothing
    /// copied.
    pub fn chunks(self) -> impl Iterator<Item = Chunk> + Send {
        let ListBody {
            head,
            items,
            filed,
            tail,
            ..
        } = self;
        let len = if filed.is_some() { 0 } else { items.parts.len() };
        let ranges = (0..len)
            .step_by(MAX_SLICES)
            .map(move |start| start..(start + MAX_SLICES).min(len));
        std::iter::once(Chunk::from(head))
            .chain(filed.map(Chunk::from))
            .chain(ranges.map(move |range| Chunk::shared(&items.parts, range)))
            .chain(std::iter::once(Chunk::from(tail)))
    }

    /// The `200` response streaming this list, with `Content-Length`.
    pub fn into_response(self) -> Response<ChunkStream> {
        let content_type = match self.encoding {
            Encoding::Json => "application/json",
            Encoding::Protobuf => crate::protobuf::CONTENT_TYPE,
        };
        let len = self.len;
        let stream: ChunkStream = Box::pin(futures::stream::iter(self.chunks().map(Ok::<Chunk, FetchError>)));
        let mut response = Response::new(stream);
        *response.status_mut() = StatusCode::OK;
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        headers.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-cache, private"),
        );
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        response
    }

    /// The whole answer in one buffer (tests, and answers kept whole).
    pub fn to_vec(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len);
        for chunk in self.chunks() {
            chunk.slices().for_each(|slice| out.extend_from_slice(slice));
        }
        out
    }
}

fn write_json_string(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(&mut *out, s).expect("invariant: writing to a Vec cannot fail");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(objects: &[Arc<Object>]) -> Arc<Items> {
        Arc::new(Items::new(objects.iter()))
    }

    fn configmap(name: &str, rv: u64) -> Arc<Object> {
        let json = format!(
            r#"{{"kind":"ConfigMap","apiVersion":"v1","metadata":{{"name":"{name}","namespace":"ns","resourceVersion":"{rv}"}},"data":{{"k":"v"}}}}"#
        );
        Arc::new(Object::from_json(Bytes::from(json), true, |_| Default::default()).expect("object"))
    }

    fn custom(name: &str, rv: u64) -> Arc<Object> {
        let json = format!(
            r#"{{"apiVersion":"example.com/v1","kind":"Widget","metadata":{{"name":"{name}","resourceVersion":"{rv}"}}}}"#
        );
        Arc::new(Object::from_json(Bytes::from(json), false, |_| Default::default()).expect("object"))
    }

    fn configmap_of(name: &str, data: usize) -> Arc<Object> {
        let json = format!(
            r#"{{"kind":"ConfigMap","apiVersion":"v1","metadata":{{"name":"{name}","namespace":"ns","resourceVersion":"3"}},"data":{{"k":"{}"}}}}"#,
            "x".repeat(data)
        );
        Arc::new(Object::from_json(Bytes::from(json), true, |_| Default::default()).expect("object"))
    }

    /// Whether `slice` lies within one of `objects`' stored bytes.
    fn within(objects: &[Arc<Object>], slice: &[u8]) -> bool {
        objects
            .iter()
            .any(|o| o.bytes().as_ptr_range().contains(&slice.as_ptr()))
    }

    #[test]
    fn lists_go_out_in_chunks_of_shared_parts_with_no_object_copied() {
        let objects: Vec<Arc<Object>> = (0..2_000)
            .map(|i| configmap_of(&format!("cm-{i:04}"), if i % 10 == 0 { 5_000 } else { 100 }))
            .collect();
        let shared = items(&objects);
        let body = || ListBody::json("ConfigMapList", "v1", 7, false, shared.clone());
        let chunks: Vec<Chunk> = body().chunks().collect();
        let sent: Vec<u8> = chunks.iter().cloned().flat_map(Chunk::into_bytes).collect();
        assert_eq!(sent, body().to_vec(), "the same bytes");
        assert_eq!(sent.len(), body().len());
        // The head, 4,000 parts (a separator and an object each, but the
        // first object's) in chunks of 64, the tail.
        assert_eq!(chunks.len(), 1 + 3_999usize.div_ceil(MAX_SLICES) + 1);
        assert!(chunks.iter().all(|c| c.slice_count() <= MAX_SLICES));
        let uncopied = chunks
            .iter()
            .flat_map(Chunk::slices)
            .filter(|s| within(&objects, s))
            .count();
        assert_eq!(uncopied, 2_000, "every object is sent as its stored bytes");
        // Every answer shares the one array of parts.
        drop(chunks);
        assert_eq!(Arc::strong_count(&shared.parts), 1);
        let held: Vec<Chunk> = body().chunks().skip(1).take(3).collect();
        assert_eq!(
            Arc::strong_count(&shared.parts),
            4,
            "a reference per chunk, not per object"
        );
        drop(held);
        // The protobuf list too.
        let pb: Vec<Arc<Object>> = (0..500)
            .map(|i| {
                let mut meta = Vec::new();
                put_field(&mut meta, 1, format!("cm-{i}").as_bytes());
                put_field(&mut meta, 6, b"3");
                let mut message = Vec::new();
                put_field(&mut message, 1, &meta);
                put_field(&mut message, 2, &vec![7u8; if i % 50 == 0 { 20_000 } else { 50 }]);
                Arc::new(Object::from_protobuf(Bytes::from(message), |_| Default::default()).expect("object"))
            })
            .collect();
        let pb_body = || ListBody::protobuf("ConfigMapList", "v1", 9, items(&pb));
        let chunks: Vec<Chunk> = pb_body().chunks().collect();
        let sent: Vec<u8> = chunks.iter().cloned().flat_map(Chunk::into_bytes).collect();
        assert_eq!(sent, pb_body().to_vec());
        let uncopied = chunks
            .iter()
            .flat_map(Chunk::slices)
            .filter(|s| within(&pb, s))
            .count();
        assert_eq!(uncopied, 500);
    }

    #[test]
    fn json_lists_are_the_bytes_write_item_renders_and_share_the_objects() {
        let objects = vec![configmap("a", 3), configmap("b", 4), configmap("c", 5)];
        let mut expected =
            br#"{"kind":"ConfigMapList","apiVersion":"v1","metadata":{"resourceVersion":"7"},"items":["#
                .to_vec();
        for (i, o) in objects.iter().enumerate() {
            if i > 0 {
                expected.push(b',');
            }
            o.write_item(&mut expected);
        }
        expected.extend_from_slice(b"]}\n");
        let body = ListBody::json("ConfigMapList", "v1", 7, false, items(&objects));
        assert_eq!(body.len(), expected.len());
        let value: serde_json::Value = serde_json::from_slice(&expected).expect("valid JSON");
        assert_eq!(value["items"][1]["metadata"]["name"], "b");
        assert!(
            value["items"][1].get("kind").is_none(),
            "list items carry no type meta"
        );
        // The objects' chunks point into the stored objects' buffers.
        let chunks: Vec<Chunk> = ListBody::json("ConfigMapList", "v1", 7, false, items(&objects))
            .chunks()
            .collect();
        let stored = objects[1].bytes().as_ptr_range();
        assert!(
            chunks
                .iter()
                .flat_map(Chunk::slices)
                .any(|c| stored.contains(&c.as_ptr())),
            "an object's bytes are shared, not copied"
        );
        assert_eq!(body.to_vec(), expected);
    }

    #[test]
    fn custom_resource_lists_keep_type_meta_and_an_empty_continue() {
        let objects = vec![custom("w1", 9), custom("w2", 10)];
        let bytes = ListBody::json("WidgetList", "example.com/v1", 12, true, items(&objects)).to_vec();
        let value: serde_json::Value = serde_json::from_slice(&bytes).expect("valid JSON");
        assert_eq!(
            value["metadata"],
            serde_json::json!({"continue": "", "resourceVersion": "12"})
        );
        assert_eq!(value["items"][0]["kind"], "Widget");
        assert_eq!(value["items"].as_array().map(Vec::len), Some(2));
    }

    #[test]
    fn empty_lists_are_whole() {
        let bytes = ListBody::json("ConfigMapList", "v1", 1, false, items(&[])).to_vec();
        assert_eq!(
            bytes,
            b"{\"kind\":\"ConfigMapList\",\"apiVersion\":\"v1\",\"metadata\":{\"resourceVersion\":\"1\"},\"items\":[]}\n"
        );
        let body = ListBody::protobuf("ConfigMapList", "v1", 1, items(&[]));
        let len = body.len();
        let bytes = body.to_vec();
        assert_eq!(bytes.len(), len);
        assert_eq!(
            bytes,
            crate::protobuf::list_body("v1", "ConfigMapList", 1, std::iter::empty())
        );
    }

    #[test]
    fn protobuf_lists_are_the_bytes_list_body_renders() {
        // Messages with an ObjectMeta (name, namespace, resourceVersion) and
        // a payload of assorted sizes (one- to three-byte length varints).
        let messages: Vec<Vec<u8>> = [0usize, 5, 200, 20_000]
            .iter()
            .enumerate()
            .map(|(i, payload)| {
                let mut meta = Vec::new();
                put_field(&mut meta, 1, format!("o{i}").as_bytes());
                put_field(&mut meta, 3, b"ns");
                put_field(&mut meta, 6, (i + 1).to_string().as_bytes());
                let mut message = Vec::new();
                put_field(&mut message, 1, &meta);
                put_field(&mut message, 2, &vec![7u8; *payload]);
                message
            })
            .collect();
        let objects: Vec<Arc<Object>> = messages
            .iter()
            .map(|m| {
                Arc::new(
                    Object::from_protobuf(Bytes::from(m.clone()), |_| Default::default()).expect("object"),
                )
            })
            .collect();
        let expected = crate::protobuf::list_body("v1", "PodList", 42, messages.iter().map(Vec::as_slice));
        let body = ListBody::protobuf("PodList", "v1", 42, items(&objects));
        assert_eq!(body.len(), expected.len());
        assert_eq!(body.to_vec(), expected);
    }

    #[test]
    fn a_list_asked_again_is_sent_from_its_file_with_the_same_bytes() {
        let objects: Vec<Arc<Object>> = (0..1_000)
            .map(|i| configmap_of(&format!("cm-{i:04}"), 500))
            .collect();
        let items = items(&objects);
        assert!(items.len >= crate::filed::MIN_LEN, "large enough to file");
        let body = || ListBody::json("ConfigMapList", "v1", 7, false, Arc::clone(&items));
        let expected = body().to_vec();
        let bare = items.overhead();

        // The first answer per version is sent from the store's bytes, and
        // so is the second while the items are younger than FILE_AFTER.
        let first = body().from_file();
        assert!(first.filed.is_none());
        assert_eq!(first.to_vec(), expected);
        assert!(body().from_file().filed.is_none(), "items changed just now");
        std::thread::sleep(FILE_AFTER);
        // Asked again once they stood still: filed. Head, the file whole, tail.
        let second = body().from_file();
        let chunks: Vec<Chunk> = second.chunks().collect();
        assert_eq!(chunks.len(), 3);
        assert!(crate::filed::is_filed(bytes::Buf::chunk(&chunks[1])));
        assert_eq!(bytes::Buf::remaining(&chunks[1]), items.len);
        let bytes: Vec<u8> = chunks
            .iter()
            .flat_map(|c| c.slices().flatten().copied().collect::<Vec<_>>())
            .collect();
        assert_eq!(bytes, expected);
        assert_eq!(items.overhead(), bare + items.len, "the file is counted");
        // Later answers share the same file.
        let third = body().from_file();
        assert_eq!(
            third.filed.as_ref().map(|b| b.as_ptr()),
            items
                .filing
                .lock()
                .expect("lock")
                .filed
                .as_ref()
                .map(|b| b.as_ptr())
        );
        assert_eq!(third.to_vec(), expected);

        // Used just now: kept.
        items.release_idle(Duration::from_secs(60));
        assert_eq!(items.overhead(), bare + items.len);
        items.release_idle(Duration::ZERO);
        assert_eq!(items.overhead(), bare, "released");
        // Filed again only when asked twice again.
        assert!(body().from_file().filed.is_none());
        assert!(body().from_file().filed.is_some());
    }

    #[test]
    fn small_lists_are_never_filed() {
        let objects = vec![configmap("a", 3), configmap("b", 4)];
        let items = items(&objects);
        for _ in 0..3 {
            assert!(
                ListBody::json("ConfigMapList", "v1", 5, false, Arc::clone(&items))
                    .from_file()
                    .filed
                    .is_none()
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn within_a_runtime_the_file_is_made_aside_and_used_once_ready() {
        let objects: Vec<Arc<Object>> = (0..1_000)
            .map(|i| configmap_of(&format!("cm-{i:04}"), 500))
            .collect();
        let items = items(&objects);
        let body = || ListBody::json("ConfigMapList", "v1", 7, false, Arc::clone(&items));
        let expected = body().to_vec();
        assert!(body().from_file().filed.is_none(), "the first answer");
        tokio::time::sleep(FILE_AFTER).await;
        // The second starts the copy and does not wait for it.
        let second = body().from_file();
        assert_eq!(second.to_vec(), expected);
        let deadline = Instant::now() + Duration::from_secs(10);
        let third = loop {
            let answer = body().from_file();
            if answer.filed.is_some() {
                break answer;
            }
            assert!(Instant::now() < deadline, "never filed");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        assert_eq!(third.to_vec(), expected);
    }
}
