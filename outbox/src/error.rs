//! The producer library's error type.

/// Why an outbox operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The message was refused by the outbox's validation (the text names the field).
    #[error("{0}")]
    Invalid(String),
    /// The database failed or refused the operation for another reason.
    #[error("database: {0}")]
    Database(#[source] sqlx::Error),
    /// A JSON payload or header could not be serialised.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    /// The clock went back further than the tolerance; no id is issued until it catches up.
    #[error(
        "clock moved backwards by {behind_ms} ms (tolerance {tolerance_ms} ms); refusing to issue ids"
    )]
    ClockMovedBackwards {
        /// How far behind the last issued millisecond the clock is.
        behind_ms: u64,
        /// The largest step back that is waited out.
        tolerance_ms: u64,
    },
    /// All 63 producer nodes of this database are leased by live processes.
    #[error("no free id node: all 63 producer nodes of this database are leased")]
    NoFreeNode,
    /// Another process took over the node lease (this one failed to renew it in time).
    #[error("id node {node} lease lost")]
    LeaseLost {
        /// The node that was lost.
        node: u8,
    },
}

impl From<sqlx::Error> for Error {
    fn from(err: sqlx::Error) -> Self {
        // The SQL API raises these SQLSTATEs for bad input, with a message naming the field.
        const INVALID: [&str; 3] = ["22023", "22004", "54000"];
        if let sqlx::Error::Database(db) = &err
            && db.code().is_some_and(|c| INVALID.contains(&c.as_ref()))
        {
            return Error::Invalid(db.message().to_owned());
        }
        Error::Database(err)
    }
}
