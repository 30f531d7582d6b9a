//! The crate's error type.

/// What went wrong starting or administering a saga.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The definition or an argument was refused; the message names the field.
    #[error("invalid saga: {0}")]
    Invalid(String),
    /// A database operation failed.
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
    /// A step payload could not be encoded as JSON.
    #[error("payload of {field} is not JSON-encodable: {source}")]
    Encode {
        /// The field whose payload failed.
        field: String,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
}

impl From<sqlx::Error> for Error {
    /// Bad input is refused by the SQL functions with SQLSTATE class 22 (data exception) or
    /// 23502 (NULL): that is the caller's mistake, reported as [`Error::Invalid`].
    fn from(err: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &err
            && let Some(code) = db.code()
            && (code.starts_with("22") || code == "23502")
        {
            return Error::Invalid(db.message().to_owned());
        }
        Error::Database(err)
    }
}
