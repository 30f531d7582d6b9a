//! `saga`: runs the coordinator, and lets an operator list sagas and retry a stuck one.
//!
//! ```text
//! saga coordinator [--queue saga.replies]   # until SIGTERM/SIGINT
//! saga list [--state stuck] [--limit 50] [--json]
//! saga show ID
//! saga counts
//! saga retry ID
//! ```
//! `DATABASE_URL` and `AMQP_URL` as for every other binary of the product.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use saga::{Coordinator, admin};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;
use tracing::info;

#[derive(Parser)]
#[command(
    name = "saga",
    version,
    about = "Saga coordinator and operator commands"
)]
struct Cli {
    /// The database holding the sagas.
    #[arg(
        long,
        global = true,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    database_url: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Consume replies and step timeouts and advance the sagas, until SIGTERM/SIGINT.
    Coordinator {
        /// The broker.
        #[arg(
            long,
            env = "AMQP_URL",
            default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
        )]
        amqp_url: String,
        /// The reply queue (the definitions' `reply_queue`).
        #[arg(long, default_value = saga::DEFAULT_REPLY_QUEUE)]
        queue: String,
        /// The consumer name (keys the coordinator's inbox rows).
        #[arg(long, default_value = "saga-coordinator")]
        name: String,
        /// Replies applied at once.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Test hook: after the first reply's transaction commits, print `committed <id>` and
        /// freeze before acking, so a test can SIGKILL the process at exactly that point.
        #[arg(long, hide = true)]
        freeze_after_commit: bool,
    },
    /// List sagas, newest change first.
    List {
        /// Only sagas in this state (running, compensating, completed, compensated, stuck).
        #[arg(long)]
        state: Option<String>,
        /// How many.
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// One saga with its steps.
    Show {
        /// The saga id.
        id: i64,
    },
    /// How many sagas are in each state.
    Counts,
    /// Send a stuck saga's compensation again (attempts start over).
    Retry {
        /// The saga id.
        id: i64,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Coordinator {
            amqp_url,
            queue,
            name,
            concurrency,
            freeze_after_commit,
        } => {
            let pool = connect(&cli.database_url, concurrency as u32 + 2).await?;
            let mut builder = Coordinator::consumer(name, queue)
                .amqp_url(amqp_url)
                .database(pool)
                .concurrency(concurrency);
            if freeze_after_commit {
                builder = builder.after_commit(|id| {
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "committed {id}");
                    let _ = out.flush();
                    loop {
                        std::thread::park();
                    }
                });
            }
            let consumer = builder.build().context("coordinator settings")?;
            let shutdown = CancellationToken::new();
            let signal = shutdown.clone();
            tokio::spawn(async move {
                wait_for_signal().await;
                info!("shutdown requested");
                signal.cancel();
            });
            info!("coordinator running");
            consumer.run(shutdown).await.context("coordinator")?;
            Ok(())
        }
        Command::List { state, limit, json } => {
            let pool = connect(&cli.database_url, 1).await?;
            for s in admin::list(&pool, state.as_deref(), limit).await? {
                if json {
                    println!("{}", serde_json::to_string(&s)?);
                } else {
                    println!(
                        "{}\t{}\t{}\tstep={}\t{}\t{}",
                        s.id,
                        s.name,
                        s.state,
                        s.current_step,
                        s.updated_at.to_rfc3339(),
                        s.stuck_reason
                            .as_deref()
                            .or(s.failure_reason.as_deref())
                            .unwrap_or("-")
                    );
                }
            }
            Ok(())
        }
        Command::Show { id } => {
            let pool = connect(&cli.database_url, 1).await?;
            let Some((s, steps)) = admin::get(&pool, id).await? else {
                bail!("no saga with id {id}");
            };
            println!("saga {} ({}): {}", s.id, s.name, s.state);
            if let Some(r) = &s.failure_reason {
                println!("  failure: {r}");
            }
            if let Some(r) = &s.stuck_reason {
                println!("  stuck:   {r}");
            }
            for st in steps {
                println!(
                    "  [{}] {}\t{}\tcompensation attempts={} applied={}\t{}",
                    st.idx,
                    st.name,
                    st.state,
                    st.compensation_attempts,
                    st.compensations_applied,
                    st.last_error.as_deref().unwrap_or("-")
                );
            }
            Ok(())
        }
        Command::Counts => {
            let pool = connect(&cli.database_url, 1).await?;
            for (state, n) in admin::counts(&pool).await? {
                println!("{state:<13} {n}");
            }
            Ok(())
        }
        Command::Retry { id } => {
            let pool = connect(&cli.database_url, 1).await?;
            if !admin::retry(&pool, id).await? {
                bail!("saga {id} is not stuck (or does not exist); nothing changed");
            }
            println!("saga {id}: compensation sent again");
            Ok(())
        }
    }
}

async fn connect(url: &str, size: u32) -> anyhow::Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(Duration::from_secs(10))
        .connect(url)
        .await
        .context("connecting to DATABASE_URL")
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
