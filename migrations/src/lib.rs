//! Every table and function the product uses, as one ordered migration set: the `.sql` files
//! next to this crate's `Cargo.toml` (`0001_outbox_core.sql` onwards), embedded at compile time.
//!
//! Each component (producer, relay, consumer inbox, gateway, notifier, saga) depends on this
//! crate rather than on another component's, so a binary reaches its tables without compiling
//! the producer library and what it pulls in. `outbox-relay migrate`, `gateway migrate` and
//! `notifier migrate` all apply this one set; a database records each file's version and
//! checksum, so an applied file is never renamed or edited: a change is a new file.
//!
//! Naming (checked by `tests/tests/schema_naming.rs`): indexes end in `_idx`; every function has
//! a catalog comment; a function users call takes plain parameter names, one only the product
//! calls (its comment starts with "Internal") takes `p_` names; durations passed between the
//! product's own parts are `interval`s (`0010_parameters.sql`).
#![warn(missing_docs)]

/// The product's migrations in version order. Apply with `MIGRATOR.run(&pool)`; tests use
/// `#[sqlx::test(migrator = "migrations::MIGRATOR")]`.
// The path is this crate's own folder: the macro resolves it from `CARGO_MANIFEST_DIR` and
// refuses a bare ".", hence the way round through the parent.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

#[cfg(test)]
mod tests {
    use super::MIGRATOR;

    #[test]
    fn embeds_every_migration_in_version_order() {
        let versions: Vec<i64> = MIGRATOR.iter().map(|m| m.version).collect();
        assert_eq!(versions, (1..=versions.len() as i64).collect::<Vec<_>>());
        assert!(versions.len() >= 8, "found {versions:?}");
        assert_eq!(MIGRATOR.iter().next().unwrap().description, "outbox core");
    }
}
