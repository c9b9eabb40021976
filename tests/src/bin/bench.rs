//! `bench`: how fast copilot moves jobs, measured next to how fast the XMPP server moves stanzas,
//! in one run against one private Prosody on loopback.
//!
//! 1. Raw XMPP: one client sends N one-way messages to another; sequential IQ round trips; and a
//!    "null manager": every agent account does message + IQ round trip cycles (the stanza pattern
//!    of a job) against a plain echo client.
//! 2. No-op jobs through an in-process manager (`copilot_manager::run`) with simulated agents,
//!    each a real XMPP client speaking the copilot protocol (request → assign → progress →
//!    done more=true → ack with the next assign → …); jobs are submitted over the HTTP API.
//! 3. End to end: a `LocalStack` of real processes (Prosody, manager, `copilot-agent`s) runs
//!    no-op jobs (`true`, logs packed and uploaded over HTTP).
//!
//! Every wait is bounded by `--timeout`; the bench stops by itself and prints a markdown table.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use copilot_manager::config::ManagerConfig;
use copilot_protocol::api::{JobList, SubmitRequest, SubmitResponse};
use copilot_protocol::wire::{
    manager_address, DoneReport, Next, Outcome, Payload, Phase, Progress, Timings, WorkRequest,
};
use copilot_protocol::{JobSpec, JobState};
use copilot_stack::{free_port, LocalStack, Prosody, StackOptions, XMPP_DOMAIN};
use copilot_xmpp::{Connection, Element, Incoming, IqKind, Sender, XmppConfig};
use tokio::sync::{watch, Notify};

/// Namespace of the raw-XMPP test payloads.
const BENCH_NS: &str = "urn:copilot:bench";
/// Password of every benchmark account (private server on loopback).
const PASSWORD: &str = "bench-password";
/// How long a client gets to log in.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one IQ may take before the bench calls it a failure.
const IQ_TIMEOUT: Duration = Duration::from_secs(30);
/// Seconds a simulated agent lets the manager hold its work request.
const HOLD_SECS: u32 = 20;

#[derive(Debug, Parser)]
#[command(about = "Measure XMPP stanza rates and copilot job rates side by side")]
struct Args {
    /// Simulated agents (one XMPP client each) for the no-op job run.
    #[arg(long, default_value_t = 50)]
    agents: usize,
    /// No-op jobs for the simulated-agent run.
    #[arg(long, default_value_t = 20_000)]
    jobs: u64,
    /// One-way messages for the raw message rate.
    #[arg(long, default_value_t = 20_000)]
    messages: u64,
    /// Sequential IQ round trips for the raw round-trip rate.
    #[arg(long, default_value_t = 5_000)]
    round_trips: u64,
    /// Message + IQ cycles per agent account against the echo client ("null manager").
    #[arg(long, default_value_t = 200)]
    echo_cycles: u64,
    /// Jobs per POST /api/jobs.
    #[arg(long, default_value_t = 1_000)]
    batch: usize,
    /// Skip the end-to-end run with real copilot-agent processes.
    #[arg(long)]
    skip_e2e: bool,
    /// Real agents for the end-to-end run.
    #[arg(long, default_value_t = 8)]
    e2e_agents: usize,
    /// Jobs for the end-to-end run (in total).
    #[arg(long, default_value_t = 3_200)]
    e2e_jobs: u64,
    /// Where `copilot` and `copilot-agent` are (default: next to this executable).
    #[arg(long)]
    bin_dir: Option<std::path::PathBuf>,
    /// Upper bound of every phase, in seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Log filter (tracing EnvFilter syntax); the manager logs two lines per job at `info`.
    #[arg(long, default_value = "warn")]
    log: String,
}

/// One row of the result table.
struct Row {
    what: String,
    count: u64,
    secs: f64,
    unit: &'static str,
    /// Cores kept busy by each part of the system meanwhile.
    cpu: Vec<(&'static str, f64)>,
}

impl Row {
    fn rate(&self) -> f64 {
        self.count as f64 / self.secs
    }
}

/// Wall time and CPU use of one measurement.
struct Stopwatch<'a> {
    probe: &'a CpuProbe,
    start: Instant,
    cpu: CpuUse,
}

impl<'a> Stopwatch<'a> {
    fn start(probe: &'a CpuProbe) -> Stopwatch<'a> {
        let cpu = probe.now();
        Stopwatch {
            probe,
            start: Instant::now(),
            cpu,
        }
    }

    fn secs(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    fn row(&self, what: String, count: u64, unit: &'static str) -> Row {
        let secs = self.secs();
        Row {
            what,
            count,
            secs,
            unit,
            cpu: cores_busy(&self.cpu, &self.probe.now(), secs),
        }
    }
}

/// A logged-in client and its bound full JID.
struct Client {
    conn: Connection,
    jid: String,
}

/// The benchmark's XMPP server: its address and the CA its certificate chains to.
struct Xmpp {
    server: String,
    ca_pem: String,
}

async fn login(xmpp: &Xmpp, user: &str) -> Result<Client> {
    let trust = copilot_xmpp::TlsTrust::from_pem(xmpp.ca_pem.as_bytes())?;
    let mut conn = Connection::start(XmppConfig {
        jid: format!("{user}@{XMPP_DOMAIN}"),
        password: PASSWORD.into(),
        server: xmpp.server.clone(),
        security: copilot_xmpp::Security::Tls(trust),
    })?;
    let jid = conn
        .wait_online(LOGIN_TIMEOUT)
        .await
        .with_context(|| format!("logging in {user}"))?;
    Ok(Client { conn, jid })
}

fn blip(n: u64) -> Element {
    Element::builder("blip", BENCH_NS)
        .append(n.to_string())
        .build()
}

/// The echo client: counts messages (firing `all_in` once `expect` arrived) and answers every
/// IQ with an empty result, until `stop`.
fn spawn_echo(
    mut conn: Connection,
    expect: u64,
    all_in: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<Connection> {
    tokio::spawn(async move {
        let sender = conn.sender();
        let mut got = 0u64;
        loop {
            let ev = tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                ev = conn.next() => ev,
            };
            match ev {
                None => break,
                Some(Incoming::Message { payloads, .. }) => {
                    got += payloads.iter().filter(|p| p.is("blip", BENCH_NS)).count() as u64;
                    if got == expect {
                        all_in.notify_one();
                    }
                }
                Some(Incoming::Request { from, id, .. }) => {
                    if sender.reply(&from, id, None).is_err() {
                        break;
                    }
                }
                Some(_) => {}
            }
        }
        conn
    })
}

/// Raw one-way messages A → B, sequential IQ round trips A → B, and message + IQ cycles from
/// every agent account to B in parallel.
async fn raw_xmpp(
    args: &Args,
    xmpp: &Xmpp,
    agents: &[Client],
    probe: &CpuProbe,
    deadline: Duration,
) -> Result<Vec<Row>> {
    let a = login(xmpp, "bench-a").await?;
    let b = login(xmpp, "bench-b").await?;
    let all_in = Arc::new(Notify::new());
    let (stop_tx, stop_rx) = watch::channel(false);
    let echo = spawn_echo(b.conn, args.messages, all_in.clone(), stop_rx);
    let to = b.jid.clone();
    let out = a.conn.sender();
    let mut rows = Vec::new();

    // 1. One-way messages.
    let arrived = all_in.notified();
    tokio::pin!(arrived);
    arrived.as_mut().enable();
    let t = Stopwatch::start(probe);
    for n in 0..args.messages {
        out.message(&to, blip(n))?;
    }
    tokio::time::timeout(deadline, arrived)
        .await
        .context("not every raw message arrived in time")?;
    rows.push(t.row(
        "raw messages, 1 client → 1 client".into(),
        args.messages,
        "msg/s",
    ));
    eprintln!("raw messages: {:.0} msg/s", rows[0].rate());

    // 2. Sequential IQ round trips.
    let t = Stopwatch::start(probe);
    for n in 0..args.round_trips {
        out.request(&to, IqKind::Get, blip(n), IQ_TIMEOUT).await?;
    }
    rows.push(t.row(
        "IQ round trips, sequential".into(),
        args.round_trips,
        "RT/s",
    ));
    eprintln!("IQ round trips: {:.0}/s", rows[1].rate());

    // 3. The stanza pattern of a job (message + IQ round trip) from every agent account at once.
    let cycles = args.echo_cycles;
    let t = Stopwatch::start(probe);
    let tasks: Vec<_> = agents
        .iter()
        .map(|c| {
            let s = c.conn.sender();
            let to = to.clone();
            tokio::spawn(async move {
                for n in 0..cycles {
                    s.message(&to, blip(n))?;
                    s.request(&to, IqKind::Set, blip(n), IQ_TIMEOUT).await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    let joined = tokio::time::timeout(deadline, futures::future::join_all(tasks))
        .await
        .context("echo cycles did not finish in time")?;
    for r in joined {
        r??;
    }
    rows.push(t.row(
        format!(
            "null manager: {} clients × (message + IQ RT) to an echo client",
            agents.len()
        ),
        cycles * agents.len() as u64,
        "cycles/s",
    ));
    eprintln!("null manager: {:.0} cycles/s", rows[2].rate());

    let _ = stop_tx.send(true);
    let b_conn = echo.await?;
    tokio::task::spawn_blocking(move || {
        a.conn.shutdown();
        b_conn.shutdown();
    })
    .await?;
    Ok(rows)
}

/// CPU seconds used so far, by part of the system.
type CpuUse = BTreeMap<&'static str, f64>;

/// Reads CPU time from /proc (Linux): of other processes by label, and of this process's own
/// threads by their names (XMPP client threads are named `xmpp <jid>`).
struct CpuProbe {
    ticks_per_sec: f64,
    processes: Vec<(&'static str, u32)>,
    own_threads: bool,
}

/// (comm, utime + stime [+ cutime + cstime]) of a /proc stat file.
fn stat_ticks(path: &std::path::Path, children: bool) -> Option<(String, u64)> {
    let text = std::fs::read_to_string(path).ok()?;
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_owned();
    // Fields after the comm start with field 3 (state); utime is field 14.
    let fields: Vec<u64> = text
        .get(close + 2..)?
        .split_whitespace()
        .skip(11)
        .take(4)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    let n = if children { 4 } else { 2 };
    Some((comm, fields.iter().take(n).sum()))
}

impl CpuProbe {
    fn new(processes: Vec<(&'static str, u32)>, own_threads: bool) -> CpuProbe {
        let ticks_per_sec = std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .unwrap_or(100.0);
        CpuProbe {
            ticks_per_sec,
            processes,
            own_threads,
        }
    }

    fn now(&self) -> CpuUse {
        let mut used = CpuUse::new();
        let mut add = |label, ticks: u64| {
            *used.entry(label).or_insert(0.0) += ticks as f64 / self.ticks_per_sec;
        };
        for (label, pid) in &self.processes {
            let path = std::path::PathBuf::from(format!("/proc/{pid}/stat"));
            if let Some((_, t)) = stat_ticks(&path, true) {
                add(label, t);
            }
        }
        if self.own_threads {
            let tasks = std::fs::read_dir("/proc/self/task").into_iter().flatten();
            for task in tasks.flatten() {
                let Some((comm, t)) = stat_ticks(&task.path().join("stat"), false) else {
                    continue;
                };
                let label = if comm.starts_with("xmpp manager") {
                    "manager XMPP thread"
                } else if comm.starts_with("xmpp ") {
                    "client XMPP threads"
                } else if comm.starts_with("tokio-r") {
                    "tokio workers (manager + agent tasks)"
                } else {
                    "other bench threads"
                };
                add(label, t);
            }
        }
        used
    }
}

/// Cores kept busy by each part between two readings over `secs` of wall time.
fn cores_busy(before: &CpuUse, after: &CpuUse, secs: f64) -> Vec<(&'static str, f64)> {
    after
        .iter()
        .map(|(k, v)| (*k, (v - before.get(k).copied().unwrap_or(0.0)) / secs))
        .collect()
}

/// Stanzas the simulated agents sent and received, and jobs they finished.
#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    received: AtomicU64,
    done: AtomicU64,
    errors: AtomicU64,
}

/// One simulated agent: asks for work, reports progress and a successful no-op outcome, takes
/// the next job from the ack, until `stop` (or the manager stops answering).
async fn sim_agent(
    name: String,
    out: Sender,
    manager: String,
    jobs: u64,
    c: Arc<Counters>,
    all_done: Arc<Notify>,
) -> Result<()> {
    out.presence(Some(&manager), true)?;
    c.sent.fetch_add(1, Ordering::Relaxed);
    let mut next = None;
    // Bounded: every pass finishes a job or makes a held request (≤ HOLD_SECS), and the caller
    // aborts this task at its deadline.
    while c.done.load(Ordering::Relaxed) < jobs {
        let a = match next.take() {
            Some(a) => a,
            None => {
                let req = Payload::Request(WorkRequest {
                    token: None,
                    agent: name.clone(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    wait_secs: HOLD_SECS,
                    boinc_user: None,
                });
                c.sent.fetch_add(1, Ordering::Relaxed);
                let answer = out
                    .request(&manager, IqKind::Get, req.to_element(), IQ_TIMEOUT)
                    .await?;
                c.received.fetch_add(1, Ordering::Relaxed);
                match answer.as_ref().map(Payload::from_element) {
                    Some(Ok(Payload::Assign(a))) => a,
                    Some(Ok(Payload::NoWork(_))) => continue,
                    other => bail!("unexpected answer to a work request: {other:?}"),
                }
            }
        };
        let progress = Payload::Progress(Progress {
            agent: name.clone(),
            job: a.job,
            attempt: a.attempt,
            phase: Phase::Running,
        });
        out.message(&manager, progress.to_element())?;
        let done = Payload::Done(Box::new(DoneReport {
            agent: name.clone(),
            job: a.job,
            attempt: a.attempt,
            outcome: Outcome::Exited { code: 0 },
            timings: Timings::default(),
            archive: None,
            files: Vec::new(),
            sandbox: Default::default(),
            volunteer: None,
            want_more: true,
        }));
        c.sent.fetch_add(2, Ordering::Relaxed);
        let answer = out
            .request(&manager, IqKind::Set, done.to_element(), IQ_TIMEOUT)
            .await;
        c.received.fetch_add(1, Ordering::Relaxed);
        match answer.map(|a| a.as_ref().map(Payload::from_element)) {
            Ok(Some(Ok(Payload::Ack(ack)))) => {
                if !ack.duplicate && c.done.fetch_add(1, Ordering::Relaxed) + 1 == jobs {
                    all_done.notify_one();
                }
                if let Some(Next::Assign(a)) = ack.next {
                    next = Some(a);
                }
            }
            other => {
                c.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%name, job = a.job, "done report not acknowledged: {other:?}");
            }
        }
    }
    Ok(())
}

/// Ask the manager's full JID for a ping until it answers (it is online then).
async fn wait_for_manager(out: &Sender, manager: &str, deadline: Duration) -> Result<()> {
    let until = Instant::now() + deadline;
    let ping = Element::builder("ping", "urn:xmpp:ping").build();
    loop {
        match out
            .request(manager, IqKind::Get, ping.clone(), Duration::from_secs(2))
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > until => bail!("the manager never answered a ping: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn noop_specs(from: u64, count: u64) -> Vec<JobSpec> {
    (from..from + count)
        .map(|i| JobSpec::new(format!("noop#{i}"), &["true"]))
        .collect()
}

/// Job counts by state from the manager's API (lists only the failed ones, normally none).
async fn job_counts(
    http: &reqwest::Client,
    base: &str,
    token: &str,
) -> Result<std::collections::BTreeMap<JobState, u64>> {
    let list: JobList = http
        .get(format!("{base}/api/jobs?state=failed"))
        .bearer_auth(token)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(list.counts)
}

/// No-op jobs through an in-process manager and simulated agents.
async fn simulated(
    args: &Args,
    xmpp: &Xmpp,
    agents: &[Client],
    probe: &CpuProbe,
    deadline: Duration,
) -> Result<(Row, Row, f64)> {
    let data = tempfile::tempdir()?;
    let port = free_port()?;
    let config = ManagerConfig::from_toml(&format!(
        "data_dir = '{}'\napi_token = 'bench-api-token'\n\
         [xmpp]\njid = 'manager@{XMPP_DOMAIN}'\npassword = '{PASSWORD}'\nserver = '{server}'\n\
         ca_pem = '''{ca_pem}'''\n\
         [http]\nlisten = '127.0.0.1:{port}'\n",
        data.path().display(),
        server = xmpp.server,
        ca_pem = xmpp.ca_pem,
    ))?;
    let token = config.api_token.clone();
    let manager = manager_address(&config.xmpp.jid);
    let base = config.http.public_url.clone();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(copilot_manager::run(config, async move {
        let _ = stop_rx.await;
    }));
    wait_for_manager(&agents[0].conn.sender(), &manager, LOGIN_TIMEOUT).await?;

    let c = Arc::new(Counters::default());
    let all_done = Arc::new(Notify::new());
    let finished = all_done.notified();
    tokio::pin!(finished);
    finished.as_mut().enable();
    let sims: Vec<_> = agents
        .iter()
        .enumerate()
        .map(|(i, a)| {
            tokio::spawn(sim_agent(
                format!("sim-{i}"),
                a.conn.sender(),
                manager.clone(),
                args.jobs,
                c.clone(),
                all_done.clone(),
            ))
        })
        .collect();

    let http = reqwest::Client::new();
    let t = Stopwatch::start(probe);
    let submit_secs = submit_noops(&http, &base, &token, args.jobs, args.batch).await?;
    eprintln!(
        "submitted {} jobs in {submit_secs:.2} s; {} done so far",
        args.jobs,
        c.done.load(Ordering::Relaxed)
    );
    let until = tokio::time::Instant::now() + deadline;
    loop {
        tokio::select! {
            _ = &mut finished => break,
            _ = tokio::time::sleep_until(until) => bail!(
                "only {} of {} jobs done within {deadline:?}",
                c.done.load(Ordering::Relaxed),
                args.jobs
            ),
            _ = tokio::time::sleep(Duration::from_secs(5)) => eprintln!(
                "  {} jobs done after {:.0} s",
                c.done.load(Ordering::Relaxed),
                t.secs()
            ),
        }
    }
    let jobs = t.row(
        format!(
            "no-op jobs, in-process manager, {} simulated agents",
            agents.len()
        ),
        args.jobs,
        "jobs/s",
    );
    for s in &sims {
        s.abort();
    }
    for s in sims {
        match s.await {
            Ok(r) => r?,
            Err(e) if e.is_cancelled() => {}
            Err(e) => return Err(e.into()),
        }
    }
    let counts = job_counts(&http, &base, &token).await?;
    let done = counts.get(&JobState::Done).copied().unwrap_or(0);
    ensure!(
        done == args.jobs,
        "the manager counts {done} done jobs, not {}: {counts:?}",
        args.jobs
    );
    let _ = stop_tx.send(());
    running.await??;
    let errors = c.errors.load(Ordering::Relaxed);
    ensure!(errors == 0, "{errors} done reports were refused");
    let stanzas = (c.sent.load(Ordering::Relaxed) + c.received.load(Ordering::Relaxed)) as f64
        / args.jobs as f64;
    let submit = Row {
        what: format!(
            "submit over HTTP ({} jobs per POST, while agents run)",
            args.batch
        ),
        count: args.jobs,
        secs: submit_secs,
        unit: "jobs/s",
        cpu: Vec::new(),
    };
    eprintln!("simulated agents: {:.0} jobs/s", jobs.rate());
    Ok((jobs, submit, stanzas))
}

/// Submit `count` no-op jobs over the API in batches; returns the seconds it took.
async fn submit_noops(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    count: u64,
    batch: usize,
) -> Result<f64> {
    let t = Instant::now();
    let mut submitted = 0u64;
    while submitted < count {
        let n = (count - submitted).min(batch as u64);
        let answer: SubmitResponse = http
            .post(format!("{base}/api/jobs"))
            .bearer_auth(token)
            .json(&SubmitRequest {
                jobs: noop_specs(submitted, n),
            })
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        ensure!(answer.ids.len() as u64 == n, "submit returned too few ids");
        submitted += n;
    }
    Ok(t.elapsed().as_secs_f64())
}

/// No-op jobs through a LocalStack of real processes (`copilot-agent`s packing and uploading
/// their logs over HTTP).
async fn end_to_end(args: &Args, dir: &std::path::Path, deadline: Duration) -> Result<Row> {
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => copilot_stack::default_bin_dir()?,
    };
    let mut opts = StackOptions::new(dir, bin_dir);
    opts.agents = args.e2e_agents;
    let mut stack = tokio::task::spawn_blocking(move || LocalStack::start(opts)).await??;
    let mut processes = Vec::new();
    processes.extend(stack.prosody().pid().map(|p| ("prosody", p)));
    processes.extend(stack.manager_pid().map(|p| ("manager process", p)));
    for n in 1..=stack.agent_count() {
        processes.extend(
            stack
                .agent_pid(n)
                .map(|p| ("copilot-agent processes (+ payloads)", p)),
        );
    }
    let probe = CpuProbe::new(processes, false);
    let result = async {
        let wanted = args.e2e_agents;
        let stack = &stack;
        tokio::task::block_in_place(|| stack.wait_agents_online(wanted, LOGIN_TIMEOUT))?;
        let http = reqwest::Client::new();
        let base = stack.manager_url();
        let token = stack.api_token();
        let t = Stopwatch::start(&probe);
        submit_noops(&http, &base, token, args.e2e_jobs, args.batch).await?;
        let until = Instant::now() + deadline;
        let mut last_print = Instant::now();
        // Bounded by `deadline`.
        loop {
            let counts = job_counts(&http, &base, token).await?;
            let done = counts.get(&JobState::Done).copied().unwrap_or(0);
            let failed = counts.get(&JobState::Failed).copied().unwrap_or(0);
            ensure!(failed == 0, "{failed} end-to-end jobs failed: {counts:?}");
            if done == args.e2e_jobs {
                break;
            }
            ensure!(
                Instant::now() < until,
                "only {done} of {} end-to-end jobs done within {deadline:?}",
                args.e2e_jobs
            );
            if last_print.elapsed() > Duration::from_secs(5) {
                eprintln!("  {done} jobs done after {:.0} s", t.secs());
                last_print = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::Ok(t.row(
            format!(
                "no-op jobs end to end, {} real copilot-agent processes (logs uploaded)",
                args.e2e_agents
            ),
            args.e2e_jobs,
            "jobs/s",
        ))
    }
    .await;
    tokio::task::spawn_blocking(move || stack.stop()).await??;
    if let Ok(r) = &result {
        eprintln!("end to end: {:.0} jobs/s", r.rate());
    }
    result
}

/// Register `users` on `prosody`, a few `prosodyctl` processes at a time.
fn register_all(prosody: &Prosody, users: &[String]) -> Result<()> {
    for chunk in users.chunks(4) {
        std::thread::scope(|s| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|u| s.spawn(move || prosody.register(u, PASSWORD)))
                .collect();
            handles.into_iter().try_for_each(|h| match h.join() {
                Ok(r) => r.map_err(anyhow::Error::from),
                Err(_) => bail!("a registering thread panicked"),
            })
        })?;
    }
    Ok(())
}

fn print_table(rows: &[Row], stanzas: Option<f64>, ratio: Option<f64>) {
    println!("| measurement | count | seconds | rate |");
    println!("|---|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {} | {:.2} | {:.0} {} |",
            r.what,
            r.count,
            r.secs,
            r.rate(),
            r.unit
        );
    }
    if let Some(s) = stanzas {
        println!("| stanzas per job (sent + received by the agents) | | | {s:.2} |");
    }
    if let Some(r) = ratio {
        println!("| no-op jobs/s ÷ raw msg/s | | | {r:.3} |");
    }
    println!();
    println!("| measurement | CPU cores busy, by part (2 cores = 2.00) |");
    println!("|---|---|");
    for r in rows.iter().filter(|r| !r.cpu.is_empty()) {
        let parts: Vec<String> = r.cpu.iter().map(|(k, v)| format!("{k} {v:.2}")).collect();
        println!("| {} | {} |", r.what, parts.join(", "));
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    // Before any thread exists: the end-to-end stack's processes inherit the bench's log level
    // (LocalStack would start them at `info`).
    if std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("RUST_LOG", &args.log);
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&args.log))
        .with_writer(std::io::stderr)
        .init();
    ensure!(
        args.agents > 0 && args.jobs > 0 && args.batch > 0 && args.e2e_agents > 0,
        "counts must be positive"
    );
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    let deadline = Duration::from_secs(args.timeout);
    let dir = tempfile::tempdir()?;
    let prosody = Prosody::start(&dir.path().join("prosody"))?;
    let xmpp = Xmpp {
        server: prosody.server(),
        ca_pem: prosody.ca_pem().to_owned(),
    };
    let server = &xmpp.server;
    let agent_users: Vec<String> = (0..args.agents).map(|i| format!("sim-{i}")).collect();
    let mut users = vec!["bench-a".into(), "bench-b".into(), "manager".into()];
    users.extend(agent_users.iter().cloned());
    let t = Instant::now();
    register_all(&prosody, &users)?;
    eprintln!(
        "prosody on {server}; {} accounts registered in {:.1} s",
        users.len(),
        t.elapsed().as_secs_f64()
    );
    let mut agents = Vec::with_capacity(args.agents);
    for u in &agent_users {
        agents.push(login(&xmpp, u).await?);
    }

    let probe = CpuProbe::new(
        prosody.pid().map(|p| ("prosody", p)).into_iter().collect(),
        true,
    );
    let mut rows = raw_xmpp(&args, &xmpp, &agents, &probe, deadline).await?;
    let raw_rate = rows[0].rate();
    let (jobs, submit, stanzas) = simulated(&args, &xmpp, &agents, &probe, deadline).await?;
    let ratio = jobs.rate() / raw_rate;
    rows.push(jobs);
    rows.push(submit);
    tokio::task::spawn_blocking(move || {
        agents.into_iter().for_each(|a| a.conn.shutdown());
        drop(prosody);
    })
    .await?;

    if args.skip_e2e {
        eprintln!("end-to-end run skipped (--skip-e2e)");
    } else {
        rows.push(end_to_end(&args, &dir.path().join("stack"), deadline).await?);
    }
    println!();
    print_table(&rows, Some(stanzas), Some(ratio));
    Ok(())
}
