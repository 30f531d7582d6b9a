//! The HTTP load generator: `connections` keep-alive HTTP/1.1 connections (hyper's client
//! connection over hyper-util's tokio I/O), each sending one request after another for a fixed
//! time, either as fast as the target answers or paced to a total rate; every latency is kept.
//! All targets (upstream directly, nginx, the gateway) are measured by this same tool, so their
//! numbers compare.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

/// What to send, where, how hard.
#[derive(Debug, Clone)]
pub struct Load {
    /// The target.
    pub addr: SocketAddr,
    /// `GET` or `POST`.
    pub method: http::Method,
    /// Request path (with the gateway's route prefix where it applies).
    pub path: String,
    /// Request body (empty for GET).
    pub body: Bytes,
    /// Concurrent connections, one request in flight on each.
    pub connections: usize,
    /// How long to send.
    pub duration: Duration,
    /// Total requests per second over all connections; `None` = as fast as answered.
    pub rate: Option<f64>,
    /// Send a unique `Idempotency-Key` starting with this prefix on every request.
    pub idempotency_prefix: Option<String>,
}

impl Load {
    /// A GET of `path` on `addr`, as fast as answered.
    pub fn get(addr: SocketAddr, path: &str, connections: usize, duration: Duration) -> Self {
        Load {
            addr,
            method: http::Method::GET,
            path: path.to_owned(),
            body: Bytes::new(),
            connections,
            duration,
            rate: None,
            idempotency_prefix: None,
        }
    }

    /// A small JSON POST of `path` on `addr`, as fast as answered.
    pub fn post(addr: SocketAddr, path: &str, connections: usize, duration: Duration) -> Self {
        Load {
            method: http::Method::POST,
            body: Bytes::from_static(br#"{"amount":100,"currency":"EUR"}"#),
            ..Load::get(addr, path, connections, duration)
        }
    }
}

/// What a load run measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Requests answered with 2xx.
    pub ok: u64,
    /// Requests failed or answered otherwise.
    pub errors: u64,
    /// `ok` per second of the run.
    pub rate: f64,
    /// Latencies of the 2xx answers in microseconds, sorted.
    pub latencies_us: Vec<u32>,
}

impl Outcome {
    /// Latency quantile `q` in milliseconds.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        let idx = ((self.latencies_us.len() - 1) as f64 * q).round() as usize;
        self.latencies_us[idx] as f64 / 1000.0
    }

    /// p99 in milliseconds.
    pub fn p99_ms(&self) -> f64 {
        self.quantile_ms(0.99)
    }
}

async fn connect(addr: SocketAddr) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

/// One connection's loop.
async fn connection_loop(load: Load, index: usize) -> anyhow::Result<(u64, u64, Vec<u32>)> {
    let mut sender = connect(load.addr).await?;
    let authority = load.addr.to_string();
    let deadline = Instant::now() + load.duration;
    let mut pace = load.rate.map(|rate| {
        let mut tick =
            tokio::time::interval(Duration::from_secs_f64(load.connections as f64 / rate));
        // Catch up after a slow answer, as an open-loop client would, instead of hiding it.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        tick
    });
    let (mut ok, mut errors, mut latencies) = (0u64, 0u64, Vec::with_capacity(100_000));
    let mut n = 0u64;
    while Instant::now() < deadline {
        if let Some(tick) = pace.as_mut() {
            tick.tick().await;
        }
        // A server may close a keep-alive connection (request limits); open another.
        if sender.ready().await.is_err() {
            sender = connect(load.addr).await?;
        }
        let mut request = http::Request::builder()
            .method(load.method.clone())
            .uri(&load.path)
            .header(http::header::HOST, &authority);
        if !load.body.is_empty() {
            request = request.header(http::header::CONTENT_TYPE, "application/json");
        }
        if let Some(prefix) = &load.idempotency_prefix {
            request = request.header("idempotency-key", format!("\"{prefix}-{index}-{n}\""));
        }
        n += 1;
        let request = request.body(Full::new(load.body.clone()))?;
        let started = Instant::now();
        match sender.send_request(request).await {
            Ok(response) => {
                let status = response.status();
                let body = response.into_body().collect().await;
                if status.is_success() && body.is_ok() {
                    ok += 1;
                    latencies.push(started.elapsed().as_micros().min(u32::MAX as u128) as u32);
                } else {
                    errors += 1;
                }
            }
            Err(_) => {
                errors += 1;
                sender = connect(load.addr).await?;
            }
        }
    }
    Ok((ok, errors, latencies))
}

/// Runs `load` and returns what it measured.
pub async fn run(load: &Load) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    let tasks: Vec<_> = (0..load.connections)
        .map(|i| tokio::spawn(connection_loop(load.clone(), i)))
        .collect();
    let (mut ok, mut errors, mut latencies) = (0, 0, Vec::new());
    for task in tasks {
        let (o, e, l) = task.await??;
        ok += o;
        errors += e;
        latencies.extend(l);
    }
    let secs = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    Ok(Outcome {
        ok,
        errors,
        rate: ok as f64 / secs,
        latencies_us: latencies,
    })
}

/// Runs `load`, failing if more than 1 % of its requests failed (a broken target must not
/// pass for a fast one).
pub async fn run_checked(name: &str, load: &Load) -> anyhow::Result<Outcome> {
    let outcome = run(load).await?;
    anyhow::ensure!(
        outcome.ok > 0 && outcome.errors * 100 <= outcome.ok + outcome.errors,
        "{name}: {} of {} requests failed",
        outcome.errors,
        outcome.ok + outcome.errors
    );
    Ok(outcome)
}
