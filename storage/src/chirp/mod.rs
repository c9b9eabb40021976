//! An async client for Chirp, the file server of the Cooperative Computing Tools, which the
//! original Co-Pilot staged all data through.
//!
//! One [`ChirpClient`] is one TCP connection. Requests are single lines of at most
//! [`MAX_LINE`] bytes with percent-encoded paths; every answer starts with a decimal line, a
//! negative one being an error code ([`ChirpCode`]). Every read and write has a timeout; file
//! bodies have an idle timeout per chunk instead, so large transfers are not cut. After an error
//! in the middle of a request (a timeout, a short read, a disconnect) the connection is out of
//! step and the client refuses further requests ([`ChirpError::Broken`]): connect again.
//!
//! Authentication tries the given methods in order: `address` and `hostname` (the server
//! names the client by its address), `unix` (the client proves its local user by creating the
//! file the server names; same host only) and `ticket` (see [`Ticket`]).

mod error;
mod ticket;

#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

pub use error::{ChirpCode, ChirpError};
pub use ticket::{Ticket, TICKET_BITS};

/// Longest request line the server accepts, newline included.
pub const MAX_LINE: usize = 1024;
/// Longest answer line this client reads.
const MAX_ANSWER_LINE: u64 = 4096;
/// Bytes moved per read or write of a file body.
const CHUNK: usize = 1 << 20;
/// The server's challenge is 64 bytes; anything much longer is not a Chirp server.
const MAX_CHALLENGE: usize = 1024;
/// Most entries read from a directory listing or ACL.
const MAX_ENTRIES: usize = 1_000_000;

/// How to prove who we are.
#[derive(Clone, Debug)]
pub enum Auth {
    /// The server names us by our IP address (`address:127.0.0.1`).
    Address,
    /// The server names us by the reverse DNS name of our address.
    Hostname,
    /// We prove our local user by creating a file the server names (same host only).
    Unix,
    /// We hold a ticket's private key.
    Ticket(Box<Ticket>),
}

impl Auth {
    fn method(&self) -> &'static str {
        match self {
            Auth::Address => "address",
            Auth::Hostname => "hostname",
            Auth::Unix => "unix",
            Auth::Ticket(_) => "ticket",
        }
    }
}

/// What `stat` says about a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    pub mode: u32,
    pub size: u64,
    pub mtime: i64,
}

impl Stat {
    /// Whether it is a directory.
    pub fn is_dir(&self) -> bool {
        self.mode & 0o170_000 == 0o040_000
    }
}

/// A digest algorithm the server's `hash` command knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HashAlgo {
    Md5,
    Sha1,
}

impl HashAlgo {
    fn name(self) -> &'static str {
        match self {
            HashAlgo::Md5 => "md5",
            HashAlgo::Sha1 => "sha1",
        }
    }

    fn len(self) -> usize {
        match self {
            HashAlgo::Md5 => 16,
            HashAlgo::Sha1 => 20,
        }
    }
}

/// One connection to a Chirp server, authenticated.
#[derive(Debug)]
pub struct ChirpClient {
    conn: BufReader<TcpStream>,
    addr: String,
    timeout: Duration,
    subject: String,
    broken: bool,
}

/// Percent-encodes a path the way the server decodes it: bytes up to space, from `{` on, and
/// `% \ < > ' "`. A path must be absolute and must not hold NUL or newline.
pub fn encode_path(path: &str) -> Result<String, ChirpError> {
    let bad = |reason| ChirpError::BadPath {
        path: path.chars().take(200).collect(),
        reason,
    };
    if !path.starts_with('/') {
        return Err(bad("not absolute"));
    }
    if path.bytes().any(|b| b == 0 || b == b'\n') {
        return Err(bad("holds NUL or a newline"));
    }
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        if b <= b' ' || b >= b'{' || matches!(b, b'%' | b'\\' | b'<' | b'>' | b'\'' | b'"') {
            out.push_str(&format!("%{b:02X}"));
        } else {
            out.push(char::from(b));
        }
    }
    Ok(out)
}

impl ChirpClient {
    /// Connects to `addr` (`host:port`) and authenticates with the first method the server
    /// accepts. `timeout` bounds every step (and each chunk of a file body).
    pub async fn connect(
        addr: &str,
        auths: &[Auth],
        timeout: Duration,
    ) -> Result<ChirpClient, ChirpError> {
        let connect = |source| ChirpError::Connect {
            addr: addr.to_owned(),
            source,
        };
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| connect(std::io::ErrorKind::TimedOut.into()))?
            .map_err(connect)?;
        stream.set_nodelay(true).map_err(connect)?;
        let mut c = ChirpClient {
            conn: BufReader::with_capacity(64 * 1024, stream),
            addr: addr.to_owned(),
            timeout,
            subject: String::new(),
            broken: false,
        };
        for auth in auths {
            if let Some(subject) = c.try_auth(auth).await? {
                c.subject = subject;
                return Ok(c);
            }
        }
        Err(ChirpError::Auth {
            addr: addr.to_owned(),
            tried: auths
                .iter()
                .map(Auth::method)
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    /// The server's name for us, e.g. `address:127.0.0.1`.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// `host:port` of the server.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// One method: `Some(subject)` if the server accepted us, `None` to try the next.
    async fn try_auth(&mut self, auth: &Auth) -> Result<Option<String>, ChirpError> {
        const OP: &str = "auth";
        self.send(OP, format!("{}\n", auth.method()).as_bytes())
            .await?;
        if self.line(OP).await? != "yes" {
            return Ok(None);
        }
        let accepted = match auth {
            Auth::Address | Auth::Hostname => self.line(OP).await? == "yes",
            Auth::Unix => self.unix_challenge().await?,
            Auth::Ticket(t) => self.ticket_challenge(t).await?,
        };
        if !accepted {
            return Ok(None);
        }
        // "yes", the method, the subject.
        let ok = self.line(OP).await?;
        if ok != "yes" {
            return Err(self.protocol(OP, format!("expected yes after auth, got {ok:?}")));
        }
        let method = self.line(OP).await?;
        let subject = self.line(OP).await?;
        Ok(Some(format!("{method}:{subject}")))
    }

    /// `unix`: create the file the server names, say "yes", read its verdict.
    async fn unix_challenge(&mut self) -> Result<bool, ChirpError> {
        const OP: &str = "auth unix";
        let path = PathBuf::from(self.line(OP).await?);
        let created = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path);
        if created.is_err() {
            // The server reads "no" and waits for the next method, saying nothing.
            self.send(OP, b"no\n").await?;
            return Ok(false);
        }
        self.send(OP, b"yes\n").await?;
        let verdict = self.line(OP).await?;
        // The server usually removes it itself.
        let _ = std::fs::remove_file(&path);
        Ok(verdict == "yes")
    }

    /// `ticket`: name the ticket by its digest, sign the challenge, read the verdict, end the
    /// ticket list.
    async fn ticket_challenge(&mut self, ticket: &Ticket) -> Result<bool, ChirpError> {
        const OP: &str = "auth ticket";
        self.send(OP, format!("{}\n", ticket.digest()).as_bytes())
            .await?;
        let answer = self.line(OP).await?;
        let accepted = match answer.parse::<usize>() {
            Ok(n) if n > 0 && n <= MAX_CHALLENGE => {
                let mut challenge = vec![0u8; n];
                self.read_exact(OP, &mut challenge).await?;
                let signature = ticket.sign(&challenge)?;
                let mut msg = format!("{}\n", signature.len()).into_bytes();
                msg.extend_from_slice(&signature);
                self.send(OP, &msg).await?;
                match self.line(OP).await?.as_str() {
                    "success" => true,
                    "failure" => false,
                    other => return Err(self.protocol(OP, format!("verdict {other:?}"))),
                }
            }
            // The server does not know this ticket.
            _ if answer == "failure" || answer == "declined" => false,
            _ => return Err(self.protocol(OP, format!("challenge length {answer:?}"))),
        };
        if !accepted {
            // No more tickets to offer.
            self.send(OP, b"==\n").await?;
        }
        Ok(accepted)
    }

    // -----------------------------------------------------------------------------------------
    // Plumbing

    fn protocol(&mut self, op: &'static str, detail: String) -> ChirpError {
        self.broken = true;
        ChirpError::Protocol { op, detail }
    }

    async fn send(&mut self, op: &'static str, bytes: &[u8]) -> Result<(), ChirpError> {
        timed(self.timeout, op, self.conn.get_mut().write_all(bytes)).await
    }

    /// One answer line without its newline.
    async fn line(&mut self, op: &'static str) -> Result<String, ChirpError> {
        let mut buf = Vec::new();
        let read = timed(
            self.timeout,
            op,
            (&mut self.conn)
                .take(MAX_ANSWER_LINE)
                .read_until(b'\n', &mut buf),
        )
        .await;
        match read {
            Err(e) => Err(e),
            Ok(0) => Err(ChirpError::Disconnected { op }),
            Ok(_) if buf.last() != Some(&b'\n') => {
                if buf.len() as u64 >= MAX_ANSWER_LINE {
                    Err(self.protocol(op, "answer line too long".into()))
                } else {
                    Err(ChirpError::Disconnected { op })
                }
            }
            Ok(_) => {
                buf.pop();
                String::from_utf8(buf).map_err(|_| self.protocol(op, "answer is not UTF-8".into()))
            }
        }
    }

    async fn read_exact(&mut self, op: &'static str, buf: &mut [u8]) -> Result<(), ChirpError> {
        timed(self.timeout, op, self.conn.read_exact(buf))
            .await
            .map(drop)
    }

    /// The decimal result line; a negative one is the server's refusal of `op` on `path`.
    async fn result(&mut self, op: &'static str, path: &str) -> Result<i64, ChirpError> {
        let line = self.line(op).await?;
        let n: i64 = line
            .trim()
            .parse()
            .map_err(|_| self.protocol(op, format!("result {line:?} is not a number")))?;
        match ChirpCode::from_result(n) {
            None => Ok(n),
            Some(code) => Err(ChirpError::Server {
                op,
                path: path.to_owned(),
                code,
            }),
        }
    }

    /// Sends one request line (checked against [`MAX_LINE`]) and reads its result.
    async fn request(
        &mut self,
        op: &'static str,
        path: &str,
        line: String,
    ) -> Result<i64, ChirpError> {
        if line.len() > MAX_LINE {
            return Err(ChirpError::BadPath {
                path: path.chars().take(200).collect(),
                reason: "request line longer than the server accepts",
            });
        }
        self.send(op, line.as_bytes()).await?;
        self.result(op, path).await
    }

    /// Runs one operation, marking the connection broken if it failed half-way.
    async fn guarded<T>(
        &mut self,
        run: impl AsyncFnOnce(&mut Self) -> Result<T, ChirpError>,
    ) -> Result<T, ChirpError> {
        if self.broken {
            return Err(ChirpError::Broken);
        }
        let r = run(self).await;
        if let Err(e) = &r {
            if !e.leaves_connection_clean() {
                self.broken = true;
            }
        }
        r
    }

    // -----------------------------------------------------------------------------------------
    // Requests

    /// The server's name for us, asked again.
    pub async fn whoami(&mut self) -> Result<String, ChirpError> {
        self.guarded(async |c| {
            let n = c
                .request("whoami", "", format!("whoami {MAX_LINE}\n"))
                .await?;
            let mut buf = vec![0u8; usize::try_from(n).unwrap_or(0).min(MAX_LINE)];
            c.read_exact("whoami", &mut buf).await?;
            Ok(String::from_utf8_lossy(&buf).into_owned())
        })
        .await
    }

    /// Mode, size and mtime of `path`.
    pub async fn stat(&mut self, path: &str) -> Result<Stat, ChirpError> {
        let enc = encode_path(path)?;
        self.guarded(async |c| {
            c.request("stat", path, format!("stat {enc}\n")).await?;
            let line = c.line("stat").await?;
            let f: Vec<i64> = line
                .split_ascii_whitespace()
                .map(str::parse)
                .collect::<Result<_, _>>()
                .map_err(|_| c.protocol("stat", format!("stat line {line:?}")))?;
            if f.len() != 13 {
                return Err(c.protocol("stat", format!("stat line {line:?}")));
            }
            Ok(Stat {
                mode: u32::try_from(f[2]).unwrap_or(0),
                size: u64::try_from(f[7]).unwrap_or(0),
                mtime: f[11],
            })
        })
        .await
    }

    /// Creates a directory (`mode` e.g. 0o755).
    pub async fn mkdir(&mut self, path: &str, mode: u32) -> Result<(), ChirpError> {
        let enc = encode_path(path)?;
        self.guarded(async |c| {
            c.request("mkdir", path, format!("mkdir {enc} {mode}\n"))
                .await
                .map(drop)
        })
        .await
    }

    /// Creates a directory and its missing parents; an existing one is fine.
    pub async fn mkdir_all(&mut self, path: &str, mode: u32) -> Result<(), ChirpError> {
        let mut at = String::new();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            at.push('/');
            at.push_str(part);
            match self.mkdir(&at, mode).await {
                Err(e) if e.code() == Some(ChirpCode::AlreadyExists) => {}
                other => other?,
            }
        }
        Ok(())
    }

    /// Removes a file.
    pub async fn unlink(&mut self, path: &str) -> Result<(), ChirpError> {
        let enc = encode_path(path)?;
        self.guarded(async |c| {
            c.request("unlink", path, format!("unlink {enc}\n"))
                .await
                .map(drop)
        })
        .await
    }

    /// Removes a directory and everything in it.
    pub async fn rmall(&mut self, path: &str) -> Result<(), ChirpError> {
        let enc = encode_path(path)?;
        self.guarded(async |c| {
            c.request("rmall", path, format!("rmall {enc}\n"))
                .await
                .map(drop)
        })
        .await
    }

    /// Renames `from` to `to` (replacing `to`).
    pub async fn rename(&mut self, from: &str, to: &str) -> Result<(), ChirpError> {
        let (a, b) = (encode_path(from)?, encode_path(to)?);
        self.guarded(async |c| {
            c.request("rename", from, format!("rename {a} {b}\n"))
                .await
                .map(drop)
        })
        .await
    }

    /// A request on `path` answered by lines up to an empty one (a listing).
    async fn listing(&mut self, op: &'static str, path: &str) -> Result<Vec<String>, ChirpError> {
        let enc = encode_path(path)?;
        self.guarded(async |c| {
            c.request(op, path, format!("{op} {enc}\n")).await?;
            let mut lines = Vec::new();
            loop {
                let line = c.line(op).await?;
                if line.is_empty() {
                    return Ok(lines);
                }
                if lines.len() == MAX_ENTRIES {
                    return Err(c.protocol(op, "too many entries".into()));
                }
                lines.push(line);
            }
        })
        .await
    }

    /// The names in a directory (without `.` and `..`).
    pub async fn getdir(&mut self, path: &str) -> Result<Vec<String>, ChirpError> {
        let mut names = self.listing("getdir", path).await?;
        names.retain(|n| n != "." && n != "..");
        Ok(names)
    }

    /// The ACL of a directory: `(subject, rights)` pairs.
    pub async fn getacl(&mut self, path: &str) -> Result<Vec<(String, String)>, ChirpError> {
        let lines = self.listing("getacl", path).await?;
        Ok(lines
            .iter()
            .map(|line| {
                let (subject, rights) = line.split_once(' ').unwrap_or((line.as_str(), ""));
                (subject.to_owned(), rights.trim().to_owned())
            })
            .collect())
    }

    /// Gives `subject` these `rights` (letters from `rwldpavx`; empty removes the entry) on a
    /// directory.
    pub async fn setacl(
        &mut self,
        path: &str,
        subject: &str,
        rights: &str,
    ) -> Result<(), ChirpError> {
        let enc = encode_path(path)?;
        check_word(path, subject)?;
        let rights = if rights.is_empty() { "-" } else { rights };
        check_word(path, rights)?;
        self.guarded(async |c| {
            c.request("setacl", path, format!("setacl {enc} {subject} {rights}\n"))
                .await
                .map(drop)
        })
        .await
    }

    /// The server's md5 or sha1 of a file.
    pub async fn hash(&mut self, algo: HashAlgo, path: &str) -> Result<Vec<u8>, ChirpError> {
        let enc = encode_path(path)?;
        self.guarded(async |c| {
            let n = c
                .request("hash", path, format!("hash {} {enc}\n", algo.name()))
                .await?;
            if usize::try_from(n).ok() != Some(algo.len()) {
                return Err(c.protocol("hash", format!("digest of {n} bytes")));
            }
            let mut digest = vec![0u8; algo.len()];
            c.read_exact("hash", &mut digest).await?;
            Ok(digest)
        })
        .await
    }

    /// Streams a file into `out`, calling `on_chunk` with each piece (for hashing and
    /// progress). Refuses files over `limit` bytes before reading them. Returns the size.
    pub async fn getfile(
        &mut self,
        path: &str,
        out: &mut (impl AsyncWrite + Unpin + Send),
        limit: u64,
        on_chunk: &mut (dyn FnMut(&[u8]) + Send),
    ) -> Result<u64, ChirpError> {
        const OP: &str = "getfile";
        let enc = encode_path(path)?;
        self.guarded(async |c| {
            let n = c.request(OP, path, format!("getfile {enc}\n")).await?;
            let size = u64::try_from(n).unwrap_or(0);
            if size > limit {
                return Err(ChirpError::TooLarge {
                    op: OP,
                    path: path.to_owned(),
                    size,
                    limit,
                });
            }
            let mut buf = vec![0u8; CHUNK.min(usize::try_from(size).unwrap_or(CHUNK)).max(1)];
            let mut left = size;
            while left > 0 {
                let want = buf.len().min(usize::try_from(left).unwrap_or(buf.len()));
                let got = timed(c.timeout, OP, c.conn.read(&mut buf[..want])).await?;
                if got == 0 {
                    return Err(ChirpError::Short {
                        op: OP,
                        path: path.to_owned(),
                        expected: size,
                        got: size - left,
                    });
                }
                on_chunk(&buf[..got]);
                let local = |e: std::io::Error| ChirpError::Local {
                    op: OP,
                    path: path.to_owned(),
                    reason: e.to_string(),
                };
                out.write_all(&buf[..got]).await.map_err(local)?;
                left -= got as u64;
            }
            out.flush().await.map_err(|e| ChirpError::Local {
                op: OP,
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
            Ok(size)
        })
        .await
    }

    /// Writes exactly `len` bytes from `src` to `path` (mode e.g. 0o644), calling `on_chunk`
    /// with each piece. Note the server's behaviour: an interrupted `putfile` leaves a cut file
    /// at `path` (and an existing file there is gone); [`ChirpClient::putfile_atomic`] avoids
    /// that.
    pub async fn putfile(
        &mut self,
        path: &str,
        mode: u32,
        len: u64,
        src: &mut (impl AsyncRead + Unpin + Send),
        on_chunk: &mut (dyn FnMut(&[u8]) + Send),
    ) -> Result<(), ChirpError> {
        const OP: &str = "putfile";
        let enc = encode_path(path)?;
        self.guarded(async |c| {
            // Only after a 0 may the body follow: a body after a refusal would be read as
            // requests.
            c.request(OP, path, format!("putfile {enc} {mode} {len}\n"))
                .await?;
            let mut buf = vec![0u8; CHUNK.min(usize::try_from(len).unwrap_or(CHUNK)).max(1)];
            let mut left = len;
            while left > 0 {
                let want = buf.len().min(usize::try_from(left).unwrap_or(buf.len()));
                let got = src
                    .read(&mut buf[..want])
                    .await
                    .map_err(|e| ChirpError::Local {
                        op: OP,
                        path: path.to_owned(),
                        reason: format!("reading the local file: {e}"),
                    })?;
                if got == 0 {
                    return Err(ChirpError::Local {
                        op: OP,
                        path: path.to_owned(),
                        reason: format!("the local file ended {left} bytes early"),
                    });
                }
                on_chunk(&buf[..got]);
                c.send(OP, &buf[..got]).await?;
                left -= got as u64;
            }
            let stored = c.result(OP, path).await?;
            if u64::try_from(stored).ok() != Some(len) {
                return Err(ChirpError::Short {
                    op: OP,
                    path: path.to_owned(),
                    expected: len,
                    got: u64::try_from(stored).unwrap_or(0),
                });
            }
            Ok(())
        })
        .await
    }

    /// [`ChirpClient::putfile`] to a temporary name beside `path`, then a rename onto it: a
    /// reader never sees a cut file at `path`, and an existing file there survives a failed
    /// upload. The temporary file is removed after a refusal; after a broken connection it is
    /// left for the directory's owner to clean up.
    pub async fn putfile_atomic(
        &mut self,
        path: &str,
        mode: u32,
        len: u64,
        src: &mut (impl AsyncRead + Unpin + Send),
        on_chunk: &mut (dyn FnMut(&[u8]) + Send),
    ) -> Result<(), ChirpError> {
        let (dir, name) = path.rsplit_once('/').ok_or_else(|| ChirpError::BadPath {
            path: path.to_owned(),
            reason: "no file name",
        })?;
        let tmp = format!("{dir}/.{name}.part-{:016x}", rand::random::<u64>());
        if let Err(e) = self.putfile(&tmp, mode, len, src, on_chunk).await {
            if !self.broken {
                let _ = self.unlink(&tmp).await;
            }
            return Err(e);
        }
        self.rename(&tmp, path).await
    }

    /// Registers `ticket` as ours (valid for `secs` seconds, the server may cut that).
    pub async fn ticket_register(&mut self, ticket: &Ticket, secs: u64) -> Result<(), ChirpError> {
        const OP: &str = "ticket_register";
        let pem = ticket.public_pem().to_owned();
        self.guarded(async |c| {
            c.send(
                OP,
                format!("ticket_register self {secs} {}\n", pem.len()).as_bytes(),
            )
            .await?;
            c.send(OP, pem.as_bytes()).await?;
            c.result(OP, "").await.map(drop)
        })
        .await
    }

    /// Lets `ticket` use `rights` (within our own) on the directory `path` and below.
    pub async fn ticket_modify(
        &mut self,
        ticket: &Ticket,
        path: &str,
        rights: &str,
    ) -> Result<(), ChirpError> {
        let enc = encode_path(path)?;
        check_word(path, rights)?;
        let subject = ticket.subject();
        self.guarded(async |c| {
            c.request(
                "ticket_modify",
                path,
                format!("ticket_modify {subject} {enc} {rights}\n"),
            )
            .await
            .map(drop)
        })
        .await
    }

    /// Withdraws a ticket (by its subject, `ticket:<digest>`).
    pub async fn ticket_delete(&mut self, subject: &str) -> Result<(), ChirpError> {
        check_word("", subject)?;
        self.guarded(async |c| {
            c.request(
                "ticket_delete",
                subject,
                format!("ticket_delete {subject}\n"),
            )
            .await
            .map(drop)
        })
        .await
    }
}

/// `f` within `timeout`; an early end of the stream is a disconnect.
async fn timed<T>(
    timeout: Duration,
    op: &'static str,
    f: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<T, ChirpError> {
    match tokio::time::timeout(timeout, f).await {
        Err(_) => Err(ChirpError::Timeout {
            op,
            secs: timeout.as_secs(),
        }),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            Err(ChirpError::Disconnected { op })
        }
        Ok(Err(source)) => Err(ChirpError::Io { op, source }),
        Ok(Ok(v)) => Ok(v),
    }
}

/// A request word (subject, rights) must not break the line apart.
fn check_word(path: &str, word: &str) -> Result<(), ChirpError> {
    if word.is_empty() || word.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(ChirpError::BadPath {
            path: path.to_owned(),
            reason: "subject or rights hold white space",
        });
    }
    Ok(())
}
