//! Producing notifications inside the caller's transaction, from Rust and from SQL: atomic
//! with the transaction, deduplicated by key, and bad input refused with the field named and
//! nothing written.

mod common;

use std::time::Duration;

use common::*;
use integration_tests::fresh_db;
use notifier::{EndpointSpec, Error, NewNotification};

async fn count(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM notify.notifications")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_notification_exists_only_if_its_transaction_commits() {
    let db = fresh_db().await;
    let rx = Receiver::start(vec![], Answer::status(200)).await;
    endpoint(&db.pool, "partner", &rx.url(), SECRET, None).await;

    let mut tx = db.pool.begin().await.unwrap();
    let n = NewNotification::json(
        "partner",
        "order.paid",
        &serde_json::json!({"rolled": "back"}),
    )
    .unwrap();
    notifier::send(&mut tx, &n).await.unwrap();
    tx.rollback().await.unwrap();

    // SQL API with named arguments, committed.
    let mut tx = db.pool.begin().await.unwrap();
    let id: i64 = sqlx::query_scalar(
        "SELECT notify.send(endpoint => 'partner', event_type => 'order.shipped', \
             body => '{\"order\": 1}'::jsonb, dedupe_key => 'ship-1')",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(count(&db.pool).await, 1);

    let worker = RunningWorker::start(&db.pool, worker_config(1.0));
    wait_status(&db.pool, id, "delivered", Duration::from_secs(10)).await;
    worker.stop().await;
    let seen = rx.seen();
    assert_eq!(seen.len(), 1, "the rolled-back notification never went out");
    assert_eq!(seen[0].header("webhook-event"), "order.shipped");
}

#[tokio::test]
async fn a_dedupe_key_names_one_notification_per_endpoint() {
    let db = fresh_db().await;
    endpoint(&db.pool, "a", "http://127.0.0.1:9/a", SECRET, None).await;
    endpoint(&db.pool, "b", "http://127.0.0.1:9/b", SECRET, None).await;
    let mut conn = db.pool.acquire().await.unwrap();
    let n = |ep: &str| {
        NewNotification::json(ep, "order.paid", &serde_json::json!({"order": 1}))
            .unwrap()
            .with_dedupe_key("paid:1")
    };
    let first = notifier::send(&mut conn, &n("a")).await.unwrap();
    let again = notifier::send(&mut conn, &n("a")).await.unwrap();
    let other = notifier::send(&mut conn, &n("b")).await.unwrap();
    let sql_again: i64 =
        sqlx::query_scalar("SELECT notify.send('a', 'order.paid', '{}', 'paid:1')")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    assert_eq!((again, sql_again), (first, first));
    assert_ne!(other, first);
    assert_eq!(count(&db.pool).await, 2);

    // Raw bytes with their own content type.
    let raw: i64 = sqlx::query_scalar(
        "SELECT notify.send_bytes('a', 'report.ready', 'a,b\n1,2'::bytea, 'text/csv')",
    )
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    let ctype: String =
        sqlx::query_scalar("SELECT content_type FROM notify.notifications WHERE id = $1")
            .bind(raw)
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    assert_eq!(ctype, "text/csv");
}

#[tokio::test]
async fn bad_input_is_refused_naming_the_field_and_changes_nothing() {
    let db = fresh_db().await;
    endpoint(&db.pool, "partner", "http://127.0.0.1:9/hook", SECRET, None).await;
    let mut conn = db.pool.acquire().await.unwrap();
    let ok = || NewNotification::json("partner", "order.paid", &serde_json::json!({})).unwrap();

    let cases: Vec<(NewNotification, &str)> = vec![
        (
            NewNotification::json("nobody", "order.paid", &serde_json::json!({})).unwrap(),
            "endpoint",
        ),
        (
            NewNotification {
                event_type: "order paid!".into(),
                ..ok()
            },
            "event_type",
        ),
        (
            NewNotification {
                event_type: String::new(),
                ..ok()
            },
            "event_type",
        ),
        (
            NewNotification {
                body: vec![b'x'; 1024 * 1024 + 1],
                ..ok()
            },
            "body",
        ),
        (
            NewNotification {
                content_type: "text/plain\r\nX-Evil: 1".into(),
                ..ok()
            },
            "content_type",
        ),
        (ok().with_dedupe_key(""), "dedupe_key"),
        (ok().with_dedupe_key("k".repeat(256)), "dedupe_key"),
    ];
    for (n, field) in cases {
        match notifier::send(&mut conn, &n).await {
            Err(Error::Invalid { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: expected Invalid, got {other:?}"),
        }
    }

    // The SQL API refuses the same things with a message naming the argument.
    for (sql, needle) in [
        (
            "SELECT notify.send('nobody', 'order.paid', '{}')",
            "endpoint",
        ),
        (
            "SELECT notify.send('partner', 'bad type', '{}')",
            "event_type",
        ),
        ("SELECT notify.send('partner', 'order.paid', NULL)", "body"),
        (
            "SELECT notify.send('partner', 'order.paid', '{}', '')",
            "dedupe_key",
        ),
        (
            "SELECT notify.send_bytes('partner', 'x', convert_to(repeat('x', 1048577), 'UTF8'))",
            "body",
        ),
        (
            "SELECT notify.send('partner', 'order.paid', '{}', deliver_at => 'infinity')",
            "deliver_at",
        ),
    ] {
        let err = sqlx::query(sql).execute(&mut *conn).await.unwrap_err();
        let msg = err.as_database_error().expect(sql).message().to_owned();
        assert!(
            msg.starts_with(&format!("notify.send: {needle}")),
            "{sql}: {msg}"
        );
    }
    assert_eq!(count(&db.pool).await, 0, "nothing was stored");

    // Endpoints: validated before anything is written.
    for (spec, field) in [
        (EndpointSpec::new("bad id!", "http://x/", SECRET), "id"),
        (EndpointSpec::new("e", "ftp://x/", SECRET), "url"),
        (EndpointSpec::new("e", "not a url", SECRET), "url"),
        (EndpointSpec::new("e", "http://x/", "short"), "secret"),
    ] {
        match spec.upsert(&mut conn, Duration::ZERO).await {
            Err(Error::Invalid { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: expected Invalid, got {other:?}"),
        }
    }
    let endpoints: i64 = sqlx::query_scalar("SELECT count(*) FROM notify.endpoints")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(endpoints, 1);
}
