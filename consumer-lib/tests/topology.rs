//! What the consumer declares on the broker: quorum queues with quorum delay levels, and a
//! clear error when the broker refuses the declared shape.

mod common;

use std::time::Duration;

use common::*;
use consumer_lib::lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
use consumer_lib::lapin::types::{AMQPValue, FieldTable};
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
    let err = result.expect_err("the broker refuses the declaration");
    assert!(
        matches!(err, consumer_lib::Error::QueueMismatch { .. }),
        "{err:?}"
    );
    let err = err.to_string();
    // The error names the queue, the setting behind its arguments and the differing argument.
    assert!(err.contains(&format!("{queue:?}")), "{err}");
    assert!(err.contains("quorum(true)"), "{err}");
    assert!(err.contains("x-queue-type"), "{err}");
    assert!(
        inspect(&publisher, &queue).await.is_some(),
        "the existing queue is untouched"
    );
    publisher.cleanup(&queue).await;
}

/// Declares `queue` durable with `args` on a channel of its own: `Ok` when the broker's queue
/// has exactly these arguments (a redeclaration must be equivalent), the refusal otherwise.
async fn redeclare(
    publisher: &Publisher,
    queue: &str,
    args: &[(&str, AMQPValue)],
) -> Result<(), consumer_lib::lapin::Error> {
    let channel = publisher.connection.create_channel().await.unwrap();
    let mut table = FieldTable::default();
    for (key, value) in args {
        table.insert((*key).into(), value.clone());
    }
    let result = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            table,
        )
        .await
        .map(|_| ());
    let _ = channel.close(200, "done".into()).await;
    result
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.into())
}

/// The broker holds the arguments `quorum(true)` promises: the consumer's queue and its
/// dead-letter queue are quorum queues, and every delay level is a quorum queue that
/// dead-letters at least once with reject-publish overflow. Checked on the broker itself: an
/// equivalent redeclaration is accepted, one differing in any of these arguments refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_declares_replicated_queues_and_at_least_once_delay_levels() {
    let (db, publisher, queue, exchange) = setup().await;
    // `setup` made a classic queue under this name; the quorum consumer gets a new one.
    publisher.cleanup(&queue).await;
    let consumer = builder(&db.pool, &queue, &exchange)
        .quorum(true)
        .dead_letter_queue(true)
        .handler(Recorder { jitter_ms: 0 })
        .build()
        .unwrap();
    let (token, task) = spawn(consumer);
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
    stop(token, task).await;

    let quorum = ("x-queue-type", text("quorum"));
    redeclare(&publisher, &queue, std::slice::from_ref(&quorum))
        .await
        .expect("the consumer's queue is a quorum queue");
    redeclare(&publisher, &queue, &[("x-queue-type", text("classic"))])
        .await
        .expect_err("and not a classic one");
    redeclare(
        &publisher,
        &format!("{queue}.dead"),
        std::slice::from_ref(&quorum),
    )
    .await
    .expect("the dead-letter queue is a quorum queue");

    for level in [0u32, 7, 23] {
        let name = format!("consumer_lib.delay_quorum.level.{level:02}");
        let next = if level == 0 {
            "consumer_lib.delay_quorum.deliver".to_owned()
        } else {
            format!("consumer_lib.delay_quorum.level.{:02}", level - 1)
        };
        let expected = [
            quorum.clone(),
            ("x-message-ttl", AMQPValue::LongLongInt(100 << level)),
            ("x-dead-letter-exchange", text(&next)),
            ("x-dead-letter-strategy", text("at-least-once")),
            ("x-overflow", text("reject-publish")),
        ];
        redeclare(&publisher, &name, &expected)
            .await
            .unwrap_or_else(|e| panic!("{name} has the quorum arguments: {e}"));
        for (i, (key, other)) in [
            (3, ("x-dead-letter-strategy", text("at-most-once"))),
            (4, ("x-overflow", text("drop-head"))),
        ] {
            let mut changed = expected.clone();
            changed[i] = (key, other);
            redeclare(&publisher, &name, &changed)
                .await
                .expect_err("a level differing in that argument is refused");
        }
    }
    publisher.cleanup(&queue).await;
}
