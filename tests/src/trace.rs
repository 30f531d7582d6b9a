//! What the trace-context pipeline tests share: the relay binary and its process, a wait for a
//! consumer's queue, and lookups in the exported spans.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use crate::otlp::Span;

/// Builds the relay binary (a no-op when it is fresh) and returns its path, so a test never
/// runs a stale relay without the change under test.
pub fn relay_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let status = Command::new(env!("CARGO"))
        .args(["build", "-q", "-p", "outbox-relay"])
        .status()
        .expect("cargo build outbox-relay");
    assert!(status.success());
    dir.join("outbox-relay")
}

/// A relay process, stopped with SIGTERM (so it flushes its spans) when dropped.
pub struct Relay(pub Child);

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

/// Waits (up to `wait`) until queue `name` exists on the broker: the consumer has declared it.
pub async fn wait_for_queue(name: &str, wait: Duration) {
    let conn =
        lapin::Connection::connect(&crate::amqp_url(), lapin::ConnectionProperties::default())
            .await
            .unwrap();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        // A passive declare of a missing queue closes the channel: a new one per try.
        let channel = conn.create_channel().await.unwrap();
        let declared = channel
            .queue_declare(
                name.into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await;
        if declared.is_ok() {
            let _ = conn.close(200, "ok".into()).await;
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the consumer never declared {name}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The span of trace `trace_id` named `name`.
pub fn find<'a>(spans: &'a [Span], trace_id: &str, name: &str) -> Option<&'a Span> {
    spans
        .iter()
        .find(|s| s.trace_id == trace_id && s.name == name)
}

/// A W3C `traceparent`'s trace id and parent span id (version 00 asserted).
pub fn traceparent_ids(tp: &str) -> (String, String) {
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "traceparent {tp}");
    assert_eq!(parts[0], "00", "traceparent version of {tp}");
    (parts[1].to_owned(), parts[2].to_owned())
}
