//! One delivery from start to finish: run it, then ack it, send it to the delay cascade, or
//! dead-letter it. The ack always comes last, after the effect it reports is durable
//! (committed, confirmed by the broker, or logged).

use std::sync::Arc;
use std::time::Duration;

use lapin::Acker;
use lapin::message::Delivery;
use tracing::Instrument;

use crate::context::{Session, Shared};
use crate::dead_letter::{self, DeadReason};
use crate::delay::DelayCascade;
use crate::delivery::{ack, failed_copy, parse, publish_confirmed, requeue_later};
use crate::message::Envelope;
use crate::process::{Batch, Failure, Outcome};
use crate::topology;

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

async fn schedule_retry(
    shared: &Shared,
    session: &Session,
    envelope: &Envelope,
    failed: u32,
    error: &str,
    delay: Duration,
    acker: &Acker,
) {
    let properties = failed_copy(envelope, failed, error, None);
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
        let properties = failed_copy(envelope, attempts, error, Some(reason));
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
