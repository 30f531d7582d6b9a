//! The benchmark harness. Every figure is a ratio against a baseline measured in the same run,
//! because these machines are shared and noisy: absolute numbers drift, ratios much less.
//!
//! - [`report`]: a [`Figure`] per measurement, printed as `name value unit baseline ratio` and
//!   collected into `target/bench/results.json`.
//! - [`relay`]: drain of a due backlog vs a raw pipelined publisher and a naive relay.
//! - [`steady`]: producers' commit rate with and without the relay; commit-to-consumer latency
//!   at a fixed rate, with and without NOTIFY.
//! - [`delayed`]: drain of due messages with a million delayed ones pending vs none.
//! - [`broker`]: the raw publisher and queue helpers the scenarios share.
//! - [`consumer`]: consumer-lib's drain vs a raw ack-only consumer and the database's commit
//!   ceiling at the same concurrency; what batching several messages per commit gives.
//! - [`gateway`]: the gateway binary vs nginx `proxy_pass` and the upstream called directly;
//!   idempotent POSTs on the PostgreSQL and Redis stores.
//! - [`split`]: the producers' and the consumer's figures again with RabbitMQ on a core of its
//!   own (`taskset`), as if the broker had its own host.
//! - [`load`]: the whole pipeline as processes at 2,000 msg/s for two minutes: backlog over
//!   time and peak memory of relay, consumer and gateway.
//! - [`peers`]: us vs peers installed from their registries (nginx, haproxy,
//!   pg-transactional-outbox, graphile-worker),
//!   each figure a ratio against the peer in the same run.
//! - [`child`], [`upstream`], [`http_load`]: child processes, the HTTP upstream, and the HTTP
//!   load generator those scenarios share.
//!
//! [`Scale`] sets sizes: `full` for the README's figures, `smoke` for the test suite (so the
//! harness cannot rot without a failing test).

pub mod broker;
pub mod child;
pub mod consumer;
pub mod delayed;
pub mod gateway;
pub mod http_load;
pub mod load;
pub mod peers;
pub mod relay;
pub mod report;
pub mod split;
pub mod steady;
pub mod upstream;

pub use report::{Figure, Report};

/// How big the runs are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// The real measurement.
    Full,
    /// Seconds in total: proves every scenario still runs end to end.
    Smoke,
}

impl Scale {
    /// `full` or `smoke` size.
    pub fn pick<T>(self, full: T, smoke: T) -> T {
        match self {
            Scale::Full => full,
            Scale::Smoke => smoke,
        }
    }
}

/// A relay running in this process until [`RunningRelay::stop`].
pub struct RunningRelay {
    shutdown: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RunningRelay {
    /// Starts the relay library on `pool` with `config`.
    pub fn start(pool: sqlx::PgPool, config: outbox_relay::Config) -> Self {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(outbox_relay::relay::run(
            pool,
            config,
            std::sync::Arc::new(outbox_relay::relay::Health::default()),
            shutdown.clone(),
        ));
        RunningRelay { shutdown, task }
    }

    /// Stops it after its batches in flight.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.task.await?
    }
}

/// The relay configuration the benchmarks use: defaults, pointed at `db`. `BENCH_RELAY_WORKERS`
/// and `BENCH_RELAY_BATCH` override workers and batch size, for tuning experiments.
pub fn relay_config(db: &integration_tests::TestDb, listen: bool) -> outbox_relay::Config {
    let defaults = outbox_relay::Config::default();
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<usize>().ok());
    let workers = env("BENCH_RELAY_WORKERS").unwrap_or(defaults.workers);
    outbox_relay::Config {
        database_url: db.url.clone(),
        amqp_url: integration_tests::amqp_url(),
        listen,
        workers,
        batch_size: env("BENCH_RELAY_BATCH").map_or(defaults.batch_size, |b| b as i64),
        db_pool_size: defaults.db_pool_size.max(2 * workers as u32 + 2),
        ..defaults
    }
}

/// Whether any due message is left.
pub async fn due_left(pool: &sqlx::PgPool) -> anyhow::Result<bool> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM outbox.messages WHERE available_at <= now())",
    )
    .fetch_one(pool)
    .await?)
}

/// Waits until no due message is left; returns the time since `started`.
pub async fn wait_drained(
    pool: &sqlx::PgPool,
    started: std::time::Instant,
) -> anyhow::Result<std::time::Duration> {
    let deadline = started + std::time::Duration::from_secs(600);
    loop {
        if !due_left(pool).await? {
            return Ok(started.elapsed());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "outbox not drained in 10 minutes"
        );
        // Every 50 ms: the probe may be planned as a sequential scan, which late in a drain
        // reads thousands of pages of deleted rows before a live one; every 5 ms that took
        // CPU from the relay being measured. 50 ms overstates a 7 s drain by 0.7 % at most.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Quantile `q` (0..=1) of sorted values.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}
