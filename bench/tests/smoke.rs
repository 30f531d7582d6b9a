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
            "gateway_added_p99",
            "gateway_idempotent_post_postgres_rps",
            "gateway_idempotent_post_redis_p99",
        ],
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
