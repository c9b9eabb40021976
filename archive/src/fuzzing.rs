//! The unpacker's promises, for the fuzz target (fuzz/) and its regression tests: whatever the
//! bytes, unpacking writes only plain files and directories inside the target dir, no more
//! than the limit, and never panics.

use std::path::Path;

use crate::unpack::unpack;

/// Bytes of file data the check lets an archive unpack to.
const LIMIT: u64 = 1 << 20;

/// Unpacks `data` into a fresh temp dir and checks what appeared around it.
pub fn unpack_archive(data: &[u8]) {
    let root = tempfile_dir();
    let dest = root.join("out");
    let _ = unpack(data, &dest, LIMIT);
    let mut written = 0u64;
    walk(&root, &mut |path, meta| {
        assert!(
            path == dest || path.starts_with(&dest),
            "{} was written outside the target dir",
            path.display()
        );
        assert!(
            meta.is_file() || meta.is_dir(),
            "{} is neither a plain file nor a dir",
            path.display()
        );
        if meta.is_file() {
            written += meta.len();
        }
    });
    assert!(
        written <= LIMIT,
        "{written} bytes written, the limit is {LIMIT}"
    );
    std::fs::remove_dir_all(&root).expect("the temp dir is removable");
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "copilot-unpack-check-{}-{:016x}",
        std::process::id(),
        rand_u64()
    ));
    std::fs::create_dir(&dir).expect("a fresh temp dir");
    dir
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id().into());
    h.finish()
}

/// Every entry below `dir` (not following links), with its own metadata.
fn walk(dir: &Path, f: &mut dyn FnMut(&Path, &std::fs::Metadata)) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        f(&path, &meta);
        if meta.is_dir() {
            walk(&path, f);
        }
    }
}
