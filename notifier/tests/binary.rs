//! The `notifier` binary as deployed: endpoints from its config file, the query API on its
//! listen address, and SIGKILL of the process (between attempts, and mid-request) followed by
//! a restart that continues the schedule without losing the notification.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use integration_tests::{eventually, fresh_db};

const TOKEN: &str = "binary-test-token-0123";

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn write_config(db_url: &str, port: u16, receiver: &str, schedule: &str) -> tempfile_path::Path {
    let text = format!(
        r#"
database_url = "{db_url}"
listen = "127.0.0.1:{port}"
poll_interval_ms = 20
lease_ms = 5000
jitter = 0.0
breaker_threshold = 100

[[tokens]]
token = "{TOKEN}"

[[endpoints]]
id = "partner"
url = "{receiver}"
secret = "{SECRET}"
schedule = "{schedule}"
timeout_ms = 3000
"#
    );
    tempfile_path::Path::with_contents(&text)
}

/// A config file in the target directory, removed on drop.
mod tempfile_path {
    pub struct Path(pub std::path::PathBuf);
    impl Path {
        pub fn with_contents(text: &str) -> Path {
            let p =
                std::env::temp_dir().join(format!("notifier-{:016x}.toml", rand::random::<u64>()));
            std::fs::write(&p, text).unwrap();
            Path(p)
        }
    }
    impl Drop for Path {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

async fn start(config: &tempfile_path::Path, port: u16) -> Proc {
    let child = Command::new(env!("CARGO_BIN_EXE_notifier"))
        .arg("--config")
        .arg(&config.0)
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("start notifier");
    let proc = Proc(child);
    let url = format!("http://127.0.0.1:{port}/healthz");
    eventually(Duration::from_secs(20), "notifier /healthz", || {
        let url = url.clone();
        async move { reqwest::get(&url).await.is_ok_and(|r| r.status() == 200) }
    })
    .await;
    proc
}

#[tokio::test]
async fn killed_between_attempts_the_restarted_binary_keeps_the_schedule() {
    let db = fresh_db().await;
    let rx = Receiver::failing(1).await;
    let port = free_port();
    let config = write_config(&db.url, port, &rx.url(), "1500ms");
    let mut proc = start(&config, port).await;
    let id = send_json(&db.pool, "partner", serde_json::json!({"order": 1})).await;
    eventually(
        Duration::from_secs(10),
        "first attempt recorded",
        || async { attempts(&db.pool, id).await.len() == 1 },
    )
    .await;
    proc.0.kill().unwrap(); // SIGKILL: no drain, no goodbye
    proc.0.wait().unwrap();
    let killed_at = Instant::now();

    let _proc = start(&config, port).await;
    wait_status(&db.pool, id, "delivered", Duration::from_secs(10)).await;
    let seen = rx.seen_for(id);
    assert_eq!(
        seen.len(),
        2,
        "one failed attempt, one success, no duplicate"
    );
    let gap = seen[1].at - seen[0].at;
    assert!(
        gap >= Duration::from_millis(1490) && gap < Duration::from_millis(2500),
        "second attempt {gap:?} after the first; schedule says 1500 ms"
    );
    assert!(seen[1].at > killed_at);

    // The binary's query API shows the same history.
    let v: serde_json::Value = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/v1/notifications/{id}"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["status"], "delivered");
    assert_eq!(v["attempt_log"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn killed_mid_request_the_notification_comes_back_after_the_lease() {
    let db = fresh_db().await;
    // The first request hangs long enough for the process to die under it.
    let rx = Receiver::start(
        vec![Answer::status(200).delay(Duration::from_secs(3))],
        Answer::status(200),
    )
    .await;
    let port = free_port();
    let config = write_config(&db.url, port, &rx.url(), "100ms");
    let mut proc = start(&config, port).await;
    let id = send_json(&db.pool, "partner", serde_json::json!({"order": 2})).await;
    eventually(
        Duration::from_secs(10),
        "first request in flight",
        || async { rx.seen_for(id).len() == 1 },
    )
    .await;
    proc.0.kill().unwrap();
    proc.0.wait().unwrap();
    assert_eq!(status(&db.pool, id).await, "pending");

    let _proc = start(&config, port).await;
    // The claim's 5 s lease runs out, then the notification goes out again.
    wait_status(&db.pool, id, "delivered", Duration::from_secs(15)).await;
    let seen = rx.seen_for(id);
    assert_eq!(seen.len(), 2, "sent again after the lease; same Webhook-Id");
    assert!(seen[1].at - seen[0].at >= Duration::from_millis(4900));
    let log = attempts(&db.pool, id).await;
    assert_eq!(log.len(), 1, "the cut-off attempt left no record: {log:?}");
    assert!(log[0].2);
}

#[test]
fn a_bad_config_value_stops_the_binary_with_the_key_named() {
    let config = tempfile_path::Path::with_contents("time_scale = 0\n");
    let out = Command::new(env!("CARGO_BIN_EXE_notifier"))
        .arg("--config")
        .arg(&config.0)
        .arg("check-config")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("time_scale"), "{stderr}");
}
