//! `LocalStack`: Prosody + the manager + N agents from real binaries, with generated configs in
//! one state dir. `copilot up` runs one in the foreground; end-to-end tests drive one.
//!
//! State dir layout: `prosody.cfg.lua`, `prosody.log`, `data/` (Prosody), `manager.toml`,
//! `manager/` (queue.db, blobs), `keys/` (the stack's signing key pair, from `copilot keygen`),
//! `agent-N.toml`, `agent-N/` (work dir), `client.toml` (url + token for the CLI), `logs/`
//! (stdout/stderr of each process).
//!
//! Every stack signs its work: the manager gets the stack's private key and every agent its
//! public key, unless [`StackOptions::signed`] is off (then the manager has no key and the
//! agents take unsigned work, as only development setups should).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::thread::sleep;
use std::time::{Duration, Instant};

use copilot_protocol::api::AgentList;
use copilot_protocol::units::Seconds;
use copilot_xmpp::TlsTrust;
use rand::distributions::Alphanumeric;
use rand::Rng;
use tokio_rustls::rustls::ClientConfig;
use toml::{Table, Value};

use crate::error::io;
use crate::prosody::XMPP_DOMAIN;
use crate::{free_port, http, Link, Prosody, StackError, Supervised};

/// The CLI binary (it runs the manager with `copilot manager --config F`).
pub const CLI_BIN: &str = "copilot";
/// The agent binary.
pub const AGENT_BIN: &str = "copilot-agent";
/// How long the manager gets to answer its API.
const MANAGER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long processes get after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// The manager's XMPP account name.
const MANAGER_USER: &str = "manager";

/// What to start.
#[derive(Clone, Debug)]
pub struct StackOptions {
    /// State dir (created if missing; reused if present: accounts, jobs and blobs persist).
    pub dir: PathBuf,
    /// Agents started with the stack.
    pub agents: usize,
    /// Where `copilot` and `copilot-agent` live (see [`default_bin_dir`]).
    pub bin_dir: PathBuf,
    /// The manager's lease (`jobs.lease`).
    pub lease: Seconds,
    /// TOML merged over the generated manager.toml (tables merge, values replace).
    pub extra_manager_toml: Option<String>,
    /// TOML merged over each generated agent-N.toml.
    pub extra_agent_toml: Option<String>,
    /// The host agents use to reach the manager's HTTP port (its `public_url`); default
    /// 127.0.0.1. A VM under QEMU's user networking reaches the host's loopback at 10.0.2.2.
    pub public_host: Option<String>,
    /// Agents reach Prosody and the manager's HTTP port through [`Link`]s the caller can cut
    /// (fault tests); otherwise directly.
    pub links: bool,
    /// The manager serves HTTPS (a certificate from the stack's CA for localhost, 127.0.0.1
    /// and 10.0.2.2); agents and the CLI trust that CA.
    pub https: bool,
    /// Whether the manager signs assignments and agents insist on it (the default).
    pub signed: bool,
}

impl StackOptions {
    /// One agent, a 60 s lease, no extra config.
    pub fn new(dir: impl Into<PathBuf>, bin_dir: impl Into<PathBuf>) -> StackOptions {
        StackOptions {
            dir: dir.into(),
            agents: 1,
            bin_dir: bin_dir.into(),
            lease: Seconds(60),
            extra_manager_toml: None,
            extra_agent_toml: None,
            public_host: None,
            links: false,
            https: false,
            signed: true,
        }
    }
}

/// The directory of the running executable: where `copilot up` finds its sibling binaries.
pub fn default_bin_dir() -> Result<PathBuf, StackError> {
    let exe = std::env::current_exe().map_err(io("finding the current executable"))?;
    Ok(exe
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".")))
}

/// The stack's signing key pair.
#[derive(Debug, Clone)]
struct StackKeys {
    /// PKCS#8 PEM, mode 0600.
    private_key: PathBuf,
    /// Base64, as agents' configs hold it.
    public_key: String,
}

/// The stack's key pair in `dir/keys`, generated with `copilot keygen` the first time.
fn stack_keys(dir: &Path, bin_dir: &Path) -> Result<StackKeys, StackError> {
    let keys = dir.join("keys");
    let private_key = keys.join("manager.key");
    let public_file = keys.join("manager.pub");
    if !private_key.is_file() {
        let out = Command::new(bin_dir.join(CLI_BIN))
            .arg("keygen")
            .arg("--out")
            .arg(&keys)
            .arg("--force")
            .output()
            .map_err(io("running copilot keygen"))?;
        if !out.status.success() {
            return Err(StackError::Keygen(
                String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            ));
        }
    }
    let public_key = std::fs::read_to_string(&public_file)
        .map_err(io(format!("reading {}", public_file.display())))?
        .trim()
        .to_owned();
    Ok(StackKeys {
        private_key,
        public_key,
    })
}

/// One agent slot: its number, config and process (None once killed or stopped).
#[derive(Debug)]
struct Agent {
    config: PathBuf,
    process: Option<Supervised>,
}

/// The links between the agents and the servers, when [`StackOptions::links`] asks for them.
#[derive(Debug)]
struct Links {
    xmpp: Link,
    http: Link,
}

/// A running local stack. Dropping it stops everything (agents, manager, then Prosody).
#[derive(Debug)]
pub struct LocalStack {
    opts: StackOptions,
    dir: PathBuf,
    http: SocketAddr,
    token: String,
    manager_config: PathBuf,
    /// The stack's signing key pair, when it signs its work.
    keys: Option<StackKeys>,
    /// TLS client settings for the manager's HTTPS, if it serves HTTPS.
    https: Option<Arc<ClientConfig>>,
    // Field order is drop order: agents first, the server last.
    agents: Vec<Agent>,
    links: Option<Links>,
    manager: Option<Supervised>,
    prosody: Prosody,
}

impl LocalStack {
    /// Start Prosody, register the accounts, write the configs, start the manager (waiting until
    /// its API answers) and `opts.agents` agents.
    pub fn start(opts: StackOptions) -> Result<LocalStack, StackError> {
        for bin in [CLI_BIN, AGENT_BIN] {
            let path = opts.bin_dir.join(bin);
            if !path.is_file() {
                return Err(StackError::BinaryMissing { path });
            }
        }
        std::fs::create_dir_all(opts.dir.join("logs"))
            .map_err(io(format!("creating {}", opts.dir.display())))?;
        let dir = std::fs::canonicalize(&opts.dir)
            .map_err(io(format!("resolving {}", opts.dir.display())))?;
        let keys = opts
            .signed
            .then(|| stack_keys(&dir, &opts.bin_dir))
            .transpose()?;
        let prosody = Prosody::start(&dir)?;
        let password = random_secret();
        prosody.register(MANAGER_USER, &password)?;
        let token = random_secret();
        let http = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let manager_config = dir.join("manager.toml");
        let links = if opts.links {
            let xmpp = SocketAddr::from((Ipv4Addr::LOCALHOST, prosody.port()));
            Some(Links {
                xmpp: Link::start(xmpp)?,
                http: Link::start(http)?,
            })
        } else {
            None
        };
        let scheme = if opts.https { "https" } else { "http" };
        let public_url = format!(
            "{scheme}://{}:{}",
            opts.public_host.as_deref().unwrap_or("127.0.0.1"),
            links.as_ref().map_or(http.port(), |l| l.http.port())
        );
        let mut base = manager_toml(
            &dir,
            &prosody.server(),
            &password,
            &token,
            http,
            &public_url,
            opts.lease,
        );
        if let Some(keys) = &keys {
            merge(&mut base, manager_trust(&keys.private_key));
        }
        let mut base = pin_ca(base, prosody.ca_pem());
        let mut client = table([
            ("url", Value::from(format!("{scheme}://{http}"))),
            ("token", Value::from(token.clone())),
        ]);
        let https = if opts.https {
            let (cert, key) = prosody
                .ca()
                .leaf("manager-http", "DNS:localhost,IP:127.0.0.1,IP:10.0.2.2")?;
            merge(
                &mut base,
                table([(
                    "http",
                    Value::Table(table([
                        ("tls_cert", path_value(&cert)),
                        ("tls_key", path_value(&key)),
                    ])),
                )]),
            );
            client.insert("ca".into(), Value::from(prosody.ca_pem()));
            let trust =
                TlsTrust::from_pem(prosody.ca_pem().as_bytes()).map_err(|e| StackError::Tool {
                    what: "trusting the stack's CA".into(),
                    output: e.to_string(),
                })?;
            Some(trust.client_config())
        } else {
            None
        };
        let text = merge_extra(base, opts.extra_manager_toml.as_deref(), "manager")?;
        write(&manager_config, &text)?;
        write(&dir.join("client.toml"), &client.to_string())?;
        let mut stack = LocalStack {
            opts,
            dir,
            http,
            token,
            manager_config,
            keys,
            https,
            agents: Vec::new(),
            links,
            manager: None,
            prosody,
        };
        stack.start_manager()?;
        for _ in 0..stack.opts.agents {
            stack.add_agent()?;
        }
        Ok(stack)
    }

    /// `http://127.0.0.1:<port>` (`https://` when the stack serves HTTPS).
    pub fn manager_url(&self) -> String {
        let scheme = if self.https.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.http)
    }

    /// The API token of the manager.
    pub fn api_token(&self) -> &str {
        &self.token
    }

    /// The state dir (absolute).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA the XMPP server's certificate chains to (PEM): what clients pin.
    pub fn ca_pem(&self) -> &str {
        self.prosody.ca_pem()
    }

    /// The manager's signing key (PKCS#8 PEM), if the stack signs its work.
    pub fn signing_key(&self) -> Option<&Path> {
        self.keys.as_ref().map(|k| k.private_key.as_path())
    }

    /// The `[trust]` section an agent of this stack needs (its public key, or unsigned work),
    /// as TOML: for agent configs written by others (the BOINC wrapper's template, say).
    pub fn agent_trust_toml(&self) -> String {
        let public_key = self.keys.as_ref().map(|k| k.public_key.as_str());
        table([("trust", Value::Table(agent_trust(public_key)))]).to_string()
    }

    /// The manager's XMPP password (from its config), e.g. for a test that plays a manager
    /// which took over the account.
    pub fn manager_password(&self) -> Result<String, StackError> {
        let text = std::fs::read_to_string(&self.manager_config)
            .map_err(io(format!("reading {}", self.manager_config.display())))?;
        let t: Table = text
            .parse()
            .map_err(|e: toml::de::Error| StackError::ExtraToml {
                what: "manager",
                reason: e.to_string(),
            })?;
        Ok(t["xmpp"]["password"]
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    /// The XMPP server, e.g. to restart or kill it.
    pub fn prosody(&mut self) -> &mut Prosody {
        &mut self.prosody
    }

    /// The link between the agents and Prosody, if the stack was started with links.
    pub fn xmpp_link(&self) -> Option<&Link> {
        self.links.as_ref().map(|l| &l.xmpp)
    }

    /// The link between the agents and the manager's HTTP port (inputs, outputs), if the
    /// stack was started with links.
    pub fn http_link(&self) -> Option<&Link> {
        self.links.as_ref().map(|l| &l.http)
    }

    /// Agent numbers so far (1-based; killed agents keep their number).
    pub fn agent_count(&self) -> usize {
        self.agents.len()
    }

    /// The name (and XMPP user) of agent number `n`: `agent-<n>`.
    pub fn agent_name(n: usize) -> String {
        format!("agent-{n}")
    }

    /// Process id of agent `n` if it runs.
    pub fn agent_pid(&self, n: usize) -> Option<u32> {
        self.agents
            .get(n.wrapping_sub(1))
            .and_then(|a| a.process.as_ref().map(Supervised::pid))
    }

    /// Process id of the manager if it runs.
    pub fn manager_pid(&self) -> Option<u32> {
        self.manager.as_ref().map(Supervised::pid)
    }

    /// Register, configure and start one more agent; returns its number (1-based).
    pub fn add_agent(&mut self) -> Result<usize, StackError> {
        let n = self.agents.len() + 1;
        let name = Self::agent_name(n);
        let work_dir = self.dir.join(&name);
        std::fs::create_dir_all(&work_dir)
            .map_err(io(format!("creating {}", work_dir.display())))?;
        let config = self.dir.join(format!("{name}.toml"));
        let server = match &self.links {
            Some(l) => l.xmpp.addr().to_string(),
            None => self.prosody.server(),
        };
        let text = self.register_agent(&name, &server, Some(&work_dir))?;
        write(&config, &text)?;
        self.agents.push(Agent {
            config,
            process: None,
        });
        self.start_agent(n)?;
        Ok(n)
    }

    /// Register the account of an agent this stack does not run (one in a VM, say) and return
    /// its agent.toml: the XMPP server as that agent reaches it (`server`), this stack's
    /// manager, `work_dir` if given (else the agent's default), with `extra_agent_toml` merged
    /// over it.
    pub fn register_agent(
        &self,
        name: &str,
        server: &str,
        work_dir: Option<&Path>,
    ) -> Result<String, StackError> {
        let password = random_secret();
        self.prosody.register(name, &password)?;
        let public_key = self.keys.as_ref().map(|k| k.public_key.as_str());
        merge_extra(
            pin_ca(
                agent_toml(name, work_dir, server, &password, public_key),
                self.prosody.ca_pem(),
            ),
            self.opts.extra_agent_toml.as_deref(),
            "agent",
        )
    }

    /// Start agent `n` again (after `kill_agent`/`stop_agent`), same config and account.
    pub fn start_agent(&mut self, n: usize) -> Result<(), StackError> {
        let name = Self::agent_name(n);
        let log = self.dir.join("logs").join(format!("{name}.log"));
        let bin = self.opts.bin_dir.join(AGENT_BIN);
        let agent = self
            .agents
            .get_mut(n.wrapping_sub(1))
            .ok_or(StackError::NoSuchAgent(n))?;
        if agent.process.is_none() {
            let mut cmd = Command::new(bin);
            cmd.arg("--config").arg(&agent.config);
            with_log_level(&mut cmd);
            agent.process = Some(Supervised::spawn(&name, cmd, &log)?);
        }
        Ok(())
    }

    /// SIGKILL agent `n` (and its payloads): a volunteer's machine vanishing.
    pub fn kill_agent(&mut self, n: usize) -> Result<(), StackError> {
        self.agent_mut(n)?
            .process
            .take()
            .map(|mut p| p.kill9())
            .transpose()?;
        Ok(())
    }

    /// SIGTERM agent `n` (SIGKILL after a grace period).
    pub fn stop_agent(&mut self, n: usize) -> Result<(), StackError> {
        self.agent_mut(n)?
            .process
            .take()
            .map(|mut p| p.stop(STOP_GRACE))
            .transpose()?;
        Ok(())
    }

    /// Stop the manager (SIGTERM, then SIGKILL after a grace) and start it again with the same
    /// config; returns when its API answers.
    pub fn restart_manager(&mut self) -> Result<(), StackError> {
        self.stop_manager()?;
        self.start_manager()
    }

    /// SIGKILL the manager, as a crash would; `start_manager` brings it back.
    pub fn kill_manager(&mut self) -> Result<(), StackError> {
        self.manager.take().map(|mut p| p.kill9()).transpose()?;
        Ok(())
    }

    /// Stop the manager gracefully.
    pub fn stop_manager(&mut self) -> Result<(), StackError> {
        self.manager
            .take()
            .map(|mut p| p.stop(STOP_GRACE))
            .transpose()?;
        Ok(())
    }

    /// Start the manager if it is not running; returns when its API answers.
    pub fn start_manager(&mut self) -> Result<(), StackError> {
        if self.manager.is_some() {
            return Ok(());
        }
        let mut cmd = Command::new(self.opts.bin_dir.join(CLI_BIN));
        cmd.arg("manager").arg("--config").arg(&self.manager_config);
        with_log_level(&mut cmd);
        let log = self.dir.join("logs").join("manager.log");
        let mut p = Supervised::spawn("manager", cmd, &log)?;
        let deadline = Instant::now() + MANAGER_TIMEOUT;
        loop {
            p.check_alive()?;
            if let Ok((200, _)) =
                http::get(self.http, "/api/jobs", &self.token, self.https.as_ref())
            {
                break;
            }
            if Instant::now() > deadline {
                return Err(StackError::NotReady {
                    what: format!("manager API on {}", self.http),
                    secs: MANAGER_TIMEOUT.as_secs(),
                    log,
                    tail: p.log_tail(),
                });
            }
            sleep(Duration::from_millis(50));
        }
        tracing::info!(url = %self.manager_url(), pid = p.pid(), "manager is up");
        self.manager = Some(p);
        Ok(())
    }

    /// The manager's view of the agents (GET /api/agents).
    pub fn agents(&self) -> Result<AgentList, StackError> {
        let path = "/api/agents";
        let (status, body) = http::get(self.http, path, &self.token, self.https.as_ref())?;
        let bad = |reason: String| StackError::Http {
            url: format!("{}{path}", self.manager_url()),
            reason,
        };
        if status != 200 {
            return Err(bad(format!(
                "status {status}: {}",
                String::from_utf8_lossy(&body)
            )));
        }
        serde_json::from_slice(&body).map_err(|e| bad(e.to_string()))
    }

    /// Wait until the manager sees at least `count` agents online.
    pub fn wait_agents_online(&self, count: usize, timeout: Duration) -> Result<(), StackError> {
        let deadline = Instant::now() + timeout;
        loop {
            let online = self
                .agents()
                .map(|l| l.agents.iter().filter(|a| a.online).count())
                .unwrap_or(0);
            if online >= count {
                return Ok(());
            }
            if Instant::now() > deadline {
                let log = self.dir.join("logs");
                return Err(StackError::NotReady {
                    what: format!("{count} agents online ({online} are)"),
                    secs: timeout.as_secs(),
                    tail: String::new(),
                    log,
                });
            }
            sleep(Duration::from_millis(100));
        }
    }

    /// An error if the manager or Prosody has died (agents may be killed on purpose).
    pub fn check_alive(&mut self) -> Result<(), StackError> {
        self.prosody.check_alive()?;
        match &mut self.manager {
            Some(m) => m.check_alive(),
            None => Ok(()),
        }
    }

    /// Stop the agents, the manager and Prosody, in that order, each gracefully.
    pub fn stop(mut self) -> Result<(), StackError> {
        for n in 1..=self.agents.len() {
            self.stop_agent(n)?;
        }
        self.stop_manager()?;
        self.prosody.stop()
    }

    fn agent_mut(&mut self, n: usize) -> Result<&mut Agent, StackError> {
        self.agents
            .get_mut(n.wrapping_sub(1))
            .ok_or(StackError::NoSuchAgent(n))
    }
}

/// Children log at info unless the caller set RUST_LOG.
fn with_log_level(cmd: &mut Command) {
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
}

/// 24 random letters and digits (~143 bits): passwords and the API token.
fn random_secret() -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(24)
        .map(char::from)
        .collect()
}

fn write(path: &Path, text: &str) -> Result<(), StackError> {
    std::fs::write(path, text).map_err(io(format!("writing {}", path.display())))
}

fn path_value(p: &Path) -> Value {
    Value::from(p.to_string_lossy().into_owned())
}

fn table<const N: usize>(entries: [(&str, Value); N]) -> Table {
    entries
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
}

/// `config` with `xmpp.ca_pem` set: the client pins the stack's CA and uses STARTTLS.
fn pin_ca(mut config: Table, ca_pem: &str) -> Table {
    if let Some(Value::Table(xmpp)) = config.get_mut("xmpp") {
        xmpp.insert("ca_pem".into(), Value::from(ca_pem));
    }
    config
}

/// manager.toml per the contract.
fn manager_toml(
    dir: &Path,
    server: &str,
    password: &str,
    token: &str,
    http: SocketAddr,
    public_url: &str,
    lease: Seconds,
) -> Table {
    table([
        ("data_dir", path_value(&dir.join("manager"))),
        ("api_token", Value::from(token)),
        (
            "xmpp",
            Value::Table(table([
                ("jid", Value::from(format!("{MANAGER_USER}@{XMPP_DOMAIN}"))),
                ("password", Value::from(password)),
                ("server", Value::from(server)),
            ])),
        ),
        (
            "http",
            Value::Table(table([
                ("listen", Value::from(http.to_string())),
                ("public_url", Value::from(public_url)),
            ])),
        ),
        (
            "jobs",
            Value::Table(table([("lease", Value::from(format!("{}s", lease.0)))])),
        ),
    ])
}

/// `[trust]` of manager.toml: the stack's signing key.
fn manager_trust(signing_key: &Path) -> Table {
    table([(
        "trust",
        Value::Table(table([("signing_key", path_value(signing_key))])),
    )])
}

/// agent-N.toml per the contract: trusting `public_key`, or (None) taking unsigned work.
fn agent_toml(
    name: &str,
    work_dir: Option<&Path>,
    server: &str,
    password: &str,
    public_key: Option<&str>,
) -> Table {
    let mut t = table([
        ("name", Value::from(name)),
        (
            "xmpp",
            Value::Table(table([
                ("jid", Value::from(format!("{name}@{XMPP_DOMAIN}"))),
                ("password", Value::from(password)),
                ("server", Value::from(server)),
                (
                    "manager",
                    Value::from(format!("{MANAGER_USER}@{XMPP_DOMAIN}")),
                ),
            ])),
        ),
    ]);
    if let Some(dir) = work_dir {
        t.insert("work_dir".to_owned(), path_value(dir));
    }
    t.insert("trust".to_owned(), Value::Table(agent_trust(public_key)));
    t
}

/// An agent's `[trust]`: the stack's public key, or (None) unsigned work.
fn agent_trust(public_key: Option<&str>) -> Table {
    match public_key {
        Some(key) => table([("manager_key", Value::from(key))]),
        None => table([("insecure_unsigned_jobs", Value::from(true))]),
    }
}

/// Merge `extra` (TOML text) over `base`: tables merge recursively, other values replace.
fn merge_extra(
    mut base: Table,
    extra: Option<&str>,
    what: &'static str,
) -> Result<String, StackError> {
    if let Some(extra) = extra {
        let extra: Table = extra
            .parse()
            .map_err(|e: toml::de::Error| StackError::ExtraToml {
                what,
                reason: e.to_string(),
            })?;
        merge(&mut base, extra);
    }
    Ok(base.to_string())
}

fn merge(base: &mut Table, extra: Table) {
    for (k, v) in extra {
        match (base.get_mut(&k), v) {
            (Some(Value::Table(b)), Value::Table(e)) => merge(b, e),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_toml_merges_into_sections() {
        let base = manager_toml(
            Path::new("/s"),
            "127.0.0.1:20001",
            "pw",
            "tok",
            "127.0.0.1:20002".parse().unwrap(),
            "http://10.0.2.2:20002",
            Seconds(7),
        );
        let text = merge_extra(
            base,
            Some("[jobs]\nretry_after = \"1s\"\n[http]\nlisten = \"127.0.0.1:20003\""),
            "manager",
        )
        .unwrap();
        let t: Table = text.parse().unwrap();
        assert_eq!(t["jobs"]["lease"].as_str(), Some("7s"));
        assert_eq!(t["jobs"]["retry_after"].as_str(), Some("1s"));
        assert_eq!(t["http"]["listen"].as_str(), Some("127.0.0.1:20003"));
        assert_eq!(
            t["http"]["public_url"].as_str(),
            Some("http://10.0.2.2:20002")
        );
        assert_eq!(t["xmpp"]["server"].as_str(), Some("127.0.0.1:20001"));
        assert_eq!(t["data_dir"].as_str(), Some("/s/manager"));
        let trust = manager_trust(Path::new("/s/keys/manager.key"));
        assert_eq!(
            trust["trust"]["signing_key"].as_str(),
            Some("/s/keys/manager.key")
        );
    }

    #[test]
    fn bad_extra_toml_is_a_clear_error() {
        let err = merge_extra(Table::new(), Some("[jobs"), "agent").unwrap_err();
        assert!(matches!(err, StackError::ExtraToml { what: "agent", .. }));
    }

    #[test]
    fn agent_config_names_the_manager() {
        let t = agent_toml(
            "agent-3",
            Some(Path::new("/w")),
            "127.0.0.1:1",
            "pw",
            Some("KEY="),
        );
        assert_eq!(t["xmpp"]["jid"].as_str(), Some("agent-3@localhost"));
        assert_eq!(t["xmpp"]["manager"].as_str(), Some("manager@localhost"));
        assert_eq!(t["work_dir"].as_str(), Some("/w"));
        assert_eq!(t["trust"]["manager_key"].as_str(), Some("KEY="));
        let vm = agent_toml("vm-1", None, "10.0.2.2:5222", "pw", None);
        assert_eq!(vm["trust"]["insecure_unsigned_jobs"].as_bool(), Some(true));
        assert_eq!(vm["xmpp"]["server"].as_str(), Some("10.0.2.2:5222"));
        assert!(vm.get("work_dir").is_none(), "{vm}");
        let pinned = pin_ca(vm, "-----BEGIN CERTIFICATE-----");
        assert_eq!(
            pinned["xmpp"]["ca_pem"].as_str(),
            Some("-----BEGIN CERTIFICATE-----")
        );
        assert_eq!(pinned["xmpp"]["server"].as_str(), Some("10.0.2.2:5222"));
    }

    #[test]
    fn missing_binaries_are_reported_before_anything_starts() {
        let dir = tempfile::tempdir().unwrap();
        let err =
            LocalStack::start(StackOptions::new(dir.path().join("s"), dir.path())).unwrap_err();
        assert!(matches!(err, StackError::BinaryMissing { .. }), "{err}");
        assert!(!dir.path().join("s").exists());
    }
}
