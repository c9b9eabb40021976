//! Activity over time for the dashboard and `GET /api/summary`, computed from the queue's
//! `events` table without touching the dispatch path: [`Stats::refresh`] reads only the events
//! logged since its last call (by row id), and keeps per-second counts of attempts started, jobs
//! done and failed, the queue depth after every second that changed it, and lost attempts by
//! cause. [`Stats::activity`] cuts a window of that into equal buckets.
//!
//! Memory is bounded: seconds older than [`KEEP`] are dropped (the depth before them is kept
//! as one value).

use std::collections::BTreeMap;
use std::sync::Mutex;

use copilot_protocol::summary::{Activity, CauseCount};
use copilot_protocol::JobState;

use crate::queue::{by_count, lost_cause, EventRow, Queue, QueueError};

/// How long per-second counts are kept.
pub const KEEP_SECS: u64 = 7 * 86_400;
/// The longest window [`Stats::activity`] shows.
pub const MAX_WINDOW_SECS: u64 = KEEP_SECS;
/// The most buckets in a window.
pub const MAX_BUCKETS: u64 = 60;
/// Bucket widths in seconds, the smallest that gives at most [`MAX_BUCKETS`] is used.
const BUCKETS: [u64; 16] = [
    1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600,
];
/// Events read per query.
const BATCH: u32 = 5000;

/// What happened in one second.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Second {
    assigned: u64,
    done: u64,
    failed: u64,
}

#[derive(Debug, Default)]
struct Inner {
    /// The last event read.
    cursor: i64,
    seconds: BTreeMap<u64, Second>,
    /// Queue depth at the end of each second in which it changed.
    depth: BTreeMap<u64, u64>,
    /// Depth before the oldest entry of `depth` (after pruning).
    depth_before: u64,
    queued: u64,
    lost: BTreeMap<&'static str, u64>,
}

/// The aggregated activity; shared by all requests.
#[derive(Debug, Default)]
pub struct Stats {
    inner: Mutex<Inner>,
}

impl Inner {
    fn add(&mut self, e: &EventRow) {
        let sec = e.at / 1000;
        let slot = self.seconds.entry(sec).or_default();
        match e.to {
            JobState::Assigned if e.from == "queued" => slot.assigned += 1,
            JobState::Done => slot.done += 1,
            JobState::Failed => slot.failed += 1,
            JobState::Lost => *self.lost.entry(lost_cause(&e.why)).or_default() += 1,
            _ => {}
        }
        let before = self.queued;
        if e.to == JobState::Queued {
            self.queued += 1;
        }
        if e.from == "queued" {
            self.queued = self.queued.saturating_sub(1);
        }
        if self.queued != before {
            self.depth.insert(sec, self.queued);
        }
    }

    fn prune(&mut self, now_sec: u64) {
        let cut = now_sec.saturating_sub(KEEP_SECS);
        self.seconds = self.seconds.split_off(&cut);
        let kept = self.depth.split_off(&cut);
        if let Some((_, d)) = self.depth.last_key_value() {
            self.depth_before = *d;
        }
        self.depth = kept;
    }

    fn depth_at_end_of(&self, sec: u64) -> u64 {
        self.depth
            .range(..=sec)
            .next_back()
            .map_or(self.depth_before, |(_, d)| *d)
    }
}

impl Stats {
    /// Nothing read yet.
    pub fn new() -> Stats {
        Stats::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Plain counters: a panic elsewhere leaves nothing half-done worth refusing.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Read the events logged since the last call (blocking: call it off the async workers).
    pub fn refresh(&self, queue: &Queue, now_ms: u64) -> Result<(), QueueError> {
        let mut inner = self.lock();
        loop {
            let events = queue.events_after(inner.cursor, BATCH)?;
            let Some(last) = events.last() else { break };
            inner.cursor = last.id;
            for e in &events {
                inner.add(e);
            }
            if events.len() < BATCH as usize {
                break;
            }
        }
        inner.prune(now_ms / 1000);
        Ok(())
    }

    /// Lost attempts by cause, most frequent first.
    pub fn lost_attempts(&self) -> Vec<CauseCount> {
        let inner = self.lock();
        by_count(
            inner
                .lost
                .iter()
                .map(|(k, v)| ((*k).to_owned(), *v))
                .collect(),
        )
    }

    /// The activity of the last `window_secs` before `now_ms`, or, without a window, since the
    /// first event of the last day (at least a minute); in at most [`MAX_BUCKETS`] buckets
    /// aligned to multiples of their width, the last one ending after `now_ms`.
    pub fn activity(&self, now_ms: u64, window_secs: Option<u64>) -> Activity {
        let inner = self.lock();
        let now = now_ms / 1000;
        let window = match window_secs {
            Some(w) => w.clamp(1, MAX_WINDOW_SECS),
            None => {
                let first = inner
                    .seconds
                    .range(now.saturating_sub(86_400)..)
                    .next()
                    .map_or(now, |(s, _)| *s);
                (now - first.min(now) + 1).max(60)
            }
        };
        let bucket = BUCKETS
            .into_iter()
            .find(|b| window.div_ceil(*b) <= MAX_BUCKETS)
            .unwrap_or(window.div_ceil(MAX_BUCKETS));
        let end = (now / bucket + 1) * bucket;
        let n = window.div_ceil(bucket).max(1);
        let start = end.saturating_sub(n * bucket);
        let mut a = Activity {
            start_ms: start * 1000,
            bucket_ms: bucket * 1000,
            ..Activity::default()
        };
        for k in 0..n {
            let (from, to) = (start + k * bucket, start + (k + 1) * bucket);
            let mut sum = Second::default();
            for (_, s) in inner.seconds.range(from..to) {
                sum.assigned += s.assigned;
                sum.done += s.done;
                sum.failed += s.failed;
            }
            a.assigned.push(sum.assigned);
            a.done.push(sum.done);
            a.failed.push(sum.failed);
            a.queued.push(inner.depth_at_end_of(to.min(now + 1) - 1));
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(id: i64, from: &str, to: JobState, at: u64, why: &str) -> EventRow {
        EventRow {
            id,
            job: 1,
            attempt: 1,
            from: from.into(),
            to,
            at,
            why: why.into(),
        }
    }

    fn stats(events: &[EventRow]) -> Stats {
        let s = Stats::new();
        {
            let mut inner = s.lock();
            for e in events {
                inner.add(e);
            }
        }
        s
    }

    #[test]
    fn buckets_count_what_happened_when() {
        use JobState::*;
        // t = 100 s: two submitted; 101 s: both assigned; 105 s: one done; 112 s: one failed.
        let s = stats(&[
            ev(1, "new", Queued, 100_000, "submitted"),
            ev(2, "new", Queued, 100_500, "submitted"),
            ev(3, "queued", Assigned, 101_000, "assigned to a"),
            ev(4, "queued", Assigned, 101_200, "assigned to b"),
            ev(5, "assigned", Running, 101_300, "progress"),
            ev(6, "running", Done, 105_000, "succeeded"),
            ev(7, "assigned", Failed, 112_000, "exited with code 1"),
        ]);
        let a = s.activity(119_999, Some(30));
        // Buckets of 1 s would be 30; aligned, the last ends at 120 s.
        assert_eq!((a.bucket_ms, a.start_ms), (1000, 90_000));
        assert_eq!(a.done.len(), 30);
        assert_eq!(a.assigned.iter().sum::<u64>(), 2);
        assert_eq!(a.assigned[11], 2);
        assert_eq!(a.done[15], 1);
        assert_eq!(a.failed[22], 1);
        assert_eq!(a.queued[9], 0, "before the submissions");
        assert_eq!(a.queued[10], 2, "two queued at the end of second 100");
        assert_eq!(a.queued[11], 0);
        // Without a window: from the first event, at least a minute, in 1 s buckets.
        let a = s.activity(119_999, None);
        assert_eq!(a.bucket_ms, 1000);
        assert_eq!(a.done.len(), 60);
        assert_eq!(a.done.iter().sum::<u64>(), 1);
        // A day in buckets of 30 minutes.
        let a = s.activity(119_999, Some(86_400));
        assert_eq!((a.bucket_ms, a.done.len()), (1_800_000, 48));
        assert_eq!(a.failed.iter().sum::<u64>(), 1);
    }

    #[test]
    fn lost_attempts_are_counted_by_cause_and_requeues_count_as_queued() {
        use JobState::*;
        let s = stats(&[
            ev(1, "new", Queued, 1_000, "submitted"),
            ev(2, "queued", Assigned, 2_000, "assigned to a"),
            ev(
                3,
                "assigned",
                Lost,
                3_000,
                "lease expired, no progress from a",
            ),
            ev(4, "lost", Queued, 3_000, "attempt 1 lost; requeued"),
            ev(5, "queued", Assigned, 4_000, "assigned to b"),
            ev(6, "assigned", Lost, 5_000, "b: agent went offline"),
            ev(7, "lost", Queued, 5_000, "requeued"),
            ev(8, "queued", Assigned, 6_000, "assigned to c"),
            ev(9, "assigned", Lost, 7_000, "stage-in failed: 404"),
            ev(10, "lost", Queued, 7_000, "requeued"),
        ]);
        let lost = s.lost_attempts();
        assert_eq!(lost.len(), 3);
        assert!(lost.iter().all(|c| c.count == 1));
        assert_eq!(lost[0].cause, "agent went offline");
        let a = s.activity(7_999, Some(10));
        assert_eq!(a.assigned.iter().sum::<u64>(), 3);
        assert_eq!(*a.queued.last().unwrap(), 1);
    }

    #[test]
    fn old_seconds_are_pruned_but_the_depth_is_kept() {
        use JobState::*;
        let s = stats(&[
            ev(1, "new", Queued, 1_000, "submitted"),
            ev(2, "new", Queued, 2_000, "submitted"),
        ]);
        let later = (KEEP_SECS + 100) * 1000;
        s.lock().prune(later / 1000);
        assert!(s.lock().seconds.is_empty());
        let a = s.activity(later, Some(10));
        assert_eq!(a.queued, vec![2; a.queued.len()]);
    }
}
