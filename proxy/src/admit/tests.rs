use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use http::{header, HeaderMap};
use http_body::Frame;
use http_body_util::BodyExt;
use kache_config::{
    ClassConfig, ClassLimits, ClientKeyConfig, ClientMatch, LimitsConfig, DEFAULT_CLASS, EXEMPT_CLASS,
};
use prometheus_client::registry::Registry;
use tokio::time::Instant;

use super::*;
use crate::body::{Body, BoxError};

const SERVICE: Duration = Duration::from_millis(100);

fn limits(seats: usize, per_client: usize, queue_length: usize) -> ClassLimits {
    ClassLimits {
        seats,
        max_in_flight_per_client: per_client,
        queue_length,
        queue_timeout: Duration::from_secs(15),
        max_long_running_per_client: 2,
    }
}

fn config(seats: usize, per_client: usize, queue_length: usize) -> LimitsConfig {
    LimitsConfig {
        max_in_flight: seats,
        default: limits(seats, per_client, queue_length),
        classes: Vec::new(),
        exempt: ClientMatch::default(),
        client_key: ClientKeyConfig::default(),
    }
}

fn limiter(config: &LimitsConfig) -> (Arc<Limiter>, Registry) {
    let mut registry = Registry::with_prefix("kache");
    let metrics = AdmitMetrics::register(&mut registry);
    (Arc::new(Limiter::new(config, metrics)), registry)
}

fn short(client: &ClientKey) -> Demand<'_> {
    Demand {
        client,
        user: None,
        user_agent: Some("kubectl/v1.30.0"),
        path: "/api/v1/pods",
        long_running: false,
    }
}

fn watch(client: &ClientKey) -> Demand<'_> {
    Demand {
        long_running: true,
        ..short(client)
    }
}

/// (seats in use, requests queued, active clients) of a class.
fn counts(limiter: &Limiter, class: &str) -> (usize, usize, usize) {
    let table = limiter.table.read().expect("lock");
    let class = table.find(class).expect("class exists").clone();
    let state = class.lock();
    (state.executing, state.queued, state.flows.len())
}

fn rejection(result: Result<Permit, Rejected>) -> (RejectReason, u32) {
    match result {
        Err(Rejected {
            reason, retry_after, ..
        }) => (reason, retry_after),
        other => panic!("expected a rejection, got {other:?}"),
    }
}

fn admitted(result: Option<Result<Permit, Rejected>>) -> Permit {
    match result {
        Some(Ok(permit)) => permit,
        other => panic!("expected an immediate admission, got {other:?}"),
    }
}

/// A streamed body holding `permit`, fed through the returned sender.
fn streamed(permit: Permit) -> (futures::channel::mpsc::UnboundedSender<Bytes>, Body) {
    let (tx, rx) = futures::channel::mpsc::unbounded::<Bytes>();
    let stream = http_body_util::StreamBody::new(rx.map(|b| Ok::<_, BoxError>(Frame::data(b))));
    (tx, permit.attach(crate::body::stream(stream)))
}

fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).expect("encode");
    text
}

#[tokio::test(start_paused = true)]
async fn a_greedy_client_cannot_starve_a_polite_one() {
    let (limiter, registry) = limiter(&config(10, 100, 50));
    let client = |name: &'static str, requests: usize| {
        let limiter = limiter.clone();
        tokio::spawn(async move {
            let key = ClientKey::new(name);
            let mut outcomes = Vec::new();
            for _ in 0..requests {
                let asked = Instant::now();
                let outcome = match limiter.acquire(short(&key)).await {
                    Ok(permit) => {
                        let waited = asked.elapsed();
                        tokio::time::sleep(SERVICE).await;
                        drop(permit);
                        Ok(waited)
                    }
                    Err(error) => Err(rejection(Err(error))),
                };
                outcomes.push(outcome);
            }
            outcomes
        })
    };
    // 200 concurrent requests, one each; then 2 concurrent loops of 3
    // requests, arriving while the greedy backlog keeps every seat busy.
    let greedy: Vec<_> = (0..200).map(|_| client("greedy", 1)).collect();
    let polite: Vec<_> = (0..2).map(|_| client("polite", 3)).collect();
    let mut collect = Vec::new();
    for task in greedy.into_iter().chain(polite) {
        collect.push(task.await.expect("task"));
    }
    let (greedy, polite) = collect.split_at(200);
    let greedy: Vec<_> = greedy.iter().flatten().collect();
    let polite: Vec<_> = polite.iter().flatten().collect();

    assert_eq!(
        greedy.len() + polite.len(),
        206,
        "every request has exactly one outcome"
    );
    assert!(
        polite.iter().all(|o| o.is_ok()),
        "polite never rejected: {polite:?}"
    );
    let polite_wait = polite.iter().filter_map(|o| o.as_ref().ok()).max().expect("some");
    assert!(
        *polite_wait <= SERVICE,
        "the polite client waits at most for the next seat to free: {polite_wait:?}"
    );
    let greedy_admitted: Vec<_> = greedy.iter().filter_map(|o| o.as_ref().ok()).collect();
    let greedy_rejected: Vec<_> = greedy.iter().filter_map(|o| o.as_ref().err()).collect();
    assert_eq!(greedy_admitted.len(), 10 + 50, "10 seats, then its queue of 50");
    assert_eq!(greedy_rejected.len(), 140);
    assert!(greedy_rejected
        .iter()
        .all(|r| **r == (RejectReason::QueueFull, RETRY_AFTER_SECONDS)));
    let greedy_wait = greedy_admitted.iter().max().expect("some");
    assert!(**greedy_wait > *polite_wait, "{greedy_wait:?}");

    assert_eq!(counts(&limiter, DEFAULT_CLASS), (0, 0, 0), "nothing leaked");
    let text = encode(&registry);
    for line in [
        r#"kache_flowcontrol_dispatched_requests_total{class="default"} 66"#,
        r#"kache_flowcontrol_rejected_requests_total{class="default",reason="queue_full"} 140"#,
        r#"kache_flowcontrol_current_executing_requests{class="default"} 0"#,
        r#"kache_flowcontrol_current_inqueue_requests{class="default"} 0"#,
        r#"kache_flowcontrol_request_wait_duration_seconds_count{class="default",execute="true"} 66"#,
        r#"kache_flowcontrol_request_execution_seconds_count{class="default"} 66"#,
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }
    assert!(
        !text.contains("greedy") && !text.contains("polite"),
        "no client labels"
    );
}

#[tokio::test(start_paused = true)]
async fn a_client_over_its_in_flight_limit_queues_while_others_pass() {
    let (limiter, _registry) = limiter(&config(10, 2, 50));
    let (a, b) = (ClientKey::new("a"), ClientKey::new("b"));
    let first = admitted(limiter.acquire(short(&a)).now_or_never());
    let _second = admitted(limiter.acquire(short(&a)).now_or_never());
    let mut third = Box::pin(limiter.acquire(short(&a)));
    assert!(
        futures::poll!(&mut third).is_pending(),
        "over its cap, with seats free"
    );
    let _other = admitted(limiter.acquire(short(&b)).now_or_never());
    assert_eq!(counts(&limiter, DEFAULT_CLASS), (3, 1, 2));
    drop(first);
    let _third = third.await.expect("admitted once under its cap");
    assert_eq!(counts(&limiter, DEFAULT_CLASS), (3, 0, 2));
}

#[tokio::test(start_paused = true)]
async fn dropping_a_permit_after_success_releases_its_seat_to_the_next_waiter() {
    let (limiter, _registry) = limiter(&config(1, 1, 50));
    let (a, b) = (ClientKey::new("a"), ClientKey::new("b"));
    let permit = limiter.acquire(short(&a)).await.expect("admitted");
    let mut next = Box::pin(limiter.acquire(short(&b)));
    assert!(futures::poll!(&mut next).is_pending());
    drop(permit);
    let next = admitted(next.now_or_never());
    assert_eq!(next.class(), DEFAULT_CLASS);
    drop(next);
    assert_eq!(counts(&limiter, DEFAULT_CLASS), (0, 0, 0));
}

#[tokio::test(start_paused = true)]
async fn a_permit_is_released_when_the_handler_fails() {
    /// The handler's own failure (not a rejection by the limits).
    #[derive(Debug)]
    enum Failure {
        Rejected,
        Upstream,
    }
    async fn handler(limiter: &Limiter, key: &ClientKey) -> Result<(), Failure> {
        let _permit = limiter.acquire(short(key)).await.map_err(|_| Failure::Rejected)?;
        Err(Failure::Upstream)
    }
    let (limiter, _registry) = limiter(&config(1, 1, 0));
    let a = ClientKey::new("a");
    for _ in 0..3 {
        let error = handler(&limiter, &a).await.expect_err("fails");
        assert!(matches!(error, Failure::Upstream), "never a 429: {error:?}");
        assert_eq!(counts(&limiter, DEFAULT_CLASS), (0, 0, 0));
    }
}

#[tokio::test(start_paused = true)]
async fn a_request_dropped_while_queued_leaves_no_waiter_and_no_seat_behind() {
    let (limiter, registry) = limiter(&config(1, 1, 1));
    let (a, b) = (ClientKey::new("a"), ClientKey::new("b"));
    let held = limiter.acquire(short(&a)).await.expect("admitted");
    let mut queued = Box::pin(limiter.acquire(short(&b)));
    assert!(futures::poll!(&mut queued).is_pending());
    assert_eq!(counts(&limiter, DEFAULT_CLASS), (1, 1, 2));
    drop(queued); // the client disconnected
    assert_eq!(counts(&limiter, DEFAULT_CLASS), (1, 0, 1));
    // Its queue slot is free again (queue length 1)...
    let mut again = Box::pin(limiter.acquire(short(&b)));
    assert!(futures::poll!(&mut again).is_pending(), "queued, not rejected");
    // ...and the seat goes to the live waiter, not to the one that left.
    drop(held);
    drop(admitted(again.now_or_never()));
    assert_eq!(counts(&limiter, DEFAULT_CLASS), (0, 0, 0));
    let text = encode(&registry);
    assert!(
        text.contains(r#"kache_flowcontrol_current_inqueue_requests{class="default"} 0"#),
        "{text}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_seat_granted_to_a_request_dropped_before_it_noticed_is_given_back() {
    let (limiter, _registry) = limiter(&config(1, 1, 50));
    let (a, b, c) = (ClientKey::new("a"), ClientKey::new("b"), ClientKey::new("c"));
    let held = limiter.acquire(short(&a)).await.expect("admitted");
    let mut queued = Box::pin(limiter.acquire(short(&b)));
    assert!(futures::poll!(&mut queued).is_pending());
    drop(held); // grants the seat to `queued`, which is never polled again
    assert_eq!(counts(&limiter, DEFAULT_CLASS), (1, 0, 1));
    drop(queued);
    assert_eq!(counts(&limiter, DEFAULT_CLASS), (0, 0, 0), "the seat came back");
    drop(admitted(limiter.acquire(short(&c)).now_or_never()));
}

#[tokio::test(start_paused = true)]
async fn a_permit_held_by_a_body_is_released_at_the_end_of_the_body() {
    let (limiter, _registry) = limiter(&config(1, 1, 0));
    let a = ClientKey::new("a");

    // A body of known length ends with its last data frame.
    let permit = limiter.acquire(short(&a)).await.expect("admitted");
    let mut body = permit.attach(crate::body::full("{}"));
    assert_eq!(counts(&limiter, DEFAULT_CLASS).0, 1);
    let frame = body.frame().await.expect("a frame").expect("data");
    assert_eq!(frame.into_data().expect("data").into_bytes(), "{}");
    assert_eq!(
        counts(&limiter, DEFAULT_CLASS),
        (0, 0, 0),
        "released, body still alive"
    );
    assert!(body.frame().await.is_none());

    // A streamed body ends when its stream does.
    let permit = limiter.acquire(short(&a)).await.expect("admitted");
    let (tx, mut body) = streamed(permit);
    tx.unbounded_send(Bytes::from_static(b"event")).expect("send");
    body.frame().await.expect("a frame").expect("data");
    assert_eq!(counts(&limiter, DEFAULT_CLASS).0, 1, "held while streaming");
    drop(tx);
    assert!(body.frame().await.is_none());
    assert_eq!(counts(&limiter, DEFAULT_CLASS), (0, 0, 0), "released at the end");
}

#[tokio::test(start_paused = true)]
async fn a_permit_held_by_a_body_is_released_when_the_body_is_dropped_early() {
    let (limiter, _registry) = limiter(&config(1, 1, 0));
    let a = ClientKey::new("a");
    let permit = limiter.acquire(short(&a)).await.expect("admitted");
    let (tx, mut body) = streamed(permit);
    tx.unbounded_send(Bytes::from_static(b"partial")).expect("send");
    body.frame().await.expect("a frame").expect("data");
    assert_eq!(counts(&limiter, DEFAULT_CLASS).0, 1);
    drop(body); // the client went away mid-body
    assert_eq!(counts(&limiter, DEFAULT_CLASS), (0, 0, 0));
    drop(tx);
}

#[tokio::test(start_paused = true)]
async fn a_request_that_waits_too_long_is_rejected_with_reason_timeout() {
    let (limiter, registry) = limiter(&config(1, 1, 50));
    let (a, b) = (ClientKey::new("a"), ClientKey::new("b"));
    let _held = limiter.acquire(short(&a)).await.expect("admitted");
    let asked = Instant::now();
    let result = limiter.acquire(short(&b)).await;
    assert_eq!(
        asked.elapsed(),
        Duration::from_secs(15),
        "the class's queue timeout"
    );
    assert_eq!(rejection(result), (RejectReason::Timeout, RETRY_AFTER_SECONDS));
    assert_eq!(counts(&limiter, DEFAULT_CLASS), (1, 0, 1), "it left the queue");
    let text = encode(&registry);
    for line in [
        r#"kache_flowcontrol_rejected_requests_total{class="default",reason="timeout"} 1"#,
        r#"kache_flowcontrol_request_wait_duration_seconds_count{class="default",execute="false"} 1"#,
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }
}

#[tokio::test(start_paused = true)]
async fn long_running_requests_take_no_short_seats_and_have_their_own_per_client_cap() {
    let (limiter, registry) = limiter(&config(1, 1, 0));
    let (a, b) = (ClientKey::new("a"), ClientKey::new("b"));
    let _short = limiter.acquire(short(&a)).await.expect("admitted");
    let (reason, _) = rejection(limiter.acquire(short(&b)).await);
    assert_eq!(reason, RejectReason::QueueFull, "the short seats are saturated");

    let first = admitted(limiter.acquire(watch(&a)).now_or_never());
    let _second = admitted(limiter.acquire(watch(&a)).now_or_never());
    assert_eq!(
        rejection(limiter.acquire(watch(&a)).await),
        (RejectReason::LongRunningLimit, LONG_RUNNING_RETRY_AFTER_SECONDS)
    );
    let _other = admitted(limiter.acquire(watch(&b)).now_or_never());
    assert_eq!(counts(&limiter, DEFAULT_CLASS).0, 1, "watches took no seat");
    drop(first);
    let _again = admitted(limiter.acquire(watch(&a)).now_or_never());
    let text = encode(&registry);
    for line in [
        r#"kache_flowcontrol_current_long_running_requests{class="default"} 3"#,
        r#"kache_flowcontrol_rejected_requests_total{class="default",reason="long_running_limit"} 1"#,
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }
}

#[tokio::test(start_paused = true)]
async fn exempt_requests_bypass_the_limits_even_when_saturated() {
    let mut config = config(1, 1, 0);
    config.exempt = ClientMatch {
        users: vec!["admin".into()],
        user_agent_prefixes: vec!["kube-probe/".into()],
        path_prefixes: Vec::new(),
    };
    let (limiter, registry) = limiter(&config);
    let a = ClientKey::new("a");
    let _held = limiter.acquire(short(&a)).await.expect("admitted");
    let mut permits = Vec::new();
    for path in ["/livez", "/readyz", "/readyz/etcd", "/healthz", "/version"] {
        let demand = Demand { path, ..short(&a) };
        permits.push(admitted(limiter.acquire(demand).now_or_never()));
    }
    let by_user = Demand {
        user: Some("admin"),
        ..short(&a)
    };
    let by_agent = Demand {
        user_agent: Some("kube-probe/1.30"),
        long_running: true,
        ..short(&a)
    };
    for demand in [by_user, by_agent] {
        permits.push(admitted(limiter.acquire(demand).now_or_never()));
    }
    assert!(permits.iter().all(|p| p.class() == EXEMPT_CLASS));
    assert!(encode(&registry).contains(r#"kache_flowcontrol_current_executing_requests{class="exempt"} 7"#));
    let lookalike = Demand {
        path: "/livezz",
        ..short(&a)
    };
    assert_eq!(
        rejection(limiter.acquire(lookalike).await).0,
        RejectReason::QueueFull
    );
    drop(permits);
    assert!(encode(&registry).contains(r#"kache_flowcontrol_current_executing_requests{class="exempt"} 0"#));
}

#[tokio::test(start_paused = true)]
async fn raising_the_limits_admits_queued_requests_at_once() {
    let (limiter, registry) = limiter(&config(1, 1, 50));
    let (a, b, c) = (ClientKey::new("a"), ClientKey::new("b"), ClientKey::new("c"));
    let _held = limiter.acquire(short(&a)).await.expect("admitted");
    let mut queued = Box::pin(limiter.acquire(short(&b)));
    assert!(futures::poll!(&mut queued).is_pending());
    limiter.reconfigure(&config(3, 1, 50));
    let _queued = admitted(queued.now_or_never());
    let _new = admitted(limiter.acquire(short(&c)).now_or_never());
    assert_eq!(counts(&limiter, DEFAULT_CLASS), (3, 0, 3));
    assert!(encode(&registry).contains(r#"kache_flowcontrol_request_concurrency_limit{class="default"} 3"#));
}

#[tokio::test(start_paused = true)]
async fn lowering_the_limits_lets_running_and_queued_requests_complete() {
    let (limiter, _registry) = limiter(&config(3, 1, 50));
    let keys: Vec<_> = (0..5).map(|i| ClientKey::new(&format!("c{i}"))).collect();
    let mut running = Vec::new();
    for key in &keys[..3] {
        running.push(limiter.acquire(short(key)).await.expect("admitted"));
    }
    let mut before = Box::pin(limiter.acquire(short(&keys[3])));
    assert!(futures::poll!(&mut before).is_pending());

    limiter.reconfigure(&config(1, 1, 1));
    assert_eq!(counts(&limiter, DEFAULT_CLASS), (3, 1, 4), "nothing dropped");
    let mut after = Box::pin(limiter.acquire(short(&keys[4])));
    assert!(
        futures::poll!(&mut after).is_pending(),
        "over the new limit: queued"
    );
    running.pop();
    running.pop();
    assert!(futures::poll!(&mut before).is_pending(), "1 running, new limit 1");
    running.pop();
    let before = before.await.expect("the request queued before completes");
    assert!(futures::poll!(&mut after).is_pending());
    drop(before);
    drop(after.await.expect("the request queued after completes"));
    assert_eq!(counts(&limiter, DEFAULT_CLASS), (0, 0, 0));
}

fn with_ci_class(mut config: LimitsConfig, seats: usize) -> LimitsConfig {
    config.default.seats -= seats;
    config.classes.push(ClassConfig {
        name: "ci".into(),
        matches: ClientMatch {
            user_agent_prefixes: vec!["argocd/".into()],
            ..ClientMatch::default()
        },
        limits: limits(seats, 1, 50),
    });
    config
}

#[tokio::test(start_paused = true)]
async fn each_class_has_its_own_seats_and_queues() {
    let (limiter, registry) = limiter(&with_ci_class(config(2, 1, 50), 1));
    let (a, b, c) = (ClientKey::new("a"), ClientKey::new("b"), ClientKey::new("c"));
    let _default = limiter.acquire(short(&a)).await.expect("admitted");
    let mut waiting = Box::pin(limiter.acquire(short(&b)));
    assert!(
        futures::poll!(&mut waiting).is_pending(),
        "the default class's one seat is taken"
    );
    let ci = Demand {
        user_agent: Some("argocd/v2.9"),
        ..short(&c)
    };
    let in_ci = admitted(limiter.acquire(ci).now_or_never());
    assert_eq!(in_ci.class(), "ci");
    assert_eq!(counts(&limiter, "ci"), (1, 0, 1));
    assert_eq!(counts(&limiter, DEFAULT_CLASS), (1, 1, 2));
    drop(in_ci);
    assert!(
        futures::poll!(&mut waiting).is_pending(),
        "a ci seat is not a default seat"
    );
    assert!(encode(&registry).contains(r#"kache_flowcontrol_request_concurrency_limit{class="ci"} 1"#));
}

#[tokio::test(start_paused = true)]
async fn a_class_added_by_reconfiguration_takes_new_requests_only() {
    let (limiter, _registry) = limiter(&config(2, 1, 50));
    let (a, b, c) = (ClientKey::new("a"), ClientKey::new("b"), ClientKey::new("c"));
    let held = limiter.acquire(short(&a)).await.expect("admitted");
    let other = limiter.acquire(short(&c)).await.expect("admitted");
    let ci = Demand {
        user_agent: Some("argocd/v2.9"),
        ..short(&b)
    };
    let mut queued = Box::pin(limiter.acquire(ci));
    assert!(futures::poll!(&mut queued).is_pending(), "in the default class");

    limiter.reconfigure(&with_ci_class(config(2, 1, 50), 1));
    assert_eq!(
        counts(&limiter, DEFAULT_CLASS),
        (2, 1, 3),
        "the queued request stays"
    );
    let new_ci = admitted(limiter.acquire(ci).now_or_never());
    assert_eq!(new_ci.class(), "ci");
    drop(held);
    assert!(
        futures::poll!(&mut queued).is_pending(),
        "the default class now has one seat"
    );
    drop(other);
    assert_eq!(queued.await.expect("completes").class(), DEFAULT_CLASS);
}

#[test]
fn client_keys_prefer_the_user_then_the_token_then_address_and_user_agent() {
    let peer: SocketAddr = "127.0.0.1:50000".parse().expect("addr");
    let mut headers = HeaderMap::new();
    headers.insert(
        header::USER_AGENT,
        "kubectl/v1.30.0 (linux/amd64)".parse().expect("value"),
    );
    assert_eq!(
        ClientKey::identify(peer, &headers, None).as_str(),
        "127.0.0.1 kubectl/v1.30.0 (linux/amd64)"
    );
    let other_port: SocketAddr = "127.0.0.1:50001".parse().expect("addr");
    assert_eq!(
        ClientKey::identify(peer, &headers, None),
        ClientKey::identify(other_port, &headers, None),
        "one client over several connections"
    );

    headers.insert(
        header::AUTHORIZATION,
        "Bearer s3cret-token".parse().expect("value"),
    );
    let by_token = ClientKey::identify(peer, &headers, None);
    assert!(by_token.as_str().starts_with("token:"), "{by_token}");
    assert!(
        !by_token.as_str().contains("s3cret"),
        "the token itself never appears"
    );
    assert!(
        by_token.as_str().ends_with(" kubectl/v1.30.0 (linux/amd64)"),
        "{by_token}"
    );
    assert_eq!(
        by_token,
        ClientKey::identify(other_port, &headers, None),
        "stable"
    );
    headers.insert(header::AUTHORIZATION, "Bearer another".parse().expect("value"));
    assert_ne!(by_token, ClientKey::identify(peer, &headers, None));

    assert_eq!(
        ClientKey::identify(peer, &headers, Some("alice")).as_str(),
        "user:alice"
    );
    assert_eq!(
        ClientKey::identify(peer, &HeaderMap::new(), Some("")).as_str(),
        "127.0.0.1 -",
        "no user, no token, no User-Agent"
    );
}

#[test]
fn client_keys_are_bounded() {
    let long = "é".repeat(ClientKey::MAX_LEN);
    let key = ClientKey::new(&long);
    assert!(key.as_str().len() <= ClientKey::MAX_LEN);
    assert!(long.starts_with(key.as_str()), "cut at a character boundary");
    let peer: SocketAddr = "[::1]:1".parse().expect("addr");
    let mut headers = HeaderMap::new();
    headers.insert(header::USER_AGENT, "x".repeat(8192).parse().expect("value"));
    assert!(ClientKey::identify(peer, &headers, None).as_str().len() <= ClientKey::MAX_LEN);
}

#[test]
fn a_configured_client_id_header_and_the_user_agent_choice_shape_the_key() {
    let peer: SocketAddr = "127.0.0.1:4000".parse().expect("addr");
    let mut headers = HeaderMap::new();
    headers.insert(header::USER_AGENT, "kubectl/v1.32".parse().expect("value"));
    let by_header = ClientKeyConfig {
        header: Some("x-ci-job".into()),
        user_agent: true,
    };
    assert_eq!(
        ClientKey::identify_with(peer, &headers, None, &by_header).as_str(),
        "127.0.0.1 kubectl/v1.32"
    );
    headers.insert("x-ci-job", "job-17".parse().expect("value"));
    assert_eq!(
        ClientKey::identify_with(peer, &headers, None, &by_header).as_str(),
        "client:job-17"
    );
    assert_eq!(
        ClientKey::identify_with(peer, &headers, Some("alice"), &by_header).as_str(),
        "user:alice"
    );
    let without_agent = ClientKeyConfig {
        header: None,
        user_agent: false,
    };
    assert_eq!(
        ClientKey::identify_with(peer, &headers, None, &without_agent).as_str(),
        "127.0.0.1"
    );
}

#[test]
fn a_demand_reads_the_user_agent_from_the_headers() {
    let key = ClientKey::new("k");
    let mut headers = HeaderMap::new();
    headers.insert(header::USER_AGENT, "helm/3.14".parse().expect("value"));
    let demand = Demand::new(&key, Some("bob"), &headers, "/api", true);
    assert_eq!(
        (demand.user_agent, demand.user, demand.path, demand.long_running),
        (Some("helm/3.14"), Some("bob"), "/api", true)
    );
}
