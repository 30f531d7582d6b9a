//! Sagas end to end against real PostgreSQL and RabbitMQ, with the relay, the participants and
//! the coordinator running in this process.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use integration_tests::{fresh_db, unique_name};
use saga::{Command, SagaDefinition, Step, admin};
use support::*;

#[tokio::test]
async fn saga_start_refuses_bad_input_naming_the_field_and_stores_nothing() {
    let db = fresh_db().await;
    let cases: &[(&str, &str)] = &[
        ("[]", "steps must be a non-empty JSON array"),
        ("{}", "steps must be a non-empty JSON array"),
        ("[1]", "steps[0] must be an object"),
        (r#"[{"action": {}}]"#, "steps[0].name"),
        (r#"[{"name": "a"}]"#, "steps[0].action: must be an object"),
        (
            r#"[{"name": "a", "action": {"exchange": "", "routing_key": "q", "payload": 1}},
                {"name": "b", "action": {"exchange": 3, "routing_key": "q", "payload": 1}}]"#,
            "steps[1].action.exchange",
        ),
        (
            r#"[{"name": "a", "action": {"exchange": "", "routing_key": "", "payload": 1}}]"#,
            "steps[0].action.routing_key",
        ),
        (
            r#"[{"name": "a", "action": {"exchange": "", "routing_key": "q"}}]"#,
            "steps[0].action.payload",
        ),
        (
            r#"[{"name": "a", "action": {"exchange": "", "routing_key": "q", "payload": 1},
                 "compensation": {"exchange": ""}}]"#,
            "steps[0].compensation.routing_key",
        ),
        (
            r#"[{"name": "a", "action": {"exchange": "", "routing_key": "q", "payload": 1},
                 "timeout_ms": -5}]"#,
            "steps[0].timeout_ms",
        ),
        (
            r#"[{"name": "a", "action": {"exchange": "", "routing_key": "q", "payload": 1},
                 "timeout_ms": 1.5}]"#,
            "steps[0].timeout_ms",
        ),
    ];
    for (steps, want) in cases {
        let err = sqlx::query("SELECT saga.start('s', $1::jsonb)")
            .bind(steps)
            .execute(&db.pool)
            .await
            .expect_err(steps);
        let msg = err.to_string();
        assert!(msg.contains(want), "{steps}: {msg}");
    }
    let err = sqlx::query("SELECT saga.start('', '[]')")
        .execute(&db.pool)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("name must be"), "{err}");
    let err = sqlx::query(
        "SELECT saga.start('s', '[{\"name\":\"a\",\"action\":{\"exchange\":\"\",\"routing_key\":\"q\",\"payload\":1}}]', \
             compensation_max_attempts => 0)",
    )
    .execute(&db.pool)
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("compensation_max_attempts"),
        "{err}"
    );

    // The Rust API reports the same as Error::Invalid.
    let mut tx = db.pool.begin().await.unwrap();
    let err = saga::start(
        &mut tx,
        &SagaDefinition::new("empty"),
        &serde_json::json!({}),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, saga::Error::Invalid(m) if m.contains("steps")),
        "{err}"
    );
    tx.rollback().await.unwrap();

    let (sagas, messages): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM saga.instances), (SELECT count(*) FROM outbox.messages)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((sagas, messages), (0, 0));
}

#[tokio::test]
async fn saga_start_commits_with_the_callers_transaction_or_not_at_all() {
    let db = fresh_db().await;
    let def = definition("replies", &names("a", 2), &names("c", 2), None);
    let mut tx = db.pool.begin().await.unwrap();
    saga::start(&mut tx, &def, &serde_json::json!({"order": 1}))
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM saga.instances")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let m: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox.messages")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!((n, m), (0, 0), "a rolled-back start leaves nothing");

    let id = start(&db, &def).await;
    // Committed: the instance, its steps, and exactly the first action in the outbox.
    let (state, sent): (String, String) = sqlx::query_as(
        "SELECT i.state, s.state FROM saga.instances i JOIN saga.steps s ON s.saga_id = i.id \
         WHERE i.id = $1 AND s.idx = 0",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((state.as_str(), sent.as_str()), ("running", "sent"));
    let headers: serde_json::Value =
        sqlx::query_scalar("SELECT headers FROM outbox.messages WHERE routing_key = $1")
            .bind(&def.steps()[0].action.routing_key)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(headers["x-saga-id"], id.to_string());
    assert_eq!(headers["x-saga-op"], "action");
    assert_eq!(headers["x-saga-step"], 0);
}

/// Runs sagas of three steps on one participant, step 2 of the failing ones refused.
#[tokio::test]
async fn a_refused_step_compensates_the_completed_steps_in_reverse_order() {
    let db = fresh_db().await;
    install_ledger(&db).await;
    let reply = unique_name("replies");
    let queues = names("act", 3);
    let comps = names("comp", 3);
    let mut all = queues.clone();
    all.extend(comps.clone());
    all.push(reply.clone());
    declare(&all).await;
    let mut run = Running::new();
    run.relay(&db);
    run.coordinator(&db, &reply);
    for q in &all[..6] {
        run.participant(&db, q, Ledger::default());
    }

    let ok = start(&db, &definition(&reply, &queues, &comps, None)).await;
    let bad = start(&db, &definition(&reply, &queues, &comps, Some(2))).await;
    wait_state(&db, ok, "completed").await;
    wait_state(&db, bad, "compensated").await;

    let l = |v: &[(i32, &str)]| -> Vec<(i32, String)> {
        v.iter().map(|(s, k)| (*s, k.to_string())).collect()
    };
    assert_eq!(
        ledger(&db, ok).await,
        l(&[(0, "action"), (1, "action"), (2, "action")])
    );
    // The refused action's own write rolled back; steps 1 then 0 undone.
    assert_eq!(
        ledger(&db, bad).await,
        l(&[
            (0, "action"),
            (1, "action"),
            (1, "compensation"),
            (0, "compensation")
        ])
    );
    let (_, steps) = admin::get(&db.pool, bad).await.unwrap().unwrap();
    let states: Vec<_> = steps.iter().map(|s| s.state.as_str()).collect();
    assert_eq!(states, ["compensated", "compensated", "failed"]);
    assert_eq!(
        steps[2].last_error.as_deref(),
        Some("refused by the participant")
    );
    run.stop().await;
    delete_queues(&all).await;
}

#[tokio::test]
async fn a_compensation_failing_n_times_is_retried_until_it_succeeds_once() {
    let db = fresh_db().await;
    install_ledger(&db).await;
    let reply = unique_name("replies");
    let queues = names("act", 2);
    let comps = names("comp", 2);
    let mut all = queues.clone();
    all.extend(comps.clone());
    all.push(reply.clone());
    declare(&all).await;
    let ledger_p = Ledger::default();
    let mut run = Running::new();
    run.relay(&db);
    run.coordinator(&db, &reply);
    run.participant(&db, &queues[0], Ledger::default());
    run.participant(&db, &queues[1], Ledger::default());
    run.participant(&db, &comps[0], ledger_p.clone());
    run.participant(&db, &comps[1], Ledger::default());

    // Insert the failure budget before the saga exists: the id is not known yet, so start it in
    // a transaction, set the budget, then commit.
    let def = definition(&reply, &queues, &comps, Some(1));
    let mut tx = db.pool.begin().await.unwrap();
    let id = saga::start(&mut tx, &def, &serde_json::json!({}))
        .await
        .unwrap()
        .0;
    ledger_p.compensation_failures.lock().unwrap().insert(id, 3);
    tx.commit().await.unwrap();

    wait_state(&db, id, "compensated").await;
    let (_, steps) = admin::get(&db.pool, id).await.unwrap().unwrap();
    assert_eq!(steps[0].state, "compensated");
    assert_eq!(
        steps[0].compensation_attempts, 4,
        "3 failures, then success"
    );
    assert_eq!(steps[0].compensations_applied, 1);
    assert_eq!(ledger_p.failures_given.load(Ordering::SeqCst), 3);
    // Each failed attempt rolled back its write: the ledger shows the one that succeeded.
    let undone = ledger(&db, id)
        .await
        .into_iter()
        .filter(|(_, k)| k == "compensation")
        .count();
    assert_eq!(undone, 1);
    run.stop().await;
    delete_queues(&all).await;
}

#[tokio::test]
async fn a_compensation_that_keeps_failing_is_parked_stuck_and_an_operator_retry_finishes_it() {
    let db = fresh_db().await;
    install_ledger(&db).await;
    let reply = unique_name("replies");
    let queues = names("act", 2);
    let comps = names("comp", 2);
    let mut all = queues.clone();
    all.extend(comps.clone());
    all.push(reply.clone());
    declare(&all).await;
    let broken = Ledger::default();
    broken.compensation_broken.store(true, Ordering::SeqCst);
    let mut run = Running::new();
    run.relay(&db);
    run.coordinator(&db, &reply);
    run.participant(&db, &queues[0], Ledger::default());
    run.participant(&db, &queues[1], Ledger::default());
    run.participant(&db, &comps[0], broken.clone());
    run.participant(&db, &comps[1], Ledger::default());

    let def = definition(&reply, &queues, &comps, Some(1)).compensation_max_attempts(3);
    let id = start(&db, &def).await;
    wait_state(&db, id, "stuck").await;
    let stuck = admin::list(&db.pool, Some("stuck"), 10).await.unwrap();
    assert_eq!(stuck.len(), 1);
    assert_eq!(stuck[0].id, id);
    let reason = stuck[0].stuck_reason.clone().unwrap();
    assert!(
        reason.contains("step 0")
            && reason.contains("3 attempt")
            && reason.contains("provider unavailable"),
        "{reason}"
    );
    assert_eq!(broken.failures_given.load(Ordering::SeqCst), 3);
    let counts = admin::counts(&db.pool).await.unwrap();
    assert!(counts.contains(&("stuck".to_owned(), 1)), "{counts:?}");
    // Stays stuck: nothing more is sent on its own.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(saga_state(&db, id).await, "stuck");
    assert_eq!(broken.failures_given.load(Ordering::SeqCst), 3);

    assert!(
        !admin::retry(&db.pool, 12345).await.unwrap(),
        "unknown saga"
    );
    // The relay's admin API shows it and retries it, behind the admin token.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let router = outbox_relay::saga_api::router(db.pool.clone(), Some("sekret".into()));
    let server = tokio::spawn(async move { axum::serve(listener, router).await });
    let http = reqwest::Client::new();
    let r = http
        .get(format!("{base}/v1/sagas?state=stuck"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .get(format!("{base}/v1/sagas?state=bogus"))
        .bearer_auth("sekret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let body: serde_json::Value = http
        .get(format!("{base}/v1/sagas?state=stuck"))
        .bearer_auth("sekret")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["sagas"][0]["id"], id.to_string());
    assert_eq!(body["counts"]["stuck"], 1);
    let r = http
        .post(format!("{base}/v1/sagas/12345/retry"))
        .bearer_auth("sekret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    broken.compensation_broken.store(false, Ordering::SeqCst);
    let r = http
        .post(format!("{base}/v1/sagas/{id}/retry"))
        .bearer_auth("sekret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    wait_state(&db, id, "compensated").await;
    let r = http
        .post(format!("{base}/v1/sagas/{id}/retry"))
        .bearer_auth("sekret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409, "no longer stuck");
    assert!(
        !admin::retry(&db.pool, id).await.unwrap(),
        "no longer stuck"
    );
    server.abort();
    let (_, steps) = admin::get(&db.pool, id).await.unwrap().unwrap();
    assert_eq!(steps[0].compensations_applied, 1);
    assert!(admin::list(&db.pool, Some("bogus"), 10).await.is_err());
    run.stop().await;
    delete_queues(&all).await;
}

/// The action of step 1 is delayed behind a participant that is not running; its timeout fires,
/// the compensation reaches the participant first (an empty compensation), and when the action
/// finally arrives it is a no-op (no hanging action).
#[tokio::test]
async fn a_timed_out_step_is_compensated_first_and_its_late_action_is_a_no_op() {
    let db = fresh_db().await;
    install_ledger(&db).await;
    let reply = unique_name("replies");
    let queues = names("act", 2);
    let comps = names("comp", 2);
    let mut all = queues.clone();
    all.extend(comps.clone());
    all.push(reply.clone());
    declare(&all).await;
    let mut run = Running::new();
    run.relay(&db);
    run.coordinator(&db, &reply);
    run.participant(&db, &queues[0], Ledger::default());
    run.participant(&db, &comps[0], Ledger::default());
    run.participant(&db, &comps[1], Ledger::default());

    let def = SagaDefinition::new("timeout")
        .reply_queue(&reply)
        .step(
            Step::new("a", Command::new("", &queues[0], serde_json::json!({})))
                .compensate_with(Command::new("", &comps[0], serde_json::json!({}))),
        )
        .step(
            Step::new("b", Command::new("", &queues[1], serde_json::json!({})))
                .compensate_with(Command::new("", &comps[1], serde_json::json!({})))
                .timeout(Duration::from_millis(300)),
        );
    let id = start(&db, &def).await;
    wait_state(&db, id, "compensated").await;
    let (s, steps) = admin::get(&db.pool, id).await.unwrap().unwrap();
    assert!(
        s.failure_reason
            .as_deref()
            .unwrap()
            .contains("no reply within 300 ms"),
        "{:?}",
        s.failure_reason
    );
    assert_eq!(steps[1].compensations_applied, 0, "empty compensation");
    assert_eq!(steps[0].compensations_applied, 1);

    // Now the late action arrives.
    let late = participant_consumer(&db, &queues[1], Ledger::default());
    let mut late_run = Running::new();
    late_run.consumer(late);
    integration_tests::eventually(WAIT, "the late action consumed", || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM inbox.processed WHERE consumer = $1")
            .bind(format!("participant-{}", queues[1]))
            .fetch_one(&db.pool)
            .await
            .unwrap()
            == 1
    })
    .await;
    let l = ledger(&db, id).await;
    assert_eq!(
        l,
        vec![(0, "action".to_owned()), (0, "compensation".to_owned())],
        "step 1 never applied"
    );
    let origin: String = sqlx::query_scalar(
        "SELECT origin FROM saga.barrier WHERE saga_id = $1 AND step = 1 AND op = 'action'",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        origin, "compensation",
        "the compensation blocked the action"
    );
    // And the timeout of the completed step 0 was cancelled, not left to fire.
    let timeouts: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox.messages WHERE dedupe_key LIKE 'saga-timeout:%'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(timeouts, 0);
    assert_eq!(saga_state(&db, id).await, "compensated");
    late_run.stop().await;
    run.stop().await;
    delete_queues(&all).await;
}

#[tokio::test]
async fn a_step_replying_in_time_cancels_its_timeout() {
    let db = fresh_db().await;
    install_ledger(&db).await;
    let reply = unique_name("replies");
    let queues = names("act", 1);
    let comps = names("comp", 1);
    let all = vec![queues[0].clone(), comps[0].clone(), reply.clone()];
    declare(&all).await;
    let mut run = Running::new();
    run.relay(&db);
    run.coordinator(&db, &reply);
    run.participant(&db, &queues[0], Ledger::default());
    let def = SagaDefinition::new("t").reply_queue(&reply).step(
        Step::new("a", Command::new("", &queues[0], serde_json::json!({})))
            .compensate_with(Command::new("", &comps[0], serde_json::json!({})))
            .timeout(Duration::from_secs(3600)),
    );
    let id = start(&db, &def).await;
    let pending: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox.messages WHERE dedupe_key = $1")
            .bind(format!("saga-timeout:{id}:0"))
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(pending, 1, "the timeout waits in the outbox");
    wait_state(&db, id, "completed").await;
    let pending: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox.messages WHERE dedupe_key = $1")
            .bind(format!("saga-timeout:{id}:0"))
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(pending, 0, "cancelled by the reply");
    run.stop().await;
    delete_queues(&all).await;
}

/// 500 sagas at once, every fifth refused at its last step: the invariant holds for each, and
/// no step is compensated twice.
#[tokio::test]
async fn five_hundred_sagas_at_once_with_a_fifth_failing_keep_the_invariant() {
    const SAGAS: usize = 500;
    let db = fresh_db().await;
    install_ledger(&db).await;
    let reply = unique_name("replies");
    let queues = names("act", 3);
    let comps = names("comp", 3);
    let mut all = queues.clone();
    all.extend(comps.clone());
    all.push(reply.clone());
    declare(&all).await;
    let mut run = Running::new();
    run.relay(&db);
    run.coordinator(&db, &reply);
    for q in &all[..6] {
        run.participant(&db, q, Ledger::default());
    }
    let good = definition(&reply, &queues, &comps, None);
    let bad = definition(&reply, &queues, &comps, Some(2));
    let mut ids = Vec::new();
    let mut tx = db.pool.begin().await.unwrap();
    for i in 0..SAGAS {
        let def = if i % 5 == 4 { &bad } else { &good };
        let id = saga::start(&mut tx, def, &serde_json::json!({ "i": i }))
            .await
            .unwrap();
        ids.push((id.0, i % 5 == 4));
    }
    tx.commit().await.unwrap();

    integration_tests::eventually(Duration::from_secs(90), "500 sagas finished", || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM saga.instances WHERE state IN ('completed', 'compensated')",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap()
            == SAGAS as i64
    })
    .await;
    let counts = admin::counts(&db.pool).await.unwrap();
    assert!(
        counts.contains(&("completed".to_owned(), 400)),
        "{counts:?}"
    );
    assert!(
        counts.contains(&("compensated".to_owned(), 100)),
        "{counts:?}"
    );

    // Per saga: completed ⇔ three actions and no compensation; compensated ⇔ steps 0 and 1
    // applied and undone exactly once each, step 2 never applied.
    let rows: Vec<(i64, i32, String, i64)> = sqlx::query_as(
        "SELECT saga_id, step, kind, count(*) FROM ledger GROUP BY saga_id, step, kind",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let mut per = std::collections::HashMap::<i64, Vec<(i32, String, i64)>>::new();
    for (s, step, kind, n) in rows {
        per.entry(s).or_default().push((step, kind, n));
    }
    for (id, failing) in &ids {
        let mut got = per.remove(id).unwrap_or_default();
        got.sort();
        let want: Vec<(i32, String, i64)> = if *failing {
            vec![
                (0, "action".into(), 1),
                (0, "compensation".into(), 1),
                (1, "action".into(), 1),
                (1, "compensation".into(), 1),
            ]
        } else {
            vec![
                (0, "action".into(), 1),
                (1, "action".into(), 1),
                (2, "action".into(), 1),
            ]
        };
        assert_eq!(got, want, "saga {id} (failing: {failing})");
        let state = saga_state(&db, *id).await;
        assert_eq!(state, if *failing { "compensated" } else { "completed" });
    }
    let twice: i64 =
        sqlx::query_scalar("SELECT count(*) FROM saga.steps WHERE compensations_applied > 1")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(twice, 0);
    run.stop().await;
    delete_queues(&all).await;
}
