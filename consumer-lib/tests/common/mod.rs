//! Helpers shared by this crate's integration tests: a test handler that records its effects,
//! publishing like the relay does, waiting for conditions, and a loopback TCP proxy that can
//! cut connections.
#![allow(dead_code)]

pub mod proxy;

use std::future::Future;
use std::time::{Duration, Instant};

use consumer_lib::lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use consumer_lib::lapin::types::{AMQPValue, FieldTable, LongString};
use consumer_lib::lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind,
};
use consumer_lib::{Handler, HandlerError, Message, ORDERING_KEY_HEADER, RetryPolicy};
use serde::{Deserialize, Serialize};
use sqlx::{PgPool, PgTransaction};

/// The payload the tests publish.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Payload {
    pub key: String,
    pub seq: i64,
    /// What the handler should do: "" (apply), "panic_once", "fail_twice", "always_fail",
    /// "reject", "slow".
    #[serde(default)]
    pub behavior: String,
}

/// Records every applied message in table `effects`, in the handler's transaction.
pub struct Recorder {
    /// Random pause inside the handler, up to this many milliseconds, to shuffle timing.
    pub jitter_ms: u64,
}

pub async fn create_effects_table(pool: &PgPool) {
    sqlx::query(
        "CREATE TABLE effects (n bigserial PRIMARY KEY, message_id bigint NOT NULL, \
         key text NOT NULL, seq bigint NOT NULL, attempt int NOT NULL)",
    )
    .execute(pool)
    .await
    .expect("create effects table");
}

impl Handler for Recorder {
    type Payload = Payload;

    async fn handle(
        &self,
        message: &Message<Payload>,
        tx: &mut PgTransaction<'static>,
    ) -> Result<(), HandlerError> {
        let p = &message.payload;
        match p.behavior.as_str() {
            "panic_once" if message.attempt == 1 => panic!("handler exploded on purpose"),
            "fail_twice" if message.attempt <= 2 => {
                return Err(HandlerError::retry(format!(
                    "transient failure {}",
                    message.attempt
                )));
            }
            "always_fail" => return Err(HandlerError::retry("still failing")),
            "reject" => return Err(HandlerError::reject("order total is negative")),
            "slow" => tokio::time::sleep(Duration::from_millis(400)).await,
            _ => {}
        }
        if self.jitter_ms > 0 {
            let pause = rand::random::<u64>() % (self.jitter_ms + 1);
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
        sqlx::query("INSERT INTO effects (message_id, key, seq, attempt) VALUES ($1, $2, $3, $4)")
            .bind(message.id)
            .bind(&p.key)
            .bind(p.seq)
            .bind(message.attempt as i32)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

/// A retry policy quick enough for tests: 100 ms doubling, no jitter.
pub fn fast_retry(attempts: u32) -> RetryPolicy {
    RetryPolicy::exponential()
        .max_attempts(attempts)
        .min_delay(Duration::from_millis(100))
        .max_delay(Duration::from_millis(400))
        .jitter(false)
}

pub async fn effect_count(pool: &PgPool, message_id: i64) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM effects WHERE message_id = $1")
        .bind(message_id)
        .fetch_one(pool)
        .await
        .expect("count effects")
}

pub async fn total_effects(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM effects")
        .fetch_one(pool)
        .await
        .expect("count effects")
}

pub async fn distinct_effects(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(DISTINCT message_id) FROM effects")
        .fetch_one(pool)
        .await
        .expect("count effects")
}

/// Polls `check` every 50 ms until it holds; panics naming `what` after `limit`.
pub async fn wait_until<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        if Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A publisher that behaves like the relay: persistent messages with the id as `message_id`,
/// JSON content type, a timestamp and the ordering key header.
pub struct Publisher {
    pub connection: Connection,
    pub channel: Channel,
}

impl Publisher {
    pub async fn connect() -> Publisher {
        let connection = Connection::connect(
            &integration_tests::amqp_url(),
            ConnectionProperties::default(),
        )
        .await
        .expect("connect to the broker");
        let channel = connection.create_channel().await.expect("open channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm select");
        Publisher {
            connection,
            channel,
        }
    }

    /// Declares `exchange` (topic) and `queue` bound to it with `#`, as the consumer will.
    pub async fn declare(&self, exchange: &str, queue: &str) {
        self.channel
            .exchange_declare(
                exchange.into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare exchange");
        self.channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare queue");
        self.channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind queue");
    }

    pub async fn publish_raw(
        &self,
        exchange: &str,
        id: Option<i64>,
        body: &[u8],
        ordering_key: Option<&str>,
    ) {
        let mut headers = FieldTable::default();
        headers.insert(
            "source".into(),
            AMQPValue::LongString(LongString::from("test")),
        );
        if let Some(key) = ordering_key {
            headers.insert(
                ORDERING_KEY_HEADER.into(),
                AMQPValue::LongString(LongString::from(key)),
            );
        }
        let mut properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_timestamp(1_700_000_000)
            .with_headers(headers);
        if let Some(id) = id {
            properties = properties.with_message_id(id.to_string().into());
        }
        let confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                "order.created".into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                properties,
            )
            .await
            .expect("publish")
            .await
            .expect("publish confirm");
        assert!(confirm.is_ack(), "broker did not confirm the test message");
    }

    pub async fn publish(&self, exchange: &str, id: i64, payload: &Payload, ordered: bool) {
        let body = serde_json::to_vec(payload).expect("encode payload");
        let key = ordered.then_some(payload.key.as_str());
        self.publish_raw(exchange, Some(id), &body, key).await;
    }

    /// Ready messages in `queue` (not counting deliveries a consumer holds unacked).
    pub async fn ready(&self, queue: &str) -> u32 {
        self.channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("inspect queue")
            .message_count()
    }

    /// Removes the test's queues (best effort).
    pub async fn cleanup(&self, queue: &str) {
        for name in [queue.to_owned(), format!("{queue}.dead")] {
            let _ = self
                .channel
                .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
    }
}

/// Publishes ids `ids` to `exchange`, each with key "a" and its id as sequence number.
pub async fn publish_ids(
    publisher: &Publisher,
    exchange: &str,
    ids: std::ops::RangeInclusive<i64>,
) {
    for id in ids {
        publisher
            .publish(exchange, id, &payload("a", id, ""), false)
            .await;
    }
}

/// Asserts that nothing of `queue`'s consumer was dead-lettered.
pub async fn assert_no_dead_letters(pool: &PgPool, queue: &str, why: &str) {
    assert!(
        consumer_lib::dead_letter::list(pool, Some(queue), true, 10)
            .await
            .unwrap()
            .is_empty(),
        "{why}"
    );
}

pub fn payload(key: &str, seq: i64, behavior: &str) -> Payload {
    Payload {
        key: key.to_owned(),
        seq,
        behavior: behavior.to_owned(),
    }
}

/// Runs `consumer` in a task; returns the shutdown token and the task.
pub fn spawn(
    consumer: consumer_lib::Consumer,
) -> (
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<Result<(), consumer_lib::Error>>,
) {
    let token = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(consumer.run(token.clone()));
    (token, task)
}

/// Cancels and waits for a consumer started with [`spawn`], failing the test on an error.
pub async fn stop(
    token: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<Result<(), consumer_lib::Error>>,
) {
    token.cancel();
    tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("consumer stops within 20 s")
        .expect("consumer task")
        .expect("consumer run");
}

/// A consumer named after its queue, bound to `exchange`, with quick retries.
pub fn builder(pool: &PgPool, queue: &str, exchange: &str) -> consumer_lib::ConsumerBuilder {
    consumer_lib::Consumer::builder(queue)
        .amqp_url(integration_tests::amqp_url())
        .database(pool.clone())
        .declare_exchange(exchange, ExchangeKind::Topic)
        .bind(exchange, "#")
        .retry(fast_retry(4))
}

/// Fresh database with the effects table, a publisher, and random queue/exchange names.
pub async fn setup() -> (integration_tests::TestDb, Publisher, String, String) {
    let db = integration_tests::fresh_db().await;
    create_effects_table(&db.pool).await;
    let publisher = Publisher::connect().await;
    let queue = integration_tests::unique_name("cl_q");
    let exchange = integration_tests::unique_name("cl_x");
    publisher.declare(&exchange, &queue).await;
    (db, publisher, queue, exchange)
}
