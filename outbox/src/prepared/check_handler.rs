//! The producer's check endpoint for axum (feature `check-handler`): answers the relay's
//! `GET {check_url}?message_id=ID` from the barrier table, as a [`CheckReply`]:
//!
//! ```no_run
//! # fn demo(orders: sqlx::PgPool) {
//! use outbox::barrier;
//! let app: axum::Router = axum::Router::new()
//!     .route("/outbox/check", barrier::check_handler(orders.clone()));
//! # let _ = app; }
//! ```

use axum::extract::Query;
use axum::extract::rejection::QueryRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get};
use serde::Deserialize;
use sqlx::PgPool;

use super::barrier::{DEFAULT_LOCK_WAIT, check};
use super::wire::CheckReply;
use crate::MessageId;

#[derive(Deserialize)]
struct CheckQuery {
    message_id: Option<String>,
}

/// The check endpoint, ready to mount on any router:
/// `.route("/outbox/check", barrier::check_handler(pool))`, where `pool` is the producer's
/// business database (the one its transactions call
/// [`record_commit`](super::barrier::record_commit) in).
///
/// `GET ?message_id=ID` answers `200 {"status":"committed"|"rolled_back"|"pending"}`; a missing
/// or malformed id gets 400, a database failure 503 (both `application/problem+json`; the relay
/// treats them as failed checks and asks again).
pub fn check_handler<S>(pool: PgPool) -> MethodRouter<S>
where
    S: Clone + Send + Sync + 'static,
{
    get(move |query: Result<Query<CheckQuery>, QueryRejection>| {
        let pool = pool.clone();
        async move {
            let raw = query.ok().and_then(|Query(q)| q.message_id);
            let Some(id) = raw.as_deref().and_then(|s| s.parse::<i64>().ok()) else {
                return problem(
                    StatusCode::BAD_REQUEST,
                    "invalid message_id",
                    "query parameter `message_id` must be a decimal message id",
                );
            };
            match check(&pool, MessageId(id), DEFAULT_LOCK_WAIT).await {
                Ok(answer) => {
                    tracing::info!(message_id = id, status = answer.as_str(), "check answered");
                    (StatusCode::OK, axum::Json(CheckReply { status: answer })).into_response()
                }
                Err(err) => {
                    tracing::error!(message_id = id, cause = %err, "check failed");
                    problem(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "check failed",
                        "the barrier table could not be read; ask again later",
                    )
                }
            }
        }
    })
}

fn problem(status: StatusCode, title: &'static str, detail: &'static str) -> Response {
    http_common::Problem::new(status, title)
        .detail(detail)
        .into_response()
}
