//! The operator dashboard: server-rendered HTML under `/dashboard` on the relay's HTTP server
//! (no JavaScript, no external fetches; the stylesheet is embedded).
//!
//! - [`pages`]: the read-only pages: backlog by exchange and due time, publish rate and confirm
//!   latency (from the relay's own metrics), relay and consumer dead letters, prepared messages,
//!   notifications by endpoint, and sagas when the `saga` schema exists.
//! - [`actions`]: the POSTs: redrive, replay, resolve, re-send, login and logout. Each calls the
//!   function the matching CLI or API calls (`admin::redrive`, `consumer_lib::dead_letter::replay`,
//!   `checkback::resolve`, `notifier::store::resend`).
//! - [`csrf`]: signed session cookies and the per-session CSRF token.
//!
//! Authentication: the dashboard exists only when the relay has an `admin_token`. A browser logs
//! in by posting that token to `/dashboard/login`, which sets an `HttpOnly; SameSite=Strict`
//! session cookie (8 hours, signed with a key drawn when the process starts). Scripts may send
//! `Authorization: Bearer <token>` to read pages. Every action needs the session cookie, the
//! session's CSRF token in the form, and (when the browser sends them) a same-origin `Origin`
//! and `Sec-Fetch-Site`; a refused action changes nothing. With `dashboard_public_read = true`
//! the read-only pages are open to anyone who can reach the address.
//!
//! Errors are `application/problem+json` (RFC 9457): 400 malformed id, 401 not logged in,
//! 403 CSRF or origin refused, 404 unknown id, 409 contradicting decision, 422 malformed form.

pub mod actions;
pub mod csrf;
mod html;
pub mod pages;
mod publishing;
mod sections;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;

pub(crate) use crate::http::Problem;

/// What the dashboard needs from the relay.
pub struct Settings {
    /// The outbox database.
    pub pool: PgPool,
    /// The relay's admin token; without one the dashboard is not served.
    pub admin_token: Option<String>,
    /// Where consumer dead letters are replayed to (the relay's broker).
    pub amqp_url: String,
    /// The relay's metrics, for publish rate and confirm latency.
    pub metrics: Option<PrometheusHandle>,
    /// Serve the read-only pages without a login (`dashboard_public_read`).
    pub public_read: bool,
}

#[derive(Clone)]
pub(crate) struct Dashboard(Arc<Inner>);

pub(crate) struct Inner {
    pub(crate) pool: PgPool,
    token: String,
    pub(crate) keys: csrf::Keys,
    pub(crate) amqp_url: String,
    pub(crate) metrics: Option<PrometheusHandle>,
    public_read: bool,
    /// The published-messages counter at the previous page view, for the publish rate.
    pub(crate) last_published: Mutex<Option<(Instant, f64)>>,
}

impl std::ops::Deref for Dashboard {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

/// The dashboard's router (empty when no admin token is configured: an unauthenticated admin
/// page must not exist by accident).
pub fn router(settings: Settings) -> Router {
    let Some(token) = settings.admin_token else {
        tracing::info!("dashboard disabled: no admin_token configured");
        return Router::new();
    };
    let state = Dashboard(Arc::new(Inner {
        pool: settings.pool,
        token,
        keys: csrf::Keys::random(),
        amqp_url: settings.amqp_url,
        metrics: settings.metrics,
        public_read: settings.public_read,
        last_published: Mutex::new(None),
    }));
    Router::new()
        .route("/dashboard", get(pages::overview))
        .route("/dashboard/style.css", get(pages::style))
        .route("/dashboard/login", get(pages::login).post(actions::login))
        .route("/dashboard/logout", post(actions::logout))
        .route("/dashboard/relay-dead/{id}", get(pages::relay_dead))
        .route("/dashboard/relay-dead/{id}/redrive", post(actions::redrive))
        .route("/dashboard/consumer-dead/{id}", get(pages::consumer_dead))
        .route(
            "/dashboard/consumer-dead/{id}/replay",
            post(actions::replay),
        )
        .route("/dashboard/prepared/{id}/resolve", post(actions::resolve))
        .route("/dashboard/notifications/{id}", get(pages::notification))
        .route(
            "/dashboard/notifications/{id}/resend",
            post(actions::resend),
        )
        .with_state(state)
}

impl Problem {
    /// 503 for a database or broker failure; the cause goes to the log, not to the browser.
    pub(crate) fn unavailable(err: impl std::fmt::Display) -> Self {
        tracing::error!(cause = %err, "dashboard request failed");
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the database or broker could not complete the request; retry later",
        )
    }
}

/// Parses a path id: a decimal `bigint`.
pub(crate) fn parse_id(raw: &str) -> Result<i64, Problem> {
    raw.parse::<i64>().map_err(|_| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "malformed id",
            format!("id must be a decimal integer, got {:?}", truncate(raw, 40)),
        )
    })
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn session_of(state: &Dashboard, headers: &HeaderMap) -> Option<csrf::Session> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|h| csrf::cookie_value(h, csrf::COOKIE))
        .and_then(|v| state.keys.verify(v, now()))
}

fn bearer_ok(state: &Dashboard, headers: &HeaderMap) -> bool {
    let mut all = headers.get_all(header::AUTHORIZATION).iter();
    match (all.next(), all.next()) {
        (Some(v), None) => v
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|given| state.token_matches(given)),
        _ => false,
    }
}

impl Inner {
    /// Compares without an early exit, so timing does not reveal how much of a guess was right.
    pub(crate) fn token_matches(&self, given: &str) -> bool {
        let (a, b) = (given.as_bytes(), self.token.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

/// Someone allowed to read the pages; `session` is set when they are logged in (and so may act).
pub(crate) struct Viewer {
    pub(crate) session: Option<csrf::Session>,
}

impl FromRequestParts<Dashboard> for Viewer {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &Dashboard) -> Result<Self, Response> {
        let session = session_of(state, &parts.headers);
        if session.is_some() || state.public_read || bearer_ok(state, &parts.headers) {
            return Ok(Viewer { session });
        }
        Err(unauthorized(&parts.headers))
    }
}

/// A logged-in operator whose request passed the origin checks. The CSRF token is in the form,
/// so the handler checks it with [`Operator::check_csrf`] once the form is parsed.
pub(crate) struct Operator {
    session: csrf::Session,
}

impl Operator {
    pub(crate) fn check_csrf(&self, state: &Dashboard, given: &str) -> Result<(), Problem> {
        if state.keys.check_csrf(&self.session, given) {
            Ok(())
        } else {
            Err(Problem::new(
                StatusCode::FORBIDDEN,
                "CSRF token refused",
                "the form's csrf token does not belong to this session; reload the page",
            ))
        }
    }
}

impl FromRequestParts<Dashboard> for Operator {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &Dashboard) -> Result<Self, Response> {
        let Some(session) = session_of(state, &parts.headers) else {
            return Err(Problem::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "log in at /dashboard/login first (actions need the session cookie)",
            )
            .into_response());
        };
        same_origin(&parts.headers).map_err(IntoResponse::into_response)?;
        Ok(Operator { session })
    }
}

/// Refuses a cross-site request by what the browser says about it. Clients that send neither
/// header (curl, scripts) still need the session cookie and the CSRF token.
pub(crate) fn same_origin(headers: &HeaderMap) -> Result<(), Problem> {
    let refuse = |detail: String| Problem::new(StatusCode::FORBIDDEN, "cross-site request", detail);
    if let Some(site) = headers.get("sec-fetch-site")
        && site.as_bytes() != b"same-origin"
    {
        return Err(refuse(format!(
            "Sec-Fetch-Site is {:?}; actions are accepted from the dashboard's own pages only",
            String::from_utf8_lossy(site.as_bytes())
        )));
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        let origin = origin.to_str().unwrap_or("");
        let matches = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            .is_some_and(|o| !host.is_empty() && o == host);
        if !matches {
            return Err(refuse(format!(
                "Origin {:?} is not this dashboard's ({host})",
                truncate(origin, 100)
            )));
        }
    }
    Ok(())
}

/// 401: the login page for a browser, a problem document for anything else.
fn unauthorized(headers: &HeaderMap) -> Response {
    let wants_html = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/html"));
    if wants_html {
        (StatusCode::UNAUTHORIZED, pages::login_page(None)).into_response()
    } else {
        Problem::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "log in at /dashboard/login, or send `Authorization: Bearer <admin token>`",
        )
        .into_response()
    }
}
