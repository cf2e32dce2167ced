//! Reading an object's JSON for what the cache needs of it, and nothing
//! else: its name, namespace, resourceVersion, labels, type meta and the
//! fields its selectors can match. Everything else (a pod's containers,
//! volumes, env…) is skipped by the parser without being built, so caching
//! a resource allocates per object a handful of small values instead of a
//! tree of the whole object — the difference between the store's size and
//! the memory a sync churns through.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// Paths into an object, each a list of keys (an array index as digits).
/// A value at the end of a path is kept whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths(Vec<Vec<String>>);

impl Paths {
    pub fn new<I, P, S>(paths: I) -> Paths
    where
        I: IntoIterator<Item = P>,
        P: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Paths(
            paths
                .into_iter()
                .map(|p| p.into_iter().map(Into::into).collect())
                .collect(),
        )
    }

    /// What the store reads of every object, and the selectable fields of
    /// the resource (`selector::field_paths`), cached per resource.
    pub fn for_resource(group: &str, resource: &str, custom: bool) -> Arc<Paths> {
        type Cache = Mutex<HashMap<(String, String, bool), Arc<Paths>>>;
        static CACHE: OnceLock<Cache> = OnceLock::new();
        let cache = CACHE.get_or_init(Default::default);
        let key = (group.to_string(), resource.to_string(), custom);
        let mut cache = cache.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(cache.entry(key).or_insert_with(|| {
            let mut paths: Vec<Vec<String>> = [
                &["kind"][..],
                &["apiVersion"],
                &["metadata", "name"],
                &["metadata", "namespace"],
                &["metadata", "resourceVersion"],
                &["metadata", "labels"],
            ]
            .iter()
            .map(|p| p.iter().map(|s| (*s).to_string()).collect())
            .collect();
            if !custom {
                paths.extend(
                    crate::selector::field_paths(group, resource)
                        .into_iter()
                        .map(|p| p.into_iter().map(str::to_string).collect()),
                );
            }
            Arc::new(Paths(paths))
        }))
    }
}

/// Parses `json`, keeping only what lies on `paths` (missing parts are
/// simply absent, as in the full value).
///
/// # Errors
/// Not valid JSON.
pub fn parse(json: &[u8], paths: &Paths) -> Result<Value, serde_json::Error> {
    let all: Vec<&[String]> = paths.0.iter().map(Vec::as_slice).collect();
    let mut deserializer = serde_json::Deserializer::from_slice(json);
    let value = Pruned {
        paths: &all,
        depth: 0,
    }
    .deserialize(&mut deserializer)?;
    deserializer.end()?;
    Ok(value)
}

/// The paths (those that go on below this point) at `depth`.
struct Pruned<'p, 's> {
    paths: &'p [&'s [String]],
    depth: usize,
}

impl<'p, 's> Pruned<'p, 's> {
    /// The paths through `key`, and whether one ends there (keep it whole).
    fn through(&self, key: &str) -> (Vec<&'s [String]>, bool) {
        let mut through = Vec::new();
        let mut ends = false;
        for path in self.paths {
            if path.get(self.depth).is_some_and(|k| k == key) {
                if path.len() == self.depth + 1 {
                    ends = true;
                } else {
                    through.push(*path);
                }
            }
        }
        (through, ends)
    }
}

impl<'de> DeserializeSeed<'de> for Pruned<'_, '_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Pruned<'_, '_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            let (through, ends) = self.through(&key);
            if ends {
                out.insert(key.into_owned(), map.next_value::<Value>()?);
            } else if through.is_empty() {
                map.next_value::<IgnoredAny>()?;
            } else {
                let value = map.next_value_seed(Pruned {
                    paths: &through,
                    depth: self.depth + 1,
                })?;
                out.insert(key.into_owned(), value);
            }
        }
        Ok(Value::Object(out))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        let mut index = 0usize;
        loop {
            let (through, ends) = self.through(&index.to_string());
            let next = if ends {
                seq.next_element::<Value>()?
            } else if through.is_empty() {
                // Kept as a placeholder so later indices stay in place.
                seq.next_element::<IgnoredAny>()?.map(|_| Value::Null)
            } else {
                seq.next_element_seed(Pruned {
                    paths: &through,
                    depth: self.depth + 1,
                })?
            };
            match next {
                Some(value) => out.push(value),
                None => break,
            }
            index += 1;
        }
        // Skipped elements past the last wanted one are dropped.
        while out.last().is_some_and(Value::is_null) {
            out.pop();
        }
        Ok(Value::Array(out))
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_the_paths_are_kept_and_whole_at_their_ends() {
        let object = json!({
            "kind": "Pod", "apiVersion": "v1",
            "metadata": {"name": "p", "namespace": "n", "resourceVersion": "7",
                "labels": {"app": "web", "tier": "a"}, "annotations": {"big": "x"}},
            "spec": {"nodeName": "node-a", "containers": [{"name": "c", "image": "i"}]},
            "status": {"phase": "Running", "podIPs": [{"ip": "10.0.0.1"}, {"ip": "10.0.0.2"}]}
        });
        let paths = Paths::new([
            vec!["metadata", "name"],
            vec!["metadata", "labels"],
            vec!["spec", "nodeName"],
            vec!["status", "podIPs", "0", "ip"],
        ]);
        let pruned = parse(&serde_json::to_vec(&object).unwrap(), &paths).unwrap();
        assert_eq!(
            pruned,
            json!({
                "metadata": {"name": "p", "labels": {"app": "web", "tier": "a"}},
                "spec": {"nodeName": "node-a"},
                "status": {"podIPs": [{"ip": "10.0.0.1"}]}
            })
        );
    }

    #[test]
    fn invalid_json_is_an_error_even_in_skipped_parts() {
        let paths = Paths::new([vec!["metadata", "name"]]);
        assert!(parse(br#"{"metadata":{"name":"p"},"spec":{"x":}}"#, &paths).is_err());
        assert!(parse(br#"{"metadata":{"name":"p"}} trailing"#, &paths).is_err());
    }

    /// Every built-in resource's selectable fields read the same from the
    /// pruned value as from the whole object.
    #[test]
    fn field_values_read_the_same_from_the_pruned_object() {
        let object = json!({
            "kind": "X", "apiVersion": "v1",
            "metadata": {"name": "o", "namespace": "n", "resourceVersion": "3", "labels": {"a": "b"}},
            "spec": {"nodeName": "node-a", "serviceAccount": "legacy", "restartPolicy": "Always",
                "schedulerName": "default", "unschedulable": true, "type": "Opaque", "host": "h",
                "containers": [{"name": "c"}]},
            "status": {"phase": "Running", "podIPs": [{"ip": "10.0.0.9"}], "nominatedNodeName": "nn",
                "replicas": 3, "succeeded": 2},
            "type": "kubernetes.io/tls", "involvedObject": {"kind": "Pod", "name": "p", "namespace": "n",
                "uid": "u", "apiVersion": "v1", "resourceVersion": "1", "fieldPath": "f"},
            "reason": "r", "source": {"component": "c"}, "reportingComponent": "rc",
            "reportingController": "ctl", "regarding": {"kind": "Pod", "name": "p"}, "note": "x",
            "data": {"k": "v"}
        });
        let bytes = serde_json::to_vec(&object).unwrap();
        for (group, resource) in crate::selector::field_tables() {
            let pruned = parse(&bytes, &Paths::for_resource(group, resource, false)).unwrap();
            assert_eq!(
                crate::selector::field_values(group, resource, &pruned),
                crate::selector::field_values(group, resource, &object),
                "{group}/{resource}"
            );
        }
    }
}
