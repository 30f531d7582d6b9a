//! Lock backends. PostgreSQL keeps a queue of entries per lock name (`gateway.lock_entries`):
//! an entry holds the lock when no older live entry exists for its name, which gives waiters
//! first-come order; every grant takes the next value of one sequence as its fencing token, so
//! tokens only grow, even across lease expiries and gateway restarts. Redis keeps the same line
//! as a sorted set per name, with one `INCR` counter for tokens; each step is one Lua script.

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
    /// The holder id in the Redis line.
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

// The Redis line for a name is a sorted set of holders scored by arrival (KEYS[1]) and a hash of
// their expiry times in ms (KEYS[2]); the first live member holds the lock. Entries whose time
// ran out are dropped by whoever looks. Both keys expire a minute after the latest wait or lease
// they cover (TTLs are only ever extended), so abandoned names vanish.
const REDIS_ENQUEUE: &str = r#"
local function extend(key, ms)
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ticket = redis.call('INCR', KEYS[3])
redis.call('ZADD', KEYS[1], ticket, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], now + tonumber(ARGV[2]) + 1000)
extend(KEYS[1], tonumber(ARGV[2]) + 60000)
extend(KEYS[2], tonumber(ARGV[2]) + 60000)
return ticket
"#;

const REDIS_TRY: &str = r#"
local function extend(key, ms)
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local line = redis.call('ZRANGE', KEYS[1], 0, -1)
for _, holder in ipairs(line) do
  if holder == ARGV[1] then
    local token = redis.call('INCR', KEYS[3])
    redis.call('HSET', KEYS[2], holder, now + tonumber(ARGV[2]))
    extend(KEYS[1], tonumber(ARGV[2]) + 60000)
    extend(KEYS[2], tonumber(ARGV[2]) + 60000)
    return token
  end
  local expires = tonumber(redis.call('HGET', KEYS[2], holder) or '0')
  if expires > now then return false end
  redis.call('ZREM', KEYS[1], holder)
  redis.call('HDEL', KEYS[2], holder)
end
return redis.error_reply('lock entry does not exist (expired?)')
"#;

const REDIS_RELEASE: &str = r#"
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
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
                let mut tx = pool.begin().await?;
                let id: i64 = sqlx::query_scalar(
                    "SELECT gateway.lock_enqueue($1, $2 * interval '1 millisecond')",
                )
                .bind(name)
                .bind(wait_ms as i64)
                .fetch_one(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(Ticket::Postgres(id))
            }
            Self::Redis { conn, prefix, .. } => {
                let holder = uuid::Uuid::new_v4().to_string();
                let mut conn = conn.clone();
                let _ticket: i64 = Script::new(REDIS_ENQUEUE)
                    .key(format!("{prefix}lockq:{name}"))
                    .key(format!("{prefix}lockexp:{name}"))
                    .key(format!("{prefix}lock-tickets"))
                    .arg(&holder)
                    .arg(wait_ms)
                    .invoke_async(&mut conn)
                    .await?;
                Ok(Ticket::Redis(holder))
            }
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
                let mut tx = pool.begin().await?;
                let token = sqlx::query_scalar(
                    "SELECT gateway.lock_try($1, $2 * interval '1 millisecond')",
                )
                .bind(id)
                .bind(lease_ms as i64)
                .fetch_one(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(token)
            }
            (Self::Redis { conn, prefix, .. }, Ticket::Redis(holder)) => {
                let mut conn = conn.clone();
                let token: Option<i64> = Script::new(REDIS_TRY)
                    .key(format!("{prefix}lockq:{name}"))
                    .key(format!("{prefix}lockexp:{name}"))
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
                let mut tx = pool.begin().await?;
                sqlx::query("DELETE FROM gateway.lock_entries WHERE id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
            }
            (Self::Redis { conn, prefix, .. }, Ticket::Redis(holder)) => {
                let mut conn = conn.clone();
                let _: i64 = Script::new(REDIS_RELEASE)
                    .key(format!("{prefix}lockq:{name}"))
                    .key(format!("{prefix}lockexp:{name}"))
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
                let mut tx = pool.begin().await?;
                let done = sqlx::query(
                    "DELETE FROM gateway.lock_entries
                     WHERE expires_at < clock_timestamp() - interval '1 minute'",
                )
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(done.rows_affected())
            }
            Self::Redis { .. } => Ok(0),
        }
    }
}
