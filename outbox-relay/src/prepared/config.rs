//! The `[checkback]` section of the relay's configuration: when and how often a prepared
//! message is checked, and the bounds that keep a dead producer from causing a storm.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use serde::Deserialize;

/// The `[checkback]` section of the relay's configuration. Durations are in milliseconds, like
/// the rest of the relay's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckbackConfig {
    /// Run check-back in this relay. Turn it off on all but some relays to concentrate checks.
    pub enabled: bool,
    /// How long a prepared message may stay undecided before its first check.
    #[serde(deserialize_with = "millis")]
    pub check_after_ms: Duration,
    /// Checks before an undecided message is parked as unresolved.
    pub max_checks: u32,
    /// Wait after the first unanswered check; it grows by `backoff_factor` per check...
    #[serde(deserialize_with = "millis")]
    pub backoff_min_ms: Duration,
    /// ...up to this.
    #[serde(deserialize_with = "millis")]
    pub backoff_max_ms: Duration,
    /// Growth of the wait per unanswered check.
    pub backoff_factor: f32,
    /// Add up to 100 % random jitter to each wait, so messages prepared together are not
    /// checked together.
    pub jitter: bool,
    /// Check requests in flight at once (per relay process).
    pub concurrency: usize,
    /// Check requests per second to one host (`host:port`), per relay process.
    pub per_host_rate: f64,
    /// Requests to one host that may go out at once before `per_host_rate` applies.
    pub per_host_burst: u32,
    /// A check request is a failed check after this long (connect included).
    #[serde(deserialize_with = "millis")]
    pub request_timeout_ms: Duration,
    /// How often to look for due checks when there were none.
    #[serde(deserialize_with = "millis")]
    pub poll_interval_ms: Duration,
    /// Checks claimed per query.
    pub batch_size: u32,
    /// How long decisions are remembered (so a repeated commit is answered 200 and a
    /// contradicting one 409); after that the id is unknown (404).
    #[serde(deserialize_with = "millis")]
    pub outcome_retention_ms: Duration,
}

impl Default for CheckbackConfig {
    fn default() -> Self {
        CheckbackConfig {
            enabled: true,
            check_after_ms: Duration::from_secs(10),
            // With the backoff below: checks at about 10 s, 20 s, 40 s, 80 s, 160 s, 320 s,
            // then every 5 min (up to twice that with jitter): parked after about an hour.
            max_checks: 15,
            backoff_min_ms: Duration::from_secs(10),
            backoff_max_ms: Duration::from_secs(300),
            backoff_factor: 2.0,
            jitter: true,
            concurrency: 16,
            per_host_rate: 20.0,
            per_host_burst: 20,
            request_timeout_ms: Duration::from_secs(5),
            poll_interval_ms: Duration::from_secs(1),
            batch_size: 100,
            outcome_retention_ms: Duration::from_secs(24 * 3600),
        }
    }
}

/// A `[checkback]` value that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("config key `checkback.{key}`: {reason}")]
pub struct CheckbackConfigError {
    /// The key inside `[checkback]`.
    pub key: &'static str,
    /// What is wrong.
    pub reason: String,
}

impl CheckbackConfig {
    /// Checks ranges; the error names the key.
    pub fn validate(&self) -> Result<(), CheckbackConfigError> {
        let invalid = |key, reason: &str| {
            Err(CheckbackConfigError {
                key,
                reason: reason.to_owned(),
            })
        };
        if self.max_checks < 1 {
            return invalid("max_checks", "must be at least 1");
        }
        if self.backoff_min_ms.is_zero() || self.backoff_min_ms > self.backoff_max_ms {
            return invalid(
                "backoff_min_ms",
                "must be above 0 and at most backoff_max_ms",
            );
        }
        if !(self.backoff_factor >= 1.0 && self.backoff_factor <= 100.0) {
            return invalid("backoff_factor", "must be between 1 and 100");
        }
        if !(1..=1024).contains(&self.concurrency) {
            return invalid("concurrency", "must be between 1 and 1024");
        }
        if !(self.per_host_rate > 0.0 && self.per_host_rate.is_finite()) {
            return invalid(
                "per_host_rate",
                "must be a positive number of requests per second",
            );
        }
        if self.per_host_burst < 1 {
            return invalid("per_host_burst", "must be at least 1");
        }
        if self.request_timeout_ms.is_zero() {
            return invalid("request_timeout_ms", "must be above 0");
        }
        if self.poll_interval_ms.is_zero() {
            return invalid("poll_interval_ms", "must be above 0");
        }
        if !(1..=10_000).contains(&self.batch_size) {
            return invalid("batch_size", "must be between 1 and 10000");
        }
        if self.outcome_retention_ms < Duration::from_secs(60) {
            return invalid(
                "outcome_retention_ms",
                "must be at least 60000 (one minute)",
            );
        }
        Ok(())
    }

    /// How long a claimed check keeps other relays away: the request's timeout plus margin for
    /// recording the answer. Past it, a check whose relay died is claimed again.
    pub(super) fn lease(&self) -> Duration {
        self.request_timeout_ms * 2 + Duration::from_secs(5)
    }

    /// The wait after the `failed`-th unanswered check (1-based).
    pub(super) fn backoff(&self, failed: u32) -> Duration {
        let mut builder = ExponentialBuilder::new()
            .with_min_delay(self.backoff_min_ms)
            .with_max_delay(self.backoff_max_ms)
            .with_factor(self.backoff_factor)
            .without_max_times();
        if self.jitter {
            builder = builder.with_jitter();
        }
        builder
            .build()
            .nth(failed.saturating_sub(1) as usize)
            .unwrap_or(self.backoff_max_ms)
    }
}

fn millis<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    Ok(Duration::from_millis(u64::deserialize(d)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_is_refused() {
        let err = toml::from_str::<CheckbackConfig>("max_check = 3").unwrap_err();
        assert!(err.to_string().contains("max_check"), "{err}");
    }

    #[test]
    fn defaults_check_after_ten_seconds() {
        let c: CheckbackConfig = toml::from_str("").unwrap();
        assert_eq!(c.check_after_ms, Duration::from_secs(10));
        c.validate().unwrap();
    }

    #[test]
    fn out_of_range_value_is_named() {
        let c: CheckbackConfig = toml::from_str("max_checks = 0").unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("checkback.max_checks"), "{err}");
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let c = CheckbackConfig {
            jitter: false,
            backoff_min_ms: Duration::from_secs(10),
            backoff_max_ms: Duration::from_secs(60),
            ..CheckbackConfig::default()
        };
        assert_eq!(c.backoff(1), Duration::from_secs(10));
        assert_eq!(c.backoff(2), Duration::from_secs(20));
        assert_eq!(c.backoff(3), Duration::from_secs(40));
        assert_eq!(c.backoff(4), Duration::from_secs(60));
        assert_eq!(c.backoff(40), Duration::from_secs(60));
    }
}
