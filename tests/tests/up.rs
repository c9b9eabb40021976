//! `copilot up` runs a whole local stack in the foreground; Ctrl-C (SIGINT) or SIGTERM stops every
//! process it started: nothing is left running.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use copilot_tests::bin_dir;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Pids of processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmdline).contains(needle) {
            pids.push(pid);
        }
    }
    pids
}

fn stops_everything_on(signal: Signal) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("stack");
    let dir_str = dir.to_str().unwrap().to_owned();
    let mut up = Command::new(bin_dir().join("copilot"))
        .args(["up", "--dir", &dir_str, "--agents", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = up.stdout.take().unwrap();
    let online = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .any(|l| l.contains("agent(s) online"));
    assert!(online, "copilot up did not report its agents online");

    // Prosody, the manager and the agents all run with paths inside the state dir.
    let running = processes_mentioning(&dir_str);
    assert!(
        running.len() >= 4,
        "expected prosody, manager and 2 agents, found {running:?}"
    );

    kill(Pid::from_raw(up.id() as i32), signal).unwrap();
    let status = up.wait().unwrap();
    assert!(status.success(), "copilot up exited with {status}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = processes_mentioning(&dir_str);
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "processes left behind: {left:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(Path::new(&dir).join("client.toml").is_file());
}

#[test]
fn ctrl_c_stops_the_whole_stack() {
    stops_everything_on(Signal::SIGINT);
}

#[test]
fn sigterm_stops_the_whole_stack() {
    stops_everything_on(Signal::SIGTERM);
}
