//! Which reads the cache may answer, and their answers: LIST and GET as the
//! API server's watch cache renders them, WATCH as a stream of events from
//! the store, filtered per watcher.
//!
//! The rules mirror the v1.20 cacher (`storage/cacher/cacher.go`): a LIST or
//! GET with no `resourceVersion` is a consistent (etcd) read, and so are
//! `Exact`, `continue`, and `limit` with a version other than `0`; those are
//! never answered here (a WATCH with no `resourceVersion` is the watch
//! cache's, as one at `0`). Anything the cache cannot render exactly (tables,
//! partial metadata, YAML, pretty JSON, unknown parameters) is forwarded too.
//!
//! Watches with `sendInitialEvents` (streaming lists, KEP-3157: client-go's
//! WatchList, kube-runtime's `streaming_lists`), which a v1.20 API server
//! does not know, are answered as a current API server's cacher answers
//! them: see [`Invalid`], [`prepare_watch`] and [`watch`].
//!
//! Answers are in JSON or, for built-in resources, protobuf, as the API
//! server's content negotiation would pick from the client's `Accept`
//! (client-go's core components send `application/vnd.kubernetes.protobuf,
//! application/json`: protobuf for built-in types, JSON for custom
//! resources). Each encoding is rendered from a store of its own.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::chunk::{Chunk, ChunkStream, MAX_SLICES};
use crate::list::{Items, ListBody};
use crate::reflector::ResourceSpec;
use crate::request::{RequestInfo, Verb};
use crate::selector::{FieldSelector, LabelSelector};
use crate::store::{
    parse_resource_version, Encoding, Event, EventType, FrameKind, Notice, Object, Store, WatchError,
    WatchStart,
};
use crate::upstream::FetchError;

/// Why a read is forwarded rather than answered from the cache (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Bypass {
    NotARead,
    Subresource,
    ConsistentRead,
    Exact,
    Continue,
    Limit,
    InvalidResourceVersion,
    Parameters,
    Encoding,
    BadSelector,
    UnsupportedField,
    NotCacheable,
    NotSynced,
    NotFresh,
    TooOld,
    OverBudget,
    /// The API server refuses kache's own LIST of the resource (401/403):
    /// its reads are forwarded, for the API server to answer each client.
    Refused,
    Disabled,
}

impl Bypass {
    pub fn as_str(self) -> &'static str {
        match self {
            Bypass::NotARead => "not_a_read",
            Bypass::Subresource => "subresource",
            Bypass::ConsistentRead => "consistent_read",
            Bypass::Exact => "exact",
            Bypass::Continue => "continue",
            Bypass::Limit => "limit",
            Bypass::InvalidResourceVersion => "invalid_resource_version",
            Bypass::Parameters => "parameters",
            Bypass::Encoding => "encoding",
            Bypass::BadSelector => "bad_selector",
            Bypass::UnsupportedField => "unsupported_field",
            Bypass::NotCacheable => "not_cacheable",
            Bypass::NotSynced => "not_synced",
            Bypass::NotFresh => "not_fresh",
            Bypass::TooOld => "too_old",
            Bypass::OverBudget => "over_budget",
            Bypass::Refused => "refused",
            Bypass::Disabled => "disabled",
        }
    }
}

/// What the read asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadKind {
    Get {
        name: String,
    },
    List,
    Watch {
        bookmarks: bool,
        timeout: Option<Duration>,
        initial_events: InitialEvents,
    },
}

/// What a watch sends before the changes, by its `sendInitialEvents`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitialEvents {
    /// No `sendInitialEvents` (every client of a v1.20 API server): at `0`
    /// (or without a version) the state as ADDED events, at `N` nothing.
    Legacy,
    /// `sendInitialEvents=true` (a streaming list, KEP-3157): the state as
    /// ADDED events, whatever the version, then — with bookmarks — a BOOKMARK
    /// annotated `k8s.io/initial-events-end` at the state's version.
    Stream,
    /// `sendInitialEvents=false`: none, whatever the version; at `0`, the
    /// changes after the store's current version.
    Nothing,
}

/// The version a read may be answered at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MinVersion {
    /// `resourceVersion=0`: any state.
    Any,
    /// `resourceVersion=N` (not older than N); for a watch, events after N.
    AtLeast(u64),
    /// No version on a watch with `sendInitialEvents`: at least the API
    /// server's current version, as a consistent read (see [`prepare_watch`]).
    Latest,
}

/// A read the cache may answer.
#[derive(Debug, Clone)]
pub struct ReadPlan {
    pub kind: ReadKind,
    /// Empty for cluster-wide reads.
    pub namespace: String,
    pub label: LabelSelector,
    pub field: FieldSelector,
    pub version: MinVersion,
    /// The encodings the client's `Accept` leads to; see [`ReadPlan::encoding`].
    pub accept: Negotiated,
    /// Options a current API server refuses with `422 Invalid` and a v1.20
    /// one would misread (it ignores `sendInitialEvents`): kache answers the
    /// 422 itself ([`invalid`]); the other fields are then meaningless.
    pub invalid: Option<Invalid>,
    /// The answer goes to a socket whose writer sends filed bytes with
    /// `sendfile` (see [`crate::filed`]): an unfiltered list may be sent
    /// from its memory file. The caller that knows the connection sets it.
    pub zero_copy: bool,
}

/// Query parameters a cached answer honours (or, like `limit` at version 0,
/// ignores exactly as the API server does).
const KNOWN_PARAMETERS: &[&str] = &[
    "resourceVersion",
    "resourceVersionMatch",
    "labelSelector",
    "fieldSelector",
    "limit",
    "timeout",
    "timeoutSeconds",
    "allowWatchBookmarks",
    "watch",
    "continue",
    "sendInitialEvents",
];

/// Decides whether a resource read may be answered from the cache.
///
/// # Errors
/// The reason it may not.
pub fn plan(info: &RequestInfo, query: Option<&str>, headers: &HeaderMap) -> Result<ReadPlan, Bypass> {
    if !info.is_resource_request {
        return Err(Bypass::NotARead);
    }
    if !info.subresource.is_empty() {
        return Err(Bypass::Subresource);
    }
    let read = &info.read;
    // A `*bool`: absent, or its first value as the API server's query
    // booleans read (anything but `0` and `false`).
    let send_initial_events = read.send_initial_events;
    for (key, _) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        if !KNOWN_PARAMETERS.contains(&key.as_ref()) {
            return Err(Bypass::Parameters);
        }
    }
    let accept = negotiated(headers, info.verb() == Verb::Watch);
    if accept.with_protobuf.is_none() && accept.without_protobuf.is_none() {
        return Err(Bypass::Encoding);
    }
    let kind = match info.verb() {
        Verb::Get => ReadKind::Get {
            name: info.name.clone(),
        },
        Verb::List => ReadKind::List,
        // A watch of one object is not served (below), but its options are
        // checked first.
        Verb::Watch => ReadKind::Watch {
            bookmarks: read.allow_watch_bookmarks,
            timeout: watch_timeout(read.timeout_seconds.as_deref())?,
            initial_events: match send_initial_events {
                None => InitialEvents::Legacy,
                Some(true) => InitialEvents::Stream,
                Some(false) => InitialEvents::Nothing,
            },
        },
        _ => return Err(Bypass::NotARead),
    };
    // The API server decodes these as int64 and answers 400 when it cannot.
    for number in [&read.timeout_seconds, &read.limit].into_iter().flatten() {
        if number.parse::<i64>().is_err() {
            return Err(Bypass::Parameters);
        }
    }
    // A GET's options have no `sendInitialEvents`: both API servers ignore it.
    if send_initial_events.is_some() && !matches!(kind, ReadKind::Get { .. }) {
        if let Some(invalid) = Invalid::of(read) {
            return Ok(ReadPlan {
                kind,
                namespace: info.namespace.clone(),
                label: LabelSelector::default(),
                field: FieldSelector::default(),
                version: MinVersion::Any,
                accept,
                invalid: Some(invalid),
                zero_copy: false,
            });
        }
    }
    let watch = matches!(kind, ReadKind::Watch { .. });
    if watch && !info.name.is_empty() {
        return Err(Bypass::Parameters);
    }
    let version = match (
        read.resource_version.as_deref(),
        read.resource_version_match.as_deref(),
    ) {
        // A streaming watch (its match is `NotOlderThan`, see [`Invalid::of`]):
        // without a version, at least the API server's current one.
        (None | Some(""), _) if watch && send_initial_events.is_some() => MinVersion::Latest,
        (Some(rv), _) if watch && send_initial_events.is_some() && rv != "0" => {
            MinVersion::AtLeast(parse_resource_version(rv).ok_or(Bypass::InvalidResourceVersion)?)
        }
        (_, _) if watch && send_initial_events.is_some() => MinVersion::Any,
        // A watch may not name a match without `sendInitialEvents` (v1.20:
        // not at all): the API server's 422.
        (_, Some(_)) if watch => return Err(Bypass::Parameters),
        // A watch without a version is served by the API server's watch cache
        // exactly as one at `0` (v1.20 `Cacher.Watch` parses "" as 0; current
        // `getWatchCacheResourceVersion`, its "legacy case"): the state as
        // ADDED events, then the changes. It is not a consistent read.
        (None | Some(""), _) if watch => MinVersion::Any,
        (None | Some(""), _) => return Err(Bypass::ConsistentRead),
        (_, Some("Exact")) => return Err(Bypass::Exact),
        (_, Some(m)) if m != "NotOlderThan" => return Err(Bypass::Parameters),
        (Some("0"), _) => MinVersion::Any,
        (Some(rv), _) => {
            MinVersion::AtLeast(parse_resource_version(rv).ok_or(Bypass::InvalidResourceVersion)?)
        }
    };
    if read.continue_token.as_deref().is_some_and(|c| !c.is_empty()) {
        return Err(Bypass::Continue);
    }
    let limited = read.limit.as_deref().is_some_and(|l| !l.is_empty() && l != "0");
    if limited && version != MinVersion::Any && !watch {
        return Err(Bypass::Limit);
    }
    let label = LabelSelector::parse(read.label_selector.as_deref().unwrap_or(""))
        .map_err(|_| Bypass::BadSelector)?;
    let field = FieldSelector::parse(read.field_selector.as_deref().unwrap_or(""))
        .map_err(|_| Bypass::BadSelector)?;
    Ok(ReadPlan {
        kind,
        namespace: info.namespace.clone(),
        label,
        field,
        version,
        accept,
        invalid: None,
        zero_copy: false,
    })
}

/// The API server's refusal of a read's list options
/// (`ValidateListOptions`, k8s.io/apimachinery
/// `pkg/apis/meta/internalversion/validation`, with the WatchList feature
/// on): each field error's text, in the order it reports them.
///
/// Only reads with `sendInitialEvents` are checked here. A v1.20 API server
/// does not know the parameter: it would serve a list that carries it, or a
/// watch that carries it without `resourceVersionMatch`, as if it were not
/// there. So kache answers every read carrying it that a current API server
/// refuses with that server's 422 itself. Invalid options without it are
/// v1.20's to refuse (a watch naming a match is its 422 `resourceVersionMatch
/// is forbidden for watch`) and are forwarded, as is a valid streaming list
/// kache cannot serve (a resource it does not cache, a store not in sync):
/// on v1.20's 422, client-go's reflector falls back to LIST and WATCH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid(Vec<crate::status::Cause>);

impl Invalid {
    /// The errors of a read whose `sendInitialEvents` is set, if any. As the
    /// API server, it goes by the `watch` parameter, not the path: a
    /// `/watch/…` path without `watch=true` is validated as a list.
    fn of(read: &crate::request::ReadOptions) -> Option<Invalid> {
        const MATCH: &str = "resourceVersionMatch";
        // `field.Forbidden` and `field.NotSupported`: the cause's message is
        // the error's body (`ErrorBody`), the message's line the path and it.
        let forbidden = |field: &'static str, detail: &str| crate::status::Cause {
            reason: "FieldValueForbidden",
            message: format!("Forbidden: {detail}"),
            field,
        };
        // The value is a `metav1.ResourceVersionMatch`, not a `string`:
        // `ErrorBody` renders it with `json.Marshal`.
        let not_supported = |value: &str, supported: &[&str]| {
            let supported: Vec<String> = supported.iter().map(|s| format!("{s:?}")).collect();
            crate::status::Cause {
                reason: "FieldValueNotSupported",
                message: format!(
                    "Unsupported value: {}: supported values: {}",
                    go_json_string(value),
                    supported.join(", ")
                ),
                field: MATCH,
            }
        };
        let matching = read.resource_version_match.as_deref().unwrap_or("");
        let continued = read.continue_token.as_deref().is_some_and(|c| !c.is_empty());
        let mut errors = Vec::new();
        if read.watch {
            if matching != "NotOlderThan" {
                errors.push(forbidden(
                    MATCH,
                    "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
                ));
            }
            if !matching.is_empty() {
                if matching != "NotOlderThan" {
                    errors.push(not_supported(matching, &["NotOlderThan"]));
                }
                if continued {
                    errors.push(forbidden(
                        MATCH,
                        "resourceVersionMatch is forbidden when continue is provided",
                    ));
                }
            }
        } else {
            if !matching.is_empty() {
                let version = read.resource_version.as_deref().unwrap_or("");
                if version.is_empty() {
                    errors.push(forbidden(
                        MATCH,
                        "resourceVersionMatch is forbidden unless resourceVersion is provided",
                    ));
                }
                if continued {
                    errors.push(forbidden(
                        MATCH,
                        "resourceVersionMatch is forbidden when continue is provided",
                    ));
                }
                if matching != "Exact" && matching != "NotOlderThan" {
                    errors.push(not_supported(matching, &["Exact", "NotOlderThan", ""]));
                }
                if matching == "Exact" && version == "0" {
                    errors.push(forbidden(
                        MATCH,
                        "resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\"",
                    ));
                }
            }
            errors.push(forbidden(
                "sendInitialEvents",
                "sendInitialEvents is forbidden for list",
            ));
        }
        (!errors.is_empty()).then_some(Invalid(errors))
    }

    /// The Status message: `ListOptions.meta.k8s.io "" is invalid: ` and the
    /// errors as Go's `utilerrors.Aggregate` prints them (one alone; several,
    /// without repeats, in brackets).
    pub fn message(&self) -> String {
        let mut unique: Vec<String> = Vec::new();
        for cause in &self.0 {
            let error = format!("{}: {}", cause.field, cause.message);
            if !unique.contains(&error) {
                unique.push(error);
            }
        }
        let errors = match unique.as_slice() {
            [one] => (*one).to_string(),
            many => format!("[{}]", many.join(", ")),
        };
        format!("ListOptions.meta.k8s.io \"\" is invalid: {errors}")
    }
}

/// A string as Go's `json.Marshal` writes it (HTML characters escaped).
fn go_json_string(value: &str) -> String {
    serde_json::to_string(value)
        .expect("invariant: a string serializes")
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
        .replace('\u{2028}', "\\u2028")
        .replace('\u{2029}', "\\u2029")
}

/// The API server's answer to options it refuses ([`Invalid`]): `422
/// Invalid` on `ListOptions.meta.k8s.io`, in the read's encoding, as
/// `errors.NewInvalid` makes it: the group and kind, a cause per error
/// (repeats included), and a message naming each error once.
pub fn invalid(invalid: &Invalid, encoding: Encoding) -> Response<Bytes> {
    let message = invalid.message();
    let status = crate::status::Status::failure(StatusCode::UNPROCESSABLE_ENTITY, &message).with_details(
        crate::status::Details {
            group: "meta.k8s.io",
            kind: "ListOptions",
            causes: &invalid.0,
            ..crate::status::Details::default()
        },
    );
    let body = match encoding {
        Encoding::Json => status.to_json(),
        Encoding::Protobuf => status.to_protobuf(),
    };
    response(StatusCode::UNPROCESSABLE_ENTITY, encoding, body)
}

/// How long a watch lasts, from its `timeoutSeconds`: that many seconds
/// exactly; absent or `0`, the handler's random default (`None`, see
/// [`WatchSettings::default_timeout`]). A negative value, or one whose
/// nanoseconds overflow Go's `time.Duration`, makes the API server's handler
/// end the watch at once or at some odd time: such watches are left to it.
/// A value that is not an integer is its 400 (see [`plan`]).
fn watch_timeout(timeout_seconds: Option<&str>) -> Result<Option<Duration>, Bypass> {
    let Some(Ok(seconds)) = timeout_seconds.map(str::parse::<i64>) else {
        return Ok(None);
    };
    match seconds {
        0 => Ok(None),
        s if s < 0 || s.checked_mul(1_000_000_000).is_none() => Err(Bypass::Parameters),
        s => Ok(Some(Duration::from_secs(s.unsigned_abs()))),
    }
}

/// The encoding the API server would answer a read in, for each kind of
/// resource: `None` where it is not one the cache renders (YAML, tables,
/// partial metadata, pretty, or nothing acceptable: the API server's 406).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// For a resource served in JSON, YAML and protobuf (built-in types).
    pub with_protobuf: Option<Encoding>,
    /// For one served in JSON and YAML only (custom resources).
    pub without_protobuf: Option<Encoding>,
}

/// One clause of an `Accept` header, as `goautoneg.ParseAccept` reads it.
struct Clause<'a> {
    kind: &'a str,
    subtype: &'a str,
    q: f64,
    params: Vec<(&'a str, &'a str)>,
}

/// Parses and orders an `Accept` header as the API server does
/// (`github.com/munnerz/goautoneg`): clauses without a `/` are dropped
/// (except `*`), `q` defaults to 1, and clauses are insertion-sorted by its
/// `Less` (higher q first, then non-wildcards). `None` past 12 clauses, where
/// Go's sort stops being an insertion sort.
fn accept_clauses(header: &str) -> Option<Vec<Clause<'_>>> {
    let mut clauses = Vec::new();
    for part in header.split(',') {
        let part = part.trim_matches(' ');
        let mut pieces = part.split(';');
        let media = pieces.next().unwrap_or("");
        let (kind, subtype) = match media.split_once('/') {
            None if media.trim_matches(' ') == "*" => ("*", "*"),
            None => continue,
            Some((_, rest)) if rest.contains('/') => continue,
            Some((kind, subtype)) => (kind.trim_matches(' '), subtype.trim_matches(' ')),
        };
        let mut clause = Clause {
            kind,
            subtype,
            q: 1.0,
            params: Vec::new(),
        };
        for param in pieces {
            let Some((key, value)) = param.split_once('=') else {
                continue;
            };
            if value.contains('=') {
                continue;
            }
            let key = key.trim_matches(' ');
            if key == "q" {
                // strconv.ParseFloat(v, 32): anything unparsable is 0.
                clause.q = value.parse::<f32>().map(f64::from).unwrap_or(0.0);
            } else {
                clause.params.push((key, value.trim_matches(' ')));
            }
        }
        clauses.push(clause);
    }
    if clauses.len() > 12 {
        return None;
    }
    let less = |a: &Clause<'_>, b: &Clause<'_>| {
        a.q > b.q || (a.kind != "*" && b.kind == "*") || (a.subtype != "*" && b.subtype == "*")
    };
    for i in 1..clauses.len() {
        let mut j = i;
        while j > 0 && less(&clauses[j], &clauses[j - 1]) {
            clauses.swap(j, j - 1);
            j -= 1;
        }
    }
    Some(clauses)
}

/// The media types the API server offers, in its order.
const JSON: &str = "json";
const YAML: &str = "yaml";
const PROTOBUF: &str = "vnd.kubernetes.protobuf";

/// The API server's choice (`NegotiateMediaTypeOptions`) among `offered`:
/// the first clause, in sorted order, that matches an offered type with
/// parameters it accepts. Parameters that change the rendering (`as`, `g`,
/// `v` — tables and partial metadata —, `pretty`, `export`, `sv`, and
/// `stream` outside a watch) make the answer one the cache does not render.
fn negotiate(clauses: &[Clause<'_>], offered: &[&str], watch: bool) -> Option<Encoding> {
    for clause in clauses {
        for &subtype in offered {
            let matches = (clause.kind == "application"
                && (clause.subtype == subtype || clause.subtype == "*"))
                || (clause.kind == "*" && clause.subtype == "*");
            if !matches {
                continue;
            }
            let plain = clause.params.iter().all(|(key, value)| match *key {
                "stream" => watch && *value == "watch",
                "as" | "g" | "v" | "pretty" | "export" | "sv" => false,
                // charset and anything else the API server ignores.
                _ => true,
            });
            return match subtype {
                JSON if plain => Some(Encoding::Json),
                PROTOBUF if plain => Some(Encoding::Protobuf),
                _ => None,
            };
        }
    }
    None
}

/// What the client's `Accept` header asks of a read.
fn negotiated(headers: &HeaderMap, watch: bool) -> Negotiated {
    let header = match headers.get(header::ACCEPT).map(HeaderValue::to_str) {
        None => "",
        Some(Ok(header)) => header,
        Some(Err(_)) => {
            return Negotiated {
                with_protobuf: None,
                without_protobuf: None,
            }
        }
    };
    // No Accept at all: the first offered type.
    if header.is_empty() {
        return Negotiated {
            with_protobuf: Some(Encoding::Json),
            without_protobuf: Some(Encoding::Json),
        };
    }
    match accept_clauses(header) {
        Some(clauses) => Negotiated {
            with_protobuf: negotiate(&clauses, &[JSON, YAML, PROTOBUF], watch),
            without_protobuf: negotiate(&clauses, &[JSON, YAML], watch),
        },
        None => Negotiated {
            with_protobuf: None,
            without_protobuf: None,
        },
    }
}

impl ReadPlan {
    /// The encoding to answer in, for `spec`: what the API server would pick
    /// given the resource's media types; an aggregated API's only when that
    /// does not depend on whether it speaks protobuf.
    ///
    /// # Errors
    /// [`Bypass::Encoding`]: not an encoding the cache renders for this
    /// resource (custom resources asked for protobuf alone get the API
    /// server's 406; resources whose protobuf fields kache cannot read are
    /// forwarded too).
    pub fn encoding(&self, spec: &ResourceSpec) -> Result<Encoding, Bypass> {
        let Negotiated {
            with_protobuf,
            without_protobuf,
        } = self.accept;
        let encoding = match spec.speaks_protobuf {
            Some(true) => with_protobuf,
            Some(false) => without_protobuf,
            None => with_protobuf.filter(|_| with_protobuf == without_protobuf),
        };
        match encoding {
            Some(Encoding::Protobuf) if !spec.protobuf_cacheable() => Err(Bypass::Encoding),
            Some(encoding) => Ok(encoding),
            None => Err(Bypass::Encoding),
        }
    }
}

/// Whether every field of the selector is one the resource supports.
pub fn fields_supported(field: &FieldSelector, spec: &ResourceSpec) -> bool {
    let supported: &[&str] = if spec.custom {
        crate::selector::custom_resource_fields(spec.namespaced)
    } else {
        crate::selector::supported_fields(&spec.group, &spec.resource)
            .unwrap_or_else(|| crate::selector::custom_resource_fields(spec.namespaced))
    };
    field.fields().all(|f| supported.contains(&f))
}

fn matches(plan: &ReadPlan, object: &Object) -> bool {
    plan.label.matches(&object.labels) && plan.field.matches(&object.fields)
}

fn response(status: StatusCode, encoding: Encoding, body: Vec<u8>) -> Response<Bytes> {
    let mut response = Response::new(Bytes::from(body));
    *response.status_mut() = status;
    let content_type = match encoding {
        Encoding::Json => "application/json",
        Encoding::Protobuf => crate::protobuf::CONTENT_TYPE,
    };
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, private"),
    );
    response
}

/// How many objects a list or GET answered from the cache holds (a response
/// extension, for the proxy's per-client accounting).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Objects(pub usize);

/// The events a watch answered from the cache has sent so far (a response
/// extension, for the proxy's per-client accounting): counted by the watch
/// as it hands out its frames, so nobody scans its bytes for them.
#[derive(Debug, Clone, Default)]
pub struct Events(Arc<std::sync::atomic::AtomicUsize>);

impl Events {
    fn add(&self, events: usize) {
        self.0.fetch_add(events, std::sync::atomic::Ordering::Relaxed);
    }

    /// The events sent since the last call.
    pub fn take(&self) -> usize {
        self.0.swap(0, std::sync::atomic::Ordering::Relaxed)
    }
}

/// The API server's answer to a LIST at the store's current state, in the
/// store's `encoding`.
pub fn list(
    plan: &ReadPlan,
    spec: &ResourceSpec,
    store: &Store,
    encoding: Encoding,
) -> Response<ChunkStream> {
    let body = list_body(plan, spec, store, encoding);
    let objects = body.objects();
    let mut response = body.into_response();
    response.extensions_mut().insert(Objects(objects));
    response
}

/// The LIST answer's parts over a snapshot of the store (the objects shared,
/// not copied: see [`crate::list`]).
pub fn list_body(plan: &ReadPlan, spec: &ResourceSpec, store: &Store, encoding: Encoding) -> ListBody {
    let unfiltered = plan.namespace.is_empty() && plan.label.is_empty() && plan.field.is_empty();
    let (items, resource_version) = if unfiltered {
        store.items()
    } else {
        let namespace = (!plan.namespace.is_empty()).then_some(plan.namespace.as_str());
        let snapshot = store.snapshot(namespace, |o| matches(plan, o));
        (
            Arc::new(Items::new(snapshot.objects.iter())),
            snapshot.resource_version,
        )
    };
    let kind = format!("{}List", spec.kind);
    let body = match encoding {
        Encoding::Protobuf => ListBody::protobuf(&kind, &spec.api_version(), resource_version, items),
        // Custom resources' lists come from the apiextensions server, which
        // always writes an empty `continue`.
        Encoding::Json => ListBody::json(&kind, &spec.api_version(), resource_version, spec.custom, items),
    };
    // Filtered lists' items are the answer's own: never filed.
    if unfiltered && plan.zero_copy {
        body.from_file()
    } else {
        body
    }
}

fn with_objects(mut response: Response<Bytes>, objects: usize) -> Response<Bytes> {
    response.extensions_mut().insert(Objects(objects));
    response
}

/// The API server's answer to a GET: the object, or its `NotFound` Status,
/// in the store's `encoding`.
pub fn get(
    name: &str,
    plan: &ReadPlan,
    spec: &ResourceSpec,
    store: &Store,
    encoding: Encoding,
) -> Response<Bytes> {
    match (store.get(&plan.namespace, name).0, encoding) {
        (Some(object), Encoding::Json) => {
            let mut body = object.bytes().to_vec();
            body.push(b'\n');
            with_objects(response(StatusCode::OK, encoding, body), 1)
        }
        (Some(object), Encoding::Protobuf) => {
            let body = crate::protobuf::object_body(&spec.api_version(), &spec.kind, object.bytes());
            with_objects(response(StatusCode::OK, encoding, body), 1)
        }
        (None, _) => not_found(name, spec, encoding),
    }
}

fn not_found(name: &str, spec: &ResourceSpec, encoding: Encoding) -> Response<Bytes> {
    let message = format!("{} \"{}\" not found", spec.qualified_resource(), name);
    let details = crate::status::Details {
        name,
        group: &spec.group,
        kind: &spec.resource,
        ..crate::status::Details::default()
    };
    let status = crate::status::Status::failure(StatusCode::NOT_FOUND, &message).with_details(details);
    let body = match encoding {
        Encoding::Json => status.to_json(),
        Encoding::Protobuf => status.to_protobuf(),
    };
    response(StatusCode::NOT_FOUND, encoding, body)
}

/// Settings of watches served from the cache.
#[derive(Debug, Clone)]
pub struct WatchSettings {
    /// How often a watcher that asked for bookmarks gets one (the API
    /// server's `defaultBookmarkFrequency`, a minute).
    pub bookmark_interval: Duration,
    /// A watch without `timeoutSeconds` ends after a random time in
    /// `[default_timeout, 2 × default_timeout)`, as the API server's handler
    /// ends it after `minRequestTimeout × (1 + rand)` (`--min-request-timeout`,
    /// 1800 s by default).
    pub default_timeout: Duration,
}

impl Default for WatchSettings {
    fn default() -> Self {
        WatchSettings {
            bookmark_interval: Duration::from_secs(60),
            default_timeout: Duration::from_secs(1800),
        }
    }
}

/// How long before a watch's deadline its last bookmark is due: the API
/// server schedules one 2 s before it (`cacheWatcher.nextBookmarkTime`, v1.20
/// and current alike), so that a client whose watch times out resumes from a
/// version as recent as possible.
const BOOKMARK_BEFORE_DEADLINE: Duration = Duration::from_secs(2);

/// Starts a watch served from the store. `on_end` runs when the watch ends
/// (client gone, timeout, too slow, store stopped or rebuilt from a list
/// older than itself). It outlives the store's upstream watch: while the
/// reflector reconnects the watch stays open (until its timeout), and after
/// a relist it gets the differences as events (see [`crate::store`]).
///
/// Its timing is the API server watch cache's (`cacher.go`, `cache_watcher.go`):
///
/// - It starts at once, whatever the requested version: one newer than the
///   store gets the events after it as the store reaches them (the cacher
///   neither waits nor fails a plain watch; only a streaming list waits, see
///   [`prepare_watch`], which the caller runs first).
/// - It is *at* a version from the start: the requested one, or the store's
///   for `0`, or its last replayed event's; it never sends an event or a
///   bookmark at or below that version (the cacher's `event.ResourceVersion >
///   resourceVersion` in `cacheWatcher.process`).
/// - With `sendInitialEvents=true` (a streaming list, KEP-3157) it starts
///   with the store's state as ADDED events through its selectors, whatever
///   the version, and is at the state's version; with bookmarks, a BOOKMARK
///   annotated `k8s.io/initial-events-end` at that version follows at once,
///   then the changes. With `sendInitialEvents=false` it sends no state: at
///   `0` it starts at the store's version, at `N` after `N` (older than the
///   retained events: the cacher's `200` + ERROR `410 Expired`, here, since
///   a v1.20 upstream would refuse the request).
/// - With `allowWatchBookmarks`, a BOOKMARK every `bookmark_interval` and one
///   2 s before the deadline, at the version of the last notice this watcher
///   took from the store (never ahead of an event still on its way to it),
///   and only if that is past the version the watch started at: on a quiet
///   resource the API server sends none either. A bookmark is made when
///   the client's connection takes more, at the version reached then: one
///   never waits behind a full buffer (the cacher's `nonblockingAdd` drops
///   such a bookmark; the next one carries a newer version).
/// - It ends at its deadline (`timeoutSeconds` exactly, or the random default)
///   with a clean end of stream, never an ERROR event; a client that stopped
///   reading gets that end when it reads again, and `on_end` runs at the
///   deadline all the same.
/// - A client that falls further behind than the store's backlog of notices
///   is ended (its stream ends cleanly once it reads what was sent), as the
///   cacher ends a watcher it cannot hand an event to; the client resumes or
///   relists. Nobody else waits for it.
/// - A client that stopped reading holds nothing of the store: its watch's
///   keeper (see [`Slot`]) lets go of the watcher — its replay, its feed, the
///   store itself — once the deadline passed, once it fell behind by more
///   than the backlog, or once the store, stopped, waited a whole check for
///   it to take its last notice. What the client gets when it reads again
///   is the end of its stream, as above.
///
/// # Errors
/// The requested version is older than the retained events (the caller
/// forwards, and the API server answers or says `410 Expired` itself), or
/// the store was stopped.
pub fn watch(
    plan: ReadPlan,
    spec: Arc<ResourceSpec>,
    store: Arc<Store>,
    encoding: Encoding,
    settings: &WatchSettings,
    on_end: impl FnOnce() + Send + 'static,
) -> Result<Response<ChunkStream>, WatchError> {
    let (bookmarks, timeout, initial_events) = match &plan.kind {
        ReadKind::Watch {
            bookmarks,
            timeout,
            initial_events,
        } => (*bookmarks, *timeout, *initial_events),
        _ => (false, None, InitialEvents::Legacy),
    };
    let from = match (initial_events, plan.version) {
        // The state, whatever the version: [`prepare_watch`] saw to it that
        // the store is fresh enough.
        (InitialEvents::Stream, _) => 0,
        (InitialEvents::Nothing, MinVersion::Any | MinVersion::Latest) => store.resource_version(),
        (_, MinVersion::Any | MinVersion::Latest) => 0,
        (_, MinVersion::AtLeast(rv)) => rv,
    };
    let namespace = (!plan.namespace.is_empty()).then_some(plan.namespace.as_str());
    let start = match store.watch_from(from, namespace) {
        Ok(start) => start,
        // The cacher's `410 Expired` ERROR event, for a watch a v1.20
        // upstream would refuse (its 422 on `resourceVersionMatch`).
        Err(WatchError::TooOld(too_old)) if initial_events == InitialEvents::Nothing => {
            on_end();
            let message = format!(
                "too old resource version: {} ({})",
                too_old.requested, too_old.oldest
            );
            let status = crate::status::Status::failure(StatusCode::GONE, &message);
            return Ok(error_watch(&status, encoding));
        }
        Err(error) => return Err(error),
    };
    let timeout = timeout.unwrap_or_else(|| jittered(settings.default_timeout));
    let now = Instant::now();
    let deadline = now.checked_add(timeout).unwrap_or_else(|| far_future(now));
    let WatchStart {
        state,
        initial,
        resource_version,
        feed,
        position,
    } = start;
    // The version the watch is at once its replay is sent; at `0`, the
    // store's (the cacher's replay of its state is at its version).
    let started_at = initial
        .iter()
        .map(|e| e.resource_version)
        .chain(state.iter().map(|o| o.resource_version))
        .fold(if from == 0 { resource_version } else { from }, u64::max);
    let next_bookmark = bookmarks
        .then(|| next_bookmark_at(now, settings.bookmark_interval, deadline))
        .flatten();
    let watcher = Watcher {
        frames: Frames {
            encoding,
            api_version: spec.api_version(),
            kind: spec.kind.clone(),
        },
        plan,
        store,
        state: state.into_iter(),
        initial: initial.into_iter(),
        end_bookmark: initial_events == InitialEvents::Stream && bookmarks,
        live: false,
        started_at,
        seen: resource_version,
        feed: Feed::new(feed),
        queued: VecDeque::new(),
        bookmarks,
        bookmark_due: false,
        ending: false,
        events: Events::default(),
        position,
        _end: OnEnd(Some(Box::new(on_end))),
    };
    let events = watcher.events.clone();
    let bookmarks = next_bookmark.map(|first| Bookmarks {
        first,
        interval: settings.bookmark_interval,
    });
    let slot = Slot::new(watcher, deadline, bookmarks);
    let mut response = watch_response(Box::pin(WatchBody(slot)), encoding);
    response.extensions_mut().insert(events);
    Ok(response)
}

/// Runs a watch's `on_end` when dropped, with its watcher: the watch
/// ended, its client went away, or its keeper let go of it.
struct OnEnd(Option<Box<dyn FnOnce() + Send>>);

impl Drop for OnEnd {
    fn drop(&mut self) {
        if let Some(on_end) = self.0.take() {
            on_end();
        }
    }
}

/// How often a watch's keeper checks that its client still reads.
const KEEPER_INTERVAL: Duration = Duration::from_secs(10);

/// A watch's watcher, shared by its body, which reads it whenever the
/// client's connection takes more, and its keeper, a task that keeps the
/// watch's time and lets go of it for a client that stopped reading.
///
/// hyper polls a body only when the client's socket takes more. A watcher
/// whose client stopped reading is not polled, so it cannot end itself: it
/// would keep its replay (a watch from `0` holds the state it started
/// from, however much the store changed since), its place in the
/// broadcast, and the store itself — evicted or not — for as long as the
/// connection stays open. The cacher ends such a watcher when it cannot
/// hand it an event, and forgets it. Here the keeper checks every
/// [`KEEPER_INTERVAL`], and at the deadline: once the deadline passed, once
/// the watcher fell further behind than the store keeps notices for it
/// (the broadcast's own condition for a lost notice), or once the store was
/// stopped and the watcher did not take the store's last notice within a
/// whole interval, it drops the watcher (`on_end` runs) and wakes the body,
/// which ends the stream when polled.
///
/// The keeper is also the watch's only timer: it ends the watch at its
/// deadline, and marks each bookmark due at its time. The body reads no
/// clock and polls no timer of its own for each event it sends.
struct Slot {
    watcher: std::sync::Mutex<Option<Box<Watcher>>>,
    /// The body's waker, for the keeper to wake when it lets go or marks a
    /// bookmark due.
    waker: futures::task::AtomicWaker,
    keeper: std::sync::OnceLock<tokio::task::AbortHandle>,
}

/// When a watch's bookmarks fall due: the first, then every `interval`
/// (see [`next_bookmark_at`]).
struct Bookmarks {
    first: Instant,
    interval: Duration,
}

impl Slot {
    fn new(watcher: Watcher, deadline: Instant, bookmarks: Option<Bookmarks>) -> Arc<Slot> {
        let store = Arc::downgrade(&watcher.store);
        let slot = Arc::new(Slot {
            watcher: std::sync::Mutex::new(Some(Box::new(watcher))),
            waker: futures::task::AtomicWaker::new(),
            keeper: std::sync::OnceLock::new(),
        });
        let keeper = tokio::spawn(Slot::keep(Arc::downgrade(&slot), store, deadline, bookmarks));
        let _ = slot.keeper.set(keeper.abort_handle());
        slot
    }

    /// The keeper: bookmarks marked due and checks, until the watch ends or
    /// it lets go.
    async fn keep(
        slot: std::sync::Weak<Slot>,
        store: std::sync::Weak<Store>,
        deadline: Instant,
        bookmarks: Option<Bookmarks>,
    ) {
        let interval = bookmarks.as_ref().map(|b| b.interval);
        let mut next_bookmark = bookmarks.map(|b| b.first);
        let check_after = |now: Instant| {
            now.checked_add(KEEPER_INTERVAL)
                .map_or(deadline, |at| at.min(deadline))
        };
        let mut next_check = check_after(Instant::now());
        // The watcher's position when the store was last seen stopped.
        let mut stopped_at = None;
        loop {
            tokio::time::sleep_until(next_bookmark.map_or(next_check, |at| at.min(next_check))).await;
            let Some(slot) = slot.upgrade() else {
                return;
            };
            let now = Instant::now();
            // Under the lock, which the body holds while it polls: a poll
            // under way is not mistaken for a stall, and the body registers
            // its waker there before it waits, so the wake that follows
            // reaches it.
            let mut guard = slot
                .watcher
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // Ended by its body: nothing left to keep.
            let Some(watcher) = guard.as_mut() else {
                return;
            };
            let mut marked = false;
            if let (Some(due), Some(interval)) = (next_bookmark, interval) {
                if now >= due {
                    watcher.bookmark_due = true;
                    marked = true;
                    next_bookmark = next_bookmark_at(now, interval, deadline).filter(|at| *at > due);
                }
            }
            let let_go = now >= next_check && {
                next_check = check_after(now);
                let position = watcher.position;
                now >= deadline
                    || match store.upgrade() {
                        None => true,
                        Some(store) if store.lost_notices(position) => true,
                        Some(store) if store.is_closed() => {
                            let waited = stopped_at == Some(position) && position < store.notices_sent();
                            stopped_at = Some(position);
                            waited
                        }
                        Some(_) => false,
                    }
            };
            // The watcher is dropped out of the lock (`on_end` runs), and
            // the body woken after it: to end the stream, or to send the
            // bookmark.
            let watcher = if let_go { guard.take() } else { None };
            drop(guard);
            drop(watcher);
            if let_go || marked {
                slot.waker.wake();
            }
            if let_go {
                return;
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(keeper) = self.keeper.get() {
            keeper.abort();
        }
    }
}

/// A watch's body: the watcher, until it ends.
///
/// The body itself takes the store's notices and frames them when its
/// connection asks for more to write: an event wakes each watcher's
/// connection once, and nothing is queued between the store's broadcast
/// and the connection's write buffer. A client that reads slowly leaves its
/// notices in the broadcast (each store keeps its `backlog` of them for
/// every watcher); one that falls further behind than that is ended when
/// it reads again, as the cacher ends a watcher it cannot hand an event to,
/// and the client resumes or relists.
struct WatchBody(Arc<Slot>);

impl futures::Stream for WatchBody {
    type Item = Result<Chunk, FetchError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let slot = &self.0;
        let mut watcher = slot
            .watcher
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(running) = watcher.as_mut() else {
            return Poll::Ready(None);
        };
        match running.poll_frames(cx) {
            Poll::Ready(Some(chunk)) => Poll::Ready(Some(Ok(chunk))),
            Poll::Ready(None) => {
                // Ended: the store's feed and the replay are let go of now,
                // and `on_end` runs.
                let ended = watcher.take();
                drop(watcher);
                drop(ended);
                Poll::Ready(None)
            }
            // Registered under the lock, where the keeper changes the
            // watcher: whatever it does after this wakes the body.
            Poll::Pending => {
                slot.waker.register(cx.waker());
                Poll::Pending
            }
        }
    }
}

/// One watch's state, read by its body.
struct Watcher {
    plan: ReadPlan,
    frames: Frames,
    store: Arc<Store>,
    /// From `0`: the state to replay as ADDED, each object framed as it is
    /// sent (nothing made per object under the store's lock, nothing kept
    /// once sent).
    state: std::vec::IntoIter<Arc<Object>>,
    /// From a version: the retained events after it.
    initial: std::vec::IntoIter<Arc<Event>>,
    /// A streaming list's initial events end with a BOOKMARK at their
    /// state's version, marked as their end (`isListWatchRequest`: only for
    /// a client that takes bookmarks).
    end_bookmark: bool,
    /// The replay is sent: frames now come from the feed.
    live: bool,
    /// The version the watch is at once its replay is sent: nothing at or
    /// below it is sent.
    started_at: u64,
    /// The store's version as far as this watcher has taken its notices:
    /// everything up to it is on its way to the client.
    seen: u64,
    feed: Feed,
    /// Frames taken from the feed that did not fit in the last chunk (a
    /// relist's events); sent before anything else.
    queued: VecDeque<Bytes>,
    /// The client asked for bookmarks.
    bookmarks: bool,
    /// A bookmark fell due: set by the keeper, which keeps the watch's
    /// time; sent once everything taken is on its way.
    bookmark_due: bool,
    /// The watch ends once what it has taken is sent.
    ending: bool,
    /// The frames handed out, for the proxy's accounting.
    events: Events,
    /// The store's notices taken so far, counted from the store's first.
    position: u64,
    /// Dropped with the watcher: `on_end` runs.
    _end: OnEnd,
}

impl Watcher {
    /// The next chunk of frames: up to [`MAX_SLICES`] slices of whatever
    /// is ready (the rest of the replay, the notices the store has
    /// broadcast since, a bookmark that fell due); `None` when the watch
    /// ends with a clean end of stream, never an ERROR event.
    ///
    /// No clock is read and no timer polled here: the watch's keeper marks
    /// a bookmark due, and lets go of the watcher at its deadline.
    fn poll_frames(&mut self, cx: &mut Context<'_>) -> Poll<Option<Chunk>> {
        let mut chunk = Chunk::default();
        let mut events = 0;
        while chunk.slice_count() < MAX_SLICES {
            if let Some(frame) = self.queued.pop_front() {
                chunk.push(frame);
                events += 1;
            } else if self.ending {
                break;
            } else if !self.live {
                events += usize::from(self.replay_next(&mut chunk));
            } else {
                match self.feed.poll_recv(cx) {
                    Poll::Ready(notice) => self.take(notice),
                    Poll::Pending => break,
                }
            }
        }
        if self.queued.is_empty() && self.queued.capacity() > MAX_SLICES {
            // A relist's burst does not stay allocated for the rest of the watch.
            self.queued = VecDeque::new();
        }
        if self.live && self.queued.is_empty() && !self.ending {
            if let Some(frame) = self.bookmark() {
                chunk.push(frame);
                events += 1;
            }
        }
        if !chunk.is_empty() {
            self.events.add(events);
            Poll::Ready(Some(chunk))
        } else if self.ending {
            Poll::Ready(None)
        } else {
            Poll::Pending
        }
    }

    /// The next replayed frame, or the end of the replay; whether a frame
    /// was pushed.
    fn replay_next(&mut self, chunk: &mut Chunk) -> bool {
        if let Some(object) = self.state.next() {
            if in_scope(&self.plan, &object) && matches(&self.plan, &object) {
                self.frames
                    .added(&object)
                    .into_iter()
                    .for_each(|part| chunk.push(part));
                return true;
            }
        } else if let Some(event) = self.initial.next() {
            if let Some(frame) = frame_for(&self.plan, &self.frames, &event) {
                chunk.push(frame);
                return true;
            }
        } else {
            self.live = true;
            if std::mem::take(&mut self.end_bookmark) {
                chunk.push(self.frames.initial_events_end(&self.store, self.started_at));
                return true;
            }
        }
        false
    }

    /// Takes a notice from the store: its frames are queued for the client.
    fn take(&mut self, notice: Result<Notice, broadcast::error::RecvError>) {
        let bookmarks = self.bookmarks;
        if notice.is_ok() {
            self.position += 1;
        }
        match notice {
            Ok(Notice::Event(event)) => {
                self.seen = self.seen.max(event.resource_version);
                if event.resource_version > self.started_at {
                    self.queued.extend(frame_for(&self.plan, &self.frames, &event));
                }
            }
            Ok(Notice::Progress(rv)) => self.seen = self.seen.max(rv),
            Ok(Notice::Relisted {
                events,
                resource_version,
            }) => {
                for event in events.iter().filter(|e| e.resource_version > self.started_at) {
                    self.queued.extend(frame_for(&self.plan, &self.frames, event));
                }
                self.seen = self.seen.max(resource_version);
                if bookmarks && resource_version > self.started_at {
                    self.queued
                        .push_back(self.frames.bookmark(&self.store, resource_version));
                }
            }
            // kache restarts: a last bookmark at the saved version
            // (everything up to it was taken), where the client resumes
            // inside the next run's window.
            Ok(Notice::Closing) => {
                if bookmarks {
                    let at = self.seen.max(self.started_at);
                    self.queued.push_back(self.frames.bookmark(&self.store, at));
                }
                self.ending = true;
            }
            // Stopped store, or this watcher fell too far behind: the watch
            // ends; the client resumes or relists.
            Ok(Notice::End)
            | Err(broadcast::error::RecvError::Lagged(_) | broadcast::error::RecvError::Closed) => {
                self.ending = true;
            }
        }
    }

    /// A bookmark, if one fell due and the store moved past the watch's
    /// version. Asked only once everything taken is queued for the client:
    /// a bookmark never runs ahead of the events up to its version.
    fn bookmark(&mut self) -> Option<Bytes> {
        if !std::mem::take(&mut self.bookmark_due) {
            return None;
        }
        (self.seen > self.started_at).then(|| self.frames.bookmark(&self.store, self.seen))
    }
}

/// A watcher's receiver of the store's notices, polled by its body.
struct Feed(tokio_util::sync::ReusableBoxFuture<'static, Received>);

type Received = (
    Result<Notice, broadcast::error::RecvError>,
    broadcast::Receiver<Notice>,
);

impl Feed {
    fn new(receiver: broadcast::Receiver<Notice>) -> Feed {
        Feed(tokio_util::sync::ReusableBoxFuture::new(Feed::recv(receiver)))
    }

    async fn recv(mut receiver: broadcast::Receiver<Notice>) -> Received {
        let notice = receiver.recv().await;
        (notice, receiver)
    }

    /// The next notice; the receiver waits for the one after it in the
    /// same allocation.
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Notice, broadcast::error::RecvError>> {
        let (notice, receiver) = ready!(self.0.poll(cx));
        self.0.set(Feed::recv(receiver));
        Poll::Ready(notice)
    }
}

/// A watch's `200` answer: its stream of frames.
fn watch_response(stream: ChunkStream, encoding: Encoding) -> Response<ChunkStream> {
    let mut response = Response::new(stream);
    let content_type = match encoding {
        Encoding::Json => "application/json",
        Encoding::Protobuf => crate::protobuf::WATCH_CONTENT_TYPE,
    };
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, private"),
    );
    response
}

/// A watch that fails once started, as the cacher's `newErrWatcher`: `200`,
/// one ERROR event carrying the Status, then the end of the stream.
fn error_watch(status: &crate::status::Status<'_>, encoding: Encoding) -> Response<ChunkStream> {
    let frame = match encoding {
        Encoding::Json => {
            let mut object = status.to_json();
            if object.last() == Some(&b'\n') {
                object.pop();
            }
            json_event_frame("ERROR", &object)
        }
        Encoding::Protobuf => {
            let body = status.to_protobuf();
            let raw = crate::protobuf::unwrap(&body)
                .map(|unknown| unknown.raw)
                .unwrap_or_default();
            crate::protobuf::watch_frame("ERROR", "v1", "Status", raw)
        }
    };
    let mut response = watch_response(
        Box::pin(futures::stream::iter([Ok(Chunk::from(frame))])),
        encoding,
    );
    let events = Events::default();
    events.add(1);
    response.extensions_mut().insert(events);
    response
}

/// The annotation that marks the BOOKMARK ending a streaming list's initial
/// events (`metav1.InitialEventsAnnotationKey`).
pub const INITIAL_EVENTS_END: &str = "k8s.io/initial-events-end";

/// Readies a watch with `sendInitialEvents` for [`watch`]: the version its
/// state must be at least as fresh as, as the cacher's `Watch` settles it
/// (`getWatchCacheResourceVersion`, `waitUntilWatchCacheFreshAndForceAllEvents`).
/// Other watches pass through untouched.
///
/// - Without a version, the read is a consistent one: at least the API
///   server's current version, which kache asks it for (a LIST with
///   `limit=1` and no version: one object read from etcd, and etcd's
///   revision). A `sendInitialEvents=false` watch then follows the changes
///   after it, at once. A streaming list waits, at most `fresh_timeout`, for
///   the store to reach it. That revision is etcd's, shared by every
///   resource, and a v1.20 API server moves a resource's version only with
///   its own changes (no progress notifications): the store of a resource
///   nobody changes lags it for good. So when the wait is over, a store
///   still in sync with the API server is taken as it is — its watch had
///   `fresh_timeout` to deliver any change made before the request — and
///   the state is sent at the store's version.
/// - At `N`, a streaming list waits, at most `fresh_timeout`, for the store
///   to reach `N`; a `sendInitialEvents=false` watch starts at once.
/// - At `0`, neither waits.
///
/// # Errors
/// The watch's answer when it cannot start, the cacher's own: `200` and one
/// ERROR event — `504 Timeout` `Too large resource version` (retry after
/// 1 s; client-go then starts over without a version) when the store did not
/// become fresh enough, `500` when the API server could not be asked its
/// version.
pub async fn prepare_watch(
    mut plan: ReadPlan,
    spec: &ResourceSpec,
    store: &Store,
    encoding: Encoding,
    client: &dyn crate::upstream::ApiClient,
    fresh_timeout: Duration,
) -> Result<ReadPlan, Response<ChunkStream>> {
    let initial_events = match plan.kind {
        ReadKind::Watch { initial_events, .. } => initial_events,
        _ => return Ok(plan),
    };
    let required = match (initial_events, plan.version) {
        (InitialEvents::Legacy, _) | (_, MinVersion::Any) => return Ok(plan),
        (InitialEvents::Nothing, MinVersion::AtLeast(_)) => return Ok(plan),
        (_, MinVersion::AtLeast(rv)) => rv,
        (_, MinVersion::Latest) => match store
            .latest_version(|| current_resource_version(client, spec))
            .await
        {
            Ok(rv) => rv,
            Err(message) => {
                let status = crate::status::Status::failure(StatusCode::INTERNAL_SERVER_ERROR, &message);
                return Err(error_watch(&status, encoding));
            }
        },
    };
    if initial_events == InitialEvents::Nothing {
        plan.version = MinVersion::AtLeast(required);
        return Ok(plan);
    }
    let consistent = plan.version == MinVersion::Latest;
    if store.wait_for(required, fresh_timeout).await || (consistent && store.is_synced()) {
        return Ok(plan);
    }
    // `storage.NewTooLargeResourceVersionError`: its cause is what
    // client-go's reflector looks for (`IsTooLargeResourceVersion`).
    let message = format!(
        "Timeout: Too large resource version: {required}, current: {}",
        store.resource_version()
    );
    let causes = [crate::status::Cause {
        reason: "ResourceVersionTooLarge",
        message: "Too large resource version".into(),
        field: "",
    }];
    let status = crate::status::Status::failure(StatusCode::GATEWAY_TIMEOUT, &message).with_details(
        crate::status::Details {
            causes: &causes,
            retry_after_seconds: Some(1),
            ..crate::status::Details::default()
        },
    );
    Err(error_watch(&status, encoding))
}

/// The API server's current resourceVersion, from a LIST of the resource
/// with `limit=1` and no version (served from etcd: its revision).
///
/// # Errors
/// What went wrong, for the ERROR event's message.
pub async fn current_resource_version(
    client: &dyn crate::upstream::ApiClient,
    spec: &ResourceSpec,
) -> Result<u64, String> {
    #[derive(serde::Deserialize)]
    struct List {
        metadata: ListMeta,
    }
    #[derive(serde::Deserialize)]
    struct ListMeta {
        #[serde(default, rename = "resourceVersion")]
        resource_version: String,
    }
    let failed = |why: String| {
        format!(
            "unable to get the current resource version of {}: {why}",
            spec.qualified_resource()
        )
    };
    let request = http::Request::get(format!("{}?limit=1", spec.collection_path()))
        .header(header::ACCEPT, CURRENT_VERSION_ACCEPT)
        .body(())
        .map_err(|e| failed(e.to_string()))?;
    let response = client.fetch(request).await.map_err(|e| failed(e.0))?;
    if response.status() != StatusCode::OK {
        return Err(failed(format!("the API server answered {}", response.status())));
    }
    let list: List = serde_json::from_slice(response.body()).map_err(|e| failed(e.to_string()))?;
    parse_resource_version(&list.metadata.resource_version).ok_or_else(|| {
        failed(format!(
            "no resourceVersion in {:?}",
            list.metadata.resource_version
        ))
    })
}

/// The answer [`current_resource_version`] asks for: the one object's
/// metadata alone where the API server can.
const CURRENT_VERSION_ACCEPT: &str =
    "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,application/json";

/// When a watcher's next bookmark is due, from `now`: after `interval`, or
/// 2 s before the `deadline` if that is sooner; `None` once that is past
/// (`cacheWatcher.nextBookmarkTime`).
fn next_bookmark_at(now: Instant, interval: Duration, deadline: Instant) -> Option<Instant> {
    let before_deadline = deadline.checked_sub(BOOKMARK_BEFORE_DEADLINE)?;
    let at = now
        .checked_add(interval)
        .map_or(before_deadline, |at| at.min(before_deadline));
    (at >= now).then_some(at)
}

/// An instant no watch outlives (a `timeoutSeconds` too large to add).
fn far_future(now: Instant) -> Instant {
    now + Duration::from_secs(86_400 * 365 * 30)
}

/// `base × (1 + r)` for a pseudo-random `r` in `[0, 1)`, as the handler's
/// `minRequestTimeout × (rand.Float64() + 1.0)`: watches opened together do
/// not all end (and come back) together.
fn jittered(base: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    base + base.mul_f64(f64::from(nanos) / 1e9)
}

/// The frame a watcher gets for an event, if any, with the API server's
/// selector transitions: an object that starts matching is ADDED, one that
/// stops matching is DELETED (its previous state at the event's version).
/// A DELETED's object is sent at the event's version (a relist's DELETED
/// carries the last known object, see [`crate::store`]).
fn in_scope(plan: &ReadPlan, object: &Object) -> bool {
    plan.namespace.is_empty() || object.namespace == plan.namespace
}

fn frame_for(plan: &ReadPlan, frames: &Frames, event: &Event) -> Option<Bytes> {
    if !in_scope(plan, &event.object) {
        return None;
    }
    let now = event.kind != EventType::Deleted && matches(plan, &event.object);
    let before = event.prev.as_deref().is_some_and(|prev| matches(plan, prev));
    match (event.kind, now, before) {
        (EventType::Deleted, _, _) => {
            let passes = event
                .prev
                .as_deref()
                .map_or_else(|| matches(plan, &event.object), |prev| matches(plan, prev));
            if !passes {
                return None;
            }
            Some(event.frames.get_or_render(FrameKind::Deleted, || {
                if event.object.resource_version == event.resource_version {
                    frames.event("DELETED", event.object.bytes())
                } else {
                    let object = frames.with_resource_version(event.object.bytes(), event.resource_version);
                    frames.event("DELETED", &object)
                }
            }))
        }
        (_, true, false) => Some(
            event
                .frames
                .get_or_render(FrameKind::Added, || frames.event("ADDED", event.object.bytes())),
        ),
        (_, true, true) => Some(event.frames.get_or_render(FrameKind::Modified, || {
            frames.event("MODIFIED", event.object.bytes())
        })),
        (_, false, true) => {
            let prev = event.prev.as_deref()?;
            Some(event.frames.get_or_render(FrameKind::Left, || {
                frames.event(
                    "DELETED",
                    &frames.with_resource_version(prev.bytes(), event.resource_version),
                )
            }))
        }
        (_, false, false) => None,
    }
}

/// How one watch writes its events: JSON lines, or length-prefixed protobuf
/// `WatchEvent`s whose objects are wrapped in an envelope of the type.
struct Frames {
    encoding: Encoding,
    api_version: String,
    kind: String,
}

impl Frames {
    /// An ADDED frame for `object` in three parts: a head, the object's
    /// stored bytes (shared, not copied) and a tail.
    fn added(&self, object: &Object) -> [Bytes; 3] {
        let bytes = object.bytes().clone();
        match self.encoding {
            Encoding::Json => [
                Bytes::from_static(b"{\"type\":\"ADDED\",\"object\":"),
                bytes,
                Bytes::from_static(b"}\n"),
            ],
            Encoding::Protobuf => [
                Bytes::from(crate::protobuf::watch_frame_head(
                    "ADDED",
                    &self.api_version,
                    &self.kind,
                    bytes.len(),
                )),
                bytes,
                Bytes::from_static(crate::protobuf::ENVELOPE_END),
            ],
        }
    }

    fn event(&self, kind: &str, object: &[u8]) -> Bytes {
        match self.encoding {
            Encoding::Json => json_event_frame(kind, object),
            Encoding::Protobuf => crate::protobuf::watch_frame(kind, &self.api_version, &self.kind, object),
        }
    }

    fn with_resource_version(&self, object: &[u8], resource_version: u64) -> Bytes {
        match self.encoding {
            Encoding::Json => json_with_resource_version(object, resource_version),
            Encoding::Protobuf => crate::protobuf::with_resource_version(object, resource_version),
        }
    }

    /// A BOOKMARK at `resource_version`: an empty object of the type with
    /// only its version set (protobuf: the API server's own empty object, as
    /// the store last saw one).
    fn bookmark(&self, store: &Store, resource_version: u64) -> Bytes {
        match self.encoding {
            Encoding::Json => {
                let object = serde_json::json!({
                    "kind": self.kind,
                    "apiVersion": self.api_version,
                    "metadata": {"resourceVersion": resource_version.to_string(), "creationTimestamp": null},
                });
                json_event_frame(
                    "BOOKMARK",
                    &serde_json::to_vec(&object).expect("invariant: a Value serializes"),
                )
            }
            Encoding::Protobuf => {
                let object = crate::protobuf::bookmark_object(store.bookmark().as_deref(), resource_version);
                self.event("BOOKMARK", &object)
            }
        }
    }
}

impl Frames {
    /// The BOOKMARK that ends a streaming list's initial events, at their
    /// state's version, annotated `k8s.io/initial-events-end: "true"` as the
    /// cacher's `AnnotateInitialEventsEndBookmark` marks it. JSON: the
    /// current API server's own bytes for an empty object of a type without
    /// spec (no `creationTimestamp`: it is `omitzero` there); protobuf: the
    /// periodic bookmark's object with the annotation added.
    fn initial_events_end(&self, store: &Store, resource_version: u64) -> Bytes {
        match self.encoding {
            Encoding::Json => {
                let quoted = |s: &str| serde_json::to_string(s).expect("invariant: a string serializes");
                let object = format!(
                    r#"{{"kind":{},"apiVersion":{},"metadata":{{"resourceVersion":"{resource_version}","annotations":{{"{INITIAL_EVENTS_END}":"true"}}}}}}"#,
                    quoted(&self.kind),
                    quoted(&self.api_version),
                );
                json_event_frame("BOOKMARK", object.as_bytes())
            }
            Encoding::Protobuf => {
                let object = crate::protobuf::bookmark_object(store.bookmark().as_deref(), resource_version);
                let object = crate::protobuf::with_annotation(&object, INITIAL_EVENTS_END, "true");
                self.event("BOOKMARK", &object)
            }
        }
    }
}

fn json_event_frame(kind: &str, object: &[u8]) -> Bytes {
    let mut frame = Vec::with_capacity(object.len() + 32);
    frame.extend_from_slice(b"{\"type\":\"");
    frame.extend_from_slice(kind.as_bytes());
    frame.extend_from_slice(b"\",\"object\":");
    frame.extend_from_slice(object);
    frame.extend_from_slice(b"}\n");
    Bytes::from(frame)
}

fn json_with_resource_version(json: &[u8], resource_version: u64) -> Bytes {
    match serde_json::from_slice::<serde_json::Value>(json) {
        Ok(mut value) => {
            value["metadata"]["resourceVersion"] = serde_json::Value::from(resource_version.to_string());
            Bytes::from(serde_json::to_vec(&value).expect("invariant: a Value serializes"))
        }
        Err(_) => Bytes::copy_from_slice(json),
    }
}

#[cfg(test)]
mod tests;
