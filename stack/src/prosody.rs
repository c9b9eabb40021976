//! `Prosody`: a private XMPP server for one stack. It writes its own config into a state dir,
//! with a private CA and a certificate for its domain ([`ProjectCa`]: clients must use
//! STARTTLS and pin that CA), runs `prosody -F` as a supervised child on a free loopback port,
//! and registers accounts with `prosodyctl`.

use std::fmt::Write as _;
use std::io::{Read, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::error::io;
use crate::supervised::tail;
use crate::{free_port, require_tool, ProjectCa, StackError, Supervised};

/// The XMPP domain of the stack's virtual host.
pub const XMPP_DOMAIN: &str = "localhost";
/// The stack's agents-only virtual host, where agents log in anonymously (SASL ANONYMOUS).
pub const AGENTS_DOMAIN: &str = "agents.localhost";
/// How long the server gets to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long `stop()` waits after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A private Prosody listening on `127.0.0.1:port()`, STARTTLS required.
#[derive(Debug)]
pub struct Prosody {
    dir: PathBuf,
    config: PathBuf,
    port: u16,
    ca: ProjectCa,
    process: Option<Supervised>,
}

impl Prosody {
    /// Write a config into `dir` (created if missing) and start the server on a free port.
    pub fn start(dir: &Path) -> Result<Prosody, StackError> {
        for tool in ["prosody", "prosodyctl"] {
            require_tool(tool, "prosody")?;
        }
        for sub in ["data", "certs"] {
            std::fs::create_dir_all(dir.join(sub))
                .map_err(io(format!("creating {}", dir.display())))?;
        }
        let dir = std::fs::canonicalize(dir).map_err(io(format!("resolving {}", dir.display())))?;
        let port = free_port()?;
        let ca = ProjectCa::create_or_reuse(&dir.join("certs"), &[XMPP_DOMAIN, AGENTS_DOMAIN])?;
        let config = dir.join("prosody.cfg.lua");
        std::fs::write(&config, config_text(&dir, port, &ca))
            .map_err(io(format!("writing {}", config.display())))?;
        let mut p = Prosody {
            dir,
            config,
            port,
            ca,
            process: None,
        };
        p.launch()?;
        Ok(p)
    }

    /// The client port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The stack's CA, which issued the server's certificate (and can issue others).
    pub fn ca(&self) -> &ProjectCa {
        &self.ca
    }

    /// The CA the server's certificate chains to (PEM): what clients pin.
    pub fn ca_pem(&self) -> &str {
        self.ca.ca_pem()
    }

    /// `127.0.0.1:<port>`, as written into `xmpp.server` of the configs.
    pub fn server(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The generated config file.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The process id of the running server, if it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Supervised::pid)
    }

    /// An error (with the server log) if the server was started and has exited since.
    pub fn check_alive(&mut self) -> Result<(), StackError> {
        match &mut self.process {
            Some(p) => p.check_alive().map_err(|e| with_server_log(e, &self.dir)),
            None => Ok(()),
        }
    }

    /// Create (or reset the password of) the account `user@localhost`.
    pub fn register(&self, user: &str, password: &str) -> Result<(), StackError> {
        let out = Command::new("prosodyctl")
            .arg("--config")
            .arg(&self.config)
            .args(["register", user, XMPP_DOMAIN, password])
            .output()
            .map_err(io(format!("running prosodyctl register {user}")))?;
        if !out.status.success() {
            let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
            output.push_str(&String::from_utf8_lossy(&out.stderr));
            return Err(StackError::Register {
                user: user.to_owned(),
                domain: XMPP_DOMAIN.to_owned(),
                output: format!("{}; {}", out.status, output.trim()),
            });
        }
        Ok(())
    }

    /// SIGTERM, wait, SIGKILL if needed. Accounts and data stay in the state dir.
    pub fn stop(&mut self) -> Result<(), StackError> {
        if let Some(mut p) = self.process.take() {
            p.stop(STOP_GRACE)?;
        }
        Ok(())
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) -> Result<(), StackError> {
        if let Some(mut p) = self.process.take() {
            p.kill9()?;
        }
        Ok(())
    }

    /// Stop (if running) and start again on the same port with the same accounts.
    pub fn restart(&mut self) -> Result<(), StackError> {
        self.stop()?;
        self.launch()
    }

    fn launch(&mut self) -> Result<(), StackError> {
        let mut cmd = Command::new("prosody");
        cmd.arg("-F").arg("--config").arg(&self.config);
        let log = self.dir.join("prosody.out");
        let mut p = Supervised::spawn("prosody", cmd, &log)?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        p.wait_ready(
            &format!("prosody on {addr}"),
            START_TIMEOUT,
            &self.dir.join("prosody.log"),
            || serves_xmpp(addr),
        )
        .map_err(|e| with_server_log(e, &self.dir))?;
        tracing::info!(port = self.port, pid = p.pid(), "prosody is up");
        self.process = Some(p);
        Ok(())
    }
}

impl Drop for Prosody {
    fn drop(&mut self) {
        if let Err(e) = self.kill() {
            tracing::warn!(error = %e, "could not kill prosody");
        }
    }
}

/// True when the server at `addr` answers a stream header with its stream features: the
/// listener is open and the modules behind it are loaded (an open port alone is not enough).
fn serves_xmpp(addr: SocketAddr) -> bool {
    let probe = || -> std::io::Result<bool> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
        s.set_read_timeout(Some(Duration::from_millis(100)))?;
        s.set_write_timeout(Some(Duration::from_millis(500)))?;
        write!(
            s,
            "<?xml version='1.0'?><stream:stream to='{XMPP_DOMAIN}' xmlns='jabber:client' \
             xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>"
        )?;
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        while got.len() < 16 * 1024 {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok(false);
            }
            got.extend_from_slice(&buf[..n]);
            if got.windows(18).any(|w| w == b"</stream:features>") {
                return Ok(true);
            }
        }
        Ok(false)
    };
    probe().unwrap_or(false)
}

/// Prosody logs most start-up failures to its own log file, not to stdout: show that one.
fn with_server_log(e: StackError, dir: &Path) -> StackError {
    match e {
        StackError::Exited {
            what,
            status,
            tail: out,
            ..
        } => {
            let log = dir.join("prosody.log");
            let tail = format!("{out}{}", tail(&log));
            StackError::Exited {
                what,
                status,
                log,
                tail,
            }
        }
        other => other,
    }
}

/// A Lua string literal for a path (escapes backslashes and quotes).
fn lua_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The server config: private files in `dir`, one c2s port on loopback with STARTTLS required
/// (certificate and key from `ca`), nothing else.
fn config_text(dir: &Path, port: u16, ca: &ProjectCa) -> String {
    let d = |name: &str| lua_str(&dir.join(name).to_string_lossy());
    let mut c = String::new();
    // Writing to a String cannot fail.
    let _ = write!(
        c,
        r#"-- Generated by copilot-stack: a private Prosody for one local stack. Do not edit.
-- It runs as whoever starts it (also root) and keeps all its files in this directory.
run_as_root = true
pidfile = {pidfile}
data_path = {data}
plugin_paths = {{ }}
certificates = {certs}
log = {{ {{ levels = {{ min = "info" }}, to = "file", filename = {log} }} }}

interfaces = {{ "127.0.0.1" }}
c2s_ports = {{ {port} }}
c2s_direct_tls_ports = {{ }}
s2s_ports = {{ }}
component_ports = {{ }}
http_ports = {{ }}
https_ports = {{ }}

-- No mod_smacks: stream resumption makes tokio-xmpp 6 reconnect in a tight loop after a server
-- restart, and it delays the offline presence of a killed client. No mod_limits: it throttles.
modules_enabled = {{ "disco", "roster", "saslauth", "tls", "ping", "register", "posix" }}
modules_disabled = {{ "s2s", "offline", "limits", "smacks" }}

-- Clients must use STARTTLS; the certificate chains to the stack's private CA, which they pin.
ssl = {{ certificate = {cert}; key = {key}; }}
c2s_require_encryption = true
allow_unencrypted_plain_auth = false
authentication = "internal_hashed"
storage = "internal"
allow_registration = false
c2s_timeout = 60
network_settings = {{ nagle = false, tcp_backlog = 1024 }}

VirtualHost "{domain}"

-- Agents that log in anonymously: a new random JID on every login, no account, no password.
-- They prove their names to the manager with tokens signed by the project key.
VirtualHost "{agents}"
    authentication = "anonymous"
"#,
        pidfile = d("prosody.pid"),
        data = d("data"),
        certs = d("certs"),
        log = d("prosody.log"),
        cert = lua_str(&ca.cert().to_string_lossy()),
        key = lua_str(&ca.key().to_string_lossy()),
        domain = XMPP_DOMAIN,
        agents = AGENTS_DOMAIN,
    );
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_loopback_tls_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ProjectCa::create_or_reuse(dir.path(), &[XMPP_DOMAIN]).unwrap();
        let c = config_text(Path::new("/tmp/st\"ate"), 23456, &ca);
        assert!(c.contains("c2s_require_encryption = true"), "{c}");
        assert!(
            c.contains(&format!("certificate = \"{}\"", ca.cert().display())),
            "{c}"
        );
        assert!(c.contains("c2s_ports = { 23456 }"), "{c}");
        assert!(c.contains("interfaces = { \"127.0.0.1\" }"), "{c}");
        assert!(c.contains("data_path = \"/tmp/st\\\"ate/data\""), "{c}");
        let modules = c
            .lines()
            .find(|l| l.starts_with("modules_enabled"))
            .unwrap();
        assert!(!modules.contains("smacks") && !modules.contains("limits"));
        assert!(c.contains("tcp_backlog = 1024"));
    }
}
