//! Kubernetes' protobuf encoding, as far as the cache needs it: wire-format
//! framing only, no schema. Built-in resources are cached a second time, in
//! protobuf, when a client first reads them so; this module reads what such a
//! store needs from the API server's bytes and frames cached object messages
//! into the API server's answers.
//!
//! ```text
//!   LIST/GET body   k8s\0 ++ Unknown{1: TypeMeta{1: apiVersion, 2: kind},
//!                                    2: raw message, 3: "" (contentEncoding),
//!                                    4: "" (contentType)}
//!   list message    {1: ListMeta{1: "" (selfLink), 2: resourceVersion, 3: "" (continue)},
//!                    2: item message, 2: item message, …}
//!   object message  {1: ObjectMeta{1: name, 3: namespace, 6: resourceVersion,
//!                                  11: labels (map entries {1: key, 2: value}), …}, 2: spec, …}
//!   watch stream    (u32 big-endian length ++ WatchEvent)*  — no magic, no envelope
//!   WatchEvent      {1: type, 2: RawExtension{1: k8s\0 ++ Unknown(object)}}
//! ```
//!
//! Verified against kube-apiserver v1.20 (captures in `testdata/protobuf/`):
//! an object message carries no type meta, so a list item is byte for byte the
//! `raw` of the object's GET envelope; the API server writes fields in
//! field-number order and emits every non-pointer field even when empty (empty
//! strings as `0a 00`, `remainingItemCount` omitted); a BOOKMARK's object is the
//! type's empty message with only `metadata.resourceVersion` set (for pods that
//! includes empty `spec` and `status` messages, so it cannot be made up without
//! the schema: the reflector remembers the API server's own, see
//! [`bookmark_object`]); a missing object is a protobuf `Status`.
//!
//! # Why a second store, and not protobuf bytes next to the JSON
//!
//! The JSON store stays exactly what it is (JSON-only use pays nothing). For
//! protobuf, one reflector per (resource, encoding) lists and watches in
//! protobuf into a store of its own. Joining protobuf bytes onto JSON objects
//! by (namespace, name, resourceVersion) instead would need two upstream
//! watches kept in lockstep: a list or a watch event could only be answered
//! once both had seen the same version of every object involved, with waits or
//! fallbacks whenever one runs ahead — more code, more states, no memory saved
//! (the protobuf bytes are held either way, and a protobuf object is about
//! two thirds of its JSON). A separate store is consistent by construction:
//! every list, GET and watch is rendered from one snapshot at one
//! resourceVersion, through the same store code as JSON.
//!
//! What such a store needs beyond the bytes is what selectors look at:
//! labels, name and namespace come from `ObjectMeta` (field 1 of every
//! built-in object), and the few per-resource selectable fields (pods'
//! `spec.nodeName`, `status.phase`…, events' `involvedObject.*`…) are read by
//! following their field numbers, listed in [`field_values`] from the v1.20
//! `generated.proto` files. A resource whose selectable fields are not all in
//! that table is not served in protobuf (forwarded), never guessed.

use std::collections::BTreeMap;

use bytes::Bytes;

/// What every protobuf body starts with.
pub const MAGIC: &[u8; 4] = b"k8s\0";
/// The media type of protobuf answers (and of protobuf requests' `Accept`).
pub const CONTENT_TYPE: &str = "application/vnd.kubernetes.protobuf";
/// The `Content-Type` of a protobuf watch stream.
pub const WATCH_CONTENT_TYPE: &str = "application/vnd.kubernetes.protobuf;stream=watch";

/// Bytes that are not the protobuf the API server sends.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub String);

fn error(message: impl Into<String>) -> DecodeError {
    DecodeError(message.into())
}

// ---------------------------------------------------------------------------
// Wire format

/// One field's value, by wire type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value<'a> {
    Varint(u64),
    Fixed64(u64),
    Bytes(&'a [u8]),
    Fixed32(u32),
}

impl<'a> Value<'a> {
    fn bytes(self) -> Option<&'a [u8]> {
        match self {
            Value::Bytes(b) => Some(b),
            _ => None,
        }
    }

    fn varint(self) -> Option<u64> {
        match self {
            Value::Varint(v) => Some(v),
            _ => None,
        }
    }
}

/// The fields of one message, in the order they are encoded.
pub struct Fields<'a> {
    buf: &'a [u8],
    failed: bool,
}

/// Iterates over the fields of `message`; a malformed field ends the
/// iteration with an error.
pub fn fields(message: &[u8]) -> Fields<'_> {
    Fields {
        buf: message,
        failed: false,
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u32, Value<'a>), DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() || self.failed {
            return None;
        }
        let result = self.read_field();
        self.failed = result.is_err();
        Some(result)
    }
}

impl<'a> Fields<'a> {
    fn read_field(&mut self) -> Result<(u32, Value<'a>), DecodeError> {
        let key = read_varint(&mut self.buf)?;
        let number = u32::try_from(key >> 3).map_err(|_| error("field number out of range"))?;
        let value = match key & 7 {
            0 => Value::Varint(read_varint(&mut self.buf)?),
            1 => Value::Fixed64(u64::from_le_bytes(
                self.take(8)?.try_into().expect("invariant: 8 bytes"),
            )),
            2 => {
                let len =
                    usize::try_from(read_varint(&mut self.buf)?).map_err(|_| error("length out of range"))?;
                Value::Bytes(self.take(len)?)
            }
            5 => Value::Fixed32(u32::from_le_bytes(
                self.take(4)?.try_into().expect("invariant: 4 bytes"),
            )),
            other => return Err(error(format!("unsupported wire type {other}"))),
        };
        Ok((number, value))
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < len {
            return Err(error("truncated field"));
        }
        let (head, rest) = self.buf.split_at(len);
        self.buf = rest;
        Ok(head)
    }
}

fn read_varint(buf: &mut &[u8]) -> Result<u64, DecodeError> {
    let mut value = 0u64;
    for (i, byte) in buf.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            *buf = &buf[i + 1..];
            return Ok(value);
        }
    }
    Err(error("truncated or overlong varint"))
}

/// The first value of field `number` in `message`.
fn first(message: &[u8], number: u32) -> Result<Option<Value<'_>>, DecodeError> {
    for field in fields(message) {
        let (n, value) = field?;
        if n == number {
            return Ok(Some(value));
        }
    }
    Ok(None)
}

/// The value at a path of field numbers (the first occurrence at each step,
/// which for a repeated message is its element 0).
fn at<'a>(message: &'a [u8], path: &[u32]) -> Option<Value<'a>> {
    let (last, steps) = path.split_last()?;
    let mut message = message;
    for step in steps {
        message = first(message, *step).ok()??.bytes()?;
    }
    first(message, *last).ok()?
}

fn utf8(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn varint_len(mut value: u64) -> usize {
    let mut len = 1;
    while value >= 0x80 {
        value >>= 7;
        len += 1;
    }
    len
}

pub(crate) fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Bytes of a length-delimited field with a one-byte key (fields 1–15).
pub(crate) fn field_len(len: usize) -> usize {
    1 + varint_len(len as u64) + len
}

/// A length-delimited field with a one-byte key: header and content.
pub(crate) fn put_field(out: &mut Vec<u8>, number: u8, content: &[u8]) {
    put_header(out, number, content.len());
    out.extend_from_slice(content);
}

pub(crate) fn put_header(out: &mut Vec<u8>, number: u8, len: usize) {
    debug_assert!((1..16).contains(&number), "one-byte keys only");
    out.push(number << 3 | 2);
    put_varint(out, len as u64);
}

// ---------------------------------------------------------------------------
// Decoding what the API server sends

/// A `runtime.Unknown` envelope (after the magic).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unknown<'a> {
    pub api_version: &'a [u8],
    pub kind: &'a [u8],
    /// The message itself.
    pub raw: &'a [u8],
}

/// Parses a protobuf body: magic, then an `Unknown`.
///
/// # Errors
/// No magic, or a malformed envelope.
pub fn unwrap(body: &[u8]) -> Result<Unknown<'_>, DecodeError> {
    let envelope = body
        .strip_prefix(MAGIC)
        .ok_or_else(|| error("not a protobuf body (no k8s\\0 magic)"))?;
    let mut unknown = Unknown {
        api_version: b"",
        kind: b"",
        raw: b"",
    };
    for field in fields(envelope) {
        match field? {
            (1, Value::Bytes(type_meta)) => {
                for field in fields(type_meta) {
                    match field? {
                        (1, Value::Bytes(v)) => unknown.api_version = v,
                        (2, Value::Bytes(k)) => unknown.kind = k,
                        _ => {}
                    }
                }
            }
            (2, Value::Bytes(raw)) => unknown.raw = raw,
            (3, Value::Bytes(encoding)) if !encoding.is_empty() => {
                return Err(error("unsupported content encoding in protobuf envelope"))
            }
            _ => {}
        }
    }
    Ok(unknown)
}

/// A list message: its resourceVersion and its items' messages.
///
/// # Errors
/// A malformed message.
pub fn list_items(list: &[u8]) -> Result<(String, Vec<&[u8]>), DecodeError> {
    let mut resource_version = String::new();
    let mut items = Vec::new();
    for field in fields(list) {
        match field? {
            (1, Value::Bytes(meta)) => {
                if let Some(Value::Bytes(rv)) = first(meta, 2)? {
                    resource_version = utf8(rv);
                }
            }
            (2, Value::Bytes(item)) => items.push(item),
            _ => {}
        }
    }
    Ok((resource_version, items))
}

/// What the store keeps from an object's `ObjectMeta`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Meta {
    pub name: String,
    pub namespace: String,
    pub resource_version: String,
    pub labels: BTreeMap<String, String>,
}

/// Reads the `ObjectMeta` (field 1) of a built-in object's message.
///
/// # Errors
/// A malformed message.
pub fn object_meta(object: &[u8]) -> Result<Meta, DecodeError> {
    let mut meta = Meta::default();
    let Some(Value::Bytes(object_meta)) = first(object, 1)? else {
        return Ok(meta);
    };
    for field in fields(object_meta) {
        match field? {
            (1, Value::Bytes(name)) => meta.name = utf8(name),
            (3, Value::Bytes(namespace)) => meta.namespace = utf8(namespace),
            (6, Value::Bytes(rv)) => meta.resource_version = utf8(rv),
            (11, Value::Bytes(entry)) => {
                let (mut key, mut value) = (String::new(), String::new());
                for field in fields(entry) {
                    match field? {
                        (1, Value::Bytes(k)) => key = utf8(k),
                        (2, Value::Bytes(v)) => value = utf8(v),
                        _ => {}
                    }
                }
                meta.labels.insert(key, value);
            }
            _ => {}
        }
    }
    Ok(meta)
}

/// One event of a protobuf watch stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchEvent<'a> {
    pub kind: &'a [u8],
    pub object: Unknown<'a>,
}

/// Parses a watch frame's `WatchEvent` (without its length prefix).
///
/// # Errors
/// A malformed event, or an object without its envelope.
pub fn watch_event(event: &[u8]) -> Result<WatchEvent<'_>, DecodeError> {
    let mut kind: &[u8] = b"";
    let mut object = None;
    for field in fields(event) {
        match field? {
            (1, Value::Bytes(k)) => kind = k,
            (2, Value::Bytes(raw_extension)) => {
                if let Some(Value::Bytes(raw)) = first(raw_extension, 1)? {
                    object = Some(unwrap(raw)?);
                }
            }
            _ => {}
        }
    }
    let object = object.ok_or_else(|| error("watch event without an object"))?;
    Ok(WatchEvent { kind, object })
}

/// Splits complete frames (u32 big-endian length, then the frame) off the
/// front of `buffer`; returns them and how many bytes they took.
pub fn split_frames(buffer: &[u8]) -> (Vec<&[u8]>, usize) {
    let mut frames = Vec::new();
    let mut consumed = 0;
    while let Some(header) = buffer.get(consumed..consumed + 4) {
        let len = u32::from_be_bytes(header.try_into().expect("invariant: 4 bytes")) as usize;
        let Some(frame) = buffer.get(consumed + 4..consumed + 4 + len) else {
            break;
        };
        frames.push(frame);
        consumed += 4 + len;
    }
    (frames, consumed)
}

/// A `Status` message's `code` and `message`.
pub fn status(status: &[u8]) -> (Option<u64>, String) {
    let code = at(status, &[6]).and_then(Value::varint);
    let message = at(status, &[3])
        .and_then(Value::bytes)
        .map(utf8)
        .unwrap_or_default();
    (code, message)
}

// ---------------------------------------------------------------------------
// Selectable fields

/// Where a selectable field's value is, by field numbers from the object's
/// message, and how Go formats it.
enum Source {
    /// A string: the first non-empty of these paths.
    Text(&'static [&'static [u32]]),
    /// `strconv.FormatBool`; missing is `false`.
    Bool(&'static [u32]),
    /// An int32 in decimal; missing is `0`.
    Int(&'static [u32]),
    /// Accepted by the API server, always empty.
    Empty,
}

/// The protobuf location of `field` on (group, version, resource), for every
/// field [`crate::selector::supported_fields`] lists; `None` when not known
/// for this version (the resource is then not served in protobuf).
///
/// Field numbers from v1.20's `staging/src/k8s.io/api/*/generated.proto`:
/// ObjectMeta{name 1, namespace 3}; Pod{spec 2, status 3}, PodSpec{restartPolicy 3,
/// serviceAccountName 8, serviceAccount 9, nodeName 10, schedulerName 19},
/// PodStatus{phase 1, podIP 6, nominatedNodeName 11, podIPs 12}, PodIP{ip 1};
/// NodeSpec{unschedulable 4}; ReplicationControllerStatus{replicas 1};
/// core Event{involvedObject 2, reason 3, source 5, type 9, reportingComponent 14},
/// ObjectReference{kind 1, namespace 2, name 3, uid 4, apiVersion 5,
/// resourceVersion 6, fieldPath 7}, EventSource{component 1};
/// NamespaceStatus{phase 1}; Secret{type 3}; CertificateSigningRequestSpec
/// {signerName 7} (v1 and v1beta1); events.k8s.io Event{reportingController 4,
/// reason 7, regarding 8, type 11} (v1 and v1beta1); JobStatus{succeeded 5}.
/// The alternatives mirror [`crate::selector::field_values`].
fn source(group: &str, version: &str, resource: &str, field: &str) -> Option<Source> {
    use Source::{Bool, Empty, Int, Text};
    Some(match (group, version, resource, field) {
        (_, _, _, "metadata.name") => Text(&[&[1, 1]]),
        (_, _, _, "metadata.namespace") => Text(&[&[1, 3]]),
        ("", "v1", "pods", "spec.nodeName" | "spec.host") => Text(&[&[2, 10]]),
        ("", "v1", "pods", "spec.restartPolicy") => Text(&[&[2, 3]]),
        ("", "v1", "pods", "spec.schedulerName") => Text(&[&[2, 19]]),
        ("", "v1", "pods", "spec.serviceAccountName") => Text(&[&[2, 8], &[2, 9]]),
        ("", "v1", "pods", "status.phase") => Text(&[&[3, 1]]),
        ("", "v1", "pods", "status.podIP") => Text(&[&[3, 6], &[3, 12, 1]]),
        ("", "v1", "pods", "status.podIPs") => Empty,
        ("", "v1", "pods", "status.nominatedNodeName") => Text(&[&[3, 11]]),
        ("", "v1", "nodes", "spec.unschedulable") => Bool(&[2, 4]),
        ("", "v1", "replicationcontrollers", "status.replicas") => Int(&[3, 1]),
        ("", "v1", "events", field) => match field {
            "involvedObject.kind" => Text(&[&[2, 1]]),
            "involvedObject.namespace" => Text(&[&[2, 2]]),
            "involvedObject.name" => Text(&[&[2, 3]]),
            "involvedObject.uid" => Text(&[&[2, 4]]),
            "involvedObject.apiVersion" => Text(&[&[2, 5]]),
            "involvedObject.resourceVersion" => Text(&[&[2, 6]]),
            "involvedObject.fieldPath" => Text(&[&[2, 7]]),
            "reason" => Text(&[&[3]]),
            "reportingComponent" => Text(&[&[14]]),
            "source" => Text(&[&[5, 1], &[14]]),
            "type" => Text(&[&[9]]),
            _ => return None,
        },
        ("", "v1", "namespaces", "status.phase") => Text(&[&[3, 1]]),
        ("", "v1", "secrets", "type") => Text(&[&[3]]),
        ("certificates.k8s.io", "v1" | "v1beta1", "certificatesigningrequests", "spec.signerName") => {
            Text(&[&[2, 7]])
        }
        ("events.k8s.io", "v1" | "v1beta1", "events", field) => match field {
            "regarding.kind" => Text(&[&[8, 1]]),
            "regarding.namespace" => Text(&[&[8, 2]]),
            "regarding.name" => Text(&[&[8, 3]]),
            "regarding.uid" => Text(&[&[8, 4]]),
            "regarding.apiVersion" => Text(&[&[8, 5]]),
            "regarding.resourceVersion" => Text(&[&[8, 6]]),
            "regarding.fieldPath" => Text(&[&[8, 7]]),
            "reason" => Text(&[&[7]]),
            "reportingController" => Text(&[&[4]]),
            "type" => Text(&[&[11]]),
            _ => return None,
        },
        ("batch", "v1", "jobs", "status.successful") => Int(&[3, 5]),
        ("batch", _, "cronjobs", "status.successful") => Empty,
        _ => return None,
    })
}

/// Whether every selectable field of a built-in resource can be read from
/// its protobuf messages (see [`source`]).
pub fn fields_known(group: &str, version: &str, resource: &str) -> bool {
    crate::selector::supported_fields(group, resource).is_some_and(|fields| {
        fields
            .iter()
            .all(|f| source(group, version, resource, f).is_some())
    })
}

/// The selectable field values of a built-in object's message, as
/// [`crate::selector::field_values`] computes them from its JSON (fields
/// without a known location are left out; see [`fields_known`]).
pub fn field_values(group: &str, version: &str, resource: &str, object: &[u8]) -> BTreeMap<String, String> {
    let supported = crate::selector::supported_fields(group, resource).unwrap_or(&[]);
    let mut values = BTreeMap::new();
    for &field in supported {
        let value = match source(group, version, resource, field) {
            Some(Source::Text(paths)) => paths
                .iter()
                .filter_map(|path| at(object, path).and_then(Value::bytes))
                .find(|s| !s.is_empty())
                .map(utf8)
                .unwrap_or_default(),
            Some(Source::Bool(path)) => {
                let set = at(object, path).and_then(Value::varint).unwrap_or(0) != 0;
                set.to_string()
            }
            // int32 is sign-extended to 64 bits on the wire.
            Some(Source::Int(path)) => {
                (at(object, path).and_then(Value::varint).unwrap_or(0) as i64 as i32).to_string()
            }
            Some(Source::Empty) => String::new(),
            None => continue,
        };
        values.insert(field.to_owned(), value);
    }
    values
}

// ---------------------------------------------------------------------------
// Encoding the API server's answers

/// `TypeMeta{1: apiVersion, 2: kind}`.
fn type_meta(api_version: &str, kind: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(field_len(api_version.len()) + field_len(kind.len()));
    put_field(&mut out, 1, api_version.as_bytes());
    put_field(&mut out, 2, kind.as_bytes());
    out
}

/// Magic and `Unknown` with `raw_len` bytes of message to follow the header;
/// the caller appends the message, then [`end_envelope`].
pub(crate) fn begin_envelope(out: &mut Vec<u8>, api_version: &str, kind: &str, raw_len: usize) {
    out.extend_from_slice(MAGIC);
    put_field(out, 1, &type_meta(api_version, kind));
    put_header(out, 2, raw_len);
}

/// `contentEncoding` and `contentType`, both empty, as the API server
/// writes them: the end of an `Unknown` envelope.
pub const ENVELOPE_END: &[u8] = &[0x1a, 0x00, 0x22, 0x00];

pub(crate) fn end_envelope(out: &mut Vec<u8>) {
    out.extend_from_slice(ENVELOPE_END);
}

fn envelope_len(api_version: &str, kind: &str, raw_len: usize) -> usize {
    MAGIC.len() + field_len(field_len(api_version.len()) + field_len(kind.len())) + field_len(raw_len) + 4
}

/// A GET answer: the object's message in its envelope.
pub fn object_body(api_version: &str, kind: &str, object: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(envelope_len(api_version, kind, object.len()));
    begin_envelope(&mut out, api_version, kind, object.len());
    out.extend_from_slice(object);
    end_envelope(&mut out);
    out
}

/// A LIST answer: `kind` (`PodList`) with a `ListMeta` at `resource_version`
/// and the items' messages, in the given order.
pub fn list_body<'a, I>(api_version: &str, kind: &str, resource_version: u64, items: I) -> Vec<u8>
where
    I: IntoIterator<Item = &'a [u8]>,
    I::IntoIter: Clone,
{
    let items = items.into_iter();
    let rv = resource_version.to_string();
    // ListMeta{selfLink: "", resourceVersion, continue: ""}.
    let mut list_meta = Vec::with_capacity(8 + rv.len());
    list_meta.extend_from_slice(&[0x0a, 0x00]);
    put_field(&mut list_meta, 2, rv.as_bytes());
    list_meta.extend_from_slice(&[0x1a, 0x00]);
    let raw_len = field_len(list_meta.len()) + items.clone().map(|item| field_len(item.len())).sum::<usize>();
    let mut out = Vec::with_capacity(envelope_len(api_version, kind, raw_len));
    begin_envelope(&mut out, api_version, kind, raw_len);
    put_field(&mut out, 1, &list_meta);
    for item in items {
        put_field(&mut out, 2, item);
    }
    end_envelope(&mut out);
    out
}

/// One frame of a watch stream: length prefix, then a `WatchEvent` of type
/// `event` whose object is `object` in its envelope.
pub fn watch_frame(event: &str, api_version: &str, kind: &str, object: &[u8]) -> Bytes {
    let mut out = watch_frame_head(event, api_version, kind, object.len());
    out.extend_from_slice(object);
    end_envelope(&mut out);
    Bytes::from(out)
}

/// What precedes an object's message of `object_len` bytes in its
/// [`watch_frame`]; [`ENVELOPE_END`] follows it. A watcher replaying a
/// store sends the three without copying the message.
pub fn watch_frame_head(event: &str, api_version: &str, kind: &str, object_len: usize) -> Vec<u8> {
    let raw_len = envelope_len(api_version, kind, object_len);
    let raw_extension_len = field_len(raw_len);
    let event_len = field_len(event.len()) + field_len(raw_extension_len);
    let mut out = Vec::with_capacity(4 + event_len);
    out.extend_from_slice(&u32::try_from(event_len).unwrap_or(u32::MAX).to_be_bytes());
    put_field(&mut out, 1, event.as_bytes());
    put_header(&mut out, 2, raw_extension_len);
    put_header(&mut out, 1, raw_len);
    begin_envelope(&mut out, api_version, kind, object_len);
    out
}

/// The object's message with `metadata.resourceVersion` replaced, every other
/// byte as it was (for a DELETED sent when an object leaves a selector, and
/// for bookmarks).
pub fn with_resource_version(object: &[u8], resource_version: u64) -> Bytes {
    let rv = resource_version.to_string();
    let rewrite = || -> Result<Vec<u8>, DecodeError> {
        let mut out = Vec::with_capacity(object.len() + 8);
        let mut done = false;
        for field in raw_fields(object) {
            let (number, bytes, value) = field?;
            match (number, value, done) {
                (1, Value::Bytes(meta), false) => {
                    let mut new_meta = Vec::with_capacity(meta.len() + 8);
                    let mut replaced = false;
                    for field in raw_fields(meta) {
                        let (number, bytes, _) = field?;
                        if number == 6 && !replaced {
                            put_field(&mut new_meta, 6, rv.as_bytes());
                            replaced = true;
                        } else if number > 6 && !replaced {
                            put_field(&mut new_meta, 6, rv.as_bytes());
                            new_meta.extend_from_slice(bytes);
                            replaced = true;
                        } else {
                            new_meta.extend_from_slice(bytes);
                        }
                    }
                    if !replaced {
                        put_field(&mut new_meta, 6, rv.as_bytes());
                    }
                    put_field(&mut out, 1, &new_meta);
                    done = true;
                }
                (n, _, false) if n > 1 => {
                    put_field(&mut out, 1, &bookmark_meta(&rv));
                    out.extend_from_slice(bytes);
                    done = true;
                }
                _ => out.extend_from_slice(bytes),
            }
        }
        if !done {
            put_field(&mut out, 1, &bookmark_meta(&rv));
        }
        Ok(out)
    };
    match rewrite() {
        Ok(out) => Bytes::from(out),
        Err(_) => Bytes::copy_from_slice(object),
    }
}

/// `ObjectMeta{resourceVersion}` alone.
fn bookmark_meta(rv: &str) -> Vec<u8> {
    let mut meta = Vec::with_capacity(2 + rv.len());
    put_field(&mut meta, 6, rv.as_bytes());
    meta
}

/// A BOOKMARK's object at `resource_version`: the API server's own empty
/// object of the type (`template`, from a bookmark the reflector received)
/// with the version replaced; without one, a message holding only
/// `metadata.resourceVersion`, which decodes to the same object (every other
/// field of the API server's is empty) but is not byte-identical.
pub fn bookmark_object(template: Option<&[u8]>, resource_version: u64) -> Bytes {
    with_resource_version(template.unwrap_or(&[]), resource_version)
}

/// The object's message with `metadata.annotations[key]` set to `value`
/// (`ObjectMeta` field 12, a `map<string, string>`: one `{1: key, 2: value}`
/// entry per annotation, in key order, as the generated marshaller writes
/// them), every other byte as it was (a BOOKMARK that ends a streaming
/// list's initial events, see [`crate::reads`]).
pub fn with_annotation(object: &[u8], key: &str, value: &str) -> Bytes {
    let mut entry = Vec::with_capacity(4 + key.len() + value.len());
    put_field(&mut entry, 1, key.as_bytes());
    put_field(&mut entry, 2, value.as_bytes());
    let rewrite = || -> Result<Vec<u8>, DecodeError> {
        let mut out = Vec::with_capacity(object.len() + entry.len() + 8);
        let mut done = false;
        for field in raw_fields(object) {
            let (number, bytes, value) = field?;
            match (number, value, done) {
                (1, Value::Bytes(meta), false) => {
                    put_field(&mut out, 1, &annotated_meta(meta, key, &entry)?);
                    done = true;
                }
                (n, _, false) if n > 1 => {
                    put_field(&mut out, 1, &annotated_meta(&[], key, &entry)?);
                    out.extend_from_slice(bytes);
                    done = true;
                }
                _ => out.extend_from_slice(bytes),
            }
        }
        if !done {
            put_field(&mut out, 1, &annotated_meta(&[], key, &entry)?);
        }
        Ok(out)
    };
    match rewrite() {
        Ok(out) => Bytes::from(out),
        Err(_) => Bytes::copy_from_slice(object),
    }
}

/// `ObjectMeta` with the annotation `entry` (of `key`) in its place: after
/// the fields before 12 and the entries of smaller keys, replacing one of
/// the same key.
fn annotated_meta(meta: &[u8], key: &str, entry: &[u8]) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::with_capacity(meta.len() + entry.len() + 2);
    let mut placed = false;
    for field in raw_fields(meta) {
        let (number, bytes, value) = field?;
        if !placed {
            let here = match (number, value) {
                (12, Value::Bytes(existing)) => {
                    let existing_key = first(existing, 1)?.and_then(Value::bytes).unwrap_or_default();
                    if existing_key == key.as_bytes() {
                        put_field(&mut out, 12, entry);
                        placed = true;
                        continue;
                    }
                    existing_key > key.as_bytes()
                }
                (number, _) => number > 12,
            };
            if here {
                put_field(&mut out, 12, entry);
                placed = true;
            }
        }
        out.extend_from_slice(bytes);
    }
    if !placed {
        put_field(&mut out, 12, entry);
    }
    Ok(out)
}

/// The fields of a message with each one's encoded bytes.
fn raw_fields(message: &[u8]) -> impl Iterator<Item = Result<(u32, &[u8], Value<'_>), DecodeError>> {
    let mut rest = message;
    let mut failed = false;
    std::iter::from_fn(move || {
        if rest.is_empty() || failed {
            return None;
        }
        let mut iter = fields(rest);
        let result = iter.next()?;
        let taken = rest.len() - iter.buf.len();
        let (bytes, tail) = rest.split_at(taken);
        rest = tail;
        failed = result.is_err();
        Some(result.map(|(number, value)| (number, bytes, value)))
    })
}

#[cfg(test)]
mod tests;
