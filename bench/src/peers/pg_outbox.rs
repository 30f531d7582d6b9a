//! Relay drain vs npm `pg-transactional-outbox` (polling listener): a backlog of due 512-byte
//! messages into a durable queue with publisher confirms, each side on its own fresh database
//! and queue in the same run. Target: the relay ≥ 5 × the peer's rate.
//!
//! The peer publishes with amqplib on a confirm channel and waits for each message's confirm
//! in its handler, which is how its README asks a publisher to guarantee delivery. It polls
//! every 10 ms for batches of 50 (its defaults, 500 ms and 5, drain about 10 msg/s) and its
//! rows are `parallel`, so batches are not serialised per segment. Its run stops after
//! `MAX_SECS` if the backlog is not drained by then: the rate is rows processed per second
//! either way. Messages it marked processed but the queue does not hold are counted as lost.
//! Its logical-replication mode needs `wal_level=logical`, which the shared cluster does not
//! have: not measured.

use std::time::{Duration, Instant};

use lapin::options::QueueDeclareOptions;

use super::install;
use crate::{Figure, Report, RunningRelay, Scale, broker, relay, relay_config, wait_drained};

/// The pinned peer and its AMQP client.
pub const PG_TRANSACTIONAL_OUTBOX: &str = "0.5.7";
/// See [`PG_TRANSACTIONAL_OUTBOX`].
pub const AMQPLIB: &str = "0.10.9";
const SIZE: i32 = 512;

#[derive(Debug, serde::Deserialize)]
struct Drain {
    processed: u64,
    rate: f64,
}

/// How many messages `queue` holds.
async fn queue_len(channel: &lapin::Channel, queue: &str) -> anyhow::Result<u32> {
    let q = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await?;
    Ok(q.message_count())
}

/// Runs the comparison and records its figures.
pub async fn run(scale: Scale, report: &mut Report) -> anyhow::Result<()> {
    let n = scale.pick(100_000, 2_000);
    let max_secs = scale.pick(60, 10);
    let folder = format!("pg-transactional-outbox-{PG_TRANSACTIONAL_OUTBOX}");
    let node_modules = match install::npm(
        &folder,
        &[
            &format!("pg-transactional-outbox@{PG_TRANSACTIONAL_OUTBOX}"),
            &format!("amqplib@{AMQPLIB}"),
        ],
    ) {
        Ok(m) => m,
        Err(why) => {
            eprintln!("# peers: pg-transactional-outbox skipped: {why}");
            return Ok(());
        }
    };
    let connection = broker::connect().await?;
    let channel = connection.create_channel().await?;

    // Ours.
    let db = integration_tests::fresh_db().await;
    let queue = integration_tests::unique_name("bench_peers_drain");
    broker::declare_queue(&channel, &queue).await?;
    relay::fill(&db.pool, &queue, n).await?;
    let started = Instant::now();
    let running = RunningRelay::start(db.pool.clone(), relay_config(&db, false));
    let took = wait_drained(&db.pool, started).await?;
    running.stop().await?;
    let ours = n as f64 / took.as_secs_f64();
    broker::delete_queue(&channel, &queue).await?;
    db.pool.close().await;

    // Theirs.
    let db = integration_tests::fresh_db().await;
    let queue = integration_tests::unique_name("bench_peers_pto");
    broker::declare_queue(&channel, &queue).await?;
    let args = [
        db.url.clone(),
        integration_tests::amqp_url(),
        queue.clone(),
        n.to_string(),
        SIZE.to_string(),
        max_secs.to_string(),
        "50".to_owned(),
        "10".to_owned(),
    ];
    let theirs: Drain = install::node("pg-transactional-outbox.js", &node_modules, &args).await?;
    // Confirmed before they were marked processed, so they are all in the queue by now.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let held = queue_len(&channel, &queue).await?;
    let lost = theirs.processed.saturating_sub(u64::from(held));
    broker::delete_queue(&channel, &queue).await?;
    eprintln!(
        "# peers: pg-transactional-outbox {PG_TRANSACTIONAL_OUTBOX} (polling, amqplib {AMQPLIB}): \
         {} of {n} processed at {:.0} msg/s, queue holds {held}, lost {lost}",
        theirs.processed, theirs.rate
    );
    report.push(Figure::new(
        "peers_relay_drain",
        ours,
        "msg/s",
        &format!("pg_transactional_outbox_{PG_TRANSACTIONAL_OUTBOX}_polling"),
        theirs.rate,
        Some(">= 5.0"),
    ));
    let _ = connection.close(200, "done".into()).await;
    Ok(())
}
