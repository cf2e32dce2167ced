//! LIST answers streamed from a snapshot without copying the objects.
//!
//! A cached object is kept as the bytes the API server sent (`Bytes`,
//! reference-counted). A list answer is those bytes in order between a small
//! head and tail, so it is streamed as a sequence of chunks that share the
//! store's buffers: the head, then per item its separator (JSON: `,` and the
//! `{` that replaces the dropped type meta; protobuf: the field header, cut
//! from one buffer made for the whole list) and a slice of the object, then
//! the tail. However many clients read the same list at once, the objects
//! exist once; each answer holds only its snapshot's list of pointers. The
//! total length is known up front, so the answer carries `Content-Length`
//! like the API server's.
//!
//! The bytes are exactly those [`crate::reads`] rendered into one buffer
//! before (and the API server sends): see the tests.
//!
//! On the wire, the parts are [`Batched`] into [`Chunk`]s: a list of small
//! objects is two parts per item (separator and object), and each part a
//! body frame of its own costs more than copying it does — 20,000 frames
//! for 10,000 pods, each through the body's layers. A chunk holds up to 64
//! parts, written with one `writev`; parts under [`COPY_BELOW`] are copied
//! together, the others are the stores' own bytes, so a list of pods is
//! not copied at all on its way to the socket (copying every part into
//! 32 KB buffers cost a quarter of the CPU of a 10,000-pod answer). A chunk
//! copies at most [`BATCH`] bytes, and the HTTP connection holds at most 16
//! chunks waiting for a slow reader (hyper's write queue), so what an
//! answer holds beyond the snapshot stays under a megabyte and does not
//! grow with the list: fifty clients reading lists at once held 55 MB in
//! queued chunks with 64 KB copied per chunk — more than the list itself.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use crate::chunk::{Builder, Chunk, ChunkStream};
use crate::protobuf::{begin_envelope, end_envelope, field_len, put_field, put_header};
use crate::store::{Encoding, Object};
use crate::upstream::FetchError;

/// A list answer's parts: everything but the objects is small.
#[derive(Debug)]
pub struct ListBody {
    head: Bytes,
    objects: Vec<Arc<Object>>,
    /// Protobuf: every item's field header, back to back; `prefix_ends[i]`
    /// is where item `i`'s ends.
    prefixes: Bytes,
    prefix_ends: Vec<usize>,
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
        objects: Vec<Arc<Object>>,
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
        let tail = Bytes::from_static(b"]}\n");
        let items: usize = objects
            .iter()
            .enumerate()
            .map(|(i, o)| {
                let (brace, len) = o.item_shape();
                usize::from(i > 0) + usize::from(brace) + len
            })
            .sum();
        ListBody {
            len: head.len() + items + tail.len(),
            head: Bytes::from(head),
            objects,
            prefixes: Bytes::new(),
            prefix_ends: Vec::new(),
            tail,
            encoding: Encoding::Json,
        }
    }

    /// A protobuf list: the `kind` with a `ListMeta` at `resource_version`
    /// and the items' messages (see [`crate::protobuf::list_body`]).
    pub fn protobuf(
        kind: &str,
        api_version: &str,
        resource_version: u64,
        objects: Vec<Arc<Object>>,
    ) -> ListBody {
        let rv = resource_version.to_string();
        // ListMeta{selfLink: "", resourceVersion, continue: ""}.
        let mut list_meta = Vec::with_capacity(8 + rv.len());
        list_meta.extend_from_slice(&[0x0a, 0x00]);
        put_field(&mut list_meta, 2, rv.as_bytes());
        list_meta.extend_from_slice(&[0x1a, 0x00]);
        let mut prefixes = Vec::with_capacity(objects.len() * 4);
        let mut prefix_ends = Vec::with_capacity(objects.len());
        let mut raw_len = field_len(list_meta.len());
        for object in &objects {
            let len = object.bytes().len();
            put_header(&mut prefixes, 2, len);
            prefix_ends.push(prefixes.len());
            raw_len += field_len(len);
        }
        let mut head = Vec::with_capacity(64 + list_meta.len());
        begin_envelope(&mut head, api_version, kind, raw_len);
        put_field(&mut head, 1, &list_meta);
        let mut tail = Vec::with_capacity(4);
        end_envelope(&mut tail);
        let items: usize = objects.iter().map(|o| o.bytes().len()).sum();
        ListBody {
            len: head.len() + prefixes.len() + items + tail.len(),
            head: Bytes::from(head),
            objects,
            prefixes: Bytes::from(prefixes),
            prefix_ends,
            tail: Bytes::from(tail),
            encoding: Encoding::Protobuf,
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
        self.objects.len()
    }

    /// The answer's bytes, in order, none of the objects copied.
    pub fn chunks(self) -> Chunks {
        Chunks {
            body: self,
            at: Position::Head,
        }
    }

    /// The answer's bytes in chunks of about [`BATCH`] (see the module's doc).
    pub fn batched(self) -> Batched {
        Batched {
            parts: Some(self.chunks()),
            builder: Builder::new(COPY_BELOW, BATCH),
        }
    }

    /// The `200` response streaming this list, with `Content-Length`.
    pub fn into_response(self) -> Response<ChunkStream> {
        let content_type = match self.encoding {
            Encoding::Json => "application/json",
            Encoding::Protobuf => crate::protobuf::CONTENT_TYPE,
        };
        let len = self.len;
        let stream: ChunkStream =
            Box::pin(futures::stream::iter(self.batched().map(Ok::<Chunk, FetchError>)));
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
            out.extend_from_slice(&chunk);
        }
        out
    }
}

#[derive(Debug, Clone, Copy)]
enum Position {
    Head,
    /// Item `index`; `object`: its separator was sent, the object is next.
    Item {
        index: usize,
        object: bool,
    },
    Tail,
    Done,
}

/// The chunks of a [`ListBody`].
#[derive(Debug)]
pub struct Chunks {
    body: ListBody,
    at: Position,
}

impl Iterator for Chunks {
    type Item = Bytes;

    fn next(&mut self) -> Option<Bytes> {
        loop {
            let (chunk, next) = match self.at {
                Position::Head => (
                    self.body.head.clone(),
                    Position::Item {
                        index: 0,
                        object: false,
                    },
                ),
                Position::Item { index, .. } if index == self.body.objects.len() => {
                    self.at = Position::Tail;
                    continue;
                }
                Position::Item { index, object: false } => {
                    let separator = match self.body.encoding {
                        Encoding::Json => {
                            let (brace, _) = self.body.objects[index].item_shape();
                            Bytes::from_static(match (index > 0, brace) {
                                (false, false) => b"",
                                (false, true) => b"{",
                                (true, false) => b",",
                                (true, true) => b",{",
                            })
                        }
                        Encoding::Protobuf => {
                            let start = index.checked_sub(1).map_or(0, |i| self.body.prefix_ends[i]);
                            self.body.prefixes.slice(start..self.body.prefix_ends[index])
                        }
                    };
                    (separator, Position::Item { index, object: true })
                }
                Position::Item { index, object: true } => {
                    let object = &self.body.objects[index];
                    let bytes = match self.body.encoding {
                        Encoding::Json => object.item_parts().1,
                        Encoding::Protobuf => object.bytes().clone(),
                    };
                    (
                        bytes,
                        Position::Item {
                            index: index + 1,
                            object: false,
                        },
                    )
                }
                Position::Tail => (self.body.tail.clone(), Position::Done),
                Position::Done => return None,
            };
            self.at = next;
            if !chunk.is_empty() {
                return Some(chunk);
            }
        }
    }
}

/// Parts shorter than this are copied together (separators, small
/// objects); longer ones go out as the stores' own bytes.
pub const COPY_BELOW: usize = 1024;
/// At most this much is copied into one chunk (see [`Builder`]).
pub const BATCH: usize = 32 * 1024;

/// A list's parts as [`Chunk`]s of up to [`MAX_SLICES`](crate::chunk::MAX_SLICES)
/// slices: parts under [`COPY_BELOW`] copied together, the others uncopied.
#[derive(Debug)]
pub struct Batched {
    parts: Option<Chunks>,
    builder: Builder,
}

impl Iterator for Batched {
    type Item = Chunk;

    fn next(&mut self) -> Option<Chunk> {
        while let Some(parts) = &mut self.parts {
            match parts.next() {
                Some(part) => {
                    if let Some(chunk) = self.builder.push(part) {
                        return Some(chunk);
                    }
                }
                None => self.parts = None,
            }
        }
        self.builder.finish()
    }
}

fn write_json_string(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(&mut *out, s).expect("invariant: writing to a Vec cannot fail");
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn within(objects: &[Arc<Object>], slice: &Bytes) -> bool {
        objects
            .iter()
            .any(|o| o.bytes().as_ptr_range().contains(&slice.as_ptr()))
    }

    #[test]
    fn batched_lists_copy_small_parts_together_and_pass_the_others_uncopied() {
        // 2,000 small objects, every tenth a kilobyte or more, two large ones.
        let objects: Vec<Arc<Object>> = (0..2_000)
            .map(|i| match i {
                700 | 701 => configmap_of(&format!("big-{i}"), 100 * COPY_BELOW),
                _ if i % 10 == 0 => configmap_of(&format!("cm-{i:04}"), 2 * COPY_BELOW),
                _ => configmap_of(&format!("cm-{i:04}"), 100),
            })
            .collect();
        let body = || ListBody::json("ConfigMapList", "v1", 7, false, objects.clone());
        let parts = body().chunks().count();
        let chunks: Vec<Chunk> = body().batched().collect();
        let sent: Vec<u8> = chunks.iter().cloned().flat_map(|c| c.into_bytes()).collect();
        assert_eq!(sent, body().to_vec(), "the same bytes");
        assert!(
            chunks.len() * 10 < parts,
            "{} chunks for {parts} parts",
            chunks.len()
        );
        let kept: Vec<&Bytes> = chunks
            .iter()
            .flat_map(Chunk::slices)
            .filter(|s| within(&objects, s))
            .collect();
        let large = objects.iter().filter(|o| o.bytes().len() >= COPY_BELOW).count();
        assert_eq!(
            (kept.len(), large),
            (201, 201),
            "every object of a kilobyte or more goes uncopied"
        );
        assert!(kept.iter().all(|s| s.len() >= 2 * COPY_BELOW), "and whole");
        for chunk in &chunks {
            assert!(chunk.slice_count() <= crate::chunk::MAX_SLICES);
            let copied: usize = chunk
                .slices()
                .filter(|s| !within(&objects, s))
                .map(Bytes::len)
                .sum();
            assert!(
                copied < BATCH + COPY_BELOW,
                "{copied} bytes copied into one chunk"
            );
        }
        // The protobuf list too.
        let pb: Vec<Arc<Object>> = (0..500)
            .map(|i| {
                let mut meta = Vec::new();
                put_field(&mut meta, 1, format!("cm-{i}").as_bytes());
                put_field(&mut meta, 6, b"3");
                let mut message = Vec::new();
                put_field(&mut message, 1, &meta);
                put_field(
                    &mut message,
                    2,
                    &vec![7u8; if i % 50 == 0 { 2 * COPY_BELOW } else { 50 }],
                );
                Arc::new(Object::from_protobuf(Bytes::from(message), |_| Default::default()).expect("object"))
            })
            .collect();
        let pb_body = || ListBody::protobuf("ConfigMapList", "v1", 9, pb.clone());
        let chunks: Vec<Chunk> = pb_body().batched().collect();
        let sent: Vec<u8> = chunks.iter().cloned().flat_map(|c| c.into_bytes()).collect();
        assert_eq!(sent, pb_body().to_vec());
        let kept = chunks
            .iter()
            .flat_map(Chunk::slices)
            .filter(|s| within(&pb, s))
            .count();
        assert_eq!(kept, 10);
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
        let body = ListBody::json("ConfigMapList", "v1", 7, false, objects.clone());
        assert_eq!(body.len(), expected.len());
        let value: serde_json::Value = serde_json::from_slice(&expected).expect("valid JSON");
        assert_eq!(value["items"][1]["metadata"]["name"], "b");
        assert!(
            value["items"][1].get("kind").is_none(),
            "list items carry no type meta"
        );
        // The objects' chunks point into the stored objects' buffers.
        let chunks: Vec<Bytes> = ListBody::json("ConfigMapList", "v1", 7, false, objects.clone())
            .chunks()
            .collect();
        let stored = objects[1].bytes().as_ptr_range();
        assert!(
            chunks.iter().any(|c| stored.contains(&c.as_ptr())),
            "an object's bytes are shared, not copied"
        );
        assert_eq!(body.to_vec(), expected);
    }

    #[test]
    fn custom_resource_lists_keep_type_meta_and_an_empty_continue() {
        let objects = vec![custom("w1", 9), custom("w2", 10)];
        let bytes = ListBody::json("WidgetList", "example.com/v1", 12, true, objects).to_vec();
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
        let bytes = ListBody::json("ConfigMapList", "v1", 1, false, Vec::new()).to_vec();
        assert_eq!(
            bytes,
            b"{\"kind\":\"ConfigMapList\",\"apiVersion\":\"v1\",\"metadata\":{\"resourceVersion\":\"1\"},\"items\":[]}\n"
        );
        let body = ListBody::protobuf("ConfigMapList", "v1", 1, Vec::new());
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
        let body = ListBody::protobuf("PodList", "v1", 42, objects);
        assert_eq!(body.len(), expected.len());
        assert_eq!(body.to_vec(), expected);
    }
}
