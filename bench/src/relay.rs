//! Relay drain: a backlog of due 512-byte messages to a durable queue, drained by the relay,
//! against (a) a raw lapin publisher with 1,000 confirms in flight and (b) a naive relay that
//! claims one row, publishes it, waits for its confirm and commits, in the same run.

use std::time::Instant;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Confirmation};

use crate::{Figure, Report, RunningRelay, Scale, broker, relay_config, wait_drained};

const SIZE: i32 = 512;

/// Fills the outbox with `n` due messages of `SIZE` bytes for `queue`.
pub async fn fill(pool: &sqlx::PgPool, queue: &str, n: i32) -> anyhow::Result<()> {
    // In chunks, so each transaction stays short.
    let mut left = n;
    while left > 0 {
        let chunk = left.min(20_000);
        sqlx::query(
            "SELECT outbox.enqueue('', $1, convert_to(repeat('x', $3), 'UTF8')) \
             FROM generate_series(1, $2)",
        )
        .bind(queue)
        .bind(chunk)
        .bind(SIZE)
        .execute(pool)
        .await?;
        left -= chunk;
    }
    sqlx::query("VACUUM ANALYZE outbox.messages")
        .execute(pool)
        .await?;
    Ok(())
}

/// The naive relay: one row per transaction, one confirm awaited per message. Returns msg/s.
async fn naive_drain(
    pool: &sqlx::PgPool,
    connection: &lapin::Connection,
    n: i64,
) -> anyhow::Result<f64> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let started = Instant::now();
    for _ in 0..n {
        let mut tx = pool.begin().await?;
        let row: Option<(i64, String, String, Vec<u8>)> = sqlx::query_as(
            "SELECT id, exchange, routing_key, payload FROM outbox.messages \
             WHERE available_at <= now() ORDER BY available_at, id LIMIT 1 FOR UPDATE SKIP LOCKED",
        )
        .fetch_optional(&mut *tx)
        .await?;
        let Some((id, exchange, routing_key, payload)) = row else {
            break;
        };
        let confirm = channel
            .basic_publish(
                exchange.as_str().into(),
                routing_key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &payload,
                BasicProperties::default()
                    .with_message_id(id.to_string().into())
                    .with_delivery_mode(2),
            )
            .await?
            .await?;
        anyhow::ensure!(
            matches!(confirm, Confirmation::Ack(None)),
            "naive publish failed"
        );
        sqlx::query("DELETE FROM outbox.messages WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// Runs the drain scenario and records its figures.
pub async fn run(scale: Scale, report: &mut Report) -> anyhow::Result<()> {
    let n = scale.pick(100_000, 2_000);
    let naive_n = scale.pick(4_000, 200);
    let db = integration_tests::fresh_db().await;
    let connection = broker::connect().await?;
    let channel = connection.create_channel().await?;
    let queue = integration_tests::unique_name("bench_drain");
    broker::declare_queue(&channel, &queue).await?;

    // Baseline (a), measured before and after the relay; their mean is the ceiling. Phase marks
    // are for bench/scripts/cpu-split.py.
    eprintln!("# phase raw_publish");
    let raw_before =
        broker::raw_publish(&connection, &queue, n as usize, SIZE as usize, 1000).await?;
    broker::purge(&channel, &queue).await?;

    eprintln!("# phase idle");
    fill(&db.pool, &queue, n).await?;
    eprintln!("# phase relay_drain");
    let started = Instant::now();
    let relay = RunningRelay::start(db.pool.clone(), relay_config(&db, false));
    let took = wait_drained(&db.pool, started).await?;
    relay.stop().await?;
    let relay_rate = n as f64 / took.as_secs_f64();
    broker::purge(&channel, &queue).await?;

    eprintln!("# phase raw_publish");
    let raw_after =
        broker::raw_publish(&connection, &queue, n as usize, SIZE as usize, 1000).await?;
    broker::purge(&channel, &queue).await?;
    let raw = (raw_before + raw_after) / 2.0;

    // Baseline (b).
    eprintln!("# phase idle");
    fill(&db.pool, &queue, naive_n).await?;
    let naive = naive_drain(&db.pool, &connection, naive_n as i64).await?;
    broker::delete_queue(&channel, &queue).await?;

    report.push(Figure::new(
        "relay_drain",
        relay_rate,
        "msg/s",
        "raw_pipelined_publish",
        raw,
        Some(">= 0.90"),
    ));
    report.push(Figure::new(
        "relay_drain",
        relay_rate,
        "msg/s",
        "naive_relay",
        naive,
        Some(">= 5.0"),
    ));
    let _ = connection.close(200, "done".into()).await;
    Ok(())
}
