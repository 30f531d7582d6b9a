//! The query API, the receiver's half of best-effort notification: look up one notification
//! with its attempts, list an endpoint's notifications by time to reconcile, and ask for a
//! re-send. Every request carries `Authorization: Bearer <token>`; a token may be limited to
//! some endpoints, and other endpoints' notifications are invisible to it (404).
//!
//! - `GET /v1/notifications/{id}`
//! - `GET /v1/notifications?endpoint=E&since=T&until=T&status=S&limit=N&after=CURSOR`
//! - `POST /v1/notifications/{id}/resend`

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use http::{HeaderMap, StatusCode, header};
use sqlx::PgPool;

use crate::config::ApiToken;
use crate::problem::Problem;
use crate::store::{self, ListQuery};

#[derive(Clone)]
struct ApiState {
    pool: PgPool,
    tokens: Arc<Vec<ApiToken>>,
}

/// The API's routes (plus `/healthz` and `/readyz`, which need no token).
pub fn router(pool: PgPool, tokens: Vec<ApiToken>) -> Router {
    let state = ApiState {
        pool,
        tokens: Arc::new(tokens),
    };
    Router::new()
        .route("/v1/notifications", get(list))
        .route("/v1/notifications/{id}", get(show))
        .route("/v1/notifications/{id}/resend", post(resend))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .fallback(|| async { Problem::not_found("no such route") })
        .method_not_allowed_fallback(|| async {
            Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "Method not allowed",
            )
        })
        .with_state(state)
}

/// Which endpoints the caller may see: `None` = all.
struct Scope(Option<Vec<String>>);

impl Scope {
    fn allows(&self, endpoint: &str) -> bool {
        self.0
            .as_ref()
            .is_none_or(|list| list.iter().any(|e| e == endpoint))
    }
}

fn authenticate(state: &ApiState, headers: &HeaderMap) -> Result<Scope, Problem> {
    let unauthorized = || {
        Problem::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Missing or unknown bearer token",
        )
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(unauthorized)?;
    state
        .tokens
        .iter()
        .find(|t| constant_time_eq(t.token.as_bytes(), presented.as_bytes()))
        .map(|t| Scope(t.endpoints.clone()))
        .ok_or_else(unauthorized)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn parse_id(raw: &str) -> Result<i64, Problem> {
    raw.parse::<i64>().ok().filter(|id| *id > 0).ok_or_else(|| {
        Problem::bad_param(
            "id",
            "must be a notification id (a positive decimal integer)",
        )
    })
}

async fn ready(State(state): State<ApiState>) -> Response {
    match sqlx::raw_sql("SELECT 1").execute(&state.pool).await {
        Ok(_) => "ready".into_response(),
        Err(e) => Problem::store(&e.into()).into_response(),
    }
}

async fn show(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let scope = authenticate(&state, &headers)?;
    let id = parse_id(&id)?;
    match store::get(&state.pool, id).await {
        Ok(Some(v)) if scope.allows(&v.endpoint) => Ok(Json(v).into_response()),
        Ok(_) => Err(Problem::not_found(format!("notification {id}"))),
        Err(e) => Err(Problem::store(&e)),
    }
}

async fn resend(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let scope = authenticate(&state, &headers)?;
    let id = parse_id(&id)?;
    let not_found = || Problem::not_found(format!("notification {id}"));
    match store::endpoint_of(&state.pool, id).await {
        Ok(Some(ep)) if scope.allows(&ep) => {}
        Ok(_) => return Err(not_found()),
        Err(e) => return Err(Problem::store(&e)),
    }
    store::resend(&state.pool, id)
        .await
        .map_err(|e| Problem::store(&e))?;
    tracing::info!(notification_id = id, "re-send requested");
    match store::get(&state.pool, id).await {
        Ok(Some(v)) => Ok((StatusCode::ACCEPTED, Json(v)).into_response()),
        Ok(None) => Err(not_found()),
        Err(e) => Err(Problem::store(&e)),
    }
}

const LIST_PARAMS: [&str; 6] = ["endpoint", "since", "until", "status", "limit", "after"];

async fn list(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, Problem> {
    let scope = authenticate(&state, &headers)?;
    if let Some(unknown) = params.keys().find(|k| !LIST_PARAMS.contains(&k.as_str())) {
        return Err(Problem::bad_param(
            unknown,
            format!(
                "unknown parameter (expected one of {})",
                LIST_PARAMS.join(", ")
            ),
        ));
    }
    let endpoint = match (params.get("endpoint"), &scope.0) {
        (Some(e), _) if !e.is_empty() => e.clone(),
        (_, Some(only)) if only.len() == 1 => only[0].clone(),
        _ => return Err(Problem::bad_param("endpoint", "is required")),
    };
    if !scope.allows(&endpoint) {
        return Err(Problem::not_found(format!("endpoint {endpoint}")));
    }
    let time = |name: &str| -> Result<Option<DateTime<Utc>>, Problem> {
        params
            .get(name)
            .map(|v| {
                DateTime::parse_from_rfc3339(v)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|_| {
                        Problem::bad_param(
                            name,
                            "must be an RFC 3339 time, e.g. 2026-01-31T12:00:00Z",
                        )
                    })
            })
            .transpose()
    };
    let since = time("since")?;
    let until = time("until")?;
    if let (Some(s), Some(u)) = (since, until)
        && s > u
    {
        return Err(Problem::bad_param("until", "must not be before since"));
    }
    let status = match params.get("status").map(String::as_str) {
        None => None,
        Some(s @ ("pending" | "delivered" | "exhausted")) => Some(s.to_owned()),
        Some(_) => {
            return Err(Problem::bad_param(
                "status",
                "must be pending, delivered or exhausted",
            ));
        }
    };
    let limit = match params.get("limit") {
        None => 100,
        Some(v) => v
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| Problem::bad_param("limit", "must be an integer from 1 to 1000"))?,
    };
    let after = params
        .get("after")
        .map(|c| {
            parse_cursor(c)
                .ok_or_else(|| Problem::bad_param("after", "is not a cursor from next_cursor"))
        })
        .transpose()?;
    let q = ListQuery {
        endpoint,
        since,
        until,
        status,
        limit,
        after,
    };
    let rows = store::list(&state.pool, &q)
        .await
        .map_err(|e| Problem::store(&e))?;
    let next_cursor = (rows.len() as i64 == limit)
        .then(|| {
            rows.last()
                .map(|r| format!("{}.{}", r.created_at.timestamp_micros(), r.id))
        })
        .flatten();
    Ok(Json(serde_json::json!({ "data": rows, "next_cursor": next_cursor })).into_response())
}

/// `{created_at in Unix microseconds}.{id}`.
fn parse_cursor(c: &str) -> Option<(DateTime<Utc>, i64)> {
    let (micros, id) = c.split_once('.')?;
    Some((
        DateTime::from_timestamp_micros(micros.parse().ok()?)?,
        id.parse().ok()?,
    ))
}
