//! The manager's configuration: `manager.toml` (see the contract / docs), its defaults, the
//! environment overrides `COPILOT_MANAGER_PASSWORD` and `COPILOT_API_TOKEN`, and `api_token_file`.
//! Everything is checked when loaded, so the rest of the manager can trust the values; the
//! signing key (`[trust] signing_key`) is read then too, and refused if others may read it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use copilot_protocol::job::MAX_RETRIES;
use copilot_protocol::signing::SigningKey;
use copilot_protocol::units::{Bytes, Seconds};
use copilot_protocol::Limits;
use serde::Deserialize;

/// Environment variable overriding `xmpp.password`.
pub const ENV_PASSWORD: &str = "COPILOT_MANAGER_PASSWORD";
/// Environment variable overriding `api_token` / `api_token_file`.
pub const ENV_API_TOKEN: &str = "COPILOT_API_TOKEN";

/// A configuration that cannot be used. Every message names the field or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config is not valid: {0}")]
    Syntax(String),
    #[error("`{0}` is missing: {1}")]
    Missing(&'static str, &'static str),
    #[error("`{field}` is invalid: {reason}")]
    Invalid { field: &'static str, reason: String },
}

/// The manager's XMPP account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XmppConfig {
    pub jid: String,
    pub password: String,
    /// host:port to connect to.
    pub server: String,
    /// The project CA to pin (a PEM file, resolved against the config's directory).
    pub ca: Option<PathBuf>,
    /// The project CA's PEM itself, instead of `ca`.
    pub ca_pem: Option<String>,
    /// No CA: plaintext to a loopback address.
    pub insecure_loopback: bool,
}

impl XmppConfig {
    /// How to protect the connection, as these settings ask (reads the CA file).
    pub fn security(&self) -> Result<copilot_xmpp::Security, copilot_xmpp::TrustError> {
        copilot_xmpp::Security::from_config(
            self.ca.as_deref(),
            self.ca_pem.as_deref(),
            self.insecure_loopback,
            None,
        )
    }
}

/// The HTTP storage service and API.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Base URL agents use for inputs and outputs, without a trailing slash.
    #[serde(default)]
    pub public_url: String,
    /// Whether `GET /metrics` answers without the API token (the default: Prometheus scrapes
    /// it, and it reveals only counts). When false it needs the API token like the JSON API.
    #[serde(default = "yes")]
    pub metrics_public: bool,
    /// Serve HTTPS with this certificate chain (PEM), relative to the config's directory.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of `tls_cert`.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
}

fn yes() -> bool {
    true
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            public_url: String::new(),
            metrics_public: true,
            tls_cert: None,
            tls_key: None,
        }
    }
}

/// Job handling.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsConfig {
    /// An agent must send progress at least this often or loses the job.
    pub lease: Seconds,
    /// Retries of a job that does not say.
    pub max_retries: u32,
    /// How long an attempt's upload token is valid.
    pub upload_token_ttl: Seconds,
    pub max_output_size: Bytes,
    pub max_input_size: Bytes,
    /// Told to agents when there is no work.
    pub retry_after: Seconds,
    /// Longest a work request is held waiting for work.
    pub hold: Seconds,
    /// How long after it is sent an assignment's signature stays valid: agents refuse it
    /// later (their clocks must not run ahead of the manager's by more).
    pub assignment_ttl: Seconds,
    /// The most a job may ask for in its `[limits]`.
    pub max_limits: MaxLimits,
}

/// The project's maximums for a job's `[limits]` (`[jobs.max_limits]`). A field left out of the
/// table keeps its default (`wall_time` 24h, `output` 1GiB, the others no maximum).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaxLimits {
    pub wall_time: Option<Seconds>,
    pub cpu_time: Option<Seconds>,
    pub memory: Option<Bytes>,
    pub disk: Option<Bytes>,
    pub processes: Option<u32>,
    pub output: Option<Bytes>,
}

impl Default for MaxLimits {
    fn default() -> Self {
        Self {
            wall_time: Some(Seconds(24 * 3600)),
            cpu_time: None,
            memory: None,
            disk: None,
            processes: None,
            output: Some(Bytes(1 << 30)),
        }
    }
}

/// A job limit over the project's maximum.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("limits.{field} = {asked} is over the project's maximum of {max} (jobs.max_limits.{field} in the manager's config)")]
pub struct OverMaximum {
    pub field: &'static str,
    pub asked: String,
    pub max: String,
}

impl MaxLimits {
    /// The first of `l`'s limits that is over its maximum. A limit the job leaves out is not
    /// checked: the agent's default applies.
    pub fn check(&self, l: &Limits) -> Result<(), OverMaximum> {
        fn secs(s: Seconds) -> String {
            format!("{s} ({} s)", s.0)
        }
        fn bytes(b: Bytes) -> String {
            format!("{b} ({} bytes)", b.0)
        }
        fn over<T: PartialOrd + Copy>(
            field: &'static str,
            asked: Option<T>,
            max: Option<T>,
            show: fn(T) -> String,
        ) -> Result<(), OverMaximum> {
            match (asked, max) {
                (Some(a), Some(m)) if a > m => Err(OverMaximum {
                    field,
                    asked: show(a),
                    max: show(m),
                }),
                _ => Ok(()),
            }
        }
        over("wall_time", l.wall_time, self.wall_time, secs)?;
        over("cpu_time", l.cpu_time, self.cpu_time, secs)?;
        over("memory", l.memory, self.memory, bytes)?;
        over("disk", l.disk, self.disk, bytes)?;
        over("processes", l.processes, self.processes, |n| n.to_string())?;
        over("output", l.output, self.output, bytes)
    }
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            lease: Seconds(60),
            max_retries: 3,
            upload_token_ttl: Seconds(6 * 3600),
            max_output_size: Bytes(1 << 30),
            max_input_size: Bytes(1 << 30),
            retry_after: Seconds(5),
            hold: Seconds(20),
            assignment_ttl: Seconds(15 * 60),
            max_limits: MaxLimits::default(),
        }
    }
}

/// The whole manager configuration, resolved (token file read, environment applied, checked).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManagerConfig {
    /// Holds queue.db, blobs/ and outputs/.
    pub data_dir: PathBuf,
    /// Bearer token for submit/list/results.
    pub api_token: String,
    pub xmpp: XmppConfig,
    pub http: HttpConfig,
    pub jobs: JobsConfig,
    pub outputs: OutputsConfig,
    /// The project's private key, which signs every assignment (`[trust] signing_key`). None:
    /// assignments go out unsigned, and only agents configured for unsigned work take them.
    pub signing_key: Option<Arc<SigningKey>>,
    pub agents: AgentsConfig,
    /// The commands jobs may name to compare their replicas (`[validators.NAME]`).
    pub validators: BTreeMap<String, ValidatorConfig>,
}

/// `[validators.NAME]`: a command that says whether two replicas of a job agree, for jobs that
/// name it (`validator = "NAME"`). It runs as the manager's user, in a scratch dir, with an
/// empty environment but `PATH`, and the two replicas' unpacked output dirs as its last two
/// arguments: exit status 0 means they agree, 1 that they differ, anything else (or running
/// past `timeout`) is a failure of the validator itself, logged and retried later. The
/// outputs come from volunteers' hosts: the command must treat them as untrusted input.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidatorConfig {
    /// The program (a path relative to the config file if it has a `/`, else looked up in
    /// `PATH`) and its first arguments.
    pub command: Vec<String>,
    /// How long one comparison may run.
    #[serde(default = "default_validator_timeout")]
    pub timeout: Seconds,
    /// Most bytes unpacked from each replica's archive (archives are compressed: this bounds
    /// what a decompression bomb can write to the manager's disk).
    #[serde(default = "default_validator_max_size")]
    pub max_size: Bytes,
}

fn default_validator_timeout() -> Seconds {
    Seconds(60)
}

fn default_validator_max_size() -> Bytes {
    Bytes(4 << 30)
}

/// `[agents]`: who may ask for work, and how misbehaviour is answered.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentsConfig {
    /// XMPP domains agents log in on; requests and reports from others are refused. Default:
    /// the manager's own domain.
    #[serde(default)]
    pub domains: Vec<String>,
    /// XMPP domains where agents log in anonymously (SASL ANONYMOUS): their work requests must
    /// carry an agent token signed with `trust.signing_key` for the name they use.
    #[serde(default)]
    pub anonymous_domains: Vec<String>,
    /// Refused requests within a minute after which a sender is told to retry later.
    #[serde(default = "default_max_strikes")]
    pub max_strikes: u32,
    /// Work requests a minute an agent may send; each one more counts as a refused request.
    #[serde(default = "default_max_requests")]
    pub max_requests: u32,
    /// How long a misbehaving sender is told to wait.
    #[serde(default = "default_cooldown")]
    pub cooldown: Seconds,
}

fn default_max_strikes() -> u32 {
    20
}

fn default_max_requests() -> u32 {
    120
}

fn default_cooldown() -> Seconds {
    Seconds(120)
}

impl Default for AgentsConfig {
    fn default() -> Self {
        Self {
            domains: Vec::new(),
            anonymous_domains: Vec::new(),
            max_strikes: default_max_strikes(),
            max_requests: default_max_requests(),
            cooldown: default_cooldown(),
        }
    }
}

impl AgentsConfig {
    /// The misbehaviour policy these settings describe.
    pub fn policy(&self) -> crate::penalty::Policy {
        crate::penalty::Policy {
            max_strikes: self.max_strikes,
            max_requests: self.max_requests,
            cooldown: self.cooldown.as_duration(),
        }
    }

    /// Whether `jid` (full or bare) is on one of the agents' domains, anonymous ones included.
    pub fn admits(&self, jid: &str) -> bool {
        self.is_anonymous(jid) || on_any(&self.domains, jid)
    }

    /// Whether `jid` is on an anonymous agents' domain (its requests need a token).
    pub fn is_anonymous(&self, jid: &str) -> bool {
        on_any(&self.anonymous_domains, jid)
    }
}

/// Whether the domain of `jid` (full or bare) is one of `domains`.
fn on_any(domains: &[String], jid: &str) -> bool {
    let bare = jid.split('/').next().unwrap_or(jid);
    let domain = bare.rsplit('@').next().unwrap_or(bare);
    domains.iter().any(|d| d.eq_ignore_ascii_case(domain))
}

impl AgentsConfig {
    /// Checks that need the rest of the config.
    fn check(&self, signing: bool) -> Result<(), ConfigError> {
        if self.max_strikes == 0 || self.max_requests == 0 || self.cooldown.0 == 0 {
            return Err(invalid(
                "agents",
                "max_strikes, max_requests and cooldown must be at least 1",
            ));
        }
        if !self.anonymous_domains.is_empty() && !signing {
            return Err(invalid(
                "agents.anonymous_domains",
                "anonymous agents prove their names with tokens signed by trust.signing_key: set it",
            ));
        }
        Ok(())
    }
}

/// `[trust]`: the key that signs assignments.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTrust {
    /// PKCS#8 PEM file (`copilot keygen` writes one), relative to the config file; mode 0600.
    #[serde(default)]
    signing_key: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawXmpp {
    jid: String,
    #[serde(default)]
    password: Option<String>,
    #[serde(default = "default_server")]
    server: String,
    #[serde(default)]
    ca: Option<PathBuf>,
    #[serde(default)]
    ca_pem: Option<String>,
    #[serde(default)]
    insecure_loopback: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default = "default_data_dir")]
    data_dir: PathBuf,
    #[serde(default)]
    api_token: Option<String>,
    #[serde(default)]
    api_token_file: Option<PathBuf>,
    xmpp: RawXmpp,
    #[serde(default)]
    http: HttpConfig,
    #[serde(default)]
    jobs: JobsConfig,
    #[serde(default)]
    outputs: OutputsConfig,
    #[serde(default)]
    trust: RawTrust,
    #[serde(default)]
    agents: AgentsConfig,
    #[serde(default)]
    validators: BTreeMap<String, ValidatorConfig>,
}

/// Where output archives go (`[outputs]`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputsConfig {
    /// A `chirp://host:port/dir` where agents upload instead of the storage service: each
    /// attempt gets its own directory below it and a ticket that may only write there. The
    /// manager must hold the rights `rwlda` on the dir (by address, hostname or unix user).
    #[serde(default)]
    pub chirp: Option<String>,
    /// How the manager proves who it is to that server, in order: `address`, `hostname`,
    /// `unix`.
    #[serde(default = "default_chirp_auth")]
    pub chirp_auth: Vec<String>,
}

fn default_chirp_auth() -> Vec<String> {
    ["address", "hostname", "unix"].map(String::from).to_vec()
}

impl Default for OutputsConfig {
    fn default() -> Self {
        OutputsConfig {
            chirp: None,
            chirp_auth: default_chirp_auth(),
        }
    }
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/copilot")
}

fn default_server() -> String {
    "127.0.0.1:5222".into()
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// Read the signing key at `path`: a PKCS#8 PEM Ed25519 key that only its owner may read.
pub fn load_signing_key(path: &Path) -> Result<SigningKey, ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let read = |source| ConfigError::Read {
        path: path.to_owned(),
        source,
    };
    let mode = std::fs::metadata(path).map_err(read)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(invalid(
            "trust.signing_key",
            format!(
                "{} has mode {mode:03o}: others may read the project's private key \
                 (chmod 600 it)",
                path.display()
            ),
        ));
    }
    let text = std::fs::read_to_string(path).map_err(read)?;
    SigningKey::from_pem(&text)
        .map_err(|e| invalid("trust.signing_key", format!("{}: {e}", path.display())))
}

impl OutputsConfig {
    /// `chirp_auth` as methods.
    pub fn auths(&self) -> Result<Vec<copilot_storage::chirp::Auth>, ConfigError> {
        use copilot_storage::chirp::Auth;
        if self.chirp_auth.is_empty() {
            return Err(invalid("outputs.chirp_auth", "give at least one method"));
        }
        self.chirp_auth
            .iter()
            .map(|m| match m.as_str() {
                "address" => Ok(Auth::Address),
                "hostname" => Ok(Auth::Hostname),
                "unix" => Ok(Auth::Unix),
                other => Err(invalid(
                    "outputs.chirp_auth",
                    format!("{other:?} is not address, hostname or unix"),
                )),
            })
            .collect()
    }
}

impl ManagerConfig {
    /// Read, resolve and check the config file at `path`, with the process environment applied.
    /// A relative `api_token_file` is taken relative to the config file's directory.
    pub fn load(path: &Path) -> Result<ManagerConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::resolve(&text, base, |k| std::env::var(k).ok())
    }

    /// Parse config text, with the process environment applied (relative paths: current dir).
    pub fn from_toml(text: &str) -> Result<ManagerConfig, ConfigError> {
        Self::resolve(text, Path::new("."), |k| std::env::var(k).ok())
    }

    fn resolve(
        text: &str,
        base: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<ManagerConfig, ConfigError> {
        let raw: RawConfig = toml::from_str(text)
            .map_err(|e| ConfigError::Syntax(e.to_string().trim_end().replace('\n', " ")))?;
        let api_token = match (env(ENV_API_TOKEN), raw.api_token, raw.api_token_file) {
            (Some(t), _, _) => t,
            (None, Some(_), Some(_)) => {
                return Err(invalid(
                    "api_token",
                    "give either api_token or api_token_file, not both",
                ))
            }
            (None, Some(t), None) => t,
            (None, None, Some(file)) => {
                let path = base.join(file);
                std::fs::read_to_string(&path)
                    .map_err(|source| ConfigError::Read { path, source })?
                    .trim()
                    .to_owned()
            }
            (None, None, None) => {
                return Err(ConfigError::Missing(
                    "api_token",
                    "set api_token, api_token_file or COPILOT_API_TOKEN",
                ))
            }
        };
        let password = env(ENV_PASSWORD)
            .or(raw.xmpp.password)
            .ok_or(ConfigError::Missing(
                "xmpp.password",
                "set it in the config or in COPILOT_MANAGER_PASSWORD",
            ))?;
        let mut agents = raw.agents;
        if agents.domains.is_empty() {
            // The manager's own domain; the JID was checked to have an '@' below.
            let domain = raw.xmpp.jid.rsplit('@').next().unwrap_or_default();
            agents
                .domains
                .push(domain.split('/').next().unwrap_or_default().to_owned());
        }
        let mut http = raw.http;
        http.tls_cert = http.tls_cert.map(|p| base.join(p));
        http.tls_key = http.tls_key.map(|p| base.join(p));
        if http.public_url.is_empty() {
            let scheme = if http.tls_cert.is_some() {
                "https"
            } else {
                "http"
            };
            http.public_url = format!("{scheme}://{}", http.listen);
        }
        http.public_url = http.public_url.trim_end_matches('/').to_owned();
        let signing_key = raw
            .trust
            .signing_key
            .map(|file| load_signing_key(&base.join(file)).map(Arc::new))
            .transpose()?;
        let mut validators = raw.validators;
        for v in validators.values_mut() {
            if let Some(program) = v.command.first_mut().filter(|p| p.contains('/')) {
                *program = base.join(&*program).to_string_lossy().into_owned();
            }
        }
        let config = ManagerConfig {
            validators,
            signing_key,
            data_dir: raw.data_dir,
            api_token,
            xmpp: XmppConfig {
                jid: raw.xmpp.jid,
                password,
                server: raw.xmpp.server,
                ca: raw.xmpp.ca.map(|ca| base.join(ca)),
                ca_pem: raw.xmpp.ca_pem,
                insecure_loopback: raw.xmpp.insecure_loopback,
            },
            http,
            jobs: raw.jobs,
            outputs: raw.outputs,
            agents,
        };
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<(), ConfigError> {
        if self.api_token.len() < 8 || self.api_token.chars().any(|c| c.is_whitespace()) {
            return Err(invalid(
                "api_token",
                "must be at least 8 characters without spaces",
            ));
        }
        if self.xmpp.jid.is_empty() || !self.xmpp.jid.contains('@') {
            return Err(invalid("xmpp.jid", "must look like name@domain"));
        }
        if !self.xmpp.server.contains(':') {
            return Err(invalid("xmpp.server", "must be host:port"));
        }
        self.xmpp
            .security()
            .map_err(|e| invalid("xmpp", e.to_string()))?;
        let url = &self.http.public_url;
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(invalid(
                "http.public_url",
                "must start with http:// or https://",
            ));
        }
        match (&self.http.tls_cert, &self.http.tls_key) {
            (Some(_), Some(_)) if !url.starts_with("https://") => {
                return Err(invalid(
                    "http.public_url",
                    "must start with https:// when the service speaks TLS (http.tls_cert)",
                ))
            }
            (Some(cert), Some(key)) => {
                crate::tls::server_config(cert, key)
                    .map_err(|e| invalid("http.tls_cert", e.to_string()))?;
            }
            (None, None) => {}
            _ => {
                return Err(invalid(
                    "http.tls_cert",
                    "give both tls_cert and tls_key, or neither",
                ))
            }
        }
        let j = &self.jobs;
        if j.lease.0 == 0 {
            return Err(invalid("jobs.lease", "must be at least 1s"));
        }
        if j.upload_token_ttl < j.lease {
            return Err(invalid(
                "jobs.upload_token_ttl",
                "must not be shorter than jobs.lease",
            ));
        }
        if j.max_retries > MAX_RETRIES {
            return Err(invalid(
                "jobs.max_retries",
                format!("the limit is {MAX_RETRIES}"),
            ));
        }
        if j.retry_after.0 == 0 {
            return Err(invalid("jobs.retry_after", "must be at least 1s"));
        }
        if j.hold >= j.lease {
            return Err(invalid("jobs.hold", "must be shorter than jobs.lease"));
        }
        self.agents.check(self.signing_key.is_some())?;
        if j.assignment_ttl.0 < 10 {
            return Err(invalid("jobs.assignment_ttl", "must be at least 10s"));
        }
        if let Some(url) = &self.outputs.chirp {
            let parsed = url
                .parse()
                .map_err(|e| invalid("outputs.chirp", format!("not a URL: {e}")))?;
            copilot_storage::chirp_store::parse_url(&parsed)
                .map_err(|e| invalid("outputs.chirp", e.to_string()))?;
        }
        self.outputs.auths()?;
        for (name, v) in &self.validators {
            if !copilot_protocol::job::valid_validator_name(name) {
                return Err(invalid(
                    "validators",
                    format!("{name:?}: a name is 1 to 64 letters, digits, '-' or '_'"),
                ));
            }
            if v.command.first().is_none_or(String::is_empty) {
                return Err(invalid(
                    "validators",
                    format!("{name}: command must name a program"),
                ));
            }
            if v.timeout.0 == 0 {
                return Err(invalid(
                    "validators",
                    format!("{name}: timeout must be at least 1s"),
                ));
            }
        }
        Ok(())
    }

    /// A manager on loopback: data in `data_dir`, HTTP on `listen`, everything else default
    /// (XMPP at 127.0.0.1:5222, which in-process users may never reach).
    pub fn loopback(data_dir: &Path, api_token: &str, listen: SocketAddr) -> ManagerConfig {
        ManagerConfig {
            data_dir: data_dir.to_owned(),
            api_token: api_token.to_owned(),
            xmpp: XmppConfig {
                jid: "m@localhost".into(),
                password: "pw".into(),
                server: "127.0.0.1:5222".into(),
                ca: None,
                ca_pem: None,
                insecure_loopback: true,
            },
            http: HttpConfig {
                listen,
                public_url: format!("http://{listen}"),
                ..HttpConfig::default()
            },
            jobs: JobsConfig::default(),
            outputs: OutputsConfig::default(),
            signing_key: None,
            agents: AgentsConfig {
                domains: vec!["localhost".into()],
                ..AgentsConfig::default()
            },
            validators: BTreeMap::new(),
        }
    }

    /// Path of the queue database.
    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("queue.db")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str =
        "api_token = \"secret-token\"\n[xmpp]\ninsecure_loopback = true\njid = \"manager@localhost\"\npassword = \"pw\"\n";

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn parse(text: &str) -> Result<ManagerConfig, ConfigError> {
        ManagerConfig::resolve(text, Path::new("."), no_env)
    }

    #[test]
    fn validators_are_named_programs_with_a_timeout() {
        let text = format!(
            "{MINIMAL}[validators.close]\ncommand = [\"bin/compare\", \"--tolerance\", \"0.01\"]\n\
             [validators.same-text]\ncommand = [\"diff\", \"-r\"]\ntimeout = \"5s\"\nmax_size = \"1MiB\"\n"
        );
        let c = ManagerConfig::resolve(&text, Path::new("/etc/copilot"), no_env).unwrap();
        let close = &c.validators["close"];
        assert_eq!(
            close.command[0], "/etc/copilot/bin/compare",
            "relative to the config"
        );
        assert_eq!(close.timeout, Seconds(60));
        assert_eq!(close.max_size, Bytes(4 << 30));
        assert_eq!(
            c.validators["same-text"].command,
            ["diff", "-r"],
            "from PATH"
        );
        assert_eq!(c.validators["same-text"].timeout, Seconds(5));
        assert_eq!(c.validators["same-text"].max_size, Bytes(1 << 20));
        for bad in [
            "[validators.\"a b\"]\ncommand = [\"x\"]\n",
            "[validators.empty]\ncommand = []\n",
            "[validators.empty]\ncommand = [\"\"]\n",
            "[validators.quick]\ncommand = [\"x\"]\ntimeout = \"0s\"\n",
            "[validators.typo]\ncommand = [\"x\"]\ntimeot = \"1s\"\n",
        ] {
            let err = parse(&format!("{MINIMAL}{bad}")).unwrap_err();
            assert!(
                err.to_string().contains("validators") || err.to_string().contains("timeot"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn the_signing_key_is_read_relative_to_the_config_and_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (key, pem) = SigningKey::generate().unwrap();
        let file = dir.path().join("manager.key");
        std::fs::write(&file, pem).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let text = format!("{MINIMAL}[trust]\nsigning_key = \"manager.key\"\n");
        let c = ManagerConfig::resolve(&text, dir.path(), no_env).unwrap();
        assert_eq!(
            c.signing_key.as_ref().map(|k| k.public_key()),
            Some(key.public_key())
        );
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = ManagerConfig::resolve(&text, dir.path(), no_env).unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
        std::fs::write(&file, "not a key").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = ManagerConfig::resolve(&text, dir.path(), no_env).unwrap_err();
        assert!(err.to_string().contains("trust.signing_key"), "{err}");
        let missing = format!("{MINIMAL}[trust]\nsigning_key = \"nowhere.key\"\n");
        let err = ManagerConfig::resolve(&missing, dir.path(), no_env).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err}");
        assert!(parse(MINIMAL).unwrap().signing_key.is_none());
    }

    #[test]
    fn the_documented_example_is_valid() {
        let doc = include_str!("../../docs/CONFIG.md");
        let example = doc
            .split("```toml\n")
            .nth(1)
            .and_then(|s| s.split("```").next())
            .unwrap();
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("api-token"), "a-token-from-a-file").unwrap();
        let key = dir.path().join("manager.key");
        std::fs::write(&key, SigningKey::generate().unwrap().1).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        // The example pins /etc/copilot/ca.pem, which this host may not have: a missing CA is
        // an error at startup; the rest is checked in insecure_loopback mode.
        let pinned = r#"ca = "/etc/copilot/ca.pem""#;
        assert!(example.contains(pinned));
        let err = ManagerConfig::resolve(
            &example.replace(pinned, r#"ca = "/nonexistent/ca.pem""#),
            dir.path(),
            no_env,
        )
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
        let example = example.replace(pinned, "insecure_loopback = true");
        let c = ManagerConfig::resolve(&example, dir.path(), no_env).unwrap();
        assert!(c.signing_key.is_some());
        assert_eq!(c.jobs.assignment_ttl, Seconds(15 * 60));
        assert_eq!(c.api_token, "a-token-from-a-file");
        assert_eq!(c.http.public_url, "http://10.0.2.2:8080");
        assert_eq!(c.jobs.max_limits.wall_time, Some(Seconds(24 * 3600)));
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/copilot"));
        assert_eq!(c.xmpp.server, "127.0.0.1:5222");
        assert_eq!(c.http.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.http.public_url, "http://127.0.0.1:8080");
        assert!(c.http.metrics_public);
        assert_eq!(c.jobs, JobsConfig::default());
        assert_eq!(c.db_path(), PathBuf::from("/var/lib/copilot/queue.db"));
    }

    #[test]
    fn agents_come_from_the_managers_domain_unless_configured() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.agents.domains, vec!["localhost".to_owned()]);
        assert!(c.agents.admits("agent-1@localhost/r1"));
        assert!(c.agents.admits("agent-1@LOCALHOST"));
        assert!(!c.agents.admits("agent-1@elsewhere.org/r"));
        assert!(!c.agents.admits("localhost@elsewhere.org"));
        let c = parse(&format!(
            "{MINIMAL}[agents]\ndomains = [\"agents.example.org\"]\ncooldown = \"10m\"\n"
        ))
        .unwrap();
        assert!(c.agents.admits("vm-7@agents.example.org/x"));
        assert!(!c.agents.admits("m@localhost"));
        assert_eq!(
            c.agents.policy().cooldown,
            std::time::Duration::from_secs(600)
        );
        assert!(parse(&format!("{MINIMAL}[agents]\nmax_strikes = 0\n")).is_err());
    }

    #[test]
    fn full_config_parses_units() {
        let text = r#"
data_dir = "/tmp/x"
api_token = "secret-token"
[xmpp]
insecure_loopback = true
jid = "m@h"
password = "pw"
server = "127.0.0.1:5333"
[http]
listen = "127.0.0.1:9000"
public_url = "http://127.0.0.1:9000/"
metrics_public = false
[jobs]
lease = "2m"
max_retries = 1
upload_token_ttl = "1h"
max_output_size = "16MiB"
max_input_size = 1000
retry_after = 3
hold = "10s"
"#;
        let c = parse(text).unwrap();
        assert_eq!(c.http.public_url, "http://127.0.0.1:9000");
        assert!(!c.http.metrics_public);
        assert_eq!(c.jobs.lease, Seconds(120));
        assert_eq!(c.jobs.max_output_size, Bytes(16 << 20));
        assert_eq!(c.jobs.max_input_size, Bytes(1000));
        assert_eq!(c.jobs.hold, Seconds(10));
        assert_eq!(c.xmpp.server, "127.0.0.1:5333");
    }

    #[test]
    fn max_limits_keep_their_defaults_field_by_field() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.jobs.max_limits.wall_time, Some(Seconds(86_400)));
        assert_eq!(c.jobs.max_limits.output, Some(Bytes(1 << 30)));
        assert_eq!(c.jobs.max_limits.memory, None);
        let text = format!(
            "{MINIMAL}[jobs.max_limits]\nmemory = \"4GiB\"\nprocesses = 64\nwall_time = \"48h\"\n"
        );
        let m = parse(&text).unwrap().jobs.max_limits;
        assert_eq!(m.memory, Some(Bytes(4 << 30)));
        assert_eq!(m.processes, Some(64));
        assert_eq!(m.wall_time, Some(Seconds(48 * 3600)));
        assert_eq!(m.output, Some(Bytes(1 << 30)), "left out: the default");
        assert_eq!(m.disk, None);
        let err = parse(&format!("{MINIMAL}[jobs.max_limits]\nram = 1\n")).unwrap_err();
        assert!(err.to_string().contains("ram"), "{err}");
    }

    #[test]
    fn max_limits_name_the_field_the_value_and_the_maximum() {
        let m = MaxLimits {
            memory: Some(Bytes(1 << 30)),
            processes: Some(10),
            ..MaxLimits::default()
        };
        assert_eq!(m.check(&Limits::default()), Ok(()));
        let at_max = Limits {
            wall_time: Some(Seconds(86_400)),
            memory: Some(Bytes(1 << 30)),
            processes: Some(10),
            cpu_time: Some(Seconds(u64::MAX)),
            disk: Some(Bytes(u64::MAX)),
            output: Some(Bytes(1 << 30)),
        };
        assert_eq!(m.check(&at_max), Ok(()), "no maximum for cpu_time and disk");
        let e = m
            .check(&Limits {
                memory: Some(Bytes(2 << 30)),
                ..Limits::default()
            })
            .unwrap_err();
        assert_eq!(e.field, "memory");
        let msg = e.to_string();
        assert!(
            msg.contains("limits.memory")
                && msg.contains("2147483648 bytes")
                && msg.contains("1073741824 bytes"),
            "{msg}"
        );
        let e = m
            .check(&Limits {
                wall_time: Some(Seconds(86_401)),
                ..Limits::default()
            })
            .unwrap_err();
        assert_eq!((e.field, e.max.as_str()), ("wall_time", "1day (86400 s)"));
        let e = m
            .check(&Limits {
                processes: Some(11),
                ..Limits::default()
            })
            .unwrap_err();
        assert_eq!(
            (e.field, e.asked.as_str(), e.max.as_str()),
            ("processes", "11", "10")
        );
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = parse(&format!("{MINIMAL}[jobs]\nleases = 3\n")).unwrap_err();
        assert!(err.to_string().contains("leases"), "{err}");
        assert!(parse(&format!("bogus = 1\n{MINIMAL}")).is_err());
    }

    #[test]
    fn environment_overrides_token_and_password() {
        let text = "[xmpp]\ninsecure_loopback = true\njid = \"m@h\"\n";
        assert!(matches!(
            parse(text),
            Err(ConfigError::Missing("api_token", _))
        ));
        let env = |k: &str| match k {
            ENV_API_TOKEN => Some("from-the-env".to_string()),
            ENV_PASSWORD => Some("env-pw".to_string()),
            _ => None,
        };
        let c = ManagerConfig::resolve(MINIMAL, Path::new("."), env).unwrap();
        assert_eq!(c.api_token, "from-the-env");
        assert_eq!(c.xmpp.password, "env-pw");
    }

    #[test]
    fn token_file_is_read_relative_to_the_config() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "file-token-123\n").unwrap();
        let cfg = dir.path().join("manager.toml");
        std::fs::write(
            &cfg,
            "api_token_file = \"token\"\n[xmpp]\ninsecure_loopback = true\njid = \"m@h\"\npassword = \"pw\"\n",
        )
        .unwrap();
        // The process environment may set COPILOT_API_TOKEN; resolve without it.
        let text = std::fs::read_to_string(&cfg).unwrap();
        let c = ManagerConfig::resolve(&text, dir.path(), no_env).unwrap();
        assert_eq!(c.api_token, "file-token-123");
        let both = format!("api_token_file = \"token\"\n{MINIMAL}");
        assert!(matches!(
            ManagerConfig::resolve(&both, dir.path(), no_env),
            Err(ConfigError::Invalid {
                field: "api_token",
                ..
            })
        ));
        let missing = ManagerConfig::resolve(&text, Path::new("/nonexistent"), no_env);
        assert!(matches!(missing, Err(ConfigError::Read { .. })));
    }

    #[test]
    fn bad_values_are_refused() {
        for (extra, field) in [
            ("[jobs]\nlease = 0\n", "jobs.lease"),
            ("[jobs]\nhold = \"2m\"\n", "jobs.hold"),
            ("[jobs]\nmax_retries = 1000\n", "jobs.max_retries"),
            ("[http]\npublic_url = \"ftp://x\"\n", "http.public_url"),
            ("[http]\ntls_cert = \"c.pem\"\n", "http.tls_cert"),
            (
                "[http]\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\npublic_url = \"http://x:1\"\n",
                "http.public_url",
            ),
            (
                "[http]\ntls_cert = \"/nonexistent/c.pem\"\ntls_key = \"/nonexistent/k.pem\"\n",
                "http.tls_cert",
            ),
        ] {
            match parse(&format!("{MINIMAL}{extra}")) {
                Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{extra}: {other:?}"),
            }
        }
        let short = MINIMAL.replace("secret-token", "abc");
        assert!(matches!(
            parse(&short),
            Err(ConfigError::Invalid {
                field: "api_token",
                ..
            })
        ));
        assert!(matches!(
            parse(
                "api_token = \"secret-token\"\n[xmpp]\ninsecure_loopback = true\njid = \"m@h\"\n"
            ),
            Err(ConfigError::Missing("xmpp.password", _))
        ));
    }

    #[test]
    fn load_reports_missing_file() {
        let err = ManagerConfig::load(Path::new("/nonexistent/manager.toml")).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/manager.toml"),
            "{err}"
        );
    }
}
