//! The producer side of the outbox.
#![warn(missing_docs)]

pub mod barrier;
pub mod prepared;

/// Every table and function the product uses (outbox, inbox, gateway, prepared messages), as one
/// ordered migration set. `outbox-relay migrate` applies it; tests use it with `#[sqlx::test]`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");
