//! Several broker addresses, end to end: a relay and a consumer-lib consumer, both given a list
//! of broker nodes, move a stream of ordered messages from the outbox into a handler's table.
//!
//! The "nodes" are loopback fault proxies in front of the one shared broker, so a node can be
//! lost without stopping anything shared (these are not `fault_` tests). Each test asserts what
//! the no-loss rule promises across a failover: every committed message applied, none applied
//! twice, per-key order held; and prints the counts.

use std::sync::Arc;
use std::time::{Duration, Instant};

use consumer_lib::lapin::options::QueueDeclareOptions;
use consumer_lib::lapin::types::FieldTable;
use consumer_lib::lapin::{Connection, ConnectionProperties};
use consumer_lib::{Consumer, Handler, HandlerError, Message, RetryPolicy};
use integration_tests::proxy::FaultProxy;
use integration_tests::{TestDb, fresh_db, unique_name};
use outbox_relay::Config;
use outbox_relay::relay::{self, Health};
use serde::Deserialize;
use sqlx::PgTransaction;
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;

const KEYS: usize = 20;
const PER_KEY: usize = 40;
/// Producer pace: a stream long enough for the node loss to land in its middle.
const PRODUCE_FOR: Duration = Duration::from_secs(3);
const WAIT: Duration = Duration::from_secs(90);
/// Nothing listens on port 1 of loopback: a connect there is refused at once.
const DEAD_NODE: &str = "amqp://guest:guest@127.0.0.1:1/%2f";

#[derive(Deserialize)]
struct Payload {
    key: String,
    seq: i32,
}

/// Records every application (no unique key: a double application would show).
struct Record;

impl Handler for Record {
    type Payload = Payload;

    async fn handle(
        &self,
        message: &Message<Payload>,
        tx: &mut PgTransaction<'static>,
    ) -> Result<(), HandlerError> {
        sqlx::query("INSERT INTO applied (message_id, key, seq) VALUES ($1, $2, $3)")
            .bind(message.id)
            .bind(&message.payload.key)
            .bind(message.payload.seq)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

struct Stream {
    db: TestDb,
    queue: String,
    shutdown: CancellationToken,
    relay: tokio::task::JoinHandle<anyhow::Result<()>>,
    consumer: tokio::task::JoinHandle<Result<(), consumer_lib::Error>>,
}

impl Stream {
    /// Starts a consumer on `urls` (one URL per item), waits until it declared its queue, then
    /// a relay with `amqp_url` set to the same list joined with commas.
    async fn start(urls: &[String]) -> Stream {
        let db = fresh_db().await;
        sqlx::query(
            "CREATE TABLE applied (n bigserial PRIMARY KEY, message_id bigint NOT NULL, \
             key text NOT NULL, seq int NOT NULL)",
        )
        .execute(&db.pool)
        .await
        .unwrap();
        let queue = unique_name("failover");
        let shutdown = CancellationToken::new();
        let consumer_pool = PgPoolOptions::new()
            .max_connections(10)
            .connect_lazy(&db.url)
            .unwrap();
        let consumer = Consumer::builder("failover-test")
            .amqp_urls(urls)
            .database(consumer_pool)
            .queue(&queue)
            .ordered(true)
            .retry(
                RetryPolicy::exponential()
                    .max_attempts(30)
                    .min_delay(Duration::from_millis(100))
                    .max_delay(Duration::from_secs(1)),
            )
            .shutdown_grace(Duration::from_secs(5))
            .handler(Record)
            .build()
            .unwrap();
        let consumer = tokio::spawn(consumer.run(shutdown.clone()));
        wait_for_queue(&queue).await;
        let config = Config {
            database_url: db.url.clone(),
            amqp_url: urls.join(","),
            batch_size: 100,
            listen: false,
            ..Config::default()
        };
        config.validate().unwrap();
        let relay = tokio::spawn(relay::run(
            db.pool.clone(),
            config,
            Arc::new(Health::default()),
            shutdown.clone(),
        ));
        Stream {
            db,
            queue,
            shutdown,
            relay,
            consumer,
        }
    }

    /// Every key gets `PER_KEY` messages in order, one transaction each, paced over
    /// `PRODUCE_FOR`; the keys are produced concurrently, one task each.
    fn produce(&self) -> tokio::task::JoinHandle<()> {
        let pool = self.db.pool.clone();
        let queue = self.queue.clone();
        tokio::spawn(async move {
            let mut keys = tokio::task::JoinSet::new();
            for key in 0..KEYS {
                let (pool, queue) = (pool.clone(), queue.clone());
                keys.spawn(async move {
                    let mut tick = tokio::time::interval(PRODUCE_FOR / PER_KEY as u32);
                    for seq in 0..PER_KEY {
                        tick.tick().await;
                        // The test needs no durability of its producers' commits; not waiting
                        // for the WAL flush keeps the stream at its pace on a busy machine.
                        let mut tx = pool
                            .begin_with("BEGIN; SET LOCAL synchronous_commit = off")
                            .await
                            .unwrap();
                        sqlx::query(
                            "SELECT outbox.enqueue('', $1, convert_to($2, 'UTF8'), ordering_key => $3)",
                        )
                        .bind(&queue)
                        .bind(format!(r#"{{"key":"k{key}","seq":{seq}}}"#))
                        .bind(format!("k{key}"))
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                        tx.commit().await.unwrap();
                    }
                });
            }
            while let Some(done) = keys.join_next().await {
                done.unwrap();
            }
        })
    }

    async fn count(&self, sql: &'static str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(&self.db.pool)
            .await
            .unwrap()
    }

    /// Waits until a fifth of the stream was applied: relay and consumer are both flowing.
    async fn mid_stream(&self) {
        let deadline = Instant::now() + WAIT;
        while self.count("SELECT count(*) FROM applied").await < (KEYS * PER_KEY / 5) as i64 {
            assert!(Instant::now() < deadline, "the stream never started");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until every message was applied, stops both, checks and prints the counts.
    async fn verify(mut self, what: &str) {
        let sent = (KEYS * PER_KEY) as i64;
        let deadline = Instant::now() + WAIT;
        while self
            .count("SELECT count(DISTINCT message_id) FROM applied")
            .await
            < sent
        {
            if Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.shutdown.cancel();
        (&mut self.consumer).await.unwrap().unwrap();
        (&mut self.relay).await.unwrap().unwrap();
        let applied = self
            .count("SELECT count(DISTINCT message_id) FROM applied")
            .await;
        let applications = self.count("SELECT count(*) FROM applied").await;
        let left_in_outbox = self.count("SELECT count(*) FROM outbox.messages").await;
        let out_of_order = self.out_of_order().await;
        let lost = sent - applied;
        let double_applied = applications - applied;
        println!(
            "{what}: sent {sent} applied {applied} lost {lost} double_applied {double_applied} \
             out_of_order {out_of_order} left_in_outbox {left_in_outbox}"
        );
        delete_queue(&self.queue).await;
        assert_eq!(lost, 0, "{what}: committed messages never applied");
        assert_eq!(double_applied, 0, "{what}: messages applied twice");
        assert_eq!(out_of_order, 0, "{what}: per-key order broken");
        assert_eq!(left_in_outbox, 0, "{what}: rows left in the outbox");
    }

    /// Applications whose sequence number is not above the previous one of their key.
    async fn out_of_order(&self) -> i64 {
        self.count(
            "SELECT count(*) FROM (SELECT seq, lag(seq) OVER (PARTITION BY key ORDER BY n) AS prev \
             FROM applied) s WHERE seq <= prev",
        )
        .await
    }
}

/// Polls the real broker with a passive declare until the consumer has declared `queue`.
async fn wait_for_queue(queue: &str) {
    let connection = Connection::connect(
        &integration_tests::amqp_url(),
        ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // A passive declare of a missing queue closes the channel: one channel per probe.
        let channel = connection.create_channel().await.unwrap();
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        if channel
            .queue_declare(queue.into(), passive, FieldTable::default())
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the consumer never declared {queue}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = connection.close(200, "done".into()).await;
}

async fn delete_queue(queue: &str) {
    let connection = Connection::connect(
        &integration_tests::amqp_url(),
        ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let _ = channel.queue_delete(queue.into(), Default::default()).await;
    let _ = connection.close(200, "done".into()).await;
}

#[tokio::test]
async fn a_dead_first_address_is_skipped_by_relay_and_consumer() {
    let urls = [DEAD_NODE.to_owned(), integration_tests::amqp_url()];
    let stream = Stream::start(&urls).await;
    stream.produce().await.unwrap();
    stream.verify("first address dead").await;
}

/// Node A is cut mid-stream and stays down: everything published or consumed after that can
/// only have gone through node B, so the relay and the consumer both moved there.
#[tokio::test]
async fn losing_the_node_in_use_moves_relay_and_consumer_to_the_next() {
    let upstream = "127.0.0.1:5672";
    let node_a = FaultProxy::start(upstream).await;
    let node_b = FaultProxy::start(upstream).await;
    let real = integration_tests::amqp_url();
    let urls = [
        node_a.url_through(&real, upstream),
        node_b.url_through(&real, upstream),
    ];
    let stream = Stream::start(&urls).await;
    let producer = stream.produce();
    stream.mid_stream().await;
    node_a.cut();
    producer.await.unwrap();
    stream.verify("node A lost mid-stream").await;
}
