//! The schema's naming rules, checked on a freshly migrated database: every index of the
//! product's schemas ends in `_idx` (primary keys and unique constraints keep PostgreSQL's
//! `_pkey` / `_key`), every function has a catalog comment, and parameter names and duration
//! types follow the rules migration 0010 states.

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
async fn every_function_has_a_catalog_comment() {
    let db = fresh_db().await;
    let bad: Vec<String> = sqlx::query_scalar(
        "SELECT p.oid::regprocedure::text FROM pg_proc p \
         JOIN pg_namespace n ON n.oid = p.pronamespace \
         WHERE n.nspname = ANY($1) AND coalesce(length(obj_description(p.oid, 'pg_proc')), 0) < 20 \
         ORDER BY 1",
    )
    .bind(SCHEMAS)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(
        bad.is_empty(),
        "functions without a catalog comment: {bad:?}"
    );
}

/// Functions users call take plain parameter names (named calls read as the documentation
/// does); functions only the product calls, whose comment starts with "Internal", take `p_`
/// names. Output columns (`RETURNS TABLE`) are not parameters.
#[tokio::test]
async fn parameter_names_follow_the_functions_visibility() {
    let db = fresh_db().await;
    let rows: Vec<(String, bool, Vec<String>)> = sqlx::query_as(
        "SELECT p.oid::regprocedure::text, \
                coalesce(obj_description(p.oid, 'pg_proc'), '') LIKE 'Internal%', \
                coalesce(ARRAY(SELECT a.name FROM unnest(p.proargnames, \
                                   coalesce(p.proargmodes, array_fill('i'::\"char\", \
                                            ARRAY[coalesce(cardinality(p.proargnames), 0)]))) \
                                   AS a(name, mode) \
                               WHERE a.mode IN ('i', 'b', 'v')), '{}') \
         FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
         WHERE n.nspname = ANY($1) ORDER BY 1",
    )
    .bind(SCHEMAS)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(rows.len() > 30, "{rows:?}");
    let bad: Vec<_> = rows
        .iter()
        .filter(|(_, internal, params)| params.iter().any(|p| p.starts_with("p_") != *internal))
        .collect();
    assert!(bad.is_empty(), "parameter names against the rule: {bad:?}");
}

/// Durations passed between the product's own parts are intervals; the milliseconds forms of
/// the gateway's lock functions remain only as deprecated wrappers of the interval ones.
#[tokio::test]
async fn lock_waits_and_leases_are_intervals_and_the_old_forms_delegate() {
    let db = fresh_db().await;
    for function in [
        "gateway.lock_enqueue(text, interval)",
        "gateway.lock_try(bigint, interval)",
        "notify.claim(integer, interval)",
    ] {
        let found: Option<String> = sqlx::query_scalar("SELECT to_regprocedure($1)::text")
            .bind(function)
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert!(found.is_some(), "{function} missing");
    }
    let name = integration_tests::unique_name("lock");
    let first: i64 = sqlx::query_scalar("SELECT gateway.lock_enqueue($1, 5000::bigint)")
        .bind(&name)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let second: i64 = sqlx::query_scalar("SELECT gateway.lock_enqueue($1, interval '5 s')")
        .bind(&name)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let token: Option<i64> = sqlx::query_scalar("SELECT gateway.lock_try($1, 10000::bigint)")
        .bind(first)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(token.is_some(), "the first in line gets the lock");
    let waiting: Option<i64> = sqlx::query_scalar("SELECT gateway.lock_try($1, interval '10 s')")
        .bind(second)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(waiting, None, "the second waits behind a live lease");
    let lease_left: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM expires_at - clock_timestamp())::float8 \
         FROM gateway.lock_entries WHERE id = $1",
    )
    .bind(first)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(lease_left > 5.0 && lease_left <= 10.0, "{lease_left}");
}
