//! Unfiltered lists sent again at the same version, once the store has
//! stood still for a second, go from a sealed memory file with `sendfile`
//! (kache_cache::filed): the answers are the same
//! bytes as the first one sent from the store, for JSON and protobuf; the
//! file is counted in the store's bytes, and let go of once no list has
//! used it for a while.

#![allow(clippy::unwrap_used)] // test helpers, not only #[test] fns (STYLE.md)

use std::collections::BTreeSet;
use std::time::Duration;

use kache_tests::{cluster, create_configmaps, metric, poll_until, raw, write_json, Kache, TestNamespace};
use serde_json::Value;

const CONFIGMAPS: usize = 120;
/// 120 × 4 KB: a list well over the size kache files (256 KB).
const DATA_BYTES: usize = 4 * 1024;
const LIST: &str = "/api/v1/configmaps?resourceVersion=0";
const PROTOBUF: &str = "application/vnd.kubernetes.protobuf";

/// The memory files kache holds for lists: their descriptors and sizes.
fn list_files(kache: &Kache) -> Vec<(String, u64)> {
    let dir = format!("/proc/{}/fd", kache.pid());
    std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            let target = std::fs::read_link(&path).ok()?;
            target
                .to_string_lossy()
                .starts_with("/memfd:kache-list")
                .then(|| {
                    std::fs::metadata(&path)
                        .ok()
                        .map(|m| (path.display().to_string(), m.len()))
                })
                .flatten()
        })
        .collect()
}

fn hits(kache: &Kache, encoding: &str) -> f64 {
    metric(
        &kache.metrics(),
        "kache_cache_hits_total",
        &[("resource", "v1/configmaps"), ("encoding", encoding)],
    )
}

/// The list in `accept`, once kache answers it from memory: that answer.
fn first_from_memory(kache: &Kache, accept: &str, encoding: &str) -> raw::Response {
    poll_until(Duration::from_secs(60), "a list answered from memory", || {
        let before = hits(kache, encoding);
        let response = raw::get_with(kache.addr(), LIST, &[("Accept", accept)]).unwrap();
        assert_eq!(response.status, 200, "{}", response.text());
        (hits(kache, encoding) > before).then_some(response)
    })
}

/// `namespace`'s items of a JSON list, as a set.
fn items_in(list: &Value, namespace: &str) -> BTreeSet<String> {
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|item| item["metadata"]["namespace"] == namespace)
        .map(Value::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_asked_again_go_from_a_file_with_the_same_bytes() {
    let c = cluster();
    let ns = TestNamespace::create("filed");
    let direct = c.admin_client().await;
    create_configmaps(&direct, ns.name(), CONFIGMAPS, DATA_BYTES).await;
    let collection = format!("/api/v1/namespaces/{ns}/configmaps");
    let kache = Kache::start(&c.admin_kubeconfig);
    assert!(list_files(&kache).is_empty());

    for (accept, encoding) in [("application/json", "json"), (PROTOBUF, "protobuf")] {
        // The first answer from memory is sent from the store's bytes; the
        // second starts copying the items into a file (aside: it does not
        // wait); once it exists, every answer is sent from it.
        let first = first_from_memory(&kache, accept, encoding);
        assert!(first.body.len() > CONFIGMAPS * DATA_BYTES, "{}", first.body.len());
        let files_before = list_files(&kache);
        let same = |answer: usize| {
            let before = hits(&kache, encoding);
            let again = raw::get_with(kache.addr(), LIST, &[("Accept", accept)]).unwrap();
            assert_eq!(
                hits(&kache, encoding),
                before + 1.0,
                "answer {answer} from memory"
            );
            assert_eq!(again.status, 200);
            assert_eq!(again.header("content-length"), first.header("content-length"));
            assert!(
                again.body == first.body,
                "{encoding} answer {answer} differs from the first ({} against {} bytes)",
                again.body.len(),
                first.body.len()
            );
        };
        same(2);
        // Asked again until the items have stood still long enough (1 s).
        let mut answer = 2;
        let new: Vec<u64> = poll_until(Duration::from_secs(15), "the list's file", || {
            answer += 1;
            same(answer);
            let new: Vec<u64> = list_files(&kache)
                .into_iter()
                .filter(|file| !files_before.contains(file))
                .map(|(_, size)| size)
                .collect();
            (!new.is_empty()).then_some(new)
        });
        assert_eq!(new.len(), 1, "{encoding}: one file for the list");
        let file = new[0];
        for more in 1..=3 {
            same(answer + more);
        }
        assert!(
            file < first.body.len() as u64 + 4096 && file > first.body.len() as u64 - 4096,
            "{encoding}: a {file}-byte file for a {}-byte list",
            first.body.len()
        );
        // The file is counted with the store (the gauge is refreshed by
        // the janitor, every 10 s).
        let objects_bytes = poll_until(
            Duration::from_secs(30),
            "the store's bytes counting the file",
            || {
                let bytes = metric(
                    &kache.metrics(),
                    "kache_cache_bytes",
                    &[("resource", "v1/configmaps"), ("encoding", encoding)],
                );
                (bytes > file as f64).then_some(bytes)
            },
        );
        eprintln!(
            "{encoding}: list {} bytes, file {file}, store counted {objects_bytes}",
            first.body.len()
        );
    }

    // The JSON answers are the API server's objects.
    let from_kache: Value = serde_json::from_slice(
        &raw::get_with(kache.addr(), LIST, &[("Accept", "application/json")])
            .unwrap()
            .body,
    )
    .unwrap();
    let from_api = write_json(&direct, "GET", &format!("{collection}?resourceVersion=0"), None).await;
    let direct_items = items_in(&from_api, ns.name());
    assert_eq!(direct_items.len(), CONFIGMAPS);
    assert_eq!(items_in(&from_kache, ns.name()), direct_items);

    // No list for a while: the files are let go of (idle 30 s, checked
    // every 10 s).
    poll_until(Duration::from_secs(90), "the list files let go of", || {
        list_files(&kache).is_empty().then_some(())
    });
    // And the list is still answered, from the store's bytes.
    let after = first_from_memory(&kache, "application/json", "json");
    assert_eq!(
        items_in(&serde_json::from_slice(&after.body).unwrap(), ns.name()),
        direct_items
    );
}
