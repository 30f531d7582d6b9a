//! The route timeout: the whole exchange below this layer (idempotency claim, lock wait, retries,
//! upstream) must finish in time, else 504. Dropping the inner future is what cancels the
//! upstream call; the layers below settle their records and locks in their drop guards.

use std::time::Duration;

use axum::response::IntoResponse;
use tower::{Layer, Service};

use crate::layer::{Inner, layer_service_types};
use crate::problem::{self, GatewayRequest};

/// Adds [`Timeout`].
#[derive(Debug, Clone, Copy)]
pub struct TimeoutLayer {
    timeout: Duration,
}

impl TimeoutLayer {
    /// With the route's budget.
    pub fn new(timeout: Duration) -> Self {
        Self { timeout }
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Timeout {
            inner,
            timeout: self.timeout,
        }
    }
}

/// Answers 504 when the inner service takes too long.
#[derive(Debug, Clone)]
pub struct Timeout<S> {
    inner: S,
    timeout: Duration,
}

impl<S: Inner> Service<GatewayRequest> for Timeout<S> {
    layer_service_types!();

    fn call(&mut self, req: GatewayRequest) -> Self::Future {
        let fut = self.inner.call(req);
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, fut).await {
                Ok(r) => r,
                Err(_) => Ok(problem::upstream_timeout(timeout.as_millis() as u64).into_response()),
            }
        })
    }
}
