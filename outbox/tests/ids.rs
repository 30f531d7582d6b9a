//! Message ids against a real database, driven by an injectable clock: node leases, clock steps
//! backwards, restarts, and ids from several databases.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use integration_tests::fresh_db;
use outbox::id::{EPOCH_MS, IdGenerator, IdGeneratorConfig, ManualClock, MessageId};
use outbox::{Error, Message, Outbox};

const T0: u64 = EPOCH_MS + 86_400_000 * 700;

fn config() -> IdGeneratorConfig {
    IdGeneratorConfig {
        max_backward: Duration::from_millis(100),
        ..IdGeneratorConfig::default()
    }
}

async fn generator(pool: &sqlx::PgPool, clock: &ManualClock) -> IdGenerator {
    IdGenerator::with_clock(pool.clone(), Arc::new(clock.clone()), config())
        .await
        .unwrap()
}

#[tokio::test]
async fn small_clock_step_back_is_waited_out() {
    let db = fresh_db().await;
    let clock = ManualClock::new(T0);
    let ids = generator(&db.pool, &clock).await;
    let a = ids.next_id().await.unwrap();
    clock.set(T0 - 50);
    let b = ids.next_id().await.unwrap();
    assert!(b > a, "ids must keep increasing");
    assert!(
        clock.now_ms_for_test() >= T0,
        "the generator waited for the clock to catch up"
    );
}

#[tokio::test]
async fn large_clock_step_back_is_refused_until_the_clock_catches_up() {
    let db = fresh_db().await;
    let clock = ManualClock::new(T0);
    let ids = generator(&db.pool, &clock).await;
    let a = ids.next_id().await.unwrap();
    clock.set(T0 - 10_000);
    match ids.next_id().await {
        Err(Error::ClockMovedBackwards {
            behind_ms,
            tolerance_ms,
        }) => {
            assert_eq!(behind_ms, 10_000);
            assert_eq!(tolerance_ms, 100);
        }
        other => panic!("expected ClockMovedBackwards, got {other:?}"),
    }
    clock.set(T0 + 1);
    let b = ids.next_id().await.unwrap();
    assert!(b > a);
}

#[tokio::test]
async fn a_restarted_producer_with_a_clock_behind_never_repeats_an_id() {
    let db = fresh_db().await;
    let clock = ManualClock::new(T0);
    let mut seen = HashSet::new();
    // Use every node once so the next generator must take a node used before.
    let mut first = Vec::new();
    for _ in 0..63 {
        let ids = generator(&db.pool, &clock).await;
        for _ in 0..100 {
            assert!(seen.insert(ids.next_id().await.unwrap()));
        }
        first.push(ids);
    }
    assert!(matches!(
        IdGenerator::with_clock(db.pool.clone(), Arc::new(clock.clone()), config()).await,
        Err(Error::NoFreeNode)
    ));
    // "Crash" them all: their leases expire, nothing was released.
    drop(first);
    sqlx::query("UPDATE outbox.id_nodes SET lease_expires_at = now() - interval '1 second'")
        .execute(&db.pool)
        .await
        .unwrap();
    // The new process's clock is behind what the old ones used and reserved (T0 + 2 s): within
    // its tolerance, so it waits for the reserved high water instead of reusing the old ids.
    clock.set(T0 - 50);
    let ids = IdGenerator::with_clock(
        db.pool.clone(),
        Arc::new(clock.clone()),
        IdGeneratorConfig {
            max_backward: Duration::from_secs(5),
            ..config()
        },
    )
    .await
    .unwrap();
    for _ in 0..1000 {
        assert!(
            seen.insert(ids.next_id().await.unwrap()),
            "an id was repeated"
        );
    }
}

#[tokio::test]
async fn live_producers_hold_different_nodes() {
    let db = fresh_db().await;
    let a = Outbox::new(db.pool.clone()).await.unwrap();
    let b = Outbox::new(db.pool.clone()).await.unwrap();
    let na = a.ids().node().await.unwrap();
    let nb = b.ids().node().await.unwrap();
    assert_ne!(na, nb);
    let id = a.ids().next_id().await.unwrap();
    assert_eq!(id.parts().node, na);
    // A released node is free at once, its high water kept.
    a.close().await.unwrap();
    let (holder, free, high_water): (Option<String>, bool, i64) = sqlx::query_as(
        "SELECT holder, lease_expires_at < now(), high_water_ms FROM outbox.id_nodes WHERE node = $1",
    )
    .bind(i16::from(na))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(holder, None);
    assert!(free);
    assert!(high_water as u64 >= id.parts().unix_ms);
}

#[tokio::test]
async fn ids_from_two_databases_and_from_sql_never_collide() {
    let one = fresh_db().await;
    let two = fresh_db().await;
    for (db, dbid) in [(&one, 1i16), (&two, 2i16)] {
        sqlx::query("UPDATE outbox.settings SET database_id = $1")
            .bind(dbid)
            .execute(&db.pool)
            .await
            .unwrap();
    }
    let mut all = HashSet::new();
    for (db, dbid) in [(&one, 1u8), (&two, 2u8)] {
        let outbox = Outbox::new(db.pool.clone()).await.unwrap();
        let mut tx = db.pool.begin().await.unwrap();
        for i in 0..500 {
            let id = outbox
                .enqueue(&mut tx, &Message::new("", "q", i.to_string()))
                .await
                .unwrap();
            assert_eq!(id.parts().database_id, dbid);
            assert!(all.insert(id));
        }
        let sql_ids: Vec<i64> = sqlx::query_scalar(
            "SELECT outbox.enqueue('', 'q', convert_to(g::text, 'UTF8')) FROM generate_series(1, 2000) g",
        )
        .fetch_all(&mut *tx)
        .await
        .unwrap();
        for id in sql_ids {
            let id = MessageId(id);
            assert_eq!(id.parts().database_id, dbid);
            assert_eq!(id.parts().node, 0, "the SQL function is node 0");
            assert!(all.insert(id), "collision: {id}");
        }
        tx.commit().await.unwrap();
    }
    assert_eq!(all.len(), 5000);
}

#[tokio::test]
async fn sql_ids_survive_a_clock_jump_back_without_repeating() {
    // The SQL function's high water lives in a sequence; simulate the server clock stepping back
    // by moving the high water far ahead of the clock.
    let db = fresh_db().await;
    let ahead: i64 = sqlx::query_scalar(
        "SELECT setval('outbox.sql_id_high_water', \
             ((floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint - 1704067200000 + 60000) << 9))",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let ids: Vec<i64> = sqlx::query_scalar("SELECT outbox.next_id() FROM generate_series(1, 1000)")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    let mut prev = 0;
    for id in &ids {
        assert!(*id > prev, "ids must strictly increase");
        prev = *id;
    }
    // They continue from the high water (a minute "in the future"), not from the clock.
    let first = MessageId(ids[0]).parts().unix_ms;
    assert!(first >= ((ahead >> 9) as u64) + EPOCH_MS);
}
