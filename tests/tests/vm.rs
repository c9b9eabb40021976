//! The copilot VM image under QEMU (TCG) with the real Prosody and manager on the host: the
//! image `scripts/build-image` makes boots with `scripts/run-vm`, its agent comes online over
//! QEMU's user networking (the host's loopback is 10.0.2.2 to the guest), runs jobs end to end
//! (one of them into the memory limit of its cgroup: the VM mounts cgroup v2, which the CI hosts
//! do not offer) and the VM powers off when told (ACPI power button) or when its agent has been
//! idle. The disks boot too, and building twice gives the same bytes.
//!
//! The init's contextualization parsers (image/context.sh) also run on the host, under the
//! image's own busybox, against good and bad input.
//!
//! The image is built once per test binary into `target/vm-image`; `build-image` does nothing
//! when its inputs are unchanged. Without QEMU, or when the Debian packages cannot be
//! downloaded, the tests print `skipped:` and return.

use std::path::Path;
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use copilot_protocol::api::JobView;
use copilot_protocol::sandbox::Protection;
use copilot_protocol::JobState;
use copilot_tests::vm::{build, harness, image_or_skip, release_key, Context, Vm, HOST};
use sha2::Digest;

const JOB_TIMEOUT: Duration = Duration::from_secs(120);

/// VMs boot one test at a time: TCG wants the CPUs.
fn one_vm_test_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

const PROBE_JOB: &str = r#"
name = "vm-probe"
command = ["sh", "probe.sh"]
outputs = ["where.txt", "uid.txt", "digest.txt", "cmdline.txt", "dmesg.txt"]

[[inputs]]
path = "probe.sh"

[[inputs]]
path = "data.txt"
"#;

const PROBE_SH: &str = "cat /etc/copilot/release > where.txt
id -u > uid.txt
sha256sum data.txt | cut -d' ' -f1 > digest.txt
cat /proc/cmdline > cmdline.txt
dmesg > dmesg.txt 2>&1 || true
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
        "vm-1",
        Context::PasswordOnCommandLine,
        &["--boot", "direct", "--accel", "tcg"],
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
    let dmesg = read("dmesg.txt");
    assert!(!dmesg.contains("copilot.password"), "{dmesg}");

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
        .map(|&(disk, how)| {
            let name = format!("vm-{disk}");
            Vm::boot(
                &mut h,
                image,
                &name,
                how,
                &["--boot", disk, "--accel", "tcg"],
            )
        })
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

/// Runs image/context.sh as the image holds it, under the image's busybox, with this user-data
/// and kernel command line; returns the exit status's success and the output: the log and
/// error lines, then the settings as the agent would get them and the public command line.
fn parse_context(image: &Path, user_data: &str, cmdline: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("a temp dir");
    let d = dir.path();
    let unpack = Command::new("sh")
        .arg("-c")
        .arg("zstd -dc \"$0\" | cpio -idm --quiet bin/busybox lib/copilot/context.sh")
        .arg(image.join("initramfs"))
        .current_dir(d)
        .status()
        .expect("unpacking the initramfs");
    assert!(unpack.success());
    std::fs::create_dir_all(d.join("path")).unwrap();
    for tool in ["sh", "awk", "sed", "tr", "cat", "rm"] {
        std::os::unix::fs::symlink(d.join("bin/busybox"), d.join("path").join(tool)).unwrap();
    }
    std::fs::create_dir_all(d.join("context")).unwrap();
    std::fs::write(d.join("context/user-data"), user_data).unwrap();
    std::fs::write(d.join("cmdline"), cmdline).unwrap();
    let driver = r#"
log() { echo "log: $*"; }
fail() { echo "error: $*"; exit 1; }
RUN=$PWD CONTEXT=$PWD/context SETTINGS=$PWD/settings
. lib/copilot/context.sh
: >"$SETTINGS"
read_user_data
cmdline_settings "$(cat cmdline)" public
. "$SETTINGS"
for key in NAME JID PASSWORD SERVER; do
    eval "printf '%s=[%s]\n' $key \"\$COPILOT_AGENT_$key\""
done
printf 'public=[%s]\n' "$(cat public)"
"#;
    let out = Command::new(d.join("path/sh"))
        .args(["-c", driver])
        .current_dir(d)
        .env_clear()
        .env("PATH", d.join("path"))
        .output()
        .expect("running busybox sh");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn the_contextualization_parsers_take_good_input_and_refuse_bad_input() {
    let Some(image) =
        image_or_skip("the_contextualization_parsers_take_good_input_and_refuse_bad_input")
    else {
        return;
    };
    let user_data = "[amiconfig]\nplugins=cernvm\n[copilot-begin]\r\n# the account\r\n  \
                     name = vm 7\r\njid=vm-7@example.org\n\npassword = it's \"q\" $HOME `x` \\\n\
                     [copilot-end]\n[cernvm]\nx=1\n";
    let cmdline =
        "console=ttyS0 quiet copilot.server=10.0.2.2:5222 copilot.name=vm-8 copilot.probe";
    let (ok, out) = parse_context(image, user_data, cmdline);
    assert!(ok, "{out}");
    for line in [
        "NAME=[vm-8]",
        "JID=[vm-7@example.org]",
        "PASSWORD=[it's \"q\" $HOME `x` \\]",
        "SERVER=[10.0.2.2:5222]",
        "public=[console=ttyS0 quiet]",
    ] {
        assert!(out.lines().any(|l| l == line), "no {line:?} in\n{out}");
    }
    assert!(
        !out.contains("password="),
        "the password was logged:\n{out}"
    );

    let section = |body: &str| format!("[copilot-begin]\n{body}[copilot-end]\n");
    for (user_data, cmdline, why) in [
        (section("colour=blue\n"), "", "unknown setting 'colour'"),
        (section("name=a\tb\n"), "", "control characters"),
        (
            section("just words\n"),
            "",
            "line 1 of the [copilot-begin] section is not KEY=VALUE",
        ),
        (
            "[copilot-begin]\nname=x\n".to_owned(),
            "",
            "[copilot-begin] without [copilot-end]",
        ),
        (
            section("") + &section(""),
            "",
            "more than one [copilot-begin] section",
        ),
        (
            "[copilot-end]\n".to_owned(),
            "",
            "[copilot-end] without [copilot-begin]",
        ),
        (
            String::new(),
            "quiet copilot.colour=blue",
            "unknown setting 'colour'",
        ),
        (
            String::new(),
            "quiet copilot.name",
            "'copilot.name' is not copilot.KEY=VALUE",
        ),
    ] {
        let (ok, out) = parse_context(image, &user_data, cmdline);
        assert!(!ok, "accepted {user_data:?} {cmdline:?}:\n{out}");
        assert!(out.contains(why), "{why:?} not in\n{out}");
    }
}
