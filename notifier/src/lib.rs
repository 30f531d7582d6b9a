//! Best-effort notification: deliver signed webhooks to partner endpoints until they
//! acknowledge, on a widening schedule, and let the partner query what it missed.
//!
//! A producer writes a notification in its own transaction ([`send`], or `notify.send(...)` in
//! SQL); it exists if and only if that transaction commits. The [`worker`] claims due rows from
//! `notify.notifications` (`FOR UPDATE SKIP LOCKED`, short transactions), POSTs them with
//! [`signer`] signatures through [`deliver`], records every attempt and writes the next due time
//! from the endpoint's [`schedule`] into the row: a wait is a row in PostgreSQL, never a sleeping
//! task, so a restarted notifier loses nothing. When the schedule runs out the notification is
//! exhausted and a `notification.exhausted` event is enqueued in the outbox in the same
//! transaction. [`store`] holds every query; [`api`] is the query API (axum, bearer tokens,
//! `application/problem+json` errors, see [`problem`]); [`config`] reads and validates the
//! configuration; [`endpoint`] manages endpoints and secret rotation; [`metrics`] names the
//! Prometheus series. The tables and SQL functions come from migration `0005_notifications.sql`
//! in [`migrations::MIGRATOR`].
#![warn(missing_docs)]

pub mod api;
pub mod config;
pub mod deliver;
pub mod endpoint;
pub mod error;
pub mod metrics;
pub mod problem;
pub mod schedule;
pub mod send;
pub mod signer;
pub mod store;
pub mod worker;

pub use config::{Config, ConfigError};
pub use endpoint::EndpointSpec;
pub use error::Error;
pub use schedule::Schedule;
pub use send::{NewNotification, send, valid_traceparent};
pub use worker::{Worker, WorkerConfig};

/// The migrations that create the notifier's tables (all of the product's, in one set).
pub use migrations::MIGRATOR;

/// Whether the notifier's tables exist on this database (migrations applied).
pub async fn has_schema(pool: &sqlx::PgPool) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let out = sqlx::query_scalar("SELECT to_regclass('notify.notifications') IS NOT NULL")
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(out)
}
