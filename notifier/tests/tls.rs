//! `https://` endpoints: delivered when the receiver's certificate chains to a trusted root (a
//! partner's private CA added with `tls_ca_file`), refused and recorded as a failed attempt
//! otherwise.

mod common;

use std::{convert::Infallible, path::PathBuf, sync::Arc, time::Duration};

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use hyper::{Response, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use integration_tests::{eventually, fresh_db};
use notifier::deliver::TlsRoots;
use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A TLS receiver on 127.0.0.1:0 acknowledging everything.
async fn tls_receiver() -> u16 {
    let chain = CertificateDer::pem_file_iter(fixture("upstream.pem"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(fixture("upstream.key")).unwrap();
    let config =
        ServerConfig::builder_with_provider(rustls::crypto::ring::default_provider().into())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = service_fn(|_req| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    port
}

#[tokio::test]
async fn https_endpoint_is_delivered_when_its_ca_is_trusted_and_refused_otherwise() {
    let db = fresh_db().await;
    let port = tls_receiver().await;
    endpoint(
        &db.pool,
        "tls",
        &format!("https://localhost:{port}/hook"),
        SECRET,
        // Long enough that the first worker stops before a second refused attempt.
        Some("500ms"),
    )
    .await;

    // Without the partner's CA: the handshake fails and the attempt records why.
    let refused = send_json(&db.pool, "tls", serde_json::json!({"n": 1})).await;
    let mut cfg = worker_config(1.0);
    cfg.tls_roots = TlsRoots::Webpki;
    let worker = RunningWorker::start(&db.pool, cfg.clone());
    eventually(Duration::from_secs(10), "a refused attempt", || async {
        !attempts(&db.pool, refused).await.is_empty()
    })
    .await;
    worker.stop().await;
    let log = attempts(&db.pool, refused).await;
    assert_eq!(log[0].1, None);
    assert!(!log[0].2);
    assert!(
        log[0].3.as_deref().unwrap().contains("connection failed"),
        "{log:?}"
    );

    // With it: delivered.
    cfg.tls_ca_file = Some(fixture("ca.pem"));
    let worker = RunningWorker::start(&db.pool, cfg);
    wait_status(&db.pool, refused, "delivered", Duration::from_secs(10)).await;
    worker.stop().await;
}

#[test]
fn an_unreadable_ca_file_is_refused_naming_the_key() {
    let mut cfg = worker_config(1.0);
    cfg.tls_ca_file = Some(fixture("missing.pem"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pool = rt.block_on(async {
        sqlx::postgres::PgPoolOptions::new().connect_lazy(&integration_tests::database_url())
    });
    match notifier::Worker::new(pool.unwrap(), cfg) {
        Err(notifier::Error::Invalid { field, .. }) => assert_eq!(field, "tls_ca_file"),
        Err(e) => panic!("unexpected {e}"),
        Ok(_) => panic!("accepted a missing CA file"),
    }
}
