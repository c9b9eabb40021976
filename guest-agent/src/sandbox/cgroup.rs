//! Per-job cgroup v2 limits, used where the host gives the agent a writable cgroup v2 hierarchy
//! with the `memory` and `pids` controllers (the copilot VM does; hybrid v1/v2 hosts do not).
//!
//! Layout: the agent's own cgroup `A` becomes the parent of `A/copilot-jobs/job-<pid>-<n>`, one
//! leaf per job attempt. When `A` is not the root cgroup the agent first moves itself into the
//! leaf `A/copilot-agent` (cgroup v2 lets only leaves hold processes once controllers are
//! enabled below them). A job's cgroup gets `memory.max` (and `memory.swap.max` 0), `pids.max`
//! and `cpu.max` from its limits; the payload joins it in the forked child before exec, by
//! writing `0` to a `cgroup.procs` descriptor the agent opened beforehand. Afterwards
//! `memory.events` and `pids.events` tell whether the job ran into its memory or processes
//! limit, `cgroup.kill` ends everything left in it, and the cgroup is removed.
//!
//! Detection runs once per agent process; any failure leaves the agent on rlimits alone, with
//! the reason in `--check-sandbox` and `cgroup` missing from each job's sandbox report.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// Controllers a job cgroup must have; `cpu` is used when present.
const REQUIRED: [&str; 2] = ["memory", "pids"];
/// Period of `cpu.max`, in microseconds.
const CPU_PERIOD_US: u64 = 100_000;
/// Attempts at removing a job cgroup whose last processes are still exiting.
const RMDIR_ROUNDS: u32 = 100;
const RMDIR_PAUSE: Duration = Duration::from_millis(10);

/// The parent of this agent's job cgroups.
#[derive(Debug)]
pub struct Hierarchy {
    /// `…/copilot-jobs`, with the controllers enabled for its children.
    base: PathBuf,
    /// Whether `cpu` is enabled too.
    cpu: bool,
}

/// Limits of one job's cgroup; `None` leaves the kernel's default (no limit).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupLimits {
    pub memory: Option<u64>,
    pub processes: Option<u32>,
    /// CPUs' worth of time per period (`cpu.max`), e.g. 1 = one core.
    pub cpus: Option<u32>,
}

/// What the kernel counted in a job's cgroup.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Events {
    /// Processes the OOM killer killed at `memory.max`.
    pub oom_kills: u64,
    /// Forks refused at `pids.max`.
    pub pids_max: u64,
}

/// The agent's cgroup v2 hierarchy, detected (and set up) once; `Err` says why there is none.
pub fn hierarchy() -> Result<&'static Hierarchy, &'static str> {
    static H: OnceLock<Result<Hierarchy, String>> = OnceLock::new();
    match H.get_or_init(|| {
        let found = detect();
        if let Err(why) = &found {
            tracing::info!("no per-job cgroups: {why}");
        }
        found
    }) {
        Ok(h) => Ok(h),
        Err(why) => Err(why.as_str()),
    }
}

fn detect() -> Result<Hierarchy, String> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
    let mount = cgroup2_mount(&mountinfo).ok_or("no cgroup v2 file system is mounted")?;
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
    let rel = unified_path(&own).ok_or("this process is in no cgroup v2 group")?;
    let own = mount.join(rel.trim_start_matches('/'));
    let available = read(&own.join("cgroup.controllers"))?;
    let available: Vec<&str> = available.split_ascii_whitespace().collect();
    if let Some(missing) = REQUIRED.iter().find(|c| !available.contains(c)) {
        return Err(format!(
            "cgroup v2 at {} lacks the {missing} controller (a hybrid v1/v2 host keeps it in v1)",
            own.display()
        ));
    }
    let cpu = available.contains(&"cpu");
    if own != mount {
        // Only leaves may hold processes below enabled controllers: step aside into one.
        let leaf = own.join("copilot-agent");
        mkdir(&leaf)?;
        write(&leaf.join("cgroup.procs"), &std::process::id().to_string())?;
    }
    let wanted = controllers(cpu);
    write(&own.join("cgroup.subtree_control"), &wanted)?;
    let base = own.join("copilot-jobs");
    mkdir(&base)?;
    write(&base.join("cgroup.subtree_control"), &wanted)?;
    let h = Hierarchy { base, cpu };
    h.remove_stale();
    Ok(h)
}

/// `+memory +pids`, and `+cpu` when there is one.
fn controllers(cpu: bool) -> String {
    let mut s = REQUIRED.map(|c| format!("+{c}")).join(" ");
    if cpu {
        s.push_str(" +cpu");
    }
    s
}

/// The mount point of the cgroup2 file system in `/proc/self/mountinfo` text.
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // Fields: id parent major:minor root mount-point options [optional…] - fstype source …
        let (left, right) = line.split_once(" - ")?;
        (right.split(' ').next()? == "cgroup2")
            .then(|| left.split(' ').nth(4).map(|m| PathBuf::from(unescape(m))))
            .flatten()
    })
}

/// mountinfo writes space, tab, newline and backslash as `\ooo` octal escapes.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i + 1..i + 4).and_then(|d| {
            d.iter()
                .all(|c| (b'0'..=b'7').contains(c))
                .then(|| d.iter().fold(0u32, |n, c| n * 8 + u32::from(c - b'0')))
        });
        match (b[i], octal) {
            (b'\\', Some(n)) if n <= 0xff => {
                out.push(n as u8);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The path in the unified hierarchy from `/proc/self/cgroup` text (the `0::` line).
fn unified_path(text: &str) -> Option<&str> {
    text.lines().find_map(|l| l.strip_prefix("0::"))
}

/// A counter from a flat-keyed file such as `memory.events` (`oom_kill 2`).
fn counter(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == key).then(|| v.trim().parse().ok()).flatten()
        })
        .unwrap_or(0)
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    // One write(2) per value: cgroup files take a whole value per write.
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|e| format!("writing {value:?} to {}: {e}", path.display()))
}

fn mkdir(path: &Path) -> Result<(), String> {
    match std::fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(format!("creating {}: {e}", path.display())),
    }
}

/// Ends every process in the cgroup at `dir` and removes it; false if it could not.
fn destroy(dir: &Path) -> bool {
    for round in 0..RMDIR_ROUNDS {
        // cgroup.kill (Linux 5.14+) SIGKILLs every member, also ones that fork meanwhile.
        if write(&dir.join("cgroup.kill"), "1").is_err() {
            kill_members(dir);
        }
        match std::fs::remove_dir(dir) {
            Ok(()) => return true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return true,
            Err(e) if round + 1 == RMDIR_ROUNDS => {
                tracing::warn!(dir = %dir.display(), "cannot remove job cgroup: {e}");
            }
            Err(_) => std::thread::sleep(RMDIR_PAUSE),
        }
    }
    false
}

/// SIGKILL to each process listed in the cgroup (kernels without `cgroup.kill`).
fn kill_members(dir: &Path) {
    let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) else {
        return;
    };
    for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

impl Hierarchy {
    /// The parent dir of the job cgroups.
    pub fn base(&self) -> &Path {
        &self.base
    }

    /// Whether jobs get `cpu.max`.
    pub fn has_cpu(&self) -> bool {
        self.cpu
    }

    /// Removes job cgroups whose agent (the pid in their name) is gone: a crashed agent's.
    fn remove_stale(&self) {
        let Ok(entries) = std::fs::read_dir(&self.base) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let owner = name
                .strip_prefix("job-")
                .and_then(|rest| rest.split('-').next())
                .and_then(|pid| pid.parse::<u32>().ok());
            if let Some(pid) = owner {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    destroy(&entry.path());
                }
            }
        }
    }

    /// Creates the cgroup of one job attempt with its limits.
    pub fn create(&self, limits: CgroupLimits) -> Result<JobCgroup, String> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = self.base.join(format!("job-{}-{n}", std::process::id()));
        std::fs::create_dir(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        // From here on, dropping `cg` (also on an error below) removes the cgroup again.
        let mut cg = JobCgroup {
            procs: None,
            dir: dir.clone(),
        };
        if let Some(m) = limits.memory {
            write(&dir.join("memory.max"), &m.to_string())?;
            // Without swap accounting the file does not exist: nothing to cap.
            let swap = dir.join("memory.swap.max");
            if swap.exists() {
                write(&swap, "0")?;
            }
        }
        if let Some(p) = limits.processes {
            write(&dir.join("pids.max"), &p.to_string())?;
        }
        if let (Some(cpus), true) = (limits.cpus, self.cpu) {
            let quota = u64::from(cpus) * CPU_PERIOD_US;
            write(&dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
        }
        let procs = OpenOptions::new()
            .write(true)
            .open(dir.join("cgroup.procs"))
            .map_err(|e| format!("opening {}/cgroup.procs: {e}", dir.display()))?;
        cg.procs = Some(procs);
        Ok(cg)
    }
}

/// One job attempt's cgroup; removed (with anything still in it) when dropped.
#[derive(Debug)]
pub struct JobCgroup {
    dir: PathBuf,
    /// Its `cgroup.procs`, open for the payload to join before exec.
    procs: Option<File>,
}

impl JobCgroup {
    /// The descriptor the forked child writes `0` to, joining the cgroup.
    pub fn procs_fd(&self) -> Option<RawFd> {
        self.procs.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// What the kernel counted so far.
    pub fn events(&self) -> Events {
        let get = |file: &str, key: &str| {
            std::fs::read_to_string(self.dir.join(file)).map_or(0, |t| counter(&t, key))
        };
        Events {
            oom_kills: get("memory.events", "oom_kill"),
            pids_max: get("pids.events", "max"),
        }
    }

    /// SIGKILL to every process in the cgroup.
    pub fn kill_all(&self) {
        if write(&self.dir.join("cgroup.kill"), "1").is_err() {
            kill_members(&self.dir);
        }
    }
}

impl Drop for JobCgroup {
    fn drop(&mut self) {
        self.procs = None;
        destroy(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_among_v1_ones() {
        let hybrid = "\
35 25 0:30 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs ro,mode=755
36 35 0:31 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw
38 35 0:33 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
";
        assert_eq!(
            cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let v1_only = "38 35 0:33 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        assert_eq!(cgroup2_mount(v1_only), None);
        let escaped = "36 35 0:31 / /mnt/cg\\040two rw - cgroup2 none rw\n";
        assert_eq!(cgroup2_mount(escaped), Some(PathBuf::from("/mnt/cg two")));
        assert_eq!(cgroup2_mount("garbage\n\n - \n"), None);
    }

    #[test]
    fn reads_the_unified_path_and_counters() {
        let text = "4:memory:/x\n0::/user.slice/session-1.scope\n";
        assert_eq!(unified_path(text), Some("/user.slice/session-1.scope"));
        assert_eq!(unified_path("4:memory:/x\n"), None);
        let events = "low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\n";
        assert_eq!(counter(events, "oom_kill"), 2);
        assert_eq!(counter(events, "max"), 12);
        assert_eq!(counter(events, "missing"), 0);
        assert_eq!(counter("oom_kill x\n", "oom_kill"), 0);
    }

    #[test]
    fn controllers_to_enable() {
        assert_eq!(controllers(false), "+memory +pids");
        assert_eq!(controllers(true), "+memory +pids +cpu");
    }

    #[test]
    fn unescape_leaves_plain_text_and_bad_escapes_alone() {
        assert_eq!(unescape("/a\\011b"), "/a\tb");
        assert_eq!(unescape("/a\\9zz\\"), "/a\\9zz\\");
        assert_eq!(unescape("/plain"), "/plain");
    }
}
