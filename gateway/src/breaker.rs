//! A circuit breaker per upstream, shared by every route that targets it. After
//! `failure_threshold` consecutive failures (5xx, unreachable, timeout) it opens: requests are
//! answered 503 with `Retry-After` without touching the upstream or any record. When `open_ms`
//! has passed, exactly one request goes through as a probe (half-open); its success closes the
//! breaker, its failure opens it again.

use serde::Deserialize;
use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::response::IntoResponse;
use http::StatusCode;
use tower::{Layer, Service};

use crate::layer::{Inner, layer_service_types, take_ready};
use crate::problem::{GatewayRequest, Problem, UpstreamOutcome};

#[derive(Debug)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

/// The shared state of one upstream's breaker.
#[derive(Debug)]
pub struct Breaker {
    upstream: String,
    threshold: u32,
    open_for: Duration,
    state: Mutex<State>,
}

enum Admission {
    Pass,
    Probe,
    Reject(Duration),
}

impl Breaker {
    /// A closed breaker.
    pub fn new(upstream: &str, threshold: u32, open_for: Duration) -> Self {
        Self {
            upstream: upstream.to_owned(),
            threshold,
            open_for,
            state: Mutex::new(State::Closed { failures: 0 }),
        }
    }

    fn admit(&self) -> Admission {
        let mut state = self.state.lock().expect("breaker lock");
        match *state {
            State::Closed { .. } => Admission::Pass,
            State::Open { until } => {
                let now = Instant::now();
                if now >= until {
                    *state = State::HalfOpen { probing: true };
                    self.transition("half_open");
                    Admission::Probe
                } else {
                    Admission::Reject(until - now)
                }
            }
            State::HalfOpen { probing: true } => Admission::Reject(Duration::from_secs(1)),
            State::HalfOpen { probing: false } => {
                *state = State::HalfOpen { probing: true };
                Admission::Probe
            }
        }
    }

    fn record(&self, outcome: Option<UpstreamOutcome>, probe: bool) {
        let mut state = self.state.lock().expect("breaker lock");
        match (outcome, &mut *state) {
            (Some(UpstreamOutcome::Success), State::Closed { failures }) => *failures = 0,
            (Some(UpstreamOutcome::Success), State::HalfOpen { .. }) if probe => {
                *state = State::Closed { failures: 0 };
                self.transition("closed");
            }
            (Some(UpstreamOutcome::Failure), State::Closed { failures }) => {
                *failures += 1;
                if *failures >= self.threshold {
                    *state = State::Open {
                        until: Instant::now() + self.open_for,
                    };
                    self.transition("open");
                }
            }
            (Some(UpstreamOutcome::Failure), State::HalfOpen { .. }) if probe => {
                *state = State::Open {
                    until: Instant::now() + self.open_for,
                };
                self.transition("open");
            }
            // The probe never reached the upstream (a lock refusal, a replay): let another try.
            (None, State::HalfOpen { probing }) if probe => *probing = false,
            _ => {}
        }
    }

    fn transition(&self, to: &'static str) {
        tracing::info!(upstream = %self.upstream, state = to, "circuit breaker");
        metrics::counter!("gateway_breaker_transitions_total", "upstream" => self.upstream.clone(), "state" => to)
            .increment(1);
    }
}

/// Adds [`CircuitBreaker`].
#[derive(Clone)]
pub struct BreakerLayer {
    breaker: Arc<Breaker>,
}

impl BreakerLayer {
    /// Around a shared breaker.
    pub fn new(breaker: Arc<Breaker>) -> Self {
        Self { breaker }
    }
}

impl<S> Layer<S> for BreakerLayer {
    type Service = CircuitBreaker<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreaker {
            inner,
            breaker: self.breaker.clone(),
        }
    }
}

/// Fails fast while the upstream's breaker is open.
#[derive(Clone)]
pub struct CircuitBreaker<S> {
    inner: S,
    breaker: Arc<Breaker>,
}

impl<S: Inner> Service<GatewayRequest> for CircuitBreaker<S> {
    layer_service_types!();

    fn call(&mut self, req: GatewayRequest) -> Self::Future {
        let mut inner = take_ready(&mut self.inner);
        let breaker = self.breaker.clone();
        Box::pin(async move {
            let probe = match breaker.admit() {
                Admission::Pass => false,
                Admission::Probe => true,
                Admission::Reject(wait) => {
                    return Ok(Problem::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "circuit-open",
                        "Upstream circuit open",
                    )
                    .detail(format!(
                        "upstream {} failed repeatedly; requests are refused until it is probed again",
                        breaker.upstream
                    ))
                    .retry_after(wait.as_millis().div_ceil(1000) as u64)
                    .into_response());
                }
            };
            let mut guard = ProbeGuard {
                breaker: breaker.clone(),
                probe,
                done: false,
            };
            let resp = inner.call(req).await?;
            guard.done = true;
            breaker.record(resp.extensions().get::<UpstreamOutcome>().copied(), probe);
            Ok(resp)
        })
    }
}

/// A probe dropped before its answer (the client left) must not leave the breaker half-open
/// with no probe ever finishing.
struct ProbeGuard {
    breaker: Arc<Breaker>,
    probe: bool,
    done: bool,
}

impl Drop for ProbeGuard {
    fn drop(&mut self) {
        if !self.done && self.probe {
            self.breaker.record(None, true);
        }
    }
}

/// `breaker = { ... }` of a route (shared by every route with the same upstream).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    /// Turn the breaker off.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Consecutive failures (5xx, unreachable, timeout) that open it.
    #[serde(default = "default_failures")]
    pub failure_threshold: u32,
    /// How long it stays open before one probe is let through.
    #[serde(default = "default_open_ms")]
    pub open_ms: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            failure_threshold: default_failures(),
            open_ms: default_open_ms(),
        }
    }
}

impl BreakerConfig {
    /// Checks the table at key `at` (`routes[0].breaker`).
    pub(crate) fn validate(&self, at: &str) -> Result<(), crate::config::ConfigError> {
        if self.enabled && (self.failure_threshold == 0 || self.open_ms == 0) {
            return Err(crate::config::invalid(
                at,
                "failure_threshold and open_ms must be greater than 0",
            ));
        }
        Ok(())
    }
}

fn default_true() -> bool {
    true
}
fn default_failures() -> u32 {
    5
}
fn default_open_ms() -> u64 {
    10_000
}
