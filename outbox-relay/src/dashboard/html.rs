//! The HTML the pages are made of: escaping, the page frame, tables, buttons and the small
//! formatting helpers. Every value from the database passes through [`esc`].

use std::fmt::Write as _;

use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use chrono::{DateTime, Utc};

use super::Problem;

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
pub(super) fn exchange(name: &str) -> String {
    if name.is_empty() {
        "<i>(default)</i>".to_owned()
    } else {
        esc(name)
    }
}

pub(super) fn short(s: &str, n: usize) -> String {
    let mut t: String = s.chars().take(n).collect();
    if s.chars().count() > n {
        t.push('…');
    }
    esc(&t)
}

pub(super) fn time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

pub(super) fn opt_time(t: Option<DateTime<Utc>>) -> String {
    t.map(time).unwrap_or_else(|| "–".into())
}

pub(super) fn page(title: &str, csrf: Option<&str>, body: &str) -> Html<String> {
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

/// A button that posts `action` with the session's CSRF token (absent when not logged in).
pub(super) fn button(
    csrf: Option<&str>,
    action: &str,
    label: &str,
    class: &str,
    extra: &str,
) -> String {
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

pub(super) fn table(head: &[&str], rows: &[String], empty: &str) -> String {
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

pub(super) fn failed(err: impl std::fmt::Display) -> String {
    tracing::warn!(cause = %err, "dashboard section failed");
    "<p class=err>could not be read; see the relay's log</p>".to_owned()
}

pub(super) fn payload_text(payload: &[u8]) -> String {
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

pub(super) fn not_found(what: &str, id: i64) -> Response {
    Problem::new(
        StatusCode::NOT_FOUND,
        "not found",
        format!("no {what} with id {id}"),
    )
    .into_response()
}

pub(super) fn details(pairs: &[(&str, String)]) -> String {
    let rows: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("<th>{}</th><td>{v}</td>", esc(k)))
        .collect();
    table(&["", ""], &rows, "")
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
}
