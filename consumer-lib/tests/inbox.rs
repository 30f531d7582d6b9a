//! Effects exactly once: duplicates, redeliveries, panics, retries, dead letters and replay,
//! against the real broker and database.

mod common;

use std::time::Duration;

use common::*;
use consumer_lib::dead_letter;

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn message_delivered_three_times_is_applied_once() {
    let (db, publisher, queue, exchange) = setup().await;
    let consumer = builder(&db.pool, &queue, &exchange)
        .handler(Recorder { jitter_ms: 0 })
        .build()
        .expect("valid consumer");
    let (token, task) = spawn(consumer);

    // Three copies at once: they run concurrently and meet on the inbox key.
    for _ in 0..3 {
        publisher
            .publish(&exchange, 42, &payload("a", 1, "slow"), false)
            .await;
    }
    wait_until("the first copy to apply", WAIT, || async {
        effect_count(&db.pool, 42).await == 1
    })
    .await;
    // And a copy arriving much later, after the first committed.
    publisher
        .publish(&exchange, 42, &payload("a", 1, ""), false)
        .await;
    publisher
        .publish(&exchange, 43, &payload("b", 1, ""), false)
        .await;
    wait_until("the later message to apply", WAIT, || async {
        effect_count(&db.pool, 43).await == 1
    })
    .await;
    // Graceful stop finishes whatever is in flight; every copy must have been acked.
    stop(token, task).await;
    assert_eq!(publisher.ready(&queue).await, 0, "every copy was acked");
    assert_eq!(effect_count(&db.pool, 42).await, 1, "effect applied once");
    assert!(
        consumer_lib::inbox::is_done(&db.pool, &queue, 42)
            .await
            .unwrap()
    );
    publisher.cleanup(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn handler_panic_is_retried_not_lost() {
    let (db, publisher, queue, exchange) = setup().await;
    let consumer = builder(&db.pool, &queue, &exchange)
        .handler(Recorder { jitter_ms: 0 })
        .build()
        .unwrap();
    let (token, task) = spawn(consumer);
    publisher
        .publish(&exchange, 7, &payload("a", 1, "panic_once"), false)
        .await;
    publisher
        .publish(&exchange, 8, &payload("a", 2, "fail_twice"), false)
        .await;
    wait_until("both messages to apply after retries", WAIT, || async {
        effect_count(&db.pool, 7).await == 1 && effect_count(&db.pool, 8).await == 1
    })
    .await;
    stop(token, task).await;
    let attempts: Vec<i32> = sqlx::query_scalar("SELECT attempt FROM effects ORDER BY message_id")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        attempts,
        vec![2, 3],
        "the panic cost one attempt, two failures two"
    );
    assert_eq!(total_effects(&db.pool).await, 2);
    assert!(
        dead_letter::list(&db.pool, Some(&queue), true, 10)
            .await
            .unwrap()
            .is_empty()
    );
    publisher.cleanup(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_payload_is_dead_lettered_once_with_its_reason() {
    let (db, publisher, queue, exchange) = setup().await;
    let consumer = builder(&db.pool, &queue, &exchange)
        .dead_letter_queue(true)
        .handler(Recorder { jitter_ms: 0 })
        .build()
        .unwrap();
    let (token, task) = spawn(consumer);
    let poison = b"{\"key\": \"a\", \"seq\": \"not a number\"";
    // Delivered twice (a producer retry): still one compensation-log row.
    publisher
        .publish_raw(&exchange, Some(99), poison, None)
        .await;
    publisher
        .publish_raw(&exchange, Some(99), poison, None)
        .await;
    publisher
        .publish(&exchange, 100, &payload("a", 1, ""), false)
        .await;
    wait_until(
        "the poison message in the compensation log",
        WAIT,
        || async {
            !dead_letter::list(&db.pool, Some(&queue), true, 10)
                .await
                .unwrap()
                .is_empty()
                && effect_count(&db.pool, 100).await == 1
        },
    )
    .await;
    // The second copy must be settled too before counting rows.
    wait_until(
        "both copies to reach the dead-letter queue or be skipped",
        WAIT,
        || async { publisher.ready(&queue).await == 0 },
    )
    .await;
    stop(token, task).await;

    let rows = dead_letter::list(&db.pool, Some(&queue), true, 10)
        .await
        .unwrap();
    assert_eq!(rows.len(), 1, "dead-lettered once: {rows:?}");
    let row = &rows[0];
    assert_eq!(row.message_id, Some(99));
    assert_eq!(row.reason, "undecodable");
    assert!(
        row.last_error.contains("does not decode"),
        "{}",
        row.last_error
    );
    assert_eq!(row.payload, poison.to_vec());
    assert_eq!(row.attempts, 1);
    assert_eq!(
        row.headers["source"], "test",
        "headers kept: {}",
        row.headers
    );
    assert_eq!(effect_count(&db.pool, 99).await, 0, "the handler never ran");
    assert!(
        publisher.ready(&format!("{queue}.dead")).await >= 1,
        "copied to the dead-letter queue"
    );
    publisher.cleanup(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rejected_and_exhausted_messages_are_dead_lettered_and_replayable() {
    let (db, publisher, queue, exchange) = setup().await;
    let consumer = builder(&db.pool, &queue, &exchange)
        .retry(fast_retry(3))
        .handler(Recorder { jitter_ms: 0 })
        .build()
        .unwrap();
    let (token, task) = spawn(consumer);
    publisher
        .publish(&exchange, 1, &payload("a", 1, "reject"), false)
        .await;
    publisher
        .publish(&exchange, 2, &payload("a", 2, "always_fail"), false)
        .await;
    publisher.publish_raw(&exchange, None, b"{}", None).await;
    wait_until("three dead letters", WAIT, || async {
        dead_letter::list(&db.pool, Some(&queue), false, 10)
            .await
            .unwrap()
            .len()
            == 3
    })
    .await;
    let rows = dead_letter::list(&db.pool, Some(&queue), false, 10)
        .await
        .unwrap();
    let by_id = |id: Option<i64>| rows.iter().find(|r| r.message_id == id).unwrap();
    let rejected = by_id(Some(1));
    assert_eq!(
        (rejected.reason.as_str(), rejected.attempts),
        ("rejected", 1)
    );
    assert_eq!(rejected.last_error, "order total is negative");
    let exhausted = by_id(Some(2));
    assert_eq!(
        (exhausted.reason.as_str(), exhausted.attempts),
        ("exhausted", 3)
    );
    assert_eq!(
        exhausted.routing_key, "order.created",
        "original routing key kept across retries"
    );
    assert_eq!(exhausted.exchange, exchange);
    assert_eq!(by_id(None).reason, "invalid");
    assert_eq!(total_effects(&db.pool).await, 0);

    // Replay through the CLI after "fixing" the handler: the payload no longer fails.
    sqlx::query("UPDATE inbox.compensation_log SET payload = convert_to('{\"key\":\"a\",\"seq\":2}', 'UTF8') WHERE id = $1")
        .bind(exhausted.id)
        .execute(&db.pool)
        .await
        .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_consumer-dead"))
        .env("DATABASE_URL", &db.url)
        .args(["replay", &exhausted.id.to_string()])
        .output()
        .expect("run consumer-dead");
    assert!(
        output.status.success(),
        "replay: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    wait_until("the replayed message to apply", WAIT, || async {
        effect_count(&db.pool, 2).await == 1
    })
    .await;
    let listed = std::process::Command::new(env!("CARGO_BIN_EXE_consumer-dead"))
        .env("DATABASE_URL", &db.url)
        .args(["list", "--consumer", &queue])
        .output()
        .expect("run consumer-dead");
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.status.success());
    assert!(
        text.contains("rejected") && !text.contains("exhausted"),
        "{text}"
    );
    stop(token, task).await;
    let replayed = dead_letter::get(&db.pool, exhausted.id)
        .await
        .unwrap()
        .unwrap();
    assert!(replayed.replayed_at.is_some());
    publisher.cleanup(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_inbox_rows_are_purged_in_batches() {
    let db = integration_tests::fresh_db().await;
    sqlx::query(
        "INSERT INTO inbox.processed (consumer, message_id, processed_at) \
         SELECT 'c', g, now() - interval '2 days' FROM generate_series(1, 250) g \
         UNION ALL SELECT 'c', g, now() FROM generate_series(251, 260) g \
         UNION ALL SELECT 'other', g, now() - interval '2 days' FROM generate_series(1, 5) g",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let purged = consumer_lib::inbox::purge(&db.pool, "c", Duration::from_secs(86_400), 100)
        .await
        .unwrap();
    assert_eq!(purged, 250);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox.processed")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(left, 15, "recent rows and other consumers' rows stay");
}

#[tokio::test]
async fn invalid_settings_are_refused_naming_the_field() {
    let db = integration_tests::fresh_db().await;
    let base = || {
        consumer_lib::Consumer::builder("inventory")
            .amqp_url(integration_tests::amqp_url())
            .database(db.pool.clone())
            .handler(Recorder { jitter_ms: 0 })
    };
    let err = |b: consumer_lib::ConsumerBuilder| b.build().unwrap_err().to_string();
    assert!(err(base().prefetch(0)).contains("prefetch"));
    assert!(err(base().concurrency(0)).contains("concurrency"));
    assert!(err(base().queue("orders.#")).contains("queue"));
    assert!(err(base().amqp_url("http://x")).contains("amqp_url"));
    assert!(err(base().inbox_retention(Duration::from_secs(1))).contains("inbox_retention"));
    assert!(
        err(base().retry(consumer_lib::RetryPolicy::default().max_attempts(0)))
            .contains("max_attempts")
    );
    assert!(base().build().is_ok());
}

/// Records message ids in memory: a handler with no database of its own.
struct InMemory(std::sync::Arc<std::sync::Mutex<Vec<i64>>>);

impl consumer_lib::PlainHandler for InMemory {
    type Payload = Payload;

    async fn handle(
        &self,
        message: &consumer_lib::Message<Payload>,
    ) -> Result<(), consumer_lib::HandlerError> {
        self.0.lock().unwrap().push(message.id);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn handler_without_inbox_is_plain_at_least_once() {
    let (db, publisher, queue, exchange) = setup().await;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let consumer = builder(&db.pool, &queue, &exchange)
        .handler_without_inbox(InMemory(seen.clone()))
        .build()
        .unwrap();
    let (token, task) = spawn(consumer);
    publisher
        .publish(&exchange, 11, &payload("a", 1, ""), false)
        .await;
    publisher
        .publish(&exchange, 11, &payload("a", 1, ""), false)
        .await;
    wait_until("both copies handled", WAIT, || async {
        seen.lock().unwrap().len() == 2
    })
    .await;
    stop(token, task).await;
    assert_eq!(
        *seen.lock().unwrap(),
        vec![11, 11],
        "no deduplication without the inbox"
    );
    assert!(
        !consumer_lib::inbox::is_done(&db.pool, &queue, 11)
            .await
            .unwrap(),
        "no inbox row"
    );
    publisher.cleanup(&queue).await;
}
