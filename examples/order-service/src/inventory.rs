//! The inventory service: reserves stock for `order.created`, gives it back for
//! `order.cancelled`. Exactly once per message (consumer-lib's inbox row commits with the stock
//! change), and stock never goes below zero: an order asking for more than is left is rejected.

use consumer_lib::{Handler, HandlerError, Message};
use sqlx::PgTransaction;

use crate::events::{self, OrderEvent};

/// The handler (consumer name `inventory`).
#[derive(Debug, Clone, Copy, Default)]
pub struct ReserveStock;

impl Handler for ReserveStock {
    type Payload = OrderEvent;

    async fn handle(
        &self,
        message: &Message<OrderEvent>,
        tx: &mut PgTransaction<'static>,
    ) -> Result<(), HandlerError> {
        let order = &message.payload;
        match message.routing_key() {
            events::ORDER_CREATED => reserve(order, tx).await,
            events::ORDER_CANCELLED => release(order, tx).await,
            other => Err(HandlerError::reject(format!(
                "routing key {other:?} is not an inventory event"
            ))),
        }
    }
}

async fn reserve(order: &OrderEvent, tx: &mut PgTransaction<'static>) -> Result<(), HandlerError> {
    if order.quantity <= 0 {
        return Err(HandlerError::reject(format!(
            "quantity must be positive, got {}",
            order.quantity
        )));
    }
    // The inbox already makes a redelivery a no-op; this check covers the other way one order
    // can meet two decisions: its cancellation overtook its creation (a retried message).
    let decided: Option<String> =
        sqlx::query_scalar("SELECT status FROM inventory.reservations WHERE order_id = $1")
            .bind(order.order_id)
            .fetch_optional(&mut **tx)
            .await?;
    if decided.is_some() {
        return Ok(());
    }
    // Conditional decrement: the row lock makes concurrent reservations of one SKU take turns,
    // and `stock >= quantity` is checked under it, so stock cannot go negative.
    let left: Option<i64> = sqlx::query_scalar(
        "UPDATE inventory.products SET stock = stock - $2 WHERE sku = $1 AND stock >= $2 \
         RETURNING stock",
    )
    .bind(&order.sku)
    .bind(i64::from(order.quantity))
    .fetch_optional(&mut **tx)
    .await?;
    let (status, reason) = match left {
        Some(_) => ("reserved", None),
        None => {
            let known: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM inventory.products WHERE sku = $1)",
            )
            .bind(&order.sku)
            .fetch_one(&mut **tx)
            .await?;
            let reason = if known {
                "insufficient stock"
            } else {
                "unknown sku"
            };
            ("rejected", Some(reason))
        }
    };
    sqlx::query(
        "INSERT INTO inventory.reservations (order_id, sku, quantity, status, reason, order_created_at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(order.order_id)
    .bind(&order.sku)
    .bind(order.quantity)
    .bind(status)
    .bind(reason)
    .bind(order.created_at)
    .execute(&mut **tx)
    .await?;
    tracing::debug!(order_id = order.order_id, status, "stock decision");
    Ok(())
}

async fn release(order: &OrderEvent, tx: &mut PgTransaction<'static>) -> Result<(), HandlerError> {
    let decided: Option<(String, i32, String)> = sqlx::query_as(
        "SELECT status, quantity, sku FROM inventory.reservations WHERE order_id = $1 FOR UPDATE",
    )
    .bind(order.order_id)
    .fetch_optional(&mut **tx)
    .await?;
    match decided {
        Some((status, quantity, sku)) if status == "reserved" => {
            sqlx::query("UPDATE inventory.products SET stock = stock + $2 WHERE sku = $1")
                .bind(&sku)
                .bind(i64::from(quantity))
                .execute(&mut **tx)
                .await?;
            sqlx::query(
                "UPDATE inventory.reservations SET status = 'released', released_at = clock_timestamp() \
                 WHERE order_id = $1",
            )
            .bind(order.order_id)
            .execute(&mut **tx)
            .await?;
        }
        Some(_) => {}
        None => {
            // Cancelled before its creation was processed: leave a tombstone so the late
            // `order.created` reserves nothing.
            sqlx::query(
                "INSERT INTO inventory.reservations (order_id, sku, quantity, status, reason, order_created_at, released_at) \
                 VALUES ($1, $2, $3, 'released', 'cancelled before reservation', $4, clock_timestamp())",
            )
            .bind(order.order_id)
            .bind(&order.sku)
            .bind(order.quantity)
            .bind(order.created_at)
            .execute(&mut **tx)
            .await?;
        }
    }
    Ok(())
}
