//! The content-addressed input cache: inputs whose sha256 the job declares are kept by digest
//! (`<dir>/<sha256>`) after a verified download, so later jobs on the same host (or VM) that use
//! the same generator software or calibration data copy them locally instead of fetching them
//! again — what CernVM-FS did for the original Co-Pilot.
//!
//! A cached file is copied into the job's dir, never linked: the job owns its copy and cannot
//! alter the cache. The copy is hashed on the way, so a damaged entry is noticed, removed and
//! fetched again. The cache stays under a size bound by evicting the least recently used
//! entries (by modification time, which every use renews). The dir is the agent's own (0700).

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use copilot_protocol::digest::Hasher;
use copilot_protocol::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bytes copied per read.
const CHUNK: usize = 1 << 20;

/// Inputs by digest, up to a size.
#[derive(Debug)]
pub struct InputCache {
    dir: PathBuf,
    max_bytes: u64,
    /// Held while entries are added or evicted.
    lock: tokio::sync::Mutex<()>,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl InputCache {
    /// A cache in `dir` (created, mode 0700) holding at most `max_bytes`.
    pub fn new(dir: &Path, max_bytes: u64) -> std::io::Result<InputCache> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        Ok(InputCache {
            dir: dir.to_owned(),
            max_bytes,
            lock: tokio::sync::Mutex::new(()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        })
    }

    fn entry(&self, sha: &Sha256) -> PathBuf {
        self.dir.join(sha.to_string())
    }

    /// (hits, misses) so far.
    pub fn stats(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }

    /// Copies the cached input `sha` to `dest`; true if it was there and intact. A damaged
    /// entry is removed (and `dest` too).
    pub async fn fetch(&self, sha: &Sha256, dest: &Path) -> bool {
        let entry = self.entry(sha);
        match copy_hashing(&entry, dest).await {
            Ok(got) if got == *sha => {
                // Renew its place in the LRU order.
                if let Ok(f) = std::fs::File::options().write(true).open(&entry) {
                    let _ = f.set_modified(SystemTime::now());
                }
                self.hits.fetch_add(1, Ordering::Relaxed);
                true
            }
            Ok(got) => {
                tracing::warn!(entry = %entry.display(), %got, "a damaged cache entry was removed");
                let _ = tokio::fs::remove_file(&entry).await;
                let _ = tokio::fs::remove_file(dest).await;
                self.misses.fetch_add(1, Ordering::Relaxed);
                false
            }
            Err(_) => {
                let _ = tokio::fs::remove_file(dest).await;
                self.misses.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Adds the verified file at `src` as `sha`, then evicts old entries over the bound.
    /// Failures only cost the cache (logged).
    pub async fn insert(&self, sha: &Sha256, src: &Path) {
        let size = match tokio::fs::metadata(src).await {
            Ok(m) => m.len(),
            Err(_) => return,
        };
        if size > self.max_bytes {
            return;
        }
        let _guard = self.lock.lock().await;
        let tmp = self
            .dir
            .join(format!(".{sha}.{:016x}", rand::random::<u64>()));
        let added = async {
            tokio::fs::copy(src, &tmp).await?;
            tokio::fs::rename(&tmp, self.entry(sha)).await
        }
        .await;
        if let Err(e) = added {
            tracing::warn!("cannot add {sha} to the input cache: {e}");
            let _ = tokio::fs::remove_file(&tmp).await;
            return;
        }
        if let Err(e) = self.evict().await {
            tracing::warn!("cannot trim the input cache: {e}");
        }
    }

    /// Removes the least recently used entries until the total fits the bound.
    async fn evict(&self) -> std::io::Result<()> {
        let mut entries = Vec::new();
        let mut total = 0u64;
        let mut dir = tokio::fs::read_dir(&self.dir).await?;
        while let Some(e) = dir.next_entry().await? {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.parse::<Sha256>().is_err() {
                continue;
            }
            let m = e.metadata().await?;
            total += m.len();
            entries.push((
                m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                m.len(),
                e.path(),
            ));
        }
        entries.sort();
        for (_, len, path) in entries {
            if total <= self.max_bytes {
                break;
            }
            tokio::fs::remove_file(&path).await?;
            total -= len;
            tracing::debug!(entry = %path.display(), "evicted from the input cache");
        }
        Ok(())
    }
}

/// Copies `from` to `to` (created or truncated), returning the sha256 of what was copied.
async fn copy_hashing(from: &Path, to: &Path) -> std::io::Result<Sha256> {
    let mut src = tokio::fs::File::open(from).await?;
    let mut dst = tokio::fs::File::create(to).await?;
    let mut hasher = Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = src.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        dst.write_all(&buf[..n]).await?;
    }
    dst.flush().await?;
    Ok(hasher.finish().0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &Path, name: &str, data: &[u8]) -> (PathBuf, Sha256) {
        let p = dir.join(name);
        std::fs::write(&p, data).unwrap();
        (p, Sha256::of(data))
    }

    #[tokio::test]
    async fn a_cached_input_is_copied_not_shared() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = InputCache::new(&tmp.path().join("cache"), 1 << 20).unwrap();
        let (src, sha) = file(tmp.path(), "in", b"generator v1");
        let dest = tmp.path().join("job-a");
        assert!(!cache.fetch(&sha, &dest).await);
        assert!(!dest.exists());
        cache.insert(&sha, &src).await;
        assert!(cache.fetch(&sha, &dest).await);
        assert_eq!(std::fs::read(&dest).unwrap(), b"generator v1");
        // The job scribbles on its copy; the next job still gets the original.
        std::fs::write(&dest, b"tampered").unwrap();
        let dest2 = tmp.path().join("job-b");
        assert!(cache.fetch(&sha, &dest2).await);
        assert_eq!(std::fs::read(&dest2).unwrap(), b"generator v1");
        assert_eq!(cache.stats(), (2, 1));
    }

    #[tokio::test]
    async fn a_damaged_entry_is_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = InputCache::new(&tmp.path().join("cache"), 1 << 20).unwrap();
        let (src, sha) = file(tmp.path(), "in", b"calibration");
        cache.insert(&sha, &src).await;
        std::fs::write(tmp.path().join("cache").join(sha.to_string()), b"bit rot").unwrap();
        let dest = tmp.path().join("job");
        assert!(!cache.fetch(&sha, &dest).await);
        assert!(!dest.exists());
        assert!(!tmp.path().join("cache").join(sha.to_string()).exists());
    }

    #[tokio::test]
    async fn the_least_recently_used_entries_go_first() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = InputCache::new(&tmp.path().join("cache"), 250).unwrap();
        let mut shas = Vec::new();
        for (i, name) in ["a", "b", "c"].iter().enumerate() {
            let (src, sha) = file(tmp.path(), name, &[i as u8; 100]);
            cache.insert(&sha, &src).await;
            shas.push(sha);
            // Distinct modification times, oldest first.
            let old = SystemTime::now() - std::time::Duration::from_secs(100 - i as u64 * 10);
            let f = std::fs::File::options()
                .write(true)
                .open(tmp.path().join("cache").join(sha.to_string()))
                .unwrap();
            f.set_modified(old).unwrap();
        }
        // a was evicted when c came in (300 > 250).
        let dest = tmp.path().join("out");
        assert!(!cache.fetch(&shas[0], &dest).await);
        // Using b makes it the most recent, so d pushes out c.
        assert!(cache.fetch(&shas[1], &dest).await);
        let (src, d) = file(tmp.path(), "d", &[9u8; 100]);
        cache.insert(&d, &src).await;
        assert!(cache.fetch(&shas[1], &dest).await);
        assert!(!cache.fetch(&shas[2], &dest).await);
        assert!(cache.fetch(&d, &dest).await);
        // Larger than the whole cache: not kept.
        let (src, huge) = file(tmp.path(), "huge", &[1u8; 300]);
        cache.insert(&huge, &src).await;
        assert!(!cache.fetch(&huge, &dest).await);
    }
}
