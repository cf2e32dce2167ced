//! An in-process copy of kube-apiserver's RBAC authorizer (v1.20 semantics),
//! fed by watches of the four RBAC resources, so answers from memory can be
//! authorized without asking the API server.
//!
//! ```text
//!   LIST + WATCH roles, clusterroles, rolebindings, clusterrolebindings
//!        │ every change or relist: generation += 1, memo cleared
//!        ▼
//!   Objects ──► rules_for(user name, sorted groups) ──► UserRules { cluster-wide, per namespace }
//!                      (memoized per identity, tagged with the generation)
//!                                                            │
//!   allows(user, attributes) = system:masters ∨ some rule allows ◄─┘
//! ```
//!
//! The evaluation is a port of `plugin/pkg/auth/authorizer/rbac/rbac.go`,
//! `pkg/registry/rbac/validation/rule.go` (`VisitRulesFor`, `appliesTo`) and
//! `pkg/apis/rbac/v1/evaluation_helpers.go`. It must never allow what the API
//! server would deny: objects it cannot read contribute nothing, and nothing
//! is allowed (except to `system:masters`) while a resource is out of sync.
//! Aggregated ClusterRoles are used with the rules stored in them, as the API
//! server does; the aggregation itself is the controller manager's job.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use http::{header, Request, StatusCode};
use serde::Deserialize;

use crate::request::{RequestInfo, Verb};
use crate::selector::field::FieldSelector;
use crate::upstream::{ApiClient, FetchError};

/// The group whose members the API server allows everything, before RBAC is
/// consulted (its privileged-groups authorizer).
pub const SYSTEM_MASTERS: &str = "system:masters";

/// At most this many identities' rules are memoized; the memo is cleared
/// wholesale when full (a cluster rarely has this many active identities).
const MEMO_CAPACITY: usize = 10_000;

/// The API path of the RBAC resources.
const RBAC_PATH: &str = "/apis/rbac.authorization.k8s.io/v1";

/// Backoff between failed attempts: doubled each time, up to the cap, jittered.
const MIN_BACKOFF: Duration = Duration::from_millis(200);
/// Short enough that a lost RBAC watch (during which local RBAC denies
/// everything and the proxy asks the API server) heals quickly.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Each WATCH lasts this long plus up to as much again (client-go picks 5–10
/// minutes too), so the four watches do not renew in lockstep.
const WATCH_TIMEOUT: Duration = Duration::from_secs(300);

/// Who is asking, as the API server's user.Info.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct UserInfo {
    pub name: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

/// What is asked, as the API server's authorizer.Attributes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Attributes {
    pub verb: String,
    pub resource_request: bool,
    /// Empty for the core group.
    pub group: String,
    pub version: String,
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
    /// Non-resource requests only: the request's path, percent-decoded (Go's `URL.Path`).
    pub path: String,
}

impl Attributes {
    /// The attributes the API server builds for a request
    /// (`GetAuthorizerAttributes`): `info` as [`RequestInfo::parse`] classified
    /// it, `raw_path` the request's path as received (still percent-encoded).
    ///
    /// A LIST or WATCH whose field selector pins `metadata.name` names that
    /// object, as `requestinfo.go` does, so `resourceNames` rules apply.
    pub fn from_request(info: &RequestInfo, raw_path: &str) -> Attributes {
        let mut name = info.name.clone();
        if matches!(info.verb(), Verb::List | Verb::Watch) && name.is_empty() {
            let pinned = info
                .read
                .field_selector
                .as_deref()
                .and_then(|selector| FieldSelector::parse(selector).ok())
                .and_then(|selector| selector.requires_exact_match("metadata.name").map(str::to_string));
            // apimachinery's `path.IsValidPathSegmentName`.
            if let Some(pinned) =
                pinned.filter(|n| !matches!(n.as_str(), "." | "..") && !n.contains(['/', '%']))
            {
                name = pinned;
            }
        }
        Attributes {
            verb: info.verb().as_str().to_string(),
            resource_request: info.is_resource_request,
            group: info.group.clone(),
            version: info.version.clone(),
            resource: info.resource.clone(),
            subresource: info.subresource.clone(),
            namespace: info.namespace.clone(),
            name,
            path: percent_encoding::percent_decode_str(raw_path)
                .decode_utf8_lossy()
                .into_owned(),
        }
    }
}

/// Why an RBAC object or watch event could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RbacError {
    #[error("not an RBAC kind: {0:?}")]
    UnknownKind(String),
    #[error("unknown watch event type {0:?}")]
    UnknownEventType(String),
    #[error("undecodable {kind}: {message}")]
    Undecodable { kind: &'static str, message: String },
}

/// The RBAC objects of a cluster, kept current by watches, and the evaluator over them.
///
/// A cheap `Clone` handle: clones share the objects, the memo and the
/// generation.
#[derive(Clone)]
pub struct Rbac {
    inner: Arc<Inner>,
}

struct Inner {
    /// `None` for [`Rbac::from_objects`]: nothing to watch.
    client: Option<Arc<dyn ApiClient>>,
    objects: RwLock<Objects>,
    /// Bumped, under the `objects` write lock, after every change to them.
    generation: AtomicU64,
    /// Per [`Kind`]: listed, and not lost since.
    synced: [AtomicBool; 4],
    memo: RwLock<Memo>,
    /// Keys the identity hashes of the memo.
    hasher: RandomState,
}

impl std::fmt::Debug for Rbac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rbac")
            .field("generation", &self.generation())
            .field("synced", &self.is_synced())
            .finish_non_exhaustive()
    }
}

impl Rbac {
    /// An empty, unsynced RBAC view; [`Rbac::run`] fills it through `client`.
    pub fn new(client: Arc<dyn ApiClient>) -> Rbac {
        Rbac::with_client(Some(client))
    }

    fn with_client(client: Option<Arc<dyn ApiClient>>) -> Rbac {
        Rbac {
            inner: Arc::new(Inner {
                client,
                objects: RwLock::new(Objects::default()),
                generation: AtomicU64::new(0),
                synced: Default::default(),
                memo: RwLock::new(Memo::default()),
                hasher: RandomState::new(),
            }),
        }
    }

    /// A `Rbac` holding `objects` (Role, ClusterRole, RoleBinding and
    /// ClusterRoleBinding JSON as the API server returns them, `kind` set),
    /// marked synced, with no watches. Objects of other kinds, or unreadable
    /// ones, are left out (logged).
    pub fn from_objects(objects: impl IntoIterator<Item = serde_json::Value>) -> Rbac {
        let rbac = Rbac::with_client(None);
        for object in objects {
            rbac.apply("ADDED", object);
        }
        for synced in &rbac.inner.synced {
            synced.store(true, Ordering::Release);
        }
        rbac
    }

    /// Lists then watches Roles, ClusterRoles, RoleBindings and
    /// ClusterRoleBindings forever: watches resume from the last
    /// resourceVersion, a 410 Gone (status or ERROR event) relists, failures
    /// retry with jittered exponential backoff (capped at 5 s). Never returns
    /// (a `Rbac` from [`Rbac::from_objects`] has nothing to watch and just
    /// waits); drop the future to stop.
    pub async fn run(self) {
        let Some(client) = self.inner.client.clone() else {
            return std::future::pending().await;
        };
        let reflectors = Kind::ALL.map(|kind| reflect(self.clone(), client.clone(), kind));
        futures::future::join_all(reflectors).await;
    }

    /// Whether all four resources have completed their initial list and not
    /// lost sync since (a watch that failed, until it is re-established; a
    /// watch that expired, until the relist).
    pub fn is_synced(&self) -> bool {
        self.inner.synced.iter().all(|s| s.load(Ordering::Acquire))
    }

    /// Bumped on every change to any RBAC object and on every relist: a
    /// decision computed at generation `g` is valid while `generation() == g`.
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    /// Whether RBAC, or membership of `system:masters`, allows the request,
    /// as kube-apiserver v1.20 would decide with the objects seen so far.
    ///
    /// `false` while not synced, except for `system:masters`, whom the API
    /// server allows whatever RBAC says. Cheap once the identity's rules are
    /// memoized (until the next change of any RBAC object).
    pub fn allows(&self, user: &UserInfo, attributes: &Attributes) -> bool {
        if user.groups.iter().any(|g| g == SYSTEM_MASTERS) {
            return true;
        }
        if !self.is_synced() {
            return false;
        }
        let mut groups: Vec<&str> = user.groups.iter().map(String::as_str).collect();
        groups.sort_unstable();
        groups.dedup();
        let hash = self
            .inner
            .hasher
            .hash_one((user.name.as_str(), groups.as_slice()));
        let generation = self.generation();
        {
            let memo = self
                .inner
                .memo
                .read()
                .expect("invariant: the RBAC memo lock is never poisoned");
            if memo.generation == generation {
                if let Some(rules) = memo.entries.get(&hash).filter(|r| r.is_for(&user.name, &groups)) {
                    return rules.allows(attributes);
                }
            }
        }
        let (rules, generation) = {
            let objects = self
                .inner
                .objects
                .read()
                .expect("invariant: the RBAC objects lock is never poisoned");
            // Read under the lock: writers bump it while holding the write lock.
            let generation = self.generation();
            (Arc::new(objects.rules_for(&user.name, &groups)), generation)
        };
        let allowed = rules.allows(attributes);
        let mut memo = self
            .inner
            .memo
            .write()
            .expect("invariant: the RBAC memo lock is never poisoned");
        if memo.generation < generation {
            memo.reset(generation);
        }
        if memo.generation == generation {
            if memo.entries.len() >= MEMO_CAPACITY {
                memo.entries.clear();
            }
            memo.entries.insert(hash, rules);
        }
        allowed
    }

    /// Applies one watch event: `event_type` ADDED, MODIFIED or DELETED,
    /// `object` a Role, ClusterRole, RoleBinding or ClusterRoleBinding with
    /// its `kind`. Anything else is ignored (logged); an unreadable object is
    /// removed, so it grants nothing.
    pub fn apply(&self, event_type: &str, object: serde_json::Value) {
        let kind = object["kind"].as_str().unwrap_or_default();
        let result = match Kind::from_kind(kind) {
            Some(kind) => self.apply_event(kind, event_type, object),
            None => Err(RbacError::UnknownKind(kind.to_string())),
        };
        if let Err(error) = result {
            tracing::warn!(%error, event_type, "RBAC event ignored");
        }
    }

    /// Applies one event to `kind`'s objects (the object's own `kind` is not
    /// consulted: list items and some events come without it).
    ///
    /// # Errors
    /// An unknown event type, or an object that cannot be read; an unreadable
    /// object is removed (if it has a name) before the error is returned.
    fn apply_event(&self, kind: Kind, event_type: &str, object: serde_json::Value) -> Result<(), RbacError> {
        let delete = match event_type {
            "ADDED" | "MODIFIED" => false,
            "DELETED" => true,
            other => return Err(RbacError::UnknownEventType(other.to_string())),
        };
        let key = ObjectKey::of(&object);
        let parsed = if delete {
            Ok(None)
        } else {
            Parsed::from_json(kind, object).map(Some)
        };
        let mut objects = self.write();
        let result = match parsed {
            Ok(Some(parsed)) => {
                objects.insert(key, parsed);
                Ok(())
            }
            Ok(None) => {
                objects.remove(kind, &key);
                Ok(())
            }
            Err(error) => {
                objects.remove(kind, &key);
                Err(error)
            }
        };
        self.changed(objects);
        result
    }

    /// Replaces all of `kind`'s objects (a relist).
    fn replace(&self, kind: Kind, items: Vec<(ObjectKey, Parsed)>) {
        let mut objects = self.write();
        objects.clear(kind);
        for (key, parsed) in items {
            objects.insert(key, parsed);
        }
        self.changed(objects);
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Objects> {
        self.inner
            .objects
            .write()
            .expect("invariant: the RBAC objects lock is never poisoned")
    }

    /// Bumps the generation while the writer still holds the objects, then
    /// drops the memo.
    fn changed(&self, objects: std::sync::RwLockWriteGuard<'_, Objects>) {
        let generation = self.inner.generation.fetch_add(1, Ordering::AcqRel) + 1;
        drop(objects);
        let mut memo = self
            .inner
            .memo
            .write()
            .expect("invariant: the RBAC memo lock is never poisoned");
        if memo.generation < generation {
            memo.reset(generation);
        }
    }

    fn set_synced(&self, kind: Kind, synced: bool) {
        self.inner.synced[kind as usize].store(synced, Ordering::Release);
    }
}

/// The memoized rules of identities, all computed at `generation`.
#[derive(Default)]
struct Memo {
    generation: u64,
    /// Keyed by the hash of (name, sorted groups); the entry says whose it is.
    entries: HashMap<u64, Arc<UserRules>>,
}

impl Memo {
    fn reset(&mut self, generation: u64) {
        self.generation = generation;
        self.entries.clear();
    }
}

/// The rules that apply to one identity: the flattened result of
/// `VisitRulesFor`, cluster-wide and per namespace.
#[derive(Debug, Default)]
struct UserRules {
    name: String,
    /// Sorted, without duplicates.
    groups: Vec<String>,
    /// From ClusterRoleBindings: apply to every request.
    cluster: Vec<Arc<[Rule]>>,
    /// From RoleBindings: apply to requests in that namespace.
    namespaced: HashMap<String, Vec<Arc<[Rule]>>>,
}

impl UserRules {
    fn is_for(&self, name: &str, groups: &[&str]) -> bool {
        self.name == name
            && self.groups.len() == groups.len()
            && self.groups.iter().zip(groups).all(|(a, b)| a == b)
    }

    /// `RBACAuthorizer.Authorize`: some visited rule allows the request.
    /// RoleBindings are visited only for requests with a namespace.
    fn allows(&self, attributes: &Attributes) -> bool {
        let any = |roles: &[Arc<[Rule]>]| {
            roles
                .iter()
                .any(|rules| rules.iter().any(|r| r.allows(attributes)))
        };
        any(&self.cluster)
            || (!attributes.namespace.is_empty()
                && self
                    .namespaced
                    .get(&attributes.namespace)
                    .is_some_and(|roles| any(roles)))
    }
}

/// The four RBAC resources, each with its own reflector and sync flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Role = 0,
    ClusterRole = 1,
    RoleBinding = 2,
    ClusterRoleBinding = 3,
}

impl Kind {
    const ALL: [Kind; 4] = [
        Kind::Role,
        Kind::ClusterRole,
        Kind::RoleBinding,
        Kind::ClusterRoleBinding,
    ];

    fn from_kind(kind: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.kind() == kind)
    }

    fn kind(self) -> &'static str {
        match self {
            Kind::Role => "Role",
            Kind::ClusterRole => "ClusterRole",
            Kind::RoleBinding => "RoleBinding",
            Kind::ClusterRoleBinding => "ClusterRoleBinding",
        }
    }

    fn resource(self) -> &'static str {
        match self {
            Kind::Role => "roles",
            Kind::ClusterRole => "clusterroles",
            Kind::RoleBinding => "rolebindings",
            Kind::ClusterRoleBinding => "clusterrolebindings",
        }
    }

    fn collection_path(self) -> String {
        format!("{RBAC_PATH}/{}", self.resource())
    }
}

/// `rbacv1.PolicyRule`, as evaluated.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Rule {
    #[serde(default, deserialize_with = "null_as_empty")]
    verbs: Vec<String>,
    #[serde(default, deserialize_with = "null_as_empty")]
    api_groups: Vec<String>,
    #[serde(default, deserialize_with = "null_as_empty")]
    resources: Vec<String>,
    #[serde(default, deserialize_with = "null_as_empty")]
    resource_names: Vec<String>,
    #[serde(default, rename = "nonResourceURLs", deserialize_with = "null_as_empty")]
    non_resource_urls: Vec<String>,
}

impl Rule {
    /// `RuleAllows`.
    fn allows(&self, attributes: &Attributes) -> bool {
        if attributes.resource_request {
            self.verb_matches(&attributes.verb)
                && self.api_group_matches(&attributes.group)
                && self.resource_matches(&attributes.resource, &attributes.subresource)
                && self.resource_name_matches(&attributes.name)
        } else {
            self.verb_matches(&attributes.verb) && self.non_resource_url_matches(&attributes.path)
        }
    }

    fn verb_matches(&self, verb: &str) -> bool {
        self.verbs.iter().any(|v| v == "*" || v == verb)
    }

    fn api_group_matches(&self, group: &str) -> bool {
        self.api_groups.iter().any(|g| g == "*" || g == group)
    }

    /// `ResourceMatches`: `*`, the combined `resource[/subresource]`, or
    /// `*/subresource`.
    fn resource_matches(&self, resource: &str, subresource: &str) -> bool {
        self.resources.iter().any(|r| {
            if r == "*" {
                return true;
            }
            if subresource.is_empty() {
                return r == resource;
            }
            let combined = r.len() == resource.len() + 1 + subresource.len()
                && r.starts_with(resource)
                && r[resource.len()..].starts_with('/')
                && r.ends_with(subresource);
            let any_resource =
                r.len() == subresource.len() + 2 && r.starts_with("*/") && r.ends_with(subresource);
            combined || any_resource
        })
    }

    fn resource_name_matches(&self, name: &str) -> bool {
        self.resource_names.is_empty() || self.resource_names.iter().any(|n| n == name)
    }

    /// `NonResourceURLMatches`: `*`, the path, or a prefix ending in `*` (Go's
    /// `strings.TrimRight(ruleURL, "*")`: all trailing stars go).
    fn non_resource_url_matches(&self, path: &str) -> bool {
        self.non_resource_urls
            .iter()
            .any(|u| u == "*" || u == path || (u.ends_with('*') && path.starts_with(u.trim_end_matches('*'))))
    }
}

/// `rbacv1.Subject`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
struct Subject {
    #[serde(default)]
    kind: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: String,
}

impl Subject {
    /// `appliesToUser`; `namespace` is the binding's (empty for a
    /// ClusterRoleBinding), `groups` sorted.
    fn applies_to(&self, name: &str, groups: &[&str], namespace: &str) -> bool {
        match self.kind.as_str() {
            "User" => self.name == name,
            "Group" => groups.binary_search(&self.name.as_str()).is_ok(),
            "ServiceAccount" => {
                let sa_namespace = if self.namespace.is_empty() {
                    namespace
                } else {
                    &self.namespace
                };
                if sa_namespace.is_empty() {
                    return false;
                }
                // serviceaccount.MatchesUsername, without allocating.
                name.strip_prefix("system:serviceaccount:")
                    .and_then(|rest| rest.strip_prefix(sa_namespace))
                    .and_then(|rest| rest.strip_prefix(':'))
                    == Some(self.name.as_str())
            }
            _ => false,
        }
    }
}

/// `rbacv1.RoleRef`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
struct RoleRef {
    #[serde(default)]
    kind: String,
    #[serde(default)]
    name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Binding {
    role_ref: RoleRef,
    subjects: Vec<Subject>,
}

/// A namespace (empty for cluster-scoped objects) and name.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct ObjectKey {
    namespace: String,
    name: String,
}

impl ObjectKey {
    fn of(object: &serde_json::Value) -> ObjectKey {
        let metadata = &object["metadata"];
        ObjectKey {
            namespace: metadata["namespace"].as_str().unwrap_or_default().to_string(),
            name: metadata["name"].as_str().unwrap_or_default().to_string(),
        }
    }
}

/// One object, read.
#[derive(Debug, Clone)]
enum Parsed {
    Role(Arc<[Rule]>),
    ClusterRole(Arc<[Rule]>),
    RoleBinding(Binding),
    ClusterRoleBinding(Binding),
}

#[derive(Deserialize)]
struct RoleJson {
    #[serde(default, deserialize_with = "null_as_empty")]
    rules: Vec<Rule>,
}

#[derive(Deserialize)]
struct BindingJson {
    #[serde(rename = "roleRef")]
    role_ref: RoleRef,
    #[serde(default, deserialize_with = "null_as_empty")]
    subjects: Vec<Subject>,
}

impl Parsed {
    /// Reads an object of `kind`.
    ///
    /// # Errors
    /// It has no name, or its rules, role reference or subjects are malformed.
    fn from_json(kind: Kind, object: serde_json::Value) -> Result<Parsed, RbacError> {
        let undecodable = |message: String| RbacError::Undecodable {
            kind: kind.kind(),
            message,
        };
        if object["metadata"]["name"].as_str().is_none_or(str::is_empty) {
            return Err(undecodable("no metadata.name".into()));
        }
        match kind {
            Kind::Role | Kind::ClusterRole => {
                let role: RoleJson =
                    serde_json::from_value(object).map_err(|e| undecodable(e.to_string()))?;
                let rules: Arc<[Rule]> = role.rules.into();
                Ok(if kind == Kind::Role {
                    Parsed::Role(rules)
                } else {
                    Parsed::ClusterRole(rules)
                })
            }
            Kind::RoleBinding | Kind::ClusterRoleBinding => {
                let binding: BindingJson =
                    serde_json::from_value(object).map_err(|e| undecodable(e.to_string()))?;
                let binding = Binding {
                    role_ref: binding.role_ref,
                    subjects: binding.subjects,
                };
                Ok(if kind == Kind::RoleBinding {
                    Parsed::RoleBinding(binding)
                } else {
                    Parsed::ClusterRoleBinding(binding)
                })
            }
        }
    }
}

/// Go's nil slices arrive as `null` (an aggregated ClusterRole's `rules`).
fn null_as_empty<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(deserializer)?.unwrap_or_default())
}

/// The cluster's RBAC objects, as read.
#[derive(Debug, Default)]
struct Objects {
    /// namespace → name → rules.
    roles: HashMap<String, HashMap<String, Arc<[Rule]>>>,
    cluster_roles: HashMap<String, Arc<[Rule]>>,
    /// namespace → name → binding.
    role_bindings: HashMap<String, HashMap<String, Binding>>,
    cluster_role_bindings: HashMap<String, Binding>,
}

impl Objects {
    fn insert(&mut self, key: ObjectKey, parsed: Parsed) {
        match parsed {
            Parsed::Role(rules) => {
                self.roles
                    .entry(key.namespace)
                    .or_default()
                    .insert(key.name, rules);
            }
            Parsed::ClusterRole(rules) => {
                self.cluster_roles.insert(key.name, rules);
            }
            Parsed::RoleBinding(binding) => {
                self.role_bindings
                    .entry(key.namespace)
                    .or_default()
                    .insert(key.name, binding);
            }
            Parsed::ClusterRoleBinding(binding) => {
                self.cluster_role_bindings.insert(key.name, binding);
            }
        }
    }

    fn remove(&mut self, kind: Kind, key: &ObjectKey) {
        fn remove_namespaced<T>(map: &mut HashMap<String, HashMap<String, T>>, key: &ObjectKey) {
            if let Some(names) = map.get_mut(&key.namespace) {
                names.remove(&key.name);
                if names.is_empty() {
                    map.remove(&key.namespace);
                }
            }
        }
        match kind {
            Kind::Role => remove_namespaced(&mut self.roles, key),
            Kind::ClusterRole => {
                self.cluster_roles.remove(&key.name);
            }
            Kind::RoleBinding => remove_namespaced(&mut self.role_bindings, key),
            Kind::ClusterRoleBinding => {
                self.cluster_role_bindings.remove(&key.name);
            }
        }
    }

    fn clear(&mut self, kind: Kind) {
        match kind {
            Kind::Role => self.roles.clear(),
            Kind::ClusterRole => self.cluster_roles.clear(),
            Kind::RoleBinding => self.role_bindings.clear(),
            Kind::ClusterRoleBinding => self.cluster_role_bindings.clear(),
        }
    }

    /// `GetRoleReferenceRules`: a Role in the binding's namespace or a
    /// ClusterRole; nothing if missing.
    fn role_rules(&self, role_ref: &RoleRef, binding_namespace: &str) -> Option<&Arc<[Rule]>> {
        match role_ref.kind.as_str() {
            "Role" => self.roles.get(binding_namespace)?.get(&role_ref.name),
            "ClusterRole" => self.cluster_roles.get(&role_ref.name),
            _ => None,
        }
    }

    /// `VisitRulesFor` for every namespace at once: the rules of every
    /// ClusterRoleBinding, and of every RoleBinding, whose subjects include
    /// the identity. `groups` sorted, without duplicates.
    fn rules_for(&self, name: &str, groups: &[&str]) -> UserRules {
        fn push(roles: &mut Vec<Arc<[Rule]>>, rules: &Arc<[Rule]>) {
            if !rules.is_empty() && !roles.iter().any(|r| Arc::ptr_eq(r, rules)) {
                roles.push(rules.clone());
            }
        }
        let applies = |binding: &Binding, namespace: &str| {
            binding
                .subjects
                .iter()
                .any(|s| s.applies_to(name, groups, namespace))
        };
        let mut user = UserRules {
            name: name.to_string(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            ..UserRules::default()
        };
        for binding in self.cluster_role_bindings.values() {
            // A ClusterRoleBinding can only grant a ClusterRole (a Role in
            // namespace "" does not exist).
            if binding.role_ref.kind == "ClusterRole" && applies(binding, "") {
                if let Some(rules) = self.role_rules(&binding.role_ref, "") {
                    push(&mut user.cluster, rules);
                }
            }
        }
        for (namespace, bindings) in &self.role_bindings {
            if namespace.is_empty() {
                continue;
            }
            for binding in bindings.values() {
                if applies(binding, namespace) {
                    if let Some(rules) = self.role_rules(&binding.role_ref, namespace) {
                        push(user.namespaced.entry(namespace.clone()).or_default(), rules);
                    }
                }
            }
        }
        user
    }
}

// ---------------------------------------------------------------------------
// The reflectors: LIST then WATCH each resource.

/// How one watch request ended.
#[derive(Debug)]
enum WatchEnd {
    /// The server ended it (its timeout): watch again from the last version.
    Renew,
    /// 410 Gone, or an event kache could not apply: relist.
    Relist(String),
    /// The request or the stream failed: retry from the last version.
    Failed(FetchError),
}

/// Keeps `kind`'s objects in `rbac` current, forever.
async fn reflect(rbac: Rbac, client: Arc<dyn ApiClient>, kind: Kind) {
    let resource = kind.resource();
    let mut backoff = Backoff::default();
    loop {
        let mut resource_version = match list(client.as_ref(), kind).await {
            Ok((items, resource_version)) => {
                tracing::debug!(resource, objects = items.len(), %resource_version, "RBAC listed");
                rbac.replace(kind, items);
                rbac.set_synced(kind, true);
                resource_version
            }
            Err(error) => {
                tracing::warn!(resource, %error, "RBAC list failed");
                rbac.set_synced(kind, false);
                tokio::time::sleep(backoff.next()).await;
                continue;
            }
        };
        loop {
            let (end, events) = watch(&rbac, client.as_ref(), kind, &mut resource_version).await;
            if events > 0 {
                backoff.reset();
            }
            match end {
                WatchEnd::Renew => {
                    tracing::debug!(resource, %resource_version, "RBAC watch ended; renewing");
                    if events == 0 {
                        // A watch that ends at once, again and again, must not spin.
                        tokio::time::sleep(backoff.next()).await;
                    }
                }
                WatchEnd::Relist(reason) => {
                    tracing::debug!(resource, %reason, "RBAC watch expired; relisting");
                    rbac.set_synced(kind, false);
                    if events == 0 {
                        tokio::time::sleep(backoff.next()).await;
                    }
                    break;
                }
                WatchEnd::Failed(error) => {
                    tracing::warn!(resource, %error, "RBAC watch failed; reconnecting");
                    rbac.set_synced(kind, false);
                    tokio::time::sleep(backoff.next()).await;
                }
            }
        }
    }
}

#[derive(Deserialize)]
struct ListJson {
    #[serde(default)]
    metadata: ListMeta,
    #[serde(default, deserialize_with = "null_as_empty")]
    items: Vec<serde_json::Value>,
}

#[derive(Deserialize, Default)]
struct ListMeta {
    #[serde(default, rename = "resourceVersion")]
    resource_version: String,
}

/// A consistent LIST of `kind` (read from etcd, so a relist never goes back
/// in time): the readable objects and the list's resourceVersion. Unreadable
/// items are left out (they would grant nothing).
async fn list(client: &dyn ApiClient, kind: Kind) -> Result<(Vec<(ObjectKey, Parsed)>, String), FetchError> {
    let path = kind.collection_path();
    let request = Request::get(&path)
        .header(header::ACCEPT, "application/json")
        .body(())
        .map_err(|e| FetchError(e.to_string()))?;
    let response = client.fetch(request).await?;
    if response.status() != StatusCode::OK {
        return Err(FetchError(format!("LIST {path} answered {}", response.status())));
    }
    let list: ListJson =
        serde_json::from_slice(response.body()).map_err(|e| FetchError(format!("LIST {path}: {e}")))?;
    if list.metadata.resource_version.is_empty() {
        return Err(FetchError(format!("LIST {path}: no resourceVersion")));
    }
    let mut items = Vec::with_capacity(list.items.len());
    for item in list.items {
        let key = ObjectKey::of(&item);
        match Parsed::from_json(kind, item) {
            Ok(parsed) => items.push((key, parsed)),
            Err(error) => {
                tracing::warn!(%error, namespace = %key.namespace, name = %key.name, "RBAC object left out")
            }
        }
    }
    Ok((items, list.metadata.resource_version))
}

#[derive(Deserialize)]
struct EventJson {
    #[serde(rename = "type")]
    event_type: String,
    #[serde(default)]
    object: serde_json::Value,
}

/// One WATCH from `resource_version`, applying events and advancing
/// `resource_version` as they come; how it ended, and how many events
/// (bookmarks included) it delivered.
async fn watch(
    rbac: &Rbac,
    client: &dyn ApiClient,
    kind: Kind,
    resource_version: &mut String,
) -> (WatchEnd, usize) {
    let path = kind.collection_path();
    let timeout = WATCH_TIMEOUT + WATCH_TIMEOUT.mul_f64(random_fraction());
    let uri = format!(
        "{path}?watch=true&resourceVersion={}&allowWatchBookmarks=true&timeoutSeconds={}",
        percent_encoding::utf8_percent_encode(resource_version, percent_encoding::NON_ALPHANUMERIC),
        timeout.as_secs()
    );
    let request = match Request::get(uri)
        .header(header::ACCEPT, "application/json")
        .body(())
    {
        Ok(request) => request,
        Err(e) => return (WatchEnd::Failed(FetchError(e.to_string())), 0),
    };
    let response = match client.stream(request).await {
        Ok(response) => response,
        Err(error) => return (WatchEnd::Failed(error), 0),
    };
    match response.status() {
        StatusCode::OK => rbac.set_synced(kind, true),
        StatusCode::GONE => return (WatchEnd::Relist("410 Gone".into()), 0),
        status => {
            return (
                WatchEnd::Failed(FetchError(format!("WATCH {path} answered {status}"))),
                0,
            )
        }
    }
    let mut body = response.into_body();
    let mut buffer: Vec<u8> = Vec::new();
    let mut events = 0;
    while let Some(chunk) = body.next().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(error) => return (WatchEnd::Failed(error), events),
        };
        buffer.extend_from_slice(&chunk);
        let mut consumed = 0;
        while let Some(end) = buffer[consumed..].iter().position(|b| *b == b'\n') {
            let line = &buffer[consumed..consumed + end];
            consumed += end + 1;
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            if let Some(end) = watch_event(rbac, kind, line, resource_version) {
                return (end, events);
            }
            events += 1;
        }
        buffer.drain(..consumed);
    }
    (WatchEnd::Renew, events)
}

/// Applies one watch event line; how the watch ends, if it does.
fn watch_event(rbac: &Rbac, kind: Kind, line: &[u8], resource_version: &mut String) -> Option<WatchEnd> {
    let event: EventJson = match serde_json::from_slice(line) {
        Ok(event) => event,
        Err(e) => return Some(WatchEnd::Relist(format!("undecodable watch event: {e}"))),
    };
    if event.event_type == "ERROR" {
        let status = &event.object;
        if status["code"].as_u64() == Some(410) {
            return Some(WatchEnd::Relist(format!("watch error: {}", status["message"])));
        }
        return Some(WatchEnd::Failed(FetchError(format!(
            "watch error: {}",
            status["message"]
        ))));
    }
    let new_version = event.object["metadata"]["resourceVersion"]
        .as_str()
        .map(str::to_string);
    if event.event_type != "BOOKMARK" {
        if let Err(error) = rbac.apply_event(kind, &event.event_type, event.object) {
            tracing::warn!(resource = kind.resource(), %error, "RBAC watch event unusable");
            // The object is gone from the view (it grants nothing), but the
            // view may now lack what the API server has: start afresh.
            return Some(WatchEnd::Relist(error.to_string()));
        }
    }
    if let Some(version) = new_version.filter(|v| !v.is_empty()) {
        *resource_version = version;
    }
    None
}

/// Jittered exponential backoff: the n-th consecutive failure waits between
/// half and all of `MIN_BACKOFF · 2ⁿ`, at most `MAX_BACKOFF`.
#[derive(Debug)]
struct Backoff {
    ceiling: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { ceiling: MIN_BACKOFF }
    }
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let delay = self.ceiling.mul_f64(0.5 + random_fraction() / 2.0);
        self.ceiling = (self.ceiling * 2).min(MAX_BACKOFF);
        delay
    }

    fn reset(&mut self) {
        self.ceiling = MIN_BACKOFF;
    }
}

/// A number in [0, 1), random enough for jitter (std's per-instance hash keys).
fn random_fraction() -> f64 {
    let bits = RandomState::new().hash_one(0u8) >> 11;
    bits as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests;
