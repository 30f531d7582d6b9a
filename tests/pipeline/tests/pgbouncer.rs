//! The product behind PgBouncer in transaction pooling mode (`DATABASE_POOL_MODE=transaction`).
//!
//! The test starts its own PgBouncer (Debian's package, installed by `scripts/services`) on a
//! free port, in front of the shared PostgreSQL, with 4 server connections for some 90 client
//! connections, so transactions of different clients really share server connections. Through
//! it: producers enqueue (leasing an id node), an `outbox-relay` process relays, a consumer-lib
//! consumer applies with its inbox (duplicates published on purpose are skipped), the `gateway`
//! stores idempotency records and takes locks (each POST replayed once), and the `notifier`
//! delivers a webhook. Everything is counted and must have arrived exactly once. It also checks
//! that the binaries refuse what cannot work there, naming the setting.
//!
//! It restarts no shared service, so it runs with the ordinary tests.

use std::collections::HashSet;
use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use consumer_lib::{Consumer, Handler, HandlerError, Message, RetryPolicy};
use integration_tests::{eventually, fresh_db, unique_name};
use outbox::pool::{PoolMode, connect_options};
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, PgTransaction};
use tokio_util::sync::CancellationToken;

const PRODUCERS: usize = 8;
const PER_PRODUCER: usize = 50;
const DUPLICATES: usize = 20;
const IDEMPOTENT_KEYS: usize = 10;
const WAIT: Duration = Duration::from_secs(60);

/// `outbox-relay`, `gateway` and `notifier` beside this test's executable (built if missing).
fn binary(package: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let path = dir.join(package);
    if !path.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-q", "-p", package])
            .status()
            .expect("cargo build");
        assert!(status.success(), "building {package}");
    }
    path
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// Children killed when the test ends, however it ends.
#[derive(Default)]
struct Processes(Vec<(&'static str, Child)>);

impl Processes {
    fn add(&mut self, name: &'static str, child: Child) {
        self.0.push((name, child));
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for (_, child) in self.0.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A PgBouncer of this test's own, in transaction pooling mode, in front of `DATABASE_URL`'s
/// server. `server_reset_query_always` is what DATABASE_POOL_MODE=transaction requires (see
/// `outbox::pool`).
fn start_pgbouncer(dir: &Path, port: u16) -> Child {
    let bin = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("pgbouncer is installed (scripts/services installs it)");
    let ini = dir.join("pgbouncer.ini");
    let users = dir.join("userlist.txt");
    std::fs::write(&users, "\"postgres\" \"\"\n").unwrap();
    std::fs::write(
        &ini,
        format!(
            "[databases]\n\
             * = host=127.0.0.1 port=5432\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = trust\n\
             auth_file = {}\n\
             pool_mode = transaction\n\
             default_pool_size = 4\n\
             max_client_conn = 500\n\
             server_reset_query = DISCARD ALL\n\
             server_reset_query_always = 1\n\
             ignore_startup_parameters = extra_float_digits\n",
            users.display()
        ),
    )
    .unwrap();
    let mut command = Command::new(bin);
    // PgBouncer refuses to run as root; it drops to the PostgreSQL account instead.
    if std::env::var("USER").as_deref() == Ok("root") || is_root() {
        command.args(["-u", "postgres"]);
    }
    let log = std::fs::File::create(dir.join("pgbouncer.log")).unwrap();
    command
        .arg(&ini)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start pgbouncer")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn through(db_url: &str, port: u16) -> String {
    // postgres://user@127.0.0.1:5432/db → the same database through PgBouncer.
    let (head, db) = db_url.rsplit_once('/').expect("database url");
    let (scheme_user, _) = head.rsplit_once('@').expect("user@host");
    format!("{scheme_user}@127.0.0.1:{port}/{db}")
}

async fn bouncer_pool(url: &str, size: u32) -> PgPool {
    let pool = PgPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(Duration::from_secs(20))
        .connect_with(connect_options(url, PoolMode::Transaction).unwrap())
        .await
        .expect("connect through pgbouncer");
    outbox::pool::check(&pool, PoolMode::Transaction)
        .await
        .expect("pgbouncer resets its server connections");
    pool
}

struct Apply;

impl Handler for Apply {
    type Payload = serde_json::Value;

    async fn handle(
        &self,
        message: &Message<serde_json::Value>,
        tx: &mut PgTransaction<'static>,
    ) -> Result<(), HandlerError> {
        // No unique key: a second application would show as a second row.
        sqlx::query("INSERT INTO pgb_applied (message_id, n) VALUES ($1, $2)")
            .bind(message.id)
            .bind(message.payload["n"].as_i64().unwrap_or(-1))
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

fn duplicates_seen(rendered: &str) -> u64 {
    rendered
        .lines()
        .filter(|l| l.starts_with(consumer_lib::metrics::DUPLICATES_TOTAL))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Runs `binary` to completion with `env`; returns (success, stderr).
fn run_to_end(binary: &Path, args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let out = Command::new(binary)
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "error")
        .output()
        .expect("run binary");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The start-up probe gives the same answer every time, also while other clients keep the
/// pooler's few server connections busy: PostgreSQL keeps a session variable, a resetting
/// PgBouncer drops it between statements.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_pool_mode_probe_answers_the_same_every_time() {
    const ROUNDS: usize = 200;
    let db = fresh_db().await;
    let dir = std::env::temp_dir().join(unique_name("pgbouncer-probe"));
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let mut procs = Processes::default();
    procs.add("pgbouncer", start_pgbouncer(&dir, port));
    let url = through(&db.url, port);
    eventually(Duration::from_secs(10), "pgbouncer accepting", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await;
    let bouncer = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(connect_options(&url, PoolMode::Transaction).unwrap())
        .await
        .expect("connect through pgbouncer");
    let direct = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(connect_options(&db.url, PoolMode::Session).unwrap())
        .await
        .expect("connect to postgres");

    // Other clients: short transactions on the same 4 server connections all along.
    let stop = CancellationToken::new();
    let mut load = Vec::new();
    for _ in 0..6 {
        let pool = bouncer.clone();
        let stop = stop.clone();
        load.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.is_cancelled() {
                let mut tx = pool.begin().await.expect("begin");
                sqlx::query("SELECT pg_sleep(0.001), $1::bigint")
                    .bind(n as i64)
                    .execute(&mut *tx)
                    .await
                    .expect("load statement");
                tx.commit().await.expect("commit");
                n += 1;
            }
            n
        }));
    }

    let (mut ok, mut pooler, mut not_resetting, mut direct_ok) = (0, 0, 0, 0);
    for _ in 0..ROUNDS {
        match outbox::pool::check(&bouncer, PoolMode::Transaction).await {
            Ok(()) => ok += 1,
            Err(e) => panic!("pgbouncer in transaction mode: {e}"),
        }
        match outbox::pool::check(&bouncer, PoolMode::Session).await {
            Err(outbox::pool::PoolError::TransactionPooler) => pooler += 1,
            other => panic!("pgbouncer in the default mode: {other:?}"),
        }
        match outbox::pool::check(&direct, PoolMode::Transaction).await {
            Err(outbox::pool::PoolError::NotResetting) => not_resetting += 1,
            other => panic!("postgres in transaction mode: {other:?}"),
        }
        match outbox::pool::check(&direct, PoolMode::Session).await {
            Ok(()) => direct_ok += 1,
            Err(e) => panic!("postgres in the default mode: {e}"),
        }
    }
    stop.cancel();
    let mut load_statements = 0;
    for task in load {
        load_statements += task.await.unwrap();
    }
    println!(
        "probe x{ROUNDS}: pgbouncer ok {ok}, pgbouncer refused in default mode {pooler}, \
         postgres refused in transaction mode {not_resetting}, postgres ok {direct_ok}; \
         {load_statements} load transactions meanwhile"
    );
    assert_eq!(
        (ok, pooler, not_resetting, direct_ok),
        (ROUNDS, ROUNDS, ROUNDS, ROUNDS)
    );
    assert!(load_statements > 0, "the load ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pipeline_through_pgbouncer_transaction_mode_applies_everything_once() {
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .expect("metrics recorder");
    let db = fresh_db().await;
    sqlx::raw_sql("CREATE TABLE pgb_applied (message_id bigint NOT NULL, n bigint NOT NULL)")
        .execute(&db.pool)
        .await
        .unwrap();
    let dir = std::env::temp_dir().join(unique_name("pgbouncer"));
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let mut procs = Processes::default();
    procs.add("pgbouncer", start_pgbouncer(&dir, port));
    let url = through(&db.url, port);
    eventually(Duration::from_secs(10), "pgbouncer accepting", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await;

    // What cannot work through it is refused, naming the setting.
    let relay = binary("outbox-relay");
    let (ok, err) = run_to_end(
        &relay,
        &["migrate"],
        &[
            ("DATABASE_URL", &url),
            ("DATABASE_POOL_MODE", "transaction"),
        ],
    );
    assert!(!ok && err.contains("DATABASE_POOL_MODE"), "migrate: {err}");
    let (ok, err) = run_to_end(&relay, &["status"], &[("DATABASE_URL", &url)]);
    assert!(
        !ok && err.contains("set DATABASE_POOL_MODE=transaction"),
        "status in the default mode: {err}"
    );
    let (ok, err) = run_to_end(
        &relay,
        &["status"],
        &[
            ("DATABASE_URL", &db.url),
            ("DATABASE_POOL_MODE", "transaction"),
        ],
    );
    assert!(
        !ok && err.contains("server_reset_query_always"),
        "transaction mode straight to PostgreSQL: {err}"
    );

    // The consumer first: it declares its queue, which the relay publishes to.
    let queue = unique_name("pgb");
    let consumer_pool = bouncer_pool(&url, 12).await;
    let consumer = Consumer::builder("pgbouncer-suite")
        .amqp_url(integration_tests::amqp_url())
        .database(consumer_pool.clone())
        .queue(&queue)
        .concurrency(8)
        .prefetch(100)
        .retry(
            RetryPolicy::exponential()
                .max_attempts(20)
                .min_delay(Duration::from_millis(50))
                .max_delay(Duration::from_secs(1)),
        )
        .handler(Apply)
        .build()
        .expect("consumer");
    let shutdown = CancellationToken::new();
    let consuming = tokio::spawn(consumer.run(shutdown.clone()));
    let amqp = lapin::Connection::connect(
        &integration_tests::amqp_url(),
        lapin::ConnectionProperties::default(),
    )
    .await
    .expect("broker");
    let channel = amqp.create_channel().await.unwrap();
    eventually(WAIT, "the consumer's queue", || {
        let queue = queue.clone();
        let amqp = &amqp;
        async move {
            // A passive declare that fails closes its channel: use a fresh one each time.
            let Ok(ch) = amqp.create_channel().await else {
                return false;
            };
            ch.queue_declare(
                queue.as_str().into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                Default::default(),
            )
            .await
            .is_ok()
        }
    })
    .await;

    let mut relay_child = Command::new(&relay);
    relay_child
        .env("DATABASE_URL", &url)
        .env("DATABASE_POOL_MODE", "transaction")
        .env("AMQP_URL", integration_tests::amqp_url())
        .env("RELAY_HTTP_ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "error")
        .stdout(Stdio::null());
    procs.add("relay", relay_child.spawn().expect("start relay"));

    // Producers: concurrent transactions, each a business row and its message.
    let producer_pool = bouncer_pool(&url, 16).await;
    let outbox = outbox::Outbox::new(producer_pool.clone())
        .await
        .expect("id node lease through pgbouncer");
    let mut producing = Vec::new();
    for p in 0..PRODUCERS {
        let (pool, outbox, queue) = (producer_pool.clone(), outbox.clone(), queue.clone());
        producing.push(tokio::spawn(async move {
            for i in 0..PER_PRODUCER {
                let n = (p * PER_PRODUCER + i) as i64;
                let mut tx = pool.begin().await.expect("begin");
                if p == 0 {
                    // The Rust API renews its id lease on a second connection while this
                    // transaction is open: behind a pooler with fewer server connections
                    // than such transactions, they would wait on each other (README).
                    let msg = outbox::Message::json("", &queue, &serde_json::json!({ "n": n }))
                        .unwrap()
                        .with_ordering_key(format!("k{}", n % 10));
                    outbox.enqueue(&mut tx, &msg).await.expect("enqueue");
                } else {
                    sqlx::query(
                        "SELECT outbox.enqueue('', $1, convert_to($2, 'UTF8'), \
                                               ordering_key => $3)",
                    )
                    .bind(&queue)
                    .bind(serde_json::json!({ "n": n }).to_string())
                    .bind(format!("k{}", n % 10))
                    .execute(&mut *tx)
                    .await
                    .expect("outbox.enqueue");
                }
                tx.commit().await.expect("commit");
            }
        }));
    }
    for p in producing {
        p.await.unwrap();
    }
    let sent = (PRODUCERS * PER_PRODUCER) as i64;

    let applied = |sql: &'static str| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    eventually(WAIT, "every message applied", || async {
        applied("SELECT count(*) FROM pgb_applied").await >= sent
    })
    .await;

    // Redeliveries of applied messages (same message_id): the inbox, through PgBouncer, skips them.
    let ids: Vec<i64> = sqlx::query_scalar("SELECT message_id FROM pgb_applied LIMIT $1")
        .bind(DUPLICATES as i64)
        .fetch_all(&db.pool)
        .await
        .unwrap();
    for id in &ids {
        channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                Default::default(),
                br#"{"n": -1}"#,
                lapin::BasicProperties::default()
                    .with_message_id(id.to_string().into())
                    .with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    eventually(WAIT, "the duplicates skipped", || async {
        duplicates_seen(&metrics.render()) >= DUPLICATES as u64
    })
    .await;

    // The gateway: idempotency records and locks in PostgreSQL, through PgBouncer.
    let upstream_hits = Arc::new(AtomicUsize::new(0));
    let hits = upstream_hits.clone();
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    tokio::spawn(async move {
        let app = axum::Router::new().fallback(move || {
            let n = hits.fetch_add(1, Ordering::SeqCst) + 1;
            async move { (axum::http::StatusCode::CREATED, format!("charge {n}")) }
        });
        axum::serve(upstream, app).await.unwrap();
    });
    let gateway_port = free_port();
    let gateway_config = dir.join("gateway.toml");
    std::fs::write(
        &gateway_config,
        format!(
            "listen = \"127.0.0.1:{gateway_port}\"\n\
             database_url = \"{url}\"\n\
             [[routes]]\n\
             prefix = \"/pay\"\n\
             upstream = \"http://{upstream_addr}\"\n\
             timeout_ms = 5000\n\
             idempotency = {{ required = true, ttl_secs = 86400 }}\n\
             lock = {{ key = \"header:X-Order-Id\", wait_ms = 2000 }}\n"
        ),
    )
    .unwrap();
    let mut gateway = Command::new(binary("gateway"));
    gateway
        .arg("--config")
        .arg(&gateway_config)
        .env_remove("GATEWAY_DATABASE_URL")
        .env("DATABASE_POOL_MODE", "transaction")
        .env("RUST_LOG", "error")
        .stdout(Stdio::null());
    procs.add("gateway", gateway.spawn().expect("start gateway"));
    let http = reqwest::Client::new();
    let gw = format!("http://127.0.0.1:{gateway_port}");
    eventually(WAIT, "gateway ready", || async {
        http.get(format!("{gw}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;
    let post = |key: usize, attempt: usize| {
        let (http, gw) = (http.clone(), gw.clone());
        async move {
            let r = http
                .post(format!("{gw}/pay/charge"))
                .header("Idempotency-Key", format!("\"pgb-{key}\""))
                .header("X-Order-Id", (key % 3).to_string())
                .header("content-type", "application/json")
                .body(format!("{{\"order\": {key}}}"))
                .send()
                .await
                .expect("gateway answers");
            let replayed = r.headers().get("idempotent-replayed").is_some();
            (r.status().as_u16(), replayed, attempt)
        }
    };
    let firsts = futures_join((0..IDEMPOTENT_KEYS).map(|k| post(k, 0))).await;
    let replays = futures_join((0..IDEMPOTENT_KEYS).map(|k| post(k, 1))).await;
    assert!(
        firsts.iter().all(|(s, r, _)| *s == 201 && !r),
        "first POSTs: {firsts:?}"
    );
    assert!(
        replays.iter().all(|(s, r, _)| *s == 201 && *r),
        "replayed POSTs: {replays:?}"
    );
    assert_eq!(upstream_hits.load(Ordering::SeqCst), IDEMPOTENT_KEYS);

    // The notifier: one webhook, claimed and recorded through PgBouncer.
    let received: Arc<Mutex<Vec<String>>> = Arc::default();
    let sink = received.clone();
    let receiver = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let receiver_addr = receiver.local_addr().unwrap();
    tokio::spawn(async move {
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: axum::http::HeaderMap| {
                let id = headers
                    .get("webhook-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                sink.lock().unwrap().push(id);
                async { "success" }
            }),
        );
        axum::serve(receiver, app).await.unwrap();
    });
    let notifier_port = free_port();
    let notifier_config = dir.join("notifier.toml");
    std::fs::write(
        &notifier_config,
        format!(
            "database_url = \"{url}\"\n\
             listen = \"127.0.0.1:{notifier_port}\"\n\
             poll_interval_ms = 20\n\
             [[endpoints]]\n\
             id = \"partner\"\n\
             url = \"http://{receiver_addr}/hook\"\n\
             secret = \"0123456789abcdef0123\"\n\
             required_body = \"success\"\n"
        ),
    )
    .unwrap();
    let mut notifier = Command::new(binary("notifier"));
    notifier
        .arg("--config")
        .arg(&notifier_config)
        // DATABASE_URL overrides the file: the suite's own (straight to PostgreSQL) must not
        // reach the notifier.
        .env("DATABASE_URL", &url)
        .env("DATABASE_POOL_MODE", "transaction")
        .env("RUST_LOG", "error")
        .stdout(Stdio::null());
    procs.add("notifier", notifier.spawn().expect("start notifier"));
    eventually(WAIT, "notifier's endpoint saved", || async {
        applied("SELECT count(*) FROM notify.endpoints WHERE id = 'partner'").await == 1
    })
    .await;
    let mut tx = producer_pool.begin().await.unwrap();
    let notification: i64 =
        sqlx::query_scalar("SELECT notify.send('partner', 'order.paid', $1::jsonb)")
            .bind(serde_json::json!({ "order": 42 }))
            .fetch_one(&mut *tx)
            .await
            .unwrap();
    tx.commit().await.unwrap();
    eventually(WAIT, "the notification delivered", || async {
        applied("SELECT count(*) FROM notify.notifications WHERE status = 'delivered'").await == 1
    })
    .await;

    // Everything once.
    let rows = applied("SELECT count(*) FROM pgb_applied").await;
    let distinct = applied("SELECT count(DISTINCT message_id) FROM pgb_applied").await;
    let left = applied("SELECT count(*) FROM outbox.messages").await;
    let dead = applied("SELECT count(*) FROM outbox.dead_letters").await;
    let values: HashSet<i64> = sqlx::query_scalar("SELECT n FROM pgb_applied")
        .fetch_all(&db.pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
    let hooks = received.lock().unwrap().clone();
    println!(
        "pgbouncer transaction mode: sent {sent} applied {distinct} double_applied {} lost {} \
         duplicates_skipped {} left_in_outbox {left} dead {dead}; gateway {} keys, upstream hits {}, \
         replays {}; webhooks {}",
        rows - distinct,
        sent - distinct,
        duplicates_seen(&metrics.render()),
        IDEMPOTENT_KEYS,
        upstream_hits.load(Ordering::SeqCst),
        replays.len(),
        hooks.len()
    );
    assert_eq!(distinct, sent, "every message applied");
    assert_eq!(rows, distinct, "none applied twice");
    assert_eq!(
        values,
        (0..sent).collect::<HashSet<_>>(),
        "the payloads sent"
    );
    assert_eq!(
        (left, dead),
        (0, 0),
        "outbox drained, nothing dead-lettered"
    );
    assert_eq!(hooks, vec![notification.to_string()], "one webhook, its id");

    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), consuming).await;
    drop(procs);
    let _ = channel
        .queue_delete(queue.as_str().into(), Default::default())
        .await;
    let _ = amqp.close(200, "done".into()).await;
    let _ = std::fs::remove_dir_all(&dir);
}

async fn futures_join<F: std::future::Future>(futs: impl Iterator<Item = F>) -> Vec<F::Output> {
    futures::future::join_all(futs).await
}
