//! Relay vs npm `pg-transactional-outbox` in both its modes: drain of a backlog of due 512-byte
//! messages into a durable queue with publisher confirms, and commit → consumer latency at a
//! steady rate. Each side on its own fresh database and queue in the same run; our relay is
//! measured on the same PostgreSQL cluster as the peer's mode it is compared with.
//!
//! - **Polling** on the shared cluster. It polls every 10 ms for batches of 50 (its defaults,
//!   500 ms and 5, drain about 10 msg/s) and its rows are `parallel`, so batches are not
//!   serialised per segment.
//! - **Logical replication** ([`initializeReplicationMessageListener`]) on a second cluster with
//!   `wal_level=logical` ([`LogicalCluster`]), with its own setup script's publication and slot.
//!   Its default concurrency controller is a mutex (one message at a time); it runs here with
//!   its semaphore controller at 50 handlers, the polling batch size.
//!
//! The peer publishes with amqplib on a confirm channel and waits for each message's confirm
//! in its handler, which is how its README asks a publisher to guarantee delivery. The drain's
//! rows are committed in one statement after the setup (so after the slot exists), then the
//! listener starts; its run stops after `MAX_SECS` if the backlog is not drained by then: the
//! rate is rows processed per second either way. Afterwards the queue is read back: rows the
//! peer marked processed, or (replication) acknowledged to its slot, that the queue does not
//! hold are lost; ids delivered twice are duplicates. Targets: the relay ≥ 5 × the peer's
//! drain rate; p99 latency ≤ ¼ of the best mode's.
//!
//! The steady run commits rows one transaction each, as its `initializeMessageStorage` inserts
//! them, while its listener runs in a node process; latencies are over the messages that
//! arrived before the harness stopped waiting (a mode that falls behind the offered rate has
//! the rest still in its table, so its percentiles are lower bounds). In replication mode some
//! never arrive: PostgreSQL streams a commit once its WAL is flushed, which can be before the
//! committing session has made its rows visible to others, and the listener's handler looks
//! the row up at once (`SELECT … FOR NO KEY UPDATE NOWAIT`); finding none it warns
//! `MESSAGE_NOT_FOUND`, skips the message and acknowledges its LSN, so the row stays
//! unprocessed and is not streamed again. Those are counted as lost (acknowledged, not
//! processed, read from the slot with `pg_logical_slot_peek_binary_changes` after the run).
//!
//! [`initializeReplicationMessageListener`]: https://github.com/Zehelein/pg-transactional-outbox
//! [`LogicalCluster`]: super::logical_pg::LogicalCluster

mod drain;
mod steady;

use std::time::Duration;

use super::logical_pg::LogicalCluster;
use super::{install, latency};
use crate::{Figure, Report, Scale, broker};

/// The pinned peer and its AMQP client.
pub const PG_TRANSACTIONAL_OUTBOX: &str = "0.5.7";
/// See [`PG_TRANSACTIONAL_OUTBOX`].
pub const AMQPLIB: &str = "0.10.9";
const SIZE: i32 = 512;

/// The script, in `bench/peers/`.
const SCRIPT: &str = "pg-transactional-outbox.js";
/// Polling: rows per batch; replication: handlers at once.
const BATCH: u32 = 50;
/// Polling interval, ms.
const POLL_MS: u32 = 10;

/// What every run of the peer needs: its installed packages and the harness's broker
/// connection.
#[derive(Clone, Copy)]
struct Peer<'a> {
    node_modules: &'a std::path::Path,
    connection: &'a lapin::Connection,
}

/// The peer's listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Polling,
    Replication,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Polling => "polling",
            Mode::Replication => "replication",
        }
    }

    /// The figures' baseline.
    fn baseline(self) -> String {
        format!(
            "pg_transactional_outbox_{PG_TRANSACTIONAL_OUTBOX}_{}",
            self.name()
        )
    }

    /// The script's arguments for `job` (`drain` or `listen`).
    fn args(
        self,
        job: &str,
        url: &str,
        queue: &str,
        n: i32,
        max_secs: u64,
        slot: &str,
    ) -> Vec<String> {
        vec![
            self.name().to_owned(),
            job.to_owned(),
            url.to_owned(),
            integration_tests::amqp_url(),
            queue.to_owned(),
            n.to_string(),
            SIZE.to_string(),
            max_secs.to_string(),
            BATCH.to_string(),
            POLL_MS.to_string(),
            slot.to_owned(),
        ]
    }
}

/// Runs the comparison and records its figures.
pub async fn run(scale: Scale, report: &mut Report) -> anyhow::Result<()> {
    let n = scale.pick(100_000, 2_000);
    let max_secs = scale.pick(60, 10);
    let rate = scale.pick(2_000, 200);
    let secs = Duration::from_secs(scale.pick(30, 3));
    // How long the peer's side waits for stragglers after its last commit: in full, as long
    // as `latency::ours` waits for ours. Its replication mode loses messages (see the module
    // doc), so its wait always runs out: shorter in smoke.
    let grace = Duration::from_secs(scale.pick(30, 2));
    let folder = format!("pg-transactional-outbox-{PG_TRANSACTIONAL_OUTBOX}");
    let node_modules = match install::npm(
        &folder,
        &[
            &format!("pg-transactional-outbox@{PG_TRANSACTIONAL_OUTBOX}"),
            &format!("amqplib@{AMQPLIB}"),
        ],
    ) {
        Ok(m) => m,
        Err(why) => {
            eprintln!("# peers: pg-transactional-outbox skipped: {why}");
            return Ok(());
        }
    };
    let connection = broker::connect().await?;
    let peer = Peer {
        node_modules: &node_modules,
        connection: &connection,
    };

    // Drain, polling mode, on the shared cluster.
    let db = integration_tests::fresh_db().await;
    let ours = drain::ours(&db, &connection, n).await?;
    db.pool.close().await;
    let db = integration_tests::fresh_db().await;
    let polling = drain::theirs(peer, Mode::Polling, &db.url, &db.pool, n, max_secs).await?;
    db.pool.close().await;
    drained(report, Mode::Polling, n, &ours, &polling);

    // Drain, replication mode, on a cluster with `wal_level=logical`.
    let cluster = match tokio::task::spawn_blocking(LogicalCluster::start).await? {
        Ok(c) => Some(c),
        Err(why) => {
            eprintln!(
                "# peers: pg-transactional-outbox replication mode skipped: no cluster with \
                 wal_level=logical: {why:#}"
            );
            None
        }
    };
    let mut replication_ok = cluster.is_some();
    if let Some(cluster) = &cluster {
        let measured = async {
            let db = cluster.fresh_outbox_db().await?;
            let ours = drain::ours(&db, &connection, n).await?;
            db.pool.close().await;
            let (url, pool) = cluster.fresh_db().await?;
            let theirs = drain::theirs(peer, Mode::Replication, &url, &pool, n, max_secs).await?;
            pool.close().await;
            anyhow::Ok((ours, theirs))
        }
        .await;
        match measured {
            Ok((ours, theirs)) => drained(report, Mode::Replication, n, &ours, &theirs),
            Err(why) => {
                replication_ok = false;
                eprintln!("# peers: pg-transactional-outbox replication mode skipped: {why:#}");
            }
        }
    }

    // Steady rate, each mode against ours on the same cluster.
    let mut steady = Vec::new();
    let ours = latency::ours(None, rate, secs).await?;
    let db = integration_tests::fresh_db().await;
    let (theirs, stopped) =
        steady::theirs(peer, Mode::Polling, &db.url, &db.pool, rate, secs, grace).await?;
    db.pool.close().await;
    steady.push((Mode::Polling, ours, theirs, stopped));
    if let (Some(cluster), true) = (&cluster, replication_ok) {
        let measured = async {
            let ours = latency::ours(Some(cluster.fresh_outbox_db().await?), rate, secs).await?;
            let (url, pool) = cluster.fresh_db().await?;
            let (theirs, stopped) =
                steady::theirs(peer, Mode::Replication, &url, &pool, rate, secs, grace).await?;
            pool.close().await;
            anyhow::Ok((ours, theirs, stopped))
        }
        .await;
        match measured {
            Ok((ours, theirs, stopped)) => steady.push((Mode::Replication, ours, theirs, stopped)),
            Err(why) => eprintln!(
                "# peers: pg-transactional-outbox replication mode, steady rate skipped: {why:#}"
            ),
        }
    }
    let best = steady
        .iter()
        .map(|(mode, _, theirs, _)| (*mode, theirs.p99_ms))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(mode, _)| mode);
    for (mode, ours, theirs, stopped) in &steady {
        eprintln!(
            "# peers: steady {rate} msg/s for {} s: ours sent {} ({:.0}/s) received {} (duplicates \
             {}) p50 {:.1} p99 {:.1} max {:.1} ms; pg-transactional-outbox {} sent {} ({:.0}/s) \
             received {} within {} s (processed {} by its stop, lost {}, duplicates {}) p50 {:.1} \
             p99 {:.1} max {:.1} ms{}",
            secs.as_secs(),
            ours.sent,
            ours.committed_per_sec,
            ours.received,
            ours.duplicates,
            ours.p50_ms,
            ours.p99_ms,
            ours.max_ms,
            mode.name(),
            theirs.sent,
            theirs.committed_per_sec,
            theirs.received,
            grace.as_secs(),
            stopped.processed,
            stopped.lost,
            theirs.duplicates,
            theirs.p50_ms,
            theirs.p99_ms,
            theirs.max_ms,
            warned(&stopped.warnings),
        );
        report.push(Figure::new(
            "peers_relay_latency_p99",
            ours.p99_ms,
            "ms",
            &mode.baseline(),
            theirs.p99_ms,
            (best == Some(*mode)).then_some("<= 0.25"),
        ));
        report.push(Figure::new(
            "peers_relay_latency_p50",
            ours.p50_ms,
            "ms",
            &mode.baseline(),
            theirs.p50_ms,
            None,
        ));
    }
    drop(cluster);
    let _ = connection.close(200, "done".into()).await;
    Ok(())
}

/// Prints and records one mode's drain.
fn drained(
    report: &mut Report,
    mode: Mode,
    n: i32,
    ours: &drain::Drained,
    theirs: &drain::Drained,
) {
    eprintln!(
        "# peers: drain of {n}: ours {:.0} msg/s (lost {}, duplicates {}); pg-transactional-outbox \
         {PG_TRANSACTIONAL_OUTBOX} ({}, amqplib {AMQPLIB}): {} of {n} done at {:.0} msg/s, lost \
         {}, duplicates {}{}",
        ours.rate,
        ours.lost,
        ours.duplicates,
        mode.name(),
        theirs.done,
        theirs.rate,
        theirs.lost,
        theirs.duplicates,
        warned(&theirs.warnings),
    );
    report.push(Figure::new(
        "peers_relay_drain",
        ours.rate,
        "msg/s",
        &mode.baseline(),
        theirs.rate,
        Some(">= 5.0"),
    ));
}

/// `; it warned: N × "..."` for the peer's warnings, if any.
fn warned(warnings: &drain::Warnings) -> String {
    if warnings.is_empty() {
        return String::new();
    }
    let each: Vec<String> = warnings
        .iter()
        .map(|(text, count)| format!("{count} × {text:?}"))
        .collect();
    format!("; it warned: {}", each.join(", "))
}
