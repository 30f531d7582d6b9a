//! Every query the notifier makes: claim, record an attempt, and the reads behind the API.
//! Transactions are short and never span an HTTP request: a claim moves the row's due time
//! forward by a lease and commits; the outcome is recorded in a second transaction.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgPool, Row};

use crate::Error;

/// A claimed notification with everything needed to deliver it.
#[derive(Debug, Clone)]
pub struct Job {
    /// Notification id (the `Webhook-Id`).
    pub id: i64,
    /// Proves the claim when recording; a stale holder's record is ignored.
    pub claim_token: i64,
    /// The endpoint's id.
    pub endpoint_id: String,
    /// Where to POST.
    pub url: String,
    /// Secrets that sign: the current one, then the previous one while it is valid.
    pub secrets: Vec<String>,
    /// Body the receiver must answer with, if any.
    pub required_body: Option<String>,
    /// The endpoint's own schedule in ms, if any.
    pub schedule_ms: Option<Vec<i32>>,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Event type.
    pub event_type: String,
    /// Body bytes.
    pub body: Vec<u8>,
    /// Body content type.
    pub content_type: String,
    /// Attempts made before this one.
    pub attempts: i32,
    /// Failed attempts in the current round (position in the schedule).
    pub step: i32,
    /// The W3C trace context stored with the notification, if any.
    pub traceparent: Option<String>,
    /// Its `tracestate`.
    pub tracestate: Option<String>,
}

/// Claims up to `batch` due notifications for `lease`.
pub async fn claim(pool: &PgPool, batch: usize, lease: Duration) -> Result<Vec<Job>, Error> {
    let mut tx = pool.begin().await?;
    let claimed: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT id, claim_token FROM notify.claim($1, $2 * interval '1 millisecond')",
    )
    .bind(batch as i32)
    .bind(lease.as_millis() as f64)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    if claimed.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<i64> = claimed.iter().map(|c| c.0).collect();
    let tokens: Vec<i64> = claimed.iter().map(|c| c.1).collect();
    let mut tx = pool.begin().await?;
    let rows = sqlx::query(
        "SELECT n.id, c.token, n.endpoint_id, e.url, e.secret, \
                CASE WHEN e.previous_secret_expires_at > now() THEN e.previous_secret END AS previous_secret, \
                e.required_body, e.schedule_ms, e.timeout_ms, n.event_type, n.body, n.content_type, \
                n.attempts, n.step, n.traceparent, n.tracestate \
         FROM unnest($1::bigint[], $2::bigint[]) AS c(id, token) \
         JOIN notify.notifications n ON n.id = c.id \
         JOIN notify.endpoints e ON e.id = n.endpoint_id \
         ORDER BY n.next_attempt_at",
    )
    .bind(&ids)
    .bind(&tokens)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    rows.into_iter()
        .map(|r| {
            let mut secrets = vec![r.try_get::<String, _>("secret")?];
            if let Some(p) = r.try_get::<Option<String>, _>("previous_secret")? {
                secrets.push(p);
            }
            Ok(Job {
                id: r.try_get("id")?,
                claim_token: r.try_get("token")?,
                endpoint_id: r.try_get("endpoint_id")?,
                url: r.try_get("url")?,
                secrets,
                required_body: r.try_get("required_body")?,
                schedule_ms: r.try_get("schedule_ms")?,
                timeout: Duration::from_millis(r.try_get::<i32, _>("timeout_ms")?.max(1) as u64),
                event_type: r.try_get("event_type")?,
                body: r.try_get("body")?,
                content_type: r.try_get("content_type")?,
                attempts: r.try_get("attempts")?,
                step: r.try_get("step")?,
                traceparent: r.try_get("traceparent")?,
                tracestate: r.try_get("tracestate")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(Error::from)
}

/// The result of one HTTP attempt.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// When the request started.
    pub started_at: DateTime<Utc>,
    /// The response status, if one came.
    pub http_status: Option<u16>,
    /// Time until the response (or failure).
    pub latency: Duration,
    /// Acknowledged: 2xx (and the required body, if any).
    pub succeeded: bool,
    /// Why it failed.
    pub error: Option<String>,
    /// The start of the response body.
    pub response_body: Option<String>,
    /// The receiver's `Retry-After`, if it sent one.
    pub retry_after: Option<Duration>,
    /// Whether the endpoint looked alive (any answer except 5xx and 429): feeds the circuit.
    pub responsive: bool,
}

/// What happens after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Acknowledged.
    Delivered,
    /// Try again after this wait.
    RetryAfter(Duration),
    /// The schedule is used up.
    Exhausted,
}

/// Where the `notification.exhausted` event goes, and the circuit settings.
#[derive(Debug, Clone)]
pub struct RecordSettings {
    /// Exchange of the exhausted event.
    pub exhausted_exchange: String,
    /// Routing key of the exhausted event.
    pub exhausted_routing_key: String,
    /// Failures in a row that open an endpoint's circuit.
    pub breaker_threshold: u32,
    /// How long it stays open (already scaled).
    pub breaker_cooldown: Duration,
}

/// Records `attempt` of `job` and moves the notification on as `next` says, in one transaction:
/// the attempt row, the notification's new state, the endpoint's circuit and, when exhausted,
/// the outbox event. Returns false when the claim was lost (lease ran out, re-sent): the attempt
/// is still logged, the state is left to the current holder.
pub async fn record(
    pool: &PgPool,
    job: &Job,
    attempt: &Attempt,
    next: Next,
    settings: &RecordSettings,
) -> Result<bool, Error> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO notify.attempts (notification_id, attempt_no, attempted_at, http_status, \
             latency_ms, succeeded, error, response_body) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(job.id)
    .bind(job.attempts + 1)
    .bind(attempt.started_at)
    .bind(attempt.http_status.map(i32::from))
    .bind(attempt.latency.as_millis().min(i32::MAX as u128) as i32)
    .bind(attempt.succeeded)
    .bind(&attempt.error)
    .bind(&attempt.response_body)
    .execute(&mut *tx)
    .await?;

    let updated = match next {
        Next::Delivered => sqlx::query(
            "UPDATE notify.notifications SET status = 'delivered', delivered_at = now(), \
                 attempts = attempts + 1, next_attempt_at = NULL, claimed_until = NULL, \
                 last_error = NULL \
             WHERE id = $1 AND claim_token = $2 AND status = 'pending'",
        )
        .bind(job.id)
        .bind(job.claim_token)
        .execute(&mut *tx)
        .await?
        .rows_affected(),
        Next::RetryAfter(wait) => sqlx::query(
            "UPDATE notify.notifications SET attempts = attempts + 1, step = step + 1, \
                 next_attempt_at = now() + $3 * interval '1 millisecond', claimed_until = NULL, \
                 last_error = $4 \
             WHERE id = $1 AND claim_token = $2 AND status = 'pending'",
        )
        .bind(job.id)
        .bind(job.claim_token)
        .bind(wait.as_secs_f64() * 1000.0)
        .bind(&attempt.error)
        .execute(&mut *tx)
        .await?
        .rows_affected(),
        Next::Exhausted => {
            let n = sqlx::query(
                "UPDATE notify.notifications SET status = 'exhausted', exhausted_at = now(), \
                     attempts = attempts + 1, step = step + 1, next_attempt_at = NULL, \
                     claimed_until = NULL, last_error = $3 \
                 WHERE id = $1 AND claim_token = $2 AND status = 'pending'",
            )
            .bind(job.id)
            .bind(job.claim_token)
            .bind(&attempt.error)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if n == 1 {
                // The event commits with the state change, so "exhausted" and its event are one
                // fact: never one without the other. Ids are strings: they exceed 2^53.
                let payload = serde_json::json!({
                    "notification_id": job.id.to_string(),
                    "endpoint": job.endpoint_id,
                    "event_type": job.event_type,
                    "attempts": job.attempts + 1,
                    "last_error": attempt.error,
                    "exhausted_at": Utc::now(),
                });
                let headers = serde_json::json!({
                    "event_type": "notification.exhausted",
                    "notification_id": job.id.to_string(),
                });
                sqlx::query(
                    "SELECT outbox.enqueue(exchange => $1, routing_key => $2, payload => $3, \
                         headers => $4, dedupe_key => $5)",
                )
                .bind(&settings.exhausted_exchange)
                .bind(&settings.exhausted_routing_key)
                .bind(serde_json::to_vec(&payload).expect("JSON value serialises"))
                .bind(headers)
                .bind(format!(
                    "notification.exhausted:{}:{}",
                    job.id,
                    job.attempts + 1
                ))
                .execute(&mut *tx)
                .await?;
            }
            n
        }
    };

    if updated == 1 {
        if attempt.responsive {
            sqlx::query(
                "UPDATE notify.endpoints SET consecutive_failures = 0, circuit_open_until = NULL \
                 WHERE id = $1 AND (consecutive_failures <> 0 OR circuit_open_until IS NOT NULL)",
            )
            .bind(&job.endpoint_id)
            .execute(&mut *tx)
            .await?;
        } else {
            sqlx::query(
                "UPDATE notify.endpoints SET consecutive_failures = consecutive_failures + 1, \
                     circuit_open_until = CASE WHEN consecutive_failures + 1 >= $2 \
                         THEN now() + $3 * interval '1 millisecond' ELSE circuit_open_until END \
                 WHERE id = $1",
            )
            .bind(&job.endpoint_id)
            .bind(settings.breaker_threshold as i32)
            .bind(settings.breaker_cooldown.as_secs_f64() * 1000.0)
            .execute(&mut *tx)
            .await?;
        }
    }
    tx.commit().await?;
    Ok(updated == 1)
}

/// One attempt as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct AttemptView {
    /// 1 for the first.
    pub attempt: i32,
    /// When it started.
    pub attempted_at: DateTime<Utc>,
    /// The response status, if any.
    pub http_status: Option<i32>,
    /// Milliseconds until the answer or failure.
    pub latency_ms: i32,
    /// Acknowledged.
    pub succeeded: bool,
    /// Why it failed.
    pub error: Option<String>,
}

/// A notification as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct NotificationView {
    /// Id as a decimal string (the `Webhook-Id`; larger than 2^53).
    pub id: String,
    /// Endpoint id.
    pub endpoint: String,
    /// Event type.
    pub event_type: String,
    /// `pending`, `delivered` or `exhausted`.
    pub status: String,
    /// Attempts made.
    pub attempts: i32,
    /// The dedupe key, if any.
    pub dedupe_key: Option<String>,
    /// Body content type.
    pub content_type: String,
    /// The body: JSON when it is JSON, else a string when UTF-8, else `body_base64`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<serde_json::Value>,
    /// The body in base64 when it is not UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_base64: Option<String>,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Next attempt due (pending only).
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// Acknowledged at.
    pub delivered_at: Option<DateTime<Utc>>,
    /// Given up at.
    pub exhausted_at: Option<DateTime<Utc>>,
    /// The last failure.
    pub last_error: Option<String>,
    /// Every attempt (only in the single-notification view).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt_log: Option<Vec<AttemptView>>,
}

const VIEW_COLUMNS: &str = "id, endpoint_id, event_type, status, attempts, dedupe_key, content_type, \
     body, created_at, next_attempt_at, delivered_at, exhausted_at, last_error";

fn view(r: &sqlx::postgres::PgRow, with_body: bool) -> Result<NotificationView, sqlx::Error> {
    let (body, body_base64) = if with_body {
        let raw: Vec<u8> = r.try_get("body")?;
        match std::str::from_utf8(&raw) {
            Ok(text) => match serde_json::from_str::<serde_json::Value>(text) {
                Ok(v) => (Some(v), None),
                Err(_) => (Some(serde_json::Value::String(text.to_owned())), None),
            },
            Err(_) => {
                use base64::Engine;
                (
                    None,
                    Some(base64::engine::general_purpose::STANDARD.encode(&raw)),
                )
            }
        }
    } else {
        (None, None)
    };
    Ok(NotificationView {
        id: r.try_get::<i64, _>("id")?.to_string(),
        endpoint: r.try_get("endpoint_id")?,
        event_type: r.try_get("event_type")?,
        status: r.try_get("status")?,
        attempts: r.try_get("attempts")?,
        dedupe_key: r.try_get("dedupe_key")?,
        content_type: r.try_get("content_type")?,
        body,
        body_base64,
        created_at: r.try_get("created_at")?,
        next_attempt_at: r.try_get("next_attempt_at")?,
        delivered_at: r.try_get("delivered_at")?,
        exhausted_at: r.try_get("exhausted_at")?,
        last_error: r.try_get("last_error")?,
        attempt_log: None,
    })
}

/// One notification with its attempts.
pub async fn get(pool: &PgPool, id: i64) -> Result<Option<NotificationView>, Error> {
    let sql = format!("SELECT {VIEW_COLUMNS} FROM notify.notifications WHERE id = $1");
    // Both reads in one transaction: behind PgBouncer's transaction mode a statement with
    // arguments must not run outside one (outbox::pool).
    let mut tx = pool.begin().await?;
    // VIEW_COLUMNS is a constant list of column names.
    let Some(row) = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
    else {
        tx.commit().await?;
        return Ok(None);
    };
    let mut v = view(&row, true)?;
    let attempts = sqlx::query(
        "SELECT attempt_no, attempted_at, http_status, latency_ms, succeeded, error \
         FROM notify.attempts WHERE notification_id = $1 ORDER BY attempt_no, id",
    )
    .bind(id)
    .fetch_all(&mut *tx)
    .await?
    .iter()
    .map(|r| {
        Ok(AttemptView {
            attempt: r.try_get("attempt_no")?,
            attempted_at: r.try_get("attempted_at")?,
            http_status: r.try_get("http_status")?,
            latency_ms: r.try_get("latency_ms")?,
            succeeded: r.try_get("succeeded")?,
            error: r.try_get("error")?,
        })
    })
    .collect::<Result<Vec<_>, sqlx::Error>>()?;
    tx.commit().await?;
    v.attempt_log = Some(attempts);
    Ok(Some(v))
}

/// A reconciliation query.
#[derive(Debug, Clone)]
pub struct ListQuery {
    /// The endpoint.
    pub endpoint: String,
    /// Created at or after.
    pub since: Option<DateTime<Utc>>,
    /// Created before.
    pub until: Option<DateTime<Utc>>,
    /// Only this status.
    pub status: Option<String>,
    /// At most this many (1..=1000).
    pub limit: i64,
    /// Continue after this `(created_at, id)` position (the previous page's `next_cursor`).
    pub after: Option<(DateTime<Utc>, i64)>,
}

/// Notifications of one endpoint in creation order, for a receiver to reconcile.
pub async fn list(pool: &PgPool, q: &ListQuery) -> Result<Vec<NotificationView>, Error> {
    let sql = format!(
        "SELECT {VIEW_COLUMNS} FROM notify.notifications \
         WHERE endpoint_id = $1 \
           AND ($2::timestamptz IS NULL OR created_at >= $2) \
           AND ($3::timestamptz IS NULL OR created_at < $3) \
           AND ($4::text IS NULL OR status = $4) \
           AND ($5::timestamptz IS NULL OR (created_at, id) > ($5, $6)) \
         ORDER BY created_at, id LIMIT $7"
    );
    let mut tx = pool.begin().await?;
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(&q.endpoint)
        .bind(q.since)
        .bind(q.until)
        .bind(&q.status)
        .bind(q.after.map(|a| a.0))
        .bind(q.after.map(|a| a.1).unwrap_or(0))
        .bind(q.limit)
        .fetch_all(&mut *tx)
        .await?;
    tx.commit().await?;
    rows.iter()
        .map(|r| view(r, true))
        .collect::<Result<_, _>>()
        .map_err(Error::from)
}

/// The endpoint of a notification, if it exists.
pub async fn endpoint_of(pool: &PgPool, id: i64) -> Result<Option<String>, Error> {
    let mut tx = pool.begin().await?;
    let endpoint = sqlx::query_scalar("SELECT endpoint_id FROM notify.notifications WHERE id = $1")
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(endpoint)
}

/// Puts a notification back on a fresh schedule, due now. A pending one in flight keeps its
/// claim (so it is never sent twice at once) and only restarts its schedule.
pub async fn resend(pool: &PgPool, id: i64) -> Result<bool, Error> {
    let mut tx = pool.begin().await?;
    let n = sqlx::query(
        "UPDATE notify.notifications SET status = 'pending', step = 0, \
             next_attempt_at = CASE WHEN status = 'pending' AND claimed_until > now() \
                                    THEN next_attempt_at ELSE now() END, \
             claimed_until = CASE WHEN status = 'pending' THEN claimed_until END, \
             delivered_at = NULL, exhausted_at = NULL \
         WHERE id = $1",
    )
    .bind(id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    tx.commit().await?;
    Ok(n == 1)
}
