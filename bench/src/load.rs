//! Load: the whole pipeline at a fixed rate, as separate processes, for two minutes.
//!
//! Producers (24 connections in this process) commit business transactions with an enqueue at
//! 2,000 msg/s in total → the `outbox-relay` binary → RabbitMQ → consumer-lib's `inventory`
//! example (inbox + one effect row per message). A `gateway` process takes paced idempotent
//! POSTs (PostgreSQL store) at the same time so its memory under traffic is measured too.
//!
//! Every 5 s the backlog is sampled: outbox due rows and queue depth. "Flat" means the last
//! sample is at most twice the first non-zero one, or under one second of traffic (figure
//! `load_backlog_last` against that limit). Peak
//! resident memory (VmHWM) of the relay, consumer and gateway is compared with each one's
//! resident memory when idle after start.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sqlx::postgres::PgPoolOptions;

use crate::child::{Process, spawn_relay, workspace_binary};
use crate::gateway::start_gateway;
use crate::http_load::{Load, run_checked};
use crate::{Figure, Report, Scale, broker, upstream};

/// Producer connections. Each paces itself to `rate / PRODUCERS`; 40 leave every transaction
/// 20 ms at 2,000 msg/s, so a commit slowed by the rest of the pipeline on the same two cores
/// does not cap the offered rate (8 did: ≈ 1.4k msg/s on a busy machine; 24 once offered only
/// 0.94 of the rate). Not more: the whole pipeline's connections (these, relay 10, consumer 10,
/// gateway's pool) must stay inside PostgreSQL's default 100.
const PRODUCERS: usize = 40;
/// Handlers in the consumer process: the library's default.
const CONSUMER_CONCURRENCY: &str = "8";
/// Messages per consumer transaction under a backlog. One transaction per message fell behind
/// (the queue grew to 16k in the first minute and was still at 10k after two): its commits
/// compete with the producers' for the same disk flushes and two cores.
const CONSUMER_BATCH: &str = "50";

/// One sample of the backlog.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: f64,
    due: i64,
    depth: u32,
    applied: i64,
}

impl Sample {
    fn backlog(&self) -> i64 {
        self.due + self.depth as i64
    }
}

async fn sample(
    pool: &sqlx::PgPool,
    channel: &lapin::Channel,
    queue: &str,
    started: Instant,
) -> anyhow::Result<Sample> {
    let due: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox.messages WHERE available_at <= now()")
            .fetch_one(pool)
            .await?;
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM consumer_example.applied")
        .fetch_one(pool)
        .await?;
    Ok(Sample {
        at: started.elapsed().as_secs_f64(),
        due,
        depth: crate::broker::queue_len(channel, queue).await?,
        applied,
    })
}

/// Waits until the consumer has declared its queue.
async fn wait_queue(connection: &lapin::Connection, queue: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // A failed passive declare closes the channel: use a fresh one each time.
        let channel = connection.create_channel().await?;
        if crate::broker::queue_len(&channel, queue).await.is_ok() {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "queue {queue} never declared");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Paced producers: `rate` business transactions per second in total for `secs`; returns
/// how many committed.
async fn produce(
    url: String,
    exchange: String,
    rate: f64,
    secs: Duration,
) -> anyhow::Result<(u64, Duration)> {
    let pool = PgPoolOptions::new()
        .max_connections(PRODUCERS as u32)
        .connect(&url)
        .await?;
    let sent = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + secs;
    let mut tasks = Vec::new();
    for _ in 0..PRODUCERS {
        let (pool, exchange, sent) = (pool.clone(), exchange.to_owned(), sent.clone());
        tasks.push(tokio::spawn(async move {
            use sqlx::Connection;
            let mut conn = pool.acquire().await?;
            let mut tick = tokio::time::interval(Duration::from_secs_f64(PRODUCERS as f64 / rate));
            while Instant::now() < deadline {
                tick.tick().await;
                let mut tx = conn.begin().await?;
                sqlx::query("INSERT INTO bench_orders (amount) VALUES (42)")
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("SELECT outbox.enqueue($1, 'order.created', '\\x7b7d'::bytea)")
                    .bind(&exchange)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                sent.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let took = started.elapsed();
    pool.close().await;
    Ok((sent.load(Ordering::Relaxed), took))
}

/// Runs the load scenario and records its figures.
pub async fn run(scale: Scale, report: &mut Report) -> anyhow::Result<()> {
    let rate = scale.pick(2000.0, 200.0);
    let secs = Duration::from_secs(scale.pick(120, 3));
    let every = Duration::from_secs(scale.pick(5, 1));
    let consumer_bin = workspace_binary("consumer-lib", "inventory", true)?;

    let db = integration_tests::fresh_db().await;
    sqlx::raw_sql(
        "CREATE TABLE bench_orders (id bigserial PRIMARY KEY, amount int NOT NULL, \
         created_at timestamptz NOT NULL DEFAULT now());
         CREATE SCHEMA IF NOT EXISTS consumer_example;
         CREATE TABLE IF NOT EXISTS consumer_example.stock (sku text PRIMARY KEY, reserved bigint NOT NULL);
         CREATE TABLE IF NOT EXISTS consumer_example.applied (
             n bigserial PRIMARY KEY, message_id bigint NOT NULL, routing_key text NOT NULL,
             payload jsonb, applied_at timestamptz NOT NULL DEFAULT now());",
    )
    .execute(&db.pool)
    .await?;
    let name = integration_tests::unique_name("bench_load");
    let exchange = format!("{name}_x");
    let connection = broker::connect().await?;

    let mut consumer_cmd = std::process::Command::new(consumer_bin);
    consumer_cmd
        .args(["--name", &name, "--exchange", &exchange])
        .args(["--routing-key", "order.*"])
        .args(["--concurrency", CONSUMER_CONCURRENCY, "--prefetch", "400"])
        .args(["--batch-size", CONSUMER_BATCH])
        .env("DATABASE_URL", &db.url)
        .env("AMQP_URL", integration_tests::amqp_url())
        // The example logs every message at info: that would measure the terminal.
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit());
    let mut consumer = Process::spawn("consumer", consumer_cmd)?;
    if let Err(e) = wait_queue(&connection, &name).await {
        consumer.ensure_running()?;
        return Err(e);
    }
    let mut relay = spawn_relay(&db.url)?;
    let upstream = upstream::start().await?;
    let gateway = start_gateway(upstream.addr, "postgres", &db.url).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    relay.ensure_running()?;
    let idle = [
        relay.rss_mib()?,
        consumer.rss_mib()?,
        gateway.process.rss_mib()?,
    ];

    // Gateway traffic alongside: paced idempotent POSTs, a tenth of the message rate, on
    // enough connections (8) that a slow store answer does not lower the offered rate.
    let gateway_load = Load {
        rate: Some(rate / 10.0),
        idempotency_prefix: Some(integration_tests::unique_name("load")),
        ..Load::post(gateway.addr, "/idem/x", 8, secs)
    };
    let gateway_task = tokio::spawn(async move { run_checked("gateway", &gateway_load).await });
    let producers = tokio::spawn(produce(db.url.clone(), exchange.clone(), rate, secs));

    let channel = connection.create_channel().await?;
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut next = started + every;
    // Samples only inside the producing window: one taken after it would show the drained
    // tail, not the backlog under load.
    while next <= started + secs {
        tokio::time::sleep_until(next.into()).await;
        next += every;
        relay.ensure_running()?;
        consumer.ensure_running()?;
        let s = sample(&db.pool, &channel, &name, started).await?;
        println!(
            "# load t={:.0}s due={} queue={} applied={}",
            s.at, s.due, s.depth, s.applied
        );
        samples.push(s);
    }
    let (sent, took) = producers.await??;
    let at_stop = sample(&db.pool, &channel, &name, started).await?;
    let gateway_outcome = gateway_task.await??;

    // Everything sent must arrive: wait for the tail, so a silently broken pipeline fails.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = at_stop;
    while (last.applied as u64) < sent {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{} of {sent} applied 120 s after the producers stopped",
            last.applied
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        last = sample(&db.pool, &channel, &name, started).await?;
    }
    let tail = last.at - at_stop.at;
    let peaks = [
        relay.peak_rss_mib()?,
        consumer.peak_rss_mib()?,
        gateway.process.peak_rss_mib()?,
    ];
    relay.stop().await?;
    consumer.stop().await?;
    gateway.stop().await?;
    let _ = connection.close(200, "done".into()).await;

    let produced_rate = sent as f64 / took.as_secs_f64();
    let applied_rate = at_stop.applied as f64 / took.as_secs_f64();
    let max_backlog = samples.iter().map(Sample::backlog).max().unwrap_or(0);
    let first = samples
        .iter()
        .map(Sample::backlog)
        .find(|b| *b > 0)
        .unwrap_or(0);
    let last_backlog = samples.last().map_or(0, Sample::backlog);
    let one_second = rate as i64;
    // Flat: the last sample within twice the first non-zero one, or under a second of traffic.
    let flat_limit = (2 * first).max(one_second);
    let flat = last_backlog <= flat_limit;
    println!(
        "# load backlog {} (last {last_backlog}, first non-zero {first}); tail drained {tail:.1} s after stop; gateway {:.0} req/s p99 {:.1} ms",
        if flat { "flat" } else { "GROWING" },
        gateway_outcome.rate,
        gateway_outcome.p99_ms()
    );

    report.push(Figure::new(
        "load_produced_rate",
        produced_rate,
        "msg/s",
        "target_rate",
        rate,
        Some(">= 0.95"),
    ));
    report.push(Figure::new(
        "load_applied_rate",
        applied_rate,
        "msg/s",
        "load_produced_rate",
        produced_rate,
        Some(">= 0.95"),
    ));
    report.push(Figure::new(
        "load_backlog_max",
        max_backlog as f64,
        "msgs",
        "one_second_of_traffic",
        one_second as f64,
        Some("<= 1.0"),
    ));
    report.push(Figure::new(
        "load_backlog_last",
        last_backlog as f64,
        "msgs",
        "flat_limit",
        flat_limit as f64,
        Some("<= 1.0"),
    ));
    for ((name, peak), idle) in ["relay", "consumer", "gateway"].iter().zip(peaks).zip(idle) {
        report.push(Figure::new(
            &format!("{name}_peak_rss_mib"),
            peak,
            "MiB",
            &format!("{name}_idle_rss_mib"),
            idle,
            None,
        ));
    }
    Ok(())
}
