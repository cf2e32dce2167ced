//! The admin listener's status page as a person sees it: kache in front of
//! the real API server preloads a resource, caches configmaps for rv=0
//! LISTs and serves a few clients — one of them with markup in its
//! User-Agent — then headless Chromium renders the page. What it shows is
//! checked against `/debug/cache`, `/debug/clients` and `/metrics`, the
//! client's markup must show as text (no element of it, no script run), and
//! a screenshot is kept as `target/test-artifacts/status-page.png`.
//!
//! Chromium is Debian's (`tests/run.sh` installs it; `$CHROMIUM` names
//! another): a missing browser fails the test.

#![allow(clippy::unwrap_used)] // test helpers, not only #[test] fns (STYLE.md)

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use kache_tests::{
    cluster, kubectl, metric, poll_until, raw, run_with_timeout, target_dir, Kache, TestNamespace,
};
use serde_json::Value;

/// One headless Chromium run.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(90);
/// Markup a client puts in its User-Agent, which becomes part of its
/// client key and so of the page: rendered, it would add an element with
/// this id and retitle the page.
const MARKUP_AGENT: &str = r#"markup/1.0 <img src=x id=injected onerror="document.title='pwned'"><script>document.title='pwned'</script>"#;
const CONFIGMAPS: usize = 3;

fn chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("CHROMIUM").filter(|p| !p.is_empty()) {
        return path.into();
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("chromium"))
                .find(|path| path.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "chromium is not installed: tests/run.sh installs Debian's (apt-get install chromium), \
                 or set CHROMIUM to a Chromium binary"
            )
        })
}

/// Runs headless Chromium on `url` with `args`; its stdout.
fn browse(args: &[&str], url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(chromium());
    cmd.args([
        "--headless",
        "--disable-gpu",
        "--no-sandbox",
        "--no-first-run",
        "--disable-extensions",
        "--hide-scrollbars",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .args(args)
    .arg(url)
    .env("HOME", profile.path());
    let out = run_with_timeout(cmd, None, BROWSER_TIMEOUT).unwrap();
    assert!(
        out.success(),
        "chromium {args:?} {url} failed ({}):\n{}",
        out.status,
        out.stderr
    );
    out.stdout
}

/// Text of serialized HTML: tags dropped, entities decoded.
fn text(html: &str) -> String {
    let mut out = String::new();
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => in_tag = false,
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    out.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&nbsp;", " ")
        .replace("&amp;", "&")
        .trim()
        .to_string()
}

/// The rows of the rendered DOM that open with `open` (`<tr class="…"`).
fn rows<'a>(dom: &'a str, open: &str) -> Vec<&'a str> {
    let mut rows = Vec::new();
    let mut rest = dom;
    while let Some(at) = rest.find(open) {
        let row = &rest[at..];
        let end = row.find("</tr>").expect("a closed row");
        rows.push(&row[..end]);
        rest = &row[end..];
    }
    rows
}

/// The text of the cell whose class attribute is exactly `class`.
fn cell(row: &str, class: &str) -> String {
    let open = format!(r#"<td class="{class}">"#);
    let at = row.find(&open).unwrap_or_else(|| panic!("no {open} in {row}"));
    let inner = &row[at + open.len()..];
    text(&inner[..inner.find("</td>").expect("a closed cell")])
}

/// The value of attribute `name` in a row's opening tag.
fn attribute(row: &str, name: &str) -> String {
    let key = format!(r#"{name}=""#);
    let at = row.find(&key).unwrap_or_else(|| panic!("no {name} in {row}"));
    let value = &row[at + key.len()..];
    text(&value[..value.find('"').expect("a closed attribute")])
}

fn get_json(addr: std::net::SocketAddr, path: &str) -> Value {
    let r = raw::get(addr, path).unwrap();
    assert_eq!(r.status, 200, "{path}: {}", r.text());
    r.json()
}

/// What of `/debug/cache` the page must repeat: each store's name,
/// encoding, objects and resourceVersion.
fn stores(view: &Value) -> Vec<(String, String, u64, String)> {
    view["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let group = r["group"].as_str().unwrap();
            let label = if group.is_empty() {
                format!(
                    "{}/{}",
                    r["version"].as_str().unwrap(),
                    r["resource"].as_str().unwrap()
                )
            } else {
                format!(
                    "{group}/{}/{}",
                    r["version"].as_str().unwrap(),
                    r["resource"].as_str().unwrap()
                )
            };
            (
                label,
                r["encoding"].as_str().unwrap().to_string(),
                r["objects"].as_u64().unwrap(),
                r["resourceVersion"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// What of `/debug/clients` the page must repeat: each client's key,
/// requests and upstream calls, most expensive first.
fn clients(view: &Value) -> Vec<(String, u64, u64)> {
    view["clients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let requests = c["requests"]
                .as_object()
                .unwrap()
                .values()
                .map(|n| n.as_u64().unwrap())
                .sum();
            (
                c["client"].as_str().unwrap().to_string(),
                requests,
                c["upstreamRequests"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn the_status_page_shows_what_debug_cache_debug_clients_and_metrics_say() {
    let c = cluster();
    let ns = TestNamespace::create("status-page");
    for n in 0..CONFIGMAPS {
        kubectl(
            &c.admin_kubeconfig,
            &[
                "create",
                "configmap",
                &format!("cm-{n}"),
                "-n",
                ns.name(),
                "--from-literal=k=v",
            ],
        )
        .ok();
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kache.yaml");
    // Pod templates: preloaded (a second store), and no other test writes them.
    std::fs::write(&config, "cache:\n  preload: [v1/podtemplates]\n").unwrap();
    let kache = Kache::start_with_args(&c.admin_kubeconfig, &["--config", config.to_str().unwrap()]);
    let admin = kache.admin_addr();

    // Readiness waited for the preloaded resource, and says so as the API server would.
    let ready = raw::get(admin, "/readyz?verbose").unwrap();
    assert_eq!(
        (ready.status, ready.text()),
        (
            200,
            "[+]ping ok\n[+]upstream ok\n[+]warm-start ok\n[+]preload ok\nreadyz check passed\n".to_string()
        )
    );
    assert_eq!(raw::get(admin, "/readyz/preload").unwrap().text(), "ok");

    // Clients: kubectl's rv=0 LISTs start the configmaps store and are
    // answered from it; a client with markup for a User-Agent reads too,
    // once from memory and once forwarded (a consistent LIST).
    let list = format!("/api/v1/namespaces/{}/configmaps?resourceVersion=0", ns.name());
    for _ in 0..2 {
        let out = kubectl(kache.kubeconfig(), &["get", "--raw", &list]).ok();
        assert_eq!(out.json()["items"].as_array().unwrap().len(), CONFIGMAPS);
    }
    for path in [
        list.clone(),
        format!("/api/v1/namespaces/{}/configmaps", ns.name()),
    ] {
        let r = raw::get_with(kache.addr(), &path, &[("User-Agent", MARKUP_AGENT)]).unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["items"].as_array().unwrap().len(), CONFIGMAPS);
    }
    let markup_client = format!("127.0.0.1 {MARKUP_AGENT}");
    // The history has a point to draw from (a sample every 5 s).
    poll_until(Duration::from_secs(30), "two samples in the history", || {
        (get_json(admin, "/?format=json")["history"]
            .as_array()
            .unwrap()
            .len()
            >= 2)
            .then_some(())
    });

    // The page against the JSON views, read before and after it: the
    // configmaps store follows the whole shared cluster, so a round where
    // it moved while the page was rendered is taken again.
    let url = format!("http://{admin}/");
    let mut attempts = 0;
    let (dom, cache_view, client_view, metrics) = loop {
        attempts += 1;
        let cache_before = get_json(admin, "/debug/cache");
        let clients_before = get_json(admin, "/debug/clients?limit=10");
        let dom = browse(&["--dump-dom"], &url);
        let cache_after = get_json(admin, "/debug/cache");
        let clients_after = get_json(admin, "/debug/clients?limit=10");
        let metrics = kache.metrics();
        if stores(&cache_before) == stores(&cache_after)
            && clients(&clients_before) == clients(&clients_after)
        {
            break (dom, cache_after, clients_after, metrics);
        }
        assert!(attempts < 10, "the cache never held still for a page load");
    };

    // Nothing the markup client sent became part of the page.
    assert!(
        !dom.contains("injected\""),
        "the client's markup became an element:\n{dom}"
    );
    assert!(!dom.contains("<img"), "{dom}");
    assert!(!dom.contains("<script"), "the page runs nothing:\n{dom}");
    assert!(
        dom.contains("<title>kache ready</title>"),
        "not ready, or retitled by the client's markup:\n{dom}"
    );

    // A row per store, with the numbers of /debug/cache.
    let expected = stores(&cache_view);
    assert!(
        expected.iter().any(|(label, ..)| label == "v1/configmaps")
            && expected.iter().any(|(label, ..)| label == "v1/podtemplates"),
        "{cache_view:#}"
    );
    let shown: Vec<(String, String, u64, String)> = rows(&dom, r#"<tr class="resource""#)
        .into_iter()
        .map(|row| {
            assert_eq!(cell(row, "name"), attribute(row, "data-resource"));
            (
                attribute(row, "data-resource"),
                cell(row, "encoding"),
                cell(row, "num objects").parse().unwrap(),
                cell(row, "num rv"),
            )
        })
        .collect();
    assert_eq!(shown, expected, "resources on the page vs /debug/cache");
    let configmaps = rows(&dom, r#"<tr class="resource" data-resource="v1/configmaps""#)[0];
    let cached = cache_view["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["resource"] == "configmaps")
        .unwrap();
    assert_eq!(cell(configmaps, "num hits"), cached["hits"].to_string());
    assert_eq!(
        cell(configmaps, "num forwarded"),
        cached["forwardedReads"].to_string()
    );
    assert!(cached["hits"].as_u64().unwrap() >= 3, "{cached}");
    assert!(cached["forwardedReads"].as_u64().unwrap() >= 1, "{cached}");
    let ratio = (cached["hitRatio"].as_f64().unwrap() * 100.0).round();
    assert!(
        configmaps.contains(&format!(r#"aria-label="hit ratio {ratio}%""#)),
        "no hit ratio bar of {ratio}%: {configmaps}"
    );

    // A row per client, with the numbers of /debug/clients.
    let expected = clients(&client_view);
    assert!(
        expected.iter().any(|(client, ..)| *client == markup_client),
        "{client_view:#}"
    );
    assert!(
        expected
            .iter()
            .any(|(client, ..)| client.starts_with("127.0.0.1 kubectl/")),
        "{client_view:#}"
    );
    let shown: Vec<(String, u64, u64)> = rows(&dom, r#"<tr class="client">"#)
        .into_iter()
        .map(|row| {
            (
                cell(row, "client"),
                cell(row, "num requests").parse().unwrap(),
                cell(row, "num upstream").parse().unwrap(),
            )
        })
        .collect();
    assert_eq!(shown, expected, "clients on the page vs /debug/clients");

    // A row per class, with the limits' metrics.
    let classes: Vec<(String, String, String)> = rows(&dom, r#"<tr class="class""#)
        .into_iter()
        .map(|row| {
            (
                cell(row, "name"),
                cell(row, "num seats"),
                cell(row, "num dispatched"),
            )
        })
        .collect();
    let seats = metric(
        &metrics,
        "kache_flowcontrol_request_concurrency_limit",
        &[("class", "default")],
    );
    let dispatched = metric(
        &metrics,
        "kache_flowcontrol_dispatched_requests_total",
        &[("class", "default")],
    );
    assert!(dispatched >= 1.0, "the forwarded read took a seat: {dispatched}");
    assert_eq!(
        classes,
        [
            ("default".to_string(), seats.to_string(), dispatched.to_string()),
            ("exempt".to_string(), "—".to_string(), "0".to_string()),
        ]
    );

    // The readiness checks, and the API server's version.
    for check in ["ping", "upstream", "warm-start", "preload"] {
        let open = format!(r#"<li class="check" data-check="{check}">"#);
        let at = dom
            .find(&open)
            .unwrap_or_else(|| panic!("no check {check}:\n{dom}"));
        let item = &dom[at..at + dom[at..].find("</li>").unwrap()];
        assert_eq!(text(item), format!("{check} ok"));
    }
    let version = kubectl(&c.admin_kubeconfig, &["get", "--raw", "/version"])
        .ok()
        .json();
    assert!(
        dom.contains(&format!(
            r#"<span id="upstream-version">{}</span>"#,
            version["gitVersion"].as_str().unwrap()
        )),
        "{dom}"
    );
    assert!(dom.contains("<polyline"), "no history chart:\n{dom}");

    // What a person would see, kept for them to look at.
    let artifacts = target_dir().join("test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let png = artifacts.join("status-page.png");
    let _ = std::fs::remove_file(&png);
    browse(
        &[
            &format!("--screenshot={}", png.display()),
            "--window-size=1280,2000",
        ],
        &url,
    );
    let image = std::fs::read(&png).unwrap_or_else(|e| panic!("{}: {e}", png.display()));
    assert!(image.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(image.len() > 10_000, "an empty screenshot: {} bytes", image.len());
    eprintln!("status page screenshot: {}", png.display());
}
