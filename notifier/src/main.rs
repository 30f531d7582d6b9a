//! `notifier`: delivers signed webhooks from `notify.notifications` and serves the query API.
//! See `notifier --help` and the crate README.

use std::path::PathBuf;

use anyhow::{Context, bail};
use axum::routing::get;
use clap::{Parser, Subcommand};
use notifier::{Config, Worker};
use outbox::pool::PoolMode;
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;
use tracing::info;

#[derive(Parser)]
#[command(
    name = "notifier",
    version,
    about = "Delivers signed webhooks on a durable retry schedule"
)]
struct Cli {
    /// TOML configuration file (environment variables override it).
    #[arg(long, global = true, env = "NOTIFIER_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Deliver and serve the query API until SIGTERM/SIGINT (the default).
    Run,
    /// Apply the database migrations (all of the product's) and exit.
    Migrate,
    /// Validate the configuration and exit.
    CheckConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Log lines as before; spans exported over OTLP only when OTEL_EXPORTER_OTLP_ENDPOINT is set.
    let _telemetry = telemetry::init(telemetry::Options::from_env("notifier", "info"))
        .context("tracing set-up")?;
    let cli = Cli::parse();
    let cfg = Config::load(cli.config.as_deref()).context("invalid configuration")?;
    let mode = PoolMode::from_env().context("invalid configuration")?;
    match cli.command.unwrap_or(Command::Run) {
        Command::CheckConfig => {
            println!(
                "configuration ok: {} endpoint(s), {} token(s), listen {}",
                cfg.endpoints.len(),
                cfg.tokens.len(),
                cfg.listen
            );
            Ok(())
        }
        Command::Migrate => {
            // sqlx's migrator holds a session advisory lock across its statements.
            mode.require_session("notifier migrate")?;
            let pool = connect(&cfg, mode).await?;
            notifier::MIGRATOR
                .run(&pool)
                .await
                .context("applying migrations")?;
            println!("migrations applied");
            Ok(())
        }
        Command::Run => run(cfg, mode).await,
    }
}

async fn connect(cfg: &Config, mode: PoolMode) -> anyhow::Result<sqlx::PgPool> {
    let pool = PgPoolOptions::new()
        .max_connections(cfg.worker.max_in_flight.min(32) + 4)
        .connect_with(outbox::pool::connect_options(&cfg.database_url, mode)?)
        .await
        .context("connecting to the database (database_url / DATABASE_URL)")?;
    outbox::pool::check(&pool, mode).await?;
    Ok(pool)
}

async fn run(cfg: Config, mode: PoolMode) -> anyhow::Result<()> {
    let pool = connect(&cfg, mode).await?;
    if !notifier::has_schema(&pool)
        .await
        .context("checking for the notify schema")?
    {
        bail!(
            "the notify tables are missing: run `notifier migrate` (or `outbox-relay migrate`) first"
        );
    }
    if cfg.tokens.is_empty() {
        tracing::warn!(
            "no API tokens configured ([[tokens]] or NOTIFIER_API_TOKEN): the query API refuses every request"
        );
    }
    // One transaction: all endpoints or none, and safe behind a transaction pooler.
    let mut tx = pool.begin().await.context("database connection")?;
    for ep in &cfg.endpoints {
        ep.upsert(&mut tx, cfg.previous_secret_valid_for)
            .await
            .with_context(|| format!("saving endpoint {:?}", ep.id))?;
    }
    tx.commit().await.context("saving endpoints")?;

    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")?;
    let app = notifier::api::router(pool.clone(), cfg.tokens.clone()).route(
        "/metrics",
        get(move || {
            let p = prometheus.clone();
            async move { p.render() }
        }),
    );
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding listen address {}", cfg.listen))?;
    info!(addr = %cfg.listen, "query API listening");

    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(
        Worker::new(pool.clone(), cfg.worker.clone())
            .context("building the HTTP client")?
            .run(shutdown.clone()),
    );
    let server_stop = shutdown.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { server_stop.cancelled().await })
            .await
    });
    wait_for_signal().await;
    info!("signal received; finishing attempts in flight");
    shutdown.cancel();
    worker.await.context("worker task")?;
    server
        .await
        .context("server task")?
        .context("serving the API")?;
    info!("stopped");
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
