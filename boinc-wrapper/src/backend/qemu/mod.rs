//! The `qemu` backend: the copilot VM image (kernel + initramfs, the app version's
//! `copilot-vmlinuz` and `copilot-initramfs`) under QEMU, controlled over QMP on a unix socket
//! in the slot dir.
//!
//! - start: the agent's config goes into the guest as `agent.toml` in a context tar on a
//!   second, read-only virtio disk (docs/IMAGE.md); the tar is deleted once QEMU has opened
//!   it. If the slot holds a saved VM state of the same settings, QEMU starts with `-incoming`
//!   from it and continues (`cont`) instead of booting; a state that does not load is deleted
//!   and the VM boots afresh. KVM only when a bounded probe boot shows it works ([`kvm`]),
//!   else TCG;
//! - suspend = QMP `stop`, resume = `cont`, network = `set_link` of the NIC;
//! - checkpoint = `stop`, migrate the VM's state through a pipe (QEMU gets its write end with
//!   `getfd`) into `zstd -1` (`cat` where the host has no zstd) and a file, `cont`; the file is
//!   written under a temporary name and renamed once QEMU and the writer have both finished;
//! - quit = save the state the same way, then end QEMU: the client restarts the task later and
//!   the next start restores it (the guest's TCP connections are gone; the agent reconnects);
//! - stop = ACPI power button, pressed every 5 s (the image's init ends the agent's session and
//!   powers off; a guest still booting misses a press), SIGKILL after the grace period;
//!   kill = SIGKILL. Both delete the state and the socket;
//! - the QEMU process is `other_pid`, and its CPU time (from /proc while it runs) is the
//!   session's.

pub mod kvm;
pub mod os;
pub mod qmp;

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{wait_until, Backend, BackendError, Checkpoint, Exit};
use crate::job::Accel;
use qmp::{Qmp, QmpError};

/// The image's kernel command line, as `scripts/build-image` writes it into its disks and
/// manifest (a unit test keeps the two equal).
pub const KERNEL_ARGS: &str = "console=tty0 console=ttyS0 quiet panic=-1 cryptomgr.notests initcall_blacklist=crypto_kdf108_init 8250.nr_uarts=1";
/// Logical names of the image's files in the app version.
pub const KERNEL_FILE: &str = "copilot-vmlinuz";
pub const INITRAMFS_FILE: &str = "copilot-initramfs";

/// Files of the VM in the slot dir.
const SOCKET: &str = "copilot-vm.qmp";
const STATE: &str = "copilot-vm.state";
const STATE_PART: &str = "copilot-vm.state.part";
/// What the saved state was made with (it only loads into the same machine).
const STATE_INFO: &str = "copilot-vm.state.info";
const CONTEXT: &str = "copilot-vm.context.tar";
/// The guest's serial console (its init's and agent's log), appended across restarts.
const CONSOLE: &str = "copilot-vm.console";
/// Longest unix socket path (sun_path less its NUL).
const MAX_SOCKET_PATH: usize = 107;
/// The NIC's id, for `set_link`.
const NIC: &str = "nic0";

/// Time for QEMU to create its QMP socket.
const CONNECT_LIMIT: Duration = Duration::from_secs(30);
/// Longest wait for one QMP answer.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a save or a restore of the VM's state may take.
const MIGRATE_LIMIT: Duration = Duration::from_secs(300);
/// How often `stop` presses the power button while the VM has not powered off.
const POWER_BUTTON_AGAIN: Duration = Duration::from_secs(5);
/// Time QEMU gets to exit after `quit` before SIGKILL.
const QUIT_LIMIT: Duration = Duration::from_secs(10);

/// The image to boot.
#[derive(Clone, Debug)]
pub struct Image {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

/// Everything a VM is started with.
#[derive(Clone, Debug)]
pub struct VmSpec {
    /// The qemu-system-x86_64 to run.
    pub qemu: PathBuf,
    pub image: Image,
    pub memory_mb: u32,
    pub accel: Accel,
    /// The agent's config for the guest.
    pub agent_config: PathBuf,
    /// The slot dir: QEMU's working dir and the home of the VM's files.
    pub dir: PathBuf,
    /// Where the KVM verdict is cached (None: probe every time).
    pub kvm_cache: Option<PathBuf>,
}

/// `qemu-system-x86_64` to run: `$COPILOT_QEMU`, else the first on PATH.
pub fn find_qemu() -> Option<PathBuf> {
    if let Some(q) = std::env::var_os("COPILOT_QEMU").filter(|q| !q.is_empty()) {
        return Some(PathBuf::from(q));
    }
    find_on_path("qemu-system-x86_64")
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// The machine every boot and probe uses: q35, no default devices, user-mode networking (the
/// host's loopback is 10.0.2.2 to the guest), a virtio NIC and RNG, one CPU. QEMU's threads
/// get names (the virtual CPU's is `CPU 0/TCG` or `CPU 0/KVM`), for `top -H` and the tests.
pub(crate) fn machine_args(memory_mb: u32) -> Vec<String> {
    [
        "-name",
        "copilot,debug-threads=on",
        "-machine",
        "q35",
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
        "-smp",
        "1",
        "-netdev",
        "user,id=net0",
        "-device",
        &format!("virtio-net-pci,netdev=net0,id={NIC},romfile="),
        "-device",
        "virtio-rng-pci",
        "-m",
        &memory_mb.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn other(what: impl std::fmt::Display) -> BackendError {
    BackendError::Other(what.to_string())
}

fn qmp_err(e: QmpError) -> BackendError {
    BackendError::Other(format!("QMP: {e}"))
}

/// The VM's files in the slot dir.
#[derive(Clone, Debug)]
struct Files {
    socket: PathBuf,
    state: PathBuf,
    state_part: PathBuf,
    state_info: PathBuf,
    context: PathBuf,
    console: PathBuf,
}

impl Files {
    fn in_dir(dir: &Path) -> Result<Files, BackendError> {
        let socket = dir.join(SOCKET);
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(other(format!(
                "the slot dir's path is too long for a unix socket: {}",
                socket.display()
            )));
        }
        Ok(Files {
            socket,
            state: dir.join(STATE),
            state_part: dir.join(STATE_PART),
            state_info: dir.join(STATE_INFO),
            context: dir.join(CONTEXT),
            console: dir.join(CONSOLE),
        })
    }

    /// Removes the given files; missing ones are fine.
    fn remove(paths: &[&Path]) {
        for p in paths {
            if let Err(e) = std::fs::remove_file(p) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!("cannot remove {}: {e}", p.display());
                }
            }
        }
    }

    fn remove_state(&self) {
        Self::remove(&[&self.state, &self.state_part, &self.state_info]);
    }

    fn remove_all(&self) {
        self.remove_state();
        Self::remove(&[&self.socket, &self.context]);
    }
}

/// Lines of the guest's console the wrapper logs when the VM has ended for good.
const CONSOLE_TAIL: usize = 40;
/// What the image's init logs when it powers off because the agent's session is over.
const SESSION_OVER: &str = "powering off: session over";
/// The exit the backend reports when QEMU exited 0 but the guest did not end its session
/// (a kernel panic or reboot, which `-no-reboot` turns into an exit, or an init that could
/// not run the agent).
const GUEST_FAILED: i32 = 1;
/// After a failed save, checkpoints are not tried again for this long.
const SAVE_RETRY: Duration = Duration::from_secs(60);

/// What a saved state needs to load: the same memory and accelerator, and zstd if it is
/// compressed.
fn state_info(memory_mb: u32, accel: &str, compressed: bool) -> String {
    format!("memory_mb={memory_mb} accel={accel} zstd={compressed}\n")
}

/// Writes `agent_config` as `agent.toml` into a plain tar at `path` (0600: it holds the
/// password).
fn write_context(path: &Path, agent_config: &Path) -> Result<(), BackendError> {
    let config = std::fs::read(agent_config)
        .map_err(|e| other(format!("reading {}: {e}", agent_config.display())))?;
    let io = |e: std::io::Error| other(format!("writing {}: {e}", path.display()));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    let mut tar = tar::Builder::new(file);
    let mut header = tar::Header::new_ustar();
    header.set_size(config.len() as u64);
    header.set_mode(0o600);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    tar.append_data(&mut header, "agent.toml", config.as_slice())
        .map_err(io)?;
    tar.into_inner().and_then(|f| f.sync_all()).map_err(io)
}

/// Whether the VM computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    Running,
    Paused,
    Ended(Exit),
}

/// The copilot VM under QEMU.
#[derive(Debug)]
pub struct QemuBackend {
    qemu: Child,
    qmp: Qmp,
    files: Files,
    run: Run,
    /// What a state saved now would need to load.
    info: String,
    /// zstd, if the host has it (else states are saved uncompressed).
    zstd: Option<PathBuf>,
    /// The wrapper told QEMU to quit (its exit 0 then says nothing about the guest).
    quitting: bool,
    /// When a save last failed.
    save_failed: Option<Instant>,
}

impl QemuBackend {
    /// Restores the VM from the slot's saved state if there is a loadable one, else boots it.
    pub fn start(spec: &VmSpec) -> Result<QemuBackend, BackendError> {
        let files = Files::in_dir(&spec.dir)?;
        Files::remove(&[&files.socket, &files.state_part]);
        let zstd = find_on_path("zstd");
        if files.state.is_file() {
            let saved = std::fs::read_to_string(&files.state_info).unwrap_or_default();
            let made_with = [("kvm", true), ("kvm", false), ("tcg", true), ("tcg", false)]
                .into_iter()
                .find(|(a, z)| saved == state_info(spec.memory_mb, a, *z));
            match made_with {
                Some((accel, compressed)) => {
                    match Self::restore(spec, &files, accel, compressed, zstd.clone()) {
                        Ok(b) => return Ok(b),
                        Err(e) => {
                            tracing::warn!("cannot restore the saved VM state ({e}): booting")
                        }
                    }
                }
                None => tracing::warn!(
                    "the saved VM state was made with other settings ({}): booting",
                    saved.trim()
                ),
            }
            files.remove_state();
        }
        let accel = match spec.accel {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
            Accel::Auto => {
                if kvm::works(
                    &spec.qemu,
                    &spec.image,
                    spec.kvm_cache.as_deref(),
                    kvm::PROBE_LIMIT,
                ) {
                    "kvm"
                } else {
                    "tcg"
                }
            }
        };
        let b = Self::launch(spec, &files, accel, None, zstd)?;
        tracing::info!(pid = b.qemu.id(), accel, "VM booting");
        Ok(b)
    }

    /// Starts QEMU from the saved state and continues it.
    fn restore(
        spec: &VmSpec,
        files: &Files,
        accel: &str,
        compressed: bool,
        zstd: Option<PathBuf>,
    ) -> Result<QemuBackend, BackendError> {
        let started = Instant::now();
        // The state streams out of a child (zstd, or cat for an uncompressed one) into a pipe.
        let mut reader = match (compressed, &zstd) {
            (true, None) => return Err(other("the state is compressed and there is no zstd")),
            (true, Some(z)) => {
                let mut c = Command::new(z);
                c.args(["-d", "-c", "-q"]);
                c
            }
            (false, _) => Command::new("cat"),
        };
        let mut reader = reader
            .arg(&files.state)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| other(format!("starting the state's reader: {e}")))?;
        let source = reader
            .stdout
            .take()
            .map(OwnedFd::from)
            .ok_or_else(|| other("the state's reader has no stdout"))?;
        let launched = Self::launch(spec, files, accel, Some(source), zstd);
        let result = launched.and_then(|mut b| {
            b.wait_incoming()?;
            b.qmp.execute("cont", None).map_err(qmp_err)?;
            Ok(b)
        });
        if result.is_err() {
            let _ = reader.kill();
        }
        let _ = reader.wait();
        let b = result?;
        tracing::info!(
            pid = b.qemu.id(),
            accel,
            took_ms = started.elapsed().as_millis() as u64,
            "VM restored from its saved state"
        );
        Ok(b)
    }

    /// Starts QEMU (booting, or loading the state from `incoming`) and connects to QMP.
    fn launch(
        spec: &VmSpec,
        files: &Files,
        accel: &str,
        incoming: Option<OwnedFd>,
        zstd: Option<PathBuf>,
    ) -> Result<QemuBackend, BackendError> {
        write_context(&files.context, &spec.agent_config)?;
        let mut cmd = Command::new(&spec.qemu);
        cmd.args(["-accel", accel]);
        if accel == "kvm" {
            cmd.args(["-cpu", "host"]);
        }
        cmd.args(machine_args(spec.memory_mb))
            .arg("-kernel")
            .arg(&spec.image.kernel)
            .arg("-initrd")
            .arg(&spec.image.initramfs)
            .args(["-append", KERNEL_ARGS, "-drive"])
            .arg(format!("file={CONTEXT},format=raw,if=virtio,readonly=on"))
            .args(["-qmp", &format!("unix:{SOCKET},server=on,wait=off")])
            .args([
                "-chardev",
                &format!("file,id=console,path={CONSOLE},append=on"),
            ])
            .args(["-serial", "chardev:console"])
            .current_dir(&spec.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        if incoming.is_some() {
            cmd.args(["-S", "-incoming", &format!("fd:{}", os::CHILD_FD)]);
        }
        os::with_fd3(&mut cmd, incoming.as_ref().map(|f| f.as_fd()));
        let mut qemu = cmd.spawn().map_err(|error| BackendError::Start {
            what: spec.qemu.display().to_string(),
            error,
        })?;
        drop(incoming);
        let connected = Qmp::connect(&files.socket, CONNECT_LIMIT, QMP_TIMEOUT, || {
            matches!(qemu.try_wait(), Ok(None))
        });
        // QEMU has the context disk open (or failed): the password leaves the slot dir.
        Files::remove(&[&files.context]);
        let mut qmp = match connected {
            Ok(q) => q,
            Err(e) => {
                let _ = qemu.kill();
                let status = qemu.wait().ok();
                Files::remove(&[&files.socket]);
                return Err(other(format!(
                    "QEMU did not come up ({e}); it exited: {status:?}"
                )));
            }
        };
        // Save states as fast as the disk allows (QEMU's default limits the bandwidth).
        let set = qmp.execute(
            "migrate-set-parameters",
            Some(json!({ "max-bandwidth": 1u64 << 40 })),
        );
        let mut b = QemuBackend {
            qemu,
            qmp,
            files: files.clone(),
            run: Run::Running,
            info: state_info(spec.memory_mb, accel, zstd.is_some()),
            zstd,
            quitting: false,
            save_failed: None,
        };
        if let Err(e) = set {
            b.kill_now();
            return Err(qmp_err(e));
        }
        Ok(b)
    }

    /// Waits until QEMU has loaded the incoming state.
    fn wait_incoming(&mut self) -> Result<(), BackendError> {
        let done = wait_until(MIGRATE_LIMIT, || {
            if let Some(exit) = self.try_exit()? {
                return Err(other(format!(
                    "QEMU exited while loading the state ({exit})"
                )));
            }
            let status = self.qmp.execute("query-status", None).map_err(qmp_err)?;
            match status.get("status").and_then(Value::as_str) {
                Some("inmigrate") => Ok(None),
                Some("paused" | "prelaunch" | "postmigrate") => Ok(Some(())),
                other_status => Err(other(format!(
                    "unexpected VM status while loading: {other_status:?}"
                ))),
            }
        })?;
        done.ok_or_else(|| other(format!("the state did not load within {MIGRATE_LIMIT:?}")))
    }

    /// QEMU's exit, if it has exited (recorded).
    fn try_exit(&mut self) -> Result<Option<Exit>, BackendError> {
        if let Run::Ended(e) = self.run {
            return Ok(Some(e));
        }
        let status = self
            .qemu
            .try_wait()
            .map_err(|e| other(format!("checking on QEMU: {e}")))?;
        Ok(status.map(|s| {
            use std::os::unix::process::ExitStatusExt;
            let exit = match (s.code(), s.signal()) {
                (Some(0), _) if !self.quitting && !self.console_tail().contains(SESSION_OVER) => {
                    tracing::warn!(
                        "QEMU exited, but the guest did not end its session (see its console)"
                    );
                    Exit::Code(GUEST_FAILED)
                }
                (Some(c), _) => Exit::Code(c),
                (None, Some(sig)) => Exit::Signal(sig),
                (None, None) => Exit::Signal(0),
            };
            self.run = Run::Ended(exit);
            Files::remove(&[&self.files.socket]);
            tracing::info!(%exit, "QEMU ended");
            exit
        }))
    }

    /// Waits up to `limit` for QEMU to exit.
    fn wait_exit(&mut self, limit: Duration) -> Result<Option<Exit>, BackendError> {
        wait_until(limit, || self.try_exit())
    }

    /// SIGKILL to QEMU and reap it.
    fn kill_now(&mut self) {
        if let Err(e) = crate::proctree::signal(self.qemu.id() as i32, libc::SIGKILL) {
            tracing::warn!("cannot kill QEMU: {e}");
        }
        let _ = self.qemu.wait();
        if !matches!(self.run, Run::Ended(_)) {
            self.run = Run::Ended(Exit::Signal(libc::SIGKILL));
        }
        Files::remove(&[&self.files.socket]);
    }

    /// Saves the (stopped) VM's state into the state file.
    fn save(&mut self) -> Result<(), BackendError> {
        let started = Instant::now();
        let f = &self.files;
        let part = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&f.state_part)
            .map_err(|e| other(format!("creating {}: {e}", f.state_part.display())))?;
        // QEMU writes into a pipe; a child (zstd, or cat without it) writes the file.
        let (r, sink) = os::pipe().map_err(|e| other(format!("a pipe: {e}")))?;
        let mut writer = match &self.zstd {
            Some(z) => {
                let mut c = Command::new(z);
                c.args(["-1", "-q", "-c"]);
                c
            }
            None => Command::new("cat"),
        };
        let mut writer = writer
            .stdin(Stdio::from(r))
            .stdout(Stdio::from(part))
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| other(format!("starting the state's writer: {e}")))?;
        let migrated = self.migrate_to(sink);
        if migrated.is_err() {
            let _ = writer.kill();
        }
        // The writer ends once QEMU has closed the pipe and it has written everything.
        let written = match wait_until(MIGRATE_LIMIT, || {
            writer
                .try_wait()
                .map_err(|e| other(format!("the state's writer: {e}")))
        }) {
            Ok(Some(s)) if s.success() => Ok(()),
            Ok(Some(s)) => Err(other(format!("the state's writer failed: {s}"))),
            Ok(None) => {
                let _ = writer.kill();
                let _ = writer.wait();
                Err(other("the state's writer did not finish"))
            }
            Err(e) => Err(e),
        };
        let result = migrated.and(written).and_then(|()| {
            let f = &self.files;
            std::fs::write(&f.state_info, &self.info)
                .and_then(|()| File::open(&f.state_part)?.sync_all())
                .and_then(|()| std::fs::rename(&f.state_part, &f.state))
                .map_err(|e| other(format!("storing the VM state: {e}")))
        });
        match &result {
            Ok(()) => tracing::info!(
                took_ms = started.elapsed().as_millis() as u64,
                bytes = std::fs::metadata(&self.files.state).map_or(0, |m| m.len()),
                "VM state saved"
            ),
            Err(e) => {
                tracing::warn!("saving the VM state failed: {e}");
                Files::remove(&[&self.files.state_part]);
            }
        }
        result
    }

    /// Migrates the VM's state into `sink` and waits until QEMU says it is complete.
    fn migrate_to(&mut self, sink: OwnedFd) -> Result<(), BackendError> {
        self.qmp
            .send_fd("copilot-state", sink.as_fd())
            .map_err(qmp_err)?;
        // QEMU holds its own copy now; ours must go, so that the reader sees the end.
        drop(sink);
        self.qmp
            .execute("migrate", Some(json!({ "uri": "fd:copilot-state" })))
            .map_err(qmp_err)?;
        let done = wait_until(MIGRATE_LIMIT, || {
            let m = self.qmp.execute("query-migrate", None).map_err(qmp_err)?;
            match m.get("status").and_then(Value::as_str) {
                Some("completed") => Ok(Some(())),
                Some("failed" | "cancelled") => Err(other(format!(
                    "saving the VM state failed: {}",
                    m.get("error-desc").and_then(Value::as_str).unwrap_or("?")
                ))),
                _ => Ok(None),
            }
        })?;
        done.ok_or_else(|| other(format!("the state was not saved within {MIGRATE_LIMIT:?}")))
    }

    /// `stop` unless paused already.
    fn pause(&mut self) -> Result<(), BackendError> {
        if self.run == Run::Running {
            self.qmp.execute("stop", None).map_err(qmp_err)?;
            self.run = Run::Paused;
        }
        Ok(())
    }

    /// `cont` if paused.
    fn go(&mut self) -> Result<(), BackendError> {
        if self.run == Run::Paused {
            self.qmp.execute("cont", None).map_err(qmp_err)?;
            self.run = Run::Running;
        }
        Ok(())
    }

    fn ended(&self) -> bool {
        matches!(self.run, Run::Ended(_))
    }

    /// The last lines of the guest's console.
    fn console_tail(&self) -> String {
        let text = std::fs::read(&self.files.console).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(CONSOLE_TAIL)..].join("\n")
    }

    /// Logs the end of the guest's console: the task's stderr, which goes back with the
    /// result, then shows how the VM's session ended.
    fn log_console_tail(&self) {
        for line in self.console_tail().lines() {
            tracing::info!("console: {line}");
        }
    }
}

impl Backend for QemuBackend {
    fn pid(&self) -> Option<u32> {
        Some(self.qemu.id())
    }

    fn suspend(&mut self) -> Result<(), BackendError> {
        if self.try_exit()?.is_some() {
            return Ok(());
        }
        self.pause()
    }

    fn resume(&mut self) -> Result<(), BackendError> {
        if self.try_exit()?.is_some() {
            return Ok(());
        }
        self.go()
    }

    fn set_network(&mut self, up: bool) -> Result<(), BackendError> {
        if self.try_exit()?.is_some() {
            return Ok(());
        }
        tracing::info!(up, "network use changed: the VM's link follows");
        self.qmp
            .execute("set_link", Some(json!({ "name": NIC, "up": up })))
            .map(|_| ())
            .map_err(qmp_err)
    }

    fn checkpoint(&mut self) -> Result<Checkpoint, BackendError> {
        if self.try_exit()?.is_some() {
            return Ok(Checkpoint::NothingToLose);
        }
        if self.save_failed.is_some_and(|t| t.elapsed() < SAVE_RETRY) {
            return Ok(Checkpoint::Busy);
        }
        let was = self.run;
        self.pause()?;
        let saved = self.save();
        self.save_failed = saved.is_err().then(Instant::now);
        if was == Run::Running {
            self.go()?;
        }
        // A failed save is no checkpoint; the session asks again (tried after SAVE_RETRY).
        Ok(if saved.is_ok() {
            Checkpoint::Saved
        } else {
            Checkpoint::Busy
        })
    }

    fn drain(&mut self) -> Result<(), BackendError> {
        // No signal reaches the agent in the guest: it drains by its config's drain_at, and
        // the session's end powers the VM down.
        tracing::info!(
            "drain: the VM's agent drains at its drain_at; the session end powers it down"
        );
        Ok(())
    }

    fn quit(&mut self, grace: Duration) -> Result<Exit, BackendError> {
        if let Some(exit) = self.try_exit()? {
            return Ok(exit);
        }
        let started = Instant::now();
        self.pause()?;
        if let Err(e) = self.save() {
            tracing::warn!("cannot save the VM ({e}): powering it down instead");
            self.files.remove_state();
            return self.stop(grace);
        }
        // The state is safe: QEMU may go.
        self.quitting = true;
        if let Err(e) = self.qmp.execute("quit", None) {
            tracing::debug!("QMP quit: {e}");
        }
        if self.wait_exit(QUIT_LIMIT)?.is_none() {
            self.kill_now();
        }
        tracing::info!(
            took_ms = started.elapsed().as_millis() as u64,
            "VM saved and ended"
        );
        Ok(self.try_exit()?.unwrap_or(Exit::Signal(libc::SIGKILL)))
    }

    fn stop(&mut self, grace: Duration) -> Result<Exit, BackendError> {
        if !self.ended() {
            self.go()?;
            // The power button: the init ends the agent's session and powers off. Pressed
            // again now and then: a guest still booting does not watch it yet.
            let deadline = Instant::now() + grace;
            loop {
                if let Err(e) = self.qmp.execute("system_powerdown", None) {
                    tracing::warn!("cannot press the VM's power button: {e}");
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if self.wait_exit(left.min(POWER_BUTTON_AGAIN))?.is_some() {
                    break;
                }
                if Instant::now() >= deadline {
                    tracing::warn!("the VM did not power off within {grace:?}: killing it");
                    self.kill_now();
                    break;
                }
            }
        }
        // The session is over: nothing to restore.
        self.log_console_tail();
        self.files.remove_all();
        Ok(self.try_exit()?.unwrap_or(Exit::Signal(libc::SIGKILL)))
    }

    fn kill(&mut self) -> Result<(), BackendError> {
        if !self.ended() {
            self.kill_now();
        }
        self.log_console_tail();
        self.files.remove_all();
        Ok(())
    }

    fn poll(&mut self) -> Result<Option<Exit>, BackendError> {
        let exit = self.try_exit()?;
        if exit.is_some() {
            // The guest powered off by itself: its session is over.
            self.log_console_tail();
            self.files.remove_state();
        }
        Ok(exit)
    }

    fn cpu_seconds(&self) -> f64 {
        let pid = self.qemu.id() as i32;
        let live = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| crate::proctree::parse(pid, &s))
            .filter(|p| !p.dead())
            .map_or(0.0, |p| p.cpu_seconds);
        // Reaped QEMUs (an earlier failed restore) and compressors count too.
        crate::proctree::rusage_cpu(libc::RUSAGE_CHILDREN) + live
    }
}

impl Drop for QemuBackend {
    fn drop(&mut self) {
        if !self.ended() {
            self.kill_now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_command_line_is_the_images() {
        let script = include_str!("../../../../scripts/build-image");
        let args: Vec<&str> = script
            .lines()
            .filter_map(|l| {
                l.strip_prefix("KERNEL_ARGS=\"")
                    .or_else(|| l.strip_prefix("KERNEL_ARGS+=\" "))
            })
            .map(|l| l.trim_end_matches('"'))
            .collect();
        assert_eq!(args.join(" "), KERNEL_ARGS);
    }

    #[test]
    fn the_context_tar_holds_the_config_privately() {
        use std::io::Read;
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("c.toml");
        std::fs::write(&config, "[xmpp]\npassword = \"pw\"\n").unwrap();
        let tar_path = dir.path().join("ctx.tar");
        write_context(&tar_path, &config).unwrap();
        let mode = std::fs::metadata(&tar_path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let bytes = std::fs::read(&tar_path).unwrap();
        // The image's init recognises a context disk by this magic (docs/IMAGE.md).
        assert_eq!(&bytes[257..262], b"ustar");
        let mut a = tar::Archive::new(bytes.as_slice());
        let mut entries: Vec<(String, String)> = Vec::new();
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            let mut s = String::new();
            e.read_to_string(&mut s).unwrap();
            entries.push((e.path().unwrap().display().to_string(), s));
        }
        assert_eq!(
            entries,
            [(
                "agent.toml".to_owned(),
                "[xmpp]\npassword = \"pw\"\n".to_owned()
            )]
        );
    }

    #[test]
    fn slot_dirs_too_long_for_a_socket_are_refused() {
        let long = PathBuf::from("/").join("d".repeat(120));
        assert!(Files::in_dir(&long).is_err());
        assert!(Files::in_dir(Path::new("/var/lib/boinc/slots/3")).is_ok());
    }
}
