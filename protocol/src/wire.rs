//! The XMPP payloads of the copilot protocol (namespace [`NS`], version [`VERSION`]).
//!
//! Four stanzas carry a job: the agent's work request (IQ get) and the manager's assignment (its
//! result), the agent's done report (IQ set) and the manager's ack (its result, which may carry
//! the next assignment). A one-way progress message marks the start of the run and renews the
//! lease of long jobs. docs/PROTOCOL.md shows every element.
//!
//! Decoding is strict: the size and depth of a payload are bounded before anything is read,
//! unknown elements, attributes and children are errors, and every value is validated (the
//! agent relies on this before it creates a file named by the manager).

use std::collections::BTreeMap;
use std::str::FromStr;

use minidom::rxml::{Namespace, NcName};
use minidom::Element;

use crate::job::{validate_command, validate_env, validate_input_name, validate_outputs, Limits};
use crate::sandbox::{Protection, SandboxReport};
use crate::signing::{Seal, SIGNATURE_LEN};
use crate::units::{Bytes, Seconds};
use crate::{JobId, Sha256};

/// The protocol's XML namespace.
pub const NS: &str = "urn:copilot:1";
/// The protocol version carried in every payload's `v` attribute.
pub const VERSION: u32 = 1;
/// Largest payload accepted (names, attributes and text added up), in bytes.
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024;
/// Deepest nesting accepted below the payload element.
pub const MAX_DEPTH: usize = 3;
/// The XMPP resource the manager binds. IQs sent to a bare JID are answered by the server on the
/// account's behalf (RFC 6120 §10.5.3), so agents address the manager's full JID.
pub const MANAGER_RESOURCE: &str = "manager";

/// The manager's full JID for a configured JID: a bare JID gets [`MANAGER_RESOURCE`].
pub fn manager_address(jid: &str) -> String {
    if jid.contains('/') {
        jid.to_owned()
    } else {
        format!("{jid}/{MANAGER_RESOURCE}")
    }
}

/// Longest agent name, in bytes.
pub const MAX_AGENT_NAME: usize = 128;
/// Longest free-text message carried in a payload, in bytes (longer ones are cut).
pub const MAX_MESSAGE_BYTES: usize = 2048;

/// Why a payload was refused. [`WireError::code`] gives the code sent back to the peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("payload is larger than {MAX_PAYLOAD_BYTES} bytes")]
    TooLarge,
    #[error("payload nests deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("payload has namespace {0:?}, expected {NS}")]
    WrongNamespace(String),
    #[error("unknown payload element <{0}>")]
    UnknownElement(String),
    #[error("unsupported protocol version {0:?} (this side speaks {VERSION})")]
    UnsupportedVersion(String),
    #[error("<{element}> lacks attribute {attr}")]
    MissingAttribute {
        element: &'static str,
        attr: &'static str,
    },
    #[error("<{element}> has unknown attribute {attr}")]
    UnknownAttribute { element: String, attr: String },
    #[error("<{element}> attribute {attr}={value:?} is invalid")]
    BadAttribute {
        element: &'static str,
        attr: &'static str,
        value: String,
    },
    #[error("<{element}> has unexpected child <{child}>")]
    UnexpectedChild {
        element: &'static str,
        child: String,
    },
    #[error("<{element}> is invalid: {reason}")]
    Invalid {
        element: &'static str,
        reason: String,
    },
}

/// Error codes exchanged in `<problem/>` elements of IQ errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The payload did not parse or failed validation.
    Malformed,
    /// The payload was over a size limit.
    TooLarge,
    /// The payload's version is not spoken here.
    UnsupportedVersion,
    /// The report is for an attempt whose lease is gone (the job was requeued).
    StaleLease,
    /// No such job.
    UnknownJob,
    /// The sender may not do this.
    NotAuthorized,
    /// The sender asks too often; retry later.
    RateLimited,
    /// The receiver failed; retry later.
    Internal,
}

impl ErrorCode {
    const NAMES: [(ErrorCode, &'static str); 8] = [
        (ErrorCode::Malformed, "malformed"),
        (ErrorCode::TooLarge, "too-large"),
        (ErrorCode::UnsupportedVersion, "unsupported-version"),
        (ErrorCode::StaleLease, "stale-lease"),
        (ErrorCode::UnknownJob, "unknown-job"),
        (ErrorCode::NotAuthorized, "not-authorized"),
        (ErrorCode::RateLimited, "rate-limited"),
        (ErrorCode::Internal, "internal"),
    ];

    /// The code's name on the wire.
    pub fn as_str(self) -> &'static str {
        Self::NAMES
            .iter()
            .find(|(c, _)| *c == self)
            .map(|(_, n)| *n)
            .unwrap_or("internal")
    }

    /// The XMPP stanza error condition (RFC 6120 §8.3.3) that goes with the code.
    pub fn condition(self) -> &'static str {
        match self {
            ErrorCode::Malformed | ErrorCode::UnsupportedVersion => "bad-request",
            ErrorCode::TooLarge => "policy-violation",
            ErrorCode::StaleLease => "conflict",
            ErrorCode::UnknownJob => "item-not-found",
            ErrorCode::NotAuthorized => "not-authorized",
            ErrorCode::RateLimited => "resource-constraint",
            ErrorCode::Internal => "internal-server-error",
        }
    }

    /// Whether the sender should try the same thing again later.
    pub fn is_transient(self) -> bool {
        matches!(self, ErrorCode::RateLimited | ErrorCode::Internal)
    }
}

impl FromStr for ErrorCode {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        Self::NAMES
            .iter()
            .find(|(_, n)| *n == s)
            .map(|(c, _)| *c)
            .ok_or(())
    }
}

impl WireError {
    /// The code that reports this error to the peer.
    pub fn code(&self) -> ErrorCode {
        match self {
            WireError::TooLarge | WireError::TooDeep => ErrorCode::TooLarge,
            WireError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            _ => ErrorCode::Malformed,
        }
    }
}

/// An agent asks for one job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkRequest {
    /// The agent's stable name (its JID can change on reconnect).
    pub agent: String,
    /// The agent's software version.
    pub version: String,
    /// How long the manager may hold the request waiting for work, in seconds (0: answer now).
    pub wait_secs: u32,
    /// An agent identity token ([`crate::identity`]): how an agent that logged in anonymously
    /// proves its name.
    pub token: Option<String>,
    /// The BOINC user the agent computes for, when it runs under BOINC: the manager gives the
    /// replicas of one job to different users.
    pub boinc_user: Option<u64>,
}

/// One input of an assignment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WireInput {
    pub name: String,
    pub url: String,
    pub sha256: Option<Sha256>,
    pub size: Option<u64>,
}

/// The manager hands a job to an agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    pub job: JobId,
    /// Which attempt of the job this is (1, 2, …); reports name it so stale ones are refused.
    pub attempt: u32,
    /// The lease: the agent reports progress at least this often or loses the job.
    pub lease_secs: u32,
    pub name: String,
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub inputs: Vec<WireInput>,
    pub outputs: Vec<String>,
    pub limits: Limits,
    /// Whether the payload may use the network (`network='false'` on the wire, else omitted).
    pub network: bool,
    /// Where the packed outputs go (HTTP PUT).
    pub upload_url: String,
    /// The job's upload credential (bearer token), valid for this attempt only.
    pub upload_token: String,
    /// The manager's signature, for one agent and until a time (see `crate::signing`).
    /// Agents refuse assignments without a valid one unless configured for unsigned work.
    pub seal: Option<Seal>,
}

/// No work now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoWork {
    /// Ask again after this many seconds.
    pub retry_after_secs: u32,
}

/// What an agent is doing with a job, sent as a one-way message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Staging,
    Running,
    Uploading,
}

impl Phase {
    fn as_str(self) -> &'static str {
        match self {
            Phase::Staging => "staging",
            Phase::Running => "running",
            Phase::Uploading => "uploading",
        }
    }
}

/// Progress of a job; also renews its lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Progress {
    /// The reporting agent's name (the manager may not have seen its address yet, e.g. after
    /// the manager restarted).
    pub agent: String,
    pub job: JobId,
    pub attempt: u32,
    pub phase: Phase,
}

/// A job limit the payload ran into (see [`Outcome::LimitExceeded`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Limit {
    Cpu,
    Memory,
    Disk,
    Processes,
    Output,
}

impl Limit {
    /// Every limit, in wire order.
    pub const ALL: [Limit; 5] = [
        Limit::Cpu,
        Limit::Memory,
        Limit::Disk,
        Limit::Processes,
        Limit::Output,
    ];

    /// The wire name, also used in metrics labels and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::Cpu => "cpu",
            Limit::Memory => "memory",
            Limit::Disk => "disk",
            Limit::Processes => "processes",
            Limit::Output => "output",
        }
    }
}

impl FromStr for Limit {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        Limit::ALL.into_iter().find(|l| l.as_str() == s).ok_or(())
    }
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an agent refused an assignment without acting on it (see `crate::signing`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Refusal {
    /// It carried no signature, and the agent takes only signed work.
    Unsigned,
    /// Its signature does not verify against the agent's trusted key.
    BadSignature,
    /// It was signed for another agent.
    WrongAgent,
    /// Its signature's expiry time has passed.
    Expired,
    /// The agent has been given this job's attempt before.
    Replayed,
}

impl Refusal {
    /// Every reason, in wire order.
    pub const ALL: [Refusal; 5] = [
        Refusal::Unsigned,
        Refusal::BadSignature,
        Refusal::WrongAgent,
        Refusal::Expired,
        Refusal::Replayed,
    ];

    /// The wire name, also used in metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Unsigned => "unsigned",
            Refusal::BadSignature => "bad-signature",
            Refusal::WrongAgent => "wrong-agent",
            Refusal::Expired => "expired",
            Refusal::Replayed => "replayed",
        }
    }

    /// What it means, for people.
    pub fn describe(self) -> &'static str {
        match self {
            Refusal::Unsigned => "it is not signed",
            Refusal::BadSignature => {
                "its signature does not verify against the agent's trust.manager_key"
            }
            Refusal::WrongAgent => "it was signed for another agent",
            Refusal::Expired => "its signature has expired (are the clocks right?)",
            Refusal::Replayed => "the agent was given this attempt before (a replay)",
        }
    }
}

impl FromStr for Refusal {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        Refusal::ALL.into_iter().find(|r| r.as_str() == s).ok_or(())
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a job attempt ended, as the agent saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The payload exited with this code.
    Exited { code: i32 },
    /// The payload was killed by this signal.
    Killed { signal: i32 },
    /// The payload ran past its wall-clock limit and was killed.
    TimedOut,
    /// The sandbox stopped the payload at one of its limits. Like an exit code, this is the
    /// payload's failure: final, not retried elsewhere.
    LimitExceeded { limit: Limit },
    /// Inputs could not be staged (download failed, digest mismatch, …).
    StageInFailed(String),
    /// The payload could not be started.
    SetupFailed(String),
    /// Outputs could not be packed or uploaded.
    StageOutFailed(String),
    /// The agent refused the assignment and did nothing with it. The host's failure (its
    /// trusted key or clock may be wrong), so another agent may take the job.
    Refused(Refusal),
}

impl Outcome {
    /// Whether the job did what it was asked: exit code 0.
    pub fn succeeded(&self) -> bool {
        matches!(self, Outcome::Exited { code: 0 })
    }

    /// Whether the failure lies with the host rather than the payload, so another attempt
    /// elsewhere may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Outcome::StageInFailed(_)
                | Outcome::SetupFailed(_)
                | Outcome::StageOutFailed(_)
                | Outcome::Refused(_)
        )
    }

    fn kind(&self) -> &'static str {
        match self {
            Outcome::Exited { .. } => "exited",
            Outcome::Killed { .. } => "killed",
            Outcome::TimedOut => "timed-out",
            Outcome::LimitExceeded { .. } => "limit-exceeded",
            Outcome::StageInFailed(_) => "stage-in-failed",
            Outcome::SetupFailed(_) => "setup-failed",
            Outcome::StageOutFailed(_) => "stage-out-failed",
            Outcome::Refused(_) => "refused",
        }
    }

    /// A one-line description for people.
    pub fn describe(&self) -> String {
        match self {
            Outcome::Exited { code } => format!("exited with code {code}"),
            Outcome::Killed { signal } => format!("killed by signal {signal}"),
            Outcome::TimedOut => "timed out".into(),
            Outcome::LimitExceeded { limit } => format!("stopped at its {limit} limit"),
            Outcome::StageInFailed(m) => format!("stage-in failed: {m}"),
            Outcome::SetupFailed(m) => format!("setup failed: {m}"),
            Outcome::StageOutFailed(m) => format!("stage-out failed: {m}"),
            Outcome::Refused(r) => format!("assignment refused: {}", r.describe()),
        }
    }
}

/// Digest and size of a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileDigest {
    pub path: String,
    pub size: u64,
    pub sha256: Sha256,
}

/// Time spent in each phase, in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timings {
    pub stage_in_ms: u64,
    pub run_ms: u64,
    pub stage_out_ms: u64,
    /// CPU time (user + system) of the agent's payload processes since its previous report;
    /// with one slot, this job's. `None` from agents that do not measure it.
    pub cpu_ms: Option<u64>,
}

/// Who an agent computes for, when it runs for a volunteer's BOINC client: the BOINC ids and
/// a per-host token derived from the account key (see docs/BOINC.md). The manager credits
/// the jobs done and their CPU time to this user and host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Volunteer {
    pub user_id: u64,
    pub host_id: u64,
    pub team_id: u64,
    /// 64 lower-case hex digits, if the client gave an account key to derive it from.
    pub host_token: Option<String>,
}

/// Length of a [`Volunteer::host_token`].
pub const HOST_TOKEN_LEN: usize = 64;

/// Whether `t` is a well-formed host token: 64 lower-case hex digits.
pub fn valid_host_token(t: &str) -> bool {
    t.len() == HOST_TOKEN_LEN && t.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The agent reports a finished attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DoneReport {
    /// The reporting agent's name.
    pub agent: String,
    pub job: JobId,
    pub attempt: u32,
    pub outcome: Outcome,
    pub timings: Timings,
    /// The uploaded archive (tar.gz of the outputs and logs), if one was uploaded.
    pub archive: Option<(Sha256, u64)>,
    /// Every file in the archive.
    pub files: Vec<FileDigest>,
    /// The protections the sandbox applied to this attempt, and those it lacked.
    pub sandbox: SandboxReport,
    /// The volunteer the agent computes for (agents run by the BOINC wrapper).
    pub volunteer: Option<Volunteer>,
    /// Whether the agent wants its next job in the ack.
    pub want_more: bool,
}

/// What an ack carries for an agent that asked for more.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    Assign(Box<Assignment>),
    NoWork(NoWork),
}

/// The manager has recorded a done report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ack {
    pub job: JobId,
    pub attempt: u32,
    /// The same report had been recorded before (a retransmission); nothing changed.
    pub duplicate: bool,
    pub next: Option<Next>,
}

/// A typed error for the peer, carried inside an IQ error as `<problem/>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub code: ErrorCode,
    pub text: String,
}

/// Any copilot payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Payload {
    Request(WorkRequest),
    Assign(Box<Assignment>),
    NoWork(NoWork),
    Progress(Progress),
    Done(Box<DoneReport>),
    Ack(Box<Ack>),
    Problem(Problem),
}

// ---------------------------------------------------------------------------------------------
// Encoding

fn ncname(name: &'static str) -> NcName {
    // Every attribute name in this module is a literal ASCII identifier, hence a valid NCName.
    NcName::try_from(name).expect("attribute names in this module are valid NCNames")
}

struct El(Element);

impl El {
    fn new(name: &str) -> Self {
        El(Element::bare(name, NS))
    }
    fn attr(mut self, name: &'static str, value: impl ToString) -> Self {
        self.0
            .set_attr(Namespace::NONE, ncname(name), value.to_string());
        self
    }
    fn opt_attr<T: ToString>(self, name: &'static str, value: Option<T>) -> Self {
        match value {
            Some(v) => self.attr(name, v),
            None => self,
        }
    }
    fn child(mut self, child: Element) -> Self {
        self.0.append_child(child);
        self
    }
    fn text(mut self, text: &str) -> Self {
        self.0.append_text(text);
        self
    }
    fn versioned(self) -> Self {
        self.attr("v", VERSION)
    }
}

fn cut(text: &str) -> &str {
    if text.len() <= MAX_MESSAGE_BYTES {
        return text;
    }
    let mut end = MAX_MESSAGE_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// A set of protections as a space-separated attribute value; `None` when empty.
fn words(set: &std::collections::BTreeSet<Protection>) -> Option<String> {
    (!set.is_empty()).then(|| set.iter().map(|p| p.as_str()).collect::<Vec<_>>().join(" "))
}

fn limits_element(l: &Limits) -> Element {
    El::new("limits")
        .opt_attr("wall-time", l.wall_time.map(|s| s.0))
        .opt_attr("cpu-time", l.cpu_time.map(|s| s.0))
        .opt_attr("memory", l.memory.map(|b| b.0))
        .opt_attr("disk", l.disk.map(|b| b.0))
        .opt_attr("processes", l.processes)
        .opt_attr("output", l.output.map(|b| b.0))
        .0
}

fn assign_element(a: &Assignment) -> Element {
    let mut e = El::new("assign")
        .versioned()
        .attr("job", a.job)
        .attr("attempt", a.attempt)
        .attr("lease", a.lease_secs)
        .attr("name", &a.name)
        .opt_attr("network", (!a.network).then_some(false));
    for arg in &a.command {
        e = e.child(El::new("arg").text(arg).0);
    }
    for (k, v) in &a.env {
        // In text, not an attribute: XML servers may turn newlines and tabs in attribute
        // values into spaces (Prosody does).
        e = e.child(El::new("env").attr("name", k).text(v).0);
    }
    for i in &a.inputs {
        e = e.child(
            El::new("input")
                .attr("name", &i.name)
                .attr("url", &i.url)
                .opt_attr("sha256", i.sha256)
                .opt_attr("size", i.size)
                .0,
        );
    }
    for o in &a.outputs {
        e = e.child(El::new("output").attr("path", o).0);
    }
    e = e.child(limits_element(&a.limits)).child(
        El::new("upload")
            .attr("url", &a.upload_url)
            .attr("token", &a.upload_token)
            .0,
    );
    if let Some(seal) = &a.seal {
        e = e.child(
            El::new("signature")
                .attr("agent", &seal.agent)
                .attr("jid", &seal.jid)
                .attr("expires", seal.expires)
                .text(&seal.signature_base64())
                .0,
        );
    }
    e.0
}

fn nowork_element(n: &NoWork) -> Element {
    El::new("nowork")
        .versioned()
        .attr("retry-after", n.retry_after_secs)
        .0
}

impl Payload {
    /// The payload as an XML element in [`NS`].
    pub fn to_element(&self) -> Element {
        match self {
            Payload::Request(r) => {
                El::new("request")
                    .versioned()
                    .attr("agent", &r.agent)
                    .attr("version", &r.version)
                    .attr("wait", r.wait_secs)
                    .opt_attr("token", r.token.as_ref())
                    .opt_attr("boinc-user", r.boinc_user)
                    .0
            }
            Payload::Assign(a) => assign_element(a),
            Payload::NoWork(n) => nowork_element(n),
            Payload::Progress(p) => {
                El::new("progress")
                    .versioned()
                    .attr("agent", &p.agent)
                    .attr("job", p.job)
                    .attr("attempt", p.attempt)
                    .attr("phase", p.phase.as_str())
                    .0
            }
            Payload::Done(d) => {
                let mut outcome = El::new("outcome").attr("kind", d.outcome.kind());
                outcome = match &d.outcome {
                    Outcome::Exited { code } => outcome.attr("code", code),
                    Outcome::Killed { signal } => outcome.attr("signal", signal),
                    Outcome::TimedOut => outcome,
                    Outcome::LimitExceeded { limit } => outcome.attr("limit", limit.as_str()),
                    Outcome::Refused(r) => outcome.attr("reason", r.as_str()),
                    Outcome::StageInFailed(m)
                    | Outcome::SetupFailed(m)
                    | Outcome::StageOutFailed(m) => outcome.text(cut(m)),
                };
                let mut e = El::new("done")
                    .versioned()
                    .attr("agent", &d.agent)
                    .attr("job", d.job)
                    .attr("attempt", d.attempt)
                    .attr("more", d.want_more)
                    .child(outcome.0)
                    .child(
                        El::new("timings")
                            .attr("stage-in", d.timings.stage_in_ms)
                            .attr("run", d.timings.run_ms)
                            .attr("stage-out", d.timings.stage_out_ms)
                            .opt_attr("cpu", d.timings.cpu_ms)
                            .0,
                    );
                if let Some(v) = &d.volunteer {
                    e = e.child(
                        El::new("volunteer")
                            .attr("user", v.user_id)
                            .attr("host", v.host_id)
                            .attr("team", v.team_id)
                            .opt_attr("token", v.host_token.as_deref())
                            .0,
                    );
                }
                if let Some((sha, size)) = &d.archive {
                    e = e.child(El::new("archive").attr("sha256", sha).attr("size", size).0);
                }
                if !d.sandbox.is_empty() {
                    e = e.child(
                        El::new("sandbox")
                            .opt_attr("active", words(&d.sandbox.active))
                            .opt_attr("missing", words(&d.sandbox.missing))
                            .0,
                    );
                }
                for f in &d.files {
                    e = e.child(
                        El::new("file")
                            .attr("path", &f.path)
                            .attr("size", f.size)
                            .attr("sha256", f.sha256)
                            .0,
                    );
                }
                e.0
            }
            Payload::Ack(a) => {
                let e = El::new("ack")
                    .versioned()
                    .attr("job", a.job)
                    .attr("attempt", a.attempt)
                    .attr("status", if a.duplicate { "duplicate" } else { "recorded" });
                match &a.next {
                    None => e.0,
                    Some(Next::Assign(x)) => e.child(assign_element(x)).0,
                    Some(Next::NoWork(n)) => e.child(nowork_element(n)).0,
                }
            }
            Payload::Problem(p) => {
                El::new("problem")
                    .versioned()
                    .attr("code", p.code.as_str())
                    .text(cut(&p.text))
                    .0
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Decoding

/// Reject payloads that are too large or too deep before looking at their content.
fn check_bounds(e: &Element) -> Result<(), WireError> {
    fn walk(e: &Element, depth: usize, budget: &mut usize) -> Result<(), WireError> {
        if depth > MAX_DEPTH {
            return Err(WireError::TooDeep);
        }
        let mut cost = e.name().len() + 2;
        for ((_, name), value) in e.attrs().iter() {
            cost += name.len() + value.len() + 4;
        }
        for t in e.texts() {
            cost += t.len();
        }
        *budget = budget.checked_sub(cost).ok_or(WireError::TooLarge)?;
        for c in e.children() {
            walk(c, depth + 1, budget)?;
        }
        Ok(())
    }
    let mut budget = MAX_PAYLOAD_BYTES;
    walk(e, 0, &mut budget)
}

/// Strict attribute access for one element.
struct Attrs<'a> {
    e: &'a Element,
    element: &'static str,
}

impl<'a> Attrs<'a> {
    fn new(e: &'a Element, element: &'static str, allowed: &[&str]) -> Result<Self, WireError> {
        for ((ns, name), _) in e.attrs().iter() {
            if *ns != Namespace::NONE || !allowed.contains(&name.as_str()) {
                return Err(WireError::UnknownAttribute {
                    element: element.into(),
                    attr: name.as_str().chars().take(40).collect(),
                });
            }
        }
        Ok(Self { e, element })
    }

    fn opt_str(&self, attr: &'static str) -> Option<&'a str> {
        self.e.attr(attr)
    }

    /// An attribute's value; control characters are refused: a server may have changed them
    /// on the way (free text travels in element text).
    fn str(&self, attr: &'static str) -> Result<&'a str, WireError> {
        let v = self.opt_str(attr).ok_or(WireError::MissingAttribute {
            element: self.element,
            attr,
        })?;
        if v.chars().any(char::is_control) {
            return Err(self.bad(attr, v));
        }
        Ok(v)
    }

    fn bad(&self, attr: &'static str, value: &str) -> WireError {
        WireError::BadAttribute {
            element: self.element,
            attr,
            value: value.chars().take(40).collect(),
        }
    }

    fn opt_parse<T: FromStr>(&self, attr: &'static str) -> Result<Option<T>, WireError> {
        match self.opt_str(attr) {
            None => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| self.bad(attr, v)),
        }
    }

    fn parse<T: FromStr>(&self, attr: &'static str) -> Result<T, WireError> {
        let v = self.str(attr)?;
        v.parse().map_err(|_| self.bad(attr, v))
    }

    /// An agent name: 1 to [`MAX_AGENT_NAME`] bytes, no white space or control characters.
    fn agent_name(&self, attr: &'static str) -> Result<String, WireError> {
        let v = self.bounded(attr, MAX_AGENT_NAME)?;
        if v.is_empty() || v.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(self.bad(attr, &v));
        }
        Ok(v)
    }

    fn bounded(&self, attr: &'static str, max: usize) -> Result<String, WireError> {
        let v = self.str(attr)?;
        if v.len() > max {
            return Err(self.bad(attr, v));
        }
        Ok(v.to_owned())
    }
}

fn no_children(e: &Element, element: &'static str) -> Result<(), WireError> {
    match e.children().next() {
        Some(c) => Err(WireError::UnexpectedChild {
            element,
            child: c.name().chars().take(40).collect(),
        }),
        None => Ok(()),
    }
}

fn child_of<'a>(
    e: &'a Element,
    element: &'static str,
) -> impl Iterator<Item = Result<&'a Element, WireError>> {
    e.children().map(move |c| {
        if c.ns() == NS {
            Ok(c)
        } else {
            Err(WireError::UnexpectedChild {
                element,
                child: c.name().chars().take(40).collect(),
            })
        }
    })
}

fn invalid(element: &'static str, reason: impl ToString) -> WireError {
    WireError::Invalid {
        element,
        reason: reason.to_string(),
    }
}

fn decode_limits(e: &Element) -> Result<Limits, WireError> {
    let a = Attrs::new(
        e,
        "limits",
        &[
            "wall-time",
            "cpu-time",
            "memory",
            "disk",
            "processes",
            "output",
        ],
    )?;
    no_children(e, "limits")?;
    Ok(Limits {
        wall_time: a.opt_parse::<u64>("wall-time")?.map(Seconds),
        cpu_time: a.opt_parse::<u64>("cpu-time")?.map(Seconds),
        memory: a.opt_parse::<u64>("memory")?.map(Bytes),
        disk: a.opt_parse::<u64>("disk")?.map(Bytes),
        processes: a.opt_parse("processes")?,
        output: a.opt_parse::<u64>("output")?.map(Bytes),
    })
}

fn decode_assign(e: &Element) -> Result<Assignment, WireError> {
    let a = Attrs::new(
        e,
        "assign",
        &["v", "job", "attempt", "lease", "name", "network"],
    )?;
    let mut out = Assignment {
        job: a.parse("job")?,
        attempt: a.parse("attempt")?,
        lease_secs: a.parse("lease")?,
        name: a.bounded("name", 128)?,
        command: Vec::new(),
        env: BTreeMap::new(),
        inputs: Vec::new(),
        outputs: Vec::new(),
        limits: Limits::default(),
        network: a.opt_parse("network")?.unwrap_or(true),
        upload_url: String::new(),
        upload_token: String::new(),
        seal: None,
    };
    let (mut saw_limits, mut saw_upload) = (false, false);
    for c in child_of(e, "assign") {
        let c = c?;
        match c.name() {
            "arg" => {
                Attrs::new(c, "arg", &[])?;
                no_children(c, "arg")?;
                out.command.push(c.text());
            }
            "env" => {
                let ca = Attrs::new(c, "env", &["name"])?;
                no_children(c, "env")?;
                out.env.insert(ca.str("name")?.to_owned(), c.text());
            }
            "input" => {
                let ca = Attrs::new(c, "input", &["name", "url", "sha256", "size"])?;
                no_children(c, "input")?;
                let name = ca.bounded("name", 255)?;
                validate_input_name(&name).map_err(|err| invalid("input", err))?;
                out.inputs.push(WireInput {
                    name,
                    url: ca.bounded("url", crate::job::MAX_WORD_BYTES)?,
                    sha256: ca.opt_parse("sha256")?,
                    size: ca.opt_parse("size")?,
                });
            }
            "output" => {
                let ca = Attrs::new(c, "output", &["path"])?;
                no_children(c, "output")?;
                out.outputs.push(ca.str("path")?.to_owned());
            }
            "limits" if !saw_limits => {
                saw_limits = true;
                out.limits = decode_limits(c)?;
            }
            "upload" if !saw_upload => {
                saw_upload = true;
                let ca = Attrs::new(c, "upload", &["url", "token"])?;
                no_children(c, "upload")?;
                out.upload_url = ca.bounded("url", crate::job::MAX_WORD_BYTES)?;
                // A bearer token, or a Chirp ticket's private key in PEM.
                out.upload_token = ca.bounded("token", 4096)?;
            }
            "signature" if out.seal.is_none() => out.seal = Some(decode_seal(c)?),
            other => {
                return Err(WireError::UnexpectedChild {
                    element: "assign",
                    child: other.chars().take(40).collect(),
                })
            }
        }
    }
    if !saw_upload {
        return Err(invalid("assign", "no <upload/>"));
    }
    validate_command(&out.command).map_err(|err| invalid("assign", err))?;
    validate_env(&out.env).map_err(|err| invalid("assign", err))?;
    validate_outputs(&out.outputs).map_err(|err| invalid("assign", err))?;
    if out.inputs.len() > crate::job::MAX_FILES {
        return Err(invalid("assign", "too many inputs"));
    }
    let mut names: Vec<&str> = out.inputs.iter().map(|i| i.name.as_str()).collect();
    names.sort_unstable();
    if names.windows(2).any(|w| w[0] == w[1]) {
        return Err(invalid("assign", "two inputs have the same name"));
    }
    Ok(out)
}

/// `<signature agent='…' jid='…' expires='…'>base64</signature>`: decoded, not verified.
fn decode_seal(e: &Element) -> Result<Seal, WireError> {
    let a = Attrs::new(e, "signature", &["agent", "jid", "expires"])?;
    no_children(e, "signature")?;
    let signature = Seal::signature_from_base64(&e.text())
        .ok_or_else(|| invalid("signature", format!("not {SIGNATURE_LEN} bytes in base64")))?;
    Ok(Seal {
        agent: a.agent_name("agent")?,
        jid: a.bounded("jid", crate::job::MAX_WORD_BYTES)?,
        expires: a.parse("expires")?,
        signature,
    })
}

fn decode_nowork(e: &Element) -> Result<NoWork, WireError> {
    let a = Attrs::new(e, "nowork", &["v", "retry-after"])?;
    no_children(e, "nowork")?;
    Ok(NoWork {
        retry_after_secs: a.parse("retry-after")?,
    })
}

fn decode_outcome(e: &Element) -> Result<Outcome, WireError> {
    let a = Attrs::new(e, "outcome", &["kind", "code", "signal", "limit", "reason"])?;
    no_children(e, "outcome")?;
    let msg = || cut(&e.text()).to_owned();
    let kind = a.str("kind")?;
    // Each kind carries only its own attribute.
    for (attr, owner) in [
        ("code", "exited"),
        ("signal", "killed"),
        ("limit", "limit-exceeded"),
        ("reason", "refused"),
    ] {
        if kind != owner && e.attr(attr).is_some() {
            return Err(WireError::UnknownAttribute {
                element: "outcome".into(),
                attr: attr.into(),
            });
        }
    }
    Ok(match kind {
        "exited" => Outcome::Exited {
            code: a.parse("code")?,
        },
        "killed" => Outcome::Killed {
            signal: a.parse("signal")?,
        },
        "timed-out" => Outcome::TimedOut,
        "limit-exceeded" => {
            let v = a.str("limit")?;
            Outcome::LimitExceeded {
                limit: v.parse().map_err(|()| a.bad("limit", v))?,
            }
        }
        "stage-in-failed" => Outcome::StageInFailed(msg()),
        "setup-failed" => Outcome::SetupFailed(msg()),
        "stage-out-failed" => Outcome::StageOutFailed(msg()),
        "refused" => {
            let v = a.str("reason")?;
            Outcome::Refused(v.parse().map_err(|()| a.bad("reason", v))?)
        }
        other => return Err(a.bad("kind", other)),
    })
}

fn decode_sandbox(e: &Element) -> Result<SandboxReport, WireError> {
    let a = Attrs::new(e, "sandbox", &["active", "missing"])?;
    no_children(e, "sandbox")?;
    // A newer agent may know protections this manager does not: such words are skipped (the
    // report carries a job's results and must not be lost over them), but each must look
    // like a word.
    let set = |attr: &'static str| -> Result<std::collections::BTreeSet<Protection>, WireError> {
        let mut out = std::collections::BTreeSet::new();
        for w in a
            .opt_str(attr)
            .unwrap_or("")
            .split(' ')
            .filter(|w| !w.is_empty())
        {
            if w.len() > 32
                || !w
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                return Err(a.bad(attr, w));
            }
            out.extend(w.parse::<Protection>().ok());
        }
        Ok(out)
    };
    let report = SandboxReport {
        active: set("active")?,
        missing: set("missing")?,
    };
    if let Some(both) = report.active.intersection(&report.missing).next() {
        return Err(invalid(
            "sandbox",
            format!("{both} is both active and missing"),
        ));
    }
    Ok(report)
}

fn decode_done(e: &Element) -> Result<DoneReport, WireError> {
    let a = Attrs::new(e, "done", &["v", "agent", "job", "attempt", "more"])?;
    let mut outcome = None;
    let mut timings = None;
    let mut archive = None;
    let mut files = Vec::new();
    let mut sandbox = None;
    let mut volunteer = None;
    for c in child_of(e, "done") {
        let c = c?;
        match c.name() {
            "outcome" if outcome.is_none() => outcome = Some(decode_outcome(c)?),
            "timings" if timings.is_none() => {
                let ca = Attrs::new(c, "timings", &["stage-in", "run", "stage-out", "cpu"])?;
                no_children(c, "timings")?;
                timings = Some(Timings {
                    stage_in_ms: ca.parse("stage-in")?,
                    run_ms: ca.parse("run")?,
                    stage_out_ms: ca.parse("stage-out")?,
                    cpu_ms: ca.opt_parse("cpu")?,
                });
            }
            "volunteer" if volunteer.is_none() => {
                let ca = Attrs::new(c, "volunteer", &["user", "host", "team", "token"])?;
                no_children(c, "volunteer")?;
                let host_token = ca.opt_str("token").map(str::to_owned);
                if let Some(t) = &host_token {
                    if !valid_host_token(t) {
                        return Err(ca.bad("token", t));
                    }
                }
                volunteer = Some(Volunteer {
                    user_id: ca.parse("user")?,
                    host_id: ca.parse("host")?,
                    team_id: ca.parse("team")?,
                    host_token,
                });
            }
            "sandbox" if sandbox.is_none() => sandbox = Some(decode_sandbox(c)?),
            "archive" if archive.is_none() => {
                let ca = Attrs::new(c, "archive", &["sha256", "size"])?;
                no_children(c, "archive")?;
                archive = Some((ca.parse("sha256")?, ca.parse("size")?));
            }
            "file" => {
                let ca = Attrs::new(c, "file", &["path", "size", "sha256"])?;
                no_children(c, "file")?;
                files.push(FileDigest {
                    path: ca.bounded("path", crate::job::MAX_PATH_BYTES)?,
                    size: ca.parse("size")?,
                    sha256: ca.parse("sha256")?,
                });
            }
            other => {
                return Err(WireError::UnexpectedChild {
                    element: "done",
                    child: other.chars().take(40).collect(),
                })
            }
        }
    }
    Ok(DoneReport {
        agent: a.agent_name("agent")?,
        job: a.parse("job")?,
        attempt: a.parse("attempt")?,
        outcome: outcome.ok_or_else(|| invalid("done", "no <outcome/>"))?,
        timings: timings.unwrap_or_default(),
        archive,
        files,
        sandbox: sandbox.unwrap_or_default(),
        volunteer,
        want_more: a.opt_parse("more")?.unwrap_or(false),
    })
}

fn decode_ack(e: &Element) -> Result<Ack, WireError> {
    let a = Attrs::new(e, "ack", &["v", "job", "attempt", "status"])?;
    let duplicate = match a.str("status")? {
        "recorded" => false,
        "duplicate" => true,
        other => return Err(a.bad("status", other)),
    };
    let mut next = None;
    for c in child_of(e, "ack") {
        let c = c?;
        if next.is_some() {
            return Err(invalid("ack", "more than one child"));
        }
        check_version(c)?;
        next = Some(match c.name() {
            "assign" => Next::Assign(Box::new(decode_assign(c)?)),
            "nowork" => Next::NoWork(decode_nowork(c)?),
            other => {
                return Err(WireError::UnexpectedChild {
                    element: "ack",
                    child: other.chars().take(40).collect(),
                })
            }
        });
    }
    Ok(Ack {
        job: a.parse("job")?,
        attempt: a.parse("attempt")?,
        duplicate,
        next,
    })
}

fn check_version(e: &Element) -> Result<(), WireError> {
    match e.attr("v") {
        Some("1") => Ok(()),
        Some(v) => Err(WireError::UnsupportedVersion(v.chars().take(20).collect())),
        None => Err(WireError::MissingAttribute {
            element: "payload",
            attr: "v",
        }),
    }
}

impl Payload {
    /// Decode a payload element, strictly and within the size limits.
    pub fn from_element(e: &Element) -> Result<Payload, WireError> {
        if e.ns() != NS {
            return Err(WireError::WrongNamespace(e.ns().chars().take(80).collect()));
        }
        check_bounds(e)?;
        check_version(e)?;
        Ok(match e.name() {
            "request" => {
                let a = Attrs::new(
                    e,
                    "request",
                    &["v", "agent", "version", "wait", "token", "boinc-user"],
                )?;
                no_children(e, "request")?;
                Payload::Request(WorkRequest {
                    agent: a.agent_name("agent")?,
                    version: a.bounded("version", 64)?,
                    wait_secs: a.opt_parse("wait")?.unwrap_or(0),
                    token: a
                        .opt_str("token")
                        .map(|_| a.bounded("token", crate::identity::MAX_TOKEN_BYTES))
                        .transpose()?,
                    boinc_user: a.opt_parse("boinc-user")?,
                })
            }
            "assign" => Payload::Assign(Box::new(decode_assign(e)?)),
            "nowork" => Payload::NoWork(decode_nowork(e)?),
            "progress" => {
                let a = Attrs::new(e, "progress", &["v", "agent", "job", "attempt", "phase"])?;
                no_children(e, "progress")?;
                let phase = match a.str("phase")? {
                    "staging" => Phase::Staging,
                    "running" => Phase::Running,
                    "uploading" => Phase::Uploading,
                    other => return Err(a.bad("phase", other)),
                };
                Payload::Progress(Progress {
                    agent: a.agent_name("agent")?,
                    job: a.parse("job")?,
                    attempt: a.parse("attempt")?,
                    phase,
                })
            }
            "done" => Payload::Done(Box::new(decode_done(e)?)),
            "ack" => Payload::Ack(Box::new(decode_ack(e)?)),
            "problem" => {
                let a = Attrs::new(e, "problem", &["v", "code"])?;
                no_children(e, "problem")?;
                let code = a.str("code")?;
                Payload::Problem(Problem {
                    code: code.parse().map_err(|_| a.bad("code", code))?,
                    text: cut(&e.text()).to_owned(),
                })
            }
            other => return Err(WireError::UnknownElement(other.chars().take(40).collect())),
        })
    }

    /// Parse a payload from XML text (used by tests, fuzzing and tools).
    pub fn from_xml(xml: &str) -> Result<Payload, WireError> {
        if xml.len() > MAX_PAYLOAD_BYTES * 2 {
            return Err(WireError::TooLarge);
        }
        let e: Element = xml
            .parse()
            .map_err(|err: minidom::Error| invalid("payload", err))?;
        Self::from_element(&e)
    }

    /// The payload as XML text.
    pub fn to_xml(&self) -> String {
        String::from(&self.to_element())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assignment() -> Assignment {
        Assignment {
            job: 17,
            attempt: 2,
            lease_secs: 60,
            name: "mc-pi".into(),
            command: vec!["sh".into(), "mc.sh".into(), "".into(), "a <b> & 'c'".into()],
            env: [("SEED".to_string(), "42".to_string())].into(),
            inputs: vec![WireInput {
                name: "mc.sh".into(),
                url: "http://127.0.0.1:8080/inputs/abc".into(),
                sha256: Some(Sha256::of(b"x")),
                size: Some(1),
            }],
            outputs: vec!["out/histogram.csv".into()],
            limits: Limits {
                wall_time: Some(Seconds(300)),
                output: Some(Bytes(1024)),
                ..Limits::default()
            },
            network: false,
            upload_url: "http://127.0.0.1:8080/outputs/17".into(),
            upload_token: "t0k3n".into(),
            seal: None,
        }
    }

    fn sealed() -> Assignment {
        let mut a = assignment();
        let (key, _) = crate::signing::SigningKey::generate().unwrap();
        key.seal(&mut a, "vm-7", "vm-7@localhost", 1_764_900_000);
        a
    }

    fn round_trip(p: Payload) {
        let xml = p.to_xml();
        assert_eq!(Payload::from_xml(&xml).unwrap(), p, "{xml}");
    }

    #[test]
    fn every_payload_round_trips() {
        round_trip(Payload::Request(WorkRequest {
            agent: "vm-7".into(),
            version: "0.1.0".into(),
            wait_secs: 20,
            token: None,
            boinc_user: None,
        }));
        round_trip(Payload::Request(WorkRequest {
            agent: "vm-7".into(),
            version: "0.1.0".into(),
            wait_secs: 0,
            token: Some("v1.dm0tNw==.1767222000.AAAA".into()),
            boinc_user: Some(42),
        }));
        round_trip(Payload::Assign(Box::new(assignment())));
        let networked = Assignment {
            network: true,
            ..assignment()
        };
        let xml = Payload::Assign(Box::new(networked.clone())).to_xml();
        assert!(
            !xml.contains("network="),
            "the default is not spelled out: {xml}"
        );
        round_trip(Payload::Assign(Box::new(networked)));
        round_trip(Payload::Assign(Box::new(sealed())));
        round_trip(Payload::NoWork(NoWork {
            retry_after_secs: 5,
        }));
        round_trip(Payload::Progress(Progress {
            agent: "vm-7".into(),
            job: 1,
            attempt: 1,
            phase: Phase::Running,
        }));
        for outcome in [
            Outcome::Exited { code: 3 },
            Outcome::Killed { signal: 9 },
            Outcome::TimedOut,
            Outcome::LimitExceeded { limit: Limit::Cpu },
            Outcome::LimitExceeded {
                limit: Limit::Memory,
            },
            Outcome::LimitExceeded { limit: Limit::Disk },
            Outcome::LimitExceeded {
                limit: Limit::Processes,
            },
            Outcome::LimitExceeded {
                limit: Limit::Output,
            },
            Outcome::StageInFailed("sha256 mismatch".into()),
            Outcome::SetupFailed("no such program".into()),
            Outcome::StageOutFailed("upload refused".into()),
            Outcome::Refused(Refusal::BadSignature),
            Outcome::Refused(Refusal::Replayed),
        ] {
            round_trip(Payload::Done(Box::new(DoneReport {
                agent: "vm-7".into(),
                job: 17,
                attempt: 2,
                outcome,
                timings: Timings {
                    stage_in_ms: 1,
                    run_ms: 2,
                    stage_out_ms: 3,
                    cpu_ms: Some(4),
                },
                archive: Some((Sha256::of(b"tgz"), 99)),
                files: vec![FileDigest {
                    path: "out/histogram.csv".into(),
                    size: 5,
                    sha256: Sha256::of(b"hist"),
                }],
                sandbox: SandboxReport {
                    active: [Protection::Session, Protection::NoNewPrivs].into(),
                    missing: [Protection::Uid].into(),
                },
                volunteer: Some(Volunteer {
                    user_id: 42,
                    host_id: 7,
                    team_id: 0,
                    host_token: Some("ab".repeat(32)),
                }),
                want_more: true,
            })));
        }
        for next in [
            None,
            Some(Next::NoWork(NoWork {
                retry_after_secs: 3,
            })),
            Some(Next::Assign(Box::new(assignment()))),
            Some(Next::Assign(Box::new(sealed()))),
        ] {
            round_trip(Payload::Ack(Box::new(Ack {
                job: 17,
                attempt: 2,
                duplicate: false,
                next,
            })));
        }
        round_trip(Payload::Problem(Problem {
            code: ErrorCode::StaleLease,
            text: "attempt 1 of job 17 was requeued".into(),
        }));
    }

    #[test]
    fn free_text_travels_in_element_text_and_attributes_carry_no_control_characters() {
        let mut a = assignment();
        a.env
            .insert("MULTI".into(), "line one\nline two\twith tab".into());
        a.command.push("arg\nwith\tnewline".into());
        // What a server that turns whitespace in attribute values into spaces passes on.
        let mut el = Payload::Assign(Box::new(a.clone())).to_element();
        crate::fuzzing::normalise_attribute_whitespace(&mut el);
        assert_eq!(
            Payload::from_element(&el).unwrap(),
            Payload::Assign(Box::new(a))
        );
        let err = Payload::from_xml(
            "<progress xmlns='urn:copilot:1' v='1' agent='a' job='1' attempt='1' phase='running&#10;'/>",
        )
        .unwrap_err();
        assert!(matches!(err, WireError::BadAttribute { .. }), "{err}");
    }

    #[test]
    fn unknown_protection_words_are_skipped() {
        let xml = "<done xmlns='urn:copilot:1' v='1' agent='a' job='1' attempt='1'><outcome kind='timed-out'/><sandbox active='uid seccomp' missing='landlock-v9'/></done>";
        let Payload::Done(d) = Payload::from_xml(xml).unwrap() else {
            panic!("not a done report");
        };
        assert_eq!(d.sandbox.active, [Protection::Uid].into());
        assert!(d.sandbox.missing.is_empty());
    }

    #[test]
    fn malformed_payloads_get_typed_errors() {
        type Check = fn(&WireError) -> bool;
        let cases: &[(&str, Check)] = &[
            ("<request xmlns='urn:other'/>", |e| {
                matches!(e, WireError::WrongNamespace(_))
            }),
            (
                "<request xmlns='urn:copilot:1' agent='a' version='1'/>",
                |e| matches!(e, WireError::MissingAttribute { attr: "v", .. }),
            ),
            (
                "<request xmlns='urn:copilot:1' v='2' agent='a' version='1'/>",
                |e| matches!(e, WireError::UnsupportedVersion(_)),
            ),
            ("<request xmlns='urn:copilot:1' v='1' agent='' version='1'/>", |e| {
                matches!(e, WireError::BadAttribute { attr: "agent", .. })
            }),
            ("<request xmlns='urn:copilot:1' v='1' agent='a b' version='1'/>", |e| {
                matches!(e, WireError::BadAttribute { attr: "agent", .. })
            }),
            ("<bogus xmlns='urn:copilot:1' v='1'/>", |e| {
                matches!(e, WireError::UnknownElement(_))
            }),
            (
                "<request xmlns='urn:copilot:1' v='1' agent='a' version='1' evil='1'/>",
                |e| matches!(e, WireError::UnknownAttribute { .. }),
            ),
            (
                "<progress xmlns='urn:copilot:1' v='1' agent='a' job='x' attempt='1' phase='running'/>",
                |e| matches!(e, WireError::BadAttribute { attr: "job", .. }),
            ),
            (
                "<progress xmlns='urn:copilot:1' v='1' agent='a' job='-1' attempt='1' phase='running'/>",
                |e| matches!(e, WireError::BadAttribute { attr: "job", .. }),
            ),
            (
                "<done xmlns='urn:copilot:1' v='1' agent='a' job='1' attempt='1'/>",
                |e| matches!(e, WireError::Invalid { .. }),
            ),
            (
                "<done xmlns='urn:copilot:1' v='1' agent='a' job='1' attempt='1'><outcome kind='timed-out'/><sandbox active='uid Root'/></done>",
                |e| matches!(e, WireError::BadAttribute { element: "sandbox", attr: "active", .. }),
            ),
            (
                "<done xmlns='urn:copilot:1' v='1' agent='a' job='1' attempt='1'><outcome kind='timed-out'/><sandbox active='uid' missing='netns uid'/></done>",
                |e| matches!(e, WireError::Invalid { element: "sandbox", .. }),
            ),
            (
                "<done xmlns='urn:copilot:1' v='1' agent='a' job='1' attempt='1'><outcome kind='timed-out'/><sandbox active='uid'/><sandbox active='uid'/></done>",
                |e| matches!(e, WireError::UnexpectedChild { child, .. } if child == "sandbox"),
            ),
            (
                "<done xmlns='urn:copilot:1' v='1' agent='a' job='1' attempt='1'><outcome kind='limit-exceeded'/><timings stage-in='0' run='0' stage-out='0'/></done>",
                |e| matches!(e, WireError::MissingAttribute { attr: "limit", .. }),
            ),
            (
                "<done xmlns='urn:copilot:1' v='1' agent='a' job='1' attempt='1'><outcome kind='limit-exceeded' limit='patience'/><timings stage-in='0' run='0' stage-out='0'/></done>",
                |e| matches!(e, WireError::BadAttribute { attr: "limit", .. }),
            ),
            (
                "<done xmlns='urn:copilot:1' v='1' agent='a' job='1' attempt='1'><outcome kind='limit-exceeded' limit='CPU'/><timings stage-in='0' run='0' stage-out='0'/></done>",
                |e| matches!(e, WireError::BadAttribute { attr: "limit", .. }),
            ),
            (
                "<done xmlns='urn:copilot:1' v='1' agent='a' job='1' attempt='1'><outcome kind='limit-exceeded' limit='cpu' signal='24'/><timings stage-in='0' run='0' stage-out='0'/></done>",
                |e| matches!(e, WireError::UnknownAttribute { .. }),
            ),
            (
                "<done xmlns='urn:copilot:1' v='1' agent='a' job='1' attempt='1'><outcome kind='exited' code='0' limit='cpu'/><timings stage-in='0' run='0' stage-out='0'/></done>",
                |e| matches!(e, WireError::UnknownAttribute { .. }),
            ),
            (
                "<done xmlns='urn:copilot:1' v='1' agent='a' job='1' attempt='1'><outcome kind='timed-out'/><volunteer user='1' host='2' team='0' token='0123456789ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef'/></done>",
                |e| matches!(e, WireError::BadAttribute { element: "volunteer", attr: "token", .. }),
            ),
            (
                "<done xmlns='urn:copilot:1' v='1' agent='a' job='1' attempt='1'><outcome kind='timed-out'/><volunteer user='-1' host='2' team='0'/></done>",
                |e| matches!(e, WireError::BadAttribute { element: "volunteer", attr: "user", .. }),
            ),
            (
                "<done xmlns='urn:copilot:1' v='1' agent='a' job='1' attempt='1'><outcome kind='timed-out'/><volunteer user='1' host='2'/></done>",
                |e| matches!(e, WireError::MissingAttribute { element: "volunteer", attr: "team" }),
            ),
            (
                "<done xmlns='urn:copilot:1' v='1' agent='a' job='1' attempt='1'><outcome kind='timed-out'/><timings stage-in='0' run='0' stage-out='0' cpu='lots'/></done>",
                |e| matches!(e, WireError::BadAttribute { element: "timings", attr: "cpu", .. }),
            ),
            (
                "<done xmlns='urn:copilot:1' v='1' agent='a' job='1' attempt='1'><outcome kind='refused' reason='tired'/></done>",
                |e| matches!(e, WireError::BadAttribute { element: "outcome", attr: "reason", .. }),
            ),
            (
                "<done xmlns='urn:copilot:1' v='1' agent='a' job='1' attempt='1'><outcome kind='exited' code='0' reason='expired'/></done>",
                |e| matches!(e, WireError::UnknownAttribute { .. }),
            ),
            (
                "<request xmlns='urn:copilot:1' v='1' agent='a' version='1'><x/></request>",
                |e| matches!(e, WireError::UnexpectedChild { .. }),
            ),
            (
                "<request xmlns='urn:copilot:1' v='1' agent='a' version='1'",
                |e| matches!(e, WireError::Invalid { .. }),
            ),
        ];
        for (xml, ok) in cases {
            let err = Payload::from_xml(xml).unwrap_err();
            assert!(ok(&err), "{xml}: {err:?}");
        }
    }

    #[test]
    fn broken_signatures_are_typed_errors() {
        let xml = Payload::Assign(Box::new(sealed())).to_xml();
        let (head, rest) = xml.split_once("<signature").unwrap();
        let (sig, tail) = rest.split_once("</signature>").unwrap();
        let (attrs, b64) = sig.split_once('>').unwrap();
        let with =
            |attrs: &str, b64: &str| format!("{head}<signature{attrs}>{b64}</signature>{tail}");
        assert!(Payload::from_xml(&with(attrs, b64)).is_ok());
        type Check = fn(&WireError) -> bool;
        let cases: &[(String, Check)] = &[
            (with(attrs, &b64[4..]), |e| {
                matches!(e, WireError::Invalid { element: "signature", .. })
            }),
            (with(attrs, &format!("{b64}AAAA")), |e| {
                matches!(e, WireError::Invalid { element: "signature", .. })
            }),
            (with(attrs, "!!not base64!!"), |e| {
                matches!(e, WireError::Invalid { element: "signature", .. })
            }),
            (with(attrs, ""), |e| {
                matches!(e, WireError::Invalid { element: "signature", .. })
            }),
            (with(&attrs.replace("expires='", "expires='-"), b64), |e| {
                matches!(e, WireError::BadAttribute { attr: "expires", .. })
            }),
            (with(&attrs.replace(" jid=", " alg='rsa' jid="), b64), |e| {
                matches!(e, WireError::UnknownAttribute { .. })
            }),
            (with(&attrs.replace("agent='vm-7'", "agent=''"), b64), |e| {
                matches!(e, WireError::BadAttribute { attr: "agent", .. })
            }),
            (
                format!("{head}<signature{attrs}>{b64}</signature><signature{attrs}>{b64}</signature>{tail}"),
                |e| matches!(e, WireError::UnexpectedChild { child, .. } if child == "signature"),
            ),
        ];
        for (xml, ok) in cases {
            let err = Payload::from_xml(xml).unwrap_err();
            assert!(ok(&err), "{xml}: {err:?}");
        }
    }

    #[test]
    fn limit_exceeded_is_a_final_payload_failure() {
        for limit in Limit::ALL {
            let o = Outcome::LimitExceeded { limit };
            assert!(!o.succeeded());
            assert!(!o.is_retryable());
            assert_eq!(limit.as_str().parse::<Limit>(), Ok(limit));
            assert!(o.describe().contains(limit.as_str()));
        }
    }

    #[test]
    fn hostile_assignments_are_refused() {
        for (from, to) in [
            ("name='mc.sh'", "name='../../etc/passwd'"),
            ("path='out/histogram.csv'", "path='/etc/shadow'"),
            ("<arg>sh</arg>", "<arg></arg>"),
        ] {
            let xml = Payload::Assign(Box::new(assignment()))
                .to_xml()
                .replacen(from, to, 1);
            assert!(xml.contains(to), "fixture did not change: {xml}");
            let err = Payload::from_xml(&xml).unwrap_err();
            assert!(matches!(err, WireError::Invalid { .. }), "{to}: {err:?}");
        }
    }

    #[test]
    fn oversized_and_deep_payloads_are_refused() {
        let file = format!(
            "<file path='{}' size='1' sha256='{}'/>",
            "p".repeat(200),
            Sha256::of(b"")
        );
        let big = format!(
            "<done xmlns='urn:copilot:1' v='1' agent='a' job='1' attempt='1'><outcome kind='timed-out'/>{}</done>",
            file.repeat(MAX_PAYLOAD_BYTES / 200)
        );
        assert_eq!(Payload::from_xml(&big).unwrap_err(), WireError::TooLarge);
        let deep = format!(
            "<ack xmlns='urn:copilot:1' v='1' job='1' attempt='1' status='recorded'>{}x{}</ack>",
            "<a>".repeat(10),
            "</a>".repeat(10)
        );
        assert_eq!(Payload::from_xml(&deep).unwrap_err(), WireError::TooDeep);
    }

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        let long = "é".repeat(MAX_MESSAGE_BYTES);
        let p = Payload::Problem(Problem {
            code: ErrorCode::Internal,
            text: long,
        });
        let Payload::Problem(back) = Payload::from_xml(&p.to_xml()).unwrap() else {
            panic!("not a problem");
        };
        assert!(back.text.len() <= MAX_MESSAGE_BYTES);
    }

    #[test]
    fn manager_address_adds_the_resource_once() {
        assert_eq!(manager_address("m@h"), "m@h/manager");
        assert_eq!(manager_address("m@h/x"), "m@h/x");
    }

    #[test]
    fn error_codes_round_trip_and_map_to_conditions() {
        for (code, name) in ErrorCode::NAMES {
            assert_eq!(name.parse::<ErrorCode>().unwrap(), code);
            assert_eq!(code.as_str(), name);
            assert!(!code.condition().is_empty());
        }
    }
}
