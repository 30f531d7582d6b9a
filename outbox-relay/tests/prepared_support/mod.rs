//! Shared by the prepared-message tests: a real HTTP server on loopback and row inspection.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use outbox_relay::prepared::checkback::CheckbackConfig;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub const WAIT: Duration = Duration::from_secs(20);

/// A server on 127.0.0.1:0 serving `router` until dropped.
pub struct Server {
    pub addr: SocketAddr,
    shutdown: CancellationToken,
}

impl Server {
    pub async fn start(router: axum::Router) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
                .unwrap();
        });
        Server { addr, shutdown }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Check-back on a test-scaled schedule: first check after 200 ms, then 50/100/200 ms apart.
pub fn fast_checkback(max_checks: u32) -> CheckbackConfig {
    CheckbackConfig {
        check_after_ms: Duration::from_millis(200),
        max_checks,
        backoff_min_ms: Duration::from_millis(50),
        backoff_max_ms: Duration::from_millis(200),
        jitter: false,
        request_timeout_ms: Duration::from_secs(3),
        poll_interval_ms: Duration::from_millis(20),
        ..CheckbackConfig::default()
    }
}

/// Check-back running in the background until dropped.
pub struct Checkback {
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Checkback {
    pub fn start(pool: &PgPool, config: CheckbackConfig) -> Checkback {
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(outbox_relay::prepared::checkback::run(
            pool.clone(),
            config,
            shutdown.clone(),
        ));
        Checkback {
            shutdown,
            task: Some(task),
        }
    }

    /// Stops and surfaces any error the loop returned.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        self.task.take().unwrap().await.unwrap().unwrap();
    }
}

impl Drop for Checkback {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub async fn count(pool: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// The payload of message `id` in outbox.messages, if it is there.
pub async fn outbox_payload(pool: &PgPool, id: i64) -> Option<Vec<u8>> {
    sqlx::query_scalar("SELECT payload FROM outbox.messages WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
        .unwrap()
}

/// The recorded outcome of message `id`: (decision, decided_by).
pub async fn outcome(pool: &PgPool, id: i64) -> Option<(String, String)> {
    sqlx::query_as("SELECT decision, decided_by FROM outbox.prepared_outcomes WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
        .unwrap()
}

/// The prepared row of message `id`: (state, check_attempts, last_check_error).
pub async fn prepared_row(pool: &PgPool, id: i64) -> Option<(String, i32, Option<String>)> {
    sqlx::query_as(
        "SELECT state, check_attempts, last_check_error FROM outbox.prepared_messages WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await
    .unwrap()
}
