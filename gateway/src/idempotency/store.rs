//! Where idempotency records live. A record is created "in flight" with a lease and a random
//! owner token; only the owner may complete or release it, so a gateway that lost its lease (a
//! long pause) cannot overwrite the record of the request that took the key over.

use uuid::Uuid;

use super::{postgres::PgRecords, redis::RedisRecords};

/// A record store failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// PostgreSQL refused or could not be reached.
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    /// Redis refused or could not be reached.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// A stored record could not be decoded.
    #[error("corrupt record: {0}")]
    Corrupt(String),
}

/// The request a record is about.
#[derive(Debug, Clone)]
pub struct RecordSpec {
    /// Caller id (keys are scoped by caller).
    pub caller: String,
    /// The client's key.
    pub key: String,
    /// Method, path and body digest.
    pub fingerprint: [u8; 32],
    /// How long the record blocks the key if its gateway dies.
    pub lease_ms: u64,
    /// When a live owner must have settled it (the route timeout): after this, an in-flight
    /// record's outcome is unknown.
    pub settle_ms: u64,
    /// How long the record is kept.
    pub ttl_secs: u64,
}

/// A response kept for replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    /// Status code.
    pub status: u16,
    /// End-to-end headers, in order.
    pub headers: Vec<(String, String)>,
    /// The whole body.
    pub body: Vec<u8>,
}

impl StoredResponse {
    /// Headers as the JSON stored beside the body.
    pub fn headers_json(&self) -> serde_json::Value {
        serde_json::Value::Array(
            self.headers
                .iter()
                .map(|(k, v)| serde_json::json!([k, v]))
                .collect(),
        )
    }

    /// Headers back from that JSON.
    pub fn headers_from_json(v: &serde_json::Value) -> Result<Vec<(String, String)>, StoreError> {
        let bad = || StoreError::Corrupt("headers are not [[name, value], ...]".into());
        v.as_array()
            .ok_or_else(bad)?
            .iter()
            .map(|pair| match pair.as_array().map(|p| p.as_slice()) {
                Some([serde_json::Value::String(k), serde_json::Value::String(v)]) => {
                    Ok((k.clone(), v.clone()))
                }
                _ => Err(bad()),
            })
            .collect()
    }
}

/// What a store found when a request with a key arrived.
#[derive(Debug, Clone)]
pub enum Begin {
    /// The key is ours: forward the request, then complete or release with this token.
    Started {
        /// Owner token.
        token: Uuid,
    },
    /// The key is known with another fingerprint (422).
    Mismatch,
    /// Another request with the key is in flight (409).
    InFlight {
        /// Until its lease runs out.
        lease_left_ms: u64,
        /// Its owner should have settled it by now: it probably died, the outcome is unknown.
        outcome_unknown: bool,
    },
    /// The key completed: replay.
    Completed(StoredResponse),
}

/// The configured record store.
#[derive(Clone)]
pub enum RecordStore {
    /// `gateway.idempotency_records` in PostgreSQL.
    Postgres(PgRecords),
    /// Hashes in Redis.
    Redis(RedisRecords),
}

impl RecordStore {
    /// Claims the key or reports who has it.
    pub async fn begin(&self, spec: &RecordSpec) -> Result<Begin, StoreError> {
        match self {
            Self::Postgres(s) => s.begin(spec).await,
            Self::Redis(s) => s.begin(spec).await,
        }
    }

    /// Stores the response of the request that owns the key.
    pub async fn complete(
        &self,
        spec: &RecordSpec,
        token: Uuid,
        response: &StoredResponse,
    ) -> Result<bool, StoreError> {
        match self {
            Self::Postgres(s) => s.complete(spec, token, response).await,
            Self::Redis(s) => s.complete(spec, token, response).await,
        }
    }

    /// Deletes the record so the key may be retried.
    pub async fn release(&self, spec: &RecordSpec, token: Uuid) -> Result<bool, StoreError> {
        match self {
            Self::Postgres(s) => s.release(spec, token).await,
            Self::Redis(s) => s.release(spec, token).await,
        }
    }

    /// Deletes expired records; returns how many.
    pub async fn cleanup(&self) -> Result<u64, StoreError> {
        match self {
            Self::Postgres(s) => s.cleanup().await,
            // Redis expires records itself (PEXPIRE on every write).
            Self::Redis(_) => Ok(0),
        }
    }
}
