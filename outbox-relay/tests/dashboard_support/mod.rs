//! A relay HTTP server with the dashboard mounted, and a client that logs in like a browser.
#![allow(dead_code)] // each test file uses part of it

use std::net::SocketAddr;
use std::sync::Arc;

use integration_tests::TestDb;
use metrics_exporter_prometheus::PrometheusHandle;
use outbox_relay::dashboard::{self, Settings};
use outbox_relay::http;
use outbox_relay::relay::Health;
use reqwest::header;
use tokio_util::sync::CancellationToken;

pub const TOKEN: &str = "dashboard-test-token-0123456789";

pub struct Server {
    pub addr: SocketAddr,
    shutdown: CancellationToken,
}

impl Server {
    pub async fn start(db: &TestDb, metrics: Option<PrometheusHandle>) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let api = outbox_relay::prepared::api::router(db.pool.clone(), Some(TOKEN.to_owned()))
            .merge(dashboard::router(Settings {
                pool: db.pool.clone(),
                admin_token: Some(TOKEN.to_owned()),
                amqp_url: integration_tests::amqp_url(),
                metrics: metrics.clone(),
                public_read: false,
            }));
        let router = http::router(db.pool.clone(), Arc::new(Health::default()), metrics, api);
        let shutdown = CancellationToken::new();
        tokio::spawn(http::serve(listener, router, shutdown.clone()));
        Server { addr, shutdown }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Logs in with the admin token; returns the `Cookie` header value of the session.
pub async fn login(server: &Server) -> String {
    let resp = client()
        .post(server.url("/dashboard/login"))
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(format!("token={TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303, "login");
    let set = resp.headers()[header::SET_COOKIE].to_str().unwrap();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    set.split(';').next().unwrap().to_owned()
}

/// The CSRF token in the overview page of the session `cookie`.
pub async fn csrf_of(server: &Server, cookie: &str) -> String {
    let page = client()
        .get(server.url("/dashboard"))
        .header(header::COOKIE, cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let start = page
        .find("name=csrf value=\"")
        .expect("a form with a csrf token")
        + 17;
    page[start..start + page[start..].find('"').unwrap()].to_owned()
}

/// POSTs a form with the session `cookie`; gives status, content type and body.
pub async fn post_form(
    server: &Server,
    path: &str,
    cookie: Option<&str>,
    body: &str,
    extra: &[(&str, &str)],
) -> (u16, String, String) {
    let mut req = client()
        .post(server.url(path))
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(body.to_owned());
    if let Some(c) = cookie {
        req = req.header(header::COOKIE, c);
    }
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let ct = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, ct, resp.text().await.unwrap())
}
