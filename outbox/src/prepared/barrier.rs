//! The producer side of check-back: a certain answer to "did the business change for this
//! prepared message commit?" (the branch-barrier technique).
//!
//! The business transaction records [`record_commit`] for the message id, in the producer's own
//! database, next to its business rows: the record exists if and only if the business change
//! committed. The check handler (`check_handler`, feature `check-handler`) answers the
//! relay's check from that table. Finding no record, it does not guess "pending": it inserts
//! `rolled_back` first (`INSERT .. ON CONFLICT DO NOTHING`, then reads back). The primary key
//! makes the two inserts exclusive:
//!
//! - the business transaction committed first: the handler's insert does nothing, it reads
//!   `committed`;
//! - the business transaction is still open: the handler's insert waits for it on the key, then
//!   reads whichever won (or answers `pending` after a bounded wait);
//! - the handler inserted first: the late business transaction's [`record_commit`] finds
//!   `rolled_back` and fails with [`PreparedError::Conflict`], so that transaction rolls back
//!   too and the business change never happens without its message.
//!
//! ```no_run
//! # async fn demo(
//! #     orders: sqlx::PgPool,
//! #     outbox_db: sqlx::PgPool,
//! # ) -> Result<(), Box<dyn std::error::Error>> {
//! use outbox::{Message, barrier, prepared};
//! let msg = Message::new("orders", "order.created", b"{}".to_vec());
//! let check_url = "http://orders.internal:8080/outbox/check";
//! let p = prepared::prepare(&outbox_db, &msg, Some(check_url)).await?;
//! let mut tx = orders.begin().await?;
//! sqlx::query("INSERT INTO orders (id) VALUES (42)").execute(&mut *tx).await?;
//! barrier::record_commit(&mut tx, p.id()).await?;
//! tx.commit().await?;
//! p.commit(&outbox_db).await?; // if this is lost, the check-back commits it
//! # Ok(()) }
//! ```

use std::time::Duration;

use sqlx::{PgConnection, PgExecutor, PgPool};

#[cfg(feature = "check-handler")]
pub use super::check_handler::check_handler;
pub use super::wire::CheckAnswer;
use super::{Decision, PreparedError};
use crate::MessageId;

/// The barrier table, for a producer database that does not get the outbox migrations. Use one
/// or the other: the outbox migration set creates the same table and refuses to run where this
/// already created it. This one is safe to run more than once.
pub const INSTALL_SQL: &str = "\
CREATE SCHEMA IF NOT EXISTS outbox;
CREATE TABLE IF NOT EXISTS outbox.prepared_barrier (
    message_id bigint      PRIMARY KEY,
    decision   text        NOT NULL CHECK (decision IN ('committed', 'rolled_back')),
    decided_at timestamptz NOT NULL DEFAULT now()
);";

/// How long the check handler waits for an open business transaction holding the barrier key
/// before answering `pending` (the relay checks again later). Well under the relay's default
/// check timeout, so the answer arrives before the relay gives up on the request.
pub const DEFAULT_LOCK_WAIT: Duration = Duration::from_secs(2);

/// Creates the barrier table in the producer's database ([`INSTALL_SQL`]).
pub async fn install(pool: &PgPool) -> Result<(), PreparedError> {
    sqlx::raw_sql(INSTALL_SQL).execute(pool).await?;
    Ok(())
}

/// Records that the business change for prepared message `id` commits: call it inside the
/// business transaction. Idempotent within and across transactions; fails with
/// [`PreparedError::Conflict`] when the relay's check already recorded `rolled_back` for this
/// id: roll the business transaction back then, the message will never be published.
pub async fn record_commit(conn: &mut PgConnection, id: MessageId) -> Result<(), PreparedError> {
    record(conn, id, Decision::Committed).await
}

/// Records that the business change for `id` was abandoned (optional: a missing record reads as
/// rolled back). Fails with [`PreparedError::Conflict`] when `committed` is recorded.
pub async fn record_rollback(conn: &mut PgConnection, id: MessageId) -> Result<(), PreparedError> {
    record(conn, id, Decision::RolledBack).await
}

async fn record(
    conn: &mut PgConnection,
    id: MessageId,
    decision: Decision,
) -> Result<(), PreparedError> {
    sqlx::query(
        "INSERT INTO outbox.prepared_barrier (message_id, decision) VALUES ($1, $2) \
         ON CONFLICT (message_id) DO NOTHING",
    )
    .bind(id.0)
    .bind(decision.as_str())
    .execute(&mut *conn)
    .await?;
    match recorded(&mut *conn, id).await? {
        Some(d) if d == decision => Ok(()),
        Some(decided) => Err(PreparedError::Conflict { id, decided }),
        // Unreachable under READ COMMITTED; under REPEATABLE READ a conflicting row committed
        // after this snapshot raises a serialization failure in the insert above instead.
        None => Err(PreparedError::Database(sqlx::Error::RowNotFound)),
    }
}

/// The decision recorded for `id`, if any.
pub async fn recorded<'e, E: PgExecutor<'e>>(
    executor: E,
    id: MessageId,
) -> Result<Option<Decision>, PreparedError> {
    let d: Option<String> =
        sqlx::query_scalar("SELECT decision FROM outbox.prepared_barrier WHERE message_id = $1")
            .bind(id.0)
            .fetch_optional(executor)
            .await?;
    Ok(d.map(|d| {
        if d == "committed" {
            Decision::Committed
        } else {
            Decision::RolledBack
        }
    }))
}

/// Answers a check for `id`: the recorded decision, or, finding none, records `rolled_back` and
/// answers that. Waits at most `lock_wait` for an open business transaction that holds the key,
/// then answers [`CheckAnswer::Pending`].
pub async fn check(
    pool: &PgPool,
    id: MessageId,
    lock_wait: Duration,
) -> Result<CheckAnswer, PreparedError> {
    let mut tx = pool.begin().await?;
    // SET LOCAL takes no bind parameters; the value is a number formatted here.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SET LOCAL lock_timeout = {}",
        lock_wait.as_millis().max(1)
    )))
    .execute(&mut *tx)
    .await?;
    let inserted = sqlx::query(
        "INSERT INTO outbox.prepared_barrier (message_id, decision) VALUES ($1, 'rolled_back') \
         ON CONFLICT (message_id) DO NOTHING",
    )
    .bind(id.0)
    .execute(&mut *tx)
    .await;
    match inserted {
        Ok(_) => {}
        Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("55P03") => {
            // lock_not_available: the business transaction holding this key is still open.
            return Ok(CheckAnswer::Pending);
        }
        Err(e) => return Err(e.into()),
    }
    let decided = recorded(&mut *tx, id).await?;
    tx.commit().await?;
    Ok(decided.map_or(CheckAnswer::Pending, CheckAnswer::Decided))
}

/// Deletes barrier records decided more than `older_than` ago. Keep them longer than the relay
/// can still check a message (its whole check schedule) plus any time an operator might take.
pub async fn prune(pool: &PgPool, older_than: Duration) -> Result<u64, PreparedError> {
    let mut tx = pool.begin().await?;
    let done = sqlx::query(
        "DELETE FROM outbox.prepared_barrier WHERE decided_at < now() - $1 * interval '1 millisecond'",
    )
    .bind(older_than.as_millis() as i64)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(done.rows_affected())
}
