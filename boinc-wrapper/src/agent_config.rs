//! The agent's config for one session: the project's template (the app version's
//! `copilot_agent.toml`: XMPP server, account, manager, limits) with what only the wrapper
//! knows filled in: the agent's name, its work dir in the slot, the volunteer's identity
//! (`[volunteer]`) and when to drain (`drain_at`, from the work unit's deadline). For an agent
//! in the VM (qemu backend) the work dir is the image's, and an XMPP server on the host's
//! loopback is named as the guest reaches it: 10.0.2.2 ([`GUEST_HOST`], QEMU's user-mode
//! networking). Over TLS (a pinned CA) nothing else changes; a template that says
//! `insecure_loopback` gets `plaintext_host` for that address, as loopback is allowed on the
//! host.

use std::path::{Path, PathBuf};

use toml::{Table, Value};

use crate::volunteer::Volunteer;

/// The generated config's file name in the slot dir.
pub const AGENT_CONFIG_FILE: &str = "copilot-agent.toml";
/// Largest template read.
const MAX_TEMPLATE: u64 = 64 * 1024;
/// Longest agent name the protocol accepts.
const MAX_NAME: usize = 128;
/// The host's loopback as a guest under QEMU's user-mode networking reaches it.
pub const GUEST_HOST: &str = "10.0.2.2";
/// The agent's work dir in the VM image (a tmpfs of its own).
pub const GUEST_WORK_DIR: &str = "/var/lib/copilot-agent";

/// Why the agent config could not be written.
#[derive(Debug, thiserror::Error)]
pub enum AgentConfigError {
    #[error("cannot read the agent config template {}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("the agent config template {} is not valid TOML: {reason}", path.display())]
    Parse { path: PathBuf, reason: String },
    #[error("cannot write {}: {error}", path.display())]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// What the wrapper sets in the template.
#[derive(Clone, Debug)]
pub struct Session<'a> {
    pub host_id: i64,
    pub result_name: &'a str,
    pub work_dir: &'a Path,
    pub volunteer: &'a Volunteer,
    /// Unix seconds after which the agent takes no new job.
    pub drain_at: Option<u64>,
    /// The agent runs in the VM: host loopback addresses become [`GUEST_HOST`].
    pub in_vm: bool,
}

/// `host:port` with a loopback host named as the guest reaches it; None if not loopback.
fn guest_server(server: &str) -> Option<String> {
    let (host, port) = server.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    loopback.then(|| format!("{GUEST_HOST}:{port}"))
}

/// A stable agent name for this host and task: `boinc-<hostid>-<result name>`, white space and
/// control characters replaced, at most 128 bytes. The same task keeps its name across restarts.
pub fn agent_name(host_id: i64, result_name: &str) -> String {
    let raw = format!("boinc-{host_id}-{result_name}");
    let mut name = String::new();
    for c in raw.chars() {
        let c = if c.is_whitespace() || c.is_control() {
            '_'
        } else {
            c
        };
        if name.len() + c.len_utf8() > MAX_NAME {
            break;
        }
        name.push(c);
    }
    name
}

/// The template with the session's fields set (they replace the template's).
pub fn render(
    template: &str,
    template_path: &Path,
    s: &Session<'_>,
) -> Result<String, AgentConfigError> {
    let mut t: Table = template
        .parse()
        .map_err(|e: toml::de::Error| AgentConfigError::Parse {
            path: template_path.to_owned(),
            reason: e.message().to_owned(),
        })?;
    t.insert(
        "name".into(),
        Value::from(agent_name(s.host_id, s.result_name)),
    );
    t.insert(
        "work_dir".into(),
        Value::from(s.work_dir.to_string_lossy().into_owned()),
    );
    if s.in_vm {
        if let Some(Value::Table(xmpp)) = t.get_mut("xmpp") {
            let guest = xmpp
                .get("server")
                .and_then(Value::as_str)
                .and_then(guest_server);
            if let Some(server) = guest {
                xmpp.insert("server".into(), Value::from(server));
                let plaintext = xmpp.get("insecure_loopback").and_then(Value::as_bool);
                if plaintext == Some(true) {
                    xmpp.insert("plaintext_host".into(), Value::from(GUEST_HOST));
                }
            }
        }
    }
    let mut v = Table::new();
    // BOINC ids are never negative; the agent takes only non-negative ones.
    v.insert("user_id".into(), Value::from(s.volunteer.user_id.max(0)));
    v.insert("host_id".into(), Value::from(s.volunteer.host_id.max(0)));
    v.insert("team_id".into(), Value::from(s.volunteer.team_id.max(0)));
    if let Some(token) = &s.volunteer.host_token {
        v.insert("host_token".into(), Value::from(token.clone()));
    }
    t.insert("volunteer".into(), Value::Table(v));
    match s.drain_at.and_then(|d| i64::try_from(d).ok()) {
        Some(d) => {
            t.insert("drain_at".into(), Value::from(d));
        }
        None => {
            t.remove("drain_at");
        }
    }
    Ok(t.to_string())
}

/// Read the template at `template_path`, render it and write it to `slot_dir` (mode 0600:
/// it holds the XMPP password); returns the written path.
pub fn write(
    template_path: &Path,
    slot_dir: &Path,
    s: &Session<'_>,
) -> Result<PathBuf, AgentConfigError> {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let read = |error| AgentConfigError::Read {
        path: template_path.to_owned(),
        error,
    };
    let mut text = String::new();
    std::fs::File::open(template_path)
        .map_err(read)?
        .take(MAX_TEMPLATE)
        .read_to_string(&mut text)
        .map_err(read)?;
    let out = render(&text, template_path, s)?;
    let path = slot_dir.join(AGENT_CONFIG_FILE);
    let write_err = |error| AgentConfigError::Write {
        path: path.clone(),
        error,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .map_err(write_err)?;
    f.write_all(out.as_bytes()).map_err(write_err)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volunteer() -> Volunteer {
        Volunteer {
            user_id: 42,
            host_id: 7,
            team_id: 3,
            host_token: Some("ab".repeat(32)),
        }
    }

    #[test]
    fn the_session_fields_replace_the_templates() {
        let template = "name = \"x\"\ndrain_at = 5\n[xmpp]\njid = \"a@localhost\"\npassword = \"pw\"\n[volunteer]\nuser_id = 1\n";
        let v = volunteer();
        let s = Session {
            host_id: 7,
            result_name: "wu 1_0",
            work_dir: Path::new("/slots/0/agent"),
            volunteer: &v,
            drain_at: Some(1_800_000_000),
            in_vm: false,
        };
        let out: Table = render(template, Path::new("t.toml"), &s)
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(out["name"].as_str(), Some("boinc-7-wu_1_0"));
        assert_eq!(out["work_dir"].as_str(), Some("/slots/0/agent"));
        assert_eq!(out["xmpp"]["password"].as_str(), Some("pw"));
        assert_eq!(out["volunteer"]["user_id"].as_integer(), Some(42));
        assert_eq!(out["volunteer"]["team_id"].as_integer(), Some(3));
        assert_eq!(
            out["volunteer"]["host_token"].as_str().map(str::len),
            Some(64)
        );
        assert_eq!(out["drain_at"].as_integer(), Some(1_800_000_000));
        let none = Session {
            drain_at: None,
            ..s
        };
        let out: Table = render(template, Path::new("t.toml"), &none)
            .unwrap()
            .parse()
            .unwrap();
        assert!(out.get("drain_at").is_none());
    }

    #[test]
    fn in_the_vm_a_loopback_server_is_the_guests_view_of_the_host() {
        let v = volunteer();
        let s = Session {
            host_id: 7,
            result_name: "r",
            work_dir: Path::new(GUEST_WORK_DIR),
            volunteer: &v,
            drain_at: None,
            in_vm: true,
        };
        for (server, security, want, plaintext) in [
            (
                "127.0.0.1:5222",
                "insecure_loopback = true",
                "10.0.2.2:5222",
                Some(GUEST_HOST),
            ),
            (
                "localhost:15222",
                "insecure_loopback = true",
                "10.0.2.2:15222",
                Some(GUEST_HOST),
            ),
            (
                "[::1]:5222",
                "insecure_loopback = true",
                "10.0.2.2:5222",
                Some(GUEST_HOST),
            ),
            // Over TLS the guest reaches the same server; no plaintext exception is needed.
            (
                "127.0.0.1:5222",
                "ca = \"/etc/copilot/ca.pem\"",
                "10.0.2.2:5222",
                None,
            ),
            (
                "xmpp.example.org:5222",
                "insecure_loopback = true",
                "xmpp.example.org:5222",
                None,
            ),
        ] {
            let template = format!("[xmpp]\nserver = \"{server}\"\n{security}\n");
            let out: Table = render(&template, Path::new("t.toml"), &s)
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(out["xmpp"]["server"].as_str(), Some(want));
            assert_eq!(
                out["xmpp"].get("plaintext_host").and_then(Value::as_str),
                plaintext
            );
            assert_eq!(out["work_dir"].as_str(), Some(GUEST_WORK_DIR));
        }
    }

    #[test]
    fn names_are_bounded_and_templates_checked() {
        assert_eq!(agent_name(0, "r").as_str(), "boinc-0-r");
        assert_eq!(agent_name(1, &"é".repeat(200)).len(), 128);
        let err = render(
            "[xmpp",
            Path::new("t.toml"),
            &Session {
                host_id: 0,
                result_name: "r",
                work_dir: Path::new("/w"),
                volunteer: &volunteer(),
                drain_at: None,
                in_vm: false,
            },
        )
        .unwrap_err();
        assert!(matches!(err, AgentConfigError::Parse { .. }), "{err}");
    }

    #[test]
    fn the_written_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("t.toml");
        std::fs::write(&t, "[xmpp]\njid = \"a@b\"\n").unwrap();
        let v = volunteer();
        let path = write(
            &t,
            dir.path(),
            &Session {
                host_id: 7,
                result_name: "r",
                work_dir: dir.path(),
                volunteer: &v,
                drain_at: None,
                in_vm: false,
            },
        )
        .unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(std::fs::read_to_string(&path)
            .unwrap()
            .contains("boinc-7-r"));
    }
}
