//! What the agent's sandbox did for one job attempt: which protections were active and which
//! the job should have had but this host could not give. Agents send it in their done report;
//! the manager keeps it with the job and the agent, so admins see hosts that run with less.

use std::collections::BTreeSet;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// One protection of the payload sandbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protection {
    /// The job ran under a uid/gid of its own (needs an agent running as root).
    Uid,
    /// The job's processes-at-once limit (`RLIMIT_NPROC` on its own uid).
    Nproc,
    /// Its own session and process group, terminated as a whole.
    Session,
    /// Per-process rlimits: CPU time, address space, file size, open files, no core dumps.
    Rlimits,
    /// Orphaned job processes are reparented to the agent, found and killed.
    Subreaper,
    /// `no_new_privs`: setuid binaries and file capabilities give nothing.
    NoNewPrivs,
    /// The job's first process dies with the agent.
    ParentDeath,
    /// Only PATH, HOME, TMPDIR and the job's own environment variables.
    CleanEnv,
    /// A network namespace of its own (jobs with `network = false`).
    Netns,
    /// A cgroup v2 of its own: memory and processes limits for the whole job, and nothing of
    /// it survives the job.
    Cgroup,
}

impl Protection {
    /// Every protection, in wire order.
    pub const ALL: [Protection; 10] = [
        Protection::Uid,
        Protection::Nproc,
        Protection::Session,
        Protection::Rlimits,
        Protection::Subreaper,
        Protection::NoNewPrivs,
        Protection::ParentDeath,
        Protection::CleanEnv,
        Protection::Netns,
        Protection::Cgroup,
    ];

    /// The wire and API name.
    pub fn as_str(self) -> &'static str {
        match self {
            Protection::Uid => "uid",
            Protection::Nproc => "nproc",
            Protection::Session => "session",
            Protection::Rlimits => "rlimits",
            Protection::Subreaper => "subreaper",
            Protection::NoNewPrivs => "no-new-privs",
            Protection::ParentDeath => "parent-death",
            Protection::CleanEnv => "clean-env",
            Protection::Netns => "netns",
            Protection::Cgroup => "cgroup",
        }
    }
}

impl FromStr for Protection {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        Protection::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or(())
    }
}

impl std::fmt::Display for Protection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The sandbox of one attempt. Both sets are empty when the payload never started (staging
/// failed); a protection is never in both.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxReport {
    /// Applied to the job.
    pub active: BTreeSet<Protection>,
    /// Wanted for this job but not available on the host (e.g. `uid` when the agent is not
    /// root, `netns` for a `network = false` job where the kernel refuses namespaces).
    pub missing: BTreeSet<Protection>,
}

impl SandboxReport {
    /// Whether nothing was reported (the payload never started).
    pub fn is_empty(&self) -> bool {
        self.active.is_empty() && self.missing.is_empty()
    }

    /// One line for people: `full (…)` or `missing uid, nproc`.
    pub fn summary(&self) -> String {
        if self.is_empty() {
            return "not started".into();
        }
        if self.missing.is_empty() {
            return format!("full ({})", join(&self.active));
        }
        format!("missing {}", join(&self.missing))
    }
}

fn join(set: &BTreeSet<Protection>) -> String {
    set.iter()
        .map(|p| p.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_match_serde() {
        for p in Protection::ALL {
            assert_eq!(p.as_str().parse::<Protection>(), Ok(p));
            assert_eq!(serde_json::to_string(&p).unwrap(), format!("\"{p}\""));
        }
        assert!("root".parse::<Protection>().is_err());
    }

    #[test]
    fn summary_names_what_is_missing() {
        let mut r = SandboxReport::default();
        assert_eq!(r.summary(), "not started");
        r.active.insert(Protection::Session);
        r.active.insert(Protection::Uid);
        assert_eq!(r.summary(), "full (uid, session)");
        r.missing.insert(Protection::Netns);
        assert_eq!(r.summary(), "missing netns");
    }
}
