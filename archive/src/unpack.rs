//! Safe unpacking of a job's output archive (tar.gz) into a directory. Only regular files and
//! directories at plain relative paths are accepted; absolute paths, `..`, symlinks, hard links,
//! devices, fifos and anything else are refused, existing symlinks in the target are never
//! followed, and the total size written is capped. Each file's sha256 is computed while writing.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

use copilot_protocol::digest::Hasher;
use copilot_protocol::Sha256;
use tar::EntryType;

/// Most entries read from one archive.
pub const MAX_ENTRIES: usize = 100_000;

/// Why an archive was refused or could not be unpacked.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("archive is unreadable: {0}")]
    Read(std::io::Error),
    #[error("archive entry {path:?} refused: {reason}")]
    Refused { path: String, reason: &'static str },
    #[error("archive unpacks to more than {limit} bytes; refused (raise --max-size if expected)")]
    TooLarge { limit: u64 },
    #[error("archive has more than {MAX_ENTRIES} entries; refused")]
    TooManyEntries,
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A regular file written by [`unpack`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unpacked {
    pub size: u64,
    pub sha256: Sha256,
}

/// Unpack the gzip-compressed tar `archive` into `dest` (created if missing), writing at most
/// `max_bytes` of file data. Returns the files written, by their relative path with `/`.
pub fn unpack(
    archive: impl Read,
    dest: &Path,
    max_bytes: u64,
) -> Result<BTreeMap<String, Unpacked>, UnpackError> {
    let write_err = |path: &Path| {
        let path = path.to_owned();
        move |source| UnpackError::Write { path, source }
    };
    std::fs::create_dir_all(dest).map_err(write_err(dest))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(archive));
    let mut written = BTreeMap::new();
    let mut total: u64 = 0;
    for (i, entry) in tar.entries().map_err(UnpackError::Read)?.enumerate() {
        if i >= MAX_ENTRIES {
            return Err(UnpackError::TooManyEntries);
        }
        let mut entry = entry.map_err(UnpackError::Read)?;
        let raw = entry.path().map_err(UnpackError::Read)?.into_owned();
        let shown = raw.to_string_lossy().into_owned();
        let refuse = |reason| UnpackError::Refused {
            path: shown.chars().take(200).collect(),
            reason,
        };
        let rel = relative(&raw).ok_or_else(|| refuse("not a plain relative path"))?;
        let kind = entry.header().entry_type();
        let is_dir = match kind {
            EntryType::Regular | EntryType::Continuous => false,
            EntryType::Directory => true,
            EntryType::Symlink => return Err(refuse("symbolic links are not allowed")),
            EntryType::Link => return Err(refuse("hard links are not allowed")),
            EntryType::Char | EntryType::Block => return Err(refuse("devices are not allowed")),
            EntryType::Fifo => return Err(refuse("fifos are not allowed")),
            _ => return Err(refuse("only regular files and directories are allowed")),
        };
        if rel.as_os_str().is_empty() {
            if is_dir {
                continue; // "./" itself
            }
            return Err(refuse("a file needs a name"));
        }
        let target = dest.join(&rel);
        make_dirs(dest, rel.parent().unwrap_or(Path::new("")), &shown)?;
        if is_dir {
            make_dirs(dest, &rel, &shown)?;
            continue;
        }
        let key = slash_path(&rel);
        if written.contains_key(&key) {
            return Err(refuse("the archive has this file twice"));
        }
        if std::fs::symlink_metadata(&target).is_ok_and(|m| !m.is_file()) {
            return Err(refuse("a non-file (symlink or directory) is in the way"));
        }
        let mut out = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&target)
            .map_err(write_err(&target))?;
        let remaining = max_bytes - total;
        let (size, sha256) = copy_hashing(&mut entry, &mut out, remaining)
            .map_err(write_err(&target))?
            .ok_or(UnpackError::TooLarge { limit: max_bytes })?;
        total += size;
        if entry.header().mode().is_ok_and(|m| m & 0o111 != 0) {
            set_executable(&out).map_err(write_err(&target))?;
        }
        written.insert(key, Unpacked { size, sha256 });
    }
    Ok(written)
}

/// The path with only normal components (`.` dropped); None for absolute paths or `..`.
fn relative(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::RootDir | Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

fn slash_path(p: &Path) -> String {
    p.components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

/// Create `rel` under `dest` one component at a time, refusing anything that is not a real
/// directory (a symlink planted in the target dir must not redirect the write).
fn make_dirs(dest: &Path, rel: &Path, shown: &str) -> Result<(), UnpackError> {
    let mut at = dest.to_path_buf();
    for c in rel.components() {
        at.push(c);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(UnpackError::Refused {
                    path: shown.chars().take(200).collect(),
                    reason: "a parent is not a directory (or is a symlink) in the target",
                })
            }
            Err(_) => std::fs::create_dir(&at).map_err(|source| UnpackError::Write {
                path: at.clone(),
                source,
            })?,
        }
    }
    Ok(())
}

/// Copy at most `limit` bytes, hashing them. Ok(None) if the source has more than `limit`.
fn copy_hashing(
    from: &mut impl Read,
    to: &mut File,
    limit: u64,
) -> std::io::Result<Option<(u64, Sha256)>> {
    let mut hasher = Hasher::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            let (sha, size) = hasher.finish();
            return Ok(Some((size, sha)));
        }
        if hasher.len() + n as u64 > limit {
            return Ok(None);
        }
        hasher.update(&buf[..n]);
        to.write_all(&buf[..n])?;
    }
}

fn set_executable(f: &File) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    f.set_permissions(std::fs::Permissions::from_mode(0o755))
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::GzEncoder;

    /// A raw tar header for `path` (bypassing the tar crate's own path checks).
    fn header(path: &str, kind: EntryType, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        {
            let name = &mut h.as_old_mut().name;
            name[..path.len()].copy_from_slice(path.as_bytes());
        }
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o644);
        h.set_cksum();
        h
    }

    fn targz(entries: &[(&str, EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(GzEncoder::new(Vec::new(), flate2::Compression::fast()));
        for (path, kind, data, link) in entries {
            let mut h = header(path, *kind, data.len() as u64);
            if let Some(l) = link {
                h.set_link_name(l).unwrap();
                h.set_cksum();
            }
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap().finish().unwrap()
    }

    /// Every path under `root`, relative.
    fn tree(root: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                out.push(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
                if std::fs::symlink_metadata(&p).unwrap().is_dir() {
                    stack.push(p);
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn good_archive_unpacks_with_digests() {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("out");
        let data = targz(&[
            ("./", EntryType::Directory, b"", None),
            ("res/", EntryType::Directory, b"", None),
            ("res/histogram.csv", EntryType::Regular, b"0,1\n", None),
            ("_copilot/stdout.txt", EntryType::Regular, b"hi\n", None),
        ]);
        let got = unpack(&data[..], &dest, 1 << 20).unwrap();
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            ["_copilot/stdout.txt", "res/histogram.csv"]
        );
        assert_eq!(got["res/histogram.csv"].sha256, Sha256::of(b"0,1\n"));
        assert_eq!(got["res/histogram.csv"].size, 4);
        assert_eq!(
            std::fs::read(dest.join("_copilot/stdout.txt")).unwrap(),
            b"hi\n"
        );
    }

    #[test]
    fn hostile_entries_are_refused_and_nothing_lands_outside() {
        let cases: &[(&str, EntryType, &[u8], Option<&str>)] = &[
            ("../escape.txt", EntryType::Regular, b"x", None),
            ("a/../../escape.txt", EntryType::Regular, b"x", None),
            ("/tmp/escape.txt", EntryType::Regular, b"x", None),
            ("link", EntryType::Symlink, b"", Some("/etc/passwd")),
            ("hard", EntryType::Link, b"", Some("/etc/passwd")),
            ("dev", EntryType::Char, b"", None),
            ("blk", EntryType::Block, b"", None),
            ("fifo", EntryType::Fifo, b"", None),
        ];
        for case in cases {
            let root = tempfile::tempdir().unwrap();
            let dest = root.path().join("out");
            let err = unpack(&targz(&[*case])[..], &dest, 1 << 20).unwrap_err();
            assert!(
                matches!(err, UnpackError::Refused { .. }),
                "{}: {err}",
                case.0
            );
            assert_eq!(tree(root.path()), ["out"], "{}", case.0);
        }
    }

    #[test]
    fn oversize_archives_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let big = vec![7u8; 5000];
        let data = targz(&[
            ("a", EntryType::Regular, &big[..3000], None),
            ("b", EntryType::Regular, &big[..], None),
        ]);
        let err = unpack(&data[..], &root.path().join("out"), 6000).unwrap_err();
        assert!(
            matches!(err, UnpackError::TooLarge { limit: 6000 }),
            "{err}"
        );
        // Under the cap it unpacks.
        unpack(&data[..], &root.path().join("ok"), 8000).unwrap();
    }

    #[test]
    fn symlinks_already_in_the_target_are_not_followed() {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("out");
        let outside = root.path().join("outside");
        std::fs::create_dir_all(&dest).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, dest.join("res")).unwrap();
        std::os::unix::fs::symlink(outside.join("f"), dest.join("f")).unwrap();
        for path in ["res/x.csv", "f"] {
            let data = targz(&[(path, EntryType::Regular, b"x", None)]);
            let err = unpack(&data[..], &dest, 1 << 20).unwrap_err();
            assert!(matches!(err, UnpackError::Refused { .. }), "{path}: {err}");
        }
        assert!(tree(&outside).is_empty());
    }

    #[test]
    fn duplicate_files_and_garbage_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let data = targz(&[
            ("a", EntryType::Regular, b"1", None),
            ("a", EntryType::Regular, b"2", None),
        ]);
        let err = unpack(&data[..], &root.path().join("d"), 1 << 20).unwrap_err();
        assert!(matches!(err, UnpackError::Refused { .. }), "{err}");
        let err = unpack(&b"not a gzip"[..], &root.path().join("g"), 1 << 20).unwrap_err();
        assert!(matches!(err, UnpackError::Read(_)), "{err}");
    }
}
