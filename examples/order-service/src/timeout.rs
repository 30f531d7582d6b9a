//! The payment timeout: when `order.payment_timeout` arrives, cancel the order if it is still
//! unpaid, and tell the others with `order.cancelled` (enqueued in the same transaction).

use consumer_lib::{Handler, HandlerError, Message};
use sqlx::PgTransaction;

use crate::events::{self, OrderEvent, PaymentTimeout};

/// The handler (consumer name `payment-timeouts`). `exchange` is where `order.cancelled` goes.
#[derive(Debug, Clone)]
pub struct CancelUnpaid {
    /// Exchange of the order events.
    pub exchange: String,
}

impl Handler for CancelUnpaid {
    type Payload = PaymentTimeout;

    async fn handle(
        &self,
        message: &Message<PaymentTimeout>,
        tx: &mut PgTransaction<'static>,
    ) -> Result<(), HandlerError> {
        let id = message.payload.order_id;
        // Only `pending` is cancelled: the row lock orders this against the payment's own
        // `pending → paying` claim, so exactly one of them wins.
        let cancelled: Option<OrderEvent> =
            sqlx::query_as::<_, (i64, String, i32, i64, chrono::DateTime<chrono::Utc>)>(
                "UPDATE shop.orders SET status = 'cancelled', cancelled_at = clock_timestamp(), \
                 cancel_reason = 'payment timeout' \
             WHERE id = $1 AND status = 'pending' \
             RETURNING id, sku, quantity, amount_cents, created_at",
            )
            .bind(id)
            .fetch_optional(&mut **tx)
            .await?
            .map(
                |(order_id, sku, quantity, amount_cents, created_at)| OrderEvent {
                    order_id,
                    sku,
                    quantity,
                    amount_cents,
                    created_at,
                    reason: Some("payment timeout".into()),
                },
            );
        if let Some(event) = cancelled {
            sqlx::query(
                "SELECT outbox.enqueue(exchange => $1, routing_key => $2, payload => $3, \
                                       ordering_key => $4)",
            )
            .bind(&self.exchange)
            .bind(events::ORDER_CANCELLED)
            .bind(serde_json::to_vec(&event).expect("serialisable"))
            .bind(events::ordering_key(id))
            .execute(&mut **tx)
            .await?;
            tracing::info!(order_id = id, "unpaid order cancelled");
            return Ok(());
        }
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM shop.orders WHERE id = $1")
                .bind(id)
                .fetch_optional(&mut **tx)
                .await?;
        match status.as_deref() {
            // Paid, or cancelled by an earlier copy of this message: nothing to do.
            Some("paid") | Some("cancelled") => Ok(()),
            Some(_) => {
                // A payment saga runs and its outcome decides, unless it ended without deciding:
                // the charge was declined (step 0 refused, nothing charged, nothing to refund).
                let declined: Option<(String, i32, i64, chrono::DateTime<chrono::Utc>)> =
                    sqlx::query_as(
                        "UPDATE shop.orders o SET status = 'cancelled', cancelled_at = clock_timestamp(), \
                             cancel_reason = 'payment declined' \
                         FROM saga.instances i \
                         WHERE o.id = $1 AND o.status = 'paying' AND i.id = o.saga_id \
                           AND i.state = 'compensated' AND o.charge_id IS NULL \
                         RETURNING o.sku, o.quantity, o.amount_cents, o.created_at",
                    )
                    .bind(id)
                    .fetch_optional(&mut **tx)
                    .await?;
                let Some((sku, quantity, amount_cents, created_at)) = declined else {
                    return Err(HandlerError::retry(format!(
                        "order {id}: payment in progress"
                    )));
                };
                crate::order_saga::cancel_timeout_and_announce(
                    tx,
                    &self.exchange,
                    OrderEvent {
                        order_id: id,
                        sku,
                        quantity,
                        amount_cents,
                        created_at,
                        reason: Some("payment declined".into()),
                    },
                )
                .await?;
                Ok(())
            }
            None => Err(HandlerError::reject(format!("order {id}: not found"))),
        }
    }
}
