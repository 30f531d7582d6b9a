//! Delayed messages vs graphile-worker's scheduled jobs: `DUE` messages (jobs) due evenly over
//! a window, with `PENDING` more due in a day sitting in the same table, each side on its own
//! fresh database in the same run. Lateness is when a message reaches the consumer (for
//! graphile-worker: when its task starts) minus when it was due; throughput is how many were
//! handled per second from the first one due to the last one handled. graphile-worker's side
//! stops 30 s after the last job was due; jobs not run by then count with their lateness so
//! far (a lower bound), and its throughput is the jobs run over that time. Target: p99 lateness
//! ≤ ½ of graphile-worker's at ≥ its throughput.
//!
//! Both sides get the same lead: the worker (relay) is running before the due ones are added,
//! and the first is due `LEAD` after the insert starts. graphile-worker runs with 10 concurrent
//! jobs and a 50 ms poll interval (its default is 2 s), the relay's idle poll ceiling, so its
//! lateness is not its default poll interval.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::install;
use crate::{Figure, Report, RunningRelay, Scale, broker, quantile, relay_config};

/// The newest graphile-worker that runs on Node 20 (0.18.0 requires Node ≥ 22.18).
pub const GRAPHILE_WORKER: &str = "0.17.3";
const CONCURRENCY: u32 = 10;
const POLL_MS: u32 = 50;
const LEAD: Duration = Duration::from_secs(5);

/// What one side measured.
#[derive(Debug, serde::Deserialize)]
struct Lateness {
    done: u64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    throughput: f64,
}

fn epoch_ms(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
        * 1000.0
}

/// The relay's side.
async fn ours(due: i32, window: Duration, pending: i64) -> anyhow::Result<Lateness> {
    let db = integration_tests::fresh_db().await;
    let connection = broker::connect().await?;
    let channel = connection.create_channel().await?;
    let queue = integration_tests::unique_name("bench_peers_delayed");
    broker::declare_queue(&channel, &queue).await?;
    // The pending ones are never published, so their ids are made in bulk (as in `delayed`).
    sqlx::query(
        "INSERT INTO outbox.messages (id, exchange, routing_key, payload, available_at) \
         SELECT (1::bigint << 62) + g, '', $1, '\\x7b7d'::bytea, now() + interval '1 day' \
         FROM generate_series(1, $2) g",
    )
    .bind(&queue)
    .bind(pending)
    .execute(&db.pool)
    .await?;
    sqlx::query("VACUUM ANALYZE outbox.messages")
        .execute(&db.pool)
        .await?;

    let arrivals = broker::record_arrivals(&connection, &queue).await?;
    let relay = RunningRelay::start(db.pool.clone(), relay_config(&db, false));
    // Wall clock and monotonic clock read together, to put arrivals on the wall clock.
    let (wall0, mono0) = (SystemTime::now(), Instant::now());
    let t0 = epoch_ms(wall0) + LEAD.as_secs_f64() * 1000.0;
    let step = window.as_secs_f64() * 1000.0 / due as f64;
    let mut due_at: HashMap<String, f64> = HashMap::with_capacity(due as usize);
    let mut from = 1;
    while from <= due {
        let to = (from + 49_999).min(due);
        let rows: Vec<(i64, i32)> = sqlx::query_as(
            "SELECT outbox.enqueue('', $1, '\\x7b7d'::bytea, '{}'::jsonb, NULL, \
             to_timestamp(($2 + (g - 1) * $3) / 1000.0)), g FROM generate_series($4::int, $5::int) g",
        )
        .bind(&queue)
        .bind(t0)
        .bind(step)
        .bind(from)
        .bind(to)
        .fetch_all(&db.pool)
        .await?;
        for (id, g) in rows {
            due_at.insert(id.to_string(), t0 + (g - 1) as f64 * step);
        }
        from = to + 1;
    }
    broker::wait_arrivals(
        &arrivals,
        due as usize,
        window + LEAD + Duration::from_secs(120),
    )
    .await?;
    relay.stop().await?;
    let mut lateness = Vec::with_capacity(due as usize);
    let mut last = 0.0f64;
    for (id, at) in arrivals.lock().expect("arrivals lock").iter() {
        let Some(due) = due_at.get(id) else { continue };
        let arrived = epoch_ms(wall0) + at.duration_since(mono0).as_secs_f64() * 1000.0;
        last = last.max(arrived);
        lateness.push(arrived - due);
    }
    lateness.sort_by(f64::total_cmp);
    broker::delete_queue(&channel, &queue).await?;
    let _ = connection.close(200, "done".into()).await;
    Ok(Lateness {
        done: lateness.len() as u64,
        p50_ms: quantile(&lateness, 0.5),
        p99_ms: quantile(&lateness, 0.99),
        max_ms: lateness.last().copied().unwrap_or(f64::NAN),
        throughput: lateness.len() as f64 / ((last - t0) / 1000.0),
    })
}

/// graphile-worker's side: `bench/peers/graphile-worker.js` on its own fresh database.
async fn theirs(
    node_modules: &std::path::Path,
    due: i32,
    window: Duration,
    pending: i64,
) -> anyhow::Result<Lateness> {
    let db = integration_tests::fresh_db().await;
    let args = [
        db.url.clone(),
        due.to_string(),
        window.as_millis().to_string(),
        pending.to_string(),
        LEAD.as_millis().to_string(),
        CONCURRENCY.to_string(),
        POLL_MS.to_string(),
    ];
    install::node("graphile-worker.js", node_modules, &args).await
}

/// Runs the comparison and records its figures.
pub async fn run(scale: Scale, report: &mut Report) -> anyhow::Result<()> {
    let due = scale.pick(100_000, 2_000);
    let window = scale.pick(Duration::from_secs(60), Duration::from_secs(3));
    let pending: i64 = scale.pick(1_000_000, 20_000);
    let node_modules = match install::npm(
        &format!("graphile-worker-{GRAPHILE_WORKER}"),
        &[&format!("graphile-worker@{GRAPHILE_WORKER}")],
    ) {
        Ok(m) => m,
        Err(why) => {
            eprintln!("# peers: graphile-worker skipped: {why}");
            return Ok(());
        }
    };
    let us = ours(due, window, pending).await?;
    let them = theirs(&node_modules, due, window, pending).await?;
    eprintln!("# peers: relay {us:?}");
    eprintln!("# peers: graphile-worker {GRAPHILE_WORKER} {them:?}");
    if us.done < due as u64 || them.done < due as u64 {
        // Lateness then counts the ones not handled with their lateness so far: a lower bound.
        eprintln!(
            "# peers: handled within 30 s after the last was due: relay {} and graphile-worker {} of {due}",
            us.done, them.done
        );
    }
    let base = format!("graphile_worker_{GRAPHILE_WORKER}");
    for (what, ours, theirs, target) in [
        ("p50", us.p50_ms, them.p50_ms, None),
        ("p99", us.p99_ms, them.p99_ms, Some("<= 0.5")),
        ("max", us.max_ms, them.max_ms, None),
    ] {
        report.push(Figure::new(
            &format!("peers_delayed_lateness_{what}"),
            ours,
            "ms",
            &format!("{base}_{what}"),
            theirs,
            target,
        ));
    }
    report.push(Figure::new(
        "peers_delayed_throughput",
        us.throughput,
        "msg/s",
        &format!("{base}_jobs_per_s"),
        them.throughput,
        Some(">= 1.0"),
    ));
    Ok(())
}
