//! One XMPP client connection on its own thread, driven through channels.
//!
//! An IQ answer is taken only from the address the question went to: another account could
//! otherwise answer a question it guessed the id of (ids are sequential), say with an
//! assignment of its own. Answers from anyone else are dropped (and logged, rate-limited), and
//! the question keeps waiting for its real answer.

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::thread::JoinHandle;
use std::time::Duration;

use copilot_protocol::wire::{Payload, Problem};
use futures::StreamExt;
use minidom::Element;
use tokio::sync::{mpsc, oneshot};
use tokio_xmpp::jid::Jid;
use tokio_xmpp::parsers::iq::Iq;
use tokio_xmpp::parsers::message::{Message, MessageType};
use tokio_xmpp::parsers::presence::{Presence, Type as PresenceType};
use tokio_xmpp::parsers::stanza_error::{DefinedCondition, ErrorType, StanzaError};
use tokio_xmpp::xmlstream::Timeouts;
use tokio_xmpp::{Client, Event, Stanza};
use tracing::{debug, info, warn};

use crate::connector::{Connector, Security};
use crate::LogLimiter;

/// How to reach and log in to the XMPP server.
#[derive(Clone, Debug)]
pub struct XmppConfig {
    /// The account, e.g. `agent-1@localhost`; with a resource (`m@localhost/manager`) the
    /// client asks the server to bind that resource.
    pub jid: String,
    pub password: String,
    /// `host:port` of the server's client port.
    pub server: String,
    /// STARTTLS with a pinned CA, or plaintext to loopback only.
    pub security: Security,
}

/// The kind of an IQ request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IqKind {
    Get,
    Set,
}

/// What the connection receives.
#[derive(Debug)]
pub enum Incoming {
    /// Logged in (again): re-send presence, re-send anything that may have been lost.
    Online { jid: String },
    /// An IQ request; answer it with [`Sender::reply`] or [`Sender::reply_error`].
    Request {
        from: String,
        id: String,
        kind: IqKind,
        payload: Element,
    },
    /// A message's payload elements.
    Message {
        from: String,
        payloads: Vec<Element>,
    },
    /// Presence of a peer: `available` false means it went offline.
    Presence { from: String, available: bool },
}

/// What can go wrong talking XMPP.
#[derive(Debug, thiserror::Error)]
pub enum XmppError {
    #[error("invalid JID {jid:?}: {reason}")]
    Jid { jid: String, reason: String },
    #[error("the XMPP connection is closed or was reset before the answer came")]
    Closed,
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error(
        "not logged in after {0:?}: check the server address, the JID, the password and the TLS \
         settings (the log says what failed; a server that requires STARTTLS offers an \
         insecure_loopback client no way to log in)"
    )]
    NotOnline(Duration),
    #[error("the peer answered with an error ({condition}){}", problem.as_ref().map(|p| format!(": {} {}", p.code.as_str(), p.text)).unwrap_or_default())]
    Remote {
        condition: String,
        problem: Option<Problem>,
    },
    #[error("could not start the XMPP thread: {0}")]
    Thread(std::io::Error),
}

type ReplySlot = oneshot::Sender<Result<Option<Element>, XmppError>>;

/// A question in flight: whom it went to, and where its answer goes.
struct Pending {
    to: Jid,
    reply: ReplySlot,
}

enum Command {
    Request {
        to: Jid,
        kind: IqKind,
        payload: Element,
        reply: ReplySlot,
    },
    Reply {
        to: Jid,
        id: String,
        result: Result<Option<Element>, Problem>,
    },
    Message {
        to: Jid,
        payload: Element,
    },
    Presence {
        to: Option<Jid>,
        available: bool,
    },
    Shutdown,
}

/// Sends on a [`Connection`]; cheap to clone and usable from any runtime.
#[derive(Clone, Debug)]
pub struct Sender {
    tx: mpsc::UnboundedSender<Command>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::Request { .. } => "Request",
            Command::Reply { .. } => "Reply",
            Command::Message { .. } => "Message",
            Command::Presence { .. } => "Presence",
            Command::Shutdown => "Shutdown",
        })
    }
}

fn parse_jid(s: &str) -> Result<Jid, XmppError> {
    Jid::from_str(s).map_err(|e| XmppError::Jid {
        jid: s.chars().take(100).collect(),
        reason: e.to_string(),
    })
}

impl Sender {
    fn send(&self, cmd: Command) -> Result<(), XmppError> {
        self.tx.send(cmd).map_err(|_| XmppError::Closed)
    }

    /// Send an IQ request to `to` and wait up to `timeout` for its answer (the result's payload).
    pub async fn request(
        &self,
        to: &str,
        kind: IqKind,
        payload: Element,
        timeout: Duration,
    ) -> Result<Option<Element>, XmppError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Request {
            to: parse_jid(to)?,
            kind,
            payload,
            reply,
        })?;
        match tokio::time::timeout(timeout, rx).await {
            Err(_) => Err(XmppError::Timeout(timeout)),
            Ok(Err(_)) => Err(XmppError::Closed),
            Ok(Ok(r)) => r,
        }
    }

    /// Answer the IQ request `id` from `to` with a result carrying `payload`.
    pub fn reply(&self, to: &str, id: String, payload: Option<Element>) -> Result<(), XmppError> {
        self.send(Command::Reply {
            to: parse_jid(to)?,
            id,
            result: Ok(payload),
        })
    }

    /// Answer the IQ request `id` from `to` with an error carrying `problem`.
    pub fn reply_error(&self, to: &str, id: String, problem: Problem) -> Result<(), XmppError> {
        self.send(Command::Reply {
            to: parse_jid(to)?,
            id,
            result: Err(problem),
        })
    }

    /// Send a one-way message with one payload element.
    pub fn message(&self, to: &str, payload: Element) -> Result<(), XmppError> {
        self.send(Command::Message {
            to: parse_jid(to)?,
            payload,
        })
    }

    /// Send presence: broadcast when `to` is `None`, directed otherwise. A peer that received
    /// directed presence is told by the server when this client goes offline.
    pub fn presence(&self, to: Option<&str>, available: bool) -> Result<(), XmppError> {
        let to = to.map(parse_jid).transpose()?;
        self.send(Command::Presence { to, available })
    }
}

/// A logged-in (or logging-in) XMPP client on its own thread. It reconnects by itself (tokio-xmpp
/// backs off from 1 s to 30 s); every reconnect yields [`Incoming::Online`] again.
#[derive(Debug)]
pub struct Connection {
    sender: Sender,
    incoming: mpsc::Receiver<Incoming>,
    thread: Option<JoinHandle<()>>,
}

impl Connection {
    /// Start connecting; returns at once.
    pub fn start(config: XmppConfig) -> Result<Connection, XmppError> {
        let jid = parse_jid(&config.jid)?;
        let (tx, cmd_rx) = mpsc::unbounded_channel();
        let (in_tx, incoming) = mpsc::channel(1024);
        let thread = std::thread::Builder::new()
            .name(format!("xmpp {jid}"))
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        warn!("cannot build the XMPP runtime: {e}");
                        return;
                    }
                };
                rt.block_on(worker(jid, config, cmd_rx, in_tx));
            })
            .map_err(XmppError::Thread)?;
        Ok(Connection {
            sender: Sender { tx },
            incoming,
            thread: Some(thread),
        })
    }

    /// A handle for sending.
    pub fn sender(&self) -> Sender {
        self.sender.clone()
    }

    /// The next event; `None` once the connection is shut down.
    pub async fn next(&mut self) -> Option<Incoming> {
        self.incoming.recv().await
    }

    /// Wait until logged in; returns the bound JID. Fails with a clear error after `timeout`
    /// (tokio-xmpp itself retries bad credentials forever, silently).
    pub async fn wait_online(&mut self, timeout: Duration) -> Result<String, XmppError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.incoming.recv()).await {
                Err(_) => return Err(XmppError::NotOnline(timeout)),
                Ok(None) => return Err(XmppError::Closed),
                Ok(Some(Incoming::Online { jid })) => return Ok(jid),
                Ok(Some(other)) => debug!("dropping {other:?} received before login"),
            }
        }
    }

    /// Close the stream cleanly and stop the thread (other [`Sender`]s then fail with `Closed`).
    pub fn shutdown(mut self) {
        let _ = self.sender.send(Command::Shutdown);
        self.incoming.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn condition_of(problem: &Problem) -> (ErrorType, DefinedCondition) {
    use copilot_protocol::wire::ErrorCode::*;
    match problem.code {
        Malformed | UnsupportedVersion => (ErrorType::Modify, DefinedCondition::BadRequest),
        TooLarge => (ErrorType::Modify, DefinedCondition::PolicyViolation),
        StaleLease => (ErrorType::Cancel, DefinedCondition::Conflict),
        UnknownJob => (ErrorType::Cancel, DefinedCondition::ItemNotFound),
        NotAuthorized => (ErrorType::Auth, DefinedCondition::NotAuthorized),
        RateLimited => (ErrorType::Wait, DefinedCondition::ResourceConstraint),
        Internal => (ErrorType::Wait, DefinedCondition::InternalServerError),
    }
}

/// The stanza for a command; `None` for [`Command::Shutdown`].
fn build_stanza(
    cmd: Command,
    next_id: &mut u64,
    pending: &mut HashMap<String, Pending>,
) -> Option<Stanza> {
    Some(match cmd {
        Command::Shutdown => return None,
        Command::Request {
            to,
            kind,
            payload,
            reply,
        } => {
            *next_id += 1;
            let id = format!("c{next_id}");
            if pending.len() >= 256 {
                pending.retain(|_, p| !p.reply.is_closed());
            }
            pending.insert(
                id.clone(),
                Pending {
                    to: to.clone(),
                    reply,
                },
            );
            let to = Some(to);
            let iq = match kind {
                IqKind::Get => Iq::Get {
                    from: None,
                    to,
                    id,
                    payload,
                },
                IqKind::Set => Iq::Set {
                    from: None,
                    to,
                    id,
                    payload,
                },
            };
            iq.into()
        }
        Command::Reply { to, id, result } => {
            let to = Some(to);
            let iq = match result {
                Ok(payload) => Iq::Result {
                    from: None,
                    to,
                    id,
                    payload,
                },
                Err(problem) => {
                    let (type_, defined_condition) = condition_of(&problem);
                    Iq::Error {
                        from: None,
                        to,
                        id,
                        error: StanzaError {
                            type_,
                            by: None,
                            defined_condition,
                            texts: BTreeMap::new(),
                            other: Some(Payload::Problem(problem).to_element()),
                        },
                        payload: None,
                    }
                }
            };
            iq.into()
        }
        Command::Message { to, payload } => {
            let mut m = Message::new_with_type(MessageType::Normal, Some(to));
            m.payloads.push(payload);
            m.into()
        }
        Command::Presence { to, available } => {
            let p = if available {
                Presence::available()
            } else {
                Presence::unavailable()
            };
            match to {
                Some(to) => p.with_to(to).into(),
                None => p.into(),
            }
        }
    })
}

fn problem_of(error: &StanzaError) -> Option<Problem> {
    match error.other.as_ref().map(Payload::from_element) {
        Some(Ok(Payload::Problem(p))) => Some(p),
        _ => None,
    }
}

fn condition_name(c: &DefinedCondition) -> String {
    // The condition's element name, e.g. "conflict".
    let e: Element = c.clone().into();
    e.name().to_owned()
}

async fn worker(
    jid: Jid,
    config: XmppConfig,
    mut commands: mpsc::UnboundedReceiver<Command>,
    incoming: mpsc::Sender<Incoming>,
) {
    let mut client = Client::new_with_connector(
        jid,
        config.password,
        Connector::new(config.server, config.security),
        Timeouts::tight(),
    );
    let mut pending: HashMap<String, Pending> = HashMap::new();
    let mut spoofs = LogLimiter::new(10, Duration::from_secs(60));
    let mut next_id = 0u64;
    loop {
        tokio::select! {
            event = client.next() => {
                let Some(event) = event else { break };
                let forward = match event {
                    Event::Online { bound_jid, .. } => {
                        info!(%bound_jid, "online");
                        // Requests sent on the old stream will not be answered: fail them so
                        // their callers retry now instead of waiting for a timeout.
                        pending.clear();
                        Some(Incoming::Online { jid: bound_jid.to_string() })
                    }
                    Event::Disconnected(e) => {
                        warn!("disconnected: {e}");
                        pending.clear();
                        None
                    }
                    Event::Stanza(stanza) => route(stanza, &mut pending, &mut spoofs),
                };
                if let Some(ev) = forward {
                    if incoming.send(ev).await.is_err() {
                        break;
                    }
                }
            }
            cmd = commands.recv() => {
                let Some(cmd) = cmd else { break };
                let Some(stanza) = build_stanza(cmd, &mut next_id, &mut pending) else { break };
                if let Err(e) = client.send_stanza(stanza).await {
                    debug!("send failed: {e}");
                }
            }
        }
    }
    // Fail what is still waiting, then close the stream politely.
    pending.clear();
    let _ = tokio::time::timeout(Duration::from_secs(2), client.send_end()).await;
}

/// Whether an answer from `from` may be the answer to a question sent to `to`: the same
/// address (local part and domain compared as servers fold them), or, for a question to a bare
/// JID, any resource of it.
fn answers(to: &Jid, from: Option<&Jid>) -> bool {
    let Some(from) = from else {
        return false;
    };
    let (to, from) = (to.to_string(), from.to_string());
    let split = |j: &str| -> (String, Option<String>) {
        match j.split_once('/') {
            Some((bare, res)) => (bare.to_ascii_lowercase(), Some(res.to_owned())),
            None => (j.to_ascii_lowercase(), None),
        }
    };
    let ((to_bare, to_res), (from_bare, from_res)) = (split(&to), split(&from));
    to_bare == from_bare && (to_res.is_none() || to_res == from_res)
}

/// The question `id` if `from` may answer it; otherwise it keeps waiting, and the answer is
/// logged (rate-limited) and dropped.
fn take_pending(
    pending: &mut HashMap<String, Pending>,
    id: &str,
    from: Option<&Jid>,
    spoofs: &mut LogLimiter,
) -> Option<ReplySlot> {
    let Some(p) = pending.get(id) else {
        debug!(id, "answer to an unknown or expired request");
        return None;
    };
    if !answers(&p.to, from) {
        if let Some(suppressed) = spoofs.check(std::time::Instant::now()) {
            if suppressed > 0 {
                warn!("{suppressed} more answers from unexpected senders were not logged");
            }
            warn!(
                id,
                from = %from.map(Jid::to_string).unwrap_or_default(),
                to = %p.to,
                "ignoring an IQ answer from an address the question did not go to"
            );
        }
        return None;
    }
    pending.remove(id).map(|p| p.reply)
}

fn route(
    stanza: Stanza,
    pending: &mut HashMap<String, Pending>,
    spoofs: &mut LogLimiter,
) -> Option<Incoming> {
    let from_of = |from: Option<Jid>| from.map(|j| j.to_string()).unwrap_or_default();
    match stanza {
        Stanza::Iq(Iq::Get {
            from, id, payload, ..
        }) => Some(Incoming::Request {
            from: from_of(from),
            id,
            kind: IqKind::Get,
            payload,
        }),
        Stanza::Iq(Iq::Set {
            from, id, payload, ..
        }) => Some(Incoming::Request {
            from: from_of(from),
            id,
            kind: IqKind::Set,
            payload,
        }),
        Stanza::Iq(Iq::Result {
            from, id, payload, ..
        }) => {
            if let Some(slot) = take_pending(pending, &id, from.as_ref(), spoofs) {
                let _ = slot.send(Ok(payload));
            }
            None
        }
        Stanza::Iq(Iq::Error {
            from, id, error, ..
        }) => {
            if let Some(slot) = take_pending(pending, &id, from.as_ref(), spoofs) {
                let _ = slot.send(Err(XmppError::Remote {
                    condition: condition_name(&error.defined_condition),
                    problem: problem_of(&error),
                }));
            }
            None
        }
        Stanza::Message(m) => Some(Incoming::Message {
            from: from_of(m.from),
            payloads: m.payloads,
        }),
        Stanza::Presence(p) => {
            let available = match p.type_ {
                PresenceType::None => true,
                PresenceType::Unavailable => false,
                _ => return None,
            };
            Some(Incoming::Presence {
                from: from_of(p.from),
                available,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jid(s: &str) -> Jid {
        Jid::from_str(s).unwrap()
    }

    #[test]
    fn only_the_address_asked_answers() {
        let manager = jid("manager@localhost/manager");
        assert!(answers(&manager, Some(&jid("manager@localhost/manager"))));
        assert!(answers(&manager, Some(&jid("Manager@LocalHost/manager"))));
        assert!(!answers(&manager, Some(&jid("manager@localhost/other"))));
        assert!(!answers(&manager, Some(&jid("manager@localhost"))));
        assert!(!answers(&manager, Some(&jid("rogue@localhost/manager"))));
        assert!(!answers(&manager, None));
        let bare = jid("agent-1@localhost");
        assert!(answers(&bare, Some(&jid("agent-1@localhost"))));
        assert!(answers(&bare, Some(&jid("agent-1@localhost/vm"))));
        assert!(!answers(&bare, Some(&jid("agent-2@localhost"))));
    }
}
