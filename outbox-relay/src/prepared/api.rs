//! The prepared-message HTTP API, for producers that do not connect to the outbox database:
//!
//! - `POST /v1/prepared` stores a prepared message → `201 {"id": "<decimal>"}`;
//! - `POST /v1/prepared/{id}/commit` publishes it (moves it into the outbox, id kept) → 200;
//! - `POST /v1/prepared/{id}/rollback` removes it → 200;
//! - `GET /v1/prepared/{id}` → `{"id", "status"}` (`pending`, `unresolved`, `committed`,
//!   `rolled_back`).
//!
//! Commit and rollback are idempotent (a repeated one is 200); the contradicting one is 409 and
//! changes nothing; an unknown id is 404. With a token configured every request needs
//! `Authorization: Bearer <token>` (401 otherwise). Errors are `application/problem+json`
//! (RFC 9457) whose `detail` names the offending field; a refused request stores nothing.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use chrono::{DateTime, Utc};
use outbox::MessageId;

pub(crate) use crate::http::Problem;
use outbox::prepared::wire::{IdBody, StatusBody};
use outbox::prepared::{self, DecidedBy, Decision, PreparedError};
use serde_json::{Map, Value};
use sqlx::PgPool;

/// Largest request body accepted (413 above): a 4 MiB payload as base64, plus headers and
/// the other fields.
pub const MAX_BODY_BYTES: usize = 6 * 1024 * 1024;

/// Largest payload, after decoding (the outbox's own limit, `outbox.max_payload_bytes()`).
pub const MAX_PAYLOAD_BYTES: usize = 4 * 1024 * 1024;

#[derive(Clone)]
pub(crate) struct ApiState {
    pub(crate) pool: PgPool,
    pub(crate) token: Option<Arc<str>>,
}

/// The API's router, state applied, ready to merge into the relay's HTTP server. `token`:
/// the bearer token every request must carry (`None`: no authentication).
pub fn router(pool: PgPool, token: Option<String>) -> Router {
    let state = ApiState {
        pool,
        token: token.map(Arc::from),
    };
    Router::new()
        .route("/v1/prepared", post(create))
        .route("/v1/prepared/{id}", get(show))
        .route("/v1/prepared/{id}/commit", post(commit))
        .route("/v1/prepared/{id}/rollback", post(rollback))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        // Outermost: an unauthenticated request is refused before its body is read.
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .with_state(state)
}

impl From<PreparedError> for Problem {
    fn from(err: PreparedError) -> Self {
        match err {
            PreparedError::Invalid(detail) => Problem::invalid(detail),
            PreparedError::TooLarge(detail) => {
                Problem::new(StatusCode::PAYLOAD_TOO_LARGE, "too large", detail)
            }
            PreparedError::NotFound(id) => Problem::new(
                StatusCode::NOT_FOUND,
                "unknown prepared message",
                format!("no prepared message with id {id}"),
            ),
            PreparedError::Conflict { id, decided } => Problem::new(
                StatusCode::CONFLICT,
                "already decided",
                format!("prepared message {id} was already {decided}"),
            ),
            other => {
                tracing::error!(cause = %other, "prepared-message request failed");
                Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "database unavailable",
                    "the outbox database could not complete the request; retry later",
                )
            }
        }
    }
}

pub(crate) async fn authenticate(
    State(state): State<ApiState>,
    req: Request,
    next: Next,
) -> Response {
    if let Some(expected) = &state.token {
        // Exactly one Authorization header: with two, a proxy and this server could each
        // believe a different one.
        let mut all = req.headers().get_all(header::AUTHORIZATION).iter();
        let given = match (all.next(), all.next()) {
            (Some(v), None) => v.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")),
            (Some(_), Some(_)) => Some(""),
            (None, _) => None,
        };
        match given {
            Some(given) if constant_time_eq(given.as_bytes(), expected.as_bytes()) => {}
            Some(_) => {
                return Problem::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "the bearer token is not valid",
                )
                .challenge(BEARER_CHALLENGE)
                .into_response();
            }
            None => {
                return Problem::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "an `Authorization: Bearer <token>` header is required",
                )
                .challenge(BEARER_CHALLENGE)
                .into_response();
            }
        }
    }
    next.run(req).await
}

/// What a 401 from the API asks for.
const BEARER_CHALLENGE: &str = "Bearer realm=\"outbox-relay\"";

/// Compares without an early exit, so response time does not reveal how much of a guessed
/// token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A prepare request, validated.
struct PrepareRequest {
    exchange: String,
    routing_key: String,
    payload: Vec<u8>,
    headers: Map<String, Value>,
    ordering_key: Option<String>,
    content_type: Option<String>,
    deliver_at: Option<DateTime<Utc>>,
    check_url: Option<String>,
}

const FIELDS: [&str; 9] = [
    "exchange",
    "routing_key",
    "payload",
    "payload_base64",
    "headers",
    "ordering_key",
    "content_type",
    "deliver_at",
    "check_url",
];

/// Parses the body by hand rather than through a derived `Deserialize`, so every refusal names
/// its field (serde's type errors give only a line and column).
fn parse_prepare(body: &[u8]) -> Result<PrepareRequest, Problem> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid JSON",
            format!("the body is not valid JSON: {e}"),
        )
    })?;
    let Value::Object(mut obj) = value else {
        return Err(Problem::invalid("the body must be a JSON object"));
    };
    if let Some(unknown) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(Problem::invalid(format!(
            "unknown field `{unknown}`; expected one of {}",
            FIELDS.join(", ")
        )));
    }
    let exchange = required_string(&mut obj, "exchange")?;
    let routing_key = required_string(&mut obj, "routing_key")?;
    let text = optional_string(&mut obj, "payload")?;
    let b64 = optional_string(&mut obj, "payload_base64")?;
    let payload = match (text, b64) {
        (Some(text), None) => text.into_bytes(),
        (None, Some(b64)) => base64::engine::general_purpose::STANDARD
            .decode(b64.as_bytes())
            .map_err(|e| {
                Problem::invalid(format!("field `payload_base64` is not valid base64: {e}"))
            })?,
        (Some(_), Some(_)) => {
            return Err(Problem::invalid(
                "give either field `payload` (text) or `payload_base64` (bytes), not both",
            ));
        }
        (None, None) => {
            return Err(Problem::invalid(
                "missing field `payload` (text) or `payload_base64` (bytes)",
            ));
        }
    };
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Err(Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload too large",
            format!(
                "field `payload` is {} bytes, at most {MAX_PAYLOAD_BYTES} allowed",
                payload.len()
            ),
        ));
    }
    let headers = match obj.remove("headers") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(h)) => h,
        Some(other) => {
            return Err(Problem::invalid(format!(
                "field `headers` must be a JSON object, got {}",
                json_type(&other)
            )));
        }
    };
    let ordering_key = optional_string(&mut obj, "ordering_key")?;
    let content_type = optional_string(&mut obj, "content_type")?;
    let deliver_at = optional_string(&mut obj, "deliver_at")?
        .map(|s| {
            DateTime::parse_from_rfc3339(&s)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|e| {
                    Problem::invalid(format!(
                        "field `deliver_at` must be an RFC 3339 time like 2026-01-31T12:00:00Z: {e}"
                    ))
                })
        })
        .transpose()?;
    let check_url = optional_string(&mut obj, "check_url")?;
    if let Some(url) = &check_url {
        match reqwest::Url::parse(url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
            _ => {
                return Err(Problem::invalid(
                    "field `check_url` must be an absolute http:// or https:// URL",
                ));
            }
        }
    }
    Ok(PrepareRequest {
        exchange,
        routing_key,
        payload,
        headers,
        ordering_key,
        content_type,
        deliver_at,
        check_url,
    })
}

fn required_string(obj: &mut Map<String, Value>, field: &str) -> Result<String, Problem> {
    match obj.remove(field) {
        Some(Value::String(s)) => Ok(s),
        None | Some(Value::Null) => Err(Problem::invalid(format!("missing field `{field}`"))),
        Some(other) => Err(Problem::invalid(format!(
            "field `{field}` must be a string, got {}",
            json_type(&other)
        ))),
    }
}

fn optional_string(obj: &mut Map<String, Value>, field: &str) -> Result<Option<String>, Problem> {
    match obj.remove(field) {
        Some(Value::String(s)) => Ok(Some(s)),
        None | Some(Value::Null) => Ok(None),
        Some(other) => Err(Problem::invalid(format!(
            "field `{field}` must be a string, got {}",
            json_type(&other)
        ))),
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn body_problem(rejection: BytesRejection) -> Problem {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body too large",
            format!("the request body is larger than {MAX_BODY_BYTES} bytes"),
        )
    } else {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "unreadable body",
            rejection.body_text(),
        )
    }
}

async fn create(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or("");
        let mime = ct.split(';').next().unwrap_or("").trim();
        if !mime.eq_ignore_ascii_case("application/json") {
            return Err(Problem::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported media type",
                format!("the body must be application/json, got `{ct}`"),
            ));
        }
    }
    let body = body.map_err(body_problem)?;
    let req = parse_prepare(&body)?;
    let mut msg = outbox::Message::new(req.exchange, req.routing_key, req.payload);
    for (k, v) in req.headers {
        msg = msg.with_header(k, v);
    }
    if let Some(k) = req.ordering_key {
        msg = msg.with_ordering_key(k);
    }
    if let Some(ct) = req.content_type {
        msg = msg.with_content_type(ct);
    }
    if let Some(at) = req.deliver_at {
        msg = msg.with_deliver_at(at);
    }
    // Statements with arguments run in a transaction (PgBouncer transaction mode: outbox::pool).
    let mut tx = state.pool.begin().await.map_err(PreparedError::from)?;
    let p = prepared::prepare(&mut *tx, &msg, req.check_url.as_deref()).await?;
    tx.commit().await.map_err(PreparedError::from)?;
    let id = p.id();
    metrics::counter!("outbox_prepared_total").increment(1);
    tracing::info!(message_id = %id, "prepared message stored");
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/v1/prepared/{id}"))],
        Json(IdBody { id: id.to_string() }),
    )
        .into_response())
}

fn parse_id(raw: &str) -> Result<MessageId, Problem> {
    match raw.parse::<i64>() {
        Ok(id) if id > 0 => Ok(MessageId(id)),
        _ => Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid id",
            format!("`{raw}` is not a message id (a positive decimal integer)"),
        )),
    }
}

async fn show(State(state): State<ApiState>, Path(raw): Path<String>) -> Result<Response, Problem> {
    let id = parse_id(&raw)?;
    let mut tx = state.pool.begin().await.map_err(PreparedError::from)?;
    let status = prepared::status(&mut *tx, id).await;
    tx.commit().await.map_err(PreparedError::from)?;
    let status = status?;
    Ok(Json(StatusBody {
        id: id.to_string(),
        status,
    })
    .into_response())
}

async fn commit(
    State(state): State<ApiState>,
    Path(raw): Path<String>,
) -> Result<Response, Problem> {
    decide(&state, &raw, Decision::Committed).await
}

async fn rollback(
    State(state): State<ApiState>,
    Path(raw): Path<String>,
) -> Result<Response, Problem> {
    decide(&state, &raw, Decision::RolledBack).await
}

async fn decide(state: &ApiState, raw: &str, decision: Decision) -> Result<Response, Problem> {
    let id = parse_id(raw)?;
    let mut tx = state.pool.begin().await.map_err(PreparedError::from)?;
    let decided = prepared::decide_expecting(&mut *tx, id, decision, DecidedBy::Producer).await;
    tx.commit().await.map_err(PreparedError::from)?;
    decided?;
    metrics::counter!("outbox_prepared_decisions_total",
        "decision" => decision.as_str(), "by" => "producer")
    .increment(1);
    tracing::info!(message_id = %id, decision = decision.as_str(), "prepared message decided");
    Ok(Json(StatusBody {
        id: id.to_string(),
        status: decision.into(),
    })
    .into_response())
}
