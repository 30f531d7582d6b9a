//! The relay end to end against real PostgreSQL and RabbitMQ: in-process for most behaviours,
//! as a real child process where a test kills or signals it.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use integration_tests::{TestDb, TestQueue, eventually, fresh_db, unique_name};
use outbox::{Message, Outbox};
use outbox_relay::Config;
use outbox_relay::relay::{self, Health};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);

fn test_config(db: &TestDb) -> Config {
    Config {
        database_url: db.url.clone(),
        amqp_url: integration_tests::amqp_url(),
        retry_min_ms: Duration::from_millis(50),
        retry_max_ms: Duration::from_millis(200),
        listen: false,
        ..Config::default()
    }
}

/// A relay running inside the test process until dropped.
struct InProcessRelay {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl InProcessRelay {
    fn start(db: &TestDb, config: Config) -> Self {
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(relay::run(
            db.pool.clone(),
            config,
            Arc::new(Health::default()),
            shutdown.clone(),
        ));
        InProcessRelay { shutdown, task }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// The `outbox-relay` binary as a child process.
fn spawn_relay(db: &TestDb, http_port: u16, extra: &[(&str, &str)]) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_outbox-relay"));
    cmd.arg("run")
        .env("DATABASE_URL", &db.url)
        .env("AMQP_URL", integration_tests::amqp_url())
        .env("RELAY_HTTP_ADDR", format!("127.0.0.1:{http_port}"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.spawn().expect("spawn outbox-relay")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn enqueue_sql(db: &TestDb, queue: &str, body: &str) -> i64 {
    sqlx::query_scalar("SELECT outbox.enqueue(exchange => '', routing_key => $1, payload => convert_to($2, 'UTF8'))")
        .bind(queue)
        .bind(body)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

async fn pending(db: &TestDb) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox.messages")
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn committed_message_arrives_with_its_id_and_persistent() {
    let db = fresh_db().await;
    let queue = TestQueue::new("committed").await;
    let relay = InProcessRelay::start(&db, test_config(&db));

    let outbox = Outbox::new(db.pool.clone()).await.unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    let msg = Message::json("", &queue.name, &serde_json::json!({"order": 42}))
        .unwrap()
        .with_header("tenant", "acme")
        .with_header("attempt", 3);
    let id = outbox.enqueue(&mut tx, &msg).await.unwrap();
    tx.commit().await.unwrap();
    let sql_id = enqueue_sql(&db, &queue.name, "from sql").await;

    let got = queue.wait_for(2, WAIT).await;
    let rust = got
        .iter()
        .find(|r| r.message_id == Some(id.to_string()))
        .expect("rust message");
    assert_eq!(rust.delivery_mode, Some(2));
    assert_eq!(rust.content_type.as_deref(), Some("application/json"));
    assert_eq!(rust.header_str("tenant").as_deref(), Some("acme"));
    assert_eq!(rust.payload, br#"{"order":42}"#);
    let sql = got
        .iter()
        .find(|r| r.message_id == Some(sql_id.to_string()))
        .expect("sql message");
    assert_eq!(sql.delivery_mode, Some(2));
    assert_eq!(sql.payload, b"from sql");
    eventually(WAIT, "outbox emptied", || async { pending(&db).await == 0 }).await;
    relay.stop().await;
    queue.delete().await;
}

#[tokio::test]
async fn rolled_back_transaction_publishes_nothing() {
    let db = fresh_db().await;
    let queue = TestQueue::new("rollback").await;
    let relay = InProcessRelay::start(&db, test_config(&db));
    let outbox = Outbox::new(db.pool.clone()).await.unwrap();

    let mut tx = db.pool.begin().await.unwrap();
    outbox
        .enqueue(&mut tx, &Message::new("", &queue.name, "rolled back"))
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query("SELECT outbox.enqueue('', $1, 'rolled back too')")
        .bind(&queue.name)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    // A marker committed after both: once it has arrived, anything published before it has too.
    let marker = enqueue_sql(&db, &queue.name, "marker").await;

    let got = queue
        .wait_until(WAIT, "the marker", |got| {
            got.iter().any(|r| r.message_id == Some(marker.to_string()))
        })
        .await;
    assert_eq!(
        got.len(),
        1,
        "only the committed marker may arrive: {got:?}"
    );
    relay.stop().await;
    queue.delete().await;
}

#[tokio::test]
async fn delayed_message_waits_until_due_and_cancelled_one_never_goes() {
    let db = fresh_db().await;
    let queue = TestQueue::new("delayed").await;
    let relay = InProcessRelay::start(&db, test_config(&db));
    let outbox = Outbox::new(db.pool.clone()).await.unwrap();

    let mut tx = db.pool.begin().await.unwrap();
    let delayed = outbox
        .enqueue(
            &mut tx,
            &Message::new("", &queue.name, "later").with_delay(Duration::from_millis(1500)),
        )
        .await
        .unwrap();
    outbox
        .enqueue(
            &mut tx,
            &Message::new("", &queue.name, "cancel me")
                .with_delay(Duration::from_millis(1000))
                .with_dedupe_key("timeout:1"),
        )
        .await
        .unwrap();
    let now = outbox
        .enqueue(&mut tx, &Message::new("", &queue.name, "now"))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let enqueued_at = std::time::Instant::now();

    let mut tx = db.pool.begin().await.unwrap();
    assert!(outbox::cancel(&mut tx, "timeout:1").await.unwrap());
    assert!(
        !outbox::cancel(&mut tx, "timeout:1").await.unwrap(),
        "second cancel finds nothing"
    );
    tx.commit().await.unwrap();

    let got = queue.wait_for(1, WAIT).await;
    assert_eq!(
        got[0].message_id,
        Some(now.to_string()),
        "the due message goes first"
    );
    let got = queue
        .wait_until(WAIT, "the delayed message", |got| {
            got.iter()
                .any(|r| r.message_id == Some(delayed.to_string()))
        })
        .await;
    let waited = enqueued_at.elapsed();
    assert!(
        waited >= Duration::from_millis(1400),
        "delivered early: {waited:?}"
    );
    // Promised: within 1 s of due (due at 1.5 s).
    assert!(
        waited < Duration::from_millis(2500),
        "delivered late: {waited:?}"
    );
    assert_eq!(
        got.len(),
        2,
        "the cancelled message must not arrive: {got:?}"
    );
    relay.stop().await;
    queue.delete().await;
}

#[tokio::test]
async fn unroutable_message_is_retried_then_dead_lettered_then_redriven() {
    let db = fresh_db().await;
    let queue_name = unique_name("unroutable");
    let mut config = test_config(&db);
    config.max_attempts = 3;
    let relay = InProcessRelay::start(&db, config);

    // No queue of that name yet: the broker returns the mandatory message.
    let id = enqueue_sql(&db, &queue_name, "lost?").await;
    eventually(WAIT, "dead letter", || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox.dead_letters WHERE id = $1")
            .bind(id)
            .fetch_one(&db.pool)
            .await
            .unwrap()
            == 1
    })
    .await;
    let (attempts, reason): (i32, String) =
        sqlx::query_as("SELECT attempts, reason FROM outbox.dead_letters WHERE id = $1")
            .bind(id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(attempts, 3);
    assert!(reason.contains("NO_ROUTE"), "{reason}");
    assert_eq!(pending(&db).await, 0);

    let queue = TestQueue::named(&queue_name).await;
    assert_eq!(
        outbox_relay::admin::redrive(&db.pool, &[id]).await.unwrap(),
        1
    );
    let got = queue.wait_for(1, WAIT).await;
    assert_eq!(
        got[0].message_id,
        Some(id.to_string()),
        "redriven with the same id"
    );
    relay.stop().await;
    queue.delete().await;
}

#[tokio::test]
async fn failed_attempt_puts_the_message_back_whole() {
    let db = fresh_db().await;
    let queue_name = unique_name("unroutable_whole");
    let mut config = test_config(&db);
    // One failure, then a long wait: the row is read back while it is scheduled.
    config.retry_min_ms = Duration::from_secs(60);
    config.retry_max_ms = Duration::from_secs(60);
    let relay = InProcessRelay::start(&db, config);
    type Row = (
        i64,
        String,
        String,
        Vec<u8>,
        serde_json::Value,
        Option<String>,
        Option<String>,
        chrono::DateTime<chrono::Utc>,
    );
    let select = "SELECT id, exchange, routing_key, payload, headers, ordering_key, dedupe_key, \
                  created_at FROM outbox.messages";
    let mut tx = db.pool.begin().await.unwrap();
    let id: i64 = sqlx::query_scalar(
        "SELECT outbox.enqueue(exchange => '', routing_key => $1, payload => '\\x00ff'::bytea, \
         headers => '{\"tenant\": \"t1\", \"n\": 3}', ordering_key => 'order-9', \
         dedupe_key => 'dk-9')",
    )
    .bind(&queue_name)
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    let before: Row = sqlx::query_as(sqlx::AssertSqlSafe(select))
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    eventually(WAIT, "the first failed attempt recorded", || async {
        sqlx::query_scalar::<_, i32>("SELECT attempts FROM outbox.messages WHERE id = $1")
            .bind(id)
            .fetch_optional(&db.pool)
            .await
            .unwrap()
            == Some(1)
    })
    .await;
    let after: Row = sqlx::query_as(sqlx::AssertSqlSafe(select))
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        after, before,
        "id, body, headers, keys and enqueue time kept"
    );
    let (error, waits): (String, bool) = sqlx::query_as(
        "SELECT last_error, available_at > now() + interval '30 seconds' \
         FROM outbox.messages WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(error.contains("NO_ROUTE"), "{error}");
    assert!(waits, "the next attempt is scheduled after the backoff");
    // The dedupe key still guards the scheduled message.
    let again: i64 = sqlx::query_scalar(
        "SELECT outbox.enqueue(exchange => '', routing_key => $1, payload => 'x', \
         dedupe_key => 'dk-9')",
    )
    .bind(&queue_name)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(again, id);
    relay.stop().await;
}

#[tokio::test]
async fn missing_exchange_fails_only_its_own_messages() {
    let db = fresh_db().await;
    let queue = TestQueue::new("neighbour").await;
    let mut config = test_config(&db);
    config.max_attempts = 2;
    let relay = InProcessRelay::start(&db, config);

    let mut tx = db.pool.begin().await.unwrap();
    let bad: i64 = sqlx::query_scalar("SELECT outbox.enqueue('no-such-exchange', 'x', 'b')")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    for i in 0..20 {
        sqlx::query("SELECT outbox.enqueue('', $1, convert_to($2, 'UTF8'))")
            .bind(&queue.name)
            .bind(i.to_string())
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    queue.wait_for(20, WAIT).await;
    eventually(WAIT, "the bad message dead-lettered", || async {
        sqlx::query_scalar::<_, String>("SELECT reason FROM outbox.dead_letters WHERE id = $1")
            .bind(bad)
            .fetch_optional(&db.pool)
            .await
            .unwrap()
            .is_some_and(|r| r.contains("no-such-exchange"))
    })
    .await;
    relay.stop().await;
    queue.delete().await;
}

/// Enqueues `keys` × `rounds` keyed messages (body `key:round`), a round per transaction;
/// returns how many.
async fn enqueue_keyed(db: &TestDb, queue: &str, keys: usize, rounds: usize) -> usize {
    let outbox = Outbox::new(db.pool.clone()).await.unwrap();
    for round in 0..rounds {
        let mut tx = db.pool.begin().await.unwrap();
        for key in 0..keys {
            let msg = Message::new("", queue, format!("{key}:{round}"))
                .with_ordering_key(format!("key-{key}"));
            outbox.enqueue(&mut tx, &msg).await.unwrap();
        }
        tx.commit().await.unwrap();
    }
    keys * rounds
}

/// Asserts every key's messages arrived once each, in order.
fn assert_in_key_order(got: &[integration_tests::Received]) {
    let mut last = std::collections::HashMap::new();
    for r in got {
        let body = String::from_utf8(r.payload.clone()).unwrap();
        let (key, seq) = body.split_once(':').unwrap();
        let seq: i32 = seq.parse().unwrap();
        assert_eq!(r.header_str("x-ordering-key"), Some(format!("key-{key}")));
        let prev = last.insert(key.to_owned(), seq);
        assert_eq!(prev.map_or(0, |p| p + 1), seq, "key {key} out of order");
    }
}

#[tokio::test]
async fn two_relays_keep_per_key_order() {
    let db = fresh_db().await;
    let queue = TestQueue::new("ordered").await;
    // Interleave 50 keys × 20 messages, committed in small transactions.
    let expected = enqueue_keyed(&db, &queue.name, 50, 20).await;
    let mut config = test_config(&db);
    config.batch_size = 40;
    let a = InProcessRelay::start(&db, config.clone());
    let b = InProcessRelay::start(&db, config);

    let got = queue.wait_for(expected, WAIT).await;
    assert_eq!(got.len(), expected, "no duplicates without faults");
    assert_in_key_order(&got);
    a.stop().await;
    b.stop().await;
    queue.delete().await;
}

/// With `batch_size` 1 every claim comes back full, so a worker always claims its next batch
/// while the last one waits for its confirm: that claim must skip the next message of the key
/// in flight, and take another key's instead.
#[tokio::test]
async fn pipelined_batches_keep_per_key_order() {
    let db = fresh_db().await;
    let queue = TestQueue::new("pipelined").await;
    let expected = enqueue_keyed(&db, &queue.name, 3, 40).await;
    let mut config = test_config(&db);
    config.batch_size = 1;
    config.workers = 1;
    let relay = InProcessRelay::start(&db, config);

    let got = queue.wait_for(expected, WAIT).await;
    assert_eq!(got.len(), expected, "no duplicates without faults");
    assert_in_key_order(&got);
    relay.stop().await;
    assert_eq!(pending(&db).await, 0);
    queue.delete().await;
}

#[tokio::test]
async fn relay_killed_mid_batch_loses_nothing() {
    let db = fresh_db().await;
    let queue = TestQueue::new("sigkill").await;
    let total = 5000;
    sqlx::query(
        "SELECT outbox.enqueue('', $1, convert_to(g::text, 'UTF8')) FROM generate_series(1, $2) g",
    )
    .bind(&queue.name)
    .bind(total)
    .execute(&db.pool)
    .await
    .unwrap();
    let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM outbox.messages")
        .fetch_all(&db.pool)
        .await
        .unwrap();

    let mut relay = spawn_relay(&db, free_port(), &[]);
    queue.wait_for(100, WAIT).await;
    relay.kill().unwrap(); // SIGKILL: no chance to finish the batch
    relay.wait().unwrap();
    let before_restart = queue.received().len();
    assert!(
        before_restart < total as usize,
        "the kill came too late to test anything"
    );

    let mut relay = spawn_relay(&db, free_port(), &[]);
    let got = queue
        .wait_until(WAIT, "every message", |got| {
            let seen: std::collections::HashSet<_> =
                got.iter().filter_map(|r| r.message_id.clone()).collect();
            ids.iter().all(|id| seen.contains(&id.to_string()))
        })
        .await;
    eventually(WAIT, "outbox emptied", || async { pending(&db).await == 0 }).await;
    relay.kill().unwrap();
    relay.wait().unwrap();
    let duplicates = got.len() - ids.len();
    println!(
        "sent {} received {} duplicates {duplicates}",
        ids.len(),
        got.len()
    );
    queue.delete().await;
}

#[tokio::test]
async fn sigterm_finishes_the_batch_and_exits_zero() {
    let db = fresh_db().await;
    let queue = TestQueue::new("sigterm").await;
    sqlx::query(
        "SELECT outbox.enqueue('', $1, convert_to(g::text, 'UTF8')) FROM generate_series(1, 3000) g",
    )
    .bind(&queue.name)
    .execute(&db.pool)
    .await
    .unwrap();
    let port = free_port();
    let mut relay = spawn_relay(&db, port, &[]);
    queue.wait_for(1, WAIT).await;
    let status = Command::new("kill")
        .args(["-TERM", &relay.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || relay.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(exit.code(), Some(0), "relay must exit 0 on SIGTERM");
    // Every row it deleted was confirmed: what is gone from the table arrived at the queue.
    let left = pending(&db).await as usize;
    let got = queue.wait_for(3000 - left, WAIT).await;
    assert!(got.len() >= 3000 - left);
    queue.delete().await;
}

#[tokio::test]
async fn http_endpoints_report_health_and_metrics() {
    let db = fresh_db().await;
    let queue = TestQueue::new("metrics").await;
    let port = free_port();
    let mut relay = spawn_relay(&db, port, &[]);
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    eventually(WAIT, "/readyz 200", || async {
        matches!(client.get(format!("{base}/readyz")).send().await, Ok(r) if r.status() == 200)
    })
    .await;
    assert_eq!(
        client
            .get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    enqueue_sql(&db, &queue.name, "count me").await;
    queue.wait_for(1, WAIT).await;
    eventually(WAIT, "published counter", || async {
        let text = client
            .get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.contains("outbox_relay_published_total 1")
            && text.contains("outbox_backlog_messages")
            && text.contains("outbox_oldest_due_age_seconds")
            && text.contains("outbox_relay_enqueue_to_confirm_seconds_bucket")
    })
    .await;
    relay.kill().unwrap();
    relay.wait().unwrap();
    queue.delete().await;
}

fn relay_cli(db: &TestDb, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .args(args)
        .env("DATABASE_URL", &db.url)
        .env("RUST_LOG", "error")
        .output()
        .expect("run outbox-relay")
}

#[tokio::test]
async fn cli_reports_status_and_redrives_dead_letters() {
    let db = fresh_db().await;
    // Two due messages, one delayed, two dead letters.
    let mut ids = Vec::new();
    for body in ["a", "b", "c", "d"] {
        ids.push(enqueue_sql(&db, "nowhere", body).await);
    }
    sqlx::query("SELECT outbox.enqueue('', 'later', 'x', deliver_at => now() + interval '1 hour')")
        .execute(&db.pool)
        .await
        .unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    outbox_relay::claim::dead_letter(&mut conn, &ids[2..], &["NO_ROUTE", "NO_ROUTE"])
        .await
        .unwrap();
    drop(conn);

    let out = relay_cli(&db, &["status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["due"], 2);
    assert_eq!(status["scheduled"], 1);
    assert_eq!(status["dead_letters"], 2);
    assert!(status["oldest_due_age_seconds"].as_f64().unwrap() >= 0.0);

    let out = relay_cli(&db, &["dead", "list"]);
    let listing = String::from_utf8(out.stdout).unwrap();
    assert_eq!(listing.lines().count(), 2, "{listing}");
    assert!(listing.contains("NO_ROUTE"));

    let out = relay_cli(&db, &["dead", "redrive", &ids[2].to_string()]);
    assert!(out.status.success());
    let out = relay_cli(&db, &["dead", "redrive", "--all"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("redriven 1"));
    assert_eq!(pending(&db).await, 5);
    let out = relay_cli(&db, &["dead", "redrive", "12345"]);
    assert!(!out.status.success(), "an unknown id is an error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no dead letter with id 12345"));
}

#[tokio::test]
async fn bad_configuration_exits_naming_the_key() {
    let db = fresh_db().await;
    let dir = std::env::temp_dir().join(unique_name("relaycfg"));
    std::fs::create_dir_all(&dir).unwrap();
    for (text, key) in [
        ("batch_sise = 10\n", "batch_sise"),
        ("workers = \"four\"\n", "workers"),
        ("batch_size = 0\n", "batch_size"),
    ] {
        let file = dir.join("relay.toml");
        std::fs::write(&file, text).unwrap();
        let out = relay_cli(&db, &["--config", file.to_str().unwrap(), "run"]);
        assert!(!out.status.success(), "{text} must be refused");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(key), "{text}: {stderr}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .args(["run"])
        .env("DATABASE_URL", &db.url)
        .env("RELAY_HTTP_ADDR", "not-an-address")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("RELAY_HTTP_ADDR"));
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test]
async fn secrets_never_appear_in_logs_or_errors() {
    let db = fresh_db().await;
    let secret = "s3cr3t-broker-pass";
    // Two broker nodes that refuse: the relay logs its connection failures, naming each node.
    let out = tokio::task::spawn_blocking({
        let url = db.url.clone();
        move || {
            let mut child = Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
                .arg("run")
                .env("DATABASE_URL", &url)
                .env(
                    "AMQP_URL",
                    format!(
                        "amqp://guest:{secret}@127.0.0.1:1/%2f,amqp://guest:{secret}@127.0.0.1:2/%2f"
                    ),
                )
                .env("RELAY_HTTP_ADDR", "127.0.0.1:0")
                .env("RELAY_ADMIN_TOKEN", "token-0123456789-very-secret")
                .env("RUST_LOG", "debug")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            std::thread::sleep(Duration::from_secs(2));
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.try_wait();
            child.wait_with_output().unwrap()
        }
    })
    .await
    .unwrap();
    let logs =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        logs.contains("broker connect failed"),
        "the failure is logged: {logs}"
    );
    assert!(
        logs.contains("amqp://guest:***@127.0.0.1:1/%2f")
            && logs.contains("amqp://guest:***@127.0.0.1:2/%2f"),
        "both nodes were tried, named with the password masked: {logs}"
    );
    assert!(
        !logs.contains(secret),
        "the broker password leaked into the logs"
    );
    assert!(
        !logs.contains("very-secret"),
        "the admin token leaked into the logs"
    );

    // A bad token length is refused without echoing the token.
    let out = Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .args(["run"])
        .env("DATABASE_URL", &db.url)
        .env("RELAY_ADMIN_TOKEN", "short-secret")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("admin_token"),
        "{stderr}"
    );
    assert!(!stderr.contains("short-secret"), "{stderr}");
}
