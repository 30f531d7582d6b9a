//! Running one message through the handler: decode, inbox, handler, commit.

use std::any::Any;
use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::BoxFuture;
use sqlx::PgPool;
use tracing::Instrument;

use crate::handler::{Handler, PlainHandler};
use crate::message::Envelope;
use crate::metrics::Metrics;
use crate::{HandlerError, Message, inbox};

/// What happened to one attempt.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Effects committed (or, without an inbox, the handler succeeded).
    Applied,
    /// The inbox already held this message id; the handler did not run.
    Duplicate,
    /// The attempt failed.
    Failed { kind: Failure, error: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The handler asked for a retry, panicked or timed out: counts toward max attempts.
    Handler,
    /// The library's own database work hit an outage (begin, inbox insert, commit): a
    /// database outage must not dead-letter messages, so these are retried without limit.
    Infrastructure,
    /// The handler rejected the message.
    Rejected,
    /// The body did not decode.
    Undecodable,
}

/// Called after a message's transaction committed and before it is acked.
pub(crate) type AfterCommit = Arc<dyn Fn(i64) + Send + Sync>;

/// What became of a batch run in one transaction.
pub(crate) enum Batch {
    /// Committed together: each message `Applied` or `Duplicate`, in the order given.
    Committed(Vec<(Outcome, Envelope)>),
    /// Nothing was committed (a message did not decode, a handler failed, the database failed):
    /// every message is to be run alone, where each failure is classified and counted. The
    /// envelopes come back in the order given.
    Alone(Vec<Envelope>),
}

/// A handler with its payload type erased, so the rest of the library is not generic.
pub(crate) trait Process: Send + Sync + 'static {
    /// Runs one attempt. The envelope comes back for retrying or dead-lettering.
    fn process(&self, envelope: Envelope, message_id: i64) -> BoxFuture<'_, (Outcome, Envelope)>;

    /// Runs several messages in one transaction: all commit, or none does. Without a
    /// transaction to share, every message runs alone.
    fn process_batch(&self, items: Vec<(Envelope, i64)>) -> BoxFuture<'_, Batch> {
        Box::pin(async move { Batch::Alone(items.into_iter().map(|(e, _)| e).collect()) })
    }
}

pub(crate) struct WithInbox<H> {
    pub handler: H,
    pub pool: PgPool,
    pub consumer: String,
    pub timeout: Option<Duration>,
    pub after_commit: Option<AfterCommit>,
    pub metrics: Metrics,
}

pub(crate) struct WithoutInbox<H> {
    pub handler: H,
    pub timeout: Option<Duration>,
    pub metrics: Metrics,
}

fn decode<T: serde::de::DeserializeOwned>(
    envelope: Envelope,
    message_id: i64,
) -> Result<Message<T>, Box<(Outcome, Envelope)>> {
    match serde_json::from_slice::<T>(&envelope.data) {
        Ok(payload) => Ok(Message {
            id: message_id,
            payload,
            attempt: envelope.failed_attempts.saturating_add(1),
            envelope,
        }),
        Err(err) => Err(Box::new((
            Outcome::Failed {
                kind: Failure::Undecodable,
                error: format!("payload does not decode: {err}"),
            },
            envelope,
        ))),
    }
}

/// A failure of the library's own database work. Outages (lost connections, a restarting
/// server, pool timeouts, deadlocks and serialization failures) are retried without limit; any
/// other database error (e.g. a deferred constraint failing at commit) is the message's fault
/// and counts toward its attempts.
fn infrastructure(context: &str, err: sqlx::Error) -> Outcome {
    let kind = if is_transient(&err) {
        Failure::Infrastructure
    } else {
        Failure::Handler
    };
    Outcome::Failed {
        kind,
        error: format!("{context}: {err}"),
    }
}

/// Classified by SQLSTATE class, never by message text: 08 connection exception, 40
/// transaction rollback, 53 insufficient resources, 57 operator intervention (server shutting
/// down or restarting), 55P03 lock not available.
pub(crate) fn is_transient(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            ["08", "40", "53", "57"]
                .iter()
                .any(|class| code.starts_with(class))
                || code == "55P03"
        }),
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        _ => false,
    }
}

fn panic_text(panic: Box<dyn Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

/// Runs the handler future, turning a panic or a timeout into a retryable failure.
async fn guarded<F>(future: F, timeout: Option<Duration>) -> Result<(), Outcome>
where
    F: Future<Output = Result<(), HandlerError>>,
{
    let caught = AssertUnwindSafe(future).catch_unwind();
    let result = match timeout {
        Some(limit) => match tokio::time::timeout(limit, caught).await {
            Ok(result) => result,
            Err(_) => {
                return Err(Outcome::Failed {
                    kind: Failure::Handler,
                    error: format!("handler timed out after {limit:?}"),
                });
            }
        },
        None => caught.await,
    };
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(HandlerError::Retry(error))) => Err(Outcome::Failed {
            kind: Failure::Handler,
            error,
        }),
        Ok(Err(HandlerError::Reject(error))) => Err(Outcome::Failed {
            kind: Failure::Rejected,
            error,
        }),
        Err(panic) => Err(Outcome::Failed {
            kind: Failure::Handler,
            error: format!("handler panicked: {}", panic_text(panic)),
        }),
    }
}

impl<H: Handler> Process for WithInbox<H> {
    fn process(&self, envelope: Envelope, message_id: i64) -> BoxFuture<'_, (Outcome, Envelope)> {
        Box::pin(async move {
            let message = match decode::<H::Payload>(envelope, message_id) {
                Ok(message) => message,
                Err(failed) => return *failed,
            };
            let outcome = self.attempt(&message).await;
            (outcome, message.envelope)
        })
    }

    fn process_batch(&self, items: Vec<(Envelope, i64)>) -> BoxFuture<'_, Batch> {
        self.batch(items)
    }
}

impl<H: Handler> WithInbox<H> {
    async fn attempt(&self, message: &Message<H::Payload>) -> Outcome {
        let mut tx = match self.pool.begin().await {
            Ok(tx) => tx,
            Err(err) => return infrastructure("begin transaction", err),
        };
        // The inbox row goes in first: a concurrent delivery of the same id on another
        // instance waits on this key and then sees a duplicate, instead of running twice.
        match inbox::mark_done(&mut tx, &self.consumer, message.id).await {
            Ok(true) => {}
            Ok(false) => {
                // Nothing was written; dropping the transaction rolls it back.
                drop(tx);
                return Outcome::Duplicate;
            }
            Err(err) => return infrastructure("insert inbox row", err),
        }
        let started = Instant::now();
        let handled = guarded(self.handler.handle(message, &mut tx), self.timeout).await;
        if let Err(failed) = handled {
            self.metrics.handler_time(started.elapsed());
            // Dropping the transaction rolls back the effects and the inbox row together.
            drop(tx);
            return failed;
        }
        let committed = tx.commit().await;
        self.metrics.handler_time(started.elapsed());
        if let Err(err) = committed {
            // If the commit did happen and only its reply was lost, the retry is a duplicate
            // and is skipped: the inbox makes this safe.
            return infrastructure("commit", err);
        }
        if let Some(hook) = &self.after_commit {
            hook(message.id);
        }
        Outcome::Applied
    }
}

impl<H: Handler> WithInbox<H> {
    fn batch(&self, items: Vec<(Envelope, i64)>) -> BoxFuture<'_, Batch> {
        Box::pin(async move {
            let mut messages = Vec::with_capacity(items.len());
            let mut rest = items.into_iter();
            while let Some((envelope, id)) = rest.next() {
                match decode::<H::Payload>(envelope, id) {
                    Ok(message) => messages.push(message),
                    Err(failed) => {
                        // Alone, it is dead-lettered as undecodable; the others run alone too
                        // so the order given is kept.
                        let mut alone: Vec<Envelope> =
                            messages.into_iter().map(|m| m.envelope).collect();
                        alone.push(failed.1);
                        alone.extend(rest.map(|(e, _)| e));
                        return Batch::Alone(alone);
                    }
                }
            }
            match self.attempt_batch(&messages).await {
                Ok(fresh) => Batch::Committed(
                    messages
                        .into_iter()
                        .zip(fresh)
                        .map(|(m, fresh)| {
                            let outcome = if fresh {
                                Outcome::Applied
                            } else {
                                Outcome::Duplicate
                            };
                            (outcome, m.envelope)
                        })
                        .collect(),
                ),
                Err(cause) => {
                    tracing::debug!(%cause, size = messages.len(), "batch rolled back; running its messages alone");
                    Batch::Alone(messages.into_iter().map(|m| m.envelope).collect())
                }
            }
        })
    }

    /// One transaction for the batch: the inbox rows in one statement, then the handler of
    /// every message not already done, then one commit. Returns, per message, whether it was
    /// applied now (false: a duplicate, already done or earlier in the same batch).
    async fn attempt_batch(&self, messages: &[Message<H::Payload>]) -> Result<Vec<bool>, String> {
        let ids: Vec<i64> = messages.iter().map(|m| m.id).collect();
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(|e| format!("begin transaction: {e}"))?;
        // Inserted in ascending id order, so two instances' batches that share ids wait on
        // each other instead of deadlocking.
        let inserted: Vec<i64> = sqlx::query_scalar(
            "INSERT INTO inbox.processed (consumer, message_id) \
             SELECT $1, id FROM unnest($2::bigint[]) AS ids(id) ORDER BY id \
             ON CONFLICT (consumer, message_id) DO NOTHING RETURNING message_id",
        )
        .bind(&self.consumer)
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| format!("insert inbox rows: {e}"))?;
        let mut new: HashSet<i64> = inserted.into_iter().collect();
        let mut fresh = Vec::with_capacity(messages.len());
        let started = Instant::now();
        for message in messages {
            // `remove`: a second copy of an id in the same batch is a duplicate.
            let is_new = new.remove(&message.id);
            fresh.push(is_new);
            if !is_new {
                continue;
            }
            let span = tracing::info_span!(
                "handler",
                otel.name = "consumer.message",
                otel.kind = "consumer",
                message_id = message.id
            );
            // Each message of a batch continues its own trace; the batch span is only local.
            crate::headers::continue_trace(&span, &message.envelope.headers);
            let handled = guarded(self.handler.handle(message, &mut tx), self.timeout)
                .instrument(span)
                .await;
            if let Err(failed) = handled {
                // Dropping the transaction rolls back every message's effects and inbox row.
                return Err(format!("message {}: {failed:?}", message.id));
            }
        }
        let committed = tx.commit().await;
        self.metrics.handler_time(started.elapsed());
        committed.map_err(|e| format!("commit: {e}"))?;
        if let Some(hook) = &self.after_commit {
            for (message, fresh) in messages.iter().zip(&fresh) {
                if *fresh {
                    hook(message.id);
                }
            }
        }
        Ok(fresh)
    }
}

impl<H: PlainHandler> Process for WithoutInbox<H> {
    fn process(&self, envelope: Envelope, message_id: i64) -> BoxFuture<'_, (Outcome, Envelope)> {
        Box::pin(async move {
            let message = match decode::<H::Payload>(envelope, message_id) {
                Ok(message) => message,
                Err(failed) => return *failed,
            };
            let started = Instant::now();
            let handled = guarded(self.handler.handle(&message), self.timeout).await;
            self.metrics.handler_time(started.elapsed());
            let outcome = match handled {
                Ok(()) => Outcome::Applied,
                Err(failed) => failed,
            };
            (outcome, message.envelope)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outages_are_transient_other_errors_are_not() {
        assert!(is_transient(&sqlx::Error::PoolTimedOut));
        assert!(is_transient(&sqlx::Error::Io(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused
        ))));
        assert!(!is_transient(&sqlx::Error::RowNotFound));
    }
}
