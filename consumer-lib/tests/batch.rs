//! Batching (`batch_size` > 1): a backlog commits in fewer transactions than messages, still
//! exactly once; a failing message in a batch rolls the batch back and runs alone, without
//! costing the others anything.

mod common;

use std::time::Duration;

use common::*;
use consumer_lib::dead_letter;

const WAIT: Duration = Duration::from_secs(30);

/// How many transactions inserted the effect rows (rows are never updated, so `xmin` is the
/// inserting transaction).
async fn effect_transactions(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(DISTINCT xmin::text) FROM effects")
        .fetch_one(pool)
        .await
        .expect("count transactions")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backlog_commits_in_batches_and_applies_each_message_once() {
    let (db, publisher, queue, exchange) = setup().await;
    // Declared and bound by `setup`, filled before the consumer starts: a backlog.
    for id in 1..=300 {
        publisher
            .publish(&exchange, id, &payload("k", id, ""), false)
            .await;
    }
    // Redeliveries of the first 50, some of which land in the same batch as their original.
    for id in 1..=50 {
        publisher
            .publish(&exchange, id, &payload("k", id, ""), false)
            .await;
    }
    let consumer = builder(&db.pool, &queue, &exchange)
        .batch_size(50)
        .concurrency(4)
        .handler(Recorder { jitter_ms: 0 })
        .build()
        .expect("valid consumer");
    let (token, task) = spawn(consumer);
    wait_until(
        "300 messages applied and every copy acked",
        WAIT,
        || async { distinct_effects(&db.pool).await == 300 && publisher.ready(&queue).await == 0 },
    )
    .await;
    stop(token, task).await;
    assert_eq!(publisher.ready(&queue).await, 0, "every copy was acked");
    assert_eq!(
        total_effects(&db.pool).await,
        300,
        "each message applied once"
    );
    let inbox: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox.processed WHERE consumer = $1")
        .bind(&queue)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(inbox, 300);
    let transactions = effect_transactions(&db.pool).await;
    assert!(
        transactions * 2 <= 300,
        "300 messages took {transactions} transactions: no batching"
    );
    publisher.cleanup(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failing_message_runs_alone_and_the_rest_of_its_batch_applies() {
    let (db, publisher, queue, exchange) = setup().await;
    for id in 1..=100 {
        let behavior = match id {
            37 => "reject",
            38 => "fail_twice",
            _ => "",
        };
        publisher
            .publish(&exchange, id, &payload("k", id, behavior), false)
            .await;
    }
    let consumer = builder(&db.pool, &queue, &exchange)
        .retry(fast_retry(4))
        .batch_size(50)
        .concurrency(2)
        .handler(Recorder { jitter_ms: 0 })
        .build()
        .expect("valid consumer");
    let (token, task) = spawn(consumer);
    wait_until("99 applied and one dead letter", WAIT, || async {
        distinct_effects(&db.pool).await == 99
            && dead_letter::list(&db.pool, Some(&queue), false, 10)
                .await
                .unwrap()
                .len()
                == 1
    })
    .await;
    stop(token, task).await;
    assert_eq!(total_effects(&db.pool).await, 99, "nothing applied twice");
    assert_eq!(
        effect_count(&db.pool, 37).await,
        0,
        "the rejected one never applied"
    );
    let attempt: i32 = sqlx::query_scalar("SELECT attempt FROM effects WHERE message_id = 38")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        attempt, 3,
        "retries count per message: two failures, applied on the third attempt"
    );
    let dead = dead_letter::list(&db.pool, Some(&queue), false, 10)
        .await
        .unwrap();
    assert_eq!(dead[0].message_id, Some(37));
    assert_eq!((dead[0].reason.as_str(), dead[0].attempts), ("rejected", 1));
    assert_eq!(publisher.ready(&queue).await, 0);
    publisher.cleanup(&queue).await;
}

#[tokio::test]
async fn batch_size_is_checked_naming_the_field() {
    let db = integration_tests::fresh_db().await;
    let base = || {
        consumer_lib::Consumer::builder("inventory")
            .amqp_url(integration_tests::amqp_url())
            .database(db.pool.clone())
            .prefetch(100)
    };
    let err = |b: consumer_lib::ConsumerBuilder| b.build().unwrap_err().to_string();
    let with_inbox = || base().handler(Recorder { jitter_ms: 0 });
    assert!(err(with_inbox().batch_size(0)).contains("batch_size"));
    assert!(err(with_inbox().batch_size(101)).contains("batch_size"));
    assert!(with_inbox().batch_size(100).build().is_ok());
    let without_inbox = base()
        .handler_without_inbox(Counting)
        .batch_size(10)
        .build()
        .unwrap_err()
        .to_string();
    assert!(without_inbox.contains("batch_size"), "{without_inbox}");
}

struct Counting;

impl consumer_lib::PlainHandler for Counting {
    type Payload = Payload;

    async fn handle(
        &self,
        _message: &consumer_lib::Message<Payload>,
    ) -> Result<(), consumer_lib::HandlerError> {
        Ok(())
    }
}
