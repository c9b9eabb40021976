//! Scans of stored output archives (`copilot_archive::read`), cached by archive digest up to
//! a memory budget, so a dashboard page that refreshes, or a batch plot, reads each archive
//! once.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use copilot_archive::read::Contents;
use copilot_protocol::{JobId, Sha256};

/// Scans of recently viewed archives, up to a memory budget, least recently used out first.
#[derive(Debug)]
pub struct ArchiveCache {
    budget: usize,
    inner: Mutex<CacheInner>,
}

type Key = (JobId, u32, Sha256);

#[derive(Debug, Default)]
struct CacheInner {
    map: HashMap<Key, Arc<Contents>>,
    /// Least recently used first.
    order: VecDeque<Key>,
    used: usize,
}

impl ArchiveCache {
    /// A cache holding up to `budget` bytes of scans.
    pub fn new(budget: usize) -> ArchiveCache {
        ArchiveCache {
            budget,
            inner: Mutex::new(CacheInner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        // Only complete entries are ever inserted; a panic elsewhere leaves a usable map.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The scan of the archive of `job`/`attempt` with digest `sha`, if cached.
    pub fn get(&self, job: JobId, attempt: u32, sha: Sha256) -> Option<Arc<Contents>> {
        let mut inner = self.lock();
        let key = (job, attempt, sha);
        let hit = inner.map.get(&key).cloned()?;
        inner.order.retain(|k| *k != key);
        inner.order.push_back(key);
        Some(hit)
    }

    /// Keep a scan (one larger than the whole budget is not kept).
    pub fn put(&self, job: JobId, attempt: u32, sha: Sha256, contents: Arc<Contents>) {
        if contents.kept > self.budget {
            return;
        }
        let mut inner = self.lock();
        let key = (job, attempt, sha);
        if let Some(old) = inner.map.insert(key, contents.clone()) {
            inner.used -= old.kept;
            inner.order.retain(|k| *k != key);
        }
        inner.used += contents.kept;
        inner.order.push_back(key);
        while inner.used > self.budget {
            let Some(oldest) = inner.order.pop_front() else {
                break;
            };
            if let Some(gone) = inner.map.remove(&oldest) {
                inner.used -= gone.kept;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_drops_the_least_recently_used_scan() {
        let cache = ArchiveCache::new(100);
        let scan_of = |kept| {
            Arc::new(Contents {
                members: vec![],
                kept,
            })
        };
        let sha = Sha256::of(b"x");
        cache.put(1, 1, sha, scan_of(40));
        cache.put(2, 1, sha, scan_of(40));
        assert!(cache.get(1, 1, sha).is_some());
        cache.put(3, 1, sha, scan_of(40));
        assert!(cache.get(2, 1, sha).is_none(), "2 was used least recently");
        assert!(cache.get(1, 1, sha).is_some() && cache.get(3, 1, sha).is_some());
        assert!(
            cache.get(1, 2, sha).is_none(),
            "another attempt is another archive"
        );
        cache.put(4, 1, sha, scan_of(101));
        assert!(cache.get(4, 1, sha).is_none(), "larger than the budget");
    }
}
