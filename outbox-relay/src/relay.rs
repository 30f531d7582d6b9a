//! The relay loop: workers that claim, publish and settle batches until shut down.
//!
//! Wake-up without NOTIFY on every commit (FIELD-NOTES: it cut producers' commit rate by 30-42 %
//! at 8-32 connections): a worker that found work claims again at once; an idle worker polls with
//! an interval that doubles from `poll_min_ms` to `poll_max_ms`, so an idle relay costs a few
//! cheap index probes per second and a new message waits at most `poll_max_ms`. Producers that
//! want less latency can `SET outbox.notify = 'on'`; the relay LISTENs and wakes every worker.
//!
//! Each worker owns its broker connection and reconnects with backoff (lapin's own recovery is
//! reported to hang; FIELD-NOTES). With several broker addresses (`amqp_url` as a comma list) a
//! worker that loses its node reconnects to the next one in the list; the backoff starts only
//! once every node has failed. The no-loss rule is untouched by a failover: a row is deleted
//! only after its confirm arrived on the connection it was published on, and confirms lost with
//! a connection leave their rows to be published again, on the new node. Database errors back off the same way. On shutdown a worker
//! finishes the batch in flight (publish, confirms, commit) and stops.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use metrics::{counter, gauge, histogram};
use sqlx::postgres::PgListener;
use sqlx::{PgPool, Postgres, Transaction};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use consumer_lib::broker::Connector;

use crate::claim::{self, Claimed, Failure, RetryPolicy};
use crate::config::Config;
use crate::publish::{Outcome, Publisher, Sent};

/// Shared state the HTTP endpoints read.
#[derive(Debug, Default)]
pub struct Health {
    /// Workers with a live broker connection.
    pub brokers_connected: AtomicUsize,
}

/// Runs `config.workers` workers, the wake-up listener and the backlog gauges until `shutdown`
/// is cancelled and every worker has finished its batch.
pub async fn run(
    pool: PgPool,
    config: Config,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let wake = Arc::new(Notify::new());
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..config.workers {
        tasks.spawn(run_worker(
            worker,
            pool.clone(),
            config.clone(),
            wake.clone(),
            health.clone(),
            shutdown.clone(),
        ));
    }
    if config.listen {
        tokio::spawn(listen(
            config.database_url.clone(),
            wake.clone(),
            shutdown.clone(),
        ));
    }
    tokio::spawn(backlog_gauges(pool.clone(), shutdown.clone()));
    while let Some(done) = tasks.join_next().await {
        done?;
    }
    info!("all relay workers stopped");
    Ok(())
}

fn reconnect_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}

async fn run_worker(
    worker: usize,
    pool: PgPool,
    config: Config,
    wake: Arc<Notify>,
    health: Arc<Health>,
    shutdown: CancellationToken,
) {
    let policy = RetryPolicy {
        max_attempts: config.max_attempts,
        min: config.retry_min_ms,
        max: config.retry_max_ms,
    };
    let mut publisher: Option<Publisher> = None;
    // Validated at start (Config::validate), so this cannot fail here.
    let urls = config.amqp_urls().expect("amqp_url validated at start");
    let mut connector = Connector::new(urls, format!("outbox-relay worker {worker}"));
    let mut broker_backoff = reconnect_backoff();
    let mut db_backoff = reconnect_backoff();
    let mut idle = config.poll_min_ms;

    while !shutdown.is_cancelled() {
        if publisher.as_ref().is_some_and(|p| !p.is_connected()) {
            warn!(worker, "broker connection lost");
            publisher = None;
            health.brokers_connected.fetch_sub(1, Ordering::Relaxed);
        }
        let Some(p) = publisher.as_mut() else {
            // Every node is tried once per round; the backoff only applies when all failed.
            let opened = match connector.connect().await {
                Ok(connected) => {
                    if connected.failover {
                        counter!("outbox_relay_broker_failovers_total").increment(1);
                    }
                    let broker = connected.url;
                    Publisher::open(connected.connection, config.confirm_timeout_ms)
                        .await
                        .map(|p| (p, broker))
                        .map_err(|e| e.to_string())
                }
                Err(e) => Err(e.to_string()),
            };
            match opened {
                Ok((p, broker)) => {
                    info!(worker, broker = %broker, "publishing");
                    publisher = Some(p);
                    health.brokers_connected.fetch_add(1, Ordering::Relaxed);
                    broker_backoff = reconnect_backoff();
                }
                Err(e) => {
                    let delay = broker_backoff.next().unwrap_or(Duration::from_secs(5));
                    warn!(worker, cause = %e, retry_in_ms = delay.as_millis() as u64, "broker connect failed");
                    sleep_or_shutdown(delay, &shutdown).await;
                }
            }
            continue;
        };

        match relay_batches(p, &pool, config.batch_size, &policy, &shutdown).await {
            Ok(0) => {
                db_backoff = reconnect_backoff();
                tokio::select! {
                    _ = tokio::time::sleep(idle) => {}
                    _ = wake.notified() => {}
                    _ = shutdown.cancelled() => {}
                }
                idle = (idle * 2).min(config.poll_max_ms);
            }
            Ok(_) => {
                db_backoff = reconnect_backoff();
                idle = config.poll_min_ms;
            }
            Err(e) => {
                let delay = db_backoff.next().unwrap_or(Duration::from_secs(5));
                warn!(worker, cause = %e, retry_in_ms = delay.as_millis() as u64, "database error");
                sleep_or_shutdown(delay, &shutdown).await;
            }
        }
    }
    if let Some(p) = publisher.take() {
        health.brokers_connected.fetch_sub(1, Ordering::Relaxed);
        p.close().await;
    }
    debug!(worker, "worker stopped");
}

async fn sleep_or_shutdown(d: Duration, shutdown: &CancellationToken) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = shutdown.cancelled() => {}
    }
}

/// Claims and publishes batches while they come back full and every message of the last one
/// was confirmed, keeping one batch's confirms in flight while the next is claimed, so the
/// broker is not left idle during the claim; then settles the last. Returns the size of the
/// last claim (0: the outbox had nothing due).
///
/// Order per key holds across the two open transactions: the next claim still sees the rows
/// the first one deleted (not yet committed), so it takes no later message of their keys.
async fn relay_batches(
    publisher: &mut Publisher,
    pool: &PgPool,
    limit: i64,
    policy: &RetryPolicy,
    shutdown: &CancellationToken,
) -> Result<usize, sqlx::Error> {
    let Some(mut current) = claim_and_send(publisher, pool, limit).await? else {
        return Ok(0);
    };
    let mut all_confirmed = true;
    loop {
        let claimed = current.batch.len();
        // After a batch that was not wholly confirmed, go back to the worker, which checks
        // the connection and rebuilds it: staying here would claim, fail and put back the
        // same full batches without end.
        if (claimed as i64) < limit
            || !all_confirmed
            || shutdown.is_cancelled()
            || !publisher.is_connected()
        {
            settle_batch(current, policy).await?;
            return Ok(claimed);
        }
        let next = claim_and_send(publisher, pool, limit).await;
        // The batch in flight is settled whatever happened to the next claim.
        all_confirmed = settle_batch(current, policy).await?;
        match next? {
            Some(batch) => current = batch,
            None => return Ok(0),
        }
    }
}

/// A claimed batch written to the broker, its confirms outstanding, its transaction open.
struct InFlight {
    tx: Transaction<'static, Postgres>,
    batch: Vec<Claimed>,
    sent: Sent,
    started: Instant,
}

/// Claims up to `limit` rows and writes them to the broker; `None` when nothing is due.
async fn claim_and_send(
    publisher: &mut Publisher,
    pool: &PgPool,
    limit: i64,
) -> Result<Option<InFlight>, sqlx::Error> {
    // The rows this transaction deletes were already confirmed by the broker. If a crash loses
    // the commit, they are simply published again (at least once; consumers dedupe by id), so
    // the relay need not wait for its WAL flush, and leaves the disk to the producers' commits.
    // One round trip: the simple-query BEGIN carries the setting.
    let mut tx = pool
        .begin_with("BEGIN; SET LOCAL synchronous_commit = off")
        .await?;
    let batch = claim::claim(&mut tx, limit).await?;
    if batch.is_empty() {
        tx.commit().await?;
        return Ok(None);
    }
    let started = Instant::now();
    let sent = publisher.send(&batch).await;
    Ok(Some(InFlight {
        tx,
        batch,
        sent,
        started,
    }))
}

/// Waits for a batch's confirms, then in its transaction deletes what was confirmed for good and
/// puts back (or dead-letters) the rest, and commits. Returns whether every message was
/// confirmed.
async fn settle_batch(in_flight: InFlight, policy: &RetryPolicy) -> Result<bool, sqlx::Error> {
    let InFlight {
        mut tx,
        batch,
        sent,
        started,
    } = in_flight;
    let outcomes = sent.outcomes().await;
    histogram!("outbox_relay_publish_batch_seconds").record(started.elapsed().as_secs_f64());

    let mut published = 0u64;
    let mut failures = Vec::new();
    let mut unknown = Vec::new();
    let now = chrono::Utc::now();
    for (msg, outcome) in batch.iter().zip(outcomes) {
        match outcome {
            Outcome::Confirmed => {
                debug!(message_id = msg.id, exchange = %msg.exchange, routing_key = %msg.routing_key, bytes = msg.payload.len(), "published");
                published += 1;
                let age = (now - msg.created_at).to_std().unwrap_or_default();
                histogram!("outbox_relay_enqueue_to_confirm_seconds").record(age.as_secs_f64());
            }
            Outcome::Failed(error) => {
                warn!(message_id = msg.id, attempt = msg.attempts + 1, cause = %error, "publish attempt failed");
                failures.push(Failure {
                    message: msg.clone(),
                    error,
                });
            }
            Outcome::Unknown(error) => {
                debug!(message_id = msg.id, cause = %error, "publish outcome unknown; will publish again");
                unknown.push(msg);
            }
        }
    }
    let settled = claim::settle(&mut tx, published, &failures, &unknown, policy).await?;
    tx.commit().await?;

    counter!("outbox_relay_published_total").increment(settled.published);
    counter!("outbox_relay_failed_attempts_total").increment(failures.len() as u64);
    counter!("outbox_relay_dead_lettered_total").increment(settled.dead_lettered);
    if !unknown.is_empty() {
        counter!("outbox_relay_unknown_outcomes_total").increment(unknown.len() as u64);
    }
    if settled.dead_lettered > 0 {
        warn!(
            count = settled.dead_lettered,
            "messages moved to dead letters"
        );
    }
    Ok(failures.is_empty() && unknown.is_empty())
}

/// Wakes every worker on `outbox_wakeup` notifications. Reconnects on error; the workers keep
/// polling meanwhile, so a lost notification costs at most `poll_max_ms`.
async fn listen(database_url: String, wake: Arc<Notify>, shutdown: CancellationToken) {
    let mut backoff = reconnect_backoff();
    while !shutdown.is_cancelled() {
        let mut listener = match PgListener::connect(&database_url).await {
            Ok(l) => l,
            Err(e) => {
                let d = backoff.next().unwrap_or(Duration::from_secs(5));
                debug!(cause = %e, "LISTEN connection failed");
                sleep_or_shutdown(d, &shutdown).await;
                continue;
            }
        };
        if let Err(e) = listener.listen("outbox_wakeup").await {
            debug!(cause = %e, "LISTEN failed");
            sleep_or_shutdown(backoff.next().unwrap_or(Duration::from_secs(5)), &shutdown).await;
            continue;
        }
        backoff = reconnect_backoff();
        loop {
            tokio::select! {
                n = listener.recv() => match n {
                    Ok(_) => wake.notify_waiters(),
                    Err(e) => {
                        debug!(cause = %e, "LISTEN connection lost");
                        break;
                    }
                },
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

/// Backlog figures for the whole outbox (every relay reports the same numbers).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Backlog {
    /// Messages due now.
    pub due: i64,
    /// Messages scheduled for later (delayed or waiting for a retry); -1 when not counted.
    pub scheduled: i64,
    /// Age of the oldest due message, seconds.
    pub oldest_due_age_seconds: f64,
    /// Messages in the dead-letter table.
    pub dead_letters: i64,
}

/// Reads the backlog figures. Counting scheduled messages walks all of them (there may be
/// millions of timeouts waiting), so it is only done when asked for.
pub async fn backlog(pool: &PgPool, count_scheduled: bool) -> Result<Backlog, sqlx::Error> {
    let (due, scheduled, oldest, dead): (i64, i64, Option<f64>, i64) = sqlx::query_as(
        "SELECT \
           (SELECT count(*) FROM outbox.messages WHERE available_at <= now()), \
           CASE WHEN $1 THEN (SELECT count(*) FROM outbox.messages WHERE available_at > now()) \
                ELSE -1 END, \
           (SELECT extract(epoch FROM now() - min(available_at))::float8 \
              FROM outbox.messages WHERE available_at <= now()), \
           (SELECT count(*) FROM outbox.dead_letters)",
    )
    .bind(count_scheduled)
    .fetch_one(pool)
    .await?;
    Ok(Backlog {
        due,
        scheduled,
        oldest_due_age_seconds: oldest.unwrap_or(0.0).max(0.0),
        dead_letters: dead,
    })
}

async fn backlog_gauges(pool: PgPool, shutdown: CancellationToken) {
    while !shutdown.is_cancelled() {
        if let Ok(b) = backlog(&pool, false).await {
            gauge!("outbox_backlog_messages").set(b.due as f64);
            gauge!("outbox_oldest_due_age_seconds").set(b.oldest_due_age_seconds);
            gauge!("outbox_dead_letters").set(b.dead_letters as f64);
        }
        sleep_or_shutdown(Duration::from_secs(2), &shutdown).await;
    }
}
