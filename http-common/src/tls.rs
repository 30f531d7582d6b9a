//! Trust for `https://` servers a component calls (the gateway's upstreams, the notifier's
//! webhook receivers): the system's root store by default (what curl and most tools trust,
//! including a corporate CA installed there), or the Mozilla roots built into the binary, plus
//! an optional PEM file of extra CAs for a private endpoint.

use std::path::Path;

use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, pem::PemObject},
};
use serde::Deserialize;

/// Which root certificates a server's certificate must chain to (config key `tls_roots`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TlsRoots {
    /// The operating system's store.
    #[default]
    System,
    /// The Mozilla roots compiled into the binary (for minimal images without a store).
    Webpki,
}

/// A TLS setting that cannot be used, naming its config key (`tls_ca_file`, `tls_roots`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct TlsError {
    /// The config key at fault.
    pub key: &'static str,
    /// Why.
    pub reason: String,
}

/// Builds the client TLS configuration (TLS 1.2 and 1.3, ring): `roots`, plus the PEM
/// certificates in `ca_file`.
pub fn client_config(roots: TlsRoots, ca_file: Option<&Path>) -> Result<ClientConfig, TlsError> {
    let mut store = RootCertStore::empty();
    match roots {
        TlsRoots::System => {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::warn!(cause = %e, "some system root certificates could not be read");
            }
            let (added, _ignored) = store.add_parsable_certificates(found.certs);
            if added == 0 && ca_file.is_none() {
                tracing::warn!(
                    "no system root certificates found: https servers will fail; set tls_roots = \"webpki\" or tls_ca_file"
                );
            }
        }
        TlsRoots::Webpki => store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    if let Some(path) = ca_file {
        let invalid = |reason: String| TlsError {
            key: "tls_ca_file",
            reason,
        };
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| invalid(format!("cannot read {}: {e}", path.display())))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                invalid(format!(
                    "{} is not a PEM certificate file: {e}",
                    path.display()
                ))
            })?;
        if certs.is_empty() {
            return Err(invalid(format!("{} holds no certificate", path.display())));
        }
        for cert in certs {
            store
                .add(cert)
                .map_err(|e| invalid(format!("{}: {e}", path.display())))?;
        }
    }
    // The provider is named explicitly so the result does not depend on which rustls crypto
    // features other crates in the build happen to enable.
    let config =
        ClientConfig::builder_with_provider(rustls::crypto::ring::default_provider().into())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError {
                key: "tls_roots",
                reason: e.to_string(),
            })?
            .with_root_certificates(store)
            .with_no_client_auth();
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_ca_file_names_its_key() {
        let err =
            client_config(TlsRoots::Webpki, Some(Path::new("/nonexistent/ca.pem"))).unwrap_err();
        assert_eq!(err.key, "tls_ca_file");
        assert!(err.reason.contains("/nonexistent/ca.pem"), "{err}");
    }

    #[test]
    fn the_built_in_roots_make_a_config() {
        assert!(client_config(TlsRoots::Webpki, None).is_ok());
    }
}
