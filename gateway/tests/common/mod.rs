//! Helpers shared by the gateway's integration tests: a real upstream on 127.0.0.1:0 that counts
//! what reaches it, an in-process gateway on its own database, and deadline-based waiting.
#![allow(dead_code, unused_imports)]

pub mod upstream;

use std::{future::Future, net::SocketAddr, time::Duration};

use gateway::{Config, Gateway};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use upstream::Upstream;

/// A gateway served in this process until dropped.
pub struct TestGateway {
    pub addr: SocketAddr,
    shutdown: CancellationToken,
}

impl TestGateway {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Starts a gateway from TOML text (its `listen` is ignored: it gets a free port).
pub async fn start_gateway(toml: &str) -> TestGateway {
    let config = Config::parse(toml).expect("test config is valid");
    let gateway = Gateway::connect(config).await.expect("gateway connects");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = CancellationToken::new();
    tokio::spawn(gateway.serve(listener, shutdown.clone()));
    TestGateway { addr, shutdown }
}

/// An HTTP client that never follows redirects (the tests look at what the gateway answers).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

/// Polls `check` until it returns `Some`, failing the test after `secs`.
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {secs} s waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `listen` and `database_url` lines for a test config.
pub fn header_lines(db_url: &str) -> String {
    format!("listen = \"127.0.0.1:0\"\ndatabase_url = \"{db_url}\"\n")
}
