//! Selectors run once per cached object on every filtered LIST and watch
//! event: matching 10k objects must stay far cheaper than the network hop it
//! saves. The baselines are the same predicates written by hand in Rust, the
//! floor an interpreted selector can approach.

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use kache_cache::selector::{FieldSelector, LabelSelector};

const LABEL_SELECTOR: &str = "app=web,tier in (frontend,backend),!canary,env!=dev";
const FIELD_SELECTOR: &str = "spec.nodeName=node-7,status.phase!=Succeeded";

/// 10k label sets shaped like a cluster's pods: a few labels each, a tenth
/// of them selected.
fn label_sets() -> Vec<BTreeMap<String, String>> {
    (0..10_000)
        .map(|i: usize| {
            let mut labels = BTreeMap::new();
            labels.insert(
                "app".to_owned(),
                if i.is_multiple_of(5) { "web" } else { "api" }.to_owned(),
            );
            labels.insert(
                "tier".to_owned(),
                ["frontend", "backend", "cache"][i % 3].to_owned(),
            );
            labels.insert("env".to_owned(), ["prod", "dev", "staging"][i % 3].to_owned());
            labels.insert(
                "pod-template-hash".to_owned(),
                format!("{:08x}", i * 2_654_435_761),
            );
            if i.is_multiple_of(7) {
                labels.insert("canary".to_owned(), "true".to_owned());
            }
            labels
        })
        .collect()
}

fn field_sets() -> Vec<BTreeMap<String, String>> {
    (0..10_000)
        .map(|i: usize| {
            BTreeMap::from([
                ("metadata.name".to_owned(), format!("pod-{i}")),
                ("metadata.namespace".to_owned(), format!("ns-{}", i % 20)),
                ("spec.nodeName".to_owned(), format!("node-{}", i % 50)),
                (
                    "status.phase".to_owned(),
                    ["Running", "Succeeded", "Pending"][i % 3].to_owned(),
                ),
            ])
        })
        .collect()
}

fn hand_written_labels(labels: &BTreeMap<String, String>) -> bool {
    labels.get("app").is_some_and(|v| v == "web")
        && labels
            .get("tier")
            .is_some_and(|v| v == "frontend" || v == "backend")
        && !labels.contains_key("canary")
        && labels.get("env").is_none_or(|v| v != "dev")
}

fn hand_written_fields(fields: &BTreeMap<String, String>) -> bool {
    fields.get("spec.nodeName").map_or("", String::as_str) == "node-7"
        && fields.get("status.phase").map_or("", String::as_str) != "Succeeded"
}

fn selectors(c: &mut Criterion) {
    let labels = label_sets();
    let fields = field_sets();
    let label_selector = LabelSelector::parse(LABEL_SELECTOR).expect("invariant: the bench selector parses");
    let field_selector = FieldSelector::parse(FIELD_SELECTOR).expect("invariant: the bench selector parses");
    assert_eq!(
        labels.iter().filter(|l| label_selector.matches(*l)).count(),
        labels.iter().filter(|l| hand_written_labels(l)).count(),
        "the baseline computes the same predicate"
    );
    assert_eq!(
        fields.iter().filter(|f| field_selector.matches(*f)).count(),
        fields.iter().filter(|f| hand_written_fields(f)).count(),
        "the baseline computes the same predicate"
    );

    c.bench_function("selectors/label/parse", |b| {
        b.iter(|| LabelSelector::parse(black_box(LABEL_SELECTOR)))
    });
    c.bench_function("selectors/label/parse_and_match_10k", |b| {
        b.iter(|| {
            let selector = LabelSelector::parse(black_box(LABEL_SELECTOR)).expect("parses");
            labels.iter().filter(|l| selector.matches(*l)).count()
        })
    });
    c.bench_function("selectors/label/hand_written_10k", |b| {
        b.iter(|| {
            black_box(&labels)
                .iter()
                .filter(|l| hand_written_labels(l))
                .count()
        })
    });

    c.bench_function("selectors/field/parse", |b| {
        b.iter(|| FieldSelector::parse(black_box(FIELD_SELECTOR)))
    });
    c.bench_function("selectors/field/parse_and_match_10k", |b| {
        b.iter(|| {
            let selector = FieldSelector::parse(black_box(FIELD_SELECTOR)).expect("parses");
            fields.iter().filter(|f| selector.matches(*f)).count()
        })
    });
    c.bench_function("selectors/field/hand_written_10k", |b| {
        b.iter(|| {
            black_box(&fields)
                .iter()
                .filter(|f| hand_written_fields(f))
                .count()
        })
    });
}

criterion_group!(benches, selectors);
criterion_main!(benches);
