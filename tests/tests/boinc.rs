//! Debian's real BOINC client runs `copilot-boinc-wrapper` (process backend) against a real
//! Prosody and manager, with no BOINC project server (see `copilot_tests::boinc`): suspend
//! stops every process of the session and resume continues it; quit and restart lose no
//! finished job; abort leaves no process behind; a killed client takes the wrapper and the
//! agent with it; a session drains at its end, finishes its job and credits the volunteer; a
//! broken job file fails the task with BOINC's init-failure code and the reason.
//! Each of those prints `skipped:` where the client is not installed. And an agent drains by
//! itself at its configured drain time.
//!
//! The qemu backend, with the VM image packaged by `scripts/package-boinc-app --image`: suspend
//! pauses QEMU (its virtual CPU's thread uses no CPU time) and resume continues it; quit saves
//! the VM's state and the restarted task restores it without a reboot, its agent logging in
//! again; a state that does not load is dropped for a fresh boot; abort leaves no QEMU, socket
//! or state file; a job runs end to end in the VM, which checkpoints and runs on, and the
//! session's end powers it off. These fail (they do not skip) without the image or QEMU.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use copilot_boinc::proctree;
use copilot_protocol::api::VolunteerList;
use copilot_protocol::units::Seconds;
use copilot_protocol::JobState;
use copilot_stack::XMPP_DOMAIN;
use copilot_tests::boinc::{self, wait_for, App, BoincClient};
use copilot_tests::vm;
use copilot_tests::{bin_dir, Harness, Setup};

/// A stack with no agents of its own, and a BOINC client whose task runs the agent.
struct Rig {
    client: BoincClient,
    h: Harness,
}

impl Drop for Rig {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- client log:\n{}\n--- task stderr:\n{}\n--- manager log:\n{}",
                self.client.log(),
                self.client.stderr(),
                self.h.log_tail("manager")
            );
        }
    }
}

/// Start the stack and write the client's data dir; None (after printing why) if the client
/// is not installed.
fn rig(test: &str, job_xml: &str) -> Option<Rig> {
    rig_with(test, job_xml, Some("7.20.5"), None, None)
}

/// `scripts/package-boinc-app --bin-dir … --out DIR ARGS…`: the package's `anonymous/` dir.
fn package(out: &std::path::Path, args: &[&str]) -> std::path::PathBuf {
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/package-boinc-app");
    let status = std::process::Command::new(script)
        .arg("--bin-dir")
        .arg(bin_dir())
        .arg("--out")
        .arg(out)
        .args(args)
        .status()
        .expect("running scripts/package-boinc-app");
    assert!(status.success());
    out.join("anonymous")
}

/// A rig running the app as `scripts/package-boinc-app --image` packages it (qemu backend;
/// on the anonymous platform, so that the client allows network use, which a hand-made
/// unsigned app version never gets), with a manager that gives the guest its 10.0.2.2
/// address. The image and QEMU must be there: without them the test fails (scripts/test
/// installs and builds them).
fn vm_rig(test: &str, job_xml: &str, out: &std::path::Path) -> Option<Rig> {
    let image = vm::image().unwrap_or_else(|why| panic!("{test}: no VM image: {why}"));
    let qemu = vm::qemu().unwrap_or_else(|why| panic!("{test}: {why}"));
    let job = out.join("job.xml");
    std::fs::write(&job, job_xml).unwrap();
    let anonymous = package(
        &out.join("app"),
        &[
            "--image",
            image.to_str().unwrap(),
            "--job",
            job.to_str().unwrap(),
        ],
    );
    rig_with(test, job_xml, None, Some(&anonymous), Some(&qemu))
}

fn rig_with(
    test: &str,
    job_xml: &str,
    api_version: Option<&str>,
    anonymous: Option<&std::path::Path>,
    qemu: Option<&std::path::Path>,
) -> Option<Rig> {
    if !boinc::client_installed() {
        println!("{test}: skipped: the BOINC client (boinc, boinccmd) is not installed; scripts/install-deps installs it");
        return None;
    }
    let mut h = Harness::start(Setup {
        agents: 0,
        lease: Seconds(10),
        manager_toml: Some("[jobs]\nhold = \"2s\"\nretry_after = \"1s\"\n".into()),
        public_host: qemu.map(|_| vm::HOST.to_owned()),
        ..Setup::default()
    });
    let password = "boinc-agent-pw";
    h.stack
        .prosody()
        .register("boinc-agent", password)
        .expect("registering the agent's account");
    let agent_toml = format!(
        "[xmpp]\njid = \"boinc-agent@{XMPP_DOMAIN}\"\npassword = \"{password}\"\nserver = \"{}\"\nmanager = \"manager@{XMPP_DOMAIN}\"\nca_pem = '''{}'''\n{}",
        h.stack.prosody().server(),
        h.stack.ca_pem(),
        h.stack.agent_trust_toml()
    );
    let bins = bin_dir();
    assert!(
        bins.join(boinc::WRAPPER_BIN).is_file(),
        "build the binaries first (cargo build --workspace --bins)"
    );
    let client = BoincClient::create(
        &h.path("boinc"),
        &App {
            bin_dir: &bins,
            job_xml,
            agent_toml: &agent_toml,
            api_version,
            anonymous,
            qemu,
        },
    );
    Some(Rig { client, h })
}

const JOB_XML: &str = "<copilot_job><session>1h</session><drain>10m</drain><stop_grace>10s</stop_grace></copilot_job>";

/// A job file: `count` instances of `script`.
fn job(name: &str, count: u32, script: &str) -> String {
    format!(
        "name = \"{name}\"\ncommand = [\"sh\", \"-c\", {script:?}]\noutputs = [\"out.txt\"]\ncount = {count}\n[limits]\nwall_time = \"5m\"\n"
    )
}

/// The wrapper's descendants: the agent and its payloads.
fn session_tree(wrapper: i32) -> Vec<proctree::Proc> {
    proctree::descendants(&proctree::scan(), wrapper)
}

/// Wait until the task's wrapper runs; its pid.
fn wrapper_started(r: &Rig) -> i32 {
    let mut pid = None;
    wait_for(
        "the client to start the wrapper",
        Duration::from_secs(30),
        || {
            pid = r.client.wrapper_pid();
            pid.is_some()
        },
    );
    pid.expect("set by the wait")
}

/// Wait until the client has the task's result ready to report; check its exit status.
fn task_ended_with(r: &Rig, exit_status: &str) {
    wait_for("the task to end", Duration::from_secs(60), || {
        r.client
            .task_info()
            .get("ready to report")
            .is_some_and(|v| v == "yes")
    });
    let info = r.client.task_info();
    assert_eq!(
        info.get("exit_status").map(String::as_str),
        Some(exit_status),
        "{info:?}"
    );
}

fn wait_state(r: &Rig, what: &str, ids: &[u64], state: JobState) {
    r.h.wait_for(what, Duration::from_secs(60), |l| {
        ids.iter()
            .all(|id| l.jobs.iter().any(|j| j.id == *id && j.state == state))
    });
}

/// The `took_ms=` values of the wrapper's log lines that contain `what`.
fn took_ms(log: &str, what: &str) -> Vec<Duration> {
    log.lines()
        .filter(|l| l.contains(what))
        .filter_map(|l| {
            l.split("took_ms=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .map(Duration::from_millis)
        .collect()
}

#[test]
fn suspend_stops_the_whole_session_resume_continues_abort_leaves_nothing() {
    let Some(mut r) = rig("suspend_resume_abort", JOB_XML) else {
        return;
    };
    let file =
        r.h.write_job("busy", &job("busy", 1, "while :; do :; done"), &[]);
    let ids = r.h.submit(&file);
    r.client.start();
    let wrapper = wrapper_started(&r);
    wait_state(&r, "the busy job to run", &ids, JobState::Running);

    r.client.task("suspend");
    wait_for(
        "every process of the session to stop",
        Duration::from_secs(30),
        || {
            let tree = session_tree(wrapper);
            tree.len() >= 2 && tree.iter().all(|p| p.stopped())
        },
    );
    // Stopped processes use no CPU: over a second, not one clock tick.
    let before: BTreeMap<i32, f64> = session_tree(wrapper)
        .iter()
        .map(|p| (p.pid, p.cpu_seconds))
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let after: BTreeMap<i32, f64> = session_tree(wrapper)
        .iter()
        .map(|p| (p.pid, p.cpu_seconds))
        .collect();
    assert_eq!(before, after, "CPU time moved while suspended");
    assert!(
        !proctree::scan()
            .iter()
            .any(|p| p.pid == wrapper && p.stopped()),
        "the wrapper itself keeps talking to the client"
    );

    r.client.task("resume");
    let total = |t: &[proctree::Proc]| t.iter().map(|p| p.cpu_seconds).sum::<f64>();
    let suspended_cpu = total(&session_tree(wrapper));
    wait_for(
        "the session to compute again",
        Duration::from_secs(30),
        || {
            let tree = session_tree(wrapper);
            tree.iter().all(|p| !p.stopped()) && total(&tree) > suspended_cpu + 0.2
        },
    );

    let pids: Vec<i32> = std::iter::once(wrapper)
        .chain(session_tree(wrapper).iter().map(|p| p.pid))
        .collect();
    r.client.task("abort");
    wait_for(
        "the wrapper, the agent and the payload to be gone",
        Duration::from_secs(30),
        || pids.iter().all(|p| !proctree::alive(*p)),
    );
    // The result records the abort as the client does for any user abort (203).
    task_ended_with(&r, "203");
    // The job the agent held is not lost: the manager requeues it.
    wait_state(
        &r,
        "the aborted session's job to be requeued",
        &ids,
        JobState::Queued,
    );
}

#[test]
fn quit_and_restart_keep_every_finished_job() {
    let Some(mut r) = rig("quit_and_restart", JOB_XML) else {
        return;
    };
    let file = r.h.write_job(
        "short",
        &job("short", 6, "sleep 0.5; echo $COPILOT_INSTANCE > out.txt"),
        &[],
    );
    let ids = r.h.submit(&file);
    r.client.start();
    let wrapper = wrapper_started(&r);
    r.h.wait_for("two jobs to be done", Duration::from_secs(60), |l| {
        l.jobs.iter().filter(|j| j.state == JobState::Done).count() >= 2
    });
    let tree: Vec<i32> = session_tree(wrapper).iter().map(|p| p.pid).collect();
    r.client.quit();
    wait_for(
        "the wrapper and the agent to exit with the client",
        Duration::from_secs(30),
        || !proctree::alive(wrapper) && tree.iter().all(|p| !proctree::alive(*p)),
    );
    let done_before: Vec<u64> =
        r.h.jobs()
            .jobs
            .iter()
            .filter(|j| j.state == JobState::Done)
            .map(|j| j.id)
            .collect();

    r.client.start();
    wrapper_started(&r);
    let jobs = r.h.wait_final(&ids, Duration::from_secs(90));
    for j in &jobs {
        assert_eq!(j.state, JobState::Done, "{j:?}");
        if done_before.contains(&j.id) {
            assert_eq!(
                j.attempt, 1,
                "job {} was done before the quit and ran again",
                j.id
            );
        }
    }
    // Each job credited once to the volunteer.
    let credit: VolunteerList = r.h.api("/api/volunteers");
    assert_eq!(credit.volunteers.len(), 1, "{credit:?}");
    assert_eq!(credit.volunteers[0].jobs_done, 6, "{credit:?}");
}

#[test]
fn over_system_v_shm_too_and_a_killed_client_takes_wrapper_and_agent_along() {
    // This app version has no api_version: the client talks over System V shared memory.
    let Some(mut r) = rig_with("killed_client", JOB_XML, None, None, None) else {
        return;
    };
    r.client.start();
    let wrapper = wrapper_started(&r);
    r.h.stack
        .wait_agents_online(1, Duration::from_secs(30))
        .expect("the agent comes online");
    let agent = session_tree(wrapper)
        .first()
        .map(|p| p.pid)
        .expect("the wrapper runs the agent");
    let init = std::fs::read_to_string(r.client.slot().join("init_data.xml")).unwrap();
    assert!(
        !init.contains("<shm_key>-1</shm_key>"),
        "not System V: {init}"
    );
    // The wrapper got the client's suspend over that segment.
    r.client.task("suspend");
    wait_for("the agent to stop", Duration::from_secs(30), || {
        session_tree(wrapper).iter().all(|p| p.stopped())
    });
    r.client.kill9();
    let t = Instant::now();
    wait_for(
        "the wrapper and the agent to exit by themselves",
        Duration::from_secs(60),
        || !proctree::alive(wrapper) && !proctree::alive(agent),
    );
    println!(
        "wrapper and agent gone {:?} after the client's kill",
        t.elapsed()
    );
}

#[test]
fn a_session_drains_at_its_end_finishes_its_job_and_credits_the_volunteer() {
    // Drain after 4 s of run time; the first job takes 6 s and must still complete.
    let job_xml = "<copilot_job><session>60</session><drain>56</drain><stop_grace>10s</stop_grace></copilot_job>";
    let Some(mut r) = rig("drain", job_xml) else {
        return;
    };
    let first = r.h.submit(&r.h.write_job(
        "long",
        &job(
            "long",
            1,
            "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done; sleep 6; echo done > out.txt",
        ),
        &[],
    ));
    r.client.start();
    wrapper_started(&r);
    wait_state(&r, "the first job to run", &first, JobState::Running);
    let second =
        r.h.submit(&r.h.write_job("later", &job("later", 1, "echo later > out.txt"), &[]));
    let jobs = r.h.wait_final(&first, Duration::from_secs(60));
    assert_eq!(jobs[0].state, JobState::Done, "{:?}", jobs[0]);
    assert_eq!(jobs[0].attempt, 1);
    task_ended_with(&r, "0");
    // The drained agent took no new job: the second one waits, it is not lost.
    assert_eq!(r.h.job(second[0]).state, JobState::Queued);
    let credit: VolunteerList = r.h.api("/api/volunteers");
    let c = credit
        .volunteers
        .first()
        .expect("the volunteer was credited");
    assert_eq!(
        (c.user_id, c.host_id, c.team_id, c.jobs_done),
        (boinc::USER_ID, boinc::HOST_ID, boinc::TEAM_ID, 1)
    );
    assert!(c.cpu_seconds > 0.0, "{c:?}");
    assert_eq!(
        c.host_token.as_deref(),
        Some(
            copilot_boinc::volunteer::host_token(boinc::AUTHENTICATOR, boinc::HOST_ID as i64)
                .as_str()
        )
    );
}

#[test]
fn an_agent_past_its_drain_time_finishes_its_job_and_takes_no_other() {
    let drain_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 4;
    let h = Harness::start(Setup {
        agents: 1,
        agent_toml: Some(format!("drain_at = {drain_at}\n")),
        ..Setup::default()
    });
    let first =
        h.submit(&h.write_job("long", &job("long", 1, "sleep 7; echo done > out.txt"), &[]));
    h.wait_for("the first job to run", Duration::from_secs(30), |l| {
        l.jobs
            .iter()
            .any(|j| j.id == first[0] && j.state == JobState::Running)
    });
    let second = h.submit(&h.write_job("later", &job("later", 1, "echo later > out.txt"), &[]));
    let jobs = h.wait_final(&first, Duration::from_secs(60));
    assert_eq!(
        (jobs[0].state, jobs[0].attempt),
        (JobState::Done, 1),
        "{:?}",
        jobs[0]
    );
    let pid = h.stack.agent_pid(1).expect("the agent was started") as i32;
    wait_for("the drained agent to exit", Duration::from_secs(30), || {
        !proctree::alive(pid)
    });
    assert!(
        h.log_tail("agent-1").contains("drained"),
        "{}",
        h.log_tail("agent-1")
    );
    assert_eq!(
        h.job(second[0]).state,
        JobState::Queued,
        "the second job waits"
    );
}

#[test]
fn the_packaged_app_installs_and_runs_on_the_anonymous_platform() {
    if !boinc::client_installed() {
        println!("anonymous_platform: skipped: the BOINC client is not installed");
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let anonymous = package(out.path(), &[]);
    let Some(mut r) = rig_with("anonymous_platform", JOB_XML, None, Some(&anonymous), None) else {
        return;
    };
    let ids =
        r.h.submit(&r.h.write_job("one", &job("one", 1, "echo 1 > out.txt"), &[]));
    r.client.start();
    let jobs = r.h.wait_final(&ids, Duration::from_secs(60));
    assert_eq!(jobs[0].state, JobState::Done, "{:?}", jobs[0]);
    assert!(
        r.client.log().contains("anonymous platform"),
        "the client did not use app_info.xml:\n{}",
        r.client.log()
    );
    r.client.quit();
}

#[test]
fn a_broken_job_file_fails_the_task_with_init_failure_and_says_why() {
    let Some(mut r) = rig(
        "broken_job_file",
        "<copilot_job><sesion>1h</sesion></copilot_job>",
    ) else {
        return;
    };
    r.client.start();
    task_ended_with(&r, "206");
    // The task's stderr, which names the bad element, goes back with the result.
    wait_for(
        "the result's stderr to name the element",
        Duration::from_secs(30),
        || {
            std::fs::read_to_string(r.client.dir().join("client_state.xml"))
                .is_ok_and(|s| s.contains("<stderr_out>") && s.contains("sesion"))
        },
    );
    assert!(
        r.h.stack.agents().unwrap().agents.is_empty(),
        "no agent ever started"
    );
}

/// The job file of the qemu lifecycle test and benchmark: TCG (no KVM probe), no checkpoint
/// but at quits. (A task that has checkpointed is quit, not suspended, by a user's suspend
/// when the client does not leave applications in memory.)
const VM_JOB_XML: &str = "<copilot_job><backend>qemu</backend><accel>tcg</accel><memory_mb>256</memory_mb><session>1h</session><drain>10m</drain><stop_grace>20s</stop_grace><checkpoint_interval>1h</checkpoint_interval></copilot_job>";
/// The agent's name in the task (`boinc-<hostid>-<result>`).
const TASK_AGENT: &str = "boinc-7-copilot_wu_1_0";
/// What the image's init logs once per boot.
const BOOT_LINE: &str = "copilot-init: ";
const BOOT_WORD: &str = "] starting (copilot image";

/// VMs run one test at a time: TCG wants the CPUs.
fn one_vm_test_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The QEMU the wrapper runs.
fn qemu_of(wrapper: i32) -> i32 {
    let mut pid = None;
    wait_for("the wrapper to start QEMU", Duration::from_secs(30), || {
        pid = session_tree(wrapper)
            .iter()
            .find(|p| boinc::comm(p.pid).starts_with("qemu-system"))
            .map(|p| p.pid);
        pid.is_some()
    });
    pid.expect("set by the wait")
}

/// CPU seconds of QEMU's virtual CPU thread (`CPU 0/TCG`), from /proc: the guest's computing.
fn vcpu_of(qemu: i32) -> f64 {
    let tasks = std::fs::read_dir(format!("/proc/{qemu}/task")).expect("QEMU's threads");
    let vcpu = tasks
        .flatten()
        .find(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with("CPU 0/"))
        })
        .expect("QEMU names its virtual CPU's thread");
    std::fs::read_to_string(vcpu.path().join("stat"))
        .ok()
        .and_then(|s| proctree::parse(0, &s))
        .map_or(0.0, |p| p.cpu_seconds)
}

/// A file of the task's slot ("" if absent).
fn slot_text(r: &Rig, name: &str) -> String {
    std::fs::read_to_string(r.client.slot().join(name)).unwrap_or_default()
}

/// How many times the VM has booted, from its console.
fn boots(r: &Rig) -> usize {
    slot_text(r, "copilot-vm.console")
        .lines()
        .filter(|l| l.contains(BOOT_LINE) && l.contains(BOOT_WORD))
        .count()
}

/// The VM's files that must not outlive an aborted or finished task.
const VM_FILES: [&str; 5] = [
    "copilot-vm.qmp",
    "copilot-vm.state",
    "copilot-vm.state.part",
    "copilot-vm.state.info",
    "copilot-vm.context.tar",
];

#[test]
fn qemu_suspend_pauses_the_vm_quit_saves_it_restart_restores_it_abort_leaves_nothing() {
    let _one = one_vm_test_at_a_time();
    let out = tempfile::tempdir().unwrap();
    let Some(mut r) = vm_rig("qemu_lifecycle", VM_JOB_XML, out.path()) else {
        return;
    };
    let busy = job("busy", 1, "while :; do :; done");
    let ids = r.h.submit(&r.h.write_job("busy", &busy, &[]));
    r.client.start();
    let wrapper = wrapper_started(&r);
    let qemu = qemu_of(wrapper);
    wait_state(&r, "the busy job to run in the VM", &ids, JobState::Running);
    assert!(
        !r.client.slot().join("copilot-vm.context.tar").exists(),
        "the context tar (it holds the password) is deleted once QEMU has it"
    );
    // Suspend: QMP stop; the QEMU process stops using CPU (from /proc).
    r.client.task("suspend");
    wait_for(
        "the wrapper to pause the VM",
        Duration::from_secs(30),
        || slot_text(&r, "stderr.txt").contains(" suspended "),
    );
    // A stopped VM's CPU does not run: over two seconds, its thread uses not one clock tick
    // (QEMU's main loop may still wake now and then).
    let paused = vcpu_of(qemu);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(vcpu_of(qemu), paused, "the VM's CPU ran while paused");
    // Resume: QMP cont; the busy job computes again.
    r.client.task("resume");
    wait_for("the VM to compute again", Duration::from_secs(30), || {
        vcpu_of(qemu) > paused + 0.5
    });

    // Quit: the VM's state is saved, then QEMU and the wrapper exit.
    assert_eq!(boots(&r), 1, "{}", slot_text(&r, "copilot-vm.console"));
    r.client.quit();
    wait_for(
        "the wrapper and QEMU to exit",
        Duration::from_secs(30),
        || !proctree::alive(wrapper) && !proctree::alive(qemu),
    );
    let slot = r.client.slot();
    assert!(slot.join("copilot-vm.state").is_file(), "no saved state");
    assert!(!slot.join("copilot-vm.qmp").exists(), "the socket is left");
    r.h.wait_agent(TASK_AGENT, false, Duration::from_secs(30));

    // Restart: QEMU loads the state instead of booting; the agent logs in again.
    r.client.start();
    let wrapper = wrapper_started(&r);
    let qemu = qemu_of(wrapper);
    wait_for("the VM to be restored", Duration::from_secs(60), || {
        slot_text(&r, "stderr.txt").contains("VM restored from its saved state")
    });
    let restored = Instant::now();
    r.h.wait_agent(TASK_AGENT, true, Duration::from_secs(120));
    println!(
        "the restored agent was online again {:.1} s after the restore",
        restored.elapsed().as_secs_f64()
    );
    for l in slot_text(&r, "stderr.txt").lines() {
        if l.contains("VM state saved")
            || l.contains("VM restored")
            || l.contains("VM saved and ended")
        {
            println!("{l}");
        }
    }
    assert_eq!(
        boots(&r),
        1,
        "the VM booted again:\n{}",
        slot_text(&r, "copilot-vm.console")
    );

    // A state that does not load (cut short here) is dropped, and the VM boots afresh.
    r.client.quit();
    wait_for(
        "the wrapper and QEMU to exit",
        Duration::from_secs(30),
        || !proctree::alive(wrapper) && !proctree::alive(qemu),
    );
    let state = std::fs::read(slot.join("copilot-vm.state")).expect("a saved state");
    std::fs::write(slot.join("copilot-vm.state"), &state[..state.len() / 2]).unwrap();
    r.client.start();
    let wrapper = wrapper_started(&r);
    wait_for("the VM to boot again", Duration::from_secs(120), || {
        boots(&r) == 2
    });
    assert!(
        slot_text(&r, "stderr.txt").contains("cannot restore the saved VM state"),
        "{}",
        slot_text(&r, "stderr.txt")
    );
    let qemu = qemu_of(wrapper);

    // Abort: QEMU is killed, its socket and state files are gone.
    r.client.task("abort");
    wait_for(
        "the wrapper and QEMU to be gone",
        Duration::from_secs(30),
        || !proctree::alive(wrapper) && !proctree::alive(qemu),
    );
    task_ended_with(&r, "203");
    for f in VM_FILES {
        assert!(!slot.join(f).exists(), "{f} is left behind");
    }
}

#[test]
fn qemu_a_job_runs_end_to_end_in_the_vm_and_the_session_end_powers_it_off() {
    // accel auto: the wrapper probes KVM (bounded) and falls back to TCG where it hangs.
    // Checkpoints every 10 s: the VM runs on after each.
    let job_xml = "<copilot_job><backend>qemu</backend><session>60s</session><drain>5s</drain><stop_grace>60s</stop_grace><checkpoint_interval>10s</checkpoint_interval></copilot_job>";
    let _one = one_vm_test_at_a_time();
    let out = tempfile::tempdir().unwrap();
    let Some(mut r) = vm_rig("qemu_end_to_end", job_xml, out.path()) else {
        return;
    };
    let ids = r.h.submit(&r.h.write_job(
        "where",
        &job("where", 1, "cat /etc/copilot/release > out.txt"),
        &[],
    ));
    r.client.start();
    let wrapper = wrapper_started(&r);
    let qemu = qemu_of(wrapper);
    let jobs = r.h.wait_final(&ids, Duration::from_secs(120));
    assert_eq!(jobs[0].state, JobState::Done, "{:?}", jobs[0]);
    assert_eq!(jobs[0].agent.as_deref(), Some(TASK_AGENT));
    let out = std::fs::read_to_string(r.h.results(jobs[0].id).join("out.txt")).unwrap();
    assert!(
        out.starts_with("copilot image "),
        "not run in the VM: {out}"
    );
    // At the session's end the power button ends the agent's session and the VM powers off.
    task_ended_with(&r, "0");
    assert!(!proctree::alive(qemu));
    // The result's stderr: the KVM probe, and the guest's console's end.
    let mut stderr = String::new();
    wait_for("the result's stderr", Duration::from_secs(30), || {
        stderr =
            std::fs::read_to_string(r.client.dir().join("client_state.xml")).unwrap_or_default();
        stderr.contains("</stderr_out>")
    });
    if let Some(probe) = stderr.lines().find(|l| l.contains("KVM probe boot")) {
        println!("{probe}");
    }
    for line in [
        "KVM probe boot",
        "VM state saved",
        "the agent ended its session",
        "powering off: session over",
    ] {
        assert!(stderr.contains(line), "no {line:?} in\n{stderr}");
    }
    for f in VM_FILES {
        assert!(!r.client.slot().join(f).exists(), "{f} is left behind");
    }
    let credit: VolunteerList = r.h.api("/api/volunteers");
    assert_eq!(credit.volunteers[0].jobs_done, 1, "{credit:?}");
}

/// Poll every millisecond until `done`; the time it took (at most 60 s, then panic).
fn time_until(what: &str, mut done: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !done() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    t.elapsed()
}

fn summary(name: &str, mut d: Vec<Duration>) {
    d.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{name}: n={} min {:.0} ms, median {:.0} ms, max {:.0} ms",
        d.len(),
        ms(d[0]),
        ms(d[d.len() / 2]),
        ms(d[d.len() - 1])
    );
}

/// Latencies under the real client, by hand (docs/BENCHMARKS.md):
/// `cargo test --release -p copilot-tests --test boinc -- --ignored --nocapture bench`
#[test]
#[ignore = "a benchmark: run by hand"]
fn bench_boinc_latencies() {
    let Some(mut r) = rig("bench", JOB_XML) else {
        return;
    };
    // Requeued at every quit: enough retries for the rounds below.
    let busy =
        job("busy", 1, "while :; do :; done").replacen("[limits]", "max_retries = 10\n[limits]", 1);
    let ids = r.h.submit(&r.h.write_job("busy", &busy, &[]));
    r.client.start();
    let wrapper = wrapper_started(&r);
    wait_state(&r, "the busy job to run", &ids, JobState::Running);
    let (mut suspend, mut resume) = (Vec::new(), Vec::new());
    for _ in 0..10 {
        let t = Instant::now();
        r.client.task("suspend");
        time_until("the session to stop", || {
            let tree = session_tree(wrapper);
            tree.len() >= 2 && tree.iter().all(|p| p.stopped())
        });
        suspend.push(t.elapsed());
        let t = Instant::now();
        r.client.task("resume");
        time_until("the session to continue", || {
            session_tree(wrapper).iter().all(|p| !p.stopped())
        });
        resume.push(t.elapsed());
    }
    summary(
        "boinccmd suspend -> every process of the session stopped",
        suspend,
    );
    summary(
        "boinccmd resume -> every process of the session running",
        resume,
    );

    // The client's quit sends <quit/>; the task comes back when the client restarts.
    let mut quit = Vec::new();
    for round in 0..3 {
        if round > 0 {
            r.client.start();
        }
        let wrapper = wrapper_started(&r);
        wait_state(&r, "the busy job to run", &ids, JobState::Running);
        let tree: Vec<i32> = session_tree(wrapper).iter().map(|p| p.pid).collect();
        let t = Instant::now();
        let out = r.client.boinccmd(&["--quit"]);
        assert!(out.status.success());
        time_until("the wrapper, the agent and the payload to exit", || {
            !proctree::alive(wrapper) && tree.iter().all(|p| !proctree::alive(*p))
        });
        quit.push(t.elapsed());
        r.client.wait_exit();
    }
    summary("boinccmd --quit -> wrapper, agent and payload gone", quit);

    // The wrapper's own share, from its log: message received -> backend done.
    let log = std::fs::read_to_string(r.client.slot().join("stderr.txt")).unwrap();
    let took = |what: &str| took_ms(&log, what);
    summary(
        "wrapper: <suspend/> received -> every process stopped",
        took(" suspended "),
    );
    summary(
        "wrapper: <resume/> received -> every process continued",
        took(" resumed "),
    );
    summary(
        "wrapper: <quit/> received -> agent stopped, tree gone",
        took("agent stopped"),
    );
}

/// The qemu backend's latencies under the real client, by hand (docs/BENCHMARKS.md):
/// `cargo test --release -p copilot-tests --test boinc -- --ignored --nocapture bench_boinc_qemu`
#[test]
#[ignore = "a benchmark: run by hand"]
fn bench_boinc_qemu_latencies() {
    let _one = one_vm_test_at_a_time();
    let out = tempfile::tempdir().unwrap();
    let Some(mut r) = vm_rig("bench_qemu", VM_JOB_XML, out.path()) else {
        return;
    };
    let count = |r: &Rig, what: &str| slot_text(r, "stderr.txt").matches(what).count();
    let busy =
        job("busy", 1, "while :; do :; done").replacen("[limits]", "max_retries = 10\n[limits]", 1);
    let ids = r.h.submit(&r.h.write_job("busy", &busy, &[]));
    r.client.start();
    let wrapper = wrapper_started(&r);
    qemu_of(wrapper);
    wait_state(&r, "the busy job to run in the VM", &ids, JobState::Running);
    let (mut suspend, mut resume) = (Vec::new(), Vec::new());
    for _ in 0..10 {
        let n = count(&r, " suspended ");
        let t = Instant::now();
        r.client.task("suspend");
        time_until("QMP stop to be answered", || count(&r, " suspended ") > n);
        suspend.push(t.elapsed());
        let n = count(&r, " resumed ");
        let t = Instant::now();
        r.client.task("resume");
        time_until("QMP cont to be answered", || count(&r, " resumed ") > n);
        resume.push(t.elapsed());
    }
    summary("boinccmd suspend -> VM paused (QMP stop answered)", suspend);
    summary("boinccmd resume -> VM running (QMP cont answered)", resume);

    let mut quit = Vec::new();
    for round in 0..3 {
        if round > 0 {
            let restored = count(&r, "VM restored from its saved state");
            r.client.start();
            time_until("the VM to be restored", || {
                count(&r, "VM restored from its saved state") > restored
            });
        }
        let wrapper = wrapper_started(&r);
        let qemu = qemu_of(wrapper);
        let t = Instant::now();
        let out = r.client.boinccmd(&["--quit"]);
        assert!(out.status.success());
        time_until("the wrapper and QEMU to exit", || {
            !proctree::alive(wrapper) && !proctree::alive(qemu)
        });
        quit.push(t.elapsed());
        r.client.wait_exit();
        assert!(r.client.slot().join("copilot-vm.state").is_file());
    }
    summary(
        "boinccmd --quit -> wrapper and QEMU gone, state saved",
        quit,
    );
    let size = std::fs::metadata(r.client.slot().join("copilot-vm.state")).map_or(0, |m| m.len());
    println!("saved state: {:.1} MB", size as f64 / 1e6);

    let log = slot_text(&r, "stderr.txt");
    let took = |what: &str| took_ms(&log, what);
    summary(
        "wrapper: <suspend/> received -> QMP stop answered",
        took(" suspended "),
    );
    summary(
        "wrapper: <resume/> received -> QMP cont answered",
        took(" resumed "),
    );
    summary(
        "wrapper: VM state saved (stop, migrate, zstd)",
        took("VM state saved"),
    );
    summary(
        "wrapper: <quit/> received -> state saved, QEMU gone",
        took("VM saved and ended"),
    );
    summary(
        "wrapper: QEMU started -> state loaded, VM running",
        took("VM restored"),
    );
}
