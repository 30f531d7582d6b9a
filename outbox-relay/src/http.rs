//! The relay's HTTP server: `/healthz`, `/readyz`, `/metrics`, and the prepared-message API.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::relay::Health;

#[derive(Clone)]
struct AppState {
    pool: PgPool,
    health: Arc<Health>,
    metrics: Option<PrometheusHandle>,
}

/// The router: probes and metrics, merged with `extra` (for example the prepared-message API).
pub fn router(
    pool: PgPool,
    health: Arc<Health>,
    metrics: Option<PrometheusHandle>,
    extra: Router,
) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(AppState {
            pool,
            health,
            metrics,
        })
        .merge(extra)
}

/// Serves `router` on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

async fn healthz() -> &'static str {
    "ok"
}

/// Ready when the database answers and at least one worker holds a broker connection.
async fn readyz(State(state): State<AppState>) -> Response {
    let db = sqlx::raw_sql("SELECT 1").execute(&state.pool).await.is_ok();
    let brokers = state.health.brokers_connected.load(Ordering::Relaxed);
    let ready = db && brokers > 0;
    let body = serde_json::json!({
        "database": if db { "ok" } else { "unreachable" },
        "broker": if brokers > 0 { "ok" } else { "unreachable" },
        "broker_connections": brokers,
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn render_metrics(State(state): State<AppState>) -> Response {
    match &state.metrics {
        Some(handle) => {
            handle.run_upkeep();
            (
                [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                handle.render(),
            )
                .into_response()
        }
        None => (StatusCode::NOT_FOUND, "metrics not installed").into_response(),
    }
}

/// The relay's error answers (the prepared-message, saga and dashboard APIs): the shared
/// problem document ([`http_common::Problem`]) of type `about:blank`, always with a detail.
#[derive(Debug)]
pub(crate) struct Problem(http_common::Problem);

impl Problem {
    pub(crate) fn new(status: StatusCode, title: &'static str, detail: impl Into<String>) -> Self {
        Problem(http_common::Problem::new(status, title).detail(detail))
    }

    /// 422 for a request that parsed but cannot be accepted.
    pub(crate) fn invalid(detail: impl Into<String>) -> Self {
        Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid request", detail)
    }

    /// Adds a `WWW-Authenticate` challenge.
    pub(crate) fn challenge(self, challenge: &'static str) -> Self {
        Problem(self.0.challenge(challenge))
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        self.0.into_response()
    }
}
