//! The agent's gate for assignments: before anything of an assignment is staged or run, its
//! signature must verify against the config's `trust.manager_key`, be made for this agent and
//! not have expired (`copilot_protocol::signing`), and its job attempt must not have been given
//! to this agent before in this session (a replay). With `trust.insecure_unsigned_jobs` (and no
//! key) the gate lets everything through.
//!
//! The replay memory is bounded: it keeps each admitted attempt until its signature expires
//! (after that, the expiry check refuses it anyway). Should it fill up, it forgets the attempt
//! that expires first and from then on refuses everything that expires no later than that: a
//! forgotten attempt can never be admitted twice.

use std::collections::HashMap;
use std::sync::Mutex;

use copilot_protocol::signing::{PublicKey, Recipient};
use copilot_protocol::wire::{Assignment, Refusal};
use copilot_protocol::JobId;

/// Attempts remembered at most (a few hundred KiB).
pub const REPLAY_MEMORY: usize = 8192;

/// Decides which assignments the agent acts on.
#[derive(Debug)]
pub struct Gate {
    /// `None`: unsigned work is accepted (development only).
    key: Option<PublicKey>,
    seen: Mutex<Seen>,
}

impl Gate {
    /// A gate for assignments signed with `key`; `None` lets every assignment through.
    pub fn new(key: Option<PublicKey>) -> Gate {
        Gate::with_memory(key, REPLAY_MEMORY)
    }

    fn with_memory(key: Option<PublicKey>, capacity: usize) -> Gate {
        Gate {
            key,
            seen: Mutex::new(Seen {
                expiries: HashMap::new(),
                floor: 0,
                capacity: capacity.max(1),
            }),
        }
    }

    /// Whether the agent `me` may act on `a` at `now` (unix seconds). An admitted attempt is
    /// remembered: the same one is refused as a replay afterwards.
    pub fn admit(&self, a: &Assignment, me: &Recipient<'_>, now: u64) -> Result<(), Refusal> {
        let Some(key) = &self.key else {
            return Ok(());
        };
        key.check(a, me, now)?;
        // `check` passed, so there is a seal.
        let expires = a.seal.as_ref().map_or(0, |s| s.expires);
        // Plain data behind the lock: a poisoned lock is still consistent.
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.admit((a.job, a.attempt), expires, now)
    }
}

/// The attempts admitted, with their expiry times.
#[derive(Debug)]
struct Seen {
    expiries: HashMap<(JobId, u32), u64>,
    /// Everything expiring at or before this is refused: an attempt forgotten for room
    /// expired no later.
    floor: u64,
    capacity: usize,
}

impl Seen {
    fn admit(&mut self, attempt: (JobId, u32), expires: u64, now: u64) -> Result<(), Refusal> {
        self.expiries.retain(|_, e| *e >= now);
        if self.expiries.contains_key(&attempt) || expires <= self.floor {
            return Err(Refusal::Replayed);
        }
        // One in, one out (the memory never holds more than its capacity).
        if self.expiries.len() >= self.capacity {
            if let Some((&first, &at)) = self.expiries.iter().min_by_key(|(_, e)| **e) {
                if expires <= at {
                    // It would be below the floor at once: as good as forgotten already.
                    return Err(Refusal::Replayed);
                }
                self.expiries.remove(&first);
                self.floor = self.floor.max(at);
            }
        }
        self.expiries.insert(attempt, expires);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use copilot_protocol::signing::SigningKey;

    use super::*;

    const ME: Recipient<'static> = Recipient {
        agent: "agent-1",
        jid: "agent-1@localhost",
    };
    const NOW: u64 = 1_764_900_000;

    fn job(key: &SigningKey, job: JobId, attempt: u32, expires: u64) -> Assignment {
        let mut a = Assignment {
            attempt,
            ..crate::testutil::assignment(job, "j")
        };
        key.seal(&mut a, ME.agent, ME.jid, expires);
        a
    }

    #[test]
    fn an_attempt_is_admitted_once() {
        let (key, _) = SigningKey::generate().unwrap();
        let gate = Gate::new(Some(key.public_key()));
        let a = job(&key, 1, 1, NOW + 60);
        assert_eq!(gate.admit(&a, &ME, NOW), Ok(()));
        assert_eq!(gate.admit(&a, &ME, NOW + 1), Err(Refusal::Replayed));
        // The same attempt signed again (later) is still a replay; the next attempt is not.
        let again = job(&key, 1, 1, NOW + 120);
        assert_eq!(gate.admit(&again, &ME, NOW + 2), Err(Refusal::Replayed));
        assert_eq!(gate.admit(&job(&key, 1, 2, NOW + 60), &ME, NOW), Ok(()));
        // Once expired, the signature check refuses it.
        assert_eq!(gate.admit(&a, &ME, NOW + 61), Err(Refusal::Expired));
        let mut unsigned = job(&key, 2, 1, NOW + 60);
        unsigned.seal = None;
        assert_eq!(gate.admit(&unsigned, &ME, NOW), Err(Refusal::Unsigned));
    }

    #[test]
    fn a_full_memory_forgets_nothing_it_could_admit_again() {
        let (key, _) = SigningKey::generate().unwrap();
        let gate = Gate::with_memory(Some(key.public_key()), 3);
        let jobs: Vec<Assignment> = (1..=5).map(|n| job(&key, n, 1, NOW + 100 + n)).collect();
        for a in &jobs {
            assert_eq!(gate.admit(a, &ME, NOW), Ok(()), "job {}", a.job);
        }
        // Jobs 1 and 2 were forgotten for room, but expire before the floor: still refused.
        for a in &jobs {
            assert_eq!(
                gate.admit(a, &ME, NOW),
                Err(Refusal::Replayed),
                "job {}",
                a.job
            );
        }
        let seen = gate.seen.lock().unwrap();
        assert_eq!(seen.expiries.len(), 3);
        assert_eq!(seen.floor, NOW + 102);
    }

    #[test]
    fn expired_attempts_leave_the_memory() {
        let (key, _) = SigningKey::generate().unwrap();
        let gate = Gate::with_memory(Some(key.public_key()), 2);
        assert_eq!(gate.admit(&job(&key, 1, 1, NOW + 10), &ME, NOW), Ok(()));
        assert_eq!(gate.admit(&job(&key, 2, 1, NOW + 10), &ME, NOW), Ok(()));
        // Both have expired by now: room without raising the floor.
        assert_eq!(
            gate.admit(&job(&key, 3, 1, NOW + 50), &ME, NOW + 20),
            Ok(())
        );
        assert_eq!(gate.seen.lock().unwrap().floor, 0);
    }

    #[test]
    fn without_a_key_everything_passes() {
        let (key, _) = SigningKey::generate().unwrap();
        let gate = Gate::new(None);
        let mut a = job(&key, 1, 1, NOW - 1);
        a.seal = None;
        assert_eq!(gate.admit(&a, &ME, NOW), Ok(()));
        assert_eq!(gate.admit(&a, &ME, NOW), Ok(()));
    }
}
