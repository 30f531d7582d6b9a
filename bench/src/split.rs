//! The broker on its own core: the two figures that share the two cores with RabbitMQ
//! (producers' commit rate with the relay running, consumer-lib one message per transaction vs
//! the database's commit ceiling), measured again with RabbitMQ pinned to one core and
//! PostgreSQL, this process (producers, consumer-lib) and the `outbox-relay` child it starts
//! pinned to the other, as if the broker had a host of its own. Printed beside the shared-mode
//! figures of [`crate::steady`] and [`crate::consumer`].
//!
//! Then the idempotent PostgreSQL store against its floor (`crate::gateway::idempotent_vs_floor`),
//! shared and with PostgreSQL alone on one core and this process with the gateway it starts on
//! the other ([`Pinning::database_alone`]), as if the database had a host of its own.
//!
//! Pinning uses `taskset` on the machine's own `beam.smp` (user `rabbitmq`) and every process of
//! user `postgres` (the postmaster's children inherit it). [`Pinning`] puts every one of them,
//! and this process, back on all cores when dropped, whatever ended the run; a run killed from
//! outside leaves them pinned until `cargo run -p bench -- split` runs again (it re-pins, then
//! restores) or `taskset -a -cp 0-N PID` is run by hand.

use std::process::Command;
use std::time::Duration;

use crate::{Figure, Report, Scale, broker};

/// CPU affinities changed for the run, restored on drop.
pub struct Pinning {
    all: String,
    pids: Vec<u32>,
}

fn pids_of(user: &str, name: Option<&str>) -> Vec<u32> {
    let mut cmd = Command::new("pgrep");
    cmd.args(["-u", user]);
    if let Some(name) = name {
        cmd.arg(name);
    }
    cmd.output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn pin(pid: u32, cpus: &str) -> anyhow::Result<()> {
    let out = Command::new("taskset")
        .args(["-a", "-cp", cpus, &pid.to_string()])
        .output()?;
    // A backend that ended between pgrep and taskset is not an error.
    if !out.status.success() && std::path::Path::new(&format!("/proc/{pid}")).exists() {
        anyhow::bail!(
            "taskset -a -cp {cpus} {pid}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The machine's cores, or why they cannot be split (fewer than two, no `taskset`).
fn splittable() -> Result<usize, String> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores < 2 {
        return Err(format!("{cores} core(s): nothing to split"));
    }
    if Command::new("taskset").arg("-V").output().is_err() {
        return Err("taskset (util-linux) is not installed".into());
    }
    Ok(cores)
}

impl Pinning {
    /// RabbitMQ on the last core, PostgreSQL and this process on core 0. `None` (with the
    /// reason) where that cannot be done: fewer than two cores, no `taskset`, no broker or
    /// database process of the machine's own to pin.
    pub fn apply() -> anyhow::Result<Result<Pinning, String>> {
        let cores = match splittable() {
            Ok(cores) => cores,
            Err(why) => return Ok(Err(why)),
        };
        let broker = pids_of("rabbitmq", Some("beam.smp"));
        let database = pids_of("postgres", None);
        if broker.is_empty() || database.is_empty() {
            return Ok(Err(format!(
                "the machine's RabbitMQ ({} beam.smp) or PostgreSQL ({} processes) not found",
                broker.len(),
                database.len()
            )));
        }
        let mut pinning = Pinning {
            all: format!("0-{}", cores - 1),
            pids: Vec::new(),
        };
        let last = (cores - 1).to_string();
        for &pid in &broker {
            pinning.pids.push(pid);
            pin(pid, &last)?;
        }
        for pid in database.into_iter().chain([std::process::id()]) {
            pinning.pids.push(pid);
            pin(pid, "0")?;
        }
        Ok(Ok(pinning))
    }
}

impl Pinning {
    /// PostgreSQL alone on the last core, this process (and so the children it starts after
    /// this: the gateway) on core 0, as if the database had a host of its own. `None` (with the
    /// reason) where that cannot be done.
    pub fn database_alone() -> anyhow::Result<Result<Pinning, String>> {
        let cores = match splittable() {
            Ok(cores) => cores,
            Err(why) => return Ok(Err(why)),
        };
        let database = pids_of("postgres", None);
        if database.is_empty() {
            return Ok(Err("the machine's PostgreSQL processes not found".into()));
        }
        let mut pinning = Pinning {
            all: format!("0-{}", cores - 1),
            pids: Vec::new(),
        };
        let last = (cores - 1).to_string();
        for pid in database {
            pinning.pids.push(pid);
            pin(pid, &last)?;
        }
        pinning.pids.push(std::process::id());
        pin(std::process::id(), "0")?;
        Ok(Ok(pinning))
    }
}

impl Drop for Pinning {
    fn drop(&mut self) {
        // Backends forked while pinned inherited core 0: take the current ones too.
        let mut pids = self.pids.clone();
        pids.extend(pids_of("postgres", None));
        pids.sort_unstable();
        pids.dedup();
        for pid in pids {
            if let Err(e) = pin(pid, &self.all) {
                eprintln!("split: could not restore the affinity of {pid}: {e}");
            }
        }
    }
}

/// One round of both measurements (tx/s, msg/s).
#[derive(Debug, Clone, Copy)]
struct Measured {
    relay_on: f64,
    relay_off: f64,
    library: f64,
    ceiling: f64,
}

async fn measure(secs: Duration, rounds: u32, n: usize) -> anyhow::Result<Measured> {
    let connection = broker::connect().await?;
    let channel = connection.create_channel().await?;
    let (db, queue) = crate::steady::prepare(&channel).await?;
    let (relay_on, relay_off) =
        crate::steady::commit_rates(&db, &channel, &queue, secs, rounds).await?;
    broker::delete_queue(&channel, &queue).await?;
    let _ = connection.close(200, "done".into()).await;
    let (library, ceiling) = crate::consumer::library_vs_ceiling(n, secs).await?;
    Ok(Measured {
        relay_on,
        relay_off,
        library,
        ceiling,
    })
}

/// Runs the split-core scenario and records its figures (skipped, with the reason, where the
/// machine cannot be split).
pub async fn run(scale: Scale, report: &mut Report) -> anyhow::Result<()> {
    let secs = scale.pick(Duration::from_secs(8), Duration::from_millis(500));
    let rounds = scale.pick(2, 1);
    let n = scale.pick(50_000, 1_000);
    // Shared mode first, the same measurements in the same run: the baseline of the comparison.
    let shared = measure(secs, rounds, n).await?;
    let pinning = match Pinning::apply()? {
        Ok(p) => p,
        Err(why) => {
            println!("split: skipped ({why})");
            return Ok(());
        }
    };
    eprintln!("# split: RabbitMQ on its own core, PostgreSQL + producers + relay on the other");
    let split = measure(secs, rounds, n).await;
    drop(pinning);
    let split = split?;
    for (mode, m) in [("shared", shared), ("split", split)] {
        report.push(Figure::new(
            &format!("{mode}_producer_commit_rate_relay_running"),
            m.relay_on,
            "tx/s",
            "relay_stopped",
            m.relay_off,
            Some(">= 0.85"),
        ));
        report.push(Figure::new(
            &format!("{mode}_consumer_inbox_drain"),
            m.library,
            "msg/s",
            "db_commit_ceiling_8conn",
            m.ceiling,
            Some(">= 0.80"),
        ));
    }
    // The idempotent PostgreSQL store against its floor, shared and with the database alone on
    // a core (the gateway, the load generator and the upstream on the other).
    let (idem_shared, floor_shared) = crate::gateway::idempotent_vs_floor(secs).await?;
    let alone = match Pinning::database_alone()? {
        Ok(pinning) => {
            eprintln!(
                "# split: PostgreSQL on its own core, gateway + load + upstream on the other"
            );
            let alone = crate::gateway::idempotent_vs_floor(secs).await;
            drop(pinning);
            Some(alone?)
        }
        Err(why) => {
            println!("split: database-alone mode skipped ({why})");
            None
        }
    };
    for (mode, m) in [
        ("shared", Some((idem_shared, floor_shared))),
        ("db_alone", alone),
    ] {
        let Some((idem, floor)) = m else { continue };
        report.push(Figure::new(
            &format!("{mode}_gateway_idempotent_post_postgres_rps"),
            idem,
            "req/s",
            "db_floor_claim_and_complete",
            floor,
            Some(">= 0.80"),
        ));
    }
    // What moving the broker off the shared cores gave each figure.
    report.push(Figure::new(
        "split_vs_shared_relay_running_ratio",
        split.relay_on / split.relay_off,
        "ratio",
        "shared",
        shared.relay_on / shared.relay_off,
        None,
    ));
    report.push(Figure::new(
        "split_vs_shared_consumer_ratio",
        split.library / split.ceiling,
        "ratio",
        "shared",
        shared.library / shared.ceiling,
        None,
    ));
    Ok(())
}
