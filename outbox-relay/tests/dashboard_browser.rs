//! The dashboard in a real browser: a relay dead-letters an unroutable message, headless
//! Chromium (driven by playwright-core, `tests/browser/dashboard.spec.mjs`) logs in, sees the
//! dead letter and redrives it, and the message arrives at a consumer of the now existing queue.
//!
//! Needs `/usr/bin/chromium` and `npm ci` in `tests/browser` (both done by
//! `scripts/browser-deps`, which `scripts/services` runs). Set `DASHBOARD_SCREENSHOT=path.png`
//! to keep a screenshot of the page taken before the redrive (relative to the repository root).

mod dashboard_support;

use std::sync::Arc;
use std::time::Duration;

use dashboard_support::{Server, TOKEN};
use integration_tests::{TestDb, TestQueue, eventually, fresh_db, unique_name};
use outbox_relay::Config;
use outbox_relay::relay::{self, Health};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

async fn enqueue(db: &TestDb, exchange: &str, key: &str, body: &str, later: bool) -> i64 {
    sqlx::query_scalar(
        "SELECT outbox.enqueue(exchange => $1, routing_key => $2, payload => convert_to($3, 'UTF8'), \
                deliver_at => CASE WHEN $4 THEN now() + interval '1 hour' END)",
    )
    .bind(exchange)
    .bind(key)
    .bind(body)
    .bind(later)
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

/// Rows for the other sections, so the page (and its screenshot) shows each of them filled.
async fn other_sections(db: &TestDb) {
    for sql in [
        "INSERT INTO outbox.prepared_messages (exchange, routing_key, payload, check_url, state, \
             check_attempts, last_check_error, unresolved_at) \
         VALUES ('orders', 'order.paid', '\\x7b7d', 'http://127.0.0.1:9/check', 'unresolved', 8, \
                 'check endpoint answered 503', now())",
        "INSERT INTO inbox.compensation_log (consumer, queue, message_id, exchange, routing_key, \
             payload, attempts, reason, last_error) \
         VALUES ('stock-reserver', 'stock.reserve', 4096, 'orders', 'order.created', \
                 convert_to('{\"order\":42}', 'UTF8'), 5, 'exhausted', 'stock service timed out')",
        "SELECT notify.upsert_endpoint('billing-partner', 'https://partner.invalid/hooks', \
             'secret-0123456789abcdef')",
        "SELECT notify.send('billing-partner', 'invoice.paid', '{\"invoice\": 7}')",
        "UPDATE notify.notifications SET status = 'exhausted', attempts = 8, next_attempt_at = NULL, \
             exhausted_at = now(), last_error = 'HTTP 500 from endpoint'",
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&db.pool)
            .await
            .unwrap();
    }
    for i in 0..3 {
        enqueue(
            db,
            "orders",
            "order.reminder",
            &format!("{{\"n\":{i}}}"),
            true,
        )
        .await;
    }
}

#[tokio::test]
async fn browser_redrives_a_dead_letter_that_reaches_its_consumer() {
    let browser_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser");
    assert!(
        std::path::Path::new(browser_dir)
            .join("node_modules/playwright-core")
            .exists()
            && std::path::Path::new("/usr/bin/chromium").exists(),
        "chromium or playwright-core missing: run scripts/browser-deps"
    );
    let db = fresh_db().await;
    let metrics = outbox_relay::metrics::install().unwrap();
    let server = Server::start(&db, Some(metrics)).await;
    let config = Config {
        database_url: db.url.clone(),
        amqp_url: integration_tests::amqp_url(),
        max_attempts: 2,
        retry_min_ms: Duration::from_millis(20),
        retry_max_ms: Duration::from_millis(50),
        listen: false,
        ..Config::default()
    };
    let shutdown = CancellationToken::new();
    let relay = tokio::spawn(relay::run(
        db.pool.clone(),
        config,
        Arc::new(Health::default()),
        shutdown.clone(),
    ));

    // No queue by that name yet: the broker returns the message, and the relay dead-letters it.
    let queue_name = unique_name("dashboard");
    let id = enqueue(&db, "", &queue_name, "{\"order\":42}", false).await;
    eventually(WAIT, "the message dead-lettered", || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox.dead_letters WHERE id = $1")
            .bind(id)
            .fetch_one(&db.pool)
            .await
            .unwrap()
            == 1
    })
    .await;

    // Now the consumer's queue exists; some traffic for the publish figures.
    let consumer = TestQueue::named(&queue_name).await;
    for i in 0..20 {
        enqueue(&db, "", &queue_name, &format!("{{\"warmup\":{i}}}"), false).await;
    }
    consumer.wait_for(20, WAIT).await;
    other_sections(&db).await;

    let mut node = tokio::process::Command::new("node");
    node.arg("dashboard.spec.mjs")
        .current_dir(browser_dir)
        .env("DASHBOARD_URL", server.url(""))
        .env("DASHBOARD_TOKEN", TOKEN)
        .env("DEAD_ID", id.to_string())
        .kill_on_drop(true);
    if let Ok(path) = std::env::var("DASHBOARD_SCREENSHOT") {
        // Relative to the repository root, whatever directory node runs in.
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        node.env("SCREENSHOT", root.join(path));
    }
    let out = tokio::time::timeout(Duration::from_secs(45), node.output())
        .await
        .expect("the browser run finishes within 45 s")
        .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "browser run failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(report["redriven"], id.to_string());
    assert!(
        report["payload"]
            .as_str()
            .unwrap()
            .contains("\"order\": 42")
    );

    // The redriven message keeps its id and reaches the consumer.
    let got = consumer
        .wait_until(WAIT, "the redriven message", |got| {
            got.iter()
                .any(|m| m.message_id.as_deref() == Some(id.to_string().as_str()))
        })
        .await;
    let m = got
        .iter()
        .find(|m| m.message_id.as_deref() == Some(id.to_string().as_str()))
        .unwrap();
    assert_eq!(m.payload, b"{\"order\":42}");
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox.dead_letters")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(left, 0);

    shutdown.cancel();
    relay.await.unwrap().unwrap();
    consumer.delete().await;
}
