//! The copilot VM image under QEMU (TCG) with the real Prosody and manager on the host: the
//! image `scripts/build-image` makes boots with `scripts/run-vm`, its agent comes online over
//! QEMU's user networking (the host's loopback is 10.0.2.2 to the guest), runs jobs end to end
//! (one of them into the memory limit of its cgroup: the VM mounts cgroup v2, which the CI hosts
//! do not offer) and the VM powers off when told (ACPI power button) or when its agent has been
//! idle. The disks boot too, and building twice gives the same bytes.
//!
//! The image is built once per test binary into `target/vm-image`; `build-image` does nothing
//! when its inputs are unchanged. Without QEMU, or when the Debian packages cannot be
//! downloaded, the tests print `skipped:` and return.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use copilot_protocol::api::{AgentList, JobView};
use copilot_protocol::sandbox::Protection;
use copilot_protocol::JobState;
use copilot_stack::Supervised;
use copilot_tests::{bin_dir, Harness, Setup};
use sha2::Digest;

/// The host's loopback as the guest reaches it (QEMU user networking).
const HOST: &str = "10.0.2.2";
/// Generous: TCG on a busy two-core machine.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
const JOB_TIMEOUT: Duration = Duration::from_secs(120);
const POWER_OFF_TIMEOUT: Duration = Duration::from_secs(60);
/// `build-image`'s exit status when an input (a Debian package) cannot be had.
const INPUT_UNAVAILABLE: i32 = 75;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
        .to_path_buf()
}

/// The built image's directory, or why there is none (the tests then skip).
fn image() -> Result<&'static Path, &'static str> {
    static IMAGE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match IMAGE.get_or_init(build_image) {
        Ok(dir) => Ok(dir),
        Err(why) => Err(why),
    }
}

fn build_image() -> Result<PathBuf, String> {
    if !cfg!(all(target_os = "linux", target_arch = "x86_64")) {
        return Err("the VM image is built and booted on x86_64 Linux only".into());
    }
    let root = workspace();
    let qemu = Command::new("bash")
        .args(["-c", "source scripts/lib/common.sh && find_qemu"])
        .current_dir(&root)
        .output()
        .expect("running bash");
    if !qemu.status.success() {
        return Err("no qemu-system-x86_64 (scripts/install-deps installs it)".into());
    }
    let dir = bin_dir()
        .parent()
        .expect("the binaries are in target/<profile>")
        .join("vm-image");
    let started = Instant::now();
    build(&dir, &[])?;
    println!(
        "image in {} ({:.1}s to build or check)",
        dir.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(dir)
}

/// Runs `scripts/build-image --out DIR ARGS…`; Err if an input could not be had, panics on
/// any other failure.
fn build(dir: &Path, args: &[&str]) -> Result<(), String> {
    let out = Command::new(workspace().join("scripts/build-image"))
        .arg("--out")
        .arg(dir)
        .args(args)
        .output()
        .expect("running scripts/build-image");
    let stderr = String::from_utf8_lossy(&out.stderr);
    match out.status.code() {
        Some(0) => Ok(()),
        Some(INPUT_UNAVAILABLE) => Err(format!(
            "cannot build the image: {}",
            stderr.lines().last().unwrap_or("?")
        )),
        _ => panic!("scripts/build-image failed ({}):\n{stderr}", out.status),
    }
}

/// The image, or None after printing why this test skips.
fn image_or_skip(test: &str) -> Option<&'static Path> {
    match image() {
        Ok(dir) => Some(dir),
        Err(why) => {
            println!("{test}: skipped: {why}");
            None
        }
    }
}

/// VMs boot one test at a time: TCG wants the CPUs.
fn one_vm_test_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A harness whose manager tells agents its 10.0.2.2 address, and whose agents' configs allow
/// plaintext XMPP to 10.0.2.2 (the host's loopback, through QEMU), with `top` (top-level
/// settings) before that.
fn harness(top: &str) -> Harness {
    Harness::start(Setup {
        agents: 0,
        public_host: Some(HOST.into()),
        agent_toml: Some(format!("{top}[xmpp]\nplaintext_host = \"{HOST}\"\n")),
        ..Setup::default()
    })
}

/// How a VM gets its agent's settings (see docs/IMAGE.md).
#[derive(Clone, Copy, Debug)]
enum Context {
    /// A context tar holding agent.toml.
    AgentToml,
    /// A context tar holding user-data with a [copilot-begin] section of KEY=VALUE lines.
    UserData,
    /// agent.toml without the password, which comes on the kernel command line.
    PasswordOnCommandLine,
}

/// One VM of the image under QEMU, its agent registered with the harness's stack.
struct Vm {
    name: String,
    qemu: Supervised,
    console: PathBuf,
    qmp: PathBuf,
    started: Instant,
}

impl Vm {
    /// Registers the agent `name` (its XMPP server at 10.0.2.2), hands its settings to the VM
    /// as `how` says and boots the image (`boot`: direct, raw, qcow2…) with TCG.
    fn boot(h: &mut Harness, image: &Path, boot: &str, name: &str, how: Context) -> Vm {
        let server = format!("{HOST}:{}", h.stack.prosody().port());
        let config = h
            .stack
            .register_agent(name, &server, None)
            .expect("registering the VM's agent");
        let mut config: toml::Table = config.parse().expect("the agent's config");
        let mut append = String::new();
        let (file, text) = match how {
            Context::AgentToml => (format!("{name}.toml"), config.to_string()),
            Context::UserData => (format!("{name}.user-data"), user_data(&config)),
            Context::PasswordOnCommandLine => {
                let xmpp = config["xmpp"].as_table_mut().expect("an [xmpp] table");
                let password = xmpp.remove("password").expect("a password");
                append = format!("copilot.password={}", password.as_str().expect("a string"));
                (format!("{name}.toml"), config.to_string())
            }
        };
        let context = h.path(&file);
        std::fs::write(&context, text).expect("writing the context");
        let console = h.path(&format!("{name}.console"));
        let qmp = h.path(&format!("{name}.qmp"));
        let mut cmd = Command::new(workspace().join("scripts/run-vm"));
        cmd.arg("--image")
            .arg(image)
            .args(["--boot", boot, "--accel", "tcg", "--context"])
            .arg(&context)
            .arg("--qmp")
            .arg(&qmp)
            .arg("--serial")
            .arg(&console);
        if !append.is_empty() {
            cmd.args(["--append", &append]);
        }
        let log = h.path(&format!("{name}.log"));
        let qemu = Supervised::spawn(name, cmd, &log).expect("starting scripts/run-vm");
        Vm {
            name: name.to_owned(),
            qemu,
            console,
            qmp,
            started: Instant::now(),
        }
    }

    /// What the guest wrote to its serial console so far.
    fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// Waits until the manager has heard from the VM's agent; returns the time since boot.
    fn wait_known(&mut self, h: &Harness) -> Duration {
        loop {
            let agents: AgentList = h.api("/api/agents");
            if agents.agents.iter().any(|a| a.name == self.name) {
                return self.started.elapsed();
            }
            if let Some(status) = self.qemu.exited().expect("checking on QEMU") {
                panic!(
                    "{}: QEMU exited ({status}) before the agent came online:\n{}\n{}",
                    self.name,
                    self.qemu.log_tail(),
                    self.console()
                );
            }
            assert!(
                self.started.elapsed() < BOOT_TIMEOUT,
                "{}: the agent is not online after {BOOT_TIMEOUT:?}; console:\n{}",
                self.name,
                self.console()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Presses the ACPI power button (QMP `system_powerdown`).
    fn press_power_button(&self) {
        let stream = UnixStream::connect(&self.qmp).expect("connecting to QMP");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("setting a timeout");
        let mut reader = BufReader::new(stream.try_clone().expect("cloning the socket"));
        let mut writer = stream;
        let mut line = String::new();
        reader.read_line(&mut line).expect("the QMP greeting");
        assert!(line.contains("\"QMP\""), "{line}");
        for command in ["qmp_capabilities", "system_powerdown"] {
            writeln!(writer, r#"{{"execute": "{command}"}}"#).expect("sending to QMP");
            loop {
                line.clear();
                reader.read_line(&mut line).expect("a QMP answer");
                assert!(!line.contains("\"error\""), "{command}: {line}");
                if line.contains("\"return\"") {
                    break;
                }
            }
        }
    }

    /// Waits for QEMU to exit (the guest powered off); returns its status.
    fn wait_power_off(&mut self) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.qemu.exited().expect("checking on QEMU") {
                return status;
            }
            assert!(
                start.elapsed() < POWER_OFF_TIMEOUT,
                "{}: still running {POWER_OFF_TIMEOUT:?} later; console:\n{}",
                self.name,
                self.console()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Checks that the VM powered off cleanly after its agent ended the session.
    fn assert_clean_power_off(&mut self) {
        let status = self.wait_power_off();
        let console = self.console();
        assert!(status.success(), "{}: QEMU {status}:\n{console}", self.name);
        for line in ["the agent ended its session", "powering off: session over"] {
            assert!(
                console.contains(line),
                "{}: no {line:?} in\n{console}",
                self.name
            );
        }
    }
}

/// The agent config `config` as µCernVM-style user-data: other sections, then ours.
fn user_data(config: &toml::Table) -> String {
    let mut text = String::from("[amiconfig]\nplugins=cernvm\n\n[copilot-begin]\n# the agent\n");
    let xmpp = config["xmpp"].as_table().expect("an [xmpp] table");
    for (key, value) in config.iter().chain(xmpp) {
        let value = match value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Table(_) => continue,
            other => other.to_string(),
        };
        text.push_str(&format!("{key} = {value}\n"));
    }
    text.push_str("[copilot-end]\n[cernvm]\norganisations=none\n");
    text
}

/// The image's release line, as /etc/copilot/release in the guest holds it.
fn release_key(image: &Path) -> String {
    let manifest = std::fs::read_to_string(image.join("manifest")).expect("the manifest");
    let key = manifest
        .lines()
        .find_map(|l| l.strip_prefix("input-key "))
        .expect("an input-key line");
    format!("copilot image {}", &key[..16])
}

const PROBE_JOB: &str = r#"
name = "vm-probe"
command = ["sh", "probe.sh"]
outputs = ["where.txt", "uid.txt", "digest.txt", "cmdline.txt"]

[[inputs]]
path = "probe.sh"

[[inputs]]
path = "data.txt"
"#;

const PROBE_SH: &str = "cat /etc/copilot/release > where.txt
id -u > uid.txt
sha256sum data.txt | cut -d' ' -f1 > digest.txt
cat /proc/cmdline > cmdline.txt
";

const HOG_JOB: &str = r#"
name = "vm-hog"
command = ["sh", "hog.sh"]

[[inputs]]
path = "hog.sh"

[limits]
memory = "32MiB"
"#;

/// Holds 64 MiB in a shell variable: twice the job's memory limit.
const HOG_SH: &str = "x=$(head -c 67108864 /dev/zero | tr '\\0' x)\necho ${#x}\n";

fn sandbox_has(job: &JobView, p: Protection) -> bool {
    job.sandbox.as_ref().is_some_and(|s| s.active.contains(&p))
}

#[test]
fn the_vm_agent_runs_jobs_and_the_vm_powers_off_when_told() {
    let Some(image) = image_or_skip("the_vm_agent_runs_jobs_and_the_vm_powers_off_when_told")
    else {
        return;
    };
    let _one = one_vm_test_at_a_time();
    let mut h = harness("");
    let mut vm = Vm::boot(
        &mut h,
        image,
        "direct",
        "vm-1",
        Context::PasswordOnCommandLine,
    );
    let online = vm.wait_known(&h);
    println!(
        "vm-1: agent online {:.2}s after QEMU started",
        online.as_secs_f64()
    );

    // A job end to end: inputs in, outputs back (verified by `copilot results`), run in the VM
    // under a uid of its own and in a cgroup of its own.
    let data = "copilot in a VM\n".repeat(4096);
    let job = h.write_job(
        "probe",
        PROBE_JOB,
        &[("probe.sh", PROBE_SH), ("data.txt", &data)],
    );
    let ids = h.submit(&job);
    let probe = h.wait_final(&ids, JOB_TIMEOUT).remove(0);
    assert_eq!(probe.state, JobState::Done, "{probe:?}\n{}", vm.console());
    assert_eq!(probe.agent.as_deref(), Some("vm-1"));
    let out = h.results(probe.id);
    let read = |f: &str| std::fs::read_to_string(out.join(f)).expect("an output file");
    assert!(
        read("where.txt").starts_with(&release_key(image)),
        "{}",
        read("where.txt")
    );
    let uid: u32 = read("uid.txt").trim().parse().expect("a uid");
    assert!(uid >= 61000, "the job ran as uid {uid}");
    assert_eq!(
        read("digest.txt").trim(),
        hex::encode(sha2::Sha256::digest(data.as_bytes()))
    );
    assert!(sandbox_has(&probe, Protection::Cgroup), "{probe:?}");
    assert!(sandbox_has(&probe, Protection::Uid), "{probe:?}");
    // The password came on the kernel command line; the job sees the line without it.
    let cmdline = read("cmdline.txt");
    assert!(cmdline.contains("console=ttyS0"), "{cmdline}");
    assert!(!cmdline.contains("copilot."), "{cmdline}");

    // A job over its memory limit: its cgroup's OOM kill makes it limit-exceeded memory.
    let job = h.write_job("hog", HOG_JOB, &[("hog.sh", HOG_SH)]);
    let ids = h.submit(&job);
    let hog = h.wait_final(&ids, JOB_TIMEOUT).remove(0);
    assert_eq!(hog.state, JobState::Failed, "{hog:?}");
    let outcome = hog.outcome.as_ref().expect("an outcome");
    assert_eq!(outcome.kind, "limit-exceeded", "{outcome:?}");
    assert_eq!(outcome.limit.as_deref(), Some("memory"), "{outcome:?}");
    assert!(sandbox_has(&hog, Protection::Cgroup), "{hog:?}");

    // The power button: init stops the agent, which ends its session; the VM powers off.
    vm.press_power_button();
    vm.assert_clean_power_off();
    h.wait_agent("vm-1", false, Duration::from_secs(30));
    let console = vm.console();
    assert!(
        console.contains(&format!("eth0 has 10.0.2.15/24 via {HOST}")),
        "{console}"
    );
}

#[test]
fn the_raw_and_qcow2_disks_boot_and_power_off_once_their_agent_is_idle() {
    let Some(image) =
        image_or_skip("the_raw_and_qcow2_disks_boot_and_power_off_once_their_agent_is_idle")
    else {
        return;
    };
    let _one = one_vm_test_at_a_time();
    let mut h = harness("idle_timeout = \"3s\"\n");
    let mut vms: Vec<Vm> = [("raw", Context::AgentToml), ("qcow2", Context::UserData)]
        .iter()
        .map(|&(disk, how)| Vm::boot(&mut h, image, disk, &format!("vm-{disk}"), how))
        .collect();
    for vm in &mut vms {
        let online = vm.wait_known(&h);
        println!(
            "{}: agent online {:.2}s after QEMU started",
            vm.name,
            online.as_secs_f64()
        );
    }
    for vm in &mut vms {
        vm.assert_clean_power_off();
        h.wait_agent(&vm.name, false, Duration::from_secs(30));
    }
}

#[test]
fn building_the_image_again_gives_the_same_bytes_in_every_format() {
    let Some(image) =
        image_or_skip("building_the_image_again_gives_the_same_bytes_in_every_format")
    else {
        return;
    };
    let manifest = std::fs::read_to_string(image.join("manifest")).expect("the manifest");
    let again = image.with_file_name("vm-image-again");
    build(&again, &["--rebuild"]).expect("the inputs were there a moment ago");
    let second = std::fs::read_to_string(again.join("manifest")).expect("the second manifest");
    let _ = std::fs::remove_dir_all(&again);
    assert_eq!(manifest, second, "two builds of the same inputs differ");

    let files: Vec<(&str, &str, u64)> = manifest
        .lines()
        .filter_map(|l| {
            let mut f = l.strip_prefix("file ")?.split(' ');
            Some((f.next()?, f.next()?, f.next()?.parse().ok()?))
        })
        .collect();
    let names: Vec<&str> = files.iter().map(|f| f.0).collect();
    assert_eq!(
        names,
        [
            "vmlinuz",
            "vmlinux",
            "initramfs",
            "copilot.raw",
            "copilot.qcow2",
            "copilot.vdi",
            "copilot.vmdk"
        ]
    );
    for (name, digest, size) in &files {
        let bytes = std::fs::read(image.join(name)).expect("an image file");
        assert_eq!(bytes.len() as u64, *size, "{name}");
        assert_eq!(hex::encode(sha2::Sha256::digest(&bytes)), *digest, "{name}");
    }
    // Each disk is the format its name says, of the raw disk's size.
    let raw = files[3].2;
    for format in ["raw", "qcow2", "vdi", "vmdk"] {
        let out = Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(image.join(format!("copilot.{format}")))
            .output()
            .expect("running qemu-img");
        assert!(out.status.success(), "{out:?}");
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        assert_eq!(info["format"], format, "{info}");
        assert_eq!(info["virtual-size"], raw, "{info}");
    }
}
