//! What the crates that answer HTTP (the relay, the gateway, the notifier and the producer's
//! check handler) share, so that each answers errors and trusts servers the same way:
//!
//! - [`problem`]: the one RFC 9457 `application/problem+json` document, [`Problem`].
//! - [`tls`] (feature `tls`): the client TLS configuration from a choice of root store plus an
//!   optional PEM file of extra CAs, [`tls::client_config`].
#![warn(missing_docs)]

pub mod problem;
#[cfg(feature = "tls")]
pub mod tls;

pub use problem::Problem;
