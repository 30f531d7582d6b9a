//! A fake payment provider, local and deliberately unreliable: some requests are slow (longer
//! than the gateway's timeout), some fail with 503, chosen by a seeded random generator so a run
//! can be repeated. Like a real provider it dedupes on the `Idempotency-Key` it receives and
//! honours the gateway's fencing token: a request whose token is lower than one already seen
//! for the order never charges. `POST /refunds` refunds an order's charge at most once, deduped
//! on its own `Idempotency-Key` (distinct from the charge's). `GET /stats` reports every charge
//! and refund, per order.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};

/// How unreliable the provider is.
#[derive(Debug, Clone)]
pub struct ProviderConfig {
    /// Seed of the random choices.
    pub seed: u64,
    /// Share of requests answered 503 before anything is charged.
    pub fail_rate: f64,
    /// Share of requests that take `slow` before charging.
    pub slow_rate: f64,
    /// How long a slow request takes.
    pub slow: Duration,
}

/// Counters and charges, as `GET /stats` returns them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProviderStats {
    /// Charge requests received.
    pub requests: u64,
    /// Charges created.
    pub charges: u64,
    /// Requests answered with an existing charge (same idempotency key).
    pub deduplicated: u64,
    /// Requests refused because a newer fencing token was seen for the order.
    pub stale_fencing_tokens: u64,
    /// 503s injected.
    pub failures_injected: u64,
    /// Slow requests injected.
    pub slow_injected: u64,
    /// Charges per order id (more than one would be a double charge).
    pub charges_per_order: BTreeMap<i64, u32>,
    /// Amount charged per order id.
    pub amount_per_order: BTreeMap<i64, i64>,
    /// Refund requests received.
    pub refund_requests: u64,
    /// Refunds issued.
    pub refunds: u64,
    /// Refund requests answered with the existing refund (same idempotency key).
    pub refunds_deduplicated: u64,
    /// Refund requests refused: no charge for the order, or refunded already under another key.
    pub refunds_refused: u64,
    /// Refunds per order id (more than one would be a double refund).
    pub refunds_per_order: BTreeMap<i64, u32>,
}

#[derive(Debug)]
struct Inner {
    rng: StdRng,
    config: ProviderConfig,
    by_key: HashMap<String, String>,
    /// Charge id per order (the provider's own record of what it charged).
    charge_of_order: HashMap<i64, String>,
    /// Refund idempotency key → (order, refund id).
    refund_by_key: HashMap<String, (i64, String)>,
    /// Refund id per order.
    refund_of_order: HashMap<i64, String>,
    next_refund: u64,
    max_token: HashMap<i64, u64>,
    next_charge: u64,
    stats: ProviderStats,
}

/// The provider's shared state.
#[derive(Debug, Clone)]
pub struct Provider(Arc<Mutex<Inner>>);

#[derive(Deserialize)]
struct ChargeRequest {
    order_id: i64,
    amount_cents: i64,
}

impl Provider {
    /// A provider with no charges.
    pub fn new(config: ProviderConfig) -> Self {
        Provider(Arc::new(Mutex::new(Inner {
            rng: StdRng::seed_from_u64(config.seed),
            config,
            by_key: HashMap::new(),
            charge_of_order: HashMap::new(),
            refund_by_key: HashMap::new(),
            refund_of_order: HashMap::new(),
            next_refund: 1,
            max_token: HashMap::new(),
            next_charge: 1,
            stats: ProviderStats::default(),
        })))
    }

    /// `POST /charges`, `POST /refunds`, `GET /stats`, `GET /healthz`.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/charges", post(charge))
            .route("/refunds", post(refund))
            .route("/stats", get(stats))
            .route("/healthz", get(|| async { "ok" }))
            .with_state(self.clone())
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ProviderStats {
        self.0.lock().expect("provider lock").stats.clone()
    }
}

fn answer(status: StatusCode, body: serde_json::Value) -> Response {
    (status, Json(body)).into_response()
}

/// Records the token; false when a newer one was already seen for the order.
fn fence(inner: &mut Inner, order_id: i64, token: Option<u64>) -> bool {
    let Some(token) = token else { return true };
    let seen = inner.max_token.entry(order_id).or_insert(0);
    if token < *seen {
        inner.stats.stale_fencing_tokens += 1;
        return false;
    }
    *seen = token;
    true
}

async fn charge(
    State(provider): State<Provider>,
    headers: HeaderMap,
    Json(req): Json<ChargeRequest>,
) -> Response {
    let Some(key) = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
    else {
        return answer(
            StatusCode::BAD_REQUEST,
            serde_json::json!({"error": "Idempotency-Key header required"}),
        );
    };
    let token = headers
        .get("fencing-token")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let delay = {
        let mut inner = provider.0.lock().expect("provider lock");
        inner.stats.requests += 1;
        if !fence(&mut inner, req.order_id, token) {
            return answer(
                StatusCode::CONFLICT,
                serde_json::json!({"error": "stale fencing token"}),
            );
        }
        if let Some(id) = inner.by_key.get(&key).cloned() {
            inner.stats.deduplicated += 1;
            return answer(StatusCode::OK, serde_json::json!({"charge_id": id}));
        }
        let (fail_rate, slow_rate, slow) = (
            inner.config.fail_rate,
            inner.config.slow_rate,
            inner.config.slow,
        );
        if inner.rng.random_bool(fail_rate) {
            inner.stats.failures_injected += 1;
            return answer(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"error": "injected failure"}),
            );
        }
        if inner.rng.random_bool(slow_rate) {
            inner.stats.slow_injected += 1;
            slow
        } else {
            Duration::from_millis(inner.rng.random_range(1..10))
        }
    };
    // A real provider keeps working when its client hangs up (the gateway's timeout): the
    // charge runs in its own task, so dropping this request does not cancel it.
    let task = tokio::spawn(settle(provider, key, token, req, delay));
    task.await.unwrap_or_else(|_| {
        answer(
            StatusCode::INTERNAL_SERVER_ERROR,
            serde_json::json!({"error": "charge task failed"}),
        )
    })
}

async fn settle(
    provider: Provider,
    key: String,
    token: Option<u64>,
    req: ChargeRequest,
    delay: Duration,
) -> Response {
    tokio::time::sleep(delay).await;
    let mut inner = provider.0.lock().expect("provider lock");
    // Checked again at the write: a request that outlived the gateway's timeout must not charge
    // once a newer request for the order has started (Kleppmann's fencing).
    if let Some(t) = token
        && inner
            .max_token
            .get(&req.order_id)
            .is_some_and(|seen| t < *seen)
    {
        inner.stats.stale_fencing_tokens += 1;
        return answer(
            StatusCode::CONFLICT,
            serde_json::json!({"error": "stale fencing token"}),
        );
    }
    if let Some(id) = inner.by_key.get(&key).cloned() {
        inner.stats.deduplicated += 1;
        return answer(StatusCode::OK, serde_json::json!({"charge_id": id}));
    }
    let id = format!("ch_{}", inner.next_charge);
    inner.next_charge += 1;
    inner.by_key.insert(key, id.clone());
    inner.charge_of_order.insert(req.order_id, id.clone());
    inner.stats.charges += 1;
    *inner
        .stats
        .charges_per_order
        .entry(req.order_id)
        .or_insert(0) += 1;
    *inner
        .stats
        .amount_per_order
        .entry(req.order_id)
        .or_insert(0) += req.amount_cents;
    answer(StatusCode::CREATED, serde_json::json!({"charge_id": id}))
}

#[derive(Deserialize)]
struct RefundRequest {
    order_id: i64,
}

/// `POST /refunds` `{order_id}` with an `Idempotency-Key`: refunds the order's charge. The same
/// key answers the same refund again; an order without a charge is 404, one refunded already
/// under another key 409. Like charges, some requests fail with 503 before anything happens.
async fn refund(
    State(provider): State<Provider>,
    headers: HeaderMap,
    body: Result<Json<RefundRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Some(key) = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
    else {
        return answer(
            StatusCode::BAD_REQUEST,
            serde_json::json!({"error": "Idempotency-Key header required"}),
        );
    };
    let req = match body {
        Ok(Json(r)) => r,
        Err(e) => {
            return answer(
                StatusCode::UNPROCESSABLE_ENTITY,
                serde_json::json!({"error": e.body_text()}),
            );
        }
    };
    let mut inner = provider.0.lock().expect("provider lock");
    inner.stats.refund_requests += 1;
    if let Some((order, id)) = inner.refund_by_key.get(&key).cloned() {
        if order != req.order_id {
            inner.stats.refunds_refused += 1;
            return answer(
                StatusCode::UNPROCESSABLE_ENTITY,
                serde_json::json!({"error": "Idempotency-Key already used for another order"}),
            );
        }
        inner.stats.refunds_deduplicated += 1;
        return answer(StatusCode::OK, serde_json::json!({"refund_id": id}));
    }
    let Some(charge_id) = inner.charge_of_order.get(&req.order_id).cloned() else {
        inner.stats.refunds_refused += 1;
        return answer(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": format!("order_id {}: no charge to refund", req.order_id)}),
        );
    };
    if inner.refund_of_order.contains_key(&req.order_id) {
        inner.stats.refunds_refused += 1;
        return answer(
            StatusCode::CONFLICT,
            serde_json::json!({"error": format!("order_id {}: charge {charge_id} already refunded", req.order_id)}),
        );
    }
    let fail_rate = inner.config.fail_rate;
    if inner.rng.random_bool(fail_rate) {
        inner.stats.failures_injected += 1;
        return answer(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"error": "injected failure"}),
        );
    }
    let id = format!("re_{}", inner.next_refund);
    inner.next_refund += 1;
    inner.refund_by_key.insert(key, (req.order_id, id.clone()));
    inner.refund_of_order.insert(req.order_id, id.clone());
    inner.stats.refunds += 1;
    *inner
        .stats
        .refunds_per_order
        .entry(req.order_id)
        .or_insert(0) += 1;
    answer(
        StatusCode::CREATED,
        serde_json::json!({"refund_id": id, "charge_id": charge_id}),
    )
}

async fn stats(State(provider): State<Provider>) -> Json<ProviderStats> {
    Json(provider.stats())
}
