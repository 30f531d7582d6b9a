//! Durable delayed redelivery through a cascade of TTL queues, shared by every consumer.
//!
//! A delay is written in binary, in units of [`UNIT`]: level `k` is a durable queue whose
//! every message waits exactly `UNIT * 2^k` (queue-level `x-message-ttl`), then is
//! dead-lettered by the broker to level `k - 1`. The routing key carries the bits of the delay
//! and the destination queue, `b23.b22. … .b0.<queue>`; each level's topic exchange sends a
//! message into its queue when its bit is 1 and straight on to the next level when it is 0.
//! After level 0 the `deliver` exchange routes the message back to `<queue>`.
//!
//! Why this shape: RabbitMQ expires messages only at the head of a queue, so one queue with
//! per-message TTLs would hold a 1 s retry behind a 5 min one. Here every queue has a single
//! TTL, so its head is always the first to expire and no message ever waits behind another;
//! any delay (jitter included) is exact to [`UNIT`]; the messages live in durable queues as
//! persistent messages and survive a broker restart; and no plugin is needed.

use std::time::Duration;

use lapin::options::{
    ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};

use crate::Error;

/// Resolution of a delay.
pub const UNIT: Duration = Duration::from_millis(100);
/// Number of levels: delays up to `UNIT * (2^LEVELS - 1)`, about 19 days.
pub const LEVELS: u32 = 24;
/// The longest delay the cascade can express.
pub const MAX_DELAY: Duration = Duration::from_millis(100 * ((1 << LEVELS) - 1));

/// Names of the cascade's exchanges and queues, all under one prefix.
#[derive(Debug, Clone)]
pub(crate) struct DelayCascade {
    prefix: String,
    quorum: bool,
}

impl DelayCascade {
    pub(crate) fn new(prefix: String, quorum: bool) -> Self {
        DelayCascade { prefix, quorum }
    }

    /// Where a delayed message is published first: the top level.
    pub(crate) fn entry_exchange(&self) -> String {
        self.level_name(LEVELS - 1)
    }

    fn level_name(&self, level: u32) -> String {
        format!("{}.level.{level:02}", self.prefix)
    }

    fn deliver_exchange(&self) -> String {
        format!("{}.deliver", self.prefix)
    }

    fn next_exchange(&self, level: u32) -> String {
        if level == 0 {
            self.deliver_exchange()
        } else {
            self.level_name(level - 1)
        }
    }

    /// The routing key that makes the cascade hold a message for `delay` and then deliver it
    /// to `queue`.
    pub(crate) fn routing_key(delay: Duration, queue: &str) -> String {
        let units = (delay.as_millis() / UNIT.as_millis()).min((1u128 << LEVELS) - 1) as u64;
        let mut key = String::with_capacity(LEVELS as usize * 2 + queue.len());
        for level in (0..LEVELS).rev() {
            key.push(if units >> level & 1 == 1 { '1' } else { '0' });
            key.push('.');
        }
        key.push_str(queue);
        key
    }

    /// `*.` for every bit above `level`, so a pattern can test the bit of `level`.
    fn skip_words(level: u32) -> String {
        "*.".repeat((LEVELS - 1 - level) as usize)
    }

    /// Declares every level (idempotent: consumers sharing a prefix declare the same things).
    pub(crate) async fn declare(&self, channel: &Channel) -> Result<(), Error> {
        // Durable: delayed messages must survive a broker restart.
        let exchange_options = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        channel
            .exchange_declare(
                self.deliver_exchange().into(),
                ExchangeKind::Topic,
                exchange_options,
                FieldTable::default(),
            )
            .await
            .map_err(Error::broker("declare delay exchanges"))?;
        for level in 0..LEVELS {
            let name = self.level_name(level);
            channel
                .exchange_declare(
                    name.as_str().into(),
                    ExchangeKind::Topic,
                    exchange_options,
                    FieldTable::default(),
                )
                .await
                .map_err(Error::broker("declare delay exchanges"))?;
        }
        for level in 0..LEVELS {
            let name = self.level_name(level);
            let mut args = FieldTable::default();
            let ttl_ms = (UNIT.as_millis() as i64) << level;
            args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl_ms));
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(LongString::from(self.next_exchange(level))),
            );
            if self.quorum {
                // Replicated by Raft: a delayed retry survives the loss of a minority of nodes.
                args.insert(
                    "x-queue-type".into(),
                    AMQPValue::LongString("quorum".into()),
                );
                // Every message leaves a level by dead-lettering (TTL expiry) to the next one.
                // At-least-once keeps it in this queue until the next level has it (classic
                // queues, and quorum queues by default, dead-letter at most once: a node
                // crash at that instant loses the retry).
                args.insert(
                    "x-dead-letter-strategy".into(),
                    AMQPValue::LongString("at-least-once".into()),
                );
                // At-least-once dead-lettering needs reject-publish overflow on the source
                // queue (with the default drop-head RabbitMQ falls back to at-most-once): a
                // full level refuses new publishes (the library's confirm fails, so it retries
                // in place) instead of dropping its oldest messages.
                args.insert(
                    "x-overflow".into(),
                    AMQPValue::LongString("reject-publish".into()),
                );
            }
            channel
                .queue_declare(
                    name.as_str().into(),
                    // Durable: a retry waiting here must outlive a broker restart.
                    QueueDeclareOptions {
                        durable: true,
                        ..QueueDeclareOptions::default()
                    },
                    args,
                )
                .await
                .map_err(crate::topology::declare_error(
                    "declare delay queues",
                    &name,
                    format!(
                        "quorum({}) with delay_prefix({:?})",
                        self.quorum, self.prefix
                    ),
                ))?;
            let skip = Self::skip_words(level);
            channel
                .queue_bind(
                    name.as_str().into(),
                    name.as_str().into(),
                    format!("{skip}1.#").into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(Error::broker("bind delay queues"))?;
            channel
                .exchange_bind(
                    self.next_exchange(level).into(),
                    name.as_str().into(),
                    format!("{skip}0.#").into(),
                    ExchangeBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(Error::broker("bind delay exchanges"))?;
        }
        Ok(())
    }

    /// Routes messages leaving the cascade for `queue` into it.
    pub(crate) async fn bind_destination(
        &self,
        channel: &Channel,
        queue: &str,
    ) -> Result<(), Error> {
        channel
            .queue_bind(
                queue.into(),
                self.deliver_exchange().into(),
                format!("{}{queue}", "*.".repeat(LEVELS as usize)).into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(Error::broker("bind queue to delay cascade"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_key_spells_the_delay_in_binary() {
        let key = DelayCascade::routing_key(Duration::from_millis(500), "q.a");
        // 500 ms = 5 units = 101b.
        assert!(key.ends_with(".1.0.1.q.a"), "{key}");
        assert_eq!(key.split('.').count(), LEVELS as usize + 2);
    }

    #[test]
    fn delays_beyond_the_cascade_are_clamped() {
        let key = DelayCascade::routing_key(Duration::from_secs(100 * 86_400), "q");
        assert_eq!(key, format!("{}q", "1.".repeat(LEVELS as usize)));
    }
}
