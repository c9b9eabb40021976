//! Agents without accounts: on the stack's agents-only XMPP host (SASL ANONYMOUS, a new random
//! JID on every login) an agent proves its name with a token signed by the project key
//! (`copilot agent-token`). With one it gets work like any agent; without one, with a forged
//! one, or with one for another name, its requests are refused.

use std::process::Command;
use std::time::Duration;

use copilot_protocol::wire::{manager_address, ErrorCode};
use copilot_protocol::JobState;
use copilot_stack::{AGENTS_DOMAIN, XMPP_DOMAIN};
use copilot_tests::squares::{check_square, squares, SQUARE_SH};
use copilot_tests::{bin_dir, Harness, Setup, XmppClient};
use copilot_xmpp::{Element, IqKind, XmppError};

/// `copilot agent-token` for `name`, signed with `key`.
fn token(key: &std::path::Path, name: &str) -> String {
    let out = Command::new(bin_dir().join(copilot_stack::CLI_BIN))
        .args(["--json", "agent-token", "--key"])
        .arg(key)
        .args(["--name", name, "--valid", "1h"])
        .output()
        .expect("running copilot agent-token");
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    v["token"].as_str().expect("a token").to_owned()
}

/// An anonymous XMPP client on the agents' host asks the manager for work with `token`.
fn anonymous_request(
    h: &mut Harness,
    name: &str,
    token: Option<&str>,
) -> Result<Option<Element>, XmppError> {
    let XmppClient { rt, conn, jid } = h.xmpp_client(&format!("nobody@{AGENTS_DOMAIN}"), "");
    assert!(jid.contains(&format!("@{AGENTS_DOMAIN}/")), "{jid}");
    let token_attr = token.map(|t| format!(" token='{t}'")).unwrap_or_default();
    let el: Element = format!(
        "<request xmlns='urn:copilot:1' v='1' agent='{name}' version='0' wait='0'{token_attr}/>"
    )
    .parse()
    .unwrap();
    let answer = rt.block_on(conn.sender().request(
        &manager_address(&format!("manager@{XMPP_DOMAIN}")),
        IqKind::Get,
        el,
        Duration::from_secs(30),
    ));
    conn.shutdown();
    answer
}

fn refused(what: &str, answer: Result<Option<Element>, XmppError>, says: &str) {
    match answer {
        Err(XmppError::Remote {
            problem: Some(p), ..
        }) => {
            assert_eq!(p.code, ErrorCode::NotAuthorized, "{what}: {}", p.text);
            assert!(
                p.text.contains(says),
                "{what}: {:?} not in {:?}",
                says,
                p.text
            );
        }
        other => panic!("{what}: not refused: {other:?}"),
    }
}

#[test]
fn anonymous_agents_prove_their_names_with_tokens() {
    let mut h = Harness::start(Setup {
        agents: 0,
        manager_toml: Some(format!(
            "[agents]\nanonymous_domains = [\"{AGENTS_DOMAIN}\"]\n"
        )),
        ..Setup::default()
    });
    let key = h.stack.signing_key().expect("the stack signs").to_owned();
    let server = h.stack.prosody().server();

    // An agent with a token runs jobs, under the name the token gives it.
    let work = h.path("anon-1");
    std::fs::create_dir_all(&work).unwrap();
    let config = format!(
        "name = \"anon-1\"\nwork_dir = {work:?}\n{}[xmpp]\njid = \"agent@{AGENTS_DOMAIN}\"\n\
         anonymous = true\ntoken = \"{}\"\nserver = \"{server}\"\n\
         manager = \"manager@{XMPP_DOMAIN}\"\nca_pem = '''{}'''\n",
        h.stack.agent_trust_toml(),
        token(&key, "anon-1"),
        h.stack.ca_pem(),
    );
    let _agent = h.spawn_agent("anon-1", &config, &[]);
    let job = h.write_job("anon", &squares(2, "0"), &[("square.sh", SQUARE_SH)]);
    let ids = h.submit(&job);
    for j in h.wait_final(&ids, Duration::from_secs(120)) {
        assert_eq!(j.state, JobState::Done, "{j:?}");
        assert_eq!(j.agent.as_deref(), Some("anon-1"));
        check_square(&h, &j);
    }
    let agents: copilot_protocol::api::AgentList = h.api("/api/agents");
    let anon = agents
        .agents
        .iter()
        .find(|a| a.name == "anon-1")
        .expect("listed");
    assert!(
        anon.jid
            .as_deref()
            .is_some_and(|j| j.contains(&format!("@{AGENTS_DOMAIN}/"))),
        "{anon:?}"
    );

    // Without a token, with a token for another name, with one signed by another key: refused.
    refused(
        "no token",
        anonymous_request(&mut h, "anon-2", None),
        "must send its token",
    );
    refused(
        "another name's token",
        anonymous_request(&mut h, "anon-2", Some(&token(&key, "anon-1"))),
        "not \"anon-2\"",
    );
    let other = h.path("other-key");
    let st = Command::new(bin_dir().join(copilot_stack::CLI_BIN))
        .args(["keygen", "--out"])
        .arg(&other)
        .output()
        .unwrap();
    assert!(st.status.success(), "{st:?}");
    refused(
        "a forged token",
        anonymous_request(
            &mut h,
            "anon-2",
            Some(&token(&other.join("manager.key"), "anon-2")),
        ),
        "signature",
    );
    // Nor can an anonymous client take over the name of the agent with the token.
    refused(
        "a stolen name",
        anonymous_request(&mut h, "anon-1", None),
        "must send its token",
    );
}
