//! The XMPP side of the manager: answers agents' work requests with assignments (holding a
//! request while the queue is empty), records done reports, renews leases on progress messages,
//! and requeues the jobs of agents that go offline. Malformed or oversized payloads get a typed
//! error answer and a rate-limited log line; nothing an agent sends can stop the dispatcher.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use copilot_protocol::job::InputSource;
use copilot_protocol::wire::{
    Ack, Assignment, DoneReport, ErrorCode, Next, NoWork, Payload, Problem, WireError, WireInput,
    WorkRequest,
};
use copilot_protocol::JobState;
use copilot_xmpp::{Connection, Element, Incoming, IqKind, LogLimiter, Sender};
use tracing::{debug, info, warn};

use crate::fleet::FleetError;
use crate::queue::{Claim, Completion, QueueError};
use crate::Shared;

const PING_NS: &str = "urn:xmpp:ping";

/// Answers agents over one XMPP connection.
#[derive(Debug)]
pub struct Dispatcher {
    shared: Arc<Shared>,
    xmpp: Sender,
    bad_input_log: Mutex<LogLimiter>,
    /// Agent addresses this session has sent directed presence to: the server tells them when
    /// this session ends, so they stop waiting for answers that will not come.
    announced: Mutex<HashSet<String>>,
    /// Bumped whenever an agent address goes offline, so held requests check whether theirs is
    /// still current: a request held for a dead session must not claim a job.
    offline_epoch: tokio::sync::watch::Sender<u64>,
    /// Bumped whenever the manager's own XMPP session starts again: requests held from the old
    /// session came from addresses that may be gone (after a server restart, nobody tells us),
    /// and answers to them would be lost, so they must not claim jobs.
    session: tokio::sync::watch::Sender<u64>,
}

fn problem(code: ErrorCode, text: impl Into<String>) -> Problem {
    Problem {
        code,
        text: text.into(),
    }
}

impl From<&QueueError> for Problem {
    fn from(e: &QueueError) -> Problem {
        let code = match e {
            QueueError::StaleLease { .. } => ErrorCode::StaleLease,
            QueueError::UnknownJob(_) => ErrorCode::UnknownJob,
            _ => ErrorCode::Internal,
        };
        problem(code, e.to_string())
    }
}

impl Dispatcher {
    /// A dispatcher sending through `xmpp`.
    pub fn new(shared: Arc<Shared>, xmpp: Sender) -> Arc<Self> {
        Arc::new(Self {
            shared,
            xmpp,
            bad_input_log: Mutex::new(LogLimiter::new(10, Duration::from_secs(60))),
            announced: Mutex::new(HashSet::new()),
            offline_epoch: tokio::sync::watch::Sender::new(0),
            session: tokio::sync::watch::Sender::new(0),
        })
    }

    /// Serve events from `conn` until it closes or `shutdown` resolves.
    pub async fn run(self: Arc<Self>, mut conn: Connection, shutdown: impl std::future::Future) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                ev = conn.next() => {
                    let Some(ev) = ev else { break };
                    self.clone().handle(ev);
                }
            }
        }
        conn.shutdown();
    }

    fn handle(self: Arc<Self>, ev: Incoming) {
        match ev {
            Incoming::Online { jid } => {
                info!(%jid, "manager online again");
                if let Err(e) = self.xmpp.presence(None, true) {
                    warn!("cannot send presence: {e}");
                }
                // A new session: requests held from the old one are void, and the agents known
                // to be online must hear of this session.
                self.session.send_modify(|n| *n += 1);
                self.lock_announced().clear();
                for agent in self.shared.fleet.list().agents {
                    if let Some(jid) = agent.jid {
                        self.announce(&jid);
                    }
                }
            }
            Incoming::Request {
                from,
                id,
                kind,
                payload,
            } => {
                tokio::spawn(async move { self.on_request(from, id, kind, payload).await });
            }
            Incoming::Message { from, payloads } => {
                for p in payloads
                    .iter()
                    .filter(|p| p.ns() == copilot_protocol::wire::NS)
                {
                    match Payload::from_element(p) {
                        Ok(Payload::Progress(pr)) => self.on_progress(&from, &pr),
                        Ok(other) => self.log_bad(&from, &format!("unexpected message {other:?}")),
                        Err(e) => self.log_bad(&from, &e.to_string()),
                    }
                }
            }
            Incoming::Presence { from, available } => self.on_presence(&from, available),
        }
    }

    fn lock_announced(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.announced.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Send directed presence to an agent's address once per session.
    fn announce(&self, jid: &str) {
        if self.lock_announced().insert(jid.to_owned()) {
            if let Err(e) = self.xmpp.presence(Some(jid), true) {
                debug!("cannot send presence to {jid}: {e}");
            }
        }
    }

    fn log_bad(&self, from: &str, what: &str) {
        let mut limiter = self.bad_input_log.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(suppressed) = limiter.check(Instant::now()) {
            if suppressed > 0 {
                warn!("{suppressed} more bad stanzas were not logged");
            }
            warn!(%from, "bad stanza: {what}");
        }
    }

    fn reply_error(&self, from: &str, id: String, p: Problem) {
        if let Err(e) = self.xmpp.reply_error(from, id, p) {
            debug!("cannot answer {from}: {e}");
        }
    }

    fn reply(&self, from: &str, id: String, payload: Payload) {
        if let Err(e) = self.xmpp.reply(from, id, Some(payload.to_element())) {
            debug!("cannot answer {from}: {e}");
        }
    }

    async fn on_request(self: Arc<Self>, from: String, id: String, kind: IqKind, el: Element) {
        if el.is("ping", PING_NS) {
            let _ = self.xmpp.reply(&from, id, None);
            return;
        }
        let payload = match Payload::from_element(&el) {
            Ok(p) => p,
            Err(e) => {
                self.log_bad(&from, &e.to_string());
                return self.reply_error(&from, id, problem(e.code(), e.to_string()));
            }
        };
        match (kind, payload) {
            (IqKind::Get, Payload::Request(req)) => self.on_work_request(from, id, req).await,
            (IqKind::Set, Payload::Done(report)) => self.on_done(from, id, *report),
            (_, other) => {
                let e = WireError::Invalid {
                    element: "iq",
                    reason: format!("not a request an agent may send: {other:?}")
                        .chars()
                        .take(200)
                        .collect(),
                };
                self.log_bad(&from, &e.to_string());
                self.reply_error(&from, id, problem(e.code(), e.to_string()));
            }
        }
    }

    fn assignment(&self, c: Claim) -> Assignment {
        let cfg = &self.shared.config;
        let base = cfg.http.public_url.trim_end_matches('/');
        Assignment {
            job: c.job,
            attempt: c.attempt,
            lease_secs: cfg.jobs.lease.0 as u32,
            name: c.spec.name,
            command: c.spec.command,
            env: c.spec.env,
            inputs: c
                .spec
                .inputs
                .into_iter()
                .map(|i| match i.source {
                    InputSource::Stored { sha256, size } => WireInput {
                        name: i.name,
                        url: format!("{base}/inputs/{sha256}"),
                        sha256: Some(sha256),
                        size: Some(size),
                    },
                    InputSource::Url { url, sha256 } => WireInput {
                        name: i.name,
                        url,
                        sha256,
                        size: None,
                    },
                })
                .collect(),
            outputs: c.spec.outputs,
            limits: c.spec.limits,
            upload_url: format!("{base}/outputs/{}/{}", c.job, c.attempt),
            upload_token: c.upload_token,
        }
    }

    /// Claim a job for `agent`, or say when to come back.
    fn next_for(&self, agent: &str) -> Result<Next, QueueError> {
        let cfg = &self.shared.config.jobs;
        match self.shared.queue.claim(
            agent,
            cfg.lease.as_duration(),
            cfg.upload_token_ttl.as_duration(),
        )? {
            Some(claim) => {
                info!(job = claim.job, attempt = claim.attempt, agent, "assigned");
                self.shared.fleet.started(agent, claim.job);
                Ok(Next::Assign(Box::new(self.assignment(claim))))
            }
            None => Ok(Next::NoWork(NoWork {
                retry_after_secs: cfg.retry_after.0.max(1) as u32,
            })),
        }
    }

    fn register(&self, name: &str, from: &str, version: Option<&str>) -> Result<(), Problem> {
        self.shared.fleet.seen(name, from, version).map_err(
            |e @ FleetError::NameTaken { .. }| {
                self.log_bad(from, &e.to_string());
                problem(ErrorCode::NotAuthorized, e.to_string())
            },
        )?;
        self.announce(from);
        Ok(())
    }

    async fn on_work_request(self: Arc<Self>, from: String, id: String, req: WorkRequest) {
        if let Err(p) = self.register(&req.agent, &from, Some(&req.version)) {
            return self.reply_error(&from, id, p);
        }
        let hold = Duration::from_secs(u64::from(req.wait_secs))
            .min(self.shared.config.jobs.hold.as_duration());
        let deadline = tokio::time::Instant::now() + hold;
        let mut offline = self.offline_epoch.subscribe();
        let mut session = self.session.subscribe();
        let started_in = *session.borrow_and_update();
        let no_work_now = NoWork {
            retry_after_secs: 0,
        };
        loop {
            // Register interest before looking, so a submit between the look and the wait
            // is not missed.
            let notified = self.shared.work_available.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if *session.borrow() != started_in {
                debug!(%from, "dropping a request held from an earlier session");
                return;
            }
            // The agent may have logged in again meanwhile (a new address, with its own
            // request): this request's answer would go nowhere.
            if !self.shared.fleet.is_current(&req.agent, &from) {
                return self.reply(&from, id, Payload::NoWork(no_work_now));
            }
            match self.next_for(&req.agent) {
                Ok(Next::Assign(a)) => return self.reply(&from, id, Payload::Assign(a)),
                // Not allowed to hold: say when to come back.
                Ok(Next::NoWork(n)) if hold.is_zero() => {
                    return self.reply(&from, id, Payload::NoWork(n))
                }
                Ok(Next::NoWork(_)) => {}
                Err(e) => {
                    warn!("queue error: {e}");
                    return self.reply_error(&from, id, (&e).into());
                }
            }
            tokio::select! {
                woken = tokio::time::timeout_at(deadline, notified) => {
                    if woken.is_err() {
                        // Held for the whole time: the agent has waited already and may ask
                        // again at once.
                        return self.reply(&from, id, Payload::NoWork(no_work_now));
                    }
                }
                _ = offline.changed() => {}
                _ = session.changed() => {}
            }
        }
    }

    fn on_done(&self, from: String, id: String, report: DoneReport) {
        if let Err(p) = self.register(&report.agent, &from, None) {
            return self.reply_error(&from, id, p);
        }
        let agent = report.agent.clone();
        let duplicate = match self.shared.queue.complete(&agent, &report) {
            Ok(Completion::Recorded(state)) => {
                info!(job = report.job, attempt = report.attempt, %agent, %state, outcome = %report.outcome.describe(), "reported");
                self.shared
                    .fleet
                    .finished(&agent, report.job, state == JobState::Done);
                if state == JobState::Queued {
                    self.shared.work_available.notify_waiters();
                }
                false
            }
            Ok(Completion::Duplicate) => true,
            Err(e) => {
                match e {
                    // What a confused or hostile peer can provoke: rate-limited.
                    QueueError::StaleLease { .. } | QueueError::UnknownJob(_) => {
                        self.log_bad(&from, &format!("report refused: {e}"))
                    }
                    _ => warn!(job = report.job, "cannot record report: {e}"),
                }
                self.shared.fleet.finished(&agent, report.job, false);
                return self.reply_error(&from, id, (&e).into());
            }
        };
        let next = if report.want_more {
            match self.next_for(&agent) {
                Ok(n) => Some(n),
                Err(e) => {
                    warn!("queue error: {e}");
                    None
                }
            }
        } else {
            None
        };
        let ack = Ack {
            job: report.job,
            attempt: report.attempt,
            duplicate,
            next,
        };
        self.reply(&from, id, Payload::Ack(Box::new(ack)));
    }

    fn on_progress(&self, from: &str, p: &copilot_protocol::wire::Progress) {
        if self.register(&p.agent, from, None).is_err() {
            return;
        }
        let agent = &p.agent;
        let lease = self.shared.config.jobs.lease.as_duration();
        if let Err(e) = self
            .shared
            .queue
            .progress(agent, p.job, p.attempt, p.phase, lease)
        {
            debug!(job = p.job, %agent, "progress refused: {e}");
        }
    }

    fn on_presence(&self, from: &str, available: bool) {
        if available {
            self.shared.fleet.rebind(from);
            return;
        }
        self.lock_announced().remove(from);
        self.offline_epoch.send_modify(|n| *n += 1);
        let Some(agent) = self.shared.fleet.offline(from) else {
            return;
        };
        match self
            .shared
            .queue
            .release_agent(&agent, "agent went offline")
        {
            Ok(jobs) => {
                if !jobs.is_empty() {
                    info!(%agent, ?jobs, "agent went offline; its jobs were released");
                }
                if jobs.iter().any(|(_, s)| *s == JobState::Queued) {
                    self.shared.work_available.notify_waiters();
                }
            }
            Err(e) => warn!(%agent, "cannot release jobs: {e}"),
        }
    }
}

/// Requeue jobs whose lease ran out, every `every`, until `shutdown` resolves.
pub async fn sweep_leases(
    shared: Arc<Shared>,
    every: Duration,
    shutdown: impl std::future::Future,
) {
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tick.tick() => {}
        }
        match shared.queue.expire_leases() {
            Ok(jobs) if !jobs.is_empty() => {
                info!(?jobs, "leases expired");
                for (job, _) in &jobs {
                    shared.fleet.drop_job(*job);
                }
                if jobs.iter().any(|(_, s)| *s == JobState::Queued) {
                    shared.work_available.notify_waiters();
                }
            }
            Ok(_) => {}
            Err(e) => warn!("lease sweep failed: {e}"),
        }
    }
}
