//! Shared helpers for the integration tests in `tests/tests/`: a fresh, migrated database per
//! test and random broker names, so tests never see each other's rows or queues.

pub mod otlp;
pub mod proxy;
pub mod trace;

use sqlx::{Connection, PgConnection, PgPool, postgres::PgPoolOptions};

/// The server every test database is created on (`DATABASE_URL`, default: local `test`).
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// The broker (`AMQP_URL`, default: local guest).
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// Redis (`REDIS_URL`, default: local).
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A short random name for queues, exchanges and databases, e.g. `t3f9a1c`.
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}_{:016x}", rand::random::<u64>())
}

/// A database of its own for one test.
pub struct TestDb {
    /// Its connection URL (hand it to a relay process).
    pub url: String,
    /// A pool on it.
    pub pool: PgPool,
}

/// Creates an empty database with every migration applied.
pub async fn fresh_db() -> TestDb {
    let name = unique_name("t");
    let base = database_url();
    let mut admin = PgConnection::connect(&base)
        .await
        .expect("connect to DATABASE_URL");
    // `name` is made here from hex digits only.
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await
        .expect("create test database");
    admin.close().await.ok();
    let url = replace_db_name(&base, &name);
    let pool = PgPoolOptions::new()
        .max_connections(10)
        .connect(&url)
        .await
        .expect("connect to test database");
    migrations::MIGRATOR
        .run(&pool)
        .await
        .expect("migrate test database");
    TestDb { url, pool }
}

fn replace_db_name(url: &str, name: &str) -> String {
    let (head, query) = match url.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (url, None),
    };
    let base = head.rsplit_once('/').map(|(b, _)| b).unwrap_or(head);
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

/// A message as it arrived at a test queue.
#[derive(Debug, Clone)]
pub struct Received {
    /// The AMQP `message_id` property.
    pub message_id: Option<String>,
    /// The AMQP `delivery_mode` property.
    pub delivery_mode: Option<u8>,
    /// The AMQP `content_type` property.
    pub content_type: Option<String>,
    /// The headers.
    pub headers: lapin::types::FieldTable,
    /// The routing key it was published with.
    pub routing_key: String,
    /// The body.
    pub payload: Vec<u8>,
}

impl Received {
    /// A header as text (long or short string), if present.
    pub fn header_str(&self, name: &str) -> Option<String> {
        use lapin::types::AMQPValue;
        match self.headers.inner().get(name)? {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
            _ => None,
        }
    }
}

/// A durable queue of a test, consumed into memory as messages arrive.
pub struct TestQueue {
    /// The queue's name (publish to exchange `""` with this routing key).
    pub name: String,
    received: std::sync::Arc<std::sync::Mutex<Vec<Received>>>,
    connection: lapin::Connection,
}

impl TestQueue {
    /// Declares a durable queue with a random name and starts consuming it.
    pub async fn new(prefix: &str) -> TestQueue {
        Self::named(&unique_name(prefix)).await
    }

    /// Declares (or reuses) the durable queue `name` and starts consuming it.
    pub async fn named(name: &str) -> TestQueue {
        use futures::StreamExt;
        use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueDeclareOptions};
        let connection =
            lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
                .await
                .expect("connect to AMQP_URL");
        let channel = connection.create_channel().await.expect("channel");
        channel
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                Default::default(),
            )
            .await
            .expect("declare queue");
        let mut consumer = channel
            .basic_consume(
                name.into(),
                "".into(),
                BasicConsumeOptions::default(),
                Default::default(),
            )
            .await
            .expect("consume");
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = received.clone();
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                let props = &delivery.properties;
                sink.lock().unwrap().push(Received {
                    message_id: props.message_id().as_ref().map(|s| s.as_str().to_owned()),
                    delivery_mode: *props.delivery_mode(),
                    content_type: props.content_type().as_ref().map(|s| s.as_str().to_owned()),
                    headers: props.headers().clone().unwrap_or_default(),
                    routing_key: delivery.routing_key.as_str().to_owned(),
                    payload: delivery.data.clone(),
                });
                let _ = delivery.acker.ack(BasicAckOptions::default()).await;
            }
        });
        TestQueue {
            name: name.to_owned(),
            received,
            connection,
        }
    }

    /// Everything received so far.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Waits until `pred` holds for what was received, or panics after `timeout`.
    pub async fn wait_until(
        &self,
        timeout: std::time::Duration,
        what: &str,
        pred: impl Fn(&[Received]) -> bool,
    ) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let got = self.received();
            if pred(&got) {
                return got;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {what}; received {}",
                    got.len()
                );
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// Waits until at least `n` messages arrived.
    pub async fn wait_for(&self, n: usize, timeout: std::time::Duration) -> Vec<Received> {
        self.wait_until(timeout, &format!("{n} messages"), |got| got.len() >= n)
            .await
    }

    /// Deletes the queue.
    pub async fn delete(self) {
        if let Ok(ch) = self.connection.create_channel().await {
            let _ = ch
                .queue_delete(self.name.as_str().into(), Default::default())
                .await;
        }
        let _ = self.connection.close(200, "done".into()).await;
    }
}

/// Polls `cond` every 10 ms until it returns true, or panics after `timeout` naming `what`.
pub async fn eventually<F, Fut>(timeout: std::time::Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !cond().await {
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
