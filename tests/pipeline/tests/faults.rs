//! The guarantees of DESIGN.md section 4 on the whole pipeline: producers → two relay processes
//! → RabbitMQ → two consumer processes (consumer-lib, inbox, ordered, single active consumer),
//! while one fault is injected mid-stream. Each test asserts: every committed message applied
//! exactly once, nothing applied for rolled-back transactions, per-key order held; and prints
//! `sent`, `applied`, `duplicates_suppressed`, `lost`, `double_applied`.
//!
//! Every test here is a `fault_` test: they restart shared services or load the machine, so the
//! test script runs them after everything else, one at a time.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::proxy::FaultProxy;
use integration_tests::{TestDb, fresh_db, unique_name};

const KEYS: usize = 20;
const PER_KEY: usize = 60;
/// Producer pace: long enough a stream that the fault lands in the middle of it.
const PRODUCE_FOR: Duration = Duration::from_secs(4);
const SETTLE_WAIT: Duration = Duration::from_secs(120);

fn relay_binary() -> PathBuf {
    // target/<profile>/deps/faults-<hash> → target/<profile>/outbox-relay
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let relay = dir.join("outbox-relay");
    if !relay.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-q", "-p", "outbox-relay"])
            .status()
            .expect("cargo build outbox-relay");
        assert!(status.success());
    }
    relay
}

/// How the consumers run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Consumers {
    /// Ordered, one active consumer at a time: per-key order is checked.
    Ordered,
    /// Unordered and batched (`batch_size`), both consuming at once: order is not promised.
    Batched(usize),
}

struct Pipeline {
    db: TestDb,
    queue: String,
    consumers_mode: Consumers,
    amqp_for_relays: String,
    relays: Vec<Child>,
    consumers: Vec<Child>,
}

impl Pipeline {
    async fn start(amqp_for_relays: Option<String>) -> Pipeline {
        Self::start_with(amqp_for_relays, Consumers::Ordered).await
    }

    async fn start_with(amqp_for_relays: Option<String>, consumers_mode: Consumers) -> Pipeline {
        let db = fresh_db().await;
        sqlx::raw_sql(
            "CREATE TABLE fault_sent (message_id bigint NOT NULL UNIQUE, key text NOT NULL, seq int NOT NULL,
                                      PRIMARY KEY (key, seq));
             CREATE TABLE fault_applied (n bigserial PRIMARY KEY, message_id bigint NOT NULL,
                                         key text NOT NULL, seq int NOT NULL);
             CREATE TABLE fault_consumer_stats (pid int PRIMARY KEY, duplicates bigint NOT NULL);",
        )
        .execute(&db.pool)
        .await
        .unwrap();
        let mut p = Pipeline {
            db,
            queue: unique_name("faults"),
            consumers_mode,
            amqp_for_relays: amqp_for_relays.unwrap_or_else(integration_tests::amqp_url),
            relays: Vec::new(),
            consumers: Vec::new(),
        };
        p.consumers.push(p.spawn_consumer());
        p.consumers.push(p.spawn_consumer());
        // The consumers declare the queue; publishing before that would only be retried.
        wait_for_queue(&p.queue).await;
        p.relays.push(p.spawn_relay());
        p.relays.push(p.spawn_relay());
        p
    }

    fn spawn_consumer(&self) -> Child {
        let mut command = Command::new(env!("CARGO_BIN_EXE_fault-consumer"));
        if let Consumers::Batched(n) = self.consumers_mode {
            command.env("BATCH_SIZE", n.to_string());
        }
        command
            .env("DATABASE_URL", &self.db.url)
            .env("AMQP_URL", integration_tests::amqp_url())
            .env("QUEUE", &self.queue)
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn fault-consumer")
    }

    fn spawn_relay(&self) -> Child {
        Command::new(relay_binary())
            .arg("run")
            .env("DATABASE_URL", &self.db.url)
            .env("AMQP_URL", &self.amqp_for_relays)
            .env("RELAY_HTTP_ADDR", "127.0.0.1:0")
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn outbox-relay")
    }

    /// Producers: every key gets `PER_KEY` messages in order, one transaction each, paced over
    /// `PRODUCE_FOR`; every 7th transaction also enqueues a message and then rolls back. A
    /// transaction that fails (database restarting) is retried until it commits.
    fn produce(&self) -> tokio::task::JoinHandle<()> {
        let pool = self.db.pool.clone();
        let queue = self.queue.clone();
        tokio::spawn(async move {
            let pace = PRODUCE_FOR / (KEYS * PER_KEY) as u32;
            let mut tick = tokio::time::interval(pace);
            let mut n = 0usize;
            for seq in 0..PER_KEY {
                for key in 0..KEYS {
                    tick.tick().await;
                    n += 1;
                    let key = format!("k{key}");
                    loop {
                        match commit_one(&pool, &queue, &key, seq as i32, n.is_multiple_of(7)).await
                        {
                            Ok(()) => break,
                            // A COMMIT cut by a restart may have gone through: the retry then
                            // finds its (key, seq) taken and rolls back. Exactly one committed.
                            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => break,
                            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                        }
                    }
                }
            }
        })
    }

    async fn count(&self, sql: &'static str) -> i64 {
        loop {
            match sqlx::query_scalar(sql).fetch_one(&self.db.pool).await {
                Ok(n) => return n,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Waits until every committed message was applied, then checks and prints the counts.
    async fn verify(mut self, fault: &str) {
        let sent = self.count("SELECT count(*) FROM fault_sent").await;
        let deadline = Instant::now() + SETTLE_WAIT;
        loop {
            let applied = self
                .count(
                    "SELECT count(DISTINCT a.message_id) FROM fault_applied a \
                     JOIN fault_sent s USING (message_id)",
                )
                .await;
            if applied >= sent || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Stop the consumers gracefully so their last duplicate counts are written.
        for c in &self.consumers {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
        }
        for mut c in self.consumers.drain(..) {
            let _ = tokio::task::spawn_blocking(move || c.wait()).await;
        }
        let applied = self
            .count("SELECT count(DISTINCT message_id) FROM fault_applied")
            .await;
        let applications = self.count("SELECT count(*) FROM fault_applied").await;
        let lost = self
            .count(
                "SELECT count(*) FROM fault_sent s WHERE NOT EXISTS \
                 (SELECT 1 FROM fault_applied a WHERE a.message_id = s.message_id)",
            )
            .await;
        let phantom = self
            .count(
                "SELECT count(*) FROM fault_applied a WHERE NOT EXISTS \
                 (SELECT 1 FROM fault_sent s WHERE s.message_id = a.message_id)",
            )
            .await;
        let duplicates = self
            .count("SELECT coalesce(sum(duplicates), 0)::bigint FROM fault_consumer_stats")
            .await;
        let double_applied = applications - applied;
        let out_of_order = match self.consumers_mode {
            Consumers::Ordered => self.out_of_order().await,
            Consumers::Batched(_) => 0,
        };
        println!(
            "fault {fault}: sent {sent} applied {applied} duplicates_suppressed {duplicates} \
             lost {lost} double_applied {double_applied} rolled_back_applied {phantom} \
             out_of_order {out_of_order}"
        );
        for mut r in self.relays.drain(..) {
            let _ = r.kill();
            let _ = r.wait();
        }
        assert_eq!(lost, 0, "{fault}: committed messages never applied");
        assert_eq!(double_applied, 0, "{fault}: messages applied twice");
        assert_eq!(
            phantom, 0,
            "{fault}: messages of rolled-back transactions applied"
        );
        assert_eq!(out_of_order, 0, "{fault}: per-key order broken");
        assert_eq!(sent as usize, KEYS * PER_KEY);
    }

    /// Keys whose applications are not in sequence order.
    async fn out_of_order(&self) -> i64 {
        let rows: Vec<(String, i32)> =
            sqlx::query_as("SELECT key, seq FROM fault_applied ORDER BY n")
                .fetch_all(&self.db.pool)
                .await
                .unwrap();
        let mut last: HashMap<String, i32> = HashMap::new();
        let mut broken = 0;
        for (key, seq) in rows {
            if let Some(prev) = last.insert(key, seq)
                && seq <= prev
            {
                broken += 1;
            }
        }
        broken
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        for c in self.relays.iter_mut().chain(self.consumers.iter_mut()) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn commit_one(
    pool: &sqlx::PgPool,
    queue: &str,
    key: &str,
    seq: i32,
    also_roll_back: bool,
) -> Result<(), sqlx::Error> {
    if also_roll_back {
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT outbox.enqueue('', $1, convert_to($2, 'UTF8'), ordering_key => $3)")
            .bind(queue)
            .bind(serde_json_body("rolled-back", -1))
            .bind("rolled-back")
            .execute(&mut *tx)
            .await?;
        tx.rollback().await?;
    }
    let mut tx = pool.begin().await?;
    let id: i64 = sqlx::query_scalar(
        "SELECT outbox.enqueue('', $1, convert_to($2, 'UTF8'), ordering_key => $3)",
    )
    .bind(queue)
    .bind(serde_json_body(key, seq))
    .bind(key)
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query("INSERT INTO fault_sent (message_id, key, seq) VALUES ($1, $2, $3)")
        .bind(id)
        .bind(key)
        .bind(seq)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

fn serde_json_body(key: &str, seq: i32) -> String {
    format!(r#"{{"key":"{key}","seq":{seq}}}"#)
}

async fn wait_for_queue(queue: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new("rabbitmqctl")
            .args(["-q", "list_queues", "name"])
            .output()
            .expect("rabbitmqctl");
        if String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.trim() == queue)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "consumers never declared {queue}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until a fifth of the committed messages were applied: the stream is flowing.
async fn mid_stream(p: &Pipeline) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while p.count("SELECT count(*) FROM fault_applied").await < (KEYS * PER_KEY / 5) as i64 {
        assert!(Instant::now() < deadline, "the stream never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// SIGKILLs each consumer in turn and starts a replacement, half a second apart.
async fn kill_consumers_in_turn(p: &mut Pipeline) {
    for i in 0..2 {
        p.consumers[i].kill().unwrap();
        p.consumers[i].wait().unwrap();
        let replacement = p.spawn_consumer();
        p.consumers[i] = replacement;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn run(cmd: &str, args: &[&str]) {
    let status = Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(status.success(), "{cmd} {args:?} failed");
}

#[tokio::test]
async fn fault_relay_sigkill() {
    let mut p = Pipeline::start(None).await;
    let producer = p.produce();
    mid_stream(&p).await;
    p.relays[0].kill().unwrap(); // SIGKILL
    p.relays[0].wait().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let replacement = p.spawn_relay();
    p.relays[0] = replacement;
    producer.await.unwrap();
    p.verify("relay SIGKILL").await;
}

#[tokio::test]
async fn fault_consumer_sigkill() {
    let mut p = Pipeline::start(None).await;
    let producer = p.produce();
    mid_stream(&p).await;
    // Kill both in turn: whichever is the active consumer dies with work in flight.
    kill_consumers_in_turn(&mut p).await;
    producer.await.unwrap();
    p.verify("consumer SIGKILL").await;
}

/// The same kills with batching consumers, both consuming at once: a batch in flight dies
/// with its transaction, its messages are redelivered, possibly to the other instance in
/// another batch, and the inbox still lets each apply once. (Order is not promised unordered.)
#[tokio::test]
async fn fault_consumer_sigkill_batched() {
    let mut p = Pipeline::start_with(None, Consumers::Batched(50)).await;
    let producer = p.produce();
    mid_stream(&p).await;
    kill_consumers_in_turn(&mut p).await;
    producer.await.unwrap();
    p.verify("consumer SIGKILL, batched").await;
}

#[tokio::test]
async fn fault_broker_restart() {
    let p = Pipeline::start(None).await;
    let producer = p.produce();
    mid_stream(&p).await;
    run("rabbitmqctl", &["stop_app"]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    run("rabbitmqctl", &["start_app"]);
    run("rabbitmqctl", &["await_startup"]);
    producer.await.unwrap();
    p.verify("broker stop/start").await;
}

#[tokio::test]
async fn fault_database_restart() {
    let p = Pipeline::start(None).await;
    let producer = p.produce();
    mid_stream(&p).await;
    let version = std::fs::read_dir("/etc/postgresql")
        .expect("a Debian PostgreSQL cluster")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .max()
        .expect("a cluster version");
    run(
        "pg_ctlcluster",
        &["--skip-systemctl-redirect", &version, "main", "restart"],
    );
    producer.await.unwrap();
    p.verify("database restart").await;
}

#[tokio::test]
async fn fault_network_cut_between_relay_and_broker() {
    let proxy = FaultProxy::start("127.0.0.1:5672").await;
    let amqp = proxy.url_through(&integration_tests::amqp_url(), "127.0.0.1:5672");
    let p = Pipeline::start(Some(amqp)).await;
    let producer = p.produce();
    mid_stream(&p).await;
    proxy.cut();
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.restore();
    producer.await.unwrap();
    p.verify("network cut relay-broker").await;
}

#[tokio::test]
async fn fault_slow_network_between_relay_and_broker() {
    let proxy = FaultProxy::start("127.0.0.1:5672").await;
    let amqp = proxy.url_through(&integration_tests::amqp_url(), "127.0.0.1:5672");
    let p = Pipeline::start(Some(amqp)).await;
    let producer = p.produce();
    mid_stream(&p).await;
    proxy.set_latency(Duration::from_millis(200));
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.set_latency(Duration::ZERO);
    producer.await.unwrap();
    p.verify("slow network relay-broker (200 ms per chunk for 2 s)")
        .await;
}
