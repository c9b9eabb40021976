//! The private Prosody for real: start, register, log in with SASL PLAIN over the loopback port,
//! restart on the same port, stop; no server process is left behind.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use copilot_stack::{Prosody, XMPP_DOMAIN};

fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Read until `needle` or one of `stops` appears; returns what was read.
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

/// Open a stream and try SASL PLAIN; true on <success/>, false on <failure/>. A refused
/// connection fails the test with the server's state and log, so a flaky start can be told apart.
fn plain_login(p: &mut Prosody, dir: &Path, user: &str, password: &str) -> bool {
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
    let features = read_until(&mut s, &["</stream:features>"]);
    assert!(features.contains(">PLAIN<"), "{features}");
    assert!(
        !features.contains("<required"),
        "encryption must not be required: {features}"
    );
    let creds = base64(format!("\0{user}\0{password}").as_bytes());
    write!(
        s,
        "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{creds}</auth>"
    )
    .unwrap();
    let answer = read_until(&mut s, &["<success", "<failure"]);
    answer.contains("<success")
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
    assert!(plain_login(&mut p, dir.path(), "alice", "w0nderland"));
    assert!(!plain_login(&mut p, dir.path(), "alice", "wrong"));

    let (port, first) = (p.port(), p.pid().unwrap());
    p.restart().unwrap();
    assert_eq!(p.port(), port);
    assert!(!running(first));
    assert!(
        plain_login(&mut p, dir.path(), "alice", "w0nderland"),
        "account survives a restart"
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
