//! Running the payload: the [`PayloadRunner`] trait and [`ProcessRunner`], which starts the
//! command as a plain child process in its own process group.
//!
//! All OS calls of payload execution (spawn, signals to the group) live here, so a sandboxing
//! runner can replace this one. The child gets a scrubbed environment, `/dev/null` as stdin and
//! its stdout/stderr captured into files, each capped at `output_cap` bytes (the rest is read
//! and discarded so the child never blocks on a full pipe). Past its wall time the group gets
//! SIGTERM, then SIGKILL after a grace period; once the child exited, the group gets SIGKILL
//! anyway so no leftover process survives the job.

use std::collections::BTreeMap;
use std::future::Future;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use copilot_protocol::wire::Outcome;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

/// `PATH` of every payload.
pub const PAYLOAD_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// How long output capture may go on after the payload's group was killed (a process that
/// left the group may still hold the pipes open).
const DRAIN_GRACE: Duration = Duration::from_secs(5);

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
    /// Bytes kept of each of stdout and stderr.
    pub output_cap: u64,
    pub stdout_path: PathBuf,
    pub stderr_path: PathBuf,
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunResult {
    /// `Exited`, `Killed`, `TimedOut` or `SetupFailed`.
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
}

/// Something that runs a payload to its end. Never fails: every failure is an outcome.
pub trait PayloadRunner: Send + Sync {
    fn run(&self, req: &RunRequest) -> impl Future<Output = RunResult> + Send;
}

/// Runs payloads as child processes of the agent, each in its own process group.
#[derive(Clone, Debug)]
pub struct ProcessRunner {
    /// Time between SIGTERM and SIGKILL when the wall time is up.
    pub grace: Duration,
}

impl Default for ProcessRunner {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(5),
        }
    }
}

/// The bytes one capture kept.
#[derive(Clone, Copy, Debug, Default)]
struct Captured {
    kept: u64,
    truncated: bool,
}

/// Sends SIGKILL to the process group when dropped: after the child exited, and also when the
/// run is cancelled (its future dropped) halfway.
#[derive(Debug)]
struct GroupGuard(Pid);

impl GroupGuard {
    fn signal(&self, sig: Signal) {
        match killpg(self.0, sig) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => tracing::warn!(pgid = %self.0, ?sig, "cannot signal process group: {e}"),
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.signal(Signal::SIGKILL);
    }
}

impl PayloadRunner for ProcessRunner {
    async fn run(&self, req: &RunRequest) -> RunResult {
        let start = Instant::now();
        let setup_failed = |msg: String| RunResult {
            outcome: Outcome::SetupFailed(msg),
            stdout_bytes: 0,
            stderr_bytes: 0,
            stdout_truncated: false,
            stderr_truncated: false,
            duration: start.elapsed(),
        };
        let (out_file, err_file) = match (
            create_log(&req.stdout_path).await,
            create_log(&req.stderr_path).await,
        ) {
            (Ok(o), Ok(e)) => (o, e),
            (Err(e), _) | (_, Err(e)) => return setup_failed(e),
        };
        let mut child = match command(req).spawn() {
            Ok(c) => c,
            Err(e) => {
                let program = req.argv.first().map(String::as_str).unwrap_or("");
                return setup_failed(format!("cannot start {program:?}: {e}"));
            }
        };
        let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) else {
            return setup_failed("the payload vanished right after it started".into());
        };
        // The child is the leader of its own group (process_group(0)): pgid == pid.
        let group = GroupGuard(Pid::from_raw(pid));
        let stop = CancellationToken::new();
        let mut out_task = child
            .stdout
            .take()
            .map(|r| tokio::spawn(capture(r, out_file, req.output_cap, stop.clone())));
        let mut err_task = child
            .stderr
            .take()
            .map(|r| tokio::spawn(capture(r, err_file, req.output_cap, stop.clone())));

        let outcome = supervise(&mut child, &group, req.wall_time, self.grace).await;
        drop(group); // kills whatever is left of the group
        let drain = async {
            (
                join_capture(out_task.as_mut()).await,
                join_capture(err_task.as_mut()).await,
            )
        };
        let (out, err) = match tokio::time::timeout(DRAIN_GRACE, drain).await {
            Ok(pair) => pair,
            Err(_) => {
                tracing::warn!(pid, "a process outside the payload's group holds its output open; output capture stopped");
                stop.cancel();
                (
                    join_capture(out_task.as_mut()).await,
                    join_capture(err_task.as_mut()).await,
                )
            }
        };
        RunResult {
            outcome,
            stdout_bytes: out.kept,
            stderr_bytes: err.kept,
            stdout_truncated: out.truncated,
            stderr_truncated: err.truncated,
            duration: start.elapsed(),
        }
    }
}

fn command(req: &RunRequest) -> Command {
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
        .process_group(0)
        .kill_on_drop(true);
    // SAFETY: the closure runs in the forked child before exec and only calls prctl(2), which
    // is async-signal-safe; it touches no memory shared with the parent.
    unsafe {
        cmd.pre_exec(|| {
            // If the agent dies (even by SIGKILL) the payload's leader dies with it. Its own
            // children are reaped by the full sandbox (PID namespace / subreaper), not here.
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
    cmd
}

async fn create_log(path: &Path) -> Result<tokio::fs::File, String> {
    tokio::fs::File::create(path)
        .await
        .map_err(|e| format!("cannot create log file {}: {e}", path.display()))
}

/// Waits for the child; past `wall_time` it terminates the group (SIGTERM, `grace`, SIGKILL).
async fn supervise(
    child: &mut Child,
    group: &GroupGuard,
    wall_time: Duration,
    grace: Duration,
) -> Outcome {
    let status = match tokio::time::timeout(wall_time, child.wait()).await {
        Ok(status) => return exit_outcome(status),
        Err(_) => {
            tracing::info!(pgid = %group.0, ?wall_time, "payload ran out of time; terminating");
            group.signal(Signal::SIGTERM);
            match tokio::time::timeout(grace, child.wait()).await {
                Ok(status) => status,
                Err(_) => {
                    tracing::info!(pgid = %group.0, "payload ignored SIGTERM; killing");
                    group.signal(Signal::SIGKILL);
                    child.wait().await
                }
            }
        }
    };
    if let Err(e) = status {
        tracing::warn!("waiting for the timed-out payload failed: {e}");
    }
    Outcome::TimedOut
}

fn exit_outcome(status: std::io::Result<ExitStatus>) -> Outcome {
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => Outcome::Exited { code },
            (None, Some(signal)) => Outcome::Killed { signal },
            (None, None) => Outcome::SetupFailed(format!("payload ended oddly: {s}")),
        },
        Err(e) => Outcome::SetupFailed(format!("waiting for the payload failed: {e}")),
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
mod tests {
    use super::*;

    fn request(dir: &Path, script: &str) -> RunRequest {
        RunRequest {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            dir: dir.to_owned(),
            env: BTreeMap::new(),
            wall_time: Duration::from_secs(60),
            output_cap: 1 << 20,
            stdout_path: dir.join("stdout.txt"),
            stderr_path: dir.join("stderr.txt"),
        }
    }

    fn runner() -> ProcessRunner {
        ProcessRunner {
            grace: Duration::from_secs(1),
        }
    }

    /// Whether `pid` is a live (not zombie) process; waits a little for a dying one.
    async fn alive(pid: i32) -> bool {
        for _ in 0..50 {
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| s.rsplit(')').next().map(|r| r.trim().to_owned()));
            match state {
                None => return false,
                Some(s) if s.starts_with('Z') || s.starts_with('X') => return false,
                Some(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        true
    }

    fn read_pid(dir: &Path, name: &str) -> i32 {
        std::fs::read_to_string(dir.join(name))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    #[tokio::test]
    async fn exit_codes_and_output_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let r = runner()
            .run(&request(dir.path(), "echo out; echo err >&2; exit 3"))
            .await;
        assert_eq!(r.outcome, Outcome::Exited { code: 3 });
        assert_eq!(
            std::fs::read(dir.path().join("stdout.txt")).unwrap(),
            b"out\n"
        );
        assert_eq!(
            std::fs::read(dir.path().join("stderr.txt")).unwrap(),
            b"err\n"
        );
        assert_eq!((r.stdout_bytes, r.stderr_bytes), (4, 4));
        assert!(!r.stdout_truncated && !r.stderr_truncated);

        let r = runner().run(&request(dir.path(), "pwd")).await;
        assert_eq!(r.outcome, Outcome::Exited { code: 0 });
        let pwd = std::fs::read_to_string(dir.path().join("stdout.txt")).unwrap();
        assert_eq!(
            Path::new(pwd.trim()).canonicalize().unwrap(),
            dir.path().canonicalize().unwrap()
        );
    }

    #[tokio::test]
    async fn killed_by_signal() {
        let dir = tempfile::tempdir().unwrap();
        let r = runner().run(&request(dir.path(), "kill -9 $$")).await;
        assert_eq!(r.outcome, Outcome::Killed { signal: 9 });
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let mut req = request(dir.path(), "sleep 60 & echo $! > bg.pid; exec sleep 60");
        req.wall_time = Duration::from_secs(1);
        let r = runner().run(&req).await;
        assert_eq!(r.outcome, Outcome::TimedOut);
        assert!(!alive(read_pid(dir.path(), "bg.pid")).await);
    }

    #[tokio::test]
    async fn a_job_ignoring_sigterm_still_dies() {
        let dir = tempfile::tempdir().unwrap();
        let mut req = request(
            dir.path(),
            "trap '' TERM; echo $$ > sh.pid; while :; do sleep 1; done",
        );
        req.wall_time = Duration::from_secs(1);
        let r = runner().run(&req).await;
        assert_eq!(r.outcome, Outcome::TimedOut);
        assert!(!alive(read_pid(dir.path(), "sh.pid")).await);
    }

    #[tokio::test]
    async fn leftovers_die_when_the_payload_exits() {
        let dir = tempfile::tempdir().unwrap();
        // The background sleep keeps no pipe open, so the run ends when sh exits.
        let script = "sleep 60 >/dev/null 2>&1 & echo $! > bg.pid";
        let r = runner().run(&request(dir.path(), script)).await;
        assert_eq!(r.outcome, Outcome::Exited { code: 0 });
        assert!(!alive(read_pid(dir.path(), "bg.pid")).await);
    }

    #[tokio::test]
    async fn output_flood_is_capped_and_drained() {
        let dir = tempfile::tempdir().unwrap();
        let mut req = request(dir.path(), "yes | head -c 5000000; echo done >&2");
        req.output_cap = 1000;
        let r = runner().run(&req).await;
        // The payload finished on its own: the pipe was drained past the cap.
        assert_eq!(r.outcome, Outcome::Exited { code: 0 });
        assert_eq!(r.stdout_bytes, 1000);
        assert!(r.stdout_truncated);
        assert!(!r.stderr_truncated);
        let kept = std::fs::read(dir.path().join("stdout.txt")).unwrap();
        assert_eq!(kept, b"y\n".repeat(500));
    }

    #[tokio::test]
    async fn environment_is_scrubbed() {
        let dir = tempfile::tempdir().unwrap();
        let mut req = request(dir.path(), "");
        req.argv = vec!["env".into()];
        req.env.insert("SEED".into(), "42".into());
        let r = runner().run(&req).await;
        assert_eq!(r.outcome, Outcome::Exited { code: 0 });
        let text = std::fs::read_to_string(dir.path().join("stdout.txt")).unwrap();
        let mut names: Vec<&str> = text.lines().filter_map(|l| l.split('=').next()).collect();
        names.sort_unstable();
        assert_eq!(names, ["HOME", "PATH", "SEED", "TMPDIR"]);
        assert!(text.contains(&format!("PATH={PAYLOAD_PATH}\n")));
        assert!(text.contains("SEED=42\n"));
        // The test process has variables the payload must not see.
        assert!(std::env::vars().any(|(k, _)| !names.contains(&k.as_str())));
    }

    #[tokio::test]
    async fn a_missing_program_is_a_setup_failure() {
        let dir = tempfile::tempdir().unwrap();
        let mut req = request(dir.path(), "");
        req.argv = vec!["/nonexistent/program".into()];
        let r = runner().run(&req).await;
        assert!(
            matches!(&r.outcome, Outcome::SetupFailed(m) if m.contains("/nonexistent/program")),
            "{r:?}"
        );
    }
}
