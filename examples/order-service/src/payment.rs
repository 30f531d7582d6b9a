//! The payment call: through the gateway, with an `Idempotency-Key` derived from the order id,
//! so every retry of one order's payment (ours, the gateway's, a client's) is the same charge.
//! Refunds go the same way (the gateway's `/refund` route) under a key of their own.

use std::time::Duration;

use serde::Deserialize;

/// What came of a charge attempt.
#[derive(Debug)]
pub enum ChargeOutcome {
    /// The provider charged (or had already charged) the order.
    Charged {
        /// The provider's charge id.
        charge_id: String,
        /// The gateway answered from its idempotency record (`Idempotent-Replayed: true`).
        replayed: bool,
    },
    /// The provider refused the charge for good (a 4xx other than a conflict): nothing charged.
    Declined(String),
    /// No answer we can trust (timeouts, 5xx, conflicts until the budget ran out): the charge
    /// may or may not exist; retrying with the same key settles it.
    Unknown(String),
}

/// A client for the provider's charge endpoint behind the gateway.
#[derive(Debug, Clone)]
pub struct PaymentClient {
    http: reqwest::Client,
    charges_url: String,
    refunds_url: String,
    attempts: u32,
}

/// What came of a refund attempt.
#[derive(Debug)]
pub enum RefundOutcome {
    /// Refunded (now or before, under the same key).
    Refunded {
        /// The provider's refund id.
        refund_id: String,
    },
    /// The provider refused for good (no charge, refunded under another key): a 4xx.
    Refused(String),
    /// No answer we can trust: retrying with the same key settles it.
    Unknown(String),
}

#[derive(Deserialize)]
struct Refund {
    refund_id: String,
}

#[derive(Deserialize)]
struct Charge {
    charge_id: String,
}

impl PaymentClient {
    /// `gateway_url` is the gateway's base URL; the `/pay` route leads to the provider.
    pub fn new(gateway_url: &str, attempts: u32) -> Self {
        PaymentClient {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("a plain HTTP client builds"),
            charges_url: format!("{}/pay/charges", gateway_url.trim_end_matches('/')),
            refunds_url: format!("{}/refund/refunds", gateway_url.trim_end_matches('/')),
            attempts: attempts.max(1),
        }
    }

    /// The client's key for one order's payment. An RFC 8941 string, as the gateway requires.
    pub fn idempotency_key(order_id: i64) -> String {
        format!("\"order-{order_id}-payment\"")
    }

    /// The client's key for one order's refund: not the charge's key, so the gateway and the
    /// provider keep the two apart.
    pub fn refund_key(order_id: i64) -> String {
        format!("\"order-{order_id}-refund\"")
    }

    /// Refunds the charge of `order_id`, retrying what is safe to retry (same key).
    pub async fn refund(&self, order_id: i64) -> RefundOutcome {
        let body = serde_json::json!({ "order_id": order_id });
        let mut last = String::new();
        for attempt in 0..self.attempts {
            if attempt > 0 {
                let ms = (50u64 << (attempt - 1).min(5)).min(1000);
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            let sent = self
                .http
                .post(&self.refunds_url)
                .header("Idempotency-Key", Self::refund_key(order_id))
                .header("X-Order-Id", order_id.to_string())
                .json(&body)
                .send()
                .await;
            let response = match sent {
                Ok(r) => r,
                Err(e) => {
                    last = format!("gateway unreachable: {e}");
                    continue;
                }
            };
            let status = response.status();
            if status.is_success() {
                return match response.json::<Refund>().await {
                    Ok(r) => RefundOutcome::Refunded {
                        refund_id: r.refund_id,
                    },
                    Err(e) => RefundOutcome::Unknown(format!("unreadable refund: {e}")),
                };
            }
            let text = response.text().await.unwrap_or_default();
            last = format!(
                "HTTP {status}: {}",
                text.chars().take(200).collect::<String>()
            );
            if status.is_server_error() || status.as_u16() == 409 || status.as_u16() == 429 {
                continue;
            }
            return RefundOutcome::Refused(last);
        }
        RefundOutcome::Unknown(last)
    }

    /// Charges `amount_cents` for `order_id`, retrying what is safe to retry (the key makes
    /// every retry the same charge).
    pub async fn charge(&self, order_id: i64, amount_cents: i64) -> ChargeOutcome {
        let body = serde_json::json!({ "order_id": order_id, "amount_cents": amount_cents });
        let mut last = String::new();
        for attempt in 0..self.attempts {
            if attempt > 0 {
                // 50 ms, 100 ms, 200 ms, ... capped at 1 s: the gateway's 409 says "in flight,
                // ask again in a moment", a 504 that the provider was slow.
                let ms = (50u64 << (attempt - 1).min(5)).min(1000);
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            let sent = self
                .http
                .post(&self.charges_url)
                .header("Idempotency-Key", Self::idempotency_key(order_id))
                .header("X-Order-Id", order_id.to_string())
                .json(&body)
                .send()
                .await;
            let response = match sent {
                Ok(r) => r,
                Err(e) => {
                    last = format!("gateway unreachable: {e}");
                    continue;
                }
            };
            let status = response.status();
            let replayed = response
                .headers()
                .get("idempotent-replayed")
                .is_some_and(|v| v == "true");
            if status.is_success() {
                return match response.json::<Charge>().await {
                    Ok(c) => ChargeOutcome::Charged {
                        charge_id: c.charge_id,
                        replayed,
                    },
                    Err(e) => ChargeOutcome::Unknown(format!("unreadable charge: {e}")),
                };
            }
            let text = response.text().await.unwrap_or_default();
            last = format!(
                "HTTP {status}: {}",
                text.chars().take(200).collect::<String>()
            );
            if status.is_server_error() || status.as_u16() == 409 || status.as_u16() == 429 {
                continue;
            }
            return ChargeOutcome::Declined(last);
        }
        ChargeOutcome::Unknown(last)
    }
}
