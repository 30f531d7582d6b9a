//! The Python consumer example (`examples/python-consumer`, psycopg + pika on the inbox SQL
//! API) applies 1,000 messages exactly once although every one of them is delivered several
//! times: the real relay publishes them, every first delivery is requeued after its commit (a
//! crash between COMMIT and ack), a second copy of every tenth message is published with the
//! same wire properties, and the first Python processes (three competing consumers) are
//! SIGKILLed mid-run and replaced.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use consumer_lib::dead_letter;
use consumer_lib::lapin::BasicProperties;
use consumer_lib::lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use consumer_lib::lapin::types::{AMQPValue, FieldTable, LongString};
use sqlx::PgPool;

const MESSAGES: i64 = 1000;
// Generous: on a loaded 2-core machine the whole run took up to 56 s (34 s at load 7).
const WAIT: Duration = Duration::from_secs(120);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// `target/<profile>` of this test binary (`target/<profile>/deps/python_consumer-<hash>`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .to_path_buf()
}

/// The venv with the pinned psycopg and pika, made by the example's own script.
fn python() -> PathBuf {
    let venv = profile_dir()
        .parent()
        .expect("target dir")
        .join("python-consumer-venv");
    let out = Command::new(repo_root().join("examples/python-consumer/setup-venv"))
        .env("PYTHON_CONSUMER_VENV", &venv)
        .stderr(Stdio::inherit())
        .output()
        .expect("run examples/python-consumer/setup-venv");
    assert!(out.status.success(), "setup-venv failed");
    let path = String::from_utf8(out.stdout).expect("utf-8 path");
    PathBuf::from(
        path.lines()
            .last()
            .expect("setup-venv prints the interpreter")
            .trim(),
    )
}

fn relay_binary() -> PathBuf {
    let relay = profile_dir().join("outbox-relay");
    if !relay.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-q", "-p", "outbox-relay", "--bin", "outbox-relay"])
            .status()
            .expect("cargo build outbox-relay");
        assert!(status.success(), "building outbox-relay failed");
    }
    relay
}

/// A child process killed when dropped (a failing test leaves nothing running), whose output
/// lines are collected; stderr is printed if the test fails.
struct Proc {
    name: &'static str,
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    fn spawn(name: &'static str, command: &mut Command) -> Proc {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let collect = |stream: Box<dyn std::io::Read + Send>| {
            let lines = Arc::new(Mutex::new(Vec::new()));
            let sink = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    sink.lock().unwrap().push(line);
                }
            });
            lines
        };
        let stdout = collect(Box::new(child.stdout.take().unwrap()));
        let stderr = collect(Box::new(child.stderr.take().unwrap()));
        Proc {
            name,
            child,
            stdout,
            stderr,
        }
    }

    fn stdout(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!(
                "{} exited early with {status}:\n{}",
                self.name,
                self.stderr.lock().unwrap().join("\n")
            );
        }
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill -TERM");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} did not stop within 20 s of SIGTERM",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- {} stderr ---\n{}",
                self.name,
                self.stderr.lock().unwrap().join("\n")
            );
        }
    }
}

/// The counter `key=N` of the last `idle`/`stopped` line.
fn stat(lines: &[String], key: &str) -> Option<i64> {
    lines.iter().rev().find_map(|line| {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
    })
}

async fn scalar(pool: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.expect(sql)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn python_consumer_applies_every_redelivered_message_exactly_once() {
    let started = std::time::Instant::now();
    let python = python();
    let relay = relay_binary();
    eprintln!(
        "venv and relay binary: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let db = integration_tests::fresh_db().await;
    let publisher = Publisher::connect().await;
    let queue = integration_tests::unique_name("py_q");
    publisher
        .channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare queue");

    // Producers enqueue through the SQL API in 10 transactions, to the default exchange.
    let mut sent: Vec<(i64, i64)> = Vec::new();
    for chunk in 0..10 {
        let mut tx = db.pool.begin().await.unwrap();
        let rows: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT outbox.enqueue('', $1, convert_to(json_build_object('n', g)::text, 'UTF8'), \
                                   headers => '{\"source\": \"python-test\"}'), g::bigint \
             FROM generate_series($2::bigint, $3::bigint) g",
        )
        .bind(&queue)
        .bind(chunk * 100 + 1)
        .bind(chunk * 100 + 100)
        .fetch_all(&mut *tx)
        .await
        .expect("outbox.enqueue");
        tx.commit().await.unwrap();
        sent.extend(rows);
    }
    assert_eq!(sent.len() as i64, MESSAGES);

    // The real relay publishes them.
    let mut relay = Proc::spawn(
        "outbox-relay",
        Command::new(relay)
            .arg("run")
            .env("DATABASE_URL", &db.url)
            .env("AMQP_URL", integration_tests::amqp_url())
            .env("RELAY_HTTP_ADDR", "127.0.0.1:0")
            .env("RUST_LOG", "warn"),
    );
    wait_until("the relay to publish every message", WAIT, || {
        relay.assert_running();
        let pool = db.pool.clone();
        async move { scalar(&pool, "SELECT count(*) FROM outbox.messages").await == 0 }
    })
    .await;
    assert!(relay.terminate().success(), "relay exits 0 on SIGTERM");
    eprintln!("relay done: {:.1} s", started.elapsed().as_secs_f64());
    assert_eq!(
        scalar(&db.pool, "SELECT count(*) FROM outbox.dead_letters").await,
        0
    );

    // A second copy of every tenth message, with the relay's wire properties (a producer retry
    // or a relay that died between confirm and commit would send exactly this). Every tenth
    // only: each copy costs two more deliveries, and every message is redelivered anyway
    // (--lose-first-ack below).
    for (id, n) in sent.iter().step_by(10) {
        let mut headers = FieldTable::default();
        headers.insert(
            "source".into(),
            AMQPValue::LongString(LongString::from("python-test")),
        );
        let confirm = publisher
            .channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                format!("{{\"n\": {n}}}").as_bytes(),
                BasicProperties::default()
                    .with_message_id(id.to_string().into())
                    .with_delivery_mode(2)
                    .with_timestamp(1_700_000_000)
                    .with_headers(headers),
            )
            .await
            .expect("publish copy")
            .await
            .expect("confirm copy");
        assert!(confirm.is_ack());
    }
    // Messages the consumer must give up on: a body that is not JSON, no message_id, and a
    // payload its effect refuses.
    let raw = |id: Option<&str>, body: &'static [u8]| {
        let channel = publisher.channel.clone();
        let queue = queue.clone();
        let id = id.map(str::to_owned);
        async move {
            let mut properties = BasicProperties::default().with_delivery_mode(2);
            if let Some(id) = id {
                properties = properties.with_message_id(id.into());
            }
            channel
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    body,
                    properties,
                )
                .await
                .expect("publish poison")
                .await
                .expect("confirm poison");
        }
    };
    raw(Some("1"), b"{not json").await;
    raw(None, b"{\"n\": -1}").await;
    raw(Some("2"), b"{\"n\": \"seven\"}").await;

    let spawn_python = |name: &'static str| {
        Proc::spawn(
            name,
            Command::new(&python)
                .arg(repo_root().join("examples/python-consumer/consumer.py"))
                .args([
                    "--queue",
                    &queue,
                    "--lose-first-ack",
                    "--record-deliveries",
                    "--report-idle",
                ])
                .env("DATABASE_URL", &db.url)
                .env("AMQP_URL", integration_tests::amqp_url()),
        )
    };

    // Competing consumers, as a service scales out: three processes on one queue and one
    // consumer name. All three are killed (SIGKILL: no chance to finish anything) mid-run.
    let mut first: Vec<Proc> = [
        "python consumer 1a",
        "python consumer 1b",
        "python consumer 1c",
    ]
    .into_iter()
    .map(spawn_python)
    .collect();
    wait_until("the consumers to create their effect table", WAIT, || {
        first.iter_mut().for_each(Proc::assert_running);
        let pool = db.pool.clone();
        async move {
            scalar(
                &pool,
                "SELECT count(*) FROM pg_tables \
                 WHERE schemaname = 'python_example' AND tablename = 'applied'",
            )
            .await
                == 1
        }
    })
    .await;
    wait_until("the first consumers to apply 300 messages", WAIT, || {
        first.iter_mut().for_each(Proc::assert_running);
        let pool = db.pool.clone();
        async move { scalar(&pool, "SELECT count(*) FROM python_example.applied").await >= 300 }
    })
    .await;
    for p in &mut first {
        p.child.kill().expect("SIGKILL a consumer");
        p.child.wait().unwrap();
    }
    let applied_by_first = scalar(&db.pool, "SELECT count(*) FROM python_example.applied").await;
    eprintln!(
        "first consumers killed after {applied_by_first} applied: {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // Their replacements finish the job, including everything the first ones had unacked.
    let mut second: Vec<Proc> = [
        "python consumer 2a",
        "python consumer 2b",
        "python consumer 2c",
    ]
    .into_iter()
    .map(spawn_python)
    .collect();
    wait_until(
        "every message applied, the queue drained and every consumer idle after that",
        WAIT,
        || {
            second.iter_mut().for_each(Proc::assert_running);
            let pool = db.pool.clone();
            let outputs: Vec<_> = second
                .iter()
                .map(|p| (p.stdout.clone(), p.stdout().len()))
                .collect();
            let publisher = &publisher;
            let queue = queue.clone();
            async move {
                let applied = scalar(
                    &pool,
                    "SELECT count(DISTINCT message_id) FROM python_example.applied",
                )
                .await;
                if applied < MESSAGES || publisher.ready(&queue).await != 0 {
                    return false;
                }
                // A consumer reports "idle" when nothing was buffered for 0.5 s: such a line
                // from each after the queue was seen empty means no delivery is left in their
                // hands.
                let deadline = std::time::Instant::now() + Duration::from_secs(5);
                while std::time::Instant::now() < deadline {
                    let all_idle = outputs.iter().all(|(stdout, before)| {
                        stdout.lock().unwrap()[*before..]
                            .iter()
                            .any(|l| l.starts_with("idle "))
                    });
                    if all_idle {
                        return publisher.ready(&queue).await == 0;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                false
            }
        },
    )
    .await;
    eprintln!("all applied: {:.1} s", started.elapsed().as_secs_f64());
    let mut duplicates_skipped = 0;
    for p in &mut second {
        let status = p.terminate();
        assert!(status.success(), "{} exits 0 on SIGTERM: {status}", p.name);
        let lines = p.stdout();
        assert!(
            lines.last().is_some_and(|l| l.starts_with("stopped ")),
            "{}: final report: {lines:?}",
            p.name
        );
        duplicates_skipped += stat(&lines, "duplicates").expect("duplicates count");
    }
    assert!(duplicates_skipped > 0);

    // Exactly once: 1,000 effect rows, one per message id, the very ids the producers sent.
    let (rows, distinct_ids, distinct_n): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT message_id), count(DISTINCT n) FROM python_example.applied",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        (rows, distinct_ids, distinct_n),
        (MESSAGES, MESSAGES, MESSAGES),
        "effect rows, distinct ids, distinct payloads"
    );
    let applied: BTreeSet<(i64, i64)> =
        sqlx::query_as("SELECT message_id, n FROM python_example.applied")
            .fetch_all(&db.pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    let expected: BTreeSet<(i64, i64)> = sent.iter().copied().collect();
    assert_eq!(
        applied, expected,
        "each message's own payload, under its own id"
    );
    let claims: i64 =
        sqlx::query_scalar("SELECT count(*) FROM inbox.processed WHERE consumer = $1")
            .bind(&queue)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        claims, MESSAGES,
        "one inbox row per message, in consumer-lib's table"
    );

    // And each was delivered more than once: the broker flags every delivery after the first
    // (`redelivered`), including one whose first delivery went to a process killed before it
    // could record it, so each message must show a flagged delivery.
    let (ids_delivered, ids_redelivered, min_deliveries, total_deliveries): (i64, i64, i64, i64) =
        sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE redelivered), min(c), sum(c)::bigint FROM ( \
               SELECT message_id, count(*) c, bool_or(redelivered) redelivered \
               FROM python_example.deliveries \
               WHERE message_id NOT IN ('1', '2') GROUP BY message_id) d \
             WHERE message_id IS NOT NULL",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(ids_delivered, MESSAGES, "every message reached a consumer");
    assert_eq!(
        ids_redelivered, MESSAGES,
        "every message was redelivered at least once"
    );

    // The bad messages went to the compensation log, where consumer-dead finds them.
    let dead = dead_letter::list(&db.pool, Some(&queue), false, 10)
        .await
        .unwrap();
    let mut reasons: Vec<(Option<i64>, &str)> = dead
        .iter()
        .map(|d| (d.message_id, d.reason.as_str()))
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        vec![
            (None, "invalid"),
            (Some(1), "undecodable"),
            (Some(2), "rejected")
        ]
    );
    assert!(dead.iter().all(|d| d.queue == queue));
    assert_eq!(publisher.ready(&queue).await, 0, "no delivery left behind");
    publisher.cleanup(&queue).await;

    eprintln!(
        "python consumer: {MESSAGES} messages, {total_deliveries} deliveries handled (min {min_deliveries} \
         per message), all {ids_redelivered} redelivered, first processes SIGKILLed after {applied_by_first} applied, their \
         replacements skipped {duplicates_skipped} duplicates; {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
