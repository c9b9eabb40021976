//! Faults in the middle of a batch, survived: kill -9 of an agent, of the manager and of the
//! XMPP server; a 30 s network partition between the agents and the servers; the storage
//! side's disk full; uploads cut in the middle. For each, every job ends done and verified
//! (0 lost), the manager records each result once (0 recorded twice: one `→ done` in the job's
//! durable history, one copy of each file), and every agent is back at work after the fault;
//! each test prints these counts and how long the agents took to come back.
//!
//! `cargo test --workspace fault` runs them all.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use copilot_protocol::api::JobView;
use copilot_protocol::summary::JobEvents;
use copilot_protocol::units::Seconds;
use copilot_protocol::{JobId, JobState};
use copilot_tests::squares::{check_square, squares, SQUARE_SH};
use copilot_tests::{Harness, Setup};

/// Agents in every fault test.
const AGENTS: usize = 2;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64
}

/// A stack with short leases and holds, so a fault's consequences show within seconds.
fn setup(links: bool, manager_toml: &str) -> Setup {
    Setup {
        agents: AGENTS,
        lease: Seconds(10),
        // Top-level keys first: `manager_toml` may set some.
        manager_toml: Some(format!("{manager_toml}[jobs]\nhold = \"5s\"\n")),
        links,
        ..Setup::default()
    }
}

/// What a fault did to a batch.
struct Tally {
    jobs: usize,
    lost: usize,
    twice: usize,
    retried: usize,
    /// Per agent: seconds from the end of the fault to its first assignment after it.
    back: Vec<(String, Option<f64>)>,
}

impl Tally {
    fn print_and_check(&self, fault: &str) {
        let back: Vec<String> = self
            .back
            .iter()
            .map(|(a, s)| match s {
                Some(s) => format!("{a} after {s:.1} s"),
                None => format!("{a} never"),
            })
            .collect();
        println!(
            "fault {fault}: {} jobs, {} lost, {} recorded twice, {} needed another attempt; back to work: {}",
            self.jobs,
            self.lost,
            self.twice,
            self.retried,
            back.join(", ")
        );
        assert_eq!(self.lost, 0, "{fault}: jobs lost");
        assert_eq!(self.twice, 0, "{fault}: results recorded twice");
        for (a, s) in &self.back {
            assert!(s.is_some(), "{fault}: {a} did not get back to work");
        }
    }
}

/// How many times the manager's durable history says the job became done.
fn times_done(h: &Harness, id: JobId) -> usize {
    let ev: JobEvents = h.api(&format!("/api/jobs/{id}/events"));
    ev.events.iter().filter(|e| e.to == JobState::Done).count()
}

/// When each agent was first assigned a job after `since_ms` (from the jobs' histories).
fn back_to_work(h: &Harness, ids: &[JobId], since_ms: u64) -> Vec<(String, Option<f64>)> {
    let histories: Vec<JobEvents> = ids
        .iter()
        .map(|id| h.api(&format!("/api/jobs/{id}/events")))
        .collect();
    (1..=h.stack.agent_count())
        .map(copilot_stack::LocalStack::agent_name)
        .map(|agent| {
            let why = format!("assigned to {agent}");
            let first = histories
                .iter()
                .flat_map(|h| &h.events)
                .filter(|e| e.at_ms >= since_ms && e.why == why)
                .map(|e| e.at_ms)
                .min();
            (agent, first.map(|t| (t - since_ms) as f64 / 1000.0))
        })
        .collect()
}

/// Wait for the batch `ids` to end, then run a second small batch so every agent shows it is
/// back at work; count what the fault (over at `healed_ms`) did. `check` verifies each job's
/// results.
fn tally(h: &Harness, ids: &[JobId], healed_ms: u64, check: impl Fn(&Harness, &JobView)) -> Tally {
    let jobs = h.wait_final(ids, Duration::from_secs(240));
    let lost = jobs.iter().filter(|j| j.state != JobState::Done).count();
    let mut twice = 0;
    for j in &jobs {
        let mut paths: Vec<&str> = j.files.iter().map(|f| f.path.as_str()).collect();
        paths.sort_unstable();
        paths.dedup();
        if times_done(h, j.id) > 1 || paths.len() != j.files.len() {
            twice += 1;
        }
        if j.state == JobState::Done {
            check(h, j);
        }
    }
    let retried = jobs.iter().filter(|j| j.attempt > 1).count();
    // Each agent picks up work again: jobs long enough that no agent can take them all.
    let job = h.write_job(
        &format!("after-{healed_ms}"),
        &squares(2 * AGENTS as u32, "1"),
        &[("square.sh", SQUARE_SH)],
    );
    let after = h.submit(&job);
    let all: Vec<JobId> = ids.iter().chain(&after).copied().collect();
    for j in h.wait_final(&after, Duration::from_secs(180)) {
        check_square(h, &j);
    }
    Tally {
        jobs: jobs.len(),
        lost,
        twice,
        retried,
        back: back_to_work(h, &all, healed_ms),
    }
}

/// Submit `count` square jobs, wait until `done_before` are done, run `fault` (which returns
/// once the fault is over), and tally.
fn square_batch_through(
    h: &mut Harness,
    count: u32,
    done_before: usize,
    fault: impl FnOnce(&mut Harness),
) -> Tally {
    let job = h.write_job("batch", &squares(count, "0.3"), &[("square.sh", SQUARE_SH)]);
    let ids = h.submit(&job);
    h.wait_for("the batch to get going", Duration::from_secs(60), |l| {
        l.jobs.iter().filter(|j| j.state == JobState::Done).count() >= done_before
    });
    fault(h);
    let healed = now_ms();
    tally(h, &ids, healed, check_square)
}

/// The number of the agent running a job now.
fn a_busy_agent(h: &Harness) -> usize {
    let list = h.wait_for("a job to run", Duration::from_secs(30), |l| {
        l.jobs.iter().any(|j| j.state == JobState::Running)
    });
    let name = list
        .jobs
        .iter()
        .find(|j| j.state == JobState::Running)
        .and_then(|j| j.agent.clone())
        .expect("a running job has an agent");
    (1..=h.stack.agent_count())
        .find(|n| copilot_stack::LocalStack::agent_name(*n) == name)
        .expect("the agent is one of the stack's")
}

#[test]
fn fault_kill9_of_an_agent_mid_batch() {
    let mut h = Harness::start(setup(false, ""));
    let t = square_batch_through(&mut h, 16, 3, |h| {
        let n = a_busy_agent(h);
        h.stack.kill_agent(n).unwrap();
        // The volunteer's machine comes back a little later.
        sleep(Duration::from_secs(2));
        h.stack.start_agent(n).unwrap();
    });
    t.print_and_check("kill -9 of an agent");
    assert!(t.retried >= 1, "the killed agent's job ran again elsewhere");
}

#[test]
fn fault_kill9_of_the_manager_mid_batch() {
    let mut h = Harness::start(setup(false, ""));
    let t = square_batch_through(&mut h, 16, 3, |h| {
        h.stack.kill_manager().unwrap();
        sleep(Duration::from_secs(2));
        h.stack.start_manager().unwrap();
    });
    t.print_and_check("kill -9 of the manager");
}

#[test]
fn fault_kill9_of_the_xmpp_server_mid_batch() {
    let mut h = Harness::start(setup(false, ""));
    let t = square_batch_through(&mut h, 16, 3, |h| {
        h.stack.prosody().kill().unwrap();
        sleep(Duration::from_secs(2));
        h.stack.prosody().restart().unwrap();
    });
    t.print_and_check("kill -9 of the XMPP server");
}

#[test]
fn fault_network_partition_of_30_s_between_agents_and_servers() {
    let mut h = Harness::start(setup(true, ""));
    let t = square_batch_through(&mut h, 16, 3, |h| {
        let (xmpp, http) = (
            h.stack.xmpp_link().expect("links"),
            h.stack.http_link().expect("links"),
        );
        xmpp.cut();
        http.cut();
        sleep(Duration::from_secs(30));
        xmpp.heal();
        http.heal();
    });
    t.print_and_check("30 s network partition");
    // The partition outlasted the 10 s lease: the jobs the agents held were requeued.
    assert!(t.retried >= 1, "no job was held across the partition");
}

/// A job whose output is 512 KiB of random bytes beside its square, so its upload is long
/// enough to be cut in the middle.
fn big_squares(count: u32) -> (String, String) {
    let job = squares(count, "0.3").replace(
        "outputs = [\"square.txt\"]",
        "outputs = [\"square.txt\", \"noise.bin\"]",
    );
    let script = format!("head -c 524288 /dev/urandom > noise.bin\n{SQUARE_SH}");
    (job, script)
}

#[test]
fn fault_uploads_cut_in_the_middle() {
    let h = Harness::start(setup(true, ""));
    let link = h.stack.http_link().expect("links");
    let (job, script) = big_squares(8);
    let job = h.write_job("big", &job, &[("square.sh", &script)]);
    // The next three connections that carry more than 128 KiB towards the manager (uploads:
    // everything else an agent sends is a few hundred bytes) end right there.
    link.cut_streams_after(128 * 1024, 3);
    let ids = h.submit(&job);
    let t = tally(&h, &ids, now_ms(), |h, j| {
        check_square(h, j);
        let noise = h.path(&format!("results-{}", j.id)).join("noise.bin");
        assert_eq!(std::fs::metadata(noise).unwrap().len(), 524_288);
    });
    println!("uploads cut in the middle: {}", link.streams_cut());
    assert_eq!(link.streams_cut(), 3, "all three cuts happened");
    t.print_and_check("uploads cut in the middle");
}

/// A tmpfs of `mib` MiB mounted at `dir` (as root); unmounted on drop.
struct SmallDisk {
    dir: PathBuf,
}

impl SmallDisk {
    fn mount(dir: &Path, mib: u32) -> SmallDisk {
        std::fs::create_dir_all(dir).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("running mount");
        assert!(st.success(), "mount -t tmpfs failed ({st})");
        SmallDisk {
            dir: dir.to_owned(),
        }
    }

    /// Fill the disk with one file until writing fails; returns the file.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.dir.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let block = vec![0x5a_u8; 64 * 1024];
        while f.write_all(&block).is_ok() {}
        // The last bytes a block did not fit.
        while f.write_all(&block[..512]).is_ok() {}
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

#[test]
fn fault_disk_full_on_the_storage_side() {
    if !nix::unistd::geteuid().is_root() {
        println!("skipped: mounting a small tmpfs for the manager's data needs root");
        return;
    }
    let disk_dir = tempfile::Builder::new()
        .prefix("copilot-disk-")
        .tempdir()
        .unwrap();
    let disk = SmallDisk::mount(&disk_dir.path().join("data"), 64);
    let mut h = Harness::start(setup(
        false,
        &format!("data_dir = {:?}\n", disk.dir.to_str().unwrap()),
    ));
    let t = square_batch_through(&mut h, 16, 3, |_| {
        let filler = disk.fill();
        // Nothing more fits, for 10 s: uploads, and the queue's own writes, fail meanwhile.
        sleep(Duration::from_secs(10));
        std::fs::remove_file(filler).unwrap();
    });
    t.print_and_check("disk full on the storage side");
    let log = std::fs::read_to_string(h.stack.dir().join("logs").join("manager.log")).unwrap();
    let full_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("storage full") || l.contains("disk is full"))
        .collect();
    println!(
        "manager log lines saying the disk was full: {}",
        full_lines.len()
    );
    let full = full_lines.len();
    assert!(full > 0, "the manager never hit the full disk");
    // HTTP writes that met the full disk were refused as 507, which agents retry.
    assert!(
        full_lines
            .iter()
            .any(|l| l.contains("storage full, refusing a write")),
        "{full_lines:#?}"
    );
    drop(h);
    drop(disk);
}
