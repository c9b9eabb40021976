//! A real BOINC client (Debian's `boinc`) driving `copilot-boinc-wrapper`, with no project
//! server: [`BoincClient::create`] writes a client data dir whose hand-made `client_state.xml`
//! holds one project (its URL a dead loopback port), the copilot app version (wrapper, agent,
//! job file) and one work unit whose result is ready to run, so the client starts the task at
//! once. [`BoincClient::start`] runs `boinc --dir D --gui_rpc_port P --allow_multiple_clients`
//! on a free loopback port; the `boinccmd` helpers drive it over GUI RPC.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use copilot_boinc::proctree;
use copilot_stack::{free_port, Supervised};

/// The fake project's URL: nothing listens on port 9, so the client never reaches a server.
pub const PROJECT_URL: &str = "http://127.0.0.1:9/copilot/";
/// `escape_project_url(PROJECT_URL)`: the project's dir name.
const PROJECT_DIR: &str = "127.0.0.1_9_copilot";
/// The result the client runs.
pub const RESULT: &str = "copilot_wu_1_0";
/// The volunteer the client reports in init_data.xml.
pub const USER_ID: u64 = 42;
pub const HOST_ID: u64 = 7;
pub const TEAM_ID: u64 = 3;
/// The account key in the account file.
pub const AUTHENTICATOR: &str = "0123456789abcdef0123456789abcdef";
/// The wrapper binary's name.
pub const WRAPPER_BIN: &str = "copilot-boinc-wrapper";

/// Whether Debian's BOINC client is installed (scripts/install-deps installs it).
pub fn client_installed() -> bool {
    ["boinc", "boinccmd"].iter().all(|b| {
        Command::new("sh")
            .args(["-c", &format!("command -v {b}")])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// What goes into the app version and the work unit.
#[derive(Debug, Clone)]
pub struct App<'a> {
    /// Where the workspace's binaries are.
    pub bin_dir: &'a Path,
    /// The job file's text (`copilot_job.xml`).
    pub job_xml: &'a str,
    /// The agent config template (`copilot_agent.toml`), a file of the work unit.
    pub agent_toml: &'a str,
    /// The app version's `api_version`: from 6.0 on the client shares memory through the
    /// mmap'ed `boinc_mmap_file`; without one, through a System V segment.
    pub api_version: Option<&'a str>,
    /// Install the app as a volunteer on the anonymous platform would: the files and the
    /// `app_info.xml` of `scripts/package-boinc-app`'s `anonymous/` dir go into the project
    /// dir, and client_state.xml holds no app version (`bin_dir`, `job_xml` and
    /// `api_version` are then unused).
    pub anonymous: Option<&'a Path>,
    /// The QEMU the client's tasks find in `$COPILOT_QEMU` (qemu backend; the image comes
    /// with the package, `scripts/package-boinc-app --image`).
    pub qemu: Option<&'a Path>,
}

/// A BOINC client data dir and, once started, the client.
#[derive(Debug)]
pub struct BoincClient {
    dir: PathBuf,
    port: u16,
    password: String,
    process: Option<Supervised>,
    qemu: Option<PathBuf>,
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

impl BoincClient {
    /// Write a data dir in `dir` (created) for one copilot task.
    pub fn create(dir: &Path, app: &App<'_>) -> BoincClient {
        let project = dir.join("projects").join(PROJECT_DIR);
        std::fs::create_dir_all(&project).expect("project dir");
        let copy = |from: &Path, to: &Path| {
            std::fs::copy(from, to).unwrap_or_else(|e| panic!("copying {}: {e}", from.display()));
        };
        let app_version = match app.anonymous {
            Some(package) => {
                for f in std::fs::read_dir(package)
                    .expect("the package dir")
                    .flatten()
                {
                    copy(&f.path(), &project.join(f.file_name()));
                }
                String::new()
            }
            None => {
                copy(
                    &app.bin_dir.join(WRAPPER_BIN),
                    &project.join("copilot-boinc-wrapper_1.00"),
                );
                copy(
                    &app.bin_dir.join(copilot_stack::AGENT_BIN),
                    &project.join("copilot-agent_1.00"),
                );
                write(&project.join("copilot_job_1.00.xml"), app.job_xml);
                let api_version = app
                    .api_version
                    .map(|v| format!("  <api_version>{v}</api_version>\n"))
                    .unwrap_or_default();
                format!(
                    r#"<app><name>copilot</name><user_friendly_name>copilot</user_friendly_name></app>
<file_info><name>copilot-boinc-wrapper_1.00</name><status>1</status><executable/></file_info>
<file_info><name>copilot-agent_1.00</name><status>1</status><executable/></file_info>
<file_info><name>copilot_job_1.00.xml</name><status>1</status></file_info>
<app_version>
  <app_name>copilot</app_name>
  <version_num>100</version_num>
  <platform>x86_64-pc-linux-gnu</platform>
{api_version}  <avg_ncpus>1</avg_ncpus>
  <flops>1e9</flops>
  <file_ref><file_name>copilot-boinc-wrapper_1.00</file_name><main_program/></file_ref>
  <file_ref><file_name>copilot-agent_1.00</file_name><open_name>copilot-agent</open_name></file_ref>
  <file_ref><file_name>copilot_job_1.00.xml</file_name><open_name>copilot_job.xml</open_name></file_ref>
</app_version>
"#
                )
            }
        };
        write(&project.join("copilot_agent_wu_1.toml"), app.agent_toml);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_secs();
        let deadline = now + 7 * 86400;
        // The packaged app version says <needs_network/>, and the client runs such an app only
        // while network use is allowed: "auto" (2), and no unsigned_apps_ok (which keeps the
        // network off; the anonymous platform needs no signatures). Its attempts to reach the
        // project go to a dead loopback port. Otherwise network use stays "never" (3) and
        // the hand-made app version's unsigned files are allowed.
        let (network, unsigned) = if app.anonymous.is_some() {
            (2, "")
        } else {
            (3, "<unsigned_apps_ok>1</unsigned_apps_ok>")
        };
        write(
            &dir.join(format!("account_{PROJECT_DIR}.xml")),
            &format!(
                "<account>\n<master_url>{PROJECT_URL}</master_url>\n<authenticator>{AUTHENTICATOR}</authenticator>\n<project_name>copilot</project_name>\n</account>\n"
            ),
        );
        write(
            &dir.join("client_state.xml"),
            &format!(
                r#"<client_state>
<project>
  <master_url>{PROJECT_URL}</master_url>
  <project_name>copilot</project_name>
  <scheduler_url>http://127.0.0.1:9/copilot_cgi/cgi</scheduler_url>
  <user_name>Ada</user_name>
  <team_name>CERN</team_name>
  <userid>{USER_ID}</userid>
  <teamid>{TEAM_ID}</teamid>
  <hostid>{HOST_ID}</hostid>
  <dont_request_more_work/>
</project>
{app_version}<file_info><name>copilot_agent_wu_1.toml</name><status>1</status></file_info>
<workunit>
  <name>copilot_wu_1</name>
  <app_name>copilot</app_name>
  <version_num>100</version_num>
  <rsc_fpops_est>1e12</rsc_fpops_est>
  <rsc_fpops_bound>1e16</rsc_fpops_bound>
  <rsc_memory_bound>1e9</rsc_memory_bound>
  <rsc_disk_bound>1e10</rsc_disk_bound>
  <file_ref><file_name>copilot_agent_wu_1.toml</file_name><open_name>copilot_agent.toml</open_name></file_ref>
</workunit>
<result>
  <name>{RESULT}</name>
  <wu_name>copilot_wu_1</wu_name>
  <platform>x86_64-pc-linux-gnu</platform>
  <version_num>100</version_num>
  <state>2</state>
  <received_time>{now}</received_time>
  <report_deadline>{deadline}</report_deadline>
</result>
<user_network_request>{network}</user_network_request>
</client_state>
"#
            ),
        );
        let password = "copilot-test-rpc".to_owned();
        write(&dir.join("gui_rpc_auth.cfg"), &password);
        write(
            &dir.join("cc_config.xml"),
            &format!("<cc_config>\n<log_flags><task>1</task><task_debug>1</task_debug><cpu_sched>1</cpu_sched></log_flags>\n<options>{unsigned}<skip_cpu_benchmarks>1</skip_cpu_benchmarks><no_info_fetch>1</no_info_fetch></options>\n</cc_config>\n"),
        );
        write(
            &dir.join("global_prefs_override.xml"),
            "<global_preferences>\n<run_if_user_active>1</run_if_user_active>\n<suspend_cpu_usage>0</suspend_cpu_usage>\n<leave_apps_in_memory>0</leave_apps_in_memory>\n<disk_interval>2</disk_interval>\n</global_preferences>\n",
        );
        BoincClient {
            dir: dir.to_owned(),
            port: free_port().expect("a free port"),
            password,
            process: None,
            qemu: app.qemu.map(Path::to_owned),
        }
    }

    /// The data dir.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The task's slot dir (the only task runs in slot 0).
    pub fn slot(&self) -> PathBuf {
        self.dir.join("slots").join("0")
    }

    /// The client's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Supervised::pid)
    }

    /// Start the client (appending to `client.log` in the data dir) and wait until it answers
    /// GUI RPCs.
    pub fn start(&mut self) {
        assert!(self.process.is_none(), "the client runs already");
        let mut cmd = Command::new("boinc");
        cmd.arg("--dir").arg(&self.dir).args([
            "--gui_rpc_port",
            &self.port.to_string(),
            "--allow_multiple_clients",
        ]);
        if let Some(q) = &self.qemu {
            cmd.env("COPILOT_QEMU", q);
        }
        let log = self.dir.join("client.log");
        let mut p = Supervised::spawn("boinc", cmd, &log).expect("starting boinc");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.boinccmd(&["--get_cc_status"]).status.success() {
            p.check_alive().unwrap_or_else(|e| panic!("{e}"));
            assert!(
                Instant::now() < deadline,
                "the client does not answer:\n{}",
                p.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        self.process = Some(p);
    }

    /// Run `boinccmd --host 127.0.0.1:P --passwd … ARGS`.
    pub fn boinccmd(&self, args: &[&str]) -> Output {
        Command::new("boinccmd")
            .args([
                "--host",
                &format!("127.0.0.1:{}", self.port),
                "--passwd",
                &self.password,
            ])
            .args(args)
            .output()
            .expect("running boinccmd")
    }

    /// `boinccmd --task URL RESULT op` (suspend, resume, abort).
    pub fn task(&self, op: &str) {
        let out = self.boinccmd(&["--task", PROJECT_URL, RESULT, op]);
        assert!(out.status.success(), "boinccmd --task {op}: {out:?}");
    }

    /// The task as `boinccmd --get_tasks` shows it: `key: value` pairs.
    pub fn task_info(&self) -> BTreeMap<String, String> {
        let out = self.boinccmd(&["--get_tasks"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().split_once(": "))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    /// `boinccmd --quit`, then [`BoincClient::wait_exit`].
    pub fn quit(&mut self) {
        let out = self.boinccmd(&["--quit"]);
        assert!(out.status.success(), "boinccmd --quit: {out:?}");
        self.wait_exit();
    }

    /// Wait (up to 60 s) for the client to exit, and reap it.
    pub fn wait_exit(&mut self) {
        let mut p = self.process.take().expect("the client runs");
        wait_for("the client to exit", Duration::from_secs(60), || {
            p.exited().expect("checking the client").is_some()
        });
    }

    /// SIGKILL the client alone (not its tasks), as a crash would, and reap it.
    pub fn kill9(&mut self) {
        let p = self.process.take().expect("the client runs");
        let pid = nix::unistd::Pid::from_raw(p.pid() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("kill -9");
        let mut p = p;
        wait_for(
            "the killed client to be reaped",
            Duration::from_secs(10),
            || p.exited().expect("reaping the client").is_some(),
        );
    }

    /// The wrapper's pid, if the client runs one now.
    pub fn wrapper_pid(&self) -> Option<i32> {
        let client = self.pid()? as i32;
        proctree::descendants(&proctree::scan(), client)
            .into_iter()
            .find(|p| p.ppid == client && comm(p.pid).starts_with("copilot-boinc"))
            .map(|p| p.pid)
    }

    /// The client's log, for failure messages.
    pub fn log(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("client.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// The task's stderr.txt (the wrapper's and the agent's logs).
    pub fn stderr(&self) -> String {
        let text = std::fs::read_to_string(self.slot().join("stderr.txt")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

/// A process's command name.
pub fn comm(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Poll `done` every 20 ms; panic saying `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
