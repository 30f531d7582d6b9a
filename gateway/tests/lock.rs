//! Per-resource locks against real PostgreSQL / Redis and a real upstream that tracks
//! concurrency per order id.

mod common;

use std::time::Instant;

use common::{Upstream, client, header_lines, start_gateway};
use integration_tests::{fresh_db, redis_url, unique_name};

fn route(upstream: &str, lock: &str) -> String {
    format!(
        "
[[routes]]
prefix = \"/orders\"
upstream = \"{upstream}\"
timeout_ms = 10000
lock = {{ {lock} }}
"
    )
}

async fn one_id_is_serialised_while_ids_run_in_parallel(toml: &str, upstream: &Upstream) {
    let gw = start_gateway(toml).await;
    let http = client();
    let mut tasks = Vec::new();
    // 20 requests for order A, and one for each of B..E, all at once.
    for i in 0..24 {
        let order = if i < 20 {
            "A".to_owned()
        } else {
            format!("B{i}")
        };
        let http = http.clone();
        let url = gw.url("/orders/pay?delay_ms=60");
        tasks.push(tokio::spawn(async move {
            http.post(url)
                .header("X-Order-Id", order)
                .body("{}")
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 201);
    }
    assert_eq!(upstream.hits(), 24);
    assert_eq!(
        upstream.max_in_flight_for("A"),
        1,
        "requests for one order never overlap at the upstream"
    );
    assert!(
        upstream.max_in_flight() > 1,
        "requests for different orders ran in parallel"
    );
    // Fencing tokens only grow, in the order requests for A reached the upstream.
    let tokens: Vec<i64> = upstream
        .seen()
        .iter()
        .filter(|s| s.headers["x-order-id"] == "A")
        .map(|s| {
            s.headers["fencing-token"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert_eq!(tokens.len(), 20);
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "tokens increase: {tokens:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_order_never_overlaps_at_upstream_while_other_orders_run_in_parallel() {
    let db = fresh_db().await;
    let upstream = Upstream::start().await;
    let toml = format!(
        "{}{}",
        header_lines(&db.url),
        route(
            &upstream.url(),
            "key = \"header:X-Order-Id\", wait_ms = 9000"
        )
    );
    one_id_is_serialised_while_ids_run_in_parallel(&toml, &upstream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_order_never_overlaps_at_upstream_on_redis() {
    let upstream = Upstream::start().await;
    // The route prefix namespaces lock names; a unique prefix keeps runs apart in one Redis.
    let prefix = format!("/{}", unique_name("orders"));
    let toml = format!(
        "listen = \"127.0.0.1:0\"\nstore = \"redis\"\nredis_url = \"{}\"\n{}",
        redis_url(),
        route(
            &upstream.url(),
            "key = \"header:X-Order-Id\", wait_ms = 9000"
        )
        .replace("\"/orders\"", &format!("\"{prefix}\""))
    );
    let gw = start_gateway(&toml).await;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let url = gw.url(&format!("{prefix}/pay?delay_ms=30"));
        tasks.push(tokio::spawn(async move {
            client()
                .post(url)
                .header("X-Order-Id", "A")
                .body("{}")
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 201);
    }
    assert_eq!(upstream.max_in_flight_for("A"), 1);
    let tokens: Vec<i64> = upstream
        .seen()
        .iter()
        .map(|s| {
            s.headers["fencing-token"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "tokens increase: {tokens:?}"
    );
}

#[tokio::test]
async fn busy_resource_fails_fast_with_409_when_wait_is_zero() {
    let db = fresh_db().await;
    let upstream = Upstream::start().await;
    let toml = format!(
        "{}{}",
        header_lines(&db.url),
        route(&upstream.url(), "key = \"path:0\"")
    );
    let gw = start_gateway(&toml).await;
    let slow = tokio::spawn({
        let url = gw.url("/orders/42/pay?delay_ms=1200");
        async move { client().post(url).body("{}").send().await.unwrap().status() }
    });
    common::eventually(5, "first request at upstream", || async {
        (upstream.hits() == 1).then_some(())
    })
    .await;
    let started = Instant::now();
    let r = client()
        .post(gw.url("/orders/42/pay"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    assert!(r.headers().contains_key("retry-after"));
    assert!(
        started.elapsed().as_millis() < 800,
        "failed fast instead of waiting for the holder"
    );
    // Another order is not blocked.
    let other = client()
        .post(gw.url("/orders/43/pay"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 201);
    assert_eq!(slow.await.unwrap(), 201);
    // Once released, the order is available again.
    let again = client()
        .post(gw.url("/orders/42/pay"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 201);
}

#[tokio::test]
async fn lock_key_from_json_body_and_missing_key_is_400() {
    let db = fresh_db().await;
    let upstream = Upstream::start().await;
    let toml = format!(
        "{}{}",
        header_lines(&db.url),
        route(&upstream.url(), "key = \"json:order.id\", wait_ms = 1000")
    );
    let gw = start_gateway(&toml).await;
    let ok = client()
        .post(gw.url("/orders/pay"))
        .body(r#"{"order":{"id":7}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 201);
    assert!(upstream.seen()[0].headers.contains_key("fencing-token"));
    let missing = client()
        .post(gw.url("/orders/pay"))
        .body(r#"{"amount":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 400);
    let doc: serde_json::Value = missing.json().await.unwrap();
    assert!(
        doc["detail"].as_str().unwrap().contains("order.id"),
        "{doc}"
    );
    assert_eq!(upstream.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateways_on_one_database_serialise_one_order() {
    let db = fresh_db().await;
    let upstream = Upstream::start().await;
    let toml = format!(
        "{}{}",
        header_lines(&db.url),
        route(
            &upstream.url(),
            "key = \"header:X-Order-Id\", wait_ms = 9000"
        )
    );
    let gateways = [start_gateway(&toml).await, start_gateway(&toml).await];
    let mut tasks = Vec::new();
    for i in 0..10 {
        let url = gateways[i % 2].url("/orders/pay?delay_ms=40");
        tasks.push(tokio::spawn(async move {
            client()
                .post(url)
                .header("X-Order-Id", "A")
                .body("{}")
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 201);
    }
    assert_eq!(upstream.hits(), 10);
    assert_eq!(
        upstream.max_in_flight_for("A"),
        1,
        "the lock in PostgreSQL spans gateways"
    );
}
