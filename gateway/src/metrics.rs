//! Prometheus metrics. The recorder is process-wide (the `metrics` crate has one global
//! recorder), installed on first use, so several gateways in one test process share it.

use std::{
    sync::{Arc, OnceLock, RwLock},
    time::Duration,
};

use http::StatusCode;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The handle that renders `/metrics`, installing the recorder if needed.
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Suffix("_seconds".into()),
                &[
                    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ],
            )
            .expect("non-empty buckets")
            .build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("another metrics recorder is installed; /metrics will be empty");
        }
        handle
    })
}

/// Renders the text exposition format.
pub fn render() -> String {
    let h = handle();
    h.run_upkeep();
    h.render()
}

/// Counts a finished request and records its latency.
pub fn record_request(route: &str, caller: &str, status: StatusCode, elapsed: Duration) {
    let labels = [
        ("route", route.to_owned()),
        ("caller", caller.to_owned()),
        ("status", status.as_u16().to_string()),
    ];
    metrics::counter!("gateway_requests_total", &labels).increment(1);
    metrics::histogram!("gateway_request_duration_seconds", "route" => route.to_owned())
        .record(elapsed.as_secs_f64());
}

/// One route's request counters and latency histogram, registered once and then reused: the
/// per-request cost is a short scan under a read lock instead of building, hashing and
/// registering a labelled key.
pub struct RouteMetrics {
    route: Arc<str>,
    duration: OnceLock<metrics::Histogram>,
    /// (status, caller, counter). Callers come from the config and statuses are three digits,
    /// and a route sees few combinations: a list scanned in order beats hashing the caller.
    counters: RwLock<Vec<(u16, Arc<str>, metrics::Counter)>>,
}

impl RouteMetrics {
    /// For the route labelled `route`.
    pub fn new(route: &str) -> Self {
        Self {
            route: Arc::from(route),
            duration: OnceLock::new(),
            counters: RwLock::new(Vec::new()),
        }
    }

    /// The route label.
    pub fn route(&self) -> &str {
        &self.route
    }

    /// The same as [`record_request`] for this route.
    pub fn record(&self, caller: &Arc<str>, status: StatusCode, elapsed: Duration) {
        let status = status.as_u16();
        let find = |list: &[(u16, Arc<str>, metrics::Counter)]| {
            list.iter()
                .find(|(s, c, _)| *s == status && (Arc::ptr_eq(c, caller) || **c == **caller))
                .map(|(_, _, counter)| counter.clone())
        };
        let found = find(&self.counters.read().expect("metrics lock"));
        let counter = found.unwrap_or_else(|| {
            let mut list = self.counters.write().expect("metrics lock");
            find(&list).unwrap_or_else(|| {
                let labels = [
                    ("route", self.route.to_string()),
                    ("caller", caller.to_string()),
                    ("status", status.to_string()),
                ];
                let counter = metrics::counter!("gateway_requests_total", &labels);
                list.push((status, caller.clone(), counter.clone()));
                counter
            })
        });
        counter.increment(1);
        self.duration
            .get_or_init(|| {
                metrics::histogram!("gateway_request_duration_seconds", "route" => self.route.to_string())
            })
            .record(elapsed.as_secs_f64());
    }
}
