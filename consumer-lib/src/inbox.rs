//! The inbox table: marking a message done inside the handler's transaction, and the purge.

use std::time::Duration;

use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::metrics::Metrics;

/// Marks `message_id` done for `consumer` inside the caller's transaction. False when it was
/// already done: a duplicate. A concurrent first delivery of the same id (another consumer
/// instance) holds the key until it commits or rolls back, so exactly one of them wins.
pub(crate) async fn mark_done(
    conn: &mut PgConnection,
    consumer: &str,
    message_id: i64,
) -> Result<bool, sqlx::Error> {
    let result = sqlx::query(
        "INSERT INTO inbox.processed (consumer, message_id) VALUES ($1, $2) \
         ON CONFLICT (consumer, message_id) DO NOTHING",
    )
    .bind(consumer)
    .bind(message_id)
    .execute(conn)
    .await?;
    Ok(result.rows_affected() == 1)
}

/// Whether `message_id` is already done for `consumer`.
pub async fn is_done(pool: &PgPool, consumer: &str, message_id: i64) -> Result<bool, Error> {
    let ctx = Error::database("read inbox");
    // In a transaction, as every statement with arguments here: see `outbox::pool`.
    let mut tx = pool.begin().await.map_err(ctx)?;
    let done = sqlx::query_scalar::<_, bool>(
        "SELECT EXISTS (SELECT 1 FROM inbox.processed WHERE consumer = $1 AND message_id = $2)",
    )
    .bind(consumer)
    .bind(message_id)
    .fetch_one(&mut *tx)
    .await
    .map_err(ctx)?;
    tx.commit().await.map_err(ctx)?;
    Ok(done)
}

/// Deletes `consumer`'s inbox rows older than `older_than`, `batch` rows per statement so no
/// statement holds many locks or runs long. Returns how many rows were deleted.
pub async fn purge(
    pool: &PgPool,
    consumer: &str,
    older_than: Duration,
    batch: i64,
) -> Result<u64, Error> {
    let seconds = older_than.as_secs_f64();
    let mut total = 0;
    let ctx = Error::database("purge inbox");
    loop {
        let mut tx = pool.begin().await.map_err(ctx)?;
        let deleted = sqlx::query(
            "DELETE FROM inbox.processed WHERE ctid IN ( \
               SELECT ctid FROM inbox.processed \
               WHERE consumer = $1 AND processed_at < now() - make_interval(secs => $2) \
               LIMIT $3)",
        )
        .bind(consumer)
        .bind(seconds)
        .bind(batch)
        .execute(&mut *tx)
        .await
        .map_err(ctx)?
        .rows_affected();
        tx.commit().await.map_err(ctx)?;
        total += deleted;
        if deleted < batch as u64 {
            return Ok(total);
        }
    }
}

/// Runs [`purge`] every `every` until `shutdown`; failures are logged and tried next time.
pub(crate) async fn purge_loop(
    pool: PgPool,
    consumer: String,
    retention: Duration,
    every: Duration,
    batch: i64,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    loop {
        match purge(&pool, &consumer, retention, batch).await {
            Ok(0) => {}
            Ok(rows) => {
                metrics.purged(rows);
                tracing::debug!(consumer = %consumer, rows, "purged old inbox rows");
            }
            Err(err) => tracing::warn!(consumer = %consumer, cause = %err, "inbox purge failed"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}
