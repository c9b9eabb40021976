//! Running the payload in a sandbox: the [`PayloadRunner`] trait and [`SandboxRunner`].
//!
//! A run is validate-then-run, as the Firecracker jailer does it: [`Plan::new`] checks the
//! request and works out every control (rlimits, the job's uid) without touching the system;
//! [`SandboxRunner::run`] then applies the steps in a fixed order, each OS call with its own
//! [`SandboxError`] variant:
//!
//! 1. create the log files (agent-owned, outside the job's dir);
//! 2. as root: give the job dir to the slot's uid and kill anything left running under it;
//!    where the host has cgroup v2 for the agent, create the job's cgroup with its limits
//!    (see the `cgroup` module);
//! 3. spawn; in the child before exec (async-signal-safe calls only): new session, rlimits
//!    (CPU seconds, address space unless the cgroup bounds memory, file size, open files,
//!    core size 0, processes when the job has its own uid), joining the job's cgroup, a
//!    network namespace of its own for `network = false` jobs,
//!    `setgroups([])` + `setgid` + `setuid` to the slot's uid, then the parent-death signal
//!    and `no_new_privs`;
//! 4. supervise: past the wall time SIGTERM to the session's group, a grace period, SIGKILL;
//! 5. clean up: the cgroup's events turn a failure into a memory or processes limit; every
//!    remaining process of the job — in its cgroup, by uid, group, session, ancestry, or as an
//!    orphan reparented to the agent (a child subreaper) — is killed and reaped, and the
//!    cgroup removed;
//! 6. drain stdout/stderr, each capped at `output_cap` bytes (the rest is read and dropped).
//!
//! The typed result is a [`Verdict`]; [`RunResult::outcome`] is its wire form. Without root the
//! uid switch and the processes limit are skipped (logged once); see [`check()`] for what a
//! host provides.

pub(crate) mod cgroup;
mod check;
pub(crate) mod netns;
mod procs;

pub use check::{check, Protection};

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::future::Future;
use std::os::fd::RawFd;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use copilot_protocol::sandbox::{Protection as Guard, SandboxReport};
use copilot_protocol::wire::{Limit as WireLimit, Outcome};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use nix::sched::CloneFlags;
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::{Gid, Pid, Uid};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

/// `PATH` of every payload.
pub const PAYLOAD_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// First uid (and gid) of the job slots when the agent runs as root: slot `n` runs as
/// `DEFAULT_BASE_UID + n`. No passwd entry is needed.
pub const DEFAULT_BASE_UID: u32 = 61000;

/// Open files a payload may hold.
const OPEN_FILES: u64 = 1024;

/// How long output capture may go on after the payload's processes were killed.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// Kill-and-reap passes over `/proc` before giving up on a job's leftovers.
const CLEANUP_ROUNDS: u32 = 200;
const CLEANUP_PAUSE: Duration = Duration::from_millis(10);

/// What to run and how.
#[derive(Clone, Debug)]
pub struct RunRequest {
    /// Program and arguments; the program is looked up in [`PAYLOAD_PATH`].
    pub argv: Vec<String>,
    /// Working directory; also `HOME` and `TMPDIR` of the payload.
    pub dir: PathBuf,
    /// Environment on top of `PATH`, `HOME` and `TMPDIR` (it may override them).
    pub env: BTreeMap<String, String>,
    pub wall_time: Duration,
    /// CPU time of each process (`RLIMIT_CPU`; SIGXCPU, then SIGKILL a second later).
    pub cpu_time: Option<Duration>,
    /// Address space of each process (`RLIMIT_AS`).
    pub memory: Option<u64>,
    /// Size of each file written (`RLIMIT_FSIZE`; SIGXFSZ) — per file, not a quota.
    pub disk: Option<u64>,
    /// Processes of the job at once (`RLIMIT_NPROC`; only with a per-job uid).
    pub processes: Option<u32>,
    /// Bytes kept of each of stdout and stderr.
    pub output_cap: u64,
    /// Whether the payload may use the network; without, it gets a network namespace of its
    /// own where the host allows one (see the `netns` module).
    pub network: bool,
    pub stdout_path: PathBuf,
    pub stderr_path: PathBuf,
}

impl RunRequest {
    /// A request with no limit but `wall_time` and an unlimited output cap.
    pub fn new(
        argv: Vec<String>,
        dir: PathBuf,
        stdout_path: PathBuf,
        stderr_path: PathBuf,
    ) -> Self {
        RunRequest {
            argv,
            dir,
            env: BTreeMap::new(),
            wall_time: Duration::MAX,
            cpu_time: None,
            memory: None,
            disk: None,
            processes: None,
            output_cap: u64::MAX,
            network: true,
            stdout_path,
            stderr_path,
        }
    }
}

/// Which clock ran out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Clock {
    Wall,
    Cpu,
}

/// A limit the payload ran into, as far as the sandbox can tell. Without a cgroup, running
/// out of memory or processes shows only inside the payload (failed allocations, failed
/// forks) and ends as its exit code; with one, the cgroup's events tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// A file reached the disk limit (SIGXFSZ).
    Disk,
    /// The job's cgroup hit `memory.max` and the OOM killer struck.
    Memory,
    /// The job's cgroup refused forks at `pids.max`, and the job failed.
    Processes,
}

/// How a sandboxed run ended, typed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Exited(i32),
    Killed(i32),
    TimedOut(Clock),
    LimitExceeded(Limit),
    SetupFailed(SandboxError),
}

impl Verdict {
    /// The wire form: running out of CPU time or disk is `limit-exceeded` (cpu, disk).
    pub fn to_outcome(&self) -> Outcome {
        match self {
            Verdict::Exited(code) => Outcome::Exited { code: *code },
            Verdict::Killed(signal) => Outcome::Killed { signal: *signal },
            Verdict::TimedOut(Clock::Wall) => Outcome::TimedOut,
            Verdict::TimedOut(Clock::Cpu) => Outcome::LimitExceeded {
                limit: WireLimit::Cpu,
            },
            Verdict::LimitExceeded(limit) => Outcome::LimitExceeded {
                limit: match limit {
                    Limit::Disk => WireLimit::Disk,
                    Limit::Memory => WireLimit::Memory,
                    Limit::Processes => WireLimit::Processes,
                },
            },
            Verdict::SetupFailed(e) => Outcome::SetupFailed(e.to_string()),
        }
    }
}

/// A step of the sandbox that failed; each OS call has its own variant.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SandboxError {
    #[error("the command is empty")]
    NoProgram,
    #[error("job uid {0} is not an unprivileged uid")]
    BadUid(u32),
    #[error("cannot claim a job uid in {}: {error}", dir.display())]
    UidLock { dir: PathBuf, error: String },
    #[error("cannot read the current {resource} limit: {errno}")]
    GetRlimit {
        resource: &'static str,
        errno: Errno,
    },
    #[error("work dir {}: {error}", path.display())]
    WorkDir { path: PathBuf, error: String },
    #[error("cannot give {} to uid {uid}: {error}", path.display())]
    Chown {
        path: PathBuf,
        uid: u32,
        error: String,
    },
    #[error("cannot create log file {}: {error}", path.display())]
    CreateLog { path: PathBuf, error: String },
    #[error("cannot list processes: {0}")]
    ScanProcesses(String),
    /// Fork, the child's setup (session, rlimits, uid switch, parent-death signal) or exec
    /// failed; only the errno crosses back from the child, so the step is not known.
    #[error("cannot start {program:?}: {error}")]
    Spawn { program: String, error: String },
    #[error("the payload vanished right after it started")]
    NoPid,
    #[error("waiting for the payload failed: {0}")]
    Wait(String),
    #[error("the payload ended oddly: {0}")]
    OddStatus(String),
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunResult {
    /// Typed.
    pub verdict: Verdict,
    /// Its wire form.
    pub outcome: Outcome,
    /// Bytes kept in the stdout file.
    pub stdout_bytes: u64,
    /// Bytes kept in the stderr file.
    pub stderr_bytes: u64,
    /// Whether stdout was cut at the cap (or could not be kept in full).
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    /// From spawn to the end of output capture.
    pub duration: Duration,
    /// The protections applied and those this host lacked (empty when setup failed before
    /// the plan was made).
    pub sandbox: SandboxReport,
}

/// Something that runs a payload to its end. Never fails: every failure is an outcome.
pub trait PayloadRunner: Send + Sync {
    fn run(&self, req: &RunRequest) -> impl Future<Output = RunResult> + Send;
}

/// Runs payloads in the sandbox; shareable between concurrent jobs.
///
/// As root each job claims the lowest free uid from `base_uid` on, by an exclusive `flock` on
/// `lock_dir/uid-<n>.lock`: held for the whole job, across every agent process on the host
/// (several agents may share one), and released by the kernel if the agent dies. So a claimed
/// uid is used by no other live job, and anything still running under it is a leftover of a
/// dead agent, killed before the job starts.
#[derive(Clone, Debug)]
pub struct SandboxRunner {
    /// Time between SIGTERM and SIGKILL when the wall time is up.
    pub grace: Duration,
    /// Slot uids start here (root only).
    pub base_uid: u32,
    /// Where the uid locks live (root only).
    pub lock_dir: PathBuf,
    /// `cpu.max` of each job's cgroup, in CPUs (only where cgroups are used).
    pub cpus_per_job: Option<u32>,
}

/// Default [`SandboxRunner::lock_dir`].
pub const DEFAULT_LOCK_DIR: &str = "/run/copilot-agent";

/// Uids tried from the base uid on before a job gives up.
const MAX_SLOTS: u32 = 1024;

impl Default for SandboxRunner {
    fn default() -> Self {
        SandboxRunner::new(DEFAULT_BASE_UID)
    }
}

/// Pids of the payload leaders this process started and has not cleaned up; they are children
/// tokio waits for, so cleanup must not reap (or claim) them. Held while spawning, so a leader
/// is never seen unregistered.
static LEADERS: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());

fn leaders() -> std::sync::MutexGuard<'static, BTreeSet<i32>> {
    LEADERS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Whether the agent can switch payloads to another uid.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Makes the agent a child subreaper, so that orphans of payloads (daemons) become its
/// children and can be found and reaped. Process-wide; repeating it is harmless.
pub fn become_subreaper() -> Result<(), Errno> {
    nix::sys::prctl::set_child_subreaper(true)
}

/// Whether this process is a child subreaper now.
fn is_subreaper() -> bool {
    nix::sys::prctl::get_child_subreaper().unwrap_or(false)
}

impl SandboxRunner {
    /// A runner whose slot `n` runs as `base_uid + n` when the agent is root. Makes the agent
    /// a child subreaper (logged if the kernel refuses).
    pub fn new(base_uid: u32) -> Self {
        static ONCE: Once = Once::new();
        ONCE.call_once(|| {
            if let Err(e) = become_subreaper() {
                tracing::warn!("cannot become a child subreaper ({e}): daemonised payload processes are found only by uid, group or session");
            }
            if !is_root() {
                tracing::warn!("not running as root: payloads run as the agent's own uid, without the processes limit");
            }
        });
        SandboxRunner {
            grace: Duration::from_secs(5),
            base_uid,
            lock_dir: PathBuf::from(DEFAULT_LOCK_DIR),
            cpus_per_job: None,
        }
    }

    /// A cgroup for one job with its limits, where the host has cgroup v2 for the agent;
    /// `None` (logged) otherwise: the job then runs on rlimits alone.
    fn job_cgroup(&self, req: &RunRequest) -> Option<cgroup::JobCgroup> {
        let h = cgroup::hierarchy().ok()?;
        let limits = cgroup::CgroupLimits {
            memory: req.memory,
            processes: req.processes,
            cpus: self.cpus_per_job,
        };
        match h.create(limits) {
            Ok(cg) => Some(cg),
            Err(e) => {
                tracing::warn!("job runs without its cgroup: {e}");
                None
            }
        }
    }

    /// Claims the lowest free uid (see the type's docs); `None` when not root. The claim
    /// lasts until the returned lock drops.
    fn claim_uid(&self) -> Result<Option<(Identity, Flock<std::fs::File>)>, SandboxError> {
        if !is_root() {
            return Ok(None);
        }
        let lock_err = |e: String| SandboxError::UidLock {
            dir: self.lock_dir.clone(),
            error: e,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.lock_dir)
            .map_err(|e| lock_err(e.to_string()))?;
        for n in 0..MAX_SLOTS {
            let Some(id) = self.base_uid.checked_add(n) else {
                break;
            };
            let path = self.lock_dir.join(format!("uid-{id}.lock"));
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(|e| lock_err(format!("{}: {e}", path.display())))?;
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => {
                    let identity = Identity {
                        uid: Uid::from_raw(id),
                        gid: Gid::from_raw(id),
                    };
                    return Ok(Some((identity, lock)));
                }
                Err((_, Errno::EWOULDBLOCK)) => continue,
                Err((_, e)) => return Err(lock_err(format!("{}: {e}", path.display()))),
            }
        }
        Err(lock_err(format!(
            "no free uid among {MAX_SLOTS} from {}",
            self.base_uid
        )))
    }
}

/// A uid and gid for one job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    pub uid: Uid,
    pub gid: Gid,
}

/// Everything the child applies before exec, worked out and checked beforehand.
#[derive(Clone, Debug)]
pub struct Plan {
    /// `(resource, soft, hard)`, applied in order.
    pub rlimits: Vec<(Resource, u64, u64)>,
    /// The job's own uid/gid, when the agent is root.
    pub identity: Option<Identity>,
    /// Namespaces the child unshares to cut the payload off the network, when the job asked
    /// for that and the host allows it.
    pub unshare: Option<CloneFlags>,
    /// `cgroup.procs` of the job's cgroup, which the child joins, when there is one.
    pub cgroup_procs: Option<RawFd>,
    /// The agent's pid, checked in the child after setting the parent-death signal.
    pub parent: i32,
}

impl Plan {
    /// Checks `req` and derives the controls; touches nothing. Without `identity` the limits
    /// are clamped to the agent's own hard limits (an unprivileged process cannot raise them)
    /// and the processes limit is left out (`RLIMIT_NPROC` counts every process of the uid).
    pub fn new(req: &RunRequest, identity: Option<Identity>) -> Result<Plan, SandboxError> {
        if req.argv.first().is_none_or(String::is_empty) {
            return Err(SandboxError::NoProgram);
        }
        if let Some(id) = identity {
            if id.uid.is_root() || id.gid.as_raw() == 0 {
                return Err(SandboxError::BadUid(id.uid.as_raw()));
            }
        }
        let meta = std::fs::metadata(&req.dir).map_err(|e| SandboxError::WorkDir {
            path: req.dir.clone(),
            error: e.to_string(),
        })?;
        if !meta.is_dir() {
            return Err(SandboxError::WorkDir {
                path: req.dir.clone(),
                error: "not a directory".into(),
            });
        }
        let mut wanted: Vec<(Resource, &'static str, u64, u64)> = Vec::new();
        if let Some(cpu) = req.cpu_time {
            let secs = cpu.as_secs().max(1) + u64::from(cpu.subsec_nanos() > 0);
            wanted.push((Resource::RLIMIT_CPU, "cpu", secs, secs + 1));
        }
        if let Some(m) = req.memory {
            wanted.push((Resource::RLIMIT_AS, "address space", m, m));
        }
        if let Some(d) = req.disk {
            wanted.push((Resource::RLIMIT_FSIZE, "file size", d, d));
        }
        wanted.push((
            Resource::RLIMIT_NOFILE,
            "open files",
            OPEN_FILES,
            OPEN_FILES,
        ));
        wanted.push((Resource::RLIMIT_CORE, "core size", 0, 0));
        if let (Some(n), Some(_)) = (req.processes, identity) {
            wanted.push((Resource::RLIMIT_NPROC, "processes", n.into(), n.into()));
        }
        let root = is_root();
        let mut rlimits = Vec::with_capacity(wanted.len());
        for (resource, name, soft, hard) in wanted {
            if root {
                rlimits.push((resource, soft, hard));
                continue;
            }
            let (_, cur_hard) = getrlimit(resource).map_err(|errno| SandboxError::GetRlimit {
                resource: name,
                errno,
            })?;
            rlimits.push((resource, soft.min(cur_hard), hard.min(cur_hard)));
        }
        let unshare = if req.network {
            None
        } else {
            match netns::isolation() {
                Ok(flags) => Some(flags),
                Err(why) => {
                    static ONCE: Once = Once::new();
                    ONCE.call_once(|| {
                        tracing::warn!("jobs that declare network = false keep the network: {why}");
                    });
                    None
                }
            }
        };
        Ok(Plan {
            rlimits,
            identity,
            unshare,
            cgroup_procs: None,
            parent: i32::try_from(std::process::id()).unwrap_or(0),
        })
    }

    /// The payload joins the cgroup whose `cgroup.procs` is open as `procs`. Its `memory.max`
    /// bounds the whole job, so the per-process address-space limit goes: it only breaks
    /// programs that reserve much more address space than they use.
    pub fn use_cgroup(&mut self, procs: RawFd) {
        self.cgroup_procs = Some(procs);
        self.rlimits.retain(|(r, ..)| *r != Resource::RLIMIT_AS);
    }

    /// What this plan protects and what the job lacks on this host.
    pub fn report(&self, req: &RunRequest) -> SandboxReport {
        let mut r = SandboxReport::default();
        r.active.extend([
            Guard::Session,
            Guard::Rlimits,
            Guard::NoNewPrivs,
            Guard::ParentDeath,
            Guard::CleanEnv,
        ]);
        let mut put = |guard: Guard, on: bool| {
            if on {
                r.active.insert(guard);
            } else {
                r.missing.insert(guard);
            }
        };
        put(Guard::Uid, self.identity.is_some());
        if req.processes.is_some() {
            put(Guard::Nproc, self.identity.is_some());
        }
        put(Guard::Subreaper, is_subreaper());
        put(Guard::Cgroup, self.cgroup_procs.is_some());
        if !req.network {
            put(Guard::Netns, self.unshare.is_some());
        }
        r
    }
}

/// The bytes one capture kept.
#[derive(Clone, Copy, Debug, Default)]
struct Captured {
    kept: u64,
    truncated: bool,
}

/// Kills the job's processes when dropped — also when the run is cancelled (its future
/// dropped) halfway — and unregisters the leader.
#[derive(Debug)]
struct JobGuard {
    m: procs::Membership,
    /// A clean-up pass found nothing of the job left: dropping it needs no pass of its own.
    clean: bool,
}

impl JobGuard {
    fn new(m: procs::Membership) -> JobGuard {
        JobGuard { m, clean: false }
    }

    fn signal_group(&self, sig: Signal) {
        if self.m.leader <= 1 {
            // No group (the sweep of a uid's leftovers); killpg(0) would hit the agent's own.
            return;
        }
        match killpg(Pid::from_raw(self.m.leader), sig) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => tracing::warn!(
                pgid = self.m.leader,
                ?sig,
                "cannot signal process group: {e}"
            ),
        }
    }

    /// One pass: SIGKILL every live member, reap our own dead ones (never a leader: tokio
    /// waits for those). Returns how many members were seen.
    fn kill_pass(&self) -> Result<usize, SandboxError> {
        let registered = leaders();
        let all = procs::scan().map_err(|e| SandboxError::ScanProcesses(e.to_string()))?;
        let others: HashSet<i32> = registered.iter().copied().collect();
        let found = procs::members(&all, self.m, &others);
        for p in &found {
            if !p.zombie {
                match kill(Pid::from_raw(p.pid), Signal::SIGKILL) {
                    Ok(()) | Err(Errno::ESRCH) => {}
                    Err(e) => tracing::warn!(pid = p.pid, "cannot kill a payload process: {e}"),
                }
            }
        }
        for p in &found {
            if p.ppid == self.m.me && !registered.contains(&p.pid) {
                // Reaps it if it already died; WNOHANG never blocks.
                let _ = waitpid(Pid::from_raw(p.pid), Some(WaitPidFlag::WNOHANG));
            }
        }
        Ok(found.len())
    }

    /// Kills and reaps until no process of the job is left (or gives up, logged).
    async fn clean_up(&mut self) {
        self.signal_group(Signal::SIGKILL);
        for _ in 0..CLEANUP_ROUNDS {
            match self.kill_pass() {
                Ok(0) => {
                    self.clean = true;
                    return;
                }
                Ok(_) => tokio::time::sleep(CLEANUP_PAUSE).await,
                Err(e) => {
                    tracing::warn!(leader = self.m.leader, "{e}");
                    return;
                }
            }
        }
        tracing::warn!(
            leader = self.m.leader,
            "payload processes are still left after cleanup"
        );
    }
}

impl Drop for JobGuard {
    fn drop(&mut self) {
        // Nothing of a clean job is left to fork: one more pass over /proc would find nothing.
        if !self.clean {
            self.signal_group(Signal::SIGKILL);
            if let Err(e) = self.kill_pass() {
                tracing::warn!(leader = self.m.leader, "{e}");
            }
        }
        leaders().remove(&self.m.leader);
    }
}

impl PayloadRunner for SandboxRunner {
    async fn run(&self, req: &RunRequest) -> RunResult {
        let start = Instant::now();
        let ended =
            |verdict: Verdict, out: Captured, err: Captured, sandbox: SandboxReport| RunResult {
                outcome: verdict.to_outcome(),
                verdict,
                stdout_bytes: out.kept,
                stderr_bytes: err.kept,
                stdout_truncated: out.truncated,
                stderr_truncated: err.truncated,
                duration: start.elapsed(),
                sandbox,
            };
        let failed = |e: SandboxError| {
            ended(
                Verdict::SetupFailed(e),
                Captured::default(),
                Captured::default(),
                SandboxReport::default(),
            )
        };
        let (identity, uid_lock) = match self.claim_uid() {
            Ok(Some((id, lock))) => (Some(id), Some(lock)),
            Ok(None) => (None, None),
            Err(e) => return failed(e),
        };
        // Validate.
        let plan = match Plan::new(req, identity) {
            Ok(p) => p,
            Err(e) => return failed(e),
        };
        // Run: logs, the job dir, leftovers of the uid, spawn.
        let (out_file, err_file) = match (
            create_log(&req.stdout_path).await,
            create_log(&req.stderr_path).await,
        ) {
            (Ok(o), Ok(e)) => (o, e),
            (Err(e), _) | (_, Err(e)) => return failed(e),
        };
        if let Some(id) = plan.identity {
            if let Err(e) = give_dir(&req.dir, id) {
                return failed(e);
            }
            // A crashed earlier agent may have left processes of this uid behind.
            let mut stale = JobGuard::new(procs::Membership {
                leader: 0,
                uid: Some(id.uid.as_raw()),
                me: plan.parent,
            });
            stale.clean_up().await;
        }
        let cgroup = self.job_cgroup(req);
        let mut plan = plan;
        if let Some(procs) = cgroup.as_ref().and_then(cgroup::JobCgroup::procs_fd) {
            plan.use_cgroup(procs);
        }
        let (mut child, pid) = {
            let mut registered = leaders();
            let mut child = match command(req, &plan).spawn() {
                Ok(c) => c,
                Err(e) => {
                    let program = req.argv.first().cloned().unwrap_or_default();
                    return failed(SandboxError::Spawn {
                        program,
                        error: e.to_string(),
                    });
                }
            };
            let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) else {
                let _ = child.start_kill();
                return failed(SandboxError::NoPid);
            };
            registered.insert(pid);
            (child, pid)
        };
        // The child called setsid(): pid == pgid == sid.
        let mut job = JobGuard::new(procs::Membership {
            leader: pid,
            uid: plan.identity.map(|id| id.uid.as_raw()),
            me: plan.parent,
        });
        let stop = CancellationToken::new();
        let mut out_task = child
            .stdout
            .take()
            .map(|r| tokio::spawn(capture(r, out_file, req.output_cap, stop.clone())));
        let mut err_task = child
            .stderr
            .take()
            .map(|r| tokio::spawn(capture(r, err_file, req.output_cap, stop.clone())));

        let mut verdict = supervise(&mut child, &job, req, self.grace).await;
        if let Some(cg) = &cgroup {
            verdict = cgroup_verdict(verdict, cg.events());
            cg.kill_all();
        }
        job.clean_up().await;
        drop(job);
        // Removes the (now empty) cgroup.
        drop(cgroup);
        drop(uid_lock);
        let drain = async {
            (
                join_capture(out_task.as_mut()).await,
                join_capture(err_task.as_mut()).await,
            )
        };
        let (out, err) = match tokio::time::timeout(DRAIN_GRACE, drain).await {
            Ok(pair) => pair,
            Err(_) => {
                tracing::warn!(
                    pid,
                    "a process outside the job holds its output open; output capture stopped"
                );
                stop.cancel();
                (
                    join_capture(out_task.as_mut()).await,
                    join_capture(err_task.as_mut()).await,
                )
            }
        };
        ended(verdict, out, err, plan.report(req))
    }
}

/// Gives the job dir and everything in it (staged inputs) to the job's uid, mode 0700 on the
/// dir. Symlinks are changed themselves, never followed.
fn give_dir(dir: &Path, id: Identity) -> Result<(), SandboxError> {
    let chown_err = |path: &Path, e: std::io::Error| SandboxError::Chown {
        path: path.to_owned(),
        uid: id.uid.as_raw(),
        error: e.to_string(),
    };
    let mut stack = vec![dir.to_owned()];
    while let Some(path) = stack.pop() {
        std::os::unix::fs::lchown(&path, Some(id.uid.as_raw()), Some(id.gid.as_raw()))
            .map_err(|e| chown_err(&path, e))?;
        let meta = std::fs::symlink_metadata(&path).map_err(|e| chown_err(&path, e))?;
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path).map_err(|e| chown_err(&path, e))? {
                stack.push(entry.map_err(|e| chown_err(&path, e))?.path());
            }
        }
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| chown_err(dir, e))
}

fn command(req: &RunRequest, plan: &Plan) -> Command {
    let mut cmd = Command::new(req.argv.first().map(String::as_str).unwrap_or(""));
    cmd.args(req.argv.iter().skip(1))
        .current_dir(&req.dir)
        .env_clear()
        .env("PATH", PAYLOAD_PATH)
        .env("HOME", &req.dir)
        .env("TMPDIR", &req.dir)
        .envs(&req.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let rlimits = plan.rlimits.clone();
    let identity = plan.identity;
    let unshare = plan.unshare;
    let cgroup_procs = plan.cgroup_procs;
    let parent = plan.parent;
    // SAFETY: the closure runs in the forked child before exec. It only makes raw syscalls
    // that are async-signal-safe (setsid, setrlimit, write, unshare, setgroups, setgid,
    // setuid, prctl x2, getppid) on values moved in before the fork; it allocates nothing and
    // takes no lock.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid()?;
            for &(resource, soft, hard) in &rlimits {
                setrlimit(resource, soft, hard)?;
            }
            if let Some(fd) = cgroup_procs {
                // SAFETY: the descriptor belongs to the job's `JobCgroup`, which the parent
                // keeps open until after the spawn returns; the child's copy is open here.
                let procs = std::os::fd::BorrowedFd::borrow_raw(fd);
                // "0" moves the writing process; before the uid switch, which may forbid it.
                nix::unistd::write(procs, b"0")?;
            }
            // Before the uid switch: as root, creating a network namespace needs the
            // capabilities the switch drops.
            if let Some(flags) = unshare {
                nix::sched::unshare(flags)?;
            }
            if let Some(id) = identity {
                nix::unistd::setgroups(&[])?;
                nix::unistd::setgid(id.gid)?;
                nix::unistd::setuid(id.uid)?;
            }
            // After the uid switch, which clears it. If the agent dies (even by SIGKILL) the
            // leader dies with it; the rest of the job is killed by the uid's next run.
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            // No setuid binary or file capability can give the job more rights than it has.
            nix::sys::prctl::set_no_new_privs()?;
            if nix::unistd::getppid().as_raw() != parent {
                return Err(std::io::Error::from_raw_os_error(Errno::ESRCH as i32));
            }
            Ok(())
        });
    }
    cmd
}

async fn create_log(path: &Path) -> Result<tokio::fs::File, SandboxError> {
    tokio::fs::File::create(path)
        .await
        .map_err(|e| SandboxError::CreateLog {
            path: path.to_owned(),
            error: e.to_string(),
        })
}

/// Waits for the leader; past `wall_time` it terminates the group (SIGTERM, `grace`, SIGKILL).
async fn supervise(
    child: &mut Child,
    job: &JobGuard,
    req: &RunRequest,
    grace: Duration,
) -> Verdict {
    let wall_time = req.wall_time;
    let status = match tokio::time::timeout(wall_time, child.wait()).await {
        Ok(status) => return exit_verdict(status, req),
        Err(_) => {
            tracing::info!(
                pgid = job.m.leader,
                ?wall_time,
                "payload ran out of time; terminating"
            );
            job.signal_group(Signal::SIGTERM);
            match tokio::time::timeout(grace, child.wait()).await {
                Ok(status) => status,
                Err(_) => {
                    tracing::info!(pgid = job.m.leader, "payload ignored SIGTERM; killing");
                    job.signal_group(Signal::SIGKILL);
                    child.wait().await
                }
            }
        }
    };
    if let Err(e) = status {
        tracing::warn!("waiting for the timed-out payload failed: {e}");
    }
    Verdict::TimedOut(Clock::Wall)
}

/// The verdict of a leader that ended by itself. SIGXCPU and SIGXFSZ name a limit only when
/// that limit was set (RLIMIT_CPU, RLIMIT_FSIZE); otherwise someone sent them, and they are
/// plain signals.
fn exit_verdict(status: std::io::Result<ExitStatus>, req: &RunRequest) -> Verdict {
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => Verdict::Exited(code),
            (None, Some(sig)) if sig == Signal::SIGXCPU as i32 && req.cpu_time.is_some() => {
                Verdict::TimedOut(Clock::Cpu)
            }
            (None, Some(sig)) if sig == Signal::SIGXFSZ as i32 && req.disk.is_some() => {
                Verdict::LimitExceeded(Limit::Disk)
            }
            (None, Some(sig)) => Verdict::Killed(sig),
            (None, None) => Verdict::SetupFailed(SandboxError::OddStatus(s.to_string())),
        },
        Err(e) => Verdict::SetupFailed(SandboxError::Wait(e.to_string())),
    }
}

/// A failed payload whose cgroup saw the OOM killer, or refused forks, ran into that limit.
fn cgroup_verdict(verdict: Verdict, events: cgroup::Events) -> Verdict {
    let failed =
        matches!(verdict, Verdict::Exited(c) if c != 0) || matches!(verdict, Verdict::Killed(_));
    if failed && events.oom_kills > 0 {
        Verdict::LimitExceeded(Limit::Memory)
    } else if failed && events.pids_max > 0 {
        Verdict::LimitExceeded(Limit::Processes)
    } else {
        verdict
    }
}

async fn join_capture(task: Option<&mut tokio::task::JoinHandle<Captured>>) -> Captured {
    match task {
        Some(t) => t.await.unwrap_or_else(|e| {
            tracing::warn!("output capture task failed: {e}");
            Captured {
                kept: 0,
                truncated: true,
            }
        }),
        None => Captured::default(),
    }
}

/// Copies `reader` into `file` up to `cap` bytes, then reads and discards the rest until EOF
/// or `stop`. A write error stops writing (marked truncated) but not reading.
async fn capture(
    mut reader: impl AsyncRead + Unpin,
    mut file: tokio::fs::File,
    cap: u64,
    stop: CancellationToken,
) -> Captured {
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = Captured::default();
    let mut writing = true;
    loop {
        let n = tokio::select! {
            r = reader.read(&mut buf) => match r {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!("reading payload output failed: {e}");
                    got.truncated = true;
                    break;
                }
            },
            () = stop.cancelled() => {
                got.truncated = true;
                break;
            }
        };
        let room = usize::try_from(cap.saturating_sub(got.kept)).unwrap_or(usize::MAX);
        let take = n.min(room);
        if take < n {
            got.truncated = true;
        }
        if writing && take > 0 {
            match file.write_all(&buf[..take]).await {
                Ok(()) => got.kept += take as u64,
                Err(e) => {
                    tracing::warn!("writing payload output failed: {e}");
                    writing = false;
                    got.truncated = true;
                }
            }
        }
    }
    if let Err(e) = file.flush().await {
        tracing::warn!("writing payload output failed: {e}");
        got.truncated = true;
    }
    got
}

#[cfg(test)]
mod tests;
