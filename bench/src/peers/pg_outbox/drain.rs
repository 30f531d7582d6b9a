//! Drain of a due backlog, ours and the peer's, and what the queue holds afterwards.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use super::{Mode, Peer};
use crate::peers::install;
use crate::{RunningRelay, broker, relay, relay_config, wait_drained};

/// What a queue held once a run was over: every message's id, read back by a consumer.
pub struct Audit {
    /// Distinct message ids.
    pub ids: HashSet<String>,
    /// Deliveries whose id had been seen already.
    pub duplicates: u64,
}

/// One side's drain.
pub struct Drained {
    /// Messages processed per second (rows marked processed, for the peer).
    pub rate: f64,
    /// Rows the side marked processed (or, for the peer's replication mode, acknowledged to
    /// the slot) by the end of its run.
    pub done: u64,
    /// Of those, how many the queue does not hold.
    pub lost: u64,
    /// Messages delivered more than once.
    pub duplicates: u64,
    /// The peer's warnings by kind, with their counts.
    pub warnings: Warnings,
}

/// The peer's warnings by kind (ids and numbers left out of the text), with their counts.
pub type Warnings = std::collections::BTreeMap<String, u64>;

/// Consumes everything `queue` holds and deletes it.
async fn audit(connection: &lapin::Connection, queue: &str) -> anyhow::Result<Audit> {
    let channel = connection.create_channel().await?;
    let held = crate::broker::queue_len(&channel, queue).await? as usize;
    let arrivals = broker::record_arrivals(connection, queue).await?;
    broker::wait_arrivals(&arrivals, held, Duration::from_secs(120)).await?;
    let mut ids = HashSet::with_capacity(held);
    let mut duplicates = 0;
    for (id, _) in arrivals.lock().expect("arrivals lock").drain(..) {
        if !ids.insert(id) {
            duplicates += 1;
        }
    }
    broker::delete_queue(&channel, queue).await?;
    let _ = channel.close(200, "done".into()).await;
    Ok(Audit { ids, duplicates })
}

/// Our relay draining `n` due messages on `db` into a fresh queue.
pub async fn ours(
    db: &integration_tests::TestDb,
    connection: &lapin::Connection,
    n: i32,
) -> anyhow::Result<Drained> {
    let channel = connection.create_channel().await?;
    let queue = integration_tests::unique_name("bench_peers_drain");
    broker::declare_queue(&channel, &queue).await?;
    relay::fill(&db.pool, &queue, n).await?;
    let started = Instant::now();
    let running = RunningRelay::start(db.pool.clone(), relay_config(db, false));
    let took = wait_drained(&db.pool, started).await?;
    running.stop().await?;
    let rate = f64::from(n) / took.as_secs_f64();
    let audit = audit(connection, &queue).await?;
    let _ = channel.close(200, "done".into()).await;
    Ok(Drained {
        rate,
        done: n as u64,
        lost: (n as u64).saturating_sub(audit.ids.len() as u64),
        duplicates: audit.duplicates,
        warnings: Warnings::new(),
    })
}

#[derive(Debug, serde::Deserialize)]
struct Script {
    rate: f64,
    warnings: Warnings,
}

/// The peer in `mode` draining `n` due messages on the database at `url` (no tables of ours
/// needed) into a fresh queue, for `max_secs` at most.
pub async fn theirs(
    peer: Peer<'_>,
    mode: Mode,
    url: &str,
    pool: &sqlx::PgPool,
    n: i32,
    max_secs: u64,
) -> anyhow::Result<Drained> {
    let channel = peer.connection.create_channel().await?;
    let queue = integration_tests::unique_name("bench_peers_pto");
    broker::declare_queue(&channel, &queue).await?;
    let slot = integration_tests::unique_name("pto");
    let args = mode.args("drain", url, &queue, n, max_secs, &slot);
    let script: Script = install::node(super::SCRIPT, peer.node_modules, &args).await?;
    // Each was confirmed before it was marked processed, so they are all in the queue by now.
    let done = done(mode, pool, &slot).await?;
    let audit = audit(peer.connection, &queue).await?;
    let _ = channel.close(200, "done".into()).await;
    Ok(Drained {
        rate: script.rate,
        done: done.all().count() as u64,
        lost: done.all().filter(|id| !audit.ids.contains(*id)).count() as u64,
        duplicates: audit.duplicates,
        warnings: script.warnings,
    })
}

/// The rows the peer is done with, by id.
pub struct Done {
    /// Marked processed (each confirmed by the broker before).
    pub processed: Vec<String>,
    /// Replication: no longer in its slot, so acknowledged, but not marked processed. Such a
    /// row is never delivered again.
    pub acked_unprocessed: Vec<String>,
}

impl Done {
    /// Every id the peer is done with.
    pub fn all(&self) -> impl Iterator<Item = &String> {
        self.processed.iter().chain(&self.acked_unprocessed)
    }
}

/// What the peer is done with, once its listener has stopped. Drops the slot.
pub async fn done(mode: Mode, pool: &sqlx::PgPool, slot: &str) -> anyhow::Result<Done> {
    let processed: Vec<String> =
        sqlx::query_scalar("SELECT id::text FROM public.outbox WHERE processed_at IS NOT NULL")
            .fetch_all(pool)
            .await?;
    let mut acked_unprocessed = Vec::new();
    if mode == Mode::Replication {
        let pending = slot_pending(pool, slot).await?;
        let unprocessed: Vec<String> =
            sqlx::query_scalar("SELECT id::text FROM public.outbox WHERE processed_at IS NULL")
                .fetch_all(pool)
                .await?;
        acked_unprocessed = unprocessed
            .into_iter()
            .filter(|id| !pending.contains(id))
            .collect();
        drop_slot(pool, slot).await?;
    }
    Ok(Done {
        processed,
        acked_unprocessed,
    })
}

/// Runs `query` (bound to `slot`) once the listener's walsender has let go of the slot: it
/// may take a moment after the listener's exit.
async fn when_inactive<T>(
    slot: &str,
    mut query: impl AsyncFnMut() -> Result<T, sqlx::Error>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match query().await {
            Ok(t) => return Ok(t),
            Err(e) if Instant::now() < deadline && e.to_string().contains("is active") => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(anyhow::anyhow!("slot {slot}: {e}")),
        }
    }
}

/// Drops the peer's replication slot.
pub async fn drop_slot(pool: &sqlx::PgPool, slot: &str) -> anyhow::Result<()> {
    when_inactive(slot, async || {
        sqlx::query("SELECT pg_drop_replication_slot($1)")
            .bind(slot)
            .execute(pool)
            .await
    })
    .await?;
    Ok(())
}

/// The ids of the outbox inserts still in `slot` (not acknowledged), read without consuming
/// them. A pgoutput protocol 1 insert message is `I`, the relation's oid (4 bytes), `N`, the
/// column count (2 bytes), then per column `t` and a 4-byte length before its text: the first
/// column, `id`, is 36 characters from byte 14 (1-based).
async fn slot_pending(pool: &sqlx::PgPool, slot: &str) -> anyhow::Result<HashSet<String>> {
    let publication = format!("{slot}_pub");
    let ids = when_inactive(slot, async || {
        sqlx::query_scalar::<_, String>(
            "SELECT convert_from(substring(data from 14 for 36), 'UTF8') \
             FROM pg_logical_slot_peek_binary_changes($1, NULL, NULL, \
                  'proto_version', '1', 'publication_names', $2) \
             WHERE get_byte(data, 0) = 73 AND get_byte(data, 5) = 78",
        )
        .bind(slot)
        .bind(&publication)
        .fetch_all(pool)
        .await
    })
    .await?;
    Ok(ids.into_iter().collect())
}
