//! A consumer for the fault suite, built on consumer-lib in ordered mode with a single active
//! consumer: it records every application of a message in `fault_applied` (no unique key, so a
//! double application would show), and its running count of suppressed duplicates in
//! `fault_consumer_stats` every 100 ms (a SIGKILL loses at most that much of the count).
//!
//! With `BATCH_SIZE` set it runs unordered instead, every instance consuming at once, with that
//! many waiting messages per transaction at most: the batched path under the same faults.
//!
//! With `QUORUM` set it declares its queues as quorum queues: the cluster fault suite.
//!
//! Env: DATABASE_URL, AMQP_URL, QUEUE, BATCH_SIZE (optional), QUORUM (optional). SIGTERM stops
//! it gracefully.

use std::time::Duration;

use consumer_lib::{Consumer, Handler, HandlerError, Message, RetryPolicy};
use sqlx::PgTransaction;
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;

struct Record;

impl Handler for Record {
    type Payload = serde_json::Value;

    async fn handle(
        &self,
        message: &Message<serde_json::Value>,
        tx: &mut PgTransaction<'static>,
    ) -> Result<(), HandlerError> {
        let key = message.payload["key"].as_str().unwrap_or("?").to_owned();
        let seq = message.payload["seq"].as_i64().unwrap_or(-1);
        sqlx::query("INSERT INTO fault_applied (message_id, key, seq) VALUES ($1, $2, $3)")
            .bind(message.id)
            .bind(key)
            .bind(seq)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

fn duplicates(rendered: &str) -> u64 {
    rendered
        .lines()
        .filter(|l| l.starts_with(consumer_lib::metrics::DUPLICATES_TOTAL))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
    let database_url = std::env::var("DATABASE_URL")?;
    let amqp_url = std::env::var("AMQP_URL")?;
    let queue = std::env::var("QUEUE")?;
    let pool = PgPoolOptions::new()
        .max_connections(12)
        .acquire_timeout(Duration::from_secs(3))
        .connect_lazy(&database_url)?;

    let batch: Option<usize> = match std::env::var("BATCH_SIZE") {
        Ok(n) => Some(n.parse()?),
        Err(_) => None,
    };
    let consumer = Consumer::builder("fault-suite")
        .amqp_url(&amqp_url)
        .database(pool.clone())
        .queue(&queue)
        .quorum(std::env::var_os("QUORUM").is_some())
        .ordered(batch.is_none())
        .single_active_consumer(batch.is_none())
        .batch_size(batch.unwrap_or(1))
        .concurrency(8)
        .prefetch(200)
        // Long enough to ride out a database restart without dead-lettering anything.
        .retry(
            RetryPolicy::exponential()
                .max_attempts(60)
                .min_delay(Duration::from_millis(50))
                .max_delay(Duration::from_secs(1)),
        )
        .handler(Record)
        .build()?;

    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        term.recv().await;
        stop.cancel();
    });
    let pid = std::process::id() as i32;
    let stats = shutdown.clone();
    tokio::spawn(async move {
        while !stats.is_cancelled() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let n = duplicates(&metrics.render()) as i64;
            let _ = sqlx::query(
                "INSERT INTO fault_consumer_stats (pid, duplicates) VALUES ($1, $2) \
                 ON CONFLICT (pid) DO UPDATE SET duplicates = EXCLUDED.duplicates",
            )
            .bind(pid)
            .bind(n)
            .execute(&pool)
            .await;
        }
    });
    consumer.run(shutdown).await?;
    Ok(())
}
