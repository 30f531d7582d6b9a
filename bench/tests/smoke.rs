//! A seconds-long run of every benchmark scenario, so the harness cannot rot unnoticed. Checks
//! that each produces its figures with finite, positive values; the real run is
//! `cargo run --release -p bench`.

use bench::{Report, Scale};

fn assert_figures(report: &Report, names: &[&str]) {
    for name in names {
        let figure = report
            .figures
            .iter()
            .find(|f| f.name.starts_with(name))
            .unwrap_or_else(|| panic!("no figure {name}: {:?}", report.figures));
        assert!(
            figure.value.is_finite() && figure.value >= 0.0 && figure.ratio.is_finite(),
            "{figure:?}"
        );
    }
}

#[tokio::test]
async fn relay_scenario_runs() {
    let mut report = Report::default();
    bench::relay::run(Scale::Smoke, &mut report).await.unwrap();
    assert_figures(&report, &["relay_drain"]);
    assert_eq!(report.figures.len(), 2);
}

#[tokio::test]
async fn latency_scenario_runs() {
    let mut report = Report::default();
    bench::steady::run(Scale::Smoke, &mut report).await.unwrap();
    assert_figures(
        &report,
        &[
            "producer_commit_rate_relay_running",
            "commit_to_consumer_p50_polling",
            "commit_to_consumer_p99_notify",
        ],
    );
}

/// The peers' logical cluster comes up with `wal_level=logical`, our relay's steady run on it
/// delivers every message it committed, and the cluster is gone once dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_cluster_carries_a_steady_run_and_is_dropped() {
    use bench::peers::{latency, logical_pg::LogicalCluster};
    let cluster = LogicalCluster::start().unwrap();
    let port = cluster.port();
    let (_, pool) = cluster.fresh_db().await.unwrap();
    let level: String = sqlx::query_scalar("SHOW wal_level")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(level, "logical");
    pool.close().await;
    let db = cluster.fresh_outbox_db().await.unwrap();
    let steady = latency::ours(Some(db), 100, std::time::Duration::from_secs(1))
        .await
        .unwrap();
    assert!(steady.sent >= 50, "{steady:?}");
    assert_eq!((steady.lost(), steady.duplicates), (0, 0), "{steady:?}");
    assert!(
        steady.p50_ms > 0.0 && steady.p99_ms >= steady.p50_ms,
        "{steady:?}"
    );
    drop(cluster);
    let listed = std::process::Command::new("pg_lsclusters")
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        !listed
            .lines()
            .any(|l| l.split_whitespace().nth(2) == Some(&port.to_string())),
        "{listed}"
    );
}

#[tokio::test]
async fn delayed_scenario_runs() {
    let mut report = Report::default();
    bench::delayed::run(Scale::Smoke, &mut report)
        .await
        .unwrap();
    assert_figures(&report, &["relay_drain_with_"]);
}

#[tokio::test]
async fn consumer_scenario_runs() {
    let mut report = Report::default();
    bench::consumer::run(Scale::Smoke, &mut report)
        .await
        .unwrap();
    assert_figures(
        &report,
        &["consumer_inbox_drain", "db_ceiling_batch10_per_commit"],
    );
}

/// Without nginx installed the nginx comparison is skipped; the gateway figures must be there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_scenario_runs() {
    let mut report = Report::default();
    bench::gateway::run(Scale::Smoke, &mut report)
        .await
        .unwrap();
    assert_figures(
        &report,
        &[
            "gateway_proxy_rps",
            "gateway_idempotent_post_postgres_rps",
            "gateway_idempotent_post_redis_p99",
        ],
    );
    // A difference of two p99s (gateway minus direct): at the smoke run's few hundred requests
    // an outlier on the direct side can make it negative, so only finiteness is checked.
    let added = report
        .figures
        .iter()
        .find(|f| f.name == "gateway_added_p99")
        .expect("figure gateway_added_p99");
    assert!(
        added.value.is_finite() && added.ratio.is_finite(),
        "{added:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_scenario_runs() {
    let mut report = Report::default();
    bench::load::run(Scale::Smoke, &mut report).await.unwrap();
    assert_figures(
        &report,
        &[
            "load_produced_rate",
            "load_backlog_last",
            "relay_peak_rss_mib",
            "consumer_peak_rss_mib",
            "gateway_peak_rss_mib",
        ],
    );
}

/// Named `fault_` so it runs in the single-threaded phase after every other test: it pins the
/// machine's RabbitMQ and PostgreSQL to one core each while it runs, and must put them back.
#[tokio::test]
async fn fault_split_scenario_runs_and_restores_the_affinities() {
    let mut report = Report::default();
    bench::split::run(Scale::Smoke, &mut report).await.unwrap();
    assert_figures(
        &report,
        &[
            "shared_producer_commit_rate_relay_running",
            "shared_consumer_inbox_drain",
            "split_producer_commit_rate_relay_running",
            "split_consumer_inbox_drain",
            "split_vs_shared_relay_running_ratio",
        ],
    );
    let cores = std::thread::available_parallelism().unwrap().get();
    let all: Vec<usize> = (0..cores).collect();
    let postmaster = std::process::Command::new("pgrep")
        .args(["-o", "-u", "postgres", "postgres"])
        .output()
        .unwrap();
    let beam = std::process::Command::new("pgrep")
        .args(["-u", "rabbitmq", "beam.smp"])
        .output()
        .unwrap();
    for pid in [postmaster, beam]
        .iter()
        .flat_map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .chain([std::process::id().to_string()])
    {
        let out = std::process::Command::new("taskset")
            .args(["-cp", &pid])
            .output()
            .unwrap();
        let line = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert_eq!(
            cpu_list(line.rsplit(": ").next().unwrap_or("")),
            all,
            "process {pid} not back on all cores: {line}"
        );
    }
}

/// `taskset`'s affinity list (`0,1`, `0-3`, `0-1,4`) as the CPUs it names.
fn cpu_list(list: &str) -> Vec<usize> {
    list.split(',')
        .flat_map(|part| match part.split_once('-') {
            Some((a, b)) => (a.trim().parse().unwrap()..=b.trim().parse().unwrap()).collect(),
            None => vec![part.trim().parse().unwrap()],
        })
        .collect()
}
