//! A consumer as a separate process: killed between commit and ack, and stopped by SIGTERM.
//! The test binary runs itself as the child (see `child_consumer`), so no extra binary is
//! built.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

const WAIT: Duration = Duration::from_secs(20);

/// Kills the child if the test fails before it is done with it, so no consumer outlives
/// the test run.
struct ChildGuard(Option<Child>);

impl ChildGuard {
    fn take(&mut self) -> Child {
        self.0.take().expect("child still owned")
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn spawn_child(mode: &str, db_url: &str, queue: &str, exchange: &str) -> ChildGuard {
    let child = Command::new(std::env::current_exe().expect("test binary path"))
        .args([
            "--exact",
            "child_consumer",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("CL_CHILD_MODE", mode)
        .env("CL_CHILD_DATABASE_URL", db_url)
        .env("CL_CHILD_QUEUE", queue)
        .env("CL_CHILD_EXCHANGE", exchange)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child consumer");
    ChildGuard(Some(child))
}

/// Entry point of the child process. `hang_after_commit`: freezes right after the first
/// commit, before the ack, until killed. `normal`: consumes until SIGTERM.
#[test]
#[ignore = "entry point of the child consumer process other tests spawn"]
fn child_consumer() {
    let Ok(mode) = std::env::var("CL_CHILD_MODE") else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let pool = sqlx::PgPool::connect(&std::env::var("CL_CHILD_DATABASE_URL").unwrap())
            .await
            .unwrap();
        let queue = std::env::var("CL_CHILD_QUEUE").unwrap();
        let exchange = std::env::var("CL_CHILD_EXCHANGE").unwrap();
        let mut consumer = builder(&pool, &queue, &exchange);
        if mode == "hang_after_commit" {
            consumer = consumer.after_commit(|_| {
                loop {
                    // Committed, not acked: stay here until SIGKILL.
                    std::thread::sleep(Duration::from_secs(1));
                }
            });
        }
        let consumer = consumer.handler(Recorder { jitter_ms: 0 }).build().unwrap();
        let token = tokio_util::sync::CancellationToken::new();
        let on_term = token.clone();
        tokio::spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
            term.recv().await;
            on_term.cancel();
        });
        consumer.run(token).await.expect("child consumer run");
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn consumer_killed_between_commit_and_ack_skips_the_redelivery() {
    let (db, publisher, queue, exchange) = setup().await;
    let mut child = spawn_child("hang_after_commit", &db.url, &queue, &exchange);
    publisher
        .publish(&exchange, 5, &payload("a", 1, ""), false)
        .await;
    wait_until("the child to commit the effect", WAIT, || async {
        effect_count(&db.pool, 5).await == 1
    })
    .await;
    assert!(
        consumer_lib::inbox::is_done(&db.pool, &queue, 5)
            .await
            .unwrap()
    );
    // SIGKILL: no chance to ack.
    let mut child = child.take();
    child.kill().expect("SIGKILL the child");
    child.wait().expect("reap the child");
    wait_until(
        "the broker to requeue the unacked message",
        WAIT,
        || async { publisher.ready(&queue).await == 1 },
    )
    .await;

    let consumer = builder(&db.pool, &queue, &exchange)
        .handler(Recorder { jitter_ms: 0 })
        .build()
        .unwrap();
    let (token, task) = spawn(consumer);
    wait_until("the redelivery to be taken", WAIT, || async {
        publisher.ready(&queue).await == 0
    })
    .await;
    stop(token, task).await;
    assert_eq!(publisher.ready(&queue).await, 0, "the redelivery was acked");
    assert_eq!(effect_count(&db.pool, 5).await, 1, "effect applied once");
    publisher.cleanup(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_finishes_the_running_handler_acks_and_exits_cleanly() {
    let (db, publisher, queue, exchange) = setup().await;
    let mut child = spawn_child("normal", &db.url, &queue, &exchange);
    // Wait for the child to consume, so the message goes to it.
    publisher
        .publish(&exchange, 1, &payload("a", 1, ""), false)
        .await;
    wait_until("the child to be consuming", WAIT, || async {
        effect_count(&db.pool, 1).await == 1
    })
    .await;
    publisher
        .publish(&exchange, 2, &payload("a", 2, "slow"), false)
        .await;
    // Delivered is not enough: a delivery not yet started is left to the broker on SIGTERM.
    // The handler has started once its transaction (inbox row written, handler sleeping) is
    // open in the database.
    wait_until("the slow message's handler to be running", WAIT, || async {
        let open: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND state = 'idle in transaction'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        open == 1
    })
    .await;
    let child = child.take();
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("send SIGTERM");
    assert!(status.success());
    let mut child = child;
    let exited = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .expect("child exit status");
    assert!(exited.success(), "child exits 0 after SIGTERM: {exited:?}");
    assert_eq!(
        effect_count(&db.pool, 2).await,
        1,
        "the running handler finished"
    );
    assert_eq!(
        publisher.ready(&queue).await,
        0,
        "and its message was acked, not requeued"
    );
    publisher.cleanup(&queue).await;
}
