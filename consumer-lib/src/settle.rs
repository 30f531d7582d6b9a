//! One delivery from start to finish: run it, then ack it, send it to the delay cascade, or
//! dead-letter it. The ack always comes last, after the effect it reports is durable
//! (committed, confirmed by the broker, or logged).

use std::sync::Arc;
use std::time::Duration;

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Acker, BasicProperties, Channel, Confirmation};
use sqlx::PgPool;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::Error;
use crate::builder::Config;
use crate::dead_letter::{self, DeadReason};
use crate::delay::DelayCascade;
use crate::headers;
use crate::message::{
    ATTEMPTS_HEADER, Envelope, LAST_ERROR_HEADER, ORIGINAL_EXCHANGE_HEADER,
    ORIGINAL_ROUTING_KEY_HEADER,
};
use crate::metrics::Metrics;
use crate::process::{Batch, Failure, Outcome, Process};
use crate::topology;

/// What every delivery task shares for the consumer's whole life.
pub(crate) struct Shared {
    pub config: Config,
    pub pool: PgPool,
    pub process: Arc<dyn Process>,
    pub metrics: Metrics,
    pub cascade: DelayCascade,
    /// Bounds handlers running at once across the consumer.
    pub running: Semaphore,
}

/// One broker connection's worth of state.
pub(crate) struct Session {
    /// A channel in confirm mode for retries and dead letters.
    pub publish: Channel,
    /// Cancelled when the session ends (shutdown or lost connection): deliveries not yet
    /// started are left unacked, for the broker to requeue.
    pub stop: CancellationToken,
    /// Cancelled when the connection is lost (not on shutdown): broker replies still awaited
    /// will never come.
    pub lost: CancellationToken,
}

const MAX_ERROR_HEADER_BYTES: usize = 1000;
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

enum Decision {
    Retry,
    Dead(DeadReason),
}

fn decide(kind: Failure, failed: u32, max_attempts: u32) -> Decision {
    match kind {
        Failure::Rejected => Decision::Dead(DeadReason::Rejected),
        Failure::Undecodable => Decision::Dead(DeadReason::Undecodable),
        Failure::Handler if failed >= max_attempts => Decision::Dead(DeadReason::Exhausted),
        Failure::Handler | Failure::Infrastructure => Decision::Retry,
    }
}

/// Handles one delivery. Never panics the caller and never returns an error: every failure
/// ends in a retry, a dead letter, or an unacked message the broker will redeliver.
pub(crate) async fn handle(shared: Arc<Shared>, session: Arc<Session>, delivery: Delivery) {
    let (envelope, acker) = parse(delivery);
    alone(&shared, &session, envelope, acker, Permit::Acquire).await;
}

fn parse(delivery: Delivery) -> (Envelope, Acker) {
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

/// Whether a message run alone takes a slot of the consumer's concurrency or runs in one its
/// batch already holds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Permit {
    Acquire,
    Held,
}

async fn alone(
    shared: &Shared,
    session: &Session,
    envelope: Envelope,
    acker: Acker,
    permit: Permit,
) {
    let span = tracing::info_span!(
        "message",
        otel.name = "consumer.message",
        otel.kind = "consumer",
        consumer = %shared.config.name,
        message_id = tracing::field::Empty,
        ordering_key = tracing::field::Empty,
    );
    crate::headers::continue_trace(&span, &envelope.headers);
    if let Some(id) = envelope.message_id {
        span.record("message_id", id);
    }
    if let Some(key) = &envelope.ordering_key {
        span.record("ordering_key", key.as_str());
    }
    run(shared, session, envelope, acker, permit)
        .instrument(span)
        .await;
}

/// Handles deliveries taken together (`batch_size` > 1), holding one slot of the consumer's
/// concurrency: their handlers run in one transaction with one inbox statement and one
/// commit, then every message is acked. If anything fails, nothing of the batch is committed
/// and each message runs alone, as without batching: failures are classified, counted and
/// retried per message, never per batch.
pub(crate) async fn handle_batch(shared: &Shared, session: &Session, deliveries: Vec<Delivery>) {
    let _permit = tokio::select! {
        permit = shared.running.acquire() => match permit {
            Ok(permit) => permit,
            Err(_) => return,
        },
        _ = session.stop.cancelled() => return,
    };
    let mut items = Vec::with_capacity(deliveries.len());
    let mut ackers = Vec::with_capacity(deliveries.len());
    for delivery in deliveries {
        let (envelope, acker) = parse(delivery);
        match envelope.message_id {
            Some(id) => {
                items.push((envelope, id));
                ackers.push(acker);
            }
            // No usable id: dead-lettered alone as invalid.
            _ => alone(shared, session, envelope, acker, Permit::Held).await,
        }
    }
    if items.is_empty() {
        return;
    }
    let span = tracing::info_span!("batch", consumer = %shared.config.name, size = items.len());
    match shared.process.process_batch(items).instrument(span).await {
        Batch::Committed(outcomes) => {
            for (outcome, _) in &outcomes {
                match outcome {
                    Outcome::Duplicate => shared.metrics.duplicate(),
                    _ => shared.metrics.processed(),
                }
            }
            futures::future::join_all(ackers.iter().map(|acker| ack(session, acker))).await;
        }
        Batch::Alone(envelopes) => {
            for (envelope, acker) in envelopes.into_iter().zip(ackers) {
                alone(shared, session, envelope, acker, Permit::Held).await;
            }
        }
    }
}

async fn run(
    shared: &Shared,
    session: &Session,
    mut envelope: Envelope,
    acker: Acker,
    permit: Permit,
) {
    let Some(id) = envelope.message_id else {
        let failed = envelope.failed_attempts;
        dead_letter(
            shared,
            session,
            &envelope,
            failed,
            DeadReason::Invalid,
            "message_id property is missing or not a positive integer",
            &acker,
        )
        .await;
        return;
    };
    // Ordered messages retry in place: a delay in the cascade would let later messages of
    // the same key overtake them.
    let in_place = shared.config.ordered && envelope.ordering_key.is_some();
    loop {
        let outcome = {
            let _permit = match permit {
                Permit::Held => None,
                Permit::Acquire => tokio::select! {
                    permit = shared.running.acquire() => match permit {
                        Ok(permit) => Some(permit),
                        Err(_) => return,
                    },
                    _ = session.stop.cancelled() => return,
                },
            };
            let (outcome, returned) = shared.process.process(envelope, id).await;
            envelope = returned;
            outcome
        };
        let (kind, error) = match outcome {
            Outcome::Applied => {
                shared.metrics.processed();
                ack(session, &acker).await;
                return;
            }
            Outcome::Duplicate => {
                shared.metrics.duplicate();
                tracing::debug!("duplicate delivery skipped");
                ack(session, &acker).await;
                return;
            }
            Outcome::Failed { kind, error } => (kind, error),
        };
        let failed = envelope.failed_attempts.saturating_add(1);
        let max = shared.config.retry.attempts();
        match decide(kind, failed, max) {
            Decision::Dead(reason) => {
                dead_letter(shared, session, &envelope, failed, reason, &error, &acker).await;
                return;
            }
            Decision::Retry => {
                let delay = shared.config.retry.delay_after(failed.min(max));
                tracing::warn!(cause = %error, failed, ?delay, "attempt failed, will retry");
                shared.metrics.retried();
                if in_place {
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        // Left unacked: the broker redelivers it, still ahead of its key.
                        _ = session.stop.cancelled() => return,
                    }
                    envelope.failed_attempts = failed;
                    continue;
                }
                schedule_retry(shared, session, &envelope, failed, &error, delay, &acker).await;
                return;
            }
        }
    }
}

async fn ack(session: &Session, acker: &Acker) {
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
async fn requeue_later(session: &Session, acker: &Acker) {
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

async fn schedule_retry(
    shared: &Shared,
    session: &Session,
    envelope: &Envelope,
    failed: u32,
    error: &str,
    delay: Duration,
    acker: &Acker,
) {
    let mut extra = FieldTable::default();
    extra.insert(
        ATTEMPTS_HEADER.into(),
        AMQPValue::LongLongInt(i64::from(failed)),
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
    let properties = copy_properties(envelope, extra);
    let routing_key = DelayCascade::routing_key(delay, &shared.config.queue);
    let entry = shared.cascade.entry_exchange();
    let published = tokio::select! {
        published = publish_confirmed(
            &session.publish,
            &entry,
            &routing_key,
            &envelope.data,
            properties,
        ) => published,
        // The original stays unacked and comes back; a copy that did reach the cascade makes
        // it a duplicate the inbox skips.
        _ = session.lost.cancelled() => return,
    };
    match published {
        // The copy is safely in the cascade; only now may the original go.
        Ok(()) => ack(session, acker).await,
        Err(err) => {
            tracing::warn!(cause = %err, "could not schedule the retry; returning the message to the queue");
            requeue_later(session, acker).await;
        }
    }
}

async fn dead_letter(
    shared: &Shared,
    session: &Session,
    envelope: &Envelope,
    attempts: u32,
    reason: DeadReason,
    error: &str,
    acker: &Acker,
) {
    let config = &shared.config;
    let recorded = dead_letter::record(
        &shared.pool,
        &config.name,
        &config.queue,
        envelope,
        attempts,
        reason,
        error,
    )
    .await;
    match recorded {
        Ok(true) => {
            shared.metrics.dead_lettered(reason.as_str());
            tracing::error!(reason = reason.as_str(), cause = %error, attempts, "message dead-lettered");
        }
        Ok(false) => tracing::debug!("already in the compensation log"),
        Err(err) => {
            // The database is down: keep the message (retry later) rather than lose it.
            tracing::warn!(cause = %err, "could not record the dead letter; will try again");
            let delay = config
                .retry
                .delay_after(attempts.clamp(1, config.retry.attempts()));
            let mut kept = envelope.clone();
            kept.failed_attempts = attempts.saturating_sub(1);
            schedule_retry(
                shared,
                session,
                &kept,
                kept.failed_attempts,
                error,
                delay,
                acker,
            )
            .await;
            return;
        }
    }
    if config.dead_letter_queue {
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
        extra.insert("x-dead-reason".into(), long_string(reason.as_str()));
        let properties = copy_properties(envelope, extra);
        let queue = topology::dead_letter_queue(&config.queue);
        if let Err(err) =
            publish_confirmed(&session.publish, "", &queue, &envelope.data, properties).await
        {
            // The compensation log row is the record; the queue copy is a convenience.
            tracing::warn!(cause = %err, "could not copy the dead letter to its queue");
        }
    }
    ack(session, acker).await;
}
