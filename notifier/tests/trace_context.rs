//! A webhook carries the W3C `traceparent` of the notifier's delivery span when spans are
//! exported (here to an OTLP/HTTP receiver inside the test).

mod common;

use std::time::Duration;

use common::*;
use integration_tests::fresh_db;
use integration_tests::otlp::{Receiver as Collector, render_tree};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_carries_the_traceparent_of_its_delivery_span() {
    let collector = Collector::start().await;
    let mut options = telemetry::Options::from_lookup("notifier", "warn", |_| None).stderr();
    options.traces_endpoint = Some(collector.traces_url());
    let guard = telemetry::init(options).expect("tracing set-up");

    let db = fresh_db().await;
    let rx = Receiver::start(vec![], Answer::status(200)).await;
    endpoint(&db.pool, "partner", &rx.url(), SECRET, None).await;
    let id = send_json(&db.pool, "partner", serde_json::json!({"order": 42})).await;
    let worker = RunningWorker::start(&db.pool, worker_config(0.001));
    wait_status(&db.pool, id, "delivered", Duration::from_secs(10)).await;
    worker.stop().await;

    let tp = rx.seen_for(id)[0].header("traceparent");
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "webhook traceparent {tp:?}");
    guard.flush();
    let deliver = collector
        .wait_for(Duration::from_secs(20), "the delivery span", |spans| {
            spans
                .iter()
                .find(|s| s.name == "notifier.deliver" && s.trace_id == parts[1])
                .cloned()
        })
        .await;
    println!("{}", render_tree(&collector.spans(), parts[1]));
    assert_eq!(
        parts[2], deliver.span_id,
        "the webhook's parent is the delivery span"
    );
    assert!(
        deliver
            .attributes
            .iter()
            .any(|(k, v)| k == "notification_id" && *v == id.to_string()),
        "{:?}",
        deliver.attributes
    );
}
