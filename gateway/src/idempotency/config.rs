//! `idempotency = { ... }` of a route: its settings, defaults and checks.

use http::Method;
use serde::Deserialize;

use crate::config::{ConfigError, invalid};

/// What happens to an idempotency record when the outcome is a server error or a timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OutcomePolicy {
    /// Delete the record: the client may retry the key at once (the provider sees the same
    /// upstream key and can dedupe).
    #[default]
    Release,
    /// Keep the response: a retry with the key replays it.
    Store,
}

/// `idempotency = { ... }` of a route.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdempotencyConfig {
    /// A request with a covered method and no key is answered 400.
    #[serde(default)]
    pub required: bool,
    /// How long a completed record is kept and replayed, at least: the expiry is set when the
    /// key is claimed, the lease plus this ahead, so a response completed within its lease
    /// stays at least this long.
    #[serde(default = "default_ttl")]
    pub ttl_secs: u64,
    /// How long an in-flight record blocks its key if the gateway handling it dies.
    /// Must exceed the route's `timeout_ms`. Default: `timeout_ms` + 5000.
    #[serde(default)]
    pub lease_ms: Option<u64>,
    /// Methods the key applies to.
    #[serde(default = "default_idem_methods")]
    pub methods: Vec<String>,
    /// 5xx answers (from the upstream, or 502 when it cannot be reached).
    #[serde(default)]
    pub server_errors: OutcomePolicy,
    /// The route timeout firing (504).
    #[serde(default)]
    pub timeouts: OutcomePolicy,
    /// Largest upstream response that is stored; a larger one is answered 502 and released.
    #[serde(default = "default_max_response")]
    pub max_response_bytes: usize,
}

impl IdempotencyConfig {
    /// Checks the table at key `at` (`routes[0].idempotency`) against its route's
    /// `timeout_ms` and the record lease in effect.
    pub(crate) fn validate(
        &self,
        at: &str,
        timeout_ms: u64,
        lease_ms: u64,
    ) -> Result<(), ConfigError> {
        if self.ttl_secs == 0 {
            return Err(invalid(format!("{at}.ttl_secs"), "must be greater than 0"));
        }
        if lease_ms <= timeout_ms {
            return Err(invalid(
                format!("{at}.lease_ms"),
                "must exceed the route's timeout_ms, or a live request could lose its record",
            ));
        }
        if self.ttl_secs * 1000 < lease_ms {
            return Err(invalid(
                format!("{at}.ttl_secs"),
                "must be at least the lease",
            ));
        }
        for (j, m) in self.methods.iter().enumerate() {
            Method::from_bytes(m.as_bytes())
                .map_err(|_| invalid(format!("{at}.methods[{j}]"), "not an HTTP method"))?;
        }
        Ok(())
    }
}

fn default_ttl() -> u64 {
    86_400
}
fn default_idem_methods() -> Vec<String> {
    vec!["POST".into(), "PATCH".into()]
}
fn default_max_response() -> usize {
    1024 * 1024
}
