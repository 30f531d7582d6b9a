//! Crashes of real processes: the coordinator (the `saga` binary) SIGKILLed right after each
//! reply's transaction commits and before its ack, i.e. between every pair of steps; and a
//! participant process SIGKILLed in the middle of its step's transaction. The participant child
//! is this test binary itself (see `child_participant`).

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use integration_tests::{TestDb, fresh_db, unique_name};
use saga::{Participant, SagaContext, StepError, admin};
use sqlx::PgTransaction;
use support::*;

/// Kills the child when the test ends early, so no process outlives it.
struct Guard(Option<Child>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn_coordinator(db: &TestDb, queue: &str) -> Guard {
    let child = Command::new(env!("CARGO_BIN_EXE_saga"))
        .args(["coordinator", "--queue", queue, "--concurrency", "1"])
        .args([
            "--name",
            &format!("coordinator-{queue}"),
            "--freeze-after-commit",
        ])
        .env("DATABASE_URL", &db.url)
        .env("AMQP_URL", integration_tests::amqp_url())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn saga coordinator");
    Guard(Some(child))
}

#[tokio::test]
async fn coordinator_sigkilled_after_every_reply_resumes_each_saga_exactly_where_it_was() {
    let db = fresh_db().await;
    install_ledger(&db).await;
    let reply = unique_name("replies");
    let queues = names("act", 4);
    let comps = names("comp", 4);
    let mut all = queues.clone();
    all.extend(comps.clone());
    all.push(reply.clone());
    declare(&all).await;
    let mut run = Running::new();
    run.relay(&db);
    for q in &all[..8] {
        run.participant(&db, q, Ledger::default());
    }
    let ok = start(&db, &definition(&reply, &queues, &comps, None)).await;
    let bad = start(&db, &definition(&reply, &queues, &comps, Some(3))).await;

    // 4 action replies for `ok`; 4 action replies + 3 compensation replies for `bad`. Each
    // coordinator process applies exactly one (concurrency 1), freezes before the ack, and is
    // SIGKILLed there; the next one must skip the redelivered reply and go on.
    let mut kills = 0;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if saga_state(&db, ok).await == "completed" && saga_state(&db, bad).await == "compensated" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "sagas did not finish; {kills} kills"
        );
        let mut guard = spawn_coordinator(&db, &reply);
        let stdout = guard.0.as_mut().unwrap().stdout.take().unwrap();
        let line = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line).map(|_| line)
        });
        let line = tokio::time::timeout(Duration::from_secs(20), line)
            .await
            .expect("a reply committed within 20 s")
            .unwrap()
            .unwrap();
        assert!(line.starts_with("committed "), "{line:?}");
        // SIGKILL: the reply's commit is done, its ack never sent.
        drop(guard);
        kills += 1;
    }
    assert_eq!(kills, 11, "one kill after each of the 11 replies");

    let l = |v: &[(i32, &str)]| -> Vec<(i32, String)> {
        v.iter().map(|(s, k)| (*s, k.to_string())).collect()
    };
    assert_eq!(
        ledger(&db, ok).await,
        l(&[(0, "action"), (1, "action"), (2, "action"), (3, "action")])
    );
    assert_eq!(
        ledger(&db, bad).await,
        l(&[
            (0, "action"),
            (1, "action"),
            (2, "action"),
            (2, "compensation"),
            (1, "compensation"),
            (0, "compensation"),
        ])
    );
    // Every reply was redelivered after its kill and skipped by the inbox: no command was sent
    // twice (one outbox message per action and compensation in all).
    let (_, steps) = admin::get(&db.pool, bad).await.unwrap().unwrap();
    assert!(steps.iter().all(|s| s.compensations_applied <= 1));
    let inbox: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox.processed WHERE consumer = $1")
        .bind(format!("coordinator-{reply}"))
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(inbox, 11);
    run.stop().await;
    delete_queues(&all).await;
}

/// A participant whose action writes, then (in the first process) freezes before commit.
#[derive(Clone)]
struct Freezing {
    freeze: bool,
}

impl Participant for Freezing {
    type Action = serde_json::Value;
    type Compensation = serde_json::Value;

    async fn action(
        &self,
        ctx: &SagaContext,
        _: &serde_json::Value,
        tx: &mut PgTransaction<'static>,
    ) -> Result<(), StepError> {
        record(ctx, "action", tx).await?;
        if self.freeze {
            println!("in step");
            std::future::pending::<()>().await;
        }
        Ok(())
    }

    async fn compensate(
        &self,
        ctx: &SagaContext,
        _: &serde_json::Value,
        tx: &mut PgTransaction<'static>,
    ) -> Result<(), StepError> {
        record(ctx, "compensation", tx).await?;
        Ok(())
    }
}

#[test]
#[ignore = "entry point of the participant process other tests spawn"]
fn child_participant() {
    let Ok(url) = std::env::var("SAGA_CHILD_DATABASE_URL") else {
        return;
    };
    let queue = std::env::var("SAGA_CHILD_QUEUE").unwrap();
    let freeze = std::env::var("SAGA_CHILD_FREEZE").is_ok();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async move {
            let pool = sqlx::PgPool::connect(&url).await.unwrap();
            let consumer = consumer_lib::Consumer::builder(format!("participant-{queue}"))
                .queue(queue)
                .amqp_url(integration_tests::amqp_url())
                .database(pool)
                .handler(saga::ParticipantHandler::new(Freezing { freeze }))
                .build()
                .unwrap();
            consumer
                .run(tokio_util::sync::CancellationToken::new())
                .await
                .unwrap();
        });
}

fn spawn_participant(db: &TestDb, queue: &str, freeze: bool) -> Guard {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "child_participant",
        "--exact",
        "--ignored",
        "--nocapture",
        "--quiet",
    ])
    .env("SAGA_CHILD_DATABASE_URL", &db.url)
    .env("SAGA_CHILD_QUEUE", queue)
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    if freeze {
        cmd.env("SAGA_CHILD_FREEZE", "1");
    }
    Guard(Some(cmd.spawn().expect("spawn participant")))
}

#[tokio::test]
async fn participant_sigkilled_mid_step_applies_the_step_once_after_restart() {
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
    let id = start(&db, &definition(&reply, &queues, &comps, None)).await;

    let mut frozen = spawn_participant(&db, &queues[1], true);
    let stdout = frozen.0.as_mut().unwrap().stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        let mut r = BufReader::new(stdout);
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap() == 0 || line.starts_with("in step") {
                return line;
            }
        }
    });
    let line = tokio::time::timeout(Duration::from_secs(30), line)
        .await
        .expect("the participant reached its step")
        .unwrap();
    assert!(line.starts_with("in step"), "{line:?}");
    // Mid-step: its ledger row is written in an open transaction. Kill it there.
    drop(frozen);
    assert_eq!(saga_state(&db, id).await, "running");

    let _second = spawn_participant(&db, &queues[1], false);
    wait_state(&db, id, "completed").await;
    assert_eq!(
        ledger(&db, id).await,
        vec![(0, "action".to_owned()), (1, "action".to_owned())],
        "step 1 applied once"
    );
    run.stop().await;
    delete_queues(&all).await;
}
