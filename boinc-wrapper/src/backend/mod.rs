//! Where the agent runs: the [`Backend`] trait the wrapper drives, and its implementations.
//!
//! - [`process::ProcessBackend`]: `copilot-agent` as a child process (hosts without
//!   virtualisation, and the tests);
//! - [`qemu::QemuBackend`]: the copilot VM image under QEMU, with QMP `stop`/`cont`, the VM's
//!   state saved to a file at checkpoints and quits and restored on the next start.
//!
//! The trait's verbs are the BOINC client's requests mapped to a session: suspend/resume,
//! checkpoint, drain (take no new job), quit (the client restarts the task later: keep what can
//! be kept), stop (graceful end of the session), kill (abort: nothing may be left behind).

pub mod process;
pub mod qemu;

use std::time::Duration;

/// Why a backend operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot start {what}: {error}")]
    Start { what: String, error: std::io::Error },
    #[error("cannot signal {what} (pid {pid}): {error}")]
    Signal {
        what: &'static str,
        pid: i32,
        error: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

/// How the session's process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

impl Exit {
    /// Exited with code 0.
    pub fn success(self) -> bool {
        self == Exit::Code(0)
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit code {c}"),
            Exit::Signal(s) => write!(f, "signal {s}"),
        }
    }
}

/// What a checkpoint request achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checkpoint {
    /// The session's state was saved (e.g. a VM's state to a file).
    Saved,
    /// Nothing would be lost by a stop now: the session keeps no state of its own and runs no
    /// job (the process backend between jobs; its work lives in the manager's queue).
    NothingToLose,
    /// A stop now would lose work (a job runs) and it cannot be saved: not a checkpoint. The
    /// caller asks again later.
    Busy,
}

/// A running agent session the wrapper controls. Every method returns quickly except `stop`,
/// which waits at most its grace period.
pub trait Backend {
    /// The process whose CPU and memory the client should count (BOINC's `other_pid`).
    fn pid(&self) -> Option<u32>;

    /// Stop computing; the session keeps its state. Returns once it is paused.
    fn suspend(&mut self) -> Result<(), BackendError>;

    /// Continue after [`Backend::suspend`].
    fn resume(&mut self) -> Result<(), BackendError>;

    /// The client allowed (true) or suspended (false) network use.
    fn set_network(&mut self, up: bool) -> Result<(), BackendError>;

    /// Save what must survive a quit, if it can be saved now. Only `Saved` and
    /// `NothingToLose` count as a checkpoint for the client, which may then preempt the task
    /// by quitting it rather than suspending it in memory.
    fn checkpoint(&mut self) -> Result<Checkpoint, BackendError>;

    /// Ask the agent to take no new job and end once its current jobs are done.
    fn drain(&mut self) -> Result<(), BackendError>;

    /// Graceful stop (end of session): the agent ends its session (jobs it still runs are
    /// handed back to the manager, which requeues them); after `grace` everything is killed.
    /// Returns how the session ended.
    fn stop(&mut self, grace: Duration) -> Result<Exit, BackendError>;

    /// The client will restart the task later (quit, or the client is gone): save what can be
    /// saved for the next start, then end like [`Backend::stop`]. Without state of its own a
    /// backend just stops.
    fn quit(&mut self, grace: Duration) -> Result<Exit, BackendError> {
        self.stop(grace)
    }

    /// Abort: kill everything at once and leave nothing behind.
    fn kill(&mut self) -> Result<(), BackendError>;

    /// Whether the session has ended by itself (non-blocking).
    fn poll(&mut self) -> Result<Option<Exit>, BackendError>;

    /// CPU seconds the session has used so far (all its processes, including finished ones).
    fn cpu_seconds(&self) -> f64;
}

/// Polls `done` every 10 ms until it returns Some or `limit` passes.
pub(crate) fn wait_until<T>(
    limit: Duration,
    mut done: impl FnMut() -> Result<Option<T>, BackendError>,
) -> Result<Option<T>, BackendError> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(v) = done()? {
            return Ok(Some(v));
        }
        if std::time::Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
