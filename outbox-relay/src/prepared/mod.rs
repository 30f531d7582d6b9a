//! Prepared ("half") messages on the relay's side: the producer prepares a message, decides it
//! later, and the relay asks the producer when no decision arrives. The producer's side, and
//! the JSON both sides speak, is `outbox::prepared`.
//!
//! - [`api`]: the HTTP API under `/v1/prepared` (prepare, read, commit, rollback), with the
//!   bearer-token check the saga API shares.
//! - [`checkback`]: the loop that asks producers for the decisions that did not arrive.
//! - [`config`]: the `[checkback]` section.
//! - `store`: the check schedule in SQL (claim under a lease, defer, record, prune).
//! - `rate`: the per-host rate limit of check requests.
//! - [`admin`]: unresolved messages, counts and gauges, and deciding by hand.

pub mod admin;
pub mod api;
pub mod checkback;
pub mod config;
mod rate;
mod store;
