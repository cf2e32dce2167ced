//! Memory as list readers multiply: kache streams a cached LIST from the
//! store's own buffers, so fifty clients reading the same large list at once
//! cost it about nothing beyond the objects it already holds — where copying
//! the list per answer would cost fifty copies. The clients stop reading
//! once each answer has started, so all fifty answers are in flight
//! together while kache's resident memory is measured; then each reads its
//! answer to the end and checks it whole.

#![allow(clippy::unwrap_used)] // test helpers, not only #[test] fns (STYLE.md)

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use kache_tests::{cluster, create_configmaps, metric, Kache, TestNamespace};
use serde_json::Value;

const CONFIGMAPS: usize = 600;
/// Each configmap's data: 600 × 40 KB ≈ 24 MB of list.
const DATA_BYTES: usize = 40 * 1024;
const READERS: usize = 50;

/// Reads a response's status line and headers; returns the status and the
/// `Content-Length`.
fn read_head(reader: &mut BufReader<TcpStream>) -> (u16, usize) {
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let status = line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap();
    let mut length = None;
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().ok();
            }
        }
    }
    (status, length.expect("a streamed list carries Content-Length"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_lists_hold_the_objects_once() {
    let c = cluster();
    let ns = TestNamespace::create("list-memory");
    let direct = c.admin_client().await;
    create_configmaps(&direct, ns.name(), CONFIGMAPS, DATA_BYTES).await;
    let collection = format!("/api/v1/namespaces/{ns}/configmaps");

    let kache = Kache::start(&c.admin_kubeconfig);
    let path = format!("{collection}?resourceVersion=0");
    let get = |addr| {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut writer = stream.try_clone().unwrap();
        write!(
            writer,
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/json\r\nUser-Agent: list-memory\r\n\r\n"
        )
        .unwrap();
        BufReader::with_capacity(64 * 1024, stream)
    };
    // Fill the cache and read one whole answer: the list's size, and the
    // baseline with the objects held.
    let mut list_bytes = 0;
    for _ in 0..100 {
        let mut reader = get(kache.addr());
        let (status, length) = read_head(&mut reader);
        assert_eq!(status, 200);
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        let list: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(list["items"].as_array().unwrap().len(), CONFIGMAPS);
        list_bytes = length;
        let hits = metric(
            &kache.metrics(),
            "kache_cache_hits_total",
            &[("resource", "v1/configmaps")],
        );
        if hits > 0.0 {
            break;
        }
    }
    assert!(list_bytes > CONFIGMAPS * DATA_BYTES, "{list_bytes}");
    let before = kache.rss_bytes();

    // Fifty answers started together, none read past its headers.
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(READERS));
    let addr = kache.addr();
    let started: Vec<_> = (0..READERS)
        .map(|_| {
            let barrier = barrier.clone();
            let path = path.clone();
            std::thread::spawn(move || {
                let stream = TcpStream::connect(addr).unwrap();
                stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                let mut writer = stream.try_clone().unwrap();
                barrier.wait();
                write!(
                    writer,
                    "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/json\r\nUser-Agent: list-memory\r\n\r\n"
                )
                .unwrap();
                let mut reader = BufReader::with_capacity(64 * 1024, stream);
                let (status, length) = read_head(&mut reader);
                (status, length, reader)
            })
        })
        .collect();
    let mut readers: Vec<_> = started.into_iter().map(|t| t.join().unwrap()).collect();
    // Every answer is under way: a copied list would exist whole by now.
    let during = kache.rss_bytes();
    let growth = during.saturating_sub(before);
    eprintln!(
        "list {:.1} MB; kache RSS {:.1} MB before, {:.1} MB with {READERS} answers in flight (+{:.1} MB)",
        list_bytes as f64 / 1e6,
        before as f64 / 1e6,
        during as f64 / 1e6,
        growth as f64 / 1e6
    );
    assert!(
        growth < list_bytes as u64,
        "{READERS} concurrent lists of {list_bytes} bytes grew kache by {growth} bytes: more than one copy"
    );

    for (status, length, reader) in &mut readers {
        assert_eq!(*status, 200);
        assert_eq!(*length, list_bytes, "every reader gets the same list");
        let mut body = vec![0; *length];
        reader.read_exact(&mut body).unwrap();
        let list: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(list["items"].as_array().unwrap().len(), CONFIGMAPS);
    }
    let hits = metric(
        &kache.metrics(),
        "kache_cache_hits_total",
        &[("resource", "v1/configmaps")],
    );
    assert!(hits >= READERS as f64, "answered from the cache: {hits} hits");
}
