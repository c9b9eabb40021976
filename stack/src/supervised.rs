//! `Supervised`: a child process in its own process group with its output in a log file.
//! Stopping it signals the whole group, and dropping it stops it, so nothing is left behind.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::error::io;
use crate::StackError;

/// How long `Drop` waits after SIGTERM before it sends SIGKILL.
const DROP_GRACE: Duration = Duration::from_secs(3);
/// Bytes of the log shown in error messages.
const TAIL_BYTES: u64 = 2048;

/// A running child process, leader of its own process group.
#[derive(Debug)]
pub struct Supervised {
    name: String,
    child: Child,
    log: PathBuf,
    /// Set once the child has been reaped.
    status: Option<ExitStatus>,
}

impl Supervised {
    /// Start `cmd` as `name`: own process group, stdin from /dev/null, stdout and stderr appended
    /// to `log`. Arguments and environment are whatever `cmd` carries.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Supervised, StackError> {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(io(format!("opening log {}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(io(format!("opening log {}", log.display())))?;
        let child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(io(format!("starting {name} ({:?})", cmd.get_program())))?;
        tracing::debug!(name, pid = child.id(), "started");
        Ok(Supervised {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
            status: None,
        })
    }

    /// What this process is called in messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process id (also the process group id).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The log file its output goes to.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// The last part of the log, for error messages.
    pub fn log_tail(&self) -> String {
        tail(&self.log)
    }

    /// Its exit status if it has exited (reaping it), else `None`.
    pub fn exited(&mut self) -> Result<Option<ExitStatus>, StackError> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .map_err(io(format!("checking on {}", self.name)))?;
        }
        Ok(self.status)
    }

    /// An error if the process has exited: used while waiting for it to become ready.
    pub fn check_alive(&mut self) -> Result<(), StackError> {
        match self.exited()? {
            None => Ok(()),
            Some(status) => Err(StackError::Exited {
                what: self.name.clone(),
                status,
                log: self.log.clone(),
                tail: self.log_tail(),
            }),
        }
    }

    /// Polls `ready` every 20 ms until it says yes; an error if the process exits first or
    /// `timeout` passes (naming `what` and the tail of `log`, the server's own log file).
    pub fn wait_ready(
        &mut self,
        what: &str,
        timeout: Duration,
        log: &Path,
        mut ready: impl FnMut() -> bool,
    ) -> Result<(), StackError> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            if ready() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(StackError::NotReady {
                    what: what.to_owned(),
                    secs: timeout.as_secs(),
                    log: log.to_owned(),
                    tail: tail(log),
                });
            }
            sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL to the whole group, then reap the leader.
    pub fn kill9(&mut self) -> Result<ExitStatus, StackError> {
        self.signal_group(Signal::SIGKILL)?;
        self.reap()
    }

    /// SIGTERM to the whole group; after `grace`, SIGKILL to the group. Returns the leader's
    /// exit status. Leftovers of the group are killed even when the leader exits in time.
    pub fn stop(&mut self, grace: Duration) -> Result<ExitStatus, StackError> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        self.signal_group(Signal::SIGTERM)?;
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = self.exited()? {
                // The leader is gone; members that ignored SIGTERM go now.
                self.signal_group(Signal::SIGKILL)?;
                return Ok(status);
            }
            sleep(Duration::from_millis(20));
        }
        tracing::warn!(name = %self.name, "did not stop after SIGTERM; sending SIGKILL");
        self.kill9()
    }

    fn reap(&mut self) -> Result<ExitStatus, StackError> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        let status = self
            .child
            .wait()
            .map_err(io(format!("waiting for {}", self.name)))?;
        self.status = Some(status);
        Ok(status)
    }

    /// Signal the process group; a group that no longer exists is fine.
    fn signal_group(&self, sig: Signal) -> Result<(), StackError> {
        let pid = self.pid();
        // Process ids fit an i32 (pid_t); a larger value cannot come from the kernel.
        let Ok(raw) = i32::try_from(pid) else {
            return Ok(());
        };
        match killpg(Pid::from_raw(raw), sig) {
            Ok(()) | Err(nix::Error::ESRCH) => Ok(()),
            Err(error) => Err(StackError::Signal {
                what: self.name.clone(),
                pid,
                error,
            }),
        }
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        if let Err(e) = self.stop(DROP_GRACE) {
            tracing::warn!(name = %self.name, error = %e, "could not stop");
        }
    }
}

/// The last [`TAIL_BYTES`] of a file, lossily decoded; empty if it cannot be read.
pub(crate) fn tail(path: &Path) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if f.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)))
        .is_err()
    {
        return String::new();
    }
    let mut buf = Vec::new();
    if f.read_to_end(&mut buf).is_err() {
        return String::new();
    }
    String::from_utf8_lossy(&buf).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether the process exists and is not a zombie (an orphan's reaping is up to PID 1).
    fn alive(pid: u32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => false,
            Ok(stat) => stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        }
    }

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    }

    #[test]
    fn stop_kills_the_whole_group_even_children_that_ignore_sigterm() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("x.log");
        let pidfile = dir.path().join("child.pid");
        let script = format!(
            "sh -c 'trap \"\" TERM; echo $$ > {p}; while :; do sleep 1; done' & wait",
            p = pidfile.display()
        );
        let mut s = Supervised::spawn("x", sh(&script), &log).unwrap();
        while !pidfile.exists() || std::fs::read_to_string(&pidfile).unwrap().trim().is_empty() {
            sleep(Duration::from_millis(10));
        }
        let grandchild: u32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(alive(grandchild));
        s.stop(Duration::from_millis(200)).unwrap();
        // SIGKILL takes effect asynchronously: poll until it is gone (no timing threshold).
        while alive(grandchild) {
            sleep(Duration::from_millis(10));
        }
        assert!(s.exited().unwrap().is_some());
    }

    #[test]
    fn exit_is_reported_with_the_log_tail() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("y.log");
        let mut s = Supervised::spawn("y", sh("echo boom >&2; exit 7"), &log).unwrap();
        while s.exited().unwrap().is_none() {
            sleep(Duration::from_millis(10));
        }
        let err = s.check_alive().unwrap_err().to_string();
        assert!(err.contains("boom"), "{err}");
        assert!(err.contains('7'), "{err}");
    }

    #[test]
    fn drop_stops_the_process() {
        let dir = tempfile::tempdir().unwrap();
        let s = Supervised::spawn("z", sh("exec sleep 600"), &dir.path().join("z.log")).unwrap();
        let pid = s.pid();
        drop(s);
        assert!(!alive(pid));
    }
}
