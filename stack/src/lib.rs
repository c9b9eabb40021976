//! A local copilot stack built from real processes: a private Prosody (TLS with a private CA), the manager, agents and
//! a private Chirp server, each a supervised child in its own process group. Used by `copilot up`
//! and by the end-to-end tests. Everything is blocking (std::process, std::net); call it from `spawn_blocking` inside
//! an async runtime if blocking matters there.

mod chirp;
mod error;
mod http;
mod link;
mod local;
mod port;
mod prosody;
mod supervised;
mod tls;

pub use chirp::ChirpServer;
pub use error::StackError;
pub use link::Link;
pub use local::{default_bin_dir, LocalStack, StackOptions, AGENT_BIN, CLI_BIN};
pub use port::free_port;
pub use prosody::{Prosody, AGENTS_DOMAIN, XMPP_DOMAIN};
pub use supervised::Supervised;
pub use tls::ProjectCa;

/// The name of the user this process runs as (what a Chirp server calls `unix:<name>`).
pub fn unix_user() -> String {
    let uid = nix::unistd::getuid();
    match nix::unistd::User::from_uid(uid) {
        Ok(Some(u)) => u.name,
        _ => uid.to_string(),
    }
}

/// The path of `tool` on PATH, or [`StackError::ToolMissing`] naming the Debian `package`.
pub fn require_tool(
    tool: &'static str,
    package: &'static str,
) -> Result<std::path::PathBuf, StackError> {
    std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .map(|d| d.join(tool))
                .find(|p| p.is_file())
        })
        .ok_or(StackError::ToolMissing { tool, package })
}
