//! The messages of the order flow: routing keys and payloads (JSON).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// An order was placed (ordering key `order-<id>`).
pub const ORDER_CREATED: &str = "order.created";
/// An order was paid (ordering key `order-<id>`).
pub const ORDER_PAID: &str = "order.paid";
/// An order was cancelled (ordering key `order-<id>`).
pub const ORDER_CANCELLED: &str = "order.cancelled";
/// The delayed message that cancels an unpaid order (dedupe key `pay-timeout:<id>`).
pub const PAYMENT_TIMEOUT: &str = "order.payment_timeout";

/// The ordering key of every event about one order: one order's events keep their order.
pub fn ordering_key(order_id: i64) -> String {
    format!("order-{order_id}")
}

/// The dedupe key of an order's payment timeout, which the payment transaction cancels.
pub fn timeout_key(order_id: i64) -> String {
    format!("pay-timeout:{order_id}")
}

/// Payload of `order.created` and `order.cancelled`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderEvent {
    /// The order.
    pub order_id: i64,
    /// Product.
    pub sku: String,
    /// Units ordered.
    pub quantity: i32,
    /// Order total.
    pub amount_cents: i64,
    /// When the order was written (the read model buckets by its day).
    pub created_at: DateTime<Utc>,
    /// Why it was cancelled (`order.cancelled` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Payload of `order.paid`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderPaid {
    /// The order.
    pub order_id: i64,
    /// Amount charged.
    pub amount_cents: i64,
    /// The provider's charge id.
    pub charge_id: String,
    /// When the order was written.
    pub created_at: DateTime<Utc>,
}

/// Payload of `order.payment_timeout`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PaymentTimeout {
    /// The order to cancel if it is still unpaid.
    pub order_id: i64,
}
