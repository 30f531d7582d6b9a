//! The relay under faults: the broker or database connection cut mid-stream (through a loopback
//! fault proxy), and a real broker restart (`fault_` test: run alone, after the others).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use integration_tests::proxy::FaultProxy;
use integration_tests::{TestDb, TestQueue, eventually, fresh_db};
use outbox_relay::Config;
use outbox_relay::relay::{self, Health};
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(60);

async fn fill(db: &TestDb, queue: &str, n: i32) -> Vec<i64> {
    sqlx::query_scalar(
        "SELECT outbox.enqueue('', $1, convert_to(g::text, 'UTF8')) FROM generate_series(1, $2) g",
    )
    .bind(queue)
    .bind(n)
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

fn config(db: &TestDb, amqp_url: String) -> Config {
    Config {
        database_url: db.url.clone(),
        amqp_url,
        batch_size: 100,
        listen: false,
        ..Config::default()
    }
}

/// Waits until every id arrived and the outbox is empty; returns (received, duplicates).
async fn assert_all_arrived(db: &TestDb, queue: &TestQueue, ids: &[i64]) -> (usize, usize) {
    let got = queue
        .wait_until(WAIT, "every message", |got| {
            let seen: HashSet<_> = got.iter().filter_map(|r| r.message_id.clone()).collect();
            ids.iter().all(|id| seen.contains(&id.to_string()))
        })
        .await;
    eventually(WAIT, "outbox emptied", || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox.messages")
            .fetch_one(&db.pool)
            .await
            .unwrap()
            == 0
    })
    .await;
    let got = queue.received().len().max(got.len());
    (got, got - ids.len())
}

#[tokio::test]
async fn broker_connection_cut_mid_stream_loses_nothing() {
    let db = fresh_db().await;
    let queue = TestQueue::new("brokercut").await;
    let ids = fill(&db, &queue.name, 4000).await;
    let proxy = FaultProxy::start("127.0.0.1:5672").await;
    let amqp = proxy.url_through(&integration_tests::amqp_url(), "127.0.0.1:5672");
    let shutdown = CancellationToken::new();
    let relay = tokio::spawn(relay::run(
        db.pool.clone(),
        config(&db, amqp),
        Arc::new(Health::default()),
        shutdown.clone(),
    ));
    queue.wait_for(300, WAIT).await;
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(500)).await; // the outage itself
    proxy.restore();
    let (received, duplicates) = assert_all_arrived(&db, &queue, &ids).await;
    println!(
        "sent {} received {received} duplicates {duplicates} lost 0",
        ids.len()
    );
    shutdown.cancel();
    relay.await.unwrap().unwrap();
    queue.delete().await;
}

#[tokio::test]
async fn database_connection_cut_mid_stream_loses_nothing() {
    let db = fresh_db().await;
    let queue = TestQueue::new("dbcut").await;
    let ids = fill(&db, &queue.name, 4000).await;
    let proxy = FaultProxy::start("127.0.0.1:5432").await;
    let url = proxy.url_through(&db.url, "127.0.0.1:5432");
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(2))
        .connect_lazy(&url)
        .unwrap();
    let shutdown = CancellationToken::new();
    let relay = tokio::spawn(relay::run(
        pool,
        config(&db, integration_tests::amqp_url()),
        Arc::new(Health::default()),
        shutdown.clone(),
    ));
    queue.wait_for(300, WAIT).await;
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.restore();
    let (received, duplicates) = assert_all_arrived(&db, &queue, &ids).await;
    println!(
        "sent {} received {received} duplicates {duplicates} lost 0",
        ids.len()
    );
    shutdown.cancel();
    relay.await.unwrap().unwrap();
    queue.delete().await;
}

fn rabbitmqctl(args: &[&str]) {
    let status = std::process::Command::new("rabbitmqctl")
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("rabbitmqctl");
    assert!(status.success(), "rabbitmqctl {args:?} failed");
}

#[tokio::test]
async fn fault_broker_restart_mid_stream_loses_nothing() {
    let db = fresh_db().await;
    let queue_name = integration_tests::unique_name("brokerrestart");
    let queue = TestQueue::named(&queue_name).await;
    let ids = fill(&db, &queue_name, 4000).await;
    let shutdown = CancellationToken::new();
    let relay = tokio::spawn(relay::run(
        db.pool.clone(),
        config(&db, integration_tests::amqp_url()),
        Arc::new(Health::default()),
        shutdown.clone(),
    ));
    queue.wait_for(300, WAIT).await;
    rabbitmqctl(&["stop_app"]);
    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup"]);
    // The test's own consumer died with the broker; the durable queue kept what was confirmed.
    let before = queue.received();
    let queue = TestQueue::named(&queue_name).await;
    let seen: HashSet<String> = before.iter().filter_map(|r| r.message_id.clone()).collect();
    let missing: Vec<i64> = ids
        .iter()
        .copied()
        .filter(|id| !seen.contains(&id.to_string()))
        .collect();
    let (received, duplicates) = assert_all_arrived(&db, &queue, &missing).await;
    println!(
        "sent {} received {} duplicates {duplicates} lost 0",
        ids.len(),
        before.len() + received
    );
    shutdown.cancel();
    relay.await.unwrap().unwrap();
    queue.delete().await;
}
