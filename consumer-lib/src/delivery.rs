//! What is done with a delivery on the broker: read it, ack it, return it to the queue, and
//! publish a copy of it (to the delay cascade or the dead-letter queue) with a confirm, the
//! copy carrying the one table of failure headers both kinds of copy share.

use std::time::Duration;

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Acker, BasicProperties, Channel, Confirmation};

use crate::Error;
use crate::context::Session;
use crate::dead_letter::DeadReason;
use crate::headers;
use crate::message::{
    ATTEMPTS_HEADER, Envelope, LAST_ERROR_HEADER, ORIGINAL_EXCHANGE_HEADER,
    ORIGINAL_ROUTING_KEY_HEADER,
};

const MAX_ERROR_HEADER_BYTES: usize = 1000;
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Splits a delivery into the message and its acker.
pub(crate) fn parse(delivery: Delivery) -> (Envelope, Acker) {
    let Delivery {
        exchange,
        routing_key,
        properties,
        data,
        acker,
        ..
    } = delivery;
    let envelope = Envelope::parse(exchange.as_str(), routing_key.as_str(), properties, data);
    (envelope, acker)
}

/// Acks, without waiting on a connection that is gone.
pub(crate) async fn ack(session: &Session, acker: &Acker) {
    // An ack issued just as the connection dies is never answered by lapin, and the session
    // waits for this task before it reconnects: stop waiting once the session is lost (the
    // broker requeues the message and the inbox skips it), and in any case after a while.
    let acked = tokio::time::timeout(ACK_TIMEOUT, acker.ack(BasicAckOptions::default()));
    tokio::select! {
        result = acked => match result {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => tracing::debug!("ack not sent: channel closed"),
            Ok(Err(err)) => tracing::debug!(cause = %err, "ack failed: channel closed"),
            Err(_) => tracing::debug!("ack not answered"),
        },
        _ = session.lost.cancelled() => tracing::debug!("ack abandoned: connection lost"),
    }
}

/// Returns the message to the queue when it could not be retried or dead-lettered, after a
/// pause so a persistent failure does not spin.
pub(crate) async fn requeue_later(session: &Session, acker: &Acker) {
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        _ = session.stop.cancelled() => return,
    }
    // Requeue: the message goes back to the queue for another try.
    let options = BasicNackOptions {
        requeue: true,
        ..BasicNackOptions::default()
    };
    let nacked = tokio::time::timeout(ACK_TIMEOUT, acker.nack(options));
    tokio::select! {
        result = nacked => match result {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => tracing::debug!(cause = %err, "nack failed: channel closed"),
            Err(_) => tracing::debug!("nack not answered"),
        },
        _ = session.lost.cancelled() => tracing::debug!("nack abandoned: connection lost"),
    }
}

fn truncated(text: &str) -> &str {
    if text.len() <= MAX_ERROR_HEADER_BYTES {
        return text;
    }
    let mut end = MAX_ERROR_HEADER_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The properties of a copy of `envelope`: the producer's properties (no `user_id`, which the
/// broker checks against our login, and no `expiration`, which would race the delay), the
/// producer's headers, and ours.
fn copy_properties(envelope: &Envelope, extra: FieldTable) -> BasicProperties {
    let p = &envelope.properties;
    let mut table = headers::without_death_headers(&envelope.headers);
    for (k, v) in &extra {
        table.insert(k.clone(), v.clone());
    }
    // Persistent: a retry or dead letter must survive a broker restart.
    let mut out = BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(table);
    if let Some(v) = p.message_id() {
        out = out.with_message_id(v.clone());
    }
    if let Some(v) = p.content_type() {
        out = out.with_content_type(v.clone());
    }
    if let Some(v) = p.content_encoding() {
        out = out.with_content_encoding(v.clone());
    }
    if let Some(v) = p.correlation_id() {
        out = out.with_correlation_id(v.clone());
    }
    if let Some(v) = p.timestamp() {
        out = out.with_timestamp(*v);
    }
    if let Some(v) = p.kind() {
        out = out.with_type(v.clone());
    }
    if let Some(v) = p.app_id() {
        out = out.with_app_id(v.clone());
    }
    if let Some(v) = p.reply_to() {
        out = out.with_reply_to(v.clone());
    }
    if let Some(v) = p.priority() {
        out = out.with_priority(*v);
    }
    out
}

fn long_string(text: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(text.as_bytes()))
}

pub(crate) async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<(), Error> {
    let publish = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            // Mandatory: an unroutable copy must fail here, not vanish, so the original stays
            // unacked.
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            body,
            properties,
        )
        .await
        .map_err(Error::broker("publish"))?;
    // A confirm that never comes (a broker gone silent) must not pin the task: the session
    // waits for its tasks before reconnecting.
    let confirm = tokio::time::timeout(CONFIRM_TIMEOUT, publish)
        .await
        .map_err(|_| Error::Timeout {
            context: "publish confirm",
            limit: CONFIRM_TIMEOUT,
        })?
        .map_err(Error::broker("publish confirm"))?;
    match confirm {
        Confirmation::Ack(None) => Ok(()),
        _ => Err(Error::NotConfirmed {
            target: format!("{exchange}/{routing_key}"),
        }),
    }
}

/// The properties of a copy of a failed `envelope`: the failure headers (attempts made, the
/// original exchange and routing key, the last error, and for a dead letter its reason) on
/// top of [`copy_properties`].
pub(crate) fn failed_copy(
    envelope: &Envelope,
    attempts: u32,
    error: &str,
    dead: Option<DeadReason>,
) -> BasicProperties {
    let mut extra = FieldTable::default();
    extra.insert(
        ATTEMPTS_HEADER.into(),
        AMQPValue::LongLongInt(i64::from(attempts)),
    );
    extra.insert(
        ORIGINAL_EXCHANGE_HEADER.into(),
        long_string(&envelope.exchange),
    );
    extra.insert(
        ORIGINAL_ROUTING_KEY_HEADER.into(),
        long_string(&envelope.routing_key),
    );
    extra.insert(LAST_ERROR_HEADER.into(), long_string(truncated(error)));
    if let Some(reason) = dead {
        extra.insert("x-dead-reason".into(), long_string(reason.as_str()));
    }
    copy_properties(envelope, extra)
}
