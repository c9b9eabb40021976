//! The manager's aggregated views for people, shared by its web dashboard and the `copilot`
//! CLI: what the work looks like ([`Summary`]), one job's history ([`JobEvents`]), a batch and
//! the plots of its replicas' histograms ([`BatchView`]), and who contributed ([`Contributions`]).
//!
//! | method | path | answer |
//! |---|---|---|
//! | GET | `/api/summary` | [`Summary`] |
//! | GET | `/api/jobs/{id}/events` | [`JobEvents`] |
//! | GET | `/api/jobs/{id}/files/{path}` | one file of the job's output archive |
//! | GET | `/api/batches/{name}` | [`BatchView`] |
//! | GET | `/api/contributions` | [`Contributions`] |
//!
//! A batch is the jobs of one job file with `count`: they are named `name#0`, `name#1`, … and
//! the batch is called `name`. A job without `#` in its name is a batch of one.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::api::{BoincVolunteer, JobView};
use crate::histogram::Bin;
use crate::state::JobState;
use crate::JobId;

/// The batch a job name belongs to: the part before the last `#` if a number follows it.
pub fn batch_of(job_name: &str) -> &str {
    match job_name.rsplit_once('#') {
        Some((batch, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => batch,
        _ => job_name,
    }
}

/// The state of the work: counts, recent activity, failures and batches.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// When this was computed, unix milliseconds.
    pub now_ms: u64,
    /// Jobs in each state.
    pub counts: BTreeMap<JobState, u64>,
    pub agents_online: u64,
    pub agents_known: u64,
    pub activity: Activity,
    /// Jobs that failed for good, by cause (`exit 3`, `signal 9`, `cpu limit`, `stage-in
    /// failed`, `lost`, …), most frequent first.
    pub failures: Vec<CauseCount>,
    /// Attempts that were lost and retried (or failed the job for good), by cause (`lease
    /// expired`, `agent went offline`, `stage-in failed`, …), most frequent first.
    pub lost_attempts: Vec<CauseCount>,
    /// Every batch, newest first.
    pub batches: Vec<BatchSummary>,
}

/// What happened in equal time buckets up to now (the last bucket ends at `now_ms`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activity {
    /// Start of the first bucket, unix milliseconds.
    pub start_ms: u64,
    pub bucket_ms: u64,
    /// Attempts started (jobs assigned to agents) in each bucket: the dispatch rate.
    pub assigned: Vec<u64>,
    /// Jobs done in each bucket: the throughput.
    pub done: Vec<u64>,
    /// Jobs failed for good in each bucket.
    pub failed: Vec<u64>,
    /// Jobs queued at the end of each bucket: the queue depth.
    pub queued: Vec<u64>,
}

/// How many times something happened for one cause.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CauseCount {
    pub cause: String,
    pub count: u64,
}

/// One batch at a glance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchSummary {
    pub name: String,
    pub jobs: u64,
    pub counts: BTreeMap<JobState, u64>,
    pub first_id: JobId,
    pub last_id: JobId,
    /// Unix milliseconds of the latest change to any of its jobs.
    pub updated_ms: u64,
}

/// One state change of a job, as the manager's queue logged it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobEvent {
    pub attempt: u32,
    /// `new` for the submission.
    pub from: String,
    pub to: JobState,
    pub at_ms: u64,
    /// Why: `submitted`, `assigned to agent-1`, `progress`, `upload`, an outcome, …
    pub why: String,
}

/// A job's state changes, oldest first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobEvents {
    pub job: JobId,
    pub events: Vec<JobEvent>,
}

/// Milliseconds a job's attempt spent in each phase, as the manager saw the state changes
/// (`None` for a phase it did not see both ends of).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseTimes {
    /// From queued (submitted or requeued) to assigned.
    pub queued_ms: Option<u64>,
    /// From assigned to running: the agent staged the inputs.
    pub staging_ms: Option<u64>,
    /// From running to uploading: the payload ran and its outputs were packed.
    pub running_ms: Option<u64>,
    /// From uploading to done or failed: the upload and the report.
    pub uploading_ms: Option<u64>,
}

impl JobEvents {
    /// The phases of `attempt` (its queued time is the wait before it was assigned).
    pub fn phases(&self, attempt: u32) -> PhaseTimes {
        let mut t = PhaseTimes::default();
        let mut entered: BTreeMap<&str, u64> = BTreeMap::new();
        for e in &self.events {
            // The queued time of attempt n ends with the assignment that starts attempt n; it
            // began with the event (of attempt n-1, or the submission) that queued the job.
            if e.to == JobState::Queued {
                entered.insert("queued", e.at_ms);
                continue;
            }
            if e.attempt != attempt {
                continue;
            }
            let span = |from: &str, entered: &BTreeMap<&str, u64>| {
                entered.get(from).map(|s| e.at_ms.saturating_sub(*s))
            };
            match e.to {
                JobState::Assigned => {
                    t.queued_ms = span("queued", &entered);
                    entered.insert("assigned", e.at_ms);
                }
                JobState::Running => {
                    t.staging_ms = span("assigned", &entered);
                    entered.insert("running", e.at_ms);
                }
                JobState::Uploading => {
                    // An upload may start straight from assigned (the running message lost).
                    match e.from.as_str() {
                        "running" => t.running_ms = span("running", &entered),
                        _ => t.staging_ms = t.staging_ms.or(span("assigned", &entered)),
                    }
                    entered.insert("uploading", e.at_ms);
                }
                JobState::Done | JobState::Failed | JobState::Lost => {
                    if e.from == "uploading" {
                        t.uploading_ms = span("uploading", &entered);
                    } else if e.from == "running" {
                        t.running_ms = span("running", &entered);
                    }
                }
                JobState::Queued => {}
            }
        }
        t
    }
}

/// Jobs and payload run time per host (agent) and per BOINC volunteer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Contributions {
    /// Every agent that reported a job, most jobs done first.
    pub hosts: Vec<HostContribution>,
    /// BOINC volunteers of agents that run under BOINC, most jobs done first; empty when no
    /// agent has said whom it computes for.
    pub volunteers: Vec<VolunteerContribution>,
}

/// What one agent (host) contributed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HostContribution {
    pub agent: String,
    pub jobs_done: u64,
    /// Jobs whose payload failed on it (exit status, signal, limit, time-out).
    pub jobs_failed: u64,
    /// Attempts it reported as a host failure (stage-in, setup, stage-out), which were retried.
    pub host_failures: u64,
    /// Wall-clock seconds the payloads of its done jobs ran, as it measured them.
    pub run_seconds: f64,
    /// The BOINC volunteer it computes for, when it runs under BOINC and the manager knows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volunteer: Option<BoincVolunteer>,
}

/// What one BOINC user's hosts contributed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VolunteerContribution {
    pub user_id: u64,
    /// Hosts (agents) of this user that reported jobs.
    pub hosts: u64,
    pub jobs_done: u64,
    pub run_seconds: f64,
    /// CPU seconds of the payloads of its credited jobs (the manager's credit table).
    #[serde(default)]
    pub cpu_seconds: f64,
}

/// A batch: its jobs and a plot for every histogram its replicas returned.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BatchView {
    pub name: String,
    pub counts: BTreeMap<JobState, u64>,
    /// The jobs, by id.
    pub jobs: Vec<JobView>,
    pub plots: Vec<BatchPlot>,
}

/// One histogram across a batch's replicas: every done job's copy of it, and their sum.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BatchPlot {
    /// The output file it comes from.
    pub path: String,
    /// The histogram's name within the file (the YODA path), empty for a CSV file.
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub title: String,
    pub replicas: Vec<Replica>,
    /// The bin-by-bin sum of the replicas that share the first one's binning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sum: Option<Vec<Bin>>,
    /// Replicas left out of the sum or of the plot, and why.
    #[serde(default)]
    pub problems: Vec<String>,
}

/// One job's copy of a histogram.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Replica {
    pub job: JobId,
    /// The job's name (`mc-pi#3`).
    pub label: String,
    pub bins: Vec<Bin>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(attempt: u32, from: &str, to: JobState, at_ms: u64) -> JobEvent {
        JobEvent {
            attempt,
            from: from.into(),
            to,
            at_ms,
            why: String::new(),
        }
    }

    #[test]
    fn batch_names_drop_the_instance_number_only() {
        assert_eq!(batch_of("mc-pi#3"), "mc-pi");
        assert_eq!(batch_of("a#b#12"), "a#b");
        assert_eq!(batch_of("hello"), "hello");
        assert_eq!(batch_of("odd#"), "odd#");
        assert_eq!(batch_of("tag#x1"), "tag#x1");
    }

    #[test]
    fn phases_come_from_the_attempts_events() {
        use JobState::*;
        let e = JobEvents {
            job: 1,
            events: vec![
                ev(0, "new", Queued, 1_000),
                ev(1, "queued", Assigned, 1_500),
                ev(1, "assigned", Lost, 9_000),
                ev(1, "lost", Queued, 9_000),
                ev(2, "queued", Assigned, 9_100),
                ev(2, "assigned", Running, 9_300),
                ev(2, "running", Uploading, 12_300),
                ev(2, "uploading", Done, 12_400),
            ],
        };
        let p = e.phases(2);
        assert_eq!(
            p,
            PhaseTimes {
                queued_ms: Some(100),
                staging_ms: Some(200),
                running_ms: Some(3_000),
                uploading_ms: Some(100),
            }
        );
        let first = e.phases(1);
        assert_eq!((first.queued_ms, first.staging_ms), (Some(500), None));
        // Straight from assigned to uploading: staging is known, running is not.
        let skip = JobEvents {
            job: 2,
            events: vec![
                ev(0, "new", Queued, 0),
                ev(1, "queued", Assigned, 10),
                ev(1, "assigned", Uploading, 50),
                ev(1, "uploading", Failed, 70),
            ],
        };
        let p = skip.phases(1);
        assert_eq!(
            (p.staging_ms, p.running_ms, p.uploading_ms),
            (Some(40), None, Some(20))
        );
    }
}
