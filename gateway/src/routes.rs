//! The route table: one tower stack per configured route, built here in the order the layers
//! are read (trace → limits and breaker → timeout → idempotency → lock → retry → proxy), and
//! the matching of a request path to its route (longest prefix, on a segment boundary).

use std::{collections::HashMap, convert::Infallible, sync::Arc, time::Duration};

use futures::future::BoxFuture;
use tower::{Service, ServiceBuilder, ServiceExt};

use crate::{
    breaker::{Breaker, BreakerConfig, BreakerLayer},
    config::{Config, parse_upstream},
    idempotency::{IdempotencyLayer, IdempotencySettings, RecordStore},
    limit::{LimitLayer, RateLimiter},
    lock::{LockLayer, LockSettings, LockStore},
    pool::Connector,
    problem::{GatewayRequest, GatewayResponse},
    proxy::Proxy,
    retry::{RetryLayer, RetrySettings},
    timeout::TimeoutLayer,
    trace::TraceLayer,
};

pub(crate) type RouteFuture = BoxFuture<'static, Result<GatewayResponse, Infallible>>;

/// A route's stack behind one shared pointer: each request calls a clone of the concrete stack
/// (reference counts, no allocation) and gets the outermost layer's boxed future as it is.
pub(crate) type RouteService = Arc<dyn Fn(GatewayRequest) -> RouteFuture + Send + Sync>;

fn route_service<S>(stack: S) -> RouteService
where
    S: Service<
            GatewayRequest,
            Response = GatewayResponse,
            Error = Infallible,
            Future = RouteFuture,
        > + Clone
        + Send
        + Sync
        + 'static,
{
    Arc::new(move |req| {
        let mut svc = stack.clone();
        // No layer holds requests back in `poll_ready`, so it answers at once; should one ever
        // not be ready, the request waits for it properly.
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match svc.poll_ready(&mut cx) {
            std::task::Poll::Ready(Ok(())) => svc.call(req),
            std::task::Poll::Ready(Err(never)) => match never {},
            std::task::Poll::Pending => Box::pin(async move {
                ServiceExt::ready(&mut svc).await?;
                svc.call(req).await
            }),
        }
    })
}

/// One route: its prefix, its request bounds and its stack.
pub(crate) struct RouteEntry {
    pub(crate) prefix: String,
    pub(crate) max_body: usize,
    pub(crate) timeout: Duration,
    pub(crate) service: RouteService,
}

/// Every route, longest prefix first.
pub(crate) struct RouteTable {
    routes: Vec<RouteEntry>,
}

impl RouteTable {
    /// Builds every route's stack from a validated config, over the shared stores and
    /// connector.
    pub(crate) fn build(
        config: &Config,
        records: &RecordStore,
        locks: &LockStore,
        connector: &Connector,
    ) -> Self {
        // One connection pool per upstream, shared by the routes that name it.
        let mut pools: HashMap<String, Arc<crate::pool::Pool>> = HashMap::new();
        let mut breakers: HashMap<String, Arc<Breaker>> = HashMap::new();
        let mut routes = Vec::new();
        for route in &config.routes {
            let upstream = parse_upstream(&route.upstream).expect("validated upstream");
            let bc = route.breaker.clone().unwrap_or_default();
            // One breaker per upstream host: the first route naming it sets its thresholds.
            let breaker = bc.enabled.then(|| {
                breakers
                    .entry(upstream.authority.to_string())
                    .or_insert_with(|| {
                        let BreakerConfig {
                            failure_threshold,
                            open_ms,
                            ..
                        } = bc;
                        Arc::new(Breaker::new(
                            upstream.authority.as_str(),
                            failure_threshold,
                            Duration::from_millis(open_ms),
                        ))
                    })
                    .clone()
            });
            let label = route.prefix.clone();
            let rate = route.rate_limit.as_ref().map(|r| {
                let burst = r.burst.unwrap_or_else(|| r.per_sec.ceil().max(1.0) as u32);
                RateLimiter::new(&label, r.per_sec, burst)
            });
            let limits = (rate.is_some() || route.max_concurrency.is_some())
                .then(|| LimitLayer::new(&label, rate, route.max_concurrency));
            let stack = ServiceBuilder::new()
                .layer(TraceLayer::new(&label))
                .option_layer(limits)
                .option_layer(breaker.map(BreakerLayer::new))
                .layer(TimeoutLayer::new(Duration::from_millis(route.timeout_ms)))
                .option_layer(
                    IdempotencySettings::from_route(route)
                        .map(|s| IdempotencyLayer::new(s, records.clone())),
                )
                .option_layer(
                    LockSettings::from_route(route).map(|s| LockLayer::new(s, locks.clone())),
                )
                .option_layer(
                    route
                        .retry
                        .as_ref()
                        .map(|r| RetryLayer::new(RetrySettings::new(&label, r))),
                )
                .service(Proxy::new(
                    pools
                        .entry(format!("{}://{}", upstream.scheme, upstream.authority))
                        .or_insert_with(|| crate::proxy::pool(connector.clone(), &upstream))
                        .clone(),
                    route,
                ));
            routes.push(RouteEntry {
                prefix: route.normalized_prefix(),
                max_body: route.max_body_bytes.unwrap_or(config.max_body_bytes),
                timeout: Duration::from_millis(route.timeout_ms),
                service: route_service(stack),
            });
        }
        // Longest prefix first, so `/pay/refunds` wins over `/pay`.
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        RouteTable { routes }
    }

    /// The route `path` belongs to and where its rest (what is forwarded) starts.
    pub(crate) fn find(&self, path: &str) -> Option<(&RouteEntry, usize)> {
        self.routes
            .iter()
            .find_map(|r| matches(&r.prefix, path).map(|cut| (r, cut)))
    }
}

/// Whether `path` is `prefix` or below it, on a segment boundary.
fn matches(prefix: &str, path: &str) -> Option<usize> {
    if prefix.is_empty() {
        return Some(0);
    }
    let rest = path.strip_prefix(prefix)?;
    (rest.is_empty() || rest.starts_with('/')).then_some(prefix.len())
}

/// Dot segments would let `/pay/../admin` climb out of the upstream base path.
pub(crate) fn has_dot_segment(path: &str) -> bool {
    // Without a '.' or a '%' no segment can be one (the common case, checked without splitting).
    if !path.bytes().any(|b| b == b'.' || b == b'%') {
        return false;
    }
    path.split('/').any(|s| is_dot_segment(s.as_bytes()))
}

/// `.` or `..`, each dot possibly written `%2e` or `%2E`.
fn is_dot_segment(mut s: &[u8]) -> bool {
    let mut dots = 0;
    while !s.is_empty() {
        if s[0] == b'.' {
            s = &s[1..];
        } else if s.len() >= 3 && s[0] == b'%' && s[1] == b'2' && s[2].eq_ignore_ascii_case(&b'e') {
            s = &s[3..];
        } else {
            return false;
        }
        dots += 1;
    }
    dots == 1 || dots == 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_match_whole_segments() {
        assert_eq!(matches("/pay", "/pay"), Some(4));
        assert_eq!(matches("/pay", "/pay/x"), Some(4));
        assert_eq!(matches("/pay", "/payment"), None);
        assert_eq!(matches("", "/anything"), Some(0));
    }

    #[test]
    fn dot_segments_are_detected() {
        assert!(has_dot_segment("/pay/../admin"));
        assert!(has_dot_segment("/pay/%2E%2e/admin"));
        assert!(!has_dot_segment("/pay/a.b"));
        assert!(has_dot_segment("/."));
        assert!(has_dot_segment("/pay/.%2E"));
        assert!(has_dot_segment("/pay/%2e/x"));
        assert!(!has_dot_segment("/pay/.../x"));
        assert!(!has_dot_segment("/pay/%2e%2e%2e"));
        assert!(!has_dot_segment("/pay/%2f"));
        assert!(!has_dot_segment("/pay/%2"));
        assert!(!has_dot_segment("/pay/x"));
        assert!(!has_dot_segment(""));
    }
}
