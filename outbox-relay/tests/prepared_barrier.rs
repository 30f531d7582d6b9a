//! The producer-side barrier and its check handler, against a real PostgreSQL.

mod prepared_support;

use std::time::Duration;

use axum::Router;
use integration_tests::fresh_db;
use outbox::MessageId;
use outbox::barrier::{self, CheckAnswer};
use outbox::prepared::{Decision, PreparedError};
use prepared_support::Server;

/// Waits until some session of this database waits on a lock (the check on the barrier key).
async fn lock_waiter(pool: &sqlx::PgPool) {
    integration_tests::eventually(
        Duration::from_secs(10),
        "the check to wait on the key",
        || async {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(pool)
            .await
            .unwrap()
                > 0
        },
    )
    .await;
}

#[tokio::test]
async fn check_waits_for_an_open_business_transaction_and_answers_its_outcome() {
    let db = fresh_db().await;
    let id = MessageId(1001);
    let mut tx = db.pool.begin().await.unwrap();
    barrier::record_commit(&mut tx, id).await.unwrap();
    barrier::record_commit(&mut tx, id).await.unwrap(); // idempotent

    // Still open: after a bounded wait the answer is "pending", and nothing is recorded.
    let answer = barrier::check(&db.pool, id, Duration::from_millis(200))
        .await
        .unwrap();
    assert_eq!(answer, CheckAnswer::Pending);

    // A check waiting on the key gets the outcome as soon as the transaction commits.
    let pool = db.pool.clone();
    let waiting =
        tokio::spawn(async move { barrier::check(&pool, id, Duration::from_secs(10)).await });
    lock_waiter(&db.pool).await;
    tx.commit().await.unwrap();
    assert_eq!(
        waiting.await.unwrap().unwrap(),
        CheckAnswer::Decided(Decision::Committed)
    );
}

#[tokio::test]
async fn check_waiting_on_a_business_transaction_that_rolls_back_records_rolled_back() {
    let db = fresh_db().await;
    let id = MessageId(1002);
    let mut tx = db.pool.begin().await.unwrap();
    barrier::record_commit(&mut tx, id).await.unwrap();
    let pool = db.pool.clone();
    let waiting =
        tokio::spawn(async move { barrier::check(&pool, id, Duration::from_secs(10)).await });
    lock_waiter(&db.pool).await;
    tx.rollback().await.unwrap();
    assert_eq!(
        waiting.await.unwrap().unwrap(),
        CheckAnswer::Decided(Decision::RolledBack)
    );
    // From now on the business side can no longer commit this message.
    let mut late = db.pool.begin().await.unwrap();
    assert!(matches!(
        barrier::record_commit(&mut late, id).await,
        Err(PreparedError::Conflict {
            decided: Decision::RolledBack,
            ..
        })
    ));
}

#[tokio::test]
async fn check_handler_answers_the_protocol_and_refuses_bad_ids() {
    let db = fresh_db().await;
    let server = Server::start(
        Router::new().route("/outbox/check", barrier::check_handler(db.pool.clone())),
    )
    .await;
    let mut tx = db.pool.begin().await.unwrap();
    barrier::record_commit(&mut tx, MessageId(7)).await.unwrap();
    tx.commit().await.unwrap();

    let http = reqwest::Client::new();
    let get = |q: &str| http.get(server.url(&format!("/outbox/check{q}"))).send();

    let resp = get("?message_id=7").await.unwrap();
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body, serde_json::json!({"status": "committed"}));

    let resp = get("?message_id=8").await.unwrap();
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body, serde_json::json!({"status": "rolled_back"}));
    assert_eq!(
        barrier::recorded(&db.pool, MessageId(8)).await.unwrap(),
        Some(Decision::RolledBack),
        "the negative answer is recorded before it is given"
    );

    for bad in ["", "?message_id=", "?message_id=abc", "?id=7"] {
        let resp = get(bad).await.unwrap();
        assert_eq!(resp.status(), 400, "{bad}");
        assert_eq!(
            resp.headers()["content-type"],
            "application/problem+json",
            "{bad}"
        );
    }
}

#[tokio::test]
async fn install_creates_the_barrier_table_in_a_bare_database() {
    let db = fresh_db().await;
    sqlx::raw_sql("DROP SCHEMA outbox CASCADE")
        .execute(&db.pool)
        .await
        .unwrap();
    barrier::install(&db.pool).await.unwrap();
    barrier::install(&db.pool).await.unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    barrier::record_commit(&mut tx, MessageId(1)).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        barrier::prune(&db.pool, Duration::from_secs(3600))
            .await
            .unwrap(),
        0
    );
    assert_eq!(barrier::prune(&db.pool, Duration::ZERO).await.unwrap(), 1);
}
