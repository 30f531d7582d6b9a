//! Connecting through a transaction pooler (PgBouncer `pool_mode = transaction`).
//!
//! Behind such a pooler a client owns a server connection only from `BEGIN` to `COMMIT`;
//! between transactions every statement may land on another server connection. sqlx runs a
//! statement with arguments in two protocol rounds, `Parse`/`Describe`/`Sync` and then
//! `Bind`/`Execute`/`Sync`, and PgBouncer (1.18, Debian bookworm's) hands the server
//! connection back at the first `Sync` when no transaction is open. Measured here through
//! PgBouncer 1.18 with 16 clients on 4 server connections, 3,200 statements per run:
//!
//! | sqlx setting | outside a transaction | inside one |
//! |---|---|---|
//! | default (named, cached statements) | 1,075 failed (`sqlx_s_1 already exists` / `does not exist`) | |
//! | `statement_cache_capacity(0)` | 2,785 failed: sqlx still names each statement and never closes it | collide the same way |
//! | `persistent(false)` (unnamed) | 1,500 **wrong results**: `Bind` ran another client's unnamed statement | 0 failed |
//!
//! So [`PoolMode::Transaction`] means three rules, all kept by this workspace's code:
//! 1. every `sqlx::query*` statement runs inside an explicit transaction: sqlx uses the
//!    extended protocol for all of them, with or without arguments (only `sqlx::raw_sql`, the
//!    simple protocol in one round, is safe outside one);
//! 2. sqlx's statement cache is off ([`connect_options`]), so no statement is expected to
//!    outlive its transaction;
//! 3. PgBouncer runs `server_reset_query` (its default `DISCARD ALL`) after every transaction:
//!    `server_reset_query_always = 1`. That deallocates the statements a transaction prepared,
//!    and destroys the unnamed statement, so a statement that breaks rule 1 fails at once with
//!    SQLSTATE 26000 instead of running another client's SQL. [`check`] relies on that reset
//!    (a session variable set in one statement is gone in the next) to tell a correctly
//!    configured pooler from a direct connection at start.
//!
//! Session state does not survive a transaction there either: `LISTEN` (the relay then polls),
//! session `SET` (use `SET LOCAL`), session advisory locks held across statements (sqlx's
//! migrator takes one: migrations run against PostgreSQL directly). Locks taken and released
//! within one statement (`outbox.next_id`) and `pg_advisory_xact_lock` are fine.

use std::str::FromStr;

use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;

/// The environment variable that selects the [`PoolMode`].
pub const POOL_MODE_ENV: &str = "DATABASE_POOL_MODE";

/// How `DATABASE_URL` reaches PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PoolMode {
    /// Directly, or through a pooler in session mode: one server connection per client
    /// connection. sqlx's statement cache is on; `LISTEN` and session locks work.
    #[default]
    Session,
    /// Through PgBouncer in `pool_mode = transaction` (with `server_reset_query_always = 1`):
    /// no statement cache, no `LISTEN`, no migrations.
    Transaction,
}

/// A pool mode or pooler that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    /// `DATABASE_POOL_MODE` holds something other than `session` or `transaction`.
    #[error("DATABASE_POOL_MODE: `{0}` is not `session` or `transaction`")]
    InvalidMode(String),
    /// `DATABASE_URL` is not a PostgreSQL URL sqlx accepts.
    #[error("database_url: {0}")]
    Url(#[source] sqlx::Error),
    /// `DATABASE_POOL_MODE=transaction`, but the server kept session state across
    /// transactions: not a transaction pooler that resets its connections.
    #[error(
        "DATABASE_POOL_MODE=transaction, but the database keeps statements between transactions: \
         either this is PostgreSQL itself or a pooler in session mode (unset DATABASE_POOL_MODE), \
         or PgBouncer without `server_reset_query_always = 1` (set it: without it a statement \
         can run another client's SQL)"
    )]
    NotResetting,
    /// The default mode, but statements vanish between transactions: a transaction pooler.
    #[error(
        "the database drops statements between transactions (PgBouncer pool_mode = transaction?): \
         set DATABASE_POOL_MODE=transaction"
    )]
    TransactionPooler,
    /// The check could not run at all.
    #[error("database: {0}")]
    Database(#[source] sqlx::Error),
    /// An operation that needs a session was asked for in transaction mode.
    #[error(
        "{0} needs a session of its own, which DATABASE_POOL_MODE=transaction does not give: \
         run it with DATABASE_URL pointing at PostgreSQL directly (or PgBouncer in session mode) \
         and DATABASE_POOL_MODE unset"
    )]
    NeedsSession(&'static str),
}

impl FromStr for PoolMode {
    type Err = PoolError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "session" => Ok(PoolMode::Session),
            "transaction" => Ok(PoolMode::Transaction),
            _ => Err(PoolError::InvalidMode(s.to_owned())),
        }
    }
}

impl PoolMode {
    /// `DATABASE_POOL_MODE` from the environment (unset: [`PoolMode::Session`]).
    pub fn from_env() -> Result<Self, PoolError> {
        Self::from_env_with(|k| std::env::var(k).ok())
    }

    /// As [`PoolMode::from_env`], reading the environment through `env` (testable).
    pub fn from_env_with(env: impl Fn(&str) -> Option<String>) -> Result<Self, PoolError> {
        env(POOL_MODE_ENV).map_or(Ok(PoolMode::Session), |v| v.parse())
    }

    /// True behind a transaction pooler.
    pub fn is_transaction(self) -> bool {
        self == PoolMode::Transaction
    }

    /// `Err(NeedsSession(what))` in transaction mode, for operations that cannot work there.
    pub fn require_session(self, what: &'static str) -> Result<(), PoolError> {
        match self {
            PoolMode::Session => Ok(()),
            PoolMode::Transaction => Err(PoolError::NeedsSession(what)),
        }
    }
}

/// Connect options for `url` in `mode`: in transaction mode without sqlx's statement cache, and
/// without the `extra_float_digits` startup parameter, which PgBouncer refuses ("unsupported
/// startup parameter") unless told to ignore it.
pub fn connect_options(url: &str, mode: PoolMode) -> Result<PgConnectOptions, PoolError> {
    let options = PgConnectOptions::from_str(url).map_err(PoolError::Url)?;
    Ok(match mode {
        PoolMode::Session => options,
        PoolMode::Transaction => options.statement_cache_capacity(0).extra_float_digits(None),
    })
}

/// Checks that `mode` matches what `pool` is connected to.
///
/// On one pooled connection it sets a session variable to a fresh random token, then reads it
/// back, each in its own simple-protocol round (`sqlx::raw_sql`: one `Query` message, answered
/// before the next is sent, so no pipelining can join the two). PostgreSQL, or a pooler in
/// session mode, keeps the value for the session. A transaction pooler with
/// `server_reset_query_always = 1` hands the server connection back after the first statement
/// and resets it (`DISCARD ALL` includes `RESET ALL`), so the second reads it empty, whichever
/// server connection it lands on. The answer is the same every time for a given setup. A
/// transaction pooler without the reset may answer either way: in transaction mode it is then
/// refused as [`PoolError::NotResetting`] (it would keep statements across clients too), and
/// in the default mode it cannot be told from PostgreSQL (the README says so).
pub async fn check(pool: &PgPool, mode: PoolMode) -> Result<(), PoolError> {
    use sqlx::Row;

    let token = format!("{:016x}", rand::random::<u64>());
    let mut conn = pool.acquire().await.map_err(PoolError::Database)?;
    // The token is 16 hex digits: nothing to quote.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET SESSION outbox.pool_probe = '{token}'"
    )))
    .execute(&mut *conn)
    .await
    .map_err(PoolError::Database)?;
    let row = sqlx::raw_sql("SELECT current_setting('outbox.pool_probe', true)")
        .fetch_one(&mut *conn)
        .await
        .map_err(PoolError::Database)?;
    let seen: Option<String> = row.try_get(0).map_err(PoolError::Database)?;
    let kept = seen.as_deref() == Some(token.as_str());
    if kept {
        // Leave no trace in the session for whoever uses this connection next.
        sqlx::raw_sql("RESET outbox.pool_probe")
            .execute(&mut *conn)
            .await
            .map_err(PoolError::Database)?;
    }
    match (mode, kept) {
        (PoolMode::Session, true) | (PoolMode::Transaction, false) => Ok(()),
        (PoolMode::Session, false) => Err(PoolError::TransactionPooler),
        (PoolMode::Transaction, true) => Err(PoolError::NotResetting),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_parses_and_names_the_variable() {
        assert_eq!(
            "transaction".parse::<PoolMode>().unwrap(),
            PoolMode::Transaction
        );
        assert_eq!(" Session ".parse::<PoolMode>().unwrap(), PoolMode::Session);
        assert_eq!(
            PoolMode::from_env_with(|_| None).unwrap(),
            PoolMode::Session
        );
        let err = PoolMode::from_env_with(|_| Some("statement".into())).unwrap_err();
        assert!(err.to_string().contains("DATABASE_POOL_MODE"), "{err}");
        assert!(err.to_string().contains("statement"), "{err}");
    }

    #[test]
    fn session_only_operations_are_refused_in_transaction_mode() {
        assert!(PoolMode::Session.require_session("migrations").is_ok());
        let err = PoolMode::Transaction
            .require_session("migrations")
            .unwrap_err();
        assert!(
            err.to_string().starts_with("migrations needs a session"),
            "{err}"
        );
        assert!(err.to_string().contains("DATABASE_POOL_MODE"), "{err}");
    }
}
