//! The order service's HTTP API (the command side, plus the read model's query).
//!
//! - `POST /orders` `{sku, quantity, amount_cents}`, optional `Idempotency-Key`: one
//!   transaction inserts the order, enqueues `order.created` and the delayed
//!   `order.payment_timeout`. A retry with the same key returns the first order.
//! - `POST /orders/{id}/pay`: one transaction claims the order (`paying`) and starts its payment
//!   saga ([`crate::order_saga`]: charge through the gateway, reserve stock, confirm; refund when
//!   the stock ran out), then waits for the saga's decision: 200 paid, 409 cancelled (refunded
//!   or timed out), 503 still running (ask again).
//! - `GET /orders/{id}`; `GET /reports/daily` (the read model); `GET /healthz`.

use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use crate::events::{self, OrderEvent, PaymentTimeout};
use crate::order_saga;

/// What the service needs.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The service's database (orders, outbox, notifications).
    pub pool: PgPool,
    /// Exchange the events go to.
    pub exchange: String,
    /// How long an order may stay unpaid.
    pub payment_timeout: Duration,
    /// How long `POST /orders/{id}/pay` waits for the payment saga before answering 503.
    pub pay_wait: Duration,
}

/// An order as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow)]
pub struct Order {
    /// Id.
    pub id: i64,
    /// Product.
    pub sku: String,
    /// Units.
    pub quantity: i32,
    /// Total.
    pub amount_cents: i64,
    /// `pending`, `paying`, `paid` or `cancelled`.
    pub status: String,
    /// When it was written.
    pub created_at: DateTime<Utc>,
    /// When it was paid.
    pub paid_at: Option<DateTime<Utc>>,
    /// When it was cancelled.
    pub cancelled_at: Option<DateTime<Utc>>,
    /// Why it was cancelled.
    pub cancel_reason: Option<String>,
    /// The provider's charge.
    pub charge_id: Option<String>,
}

const ORDER_COLUMNS: &str = "id, sku, quantity, amount_cents, status, created_at, paid_at, \
                             cancelled_at, cancel_reason, charge_id";

/// Body of `POST /orders`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewOrder {
    /// Product.
    pub sku: String,
    /// Units, 1 to 1000.
    pub quantity: i32,
    /// Total, positive.
    pub amount_cents: i64,
}

/// One day of the read model.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow)]
pub struct DailyTotals {
    /// The day (UTC) the orders were placed.
    pub day: NaiveDate,
    /// Orders placed.
    pub orders_created: i64,
    /// Orders paid.
    pub orders_paid: i64,
    /// Orders cancelled.
    pub orders_cancelled: i64,
    /// Revenue of the paid orders.
    pub revenue_cents: i64,
}

/// The service's routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/orders", post(create_order))
        .route("/orders/{id}", get(get_order))
        .route("/orders/{id}/pay", post(pay_order))
        .route("/reports/daily", get(daily_totals))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(state)
}

/// An error answer: `application/problem+json` naming what went wrong.
#[derive(Debug)]
pub struct Problem {
    status: StatusCode,
    detail: String,
    retry_after: Option<u64>,
}

impl Problem {
    fn new(status: StatusCode, detail: impl Into<String>) -> Self {
        Problem {
            status,
            detail: detail.into(),
            retry_after: None,
        }
    }
}

impl From<sqlx::Error> for Problem {
    fn from(e: sqlx::Error) -> Self {
        tracing::error!(cause = %e, "database error");
        Problem {
            status: StatusCode::SERVICE_UNAVAILABLE,
            detail: "database unavailable, retry".into(),
            retry_after: Some(1),
        }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "type": "about:blank",
            "title": self.status.canonical_reason().unwrap_or("error"),
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        let mut response = (self.status, Json(body)).into_response();
        response.headers_mut().insert(
            "content-type",
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(s) = self.retry_after {
            response
                .headers_mut()
                .insert("retry-after", HeaderValue::from(s));
        }
        response
    }
}

fn validate(order: &NewOrder) -> Result<(), Problem> {
    let bad = |field: &str, why: &str| {
        Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("{field}: {why}"),
        ))
    };
    if order.sku.is_empty() || order.sku.len() > 64 {
        return bad("sku", "must be 1 to 64 characters");
    }
    if !(1..=1000).contains(&order.quantity) {
        return bad("quantity", "must be between 1 and 1000");
    }
    if !(1..=100_000_000).contains(&order.amount_cents) {
        return bad("amount_cents", "must be between 1 and 100000000");
    }
    Ok(())
}

async fn create_order(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<NewOrder>, JsonRejection>,
) -> Result<Response, Problem> {
    // serde's message names the field ("quantity: invalid type: string ...").
    let Json(new) = body.map_err(|e| Problem::new(e.status(), e.body_text()))?;
    validate(&new)?;
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => match v.to_str() {
            Ok(s) if !s.is_empty() && s.len() <= 255 => Some(s.to_owned()),
            _ => {
                return Err(Problem::new(
                    StatusCode::BAD_REQUEST,
                    "Idempotency-Key: must be 1 to 255 visible ASCII characters",
                ));
            }
        },
    };
    let mut tx = state.pool.begin().await?;
    let inserted: Option<Order> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO shop.orders (request_key, sku, quantity, amount_cents) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (request_key) DO NOTHING RETURNING {ORDER_COLUMNS}"
    )))
    .bind(&key)
    .bind(&new.sku)
    .bind(new.quantity)
    .bind(new.amount_cents)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(order) = inserted else {
        // A client retry: answer with the first order, unless the key now names another one.
        tx.rollback().await?;
        let first: Order = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {ORDER_COLUMNS} FROM shop.orders WHERE request_key = $1"
        )))
        .bind(&key)
        .fetch_one(&state.pool)
        .await?;
        if first.sku != new.sku
            || first.quantity != new.quantity
            || first.amount_cents != new.amount_cents
        {
            return Err(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Idempotency-Key: already used for another order",
            ));
        }
        let mut response = (StatusCode::OK, Json(first)).into_response();
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
        return Ok(response);
    };
    let created = OrderEvent {
        order_id: order.id,
        sku: order.sku.clone(),
        quantity: order.quantity,
        amount_cents: order.amount_cents,
        created_at: order.created_at,
        reason: None,
    };
    let message_id: i64 = sqlx::query_scalar(
        "SELECT outbox.enqueue(exchange => $1, routing_key => $2, payload => $3, \
                               ordering_key => $4)",
    )
    .bind(&state.exchange)
    .bind(events::ORDER_CREATED)
    .bind(serde_json::to_vec(&created).expect("serialisable"))
    .bind(events::ordering_key(order.id))
    .fetch_one(&mut *tx)
    .await?;
    // The timeout waits in the outbox table (not in the broker) until due, and the payment
    // transaction can withdraw it by its dedupe key.
    sqlx::query(
        "SELECT outbox.enqueue(exchange => $1, routing_key => $2, payload => $3, \
                               deliver_at => now() + $4 * interval '1 millisecond', \
                               dedupe_key => $5)",
    )
    .bind(&state.exchange)
    .bind(events::PAYMENT_TIMEOUT)
    .bind(serde_json::to_vec(&PaymentTimeout { order_id: order.id }).expect("serialisable"))
    .bind(state.payment_timeout.as_millis() as f64)
    .bind(events::timeout_key(order.id))
    .execute(&mut *tx)
    .await?;
    sqlx::query("UPDATE shop.orders SET created_message_id = $2 WHERE id = $1")
        .bind(order.id)
        .bind(message_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    tracing::info!(order_id = order.id, message_id, "order created");
    Ok((StatusCode::CREATED, Json(order)).into_response())
}

async fn fetch_order(pool: &PgPool, id: i64) -> Result<Order, Problem> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {ORDER_COLUMNS} FROM shop.orders WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(pool)
    .await?
    .ok_or_else(|| Problem::new(StatusCode::NOT_FOUND, format!("order {id}: not found")))
}

async fn get_order(
    State(state): State<AppState>,
    Path(id): Path<i64>,
) -> Result<Json<Order>, Problem> {
    Ok(Json(fetch_order(&state.pool, id).await?))
}

async fn pay_order(
    State(state): State<AppState>,
    Path(id): Path<i64>,
) -> Result<Response, Problem> {
    // Claim the order and start its payment saga in one transaction: the saga (and its first
    // command, the charge) exists exactly when the order is `paying`, which keeps the timeout
    // consumer off it (it cancels `pending` orders only). A second request finds it `paying`
    // and waits for the same saga.
    let mut tx = state.pool.begin().await?;
    let claimed: Option<(i64, String, i32)> = sqlx::query_as(
        "UPDATE shop.orders SET status = 'paying' WHERE id = $1 AND status = 'pending' \
         RETURNING amount_cents, sku, quantity",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some((amount_cents, sku, quantity)) = claimed {
        let def = order_saga::definition(&state.exchange, id, amount_cents, &sku, quantity)
            .map_err(|e| Problem::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        let saga_id = saga::start(&mut tx, &def, &serde_json::json!({ "order_id": id }))
            .await
            .map_err(|e| {
                tracing::error!(order_id = id, cause = %e, "saga start failed");
                Problem {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    detail: "database unavailable, retry".into(),
                    retry_after: Some(1),
                }
            })?;
        sqlx::query("UPDATE shop.orders SET saga_id = $2 WHERE id = $1")
            .bind(id)
            .bind(saga_id.0)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        tracing::info!(order_id = id, %saga_id, "payment saga started");
    } else {
        tx.rollback().await?;
    }
    // The saga decides: paid (charged, stock reserved, confirmed) or cancelled (refunded, or
    // timed out before the claim). Wait a while for it; past that, the client asks again.
    let deadline = tokio::time::Instant::now() + state.pay_wait;
    loop {
        let order = fetch_order(&state.pool, id).await?;
        match order.status.as_str() {
            "paid" => return Ok(Json(order).into_response()),
            "paying" if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            "paying" => {
                return Err(Problem {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    detail: format!("order {id}: payment in progress, retry"),
                    retry_after: Some(1),
                });
            }
            other => {
                return Err(Problem::new(
                    StatusCode::CONFLICT,
                    format!(
                        "order {id}: is {other}{}, cannot be paid",
                        order
                            .cancel_reason
                            .map(|r| format!(" ({r})"))
                            .unwrap_or_default()
                    ),
                ));
            }
        }
    }
}

async fn daily_totals(State(state): State<AppState>) -> Result<Json<Vec<DailyTotals>>, Problem> {
    let rows = sqlx::query_as(
        "SELECT day, orders_created, orders_paid, orders_cancelled, revenue_cents \
         FROM reporting.daily_totals ORDER BY day",
    )
    .fetch_all(&state.pool)
    .await?;
    Ok(Json(rows))
}
