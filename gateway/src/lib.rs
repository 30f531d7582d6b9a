//! The outbound gateway: an axum reverse proxy in front of external APIs whose tower layers make
//! calls idempotent, serialised per resource and resilient.
//!
//! Layout: [`config`] reads and validates the TOML file; [`server`] connects the stores, builds
//! one tower stack per route and serves it. A route's stack, top to bottom, is
//! [`trace`] → [`limit`] (rate and concurrency) and [`breaker`] → [`timeout`] →
//! [`idempotency`] → [`lock`] → [`retry`] → [`proxy`]. Every layer answers with a response
//! (never an error): refusals are [`problem`] documents. [`caller`] maps bearer tokens to caller
//! ids, [`headers`] holds hop-by-hop and request-id handling, [`pool`] the keep-alive
//! connections to upstreams, [`tls`] the trust for `https://` upstreams, [`metrics`] the
//! Prometheus recorder. Idempotency records and locks live in PostgreSQL (schema `gateway`, migration
//! `0003_gateway.sql` in `migrations::MIGRATOR`) or Redis, so gateways are stateless and any number
//! can run side by side.
#![warn(missing_docs)]

pub mod breaker;
pub mod caller;
pub mod config;
pub mod headers;
pub mod idempotency;
pub mod limit;
pub mod lock;
pub mod metrics;
pub mod pool;
pub mod problem;
pub mod proxy;
pub mod retry;
pub mod server;
pub mod timeout;
pub mod tls;
pub mod trace;

pub use config::{Config, ConfigError};
pub use server::{Gateway, StartError, has_schema};

/// The migrations that create the gateway's tables (all of the product's, in one set).
pub use migrations::MIGRATOR;
