//! Whether KVM really runs guests here. `/dev/kvm` can exist and accept `-accel kvm` while
//! guests hang (some nested setups), so, like `scripts/run-vm`, the wrapper boots the image
//! once with KVM and the kernel argument `copilot.probe` (the init prints `probe ok` and powers
//! off) and uses KVM only if that marker appears within a bounded time. The verdict is cached
//! in a file (the project dir), keyed by the host kernel, the QEMU version and the image.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use super::{machine_args, Image};

/// Longest a probe boot may take (generous: the host may be busy).
pub const PROBE_LIMIT: Duration = Duration::from_secs(20);
/// What the image's init prints when booted with `copilot.probe`.
const MARKER: &str = "probe ok";

/// Whether this process may open /dev/kvm for reading and writing.
fn device_usable() -> bool {
    // SAFETY: access reads a NUL-terminated path literal and touches no memory of ours.
    unsafe { libc::access(c"/dev/kvm".as_ptr(), libc::R_OK | libc::W_OK) == 0 }
}

/// The cache key: what a verdict depends on.
fn verdict_key(qemu: &Path, image: &Image) -> String {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let version = Command::new(qemu)
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_owned()
        })
        .unwrap_or_default();
    let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    format!(
        "{} | {} | {} {} | {} {}",
        release.trim(),
        version.trim(),
        image.kernel.display(),
        size(&image.kernel),
        image.initramfs.display(),
        size(&image.initramfs)
    )
}

/// Whether KVM boots `image` under `qemu`, probing (at most `limit`) unless `cache` holds a
/// verdict for the same key; a new verdict is written to `cache`.
pub fn works(qemu: &Path, image: &Image, cache: Option<&Path>, limit: Duration) -> bool {
    if !device_usable() {
        return false;
    }
    let key = verdict_key(qemu, image);
    if let Some(text) = cache.and_then(|c| std::fs::read_to_string(c).ok()) {
        let mut lines = text.lines();
        if lines.next() == Some(key.as_str()) {
            let yes = lines.next() == Some("yes");
            tracing::info!(kvm = yes, "KVM verdict from the cache");
            return yes;
        }
    }
    let started = std::time::Instant::now();
    let yes = probe(qemu, image, limit);
    tracing::info!(
        kvm = yes,
        took_ms = started.elapsed().as_millis() as u64,
        "KVM probe boot"
    );
    if let Some(c) = cache {
        if let Err(e) = std::fs::write(c, format!("{key}\n{}\n", if yes { "yes" } else { "no" })) {
            tracing::warn!("cannot cache the KVM verdict in {}: {e}", c.display());
        }
    }
    yes
}

/// One bounded probe boot with KVM: whether the marker came on the serial console in time.
fn probe(qemu: &Path, image: &Image, limit: Duration) -> bool {
    let mut cmd = Command::new(qemu);
    cmd.args(["-accel", "kvm", "-cpu", "host"])
        .args(machine_args(256))
        .args(["-serial", "stdio", "-kernel"])
        .arg(&image.kernel)
        .arg("-initrd")
        .arg(&image.initramfs)
        .arg("-append")
        .arg(format!("{} copilot.probe", super::KERNEL_ARGS))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    super::os::with_fd3(&mut cmd, None);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("cannot run the KVM probe: {e}");
            return false;
        }
    };
    let (tx, rx) = mpsc::channel();
    if let Some(out) = child.stdout.take() {
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                if line.contains(MARKER) {
                    let _ = tx.send(());
                    return;
                }
            }
        });
    }
    let seen = rx.recv_timeout(limit).is_ok();
    // The probe powers off by itself; a hung one is killed.
    let _ = child.kill();
    let _ = child.wait();
    seen
}
