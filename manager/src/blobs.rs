//! The storage service's files: content-addressed inputs under `data_dir/blobs/ab/abcdef…` and
//! output archives under `data_dir/outputs/{job}/{attempt}.tar.gz`.
//!
//! Bodies are streamed to a temp file under `data_dir/tmp/` while their sha256 and size are
//! computed; a body over the size limit or with the wrong digest is deleted, a good one is synced
//! and renamed into place, so a stored file is always complete and matches its digest. Nothing
//! holds a whole file in memory.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use copilot_protocol::api::Stored;
use copilot_protocol::digest::Hasher;
use copilot_protocol::{JobId, Sha256};
use futures::{Stream, StreamExt};
use rand::RngCore;
use tokio::io::AsyncWriteExt;

/// Why a file could not be stored or read.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("the body is larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("the body has sha256 {actual}, but {expected} was announced")]
    DigestMismatch { expected: Sha256, actual: Sha256 },
    #[error("reading the body failed: {0}")]
    Body(String),
    #[error("storage I/O error on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

impl BlobError {
    /// The file system under the data dir is full (ENOSPC): a condition that passes.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, BlobError::Io { source, .. } if source.kind() == io::ErrorKind::StorageFull)
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> BlobError + '_ {
    move |source| BlobError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A stored file opened for reading.
#[derive(Debug)]
pub struct Blob {
    pub file: tokio::fs::File,
    pub size: u64,
}

/// The file store under one data dir.
#[derive(Clone, Debug)]
pub struct Blobs {
    root: PathBuf,
}

/// Removes a temp file when dropped (an error or a dropped request), unless disarmed.
struct TempFile(Option<PathBuf>);

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            if let Err(e) = std::fs::remove_file(&p) {
                tracing::warn!(path = %p.display(), "cannot remove temp file: {e}");
            }
        }
    }
}

impl Blobs {
    /// Use `data_dir`, creating `blobs/`, `outputs/` and `tmp/`; leftovers in `tmp/` from an
    /// earlier run are removed.
    pub async fn open(data_dir: &Path) -> Result<Blobs, BlobError> {
        let blobs = Blobs {
            root: data_dir.to_owned(),
        };
        for dir in ["blobs", "outputs"] {
            let d = data_dir.join(dir);
            tokio::fs::create_dir_all(&d).await.map_err(io_err(&d))?;
        }
        let tmp = blobs.tmp_dir();
        match tokio::fs::remove_dir_all(&tmp).await {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err(&tmp)(e)),
            _ => {}
        }
        tokio::fs::create_dir_all(&tmp)
            .await
            .map_err(io_err(&tmp))?;
        Ok(blobs)
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    fn input_path(&self, sha: &Sha256) -> PathBuf {
        let hex = sha.to_string();
        self.root.join("blobs").join(&hex[..2]).join(&hex)
    }

    fn output_path(&self, job: JobId, attempt: u32) -> PathBuf {
        self.root
            .join("outputs")
            .join(job.to_string())
            .join(format!("{attempt}.tar.gz"))
    }

    /// The size of the stored input `sha`, if it is stored.
    pub async fn input_size(&self, sha: &Sha256) -> Result<Option<u64>, BlobError> {
        let path = self.input_path(sha);
        match tokio::fs::metadata(&path).await {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Store an input under its digest. Returns what is stored and whether it was new; an input
    /// already present is kept and `body` is not read.
    pub async fn put_input<S, E>(
        &self,
        sha: &Sha256,
        body: S,
        limit: u64,
    ) -> Result<(Stored, bool), BlobError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: fmt::Display,
    {
        if let Some(size) = self.input_size(sha).await? {
            return Ok((Stored { sha256: *sha, size }, false));
        }
        let stored = self
            .receive(body, sha, limit, &self.input_path(sha))
            .await?;
        Ok((stored, true))
    }

    /// Open the stored input `sha`, if it is stored.
    pub async fn open_input(&self, sha: &Sha256) -> Result<Option<Blob>, BlobError> {
        open(&self.input_path(sha)).await
    }

    /// Store the output archive of `job`/`attempt` (replacing an earlier upload of it).
    pub async fn put_output<S, E>(
        &self,
        job: JobId,
        attempt: u32,
        expected: &Sha256,
        body: S,
        limit: u64,
    ) -> Result<Stored, BlobError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: fmt::Display,
    {
        let dest = self.output_path(job, attempt);
        self.receive(body, expected, limit, &dest).await
    }

    /// Open the output archive of `job`/`attempt`, if it is stored.
    pub async fn open_output(&self, job: JobId, attempt: u32) -> Result<Option<Blob>, BlobError> {
        open(&self.output_path(job, attempt)).await
    }

    /// A fresh dir in the temp dir, removed when dropped (or, after a crash, at the next
    /// start). For unpacking archives to compare them.
    pub fn scratch_dir(&self) -> Result<tempfile::TempDir, BlobError> {
        let tmp = self.tmp_dir();
        tempfile::Builder::new()
            .prefix("scratch-")
            .tempdir_in(&tmp)
            .map_err(io_err(&tmp))
    }

    /// An empty file in the temp dir that is already unlinked: gone once the handle is
    /// dropped, whatever happens. For spooling archives kept elsewhere (Chirp) to read them.
    pub async fn scratch_file(&self) -> Result<tokio::fs::File, BlobError> {
        let mut name = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut name);
        let path = self
            .tmp_dir()
            .join(format!("{}.scratch", hex::encode(name)));
        let file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .await
            .map_err(io_err(&path))?;
        tokio::fs::remove_file(&path).await.map_err(io_err(&path))?;
        Ok(file)
    }

    /// Delete the output archive of `job`/`attempt` (no error if absent).
    pub async fn remove_output(&self, job: JobId, attempt: u32) -> Result<(), BlobError> {
        let path = self.output_path(job, attempt);
        match tokio::fs::remove_file(&path).await {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(&path)(e)),
            _ => Ok(()),
        }
    }

    /// Stream `body` to a temp file, check size and digest, then move it to `dest`.
    async fn receive<S, E>(
        &self,
        mut body: S,
        expected: &Sha256,
        limit: u64,
        dest: &Path,
    ) -> Result<Stored, BlobError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: fmt::Display,
    {
        let mut name = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut name);
        let tmp = self.tmp_dir().join(format!("{}.part", hex::encode(name)));
        let mut file = tokio::fs::File::create(&tmp).await.map_err(io_err(&tmp))?;
        let mut guard = TempFile(Some(tmp.clone()));
        let mut hasher = Hasher::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| BlobError::Body(e.to_string()))?;
            if hasher.len().saturating_add(chunk.len() as u64) > limit {
                return Err(BlobError::TooLarge { limit });
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(io_err(&tmp))?;
        }
        file.flush().await.map_err(io_err(&tmp))?;
        file.sync_all().await.map_err(io_err(&tmp))?;
        drop(file);
        let (actual, size) = hasher.finish();
        if actual != *expected {
            return Err(BlobError::DigestMismatch {
                expected: *expected,
                actual,
            });
        }
        let dir = dest.parent().unwrap_or(&self.root);
        tokio::fs::create_dir_all(dir).await.map_err(io_err(dir))?;
        tokio::fs::rename(&tmp, dest).await.map_err(io_err(dest))?;
        guard.0 = None;
        // Make the rename itself durable.
        let d = tokio::fs::File::open(dir).await.map_err(io_err(dir))?;
        d.sync_all().await.map_err(io_err(dir))?;
        Ok(Stored {
            sha256: actual,
            size,
        })
    }
}

async fn open(path: &Path) -> Result<Option<Blob>, BlobError> {
    let file = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path)(e)),
    };
    let size = file.metadata().await.map_err(io_err(path))?.len();
    Ok(Some(Blob { file, size }))
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    fn chunks(parts: &[&'static [u8]]) -> impl Stream<Item = Result<Bytes, io::Error>> + Unpin {
        futures::stream::iter(
            parts
                .iter()
                .map(|p| Ok(Bytes::from_static(p)))
                .collect::<Vec<_>>(),
        )
    }

    fn files_in(dir: &Path) -> usize {
        std::fs::read_dir(dir).unwrap().count()
    }

    #[tokio::test]
    async fn inputs_are_stored_under_their_digest() {
        let dir = tempfile::tempdir().unwrap();
        let b = Blobs::open(dir.path()).await.unwrap();
        let sha = Sha256::of(b"hello world");
        assert_eq!(b.input_size(&sha).await.unwrap(), None);
        let (st, new) = b
            .put_input(&sha, chunks(&[b"hello ", b"world"]), 100)
            .await
            .unwrap();
        assert_eq!((st.sha256, st.size, new), (sha, 11, true));
        let hex = sha.to_string();
        assert!(dir
            .path()
            .join("blobs")
            .join(&hex[..2])
            .join(&hex)
            .is_file());
        let (_, new) = b.put_input(&sha, chunks(&[b"ignored"]), 100).await.unwrap();
        assert!(!new);
        let mut blob = b.open_input(&sha).await.unwrap().unwrap();
        let mut text = String::new();
        blob.file.read_to_string(&mut text).await.unwrap();
        assert_eq!((text.as_str(), blob.size), ("hello world", 11));
        assert_eq!(files_in(&dir.path().join("tmp")), 0);
    }

    #[tokio::test]
    async fn bad_bodies_leave_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let b = Blobs::open(dir.path()).await.unwrap();
        let sha = Sha256::of(b"abc");
        let err = b.put_input(&sha, chunks(&[b"abd"]), 100).await.unwrap_err();
        assert!(
            matches!(err, BlobError::DigestMismatch { actual, .. } if actual == Sha256::of(b"abd"))
        );
        let err = b
            .put_input(&sha, chunks(&[b"ab", b"c"]), 2)
            .await
            .unwrap_err();
        assert!(matches!(err, BlobError::TooLarge { limit: 2 }));
        let failing = futures::stream::iter(vec![
            Ok(Bytes::from_static(b"a")),
            Err(io::Error::other("connection reset")),
        ]);
        let err = b.put_output(1, 1, &sha, failing, 100).await.unwrap_err();
        assert!(matches!(err, BlobError::Body(m) if m.contains("reset")));
        assert_eq!(b.input_size(&sha).await.unwrap(), None);
        assert!(b.open_output(1, 1).await.unwrap().is_none());
        assert_eq!(files_in(&dir.path().join("tmp")), 0);
    }

    #[tokio::test]
    async fn outputs_are_stored_per_attempt() {
        let dir = tempfile::tempdir().unwrap();
        let b = Blobs::open(dir.path()).await.unwrap();
        let sha = Sha256::of(b"tgz");
        let st = b
            .put_output(7, 2, &sha, chunks(&[b"tgz"]), 3)
            .await
            .unwrap();
        assert_eq!(st.size, 3);
        assert!(dir.path().join("outputs/7/2.tar.gz").is_file());
        assert_eq!(b.open_output(7, 2).await.unwrap().unwrap().size, 3);
        assert!(b.open_output(7, 1).await.unwrap().is_none());
        b.remove_output(7, 2).await.unwrap();
        b.remove_output(7, 2).await.unwrap();
        assert!(b.open_output(7, 2).await.unwrap().is_none());
    }
}
