//! `lock = { ... }` of a route: its settings, defaults and checks.

use http::HeaderName;
use serde::Deserialize;

use crate::config::{ConfigError, invalid};

/// `lock = { ... }` of a route.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockConfig {
    /// `header:NAME`, `path:N` (0-based segment after the prefix) or `json:FIELD` (dots for nesting).
    pub key: String,
    /// How long to queue for the lock; 0 fails fast with 409.
    #[serde(default)]
    pub wait_ms: u64,
    /// Lease of a held lock. Must exceed `timeout_ms`. Default: `timeout_ms` + 5000.
    #[serde(default)]
    pub lease_ms: Option<u64>,
    /// Header carrying the fencing token upstream.
    #[serde(default = "default_fencing_header")]
    pub token_header: String,
}

impl LockConfig {
    /// Checks the table at key `at` (`routes[0].lock`) against its route's `timeout_ms` and
    /// the lock lease in effect.
    pub(crate) fn validate(
        &self,
        at: &str,
        timeout_ms: u64,
        lease_ms: u64,
    ) -> Result<(), ConfigError> {
        crate::lock::LockKeySource::parse(&self.key)
            .map_err(|reason| invalid(format!("{at}.key"), reason))?;
        HeaderName::try_from(self.token_header.as_str())
            .map_err(|_| invalid(format!("{at}.token_header"), "not a valid header name"))?;
        if lease_ms <= timeout_ms {
            return Err(invalid(
                format!("{at}.lease_ms"),
                "must exceed the route's timeout_ms, or a live request could lose its lock",
            ));
        }
        if self.wait_ms >= timeout_ms {
            return Err(invalid(
                format!("{at}.wait_ms"),
                "must be below the route's timeout_ms",
            ));
        }
        Ok(())
    }
}

fn default_fencing_header() -> String {
    "Fencing-Token".into()
}
