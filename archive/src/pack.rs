//! Stage-out, part one: pack a job's declared outputs and its logs into a tar.gz.
//!
//! Only regular files inside the job dir go in: a declared output that is missing, a
//! directory, a symlink, or reached through a symlinked directory is skipped (and logged).
//! Entries come in a fixed order (outputs sorted by path, then `_copilot/stdout.txt` and
//! `_copilot/stderr.txt`) with fixed owner and time, so the same files give the same archive.
//! Every file is read once, hashed on the way into the archive, and the archive is hashed as
//! it is written.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use copilot_protocol::digest::Hasher;
use copilot_protocol::wire::FileDigest;
use copilot_protocol::Sha256;
use flate2::write::GzEncoder;
use flate2::Compression;

pub use copilot_protocol::api::{STDERR_ENTRY, STDOUT_ENTRY};

/// A written archive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packed {
    pub path: PathBuf,
    pub sha256: Sha256,
    pub size: u64,
    /// Every file in the archive, in archive order.
    pub files: Vec<FileDigest>,
}

/// Why the archive could not be written.
#[derive(Debug, thiserror::Error)]
#[error("packing outputs: {what}: {source}")]
pub struct PackError {
    what: String,
    source: io::Error,
}

fn failed(what: impl Into<String>) -> impl FnOnce(io::Error) -> PackError {
    let what = what.into();
    move |source| PackError { what, source }
}

/// Writes `archive` with the declared `outputs` found in `job_dir` and the two log files.
/// Blocking: run it off the async runtime.
pub fn pack(
    job_dir: &Path,
    outputs: &[String],
    stdout_log: &Path,
    stderr_log: &Path,
    archive: &Path,
) -> Result<Packed, PackError> {
    let mut sorted: Vec<&String> = outputs.iter().collect();
    sorted.sort();
    let mut entries: Vec<(String, PathBuf)> = sorted
        .into_iter()
        .filter_map(|rel| declared_output(job_dir, rel).map(|p| (rel.clone(), p)))
        .collect();
    entries.push((STDOUT_ENTRY.to_owned(), stdout_log.to_owned()));
    entries.push((STDERR_ENTRY.to_owned(), stderr_log.to_owned()));

    let out = File::create(archive).map_err(failed(format!("create {}", archive.display())))?;
    let hashing = HashingWriter {
        inner: BufWriter::new(out),
        hasher: Hasher::new(),
    };
    let mut tar = tar::Builder::new(GzEncoder::new(hashing, Compression::default()));
    let mut files = Vec::with_capacity(entries.len());
    for (name, source) in &entries {
        if let Some(digest) = append_file(&mut tar, name, source)? {
            files.push(digest);
        }
    }
    let gz = tar.into_inner().map_err(failed("finish archive"))?;
    let mut hashing = gz.finish().map_err(failed("finish archive"))?;
    hashing.inner.flush().map_err(failed("finish archive"))?;
    let (sha256, size) = hashing.hasher.finish();
    Ok(Packed {
        path: archive.to_owned(),
        sha256,
        size,
        files,
    })
}

/// The path of a declared output if it is a regular file reached without symlinks.
fn declared_output(job_dir: &Path, rel: &str) -> Option<PathBuf> {
    if let Err(e) = copilot_protocol::job::validate_output_path(rel) {
        tracing::warn!("output skipped: {e}");
        return None;
    }
    let mut path = job_dir.to_owned();
    let parts: Vec<Component<'_>> = Path::new(rel).components().collect();
    for (i, part) in parts.iter().enumerate() {
        path.push(part);
        let last = i + 1 == parts.len();
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                tracing::info!(output = rel, "declared output is missing; skipped");
                return None;
            }
            Err(e) => {
                tracing::warn!(output = rel, "declared output skipped: {e}");
                return None;
            }
        };
        let ok = if last { meta.is_file() } else { meta.is_dir() };
        if !ok {
            tracing::warn!(
                output = rel,
                "declared output skipped: {} is a {:?}, not a {}",
                path.display(),
                meta.file_type(),
                if last { "regular file" } else { "directory" }
            );
            return None;
        }
    }
    Some(path)
}

/// Appends one regular file, hashing it as it is copied. A file that is missing or not
/// regular when opened (it may have been replaced) is skipped.
fn append_file<W: Write>(
    tar: &mut tar::Builder<W>,
    name: &str,
    source: &Path,
) -> Result<Option<FileDigest>, PackError> {
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(source);
    let file = match opened {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(
                entry = name,
                "cannot open {}: {e}; skipped",
                source.display()
            );
            return Ok(None);
        }
    };
    let meta = file
        .metadata()
        .map_err(failed(format!("stat {}", source.display())))?;
    if !meta.is_file() {
        tracing::warn!(
            entry = name,
            "{} is not a regular file; skipped",
            source.display()
        );
        return Ok(None);
    }
    let size = meta.len();
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(size);
    let executable = meta.permissions().mode() & 0o111 != 0;
    header.set_mode(if executable { 0o755 } else { 0o644 });
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    let mut reader = HashingReader {
        inner: file.take(size),
        hasher: Hasher::new(),
    };
    tar.append_data(&mut header, name, &mut reader)
        .map_err(failed(format!("add {name}")))?;
    let (sha256, read) = reader.hasher.finish();
    if read != size {
        return Err(PackError {
            what: format!("add {name}"),
            source: io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("file shrank from {size} to {read} bytes while packing"),
            ),
        });
    }
    Ok(Some(FileDigest {
        path: name.to_owned(),
        size,
        sha256,
    }))
}

/// Hashes the bytes written through it.
struct HashingWriter<W> {
    inner: W,
    hasher: Hasher,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Hashes the bytes read through it.
struct HashingReader<R> {
    inner: R,
    hasher: Hasher,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::unpack;

    struct Job {
        _root: tempfile::TempDir,
        dir: PathBuf,
        logs: PathBuf,
    }

    fn job() -> Job {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("job");
        let logs = root.path().join("logs");
        std::fs::create_dir(&dir).unwrap();
        std::fs::create_dir(&logs).unwrap();
        std::fs::write(logs.join("stdout.txt"), b"out\n").unwrap();
        std::fs::write(logs.join("stderr.txt"), b"").unwrap();
        Job {
            _root: root,
            dir,
            logs,
        }
    }

    fn pack_job(j: &Job, outputs: &[&str], name: &str) -> Packed {
        let outputs: Vec<String> = outputs.iter().map(|s| s.to_string()).collect();
        pack(
            &j.dir,
            &outputs,
            &j.logs.join("stdout.txt"),
            &j.logs.join("stderr.txt"),
            &j.logs.join(name),
        )
        .unwrap()
    }

    #[test]
    fn outputs_and_logs_are_packed_with_digests() {
        let j = job();
        std::fs::create_dir_all(j.dir.join("out/sub")).unwrap();
        std::fs::write(j.dir.join("out/sub/hist.csv"), b"1,2\n").unwrap();
        std::fs::write(j.dir.join("a.txt"), b"a").unwrap();
        let p = pack_job(
            &j,
            &["out/sub/hist.csv", "a.txt", "missing.txt"],
            "o.tar.gz",
        );
        let bytes = std::fs::read(&p.path).unwrap();
        assert_eq!((Sha256::of(&bytes), bytes.len() as u64), (p.sha256, p.size));
        let names: Vec<&str> = p.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(
            names,
            ["a.txt", "out/sub/hist.csv", STDOUT_ENTRY, STDERR_ENTRY]
        );
        let content = unpack(&bytes);
        assert_eq!(content.len(), 4);
        for f in &p.files {
            let data = &content[&f.path];
            assert_eq!((Sha256::of(data), data.len() as u64), (f.sha256, f.size));
        }
        assert_eq!(content["out/sub/hist.csv"], b"1,2\n");
        assert_eq!(content[STDOUT_ENTRY], b"out\n");
    }

    #[test]
    fn packing_is_deterministic() {
        let j = job();
        std::fs::write(j.dir.join("b"), b"b").unwrap();
        std::fs::write(j.dir.join("a"), b"a").unwrap();
        let one = pack_job(&j, &["a", "b"], "1.tar.gz");
        let two = pack_job(&j, &["b", "a"], "2.tar.gz");
        assert_eq!((one.sha256, one.size), (two.sha256, two.size));
        assert_eq!(one.files, two.files);
    }

    #[test]
    fn symlinks_and_directories_are_skipped() {
        let j = job();
        let secret = j._root.path().join("secret");
        std::fs::create_dir(&secret).unwrap();
        std::fs::write(secret.join("key"), b"private").unwrap();
        std::os::unix::fs::symlink(secret.join("key"), j.dir.join("link")).unwrap();
        std::os::unix::fs::symlink(&secret, j.dir.join("dirlink")).unwrap();
        std::fs::create_dir(j.dir.join("adir")).unwrap();
        std::fs::write(j.dir.join("real"), b"ok").unwrap();
        let p = pack_job(&j, &["link", "dirlink/key", "adir", "real"], "o.tar.gz");
        let content = unpack(&std::fs::read(&p.path).unwrap());
        let names: Vec<&String> = content.keys().collect();
        assert_eq!(
            names,
            ["_copilot/stderr.txt", "_copilot/stdout.txt", "real"]
        );
        assert!(!content.values().any(|v| v == b"private"));
    }

    #[test]
    fn missing_logs_are_left_out() {
        let j = job();
        std::fs::remove_file(j.logs.join("stderr.txt")).unwrap();
        let p = pack_job(&j, &[], "o.tar.gz");
        let names: Vec<&str> = p.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(names, [STDOUT_ENTRY]);
    }
}
