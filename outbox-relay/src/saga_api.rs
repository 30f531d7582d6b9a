//! The saga operator view, beside the prepared-message API and behind the same admin token:
//!
//! - `GET /v1/sagas?state=stuck&limit=50` → `{"sagas": [{id, name, state, current_step,
//!   failure_reason, stuck_reason, updated_at}], "counts": {"running": n, ...}}`;
//! - `POST /v1/sagas/{id}/retry` → 200 when a stuck saga's compensation was sent again, 409 when
//!   the saga is not stuck, 404 when there is none.
//!
//! Plain SQL over schema `saga` (migration 0006), so the relay does not link the saga crate.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use sqlx::PgPool;

use crate::prepared::api::{ApiState, Problem, authenticate};

const STATES: &[&str] = &[
    "running",
    "compensating",
    "completed",
    "compensated",
    "stuck",
];

/// The saga routes, state applied, ready to merge into the relay's HTTP server. `token`: the
/// bearer token every request must carry (`None`: no authentication).
pub fn router(pool: PgPool, token: Option<String>) -> Router {
    let state = ApiState {
        pool,
        token: token.map(std::sync::Arc::from),
    };
    Router::new()
        .route("/v1/sagas", get(list))
        .route("/v1/sagas/{id}/retry", post(retry))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .with_state(state)
}

#[derive(serde::Deserialize)]
struct ListQuery {
    state: Option<String>,
    limit: Option<i64>,
}

#[derive(serde::Serialize, sqlx::FromRow)]
struct Saga {
    #[serde(serialize_with = "as_text")]
    id: i64,
    name: String,
    state: String,
    current_step: i32,
    failure_reason: Option<String>,
    stuck_reason: Option<String>,
    updated_at: DateTime<Utc>,
}

/// Ids are 63-bit: as JSON numbers they would lose digits in JavaScript clients.
fn as_text<S: serde::Serializer>(id: &i64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&id.to_string())
}

fn db_error(err: sqlx::Error) -> Response {
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "database unavailable",
        format!("saga query failed: {err}"),
    )
    .into_response()
}

async fn list(State(state): State<ApiState>, Query(q): Query<ListQuery>) -> Response {
    if let Some(s) = &q.state
        && !STATES.contains(&s.as_str())
    {
        return Problem::invalid(format!("state must be one of {}", STATES.join(", ")))
            .into_response();
    }
    let limit = q.limit.unwrap_or(50);
    if !(1..=1000).contains(&limit) {
        return Problem::invalid("limit must be 1 to 1000").into_response();
    }
    let sagas: Vec<Saga> = match sqlx::query_as(
        "SELECT id, name, state, current_step, failure_reason, stuck_reason, updated_at \
         FROM saga.instances WHERE ($1::text IS NULL OR state = $1) \
         ORDER BY updated_at DESC, id DESC LIMIT $2",
    )
    .bind(&q.state)
    .bind(limit)
    .fetch_all(&state.pool)
    .await
    {
        Ok(rows) => rows,
        Err(err) => return db_error(err),
    };
    let counts: Vec<(String, i64)> =
        match sqlx::query_as("SELECT state, count(*) FROM saga.instances GROUP BY state")
            .fetch_all(&state.pool)
            .await
        {
            Ok(rows) => rows,
            Err(err) => return db_error(err),
        };
    let mut by_state = serde_json::Map::new();
    for s in STATES {
        let n = counts.iter().find(|(k, _)| k == s).map_or(0, |(_, n)| *n);
        by_state.insert((*s).to_owned(), n.into());
    }
    Json(serde_json::json!({ "sagas": sagas, "counts": by_state })).into_response()
}

async fn retry(State(state): State<ApiState>, Path(id): Path<String>) -> Response {
    let Ok(id) = id.parse::<i64>() else {
        return Problem::invalid("id must be a decimal saga id").into_response();
    };
    let current: Option<String> =
        match sqlx::query_scalar("SELECT state FROM saga.instances WHERE id = $1")
            .bind(id)
            .fetch_optional(&state.pool)
            .await
        {
            Ok(s) => s,
            Err(err) => return db_error(err),
        };
    if current.is_none() {
        return Problem::new(
            StatusCode::NOT_FOUND,
            "unknown saga",
            format!("no saga {id}"),
        )
        .into_response();
    }
    match sqlx::query_scalar::<_, bool>("SELECT saga.retry($1)")
        .bind(id)
        .fetch_one(&state.pool)
        .await
    {
        Ok(true) => {
            Json(serde_json::json!({"id": id.to_string(), "state": "compensating"})).into_response()
        }
        Ok(false) => Problem::new(
            StatusCode::CONFLICT,
            "saga not stuck",
            format!(
                "saga {id} is {}; only a stuck saga can be retried",
                current.unwrap_or_default()
            ),
        )
        .into_response(),
        Err(err) => db_error(err),
    }
}
