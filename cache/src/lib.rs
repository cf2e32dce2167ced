//! kache's model of the Kubernetes API and the caches that answer from it,
//! independent of any HTTP server.
//!
//! ```text
//!   method + path + query ──► request::RequestInfo::parse ──► { verb, group, version,
//!                                                               resource, namespace, name,
//!                                                               subresource, read options }
//!
//!   discovery::Discovery ◄── watches CRDs + APIServices ──┐
//!     answers /api, /apis, /openapi, /version             ├── upstream::ApiClient (the proxy's
//!     resources(group, version) → the catalogue           │   connection, or a fake in tests)
//!                                        fetches misses ──┘
//!
//!   resources::Cache ── one store + reflector per (resource, encoding) ──► reads::list / get / watch
//!     (JSON always; protobuf for built-ins read in protobuf: protobuf.rs frames the bytes)
//!        │ saves synced stores / restores them at start (WATCH from the saved version, no LIST)
//!        ▼
//!   snapshot ── one file per store, stamped with the cluster's identity and resourceVersion
//!
//!   rbac::Rbac ◄── watches Roles, ClusterRoles and their bindings ── allows(user, attributes)
//! ```
//!
//! The proxy's classify stage is a thin wrapper around [`RequestInfo::parse`];
//! keeping it here, pure and free of I/O, lets the cache key its stores by the
//! same vocabulary and lets the parser be tested and fuzzed on its own.

pub mod atom;
pub mod chunk;
pub mod discovery;
pub mod filed;
pub mod flight;
pub mod list;
pub mod list_stream;
pub mod protobuf;
pub mod prune;
pub mod rbac;
pub mod reads;
pub mod reflector;
pub mod request;
pub mod resources;
pub mod selector;
pub mod snapshot;
pub mod status;
pub mod store;
pub mod upstream;

pub use request::{ReadOptions, RequestInfo, Verb};
