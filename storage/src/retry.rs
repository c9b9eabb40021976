//! Retries with exponential backoff and jitter, shared by every transfer.

use std::time::Duration;

use rand::Rng;

/// First retry delay; doubles with each retry, plus up to half of it as jitter.
const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// Longest delay between two tries.
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// How often a failed transfer is tried again.
#[derive(Clone, Copy, Debug)]
pub struct Retry {
    /// Tries after the first one.
    pub retries: u32,
}

impl Retry {
    /// The pause before retry number `retry` (0-based), or `None` when the retries are used
    /// up.
    pub fn delay(&self, retry: u32) -> Option<Duration> {
        (retry < self.retries).then(|| backoff(retry))
    }
}

/// Delay before retry number `retry` (0-based): exponential, capped, with jitter.
fn backoff(retry: u32) -> Duration {
    let exp = BACKOFF_BASE
        .saturating_mul(1u32 << retry.min(16))
        .min(BACKOFF_MAX);
    let jitter_ms = rand::thread_rng().gen_range(0..=exp.as_millis() as u64 / 2);
    exp + Duration::from_millis(jitter_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!(backoff(0) >= BACKOFF_BASE && backoff(0) <= BACKOFF_BASE * 3 / 2);
        assert!(backoff(3) >= BACKOFF_BASE * 8);
        assert!(backoff(40) <= BACKOFF_MAX * 3 / 2);
        let r = Retry { retries: 2 };
        assert!(r.delay(0).is_some() && r.delay(1).is_some());
        assert_eq!(r.delay(2), None);
    }
}
