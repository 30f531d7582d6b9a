//! Globally unique 64-bit message ids, Snowflake-style.
//!
//! Layout (63 bits, always positive), shared with the SQL function `outbox.next_id()`:
//!
//! | bits | field |
//! |---|---|
//! | 41 | milliseconds since 2024-01-01T00:00:00Z (until 2093) |
//! | 7 | database id (`outbox.settings.database_id`) |
//! | 6 | node: 0 is the SQL function, 1..=63 are leased to producer processes |
//! | 9 | sequence within the millisecond |
//!
//! Uniqueness rests on three facts: a database id is unique per database (an operator setting),
//! a node is leased to one live process at a time (`outbox.id_nodes`), and a node never issues a
//! timestamp at or below one it (or an earlier holder) may already have used. The last is kept
//! across restarts by reserving time ahead in the database before issuing ids in it, and within a
//! process by refusing to go backwards: a small clock step back is waited out, a large one is an
//! error. [`Clock`] is injectable so all of this is tested without touching the system clock.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::Error;

mod clock;
pub use clock::{Clock, ManualClock, SystemClock};

/// 2024-01-01T00:00:00Z in milliseconds since the Unix epoch.
pub const EPOCH_MS: u64 = 1_704_067_200_000;
const SEQ_BITS: u32 = 9;
const NODE_BITS: u32 = 6;
const DB_BITS: u32 = 7;
const TIME_BITS: u32 = 41;
/// Highest sequence number within one millisecond.
pub const MAX_SEQ: u16 = (1 << SEQ_BITS) - 1;
/// Highest node number.
pub const MAX_NODE: u8 = (1 << NODE_BITS) - 1;
/// Highest database id.
pub const MAX_DATABASE_ID: u8 = (1 << DB_BITS) - 1;

/// A message id: unique across every producer database that has its own database id.
///
/// Its decimal form is the AMQP `message_id` of the published message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId(pub i64);

/// The fields packed into a [`MessageId`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdParts {
    /// Milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// The producing database's id.
    pub database_id: u8,
    /// The node within that database (0: the SQL function).
    pub node: u8,
    /// The sequence number within the millisecond.
    pub seq: u16,
}

impl MessageId {
    /// Packs the parts into an id. `unix_ms` must not be before [`EPOCH_MS`].
    pub fn from_parts(parts: IdParts) -> Self {
        let ms = parts.unix_ms - EPOCH_MS;
        debug_assert!(ms < (1 << TIME_BITS));
        let v = (ms << (DB_BITS + NODE_BITS + SEQ_BITS))
            | (u64::from(parts.database_id) << (NODE_BITS + SEQ_BITS))
            | (u64::from(parts.node) << SEQ_BITS)
            | u64::from(parts.seq);
        // 41 + 7 + 6 + 9 = 63 bits: always fits in a positive i64.
        MessageId(v as i64)
    }

    /// Unpacks the id.
    pub fn parts(self) -> IdParts {
        let v = self.0 as u64;
        IdParts {
            unix_ms: (v >> (DB_BITS + NODE_BITS + SEQ_BITS)) + EPOCH_MS,
            database_id: ((v >> (NODE_BITS + SEQ_BITS)) & u64::from(MAX_DATABASE_ID)) as u8,
            node: ((v >> SEQ_BITS) & u64::from(MAX_NODE)) as u8,
            seq: (v & u64::from(MAX_SEQ)) as u16,
        }
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for MessageId {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(MessageId)
    }
}

/// What the id state machine says for a given clock reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Here is the next id.
    Issued(MessageId),
    /// The clock is behind the last issued time (or the millisecond is used up): wait this long.
    Wait(Duration),
    /// The clock is behind by more than the tolerance: refuse.
    Backwards {
        /// How far the clock is behind the last issued millisecond.
        behind_ms: u64,
    },
}

/// The pure part of id generation: given the clock, the next id or why not. Never issues an id
/// at or below one it issued before.
#[derive(Debug, Clone)]
pub struct IdState {
    database_id: u8,
    node: u8,
    last_ms: u64,
    seq: u16,
    max_backward: Duration,
}

impl IdState {
    /// A state that will only issue ids with a timestamp after `floor_ms` (Unix ms).
    pub fn new(database_id: u8, node: u8, floor_ms: u64, max_backward: Duration) -> Self {
        IdState {
            database_id: database_id & MAX_DATABASE_ID,
            node: node & MAX_NODE,
            last_ms: floor_ms.max(EPOCH_MS),
            seq: MAX_SEQ,
            max_backward,
        }
    }

    /// The last millisecond an id was (or may have been) issued in.
    pub fn last_ms(&self) -> u64 {
        self.last_ms
    }

    /// The next id for the clock reading `now_ms`, without waiting.
    pub fn step(&mut self, now_ms: u64) -> Step {
        if now_ms < self.last_ms {
            let behind_ms = self.last_ms - now_ms;
            if behind_ms as u128 > self.max_backward.as_millis() {
                return Step::Backwards { behind_ms };
            }
            return Step::Wait(Duration::from_millis(behind_ms));
        }
        if now_ms == self.last_ms {
            if self.seq == MAX_SEQ {
                return Step::Wait(Duration::from_millis(1));
            }
            self.seq += 1;
        } else {
            self.last_ms = now_ms;
            self.seq = 0;
        }
        Step::Issued(MessageId::from_parts(IdParts {
            unix_ms: self.last_ms,
            database_id: self.database_id,
            node: self.node,
            seq: self.seq,
        }))
    }
}

/// Settings for [`IdGenerator`].
#[derive(Debug, Clone)]
pub struct IdGeneratorConfig {
    /// How long a node lease lasts without renewal. Renewed on use after a third of it.
    pub lease_ttl: Duration,
    /// How much time is reserved ahead in the database per write.
    pub reserve_ahead: Duration,
    /// The largest clock step backwards that is waited out; a larger one is an error.
    pub max_backward: Duration,
}

impl Default for IdGeneratorConfig {
    fn default() -> Self {
        IdGeneratorConfig {
            lease_ttl: Duration::from_secs(30),
            reserve_ahead: Duration::from_secs(2),
            max_backward: Duration::from_millis(1000),
        }
    }
}

struct Lease {
    node: u8,
    holder: String,
    renewed_at: Instant,
    /// Ids may be issued up to this Unix ms: it is stored as the node's high water.
    reserved_ms: u64,
    state: IdState,
}

/// Issues message ids from a node leased in the database. Cheap to share (`Arc` inside).
#[derive(Clone)]
pub struct IdGenerator {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    clock: Arc<dyn Clock>,
    config: IdGeneratorConfig,
    database_id: u8,
    lease: Mutex<Option<Lease>>,
}

impl fmt::Debug for IdGenerator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdGenerator")
            .field("database_id", &self.inner.database_id)
            .finish_non_exhaustive()
    }
}

impl IdGenerator {
    /// Leases a node on `pool`'s database using the system clock.
    pub async fn new(pool: PgPool) -> Result<Self, Error> {
        Self::with_clock(pool, Arc::new(SystemClock), IdGeneratorConfig::default()).await
    }

    /// Leases a node with an explicit clock and settings.
    pub async fn with_clock(
        pool: PgPool,
        clock: Arc<dyn Clock>,
        config: IdGeneratorConfig,
    ) -> Result<Self, Error> {
        let mut tx = pool.begin().await?;
        let database_id: i16 = sqlx::query_scalar("SELECT database_id FROM outbox.settings")
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        let generator = IdGenerator {
            inner: Arc::new(Inner {
                pool,
                clock,
                config,
                database_id: database_id as u8,
                lease: Mutex::new(None),
            }),
        };
        {
            let mut lease = generator.inner.lease.lock().await;
            *lease = Some(generator.inner.acquire().await?);
        }
        Ok(generator)
    }

    /// This database's id, as packed into every id.
    pub fn database_id(&self) -> u8 {
        self.inner.database_id
    }

    /// The node currently leased, if any.
    pub async fn node(&self) -> Option<u8> {
        self.inner.lease.lock().await.as_ref().map(|l| l.node)
    }

    /// The next id. Waits out a small clock step backwards; refuses a large one.
    pub async fn next_id(&self) -> Result<MessageId, Error> {
        let inner = &*self.inner;
        let mut guard = inner.lease.lock().await;
        loop {
            let ttl = inner.config.lease_ttl;
            // Our view of the lease must stay inside the database's: give it up a third early.
            let expired = guard
                .as_ref()
                .is_none_or(|l| l.renewed_at.elapsed() >= ttl * 2 / 3);
            if expired {
                *guard = Some(inner.acquire().await?);
            }
            let lease = guard.as_mut().expect("lease acquired above");
            if lease.renewed_at.elapsed() >= ttl / 3 {
                inner.renew(lease, lease.reserved_ms).await?;
            }
            let now = inner.clock.now_ms();
            if now > lease.reserved_ms {
                let reserve = now + inner.config.reserve_ahead.as_millis() as u64;
                inner.renew(lease, reserve).await?;
            }
            match lease.state.step(now) {
                Step::Issued(id) => return Ok(id),
                Step::Wait(d) => inner.clock.sleep(d).await,
                Step::Backwards { behind_ms } => {
                    return Err(Error::ClockMovedBackwards {
                        behind_ms,
                        tolerance_ms: inner.config.max_backward.as_millis() as u64,
                    });
                }
            }
        }
    }

    /// Gives the node back so another process can take it at once.
    pub async fn release(&self) -> Result<(), Error> {
        if let Some(lease) = self.inner.lease.lock().await.take() {
            let mut tx = self.inner.pool.begin().await?;
            sqlx::query(
                "UPDATE outbox.id_nodes SET holder = NULL, lease_expires_at = '-infinity', \
                 high_water_ms = greatest(high_water_ms, $3) WHERE node = $1 AND holder = $2",
            )
            .bind(i16::from(lease.node))
            .bind(&lease.holder)
            .bind(lease.state.last_ms() as i64)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
        }
        Ok(())
    }
}

impl Inner {
    async fn acquire(&self) -> Result<Lease, Error> {
        let holder = format!(
            "{}:{}:{:016x}",
            hostname(),
            std::process::id(),
            rand::random::<u64>()
        );
        let now = self.clock.now_ms();
        let ttl_ms = self.config.lease_ttl.as_millis() as i64;
        // The node whose high water is oldest: a restarted process then rarely has to wait for
        // its clock to pass a reservation made by its previous life.
        let mut tx = self.pool.begin().await?;
        let row: Option<(i16, i64)> = sqlx::query_as(
            "UPDATE outbox.id_nodes n SET holder = $1, \
                 lease_expires_at = now() + $2 * interval '1 millisecond' \
             FROM (SELECT node, high_water_ms FROM outbox.id_nodes \
                   WHERE lease_expires_at < now() \
                   ORDER BY high_water_ms, node LIMIT 1 FOR UPDATE SKIP LOCKED) free \
             WHERE n.node = free.node \
             RETURNING n.node, free.high_water_ms",
        )
        .bind(&holder)
        .bind(ttl_ms)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        let Some((node, high_water)) = row else {
            return Err(Error::NoFreeNode);
        };
        let high_water = high_water as u64;
        let state = IdState::new(
            self.database_id,
            node as u8,
            high_water,
            self.config.max_backward,
        );
        let mut lease = Lease {
            node: node as u8,
            holder,
            renewed_at: Instant::now(),
            reserved_ms: high_water,
            state,
        };
        let reserve = now.max(high_water) + self.config.reserve_ahead.as_millis() as u64;
        self.renew(&mut lease, reserve).await?;
        tracing::debug!(node, high_water, "leased id node");
        Ok(lease)
    }

    /// Extends the lease and raises the reserved high water to `reserve_ms`.
    async fn renew(&self, lease: &mut Lease, reserve_ms: u64) -> Result<(), Error> {
        let started = Instant::now();
        let mut tx = self.pool.begin().await?;
        let updated = sqlx::query(
            "UPDATE outbox.id_nodes SET lease_expires_at = now() + $3 * interval '1 millisecond', \
                 high_water_ms = greatest(high_water_ms, $4) \
             WHERE node = $1 AND holder = $2",
        )
        .bind(i16::from(lease.node))
        .bind(&lease.holder)
        .bind(self.config.lease_ttl.as_millis() as i64)
        .bind(reserve_ms as i64)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        if updated.rows_affected() != 1 {
            return Err(Error::LeaseLost { node: lease.node });
        }
        lease.renewed_at = started;
        lease.reserved_ms = lease.reserved_ms.max(reserve_ms);
        Ok(())
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "host".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T0: u64 = EPOCH_MS + 1_000_000;

    #[test]
    fn parts_round_trip() {
        let parts = IdParts {
            unix_ms: T0,
            database_id: 127,
            node: 63,
            seq: 511,
        };
        let id = MessageId::from_parts(parts);
        assert!(id.0 > 0);
        assert_eq!(id.parts(), parts);
    }

    #[test]
    fn small_step_back_is_waited_out() {
        let mut s = IdState::new(1, 1, 0, Duration::from_millis(50));
        let Step::Issued(a) = s.step(T0) else {
            panic!()
        };
        assert_eq!(s.step(T0 - 20), Step::Wait(Duration::from_millis(20)));
        let Step::Issued(b) = s.step(T0) else {
            panic!()
        };
        assert!(b > a);
    }

    #[test]
    fn large_step_back_is_refused() {
        let mut s = IdState::new(1, 1, 0, Duration::from_millis(50));
        assert!(matches!(s.step(T0), Step::Issued(_)));
        assert_eq!(s.step(T0 - 51), Step::Backwards { behind_ms: 51 });
    }

    #[test]
    fn exhausted_millisecond_waits_for_the_next() {
        let mut s = IdState::new(1, 1, 0, Duration::ZERO);
        for _ in 0..=MAX_SEQ {
            assert!(matches!(s.step(T0), Step::Issued(_)));
        }
        assert_eq!(s.step(T0), Step::Wait(Duration::from_millis(1)));
        let Step::Issued(id) = s.step(T0 + 1) else {
            panic!()
        };
        assert_eq!(id.parts().seq, 0);
    }

    #[test]
    fn floor_is_never_reissued() {
        let mut s = IdState::new(1, 1, T0, Duration::from_secs(1));
        // The floor millisecond may have been fully used by an earlier holder.
        assert!(matches!(s.step(T0), Step::Wait(_)));
        let Step::Issued(id) = s.step(T0 + 1) else {
            panic!()
        };
        assert_eq!(id.parts().unix_ms, T0 + 1);
    }

    proptest! {
        /// Whatever the clock does, issued ids strictly increase (so never repeat).
        #[test]
        fn ids_strictly_increase_under_any_clock(deltas in prop::collection::vec(-100i64..100, 1..400)) {
            let mut s = IdState::new(3, 7, 0, Duration::from_millis(30));
            let mut now = T0 as i64;
            let mut last: Option<MessageId> = None;
            for d in deltas {
                now += d;
                if let Step::Issued(id) = s.step(now as u64) {
                    if let Some(prev) = last {
                        prop_assert!(id > prev);
                    }
                    prop_assert_eq!(id.parts().node, 7);
                    prop_assert_eq!(id.parts().database_id, 3);
                    last = Some(id);
                }
            }
        }
    }
}
