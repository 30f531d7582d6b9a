//! The traits a service implements to handle messages.

use std::future::Future;

use serde::de::DeserializeOwned;
use sqlx::PgTransaction;

use crate::{HandlerError, Message};

/// Handles one message inside a database transaction: effects exactly once.
///
/// The library has already inserted the inbox row (consumer name, message id) into `tx`.
/// Write every effect through `tx`; when `handle` returns `Ok(())` the library commits and
/// only then acks, so the effects and the "done" mark commit together or not at all. A
/// redelivery of a committed message is acked without calling `handle`.
///
/// Do not commit or roll back `tx` yourself. A panic counts as [`HandlerError::Retry`].
pub trait Handler: Send + Sync + 'static {
    /// The payload type, decoded from the body with `serde_json`.
    type Payload: DeserializeOwned + Send + Sync + 'static;

    /// Applies the message's effects through `tx`.
    fn handle(
        &self,
        message: &Message<Self::Payload>,
        tx: &mut PgTransaction<'static>,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// Handles one message without a database transaction: plain at-least-once.
///
/// For handlers whose effects live outside this database (a cache refresh, a call to an
/// idempotent API). No inbox row is written, so a redelivered message runs `handle` again;
/// the handler itself must tolerate that. Chosen explicitly with
/// [`ConsumerBuilder::handler_without_inbox`](crate::ConsumerBuilder::handler_without_inbox).
pub trait PlainHandler: Send + Sync + 'static {
    /// The payload type, decoded from the body with `serde_json`.
    type Payload: DeserializeOwned + Send + Sync + 'static;

    /// Applies the message's effects.
    fn handle(
        &self,
        message: &Message<Self::Payload>,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}
