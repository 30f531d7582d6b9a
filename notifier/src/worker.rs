//! The delivery loop. Each round claims due notifications (bounded by free slots), delivers
//! each in its own task and records the outcome. Nothing waits in memory: a failed attempt
//! writes its next due time into the row and the task ends, so stopping the worker at any
//! moment loses nothing. A notification whose attempt was cut off mid-request comes back when
//! its claim lease runs out (it may then reach the receiver twice, with the same `Webhook-Id`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use crate::deliver::{self, TlsRoots};
use crate::metrics as m;
use crate::store::{self, Job, Next, RecordSettings};
use crate::{Error, Schedule};

/// The worker's settings (see the README's configuration table).
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Multiplies every schedule step and the breaker cooldown (1.0 in production; tests use
    /// 0.001). `Retry-After` is not scaled: it is the receiver's wall-clock request.
    pub time_scale: f64,
    /// Spread of each wait, as a fraction either way.
    pub jitter: f64,
    /// How often to look for due notifications when the last claim found less than a batch.
    pub poll_interval: Duration,
    /// Notifications claimed per round at most.
    pub batch_size: u32,
    /// Requests in flight from this worker at once, over all endpoints.
    pub max_in_flight: u32,
    /// How long a claim holds a notification; request timeouts are cut to fit inside it.
    pub lease: Duration,
    /// The longest `Retry-After` honoured.
    pub max_retry_after: Duration,
    /// Failures in a row (no answer, 5xx, 429) that open an endpoint's circuit.
    pub breaker_threshold: u32,
    /// How long an open circuit stops attempts to its endpoint (scaled).
    pub breaker_cooldown: Duration,
    /// The schedule of endpoints without their own.
    pub schedule: Schedule,
    /// Exchange of `notification.exhausted` events (`""` = the default exchange).
    pub exhausted_exchange: String,
    /// Routing key of `notification.exhausted` events.
    pub exhausted_routing_key: String,
    /// Roots `https://` endpoints are checked against.
    pub tls_roots: TlsRoots,
    /// Extra PEM CA certificates (a partner's private CA).
    pub tls_ca_file: Option<PathBuf>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            time_scale: 1.0,
            jitter: 0.1,
            poll_interval: Duration::from_millis(200),
            batch_size: 64,
            max_in_flight: 64,
            lease: Duration::from_secs(120),
            max_retry_after: Duration::from_secs(6 * 3600),
            breaker_threshold: 5,
            breaker_cooldown: Duration::from_secs(60),
            schedule: Schedule::default(),
            exhausted_exchange: String::new(),
            exhausted_routing_key: "notification.exhausted".to_owned(),
            tls_roots: TlsRoots::System,
            tls_ca_file: None,
        }
    }
}

/// Delivers due notifications until cancelled.
pub struct Worker {
    pool: PgPool,
    client: deliver::WebhookClient,
    cfg: Arc<WorkerConfig>,
}

impl Worker {
    /// A worker on `pool` (migrations applied) with `cfg`. Fails when `cfg.tls_ca_file` cannot
    /// be read.
    pub fn new(pool: PgPool, cfg: WorkerConfig) -> Result<Self, Error> {
        let client = deliver::client(cfg.tls_roots, cfg.tls_ca_file.as_deref())?;
        Ok(Worker {
            pool,
            client,
            cfg: Arc::new(cfg),
        })
    }

    /// Runs until `shutdown` is cancelled, then waits for the attempts in flight to be
    /// recorded (each is bounded by its timeout) and returns.
    pub async fn run(self, shutdown: CancellationToken) {
        let slots = Arc::new(Semaphore::new(self.cfg.max_in_flight as usize));
        let mut tasks = JoinSet::new();
        info!(
            time_scale = self.cfg.time_scale,
            max_in_flight = self.cfg.max_in_flight,
            "notifier worker started"
        );
        while !shutdown.is_cancelled() {
            while tasks.try_join_next().is_some() {}
            let free = slots.available_permits().min(self.cfg.batch_size as usize);
            let mut full = false;
            if free > 0 {
                match store::claim(&self.pool, free, self.cfg.lease).await {
                    Ok(jobs) => {
                        full = jobs.len() == free;
                        for job in jobs {
                            let permit = slots
                                .clone()
                                .try_acquire_owned()
                                .expect("claimed no more than the free slots");
                            let (pool, client, cfg) =
                                (self.pool.clone(), self.client.clone(), self.cfg.clone());
                            tasks.spawn(async move {
                                handle(&pool, &client, &cfg, job).await;
                                drop(permit);
                            });
                        }
                    }
                    Err(e) => {
                        metrics::counter!(m::DATABASE_ERRORS_TOTAL).increment(1);
                        warn!(cause = %e, "claim failed");
                    }
                }
            }
            if full {
                continue;
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(self.cfg.poll_interval) => {}
            }
        }
        info!(in_flight = tasks.len(), "notifier worker stopping");
        while tasks.join_next().await.is_some() {}
    }
}

/// The wait after a failed attempt, or `None` when the schedule is used up.
pub fn next_wait(cfg: &WorkerConfig, job: &Job, retry_after: Option<Duration>) -> Option<Duration> {
    let own = job.schedule_ms.as_deref().and_then(Schedule::from_millis);
    let schedule = own.as_ref().unwrap_or(&cfg.schedule);
    let wait = schedule.delay_after(job.step as usize + 1, cfg.time_scale, cfg.jitter)?;
    Some(match retry_after {
        Some(ra) => wait.max(ra.min(cfg.max_retry_after)),
        None => wait,
    })
}

/// One attempt inside the `notifier.deliver` span, which continues the trace stored with the
/// notification (when there is one and spans are exported).
async fn handle(pool: &PgPool, client: &deliver::WebhookClient, cfg: &WorkerConfig, job: Job) {
    let span = tracing::info_span!(
        "notifier.deliver",
        otel.name = "notifier.deliver",
        otel.kind = "client",
        notification_id = job.id,
        endpoint = %job.endpoint_id,
        attempt = job.attempts + 1
    );
    if let Some(parent) = job.traceparent.as_deref() {
        let state = job.tracestate.as_deref();
        telemetry::set_parent(&span, |name| match name {
            telemetry::TRACEPARENT => Some(parent),
            telemetry::TRACESTATE => state,
            _ => None,
        });
    }
    handle_in_span(pool, client, cfg, job)
        .instrument(span)
        .await
}

async fn handle_in_span(
    pool: &PgPool,
    client: &deliver::WebhookClient,
    cfg: &WorkerConfig,
    job: Job,
) {
    // Leave the record time inside the lease, so a slow answer cannot outlive the claim.
    let timeout = job
        .timeout
        .min(cfg.lease.saturating_sub(Duration::from_secs(2)));
    let attempt = deliver::attempt(client, &job, timeout).await;
    metrics::histogram!(m::ATTEMPT_SECONDS).record(attempt.latency.as_secs_f64());
    let next = if attempt.succeeded {
        Next::Delivered
    } else {
        match next_wait(cfg, &job, attempt.retry_after) {
            Some(w) => Next::RetryAfter(w),
            None => Next::Exhausted,
        }
    };
    metrics::counter!(m::ATTEMPTS_TOTAL, "outcome" => if attempt.succeeded { "delivered" } else { "failed" })
        .increment(1);
    let settings = RecordSettings {
        exhausted_exchange: cfg.exhausted_exchange.clone(),
        exhausted_routing_key: cfg.exhausted_routing_key.clone(),
        breaker_threshold: cfg.breaker_threshold,
        breaker_cooldown: cfg.breaker_cooldown.mul_f64(cfg.time_scale),
    };
    // A failed record leaves the claim to expire and the attempt to be made again; a few
    // quick retries avoid that duplicate when the database only blinked.
    let mut backoff = Duration::from_millis(100);
    for round in 1..=5 {
        match store::record(pool, &job, &attempt, next, &settings).await {
            Ok(true) => {
                match next {
                    Next::Delivered => info!(status = ?attempt.http_status, "delivered"),
                    Next::RetryAfter(w) => {
                        debug!(error = ?attempt.error, wait_ms = w.as_millis() as u64, "attempt failed; retry scheduled")
                    }
                    Next::Exhausted => {
                        metrics::counter!(m::EXHAUSTED_TOTAL).increment(1);
                        warn!(error = ?attempt.error, "schedule used up: exhausted");
                    }
                }
                return;
            }
            Ok(false) => {
                warn!("claim lost before the outcome was recorded; left to its current holder");
                return;
            }
            Err(e) => {
                metrics::counter!(m::DATABASE_ERRORS_TOTAL).increment(1);
                warn!(cause = %e, round, "recording the attempt failed");
                tokio::time::sleep(backoff).await;
                backoff *= 3;
            }
        }
    }
}
