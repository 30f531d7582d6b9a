//! Operator commands: status and the dead-letter table (list, redrive).

use sqlx::PgPool;

/// A dead-lettered message, as listed by `outbox-relay dead list`.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct DeadLetter {
    /// The message id.
    pub id: i64,
    /// Target exchange.
    pub exchange: String,
    /// Routing key.
    pub routing_key: String,
    /// Attempts made.
    pub attempts: i32,
    /// Why it was dead-lettered (the last error).
    pub reason: String,
    /// When it was enqueued.
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// When it was dead-lettered.
    pub dead_lettered_at: chrono::DateTime<chrono::Utc>,
}

/// The newest `limit` dead letters.
pub async fn list_dead(pool: &PgPool, limit: i64) -> Result<Vec<DeadLetter>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let out = sqlx::query_as(
        "SELECT id, exchange, routing_key, attempts, reason, created_at, dead_lettered_at \
         FROM outbox.dead_letters ORDER BY dead_lettered_at DESC, id DESC LIMIT $1",
    )
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(out)
}

/// Puts dead letters back in the outbox, due now, attempts reset, ids kept (so a consumer's
/// inbox still recognises them). A dedupe key that a newer pending message holds is dropped.
/// Returns how many moved.
pub async fn redrive(pool: &PgPool, ids: &[i64]) -> Result<u64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let moved = sqlx::query(
        "WITH back AS (DELETE FROM outbox.dead_letters WHERE id = ANY($1) RETURNING *) \
         INSERT INTO outbox.messages (id, exchange, routing_key, payload, headers, content_type, \
             ordering_key, dedupe_key, available_at, attempts, created_at) \
         SELECT b.id, b.exchange, b.routing_key, b.payload, b.headers, b.content_type, \
             b.ordering_key, \
             CASE WHEN EXISTS (SELECT 1 FROM outbox.messages m WHERE m.dedupe_key = b.dedupe_key) \
                  THEN NULL ELSE b.dedupe_key END, \
             now(), 0, b.created_at \
         FROM back b",
    )
    .bind(ids)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    tx.commit().await?;
    Ok(moved)
}

/// Ids of up to `limit` dead letters, oldest first (for redriving everything in batches).
pub async fn dead_ids(pool: &PgPool, limit: i64) -> Result<Vec<i64>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let out = sqlx::query_scalar("SELECT id FROM outbox.dead_letters ORDER BY id LIMIT $1")
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(out)
}

/// How many dead letters there are.
pub async fn dead_count(pool: &PgPool) -> Result<i64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let out = sqlx::query_scalar("SELECT count(*) FROM outbox.dead_letters")
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(out)
}

/// Sets this database's id in the global message-id space (0..=127).
pub async fn set_database_id(pool: &PgPool, id: u8) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("UPDATE outbox.settings SET database_id = $1")
        .bind(i16::from(id))
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// This database's id in the global message-id space.
pub async fn database_id(pool: &PgPool) -> Result<i16, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let out = sqlx::query_scalar("SELECT database_id FROM outbox.settings")
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(out)
}
