//! The relay's part of a message's trace: one `outbox.publish` span per message that arrived
//! with a W3C `traceparent` (the producer's span, stored in the row's headers), child of that
//! span, from the publish until the broker's confirm. The message goes out carrying the publish
//! span's own `traceparent`, so the consumer's span is the child of the publish, as in the
//! OpenTelemetry messaging conventions (producer → publish → process).
//!
//! Without an OpenTelemetry layer (no OTLP export configured) the span has no context: the
//! stored `traceparent` is published unchanged and the consumer joins the producer's span.
//! A message without a `traceparent` gets no span: a per-message root trace would only be noise.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, LongString};
use tracing::Span;

use crate::claim::Claimed;
use crate::publish::Outcome;

/// The publish span of `msg`, when it carries a trace context.
pub(crate) fn publish_span(msg: &Claimed) -> Option<Span> {
    let headers = msg.headers.as_object()?;
    headers.get(telemetry::TRACEPARENT)?;
    let span = tracing::info_span!(
        "outbox.publish",
        otel.kind = "producer",
        messaging.system = "rabbitmq",
        messaging.destination.name = %msg.exchange,
        messaging.rabbitmq.destination.routing_key = %msg.routing_key,
        messaging.message.id = msg.id,
        attempt = msg.attempts + 1,
        outcome = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    telemetry::set_parent_from_json(&span, headers);
    Some(span)
}

/// `props` with the publish span's `traceparent`/`tracestate` in place of the stored ones.
pub(crate) fn stamp(span: &Span, props: BasicProperties) -> BasicProperties {
    let Some((parent, state)) = telemetry::context_of(span) else {
        return props;
    };
    let mut headers = props.headers().clone().unwrap_or_default();
    headers.insert(
        telemetry::TRACEPARENT.into(),
        AMQPValue::LongString(LongString::from(parent)),
    );
    // The span's trace state is the one it inherited from the stored context; when it has
    // none, the stored `tracestate` (if any) stays, as empty as it came.
    if let Some(state) = state {
        headers.insert(
            telemetry::TRACESTATE.into(),
            AMQPValue::LongString(LongString::from(state)),
        );
    }
    props.with_headers(headers)
}

/// Ends `span` with the message's outcome.
pub(crate) fn finish(span: Span, outcome: &Outcome) {
    let (outcome, ok) = match outcome {
        Outcome::Confirmed => ("confirmed", true),
        Outcome::Failed(_) => ("failed", false),
        Outcome::Unknown(_) => ("unknown", false),
    };
    span.record("outcome", outcome);
    span.record("otel.status_code", if ok { "OK" } else { "ERROR" });
}
