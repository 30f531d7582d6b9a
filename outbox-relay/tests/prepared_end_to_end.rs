//! Prepared messages through the whole relay: the HTTP API, check-back and the relay's publish
//! loop, in-process, against real PostgreSQL and RabbitMQ.

mod prepared_support;

use std::sync::Arc;

use axum::Router;
use axum::routing::get;
use integration_tests::{TestDb, TestQueue, fresh_db};
use outbox_relay::Config;
use outbox_relay::relay::{self, Health};
use prepared_support::{Checkback, Server, WAIT, fast_checkback, outcome};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "e2e-token-0123456789";

struct Relay {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Relay {
    fn start(db: &TestDb) -> Relay {
        let config = Config {
            database_url: db.url.clone(),
            amqp_url: integration_tests::amqp_url(),
            listen: false,
            ..Config::default()
        };
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(relay::run(
            db.pool.clone(),
            config,
            Arc::new(Health::default()),
            shutdown.clone(),
        ));
        Relay { shutdown, task }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// A check endpoint that always gives `status`.
async fn answering(status: &'static str) -> Server {
    Server::start(Router::new().route(
        "/check",
        get(move || async move { axum::Json(json!({ "status": status })) }),
    ))
    .await
}

async fn prepare(api: &Server, queue: &str, payload: &str, check_url: Option<String>) -> String {
    let resp = reqwest::Client::new()
        .post(api.url("/v1/prepared"))
        .bearer_auth(TOKEN)
        .json(
            &json!({"exchange": "", "routing_key": queue, "payload": payload,
                      "check_url": check_url}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let body: serde_json::Value = resp.json().await.unwrap();
    body["id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn prepared_messages_reach_the_queue_only_when_committed() {
    let db = fresh_db().await;
    let queue = TestQueue::new("prepared").await;
    let api = Server::start(outbox_relay::prepared::api::router(
        db.pool.clone(),
        Some(TOKEN.to_owned()),
    ))
    .await;
    let says_committed = answering("committed").await;
    let says_rolled_back = answering("rolled_back").await;
    let relay = Relay::start(&db);
    let checkback = Checkback::start(&db.pool, fast_checkback(3));

    // Prepare + commit over HTTP.
    let direct = prepare(&api, &queue.name, "direct", None).await;
    let resp = reqwest::Client::new()
        .post(api.url(&format!("/v1/prepared/{direct}/commit")))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // No decision: the check-back asks and the producer says committed / rolled back.
    let checked = prepare(
        &api,
        &queue.name,
        "checked",
        Some(says_committed.url("/check")),
    )
    .await;
    let dropped = prepare(
        &api,
        &queue.name,
        "dropped",
        Some(says_rolled_back.url("/check")),
    )
    .await;

    let got = queue
        .wait_until(WAIT, "both committed messages", |got| {
            got.iter()
                .any(|r| r.message_id.as_deref() == Some(direct.as_str()))
                && got
                    .iter()
                    .any(|r| r.message_id.as_deref() == Some(checked.as_str()))
        })
        .await;
    let by_id = |id: &str| {
        got.iter()
            .find(|r| r.message_id.as_deref() == Some(id))
            .unwrap()
            .clone()
    };
    assert_eq!(by_id(&direct).payload, b"direct");
    assert_eq!(by_id(&direct).delivery_mode, Some(2));
    assert_eq!(by_id(&checked).payload, b"checked");

    // The rolled-back one was decided and never reaches the queue.
    let dropped_id: i64 = dropped.parse().unwrap();
    integration_tests::eventually(WAIT, "the rollback by check-back", || async {
        outcome(&db.pool, dropped_id).await.is_some()
    })
    .await;
    assert_eq!(
        outcome(&db.pool, dropped_id).await,
        Some(("rolled_back".into(), "checkback".into()))
    );
    // The relay publishes only rows of outbox.messages, and this one never got there.
    assert_eq!(
        prepared_support::outbox_payload(&db.pool, dropped_id).await,
        None
    );
    assert!(
        !queue
            .received()
            .iter()
            .any(|r| r.message_id.as_deref() == Some(dropped.as_str())),
        "a rolled-back prepared message must never be published"
    );
    assert_eq!(queue.received().len(), 2);

    checkback.stop().await;
    relay.stop().await;
    queue.delete().await;
}
