//! What the sandbox can do on this host, for `copilot-agent --check-sandbox`.

use std::path::Path;

/// One protection and whether this agent uses it here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Protection {
    pub name: &'static str,
    /// Used for every job on this host.
    pub active: bool,
    pub detail: String,
}

impl std::fmt::Display for Protection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mark = if self.active { "active " } else { "MISSING" };
        write!(f, "{mark}  {:<25} {}", self.name, self.detail)
    }
}

fn p(name: &'static str, active: bool, detail: impl Into<String>) -> Protection {
    Protection {
        name,
        active,
        detail: detail.into(),
    }
}

/// Probes this host. `base_uid` is the first job uid; `config` the agent's config file, if
/// given. The user, mount and pid namespaces are reported as available or not, but this agent
/// does not use them yet, so they are never `active`.
pub fn check(base_uid: u32, config: Option<&Path>) -> Vec<Protection> {
    let root = super::is_root();
    let mut out = vec![
        p(
            "own session and group",
            true,
            "setsid(); wall time ends with SIGTERM, grace, SIGKILL to the group",
        ),
        p(
            "scrubbed environment",
            true,
            "PATH, HOME, TMPDIR and the job's own variables only",
        ),
        if root {
            p(
                "per-job uid",
                true,
                format!("jobs run as uid/gid {base_uid} and up, no supplementary groups"),
            )
        } else {
            p(
                "per-job uid",
                false,
                "the agent is not root: jobs run as the agent's own uid and can read its files",
            )
        },
        p(
            "rlimits",
            true,
            "cpu_time (RLIMIT_CPU), memory (RLIMIT_AS), disk per file (RLIMIT_FSIZE), 1024 open files, no core dumps",
        ),
        if root {
            p("processes limit", true, "RLIMIT_NPROC on the job's own uid")
        } else {
            p(
                "processes limit",
                false,
                "RLIMIT_NPROC needs a per-job uid (it counts all processes of a uid)",
            )
        },
        match super::become_subreaper() {
            Ok(()) => p(
                "child subreaper",
                true,
                "orphaned job processes (daemons) are found, killed and reaped after the job",
            ),
            Err(e) => p(
                "child subreaper",
                false,
                format!("PR_SET_CHILD_SUBREAPER failed ({e}): daemons are found only by uid, group or session"),
            ),
        },
        p(
            "no_new_privs",
            true,
            "setuid binaries and file capabilities give jobs no extra rights",
        ),
        p(
            "parent-death signal",
            true,
            "the job's first process gets SIGKILL if the agent dies",
        ),
    ];
    out.push(match config {
        None => p("config file root-only", false, "no config file given"),
        Some(path) => config_mode(path, root),
    });
    out.push(cgroup());
    out.push(network_namespace());
    out.push(other_namespaces());
    out
}

fn config_mode(path: &Path, root: bool) -> Protection {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(path) {
        Err(e) => p(
            "config file root-only",
            false,
            format!("{}: {e}", path.display()),
        ),
        Ok(m) => {
            let mode = m.mode() & 0o777;
            let ok = root && m.uid() == 0 && mode & 0o077 == 0;
            let how = if root {
                "the agent makes it 0600 root:root at startup"
            } else {
                "jobs share the agent's uid, so they can read it anyway"
            };
            p(
                "config file root-only",
                ok,
                format!(
                    "{}: mode {mode:o}, owner {}; {how}",
                    path.display(),
                    m.uid()
                ),
            )
        }
    }
}

fn cgroup() -> Protection {
    match super::cgroup::hierarchy() {
        Ok(h) => p(
            "cgroup v2 limits",
            true,
            format!(
                "each job in a cgroup of its own under {}: memory.max, pids.max{}, killed whole",
                h.base().display(),
                if h.has_cpu() { ", cpu.max" } else { "" }
            ),
        ),
        Err(why) => p(
            "cgroup v2 limits",
            false,
            format!("{why}: memory and processes are limited per process only"),
        ),
    }
}

fn network_namespace() -> Protection {
    match super::netns::isolation() {
        Ok(flags) => p(
            "network namespace",
            true,
            if flags.contains(nix::sched::CloneFlags::CLONE_NEWUSER) {
                "jobs with network = false get a network namespace of their own (inside a user namespace)"
            } else {
                "jobs with network = false get a network namespace of their own"
            },
        ),
        Err(why) => p(
            "network namespace",
            false,
            format!("{why}: jobs with network = false keep the network"),
        ),
    }
}

fn other_namespaces() -> Protection {
    let kinds: Vec<&str> = ["user", "mnt", "pid"]
        .into_iter()
        .filter(|k| Path::new(&format!("/proc/self/ns/{k}")).exists())
        .collect();
    let max_user = std::fs::read_to_string("/proc/sys/user/max_user_namespaces")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".into());
    p(
        "user/mount/pid namespaces",
        false,
        format!(
            "kernel has {} (max_user_namespaces {max_user}); not used by this agent yet",
            if kinds.is_empty() {
                "none".to_owned()
            } else {
                kinds.join(", ")
            }
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_is_honest_about_what_is_not_used() {
        let report = check(61000, None);
        let get = |name: &str| report.iter().find(|p| p.name == name).unwrap();
        assert_eq!(get("per-job uid").active, super::super::is_root());
        assert_eq!(
            get("cgroup v2 limits").active,
            super::super::cgroup::hierarchy().is_ok()
        );
        assert!(!get("user/mount/pid namespaces").active);
        assert_eq!(
            get("network namespace").active,
            super::super::netns::isolation().is_ok()
        );
        assert!(!get("config file root-only").active);
        assert!(get("rlimits").to_string().starts_with("active"));
    }
}
