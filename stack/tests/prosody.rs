//! The private Prosody for real: start, register, refuse plaintext, log in over STARTTLS with
//! the stack's CA pinned, restart on the same port, stop; no server process is left behind.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use copilot_stack::{Prosody, XMPP_DOMAIN};
use copilot_xmpp::{Connection, Security, TlsTrust, XmppConfig};

/// Read until one of `any_of` appears; returns what was read.
fn read_until(s: &mut TcpStream, any_of: &[&str]) -> String {
    let mut got = String::new();
    let mut buf = [0u8; 4096];
    while !any_of.iter().any(|n| got.contains(n)) {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "server closed the stream; got {got}");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    got
}

/// The stream features a plaintext client sees. A refused connection fails the test with the
/// server's state and log, so a flaky start can be told apart.
fn plaintext_features(p: &mut Prosody, dir: &Path) -> String {
    let mut s = match TcpStream::connect(("127.0.0.1", p.port())) {
        Ok(s) => s,
        Err(e) => panic!(
            "connecting to prosody on port {}: {e}; server alive: {:?}; prosody.log:\n{}",
            p.port(),
            p.check_alive(),
            std::fs::read_to_string(dir.join("prosody.log")).unwrap_or_default()
        ),
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "<?xml version='1.0'?><stream:stream to='{XMPP_DOMAIN}' xmlns='jabber:client' \
         xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>"
    )
    .unwrap();
    read_until(&mut s, &["</stream:features>"])
}

/// Log in over STARTTLS, pinning the server's CA; true once online, false if not within 5 s
/// (a refused login is only retried by the client, never reported).
fn tls_login(p: &Prosody, user: &str, password: &str) -> bool {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let trust = TlsTrust::from_pem(p.ca_pem().as_bytes()).unwrap();
    let mut conn = Connection::start(XmppConfig {
        jid: format!("{user}@{XMPP_DOMAIN}"),
        password: password.into(),
        server: p.server(),
        security: Security::Tls(trust),
    })
    .unwrap();
    let online = rt
        .block_on(conn.wait_online(Duration::from_secs(5)))
        .is_ok();
    conn.shutdown();
    online
}

fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, r)| !r.trim_start().starts_with('Z'))
    })
}

/// A started server, or None (test skipped, said on stderr) when prosody is not installed.
fn start(dir: &Path) -> Option<Prosody> {
    match Prosody::start(dir) {
        Err(copilot_stack::StackError::ToolMissing { .. }) => {
            eprintln!("SKIPPED: prosody is not installed (apt-get install prosody)");
            None
        }
        other => Some(other.unwrap()),
    }
}

#[test]
fn prosody_starts_registers_restarts_and_stops() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut p) = start(dir.path()) else {
        return;
    };
    p.register("alice", "w0nderland").unwrap();
    // Before TLS the server offers STARTTLS, required, and no way to send a password.
    let features = plaintext_features(&mut p, dir.path());
    assert!(features.contains("<starttls"), "{features}");
    assert!(features.contains("<required"), "{features}");
    assert!(!features.contains("mechanism"), "{features}");
    assert!(tls_login(&p, "alice", "w0nderland"));
    assert!(!tls_login(&p, "alice", "wrong"));

    let (port, first) = (p.port(), p.pid().unwrap());
    p.restart().unwrap();
    assert_eq!(p.port(), port);
    assert!(!running(first));
    assert!(
        tls_login(&p, "alice", "w0nderland"),
        "account and certificate survive a restart"
    );

    let second = p.pid().unwrap();
    p.kill().unwrap();
    assert!(!running(second));
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    p.restart().unwrap();
    let third = p.pid().unwrap();
    p.stop().unwrap();
    assert!(!running(third));
    assert!(p.pid().is_none());
}

#[test]
fn dropping_prosody_kills_it() {
    let dir = tempfile::tempdir().unwrap();
    let Some(p) = start(dir.path()) else {
        return;
    };
    let pid = p.pid().unwrap();
    drop(p);
    assert!(!running(pid));
}
