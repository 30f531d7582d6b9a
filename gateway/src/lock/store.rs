//! Lock backends. PostgreSQL keeps a queue of entries per lock name (`gateway.lock_entries`):
//! an entry holds the lock when no older live entry exists for its name, which gives waiters
//! first-come order; every grant takes the next value of one sequence as its fencing token, so
//! tokens only grow, even across lease expiries and gateway restarts. Redis keeps a single
//! `SET NX PX` key per name with an `INCR` counter for tokens (no queue: waiters poll in no
//! particular order).

use std::{sync::Arc, time::Duration};

use redis::{Script, aio::MultiplexedConnection};
use sqlx::PgPool;
use tokio::sync::Notify;

use crate::idempotency::StoreError;

/// A place in line for a lock.
#[derive(Debug, Clone)]
pub enum Ticket {
    /// A row id in `gateway.lock_entries`.
    Postgres(i64),
    /// The holder value written to the Redis key.
    Redis(String),
}

/// The configured lock backend.
#[derive(Clone)]
pub enum LockStore {
    /// PostgreSQL.
    Postgres {
        /// Pool.
        pool: PgPool,
        /// Wakes local waiters when a lock is released here, so a hand-over within one gateway
        /// does not wait for the next poll.
        released: Arc<Notify>,
    },
    /// Redis.
    Redis {
        /// Connection.
        conn: MultiplexedConnection,
        /// Key prefix.
        prefix: String,
        /// See the PostgreSQL variant.
        released: Arc<Notify>,
    },
}

const REDIS_ACQUIRE: &str = r#"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('INCR', KEYS[2])
end
return false
"#;

const REDIS_RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

impl LockStore {
    /// A PostgreSQL backend.
    pub fn postgres(pool: PgPool) -> Self {
        Self::Postgres {
            pool,
            released: Arc::new(Notify::new()),
        }
    }

    /// A Redis backend.
    pub fn redis(conn: MultiplexedConnection, prefix: impl Into<String>) -> Self {
        Self::Redis {
            conn,
            prefix: prefix.into(),
            released: Arc::new(Notify::new()),
        }
    }

    fn released(&self) -> &Notify {
        match self {
            Self::Postgres { released, .. } | Self::Redis { released, .. } => released,
        }
    }

    /// Joins the line for `name`; the entry disappears by itself after `wait_ms` plus a margin if
    /// this gateway dies while waiting.
    pub async fn enqueue(&self, name: &str, wait_ms: u64) -> Result<Ticket, StoreError> {
        match self {
            Self::Postgres { pool, .. } => {
                let id: i64 = sqlx::query_scalar("SELECT gateway.lock_enqueue($1, $2)")
                    .bind(name)
                    .bind(wait_ms as i64)
                    .fetch_one(pool)
                    .await?;
                Ok(Ticket::Postgres(id))
            }
            Self::Redis { .. } => Ok(Ticket::Redis(uuid::Uuid::new_v4().to_string())),
        }
    }

    /// Takes the lock if the ticket is first in line; returns the fencing token.
    pub async fn try_acquire(
        &self,
        name: &str,
        ticket: &Ticket,
        lease_ms: u64,
    ) -> Result<Option<i64>, StoreError> {
        match (self, ticket) {
            (Self::Postgres { pool, .. }, Ticket::Postgres(id)) => {
                Ok(sqlx::query_scalar("SELECT gateway.lock_try($1, $2)")
                    .bind(id)
                    .bind(lease_ms as i64)
                    .fetch_one(pool)
                    .await?)
            }
            (Self::Redis { conn, prefix, .. }, Ticket::Redis(holder)) => {
                let mut conn = conn.clone();
                let token: Option<i64> = Script::new(REDIS_ACQUIRE)
                    .key(format!("{prefix}lock:{name}"))
                    .key(format!("{prefix}lock-fencing"))
                    .arg(holder)
                    .arg(lease_ms)
                    .invoke_async(&mut conn)
                    .await?;
                Ok(token)
            }
            _ => Err(StoreError::Corrupt("ticket from another backend".into())),
        }
    }

    /// Leaves the line or gives the lock up.
    pub async fn release(&self, name: &str, ticket: &Ticket) -> Result<(), StoreError> {
        match (self, ticket) {
            (Self::Postgres { pool, .. }, Ticket::Postgres(id)) => {
                sqlx::query("DELETE FROM gateway.lock_entries WHERE id = $1")
                    .bind(id)
                    .execute(pool)
                    .await?;
            }
            (Self::Redis { conn, prefix, .. }, Ticket::Redis(holder)) => {
                let mut conn = conn.clone();
                let _: i64 = Script::new(REDIS_RELEASE)
                    .key(format!("{prefix}lock:{name}"))
                    .arg(holder)
                    .invoke_async(&mut conn)
                    .await?;
            }
            _ => return Err(StoreError::Corrupt("ticket from another backend".into())),
        }
        self.released().notify_waiters();
        Ok(())
    }

    /// Waits for a local release or the poll interval, whichever comes first.
    pub async fn wait_turn(&self, poll: Duration) {
        let _ = tokio::time::timeout(poll, self.released().notified()).await;
    }

    /// Deletes entries whose wait or lease ended long ago; returns how many.
    pub async fn cleanup(&self) -> Result<u64, StoreError> {
        match self {
            Self::Postgres { pool, .. } => {
                let done = sqlx::query(
                    "DELETE FROM gateway.lock_entries
                     WHERE expires_at < clock_timestamp() - interval '1 minute'",
                )
                .execute(pool)
                .await?;
                Ok(done.rows_affected())
            }
            Self::Redis { .. } => Ok(0),
        }
    }
}
