//! The payment saga: step 0 `charge` (through the gateway; compensation `refund`, through the
//! gateway under its own idempotency key), step 1 `reserve` (the inventory; compensation
//! `release`), step 2 `confirm` (the order service marks the order paid, withdraws its payment
//! timeout, enqueues `order.paid` and produces the merchant webhook; nothing to undo).
//!
//! `POST /orders/{id}/pay` starts it in the transaction that claims the order (`pending →
//! paying`), so the saga exists exactly when the claim commits. Stock insufficient after the
//! charge fails step 1: the coordinator compensates step 0, and the refund's transaction
//! cancels the order (`insufficient stock: refunded`) and tells the read model.
//!
//! Commands and replies travel on the order exchange under the routing keys below; the workers
//! bind one queue per participant and one for the coordinator.

use serde::{Deserialize, Serialize};
use sqlx::PgTransaction;

use crate::events::{self, OrderEvent, OrderPaid};
use crate::payment::{ChargeOutcome, PaymentClient, RefundOutcome};
use saga::{Command, Participant, SagaContext, SagaDefinition, Step, StepError};

/// The saga's name in `saga.instances`.
pub const NAME: &str = "order-payment";
/// Routing key of the charge command.
pub const CHARGE: &str = "saga.charge";
/// Routing key of the refund command (the charge's compensation).
pub const REFUND: &str = "saga.refund";
/// Routing key of the stock reservation command.
pub const RESERVE: &str = "saga.reserve";
/// Routing key of the release command (the reservation's compensation).
pub const RELEASE: &str = "saga.release";
/// Routing key of the confirmation command.
pub const CONFIRM: &str = "saga.confirm";
/// Routing key of the participants' replies (the coordinator's queue).
pub const REPLY: &str = "saga.reply";

/// Payload of `charge`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChargeCmd {
    /// The order.
    pub order_id: i64,
    /// Amount to charge.
    pub amount_cents: i64,
}

/// Payload of `refund` and `confirm`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderRef {
    /// The order.
    pub order_id: i64,
}

/// Payload of `reserve` and `release`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StockCmd {
    /// The order.
    pub order_id: i64,
    /// Product.
    pub sku: String,
    /// Units.
    pub quantity: i32,
}

/// The saga of one order's payment.
pub fn definition(
    exchange: &str,
    order_id: i64,
    amount_cents: i64,
    sku: &str,
    quantity: i32,
) -> Result<SagaDefinition, saga::Error> {
    let stock = StockCmd {
        order_id,
        sku: sku.to_owned(),
        quantity,
    };
    let order = OrderRef { order_id };
    Ok(SagaDefinition::new(NAME)
        .reply_to(exchange, REPLY)
        // A refund the provider fails transiently is tried again soon, then with backoff.
        .compensation_backoff(std::time::Duration::from_millis(200))
        .compensation_max_attempts(12)
        .step(
            Step::new(
                "charge",
                Command::json(
                    exchange,
                    CHARGE,
                    &ChargeCmd {
                        order_id,
                        amount_cents,
                    },
                )?,
            )
            .compensate_with(Command::json(exchange, REFUND, &order)?),
        )
        .step(
            Step::new("reserve", Command::json(exchange, RESERVE, &stock)?)
                .compensate_with(Command::json(exchange, RELEASE, &stock)?),
        )
        .step(Step::new(
            "confirm",
            Command::json(exchange, CONFIRM, &order)?,
        )))
}

/// The payment participant: charges and refunds through the gateway.
#[derive(Debug, Clone)]
pub struct Payments {
    /// The gateway client.
    pub client: PaymentClient,
    /// Exchange of the order events (`order.cancelled` after a refund).
    pub exchange: String,
}

impl Participant for Payments {
    type Action = ChargeCmd;
    type Compensation = OrderRef;

    async fn action(
        &self,
        _ctx: &SagaContext,
        cmd: &ChargeCmd,
        tx: &mut PgTransaction<'static>,
    ) -> Result<(), StepError> {
        match self.client.charge(cmd.order_id, cmd.amount_cents).await {
            ChargeOutcome::Charged {
                charge_id,
                replayed,
            } => {
                tracing::info!(order_id = cmd.order_id, %charge_id, replayed, "charged");
                sqlx::query("UPDATE shop.orders SET charge_id = $2 WHERE id = $1")
                    .bind(cmd.order_id)
                    .bind(&charge_id)
                    .execute(&mut **tx)
                    .await?;
                Ok(())
            }
            ChargeOutcome::Declined(why) => Err(StepError::failed(format!("declined: {why}"))),
            // The charge may exist: the same key settles it on the next attempt.
            ChargeOutcome::Unknown(why) => Err(StepError::retry(why)),
        }
    }

    async fn compensate(
        &self,
        _ctx: &SagaContext,
        cmd: &OrderRef,
        tx: &mut PgTransaction<'static>,
    ) -> Result<(), StepError> {
        let refund_id = match self.client.refund(cmd.order_id).await {
            RefundOutcome::Refunded { refund_id } => refund_id,
            RefundOutcome::Refused(why) => return Err(StepError::failed(why)),
            RefundOutcome::Unknown(why) => return Err(StepError::retry(why)),
        };
        tracing::info!(order_id = cmd.order_id, %refund_id, "refunded");
        let cancelled: Option<(String, i32, i64, chrono::DateTime<chrono::Utc>, String)> =
            sqlx::query_as(
                "UPDATE shop.orders SET status = 'cancelled', cancelled_at = clock_timestamp(), \
                     cancel_reason = $3, refund_id = $2 \
                 WHERE id = $1 AND status = 'paying' \
                 RETURNING sku, quantity, amount_cents, created_at, cancel_reason",
            )
            .bind(cmd.order_id)
            .bind(&refund_id)
            .bind(REFUNDED_REASON)
            .fetch_optional(&mut **tx)
            .await?;
        let Some((sku, quantity, amount_cents, created_at, reason)) = cancelled else {
            // The refund is done; the order is not in the state a charge leaves it in.
            return Err(StepError::failed(format!(
                "order {}: refunded ({refund_id}) but not paying",
                cmd.order_id
            )));
        };
        cancel_timeout_and_announce(
            tx,
            &self.exchange,
            OrderEvent {
                order_id: cmd.order_id,
                sku,
                quantity,
                amount_cents,
                created_at,
                reason: Some(reason),
            },
        )
        .await?;
        Ok(())
    }
}

/// `cancel_reason` of an order refunded because its stock ran out after the charge.
pub const REFUNDED_REASON: &str = "insufficient stock: refunded";

/// Withdraws the order's payment timeout and enqueues `order.cancelled`.
pub async fn cancel_timeout_and_announce(
    tx: &mut PgTransaction<'static>,
    exchange: &str,
    event: OrderEvent,
) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT outbox.cancel($1)")
        .bind(events::timeout_key(event.order_id))
        .execute(&mut **tx)
        .await?;
    sqlx::query(
        "SELECT outbox.enqueue(exchange => $1, routing_key => $2, payload => $3, \
                               ordering_key => $4)",
    )
    .bind(exchange)
    .bind(events::ORDER_CANCELLED)
    .bind(serde_json::to_vec(&event).expect("serialisable"))
    .bind(events::ordering_key(event.order_id))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The order service's last step: the order is paid and its stock held.
#[derive(Debug, Clone)]
pub struct Confirm {
    /// Exchange of the order events.
    pub exchange: String,
    /// The notifier endpoint of the merchant's webhook.
    pub notify_endpoint: String,
}

impl Participant for Confirm {
    type Action = OrderRef;
    type Compensation = OrderRef;

    async fn action(
        &self,
        _ctx: &SagaContext,
        cmd: &OrderRef,
        tx: &mut PgTransaction<'static>,
    ) -> Result<(), StepError> {
        let id = cmd.order_id;
        let paid: Option<(i64, Option<String>, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
            "UPDATE shop.orders SET status = 'paid', paid_at = clock_timestamp() \
             WHERE id = $1 AND status = 'paying' RETURNING amount_cents, charge_id, created_at",
        )
        .bind(id)
        .fetch_optional(&mut **tx)
        .await?;
        let Some((amount_cents, Some(charge_id), created_at)) = paid else {
            return Err(StepError::failed(format!(
                "order {id}: not paying, or no charge recorded"
            )));
        };
        let withdrawn: bool = sqlx::query_scalar("SELECT outbox.cancel($1)")
            .bind(events::timeout_key(id))
            .fetch_one(&mut **tx)
            .await?;
        let event = OrderPaid {
            order_id: id,
            amount_cents,
            charge_id,
            created_at,
        };
        let message_id: i64 = sqlx::query_scalar(
            "SELECT outbox.enqueue(exchange => $1, routing_key => $2, payload => $3, \
                                   ordering_key => $4)",
        )
        .bind(&self.exchange)
        .bind(events::ORDER_PAID)
        .bind(serde_json::to_vec(&event).expect("serialisable"))
        .bind(events::ordering_key(id))
        .fetch_one(&mut **tx)
        .await?;
        sqlx::query(
            "SELECT notify.send(endpoint => $1, event_type => 'order.paid', body => $2, \
                                dedupe_key => $3)",
        )
        .bind(&self.notify_endpoint)
        .bind(serde_json::to_value(&event).expect("serialisable"))
        .bind(format!("order.paid:{id}"))
        .execute(&mut **tx)
        .await?;
        sqlx::query(
            "UPDATE shop.orders SET paid_message_id = $2, timeout_withdrawn = $3 WHERE id = $1",
        )
        .bind(id)
        .bind(message_id)
        .bind(withdrawn)
        .execute(&mut **tx)
        .await?;
        tracing::info!(order_id = id, "order paid");
        Ok(())
    }

    async fn compensate(
        &self,
        _ctx: &SagaContext,
        cmd: &OrderRef,
        _tx: &mut PgTransaction<'static>,
    ) -> Result<(), StepError> {
        // The definition gives `confirm` no compensation, so none is ever sent.
        Err(StepError::failed(format!(
            "order {}: a confirmation is not undone",
            cmd.order_id
        )))
    }
}
