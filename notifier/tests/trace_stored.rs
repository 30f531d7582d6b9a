//! A notification created with a W3C trace context is delivered inside that trace: the
//! notifier's delivery span (exported here to an OTLP/HTTP receiver inside the test) is a child
//! of the stored `traceparent`, and the webhook carries the delivery span as its parent.

mod common;

use std::time::Duration;

use common::*;
use integration_tests::fresh_db;
use integration_tests::otlp::{Receiver as Collector, render_tree};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_delivery_span_and_the_webhook_continue_the_stored_trace() {
    let collector = Collector::start().await;
    let mut options = telemetry::Options::from_lookup("notifier", "warn", |_| None).stderr();
    options.traces_endpoint = Some(collector.traces_url());
    let guard = telemetry::init(options).expect("tracing set-up");

    let db = fresh_db().await;
    let rx = Receiver::start(vec![], Answer::status(200)).await;
    endpoint(&db.pool, "partner", &rx.url(), SECRET, None).await;
    let traceparent = format!("00-{TRACE_ID}-{PARENT}-01");
    let id: i64 = sqlx::query_scalar(
        "SELECT notify.send('partner', 'order.paid', '{\"order\": 7}', \
         traceparent => $1, tracestate => 'vendor=abc')",
    )
    .bind(&traceparent)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let worker = RunningWorker::start(&db.pool, worker_config(0.001));
    wait_status(&db.pool, id, "delivered", Duration::from_secs(10)).await;
    worker.stop().await;

    let seen = &rx.seen_for(id)[0];
    let tp = seen.header("traceparent");
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "webhook traceparent {tp:?}");
    assert_eq!(
        parts[1], TRACE_ID,
        "the webhook stays in the stored trace: {tp}"
    );
    assert_ne!(parts[2], PARENT, "the webhook's parent is a new span: {tp}");
    assert_eq!(seen.header("tracestate"), "vendor=abc");

    guard.flush();
    let deliver = collector
        .wait_for(Duration::from_secs(20), "the delivery span", |spans| {
            spans
                .iter()
                .find(|s| s.name == "notifier.deliver" && s.trace_id == TRACE_ID)
                .cloned()
        })
        .await;
    println!("{}", render_tree(&collector.spans(), TRACE_ID));
    assert_eq!(
        deliver.parent_span_id, PARENT,
        "the delivery span is a child of the stored context"
    );
    assert_eq!(
        parts[2], deliver.span_id,
        "the webhook's parent is the delivery span"
    );
}
