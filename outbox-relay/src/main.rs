//! `outbox-relay`: the relay binary. See `outbox-relay --help`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use outbox::pool::PoolMode;
use outbox_relay::relay::{self, Health};
use outbox_relay::{Config, admin, http};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;
use tracing::info;

#[derive(Parser)]
#[command(
    name = "outbox-relay",
    version,
    about = "Relays committed outbox messages from PostgreSQL to RabbitMQ"
)]
struct Cli {
    /// TOML configuration file (environment variables override it).
    #[arg(long, global = true, env = "OUTBOX_RELAY_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Relay until SIGTERM/SIGINT, then finish the batch in flight and exit 0 (the default).
    Run,
    /// Apply the database migrations and exit.
    Migrate {
        /// This database's id in the global message-id space (0-127); unique per database.
        #[arg(long, value_parser = clap::value_parser!(u8).range(0..=127))]
        database_id: Option<u8>,
    },
    /// Print the backlog, the oldest due message's age and the dead letters.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Inspect and redrive dead letters.
    Dead {
        #[command(subcommand)]
        command: DeadCommand,
    },
    /// Decide prepared messages by hand.
    Prepared {
        #[command(subcommand)]
        command: PreparedCommand,
    },
    /// List sagas by state and retry a stuck one (also the `saga` binary, and `/v1/sagas`).
    Saga {
        #[command(subcommand)]
        command: SagaCommand,
    },
}

/// id, name, state, current step, stuck or failure reason, last change.
type SagaRow = (
    i64,
    String,
    String,
    i32,
    Option<String>,
    chrono::DateTime<chrono::Utc>,
);

#[derive(Subcommand)]
enum SagaCommand {
    /// List sagas, newest change first.
    List {
        /// Only this state: running, compensating, completed, compensated, stuck.
        #[arg(long, value_parser = ["running", "compensating", "completed", "compensated", "stuck"])]
        state: Option<String>,
        /// How many.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..=10000))]
        limit: i64,
    },
    /// Send a stuck saga's compensation again (attempts start over).
    Retry {
        /// The saga id.
        id: i64,
    },
}

#[derive(Subcommand)]
enum DeadCommand {
    /// List the newest dead letters.
    List {
        /// How many.
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// Put dead letters back in the outbox (attempts reset, ids kept).
    Redrive {
        /// The message id to redrive.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<i64>,
        /// Redrive every dead letter.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Subcommand)]
enum PreparedCommand {
    /// Resolve a prepared (parked or undecided) message.
    Resolve {
        /// The message id.
        id: i64,
        /// `commit` publishes it, `rollback` removes it.
        #[arg(value_parser = ["commit", "rollback"])]
        decision: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Log lines as before; spans exported over OTLP only when OTEL_EXPORTER_OTLP_ENDPOINT is set.
    let _telemetry =
        telemetry::init(telemetry::Options::from_env("outbox-relay", "info,sqlx=warn").stderr())
            .context("tracing set-up")?;
    let cli = Cli::parse();
    let config = Config::load(cli.config.as_deref()).context("invalid configuration")?;
    let mode = PoolMode::from_env().context("invalid configuration")?;

    match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(config, mode).await,
        Command::Migrate { database_id } => {
            // sqlx's migrator holds a session advisory lock across its statements.
            mode.require_session("outbox-relay migrate")?;
            let pool = connect(&config, mode, 2).await?;
            migrations::MIGRATOR
                .run(&pool)
                .await
                .context("applying migrations")?;
            if let Some(id) = database_id {
                admin::set_database_id(&pool, id).await?;
            }
            let id = admin::database_id(&pool).await?;
            println!("migrations applied; database id {id}");
            Ok(())
        }
        Command::Status { json } => {
            let pool = connect(&config, mode, 2).await?;
            let backlog = relay::backlog(&pool, true).await?;
            let database_id = admin::database_id(&pool).await?;
            let prepared = outbox_relay::prepared::checkback::counts(&pool).await?;
            let parked = outbox_relay::prepared::checkback::unresolved(&pool, 20).await?;
            if json {
                let mut v = serde_json::to_value(backlog)?;
                v["database_id"] = database_id.into();
                v["prepared_pending"] = prepared.pending.into();
                v["prepared_unresolved"] = prepared.unresolved.into();
                v["prepared_unresolved_ids"] = parked
                    .iter()
                    .map(|m| m.id.to_string())
                    .collect::<Vec<_>>()
                    .into();
                println!("{v}");
            } else {
                println!("database id          {database_id}");
                println!("due                  {}", backlog.due);
                println!("scheduled            {}", backlog.scheduled);
                println!(
                    "oldest due age       {:.3} s",
                    backlog.oldest_due_age_seconds
                );
                println!("dead letters         {}", backlog.dead_letters);
                println!("prepared pending     {}", prepared.pending);
                println!("prepared unresolved  {}", prepared.unresolved);
                for m in parked {
                    println!(
                        "  unresolved {} checks={} check_url={} last_error={}",
                        m.id,
                        m.check_attempts,
                        m.check_url.as_deref().unwrap_or("-"),
                        m.last_check_error.as_deref().unwrap_or("-")
                    );
                }
            }
            Ok(())
        }
        Command::Dead { command } => {
            let pool = connect(&config, mode, 2).await?;
            match command {
                DeadCommand::List { limit } => {
                    for d in admin::list_dead(&pool, limit).await? {
                        println!(
                            "{}\t{}\t{}\tattempts={}\t{}\t{}",
                            d.id,
                            d.exchange,
                            d.routing_key,
                            d.attempts,
                            d.dead_lettered_at.to_rfc3339(),
                            d.reason
                        );
                    }
                    Ok(())
                }
                DeadCommand::Redrive { id: Some(id), .. } => {
                    if admin::redrive(&pool, &[id]).await? == 0 {
                        bail!("no dead letter with id {id}");
                    }
                    println!("redriven 1");
                    Ok(())
                }
                DeadCommand::Redrive { id: None, .. } => redrive_all(&pool).await,
            }
        }
        Command::Saga { command } => {
            let pool = connect(&config, mode, 2).await?;
            match command {
                SagaCommand::List { state, limit } => {
                    let rows: Vec<SagaRow> =
                        sqlx::query_as(
                            "SELECT id, name, state, current_step, coalesce(stuck_reason, failure_reason), \
                                 updated_at FROM saga.instances \
                             WHERE ($1::text IS NULL OR state = $1) \
                             ORDER BY updated_at DESC, id DESC LIMIT $2",
                        )
                        .bind(&state)
                        .bind(limit)
                        .fetch_all(&pool)
                        .await
                        .context("listing sagas")?;
                    for (id, name, state, step, reason, at) in rows {
                        println!(
                            "{id}\t{name}\t{state}\tstep={step}\t{}\t{}",
                            at.to_rfc3339(),
                            reason.as_deref().unwrap_or("-")
                        );
                    }
                    Ok(())
                }
                SagaCommand::Retry { id } => {
                    let retried: bool = sqlx::query_scalar("SELECT saga.retry($1)")
                        .bind(id)
                        .fetch_one(&pool)
                        .await
                        .with_context(|| format!("retrying saga {id}"))?;
                    if !retried {
                        bail!("saga {id} is not stuck (or does not exist); nothing changed");
                    }
                    println!("saga {id}: compensation sent again");
                    Ok(())
                }
            }
        }
        Command::Prepared {
            command: PreparedCommand::Resolve { id, decision },
        } => {
            let pool = connect(&config, mode, 2).await?;
            let d: outbox_relay::prepared::checkback::Decision =
                decision.parse().map_err(anyhow::Error::msg)?;
            outbox_relay::prepared::checkback::resolve(&pool, outbox::MessageId(id), d)
                .await
                .with_context(|| format!("resolving prepared message {id}"))?;
            println!("prepared message {id}: {decision}");
            Ok(())
        }
    }
}

async fn connect(config: &Config, mode: PoolMode, size: u32) -> anyhow::Result<PgPool> {
    let options = outbox::pool::connect_options(&config.database_url, mode)?;
    let pool = PgPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .with_context(|| {
            format!(
                "connecting to {}",
                outbox_relay::config::redact_url(&config.database_url)
            )
        })?;
    outbox::pool::check(&pool, mode).await?;
    Ok(pool)
}

async fn redrive_all(pool: &PgPool) -> anyhow::Result<()> {
    let total = admin::dead_count(pool).await?;
    let bar = ProgressBar::new(total as u64).with_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} redriven ({per_sec}, eta {eta})")
            .expect("valid template"),
    );
    let mut moved = 0;
    loop {
        let ids = admin::dead_ids(pool, 1000).await?;
        if ids.is_empty() {
            break;
        }
        let n = admin::redrive(pool, &ids).await?;
        moved += n;
        bar.inc(n);
    }
    bar.finish();
    println!("redriven {moved}");
    Ok(())
}

async fn run(mut config: Config, mode: PoolMode) -> anyhow::Result<()> {
    if mode.is_transaction() && config.listen {
        // A LISTEN behind a transaction pooler lands on whichever server connection runs it,
        // and the pooler's reset drops it: the relay polls instead.
        info!("DATABASE_POOL_MODE=transaction: LISTEN off, polling for new messages");
        config.listen = false;
    }
    info!(config = %config.redacted(), ?mode, "starting relay");
    let metrics = outbox_relay::metrics::install()?;
    let options = outbox::pool::connect_options(&config.database_url, mode)?;
    let pool = PgPoolOptions::new()
        .max_connections(config.db_pool_size)
        .acquire_timeout(Duration::from_secs(10))
        .connect_lazy_with(options.clone());
    // The database may be down at start (the relay waits for it), so only a wrong mode that
    // answers is refused here.
    match outbox::pool::check(&pool, mode).await {
        Err(outbox::pool::PoolError::Database(e)) => {
            tracing::warn!(cause = %e, "database not reachable at start; retrying in the workers")
        }
        other => other?,
    }
    let shutdown = CancellationToken::new();
    let health = Arc::new(Health::default());

    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("binding RELAY_HTTP_ADDR {}", config.http_addr))?;
    info!(addr = %listener.local_addr()?, "http listening");
    let api = outbox_relay::prepared::api::router(pool.clone(), config.admin_token.clone()).merge(
        outbox_relay::saga_api::router(pool.clone(), config.admin_token.clone()).merge(
            outbox_relay::dashboard::router(outbox_relay::dashboard::Settings {
                pool: pool.clone(),
                admin_token: config.admin_token.clone(),
                amqp_url: config.amqp_url.clone(),
                metrics: Some(metrics.clone()),
                public_read: config.dashboard_public_read,
            }),
        ),
    );
    let router = http::router(pool.clone(), health.clone(), Some(metrics), api);
    let server = tokio::spawn(http::serve(listener, router, shutdown.clone()));
    // Check-back gets its own small pool: slow producers' check endpoints must not hold the
    // connections the publishing workers need.
    let check_pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(10))
        .connect_lazy_with(options);
    let checkback = tokio::spawn(outbox_relay::prepared::checkback::run(
        check_pool,
        config.checkback.clone(),
        shutdown.clone(),
    ));

    let signals = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        info!("shutdown requested; finishing batches in flight");
        signals.cancel();
    });

    relay::run(pool.clone(), config, health, shutdown.clone()).await?;
    shutdown.cancel();
    checkback.await??;
    server.await??;
    pool.close().await;
    info!("relay stopped");
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
