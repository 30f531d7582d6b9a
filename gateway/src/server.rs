//! Assembles the gateway: connects the stores, builds one tower stack per route, and serves the
//! front handler (authentication, routing, request id, body limit) plus `/healthz`, `/readyz`
//! and `/metrics` until the shutdown token is cancelled.

use std::{collections::HashMap, convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    Router,
    body::Body,
    extract::State,
    response::{IntoResponse, Response},
    routing::get,
};
use bytes::Bytes;
use futures::future::BoxFuture;
use http::{HeaderValue, Request, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use sqlx::{PgPool, postgres::PgPoolOptions};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::{Service, ServiceBuilder, ServiceExt};

use crate::{
    breaker::{Breaker, BreakerLayer},
    caller::Callers,
    config::{BreakerConfig, Config, StoreKind, parse_upstream},
    headers::{RequestId, X_REQUEST_ID, request_id},
    idempotency::{
        IdempotencyLayer, IdempotencySettings, RecordStore, postgres::PgRecords,
        redis::RedisRecords,
    },
    limit::{LimitLayer, RateLimiter},
    lock::{LockLayer, LockSettings, LockStore},
    problem::{GatewayRequest, GatewayResponse, Problem},
    proxy::{ForwardPath, Proxy},
    retry::{RetryLayer, RetrySettings},
    timeout::TimeoutLayer,
    trace::TraceLayer,
};

/// The gateway could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// PostgreSQL could not be reached.
    #[error("cannot connect to database_url: {0}")]
    Database(#[source] sqlx::Error),
    /// The `gateway` tables are not there.
    #[error(
        "the database has no gateway tables (schema `gateway`, migration 0003_gateway); run `outbox-relay migrate` or `gateway migrate --config FILE` first"
    )]
    MissingSchema,
    /// `DATABASE_POOL_MODE` is invalid or does not match the database (names the setting).
    #[error(transparent)]
    PoolMode(#[from] outbox::pool::PoolError),
    /// Redis could not be reached.
    #[error("cannot connect to redis_url: {0}")]
    Redis(#[source] redis::RedisError),
    /// The TLS settings cannot be used.
    #[error(transparent)]
    Tls(#[from] crate::config::ConfigError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

type RouteFuture = BoxFuture<'static, Result<GatewayResponse, Infallible>>;

/// A route's stack behind one shared pointer: each request calls a clone of the concrete stack
/// (reference counts, no allocation) and gets the outermost layer's boxed future as it is.
type RouteService = Arc<dyn Fn(GatewayRequest) -> RouteFuture + Send + Sync>;

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

struct RouteEntry {
    prefix: String,
    max_body: usize,
    timeout: Duration,
    service: RouteService,
}

struct Shared {
    routes: Vec<RouteEntry>,
    callers: Callers,
    pg: Option<PgPool>,
    redis: Option<redis::aio::MultiplexedConnection>,
}

/// A configured gateway, connected to its stores, ready to serve.
pub struct Gateway {
    config: Config,
    shared: Arc<Shared>,
    records: RecordStore,
    locks: LockStore,
}

/// Checks that migration 0003 has been applied to this database.
pub async fn has_schema(pool: &PgPool) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let out = sqlx::query_scalar(
        "SELECT to_regclass('gateway.idempotency_records') IS NOT NULL
            AND to_regclass('gateway.lock_entries') IS NOT NULL
            AND to_regprocedure('gateway.lock_try(bigint,bigint)') IS NOT NULL",
    )
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(out)
}

impl Gateway {
    /// Connects the stores named by a validated config and builds every route's stack.
    pub async fn connect(config: Config) -> Result<Self, StartError> {
        crate::metrics::handle();
        let pg = match &config.database_url {
            Some(url) if config.store == StoreKind::Postgres => {
                // DATABASE_POOL_MODE=transaction behind PgBouncer's transaction pooling.
                let mode = outbox::pool::PoolMode::from_env()?;
                let pool = PgPoolOptions::new()
                    .max_connections(20)
                    .acquire_timeout(Duration::from_secs(5))
                    .connect_with(outbox::pool::connect_options(url, mode)?)
                    .await
                    .map_err(StartError::Database)?;
                outbox::pool::check(&pool, mode).await?;
                if !has_schema(&pool).await.map_err(StartError::Database)? {
                    return Err(StartError::MissingSchema);
                }
                Some(pool)
            }
            _ => None,
        };
        let redis = match &config.redis_url {
            Some(url) if config.store == StoreKind::Redis => {
                let client = redis::Client::open(url.as_str()).map_err(StartError::Redis)?;
                Some(
                    client
                        .get_multiplexed_async_connection()
                        .await
                        .map_err(StartError::Redis)?,
                )
            }
            _ => None,
        };
        let (records, locks) = match (&pg, &redis) {
            (Some(pool), _) => (
                RecordStore::Postgres(PgRecords::new(pool.clone())),
                LockStore::postgres(pool.clone()),
            ),
            (None, Some(conn)) => (
                RecordStore::Redis(RedisRecords::new(conn.clone(), "gw:")),
                LockStore::redis(conn.clone(), "gw:"),
            ),
            (None, None) => unreachable!("validated config names a store"),
        };
        let tls = crate::tls::client_config(config.tls_roots, config.tls_ca_file.as_deref())?;
        let connector = crate::proxy::connector(tls);
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
        let shared = Arc::new(Shared {
            routes,
            callers: Callers::new(&config.callers),
            pg,
            redis,
        });
        Ok(Self {
            config,
            shared,
            records,
            locks,
        })
    }

    /// The axum router (for embedding; [`Gateway::serve`] uses it).
    pub fn router(&self) -> Router {
        Router::new()
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .method_not_allowed_fallback(method_not_allowed)
            .fallback(front)
            .with_state(self.shared.clone())
    }

    /// Binds the configured `listen` address.
    pub async fn bind(&self) -> Result<TcpListener, StartError> {
        TcpListener::bind(self.config.listen)
            .await
            .map_err(|source| StartError::Bind {
                addr: self.config.listen,
                source,
            })
    }

    /// Serves on `listener` until `shutdown` is cancelled, then lets requests in progress finish.
    ///
    /// Proxied requests go straight to the front handler; only `/healthz`, `/readyz` and
    /// `/metrics` pass through the [`Gateway::router`], so the hot path skips its route table.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        let cleanup = tokio::spawn(cleanup_loop(
            self.records.clone(),
            self.locks.clone(),
            Duration::from_secs(self.config.cleanup_interval_secs),
            shutdown.clone(),
        ));
        let router = self.router();
        let shared = self.shared.clone();
        let connections = TaskTracker::new();
        loop {
            let stream = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        handle_accept_error(e).await;
                        continue;
                    }
                },
            };
            // Answers go out in one write each; Nagle would only hold them back.
            let _ = stream.set_nodelay(true);
            let router = router.clone();
            let shared = shared.clone();
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let req = req.map(Body::new);
                let router = router.clone();
                let shared = shared.clone();
                async move {
                    let resp = if is_admin_path(req.uri().path()) {
                        match router.oneshot(req).await {
                            Ok(r) => r,
                            Err(never) => match never {},
                        }
                    } else {
                        front(State(shared), req).await
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            let shutdown = shutdown.clone();
            connections.spawn(async move {
                let builder = auto::Builder::new(TokioExecutor::new());
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                let mut conn = std::pin::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => return,
                    _ = shutdown.cancelled() => {}
                }
                // Finish the request in progress, then close.
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            });
        }
        drop(listener);
        connections.close();
        connections.wait().await;
        shutdown.cancel();
        let _ = cleanup.await;
        Ok(())
    }
}

/// The paths the [`Gateway::router`] answers itself.
fn is_admin_path(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz" | "/metrics")
}

/// Connection-level accept errors concern one client; anything else (out of file descriptors)
/// is logged and waited out for a second, as `axum::serve` does.
async fn handle_accept_error(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    ) {
        return;
    }
    tracing::error!(cause = %e, "accept error");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

async fn cleanup_loop(
    records: RecordStore,
    locks: LockStore,
    every: Duration,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match records.cleanup().await {
            Ok(n) if n > 0 => tracing::info!(deleted = n, "expired idempotency records removed"),
            Ok(_) => {}
            Err(e) => tracing::warn!(cause = %e, "idempotency cleanup failed"),
        }
        if let Err(e) = locks.cleanup().await {
            tracing::warn!(cause = %e, "lock cleanup failed");
        }
    }
}

async fn method_not_allowed() -> Response {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "Method not allowed",
    )
    .detail("/healthz, /readyz and /metrics answer GET only")
    .into_response()
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    let check = async {
        if let Some(pool) = &shared.pg {
            // The simple protocol: one round, safe behind a transaction pooler.
            sqlx::raw_sql("SELECT 1")
                .execute(pool)
                .await
                .map_err(|e| format!("postgres: {e}"))?;
        }
        if let Some(conn) = &shared.redis {
            let mut conn = conn.clone();
            redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .map_err(|e| format!("redis: {e}"))?;
        }
        Ok::<_, String>(())
    };
    match tokio::time::timeout(Duration::from_secs(2), check).await {
        Ok(Ok(())) => "ready".into_response(),
        Ok(Err(e)) => Problem::new(StatusCode::SERVICE_UNAVAILABLE, "not-ready", "Not ready")
            .detail(e)
            .into_response(),
        Err(_) => Problem::new(StatusCode::SERVICE_UNAVAILABLE, "not-ready", "Not ready")
            .detail("store check timed out")
            .into_response(),
    }
}

async fn metrics() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        crate::metrics::render(),
    )
        .into_response()
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
fn has_dot_segment(path: &str) -> bool {
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

async fn front(State(shared): State<Arc<Shared>>, req: Request<Body>) -> Response {
    let id = request_id(req.headers());
    let mut resp = route_request(&shared, req, id.clone()).await;
    resp.headers_mut().insert(X_REQUEST_ID.clone(), id);
    resp
}

async fn route_request(shared: &Shared, req: Request<Body>, id: HeaderValue) -> Response {
    let started = std::time::Instant::now();
    let refuse = |route: &str, caller: &str, p: Problem| {
        crate::metrics::record_request(route, caller, p.status(), started.elapsed());
        p.into_response()
    };
    let (mut parts, body) = req.into_parts();
    let caller = match shared.callers.identify(&parts.headers) {
        Ok(c) => c,
        Err(p) => return refuse("", "", p),
    };
    if parts.method == http::Method::CONNECT {
        return refuse(
            "",
            &caller.0,
            Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "connect-refused",
                "CONNECT is not supported",
            )
            .detail("the gateway is a reverse proxy for its configured routes, not a tunnel"),
        );
    }
    // Only the path is used: an absolute-form target's scheme and authority, and the Host
    // header, never influence where the request goes.
    let path = parts.uri.path();
    let Some((entry, cut)) = shared
        .routes
        .iter()
        .find_map(|r| matches(&r.prefix, path).map(|cut| (r, cut)))
    else {
        return refuse(
            "",
            &caller.0,
            Problem::new(StatusCode::NOT_FOUND, "no-route", "No route")
                .detail(format!("no route is configured for {path}")),
        );
    };
    if has_dot_segment(path) {
        return refuse(
            &entry.prefix,
            &caller.0,
            Problem::new(StatusCode::BAD_REQUEST, "bad-path", "Bad request path")
                .detail("'.' and '..' path segments are not forwarded"),
        );
    }
    let rest = &path[cut..];
    let query = parts.uri.query();
    let mut forward = String::with_capacity(rest.len().max(1) + query.map_or(0, |q| q.len() + 1));
    forward.push_str(if rest.is_empty() { "/" } else { rest });
    if let Some(q) = query {
        forward.push('?');
        forward.push_str(q);
    }
    let too_large = || {
        Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body-too-large",
            "Request body too large",
        )
        .detail(format!(
            "this route accepts at most {} bytes",
            entry.max_body
        ))
    };
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > entry.max_body as u64) {
        return refuse(&entry.prefix, &caller.0, too_large());
    }
    // A request without a body (most GETs) has nothing to read or bound.
    let bytes = if hyper::body::Body::is_end_stream(&body) {
        Bytes::new()
    } else {
        // A client trickling its body must not hold a connection and a buffer forever.
        let read =
            tokio::time::timeout(entry.timeout, Limited::new(body, entry.max_body).collect());
        let Ok(read) = read.await else {
            return refuse(
                &entry.prefix,
                &caller.0,
                Problem::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "body-timeout",
                    "Request body too slow",
                )
                .detail(format!(
                    "the body did not arrive within the route's timeout of {} ms",
                    entry.timeout.as_millis()
                )),
            );
        };
        match read {
            Ok(c) => c.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return refuse(&entry.prefix, &caller.0, too_large());
            }
            Err(e) => {
                return refuse(
                    &entry.prefix,
                    &caller.0,
                    Problem::new(
                        StatusCode::BAD_REQUEST,
                        "body-unreadable",
                        "Request body unreadable",
                    )
                    .detail(e.to_string()),
                );
            }
        }
    };
    // Keep only the origin form, so the fingerprint does not depend on how the target was written.
    if (parts.uri.scheme().is_some() || parts.uri.authority().is_some())
        && let Some(pq) = parts.uri.path_and_query().cloned()
    {
        parts.uri = http::Uri::from(pq);
    }
    parts.extensions.insert(caller);
    parts.extensions.insert(RequestId(id));
    parts.extensions.insert(ForwardPath(forward));
    let req = Request::from_parts(parts, bytes);
    match (entry.service)(req).await {
        Ok(r) => r,
        Err(never) => match never {},
    }
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
