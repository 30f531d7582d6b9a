//! Records in `gateway.idempotency_records` (migration 0003). Claiming is one upsert whose
//! `WHERE` only lets it overwrite an expired record or an in-flight one whose lease ran out, so
//! concurrent gateways agree on a single owner without any lock held across the upstream call.
//!
//! Durability: the claim commits before the upstream is called (lost, a retry would call the
//! upstream again) and the completed response commits before the client gets it (lost, the
//! record would fall back to `in_flight` and, once its lease ran out, let a retry call the
//! upstream again): both are ordinary durable commits, two per request. Directly on PostgreSQL
//! (or a session pooler) each is a single autocommit statement, one round trip; behind a
//! transaction pooler (`DATABASE_POOL_MODE=transaction`) each runs in an explicit transaction,
//! as `outbox::pool` requires there (a `BEGIN` and a `COMMIT` round trip more).
//!
//! Expiry: set once, by the claim, to the lease plus the TTL ([`CLAIM`]). The completion then
//! updates only unindexed columns ([`COMPLETE`]), which lets PostgreSQL update the row in place
//! on its page (HOT) instead of adding entries to both indexes for every request.

use outbox::pool::PoolMode;
use sqlx::postgres::{PgArguments, PgQueryResult, PgRow};
use sqlx::query::Query;
use sqlx::{PgPool, Postgres, Row};
use uuid::Uuid;

use super::store::{Begin, RecordSpec, StoreError, StoredResponse};

/// The claim: `$1` caller, `$2` key, `$3` fingerprint, `$4` token, `$5` lease (ms), `$6` settle
/// window (ms), `$7` TTL (s). Returns the token when this request owns the key. The expiry is
/// fixed here, the lease plus the TTL ahead, so a response completed within its lease is kept at
/// least the TTL, and completing leaves the indexed `expires_at` alone.
pub const CLAIM: &str = "INSERT INTO gateway.idempotency_records AS r
         (caller, key, fingerprint, token, state, lease_until, settle_by, expires_at)
     VALUES ($1, $2, $3, $4, 'in_flight',
             clock_timestamp() + $5::bigint * interval '1 millisecond',
             clock_timestamp() + $6::bigint * interval '1 millisecond',
             clock_timestamp() + $5::bigint * interval '1 millisecond'
                               + $7::bigint * interval '1 second')
     ON CONFLICT (caller, key) DO UPDATE SET
         fingerprint = EXCLUDED.fingerprint, token = EXCLUDED.token,
         state = 'in_flight', lease_until = EXCLUDED.lease_until,
         settle_by = EXCLUDED.settle_by, expires_at = EXCLUDED.expires_at,
         status = NULL, headers = NULL, body = NULL, created_at = clock_timestamp()
     WHERE r.expires_at <= clock_timestamp()
        OR (r.state = 'in_flight' AND r.lease_until <= clock_timestamp()
            AND r.fingerprint = EXCLUDED.fingerprint)
     RETURNING token";

/// The completion: `$1` caller, `$2` key, `$3` the claim's token, `$4` status, `$5` headers
/// (JSON), `$6` body. It changes no indexed column, so PostgreSQL can keep the new row version
/// on its page without new index entries (a HOT update, where the page has room: migration
/// 0011 leaves a fifth of each page free for it).
pub const COMPLETE: &str = "UPDATE gateway.idempotency_records
     SET state = 'completed', status = $4, headers = $5, body = $6, lease_until = NULL
     WHERE caller = $1 AND key = $2 AND token = $3 AND state = 'in_flight'";

/// The PostgreSQL record store.
#[derive(Clone)]
pub struct PgRecords {
    pool: PgPool,
    mode: PoolMode,
}

type PgQuery<'q> = Query<'q, Postgres, PgArguments>;

impl PgRecords {
    /// On a pool whose database has the `gateway` schema, every statement in an explicit
    /// transaction (right for any [`PoolMode`]).
    pub fn new(pool: PgPool) -> Self {
        Self::with_mode(pool, PoolMode::Transaction)
    }

    /// The same, for a pool reached in `mode`: [`PoolMode::Session`] runs each write as one
    /// autocommit statement.
    pub fn with_mode(pool: PgPool, mode: PoolMode) -> Self {
        Self { pool, mode }
    }

    /// One statement, committed on its own: autocommit in session mode, else in a transaction.
    async fn fetch_optional(&self, query: PgQuery<'_>) -> Result<Option<PgRow>, sqlx::Error> {
        if self.mode == PoolMode::Session {
            return query.fetch_optional(&self.pool).await;
        }
        let mut tx = self.pool.begin().await?;
        let row = query.fetch_optional(&mut *tx).await?;
        tx.commit().await?;
        Ok(row)
    }

    async fn execute(&self, query: PgQuery<'_>) -> Result<PgQueryResult, sqlx::Error> {
        if self.mode == PoolMode::Session {
            return query.execute(&self.pool).await;
        }
        let mut tx = self.pool.begin().await?;
        let done = query.execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(done)
    }

    pub(super) async fn begin(&self, spec: &RecordSpec) -> Result<Begin, StoreError> {
        // A row can vanish between the failed claim and the read (cleanup, a release): then the
        // claim is simply tried again. The claim commits on its own (it must be durable before
        // the upstream is called); the read after a refused claim needs no transaction of its
        // own beyond what `outbox::pool` asks for behind a transaction pooler.
        for _ in 0..5 {
            let token = Uuid::new_v4();
            let claimed = self
                .fetch_optional(
                    sqlx::query(CLAIM)
                        .bind(&spec.caller)
                        .bind(&spec.key)
                        .bind(&spec.fingerprint[..])
                        .bind(token)
                        .bind(spec.lease_ms as i64)
                        .bind(spec.settle_ms as i64)
                        .bind(spec.ttl_secs as i64),
                )
                .await?;
            if claimed.is_some() {
                return Ok(Begin::Started { token });
            }
            let row = self
                .fetch_optional(
                    sqlx::query(
                        "SELECT fingerprint, state, status, headers, body,
                        GREATEST(0, EXTRACT(EPOCH FROM (lease_until - clock_timestamp())) * 1000)::bigint AS lease_left_ms,
                        settle_by < clock_timestamp() AS unknown
                 FROM gateway.idempotency_records
                 WHERE caller = $1 AND key = $2 AND expires_at > clock_timestamp()",
                    )
                    .bind(&spec.caller)
                    .bind(&spec.key),
                )
                .await?;
            let Some(row) = row else { continue };
            let fingerprint: Vec<u8> = row.try_get("fingerprint")?;
            if fingerprint != spec.fingerprint {
                return Ok(Begin::Mismatch);
            }
            let state: String = row.try_get("state")?;
            if state == "in_flight" {
                let left: Option<i64> = row.try_get("lease_left_ms")?;
                let unknown: Option<bool> = row.try_get("unknown")?;
                return Ok(Begin::InFlight {
                    lease_left_ms: left.unwrap_or(0).max(0) as u64,
                    outcome_unknown: unknown.unwrap_or(false),
                });
            }
            let status: Option<i16> = row.try_get("status")?;
            let headers: Option<serde_json::Value> = row.try_get("headers")?;
            let body: Option<Vec<u8>> = row.try_get("body")?;
            let (Some(status), Some(headers)) = (status, headers) else {
                return Err(StoreError::Corrupt(
                    "completed record without a response".into(),
                ));
            };
            return Ok(Begin::Completed(StoredResponse {
                status: status as u16,
                headers: StoredResponse::headers_from_json(&headers)?,
                body: body.unwrap_or_default(),
            }));
        }
        Err(StoreError::Corrupt(
            "record kept changing while it was claimed".into(),
        ))
    }

    pub(super) async fn complete(
        &self,
        spec: &RecordSpec,
        token: Uuid,
        response: &StoredResponse,
    ) -> Result<bool, StoreError> {
        let done = self
            .execute(
                sqlx::query(COMPLETE)
                    .bind(&spec.caller)
                    .bind(&spec.key)
                    .bind(token)
                    .bind(response.status as i16)
                    .bind(response.headers_json())
                    .bind(&response.body),
            )
            .await?;
        Ok(done.rows_affected() == 1)
    }

    pub(super) async fn release(&self, spec: &RecordSpec, token: Uuid) -> Result<bool, StoreError> {
        let done = self
            .execute(
                sqlx::query(
                    "DELETE FROM gateway.idempotency_records
             WHERE caller = $1 AND key = $2 AND token = $3 AND state = 'in_flight'",
                )
                .bind(&spec.caller)
                .bind(&spec.key)
                .bind(token),
            )
            .await?;
        Ok(done.rows_affected() == 1)
    }

    pub(super) async fn cleanup(&self) -> Result<u64, StoreError> {
        // Batches keep each delete short, so it never holds back vacuum or blocks claims for long.
        let mut total = 0;
        loop {
            let mut tx = self.pool.begin().await?;
            let done = sqlx::query(
                "DELETE FROM gateway.idempotency_records
                 WHERE (caller, key) IN (
                     SELECT caller, key FROM gateway.idempotency_records
                     WHERE expires_at <= clock_timestamp() LIMIT 1000
                     FOR UPDATE SKIP LOCKED)",
            )
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            total += done.rows_affected();
            if done.rows_affected() < 1000 {
                return Ok(total);
            }
        }
    }
}
