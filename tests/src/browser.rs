//! A real headless Chromium for the dashboard tests, driven over the DevTools protocol on a
//! pipe (`--remote-debugging-pipe`: JSON messages ended by a NUL byte, commands in on fd 3,
//! answers and events out on fd 4), so no WebSocket client and no port are needed. One page
//! (a target attached in flat mode); navigation, JavaScript, real mouse clicks, screenshots.
//!
//! Chromium is Debian's (`chromium`, installed by scripts/install-deps), started with a fresh
//! profile and the flags that keep it off the network. [`Browser::start`] returns why it could
//! not start, so a test can print `skipped: <reason>` where there is none.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use base64ct::Encoding;
use copilot_stack::Supervised;
use serde_json::{json, Value};

/// How long one DevTools command may take.
const ANSWER: Duration = Duration::from_secs(30);

/// Where Debian puts Chromium.
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// A running headless Chromium with one page.
#[derive(Debug)]
pub struct Browser {
    process: Supervised,
    commands: File,
    answers: Receiver<Value>,
    next_id: u64,
    session: String,
    _profile: tempfile::TempDir,
}

/// `fd`, duplicated to a number above 10 and not closed on exec.
fn high_dup(fd: i32) -> nix::Result<i32> {
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD(10))
}

fn pipe() -> Result<(OwnedFd, OwnedFd), String> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))
}

impl Browser {
    /// Start Chromium (its output goes to `log`) and open a blank page; `Err` says why not.
    pub fn start(log: &Path) -> Result<Browser, String> {
        if !Path::new(CHROMIUM).is_file() {
            return Err(format!(
                "{CHROMIUM} is missing (Debian's chromium; scripts/install-deps installs it)"
            ));
        }
        let profile = tempfile::Builder::new()
            .prefix("copilot-chromium-")
            .tempdir()
            .map_err(|e| format!("profile dir: {e}"))?;
        let (to_chrome, commands) = pipe()?;
        let (answers, from_chrome) = pipe()?;
        let (read_fd, write_fd) = (to_chrome.as_raw_fd(), from_chrome.as_raw_fd());
        let mut cmd = Command::new(CHROMIUM);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-quic",
            "--disable-dev-shm-usage",
            "--remote-debugging-pipe",
            "--window-size=1280,900",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank");
        // SAFETY: between fork and exec the closure only calls fcntl and dup2, which are
        // async-signal-safe, on descriptors the parent keeps open until spawn returns. Going
        // through fds above 10 first makes dup2 clear close-on-exec even when a pipe already
        // got the number 3 or 4.
        unsafe {
            cmd.pre_exec(move || {
                let (r, w) = (high_dup(read_fd)?, high_dup(write_fd)?);
                nix::unistd::dup2(r, 3)?;
                nix::unistd::dup2(w, 4)?;
                Ok(())
            });
        }
        let process = Supervised::spawn("chromium", cmd, log)
            .map_err(|e| format!("starting chromium: {e}"))?;
        // Only the child keeps its ends.
        drop((to_chrome, from_chrome));
        let (tx, answers_rx) = std::sync::mpsc::channel();
        let reader = BufReader::new(File::from(answers));
        std::thread::spawn(move || {
            for msg in reader.split(0) {
                let Ok(msg) = msg else { return };
                let Ok(v) = serde_json::from_slice::<Value>(&msg) else {
                    continue;
                };
                if tx.send(v).is_err() {
                    return;
                }
            }
        });
        let mut b = Browser {
            process,
            commands: File::from(commands),
            answers: answers_rx,
            next_id: 0,
            session: String::new(),
            _profile: profile,
        };
        let target = b
            .command(
                "Target.createTarget",
                json!({ "url": "about:blank" }),
                false,
            )
            .map_err(|e| format!("chromium does not answer: {e}; see {}", log.display()))?;
        let target = target["targetId"].as_str().unwrap_or_default().to_owned();
        let attached = b.command(
            "Target.attachToTarget",
            json!({ "targetId": target, "flatten": true }),
            false,
        )?;
        b.session = attached["sessionId"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        b.command(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": false }),
            true,
        )?;
        Ok(b)
    }

    /// Send a DevTools command (to the page if `page`) and wait for its result.
    fn command(&mut self, method: &str, params: Value, page: bool) -> Result<Value, String> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if page {
            msg["sessionId"] = json!(self.session);
        }
        let mut bytes = serde_json::to_vec(&msg).map_err(|e| e.to_string())?;
        bytes.push(0);
        self.commands
            .write_all(&bytes)
            .map_err(|e| format!("{method}: chromium is gone ({e})"))?;
        let deadline = Instant::now() + ANSWER;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = match self.answers.recv_timeout(left) {
                Ok(v) => v,
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!("{method}: no answer in {ANSWER:?}"))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(format!("{method}: chromium closed the pipe"))
                }
            };
            if v["id"].as_u64() != Some(id) {
                continue; // an event
            }
            if let Some(e) = v.get("error") {
                return Err(format!("{method}: {e}"));
            }
            return Ok(v["result"].clone());
        }
    }

    /// Evaluate `js` in the page (awaiting a promise) and return its value.
    pub fn eval(&mut self, js: &str) -> Result<Value, String> {
        let r = self.command(
            "Runtime.evaluate",
            json!({ "expression": js, "returnByValue": true, "awaitPromise": true }),
            true,
        )?;
        if let Some(e) = r.get("exceptionDetails") {
            return Err(format!("{js}: {e}"));
        }
        Ok(r["result"]["value"].clone())
    }

    /// Evaluate `js` until it is true (or a non-empty string or number), up to `timeout`;
    /// returns that value.
    pub fn wait_for(&mut self, what: &str, js: &str, timeout: Duration) -> Result<Value, String> {
        let deadline = Instant::now() + timeout;
        let mut last = Value::Null;
        while Instant::now() < deadline {
            // A page being replaced has no context for a moment.
            if let Ok(v) = self.eval(js) {
                let yes = match &v {
                    Value::Bool(b) => *b,
                    Value::String(s) => !s.is_empty(),
                    Value::Number(_) => true,
                    _ => false,
                };
                if yes {
                    return Ok(v);
                }
                last = v;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!(
            "timed out after {timeout:?} waiting for {what} (last: {last}) on {}",
            self.eval("location.href").unwrap_or_default()
        ))
    }

    /// Load `url` and wait until the page has loaded.
    pub fn goto(&mut self, url: &str) -> Result<(), String> {
        self.command("Page.navigate", json!({ "url": url }), true)?;
        self.wait_loaded(url)
    }

    /// Wait until the document has loaded, after a navigation to `what`.
    fn wait_loaded(&mut self, what: &str) -> Result<(), String> {
        self.wait_for(
            &format!("{what} to load"),
            "document.readyState === 'complete' && location.href !== 'about:blank'",
            ANSWER,
        )
        .map(drop)
    }

    /// The page's address.
    pub fn location(&mut self) -> Result<String, String> {
        Ok(self
            .eval("location.pathname + location.search")?
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    /// The text of the first element matching `selector`, trimmed (`Err` if there is none).
    pub fn text(&mut self, selector: &str) -> Result<String, String> {
        let js = format!(
            "(() => {{ const e = document.querySelector({}); return e ? e.textContent.trim() : null; }})()",
            json!(selector)
        );
        match self.eval(&js)? {
            Value::String(s) => Ok(s),
            _ => Err(format!("no element {selector} on {}", self.location()?)),
        }
    }

    /// Click the first element matching `selector` with the mouse, as a person would (it is
    /// scrolled into view first), then wait for the page it leads to.
    pub fn click(&mut self, selector: &str) -> Result<(), String> {
        let js = format!(
            "(() => {{ const e = document.querySelector({}); if (!e) return null; \
             e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect(); \
             return [r.left + r.width / 2, r.top + r.height / 2]; }})()",
            json!(selector)
        );
        let at = self.eval(&js)?;
        let (Some(x), Some(y)) = (at[0].as_f64(), at[1].as_f64()) else {
            return Err(format!(
                "nothing to click: {selector} on {}",
                self.location()?
            ));
        };
        let before = self.eval("location.href")?;
        for kind in ["mouseMoved", "mousePressed", "mouseReleased"] {
            self.command(
                "Input.dispatchMouseEvent",
                json!({ "type": kind, "x": x, "y": y, "button": "left", "clickCount": 1 }),
                true,
            )?;
        }
        self.wait_for(
            &format!("the click on {selector} to lead somewhere"),
            &format!("location.href !== {before} && document.readyState === 'complete'"),
            ANSWER,
        )
        .map(drop)
    }

    /// Save a PNG of the whole page (not only the window) to `path`.
    pub fn screenshot(&mut self, path: &Path) -> Result<PathBuf, String> {
        let shot = self.command(
            "Page.captureScreenshot",
            json!({ "format": "png", "captureBeyondViewport": true }),
            true,
        )?;
        let data = shot["data"].as_str().unwrap_or_default();
        let png = base64ct::Base64::decode_vec(data).map_err(|e| format!("screenshot: {e}"))?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        std::fs::write(path, png).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(path.to_owned())
    }

    /// Chromium's process id (the leader of its process group).
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ask politely; dropping `process` then stops the whole group by PID.
        let _ = self.command("Browser.close", json!({}), false);
    }
}
