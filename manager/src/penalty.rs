//! Misbehaving agents are told to come back later, never cut off by force. Every request the
//! manager has to refuse (malformed, from outside the agents' domains, for an unknown job or a
//! lost lease, a refused assignment) is a strike against its sender's bare JID, and so is every
//! work request beyond `max_requests` a minute. A sender with `max_strikes` strikes within a
//! minute cools down: its work requests are answered "no work, retry after N s" without
//! looking at the queue until the cooldown ends. Its reports are still taken: a result is never
//! refused for this.
//!
//! Pure bookkeeping with the caller's clock; memory is bounded by forgetting quiet senders.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The counting window.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Senders remembered at most; quiet ones are forgotten first.
const MAX_SENDERS: usize = 100_000;
/// Least time between two scans for quiet senders.
const PRUNE_EVERY: Duration = Duration::from_secs(1);

/// How strict to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Strikes within [`WINDOW`] that start a cooldown.
    pub max_strikes: u32,
    /// Work requests within [`WINDOW`] before each further one is a strike.
    pub max_requests: u32,
    /// How long a cooldown lasts.
    pub cooldown: Duration,
}

#[derive(Debug)]
struct Record {
    window_start: Instant,
    strikes: u32,
    requests: u32,
    cooling_until: Option<Instant>,
}

impl Record {
    fn new(now: Instant) -> Record {
        Record {
            window_start: now,
            strikes: 0,
            requests: 0,
            cooling_until: None,
        }
    }

    /// How long this sender must still wait, if it is cooling down.
    fn cooling(&self, now: Instant) -> Option<Duration> {
        self.cooling_until.filter(|t| *t > now).map(|t| t - now)
    }

    /// One strike; the cooldown if it started one.
    fn strike(&mut self, policy: &Policy, now: Instant) -> Option<Duration> {
        self.strikes += 1;
        if self.strikes < policy.max_strikes || self.cooling(now).is_some() {
            return None;
        }
        self.cooling_until = Some(now + policy.cooldown);
        self.strikes = 0;
        Some(policy.cooldown)
    }
}

/// Strikes and cooldowns per sender.
#[derive(Debug)]
pub struct Penalties {
    policy: Policy,
    senders: HashMap<String, Record>,
    /// When quiet senders were last forgotten.
    pruned_at: Option<Instant>,
}

impl Penalties {
    pub fn new(policy: Policy) -> Penalties {
        Penalties {
            policy,
            senders: HashMap::new(),
            pruned_at: None,
        }
    }

    /// The record of `sender`, its window started afresh if the last one is over. `None` when
    /// [`MAX_SENDERS`] others are remembered and none of them is quiet: memory stays bounded,
    /// and the map is scanned for quiet ones at most once a second, however many new senders
    /// come.
    fn record(&mut self, sender: &str, now: Instant) -> Option<&mut Record> {
        if !self.senders.contains_key(sender) && self.senders.len() >= MAX_SENDERS {
            if self
                .pruned_at
                .is_none_or(|t| now.duration_since(t) >= PRUNE_EVERY)
            {
                self.pruned_at = Some(now);
                self.senders.retain(|_, r| {
                    r.cooling(now).is_some() || now.duration_since(r.window_start) < WINDOW
                });
            }
            if self.senders.len() >= MAX_SENDERS {
                return None;
            }
        }
        let r = self
            .senders
            .entry(sender.to_owned())
            .or_insert_with(|| Record::new(now));
        if now.duration_since(r.window_start) >= WINDOW {
            r.window_start = now;
            r.strikes = 0;
            r.requests = 0;
        }
        Some(r)
    }

    /// A refused request from `sender`. Returns the cooldown if this strike started one.
    pub fn strike(&mut self, sender: &str, now: Instant) -> Option<Duration> {
        let policy = self.policy;
        self.record(sender, now)?.strike(&policy, now)
    }

    /// A work request from `sender`: how long it must still wait, if it is cooling down (a
    /// request beyond the allowed rate is a strike first).
    pub fn request(&mut self, sender: &str, now: Instant) -> Option<Duration> {
        let policy = self.policy;
        let r = self.record(sender, now)?;
        r.requests += 1;
        if r.requests > policy.max_requests {
            r.strike(&policy, now);
        }
        r.cooling(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Policy = Policy {
        max_strikes: 3,
        max_requests: 5,
        cooldown: Duration::from_secs(120),
    };

    #[test]
    fn strikes_start_a_cooldown_that_ends() {
        let t0 = Instant::now();
        let mut p = Penalties::new(POLICY);
        assert_eq!(p.strike("rogue@x", t0), None);
        assert_eq!(p.strike("rogue@x", t0), None);
        assert_eq!(p.request("good@x", t0), None, "others are not affected");
        assert_eq!(p.strike("rogue@x", t0), Some(POLICY.cooldown));
        let later = t0 + Duration::from_secs(20);
        assert_eq!(
            p.request("rogue@x", later),
            Some(Duration::from_secs(100)),
            "the rest of the cooldown"
        );
        assert_eq!(p.request("rogue@x", t0 + Duration::from_secs(121)), None);
    }

    #[test]
    fn strikes_in_different_windows_do_not_add_up() {
        let t0 = Instant::now();
        let mut p = Penalties::new(POLICY);
        for minute in 0..10u64 {
            let t = t0 + Duration::from_secs(61 * minute);
            assert_eq!(p.strike("slow@x", t), None);
            assert_eq!(p.strike("slow@x", t), None);
        }
    }

    #[test]
    fn too_many_requests_are_strikes() {
        let t0 = Instant::now();
        let mut p = Penalties::new(POLICY);
        // 5 allowed, then each one more is a strike: the third such starts the cooldown.
        let waits: Vec<Option<Duration>> = (0..8).map(|_| p.request("flood@x", t0)).collect();
        assert!(waits[..7].iter().all(Option::is_none), "{waits:?}");
        assert_eq!(waits[7], Some(POLICY.cooldown));
    }

    #[test]
    fn memory_stays_bounded_when_every_sender_is_busy() {
        let t0 = Instant::now();
        let mut p = Penalties::new(POLICY);
        for i in 0..MAX_SENDERS {
            p.strike(&format!("s{i}@x"), t0);
        }
        // No one is quiet: a new sender is not remembered, so it never cools down.
        for _ in 0..10 {
            assert_eq!(p.strike("new@x", t0), None);
        }
        assert_eq!(p.senders.len(), MAX_SENDERS);
        // A window later the others are quiet and forgotten: the new one counts again.
        let later = t0 + WINDOW;
        assert_eq!(p.strike("new@x", later), None);
        assert_eq!(p.strike("new@x", later), None);
        assert_eq!(p.strike("new@x", later), Some(POLICY.cooldown));
        assert_eq!(p.senders.len(), 1);
    }
}
