//! The query API over real HTTP: status and attempts, reconciliation lists, re-send, bearer
//! tokens scoped to endpoints, and problem+json answers to bad requests.

mod common;

use std::time::Duration;

use common::*;
use integration_tests::fresh_db;
use notifier::config::ApiToken;
use serde_json::Value;

const ADMIN: &str = "admin-token-0123456789";
const OTHER: &str = "other-partner-token-0123";

async fn serve_api(pool: &sqlx::PgPool) -> String {
    let app = notifier::api::router(
        pool.clone(),
        vec![
            ApiToken {
                token: ADMIN.to_owned(),
                endpoints: None,
            },
            ApiToken {
                token: OTHER.to_owned(),
                endpoints: Some(vec!["other".to_owned()]),
            },
        ],
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    base
}

async fn call(method: reqwest::Method, url: &str, token: Option<&str>) -> (u16, String, Value) {
    let mut req = reqwest::Client::new().request(method, url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let ctype = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = resp.text().await.unwrap();
    (
        status,
        ctype,
        serde_json::from_str(&body).unwrap_or(Value::Null),
    )
}

async fn get(url: &str, token: Option<&str>) -> (u16, String, Value) {
    call(reqwest::Method::GET, url, token).await
}

#[tokio::test]
async fn query_api_shows_status_and_attempts_lists_by_time_and_resends() {
    let db = fresh_db().await;
    let rx = Receiver::failing(1).await;
    endpoint(&db.pool, "partner", &rx.url(), SECRET, Some("10ms")).await;
    endpoint(&db.pool, "other", &rx.url(), SECRET, Some("10ms")).await;
    let before = chrono::Utc::now() - chrono::Duration::seconds(1);
    let id = send_json(&db.pool, "partner", serde_json::json!({"order": 7})).await;
    let worker = RunningWorker::start(&db.pool, worker_config(1.0));
    wait_status(&db.pool, id, "delivered", Duration::from_secs(10)).await;
    let base = serve_api(&db.pool).await;

    let (status, ctype, v) = get(&format!("{base}/v1/notifications/{id}"), Some(ADMIN)).await;
    assert_eq!((status, ctype.as_str()), (200, "application/json"));
    assert_eq!(v["id"], id.to_string());
    assert_eq!(v["status"], "delivered");
    assert_eq!(v["endpoint"], "partner");
    assert_eq!(v["event_type"], "order.paid");
    assert_eq!(v["attempts"], 2);
    assert_eq!(v["body"], serde_json::json!({"order": 7}));
    let log = v["attempt_log"].as_array().unwrap();
    assert_eq!(log.len(), 2);
    assert_eq!(log[0]["http_status"], 500);
    assert_eq!(log[0]["succeeded"], false);
    assert_eq!(log[0]["error"], "HTTP 500");
    assert_eq!(log[1]["http_status"], 200);
    assert_eq!(log[1]["succeeded"], true);
    assert!(log[1]["latency_ms"].as_i64().unwrap() >= 0);

    // Reconciliation: by endpoint and time window, paged.
    let id2 = send_json(&db.pool, "partner", serde_json::json!({"order": 8})).await;
    let id3 = send_json(&db.pool, "partner", serde_json::json!({"order": 9})).await;
    send_json(&db.pool, "other", serde_json::json!({"order": 10})).await;
    let since = before.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let until = (chrono::Utc::now() + chrono::Duration::seconds(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let (status, _, page1) = get(
        &format!("{base}/v1/notifications?endpoint=partner&since={since}&until={until}&limit=2"),
        Some(ADMIN),
    )
    .await;
    assert_eq!(status, 200);
    let ids1: Vec<&str> = page1["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids1, [id.to_string(), id2.to_string()]);
    let cursor = page1["next_cursor"].as_str().unwrap();
    let (_, _, page2) = get(
        &format!("{base}/v1/notifications?endpoint=partner&since={since}&until={until}&limit=2&after={cursor}"),
        Some(ADMIN),
    )
    .await;
    let ids2: Vec<&str> = page2["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids2, [id3.to_string()]);
    assert!(page2["next_cursor"].is_null());
    let (_, _, empty) = get(
        &format!("{base}/v1/notifications?endpoint=partner&since={until}"),
        Some(ADMIN),
    )
    .await;
    assert_eq!(empty["data"].as_array().unwrap().len(), 0);

    // A scoped token sees its own endpoint only, and lists it without naming it.
    let (status, _, v) = get(&format!("{base}/v1/notifications"), Some(OTHER)).await;
    assert_eq!(status, 200);
    assert_eq!(v["data"].as_array().unwrap().len(), 1);
    assert_eq!(v["data"][0]["endpoint"], "other");
    let (status, ctype, _) = get(&format!("{base}/v1/notifications/{id}"), Some(OTHER)).await;
    assert_eq!((status, ctype.as_str()), (404, "application/problem+json"));

    // Re-send: back to pending on a fresh schedule, delivered again.
    let seen_before = rx.seen_for(id).len();
    let (status, _, v) = call(
        reqwest::Method::POST,
        &format!("{base}/v1/notifications/{id}/resend"),
        Some(ADMIN),
    )
    .await;
    assert_eq!(status, 202);
    assert_eq!(v["status"], "pending");
    wait_status(&db.pool, id, "delivered", Duration::from_secs(10)).await;
    assert_eq!(rx.seen_for(id).len(), seen_before + 1);
    let (_, _, v) = get(&format!("{base}/v1/notifications/{id}"), Some(ADMIN)).await;
    assert_eq!(v["attempts"], 3);
    assert_eq!(v["attempt_log"].as_array().unwrap().len(), 3);
    worker.stop().await;
}

#[tokio::test]
async fn bad_requests_get_a_problem_naming_what_is_wrong() {
    let db = fresh_db().await;
    let base = serve_api(&db.pool).await;
    let problem = |v: &Value, needle: &str| {
        let detail = v["detail"].as_str().unwrap_or_default();
        assert!(detail.contains(needle), "{needle:?} not in {v}");
    };

    let (status, ctype, v) = get(&format!("{base}/v1/notifications/1"), None).await;
    assert_eq!((status, ctype.as_str()), (401, "application/problem+json"));
    assert_eq!(v["status"], 401);
    let (status, _, _) = get(
        &format!("{base}/v1/notifications/1"),
        Some("not-a-token-at-all"),
    )
    .await;
    assert_eq!(status, 401);

    let (status, ctype, v) = get(&format!("{base}/v1/notifications/abc"), Some(ADMIN)).await;
    assert_eq!((status, ctype.as_str()), (400, "application/problem+json"));
    problem(&v, "id");
    let (status, _, _) = get(&format!("{base}/v1/notifications/12345"), Some(ADMIN)).await;
    assert_eq!(status, 404);

    for (query, field) in [
        ("endpoint=a&since=2026-01-01", "since"),
        ("endpoint=a&since=yesterday", "since"),
        ("endpoint=a&until=2026-13-01T00:00:00Z", "until"),
        (
            "endpoint=a&since=2026-02-01T00:00:00Z&until=2026-01-01T00:00:00Z",
            "until",
        ),
        ("endpoint=a&limit=0", "limit"),
        ("endpoint=a&limit=many", "limit"),
        ("endpoint=a&status=lost", "status"),
        ("endpoint=a&after=xyz", "after"),
        ("endpoint=a&colour=red", "colour"),
        ("", "endpoint"),
    ] {
        let (status, ctype, v) =
            get(&format!("{base}/v1/notifications?{query}"), Some(ADMIN)).await;
        assert_eq!(
            (status, ctype.as_str()),
            (400, "application/problem+json"),
            "{query}"
        );
        problem(&v, field);
    }

    let (status, _, _) = call(
        reqwest::Method::POST,
        &format!("{base}/v1/notifications/12345/resend"),
        Some(ADMIN),
    )
    .await;
    assert_eq!(status, 404);
    let (status, ctype, _) = get(&format!("{base}/v1/notifications/1/resend"), Some(ADMIN)).await;
    assert_eq!((status, ctype.as_str()), (405, "application/problem+json"));
    let (status, ctype, _) = get(&format!("{base}/v2/elsewhere"), Some(ADMIN)).await;
    assert_eq!((status, ctype.as_str()), (404, "application/problem+json"));
}
