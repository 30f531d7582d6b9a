//! Operator queries: sagas by state, one saga's steps, counts per state, and retrying a stuck
//! saga's compensation. The `saga` CLI and any admin API use these.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use crate::Error;

/// The states a saga can be in.
pub const STATES: &[&str] = &[
    "running",
    "compensating",
    "completed",
    "compensated",
    "stuck",
];

/// One saga, as listed.
#[derive(Debug, Clone, sqlx::FromRow, Serialize)]
pub struct SagaSummary {
    /// The saga id.
    pub id: i64,
    /// The definition's name.
    pub name: String,
    /// running | compensating | completed | compensated | stuck.
    pub state: String,
    /// The step in progress (or the last one reached).
    pub current_step: i32,
    /// Why it compensated, when it did.
    pub failure_reason: Option<String>,
    /// Why it is stuck, when it is.
    pub stuck_reason: Option<String>,
    /// When it started.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
}

/// One step of a saga.
#[derive(Debug, Clone, sqlx::FromRow, Serialize)]
pub struct StepSummary {
    /// Its index.
    pub idx: i32,
    /// Its name.
    pub name: String,
    /// pending | sent | done | failed | timed_out | compensating | compensated | stuck.
    pub state: String,
    /// Compensation attempts so far.
    pub compensation_attempts: i32,
    /// How many times its compensation undid something (0 or 1).
    pub compensations_applied: i32,
    /// The last error.
    pub last_error: Option<String>,
}

fn check_state(state: Option<&str>) -> Result<(), Error> {
    match state {
        Some(s) if !STATES.contains(&s) => Err(Error::Invalid(format!(
            "state must be one of {}, got {s:?}",
            STATES.join(", ")
        ))),
        _ => Ok(()),
    }
}

/// The newest `limit` sagas, in `state` when given.
pub async fn list(
    pool: &PgPool,
    state: Option<&str>,
    limit: i64,
) -> Result<Vec<SagaSummary>, Error> {
    check_state(state)?;
    if !(1..=10_000).contains(&limit) {
        return Err(Error::Invalid(format!(
            "limit must be 1 to 10000, got {limit}"
        )));
    }
    Ok(sqlx::query_as(
        "SELECT id, name, state, current_step, failure_reason, stuck_reason, created_at, \
             updated_at \
         FROM saga.instances WHERE ($1::text IS NULL OR state = $1) \
         ORDER BY updated_at DESC, id DESC LIMIT $2",
    )
    .bind(state)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// One saga and its steps, `None` when there is no such saga.
pub async fn get(pool: &PgPool, id: i64) -> Result<Option<(SagaSummary, Vec<StepSummary>)>, Error> {
    let saga: Option<SagaSummary> = sqlx::query_as(
        "SELECT id, name, state, current_step, failure_reason, stuck_reason, created_at, \
             updated_at FROM saga.instances WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?;
    let Some(saga) = saga else { return Ok(None) };
    let steps = sqlx::query_as(
        "SELECT idx, name, state, compensation_attempts, compensations_applied, last_error \
         FROM saga.steps WHERE saga_id = $1 ORDER BY idx",
    )
    .bind(id)
    .fetch_all(pool)
    .await?;
    Ok(Some((saga, steps)))
}

/// How many sagas are in each state (every state listed, zeros included).
pub async fn counts(pool: &PgPool) -> Result<Vec<(String, i64)>, Error> {
    Ok(sqlx::query_as(
        "SELECT s.state, count(i.id) FROM unnest($1::text[]) AS s(state) \
         LEFT JOIN saga.instances i ON i.state = s.state GROUP BY s.state \
         ORDER BY array_position($1::text[], s.state)",
    )
    .bind(STATES)
    .fetch_all(pool)
    .await?)
}

/// Sends a stuck saga's compensation again (attempts start over). `false` when the saga is not
/// stuck (or does not exist); nothing changes then.
pub async fn retry(pool: &PgPool, id: i64) -> Result<bool, Error> {
    Ok(sqlx::query_scalar("SELECT saga.retry($1)")
        .bind(id)
        .fetch_one(pool)
        .await?)
}
