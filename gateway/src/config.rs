//! The gateway's configuration: one TOML file, read once at start and validated before anything
//! listens. Every table rejects unknown keys, and every error names the key it is about, so a
//! typo such as `timout_ms` stops the gateway instead of silently falling back to a default.
//!
//! This file holds the top level and the route; each layer's own table (`idempotency`, `lock`,
//! `retry`, `breaker`, `rate_limit`, `callers`) is defined and checked in that layer's module.

use std::{collections::BTreeMap, net::SocketAddr, path::Path};

use http::{HeaderName, HeaderValue, Uri};
use serde::Deserialize;

// Each layer's table lives with the layer that reads it; these are their old paths.
pub use crate::breaker::BreakerConfig;
pub use crate::caller::CallerConfig;
pub use crate::idempotency::config::{IdempotencyConfig, OutcomePolicy};
pub use crate::limit::RateLimitConfig;
pub use crate::lock::config::LockConfig;
pub use crate::retry::RetryConfig;

/// A configuration that could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key or a value of the wrong type.
    #[error("config key `{key}`: {message}")]
    Parse {
        /// Where in the document (`routes[0].timeout_ms`), or `(document)`.
        key: String,
        /// What the parser said.
        message: String,
    },
    /// A value parsed but cannot work (a bad URL, an unknown store, a lease shorter than the timeout).
    #[error("config key `{key}`: {reason}")]
    Invalid {
        /// Which key.
        key: String,
        /// Why it cannot work.
        reason: String,
    },
}

pub(crate) fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

/// Where idempotency records and locks live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// PostgreSQL (`database_url`): durable, the default.
    #[default]
    Postgres,
    /// Redis (`redis_url`): faster, as durable as the Redis persistence settings.
    Redis,
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address the proxy listens on.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// PostgreSQL holding the `gateway` schema (required when `store = "postgres"`).
    #[serde(default)]
    pub database_url: Option<String>,
    /// Redis (required when `store = "redis"`).
    #[serde(default)]
    pub redis_url: Option<String>,
    /// Backend for idempotency records and locks.
    #[serde(default)]
    pub store: StoreKind,
    /// Roots trusted for `https://` upstreams.
    #[serde(default)]
    pub tls_roots: crate::tls::TlsRoots,
    /// Extra CA certificates (PEM) trusted for `https://` upstreams.
    #[serde(default)]
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// Largest request body accepted, unless a route says otherwise.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// How often expired idempotency records and lock entries are deleted.
    #[serde(default = "default_cleanup")]
    pub cleanup_interval_secs: u64,
    /// Callers and their bearer tokens; none means authentication is off.
    #[serde(default)]
    pub callers: Vec<CallerConfig>,
    /// The routes; a path outside all of them is answered 404.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
}

/// One route: a path prefix mapped onto one upstream.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Path prefix, matched on whole segments (`/pay` matches `/pay` and `/pay/x`, not `/payment`).
    pub prefix: String,
    /// `http(s)://host[:port][/base]`: the prefix is replaced by the base path.
    pub upstream: String,
    /// Whole-request budget, including lock waits and retries (504 when exceeded).
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// Largest request body for this route (413 when exceeded).
    #[serde(default)]
    pub max_body_bytes: Option<usize>,
    /// Forward the caller's `Authorization` header upstream (off: the gateway's credential is not the provider's).
    #[serde(default)]
    pub forward_authorization: bool,
    /// Headers set on every upstream request (e.g. the provider's API key).
    #[serde(default)]
    pub set_headers: BTreeMap<String, String>,
    /// Idempotency-Key handling.
    #[serde(default)]
    pub idempotency: Option<IdempotencyConfig>,
    /// Per-resource lock.
    #[serde(default)]
    pub lock: Option<LockConfig>,
    /// Retries of safe requests.
    #[serde(default)]
    pub retry: Option<RetryConfig>,
    /// Circuit breaker of the upstream (on by default).
    #[serde(default)]
    pub breaker: Option<BreakerConfig>,
    /// Token bucket per caller on this route.
    #[serde(default)]
    pub rate_limit: Option<RateLimitConfig>,
    /// Most requests in progress on this route at once (503 beyond).
    #[serde(default)]
    pub max_concurrency: Option<usize>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_max_body() -> usize {
    1024 * 1024
}
fn default_cleanup() -> u64 {
    60
}
fn default_timeout() -> u64 {
    30_000
}

impl Config {
    /// Reads and validates a file, then applies `GATEWAY_LISTEN`, `GATEWAY_DATABASE_URL` and
    /// `GATEWAY_REDIS_URL` from the environment when set.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mut config = Self::parse_unvalidated(&text)?;
        if let Ok(listen) = std::env::var("GATEWAY_LISTEN") {
            config.listen = listen
                .parse()
                .map_err(|e| invalid("GATEWAY_LISTEN", format!("{e}")))?;
        }
        if let Ok(url) = std::env::var("GATEWAY_DATABASE_URL") {
            config.database_url = Some(url);
        }
        if let Ok(url) = std::env::var("GATEWAY_REDIS_URL") {
            config.redis_url = Some(url);
        }
        config.validate()?;
        Ok(config)
    }

    /// Parses and validates TOML text (no environment overrides).
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config = Self::parse_unvalidated(text)?;
        config.validate()?;
        Ok(config)
    }

    fn parse_unvalidated(text: &str) -> Result<Self, ConfigError> {
        let de = toml::de::Deserializer::parse(text).map_err(|e| ConfigError::Parse {
            key: "(document)".into(),
            message: e.to_string(),
        })?;
        serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            ConfigError::Parse {
                key: if key == "." {
                    "(top level)".into()
                } else {
                    key
                },
                message: e.into_inner().message().trim().to_owned(),
            }
        })
    }

    /// Checks every value that parsed but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self.store {
            StoreKind::Postgres if self.database_url.is_none() => {
                return Err(invalid(
                    "database_url",
                    "required when store = \"postgres\"",
                ));
            }
            StoreKind::Redis if self.redis_url.is_none() => {
                return Err(invalid("redis_url", "required when store = \"redis\""));
            }
            _ => {}
        }
        if self.max_body_bytes == 0 {
            return Err(invalid("max_body_bytes", "must be greater than 0"));
        }
        if self.cleanup_interval_secs == 0 {
            return Err(invalid("cleanup_interval_secs", "must be greater than 0"));
        }
        crate::caller::validate(&self.callers)?;
        if self.routes.is_empty() {
            return Err(invalid(
                "routes",
                "at least one [[routes]] entry is required",
            ));
        }
        let mut prefixes = std::collections::HashSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            r.validate(&format!("routes[{i}]"))?;
            if !prefixes.insert(r.normalized_prefix()) {
                return Err(invalid(format!("routes[{i}].prefix"), "duplicate prefix"));
            }
        }
        Ok(())
    }
}

impl RouteConfig {
    /// The prefix without a trailing slash (`/` becomes empty: it matches everything).
    pub fn normalized_prefix(&self) -> String {
        self.prefix.trim_end_matches('/').to_owned()
    }

    /// Lease of an idempotency record.
    pub fn idempotency_lease_ms(&self) -> u64 {
        self.idempotency
            .as_ref()
            .and_then(|i| i.lease_ms)
            .unwrap_or(self.timeout_ms + 5_000)
    }

    /// Lease of a held lock.
    pub fn lock_lease_ms(&self) -> u64 {
        self.lock
            .as_ref()
            .and_then(|l| l.lease_ms)
            .unwrap_or(self.timeout_ms + 5_000)
    }

    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        if !self.prefix.starts_with('/') {
            return Err(invalid(format!("{at}.prefix"), "must start with '/'"));
        }
        if self.prefix.contains(['?', '#']) || self.prefix.contains("//") {
            return Err(invalid(
                format!("{at}.prefix"),
                "must be a plain path without '?', '#' or '//'",
            ));
        }
        parse_upstream(&self.upstream)
            .map_err(|reason| invalid(format!("{at}.upstream"), reason))?;
        if self.timeout_ms == 0 {
            return Err(invalid(
                format!("{at}.timeout_ms"),
                "must be greater than 0",
            ));
        }
        if self.max_body_bytes == Some(0) {
            return Err(invalid(
                format!("{at}.max_body_bytes"),
                "must be greater than 0",
            ));
        }
        for (name, value) in &self.set_headers {
            HeaderName::try_from(name.as_str()).map_err(|_| {
                invalid(
                    format!("{at}.set_headers.{name}"),
                    "not a valid header name",
                )
            })?;
            HeaderValue::try_from(value.as_str()).map_err(|_| {
                invalid(
                    format!("{at}.set_headers.{name}"),
                    "not a valid header value",
                )
            })?;
        }
        // Each layer checks its own table, in the order of the stack.
        if let Some(idem) = &self.idempotency {
            idem.validate(
                &format!("{at}.idempotency"),
                self.timeout_ms,
                self.idempotency_lease_ms(),
            )?;
        }
        if let Some(lock) = &self.lock {
            lock.validate(&format!("{at}.lock"), self.timeout_ms, self.lock_lease_ms())?;
        }
        if let Some(retry) = &self.retry {
            retry.validate(&format!("{at}.retry"))?;
        }
        if let Some(b) = &self.breaker {
            b.validate(&format!("{at}.breaker"))?;
        }
        if let Some(rl) = &self.rate_limit {
            rl.validate(&format!("{at}.rate_limit"))?;
        }
        if self.max_concurrency == Some(0) {
            return Err(invalid(
                format!("{at}.max_concurrency"),
                "must be greater than 0",
            ));
        }
        Ok(())
    }
}

/// An upstream split into what the proxy needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// `http` or `https`.
    pub scheme: http::uri::Scheme,
    /// `host:port`.
    pub authority: http::uri::Authority,
    /// Base path without a trailing slash (may be empty).
    pub base_path: String,
}

/// Parses `http(s)://host[:port][/base]`.
pub fn parse_upstream(s: &str) -> Result<Upstream, String> {
    let uri: Uri = s.parse().map_err(|e| format!("not a URL: {e}"))?;
    let scheme = match uri.scheme_str() {
        Some("http") | Some("https") => uri.scheme().cloned().expect("checked"),
        _ => return Err("must start with http:// or https://".into()),
    };
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| "missing host".to_owned())?;
    if authority.as_str().contains('@') {
        return Err("must not contain credentials".into());
    }
    if uri.query().is_some() {
        return Err("must not contain a query".into());
    }
    Ok(Upstream {
        scheme,
        authority,
        base_path: uri.path().trim_end_matches('/').to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DESIGN_EXAMPLE: &str = r#"
listen = "127.0.0.1:8080"
database_url = "postgres://postgres@127.0.0.1:5432/test"

[[routes]]
prefix = "/pay"
upstream = "http://127.0.0.1:9000"
timeout_ms = 5000
idempotency = { required = true, ttl_secs = 86400 }
lock = { key = "header:X-Order-Id", wait_ms = 2000 }
"#;

    #[test]
    fn design_example_parses() {
        let c = Config::parse(DESIGN_EXAMPLE).expect("parses");
        assert_eq!(c.routes.len(), 1);
        let r = &c.routes[0];
        assert_eq!(r.timeout_ms, 5000);
        assert!(r.idempotency.as_ref().unwrap().required);
        assert_eq!(r.lock.as_ref().unwrap().wait_ms, 2000);
    }

    #[test]
    fn unknown_key_is_rejected_by_name() {
        let text = DESIGN_EXAMPLE.replace("timeout_ms = 5000", "timout_ms = 5000");
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("timout_ms"), "{err}");
        assert!(err.contains("routes[0]"), "{err}");
    }

    #[test]
    fn wrong_type_is_rejected_by_name() {
        let text = DESIGN_EXAMPLE.replace("ttl_secs = 86400", "ttl_secs = \"a day\"");
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("routes[0].idempotency.ttl_secs"), "{err}");
    }

    #[test]
    fn lease_shorter_than_timeout_is_rejected() {
        let text = DESIGN_EXAMPLE.replace("ttl_secs = 86400", "ttl_secs = 86400, lease_ms = 100");
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("routes[0].idempotency.lease_ms"), "{err}");
    }

    #[test]
    fn bad_lock_key_is_rejected() {
        let text = DESIGN_EXAMPLE.replace("header:X-Order-Id", "cookie:x");
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("routes[0].lock.key"), "{err}");
    }

    #[test]
    fn upstream_must_be_http() {
        let text = DESIGN_EXAMPLE.replace("http://127.0.0.1:9000", "ftp://x");
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("routes[0].upstream"), "{err}");
    }
}
