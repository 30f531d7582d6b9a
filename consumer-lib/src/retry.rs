//! The retry policy: how many attempts, and how long to wait before each retry.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// Exponential backoff with jitter, computed with `backon`.
///
/// The delay before retry `n` (after the `n`-th failure) is
/// `min(min_delay * factor^(n-1), max_delay)`, plus, with jitter on, a random extra of up to
/// the same amount again. After `max_attempts` failed attempts the message is dead-lettered.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    max_attempts: u32,
    min_delay: Duration,
    max_delay: Duration,
    factor: f32,
    jitter: bool,
}

impl Default for RetryPolicy {
    /// 8 attempts, 1 s doubling to at most 5 min, with jitter: about 10 minutes of retrying
    /// before a message is dead-lettered, enough to ride out a deploy or a failover.
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 8,
            min_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(300),
            factor: 2.0,
            jitter: true,
        }
    }
}

impl RetryPolicy {
    /// The default policy; see [`RetryPolicy::default`].
    pub fn exponential() -> Self {
        Self::default()
    }

    /// Attempts in total, the first delivery included (1 = never retry).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts;
        self
    }

    /// The delay before the first retry.
    pub fn min_delay(mut self, delay: Duration) -> Self {
        self.min_delay = delay;
        self
    }

    /// The longest delay between two attempts (before jitter).
    pub fn max_delay(mut self, delay: Duration) -> Self {
        self.max_delay = delay;
        self
    }

    /// How much each delay grows over the previous one.
    pub fn factor(mut self, factor: f32) -> Self {
        self.factor = factor;
        self
    }

    /// Whether to add random jitter, so messages that failed together do not all come back
    /// at the same instant.
    pub fn jitter(mut self, jitter: bool) -> Self {
        self.jitter = jitter;
        self
    }

    /// The configured number of attempts.
    pub fn attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The delay before the retry that follows the `failed`-th failed attempt (1-based).
    pub fn delay_after(&self, failed: u32) -> Duration {
        let mut builder = ExponentialBuilder::default()
            .with_min_delay(self.min_delay)
            .with_max_delay(self.max_delay)
            .with_factor(self.factor)
            .without_max_times();
        if self.jitter {
            builder = builder.with_jitter();
        }
        let index = failed.saturating_sub(1) as usize;
        builder.build().nth(index).unwrap_or(self.max_delay)
    }

    /// An upper bound of the time between a message's first and last attempt: the inbox must
    /// remember a message at least this long, or a late retry could run twice.
    pub fn horizon(&self) -> Duration {
        let mut total = Duration::ZERO;
        let mut delay = self.min_delay;
        for _ in 1..self.max_attempts {
            let bounded = delay.min(self.max_delay);
            total = total.saturating_add(if self.jitter { bounded * 2 } else { bounded });
            delay = delay.mul_f32(self.factor.max(1.0));
        }
        total
    }

    pub(crate) fn validate(&self) -> Result<(), crate::Error> {
        if self.max_attempts == 0 {
            return Err(crate::Error::config(
                "retry.max_attempts",
                "must be at least 1",
            ));
        }
        if !(self.factor >= 1.0 && self.factor.is_finite()) {
            return Err(crate::Error::config(
                "retry.factor",
                format!("must be a finite number >= 1, got {}", self.factor),
            ));
        }
        if self.min_delay > self.max_delay {
            return Err(crate::Error::config(
                "retry.min_delay",
                "must not exceed retry.max_delay",
            ));
        }
        if self.max_delay > crate::delay::MAX_DELAY {
            return Err(crate::Error::config(
                "retry.max_delay",
                format!("must be at most {:?}", crate::delay::MAX_DELAY),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_stay_within_jitter_bounds() {
        let policy = RetryPolicy::default()
            .min_delay(Duration::from_millis(100))
            .max_delay(Duration::from_secs(1));
        for failed in 1..10 {
            let base = Duration::from_millis(100)
                .mul_f32(2f32.powi(failed as i32 - 1))
                .min(Duration::from_secs(1));
            let d = policy.delay_after(failed);
            assert!(
                d >= base && d <= base * 2,
                "attempt {failed}: {d:?} vs {base:?}"
            );
        }
    }

    #[test]
    fn without_jitter_delays_are_exact() {
        let policy = RetryPolicy::default()
            .jitter(false)
            .min_delay(Duration::from_millis(200));
        assert_eq!(policy.delay_after(1).as_millis(), 200);
        assert_eq!(policy.delay_after(3).as_millis(), 800);
    }
}
