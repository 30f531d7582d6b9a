//! Ordered mode: per-key order at high concurrency, with retries in the middle of a key.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ordered_mode_keeps_order_per_key_at_concurrency_16_over_100_keys() {
    let (db, publisher, queue, exchange) = setup().await;
    const KEYS: i64 = 100;
    const PER_KEY: i64 = 8;
    // Publish first, so the consumer meets a full queue and every lane is busy at once.
    let mut id = 0;
    for seq in 0..PER_KEY {
        for key in 0..KEYS {
            id += 1;
            // Some messages fail twice on their way: later messages of their key must wait.
            let behavior = if key % 10 == 0 && seq == 3 {
                "fail_twice"
            } else {
                ""
            };
            publisher
                .publish(
                    &exchange,
                    id,
                    &payload(&format!("k{key}"), seq, behavior),
                    true,
                )
                .await;
        }
    }
    let consumer = builder(&db.pool, &queue, &exchange)
        .ordered(true)
        .concurrency(16)
        .prefetch(500)
        .handler(Recorder { jitter_ms: 3 })
        .build()
        .unwrap();
    let (token, task) = spawn(consumer);
    wait_until("every message applied", Duration::from_secs(60), || async {
        total_effects(&db.pool).await == KEYS * PER_KEY
    })
    .await;
    stop(token, task).await;

    let rows: Vec<(String, i64)> = sqlx::query_as("SELECT key, seq FROM effects ORDER BY n")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    let mut per_key: HashMap<String, Vec<i64>> = HashMap::new();
    for (key, seq) in rows {
        per_key.entry(key).or_default().push(seq);
    }
    assert_eq!(per_key.len(), KEYS as usize);
    let expected: Vec<i64> = (0..PER_KEY).collect();
    for (key, seqs) in &per_key {
        assert_eq!(seqs, &expected, "order of key {key}");
    }
    // The keys really did run concurrently: the commit order interleaves keys.
    let first_keys: Vec<String> = sqlx::query_scalar("SELECT key FROM effects ORDER BY n LIMIT 20")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    let distinct: std::collections::HashSet<_> = first_keys.iter().collect();
    assert!(distinct.len() > 5, "keys interleave: {first_keys:?}");
    assert_eq!(distinct_effects(&db.pool).await, KEYS * PER_KEY);
    publisher.cleanup(&queue).await;
}
