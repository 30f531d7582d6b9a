//! The coordinator: a consumer-lib handler of the participants' replies (and of the step
//! timeouts, which are delayed messages to the same queue).
//!
//! Each reply is applied by `saga.on_reply` inside the handler's transaction, the one that also
//! holds consumer-lib's inbox row; the next command and the next timeout are outbox rows of that
//! same transaction. So the coordinator holds no state of its own: kill it anywhere and the
//! reply is either applied with everything it caused, or redelivered and applied then. A
//! redelivered reply meets its inbox row and is skipped; a stale one (a timeout after the reply,
//! an answer to an earlier compensation attempt) is recognised by `saga.on_reply` and ignored.

use consumer_lib::{Consumer, ConsumerBuilder, Handler, HandlerError, Message};
use serde::{Deserialize, Serialize};
use sqlx::PgTransaction;
use tracing::{info, warn};

/// A participant's answer to one command, or a step's timeout (outcome `timeout`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// The saga id, as decimal text (JSON numbers lose precision above 2^53 in many languages).
    pub saga_id: String,
    /// The step's index.
    pub step: i32,
    /// `action` or `compensation`.
    pub op: String,
    /// The command attempt this answers.
    pub attempt: i32,
    /// `ok`, `failed`, `retry`, `skipped` or `timeout`.
    pub outcome: String,
    /// Why it failed, when it did.
    #[serde(default)]
    pub error: Option<String>,
    /// For a compensation: whether it undid anything (false for an empty compensation).
    #[serde(default = "yes")]
    pub applied: bool,
}

fn yes() -> bool {
    true
}

/// The coordinator handler. Stateless: run any number of instances on one reply queue.
#[derive(Debug, Clone, Default)]
pub struct Coordinator {
    _private: (),
}

impl Coordinator {
    /// A coordinator.
    pub fn new() -> Self {
        Coordinator::default()
    }

    /// A consumer-lib builder consuming `queue` (the definitions' reply queue) with this
    /// handler; add `amqp_url` and `database` (the database holding the sagas), then `build`.
    pub fn consumer(name: impl Into<String>, queue: impl Into<String>) -> ConsumerBuilder {
        Consumer::builder(name)
            .queue(queue)
            .handler(Coordinator::new())
    }
}

impl Handler for Coordinator {
    type Payload = Reply;

    async fn handle(
        &self,
        message: &Message<Reply>,
        tx: &mut PgTransaction<'static>,
    ) -> Result<(), HandlerError> {
        let reply = &message.payload;
        let saga_id: i64 = reply.saga_id.parse().map_err(|_| {
            HandlerError::reject(format!("saga_id {:?} is not an integer", reply.saga_id))
        })?;
        let result: Result<String, sqlx::Error> =
            sqlx::query_scalar("SELECT saga.on_reply($1, $2, $3, $4, $5, $6, $7)")
                .bind(saga_id)
                .bind(reply.step)
                .bind(&reply.op)
                .bind(reply.attempt)
                .bind(&reply.outcome)
                .bind(&reply.error)
                .bind(reply.applied)
                .fetch_one(&mut **tx)
                .await;
        let state = match result {
            Ok(state) => state,
            // The reply itself is malformed (op or outcome unknown): retrying cannot help.
            Err(sqlx::Error::Database(db)) if db.code().is_some_and(|c| c.starts_with("22")) => {
                return Err(HandlerError::reject(db.message()));
            }
            Err(err) => return Err(err.into()),
        };
        metrics::counter!("saga_replies_total", "result" => state.clone()).increment(1);
        match state.as_str() {
            "stuck" => {
                metrics::counter!("saga_stuck_total").increment(1);
                warn!(saga_id, step = reply.step, error = ?reply.error, "saga stuck: a compensation cannot succeed");
            }
            "completed" | "compensated" => {
                metrics::counter!("saga_finished_total", "state" => state.clone()).increment(1);
                info!(saga_id, state = %state, "saga finished");
            }
            _ => {}
        }
        Ok(())
    }
}
