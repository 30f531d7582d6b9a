//! Check-back against real PostgreSQL with real check endpoints on loopback: the producer's
//! barrier handler where it fits, hand-made endpoints for the failure cases.

mod prepared_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use integration_tests::{eventually, fresh_db};
use outbox::prepared::{self, Decision, PreparedError, Status};
use outbox::{Message, MessageId, barrier};
use outbox_relay::prepared::checkback;
use prepared_support::{
    Checkback, Server, WAIT, count, fast_checkback, outbox_payload, outcome, prepared_row,
};
use sqlx::PgPool;

/// The producer's own database: business rows and the barrier table.
async fn producer_db() -> PgPool {
    let db = fresh_db().await;
    sqlx::query("CREATE TABLE orders (id bigint PRIMARY KEY, message_id bigint NOT NULL)")
        .execute(&db.pool)
        .await
        .unwrap();
    db.pool
}

/// The producer's check endpoint, the barrier handler over its database.
async fn producer_endpoint(business: &PgPool) -> Server {
    Server::start(Router::new().route("/outbox/check", barrier::check_handler(business.clone())))
        .await
}

async fn prepare(outbox_db: &PgPool, check_url: Option<&str>) -> MessageId {
    let msg = Message::new("", "orders", b"order created".to_vec());
    prepared::prepare(outbox_db, &msg, check_url)
        .await
        .unwrap()
        .id()
}

/// Business transaction: the order row and the barrier record commit together, or neither.
async fn business_commit(
    business: &PgPool,
    order: i64,
    id: MessageId,
) -> Result<(), PreparedError> {
    let mut tx = business.begin().await?;
    sqlx::query("INSERT INTO orders (id, message_id) VALUES ($1, $2)")
        .bind(order)
        .bind(id.0)
        .execute(&mut *tx)
        .await?;
    barrier::record_commit(&mut tx, id).await?;
    tx.commit().await?;
    Ok(())
}

async fn order_exists(business: &PgPool, order: i64) -> bool {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM orders WHERE id = $1)")
        .bind(order)
        .fetch_one(business)
        .await
        .unwrap()
}

#[tokio::test]
async fn producer_dies_after_business_commit_and_checkback_publishes() {
    let outbox_db = fresh_db().await.pool;
    let business = producer_db().await;
    let endpoint = producer_endpoint(&business).await;
    let id = prepare(&outbox_db, Some(&endpoint.url("/outbox/check"))).await;
    business_commit(&business, 1, id).await.unwrap();
    // The producer dies here: no commit reaches the outbox.

    let checkback = Checkback::start(&outbox_db, fast_checkback(3));
    eventually(WAIT, "the message to move into outbox.messages", || async {
        outbox_payload(&outbox_db, id.0).await.is_some()
    })
    .await;
    checkback.stop().await;
    assert_eq!(
        outbox_payload(&outbox_db, id.0).await.as_deref(),
        Some(&b"order created"[..])
    );
    assert_eq!(prepared_row(&outbox_db, id.0).await, None);
    assert_eq!(
        outcome(&outbox_db, id.0).await,
        Some(("committed".into(), "checkback".into()))
    );
    // The producer comes back and commits: same answer, nothing moved twice.
    prepared::Prepared::from_id(id)
        .commit(&outbox_db)
        .await
        .unwrap();
    assert_eq!(
        count(&outbox_db, "SELECT count(*) FROM outbox.messages").await,
        1
    );
}

#[tokio::test]
async fn producer_dies_before_business_commit_and_checkback_rolls_back() {
    let outbox_db = fresh_db().await.pool;
    let business = producer_db().await;
    let endpoint = producer_endpoint(&business).await;
    let id = prepare(&outbox_db, Some(&endpoint.url("/outbox/check"))).await;
    {
        // The business transaction starts, then the producer dies: it never commits.
        let mut tx = business.begin().await.unwrap();
        sqlx::query("INSERT INTO orders (id, message_id) VALUES (1, $1)")
            .bind(id.0)
            .execute(&mut *tx)
            .await
            .unwrap();
        drop(tx);
    }

    let checkback = Checkback::start(&outbox_db, fast_checkback(3));
    eventually(WAIT, "the check-back to roll the message back", || async {
        outcome(&outbox_db, id.0).await.is_some()
    })
    .await;
    checkback.stop().await;
    assert_eq!(
        outcome(&outbox_db, id.0).await,
        Some(("rolled_back".into(), "checkback".into()))
    );
    assert_eq!(prepared_row(&outbox_db, id.0).await, None, "removed");
    assert_eq!(
        outbox_payload(&outbox_db, id.0).await,
        None,
        "never published"
    );

    // The barrier now holds "rolled back": a late business transaction fails cleanly and its
    // business change never happens without its message.
    assert_eq!(
        barrier::recorded(&business, id).await.unwrap(),
        Some(Decision::RolledBack)
    );
    match business_commit(&business, 2, id).await {
        Err(PreparedError::Conflict { decided, .. }) => assert_eq!(decided, Decision::RolledBack),
        other => panic!("a late business commit must fail, got {other:?}"),
    }
    assert!(!order_exists(&business, 2).await);
}

#[tokio::test]
async fn dead_check_endpoint_parks_message_as_unresolved_after_max_checks() {
    let outbox_db = fresh_db().await.pool;
    // A port nobody listens on: every check is refused at once.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let id = prepare(&outbox_db, Some(&format!("http://{dead}/outbox/check"))).await;
    let no_url = prepare(&outbox_db, None).await;

    let checkback = Checkback::start(&outbox_db, fast_checkback(3));
    eventually(WAIT, "both messages to be parked as unresolved", || async {
        count(
            &outbox_db,
            "SELECT count(*) FROM outbox.prepared_messages WHERE state = 'unresolved'",
        )
        .await
            == 2
    })
    .await;
    checkback.stop().await;

    let (state, attempts, error) = prepared_row(&outbox_db, id.0).await.unwrap();
    assert_eq!((state.as_str(), attempts), ("unresolved", 3));
    assert!(error.unwrap().contains("request failed"));
    let (_, attempts, error) = prepared_row(&outbox_db, no_url.0).await.unwrap();
    assert_eq!(attempts, 3);
    assert!(error.unwrap().contains("no check_url"));
    assert_eq!(
        outbox_payload(&outbox_db, id.0).await,
        None,
        "not published"
    );

    // Reported, never dropped.
    let counts = checkback::update_metrics(&outbox_db).await.unwrap();
    assert_eq!((counts.pending, counts.unresolved), (0, 2));
    let listed = checkback::unresolved(&outbox_db, 100).await.unwrap();
    let mut ids: Vec<i64> = listed.iter().map(|m| m.id).collect();
    ids.sort();
    let mut expected = vec![id.0, no_url.0];
    expected.sort();
    assert_eq!(ids, expected);

    // An operator decides; the decision is final and idempotent.
    checkback::resolve(&outbox_db, id, Decision::Committed)
        .await
        .unwrap();
    checkback::resolve(&outbox_db, id, Decision::Committed)
        .await
        .unwrap();
    assert!(outbox_payload(&outbox_db, id.0).await.is_some());
    assert!(matches!(
        checkback::resolve(&outbox_db, id, Decision::RolledBack).await,
        Err(PreparedError::Conflict { .. })
    ));
    // A producer that comes back late can still decide a parked message itself.
    prepared::Prepared::from_id(no_url)
        .rollback(&outbox_db)
        .await
        .unwrap();
    assert_eq!(checkback::counts(&outbox_db).await.unwrap().unresolved, 0);
    assert!(matches!(
        checkback::resolve(&outbox_db, MessageId(7), Decision::Committed).await,
        Err(PreparedError::NotFound(_))
    ));
}

#[tokio::test]
async fn pending_answers_are_checked_again_up_to_max_checks_then_parked() {
    let outbox_db = fresh_db().await.pool;
    let asked = Arc::new(AtomicUsize::new(0));
    let counter = asked.clone();
    let endpoint = Server::start(Router::new().route(
        "/check",
        get(move || {
            counter.fetch_add(1, Ordering::SeqCst);
            async { axum::Json(serde_json::json!({"status": "pending"})) }
        }),
    ))
    .await;
    let id = prepare(&outbox_db, Some(&endpoint.url("/check"))).await;

    let checkback = Checkback::start(&outbox_db, fast_checkback(4));
    eventually(WAIT, "the message to be parked", || async {
        prepared_row(&outbox_db, id.0)
            .await
            .is_some_and(|(state, _, _)| state == "unresolved")
    })
    .await;
    checkback.stop().await;
    assert_eq!(asked.load(Ordering::SeqCst), 4, "exactly max_checks checks");
    let (_, attempts, error) = prepared_row(&outbox_db, id.0).await.unwrap();
    assert_eq!(attempts, 4);
    assert_eq!(error.as_deref(), Some("producer answered pending"));
    assert_eq!(
        prepared::status(&outbox_db, id).await.unwrap(),
        Status::Unresolved
    );
}

#[tokio::test]
async fn first_check_waits_for_check_after() {
    let outbox_db = fresh_db().await.pool;
    let asked = Arc::new(AtomicUsize::new(0));
    let counter = asked.clone();
    let endpoint = Server::start(Router::new().route(
        "/check",
        get(move || {
            counter.fetch_add(1, Ordering::SeqCst);
            async { axum::Json(serde_json::json!({"status": "committed"})) }
        }),
    ))
    .await;
    let id = prepare(&outbox_db, Some(&endpoint.url("/check"))).await;
    let config = checkback::CheckbackConfig {
        check_after_ms: Duration::from_millis(1500),
        ..fast_checkback(3)
    };
    let started = std::time::Instant::now();
    let checkback = Checkback::start(&outbox_db, config);
    eventually(WAIT, "the check-back to commit", || async {
        outbox_payload(&outbox_db, id.0).await.is_some()
    })
    .await;
    checkback.stop().await;
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "checked after {:?}",
        started.elapsed()
    );
    assert_eq!(asked.load(Ordering::SeqCst), 1);
}

/// Producers race their business commit against the check of two relays' check-back: every
/// message ends with exactly one outcome, and it matches the business data.
#[tokio::test]
async fn business_commit_racing_checkback_has_exactly_one_outcome() {
    let outbox_db = fresh_db().await.pool;
    let business = producer_db().await;
    let endpoint = producer_endpoint(&business).await;
    let check_url = endpoint.url("/outbox/check");
    const N: i64 = 40;
    let mut ids = Vec::new();
    for _ in 0..N {
        ids.push(prepare(&outbox_db, Some(&check_url)).await);
    }
    let config = checkback::CheckbackConfig {
        check_after_ms: Duration::from_millis(100),
        ..fast_checkback(3)
    };
    // Two relays on one database.
    let relay_a = Checkback::start(&outbox_db, config.clone());
    let relay_b = Checkback::start(&outbox_db, config);

    // Producers commit their business transaction somewhere around the first check, then
    // half of them also commit through the outbox (the other half "die" after the business
    // commit), racing the check-back's own decision.
    let mut producers = Vec::new();
    for (order, id) in ids.iter().copied().enumerate() {
        let (business, outbox_db) = (business.clone(), outbox_db.clone());
        producers.push(tokio::spawn(async move {
            let order = order as i64;
            tokio::time::sleep(Duration::from_millis(40 + (order as u64 * 7) % 160)).await;
            match business_commit(&business, order, id).await {
                Ok(()) => {
                    if order % 2 == 0 {
                        prepared::Prepared::from_id(id)
                            .commit(&outbox_db)
                            .await
                            .unwrap();
                    }
                    true
                }
                Err(PreparedError::Conflict { decided, .. }) => {
                    assert_eq!(decided, Decision::RolledBack);
                    false
                }
                Err(e) => panic!("business transaction failed: {e}"),
            }
        }));
    }
    let mut business_committed = Vec::new();
    for p in producers {
        business_committed.push(p.await.unwrap());
    }
    eventually(WAIT, "every message to be decided", || async {
        count(&outbox_db, "SELECT count(*) FROM outbox.prepared_outcomes").await == N
    })
    .await;
    relay_a.stop().await;
    relay_b.stop().await;

    let mut both = (0, 0);
    for (order, id) in ids.iter().enumerate() {
        let committed = business_committed[order];
        assert_eq!(order_exists(&business, order as i64).await, committed);
        let (decision, _) = outcome(&outbox_db, id.0).await.unwrap();
        let published = outbox_payload(&outbox_db, id.0).await.is_some();
        if committed {
            both.0 += 1;
            assert_eq!(
                (decision.as_str(), published),
                ("committed", true),
                "message {order}"
            );
        } else {
            both.1 += 1;
            assert_eq!(
                (decision.as_str(), published),
                ("rolled_back", false),
                "message {order}"
            );
        }
        assert_eq!(prepared_row(&outbox_db, id.0).await, None);
    }
    assert_eq!(
        count(&outbox_db, "SELECT count(*) FROM outbox.messages").await,
        both.0
    );
    eprintln!(
        "race outcomes: {} committed, {} rolled back",
        both.0, both.1
    );
}

/// An API commit racing a check answered "rolled_back": one of them wins, the other is told so.
#[tokio::test]
async fn api_commit_racing_checkback_rollback_has_exactly_one_outcome() {
    let outbox_db = fresh_db().await.pool;
    let endpoint = Server::start(Router::new().route(
        "/check",
        get(|| async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            axum::Json(serde_json::json!({"status": "rolled_back"}))
        }),
    ))
    .await;
    const N: usize = 30;
    let mut ids = Vec::new();
    for _ in 0..N {
        ids.push(prepare(&outbox_db, Some(&endpoint.url("/check"))).await);
    }
    let config = checkback::CheckbackConfig {
        check_after_ms: Duration::from_millis(100),
        ..fast_checkback(3)
    };
    let relay = Checkback::start(&outbox_db, config);
    let mut commits = Vec::new();
    for (i, id) in ids.iter().copied().enumerate() {
        let outbox_db = outbox_db.clone();
        commits.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(60 + (i as u64 * 5) % 120)).await;
            prepared::Prepared::from_id(id).commit(&outbox_db).await
        }));
    }
    let mut results = Vec::new();
    for c in commits {
        results.push(c.await.unwrap());
    }
    eventually(WAIT, "every message to be decided", || async {
        count(&outbox_db, "SELECT count(*) FROM outbox.prepared_outcomes").await == N as i64
    })
    .await;
    relay.stop().await;
    for (id, result) in ids.iter().zip(results) {
        let (decision, by) = outcome(&outbox_db, id.0).await.unwrap();
        let published = outbox_payload(&outbox_db, id.0).await.is_some();
        match result {
            Ok(()) => assert_eq!(
                (decision.as_str(), by.as_str(), published),
                ("committed", "producer", true)
            ),
            Err(PreparedError::Conflict { decided, .. }) => {
                assert_eq!(decided, Decision::RolledBack);
                assert_eq!(
                    (decision.as_str(), by.as_str(), published),
                    ("rolled_back", "checkback", false)
                );
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    let published = count(&outbox_db, "SELECT count(*) FROM outbox.messages").await;
    eprintln!("race outcomes: {published} committed by the producer, the rest rolled back");
}

#[tokio::test]
async fn checks_to_one_host_are_rate_limited() {
    let outbox_db = fresh_db().await.pool;
    let asked = Arc::new(AtomicUsize::new(0));
    let counter = asked.clone();
    let endpoint = Server::start(Router::new().route(
        "/check",
        get(move || {
            counter.fetch_add(1, Ordering::SeqCst);
            async { axum::Json(serde_json::json!({"status": "pending"})) }
        }),
    ))
    .await;
    for _ in 0..30 {
        prepare(&outbox_db, Some(&endpoint.url("/check"))).await;
    }
    let config = checkback::CheckbackConfig {
        check_after_ms: Duration::from_millis(0),
        per_host_rate: 10.0,
        per_host_burst: 5,
        max_checks: 100,
        ..fast_checkback(100)
    };
    let started = std::time::Instant::now();
    let checkback = Checkback::start(&outbox_db, config);
    eventually(WAIT, "some checks", || async {
        asked.load(Ordering::SeqCst) >= 10
    })
    .await;
    // 5 at once, then 10 per second: the 10th check cannot go out before ~0.5 s.
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "10 checks after {:?}",
        started.elapsed()
    );
    let elapsed = started.elapsed().as_secs_f64();
    let seen = asked.load(Ordering::SeqCst) as f64;
    assert!(
        seen <= 5.0 + 10.0 * elapsed + 2.0,
        "{seen} checks in {elapsed:.2} s"
    );
    checkback.stop().await;
    // Deferred checks gave their attempt back: none was counted without being made.
    let counted = count(
        &outbox_db,
        "SELECT sum(check_attempts)::bigint FROM outbox.prepared_messages",
    )
    .await;
    assert_eq!(counted as usize, asked.load(Ordering::SeqCst));
}
