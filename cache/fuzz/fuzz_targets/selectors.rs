//! Fuzzes the parsers that read client input: label and field selectors
//! (which must never panic, and whose printed form must re-parse to the same
//! selector) and the request classifier (input split at the first newline
//! into method and path, the path at the first `?` into path and query).

#![no_main]

use kache_cache::selector::{FieldSelector, LabelSelector};
use kache_cache::RequestInfo;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let input = String::from_utf8_lossy(data);

    if let Ok(selector) = LabelSelector::parse(&input) {
        let printed = selector.to_string();
        let again = LabelSelector::parse(&printed).expect("a printed label selector parses");
        assert_eq!(again, selector, "{printed:?}");
    }

    if let Ok(selector) = FieldSelector::parse(&input) {
        let printed = selector.to_string();
        let again = FieldSelector::parse(&printed).expect("a printed field selector parses");
        let sorted = |s: &FieldSelector| {
            let mut terms = s.requirements().to_vec();
            terms.sort_by(|a, b| (a.field(), a.value()).cmp(&(b.field(), b.value())));
            terms
        };
        assert_eq!(sorted(&again), sorted(&selector), "{printed:?}");
    }

    let (method, rest) = input.split_once('\n').unwrap_or(("GET", &input));
    let (path, query) = match rest.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (rest, None),
    };
    let _ = RequestInfo::parse(method, path, query);
});
