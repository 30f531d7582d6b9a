//! Every answer the gateway makes itself is an RFC 9457 `application/problem+json` document, so a
//! client can tell a gateway refusal (type `urn:problem:gateway:*`) from an upstream answer.

use axum::{
    body::Body,
    response::{IntoResponse, Response},
};
use http::StatusCode;

/// The request and response types every layer of a route's stack speaks: the request body is
/// already read (bounded by the size limit) so it can be fingerprinted, inspected for a lock key
/// and sent again on retry; the response body streams unless a layer needs to keep it.
pub type GatewayRequest = http::Request<bytes::Bytes>;
/// See [`GatewayRequest`].
pub type GatewayResponse = Response<Body>;

/// Marks a response the gateway produced itself, with its problem kind (for metrics and for
/// layers that must not mistake it for an upstream answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatewayProblem(pub &'static str);

/// Whether an exchange with the upstream went well, as seen by the circuit breaker and retries.
/// Absent on answers that never involved the upstream (a lock refusal, a replay).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamOutcome {
    /// The upstream answered below 500.
    Success,
    /// The upstream answered 5xx, could not be reached, or did not answer in time.
    Failure,
}

/// A gateway problem under construction: the shared problem document
/// ([`http_common::Problem`], type `urn:problem:gateway:<kind>`) plus what the gateway's own
/// layers read back from the response (its kind, and the upstream outcome when there is one).
#[derive(Debug, Clone)]
pub struct Problem {
    doc: http_common::Problem,
    kind: &'static str,
    outcome: Option<UpstreamOutcome>,
}

impl Problem {
    /// A problem with its status, a short machine kind (`idempotency-key-missing`) and a title.
    pub fn new(status: StatusCode, kind: &'static str, title: &'static str) -> Self {
        Self {
            doc: http_common::Problem::new(status, title)
                .with_type(format!("urn:problem:gateway:{kind}")),
            kind,
            outcome: None,
        }
    }

    /// Human explanation of this occurrence.
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.doc = self.doc.detail(detail);
        self
    }

    /// Adds `Retry-After` in whole seconds (at least 1).
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.doc = self.doc.retry_after(secs);
        self
    }

    /// Records that this answer reflects the upstream's health.
    pub fn outcome(mut self, outcome: UpstreamOutcome) -> Self {
        self.outcome = Some(outcome);
        self
    }

    /// Adds `WWW-Authenticate: Bearer` (for 401).
    pub fn bearer_challenge(mut self) -> Self {
        self.doc = self.doc.challenge("Bearer");
        self
    }

    /// The status.
    pub fn status(&self) -> StatusCode {
        self.doc.status()
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        self.doc.body()
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let mut resp = self.doc.into_response();
        resp.extensions_mut().insert(GatewayProblem(self.kind));
        if let Some(o) = self.outcome {
            resp.extensions_mut().insert(o);
        }
        resp
    }
}

/// The 504 the timeout layer answers, also what an idempotency record stores for a timeout.
pub fn upstream_timeout(timeout_ms: u64) -> Problem {
    Problem::new(
        StatusCode::GATEWAY_TIMEOUT,
        "upstream-timeout",
        "Upstream did not answer in time",
    )
    .detail(format!(
        "the route's timeout of {timeout_ms} ms elapsed before the upstream answered; its outcome is unknown"
    ))
    .outcome(UpstreamOutcome::Failure)
}

/// The answer when a record or lock store cannot be reached.
pub fn store_unavailable(what: &str, err: &dyn std::fmt::Display) -> Problem {
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "store-unavailable",
        "Gateway store unavailable",
    )
    .detail(format!("{what}: {err}"))
    .retry_after(1)
}
