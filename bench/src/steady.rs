//! Steady state: producers committing business transactions (insert an order + enqueue +
//! commit) on 8 connections.
//!
//! - Commit rate as fast as they can, with the relay running vs not running (target ≥ 0.85):
//!   what the relay's claims and deletes cost the producers. Runs alternate to spread drift.
//! - Latency at a fixed 2,000 msg/s, from each producer's `COMMIT` returning to the message
//!   reaching a consumer (which includes the broker confirm the target is about, plus the
//!   delivery), p50 and p99, with the relay polling and with NOTIFY wake-up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::postgres::PgPoolOptions;

use crate::{Figure, Report, RunningRelay, Scale, broker, quantile, relay_config};

const PRODUCERS: usize = 8;

async fn setup(db: &integration_tests::TestDb) -> anyhow::Result<()> {
    sqlx::query(
        "CREATE TABLE bench_orders (id bigserial PRIMARY KEY, amount int NOT NULL, \
         created_at timestamptz NOT NULL DEFAULT now())",
    )
    .execute(&db.pool)
    .await?;
    Ok(())
}

/// One business transaction; returns the message id.
async fn business_tx(conn: &mut sqlx::PgConnection, queue: &str) -> anyhow::Result<i64> {
    use sqlx::Connection;
    let mut tx = conn.begin().await?;
    sqlx::query("INSERT INTO bench_orders (amount) VALUES (42)")
        .execute(&mut *tx)
        .await?;
    let id: i64 = sqlx::query_scalar("SELECT outbox.enqueue('', $1, '\\x7b7d'::bytea)")
        .bind(queue)
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(id)
}

/// Producers as fast as they can for `secs`; returns transactions per second.
async fn max_rate(
    db: &integration_tests::TestDb,
    queue: &str,
    secs: Duration,
) -> anyhow::Result<f64> {
    let pool = PgPoolOptions::new()
        .max_connections(PRODUCERS as u32)
        .connect(&db.url)
        .await?;
    let deadline = Instant::now() + secs;
    let mut tasks = Vec::new();
    for _ in 0..PRODUCERS {
        let pool = pool.clone();
        let queue = queue.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut conn = pool.acquire().await?;
            let mut n = 0u64;
            while Instant::now() < deadline {
                business_tx(&mut conn, &queue).await?;
                n += 1;
            }
            anyhow::Ok(n)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    pool.close().await;
    Ok(total as f64 / secs.as_secs_f64())
}

/// Producers paced to `rate` in total for `secs`, with NOTIFY or not; returns the latencies
/// (ms) from commit to arrival.
async fn paced_latency(
    db: &integration_tests::TestDb,
    queue: &str,
    rate: u64,
    secs: Duration,
    notify: bool,
) -> anyhow::Result<Vec<f64>> {
    let connection = broker::connect().await?;
    let arrivals = broker::record_arrivals(&connection, queue).await?;
    let relay = RunningRelay::start(db.pool.clone(), relay_config(db, notify));
    tokio::time::sleep(Duration::from_millis(300)).await; // relay connected and idle
    let committed: Arc<Mutex<HashMap<String, Instant>>> = Arc::new(Mutex::new(HashMap::new()));
    let pool = PgPoolOptions::new()
        .max_connections(PRODUCERS as u32)
        .connect(&db.url)
        .await?;
    let per_producer = Duration::from_secs_f64(PRODUCERS as f64 / rate as f64);
    let deadline = Instant::now() + secs;
    let mut tasks = Vec::new();
    for _ in 0..PRODUCERS {
        let (pool, queue, committed) = (pool.clone(), queue.to_owned(), committed.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = pool.acquire().await?;
            if notify {
                sqlx::query("SET outbox.notify = 'on'")
                    .execute(&mut *conn)
                    .await?;
            }
            let mut tick = tokio::time::interval(per_producer);
            while Instant::now() < deadline {
                tick.tick().await;
                let id = business_tx(&mut conn, &queue).await?;
                committed
                    .lock()
                    .expect("lock")
                    .insert(id.to_string(), Instant::now());
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let sent = committed.lock().expect("lock").len();
    broker::wait_arrivals(&arrivals, sent, Duration::from_secs(60)).await?;
    relay.stop().await?;
    pool.close().await;
    let mut latencies: Vec<f64> = {
        let committed = committed.lock().expect("lock");
        arrivals
            .lock()
            .expect("lock")
            .iter()
            .filter_map(|(id, at)| {
                let c = committed.get(id)?;
                // A message can arrive before its producer's COMMIT call has returned to it.
                Some(at.saturating_duration_since(*c).as_secs_f64() * 1000.0)
            })
            .collect()
    };
    latencies.sort_by(f64::total_cmp);
    let _ = connection.close(200, "done".into()).await;
    Ok(latencies)
}

/// The producers' commit rate as fast as they can with the relay (the `outbox-relay` binary)
/// running and stopped, `rounds` alternating rounds of `secs` each: (running, stopped), tx/s.
pub async fn commit_rates(
    db: &integration_tests::TestDb,
    channel: &lapin::Channel,
    queue: &str,
    secs: Duration,
    rounds: u32,
) -> anyhow::Result<(f64, f64)> {
    let (mut off, mut on) = (0.0, 0.0);
    // Phase marks for bench/scripts/cpu-split.py, which attributes CPU time per phase.
    for _ in 0..rounds {
        eprintln!("# phase relay_stopped");
        off += max_rate(db, queue, secs).await?;
        eprintln!("# phase idle");
        // The relay as deployed: the `outbox-relay` binary in its own process, so its work
        // competes with the producers for the machine, not for their async runtime. The next
        // round starts from an empty outbox, as the relay-on round will keep it.
        let mut relay = crate::child::spawn_relay(&db.url)?;
        crate::wait_drained(&db.pool, Instant::now()).await?;
        relay.ensure_running()?;
        eprintln!("# phase relay_running");
        on += max_rate(db, queue, secs).await?;
        eprintln!("# phase idle");
        crate::wait_drained(&db.pool, Instant::now()).await?;
        relay.ensure_running()?;
        relay.stop().await?;
        broker::purge(channel, queue).await?;
    }
    Ok((on / f64::from(rounds), off / f64::from(rounds)))
}

/// A fresh database with the producers' table, and a durable queue for their messages.
pub async fn prepare(
    channel: &lapin::Channel,
) -> anyhow::Result<(integration_tests::TestDb, String)> {
    let db = integration_tests::fresh_db().await;
    setup(&db).await?;
    let queue = integration_tests::unique_name("bench_steady");
    broker::declare_queue(channel, &queue).await?;
    Ok((db, queue))
}

/// Runs the steady-state scenario and records its figures.
pub async fn run(scale: Scale, report: &mut Report) -> anyhow::Result<()> {
    let secs = scale.pick(Duration::from_secs(8), Duration::from_millis(500));
    let rounds = scale.pick(2, 1);
    let connection = broker::connect().await?;
    let channel = connection.create_channel().await?;
    let (db, queue) = prepare(&channel).await?;

    let (on, off) = commit_rates(&db, &channel, &queue, secs, rounds).await?;
    eprintln!("# phase latency");
    report.push(Figure::new(
        "producer_commit_rate_relay_running",
        on,
        "tx/s",
        "relay_stopped",
        off,
        Some(">= 0.85"),
    ));

    let rate = scale.pick(2000, 400);
    for notify in [false, true] {
        let lat = paced_latency(&db, &queue, rate, secs, notify).await?;
        broker::purge(&channel, &queue).await?;
        let mode = if notify { "notify" } else { "polling" };
        let (p50, p99) = (quantile(&lat, 0.50), quantile(&lat, 0.99));
        report.push(Figure::new(
            &format!("commit_to_consumer_p50_{mode}_{rate}_per_s"),
            p50,
            "ms",
            "target_10ms",
            10.0,
            Some("<= 1.0"),
        ));
        report.push(Figure::new(
            &format!("commit_to_consumer_p99_{mode}_{rate}_per_s"),
            p99,
            "ms",
            "target_50ms",
            50.0,
            Some("<= 1.0"),
        ));
    }
    broker::delete_queue(&channel, &queue).await?;
    let _ = connection.close(200, "done".into()).await;
    Ok(())
}
