//! Trust for `https://` upstreams: the shared builder ([`http_common::tls`]) with the
//! gateway's `tls_roots` and `tls_ca_file` settings, its errors as config errors.

use std::path::Path;

pub use http_common::tls::TlsRoots;
use rustls::ClientConfig;

use crate::config::ConfigError;

/// Builds the client TLS configuration (TLS 1.2 and 1.3, ring).
pub fn client_config(roots: TlsRoots, ca_file: Option<&Path>) -> Result<ClientConfig, ConfigError> {
    http_common::tls::client_config(roots, ca_file).map_err(|e| ConfigError::Invalid {
        key: e.key.into(),
        reason: e.reason,
    })
}
