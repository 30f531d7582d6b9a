//! The message a handler receives: the decoded payload plus everything the broker delivered.

use lapin::BasicProperties;
use lapin::types::FieldTable;

use crate::headers;

/// Header carrying the ordering key, set by the relay when a message has one.
pub const ORDERING_KEY_HEADER: &str = "x-ordering-key";
/// Header carrying how many times handling this message has failed so far (absent = 0).
pub const ATTEMPTS_HEADER: &str = "x-consumer-attempts";
/// Header keeping the exchange a retried message was first published to.
pub const ORIGINAL_EXCHANGE_HEADER: &str = "x-original-exchange";
/// Header keeping the routing key a retried message was first published with.
pub const ORIGINAL_ROUTING_KEY_HEADER: &str = "x-original-routing-key";
/// Header carrying the last error of a retried or dead-lettered message.
pub const LAST_ERROR_HEADER: &str = "x-last-error";

/// One delivered message with its payload decoded into `T`.
///
/// `T` is decoded from the body with `serde_json`. The body itself stays available through
/// [`Message::raw`]; a handler that wants only the bytes uses `serde::de::IgnoredAny` as `T`.
#[derive(Debug)]
pub struct Message<T> {
    /// The globally unique message id (the AMQP `message_id` property).
    pub id: i64,
    /// The decoded payload.
    pub payload: T,
    /// Which attempt this is, starting at 1.
    pub attempt: u32,
    pub(crate) envelope: Envelope,
}

impl<T> Message<T> {
    /// A first-attempt message with no headers, for unit-testing a handler without a broker.
    pub fn new(id: i64, payload: T, raw: Vec<u8>) -> Self {
        Message {
            id,
            payload,
            attempt: 1,
            envelope: Envelope {
                message_id: Some(id),
                failed_attempts: 0,
                ordering_key: None,
                exchange: String::new(),
                routing_key: String::new(),
                headers: FieldTable::default(),
                properties: BasicProperties::default(),
                data: raw,
            },
        }
    }

    /// The body exactly as delivered.
    pub fn raw(&self) -> &[u8] {
        &self.envelope.data
    }

    /// The message headers (the relay's headers, plus this library's `x-consumer-*` ones on a
    /// retry).
    pub fn headers(&self) -> &FieldTable {
        &self.envelope.headers
    }

    /// A header's value as text, when it is a string.
    pub fn header_str(&self, name: &str) -> Option<&str> {
        headers::str_value(&self.envelope.headers, name)
    }

    /// The ordering key, when the producer gave one.
    pub fn ordering_key(&self) -> Option<&str> {
        self.envelope.ordering_key.as_deref()
    }

    /// The exchange the producer published to (kept across retries).
    pub fn exchange(&self) -> &str {
        &self.envelope.exchange
    }

    /// The routing key the producer used (kept across retries).
    pub fn routing_key(&self) -> &str {
        &self.envelope.routing_key
    }

    /// The `content_type` property, when set.
    pub fn content_type(&self) -> Option<&str> {
        self.envelope
            .properties
            .content_type()
            .as_ref()
            .map(|c| c.as_str())
    }

    /// The AMQP properties as delivered.
    pub fn properties(&self) -> &BasicProperties {
        &self.envelope.properties
    }
}

/// A delivery parsed into the parts the library needs, before the payload is decoded.
#[derive(Debug, Clone)]
pub(crate) struct Envelope {
    /// `None` when the `message_id` property is missing or not a positive integer.
    pub message_id: Option<i64>,
    /// Failed attempts before this delivery.
    pub failed_attempts: u32,
    pub ordering_key: Option<String>,
    pub exchange: String,
    pub routing_key: String,
    pub headers: FieldTable,
    pub properties: BasicProperties,
    pub data: Vec<u8>,
}

impl Envelope {
    pub(crate) fn parse(
        exchange: &str,
        routing_key: &str,
        properties: BasicProperties,
        data: Vec<u8>,
    ) -> Self {
        let headers = properties.headers().clone().unwrap_or_default();
        let message_id = properties
            .message_id()
            .as_ref()
            .and_then(|id| id.as_str().parse::<i64>().ok())
            .filter(|id| *id > 0);
        let failed_attempts = headers::int_value(&headers, ATTEMPTS_HEADER)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0);
        let ordering_key = headers::str_value(&headers, ORDERING_KEY_HEADER).map(str::to_owned);
        // A retried message comes back through the delay exchanges with a routing key of their
        // own; the producer's exchange and key travel in headers.
        let exchange = headers::str_value(&headers, ORIGINAL_EXCHANGE_HEADER)
            .unwrap_or(exchange)
            .to_owned();
        let routing_key = headers::str_value(&headers, ORIGINAL_ROUTING_KEY_HEADER)
            .unwrap_or(routing_key)
            .to_owned();
        Envelope {
            message_id,
            failed_attempts,
            ordering_key,
            exchange,
            routing_key,
            headers,
            properties,
            data,
        }
    }
}
