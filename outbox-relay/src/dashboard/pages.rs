//! The read-only pages. Each section reads with its own query (or the owning crate's list
//! function) and a section whose query fails shows the error instead of failing the page.

use std::fmt::Write as _;
use std::time::Instant;

use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use sqlx::Row;

use super::{Dashboard, Problem, Viewer, parse_id};

const STYLE: &str = include_str!("style.css");

/// Rows shown per table.
const ROWS: i64 = 50;

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

/// Escapes text for HTML element content and quoted attribute values.
pub(crate) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// An exchange name for display: the default exchange's empty name is shown as such.
fn exchange(name: &str) -> String {
    if name.is_empty() {
        "<i>(default)</i>".to_owned()
    } else {
        esc(name)
    }
}

fn short(s: &str, n: usize) -> String {
    let mut t: String = s.chars().take(n).collect();
    if s.chars().count() > n {
        t.push('…');
    }
    esc(&t)
}

fn time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

fn opt_time(t: Option<DateTime<Utc>>) -> String {
    t.map(time).unwrap_or_else(|| "–".into())
}

fn page(title: &str, csrf: Option<&str>, body: &str) -> Html<String> {
    let logout = match csrf {
        Some(token) => format!(
            "<form class=inline method=post action=/dashboard/logout>\
             <input type=hidden name=csrf value=\"{}\"><button>Log out</button></form>",
            esc(token)
        ),
        None => "<a href=/dashboard/login>Log in</a>".to_owned(),
    };
    Html(format!(
        "<!doctype html><html lang=en><head><meta charset=utf-8>\
         <meta name=viewport content=\"width=device-width,initial-scale=1\">\
         <title>{title} · outbox-relay</title><link rel=stylesheet href=/dashboard/style.css>\
         </head><body><header><h1><a href=/dashboard style=\"color:#fff;text-decoration:none\">\
         outbox-relay</a> · {title}</h1>{logout}</header><main>{body}</main></body></html>",
        title = esc(title)
    ))
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

/// A button that posts `action` with the session's CSRF token (absent when not logged in).
fn button(csrf: Option<&str>, action: &str, label: &str, class: &str, extra: &str) -> String {
    match csrf {
        Some(token) => format!(
            "<form class=inline method=post action=\"{}\"><input type=hidden name=csrf value=\"{}\">\
             {extra}<button class={class}>{}</button></form>",
            esc(action),
            esc(token),
            esc(label)
        ),
        None => String::new(),
    }
}

fn table(head: &[&str], rows: &[String], empty: &str) -> String {
    if rows.is_empty() {
        return format!("<p class=empty>{}</p>", esc(empty));
    }
    let mut out = String::from("<table><tr>");
    for h in head {
        let _ = write!(out, "<th>{}</th>", esc(h));
    }
    out.push_str("</tr>");
    for r in rows {
        let _ = write!(out, "<tr>{r}</tr>");
    }
    out.push_str("</table>");
    out
}

fn failed(err: impl std::fmt::Display) -> String {
    tracing::warn!(cause = %err, "dashboard section failed");
    "<p class=err>could not be read; see the relay's log</p>".to_owned()
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

async fn backlog(state: &Dashboard) -> String {
    let rows = sqlx::query(
        "SELECT exchange, \
                count(*) FILTER (WHERE available_at <= now()) AS due_now, \
                count(*) FILTER (WHERE available_at > now()) AS due_later, \
                extract(epoch FROM now() - min(available_at) FILTER (WHERE available_at <= now()))::float8 AS oldest, \
                min(available_at) FILTER (WHERE available_at > now()) AS next_due \
         FROM outbox.messages GROUP BY exchange ORDER BY count(*) DESC, exchange LIMIT 100",
    )
    .fetch_all(&state.pool)
    .await;
    let inner = match rows {
        Ok(rows) => {
            let rows: Vec<String> = rows
                .iter()
                .map(|r| {
                    let name: String = r.get("exchange");
                    let oldest: Option<f64> = r.get("oldest");
                    let next: Option<DateTime<Utc>> = r.get("next_due");
                    format!(
                        "<td>{}</td><td class=n>{}</td><td class=n>{}</td><td class=n>{}</td><td>{}</td>",
                        exchange(&name),
                        r.get::<i64, _>("due_now"),
                        r.get::<i64, _>("due_later"),
                        oldest.map(|s| format!("{s:.1} s")).unwrap_or_else(|| "–".into()),
                        opt_time(next),
                    )
                })
                .collect();
            table(
                &[
                    "exchange",
                    "due now",
                    "due later",
                    "oldest due for",
                    "next due later",
                ],
                &rows,
                "The outbox is empty.",
            )
        }
        Err(err) => failed(err),
    };
    format!("<section id=backlog><h2>Outbox backlog by exchange</h2>{inner}</section>")
}

/// One sample of a Prometheus text exposition: `name{labels} value`.
fn samples(text: &str) -> impl Iterator<Item = (&str, &str, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let value: f64 = value.parse().ok()?;
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            Some((name, labels, value))
        })
}

/// The upper bound of the bucket holding quantile `q` of a histogram, from its `le` buckets.
fn quantile(text: &str, name: &str, q: f64) -> Option<f64> {
    let bucket = format!("{name}_bucket");
    let mut buckets: Vec<(f64, f64)> = samples(text)
        .filter(|(n, _, _)| *n == bucket)
        .filter_map(|(_, labels, v)| {
            let le = labels.split(',').find_map(|l| l.strip_prefix("le=\""))?;
            let le = le.trim_end_matches('"');
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, v))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    buckets
        .iter()
        .find(|(_, count)| *count >= q * total)
        .map(|(le, _)| *le)
}

fn sum(text: &str, name: &str) -> f64 {
    samples(text)
        .filter(|(n, _, _)| *n == name)
        .map(|(_, _, v)| v)
        .sum()
}

fn seconds(s: Option<f64>) -> String {
    match s {
        Some(s) if s.is_infinite() => "&gt; 10 s".into(),
        Some(s) if s < 1.0 => format!("≤ {:.1} ms", s * 1000.0),
        Some(s) => format!("≤ {s:.1} s"),
        None => "–".into(),
    }
}

fn publishing(state: &Dashboard) -> String {
    let Some(handle) = &state.metrics else {
        return "<section id=publishing><h2>Publishing</h2>\
                <p class=empty>Metrics are not installed in this process.</p></section>"
            .into();
    };
    let text = handle.render();
    let published = sum(&text, "outbox_relay_published_total");
    let failed_attempts = sum(&text, "outbox_relay_failed_attempts_total");
    let dead = sum(&text, "outbox_relay_dead_lettered_total");
    let now = Instant::now();
    let rate = {
        let mut last = state
            .last_published
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let rate = last.and_then(|(at, before)| {
            let dt = now.duration_since(at).as_secs_f64();
            (dt >= 0.5).then(|| (published - before).max(0.0) / dt)
        });
        // Keep the older sample until half a second has passed, so quick reloads still measure.
        if rate.is_some() || last.is_none() {
            *last = Some((now, published));
        }
        rate
    };
    let latency = "outbox_relay_enqueue_to_confirm_seconds";
    let count = sum(&text, &format!("{latency}_count"));
    let mean = (count > 0.0).then(|| sum(&text, &format!("{latency}_sum")) / count);
    let fig = |value: String, label: &str| {
        format!(
            "<div class=fig><b>{value}</b><span>{}</span></div>",
            esc(label)
        )
    };
    format!(
        "<section id=publishing><h2>Publishing (this relay process)</h2><div class=figs>{}{}{}{}{}{}{}</div></section>",
        fig(
            rate.map(|r| format!("{r:.1}/s"))
                .unwrap_or_else(|| "–".into()),
            "publish rate since the last view"
        ),
        fig(format!("{published:.0}"), "published since start"),
        fig(format!("{failed_attempts:.0}"), "failed attempts"),
        fig(format!("{dead:.0}"), "dead-lettered"),
        fig(
            mean.map(|m| format!("{:.1} ms", m * 1000.0))
                .unwrap_or_else(|| "–".into()),
            "mean enqueue → confirm"
        ),
        fig(
            seconds(quantile(&text, latency, 0.5)),
            "p50 enqueue → confirm"
        ),
        fig(
            seconds(quantile(&text, latency, 0.99)),
            "p99 enqueue → confirm"
        ),
    )
}

async fn relay_dead_letters(state: &Dashboard, csrf: Option<&str>) -> String {
    let inner = match (
        crate::admin::list_dead(&state.pool, ROWS).await,
        crate::admin::dead_count(&state.pool).await,
    ) {
        (Ok(list), Ok(count)) => {
            let rows: Vec<String> = list
                .iter()
                .map(|d| {
                    format!(
                        "<td><a href=/dashboard/relay-dead/{id}>{id}</a></td><td>{}</td><td>{}</td>\
                         <td class=n>{}</td><td>{}</td><td>{}</td><td>{}</td>",
                        exchange(&d.exchange),
                        esc(&d.routing_key),
                        d.attempts,
                        short(&d.reason, 80),
                        time(d.dead_lettered_at),
                        button(
                            csrf,
                            &format!("/dashboard/relay-dead/{}/redrive", d.id),
                            "Redrive",
                            "go",
                            ""
                        ),
                        id = d.id,
                    )
                })
                .collect();
            format!(
                "<p>{count} in <code>outbox.dead_letters</code>{}.</p>{}",
                if count > ROWS {
                    format!(", newest {ROWS} shown")
                } else {
                    String::new()
                },
                table(
                    &[
                        "id",
                        "exchange",
                        "routing key",
                        "attempts",
                        "reason",
                        "dead-lettered",
                        ""
                    ],
                    &rows,
                    "No dead letters."
                )
            )
        }
        (Err(err), _) | (_, Err(err)) => failed(err),
    };
    format!("<section id=relay-dead><h2>Relay dead letters</h2>{inner}</section>")
}

async fn consumer_dead_letters(state: &Dashboard, csrf: Option<&str>) -> String {
    let inner = match consumer_lib::dead_letter::list(&state.pool, None, false, ROWS).await {
        Ok(list) => {
            let rows: Vec<String> = list
                .iter()
                .map(|d| {
                    format!(
                        "<td><a href=/dashboard/consumer-dead/{id}>{id}</a></td><td>{}</td><td>{}</td>\
                         <td>{}</td><td>{}</td><td class=n>{}</td><td>{}</td><td>{}</td><td>{}</td>",
                        esc(&d.consumer),
                        esc(&d.queue),
                        d.message_id.map(|m| m.to_string()).unwrap_or_else(|| "–".into()),
                        esc(&d.reason),
                        d.attempts,
                        short(&d.last_error, 80),
                        time(d.dead_lettered_at),
                        button(
                            csrf,
                            &format!("/dashboard/consumer-dead/{}/replay", d.id),
                            "Replay",
                            "go",
                            ""
                        ),
                        id = d.id,
                    )
                })
                .collect();
            table(
                &[
                    "id",
                    "consumer",
                    "queue",
                    "message id",
                    "reason",
                    "attempts",
                    "last error",
                    "dead-lettered",
                    "",
                ],
                &rows,
                "No consumer dead letters waiting.",
            )
        }
        Err(err) => failed(err),
    };
    format!(
        "<section id=consumer-dead><h2>Consumer dead letters (<code>inbox.compensation_log</code>)</h2>{inner}</section>"
    )
}

async fn prepared(state: &Dashboard, csrf: Option<&str>) -> String {
    let rows = sqlx::query(
        "SELECT id, exchange, routing_key, state, check_url, check_attempts, last_check_error, \
                created_at, next_check_at \
         FROM outbox.prepared_messages ORDER BY (state = 'unresolved') DESC, created_at, id LIMIT $1",
    )
    .bind(ROWS)
    .fetch_all(&state.pool)
    .await;
    let counts = crate::checkback::counts(&state.pool).await;
    let inner = match (rows, counts) {
        (Ok(rows), Ok(counts)) => {
            let rows: Vec<String> = rows
                .iter()
                .map(|r| {
                    let id: i64 = r.get("id");
                    let action = format!("/dashboard/prepared/{id}/resolve");
                    format!(
                        "<td>{id}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=n>{}</td>\
                         <td>{}</td><td>{}</td><td>{} {}</td>",
                        exchange(r.get("exchange")),
                        esc(r.get("routing_key")),
                        esc(r.get("state")),
                        esc(r.get::<Option<&str>, _>("check_url").unwrap_or("–")),
                        r.get::<i32, _>("check_attempts"),
                        short(r.get::<Option<&str>, _>("last_check_error").unwrap_or("–"), 60),
                        time(r.get("created_at")),
                        button(
                            csrf,
                            &action,
                            "Commit",
                            "go",
                            "<input type=hidden name=decision value=commit>"
                        ),
                        button(
                            csrf,
                            &action,
                            "Roll back",
                            "stop",
                            "<input type=hidden name=decision value=rollback>"
                        ),
                    )
                })
                .collect();
            format!(
                "<p>{} waiting for a decision, {} unresolved (checks used up){}.</p>{}",
                counts.pending,
                counts.unresolved,
                counts
                    .oldest_age_seconds
                    .map(|s| format!("; oldest {s:.0} s old"))
                    .unwrap_or_default(),
                table(
                    &[
                        "id",
                        "exchange",
                        "routing key",
                        "state",
                        "check url",
                        "checks",
                        "last check error",
                        "prepared",
                        "resolve"
                    ],
                    &rows,
                    "No prepared messages waiting."
                )
            )
        }
        (Err(err), _) | (_, Err(err)) => failed(err),
    };
    format!("<section id=prepared><h2>Prepared messages</h2>{inner}</section>")
}

async fn notifications(state: &Dashboard, csrf: Option<&str>) -> String {
    let endpoints = sqlx::query(
        "SELECT e.id, e.url, e.enabled, e.circuit_open_until, \
                count(n.id) FILTER (WHERE n.status = 'pending') AS pending, \
                count(n.id) FILTER (WHERE n.status = 'delivered') AS delivered, \
                count(n.id) FILTER (WHERE n.status = 'exhausted') AS exhausted, \
                coalesce(sum(n.attempts), 0)::bigint AS attempts \
         FROM notify.endpoints e LEFT JOIN notify.notifications n ON n.endpoint_id = e.id \
         GROUP BY e.id ORDER BY e.id LIMIT 100",
    )
    .fetch_all(&state.pool)
    .await;
    // Those needing attention: given up on, or still failing.
    let troubled = sqlx::query(
        "SELECT id, endpoint_id, event_type, status, attempts, last_error, next_attempt_at, created_at \
         FROM notify.notifications \
         WHERE status = 'exhausted' OR (status = 'pending' AND attempts > 0) \
         ORDER BY created_at DESC, id DESC LIMIT $1",
    )
    .bind(ROWS)
    .fetch_all(&state.pool)
    .await;
    let inner = match (endpoints, troubled) {
        (Ok(endpoints), Ok(troubled)) => {
            let erows: Vec<String> = endpoints
                .iter()
                .map(|r| {
                    let open: Option<DateTime<Utc>> = r.get("circuit_open_until");
                    let circuit = match open {
                        Some(t) if t > Utc::now() => format!("open until {}", time(t)),
                        _ if !r.get::<bool, _>("enabled") => "disabled".into(),
                        _ => "closed".into(),
                    };
                    format!(
                        "<td>{}</td><td>{}</td><td>{circuit}</td><td class=n>{}</td><td class=n>{}</td>\
                         <td class=n>{}</td><td class=n>{}</td>",
                        esc(r.get("id")),
                        short(r.get("url"), 60),
                        r.get::<i64, _>("pending"),
                        r.get::<i64, _>("delivered"),
                        r.get::<i64, _>("exhausted"),
                        r.get::<i64, _>("attempts"),
                    )
                })
                .collect();
            let nrows: Vec<String> = troubled
                .iter()
                .map(|r| {
                    let id: i64 = r.get("id");
                    format!(
                        "<td><a href=/dashboard/notifications/{id}>{id}</a></td><td>{}</td><td>{}</td>\
                         <td>{}</td><td class=n>{}</td><td>{}</td><td>{}</td><td>{}</td>",
                        esc(r.get("endpoint_id")),
                        esc(r.get("event_type")),
                        esc(r.get("status")),
                        r.get::<i32, _>("attempts"),
                        short(r.get::<Option<&str>, _>("last_error").unwrap_or("–"), 60),
                        opt_time(r.get("next_attempt_at")),
                        button(
                            csrf,
                            &format!("/dashboard/notifications/{id}/resend"),
                            "Re-send",
                            "go",
                            ""
                        ),
                    )
                })
                .collect();
            format!(
                "{}<h2>Failing or given up</h2>{}",
                table(
                    &[
                        "endpoint",
                        "url",
                        "circuit",
                        "pending",
                        "delivered",
                        "exhausted",
                        "attempts"
                    ],
                    &erows,
                    "No endpoints."
                ),
                table(
                    &[
                        "id",
                        "endpoint",
                        "event",
                        "status",
                        "attempts",
                        "last error",
                        "next attempt",
                        ""
                    ],
                    &nrows,
                    "No failing notifications."
                )
            )
        }
        (Err(err), _) | (_, Err(err)) => failed(err),
    };
    format!("<section id=notifications><h2>Notifications by endpoint</h2>{inner}</section>")
}

/// Shown only where the saga migration ran: the dashboard must work on databases without it.
async fn sagas(state: &Dashboard) -> String {
    let exists: Result<bool, _> =
        sqlx::query_scalar("SELECT to_regclass('saga.instances') IS NOT NULL")
            .fetch_one(&state.pool)
            .await;
    match exists {
        Ok(true) => {}
        Ok(false) => return String::new(),
        Err(err) => return failed(err),
    }
    let rows = sqlx::query(
        "SELECT id, name, state, current_step, coalesce(stuck_reason, failure_reason) AS why, updated_at \
         FROM saga.instances WHERE state NOT IN ('completed', 'compensated') \
         ORDER BY (state = 'stuck') DESC, updated_at DESC LIMIT $1",
    )
    .bind(ROWS)
    .fetch_all(&state.pool)
    .await;
    let counts = sqlx::query(
        "SELECT state, count(*) AS n FROM saga.instances GROUP BY state ORDER BY state",
    )
    .fetch_all(&state.pool)
    .await;
    let inner = match (rows, counts) {
        (Ok(rows), Ok(counts)) => {
            let summary: Vec<String> = counts
                .iter()
                .map(|r| format!("{} {}", r.get::<i64, _>("n"), esc(r.get("state"))))
                .collect();
            let rows: Vec<String> = rows
                .iter()
                .map(|r| {
                    format!(
                        "<td>{}</td><td>{}</td><td>{}</td><td class=n>{}</td><td>{}</td><td>{}</td>",
                        r.get::<i64, _>("id"),
                        esc(r.get("name")),
                        esc(r.get("state")),
                        r.get::<i32, _>("current_step"),
                        short(r.get::<Option<&str>, _>("why").unwrap_or("–"), 80),
                        time(r.get("updated_at")),
                    )
                })
                .collect();
            format!(
                "<p>{}</p>{}",
                if summary.is_empty() {
                    "No sagas.".to_owned()
                } else {
                    summary.join(", ")
                },
                table(
                    &["id", "name", "state", "step", "why", "updated"],
                    &rows,
                    "No saga running, compensating or stuck."
                )
            )
        }
        (Err(err), _) | (_, Err(err)) => failed(err),
    };
    format!("<section id=sagas><h2>Sagas</h2>{inner}</section>")
}

fn payload_text(payload: &[u8]) -> String {
    const MAX: usize = 64 * 1024;
    let shown = &payload[..payload.len().min(MAX)];
    let text = String::from_utf8_lossy(shown);
    let pretty = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or_else(|| text.into_owned());
    let more = if payload.len() > MAX {
        format!("\n… {} more bytes", payload.len() - MAX)
    } else {
        String::new()
    };
    esc(&(pretty + &more))
}

fn not_found(what: &str, id: i64) -> Response {
    Problem::new(
        StatusCode::NOT_FOUND,
        "not found",
        format!("no {what} with id {id}"),
    )
    .into_response()
}

fn details(pairs: &[(&str, String)]) -> String {
    let rows: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("<th>{}</th><td>{v}</td>", esc(k)))
        .collect();
    table(&["", ""], &rows, "")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_is_escaped() {
        assert_eq!(
            esc("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }

    #[test]
    fn quantile_reads_cumulative_buckets() {
        let text = "# TYPE h histogram\n\
                    h_bucket{le=\"0.001\"} 10\n\
                    h_bucket{le=\"0.01\"} 90\n\
                    h_bucket{le=\"0.1\"} 100\n\
                    h_bucket{le=\"+Inf\"} 100\n\
                    h_sum 0.5\nh_count 100\n";
        assert_eq!(quantile(text, "h", 0.5), Some(0.01));
        assert_eq!(quantile(text, "h", 0.99), Some(0.1));
        assert_eq!(quantile(text, "none", 0.5), None);
        assert_eq!(sum(text, "h_count"), 100.0);
    }
}
