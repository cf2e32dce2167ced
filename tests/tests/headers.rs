//! Header handling against the real API server: client credentials are dropped, and
//! responses are never compressed — each checked next to the direct behaviour, so the
//! test would fail if the difference were not real.

#![allow(clippy::unwrap_used)] // test helpers, not only #[test] fns (STYLE.md)

use std::collections::BTreeMap;
use std::process::Command;

use k8s_openapi::api::core::v1::ConfigMap;
use kache_tests::{cluster, http_get, run_with_timeout, AuditFilter, Kache, TestNamespace};
use kube::api::{Api, ObjectMeta, PostParams};
use serde_json::Value;

/// The API server gzips responses larger than this when the client accepts gzip.
const GZIP_THRESHOLD: usize = 128 * 1024;

#[tokio::test]
async fn client_authorization_header_is_dropped_not_forwarded() {
    let c = cluster();
    let kache = Kache::start(&c.admin_kubeconfig);
    let path = "/api/v1/namespaces/default";

    // Directly, a garbage token is rejected: the header does matter to the API server.
    let req = http::Request::get(path)
        .header("Authorization", "Bearer garbage")
        .body(Vec::new().into())
        .unwrap();
    let resp = c.anonymous_client().send(req).await.unwrap();
    assert_eq!(resp.status(), 401, "direct request with a garbage token");

    // Through kache the same header is dropped and kache's identity is used.
    let resp = http_get(
        &format!("{}{path}", kache.url()),
        &[("Authorization", "Bearer garbage")],
    )
    .await;
    assert_eq!(
        resp.status(),
        200,
        "through kache: {}",
        String::from_utf8_lossy(resp.body())
    );
    let ns: Value = serde_json::from_slice(resp.body()).unwrap();
    assert_eq!(ns["metadata"]["name"], "default");
}

#[tokio::test]
async fn client_token_cannot_raise_the_identity_kache_uses_upstream() {
    let c = cluster();
    // kache runs as alice (no rights); the client presents the admin token.
    let kache = Kache::start(&c.alice_kubeconfig);
    let admin_token = c
        .env
        .get("KACHE_ADMIN_TOKEN")
        .expect("KACHE_ADMIN_TOKEN in the cluster env");
    // A namespace nobody has: alice is refused before existence matters, and the
    // path is this test's alone in the audit log.
    let path = format!(
        "/api/v1/namespaces/{}/configmaps",
        kache_tests::unique_name("nowhere")
    );
    let audit = c.audit().mark();
    let resp = http_get(
        &format!("{}{path}", kache.url()),
        &[("Authorization", &format!("Bearer {admin_token}"))],
    )
    .await;
    assert_eq!(resp.status(), 403, "{}", String::from_utf8_lossy(resp.body()));
    let status: Value = serde_json::from_slice(resp.body()).unwrap();
    assert_eq!(status["reason"], "Forbidden");
    assert!(
        status["message"].as_str().unwrap().contains("\"alice\""),
        "{status}"
    );
    // And the API server saw alice, never admin-token, for that request.
    let seen = AuditFilter::new().uri(&path);
    let users: Vec<String> = audit
        .matching_after_sentinel(&seen)
        .into_iter()
        .map(|e| e.username)
        .collect();
    assert_eq!(users, ["alice"]);
}

/// Fills a namespace with `n` configmaps of `size` bytes each.
async fn fill(ns: &str, n: usize, size: usize) {
    let api: Api<ConfigMap> = Api::namespaced(cluster().admin_client().await, ns);
    let blob = "x".repeat(size);
    let creates = (0..n).map(|i| {
        let api = api.clone();
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(format!("big-{i:02}")),
                ..Default::default()
            },
            data: Some(BTreeMap::from([("blob".to_string(), blob.clone())])),
            ..Default::default()
        };
        async move { api.create(&PostParams::default(), &cm).await.unwrap() }
    });
    futures::future::join_all(creates).await;
}

/// Raw headers (lowercased names) and body of a direct HTTPS GET with `curl`, which
/// neither asks for nor decodes compression unless told to.
fn curl_direct(path: &str, headers: &[&str]) -> (BTreeMap<String, String>, Vec<u8>) {
    let c = cluster();
    let dir = tempfile::tempdir().unwrap();
    let (head, body) = (dir.path().join("head"), dir.path().join("body"));
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--http1.1", "--cacert"])
        .arg(&c.ca_cert)
        .arg("--cert")
        .arg(c.env.get("KACHE_ADMIN_CERT").expect("KACHE_ADMIN_CERT"))
        .arg("--key")
        .arg(c.env.get("KACHE_ADMIN_KEY").expect("KACHE_ADMIN_KEY"))
        .arg("-D")
        .arg(&head)
        .arg("-o")
        .arg(&body);
    for h in headers {
        cmd.args(["-H", h]);
    }
    cmd.arg(format!("{}{path}", c.apiserver_url));
    run_with_timeout(cmd, None, std::time::Duration::from_secs(30))
        .expect("curl is required")
        .ok();
    let head = std::fs::read_to_string(head).unwrap();
    let headers = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (headers, std::fs::read(body).unwrap())
}

#[tokio::test]
async fn large_list_through_kache_is_uncompressed_although_the_client_accepts_gzip() {
    let c = cluster();
    let ns = TestNamespace::create("gzip");
    fill(ns.name(), 30, 8 * 1024).await;
    let path = format!("/api/v1/namespaces/{}/configmaps", ns.name());

    // Directly, the API server compresses this list for a client that accepts gzip.
    let (headers, body) = curl_direct(&path, &["Accept-Encoding: gzip"]);
    assert_eq!(
        headers.get("content-encoding").map(String::as_str),
        Some("gzip"),
        "direct headers: {headers:?}"
    );
    assert_eq!(&body[..2], &[0x1f, 0x8b], "direct body is not gzip");

    let kache = Kache::start(&c.admin_kubeconfig);
    for accept in ["gzip", "gzip, deflate, br", "*"] {
        let resp = http_get(&format!("{}{path}", kache.url()), &[("Accept-Encoding", accept)]).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers().get("content-encoding"),
            None,
            "Accept-Encoding: {accept}: {:?}",
            resp.headers()
        );
        assert!(
            resp.body().len() > GZIP_THRESHOLD,
            "the list is only {} bytes",
            resp.body().len()
        );
        let list: Value = serde_json::from_slice(resp.body()).expect("an uncompressed JSON body");
        assert_eq!(list["items"].as_array().map(Vec::len), Some(30));
        assert_eq!(list["kind"], "ConfigMapList");
    }
}
