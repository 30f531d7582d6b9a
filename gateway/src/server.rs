//! Runs the gateway: connects the stores, has the route table (`routes`) built, then accepts
//! connections and serves each with the front handler (`front`) until the shutdown token is
//! cancelled, and drains: requests in progress finish, then the connections close.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use axum::{Router, body::Body, extract::State, routing::get};
use http::Request;
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use sqlx::{PgPool, postgres::PgPoolOptions};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::ServiceExt;

use crate::{
    caller::Callers,
    config::{Config, StoreKind},
    front::{Shared, front, healthz, is_admin_path, method_not_allowed, metrics, readyz},
    idempotency::{RecordStore, postgres::PgRecords, redis::RedisRecords},
    lock::LockStore,
    routes::RouteTable,
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

/// A configured gateway, connected to its stores, ready to serve.
pub struct Gateway {
    config: Config,
    shared: Arc<Shared>,
    records: RecordStore,
    locks: LockStore,
}

/// Checks that the gateway's migrations (0003, and 0010 for the interval lock functions) have
/// been applied to this database.
pub async fn has_schema(pool: &PgPool) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let out = sqlx::query_scalar(
        "SELECT to_regclass('gateway.idempotency_records') IS NOT NULL
            AND to_regclass('gateway.lock_entries') IS NOT NULL
            AND to_regprocedure('gateway.lock_try(bigint,interval)') IS NOT NULL",
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
                Some((pool, mode))
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
            (Some((pool, mode)), _) => (
                RecordStore::Postgres(PgRecords::with_mode(pool.clone(), *mode)),
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
        let routes = RouteTable::build(&config, &records, &locks, &connector);
        let shared = Arc::new(Shared {
            routes,
            callers: Callers::new(&config.callers),
            pg: pg.map(|(pool, _)| pool),
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
