//! The OS calls the qemu backend needs, each behind a safe function: a close-on-exec pipe,
//! sending a descriptor over a unix socket (SCM_RIGHTS), a child that dies with the wrapper
//! and gets one descriptor as fd 3, SIGKILL to a pid.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

/// The descriptor number a child started by [`with_fd3`] finds its extra descriptor at.
pub const CHILD_FD: RawFd = 3;

/// A pipe, both ends close-on-exec: (read, write).
pub fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two descriptors into the two-element array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded: both descriptors are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Writes `data` (not empty) on the connected unix socket `socket` with `fd` attached
/// (SCM_RIGHTS); returns how many bytes went (the caller writes the rest plainly).
pub fn send_with_fd(socket: RawFd, data: &[u8], fd: BorrowedFd<'_>) -> std::io::Result<usize> {
    let raw = fd.as_raw_fd();
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    // u64 elements keep the control buffer aligned for cmsghdr.
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is valid before the fields are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = space as _;
    // SAFETY: msg_control points at `space` zeroed, aligned bytes, enough for one header with
    // one descriptor, so CMSG_FIRSTHDR is non-null and CMSG_DATA points inside the buffer.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut RawFd, raw);
    }
    loop {
        // SAFETY: msg points at a live iovec over `data` and at the control buffer above;
        // sendmsg only reads them.
        let n = unsafe { libc::sendmsg(socket, &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Makes `cmd` die with the wrapper (SIGKILL when the wrapper's thread that started it ends)
/// and, with `fd3`, find that descriptor as fd [`CHILD_FD`]. The caller keeps `fd3` open
/// until the child is spawned.
pub fn with_fd3(cmd: &mut Command, fd3: Option<BorrowedFd<'_>>) {
    let fd3 = fd3.map(|f| f.as_raw_fd());
    // SAFETY: the closure runs in the child between fork and exec and calls only prctl,
    // getppid (in die_with_parent), dup2 and fcntl, all async-signal-safe; it allocates
    // nothing.
    unsafe {
        cmd.pre_exec(move || {
            crate::proctree::die_with_parent(libc::SIGKILL)?;
            if let Some(fd) = fd3 {
                if fd == CHILD_FD {
                    // dup2 onto itself keeps close-on-exec: clear it instead.
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(fd, CHILD_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsFd;

    #[test]
    fn a_child_reads_its_fd3_and_pipes_close() {
        let (r, w) = pipe().unwrap();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "cat <&3"])
            .stdout(std::process::Stdio::piped());
        with_fd3(&mut cmd, Some(r.as_fd()));
        let mut child = cmd.spawn().unwrap();
        drop(r);
        let mut wf = std::fs::File::from(w);
        std::io::Write::write_all(&mut wf, b"hello").unwrap();
        drop(wf);
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        assert_eq!(out, "hello");
        assert!(child.wait().unwrap().success());
        assert!(
            crate::proctree::signal(child.id() as i32, libc::SIGKILL).is_ok(),
            "gone is fine"
        );
    }
}
