//! Label selectors: a port of k8s.io/apimachinery v1.20 `pkg/labels/selector.go`
//! (lexer, parser, requirement validation, matching, `String()`), with the
//! key and value checks of `pkg/util/validation`.
//!
//! The port is deliberately literal, quirks included: it is how kache agrees
//! with the API server on every input, not just the sensible ones.

use std::borrow::{Borrow, Cow};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::{BuildHasher, Hash};
use std::str::FromStr;

use super::{go_quote, SelectorError};

/// A set of labels a selector can be matched against.
///
/// Implemented for maps of strings and for the `metadata.labels` object of a
/// JSON object (`serde_json::Map`, where a non-string value counts as absent).
pub trait LabelSource {
    /// The value of label `key`, or `None` if the object has no such label.
    fn label(&self, key: &str) -> Option<&str>;
}

impl<T: LabelSource + ?Sized> LabelSource for &T {
    fn label(&self, key: &str) -> Option<&str> {
        (**self).label(key)
    }
}

impl<K: Borrow<str> + Ord, V: AsRef<str>> LabelSource for BTreeMap<K, V> {
    fn label(&self, key: &str) -> Option<&str> {
        self.get(key).map(AsRef::as_ref)
    }
}

impl<K: Borrow<str> + Hash + Eq, V: AsRef<str>, S: BuildHasher> LabelSource for HashMap<K, V, S> {
    fn label(&self, key: &str) -> Option<&str> {
        self.get(key).map(AsRef::as_ref)
    }
}

impl LabelSource for serde_json::Map<String, serde_json::Value> {
    fn label(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(serde_json::Value::as_str)
    }
}

/// How a requirement relates a label to its values (`selection.Operator`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operator {
    /// `!key`
    DoesNotExist,
    /// `key=value`
    Equals,
    /// `key==value`
    DoubleEquals,
    /// `key in (a,b)`
    In,
    /// `key!=value`
    NotEquals,
    /// `key notin (a,b)`
    NotIn,
    /// `key`
    Exists,
    /// `key>1`
    GreaterThan,
    /// `key<1`
    LessThan,
}

impl Operator {
    /// The operator's name in `selection.Operator` (`"!"`, `"="`, `"=="`,
    /// `"in"`, `"!="`, `"notin"`, `"exists"`, `"gt"`, `"lt"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Operator::DoesNotExist => "!",
            Operator::Equals => "=",
            Operator::DoubleEquals => "==",
            Operator::In => "in",
            Operator::NotEquals => "!=",
            Operator::NotIn => "notin",
            Operator::Exists => "exists",
            Operator::GreaterThan => "gt",
            Operator::LessThan => "lt",
        }
    }
}

/// One condition of a label selector: a key, an operator and its values.
///
/// Values are sorted and free of duplicates (the parser collects them in a
/// set, as the API server's does); `Exists`/`DoesNotExist` have none,
/// `GreaterThan`/`LessThan` exactly one, an integer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Requirement {
    key: String,
    operator: Operator,
    values: Vec<String>,
    /// The integer of `GreaterThan`/`LessThan`, parsed once; 0 otherwise.
    bound: i64,
}

impl Requirement {
    /// `labels.NewRequirement`: validates the key, the number of values for
    /// the operator, and each value.
    fn new(key: &str, operator: Operator, values: Vec<String>) -> Result<Requirement, String> {
        validate_label_key(key)?;
        let mut bound = 0;
        match operator {
            Operator::In | Operator::NotIn => {
                if values.is_empty() {
                    return Err("for 'in', 'notin' operators, values set can't be empty".to_owned());
                }
            }
            Operator::Equals | Operator::DoubleEquals | Operator::NotEquals => {
                if values.len() != 1 {
                    return Err("exact-match compatibility requires one single value".to_owned());
                }
            }
            Operator::Exists | Operator::DoesNotExist => {
                if !values.is_empty() {
                    return Err("values set must be empty for exists and does not exist".to_owned());
                }
            }
            Operator::GreaterThan | Operator::LessThan => {
                if values.len() != 1 {
                    return Err("for 'Gt', 'Lt' operators, exactly one value is required".to_owned());
                }
                // Go's strconv.ParseInt(v, 10, 64) and Rust's i64 parser accept
                // the same strings: an optional sign and decimal digits.
                bound = values[0]
                    .parse::<i64>()
                    .map_err(|_| "for 'Gt', 'Lt' operators, the value must be an integer".to_owned())?;
            }
        }
        for value in &values {
            validate_label_value(key, value)?;
        }
        Ok(Requirement {
            key: key.to_owned(),
            operator,
            values,
            bound,
        })
    }

    /// The label key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The operator.
    pub fn operator(&self) -> Operator {
        self.operator
    }

    /// The values, sorted.
    pub fn values(&self) -> &[String] {
        &self.values
    }

    fn has_value(&self, value: &str) -> bool {
        self.values.binary_search_by(|v| v.as_str().cmp(value)).is_ok()
    }

    /// Whether a set of labels satisfies this requirement.
    ///
    /// `!=` and `notin` match objects that lack the key; `>` and `<` never
    /// match a value that is not a 64-bit integer.
    pub fn matches(&self, labels: &impl LabelSource) -> bool {
        let value = labels.label(&self.key);
        match self.operator {
            Operator::In | Operator::Equals | Operator::DoubleEquals => {
                value.is_some_and(|v| self.has_value(v))
            }
            Operator::NotIn | Operator::NotEquals => value.is_none_or(|v| !self.has_value(v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
            Operator::GreaterThan | Operator::LessThan => {
                let Some(Ok(actual)) = value.map(str::parse::<i64>) else {
                    return false;
                };
                if self.operator == Operator::GreaterThan {
                    actual > self.bound
                } else {
                    actual < self.bound
                }
            }
        }
    }
}

impl fmt::Display for Requirement {
    /// `Requirement.String()`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.operator == Operator::DoesNotExist {
            f.write_str("!")?;
        }
        f.write_str(&self.key)?;
        let (op, set) = match self.operator {
            Operator::Exists | Operator::DoesNotExist => return Ok(()),
            Operator::Equals => ("=", false),
            Operator::DoubleEquals => ("==", false),
            Operator::NotEquals => ("!=", false),
            Operator::In => (" in ", true),
            Operator::NotIn => (" notin ", true),
            Operator::GreaterThan => (">", false),
            Operator::LessThan => ("<", false),
        };
        f.write_str(op)?;
        if set {
            f.write_str("(")?;
        }
        for (i, value) in self.values.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(value)?;
        }
        if set {
            f.write_str(")")?;
        }
        Ok(())
    }
}

/// A parsed label selector: the AND of its requirements.
///
/// Requirements are sorted by key (stably; the API server's `sort.Sort` may
/// order requirements with the same key differently once there are more
/// than six, which changes only `Display`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct LabelSelector {
    requirements: Vec<Requirement>,
}

impl LabelSelector {
    /// The selector that matches every object (what an empty string parses to).
    pub fn everything() -> LabelSelector {
        LabelSelector::default()
    }

    /// `labels.Parse`: parses the `labelSelector` query parameter.
    ///
    /// Grammar: comma-separated requirements, each `key`, `!key`,
    /// `key=v`, `key==v`, `key!=v`, `key in (v,…)`, `key notin (v,…)`,
    /// `key>n` or `key<n`; white space (space, tab, CR, LF) between tokens.
    /// Keys are qualified names (optional DNS-subdomain prefix and `/`, then
    /// at most 63 alphanumerics, `-`, `_`, `.`), values valid label values.
    ///
    /// # Errors
    /// Whatever the API server's parser rejects, with its message.
    pub fn parse(selector: &str) -> Result<LabelSelector, SelectorError> {
        let mut parser = Parser::new(selector);
        let mut requirements = parser.parse().map_err(SelectorError::label)?;
        requirements.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(LabelSelector { requirements })
    }

    /// Whether the selector matches everything.
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// The requirements, sorted by key.
    pub fn requirements(&self) -> &[Requirement] {
        &self.requirements
    }

    /// Whether a set of labels satisfies every requirement.
    pub fn matches(&self, labels: &impl LabelSource) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// `RequiresExactMatch`: the one value label `key` must have, if the
    /// selector pins it (`=`, `==`, or `in` with a single value).
    ///
    /// Only the first requirement on `key` is considered, as in the API server.
    pub fn requires_exact_match(&self, key: &str) -> Option<&str> {
        let requirement = self.requirements.iter().find(|r| r.key == key)?;
        match requirement.operator {
            Operator::Equals | Operator::DoubleEquals | Operator::In if requirement.values.len() == 1 => {
                Some(&requirement.values[0])
            }
            _ => None,
        }
    }
}

impl fmt::Display for LabelSelector {
    /// `Selector.String()`: the requirements, comma-separated; re-parses to
    /// an equal selector.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, requirement) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{requirement}")?;
        }
        Ok(())
    }
}

impl FromStr for LabelSelector {
    type Err = SelectorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        LabelSelector::parse(s)
    }
}

// ---------------------------------------------------------------------------
// Lexer

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    Error,
    EndOfString,
    ClosedPar,
    Comma,
    DoesNotExist,
    DoubleEquals,
    Equals,
    GreaterThan,
    Identifier,
    In,
    LessThan,
    NotEquals,
    NotIn,
    OpenPar,
}

/// `string2token`: the literal tokens.
fn literal_token(s: &str) -> Option<Token> {
    Some(match s {
        ")" => Token::ClosedPar,
        "," => Token::Comma,
        "!" => Token::DoesNotExist,
        "==" => Token::DoubleEquals,
        "=" => Token::Equals,
        ">" => Token::GreaterThan,
        "in" => Token::In,
        "<" => Token::LessThan,
        "!=" => Token::NotEquals,
        "notin" => Token::NotIn,
        "(" => Token::OpenPar,
        _ => return None,
    })
}

fn is_whitespace(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

fn is_special_symbol(b: u8) -> bool {
    matches!(b, b'=' | b'!' | b'(' | b')' | b',' | b'>' | b'<')
}

/// The API server's byte-wise lexer. Like Go's, it reads a NUL byte as the
/// end of input: a NUL where a token starts ends the selector there, a NUL
/// inside a token ends the token and is skipped.
struct Lexer<'a> {
    s: &'a str,
    pos: usize,
}

impl<'a> Lexer<'a> {
    fn read(&mut self) -> u8 {
        match self.s.as_bytes().get(self.pos) {
            Some(&b) => {
                self.pos += 1;
                b
            }
            None => 0,
        }
    }

    fn unread(&mut self) {
        self.pos = self.pos.saturating_sub(1);
    }

    /// `scanIDOrKeyword`.
    fn scan_id_or_keyword(&mut self) -> (Token, Cow<'a, str>) {
        let start = self.pos;
        let end;
        loop {
            let at = self.pos;
            let b = self.read();
            if b == 0 {
                end = at;
                break;
            }
            if is_special_symbol(b) || is_whitespace(b) {
                self.unread();
                end = at;
                break;
            }
        }
        // The delimiters are ASCII, so both ends are character boundaries.
        let literal = &self.s[start..end];
        (
            literal_token(literal).unwrap_or(Token::Identifier),
            Cow::Borrowed(literal),
        )
    }

    /// `scanSpecialSymbol`: the longest operator made of special symbols.
    fn scan_special_symbol(&mut self) -> (Token, Cow<'a, str>) {
        let start = self.pos;
        let mut last: Option<(Token, usize)> = None;
        loop {
            let b = self.read();
            if b == 0 {
                break;
            }
            if !is_special_symbol(b) {
                self.unread();
                break;
            }
            match literal_token(&self.s[start..self.pos]) {
                Some(token) => last = Some((token, self.pos)),
                None if last.is_some() => {
                    self.unread();
                    break;
                }
                None => {}
            }
        }
        match last {
            Some((token, end)) => (token, Cow::Borrowed(&self.s[start..end])),
            // Unreachable (every special symbol is a token on its own); kept
            // for fidelity.
            None => {
                let buffer = self.s.get(start..self.pos).unwrap_or("");
                (
                    Token::Error,
                    Cow::Owned(format!("error expected: keyword found '{buffer}'")),
                )
            }
        }
    }

    /// `Lex`: the next token and its literal.
    fn lex(&mut self) -> (Token, Cow<'a, str>) {
        let mut b = self.read();
        while is_whitespace(b) {
            b = self.read();
        }
        if b == 0 {
            (Token::EndOfString, Cow::Borrowed(""))
        } else if is_special_symbol(b) {
            self.unread();
            self.scan_special_symbol()
        } else {
            self.unread();
            self.scan_id_or_keyword()
        }
    }
}

// ---------------------------------------------------------------------------
// Parser

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Context {
    KeyAndOperator,
    /// `in` and `notin` are identifiers here.
    Values,
}

struct Parser<'a> {
    items: Vec<(Token, Cow<'a, str>)>,
    position: usize,
}

impl<'a> Parser<'a> {
    fn new(selector: &'a str) -> Parser<'a> {
        let mut lexer = Lexer { s: selector, pos: 0 };
        let mut items = Vec::new();
        loop {
            let item = lexer.lex();
            let end = item.0 == Token::EndOfString;
            items.push(item);
            if end {
                break;
            }
        }
        Parser { items, position: 0 }
    }

    fn item(&self, position: usize, context: Context) -> (Token, Cow<'a, str>) {
        // The grammar never reads past the end-of-string token; should it,
        // it reads end-of-string again rather than panicking.
        let (token, literal) = self
            .items
            .get(position)
            .cloned()
            .unwrap_or((Token::EndOfString, Cow::Borrowed("")));
        let token = match (context, token) {
            (Context::Values, Token::In | Token::NotIn) => Token::Identifier,
            (_, token) => token,
        };
        (token, literal)
    }

    fn lookahead(&self, context: Context) -> (Token, Cow<'a, str>) {
        self.item(self.position, context)
    }

    fn consume(&mut self, context: Context) -> (Token, Cow<'a, str>) {
        self.position += 1;
        self.item(self.position - 1, context)
    }

    fn parse(&mut self) -> Result<Vec<Requirement>, String> {
        let mut requirements = Vec::new();
        loop {
            let (token, literal) = self.lookahead(Context::Values);
            match token {
                Token::Identifier | Token::DoesNotExist => {
                    let requirement = self
                        .parse_requirement()
                        .map_err(|e| format!("unable to parse requirement: {e}"))?;
                    requirements.push(requirement);
                    let (token, literal) = self.consume(Context::Values);
                    match token {
                        Token::EndOfString => return Ok(requirements),
                        Token::Comma => {
                            let (next, literal) = self.lookahead(Context::Values);
                            if next != Token::Identifier && next != Token::DoesNotExist {
                                return Err(format!("found '{literal}', expected: identifier after ','"));
                            }
                        }
                        _ => return Err(format!("found '{literal}', expected: ',' or 'end of string'")),
                    }
                }
                Token::EndOfString => return Ok(requirements),
                _ => {
                    return Err(format!(
                        "found '{literal}', expected: !, identifier, or 'end of string'"
                    ))
                }
            }
        }
    }

    fn parse_requirement(&mut self) -> Result<Requirement, String> {
        let (key, operator) = self.parse_key_and_infer_operator()?;
        if let Some(operator @ (Operator::Exists | Operator::DoesNotExist)) = operator {
            return Requirement::new(&key, operator, Vec::new());
        }
        let operator = self.parse_operator()?;
        let values = match operator {
            Operator::In | Operator::NotIn => self.parse_values()?,
            _ => self.parse_exact_value()?,
        };
        Requirement::new(&key, operator, values)
    }

    /// `parseKeyAndInferOperator`: `!key`, or `key` followed by the end or a
    /// comma (exists); otherwise the operator is still to be read.
    fn parse_key_and_infer_operator(&mut self) -> Result<(Cow<'a, str>, Option<Operator>), String> {
        let mut operator = None;
        let (mut token, mut literal) = self.consume(Context::Values);
        if token == Token::DoesNotExist {
            operator = Some(Operator::DoesNotExist);
            (token, literal) = self.consume(Context::Values);
        }
        if token != Token::Identifier {
            return Err(format!("found '{literal}', expected: identifier"));
        }
        validate_label_key(&literal)?;
        let (next, _) = self.lookahead(Context::Values);
        if (next == Token::EndOfString || next == Token::Comma) && operator.is_none() {
            operator = Some(Operator::Exists);
        }
        Ok((literal, operator))
    }

    fn parse_operator(&mut self) -> Result<Operator, String> {
        let (token, literal) = self.consume(Context::KeyAndOperator);
        Ok(match token {
            Token::In => Operator::In,
            Token::Equals => Operator::Equals,
            Token::DoubleEquals => Operator::DoubleEquals,
            Token::GreaterThan => Operator::GreaterThan,
            Token::LessThan => Operator::LessThan,
            Token::NotIn => Operator::NotIn,
            Token::NotEquals => Operator::NotEquals,
            // (sic: the API server's message lacks a quote before notin)
            _ => {
                return Err(format!(
                    "found '{literal}', expected: '=', '!=', '==', 'in', notin'"
                ))
            }
        })
    }

    /// `parseValues`: `(a,b,…)`; empty entries are the empty value.
    fn parse_values(&mut self) -> Result<Vec<String>, String> {
        let (token, literal) = self.consume(Context::Values);
        if token != Token::OpenPar {
            return Err(format!("found '{literal}' expected: '('"));
        }
        let (token, literal) = self.lookahead(Context::Values);
        match token {
            Token::Identifier | Token::Comma => {
                let values = self.parse_identifiers_list()?;
                let (token, _) = self.consume(Context::Values);
                if token != Token::ClosedPar {
                    return Err(format!("found '{literal}', expected: ')'"));
                }
                Ok(values)
            }
            Token::ClosedPar => {
                self.consume(Context::Values);
                Ok(vec![String::new()])
            }
            _ => Err(format!("found '{literal}', expected: ',', ')' or identifier")),
        }
    }

    /// `parseIdentifiersList`: returns the values sorted and deduplicated,
    /// as Go's `sets.String.List()` does.
    fn parse_identifiers_list(&mut self) -> Result<Vec<String>, String> {
        let mut values: Vec<String> = Vec::new();
        loop {
            let (token, literal) = self.consume(Context::Values);
            match token {
                Token::Identifier => {
                    values.push(literal.into_owned());
                    let (next, literal) = self.lookahead(Context::Values);
                    match next {
                        Token::Comma => continue,
                        Token::ClosedPar => break,
                        _ => return Err(format!("found '{literal}', expected: ',' or ')'")),
                    }
                }
                Token::Comma => {
                    if values.is_empty() {
                        values.push(String::new()); // "(,"
                    }
                    let (next, _) = self.lookahead(Context::Values);
                    if next == Token::ClosedPar {
                        values.push(String::new()); // ",)"
                        break;
                    }
                    if next == Token::Comma {
                        self.consume(Context::Values);
                        values.push(String::new()); // ",,"
                    }
                }
                _ => return Err(format!("found '{literal}', expected: ',', or identifier")),
            }
        }
        values.sort_unstable();
        values.dedup();
        Ok(values)
    }

    /// `parseExactValue`: one value, possibly empty (`x=`, `x=,y`).
    fn parse_exact_value(&mut self) -> Result<Vec<String>, String> {
        let (token, _) = self.lookahead(Context::Values);
        if token == Token::EndOfString || token == Token::Comma {
            return Ok(vec![String::new()]);
        }
        let (token, literal) = self.consume(Context::Values);
        if token == Token::Identifier {
            return Ok(vec![literal.into_owned()]);
        }
        Err(format!("found '{literal}', expected: identifier"))
    }
}

// ---------------------------------------------------------------------------
// Validation (k8s.io/apimachinery/pkg/util/validation)

const QUALIFIED_NAME_FMT: &str = "([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]";
const QUALIFIED_NAME_ERR_MSG: &str =
    "must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character";
const QUALIFIED_NAME_MAX_LENGTH: usize = 63;
const LABEL_VALUE_FMT: &str = "(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?";
const LABEL_VALUE_ERR_MSG: &str = "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character";
const LABEL_VALUE_MAX_LENGTH: usize = 63;
const DNS1123_SUBDOMAIN_FMT: &str = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*";
const DNS1123_SUBDOMAIN_ERR_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character";
const DNS1123_SUBDOMAIN_MAX_LENGTH: usize = 253;

fn max_len_error(length: usize) -> String {
    format!("must be no more than {length} characters")
}

/// `validation.RegexError` (its odd double spaces included).
fn regex_error(msg: &str, fmt: &str, examples: &[&str]) -> String {
    let mut out = msg.to_owned();
    if examples.is_empty() {
        return format!("{out} (regex used for validation is '{fmt}')");
    }
    out.push_str(" (e.g. ");
    for (i, example) in examples.iter().enumerate() {
        if i > 0 {
            out.push_str(" or ");
        }
        out.push('\'');
        out.push_str(example);
        out.push_str("', ");
    }
    out.push_str("regex used for validation is '");
    out.push_str(fmt);
    out.push_str("')");
    out
}

/// `^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$`
fn is_qualified_name_part(s: &str) -> bool {
    let b = s.as_bytes();
    match (b.first(), b.last()) {
        (Some(first), Some(last)) => {
            first.is_ascii_alphanumeric()
                && last.is_ascii_alphanumeric()
                && b.iter()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        }
        _ => false,
    }
}

/// `^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$`
fn is_dns1123_subdomain(s: &str) -> bool {
    s.split('.').all(|label| {
        let b = label.as_bytes();
        let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
        match (b.first(), b.last()) {
            (Some(first), Some(last)) => {
                alnum(first) && alnum(last) && b.iter().all(|c| alnum(c) || *c == b'-')
            }
            _ => false,
        }
    })
}

/// `validation.IsDNS1123Subdomain`.
fn dns1123_subdomain_errors(value: &str) -> Vec<String> {
    let mut errors = Vec::new();
    if value.len() > DNS1123_SUBDOMAIN_MAX_LENGTH {
        errors.push(max_len_error(DNS1123_SUBDOMAIN_MAX_LENGTH));
    }
    if !is_dns1123_subdomain(value) {
        errors.push(regex_error(
            DNS1123_SUBDOMAIN_ERR_MSG,
            DNS1123_SUBDOMAIN_FMT,
            &["example.com"],
        ));
    }
    errors
}

/// `validation.IsQualifiedName`.
fn qualified_name_errors(value: &str) -> Vec<String> {
    let mut errors = Vec::new();
    let parts: Vec<&str> = value.split('/').collect();
    let name = match parts.as_slice() {
        [name] => *name,
        [prefix, name] => {
            if prefix.is_empty() {
                errors.push("prefix part must be non-empty".to_owned());
            } else {
                errors.extend(
                    dns1123_subdomain_errors(prefix)
                        .into_iter()
                        .map(|e| format!("prefix part {e}")),
                );
            }
            *name
        }
        _ => {
            errors.push(format!(
                "a qualified name {} with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')",
                regex_error(QUALIFIED_NAME_ERR_MSG, QUALIFIED_NAME_FMT, &["MyName", "my.name", "123-abc"])
            ));
            return errors;
        }
    };
    if name.is_empty() {
        errors.push("name part must be non-empty".to_owned());
    } else if name.len() > QUALIFIED_NAME_MAX_LENGTH {
        errors.push(format!("name part {}", max_len_error(QUALIFIED_NAME_MAX_LENGTH)));
    }
    if !is_qualified_name_part(name) {
        errors.push(format!(
            "name part {}",
            regex_error(
                QUALIFIED_NAME_ERR_MSG,
                QUALIFIED_NAME_FMT,
                &["MyName", "my.name", "123-abc"]
            )
        ));
    }
    errors
}

/// `validation.IsValidLabelValue`.
fn label_value_errors(value: &str) -> Vec<String> {
    let mut errors = Vec::new();
    if value.len() > LABEL_VALUE_MAX_LENGTH {
        errors.push(max_len_error(LABEL_VALUE_MAX_LENGTH));
    }
    if !(value.is_empty() || is_qualified_name_part(value)) {
        errors.push(regex_error(
            LABEL_VALUE_ERR_MSG,
            LABEL_VALUE_FMT,
            &["MyValue", "my_value", "12345"],
        ));
    }
    errors
}

fn validate_label_key(key: &str) -> Result<(), String> {
    let errors = qualified_name_errors(key);
    if errors.is_empty() {
        return Ok(());
    }
    Err(format!(
        "invalid label key {}: {}",
        go_quote(key),
        errors.join("; ")
    ))
}

fn validate_label_value(key: &str, value: &str) -> Result<(), String> {
    let errors = label_value_errors(value);
    if errors.is_empty() {
        return Ok(());
    }
    Err(format!(
        "invalid label value: {}: at key: {}: {}",
        go_quote(value),
        go_quote(key),
        errors.join("; ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tails of the API server's validation messages (`validation.RegexError`),
    /// copied from its output.
    const NAME: &str = "must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')";
    const VALUE: &str = "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')";
    const DNS: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";

    fn set(pairs: &[(&'static str, &'static str)]) -> BTreeMap<&'static str, &'static str> {
        pairs.iter().copied().collect()
    }

    fn parse(s: &str) -> LabelSelector {
        LabelSelector::parse(s).unwrap_or_else(|e| panic!("{s:?} should parse: {e}"))
    }

    fn requirement(key: &str, operator: Operator, values: &[&str]) -> Requirement {
        Requirement::new(key, operator, values.iter().map(|v| v.to_string()).collect()).unwrap()
    }

    /// Label sets the differential table is matched against.
    fn label_sets() -> Vec<BTreeMap<&'static str, &'static str>> {
        vec![
            set(&[]),
            set(&[("x", "a")]),
            set(&[("x", "b"), ("y", "")]),
            set(&[("x", ""), ("z", "5")]),
            set(&[("a", "1"), ("b", "2"), ("x", "10")]),
            set(&[("in", "notin"), ("notin", "in"), ("k8s.io/app", "web")]),
            set(&[("x", "-3"), ("y", "007"), ("z", "abc")]),
            set(&[("app", "web"), ("tier", "frontend"), ("env", "prod")]),
        ]
    }

    /// Each input's `String()` or error message, and whether it matches each
    /// of [`label_sets`], as recorded from k8s.io/apimachinery v1.20's
    /// `labels.Parse` (`{NAME}`, `{VALUE}`, `{DNS}` stand for the constants).
    #[test]
    fn parsing_and_matching_agree_with_the_api_server() {
        #[rustfmt::skip]
        let cases: &[(&str, Result<&str, &str>, &str)] = &[
            ("x=a,y=b,z=c", Ok("x=a,y=b,z=c"), "00000000"),
            ("", Ok(""), "11111111"),
            ("x!=a,y=b", Ok("x!=a,y=b"), "00000000"),
            ("x=", Ok("x="), "00010000"),
            ("x= ", Ok("x="), "00010000"),
            ("x=,z= ", Ok("x=,z="), "00000000"),
            ("x= ,z= ", Ok("x=,z="), "00000000"),
            ("!x", Ok("!x"), "10000101"),
            ("x>1", Ok("x>1"), "00001000"),
            ("x>1,z<5", Ok("x>1,z<5"), "00000000"),
            ("x=a||y=b", Err("unable to parse requirement: invalid label value: \"a||y\": at key: \"x\": {VALUE}"), ""),
            ("x==a==b", Err("found '==', expected: ',' or 'end of string'"), ""),
            ("!x=a", Err("found '=', expected: ',' or 'end of string'"), ""),
            ("x<a", Err("unable to parse requirement: for 'Gt', 'Lt' operators, the value must be an integer"), ""),
            ("\rx", Ok("x"), "01111010"),
            ("this-is-a-dns.domain.com/key-with-dash", Ok("this-is-a-dns.domain.com/key-with-dash"), "00000000"),
            ("this-is-another-dns.domain.com/key-with-dash in (so,what)", Ok("this-is-another-dns.domain.com/key-with-dash in (so,what)"), "00000000"),
            ("0.1.2.domain/99 notin (10.10.100.1, tick.tack.clock)", Ok("0.1.2.domain/99 notin (10.10.100.1,tick.tack.clock)"), "11111111"),
            ("foo  in\t (abc)", Ok("foo in (abc)"), "00000000"),
            ("x notin\n (abc)", Ok("x notin (abc)"), "11111111"),
            ("x  notin\t\t\t(abc,def)", Ok("x notin (abc,def)"), "11111111"),
            ("x in (abc,def)", Ok("x in (abc,def)"), "00000000"),
            ("x in (abc,)", Ok("x in (,abc)"), "00010000"),
            ("x in ()", Ok("x in ()"), "00010000"),
            ("x notin (abc,,def),bar,z in (),w", Ok("bar,w,x notin (,abc,def),z in ()"), "00000000"),
            ("x,y in (a)", Ok("x,y in (a)"), "00000000"),
            ("x=a", Ok("x=a"), "01000000"),
            ("x>1", Ok("x>1"), "00001000"),
            ("x<7", Ok("x<7"), "00000010"),
            ("x=a,y!=b", Ok("x=a,y!=b"), "01000000"),
            ("x=a,y!=b,z in (h,i,j)", Ok("x=a,y!=b,z in (h,i,j)"), "00000000"),
            ("x,,y", Err("found ',', expected: identifier after ','"), ""),
            (",x,y", Err("found ',', expected: !, identifier, or 'end of string'"), ""),
            ("x nott in (y)", Err("unable to parse requirement: found 'nott', expected: '=', '!=', '==', 'in', notin'"), ""),
            ("x notin ( )", Ok("x notin ()"), "11101111"),
            ("x notin (, a)", Ok("x notin (,a)"), "10101111"),
            ("a in (xyz),", Err("found '', expected: identifier after ','"), ""),
            ("a in (xyz)b notin ()", Err("found 'b', expected: ',' or 'end of string'"), ""),
            ("a ", Ok("a"), "00001000"),
            ("a in (x,y,notin, z,in)", Ok("a in (in,notin,x,y,z)"), "00000000"),
            ("a in (xyz abc)", Err("unable to parse requirement: found 'abc', expected: ',' or ')'"), ""),
            ("a notin(", Err("unable to parse requirement: found '', expected: ',', ')' or identifier"), ""),
            ("a (", Err("unable to parse requirement: found '(', expected: '=', '!=', '==', 'in', notin'"), ""),
            ("(", Err("found '(', expected: !, identifier, or 'end of string'"), ""),
            ("x==a", Ok("x==a"), "01000000"),
            ("x = a", Ok("x=a"), "01000000"),
            ("x\t!=\ta", Ok("x!=a"), "10111111"),
            ("in in (in)", Ok("in in (in)"), "00000000"),
            ("notin notin (notin)", Ok("notin notin (notin)"), "11111111"),
            ("in", Ok("in"), "00000100"),
            ("notin=in", Ok("notin=in"), "00000100"),
            ("!in", Ok("!in"), "11111011"),
            ("x in (in,notin)", Ok("x in (in,notin)"), "00000000"),
            ("x in (,)", Ok("x in ()"), "00010000"),
            ("x in (,,)", Err("unable to parse requirement: found ')', expected: ',', or identifier"), ""),
            ("x in (a,,b)", Ok("x in (,a,b)"), "01110000"),
            ("x in (b,a,b)", Ok("x in (a,b)"), "01100000"),
            ("x in (a", Err("unable to parse requirement: found '', expected: ',' or ')'"), ""),
            ("x in a", Err("unable to parse requirement: found 'a' expected: '('"), ""),
            ("x in", Err("unable to parse requirement: found '' expected: '('"), ""),
            ("x in (a,", Err("unable to parse requirement: found '', expected: ',', or identifier"), ""),
            ("x in (a b)", Err("unable to parse requirement: found 'b', expected: ',' or ')'"), ""),
            ("x in ((a))", Err("unable to parse requirement: found '(', expected: ',', ')' or identifier"), ""),
            ("x in (a),y notin (b)", Ok("x in (a),y notin (b)"), "01000000"),
            ("!x,!y", Ok("!x,!y"), "10000101"),
            ("!!x", Err("unable to parse requirement: found '!', expected: identifier"), ""),
            ("!", Err("unable to parse requirement: found '', expected: identifier"), ""),
            ("! x", Ok("!x"), "10000101"),
            ("x!", Err("unable to parse requirement: found '!', expected: '=', '!=', '==', 'in', notin'"), ""),
            ("x!y", Err("unable to parse requirement: found '!', expected: '=', '!=', '==', 'in', notin'"), ""),
            ("x=a=b", Err("found '=', expected: ',' or 'end of string'"), ""),
            ("x=(a)", Err("unable to parse requirement: found '(', expected: identifier"), ""),
            ("x>", Err("unable to parse requirement: for 'Gt', 'Lt' operators, the value must be an integer"), ""),
            ("x>a", Err("unable to parse requirement: for 'Gt', 'Lt' operators, the value must be an integer"), ""),
            ("x>-1", Err("unable to parse requirement: invalid label value: \"-1\": at key: \"x\": {VALUE}"), ""),
            ("x>+1", Err("unable to parse requirement: invalid label value: \"+1\": at key: \"x\": {VALUE}"), ""),
            ("x>01", Ok("x>01"), "00001000"),
            ("x>9223372036854775807", Ok("x>9223372036854775807"), "00000000"),
            ("x>9223372036854775808", Err("unable to parse requirement: for 'Gt', 'Lt' operators, the value must be an integer"), ""),
            ("x<-9223372036854775808", Err("unable to parse requirement: invalid label value: \"-9223372036854775808\": at key: \"x\": {VALUE}"), ""),
            ("x>1,x<10", Ok("x>1,x<10"), "00000000"),
            ("x>=1", Err("unable to parse requirement: found '=', expected: identifier"), ""),
            ("x<=1", Err("unable to parse requirement: found '=', expected: identifier"), ""),
            ("x<>1", Err("unable to parse requirement: found '>', expected: identifier"), ""),
            ("x,", Err("found '', expected: identifier after ','"), ""),
            (",", Err("found ',', expected: !, identifier, or 'end of string'"), ""),
            (",x", Err("found ',', expected: !, identifier, or 'end of string'"), ""),
            (")", Err("found ')', expected: !, identifier, or 'end of string'"), ""),
            ("=", Err("found '=', expected: !, identifier, or 'end of string'"), ""),
            ("==a", Err("found '==', expected: !, identifier, or 'end of string'"), ""),
            ("x=a,", Err("found '', expected: identifier after ','"), ""),
            ("x=a,,", Err("found ',', expected: identifier after ','"), ""),
            ("x=a y=b", Err("found 'y', expected: ',' or 'end of string'"), ""),
            ("x y", Err("unable to parse requirement: found 'y', expected: '=', '!=', '==', 'in', notin'"), ""),
            ("x,y", Ok("x,y"), "00100010"),
            ("z,y,x", Ok("x,y,z"), "00000010"),
            ("b=2,a=1,b=1", Ok("a=1,b=2,b=1"), "00000000"),
            ("a/b/c", Err("unable to parse requirement: invalid label key \"a/b/c\": a qualified name {NAME} with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')"), ""),
            ("/a", Err("unable to parse requirement: invalid label key \"/a\": prefix part must be non-empty"), ""),
            ("a/", Err("unable to parse requirement: invalid label key \"a/\": name part must be non-empty; name part {NAME}"), ""),
            ("/", Err("unable to parse requirement: invalid label key \"/\": prefix part must be non-empty; name part must be non-empty; name part {NAME}"), ""),
            ("A/b", Err("unable to parse requirement: invalid label key \"A/b\": prefix part {DNS}"), ""),
            ("a_b/c", Err("unable to parse requirement: invalid label key \"a_b/c\": prefix part {DNS}"), ""),
            ("-a/b", Err("unable to parse requirement: invalid label key \"-a/b\": prefix part {DNS}"), ""),
            ("a-/b", Err("unable to parse requirement: invalid label key \"a-/b\": prefix part {DNS}"), ""),
            ("a..b/c", Err("unable to parse requirement: invalid label key \"a..b/c\": prefix part {DNS}"), ""),
            ("example.com/x", Ok("example.com/x"), "00000000"),
            ("Example.com/x", Err("unable to parse requirement: invalid label key \"Example.com/x\": prefix part {DNS}"), ""),
            ("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", Ok("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"), "00000000"),
            ("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", Err("unable to parse requirement: invalid label key \"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\": name part must be no more than 63 characters"), ""),
            ("example.com/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", Ok("example.com/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"), "00000000"),
            ("example.com/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", Err("unable to parse requirement: invalid label key \"example.com/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\": name part must be no more than 63 characters"), ""),
            ("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa/b", Err("unable to parse requirement: invalid label key \"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa/b\": prefix part must be no more than 253 characters"), ""),
            ("x=aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", Ok("x=aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"), "00000000"),
            ("x=aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", Err("unable to parse requirement: invalid label value: \"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\": at key: \"x\": must be no more than 63 characters"), ""),
            ("x=-a", Err("unable to parse requirement: invalid label value: \"-a\": at key: \"x\": {VALUE}"), ""),
            ("x=a-", Err("unable to parse requirement: invalid label value: \"a-\": at key: \"x\": {VALUE}"), ""),
            ("x=_a", Err("unable to parse requirement: invalid label value: \"_a\": at key: \"x\": {VALUE}"), ""),
            ("x=a_b.c-d", Ok("x=a_b.c-d"), "00000000"),
            ("x=a/b", Err("unable to parse requirement: invalid label value: \"a/b\": at key: \"x\": {VALUE}"), ""),
            ("x in (ok,-bad)", Err("unable to parse requirement: invalid label value: \"-bad\": at key: \"x\": {VALUE}"), ""),
            ("-x", Err("unable to parse requirement: invalid label key \"-x\": name part {NAME}"), ""),
            ("x-", Err("unable to parse requirement: invalid label key \"x-\": name part {NAME}"), ""),
            ("_x", Err("unable to parse requirement: invalid label key \"_x\": name part {NAME}"), ""),
            ("x_", Err("unable to parse requirement: invalid label key \"x_\": name part {NAME}"), ""),
            (".x", Err("unable to parse requirement: invalid label key \".x\": name part {NAME}"), ""),
            ("x.y_z-w", Ok("x.y_z-w"), "00000000"),
            ("1234", Ok("1234"), "00000000"),
            ("x.", Err("unable to parse requirement: invalid label key \"x.\": name part {NAME}"), ""),
            ("é", Err("unable to parse requirement: invalid label key \"é\": name part {NAME}"), ""),
            ("x=é", Err("unable to parse requirement: invalid label value: \"é\": at key: \"x\": {VALUE}"), ""),
            ("x\u{1}", Err("unable to parse requirement: invalid label key \"x\\x01\": name part {NAME}"), ""),
            ("x=\u{1}", Err("unable to parse requirement: invalid label value: \"\\x01\": at key: \"x\": {VALUE}"), ""),
            ("a\"b", Err("unable to parse requirement: invalid label key \"a\\\"b\": name part {NAME}"), ""),
            ("x=\\", Err("unable to parse requirement: invalid label value: \"\\\\\": at key: \"x\": {VALUE}"), ""),
            ("k\u{200b}", Err("unable to parse requirement: invalid label key \"k\\u200b\": name part {NAME}"), ""),
            ("k\u{a0}=v", Err("unable to parse requirement: invalid label key \"k\\u00a0\": name part {NAME}"), ""),
            ("x \u{0}y", Ok("x"), "01111010"),
            ("x=\u{0}y", Ok("x=y"), "00000000"),
            ("a\u{0}b", Err("unable to parse requirement: found 'b', expected: '=', '!=', '==', 'in', notin'"), ""),
            ("x\u{0}", Ok("x"), "01111010"),
            ("\u{0}x", Ok(""), "11111111"),
            ("x,\u{0}", Err("found '', expected: identifier after ','"), ""),
            ("x in (a\u{0}b)", Err("unable to parse requirement: found 'b', expected: ',' or ')'"), ""),
        ];
        let sets = label_sets();
        for (input, want, bits) in cases {
            match (LabelSelector::parse(input), want) {
                (Ok(selector), Ok(string)) => {
                    assert_eq!(selector.to_string(), *string, "String() of {input:?}");
                    let got: String = sets
                        .iter()
                        .map(|s| if selector.matches(s) { '1' } else { '0' })
                        .collect();
                    assert_eq!(got, *bits, "matches of {input:?}");
                }
                (Err(error), Err(message)) => {
                    let message = message
                        .replace("{NAME}", NAME)
                        .replace("{VALUE}", VALUE)
                        .replace("{DNS}", DNS);
                    assert_eq!(error.message(), message, "error for {input:?}");
                    assert_eq!(error.kind(), super::super::SelectorKind::Label);
                }
                (got, want) => panic!("{input:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    /// `TestSelectorParse`.
    #[test]
    fn good_selectors_restring_without_their_spaces_and_bad_ones_fail() {
        let good = [
            "x=a,y=b,z=c",
            "",
            "x!=a,y=b",
            "x=",
            "x= ",
            "x=,z= ",
            "x= ,z= ",
            "!x",
            "x>1",
            "x>1,z<5",
        ];
        for input in good {
            assert_eq!(parse(input).to_string(), input.replace(' ', ""), "{input:?}");
        }
        for input in ["x=a||y=b", "x==a==b", "!x=a", "x<a"] {
            assert!(LabelSelector::parse(input).is_err(), "{input:?} should fail");
        }
    }

    /// `TestDeterministicParse`.
    #[test]
    fn requirement_order_does_not_change_the_parsed_selector() {
        assert_eq!(parse("x=a,a=x"), parse("a=x,x=a"));
        assert_eq!(parse("x=a,a=x").to_string(), "a=x,x=a");
    }

    /// `TestEverything`.
    #[test]
    fn everything_is_empty_and_matches_anything() {
        assert!(LabelSelector::everything().is_empty());
        assert!(LabelSelector::everything().matches(&set(&[("x", "y")])));
        assert_eq!(parse(""), LabelSelector::everything());
        assert_eq!(parse(" \t\r\n"), LabelSelector::everything());
    }

    /// `TestSelectorMatches`.
    #[test]
    fn selectors_match_the_label_sets_the_api_server_matches() {
        let matching: &[(&str, &[(&str, &str)])] = &[
            ("", &[("x", "y")]),
            ("x=y", &[("x", "y")]),
            ("x=y,z=w", &[("x", "y"), ("z", "w")]),
            ("x!=y,z!=w", &[("x", "z"), ("z", "a")]),
            ("notin=in", &[("notin", "in")]),
            ("x", &[("x", "z")]),
            ("!x", &[("y", "z")]),
            ("x>1", &[("x", "2")]),
            ("x<1", &[("x", "0")]),
            ("foo=bar", &[("foo", "bar"), ("baz", "blah")]),
            ("baz=blah", &[("foo", "bar"), ("baz", "blah")]),
            ("foo=bar,baz=blah", &[("foo", "bar"), ("baz", "blah")]),
            // != and notin match objects without the key.
            ("x!=y", &[]),
            ("x notin (a,b)", &[("y", "a")]),
        ];
        for (selector, labels) in matching {
            assert!(
                parse(selector).matches(&set(labels)),
                "{selector:?} should match {labels:?}"
            );
        }
        let not_matching: &[(&str, &[(&str, &str)])] = &[
            ("x=z", &[]),
            ("x=y", &[("x", "z")]),
            ("x=y,z=w", &[("x", "w"), ("z", "w")]),
            ("x!=y,z!=w", &[("x", "z"), ("z", "w")]),
            ("x", &[("y", "z")]),
            ("!x", &[("x", "z")]),
            ("x>1", &[("x", "0")]),
            ("x<1", &[("x", "2")]),
            ("foo=blah", &[("foo", "bar"), ("baz", "blah")]),
            ("baz=bar", &[("foo", "bar"), ("baz", "blah")]),
            ("foo=bar,foobar=bar,baz=blah", &[("foo", "bar"), ("baz", "blah")]),
            // > and < need the key and an integer value.
            ("x>1", &[]),
            ("x<1", &[("x", "")]),
            ("x<1", &[("x", "v0")]),
        ];
        for (selector, labels) in not_matching {
            assert!(
                !parse(selector).matches(&set(labels)),
                "{selector:?} should not match {labels:?}"
            );
        }
    }

    /// `TestLexer`: Lex returns the longest valid token.
    #[test]
    fn the_lexer_reads_each_token_and_its_literal() {
        let cases = [
            ("", Token::EndOfString),
            (",", Token::Comma),
            ("notin", Token::NotIn),
            ("in", Token::In),
            ("=", Token::Equals),
            ("==", Token::DoubleEquals),
            (">", Token::GreaterThan),
            ("<", Token::LessThan),
            ("!", Token::DoesNotExist),
            ("!=", Token::NotEquals),
            ("(", Token::OpenPar),
            (")", Token::ClosedPar),
            ("~", Token::Identifier),
            ("||", Token::Identifier),
        ];
        for (input, want) in cases {
            let (token, literal) = Lexer { s: input, pos: 0 }.lex();
            assert_eq!(token, want, "{input:?}");
            assert_eq!(literal, input);
        }
    }

    /// `TestLexerSequence` and `TestParserLookahead`.
    #[test]
    fn the_lexer_splits_selectors_into_tokens() {
        use Token::*;
        let cases: &[(&str, &[Token])] = &[
            (
                "key in ( value )",
                &[Identifier, In, OpenPar, Identifier, ClosedPar],
            ),
            (
                "key notin ( value )",
                &[Identifier, NotIn, OpenPar, Identifier, ClosedPar],
            ),
            (
                "key in ( value1, value2 )",
                &[Identifier, In, OpenPar, Identifier, Comma, Identifier, ClosedPar],
            ),
            ("key", &[Identifier]),
            ("!key", &[DoesNotExist, Identifier]),
            ("()", &[OpenPar, ClosedPar]),
            ("", &[]),
            (
                "x in (),y",
                &[Identifier, In, OpenPar, ClosedPar, Comma, Identifier],
            ),
            (
                "== != (), = notin",
                &[DoubleEquals, NotEquals, OpenPar, ClosedPar, Comma, Equals, NotIn],
            ),
            ("key>2", &[Identifier, GreaterThan, Identifier]),
            ("key<1", &[Identifier, LessThan, Identifier]),
            ("!==!", &[NotEquals, Equals, DoesNotExist]),
        ];
        for (input, want) in cases {
            let parser = Parser::new(input);
            let got: Vec<Token> = parser.items.iter().map(|(t, _)| *t).collect();
            let mut want = want.to_vec();
            want.push(EndOfString);
            assert_eq!(got, want, "{input:?}");
        }
    }

    /// `TestRequirementConstructor`.
    #[test]
    fn requirements_validate_their_key_operator_and_values() {
        use Operator::*;
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let cases: &[(String, Operator, &[&str], bool)] = &[
            ("x".into(), In, &[], false),
            ("x".into(), NotIn, &[], false),
            ("x".into(), In, &["foo"], true),
            ("x".into(), NotIn, &["foo"], true),
            ("x".into(), Exists, &[], true),
            ("x".into(), DoesNotExist, &[], true),
            ("1foo".into(), In, &["bar"], true),
            ("1234".into(), In, &["bar"], true),
            ("y".into(), GreaterThan, &["1"], true),
            ("z".into(), LessThan, &["6"], true),
            ("foo".into(), GreaterThan, &["bar"], false),
            ("barz".into(), LessThan, &["blah"], false),
            ("a".repeat(254), Exists, &[], false),
            ("x".into(), Exists, &["a"], false),
            ("x".into(), Equals, &["a", "b"], false),
            ("x".into(), GreaterThan, &["1", "2"], false),
        ];
        for (key, operator, values, ok) in cases {
            let got = Requirement::new(key, *operator, strings(values));
            assert_eq!(got.is_ok(), *ok, "{key:?} {operator:?} {values:?}: {got:?}");
        }
        assert_eq!(
            Requirement::new(
                "Key",
                Equals,
                strings(&["axahm2EJ8Phiephe2eixohbee9eGeiyees1thuozi1xoh0GiuH3diewi8iem7Nui"])
            )
            .unwrap_err(),
            r#"invalid label value: "axahm2EJ8Phiephe2eixohbee9eGeiyees1thuozi1xoh0GiuH3diewi8iem7Nui": at key: "Key": must be no more than 63 characters"#
        );
    }

    /// `TestToString`.
    #[test]
    fn selectors_print_as_the_api_server_prints_them() {
        use Operator::*;
        let cases: &[(&[Requirement], &str)] = &[
            (
                &[
                    requirement("x", In, &["abc", "def"]),
                    requirement("y", NotIn, &["jkl"]),
                    requirement("z", Exists, &[]),
                ],
                "x in (abc,def),y notin (jkl),z",
            ),
            (
                &[
                    requirement("x", NotIn, &["abc", "def"]),
                    requirement("y", NotEquals, &["jkl"]),
                    requirement("z", DoesNotExist, &[]),
                ],
                "x notin (abc,def),y!=jkl,!z",
            ),
            (
                &[
                    requirement("x", NotIn, &["abc"]),
                    requirement("y", In, &["jkl", "mno"]),
                    requirement("z", NotIn, &[""]),
                ],
                "x notin (abc),y in (jkl,mno),z notin ()",
            ),
            (
                &[
                    requirement("x", Equals, &["abc"]),
                    requirement("y", DoubleEquals, &["jkl"]),
                    requirement("z", NotEquals, &["a"]),
                    requirement("z", Exists, &[]),
                ],
                "x=abc,y==jkl,z!=a,z",
            ),
            (
                &[
                    requirement("x", GreaterThan, &["2"]),
                    requirement("y", LessThan, &["8"]),
                    requirement("z", Exists, &[]),
                ],
                "x>2,y<8,z",
            ),
        ];
        for (requirements, want) in cases {
            let selector = LabelSelector {
                requirements: requirements.to_vec(),
            };
            assert_eq!(selector.to_string(), *want);
            assert_eq!(parse(want), selector, "{want:?} re-parses");
        }
    }

    /// `TestRequirementSelectorMatching`.
    #[test]
    #[allow(clippy::type_complexity)]
    fn requirements_match_as_the_api_servers_do() {
        use Operator::*;
        let cases: &[(&[(&str, &str)], &[Requirement], bool)] = &[
            (
                &[("x", "foo"), ("y", "baz")],
                &[
                    requirement("x", In, &["foo"]),
                    requirement("y", NotIn, &["alpha"]),
                ],
                true,
            ),
            (
                &[("x", "foo"), ("y", "baz")],
                &[requirement("x", In, &["foo"]), requirement("y", In, &["alpha"])],
                false,
            ),
            (
                &[("y", "")],
                &[requirement("x", NotIn, &[""]), requirement("y", Exists, &[])],
                true,
            ),
            (
                &[("y", "")],
                &[requirement("x", DoesNotExist, &[]), requirement("y", Exists, &[])],
                true,
            ),
            (
                &[("y", "")],
                &[
                    requirement("x", NotIn, &[""]),
                    requirement("y", DoesNotExist, &[]),
                ],
                false,
            ),
            (&[("y", "baz")], &[requirement("x", In, &[""])], false),
            (&[("z", "2")], &[requirement("z", GreaterThan, &["1"])], true),
            (&[("z", "v2")], &[requirement("z", GreaterThan, &["1"])], false),
        ];
        for (labels, requirements, want) in cases {
            let selector = LabelSelector {
                requirements: requirements.to_vec(),
            };
            assert_eq!(selector.matches(&set(labels)), *want, "{selector} on {labels:?}");
        }
    }

    /// `TestSetSelectorParser`: the parsed requirements, not just their string.
    #[test]
    fn set_based_selectors_parse_into_sorted_requirements() {
        use Operator::*;
        let cases: &[(&str, &[Requirement])] = &[
            ("", &[]),
            ("\rx", &[requirement("x", Exists, &[])]),
            (
                "this-is-another-dns.domain.com/key-with-dash in (so,what)",
                &[requirement(
                    "this-is-another-dns.domain.com/key-with-dash",
                    In,
                    &["so", "what"],
                )],
            ),
            (
                "0.1.2.domain/99 notin (10.10.100.1, tick.tack.clock)",
                &[requirement(
                    "0.1.2.domain/99",
                    NotIn,
                    &["10.10.100.1", "tick.tack.clock"],
                )],
            ),
            ("foo  in\t (abc)", &[requirement("foo", In, &["abc"])]),
            ("x notin\n (abc)", &[requirement("x", NotIn, &["abc"])]),
            ("x in (abc,)", &[requirement("x", In, &["abc", ""])]),
            ("x in ()", &[requirement("x", In, &[""])]),
            (
                "x notin (abc,,def),bar,z in (),w",
                &[
                    requirement("bar", Exists, &[]),
                    requirement("w", Exists, &[]),
                    requirement("x", NotIn, &["", "abc", "def"]),
                    requirement("z", In, &[""]),
                ],
            ),
            (
                "x,y in (a)",
                &[requirement("x", Exists, &[]), requirement("y", In, &["a"])],
            ),
            ("x notin (, a)", &[requirement("x", NotIn, &["", "a"])]),
            (
                "a in (x,y,notin, z,in)",
                &[requirement("a", In, &["in", "notin", "x", "y", "z"])],
            ),
            (
                "b=2,a=1,b=1",
                &[
                    requirement("a", Equals, &["1"]),
                    requirement("b", Equals, &["2"]),
                    requirement("b", Equals, &["1"]),
                ],
            ),
        ];
        for (input, want) in cases {
            let mut want = want.to_vec();
            for r in &mut want {
                r.values.sort();
            }
            assert_eq!(parse(input).requirements(), want.as_slice(), "{input:?}");
        }
    }

    /// `TestRequiresExactMatch`.
    #[test]
    fn an_exact_match_is_a_single_value_equality_or_in() {
        let cases = [
            ("key in (value)", "key", Some("value")),
            ("key in (value,value2)", "key", None),
            ("key in (value,value1),key2 in (value2)", "key2", Some("value2")),
            ("key=value", "key", Some("value")),
            ("key==value", "key", Some("value")),
            ("key!=value", "key", None),
            ("key in (value),key2 in (value2)", "key", Some("value")),
            ("key", "key", None),
            ("key=", "key", Some("")),
            ("other=value", "key", None),
            // Only the first requirement on the key counts.
            ("key,key=value", "key", None),
        ];
        for (input, key, want) in cases {
            assert_eq!(parse(input).requires_exact_match(key), want, "{input:?}");
        }
    }

    /// `TestIsQualifiedName`.
    #[test]
    fn label_keys_are_qualified_names() {
        let good = [
            "simple".to_string(),
            "now-with-dashes".into(),
            "1-starts-with-num".into(),
            "1234".into(),
            "simple/simple".into(),
            "now-with-dashes/simple".into(),
            "now-with-dashes/now-with-dashes".into(),
            "now.with.dots/simple".into(),
            "now-with.dashes-and.dots/simple".into(),
            "1-num.2-num/3-num".into(),
            "1234/5678".into(),
            "1.2.3.4/5678".into(),
            "Uppercase_Is_OK_123".into(),
            "example.com/Uppercase_Is_OK_123".into(),
            "requests.storage-foo".into(),
            "a".repeat(63),
            format!("{}/{}", "a".repeat(253), "b".repeat(63)),
        ];
        for key in &good {
            assert_eq!(qualified_name_errors(key), Vec::<String>::new(), "{key:?}");
        }
        let bad = [
            "nospecialchars%^=@".to_string(),
            "cantendwithadash-".into(),
            "-cantstartwithadash-".into(),
            "only/one/slash".into(),
            "Example.com/abc".into(),
            "example_com/abc".into(),
            "example.com/".into(),
            "/simple".into(),
            "a".repeat(64),
            format!("{}/abc", "a".repeat(254)),
        ];
        for key in &bad {
            assert!(!qualified_name_errors(key).is_empty(), "{key:?}");
        }
        assert_eq!(
            qualified_name_errors(&format!("{}/abc", "a".repeat(254))),
            vec!["prefix part must be no more than 253 characters".to_string()]
        );
    }

    /// `TestIsDNS1123Subdomain`.
    #[test]
    fn key_prefixes_are_dns_subdomains() {
        let good = [
            "a",
            "ab",
            "abc",
            "a1",
            "a-1",
            "a--1--2--b",
            "0",
            "01",
            "012",
            "1a",
            "1-a",
            "1--a--b--2",
            "a.a",
            "ab.a",
            "abc.a",
            "a1.a",
            "a-1.a",
            "a--1--2--b.a",
            "a.1",
            "ab.1",
            "abc.1",
            "a1.1",
            "a-1.1",
            "a--1--2--b.1",
            "0.a",
            "01.a",
            "012.a",
            "1a.a",
            "1-a.a",
            "1--a--b--2",
            "0.1",
            "01.1",
            "012.1",
            "1a.1",
            "1-a.1",
            "1--a--b--2.1",
            "a.b.c.d.e",
            "aa.bb.cc.dd.ee",
            "1.2.3.4.5",
            "11.22.33.44.55",
        ];
        for value in good.iter().map(|s| s.to_string()).chain(["a".repeat(253)]) {
            assert_eq!(
                dns1123_subdomain_errors(&value),
                Vec::<String>::new(),
                "{value:?}"
            );
        }
        let bad = [
            "",
            "A",
            "ABC",
            "aBc",
            "A1",
            "A-1",
            "1-A",
            "-",
            "a-",
            "-a",
            "1-",
            "-1",
            "_",
            "a_",
            "_a",
            "a_b",
            "1_",
            "_1",
            "1_2",
            ".",
            "a.",
            ".a",
            "a..b",
            "1.",
            ".1",
            "1..2",
            " ",
            "a ",
            " a",
            "a b",
            "1 ",
            " 1",
            "1 2",
            "A.a",
            "aB.a",
            "ab.A",
            "A1.a",
            "a1.A",
            "A.1",
            "aB.1",
            "A1.1",
            "1A.1",
            "0.A",
            "01.A",
            "012.A",
            "1A.a",
            "1a.A",
            "A.B.C.D.E",
            "AA.BB.CC.DD.EE",
            "a.B.c.d.e",
            "aa.bB.cc.dd.ee",
            "a@b",
            "a,b",
            "a_b",
            "a;b",
            "a:b",
            "a%b",
            "a?b",
            "a$b",
        ];
        for value in bad.iter().map(|s| s.to_string()).chain(["a".repeat(254)]) {
            assert!(!dns1123_subdomain_errors(&value).is_empty(), "{value:?}");
        }
    }

    /// `TestIsValidLabelValue`.
    #[test]
    fn label_values_are_empty_or_qualified_name_parts() {
        for value in [
            "simple",
            "now-with-dashes",
            "1-starts-with-num",
            "end-with-num-1",
            "1234",
            &"a".repeat(63),
            "",
        ] {
            assert_eq!(label_value_errors(value), Vec::<String>::new(), "{value:?}");
        }
        let bad = [
            "nospecialchars%^=@",
            "Tama-nui-te-rā.is.Māori.sun",
            "\\backslashes\\are\\bad",
            "-starts-with-dash",
            "ends-with-dash-",
            ".starts.with.dot",
            "ends.with.dot.",
            &"a".repeat(64),
        ];
        for value in bad {
            assert!(!label_value_errors(value).is_empty(), "{value:?}");
        }
    }

    #[test]
    fn labels_can_come_from_json_and_hash_maps() {
        let selector = parse("app=web,!canary,tier in (frontend,backend)");
        let json = serde_json::json!({"app": "web", "tier": "frontend", "n": 1});
        assert!(selector.matches(json.as_object().unwrap()));
        // A non-string value counts as absent.
        assert!(!parse("n").matches(json.as_object().unwrap()));
        let owned: HashMap<String, String> = [
            ("app".to_string(), "web".to_string()),
            ("tier".to_string(), "backend".to_string()),
        ]
        .into();
        assert!(selector.matches(&owned));
        assert!(!selector.matches(&&set(&[("app", "web"), ("tier", "frontend"), ("canary", "")])));
    }
}
