//! One job attempt end to end: [`Executor::execute`] stages the inputs, runs the payload, packs
//! and uploads the outputs and logs, and turns every failure into the report's [`Outcome`].
//!
//! Each attempt gets a fresh work dir `<work_dir>/job-<id>-<attempt>` (the payload's cwd, HOME
//! and TMPDIR) and a private sibling `<work_dir>/job-<id>-<attempt>.agent` for the logs and the
//! archive; both are removed afterwards.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use copilot_protocol::sandbox::SandboxReport;
use copilot_protocol::units::Seconds;
use copilot_protocol::wire::{Assignment, DoneReport, Outcome, Phase, Timings};
use copilot_protocol::Limits;
use copilot_storage::Url;

use crate::cache::InputCache;
use crate::config::{AgentConfig, DEFAULT_OUTPUT, DEFAULT_WALL_TIME};
use crate::sandbox::{PayloadRunner, RunRequest, SandboxRunner};
use crate::stage::{stage_inputs, Sources};
use crate::transfer::JobCredentials;
use copilot_archive::pack::{pack, Packed};

/// Why an executor could not be set up (job failures never surface as errors).
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("cannot create work dir {}: {source}", path.display())]
    WorkDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    ProjectCa(copilot_xmpp::TrustError),
    #[error("cannot set up transfers: {0}")]
    Transfers(#[from] copilot_storage::StorageError),
}

/// The input cache's dir inside the work dir.
const CACHE_DIR: &str = "input-cache";

/// Runs assignments; shareable between concurrent jobs (`&self`).
#[derive(Debug)]
pub struct Executor<R = SandboxRunner> {
    /// The agent's name, put in every report.
    agent: String,
    work_dir: PathBuf,
    /// Limits for jobs that do not set them; `wall_time` and `output` are always set.
    defaults: Limits,
    max_input_size: u64,
    transfers: copilot_storage::Transfers,
    /// Inputs kept by digest for later jobs (none when its size is 0).
    cache: Option<InputCache>,
    runner: R,
}

/// The two dirs of one attempt.
struct JobDirs {
    /// The payload's work dir.
    work: PathBuf,
    /// The agent's files: logs and archive.
    agent: PathBuf,
}

/// The end of an attempt, before it becomes a report.
struct Ended {
    outcome: Outcome,
    timings: Timings,
    packed: Option<Packed>,
    /// Empty when the payload never ran.
    sandbox: SandboxReport,
}

impl Executor<SandboxRunner> {
    /// An executor running payloads as plain child processes.
    pub fn new(cfg: &AgentConfig) -> Result<Executor, ExecError> {
        let mut runner = SandboxRunner::new(cfg.sandbox.base_uid);
        runner.lock_dir.clone_from(&cfg.sandbox.lock_dir);
        runner.cpus_per_job = cfg.sandbox.cpus_per_job;
        Executor::with_runner(cfg, runner)
    }
}

impl<R: PayloadRunner> Executor<R> {
    /// An executor running payloads with `runner`. Creates the work dir and removes job dirs
    /// left there by an earlier run of the agent.
    pub fn with_runner(cfg: &AgentConfig, runner: R) -> Result<Executor<R>, ExecError> {
        std::fs::create_dir_all(&cfg.work_dir).map_err(|source| ExecError::WorkDir {
            path: cfg.work_dir.clone(),
            source,
        })?;
        if crate::sandbox::is_root() {
            // Job uids must pass through (not list) the work dir to reach their own dirs.
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::Permissions::from_mode(0o711);
            std::fs::set_permissions(&cfg.work_dir, mode).map_err(|source| ExecError::WorkDir {
                path: cfg.work_dir.clone(),
                source,
            })?;
        }
        let mut defaults = cfg.limits.clone();
        defaults.wall_time.get_or_insert(DEFAULT_WALL_TIME);
        defaults.output.get_or_insert(DEFAULT_OUTPUT);
        remove_leftovers(&cfg.work_dir);
        let cache = match cfg.transfer.cache_size.0 {
            0 => None,
            size => {
                let dir = cfg.work_dir.join(CACHE_DIR);
                Some(
                    InputCache::new(&dir, size)
                        .map_err(|source| ExecError::WorkDir { path: dir, source })?,
                )
            }
        };
        Ok(Executor {
            agent: cfg.name.clone(),
            work_dir: cfg.work_dir.clone(),
            defaults,
            max_input_size: cfg.transfer.max_input_size.0,
            transfers: crate::transfer::transfers(
                &cfg.transfer,
                cfg.xmpp.project_ca_pem().map_err(ExecError::ProjectCa)?,
            )?,
            cache,
            runner,
        })
    }

    /// Runs one assignment end to end in a fresh dir, removed afterwards. Never fails: every
    /// failure becomes the report's outcome. `on_phase` is called when staging starts, when the
    /// payload starts ([`Phase::Running`]) and when the upload starts. `want_more` is false.
    pub async fn execute(
        &self,
        a: &Assignment,
        on_phase: impl Fn(Phase) + Send + Sync,
    ) -> DoneReport {
        let name = format!("job-{}-{}", a.job, a.attempt);
        let dirs = JobDirs {
            work: self.work_dir.join(&name),
            agent: self.work_dir.join(format!("{name}.agent")),
        };
        let ended = self.attempt(a, &dirs, &on_phase).await;
        for dir in [&dirs.work, &dirs.agent] {
            remove_dir(dir).await;
        }
        tracing::info!(job = a.job, attempt = a.attempt, outcome = %ended.outcome.describe(), "attempt finished");
        let (archive, files) = match ended.packed {
            Some(p) => (Some((p.sha256, p.size)), p.files),
            None => (None, Vec::new()),
        };
        DoneReport {
            agent: self.agent.clone(),
            job: a.job,
            attempt: a.attempt,
            outcome: ended.outcome,
            timings: ended.timings,
            archive,
            files,
            sandbox: ended.sandbox,
            volunteer: None,
            want_more: false,
        }
    }

    async fn attempt(
        &self,
        a: &Assignment,
        dirs: &JobDirs,
        on_phase: &(impl Fn(Phase) + Send + Sync),
    ) -> Ended {
        let mut timings = Timings::default();
        let started = Instant::now();
        on_phase(Phase::Staging);
        let early_end = |outcome, timings| Ended {
            outcome,
            timings,
            packed: None,
            sandbox: SandboxReport::default(),
        };
        let (upload_url, creds) = match self.prepare(a, dirs).await {
            Ok(ready) => ready,
            Err(msg) => {
                timings.stage_in_ms = millis(started.elapsed());
                return early_end(Outcome::SetupFailed(msg), timings);
            }
        };
        let sources = Sources {
            transfers: &self.transfers,
            creds: &creds,
            cache: self.cache.as_ref(),
            max_size: self.max_input_size,
        };
        let staged = stage_inputs(sources, &a.inputs, &dirs.work).await;
        timings.stage_in_ms = millis(started.elapsed());
        if let Err(e) = staged {
            tracing::warn!(job = a.job, attempt = a.attempt, "stage-in failed: {e}");
            return early_end(Outcome::StageInFailed(e.to_string()), timings);
        }

        on_phase(Phase::Running);
        let req = self.run_request(a, dirs);
        let run = self.runner.run(&req).await;
        timings.run_ms = millis(run.duration);
        if run.stdout_truncated || run.stderr_truncated {
            tracing::info!(
                job = a.job,
                cap = req.output_cap,
                "payload output was cut at the cap"
            );
        }

        on_phase(Phase::Uploading);
        let started = Instant::now();
        let stored = self.stage_out(a, dirs, &req, &upload_url, &creds).await;
        timings.stage_out_ms = millis(started.elapsed());
        match stored {
            Ok(packed) => Ended {
                outcome: run.outcome,
                timings,
                packed: Some(packed),
                sandbox: run.sandbox,
            },
            Err(msg) => {
                tracing::warn!(job = a.job, attempt = a.attempt, "stage-out failed: {msg}");
                // A setup failure is the root cause; otherwise the missing upload is.
                let outcome = if run.outcome.is_retryable() {
                    run.outcome
                } else {
                    Outcome::StageOutFailed(msg)
                };
                Ended {
                    sandbox: run.sandbox,
                    ..early_end(outcome, timings)
                }
            }
        }
    }

    /// Checks what the agent relies on and creates fresh dirs; returns the upload URL and the
    /// attempt's credentials.
    async fn prepare(
        &self,
        a: &Assignment,
        dirs: &JobDirs,
    ) -> Result<(Url, JobCredentials), String> {
        copilot_protocol::job::validate_command(&a.command).map_err(|e| e.to_string())?;
        copilot_protocol::job::validate_outputs(&a.outputs).map_err(|e| e.to_string())?;
        let url: Url = a
            .upload_url
            .parse()
            .map_err(|e| format!("bad upload URL {:?}: {e}", a.upload_url))?;
        for dir in [&dirs.work, &dirs.agent] {
            remove_dir(dir).await;
            // 0700: other jobs' uids must not read this attempt's logs or archive.
            let mut builder = tokio::fs::DirBuilder::new();
            builder.mode(0o700);
            builder
                .create(dir)
                .await
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        let creds = JobCredentials::new(&url, &a.upload_token)?;
        Ok((url, creds))
    }

    fn run_request(&self, a: &Assignment, dirs: &JobDirs) -> RunRequest {
        let limits = effective_limits(&a.limits, &self.defaults);
        let mut env: BTreeMap<String, String> = a.env.clone();
        env.insert("COPILOT_JOB_ID".into(), a.job.to_string());
        env.insert("COPILOT_ATTEMPT".into(), a.attempt.to_string());
        RunRequest {
            argv: a.command.clone(),
            dir: dirs.work.clone(),
            env,
            wall_time: limits.wall_time.map_or(Duration::MAX, Seconds::as_duration),
            cpu_time: limits.cpu_time.map(Seconds::as_duration),
            memory: limits.memory.map(|b| b.0),
            disk: limits.disk.map(|b| b.0),
            processes: limits.processes,
            output_cap: limits.output.map_or(u64::MAX, |b| b.0),
            network: a.network,
            stdout_path: dirs.agent.join("stdout.txt"),
            stderr_path: dirs.agent.join("stderr.txt"),
        }
    }

    /// Packs outputs and logs (off the runtime) and uploads the archive.
    async fn stage_out(
        &self,
        a: &Assignment,
        dirs: &JobDirs,
        req: &RunRequest,
        url: &Url,
        creds: &JobCredentials,
    ) -> Result<Packed, String> {
        let work = dirs.work.clone();
        let outputs = a.outputs.clone();
        let (stdout, stderr) = (req.stdout_path.clone(), req.stderr_path.clone());
        let archive = dirs.agent.join("output.tar.gz");
        let packed =
            tokio::task::spawn_blocking(move || pack(&work, &outputs, &stdout, &stderr, &archive))
                .await
                .map_err(|e| format!("packing outputs stopped: {e}"))?
                .map_err(|e| e.to_string())?;
        let upload = copilot_storage::Upload {
            sha256: packed.sha256,
            size: packed.size,
        };
        self.transfers
            .put(
                &packed.path,
                url,
                upload,
                &creds.for_upload(url),
                &copilot_storage::no_progress(),
            )
            .await
            .map_err(|e| format!("upload: {e}"))?;
        Ok(packed)
    }
}

/// Whether `name` is one of the dirs [`Executor::execute`] creates: `job-<id>-<attempt>` or
/// `job-<id>-<attempt>.agent`.
fn is_job_dir_name(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("job-") else {
        return false;
    };
    let rest = rest.strip_suffix(".agent").unwrap_or(rest);
    rest.split_once('-').is_some_and(|(id, attempt)| {
        [id, attempt]
            .iter()
            .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// Removes job dirs that an earlier agent process left behind (it was stopped mid-job).
fn remove_leftovers(work_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(work_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if entry.file_name().to_str().is_some_and(is_job_dir_name) {
            tracing::info!("removing leftover job dir {}", path.display());
            make_writable(&path);
            if let Err(e) = std::fs::remove_dir_all(&path) {
                tracing::warn!("cannot remove leftover {}: {e}", path.display());
            }
        }
    }
}

/// The job's limits, each missing one taken from `defaults`.
fn effective_limits(job: &Limits, defaults: &Limits) -> Limits {
    Limits {
        wall_time: job.wall_time.or(defaults.wall_time),
        cpu_time: job.cpu_time.or(defaults.cpu_time),
        memory: job.memory.or(defaults.memory),
        disk: job.disk.or(defaults.disk),
        processes: job.processes.or(defaults.processes),
        output: job.output.or(defaults.output),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Removes a dir tree if it exists, first making its dirs writable (a payload may have made
/// them read-only). Failures are logged: a leftover dir must not fail a job.
async fn remove_dir(dir: &Path) {
    let first = match tokio::fs::remove_dir_all(dir).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => e,
        _ => return,
    };
    let owned = dir.to_owned();
    let retried = tokio::task::spawn_blocking(move || {
        make_writable(&owned);
        std::fs::remove_dir_all(&owned)
    })
    .await;
    if !matches!(retried, Ok(Ok(()))) {
        tracing::warn!("cannot remove {}: {first}", dir.display());
    }
}

fn make_writable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let is_real_dir = std::fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir());
    if !is_real_dir {
        return;
    }
    // Best effort: whatever fails here shows up in the removal that follows.
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            make_writable(&entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use copilot_protocol::sandbox::Protection;
    use copilot_protocol::units::Bytes;
    use copilot_protocol::wire::WireInput;
    use copilot_protocol::Sha256;

    use super::*;
    use crate::testutil::settings;
    use copilot_archive::pack::{STDERR_ENTRY, STDOUT_ENTRY};
    use copilot_archive::testutil::unpack;
    use copilot_storage::testserver::TestServer;

    struct Setup {
        _root: tempfile::TempDir,
        work_dir: PathBuf,
        exec: Executor,
        server: TestServer,
    }

    async fn setup() -> Setup {
        let root = tempfile::tempdir().unwrap();
        let work_dir = root.path().join("work");
        let mut cfg = AgentConfig::from_toml(crate::testutil::CONFIG).unwrap();
        cfg.work_dir = work_dir.clone();
        cfg.transfer = settings();
        let exec = Executor::new(&cfg).unwrap();
        Setup {
            _root: root,
            work_dir,
            exec,
            server: TestServer::start().await,
        }
    }

    fn assignment(server: &TestServer, script: &str, outputs: &[&str]) -> Assignment {
        Assignment {
            attempt: 2,
            command: vec!["sh".into(), "-c".into(), script.into()],
            env: [("GREETING".to_string(), "hi".to_string())].into(),
            outputs: outputs.iter().map(|s| s.to_string()).collect(),
            upload_url: format!("{}/outputs/17/2", server.base),
            upload_token: "tok".into(),
            ..crate::testutil::assignment(17, "test")
        }
    }

    /// Runs `a`, returning the report and the phases seen.
    async fn run(s: &Setup, a: &Assignment) -> (DoneReport, Vec<Phase>) {
        let phases = Mutex::new(Vec::new());
        let report = s.exec.execute(a, |p| phases.lock().unwrap().push(p)).await;
        (report, phases.into_inner().unwrap())
    }

    /// No job dir is left (the input cache stays).
    fn work_dir_is_empty(s: &Setup) -> bool {
        std::fs::read_dir(&s.work_dir)
            .unwrap()
            .all(|e| e.unwrap().file_name() == CACHE_DIR)
    }

    #[tokio::test]
    async fn leftover_job_dirs_are_removed_at_start() {
        let s = setup().await;
        for name in ["job-3-1", "job-3-1.agent", "keep", "job-x-1", "job-3-1.old"] {
            std::fs::create_dir(s.work_dir.join(name)).unwrap();
        }
        let mut cfg = AgentConfig::from_toml(crate::testutil::CONFIG).unwrap();
        cfg.work_dir = s.work_dir.clone();
        Executor::new(&cfg).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(&s.work_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, [CACHE_DIR, "job-3-1.old", "job-x-1", "keep"]);
    }

    #[tokio::test]
    async fn execute_can_be_spawned() {
        let s = setup().await;
        let a = assignment(&s.server, "true", &[]);
        let exec = std::sync::Arc::new(s.exec);
        let shared = exec.clone();
        // Compiles only if the executor is Send + Sync and execute's future is Send.
        let report = tokio::spawn(async move { shared.execute(&a, |_| {}).await })
            .await
            .unwrap();
        assert_eq!(report.outcome, Outcome::Exited { code: 0 });
    }

    #[tokio::test]
    async fn a_job_runs_end_to_end() {
        let s = setup().await;
        let mut a = assignment(
            &s.server,
            "cat in.txt > out.txt; echo $GREETING $COPILOT_JOB_ID $COPILOT_ATTEMPT",
            &["out.txt", "never.txt"],
        );
        let input = b"hi\n";
        a.inputs.push(WireInput {
            name: "in.txt".into(),
            url: s.server.serve("in.txt", input),
            sha256: Some(Sha256::of(input)),
            size: Some(input.len() as u64),
        });
        let (report, phases) = run(&s, &a).await;
        assert_eq!(report.outcome, Outcome::Exited { code: 0 });
        assert_eq!(
            (report.job, report.attempt, report.want_more),
            (17, 2, false)
        );
        assert_eq!(phases, [Phase::Staging, Phase::Running, Phase::Uploading]);
        assert!(
            report.sandbox.active.contains(&Protection::Session),
            "the run's sandbox is reported: {:?}",
            report.sandbox
        );

        let puts = s.server.puts();
        assert_eq!(puts.len(), 1);
        let body = &puts[0].body;
        assert_eq!(puts[0].path, "/outputs/17/2");
        assert_eq!(puts[0].authorization.as_deref(), Some("Bearer tok"));
        assert_eq!(report.archive, Some((Sha256::of(body), body.len() as u64)));
        assert_eq!(puts[0].content_sha256, Some(Sha256::of(body).to_string()));

        let out = report.files.iter().find(|f| f.path == "out.txt").unwrap();
        assert_eq!((out.sha256, out.size), (Sha256::of(b"hi\n"), 3));
        let names: Vec<&str> = report.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(names, ["out.txt", STDOUT_ENTRY, STDERR_ENTRY]);
        let content = unpack(body);
        assert_eq!(content[STDOUT_ENTRY], b"hi 17 2\n");
        assert!(work_dir_is_empty(&s), "job dirs are removed");
    }

    #[tokio::test]
    async fn a_failing_payload_still_uploads_its_logs() {
        let s = setup().await;
        let a = assignment(&s.server, "echo oops >&2; exit 3", &["out.txt"]);
        let (report, _) = run(&s, &a).await;
        assert_eq!(report.outcome, Outcome::Exited { code: 3 });
        let puts = s.server.puts();
        assert_eq!(puts.len(), 1);
        assert_eq!(
            report.archive.map(|(sha, _)| sha),
            Some(Sha256::of(&puts[0].body))
        );
        assert_eq!(unpack(&puts[0].body)[STDERR_ENTRY], b"oops\n");
        assert!(work_dir_is_empty(&s));
    }

    #[tokio::test]
    async fn a_bad_input_fails_stage_in_without_running_or_uploading() {
        let s = setup().await;
        let mut a = assignment(&s.server, "touch ran", &["ran"]);
        a.inputs.push(WireInput {
            name: "in.txt".into(),
            url: s.server.serve("in.txt", b"actual"),
            sha256: Some(Sha256::of(b"expected")),
            size: None,
        });
        let (report, phases) = run(&s, &a).await;
        assert!(
            matches!(&report.outcome, Outcome::StageInFailed(m) if m.contains("sha256")),
            "{:?}",
            report.outcome
        );
        assert_eq!(phases, [Phase::Staging]);
        assert!(s.server.puts().is_empty());
        assert_eq!((report.archive, report.files.len()), (None, 0));
        assert!(
            report.sandbox.is_empty(),
            "nothing ran: {:?}",
            report.sandbox
        );
        assert!(work_dir_is_empty(&s));
    }

    #[tokio::test]
    async fn a_refused_upload_is_a_stage_out_failure() {
        let s = setup().await;
        s.server.answer_puts_with(&[409]);
        let a = assignment(&s.server, "true", &[]);
        let (report, _) = run(&s, &a).await;
        assert!(
            matches!(&report.outcome, Outcome::StageOutFailed(m) if m.contains("scripted failure 409")),
            "{:?}",
            report.outcome
        );
        assert_eq!(report.archive, None);
        assert!(work_dir_is_empty(&s));
    }

    #[tokio::test]
    async fn a_missing_program_is_reported_as_setup_failure() {
        let s = setup().await;
        let mut a = assignment(&s.server, "", &[]);
        a.command = vec!["/nonexistent/program".into()];
        let (report, _) = run(&s, &a).await;
        assert!(
            matches!(report.outcome, Outcome::SetupFailed(_)),
            "{:?}",
            report.outcome
        );
        assert_eq!(s.server.puts().len(), 1, "logs are uploaded anyway");
    }

    #[tokio::test]
    async fn job_limits_reach_the_sandbox() {
        let s = setup().await;
        let mut a = assignment(&s.server, "exec head -c 1000000 /dev/zero > big", &[]);
        a.limits.disk = Some(Bytes(1000));
        let (report, _) = run(&s, &a).await;
        // SIGXFSZ: the file-size limit stopped it.
        assert_eq!(
            report.outcome,
            Outcome::LimitExceeded {
                limit: copilot_protocol::wire::Limit::Disk
            }
        );
        assert!(work_dir_is_empty(&s));
    }

    #[tokio::test]
    async fn network_false_reaches_the_sandbox() {
        if let Err(why) = crate::sandbox::netns::isolation() {
            println!("network_false_reaches_the_sandbox: skipped: {why}");
            return;
        }
        let s = setup().await;
        // Exit 0 exactly when `lo` is the only network device the payload sees.
        let only_lo = "test \"$(sed 1,2d /proc/net/dev | cut -d: -f1 | tr -d ' ')\" = lo";
        let mut a = assignment(&s.server, only_lo, &[]);
        a.network = false;
        assert_eq!(run(&s, &a).await.0.outcome, Outcome::Exited { code: 0 });
        a.network = true;
        assert_eq!(run(&s, &a).await.0.outcome, Outcome::Exited { code: 1 });
    }

    #[tokio::test]
    async fn job_limits_override_the_defaults() {
        let s = setup().await;
        let mut a = assignment(
            &s.server,
            "yes | head -c 100000; mkdir -p ro/deep; chmod 500 ro",
            &[],
        );
        a.limits.output = Some(Bytes(10));
        let (report, _) = run(&s, &a).await;
        assert_eq!(report.outcome, Outcome::Exited { code: 0 });
        let stdout = report
            .files
            .iter()
            .find(|f| f.path == STDOUT_ENTRY)
            .unwrap();
        assert_eq!(stdout.size, 10);
        assert!(work_dir_is_empty(&s), "read-only dirs are removed too");

        let defaults = Limits {
            wall_time: Some(Seconds(5)),
            output: Some(Bytes(7)),
            ..Limits::default()
        };
        let job = Limits {
            wall_time: Some(Seconds(9)),
            ..Limits::default()
        };
        let eff = effective_limits(&job, &defaults);
        assert_eq!(
            (eff.wall_time, eff.output),
            (Some(Seconds(9)), Some(Bytes(7)))
        );
    }
}
