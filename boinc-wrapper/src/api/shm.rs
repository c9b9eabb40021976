//! The shared-memory segment the BOINC client and the application talk through: 8 channels of
//! [`CHANNEL_SIZE`] bytes ([`SEGMENT_SIZE`] in all, `SHARED_MEM` in the client's
//! `lib/app_ipc.h`).
//!
//! Where the segment comes from depends on the platform and the app version's `api_version`,
//! so it is behind the [`Segment`] trait:
//! - Unix, api_version ≥ 6 (init_data's `shm_key` is -1): the file `boinc_mmap_file` in the
//!   slot dir, mapped shared ([`SharedSegment::mmap_file`]);
//! - Unix, older app versions: a System V segment whose key is init_data's `shm_key`
//!   ([`SharedSegment::sysv`]);
//! - Windows (named file mapping `comm_obj_name`): not implemented yet; it would be one more
//!   `Segment`.
//!
//! Every byte is accessed as an atomic byte: the client writes the same memory from another
//! process at any time, so plain reads would be data races.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU8;

/// Bytes in one channel.
pub const CHANNEL_SIZE: usize = 1024;
/// Channels in the segment.
pub const CHANNELS: usize = 8;
/// Bytes in the segment.
pub const SEGMENT_SIZE: usize = CHANNEL_SIZE * CHANNELS;
/// The mmap'ed file's name in the slot dir (`MMAPPED_FILE_NAME`).
pub const MMAP_FILE: &str = "boinc_mmap_file";

/// Why the segment could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    #[error("cannot open {}: {error}", path.display())]
    Open {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{} has {len} bytes, fewer than the {SEGMENT_SIZE} of the shared segment", path.display())]
    TooSmall { path: PathBuf, len: u64 },
    #[error("cannot map {}: {error}", path.display())]
    Map {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("no System V shared memory segment with key {key}: {error}")]
    SysvGet { key: i32, error: std::io::Error },
    #[error("System V segment {key} has {size} bytes, fewer than {SEGMENT_SIZE}")]
    SysvTooSmall { key: i32, size: usize },
    #[error("cannot attach System V segment {key}: {error}")]
    SysvAttach { key: i32, error: std::io::Error },
}

/// A mapped shared segment of at least [`SEGMENT_SIZE`] bytes, valid as long as it lives.
pub trait Segment: Send {
    /// The segment's bytes. Implementations guarantee [`SEGMENT_SIZE`] bytes, mapped
    /// read-write for as long as `self` lives.
    fn bytes(&self) -> &[AtomicU8; SEGMENT_SIZE];
}

/// How a [`SharedSegment`] is let go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Release {
    /// `munmap` (an mmap'ed file).
    Unmap,
    /// `shmdt` (a System V segment; the client removes the segment itself).
    Detach,
}

/// The client's segment, mapped into this process: the mmap'ed `boinc_mmap_file`
/// (api_version ≥ 6 on Unix) or a System V segment (older app versions).
#[derive(Debug)]
pub struct SharedSegment {
    /// At least SEGMENT_SIZE bytes, mapped read-write until `drop`.
    ptr: std::ptr::NonNull<libc::c_void>,
    release: Release,
}

// SAFETY: the mapping is plain shared memory owned by this value; every access goes through
// atomics, so moving the owner to another thread is fine.
unsafe impl Send for SharedSegment {}

impl SharedSegment {
    /// Map the first [`SEGMENT_SIZE`] bytes of `path` shared, read-write. The client creates
    /// the file with that size; a shorter file is refused (touching its missing pages would
    /// raise SIGBUS).
    pub fn mmap_file(path: &Path) -> Result<SharedSegment, ShmError> {
        use std::os::fd::AsRawFd;
        let open_err = |error| ShmError::Open {
            path: path.to_owned(),
            error,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(open_err)?;
        let len = file.metadata().map_err(open_err)?.len();
        if len < SEGMENT_SIZE as u64 {
            return Err(ShmError::TooSmall {
                path: path.to_owned(),
                len,
            });
        }
        // SAFETY: mapping a regular file we opened read-write, at a kernel-chosen address; the
        // result is checked against MAP_FAILED before use. The mapping outlives the descriptor,
        // which is closed when `file` drops.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                SEGMENT_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        let map_err = |error| ShmError::Map {
            path: path.to_owned(),
            error,
        };
        if ptr == libc::MAP_FAILED {
            return Err(map_err(std::io::Error::last_os_error()));
        }
        let ptr = std::ptr::NonNull::new(ptr)
            .ok_or_else(|| map_err(std::io::Error::other("mmap returned a null pointer")))?;
        Ok(SharedSegment {
            ptr,
            release: Release::Unmap,
        })
    }

    /// Attach the existing System V segment with `key` (init_data's `shm_key`), read-write.
    pub fn sysv(key: i32) -> Result<SharedSegment, ShmError> {
        let get_err = |error| ShmError::SysvGet { key, error };
        // SAFETY: shmget only looks up an existing segment (no IPC_CREAT); the result is checked.
        let id = unsafe { libc::shmget(key, 0, 0) };
        if id < 0 {
            return Err(get_err(std::io::Error::last_os_error()));
        }
        // SAFETY: shmid_ds is plain data; all-zero is a valid value for IPC_STAT to overwrite.
        let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
        // SAFETY: `ds` is a valid, writable shmid_ds for IPC_STAT to fill.
        if unsafe { libc::shmctl(id, libc::IPC_STAT, &mut ds) } < 0 {
            return Err(get_err(std::io::Error::last_os_error()));
        }
        if ds.shm_segsz < SEGMENT_SIZE {
            return Err(ShmError::SysvTooSmall {
                key,
                size: ds.shm_segsz,
            });
        }
        // SAFETY: attaching an existing segment of at least SEGMENT_SIZE bytes at a
        // kernel-chosen address, read-write; (void*)-1 signals failure and is checked.
        let ptr = unsafe { libc::shmat(id, std::ptr::null(), 0) };
        let attach_err = |error| ShmError::SysvAttach { key, error };
        if ptr as isize == -1 {
            return Err(attach_err(std::io::Error::last_os_error()));
        }
        let ptr = std::ptr::NonNull::new(ptr)
            .ok_or_else(|| attach_err(std::io::Error::other("shmat returned a null pointer")))?;
        Ok(SharedSegment {
            ptr,
            release: Release::Detach,
        })
    }
}

impl Segment for SharedSegment {
    fn bytes(&self) -> &[AtomicU8; SEGMENT_SIZE] {
        // SAFETY: `ptr` is a live read-write mapping of at least SEGMENT_SIZE bytes (checked by
        // both constructors) until `drop` releases it; AtomicU8 has the layout of u8.
        unsafe { &*self.ptr.as_ptr().cast::<[AtomicU8; SEGMENT_SIZE]>() }
    }
}

impl Drop for SharedSegment {
    fn drop(&mut self) {
        // SAFETY: releasing exactly the mapping the constructor made, the way it was made; no
        // reference into it outlives `self` (they borrow it).
        unsafe {
            match self.release {
                Release::Unmap => libc::munmap(self.ptr.as_ptr(), SEGMENT_SIZE),
                Release::Detach => libc::shmdt(self.ptr.as_ptr()),
            };
        }
    }
}

/// A segment in this process's own memory, for tests: clones share the memory, so one clone
/// can play the client and another the application.
#[derive(Debug, Clone)]
pub struct LocalSegment(std::sync::Arc<[AtomicU8; SEGMENT_SIZE]>);

impl LocalSegment {
    /// A zeroed segment.
    pub fn new() -> LocalSegment {
        LocalSegment(std::sync::Arc::new(std::array::from_fn(|_| {
            AtomicU8::new(0)
        })))
    }
}

impl Default for LocalSegment {
    fn default() -> Self {
        Self::new()
    }
}

impl Segment for LocalSegment {
    fn bytes(&self) -> &[AtomicU8; SEGMENT_SIZE] {
        &self.0
    }
}

/// The segment an application attaches given init_data's `shm_key`: -1 (or absent) means the
/// mmap'ed file in `slot_dir`, anything else a System V key.
pub fn attach(slot_dir: &Path, shm_key: Option<i32>) -> Result<Box<dyn Segment>, ShmError> {
    match shm_key {
        None | Some(-1) => Ok(Box::new(SharedSegment::mmap_file(
            &slot_dir.join(MMAP_FILE),
        )?)),
        Some(key) => Ok(Box::new(SharedSegment::sysv(key)?)),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    #[test]
    fn an_mmap_file_is_shared_between_two_mappings() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(MMAP_FILE);
        std::fs::write(&path, vec![0u8; SEGMENT_SIZE]).unwrap();
        let a = attach(dir.path(), Some(-1)).unwrap();
        let b = SharedSegment::mmap_file(&path).unwrap();
        a.bytes()[4 * CHANNEL_SIZE].store(1, Ordering::Release);
        assert_eq!(b.bytes()[4 * CHANNEL_SIZE].load(Ordering::Acquire), 1);
        drop(a);
        drop(b);
        assert_eq!(std::fs::read(&path).unwrap()[4 * CHANNEL_SIZE], 1);
    }

    #[test]
    fn short_or_missing_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = SharedSegment::mmap_file(&dir.path().join("nope")).unwrap_err();
        assert!(matches!(err, ShmError::Open { .. }), "{err}");
        let path = dir.path().join("short");
        std::fs::write(&path, [0u8; 100]).unwrap();
        let err = SharedSegment::mmap_file(&path).unwrap_err();
        assert!(matches!(err, ShmError::TooSmall { len: 100, .. }), "{err}");
    }

    #[test]
    fn a_sysv_segment_is_attached_by_key() {
        // A private key the test creates and removes itself.
        let key = 0x0c0b_0000 | (std::process::id() as i32 & 0xffff);
        // SAFETY: creating a fresh segment for this test only; removed below.
        let id =
            unsafe { libc::shmget(key, SEGMENT_SIZE, libc::IPC_CREAT | libc::IPC_EXCL | 0o600) };
        if id < 0 {
            println!(
                "a_sysv_segment_is_attached_by_key: skipped: shmget: {}",
                std::io::Error::last_os_error()
            );
            return;
        }
        let seg = SharedSegment::sysv(key).unwrap();
        seg.bytes()[0].store(7, Ordering::Release);
        let again = SharedSegment::sysv(key).unwrap();
        assert_eq!(again.bytes()[0].load(Ordering::Acquire), 7);
        drop((seg, again));
        // SAFETY: removing the segment this test created.
        unsafe { libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) };
        assert!(matches!(
            SharedSegment::sysv(key).unwrap_err(),
            ShmError::SysvGet { .. }
        ));
    }
}
