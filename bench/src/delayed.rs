//! Delayed messages must not slow the due ones: drain of a due backlog with a million delayed
//! messages pending vs none, same database, same run (target ≥ 0.9).

use std::time::Instant;

use crate::{Figure, Report, RunningRelay, Scale, broker, relay, relay_config, wait_drained};

async fn drain(db: &integration_tests::TestDb, queue: &str, n: i32) -> anyhow::Result<f64> {
    relay::fill(&db.pool, queue, n).await?;
    let started = Instant::now();
    let running = RunningRelay::start(db.pool.clone(), relay_config(db, false));
    let took = wait_drained(&db.pool, started).await?;
    running.stop().await?;
    Ok(n as f64 / took.as_secs_f64())
}

/// Runs the delayed scenario and records its figure.
pub async fn run(scale: Scale, report: &mut Report) -> anyhow::Result<()> {
    let due = scale.pick(30_000, 1_000);
    let delayed: i64 = scale.pick(1_000_000, 10_000);
    let db = integration_tests::fresh_db().await;
    let connection = broker::connect().await?;
    let channel = connection.create_channel().await?;
    let queue = integration_tests::unique_name("bench_delayed");
    broker::declare_queue(&channel, &queue).await?;

    let baseline = drain(&db, &queue, due).await?;
    broker::purge(&channel, &queue).await?;

    // A million timeouts due tomorrow. Their ids only need to be unique here (they are never
    // published), so they are made in bulk rather than one outbox.next_id() call each.
    sqlx::query(
        "INSERT INTO outbox.messages (id, exchange, routing_key, payload, available_at) \
         SELECT (1::bigint << 62) + g, '', $1, '\\x7b7d'::bytea, now() + interval '1 day' \
         FROM generate_series(1, $2) g",
    )
    .bind(&queue)
    .bind(delayed)
    .execute(&db.pool)
    .await?;
    sqlx::query("VACUUM ANALYZE outbox.messages")
        .execute(&db.pool)
        .await?;
    let with_delayed = drain(&db, &queue, due).await?;
    broker::delete_queue(&channel, &queue).await?;

    report.push(Figure::new(
        &format!("relay_drain_with_{delayed}_delayed_pending"),
        with_delayed,
        "msg/s",
        "no_delayed_pending",
        baseline,
        Some(">= 0.90"),
    ));
    let _ = connection.close(200, "done".into()).await;
    Ok(())
}
