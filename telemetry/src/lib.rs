//! W3C trace context across the outbox, and the optional OTLP export every binary shares.
//!
//! A trace crosses three carriers on its way through the product: the outbox row's `headers`
//! (JSON), the AMQP message's headers, and HTTP headers (gateway, notifier). Each one carries
//! the two W3C Trace Context fields, [`TRACEPARENT`] and [`TRACESTATE`], written and read by
//! OpenTelemetry's W3C propagator so the text on the wire is exactly the standard's.
//!
//! - [`inject_json`] / [`inject_http`]: write a span's context into a carrier;
//! - [`set_parent`] / [`set_parent_from_http`]: make a span the child of a context read from a
//!   carrier (any carrier, through a lookup function);
//! - `init` (feature `otlp`): the subscriber of a binary: log lines as before, plus, when
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, spans
//!   exported over OTLP/HTTP.
//!
//! Without an OpenTelemetry layer in the subscriber a span has no trace context: the inject
//! functions then write nothing and [`set_parent`] does nothing, so a process that does not
//! export keeps whatever `traceparent` it was given and passes it on unchanged.
#![warn(missing_docs)]

#[cfg(feature = "otlp")]
mod init;

#[cfg(feature = "otlp")]
pub use init::{Guard, InitError, Options, init};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use serde_json::{Map, Value};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C `traceparent` header: `00-<trace id>-<parent span id>-<flags>`.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C `tracestate` header: vendor entries that travel with the trace.
pub const TRACESTATE: &str = "tracestate";

/// Writes `span`'s trace context into a JSON header object (an outbox row's `headers`).
/// Returns whether anything was written: nothing is when `span` has no valid context (no
/// OpenTelemetry layer installed, or a disabled span).
pub fn inject_json(span: &Span, headers: &mut Map<String, Value>) -> bool {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return false;
    }
    TraceContextPropagator::new().inject_context(&cx, &mut JsonInjector(headers));
    true
}

/// Writes `span`'s trace context into HTTP headers, replacing any `traceparent` there. Returns
/// whether anything was written (see [`inject_json`]).
pub fn inject_http(span: &Span, headers: &mut http::HeaderMap) -> bool {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return false;
    }
    // A stale tracestate from the incoming request must not outlive the context it belonged to.
    headers.remove(TRACESTATE);
    TraceContextPropagator::new().inject_context(&cx, &mut HttpInjector(headers));
    true
}

/// The `traceparent` and `tracestate` of `span`, as text, when it has a valid context.
pub fn context_of(span: &Span) -> Option<(String, Option<String>)> {
    let mut map = Map::new();
    if !inject_json(span, &mut map) {
        return None;
    }
    let parent = map.get(TRACEPARENT)?.as_str()?.to_owned();
    let state = map
        .get(TRACESTATE)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned);
    Some((parent, state))
}

/// Makes `span` a child of the context that `lookup` finds under [`TRACEPARENT`] and
/// [`TRACESTATE`]. Call it right after creating the span, before it is entered. Returns
/// whether a valid parent was found and set; a malformed `traceparent` is ignored (the span
/// stays where it was), as the W3C recommendation says a receiver should.
pub fn set_parent<'a>(span: &Span, lookup: impl Fn(&str) -> Option<&'a str>) -> bool {
    let found = Found {
        parent: lookup(TRACEPARENT),
        state: lookup(TRACESTATE),
    };
    let cx = TraceContextPropagator::new().extract(&found);
    if !cx.span().span_context().is_valid() {
        return false;
    }
    span.set_parent(cx).is_ok()
}

/// [`set_parent`] from HTTP request headers.
pub fn set_parent_from_http(span: &Span, headers: &http::HeaderMap) -> bool {
    set_parent(span, |name| headers.get(name).and_then(|v| v.to_str().ok()))
}

/// [`set_parent`] from a JSON header object.
pub fn set_parent_from_json(span: &Span, headers: &Map<String, Value>) -> bool {
    set_parent(span, |name| headers.get(name).and_then(Value::as_str))
}

struct JsonInjector<'a>(&'a mut Map<String, Value>);

impl Injector for JsonInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), Value::String(value));
    }
}

struct HttpInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HttpInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

struct Found<'a> {
    parent: Option<&'a str>,
    state: Option<&'a str>,
}

impl Extractor for Found<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            TRACEPARENT => self.parent,
            TRACESTATE => self.state,
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT, TRACESTATE]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_written_without_an_opentelemetry_layer() {
        let span = tracing::info_span!("no layer");
        let mut map = Map::new();
        assert!(!inject_json(&span, &mut map));
        assert!(map.is_empty());
        assert!(context_of(&span).is_none());
    }

    #[test]
    fn a_malformed_traceparent_is_ignored() {
        let span = tracing::info_span!("no layer");
        let mut map = Map::new();
        map.insert(TRACEPARENT.into(), "00-not-a-trace-01".into());
        assert!(!set_parent_from_json(&span, &map));
    }
}
