//! RFC 9457 problem documents. Every error a component answers itself is one of these, so a
//! client reads one shape everywhere: `type`, `title`, `status` and, when there is something to
//! say about this occurrence, `detail`.
//!
//! The body is built as a `serde_json::Value`, whose keys serialise in sorted order: the bytes
//! of a document do not depend on the order the fields were set in, which matters where a
//! document is stored and replayed (the gateway's idempotency records).

use axum::{
    body::Body,
    response::{IntoResponse, Response},
};
use http::{HeaderValue, StatusCode, header};

/// The media type of a problem document.
pub const CONTENT_TYPE: &str = "application/problem+json";

/// A problem document under construction; answer it with [`IntoResponse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    status: StatusCode,
    // `None` is `about:blank`; the fields are kept small, since handlers return this in `Err`.
    type_uri: Option<String>,
    title: &'static str,
    detail: Option<String>,
    retry_after: Option<u32>,
    challenge: Option<&'static str>,
}

impl Problem {
    /// A problem of type `about:blank` (the status says it all) with a short title.
    pub fn new(status: StatusCode, title: &'static str) -> Self {
        Problem {
            status,
            type_uri: None,
            title,
            detail: None,
            retry_after: None,
            challenge: None,
        }
    }

    /// Sets the `type` URI (`urn:problem:gateway:upstream-timeout`) for clients that branch on it.
    pub fn with_type(mut self, type_uri: impl Into<String>) -> Self {
        self.type_uri = Some(type_uri.into());
        self
    }

    /// The human explanation of this occurrence.
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// Adds `Retry-After` in whole seconds (at least 1).
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs.clamp(1, u32::MAX.into()) as u32);
        self
    }

    /// Adds a `WWW-Authenticate` challenge (`Bearer`), as a 401 must carry.
    pub fn challenge(mut self, challenge: &'static str) -> Self {
        self.challenge = Some(challenge);
        self
    }

    /// The status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The `type` URI.
    pub fn type_uri(&self) -> &str {
        self.type_uri.as_deref().unwrap_or("about:blank")
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        let mut doc = serde_json::json!({
            "type": self.type_uri(),
            "title": self.title,
            "status": self.status.as_u16(),
        });
        if let Some(d) = &self.detail {
            doc["detail"] = serde_json::Value::String(d.clone());
        }
        doc
    }

    /// The JSON body's bytes, as sent.
    pub fn body_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&self.body()).unwrap_or_default()
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let mut resp = Response::new(Body::from(self.body_bytes()));
        *resp.status_mut() = self.status;
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
        if let Some(secs) = self.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Some(challenge) = self.challenge {
            h.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn answers_a_problem_document_with_its_headers() {
        let resp = Problem::new(StatusCode::UNAUTHORIZED, "unauthorized")
            .detail("a bearer token is required")
            .challenge("Bearer")
            .retry_after(0)
            .into_response();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        let h = resp.headers();
        assert_eq!(h[header::CONTENT_TYPE], CONTENT_TYPE);
        assert_eq!(h[header::WWW_AUTHENTICATE], "Bearer");
        assert_eq!(h[header::RETRY_AFTER], "1");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            &body[..],
            br#"{"detail":"a bearer token is required","status":401,"title":"unauthorized","type":"about:blank"}"#
        );
    }

    #[test]
    fn a_typed_problem_without_detail_has_no_detail_field() {
        let p = Problem::new(StatusCode::NOT_FOUND, "Not found").with_type("urn:problem:x:nf");
        assert_eq!(
            p.body(),
            serde_json::json!({"type": "urn:problem:x:nf", "title": "Not found", "status": 404})
        );
    }
}
