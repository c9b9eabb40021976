//! Signed work over a real Prosody (docs/SECURITY.md): agents run only what the project's key
//! signed for them.
//!
//! - A rogue account on the same server pushes a well-formed assignment to an agent, and
//!   answers the agent's pending work request in the manager's stead (guessing its id): the
//!   push is refused with an error, the answer ignored, nothing runs, and the agent keeps
//!   serving the real manager.
//! - Whoever holds the manager's XMPP account (a compromised server can do as much) answers an
//!   agent's work requests with assignments that are unsigned, signed with another key,
//!   tampered with after signing (one byte of the command), signed for another agent, expired,
//!   and replayed: the agent refuses each with a typed `refused` report and runs none of them,
//!   while the one genuine assignment runs.
//! - A stack set up for development (no key, agents with `insecure_unsigned_jobs`) runs jobs.
//!
//! Each assignment's command touches a marker file of its own in a directory the payloads'
//! uids may write to; a marker that exists is code that ran.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use copilot_protocol::api::AgentList;
use copilot_protocol::signing::SigningKey;
use copilot_protocol::wire::{
    Ack, Assignment, DoneReport, ErrorCode, NoWork, Outcome, Payload, Refusal,
};
use copilot_protocol::JobId;
use copilot_tests::{Harness, Setup, XmppClient};
use copilot_xmpp::{Incoming, IqKind, XmppError};

const ANSWER: Duration = Duration::from_secs(30);
const AGENT: &str = "agent-1";
const AGENT_JID: &str = "agent-1@localhost";

/// A directory every uid may write to (the payloads run as uids of their own), removed at
/// the end.
struct Markers(tempfile::TempDir);

impl Markers {
    fn new() -> Markers {
        let dir = tempfile::Builder::new()
            .prefix("copilot-markers-")
            .tempdir_in("/tmp")
            .expect("a marker dir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
            .expect("making the marker dir writable");
        Markers(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }

    /// A command that creates the marker `name`.
    fn touch(&self, name: &str) -> Vec<String> {
        let path = self.path(name);
        vec![
            "sh".into(),
            "-c".into(),
            format!("touch {}", path.display()),
        ]
    }
}

/// An assignment that only creates a marker; its upload goes nowhere (port 9 is closed).
fn assignment(job: JobId, command: Vec<String>) -> Assignment {
    Assignment {
        job,
        attempt: 1,
        lease_secs: 60,
        name: format!("marker-{job}"),
        command,
        env: Default::default(),
        inputs: vec![],
        outputs: vec![],
        limits: Default::default(),
        network: true,
        upload_url: format!("http://127.0.0.1:9/outputs/{job}/1"),
        upload_token: "t".into(),
        seal: None,
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The full JID agent 1 is online with (from the manager's API).
fn agent_address(h: &Harness) -> String {
    let agents: AgentList = h.api("/api/agents");
    agents
        .agents
        .into_iter()
        .find(|a| a.name == AGENT)
        .and_then(|a| a.jid)
        .unwrap_or_else(|| panic!("{AGENT} is not online"))
}

fn agent_log(h: &Harness) -> String {
    std::fs::read_to_string(h.stack.dir().join("logs").join(format!("{AGENT}.log")))
        .unwrap_or_default()
}

#[test]
fn a_rogue_account_cannot_make_an_agent_run_code() {
    let mut h = Harness::start(Setup::default());
    let markers = Markers::new();
    h.stack
        .prosody()
        .register("rogue", "rogue-password-1")
        .expect("registering the rogue account");
    let rogue = h.xmpp_client("rogue@localhost", "rogue-password-1");
    let agent = agent_address(&h);
    // Well-formed, and even signed (with the rogue's own key) for this very agent.
    let (rogue_key, _) = SigningKey::generate().unwrap();
    let mut pushed = assignment(1, markers.touch("pushed"));
    rogue_key.seal(&mut pushed, AGENT, AGENT_JID, now() + 600);
    let sender = rogue.conn.sender();
    let answer = rogue.rt.block_on(sender.request(
        &agent,
        IqKind::Set,
        Payload::Assign(Box::new(pushed)).to_element(),
        ANSWER,
    ));
    match answer {
        Err(XmppError::Remote {
            problem: Some(p), ..
        }) => assert_eq!(p.code, ErrorCode::NotAuthorized, "{}", p.text),
        other => panic!("a pushed assignment was not refused: {other:?}"),
    }

    // The agent's work request is held by the manager (the queue is empty): answer it first,
    // guessing its id (the agent numbers its requests c1, c2, …).
    let spoofed = Payload::Assign(Box::new(assignment(2, markers.touch("answered"))));
    for n in 1..=64 {
        sender
            .reply(&agent, format!("c{n}"), Some(spoofed.to_element()))
            .unwrap();
    }
    let ignored = |log: &str| {
        log.lines().any(|l| {
            l.contains("ignoring an IQ answer from an address the question did not go to")
                && l.contains("rogue@localhost")
        })
    };
    let deadline = Instant::now() + ANSWER;
    while !ignored(&agent_log(&h)) {
        assert!(
            Instant::now() < deadline,
            "the agent did not see the rogue's answer:\n{}",
            h.log_tail(AGENT)
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The agent still serves its real manager, and ran nothing of the rogue's.
    h.run_upper_job("after-the-rogue", "signed\n");
    for marker in ["pushed", "answered"] {
        assert!(
            !markers.path(marker).exists(),
            "the rogue's {marker} assignment ran"
        );
    }
    rogue.conn.shutdown();
}

/// What the impostor hands out, in order, and what the agent must make of it.
struct Case {
    what: &'static str,
    assignment: Assignment,
    /// `None`: it runs.
    refused: Option<Refusal>,
    /// Markers that must not exist afterwards (the genuine case's must).
    markers: Vec<&'static str>,
}

fn cases(key: &SigningKey, markers: &Markers) -> Vec<Case> {
    let expires = now() + 600;
    let sealed = |job, marker: &str, agent: &str, jid: &str, expires| {
        let mut a = assignment(job, markers.touch(marker));
        key.seal(&mut a, agent, jid, expires);
        a
    };
    let (stranger, _) = SigningKey::generate().unwrap();
    let mut foreign = assignment(2, markers.touch("stranger"));
    stranger.seal(&mut foreign, AGENT, AGENT_JID, expires);
    let mut tampered = sealed(3, "tampered", AGENT, AGENT_JID, expires);
    // One byte of the command: the marker's name ends in D instead of d.
    let word = &mut tampered.command[2];
    word.pop();
    word.push('D');
    let genuine = sealed(6, "genuine", AGENT, AGENT_JID, expires);
    vec![
        Case {
            what: "an unsigned assignment",
            assignment: assignment(1, markers.touch("unsigned")),
            refused: Some(Refusal::Unsigned),
            markers: vec!["unsigned"],
        },
        Case {
            what: "an assignment signed with another key",
            assignment: foreign,
            refused: Some(Refusal::BadSignature),
            markers: vec!["stranger"],
        },
        Case {
            what: "a tampered assignment",
            assignment: tampered,
            refused: Some(Refusal::BadSignature),
            markers: vec!["tampered", "tampereD"],
        },
        Case {
            what: "an assignment signed for another agent",
            assignment: sealed(4, "elsewhere", "agent-2", "agent-2@localhost", expires),
            refused: Some(Refusal::WrongAgent),
            markers: vec!["elsewhere"],
        },
        Case {
            what: "an expired assignment",
            assignment: sealed(5, "expired", AGENT, AGENT_JID, now() - 60),
            refused: Some(Refusal::Expired),
            markers: vec!["expired"],
        },
        Case {
            what: "the genuine assignment",
            assignment: genuine.clone(),
            refused: None,
            markers: vec![],
        },
        Case {
            what: "the genuine assignment again",
            assignment: genuine,
            refused: Some(Refusal::Replayed),
            markers: vec![],
        },
    ]
}

/// Plays the manager on its own account: hands out `cases` one per work request and collects
/// the agent's reports, acknowledging each; returns them in order.
fn impostor(client: &mut XmppClient, cases: &[Case]) -> Vec<DoneReport> {
    let sender = client.conn.sender();
    let mut handed_out = 0;
    let mut reports = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
    client.rt.block_on(async {
        while reports.len() < cases.len() {
            let ev = tokio::time::timeout_at(deadline, client.conn.next())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "{} of {} reports after 240 s: {reports:?}",
                        reports.len(),
                        cases.len()
                    )
                })
                .expect("the impostor's connection ended");
            let Incoming::Request {
                from, id, payload, ..
            } = ev
            else {
                continue;
            };
            let answer = match Payload::from_element(&payload) {
                Ok(Payload::Request(_)) => match cases.get(handed_out) {
                    Some(case) => {
                        handed_out += 1;
                        Payload::Assign(Box::new(case.assignment.clone()))
                    }
                    None => Payload::NoWork(NoWork {
                        retry_after_secs: 1,
                    }),
                },
                Ok(Payload::Done(report)) => {
                    let ack = Ack {
                        job: report.job,
                        attempt: report.attempt,
                        duplicate: false,
                        next: None,
                    };
                    reports.push(*report);
                    Payload::Ack(Box::new(ack))
                }
                other => panic!("the agent sent {other:?}"),
            };
            sender.reply(&from, id, Some(answer.to_element())).unwrap();
        }
    });
    reports
}

#[test]
fn an_agent_runs_only_assignments_signed_for_it() {
    let mut h = Harness::start(Setup::default());
    let markers = Markers::new();
    let key_file = h.stack.signing_key().expect("the stack signs").to_owned();
    let key = SigningKey::from_pem(&std::fs::read_to_string(&key_file).unwrap()).unwrap();
    let cases = cases(&key, &markers);
    // Someone else now holds the manager's account (its password, or the server itself).
    let password = h.stack.manager_password().unwrap();
    h.stack.stop_manager().unwrap();
    let mut impostor_client = h.xmpp_client("manager@localhost/manager", &password);
    let reports = impostor(&mut impostor_client, &cases);

    for (case, report) in cases.iter().zip(&reports) {
        assert_eq!(
            (report.job, report.attempt, report.agent.as_str()),
            (case.assignment.job, 1, AGENT),
            "{}: {report:?}",
            case.what
        );
        match case.refused {
            Some(why) => assert_eq!(
                report.outcome,
                Outcome::Refused(why),
                "{}: {report:?}",
                case.what
            ),
            None => assert!(
                !matches!(report.outcome, Outcome::Refused(_)),
                "{}: {report:?}",
                case.what
            ),
        }
        for marker in &case.markers {
            assert!(
                !markers.path(marker).exists(),
                "{} ran (marker {marker})",
                case.what
            );
        }
    }
    assert!(
        markers.path("genuine").exists(),
        "the genuine assignment did not run: {reports:?}\n{}",
        h.log_tail(AGENT)
    );
    let log = agent_log(&h);
    assert!(log.contains("assignment refused"), "{}", h.log_tail(AGENT));
    // The agent keeps serving: the real manager back, a normal job runs.
    impostor_client.conn.shutdown();
    h.stack.start_manager().unwrap();
    h.run_upper_job("after-the-impostor", "signed\n");
}

#[test]
fn a_development_stack_runs_unsigned_work() {
    let h = Harness::start(Setup {
        signed: false,
        ..Setup::default()
    });
    assert!(h.stack.signing_key().is_none());
    h.run_upper_job("unsigned", "signed\n");
    let manager_log =
        std::fs::read_to_string(h.stack.dir().join("logs/manager.log")).unwrap_or_default();
    assert!(
        manager_log.contains("no trust.signing_key"),
        "{manager_log}"
    );
    assert!(agent_log(&h).contains("insecure_unsigned_jobs"));
}
