//! A caller's W3C `traceparent` reaches the upstream in the same trace, with the gateway's own
//! span as parent; the gateway's spans, exported over OTLP/HTTP to a receiver in the test,
//! chain caller → `gateway.request` → `gateway.upstream`.

mod common;

use std::time::Duration;

use common::{Upstream, client, header_lines, start_gateway};
use integration_tests::fresh_db;
use integration_tests::otlp::{Receiver, render_tree};

const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_a_traceparent_reaches_the_upstream_under_a_gateway_span() {
    let receiver = Receiver::start().await;
    let mut options = telemetry::Options::from_lookup("gateway", "warn", |_| None).stderr();
    options.traces_endpoint = Some(receiver.traces_url());
    let guard = telemetry::init(options).expect("tracing set-up");

    let upstream = Upstream::start().await;
    let db = fresh_db().await;
    let toml = format!(
        "{}[[routes]]\nprefix = \"/pay\"\nupstream = \"{}\"\n",
        header_lines(&db.url),
        upstream.url()
    );
    let gw = start_gateway(&toml).await;
    let r = client()
        .post(gw.url("/pay/charge"))
        .header("traceparent", format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01"))
        .header("tracestate", "vendor=abc")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let seen = upstream.seen();
    let forwarded = seen[0].headers["traceparent"].to_str().unwrap().to_owned();
    let parts: Vec<&str> = forwarded.split('-').collect();
    assert_eq!(parts.len(), 4, "{forwarded}");
    assert_eq!(
        parts[1], CALLER_TRACE,
        "the upstream call stays in the caller's trace"
    );
    assert_ne!(
        parts[2], CALLER_SPAN,
        "the parent is the gateway's span, not the caller's"
    );
    assert_eq!(parts[3], "01", "the caller's sampled flag is kept");
    assert_eq!(seen[0].headers["tracestate"], "vendor=abc");

    guard.flush();
    let (request, upstream_span) = receiver
        .wait_for(Duration::from_secs(20), "the gateway's spans", |spans| {
            let find = |name: &str| {
                spans
                    .iter()
                    .find(|s| s.trace_id == CALLER_TRACE && s.name == name)
                    .cloned()
            };
            Some((find("gateway.request")?, find("gateway.upstream")?))
        })
        .await;
    println!("{}", render_tree(&receiver.spans(), CALLER_TRACE));
    assert_eq!(request.parent_span_id, CALLER_SPAN);
    assert_eq!(upstream_span.parent_span_id, request.span_id);
    assert_eq!(
        parts[2], upstream_span.span_id,
        "the upstream's parent is the gateway's upstream span"
    );
}
