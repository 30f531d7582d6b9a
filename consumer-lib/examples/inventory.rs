//! The inventory service of the order flow: consumes `order.created` and reserves stock,
//! exactly once per message however often the broker delivers it.
//!
//! ```text
//! cargo run -p consumer-lib --example inventory -- --exchange orders --routing-key 'order.*'
//! ```
//!
//! Every applied message is also written to `consumer_example.applied` (no unique key), so
//! `SELECT count(*), count(DISTINCT message_id) FROM consumer_example.applied` shows that
//! duplicates published by hand changed nothing. SIGTERM or Ctrl-C stops it gracefully.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use consumer_lib::lapin::ExchangeKind;
use consumer_lib::{Consumer, Handler, HandlerError, Message, RetryPolicy};
use serde::Deserialize;
use sqlx::PgTransaction;
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Args {
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    database_url: String,
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
    /// Consumer name (keys the inbox) and queue name.
    #[arg(long, default_value = "inventory")]
    name: String,
    /// Exchange the producer publishes to (declared as a durable topic exchange if missing).
    #[arg(long, default_value = "orders")]
    exchange: String,
    /// Binding key.
    #[arg(long, default_value = "order.*")]
    routing_key: String,
    /// Keep per-order-id order (the relay's `x-ordering-key`).
    #[arg(long)]
    ordered: bool,
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    #[arg(long, default_value_t = 200)]
    prefetch: u16,
    /// Messages per transaction under a backlog (1: one transaction per message).
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
}

/// What the order service puts in `order.created`. Every field is optional so any JSON
/// object is accepted; one that is not an object is dead-lettered as undecodable.
#[derive(Debug, Deserialize)]
struct OrderCreated {
    #[serde(default)]
    sku: Option<String>,
    #[serde(default)]
    quantity: Option<i64>,
}

struct ReserveStock;

impl Handler for ReserveStock {
    type Payload = OrderCreated;

    async fn handle(
        &self,
        message: &Message<OrderCreated>,
        tx: &mut PgTransaction<'static>,
    ) -> Result<(), HandlerError> {
        let order = &message.payload;
        if let Some(quantity) = order.quantity
            && quantity <= 0
        {
            return Err(HandlerError::reject(format!(
                "quantity must be positive, got {quantity}"
            )));
        }
        if let (Some(sku), Some(quantity)) = (&order.sku, order.quantity) {
            sqlx::query(
                "INSERT INTO consumer_example.stock (sku, reserved) VALUES ($1, $2) \
                 ON CONFLICT (sku) DO UPDATE SET reserved = stock.reserved + EXCLUDED.reserved",
            )
            .bind(sku)
            .bind(quantity)
            .execute(&mut **tx)
            .await?;
        }
        let payload: serde_json::Value =
            serde_json::from_slice(message.raw()).unwrap_or(serde_json::Value::Null);
        sqlx::query(
            "INSERT INTO consumer_example.applied (message_id, routing_key, payload) VALUES ($1, $2, $3)",
        )
        .bind(message.id)
        .bind(message.routing_key())
        .bind(payload)
        .execute(&mut **tx)
        .await?;
        tracing::info!(
            message_id = message.id,
            attempt = message.attempt,
            "stock reserved"
        );
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let pool = PgPoolOptions::new()
        .max_connections(args.concurrency as u32 + 2)
        .connect(&args.database_url)
        .await
        .context("connect to DATABASE_URL")?;
    // The example applies the product's migrations itself so it runs on an empty database;
    // a real service leaves that to `outbox-relay migrate`.
    migrations::MIGRATOR
        .run(&pool)
        .await
        .context("apply migrations")?;
    sqlx::raw_sql(
        "CREATE SCHEMA IF NOT EXISTS consumer_example;
         CREATE TABLE IF NOT EXISTS consumer_example.stock (sku text PRIMARY KEY, reserved bigint NOT NULL);
         CREATE TABLE IF NOT EXISTS consumer_example.applied (
             n bigserial PRIMARY KEY, message_id bigint NOT NULL, routing_key text NOT NULL,
             payload jsonb, applied_at timestamptz NOT NULL DEFAULT now());",
    )
    .execute(&pool)
    .await
    .context("create the example's tables")?;

    let consumer = Consumer::builder(&args.name)
        .amqp_url(&args.amqp_url)
        .database(pool)
        .declare_exchange(&args.exchange, ExchangeKind::Topic)
        .bind(&args.exchange, &args.routing_key)
        .ordered(args.ordered)
        .concurrency(args.concurrency)
        .prefetch(args.prefetch)
        .batch_size(args.batch_size)
        .dead_letter_queue(true)
        .retry(
            RetryPolicy::exponential()
                .max_attempts(6)
                .min_delay(Duration::from_millis(500))
                .max_delay(Duration::from_secs(60)),
        )
        .handler(ReserveStock)
        .build()
        .context("configure the consumer")?;

    // Only main listens for signals; the library takes the token.
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down");
        on_signal.cancel();
    });
    consumer.run(shutdown).await.context("consumer")?;
    Ok(())
}
