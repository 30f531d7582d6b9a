//! One delivery attempt: a signed POST and the judgement of its answer.

use std::time::{Duration, Instant, SystemTime};

use chrono::Utc;

use crate::schedule::parse_retry_after;
use crate::signer;
use crate::store::{Attempt, Job};

/// How much of a response body is read: enough for a required-body check and a diagnosis,
/// never the whole of a misbehaving receiver's answer.
const MAX_RESPONSE_BYTES: usize = 4096;

/// The HTTP client for webhooks: no redirects (a receiver's 3xx is a failure, never a hop to
/// another host) and no system proxy.
pub fn client(user_agent: &str) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .user_agent(user_agent)
        .connect_timeout(Duration::from_secs(5))
        .pool_idle_timeout(Duration::from_secs(60))
        .build()
}

/// POSTs `job` once, waiting at most `timeout`.
pub async fn attempt(client: &reqwest::Client, job: &Job, timeout: Duration) -> Attempt {
    let started_at = Utc::now();
    let timestamp = started_at.timestamp();
    let id = job.id.to_string();
    let secrets: Vec<&str> = job.secrets.iter().map(String::as_str).collect();
    let signature = signer::signature_header(&secrets, &id, timestamp, &job.body);
    let clock = Instant::now();
    let sent = client
        .post(&job.url)
        .timeout(timeout)
        .header(http::header::CONTENT_TYPE, &job.content_type)
        .header(signer::HEADER_ID, &id)
        .header(signer::HEADER_TIMESTAMP, timestamp.to_string())
        .header(signer::HEADER_SIGNATURE, signature)
        .header(signer::HEADER_EVENT, &job.event_type)
        .header(signer::HEADER_ATTEMPT, (job.attempts + 1).to_string())
        .body(job.body.clone())
        .send()
        .await;
    let mut resp = match sent {
        Ok(r) => r,
        Err(e) => {
            return Attempt {
                started_at,
                http_status: None,
                latency: clock.elapsed(),
                succeeded: false,
                error: Some(describe(&e)),
                response_body: None,
                retry_after: None,
                responsive: false,
            };
        }
    };
    let status = resp.status();
    let retry_after = resp
        .headers()
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, SystemTime::now()));
    let mut body = Vec::new();
    let mut body_error = None;
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                let room = MAX_RESPONSE_BYTES - body.len();
                body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                if body.len() >= MAX_RESPONSE_BYTES {
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                body_error = Some(describe(&e));
                break;
            }
        }
    }
    let latency = clock.elapsed();
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

fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connect() {
        format!("connection failed: {}", root_cause(e))
    } else {
        root_cause(e)
    }
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}
