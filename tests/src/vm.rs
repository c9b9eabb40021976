//! Driving the copilot VM image from tests and benchmarks: [`image`] builds it once per process
//! with `scripts/build-image` (which does nothing when its inputs are unchanged), [`harness`]
//! starts a stack whose manager and agent configs suit a VM, and a [`Vm`] is one boot of the
//! image with `scripts/run-vm` under QEMU, its agent registered with that stack and its
//! settings handed over as a [`Context`].

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use copilot_protocol::api::AgentList;
use copilot_stack::Supervised;

use crate::{bin_dir, Harness, Setup};

/// The host's loopback as the guest reaches it (QEMU user networking).
pub const HOST: &str = "10.0.2.2";
/// Generous: TCG on a busy two-core machine.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
pub const POWER_OFF_TIMEOUT: Duration = Duration::from_secs(60);
/// `build-image`'s exit status when an input (a Debian package) cannot be had.
pub const INPUT_UNAVAILABLE: i32 = 75;

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
        .to_path_buf()
}

/// The built image's directory, or why there is none (the tests then skip).
pub fn image() -> Result<&'static Path, &'static str> {
    static IMAGE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match IMAGE.get_or_init(build_image) {
        Ok(dir) => Ok(dir),
        Err(why) => Err(why),
    }
}

/// The qemu-system-x86_64 the scripts use (`find_qemu` of scripts/lib/common.sh).
pub fn qemu() -> Result<PathBuf, String> {
    let out = Command::new("bash")
        .args(["-c", "source scripts/lib/common.sh && find_qemu"])
        .current_dir(workspace())
        .output()
        .expect("running bash");
    let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() || path.is_empty() {
        return Err("no qemu-system-x86_64 (scripts/install-deps installs it)".into());
    }
    Ok(PathBuf::from(path))
}

fn build_image() -> Result<PathBuf, String> {
    if !cfg!(all(target_os = "linux", target_arch = "x86_64")) {
        return Err("the VM image is built and booted on x86_64 Linux only".into());
    }
    qemu()?;
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
pub fn build(dir: &Path, args: &[&str]) -> Result<(), String> {
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
pub fn image_or_skip(test: &str) -> Option<&'static Path> {
    match image() {
        Ok(dir) => Some(dir),
        Err(why) => {
            println!("{test}: skipped: {why}");
            None
        }
    }
}

/// A harness whose manager tells agents its 10.0.2.2 address (the host's loopback, through
/// QEMU), with `top` (top-level settings) in its agents' configs. The agents reach Prosody there
/// too, over STARTTLS with the stack's CA pinned like every agent of the stack.
pub fn harness(top: &str) -> Harness {
    Harness::start(Setup {
        agents: 0,
        public_host: Some(HOST.into()),
        agent_toml: (!top.is_empty()).then(|| top.to_owned()),
        ..Setup::default()
    })
}

/// How a VM gets its agent's settings (see docs/IMAGE.md).
#[derive(Clone, Copy, Debug)]
pub enum Context {
    /// A context tar holding agent.toml.
    AgentToml,
    /// A context tar holding user-data with a [copilot-begin] section of KEY=VALUE lines.
    UserData,
    /// agent.toml without the password, which comes on the kernel command line.
    PasswordOnCommandLine,
}

/// One VM of the image under QEMU, its agent registered with the harness's stack.
#[derive(Debug)]
pub struct Vm {
    pub name: String,
    qemu: Supervised,
    console: PathBuf,
    qmp: PathBuf,
    started: Instant,
}

impl Vm {
    /// Registers the agent `name` (its XMPP server at 10.0.2.2), hands its settings to the VM
    /// as `how` says and boots the image with `scripts/run-vm RUN_VM…` (e.g. `--boot raw
    /// --accel tcg`).
    pub fn boot(h: &mut Harness, image: &Path, name: &str, how: Context, run_vm: &[&str]) -> Vm {
        let server = format!("{HOST}:{}", h.stack.prosody().port());
        let config = h
            .stack
            .register_agent(name, &server, None)
            .expect("registering the VM's agent");
        let mut config: toml::Table = config.parse().expect("the agent's config");
        let mut append = String::new();
        let (file, text) = match how {
            Context::AgentToml => (format!("{name}.toml"), config.to_string()),
            Context::UserData => {
                // A tar of user-data and the project CA: a PEM has no place in KEY=VALUE lines.
                let dir = h.path(&format!("{name}.context"));
                std::fs::create_dir_all(&dir).expect("a context dir");
                std::fs::write(dir.join("user-data"), user_data(&config)).expect("user-data");
                std::fs::write(dir.join("ca.pem"), h.stack.ca_pem()).expect("ca.pem");
                let tar = h.path(&format!("{name}.context.tar"));
                let st = Command::new("tar")
                    .arg("-cf")
                    .arg(&tar)
                    .arg("-C")
                    .arg(&dir)
                    .args(["user-data", "ca.pem"])
                    .status()
                    .expect("running tar");
                assert!(st.success(), "tar failed");
                (format!("{name}.context.tar"), String::new())
            }
            Context::PasswordOnCommandLine => {
                let xmpp = config["xmpp"].as_table_mut().expect("an [xmpp] table");
                let password = xmpp.remove("password").expect("a password");
                append = format!("copilot.password={}", password.as_str().expect("a string"));
                (format!("{name}.toml"), config.to_string())
            }
        };
        let context = h.path(&file);
        if !text.is_empty() {
            std::fs::write(&context, text).expect("writing the context");
        }
        let console = h.path(&format!("{name}.console"));
        let qmp = h.path(&format!("{name}.qmp"));
        let mut cmd = Command::new(workspace().join("scripts/run-vm"));
        cmd.arg("--image")
            .arg(image)
            .args(run_vm)
            .arg("--context")
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

    /// QEMU's process id (run-vm execs QEMU).
    pub fn qemu_pid(&self) -> u32 {
        self.qemu.pid()
    }

    /// What the guest wrote to its serial console so far.
    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// Waits until the manager has heard from the VM's agent; returns the time since boot.
    pub fn wait_known(&mut self, h: &Harness) -> Duration {
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
    pub fn press_power_button(&self) {
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
    pub fn wait_power_off(&mut self) -> ExitStatus {
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
    pub fn assert_clean_power_off(&mut self) {
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
    // The stack's agents trust its key (`[trust] manager_key`): a setting of the same name.
    let trust = config
        .get("trust")
        .and_then(toml::Value::as_table)
        .into_iter()
        .flatten()
        .filter(|(k, _)| k.as_str() == "manager_key");
    for (key, value) in config.iter().chain(xmpp).chain(trust) {
        let value = match value {
            // The CA travels as ca.pem beside the user-data.
            toml::Value::String(_) if key == "ca_pem" => continue,
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
pub fn release_key(image: &Path) -> String {
    let manifest = std::fs::read_to_string(image.join("manifest")).expect("the manifest");
    let key = manifest
        .lines()
        .find_map(|l| l.strip_prefix("input-key "))
        .expect("an input-key line");
    format!("copilot image {}", &key[..16])
}
