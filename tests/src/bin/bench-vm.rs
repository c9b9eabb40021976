//! `bench-vm`: the copilot VM image's sizes, how long it takes from starting QEMU until the
//! manager sees the VM's agent online (TCG with the plain vmlinux through PVH, TCG with the
//! compressed vmlinuz, TCG from the raw disk through BIOS and syslinux, and KVM where a test boot
//! shows it works), how long a clean power-off takes, and the guest's memory footprint.
//!
//! Each boot is a fresh VM with an agent account of its own against one private Prosody and
//! manager on the host (the stack the VM test uses). Prints a markdown table; the numbers go
//! into docs/BENCHMARKS.md.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use clap::Parser;
use copilot_tests::vm::{harness, image, workspace, Context, Vm};
use copilot_tests::Harness;

#[derive(Debug, Parser)]
#[command(about = "Measure the copilot VM image: sizes, boot to agent online, memory")]
struct Args {
    /// Boots per configuration.
    #[arg(long, default_value_t = 5)]
    boots: usize,
    /// Boots from the raw disk (slow under TCG: BIOS and the kernel's decompression).
    #[arg(long, default_value_t = 2)]
    disk_boots: usize,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    memory: u32,
    /// Virtual CPUs (TCG runs one host thread per vCPU).
    #[arg(long, default_value_t = 1)]
    cpus: u32,
}

/// What one boot took.
struct Boot {
    /// QEMU started → the manager lists the agent.
    online: Duration,
    /// The guest kernel's uptime when init started and when it started the agent.
    init_at: f64,
    agent_at: f64,
    /// Power button → QEMU exited.
    power_off: Duration,
}

/// The kernel uptime in an init log line `copilot-init: [UPTIME] <what>…`.
fn uptime_of(console: &str, what: &str) -> Option<f64> {
    console.lines().find_map(|l| {
        let rest = l.strip_prefix("copilot-init: [")?;
        let (up, text) = rest.split_once("] ")?;
        text.starts_with(what).then(|| up.parse().ok()).flatten()
    })
}

fn boot_once(h: &mut Harness, image: &Path, name: &str, run_vm: &[&str]) -> Result<Boot> {
    let mut vm = Vm::boot(h, image, name, Context::AgentToml, run_vm);
    let online = vm.wait_known(h);
    let console = vm.console();
    let init_at = uptime_of(&console, "starting (").context("no init start in the console")?;
    let agent_at =
        uptime_of(&console, "starting the agent").context("no agent start in the console")?;
    let pressed = Instant::now();
    vm.press_power_button();
    vm.assert_clean_power_off();
    Ok(Boot {
        online,
        init_at,
        agent_at,
        power_off: pressed.elapsed(),
    })
}

/// The guest's memory use with the agent idle, seen by a job, and QEMU's resident memory.
fn measure_memory(h: &mut Harness, image: &Path, run_vm: &[&str]) -> Result<(u64, u64, u64)> {
    let mut vm = Vm::boot(h, image, "bench-memory", Context::AgentToml, run_vm);
    vm.wait_known(h);
    let job = h.write_job(
        "meminfo",
        "name = \"meminfo\"\ncommand = [\"sh\", \"-c\", \"cat /proc/meminfo > meminfo.txt\"]\n\
         outputs = [\"meminfo.txt\"]\n",
        &[],
    );
    let ids = h.submit(&job);
    let done = h.wait_final(&ids, Duration::from_secs(120));
    let qemu_rss = std::fs::read_to_string(format!("/proc/{}/status", vm.qemu_pid()))?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())
        .context("no VmRSS of QEMU")?;
    if done[0].state != copilot_protocol::JobState::Done {
        bail!("the meminfo job failed: {:?}", done[0].outcome);
    }
    let text = std::fs::read_to_string(h.results(done[0].id).join("meminfo.txt"))?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())
            .ok_or_else(|| anyhow!("no {name} in /proc/meminfo"))
    };
    let (total, available) = (field("MemTotal:")?, field("MemAvailable:")?);
    vm.press_power_button();
    vm.assert_clean_power_off();
    Ok((total, total - available, qemu_rss))
}

/// Whether run-vm's bounded test boot says KVM works here.
fn kvm_works() -> Result<bool> {
    let out = Command::new(workspace().join("scripts/run-vm"))
        .args(["--accel", "auto", "--dry-run"])
        .output()
        .context("running scripts/run-vm --dry-run")?;
    Ok(String::from_utf8_lossy(&out.stdout).contains("-accel kvm"))
}

fn stats(values: &mut [f64]) -> String {
    values.sort_by(f64::total_cmp);
    let median = values[values.len() / 2];
    format!(
        "{median:.2} (min {:.2}, max {:.2})",
        values[0],
        values[values.len() - 1]
    )
}

fn file_size(image: &Path, name: &str) -> Result<u64> {
    Ok(std::fs::metadata(image.join(name))
        .with_context(|| format!("{name} in {}", image.display()))?
        .len())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let image = image().map_err(|why| anyhow!("no image: {why}"))?;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;

    println!("## Sizes ({})\n", image.display());
    println!("| file | bytes | MiB |\n|---|---:|---:|");
    let (kernel, initramfs) = (file_size(image, "vmlinuz")?, file_size(image, "initramfs")?);
    for name in [
        "vmlinuz",
        "initramfs",
        "vmlinux",
        "copilot.raw",
        "copilot.qcow2",
        "copilot.vdi",
        "copilot.vmdk",
    ] {
        let b = file_size(image, name)?;
        println!("| {name} | {b} | {:.2} |", mib(b));
    }
    let both = kernel + initramfs;
    println!("| vmlinuz + initramfs | {both} | {:.2} |\n", mib(both));

    let memory = args.memory.to_string();
    let cpus = args.cpus.to_string();
    let mut configs: Vec<(&str, Vec<&str>, usize)> = vec![
        (
            "TCG, direct, vmlinux (PVH)",
            vec!["--accel", "tcg", "--kernel", "vmlinux"],
            args.boots,
        ),
        (
            "TCG, direct, vmlinuz",
            vec!["--accel", "tcg", "--kernel", "vmlinuz"],
            args.boots,
        ),
        (
            "TCG, raw disk (SeaBIOS, syslinux)",
            vec!["--accel", "tcg", "--boot", "raw"],
            args.disk_boots,
        ),
    ];
    let kvm = kvm_works()?;
    if kvm {
        configs.push(("KVM, direct, vmlinux", vec!["--accel", "kvm"], args.boots));
    }
    let mut h = harness("");
    println!(
        "## Boot to agent online ({} MiB guest, {} vCPU)\n",
        args.memory, args.cpus
    );
    println!(
        "| configuration | boots | QEMU start → agent online, s | kernel uptime at init, s | \
         … at agent start, s | power button → QEMU exit, s |\n|---|---:|---|---|---|---|"
    );
    for (c, (label, run_vm, boots)) in configs.iter().enumerate() {
        let mut run_vm = run_vm.clone();
        run_vm.extend(["--memory", &memory, "--cpus", &cpus]);
        let mut online = Vec::new();
        let mut init = Vec::new();
        let mut agent = Vec::new();
        let mut off = Vec::new();
        for i in 0..*boots {
            let b = boot_once(&mut h, image, &format!("bench-{c}-{i}"), &run_vm)?;
            online.push(b.online.as_secs_f64());
            init.push(b.init_at);
            agent.push(b.agent_at);
            off.push(b.power_off.as_secs_f64());
        }
        println!(
            "| {label} | {boots} | {} | {} | {} | {} |",
            stats(&mut online),
            stats(&mut init),
            stats(&mut agent),
            stats(&mut off)
        );
    }
    if !kvm {
        println!(
            "| KVM | – | not measured: run-vm's test boot with KVM fails on this host | | | |"
        );
    }

    let (total, used, rss) =
        measure_memory(&mut h, image, &["--accel", "tcg", "--memory", &memory])?;
    println!("\n## Memory (TCG, direct boot, agent idle)\n");
    println!("| guest MemTotal | guest used (MemTotal − MemAvailable) | QEMU RSS on the host |");
    println!("|---:|---:|---:|");
    println!(
        "| {:.1} MiB | {:.1} MiB | {:.1} MiB |",
        total as f64 / 1024.0,
        used as f64 / 1024.0,
        rss as f64 / 1024.0
    );
    Ok(())
}
