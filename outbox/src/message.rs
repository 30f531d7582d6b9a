//! The message model: what a producer hands to the outbox.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::Error;

/// A message to publish. Built with [`Message::new`] or [`Message::json`] and the `with_*`
/// setters, then given to [`crate::Outbox::enqueue`].
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub(crate) exchange: String,
    pub(crate) routing_key: String,
    pub(crate) payload: Vec<u8>,
    pub(crate) headers: Map<String, Value>,
    pub(crate) content_type: Option<String>,
    pub(crate) ordering_key: Option<String>,
    pub(crate) deliver_at: Option<DateTime<Utc>>,
    pub(crate) delay: Option<Duration>,
    pub(crate) dedupe_key: Option<String>,
}

impl Message {
    /// A message with a raw byte payload. `exchange` may be `""` (the default exchange, where
    /// `routing_key` names the queue).
    pub fn new(
        exchange: impl Into<String>,
        routing_key: impl Into<String>,
        payload: impl Into<Vec<u8>>,
    ) -> Self {
        Message {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            payload: payload.into(),
            headers: Map::new(),
            content_type: None,
            ordering_key: None,
            deliver_at: None,
            delay: None,
            dedupe_key: None,
        }
    }

    /// A message whose payload is `value` as JSON, with content type `application/json`.
    pub fn json<T: Serialize + ?Sized>(
        exchange: impl Into<String>,
        routing_key: impl Into<String>,
        value: &T,
    ) -> Result<Self, Error> {
        let mut msg = Message::new(exchange, routing_key, serde_json::to_vec(value)?);
        msg.content_type = Some("application/json".to_owned());
        Ok(msg)
    }

    /// Adds a header (published as an AMQP header).
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<Value>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Sets the AMQP `content_type` property.
    pub fn with_content_type(mut self, content_type: impl Into<String>) -> Self {
        self.content_type = Some(content_type.into());
        self
    }

    /// Messages with the same ordering key are published in id order, one after another.
    pub fn with_ordering_key(mut self, key: impl Into<String>) -> Self {
        self.ordering_key = Some(key.into());
        self
    }

    /// Publishes no earlier than `at`.
    pub fn with_deliver_at(mut self, at: DateTime<Utc>) -> Self {
        self.deliver_at = Some(at);
        self.delay = None;
        self
    }

    /// Publishes no earlier than `delay` after the enqueueing transaction started (database
    /// time, so producer clock skew does not matter).
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self.deliver_at = None;
        self
    }

    /// At most one pending message per dedupe key: enqueueing again returns the pending one's id
    /// and stores nothing. [`crate::cancel`] removes a pending message by this key.
    pub fn with_dedupe_key(mut self, key: impl Into<String>) -> Self {
        self.dedupe_key = Some(key.into());
        self
    }

    /// The headers as stored: the caller's, plus the current span's W3C `traceparent` and
    /// `tracestate` when the caller set none and the current span has a trace context (an
    /// OpenTelemetry layer is installed). A `traceparent` the caller set wins: it is theirs.
    pub(crate) fn stored_headers(&self) -> Value {
        let mut headers = self.headers.clone();
        if !headers.contains_key(telemetry::TRACEPARENT) {
            telemetry::inject_json(&tracing::Span::current(), &mut headers);
        }
        Value::Object(headers)
    }

    /// The payload bytes.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_trace_context_the_headers_are_stored_as_given() {
        let span = tracing::info_span!("no opentelemetry layer");
        let _entered = span.enter();
        let msg = Message::new("x", "y", b"p".to_vec()).with_header("a", 1);
        assert_eq!(msg.stored_headers(), serde_json::json!({"a": 1}));
    }

    #[test]
    fn a_traceparent_set_by_the_caller_is_kept() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let msg = Message::new("x", "y", b"p".to_vec()).with_header("traceparent", tp);
        assert_eq!(msg.stored_headers()["traceparent"], tp);
    }
}
