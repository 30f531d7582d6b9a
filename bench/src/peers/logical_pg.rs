//! A second PostgreSQL cluster with `wal_level=logical`, for the peers that read the
//! write-ahead log (Debezium, pg-transactional-outbox's replication listener) and for our relay
//! measured beside them on the same cluster. The machine's own cluster keeps `wal_level=replica`
//! and is never reconfigured.
//!
//! The cluster is made with Debian's `pg_createcluster` (same major version as the machine's
//! cluster, trust auth on loopback, the machine cluster's `conf.d` settings copied so both sides
//! run with the same durability), started, and stopped and dropped when the
//! [`LogicalCluster`] is dropped. Its name carries the process id; a cluster left by a run that
//! was killed is dropped by the next run.

use std::process::{Command, Stdio};

use anyhow::Context;
use sqlx::Connection;

const PREFIX: &str = "benchlogical";

/// A running cluster of our own; dropped with the value.
pub struct LogicalCluster {
    version: String,
    name: String,
    port: u16,
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {program}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{program} {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `(version, name)` of every cluster on the machine.
fn clusters() -> anyhow::Result<Vec<(String, String)>> {
    let out = run("pg_lsclusters", &["--no-header"])?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?.to_owned(), f.next()?.to_owned()))
        })
        .collect())
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

impl LogicalCluster {
    /// Creates and starts the cluster (a few seconds). Fails with the tool's message when
    /// `pg_createcluster` is missing or refuses.
    pub fn start() -> anyhow::Result<LogicalCluster> {
        let all = clusters().context("pg_lsclusters (Debian's postgresql-common) is needed")?;
        for (version, name) in &all {
            let stale = name
                .strip_prefix(PREFIX)
                .and_then(|pid| pid.parse::<u32>().ok())
                .is_some_and(|pid| !alive(pid));
            if stale {
                eprintln!("# removing the logical cluster {version}/{name} a killed run left");
                let _ = run("pg_dropcluster", &["--stop", version, name]);
            }
        }
        let version = all
            .iter()
            .find(|(_, n)| n == "main")
            .or(all.first())
            .map(|(v, _)| v.clone())
            .context("no PostgreSQL cluster on this machine to take the version from")?;
        let name = format!("{PREFIX}{}", std::process::id());
        let port = crate::child::free_port()?;
        let port_s = port.to_string();
        run(
            "pg_createcluster",
            &[&version, &name, "-p", &port_s, "--", "--auth=trust"],
        )?;
        let cluster = LogicalCluster {
            version,
            name,
            port,
        };
        cluster.configure()?;
        run("pg_ctlcluster", &[&cluster.version, &cluster.name, "start"])?;
        Ok(cluster)
    }

    fn configure(&self) -> anyhow::Result<()> {
        let conf_d = format!("/etc/postgresql/{}/{}/conf.d", self.version, self.name);
        let mut conf = String::new();
        // The machine cluster's own settings (durability, autovacuum), its port left out.
        if let Ok(dir) = std::fs::read_dir(format!("/etc/postgresql/{}/main/conf.d", self.version))
        {
            for entry in dir.flatten() {
                let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                for line in text.lines() {
                    if !line.trim_start().starts_with("port") {
                        conf.push_str(line);
                        conf.push('\n');
                    }
                }
            }
        }
        conf.push_str(&format!(
            "listen_addresses = '127.0.0.1'\nport = {}\nwal_level = logical\n\
             max_replication_slots = 20\nmax_wal_senders = 20\n",
            self.port
        ));
        std::fs::write(format!("{conf_d}/95-bench-logical.conf"), conf)
            .with_context(|| format!("write {conf_d}"))?;
        Ok(())
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL for `database` on it, as `postgres` over TCP.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// A new empty database on it (no migrations): its URL and a pool of 10 on it.
    pub async fn fresh_db(&self) -> anyhow::Result<(String, sqlx::PgPool)> {
        let name = integration_tests::unique_name("t");
        let mut admin = sqlx::PgConnection::connect(&self.url("postgres")).await?;
        // `name` is made of a fixed prefix and hex digits only.
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await?;
        admin.close().await.ok();
        let url = self.url(&name);
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(10)
            .connect(&url)
            .await?;
        Ok((url, pool))
    }

    /// A new database on it with the outbox schema migrated, for our relay beside a peer.
    pub async fn fresh_outbox_db(&self) -> anyhow::Result<integration_tests::TestDb> {
        let (url, pool) = self.fresh_db().await?;
        migrations::MIGRATOR.run(&pool).await?;
        Ok(integration_tests::TestDb { url, pool })
    }
}

impl Drop for LogicalCluster {
    fn drop(&mut self) {
        if let Err(e) = run("pg_dropcluster", &["--stop", &self.version, &self.name]) {
            eprintln!("# could not drop the logical cluster {}: {e}", self.name);
        }
    }
}
