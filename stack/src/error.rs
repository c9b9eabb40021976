//! `StackError`: everything that can go wrong while starting or driving a local stack.

use std::path::PathBuf;

/// Why a stack part could not be started or controlled. Messages say what to do where possible.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error("{package} is not installed (no `{tool}` on PATH); install it with: apt-get install {package}")]
    ToolMissing {
        tool: &'static str,
        package: &'static str,
    },
    #[error("{path} does not exist; build the binaries first: cargo build --workspace --bins")]
    BinaryMissing { path: PathBuf },
    // The cause is part of the message (not a `source`), so `{e}` alone says everything.
    #[error("{what}: {error}")]
    Io { what: String, error: std::io::Error },
    #[error("{what} failed: {output}")]
    Tool { what: String, output: String },
    #[error("no free TCP port on 127.0.0.1 between {low} and {high}")]
    NoFreePort { low: u16, high: u16 },
    #[error("{what} did not become ready within {secs} s; see {log}:\n{tail}")]
    NotReady {
        what: String,
        secs: u64,
        log: PathBuf,
        tail: String,
    },
    #[error("{what} exited unexpectedly ({status}); see {log}:\n{tail}")]
    Exited {
        what: String,
        status: std::process::ExitStatus,
        log: PathBuf,
        tail: String,
    },
    #[error("registering XMPP account {user}@{domain} failed: {output}")]
    Register {
        user: String,
        domain: String,
        output: String,
    },
    #[error("extra {what} TOML is invalid: {reason}")]
    ExtraToml { what: &'static str, reason: String },
    #[error("signal to {what} (pid {pid}) failed: {error}")]
    Signal {
        what: String,
        pid: u32,
        error: nix::Error,
    },
    #[error("copilot keygen failed: {0}")]
    Keygen(String),
    #[error("there is no agent number {0} in this stack")]
    NoSuchAgent(usize),
    #[error("unexpected HTTP answer from {url}: {reason}")]
    Http { url: String, reason: String },
}

/// Wrap an io error with what was being done.
pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StackError {
    let what = what.into();
    move |error| StackError::Io { what, error }
}
