//! Errors of the query API as RFC 9457 `application/problem+json` documents.

use axum::response::{IntoResponse, Response};
use http::StatusCode;

/// A problem answer: the shared problem document ([`http_common::Problem`]) with type
/// `urn:problem:notifier:<kind>`; a 401 carries the `Bearer` challenge.
#[derive(Debug, Clone)]
pub struct Problem(http_common::Problem);

impl Problem {
    /// A problem with a status, a short machine kind and a title.
    pub fn new(status: StatusCode, kind: &'static str, title: &'static str) -> Self {
        let doc = http_common::Problem::new(status, title)
            .with_type(format!("urn:problem:notifier:{kind}"));
        Problem(if status == StatusCode::UNAUTHORIZED {
            doc.challenge("Bearer")
        } else {
            doc
        })
    }

    /// Adds the explanation of this occurrence.
    pub fn detail(self, detail: impl Into<String>) -> Self {
        Problem(self.0.detail(detail))
    }

    /// 400 for a bad parameter, naming it.
    pub fn bad_param(name: &str, reason: impl std::fmt::Display) -> Self {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid-parameter",
            "Invalid parameter",
        )
        .detail(format!("{name}: {reason}"))
    }

    /// 404.
    pub fn not_found(what: impl Into<String>) -> Self {
        Problem::new(StatusCode::NOT_FOUND, "not-found", "Not found").detail(what)
    }

    /// 500/503 for a store failure; the cause goes to the log, not to the client.
    pub fn store(err: &crate::Error) -> Self {
        tracing::error!(cause = %err, "query API store error");
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store-unavailable",
            "Notification store unavailable",
        )
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        self.0.into_response()
    }
}
