//! A small client of QEMU's machine protocol (QMP) over its unix socket: connect (retrying
//! until QEMU has created the socket), read the greeting, negotiate capabilities, then run
//! commands one at a time. Every read is bounded by a timeout, lines are bounded in length,
//! asynchronous events are skipped, and anything that is not the JSON QMP promises is an error,
//! never a panic. File descriptors go to QEMU with `getfd` (SCM_RIGHTS).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Longest line read from QEMU (its answers here are small).
const MAX_LINE: u64 = 1 << 20;

/// Why a QMP exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to QMP at {path}: {error}")]
    Connect { path: String, error: std::io::Error },
    #[error("QMP I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("no answer from QMP within {0:?}")]
    Timeout(Duration),
    #[error("QEMU closed the QMP connection")]
    Closed,
    #[error("QMP sent a line longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("QMP sent something unexpected: {0}")]
    Malformed(String),
    #[error("QMP {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
}

/// A QMP connection in command mode.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    timeout: Duration,
}

impl Qmp {
    /// Connects to `path`, retrying until `limit` (the socket appears once QEMU has started),
    /// as long as `alive()` says QEMU still runs; then greeting and `qmp_capabilities`. Reads
    /// wait at most `timeout`.
    pub fn connect(
        path: &Path,
        limit: Duration,
        timeout: Duration,
        mut alive: impl FnMut() -> bool,
    ) -> Result<Qmp, QmpError> {
        let deadline = Instant::now() + limit;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(error) => {
                    if Instant::now() >= deadline || !alive() {
                        return Err(QmpError::Connect {
                            path: path.display().to_string(),
                            error,
                        });
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        };
        let writer = stream.try_clone()?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            timeout,
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Malformed(format!(
                "no greeting: {}",
                excerpt(&greeting)
            )));
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// One JSON object from QEMU, waiting at most the timeout.
    fn read_message(&mut self) -> Result<Value, QmpError> {
        self.reader.get_ref().set_read_timeout(Some(self.timeout))?;
        let mut line = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_LINE)
            .read_until(b'\n', &mut line)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                    QmpError::Timeout(self.timeout)
                }
                _ => QmpError::Io(e),
            })?;
        if n == 0 {
            return Err(QmpError::Closed);
        }
        if !line.ends_with(b"\n") {
            return Err(if n as u64 >= MAX_LINE {
                QmpError::TooLong
            } else {
                QmpError::Closed
            });
        }
        let v: Value = serde_json::from_slice(&line).map_err(|e| {
            QmpError::Malformed(format!(
                "{e}: {}",
                String::from_utf8_lossy(&line[..n.min(200)])
            ))
        })?;
        if !v.is_object() {
            return Err(QmpError::Malformed(excerpt(&v)));
        }
        Ok(v)
    }

    /// Runs `command` with `arguments`; its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        self.send_line(&msg)?;
        self.answer(command)
    }

    fn send_line(&mut self, msg: &Value) -> Result<(), QmpError> {
        let mut line = msg.to_string();
        line.push('\n');
        self.writer.set_write_timeout(Some(self.timeout))?;
        self.writer.write_all(line.as_bytes())?;
        Ok(())
    }

    /// Reads until the answer to `command`, skipping events.
    fn answer(&mut self, command: &str) -> Result<Value, QmpError> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let v = self.read_message()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                let field = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("?").to_owned();
                return Err(QmpError::Command {
                    command: command.to_owned(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            if v.get("event").is_none() {
                return Err(QmpError::Malformed(excerpt(&v)));
            }
            if Instant::now() >= deadline {
                return Err(QmpError::Timeout(self.timeout));
            }
        }
    }

    /// Hands `fd` to QEMU under `name` (`getfd`: the descriptor travels as SCM_RIGHTS with the
    /// command), for a later `fd:NAME`.
    pub fn send_fd(&mut self, name: &str, fd: BorrowedFd<'_>) -> Result<(), QmpError> {
        let mut line = json!({ "execute": "getfd", "arguments": { "fdname": name } }).to_string();
        line.push('\n');
        self.writer.set_write_timeout(Some(self.timeout))?;
        let sent =
            crate::backend::qemu::os::send_with_fd(self.writer.as_raw_fd(), line.as_bytes(), fd)?;
        self.writer.write_all(&line.as_bytes()[sent..])?;
        self.answer("getfd").map(|_| ())
    }
}

/// The start of a value, for error messages.
fn excerpt(v: &Value) -> String {
    v.to_string().chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A fake QMP server on a socket: sends `script` lines after reading each request line.
    fn server(
        dir: &Path,
        greeting: &'static str,
        answers: Vec<&'static str>,
    ) -> std::path::PathBuf {
        let path = dir.join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r = BufReader::new(s);
            let _ = w.write_all(greeting.as_bytes());
            for a in answers {
                let mut req = String::new();
                if r.read_line(&mut req).unwrap_or(0) == 0 {
                    return;
                }
                let _ = w.write_all(a.as_bytes());
            }
            std::thread::sleep(Duration::from_secs(2));
        });
        path
    }

    const HELLO: &str = "{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n";
    const T: Duration = Duration::from_millis(300);

    #[test]
    fn commands_skip_events_and_errors_are_typed() {
        let dir = tempfile::tempdir().unwrap();
        let p = server(
            dir.path(),
            HELLO,
            vec![
                "{\"return\": {}}\n",
                "{\"event\": \"STOP\"}\n{\"return\": {\"status\": \"paused\"}}\n",
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"no\"}}\n",
                "[1, 2]\n",
            ],
        );
        let mut q = Qmp::connect(&p, T, T, || true).unwrap();
        let r = q.execute("query-status", None).unwrap();
        assert_eq!(r["status"], "paused");
        let e = q.execute("cont", None).unwrap_err();
        assert!(
            matches!(&e, QmpError::Command { class, desc, .. } if class == "GenericError" && desc == "no"),
            "{e}"
        );
        let e = q.execute("x", None).unwrap_err();
        assert!(matches!(e, QmpError::Malformed(_)), "{e}");
    }

    #[test]
    fn garbage_silence_and_hangups_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let p = server(dir.path(), "\u{1}\u{2}not json\n", vec![]);
        let e = Qmp::connect(&p, T, T, || true).unwrap_err();
        assert!(matches!(e, QmpError::Malformed(_)), "{e}");

        let dir = tempfile::tempdir().unwrap();
        let p = server(dir.path(), "{\"QMP\": {}", vec![]);
        let e = Qmp::connect(&p, T, T, || true).unwrap_err();
        assert!(matches!(e, QmpError::Timeout(_)), "{e}");

        let dir = tempfile::tempdir().unwrap();
        let p = server(dir.path(), HELLO, vec!["{\"return\": {}}\n"]);
        let mut q = Qmp::connect(&p, T, T, || true).unwrap();
        let e = q.execute("stop", None).unwrap_err();
        assert!(matches!(e, QmpError::Timeout(_)), "{e}");

        let dir = tempfile::tempdir().unwrap();
        let e = Qmp::connect(&dir.path().join("none"), T, T, || true).unwrap_err();
        assert!(matches!(e, QmpError::Connect { .. }), "{e}");
    }
}
