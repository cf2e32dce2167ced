//! The Grafana dashboard (`deploy/grafana/kache.json`) asks only for what
//! kache exports: every metric its PromQL names is in the `/metrics` of a
//! real kache that has served traffic, with the labels the queries match
//! and group by; and it imports anywhere (its data source an input).

#![allow(clippy::unwrap_used)] // test helpers, not only #[test] fns (STYLE.md)

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use kache_tests::{cluster, kubectl, poll_until, raw, workspace_root, Kache, TestNamespace};
use serde_json::Value;

const DATASOURCE: &str = "${DS_PROMETHEUS}";

fn dashboard() -> Value {
    let path = workspace_root().join("deploy/grafana/kache.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every panel, those inside rows included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(panels: &'a Value, out: &mut Vec<&'a Value>) {
        for panel in panels.as_array().into_iter().flatten() {
            out.push(panel);
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// Every PromQL expression: the panels' targets and the templating queries.
fn expressions(dashboard: &Value) -> Vec<(String, String)> {
    let mut exprs = Vec::new();
    for panel in panels(dashboard) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push((
                panel["title"].as_str().unwrap().to_string(),
                target["expr"].as_str().unwrap().to_string(),
            ));
        }
    }
    for variable in dashboard["templating"]["list"].as_array().into_iter().flatten() {
        if variable["type"] == "query" {
            exprs.push((
                format!("variable {}", variable["name"]),
                variable["query"]["query"].as_str().unwrap().to_string(),
            ));
        }
    }
    exprs
}

/// The expression without its string literals (label values may look like
/// anything).
fn without_strings(expr: &str) -> String {
    let mut out = String::new();
    let mut quote = None;
    let mut escaped = false;
    for c in expr.chars() {
        match quote {
            Some(q) => {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == q {
                    quote = None;
                    out.push(c);
                }
            }
            None => {
                if c == '"' || c == '\'' {
                    quote = Some(c);
                }
                out.push(c);
            }
        }
    }
    out
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// The metric names an expression reads (all of kache's start `kache_`),
/// each with the label names its selector matches on.
fn selectors(expr: &str) -> Vec<(String, BTreeSet<String>)> {
    let plain = without_strings(expr);
    let mut found = Vec::new();
    let mut at = 0;
    while let Some(start) = plain[at..].find("kache_").map(|i| i + at) {
        let before = plain[..start].chars().next_back();
        let end = plain[start..]
            .find(|c: char| !is_name_char(c))
            .map_or(plain.len(), |i| i + start);
        at = end;
        if before.is_some_and(is_name_char) {
            continue;
        }
        let name = plain[start..end].to_string();
        let mut labels = BTreeSet::new();
        if plain[end..].starts_with('{') {
            let close = plain[end..].find('}').unwrap() + end;
            for matcher in plain[end + 1..close].split(',') {
                let label: String = matcher.trim().chars().take_while(|c| is_name_char(*c)).collect();
                if !label.is_empty() {
                    labels.insert(label);
                }
            }
        }
        found.push((name, labels));
    }
    found
}

/// The labels of each `by (…)`/`without (…)` grouping, with the metrics of
/// the expression it aggregates.
fn groupings(expr: &str) -> Vec<(BTreeSet<String>, Vec<String>)> {
    let plain = without_strings(expr);
    let mut out = Vec::new();
    for keyword in ["by (", "by("] {
        let mut at = 0;
        while let Some(found) = plain[at..].find(keyword).map(|i| i + at) {
            at = found + keyword.len();
            let close = plain[at..].find(')').unwrap() + at;
            let labels: BTreeSet<String> = plain[at..close]
                .split(',')
                .map(|l| l.trim().to_string())
                .filter(|l| !l.is_empty())
                .collect();
            // The aggregated expression: the parenthesized group that follows.
            let open = plain[close + 1..].find('(').unwrap() + close + 1;
            let mut depth = 0;
            let mut end = open;
            for (i, c) in plain[open..].char_indices() {
                match c {
                    '(' => depth += 1,
                    ')' => {
                        depth -= 1;
                        if depth == 0 {
                            end = open + i;
                            break;
                        }
                    }
                    _ => {}
                }
            }
            let metrics = selectors(&plain[open..=end])
                .into_iter()
                .map(|(m, _)| m)
                .collect();
            out.push((labels, metrics));
        }
    }
    out
}

/// The series of a `/metrics` text: name → label names seen.
fn exported(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut series: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let name_end = line.find(['{', ' ']).unwrap();
        let labels = series.entry(line[..name_end].to_string()).or_default();
        if line[name_end..].starts_with('{') {
            let body = &line[name_end + 1..line.rfind('}').unwrap()];
            for pair in without_strings(body).split(',') {
                if let Some((label, _)) = pair.split_once('=') {
                    labels.insert(label.trim().to_string());
                }
            }
        }
    }
    series
}

#[test]
fn the_dashboard_imports_anywhere_and_every_panel_has_a_query() {
    let dashboard = dashboard();
    let inputs = dashboard["__inputs"].as_array().unwrap();
    assert_eq!(inputs.len(), 1, "{inputs:?}");
    assert_eq!(inputs[0]["name"], "DS_PROMETHEUS");
    assert_eq!(inputs[0]["type"], "datasource");
    assert_eq!(inputs[0]["pluginId"], "prometheus");
    assert_eq!(dashboard["uid"], "kache");
    assert!(dashboard["id"].is_null(), "an exported dashboard carries no id");
    let mut ids = BTreeSet::new();
    let mut queried = 0;
    for panel in panels(&dashboard) {
        let title = panel["title"].as_str().unwrap();
        assert!(ids.insert(panel["id"].as_u64().unwrap()), "duplicate id: {title}");
        let grid = &panel["gridPos"];
        let (x, w) = (grid["x"].as_u64().unwrap(), grid["w"].as_u64().unwrap());
        assert!(x + w <= 24 && grid["h"].as_u64().unwrap() > 0, "{title}: {grid}");
        if panel["type"] == "row" {
            continue;
        }
        assert!(
            !panel["description"].as_str().unwrap_or("").is_empty(),
            "{title}: no description"
        );
        assert_eq!(panel["datasource"]["uid"], DATASOURCE, "{title}");
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title}: no query");
        for target in targets {
            assert_eq!(target["datasource"]["uid"], DATASOURCE, "{title}");
            assert_eq!(target["datasource"]["type"], "prometheus", "{title}");
        }
        queried += 1;
    }
    assert!(queried >= 20, "{queried} panels");
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        assert_eq!(variable["datasource"]["uid"], DATASOURCE);
    }
    for (title, expr) in expressions(&dashboard) {
        let plain = without_strings(&expr);
        for (open, close) in [('(', ')'), ('{', '}'), ('[', ']')] {
            assert_eq!(
                plain.matches(open).count(),
                plain.matches(close).count(),
                "{title}: unbalanced {open}{close} in {expr}"
            );
        }
        assert!(!selectors(&expr).is_empty(), "{title}: no kache metric in {expr}");
    }
}

#[test]
fn every_metric_the_dashboard_queries_is_exported_by_a_kache_that_served_traffic() {
    let c = cluster();
    let ns = TestNamespace::create("grafana");
    kubectl(
        &c.admin_kubeconfig,
        &["create", "configmap", "a", "-n", ns.name(), "--from-literal=k=v"],
    )
    .ok();
    let kache = Kache::start(&c.admin_kubeconfig);
    let addr = kache.addr();
    let get = |path: &str, headers: &[(&str, &str)]| raw::get_with(addr, path, headers).unwrap();
    let list = format!("/api/v1/namespaces/{}/configmaps", ns.name());
    // From the object cache (twice: the store starts with the first), forwarded,
    // and a watch served from memory (its watcher gauge).
    for path in [
        format!("{list}?resourceVersion=0"),
        format!("{list}?resourceVersion=0"),
        list.clone(),
        format!("{list}?watch=1&resourceVersion=0&timeoutSeconds=1"),
    ] {
        let r = get(&path, &[]);
        assert_eq!(r.status, 200, "{path}: {}", r.text());
    }
    // kache's own error answers: a Host it does not accept.
    assert_eq!(get("/api", &[("Host", "elsewhere.example")]).status, 403);
    // Discovery from memory once its watches are up; the janitor's gauges
    // (objects, bytes) once it has swept.
    let metrics = poll_until(
        Duration::from_secs(30),
        "discovery hits and the cache's gauges",
        || {
            assert_eq!(get("/api", &[]).status, 200);
            let text = kache.metrics();
            (text.contains("kache_discovery_hits_total{") && text.contains("kache_cache_objects{"))
                .then_some(text)
        },
    );
    let exported = exported(&metrics);

    let dashboard = dashboard();
    let mut checked = BTreeSet::new();
    for (title, expr) in expressions(&dashboard) {
        for (name, labels) in selectors(&expr) {
            let Some(has) = exported.get(&name) else {
                panic!("{title}: {name} is not exported by kache ({expr}); kache exports:\n{metrics}");
            };
            for label in labels.iter().filter(|l| *l != "instance") {
                assert!(
                    has.contains(label),
                    "{title}: {name} has no label {label} ({expr}): {has:?}"
                );
            }
            checked.insert(name);
        }
        for (labels, metrics_grouped) in groupings(&expr) {
            for name in metrics_grouped {
                let has = &exported[&name];
                for label in labels.iter().filter(|l| *l != "instance") {
                    assert!(
                        has.contains(label),
                        "{title}: grouped by {label}, which {name} does not have ({expr}): {has:?}"
                    );
                }
            }
        }
    }
    // The families the dashboard must cover, at least.
    for family in [
        "kache_http_requests_total",
        "kache_flowcontrol_current_inqueue_requests",
        "kache_flowcontrol_rejected_requests_total",
        "kache_client_upstream_requests_total",
        "kache_cache_objects",
        "kache_cache_bytes",
        "kache_cache_watchers",
        "kache_errors_total",
    ] {
        assert!(checked.contains(family), "the dashboard does not show {family}");
    }
    eprintln!("{} metrics checked: {checked:?}", checked.len());
}

#[test]
fn the_promql_readers_find_names_labels_and_groupings() {
    let expr = r#"sum by (class, reason) (rate(kache_a_total{instance=~"$instance",reason="kache_not_a_metric"}[5m])) / ignoring(reason) group_left() sum(kache_b)"#;
    assert_eq!(
        selectors(expr),
        [
            (
                "kache_a_total".to_string(),
                BTreeSet::from(["instance".to_string(), "reason".to_string()])
            ),
            ("kache_b".to_string(), BTreeSet::new()),
        ]
    );
    assert_eq!(
        groupings(expr),
        [(
            BTreeSet::from(["class".to_string(), "reason".to_string()]),
            vec!["kache_a_total".to_string()]
        )]
    );
    let text = "# TYPE kache_a counter\nkache_a_total{class=\"x\",reason=\"a,b=c\"} 1\nkache_b 2\n";
    let series = exported(text);
    assert_eq!(
        series["kache_a_total"],
        BTreeSet::from(["class".to_string(), "reason".to_string()])
    );
    assert!(series["kache_b"].is_empty());
}
