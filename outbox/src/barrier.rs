//! The producer side of check-back: a certain answer to "did the business change for this
//! prepared message commit?" (the branch-barrier technique).
//!
//! The business transaction records [`record_commit`] for the message id, in the producer's own
//! database, next to its business rows: the record exists if and only if the business change
//! committed. The [`check_handler`] answers the relay's check from that table. Finding no
//! record, it does not guess "pending": it inserts `rolled_back` first (`INSERT .. ON CONFLICT
//! DO NOTHING`, then reads back). The primary key makes the two inserts exclusive:
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
//! # async fn demo(orders: sqlx::PgPool, outbox_db: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! use outbox::{Message, barrier, prepared};
//! let msg = Message::new("orders", "order.created", b"{}".to_vec());
//! let p = prepared::prepare(&outbox_db, &msg, Some("http://orders.internal:8080/outbox/check")).await?;
//! let mut tx = orders.begin().await?;
//! sqlx::query("INSERT INTO orders (id) VALUES (42)").execute(&mut *tx).await?;
//! barrier::record_commit(&mut tx, p.id()).await?;
//! tx.commit().await?;
//! p.commit(&outbox_db).await?; // if this is lost, the check-back commits it
//! // and in the producer's HTTP server:
//! let app: axum::Router = axum::Router::new()
//!     .route("/outbox/check", barrier::check_handler(orders.clone()));
//! # let _ = app; Ok(()) }
//! ```

use std::time::Duration;

use axum::extract::Query;
use axum::extract::rejection::QueryRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get};
use serde::Deserialize;
use sqlx::{PgConnection, PgExecutor, PgPool};

use crate::MessageId;
use crate::prepared::{Decision, PreparedError};

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

/// The answer to a check: the check protocol's `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckAnswer {
    /// A decision is recorded (or was just recorded as rolled back).
    Decided(Decision),
    /// The business transaction is still open; ask again later.
    Pending,
}

impl CheckAnswer {
    /// The `status` value on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            CheckAnswer::Decided(d) => d.as_str(),
            CheckAnswer::Pending => "pending",
        }
    }
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

#[derive(Deserialize)]
struct CheckQuery {
    message_id: Option<String>,
}

/// The check endpoint, ready to mount on any router:
/// `.route("/outbox/check", barrier::check_handler(pool))`, where `pool` is the producer's
/// business database (the one its transactions call [`record_commit`] in).
///
/// `GET ?message_id=ID` answers `200 {"status":"committed"|"rolled_back"|"pending"}`; a missing
/// or malformed id gets 400, a database failure 503 (both `application/problem+json`; the relay
/// treats them as failed checks and asks again).
pub fn check_handler<S>(pool: PgPool) -> MethodRouter<S>
where
    S: Clone + Send + Sync + 'static,
{
    get(move |query: Result<Query<CheckQuery>, QueryRejection>| {
        let pool = pool.clone();
        async move {
            let raw = query.ok().and_then(|Query(q)| q.message_id);
            let Some(id) = raw.as_deref().and_then(|s| s.parse::<i64>().ok()) else {
                return problem(
                    StatusCode::BAD_REQUEST,
                    "invalid message_id",
                    "query parameter `message_id` must be a decimal message id",
                );
            };
            match check(&pool, MessageId(id), DEFAULT_LOCK_WAIT).await {
                Ok(answer) => {
                    tracing::info!(message_id = id, status = answer.as_str(), "check answered");
                    (
                        StatusCode::OK,
                        axum::Json(serde_json::json!({ "status": answer.as_str() })),
                    )
                        .into_response()
                }
                Err(err) => {
                    tracing::error!(message_id = id, cause = %err, "check failed");
                    problem(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "check failed",
                        "the barrier table could not be read; ask again later",
                    )
                }
            }
        }
    })
}

fn problem(status: StatusCode, title: &'static str, detail: &'static str) -> Response {
    http_common::Problem::new(status, title)
        .detail(detail)
        .into_response()
}
