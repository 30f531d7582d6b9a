//! The merchant's webhook receiver: verifies each notification's signature with the documented
//! algorithm (`notifier::signer::verify`), deduplicates on `webhook-id`, and refuses a seeded
//! share of first attempts with 503 so the notifier's retries show. `GET /stats` reports it.

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};

/// What `GET /stats` returns.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReceiverStats {
    /// Distinct notifications accepted (valid signature).
    pub delivered: u64,
    /// Valid deliveries of an id already accepted (at-least-once duplicates).
    pub duplicates: u64,
    /// Requests whose signature did not verify.
    pub bad_signatures: u64,
    /// 503s injected.
    pub failures_injected: u64,
    /// Order ids whose `order.paid` notification was accepted.
    pub paid_orders: BTreeSet<i64>,
}

#[derive(Debug)]
struct Inner {
    secret: String,
    fail_rate: f64,
    rng: StdRng,
    seen: HashSet<String>,
    stats: ReceiverStats,
}

/// The receiver's shared state.
#[derive(Debug, Clone)]
pub struct Receiver(Arc<Mutex<Inner>>);

impl Receiver {
    /// A receiver holding `secret`, failing `fail_rate` of first attempts.
    pub fn new(secret: impl Into<String>, fail_rate: f64, seed: u64) -> Self {
        Receiver(Arc::new(Mutex::new(Inner {
            secret: secret.into(),
            fail_rate,
            rng: StdRng::seed_from_u64(seed),
            seen: HashSet::new(),
            stats: ReceiverStats::default(),
        })))
    }

    /// `POST /hooks/payments`, `GET /stats`, `GET /healthz`.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/hooks/payments", post(hook))
            .route("/stats", get(stats))
            .route("/healthz", get(|| async { "ok" }))
            .with_state(self.clone())
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ReceiverStats {
        self.0.lock().expect("receiver lock").stats.clone()
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

async fn hook(State(receiver): State<Receiver>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let id = header(&headers, "webhook-id");
    let timestamp = header(&headers, "webhook-timestamp")
        .parse::<i64>()
        .unwrap_or(0);
    let signature = header(&headers, "webhook-signature");
    let attempt = header(&headers, "webhook-attempt");
    let mut inner = receiver.0.lock().expect("receiver lock");
    let now = chrono::Utc::now().timestamp();
    if notifier::signer::verify(&inner.secret, id, timestamp, &body, signature, now, 300).is_err() {
        inner.stats.bad_signatures += 1;
        return StatusCode::UNAUTHORIZED;
    }
    let fail_rate = inner.fail_rate;
    if attempt == "1" && inner.rng.random_bool(fail_rate) {
        inner.stats.failures_injected += 1;
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    if !inner.seen.insert(id.to_owned()) {
        inner.stats.duplicates += 1;
        return StatusCode::OK;
    }
    inner.stats.delivered += 1;
    if let Some(order_id) = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("order_id").and_then(|o| o.as_i64()))
    {
        inner.stats.paid_orders.insert(order_id);
    }
    StatusCode::OK
}

async fn stats(State(receiver): State<Receiver>) -> Json<ReceiverStats> {
    Json(receiver.stats())
}
