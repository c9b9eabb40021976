//! The agent's XMPP session: log in, announce itself to the manager with directed presence (so
//! the manager learns when it goes offline), then run `slots` workers that each ask for a job,
//! execute it, report it and ask again. Requests and reports are retried with exponential
//! backoff and jitter; a report is the same bytes every time, so the manager deduplicates it.
//! Nothing a job does can end the session: a panicking worker is restarted.
//!
//! Every assignment passes the [`Gate`] before anything of it is staged or run: one that is
//! unsigned, badly signed, for another agent, expired or replayed is reported to the manager
//! as refused (outcome `refused`, with the reason), logged (rate-limited: whoever can forge
//! stanzas can provoke it), and the worker asks again after a growing pause.
//!
//! Draining (at the config's `drain_at`, or when `run`'s `drain` future resolves, which `main`
//! ties to SIGUSR1): workers ask for no new job, finish and report the one they run (asking for
//! no next one), and the session ends once all are idle. A job that was being assigned just then
//! is released when the agent goes offline, and the manager requeues it.
//!
//! The session ends (and [`run`] returns `Ok`) when `shutdown` resolves or, with
//! `idle_timeout` set, once no slot has held a job for that long: the agent's exit status 0
//! then means "session over", which the VM image answers by powering off.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use copilot_protocol::signing::{bare_jid, Recipient};
use copilot_protocol::wire::{
    Assignment, DoneReport, ErrorCode, Next, Outcome, Payload, Phase, Progress, Refusal,
    WorkRequest,
};
use copilot_xmpp::{Connection, Incoming, IqKind, LogLimiter, Sender, XmppConfig, XmppError};
use rand::Rng;
use tracing::{debug, error, info, warn};

use crate::config::AgentConfig;
use crate::executor::Executor;
use crate::status::Board;
use crate::trust::Gate;

/// How long the manager may hold a work request while its queue is empty.
const HOLD_SECS: u32 = 20;
/// Extra time on top of the hold before a request counts as unanswered.
const ANSWER_SLACK: Duration = Duration::from_secs(15);
/// Backoff bounds for retries after errors.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// Why the session could not start. Wrapped errors are sources, not part of the message, so
/// a report of the whole chain (`{:#}`) says each cause once.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("XMPP")]
    Xmpp(#[from] XmppError),
    #[error("cannot prepare job execution")]
    Executor(#[from] crate::executor::ExecError),
    #[error("XMPP security settings: {0}")]
    Security(String),
    #[error("the XMPP connection ended unexpectedly")]
    ConnectionEnded,
    #[error("cannot serve the status page on {addr} (status.listen): {source}; pick a free port")]
    Status {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Exponential backoff with full jitter.
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Self { next: BACKOFF_MIN }
    }

    fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }

    async fn wait(&mut self) {
        let max = self.next.as_millis() as u64;
        let ms = rand::thread_rng().gen_range(max / 2..=max);
        self.next = (self.next * 2).min(BACKOFF_MAX);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

/// One agent's link to its manager.
#[derive(Debug)]
struct Link {
    xmpp: Sender,
    manager: String,
    agent: String,
    /// Bumped whenever the manager's session ends (the server sends us its unavailable
    /// presence): questions in flight to it will never be answered.
    manager_gone: tokio::sync::watch::Sender<u64>,
    /// Whom the agent computes for, carried in every done report.
    volunteer: Option<copilot_protocol::wire::Volunteer>,
    /// What the local status page shows.
    board: Arc<Board>,
    /// Which assignments may be acted on.
    gate: Gate,
    /// The agent's identity token, for its work requests.
    token: Option<String>,
    /// This agent's bare JID as the server bound it: assignments are signed for it.
    jid: Mutex<String>,
    /// Refused assignments are logged at most this often.
    refusal_log: Mutex<LogLimiter>,
}

impl Link {
    /// Whether this agent may act on `job` now.
    fn admit(&self, job: &Assignment) -> Result<(), Refusal> {
        let jid = self.jid.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let me = Recipient {
            agent: &self.agent,
            jid: &jid,
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.gate.admit(job, &me, now)
    }

    /// Log a refused assignment (rate-limited) and tell the manager, without asking for more.
    async fn refuse(&self, job: &Assignment, why: Refusal) {
        {
            let mut log = self.refusal_log.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(suppressed) = log.check(std::time::Instant::now()) {
                if suppressed > 0 {
                    warn!("{suppressed} more refused assignments were not logged");
                }
                warn!(
                    job = job.job,
                    attempt = job.attempt,
                    reason = why.as_str(),
                    "assignment refused, nothing of it staged or run: {}",
                    why.describe()
                );
            }
        }
        let report = DoneReport {
            agent: self.agent.clone(),
            job: job.job,
            attempt: job.attempt,
            outcome: Outcome::Refused(why),
            timings: Default::default(),
            archive: None,
            files: Vec::new(),
            sandbox: Default::default(),
            volunteer: self.volunteer.clone(),
            want_more: false,
        };
        self.report(&report).await;
    }

    async fn ask(
        &self,
        kind: IqKind,
        payload: Payload,
        wait: Duration,
    ) -> Result<Payload, XmppError> {
        let mut gone = self.manager_gone.subscribe();
        let request = self
            .xmpp
            .request(&self.manager, kind, payload.to_element(), wait);
        let answer = tokio::select! {
            answer = request => answer?,
            _ = gone.changed() => return Err(XmppError::Closed),
        };
        let el = answer.ok_or_else(|| XmppError::Remote {
            condition: "empty-answer".into(),
            problem: None,
        })?;
        Payload::from_element(&el).map_err(|e| XmppError::Remote {
            condition: format!("malformed answer: {e}"),
            problem: None,
        })
    }

    /// Ask for work until the manager has some (it holds the request while its queue is empty).
    async fn request_work(&self) -> Assignment {
        let mut backoff = Backoff::new();
        loop {
            let req = Payload::Request(WorkRequest {
                agent: self.agent.clone(),
                version: env!("CARGO_PKG_VERSION").into(),
                wait_secs: HOLD_SECS,
                token: self.token.clone(),
                boinc_user: self.volunteer.as_ref().map(|v| v.user_id),
            });
            let wait = Duration::from_secs(HOLD_SECS.into()) + ANSWER_SLACK;
            match self.ask(IqKind::Get, req, wait).await {
                Ok(Payload::Assign(a)) => return *a,
                Ok(Payload::NoWork(n)) => {
                    backoff.reset();
                    debug!(retry_after = n.retry_after_secs, "no work");
                    let jitter = rand::thread_rng().gen_range(0..=250);
                    tokio::time::sleep(
                        Duration::from_secs(n.retry_after_secs.into())
                            + Duration::from_millis(jitter),
                    )
                    .await;
                }
                Ok(other) => {
                    warn!("unexpected answer to a work request: {other:?}");
                    backoff.wait().await;
                }
                Err(e) => {
                    warn!("work request failed: {e}");
                    backoff.wait().await;
                }
            }
        }
    }

    /// Report a finished attempt until the manager acknowledges or refuses it for good.
    async fn report(&self, report: &DoneReport) -> Option<Next> {
        let mut backoff = Backoff::new();
        loop {
            let wait = ANSWER_SLACK;
            match self
                .ask(IqKind::Set, Payload::Done(Box::new(report.clone())), wait)
                .await
            {
                Ok(Payload::Ack(ack)) if ack.job == report.job && ack.attempt == report.attempt => {
                    if ack.duplicate {
                        info!(job = report.job, "report had been recorded before");
                    }
                    return ack.next;
                }
                Ok(other) => warn!("unexpected answer to a report: {other:?}"),
                Err(XmppError::Remote {
                    problem: Some(p), ..
                }) if !p.code.is_transient() => {
                    if p.code == ErrorCode::StaleLease {
                        warn!(
                            job = report.job,
                            attempt = report.attempt,
                            "report refused: the job was given to another agent"
                        );
                    } else {
                        error!(
                            job = report.job,
                            "report refused: {} {}",
                            p.code.as_str(),
                            p.text
                        );
                    }
                    return None;
                }
                Err(e) => warn!(job = report.job, "report failed, will retry: {e}"),
            }
            backoff.wait().await;
        }
    }

    fn progress(&self, job: &Assignment, phase: Phase) {
        let p = Payload::Progress(Progress {
            agent: self.agent.clone(),
            job: job.job,
            attempt: job.attempt,
            phase,
        });
        if let Err(e) = self.xmpp.message(&self.manager, p.to_element()) {
            debug!("cannot send progress: {e}");
        }
    }
}

fn phase_code(p: Phase) -> u8 {
    match p {
        Phase::Staging => 0,
        Phase::Running => 1,
        Phase::Uploading => 2,
    }
}

fn phase_of(code: u8) -> Phase {
    match code {
        0 => Phase::Staging,
        1 => Phase::Running,
        _ => Phase::Uploading,
    }
}

/// Run one assignment in `slot`, renewing its lease while it runs, and return the report.
async fn run_job(link: &Link, executor: &Executor, job: &Assignment, slot: usize) -> DoneReport {
    info!(job = job.job, attempt = job.attempt, name = %job.name, "starting");
    link.board.started(slot, job);
    let phase = AtomicU8::new(phase_code(Phase::Staging));
    let on_phase = |p: Phase| {
        phase.store(phase_code(p), Ordering::Relaxed);
        link.board.phase(slot, p);
        // The start of the run is the one phase change the manager hears of right away; the
        // upload is seen by the storage service itself.
        if p == Phase::Running {
            link.progress(job, p);
        }
    };
    let renew_every = Duration::from_secs(u64::from(job.lease_secs.max(3)) / 3);
    let heartbeat = async {
        loop {
            tokio::time::sleep(renew_every).await;
            link.progress(job, phase_of(phase.load(Ordering::Relaxed)));
        }
    };
    tokio::select! {
        report = executor.execute(job, on_phase) => report,
        () = heartbeat => unreachable!("the heartbeat loop never ends"),
    }
}

/// CPU milliseconds (user + system) of the payloads reaped since the last call: the agent
/// reaps every payload process (it is their subreaper), so over all reports this adds up to
/// exactly the payloads' CPU time; with one slot, each report gets its own job's.
fn payload_cpu_ms_since_last_report() -> Option<u64> {
    use nix::sys::resource::{getrusage, UsageWho};
    static CLAIMED_US: Mutex<u64> = Mutex::new(0);
    let usage = getrusage(UsageWho::RUSAGE_CHILDREN).ok()?;
    let us = |t: nix::sys::time::TimeVal| {
        (t.tv_sec().max(0) as u64) * 1_000_000 + t.tv_usec().max(0) as u64
    };
    let total = us(usage.user_time()) + us(usage.system_time());
    // Plain data behind the lock: a poisoned lock is still consistent.
    let mut claimed = CLAIMED_US.lock().unwrap_or_else(|p| p.into_inner());
    let delta = total.saturating_sub(*claimed);
    *claimed = total.max(*claimed);
    Some(delta / 1000)
}

/// The number of slots holding a job, watched for the idle timeout.
type BusySlots = Arc<tokio::sync::watch::Sender<usize>>;

/// Counts one slot as busy while it lives (also through a panic).
#[derive(Debug)]
struct Busy(BusySlots);

impl Busy {
    fn new(slots: &BusySlots) -> Busy {
        slots.send_modify(|n| *n += 1);
        Busy(slots.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Resolves once no slot has been busy for `limit` in a row.
async fn idle_for(mut busy: tokio::sync::watch::Receiver<usize>, limit: Duration) {
    loop {
        let idle = *busy.borrow_and_update() == 0;
        if idle {
            if tokio::time::timeout(limit, busy.changed()).await.is_err() {
                return;
            }
        } else if busy.changed().await.is_err() {
            // The count can no longer change: the slots are gone, and so is the work.
            return;
        }
    }
}

/// A worker: ask for a job, run it, report it, until draining. Returns only once draining.
async fn worker(
    link: Arc<Link>,
    executor: Arc<Executor>,
    slot: usize,
    busy_slots: BusySlots,
    mut draining: tokio::sync::watch::Receiver<bool>,
) {
    let mut next: Option<Assignment> = None;
    // Grows with each refused assignment in a row: a manager with the wrong key, or a forger,
    // is not answered at full speed.
    let mut refusals = Backoff::new();
    loop {
        let job = match next.take() {
            Some(j) => j,
            None => {
                if *draining.borrow() {
                    return;
                }
                tokio::select! {
                    job = link.request_work() => job,
                    _ = draining.wait_for(|d| *d) => return,
                }
            }
        };
        if let Err(why) = link.admit(&job) {
            link.refuse(&job, why).await;
            refusals.wait().await;
            continue;
        }
        refusals.reset();
        // No await between the assignment and this: the slot never looks idle with a job.
        let busy = Busy::new(&busy_slots);
        let mut report = run_job(&link, &executor, &job, slot).await;
        info!(job = job.job, outcome = %report.outcome.describe(), "finished");
        link.board.finished(slot, &job.name, &report);
        report.want_more = !*draining.borrow();
        report.timings.cpu_ms = payload_cpu_ms_since_last_report();
        report.volunteer = link.volunteer.clone();
        if let Some(Next::Assign(a)) = link.report(&report).await {
            next = Some(*a);
        }
        drop(busy);
    }
}

/// Resolves at unix time `at` (seconds); never without one.
async fn drain_time(at: Option<u64>) {
    let Some(at) = at else {
        return std::future::pending().await;
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    tokio::time::sleep(Duration::from_secs(at.saturating_sub(now))).await;
}

/// Log in, then serve jobs until `shutdown` resolves, the agent has been idle for its
/// `idle_timeout`, or the session has drained (from the config's `drain_at`, or once `drain`
/// resolves). Fails if the first login does not succeed within `login_timeout`; later
/// disconnects are survived.
pub async fn run(
    config: AgentConfig,
    login_timeout: Duration,
    shutdown: impl std::future::Future,
    drain: impl std::future::Future,
) -> Result<(), SessionError> {
    let executor = Arc::new(Executor::new(&config)?);
    let mut conn = Connection::start(XmppConfig {
        jid: config.xmpp.jid.clone(),
        password: config.xmpp.password.clone(),
        server: config.xmpp.server.clone(),
        security: config
            .xmpp
            .security()
            .map_err(|e| SessionError::Security(e.to_string()))?,
    })?;
    let slots = config.slots.max(1) as usize;
    let board = Board::new(&config.name, &config.xmpp.manager, slots);
    let status_page = match config.status.listen {
        None => None,
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| SessionError::Status { addr, source })?;
            let bound = listener.local_addr().unwrap_or(addr);
            info!("status page on http://{bound}/");
            let page = crate::status::serve(listener, board.clone(), std::future::pending());
            Some(tokio::spawn(page))
        }
    };
    let jid = conn.wait_online(login_timeout).await?;
    info!(%jid, agent = %config.name, manager = %config.xmpp.manager, "online");
    board.link("online");
    let link = Arc::new(Link {
        xmpp: conn.sender(),
        manager: copilot_protocol::wire::manager_address(&config.xmpp.manager),
        agent: config.name.clone(),
        manager_gone: tokio::sync::watch::Sender::new(0),
        volunteer: config.volunteer.as_ref().map(|v| v.to_wire()),
        board,
        gate: Gate::new(config.trust.manager_key),
        token: config.xmpp.token.clone(),
        jid: Mutex::new(bare_jid(&jid).to_owned()),
        refusal_log: Mutex::new(LogLimiter::new(10, Duration::from_secs(60))),
    });
    if config.trust.manager_key.is_none() {
        warn!("trust.insecure_unsigned_jobs: acting on unsigned assignments (development only)");
    }
    link.xmpp.presence(Some(&link.manager), true)?;

    let draining = tokio::sync::watch::Sender::new(false);
    let busy_slots: BusySlots = Arc::new(tokio::sync::watch::Sender::new(0));
    let mut workers = tokio::task::JoinSet::new();
    let mut slot_of = std::collections::HashMap::new();
    // Starts the worker of `slot` and remembers which slot its task serves.
    let start = |workers: &mut tokio::task::JoinSet<_>,
                 slot_of: &mut std::collections::HashMap<_, _>,
                 slot| {
        let task = workers.spawn(worker(
            link.clone(),
            executor.clone(),
            slot,
            busy_slots.clone(),
            draining.subscribe(),
        ));
        slot_of.insert(task.id(), slot);
    };
    for slot in 0..slots {
        start(&mut workers, &mut slot_of, slot);
    }
    let idle = async {
        match config.idle_timeout {
            Some(limit) => idle_for(busy_slots.subscribe(), limit.as_duration()).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(shutdown);
    let drain_requested = async {
        tokio::select! {
            _ = drain => info!("drain requested"),
            () = drain_time(config.drain_at) => info!("drain time reached"),
        }
    };
    tokio::pin!(drain_requested);
    let mut drain_pending = true;
    tokio::pin!(idle);
    let mut ended = Ok(());
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            () = &mut idle => {
                info!(idle_timeout = ?config.idle_timeout, "no job for the idle timeout: ending the session");
                break;
            }
            () = &mut drain_requested, if drain_pending => {
                drain_pending = false;
                info!("draining: no new jobs; ending once the running ones are reported");
                draining.send_replace(true);
            }
            ev = conn.next() => match ev {
                None => {
                    ended = Err(SessionError::ConnectionEnded);
                    break;
                }
                Some(Incoming::Online { jid }) => {
                    info!(%jid, "online again");
                    *link.jid.lock().unwrap_or_else(|p| p.into_inner()) = bare_jid(&jid).to_owned();
                    link.board.link("online");
                    if let Err(e) = link.xmpp.presence(Some(&link.manager), true) {
                        warn!("cannot send presence: {e}");
                    }
                }
                Some(Incoming::Presence { from, available: false }) if from == link.manager => {
                    info!("the manager went offline; asking again as it comes back");
                    link.board.link("waiting for the manager");
                    link.manager_gone.send_modify(|n| *n += 1);
                }
                Some(Incoming::Request { from, id, payload, .. }) => {
                    // Agents serve no requests but pings (XEP-0199).
                    if payload.is("ping", "urn:xmpp:ping") {
                        let _ = link.xmpp.reply(&from, id, None);
                    } else {
                        let _ = link.xmpp.reply_error(&from, id, copilot_protocol::wire::Problem {
                            code: ErrorCode::NotAuthorized,
                            text: "agents take no requests".into(),
                        });
                    }
                }
                Some(_) => {}
            },
            Some(done) = workers.join_next_with_id() => {
                let id = match &done {
                    Ok((id, ())) => *id,
                    Err(e) => e.id(),
                };
                let slot = slot_of.remove(&id).unwrap_or(0);
                if done.is_ok() && *draining.borrow() {
                    if workers.is_empty() {
                        info!("drained: every job slot is idle");
                        break;
                    }
                    continue;
                }
                // Otherwise a worker only ends by panicking (a bug); keep the slot alive.
                error!(slot, "a job slot stopped ({done:?}); restarting it");
                start(&mut workers, &mut slot_of, slot);
            }
        }
    }
    info!("shutting down");
    if let Some(page) = status_page {
        page.abort();
    }
    workers.shutdown().await;
    conn.shutdown();
    ended
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_millis(50);

    #[tokio::test]
    async fn idle_means_no_busy_slot_for_the_whole_limit() {
        let slots: BusySlots = Arc::new(tokio::sync::watch::Sender::new(0));
        let idle = idle_for(slots.subscribe(), LIMIT);
        tokio::pin!(idle);
        // A busy slot keeps the session going however long it takes.
        let busy = Busy::new(&slots);
        assert_eq!(*slots.borrow(), 1);
        let waited = tokio::time::timeout(LIMIT * 6, &mut idle).await;
        assert!(waited.is_err(), "idle while a slot was busy");
        // Once the slot is free again, the limit runs out.
        drop(busy);
        assert_eq!(*slots.borrow(), 0);
        tokio::time::timeout(Duration::from_secs(10), &mut idle)
            .await
            .expect("idle after the slot was freed");
    }

    #[tokio::test]
    async fn a_slot_that_panics_is_not_counted_busy_any_more() {
        let slots: BusySlots = Arc::new(tokio::sync::watch::Sender::new(0));
        let held = slots.clone();
        let task = tokio::spawn(async move {
            let _busy = Busy::new(&held);
            panic!("a job slot fails");
        });
        assert!(task.await.is_err());
        assert_eq!(*slots.borrow(), 0);
    }
}
