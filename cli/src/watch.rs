//! `copilot wait`: poll the manager until the given jobs are final, with a progress bar.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use copilot_protocol::api::JobView;
use copilot_protocol::{JobId, JobState};
use indicatif::{ProgressBar, ProgressStyle};

use crate::client::{Client, ClientError};

/// How often the manager is asked.
const POLL: Duration = Duration::from_secs(1);

/// How the wait ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Waited {
    /// Every job is done.
    AllDone,
    /// Every job is final; these failed.
    Failed(Vec<JobId>),
    /// Time ran out; these were not final yet.
    TimedOut(Vec<JobId>),
}

/// Why waiting failed.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error("the manager has no job {0}")]
    NoSuchJob(JobId),
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// Wait until all `ids` are final or `timeout` (if any) passes.
pub async fn wait(
    client: &Client,
    ids: &[JobId],
    timeout: Option<Duration>,
) -> Result<Waited, WaitError> {
    let wanted: BTreeSet<JobId> = ids.iter().copied().collect();
    let bar = ProgressBar::new(wanted.len() as u64).with_style(
        ProgressStyle::with_template("{wide_bar} {pos}/{len} final  {msg}  [{elapsed}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let list = client.jobs(None).await?;
        let ours: Vec<&JobView> = list
            .jobs
            .iter()
            .filter(|j| wanted.contains(&j.id))
            .collect();
        if let Some(missing) = wanted.iter().find(|id| !ours.iter().any(|j| j.id == **id)) {
            bar.finish_and_clear();
            return Err(WaitError::NoSuchJob(*missing));
        }
        let pending: Vec<JobId> = ours
            .iter()
            .filter(|j| !j.state.is_final())
            .map(|j| j.id)
            .collect();
        let failed: Vec<JobId> = ours
            .iter()
            .filter(|j| j.state == JobState::Failed)
            .map(|j| j.id)
            .collect();
        bar.set_position((ours.len() - pending.len()) as u64);
        bar.set_message(format!("{} failed", failed.len()));
        if pending.is_empty() {
            bar.finish_and_clear();
            return Ok(if failed.is_empty() {
                Waited::AllDone
            } else {
                Waited::Failed(failed)
            });
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            bar.finish_and_clear();
            return Ok(Waited::TimedOut(pending));
        }
        tokio::time::sleep(POLL).await;
    }
}
