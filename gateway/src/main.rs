//! `gateway [run] --config FILE` serves until SIGTERM/SIGINT; `gateway migrate` applies the
//! product's migrations (the same set as `outbox-relay migrate`).

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use gateway::{Config, Gateway};
use tokio_util::sync::CancellationToken;

// Fewer instructions per allocation than glibc's malloc, and thread-local free lists instead of
// arena locks: the proxy path allocates and frees a few dozen small objects per request.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The log filter when `RUST_LOG` is unset. The per-request `request` and `upstream` spans
/// (and the per-request `finished` line) are left out of the log output: at `info` the log
/// layer formats their fields on every request, and plain proxying ran at 0.69 of its rate
/// without them (`cargo run --release -p bench -- peers`: 30k vs 44k req/s). Their export
/// over OTLP has its own filter and is unchanged. Warnings inside a request then print without
/// the request's route and id; `RUST_LOG=info,sqlx=warn` brings both back.
const DEFAULT_LOG: &str = "info,sqlx=warn,gateway::trace=warn,gateway::proxy=warn";

#[derive(Parser)]
#[command(
    name = "gateway",
    about = "Outbound gateway: idempotent, serialised, resilient calls to external APIs"
)]
struct Cli {
    /// The TOML config file.
    #[arg(long, env = "GATEWAY_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve (the default).
    Run,
    /// Apply the migrations to the config's `database_url` (or `--database-url`) and exit.
    Migrate {
        /// Use this database instead of the config's `database_url`.
        #[arg(long)]
        database_url: Option<String>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Log lines as before; spans exported over OTLP only when OTEL_EXPORTER_OTLP_ENDPOINT is set.
    let _telemetry = telemetry::init(telemetry::Options::from_env("gateway", DEFAULT_LOG))
        .context("tracing set-up")?;
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Migrate { database_url } => migrate(cli.config, database_url).await,
        Command::Run => run(cli.config).await,
    }
}

fn load(path: Option<PathBuf>) -> anyhow::Result<Config> {
    let Some(path) = path else {
        bail!("no config file: pass --config FILE or set GATEWAY_CONFIG");
    };
    Config::load(&path).with_context(|| format!("invalid config {}", path.display()))
}

async fn migrate(config: Option<PathBuf>, url: Option<String>) -> anyhow::Result<()> {
    let url = match url {
        Some(u) => u,
        None => load(config)?.database_url.context(
            "no database: set database_url in the config, --database-url or DATABASE_URL",
        )?,
    };
    // sqlx's migrator holds a session advisory lock across its statements.
    outbox::pool::PoolMode::from_env()?.require_session("gateway migrate")?;
    let pool = sqlx::PgPool::connect(&url)
        .await
        .context("connect to the database")?;
    gateway::MIGRATOR
        .run(&pool)
        .await
        .context("apply migrations")?;
    tracing::info!("migrations applied");
    Ok(())
}

async fn run(config: Option<PathBuf>) -> anyhow::Result<()> {
    let config = load(config)?;
    let gateway = Gateway::connect(config)
        .await
        .context("gateway cannot start")?;
    let listener = gateway.bind().await.context("gateway cannot start")?;
    let addr = listener.local_addr().context("listen address")?;
    tracing::info!(%addr, "gateway listening");
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        signal.cancel();
    });
    gateway.serve(listener, shutdown).await.context("serving")?;
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
