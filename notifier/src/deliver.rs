//! One delivery attempt: a signed POST and the judgement of its answer. The client speaks
//! `http://` and `https://` (rustls with the ring provider, TLS 1.2 and 1.3), never follows
//! redirects (a receiver's 3xx is a failure, not a hop to another host) and uses no proxy.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use chrono::Utc;
use http_body_util::{BodyExt, Full};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;

use crate::Error;
use crate::schedule::parse_retry_after;
use crate::signer;
use crate::store::{Attempt, Job};

/// How much of a response body is read: enough for a required-body check and a diagnosis,
/// never the whole of a misbehaving receiver's answer.
const MAX_RESPONSE_BYTES: usize = 4096;

/// The webhook HTTP client.
pub type WebhookClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

pub use http_common::tls::TlsRoots;

/// Builds the client: `roots`, plus the PEM certificates in `ca_file` (a partner's private CA).
pub fn client(roots: TlsRoots, ca_file: Option<&Path>) -> Result<WebhookClient, Error> {
    let tls = http_common::tls::client_config(roots, ca_file)
        .map_err(|e| Error::invalid(e.key, e.reason))?;
    let mut http = HttpConnector::new();
    // The HTTPS connector below decides the scheme; the inner connector must accept both.
    http.enforce_http(false);
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    http.set_nodelay(true);
    let connector = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .build(connector))
}

const USER_AGENT: &str = concat!("notifier/", env!("CARGO_PKG_VERSION"));

/// POSTs `job` once, waiting at most `timeout` for the whole exchange.
pub async fn attempt(client: &WebhookClient, job: &Job, timeout: Duration) -> Attempt {
    let started_at = Utc::now();
    let clock = Instant::now();
    let failed = |error: String, http_status: Option<u16>| Attempt {
        started_at,
        http_status,
        latency: clock.elapsed(),
        succeeded: false,
        error: Some(error),
        response_body: None,
        retry_after: None,
        responsive: false,
    };
    let timestamp = started_at.timestamp();
    let id = job.id.to_string();
    let secrets: Vec<&str> = job.secrets.iter().map(String::as_str).collect();
    let request = http::Request::post(job.url.as_str())
        .header(http::header::CONTENT_TYPE, &job.content_type)
        .header(http::header::USER_AGENT, USER_AGENT)
        .header(signer::HEADER_ID, &id)
        .header(signer::HEADER_TIMESTAMP, timestamp.to_string())
        .header(
            signer::HEADER_SIGNATURE,
            signer::signature_header(&secrets, &id, timestamp, &job.body),
        )
        .header(signer::HEADER_EVENT, &job.event_type)
        .header(signer::HEADER_ATTEMPT, (job.attempts + 1).to_string())
        .body(Full::new(Bytes::from(job.body.clone())));
    let mut request = match request {
        Ok(r) => r,
        Err(e) => return failed(format!("cannot build the request: {e}"), None),
    };
    // The attempt's span context as W3C `traceparent`, when spans are exported: the partner
    // can quote it, and a traced receiver joins the notifier's trace.
    // Its parent is the trace stored with the notification, so the trace id is the one of the
    // transaction that created it. When spans are not exported there is no delivery span
    // context: the stored trace is still continued, under a fresh parent id per attempt.
    if !telemetry::inject_http(&tracing::Span::current(), request.headers_mut())
        && let Some(parent) = job.traceparent.as_deref().and_then(child_traceparent)
    {
        let headers = request.headers_mut();
        if let Ok(v) = http::HeaderValue::from_str(&parent) {
            headers.insert(telemetry::TRACEPARENT, v);
        }
        if let Some(v) = job
            .tracestate
            .as_deref()
            .and_then(|s| http::HeaderValue::from_str(s).ok())
        {
            headers.insert(telemetry::TRACESTATE, v);
        }
    }
    let exchange = async {
        let resp = client.request(request).await.map_err(|e| {
            if e.is_connect() {
                format!("connection failed: {}", root_cause(&e))
            } else {
                root_cause(&e)
            }
        })?;
        let (parts, mut body) = resp.into_parts();
        let mut bytes = Vec::new();
        let mut body_error = None;
        while bytes.len() < MAX_RESPONSE_BYTES {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        let room = MAX_RESPONSE_BYTES - bytes.len();
                        bytes.extend_from_slice(&data[..data.len().min(room)]);
                    }
                }
                Some(Err(e)) => {
                    body_error = Some(root_cause(&e));
                    break;
                }
                None => break,
            }
        }
        Ok::<_, String>((parts, bytes, body_error))
    };
    let (parts, body, body_error) = match tokio::time::timeout(timeout, exchange).await {
        Err(_) => return failed("timed out".to_owned(), None),
        Ok(Err(e)) => return failed(e, None),
        Ok(Ok(r)) => r,
    };
    let latency = clock.elapsed();
    let status = parts.status;
    let retry_after = parts
        .headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, SystemTime::now()));
    let text = String::from_utf8_lossy(&body).into_owned();
    let responsive = !(status.is_server_error() || status == http::StatusCode::TOO_MANY_REQUESTS);
    let error = if !status.is_success() {
        Some(format!("HTTP {}", status.as_u16()))
    } else if let Some(e) = body_error {
        Some(format!("reading the response: {e}"))
    } else {
        match &job.required_body {
            Some(required) if text.trim() != required.as_str() => {
                Some(format!("response body is not the required {required:?}"))
            }
            _ => None,
        }
    };
    Attempt {
        started_at,
        http_status: Some(status.as_u16()),
        latency,
        succeeded: error.is_none(),
        error,
        response_body: (!text.is_empty()).then_some(text),
        retry_after,
        responsive,
    }
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// `traceparent` with the same trace id and flags and a new random parent id, or `None` when
/// `traceparent` is not a valid one.
fn child_traceparent(traceparent: &str) -> Option<String> {
    if !crate::valid_traceparent(traceparent) {
        return None;
    }
    let trace_id = &traceparent[3..35];
    let flags = &traceparent[53..55];
    let span_id = loop {
        let id: u64 = rand::random();
        if id != 0 {
            break id;
        }
    };
    Some(format!("00-{trace_id}-{span_id:016x}-{flags}"))
}

#[cfg(test)]
mod tests {
    use super::child_traceparent;

    #[test]
    fn a_child_traceparent_keeps_the_trace_and_flags_with_a_new_parent() {
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let child = child_traceparent(parent).unwrap();
        assert!(crate::valid_traceparent(&child), "{child}");
        assert_eq!(&child[..36], &parent[..36]);
        assert_ne!(&child[36..52], &parent[36..52]);
        assert_eq!(&child[52..], "-01");
        assert_eq!(child_traceparent("00-zz-00f067aa0ba902b7-01"), None);
    }
}
