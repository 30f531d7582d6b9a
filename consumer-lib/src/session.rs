//! One broker session: connect, declare, consume and dispatch until the connection is lost or
//! shutdown is asked for, then drain. The consumer runs sessions in a loop; state that lapin's
//! own recovery would have to restore (channels, QoS, consumers) is simply rebuilt.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::Connection;
use lapin::message::Delivery;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::Connector;
use crate::context::{Session, Shared};
use crate::ordered::Lanes;
use crate::settle;
use crate::{Error, topology};

/// How a session ended.
pub(crate) enum End {
    /// Shutdown was asked for and in-flight work drained.
    Shutdown,
    /// The session could not start or was lost; `started` says whether it consumed at all.
    Lost { error: String, started: bool },
}

/// How often the session checks its connection and channel, on top of lapin's own error
/// reporting: a consumer can go silent when the broker dies (lapin #389).
const WATCHDOG: Duration = Duration::from_millis(500);
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Declaring and starting to consume takes milliseconds; a broker that does not answer is
/// treated as lost.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) async fn run(
    shared: &Arc<Shared>,
    shutdown: &CancellationToken,
    first: bool,
    connector: &mut Connector,
) -> Result<End, Error> {
    let connected = tokio::select! {
        _ = shutdown.cancelled() => return Ok(End::Shutdown),
        connected = connector.connect() => match connected {
            Ok(connected) => connected,
            Err(err) => return Ok(lost(format!("connect: {err}"), false)),
        },
    };
    if connected.failover {
        shared.metrics.failed_over();
    }
    let connection = connected.connection;
    let result = consume(shared, &connection, &connected.url, shutdown, first).await;
    // Closing returns every unacked delivery to the queue at once, instead of after the
    // broker notices a dead socket. Bounded: a broker gone silent never answers.
    let _ = tokio::time::timeout(
        CLOSE_TIMEOUT,
        connection.close(200, "consumer stopping".into()),
    )
    .await;
    result
}

fn ordering_key(delivery: &lapin::message::Delivery) -> Option<String> {
    let headers = delivery.properties.headers().as_ref()?;
    crate::headers::str_value(headers, crate::message::ORDERING_KEY_HEADER).map(str::to_owned)
}

/// Takes the deliveries waiting (at least one, at most `batch_size`) and handles them as one
/// batch, until the session stops.
async fn batch_worker(
    shared: Arc<Shared>,
    session: Arc<Session>,
    receiver: Arc<Mutex<mpsc::UnboundedReceiver<Delivery>>>,
) {
    let max = shared.config.batch_size;
    loop {
        let batch = {
            let mut receiver = tokio::select! {
                biased;
                _ = session.stop.cancelled() => return,
                receiver = receiver.lock() => receiver,
            };
            let first = tokio::select! {
                biased;
                _ = session.stop.cancelled() => return,
                first = receiver.recv() => match first {
                    Some(first) => first,
                    None => return,
                },
            };
            let mut batch = Vec::with_capacity(max);
            batch.push(first);
            while batch.len() < max {
                match receiver.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            batch
        };
        settle::handle_batch(&shared, &session, batch).await;
    }
}

fn lost(error: String, started: bool) -> End {
    End::Lost { error, started }
}

async fn consume(
    shared: &Arc<Shared>,
    connection: &Connection,
    broker: &str,
    shutdown: &CancellationToken,
    first: bool,
) -> Result<End, Error> {
    let config = &shared.config;
    let setup = async {
        let publish = connection
            .create_channel()
            .await
            .map_err(Error::broker("open channel"))?;
        // Confirms: a retry or dead-letter copy counts as safe only once the broker has it.
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(Error::broker("enable confirms"))?;
        topology::declare(&publish, config, &shared.cascade).await?;
        let consume = connection
            .create_channel()
            .await
            .map_err(Error::broker("open channel"))?;
        // Per-consumer prefetch (global: false): bounds unacked deliveries in flight; below
        // ~100 the round trips starve throughput.
        consume
            .basic_qos(config.prefetch, BasicQosOptions { global: false })
            .await
            .map_err(Error::broker("set prefetch"))?;
        let consumer = consume
            .basic_consume(
                config.queue.as_str().into(),
                "".into(),
                // Manual acks (no_ack: false): a message leaves the queue only after its
                // effects committed.
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(Error::broker("start consuming"))?;
        Ok::<_, Error>((publish, consume, consumer))
    };
    let setup = async {
        tokio::time::timeout(SETUP_TIMEOUT, setup)
            .await
            .unwrap_or_else(|_| {
                Err(Error::Timeout {
                    context: "session setup",
                    limit: SETUP_TIMEOUT,
                })
            })
    };
    let (publish, consume, mut consumer) = match setup.await {
        Ok(parts) => parts,
        // A queue that exists with other arguments never becomes right by retrying, on any
        // node of the cluster: report it, whichever session meets it.
        Err(err @ Error::QueueMismatch { .. }) => return Err(err),
        // A first session that reached the broker but cannot set up is a configuration
        // problem (missing exchange, refused binding): report it instead of looping.
        Err(err)
            if first && matches!(err, Error::Broker { .. }) && connection.status().connected() =>
        {
            return Err(err);
        }
        Err(err) => return Ok(lost(err.to_string(), false)),
    };
    tracing::info!(consumer = %config.name, queue = %config.queue, broker, "consuming");

    let session = Arc::new(Session {
        publish,
        stop: CancellationToken::new(),
        lost: CancellationToken::new(),
    });
    let lanes = Arc::new(Lanes::default());
    let tracker = TaskTracker::new();
    // With batching, `concurrency` workers take whatever deliveries are waiting (up to
    // `batch_size`) each time they are free: batches grow with the backlog and a lone message
    // never waits for company.
    let batches = (config.batch_size > 1).then(|| {
        let (sender, receiver) = mpsc::unbounded_channel();
        let receiver = Arc::new(Mutex::new(receiver));
        for _ in 0..config.concurrency {
            tracker.spawn(batch_worker(
                Arc::clone(shared),
                Arc::clone(&session),
                Arc::clone(&receiver),
            ));
        }
        sender
    });
    let mut watchdog = tokio::time::interval(WATCHDOG);
    let end = loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break End::Shutdown,
            _ = watchdog.tick() => {
                if !connection.status().connected()
                    || !consume.status().connected()
                    || !session.publish.status().connected()
                {
                    break lost("connection or channel closed".to_owned(), true);
                }
            }
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    let key = if config.ordered { ordering_key(&delivery) } else { None };
                    match key {
                        Some(key) => lanes.dispatch(key, delivery, shared, &session, &tracker),
                        None => match &batches {
                            // The workers outlive this loop, so the send cannot fail; if it
                            // did, the delivery stays unacked and is redelivered.
                            Some(batches) => { let _ = batches.send(delivery); }
                            None => {
                                tracker.spawn(settle::handle(Arc::clone(shared), Arc::clone(&session), delivery));
                            }
                        },
                    }
                }
                Some(Err(err)) => break lost(format!("consumer: {err}"), true),
                None => break lost("consumer cancelled by the broker".to_owned(), true),
            }
        }
    };

    // No new work from here: deliveries not yet started stay unacked and are requeued when
    // the channel closes; running handlers finish and ack.
    if matches!(end, End::Lost { .. }) {
        session.lost.cancel();
    }
    session.stop.cancel();
    // Deliveries the batch workers have not taken stay unacked, for the broker to requeue.
    drop(batches);
    if matches!(end, End::Shutdown) {
        let _ = tokio::time::timeout(
            CLOSE_TIMEOUT,
            consume.basic_cancel(consumer.tag(), BasicCancelOptions::default()),
        )
        .await;
    }
    drop(consumer);
    tracker.close();
    match end {
        End::Shutdown => {
            if tokio::time::timeout(config.shutdown_grace, tracker.wait())
                .await
                .is_err()
            {
                tracing::warn!(consumer = %config.name, "shutdown grace period over; closing with handlers still running");
            }
        }
        // Before a new session starts, the old one's handlers must be done: otherwise a
        // redelivered message of an ordering key could run beside its predecessor.
        End::Lost { .. } => {
            if tokio::time::timeout(config.shutdown_grace, tracker.wait())
                .await
                .is_err()
            {
                tracing::warn!(consumer = %config.name, "handlers of the lost session still running; reconnecting anyway");
            }
        }
    }
    let _ = tokio::time::timeout(
        CLOSE_TIMEOUT,
        consume.close(200, "consumer stopping".into()),
    )
    .await;
    let _ = tokio::time::timeout(
        CLOSE_TIMEOUT,
        session.publish.close(200, "consumer stopping".into()),
    )
    .await;
    Ok(end)
}
