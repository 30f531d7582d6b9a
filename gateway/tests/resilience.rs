//! Timeouts, retries, the circuit breaker and admission limits.

mod common;

use std::time::Duration;

use common::{Upstream, client, eventually, header_lines, start_gateway};
use integration_tests::fresh_db;

async fn gateway(
    upstream: &Upstream,
    route_extra: &str,
) -> (integration_tests::TestDb, common::TestGateway) {
    let db = fresh_db().await;
    let toml = format!(
        "{}[[routes]]\nprefix = \"/api\"\nupstream = \"{}\"\ntimeout_ms = 1500\n{route_extra}\n",
        header_lines(&db.url),
        upstream.url()
    );
    let gw = start_gateway(&toml).await;
    (db, gw)
}

#[tokio::test]
async fn slow_upstream_is_504_problem() {
    let upstream = Upstream::start().await;
    let (_db, gw) = gateway(&upstream, "").await;
    let r = client()
        .get(gw.url("/api/x?delay_ms=3000"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
}

#[tokio::test]
async fn breaker_opens_after_failures_then_half_opens_with_one_probe() {
    let upstream = Upstream::start().await;
    let (_db, gw) = gateway(
        &upstream,
        "breaker = { failure_threshold = 3, open_ms = 800 }",
    )
    .await;
    upstream.set_failing(true);
    for _ in 0..3 {
        let r = client().get(gw.url("/api/x")).send().await.unwrap();
        assert_eq!(r.status(), 500);
    }
    let r = client().get(gw.url("/api/x")).send().await.unwrap();
    assert_eq!(
        r.status(),
        503,
        "open: refused without calling the upstream"
    );
    assert!(r.headers().contains_key("retry-after"));
    let doc: serde_json::Value = r.json().await.unwrap();
    assert_eq!(doc["type"], "urn:problem:gateway:circuit-open");
    assert_eq!(upstream.hits(), 3);
    // After open_ms a probe goes through; it fails, so the breaker opens again.
    tokio::time::sleep(Duration::from_millis(900)).await;
    let r = client().get(gw.url("/api/x")).send().await.unwrap();
    assert_eq!(r.status(), 500, "the half-open probe reached the upstream");
    assert_eq!(upstream.hits(), 4);
    let r = client().get(gw.url("/api/x")).send().await.unwrap();
    assert_eq!(r.status(), 503, "the failed probe reopened the breaker");
    // The upstream recovers: the next probe closes the breaker.
    upstream.set_failing(false);
    tokio::time::sleep(Duration::from_millis(900)).await;
    let r = client().get(gw.url("/api/x")).send().await.unwrap();
    assert_eq!(r.status(), 201);
    for _ in 0..3 {
        assert_eq!(
            client()
                .get(gw.url("/api/x"))
                .send()
                .await
                .unwrap()
                .status(),
            201
        );
    }
    assert_eq!(upstream.hits(), 8);
}

#[tokio::test]
async fn half_open_breaker_lets_only_one_probe_through() {
    let upstream = Upstream::start().await;
    let (_db, gw) = gateway(
        &upstream,
        "breaker = { failure_threshold = 1, open_ms = 300 }",
    )
    .await;
    upstream.set_failing(true);
    assert_eq!(
        client()
            .get(gw.url("/api/x"))
            .send()
            .await
            .unwrap()
            .status(),
        500
    );
    upstream.set_failing(false);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let probe = tokio::spawn({
        let url = gw.url("/api/x?delay_ms=1000");
        async move { client().get(url).send().await.unwrap().status() }
    });
    eventually(5, "probe at upstream", || async {
        (upstream.hits() == 2).then_some(())
    })
    .await;
    let r = client().get(gw.url("/api/x")).send().await.unwrap();
    assert_eq!(
        r.status(),
        503,
        "a second request waits for the probe's verdict"
    );
    assert_eq!(probe.await.unwrap(), 201);
    assert_eq!(
        client()
            .get(gw.url("/api/x"))
            .send()
            .await
            .unwrap()
            .status(),
        201
    );
}

#[tokio::test]
async fn safe_requests_are_retried_and_unsafe_ones_are_not() {
    let upstream = Upstream::start().await;
    let (_db, gw) = gateway(
        &upstream,
        "retry = { attempts = 2, backoff_ms = 10 }\nbreaker = { enabled = false }",
    )
    .await;
    let r = client()
        .get(gw.url("/api/x?status=503"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(upstream.hits(), 3, "GET: first attempt and two retries");
    let r = client()
        .post(gw.url("/api/x?status=503"))
        .body("a")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(
        upstream.hits(),
        4,
        "POST without an idempotency key is never retried"
    );
}

#[tokio::test]
async fn posts_with_an_idempotency_key_are_retried_with_the_same_upstream_key() {
    let upstream = Upstream::start().await;
    let (_db, gw) = gateway(
        &upstream,
        "retry = { attempts = 2, backoff_ms = 10 }\nbreaker = { enabled = false }\nidempotency = { required = true }",
    )
    .await;
    let r = client()
        .post(gw.url("/api/x?status=502"))
        .header("Idempotency-Key", "\"r1\"")
        .body("a")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let seen = upstream.seen();
    assert_eq!(seen.len(), 3);
    assert!(
        seen.iter()
            .all(|s| s.headers["idempotency-key"] == seen[0].headers["idempotency-key"])
    );
}

#[tokio::test]
async fn retry_after_from_upstream_is_honoured_or_passed_back() {
    let upstream = Upstream::start().await;
    let (_db, gw) = gateway(
        &upstream,
        "retry = { attempts = 1, backoff_ms = 10, max_backoff_ms = 1200 }\nbreaker = { enabled = false }",
    )
    .await;
    let started = std::time::Instant::now();
    let r = client()
        .get(gw.url("/api/x?status=503&retry_after=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(upstream.hits(), 2);
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "waited the upstream's Retry-After"
    );
    // A Retry-After beyond max_backoff is not waited for: the answer goes back at once.
    let r = client()
        .get(gw.url("/api/x?status=503&retry_after=60"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "60");
    assert_eq!(upstream.hits(), 3);
}

#[tokio::test]
async fn rate_limit_per_caller_answers_429() {
    let upstream = Upstream::start().await;
    let db = fresh_db().await;
    let toml = format!(
        "{}
[[callers]]
id = \"a\"
token = \"token-of-a\"
[[callers]]
id = \"b\"
token = \"token-of-b\"
[[routes]]
prefix = \"/api\"
upstream = \"{}\"
rate_limit = {{ per_sec = 1, burst = 2 }}
",
        header_lines(&db.url),
        upstream.url()
    );
    let gw = start_gateway(&toml).await;
    let send = |token: &'static str| client().get(gw.url("/api/x")).bearer_auth(token).send();
    assert_eq!(send("token-of-a").await.unwrap().status(), 201);
    assert_eq!(send("token-of-a").await.unwrap().status(), 201);
    let r = send("token-of-a").await.unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(
        send("token-of-b").await.unwrap().status(),
        201,
        "callers have their own bucket"
    );
    assert_eq!(upstream.hits(), 3);
}

#[tokio::test]
async fn concurrency_limit_sheds_excess_with_503() {
    let upstream = Upstream::start().await;
    let (_db, gw) = gateway(&upstream, "max_concurrency = 2").await;
    let mut slow = Vec::new();
    for _ in 0..2 {
        let url = gw.url("/api/x?delay_ms=1000");
        slow.push(tokio::spawn(async move {
            client().get(url).send().await.unwrap().status()
        }));
    }
    eventually(5, "two requests at upstream", || async {
        (upstream.hits() == 2).then_some(())
    })
    .await;
    let r = client().get(gw.url("/api/x")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let doc: serde_json::Value = r.json().await.unwrap();
    assert_eq!(doc["type"], "urn:problem:gateway:concurrency-limited");
    for s in slow {
        assert_eq!(s.await.unwrap(), 201);
    }
}

#[tokio::test]
async fn unreachable_upstream_is_502_problem() {
    let db = fresh_db().await;
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let toml = format!(
        "{}[[routes]]\nprefix = \"/api\"\nupstream = \"http://127.0.0.1:{port}\"\n",
        header_lines(&db.url)
    );
    let gw = start_gateway(&toml).await;
    let r = client().get(gw.url("/api/x")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
}
