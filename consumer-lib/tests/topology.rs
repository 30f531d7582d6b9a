//! What the consumer declares on the broker: quorum queues with quorum delay levels, and a
//! clear error when the broker refuses the declared shape.

mod common;

use std::time::Duration;

use common::*;
use consumer_lib::lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
use consumer_lib::lapin::types::FieldTable;
use consumer_lib::lapin::{ExchangeKind, Queue};

async fn inspect(publisher: &Publisher, queue: &str) -> Option<Queue> {
    // A failed passive declare closes the channel, so inspect on a channel of its own.
    let channel = publisher.connection.create_channel().await.ok()?;
    let queue = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .ok();
    let _ = channel.close(200, "done".into()).await;
    queue
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quorum_consumer_declares_its_queue_and_retries_through_quorum_delay_levels() {
    let db = integration_tests::fresh_db().await;
    create_effects_table(&db.pool).await;
    let publisher = Publisher::connect().await;
    let queue = integration_tests::unique_name("cl_qq");
    let exchange = integration_tests::unique_name("cl_x");
    publisher
        .channel
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let consumer = builder(&db.pool, &queue, &exchange)
        .quorum(true)
        .handler(Recorder { jitter_ms: 0 })
        .build()
        .unwrap();
    let (token, task) = spawn(consumer);
    // Consuming means the queue, its binding and the delay levels are declared.
    wait_until(
        "the consumer to declare and consume",
        Duration::from_secs(20),
        || async {
            inspect(&publisher, &queue)
                .await
                .is_some_and(|q| q.consumer_count() == 1)
        },
    )
    .await;
    publisher
        .publish(&exchange, 1, &payload("a", 1, "fail_twice"), false)
        .await;
    publisher
        .publish(&exchange, 2, &payload("a", 2, ""), false)
        .await;
    wait_until("both applied", Duration::from_secs(20), || async {
        effect_count(&db.pool, 1).await == 1 && effect_count(&db.pool, 2).await == 1
    })
    .await;
    stop(token, task).await;
    let attempt: i32 = sqlx::query_scalar("SELECT attempt FROM effects WHERE message_id = 1")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        attempt, 3,
        "two delayed retries went through the quorum delay levels"
    );
    publisher.cleanup(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_queue_arguments_are_reported_not_retried() {
    let (db, publisher, queue, exchange) = setup().await;
    // The queue exists as a classic queue; asking for a quorum queue is a configuration error.
    let consumer = builder(&db.pool, &queue, &exchange)
        .quorum(true)
        .handler(Recorder { jitter_ms: 0 })
        .build()
        .unwrap();
    let result = tokio::time::timeout(
        Duration::from_secs(20),
        consumer.run(tokio_util::sync::CancellationToken::new()),
    )
    .await
    .expect("run returns instead of retrying forever");
    let err = result
        .expect_err("the broker refuses the declaration")
        .to_string();
    assert!(err.contains("declare queue"), "{err}");
    assert!(
        inspect(&publisher, &queue).await.is_some(),
        "the existing queue is untouched"
    );
    publisher.cleanup(&queue).await;
}
