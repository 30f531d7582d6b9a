//! Endpoints: where notifications go, with their secrets, schedule and limits. Changing an
//! endpoint's secret is a rotation: the previous secret keeps signing for a while, so the
//! receiver can switch at its own pace.

use std::time::Duration;

use sqlx::PgConnection;

use crate::{Error, Schedule};

/// An endpoint as configured.
#[derive(Debug, Clone)]
pub struct EndpointSpec {
    /// Its id (`A-Z a-z 0-9 . _ : -`, at most 100).
    pub id: String,
    /// The `http://` or `https://` URL notifications are POSTed to.
    pub url: String,
    /// The signing secret (16 to 512 bytes); the HMAC key is its UTF-8 bytes.
    pub secret: String,
    /// When set, a 2xx counts only when the trimmed response body equals it.
    pub required_body: Option<String>,
    /// Its own schedule, or `None` for the notifier's default.
    pub schedule: Option<Schedule>,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Requests in flight to it at once, over all notifiers.
    pub max_in_flight: u32,
}

impl EndpointSpec {
    /// An endpoint with the default schedule, 10 s timeout and 4 requests in flight.
    pub fn new(id: impl Into<String>, url: impl Into<String>, secret: impl Into<String>) -> Self {
        EndpointSpec {
            id: id.into(),
            url: url.into(),
            secret: secret.into(),
            required_body: None,
            schedule: None,
            timeout: Duration::from_secs(10),
            max_in_flight: 4,
        }
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), Error> {
        let id_ok = !self.id.is_empty()
            && self.id.len() <= 100
            && self
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b));
        if !id_ok {
            return Err(Error::invalid(
                "id",
                "must be 1 to 100 characters of A-Z a-z 0-9 . _ : -",
            ));
        }
        match self.url.parse::<http::Uri>() {
            Ok(u)
                if matches!(u.scheme_str(), Some("http" | "https"))
                    && u.host().is_some_and(|h| !h.is_empty()) => {}
            _ => {
                return Err(Error::invalid(
                    "url",
                    "must be an absolute http:// or https:// URL",
                ));
            }
        }
        if !(16..=512).contains(&self.secret.len()) {
            return Err(Error::invalid("secret", "must be 16 to 512 bytes"));
        }
        if self.timeout.is_zero() || self.timeout > Duration::from_secs(300) {
            return Err(Error::invalid("timeout_ms", "must be 1..=300000"));
        }
        if !(1..=1000).contains(&self.max_in_flight) {
            return Err(Error::invalid("max_in_flight", "must be 1..=1000"));
        }
        if let Some(s) = &self.schedule
            && (s.steps().len() > 100 || s.steps().iter().any(|d| d.as_millis() > i32::MAX as u128))
        {
            return Err(Error::invalid(
                "schedule",
                "at most 100 steps of at most 24 days each",
            ));
        }
        Ok(())
    }

    /// Creates or updates the endpoint. A new secret rotates: the old one keeps signing for
    /// `previous_valid_for`.
    pub async fn upsert(
        &self,
        conn: &mut PgConnection,
        previous_valid_for: Duration,
    ) -> Result<(), Error> {
        self.validate()?;
        let schedule: Option<Vec<i32>> = self
            .schedule
            .as_ref()
            .map(|s| s.steps().iter().map(|d| d.as_millis() as i32).collect());
        sqlx::query(
            "SELECT notify.upsert_endpoint(id => $1, url => $2, secret => $3, required_body => $4, \
             schedule_ms => $5, timeout_ms => $6, max_in_flight => $7, \
             previous_valid_for => $8 * interval '1 millisecond')",
        )
        .bind(&self.id)
        .bind(&self.url)
        .bind(&self.secret)
        .bind(&self.required_body)
        .bind(schedule)
        .bind(self.timeout.as_millis() as i32)
        .bind(self.max_in_flight as i32)
        .bind(previous_valid_for.as_millis() as f64)
        .execute(conn)
        .await?;
        Ok(())
    }
}
