//! The schema's naming rules, checked on a freshly migrated database: every index of the
//! product's schemas ends in `_idx` (primary keys and unique constraints keep PostgreSQL's
//! `_pkey` / `_key`), and every function of the SQL API has a catalog comment.

use integration_tests::fresh_db;

const SCHEMAS: &[&str] = &["outbox", "inbox", "gateway", "notify", "saga"];

#[tokio::test]
async fn indexes_end_in_idx() {
    let db = fresh_db().await;
    let bad: Vec<(String, String)> = sqlx::query_as(
        "SELECT schemaname::text, indexname::text FROM pg_indexes \
         WHERE schemaname = ANY($1) \
           AND indexname !~ '_(idx|pkey|key)$' ORDER BY 1, 2",
    )
    .bind(SCHEMAS)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(bad.is_empty(), "indexes not named *_idx: {bad:?}");
}

#[tokio::test]
async fn the_functions_the_0009_migration_documents_have_catalog_comments() {
    let db = fresh_db().await;
    for function in [
        "outbox.next_id()",
        "gateway.lock_enqueue(text, bigint)",
        "notify.send(text, text, jsonb, text, timestamptz, text, text)",
        "notify.send_bytes(text, text, bytea, text, text, timestamptz, text, text)",
    ] {
        let comment: Option<String> =
            sqlx::query_scalar("SELECT obj_description($1::regprocedure, 'pg_proc')")
                .bind(function)
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert!(
            comment.is_some_and(|c| c.len() > 20),
            "{function} has no catalog comment"
        );
    }
}
