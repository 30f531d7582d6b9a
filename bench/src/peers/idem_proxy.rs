//! Idempotent POSTs: the gateway's Redis store vs crates.io `idempotent-proxy-server`, the
//! reverse proxy that caches the first response per `idempotency-key` in Redis. Both in front of
//! the same upstream and the same Redis, each POST with a fresh key (every request claims, calls
//! the upstream and stores its response), alternating rounds.
//!
//! The peer is built with `cargo install --locked` into `target/bench/peers/cargo` (a few
//! minutes, once). It reads its settings from the environment (and insists on a `.env` file in
//! its working directory): `SERVER_ADDR`, `REDIS_URL`, and `URL_UPSTREAM`, the upstream a
//! request to `/URL_UPSTREAM` goes to.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::install;
use crate::child::{Server, free_port, temp_dir};
use crate::gateway::{alternating, start_gateway};
use crate::http_load::Load;
use crate::{Figure, Report, Scale, upstream};

/// The pinned version.
pub const VERSION: &str = "1.2.2";
const CONNECTIONS: usize = 16;

/// The peer's binary, built from crates.io if missing; or why it is not there.
fn binary() -> Result<PathBuf, String> {
    let root = install::peers_dir().join("cargo");
    let bin = root.join("bin/idempotent-proxy-server");
    let version_file = root.join("idempotent-proxy-server.version");
    if bin.exists() && std::fs::read_to_string(&version_file).ok().as_deref() == Some(VERSION) {
        return Ok(bin);
    }
    eprintln!("# building idempotent-proxy-server {VERSION} with cargo install (once)");
    let mut cargo = Command::new(env!("CARGO"));
    // One of its dependencies (`ff`) carries a `rust-toolchain` file naming 1.56, which rustup
    // would look for when the build reaches that crate: the toolchain in use is named instead
    // (`cargo run` sets it; a bench binary started on its own does not).
    if std::env::var_os("RUSTUP_TOOLCHAIN").is_none() {
        let active = Command::new("rustup")
            .args(["show", "active-toolchain"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .and_then(|o| {
                let text = String::from_utf8_lossy(&o.stdout);
                text.split_whitespace().next().map(str::to_owned)
            });
        if let Some(toolchain) = active {
            cargo.env("RUSTUP_TOOLCHAIN", toolchain);
        }
    }
    let ok = cargo
        .args([
            "install",
            "--locked",
            "--quiet",
            "idempotent-proxy-server",
            "--version",
            VERSION,
            "--root",
        ])
        .arg(&root)
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok || !bin.exists() {
        return Err(format!(
            "cargo install idempotent-proxy-server --version {VERSION} failed"
        ));
    }
    let _ = std::fs::write(&version_file, VERSION);
    Ok(bin)
}

/// The peer on a port of its own, its working directory holding the `.env` it insists on.
async fn start_peer(bin: &PathBuf, upstream: SocketAddr) -> anyhow::Result<Server> {
    let port = free_port()?;
    let dir = temp_dir("bench_idem_proxy")?;
    std::fs::write(dir.join(".env"), "")?;
    let mut command = Command::new(bin);
    command
        .current_dir(&dir)
        .env("SERVER_ADDR", format!("127.0.0.1:{port}"))
        .env("REDIS_URL", integration_tests::redis_url())
        .env("URL_UPSTREAM", format!("http://{upstream}/x"))
        // Its JSON log line per request goes to stdout: as quiet as the gateway's.
        .env("LOG_LEVEL", "warn")
        .stdout(Stdio::null());
    let wait = Duration::from_secs(10);
    Server::start("idempotent-proxy-server", command, port, dir, wait, "TERM").await
}

/// Runs the comparison and records its figures (skipped, saying why, when the peer cannot be
/// built).
pub async fn run(scale: Scale, report: &mut Report) -> anyhow::Result<()> {
    let secs = Duration::from_secs_f64(scale.pick(6.0, 0.5));
    let rounds = scale.pick(3, 1);
    let bin = match binary() {
        Ok(b) => b,
        Err(why) => {
            println!("peers: idempotent-proxy-server skipped: {why}");
            return Ok(());
        }
    };
    let upstream = upstream::start().await?;
    let gateway = start_gateway(upstream.addr, "redis", "").await?;
    let peer = start_peer(&bin, upstream.addr).await?;
    let run_id = integration_tests::unique_name("peers_idem");
    let targets = [
        ("gateway redis", gateway.addr, "/idem/x"),
        ("idempotent-proxy-server", peer.addr, "/URL_UPSTREAM"),
    ];
    let merged = alternating(&targets, rounds, secs, |i, round, addr, path, secs| Load {
        idempotency_prefix: Some(format!("{run_id}-{i}-{round}")),
        ..Load::post(addr, path, CONNECTIONS, secs)
    })
    .await?;
    gateway.stop().await?;
    peer.stop().await?;
    report.push(Figure::new(
        "peers_idempotent_post_redis_rps",
        merged[0].rate,
        "req/s",
        &format!("idempotent_proxy_server_{VERSION}"),
        merged[1].rate,
        Some(">= 1.0"),
    ));
    report.push(Figure::new(
        "peers_idempotent_post_redis_p99",
        merged[0].p99_ms(),
        "ms",
        &format!("idempotent_proxy_server_{VERSION}_p99"),
        merged[1].p99_ms(),
        None,
    ));
    Ok(())
}
