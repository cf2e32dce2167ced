//! Bad input from clients: kache answers with the right error and keeps serving.

#![allow(clippy::unwrap_used)] // test helpers, not only #[test] fns (STYLE.md)

use kache_tests::{assert_status_body, cluster, raw, Kache};

/// kache still answers a normal request.
#[track_caller]
fn assert_still_serving(kache: &mut Kache) {
    kache.assert_running();
    let r = raw::get(kache.addr(), "/api/v1/namespaces/default").unwrap();
    assert_eq!(r.status, 200, "a normal request after bad input: {}", r.text());
    assert_eq!(r.json()["metadata"]["name"], "default");
}

#[test]
fn malformed_requests_get_400_and_kache_keeps_serving() {
    let mut kache = Kache::start(&cluster().admin_kubeconfig);
    let host = kache.addr().to_string();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "a request line that is not HTTP",
            b"THIS IS NOT HTTP AT ALL\r\n\r\n".to_vec(),
        ),
        (
            "binary garbage",
            b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03garbage\r\n\r\n".to_vec(),
        ),
        (
            "a header line without a colon",
            format!("GET /version HTTP/1.1\r\nHost: {host}\r\nno colon here\r\n\r\n").into_bytes(),
        ),
        (
            "a space inside the path",
            format!("GET /api/v1/namespaces default HTTP/1.1\r\nHost: {host}\r\n\r\n").into_bytes(),
        ),
        (
            "a bad Content-Length",
            format!("POST /api/v1/namespaces HTTP/1.1\r\nHost: {host}\r\nContent-Length: nope\r\n\r\n")
                .into_bytes(),
        ),
    ];
    for (what, bytes) in cases {
        let r = raw::exchange(kache.addr(), &bytes).unwrap_or_else(|e| panic!("{what}: no response ({e})"));
        assert_eq!(r.status, 400, "{what}: {} {}", r.status, r.text());
        assert_still_serving(&mut kache);
    }
}

#[test]
fn request_headers_over_one_mebibyte_get_431() {
    let mut kache = Kache::start(&cluster().admin_kubeconfig);
    // The API server (Go's `MaxHeaderBytes`, 1 MiB, plus its 4 KB of bufio
    // slop) takes a head of up to 1,052,672 bytes and answers 431 past it:
    // measured against v1.20 with heads of exactly these lengths.
    let addr = kache.addr();
    let head = |big: usize| {
        format!(
            "GET /version HTTP/1.1\r\nHost: {addr}\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
            "a".repeat(big)
        )
    };
    let fixed = head(0).len();
    for (len, status) in [(1_052_672, 200), (1_052_673, 431), (2 << 20, 431)] {
        let req = head(len - fixed);
        assert_eq!(req.len(), len);
        let r = raw::exchange(addr, req.as_bytes()).expect("a response");
        assert_eq!(r.status, status, "a {len}-byte head: {}", r.text());
        assert_still_serving(&mut kache);
    }

    // Also when the size comes from many headers.
    let mut req = format!("GET /version HTTP/1.1\r\nHost: {}\r\n", kache.addr());
    let chunk = "b".repeat(8 * 1024);
    for i in 0..140 {
        req.push_str(&format!("X-Many-{i}: {chunk}\r\n"));
    }
    req.push_str("Connection: close\r\n\r\n");
    let r = raw::exchange(kache.addr(), req.as_bytes()).expect("no response to many headers");
    assert_eq!(r.status, 431, "{}", r.text());
    assert_still_serving(&mut kache);
}

#[test]
fn host_header_must_name_loopback_unless_accepted() {
    let mut kache = Kache::start(&cluster().admin_kubeconfig);
    let port = kache.addr().port();
    for host in [
        "evil.example".to_string(),
        format!("evil.example:{port}"),
        "localhost.evil.example".to_string(),
        format!("127.0.0.1.evil.example:{port}"),
        "10.0.0.1".to_string(),
        "[::2]".to_string(),
    ] {
        let r = raw::get_with(kache.addr(), "/api/v1/namespaces/default", &[("Host", &host)]).unwrap();
        assert_eq!(r.status, 403, "Host: {host}: {}", r.text());
        assert_status_body(&r.json(), 403, Some("Forbidden"));
    }
    for host in [
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        format!("[::1]:{port}"),
        "localhost".to_string(),
    ] {
        let r = raw::get_with(kache.addr(), "/api/v1/namespaces/default", &[("Host", &host)]).unwrap();
        assert_eq!(r.status, 200, "Host: {host}: {}", r.text());
    }
    assert_still_serving(&mut kache);

    let mut accepting =
        Kache::start_with_args(&cluster().admin_kubeconfig, &["--accept-host", "evil.example"]);
    let r = raw::get_with(
        accepting.addr(),
        "/api/v1/namespaces/default",
        &[("Host", "evil.example")],
    )
    .unwrap();
    assert_eq!(r.status, 200, "with --accept-host evil.example: {}", r.text());
    // Configured names are accepted in addition to the loopback ones (DESIGN.md).
    assert_still_serving(&mut accepting);
}
