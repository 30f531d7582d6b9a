//! Malformed requests sent as raw bytes (truncated bodies, huge and duplicated headers,
//! non-ASCII keys) and secrets: each gets a clear 4xx problem, the upstream is never reached,
//! and no configured secret shows in an answer or in the logs.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Upstream, header_lines, start_gateway};
use integration_tests::fresh_db;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CALLER_TOKEN: &str = "caller-token-hunter2";
const UPSTREAM_SECRET: &str = "provider-api-key-hunter3";

fn config(db_url: &str, upstream: &Upstream) -> String {
    format!(
        "{}max_body_bytes = 1024
[[callers]]
id = \"shop\"
token = \"{CALLER_TOKEN}\"

[[routes]]
prefix = \"/pay\"
upstream = \"{}\"
idempotency = {{ required = true, ttl_secs = 60 }}
set_headers = {{ \"X-Api-Key\" = \"{UPSTREAM_SECRET}\" }}
",
        header_lines(db_url),
        upstream.url()
    )
}

/// Sends raw bytes (half-closing after them when asked) and returns the raw answer.
async fn raw(addr: std::net::SocketAddr, request: &[u8], half_close: bool) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    if half_close {
        s.shutdown().await.unwrap();
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn post(headers: &[u8], body: &[u8], content_length: usize) -> Vec<u8> {
    let mut req = format!(
        "POST /pay/x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nContent-Length: {content_length}\r\n\
         Authorization: Bearer {CALLER_TOKEN}\r\n"
    )
    .into_bytes();
    req.extend_from_slice(headers);
    req.extend_from_slice(b"\r\n");
    req.extend_from_slice(body);
    req
}

fn status(answer: &str) -> u16 {
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {answer:?}"))
}

#[tokio::test]
async fn malformed_requests_are_refused_before_the_upstream() {
    let upstream = Upstream::start().await;
    let db = fresh_db().await;
    let gw = start_gateway(&config(&db.url, &upstream)).await;
    let key = b"Idempotency-Key: \"k-1\"\r\n";

    let truncated = raw(gw.addr, &post(key, b"{\"amount\":", 100), true).await;
    assert!(
        (400..500).contains(&status(&truncated)),
        "truncated body: {truncated}"
    );

    let mut huge = key.to_vec();
    huge.extend_from_slice(format!("X-Filler: {}\r\n", "a".repeat(512 * 1024)).as_bytes());
    let answer = raw(gw.addr, &post(&huge, b"{}", 2), false).await;
    assert_eq!(status(&answer), 431, "huge header: {answer}");

    let twice = b"Idempotency-Key: \"k-2\"\r\nIdempotency-Key: \"k-3\"\r\n";
    let answer = raw(gw.addr, &post(twice, b"{}", 2), false).await;
    assert_eq!(status(&answer), 400, "two keys: {answer}");
    assert!(answer.contains("application/problem+json"), "{answer}");

    let non_ascii = b"Idempotency-Key: \"k-\xff\xfe\"\r\n";
    let answer = raw(gw.addr, &post(non_ascii, b"{}", 2), false).await;
    assert_eq!(status(&answer), 400, "non-ASCII key: {answer}");

    let mut invalid_utf8_body = b"{\"note\":\"".to_vec();
    invalid_utf8_body.extend_from_slice(&[0xff, 0xfe]);
    invalid_utf8_body.extend_from_slice(b"\"}");
    // The gateway forwards bytes, it does not judge payloads: an opaque body is proxied as is,
    // byte for byte, once.
    let answer = raw(
        gw.addr,
        &post(
            b"Idempotency-Key: \"k-4\"\r\n",
            &invalid_utf8_body,
            invalid_utf8_body.len(),
        ),
        false,
    )
    .await;
    assert!(status(&answer) < 500, "{answer}");
    assert_eq!(
        upstream.hits(),
        1,
        "only the well-formed request reached the upstream"
    );

    let wrong_token = raw(
        gw.addr,
        b"POST /pay/x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nContent-Length: 2\r\n\
          Authorization: Bearer not-the-token\r\nIdempotency-Key: \"k-5\"\r\n\r\n{}",
        false,
    )
    .await;
    assert_eq!(status(&wrong_token), 401, "{wrong_token}");
    for answer in [&truncated, &wrong_token] {
        assert!(!answer.contains(CALLER_TOKEN) && !answer.contains(UPSTREAM_SECRET));
    }
    // The caller's token was not forwarded; the configured upstream credential was.
    let seen = &upstream.seen()[0];
    assert!(
        !seen
            .headers
            .values()
            .any(|v| String::from_utf8_lossy(v.as_bytes()).contains(CALLER_TOKEN))
    );
    assert_eq!(seen.headers["x-api-key"], UPSTREAM_SECRET);
}

#[tokio::test]
async fn secrets_never_appear_in_the_logs() {
    let upstream = Upstream::start().await;
    let db = fresh_db().await;
    // Trust authentication ignores the password, so it can be a marker.
    let db_url = db.url.replacen("postgres@", "postgres:db-pass-hunter4@", 1);
    let dir = std::env::temp_dir().join(integration_tests::unique_name("gwlogs"));
    std::fs::create_dir_all(&dir).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let toml = config(&db_url, &upstream).replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    let file = dir.join("gateway.toml");
    std::fs::write(&file, toml).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["--config", file.to_str().unwrap()])
        .env("RUST_LOG", "trace")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let client = common::client();
    let base = format!("http://127.0.0.1:{port}");
    common::eventually(30, "gateway healthy", || {
        let client = client.clone();
        let base = base.clone();
        async move { client.get(format!("{base}/healthz")).send().await.ok() }
    })
    .await;
    for token in [CALLER_TOKEN, "not-the-token"] {
        let _ = client
            .post(format!("{base}/pay/x"))
            .bearer_auth(token)
            .header("Idempotency-Key", "\"k-log\"")
            .body("{}")
            .send()
            .await
            .unwrap();
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.try_wait();
    let out = child.wait_with_output().unwrap();
    let logs =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(!logs.is_empty(), "trace logging produced nothing");
    for secret in [
        CALLER_TOKEN,
        UPSTREAM_SECRET,
        "db-pass-hunter4",
        "not-the-token",
    ] {
        assert!(!logs.contains(secret), "{secret} appears in the logs");
    }
    std::fs::remove_dir_all(dir).ok();
}
