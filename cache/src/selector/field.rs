//! Field selectors: a port of k8s.io/apimachinery v1.20 `pkg/fields/selector.go`
//! (terms, operators, backslash escaping, matching), plus which fields each
//! resource of the v1.20 API server lets a client select on, and how it
//! computes their values from an object.
//!
//! Which fields a resource accepts is decided by the field-label conversion
//! functions registered in the API server's scheme (`pkg/apis/*/*/conversion.go`,
//! falling back to `runtime.DefaultMetaV1FieldSelectorConversion`), and the
//! values are computed by each registry's `GetAttrs`
//! (`pkg/registry/*/*/strategy.go`). The two lists differ in places (see
//! [`supported_fields`]).

use std::borrow::{Borrow, Cow};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::{BuildHasher, Hash};
use std::str::FromStr;

use serde_json::Value;

use super::SelectorError;

/// A set of fields a selector can be matched against.
pub trait FieldSource {
    /// The value of field `name`, or `None` if the set lacks it (which a
    /// selector treats as the empty string, as `fields.Set` does).
    fn field(&self, name: &str) -> Option<&str>;
}

impl<T: FieldSource + ?Sized> FieldSource for &T {
    fn field(&self, name: &str) -> Option<&str> {
        (**self).field(name)
    }
}

impl<K: Borrow<str> + Ord, V: AsRef<str>> FieldSource for BTreeMap<K, V> {
    fn field(&self, name: &str) -> Option<&str> {
        self.get(name).map(AsRef::as_ref)
    }
}

impl<K: Borrow<str> + Hash + Eq, V: AsRef<str>, S: BuildHasher> FieldSource for HashMap<K, V, S> {
    fn field(&self, name: &str) -> Option<&str> {
        self.get(name).map(AsRef::as_ref)
    }
}

/// The relation of a field selector term.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FieldOperator {
    /// `field=value` or `field==value` (`hasTerm`).
    Equals,
    /// `field!=value` (`notHasTerm`).
    NotEquals,
}

/// One term of a field selector, its value unescaped.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FieldRequirement {
    field: String,
    operator: FieldOperator,
    value: String,
}

impl FieldRequirement {
    /// The field path as the client wrote it (not validated: an unknown
    /// field is the resource's business, see [`supported_fields`]).
    pub fn field(&self) -> &str {
        &self.field
    }

    /// The operator.
    pub fn operator(&self) -> FieldOperator {
        self.operator
    }

    /// The value, unescaped.
    pub fn value(&self) -> &str {
        &self.value
    }

    /// Whether a set of fields satisfies this term; a missing field has the
    /// empty value.
    pub fn matches(&self, fields: &impl FieldSource) -> bool {
        let actual = fields.field(&self.field).unwrap_or("");
        match self.operator {
            FieldOperator::Equals => actual == self.value,
            FieldOperator::NotEquals => actual != self.value,
        }
    }
}

impl fmt::Display for FieldRequirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = match self.operator {
            FieldOperator::Equals => "=",
            FieldOperator::NotEquals => "!=",
        };
        write!(f, "{}{}{}", self.field, op, escape_value(&self.value))
    }
}

/// A parsed field selector: the AND of its terms.
///
/// Terms are in the order of their raw text, sorted (the API server sorts the
/// terms before parsing them); terms with an empty field and an empty value
/// (`=`, `==`, `!=`) are dropped, as the API server's `Transform` does.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct FieldSelector {
    terms: Vec<FieldRequirement>,
}

impl FieldSelector {
    /// The selector that matches every object.
    pub fn everything() -> FieldSelector {
        FieldSelector::default()
    }

    /// `fields.ParseSelector`: parses the `fieldSelector` query parameter.
    ///
    /// Terms are separated by unescaped commas; each is `field=value`,
    /// `field==value` or `field!=value`, split at the first operator. In the
    /// value, `\\`, `\,` and `\=` stand for `\`, `,` and `=`. Empty terms are
    /// skipped. Field names are not checked here: see [`supported_fields`].
    ///
    /// # Errors
    /// A term without an operator, an invalid escape sequence, or an
    /// unescaped `,`/`=` in a value, with the API server's message.
    pub fn parse(selector: &str) -> Result<FieldSelector, SelectorError> {
        let mut parts = split_terms(selector);
        parts.sort_unstable();
        let mut terms = Vec::with_capacity(parts.len());
        for part in parts {
            if part.is_empty() {
                continue;
            }
            let Some((field, operator, raw)) = split_term(part) else {
                return Err(SelectorError::field(format!(
                    "invalid selector: '{selector}'; can't understand '{part}'"
                )));
            };
            let value = unescape_value(raw)?;
            if field.is_empty() && value.is_empty() {
                continue;
            }
            terms.push(FieldRequirement {
                field: field.to_owned(),
                operator,
                value: value.into_owned(),
            });
        }
        Ok(FieldSelector { terms })
    }

    /// Whether the selector matches everything.
    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }

    /// The terms.
    pub fn requirements(&self) -> &[FieldRequirement] {
        &self.terms
    }

    /// The field paths the selector uses, in term order (with repeats), to
    /// be checked against the resource's [`supported_fields`].
    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.terms.iter().map(|t| t.field.as_str())
    }

    /// Whether a set of fields satisfies every term.
    pub fn matches(&self, fields: &impl FieldSource) -> bool {
        self.terms.iter().all(|t| t.matches(fields))
    }

    /// `RequiresExactMatch`: the value the first `field=value` term on
    /// `field` demands (used for `metadata.name`: a GET's name must agree
    /// with it, and a LIST can be answered by one lookup).
    pub fn requires_exact_match(&self, field: &str) -> Option<&str> {
        self.terms
            .iter()
            .find(|t| t.operator == FieldOperator::Equals && t.field == field)
            .map(|t| t.value.as_str())
    }
}

impl fmt::Display for FieldSelector {
    /// `Selector.String()`: the terms, values escaped, comma-separated.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, term) in self.terms.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{term}")?;
        }
        Ok(())
    }
}

impl FromStr for FieldSelector {
    type Err = SelectorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        FieldSelector::parse(s)
    }
}

/// `fields.EscapeValue`: prefixes `\`, `,` and `=` with a backslash.
pub fn escape_value(value: &str) -> Cow<'_, str> {
    if !value.contains(['\\', ',', '=']) {
        return Cow::Borrowed(value);
    }
    let mut out = String::with_capacity(value.len() + 4);
    for c in value.chars() {
        if matches!(c, '\\' | ',' | '=') {
            out.push('\\');
        }
        out.push(c);
    }
    Cow::Owned(out)
}

/// `fields.UnescapeValue`: undoes [`escape_value`].
///
/// # Errors
/// A backslash before anything but `\`, `,` or `=`, a trailing backslash, or
/// an unescaped `,` or `=`.
pub fn unescape_value(value: &str) -> Result<Cow<'_, str>, SelectorError> {
    if !value.contains(['\\', ',', '=']) {
        return Ok(Cow::Borrowed(value));
    }
    let mut out = String::with_capacity(value.len());
    let mut in_slash = false;
    for c in value.chars() {
        if in_slash {
            match c {
                '\\' | ',' | '=' => out.push(c),
                _ => {
                    return Err(SelectorError::field(format!(
                        "invalid field selector: invalid escape sequence: \\{c}"
                    )))
                }
            }
            in_slash = false;
            continue;
        }
        match c {
            '\\' => in_slash = true,
            // Go prints the rune with %v: its code point in decimal.
            ',' | '=' => {
                return Err(SelectorError::field(format!(
                    "invalid field selector: unescaped character in value: {}",
                    c as u32
                )))
            }
            _ => out.push(c),
        }
    }
    if in_slash {
        return Err(SelectorError::field(
            "invalid field selector: invalid escape sequence: \\".to_owned(),
        ));
    }
    Ok(Cow::Owned(out))
}

/// `splitTerms`: splits at commas not escaped by a backslash, keeping the
/// backslashes.
fn split_terms(selector: &str) -> Vec<&str> {
    if selector.is_empty() {
        return Vec::new();
    }
    let mut terms = Vec::with_capacity(1);
    let mut start = 0;
    let mut in_slash = false;
    for (i, b) in selector.bytes().enumerate() {
        // Byte-wise is the same as Go's rune-wise loop: '\\' and ',' never
        // occur inside a multi-byte character, and a backslash escapes the
        // character after it whatever its width (only its first byte is seen
        // here, and continuation bytes are neither '\\' nor ',').
        if in_slash {
            in_slash = false;
        } else if b == b'\\' {
            in_slash = true;
        } else if b == b',' {
            terms.push(&selector[start..i]);
            start = i + 1;
        }
    }
    terms.push(&selector[start..]);
    terms
}

/// `splitTerm`: splits at the first operator (`!=`, then `==`, then `=`
/// tried at each position); the field part has no escaping.
fn split_term(term: &str) -> Option<(&str, FieldOperator, &str)> {
    let b = term.as_bytes();
    for i in 0..b.len() {
        match (b[i], b.get(i + 1)) {
            (b'!', Some(b'=')) => return Some((&term[..i], FieldOperator::NotEquals, &term[i + 2..])),
            (b'=', Some(b'=')) => return Some((&term[..i], FieldOperator::Equals, &term[i + 2..])),
            (b'=', _) => return Some((&term[..i], FieldOperator::Equals, &term[i + 1..])),
            _ => {}
        }
    }
    None
}

// ---------------------------------------------------------------------------
// Selectable fields per resource (kube-apiserver v1.20)

/// `runtime.DefaultMetaV1FieldSelectorConversion`: every built-in resource
/// without a conversion function of its own, namespaced or not (on a
/// cluster-scoped resource `metadata.namespace` is the empty string).
const DEFAULT_FIELDS: &[&str] = &["metadata.name", "metadata.namespace"];
/// pkg/apis/core/v1/conversion.go, Pod. `spec.host` is an old alias of
/// `spec.nodeName`; `status.podIPs` is accepted but always empty.
const POD_FIELDS: &[&str] = &[
    "metadata.name",
    "metadata.namespace",
    "spec.nodeName",
    "spec.restartPolicy",
    "spec.schedulerName",
    "spec.serviceAccountName",
    "status.phase",
    "status.podIP",
    "status.podIPs",
    "status.nominatedNodeName",
    "spec.host",
];
/// pkg/apis/core/v1/conversion.go, Node (no `metadata.namespace`).
const NODE_FIELDS: &[&str] = &["metadata.name", "spec.unschedulable"];
/// pkg/apis/core/v1/conversion.go, ReplicationController.
const REPLICATION_CONTROLLER_FIELDS: &[&str] = &["metadata.name", "metadata.namespace", "status.replicas"];
/// pkg/apis/core/v1/conversion.go, AddFieldLabelConversionsForEvent.
const CORE_EVENT_FIELDS: &[&str] = &[
    "involvedObject.kind",
    "involvedObject.namespace",
    "involvedObject.name",
    "involvedObject.uid",
    "involvedObject.apiVersion",
    "involvedObject.resourceVersion",
    "involvedObject.fieldPath",
    "reason",
    "reportingComponent",
    "source",
    "type",
    "metadata.namespace",
    "metadata.name",
];
/// pkg/apis/core/v1/conversion.go, AddFieldLabelConversionsForNamespace (no
/// `metadata.namespace`).
const NAMESPACE_FIELDS: &[&str] = &["status.phase", "metadata.name"];
/// pkg/apis/core/v1/conversion.go, AddFieldLabelConversionsForSecret.
const SECRET_FIELDS: &[&str] = &["type", "metadata.namespace", "metadata.name"];
/// pkg/apis/certificates/v1{,beta1}/conversion.go (no `metadata.namespace`).
const CSR_FIELDS: &[&str] = &["metadata.name", "spec.signerName"];
/// pkg/apis/events/v1{,beta1}/conversion.go: the events.k8s.io names, which
/// the API server maps onto the core Event's (`regarding.kind` →
/// `involvedObject.kind`, `reportingController` → `reportingComponent`).
const EVENTS_K8S_IO_FIELDS: &[&str] = &[
    "reason",
    "regarding.kind",
    "regarding.namespace",
    "regarding.name",
    "regarding.uid",
    "regarding.apiVersion",
    "regarding.resourceVersion",
    "regarding.fieldPath",
    "reportingController",
    "type",
    "metadata.namespace",
    "metadata.name",
];
/// pkg/apis/batch/v1/conversion.go (Job) and pkg/apis/batch/v1beta1/conversion.go
/// (CronJob, where `status.successful` is accepted but always empty).
const JOB_FIELDS: &[&str] = &["metadata.name", "metadata.namespace", "status.successful"];

/// The field paths kube-apiserver v1.20 accepts in a field selector on a
/// built-in resource; any other field is a `400 Bad Request` (`field label
/// not supported: …`), so a selector using one must be forwarded.
///
/// `None` for groups the API server does not build in: custom resources (see
/// [`custom_resource_fields`]) and aggregated APIs (whose servers decide).
///
/// Notable: `metadata.namespace` is *not* accepted on nodes, namespaces and
/// certificatesigningrequests, yet is on other cluster-scoped resources;
/// replicasets accept only the defaults although their registry computes
/// `status.replicas`; pods accept `spec.host` (an alias of `spec.nodeName`) and
/// `status.podIPs` (always empty), but not `spec.hostNetwork` (added in v1.28).
/// Version-specific conversions of versions v1.20 does not serve by default
/// (apps/v1beta1 and v1beta2 statefulsets accept `status.successful`) are
/// left out: forwarding those is always correct.
pub fn supported_fields(group: &str, resource: &str) -> Option<&'static [&'static str]> {
    Some(match (group, resource) {
        ("", "pods") => POD_FIELDS,
        ("", "nodes") => NODE_FIELDS,
        ("", "replicationcontrollers") => REPLICATION_CONTROLLER_FIELDS,
        ("", "events") => CORE_EVENT_FIELDS,
        ("", "namespaces") => NAMESPACE_FIELDS,
        ("", "secrets") => SECRET_FIELDS,
        ("certificates.k8s.io", "certificatesigningrequests") => CSR_FIELDS,
        ("events.k8s.io", "events") => EVENTS_K8S_IO_FIELDS,
        ("batch", "jobs" | "cronjobs") => JOB_FIELDS,
        (group, _) if crate::request::BUILT_IN_GROUPS.contains(&group) => DEFAULT_FIELDS,
        _ => return None,
    })
}

/// The field paths the v1.20 apiextensions server accepts on a custom
/// resource: `metadata.name`, and `metadata.namespace` only if the resource
/// is namespaced (a cluster-scoped custom resource rejects it, unlike
/// built-in cluster-scoped resources).
pub fn custom_resource_fields(namespaced: bool) -> &'static [&'static str] {
    if namespaced {
        DEFAULT_FIELDS
    } else {
        &DEFAULT_FIELDS[..1]
    }
}

/// The selectable field values of an object, as the API server's `GetAttrs`
/// computes them, keyed by the names a client uses for this group (so
/// `spec.host` for pods and the `regarding.*` names for events.k8s.io are
/// present too), for every field in [`supported_fields`]; for groups that are
/// not built in, `metadata.name` and `metadata.namespace` (check a selector's
/// fields against [`custom_resource_fields`] first: a cluster-scoped custom
/// resource rejects `metadata.namespace`).
///
/// `object` is the object as the API server serves it in this group (for
/// events, core/v1 and events.k8s.io differ). Values follow Go's formatting:
/// booleans `true`/`false` (a missing `spec.unschedulable` is `false`),
/// integers in decimal (a missing `status.replicas` is `0`), strings as they
/// are, anything missing the empty string.
pub fn field_values(group: &str, resource: &str, object: &Value) -> BTreeMap<String, String> {
    let supported = supported_fields(group, resource).unwrap_or(DEFAULT_FIELDS);
    supported
        .iter()
        .map(|&field| {
            let value = match source(group, resource, field) {
                Source::At(path) => string_at(object, path).to_owned(),
                Source::OwnPath => {
                    let path: Vec<&str> = field.split('.').collect();
                    string_at(object, &path).to_owned()
                }
                Source::FirstNonEmpty(paths) => first_non_empty(object, paths),
                Source::Bool(path) => bool_at(object, path),
                Source::Int(path) => int_at(object, path),
                Source::Empty => String::new(),
            };
            (field.to_owned(), value)
        })
        .collect()
}

/// The paths of an object [`field_values`] reads for this resource.
pub fn field_paths(group: &str, resource: &str) -> Vec<Vec<&'static str>> {
    let supported = supported_fields(group, resource).unwrap_or(DEFAULT_FIELDS);
    let mut paths = Vec::new();
    for &field in supported {
        match source(group, resource, field) {
            Source::At(path) | Source::Bool(path) | Source::Int(path) => paths.push(path.to_vec()),
            Source::OwnPath => paths.push(field.split('.').collect()),
            Source::FirstNonEmpty(alternatives) => paths.extend(alternatives.iter().map(|p| p.to_vec())),
            Source::Empty => {}
        }
    }
    paths
}

/// Every (group, resource) with a table of its own in [`supported_fields`]
/// (the rest of the built-in groups share [`DEFAULT_FIELDS`]).
pub fn field_tables() -> &'static [(&'static str, &'static str)] {
    &[
        ("", "pods"),
        ("", "nodes"),
        ("", "replicationcontrollers"),
        ("", "events"),
        ("", "namespaces"),
        ("", "secrets"),
        ("certificates.k8s.io", "certificatesigningrequests"),
        ("events.k8s.io", "events"),
        ("batch", "jobs"),
        ("batch", "cronjobs"),
        ("apps", "deployments"),
    ]
}

/// Where a selectable field's value comes from, as the API server's
/// `GetAttrs` computes it.
enum Source {
    /// The string at this path.
    At(&'static [&'static str]),
    /// The string at the path the field names.
    OwnPath,
    /// The first non-empty string of these paths.
    FirstNonEmpty(&'static [&'static [&'static str]]),
    /// `fmt.Sprint(bool)` of the value at this path.
    Bool(&'static [&'static str]),
    /// `strconv.Itoa` of the integer at this path.
    Int(&'static [&'static str]),
    /// Always empty.
    Empty,
}

fn source(group: &str, resource: &str, field: &str) -> Source {
    match (group, resource, field) {
        (_, _, "metadata.name") => Source::At(&["metadata", "name"]),
        (_, _, "metadata.namespace") => Source::At(&["metadata", "namespace"]),
        ("", "pods", "spec.host") => Source::At(&["spec", "nodeName"]),
        // DeprecatedServiceAccount stands in when serviceAccountName is empty.
        ("", "pods", "spec.serviceAccountName") => {
            Source::FirstNonEmpty(&[&["spec", "serviceAccountName"], &["spec", "serviceAccount"]])
        }
        // podIP wins over podIPs[0] (Convert_v1_PodStatus_To_core_PodStatus).
        ("", "pods", "status.podIP") => {
            Source::FirstNonEmpty(&[&["status", "podIP"], &["status", "podIPs", "0", "ip"]])
        }
        // Accepted by the conversion, absent from the field set.
        ("", "pods", "status.podIPs") => Source::Empty,
        ("", "nodes", "spec.unschedulable") => Source::Bool(&["spec", "unschedulable"]),
        ("", "replicationcontrollers", "status.replicas") => Source::Int(&["status", "replicas"]),
        ("", "events", "source") => {
            Source::FirstNonEmpty(&[&["source", "component"], &["reportingComponent"]])
        }
        ("events.k8s.io", "events", "reportingController") => Source::At(&["reportingController"]),
        ("batch", "jobs", "status.successful") => Source::Int(&["status", "succeeded"]),
        ("batch", "cronjobs", "status.successful") => Source::Empty,
        // Every other field's value is at its own path.
        _ => Source::OwnPath,
    }
}

fn value_at<'a>(object: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(object, |v, key| match v {
        Value::Array(items) => key.parse::<usize>().ok().and_then(|i| items.get(i)),
        _ => v.get(key),
    })
}

fn string_at<'a>(object: &'a Value, path: &[&str]) -> &'a str {
    value_at(object, path).and_then(Value::as_str).unwrap_or("")
}

fn first_non_empty(object: &Value, paths: &[&[&str]]) -> String {
    paths
        .iter()
        .map(|p| string_at(object, p))
        .find(|s| !s.is_empty())
        .unwrap_or("")
        .to_owned()
}

/// `fmt.Sprint(bool)`.
fn bool_at(object: &Value, path: &[&str]) -> String {
    let b = value_at(object, path).and_then(Value::as_bool).unwrap_or(false);
    b.to_string()
}

/// `strconv.Itoa(int(int32))`.
fn int_at(object: &Value, path: &[&str]) -> String {
    let n = value_at(object, path).and_then(Value::as_i64).unwrap_or(0);
    n.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn set(pairs: &[(&'static str, &'static str)]) -> BTreeMap<&'static str, &'static str> {
        pairs.iter().copied().collect()
    }

    fn parse(s: &str) -> FieldSelector {
        FieldSelector::parse(s).unwrap_or_else(|e| panic!("{s:?} should parse: {e}"))
    }

    /// Field sets the differential table is matched against.
    fn field_sets() -> Vec<BTreeMap<&'static str, &'static str>> {
        vec![
            set(&[]),
            set(&[("x", "a")]),
            set(&[("x", ""), ("y", "b")]),
            set(&[("metadata.name", "foo"), ("metadata.namespace", "default")]),
            set(&[("a", "=,\\"), ("", "v")]),
            set(&[("x", "a,b"), ("y", "c=d")]),
        ]
    }

    /// Each input's `String()` or error message, and whether it matches each
    /// of [`field_sets`], as recorded from k8s.io/apimachinery v1.20's
    /// `fields.ParseSelector`.
    #[test]
    fn parsing_and_matching_agree_with_the_api_server() {
        #[rustfmt::skip]
        let cases: &[(&str, Result<&str, &str>, &str)] = &[
            ("x=a,y=b,z=c", Ok("x=a,y=b,z=c"), "000000"),
            ("", Ok(""), "111111"),
            ("x!=a,y=b", Ok("x!=a,y=b"), "001000"),
            ("x=a||y\\=b", Ok("x=a||y\\=b"), "000000"),
            ("x=a\\=\\=b", Ok("x=a\\=\\=b"), "000000"),
            ("x=a||y=b", Err("invalid field selector: unescaped character in value: 61"), ""),
            ("x==a==b", Err("invalid field selector: unescaped character in value: 61"), ""),
            ("x=a,b", Err("invalid selector: 'x=a,b'; can't understand 'b'"), ""),
            ("x in (a)", Err("invalid selector: 'x in (a)'; can't understand 'x in (a)'"), ""),
            ("x in (a,b,c)", Err("invalid selector: 'x in (a,b,c)'; can't understand 'b'"), ""),
            ("x", Err("invalid selector: 'x'; can't understand 'x'"), ""),
            ("x=a,a=x", Ok("a=x,x=a"), "000000"),
            ("a=x,x=a", Ok("a=x,x=a"), "000000"),
            ("foo=bar,baz=blah,complex=\\=value\\\\\\,\\\\", Ok("baz=blah,complex=\\=value\\\\\\,\\\\,foo=bar"), "000000"),
            ("=", Ok(""), "111111"),
            ("==", Ok(""), "111111"),
            ("!=", Ok(""), "111111"),
            ("=a", Ok("=a"), "000000"),
            ("!=a", Ok("!=a"), "111111"),
            ("a=", Ok("a="), "111101"),
            ("a!=", Ok("a!="), "000010"),
            ("a==", Ok("a="), "111101"),
            (",", Ok(""), "111111"),
            (",,", Ok(""), "111111"),
            ("a=b,", Ok("a=b"), "000000"),
            (",a=b", Ok("a=b"), "000000"),
            ("a=b,,c=d", Ok("a=b,c=d"), "000000"),
            ("k=\\,,k2=v2", Ok("k2=v2,k=\\,"), "000000"),
            ("k=\\\\,k2=v2", Ok("k2=v2,k=\\\\"), "000000"),
            ("k=\\\\\\,,k2=v2", Ok("k2=v2,k=\\\\\\,"), "000000"),
            ("k=\\a\\b\\", Err("invalid field selector: invalid escape sequence: \\a"), ""),
            ("k=\\", Err("invalid field selector: invalid escape sequence: \\"), ""),
            ("함=수,목=록", Ok("목=록,함=수"), "000000"),
            ("a!b=c", Ok("a!b=c"), "000000"),
            ("a=!=b", Err("invalid field selector: unescaped character in value: 61"), ""),
            ("a!==b", Err("invalid field selector: unescaped character in value: 61"), ""),
            ("a===b", Err("invalid field selector: unescaped character in value: 61"), ""),
            ("a=b=c", Err("invalid field selector: unescaped character in value: 61"), ""),
            ("a=b\\", Err("invalid field selector: invalid escape sequence: \\"), ""),
            ("a=\\x", Err("invalid field selector: invalid escape sequence: \\x"), ""),
            ("a=\\é", Err("invalid field selector: invalid escape sequence: \\é"), ""),
            ("a\\,b=c", Ok("a\\,b=c"), "000000"),
            ("a\\=b", Ok("a\\=b"), "000000"),
            (" metadata.name = foo", Ok(" metadata.name = foo"), "000000"),
            ("metadata.name=foo,metadata.name=bar", Ok("metadata.name=bar,metadata.name=foo"), "000000"),
            ("metadata.name!=foo,metadata.name=bar", Ok("metadata.name!=foo,metadata.name=bar"), "000000"),
            ("metadata.name==foo", Ok("metadata.name=foo"), "000100"),
            ("b=1,a=2,a!=3", Ok("a!=3,a=2,b=1"), "000000"),
            ("a==z,a=\\=b", Ok("a=z,a=\\=b"), "000000"),
            ("x=a\u{0}b", Ok("x=a\u{0}b"), "000000"),
            ("spec.nodeName=,status.phase!=Running", Ok("spec.nodeName=,status.phase!=Running"), "111111"),
        ];
        let sets = field_sets();
        for (input, want, bits) in cases {
            match (FieldSelector::parse(input), want) {
                (Ok(selector), Ok(string)) => {
                    assert_eq!(selector.to_string(), *string, "String() of {input:?}");
                    assert_eq!(selector.is_empty(), string.is_empty(), "Empty() of {input:?}");
                    let got: String = sets
                        .iter()
                        .map(|s| if selector.matches(s) { '1' } else { '0' })
                        .collect();
                    assert_eq!(got, *bits, "matches of {input:?}");
                }
                (Err(error), Err(message)) => {
                    assert_eq!(error.message(), *message, "error for {input:?}");
                    assert_eq!(error.kind(), super::super::SelectorKind::Field);
                }
                (got, want) => panic!("{input:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    /// `TestSplitTerms`.
    #[test]
    fn terms_split_at_unescaped_commas() {
        let cases: &[(&str, &[&str])] = &[
            ("a", &["a"]),
            ("a=avalue", &["a=avalue"]),
            ("a=avalue,b=bvalue", &["a=avalue", "b=bvalue"]),
            (
                "a=avalue,b==bvalue,c!=cvalue",
                &["a=avalue", "b==bvalue", "c!=cvalue"],
            ),
            ("", &[]),
            ("a=a,", &["a=a", ""]),
            (",a=a", &["", "a=a"]),
            (r"k=\,,k2=v2", &[r"k=\,", "k2=v2"]),
            (r"k=\\,k2=v2", &[r"k=\\", "k2=v2"]),
            (r"k=\\\,,k2=v2", &[r"k=\\\,", "k2=v2"]),
            (r"k=\a\b\", &[r"k=\a\b\"]),
            (r"k=\", &[r"k=\"]),
            ("함=수,목=록", &["함=수", "목=록"]),
            (r"k=\é,x", &[r"k=\é", "x"]),
        ];
        for (input, want) in cases {
            assert_eq!(split_terms(input), *want, "{input:?}");
        }
    }

    /// `TestSplitTerm`.
    #[test]
    fn a_term_splits_at_its_first_operator() {
        use FieldOperator::*;
        type Split<'a> = Option<(&'a str, FieldOperator, &'a str)>;
        let cases: &[(&str, Split)] = &[
            ("a=value", Some(("a", Equals, "value"))),
            ("b==value", Some(("b", Equals, "value"))),
            ("c!=value", Some(("c", NotEquals, "value"))),
            ("", None),
            ("a", None),
            ("a!", None),
            (r"k=\,", Some(("k", Equals, r"\,"))),
            (r"k=\=", Some(("k", Equals, r"\="))),
            (r"k=\\\a\b\=\,\", Some(("k", Equals, r"\\\a\b\=\,\"))),
            ("함=수", Some(("함", Equals, "수"))),
            ("a!b=c", Some(("a!b", Equals, "c"))),
            ("a=!=b", Some(("a", Equals, "!=b"))),
        ];
        for (input, want) in cases {
            assert_eq!(split_term(input), *want, "{input:?}");
        }
    }

    /// `TestEscapeValue`.
    #[test]
    fn escaping_round_trips_and_bad_escapes_fail() {
        let cases = [
            ("", ""),
            ("a", "a"),
            ("=", r"\="),
            (",", r"\,"),
            (r"\", r"\\"),
            (r"\=\,\", r"\\\=\\\,\\"),
        ];
        for (raw, escaped) in cases {
            assert_eq!(escape_value(raw), escaped);
            assert_eq!(unescape_value(escaped).unwrap(), raw);
        }
        for bad in [r"\", r"\\\", r"\a"] {
            let error = unescape_value(bad).unwrap_err();
            assert!(
                error
                    .message()
                    .starts_with("invalid field selector: invalid escape sequence: "),
                "{bad:?}"
            );
        }
        assert_eq!(
            unescape_value("a=b").unwrap_err().message(),
            "invalid field selector: unescaped character in value: 61"
        );
        assert_eq!(
            unescape_value("a,b").unwrap_err().message(),
            "invalid field selector: unescaped character in value: 44"
        );
    }

    /// `TestSelectorParse`.
    #[test]
    fn good_selectors_restring_unchanged_and_bad_ones_fail() {
        for input in ["x=a,y=b,z=c", "", "x!=a,y=b", r"x=a||y\=b", r"x=a\=\=b"] {
            assert_eq!(parse(input).to_string(), input);
        }
        for input in ["x=a||y=b", "x==a==b", "x=a,b", "x in (a)", "x in (a,b,c)", "x"] {
            assert!(FieldSelector::parse(input).is_err(), "{input:?} should fail");
        }
    }

    /// `TestDeterministicParse`.
    #[test]
    fn term_order_does_not_change_the_parsed_selector() {
        assert_eq!(parse("x=a,a=x"), parse("a=x,x=a"));
    }

    /// `TestSelectorMatches`: a missing field is the empty string.
    #[test]
    fn selectors_match_the_field_sets_the_api_server_matches() {
        assert!(parse("").matches(&set(&[("x", "y")])));
        assert!(parse("x=y").matches(&set(&[("x", "y")])));
        assert!(parse("x=y,z=w").matches(&set(&[("x", "y"), ("z", "w")])));
        assert!(parse("x!=y,z!=w").matches(&set(&[("x", "z"), ("z", "a")])));
        assert!(parse("notin=in").matches(&set(&[("notin", "in")])));
        assert!(!parse("x=y").matches(&set(&[("x", "z")])));
        assert!(!parse("x=y,z=w").matches(&set(&[("x", "w"), ("z", "w")])));
        assert!(!parse("x!=y,z!=w").matches(&set(&[("x", "z"), ("z", "w")])));
        let fields = set(&[("foo", "bar"), ("baz", "blah"), ("complex", r"=value\,\")]);
        assert!(parse("foo=bar").matches(&fields));
        assert!(parse("baz=blah").matches(&fields));
        assert!(parse("foo=bar,baz=blah").matches(&fields));
        assert!(parse(r"foo=bar,baz=blah,complex=\=value\\\,\\").matches(&fields));
        assert!(!parse("foo=blah").matches(&fields));
        assert!(!parse("baz=bar").matches(&fields));
        assert!(!parse("foo=bar,foobar=bar,baz=blah").matches(&fields));
        assert!(parse("missing=").matches(&fields));
        assert!(!parse("missing!=").matches(&fields));
    }

    /// `TestRequiresExactMatch`.
    #[test]
    fn an_exact_match_is_the_first_equality_on_the_field() {
        let cases = [
            ("", "test", None),
            ("a=b", "test", None),
            ("test=b", "test", Some("b")),
            ("test=", "test", Some("")),
            ("test!=b", "test", None),
            ("test!=", "test", None),
            ("=x,test=b", "test", Some("b")),
            ("test!=c,test=b", "test", Some("b")),
            // Terms are sorted first: "bar" before "foo".
            (
                "metadata.name=foo,metadata.name=bar",
                "metadata.name",
                Some("bar"),
            ),
        ];
        for (input, field, want) in cases {
            assert_eq!(parse(input).requires_exact_match(field), want, "{input:?}");
        }
    }

    #[test]
    fn fields_lists_every_field_the_selector_uses() {
        let selector = parse("spec.nodeName=n1,metadata.name!=x,=v");
        assert_eq!(
            selector.fields().collect::<Vec<_>>(),
            ["", "metadata.name", "spec.nodeName"]
        );
        assert_eq!(parse("=,!=").fields().count(), 0);
    }

    #[test]
    fn supported_fields_follow_the_v1_20_conversion_functions() {
        let pods = supported_fields("", "pods").unwrap();
        for field in [
            "spec.nodeName",
            "spec.host",
            "status.podIPs",
            "status.nominatedNodeName",
        ] {
            assert!(pods.contains(&field), "{field}");
        }
        assert!(!pods.contains(&"spec.hostNetwork"));
        assert_eq!(
            supported_fields("", "nodes").unwrap(),
            ["metadata.name", "spec.unschedulable"]
        );
        assert!(!supported_fields("", "namespaces")
            .unwrap()
            .contains(&"metadata.namespace"));
        assert_eq!(
            supported_fields("apps", "replicasets").unwrap(),
            ["metadata.name", "metadata.namespace"]
        );
        assert_eq!(
            supported_fields("", "configmaps").unwrap(),
            ["metadata.name", "metadata.namespace"]
        );
        assert_eq!(
            supported_fields("rbac.authorization.k8s.io", "clusterroles").unwrap(),
            DEFAULT_FIELDS
        );
        assert!(supported_fields("events.k8s.io", "events")
            .unwrap()
            .contains(&"regarding.name"));
        assert!(!supported_fields("events.k8s.io", "events")
            .unwrap()
            .contains(&"source"));
        assert!(supported_fields("", "events")
            .unwrap()
            .contains(&"involvedObject.name"));
        assert!(supported_fields("batch", "cronjobs")
            .unwrap()
            .contains(&"status.successful"));
        assert_eq!(supported_fields("example.com", "widgets"), None);
        assert_eq!(
            custom_resource_fields(true),
            ["metadata.name", "metadata.namespace"]
        );
        assert_eq!(custom_resource_fields(false), ["metadata.name"]);
    }

    fn values(group: &str, resource: &str, object: Value) -> BTreeMap<String, String> {
        let values = field_values(group, resource, &object);
        let supported = supported_fields(group, resource).unwrap_or(DEFAULT_FIELDS);
        let mut keys: Vec<&str> = values.keys().map(String::as_str).collect();
        let mut want = supported.to_vec();
        keys.sort_unstable();
        want.sort_unstable();
        assert_eq!(keys, want, "every supported field has a value");
        values
    }

    #[test]
    fn pod_field_values_follow_the_registry() {
        let pod = json!({
            "metadata": {"name": "web-1", "namespace": "default"},
            "spec": {"nodeName": "node-a", "restartPolicy": "Always", "schedulerName": "default-scheduler",
                     "serviceAccount": "legacy", "hostNetwork": true},
            "status": {"phase": "Running", "podIPs": [{"ip": "10.0.0.7"}, {"ip": "fd00::7"}]}
        });
        let v = values("", "pods", pod);
        assert_eq!(v["metadata.name"], "web-1");
        assert_eq!(v["metadata.namespace"], "default");
        assert_eq!(v["spec.nodeName"], "node-a");
        assert_eq!(v["spec.host"], "node-a");
        assert_eq!(v["spec.serviceAccountName"], "legacy");
        assert_eq!(v["status.podIP"], "10.0.0.7");
        assert_eq!(v["status.podIPs"], "");
        assert_eq!(v["status.nominatedNodeName"], "");
        assert!(parse("spec.host=node-a,status.phase!=Pending,status.podIPs=").matches(&v));

        let pod = json!({"metadata": {"name": "p"}, "spec": {"serviceAccountName": "sa", "serviceAccount": "old"},
                         "status": {"podIP": "10.0.0.8", "podIPs": [{"ip": "10.0.0.9"}]}});
        let v = values("", "pods", pod);
        assert_eq!(v["spec.serviceAccountName"], "sa");
        assert_eq!(v["status.podIP"], "10.0.0.8");
    }

    #[test]
    fn booleans_and_integers_are_formatted_as_go_does() {
        let v = values(
            "",
            "nodes",
            json!({"metadata": {"name": "n"}, "spec": {"unschedulable": true}}),
        );
        assert_eq!(v["spec.unschedulable"], "true");
        let v = values("", "nodes", json!({"metadata": {"name": "n"}, "spec": {}}));
        assert_eq!(v["spec.unschedulable"], "false");
        let v = values(
            "",
            "replicationcontrollers",
            json!({"metadata": {"name": "r"}, "status": {"replicas": 3}}),
        );
        assert_eq!(v["status.replicas"], "3");
        let v = values("", "replicationcontrollers", json!({"metadata": {"name": "r"}}));
        assert_eq!(v["status.replicas"], "0");
        let v = values(
            "batch",
            "jobs",
            json!({"metadata": {"name": "j"}, "status": {"succeeded": 2}}),
        );
        assert_eq!(v["status.successful"], "2");
        let v = values(
            "batch",
            "cronjobs",
            json!({"metadata": {"name": "c"}, "status": {"succeeded": 2}}),
        );
        assert_eq!(v["status.successful"], "");
    }

    #[test]
    fn event_field_values_use_each_groups_names() {
        let core = json!({
            "metadata": {"name": "e", "namespace": "ns"},
            "involvedObject": {"kind": "Pod", "name": "web-1", "uid": "u-1", "fieldPath": "spec.containers{c}"},
            "reason": "Started", "type": "Normal", "reportingComponent": "kubelet", "source": {}
        });
        let v = values("", "events", core);
        assert_eq!(v["involvedObject.kind"], "Pod");
        assert_eq!(v["involvedObject.fieldPath"], "spec.containers{c}");
        assert_eq!(v["involvedObject.apiVersion"], "");
        assert_eq!(v["source"], "kubelet", "source falls back to reportingComponent");
        assert_eq!(v["reportingComponent"], "kubelet");
        let v = values(
            "",
            "events",
            json!({"source": {"component": "scheduler"}, "reportingComponent": "x"}),
        );
        assert_eq!(v["source"], "scheduler");

        let new = json!({
            "metadata": {"name": "e", "namespace": "ns"},
            "regarding": {"kind": "Pod", "name": "web-1"},
            "reason": "Started", "type": "Normal", "reportingController": "kubelet"
        });
        let v = values("events.k8s.io", "events", new);
        assert_eq!(v["regarding.kind"], "Pod");
        assert_eq!(v["regarding.name"], "web-1");
        assert_eq!(v["reportingController"], "kubelet");
    }

    #[test]
    fn other_resources_have_name_namespace_and_their_own_fields() {
        let v = values(
            "",
            "secrets",
            json!({"metadata": {"name": "s", "namespace": "ns"}, "type": "Opaque"}),
        );
        assert_eq!(v["type"], "Opaque");
        let v = values(
            "",
            "namespaces",
            json!({"metadata": {"name": "ns"}, "status": {"phase": "Active"}}),
        );
        assert_eq!(v["status.phase"], "Active");
        let v = values(
            "certificates.k8s.io",
            "certificatesigningrequests",
            json!({"metadata": {"name": "c"}, "spec": {"signerName": "kubernetes.io/kubelet-serving"}}),
        );
        assert_eq!(v["spec.signerName"], "kubernetes.io/kubelet-serving");
        // Cluster-scoped: metadata.namespace is empty.
        let v = values(
            "storage.k8s.io",
            "storageclasses",
            json!({"metadata": {"name": "fast"}}),
        );
        assert_eq!(v["metadata.namespace"], "");
        assert!(parse("metadata.namespace=").matches(&v));
        let v = values(
            "example.com",
            "widgets",
            json!({"metadata": {"name": "w", "namespace": "ns"}}),
        );
        assert_eq!(v["metadata.namespace"], "ns");
    }
}
