//! A receiver checks signatures with nothing but the documented algorithm (HMAC-SHA256 over
//! `{Webhook-Id}.{Webhook-Timestamp}.{body}`, keyed with the secret's UTF-8 bytes, base64, in
//! `Webhook-Signature` as space-separated `v1,<mac>` entries); this file deliberately does not
//! use the notifier's own signer.

mod common;

use std::time::Duration;

use axum::http::HeaderMap;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::*;
use hmac::{Hmac, Mac};
use integration_tests::fresh_db;
use sha2::Sha256;

/// The README's verification, written out independently.
fn verify(secret: &str, headers: &HeaderMap, body: &[u8]) -> bool {
    let get = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("");
    let (id, ts, sigs) = (
        get("webhook-id"),
        get("webhook-timestamp"),
        get("webhook-signature"),
    );
    let Ok(ts_num) = ts.parse::<i64>() else {
        return false;
    };
    if (chrono::Utc::now().timestamp() - ts_num).abs() > 300 {
        return false;
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(body);
    let expected = STANDARD.encode(mac.finalize().into_bytes());
    sigs.split(' ')
        .any(|s| s.strip_prefix("v1,") == Some(expected.as_str()))
}

#[tokio::test]
async fn receiver_verifies_the_signature_and_a_tampered_request_fails() {
    let db = fresh_db().await;
    let rx = Receiver::start(vec![], Answer::status(200)).await;
    endpoint(&db.pool, "partner", &rx.url(), SECRET, None).await;
    let id = send_json(
        &db.pool,
        "partner",
        serde_json::json!({"order": 42, "amount": "10.00"}),
    )
    .await;
    let worker = RunningWorker::start(&db.pool, worker_config(1.0));
    wait_status(&db.pool, id, "delivered", Duration::from_secs(10)).await;
    worker.stop().await;

    let req = rx.seen_for(id).pop().unwrap();
    assert_eq!(req.header("webhook-id"), id.to_string());
    assert_eq!(req.header("webhook-event"), "order.paid");
    assert_eq!(req.header("content-type"), "application/json");
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&req.body).unwrap(),
        serde_json::json!({"order": 42, "amount": "10.00"})
    );
    assert!(
        verify(SECRET, &req.headers, &req.body),
        "genuine request verifies"
    );

    let mut tampered = req.body.clone();
    tampered[2] ^= 0x01;
    assert!(
        !verify(SECRET, &req.headers, &tampered),
        "tampered body fails"
    );
    let mut other_id = req.headers.clone();
    other_id.insert("webhook-id", (id + 1).to_string().parse().unwrap());
    assert!(!verify(SECRET, &other_id, &req.body), "another id fails");
    let mut other_ts = req.headers.clone();
    let ts: i64 = req.header("webhook-timestamp").parse().unwrap();
    other_ts.insert("webhook-timestamp", (ts - 1).to_string().parse().unwrap());
    assert!(
        !verify(SECRET, &other_ts, &req.body),
        "another timestamp fails"
    );
    assert!(
        !verify("some-other-secret-000000", &req.headers, &req.body),
        "another secret fails"
    );
}

#[tokio::test]
async fn during_a_rotation_both_secrets_verify_and_afterwards_only_the_new_one() {
    let db = fresh_db().await;
    let rx = Receiver::start(vec![], Answer::status(200)).await;
    let mut spec = endpoint(
        &db.pool,
        "partner",
        &rx.url(),
        "old-secret-0123456789",
        None,
    )
    .await;
    spec.secret = "new-secret-0123456789".to_owned();
    spec.upsert(
        &mut db.pool.acquire().await.unwrap(),
        Duration::from_secs(3600),
    )
    .await
    .unwrap();
    let worker = RunningWorker::start(&db.pool, worker_config(1.0));
    let during = send_json(&db.pool, "partner", serde_json::json!({"n": 1})).await;
    wait_status(&db.pool, during, "delivered", Duration::from_secs(10)).await;
    let req = rx.seen_for(during).pop().unwrap();
    assert_eq!(req.header("webhook-signature").split(' ').count(), 2);
    assert!(verify("old-secret-0123456789", &req.headers, &req.body));
    assert!(verify("new-secret-0123456789", &req.headers, &req.body));

    // Rotate again with no overlap: the replaced secret stops signing at once.
    spec.secret = "newest-secret-0123456789".to_owned();
    spec.upsert(&mut db.pool.acquire().await.unwrap(), Duration::ZERO)
        .await
        .unwrap();
    let after = send_json(&db.pool, "partner", serde_json::json!({"n": 2})).await;
    wait_status(&db.pool, after, "delivered", Duration::from_secs(10)).await;
    worker.stop().await;
    let req = rx.seen_for(after).pop().unwrap();
    assert_eq!(req.header("webhook-signature").split(' ').count(), 1);
    assert!(verify("newest-secret-0123456789", &req.headers, &req.body));
    assert!(!verify("new-secret-0123456789", &req.headers, &req.body));
}
