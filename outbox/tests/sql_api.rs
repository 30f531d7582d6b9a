//! The SQL API contract (DESIGN.md section 3) and its answers to bad input: a clear error that
//! names the field, and nothing stored.

use integration_tests::{TestDb, fresh_db};
use outbox::{Error, Message, Outbox};

async fn count(db: &TestDb) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox.messages")
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

async fn sql_error(db: &TestDb, sql: &'static str) -> String {
    let err = sqlx::query(sql).execute(&db.pool).await.unwrap_err();
    err.as_database_error()
        .expect("a database error")
        .message()
        .to_owned()
}

#[tokio::test]
async fn enqueue_accepts_named_and_positional_arguments() {
    let db = fresh_db().await;
    let named: i64 = sqlx::query_scalar(
        "SELECT outbox.enqueue(exchange => 'orders', routing_key => 'order.created', \
             payload => convert_to('{}', 'UTF8'), headers => '{\"v\": 1}', \
             ordering_key => 'o-1', deliver_at => now() + interval '1 hour', dedupe_key => 'd-1')",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let positional: i64 = sqlx::query_scalar("SELECT outbox.enqueue('orders', 'k', 'body')")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(named > 0 && positional > named);
    let (headers, key, delayed): (serde_json::Value, Option<String>, bool) = sqlx::query_as(
        "SELECT headers, ordering_key, available_at > now() + interval '59 minutes' \
         FROM outbox.messages WHERE id = $1",
    )
    .bind(named)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(headers, serde_json::json!({"v": 1}));
    assert_eq!(key.as_deref(), Some("o-1"));
    assert!(delayed);
}

#[tokio::test]
async fn same_dedupe_key_stores_one_message_and_cancel_removes_it() {
    let db = fresh_db().await;
    let (a, b): (i64, i64) = sqlx::query_as(
        "SELECT outbox.enqueue('', 'q', 'x', dedupe_key => 'pay-timeout:1'), \
                outbox.enqueue('', 'q', 'y', dedupe_key => 'pay-timeout:1')",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(a, b);
    assert_eq!(count(&db).await, 1);
    let (first, second): (bool, bool) =
        sqlx::query_as("SELECT outbox.cancel('pay-timeout:1'), outbox.cancel('pay-timeout:1')")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(first && !second);
    assert_eq!(count(&db).await, 0);
}

#[tokio::test]
async fn bad_sql_input_names_the_field_and_stores_nothing() {
    let db = fresh_db().await;
    let cases: [(&'static str, &str); 10] = [
        (
            "SELECT outbox.enqueue(NULL, 'q', 'x')",
            "exchange must not be NULL",
        ),
        (
            "SELECT outbox.enqueue('', NULL, 'x')",
            "routing_key must not be NULL",
        ),
        (
            "SELECT outbox.enqueue('', '', 'x')",
            "routing_key must name a queue",
        ),
        (
            "SELECT outbox.enqueue('', 'q', NULL)",
            "payload must not be NULL",
        ),
        (
            "SELECT outbox.enqueue('', 'q', convert_to(repeat('x', 10 * 1024 * 1024), 'UTF8'))",
            "payload is 10485760 bytes",
        ),
        (
            "SELECT outbox.enqueue('', 'q', 'x', headers => '[1,2]')",
            "headers must be a JSON object",
        ),
        (
            "SELECT outbox.enqueue('', 'q', 'x', ordering_key => '')",
            "ordering_key must be",
        ),
        (
            "SELECT outbox.enqueue('', 'q', 'x', dedupe_key => '')",
            "dedupe_key must be",
        ),
        (
            "SELECT outbox.enqueue(repeat('e', 256), 'q', 'x')",
            "exchange is 256 bytes",
        ),
        (
            "SELECT outbox.enqueue('', 'q', 'x', deliver_at => 'infinity')",
            "deliver_at must be",
        ),
    ];
    for (sql, expected) in cases {
        let message = sql_error(&db, sql).await;
        assert!(message.contains(expected), "{sql}: got `{message}`");
    }
    let message = sql_error(&db, "SELECT outbox.cancel(NULL)").await;
    assert!(message.contains("dedupe_key must not be NULL"), "{message}");
    assert_eq!(count(&db).await, 0);
}

#[tokio::test]
async fn bad_rust_input_is_an_invalid_error_and_rolls_back_nothing_else() {
    let db = fresh_db().await;
    let outbox = Outbox::new(db.pool.clone()).await.unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    let big = Message::new("", "q", vec![0u8; 5 * 1024 * 1024]);
    match outbox.enqueue(&mut tx, &big).await {
        Err(Error::Invalid(msg)) => assert!(msg.contains("payload is"), "{msg}"),
        other => panic!("expected Invalid, got {other:?}"),
    }
    tx.rollback().await.unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    match outbox
        .enqueue(&mut tx, &Message::new("", "q", "x").with_ordering_key(""))
        .await
    {
        Err(Error::Invalid(msg)) => assert!(msg.contains("ordering_key"), "{msg}"),
        other => panic!("expected Invalid, got {other:?}"),
    }
    tx.rollback().await.unwrap();
    assert_eq!(count(&db).await, 0);
}
