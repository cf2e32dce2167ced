//! Label and field selectors, parsed and matched exactly as the API server
//! (k8s.io/apimachinery v1.20) does, so that a list served from the cache
//! holds the very objects the API server would have returned.
//!
//! ```text
//!   ?labelSelector=… ──► LabelSelector::parse ──► LabelSelector::matches(metadata.labels)
//!   ?fieldSelector=… ──► FieldSelector::parse ──► every field in supported_fields(group, resource)?
//!                                                  no  ──► forward (the API server answers 400)
//!                                                  yes ──► FieldSelector::matches(field_values(…, object))
//! ```
//!
//! Parse errors carry the API server's own message text, but kache never
//! answers them itself: a selector that does not parse, or names a field the
//! resource does not support, is forwarded so that the client sees the API
//! server's answer byte for byte.
//!
//! Inputs are `&str`: a query whose selector decodes to invalid UTF-8 must be
//! forwarded rather than parsed lossily (Go compares the raw bytes).

pub mod field;
pub mod label;

pub use field::{
    custom_resource_fields, escape_value, field_paths, field_tables, field_values, supported_fields,
    unescape_value, FieldOperator, FieldRequirement, FieldSelector, FieldSource,
};
pub use label::{LabelSelector, LabelSource, Operator, Requirement};

use std::fmt;

/// Which of the two selector languages an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SelectorKind {
    /// `labelSelector`.
    Label,
    /// `fieldSelector`.
    Field,
}

/// A selector the API server would reject with `400 Bad Request`.
///
/// `Display` gives exactly the message of the error the API server's parser
/// returns (`labels.Parse`, `fields.ParseSelector`), which is what it puts in
/// the `Status` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectorError {
    kind: SelectorKind,
    message: String,
}

impl SelectorError {
    pub(crate) fn label(message: String) -> SelectorError {
        SelectorError {
            kind: SelectorKind::Label,
            message,
        }
    }

    pub(crate) fn field(message: String) -> SelectorError {
        SelectorError {
            kind: SelectorKind::Field,
            message,
        }
    }

    /// Which selector the error is about.
    pub fn kind(&self) -> SelectorKind {
        self.kind
    }

    /// The API server's message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for SelectorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for SelectorError {}

/// Go's `strconv.Quote` (what `%q` prints), for error messages.
///
/// Exact for ASCII. For other characters Go consults Unicode's tables
/// (`unicode.IsPrint`, whose version depends on the Go release that built
/// the API server); this approximation escapes controls, white space, format
/// and private-use characters and the unassigned planes, and so differs from
/// Go only for unassigned code points scattered among assigned ones, which
/// Go escapes and this does not.
pub(crate) fn go_quote(s: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '\x07' => out.push_str("\\a"),
            '\x08' => out.push_str("\\b"),
            '\x0c' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\x0b' => out.push_str("\\v"),
            c if go_is_print(c) => out.push(c),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if (c as u32) < 0x10000 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => {
                let _ = write!(out, "\\U{:08x}", c as u32);
            }
        }
    }
    out.push('"');
    out
}

/// An approximation of Go's `unicode.IsPrint`: letters, marks, numbers,
/// punctuation, symbols and the ASCII space.
fn go_is_print(c: char) -> bool {
    if c.is_ascii() {
        return (' '..='~').contains(&c);
    }
    let u = c as u32;
    let format = matches!(
        u,
        0xad | 0x600..=0x605
            | 0x61c
            | 0x6dd
            | 0x70f
            | 0x8e2
            | 0x180e
            | 0x200b..=0x200f
            | 0x202a..=0x202e
            | 0x2060..=0x2064
            | 0x2066..=0x206f
            | 0xfeff
            | 0xfff9..=0xfffb
            | 0x110bd
            | 0x110cd
            | 0x13430..=0x13438
            | 0x1bca0..=0x1bca3
            | 0x1d173..=0x1d17a
            | 0xe0001
            | 0xe0020..=0xe007f
    );
    let private_use = matches!(u, 0xe000..=0xf8ff | 0xf0000..=0xffffd | 0x100000..=0x10fffd);
    let noncharacter = (0xfdd0..=0xfdef).contains(&u) || (u & 0xfffe) == 0xfffe;
    // Planes 3 to 14 hold nothing but CJK extension G (Unicode 13), tags and
    // variation selectors.
    let unassigned = matches!(u, 0x3134b..=0xdffff | 0xe0080..=0xe00ff | 0xe01f0..=0xeffff);
    !(c.is_control() || c.is_whitespace() || format || private_use || noncharacter || unassigned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn go_quote_escapes_like_strconv_quote() {
        let cases = [
            ("", r#""""#),
            ("abc", r#""abc""#),
            ("a\"b\\c", r#""a\"b\\c""#),
            ("\x00\x01\x7f", r#""\x00\x01\x7f""#),
            ("\x07\x08\x0c\n\r\t\x0b", r#""\a\b\f\n\r\t\v""#),
            ("café 日本", "\"café 日本\""),
            ("\u{a0}\u{200b}\u{feff}", r#""\u00a0\u200b\ufeff""#),
            ("\u{e000}\u{10fffd}", r#""\ue000\U0010fffd""#),
            // Unassigned, and CJK extension G (Unicode 13, as in Go 1.16+).
            ("\u{534d3}\u{e0080}", r#""\U000534d3\U000e0080""#),
            ("\u{30000}", "\"\u{30000}\""),
        ];
        for (input, want) in cases {
            assert_eq!(go_quote(input), want, "quoting {input:?}");
        }
    }

    /// splitmix64: a small deterministic generator, so failures reproduce.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        /// Up to `max` pieces drawn from `alphabet`, concatenated.
        fn string(&mut self, alphabet: &[&str], max: usize) -> String {
            let len = self.below(max + 1);
            (0..len).map(|_| alphabet[self.below(alphabet.len())]).collect()
        }
    }

    const LABEL_ALPHABET: &[&str] = &[
        "x",
        "y",
        "a",
        "Z",
        "1",
        "0",
        "in",
        "notin",
        " in ",
        " notin ",
        "=",
        "==",
        "!=",
        "!",
        "(",
        ")",
        ",",
        " ",
        "\t",
        "\n",
        "\r",
        ">",
        "<",
        "/",
        ".",
        "-",
        "_",
        "example.com/",
        "\0",
        "\\",
        "é",
        "日",
        "\u{a0}",
        "-1",
        "9223372036854775808",
        "~",
    ];
    const FIELD_ALPHABET: &[&str] = &[
        "metadata.name",
        "x",
        "a",
        "",
        "=",
        "==",
        "!=",
        "!",
        ",",
        "\\",
        "\\,",
        "\\=",
        "\\\\",
        " ",
        "é",
        "\0",
        "in",
        "(",
    ];

    fn label_sets() -> Vec<BTreeMap<&'static str, &'static str>> {
        vec![
            BTreeMap::new(),
            [("x", "a"), ("y", "")].into(),
            [("x", "10"), ("a", "1"), ("in", "notin")].into(),
            [("example.com/x", "y"), ("Z", "-1")].into(),
        ]
    }

    #[test]
    fn label_parsing_never_panics_and_printing_re_parses_to_the_same_selector() {
        let mut rng = Rng(0x6b61_6368);
        let sets = label_sets();
        let mut parsed = 0;
        for _ in 0..100_000 {
            let input = rng.string(LABEL_ALPHABET, 12);
            let Ok(selector) = LabelSelector::parse(&input) else {
                continue;
            };
            parsed += 1;
            let printed = selector.to_string();
            let again = LabelSelector::parse(&printed)
                .unwrap_or_else(|e| panic!("{input:?} printed as {printed:?}, which fails: {e}"));
            assert_eq!(again, selector, "{input:?} printed as {printed:?}");
            for labels in &sets {
                let _ = selector.matches(labels);
            }
        }
        assert!(
            parsed > 1_000,
            "the alphabet yields valid selectors too ({parsed})"
        );
    }

    #[test]
    fn field_parsing_never_panics_and_printing_re_parses_to_the_same_terms() {
        let mut rng = Rng(0x6669_656c);
        let fields: BTreeMap<&str, &str> = [("x", "a"), ("metadata.name", "=,\\")].into();
        let mut parsed = 0;
        for _ in 0..100_000 {
            let input = rng.string(FIELD_ALPHABET, 10);
            let Ok(selector) = FieldSelector::parse(&input) else {
                continue;
            };
            parsed += 1;
            let printed = selector.to_string();
            let again = FieldSelector::parse(&printed)
                .unwrap_or_else(|e| panic!("{input:?} printed as {printed:?}, which fails: {e}"));
            // Terms are sorted by their raw text, which escaping can reorder;
            // the terms themselves, and so the matches, are the same.
            let sorted = |s: &FieldSelector| {
                let mut terms = s.requirements().to_vec();
                terms.sort_by(|a, b| (a.field(), a.value()).cmp(&(b.field(), b.value())));
                terms
            };
            assert_eq!(
                sorted(&again),
                sorted(&selector),
                "{input:?} printed as {printed:?}"
            );
            assert_eq!(again.matches(&fields), selector.matches(&fields));
            assert_eq!(
                again.to_string(),
                FieldSelector::parse(&again.to_string()).unwrap().to_string()
            );
        }
        assert!(
            parsed > 1_000,
            "the alphabet yields valid selectors too ({parsed})"
        );
    }
}
