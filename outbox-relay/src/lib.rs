//! The relay sidecar: moves committed outbox rows to RabbitMQ, at least once, in order per key.
//!
//! - [`config`]: defaults, TOML file, environment; validated once at start.
//! - [`claim`]: the SQL side: claim due rows (`FOR UPDATE SKIP LOCKED`), then delete what was
//!   confirmed and record or dead-letter what failed, in the same short transaction.
//! - [`publish`]: the broker side: pipelined publishes with confirms, one outcome per message.
//! - `trace`: the `outbox.publish` span of a traced message, and the `traceparent` it sends.
//! - [`relay`]: workers looping claim → publish → settle, wake-up, reconnects, shutdown.
//! - [`http`] and [`metrics`]: `/healthz`, `/readyz`, `/metrics`; `http` also holds the
//!   problem document every relay API answers errors with (the shared `http_common::Problem`).
//! - [`admin`]: `status` and the dead-letter commands.
//! - [`prepared`]: two-phase messages: the API, check-back, its schedule in SQL, the per-host
//!   rate and the operator's side.
//! - [`saga_api`]: the saga operator view (`/v1/sagas`, retry a stuck saga).
//! - [`dashboard`]: the operator's web page under `/dashboard` (behind the admin token).
#![warn(missing_docs)]

pub mod admin;
pub mod claim;
pub mod config;
pub mod dashboard;
pub mod http;
pub mod metrics;
pub mod prepared;
pub mod publish;
pub mod relay;
pub mod saga_api;
mod trace;

pub use config::Config;
