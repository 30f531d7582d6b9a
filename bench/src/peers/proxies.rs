//! The gateway with its smallest config (one route, `prefix` and `upstream` only, `RUST_LOG`
//! unset: every default as shipped) vs nginx `proxy_pass` and haproxy as plain reverse proxies,
//! to the same in-process upstream, with the same load generator, rounds alternating; and the
//! same gateway with `RUST_LOG=error`, to show what the default log level costs. Both
//! peers keep their upstream connections alive, as the gateway does, and log no access lines.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::install;
use crate::child::{Server, free_port, temp_dir};
use crate::gateway::{alternating, start_gateway_config, start_nginx};
use crate::http_load::Load;
use crate::{Figure, Report, Scale, upstream};

/// Debian bookworm's nginx and haproxy, as the security archive has them.
pub const NGINX: &str = "1.22.1-9+deb12u11";
/// See [`NGINX`].
pub const HAPROXY: &str = "2.6.12-1+deb12u4";

const CONNECTIONS: usize = 16;

/// haproxy in the foreground with its own config, two threads (nginx runs two workers).
async fn start_haproxy(binary: &Path, upstream: SocketAddr) -> anyhow::Result<Server> {
    let port = free_port()?;
    let dir = temp_dir("bench_haproxy")?;
    // `http-reuse always`: upstream connections are kept and shared, like nginx's
    // `keepalive` pool and the gateway's. No `log` lines: no access log.
    let config = format!(
        "global\n  nbthread 2\n  maxconn 4096\n\
             defaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
               option http-keep-alive\n  http-reuse always\n\
             frontend bench\n  bind 127.0.0.1:{port}\n  default_backend upstream\n\
             backend upstream\n  server u {upstream}\n"
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, config)?;
    let mut command = Command::new(binary);
    command
        .arg("-db")
        .arg("-f")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    Server::start(
        "haproxy",
        command,
        port,
        dir,
        Duration::from_secs(10),
        "TERM",
    )
    .await
}

/// The gateway's smallest config for proxying: one route, nothing but its prefix and upstream.
pub fn smallest_config(port: u16, database_url: &str, upstream: SocketAddr) -> String {
    format!(
        "listen = \"127.0.0.1:{port}\"\ndatabase_url = \"{database_url}\"\n\n\
         [[routes]]\nprefix = \"/plain\"\nupstream = \"http://{upstream}\"\n"
    )
}

/// Runs the proxy comparison and records its figures.
pub async fn run(scale: Scale, report: &mut Report) -> anyhow::Result<()> {
    let secs = Duration::from_secs_f64(scale.pick(6.0, 0.5));
    let rounds = scale.pick(3, 1);
    let nginx_bin = install::apt("nginx", NGINX).map(|_| PathBuf::from("/usr/sbin/nginx"));
    let haproxy_bin = install::apt("haproxy", HAPROXY).map(|_| PathBuf::from("/usr/sbin/haproxy"));

    let db = integration_tests::fresh_db().await;
    let upstream = upstream::start().await?;
    let url = db.url.clone();
    let up = upstream.addr;
    let gateway = start_gateway_config(move |port| smallest_config(port, &url, up), None).await?;
    let nginx = match &nginx_bin {
        Ok(b) => Some(start_nginx(b, upstream.addr).await?),
        Err(why) => {
            eprintln!("# peers: nginx skipped: {why}");
            None
        }
    };
    let haproxy = match &haproxy_bin {
        Ok(b) => Some(start_haproxy(b, upstream.addr).await?),
        Err(why) => {
            eprintln!("# peers: haproxy skipped: {why}");
            None
        }
    };

    let url = db.url.clone();
    // `BENCH_PEERS_GATEWAY_LOG` sets the second gateway's `RUST_LOG`, for experiments.
    let quiet_log = std::env::var("BENCH_PEERS_GATEWAY_LOG").unwrap_or_else(|_| "error".into());
    let quiet_log_name = quiet_log.clone();
    let quiet = start_gateway_config(
        move |port| smallest_config(port, &url, up),
        Some(&quiet_log),
    )
    .await?;
    let mut targets = vec![
        ("gateway", gateway.addr, "/plain/x"),
        ("gateway RUST_LOG=error", quiet.addr, "/plain/x"),
    ];
    if let Some(n) = &nginx {
        targets.push(("nginx", n.addr, "/x"));
    }
    if let Some(h) = &haproxy {
        targets.push(("haproxy", h.addr, "/x"));
    }
    let throughput = alternating(&targets, rounds, secs, |_, _, addr, path, secs| {
        Load::get(addr, path, CONNECTIONS, secs)
    })
    .await?;
    gateway.stop().await?;
    quiet.stop().await?;
    if let Some(n) = nginx {
        n.stop().await?;
    }
    if let Some(h) = haproxy {
        h.stop().await?;
    }
    // What the default log level costs: the same gateway with `RUST_LOG=error`.
    report.push(Figure::new(
        "peers_gateway_smallest_config_rps",
        throughput[0].rate,
        "req/s",
        &format!("gateway_rust_log={}", quiet_log_name),
        throughput[1].rate,
        None,
    ));
    for (i, (name, _, _)) in targets.iter().enumerate().skip(2) {
        let version = if *name == "nginx" { NGINX } else { HAPROXY };
        report.push(Figure::new(
            "peers_gateway_smallest_config_rps",
            throughput[0].rate,
            "req/s",
            &format!("{name}_{version}_plain_proxy"),
            throughput[i].rate,
            Some(">= 1.0"),
        ));
    }
    Ok(())
}
