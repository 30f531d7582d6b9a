//! The overview's sections, one query each (or the owning crate's list function); a section
//! whose query fails shows the error instead of failing the page.

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::Dashboard;

use super::html::*;

/// Rows shown per table.
pub(super) const ROWS: i64 = 50;

pub(super) async fn backlog(state: &Dashboard) -> String {
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
pub(super) async fn relay_dead_letters(state: &Dashboard, csrf: Option<&str>) -> String {
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

pub(super) async fn consumer_dead_letters(state: &Dashboard, csrf: Option<&str>) -> String {
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

pub(super) async fn prepared(state: &Dashboard, csrf: Option<&str>) -> String {
    let rows = sqlx::query(
        "SELECT id, exchange, routing_key, state, check_url, check_attempts, last_check_error, \
                created_at, next_check_at \
         FROM outbox.prepared_messages ORDER BY (state = 'unresolved') DESC, created_at, id LIMIT $1",
    )
    .bind(ROWS)
    .fetch_all(&state.pool)
    .await;
    let counts = crate::prepared::checkback::counts(&state.pool).await;
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

pub(super) async fn notifications(state: &Dashboard, csrf: Option<&str>) -> String {
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
pub(super) async fn sagas(state: &Dashboard) -> String {
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
