//! The `process` backend: `copilot-agent` runs as a child of the wrapper, in a process group of
//! its own, with the parent-death signal set (SIGTERM) so that it never outlives the wrapper.
//!
//! The wrapper is a child subreaper ([`become_subreaper`]), so everything the agent starts —
//! payloads run in sessions of their own — stays in the wrapper's process tree, even orphans:
//! - suspend = SIGSTOP to every process of the tree (the agent first, so it starts nothing new),
//!   repeated until `/proc` shows all of them stopped; resume = SIGCONT to all;
//! - drain = SIGUSR1 to the agent; stop = SIGTERM to the agent, SIGKILL to the tree after the
//!   grace period; kill = SIGKILL to the tree until nothing is left;
//! - CPU time = the wrapper's reaped children plus every live process of the tree;
//! - checkpoint: the agent keeps no state worth saving (its work lives in the manager's queue),
//!   so between jobs (no process below the agent) a stop loses nothing; while a payload runs it
//!   would lose that job's progress, so that is no checkpoint.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{wait_until, Backend, BackendError, Checkpoint, Exit};
use crate::proctree;

/// Longest time `suspend` spends making sure every process has stopped.
const SUSPEND_LIMIT: Duration = Duration::from_secs(2);
/// Rounds of SIGKILL over the tree before `kill` gives up.
const KILL_ROUNDS: u32 = 500;

/// Make this process a child subreaper: orphaned descendants are reparented to it rather than
/// to init, so the wrapper can find, stop and kill them.
pub fn become_subreaper() -> std::io::Result<()> {
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes one integer argument and touches no
    // memory of ours.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// copilot-agent as a child process.
#[derive(Debug)]
pub struct ProcessBackend {
    agent: i32,
    exit: Option<Exit>,
    suspended: bool,
}

impl ProcessBackend {
    /// Start `program --config config` in `dir`, stdout to /dev/null, stderr inherited (the
    /// client appends the wrapper's stderr to the task's stderr.txt).
    pub fn start(
        program: &Path,
        config: &Path,
        dir: &Path,
    ) -> Result<ProcessBackend, BackendError> {
        let mut cmd = Command::new(program);
        cmd.arg("--config")
            .arg(config)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .process_group(0);
        // SAFETY: the closure runs in the child between fork and exec and calls only prctl and
        // getppid (in die_with_parent), both async-signal-safe; it allocates nothing.
        unsafe {
            cmd.pre_exec(|| crate::proctree::die_with_parent(libc::SIGTERM));
        }
        let child = cmd.spawn().map_err(|error| BackendError::Start {
            what: program.display().to_string(),
            error,
        })?;
        // The Child handle is dropped without waiting: `reap` collects the exit status with
        // waitpid, together with any orphan reparented to us.
        let agent = i32::try_from(child.id())
            .map_err(|_| BackendError::Other("pid out of range".into()))?;
        tracing::info!(pid = agent, program = %program.display(), "agent started");
        Ok(ProcessBackend {
            agent,
            exit: None,
            suspended: false,
        })
    }

    /// Reap every exited child (the agent and reparented orphans); records the agent's exit.
    fn reap(&mut self) {
        loop {
            let mut status = 0;
            // SAFETY: waitpid writes the status into a valid local; WNOHANG never blocks.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                return;
            }
            if pid == self.agent {
                self.exit = Some(if libc::WIFSIGNALED(status) {
                    Exit::Signal(libc::WTERMSIG(status))
                } else {
                    Exit::Code(libc::WEXITSTATUS(status))
                });
                tracing::info!(pid, exit = %self.exit.map(|e| e.to_string()).unwrap_or_default(), "agent ended");
            }
        }
    }

    /// Send `sig` to every live process of the tree, parents first; returns how many.
    fn signal_tree(
        &self,
        sig: libc::c_int,
        skip: impl Fn(&proctree::Proc) -> bool,
    ) -> Result<usize, BackendError> {
        let mut n = 0;
        for p in proctree::mine() {
            if p.dead() || skip(&p) {
                continue;
            }
            proctree::signal(p.pid, sig).map_err(|error| BackendError::Signal {
                what: "a process of the session",
                pid: p.pid,
                error,
            })?;
            n += 1;
        }
        Ok(n)
    }

    fn kill_tree(&mut self) -> Result<(), BackendError> {
        for _ in 0..KILL_ROUNDS {
            self.reap();
            let left = self.signal_tree(libc::SIGKILL, |_| false)?;
            if left == 0 {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Err(BackendError::Other(format!(
            "processes of the session survived {KILL_ROUNDS} rounds of SIGKILL"
        )))
    }
}

impl Backend for ProcessBackend {
    fn pid(&self) -> Option<u32> {
        u32::try_from(self.agent).ok()
    }

    fn suspend(&mut self) -> Result<(), BackendError> {
        self.suspended = true;
        let stopped = wait_until(SUSPEND_LIMIT, || {
            // Anything not yet stopped gets SIGSTOP; done once a scan finds nothing running.
            let running = self.signal_tree(libc::SIGSTOP, proctree::Proc::stopped)?;
            Ok((running == 0).then_some(()))
        })?;
        if stopped.is_none() {
            tracing::warn!("some processes of the session had not stopped after {SUSPEND_LIMIT:?}");
        }
        Ok(())
    }

    fn resume(&mut self) -> Result<(), BackendError> {
        self.suspended = false;
        self.signal_tree(libc::SIGCONT, |_| false).map(|_| ())
    }

    fn set_network(&mut self, up: bool) -> Result<(), BackendError> {
        // The agent retries its XMPP connection and transfers by itself; nothing to do.
        tracing::info!(up, "network use changed");
        Ok(())
    }

    fn checkpoint(&mut self) -> Result<Checkpoint, BackendError> {
        // The agent's children are its payloads: while one runs, a quit would cost its job's
        // progress (the job is requeued and starts over elsewhere).
        let procs = proctree::scan();
        let busy = proctree::descendants(&procs, self.agent)
            .iter()
            .any(|p| !p.dead());
        Ok(if busy {
            Checkpoint::Busy
        } else {
            Checkpoint::NothingToLose
        })
    }

    fn drain(&mut self) -> Result<(), BackendError> {
        tracing::info!(pid = self.agent, "asking the agent to drain");
        proctree::signal(self.agent, libc::SIGUSR1).map_err(|error| BackendError::Signal {
            what: "the agent",
            pid: self.agent,
            error,
        })
    }

    fn stop(&mut self, grace: Duration) -> Result<Exit, BackendError> {
        if self.suspended {
            self.resume()?;
        }
        self.reap();
        if self.exit.is_none() {
            proctree::signal(self.agent, libc::SIGTERM).map_err(|error| BackendError::Signal {
                what: "the agent",
                pid: self.agent,
                error,
            })?;
            wait_until(grace, || {
                self.reap();
                Ok(self.exit)
            })?;
        }
        // Whatever is left (the agent after its grace, strays) goes now.
        self.kill_tree()?;
        self.reap();
        Ok(self.exit.unwrap_or(Exit::Signal(libc::SIGKILL)))
    }

    fn kill(&mut self) -> Result<(), BackendError> {
        self.kill_tree()
    }

    fn poll(&mut self) -> Result<Option<Exit>, BackendError> {
        self.reap();
        Ok(self.exit)
    }

    fn cpu_seconds(&self) -> f64 {
        proctree::rusage_cpu(libc::RUSAGE_CHILDREN)
            + proctree::mine().iter().map(|p| p.cpu_seconds).sum::<f64>()
    }
}
