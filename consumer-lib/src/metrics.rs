//! Metric names and the one place that records them. Every series carries a `consumer` label.
//!
//! The library only records through the `metrics` facade; the service installs an exporter
//! (e.g. `metrics-exporter-prometheus`) if it wants them.

use std::time::Duration;

/// Messages whose handler succeeded and whose effects committed.
pub const PROCESSED_TOTAL: &str = "consumer_messages_processed_total";
/// Deliveries skipped because the inbox already held their message id.
pub const DUPLICATES_TOTAL: &str = "consumer_messages_duplicate_total";
/// Messages sent to the delay cascade for another attempt.
pub const RETRIES_TOTAL: &str = "consumer_messages_retried_total";
/// Messages written to the compensation log.
pub const DEAD_LETTERED_TOTAL: &str = "consumer_messages_dead_lettered_total";
/// Time spent in the handler (and its commit), successful or not.
pub const HANDLER_SECONDS: &str = "consumer_handler_duration_seconds";
/// Broker sessions rebuilt after the connection or consumer was lost.
pub const RECONNECTS_TOTAL: &str = "consumer_reconnects_total";
/// Broker sessions that reconnected to another node of the `amqp_url` list than the last one.
pub const BROKER_FAILOVERS_TOTAL: &str = "consumer_broker_failovers_total";
/// Inbox rows deleted by the purge.
pub const INBOX_PURGED_TOTAL: &str = "consumer_inbox_purged_total";

#[derive(Debug, Clone)]
pub(crate) struct Metrics {
    consumer: String,
}

impl Metrics {
    pub(crate) fn new(consumer: &str) -> Self {
        Metrics {
            consumer: consumer.to_owned(),
        }
    }

    pub(crate) fn processed(&self) {
        metrics::counter!(PROCESSED_TOTAL, "consumer" => self.consumer.clone()).increment(1);
    }

    pub(crate) fn duplicate(&self) {
        metrics::counter!(DUPLICATES_TOTAL, "consumer" => self.consumer.clone()).increment(1);
    }

    pub(crate) fn retried(&self) {
        metrics::counter!(RETRIES_TOTAL, "consumer" => self.consumer.clone()).increment(1);
    }

    pub(crate) fn dead_lettered(&self, reason: &'static str) {
        metrics::counter!(DEAD_LETTERED_TOTAL, "consumer" => self.consumer.clone(), "reason" => reason)
            .increment(1);
    }

    pub(crate) fn handler_time(&self, elapsed: Duration) {
        metrics::histogram!(HANDLER_SECONDS, "consumer" => self.consumer.clone())
            .record(elapsed.as_secs_f64());
    }

    pub(crate) fn failed_over(&self) {
        metrics::counter!(BROKER_FAILOVERS_TOTAL, "consumer" => self.consumer.clone()).increment(1);
    }

    pub(crate) fn reconnected(&self) {
        metrics::counter!(RECONNECTS_TOTAL, "consumer" => self.consumer.clone()).increment(1);
    }

    pub(crate) fn purged(&self, rows: u64) {
        metrics::counter!(INBOX_PURGED_TOTAL, "consumer" => self.consumer.clone()).increment(rows);
    }
}
