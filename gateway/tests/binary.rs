//! The real `gateway` binary as a child process: the DESIGN.md example config, refusing to start
//! without its tables, and a gateway killed while the upstream holds its request.

mod common;

use std::{path::Path, process::Stdio};

use common::{Upstream, client, eventually, start_gateway};
use integration_tests::{database_url, fresh_db, unique_name};
use sqlx::{Connection, PgConnection};
use tokio::process::{Child, Command};

/// The example from DESIGN.md section 3, verbatim.
const DESIGN_EXAMPLE: &str = r#"listen = "127.0.0.1:8080"
database_url = "postgres://postgres@127.0.0.1:5432/test"

[[routes]]
prefix = "/pay"
upstream = "http://127.0.0.1:9000"
timeout_ms = 5000
idempotency = { required = true, ttl_secs = 86400 }
lock = { key = "header:X-Order-Id", wait_ms = 2000 }
"#;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn gateway_command(dir: &Path, toml: &str) -> Command {
    let path = dir.join("gateway.toml");
    std::fs::write(&path, toml).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gateway"));
    cmd.arg("--config")
        .arg(&path)
        .env("RUST_BACKTRACE", "0")
        .env("RUST_LOG", "warn")
        .env_remove("GATEWAY_CONFIG")
        .env_remove("GATEWAY_LISTEN")
        .env_remove("GATEWAY_DATABASE_URL")
        .env_remove("GATEWAY_REDIS_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

fn temp_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(unique_name("gateway-test"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn wait_healthy(port: u16, child: &mut Child) {
    let url = format!("http://127.0.0.1:{port}/healthz");
    eventually(20, "gateway binary healthy", || {
        let exited = child.try_wait().unwrap();
        assert!(exited.is_none(), "gateway exited early: {exited:?}");
        let url = url.clone();
        async move {
            let r = client().get(url).send().await.ok()?;
            (r.status() == 200).then_some(())
        }
    })
    .await;
}

#[tokio::test]
async fn design_example_config_starts_the_binary() {
    let db = fresh_db().await;
    let port = free_port();
    // Only the listen address (a free port) and the database (this test's own) are swapped.
    let toml = DESIGN_EXAMPLE
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"))
        .replace("postgres://postgres@127.0.0.1:5432/test", &db.url);
    // The example's upstream port may be taken on a shared machine; use it when free.
    let upstream = Upstream::start_on("127.0.0.1:9000").await;
    let dir = temp_dir();
    let mut child = gateway_command(&dir, &toml).spawn().unwrap();
    wait_healthy(port, &mut child).await;
    let base = format!("http://127.0.0.1:{port}");
    let r = client()
        .post(format!("{base}/elsewhere"))
        .body("a")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = client()
        .post(format!("{base}/pay/x"))
        .header("X-Order-Id", "1")
        .body("a")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "missing Idempotency-Key");
    if let Some(upstream) = upstream {
        let send = || {
            client()
                .post(format!("{base}/pay/x"))
                .header("X-Order-Id", "1")
                .header("Idempotency-Key", "\"design-1\"")
                .body("a")
                .send()
        };
        let first = send().await.unwrap();
        assert_eq!(first.status(), 201);
        let again = send().await.unwrap();
        assert_eq!(again.headers()["idempotent-replayed"], "true");
        assert_eq!(upstream.hits(), 1);
        assert_eq!(upstream.seen()[0].uri, "/x");
        assert!(upstream.seen()[0].headers.contains_key("fencing-token"));
    }
    child.kill().await.unwrap();
}

#[tokio::test]
async fn binary_refuses_to_start_without_its_tables_then_migrate_fixes_it() {
    let name = unique_name("t");
    let mut admin = PgConnection::connect(&database_url()).await.unwrap();
    // `name` is hex digits from unique_name.
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await
        .unwrap();
    let db_url = {
        let base = database_url();
        let (head, query) = base
            .split_once('?')
            .map_or((base.as_str(), None), |(h, q)| (h, Some(q)));
        let root = head.rsplit_once('/').map(|(b, _)| b).unwrap_or(head);
        match query {
            Some(q) => format!("{root}/{name}?{q}"),
            None => format!("{root}/{name}"),
        }
    };
    let port = free_port();
    let toml = format!(
        "listen = \"127.0.0.1:{port}\"\ndatabase_url = \"{db_url}\"\n[[routes]]\nprefix = \"/pay\"\nupstream = \"http://127.0.0.1:9\"\n"
    );
    let dir = temp_dir();
    let out = gateway_command(&dir, &toml).output().await.unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("outbox-relay migrate"), "{stderr}");
    let out = gateway_command(&dir, &toml)
        .arg("migrate")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut child = gateway_command(&dir, &toml).spawn().unwrap();
    wait_healthy(port, &mut child).await;
    child.kill().await.unwrap();
}

#[tokio::test]
async fn binary_rejects_a_bad_config_naming_the_key() {
    let dir = temp_dir();
    let toml = DESIGN_EXAMPLE.replace("timeout_ms = 5000", "timeout_ms = \"5s\"");
    let out = gateway_command(&dir, &toml).output().await.unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("routes[0].timeout_ms"), "{stderr}");
    let toml = DESIGN_EXAMPLE.replace("timeout_ms = 5000", "timeout_ms = 5000\nretries = 3");
    let out = gateway_command(&dir, &toml).output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown field `retries`"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_gateway_leaves_key_outcome_unknown_until_its_lease_expires() {
    let db = fresh_db().await;
    let upstream = Upstream::start().await;
    let port = free_port();
    let route = format!(
        "[[routes]]\nprefix = \"/pay\"\nupstream = \"{}\"\ntimeout_ms = 1000\nidempotency = {{ required = true, lease_ms = 4000 }}\n",
        upstream.url()
    );
    let toml = format!(
        "listen = \"127.0.0.1:{port}\"\ndatabase_url = \"{}\"\n{route}",
        db.url
    );
    let dir = temp_dir();
    let mut child = gateway_command(&dir, &toml).spawn().unwrap();
    wait_healthy(port, &mut child).await;
    let pay = |base: String| {
        client()
            .post(format!("{base}/pay/hold"))
            .header("Idempotency-Key", "\"crash-1\"")
            .body("charge 100")
            .send()
    };
    let in_flight = tokio::spawn(pay(format!("http://127.0.0.1:{port}")));
    eventually(5, "request held at upstream", || async {
        (upstream.held() == 1).then_some(())
    })
    .await;
    child.kill().await.unwrap(); // SIGKILL: no chance to settle the record.
    assert!(
        in_flight.await.unwrap().is_err(),
        "the client lost its connection"
    );

    // Another gateway on the same database takes over.
    let gw = start_gateway(&format!(
        "listen = \"127.0.0.1:0\"\ndatabase_url = \"{}\"\n{route}",
        db.url
    ))
    .await;
    let base = format!("http://{}", gw.addr);
    eventually(5, "409 outcome unknown", || async {
        let r = pay(base.clone()).await.unwrap();
        assert_eq!(
            r.status(),
            409,
            "the key stays blocked while its lease runs"
        );
        assert!(r.headers().contains_key("retry-after"));
        let doc: serde_json::Value = r.json().await.unwrap();
        doc["detail"]
            .as_str()
            .unwrap()
            .contains("outcome unknown")
            .then_some(())
    })
    .await;
    assert_eq!(upstream.hits(), 1, "nothing was sent again while blocked");
    upstream.release_holds();
    let r = eventually(10, "key resolves after the lease", || async {
        let r = pay(base.clone()).await.unwrap();
        (r.status() != 409).then_some(r)
    })
    .await;
    assert_eq!(r.status(), 201);
    assert!(r.headers().get("idempotent-replayed").is_none());
    let seen = upstream.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        seen[0].headers["idempotency-key"], seen[1].headers["idempotency-key"],
        "the retry carries the same upstream key, so the provider can dedupe it"
    );
    let r = pay(base.clone()).await.unwrap();
    assert_eq!(r.headers()["idempotent-replayed"], "true");
}
