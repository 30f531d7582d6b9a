//! The prepared-message HTTP API and the `outbox` crate's prepare/commit/rollback, against a real
//! PostgreSQL, with the API served on a real loopback listener.

mod prepared_support;

use integration_tests::fresh_db;
use outbox::prepared::{self, Client, Decision, PreparedError, Status};
use outbox::{Message, MessageId};
use prepared_support::{Server, count, outbox_payload, outcome};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::PgPool;

const TOKEN: &str = "test-token-0123456789";

async fn api(pool: &PgPool, token: Option<&str>) -> Server {
    Server::start(outbox_relay::prepared::api::router(
        pool.clone(),
        token.map(str::to_owned),
    ))
    .await
}

fn http() -> reqwest::Client {
    reqwest::Client::new()
}

async fn post(server: &Server, path: &str, body: Option<Value>) -> (StatusCode, String, Value) {
    let mut req = http().post(server.url(path)).bearer_auth(TOKEN);
    if let Some(body) = body {
        req = req.json(&body);
    }
    read(req.send().await.unwrap()).await
}

async fn read(resp: reqwest::Response) -> (StatusCode, String, Value) {
    let status = resp.status();
    let ct = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let text = resp.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    (status, ct, body)
}

async fn nothing_stored(pool: &PgPool) {
    assert_eq!(
        count(pool, "SELECT count(*) FROM outbox.prepared_messages").await,
        0
    );
    assert_eq!(count(pool, "SELECT count(*) FROM outbox.messages").await, 0);
}

fn assert_problem(ct: &str, body: &Value, status: StatusCode, mentions: &str) {
    assert_eq!(ct, "application/problem+json", "{body}");
    assert_eq!(body["status"], status.as_u16(), "{body}");
    let detail = body["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains(mentions),
        "detail should mention {mentions:?}: {body}"
    );
}

fn id_of(body: &Value) -> i64 {
    body["id"]
        .as_str()
        .expect("id is a decimal string")
        .parse()
        .unwrap()
}

#[tokio::test]
async fn prepared_message_is_published_only_after_commit_with_its_id() {
    let db = fresh_db().await;
    let server = api(&db.pool, Some(TOKEN)).await;

    let (status, _, body) = post(
        &server,
        "/v1/prepared",
        Some(
            json!({"exchange": "", "routing_key": "q1", "payload": "héllo",
                    "headers": {"x-tenant": "t1"}, "ordering_key": "order-1"}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id = id_of(&body);
    assert_eq!(
        outbox_payload(&db.pool, id).await,
        None,
        "not published before commit"
    );

    let (status, _, body) = post(&server, &format!("/v1/prepared/{id}/commit"), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "committed");
    assert_eq!(
        outbox_payload(&db.pool, id).await.as_deref(),
        Some("héllo".as_bytes())
    );
    let (headers, key): (Value, Option<String>) =
        sqlx::query_as("SELECT headers, ordering_key FROM outbox.messages WHERE id = $1")
            .bind(id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(headers, json!({"x-tenant": "t1"}));
    assert_eq!(key.as_deref(), Some("order-1"));
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM outbox.prepared_messages").await,
        0
    );

    // A repeated commit is answered the same and moves nothing twice.
    let (status, _, _) = post(&server, &format!("/v1/prepared/{id}/commit"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM outbox.messages").await,
        1
    );

    // Rolling back a committed message is refused and changes nothing.
    let (status, ct, body) = post(&server, &format!("/v1/prepared/{id}/rollback"), None).await;
    assert_problem(&ct, &body, StatusCode::CONFLICT, "already committed");
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(outbox_payload(&db.pool, id).await.is_some());
}

#[tokio::test]
async fn rolled_back_message_is_removed_and_a_later_commit_is_refused() {
    let db = fresh_db().await;
    let server = api(&db.pool, Some(TOKEN)).await;
    let (_, _, body) = post(
        &server,
        "/v1/prepared",
        Some(json!({"exchange": "ex", "routing_key": "rk", "payload": "x"})),
    )
    .await;
    let id = id_of(&body);

    let (status, _, body) = post(&server, &format!("/v1/prepared/{id}/rollback"), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _, _) = post(&server, &format!("/v1/prepared/{id}/rollback"), None).await;
    assert_eq!(status, StatusCode::OK, "a repeated rollback is 200");

    let (status, ct, body) = post(&server, &format!("/v1/prepared/{id}/commit"), None).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_problem(&ct, &body, StatusCode::CONFLICT, "rolled back");
    nothing_stored(&db.pool).await;
    assert_eq!(
        outcome(&db.pool, id).await,
        Some(("rolled_back".into(), "producer".into()))
    );

    let resp = http()
        .get(server.url(&format!("/v1/prepared/{id}")))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    let (status, _, body) = read(resp).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "rolled_back");
}

#[tokio::test]
async fn unknown_id_is_404_and_malformed_id_is_400() {
    let db = fresh_db().await;
    let server = api(&db.pool, Some(TOKEN)).await;
    for verb in ["commit", "rollback"] {
        let (status, ct, body) = post(&server, &format!("/v1/prepared/123456/{verb}"), None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_problem(&ct, &body, StatusCode::NOT_FOUND, "123456");
        let (status, ct, body) = post(&server, &format!("/v1/prepared/abc/{verb}"), None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_problem(&ct, &body, StatusCode::BAD_REQUEST, "abc");
    }
    nothing_stored(&db.pool).await;
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM outbox.prepared_outcomes").await,
        0
    );
}

#[tokio::test]
async fn invalid_json_is_400_and_stores_nothing() {
    let db = fresh_db().await;
    let server = api(&db.pool, Some(TOKEN)).await;
    let resp = http()
        .post(server.url("/v1/prepared"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(r#"{"exchange": "", "routing_key": "q1", "payload": "#)
        .send()
        .await
        .unwrap();
    let (status, ct, body) = read(resp).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_problem(&ct, &body, StatusCode::BAD_REQUEST, "not valid JSON");
    nothing_stored(&db.pool).await;
}

#[tokio::test]
async fn bad_fields_are_422_naming_the_field_and_store_nothing() {
    let db = fresh_db().await;
    let server = api(&db.pool, Some(TOKEN)).await;
    let cases = [
        (json!({"routing_key": "q", "payload": "x"}), "`exchange`"),
        (json!({"exchange": "", "payload": "x"}), "`routing_key`"),
        (
            json!({"exchange": 5, "routing_key": "q", "payload": "x"}),
            "`exchange` must be a string",
        ),
        (json!({"exchange": "", "routing_key": "q"}), "`payload`"),
        (
            json!({"exchange": "", "routing_key": "q", "payload": "x", "payload_base64": "eA=="}),
            "not both",
        ),
        (
            json!({"exchange": "", "routing_key": "q", "payload_base64": "***"}),
            "`payload_base64`",
        ),
        (
            json!({"exchange": "", "routing_key": "q", "payload": "x", "headers": [1]}),
            "`headers`",
        ),
        (
            json!({"exchange": "", "routing_key": "q", "payload": "x", "deliver_at": "tomorrow"}),
            "`deliver_at`",
        ),
        (
            json!({"exchange": "", "routing_key": "q", "payload": "x", "check_url": "ftp://x/y"}),
            "`check_url`",
        ),
        (
            json!({"exchange": "", "routing_key": "q", "payload": "x", "routing": "typo"}),
            "`routing`",
        ),
        // Refused by the SQL API's own validation; its message names the field.
        (
            json!({"exchange": "", "routing_key": "", "payload": "x"}),
            "routing_key",
        ),
        (
            json!({"exchange": "", "routing_key": "q", "payload": "x", "ordering_key": ""}),
            "ordering_key",
        ),
        (json!(["not", "an", "object"]), "JSON object"),
    ];
    for (body, mentions) in cases {
        let (status, ct, answer) = post(&server, "/v1/prepared", Some(body.clone())).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{body} -> {answer}"
        );
        assert_problem(&ct, &answer, StatusCode::UNPROCESSABLE_ENTITY, mentions);
    }
    nothing_stored(&db.pool).await;
}

#[tokio::test]
async fn oversized_payload_or_body_is_413_and_stores_nothing() {
    let db = fresh_db().await;
    let server = api(&db.pool, Some(TOKEN)).await;
    // Over the 4 MiB payload limit but under the body limit.
    let payload = "a".repeat(4 * 1024 * 1024 + 1);
    let (status, ct, body) = post(
        &server,
        "/v1/prepared",
        Some(json!({"exchange": "", "routing_key": "q", "payload": payload})),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_problem(&ct, &body, StatusCode::PAYLOAD_TOO_LARGE, "`payload`");
    // Over the body limit.
    let payload = "a".repeat(outbox_relay::prepared::api::MAX_BODY_BYTES + 1);
    let (status, ct, body) = post(
        &server,
        "/v1/prepared",
        Some(json!({"exchange": "", "routing_key": "q", "payload": payload})),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_problem(&ct, &body, StatusCode::PAYLOAD_TOO_LARGE, "body");
    nothing_stored(&db.pool).await;
}

#[tokio::test]
async fn missing_or_wrong_token_is_401_and_stores_nothing() {
    let db = fresh_db().await;
    let server = api(&db.pool, Some(TOKEN)).await;
    let body = json!({"exchange": "", "routing_key": "q", "payload": "x"});
    for auth in [None, Some("wrong-token-0123456789"), Some("")] {
        let mut req = http().post(server.url("/v1/prepared")).json(&body);
        if let Some(t) = auth {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        assert!(resp.headers().contains_key("www-authenticate"));
        let (status, ct, answer) = read(resp).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{auth:?}");
        assert_problem(&ct, &answer, StatusCode::UNAUTHORIZED, "token");
    }
    let resp = http()
        .post(server.url("/v1/prepared/1/commit"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    nothing_stored(&db.pool).await;

    // Without a configured token the API is open.
    let open = api(&db.pool, None).await;
    let resp = http()
        .post(open.url("/v1/prepared"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn base64_payload_and_deliver_at_are_kept_through_commit() {
    let db = fresh_db().await;
    let server = api(&db.pool, Some(TOKEN)).await;
    let (status, _, body) = post(
        &server,
        "/v1/prepared",
        Some(
            json!({"exchange": "", "routing_key": "q", "payload_base64": "AP+A",
                    "content_type": "application/octet-stream",
                    "deliver_at": "2099-01-01T00:00:00+01:00"}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id = id_of(&body);
    let (status, _, _) = post(&server, &format!("/v1/prepared/{id}/commit"), None).await;
    assert_eq!(status, StatusCode::OK);
    let (payload, ct, due): (Vec<u8>, Option<String>, String) = sqlx::query_as(
        "SELECT payload, content_type, to_char(available_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI') \
         FROM outbox.messages WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(payload, vec![0x00, 0xff, 0x80]);
    assert_eq!(ct.as_deref(), Some("application/octet-stream"));
    assert_eq!(due, "2098-12-31 23:00");
}

#[tokio::test]
async fn http_client_prepares_commits_and_reports_conflicts() {
    let db = fresh_db().await;
    let server = api(&db.pool, Some(TOKEN)).await;
    let client = Client::new(&server.url("")).unwrap().with_token(TOKEN);

    let msg = Message::new("", "q", vec![1u8, 2, 3]).with_header("h", "v");
    let p = client
        .prepare(&msg, Some("http://127.0.0.1:1/check"))
        .await
        .unwrap();
    assert_eq!(p.status().await.unwrap(), Status::Pending);
    p.commit().await.unwrap();
    p.commit().await.unwrap();
    assert_eq!(p.status().await.unwrap(), Status::Committed);
    assert_eq!(
        outbox_payload(&db.pool, p.id().0).await,
        Some(vec![1, 2, 3])
    );
    match p.rollback().await {
        Err(PreparedError::Conflict { decided, .. }) => assert_eq!(decided, Decision::Committed),
        other => panic!("expected a conflict, got {other:?}"),
    }

    let q = client.prepare(&msg, None).await.unwrap();
    q.rollback().await.unwrap();
    assert!(matches!(
        q.commit().await,
        Err(PreparedError::Conflict {
            decided: Decision::RolledBack,
            ..
        })
    ));
    assert!(matches!(
        client.commit(MessageId(42)).await,
        Err(PreparedError::NotFound(MessageId(42)))
    ));
    let bad = Message::new("", "", b"x".to_vec());
    assert!(matches!(
        client.prepare(&bad, None).await,
        Err(PreparedError::Invalid(m)) if m.contains("routing_key")
    ));
    let unauthenticated = Client::new(&server.url("")).unwrap();
    assert!(matches!(
        unauthenticated.prepare(&msg, None).await,
        Err(PreparedError::Api { status: 401, .. })
    ));
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM outbox.messages").await,
        1
    );
}

#[tokio::test]
async fn in_database_commit_follows_the_callers_transaction() {
    let db = fresh_db().await;
    let msg = Message::new("", "q", b"payload".to_vec());
    let p = prepared::prepare(&db.pool, &msg, None).await.unwrap();

    // A commit inside a transaction that rolls back leaves the message prepared.
    let mut tx = db.pool.begin().await.unwrap();
    p.commit(&mut *tx).await.unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(p.status(&db.pool).await.unwrap(), Status::Pending);
    assert_eq!(outbox_payload(&db.pool, p.id().0).await, None);

    let mut tx = db.pool.begin().await.unwrap();
    p.commit(&mut *tx).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        outbox_payload(&db.pool, p.id().0).await.as_deref(),
        Some(&b"payload"[..])
    );
    assert!(matches!(
        p.rollback(&db.pool).await,
        Err(PreparedError::Conflict { .. })
    ));

    let with_dedupe = msg.clone().with_dedupe_key("k");
    assert!(matches!(
        prepared::prepare(&db.pool, &with_dedupe, None).await,
        Err(PreparedError::Invalid(m)) if m.contains("dedupe_key")
    ));
    let too_big = Message::new("", "q", vec![0u8; 4 * 1024 * 1024 + 1]);
    assert!(matches!(
        prepared::prepare(&db.pool, &too_big, None).await,
        Err(PreparedError::TooLarge(m)) if m.contains("payload")
    ));
}
