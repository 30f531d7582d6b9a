//! The check schedule in SQL (`outbox.prepared_messages`, migration `0004_prepared.sql`):
//! claim due checks under a lease, give rate-limited ones their attempt back, record a check
//! that gave no decision, and prune old outcomes. Every statement runs in its own short
//! transaction; the HTTP request never runs inside one.

use std::time::Duration;

use sqlx::PgPool;

use super::config::CheckbackConfig;

/// One claimed check.
pub(super) struct Claimed {
    pub(super) id: i64,
    pub(super) check_url: Option<String>,
    /// The attempt number this claim holds (already counted).
    pub(super) attempt: i32,
}

/// Claims up to `limit` due checks: one short statement, rows locked only while it runs.
pub(super) async fn claim(
    pool: &PgPool,
    config: &CheckbackConfig,
    limit: i64,
) -> Result<Vec<Claimed>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let rows: Vec<(i64, Option<String>, i32)> = sqlx::query_as(
        "WITH due AS ( \
             SELECT id FROM outbox.prepared_messages \
             WHERE state = 'pending' \
               AND ((next_check_at IS NULL AND created_at <= now() - $2 * interval '1 millisecond') \
                    OR next_check_at <= now()) \
             ORDER BY coalesce(next_check_at, created_at), id \
             LIMIT $1 \
             FOR UPDATE SKIP LOCKED) \
         UPDATE outbox.prepared_messages p \
         SET next_check_at = now() + $3 * interval '1 millisecond', \
             check_attempts = p.check_attempts + 1 \
         FROM due WHERE p.id = due.id \
         RETURNING p.id, p.check_url, p.check_attempts",
    )
    .bind(limit)
    .bind(config.check_after_ms.as_millis() as i64)
    .bind(config.lease().as_millis() as i64)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(rows
        .into_iter()
        .map(|(id, check_url, attempt)| Claimed {
            id,
            check_url,
            attempt,
        })
        .collect())
}

/// Gives rate-limited checks their attempt back and their reserved slot as the due time.
pub(super) async fn defer(pool: &PgPool, rows: &[(i64, i64)]) -> Result<(), sqlx::Error> {
    let (ids, waits): (Vec<i64>, Vec<i64>) = rows.iter().copied().unzip();
    let mut tx = pool.begin().await?;
    sqlx::query(
        "UPDATE outbox.prepared_messages p \
         SET check_attempts = p.check_attempts - 1, \
             next_check_at = now() + d.wait_ms * interval '1 millisecond' \
         FROM unnest($1::bigint[], $2::bigint[]) AS d(id, wait_ms) \
         WHERE p.id = d.id AND p.state = 'pending'",
    )
    .bind(ids)
    .bind(waits)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Records a check that gave no decision: the next check `wait` from now, or parked as
/// unresolved when `park`. Returns false when nothing changed: the message was decided
/// meanwhile, or this claim's lease ran out and another check took over (the attempt number
/// is the fencing token).
pub(super) async fn record_undecided(
    pool: &PgPool,
    row: &Claimed,
    reason: &str,
    park: bool,
    wait: Duration,
) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let updated = sqlx::query(
        "UPDATE outbox.prepared_messages \
         SET last_check_error = $2, \
             state = CASE WHEN $3 THEN 'unresolved' ELSE state END, \
             unresolved_at = CASE WHEN $3 THEN now() ELSE unresolved_at END, \
             next_check_at = CASE WHEN $3 THEN NULL \
                                  ELSE now() + $4 * interval '1 millisecond' END \
         WHERE id = $1 AND state = 'pending' AND check_attempts = $5",
    )
    .bind(row.id)
    .bind(reason)
    .bind(park)
    .bind(wait.as_millis() as i64)
    .bind(row.attempt)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(updated.rows_affected() > 0)
}

/// Deletes up to 5,000 outcomes decided more than `retention` ago. Batched so a long backlog
/// of old outcomes never becomes one long transaction.
pub(super) async fn prune_outcomes(pool: &PgPool, retention: Duration) -> Result<u64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let done = sqlx::query(
        "DELETE FROM outbox.prepared_outcomes WHERE id IN ( \
                 SELECT id FROM outbox.prepared_outcomes \
                 WHERE decided_at < now() - $1 * interval '1 millisecond' LIMIT 5000)",
    )
    .bind(retention.as_millis() as i64)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(done.rows_affected())
}
