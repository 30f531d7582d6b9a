//! An OTLP/HTTP receiver for tests: accepts `POST /v1/traces` with JSON bodies (what the
//! product's exporter sends) and keeps every span, so a test can assert on a whole trace.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::{Router, extract::State, http::StatusCode, routing::post};
use serde_json::Value;

/// One exported span.
#[derive(Debug, Clone)]
pub struct Span {
    /// The exporting process's `service.name`.
    pub service: String,
    /// The span name.
    pub name: String,
    /// 32 hex digits.
    pub trace_id: String,
    /// 16 hex digits.
    pub span_id: String,
    /// 16 hex digits; empty for a root span.
    pub parent_span_id: String,
    /// Start time, ns since the epoch.
    pub start: u64,
    /// The span's attributes, as `key=value` text.
    pub attributes: Vec<(String, String)>,
}

/// A running receiver; it stops when dropped.
pub struct Receiver {
    /// Base URL for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub endpoint: String,
    spans: Arc<Mutex<Vec<Span>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Receiver {
    /// Binds 127.0.0.1:0 and serves.
    pub async fn start() -> Receiver {
        let spans = Arc::new(Mutex::new(Vec::new()));
        let app = Router::new()
            .route("/v1/traces", post(export))
            .with_state(spans.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver {
            endpoint,
            spans,
            task,
        }
    }

    /// The full traces URL.
    pub fn traces_url(&self) -> String {
        format!("{}/v1/traces", self.endpoint)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }

    /// Polls until `found` picks something from the spans received, or panics after `timeout`
    /// naming `what` and listing what did arrive.
    pub async fn wait_for<T>(
        &self,
        timeout: Duration,
        what: &str,
        found: impl Fn(&[Span]) -> Option<T>,
    ) -> T {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(t) = found(&self.spans()) {
                return t;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "no {what} within {timeout:?}; received: {:#?}",
                    self.spans()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn export(State(spans): State<Arc<Mutex<Vec<Span>>>>, body: String) -> (StatusCode, String) {
    let Ok(doc) = serde_json::from_str::<Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "{}".into());
    };
    let mut out = Vec::new();
    for rs in doc["resourceSpans"].as_array().into_iter().flatten() {
        let service = attributes(&rs["resource"]["attributes"])
            .into_iter()
            .find(|(k, _)| k == "service.name")
            .map(|(_, v)| v)
            .unwrap_or_default();
        for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
            for s in ss["spans"].as_array().into_iter().flatten() {
                out.push(Span {
                    service: service.clone(),
                    name: text(&s["name"]),
                    trace_id: text(&s["traceId"]),
                    span_id: text(&s["spanId"]),
                    parent_span_id: text(&s["parentSpanId"]),
                    start: match &s["startTimeUnixNano"] {
                        Value::String(n) => n.parse().unwrap_or(0),
                        v => v.as_u64().unwrap_or(0),
                    },
                    attributes: attributes(&s["attributes"]),
                });
            }
        }
    }
    spans.lock().unwrap().extend(out);
    (StatusCode::OK, "{}".into())
}

fn text(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_owned()
}

fn attributes(v: &Value) -> Vec<(String, String)> {
    v.as_array()
        .into_iter()
        .flatten()
        .map(|kv| {
            let value = kv["value"]
                .as_object()
                .and_then(|o| o.values().next())
                .map(|v| match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .unwrap_or_default();
            (text(&kv["key"]), value)
        })
        .collect()
}

/// The spans of `trace_id` as an indented tree (children under their parent, by start time):
/// `name [service] span=<id> parent=<id>`.
pub fn render_tree(spans: &[Span], trace_id: &str) -> String {
    let mut spans: Vec<&Span> = spans.iter().filter(|s| s.trace_id == trace_id).collect();
    spans.sort_by_key(|s| s.start);
    let mut out = format!("trace {trace_id}\n");
    let known: std::collections::HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    fn walk(spans: &[&Span], parent: &Span, depth: usize, out: &mut String) {
        for s in spans.iter().filter(|s| s.parent_span_id == parent.span_id) {
            line(s, depth, out);
            walk(spans, s, depth + 1, out);
        }
    }
    fn line(s: &Span, depth: usize, out: &mut String) {
        out.push_str(&format!(
            "{}{} [{}] span={} parent={}\n",
            "  ".repeat(depth + 1),
            s.name,
            s.service,
            s.span_id,
            if s.parent_span_id.is_empty() {
                "-"
            } else {
                &s.parent_span_id
            }
        ));
    }
    for root in spans
        .iter()
        .filter(|s| !known.contains(s.parent_span_id.as_str()))
    {
        line(root, 0, &mut out);
        walk(&spans, root, 1, &mut out);
    }
    out
}
