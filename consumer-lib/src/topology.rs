//! Declaring what a consumer needs on the broker: its queue and bindings, the dead-letter
//! queue, and the shared delay cascade. Every declaration is idempotent and runs again after a
//! reconnect, so a broker that lost non-durable state is put right.

use lapin::Channel;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable};

use crate::Error;
use crate::config::Config;
use crate::delay::DelayCascade;

/// The queue a consumer's dead letters go to when the dead-letter queue is on.
pub(crate) fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}.dead")
}

/// Arguments of the consumer's own queue.
///
/// With `quorum(true)` it is a quorum queue: replicated over the cluster by Raft, a message the
/// broker confirmed survives the loss of a minority of nodes. It gets no dead-letter arguments:
/// the broker never dead-letters from it (a retry or dead letter is a copy the library publishes
/// with a confirm before it acks the original), and redeclaring an existing queue with added
/// arguments would be refused, so none are added that nothing needs.
fn queue_arguments(config: &Config) -> FieldTable {
    let mut args = FieldTable::default();
    if config.quorum {
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
    }
    if config.single_active_consumer {
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    }
    args
}

/// Whether the broker refused a declaration because the queue exists with other arguments.
/// Classified by reply code (406), never by the message text.
pub(crate) fn is_precondition_failed(err: &lapin::Error) -> bool {
    matches!(
        err.kind(),
        lapin::ErrorKind::ProtocolError(e)
            if matches!(e.kind(), AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED))
    )
}

/// Maps a refused queue declaration: PRECONDITION_FAILED names the queue and the settings
/// behind its arguments; anything else stays a broker error of `context`.
pub(crate) fn declare_error(
    context: &'static str,
    queue: &str,
    settings: String,
) -> impl FnOnce(lapin::Error) -> Error {
    let queue = queue.to_owned();
    move |source| {
        if is_precondition_failed(&source) {
            Error::QueueMismatch {
                queue,
                settings,
                source: Box::new(source),
            }
        } else {
            Error::Broker { context, source }
        }
    }
}

pub(crate) async fn declare(
    channel: &Channel,
    config: &Config,
    cascade: &DelayCascade,
) -> Result<(), Error> {
    for (exchange, kind) in &config.exchanges {
        channel
            .exchange_declare(
                exchange.as_str().into(),
                kind.clone(),
                // Durable: bindings to it must outlive a broker restart.
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(Error::broker("declare exchange"))?;
    }
    channel
        .queue_declare(
            config.queue.as_str().into(),
            // Durable, not exclusive, not auto-delete: messages wait here while every
            // instance is down, and several instances share it as competing consumers.
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            queue_arguments(config),
        )
        .await
        .map_err(declare_error(
            "declare queue",
            &config.queue,
            format!(
                "quorum({}) and single_active_consumer({})",
                config.quorum, config.single_active_consumer
            ),
        ))?;
    for (exchange, routing_key) in &config.bindings {
        channel
            .queue_bind(
                config.queue.as_str().into(),
                exchange.as_str().into(),
                routing_key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(Error::broker("bind queue"))?;
    }
    if config.dead_letter_queue {
        // Quorum like the main queue, so dead letters waiting for a person survive a node
        // loss. No dead-letter arguments: nothing is ever dead-lettered out of it.
        let mut args = FieldTable::default();
        if config.quorum {
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
        }
        let dead = dead_letter_queue(&config.queue);
        channel
            .queue_declare(
                dead.as_str().into(),
                // Durable: dead letters wait for a person, possibly for days.
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                args,
            )
            .await
            .map_err(declare_error(
                "declare dead-letter queue",
                &dead,
                format!("quorum({}) with dead_letter_queue(true)", config.quorum),
            ))?;
    }
    cascade.declare(channel).await?;
    cascade.bind_destination(channel, &config.queue).await
}
