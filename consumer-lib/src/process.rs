//! Running one message through the handler: decode, inbox, handler, commit.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::BoxFuture;
use sqlx::PgPool;

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

/// A handler with its payload type erased, so the rest of the library is not generic.
pub(crate) trait Process: Send + Sync + 'static {
    /// Runs one attempt. The envelope comes back for retrying or dead-lettering.
    fn process(&self, envelope: Envelope, message_id: i64) -> BoxFuture<'_, (Outcome, Envelope)>;
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
