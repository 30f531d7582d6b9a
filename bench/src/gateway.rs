//! Gateway: plain proxying through the `gateway` binary vs nginx `proxy_pass` (keep-alive
//! upstream) to the same in-process upstream, both measured with the same load generator in the
//! same run, plus the upstream called directly; then idempotent POSTs with a unique key each,
//! PostgreSQL store and Redis store, vs plain POSTs through the same gateway.
//!
//! - Throughput: 16 connections as fast as answered, two alternating rounds per target.
//! - Latency: paced to 2,000 req/s over 8 connections, so p99 shows what a proxy adds rather
//!   than queueing at saturation (target: gateway p99 ≤ direct p99 + 1 ms).
//!
//! nginx is installed with `apt-get install -y nginx` if missing and run as a child with a
//! temporary prefix (`daemon off`); the system's nginx service is never touched. The smoke run
//! skips nginx when it is not installed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use gateway::idempotency::postgres::{CLAIM, COMPLETE};

use crate::child::{Server, free_port, temp_dir, workspace_binary};
use crate::http_load::{Load, Outcome, run_checked};
use crate::{Figure, Report, Scale, upstream};

const CONNECTIONS: usize = 16;
const PACED_CONNECTIONS: usize = 8;
const PACED_RATE: f64 = 2000.0;

/// Starts the gateway binary with `/plain` (no layers but the defaults) and `/idem` (idempotency
/// required) routes to `upstream`, on `store` = `postgres` (`database_url`) or `redis`.
pub async fn start_gateway(
    upstream: SocketAddr,
    store: &str,
    database_url: &str,
) -> anyhow::Result<Server> {
    let store_line = match store {
        "redis" => format!(
            "store = \"redis\"\nredis_url = \"{}\"",
            integration_tests::redis_url()
        ),
        _ => format!("store = \"postgres\"\ndatabase_url = \"{database_url}\""),
    };
    // Records only need to outlive the run (the TTL must cover the lease: timeout + 5 s).
    let config = |port: u16| {
        format!(
            "listen = \"127.0.0.1:{port}\"\n{store_line}\n\n\
                 [[routes]]\nprefix = \"/plain\"\nupstream = \"http://{upstream}\"\ntimeout_ms = 5000\n\n\
                 [[routes]]\nprefix = \"/idem\"\nupstream = \"http://{upstream}\"\ntimeout_ms = 5000\n\
                 idempotency = {{ required = true, ttl_secs = 60 }}\n"
        )
    };
    start_gateway_config(config, Some("error")).await
}

/// Starts the gateway binary with the config `config(port)` (in a temporary folder) and
/// `RUST_LOG` = `rust_log`, or unset (the gateway's default level) when `None`.
pub async fn start_gateway_config(
    config: impl FnOnce(u16) -> String,
    rust_log: Option<&str>,
) -> anyhow::Result<Server> {
    let binary = workspace_binary("gateway", "gateway", false)?;
    let port = free_port()?;
    let dir = temp_dir("bench_gateway")?;
    let path = dir.join("gateway.toml");
    std::fs::write(&path, config(port))?;
    let mut command = Command::new(binary);
    command
        .arg("--config")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    match rust_log {
        Some(level) => command.env("RUST_LOG", level),
        None => command.env_remove("RUST_LOG"),
    };
    Server::start(
        "gateway",
        command,
        port,
        dir,
        Duration::from_secs(20),
        "TERM",
    )
    .await
}

/// The nginx binary, installed from Debian's packages if missing (full runs only).
pub(crate) fn nginx_binary(install: bool) -> anyhow::Result<Option<PathBuf>> {
    let find = || {
        ["nginx", "/usr/sbin/nginx"].into_iter().find(|b| {
            Command::new(b)
                .arg("-v")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
    };
    if let Some(b) = find() {
        return Ok(Some(PathBuf::from(b)));
    }
    if !install {
        return Ok(None);
    }
    eprintln!("# nginx missing: apt-get install -y nginx");
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-q", "nginx"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            // Keeps the package's scripts from starting the system service; the bench runs its own.
            .env("RUNLEVEL", "1")
            .stdout(Stdio::null())
            .status()
    };
    if !install()?.success() {
        // Package lists missing or stale on a fresh machine: refresh them once and retry.
        eprintln!("# apt-get install failed: apt-get update, then again");
        let _ = Command::new("apt-get")
            .args(["update", "-q"])
            .stdout(Stdio::null())
            .status()?;
        anyhow::ensure!(install()?.success(), "apt-get install -y nginx failed");
    }
    Ok(find().map(PathBuf::from))
}

/// nginx as a child with its own prefix, proxying to `upstream` over keep-alive connections;
/// stopped with QUIT (a graceful stop of the master and its workers).
pub(crate) async fn start_nginx(binary: &Path, upstream: SocketAddr) -> anyhow::Result<Server> {
    let port = free_port()?;
    let dir = temp_dir("bench_nginx")?;
    let p = dir.display();
    // Keep-alive both ways with request limits high enough never to close a connection
    // mid-run; no access log, as the gateway logs only errors.
    let config = format!(
        "daemon off;\nworker_processes 2;\npid {p}/nginx.pid;\nerror_log {p}/error.log error;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n\
               client_body_temp_path {p}/body;\n  proxy_temp_path {p}/proxy;\n\
               fastcgi_temp_path {p}/fastcgi;\n  uwsgi_temp_path {p}/uwsgi;\n  scgi_temp_path {p}/scgi;\n\
               upstream bench_upstream {{ server {upstream}; keepalive 64; keepalive_requests 1000000; }}\n\
               server {{\n    listen 127.0.0.1:{port};\n    keepalive_requests 1000000;\n\
                 location / {{ proxy_pass http://bench_upstream; proxy_http_version 1.1; \
                 proxy_set_header Connection \"\"; }}\n  }}\n}}\n"
    );
    std::fs::write(dir.join("nginx.conf"), config)?;
    let mut command = Command::new(binary);
    command
        .arg("-p")
        .arg(&dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .arg("-e")
        .arg(dir.join("error.log"))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    Server::start("nginx", command, port, dir, Duration::from_secs(10), "QUIT").await
}

/// Loads each target (name, address, path) in `rounds` rounds of `secs`, after one unrecorded
/// warm-up each (connection pools and caches), the order alternating from round to round so
/// drift hits every target alike; returns each target's rounds merged. `load(target, round,
/// addr, path, secs)` builds the load of one round (round `usize::MAX` is the warm-up).
pub(crate) async fn alternating(
    targets: &[(&str, SocketAddr, &str)],
    rounds: usize,
    secs: Duration,
    load: impl Fn(usize, usize, SocketAddr, &str, Duration) -> Load,
) -> anyhow::Result<Vec<Outcome>> {
    for (i, (_, addr, path)) in targets.iter().enumerate() {
        let warm = load(i, usize::MAX, *addr, path, secs.min(Duration::from_secs(1)));
        run_checked("warm-up", &warm).await?;
    }
    let mut outcomes: Vec<Vec<Outcome>> = vec![Vec::new(); targets.len()];
    for round in 0..rounds {
        for k in 0..targets.len() {
            let i = if round % 2 == 0 {
                k
            } else {
                targets.len() - 1 - k
            };
            let (name, addr, path) = targets[i];
            outcomes[i].push(run_checked(name, &load(i, round, addr, path, secs)).await?);
        }
    }
    Ok(outcomes.iter().map(|r| merge(r)).collect())
}

/// Combines rounds of one target: total requests over total time, latencies merged.
pub(crate) fn merge(rounds: &[Outcome]) -> Outcome {
    let mut latencies: Vec<u32> = rounds
        .iter()
        .flat_map(|o| o.latencies_us.iter().copied())
        .collect();
    latencies.sort_unstable();
    Outcome {
        ok: rounds.iter().map(|o| o.ok).sum(),
        errors: rounds.iter().map(|o| o.errors).sum(),
        rate: rounds.iter().map(|o| o.rate).sum::<f64>() / rounds.len() as f64,
        latencies_us: latencies,
    }
}

/// Runs the gateway scenario and records its figures.
pub async fn run(scale: Scale, report: &mut Report) -> anyhow::Result<()> {
    let secs = Duration::from_secs_f64(scale.pick(6.0, 0.5));
    let paced_secs = Duration::from_secs_f64(scale.pick(6.0, 0.5));
    let rounds = scale.pick(2, 1);
    let nginx_binary = nginx_binary(scale == Scale::Full)?;
    if nginx_binary.is_none() {
        eprintln!("# nginx not installed: the smoke run skips the nginx comparison");
    }

    let db = integration_tests::fresh_db().await;
    let upstream = upstream::start().await?;
    let gateway = start_gateway(upstream.addr, "postgres", &db.url).await?;
    let nginx = match &nginx_binary {
        Some(b) => Some(start_nginx(b, upstream.addr).await?),
        None => None,
    };

    // Targets: (name, address, path).
    let mut targets = vec![
        ("direct", upstream.addr, "/x"),
        ("gateway", gateway.addr, "/plain/x"),
    ];
    if let Some(n) = &nginx {
        targets.push(("nginx", n.addr, "/x"));
    }
    let throughput = alternating(&targets, rounds, secs, |_, _, addr, path, secs| {
        Load::get(addr, path, CONNECTIONS, secs)
    })
    .await?;
    // Latency at a fixed rate.
    let mut paced = Vec::new();
    for (name, addr, path) in &targets {
        let load = Load {
            rate: Some(scale.pick(PACED_RATE, 400.0)),
            ..Load::get(*addr, path, PACED_CONNECTIONS, paced_secs)
        };
        paced.push(run_checked(name, &load).await?);
    }

    // Idempotent POSTs: plain POST through the gateway, then unique keys on each store.
    let run_id = integration_tests::unique_name("bench");
    let plain_post = run_checked(
        "gateway plain POST",
        &Load::post(gateway.addr, "/plain/x", CONNECTIONS, secs),
    )
    .await?;
    // Phases for bench/scripts/cpu-split.py: where the CPU goes with the gateway in the path
    // and with the database alone.
    let idem_pg = idempotent_postgres(gateway.addr, &run_id, secs).await?;
    // The floor: the two durable writes each idempotent request needs (claim, then the
    // completed response), issued by the same number of clients straight to the database.
    eprintln!("# phase db_floor");
    let floor = record_floor(&db.url, CONNECTIONS, secs).await?;
    eprintln!("# phase idle");
    let gateway_rss = gateway.process.peak_rss_mib()?;
    gateway.stop().await?;
    if let Some(n) = nginx {
        n.stop().await?;
    }
    let redis_gateway = start_gateway(upstream.addr, "redis", "").await?;
    run_checked(
        "warm-up",
        &Load {
            idempotency_prefix: Some(format!("{run_id}-warm")),
            ..Load::post(
                redis_gateway.addr,
                "/idem/x",
                CONNECTIONS,
                Duration::from_millis(300),
            )
        },
    )
    .await?;
    let idem_redis = run_checked(
        "gateway idempotent POST (redis)",
        &Load {
            idempotency_prefix: Some(format!("{run_id}-redis")),
            ..Load::post(redis_gateway.addr, "/idem/x", CONNECTIONS, secs)
        },
    )
    .await?;
    redis_gateway.stop().await?;

    let (direct, gw) = (0, 1);
    if targets.len() > 2 {
        let ng = 2;
        report.push(Figure::new(
            "gateway_proxy_rps",
            throughput[gw].rate,
            "req/s",
            "nginx_proxy_pass",
            throughput[ng].rate,
            Some(">= 1.0"),
        ));
        report.push(Figure::new(
            "gateway_proxy_p99_at_2000rps",
            paced[gw].p99_ms(),
            "ms",
            "nginx_p99_at_2000rps",
            paced[ng].p99_ms(),
            None,
        ));
    }
    report.push(Figure::new(
        "gateway_proxy_rps",
        throughput[gw].rate,
        "req/s",
        "direct_upstream",
        throughput[direct].rate,
        None,
    ));
    report.push(Figure::new(
        "gateway_proxy_p99_at_2000rps",
        paced[gw].p99_ms(),
        "ms",
        "direct_p99_at_2000rps",
        paced[direct].p99_ms(),
        None,
    ));
    report.push(Figure::new(
        "gateway_added_p99",
        paced[gw].p99_ms() - paced[direct].p99_ms(),
        "ms",
        "limit_1ms",
        1.0,
        Some("<= 1.0"),
    ));
    report.push(Figure::new(
        "gateway_idempotent_post_postgres_rps",
        idem_pg.rate,
        "req/s",
        "gateway_plain_post",
        plain_post.rate,
        None,
    ));
    report.push(Figure::new(
        "gateway_idempotent_post_postgres_rps",
        idem_pg.rate,
        "req/s",
        "db_floor_claim_and_complete",
        floor,
        Some(">= 0.80"),
    ));
    report.push(Figure::new(
        "gateway_idempotent_post_postgres_p99",
        idem_pg.p99_ms(),
        "ms",
        "gateway_plain_post_p99",
        plain_post.p99_ms(),
        None,
    ));
    report.push(Figure::new(
        "gateway_idempotent_post_redis_rps",
        idem_redis.rate,
        "req/s",
        "gateway_plain_post",
        plain_post.rate,
        None,
    ));
    report.push(Figure::new(
        "gateway_idempotent_post_redis_p99",
        idem_redis.p99_ms(),
        "ms",
        "gateway_plain_post_p99",
        plain_post.p99_ms(),
        None,
    ));
    println!("# gateway peak RSS after the PostgreSQL-store runs: {gateway_rss:.1} MiB");
    Ok(())
}

/// Idempotent POSTs with a fresh key each (`{run_id}-pg-...`) to the `/idem` route of the
/// gateway at `addr`, marked as the `idem_postgres` phase for `bench/scripts/cpu-split.py`.
async fn idempotent_postgres(
    addr: SocketAddr,
    run_id: &str,
    secs: Duration,
) -> anyhow::Result<Outcome> {
    eprintln!("# phase idem_postgres");
    run_checked(
        "gateway idempotent POST (postgres)",
        &Load {
            idempotency_prefix: Some(format!("{run_id}-pg")),
            ..Load::post(addr, "/idem/x", CONNECTIONS, secs)
        },
    )
    .await
}

/// Idempotent POSTs with fresh keys through a gateway with the PostgreSQL store on a fresh
/// database, then the floor on the same database: (req/s, floor/s). For `split`, which measures
/// the pair again with PostgreSQL on a core of its own.
pub async fn idempotent_vs_floor(secs: Duration) -> anyhow::Result<(f64, f64)> {
    let db = integration_tests::fresh_db().await;
    let upstream = upstream::start().await?;
    let gateway = start_gateway(upstream.addr, "postgres", &db.url).await?;
    let run_id = integration_tests::unique_name("bench");
    let idem = idempotent_postgres(gateway.addr, &run_id, secs).await?;
    gateway.stop().await?;
    eprintln!("# phase db_floor");
    let floor = record_floor(&db.url, CONNECTIONS, secs).await?;
    eprintln!("# phase idle");
    Ok((idem.rate, floor))
}

/// Claims and completions per second that `clients` connections get from the database alone:
/// per request the gateway's own two statements ([`CLAIM`], then [`COMPLETE`] with a small
/// response, bound as the gateway binds them for a route with a 5 s timeout), each an autocommit
/// durable commit, no HTTP and no upstream.
async fn record_floor(url: &str, clients: usize, secs: Duration) -> anyhow::Result<f64> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(clients as u32)
        .connect(url)
        .await?;
    let prefix = integration_tests::unique_name("floor");
    let deadline = std::time::Instant::now() + secs;
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (pool, prefix) = (pool.clone(), prefix.clone());
        tasks.push(tokio::spawn(async move {
            let mut done = 0u64;
            let fingerprint = [7u8; 32];
            let headers =
                serde_json::json!([["content-type", "text/plain"], ["content-length", "2"]]);
            while std::time::Instant::now() < deadline {
                let key = format!("{prefix}-{c}-{done}");
                let token = uuid::Uuid::new_v4();
                let claimed = sqlx::query(CLAIM)
                    .bind("bench")
                    .bind(&key)
                    .bind(&fingerprint[..])
                    .bind(token)
                    .bind(10_000i64)
                    .bind(10_000i64)
                    .bind(60i64)
                    .fetch_optional(&pool)
                    .await?;
                anyhow::ensure!(claimed.is_some(), "floor: fresh key {key} not claimed");
                sqlx::query(COMPLETE)
                    .bind("bench")
                    .bind(&key)
                    .bind(token)
                    .bind(200i16)
                    .bind(&headers)
                    .bind(&b"ok"[..])
                    .execute(&pool)
                    .await?;
                done += 1;
            }
            anyhow::Ok(done)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    let rate = total as f64 / started.elapsed().as_secs_f64();
    pool.close().await;
    Ok(rate)
}
