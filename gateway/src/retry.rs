//! Retries, only where repeating the request cannot do harm: an idempotent method (RFC 9110), or
//! an idempotency key attached (the upstream sees the same key each time and dedupes). A budget
//! (a share of recent requests) keeps retries from multiplying load on a struggling upstream,
//! and an upstream `Retry-After` is honoured when it fits in the route's backoff ceiling.

use serde::Deserialize;
use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use http::{StatusCode, header};
use tower::{
    Layer, Service, ServiceExt,
    retry::budget::{Budget, TpsBudget},
};

use crate::layer::{Inner, layer_service_types, take_ready};
use crate::{
    idempotency::KeyAttached,
    problem::{GatewayProblem, GatewayRequest, GatewayResponse, UpstreamOutcome},
};

/// One route's retry behaviour.
#[derive(Debug)]
pub struct RetrySettings {
    /// Route label.
    pub route: String,
    /// Retries after the first attempt.
    pub attempts: u32,
    /// First backoff.
    pub backoff: Duration,
    /// Longest backoff and longest honoured `Retry-After`.
    pub max_backoff: Duration,
    /// Statuses retried.
    pub statuses: Vec<StatusCode>,
    budget: TpsBudget,
}

impl RetrySettings {
    /// From a route's `retry` table.
    pub fn new(route: &str, c: &RetryConfig) -> Self {
        Self {
            route: route.to_owned(),
            attempts: c.attempts,
            backoff: Duration::from_millis(c.backoff_ms),
            max_backoff: Duration::from_millis(c.max_backoff_ms),
            statuses: c
                .statuses
                .iter()
                .filter_map(|s| StatusCode::from_u16(*s).ok())
                .collect(),
            budget: TpsBudget::new(
                Duration::from_secs(10),
                c.budget_min_per_sec,
                c.budget_percent / 100.0,
            ),
        }
    }
}

/// Adds [`Retry`].
#[derive(Clone)]
pub struct RetryLayer {
    settings: Arc<RetrySettings>,
}

impl RetryLayer {
    /// With a route's settings.
    pub fn new(settings: RetrySettings) -> Self {
        Self {
            settings: Arc::new(settings),
        }
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry {
            inner,
            settings: self.settings.clone(),
        }
    }
}

/// Retries safe requests.
#[derive(Clone)]
pub struct Retry<S> {
    inner: S,
    settings: Arc<RetrySettings>,
}

impl<S: Inner> Service<GatewayRequest> for Retry<S> {
    layer_service_types!();

    fn call(&mut self, req: GatewayRequest) -> Self::Future {
        let mut inner = take_ready(&mut self.inner);
        let settings = self.settings.clone();
        Box::pin(async move {
            settings.budget.deposit();
            let safe =
                req.method().is_idempotent() || req.extensions().get::<KeyAttached>().is_some();
            if !safe || settings.attempts == 0 {
                return inner.call(req).await;
            }
            let mut attempt = 0;
            loop {
                let resp = inner.call(req.clone()).await?;
                let Some(delay) = retry_delay(&settings, &resp, attempt) else {
                    return Ok(resp);
                };
                if attempt >= settings.attempts || !settings.budget.withdraw() {
                    return Ok(resp);
                }
                attempt += 1;
                metrics::counter!("gateway_retries_total", "route" => settings.route.clone())
                    .increment(1);
                tracing::debug!(attempt, status = %resp.status(), ?delay, "retrying");
                drop(resp);
                tokio::time::sleep(delay).await;
                inner.ready().await?;
            }
        })
    }
}

/// How long to wait before retrying this answer, or `None` when it must not be retried.
fn retry_delay(settings: &RetrySettings, resp: &GatewayResponse, attempt: u32) -> Option<Duration> {
    let unreachable = resp
        .extensions()
        .get::<GatewayProblem>()
        .is_some_and(|p| p.0 == "upstream-unreachable");
    let from_upstream = resp.extensions().get::<UpstreamOutcome>().is_some()
        && resp.extensions().get::<GatewayProblem>().is_none();
    if !(unreachable || (from_upstream && settings.statuses.contains(&resp.status()))) {
        return None;
    }
    if let Some(after) = retry_after(resp) {
        // A longer wait than we are willing to make means the upstream asked us to stay away:
        // pass its answer back instead.
        return (after <= settings.max_backoff).then_some(after);
    }
    let base = settings.backoff.saturating_mul(1 << attempt.min(16));
    let capped = base.min(settings.max_backoff);
    // Jitter (half to all of the backoff) keeps gateways that failed together from retrying in lockstep.
    let jitter: f64 = rand::random();
    Some(capped.mul_f64(0.5 + jitter / 2.0))
}

fn retry_after(resp: &GatewayResponse) -> Option<Duration> {
    let v = resp
        .headers()
        .get(header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(when.duration_since(SystemTime::now()).unwrap_or_default())
}

/// `retry = { ... }` of a route.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Retries after the first attempt.
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// First backoff; doubles per retry, with jitter.
    #[serde(default = "default_backoff")]
    pub backoff_ms: u64,
    /// Longest wait, also the longest upstream `Retry-After` that is honoured.
    #[serde(default = "default_max_backoff")]
    pub max_backoff_ms: u64,
    /// Retries allowed as a percentage of requests (the budget).
    #[serde(default = "default_budget_percent")]
    pub budget_percent: f32,
    /// Retries per second always allowed by the budget.
    #[serde(default = "default_budget_min")]
    pub budget_min_per_sec: u32,
    /// Upstream statuses that are retried (an unreachable upstream always is).
    #[serde(default = "default_retry_statuses")]
    pub statuses: Vec<u16>,
}

impl RetryConfig {
    /// Checks the table at key `at` (`routes[0].retry`).
    pub(crate) fn validate(&self, at: &str) -> Result<(), crate::config::ConfigError> {
        use crate::config::invalid;
        if !(0.0..=1000.0).contains(&self.budget_percent) {
            return Err(invalid(
                format!("{at}.budget_percent"),
                "must be between 0 and 1000",
            ));
        }
        for (j, s) in self.statuses.iter().enumerate() {
            if !(400..=599).contains(s) {
                return Err(invalid(
                    format!("{at}.statuses[{j}]"),
                    "must be a 4xx or 5xx status",
                ));
            }
        }
        Ok(())
    }
}

fn default_attempts() -> u32 {
    2
}
fn default_backoff() -> u64 {
    100
}
fn default_max_backoff() -> u64 {
    2_000
}
fn default_budget_percent() -> f32 {
    20.0
}
fn default_budget_min() -> u32 {
    10
}
fn default_retry_statuses() -> Vec<u16> {
    vec![429, 502, 503, 504]
}
