//! Configuration, loaded once and validated at start: defaults, then the TOML file, then the
//! environment. A bad value is an error naming the key.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::endpoint::EndpointSpec;
use crate::schedule::{Schedule, parse_duration};
use crate::worker::WorkerConfig;

/// A configuration value was missing or wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message (names the key).
        message: String,
    },
    /// A key has a value out of range.
    #[error("config key `{key}`: {reason}")]
    Invalid {
        /// The key, e.g. `endpoints[0].url`.
        key: String,
        /// Why.
        reason: String,
    },
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

/// The file's shape (every key optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    database_url: Option<String>,
    listen: Option<String>,
    time_scale: Option<f64>,
    jitter: Option<f64>,
    poll_interval_ms: Option<u64>,
    batch_size: Option<u32>,
    max_in_flight: Option<u32>,
    lease_ms: Option<u64>,
    max_retry_after: Option<String>,
    breaker_threshold: Option<u32>,
    breaker_cooldown: Option<String>,
    schedule: Option<String>,
    exhausted_exchange: Option<String>,
    exhausted_routing_key: Option<String>,
    previous_secret_valid_for: Option<String>,
    tls_roots: Option<crate::deliver::TlsRoots>,
    tls_ca_file: Option<std::path::PathBuf>,
    #[serde(default)]
    tokens: Vec<TokenFile>,
    #[serde(default)]
    endpoints: Vec<EndpointFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    token: String,
    endpoints: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointFile {
    id: String,
    url: String,
    secret: String,
    required_body: Option<String>,
    schedule: Option<String>,
    timeout_ms: Option<u32>,
    max_in_flight: Option<u32>,
}

/// A bearer token of the query API.
#[derive(Debug, Clone)]
pub struct ApiToken {
    /// The token.
    pub token: String,
    /// The endpoints it may see and re-send to; `None` = all.
    pub endpoints: Option<Vec<String>>,
}

/// Everything the `notifier` binary needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// `database_url` / `DATABASE_URL`.
    pub database_url: String,
    /// `listen` / `NOTIFIER_LISTEN`: the query API, `/healthz` and `/metrics`.
    pub listen: SocketAddr,
    /// The delivery worker's settings.
    pub worker: WorkerConfig,
    /// `[[tokens]]` (plus `NOTIFIER_API_TOKEN`, an all-endpoint token).
    pub tokens: Vec<ApiToken>,
    /// `[[endpoints]]`, upserted at start.
    pub endpoints: Vec<EndpointSpec>,
    /// `previous_secret_valid_for`: how long a replaced secret keeps signing.
    pub previous_secret_valid_for: Duration,
}

impl Config {
    /// Reads `path` (if any), then the environment, and validates.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let file = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.display().to_string(),
                    source,
                })?;
                Self::parse_file(&text, &p.display().to_string())?
            }
            None => File::default(),
        };
        Self::build(file, |k| std::env::var(k).ok())
    }

    /// Parses TOML text with environment `env` (for tests).
    pub fn from_toml(
        text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        Self::build(Self::parse_file(text, "config")?, env)
    }

    fn parse_file(text: &str, path: &str) -> Result<File, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    fn build(file: File, env: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let d = WorkerConfig::default();
        let database_url = env("DATABASE_URL")
            .or(file.database_url)
            .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".to_owned());
        let listen_text = env("NOTIFIER_LISTEN")
            .or(file.listen)
            .unwrap_or_else(|| "127.0.0.1:9470".to_owned());
        let listen = listen_text
            .parse()
            .map_err(|_| invalid("listen", format!("{listen_text:?} is not host:port")))?;
        let time_scale = match env("NOTIFIER_TIME_SCALE") {
            Some(v) => v
                .parse::<f64>()
                .map_err(|_| invalid("time_scale", format!("{v:?} is not a number")))?,
            None => file.time_scale.unwrap_or(d.time_scale),
        };
        if !(time_scale > 0.0 && time_scale <= 1000.0) {
            return Err(invalid("time_scale", "must be > 0 and <= 1000"));
        }
        let jitter = file.jitter.unwrap_or(d.jitter);
        if !(0.0..1.0).contains(&jitter) {
            return Err(invalid("jitter", "must be in 0.0..1.0"));
        }
        let poll_interval = Duration::from_millis(
            file.poll_interval_ms
                .unwrap_or(d.poll_interval.as_millis() as u64),
        );
        if poll_interval.is_zero() || poll_interval > Duration::from_secs(60) {
            return Err(invalid("poll_interval_ms", "must be 1..=60000"));
        }
        let batch_size = file.batch_size.unwrap_or(d.batch_size);
        if !(1..=1000).contains(&batch_size) {
            return Err(invalid("batch_size", "must be 1..=1000"));
        }
        let max_in_flight = file.max_in_flight.unwrap_or(d.max_in_flight);
        if !(1..=10_000).contains(&max_in_flight) {
            return Err(invalid("max_in_flight", "must be 1..=10000"));
        }
        let lease = Duration::from_millis(file.lease_ms.unwrap_or(d.lease.as_millis() as u64));
        if lease < Duration::from_secs(5) || lease > Duration::from_secs(3600) {
            return Err(invalid("lease_ms", "must be 5000..=3600000"));
        }
        let dur = |key: &str, v: Option<String>, def: Duration| -> Result<Duration, ConfigError> {
            match v {
                Some(t) => parse_duration(t.trim()).map_err(|r| invalid(key, r)),
                None => Ok(def),
            }
        };
        let max_retry_after = dur("max_retry_after", file.max_retry_after, d.max_retry_after)?;
        let breaker_cooldown = dur(
            "breaker_cooldown",
            file.breaker_cooldown,
            d.breaker_cooldown,
        )?;
        let breaker_threshold = file.breaker_threshold.unwrap_or(d.breaker_threshold);
        if breaker_threshold == 0 {
            return Err(invalid("breaker_threshold", "must be at least 1"));
        }
        let schedule = match file.schedule {
            Some(s) => Schedule::parse(&s).map_err(|r| invalid("schedule", r))?,
            None => d.schedule.clone(),
        };
        let exhausted_exchange = file.exhausted_exchange.unwrap_or(d.exhausted_exchange);
        let exhausted_routing_key = file
            .exhausted_routing_key
            .unwrap_or(d.exhausted_routing_key);
        if exhausted_exchange.len() > 255 {
            return Err(invalid("exhausted_exchange", "at most 255 bytes"));
        }
        if exhausted_routing_key.is_empty() || exhausted_routing_key.len() > 255 {
            return Err(invalid("exhausted_routing_key", "must be 1 to 255 bytes"));
        }
        let previous_secret_valid_for = dur(
            "previous_secret_valid_for",
            file.previous_secret_valid_for,
            Duration::from_secs(24 * 3600),
        )?;

        let mut tokens = Vec::new();
        for (i, t) in file.tokens.into_iter().enumerate() {
            if t.token.len() < 16 {
                return Err(invalid(
                    format!("tokens[{i}].token"),
                    "must be at least 16 characters",
                ));
            }
            tokens.push(ApiToken {
                token: t.token,
                endpoints: t.endpoints,
            });
        }
        if let Some(t) = env("NOTIFIER_API_TOKEN") {
            if t.len() < 16 {
                return Err(invalid(
                    "NOTIFIER_API_TOKEN",
                    "must be at least 16 characters",
                ));
            }
            tokens.push(ApiToken {
                token: t,
                endpoints: None,
            });
        }

        let mut endpoints = Vec::new();
        for (i, e) in file.endpoints.into_iter().enumerate() {
            let schedule = match e.schedule {
                Some(s) => Some(
                    Schedule::parse(&s)
                        .map_err(|r| invalid(format!("endpoints[{i}].schedule"), r))?,
                ),
                None => None,
            };
            let spec = EndpointSpec {
                id: e.id,
                url: e.url,
                secret: e.secret,
                required_body: e.required_body,
                schedule,
                timeout: Duration::from_millis(e.timeout_ms.unwrap_or(10_000).into()),
                max_in_flight: e.max_in_flight.unwrap_or(4),
            };
            spec.validate().map_err(|err| match err {
                crate::Error::Invalid { field, reason } => {
                    invalid(format!("endpoints[{i}].{field}"), reason)
                }
                other => invalid(format!("endpoints[{i}]"), other.to_string()),
            })?;
            endpoints.push(spec);
        }

        Ok(Config {
            database_url,
            listen,
            worker: WorkerConfig {
                time_scale,
                jitter,
                poll_interval,
                batch_size,
                max_in_flight,
                lease,
                max_retry_after,
                breaker_threshold,
                breaker_cooldown,
                schedule,
                exhausted_exchange,
                exhausted_routing_key,
                tls_roots: file.tls_roots.unwrap_or_default(),
                tls_ca_file: file.tls_ca_file,
            },
            tokens,
            endpoints,
            previous_secret_valid_for,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_file_loads_and_env_overrides_it() {
        let cfg = Config::from_toml(
            r#"
            database_url = "postgres://x/y"
            listen = "127.0.0.1:7000"
            time_scale = 0.5
            schedule = "1s, 2s"
            [[tokens]]
            token = "partner-a-token-0123"
            endpoints = ["partner-a"]
            [[endpoints]]
            id = "partner-a"
            url = "http://127.0.0.1:9000/hook"
            secret = "0123456789abcdef"
            required_body = "success"
            "#,
            |k| (k == "NOTIFIER_TIME_SCALE").then(|| "0.001".to_owned()),
        )
        .unwrap();
        assert_eq!(cfg.worker.time_scale, 0.001);
        assert_eq!(cfg.worker.schedule.max_attempts(), 3);
        assert_eq!(cfg.endpoints[0].required_body.as_deref(), Some("success"));
        assert_eq!(cfg.tokens.len(), 1);
    }

    #[test]
    fn bad_values_name_their_key() {
        let err = Config::from_toml("time_scale = -1.0", |_| None).unwrap_err();
        assert!(err.to_string().contains("`time_scale`"), "{err}");
        let err = Config::from_toml(
            "[[endpoints]]\nid = \"a\"\nurl = \"ftp://x\"\nsecret = \"0123456789abcdef\"",
            |_| None,
        )
        .unwrap_err();
        assert!(err.to_string().contains("endpoints[0].url"), "{err}");
        let err = Config::from_toml("scheduel = \"1s\"", |_| None).unwrap_err();
        assert!(err.to_string().contains("scheduel"), "{err}");
    }
}
