//! The stored trace context without span export (no OpenTelemetry layer in this process): a
//! webhook still continues the trace the notification was created in, under a fresh parent id
//! per attempt; a notification without one gets no `traceparent`; a malformed one given to the
//! SQL or Rust API is refused with the field named and nothing written.

mod common;

use std::time::Duration;

use common::*;
use integration_tests::fresh_db;
use notifier::{Error, NewNotification};

const TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
const PARENT: &str = "b7ad6b7169203331";

async fn count(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM notify.notifications")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_attempt_carries_the_stored_trace_under_a_new_parent() {
    let db = fresh_db().await;
    // Two failures then success: three attempts, three parent ids.
    let rx = Receiver::start(
        vec![Answer::status(500), Answer::status(503)],
        Answer::status(200),
    )
    .await;
    endpoint(&db.pool, "partner", &rx.url(), SECRET, None).await;
    let traceparent = format!("00-{TRACE_ID}-{PARENT}-01");
    let mut tx = db.pool.begin().await.unwrap();
    let id = notifier::send(
        &mut tx,
        &NewNotification::json("partner", "order.paid", &serde_json::json!({"n": 1}))
            .unwrap()
            .with_trace_context(&traceparent, Some("congo=t61rcWkgMzE".to_owned())),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let stored: (Option<String>, Option<String>) =
        sqlx::query_as("SELECT traceparent, tracestate FROM notify.notifications WHERE id = $1")
            .bind(id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        stored,
        (
            Some(traceparent.clone()),
            Some("congo=t61rcWkgMzE".to_owned())
        )
    );

    let worker = RunningWorker::start(&db.pool, worker_config(0.001));
    wait_status(&db.pool, id, "delivered", Duration::from_secs(20)).await;
    worker.stop().await;

    let seen = rx.seen_for(id);
    assert_eq!(seen.len(), 3);
    let mut parents = Vec::new();
    for s in &seen {
        let tp = s.header("traceparent");
        assert!(notifier::valid_traceparent(&tp), "{tp:?}");
        let parts: Vec<&str> = tp.split('-').collect();
        assert_eq!(parts[1], TRACE_ID, "{tp}");
        assert_eq!(parts[3], "01", "the sampled flag is kept: {tp}");
        assert_ne!(parts[2], PARENT, "{tp}");
        assert_eq!(s.header("tracestate"), "congo=t61rcWkgMzE");
        parents.push(parts[2].to_owned());
    }
    parents.sort();
    parents.dedup();
    assert_eq!(parents.len(), 3, "one parent id per attempt: {parents:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_without_a_trace_context_sends_no_traceparent() {
    let db = fresh_db().await;
    let rx = Receiver::start(vec![], Answer::status(200)).await;
    endpoint(&db.pool, "partner", &rx.url(), SECRET, None).await;
    let from_rust = send_json(&db.pool, "partner", serde_json::json!({"n": 1})).await;
    let from_sql: i64 = sqlx::query_scalar("SELECT notify.send('partner', 'order.paid', '{}')")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let worker = RunningWorker::start(&db.pool, worker_config(0.001));
    for id in [from_rust, from_sql] {
        wait_status(&db.pool, id, "delivered", Duration::from_secs(10)).await;
    }
    worker.stop().await;
    for id in [from_rust, from_sql] {
        let s = &rx.seen_for(id)[0];
        assert!(s.headers.get("traceparent").is_none(), "{:?}", s.headers);
        assert!(s.headers.get("tracestate").is_none(), "{:?}", s.headers);
    }
}

#[tokio::test]
async fn a_malformed_trace_context_is_refused_with_the_field_named() {
    let db = fresh_db().await;
    let rx = Receiver::start(vec![], Answer::status(200)).await;
    endpoint(&db.pool, "partner", &rx.url(), SECRET, None).await;
    let bad = [
        "not-a-traceparent",
        "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01", // upper case
        "00-00000000000000000000000000000000-b7ad6b7169203331-01", // zero trace id
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01", // zero parent id
        "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-x",
    ];
    for tp in bad {
        let err = sqlx::query_scalar::<_, i64>(
            "SELECT notify.send('partner', 'order.paid', '{}', traceparent => $1)",
        )
        .bind(tp)
        .fetch_one(&db.pool)
        .await
        .unwrap_err();
        let msg = err.as_database_error().unwrap().message().to_owned();
        assert!(msg.starts_with("notify.send: traceparent"), "{tp}: {msg}");

        let mut conn = db.pool.acquire().await.unwrap();
        let n = NewNotification::json("partner", "order.paid", &serde_json::json!({}))
            .unwrap()
            .with_trace_context(tp, None);
        match notifier::send(&mut conn, &n).await {
            Err(Error::Invalid { field, .. }) => assert_eq!(field, "traceparent", "{tp}"),
            other => panic!("{tp}: {other:?}"),
        }
    }
    let err = sqlx::query_scalar::<_, i64>(
        "SELECT notify.send('partner', 'order.paid', '{}', tracestate => 'a=b')",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap_err();
    let msg = err.as_database_error().unwrap().message().to_owned();
    assert!(msg.starts_with("notify.send: tracestate"), "{msg}");
    assert_eq!(count(&db.pool).await, 0, "nothing written");
}

#[tokio::test]
async fn existing_calls_of_the_sql_api_keep_working() {
    let db = fresh_db().await;
    let rx = Receiver::start(vec![], Answer::status(200)).await;
    endpoint(&db.pool, "partner", &rx.url(), SECRET, None).await;
    // Positional calls with every earlier arity, and a deduplicated send that keeps the first
    // notification's trace context.
    let tp = format!("00-{TRACE_ID}-{PARENT}-00");
    let first: i64 =
        sqlx::query_scalar("SELECT notify.send('partner', 'order.paid', '{}', 'k1', NULL, $1)")
            .bind(&tp)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let again: i64 = sqlx::query_scalar(
        "SELECT notify.send('partner', 'order.paid', '{}', 'k1', NULL, \
         '00-11111111111111111111111111111111-2222222222222222-01')",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(first, again);
    let kept: Option<String> =
        sqlx::query_scalar("SELECT traceparent FROM notify.notifications WHERE id = $1")
            .bind(first)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(kept.as_deref(), Some(tp.as_str()));
    for sql in [
        "SELECT notify.send('partner', 'a.b', '{}')",
        "SELECT notify.send('partner', 'a.b', '{}', 'k2')",
        "SELECT notify.send('partner', 'a.b', '{}', 'k3', now())",
        "SELECT notify.send_bytes('partner', 'a.b', 'x'::bytea)",
        "SELECT notify.send_bytes('partner', 'a.b', 'x'::bytea, 'text/plain', 'k4', now())",
    ] {
        sqlx::query_scalar::<_, i64>(sql)
            .fetch_one(&db.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    assert_eq!(count(&db.pool).await, 6);
}
