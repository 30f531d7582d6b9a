//! Check-back: prepared messages that stay undecided are settled by asking their producer.
//!
//! A prepared message still pending `check_after_ms` after it was prepared is checked with
//! `GET {check_url}?message_id=ID`, answered `{"status":"committed"|"rolled_back"|"pending"}`:
//!
//! - `committed`: the message moves into `outbox.messages` (id kept) and the relay publishes it;
//! - `rolled_back`: it is removed;
//! - `pending`, an error status, a malformed answer, a refused connection or a timeout: it is
//!   checked again after an exponential backoff, up to `max_checks` checks, then parked as
//!   `unresolved`: counted in `outbox_prepared_unresolved`, listed by `outbox-relay status`,
//!   decided by the producer's late commit/rollback or by `outbox-relay prepared resolve`.
//!   Never dropped.
//!
//! Several relays may run on one database: a check is claimed with `FOR UPDATE SKIP LOCKED` in a
//! short transaction that pushes `next_check_at` ahead as a lease and counts the attempt, and the
//! HTTP request runs outside any transaction. Counting at claim time means a relay that dies
//! mid-check still uses up an attempt, so a message that crashes its checker cannot be checked
//! forever. The attempt number doubles as a fencing token: a relay whose lease ran out cannot
//! overwrite the schedule of the check that took over.
//!
//! Checks are bounded so a dead producer cannot cause a storm: at most `concurrency` requests in
//! flight per relay, each cut off after `request_timeout_ms`, and at most `per_host_rate`
//! requests per second to any one host (with bursts of `per_host_burst`). A check over the rate
//! is not sent late from memory: its row gets the next free slot as its `next_check_at` and
//! gives its attempt back.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::{DateTime, Utc};
use outbox::MessageId;
use outbox::prepared::{self, DecidedBy, PreparedError};
use serde::Deserialize;
use sqlx::PgPool;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use outbox::prepared::Decision;

/// The `[checkback]` section of the relay's configuration. Durations are in milliseconds, like
/// the rest of the relay's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckbackConfig {
    /// Run check-back in this relay. Turn it off on all but some relays to concentrate checks.
    pub enabled: bool,
    /// How long a prepared message may stay undecided before its first check.
    #[serde(deserialize_with = "millis")]
    pub check_after_ms: Duration,
    /// Checks before an undecided message is parked as unresolved.
    pub max_checks: u32,
    /// Wait after the first unanswered check; it grows by `backoff_factor` per check...
    #[serde(deserialize_with = "millis")]
    pub backoff_min_ms: Duration,
    /// ...up to this.
    #[serde(deserialize_with = "millis")]
    pub backoff_max_ms: Duration,
    /// Growth of the wait per unanswered check.
    pub backoff_factor: f32,
    /// Add up to 100 % random jitter to each wait, so messages prepared together are not
    /// checked together.
    pub jitter: bool,
    /// Check requests in flight at once (per relay process).
    pub concurrency: usize,
    /// Check requests per second to one host (`host:port`), per relay process.
    pub per_host_rate: f64,
    /// Requests to one host that may go out at once before `per_host_rate` applies.
    pub per_host_burst: u32,
    /// A check request is a failed check after this long (connect included).
    #[serde(deserialize_with = "millis")]
    pub request_timeout_ms: Duration,
    /// How often to look for due checks when there were none.
    #[serde(deserialize_with = "millis")]
    pub poll_interval_ms: Duration,
    /// Checks claimed per query.
    pub batch_size: u32,
    /// How long decisions are remembered (so a repeated commit is answered 200 and a
    /// contradicting one 409); after that the id is unknown (404).
    #[serde(deserialize_with = "millis")]
    pub outcome_retention_ms: Duration,
}

impl Default for CheckbackConfig {
    fn default() -> Self {
        CheckbackConfig {
            enabled: true,
            check_after_ms: Duration::from_secs(10),
            // With the backoff below: checks at about 10 s, 20 s, 40 s, 80 s, 160 s, 320 s,
            // then every 5 min (up to twice that with jitter): parked after about an hour.
            max_checks: 15,
            backoff_min_ms: Duration::from_secs(10),
            backoff_max_ms: Duration::from_secs(300),
            backoff_factor: 2.0,
            jitter: true,
            concurrency: 16,
            per_host_rate: 20.0,
            per_host_burst: 20,
            request_timeout_ms: Duration::from_secs(5),
            poll_interval_ms: Duration::from_secs(1),
            batch_size: 100,
            outcome_retention_ms: Duration::from_secs(24 * 3600),
        }
    }
}

/// A `[checkback]` value that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("config key `checkback.{key}`: {reason}")]
pub struct CheckbackConfigError {
    /// The key inside `[checkback]`.
    pub key: &'static str,
    /// What is wrong.
    pub reason: String,
}

impl CheckbackConfig {
    /// Checks ranges; the error names the key.
    pub fn validate(&self) -> Result<(), CheckbackConfigError> {
        let invalid = |key, reason: &str| {
            Err(CheckbackConfigError {
                key,
                reason: reason.to_owned(),
            })
        };
        if self.max_checks < 1 {
            return invalid("max_checks", "must be at least 1");
        }
        if self.backoff_min_ms.is_zero() || self.backoff_min_ms > self.backoff_max_ms {
            return invalid(
                "backoff_min_ms",
                "must be above 0 and at most backoff_max_ms",
            );
        }
        if !(self.backoff_factor >= 1.0 && self.backoff_factor <= 100.0) {
            return invalid("backoff_factor", "must be between 1 and 100");
        }
        if !(1..=1024).contains(&self.concurrency) {
            return invalid("concurrency", "must be between 1 and 1024");
        }
        if !(self.per_host_rate > 0.0 && self.per_host_rate.is_finite()) {
            return invalid(
                "per_host_rate",
                "must be a positive number of requests per second",
            );
        }
        if self.per_host_burst < 1 {
            return invalid("per_host_burst", "must be at least 1");
        }
        if self.request_timeout_ms.is_zero() {
            return invalid("request_timeout_ms", "must be above 0");
        }
        if self.poll_interval_ms.is_zero() {
            return invalid("poll_interval_ms", "must be above 0");
        }
        if !(1..=10_000).contains(&self.batch_size) {
            return invalid("batch_size", "must be between 1 and 10000");
        }
        if self.outcome_retention_ms < Duration::from_secs(60) {
            return invalid(
                "outcome_retention_ms",
                "must be at least 60000 (one minute)",
            );
        }
        Ok(())
    }

    /// How long a claimed check keeps other relays away: the request's timeout plus margin for
    /// recording the answer. Past it, a check whose relay died is claimed again.
    fn lease(&self) -> Duration {
        self.request_timeout_ms * 2 + Duration::from_secs(5)
    }

    /// The wait after the `failed`-th unanswered check (1-based).
    fn backoff(&self, failed: u32) -> Duration {
        let mut builder = ExponentialBuilder::new()
            .with_min_delay(self.backoff_min_ms)
            .with_max_delay(self.backoff_max_ms)
            .with_factor(self.backoff_factor)
            .without_max_times();
        if self.jitter {
            builder = builder.with_jitter();
        }
        builder
            .build()
            .nth(failed.saturating_sub(1) as usize)
            .unwrap_or(self.backoff_max_ms)
    }
}

fn millis<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    Ok(Duration::from_millis(u64::deserialize(d)?))
}

/// A prepared message parked as unresolved (for `outbox-relay status`).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UnresolvedMessage {
    /// The message id.
    pub id: i64,
    /// Its exchange.
    pub exchange: String,
    /// Its routing key.
    pub routing_key: String,
    /// Where it was checked (none: nobody to ask).
    pub check_url: Option<String>,
    /// Checks made.
    pub check_attempts: i32,
    /// Why the last check gave no decision.
    pub last_check_error: Option<String>,
    /// When it was prepared.
    pub created_at: DateTime<Utc>,
    /// When it was parked.
    pub unresolved_at: Option<DateTime<Utc>>,
}

/// How many prepared messages wait, for `status` and the gauges.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PreparedCounts {
    /// Undecided and still being checked (or not yet due for a check).
    pub pending: i64,
    /// Parked: checks used up, waiting for the producer or an operator.
    pub unresolved: i64,
    /// Age of the oldest undecided message (pending or unresolved), in seconds.
    pub oldest_age_seconds: Option<f64>,
}

/// Decides prepared message `id` by hand (`outbox-relay prepared resolve ID commit|rollback`):
/// commit moves it into the outbox for publication, rollback removes it. Idempotent;
/// [`PreparedError::Conflict`] when it was decided the other way, [`PreparedError::NotFound`]
/// when the id is unknown.
pub async fn resolve(
    pool: &PgPool,
    id: MessageId,
    decision: Decision,
) -> Result<(), PreparedError> {
    let mut tx = pool.begin().await?;
    let decided = prepared::decide_expecting(&mut *tx, id, decision, DecidedBy::Operator).await;
    tx.commit().await?;
    decided?;
    metrics::counter!("outbox_prepared_decisions_total",
        "decision" => decision.as_str(), "by" => "operator")
    .increment(1);
    tracing::info!(message_id = %id, decision = decision.as_str(), "prepared message resolved by operator");
    Ok(())
}

/// The unresolved prepared messages, oldest first, at most `limit`.
pub async fn unresolved(pool: &PgPool, limit: i64) -> Result<Vec<UnresolvedMessage>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let out = sqlx::query_as(
        "SELECT id, exchange, routing_key, check_url, check_attempts, last_check_error, \
                created_at, unresolved_at \
         FROM outbox.prepared_messages WHERE state = 'unresolved' \
         ORDER BY created_at, id LIMIT $1",
    )
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(out)
}

/// Counts of undecided prepared messages.
pub async fn counts(pool: &PgPool) -> Result<PreparedCounts, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let (pending, unresolved, oldest): (i64, i64, Option<f64>) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE state = 'pending'), \
                count(*) FILTER (WHERE state = 'unresolved'), \
                extract(epoch FROM now() - min(created_at))::float8 \
         FROM outbox.prepared_messages",
    )
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(PreparedCounts {
        pending,
        unresolved,
        oldest_age_seconds: oldest,
    })
}

/// Reads [`counts`] and sets the gauges `outbox_prepared_unresolved` and
/// `outbox_prepared_pending`. [`run`] calls it every few seconds; call it before rendering
/// `/metrics` when check-back is disabled in this relay.
pub async fn update_metrics(pool: &PgPool) -> Result<PreparedCounts, sqlx::Error> {
    let c = counts(pool).await?;
    metrics::gauge!("outbox_prepared_unresolved").set(c.unresolved as f64);
    metrics::gauge!("outbox_prepared_pending").set(c.pending as f64);
    Ok(c)
}

/// One claimed check.
struct Claimed {
    id: i64,
    check_url: Option<String>,
    /// The attempt number this claim holds (already counted).
    attempt: i32,
}

/// What the producer's check endpoint said.
enum Answer {
    Decided(Decision),
    Pending,
    Failed(String),
}

/// Runs check-back until `shutdown`, then lets the checks in flight finish (each is bounded by
/// `request_timeout_ms`) and returns.
pub async fn run(
    pool: PgPool,
    config: CheckbackConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    config.validate()?;
    if !config.enabled {
        tracing::info!("check-back disabled in this relay");
        shutdown.cancelled().await;
        return Ok(());
    }
    let http = reqwest::Client::builder()
        .timeout(config.request_timeout_ms)
        .connect_timeout(config.request_timeout_ms)
        // A check endpoint answers a tiny JSON document; following a redirect chain would only
        // multiply the requests a misconfigured producer causes.
        .redirect(reqwest::redirect::Policy::limited(2))
        .build()
        .context("building the check-back HTTP client")?;
    let config = Arc::new(config);
    let permits = Arc::new(Semaphore::new(config.concurrency));
    let mut limiter = HostLimiter::new(config.per_host_rate, config.per_host_burst);
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut next_upkeep = Instant::now();
    let mut db_failures = 0u32;
    tracing::info!(
        check_after_ms = config.check_after_ms.as_millis() as u64,
        max_checks = config.max_checks,
        concurrency = config.concurrency,
        "check-back running"
    );

    while !shutdown.is_cancelled() {
        while let Some(done) = tasks.try_join_next() {
            if let Err(e) = done {
                tracing::error!(cause = %e, "check task failed");
            }
        }
        if Instant::now() >= next_upkeep {
            next_upkeep = Instant::now() + Duration::from_secs(5);
            upkeep(&pool, &config).await;
        }

        let free = permits.available_permits().min(config.batch_size as usize);
        let mut full_batch = false;
        if free > 0 {
            match claim(&pool, &config, free as i64).await {
                Ok(rows) => {
                    db_failures = 0;
                    full_batch = rows.len() == free;
                    let mut deferred = Vec::new();
                    for row in rows {
                        let Some(url) = row.check_url.clone() else {
                            // Nobody to ask: the check fails at once and the schedule runs
                            // its course, giving the producer time to decide by itself.
                            let answer = Answer::Failed("no check_url was given".to_owned());
                            if let Err(e) = settle(&pool, &config, &row, answer).await {
                                tracing::warn!(message_id = row.id, cause = %e, "recording check failed");
                            }
                            continue;
                        };
                        let host = host_key(&url);
                        if let Some(wait) = limiter.reserve(&host, row.id) {
                            deferred.push((row.id, wait.as_millis() as i64));
                            continue;
                        }
                        let permit = permits
                            .clone()
                            .try_acquire_owned()
                            .expect("claimed no more checks than free permits");
                        let (pool, http, config) = (pool.clone(), http.clone(), config.clone());
                        tasks.spawn(async move {
                            let started = Instant::now();
                            let answer = ask(&http, &url, row.id, &config).await;
                            metrics::histogram!("outbox_prepared_check_duration_seconds")
                                .record(started.elapsed().as_secs_f64());
                            if let Err(e) = settle(&pool, &config, &row, answer).await {
                                tracing::warn!(message_id = row.id, cause = %e, "recording check failed");
                            }
                            drop(permit);
                        });
                    }
                    if !deferred.is_empty()
                        && let Err(e) = defer(&pool, &deferred).await
                    {
                        // Their lease runs out and they are claimed again: no check is lost.
                        tracing::warn!(cause = %e, "deferring rate-limited checks failed");
                    }
                }
                Err(e) => {
                    db_failures += 1;
                    tracing::warn!(cause = %e, failures = db_failures, "claiming checks failed");
                }
            }
        }
        if full_batch {
            continue;
        }
        let idle = if db_failures > 0 {
            (config.poll_interval_ms * db_failures.min(30)).min(Duration::from_secs(30))
        } else {
            config.poll_interval_ms
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(idle) => {}
            // All permits taken: go again as soon as one check finishes.
            Some(_) = tasks.join_next(), if free == 0 && !tasks.is_empty() => {}
        }
    }
    while tasks.join_next().await.is_some() {}
    tracing::info!("check-back stopped");
    Ok(())
}

async fn upkeep(pool: &PgPool, config: &CheckbackConfig) {
    if let Err(e) = update_metrics(pool).await {
        tracing::warn!(cause = %e, "counting prepared messages failed");
    }
    // Batched so a long backlog of old outcomes never becomes one long transaction.
    let pruned = async {
        let mut tx = pool.begin().await?;
        let done = sqlx::query(
            "DELETE FROM outbox.prepared_outcomes WHERE id IN ( \
                 SELECT id FROM outbox.prepared_outcomes \
                 WHERE decided_at < now() - $1 * interval '1 millisecond' LIMIT 5000)",
        )
        .bind(config.outcome_retention_ms.as_millis() as i64)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok::<_, sqlx::Error>(done)
    }
    .await;
    match pruned {
        Ok(done) if done.rows_affected() > 0 => {
            tracing::debug!(rows = done.rows_affected(), "pruned old prepared outcomes");
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(cause = %e, "pruning prepared outcomes failed"),
    }
}

/// Claims up to `limit` due checks: one short statement, rows locked only while it runs.
async fn claim(
    pool: &PgPool,
    config: &CheckbackConfig,
    limit: i64,
) -> Result<Vec<Claimed>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let rows: Vec<(i64, Option<String>, i32)> = sqlx::query_as(
        "WITH due AS ( \
             SELECT id FROM outbox.prepared_messages \
             WHERE state = 'pending' \
               AND ((next_check_at IS NULL AND created_at <= now() - $2 * interval '1 millisecond') \
                    OR next_check_at <= now()) \
             ORDER BY coalesce(next_check_at, created_at), id \
             LIMIT $1 \
             FOR UPDATE SKIP LOCKED) \
         UPDATE outbox.prepared_messages p \
         SET next_check_at = now() + $3 * interval '1 millisecond', \
             check_attempts = p.check_attempts + 1 \
         FROM due WHERE p.id = due.id \
         RETURNING p.id, p.check_url, p.check_attempts",
    )
    .bind(limit)
    .bind(config.check_after_ms.as_millis() as i64)
    .bind(config.lease().as_millis() as i64)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(rows
        .into_iter()
        .map(|(id, check_url, attempt)| Claimed {
            id,
            check_url,
            attempt,
        })
        .collect())
}

/// Gives rate-limited checks their attempt back and their reserved slot as the due time.
async fn defer(pool: &PgPool, rows: &[(i64, i64)]) -> Result<(), sqlx::Error> {
    let (ids, waits): (Vec<i64>, Vec<i64>) = rows.iter().copied().unzip();
    let mut tx = pool.begin().await?;
    sqlx::query(
        "UPDATE outbox.prepared_messages p \
         SET check_attempts = p.check_attempts - 1, \
             next_check_at = now() + d.wait_ms * interval '1 millisecond' \
         FROM unnest($1::bigint[], $2::bigint[]) AS d(id, wait_ms) \
         WHERE p.id = d.id AND p.state = 'pending'",
    )
    .bind(ids)
    .bind(waits)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// `GET {check_url}?message_id=ID` and reads the answer.
async fn ask(http: &reqwest::Client, check_url: &str, id: i64, config: &CheckbackConfig) -> Answer {
    let mut url = match reqwest::Url::parse(check_url) {
        Ok(url) => url,
        Err(e) => return Answer::Failed(format!("check_url is not a URL: {e}")),
    };
    url.query_pairs_mut()
        .append_pair("message_id", &id.to_string());
    let mut resp = match http.get(url).send().await {
        Ok(resp) => resp,
        Err(e) if e.is_timeout() => {
            return Answer::Failed(format!(
                "no answer within {} ms",
                config.request_timeout_ms.as_millis()
            ));
        }
        Err(e) => return Answer::Failed(format!("request failed: {}", error_chain(&e))),
    };
    let status = resp.status();
    // The answer is a tiny JSON object; refuse to buffer whatever else an endpoint might send.
    const MAX_ANSWER: usize = 16 * 1024;
    let mut body = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_ANSWER {
                    return Answer::Failed(format!(
                        "HTTP {status}: answer larger than {MAX_ANSWER} bytes"
                    ));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(e) if e.is_timeout() => {
                return Answer::Failed(format!(
                    "no complete answer within {} ms",
                    config.request_timeout_ms.as_millis()
                ));
            }
            Err(e) => {
                return Answer::Failed(format!("reading the answer failed: {}", error_chain(&e)));
            }
        }
    }
    if !status.is_success() {
        let text = String::from_utf8_lossy(&body);
        let text: String = text.chars().take(200).collect();
        return Answer::Failed(format!("HTTP {status}: {text}"));
    }
    #[derive(Deserialize)]
    struct CheckAnswer {
        status: String,
    }
    match serde_json::from_slice::<CheckAnswer>(&body) {
        Ok(a) => match a.status.as_str() {
            "committed" => Answer::Decided(Decision::Committed),
            "rolled_back" => Answer::Decided(Decision::RolledBack),
            "pending" => Answer::Pending,
            other => Answer::Failed(format!(
                "answer status `{other}` is not committed, rolled_back or pending"
            )),
        },
        Err(e) => Answer::Failed(format!("answer is not {{\"status\": ...}} JSON: {e}")),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Records what a check found.
async fn settle(
    pool: &PgPool,
    config: &CheckbackConfig,
    row: &Claimed,
    answer: Answer,
) -> Result<(), PreparedError> {
    let id = MessageId(row.id);
    let reason = match answer {
        Answer::Decided(decision) => {
            metrics::counter!("outbox_prepared_checks_total", "result" => decision.as_str())
                .increment(1);
            let mut tx = pool.begin().await?;
            let decided = prepared::decide(&mut *tx, id, decision, DecidedBy::Checkback).await;
            tx.commit().await?;
            let decided = match decided {
                Ok(decided) => decided,
                Err(PreparedError::Database(e)) => return Err(PreparedError::Database(e)),
                // The decision itself was refused (the message no longer passes the outbox's
                // validation): a failed check, so the message is parked in the end instead
                // of being checked forever.
                Err(refused) => {
                    let reason = format!(
                        "applying the answer `{}` failed: {refused}",
                        decision.as_str()
                    );
                    return record_failure(pool, config, row, reason).await;
                }
            };
            match decided {
                Some(d) if d == decision => {
                    metrics::counter!("outbox_prepared_decisions_total",
                        "decision" => decision.as_str(), "by" => "checkback")
                    .increment(1);
                    tracing::info!(
                        message_id = row.id,
                        decision = decision.as_str(),
                        "prepared message decided by check-back"
                    );
                }
                Some(d) => {
                    // The producer decided through the API while the check was in flight and
                    // its check endpoint now says otherwise: the first decision stands.
                    tracing::error!(
                        message_id = row.id,
                        answered = decision.as_str(),
                        in_effect = d.as_str(),
                        "check answer contradicts the decision already made; keeping the decision"
                    );
                }
                None => {
                    tracing::warn!(message_id = row.id, "checked message is no longer known");
                }
            }
            return Ok(());
        }
        Answer::Pending => {
            metrics::counter!("outbox_prepared_checks_total", "result" => "pending").increment(1);
            "producer answered pending".to_owned()
        }
        Answer::Failed(reason) => {
            metrics::counter!("outbox_prepared_checks_total", "result" => "error").increment(1);
            reason
        }
    };
    record_failure(pool, config, row, reason).await
}

/// Schedules the next check of a message whose check gave no decision, or parks it.
async fn record_failure(
    pool: &PgPool,
    config: &CheckbackConfig,
    row: &Claimed,
    reason: String,
) -> Result<(), PreparedError> {
    let park = row.attempt >= config.max_checks as i32;
    let wait = config.backoff(row.attempt.max(1) as u32);
    let mut tx = pool.begin().await?;
    let updated = sqlx::query(
        "UPDATE outbox.prepared_messages \
         SET last_check_error = $2, \
             state = CASE WHEN $3 THEN 'unresolved' ELSE state END, \
             unresolved_at = CASE WHEN $3 THEN now() ELSE unresolved_at END, \
             next_check_at = CASE WHEN $3 THEN NULL \
                                  ELSE now() + $4 * interval '1 millisecond' END \
         WHERE id = $1 AND state = 'pending' AND check_attempts = $5",
    )
    .bind(row.id)
    .bind(&reason)
    .bind(park)
    .bind(wait.as_millis() as i64)
    .bind(row.attempt)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    if updated.rows_affected() == 0 {
        // Decided meanwhile, or this claim's lease ran out and another check took over.
        return Ok(());
    }
    if park {
        metrics::counter!("outbox_prepared_parked_total").increment(1);
        tracing::warn!(message_id = row.id, checks = row.attempt, cause = %reason,
            "prepared message parked as unresolved; decide it with `outbox-relay prepared resolve`");
    } else {
        tracing::info!(message_id = row.id, check = row.attempt, cause = %reason,
            next_in_ms = wait.as_millis() as u64, "prepared message still undecided");
    }
    Ok(())
}

/// `host:port` of a check URL: the unit of the per-host rate.
fn host_key(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => format!(
            "{}:{}",
            u.host_str().unwrap_or(""),
            u.port_or_known_default().unwrap_or(0)
        ),
        Err(_) => String::new(),
    }
}

/// A per-host rate limit (GCRA): each host has a theoretical arrival time `tat`; a request may
/// go when `tat` is at most `burst` intervals ahead of now. A request over the limit reserves
/// the next slot and is told how long to wait for it, so deferred checks of one host are spread
/// out at the rate instead of all coming back at once; when the check comes back at its slot it
/// goes without taking another one (otherwise later reservations would keep pushing it back).
struct HostLimiter {
    interval: Duration,
    tolerance: Duration,
    hosts: HashMap<String, Instant>,
    /// Slots reserved by deferred checks, by message id.
    reserved: HashMap<i64, Instant>,
}

impl HostLimiter {
    fn new(rate: f64, burst: u32) -> Self {
        let interval = Duration::from_secs_f64(1.0 / rate);
        HostLimiter {
            interval,
            tolerance: interval * burst.saturating_sub(1),
            hosts: HashMap::new(),
            reserved: HashMap::new(),
        }
    }

    /// `None`: check message `id` now. `Some(wait)`: its slot is `wait` from now.
    fn reserve(&mut self, host: &str, id: i64) -> Option<Duration> {
        let now = Instant::now();
        if let Some(slot) = self.reserved.remove(&id) {
            // The database clock and this one agree only roughly: a little early is on time.
            if slot <= now + Duration::from_millis(50) {
                return None;
            }
            self.reserved.insert(id, slot);
            return Some(slot - now);
        }
        if self.hosts.len() > 10_000 {
            // Forget hosts that are idle (their tat is in the past) so the map stays bounded.
            self.hosts.retain(|_, tat| *tat > now);
        }
        if self.reserved.len() > 100_000 {
            // Reservations of checks that another relay took over.
            self.reserved
                .retain(|_, slot| *slot + Duration::from_secs(300) > now);
        }
        let tat = self.hosts.entry(host.to_owned()).or_insert(now);
        let start = (*tat).max(now);
        let wait = start.saturating_duration_since(now + self.tolerance);
        *tat = start + self.interval;
        if wait.is_zero() {
            None
        } else {
            self.reserved.insert(id, now + wait);
            Some(wait)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_is_refused() {
        let err = toml::from_str::<CheckbackConfig>("max_check = 3").unwrap_err();
        assert!(err.to_string().contains("max_check"), "{err}");
    }

    #[test]
    fn defaults_check_after_ten_seconds() {
        let c: CheckbackConfig = toml::from_str("").unwrap();
        assert_eq!(c.check_after_ms, Duration::from_secs(10));
        c.validate().unwrap();
    }

    #[test]
    fn out_of_range_value_is_named() {
        let c: CheckbackConfig = toml::from_str("max_checks = 0").unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("checkback.max_checks"), "{err}");
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let c = CheckbackConfig {
            jitter: false,
            backoff_min_ms: Duration::from_secs(10),
            backoff_max_ms: Duration::from_secs(60),
            ..CheckbackConfig::default()
        };
        assert_eq!(c.backoff(1), Duration::from_secs(10));
        assert_eq!(c.backoff(2), Duration::from_secs(20));
        assert_eq!(c.backoff(3), Duration::from_secs(40));
        assert_eq!(c.backoff(4), Duration::from_secs(60));
        assert_eq!(c.backoff(40), Duration::from_secs(60));
    }

    #[test]
    fn host_limiter_allows_a_burst_then_spreads_the_rest_at_the_rate() {
        let mut l = HostLimiter::new(10.0, 3);
        assert_eq!(l.reserve("a:80", 1), None);
        assert_eq!(l.reserve("a:80", 2), None);
        assert_eq!(l.reserve("a:80", 3), None);
        let w1 = l.reserve("a:80", 4).expect("over the burst");
        let w2 = l.reserve("a:80", 5).expect("over the burst");
        assert!(
            w1 > Duration::from_millis(50) && w1 <= Duration::from_millis(100),
            "{w1:?}"
        );
        assert!(w2 > w1 + Duration::from_millis(90), "{w1:?} {w2:?}");
        // Coming back early keeps the reserved slot; another host has its own budget.
        let again = l.reserve("a:80", 5).expect("still early");
        assert!(
            again <= w2 && again + Duration::from_millis(20) > w2,
            "{again:?} {w2:?}"
        );
        assert_eq!(l.reserve("b:80", 6), None);
        // At its slot a deferred check goes without taking another.
        std::thread::sleep(w1);
        assert_eq!(l.reserve("a:80", 4), None);
    }
}
