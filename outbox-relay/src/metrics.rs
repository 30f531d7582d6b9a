//! Prometheus metrics: names, units and help texts in one place.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Installs the global recorder and describes every relay metric. Call once, in `main`.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets(&[
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ])?
        .install_recorder()?;
    describe();
    Ok(handle)
}

fn describe() {
    describe_counter!(
        "outbox_relay_published_total",
        Unit::Count,
        "Messages confirmed by the broker and removed from the outbox."
    );
    describe_counter!(
        "outbox_relay_failed_attempts_total",
        Unit::Count,
        "Publish attempts that failed (nack, basic.return, confirm timeout, missing exchange)."
    );
    describe_counter!(
        "outbox_relay_dead_lettered_total",
        Unit::Count,
        "Messages moved to outbox.dead_letters after their last attempt."
    );
    describe_counter!(
        "outbox_relay_unknown_outcomes_total",
        Unit::Count,
        "Messages whose connection broke before their confirm; published again later."
    );
    describe_counter!(
        "outbox_relay_broker_failovers_total",
        Unit::Count,
        "Worker reconnects that went to another node of the amqp_url list than the last one."
    );
    describe_gauge!(
        "outbox_backlog_messages",
        Unit::Count,
        "Messages due now and not yet published."
    );
    describe_gauge!(
        "outbox_oldest_due_age_seconds",
        Unit::Seconds,
        "How long the oldest due message has been due."
    );
    describe_gauge!(
        "outbox_dead_letters",
        Unit::Count,
        "Messages in the dead-letter table."
    );
    describe_histogram!(
        "outbox_relay_publish_batch_seconds",
        Unit::Seconds,
        "Time to publish one batch and receive all its confirms."
    );
    describe_histogram!(
        "outbox_relay_enqueue_to_confirm_seconds",
        Unit::Seconds,
        "From the enqueueing transaction's start to the broker's confirm."
    );
}
