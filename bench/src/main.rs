//! `cargo run --release -p bench -- all|relay|latency|delayed|consumer|gateway|load|split|peers`:
//! prints one line per figure
//! (`name value unit baseline ratio`) and writes `target/bench/results.json`.

use bench::{Report, Scale};
use clap::{Parser, ValueEnum};

#[derive(Parser)]
#[command(about = "Benchmarks against the local PostgreSQL and RabbitMQ")]
struct Cli {
    /// Which scenario.
    #[arg(value_enum, default_value = "all")]
    scenario: Scenario,
    /// A seconds-long run of the same code paths, for the test suite.
    #[arg(long)]
    smoke: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    All,
    Relay,
    Latency,
    Delayed,
    Consumer,
    Gateway,
    /// Two minutes of the whole pipeline at 2,000 msg/s (issue 8's load run).
    Load,
    /// The commit-rate and consumer figures with RabbitMQ pinned to a core of its own.
    Split,
    /// Us vs peers installed from their registries.
    Peers,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let scale = if cli.smoke { Scale::Smoke } else { Scale::Full };
    let mut report = Report {
        started_at: chrono::Utc::now().to_rfc3339(),
        ..Report::default()
    };
    let all = cli.scenario == Scenario::All;
    if all || cli.scenario == Scenario::Relay {
        bench::relay::run(scale, &mut report).await?;
    }
    if all || cli.scenario == Scenario::Latency {
        bench::steady::run(scale, &mut report).await?;
    }
    if all || cli.scenario == Scenario::Delayed {
        bench::delayed::run(scale, &mut report).await?;
    }
    if all || cli.scenario == Scenario::Consumer {
        bench::consumer::run(scale, &mut report).await?;
    }
    if all || cli.scenario == Scenario::Gateway {
        bench::gateway::run(scale, &mut report).await?;
    }
    if all || cli.scenario == Scenario::Load {
        bench::load::run(scale, &mut report).await?;
    }
    if all || cli.scenario == Scenario::Split {
        bench::split::run(scale, &mut report).await?;
    }
    if all || cli.scenario == Scenario::Peers {
        bench::peers::run(scale, &mut report).await?;
    }
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench/results.json");
    report.write(&path)?;
    println!("results written to target/bench/results.json");
    Ok(())
}
