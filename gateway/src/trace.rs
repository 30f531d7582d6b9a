//! The outermost layer of a route: a span per request (route, caller, method, path, request id)
//! that every inner layer logs under, and the request counters and latency histogram. The span
//! continues the caller's W3C trace context when the request carries a `traceparent`.

use std::{sync::Arc, time::Instant};

use tower::{Layer, Service};
use tracing::Instrument;

use crate::layer::{Inner, layer_service_types};
use crate::{
    caller::Caller,
    headers::RequestId,
    metrics::RouteMetrics,
    problem::{GatewayProblem, GatewayRequest},
};

/// Adds [`Trace`].
#[derive(Clone)]
pub struct TraceLayer {
    route: Arc<RouteMetrics>,
}

impl TraceLayer {
    /// For one route.
    pub fn new(route: &str) -> Self {
        Self {
            route: Arc::new(RouteMetrics::new(route)),
        }
    }
}

impl<S> Layer<S> for TraceLayer {
    type Service = Trace<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Trace {
            inner,
            route: self.route.clone(),
        }
    }
}

/// Spans, logs and counts requests.
#[derive(Clone)]
pub struct Trace<S> {
    inner: S,
    route: Arc<RouteMetrics>,
}

impl<S: Inner> Service<GatewayRequest> for Trace<S> {
    layer_service_types!();

    fn call(&mut self, req: GatewayRequest) -> Self::Future {
        let caller = req
            .extensions()
            .get::<Caller>()
            .map(|c| c.0.clone())
            .unwrap_or_else(|| Arc::from(""));
        // The fields are formatted only when the span is enabled; nothing is allocated for them
        // when the log level leaves it out.
        let span = tracing::info_span!(
            "request",
            otel.name = "gateway.request",
            otel.kind = "server",
            route = %self.route.route(),
            caller = %caller,
            method = %req.method(),
            path = %req.uri().path(),
            request_id = %req
                .extensions()
                .get::<RequestId>()
                .and_then(|r| r.0.to_str().ok())
                .unwrap_or_default(),
        );
        // A caller's W3C `traceparent` makes this span (and the upstream call under it) part
        // of the caller's trace. Without one there is nothing to extract (most requests).
        if req.headers().contains_key(telemetry::TRACEPARENT) {
            telemetry::set_parent_from_http(&span, req.headers());
        }
        let route = self.route.clone();
        let started = Instant::now();
        let fut = {
            let _enter = span.enter();
            self.inner.call(req)
        };
        Box::pin(
            async move {
                let resp = fut.await?;
                let elapsed = started.elapsed();
                let problem = resp.extensions().get::<GatewayProblem>().map(|p| p.0);
                tracing::info!(
                    status = resp.status().as_u16(),
                    latency_ms = elapsed.as_millis() as u64,
                    problem,
                    "finished"
                );
                route.record(&caller, resp.status(), elapsed);
                Ok(resp)
            }
            .instrument(span),
        )
    }
}
