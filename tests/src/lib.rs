//! Shared helpers for the integration tests in `tests/tests/`: a fresh, migrated database per
//! test and random broker names, so tests never see each other's rows or queues.

use sqlx::{Connection, PgConnection, PgPool, postgres::PgPoolOptions};

/// The server every test database is created on (`DATABASE_URL`, default: local `test`).
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// The broker (`AMQP_URL`, default: local guest).
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// Redis (`REDIS_URL`, default: local).
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A short random name for queues, exchanges and databases, e.g. `t3f9a1c`.
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}_{:016x}", rand::random::<u64>())
}

/// A database of its own for one test.
pub struct TestDb {
    /// Its connection URL (hand it to a relay process).
    pub url: String,
    /// A pool on it.
    pub pool: PgPool,
}

/// Creates an empty database with every migration applied.
pub async fn fresh_db() -> TestDb {
    let name = unique_name("t");
    let base = database_url();
    let mut admin = PgConnection::connect(&base).await.expect("connect to DATABASE_URL");
    // `name` is made here from hex digits only.
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await
        .expect("create test database");
    admin.close().await.ok();
    let url = replace_db_name(&base, &name);
    let pool = PgPoolOptions::new()
        .max_connections(10)
        .connect(&url)
        .await
        .expect("connect to test database");
    outbox::MIGRATOR.run(&pool).await.expect("migrate test database");
    TestDb { url, pool }
}

fn replace_db_name(url: &str, name: &str) -> String {
    let (head, query) = match url.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (url, None),
    };
    let base = head.rsplit_once('/').map(|(b, _)| b).unwrap_or(head);
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}
