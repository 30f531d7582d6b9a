//! The participant side: a consumer-lib handler that runs a service's action or compensation
//! for one saga step under a branch barrier, and replies to the coordinator in the same
//! transaction.
//!
//! The barrier (`saga.barrier`, in the participant's database) gives DTM's guarantees across
//! messages, where consumer-lib's inbox only covers one message id:
//! - a compensation that arrives before its action (the action timed out and is still on its
//!   way) records that and undoes nothing: an "empty compensation";
//! - the late action then finds that record and is a no-op: no "hanging" action is left applied
//!   after its saga compensated;
//! - an action or compensation that already applied is not applied again.
//!
//! The barrier rows, the service's effects and the reply are one transaction with the inbox
//! row. A failure rolls back to a savepoint taken before the barrier, so the failed attempt
//! leaves no barrier row and the next attempt is judged afresh.

use std::future::Future;

use consumer_lib::lapin::types::AMQPValue;
use consumer_lib::{Handler, HandlerError, Message};
use serde::de::DeserializeOwned;
use serde_json::Value;
use sqlx::PgTransaction;

use crate::{
    ATTEMPT_HEADER, OP_HEADER, REPLY_EXCHANGE_HEADER, REPLY_ROUTING_KEY_HEADER, SAGA_ID_HEADER,
    STEP_HEADER,
};

/// Which command of a step a message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// The step's action.
    Action,
    /// The step's compensation.
    Compensation,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Op::Action => "action",
            Op::Compensation => "compensation",
        }
    }
}

/// What a participant learns about the command besides its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SagaContext {
    /// The saga id.
    pub saga_id: i64,
    /// The step's index.
    pub step: i32,
    /// Action or compensation.
    pub op: Op,
    /// The command's attempt (compensations are retried as new messages).
    pub attempt: i32,
    /// The message id of this command.
    pub message_id: i64,
    reply_exchange: String,
    reply_routing_key: String,
}

impl SagaContext {
    /// A key that is the same for every attempt of this step's `op` and different for anything
    /// else: use it as the `Idempotency-Key` of an external call (a charge, a refund).
    pub fn idempotency_key(&self) -> String {
        format!("saga-{}-{}-{}", self.saga_id, self.step, self.op.as_str())
    }

    /// Reads the saga headers of a delivered command.
    pub fn from_message<T>(message: &Message<T>) -> Result<Self, String> {
        let saga_id = message
            .header_str(SAGA_ID_HEADER)
            .ok_or_else(|| format!("header {SAGA_ID_HEADER} missing"))?
            .parse::<i64>()
            .map_err(|_| format!("header {SAGA_ID_HEADER} is not an integer"))?;
        let int = |name: &str| -> Result<i32, String> {
            match message.headers().inner().get(name) {
                Some(AMQPValue::LongLongInt(v)) => i32::try_from(*v).ok(),
                Some(AMQPValue::LongInt(v)) => Some(*v),
                Some(AMQPValue::ShortInt(v)) => Some(i32::from(*v)),
                Some(AMQPValue::ShortShortInt(v)) => Some(i32::from(*v)),
                _ => None,
            }
            .ok_or_else(|| format!("header {name} missing or not an integer"))
        };
        let op = match message.header_str(OP_HEADER) {
            Some("action") => Op::Action,
            Some("compensation") => Op::Compensation,
            _ => return Err(format!("header {OP_HEADER} must be action or compensation")),
        };
        Ok(SagaContext {
            saga_id,
            step: int(STEP_HEADER)?,
            op,
            attempt: int(ATTEMPT_HEADER)?,
            message_id: message.id,
            reply_exchange: message
                .header_str(REPLY_EXCHANGE_HEADER)
                .ok_or_else(|| format!("header {REPLY_EXCHANGE_HEADER} missing"))?
                .to_owned(),
            reply_routing_key: message
                .header_str(REPLY_ROUTING_KEY_HEADER)
                .ok_or_else(|| format!("header {REPLY_ROUTING_KEY_HEADER} missing"))?
                .to_owned(),
        })
    }
}

/// How an action or compensation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StepError {
    /// Will never succeed (insufficient stock, a refund the provider refuses for good). An action
    /// failing so makes the saga compensate the steps before it; a compensation failing so parks
    /// the saga as stuck.
    Failed(String),
    /// May succeed later (a provider down, a lock conflict). An action is retried by
    /// consumer-lib (its step timeout bounds how long the saga waits); a compensation is retried
    /// by the coordinator with backoff, and parked as stuck after its maximum attempts.
    Retry(String),
}

impl StepError {
    /// A permanent failure.
    pub fn failed(reason: impl std::fmt::Display) -> Self {
        StepError::Failed(reason.to_string())
    }

    /// A transient failure.
    pub fn retry(reason: impl std::fmt::Display) -> Self {
        StepError::Retry(reason.to_string())
    }
}

/// A database error is transient: a deadlock or a lost connection succeeds when tried again.
impl From<sqlx::Error> for StepError {
    fn from(err: sqlx::Error) -> Self {
        StepError::Retry(format!("database: {err}"))
    }
}

/// One service's part in a saga step: apply the action, or undo it. Write every effect through
/// `tx`; the barrier, the effects, the reply and the inbox row commit together.
pub trait Participant: Send + Sync + 'static {
    /// The action's payload (decoded with `serde_json`).
    type Action: DeserializeOwned + Send + Sync + 'static;
    /// The compensation's payload.
    type Compensation: DeserializeOwned + Send + Sync + 'static;

    /// Applies the action.
    fn action(
        &self,
        ctx: &SagaContext,
        payload: &Self::Action,
        tx: &mut PgTransaction<'static>,
    ) -> impl Future<Output = Result<(), StepError>> + Send;

    /// Undoes the action. Called only when the action applied here (never for an empty
    /// compensation) and at most once successfully.
    fn compensate(
        &self,
        ctx: &SagaContext,
        payload: &Self::Compensation,
        tx: &mut PgTransaction<'static>,
    ) -> impl Future<Output = Result<(), StepError>> + Send;
}

/// Wraps a [`Participant`] as a consumer-lib [`Handler`] (give it to
/// `Consumer::builder(..).handler(..)`).
#[derive(Debug, Clone)]
pub struct ParticipantHandler<P> {
    participant: P,
}

impl<P: Participant> ParticipantHandler<P> {
    /// The handler.
    pub fn new(participant: P) -> Self {
        ParticipantHandler { participant }
    }
}

/// What the barrier decided and the participant did, for the reply.
struct Outcome {
    outcome: &'static str,
    error: Option<String>,
    applied: bool,
}

impl Outcome {
    fn ok(applied: bool) -> Self {
        Outcome {
            outcome: "ok",
            error: None,
            applied,
        }
    }
    fn skipped() -> Self {
        Outcome {
            outcome: "skipped",
            error: None,
            applied: false,
        }
    }
    fn err(outcome: &'static str, error: String) -> Self {
        Outcome {
            outcome,
            error: Some(error),
            applied: false,
        }
    }
}

impl<P: Participant> Handler for ParticipantHandler<P> {
    type Payload = Value;

    async fn handle(
        &self,
        message: &Message<Value>,
        tx: &mut PgTransaction<'static>,
    ) -> Result<(), HandlerError> {
        // Without the saga headers there is nobody to answer: a producer bug, dead-lettered.
        let ctx = SagaContext::from_message(message).map_err(HandlerError::reject)?;
        sqlx::query("SAVEPOINT saga_step")
            .execute(&mut **tx)
            .await?;
        let outcome = match ctx.op {
            Op::Action => self.action(&ctx, &message.payload, tx).await?,
            Op::Compensation => self.compensate(&ctx, &message.payload, tx).await?,
        };
        let undo = outcome.outcome != "ok" && outcome.outcome != "skipped";
        let end = if undo {
            "ROLLBACK TO SAVEPOINT saga_step"
        } else {
            "RELEASE SAVEPOINT saga_step"
        };
        sqlx::query(end).execute(&mut **tx).await?;
        sqlx::query("SELECT saga.reply($1, $2, $3, $4, $5, $6, $7, $8, $9)")
            .bind(&ctx.reply_exchange)
            .bind(&ctx.reply_routing_key)
            .bind(ctx.saga_id)
            .bind(ctx.step)
            .bind(ctx.op.as_str())
            .bind(ctx.attempt)
            .bind(outcome.outcome)
            .bind(&outcome.error)
            .bind(outcome.applied)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

impl<P: Participant> ParticipantHandler<P> {
    async fn action(
        &self,
        ctx: &SagaContext,
        payload: &Value,
        tx: &mut PgTransaction<'static>,
    ) -> Result<Outcome, HandlerError> {
        let barrier: String = sqlx::query_scalar("SELECT saga.barrier_action($1, $2)")
            .bind(ctx.saga_id)
            .bind(ctx.step)
            .fetch_one(&mut **tx)
            .await?;
        if barrier != "run" {
            // 'blocked': its compensation came first (a hanging action); 'duplicate': it
            // applied before. Either way nothing to do, and the coordinator ignores the answer.
            return Ok(Outcome::skipped());
        }
        let payload: P::Action = match serde_json::from_value(payload.clone()) {
            Ok(p) => p,
            Err(err) => return Ok(Outcome::err("failed", format!("undecodable action: {err}"))),
        };
        match self.participant.action(ctx, &payload, tx).await {
            Ok(()) => Ok(Outcome::ok(true)),
            Err(StepError::Failed(reason)) => Ok(Outcome::err("failed", reason)),
            // The whole transaction rolls back (inbox row too): consumer-lib redelivers it.
            Err(StepError::Retry(reason)) => Err(HandlerError::retry(reason)),
        }
    }

    async fn compensate(
        &self,
        ctx: &SagaContext,
        payload: &Value,
        tx: &mut PgTransaction<'static>,
    ) -> Result<Outcome, HandlerError> {
        let barrier: String = sqlx::query_scalar("SELECT saga.barrier_compensation($1, $2)")
            .bind(ctx.saga_id)
            .bind(ctx.step)
            .fetch_one(&mut **tx)
            .await?;
        match barrier.as_str() {
            // The action never applied here, and now never will: nothing to undo.
            "empty" => return Ok(Outcome::ok(false)),
            // Undone before: not again.
            "duplicate" => return Ok(Outcome::ok(false)),
            _ => {}
        }
        let payload: P::Compensation = match serde_json::from_value(payload.clone()) {
            Ok(p) => p,
            Err(err) => {
                return Ok(Outcome::err(
                    "failed",
                    format!("undecodable compensation: {err}"),
                ));
            }
        };
        match self.participant.compensate(ctx, &payload, tx).await {
            Ok(()) => Ok(Outcome::ok(true)),
            Err(StepError::Failed(reason)) => Ok(Outcome::err("failed", reason)),
            Err(StepError::Retry(reason)) => Ok(Outcome::err("retry", reason)),
        }
    }
}
