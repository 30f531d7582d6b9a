//! A saga's definition (ordered steps, each an action and a compensation) and starting one
//! inside the caller's transaction.

use std::time::Duration;

use serde::Serialize;
use serde_json::{Value, json};
use sqlx::PgConnection;

use crate::{DEFAULT_REPLY_QUEUE, Error};

/// A saga's id: an outbox message id, unique across every producer database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct SagaId(pub i64);

impl std::fmt::Display for SagaId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// One command of a step: an outbox message to the participant (JSON payload).
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    /// The exchange (`""` for the default exchange, the routing key then naming a queue).
    pub exchange: String,
    /// The routing key.
    pub routing_key: String,
    /// The body, sent as JSON.
    pub payload: Value,
}

impl Command {
    /// A command with a payload already in JSON form.
    pub fn new(
        exchange: impl Into<String>,
        routing_key: impl Into<String>,
        payload: Value,
    ) -> Self {
        Command {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            payload,
        }
    }

    /// A command whose payload is any serialisable value.
    pub fn json<T: Serialize>(
        exchange: impl Into<String>,
        routing_key: impl Into<String>,
        payload: &T,
    ) -> Result<Self, Error> {
        let routing_key = routing_key.into();
        let payload = serde_json::to_value(payload).map_err(|source| Error::Encode {
            field: routing_key.clone(),
            source,
        })?;
        Ok(Command::new(exchange, routing_key, payload))
    }

    fn to_json(&self) -> Value {
        json!({"exchange": self.exchange, "routing_key": self.routing_key, "payload": self.payload})
    }
}

/// One step: an action and, unless the step has nothing to undo, its compensation.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// A name for operators and logs.
    pub name: String,
    /// What the step does.
    pub action: Command,
    /// What undoes it (`None`: nothing to undo, e.g. a read or a final notification).
    pub compensation: Option<Command>,
    /// No reply within this time fails the step (and compensates it under the barrier).
    pub timeout: Option<Duration>,
}

impl Step {
    /// A step with an action only.
    pub fn new(name: impl Into<String>, action: Command) -> Self {
        Step {
            name: name.into(),
            action,
            compensation: None,
            timeout: None,
        }
    }

    /// Sets the compensation.
    pub fn compensate_with(mut self, compensation: Command) -> Self {
        self.compensation = Some(compensation);
        self
    }

    /// Sets the step timeout (whole milliseconds, at least 1).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
}

/// A saga definition: a name and ordered steps, plus where replies go and how compensations are
/// retried. Build once, start many times.
#[derive(Debug, Clone, PartialEq)]
pub struct SagaDefinition {
    name: String,
    steps: Vec<Step>,
    reply_exchange: String,
    reply_routing_key: String,
    compensation_max_attempts: u32,
    compensation_backoff: Duration,
}

impl SagaDefinition {
    /// A definition called `name`, replies to the default queue [`DEFAULT_REPLY_QUEUE`],
    /// compensations tried 10 times starting 1 s apart (doubling, capped at 5 min).
    pub fn new(name: impl Into<String>) -> Self {
        SagaDefinition {
            name: name.into(),
            steps: Vec::new(),
            reply_exchange: String::new(),
            reply_routing_key: DEFAULT_REPLY_QUEUE.to_owned(),
            compensation_max_attempts: 10,
            compensation_backoff: Duration::from_secs(1),
        }
    }

    /// Appends a step.
    pub fn step(mut self, step: Step) -> Self {
        self.steps.push(step);
        self
    }

    /// Where participants send replies: the coordinator's queue on the default exchange.
    pub fn reply_queue(mut self, queue: impl Into<String>) -> Self {
        self.reply_exchange = String::new();
        self.reply_routing_key = queue.into();
        self
    }

    /// Where participants send replies: an exchange and routing key bound to the coordinator.
    pub fn reply_to(mut self, exchange: impl Into<String>, routing_key: impl Into<String>) -> Self {
        self.reply_exchange = exchange.into();
        self.reply_routing_key = routing_key.into();
        self
    }

    /// A compensation that failed transiently this many times in all is parked as stuck.
    pub fn compensation_max_attempts(mut self, attempts: u32) -> Self {
        self.compensation_max_attempts = attempts;
        self
    }

    /// The first compensation retry waits this long; each later one twice the last.
    pub fn compensation_backoff(mut self, first: Duration) -> Self {
        self.compensation_backoff = first;
        self
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The steps, in order.
    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    /// The steps as `saga.start` takes them.
    pub fn steps_json(&self) -> Value {
        Value::Array(
            self.steps
                .iter()
                .map(|s| {
                    json!({
                        "name": s.name,
                        "action": s.action.to_json(),
                        "compensation": s.compensation.as_ref().map(Command::to_json),
                        "timeout_ms": s.timeout.map(|t| t.as_millis() as u64),
                    })
                })
                .collect(),
        )
    }
}

/// Starts a saga through `conn`, normally your open transaction: the saga exists, and its first
/// action is sent, if and only if that transaction commits. `payload` is kept with the saga for
/// operators (each step carries its own command payloads). Bad input is [`Error::Invalid`]
/// naming the field, and stores nothing.
pub async fn start(
    conn: &mut PgConnection,
    definition: &SagaDefinition,
    payload: &Value,
) -> Result<SagaId, Error> {
    let too_short = definition
        .steps
        .iter()
        .position(|s| matches!(s.timeout, Some(t) if t.as_millis() == 0));
    if let Some(i) = too_short {
        return Err(Error::Invalid(format!(
            "steps[{i}].timeout_ms must be at least 1 ms"
        )));
    }
    let max_attempts = i32::try_from(definition.compensation_max_attempts)
        .map_err(|_| Error::Invalid("compensation_max_attempts is too large".into()))?;
    let backoff_ms = i32::try_from(definition.compensation_backoff.as_millis())
        .map_err(|_| Error::Invalid("compensation_backoff is too long".into()))?;
    let id: i64 = sqlx::query_scalar(
        "SELECT saga.start(name => $1, steps => $2, payload => $3, reply_exchange => $4, \
             reply_routing_key => $5, compensation_max_attempts => $6, \
             compensation_backoff_ms => $7)",
    )
    .bind(&definition.name)
    .bind(definition.steps_json())
    .bind(payload)
    .bind(&definition.reply_exchange)
    .bind(&definition.reply_routing_key)
    .bind(max_attempts)
    .bind(backoff_ms)
    .fetch_one(conn)
    .await?;
    Ok(SagaId(id))
}
