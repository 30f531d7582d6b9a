//! Faults between the consumer and its servers, made with a loopback TCP proxy that cuts every
//! connection (what a broker or database restart looks like from the consumer), so the shared
//! servers keep running for other tests.

mod common;

use std::time::Duration;

use common::proxy::{Proxy, through_proxy};
use common::*;
use sqlx::postgres::PgPoolOptions;

const MESSAGES: i64 = 1500;

/// The tests of this file run one at a time even when the harness runs them in parallel: the
/// broker restart would break the others' connections.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fault_broker_connection_cut_mid_stream_applies_all_once() {
    let _serial = SERIAL.lock().await;
    let _ = tracing_subscriber::fmt()
        .with_env_filter("consumer_lib=debug")
        .try_init();
    let (db, publisher, queue, exchange) = setup().await;
    let amqp = integration_tests::amqp_url();
    let (_, target) = through_proxy(&amqp, 5672, 0);
    let proxy = Proxy::start(target).await;
    let (proxied_url, _) = through_proxy(&amqp, 5672, proxy.port);

    for id in 1..=MESSAGES {
        publisher
            .publish(&exchange, id, &payload("k", id, ""), false)
            .await;
    }
    let consumer = builder(&db.pool, &queue, &exchange)
        .amqp_url(proxied_url)
        .prefetch(100)
        .handler(Recorder { jitter_ms: 2 })
        .build()
        .unwrap();
    let (token, task) = spawn(consumer);

    // Cut the connection three times while messages are being applied, once keeping the
    // "broker" away for a second so reconnects fail and back off.
    for (round, threshold) in [(1, MESSAGES / 5), (2, MESSAGES / 2), (3, MESSAGES * 3 / 4)] {
        wait_until(
            "progress before the cut",
            Duration::from_secs(60),
            || async { total_effects(&db.pool).await >= threshold },
        )
        .await;
        proxy.cut();
        if round == 2 {
            proxy.set_up(false);
            tokio::time::sleep(Duration::from_secs(1)).await;
            proxy.set_up(true);
        }
    }
    wait_until("every message applied", Duration::from_secs(60), || async {
        distinct_effects(&db.pool).await == MESSAGES
    })
    .await;
    stop(token, task).await;
    assert_eq!(
        total_effects(&db.pool).await,
        MESSAGES,
        "no message applied twice"
    );
    assert_eq!(publisher.ready(&queue).await, 0, "every message acked");
    publisher.cleanup(&queue).await;
}

/// A fault proxy in front of the test database, and a pool with `options` connected through it.
async fn proxied_pool(db_url: &str, options: PgPoolOptions) -> (Proxy, sqlx::PgPool) {
    let (_, target) = through_proxy(db_url, 5432, 0);
    let proxy = Proxy::start(target).await;
    let (proxied_url, _) = through_proxy(db_url, 5432, proxy.port);
    let pool = options.connect(&proxied_url).await.unwrap();
    (proxy, pool)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn database_outage_retries_messages_without_crashing() {
    let _serial = SERIAL.lock().await;
    let (db, publisher, queue, exchange) = setup().await;
    let (proxy, pool) = proxied_pool(
        &db.url,
        PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(1)),
    )
    .await;
    let consumer = builder(&pool, &queue, &exchange)
        .handler(Recorder { jitter_ms: 0 })
        .build()
        .unwrap();
    let (token, task) = spawn(consumer);
    publisher
        .publish(&exchange, 1, &payload("a", 1, ""), false)
        .await;
    wait_until("the first message", Duration::from_secs(20), || async {
        effect_count(&db.pool, 1).await == 1
    })
    .await;

    // The database goes away: open connections die, new ones are refused.
    proxy.set_up(false);
    proxy.cut();
    publish_ids(&publisher, &exchange, 2..=20).await;
    // Let the consumer fail on them for a while (they go around the delay cascade).
    wait_until(
        "the messages to be tried during the outage",
        Duration::from_secs(20),
        || async { publisher.ready(&queue).await == 0 },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !task.is_finished(),
        "the consumer keeps running through the outage"
    );
    assert_eq!(total_effects(&db.pool).await, 1);
    proxy.set_up(true);

    wait_until(
        "every message applied after the outage",
        Duration::from_secs(30),
        || async { distinct_effects(&db.pool).await == 20 },
    )
    .await;
    stop(token, task).await;
    assert_eq!(total_effects(&db.pool).await, 20, "applied once each");
    assert_no_dead_letters(
        &db.pool,
        &queue,
        "a database outage does not dead-letter messages",
    )
    .await;
    publisher.cleanup(&queue).await;
}

/// The README's advice for a pool of the consumer's own, `test_before_acquire(false)`: no ping
/// before a message's transaction, so a connection that died while idle in the pool is only
/// found by the message's first statement. That message is retried, never dead-lettered, and
/// every message is applied once.
#[tokio::test]
async fn pool_without_ping_retries_on_connections_that_died_idle() {
    let _serial = SERIAL.lock().await;
    let (db, publisher, queue, exchange) = setup().await;
    let (proxy, pool) = proxied_pool(
        &db.url,
        PgPoolOptions::new()
            .max_connections(4)
            .min_connections(4)
            .test_before_acquire(false),
    )
    .await;
    let consumer = builder(&pool, &queue, &exchange)
        .concurrency(4)
        .handler(Recorder { jitter_ms: 0 })
        .build()
        .unwrap();
    let (token, task) = spawn(consumer);
    publish_ids(&publisher, &exchange, 1..=8).await;
    wait_until("the first messages", Duration::from_secs(20), || async {
        distinct_effects(&db.pool).await == 8
    })
    .await;

    // Every pooled connection dies while idle; the database itself stays reachable.
    proxy.cut();
    publish_ids(&publisher, &exchange, 9..=40).await;
    wait_until(
        "every message applied after the cut",
        Duration::from_secs(30),
        || async { distinct_effects(&db.pool).await == 40 },
    )
    .await;
    stop(token, task).await;
    assert_eq!(total_effects(&db.pool).await, 40, "applied once each");
    let retried: i64 = sqlx::query_scalar("SELECT count(*) FROM effects WHERE attempt > 1")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(
        retried >= 1,
        "a message met a dead connection and was retried"
    );
    assert_no_dead_letters(
        &db.pool,
        &queue,
        "a dead pooled connection does not dead-letter messages",
    )
    .await;
    publisher.cleanup(&queue).await;
}

/// Fails the first attempt of every message, logging the failure outside the transaction.
struct FailFirstAttempt {
    pool: sqlx::PgPool,
}

impl consumer_lib::Handler for FailFirstAttempt {
    type Payload = Payload;

    async fn handle(
        &self,
        message: &consumer_lib::Message<Payload>,
        tx: &mut sqlx::PgTransaction<'static>,
    ) -> Result<(), consumer_lib::HandlerError> {
        if message.attempt == 1 {
            sqlx::query("INSERT INTO failures (message_id) VALUES ($1)")
                .bind(message.id)
                .execute(&self.pool)
                .await?;
            return Err(consumer_lib::HandlerError::retry("first attempt fails"));
        }
        sqlx::query("INSERT INTO effects (message_id, key, seq, attempt) VALUES ($1, $2, $3, $4)")
            .bind(message.id)
            .bind(&message.payload.key)
            .bind(message.payload.seq)
            .bind(message.attempt as i32)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

fn rabbitmqctl(command: &str) {
    let status = std::process::Command::new("rabbitmqctl")
        .arg(command)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run rabbitmqctl");
    assert!(status.success(), "rabbitmqctl {command}");
}

/// Restarts the real broker: run with the other `fault_` tests, alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fault_broker_restart_keeps_waiting_retries_and_the_consumer_resumes() {
    let _serial = SERIAL.lock().await;
    let (db, publisher, queue, exchange) = setup().await;
    sqlx::query("CREATE TABLE failures (message_id bigint NOT NULL)")
        .execute(&db.pool)
        .await
        .unwrap();
    let consumer = builder(&db.pool, &queue, &exchange)
        .retry(
            consumer_lib::RetryPolicy::exponential()
                .max_attempts(3)
                .min_delay(Duration::from_secs(3))
                .max_delay(Duration::from_secs(3))
                .jitter(false),
        )
        .handler(FailFirstAttempt {
            pool: db.pool.clone(),
        })
        .build()
        .unwrap();
    let (token, task) = spawn(consumer);
    publisher
        .publish(&exchange, 1, &payload("a", 1, ""), false)
        .await;
    wait_until(
        "the first attempt to fail",
        Duration::from_secs(20),
        || async {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM failures")
                .fetch_one(&db.pool)
                .await
                .unwrap()
                == 1
        },
    )
    .await;
    drop(publisher);

    // The retry now waits in the delay cascade; the broker goes down and comes back.
    rabbitmqctl("stop_app");
    rabbitmqctl("start_app");

    wait_until(
        "the retry to apply after the restart",
        Duration::from_secs(60),
        || async { effect_count(&db.pool, 1).await == 1 },
    )
    .await;
    stop(token, task).await;
    let attempt: i32 = sqlx::query_scalar("SELECT attempt FROM effects WHERE message_id = 1")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(attempt, 2, "the delayed retry survived the restart");
    let failures: i64 = sqlx::query_scalar("SELECT count(*) FROM failures")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        failures, 1,
        "the retry came from the delay cascade, not a redelivery"
    );
    Publisher::connect().await.cleanup(&queue).await;
}
