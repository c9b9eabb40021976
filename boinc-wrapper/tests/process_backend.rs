//! The process backend on real processes: a stand-in "agent" (a shell script) that starts a
//! busy child in a session of its own and an orphaned grandchild, as payloads do. One test
//! function, because the backend reaps any child of the test process (waitpid(-1)).

use std::path::Path;
use std::time::{Duration, Instant};

use copilot_boinc::backend::process::{become_subreaper, ProcessBackend};
use copilot_boinc::backend::{Backend, Checkpoint, Exit};
use copilot_boinc::proctree;

fn wait(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A fake agent: `--config FILE` is ignored; it starts a busy loop in a new session and an
/// orphan (a sleeper whose parent exits), drains on SIGUSR1 (writes a marker, exits 0) and
/// exits 0 on SIGTERM.
fn fake_agent(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("fake-agent");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\n\
             trap 'echo drained > {dir}/drained; exit 0' USR1\n\
             trap 'exit 0' TERM\n\
             setsid sh -c 'while :; do :; done' &\n\
             sh -c 'sleep 600 & exit 0'\n\
             while :; do sleep 0.05; done\n",
            dir = dir.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn tree() -> Vec<proctree::Proc> {
    proctree::mine()
}

#[test]
fn the_process_backend_controls_the_whole_tree() {
    become_subreaper().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let agent = fake_agent(dir.path());
    let config = dir.path().join("agent.toml");

    // Suspend stops everything, resume continues, CPU counts the tree.
    let mut b = ProcessBackend::start(&agent, &config, dir.path()).unwrap();
    assert!(b.pid().is_some());
    // agent + busy loop + orphaned sleeper (reparented to us) + the agent's sleep.
    wait("the tree to form", || tree().len() >= 4);
    assert_eq!(b.checkpoint().unwrap(), Checkpoint::Busy, "a payload runs");
    b.suspend().unwrap();
    let stopped = tree();
    assert!(
        stopped.iter().all(|p| p.stopped() || p.dead()),
        "{stopped:?}"
    );
    let cpu = b.cpu_seconds();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(b.poll().unwrap(), None);
    let frozen: Vec<f64> = tree().iter().map(|p| p.cpu_seconds).collect();
    assert_eq!(
        frozen,
        stopped.iter().map(|p| p.cpu_seconds).collect::<Vec<_>>()
    );
    b.resume().unwrap();
    wait("the busy loop to compute again", || {
        b.cpu_seconds() > cpu + 0.1
    });

    // Drain reaches the agent, which ends with 0; stop then cleans up the strays.
    b.drain().unwrap();
    wait("the agent to drain", || b.poll().unwrap().is_some());
    assert!(dir.path().join("drained").exists());
    assert_eq!(b.stop(Duration::from_secs(1)).unwrap(), Exit::Code(0));
    wait("the strays to be gone", || tree().is_empty());

    // Stop while suspended: the agent is continued so it can take SIGTERM.
    let mut b = ProcessBackend::start(&agent, &config, dir.path()).unwrap();
    wait("the tree to form", || tree().len() >= 4);
    b.suspend().unwrap();
    assert_eq!(b.stop(Duration::from_secs(5)).unwrap(), Exit::Code(0));
    assert!(tree().is_empty(), "{:?}", tree());

    // Kill leaves nothing, orphans included.
    let mut b = ProcessBackend::start(&agent, &config, dir.path()).unwrap();
    wait("the tree to form", || tree().len() >= 4);
    b.kill().unwrap();
    wait("everything to be gone", || tree().is_empty());
    assert_eq!(b.poll().unwrap(), Some(Exit::Signal(9)));

    // An agent with no payload below it loses nothing when stopped.
    let idle = dir.path().join("idle-agent");
    std::fs::write(&idle, "#!/bin/sh\nexec sleep 30\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&idle, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut b = ProcessBackend::start(&idle, &config, dir.path()).unwrap();
    assert_eq!(b.checkpoint().unwrap(), Checkpoint::NothingToLose);
    b.kill().unwrap();

    // A program that cannot start is an error, not a panic.
    assert!(ProcessBackend::start(&dir.path().join("nope"), &config, dir.path()).is_err());
}
