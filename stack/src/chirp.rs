//! `ChirpServer`: a private `chirp_server` (Debian's coop-computing-tools) for tests and local
//! stacks. It serves a root dir inside a state dir on a free loopback port, with an ACL file the
//! caller gives, and never reports itself to a public catalog (`-u 127.0.0.1`).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::chown;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::error::io;
use crate::{free_port, require_tool, StackError, Supervised};

/// How long the server gets to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// The unprivileged user the server switches to when started as root (it refuses to run as
/// root otherwise).
const RUN_AS: &str = "nobody";
/// Seconds an idle client connection is kept.
const IDLE_TIMEOUT_SECS: u32 = 300;

/// A running `chirp_server` on `127.0.0.1:port()`.
#[derive(Debug)]
pub struct ChirpServer {
    dir: PathBuf,
    port: u16,
    process: Option<Supervised>,
}

impl ChirpServer {
    /// Start a server whose root is `dir/root` and whose default ACL (for the root dir and
    /// every dir without its own) is `acl`, one `subject rights` entry per line, e.g.
    /// `address:127.0.0.1 rwlda`.
    pub fn start(dir: &Path, acl: &str) -> Result<ChirpServer, StackError> {
        require_tool("chirp_server", "coop-computing-tools")?;
        let dir = {
            std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
            std::fs::canonicalize(dir).map_err(io(format!("resolving {}", dir.display())))?
        };
        for sub in ["root", "transient"] {
            let d = dir.join(sub);
            std::fs::create_dir_all(&d).map_err(io(format!("creating {}", d.display())))?;
            if is_root() {
                let (uid, gid) = nobody()?;
                chown(&d, Some(uid), Some(gid))
                    .map_err(io(format!("giving {} to {RUN_AS}", d.display())))?;
            }
        }
        let acl_file = dir.join("acl");
        std::fs::write(&acl_file, acl).map_err(io(format!("writing {}", acl_file.display())))?;
        let mut server = ChirpServer {
            dir,
            port: free_port()?,
            process: None,
        };
        server.launch()?;
        Ok(server)
    }

    /// For tests: [`ChirpServer::start`], or `None` (said on stdout as `skipped: …`) when
    /// chirp_server is not installed. Any other failure panics.
    pub fn start_or_skip(dir: &Path, acl: &str) -> Option<ChirpServer> {
        match ChirpServer::start(dir, acl) {
            Ok(s) => Some(s),
            Err(e @ StackError::ToolMissing { .. }) => {
                println!("skipped: {e}");
                None
            }
            Err(e) => panic!("starting chirp_server: {e}"),
        }
    }

    /// The port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The dir the server serves as `/`.
    pub fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Supervised::pid)
    }

    /// SIGKILL to the server and every per-connection child it forked (one process group).
    pub fn kill(&mut self) -> Result<(), StackError> {
        if let Some(mut p) = self.process.take() {
            p.kill9()?;
        }
        Ok(())
    }

    /// Start again on the same port (after [`ChirpServer::kill`]), with the same files.
    pub fn restart(&mut self) -> Result<(), StackError> {
        self.kill()?;
        self.launch()
    }

    fn launch(&mut self) -> Result<(), StackError> {
        let mut cmd = Command::new("chirp_server");
        cmd.arg("-r")
            .arg(self.root())
            .args(["-I", "127.0.0.1", "-p", &self.port.to_string()])
            .arg("-A")
            .arg(self.dir.join("acl"))
            .arg("-y")
            .arg(self.dir.join("transient"))
            // Never report to the public catalog server.
            .args(["-u", "127.0.0.1"])
            .args(["-t", &IDLE_TIMEOUT_SECS.to_string()])
            .arg("-o")
            .arg(self.dir.join("chirp.log"));
        if is_root() {
            cmd.args(["-i", RUN_AS]);
        }
        let log = self.dir.join("chirp.out");
        let mut p = Supervised::spawn("chirp_server", cmd, &log)?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        p.wait_ready(
            &format!("chirp_server on {addr}"),
            START_TIMEOUT,
            &self.dir.join("chirp.log"),
            || answers_chirp(addr),
        )?;
        tracing::info!(port = self.port, pid = p.pid(), "chirp_server is up");
        self.process = Some(p);
        Ok(())
    }
}

impl Drop for ChirpServer {
    fn drop(&mut self) {
        if let Err(e) = self.kill() {
            tracing::warn!(error = %e, "could not kill chirp_server");
        }
    }
}

/// True when the server at `addr` answers an authentication request with a line (a port that
/// is open is not enough: a server still starting may reset the first connections).
fn answers_chirp(addr: SocketAddr) -> bool {
    let probe = || -> std::io::Result<bool> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
        s.set_read_timeout(Some(Duration::from_secs(1)))?;
        s.write_all(b"address\n")?;
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while line.len() < 256 {
            if s.read(&mut byte)? == 0 {
                return Ok(false);
            }
            if byte[0] == b'\n' {
                return Ok(!line.is_empty());
            }
            line.push(byte[0]);
        }
        Ok(false)
    };
    probe().unwrap_or(false)
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn nobody() -> Result<(u32, u32), StackError> {
    match nix::unistd::User::from_name(RUN_AS) {
        Ok(Some(u)) => Ok((u.uid.as_raw(), u.gid.as_raw())),
        Ok(None) => Err(StackError::Io {
            what: format!("looking up user {RUN_AS}"),
            error: std::io::Error::from(std::io::ErrorKind::NotFound),
        }),
        Err(e) => Err(StackError::Io {
            what: format!("looking up user {RUN_AS}"),
            error: e.into(),
        }),
    }
}
