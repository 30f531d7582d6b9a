//! The retry schedule: how long to wait after each failed attempt. The first attempt goes out
//! when the notification is due; after failed attempt `n` the next one waits `steps[n-1]`
//! (scaled, with jitter, at least any `Retry-After` the receiver asked for). After the last step
//! has been waited and that attempt failed too, the notification is exhausted: a schedule of 15
//! steps means 16 attempts.

use std::time::Duration;

/// The default steps, the payment providers' practice: 15 s, 15 s, 30 s, 3 min, 10 min, 20 min,
/// 30 min, 30 min, 30 min, 60 min, 3 h, 3 h, 3 h, 6 h, 6 h (about 24 h in all).
pub const DEFAULT_STEPS_SECS: [u64; 15] = [
    15, 15, 30, 180, 600, 1200, 1800, 1800, 1800, 3600, 10800, 10800, 10800, 21600, 21600,
];

/// An ordered list of waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    steps: Vec<Duration>,
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule {
            steps: DEFAULT_STEPS_SECS
                .iter()
                .map(|s| Duration::from_secs(*s))
                .collect(),
        }
    }
}

impl Schedule {
    /// A schedule from explicit waits (at least one).
    pub fn new(steps: Vec<Duration>) -> Option<Self> {
        (!steps.is_empty()).then_some(Schedule { steps })
    }

    /// From the `schedule_ms` column of an endpoint.
    pub fn from_millis(ms: &[i32]) -> Option<Self> {
        Self::new(
            ms.iter()
                .map(|m| Duration::from_millis((*m).max(0) as u64))
                .collect(),
        )
    }

    /// Parses `"15s, 15s, 30s, 3m, 1h"` (units `ms`, `s`, `m`, `h`).
    pub fn parse(text: &str) -> Result<Self, String> {
        let steps = text
            .split(',')
            .map(|s| parse_duration(s.trim()))
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(steps).ok_or_else(|| "needs at least one step".to_owned())
    }

    /// The waits.
    pub fn steps(&self) -> &[Duration] {
        &self.steps
    }

    /// Attempts made before exhaustion: one more than the steps.
    pub fn max_attempts(&self) -> usize {
        self.steps.len() + 1
    }

    /// The wait after the `failed`-th failed attempt of a round (1-based), or `None` when the
    /// schedule is used up. `scale` multiplies it (tests use 0.001); `jitter` in `0..1` spreads
    /// it by up to that fraction either way so a partner coming back is not hit by every
    /// notification in the same instant.
    pub fn delay_after(&self, failed: usize, scale: f64, jitter: f64) -> Option<Duration> {
        let base = *self.steps.get(failed.checked_sub(1)?)?;
        let spread = if jitter > 0.0 {
            1.0 + rand::random_range(-jitter..=jitter)
        } else {
            1.0
        };
        Some(Duration::from_secs_f64(
            (base.as_secs_f64() * scale * spread).max(0.0),
        ))
    }
}

/// `"250ms"`, `"15s"`, `"3m"`, `"6h"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let (num, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| text.split_at(i))
        .ok_or_else(|| format!("{text:?} has no unit (ms, s, m or h)"))?;
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{text:?} does not start with a whole number"))?;
    let per = match unit {
        "ms" => Duration::from_millis(1),
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        other => return Err(format!("{text:?}: unknown unit {other:?} (ms, s, m or h)")),
    };
    per.checked_mul(u32::try_from(n).map_err(|_| format!("{text:?} is too large"))?)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// A `Retry-After` value: delay seconds or an HTTP date (RFC 9110 section 10.2.3).
pub fn parse_retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_schedule_is_the_fifteen_step_table() {
        let s = Schedule::default();
        assert_eq!(s.max_attempts(), 16);
        assert_eq!(s.delay_after(1, 1.0, 0.0), Some(Duration::from_secs(15)));
        assert_eq!(s.delay_after(4, 1.0, 0.0), Some(Duration::from_secs(180)));
        assert_eq!(
            s.delay_after(15, 1.0, 0.0),
            Some(Duration::from_secs(21600))
        );
        assert_eq!(s.delay_after(16, 1.0, 0.0), None);
        let total: u64 = DEFAULT_STEPS_SECS.iter().sum();
        assert_eq!(total, 86_640);
    }

    #[test]
    fn jitter_and_scale_bound_the_delay() {
        let s = Schedule::default();
        for _ in 0..100 {
            let d = s.delay_after(4, 0.001, 0.1).unwrap().as_secs_f64();
            assert!((0.162..=0.198).contains(&d), "{d}");
        }
    }

    #[test]
    fn parses_steps_and_rejects_bad_units() {
        let s = Schedule::parse("250ms, 15s,3m,1h").unwrap();
        assert_eq!(
            s.steps(),
            &[
                Duration::from_millis(250),
                Duration::from_secs(15),
                Duration::from_secs(180),
                Duration::from_secs(3600)
            ]
        );
        assert!(Schedule::parse("15").is_err());
        assert!(Schedule::parse("15d").is_err());
        assert!(Schedule::parse("").is_err());
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let now = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
