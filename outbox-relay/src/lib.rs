//! The relay sidecar (placeholder while the relay is written).
pub mod checkback;
pub mod prepared_api;
