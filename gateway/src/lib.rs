//! The outbound gateway: an axum reverse proxy in front of external APIs whose tower layers make
//! calls idempotent, serialised per resource and resilient.
//!
//! Layout: [`config`] reads the TOML file and checks the top level and the routes, and each
//! layer's module defines and checks its own table (`idempotency::config`, `lock::config`,
//! [`retry`], [`breaker`], [`limit`], [`caller`]); `routes` builds one tower stack per
//! route and matches a path to its route; `front` is the handler every request meets first
//! (caller, route, body bounds, request id) and the probes; [`server`] connects the stores,
//! accepts and drains. A route's stack, top to bottom, is
//! [`trace`] → [`limit`] (rate and concurrency) and [`breaker`] → [`timeout`] →
//! [`idempotency`] → [`lock`] → [`retry`] → [`proxy`]. Every layer answers with a response
//! (never an error): refusals are [`problem`] documents; [`layer`] holds what their `Service`
//! impls share. [`caller`] maps bearer tokens to caller
//! ids, [`headers`] holds hop-by-hop and request-id handling, [`pool`] the keep-alive
//! connections to upstreams, [`tls`] the trust for `https://` upstreams, [`metrics`] the
//! Prometheus recorder. Idempotency records and locks live in PostgreSQL (schema `gateway`, migration
//! `0003_gateway.sql` in `migrations::MIGRATOR`) or Redis, so gateways are stateless and any number
//! can run side by side.
#![warn(missing_docs)]

pub mod breaker;
pub mod caller;
pub mod config;
mod front;
pub mod headers;
pub mod idempotency;
pub mod layer;
pub mod limit;
pub mod lock;
pub mod metrics;
pub mod pool;
pub mod problem;
pub mod proxy;
pub mod retry;
mod routes;
pub mod server;
pub mod timeout;
pub mod tls;
pub mod trace;

pub use config::{Config, ConfigError};
pub use server::{Gateway, StartError, has_schema};

/// The migrations that create the gateway's tables (all of the product's, in one set).
pub use migrations::MIGRATOR;
