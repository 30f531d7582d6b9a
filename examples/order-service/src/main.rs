//! `order-service`: every process of the example, one subcommand each (one binary to build).
//!
//! ```text
//! order-service migrate                      # the example's tables (after `outbox-relay migrate`)
//! order-service api                          # the order service (HTTP)
//! order-service workers --gateway-url URL    # saga participants and coordinator, payment
//!                                            # timeouts, read model
//! order-service provider                     # the fake payment provider
//! order-service receiver --secret S          # the merchant's webhook receiver
//! order-service drive --orders 1000 ...      # the demo driver: load, summary, invariants
//! order-service remove-queues                # delete the workers' queues and the exchange
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use clap::{Parser, Subcommand};
use order_service::{api, demo, provider, receiver, schema, workers};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(about = "The order-service example of the outbox product")]
struct Cli {
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test",
        global = true
    )]
    database_url: String,
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        global = true
    )]
    amqp_url: String,
    /// Exchange of the order events.
    #[arg(long, env = "ORDER_EXCHANGE", default_value = "orders", global = true)]
    exchange: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the example's tables (idempotent).
    Migrate,
    /// The order service.
    Api {
        #[arg(long, default_value = "127.0.0.1:8000")]
        listen: SocketAddr,
        /// How long an order may stay unpaid (15 minutes; seconds in the demo).
        #[arg(long, default_value_t = 900_000)]
        payment_timeout_ms: u64,
        /// How long `POST /orders/{id}/pay` waits for the payment saga before answering 503.
        #[arg(long, default_value_t = 5_000)]
        pay_wait_ms: u64,
    },
    /// The consumers (saga participants and coordinator, payment timeouts, read model);
    /// `/metrics` and `/readyz` on `listen`.
    Workers {
        #[arg(long, default_value = "127.0.0.1:8001")]
        listen: SocketAddr,
        /// The gateway; its `/pay` and `/refund` routes lead to the payment provider.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        gateway_url: String,
        /// The notifier endpoint of the merchant's webhook.
        #[arg(long, default_value = "merchant")]
        notify_endpoint: String,
        /// Attempts per payment or refund request (through the gateway, same key).
        #[arg(long, default_value_t = 6)]
        payment_attempts: u32,
        /// Prefix of the queue names.
        #[arg(long, default_value = "")]
        queue_prefix: String,
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
    },
    /// Delete the workers' queues and the exchange (after a demo run).
    RemoveQueues {
        /// Prefix of the queue names, as given to `workers`.
        #[arg(long, default_value = "")]
        queue_prefix: String,
    },
    /// The fake payment provider.
    Provider {
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: SocketAddr,
        #[arg(long, default_value_t = 7)]
        seed: u64,
        #[arg(long, default_value_t = 0.08)]
        fail_rate: f64,
        #[arg(long, default_value_t = 0.03)]
        slow_rate: f64,
        #[arg(long, default_value_t = 1500)]
        slow_ms: u64,
    },
    /// The merchant's webhook receiver.
    Receiver {
        #[arg(long, default_value = "127.0.0.1:9100")]
        listen: SocketAddr,
        #[arg(long, env = "WEBHOOK_SECRET")]
        secret: String,
        #[arg(long, default_value_t = 0.1)]
        fail_rate: f64,
        #[arg(long, default_value_t = 11)]
        seed: u64,
    },
    /// Drive the demo; prints the summary, exits 1 when an invariant fails.
    Drive {
        #[arg(long, default_value_t = 1000)]
        orders: usize,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        #[arg(long)]
        api_url: String,
        #[arg(long)]
        relay_url: String,
        #[arg(long)]
        gateway_url: String,
        #[arg(long)]
        workers_url: String,
        #[arg(long)]
        provider_url: String,
        #[arg(long)]
        receiver_url: String,
        #[arg(long)]
        payment_timeout_ms: u64,
        #[arg(long, default_value_t = 30)]
        settle_secs: u64,
    },
}

async fn pool(url: &str, size: u32) -> anyhow::Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(Duration::from_secs(10))
        .connect(url)
        .await
        .context("connect to DATABASE_URL")
}

/// Cancels the token on SIGTERM or Ctrl-C. Only `main` listens for signals.
fn on_signal(shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        shutdown.cancel();
    });
}

async fn serve(listen: SocketAddr, app: Router, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("bind {listen}"))?;
    tracing::info!(addr = %listen, "listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .context("serve")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Spans exported over OTLP only when OTEL_EXPORTER_OTLP_ENDPOINT is set (README: Tracing).
    let _telemetry = telemetry::init(telemetry::Options::from_env(
        "order-service",
        "info,sqlx=warn",
    ))
    .context("tracing set-up")?;
    let cli = Cli::parse();
    let shutdown = CancellationToken::new();
    on_signal(shutdown.clone());
    match cli.command {
        Command::Migrate => {
            let pool = pool(&cli.database_url, 1).await?;
            schema::apply(&pool).await.context("apply schema.sql")?;
        }
        Command::Api {
            listen,
            payment_timeout_ms,
            pay_wait_ms,
        } => {
            let state = api::AppState {
                pool: pool(&cli.database_url, 16).await?,
                exchange: cli.exchange,
                payment_timeout: Duration::from_millis(payment_timeout_ms),
                pay_wait: Duration::from_millis(pay_wait_ms),
            };
            serve(listen, api::router(state), shutdown).await?;
        }
        Command::Workers {
            listen,
            gateway_url,
            notify_endpoint,
            payment_attempts,
            queue_prefix,
            concurrency,
        } => {
            let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
                .install_recorder()
                .context("install the metrics recorder")?;
            let ready = Arc::new(AtomicBool::new(false));
            let flag = ready.clone();
            let app = Router::new()
                .route("/metrics", get(move || async move { prometheus.render() }))
                .route(
                    "/readyz",
                    get(move || async move {
                        if flag.load(Ordering::SeqCst) {
                            (StatusCode::OK, "ready")
                        } else {
                            (StatusCode::SERVICE_UNAVAILABLE, "queues not declared yet")
                        }
                    }),
                );
            let config = workers::WorkersConfig {
                amqp_url: cli.amqp_url,
                exchange: cli.exchange,
                queue_prefix,
                concurrency,
                gateway_url,
                payment_attempts,
                notify_endpoint,
            };
            // Six consumers; the payment participant holds its connection across the gateway call.
            let db = pool(&cli.database_url, 4 * concurrency as u32 + 4).await?;
            let http = tokio::spawn(serve(listen, app, shutdown.clone()));
            workers::run(config, db, ready, shutdown.clone()).await?;
            shutdown.cancel();
            http.await.context("metrics server")??;
        }
        Command::RemoveQueues { queue_prefix } => {
            let config = workers::WorkersConfig {
                amqp_url: cli.amqp_url,
                exchange: cli.exchange,
                queue_prefix,
                concurrency: 1,
                gateway_url: String::new(),
                payment_attempts: 1,
                notify_endpoint: String::new(),
            };
            workers::remove_topology(&config)
                .await
                .context("remove the demo's queues")?;
        }
        Command::Provider {
            listen,
            seed,
            fail_rate,
            slow_rate,
            slow_ms,
        } => {
            let p = provider::Provider::new(provider::ProviderConfig {
                seed,
                fail_rate,
                slow_rate,
                slow: Duration::from_millis(slow_ms),
            });
            serve(listen, p.router(), shutdown).await?;
        }
        Command::Receiver {
            listen,
            secret,
            fail_rate,
            seed,
        } => {
            let r = receiver::Receiver::new(secret, fail_rate, seed);
            serve(listen, r.router(), shutdown).await?;
        }
        Command::Drive {
            orders,
            concurrency,
            seed,
            api_url,
            relay_url,
            gateway_url,
            workers_url,
            provider_url,
            receiver_url,
            payment_timeout_ms,
            settle_secs,
        } => {
            let summary = demo::run(demo::DemoConfig {
                orders,
                concurrency,
                seed,
                api_url,
                relay_metrics_url: format!("{relay_url}/metrics"),
                gateway_metrics_url: format!("{gateway_url}/metrics"),
                workers_metrics_url: format!("{workers_url}/metrics"),
                provider_url,
                receiver_url,
                database_url: cli.database_url,
                amqp_url: cli.amqp_url,
                exchange: cli.exchange,
                payment_timeout: Duration::from_millis(payment_timeout_ms),
                settle_deadline: Duration::from_secs(settle_secs),
            })
            .await?;
            println!("{summary}");
            if !summary.failures.is_empty() {
                std::process::exit(1);
            }
        }
    }
    Ok(())
}
