//! Sagas on the outbox: a business transaction across services and external parties, made of
//! ordered steps, each an action and a compensation, undone in reverse when a later step fails.
//!
//! Every piece is one the product already has: a step's command leaves through the outbox in
//! the same transaction as the state change that decided it; participants apply it exactly once
//! through consumer-lib's inbox; the coordinator is itself a consumer-lib consumer of the
//! participants' replies, and each reply advances the saga in the same transaction as its inbox
//! row and the next command's outbox row; step timeouts are delayed outbox messages cancelled
//! by dedupe key when the reply arrives. The state machine is SQL (`migrations/0006_saga.sql`,
//! schema `saga`), so a saga can be started from any language inside its own transaction.
//!
//! Layout, one concept per file:
//! - [`definition`]: the [`SagaDefinition`] builder and [`start`] in the caller's transaction;
//! - [`coordinator`]: the [`Coordinator`] handler that applies replies and timeouts;
//! - [`participant`]: the [`Participant`] trait and the [`ParticipantHandler`] that gives a
//!   service the branch barrier (empty compensation, hanging action, duplicates) and replies;
//! - [`admin`]: list sagas by state, counts, retry a stuck one (the `saga` CLI uses it);
//! - [`error`](Error).
#![warn(missing_docs)]

pub mod admin;
pub mod coordinator;
pub mod definition;
mod error;
pub mod participant;

pub use coordinator::{Coordinator, Reply};
pub use definition::{Command, SagaDefinition, SagaId, Step, start};
pub use error::Error;
pub use participant::{Participant, ParticipantHandler, SagaContext, StepError};

/// Header: the saga id (decimal text).
pub const SAGA_ID_HEADER: &str = "x-saga-id";
/// Header: the step's index, from 0.
pub const STEP_HEADER: &str = "x-saga-step";
/// Header: `action` or `compensation`.
pub const OP_HEADER: &str = "x-saga-op";
/// Header: which attempt of the command this is (compensations are retried as new messages).
pub const ATTEMPT_HEADER: &str = "x-saga-attempt";
/// Header: the exchange to reply to.
pub const REPLY_EXCHANGE_HEADER: &str = "x-saga-reply-exchange";
/// Header: the routing key to reply with.
pub const REPLY_ROUTING_KEY_HEADER: &str = "x-saga-reply-routing-key";

/// The coordinator's default reply queue (`saga.start`'s default `reply_routing_key`, on the
/// default exchange).
pub const DEFAULT_REPLY_QUEUE: &str = "saga.replies";
