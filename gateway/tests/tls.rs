//! `https://` upstreams: the certificate must chain to a trusted root; a private CA is added
//! with `tls_ca_file`.

mod common;

use std::{convert::Infallible, path::PathBuf, sync::Arc};

use bytes::Bytes;
use common::{client, header_lines, start_gateway};
use http_body_util::Full;
use hyper::{Response, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use integration_tests::fresh_db;
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

/// A TLS upstream on 127.0.0.1:0 answering "tls ok".
async fn tls_upstream() -> u16 {
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
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = service_fn(|_req| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"tls ok"))))
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
async fn https_upstream_is_reached_when_its_ca_is_trusted_and_refused_otherwise() {
    let db = fresh_db().await;
    let port = tls_upstream().await;
    let route =
        format!("[[routes]]\nprefix = \"/secure\"\nupstream = \"https://localhost:{port}\"\n");
    let trusted = start_gateway(&format!(
        "tls_roots = \"webpki\"\ntls_ca_file = \"{}\"\n{}{route}",
        fixture("ca.pem").display(),
        header_lines(&db.url)
    ))
    .await;
    let r = client().get(trusted.url("/secure/x")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "tls ok");

    let untrusted = start_gateway(&format!(
        "tls_roots = \"webpki\"\n{}{route}",
        header_lines(&db.url)
    ))
    .await;
    let r = client()
        .get(untrusted.url("/secure/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502, "an unknown issuer is never trusted");
}
