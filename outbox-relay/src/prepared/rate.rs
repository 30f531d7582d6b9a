//! The per-host rate of check requests: at most `per_host_rate` a second to one `host:port`,
//! with bursts of `per_host_burst`, per relay process.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// `host:port` of a check URL: the unit of the per-host rate.
pub(super) fn host_key(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => format!(
            "{}:{}",
            u.host_str().unwrap_or(""),
            u.port_or_known_default().unwrap_or(0)
        ),
        Err(_) => String::new(),
    }
}

/// A per-host rate limit (GCRA): each host has a theoretical arrival time `tat`; a request may
/// go when `tat` is at most `burst` intervals ahead of now. A request over the limit reserves
/// the next slot and is told how long to wait for it, so deferred checks of one host are spread
/// out at the rate instead of all coming back at once; when the check comes back at its slot it
/// goes without taking another one (otherwise later reservations would keep pushing it back).
pub(super) struct HostLimiter {
    interval: Duration,
    tolerance: Duration,
    hosts: HashMap<String, Instant>,
    /// Slots reserved by deferred checks, by message id.
    reserved: HashMap<i64, Instant>,
}

impl HostLimiter {
    pub(super) fn new(rate: f64, burst: u32) -> Self {
        let interval = Duration::from_secs_f64(1.0 / rate);
        HostLimiter {
            interval,
            tolerance: interval * burst.saturating_sub(1),
            hosts: HashMap::new(),
            reserved: HashMap::new(),
        }
    }

    /// `None`: check message `id` now. `Some(wait)`: its slot is `wait` from now.
    pub(super) fn reserve(&mut self, host: &str, id: i64) -> Option<Duration> {
        let now = Instant::now();
        if let Some(slot) = self.reserved.remove(&id) {
            // The database clock and this one agree only roughly: a little early is on time.
            if slot <= now + Duration::from_millis(50) {
                return None;
            }
            self.reserved.insert(id, slot);
            return Some(slot - now);
        }
        if self.hosts.len() > 10_000 {
            // Forget hosts that are idle (their tat is in the past) so the map stays bounded.
            self.hosts.retain(|_, tat| *tat > now);
        }
        if self.reserved.len() > 100_000 {
            // Reservations of checks that another relay took over.
            self.reserved
                .retain(|_, slot| *slot + Duration::from_secs(300) > now);
        }
        let tat = self.hosts.entry(host.to_owned()).or_insert(now);
        let start = (*tat).max(now);
        let wait = start.saturating_duration_since(now + self.tolerance);
        *tat = start + self.interval;
        if wait.is_zero() {
            None
        } else {
            self.reserved.insert(id, now + wait);
            Some(wait)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_limiter_allows_a_burst_then_spreads_the_rest_at_the_rate() {
        let mut l = HostLimiter::new(10.0, 3);
        assert_eq!(l.reserve("a:80", 1), None);
        assert_eq!(l.reserve("a:80", 2), None);
        assert_eq!(l.reserve("a:80", 3), None);
        let w1 = l.reserve("a:80", 4).expect("over the burst");
        let w2 = l.reserve("a:80", 5).expect("over the burst");
        assert!(
            w1 > Duration::from_millis(50) && w1 <= Duration::from_millis(100),
            "{w1:?}"
        );
        assert!(w2 > w1 + Duration::from_millis(90), "{w1:?} {w2:?}");
        // Coming back early keeps the reserved slot; another host has its own budget.
        let again = l.reserve("a:80", 5).expect("still early");
        assert!(
            again <= w2 && again + Duration::from_millis(20) > w2,
            "{again:?} {w2:?}"
        );
        assert_eq!(l.reserve("b:80", 6), None);
        // At its slot a deferred check goes without taking another.
        std::thread::sleep(w1);
        assert_eq!(l.reserve("a:80", 4), None);
    }
}
