//! The inventory service, a participant of the payment saga ([`crate::order_saga`]): `reserve`
//! takes the stock of a paid order, `release` gives it back. Exactly once per step (the saga's
//! barrier and consumer-lib's inbox commit with the stock change), and stock never goes below
//! zero: an order asking for more than is left fails its step, which makes the saga refund the
//! charge.

use saga::{Participant, SagaContext, StepError};
use sqlx::PgTransaction;

use crate::order_saga::StockCmd;

/// The participant (consumer name `inventory`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Inventory;

/// Why a reservation is refused when the product has too few units.
pub const INSUFFICIENT: &str = "insufficient stock";

impl Participant for Inventory {
    type Action = StockCmd;
    type Compensation = StockCmd;

    async fn action(
        &self,
        _ctx: &SagaContext,
        cmd: &StockCmd,
        tx: &mut PgTransaction<'static>,
    ) -> Result<(), StepError> {
        if cmd.quantity <= 0 {
            return Err(StepError::failed(format!(
                "quantity must be positive, got {}",
                cmd.quantity
            )));
        }
        // Conditional decrement: the row lock makes concurrent reservations of one SKU take
        // turns, and `stock >= quantity` is checked under it, so stock cannot go negative.
        let left: Option<i64> = sqlx::query_scalar(
            "UPDATE inventory.products SET stock = stock - $2 WHERE sku = $1 AND stock >= $2 \
             RETURNING stock",
        )
        .bind(&cmd.sku)
        .bind(i64::from(cmd.quantity))
        .fetch_optional(&mut **tx)
        .await?;
        if left.is_none() {
            let known: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM inventory.products WHERE sku = $1)",
            )
            .bind(&cmd.sku)
            .fetch_one(&mut **tx)
            .await?;
            // A refused step's writes roll back; the saga keeps the reason (`saga.steps`).
            return Err(StepError::failed(if known {
                format!("{INSUFFICIENT} of {} for {} units", cmd.sku, cmd.quantity)
            } else {
                format!("unknown sku {}", cmd.sku)
            }));
        }
        sqlx::query(
            "INSERT INTO inventory.reservations (order_id, sku, quantity, status, order_created_at) \
             SELECT $1, $2, $3, 'reserved', o.created_at FROM shop.orders o WHERE o.id = $1",
        )
        .bind(cmd.order_id)
        .bind(&cmd.sku)
        .bind(cmd.quantity)
        .execute(&mut **tx)
        .await?;
        tracing::debug!(order_id = cmd.order_id, "stock reserved");
        Ok(())
    }

    async fn compensate(
        &self,
        _ctx: &SagaContext,
        cmd: &StockCmd,
        tx: &mut PgTransaction<'static>,
    ) -> Result<(), StepError> {
        // The barrier calls this only after the reservation applied, and once.
        let released: Option<(String, i32)> = sqlx::query_as(
            "UPDATE inventory.reservations SET status = 'released', released_at = clock_timestamp() \
             WHERE order_id = $1 AND status = 'reserved' RETURNING sku, quantity",
        )
        .bind(cmd.order_id)
        .fetch_optional(&mut **tx)
        .await?;
        if let Some((sku, quantity)) = released {
            sqlx::query("UPDATE inventory.products SET stock = stock + $2 WHERE sku = $1")
                .bind(&sku)
                .bind(i64::from(quantity))
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }
}
