//! Prepared ("half") messages: store a message now, decide later whether it is published.
//!
//! For a producer whose business change does not commit in the outbox database (another
//! database, an external system), a message cannot ride in the same transaction. Instead:
//!
//! 1. [`prepare`] the message (or `Client::prepare` over the relay's HTTP API, feature
//!    `client`): it is stored but not published, and gets its final [`MessageId`];
//! 2. do the business change, recording the decision with [`crate::barrier::record_commit`]
//!    inside that business transaction;
//! 3. [`Prepared::commit`] (or [`Prepared::rollback`]): commit moves the message into the
//!    outbox, with its id kept, and the relay publishes it.
//!
//! If step 3 never arrives (the producer died), the relay asks the producer's `check_url`
//! (`GET {check_url}?message_id=ID`, see `barrier::check_handler`, feature `check-handler`)
//! and decides from the answer, or parks the message as unresolved for an operator. A decision
//! is final: commit and rollback are idempotent, and the one that comes second after the other
//! is refused with [`PreparedError::Conflict`].
//!
//! The layout, one concept a file:
//!
//! - [`wire`]: the JSON both ends of the protocol speak (the relay's API and the check), as
//!   serde types shared by the client, the relay and the check handler.
//! - [`store`]: prepare, decide and read a prepared message in SQL, in the caller's executor.
//! - [`barrier`]: the producer's record of its own decision, which answers the check.
//! - `client` (feature `client`): the relay API's HTTP client, for producers without access to
//!   the outbox database.
//! - `check_handler` (feature `check-handler`): the producer's check endpoint for axum.

pub mod barrier;
#[cfg(feature = "check-handler")]
mod check_handler;
#[cfg(feature = "client")]
mod client;
pub mod store;
pub mod wire;

#[cfg(feature = "client")]
pub use client::{Client, RemotePrepared};
pub use store::{DecidedBy, Prepared, decide, decide_expecting, prepare, status};
pub use wire::{Decision, Status};

use crate::MessageId;

/// Why a prepared-message operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PreparedError {
    /// The message or a request field was refused by validation (the text names the field).
    #[error("{0}")]
    Invalid(String),
    /// The payload or the headers are over the outbox's size limit (the text names which).
    #[error("{0}")]
    TooLarge(String),
    /// No prepared message with this id is known (never prepared, or its outcome was pruned).
    #[error("no prepared message with id {0}")]
    NotFound(MessageId),
    /// The message was already decided the other way; nothing changed.
    #[error("prepared message {id} was already {decided}")]
    Conflict {
        /// The message.
        id: MessageId,
        /// The decision in effect.
        decided: Decision,
    },
    /// The database failed or refused the operation for another reason.
    #[error("database: {0}")]
    Database(#[source] sqlx::Error),
    /// The relay's HTTP API could not be reached or its answer could not be read.
    #[cfg(feature = "client")]
    #[error("relay API request failed: {0}")]
    Http(#[from] reqwest::Error),
    /// The relay's HTTP API answered with an error not covered by another variant.
    #[error("relay API answered {status}: {detail}")]
    Api {
        /// The HTTP status code.
        status: u16,
        /// The problem detail from the response.
        detail: String,
    },
}

impl From<sqlx::Error> for PreparedError {
    fn from(err: sqlx::Error) -> Self {
        // The SQL API raises these SQLSTATEs for bad input, with a message naming the field:
        // invalid_parameter_value, null_value_not_allowed, and program_limit_exceeded for sizes.
        if let sqlx::Error::Database(db) = &err {
            match db.code().as_deref() {
                Some("22023" | "22004") => return PreparedError::Invalid(db.message().to_owned()),
                Some("54000") => return PreparedError::TooLarge(db.message().to_owned()),
                _ => {}
            }
        }
        PreparedError::Database(err)
    }
}
