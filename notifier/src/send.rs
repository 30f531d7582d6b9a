//! The producer API: write a notification inside your own transaction.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use crate::Error;

/// A notification to send.
#[derive(Debug, Clone)]
pub struct NewNotification {
    /// The endpoint's id.
    pub endpoint: String,
    /// The event type (`order.paid`), sent as `Webhook-Event`.
    pub event_type: String,
    /// The exact bytes POSTed and signed.
    pub body: Vec<u8>,
    /// The body's content type.
    pub content_type: String,
    /// At most one notification per endpoint carries this key; a second send returns the first's id.
    pub dedupe_key: Option<String>,
    /// Not before this time.
    pub deliver_at: Option<DateTime<Utc>>,
    /// Not before this long after the database's `now()` (ignored when `deliver_at` is set).
    pub delay: Option<Duration>,
    /// The W3C `traceparent` the webhook's trace continues; `None` takes the current span's
    /// context (when spans are exported), else the notification has none.
    pub traceparent: Option<String>,
    /// The W3C `tracestate` that goes with `traceparent`.
    pub tracestate: Option<String>,
}

impl NewNotification {
    /// A notification with a JSON body.
    pub fn json<T: serde::Serialize + ?Sized>(
        endpoint: impl Into<String>,
        event_type: impl Into<String>,
        body: &T,
    ) -> Result<Self, Error> {
        let body = serde_json::to_vec(body).map_err(|e| Error::invalid("body", e.to_string()))?;
        Ok(NewNotification {
            endpoint: endpoint.into(),
            event_type: event_type.into(),
            body,
            content_type: "application/json".to_owned(),
            dedupe_key: None,
            deliver_at: None,
            delay: None,
            traceparent: None,
            tracestate: None,
        })
    }

    /// A notification with raw bytes.
    pub fn bytes(
        endpoint: impl Into<String>,
        event_type: impl Into<String>,
        body: impl Into<Vec<u8>>,
        content_type: impl Into<String>,
    ) -> Self {
        NewNotification {
            endpoint: endpoint.into(),
            event_type: event_type.into(),
            body: body.into(),
            content_type: content_type.into(),
            dedupe_key: None,
            deliver_at: None,
            delay: None,
            traceparent: None,
            tracestate: None,
        }
    }

    /// Sets the dedupe key.
    pub fn with_dedupe_key(mut self, key: impl Into<String>) -> Self {
        self.dedupe_key = Some(key.into());
        self
    }

    /// Continues the trace of `traceparent` (and `tracestate`) instead of the current span's.
    pub fn with_trace_context(
        mut self,
        traceparent: impl Into<String>,
        tracestate: Option<String>,
    ) -> Self {
        self.traceparent = Some(traceparent.into());
        self.tracestate = tracestate;
        self
    }

    /// Delivers no earlier than `at`.
    pub fn with_deliver_at(mut self, at: DateTime<Utc>) -> Self {
        self.deliver_at = Some(at);
        self
    }

    /// Delivers no earlier than `delay` after the transaction's start, on the database's clock
    /// (the one the notifier's due times use).
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }
}

/// Stores `n` through `conn`, normally your open transaction (`&mut tx`): the notification
/// exists if and only if that transaction commits. Returns its id (the `Webhook-Id`), or the
/// existing one's when the endpoint already has a notification with this dedupe key.
/// A bad field is [`Error::Invalid`] naming it, and nothing is written.
pub async fn send(conn: &mut PgConnection, n: &NewNotification) -> Result<i64, Error> {
    n.validate()?;
    let (traceparent, tracestate) = match &n.traceparent {
        Some(p) => (Some(p.clone()), n.tracestate.clone()),
        None => match telemetry::context_of(&tracing::Span::current()) {
            Some((p, s)) => (Some(p), s),
            None => (None, None),
        },
    };
    let res = sqlx::query_scalar(
        "SELECT notify.insert_notification($1, $2, $3, $4, $5, \
         coalesce($6, now() + $7 * interval '1 millisecond'), $8, $9)",
    )
    .bind(&n.endpoint)
    .bind(&n.event_type)
    .bind(&n.body)
    .bind(&n.content_type)
    .bind(&n.dedupe_key)
    .bind(n.deliver_at)
    .bind(n.delay.map(|d| d.as_secs_f64() * 1000.0))
    .bind(traceparent)
    .bind(tracestate)
    .fetch_one(conn)
    .await;
    match res {
        Ok(id) => Ok(id),
        // The only foreign key: the endpoint.
        Err(sqlx::Error::Database(db))
            if db.kind() == sqlx::error::ErrorKind::ForeignKeyViolation =>
        {
            Err(Error::invalid(
                "endpoint",
                format!("{:?} does not exist", n.endpoint),
            ))
        }
        Err(e) => Err(e.into()),
    }
}

/// Largest body accepted (the same limit as `notify.max_body_bytes()`).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

impl NewNotification {
    /// The checks `notify.send` makes, with the field named.
    pub fn validate(&self) -> Result<(), Error> {
        if self.endpoint.is_empty() {
            return Err(Error::invalid("endpoint", "must not be empty"));
        }
        let type_ok = !self.event_type.is_empty()
            && self.event_type.len() <= 255
            && self
                .event_type
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b));
        if !type_ok {
            return Err(Error::invalid(
                "event_type",
                "must be 1 to 255 characters of A-Z a-z 0-9 . _ : -",
            ));
        }
        if self.body.len() > MAX_BODY_BYTES {
            return Err(Error::invalid(
                "body",
                format!(
                    "is {} bytes, at most {MAX_BODY_BYTES} allowed",
                    self.body.len()
                ),
            ));
        }
        if self.content_type.is_empty()
            || self.content_type.len() > 255
            || self.content_type.contains(['\r', '\n'])
        {
            return Err(Error::invalid(
                "content_type",
                "must be 1 to 255 bytes on one line",
            ));
        }
        if let Some(k) = &self.dedupe_key
            && (k.is_empty() || k.len() > 255)
        {
            return Err(Error::invalid("dedupe_key", "must be 1 to 255 bytes"));
        }
        if let Some(p) = &self.traceparent
            && !valid_traceparent(p)
        {
            return Err(Error::invalid(
                "traceparent",
                "must be a W3C traceparent 00-<32 hex>-<16 hex>-<2 hex> (lower case, ids not all zeros)",
            ));
        }
        if let Some(s) = &self.tracestate {
            if self.traceparent.is_none() {
                return Err(Error::invalid("tracestate", "needs a traceparent"));
            }
            if s.len() > 512 || s.contains(['\r', '\n']) {
                return Err(Error::invalid(
                    "tracestate",
                    "must be at most 512 bytes on one line",
                ));
            }
        }
        Ok(())
    }
}

/// Whether `t` is a version-00 W3C `traceparent` (the check `notify.valid_traceparent` makes).
pub fn valid_traceparent(t: &str) -> bool {
    let parts: Vec<&str> = t.split('-').collect();
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    parts.len() == 4
        && parts[0] == "00"
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && hex(parts[3], 2)
        && parts[1].bytes().any(|b| b != b'0')
        && parts[2].bytes().any(|b| b != b'0')
}
