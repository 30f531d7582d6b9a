//! The demo flow, small: 50 orders through the real relay, gateway and notifier binaries and the
//! example's own processes, with client retries and republished duplicates, then every
//! invariant of `scripts/demo` checked.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::{amqp_url, fresh_db, unique_name};
use order_service::demo::{self, DemoConfig};

/// Child processes, killed when the test ends however it ends.
struct Children(Vec<(String, Child)>, PathBuf);

impl Children {
    fn spawn(&mut self, name: &str, command: &mut Command) {
        let log = std::fs::File::create(self.1.join(format!("{name}.log"))).expect("log file");
        let child = command
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        self.0.push((name.to_owned(), child));
    }

    /// The last lines of every child's log, for a failure message.
    fn logs(&self) -> String {
        let mut out = String::new();
        for (name, _) in &self.0 {
            let text =
                std::fs::read_to_string(self.1.join(format!("{name}.log"))).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(8).collect();
            out.push_str(&format!("--- {name}\n"));
            for line in tail.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A workspace binary next to this test's own target directory, built if missing.
fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/flow-<hash> → target/<profile>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    if !path.exists() {
        let mut build = Command::new(env!("CARGO"));
        build.args(["build", "-q", "-p", name]);
        if dir.file_name().is_some_and(|p| p == "release") {
            build.arg("--release");
        }
        let status = build.status().expect("run cargo build");
        assert!(status.success(), "cargo build -p {name} failed");
    }
    path
}

async fn wait_ready(url: &str, children: &Children) {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = http.get(url).send().await
            && r.status().is_success()
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{url} not ready in 30 s\n{}",
            children.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_orders_keep_every_invariant_under_retries_and_duplicates() {
    let relay = workspace_binary("outbox-relay");
    let gateway = workspace_binary("gateway");
    let notifier = workspace_binary("notifier");
    let example = PathBuf::from(env!("CARGO_BIN_EXE_order-service"));

    let db = fresh_db().await;
    order_service::schema::apply(&db.pool)
        .await
        .expect("example schema");
    let dir = std::env::temp_dir().join(unique_name("order-demo"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let exchange = unique_name("demo.orders");
    let queue_prefix = format!("{}.", unique_name("demo"));
    let secret = unique_name("webhook-secret");
    let [
        p_api,
        p_workers,
        p_gateway,
        p_relay,
        p_notifier,
        p_provider,
        p_receiver,
    ] = std::array::from_fn(|_| free_port());
    let url = |p: u16| format!("http://127.0.0.1:{p}");

    std::fs::write(
        dir.join("gateway.toml"),
        format!(
            r#"listen = "127.0.0.1:{p_gateway}"
database_url = "{db}"

[[routes]]
prefix = "/pay"
upstream = "http://127.0.0.1:{p_provider}"
timeout_ms = 1000
idempotency = {{ required = true, ttl_secs = 86400 }}
lock = {{ key = "header:X-Order-Id", wait_ms = 500 }}
retry = {{ attempts = 2, backoff_ms = 20, statuses = [502, 503] }}
breaker = {{ failure_threshold = 50, open_ms = 500 }}
[[routes]]
prefix = "/refund"
upstream = "http://127.0.0.1:{p_provider}"
timeout_ms = 1000
idempotency = {{ required = true, ttl_secs = 86400 }}
lock = {{ key = "header:X-Order-Id", wait_ms = 500 }}
retry = {{ attempts = 2, backoff_ms = 20, statuses = [502, 503] }}
breaker = {{ failure_threshold = 50, open_ms = 500 }}
"#,
            db = db.url
        ),
    )
    .expect("gateway config");
    std::fs::write(
        dir.join("notifier.toml"),
        format!(
            r#"database_url = "{db}"
listen = "127.0.0.1:{p_notifier}"
time_scale = 0.01
poll_interval_ms = 50

[[tokens]]
token = "test-operator-token-0123456789"

[[endpoints]]
id = "merchant"
url = "http://127.0.0.1:{p_receiver}/hooks/payments"
secret = "{secret}"
"#,
            db = db.url
        ),
    )
    .expect("notifier config");

    let mut children = Children(Vec::new(), dir.clone());
    let example_cmd = |args: &[&str]| {
        let mut c = Command::new(&example);
        c.env("DATABASE_URL", &db.url)
            .env("AMQP_URL", amqp_url())
            .env("ORDER_EXCHANGE", &exchange)
            .args(args);
        c
    };
    let (provider_addr, receiver_addr, workers_addr, api_addr) = (
        format!("127.0.0.1:{p_provider}"),
        format!("127.0.0.1:{p_receiver}"),
        format!("127.0.0.1:{p_workers}"),
        format!("127.0.0.1:{p_api}"),
    );
    children.spawn(
        "provider",
        &mut example_cmd(&["provider", "--listen", &provider_addr]),
    );
    children.spawn(
        "receiver",
        &mut example_cmd(&["receiver", "--listen", &receiver_addr, "--secret", &secret]),
    );
    children.spawn(
        "gateway",
        Command::new(&gateway)
            .arg("--config")
            .arg(dir.join("gateway.toml")),
    );
    children.spawn(
        "notifier",
        Command::new(&notifier)
            .env("DATABASE_URL", &db.url)
            .arg("--config")
            .arg(dir.join("notifier.toml")),
    );
    children.spawn(
        "relay",
        Command::new(&relay)
            .env("DATABASE_URL", &db.url)
            .env("AMQP_URL", amqp_url())
            .env("RELAY_HTTP_ADDR", format!("127.0.0.1:{p_relay}"))
            .arg("run"),
    );
    children.spawn(
        "workers",
        &mut example_cmd(&[
            "workers",
            "--listen",
            &workers_addr,
            "--queue-prefix",
            &queue_prefix,
            "--gateway-url",
            &url(p_gateway),
        ]),
    );
    children.spawn(
        "api",
        &mut example_cmd(&["api", "--listen", &api_addr, "--payment-timeout-ms", "2000"]),
    );
    for ready in [
        format!("{}/healthz", url(p_provider)),
        format!("{}/healthz", url(p_receiver)),
        format!("{}/readyz", url(p_gateway)),
        format!("{}/readyz", url(p_notifier)),
        format!("{}/readyz", url(p_relay)),
        format!("{}/readyz", url(p_workers)),
        format!("{}/healthz", url(p_api)),
    ] {
        wait_ready(&ready, &children).await;
    }

    let result = demo::run(DemoConfig {
        orders: 50,
        concurrency: 8,
        seed: 5,
        api_url: url(p_api),
        relay_metrics_url: format!("{}/metrics", url(p_relay)),
        gateway_metrics_url: format!("{}/metrics", url(p_gateway)),
        workers_metrics_url: format!("{}/metrics", url(p_workers)),
        provider_url: url(p_provider),
        receiver_url: url(p_receiver),
        database_url: db.url.clone(),
        amqp_url: amqp_url(),
        exchange: exchange.clone(),
        payment_timeout: Duration::from_millis(2000),
        settle_deadline: Duration::from_secs(30),
    })
    .await;
    let summary = match result {
        Ok(s) => s,
        Err(e) => panic!("demo run failed: {e:#}\n{}", children.logs()),
    };
    println!("{summary}");
    assert!(summary.failures.is_empty(), "invariants failed:\n{summary}");
    assert_eq!(summary.orders_created, 50);
    assert_eq!(
        summary.paid + summary.timed_out + summary.refunded + summary.declined,
        50,
        "{summary}"
    );
    assert!(summary.paid > 0 && summary.timed_out > 0, "{summary}");
    // The saga: some orders charged, then out of stock, then refunded exactly once.
    assert!(
        summary.refunded > 0,
        "no order hit the stock limit: {summary}"
    );
    assert_eq!(summary.refunds_issued, summary.refunded as u64, "{summary}");
    assert_eq!(
        summary.charges,
        (summary.paid + summary.refunded) as u64,
        "{summary}"
    );
    assert_eq!(summary.sagas_stuck, 0, "{summary}");
    assert_eq!(
        summary.sagas_started,
        summary.sagas_completed + summary.sagas_compensated,
        "{summary}"
    );
    assert_eq!(summary.sagas_completed, summary.paid, "{summary}");
    assert_eq!(summary.paid_and_reserved, summary.paid, "{summary}");
    assert_eq!(summary.rejected, summary.refunded, "{summary}");
    assert!(summary.republished > 0);
    assert!(
        summary.duplicates_suppressed >= summary.republished,
        "{summary}"
    );
    drop(children);
    let _ = order_service::workers::remove_topology(&order_service::workers::WorkersConfig {
        amqp_url: amqp_url(),
        exchange,
        queue_prefix,
        concurrency: 1,
        gateway_url: String::new(),
        payment_attempts: 1,
        notify_endpoint: String::new(),
    })
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}
