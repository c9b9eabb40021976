//! XMPP security against the real Prosody of a stack, which requires STARTTLS with a
//! certificate from the stack's private CA: an agent that pins that CA logs in (as every agent
//! of every other test does); one that pins another CA, one that tries plaintext, and one
//! told to send plaintext to a non-loopback address never log in, and say why.

use std::time::Duration;

use copilot_stack::ProjectCa;
use copilot_tests::{Harness, Setup};

/// Run the agent with `config` and a short login timeout; returns its exit code and log.
fn run_agent(h: &Harness, name: &str, config: &toml::Table) -> (Option<i32>, String) {
    let mut agent = h.spawn_agent(name, &config.to_string(), &["--login-timeout", "5s"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = agent.exited().unwrap() {
            break st;
        }
        assert!(std::time::Instant::now() < deadline, "{name} still runs");
        std::thread::sleep(Duration::from_millis(100));
    };
    let log = h.path(&format!("{name}.log"));
    (status.code(), std::fs::read_to_string(&log).unwrap())
}

#[test]
fn agents_pin_the_project_ca_and_refuse_anything_else() {
    let mut h = Harness::start(Setup {
        agents: 0,
        ..Setup::default()
    });
    let server = h.stack.prosody().server();
    let other_ca = ProjectCa::create_or_reuse(&h.path("other-ca"), &["localhost"]).unwrap();
    let mut configs = Vec::new();
    for name in ["wrong-ca", "plaintext", "far-plaintext"] {
        let text = h.stack.register_agent(name, &server, None).unwrap();
        let mut t: toml::Table = text.parse().unwrap();
        let dir = h.path(name);
        std::fs::create_dir_all(&dir).unwrap();
        t.insert("work_dir".into(), dir.to_str().unwrap().into());
        let xmpp = t["xmpp"].as_table_mut().unwrap();
        match name {
            "wrong-ca" => {
                xmpp.insert("ca_pem".into(), other_ca.ca_pem().into());
            }
            "plaintext" => {
                xmpp.remove("ca_pem");
                xmpp.insert("insecure_loopback".into(), true.into());
            }
            _ => {
                // A documentation address (RFC 5737): refused before any packet is sent.
                xmpp.remove("ca_pem");
                xmpp.insert("insecure_loopback".into(), true.into());
                xmpp.insert("server".into(), "192.0.2.1:5222".into());
            }
        }
        configs.push((name, t));
    }
    let results: Vec<(&str, Option<i32>, String)> = std::thread::scope(|s| {
        let runs: Vec<_> = configs
            .iter()
            .map(|(name, t)| {
                let h = &h;
                s.spawn(move || {
                    let (code, log) = run_agent(h, name, t);
                    (*name, code, log)
                })
            })
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    for (name, code, log) in &results {
        println!("{name}: exit {code:?}");
        assert_eq!(*code, Some(1), "{name} must fail to log in:\n{log}");
        let why = match *name {
            "wrong-ca" => "invalid peer certificate",
            // The server offers no SASL mechanism before STARTTLS.
            "plaintext" => "no matching SASL mechanism",
            _ => "not a loopback address",
        };
        assert!(log.contains(why), "{name}: {why:?} not in\n{log}");
    }
    // None of them ever reached the manager.
    let agents: copilot_protocol::api::AgentList = h.api("/api/agents");
    assert!(agents.agents.is_empty(), "{agents:?}");
}
