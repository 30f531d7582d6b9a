//! The query side (CQRS): per-day order counts and revenue, built only from the events.
//! Exactly once per message through consumer-lib's inbox, so the totals never double count.

use consumer_lib::{Handler, HandlerError, Message};
use sqlx::PgTransaction;

use crate::events::{self, OrderEvent, OrderPaid};

/// The handler (consumer name `read-model`).
#[derive(Debug, Clone, Copy, Default)]
pub struct DailyTotals;

impl Handler for DailyTotals {
    type Payload = serde_json::Value;

    async fn handle(
        &self,
        message: &Message<serde_json::Value>,
        tx: &mut PgTransaction<'static>,
    ) -> Result<(), HandlerError> {
        let undecodable = |e: serde_json::Error| HandlerError::reject(format!("payload: {e}"));
        let (day, created, paid, cancelled, revenue) = match message.routing_key() {
            events::ORDER_CREATED => {
                let e: OrderEvent =
                    serde_json::from_value(message.payload.clone()).map_err(undecodable)?;
                (e.created_at.date_naive(), 1i64, 0i64, 0i64, 0i64)
            }
            events::ORDER_PAID => {
                let e: OrderPaid =
                    serde_json::from_value(message.payload.clone()).map_err(undecodable)?;
                (e.created_at.date_naive(), 0, 1, 0, e.amount_cents)
            }
            events::ORDER_CANCELLED => {
                let e: OrderEvent =
                    serde_json::from_value(message.payload.clone()).map_err(undecodable)?;
                (e.created_at.date_naive(), 0, 0, 1, 0)
            }
            other => {
                return Err(HandlerError::reject(format!(
                    "routing key {other:?} is not an order event"
                )));
            }
        };
        sqlx::query(
            "INSERT INTO reporting.daily_totals AS t \
                 (day, orders_created, orders_paid, orders_cancelled, revenue_cents) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (day) DO UPDATE SET \
                 orders_created = t.orders_created + EXCLUDED.orders_created, \
                 orders_paid = t.orders_paid + EXCLUDED.orders_paid, \
                 orders_cancelled = t.orders_cancelled + EXCLUDED.orders_cancelled, \
                 revenue_cents = t.revenue_cents + EXCLUDED.revenue_cents",
        )
        .bind(day)
        .bind(created)
        .bind(paid)
        .bind(cancelled)
        .bind(revenue)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}
