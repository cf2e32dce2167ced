//! kache's model of the Kubernetes API, independent of any HTTP server.
//!
//! ```text
//!   method + path + query ──► request::RequestInfo::parse ──► { verb, group, version,
//!                                                               resource, namespace, name,
//!                                                               subresource, read options }
//! ```
//!
//! The proxy's classify stage is a thin wrapper around [`RequestInfo::parse`];
//! keeping it here, pure and free of I/O, lets the cache key its stores by the
//! same vocabulary and lets the parser be tested and fuzzed on its own.

pub mod request;

pub use request::{ReadOptions, RequestInfo, Verb};
