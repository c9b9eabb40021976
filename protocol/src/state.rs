//! The job life cycle as an enum with checked transitions. Every state change in the manager goes
//! through [`JobState::transition`], so an impossible change is an error, not a silent overwrite.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where a job is in its life.
///
/// ```text
/// queued → assigned → running → uploading → done | failed
///            │           │          │
///            └───────────┴──────────┴──→ lost → queued (next attempt) | failed (retries used up)
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Waiting for an agent.
    Queued,
    /// Handed to an agent under a lease; the agent is staging inputs.
    Assigned,
    /// The payload runs.
    Running,
    /// The agent uploads the outputs.
    Uploading,
    /// Finished; outputs stored and verified.
    Done,
    /// Finished without success (payload failed, or retries used up).
    Failed,
    /// Its agent vanished or its lease ran out; it is requeued or failed right away.
    Lost,
}

/// A transition the life cycle does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("job state cannot go from {from} to {to}")]
pub struct BadTransition {
    pub from: JobState,
    pub to: JobState,
}

impl JobState {
    /// All states, in life-cycle order.
    pub const ALL: [JobState; 7] = [
        JobState::Queued,
        JobState::Assigned,
        JobState::Running,
        JobState::Uploading,
        JobState::Done,
        JobState::Failed,
        JobState::Lost,
    ];

    /// Whether the job is finished for good.
    pub fn is_final(self) -> bool {
        matches!(self, JobState::Done | JobState::Failed)
    }

    /// Whether an agent holds a lease on the job.
    pub fn is_leased(self) -> bool {
        matches!(
            self,
            JobState::Assigned | JobState::Running | JobState::Uploading
        )
    }

    /// Whether the life cycle allows going from `self` to `to`.
    pub fn can_transition_to(self, to: JobState) -> bool {
        use JobState::*;
        match (self, to) {
            (Queued, Assigned) => true,
            (Assigned, Running | Uploading) => true,
            (Running, Running | Uploading) => true,
            // The done report comes from any leased state: a job with no outputs uploads nothing.
            (Assigned | Running | Uploading, Done | Failed | Lost) => true,
            (Lost, Queued | Failed) => true,
            // An admin may cancel a job that waits.
            (Queued, Failed) => true,
            _ => false,
        }
    }

    /// `to` if the life cycle allows it.
    pub fn transition(self, to: JobState) -> Result<JobState, BadTransition> {
        if self.can_transition_to(to) {
            Ok(to)
        } else {
            Err(BadTransition { from: self, to })
        }
    }

    /// The lower-case name used in the database, the API and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Assigned => "assigned",
            JobState::Running => "running",
            JobState::Uploading => "uploading",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Lost => "lost",
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no job state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown job state {0:?}")]
pub struct UnknownState(pub String);

impl FromStr for JobState {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownState(s.chars().take(40).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::JobState::*;
    use super::*;

    #[test]
    fn happy_path_is_allowed() {
        let mut s = Queued;
        for to in [Assigned, Running, Uploading, Done] {
            s = s.transition(to).unwrap();
        }
        assert!(s.is_final());
    }

    #[test]
    fn lost_jobs_requeue_or_fail() {
        assert!(Running.can_transition_to(Lost));
        assert!(Lost.can_transition_to(Queued));
        assert!(Lost.can_transition_to(Failed));
        assert!(!Lost.can_transition_to(Done));
    }

    #[test]
    fn final_states_are_final() {
        for from in [Done, Failed] {
            for to in JobState::ALL {
                assert!(from.transition(to).is_err(), "{from} -> {to}");
            }
        }
    }

    #[test]
    fn no_skipping_the_queue() {
        assert!(Queued.transition(Running).is_err());
        assert!(Queued.transition(Done).is_err());
        assert!(Uploading.transition(Running).is_err());
    }

    #[test]
    fn names_round_trip() {
        for s in JobState::ALL {
            assert_eq!(s.as_str().parse::<JobState>().unwrap(), s);
        }
        assert!("bogus".parse::<JobState>().is_err());
    }
}
