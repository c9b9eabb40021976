//! The sandbox against ordinary and hostile payloads (POSIX sh). Each test uses its own base
//! uid, so that per-uid counts and "no process of the job's uid" checks do not see other
//! tests running at the same time. Tests that need root say "skipped: not root" otherwise.

use super::*;
use copilot_protocol::wire::Limit as WireLimit;

/// A test dir: logs at the top, the job's dir in `job/`.
struct Dirs {
    _tmp: tempfile::TempDir,
    top: PathBuf,
    job: PathBuf,
}

fn dirs() -> Dirs {
    let tmp = tempfile::tempdir().unwrap();
    let top = tmp.path().to_owned();
    let job = top.join("job");
    std::fs::create_dir(&job).unwrap();
    Dirs {
        _tmp: tmp,
        top,
        job,
    }
}

fn request(d: &Dirs, script: &str) -> RunRequest {
    let mut req = RunRequest::new(
        vec!["sh".into(), "-c".into(), script.into()],
        d.job.clone(),
        d.top.join("stdout.txt"),
        d.top.join("stderr.txt"),
    );
    req.wall_time = Duration::from_secs(60);
    req.output_cap = 1 << 20;
    req
}

fn runner(base_uid: u32) -> SandboxRunner {
    SandboxRunner {
        grace: Duration::from_secs(1),
        ..SandboxRunner::new(base_uid)
    }
}

fn skip_unless_root(test: &str) -> bool {
    if is_root() {
        return false;
    }
    println!("{test}: skipped: not root");
    true
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

/// Processes (live or zombie) whose real uid is `uid`.
fn processes_of(uid: u32) -> Vec<i32> {
    procs::scan()
        .unwrap()
        .into_iter()
        .filter(|p| p.uid == uid)
        .map(|p| p.pid)
        .collect()
}

fn stdout(d: &Dirs) -> String {
    std::fs::read_to_string(d.top.join("stdout.txt")).unwrap()
}

/// The runner still runs an ordinary job to success; and, as root, nothing of the slot's
/// uid is left running.
async fn still_serves(r: &SandboxRunner, d: &Dirs) {
    if is_root() {
        assert_eq!(processes_of(r.base_uid), Vec::<i32>::new());
    }
    let res = r.run(&request(d, "echo ok")).await;
    assert_eq!(res.verdict, Verdict::Exited(0), "{res:?}");
    assert_eq!(stdout(d), "ok\n");
}

#[tokio::test]
async fn exit_codes_and_output_are_reported() {
    let d = dirs();
    let r = runner(62000);
    let res = r.run(&request(&d, "echo out; echo err >&2; exit 3")).await;
    assert_eq!(res.verdict, Verdict::Exited(3));
    // What the job got is reported: a uid of its own only as root, no netns it did not ask for.
    assert!(res.sandbox.active.contains(&Guard::Session), "{res:?}");
    assert_eq!(res.sandbox.active.contains(&Guard::Uid), is_root());
    assert_eq!(res.sandbox.missing.contains(&Guard::Uid), !is_root());
    assert!(!res.sandbox.active.contains(&Guard::Netns));
    assert!(!res.sandbox.missing.contains(&Guard::Netns));
    assert_eq!(res.outcome, Outcome::Exited { code: 3 });
    assert_eq!(stdout(&d), "out\n");
    assert_eq!(std::fs::read(d.top.join("stderr.txt")).unwrap(), b"err\n");
    assert_eq!((res.stdout_bytes, res.stderr_bytes), (4, 4));
    assert!(!res.stdout_truncated && !res.stderr_truncated);

    let res = r.run(&request(&d, "pwd")).await;
    assert_eq!(res.outcome, Outcome::Exited { code: 0 });
    assert_eq!(
        Path::new(stdout(&d).trim()).canonicalize().unwrap(),
        d.job.canonicalize().unwrap()
    );
}

#[tokio::test]
async fn killed_by_signal() {
    let d = dirs();
    let res = runner(62010).run(&request(&d, "kill -9 $$")).await;
    assert_eq!(res.outcome, Outcome::Killed { signal: 9 });
}

#[tokio::test]
async fn timeout_kills_the_whole_group() {
    let d = dirs();
    let r = runner(62020);
    let mut req = request(&d, "sleep 60 & echo $! > bg.pid; exec sleep 60");
    req.wall_time = Duration::from_secs(1);
    let res = r.run(&req).await;
    assert_eq!(res.verdict, Verdict::TimedOut(Clock::Wall));
    assert_eq!(res.outcome, Outcome::TimedOut);
    assert!(!alive(read_pid(&d.job, "bg.pid")).await);
    still_serves(&r, &d).await;
}

#[tokio::test]
async fn a_job_ignoring_sigterm_still_dies() {
    let d = dirs();
    let r = runner(62030);
    let mut req = request(
        &d,
        "trap '' TERM; echo $$ > sh.pid; while :; do sleep 1; done",
    );
    req.wall_time = Duration::from_secs(1);
    let res = r.run(&req).await;
    assert_eq!(res.verdict, Verdict::TimedOut(Clock::Wall));
    assert!(!alive(read_pid(&d.job, "sh.pid")).await);
    still_serves(&r, &d).await;
}

#[tokio::test]
async fn leftovers_die_when_the_payload_exits() {
    let d = dirs();
    let r = runner(62040);
    // The background sleep keeps no pipe open, so the run ends when sh exits.
    let script = "sleep 60 >/dev/null 2>&1 & echo $! > bg.pid";
    let res = r.run(&request(&d, script)).await;
    assert_eq!(res.verdict, Verdict::Exited(0));
    assert!(!alive(read_pid(&d.job, "bg.pid")).await);
    still_serves(&r, &d).await;
}

/// Runs `script` (which starts a daemon, writes its pid to `daemon.pid` and exits 0) and checks
/// that the daemon is gone after the job and the runner still serves.
async fn daemon_is_gone_afterwards(base_uid: u32, script: &str) {
    let d = dirs();
    let r = runner(base_uid);
    let res = r.run(&request(&d, script)).await;
    assert_eq!(res.verdict, Verdict::Exited(0), "{res:?}");
    let daemon = read_pid(&d.job, "daemon.pid");
    assert!(!alive(daemon).await, "daemon {daemon} survived the job");
    still_serves(&r, &d).await;
}

#[tokio::test]
async fn a_double_forked_daemon_is_gone_afterwards() {
    // The daemon leaves the group and the session, and its parent exits: only the subreaper
    // (or its uid) still ties it to the job.
    daemon_is_gone_afterwards(
        62050,
        "( setsid sleep 600 </dev/null >/dev/null 2>&1 & echo $! > daemon.pid ) ; \
         sleep 1; exit 0",
    )
    .await;
}

#[tokio::test]
async fn a_daemon_that_renames_itself_to_bytes_that_are_not_utf8_is_gone_afterwards() {
    // A looping shell that leaves group and session and gives itself the name 0xff 0xfe
    // (a process may write its own comm); its sleeps come and go.
    daemon_is_gone_afterwards(
        62220,
        "( setsid sh -c 'printf \"\\377\\376\" > /proc/self/comm; \
         while :; do sleep 1; done' </dev/null >/dev/null 2>&1 & echo $! > daemon.pid ); \
         sleep 1; exit 0",
    )
    .await;
}

#[tokio::test]
async fn output_flood_is_capped_and_drained() {
    let d = dirs();
    let r = runner(62060);
    let mut req = request(&d, "yes | head -c 5000000; echo done >&2");
    req.output_cap = 1000;
    let res = r.run(&req).await;
    // The payload finished on its own: the pipe was drained past the cap.
    assert_eq!(res.verdict, Verdict::Exited(0));
    assert_eq!(res.stdout_bytes, 1000);
    assert!(res.stdout_truncated);
    assert!(!res.stderr_truncated);
    assert_eq!(stdout(&d), "y\n".repeat(500));

    // An endless flood: capped, and the job ends at its wall time.
    let mut req = request(&d, "exec yes");
    req.output_cap = 1000;
    req.wall_time = Duration::from_secs(1);
    let res = r.run(&req).await;
    assert_eq!(res.verdict, Verdict::TimedOut(Clock::Wall));
    assert_eq!(res.stdout_bytes, 1000);
    assert!(res.stdout_truncated);
    still_serves(&r, &d).await;
}

#[tokio::test]
async fn environment_is_scrubbed() {
    let d = dirs();
    let mut req = request(&d, "");
    req.argv = vec!["env".into()];
    req.env.insert("SEED".into(), "42".into());
    let res = runner(62070).run(&req).await;
    assert_eq!(res.verdict, Verdict::Exited(0));
    let text = stdout(&d);
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
    let d = dirs();
    let mut req = request(&d, "");
    req.argv = vec!["/nonexistent/program".into()];
    let res = runner(62080).run(&req).await;
    assert!(
        matches!(&res.verdict, Verdict::SetupFailed(SandboxError::Spawn { program, .. }) if program == "/nonexistent/program"),
        "{res:?}"
    );
    assert!(
        matches!(&res.outcome, Outcome::SetupFailed(m) if m.contains("/nonexistent/program")),
        "{res:?}"
    );
    assert!(
        res.sandbox.is_empty(),
        "nothing ran, so nothing was protected"
    );

    req.argv = Vec::new();
    let res = runner(62080).run(&req).await;
    assert_eq!(res.verdict, Verdict::SetupFailed(SandboxError::NoProgram));
}

#[tokio::test]
async fn a_cpu_hog_is_stopped_at_its_cpu_time() {
    let d = dirs();
    let r = runner(62090);
    let mut req = request(&d, "exec awk 'BEGIN { while (1) n++ }'");
    req.cpu_time = Some(Duration::from_secs(1));
    let res = r.run(&req).await;
    assert_eq!(res.verdict, Verdict::TimedOut(Clock::Cpu), "{res:?}");
    assert_eq!(
        res.outcome,
        Outcome::LimitExceeded {
            limit: WireLimit::Cpu
        }
    );
    still_serves(&r, &d).await;
}

#[tokio::test]
async fn sigxcpu_and_sigxfsz_without_those_limits_are_plain_signals() {
    let d = dirs();
    let r = runner(62190);
    for (sig, num) in [("XCPU", 24), ("XFSZ", 25)] {
        let res = r.run(&request(&d, &format!("kill -{sig} $$"))).await;
        assert_eq!(res.verdict, Verdict::Killed(num), "{res:?}");
        assert_eq!(res.outcome, Outcome::Killed { signal: num });
    }
    still_serves(&r, &d).await;
}

#[tokio::test]
async fn a_disk_filler_is_stopped_at_its_file_size() {
    let d = dirs();
    let r = runner(62100);
    let mut req = request(&d, "exec head -c 10000000 /dev/zero > big");
    req.disk = Some(1 << 20);
    let res = r.run(&req).await;
    assert_eq!(res.verdict, Verdict::LimitExceeded(Limit::Disk), "{res:?}");
    assert_eq!(
        res.outcome,
        Outcome::LimitExceeded {
            limit: WireLimit::Disk
        }
    );
    assert!(std::fs::metadata(d.job.join("big")).unwrap().len() <= 1 << 20);
    still_serves(&r, &d).await;
}

#[tokio::test]
async fn a_memory_hog_fails_its_allocations() {
    let d = dirs();
    let r = runner(62110);
    // Doubles a string until an allocation fails.
    let mut req = request(&d, "exec awk 'BEGIN { s = \"x\"; while (1) s = s s }'");
    req.memory = Some(64 << 20);
    let res = r.run(&req).await;
    if cgroup::hierarchy().is_ok() {
        // The job's cgroup saw the OOM killer.
        assert_eq!(
            res.verdict,
            Verdict::LimitExceeded(Limit::Memory),
            "{res:?}"
        );
    } else {
        // Out of memory shows as the payload's own failure (an exit code or a crash signal),
        // never as success and never as running into the wall time.
        assert!(
            matches!(res.verdict, Verdict::Exited(c) if c != 0)
                || matches!(res.verdict, Verdict::Killed(_)),
            "{res:?}"
        );
        // mawk says why; the address-space limit is what stopped it.
        let stderr = std::fs::read_to_string(d.top.join("stderr.txt")).unwrap();
        assert!(stderr.contains("memory"), "{stderr:?}");
    }
    still_serves(&r, &d).await;
}

#[tokio::test]
async fn a_fork_bomb_is_bounded_and_cleaned_up() {
    if skip_unless_root("a_fork_bomb_is_bounded_and_cleaned_up") {
        // Without a per-job uid RLIMIT_NPROC cannot bound it: not run at all.
        return;
    }
    let d = dirs();
    let r = runner(62120);
    let mut req = request(&d, "b() { b | b & }; b; sleep 1; exit 0");
    req.processes = Some(32);
    req.wall_time = Duration::from_secs(10);
    let res = r.run(&req).await;
    // The leader either got to its exit or (forks failing) ran into the wall time; either
    // way, nothing of the bomb is left.
    assert!(
        matches!(
            res.verdict,
            Verdict::Exited(_)
                | Verdict::TimedOut(Clock::Wall)
                | Verdict::LimitExceeded(Limit::Processes)
        ),
        "{res:?}"
    );
    // The limit is what stopped it: forks failed.
    let stderr = std::fs::read_to_string(d.top.join("stderr.txt")).unwrap();
    assert!(stderr.contains("fork"), "{stderr:?}");
    assert!(res.sandbox.active.contains(&Guard::Nproc), "{res:?}");
    still_serves(&r, &d).await;
}

#[tokio::test]
async fn a_job_cannot_read_a_root_only_file() {
    if skip_unless_root("a_job_cannot_read_a_root_only_file") {
        return;
    }
    let d = dirs();
    let r = runner(62130);
    // Readable only by root, in a dir anyone may pass through: only the mode keeps the job out.
    let secret_dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(secret_dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let secret = secret_dir.path().join("agent.toml");
    std::fs::write(&secret, "password = \"hunter2\"\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let res = r
        .run(&request(&d, &format!("cat {}", secret.display())))
        .await;
    assert!(
        matches!(res.verdict, Verdict::Exited(c) if c != 0),
        "{res:?}"
    );
    assert!(!stdout(&d).contains("hunter2"));
    still_serves(&r, &d).await;
}

#[tokio::test]
async fn a_job_cannot_kill_the_agent() {
    if skip_unless_root("a_job_cannot_kill_the_agent") {
        return;
    }
    let d = dirs();
    let r = runner(62140);
    let me = std::process::id();
    let res = r
        .run(&request(&d, &format!("kill -KILL {me} 2>&1; echo rc=$?")))
        .await;
    assert_eq!(res.verdict, Verdict::Exited(0), "{res:?}");
    let out = stdout(&d);
    assert!(
        out.contains("not permitted") && out.contains("rc=1"),
        "{out}"
    );
    still_serves(&r, &d).await;
}

#[tokio::test]
async fn a_job_runs_as_its_slot_uid_without_groups() {
    if skip_unless_root("a_job_runs_as_its_slot_uid_without_groups") {
        return;
    }
    let d = dirs();
    let r = runner(62150);
    let res = r.run(&request(&d, "id -u; id -g; id -G; touch mine")).await;
    assert_eq!(res.verdict, Verdict::Exited(0), "{res:?}");
    assert_eq!(stdout(&d), "62150\n62150\n62150\n");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(d.job.join("mine")).unwrap().uid(), 62150);
}

#[tokio::test]
async fn setuid_binaries_give_no_privileges() {
    let d = dirs();
    let res = runner(62160)
        .run(&request(&d, "grep NoNewPrivs /proc/self/status"))
        .await;
    assert_eq!(res.verdict, Verdict::Exited(0), "{res:?}");
    assert_eq!(stdout(&d), "NoNewPrivs:\t1\n");
}

#[tokio::test]
async fn a_wide_process_tree_is_killed_whole() {
    let d = dirs();
    let r = runner(62170);
    // 200 sleepers, each in its own session (out of the group), then the leader exits.
    let script = "i=0; while [ $i -lt 200 ]; do setsid sleep 600 </dev/null >/dev/null 2>&1 & \
                  i=$((i + 1)); done; echo $! > last.pid";
    let mut req = request(&d, script);
    req.processes = Some(1000);
    let res = r.run(&req).await;
    assert_eq!(res.verdict, Verdict::Exited(0), "{res:?}");
    assert!(!alive(read_pid(&d.job, "last.pid")).await);
    still_serves(&r, &d).await;
}

/// A `network = false` job reaches nothing, not even a listener of the agent's host on
/// 127.0.0.1, and sees no interface but `lo`; the same job with network gets through.
#[tokio::test]
async fn a_job_without_network_cannot_connect() {
    if let Err(why) = netns::isolation() {
        println!("a_job_without_network_cannot_connect: skipped: {why}");
        return;
    }
    if !Path::new("/bin/bash").exists() {
        println!("a_job_without_network_cannot_connect: skipped: no /bin/bash for /dev/tcp");
        return;
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let script = format!(
        "if bash -c 'echo hi > /dev/tcp/127.0.0.1/{port}' 2>/dev/null; \
         then echo connected; else echo refused; fi; \
         sed 1,2d /proc/net/dev | cut -d: -f1 | tr -d ' ' | sort | tr '\\n' ' '"
    );
    let d = dirs();
    let r = runner(62200);

    let mut req = request(&d, &script);
    req.network = false;
    let res = r.run(&req).await;
    assert_eq!(res.verdict, Verdict::Exited(0), "{res:?}");
    assert_eq!(stdout(&d), "refused\nlo ");
    assert!(listener.accept().is_err(), "nothing may have connected");
    assert!(res.sandbox.active.contains(&Guard::Netns), "{res:?}");

    req.network = true;
    let res = r.run(&req).await;
    assert_eq!(res.verdict, Verdict::Exited(0), "{res:?}");
    let out = stdout(&d);
    assert!(out.starts_with("connected\n"), "{out}");
    assert_ne!(
        out, "connected\nlo ",
        "the host has more than a loopback device"
    );
    assert!(listener.accept().is_ok(), "the networked job connected");
    assert!(!res.sandbox.active.contains(&Guard::Netns), "{res:?}");
    still_serves(&r, &d).await;
}

#[test]
fn cgroup_events_turn_failures_into_limits() {
    let oom = cgroup::Events {
        oom_kills: 1,
        pids_max: 0,
    };
    let forks = cgroup::Events {
        oom_kills: 0,
        pids_max: 3,
    };
    let quiet = cgroup::Events::default();
    let mem = Verdict::LimitExceeded(Limit::Memory);
    assert_eq!(cgroup_verdict(Verdict::Killed(9), oom), mem);
    assert_eq!(cgroup_verdict(Verdict::Exited(137), oom), mem);
    assert_eq!(
        cgroup_verdict(Verdict::Exited(2), forks),
        Verdict::LimitExceeded(Limit::Processes)
    );
    // A job that coped (exit 0), or ended for another reason, keeps its verdict.
    assert_eq!(cgroup_verdict(Verdict::Exited(0), oom), Verdict::Exited(0));
    let wall = Verdict::TimedOut(Clock::Wall);
    assert_eq!(cgroup_verdict(wall.clone(), oom), wall);
    assert_eq!(
        cgroup_verdict(Verdict::Killed(9), quiet),
        Verdict::Killed(9)
    );
}

/// Where the host has cgroup v2 for the agent: memory is bounded per job, not per process
/// (two processes of 32-48 MiB each under a 64 MiB limit).
#[tokio::test]
async fn a_job_cgroup_bounds_the_whole_job() {
    if let Err(why) = cgroup::hierarchy() {
        println!("a_job_cgroup_bounds_the_whole_job: skipped: {why}");
        return;
    }
    let d = dirs();
    let r = runner(62210);
    // 2^25 bytes = 32 MiB, 48 MiB at the last doubling.
    let hog = "awk 'BEGIN { s = \"x\"; for (i = 0; i < 25; i++) s = s s; system(\"sleep 5\") }'";
    // Fails (137) when the OOM killer took either hog.
    let mut req = request(
        &d,
        &format!("{hog} & a=$!; {hog} & b=$!; wait $a && wait $b"),
    );
    req.memory = Some(64 << 20);
    let res = r.run(&req).await;
    assert!(res.sandbox.active.contains(&Guard::Cgroup), "{res:?}");
    assert_eq!(
        res.verdict,
        Verdict::LimitExceeded(Limit::Memory),
        "{res:?}"
    );
    still_serves(&r, &d).await;
}

/// Not a test: spawn-to-exit of `true` in the sandbox vs a bare fork/exec, and the time to
/// kill a 1000-process tree. `cargo test -p copilot-agent --release -- --ignored --nocapture
/// sandbox_costs`.
#[tokio::test]
#[ignore = "benchmark; run by hand"]
async fn sandbox_costs() {
    let d = dirs();
    let r = runner(62180);
    let n = 200u32;
    let t = Instant::now();
    for _ in 0..n {
        let st = std::process::Command::new("true").status().unwrap();
        assert!(st.success());
    }
    let bare = t.elapsed() / n;
    let mut req = request(&d, "");
    req.argv = vec!["true".into()];
    let t = Instant::now();
    for _ in 0..n {
        assert_eq!(r.run(&req).await.verdict, Verdict::Exited(0));
    }
    let sandboxed = t.elapsed() / n;
    println!(
        "true: bare fork/exec {bare:?}, sandbox {sandboxed:?} (root: {})",
        is_root()
    );

    let script = "i=0; while [ $i -lt 1000 ]; do sleep 600 </dev/null >/dev/null 2>&1 & \
                  i=$((i + 1)); done; echo started; exec sleep 600";
    let mut req = request(&d, script);
    req.processes = Some(2000);
    req.wall_time = Duration::from_secs(10);
    req.stdout_path = d.top.join("tree.txt");
    let res = r.run(&req).await;
    assert_eq!(res.verdict, Verdict::TimedOut(Clock::Wall));
    assert_eq!(
        std::fs::read_to_string(d.top.join("tree.txt")).unwrap(),
        "started\n"
    );
    println!(
        "1000-process tree: {:?} from the wall time to the end of the run (SIGTERM, sweep, drain)",
        res.duration.saturating_sub(req.wall_time)
    );
    still_serves(&r, &d).await;
}
