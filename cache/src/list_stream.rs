//! A JSON LIST read as it arrives: each item is handed over as soon as its
//! last byte is in, and the rest of the list (kind, metadata) is kept, small,
//! to be parsed at the end. A sync of a large resource then holds the
//! objects it has built and one partial item — not the whole body, which
//! for 100,000 pods is half a gigabyte.
//!
//! The scanner follows JSON's structure only as far as it must: strings
//! (with escapes, so braces inside them do not count), and nesting depth.
//! The items are the objects directly inside the `items` array of the
//! top-level object; everything else at the top level goes to the rest,
//! with `items` left as `[]`.

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
