//! Delivery against a real receiver on loopback and a real PostgreSQL database: retries until
//! acknowledged, exhaustion with its outbox event, restarts, Retry-After, required bodies and
//! per-endpoint isolation.

mod common;

use std::time::Duration;

use common::*;
use integration_tests::{eventually, fresh_db};
use notifier::EndpointSpec;

#[tokio::test]
async fn failing_receiver_is_retried_until_it_acknowledges_then_left_alone() {
    let db = fresh_db().await;
    let rx = Receiver::failing(3).await;
    endpoint(&db.pool, "partner", &rx.url(), SECRET, None).await;
    let id = send_json(&db.pool, "partner", serde_json::json!({"order": 42})).await;
    // Default schedule at 1/1000: waits of 15 ms, 15 ms, 30 ms.
    let worker = RunningWorker::start(&db.pool, worker_config(0.001));
    wait_status(&db.pool, id, "delivered", Duration::from_secs(10)).await;

    let log = attempts(&db.pool, id).await;
    assert_eq!(log.len(), 4, "{log:?}");
    for (i, (no, status, ok, err)) in log.iter().enumerate() {
        assert_eq!(*no, i as i32 + 1);
        if i < 3 {
            assert_eq!((*status, *ok), (Some(500), false));
            assert_eq!(err.as_deref(), Some("HTTP 500"));
        } else {
            assert_eq!((*status, *ok, err.as_deref()), (Some(200), true, None));
        }
    }
    let seen = rx.seen_for(id);
    assert_eq!(seen.len(), 4);
    let numbers: Vec<String> = seen.iter().map(|s| s.header("webhook-attempt")).collect();
    assert_eq!(numbers, ["1", "2", "3", "4"]);
    // Each wait is at least its (scaled) step.
    for (pair, step) in seen.windows(2).zip([15u64, 15, 30]) {
        assert!(pair[1].at - pair[0].at >= Duration::from_millis(step));
    }
    let (attempt_count, delivered): (i32, bool) = sqlx::query_as(
        "SELECT attempts, delivered_at IS NOT NULL FROM notify.notifications WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((attempt_count, delivered), (4, true));

    // Acknowledged means done: several poll rounds later nothing more went out.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(rx.seen_for(id).len(), 4);
    worker.stop().await;
}

#[tokio::test]
async fn receiver_down_for_the_whole_schedule_exhausts_and_publishes_the_event() {
    let db = fresh_db().await;
    let rx = Receiver::start(vec![], Answer::status(503)).await;
    endpoint(&db.pool, "dead-partner", &rx.url(), SECRET, None).await;
    let id = send_json(&db.pool, "dead-partner", serde_json::json!({"n": 1})).await;
    // The default 15-step schedule (about 24 h) at 1/20000: about 4.3 s.
    let started = std::time::Instant::now();
    let worker = RunningWorker::start(&db.pool, worker_config(0.00005));
    wait_status(&db.pool, id, "exhausted", Duration::from_secs(30)).await;
    assert!(started.elapsed() >= Duration::from_secs_f64(86_640.0 * 0.00005));

    let log = attempts(&db.pool, id).await;
    assert_eq!(log.len(), 16, "15 steps mean 16 attempts");
    assert!(log.iter().all(|a| a.1 == Some(503) && !a.2));
    assert_eq!(rx.seen_for(id).len(), 16);

    let events: Vec<(String, String, Vec<u8>, serde_json::Value)> = sqlx::query_as(
        "SELECT exchange, routing_key, payload, headers FROM outbox.messages \
         WHERE routing_key = 'notification.exhausted'",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(events.len(), 1);
    let (exchange, _, payload, headers) = &events[0];
    assert_eq!(exchange, "");
    let payload: serde_json::Value = serde_json::from_slice(payload).unwrap();
    assert_eq!(payload["notification_id"], id.to_string());
    assert_eq!(payload["endpoint"], "dead-partner");
    assert_eq!(payload["attempts"], 16);
    assert_eq!(payload["last_error"], "HTTP 503");
    assert_eq!(headers["event_type"], "notification.exhausted");

    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(rx.seen_for(id).len(), 16, "no attempt after exhaustion");
    worker.stop().await;
}

#[tokio::test]
async fn restarted_notifier_continues_the_schedule_on_time_without_loss_or_duplicates() {
    let db = fresh_db().await;
    // Each notification fails twice then succeeds; three of them share the script.
    let rx = Receiver::start(vec![Answer::status(500); 6], Answer::status(200)).await;
    endpoint(&db.pool, "partner", &rx.url(), SECRET, Some("700ms, 700ms")).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(send_json(&db.pool, "partner", serde_json::json!({ "i": i })).await);
    }
    let mut cfg = worker_config(1.0);
    // Six failures in a row would open the endpoint's circuit; this test is about the schedule.
    cfg.breaker_threshold = 100;
    let worker = RunningWorker::start(&db.pool, cfg.clone());
    eventually(Duration::from_secs(10), "first attempts", || async {
        ids.iter().all(|id| rx.seen_for(*id).len() == 1)
    })
    .await;
    worker.stop().await;
    let first: Vec<_> = ids.iter().map(|id| rx.seen_for(*id)[0].at).collect();
    for id in &ids {
        assert_eq!(status(&db.pool, *id).await, "pending");
        assert_eq!(attempts(&db.pool, *id).await.len(), 1);
    }

    // A new worker (a restarted process would be the same: all state is in the database).
    let worker = RunningWorker::start(&db.pool, cfg);
    for id in &ids {
        wait_status(&db.pool, *id, "delivered", Duration::from_secs(10)).await;
    }
    worker.stop().await;
    for (id, t0) in ids.iter().zip(first) {
        let seen = rx.seen_for(*id);
        assert_eq!(seen.len(), 3, "exactly three requests for {id}");
        // On time: the second attempt waited its 700 ms from the first, no less and not much
        // more, although the worker that scheduled it was gone.
        let gap = seen[1].at - t0;
        assert!(
            gap >= Duration::from_millis(690) && gap < Duration::from_millis(1200),
            "{gap:?}"
        );
        let numbers: Vec<i32> = attempts(&db.pool, *id).await.iter().map(|a| a.0).collect();
        assert_eq!(numbers, [1, 2, 3]);
    }
}

#[tokio::test]
async fn retry_after_from_the_receiver_stretches_the_wait() {
    let db = fresh_db().await;
    let rx = Receiver::start(
        vec![Answer::status(503).retry_after("1")],
        Answer::status(200),
    )
    .await;
    endpoint(&db.pool, "partner", &rx.url(), SECRET, Some("10ms")).await;
    let id = send_json(&db.pool, "partner", serde_json::json!({})).await;
    let worker = RunningWorker::start(&db.pool, worker_config(1.0));
    wait_status(&db.pool, id, "delivered", Duration::from_secs(10)).await;
    worker.stop().await;
    let seen = rx.seen_for(id);
    assert_eq!(seen.len(), 2);
    assert!(seen[1].at - seen[0].at >= Duration::from_secs(1));
}

#[tokio::test]
async fn a_2xx_without_the_required_body_is_not_an_acknowledgement() {
    let db = fresh_db().await;
    let rx = Receiver::start(
        vec![Answer::status(200).body("ok")],
        Answer::status(200).body("success\n"),
    )
    .await;
    let mut spec = endpoint(&db.pool, "strict", &rx.url(), SECRET, Some("10ms")).await;
    spec.required_body = Some("success".to_owned());
    spec.upsert(
        &mut db.pool.acquire().await.unwrap(),
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    let id = send_json(&db.pool, "strict", serde_json::json!({})).await;
    let worker = RunningWorker::start(&db.pool, worker_config(1.0));
    wait_status(&db.pool, id, "delivered", Duration::from_secs(10)).await;
    worker.stop().await;
    let log = attempts(&db.pool, id).await;
    assert_eq!(log.len(), 2);
    assert_eq!(log[0].1, Some(200));
    assert!(!log[0].2);
    assert!(log[0].3.as_deref().unwrap().contains("required"), "{log:?}");
    assert!(log[1].2);
}

#[tokio::test]
async fn a_hanging_partner_does_not_slow_the_others() {
    let db = fresh_db().await;
    let slow = Receiver::start(vec![], Answer::status(200).delay(Duration::from_secs(2))).await;
    let fast = Receiver::start(vec![], Answer::status(200)).await;
    endpoint(&db.pool, "slow", &slow.url(), SECRET, None).await;
    endpoint(&db.pool, "fast", &fast.url(), SECRET, None).await;
    for i in 0..12 {
        send_json(&db.pool, "slow", serde_json::json!({ "i": i })).await;
    }
    let mut fast_ids = Vec::new();
    for i in 0..5 {
        fast_ids.push(send_json(&db.pool, "fast", serde_json::json!({ "i": i })).await);
    }
    let mut cfg = worker_config(1.0);
    cfg.max_in_flight = 8;
    let started = std::time::Instant::now();
    let worker = RunningWorker::start(&db.pool, cfg);
    for id in &fast_ids {
        wait_status(&db.pool, *id, "delivered", Duration::from_secs(10)).await;
    }
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "fast partner waited behind the slow one: {:?}",
        started.elapsed()
    );
    // The slow partner holds at most its own 4 slots (the endpoint default).
    assert!(slow.max_in_flight() <= 4, "{}", slow.max_in_flight());
    worker.stop().await;
}

#[tokio::test]
async fn failures_in_a_row_open_the_endpoint_circuit_and_a_success_closes_it() {
    let db = fresh_db().await;
    let rx = Receiver::start(vec![Answer::status(502); 5], Answer::status(200)).await;
    endpoint(
        &db.pool,
        "flaky",
        &rx.url(),
        SECRET,
        Some("1ms, 1ms, 1ms, 1ms, 1ms, 1ms"),
    )
    .await;
    let id = send_json(&db.pool, "flaky", serde_json::json!({})).await;
    let mut cfg = worker_config(1.0);
    cfg.breaker_threshold = 5;
    cfg.breaker_cooldown = Duration::from_millis(800);
    let worker = RunningWorker::start(&db.pool, cfg);
    eventually(Duration::from_secs(10), "circuit open after five failures", || async {
        sqlx::query_scalar::<_, bool>(
            "SELECT coalesce(circuit_open_until > now(), false) FROM notify.endpoints WHERE id = 'flaky'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap()
    })
    .await;
    assert_eq!(rx.seen_for(id).len(), 5);
    wait_status(&db.pool, id, "delivered", Duration::from_secs(10)).await;
    let seen = rx.seen_for(id);
    // Although the schedule asked for 1 ms, the open circuit held the sixth attempt back.
    assert!(seen[5].at - seen[4].at >= Duration::from_millis(700));
    let (failures, closed): (i32, bool) = sqlx::query_as(
        "SELECT consecutive_failures, circuit_open_until IS NULL FROM notify.endpoints WHERE id = 'flaky'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((failures, closed), (0, true));
    worker.stop().await;
}

#[tokio::test]
async fn an_unreachable_endpoint_records_the_connection_error() {
    let db = fresh_db().await;
    // A port nobody listens on: bind, note it, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    endpoint(
        &db.pool,
        "gone",
        &format!("http://127.0.0.1:{port}/hook"),
        SECRET,
        Some("1s"),
    )
    .await;
    let id = send_json(&db.pool, "gone", serde_json::json!({})).await;
    let worker = RunningWorker::start(&db.pool, worker_config(1.0));
    eventually(
        Duration::from_secs(10),
        "first attempt recorded",
        || async { !attempts(&db.pool, id).await.is_empty() },
    )
    .await;
    worker.stop().await;
    let log = attempts(&db.pool, id).await;
    assert_eq!(log[0].1, None);
    assert!(
        log[0]
            .3
            .as_deref()
            .unwrap()
            .starts_with("connection failed"),
        "{log:?}"
    );
}

#[tokio::test]
async fn two_notifiers_share_the_work_without_sending_anything_twice() {
    let db = fresh_db().await;
    let rx = Receiver::start(vec![], Answer::status(200).delay(Duration::from_millis(20))).await;
    let mut spec = EndpointSpec::new("partner", rx.url(), SECRET);
    spec.max_in_flight = 3;
    spec.upsert(&mut db.pool.acquire().await.unwrap(), Duration::ZERO)
        .await
        .unwrap();
    let mut ids = Vec::new();
    for i in 0..60 {
        ids.push(send_json(&db.pool, "partner", serde_json::json!({ "i": i })).await);
    }
    let a = RunningWorker::start(&db.pool, worker_config(1.0));
    let b = RunningWorker::start(&db.pool, worker_config(1.0));
    eventually(Duration::from_secs(20), "all 60 delivered", || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM notify.notifications WHERE status = 'delivered'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap()
            == 60
    })
    .await;
    a.stop().await;
    b.stop().await;
    for id in ids {
        assert_eq!(rx.seen_for(id).len(), 1, "notification {id} sent once");
    }
    // The endpoint's limit holds over both notifiers together.
    assert!(rx.max_in_flight() <= 3, "{}", rx.max_in_flight());
}

#[tokio::test]
async fn a_delayed_notification_waits_in_the_database_until_due() {
    let db = fresh_db().await;
    let rx = Receiver::start(vec![], Answer::status(200)).await;
    endpoint(&db.pool, "partner", &rx.url(), SECRET, None).await;
    let worker = RunningWorker::start(&db.pool, worker_config(1.0));
    let sent = std::time::Instant::now();
    let mut tx = db.pool.begin().await.unwrap();
    let n = notifier::NewNotification::json("partner", "order.reminder", &serde_json::json!({}))
        .unwrap()
        .with_delay(Duration::from_millis(800));
    let id = notifier::send(&mut tx, &n).await.unwrap();
    tx.commit().await.unwrap();
    wait_status(&db.pool, id, "delivered", Duration::from_secs(10)).await;
    worker.stop().await;
    let seen = rx.seen_for(id);
    assert_eq!(seen.len(), 1);
    assert!(seen[0].at - sent >= Duration::from_millis(790));
}
