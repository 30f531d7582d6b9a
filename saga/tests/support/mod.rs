//! What every saga test needs: a fresh database, a relay in this process, participants and a
//! coordinator consuming queues of their own (random names), and ledger queries.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use consumer_lib::{Consumer, RetryPolicy};
use integration_tests::{TestDb, unique_name};
use outbox_relay::relay::{self, Health};
use saga::{
    Command, Coordinator, Participant, ParticipantHandler, SagaContext, SagaDefinition, Step,
    StepError,
};
use serde::Deserialize;
use sqlx::PgTransaction;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const WAIT: Duration = Duration::from_secs(60);

/// The test ledger: one row per effect a participant applied (an action or a compensation).
pub async fn install_ledger(db: &TestDb) {
    sqlx::raw_sql(
        "CREATE TABLE ledger (seq bigserial PRIMARY KEY, saga_id bigint NOT NULL, \
             step integer NOT NULL, kind text NOT NULL CHECK (kind IN ('action', 'compensation')))",
    )
    .execute(&db.pool)
    .await
    .expect("create ledger");
}

/// Runs until dropped (or stopped): a relay, consumers, a coordinator, all in this process.
pub struct Running {
    pub shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    pub fn new() -> Self {
        Running {
            shutdown: CancellationToken::new(),
            tasks: Vec::new(),
        }
    }

    pub fn relay(&mut self, db: &TestDb) {
        let url = db.url.clone();
        let env = move |k: &str| match k {
            "DATABASE_URL" => Some(url.clone()),
            "AMQP_URL" => Some(integration_tests::amqp_url()),
            _ => None,
        };
        let config = outbox_relay::Config::load_from(None, env).expect("relay config");
        let pool = db.pool.clone();
        let shutdown = self.shutdown.clone();
        self.tasks.push(tokio::spawn(async move {
            relay::run(pool, config, Arc::new(Health::default()), shutdown)
                .await
                .expect("relay");
        }));
    }

    pub fn consumer(&mut self, consumer: Consumer) {
        let shutdown = self.shutdown.clone();
        self.tasks.push(tokio::spawn(async move {
            consumer.run(shutdown).await.expect("consumer");
        }));
    }

    pub fn coordinator(&mut self, db: &TestDb, queue: &str) {
        let consumer = Coordinator::consumer(unique_name("coord"), queue)
            .amqp_url(integration_tests::amqp_url())
            .database(db.pool.clone())
            .build()
            .expect("coordinator");
        self.consumer(consumer);
    }

    pub fn participant<P: Participant>(&mut self, db: &TestDb, queue: &str, participant: P) {
        let consumer = participant_consumer(db, queue, participant);
        self.consumer(consumer);
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
        }
    }
}

pub fn participant_consumer<P: Participant>(db: &TestDb, queue: &str, participant: P) -> Consumer {
    Consumer::builder(format!("participant-{queue}"))
        .queue(queue)
        .amqp_url(integration_tests::amqp_url())
        .database(db.pool.clone())
        .retry(
            RetryPolicy::exponential()
                .min_delay(Duration::from_millis(100))
                .max_delay(Duration::from_millis(200))
                .max_attempts(50),
        )
        .handler(ParticipantHandler::new(participant))
        .build()
        .expect("participant")
}

/// The command payload every test participant takes.
#[derive(Debug, Deserialize)]
pub struct Order {
    /// The action refuses (permanently) when set.
    #[serde(default)]
    pub fail: bool,
}

/// A participant that records each action and compensation in the ledger. Its compensation can
/// be made to fail transiently a number of times per saga, or for good.
#[derive(Clone, Default)]
pub struct Ledger {
    /// Transient compensation failures still to give, per saga id.
    pub compensation_failures: Arc<Mutex<HashMap<i64, u32>>>,
    /// Every compensation fails transiently while set.
    pub compensation_broken: Arc<AtomicBool>,
    /// Compensation failures reported.
    pub failures_given: Arc<AtomicU32>,
}

impl Participant for Ledger {
    type Action = Order;
    type Compensation = serde_json::Value;

    async fn action(
        &self,
        ctx: &SagaContext,
        payload: &Order,
        tx: &mut PgTransaction<'static>,
    ) -> Result<(), StepError> {
        // Written before the refusal on purpose: a refused action must leave no effect.
        record(ctx, "action", tx).await?;
        if payload.fail {
            return Err(StepError::failed("refused by the participant"));
        }
        Ok(())
    }

    async fn compensate(
        &self,
        ctx: &SagaContext,
        _payload: &serde_json::Value,
        tx: &mut PgTransaction<'static>,
    ) -> Result<(), StepError> {
        record(ctx, "compensation", tx).await?;
        if self.compensation_broken.load(Ordering::SeqCst) {
            self.failures_given.fetch_add(1, Ordering::SeqCst);
            return Err(StepError::retry("provider unavailable"));
        }
        let mut left = self.compensation_failures.lock().unwrap();
        if let Some(n) = left.get_mut(&ctx.saga_id)
            && *n > 0
        {
            *n -= 1;
            self.failures_given.fetch_add(1, Ordering::SeqCst);
            return Err(StepError::retry("provider unavailable"));
        }
        Ok(())
    }
}

pub async fn record(
    ctx: &SagaContext,
    kind: &str,
    tx: &mut PgTransaction<'static>,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO ledger (saga_id, step, kind) VALUES ($1, $2, $3)")
        .bind(ctx.saga_id)
        .bind(ctx.step)
        .bind(kind)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// A definition of `n` steps, step `i` acting through queue `queues[i]` and compensating
/// through `comp_queues[i]`; `fail_at`: the step whose action is refused.
pub fn definition(
    reply_queue: &str,
    queues: &[String],
    comp_queues: &[String],
    fail_at: Option<usize>,
) -> SagaDefinition {
    let mut def = SagaDefinition::new("test")
        .reply_queue(reply_queue)
        .compensation_backoff(Duration::from_millis(50));
    for (i, q) in queues.iter().enumerate() {
        let fail = fail_at == Some(i);
        def = def.step(
            Step::new(
                format!("step{i}"),
                Command::new("", q.as_str(), serde_json::json!({ "fail": fail })),
            )
            .compensate_with(Command::new(
                "",
                comp_queues[i].as_str(),
                serde_json::json!({ "undo": i }),
            )),
        );
    }
    def
}

pub async fn start(db: &TestDb, def: &SagaDefinition) -> i64 {
    let mut tx = db.pool.begin().await.unwrap();
    let id = saga::start(&mut tx, def, &serde_json::json!({}))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    id.0
}

pub async fn saga_state(db: &TestDb, id: i64) -> String {
    sqlx::query_scalar("SELECT state FROM saga.instances WHERE id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

pub async fn wait_state(db: &TestDb, id: i64, want: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let s = saga_state(db, id).await;
        if s == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "saga {id}: still {s} after {WAIT:?}, waiting for {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The ledger of one saga as (step, kind), in the order the effects committed.
pub async fn ledger(db: &TestDb, id: i64) -> Vec<(i32, String)> {
    sqlx::query_as("SELECT step, kind FROM ledger WHERE saga_id = $1 ORDER BY seq")
        .bind(id)
        .fetch_all(&db.pool)
        .await
        .unwrap()
}

pub fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| unique_name(&format!("{prefix}{i}")))
        .collect()
}

/// Declares durable queues (so a command sent before its participant runs is kept).
pub async fn declare(queues: &[String]) {
    let conn = consumer_lib::lapin::Connection::connect(
        &integration_tests::amqp_url(),
        consumer_lib::lapin::ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let ch = conn.create_channel().await.unwrap();
    for q in queues {
        ch.queue_declare(
            q.as_str().into(),
            consumer_lib::lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    }
    let _ = conn.close(200, "done".into()).await;
}

pub async fn delete_queues(queues: &[String]) {
    let Ok(conn) = consumer_lib::lapin::Connection::connect(
        &integration_tests::amqp_url(),
        consumer_lib::lapin::ConnectionProperties::default(),
    )
    .await
    else {
        return;
    };
    if let Ok(ch) = conn.create_channel().await {
        for q in queues {
            let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
        }
    }
    let _ = conn.close(200, "done".into()).await;
}
