//! A LIST read as it arrives, in JSON or protobuf: each item is handed over as soon as its
//! last byte is in, and the rest of the list (kind, metadata) is kept, small,
//! to be parsed at the end. A sync of a large resource then holds the
//! objects it has built and one partial item — not the whole body, which
//! for 100,000 pods is half a gigabyte.
//!
//! The JSON scanner follows the structure only as far as it must: strings
//! (with escapes, so braces inside them do not count), and nesting depth.
//! The items are the objects directly inside the `items` array of the
//! top-level object; everything else at the top level goes to the rest,
//! with `items` left as `[]`. The protobuf reader walks the envelope's and
//! the list's fields by their headers: the `ListMeta` and each item are
//! taken whole, everything else is passed over as it arrives.

use bytes::{Bytes, BytesMut};

/// Splits a JSON list body into its items and the rest.
#[derive(Debug, Default)]
pub struct JsonListSplitter {
    depth: u32,
    in_string: bool,
    escaped: bool,
    /// Inside the top-level `items` array.
    in_items: bool,
    /// The item being read (from its `{`), if any.
    item: Option<BytesMut>,
    /// The top level without the items.
    rest: Vec<u8>,
    /// The last string at depth 1, to know the key an array belongs to.
    key: Vec<u8>,
    in_key: bool,
}

impl JsonListSplitter {
    pub fn new() -> JsonListSplitter {
        JsonListSplitter::default()
    }

    /// Reads `chunk`, calling `item` with every item it completes.
    ///
    /// # Errors
    /// What `item` returns.
    pub fn feed<E>(&mut self, chunk: &[u8], mut item: impl FnMut(Bytes) -> Result<(), E>) -> Result<(), E> {
        // Bytes of `chunk` from `start` belong to the open item.
        let mut start = None;
        for (i, &b) in chunk.iter().enumerate() {
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == b'"' {
                    self.in_string = false;
                    self.in_key = false;
                }
                if self.in_key && self.in_string {
                    self.key.push(b);
                }
                if self.item.is_none() && !self.in_items {
                    self.rest.push(b);
                }
                continue;
            }
            match b {
                b'"' => {
                    self.in_string = true;
                    if self.depth == 1 {
                        self.in_key = true;
                        self.key.clear();
                    }
                }
                b'{' | b'[' => {
                    if self.depth == 1 && b == b'[' && self.key == b"items" {
                        self.in_items = true;
                        self.rest.extend_from_slice(b"[]");
                        self.depth += 1;
                        continue;
                    }
                    if self.in_items && self.depth == 2 && b == b'{' {
                        self.item = Some(BytesMut::new());
                        start = Some(i);
                    }
                    self.depth += 1;
                }
                b'}' | b']' => {
                    self.depth = self.depth.saturating_sub(1);
                    if self.in_items && self.depth == 2 && b == b'}' {
                        if let Some(mut open) = self.item.take() {
                            open.extend_from_slice(&chunk[start.take().unwrap_or(0)..=i]);
                            item(open.freeze())?;
                        }
                        continue;
                    }
                    if self.in_items && self.depth == 1 && b == b']' {
                        self.in_items = false;
                        continue;
                    }
                }
                _ => {}
            }
            if self.item.is_none() && !self.in_items {
                self.rest.push(b);
            }
        }
        // An item still open keeps what this chunk had of it.
        if let Some(open) = &mut self.item {
            open.extend_from_slice(&chunk[start.unwrap_or(0)..]);
        }
        Ok(())
    }

    /// The list without its items (`"items":[]`), once the body is complete.
    pub fn rest(&self) -> &[u8] {
        &self.rest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]]) -> (Vec<String>, String) {
        let mut splitter = JsonListSplitter::new();
        let mut items = Vec::new();
        for chunk in chunks {
            splitter
                .feed(chunk, |item| {
                    items.push(String::from_utf8(item.to_vec()).expect("utf-8"));
                    Ok::<(), ()>(())
                })
                .expect("fed");
        }
        (items, String::from_utf8(splitter.rest().to_vec()).expect("utf-8"))
    }

    const LIST: &str = r#"{"kind":"ConfigMapList","apiVersion":"v1","metadata":{"resourceVersion":"42"},"items":[{"metadata":{"name":"a","annotations":{"x":"}]{[\"\\"}},"data":{"k":"v"}},{"metadata":{"name":"b"},"data":{"items":"[{"}}]}"#;

    #[test]
    fn items_and_the_rest_at_every_chunk_boundary() {
        let whole: serde_json::Value = serde_json::from_str(LIST).expect("valid JSON");
        let expected: Vec<String> = whole["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|i| serde_json::to_string(i).expect("json"))
            .collect();
        let bytes = LIST.as_bytes();
        for cut in 0..=bytes.len() {
            let (items, rest) = split(&[&bytes[..cut], &bytes[cut..]]);
            let reparsed: Vec<String> = items
                .iter()
                .map(|i| {
                    let v: serde_json::Value =
                        serde_json::from_str(i).unwrap_or_else(|e| panic!("cut {cut}: {e}: {i}"));
                    serde_json::to_string(&v).expect("json")
                })
                .collect();
            assert_eq!(reparsed, expected, "cut at {cut}");
            let rest: serde_json::Value =
                serde_json::from_str(&rest).unwrap_or_else(|e| panic!("cut {cut}: {e}: {rest}"));
            assert_eq!(rest["metadata"]["resourceVersion"], "42");
            assert_eq!(rest["items"], serde_json::json!([]));
            assert_eq!(rest["kind"], "ConfigMapList");
        }
        // One byte at a time.
        let chunks: Vec<&[u8]> = bytes.chunks(1).collect();
        let (items, _) = split(&chunks);
        assert_eq!(items.len(), 2);
        assert_eq!(
            items[0],
            &LIST[LIST.find("{\"metadata\":{\"name\":\"a\"").expect("a")
                ..LIST.find(",{\"metadata\":{\"name\":\"b\"").expect("b")]
        );
    }

    #[test]
    fn metadata_after_the_items_and_empty_lists_work_too() {
        let (items, rest) = split(&[br#"{"items":[],"metadata":{"resourceVersion":"7"},"kind":"PodList"}"#]);
        assert!(items.is_empty());
        let rest: serde_json::Value = serde_json::from_str(&rest).expect("json");
        assert_eq!(rest["metadata"]["resourceVersion"], "7");
        let (items, rest) = split(&[
            br#"{"metadata":{"resourceVersion":"8"},"items":[{"a":1}],"extra":{"items":[{"b":2}]}}"#,
        ]);
        assert_eq!(items, [r#"{"a":1}"#]);
        let rest: serde_json::Value = serde_json::from_str(&rest).expect("json");
        assert_eq!(
            rest["extra"]["items"][0]["b"], 2,
            "only the top-level items are split off"
        );
    }
}

/// Splits a protobuf list body (`k8s\0`, then a `runtime.Unknown` whose
/// `raw` field holds the list message) into its items' messages as they
/// arrive, and its `ListMeta`; nothing but the item being read is kept.
#[derive(Debug, Default)]
pub struct ProtobufListSplitter {
    /// Received and not yet taken apart.
    pending: BytesMut,
    stage: Stage,
    /// The list's `ListMeta` message, once read.
    list_meta: Option<Bytes>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Before the magic number.
    #[default]
    Magic,
    /// Between the envelope's fields.
    Envelope,
    /// Inside the list message, with this many of its bytes still to come.
    List(u64),
    /// Passing over bytes; then back to where it was (`in_list`: and how
    /// many of the list's bytes are left after them).
    Skip { bytes: u64, in_list: Option<u64> },
}

/// What could not be taken apart.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a protobuf list: {0}")]
pub struct ProtobufListError(&'static str);

/// A varint at the start of `bytes`: its value and length, if complete.
fn varint(bytes: &[u8]) -> Result<Option<(u64, usize)>, ProtobufListError> {
    let mut value = 0u64;
    for (i, &b) in bytes.iter().enumerate().take(10) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    if bytes.len() >= 10 {
        return Err(ProtobufListError("a varint longer than 10 bytes"));
    }
    Ok(None)
}

/// A field's key and, for length-delimited fields, its length: (number,
/// wire type, length or 0, bytes of the header), if complete.
fn field_header(bytes: &[u8]) -> Result<Option<(u64, u64, u64, usize)>, ProtobufListError> {
    let Some((key, key_len)) = varint(bytes)? else {
        return Ok(None);
    };
    let (number, wire) = (key >> 3, key & 7);
    match wire {
        2 => Ok(varint(&bytes[key_len..])?.map(|(len, n)| (number, wire, len, key_len + n))),
        // A varint: its bytes are passed over like a field's content.
        0 => Ok(varint(&bytes[key_len..])?.map(|(_, n)| (number, wire, n as u64, key_len))),
        1 => Ok(Some((number, wire, 8, key_len))),
        5 => Ok(Some((number, wire, 4, key_len))),
        _ => Err(ProtobufListError("an unknown wire type")),
    }
}

impl ProtobufListSplitter {
    pub fn new() -> ProtobufListSplitter {
        ProtobufListSplitter::default()
    }

    /// Reads `chunk`, calling `item` with every item message it completes.
    ///
    /// # Errors
    /// Not a protobuf list, or what `item` returns.
    pub fn feed<E: From<ProtobufListError>>(
        &mut self,
        chunk: &[u8],
        mut item: impl FnMut(Bytes) -> Result<(), E>,
    ) -> Result<(), E> {
        self.pending.extend_from_slice(chunk);
        loop {
            match self.stage {
                Stage::Magic => {
                    if self.pending.len() < 4 {
                        return Ok(());
                    }
                    if self.pending[..4] != crate::protobuf::MAGIC[..] {
                        return Err(ProtobufListError("no magic number").into());
                    }
                    let _ = self.pending.split_to(4);
                    self.stage = Stage::Envelope;
                }
                Stage::Envelope => {
                    let Some((number, wire, len, header)) = field_header(&self.pending)? else {
                        return Ok(());
                    };
                    let _ = self.pending.split_to(header);
                    self.stage = if number == 2 && wire == 2 {
                        Stage::List(len)
                    } else {
                        Stage::Skip {
                            bytes: len,
                            in_list: None,
                        }
                    };
                }
                Stage::List(0) => self.stage = Stage::Envelope,
                Stage::List(left) => {
                    let Some((number, wire, len, header)) = field_header(&self.pending)? else {
                        return Ok(());
                    };
                    let whole = header as u64 + len;
                    let after = left
                        .checked_sub(whole)
                        .ok_or(ProtobufListError("a field longer than its list"))?;
                    let wanted = wire == 2 && (number == 1 || number == 2);
                    if !wanted {
                        let _ = self.pending.split_to(header);
                        self.stage = Stage::Skip {
                            bytes: len,
                            in_list: Some(after),
                        };
                        continue;
                    }
                    let Ok(whole_len) = usize::try_from(whole) else {
                        return Err(ProtobufListError("a field too large").into());
                    };
                    if self.pending.len() < whole_len {
                        // Room for the rest of it, once.
                        self.pending.reserve(whole_len - self.pending.len());
                        return Ok(());
                    }
                    let _ = self.pending.split_to(header);
                    let content = self.pending.split_to(whole_len - header).freeze();
                    self.stage = Stage::List(after);
                    if number == 1 {
                        self.list_meta = Some(content);
                    } else {
                        item(content)?;
                    }
                }
                Stage::Skip { bytes, in_list } => {
                    let available = self.pending.len() as u64;
                    let take = bytes.min(available);
                    let _ = self.pending.split_to(take as usize);
                    if take < bytes {
                        self.stage = Stage::Skip {
                            bytes: bytes - take,
                            in_list,
                        };
                        return Ok(());
                    }
                    self.stage = match in_list {
                        Some(left) => Stage::List(left),
                        None => Stage::Envelope,
                    };
                }
            }
        }
    }

    /// The list's `ListMeta` message, once the body is complete.
    ///
    /// # Errors
    /// The body ended inside a field, or held no list.
    pub fn finish(self) -> Result<Bytes, ProtobufListError> {
        if !self.pending.is_empty() || !matches!(self.stage, Stage::Envelope | Stage::List(0)) {
            return Err(ProtobufListError("the body ends inside a field"));
        }
        self.list_meta.ok_or(ProtobufListError("no list metadata"))
    }
}

#[cfg(test)]
mod protobuf_tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{}/testdata/protobuf/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn split(chunks: &[&[u8]]) -> Result<(Vec<Bytes>, Bytes), ProtobufListError> {
        let mut splitter = ProtobufListSplitter::new();
        let mut items = Vec::new();
        for chunk in chunks {
            splitter.feed(chunk, |item| {
                items.push(item);
                Ok::<(), ProtobufListError>(())
            })?;
        }
        Ok((items, splitter.finish()?))
    }

    #[test]
    fn the_api_servers_lists_split_the_same_at_every_chunk_boundary() {
        for name in [
            "configmaps.pb",
            "configmaps-empty.pb",
            "namespaces.pb",
            "events.pb",
            "jobs.pb",
        ] {
            let body = fixture(name);
            let list = crate::protobuf::unwrap(&body).expect("envelope");
            let (rv, expected) = crate::protobuf::list_items(list.raw).expect("list");
            for cut in 0..=body.len() {
                let (items, meta) =
                    split(&[&body[..cut], &body[cut..]]).unwrap_or_else(|e| panic!("{name} cut {cut}: {e}"));
                let items: Vec<&[u8]> = items.iter().map(|i| &i[..]).collect();
                assert_eq!(items, expected, "{name} cut at {cut}");
                let mut wrapped = Vec::new();
                crate::protobuf::put_field(&mut wrapped, 1, &meta);
                assert_eq!(
                    crate::protobuf::list_items(&wrapped).expect("meta").0,
                    rv,
                    "{name}"
                );
            }
            let bytes: Vec<&[u8]> = body.chunks(1).collect();
            assert_eq!(
                split(&bytes).expect("byte by byte").0.len(),
                expected.len(),
                "{name}"
            );
        }
    }

    #[test]
    fn truncated_and_foreign_bodies_are_errors() {
        let body = fixture("configmaps.pb");
        assert!(split(&[&body[..body.len() - 3]]).is_err(), "truncated");
        assert!(split(&[br#"{"kind":"Status"}"#]).is_err(), "JSON");
    }
}

impl From<ProtobufListError> for crate::upstream::FetchError {
    fn from(error: ProtobufListError) -> Self {
        crate::upstream::FetchError(error.to_string())
    }
}
