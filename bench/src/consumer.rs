//! Consumer: consumer-lib draining a pre-filled queue with inbox dedupe and one effect row per
//! message, against (a) a raw lapin consumer that only acks (same queue size and prefetch) and
//! (b) the database's commit ceiling at the same concurrency: 8 connections each doing what
//! the library does per message (insert an inbox row + insert an effect row + commit) with no
//! broker (target ≥ 0.8 × (b)); and (c) the same per-message work written by hand on lapin and
//! sqlx, which shows what the broker's deliveries and acks cost before any library code runs
//! (the library is measured against it too). Batching is measured twice: the library again with
//! `batch_size` 50 (its transactions take the deliveries waiting, up to 50), and on the
//! database side alone, K messages' rows per commit vs one.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use consumer_lib::{Consumer, Handler, HandlerError, Message};
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Confirmation};
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;

use crate::{Figure, Report, Scale, broker};

/// Handlers (and database connections) at once; consumer-lib's default.
const CONCURRENCY: usize = 8;
/// Unacked deliveries in flight, for both consumers (≥ 100, below which prefetch starves).
const PREFETCH: u16 = 200;
/// Messages per transaction in the database-side batching comparison.
const BATCH: usize = 10;
/// consumer-lib's `batch_size` in the batched drain: at most this many of the deliveries
/// waiting per transaction.
const LIBRARY_BATCH: usize = 50;

/// Publishes `n` persistent messages with `message_id` 1..=n (the library needs positive ids)
/// and a `{}` body, 1,000 confirms in flight.
pub async fn prefill(connection: &lapin::Connection, queue: &str, n: usize) -> anyhow::Result<()> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut pending = VecDeque::with_capacity(1000);
    for id in 1..=n {
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.into(),
                // mandatory: an unroutable message would otherwise vanish and the drain hang.
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                b"{}",
                BasicProperties::default()
                    .with_message_id(id.to_string().into())
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2),
            )
            .await?;
        pending.push_back(confirm);
        if pending.len() >= 1000 {
            let c = pending.pop_front().expect("non-empty");
            anyhow::ensure!(matches!(c.await?, Confirmation::Ack(None)), "prefill nack");
        }
    }
    for c in pending {
        anyhow::ensure!(matches!(c.await?, Confirmation::Ack(None)), "prefill nack");
    }
    let _ = channel.close(200, "done".into()).await;
    Ok(())
}

struct Effect;

impl Handler for Effect {
    type Payload = serde::de::IgnoredAny;

    async fn handle(
        &self,
        message: &Message<serde::de::IgnoredAny>,
        tx: &mut sqlx::PgTransaction<'static>,
    ) -> Result<(), HandlerError> {
        sqlx::query("INSERT INTO bench_effects (message_id) VALUES ($1)")
            .bind(message.id)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

/// consumer-lib draining `n` messages from `queue` with `batch` messages per transaction at
/// most; returns msg/s.
async fn library_drain(
    db: &integration_tests::TestDb,
    queue: &str,
    n: u64,
    batch: usize,
) -> anyhow::Result<f64> {
    sqlx::query("TRUNCATE bench_effects")
        .execute(&db.pool)
        .await?;
    let pool = PgPoolOptions::new()
        .max_connections(CONCURRENCY as u32 + 2)
        // As consumer-lib's README advises for a pool of the consumer's own: no ping round
        // trip before each message's transaction (measured 0.84 → 0.95 of the hand-written
        // consumer). `BENCH_POOL_PING=1` measures sqlx's default instead.
        .test_before_acquire(std::env::var_os("BENCH_POOL_PING").is_some())
        .connect(&db.url)
        .await?;
    let applied = Arc::new(AtomicU64::new(0));
    let counter = applied.clone();
    let consumer = Consumer::builder(queue)
        .amqp_url(integration_tests::amqp_url())
        .database(pool.clone())
        .queue(queue)
        .prefetch(PREFETCH)
        .concurrency(CONCURRENCY)
        .batch_size(batch)
        .after_commit(move |_| {
            counter.fetch_add(1, Ordering::Relaxed);
        })
        .handler(Effect)
        .build()?;
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let task = tokio::spawn(consumer.run(shutdown.clone()));
    let deadline = started + Duration::from_secs(300);
    while applied.load(Ordering::Relaxed) < n {
        anyhow::ensure!(
            Instant::now() < deadline && !task.is_finished(),
            "consumer-lib applied {} of {n}",
            applied.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    shutdown.cancel();
    task.await??;
    let effects: i64 = sqlx::query_scalar("SELECT count(*) FROM bench_effects")
        .fetch_one(&pool)
        .await?;
    anyhow::ensure!(
        effects as u64 == n,
        "{effects} effect rows for {n} messages"
    );
    pool.close().await;
    Ok(rate)
}

/// The least any consumer with an inbox does per message here, written by hand: a lapin
/// consumer (same prefetch) feeding `CONCURRENCY` tasks, each on one connection held for the
/// whole run; per message `BEGIN`, the inbox insert, the effect insert, `COMMIT`, then the ack.
/// None of the library's bookkeeping (retries, dead letters, metrics, spans, reconnects), so
/// the library's own cost is what separates it from this. Returns msg/s.
async fn hand_drain(
    db: &integration_tests::TestDb,
    connection: &lapin::Connection,
    queue: &str,
    n: u64,
) -> anyhow::Result<f64> {
    sqlx::query("TRUNCATE bench_effects")
        .execute(&db.pool)
        .await?;
    let pool = PgPoolOptions::new()
        .max_connections(CONCURRENCY as u32)
        .connect(&db.url)
        .await?;
    let started = Instant::now();
    let (channel, mut consumer) = broker::consume(connection, queue, PREFETCH).await?;
    let (sender, receiver) =
        tokio::sync::mpsc::channel::<lapin::message::Delivery>(PREFETCH as usize);
    let receiver = Arc::new(tokio::sync::Mutex::new(receiver));
    let mut workers = Vec::new();
    for _ in 0..CONCURRENCY {
        let (pool, receiver) = (pool.clone(), receiver.clone());
        workers.push(tokio::spawn(async move {
            use sqlx::Connection;
            let mut conn = pool.acquire().await?;
            let mut applied = 0u64;
            loop {
                let Some(delivery) = receiver.lock().await.recv().await else {
                    return anyhow::Ok(applied);
                };
                let id: i64 = delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .ok_or_else(|| anyhow::anyhow!("no message_id"))?
                    .as_str()
                    .parse()?;
                let mut tx = conn.begin().await?;
                let fresh = sqlx::query(
                    "INSERT INTO inbox.processed (consumer, message_id) VALUES ('bench_hand', $1) \
                     ON CONFLICT (consumer, message_id) DO NOTHING",
                )
                .bind(id)
                .execute(&mut *tx)
                .await?
                .rows_affected()
                    == 1;
                if fresh {
                    sqlx::query("INSERT INTO bench_effects (message_id) VALUES ($1)")
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                delivery.acker.ack(BasicAckOptions::default()).await?;
                applied += u64::from(fresh);
            }
        }));
    }
    for _ in 0..n {
        let delivery = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .map_err(|_| anyhow::anyhow!("hand-written consumer stalled"))?
            .ok_or_else(|| anyhow::anyhow!("hand-written consumer stream ended"))??;
        sender.send(delivery).await?;
    }
    drop(sender);
    let mut applied = 0;
    for w in workers {
        applied += w.await??;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    anyhow::ensure!(
        applied == n,
        "hand-written consumer applied {applied} of {n}"
    );
    let _ = channel.close(200, "done".into()).await;
    pool.close().await;
    Ok(rate)
}

/// A raw lapin consumer that only acks, one ack per message; returns msg/s.
async fn raw_drain(connection: &lapin::Connection, queue: &str, n: u64) -> anyhow::Result<f64> {
    let started = Instant::now();
    let (channel, mut consumer) = broker::consume(connection, queue, PREFETCH).await?;
    let mut seen = 0;
    while seen < n {
        let delivery = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .map_err(|_| anyhow::anyhow!("raw consumer stalled at {seen} of {n}"))?
            .ok_or_else(|| anyhow::anyhow!("raw consumer stream ended"))??;
        delivery.acker.ack(BasicAckOptions::default()).await?;
        seen += 1;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    let _ = channel.close(200, "done".into()).await;
    Ok(rate)
}

/// `CONCURRENCY` connections, each committing transactions of `per_tx` messages' worth of
/// rows (one inbox row + one effect row per message) for `secs`; returns messages per second.
async fn commit_ceiling(
    db: &integration_tests::TestDb,
    per_tx: usize,
    secs: Duration,
) -> anyhow::Result<f64> {
    let pool = PgPoolOptions::new()
        .max_connections(CONCURRENCY as u32)
        .connect(&db.url)
        .await?;
    let next_id = Arc::new(AtomicI64::new(1));
    let deadline = Instant::now() + secs;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let (pool, next_id) = (pool.clone(), next_id.clone());
        // Each run its own inbox consumer name, as ids start at 1 again.
        let name = format!("ceiling_{per_tx}");
        tasks.push(tokio::spawn(async move {
            let mut conn = pool.acquire().await?;
            let mut n = 0u64;
            while Instant::now() < deadline {
                use sqlx::Connection;
                let mut tx = conn.begin().await?;
                for _ in 0..per_tx {
                    let id = next_id.fetch_add(1, Ordering::Relaxed);
                    sqlx::query(
                        "INSERT INTO inbox.processed (consumer, message_id) VALUES ($1, $2)",
                    )
                    .bind(&name)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                    sqlx::query("INSERT INTO bench_effects (message_id) VALUES ($1)")
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                n += per_tx as u64;
            }
            anyhow::Ok(n)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    let rate = total as f64 / started.elapsed().as_secs_f64();
    pool.close().await;
    Ok(rate)
}

/// consumer-lib draining `n` messages one per transaction, and the database's commit ceiling at
/// the same concurrency over `secs`, on a database of their own: (library, ceiling), msg/s.
pub async fn library_vs_ceiling(n: usize, secs: Duration) -> anyhow::Result<(f64, f64)> {
    let db = integration_tests::fresh_db().await;
    create_effects(&db).await?;
    let connection = broker::connect().await?;
    let channel = connection.create_channel().await?;
    let queue = integration_tests::unique_name("bench_consume");
    broker::declare_queue(&channel, &queue).await?;
    prefill(&connection, &queue, n).await?;
    eprintln!("# phase library");
    let library = library_drain(&db, &queue, n as u64, 1).await?;
    broker::delete_queue(&channel, &queue).await?;
    eprintln!("# phase db_ceiling");
    let ceiling = commit_ceiling(&db, 1, secs).await?;
    eprintln!("# phase idle");
    let _ = connection.close(200, "done".into()).await;
    Ok((library, ceiling))
}

async fn create_effects(db: &integration_tests::TestDb) -> anyhow::Result<()> {
    sqlx::query(
        "CREATE TABLE bench_effects (id bigserial PRIMARY KEY, message_id bigint NOT NULL, \
         applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .execute(&db.pool)
    .await?;
    Ok(())
}

/// Runs the consumer scenario and records its figures.
pub async fn run(scale: Scale, report: &mut Report) -> anyhow::Result<()> {
    let n = scale.pick(50_000, 1_000);
    let secs = Duration::from_secs_f64(scale.pick(8.0, 0.5));
    let db = integration_tests::fresh_db().await;
    create_effects(&db).await?;
    let connection = broker::connect().await?;
    let channel = connection.create_channel().await?;

    // Baseline (a): the raw consumer on a queue of the same size.
    let raw_queue = integration_tests::unique_name("bench_consume_raw");
    broker::declare_queue(&channel, &raw_queue).await?;
    prefill(&connection, &raw_queue, n).await?;
    // Phase marks for bench/scripts/cpu-split.py.
    eprintln!("# phase raw_consumer");
    let raw = raw_drain(&connection, &raw_queue, n as u64).await?;
    eprintln!("# phase idle");
    broker::delete_queue(&channel, &raw_queue).await?;

    // The library. Its queue is a plain durable queue, as the library declares it.
    let queue = integration_tests::unique_name("bench_consume");
    broker::declare_queue(&channel, &queue).await?;
    prefill(&connection, &queue, n).await?;
    eprintln!("# phase library");
    let library = library_drain(&db, &queue, n as u64, 1).await?;
    broker::delete_queue(&channel, &queue).await?;

    // Baseline (c): the same per-message work written by hand.
    let hand_queue = integration_tests::unique_name("bench_consume_hand");
    broker::declare_queue(&channel, &hand_queue).await?;
    prefill(&connection, &hand_queue, n).await?;
    eprintln!("# phase hand_written");
    let hand = hand_drain(&db, &connection, &hand_queue, n as u64).await?;
    eprintln!("# phase idle");
    broker::delete_queue(&channel, &hand_queue).await?;

    // The library again, batching.
    let queue = integration_tests::unique_name("bench_consume_batch");
    broker::declare_queue(&channel, &queue).await?;
    prefill(&connection, &queue, n).await?;
    eprintln!("# phase library_batched");
    let library_batched = library_drain(&db, &queue, n as u64, LIBRARY_BATCH).await?;
    broker::delete_queue(&channel, &queue).await?;

    // Baseline (b) and batching, on the same (now populated) tables.
    eprintln!("# phase db_ceiling");
    let ceiling = commit_ceiling(&db, 1, secs).await?;
    eprintln!("# phase db_ceiling_batched");
    let batched = commit_ceiling(&db, BATCH, secs).await?;

    report.push(Figure::new(
        "consumer_inbox_drain",
        library,
        "msg/s",
        "db_commit_ceiling_8conn",
        ceiling,
        Some(">= 0.80"),
    ));
    report.push(Figure::new(
        "consumer_inbox_drain",
        library,
        "msg/s",
        "raw_ack_only_consumer",
        raw,
        None,
    ));
    report.push(Figure::new(
        "consumer_inbox_drain",
        library,
        "msg/s",
        "hand_written_inbox_consumer",
        hand,
        None,
    ));
    report.push(Figure::new(
        "hand_written_inbox_consumer",
        hand,
        "msg/s",
        "db_commit_ceiling_8conn",
        ceiling,
        None,
    ));
    report.push(Figure::new(
        &format!("consumer_inbox_drain_batch_size_{LIBRARY_BATCH}"),
        library_batched,
        "msg/s",
        "db_commit_ceiling_8conn",
        ceiling,
        None,
    ));
    report.push(Figure::new(
        &format!("consumer_inbox_drain_batch_size_{LIBRARY_BATCH}"),
        library_batched,
        "msg/s",
        "raw_ack_only_consumer",
        raw,
        None,
    ));
    report.push(Figure::new(
        &format!("db_ceiling_batch{BATCH}_per_commit"),
        batched,
        "msg/s",
        "db_commit_ceiling_8conn",
        ceiling,
        None,
    ));
    let _ = connection.close(200, "done".into()).await;
    Ok(())
}
