//! One W3C trace from the producer's span through the relay process to the consumer's
//! handler, exported over OTLP/HTTP to a receiver inside the test, with real PostgreSQL and
//! RabbitMQ. Prints the span tree (run with `--nocapture` to see it).

use std::process::{Command, Stdio};
use std::time::Duration;

use consumer_lib::{Consumer, Handler, HandlerError, Message};
use integration_tests::otlp::{Receiver, render_tree};
use integration_tests::trace::{Relay, find, relay_binary, traceparent_ids, wait_for_queue};
use integration_tests::{fresh_db, unique_name};
use sqlx::PgTransaction;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

const WAIT: Duration = Duration::from_secs(30);

/// Records, per message, the `traceparent` it arrived with and that of the span the handler
/// runs in.
struct Record;

impl Handler for Record {
    type Payload = serde_json::Value;

    async fn handle(
        &self,
        message: &Message<serde_json::Value>,
        tx: &mut PgTransaction<'static>,
    ) -> Result<(), HandlerError> {
        let (current, _) = telemetry::context_of(&tracing::Span::current())
            .ok_or_else(|| HandlerError::reject("the handler's span has no trace context"))?;
        sqlx::query("INSERT INTO trace_seen (message_id, arrived, handler) VALUES ($1, $2, $3)")
            .bind(message.id)
            .bind(message.header_str("traceparent"))
            .bind(current)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_trace_runs_from_producer_through_relay_to_consumer() {
    let relay_binary = relay_binary();
    let receiver = Receiver::start().await;
    let mut options = telemetry::Options::from_lookup("trace-test", "warn", |_| None).stderr();
    options.traces_endpoint = Some(receiver.traces_url());
    let guard = telemetry::init(options).expect("tracing set-up");

    let db = fresh_db().await;
    sqlx::raw_sql(
        "CREATE TABLE trace_seen (message_id bigint PRIMARY KEY, arrived text, handler text NOT NULL)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let queue = unique_name("trace");
    let consumer = Consumer::builder("inventory")
        .amqp_url(integration_tests::amqp_url())
        .database(db.pool.clone())
        .queue(&queue)
        .handler(Record)
        .build()
        .unwrap();
    let stop = CancellationToken::new();
    let consuming = tokio::spawn(consumer.run(stop.clone()));
    wait_for_queue(&queue, WAIT).await;

    // The producer: a business span in which the message is enqueued and committed.
    let outbox = outbox::Outbox::new(db.pool.clone()).await.unwrap();
    let place_order = tracing::info_span!("place_order", order_id = 42);
    let producer = telemetry::context_of(&place_order).expect("the producer span has a context");
    let id = async {
        let mut tx = db.pool.begin().await.unwrap();
        let msg = outbox::Message::json("", &queue, &serde_json::json!({"order": 42})).unwrap();
        let id = outbox.enqueue(&mut tx, &msg).await.unwrap();
        tx.commit().await.unwrap();
        id
    }
    .instrument(place_order.clone())
    .await;
    drop(place_order);
    let (trace_id, producer_span) = traceparent_ids(&producer.0);

    // Stored with the row, before any relay runs: the producer span's context.
    let stored: serde_json::Value =
        sqlx::query_scalar("SELECT headers FROM outbox.messages WHERE id = $1")
            .bind(id.0)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(stored["traceparent"], producer.0.as_str(), "{stored}");

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

    let (arrived, handler): (Option<String>, String) = {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let row =
                sqlx::query_as("SELECT arrived, handler FROM trace_seen WHERE message_id = $1")
                    .bind(id.0)
                    .fetch_optional(&db.pool)
                    .await
                    .unwrap();
            if let Some(row) = row {
                break row;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "message {id} never handled"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    guard.flush();

    let (publish, consume) = receiver
        .wait_for(WAIT, "publish and consumer spans of the trace", |spans| {
            let publish = find(spans, &trace_id, "outbox.publish")?.clone();
            let consume = find(spans, &trace_id, "consumer.message")?.clone();
            find(spans, &trace_id, "place_order")?;
            Some((publish, consume))
        })
        .await;
    let spans = receiver.spans();
    println!("{}", render_tree(&spans, &trace_id));
    let producer_exported = find(&spans, &trace_id, "place_order").unwrap();

    assert_eq!(producer_exported.span_id, producer_span);
    assert_eq!(producer_exported.service, "trace-test");
    assert_eq!(publish.service, "outbox-relay");
    assert_eq!(
        publish.parent_span_id, producer_span,
        "the relay's publish span is the child of the producer's span"
    );
    assert!(
        publish
            .attributes
            .iter()
            .any(|(k, v)| k == "messaging.message.id" && *v == id.0.to_string()),
        "{:?}",
        publish.attributes
    );
    assert_eq!(
        consume.parent_span_id, publish.span_id,
        "the consumer's span is the child of the relay's publish span"
    );
    // On the wire: the relay sent its publish span's context, and the handler ran in the
    // consumer span.
    let arrived = arrived.expect("the message arrived with a traceparent");
    assert_eq!(
        traceparent_ids(&arrived),
        (trace_id.clone(), publish.span_id.clone())
    );
    assert_eq!(
        traceparent_ids(&handler),
        (trace_id.clone(), consume.span_id.clone())
    );

    stop.cancel();
    consuming.await.unwrap().unwrap();
}
