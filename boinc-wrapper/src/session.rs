//! The wrapper's main loop: one BOINC task driving one agent session through a [`Backend`].
//!
//! Every [`TICK`] it takes the client's messages and maps them onto the backend (suspend,
//! resume, quit, abort, network), checks whether the client is gone or the agent has ended,
//! and moves the session along its timeline (run time counted like the client's elapsed time):
//!
//! ```text
//! start ── running ⇄ suspended ── drain (session − drain, or deadline − drain) ── end (session, or deadline)
//!                                  agent takes no new job            agent stopped, jobs it still
//!                                  and ends when idle                runs handed back (requeued)
//! ```
//!
//! Once a second it reports the status (CPU time of the whole session, fraction done =
//! run time / session, monotonic; the backend's pid as `other_pid`); every checkpoint period (the
//! client's, at least the job file's `checkpoint_interval`) it
//! checkpoints the backend, and while the backend is busy (a stop would lose a running job's
//! progress) it tries again every tick until it can: so the client preempts a task in the
//! middle of a job by suspending it, not by quitting it. [`Session::run`] returns how the task ended; `main` turns that into
//! the finish file and the exit code.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::api::client::{Client, Event, Gone};
use crate::api::init_data::InitData;
use crate::api::msg::{AppStatus, Control};
use crate::backend::{Backend, BackendError, Checkpoint, Exit};
use crate::job::JobFile;

/// How often the loop runs.
pub const TICK: Duration = Duration::from_millis(50);
/// How often the status goes to the client.
const REPORT_EVERY: Duration = Duration::from_secs(1);
/// Checkpoint period when the client gives none.
const DEFAULT_CHECKPOINT: Duration = Duration::from_secs(60);
/// Grace for the agent when the client is gone (nobody waits for us).
const GONE_GRACE: Duration = Duration::from_secs(10);

/// How the task ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// The session is over (drained or at its end): report the task as done.
    Finished,
    /// The agent failed: report the task as failed with this message.
    Failed(String),
    /// The client asked us to quit; it will restart the task later.
    Quit,
    /// The client aborted the task; nothing is left running.
    Aborted,
    /// The client disappeared; the agent was stopped.
    ClientGone(Gone),
}

/// Whether the session computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    Running,
    Suspended,
}

/// Run time of the task, counted like the client's elapsed time: earlier runs
/// (`starting_elapsed_time`) plus this run's time while not suspended.
#[derive(Debug)]
struct RunClock {
    before: Duration,
    since: Option<Instant>,
}

impl RunClock {
    fn new(before: Duration, now: Instant) -> Self {
        RunClock {
            before,
            since: Some(now),
        }
    }
    fn elapsed(&self, now: Instant) -> Duration {
        self.before
            + self
                .since
                .map_or(Duration::ZERO, |s| now.saturating_duration_since(s))
    }
    fn pause(&mut self, now: Instant) {
        self.before = self.elapsed(now);
        self.since = None;
    }
    fn go(&mut self, now: Instant) {
        if self.since.is_none() {
            self.since = Some(now);
        }
    }
}

/// Unix seconds now.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The session's timeline, from the job file and init_data.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timeline {
    /// Run time at which the agent drains.
    pub drain_after: Duration,
    /// Run time at which the session ends.
    pub end_after: Duration,
    /// Unix time of the work unit's deadline (0: none).
    pub deadline: f64,
    /// Lead before the deadline at which the agent drains.
    pub drain_lead: Duration,
}

impl Timeline {
    /// From the job file and the client's init data.
    pub fn new(job: &JobFile, init: &InitData) -> Timeline {
        let session = job.session.as_duration();
        Timeline {
            drain_after: session.saturating_sub(job.drain.as_duration()),
            end_after: session,
            deadline: init.computation_deadline,
            drain_lead: job.drain.as_duration(),
        }
    }

    /// Unix seconds at which the agent should drain by the deadline (for its config).
    pub fn drain_at(&self) -> Option<u64> {
        (self.deadline > 0.0)
            .then(|| (self.deadline - self.drain_lead.as_secs_f64()).max(0.0) as u64)
    }

    fn should_drain(&self, elapsed: Duration, wall: f64) -> bool {
        elapsed >= self.drain_after || self.drain_at().is_some_and(|d| wall >= d as f64)
    }

    fn should_end(&self, elapsed: Duration, wall: f64) -> bool {
        elapsed >= self.end_after || (self.deadline > 0.0 && wall >= self.deadline)
    }

    /// Fraction of the session done at `elapsed`, in 0..=1.
    pub fn fraction(&self, elapsed: Duration) -> f64 {
        if self.end_after.is_zero() {
            return 1.0;
        }
        (elapsed.as_secs_f64() / self.end_after.as_secs_f64()).clamp(0.0, 1.0)
    }
}

/// One task's session.
#[derive(Debug)]
pub struct Session<B: Backend> {
    client: Client,
    backend: B,
    timeline: Timeline,
    stop_grace: Duration,
    run: Run,
    draining: bool,
    clock: RunClock,
    /// CPU time of earlier runs of the task.
    cpu_before: f64,
    checkpoint_cpu: f64,
    checkpoint_every: Duration,
    last_checkpoint: Instant,
    last_report: Option<Instant>,
    /// Highest fraction reported, so it never goes back.
    fraction: f64,
    fraction_range: (f64, f64),
    /// Highest CPU time reported, so it never goes back.
    cpu: f64,
}

impl<B: Backend> Session<B> {
    /// A session over a started `backend`.
    pub fn new(client: Client, backend: B, job: &JobFile, init: &InitData, now: Instant) -> Self {
        let checkpoint_every = if init.checkpoint_period >= 1.0 {
            Duration::from_secs_f64(init.checkpoint_period.min(86_400.0))
        } else {
            DEFAULT_CHECKPOINT
        }
        .max(job.min_checkpoint_interval().as_duration());
        let before = Duration::from_secs_f64(init.starting_elapsed_time.min(1e9));
        Session {
            client,
            backend,
            timeline: Timeline::new(job, init),
            stop_grace: job.stop_grace.as_duration(),
            run: Run::Running,
            draining: false,
            clock: RunClock::new(before, now),
            cpu_before: init.wu_cpu_time,
            checkpoint_cpu: init.wu_cpu_time,
            checkpoint_every,
            last_checkpoint: now,
            last_report: None,
            fraction: 0.0,
            fraction_range: init.fraction_range(),
            cpu: init.wu_cpu_time,
        }
    }

    /// The backend (for tests and benchmarks).
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Drive the session until the task ends.
    pub fn run(mut self) -> Result<Ending, BackendError> {
        loop {
            if let Some(end) = self.step(Instant::now())? {
                // A last status, so the client sees the final fraction and CPU time.
                if end == Ending::Finished {
                    self.fraction = 1.0;
                }
                self.report(Instant::now());
                return Ok(end);
            }
            std::thread::sleep(TICK);
        }
    }

    /// One pass of the loop; Some once the task has ended.
    pub fn step(&mut self, now: Instant) -> Result<Option<Ending>, BackendError> {
        for ev in self.client.poll(now) {
            if let Some(end) = self.on_event(ev, now)? {
                return Ok(Some(end));
            }
        }
        if let Some(gone) = self.client.gone(now) {
            tracing::warn!("{gone}; stopping the agent");
            self.backend.quit(GONE_GRACE)?;
            return Ok(Some(Ending::ClientGone(gone)));
        }
        if let Some(exit) = self.backend.poll()? {
            return Ok(Some(self.agent_ended(exit)));
        }
        let elapsed = self.clock.elapsed(now);
        let wall = unix_now();
        if self.run == Run::Running {
            if !self.draining && self.timeline.should_drain(elapsed, wall) {
                tracing::info!(
                    elapsed = elapsed.as_secs(),
                    "the session is near its end: draining"
                );
                self.backend.drain()?;
                self.draining = true;
            }
            if self.timeline.should_end(elapsed, wall) {
                tracing::info!(
                    elapsed = elapsed.as_secs(),
                    "the session is over: stopping the agent"
                );
                let exit = self.backend.stop(self.stop_grace)?;
                tracing::info!("agent stopped ({exit})");
                return Ok(Some(Ending::Finished));
            }
            if now.duration_since(self.last_checkpoint) >= self.checkpoint_every {
                self.checkpoint(now)?;
            }
        }
        if self
            .last_report
            .is_none_or(|t| now.duration_since(t) >= REPORT_EVERY)
        {
            self.report(now);
        }
        Ok(None)
    }

    fn on_event(&mut self, ev: Event, now: Instant) -> Result<Option<Ending>, BackendError> {
        match ev {
            Event::Control(Control::Suspend) => {
                if self.run == Run::Running {
                    let t = Instant::now();
                    self.backend.suspend()?;
                    tracing::info!(took_ms = t.elapsed().as_millis() as u64, "suspended");
                    self.run = Run::Suspended;
                    self.clock.pause(now);
                }
            }
            Event::Control(Control::Resume) => {
                if self.run == Run::Suspended {
                    let t = Instant::now();
                    self.backend.resume()?;
                    tracing::info!(took_ms = t.elapsed().as_millis() as u64, "resumed");
                    self.run = Run::Running;
                    self.clock.go(now);
                }
            }
            Event::Control(Control::Quit) => {
                tracing::info!("quit: stopping the agent; the client restarts the task later");
                let t = Instant::now();
                let exit = self.backend.quit(self.stop_grace)?;
                let took_ms = t.elapsed().as_millis() as u64;
                tracing::info!(took_ms, "agent stopped ({exit})");
                return Ok(Some(Ending::Quit));
            }
            Event::Control(Control::Abort) => {
                tracing::info!("abort: killing the session");
                self.backend.kill()?;
                return Ok(Some(Ending::Aborted));
            }
            Event::Control(c @ (Control::RereadAppInfo | Control::NetworkAvailable)) => {
                tracing::info!(?c, "noted");
            }
            Event::NetworkSuspended(s) => self.backend.set_network(!s)?,
        }
        Ok(None)
    }

    fn agent_ended(&mut self, exit: Exit) -> Ending {
        if exit.success() {
            tracing::info!(draining = self.draining, "the agent ended its session");
            Ending::Finished
        } else {
            Ending::Failed(format!("copilot-agent ended with {exit}"))
        }
    }

    fn checkpoint(&mut self, now: Instant) -> Result<(), BackendError> {
        let c = self.backend.checkpoint()?;
        if c != Checkpoint::Busy {
            tracing::debug!(?c, "checkpoint");
            self.checkpoint_cpu = self.cpu_now();
            self.last_checkpoint = now;
        }
        Ok(())
    }

    fn cpu_now(&mut self) -> f64 {
        let cpu = self.cpu_before
            + crate::proctree::rusage_cpu(libc::RUSAGE_SELF)
            + self.backend.cpu_seconds();
        self.cpu = self.cpu.max(cpu);
        self.cpu
    }

    /// The status the client gets now.
    pub fn status(&mut self, now: Instant) -> AppStatus {
        let f = self.timeline.fraction(self.clock.elapsed(now));
        // Below 1 until the session has really ended.
        self.fraction = self.fraction.max(f.min(0.999));
        let (lo, hi) = self.fraction_range;
        AppStatus {
            current_cpu_time: self.cpu_now(),
            checkpoint_cpu_time: self.checkpoint_cpu,
            fraction_done: Some(lo + self.fraction * (hi - lo)),
            other_pid: self.backend.pid(),
            want_network: true,
        }
    }

    fn report(&mut self, now: Instant) {
        let status = self.status(now);
        if self.client.report(&status) {
            self.last_report = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::api::channel::{Channel, Channels};
    use crate::api::shm::LocalSegment;

    /// Records what the session asked of it.
    #[derive(Debug, Default)]
    struct Recorder {
        calls: Vec<&'static str>,
        exit: Option<Exit>,
        busy: bool,
    }

    impl Backend for Recorder {
        fn pid(&self) -> Option<u32> {
            Some(4242)
        }
        fn suspend(&mut self) -> Result<(), BackendError> {
            self.calls.push("suspend");
            Ok(())
        }
        fn resume(&mut self) -> Result<(), BackendError> {
            self.calls.push("resume");
            Ok(())
        }
        fn set_network(&mut self, up: bool) -> Result<(), BackendError> {
            self.calls.push(if up { "net-up" } else { "net-down" });
            Ok(())
        }
        fn checkpoint(&mut self) -> Result<Checkpoint, BackendError> {
            self.calls.push("checkpoint");
            Ok(if self.busy {
                Checkpoint::Busy
            } else {
                Checkpoint::NothingToLose
            })
        }
        fn drain(&mut self) -> Result<(), BackendError> {
            self.calls.push("drain");
            Ok(())
        }
        fn stop(&mut self, _grace: Duration) -> Result<Exit, BackendError> {
            self.calls.push("stop");
            Ok(Exit::Code(0))
        }
        fn quit(&mut self, _grace: Duration) -> Result<Exit, BackendError> {
            self.calls.push("quit");
            Ok(Exit::Code(0))
        }
        fn kill(&mut self) -> Result<(), BackendError> {
            self.calls.push("kill");
            Ok(())
        }
        fn poll(&mut self) -> Result<Option<Exit>, BackendError> {
            Ok(self.exit)
        }
        fn cpu_seconds(&self) -> f64 {
            1.0
        }
    }

    fn session(job: &str, init: InitData) -> (Session<Recorder>, Channels, Instant) {
        let seg = LocalSegment::new();
        let t0 = Instant::now();
        let client = Client::new(Channels::new(Box::new(seg.clone())), None, t0);
        let job = JobFile::parse(job).unwrap();
        let s = Session::new(client, Recorder::default(), &job, &init, t0);
        (s, Channels::new(Box::new(seg)), t0)
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn controls_map_onto_the_backend() {
        let (mut s, client, t0) = session("<copilot_job/>", InitData::default());
        client
            .send(Channel::ProcessControlRequest, "<suspend/>")
            .unwrap();
        assert_eq!(s.step(t0).unwrap(), None);
        client
            .send(Channel::ProcessControlRequest, "<suspend/>")
            .unwrap();
        s.step(t0).unwrap();
        client
            .send(Channel::ProcessControlRequest, "<resume/>")
            .unwrap();
        client
            .send(Channel::Heartbeat, "<heartbeat/><network_suspended/>")
            .unwrap();
        s.step(t0).unwrap();
        assert_eq!(s.backend.calls, ["suspend", "resume", "net-down"]);
        client
            .send(Channel::ProcessControlRequest, "<quit/>")
            .unwrap();
        assert_eq!(s.step(t0).unwrap(), Some(Ending::Quit));
        assert_eq!(s.backend.calls.last(), Some(&"quit"));

        let (mut s, client, t0) = session("<copilot_job/>", InitData::default());
        client
            .send(Channel::ProcessControlRequest, "<abort/>")
            .unwrap();
        assert_eq!(s.step(t0).unwrap(), Some(Ending::Aborted));
        assert_eq!(s.backend.calls, ["kill"]);
    }

    #[test]
    fn the_timeline_drains_then_ends_in_run_time() {
        let job = "<copilot_job><session>100</session><drain>20</drain></copilot_job>";
        let init = InitData {
            starting_elapsed_time: 50.0,
            ..InitData::default()
        };
        let (mut s, client, t0) = session(job, init);
        // 50 s were run before; suspended time does not count.
        client
            .send(Channel::ProcessControlRequest, "<suspend/>")
            .unwrap();
        s.step(t0).unwrap();
        client.send(Channel::Heartbeat, "<heartbeat/>").unwrap();
        s.step(t0 + secs(25)).unwrap();
        assert!(!s.backend.calls.contains(&"drain"));
        client
            .send(Channel::ProcessControlRequest, "<resume/>")
            .unwrap();
        s.step(t0 + secs(26)).unwrap();
        client.send(Channel::Heartbeat, "<heartbeat/>").unwrap();
        assert_eq!(s.step(t0 + secs(26 + 29)).unwrap(), None);
        assert!(!s.backend.calls.contains(&"drain"), "{:?}", s.backend.calls);
        assert_eq!(s.step(t0 + secs(26 + 30)).unwrap(), None);
        assert!(s.backend.calls.contains(&"drain"));
        client.send(Channel::Heartbeat, "<heartbeat/>").unwrap();
        assert_eq!(s.step(t0 + secs(26 + 50)).unwrap(), Some(Ending::Finished));
        assert_eq!(s.backend.calls.last(), Some(&"stop"));
    }

    #[test]
    fn a_near_deadline_drains_and_ends_by_wall_time() {
        let now = unix_now();
        let init = InitData {
            computation_deadline: now + 100.0,
            ..InitData::default()
        };
        let job = "<copilot_job><drain>1h</drain></copilot_job>";
        let (mut s, _client, t0) = session(job, init);
        assert_eq!(s.timeline.drain_at(), Some((now + 100.0 - 3600.0) as u64));
        s.step(t0).unwrap();
        assert_eq!(s.backend.calls, ["drain"]);
        let past = InitData {
            computation_deadline: now - 1.0,
            ..InitData::default()
        };
        let (mut s, _client, t0) = session(job, past);
        assert_eq!(s.step(t0).unwrap(), Some(Ending::Finished));
    }

    #[test]
    fn the_agent_ending_by_itself() {
        let (mut s, _c, t0) = session("<copilot_job/>", InitData::default());
        s.backend.exit = Some(Exit::Code(0));
        assert_eq!(s.step(t0).unwrap(), Some(Ending::Finished));
        let (mut s, _c, t0) = session("<copilot_job/>", InitData::default());
        s.backend.exit = Some(Exit::Signal(9));
        assert!(matches!(s.step(t0).unwrap(), Some(Ending::Failed(m)) if m.contains("signal 9")));
    }

    #[test]
    fn checkpoints_wait_until_nothing_would_be_lost() {
        let init = InitData {
            checkpoint_period: 10.0,
            wu_cpu_time: 1.0,
            ..InitData::default()
        };
        let (mut s, client, t0) = session("<copilot_job/>", init);
        let hb = || client.send(Channel::Heartbeat, "<heartbeat/>").unwrap();
        s.backend.busy = true;
        s.step(t0 + secs(5)).unwrap();
        assert!(!s.backend.calls.contains(&"checkpoint"), "not due yet");
        hb();
        s.step(t0 + secs(11)).unwrap();
        s.step(t0 + secs(12)).unwrap();
        assert_eq!(
            s.status(t0 + secs(12)).checkpoint_cpu_time,
            1.0,
            "busy: no checkpoint"
        );
        assert_eq!(s.backend.calls, ["checkpoint", "checkpoint"], "asked again");
        s.backend.busy = false;
        s.step(t0 + secs(13)).unwrap();
        let cp = s.status(t0 + secs(13)).checkpoint_cpu_time;
        assert!(cp > 1.0, "a checkpoint once idle: {cp}");
        s.step(t0 + secs(14)).unwrap();
        assert_eq!(s.backend.calls.len(), 3, "the next one is a period later");
    }

    #[test]
    fn status_is_monotonic_and_reported() {
        let job = "<copilot_job><session>100</session><drain>10</drain></copilot_job>";
        let init = InitData {
            wu_cpu_time: 5.0,
            fraction_done_start: 0.5,
            fraction_done_end: 1.0,
            ..InitData::default()
        };
        let (mut s, client, t0) = session(job, init);
        s.step(t0).unwrap();
        let first = AppStatus::parse(&client.receive(Channel::AppStatus).unwrap()).unwrap();
        assert_eq!(first.other_pid, Some(4242));
        assert!(first.want_network);
        assert!(first.current_cpu_time >= 6.0, "{first:?}");
        let a = s.status(t0 + secs(50));
        assert!((a.fraction_done.unwrap() - 0.75).abs() < 1e-9, "{a:?}");
        // Time going "back" (a clock step) never lowers what was reported.
        let b = s.status(t0 + secs(10));
        assert_eq!(b.fraction_done, a.fraction_done);
        assert!(b.current_cpu_time >= a.current_cpu_time);
        assert!(s.status(t0 + secs(500)).fraction_done.unwrap() < 1.0);
    }
}
