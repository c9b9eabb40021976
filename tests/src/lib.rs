//! Support for copilot's end-to-end tests: a [`Harness`] starts a real local stack (Prosody, the
//! manager and agents as processes, from the workspace's built binaries) in a temp dir, drives it
//! through the `copilot` CLI like a physicist would, and reads the manager's JSON API to check
//! what happened. Everything is stopped by PID when the harness is dropped.

pub mod browser;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use copilot_protocol::api::{AgentList, JobList, JobView};
use copilot_protocol::units::Seconds;
use copilot_protocol::{JobId, JobState};
use copilot_stack::{LocalStack, StackOptions};
use serde::de::DeserializeOwned;

pub mod boinc;
pub mod squares;
pub mod vm;

/// The directory holding the workspace's binaries (`target/debug` for `cargo test`).
/// Test executables live in `target/<profile>/deps`.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable has a path");
    let deps = exe.parent().expect("the test executable is in a directory");
    let dir = if deps.ends_with("deps") {
        deps.parent().expect("deps has a parent").to_path_buf()
    } else {
        deps.to_path_buf()
    };
    for bin in [copilot_stack::CLI_BIN, copilot_stack::AGENT_BIN] {
        assert!(
            dir.join(bin).is_file(),
            "{} is missing: build the binaries first (`cargo build --workspace --bins`, as scripts/test does)",
            dir.join(bin).display()
        );
    }
    dir
}

/// An HTTP client for the stack's API that trusts the stack's CA (for an HTTPS manager).
fn api_client(stack: &LocalStack) -> reqwest::Client {
    let root = reqwest::Certificate::from_pem(stack.ca_pem().as_bytes())
        .expect("the stack's CA is a PEM certificate");
    reqwest::Client::builder()
        .add_root_certificate(root)
        .build()
        .expect("an HTTP client")
}

/// A running stack plus the means to drive and inspect it.
#[derive(Debug)]
pub struct Harness {
    pub stack: LocalStack,
    rt: tokio::runtime::Runtime,
    http: reqwest::Client,
    // Dropped last: the stack's files live here.
    tmp: tempfile::TempDir,
}

/// How to start a harness.
#[derive(Debug, Clone)]
pub struct Setup {
    pub agents: usize,
    pub lease: Seconds,
    /// TOML merged over the manager's config.
    pub manager_toml: Option<String>,
    /// TOML merged over each agent's config.
    pub agent_toml: Option<String>,
    /// The host in the manager's `public_url` (default 127.0.0.1; 10.0.2.2 for a VM).
    pub public_host: Option<String>,
    /// Agents reach the servers through links the test can cut (`stack.xmpp_link()`…).
    pub links: bool,
    /// The manager serves HTTPS with a certificate from the stack's CA.
    pub https: bool,
    /// Whether the stack signs its work (the default; see `StackOptions::signed`).
    pub signed: bool,
}

/// An XMPP client of a stack's server that is not an agent (a rogue account, an impostor, a
/// probe), with a runtime of its own to drive its requests.
#[derive(Debug)]
pub struct XmppClient {
    pub rt: tokio::runtime::Runtime,
    pub conn: copilot_xmpp::Connection,
    /// The full JID it is online with.
    pub jid: String,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            agents: 1,
            lease: Seconds(30),
            manager_toml: None,
            agent_toml: None,
            public_host: None,
            links: false,
            https: false,
            signed: true,
        }
    }
}

impl Harness {
    /// Start a stack with `setup` and wait until all its agents are online.
    pub fn start(setup: Setup) -> Harness {
        let tmp = tempfile::Builder::new()
            .prefix("copilot-e2e-")
            .tempdir()
            .expect("temp dir");
        let mut opts = StackOptions::new(tmp.path().join("stack"), bin_dir());
        opts.agents = setup.agents;
        opts.lease = setup.lease;
        opts.extra_manager_toml = setup.manager_toml;
        opts.extra_agent_toml = setup.agent_toml;
        opts.public_host = setup.public_host;
        opts.links = setup.links;
        opts.https = setup.https;
        opts.signed = setup.signed;
        let stack = LocalStack::start(opts).unwrap_or_else(|e| panic!("starting the stack: {e}"));
        stack
            .wait_agents_online(setup.agents, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("agents did not come online: {e}"));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let http = api_client(&stack);
        Harness {
            stack,
            rt,
            http,
            tmp,
        }
    }

    /// XMPP security for an extra client of this stack's server: STARTTLS, its CA pinned.
    pub fn xmpp_security(&self) -> copilot_xmpp::Security {
        let trust = copilot_xmpp::TlsTrust::from_pem(self.stack.ca_pem().as_bytes())
            .expect("the stack's CA is a PEM certificate");
        copilot_xmpp::Security::Tls(trust)
    }

    /// Log in to the stack's XMPP server as `jid` (a bare domain JID with an empty `password`:
    /// SASL ANONYMOUS), STARTTLS with the stack's CA pinned, and wait until online (30 s).
    pub fn xmpp_client(&mut self, jid: &str, password: &str) -> XmppClient {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let mut conn = copilot_xmpp::Connection::start(copilot_xmpp::XmppConfig {
            jid: jid.into(),
            password: password.into(),
            server: self.stack.prosody().server(),
            security: self.xmpp_security(),
        })
        .expect("an XMPP client");
        let jid = rt
            .block_on(conn.wait_online(Duration::from_secs(30)))
            .unwrap_or_else(|e| panic!("{jid} does not log in: {e}"));
        XmppClient { rt, conn, jid }
    }

    /// A scratch path inside the harness's temp dir.
    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// Start an agent of the test's own: `config` goes to `NAME.toml` in the temp dir, its
    /// log to `NAME.log`, `args` after `--config`. Stopped when the handle is dropped.
    pub fn spawn_agent(
        &self,
        name: &str,
        config: &str,
        args: &[&str],
    ) -> copilot_stack::Supervised {
        let file = self.path(&format!("{name}.toml"));
        std::fs::write(&file, config).expect("writing the agent config");
        let mut cmd = Command::new(bin_dir().join(copilot_stack::AGENT_BIN));
        cmd.arg("--config").arg(&file).args(args);
        copilot_stack::Supervised::spawn(name, cmd, &self.path(&format!("{name}.log")))
            .expect("starting the agent")
    }

    /// Run `copilot --stack DIR ARGS…` and return its output.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin_dir().join(copilot_stack::CLI_BIN))
            .arg("--stack")
            .arg(self.stack.dir())
            .args(args)
            .env_remove("COPILOT_MANAGER")
            .env_remove("COPILOT_TOKEN")
            .env("NO_COLOR", "1")
            .output()
            .expect("running copilot")
    }

    /// Like [`Harness::cli`], but panics with the output if the command failed.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "copilot {args:?} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// GET a path of the manager with the API token; the successful answer, or why not.
    async fn get(&self, path: &str) -> Result<reqwest::Response, String> {
        let url = format!("{}{path}", self.stack.manager_url());
        let resp = self
            .http
            .get(&url)
            .bearer_auth(self.stack.api_token())
            .send()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("GET {url}: {}", resp.status()));
        }
        Ok(resp)
    }

    /// GET an API path and decode its JSON.
    pub fn try_api<T: DeserializeOwned>(&self, path: &str) -> Result<T, String> {
        self.rt.block_on(async {
            self.get(path)
                .await?
                .json::<T>()
                .await
                .map_err(|e| format!("GET {path}: bad JSON: {e}"))
        })
    }

    /// The manager's Prometheus metrics (`GET /metrics`), as text.
    pub fn metrics_text(&self) -> String {
        self.rt
            .block_on(async {
                self.get("/metrics")
                    .await?
                    .text()
                    .await
                    .map_err(|e| e.to_string())
            })
            .unwrap_or_else(|e| panic!("GET /metrics: {e}"))
    }

    /// Like [`Harness::try_api`], but panics on failure.
    pub fn api<T: DeserializeOwned>(&self, path: &str) -> T {
        self.try_api(path).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The last lines of a process's log in the stack (`manager`, `agent-1`, `prosody`…).
    pub fn log_tail(&self, name: &str) -> String {
        let path = self.stack.dir().join("logs").join(format!("{name}.log"));
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Poll the manager's agent list until the agent `name` is listed with `online`, or panic
    /// after `timeout`.
    pub fn wait_agent(&self, name: &str, online: bool, timeout: Duration) {
        let start = Instant::now();
        loop {
            let agents: AgentList = self.api("/api/agents");
            if agents
                .agents
                .iter()
                .any(|a| a.name == name && a.online == online)
            {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "{name} did not become online={online} within {timeout:?}: {agents:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// All jobs.
    pub fn jobs(&self) -> JobList {
        self.api("/api/jobs")
    }

    /// One job.
    pub fn job(&self, id: JobId) -> JobView {
        self.api(&format!("/api/jobs/{id}"))
    }

    /// Write a job file (and the files it refers to) into a fresh dir; returns the job file.
    pub fn write_job(&self, dir: &str, job_toml: &str, files: &[(&str, &str)]) -> PathBuf {
        let d = self.path(dir);
        std::fs::create_dir_all(&d).expect("job dir");
        for (name, content) in files {
            std::fs::write(d.join(name), content).expect("job input");
        }
        let job = d.join("job.toml");
        std::fs::write(&job, job_toml).expect("job file");
        job
    }

    /// Submit a job file with `copilot submit`; returns the ids of the new jobs.
    pub fn submit(&self, job_file: &Path) -> Vec<JobId> {
        let before: BTreeSet<JobId> = self.jobs().jobs.iter().map(|j| j.id).collect();
        self.cli_ok(&["submit", job_file.to_str().expect("utf-8 path")]);
        let ids: Vec<JobId> = self
            .jobs()
            .jobs
            .iter()
            .map(|j| j.id)
            .filter(|id| !before.contains(id))
            .collect();
        assert!(!ids.is_empty(), "submit queued no job");
        ids
    }

    /// Poll the job list until `done` holds, or panic after `timeout` saying `what`. The API
    /// may be briefly away (a manager restart): errors are retried until the timeout.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&JobList) -> bool,
    ) -> JobList {
        let start = Instant::now();
        loop {
            let seen = match self.try_api::<JobList>("/api/jobs") {
                Ok(list) if done(&list) => return list,
                Ok(list) => format!(
                    "{:?}",
                    list.jobs
                        .iter()
                        .map(|j| format!("{}:{}#{}", j.id, j.state, j.attempt))
                        .collect::<Vec<_>>()
                ),
                Err(e) => e,
            };
            if start.elapsed() > timeout {
                panic!(
                    "timed out after {timeout:?} waiting for {what}; last seen: {seen}\n--- manager log:\n{}",
                    self.log_tail("manager")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Wait until every job in `ids` is done or failed.
    pub fn wait_final(&self, ids: &[JobId], timeout: Duration) -> Vec<JobView> {
        let list = self.wait_for("jobs to finish", timeout, |l| {
            ids.iter()
                .all(|id| l.jobs.iter().any(|j| j.id == *id && j.state.is_final()))
        });
        list.jobs
            .into_iter()
            .filter(|j| ids.contains(&j.id))
            .collect()
    }

    /// Submit a small job with the CLI (it upper-cases `text`), wait for it, fetch its verified
    /// result and check it; returns the job.
    pub fn run_upper_job(&self, dir: &str, text: &str) -> JobView {
        const UPPER_JOB: &str = r#"
name = "upper"
command = ["sh", "-c", "tr a-z A-Z < in.txt > out.txt"]
outputs = ["out.txt"]

[[inputs]]
path = "in.txt"

[limits]
wall_time = "1m"
"#;
        let file = self.write_job(dir, UPPER_JOB, &[("in.txt", text)]);
        let ids = self.submit(&file);
        assert_eq!(ids.len(), 1);
        let job = self.wait_final(&ids, Duration::from_secs(120)).remove(0);
        assert_eq!(
            job.state,
            JobState::Done,
            "{:?} {:?}\n{}",
            job.outcome,
            job.note,
            self.log_tail("agent-1")
        );
        let out = self.results(job.id);
        let got = std::fs::read_to_string(out.join("out.txt")).unwrap();
        assert_eq!(got, text.to_uppercase());
        job
    }

    /// Fetch and verify a job's outputs with `copilot results`; returns the output dir.
    pub fn results(&self, id: JobId) -> PathBuf {
        let out = self.path(&format!("results-{id}"));
        self.cli_ok(&[
            "results",
            &id.to_string(),
            "-o",
            out.to_str().expect("utf-8 path"),
        ]);
        out
    }
}
