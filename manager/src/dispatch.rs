//! The XMPP side of the manager: answers agents' work requests with assignments (holding a
//! request while the queue is empty), each signed for the requesting agent with the project's
//! key when the config has one, records done reports, renews leases on progress messages,
//! and requeues the jobs of agents that go offline. Malformed or oversized payloads get a typed
//! error answer and a rate-limited log line; nothing an agent sends can stop the dispatcher.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use copilot_protocol::job::InputSource;
use copilot_protocol::wire::{
    Ack, Assignment, DoneReport, ErrorCode, Next, NoWork, Outcome, Payload, Problem, WireError,
    WireInput, WorkRequest,
};
use copilot_protocol::JobState;
use copilot_xmpp::{Connection, Element, Incoming, IqKind, LogLimiter, Sender};
use tracing::{debug, info, warn};

use crate::chirp_outputs::Slot;
use crate::fleet::{now_secs, FleetError};
use crate::metrics::Metrics;
use crate::penalty::Penalties;
use crate::queue::{Claim, Completion, QueueError};
use crate::Shared;

const PING_NS: &str = "urn:xmpp:ping";

/// Answers agents over one XMPP connection.
#[derive(Debug)]
pub struct Dispatcher {
    shared: Arc<Shared>,
    xmpp: Sender,
    bad_input_log: Mutex<LogLimiter>,
    /// Strikes against senders of refused requests, and their cooldowns.
    penalties: Mutex<Penalties>,
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
            shared: shared.clone(),
            xmpp,
            bad_input_log: Mutex::new(LogLimiter::new(10, Duration::from_secs(60))),
            penalties: Mutex::new(Penalties::new(shared.config.agents.policy())),
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
                        Ok(other) => {
                            self.bad_stanza(&from, &format!("unexpected message {other:?}"))
                        }
                        Err(e) => self.bad_stanza(&from, &e.to_string()),
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

    /// A malformed or unexpected stanza: counted and logged (rate-limited).
    fn bad_stanza(&self, from: &str, what: &str) {
        Metrics::add(&self.shared.metrics.bad_stanzas, 1);
        self.log_bad(from, what);
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

    fn lock_penalties(&self) -> std::sync::MutexGuard<'_, Penalties> {
        self.penalties.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Answer with an error. One the sender caused (anything but "retry later") is a strike
    /// against it.
    fn reply_error(&self, from: &str, id: String, p: Problem) {
        if !p.code.is_transient() {
            let sender = copilot_protocol::signing::bare_jid(from);
            if let Some(cooldown) = self.lock_penalties().strike(sender, Instant::now()) {
                Metrics::add(&self.shared.metrics.agents_cooled_down, 1);
                warn!(
                    %sender,
                    "too many refused requests: its work requests get 'retry after {}s' for now",
                    cooldown.as_secs()
                );
            }
        }
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
        if !self.shared.config.agents.admits(&from) {
            let why = format!(
                "{from} is not on an agents' domain ({})",
                self.shared.config.agents.domains.join(", ")
            );
            self.bad_stanza(&from, &why);
            return self.reply_error(&from, id, problem(ErrorCode::NotAuthorized, why));
        }
        let payload = match Payload::from_element(&el) {
            Ok(p) => p,
            Err(e) => {
                self.bad_stanza(&from, &e.to_string());
                return self.reply_error(&from, id, problem(e.code(), e.to_string()));
            }
        };
        match (kind, payload) {
            (IqKind::Get, Payload::Request(req)) => self.on_work_request(from, id, req).await,
            (IqKind::Set, Payload::Done(report)) => self.on_done(from, id, *report).await,
            (_, other) => {
                let e = WireError::Invalid {
                    element: "iq",
                    reason: format!("not a request an agent may send: {other:?}")
                        .chars()
                        .take(200)
                        .collect(),
                };
                self.bad_stanza(&from, &e.to_string());
                self.reply_error(&from, id, problem(e.code(), e.to_string()));
            }
        }
    }

    /// Where and with what the attempt uploads: its Chirp slot if it has one, else the storage
    /// service with the claim's token.
    fn upload_target(&self, c: &Claim, slot: Option<Slot>) -> (String, String) {
        let base = self.shared.config.http.public_url.trim_end_matches('/');
        let http = || {
            (
                format!("{base}/outputs/{}/{}", c.job, c.attempt),
                c.upload_token.clone(),
            )
        };
        let Some(slot) = slot else {
            return http();
        };
        match self
            .shared
            .queue
            .set_upload_url(c.job, c.attempt, &slot.url)
        {
            Ok(()) => (slot.url, slot.ticket_pem),
            Err(e) => {
                warn!(job = c.job, "cannot record the Chirp upload URL: {e}");
                http()
            }
        }
    }

    fn assignment(&self, c: Claim, slot: Option<Slot>) -> Assignment {
        let cfg = &self.shared.config;
        let base = cfg.http.public_url.trim_end_matches('/');
        let (upload_url, upload_token) = self.upload_target(&c, slot);
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
            network: c.spec.network,
            upload_url,
            upload_token,
            seal: None,
        }
    }

    /// Sign `a` for the agent `agent` at the address `from`, valid for `jobs.assignment_ttl`
    /// (unsigned without a signing key).
    fn seal(&self, a: &mut Assignment, agent: &str, from: &str) {
        let cfg = &self.shared.config;
        let Some(key) = &cfg.signing_key else {
            return;
        };
        let jid = copilot_protocol::signing::bare_jid(from);
        key.seal(a, agent, jid, now_secs() + cfg.jobs.assignment_ttl.0);
    }

    /// Claim a job for `agent` (computing for BOINC user `boinc_user`, when known) at the
    /// address `from`, or say when to come back. With a Chirp output store, a job is handed
    /// out only with an upload slot (the pool wakes held requests when one is ready).
    fn next_for(
        &self,
        agent: &str,
        boinc_user: Option<u64>,
        from: &str,
    ) -> Result<Next, QueueError> {
        let cfg = &self.shared.config.jobs;
        let no_work = NoWork {
            retry_after_secs: cfg.retry_after.0.max(1) as u32,
        };
        let slot = match &self.shared.outputs {
            None => None,
            Some(outputs) => match outputs.take() {
                Some(slot) => Some(slot),
                None => {
                    debug!(agent, "no Chirp upload slot ready yet");
                    return Ok(Next::NoWork(no_work));
                }
            },
        };
        let claimed = self.shared.queue.claim(
            agent,
            boinc_user,
            cfg.lease.as_duration(),
            cfg.upload_token_ttl.as_duration(),
        );
        match claimed {
            Ok(Some(claim)) => {
                info!(job = claim.job, attempt = claim.attempt, agent, "assigned");
                Metrics::add(&self.shared.metrics.assignments, 1);
                self.shared.fleet.started(agent, claim.job);
                let mut a = self.assignment(claim, slot);
                self.seal(&mut a, agent, from);
                Ok(Next::Assign(Box::new(a)))
            }
            other => {
                if let (Some(outputs), Some(slot)) = (&self.shared.outputs, slot) {
                    outputs.give_back(slot);
                }
                other.map(|_| Next::NoWork(no_work))
            }
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

    /// For an agent on an anonymous domain: its token must prove the name it asks under, with
    /// the manager's own key; then the name is bound to this login.
    fn check_token(&self, from: &str, req: &WorkRequest) -> Result<(), Problem> {
        if !self.shared.config.agents.is_anonymous(from) {
            return Ok(());
        }
        let refuse = |why: String| {
            self.log_bad(from, &why);
            problem(ErrorCode::NotAuthorized, why)
        };
        let Some(key) = &self.shared.config.signing_key else {
            return Err(refuse(
                "anonymous agents are not accepted: no signing key".into(),
            ));
        };
        let text = req.token.as_deref().ok_or_else(|| {
            refuse("an agent that logged in anonymously must send its token".into())
        })?;
        copilot_protocol::identity::AgentToken::decode(text)
            .and_then(|t| t.verify(&key.public_key(), &req.agent, now_secs()))
            .map_err(|e| refuse(format!("agent token refused: {e}")))?;
        self.shared.fleet.adopt(&req.agent, from);
        Ok(())
    }

    async fn on_work_request(self: Arc<Self>, from: String, id: String, req: WorkRequest) {
        if let Err(p) = self.check_token(&from, &req) {
            return self.reply_error(&from, id, p);
        }
        if let Err(p) = self.register(&req.agent, &from, Some(&req.version)) {
            return self.reply_error(&from, id, p);
        }
        let sender = copilot_protocol::signing::bare_jid(&from);
        let cooling = self.lock_penalties().request(sender, Instant::now());
        if let Some(wait) = cooling {
            // Rounded up: never "retry after 0 s" while still cooling down.
            let secs = u32::try_from(wait.as_secs() + 1).unwrap_or(u32::MAX);
            debug!(%from, secs, "cooling down: retry after");
            return self.reply(
                &from,
                id,
                Payload::NoWork(NoWork {
                    retry_after_secs: secs,
                }),
            );
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
            match self.next_for(&req.agent, req.boinc_user, &from) {
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
            let _held = self.shared.metrics.hold();
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

    /// For an attempt that uploaded to the Chirp output store: reads the archive back and
    /// records it if it is what the report says. Otherwise nothing is recorded, and the report
    /// then fails its archive check (the job is retried).
    async fn check_chirp_archive(&self, report: &DoneReport) {
        let (Some(outputs), Some((sha256, size))) = (&self.shared.outputs, report.archive) else {
            return;
        };
        let (job, attempt) = (report.job, report.attempt);
        let url = match self.shared.queue.upload_url_of(job, attempt) {
            Ok(Some(url)) => url,
            Ok(None) => return,
            Err(e) => return warn!(job, "cannot look up the upload URL: {e}"),
        };
        let stored = copilot_protocol::api::Stored { sha256, size };
        match outputs.verify(&url, stored).await {
            Ok(()) => match self
                .shared
                .queue
                .record_archive_at(job, attempt, stored, Some(&url))
            {
                Ok(()) => {
                    Metrics::add(&self.shared.metrics.output_bytes_stored, size);
                    info!(job, attempt, %url, "output archive verified in Chirp");
                }
                Err(e) => warn!(job, attempt, "cannot record the Chirp archive: {e}"),
            },
            Err(e) => warn!(job, attempt, %url, "the uploaded archive is not accepted: {e}"),
        }
    }

    async fn on_done(&self, from: String, id: String, report: DoneReport) {
        if let Err(p) = self.register(&report.agent, &from, None) {
            return self.reply_error(&from, id, p);
        }
        self.check_chirp_archive(&report).await;
        let agent = report.agent.clone();
        if let Outcome::Refused(why) = report.outcome {
            // A wrong trust key or clock on that agent, or something forging assignments.
            self.log_bad(
                &from,
                &format!(
                    "{agent} refused job {} attempt {}: {}",
                    report.job,
                    report.attempt,
                    why.describe()
                ),
            );
        }
        let duplicate = match self.shared.queue.complete(&agent, &report) {
            Ok(Completion::Recorded(state)) => {
                self.shared.metrics.recorded(&report);
                info!(job = report.job, attempt = report.attempt, %agent, %state, outcome = %report.outcome.describe(), "reported");
                self.shared
                    .fleet
                    .finished(&agent, report.job, state == JobState::Done);
                self.shared.fleet.sandbox(&agent, &report.sandbox);
                self.shared
                    .fleet
                    .volunteer(&agent, report.volunteer.as_ref());
                match state {
                    JobState::Queued => self.shared.work_available.notify_waiters(),
                    JobState::Done => self.shared.replica_done.notify_one(),
                    _ => {}
                }
                false
            }
            Ok(Completion::Duplicate) => {
                Metrics::add(&self.shared.metrics.reports_duplicate, 1);
                true
            }
            Err(e) => {
                self.shared.metrics.reports_refused.inc(match &e {
                    QueueError::StaleLease { .. } => "stale_lease",
                    QueueError::UnknownJob(_) => "unknown_job",
                    _ => "error",
                });
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
            match self.next_for(&agent, report.volunteer.as_ref().map(|v| v.user_id), &from) {
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
        Metrics::add(&self.shared.metrics.agent_releases, 1);
        match self
            .shared
            .queue
            .release_agent(&agent, "agent went offline")
        {
            Ok(jobs) => {
                Metrics::add(&self.shared.metrics.jobs_released, jobs.len() as u64);
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
                Metrics::add(&shared.metrics.lease_expiries, jobs.len() as u64);
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::Ordering;

    use copilot_protocol::api::CONTENT_SHA256_HEADER;
    use copilot_protocol::sandbox::{Protection, SandboxReport};
    use copilot_protocol::wire::{Outcome, Timings, NS};
    use copilot_protocol::{JobId, Sha256};
    use copilot_xmpp::XmppConfig;
    use reqwest::{Method, StatusCode};

    use super::*;
    use crate::http::tests::{spec, Server};
    use crate::metrics::tests::{key, parse_strict};

    const HOUR: Duration = Duration::from_secs(3600);

    /// A dispatcher whose XMPP connection never gets online (nothing listens on port 1): what
    /// it sends is dropped, which these tests do not need.
    fn dispatcher(s: &Server) -> (Arc<Dispatcher>, Connection) {
        let conn = Connection::start(XmppConfig {
            jid: "m@localhost/manager".into(),
            password: "pw".into(),
            server: "127.0.0.1:1".into(),
            security: copilot_xmpp::Security::InsecureLoopback {
                plaintext_host: None,
            },
        })
        .unwrap();
        (Dispatcher::new(s.shared.clone(), conn.sender()), conn)
    }

    async fn scrape(s: &Server) -> BTreeMap<String, f64> {
        // No token: Prometheus scrapes without one.
        let r = s
            .http
            .get(format!("{}/metrics", s.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            r.headers()["content-type"],
            "text/plain; version=0.0.4; charset=utf-8"
        );
        parse_strict(&r.text().await.unwrap())
    }

    fn at(m: &BTreeMap<String, f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
        *m.get(&key(name, labels))
            .unwrap_or_else(|| panic!("no sample {}", key(name, labels)))
    }

    fn jobs(m: &BTreeMap<String, f64>, state: &str) -> f64 {
        at(m, "copilot_jobs", &[("state", state)])
    }

    /// Register `agent` (as `agent@localhost/r`) and assign it a job; returns the job, its
    /// attempt and its upload token.
    fn assign(d: &Dispatcher, agent: &str) -> (JobId, u32, String) {
        let from = format!("{agent}@localhost/r");
        d.register(agent, &from, Some("0.1.0")).unwrap();
        match d.next_for(agent, None, &from).unwrap() {
            Next::Assign(a) => (a.job, a.attempt, a.upload_token),
            Next::NoWork(_) => panic!("no job for {agent}"),
        }
    }

    fn report(agent: &str, job: JobId, attempt: u32, archive: Option<(Sha256, u64)>) -> DoneReport {
        DoneReport {
            agent: agent.into(),
            job,
            attempt,
            outcome: Outcome::Exited { code: 0 },
            timings: Timings::default(),
            archive,
            files: vec![],
            sandbox: Default::default(),
            volunteer: None,
            want_more: false,
        }
    }

    async fn wait_for(what: &str, cond: impl Fn() -> bool) {
        for _ in 0..500 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for {what}");
    }

    #[tokio::test]
    async fn metrics_count_what_happened() {
        let s = Server::start().await;
        let (d, _conn) = dispatcher(&s);
        let metrics = &s.shared.metrics;
        let m = scrape(&s).await;
        assert_eq!(at(&m, "copilot_jobs_submitted_total", &[]), 0.0);
        assert_eq!(jobs(&m, "queued"), 0.0);

        // Inputs: one stored, one with the wrong digest, one without a token.
        s.put_input(b"data").await;
        let r = s
            .req(Method::PUT, &format!("/inputs/{}", Sha256::of(b"other")))
            .body("not other")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let r = s
            .http
            .put(format!("{}/inputs/{}", s.base, Sha256::of(b"x")))
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

        // Stage-in: the input read back.
        let r = s.get(&format!("/inputs/{}", Sha256::of(b"data"))).await;
        assert_eq!(r.bytes().await.unwrap().len(), 4);

        // Three jobs submitted, one assigned.
        let r = s.submit(vec![spec(), spec(), spec()]).await;
        assert_eq!(r.status(), StatusCode::CREATED);
        let (job, attempt, token) = assign(&d, "vm-1");
        let m = scrape(&s).await;
        assert_eq!(at(&m, "copilot_jobs_submitted_total", &[]), 3.0);
        assert_eq!(jobs(&m, "queued"), 2.0);
        assert_eq!(jobs(&m, "assigned"), 1.0);
        assert_eq!(at(&m, "copilot_assignments_total", &[]), 1.0);
        assert_eq!(at(&m, "copilot_agents_online", &[]), 1.0);
        assert_eq!(at(&m, "copilot_input_bytes_stored_total", &[]), 4.0);
        assert_eq!(at(&m, "copilot_input_bytes_served_total", &[]), 4.0);
        let refused = |m: &BTreeMap<String, f64>, kind, reason| {
            at(
                m,
                "copilot_upload_refusals_total",
                &[("kind", kind), ("reason", reason)],
            )
        };
        assert_eq!(refused(&m, "input", "digest_mismatch"), 1.0);
        assert_eq!(refused(&m, "input", "unauthenticated"), 1.0);
        assert_eq!(refused(&m, "input", "too_large"), 0.0);

        // Its output: once with a wrong token, then stored; reported done, twice, then reports
        // for an attempt without a lease and for an unknown job.
        let body: &'static [u8] = b"pretend tar.gz";
        let upload = |token: &str| {
            s.http
                .put(format!("{}/outputs/{job}/{attempt}", s.base))
                .bearer_auth(token)
                .header(CONTENT_SHA256_HEADER, Sha256::of(body).to_string())
                .body(body)
                .send()
        };
        assert_eq!(
            upload(&"0".repeat(64)).await.unwrap().status(),
            StatusCode::FORBIDDEN
        );
        assert_eq!(upload(&token).await.unwrap().status(), StatusCode::CREATED);
        let from = "vm-1@localhost/r".to_owned();
        let mut done = report("vm-1", job, attempt, Some((Sha256::of(body), 14)));
        done.timings = Timings {
            stage_in_ms: 20,
            run_ms: 1500,
            stage_out_ms: 40,
            cpu_ms: None,
        };
        done.sandbox = SandboxReport {
            active: [Protection::Session].into(),
            missing: [Protection::Uid].into(),
        };
        d.on_done(from.clone(), "r1".into(), done.clone()).await;
        d.on_done(from.clone(), "r2".into(), done).await;
        d.on_done(from.clone(), "r3".into(), report("vm-1", job, 7, None))
            .await;
        d.on_done(from.clone(), "r4".into(), report("vm-1", 999, 1, None))
            .await;

        // A malformed message and a request an agent may not send.
        d.clone().handle(Incoming::Message {
            from: from.clone(),
            payloads: vec![Element::builder("bogus", NS).build()],
        });
        d.clone()
            .on_request(
                from.clone(),
                "r5".into(),
                IqKind::Get,
                Payload::NoWork(NoWork {
                    retry_after_secs: 1,
                })
                .to_element(),
            )
            .await;

        // vm-2 goes offline holding a job; a lease taken past the dispatcher runs out.
        assign(&d, "vm-2");
        d.on_presence("vm-2@localhost/r", false);
        s.shared
            .queue
            .claim("vm-3", None, Duration::ZERO, HOUR)
            .unwrap()
            .unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let sweeper = tokio::spawn(sweep_leases(
            s.shared.clone(),
            Duration::from_millis(10),
            stopped,
        ));
        let expiries = || metrics.lease_expiries.load(Ordering::Relaxed);
        wait_for("the lease to expire", || expiries() == 1).await;
        stop.send(()).unwrap();
        sweeper.await.unwrap();

        let m = scrape(&s).await;
        assert_eq!(at(&m, "copilot_output_bytes_stored_total", &[]), 14.0);
        assert_eq!(refused(&m, "output", "forbidden"), 1.0);
        let recorded = |outcome| {
            at(
                &m,
                "copilot_reports_recorded_total",
                &[("outcome", outcome)],
            )
        };
        assert_eq!(recorded("succeeded"), 1.0);
        assert_eq!(recorded("exited_nonzero"), 0.0);
        // Its phases, as the agent measured them, and its sandbox.
        let bucket = |name: &str, le| at(&m, &format!("{name}_bucket"), &[("le", le)]);
        assert_eq!(bucket("copilot_run_seconds", "1"), 0.0);
        assert_eq!(bucket("copilot_run_seconds", "5"), 1.0);
        assert_eq!(bucket("copilot_run_seconds", "+Inf"), 1.0);
        assert_eq!(at(&m, "copilot_run_seconds_sum", &[]), 1.5);
        assert_eq!(at(&m, "copilot_run_seconds_count", &[]), 1.0);
        assert_eq!(bucket("copilot_stage_in_seconds", "0.01"), 0.0);
        assert_eq!(bucket("copilot_stage_in_seconds", "0.05"), 1.0);
        assert_eq!(at(&m, "copilot_stage_out_seconds_sum", &[]), 0.04);
        let sandbox = |p, status| {
            at(
                &m,
                "copilot_sandbox_reports_total",
                &[("protection", p), ("status", status)],
            )
        };
        assert_eq!(sandbox("session", "active"), 1.0);
        assert_eq!(sandbox("uid", "missing"), 1.0);
        assert_eq!(
            (sandbox("uid", "active"), sandbox("netns", "missing")),
            (0.0, 0.0)
        );
        assert_eq!(at(&m, "copilot_reports_duplicate_total", &[]), 1.0);
        let refused_reports =
            |reason| at(&m, "copilot_reports_refused_total", &[("reason", reason)]);
        assert_eq!(refused_reports("stale_lease"), 1.0);
        assert_eq!(refused_reports("unknown_job"), 1.0);
        assert_eq!(refused_reports("error"), 0.0);
        assert_eq!(at(&m, "copilot_bad_stanzas_total", &[]), 2.0);
        assert_eq!(at(&m, "copilot_agent_releases_total", &[]), 1.0);
        assert_eq!(at(&m, "copilot_jobs_released_total", &[]), 1.0);
        assert_eq!(at(&m, "copilot_lease_expiries_total", &[]), 1.0);
        assert_eq!(at(&m, "copilot_agents_online", &[]), 1.0);
        assert_eq!(jobs(&m, "done"), 1.0);
        assert_eq!(jobs(&m, "queued"), 2.0);
        assert_eq!(at(&m, "copilot_assignments_total", &[]), 2.0);

        // A request held while the queue is empty, answered by the next submit.
        assign(&d, "vm-4");
        assign(&d, "vm-4");
        let held = tokio::spawn(d.clone().on_work_request(
            "vm-4@localhost/r".into(),
            "r6".into(),
            WorkRequest {
                token: None,
                agent: "vm-4".into(),
                version: "0.1.0".into(),
                wait_secs: 30,
                boinc_user: None,
            },
        ));
        let held_now = || metrics.held_requests.load(Ordering::Relaxed);
        wait_for("the request to be held", || held_now() == 1).await;
        let m = scrape(&s).await;
        assert_eq!(at(&m, "copilot_held_work_requests", &[]), 1.0);
        assert_eq!(s.submit(vec![spec()]).await.status(), StatusCode::CREATED);
        tokio::time::timeout(Duration::from_secs(5), held)
            .await
            .unwrap()
            .unwrap();
        let m = scrape(&s).await;
        assert_eq!(at(&m, "copilot_held_work_requests", &[]), 0.0);
        assert_eq!(at(&m, "copilot_jobs_submitted_total", &[]), 4.0);
        assert_eq!(at(&m, "copilot_assignments_total", &[]), 5.0);
        assert_eq!(jobs(&m, "assigned"), 3.0);
        assert_eq!(jobs(&m, "queued"), 0.0);
        assert_eq!(at(&m, "copilot_agents_online", &[]), 2.0);

        // HTTP requests by route and status class; this scrape is not counted yet.
        let http = |route, status| {
            at(
                &m,
                "copilot_http_requests_total",
                &[("route", route), ("status", status)],
            )
        };
        assert_eq!(http("inputs", "2xx"), 2.0);
        assert_eq!(http("inputs", "4xx"), 2.0);
        assert_eq!(http("outputs", "2xx"), 1.0);
        assert_eq!(http("outputs", "4xx"), 1.0);
        assert_eq!(http("jobs", "2xx"), 2.0);
        assert_eq!(http("metrics", "2xx"), 4.0);
        assert!(!m.contains_key(&key(
            "copilot_http_requests_total",
            &[("route", "other"), ("status", "4xx")]
        )));
        let r = s.get("/nothing/here").await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        let m = scrape(&s).await;
        assert_eq!(
            at(
                &m,
                "copilot_http_requests_total",
                &[("route", "other"), ("status", "4xx")]
            ),
            1.0
        );
    }
}
