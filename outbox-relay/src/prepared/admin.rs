//! The operator's side of prepared messages: the unresolved list and counts for
//! `outbox-relay status`, the gauges, and deciding a message by hand
//! (`outbox-relay prepared resolve`, the dashboard).

use chrono::{DateTime, Utc};
use outbox::MessageId;
use outbox::prepared::{self, DecidedBy, Decision, PreparedError};
use sqlx::PgPool;

/// A prepared message parked as unresolved (for `outbox-relay status`).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UnresolvedMessage {
    /// The message id.
    pub id: i64,
    /// Its exchange.
    pub exchange: String,
    /// Its routing key.
    pub routing_key: String,
    /// Where it was checked (none: nobody to ask).
    pub check_url: Option<String>,
    /// Checks made.
    pub check_attempts: i32,
    /// Why the last check gave no decision.
    pub last_check_error: Option<String>,
    /// When it was prepared.
    pub created_at: DateTime<Utc>,
    /// When it was parked.
    pub unresolved_at: Option<DateTime<Utc>>,
}

/// How many prepared messages wait, for `status` and the gauges.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PreparedCounts {
    /// Undecided and still being checked (or not yet due for a check).
    pub pending: i64,
    /// Parked: checks used up, waiting for the producer or an operator.
    pub unresolved: i64,
    /// Age of the oldest undecided message (pending or unresolved), in seconds.
    pub oldest_age_seconds: Option<f64>,
}

/// Decides prepared message `id` by hand (`outbox-relay prepared resolve ID commit|rollback`):
/// commit moves it into the outbox for publication, rollback removes it. Idempotent;
/// [`PreparedError::Conflict`] when it was decided the other way, [`PreparedError::NotFound`]
/// when the id is unknown.
pub async fn resolve(
    pool: &PgPool,
    id: MessageId,
    decision: Decision,
) -> Result<(), PreparedError> {
    let mut tx = pool.begin().await?;
    let decided = prepared::decide_expecting(&mut *tx, id, decision, DecidedBy::Operator).await;
    tx.commit().await?;
    decided?;
    metrics::counter!("outbox_prepared_decisions_total",
        "decision" => decision.as_str(), "by" => "operator")
    .increment(1);
    tracing::info!(message_id = %id, decision = decision.as_str(), "prepared message resolved by operator");
    Ok(())
}

/// The unresolved prepared messages, oldest first, at most `limit`.
pub async fn unresolved(pool: &PgPool, limit: i64) -> Result<Vec<UnresolvedMessage>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let out = sqlx::query_as(
        "SELECT id, exchange, routing_key, check_url, check_attempts, last_check_error, \
                created_at, unresolved_at \
         FROM outbox.prepared_messages WHERE state = 'unresolved' \
         ORDER BY created_at, id LIMIT $1",
    )
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(out)
}

/// Counts of undecided prepared messages.
pub async fn counts(pool: &PgPool) -> Result<PreparedCounts, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let (pending, unresolved, oldest): (i64, i64, Option<f64>) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE state = 'pending'), \
                count(*) FILTER (WHERE state = 'unresolved'), \
                extract(epoch FROM now() - min(created_at))::float8 \
         FROM outbox.prepared_messages",
    )
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(PreparedCounts {
        pending,
        unresolved,
        oldest_age_seconds: oldest,
    })
}

/// Reads [`counts`] and sets the gauges `outbox_prepared_unresolved` and
/// `outbox_prepared_pending`. [`run`](super::checkback::run) calls it every few seconds; call it before rendering
/// `/metrics` when check-back is disabled in this relay.
pub async fn update_metrics(pool: &PgPool) -> Result<PreparedCounts, sqlx::Error> {
    let c = counts(pool).await?;
    metrics::gauge!("outbox_prepared_unresolved").set(c.unresolved as f64);
    metrics::gauge!("outbox_prepared_pending").set(c.pending as f64);
    Ok(c)
}
