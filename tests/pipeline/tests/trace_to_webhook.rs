//! One W3C trace from the producer's span through the relay process and the consumer's handler,
//! which creates a notification, to the notifier's webhook: every hop exported over OTLP/HTTP to
//! a receiver inside the test, with real PostgreSQL and RabbitMQ, and the webhook caught by an
//! HTTP server in the test. Prints the span tree (run with `--nocapture` to see it).

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use consumer_lib::{Consumer, Handler, HandlerError, Message};
use integration_tests::otlp::{Receiver, render_tree};
use integration_tests::trace::{Relay, find, relay_binary, traceparent_ids, wait_for_queue};
use integration_tests::{fresh_db, unique_name};
use sqlx::PgTransaction;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

const WAIT: Duration = Duration::from_secs(30);

/// Creates a webhook notification in the handler's transaction: it stores the handler span's
/// trace context.
struct Notify;

impl Handler for Notify {
    type Payload = serde_json::Value;

    async fn handle(
        &self,
        message: &Message<serde_json::Value>,
        tx: &mut PgTransaction<'static>,
    ) -> Result<(), HandlerError> {
        let n = notifier::NewNotification::json("partner", "order.placed", &message.payload)
            .map_err(|e| HandlerError::reject(e.to_string()))?
            .with_dedupe_key(message.id.to_string());
        notifier::send(tx, &n)
            .await
            .map_err(|e| HandlerError::retry(e.to_string()))?;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_trace_runs_from_producer_to_the_notifiers_webhook() {
    let relay_binary = relay_binary();
    let receiver = Receiver::start().await;
    let mut options = telemetry::Options::from_lookup("trace-test", "warn", |_| None).stderr();
    options.traces_endpoint = Some(receiver.traces_url());
    let guard = telemetry::init(options).expect("tracing set-up");

    // The partner: records each webhook's traceparent.
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post({
            let seen = seen.clone();
            move |headers: axum::http::HeaderMap| async move {
                let tp = headers
                    .get("traceparent")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                seen.lock().unwrap().push(tp);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let db = fresh_db().await;
    let mut conn = db.pool.acquire().await.unwrap();
    notifier::EndpointSpec::new("partner", &hook_url, "a-secret-of-sixteen-bytes")
        .upsert(&mut conn, Duration::from_secs(3600))
        .await
        .unwrap();
    drop(conn);
    let queue = unique_name("trace-hook");
    let consumer = Consumer::builder("notify-partner")
        .amqp_url(integration_tests::amqp_url())
        .database(db.pool.clone())
        .queue(&queue)
        .handler(Notify)
        .build()
        .unwrap();
    let stop = CancellationToken::new();
    let consuming = tokio::spawn(consumer.run(stop.clone()));
    let worker = notifier::Worker::new(
        db.pool.clone(),
        notifier::WorkerConfig {
            poll_interval: Duration::from_millis(20),
            ..notifier::WorkerConfig::default()
        },
    )
    .unwrap();
    let delivering = tokio::spawn(worker.run(stop.clone()));
    wait_for_queue(&queue, WAIT).await;

    let outbox = outbox::Outbox::new(db.pool.clone()).await.unwrap();
    let place_order = tracing::info_span!("place_order", order_id = 43);
    let producer = telemetry::context_of(&place_order).expect("the producer span has a context");
    async {
        let mut tx = db.pool.begin().await.unwrap();
        let msg = outbox::Message::json("", &queue, &serde_json::json!({"order": 43})).unwrap();
        outbox.enqueue(&mut tx, &msg).await.unwrap();
        tx.commit().await.unwrap();
    }
    .instrument(place_order.clone())
    .await;
    drop(place_order);
    let (trace_id, _) = traceparent_ids(&producer.0);
    // A message whose stored traceparent is malformed (a SQL caller's typo): ignored on the way
    // (W3C: a receiver drops a malformed traceparent), and the notification is still created.
    let malformed = {
        let mut tx = db.pool.begin().await.unwrap();
        let msg = outbox::Message::json("", &queue, &serde_json::json!({"order": 44}))
            .unwrap()
            .with_header("traceparent", "00-not-a-trace-01");
        let id = outbox.enqueue(&mut tx, &msg).await.unwrap();
        tx.commit().await.unwrap();
        id
    };

    let _relay = Relay(
        Command::new(&relay_binary)
            .arg("run")
            .env("DATABASE_URL", &db.url)
            .env("AMQP_URL", integration_tests::amqp_url())
            .env("RELAY_HTTP_ADDR", "127.0.0.1:0")
            .env("RUST_LOG", "error")
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint)
            .env("OTEL_SERVICE_NAME", "outbox-relay")
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn outbox-relay"),
    );

    let webhook = {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let found = {
                let seen = seen.lock().unwrap();
                let traced = seen.iter().find(|tp| tp.contains(&trace_id)).cloned();
                traced.filter(|_| seen.len() == 2)
            };
            if let Some(tp) = found {
                break tp;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the two webhooks never arrived: {:?}",
                seen.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    guard.flush();
    let (consume, deliver) = receiver
        .wait_for(WAIT, "consumer and delivery spans of the trace", |spans| {
            find(spans, &trace_id, "outbox.publish")?;
            let consume = find(spans, &trace_id, "consumer.message")?.clone();
            let deliver = find(spans, &trace_id, "notifier.deliver")?.clone();
            Some((consume, deliver))
        })
        .await;
    println!("{}", render_tree(&receiver.spans(), &trace_id));

    let stored: String =
        sqlx::query_scalar("SELECT traceparent FROM notify.notifications WHERE dedupe_key <> $1")
            .bind(malformed.0.to_string())
            .fetch_one(&db.pool)
            .await
            .unwrap();
    // Its webhook arrived (two seen above); the worker records the outcome right after.
    let other = {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (other, status): (Option<String>, String) = sqlx::query_as(
                "SELECT traceparent, status FROM notify.notifications WHERE dedupe_key = $1",
            )
            .bind(malformed.0.to_string())
            .fetch_one(&db.pool)
            .await
            .unwrap();
            if status == "delivered" {
                break other;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the malformed message's notification is {status}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let other = other.expect("a fresh trace context for the malformed message's notification");
    assert!(notifier::valid_traceparent(&other), "{other}");
    assert_ne!(traceparent_ids(&other).0, trace_id);
    let (stored_trace, stored_parent) = traceparent_ids(&stored);
    assert_eq!(stored_trace, trace_id, "the notification stores the trace");
    // The handler ran in a child of the consumer span, or in it.
    let handler_span = receiver
        .spans()
        .into_iter()
        .find(|s| s.span_id == stored_parent)
        .expect("the stored parent is an exported span");
    assert!(
        handler_span.span_id == consume.span_id || handler_span.parent_span_id == consume.span_id,
        "the notification was created inside the consumer span: {handler_span:?}"
    );
    assert_eq!(
        deliver.parent_span_id, stored_parent,
        "the delivery span is a child of the stored context"
    );
    assert_eq!(
        traceparent_ids(&webhook),
        (trace_id.clone(), deliver.span_id.clone()),
        "the webhook carries the delivery span"
    );

    stop.cancel();
    consuming.await.unwrap().unwrap();
    delivering.await.unwrap();
}
