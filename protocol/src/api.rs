//! The manager's JSON API, shared by the manager (server side) and the `copilot` CLI.
//!
//! | method | path | body → answer |
//! |---|---|---|
//! | PUT | `/inputs/{sha256}` | file bytes → [`Stored`] (API token) |
//! | GET | `/inputs/{sha256}` | → file bytes (job token or API token) |
//! | PUT | `/outputs/{job}/{attempt}` | tar.gz → [`Stored`] (that attempt's upload token) |
//! | POST | `/api/jobs` | [`SubmitRequest`] → [`SubmitResponse`] |
//! | GET | `/api/jobs` | → [`JobList`] |
//! | GET | `/api/jobs/{id}` | → [`JobView`] |
//! | GET | `/api/jobs/{id}/output` | → the stored tar.gz |
//! | GET | `/api/agents` | → [`AgentList`] |
//! | GET | `/api/volunteers` | → [`VolunteerList`] |
//!
//! The aggregated views for people (summary, job events and files, batches, contributions) are
//! in [`crate::summary`]; docs/API.md describes every route. Errors come as [`ApiError`] with a
//! fitting HTTP status.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::job::JobSpec;
use crate::sandbox::SandboxReport;
use crate::state::JobState;
use crate::{JobId, Sha256};

/// Header carrying the sha256 the uploader computed; the server refuses a body that differs.
pub const CONTENT_SHA256_HEADER: &str = "x-content-sha256";

/// Path of the payload's stdout in a job's output archive.
pub const STDOUT_ENTRY: &str = "_copilot/stdout.txt";
/// Path of the payload's stderr in a job's output archive.
pub const STDERR_ENTRY: &str = "_copilot/stderr.txt";

/// A request to queue jobs.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    pub jobs: Vec<JobSpec>,
}

/// The ids of the queued jobs, in request order.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SubmitResponse {
    pub ids: Vec<JobId>,
}

/// A file the storage service stored, with the digest it computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored {
    pub sha256: Sha256,
    pub size: u64,
}

/// A file inside a job's output archive.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileView {
    pub path: String,
    pub size: u64,
    pub sha256: Sha256,
}

/// How the last attempt ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutcomeView {
    /// `exited`, `killed`, `timed-out`, `limit-exceeded`, `stage-in-failed`, `setup-failed`,
    /// `stage-out-failed`.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// For `limit-exceeded`: `cpu`, `memory`, `disk`, `processes` or `output`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<String>,
    /// A one-line description for people.
    pub text: String,
}

impl OutcomeView {
    /// A few words for a table cell: `exit 3`, `signal 9`, `cpu limit`, `timed-out`, …
    pub fn short(&self) -> String {
        match (self.kind.as_str(), self.exit_code, self.signal) {
            ("exited", Some(code), _) => format!("exit {code}"),
            ("killed", _, Some(sig)) => format!("signal {sig}"),
            ("limit-exceeded", _, _) => match &self.limit {
                Some(limit) => format!("{limit} limit"),
                None => "limit exceeded".into(),
            },
            (kind, _, _) => kind.to_owned(),
        }
    }
}

/// One job as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobView {
    pub id: JobId,
    pub name: String,
    pub state: JobState,
    /// Attempts started so far.
    pub attempt: u32,
    pub max_retries: u32,
    /// The agent holding (or that last held) the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// Unix time in milliseconds.
    pub created_ms: u64,
    pub updated_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<OutcomeView>,
    /// The stored output archive, digest computed by the storage service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive: Option<Stored>,
    /// Where the archive is kept when not in the manager's own store (a `chirp://` URL); the
    /// manager serves it either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive_url: Option<String>,
    #[serde(default)]
    pub files: Vec<FileView>,
    /// Milliseconds spent staging in, running and staging out (last attempt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timings_ms: Option<[u64; 3]>,
    /// The protections the agent's sandbox applied to the last attempt, and those it lacked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<SandboxReport>,
    /// Why the job failed or was requeued, if the manager knows more than the outcome says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// For a replicated job (`spec.replication`): its group and whether its result counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<ReplicaView>,
    pub spec: JobSpec,
}

/// One replica of a replicated job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaView {
    /// The id of the group's first replica (the group's id).
    pub group: JobId,
    pub validation: Validation,
    /// What the job's validator command said of this replica and each other one it was
    /// compared with (only in the view of one job, `GET /api/jobs/{id}`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub verdicts: Vec<VerdictView>,
}

/// A validator's verdict on a replica and another of its group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerdictView {
    /// The other replica.
    pub other: JobId,
    /// Whether the validator said they agree.
    pub same: bool,
    /// The end of what the validator printed.
    pub detail: String,
}

/// Where a replica's result stands against its group's quorum.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Validation {
    /// Fewer than `quorum` results agree yet.
    Pending,
    /// Its outputs are those a quorum of the group returned: the group's result.
    Valid,
    /// Done, but its outputs differ from those of the quorum.
    Outvoted,
    /// Every replica ended and fewer than `quorum` agree: the group has no result.
    NoQuorum,
}

impl Validation {
    /// The name used in the API and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Validation::Pending => "pending",
            Validation::Valid => "valid",
            Validation::Outvoted => "outvoted",
            Validation::NoQuorum => "no-quorum",
        }
    }

    /// From [`Validation::as_str`].
    pub fn parse(s: &str) -> Option<Validation> {
        [
            Validation::Pending,
            Validation::Valid,
            Validation::Outvoted,
            Validation::NoQuorum,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
    }
}

impl std::fmt::Display for Validation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Jobs and the count of jobs in each state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobList {
    pub jobs: Vec<JobView>,
    pub counts: BTreeMap<JobState, u64>,
}

/// One agent as the manager sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentView {
    pub name: String,
    /// The XMPP address it is online with, if online.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jid: Option<String>,
    pub online: bool,
    pub version: String,
    /// Jobs it holds leases on.
    pub running: Vec<JobId>,
    pub jobs_done: u64,
    /// Unix time in milliseconds of the last stanza from it.
    pub last_seen_ms: u64,
    /// Its sandbox as of its last report of a job it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<SandboxReport>,
    /// The BOINC volunteer it computes for, when it runs under BOINC and has said so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volunteer: Option<BoincVolunteer>,
}

/// Whom an agent running under BOINC computes for: ids on the BOINC project.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BoincVolunteer {
    pub user_id: u64,
    pub host_id: u64,
    /// 0: no team.
    #[serde(default)]
    pub team_id: u64,
}

/// All agents the manager has heard from.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentList {
    pub agents: Vec<AgentView>,
}

/// Credit of one BOINC volunteer's host: the jobs its agents completed and their CPU time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VolunteerCredit {
    /// BOINC user id on the project.
    pub user_id: u64,
    /// BOINC host id.
    pub host_id: u64,
    /// BOINC team id (0: none), as last reported.
    pub team_id: u64,
    /// The host token last reported (derived from the account key and the host id), which the
    /// project can check against its own records before granting credit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_token: Option<String>,
    /// Jobs done (outputs stored and verified).
    pub jobs_done: u64,
    /// CPU seconds of those jobs' payloads.
    pub cpu_seconds: f64,
    /// Unix time in milliseconds of the last credited job.
    pub updated_ms: u64,
}

/// Credit per BOINC user and host, by user then host.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VolunteerList {
    pub volunteers: Vec<VolunteerCredit>,
}

/// An API error body.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}
