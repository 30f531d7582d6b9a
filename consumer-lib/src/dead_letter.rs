//! The compensation log: messages a consumer gave up on, listed and replayed by a person.

use chrono::{DateTime, Utc};
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, LongString};
use lapin::{BasicProperties, Channel};
use sqlx::PgPool;

use crate::Error;
use crate::headers;
use crate::message::{
    ATTEMPTS_HEADER, Envelope, LAST_ERROR_HEADER, ORIGINAL_EXCHANGE_HEADER,
    ORIGINAL_ROUTING_KEY_HEADER,
};

/// Why a message was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeadReason {
    /// The handler returned [`HandlerError::Reject`](crate::HandlerError::Reject).
    Rejected,
    /// The handler asked for a retry on the last allowed attempt.
    Exhausted,
    /// The body did not decode into the handler's payload type.
    Undecodable,
    /// The message lacks what the library needs, such as a positive integer `message_id`.
    Invalid,
}

impl DeadReason {
    /// The value stored in the `reason` column.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadReason::Rejected => "rejected",
            DeadReason::Exhausted => "exhausted",
            DeadReason::Undecodable => "undecodable",
            DeadReason::Invalid => "invalid",
        }
    }
}

/// One row of the compensation log.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DeadLetter {
    /// Row id, used to replay it.
    pub id: i64,
    /// The consumer that gave up.
    pub consumer: String,
    /// The queue a replay publishes to.
    pub queue: String,
    /// The message id, when the message had one.
    pub message_id: Option<i64>,
    /// The exchange the producer published to.
    pub exchange: String,
    /// The producer's routing key.
    pub routing_key: String,
    /// The body.
    pub payload: Vec<u8>,
    /// The headers, as JSON.
    pub headers: serde_json::Value,
    /// The `content_type` property.
    pub content_type: Option<String>,
    /// The ordering key.
    pub ordering_key: Option<String>,
    /// Attempts made before giving up.
    pub attempts: i32,
    /// `rejected`, `exhausted`, `undecodable` or `invalid`.
    pub reason: String,
    /// The last error.
    pub last_error: String,
    /// When the consumer gave up.
    pub dead_lettered_at: DateTime<Utc>,
    /// When it was replayed, if it was.
    pub replayed_at: Option<DateTime<Utc>>,
}

/// Writes a compensation-log row. False when this message is already in the log waiting for a
/// decision (a redelivery of a message being dead-lettered): it is logged once.
pub(crate) async fn record(
    pool: &PgPool,
    consumer: &str,
    queue: &str,
    envelope: &Envelope,
    attempts: u32,
    reason: DeadReason,
    error: &str,
) -> Result<bool, Error> {
    let headers = headers::to_json(&headers::without_death_headers(&envelope.headers));
    let ctx = Error::database("record dead letter");
    // In a transaction, as every statement with arguments here: see `outbox::pool`.
    let mut tx = pool.begin().await.map_err(ctx)?;
    let result = sqlx::query(
        "INSERT INTO inbox.compensation_log \
           (consumer, queue, message_id, exchange, routing_key, payload, headers, content_type, \
            ordering_key, attempts, reason, last_error) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
         ON CONFLICT (consumer, message_id) WHERE message_id IS NOT NULL AND replayed_at IS NULL \
         DO NOTHING",
    )
    .bind(consumer)
    .bind(queue)
    .bind(envelope.message_id)
    .bind(&envelope.exchange)
    .bind(&envelope.routing_key)
    .bind(&envelope.data)
    .bind(headers)
    .bind(
        envelope
            .properties
            .content_type()
            .as_ref()
            .map(|c| c.as_str()),
    )
    .bind(envelope.ordering_key.as_deref())
    .bind(i32::try_from(attempts).unwrap_or(i32::MAX))
    .bind(reason.as_str())
    .bind(error)
    .execute(&mut *tx)
    .await
    .map_err(ctx)?;
    tx.commit().await.map_err(ctx)?;
    Ok(result.rows_affected() == 1)
}

/// Compensation-log rows, newest first: those of `consumer` (or every consumer), waiting ones
/// only unless `include_replayed`.
pub async fn list(
    pool: &PgPool,
    consumer: Option<&str>,
    include_replayed: bool,
    limit: i64,
) -> Result<Vec<DeadLetter>, Error> {
    let ctx = Error::database("list dead letters");
    let mut tx = pool.begin().await.map_err(ctx)?;
    let rows = sqlx::query_as::<_, DeadLetter>(
        "SELECT * FROM inbox.compensation_log \
         WHERE ($1::text IS NULL OR consumer = $1) AND ($2 OR replayed_at IS NULL) \
         ORDER BY id DESC LIMIT $3",
    )
    .bind(consumer)
    .bind(include_replayed)
    .bind(limit)
    .fetch_all(&mut *tx)
    .await
    .map_err(ctx)?;
    tx.commit().await.map_err(ctx)?;
    Ok(rows)
}

/// One compensation-log row.
pub async fn get(pool: &PgPool, id: i64) -> Result<Option<DeadLetter>, Error> {
    let ctx = Error::database("read dead letter");
    let mut tx = pool.begin().await.map_err(ctx)?;
    let row = sqlx::query_as::<_, DeadLetter>("SELECT * FROM inbox.compensation_log WHERE id = $1")
        .bind(id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(ctx)?;
    tx.commit().await.map_err(ctx)?;
    Ok(row)
}

/// Puts a dead letter back on its consumer's queue with a fresh attempt count, then marks the
/// row replayed. `channel` must be in confirm mode (`confirm_select`).
///
/// The row is locked while the broker confirms, so two replays of one row cannot both publish.
/// If marking fails after the publish, the row stays waiting and a second replay is possible;
/// the consumer's inbox makes that harmless.
pub async fn replay(pool: &PgPool, channel: &Channel, id: i64) -> Result<DeadLetter, Error> {
    let mut tx = pool
        .begin()
        .await
        .map_err(Error::database("replay dead letter"))?;
    let row = sqlx::query_as::<_, DeadLetter>(
        "SELECT * FROM inbox.compensation_log WHERE id = $1 AND replayed_at IS NULL FOR UPDATE",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await
    .map_err(Error::database("replay dead letter"))?
    .ok_or(Error::DeadLetterNotFound { id })?;

    let mut table = headers::from_json(&row.headers);
    let mut kept = lapin::types::FieldTable::default();
    for (k, v) in &table {
        if k.as_str() != ATTEMPTS_HEADER && k.as_str() != LAST_ERROR_HEADER {
            kept.insert(k.clone(), v.clone());
        }
    }
    table = kept;
    table.insert(
        ORIGINAL_EXCHANGE_HEADER.into(),
        AMQPValue::LongString(LongString::from(row.exchange.as_str())),
    );
    table.insert(
        ORIGINAL_ROUTING_KEY_HEADER.into(),
        AMQPValue::LongString(LongString::from(row.routing_key.as_str())),
    );
    // Persistent: the replayed message must survive a broker restart like the original.
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(table)
        .with_timestamp(Utc::now().timestamp().max(0) as u64);
    if let Some(id) = row.message_id {
        properties = properties.with_message_id(id.to_string().into());
    }
    if let Some(ct) = &row.content_type {
        properties = properties.with_content_type(ct.as_str().into());
    }
    let confirm = channel
        .basic_publish(
            "".into(),
            row.queue.as_str().into(),
            // Mandatory: a queue that no longer exists must fail the replay, not drop it.
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            &row.payload,
            properties,
        )
        .await
        .map_err(Error::broker("replay dead letter"))?
        .await
        .map_err(Error::broker("replay dead letter"))?;
    if !matches!(confirm, lapin::Confirmation::Ack(None)) {
        return Err(Error::NotConfirmed {
            target: row.queue.clone(),
        });
    }
    sqlx::query("UPDATE inbox.compensation_log SET replayed_at = now() WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(Error::database("mark dead letter replayed"))?;
    tx.commit()
        .await
        .map_err(Error::database("mark dead letter replayed"))?;
    Ok(row)
}
