//! Declaring what a consumer needs on the broker: its queue and bindings, the dead-letter
//! queue, and the shared delay cascade. Every declaration is idempotent and runs again after a
//! reconnect, so a broker that lost non-durable state is put right.

use lapin::Channel;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};

use crate::Error;
use crate::builder::Config;
use crate::delay::DelayCascade;

/// The queue a consumer's dead letters go to when the dead-letter queue is on.
pub(crate) fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}.dead")
}

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
        .map_err(Error::broker("declare queue"))?;
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
        let mut args = FieldTable::default();
        if config.quorum {
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
        }
        channel
            .queue_declare(
                dead_letter_queue(&config.queue).into(),
                // Durable: dead letters wait for a person, possibly for days.
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                args,
            )
            .await
            .map_err(Error::broker("declare dead-letter queue"))?;
    }
    cascade.declare(channel).await?;
    cascade.bind_destination(channel, &config.queue).await
}
