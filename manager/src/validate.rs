//! Validators: the commands a project's admin configures (`[validators.NAME]`) to say whether
//! two replicas of a job agree when their outputs are not byte for byte the same (Monte Carlo
//! results within a tolerance, say). A job asks for one with `validator = "NAME"`.
//!
//! [`run`] is the task that asks them: it takes pairs of done replicas the queue has no verdict
//! on ([`Queue::comparisons_due`](crate::queue::Queue::comparisons_due)), unpacks both output
//! archives (with the same checks as every unpacking: no links, no paths out, a size cap) into
//! a scratch dir, runs the command with the two dirs as its last arguments, and records the
//! verdict, which settles the group's vote. Exit status 0 means agree, 1 differ; anything else,
//! or running past the timeout, is the validator's own failure: logged, counted, and the pair
//! asked again a minute later.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use copilot_protocol::JobId;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::config::ValidatorConfig;
use crate::metrics::Metrics;
use crate::queue::Comparison;
use crate::Shared;

/// The most bytes of a validator's output kept as its verdict's detail.
pub const MAX_DETAIL: usize = 2048;
/// How long a pair whose comparison failed waits before it is asked again.
const RETRY_AFTER: Duration = Duration::from_secs(60);
/// How often the task looks for work without being woken.
const SWEEP_EVERY: Duration = Duration::from_secs(30);
/// Pairs taken from the queue at a time.
const BATCH: u32 = 32;
/// The `PATH` a validator runs with.
const PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Where the task gets the replicas' archives and room to unpack them.
pub trait Archives: Send + Sync + 'static {
    /// The stored output archive of `job`, opened for reading from its start.
    fn open(&self, job: JobId) -> impl Future<Output = Result<std::fs::File, String>> + Send;
    /// A fresh scratch dir, removed when dropped.
    fn scratch(&self) -> Result<tempfile::TempDir, String>;
}

/// What a validator said of two replicas.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub same: bool,
    /// The tail of what it printed (stdout and stderr), for people.
    pub detail: String,
}

/// Why two replicas could not be compared.
#[derive(Debug, thiserror::Error)]
pub enum ValidatorError {
    #[error(
        "no validator named {0:?} is configured (the job was submitted to a manager that had one)"
    )]
    Unknown(String),
    #[error("the archive of job {job}: {reason}")]
    Archive { job: JobId, reason: String },
    #[error("unpacking the archive of job {job}: {source}")]
    Unpack {
        job: JobId,
        #[source]
        source: copilot_archive::unpack::UnpackError,
    },
    #[error("running {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the validator ran past its timeout of {0:?} and was killed")]
    TimedOut(Duration),
    #[error(
        "the validator failed ({status}), which is neither agree (0) nor differ (1): {detail}"
    )]
    Failed { status: ExitStatus, detail: String },
    #[error("recording the verdict: {0}")]
    Record(String),
}

/// Compare the replicas `a` and `b` with `validator`, unpacking at most its `max_size` of each.
pub async fn compare(
    validator: &ValidatorConfig,
    archives: &impl Archives,
    a: JobId,
    b: JobId,
) -> Result<Verdict, ValidatorError> {
    let max_bytes = validator.max_size.0;
    let scratch = archives
        .scratch()
        .map_err(|reason| ValidatorError::Archive {
            job: a,
            reason: format!("no scratch dir: {reason}"),
        })?;
    let mut dirs = Vec::with_capacity(2);
    for job in [a, b] {
        let file = archives
            .open(job)
            .await
            .map_err(|reason| ValidatorError::Archive { job, reason })?;
        let dir = scratch.path().join(format!("job-{job}"));
        let to = dir.clone();
        tokio::task::spawn_blocking(move || {
            copilot_archive::unpack::unpack(std::io::BufReader::new(file), &to, max_bytes)
        })
        .await
        .map_err(|e| ValidatorError::Archive {
            job,
            reason: format!("the unpacking task failed: {e}"),
        })?
        .map_err(|source| ValidatorError::Unpack { job, source })?;
        dirs.push(dir);
    }
    run_command(validator, scratch.path(), &dirs).await
}

/// Run `validator` in `scratch` on `dirs`, its output going to a file there.
async fn run_command(
    validator: &ValidatorConfig,
    scratch: &Path,
    dirs: &[PathBuf],
) -> Result<Verdict, ValidatorError> {
    let program = validator.command[0].clone();
    let spawn_err = |source| ValidatorError::Spawn {
        program: program.clone(),
        source,
    };
    let log_path = scratch.join("validator.log");
    let log = std::fs::File::create(&log_path).map_err(spawn_err)?;
    let mut child = tokio::process::Command::new(&program)
        .args(&validator.command[1..])
        .args(dirs)
        .current_dir(scratch)
        .env_clear()
        .env("PATH", PATH)
        .env("HOME", scratch)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(spawn_err)?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .map_err(spawn_err)?;
    let limit = validator.timeout.as_duration();
    let status = match tokio::time::timeout(limit, child.wait()).await {
        Ok(status) => status.map_err(spawn_err)?,
        Err(_) => {
            // Dropping the child kills it; its own children are its business.
            let _ = child.kill().await;
            return Err(ValidatorError::TimedOut(limit));
        }
    };
    let detail = tail(&log_path).await;
    match status.code() {
        Some(0) => Ok(Verdict { same: true, detail }),
        Some(1) => Ok(Verdict {
            same: false,
            detail,
        }),
        _ => Err(ValidatorError::Failed { status, detail }),
    }
}

/// The last [`MAX_DETAIL`] bytes of the file at `path`, as text, trimmed ("" if unreadable).
async fn tail(path: &Path) -> String {
    let Ok(mut f) = tokio::fs::File::open(path).await else {
        return String::new();
    };
    let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(MAX_DETAIL as u64);
    let mut buf = Vec::with_capacity(MAX_DETAIL);
    if f.seek(std::io::SeekFrom::Start(start)).await.is_err()
        || f.take(MAX_DETAIL as u64)
            .read_to_end(&mut buf)
            .await
            .is_err()
    {
        return String::new();
    }
    String::from_utf8_lossy(&buf).trim().to_owned()
}

/// Compare the replicas that need it until `stop` resolves: at once, whenever
/// `shared.replica_done` is notified, and every [`SWEEP_EVERY`].
pub async fn run(shared: Arc<Shared>, archives: impl Archives, stop: impl Future<Output = ()>) {
    tokio::pin!(stop);
    // Pairs whose comparison failed, and when they may be asked again.
    let mut resting: HashMap<(JobId, JobId), Instant> = HashMap::new();
    loop {
        resting.retain(|_, until| *until > Instant::now());
        // One sweep: every pair due, a page at a time.
        let mut after = (0, 0);
        loop {
            let q = shared.clone();
            let due =
                match tokio::task::spawn_blocking(move || q.queue.comparisons_due(after, BATCH))
                    .await
                {
                    Ok(Ok(due)) => due,
                    Ok(Err(e)) => {
                        tracing::warn!("validators: cannot read the queue: {e}");
                        Vec::new()
                    }
                    Err(e) => {
                        tracing::warn!("validators: the queue task failed: {e}");
                        Vec::new()
                    }
                };
            let last_page = due.len() < BATCH as usize;
            for c in due {
                after = (c.a, c.b);
                if resting.contains_key(&after) {
                    continue;
                }
                if let Err(e) = settle(&shared, &archives, &c).await {
                    tracing::warn!(
                        group = c.group,
                        a = c.a,
                        b = c.b,
                        validator = %c.validator,
                        "cannot compare two replicas (asked again in {}s): {e}",
                        RETRY_AFTER.as_secs()
                    );
                    Metrics::add(&shared.metrics.validator_failures, 1);
                    resting.insert(after, Instant::now() + RETRY_AFTER);
                }
            }
            if last_page {
                break;
            }
        }
        tokio::select! {
            () = &mut stop => return,
            () = shared.replica_done.notified() => {}
            () = tokio::time::sleep(SWEEP_EVERY) => {}
        }
    }
}

/// Compare the pair `c` and record the verdict.
async fn settle(
    shared: &Arc<Shared>,
    archives: &impl Archives,
    c: &Comparison,
) -> Result<(), ValidatorError> {
    let validator = shared
        .config
        .validators
        .get(&c.validator)
        .ok_or_else(|| ValidatorError::Unknown(c.validator.clone()))?;
    let v = compare(validator, archives, c.a, c.b).await?;
    tracing::info!(
        group = c.group,
        a = c.a,
        b = c.b,
        same = v.same,
        validator = %c.validator,
        "replicas compared: {}",
        v.detail
    );
    Metrics::add(&shared.metrics.validator_verdicts, 1);
    let (q, c, detail) = (shared.clone(), c.clone(), v.detail);
    tokio::task::spawn_blocking(move || q.queue.record_verdict(&c, v.same, &detail))
        .await
        .map_err(|e| ValidatorError::Record(e.to_string()))?
        .map_err(|e| ValidatorError::Record(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use copilot_protocol::units::{Bytes, Seconds};

    /// Archives from memory: job id → tar.gz bytes.
    struct Mem(HashMap<JobId, Vec<u8>>, tempfile::TempDir);

    impl Archives for Mem {
        async fn open(&self, job: JobId) -> Result<std::fs::File, String> {
            let bytes = self.0.get(&job).ok_or("no such archive")?;
            let mut f = tempfile::tempfile_in(self.1.path()).map_err(|e| e.to_string())?;
            use std::io::{Seek, Write};
            f.write_all(bytes).map_err(|e| e.to_string())?;
            f.rewind().map_err(|e| e.to_string())?;
            Ok(f)
        }
        fn scratch(&self) -> Result<tempfile::TempDir, String> {
            tempfile::tempdir_in(self.1.path()).map_err(|e| e.to_string())
        }
    }

    fn archives(pairs: &[(JobId, &[u8])]) -> Mem {
        let map = pairs
            .iter()
            .map(|(job, answer)| {
                let tgz = copilot_archive::testutil::targz(&[("answer.txt", answer)]);
                (*job, tgz)
            })
            .collect();
        Mem(map, tempfile::tempdir().unwrap())
    }

    fn sh(script: &str, timeout: u64) -> ValidatorConfig {
        ValidatorConfig {
            command: ["sh", "-c", script, "validator"].map(String::from).to_vec(),
            timeout: Seconds(timeout),
            max_size: Bytes(1 << 20),
        }
    }

    /// Agrees when the two answers differ by less than 0.01.
    const CLOSE: &str = "awk 'NR == FNR { a = $1; next } \
        { d = a - $1; if (d < 0) d = -d; print \"difference\", d; exit !(d < 0.01) }' \
        \"$1/answer.txt\" \"$2/answer.txt\"";

    #[tokio::test]
    async fn exit_0_agrees_exit_1_differs_and_the_output_is_the_detail() {
        let a = archives(&[(1, b"0.501\n"), (2, b"0.509\n"), (3, b"0.7\n")]);
        let v = compare(&sh(CLOSE, 10), &a, 1, 2).await.unwrap();
        assert!(v.same);
        assert!(v.detail.starts_with("difference 0.008"), "{}", v.detail);
        let v = compare(&sh(CLOSE, 10), &a, 1, 3).await.unwrap();
        assert!(!v.same);
        assert!(v.detail.contains("difference 0.199"), "{}", v.detail);
        // The scratch dirs are gone.
        assert_eq!(std::fs::read_dir(a.1.path()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn failures_of_the_validator_are_not_verdicts() {
        let a = archives(&[(1, b"1"), (2, b"2")]);
        let err = compare(&sh("echo broken >&2; exit 2", 10), &a, 1, 2)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ValidatorError::Failed { detail, .. } if detail == "broken"),
            "{err}"
        );
        let started = Instant::now();
        let err = compare(&sh("sleep 30", 1), &a, 1, 2).await.unwrap_err();
        assert!(matches!(err, ValidatorError::TimedOut(_)), "{err}");
        assert!(started.elapsed() < Duration::from_secs(25), "not killed");
        let missing = ValidatorConfig {
            command: vec!["/nonexistent/validator".into()],
            ..sh("", 1)
        };
        let err = compare(&missing, &a, 1, 2).await.unwrap_err();
        assert!(matches!(err, ValidatorError::Spawn { .. }), "{err}");
        let err = compare(&sh("exit 0", 1), &a, 1, 9).await.unwrap_err();
        assert!(
            matches!(err, ValidatorError::Archive { job: 9, .. }),
            "{err}"
        );
    }

    /// Archives are unpacked by the same code as everywhere (links, paths out, devices:
    /// see copilot-archive's tests); here, its size cap.
    #[tokio::test]
    async fn archives_too_large_are_refused_before_the_validator_runs() {
        let a = archives(&[(1, b"1"), (2, &[b'x'; 4096])]);
        let small = ValidatorConfig {
            max_size: Bytes(1024),
            ..sh("exit 0", 10)
        };
        let err = compare(&small, &a, 1, 2).await.unwrap_err();
        assert!(
            matches!(err, ValidatorError::Unpack { job: 2, .. }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn the_validator_runs_with_an_empty_environment_but_path_and_home() {
        let a = archives(&[(1, b"1"), (2, b"2")]);
        let v = compare(&sh("env; exit 1", 10), &a, 1, 2).await.unwrap();
        // The shell adds PWD, SHLVL and _ of its own; nothing of the manager's (this test
        // process has CARGO_* and more) comes through.
        let names: Vec<&str> = v
            .detail
            .lines()
            .filter_map(|l| l.split('=').next())
            .collect();
        assert!(
            names
                .iter()
                .all(|n| ["PATH", "HOME", "PWD", "SHLVL", "_", "OLDPWD"].contains(n)),
            "{}",
            v.detail
        );
        assert!(v.detail.contains(&format!("PATH={PATH}")), "{}", v.detail);
    }
}
