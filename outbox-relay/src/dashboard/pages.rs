//! The read-only pages. Each section reads with its own query (or the owning crate's list
//! function) and a section whose query fails shows the error instead of failing the page.

use std::fmt::Write as _;

use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{Html, IntoResponse, Response};
use serde::Deserialize;
use sqlx::Row;

use super::html::*;
use super::publishing::publishing;
use super::sections::*;
use super::{Dashboard, Problem, Viewer, parse_id};

const STYLE: &str = include_str!("style.css");

/// `GET /dashboard/style.css`.
pub(crate) async fn style() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        STYLE,
    )
        .into_response()
}

/// The login page (also the body of a browser's 401).
pub(crate) fn login_page(error: Option<&str>) -> Html<String> {
    let error = error
        .map(|e| format!("<p class=err>{}</p>", esc(e)))
        .unwrap_or_default();
    page(
        "log in",
        None,
        &format!(
            "<section class=login><h2>Log in with the relay's admin token</h2>{error}\
             <form method=post action=/dashboard/login>\
             <label for=token>Admin token</label>\
             <input id=token name=token type=password autocomplete=current-password required>\
             <button class=go type=submit>Log in</button></form></section>"
        ),
    )
}

/// `GET /dashboard/login`.
pub(crate) async fn login() -> Html<String> {
    login_page(None)
}

#[derive(Debug, Deserialize)]
pub(crate) struct Flash {
    done: Option<String>,
    id: Option<i64>,
}

/// `GET /dashboard`: every section on one page.
pub(crate) async fn overview(
    State(state): State<Dashboard>,
    viewer: Viewer,
    Query(flash): Query<Flash>,
) -> Response {
    let csrf = viewer.session.as_ref().map(|s| state.keys.csrf_token(s));
    let csrf = csrf.as_deref();
    let mut body = String::new();
    if let (Some(done), Some(id)) = (flash.done.as_deref(), flash.id) {
        // A fixed vocabulary: nothing from the query string reaches the page as text.
        let text = match done {
            "redriven" => Some("Relay dead letter {} redriven: back in the outbox, due now."),
            "replayed" => Some("Consumer dead letter {} replayed to its queue."),
            "committed" => Some("Prepared message {} committed."),
            "rolled_back" => Some("Prepared message {} rolled back."),
            "resent" => Some("Notification {} scheduled for re-sending, due now."),
            _ => None,
        };
        if let Some(text) = text {
            let _ = write!(
                body,
                "<p class=flash role=status>{}</p>",
                text.replace("{}", &id.to_string())
            );
        }
    }
    body.push_str(&backlog(&state).await);
    body.push_str(&publishing(&state));
    body.push_str(&relay_dead_letters(&state, csrf).await);
    body.push_str(&consumer_dead_letters(&state, csrf).await);
    body.push_str(&prepared(&state, csrf).await);
    body.push_str(&notifications(&state, csrf).await);
    body.push_str(&sagas(&state).await);
    page("dashboard", csrf, &body).into_response()
}

/// `GET /dashboard/relay-dead/{id}`.
pub(crate) async fn relay_dead(
    State(state): State<Dashboard>,
    viewer: Viewer,
    Path(raw_id): Path<String>,
) -> Result<Response, Problem> {
    let id = parse_id(&raw_id)?;
    let row = sqlx::query(
        "SELECT exchange, routing_key, payload, headers::text AS headers, content_type, \
                ordering_key, dedupe_key, attempts, reason, created_at, dead_lettered_at \
         FROM outbox.dead_letters WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(&state.pool)
    .await
    .map_err(Problem::unavailable)?;
    let Some(r) = row else {
        return Ok(not_found("relay dead letter", id));
    };
    let csrf = viewer.session.as_ref().map(|s| state.keys.csrf_token(s));
    let opt = |c: &str| esc(r.get::<Option<&str>, _>(c).unwrap_or("–"));
    let body = format!(
        "<section><h2>Relay dead letter {id}</h2>{}<p>{}</p><h2>Headers</h2><pre>{}</pre>\
         <h2>Payload</h2><pre>{}</pre></section>",
        details(&[
            ("exchange", esc(r.get("exchange"))),
            ("routing key", esc(r.get("routing_key"))),
            ("content type", opt("content_type")),
            ("ordering key", opt("ordering_key")),
            ("dedupe key", opt("dedupe_key")),
            ("attempts", r.get::<i32, _>("attempts").to_string()),
            ("reason", esc(r.get("reason"))),
            ("enqueued", time(r.get("created_at"))),
            ("dead-lettered", time(r.get("dead_lettered_at"))),
        ]),
        button(
            csrf.as_deref(),
            &format!("/dashboard/relay-dead/{id}/redrive"),
            "Redrive",
            "go",
            ""
        ),
        esc(r.get("headers")),
        payload_text(r.get("payload")),
    );
    Ok(page(&format!("dead letter {id}"), csrf.as_deref(), &body).into_response())
}

/// `GET /dashboard/consumer-dead/{id}`.
pub(crate) async fn consumer_dead(
    State(state): State<Dashboard>,
    viewer: Viewer,
    Path(raw_id): Path<String>,
) -> Result<Response, Problem> {
    let id = parse_id(&raw_id)?;
    let Some(d) = consumer_lib::dead_letter::get(&state.pool, id)
        .await
        .map_err(Problem::unavailable)?
    else {
        return Ok(not_found("consumer dead letter", id));
    };
    let csrf = viewer.session.as_ref().map(|s| state.keys.csrf_token(s));
    let action = if d.replayed_at.is_none() {
        button(
            csrf.as_deref(),
            &format!("/dashboard/consumer-dead/{id}/replay"),
            "Replay",
            "go",
            "",
        )
    } else {
        String::new()
    };
    let body = format!(
        "<section><h2>Consumer dead letter {id}</h2>{}<p>{action}</p><h2>Headers</h2><pre>{}</pre>\
         <h2>Payload</h2><pre>{}</pre></section>",
        details(&[
            ("consumer", esc(&d.consumer)),
            ("queue", esc(&d.queue)),
            (
                "message id",
                d.message_id
                    .map(|m| m.to_string())
                    .unwrap_or_else(|| "–".into())
            ),
            ("exchange", esc(&d.exchange)),
            ("routing key", esc(&d.routing_key)),
            ("attempts", d.attempts.to_string()),
            ("reason", esc(&d.reason)),
            ("last error", esc(&d.last_error)),
            ("dead-lettered", time(d.dead_lettered_at)),
            ("replayed", opt_time(d.replayed_at)),
        ]),
        esc(&serde_json::to_string_pretty(&d.headers).unwrap_or_default()),
        payload_text(&d.payload),
    );
    Ok(page(
        &format!("consumer dead letter {id}"),
        csrf.as_deref(),
        &body,
    )
    .into_response())
}

/// `GET /dashboard/notifications/{id}`: the notification and every attempt.
pub(crate) async fn notification(
    State(state): State<Dashboard>,
    viewer: Viewer,
    Path(raw_id): Path<String>,
) -> Result<Response, Problem> {
    let id = parse_id(&raw_id)?;
    let Some(n) = notifier::store::get(&state.pool, id)
        .await
        .map_err(Problem::unavailable)?
    else {
        return Ok(not_found("notification", id));
    };
    let csrf = viewer.session.as_ref().map(|s| state.keys.csrf_token(s));
    let attempts: Vec<String> = n
        .attempt_log
        .iter()
        .flatten()
        .map(|a| {
            format!(
                "<td class=n>{}</td><td>{}</td><td>{}</td><td class=n>{} ms</td><td>{}</td><td>{}</td>",
                a.attempt,
                time(a.attempted_at),
                a.http_status.map(|s| s.to_string()).unwrap_or_else(|| "–".into()),
                a.latency_ms,
                if a.succeeded { "ok" } else { "failed" },
                short(a.error.as_deref().unwrap_or(""), 100),
            )
        })
        .collect();
    let body = format!(
        "<section><h2>Notification {id}</h2>{}<p>{}</p><h2>Attempts</h2>{}</section>",
        details(&[
            ("endpoint", esc(&n.endpoint)),
            ("event type", esc(&n.event_type)),
            ("status", esc(&n.status)),
            ("attempts", n.attempts.to_string()),
            ("created", time(n.created_at)),
            ("next attempt", opt_time(n.next_attempt_at)),
            ("delivered", opt_time(n.delivered_at)),
            ("given up", opt_time(n.exhausted_at)),
            ("last error", esc(n.last_error.as_deref().unwrap_or("–"))),
        ]),
        button(
            csrf.as_deref(),
            &format!("/dashboard/notifications/{id}/resend"),
            "Re-send",
            "go",
            ""
        ),
        table(
            &["#", "at", "HTTP status", "latency", "outcome", "error"],
            &attempts,
            "No attempts yet."
        ),
    );
    Ok(page(&format!("notification {id}"), csrf.as_deref(), &body).into_response())
}
