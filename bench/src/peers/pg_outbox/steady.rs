//! Commit → consumer latency at a steady rate, the peer's side: its listener runs in a node
//! process while this harness commits rows into its outbox table, one transaction each, the
//! way its own `initializeMessageStorage` inserts them.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout};

use super::{Mode, Peer};
use crate::peers::{install, latency};

/// The peer's listener in a node process, until [`Listener::stop`].
struct Listener {
    child: Child,
    stdout: Lines<BufReader<ChildStdout>>,
}

#[derive(Debug, serde::Deserialize)]
struct Ready {
    ready: bool,
}

/// What the script printed when it stopped.
#[derive(Debug, serde::Deserialize)]
pub struct Stopped {
    /// Rows it had marked processed.
    pub processed: u64,
    /// Its warnings by kind.
    pub warnings: super::drain::Warnings,
    /// Rows it acknowledged to its slot without processing them: never delivered (filled in
    /// by [`theirs`], not printed by the script).
    #[serde(default)]
    pub lost: u64,
}

impl Listener {
    /// Starts the script's `listen` job and waits until its listener runs.
    async fn start(node_modules: &Path, args: &[String]) -> anyhow::Result<Listener> {
        let mut child = tokio::process::Command::new("node")
            .arg(install::scripts_dir().join(super::SCRIPT))
            .args(args)
            .env("NODE_PATH", node_modules)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().expect("piped stdout");
        let mut stdout = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = stdout.next_line().await? {
                if serde_json::from_str::<Ready>(&line).is_ok_and(|r| r.ready) {
                    return Ok(());
                }
            }
            anyhow::bail!("{} exited before its listener ran", super::SCRIPT)
        })
        .await;
        match ready {
            Ok(r) => r?,
            Err(_) => anyhow::bail!("{}: listener not running after 60 s", super::SCRIPT),
        }
        Ok(Listener { child, stdout })
    }

    /// Closes the script's stdin, which shuts its listener down, and reads its last line.
    async fn stop(mut self) -> anyhow::Result<Stopped> {
        drop(self.child.stdin.take());
        let mut last = String::new();
        while let Some(line) = self.stdout.next_line().await? {
            last = line;
        }
        let status = self.child.wait().await?;
        anyhow::ensure!(status.success(), "{}: {status}", super::SCRIPT);
        serde_json::from_str(&last)
            .map_err(|e| anyhow::anyhow!("{} printed {last:?}: {e}", super::SCRIPT))
    }
}

/// The payload of the row for `key`: `{"key": .., "x": "xx.."}`, about the drain's size.
fn payload(key: &str) -> serde_json::Value {
    let pad = (super::SIZE as usize).saturating_sub(key.len() + 20);
    serde_json::json!({ "key": key, "x": "x".repeat(pad) })
}

/// The peer in `mode` on the database at `url` (no tables of ours needed), offered `rate`
/// rows per second for `secs`.
pub async fn theirs(
    peer: Peer<'_>,
    mode: Mode,
    url: &str,
    pool: &sqlx::PgPool,
    rate: u32,
    secs: Duration,
    grace: Duration,
) -> anyhow::Result<(latency::Steady, Stopped)> {
    let channel = peer.connection.create_channel().await?;
    let queue = integration_tests::unique_name("bench_peers_pto_steady");
    crate::broker::declare_queue(&channel, &queue).await?;
    let slot = integration_tests::unique_name("pto");
    let args = mode.args("listen", url, &queue, 0, 0, &slot);
    let listener = Listener::start(peer.node_modules, &args).await?;
    let producers = pool.clone();
    let send = move |seq: u64| {
        let pool = producers.clone();
        async move {
            let key = format!("k{seq}");
            let mut tx = pool.begin().await?;
            sqlx::query(
                "INSERT INTO public.outbox \
                   (id, aggregate_type, aggregate_id, message_type, segment, payload, metadata, concurrency) \
                 VALUES (gen_random_uuid(), 'bench', $1, 'bench', NULL, $2, NULL, 'parallel') \
                 ON CONFLICT (id) DO NOTHING",
            )
            .bind(&key)
            .bind(payload(&key))
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            anyhow::Ok(key)
        }
    };
    let measured = latency::measure(
        &queue,
        rate,
        secs,
        latency::PRODUCERS,
        grace,
        send,
        latency::json_key,
    )
    .await;
    let stopped = listener.stop().await;
    let done = super::drain::done(mode, pool, &slot).await?;
    crate::broker::delete_queue(&channel, &queue).await?;
    let _ = channel.close(200, "done".into()).await;
    let mut stopped = stopped?;
    stopped.lost = done.acked_unprocessed.len() as u64;
    Ok((measured?, stopped))
}
