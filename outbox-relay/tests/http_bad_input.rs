//! The relay's HTTP server against malformed requests, sent as raw bytes: invalid UTF-8,
//! huge and duplicated headers, truncated bodies. Each gets a clear 4xx and nothing is stored.

use std::sync::Arc;
use std::time::Duration;

use integration_tests::{TestDb, fresh_db};
use outbox_relay::http;
use outbox_relay::relay::Health;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "test-token-0123456789";

async fn serve(db: &TestDb) -> (std::net::SocketAddr, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let api = outbox_relay::prepared::api::router(db.pool.clone(), Some(TOKEN.to_owned()));
    let router = http::router(db.pool.clone(), Arc::new(Health::default()), None, api);
    let shutdown = CancellationToken::new();
    tokio::spawn(http::serve(listener, router, shutdown.clone()));
    (addr, shutdown)
}

/// Sends `request` as is (optionally half-closing after it) and returns the status code.
async fn raw(addr: std::net::SocketAddr, request: &[u8], close_after: bool) -> u16 {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    if close_after {
        stream.shutdown().await.unwrap();
    }
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    let status = text
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("no HTTP response: {text:?}"));
    status.parse().unwrap()
}

fn post(body: &[u8], extra_headers: &str, content_length: usize) -> Vec<u8> {
    let mut req = format!(
        "POST /v1/prepared HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {content_length}\r\n{extra_headers}\r\n"
    )
    .into_bytes();
    req.extend_from_slice(body);
    req
}

async fn stored(db: &TestDb) -> i64 {
    sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM outbox.prepared_messages) + (SELECT count(*) FROM outbox.messages)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn malformed_requests_get_a_4xx_and_store_nothing() {
    let db = fresh_db().await;
    let (addr, shutdown) = serve(&db).await;
    let auth = format!("Authorization: Bearer {TOKEN}\r\n");

    // Invalid UTF-8 inside a JSON string.
    let mut body = br#"{"exchange":"","routing_key":"q","payload":""#.to_vec();
    body.extend_from_slice(&[0xff, 0xfe, 0xfd]);
    body.extend_from_slice(br#""}"#);
    let status = raw(addr, &post(&body, &auth, body.len()), false).await;
    assert_eq!(status, 400, "invalid UTF-8");

    // A truncated body: Content-Length promises more than arrives before the client closes.
    let body = br#"{"exchange":"","routing_key":"q","payload":"hello"}"#;
    let status = raw(addr, &post(&body[..20], &auth, body.len()), true).await;
    assert_eq!(status, 400, "truncated body");

    // A huge header.
    let huge = format!("X-Filler: {}\r\n", "a".repeat(512 * 1024));
    let status = raw(
        addr,
        &post(body, &(auth.clone() + &huge), body.len()),
        false,
    )
    .await;
    assert_eq!(status, 431, "huge header");

    // Two Authorization headers, one valid: ambiguous credentials are refused.
    let twice = format!("{auth}Authorization: Bearer something-else\r\n");
    let status = raw(addr, &post(body, &twice, body.len()), false).await;
    assert_eq!(status, 401, "duplicated Authorization");

    // No token at all.
    let status = raw(addr, &post(body, "", body.len()), false).await;
    assert_eq!(status, 401, "missing token");

    // Not JSON at all, and JSON of the wrong shape.
    let status = raw(addr, &post(b"exchange=x", &auth, 10), false).await;
    assert_eq!(status, 400, "not JSON");
    let wrong = br#"{"exchange":5,"routing_key":"q","payload":"x"}"#;
    let status = raw(addr, &post(wrong, &auth, wrong.len()), false).await;
    assert_eq!(status, 422, "wrong type");

    assert_eq!(stored(&db).await, 0, "nothing may be stored");

    // The same request, well formed, is accepted: the rejections above were about the input.
    let status = raw(addr, &post(body, &auth, body.len()), false).await;
    assert_eq!(status, 201);
    assert_eq!(stored(&db).await, 1);
    shutdown.cancel();
}
