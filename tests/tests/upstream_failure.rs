//! kache in front of an upstream that goes away and comes back. The shared API
//! server is never stopped (other tests run meanwhile): a loopback TCP relay between
//! kache and the API server is cut and restored instead.

#![allow(clippy::unwrap_used)] // test helpers, not only #[test] fns (STYLE.md)

use std::time::{Duration, Instant};

use kache_tests::{
    assert_status_body, cluster, kubeconfig_through, kubectl, poll_until, raw, Kache, Relay, TestNamespace,
};

const RECOVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// A kache whose upstream is `relay` (same CA and admin credentials; the serving
/// certificate's SAN IP:127.0.0.1 matches the relay's address).
fn kache_behind(relay: &Relay) -> Kache {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = kubeconfig_through(relay, &cluster().admin_kubeconfig, dir.path());
    let kache = Kache::start(&kubeconfig);
    // kache has read its kubeconfig; keep a copy beside it for debugging.
    std::fs::copy(&kubeconfig, kache.scratch_dir().join("relay.kubeconfig")).unwrap();
    kache
}

#[test]
fn unreachable_upstream_gets_503_status_and_kache_recovers_when_it_returns() {
    let c = cluster();
    let relay = Relay::start(c.apiserver_addr);
    let mut kache = kache_behind(&relay);
    let path = "/api/v1/namespaces/default";

    let ok = raw::get(kache.addr(), path).unwrap();
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(ok.json()["metadata"]["name"], "default");

    let port = relay.stop();
    for attempt in 0..3 {
        // A hang would end in the raw client's timeout, an error here.
        let r = raw::get(kache.addr(), path).unwrap();
        assert_eq!(
            r.status,
            503,
            "attempt {attempt} with the upstream down: {}",
            r.text()
        );
        assert!(
            r.header("retry-after").is_some(),
            "503 without Retry-After: {:?}",
            r.headers
        );
        assert!(
            r.header("content-type")
                .is_some_and(|t| t.starts_with("application/json")),
            "content-type {:?}",
            r.header("content-type")
        );
        assert_status_body(&r.json(), 503, Some("ServiceUnavailable"));
    }
    kache.assert_running();
    let live = raw::get(kache.admin_addr(), "/livez").unwrap();
    assert_eq!(
        live.status,
        200,
        "/livez while the upstream is down: {}",
        live.text()
    );

    let _relay = Relay::start_on(port, c.apiserver_addr);
    let r = poll_until(
        RECOVERY_TIMEOUT,
        "kache to answer 200 again once the upstream is back",
        || raw::get(kache.addr(), path).ok().filter(|r| r.status == 200),
    );
    assert_eq!(r.json()["metadata"]["name"], "default");
    kache.assert_running();
}

/// What a streaming reader of one watch response reports.
#[derive(Debug)]
enum WatchLine {
    Status(String),
    Event(String),
    Ended(#[allow(dead_code)] String),
}

/// Opens `GET path` (a watch) on kache over raw HTTP/1.1 and reports the status line,
/// each event line of the chunked body, and the end of the stream, on a channel.
fn stream_watch(addr: std::net::SocketAddr, path: String) -> std::sync::mpsc::Receiver<WatchLine> {
    use std::io::{BufRead, BufReader, Read, Write};
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let run = || -> std::io::Result<String> {
            let mut s = std::net::TcpStream::connect(addr)?;
            s.set_read_timeout(Some(Duration::from_secs(120)))?;
            write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n")?;
            let mut r = BufReader::new(s);
            let mut line = String::new();
            r.read_line(&mut line)?;
            let _ = tx.send(WatchLine::Status(line.trim().to_string()));
            loop {
                line.clear();
                r.read_line(&mut line)?;
                if line.trim().is_empty() {
                    break; // end of the headers
                }
            }
            let mut pending = Vec::new();
            loop {
                line.clear();
                if r.read_line(&mut line)? == 0 {
                    return Ok("connection closed".into());
                }
                let size = usize::from_str_radix(line.trim(), 16)
                    .map_err(|_| std::io::Error::other(format!("bad chunk size {line:?}")))?;
                if size == 0 {
                    return Ok("last chunk".into());
                }
                let mut chunk = vec![0; size + 2];
                r.read_exact(&mut chunk)?;
                pending.extend_from_slice(&chunk[..size]);
                while let Some(nl) = pending.iter().position(|b| *b == b'\n') {
                    let event: Vec<u8> = pending.drain(..=nl).collect();
                    let _ = tx.send(WatchLine::Event(String::from_utf8_lossy(&event).into_owned()));
                }
            }
        };
        let end = run().unwrap_or_else(|e| format!("error: {e}"));
        let _ = tx.send(WatchLine::Ended(end));
    });
    rx
}

#[test]
fn watch_through_kache_does_not_hang_silently_when_the_upstream_connection_is_cut() {
    let c = cluster();
    let ns = TestNamespace::create("cut-watch");
    let relay = Relay::start(c.apiserver_addr);
    let mut kache = kache_behind(&relay);
    let path = format!(
        "/api/v1/namespaces/{}/configmaps?watch=true&timeoutSeconds=300",
        ns.name()
    );
    let events = stream_watch(kache.addr(), path);
    match events.recv_timeout(RECOVERY_TIMEOUT) {
        Ok(WatchLine::Status(s)) => assert!(s.contains(" 200 "), "watch status line {s:?}"),
        other => panic!("no status line for the watch: {other:?}"),
    }

    // Cut every connection between kache and the API server, and restore the path.
    let port = relay.stop();
    let _relay = Relay::start_on(port, c.apiserver_addr);
    kubectl(
        &c.admin_kubeconfig,
        &["create", "configmap", "after-cut", "-n", ns.name()],
    )
    .ok();

    // Either the stream ends (the client relists) or it carries on with the change;
    // never a stream that stays open and silent.
    let deadline = Instant::now() + RECOVERY_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match events.recv_timeout(left) {
            Ok(WatchLine::Ended(_)) => break,
            Ok(WatchLine::Event(e)) if e.contains("\"after-cut\"") => break,
            Ok(_) => {}
            Err(e) => panic!("the watch through kache neither ended nor delivered the change ({e:?})"),
        }
    }
    kache.assert_running();
}
