//! Prepared messages in SQL: [`prepare`], [`decide`] and [`status`] through the `outbox`
//! functions of migration `0004_prepared.sql`, in the caller's executor (a pool or an open
//! transaction).

use sqlx::PgExecutor;

use super::{Decision, PreparedError, Status};
use crate::{Message, MessageId};

/// Who made a decision (recorded with the outcome).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecidedBy {
    /// The producer, through this library or the relay's HTTP API.
    Producer,
    /// The relay, from the producer's answer to a check.
    Checkback,
    /// An operator (`outbox-relay prepared resolve`).
    Operator,
}

impl DecidedBy {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            DecidedBy::Producer => "producer",
            DecidedBy::Checkback => "checkback",
            DecidedBy::Operator => "operator",
        }
    }
}

/// A prepared message, waiting for [`commit`](Prepared::commit) or
/// [`rollback`](Prepared::rollback). Keep its id (it is the message id the consumers will see):
/// a producer that restarts resumes with [`Prepared::from_id`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prepared {
    id: MessageId,
}

impl Prepared {
    /// The handle for a message prepared earlier.
    pub fn from_id(id: MessageId) -> Self {
        Prepared { id }
    }

    /// The message id (also the AMQP `message_id` once published).
    pub fn id(&self) -> MessageId {
        self.id
    }

    /// Moves the message into the outbox (the relay then publishes it), in `executor`'s
    /// transaction when it is one. Idempotent; [`PreparedError::Conflict`] when it was rolled
    /// back before.
    pub async fn commit<'e, E: PgExecutor<'e>>(&self, executor: E) -> Result<(), PreparedError> {
        decide_expecting(executor, self.id, Decision::Committed, DecidedBy::Producer).await
    }

    /// Removes the message: it is never published. Idempotent; [`PreparedError::Conflict`] when
    /// it was committed before.
    pub async fn rollback<'e, E: PgExecutor<'e>>(&self, executor: E) -> Result<(), PreparedError> {
        decide_expecting(executor, self.id, Decision::RolledBack, DecidedBy::Producer).await
    }

    /// Where the message stands.
    pub async fn status<'e, E: PgExecutor<'e>>(
        &self,
        executor: E,
    ) -> Result<Status, PreparedError> {
        status(executor, self.id).await
    }
}

/// Stores `msg` as a prepared message and returns its handle. `check_url` is where the relay
/// asks for the decision if none arrives (`GET {check_url}?message_id=ID`); without one, an
/// undecided message is parked as unresolved once its checks are used up.
///
/// The prepared message must be visible to the relay before the business change happens (so a
/// producer crash right after it is still checked back): run this on a pool or its own
/// transaction, not inside a business transaction on another database.
///
/// A dedupe key is refused: a prepared message keeps the id it was given here. A delay counts
/// from now (database time).
pub async fn prepare<'e, E: PgExecutor<'e>>(
    executor: E,
    msg: &Message,
    check_url: Option<&str>,
) -> Result<Prepared, PreparedError> {
    if msg.dedupe_key.is_some() {
        return Err(PreparedError::Invalid(
            "dedupe_key is not supported for prepared messages (a prepared message keeps its id)"
                .to_owned(),
        ));
    }
    let headers = msg.stored_headers();
    let id: i64 = sqlx::query_scalar(
        "SELECT outbox.prepare(exchange => $1, routing_key => $2, payload => $3, headers => $4, \
             ordering_key => $5, \
             deliver_at => coalesce($6, now() + $7 * interval '1 millisecond'), \
             check_url => $8, content_type => $9)",
    )
    .bind(&msg.exchange)
    .bind(&msg.routing_key)
    .bind(&msg.payload)
    .bind(headers)
    .bind(&msg.ordering_key)
    .bind(msg.deliver_at)
    .bind(msg.delay.map(|d| d.as_millis() as i64))
    .bind(check_url)
    .bind(&msg.content_type)
    .fetch_one(executor)
    .await?;
    Ok(Prepared { id: MessageId(id) })
}

/// Applies `decision` to message `id` and returns the decision in effect afterwards: `decision`
/// itself (newly made or made before), the other one when the message was already decided the
/// other way (nothing changed), or `None` when the id is unknown. For callers that map each case
/// themselves (the relay's API and check-back); [`Prepared::commit`] and
/// [`Prepared::rollback`] turn the other cases into errors.
pub async fn decide<'e, E: PgExecutor<'e>>(
    executor: E,
    id: MessageId,
    decision: Decision,
    by: DecidedBy,
) -> Result<Option<Decision>, PreparedError> {
    let sql = match decision {
        Decision::Committed => "SELECT outbox.commit_prepared($1, $2)",
        Decision::RolledBack => "SELECT outbox.rollback_prepared($1, $2)",
    };
    let in_effect: Option<String> = sqlx::query_scalar(sql)
        .bind(id.0)
        .bind(by.as_str())
        .fetch_one(executor)
        .await?;
    Ok(in_effect.as_deref().and_then(Decision::from_sql))
}

/// [`decide`], with the other outcomes as errors: `Ok` only when `decision` is in effect.
pub async fn decide_expecting<'e, E: PgExecutor<'e>>(
    executor: E,
    id: MessageId,
    decision: Decision,
    by: DecidedBy,
) -> Result<(), PreparedError> {
    match decide(executor, id, decision, by).await? {
        Some(d) if d == decision => Ok(()),
        Some(decided) => Err(PreparedError::Conflict { id, decided }),
        None => Err(PreparedError::NotFound(id)),
    }
}

/// Where message `id` stands; [`PreparedError::NotFound`] when it is unknown.
pub async fn status<'e, E: PgExecutor<'e>>(
    executor: E,
    id: MessageId,
) -> Result<Status, PreparedError> {
    let s: Option<String> = sqlx::query_scalar("SELECT outbox.prepared_status($1)")
        .bind(id.0)
        .fetch_one(executor)
        .await?;
    s.as_deref()
        .and_then(Status::from_sql)
        .ok_or(PreparedError::NotFound(id))
}
