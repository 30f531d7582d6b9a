//! Consume what the outbox relay publishes and apply each message's effects exactly once.
//!
//! RabbitMQ delivers at least once. This library turns that into effects exactly once: the
//! handler writes its effects through a `sqlx` transaction in which the library has already
//! recorded (consumer name, message id) in an inbox table; the library commits, and only then
//! acks. A redelivered message finds its inbox row and is acked without running the handler.
//!
//! Layout, one concept per file, each depending only on those listed before it:
//! - `config`: the validated settings; [`builder`](ConsumerBuilder) validates every setting
//!   once and makes them;
//! - `context`: what the running parts share (`Shared` for the consumer's life, `Session` for
//!   one broker connection);
//! - `process`: one attempt (decode, inbox row, handler, commit);
//! - `delivery`: what is done with a delivery on the broker (ack, requeue, a confirmed copy
//!   with the failure headers); `settle`: what follows an attempt (ack, retry through the
//!   delay cascade, dead letter);
//! - `ordered`: per-key lanes for ordered mode; `session`: one broker connection (declare,
//!   consume, dispatch, drain); `topology`: what is declared on the broker; `consumer`: the
//!   [`Consumer`] and its reconnect loop;
//! - [`delay`]: the durable delay cascade; [`retry`](RetryPolicy): the backoff schedule;
//!   [`inbox`]: inbox rows and their purge; [`dead_letter`]: the compensation log, listed and
//!   replayed by the `consumer-dead` CLI;
//! - [`broker`]: the list of broker addresses and connecting to the first node that answers
//!   (shared with the relay and `consumer-dead`);
//! - [`handler`](Handler), [`message`](Message), [`error`](Error), [`headers`], [`metrics`].
#![warn(missing_docs)]

pub mod broker;
mod builder;
mod config;
mod consumer;
mod context;
pub mod dead_letter;
pub mod delay;
mod delivery;
mod error;
mod handler;
pub mod headers;
pub mod inbox;
mod message;
pub mod metrics;
mod ordered;
mod process;
mod retry;
mod session;
mod settle;
mod topology;

pub use builder::ConsumerBuilder;
pub use consumer::Consumer;
pub use dead_letter::{DeadLetter, DeadReason};
pub use error::{Error, HandlerError};
pub use handler::{Handler, PlainHandler};
pub use message::{
    ATTEMPTS_HEADER, LAST_ERROR_HEADER, Message, ORDERING_KEY_HEADER, ORIGINAL_EXCHANGE_HEADER,
    ORIGINAL_ROUTING_KEY_HEADER,
};
pub use retry::RetryPolicy;

/// Re-exported so services name the same versions the library uses.
pub use lapin;
pub use sqlx;
