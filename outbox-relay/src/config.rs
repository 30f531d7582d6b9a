//! The relay's configuration: defaults, then an optional TOML file, then the environment.
//! Loaded once and validated at start; a bad value names its key and the reason.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use consumer_lib::broker::BrokerUrls;
use serde::Deserialize;

/// Everything the relay needs to run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// PostgreSQL URL of the database whose outbox is relayed (`DATABASE_URL`).
    pub database_url: String,
    /// RabbitMQ URL (`AMQP_URL`), or the nodes of a cluster as a comma-separated list: each
    /// worker connects to the first that answers and, on loss, to the next.
    pub amqp_url: String,
    /// Where `/healthz`, `/readyz`, `/metrics` and the admin API listen (`RELAY_HTTP_ADDR`).
    pub http_addr: SocketAddr,
    /// Bearer token required by the admin and prepared-message API (`RELAY_ADMIN_TOKEN`).
    pub admin_token: Option<String>,
    /// Claim-and-publish loops per relay process. Each has its own channel and transaction;
    /// several keep the broker busy while another loop waits for its commit.
    pub workers: usize,
    /// Rows claimed (and published with pipelined confirms) per batch.
    pub batch_size: i64,
    /// Attempts before a message moves to the dead-letter table.
    pub max_attempts: i32,
    /// Backoff between failed attempts of one message (exponential with jitter).
    #[serde(with = "millis")]
    pub retry_min_ms: Duration,
    /// Upper bound of that backoff.
    #[serde(with = "millis")]
    pub retry_max_ms: Duration,
    /// How long to wait for a batch's publisher confirms before counting them failed.
    #[serde(with = "millis")]
    pub confirm_timeout_ms: Duration,
    /// Idle polling starts at this interval after the last message...
    #[serde(with = "millis")]
    pub poll_min_ms: Duration,
    /// ...and backs off to this one. It bounds the wake-up latency when producers do not
    /// NOTIFY, and the delay past due of a delayed message.
    #[serde(with = "millis")]
    pub poll_max_ms: Duration,
    /// LISTEN for `outbox_wakeup` notifications (sent by producers that `SET outbox.notify = 'on'`).
    pub listen: bool,
    /// Database connections in the relay's pool.
    pub db_pool_size: u32,
    /// Check-back of prepared messages (the `[checkback]` section).
    pub checkback: crate::prepared::checkback::CheckbackConfig,
    /// Let the dashboard's read-only pages be seen without logging in (actions still need the
    /// admin token). Off by default.
    pub dashboard_public_read: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            database_url: "postgres://postgres@127.0.0.1:5432/test".to_owned(),
            amqp_url: "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned(),
            http_addr: "127.0.0.1:9464".parse().expect("valid default address"),
            admin_token: None,
            workers: 2,
            batch_size: 1000,
            max_attempts: 10,
            retry_min_ms: Duration::from_secs(1),
            retry_max_ms: Duration::from_secs(300),
            confirm_timeout_ms: Duration::from_secs(10),
            poll_min_ms: Duration::from_millis(2),
            poll_max_ms: Duration::from_millis(50),
            listen: true,
            db_pool_size: 10,
            checkback: crate::prepared::checkback::CheckbackConfig::default(),
            dashboard_public_read: false,
        }
    }
}

/// A configuration value that cannot be used.
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
    /// The file is not valid TOML for this configuration (unknown key, wrong type, ...).
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message, naming the key.
        message: String,
    },
    /// A value is out of range or malformed.
    #[error("config key `{key}`: {reason}")]
    Invalid {
        /// The key (file key or environment variable).
        key: &'static str,
        /// What is wrong.
        reason: String,
    },
}

impl Config {
    /// Defaults, then `file` (if any), then the environment.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_from(file, |k| std::env::var(k).ok())
    }

    /// As [`Config::load`], reading the environment through `env` (testable).
    pub fn load_from(
        file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut config = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.display().to_string(),
                    source,
                })?;
                Self::parse(&text).map_err(|message| ConfigError::Parse {
                    path: path.display().to_string(),
                    message,
                })?
            }
            None => Config::default(),
        };
        if let Some(v) = env("DATABASE_URL") {
            config.database_url = v;
        }
        if let Some(v) = env("AMQP_URL") {
            config.amqp_url = v;
        }
        if let Some(v) = env("RELAY_HTTP_ADDR") {
            config.http_addr = v.parse().map_err(|e| ConfigError::Invalid {
                key: "RELAY_HTTP_ADDR",
                reason: format!("`{v}` is not an address like 127.0.0.1:9464 ({e})"),
            })?;
        }
        if let Some(v) = env("RELAY_ADMIN_TOKEN") {
            config.admin_token = Some(v);
        }
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text (no environment). The error names the offending key.
    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())
    }

    /// Checks ranges and formats.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn invalid(key: &'static str, reason: impl Into<String>) -> Result<(), ConfigError> {
            Err(ConfigError::Invalid {
                key,
                reason: reason.into(),
            })
        }
        if !self.database_url.starts_with("postgres://")
            && !self.database_url.starts_with("postgresql://")
        {
            return invalid("database_url", "must start with postgres://");
        }
        self.amqp_urls()?;
        if matches!(&self.admin_token, Some(t) if t.len() < 16) {
            return invalid("admin_token", "must be at least 16 characters");
        }
        if !(1..=64).contains(&self.workers) {
            return invalid("workers", "must be between 1 and 64");
        }
        if !(1..=10_000).contains(&self.batch_size) {
            return invalid("batch_size", "must be between 1 and 10000");
        }
        if self.max_attempts < 1 {
            return invalid("max_attempts", "must be at least 1");
        }
        if self.retry_min_ms.is_zero() || self.retry_min_ms > self.retry_max_ms {
            return invalid("retry_min_ms", "must be above 0 and at most retry_max_ms");
        }
        if self.confirm_timeout_ms.is_zero() {
            return invalid("confirm_timeout_ms", "must be above 0");
        }
        if self.poll_min_ms.is_zero() || self.poll_min_ms > self.poll_max_ms {
            return invalid("poll_min_ms", "must be above 0 and at most poll_max_ms");
        }
        if self.poll_max_ms > Duration::from_secs(1) {
            return invalid(
                "poll_max_ms",
                "must be at most 1000 (delayed messages are promised within 1 s of due)",
            );
        }
        // Each worker holds up to two transactions (a batch in flight while it claims the next).
        if self.db_pool_size < (2 * self.workers as u32 + 2) {
            return invalid("db_pool_size", "must be at least 2 × workers + 2");
        }
        if let Err(e) = self.checkback.validate() {
            return invalid("checkback", e.to_string());
        }
        Ok(())
    }

    /// The broker addresses, validated (`amqp_url` split on commas).
    pub fn amqp_urls(&self) -> Result<BrokerUrls, ConfigError> {
        BrokerUrls::parse(&self.amqp_url).map_err(|e| ConfigError::Invalid {
            key: "amqp_url",
            reason: e.to_string(),
        })
    }

    /// The configuration with secrets masked, for logs.
    pub fn redacted(&self) -> String {
        format!(
            "database_url={} amqp_url={} http_addr={} admin_token={} workers={} batch_size={} \
             max_attempts={} poll={}..{}ms listen={}",
            redact_url(&self.database_url),
            self.amqp_urls()
                .map_or_else(|_| "invalid".to_owned(), |u| u.redacted()),
            self.http_addr,
            if self.admin_token.is_some() {
                "set"
            } else {
                "unset"
            },
            self.workers,
            self.batch_size,
            self.max_attempts,
            self.poll_min_ms.as_millis(),
            self.poll_max_ms.as_millis(),
            self.listen
        )
    }
}

pub use consumer_lib::broker::redact_url;

mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_is_named() {
        let err = Config::parse("batch_sise = 10").unwrap_err();
        assert!(err.contains("batch_sise"), "{err}");
    }

    #[test]
    fn wrong_type_is_named() {
        let err = Config::parse("workers = \"four\"").unwrap_err();
        assert!(err.contains("workers"), "{err}");
    }

    #[test]
    fn out_of_range_value_is_named() {
        let config = Config::parse("batch_size = 0").unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("batch_size"), "{err}");
    }

    #[test]
    fn environment_overrides_file_defaults() {
        let config = Config::load_from(None, |k| match k {
            "RELAY_HTTP_ADDR" => Some("127.0.0.1:1".to_owned()),
            "AMQP_URL" => Some("amqp://u:p@h:1/%2f".to_owned()),
            _ => None,
        })
        .unwrap();
        assert_eq!(config.http_addr.port(), 1);
        assert_eq!(config.amqp_url, "amqp://u:p@h:1/%2f");
    }

    #[test]
    fn bad_environment_address_is_named() {
        let err = Config::load_from(None, |k| (k == "RELAY_HTTP_ADDR").then(|| "nope".into()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("RELAY_HTTP_ADDR"), "{err}");
    }

    #[test]
    fn a_list_of_broker_urls_is_accepted_and_a_bad_entry_named() {
        let config = Config::load_from(None, |k| {
            (k == "AMQP_URL").then(|| "amqp://u:p@h1:5672/%2f, amqp://u:p@h2:5672/%2f".into())
        })
        .unwrap();
        assert_eq!(config.amqp_urls().unwrap().len(), 2);
        let err = Config::load_from(None, |k| {
            (k == "AMQP_URL").then(|| "amqp://u:hunter2@h1:5672/%2f,foo".into())
        })
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            r#"config key `amqp_url`: entry 2 ("foo") must start with amqp:// or amqps://"#
        );
        let config = Config::parse("amqp_url = \"amqp://u:hunter2@h1/%2f,\"").unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(
            err.contains("amqp_url") && err.contains("entry 2 is empty"),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn secrets_are_redacted() {
        assert_eq!(
            redact_url("amqp://guest:hunter2@h:5672/%2f"),
            "amqp://guest:***@h:5672/%2f"
        );
        let config = Config {
            admin_token: Some("0123456789abcdef-secret".into()),
            amqp_url: "amqp://u:secret1@h1/%2f,amqp://u:secret2@h2/%2f".into(),
            ..Config::default()
        };
        assert!(
            !config.redacted().contains("secret"),
            "{}",
            config.redacted()
        );
    }
}
