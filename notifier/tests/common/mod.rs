//! Shared pieces of the notifier tests: a real HTTP receiver on loopback whose answers a test
//! scripts, a worker started with test timings, and polling helpers.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use notifier::{EndpointSpec, Schedule, Worker, WorkerConfig};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub at: Instant,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Seen {
    pub fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    }
}

/// What the receiver answers.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: String,
    pub retry_after: Option<String>,
    pub delay: Duration,
}

impl Answer {
    pub fn status(status: u16) -> Self {
        Answer {
            status,
            body: String::new(),
            retry_after: None,
            delay: Duration::ZERO,
        }
    }
    pub fn body(mut self, body: &str) -> Self {
        self.body = body.to_owned();
        self
    }
    pub fn retry_after(mut self, v: &str) -> Self {
        self.retry_after = Some(v.to_owned());
        self
    }
    pub fn delay(mut self, d: Duration) -> Self {
        self.delay = d;
        self
    }
}

#[derive(Default)]
struct ReceiverState {
    seen: Vec<Seen>,
    /// Answers to give in order; when empty, `then` is given.
    script: VecDeque<Answer>,
    then: Option<Answer>,
    in_flight: usize,
    max_in_flight: usize,
}

/// A webhook receiver on 127.0.0.1:0.
#[derive(Clone)]
pub struct Receiver {
    pub addr: SocketAddr,
    state: Arc<Mutex<ReceiverState>>,
}

impl Receiver {
    /// Answers `script` in order, then `then` for ever.
    pub async fn start(script: Vec<Answer>, then: Answer) -> Receiver {
        let state = Arc::new(Mutex::new(ReceiverState {
            script: script.into(),
            then: Some(then),
            ..Default::default()
        }));
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Receiver { addr, state }
    }

    /// Fails `n` times with 500, then answers 200.
    pub async fn failing(n: usize) -> Receiver {
        Self::start(vec![Answer::status(500); n], Answer::status(200)).await
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    pub fn seen_for(&self, id: i64) -> Vec<Seen> {
        let id = id.to_string();
        self.seen()
            .into_iter()
            .filter(|s| s.header("webhook-id") == id)
            .collect()
    }

    pub fn max_in_flight(&self) -> usize {
        self.state.lock().unwrap().max_in_flight
    }
}

async fn handle(
    State(state): State<Arc<Mutex<ReceiverState>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let answer = {
        let mut s = state.lock().unwrap();
        s.seen.push(Seen {
            at: Instant::now(),
            headers,
            body: body.to_vec(),
        });
        s.in_flight += 1;
        s.max_in_flight = s.max_in_flight.max(s.in_flight);
        let next = s.script.pop_front();
        next.or_else(|| s.then.clone()).unwrap()
    };
    tokio::time::sleep(answer.delay).await;
    state.lock().unwrap().in_flight -= 1;
    let mut resp = (StatusCode::from_u16(answer.status).unwrap(), answer.body).into_response();
    if let Some(ra) = answer.retry_after {
        resp.headers_mut()
            .insert("retry-after", ra.parse().unwrap());
    }
    resp
}

/// Worker timings for tests: fast polling, no jitter, `scale` on the schedule.
pub fn worker_config(scale: f64) -> WorkerConfig {
    WorkerConfig {
        time_scale: scale,
        jitter: 0.0,
        poll_interval: Duration::from_millis(10),
        lease: Duration::from_secs(10),
        ..WorkerConfig::default()
    }
}

/// A running worker.
pub struct RunningWorker {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl RunningWorker {
    pub fn start(pool: &PgPool, cfg: WorkerConfig) -> RunningWorker {
        let stop = CancellationToken::new();
        let task = tokio::spawn(Worker::new(pool.clone(), cfg).unwrap().run(stop.clone()));
        RunningWorker { stop, task }
    }

    /// Stops it and waits until its attempts in flight are recorded.
    pub async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("worker stops within 10 s")
            .unwrap();
    }
}

/// Creates endpoint `id` posting to `url` with `secret` and its own `schedule` (if any).
pub async fn endpoint(
    pool: &PgPool,
    id: &str,
    url: &str,
    secret: &str,
    schedule: Option<&str>,
) -> EndpointSpec {
    let mut spec = EndpointSpec::new(id, url, secret);
    spec.schedule = schedule.map(|s| Schedule::parse(s).unwrap());
    spec.timeout = Duration::from_secs(3);
    let mut conn = pool.acquire().await.unwrap();
    spec.upsert(&mut conn, Duration::from_secs(3600))
        .await
        .unwrap();
    spec
}

/// Sends a JSON notification in its own transaction.
pub async fn send_json(pool: &PgPool, endpoint: &str, body: serde_json::Value) -> i64 {
    let mut tx = pool.begin().await.unwrap();
    let id = notifier::send(
        &mut tx,
        &notifier::NewNotification::json(endpoint, "order.paid", &body).unwrap(),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    id
}

/// The notification's status.
pub async fn status(pool: &PgPool, id: i64) -> String {
    sqlx::query_scalar("SELECT status FROM notify.notifications WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Polls until the notification has `want` status, or panics after `timeout`.
pub async fn wait_status(pool: &PgPool, id: i64, want: &str, timeout: Duration) {
    integration_tests::eventually(timeout, &format!("notification {id} {want}"), || async {
        status(pool, id).await == want
    })
    .await;
}

/// `(attempt_no, http_status, succeeded, error)` of each recorded attempt.
pub async fn attempts(pool: &PgPool, id: i64) -> Vec<(i32, Option<i32>, bool, Option<String>)> {
    sqlx::query_as(
        "SELECT attempt_no, http_status, succeeded, error FROM notify.attempts \
         WHERE notification_id = $1 ORDER BY attempt_no, id",
    )
    .bind(id)
    .fetch_all(pool)
    .await
    .unwrap()
}

pub const SECRET: &str = "whsec-test-0123456789abcdef";
