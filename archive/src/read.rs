//! Reading a stored output archive without unpacking it, for people: [`scan`] goes through an
//! archive once and keeps, for every file, its digest, the beginning and the end (for previews
//! and log tails) and, for files whose name says they hold histograms, the whole text (for
//! plots); [`extract`] streams one file out of it. The manager's dashboard shows what they read.
//!
//! Archives come from agents: everything is bounded (bytes unpacked, bytes kept per file and
//! per archive, files kept), and a broken archive is an error, never a panic. Blocking.

use std::io::{self, Read};

use copilot_protocol::digest::Hasher;
use copilot_protocol::histogram::Format;
use copilot_protocol::Sha256;

/// Most compressed bytes [`scan`] is asked to read (larger archives are not previewed).
pub const MAX_SCAN: u64 = 256 << 20;
/// Most bytes unpacked in one pass (a gzip bomb stops here).
pub const MAX_UNPACKED: u64 = 4 << 30;
/// Bytes kept of the beginning and of the end of each file.
pub const HEAD: usize = 16 << 10;
pub const TAIL: usize = 16 << 10;
/// Largest histogram file kept whole, and most such bytes per archive.
pub const WHOLE: u64 = 4 << 20;
const WHOLE_TOTAL: usize = 16 << 20;
/// Files whose head and tail are kept; later ones get their digest only.
const KEPT_FILES: usize = 256;

/// Why an archive could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("the archive is not a readable tar.gz: {0}")]
    Broken(#[source] io::Error),
    #[error("the archive unpacks to more than {MAX_UNPACKED} bytes")]
    TooLarge,
    #[error("{0} is not in the archive")]
    NotFound(String),
    #[error("sending the file failed: {0}")]
    Sink(#[source] io::Error),
}

/// What [`scan`] keeps of one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub path: String,
    pub size: u64,
    /// Computed while reading.
    pub sha256: Sha256,
    /// Up to [`HEAD`] bytes of the beginning.
    pub head: Vec<u8>,
    /// Up to [`TAIL`] bytes of the end.
    pub tail: Vec<u8>,
    /// The whole file, for histogram files up to [`WHOLE`] bytes.
    pub whole: Option<Vec<u8>>,
}

/// The files of one archive, in archive order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Contents {
    pub members: Vec<Member>,
    /// Bytes held in memory.
    pub kept: usize,
}

impl Contents {
    /// The file at `path`.
    pub fn get(&self, path: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.path == path)
    }
}

fn entry_path(entry: &tar::Entry<'_, impl Read>) -> Option<String> {
    let path = entry.path().ok()?;
    path.to_str().map(str::to_owned)
}

/// Read a whole archive once (see the module doc).
pub fn scan(reader: impl Read) -> Result<Contents, ReadError> {
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(reader));
    let mut out = Contents::default();
    let mut unpacked: u64 = 0;
    let mut whole_total = 0usize;
    let mut buf = vec![0u8; 64 << 10];
    for entry in archive.entries().map_err(ReadError::Broken)? {
        let mut entry = entry.map_err(ReadError::Broken)?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let Some(path) = entry_path(&entry) else {
            continue;
        };
        let size = entry.size();
        let keep = out.members.len() < KEPT_FILES;
        let mut whole = (keep
            && size <= WHOLE
            && whole_total + size as usize <= WHOLE_TOTAL
            && Format::of_path(&path).is_some())
        .then(|| Vec::with_capacity(size as usize));
        let (mut head, mut tail) = (Vec::new(), Vec::new());
        let mut hasher = Hasher::new();
        loop {
            let n = entry.read(&mut buf).map_err(ReadError::Broken)?;
            if n == 0 {
                break;
            }
            unpacked += n as u64;
            if unpacked > MAX_UNPACKED {
                return Err(ReadError::TooLarge);
            }
            let chunk = &buf[..n];
            hasher.update(chunk);
            if keep {
                let room = HEAD.saturating_sub(head.len());
                head.extend_from_slice(&chunk[..room.min(n)]);
                tail.extend_from_slice(chunk);
                if tail.len() > 2 * TAIL {
                    tail.drain(..tail.len() - TAIL);
                }
            }
            if let Some(w) = whole.as_mut() {
                w.extend_from_slice(chunk);
            }
        }
        if tail.len() > TAIL {
            tail.drain(..tail.len() - TAIL);
        }
        let (sha256, size) = hasher.finish();
        let kept = head.len() + tail.len() + whole.as_ref().map_or(0, Vec::len);
        whole_total += whole.as_ref().map_or(0, Vec::len);
        out.kept += kept + path.len();
        out.members.push(Member {
            path,
            size,
            sha256,
            head,
            tail,
            whole,
        });
    }
    Ok(out)
}

/// Stream the file at `path` out of an archive into `sink`, chunk by chunk, calling `found`
/// first, once the file is found; returns its size.
pub fn extract(
    reader: impl Read,
    path: &str,
    found: impl FnOnce(),
    mut sink: impl FnMut(&[u8]) -> io::Result<()>,
) -> Result<u64, ReadError> {
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(reader));
    let mut buf = vec![0u8; 64 << 10];
    for entry in archive.entries().map_err(ReadError::Broken)? {
        let mut entry = entry.map_err(ReadError::Broken)?;
        if entry.header().entry_type() != tar::EntryType::Regular
            || entry_path(&entry).as_deref() != Some(path)
        {
            continue;
        }
        found();
        let mut sent = 0u64;
        loop {
            let n = entry.read(&mut buf).map_err(ReadError::Broken)?;
            if n == 0 {
                return Ok(sent);
            }
            sink(&buf[..n]).map_err(ReadError::Sink)?;
            sent += n as u64;
        }
    }
    Err(ReadError::NotFound(path.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::targz;

    #[test]
    fn scans_keep_digests_heads_tails_and_histograms() {
        let log: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let csv = b"lo,hi,count\n0,1,3\n";
        let t = targz(&[
            ("histogram.csv", csv),
            ("_copilot/stdout.txt", &log),
            ("empty.txt", b""),
        ]);
        let c = scan(&t[..]).unwrap();
        assert_eq!(c.members.len(), 3);
        let h = c.get("histogram.csv").unwrap();
        assert_eq!((h.size, h.sha256), (csv.len() as u64, Sha256::of(csv)));
        assert_eq!(h.whole.as_deref(), Some(&csv[..]));
        let o = c.get("_copilot/stdout.txt").unwrap();
        assert_eq!(o.sha256, Sha256::of(&log));
        assert_eq!(o.head, &log[..HEAD]);
        assert_eq!(o.tail, &log[log.len() - TAIL..]);
        assert_eq!(o.whole, None);
        assert_eq!(c.get("empty.txt").unwrap().sha256, Sha256::of(b""));
        assert!(c.kept >= HEAD + TAIL + csv.len());
        assert!(c.get("nope").is_none());
    }

    #[test]
    fn broken_archives_are_errors() {
        assert!(matches!(scan(&b"not gzip"[..]), Err(ReadError::Broken(_))));
        let t = targz(&[("a.txt", b"0123456789")]);
        let cut = &t[..t.len() / 2];
        assert!(matches!(scan(cut), Err(ReadError::Broken(_))));
    }

    #[test]
    fn extract_streams_one_file() {
        let t = targz(&[("a.txt", b"first"), ("out/b.txt", b"second")]);
        let mut got = Vec::new();
        let mut found = false;
        let n = extract(
            &t[..],
            "out/b.txt",
            || found = true,
            |c| {
                got.extend_from_slice(c);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!((n, &got[..], found), (6, &b"second"[..], true));
        let mut found = false;
        assert!(matches!(
            extract(&t[..], "c.txt", || found = true, |_| Ok(())),
            Err(ReadError::NotFound(_))
        ));
        assert!(!found);
        let err = extract(
            &t[..],
            "a.txt",
            || {},
            |_| Err(io::Error::other("client gone")),
        );
        assert!(matches!(err, Err(ReadError::Sink(_))));
    }
}
