//! The agent's configuration file (`copilot-agent --config agent.toml`): [`AgentConfig`].
//!
//! Every field has a default except the XMPP account (`xmpp.jid`, `xmpp.password`), which may
//! also come from the environment. Unknown fields are errors. Environment variables override
//! the file: `COPILOT_AGENT_NAME`, `COPILOT_AGENT_JID`, `COPILOT_AGENT_PASSWORD`,
//! `COPILOT_AGENT_SERVER`, `COPILOT_AGENT_MANAGER`, `COPILOT_AGENT_WORK_DIR`,
//! `COPILOT_AGENT_SLOTS`, `COPILOT_AGENT_IDLE_TIMEOUT`, `COPILOT_AGENT_PLAINTEXT_HOST`,
//! `COPILOT_AGENT_MANAGER_KEY`.
//!
//! `[trust]` says whose assignments the agent acts on: those signed with the private half of
//! `manager_key`. Without one, the agent refuses to start unless `insecure_unsigned_jobs` says
//! that any assignment will do (development only).

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use copilot_protocol::signing::PublicKey;
use copilot_protocol::units::{Bytes, Seconds};
use copilot_protocol::Limits;
use copilot_xmpp::{Security, TrustError};
use serde::Deserialize;

/// Default wall-clock limit of a job that does not set one.
pub const DEFAULT_WALL_TIME: Seconds = Seconds(3600);
/// Default bytes kept of each of stdout and stderr.
pub const DEFAULT_OUTPUT: Bytes = Bytes(16 << 20);

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file is not valid: {0}")]
    Parse(String),
    #[error("environment variable {var}: {reason}")]
    Env { var: &'static str, reason: String },
    #[error("config is incomplete: {0}")]
    Invalid(String),
}

/// The agent's settings.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Stable agent name, reported in work requests. Default: the host name.
    #[serde(default = "host_name")]
    pub name: String,
    /// Per-job dirs are created under it and removed afterwards.
    #[serde(default = "default_work_dir")]
    pub work_dir: PathBuf,
    /// Jobs run at once.
    #[serde(default = "default_slots")]
    pub slots: u32,
    /// End the session (the process exits with status 0) once no slot has held a job for this
    /// long. Unset: serve until stopped. The VM image powers off when the session ends.
    #[serde(default)]
    pub idle_timeout: Option<Seconds>,
    #[serde(default)]
    pub xmpp: XmppSettings,
    /// Defaults for jobs that do not set a limit. `wall_time` and `output` are always set
    /// after loading.
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub transfer: TransferSettings,
    #[serde(default)]
    pub sandbox: SandboxSettings,
    /// Unix time (seconds) from which the agent takes no new job: it finishes the jobs it
    /// runs, reports them and exits (see `drain` in `crate::session`). The BOINC wrapper sets
    /// it from the work unit's deadline; SIGUSR1 drains at once.
    #[serde(default)]
    pub drain_at: Option<u64>,
    /// The BOINC volunteer this agent computes for (set by the BOINC wrapper): carried in every
    /// done report, so the manager credits the volunteer.
    #[serde(default)]
    pub volunteer: Option<VolunteerSettings>,
    /// The local status page (off unless `status.listen` is set).
    #[serde(default)]
    pub status: StatusSettings,
    /// Whose assignments the agent acts on.
    #[serde(default)]
    pub trust: TrustSettings,
}

/// `[trust]`: the key that must have signed every assignment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustSettings {
    /// The project's public key in base64 (`copilot keygen` prints it).
    #[serde(default)]
    pub manager_key: Option<PublicKey>,
    /// Act on unsigned assignments (and do not check signatures): for development only, as
    /// anyone who can send this agent XMPP stanzas as its manager can then run code on it.
    #[serde(default)]
    pub insecure_unsigned_jobs: bool,
}

/// Who the agent computes for, as the BOINC wrapper writes it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolunteerSettings {
    /// The BOINC user id on the project.
    pub user_id: u64,
    /// The BOINC host id.
    pub host_id: u64,
    #[serde(default)]
    pub team_id: u64,
    /// 64 lower-case hex digits derived from the account key and the host id.
    #[serde(default)]
    pub host_token: Option<String>,
}

impl VolunteerSettings {
    /// The wire form, for done reports.
    pub fn to_wire(&self) -> copilot_protocol::wire::Volunteer {
        copilot_protocol::wire::Volunteer {
            user_id: self.user_id,
            host_id: self.host_id,
            team_id: self.team_id,
            host_token: self.host_token.clone(),
        }
    }
}

/// The agent's local status page (see `crate::status`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusSettings {
    /// Serve the page on this loopback address (port 0: any free port, logged at startup).
    #[serde(default)]
    pub listen: Option<std::net::SocketAddr>,
}

/// How payloads are sandboxed (see `crate::sandbox`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxSettings {
    /// When the agent is root, jobs run as uids from this one on (gid the same), one per
    /// running job. No passwd entry is needed; the range must be used by nothing else.
    #[serde(default = "default_base_uid")]
    pub base_uid: u32,
    /// Where the per-uid lock files live (root only).
    #[serde(default = "default_lock_dir")]
    pub lock_dir: PathBuf,
    /// Where per-job cgroups are available: CPUs' worth of time each job may use (`cpu.max`);
    /// unset, a job may use every CPU.
    #[serde(default)]
    pub cpus_per_job: Option<u32>,
}

fn default_base_uid() -> u32 {
    crate::sandbox::DEFAULT_BASE_UID
}

fn default_lock_dir() -> PathBuf {
    PathBuf::from(crate::sandbox::DEFAULT_LOCK_DIR)
}

impl Default for SandboxSettings {
    fn default() -> Self {
        Self {
            base_uid: default_base_uid(),
            lock_dir: default_lock_dir(),
            cpus_per_job: None,
        }
    }
}

/// When the agent runs as root, makes its config file (which holds the XMPP password) owned by
/// root and readable by root only (0600), so that payloads cannot read it. Returns what it
/// changed, for the log; does nothing when not root.
pub fn protect_file(path: &Path) -> std::io::Result<Option<String>> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if !crate::sandbox::is_root() {
        return Ok(None);
    }
    let meta = std::fs::metadata(path)?;
    let mut changed = Vec::new();
    if meta.uid() != 0 || meta.gid() != 0 {
        std::os::unix::fs::chown(path, Some(0), Some(0))?;
        changed.push(format!("owner {}:{} -> 0:0", meta.uid(), meta.gid()));
    }
    let mode = meta.mode() & 0o7777;
    if mode != 0o600 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        changed.push(format!("mode {mode:o} -> 600"));
    }
    Ok((!changed.is_empty()).then(|| changed.join(", ")))
}

/// The agent's XMPP account and its manager.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XmppSettings {
    #[serde(default)]
    pub jid: String,
    #[serde(default)]
    pub password: String,
    /// host:port to connect to.
    #[serde(default = "default_server")]
    pub server: String,
    /// Bare JID of the job manager.
    #[serde(default = "default_manager")]
    pub manager: String,
    /// The project CA to pin (a PEM file): STARTTLS is required and the server's certificate
    /// must chain to it.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// The project CA's PEM itself, instead of `ca`.
    #[serde(default)]
    pub ca_pem: Option<String>,
    /// No CA: plaintext, to loopback (and `plaintext_host`) only. For a server on this machine.
    #[serde(default)]
    pub insecure_loopback: bool,
    /// Log in with SASL ANONYMOUS (an agents-only host of the server gives a new random JID on
    /// every login; `jid` then only names the domain, e.g. `agent@agents.example.org`, and no
    /// password is needed). The agent proves its name with `token`.
    #[serde(default)]
    pub anonymous: bool,
    /// The agent's identity token (`copilot agent-token` makes one), sent in work requests.
    #[serde(default)]
    pub token: Option<String>,
    /// With `insecure_loopback`, the one address besides loopback the server may be reached at
    /// in plaintext: the host's loopback as seen from a VM under user-mode networking
    /// (10.0.2.2).
    #[serde(default)]
    pub plaintext_host: Option<IpAddr>,
}

impl XmppSettings {
    /// The pinned project CA (PEM), if any: the agent trusts it for the project's HTTPS
    /// servers too, beside the public CAs.
    pub fn project_ca_pem(&self) -> Result<Option<Vec<u8>>, TrustError> {
        copilot_xmpp::project_ca(self.ca.as_deref(), self.ca_pem.as_deref())
    }

    /// How to protect the connection, as these settings ask (reads the CA file).
    pub fn security(&self) -> Result<Security, TrustError> {
        Security::from_config(
            self.ca.as_deref(),
            self.ca_pem.as_deref(),
            self.insecure_loopback,
            self.plaintext_host,
        )
    }
}

/// HTTP transfer settings (inputs and output archives).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransferSettings {
    /// Longest time one HTTP transfer may take.
    #[serde(default = "default_timeout")]
    pub timeout: Seconds,
    /// Retries after a transient failure (connection error, 5xx).
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Largest input file accepted.
    #[serde(default = "default_max_input_size")]
    pub max_input_size: Bytes,
    /// Size of the input cache (`<work_dir>/input-cache`), which keeps inputs with a declared
    /// sha256 for later jobs; 0 turns it off.
    #[serde(default = "default_cache_size")]
    pub cache_size: Bytes,
}

fn host_name() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_owned())
        .find(|s| !s.is_empty())
        .unwrap_or_else(|| "agent".to_owned())
}

fn default_work_dir() -> PathBuf {
    PathBuf::from("/var/lib/copilot-agent")
}

fn default_slots() -> u32 {
    1
}

fn default_server() -> String {
    "127.0.0.1:5222".to_owned()
}

fn default_manager() -> String {
    "manager@localhost".to_owned()
}

fn default_timeout() -> Seconds {
    Seconds(600)
}

fn default_retries() -> u32 {
    3
}

fn default_cache_size() -> Bytes {
    Bytes(2 << 30)
}

fn default_max_input_size() -> Bytes {
    Bytes(4 << 30)
}

impl Default for XmppSettings {
    fn default() -> Self {
        Self {
            jid: String::new(),
            password: String::new(),
            server: default_server(),
            manager: default_manager(),
            ca: None,
            ca_pem: None,
            insecure_loopback: false,
            anonymous: false,
            token: None,
            plaintext_host: None,
        }
    }
}

impl fmt::Debug for XmppSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("XmppSettings")
            .field("jid", &self.jid)
            .field("password", &"<redacted>")
            .field("server", &self.server)
            .field("manager", &self.manager)
            .field("ca", &self.ca)
            .field(
                "ca_pem",
                &self.ca_pem.as_ref().map(|p| format!("<{} bytes>", p.len())),
            )
            .field("insecure_loopback", &self.insecure_loopback)
            .field("anonymous", &self.anonymous)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("plaintext_host", &self.plaintext_host)
            .finish()
    }
}

impl Default for TransferSettings {
    fn default() -> Self {
        Self {
            timeout: default_timeout(),
            retries: default_retries(),
            max_input_size: default_max_input_size(),
            cache_size: default_cache_size(),
        }
    }
}

impl AgentConfig {
    /// Read the file at `path`, apply the environment overrides and check the result.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml_with_env(&text, |var| std::env::var(var).ok())
    }

    /// Parse and check a config text, without environment overrides.
    pub fn from_toml(text: &str) -> Result<AgentConfig, ConfigError> {
        Self::from_toml_with_env(text, |_| None)
    }

    /// Parse a config text, apply overrides looked up with `env`, fill limit defaults, check.
    fn from_toml_with_env(
        text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<AgentConfig, ConfigError> {
        let mut cfg: AgentConfig =
            toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        cfg.apply_env(env)?;
        cfg.limits.wall_time.get_or_insert(DEFAULT_WALL_TIME);
        cfg.limits.output.get_or_insert(DEFAULT_OUTPUT);
        cfg.check()?;
        Ok(cfg)
    }

    fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let strings: [(&str, &mut String); 5] = [
            ("COPILOT_AGENT_NAME", &mut self.name),
            ("COPILOT_AGENT_JID", &mut self.xmpp.jid),
            ("COPILOT_AGENT_PASSWORD", &mut self.xmpp.password),
            ("COPILOT_AGENT_SERVER", &mut self.xmpp.server),
            ("COPILOT_AGENT_MANAGER", &mut self.xmpp.manager),
        ];
        for (var, slot) in strings {
            if let Some(v) = env(var) {
                *slot = v;
            }
        }
        if let Some(v) = env("COPILOT_AGENT_WORK_DIR") {
            self.work_dir = PathBuf::from(v);
        }
        if let Some(v) = env("COPILOT_AGENT_SLOTS") {
            self.slots = v.trim().parse().map_err(|_| ConfigError::Env {
                var: "COPILOT_AGENT_SLOTS",
                reason: format!("{v:?} is not a whole number"),
            })?;
        }
        if let Some(v) = env("COPILOT_AGENT_IDLE_TIMEOUT") {
            let t =
                v.parse()
                    .map_err(|e: copilot_protocol::units::UnitError| ConfigError::Env {
                        var: "COPILOT_AGENT_IDLE_TIMEOUT",
                        reason: e.to_string(),
                    })?;
            self.idle_timeout = Some(t);
        }
        if let Some(v) = env("COPILOT_AGENT_MANAGER_KEY") {
            let key = v
                .parse()
                .map_err(|e: copilot_protocol::signing::KeyError| ConfigError::Env {
                    var: "COPILOT_AGENT_MANAGER_KEY",
                    reason: e.to_string(),
                })?;
            self.trust.manager_key = Some(key);
        }
        if let Some(v) = env("COPILOT_AGENT_PLAINTEXT_HOST") {
            let ip = v.trim().parse().map_err(|_| ConfigError::Env {
                var: "COPILOT_AGENT_PLAINTEXT_HOST",
                reason: format!("{v:?} is not an IP address"),
            })?;
            self.xmpp.plaintext_host = Some(ip);
        }
        if let Some(v) = env("COPILOT_AGENT_TOKEN") {
            self.xmpp.token = Some(v.trim().to_owned());
        }
        if let Some(v) = env("COPILOT_AGENT_CA") {
            // A CA given here replaces the file's, whichever form that had.
            self.xmpp.ca = Some(PathBuf::from(v));
            self.xmpp.ca_pem = None;
        }
        if let Some(v) = env("COPILOT_AGENT_INSECURE_LOOPBACK") {
            self.xmpp.insecure_loopback = match v.trim() {
                "true" | "1" | "yes" => true,
                "false" | "0" | "no" => false,
                _ => {
                    return Err(ConfigError::Env {
                        var: "COPILOT_AGENT_INSECURE_LOOPBACK",
                        reason: format!("{v:?} is not true or false"),
                    })
                }
            };
        }
        Ok(())
    }

    fn check(&self) -> Result<(), ConfigError> {
        let missing = |what: &str, var: &str| {
            ConfigError::Invalid(format!(
                "{what} is not set: give it in the file or in {var}"
            ))
        };
        if self.xmpp.jid.trim().is_empty() {
            return Err(missing("xmpp.jid", "COPILOT_AGENT_JID"));
        }
        if self.xmpp.password.is_empty() && !self.xmpp.anonymous {
            return Err(missing("xmpp.password", "COPILOT_AGENT_PASSWORD"));
        }
        match (&self.xmpp.token, self.xmpp.anonymous) {
            (None, true) => {
                return Err(missing(
                    "xmpp.token (anonymous agents prove their name with one)",
                    "COPILOT_AGENT_TOKEN",
                ))
            }
            (Some(t), _) => {
                let token = copilot_protocol::identity::AgentToken::decode(t)
                    .map_err(|e| ConfigError::Invalid(format!("xmpp.token: {e}")))?;
                if token.agent != self.name {
                    return Err(ConfigError::Invalid(format!(
                        "xmpp.token is for agent {:?}, but this agent's name is {:?}",
                        token.agent, self.name
                    )));
                }
            }
            (None, false) => {}
        }
        if self.name.trim().is_empty() {
            return Err(missing("name", "COPILOT_AGENT_NAME"));
        }
        if self.work_dir.as_os_str().is_empty() {
            return Err(missing("work_dir", "COPILOT_AGENT_WORK_DIR"));
        }
        if self.slots == 0 {
            return Err(ConfigError::Invalid("slots must be at least 1".into()));
        }
        self.xmpp
            .security()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if let Some(t) = self
            .volunteer
            .as_ref()
            .and_then(|v| v.host_token.as_deref())
        {
            if !copilot_protocol::wire::valid_host_token(t) {
                return Err(ConfigError::Invalid(
                    "volunteer.host_token must be 64 lower-case hex digits".into(),
                ));
            }
        }
        if self.idle_timeout == Some(Seconds(0)) {
            return Err(ConfigError::Invalid(
                "idle_timeout must be at least 1s (leave it out to never end idle)".into(),
            ));
        }
        if let Some(addr) = self.status.listen {
            if !addr.ip().is_loopback() {
                return Err(ConfigError::Invalid(format!(
                    "status.listen {addr} is not a loopback address: the status page is for this \
                     host only (use 127.0.0.1:PORT; a VM's port is forwarded by its host)"
                )));
            }
        }
        match (&self.trust.manager_key, self.trust.insecure_unsigned_jobs) {
            (None, false) => {
                return Err(ConfigError::Invalid(
                    "trust.manager_key is not set: give the project's public key (`copilot \
                     keygen` prints it; or COPILOT_AGENT_MANAGER_KEY), or, for development \
                     only, set trust.insecure_unsigned_jobs = true"
                        .into(),
                ))
            }
            (Some(_), true) => {
                return Err(ConfigError::Invalid(
                    "give trust.manager_key or trust.insecure_unsigned_jobs, not both".into(),
                ))
            }
            _ => {}
        }
        if self.sandbox.base_uid == 0 {
            return Err(ConfigError::Invalid(
                "sandbox.base_uid must not be 0 (root)".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// RFC 8032's first test key.
    const KEY: &str = "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=";
    const MINIMAL: &str =
        "trust = { manager_key = \"11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=\" }\n\
                           [xmpp]\njid = \"a@localhost\"\npassword = \"pw\"\ninsecure_loopback = true\n";
    const ACCOUNT: &str =
        "[xmpp]\njid = \"a@localhost\"\npassword = \"pw\"\ninsecure_loopback = true\n";

    #[test]
    fn an_anonymous_agent_needs_a_token_for_its_own_name() {
        let (key, _) = copilot_protocol::signing::SigningKey::generate().unwrap();
        let token = |name: &str| {
            copilot_protocol::identity::AgentToken::issue(&key, name, u64::MAX).encode()
        };
        let anon = |extra: &str| {
            AgentConfig::from_toml(&format!(
                "name = \"vm-1\"\n[trust]\ninsecure_unsigned_jobs = true\n\
                 [xmpp]\njid = \"agent@agents.localhost\"\ninsecure_loopback = true\n\
                 anonymous = true\n{extra}"
            ))
        };
        let cfg = anon(&format!("token = \"{}\"\n", token("vm-1"))).unwrap();
        assert!(cfg.xmpp.password.is_empty());
        let err = anon("").unwrap_err().to_string();
        assert!(err.contains("xmpp.token"), "{err}");
        let err = anon(&format!("token = \"{}\"\n", token("vm-2")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"vm-2\""), "{err}");
        let err = anon("token = \"v1.garbage\"\n").unwrap_err().to_string();
        assert!(err.contains("not an agent token"), "{err}");
    }

    #[test]
    fn the_agent_trusts_one_key_or_explicitly_none() {
        let cfg = AgentConfig::from_toml(MINIMAL).unwrap();
        assert_eq!(cfg.trust.manager_key, Some(KEY.parse().unwrap()));
        assert!(!cfg.trust.insecure_unsigned_jobs);
        let err = AgentConfig::from_toml(ACCOUNT).unwrap_err();
        assert!(
            err.to_string().contains("trust.manager_key is not set"),
            "{err}"
        );
        let dev = AgentConfig::from_toml(&format!(
            "{ACCOUNT}[trust]\ninsecure_unsigned_jobs = true\n"
        ))
        .unwrap();
        assert_eq!(dev.trust.manager_key, None);
        let both = format!("{MINIMAL}[trust]\ninsecure_unsigned_jobs = true\n");
        assert!(AgentConfig::from_toml(&both).is_err());
        let both = format!(
            "trust = {{ manager_key = \"{KEY}\", insecure_unsigned_jobs = true }}\n{ACCOUNT}"
        );
        let err = AgentConfig::from_toml(&both).unwrap_err();
        assert!(err.to_string().contains("not both"), "{err}");
        let err = AgentConfig::from_toml(&format!("{ACCOUNT}[trust]\nmanager_key = \"AAAA\"\n"))
            .unwrap_err();
        assert!(err.to_string().contains("public key"), "{err}");
        let from_env = AgentConfig::from_toml_with_env(ACCOUNT, |v| {
            (v == "COPILOT_AGENT_MANAGER_KEY").then(|| KEY.to_string())
        })
        .unwrap();
        assert_eq!(from_env.trust.manager_key, cfg.trust.manager_key);
    }

    #[test]
    fn the_status_page_listens_on_loopback_only() {
        let cfg = AgentConfig::from_toml(MINIMAL).unwrap();
        assert_eq!(cfg.status.listen, None);
        let on =
            AgentConfig::from_toml(&format!("{MINIMAL}[status]\nlisten = \"127.0.0.1:8090\"\n"))
                .unwrap();
        assert_eq!(on.status.listen, Some("127.0.0.1:8090".parse().unwrap()));
        let err =
            AgentConfig::from_toml(&format!("{MINIMAL}[status]\nlisten = \"0.0.0.0:8090\"\n"))
                .unwrap_err();
        assert!(err.to_string().contains("loopback"), "{err}");
        assert!(
            AgentConfig::from_toml(&format!("{MINIMAL}[status]\nlisten = \"localhost\"\n"))
                .is_err()
        );
    }

    #[test]
    fn the_documented_example_is_valid() {
        let doc = include_str!("../../docs/CONFIG.md");
        let example = doc
            .split("```toml\n")
            .nth(2)
            .and_then(|s| s.split("```").next())
            .unwrap();
        // The example pins /etc/copilot/ca.pem, which this host may not have: the file must be
        // read (a missing CA is an error at startup), so point it at nothing to see that, then
        // let the rest parse in insecure_loopback mode.
        let pinned = r#"ca = "/etc/copilot/ca.pem""#;
        assert!(example.contains(pinned));
        let err = AgentConfig::from_toml(&example.replace(pinned, r#"ca = "/nonexistent/ca.pem""#))
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
        let cfg =
            AgentConfig::from_toml(&example.replace(pinned, "insecure_loopback = true")).unwrap();
        assert_eq!(cfg.name, "vm-0042");
        assert_eq!(cfg.limits.output, Some(Bytes(16 << 20)));
        assert_eq!(cfg.sandbox.base_uid, 61000);
        assert_eq!(cfg.sandbox.cpus_per_job, None);
    }

    #[test]
    fn minimal_file_gets_defaults() {
        let cfg = AgentConfig::from_toml(MINIMAL).unwrap();
        assert!(!cfg.name.is_empty());
        assert_eq!(cfg.work_dir, PathBuf::from("/var/lib/copilot-agent"));
        assert_eq!(cfg.slots, 1);
        assert_eq!(cfg.xmpp.server, "127.0.0.1:5222");
        assert_eq!(cfg.xmpp.manager, "manager@localhost");
        assert_eq!(cfg.xmpp.plaintext_host, None);
        assert_eq!(cfg.limits.wall_time, Some(Seconds(3600)));
        assert_eq!(cfg.limits.output, Some(Bytes(16 << 20)));
        assert_eq!(cfg.transfer, TransferSettings::default());
        assert_eq!(cfg.transfer.max_input_size, Bytes(4 << 30));
        assert_eq!(cfg.sandbox.base_uid, 61000);
        assert_eq!(cfg.sandbox.lock_dir, PathBuf::from("/run/copilot-agent"));
        assert_eq!(cfg.idle_timeout, None);
    }

    #[test]
    fn full_file_is_read() {
        let text = r#"
name = "agent-1"
work_dir = "/tmp/agent"
slots = 2
idle_timeout = "5m"
trust = { manager_key = "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=" }
[xmpp]
jid = "agent-1@localhost"
password = "pw"
server = "127.0.0.1:5223"
manager = "boss@localhost"
insecure_loopback = true
plaintext_host = "10.0.2.2"
[limits]
wall_time = "2m"
[transfer]
timeout = "30s"
retries = 5
max_input_size = "1MiB"
"#;
        let cfg = AgentConfig::from_toml(text).unwrap();
        assert_eq!(cfg.name, "agent-1");
        assert_eq!(cfg.slots, 2);
        assert_eq!(cfg.idle_timeout, Some(Seconds(300)));
        assert_eq!(cfg.xmpp.manager, "boss@localhost");
        assert_eq!(cfg.xmpp.plaintext_host, Some("10.0.2.2".parse().unwrap()));
        assert_eq!(cfg.limits.wall_time, Some(Seconds(120)));
        assert_eq!(cfg.limits.output, Some(DEFAULT_OUTPUT), "filled in");
        assert_eq!(cfg.transfer.timeout, Seconds(30));
        assert_eq!(cfg.transfer.retries, 5);
        assert_eq!(cfg.transfer.max_input_size, Bytes(1 << 20));
    }

    #[test]
    fn unknown_fields_are_named() {
        let err = AgentConfig::from_toml(&format!("{MINIMAL}slot = 2\n")).unwrap_err();
        assert!(err.to_string().contains("slot"), "{err}");
        let err = AgentConfig::from_toml(&format!("{MINIMAL}[limits]\nwall = 1\n")).unwrap_err();
        assert!(err.to_string().contains("wall"), "{err}");
    }

    #[test]
    fn missing_account_is_explained() {
        let err = AgentConfig::from_toml("").unwrap_err();
        assert!(err.to_string().contains("COPILOT_AGENT_JID"), "{err}");
        let err = AgentConfig::from_toml(&format!("{MINIMAL}slots = 0\n")).unwrap_err();
        assert!(err.to_string().contains("slots"), "{err}");
        let err = AgentConfig::from_toml(&format!("idle_timeout = 0\n{MINIMAL}")).unwrap_err();
        assert!(err.to_string().contains("idle_timeout"), "{err}");
    }

    #[test]
    fn environment_overrides_the_file() {
        let env: HashMap<&str, &str> = [
            ("COPILOT_AGENT_NAME", "vm-7"),
            ("COPILOT_AGENT_JID", "vm-7@localhost"),
            ("COPILOT_AGENT_PASSWORD", "secret"),
            ("COPILOT_AGENT_SERVER", "127.0.0.1:6222"),
            ("COPILOT_AGENT_MANAGER", "m@localhost"),
            ("COPILOT_AGENT_WORK_DIR", "/srv/jobs"),
            ("COPILOT_AGENT_SLOTS", "4"),
            ("COPILOT_AGENT_IDLE_TIMEOUT", "90s"),
            ("COPILOT_AGENT_PLAINTEXT_HOST", "10.0.2.2"),
        ]
        .into();
        let lookup = |v: &str| env.get(v).map(|s| s.to_string());
        let cfg = AgentConfig::from_toml_with_env(MINIMAL, lookup).unwrap();
        assert_eq!(cfg.name, "vm-7");
        assert_eq!(cfg.xmpp.jid, "vm-7@localhost");
        assert_eq!(cfg.xmpp.password, "secret");
        assert_eq!(cfg.xmpp.server, "127.0.0.1:6222");
        assert_eq!(cfg.xmpp.manager, "m@localhost");
        assert_eq!(cfg.work_dir, PathBuf::from("/srv/jobs"));
        assert_eq!(cfg.slots, 4);
        assert_eq!(cfg.idle_timeout, Some(Seconds(90)));
        assert_eq!(cfg.xmpp.plaintext_host, Some("10.0.2.2".parse().unwrap()));

        for var in [
            "COPILOT_AGENT_SLOTS",
            "COPILOT_AGENT_IDLE_TIMEOUT",
            "COPILOT_AGENT_PLAINTEXT_HOST",
            "COPILOT_AGENT_MANAGER_KEY",
        ] {
            let err = AgentConfig::from_toml_with_env(MINIMAL, |v| {
                (v == var).then(|| "many".to_string())
            })
            .unwrap_err();
            assert!(matches!(err, ConfigError::Env { .. }), "{err}");
            assert!(err.to_string().contains(var), "{err}");
        }
    }

    #[test]
    fn load_reads_a_file_and_debug_hides_the_password() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, MINIMAL).unwrap();
        let cfg = AgentConfig::load(&path).unwrap();
        assert_eq!(cfg.xmpp.jid, "a@localhost");
        assert!(!format!("{cfg:?}").contains("pw\""));
        let err = AgentConfig::load(&dir.path().join("nope.toml")).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err}");
    }

    #[test]
    fn sandbox_settings_are_read_and_root_is_refused() {
        let cfg =
            AgentConfig::from_toml(&format!("{MINIMAL}[sandbox]\nbase_uid = 70000\n")).unwrap();
        assert_eq!(cfg.sandbox.base_uid, 70000);
        let err =
            AgentConfig::from_toml(&format!("{MINIMAL}[sandbox]\nbase_uid = 0\n")).unwrap_err();
        assert!(err.to_string().contains("base_uid"), "{err}");
    }

    #[test]
    fn drain_time_and_volunteer_are_read_and_checked() {
        let cfg = AgentConfig::from_toml(MINIMAL).unwrap();
        assert_eq!((cfg.drain_at, cfg.volunteer), (None, None));
        let token = "4d".repeat(32);
        let text = format!(
            "drain_at = 1800000000\n{MINIMAL}[volunteer]\nuser_id = 42\nhost_id = 7\nhost_token = \"{token}\"\n"
        );
        let cfg = AgentConfig::from_toml(&text).unwrap();
        assert_eq!(cfg.drain_at, Some(1_800_000_000));
        let v = cfg.volunteer.unwrap();
        assert_eq!((v.user_id, v.host_id, v.team_id), (42, 7, 0));
        assert_eq!(v.to_wire().host_token.as_deref(), Some(token.as_str()));
        let err = AgentConfig::from_toml(&format!(
            "{MINIMAL}[volunteer]\nuser_id = 1\nhost_id = 1\nhost_token = \"secret\"\n"
        ))
        .unwrap_err();
        assert!(err.to_string().contains("host_token"), "{err}");
        let err = AgentConfig::from_toml(&format!(
            "{MINIMAL}[volunteer]\nuser_id = -1\nhost_id = 1\n"
        ))
        .unwrap_err();
        assert!(matches!(err, ConfigError::Parse(_)), "{err}");
    }

    #[test]
    fn protect_file_makes_the_config_root_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, MINIMAL).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let changed = protect_file(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        if crate::sandbox::is_root() {
            assert_eq!(mode, 0o600);
            assert!(changed.unwrap().contains("644 -> 600"));
            assert_eq!(protect_file(&path).unwrap(), None, "nothing left to change");
        } else {
            println!("protect_file_makes_the_config_root_only: skipped: not root");
            assert_eq!((mode, changed), (0o644, None));
        }
    }
}
