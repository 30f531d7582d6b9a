//! The inbox SQL API (`migrations/0007_sql_inbox.sql`) that consumers in other languages call:
//! claims are true once and released by a rollback, bad input is refused naming the parameter,
//! and consumer-lib and the SQL functions share one inbox and one compensation log.

mod common;

use std::time::Duration;

use common::*;
use consumer_lib::dead_letter;
use sqlx::PgPool;

const WAIT: Duration = Duration::from_secs(20);

async fn claim(pool: &PgPool, consumer: &str, id: i64) -> bool {
    sqlx::query_scalar("SELECT inbox.claim($1, $2)")
        .bind(consumer)
        .bind(id)
        .fetch_one(pool)
        .await
        .expect("inbox.claim")
}

async fn count(pool: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.expect(sql)
}

#[tokio::test]
async fn claim_is_true_once_then_false_for_every_duplicate() {
    let db = integration_tests::fresh_db().await;
    let mut tx = db.pool.begin().await.unwrap();
    let first: bool = sqlx::query_scalar("SELECT inbox.claim('billing', 42)")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    // A copy delivered again within the same transaction is a duplicate too.
    let again: bool =
        sqlx::query_scalar("SELECT inbox.claim(consumer => 'billing', message_id => 42)")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
    tx.commit().await.unwrap();
    assert!(first, "the first claim wins");
    assert!(
        !again,
        "the second claim in the same transaction is a duplicate"
    );
    assert!(!claim(&db.pool, "billing", 42).await, "a later redelivery");
    assert!(
        claim(&db.pool, "shipping", 42).await,
        "another consumer name has its own inbox"
    );
    assert!(claim(&db.pool, "billing", 43).await, "another message id");
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM inbox.processed").await,
        3
    );
}

#[tokio::test]
async fn rolled_back_claim_is_released_for_the_redelivery() {
    let db = integration_tests::fresh_db().await;
    let mut tx = db.pool.begin().await.unwrap();
    let claimed: bool = sqlx::query_scalar("SELECT inbox.claim('billing', 7)")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert!(claimed);
    // The effect failed: the caller rolls back, and with it the claim.
    tx.rollback().await.unwrap();
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM inbox.processed").await,
        0
    );
    assert!(
        claim(&db.pool, "billing", 7).await,
        "the redelivered message claims again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claims_of_one_id_wait_and_exactly_one_wins() {
    let db = integration_tests::fresh_db().await;
    for (first_commits, expected_second) in [(true, false), (false, true)] {
        let id = if first_commits { 1 } else { 2 };
        let mut first = db.pool.begin().await.unwrap();
        let won: bool = sqlx::query_scalar("SELECT inbox.claim('billing', $1)")
            .bind(id)
            .fetch_one(&mut *first)
            .await
            .unwrap();
        assert!(won);
        let pool = db.pool.clone();
        let second = tokio::spawn(async move {
            let mut tx = pool.begin().await.unwrap();
            let got: bool = sqlx::query_scalar("SELECT inbox.claim('billing', $1)")
                .bind(id)
                .fetch_one(&mut *tx)
                .await
                .unwrap();
            tx.commit().await.unwrap();
            got
        });
        // The second claim must be blocked on the first one's key, not answered early.
        wait_until("the second claim to wait on a lock", WAIT, || async {
            count(
                &db.pool,
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock' \
                   AND query LIKE '%inbox.claim%'",
            )
            .await
                == 1
        })
        .await;
        assert!(!second.is_finished());
        if first_commits {
            first.commit().await.unwrap();
        } else {
            first.rollback().await.unwrap();
        }
        let got = tokio::time::timeout(WAIT, second)
            .await
            .expect("second claim returns once the first ends")
            .unwrap();
        assert_eq!(
            got, expected_second,
            "first transaction committed: {first_commits}"
        );
    }
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM inbox.processed").await,
        2
    );
}

#[tokio::test]
async fn bad_input_raises_an_error_naming_the_parameter_and_changes_nothing() {
    let db = integration_tests::fresh_db().await;
    const NULL: &str = "22004";
    const INVALID: &str = "22023";
    // (call, text the message must contain, SQLSTATE)
    let long = "x".repeat(256);
    let dead = |args: &str| format!("SELECT inbox.dead_letter({args})::text",);
    let ok_dead = "'c', 'q', 5, '', 'q', 'x'::bytea, 'rejected', 'boom'";
    let cases: Vec<(String, &str, &str)> = vec![
        (
            "SELECT inbox.claim(NULL, 1)::text".into(),
            "inbox.claim: consumer must not be NULL",
            NULL,
        ),
        (
            "SELECT inbox.claim('', 1)::text".into(),
            "inbox.claim: consumer must be 1 to 255 bytes",
            INVALID,
        ),
        (
            format!("SELECT inbox.claim('{long}', 1)::text"),
            "inbox.claim: consumer must be 1 to 255 bytes, got 256",
            INVALID,
        ),
        (
            "SELECT inbox.claim('c', NULL)::text".into(),
            "inbox.claim: message_id must not be NULL",
            NULL,
        ),
        (
            "SELECT inbox.claim('c', 0)::text".into(),
            "inbox.claim: message_id must be a positive message id, got 0",
            INVALID,
        ),
        (
            "SELECT inbox.claim('c', -1)::text".into(),
            "inbox.claim: message_id must be a positive message id, got -1",
            INVALID,
        ),
        (
            dead("NULL, 'q', 5, '', 'q', 'x'::bytea, 'rejected', 'boom'"),
            "inbox.dead_letter: consumer must not be NULL",
            NULL,
        ),
        (
            dead("'c', '', 5, '', 'q', 'x'::bytea, 'rejected', 'boom'"),
            "inbox.dead_letter: queue must be 1 to 255 bytes",
            INVALID,
        ),
        (
            dead("'c', 'q', NULL, '', 'q', 'x'::bytea, 'rejected', 'boom'"),
            "inbox.dead_letter: message_id must not be NULL",
            NULL,
        ),
        (
            dead("'c', 'q', -5, '', 'q', 'x'::bytea, 'rejected', 'boom'"),
            "inbox.dead_letter: message_id must be a positive message id, got -5",
            INVALID,
        ),
        (
            dead("'c', 'q', 5, NULL, 'q', 'x'::bytea, 'rejected', 'boom'"),
            "inbox.dead_letter: exchange must not be NULL",
            NULL,
        ),
        (
            dead(&format!(
                "'c', 'q', 5, '{long}', 'q', 'x'::bytea, 'rejected', 'boom'"
            )),
            "inbox.dead_letter: exchange is 256 bytes",
            INVALID,
        ),
        (
            dead("'c', 'q', 5, '', NULL, 'x'::bytea, 'rejected', 'boom'"),
            "inbox.dead_letter: routing_key must not be NULL",
            NULL,
        ),
        (
            dead("'c', 'q', 5, '', 'q', NULL, 'rejected', 'boom'"),
            "inbox.dead_letter: payload must not be NULL",
            NULL,
        ),
        (
            dead("'c', 'q', 5, '', 'q', 'x'::bytea, NULL, 'boom'"),
            "inbox.dead_letter: reason must not be NULL",
            NULL,
        ),
        (
            dead("'c', 'q', 5, '', 'q', 'x'::bytea, 'lost', 'boom'"),
            "inbox.dead_letter: reason must be rejected, exhausted, undecodable or invalid, got 'lost'",
            INVALID,
        ),
        (
            dead("'c', 'q', 5, '', 'q', 'x'::bytea, 'rejected', NULL"),
            "inbox.dead_letter: last_error must not be NULL",
            NULL,
        ),
        (
            dead(&format!("{ok_dead}, headers => '[1, 2]'")),
            "inbox.dead_letter: headers must be a JSON object, got array",
            INVALID,
        ),
        (
            dead(&format!("{ok_dead}, content_type => ''")),
            "inbox.dead_letter: content_type must be 1 to 255 bytes",
            INVALID,
        ),
        (
            dead(&format!("{ok_dead}, ordering_key => ''")),
            "inbox.dead_letter: ordering_key must be 1 to 255 bytes",
            INVALID,
        ),
        (
            dead(&format!("{ok_dead}, attempts => -1")),
            "inbox.dead_letter: attempts must be 0 or more, got -1",
            INVALID,
        ),
        (
            "SELECT inbox.purge(NULL, interval '1 day')::text".into(),
            "inbox.purge: consumer must not be NULL",
            NULL,
        ),
        (
            "SELECT inbox.purge('c', NULL)::text".into(),
            "inbox.purge: older_than must not be NULL",
            NULL,
        ),
        (
            "SELECT inbox.purge('c', interval '-1 day')::text".into(),
            "inbox.purge: older_than must be 0 or more",
            INVALID,
        ),
        (
            "SELECT inbox.purge('c', interval '1 day', 0)::text".into(),
            "inbox.purge: max_rows must be 1 or more, got 0",
            INVALID,
        ),
    ];
    for (sql, expected, sqlstate) in &cases {
        // Inside a transaction that already claimed something: the error aborts it, so that
        // claim goes too, and nothing of the bad call was written before it raised.
        let mut tx = db.pool.begin().await.unwrap();
        sqlx::query("SELECT inbox.claim('c', 999)")
            .execute(&mut *tx)
            .await
            .unwrap();
        let err = sqlx::query_scalar::<_, Option<String>>(sqlx::AssertSqlSafe(sql.clone()))
            .fetch_one(&mut *tx)
            .await
            .expect_err(sql);
        tx.rollback().await.unwrap();
        let db_err = err
            .as_database_error()
            .unwrap_or_else(|| panic!("{sql}: not a database error: {err}"));
        assert!(
            db_err.message().contains(expected),
            "{sql}: message {:?} does not contain {expected:?}",
            db_err.message()
        );
        assert_eq!(db_err.code().as_deref(), Some(*sqlstate), "{sql}");
    }
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM inbox.processed").await,
        0,
        "no claim survived"
    );
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM inbox.compensation_log").await,
        0,
        "no dead letter was written"
    );
    // The same arguments, corrected, are accepted: the cases failed for the named reason only.
    assert!(claim(&db.pool, "c", 1).await);
    let recorded: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT inbox.dead_letter({ok_dead})"
    )))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(recorded);
    let id_less: bool = sqlx::query_scalar(
        "SELECT inbox.dead_letter('c', 'q', NULL, '', 'q', 'x'::bytea, 'invalid', 'no message_id')",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(
        id_less,
        "a message without an id is logged with reason invalid"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn consumer_lib_and_the_sql_claim_share_one_inbox() {
    let (db, publisher, queue, exchange) = setup().await;
    // Another instance of this consumer, written in another language, applied 42 already.
    assert!(claim(&db.pool, &queue, 42).await);
    let consumer = builder(&db.pool, &queue, &exchange)
        .handler(Recorder { jitter_ms: 0 })
        .build()
        .expect("valid consumer");
    let (token, task) = spawn(consumer);
    publish_ids(&publisher, &exchange, 42..=43).await;
    wait_until("message 43 to apply", WAIT, || async {
        effect_count(&db.pool, 43).await == 1
    })
    .await;
    wait_until("every delivery to be acked", WAIT, || async {
        publisher.ready(&queue).await == 0
    })
    .await;
    stop(token, task).await;
    assert_eq!(publisher.ready(&queue).await, 0, "42 was acked as well");
    assert_eq!(
        effect_count(&db.pool, 42).await,
        0,
        "consumer-lib skipped the message the SQL claim had taken"
    );
    // And the other way round: the SQL function sees consumer-lib's row as a duplicate.
    assert!(
        !claim(&db.pool, &queue, 43).await,
        "the SQL claim sees consumer-lib's row"
    );
    assert!(
        consumer_lib::inbox::is_done(&db.pool, &queue, 42)
            .await
            .unwrap()
    );
    assert_no_dead_letters(&db.pool, &queue, "nothing failed").await;
    publisher.cleanup(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sql_dead_letter_is_listed_and_replayed_by_consumer_dead() {
    let (db, publisher, queue, exchange) = setup().await;
    let body = serde_json::to_vec(&payload("a", 77, "")).unwrap();
    let record = || async {
        sqlx::query_scalar::<_, bool>(
            "SELECT inbox.dead_letter(consumer => $1, queue => $1, message_id => 77, \
               exchange => $2, routing_key => 'order.created', payload => $3, \
               reason => 'exhausted', last_error => 'stock service timed out', \
               headers => '{\"tenant\": \"acme\"}', content_type => 'application/json', \
               attempts => 5)",
        )
        .bind(&queue)
        .bind(&exchange)
        .bind(&body)
        .fetch_one(&db.pool)
        .await
        .unwrap()
    };
    assert!(record().await, "recorded");
    assert!(
        !record().await,
        "a redelivery being dead-lettered again is logged once"
    );

    let rows = dead_letter::list(&db.pool, Some(&queue), false, 10)
        .await
        .unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    let row = &rows[0];
    assert_eq!(row.message_id, Some(77));
    assert_eq!(
        (row.reason.as_str(), row.attempts, row.last_error.as_str()),
        ("exhausted", 5, "stock service timed out")
    );
    assert_eq!(
        (row.exchange.as_str(), row.routing_key.as_str()),
        (exchange.as_str(), "order.created")
    );
    assert_eq!(row.headers["tenant"], "acme");
    assert_eq!(row.content_type.as_deref(), Some("application/json"));
    assert_eq!(row.payload, body);

    let listed = std::process::Command::new(env!("CARGO_BIN_EXE_consumer-dead"))
        .env("DATABASE_URL", &db.url)
        .args(["list", "--consumer", &queue, "--json"])
        .output()
        .expect("run consumer-dead");
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    assert!(
        text.contains("stock service timed out") && text.contains("77"),
        "{text}"
    );

    // The replay puts it back on the queue; the Rust consumer applies it once.
    let consumer = builder(&db.pool, &queue, &exchange)
        .handler(Recorder { jitter_ms: 0 })
        .build()
        .expect("valid consumer");
    let (token, task) = spawn(consumer);
    let replayed = std::process::Command::new(env!("CARGO_BIN_EXE_consumer-dead"))
        .env("DATABASE_URL", &db.url)
        .args(["replay", &row.id.to_string()])
        .output()
        .expect("run consumer-dead");
    assert!(
        replayed.status.success(),
        "replay: {}",
        String::from_utf8_lossy(&replayed.stderr)
    );
    wait_until("the replayed message to apply", WAIT, || async {
        effect_count(&db.pool, 77).await == 1
    })
    .await;
    stop(token, task).await;
    let after = dead_letter::get(&db.pool, row.id).await.unwrap().unwrap();
    assert!(after.replayed_at.is_some(), "marked replayed");
    assert!(
        !claim(&db.pool, &queue, 77).await,
        "the replay's application is in the shared inbox"
    );
    publisher.cleanup(&queue).await;
}

#[tokio::test]
async fn purge_deletes_one_consumers_old_rows_a_batch_per_call() {
    let db = integration_tests::fresh_db().await;
    sqlx::query(
        "INSERT INTO inbox.processed (consumer, message_id, processed_at) \
         SELECT 'c', g, now() - interval '2 days' FROM generate_series(1, 25) g \
         UNION ALL SELECT 'c', g, now() FROM generate_series(26, 30) g \
         UNION ALL SELECT 'other', g, now() - interval '2 days' FROM generate_series(1, 10) g",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let mut batches = Vec::new();
    loop {
        let deleted: i32 = sqlx::query_scalar("SELECT inbox.purge('c', interval '1 day', 10)")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        batches.push(deleted);
        if deleted < 10 {
            break;
        }
    }
    assert_eq!(batches, vec![10, 10, 5]);
    let left: Vec<(String, i64)> = sqlx::query_as(
        "SELECT consumer, count(*) FROM inbox.processed GROUP BY consumer ORDER BY consumer",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(left, vec![("c".to_owned(), 5), ("other".to_owned(), 10)]);
    // A purged id is no longer a duplicate: the reason the retention must outlast redeliveries.
    assert!(claim(&db.pool, "c", 1).await);
    assert!(!claim(&db.pool, "c", 26).await);
}
