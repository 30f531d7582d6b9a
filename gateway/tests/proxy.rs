//! The reverse proxy itself: routing, the no-open-proxy rules, headers and the body limit.

mod common;

use common::{Upstream, client, header_lines, start_gateway};
use integration_tests::fresh_db;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn gateway_for(upstream: &Upstream) -> (integration_tests::TestDb, common::TestGateway) {
    let db = fresh_db().await;
    let toml = format!(
        "{}max_body_bytes = 1024
[[routes]]
prefix = \"/pay\"
upstream = \"{}/v1\"
set_headers = {{ \"X-Api-Key\" = \"provider-secret\" }}
",
        header_lines(&db.url),
        upstream.url()
    );
    let gw = start_gateway(&toml).await;
    (db, gw)
}

#[tokio::test]
async fn prefix_is_replaced_by_the_upstream_base_path() {
    let upstream = Upstream::start().await;
    let (_db, gw) = gateway_for(&upstream).await;
    let r = client().get(gw.url("/pay/x?a=1")).send().await.unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(upstream.seen()[0].uri, "/v1/x?a=1");
    assert_eq!(upstream.seen()[0].headers["x-api-key"], "provider-secret");
}

#[tokio::test]
async fn traceparent_is_forwarded_unchanged_when_spans_are_not_exported() {
    let upstream = Upstream::start().await;
    let (_db, gw) = gateway_for(&upstream).await;
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = client()
        .get(gw.url("/pay/x"))
        .header("traceparent", tp)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(upstream.seen()[0].headers["traceparent"], tp);
}

#[tokio::test]
async fn unknown_path_is_404_problem_and_upstream_untouched() {
    let upstream = Upstream::start().await;
    let (_db, gw) = gateway_for(&upstream).await;
    for path in ["/nothing", "/payment", "/", "/pa"] {
        let r = client().post(gw.url(path)).body("x").send().await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
        assert_eq!(r.headers()["content-type"], "application/problem+json");
    }
    assert_eq!(upstream.hits(), 0);
}

#[tokio::test]
async fn oversized_body_is_413_and_not_forwarded() {
    let upstream = Upstream::start().await;
    let (_db, gw) = gateway_for(&upstream).await;
    let r = client()
        .post(gw.url("/pay/x"))
        .body(vec![b'a'; 2048])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    // A chunked body without Content-Length is cut off at the limit too.
    let chunk = format!("200\r\n{}\r\n", "b".repeat(512));
    let answer = raw(
        gw.addr,
        &format!(
            "POST /pay/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{}0\r\n\r\n",
            chunk.repeat(4)
        ),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert_eq!(upstream.hits(), 0);
    let r = client()
        .post(gw.url("/pay/x"))
        .body(vec![b'a'; 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "exactly the limit is accepted");
}

/// Sends raw bytes and returns the raw answer.
async fn raw(addr: std::net::SocketAddr, request: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn absolute_form_target_and_host_header_cannot_reach_another_host() {
    let upstream = Upstream::start().await;
    let decoy = Upstream::start().await;
    let (_db, gw) = gateway_for(&upstream).await;
    let answer = raw(
        gw.addr,
        &format!(
            "GET http://{}/pay/x HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            decoy.addr, decoy.addr
        ),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    let answer = raw(
        gw.addr,
        &format!(
            "GET http://{}/elsewhere HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            decoy.addr, decoy.addr
        ),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    let answer = raw(
        gw.addr,
        &format!(
            "CONNECT {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            decoy.addr, decoy.addr
        ),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    assert_eq!(decoy.hits(), 0, "the decoy host was never contacted");
    assert_eq!(upstream.hits(), 1);
    assert_eq!(upstream.seen()[0].uri, "/v1/x");
    assert_eq!(
        upstream.seen()[0].headers["host"],
        upstream.addr.to_string()
    );
}

#[tokio::test]
async fn dot_segments_are_refused() {
    let upstream = Upstream::start().await;
    let (_db, gw) = gateway_for(&upstream).await;
    let answer = raw(
        gw.addr,
        "GET /pay/../admin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(upstream.hits(), 0);
}

#[tokio::test]
async fn redirects_are_passed_back_not_followed() {
    let upstream = Upstream::start().await;
    let db = fresh_db().await;
    // The test upstream redirects at /redirect: point a route at its root.
    let toml = format!(
        "{}[[routes]]\nprefix = \"/r\"\nupstream = \"{}\"\n",
        header_lines(&db.url),
        upstream.url()
    );
    let gw = start_gateway(&toml).await;
    let r = client().get(gw.url("/r/redirect")).send().await.unwrap();
    assert_eq!(r.status(), 302);
    assert_eq!(r.headers()["location"], "http://127.0.0.1:1/elsewhere");
    assert_eq!(upstream.hits(), 1);
}

#[tokio::test]
async fn hop_by_hop_headers_are_stripped_and_request_id_propagated() {
    let upstream = Upstream::start().await;
    let (_db, gw) = gateway_for(&upstream).await;
    let r = client()
        .get(gw.url("/pay/x"))
        .header("Connection", "x-private")
        .header("X-Private", "1")
        .header("Proxy-Authorization", "Basic eDp5")
        .header("X-Request-Id", "req-123")
        .header("Authorization", "Bearer internal")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "req-123");
    let seen = &upstream.seen()[0].headers;
    assert!(seen.get("x-private").is_none());
    assert!(seen.get("proxy-authorization").is_none());
    assert!(
        seen.get("authorization").is_none(),
        "credentials stay inside"
    );
    assert_eq!(seen["x-request-id"], "req-123");
    // Without one, a request id is generated and sent both ways.
    let r = client().get(gw.url("/pay/y")).send().await.unwrap();
    let id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(id.len(), 36);
    assert_eq!(upstream.seen()[1].headers["x-request-id"], id.as_str());
}

#[tokio::test]
async fn health_readiness_and_metrics_are_served() {
    let upstream = Upstream::start().await;
    let (_db, gw) = gateway_for(&upstream).await;
    client().get(gw.url("/pay/x")).send().await.unwrap();
    assert_eq!(
        client()
            .get(gw.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        client()
            .get(gw.url("/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let text = client()
        .get(gw.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("gateway_requests_total"), "{text}");
    assert!(
        text.contains("gateway_request_duration_seconds_bucket"),
        "{text}"
    );
}

#[tokio::test]
async fn body_that_trickles_past_the_route_timeout_is_408() {
    let upstream = Upstream::start().await;
    let db = fresh_db().await;
    let toml = format!(
        "{}[[routes]]\nprefix = \"/pay\"\nupstream = \"{}\"\ntimeout_ms = 500\n",
        header_lines(&db.url),
        upstream.url()
    );
    let gw = start_gateway(&toml).await;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"POST /pay/x HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab")
        .await
        .unwrap();
    let mut out = vec![0; 1024];
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut out))
        .await
        .expect("answered while the body is still incomplete")
        .unwrap();
    let answer = String::from_utf8_lossy(&out[..n]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert_eq!(upstream.hits(), 0);
}
