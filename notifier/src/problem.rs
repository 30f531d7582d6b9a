//! Errors of the query API as RFC 9457 `application/problem+json` documents.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};

/// A problem answer.
#[derive(Debug, Clone)]
pub struct Problem {
    status: StatusCode,
    kind: &'static str,
    title: &'static str,
    detail: Option<String>,
}

impl Problem {
    /// A problem with a status, a short machine kind and a title.
    pub fn new(status: StatusCode, kind: &'static str, title: &'static str) -> Self {
        Problem {
            status,
            kind,
            title,
            detail: None,
        }
    }

    /// Adds the explanation of this occurrence.
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
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
        let mut body = serde_json::json!({
            "type": format!("urn:problem:notifier:{}", self.kind),
            "title": self.title,
            "status": self.status.as_u16(),
        });
        if let Some(d) = self.detail {
            body["detail"] = serde_json::Value::String(d);
        }
        let mut resp = (self.status, body.to_string()).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}
