//! Checks of the harness itself against the API server directly (no kache), so a
//! failing kache test is never a broken helper in disguise.

#![allow(clippy::unwrap_used)] // test helpers, not only #[test] fns (STYLE.md)

use kache_tests::{
    client_from_kubeconfig, cluster, kubeconfig_with_server, kubectl, raw, without_age_column, AuditEvent,
    AuditFilter, Kache, Relay, TestNamespace,
};

#[test]
fn audit_mark_counts_exactly_the_requests_made_after_it() {
    let c = cluster();
    let ns = TestNamespace::create("harness-audit");
    let path = format!("/api/v1/namespaces/{}", ns.name());
    let gets = AuditFilter::new().user("admin").verb("get").uri(&path);
    let mark = c.audit().mark();
    assert_eq!(mark.count_after_sentinel(&gets), 0);
    for _ in 0..3 {
        kubectl(&c.admin_kubeconfig, &["get", "--raw", &path]).ok();
    }
    assert_eq!(mark.count_after_sentinel(&gets), 3);
    let later = c.audit().mark();
    kubectl(&c.admin_kubeconfig, &["get", "--raw", &path]).ok();
    assert_eq!(later.count_after_sentinel(&gets), 1);
    assert_eq!(mark.count_after_sentinel(&gets), 4);
}

#[test]
fn counting_after_a_sentinel_stops_just_before_it() {
    let c = cluster();
    let ns = TestNamespace::create("harness-sentinel");
    let path = format!("/api/v1/namespaces/{}", ns.name());
    let gets = AuditFilter::new().user("admin").verb("get").uri(&path);
    let mark = c.audit().mark();
    kubectl(&c.admin_kubeconfig, &["get", "--raw", &path]).ok();
    let first = mark.events_after_sentinel();
    kubectl(&c.admin_kubeconfig, &["get", "--raw", &path]).ok();
    let second = mark.events_after_sentinel();
    let everything = mark.events();
    let count = |events: &[AuditEvent]| events.iter().filter(|e| gets.matches(e)).count();
    assert_eq!((count(&first), count(&second)), (1, 2));
    // The log only grows: each answer is a prefix of what came later, cut just
    // before its own sentinel (other tests' sentinels may come anywhere).
    for (answer, later) in [(&first, &second), (&second, &everything)] {
        assert_eq!(answer[..], later[..answer.len()]);
        let sentinel = &later[answer.len()];
        assert!(
            sentinel.username == "admin"
                && sentinel.code == Some(404)
                && sentinel
                    .request_uri
                    .starts_with("/api/v1/namespaces/kache-sentinel/configmaps/"),
            "not a sentinel: {sentinel:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn relay_forwards_to_the_api_server_until_stopped_and_again_when_restarted() {
    let c = cluster();
    let relay = Relay::start(c.apiserver_addr);
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("relay.kubeconfig");
    kubeconfig_with_server(
        &c.admin_kubeconfig,
        &format!("https://127.0.0.1:{}", relay.port()),
        &kubeconfig,
    );
    let version = |kubeconfig| async move {
        let mut config = kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(kubeconfig).unwrap(),
            &Default::default(),
        )
        .await
        .unwrap();
        config.default_retry = false;
        kube::Client::try_from(config).unwrap().apiserver_version().await
    };
    version(&kubeconfig).await.expect("through the relay");
    let port = relay.stop();
    version(&kubeconfig).await.expect_err("the relay is stopped");
    let _relay = Relay::start_on(port, c.apiserver_addr);
    version(&kubeconfig).await.expect("through the restarted relay");
    client_from_kubeconfig(&c.admin_kubeconfig)
        .await
        .apiserver_version()
        .await
        .unwrap();
}

#[test]
fn raw_client_reads_chunked_and_sized_bodies() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for (i, conn) in listener.incoming().take(2).enumerate() {
            let mut conn = conn.unwrap();
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf);
            let reply: &[u8] = if i == 0 {
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
            } else {
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\nX-A: b\r\n\r\nnop"
            };
            conn.write_all(reply).unwrap();
        }
    });
    let r = raw::get(addr, "/").unwrap();
    assert_eq!((r.status, r.text()), (200, "hello world".to_string()));
    let r = raw::get(addr, "/").unwrap();
    assert_eq!(
        (r.status, r.text(), r.header("x-a")),
        (404, "nop".to_string(), Some("b"))
    );
}

#[test]
fn age_column_is_removed_from_kubectl_tables() {
    let table = "NAME    DATA   AGE\nalpha   2      5s\nbeta    1      12m\n";
    assert_eq!(without_age_column(table), "NAME    DATA\nalpha   2\nbeta    1");
    let pods = "NAME   READY   STATUS    RESTARTS   AGE\nweb    0/1     Pending   0          3s";
    assert_eq!(
        without_age_column(pods),
        "NAME   READY   STATUS    RESTARTS\nweb    0/1     Pending   0"
    );
}

/// Sets environment variables of this test process, and puts back what
/// they were when dropped (also when the test panics).
struct EnvGuard(Vec<(&'static str, Option<std::ffi::OsString>)>);

impl EnvGuard {
    fn set(vars: &[(&'static str, &str)]) -> EnvGuard {
        let before = vars
            .iter()
            .map(|(name, _)| (*name, std::env::var_os(name)))
            .collect();
        for (name, value) in vars {
            std::env::set_var(name, value);
        }
        EnvGuard(before)
    }
}

impl Drop for EnvGuard {
    fn drop(&mut self) {
        for (name, value) in &self.0 {
            match value {
                Some(value) => std::env::set_var(name, value),
                None => std::env::remove_var(name),
            }
        }
    }
}

#[test]
fn kache_ignores_kache_variables_of_the_shell_that_runs_the_tests() {
    let c = cluster();
    // Either would stop `kache serve` (shared mode needs HTTPS; the token
    // file does not exist) and `kache kubeconfig` (it reads the token), or
    // else make kache refuse a request without credentials.
    let kache = {
        let _env = EnvGuard::set(&[
            ("KACHE_MODE", "shared"),
            ("KACHE_ACCESS_TOKEN_FILE", "/nonexistent/kache-token"),
        ]);
        Kache::start(&c.admin_kubeconfig)
    };
    // Local mode, no token: a request without credentials is served with
    // kache's kubeconfig identity.
    let r = raw::get(kache.addr(), "/api/v1/namespaces/default").unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["metadata"]["name"], "default");
    assert!(kache.kubeconfig().is_file());
}
