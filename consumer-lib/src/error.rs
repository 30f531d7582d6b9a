//! Errors the library reports to its caller, and the outcome a handler reports to the library.

use std::fmt;

/// What went wrong while building or running a consumer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A builder setting is missing or out of range; the message names the setting.
    #[error("invalid consumer configuration: {field}: {reason}")]
    Config {
        /// The builder setting at fault, e.g. `prefetch`.
        field: &'static str,
        /// Why the value was refused.
        reason: String,
    },
    /// The broker refused or dropped an operation the consumer cannot do without.
    #[error("broker error during {context}: {source}")]
    Broker {
        /// What the consumer was doing, e.g. `declare queue`.
        context: &'static str,
        /// The error lapin reported.
        #[source]
        source: lapin::Error,
    },
    /// The broker already holds a queue of this name declared with other arguments than the
    /// consumer's settings ask for (PRECONDITION_FAILED), typically a classic queue where
    /// `quorum(true)` declares a quorum queue. A queue's type cannot change in place.
    #[error(
        "queue {queue:?} already exists with other arguments than {settings} declare \
         (the broker: {source}); a queue's type and arguments cannot change in place: drain \
         and delete it (or move its messages to a new queue with a shovel), or set {settings} \
         back to what the existing queue was declared with"
    )]
    QueueMismatch {
        /// The queue the broker refused to redeclare.
        queue: String,
        /// The builder settings that shape its arguments, e.g. `quorum(true)`.
        settings: String,
        /// The broker's refusal (its text names the argument that differs).
        #[source]
        source: Box<lapin::Error>,
    },
    /// A database operation failed.
    #[error("database error during {context}: {source}")]
    Database {
        /// What the consumer was doing, e.g. `record dead letter`.
        context: &'static str,
        /// The error sqlx reported.
        #[source]
        source: sqlx::Error,
    },
    /// The broker did not confirm a message the consumer published (retry, dead letter, replay).
    #[error("broker did not confirm the publish to {target}")]
    NotConfirmed {
        /// The exchange or queue the message was published to.
        target: String,
    },
    /// The broker did not answer in time.
    #[error("no answer from the broker within {limit:?} during {context}")]
    Timeout {
        /// What the consumer was waiting for.
        context: &'static str,
        /// How long it waited.
        limit: std::time::Duration,
    },
    /// A dead letter asked for does not exist, or was already replayed.
    #[error("dead letter {id} not found or already replayed")]
    DeadLetterNotFound {
        /// The compensation-log row id.
        id: i64,
    },
}

impl Error {
    pub(crate) fn config(field: &'static str, reason: impl Into<String>) -> Self {
        Error::Config {
            field,
            reason: reason.into(),
        }
    }

    pub(crate) fn broker(context: &'static str) -> impl FnOnce(lapin::Error) -> Self {
        move |source| Error::Broker { context, source }
    }

    pub(crate) fn database(context: &'static str) -> impl Fn(sqlx::Error) -> Self + Copy {
        move |source| Error::Database { context, source }
    }
}

/// How a handler failed, which decides what happens to the message.
#[derive(Debug)]
#[non_exhaustive]
pub enum HandlerError {
    /// A transient failure (a timeout, a lock conflict, a service down): the message is
    /// redelivered after the next delay of the retry policy, and dead-lettered once it runs
    /// out of attempts.
    Retry(String),
    /// A permanent failure (invalid content, a business rule that will never pass): the message
    /// is dead-lettered at once, with this reason.
    Reject(String),
}

impl HandlerError {
    /// A transient failure; see [`HandlerError::Retry`].
    pub fn retry(reason: impl fmt::Display) -> Self {
        HandlerError::Retry(reason.to_string())
    }

    /// A permanent failure; see [`HandlerError::Reject`].
    pub fn reject(reason: impl fmt::Display) -> Self {
        HandlerError::Reject(reason.to_string())
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandlerError::Retry(reason) => write!(f, "retry: {reason}"),
            HandlerError::Reject(reason) => write!(f, "reject: {reason}"),
        }
    }
}

impl std::error::Error for HandlerError {}

/// Database errors inside a handler are transient by default: a deadlock, a serialization
/// failure or a lost connection all succeed when tried again later. `?` on an sqlx call inside
/// a handler therefore means "retry".
impl From<sqlx::Error> for HandlerError {
    fn from(err: sqlx::Error) -> Self {
        HandlerError::Retry(format!("database: {err}"))
    }
}
