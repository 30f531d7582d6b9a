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

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use outbox::MessageId;
use outbox::prepared::wire::{CheckAnswer, CheckReply};
use outbox::prepared::{self, DecidedBy, PreparedError};
use sqlx::PgPool;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use super::admin::{
    PreparedCounts, UnresolvedMessage, counts, resolve, unresolved, update_metrics,
};
pub use super::config::{CheckbackConfig, CheckbackConfigError};
use super::rate::{HostLimiter, host_key};
use super::store::{self, Claimed, claim, defer};
pub use outbox::prepared::Decision;

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
    match store::prune_outcomes(pool, config.outcome_retention_ms).await {
        Ok(0) => {}
        Ok(rows) => tracing::debug!(rows, "pruned old prepared outcomes"),
        Err(e) => tracing::warn!(cause = %e, "pruning prepared outcomes failed"),
    }
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
    match serde_json::from_slice::<CheckReply>(&body) {
        Ok(CheckReply {
            status: CheckAnswer::Decided(decision),
        }) => Answer::Decided(decision),
        Ok(CheckReply {
            status: CheckAnswer::Pending,
        }) => Answer::Pending,
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
    let changed = store::record_undecided(pool, row, &reason, park, wait).await?;
    if !changed {
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
