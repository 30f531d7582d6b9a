//! Admission limits of a route: a token bucket per caller (429 with `Retry-After`) and a cap on
//! requests in progress (503). Both are per gateway instance: with N gateways behind a load
//! balancer the effective limits are N times the configured ones.

use serde::Deserialize;
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Instant,
};

use axum::response::IntoResponse;
use http::StatusCode;
use tokio::sync::Semaphore;
use tower::{Layer, Service};

use crate::layer::{Inner, layer_service_types, take_ready};
use crate::{
    caller::Caller,
    problem::{GatewayRequest, Problem},
};

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Per-caller token buckets of one route.
pub struct RateLimiter {
    route: String,
    per_sec: f64,
    burst: f64,
    buckets: Mutex<HashMap<Arc<str>, Bucket>>,
}

impl RateLimiter {
    /// `per_sec` sustained, `burst` at once.
    pub fn new(route: &str, per_sec: f64, burst: u32) -> Self {
        Self {
            route: route.to_owned(),
            per_sec,
            burst: f64::from(burst),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token, or says how many seconds until one is available.
    fn take(&self, caller: &Arc<str>) -> Result<(), f64> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().expect("rate limiter lock");
        // Callers are a fixed set from the config (or "anonymous"), so the map stays small.
        let b = buckets.entry(caller.clone()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        b.tokens =
            (b.tokens + now.duration_since(b.at).as_secs_f64() * self.per_sec).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err((1.0 - b.tokens) / self.per_sec)
        }
    }
}

/// Adds [`Limits`].
#[derive(Clone)]
pub struct LimitLayer {
    rate: Option<Arc<RateLimiter>>,
    concurrency: Option<Arc<Semaphore>>,
    route: String,
}

impl LimitLayer {
    /// Either limit may be absent.
    pub fn new(route: &str, rate: Option<RateLimiter>, max_concurrency: Option<usize>) -> Self {
        Self {
            rate: rate.map(Arc::new),
            concurrency: max_concurrency.map(|n| Arc::new(Semaphore::new(n))),
            route: route.to_owned(),
        }
    }
}

impl<S> Layer<S> for LimitLayer {
    type Service = Limits<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Limits {
            inner,
            layer: self.clone(),
        }
    }
}

/// Refuses what exceeds the route's limits.
#[derive(Clone)]
pub struct Limits<S> {
    inner: S,
    layer: LimitLayer,
}

impl<S: Inner> Service<GatewayRequest> for Limits<S> {
    layer_service_types!();

    fn call(&mut self, req: GatewayRequest) -> Self::Future {
        let mut inner = take_ready(&mut self.inner);
        let layer = self.layer.clone();
        Box::pin(async move {
            if let Some(rate) = &layer.rate {
                let caller = req
                    .extensions()
                    .get::<Caller>()
                    .cloned()
                    .unwrap_or_else(Caller::anonymous);
                if let Err(wait) = rate.take(&caller.0) {
                    metrics::counter!("gateway_rate_limited_total", "route" => rate.route.clone(), "caller" => caller.0.to_string())
                        .increment(1);
                    return Ok(Problem::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        "rate-limited",
                        "Too many requests",
                    )
                    .detail(format!(
                        "caller {} exceeded {} requests per second on {}",
                        caller.0, rate.per_sec, rate.route
                    ))
                    .retry_after(wait.ceil() as u64)
                    .into_response());
                }
            }
            let _permit = match &layer.concurrency {
                None => None,
                Some(sem) => match sem.clone().try_acquire_owned() {
                    Ok(p) => Some(p),
                    Err(_) => {
                        return Ok(Problem::new(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "concurrency-limited",
                            "Too many requests in progress",
                        )
                        .detail(format!("route {} is at its max_concurrency", layer.route))
                        .retry_after(1)
                        .into_response());
                    }
                },
            };
            inner.call(req).await
        })
    }
}

/// `rate_limit = { ... }` of a route.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Sustained requests per second per caller.
    pub per_sec: f64,
    /// Bucket size: requests allowed at once after a quiet period.
    #[serde(default)]
    pub burst: Option<u32>,
}

impl RateLimitConfig {
    /// Checks the table at key `at` (`routes[0].rate_limit`).
    pub(crate) fn validate(&self, at: &str) -> Result<(), crate::config::ConfigError> {
        use crate::config::invalid;
        if !(self.per_sec > 0.0 && self.per_sec.is_finite()) {
            return Err(invalid(format!("{at}.per_sec"), "must be greater than 0"));
        }
        if self.burst == Some(0) {
            return Err(invalid(format!("{at}.burst"), "must be greater than 0"));
        }
        Ok(())
    }
}
