//! Network isolation for jobs that declare `network = false`: the payload starts in a network
//! namespace of its own, which holds only a loopback device that is down, so it reaches no
//! host, not even the agent's own host on 127.0.0.1.
//!
//! As root the child unshares just the network namespace (before it drops to the job's uid:
//! that needs CAP_SYS_ADMIN). Without root it unshares a user namespace together with it, which
//! unprivileged processes may do where the kernel allows unprivileged user namespaces. Whether
//! either works is probed once, in a throwaway child, so a host without it runs such jobs with
//! their network (reported, never a job failure).

use std::sync::OnceLock;

use nix::sched::CloneFlags;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::ForkResult;

/// How this host isolates a job's network, or why it cannot.
pub fn isolation() -> Result<CloneFlags, &'static str> {
    static PROBE: OnceLock<Result<CloneFlags, &'static str>> = OnceLock::new();
    *PROBE.get_or_init(|| {
        let flags = flags();
        match probe(flags) {
            Ok(true) => Ok(flags),
            Ok(false) => Err("the kernel refused to create a network namespace (unshare)"),
            Err(_) => Err("could not start a child process to probe network namespaces"),
        }
    })
}

/// The namespaces to unshare for this agent: as root only the network; otherwise a user
/// namespace as well, which is what lets an unprivileged process create the network one.
fn flags() -> CloneFlags {
    if super::is_root() {
        CloneFlags::CLONE_NEWNET
    } else {
        CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNET
    }
}

/// Forks a child that tries `unshare(flags)` and exits 0 on success.
fn probe(flags: CloneFlags) -> Result<bool, nix::Error> {
    // SAFETY: the child calls only unshare(2) and _exit(2), both async-signal-safe, so forking a
    // multi-threaded process is sound; it touches no lock, allocator or shared state.
    match unsafe { nix::unistd::fork() }? {
        ForkResult::Child => {
            let code = i32::from(nix::sched::unshare(flags).is_err());
            // SAFETY: _exit ends the child at once, without running the parent's atexit
            // handlers or destructors, which a forked child of a threaded process must not.
            unsafe { nix::libc::_exit(code) }
        }
        ForkResult::Parent { child } => loop {
            match waitpid(child, None) {
                Ok(WaitStatus::Exited(_, code)) => return Ok(code == 0),
                Ok(WaitStatus::Signaled(..)) => return Ok(false),
                Ok(_) | Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(e),
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_needs_only_the_network_namespace() {
        let f = flags();
        assert!(f.contains(CloneFlags::CLONE_NEWNET));
        assert_eq!(
            f.contains(CloneFlags::CLONE_NEWUSER),
            !super::super::is_root()
        );
    }
}
