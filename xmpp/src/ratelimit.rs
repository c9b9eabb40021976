//! A log limiter: lines that outsiders can provoke (malformed stanzas, refused requests) are
//! logged at most a few times per interval; the rest are counted and summarized.

use std::time::{Duration, Instant};

/// Allows `burst` log lines per `interval` and counts the ones it suppresses.
#[derive(Debug)]
pub struct LogLimiter {
    interval: Duration,
    burst: u32,
    window_start: Instant,
    used: u32,
    suppressed: u64,
}

impl LogLimiter {
    /// A limiter for `burst` lines per `interval`.
    pub fn new(burst: u32, interval: Duration) -> Self {
        Self {
            interval,
            burst,
            window_start: Instant::now(),
            used: 0,
            suppressed: 0,
        }
    }

    /// Whether a line may be logged now. When a new interval starts, returns how many lines were
    /// suppressed in the previous ones, so the caller can say so.
    pub fn check(&mut self, now: Instant) -> Option<u64> {
        if now.duration_since(self.window_start) >= self.interval {
            self.window_start = now;
            self.used = 0;
        }
        if self.used < self.burst {
            self.used += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_a_burst_then_counts() {
        let t0 = Instant::now();
        let mut l = LogLimiter::new(2, Duration::from_secs(10));
        assert_eq!(l.check(t0), Some(0));
        assert_eq!(l.check(t0), Some(0));
        assert_eq!(l.check(t0), None);
        assert_eq!(l.check(t0), None);
        assert_eq!(l.check(t0 + Duration::from_secs(11)), Some(2));
    }
}
