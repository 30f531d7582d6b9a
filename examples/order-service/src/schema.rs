//! The example's tables (`schema.sql`): orders, stock, reservations, the read model.

use sqlx::PgPool;

const SCHEMA: &str = include_str!("../schema.sql");

/// Applies `schema.sql`. Serialised by an advisory lock because concurrent `CREATE ... IF NOT
/// EXISTS` of the same table can still fail on PostgreSQL's catalog unique index.
pub async fn apply(pool: &PgPool) -> Result<(), sqlx::Error> {
    let mut conn = pool.acquire().await?;
    sqlx::query("SELECT pg_advisory_lock(7318310)")
        .execute(&mut *conn)
        .await?;
    let result = sqlx::raw_sql(SCHEMA).execute(&mut *conn).await;
    sqlx::query("SELECT pg_advisory_unlock(7318310)")
        .execute(&mut *conn)
        .await?;
    result.map(|_| ())
}
