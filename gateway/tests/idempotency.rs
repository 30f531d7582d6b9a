//! Idempotency-Key behaviour against real PostgreSQL / Redis and a real upstream.

mod common;

use common::{Upstream, client, eventually, header_lines, start_gateway};
use integration_tests::{fresh_db, redis_url};

/// The `idempotency` table most tests use.
const BASE: &str = "required = true, ttl_secs = 3600";

/// A `/pay` route with the given `idempotency` table contents.
fn config(db_url: &str, upstream: &str, idem: &str) -> String {
    format!(
        "{}
[[routes]]
prefix = \"/pay\"
upstream = \"{upstream}\"
timeout_ms = 1000
idempotency = {{ {idem} }}
",
        header_lines(db_url)
    )
}

async fn concurrent_requests_reach_upstream_once(toml: String, upstream: Upstream) {
    let gw = start_gateway(&toml).await;
    let http = client();
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let http = http.clone();
        let url = gw.url("/pay/charge?delay_ms=200");
        tasks.push(tokio::spawn(async move {
            let r = http
                .post(url)
                .header("Idempotency-Key", "\"order-1-charge\"")
                .body(r#"{"amount":100}"#)
                .send()
                .await
                .unwrap();
            let replayed = r.headers().get("idempotent-replayed").is_some();
            let retry_after = r.headers().get("retry-after").is_some();
            (r.status().as_u16(), replayed, retry_after)
        }));
    }
    let mut firsts = 0;
    for t in tasks {
        let (status, replayed, retry_after) = t.await.unwrap();
        match status {
            201 if !replayed => firsts += 1,
            201 => {}
            409 => assert!(retry_after, "409 must carry Retry-After"),
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(
        firsts, 1,
        "exactly one request is answered by the upstream itself"
    );
    assert_eq!(upstream.hits(), 1, "the upstream saw exactly one request");
    // After completion every retry is a replay.
    let r = http
        .post(gw.url("/pay/charge?delay_ms=200"))
        .header("Idempotency-Key", "\"order-1-charge\"")
        .body(r#"{"amount":100}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    assert_eq!(r.headers()["x-upstream"], "yes");
    assert_eq!(upstream.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_requests_with_one_key_reach_upstream_once() {
    let db = fresh_db().await;
    let upstream = Upstream::start().await;
    concurrent_requests_reach_upstream_once(config(&db.url, &upstream.url(), BASE), upstream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_requests_with_one_key_reach_upstream_once_on_redis() {
    let upstream = Upstream::start().await;
    // A fresh Redis key space per test: the records live under the caller id, which is unique.
    let caller = integration_tests::unique_name("c");
    let toml = format!(
        "listen = \"127.0.0.1:0\"
store = \"redis\"
redis_url = \"{}\"
[[callers]]
id = \"{caller}\"
token = \"secret-token-1\"
[[routes]]
prefix = \"/pay\"
upstream = \"{}\"
timeout_ms = 1000
idempotency = {{ required = true, ttl_secs = 60 }}
",
        redis_url(),
        upstream.url()
    );
    let gw = start_gateway(&toml).await;
    let http = client();
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let http = http.clone();
        let url = gw.url("/pay/charge?delay_ms=200");
        tasks.push(tokio::spawn(async move {
            let r = http
                .post(url)
                .bearer_auth("secret-token-1")
                .header("Idempotency-Key", "\"k\"")
                .body("same")
                .send()
                .await
                .unwrap();
            (
                r.status().as_u16(),
                r.headers().get("idempotent-replayed").is_some(),
            )
        }));
    }
    let mut firsts = 0;
    for t in tasks {
        match t.await.unwrap() {
            (201, false) => firsts += 1,
            (201, true) | (409, _) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(firsts, 1);
    assert_eq!(upstream.hits(), 1);
}

#[tokio::test]
async fn same_key_with_another_body_is_422() {
    let db = fresh_db().await;
    let upstream = Upstream::start().await;
    let gw = start_gateway(&config(&db.url, &upstream.url(), BASE)).await;
    let http = client();
    let send = |body: &'static str| {
        http.post(gw.url("/pay/charge"))
            .header("Idempotency-Key", "\"k-422\"")
            .body(body)
            .send()
    };
    assert_eq!(send("a").await.unwrap().status(), 201);
    let r = send("b").await.unwrap();
    assert_eq!(r.status(), 422);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    assert_eq!(upstream.hits(), 1);
}

#[tokio::test]
async fn missing_key_is_400_and_not_forwarded() {
    let db = fresh_db().await;
    let upstream = Upstream::start().await;
    let gw = start_gateway(&config(&db.url, &upstream.url(), BASE)).await;
    let r = client()
        .post(gw.url("/pay/charge"))
        .body("a")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let doc: serde_json::Value = r.json().await.unwrap();
    assert_eq!(doc["type"], "urn:problem:gateway:idempotency-key-missing");
    assert_eq!(upstream.hits(), 0);
}

#[tokio::test]
async fn malformed_keys_are_400_and_not_forwarded() {
    let db = fresh_db().await;
    let upstream = Upstream::start().await;
    let gw = start_gateway(&config(&db.url, &upstream.url(), BASE)).await;
    let too_long = format!("\"{}\"", "k".repeat(256));
    for key in [
        "unquoted",
        "\"unterminated",
        "\"\"",
        "\"a\";param=1",
        too_long.as_str(),
    ] {
        let r = client()
            .post(gw.url("/pay/charge"))
            .header("Idempotency-Key", key)
            .body("a")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "key {key:?}");
        let doc: serde_json::Value = r.json().await.unwrap();
        assert_eq!(doc["type"], "urn:problem:gateway:idempotency-key-invalid");
    }
    let r = client()
        .post(gw.url("/pay/charge"))
        .header("Idempotency-Key", "\"a\"")
        .header("Idempotency-Key", "\"b\"")
        .body("a")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "two keys");
    let max = format!("\"{}\"", "k".repeat(255));
    let r = client()
        .post(gw.url("/pay/charge"))
        .header("Idempotency-Key", max)
        .body("a")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "255 characters is the limit, not over it");
    assert_eq!(upstream.hits(), 1);
}

#[tokio::test]
async fn upstream_receives_a_derived_key_that_is_stable_per_caller_and_key() {
    let db = fresh_db().await;
    let upstream = Upstream::start().await;
    let gw = start_gateway(&config(&db.url, &upstream.url(), BASE)).await;
    for key in ["\"k1\"", "\"k2\""] {
        client()
            .post(gw.url("/pay/charge"))
            .header("Idempotency-Key", key)
            .body("a")
            .send()
            .await
            .unwrap();
    }
    let seen = upstream.seen();
    let k1 = seen[0].headers["idempotency-key"].to_str().unwrap();
    let k2 = seen[1].headers["idempotency-key"].to_str().unwrap();
    assert_eq!(k1, gateway::idempotency::upstream_key("anonymous", "k1"));
    assert_ne!(k1, k2);
    assert_ne!(k1, "\"k1\"", "the client's own key is not forwarded");
}

#[tokio::test]
async fn keys_are_scoped_by_caller() {
    let db = fresh_db().await;
    let upstream = Upstream::start().await;
    let toml = format!(
        "{}
[[callers]]
id = \"orders\"
token = \"orders-token\"
[[callers]]
id = \"billing\"
token = \"billing-token\"
[[routes]]
prefix = \"/pay\"
upstream = \"{}\"
idempotency = {{ required = true }}
",
        header_lines(&db.url),
        upstream.url()
    );
    let gw = start_gateway(&toml).await;
    let send = |token: &'static str| {
        client()
            .post(gw.url("/pay/charge"))
            .bearer_auth(token)
            .header("Idempotency-Key", "\"shared\"")
            .body("a")
            .send()
    };
    let a = send("orders-token").await.unwrap();
    let b = send("billing-token").await.unwrap();
    assert!(a.headers().get("idempotent-replayed").is_none());
    assert!(b.headers().get("idempotent-replayed").is_none());
    assert_eq!(
        upstream.hits(),
        2,
        "the same key from two callers is two requests"
    );
    let none = client()
        .post(gw.url("/pay/charge"))
        .body("a")
        .send()
        .await
        .unwrap();
    assert_eq!(none.status(), 401);
    assert!(
        upstream
            .seen()
            .iter()
            .all(|s| s.headers.get("authorization").is_none()),
        "the caller's credential is not forwarded"
    );
}

#[tokio::test]
async fn slow_upstream_is_504_and_the_key_is_released_by_default() {
    let db = fresh_db().await;
    let upstream = Upstream::start().await;
    let gw = start_gateway(&config(&db.url, &upstream.url(), BASE)).await;
    let send = |path: &'static str| {
        client()
            .post(gw.url(path))
            .header("Idempotency-Key", "\"slow\"")
            .body("a")
            .send()
    };
    let r = send("/pay/charge?delay_ms=3000").await.unwrap();
    assert_eq!(r.status(), 504);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    // Released: the same request may run again (the record is deleted in the background).
    eventually(5, "key released after timeout", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM gateway.idempotency_records")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        (n == 0).then_some(())
    })
    .await;
    let r = send("/pay/charge?delay_ms=3000").await.unwrap();
    assert_eq!(r.status(), 504);
    assert_eq!(upstream.hits(), 2);
}

#[tokio::test]
async fn slow_upstream_is_504_and_stored_when_configured() {
    let db = fresh_db().await;
    let upstream = Upstream::start().await;
    let gw = start_gateway(&config(
        &db.url,
        &upstream.url(),
        "required = true, timeouts = \"store\"",
    ))
    .await;
    let send = || {
        client()
            .post(gw.url("/pay/charge?delay_ms=3000"))
            .header("Idempotency-Key", "\"slow\"")
            .body("a")
            .send()
    };
    assert_eq!(send().await.unwrap().status(), 504);
    let r = eventually(5, "stored 504 replayed", || async {
        let r = send().await.unwrap();
        (r.headers().get("idempotent-replayed").is_some()).then_some(r)
    })
    .await;
    assert_eq!(r.status(), 504);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    assert_eq!(upstream.hits(), 1, "a stored timeout is never sent again");
}

#[tokio::test]
async fn server_errors_are_released_or_stored_as_configured() {
    let db = fresh_db().await;
    let upstream = Upstream::start().await;
    let released = start_gateway(&config(&db.url, &upstream.url(), BASE)).await;
    let stored_db = fresh_db().await;
    let stored = start_gateway(&config(
        &stored_db.url,
        &upstream.url(),
        "required = true, server_errors = \"store\"",
    ))
    .await;
    for gw in [&released, &stored] {
        for _ in 0..2 {
            let r = client()
                .post(gw.url("/pay/charge?status=503"))
                .header("Idempotency-Key", "\"e\"")
                .body("a")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 503);
        }
    }
    // Released: both attempts reached the upstream; stored: only the first.
    assert_eq!(upstream.hits(), 3);
}

#[tokio::test]
async fn expired_records_are_cleaned_up() {
    let db = fresh_db().await;
    let upstream = Upstream::start().await;
    let toml = format!(
        "cleanup_interval_secs = 1\n{}",
        config(
            &db.url,
            &upstream.url(),
            "required = true, ttl_secs = 2, lease_ms = 1500"
        )
    );
    let gw = start_gateway(&toml).await;
    let r = client()
        .post(gw.url("/pay/charge"))
        .header("Idempotency-Key", "\"short\"")
        .body("a")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let count = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM gateway.idempotency_records")
            .fetch_one(&db.pool)
            .await
            .unwrap()
    };
    assert_eq!(count().await, 1);
    eventually(6, "expired record deleted", || async {
        (count().await == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn the_expiry_is_fixed_by_the_claim_and_covers_the_ttl_after_completion() {
    let db = fresh_db().await;
    let upstream = Upstream::start().await;
    let toml = config(
        &db.url,
        &upstream.url(),
        "required = true, ttl_secs = 600, lease_ms = 4000",
    );
    let gw = start_gateway(&toml).await;
    let url = gw.url("/pay/charge?delay_ms=300");
    let request = tokio::spawn(async move {
        client()
            .post(url)
            .header("Idempotency-Key", "\"kept\"")
            .body("a")
            .send()
            .await
            .unwrap()
            .status()
    });
    // (state, ms from the claim to the expiry, ms from now to the expiry)
    let record = || async {
        sqlx::query_as::<_, (String, f64, f64)>(
            "SELECT state,
                    (EXTRACT(EPOCH FROM expires_at - created_at) * 1000)::float8,
                    (EXTRACT(EPOCH FROM expires_at - clock_timestamp()) * 1000)::float8
             FROM gateway.idempotency_records WHERE key = 'kept'",
        )
        .fetch_optional(&db.pool)
        .await
        .unwrap()
    };
    let (state, claimed_span, _) = eventually(5, "the claim", || async {
        record().await.filter(|r| r.0 == "in_flight")
    })
    .await;
    assert_eq!(state, "in_flight");
    // The lease plus the TTL ahead of the claim.
    assert!(
        (claimed_span - 604_000.0).abs() < 50.0,
        "expiry {claimed_span} ms after the claim"
    );
    assert_eq!(request.await.unwrap(), 201);
    let (state, completed_span, left) = record().await.expect("record kept");
    assert_eq!(state, "completed");
    // Completing left it alone, and it is still at least the TTL away.
    assert_eq!(completed_span, claimed_span);
    assert!(left >= 600_000.0, "{left} ms left after completion");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateways_on_one_database_forward_a_key_once() {
    let db = fresh_db().await;
    let upstream = Upstream::start().await;
    let toml = config(&db.url, &upstream.url(), BASE);
    let gateways = [start_gateway(&toml).await, start_gateway(&toml).await];
    let mut tasks = Vec::new();
    for i in 0..20 {
        let url = gateways[i % 2].url("/pay/charge?delay_ms=200");
        tasks.push(tokio::spawn(async move {
            let r = client()
                .post(url)
                .header("Idempotency-Key", "\"shared-by-two\"")
                .body("a")
                .send()
                .await
                .unwrap();
            (
                r.status().as_u16(),
                r.headers().get("idempotent-replayed").is_some(),
            )
        }));
    }
    let mut firsts = 0;
    for t in tasks {
        match t.await.unwrap() {
            (201, false) => firsts += 1,
            (201, true) | (409, _) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(firsts, 1);
    assert_eq!(
        upstream.hits(),
        1,
        "the record in PostgreSQL is shared by both gateways"
    );
}
