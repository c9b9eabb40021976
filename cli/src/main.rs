//! `copilot`: run the manager, submit jobs, watch them, fetch their results, run a local stack.
//! A thin layer over the modules: argument parsing, settings, and error reporting.

mod client;
mod keygen;
mod results;
mod settings;
mod submit;
mod table;
mod up;
mod watch;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use copilot_protocol::login::login_link;
use copilot_protocol::summary::{BatchView, Summary};
use copilot_protocol::units::{Bytes, Seconds};
use copilot_protocol::{JobId, JobState};

use client::Client;

/// `println!` that returns the error instead of panicking (e.g. on a closed pipe).
macro_rules! out {
    ($($arg:tt)*) => {
        writeln!(std::io::stdout().lock(), $($arg)*)
    };
}
use settings::Settings;
use watch::Waited;

/// copilot: volunteer computing for physics jobs. A job manager hands jobs to guest agents
/// over XMPP; this command talks to the manager, or runs one. Output is a table for people
/// (coloured on a terminal), or JSON with --json.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Manager base URL [default: http://127.0.0.1:8080, or the --stack's]
    #[arg(long, global = true, env = "COPILOT_MANAGER")]
    manager: Option<String>,
    /// API token [default: the --stack's]
    #[arg(long, global = true, env = "COPILOT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The project CA (PEM file) to trust for an https:// manager [default: the --stack's]
    #[arg(long, global = true, env = "COPILOT_CA")]
    ca: Option<PathBuf>,
    /// State dir of a `copilot up` stack: read its client.toml for URL and token
    #[arg(long, global = true, env = "COPILOT_STACK")]
    stack: Option<PathBuf>,
    /// Print JSON (the API's, or a small object saying what happened) instead of text
    #[arg(long, global = true)]
    json: bool,
    /// Colours in tables: auto (on a terminal, unless NO_COLOR is set), always, never
    #[arg(long, global = true, value_enum, default_value_t = ColorChoice::Auto)]
    color: ColorChoice,
    #[command(subcommand)]
    command: Command,
}

/// When tables are coloured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ColorChoice {
    Auto,
    Always,
    Never,
}

impl ColorChoice {
    /// Whether to colour what goes to stdout.
    fn enabled(self) -> bool {
        use std::io::IsTerminal;
        match self {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => {
                std::io::stdout().is_terminal()
                    && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
                    && std::env::var_os("TERM").is_none_or(|t| t != "dumb")
            }
        }
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the job manager (storage service, API, XMPP dispatcher) until SIGTERM or Ctrl-C
    Manager {
        /// Manager config (TOML)
        #[arg(long)]
        config: PathBuf,
    },
    /// Upload the local inputs of job files and queue their jobs; prints the job ids
    Submit {
        /// Job files (TOML, see docs/JOBS.md)
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Show jobs (a table and counts by state), or one job in detail
    Status {
        /// One job id
        job: Option<JobId>,
        /// Only jobs in this state (queued, assigned, running, uploading, done, failed, lost)
        #[arg(long)]
        state: Option<JobState>,
    },
    /// The state of the work: jobs by state, recent activity, failures by cause, batches
    Summary {
        /// Activity over this window (e.g. 10m, 1h) [default: since the first event of the
        /// last day]
        #[arg(long)]
        window: Option<Seconds>,
    },
    /// One batch (the jobs of a job file with `count`): its jobs and the histograms its replicas
    /// returned, summed
    Batch {
        /// The batch's name: the job file's `name` (its jobs are NAME#0, NAME#1, …)
        name: String,
    },
    /// Wait until jobs are final; exits non-zero if any failed or time ran out
    Wait {
        #[arg(required = true)]
        jobs: Vec<JobId>,
        /// Give up after this long (e.g. 90s, 10m, 2h)
        #[arg(long)]
        timeout: Option<Seconds>,
    },
    /// Download a job's outputs, verify them and unpack them into a directory
    Results {
        job: JobId,
        /// Directory to unpack into (created if missing)
        #[arg(short, long)]
        output: PathBuf,
        /// Most bytes unpacked
        #[arg(long, default_value = "4GiB")]
        max_size: Bytes,
    },
    /// List the agents the manager knows
    Agents,
    /// Print a link that logs a browser in to the manager's web dashboard (valid 12 hours)
    Dashboard,
    /// Create the project's signing key pair: the manager signs assignments with the private
    /// key, agents verify them with the public key (prints the agent config's lines)
    Keygen {
        /// Directory for manager.key (private, mode 0600) and manager.pub (created if missing)
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing key pair
        #[arg(long)]
        force: bool,
    },
    /// Issue an identity token for an agent that logs in anonymously ([agents] anonymous_domains)
    AgentToken {
        /// The project's private key (manager.key from `copilot keygen`)
        #[arg(long)]
        key: PathBuf,
        /// The agent's name (its `name` in agent.toml)
        #[arg(long)]
        name: String,
        /// How long the token is valid (e.g. 30d, 12h)
        #[arg(long, default_value = "30d")]
        valid: Seconds,
    },
    /// Run a local stack (Prosody, manager, agents) in the foreground until Ctrl-C
    Up {
        /// State dir (configs, logs, databases)
        #[arg(long, default_value = "copilot-stack")]
        dir: PathBuf,
        /// Agents to start
        #[arg(long, default_value_t = 2)]
        agents: usize,
        /// The manager's lease: how long an agent may stay silent about a job
        #[arg(long, default_value = "60s")]
        lease: Seconds,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Manager { .. } | Command::Up { .. } => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_level.into()),
        )
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("copilot: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        // The reader went away (`copilot status | head`): not an error.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("copilot: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let client = || -> anyhow::Result<Client> {
        let s = Settings::resolve(
            cli.manager.as_deref(),
            cli.token.as_deref(),
            cli.ca.as_deref(),
            cli.stack.as_deref(),
        )?;
        Ok(Client::new(&s.url, &s.token, s.ca_pem.as_deref())?)
    };
    let (json, colour) = (cli.json, cli.color.enabled());
    match &cli.command {
        Command::Manager { config } => {
            let cfg = copilot_manager::config::ManagerConfig::load(config)
                .with_context(|| format!("loading {}", config.display()))?;
            copilot_manager::run(cfg, terminated())
                .await
                .context("manager")?;
        }
        Command::Submit { files } => {
            let client = client()?;
            let submitted = submit::submit(&client, files).await?;
            if json {
                let list: Vec<serde_json::Value> = submitted
                    .iter()
                    .map(|s| serde_json::json!({ "file": s.file, "ids": s.ids }))
                    .collect();
                print_json(&list)?;
            }
            for s in submitted {
                eprintln!(
                    "{}: {} job{} queued",
                    s.file.display(),
                    s.ids.len(),
                    if s.ids.len() == 1 { "" } else { "s" }
                );
                if !json {
                    for id in s.ids {
                        out!("{id}")?;
                    }
                }
            }
        }
        Command::Status { job, state } => status(&client()?, *job, *state, json, colour).await?,
        Command::Summary { window } => {
            let s = client()?.summary(window.map(|w| w.0)).await?;
            if json {
                print_json(&s)?;
            } else {
                write!(std::io::stdout().lock(), "{}", summary_text(&s))?;
            }
        }
        Command::Batch { name } => {
            let b = client()?.batch(name).await?;
            if json {
                print_json(&b)?;
            } else {
                write!(std::io::stdout().lock(), "{}", batch_text(&b, colour))?;
            }
        }
        Command::Wait { jobs, timeout } => {
            let waited = watch::wait(&client()?, jobs, timeout.map(Seconds::as_duration)).await?;
            if json {
                let (result, failed, pending) = match &waited {
                    Waited::AllDone => ("done", &[][..], &[][..]),
                    Waited::Failed(f) => ("failed", &f[..], &[][..]),
                    Waited::TimedOut(p) => ("timed-out", &[][..], &p[..]),
                };
                print_json(&serde_json::json!({
                    "result": result,
                    "jobs": jobs.len(),
                    "failed": failed,
                    "pending": pending,
                }))?;
            }
            match waited {
                Waited::AllDone if !json => out!("{n}/{n} jobs done", n = jobs.len())?,
                Waited::AllDone => {}
                Waited::Failed(failed) => {
                    if !json {
                        out!(
                            "{}/{} jobs done; failed: {}",
                            jobs.len() - failed.len(),
                            jobs.len(),
                            join(&failed)
                        )?;
                    }
                    return Ok(ExitCode::FAILURE);
                }
                Waited::TimedOut(pending) => {
                    bail!(
                        "timed out; still not final: {} (try a longer --timeout, or `copilot status` to see where they are)",
                        join(&pending)
                    );
                }
            }
        }
        Command::Results {
            job,
            output,
            max_size,
        } => results(&client()?, *job, output, *max_size, json).await?,
        Command::Agents => {
            let list = client()?.agents().await?;
            if json {
                print_json(&list)?;
            } else {
                write!(
                    std::io::stdout().lock(),
                    "{}",
                    table::agents(&list.agents, now_ms(), colour)
                )?;
            }
        }
        Command::Dashboard => {
            let client = client()?;
            let link = login_link(client.base(), client.token(), now_ms() / 1000);
            if json {
                print_json(&serde_json::json!({ "url": link }))?;
            } else {
                out!("{link}")?;
                eprintln!(
                    "open it in a browser: it logs you in for a week (the link works for 12 hours)"
                );
            }
        }
        Command::Keygen { out, force } => {
            let pair = keygen::keygen(out, *force)?;
            if json {
                print_json(&serde_json::json!({
                    "private_key": pair.private_key,
                    "public_key_file": pair.public_key_file,
                    "public_key": pair.public_key.to_string(),
                }))?;
            } else {
                eprintln!(
                    "wrote {} (keep it on the manager: [trust] signing_key in manager.toml) and {}",
                    pair.private_key.display(),
                    pair.public_key_file.display()
                );
                eprintln!("every agent's config needs:");
                out!("[trust]\nmanager_key = \"{}\"", pair.public_key)?;
            }
        }
        Command::AgentToken { key, name, valid } => {
            let text = std::fs::read_to_string(key)
                .with_context(|| format!("reading {}", key.display()))?;
            let key = copilot_protocol::signing::SigningKey::from_pem(&text)
                .with_context(|| format!("{} is not a signing key", key.display()))?;
            let expires = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .context("the clock is before 1970")?
                .as_secs()
                + valid.0;
            let token = copilot_protocol::identity::AgentToken::issue(&key, name, expires).encode();
            if json {
                print_json(
                    &serde_json::json!({ "agent": name, "expires": expires, "token": token }),
                )?;
            } else {
                eprintln!("the agent {name:?} needs, until unix time {expires}:");
                out!("[xmpp]\nanonymous = true\ntoken = \"{token}\"")?;
            }
        }
        Command::Up { dir, agents, lease } => {
            up::up(dir.clone(), *agents, *lease, json)
                .await
                .context("local stack")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Pretty JSON on stdout.
fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    out!("{}", serde_json::to_string_pretty(v)?)?;
    Ok(())
}

/// `copilot batch` for people: its jobs, then one line per histogram.
fn batch_text(b: &BatchView, colour: bool) -> String {
    let mut t = table::jobs(&b.jobs, colour);
    t.push_str(&format!("batch {}: {}\n", b.name, table::counts(&b.counts)));
    for p in &b.plots {
        let what = if p.name.is_empty() {
            p.path.clone()
        } else {
            format!("{} {}", p.path, p.name)
        };
        match &p.sum {
            Some(sum) => {
                let total: f64 = sum.iter().map(|b| b.value).sum();
                let (lo, hi) = (
                    sum.first().map_or(0.0, |b| b.lo),
                    sum.last().map_or(0.0, |b| b.hi),
                );
                t.push_str(&format!(
                    "{what}: {} replicas, {} bins from {lo} to {hi}, summed: {total}\n",
                    p.replicas.len(),
                    sum.len()
                ));
            }
            None => t.push_str(&format!(
                "{what}: {} replicas, not summed\n",
                p.replicas.len()
            )),
        }
        for problem in &p.problems {
            t.push_str(&format!("  {problem}\n"));
        }
    }
    t
}

/// `copilot summary` for people.
fn summary_text(s: &Summary) -> String {
    let mut t = format!(
        "jobs: {}\nagents: {} online of {}\n",
        table::counts(&s.counts),
        s.agents_online,
        s.agents_known
    );
    let a = &s.activity;
    let span_ms = a.bucket_ms * a.done.len() as u64;
    let sum = |v: &[u64]| v.iter().sum::<u64>();
    let per_min = |n: u64| n as f64 * 60_000.0 / span_ms.max(1) as f64;
    t.push_str(&format!(
        "last {}: {} done, {} failed, {} attempts started ({:.1} jobs done a minute)\n",
        Seconds(span_ms / 1000),
        sum(&a.done),
        sum(&a.failed),
        sum(&a.assigned),
        per_min(sum(&a.done)),
    ));
    if !s.failures.is_empty() {
        t.push_str("\nfailed jobs by cause:\n");
        t.push_str(&table::causes(&s.failures));
    }
    if !s.lost_attempts.is_empty() {
        t.push_str("\nlost attempts by cause:\n");
        t.push_str(&table::causes(&s.lost_attempts));
    }
    if !s.batches.is_empty() {
        t.push('\n');
        t.push_str(&table::batches(&s.batches));
    }
    t
}

async fn status(
    client: &Client,
    job: Option<JobId>,
    state: Option<JobState>,
    json: bool,
    colour: bool,
) -> anyhow::Result<()> {
    match job {
        Some(id) => {
            let j = client.job(id).await?;
            if json {
                print_json(&j)?;
            } else {
                write!(
                    std::io::stdout().lock(),
                    "{}",
                    table::jobs(std::slice::from_ref(&j), colour)
                )?;
                if let Some(o) = &j.outcome {
                    out!("outcome: {}", o.text)?;
                }
                if let Some(note) = &j.note {
                    out!("note: {note}")?;
                }
                if let Some(s) = &j.sandbox {
                    out!("sandbox: {}", s.summary())?;
                }
                if let Some(a) = &j.archive {
                    out!("archive: {} bytes, sha256 {}", a.size, a.sha256)?;
                }
                for f in &j.files {
                    out!("  {}  {} bytes", f.path, f.size)?;
                }
            }
        }
        None => {
            let list = client.jobs(state).await?;
            if json {
                print_json(&list)?;
            } else {
                write!(
                    std::io::stdout().lock(),
                    "{}",
                    table::jobs(&list.jobs, colour)
                )?;
                out!("{}", table::counts(&list.counts))?;
            }
        }
    }
    Ok(())
}

async fn results(
    client: &Client,
    job: JobId,
    dir: &Path,
    max: Bytes,
    json: bool,
) -> anyhow::Result<()> {
    let got = results::fetch(client, job, dir, max.0)
        .await
        .with_context(|| format!("results of job {job}"))?;
    if json {
        return print_json(&serde_json::json!({
            "job": got.job.id,
            "name": got.job.name,
            "state": got.job.state,
            "dir": dir,
            "files": got.files,
            "missing": got.missing,
        }));
    }
    out!(
        "job {} ({}, {}): {} file(s) verified in {}",
        got.job.id,
        got.job.name,
        got.job.state,
        got.files.len(),
        dir.display()
    )?;
    for (path, size) in &got.files {
        out!("  {path}  {size} bytes")?;
    }
    for m in &got.missing {
        out!("  missing: {m} (declared output not produced)")?;
    }
    Ok(())
}

/// Ctrl-C or SIGTERM.
async fn terminated() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn join(ids: &[JobId]) -> String {
    ids.iter()
        .map(JobId::to_string)
        .collect::<Vec<_>>()
        .join(" ")
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_reads_as_text() {
        use copilot_protocol::summary::{Activity, CauseCount};
        let s = Summary {
            now_ms: 0,
            counts: [(JobState::Done, 9), (JobState::Failed, 1)].into(),
            agents_online: 2,
            agents_known: 3,
            activity: Activity {
                start_ms: 0,
                bucket_ms: 60_000,
                assigned: vec![4, 6],
                done: vec![3, 6],
                failed: vec![0, 1],
                queued: vec![0, 0],
            },
            failures: vec![CauseCount {
                cause: "exit 3".into(),
                count: 1,
            }],
            lost_attempts: vec![],
            batches: vec![],
        };
        let t = summary_text(&s);
        assert!(
            t.starts_with("jobs: 9 done, 1 failed (10 jobs)\nagents: 2 online of 3\n"),
            "{t}"
        );
        assert!(
            t.contains("last 2m: 9 done, 1 failed, 10 attempts started (4.5 jobs done a minute)"),
            "{t}"
        );
        assert!(
            t.contains("failed jobs by cause:\nCOUNT  CAUSE\n1      exit 3\n"),
            "{t}"
        );
        assert!(!t.contains("lost attempts"));
    }

    #[test]
    fn a_batch_reads_as_its_jobs_and_one_line_per_histogram() {
        use copilot_protocol::histogram::Bin;
        use copilot_protocol::summary::{BatchPlot, Replica};
        let bins = |v: f64| {
            vec![
                Bin {
                    lo: 0.0,
                    hi: 0.5,
                    value: v,
                },
                Bin {
                    lo: 0.5,
                    hi: 1.0,
                    value: 2.0 * v,
                },
            ]
        };
        let b = BatchView {
            name: "mc".into(),
            counts: [(JobState::Done, 2)].into(),
            jobs: vec![],
            plots: vec![BatchPlot {
                path: "h.yoda".into(),
                name: "/A/d01".into(),
                title: String::new(),
                replicas: vec![
                    Replica {
                        job: 1,
                        label: "mc#0".into(),
                        bins: bins(1.0),
                    },
                    Replica {
                        job: 2,
                        label: "mc#1".into(),
                        bins: bins(2.0),
                    },
                ],
                sum: Some(bins(3.0)),
                problems: vec!["mc#2: binning differs".into()],
            }],
        };
        let t = batch_text(&b, false);
        assert!(t.contains("batch mc: 2 done (2 jobs)\n"), "{t}");
        assert!(
            t.contains("h.yoda /A/d01: 2 replicas, 2 bins from 0 to 1, summed: 9\n  mc#2: binning differs\n"),
            "{t}"
        );
    }

    #[test]
    fn cli_parses_global_flags_after_the_subcommand() {
        let cli = Cli::try_parse_from([
            "copilot",
            "wait",
            "3",
            "4",
            "--timeout",
            "10m",
            "--stack",
            "/s",
        ])
        .unwrap();
        assert_eq!(cli.stack.as_deref(), Some(Path::new("/s")));
        match cli.command {
            Command::Wait { jobs, timeout } => {
                assert_eq!(jobs, [3, 4]);
                assert_eq!(timeout, Some(Seconds(600)));
            }
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from(["copilot", "submit"]).is_err());
        let cli =
            Cli::try_parse_from(["copilot", "status", "3", "--json", "--color", "never"]).unwrap();
        assert!(cli.json && !cli.color.enabled());
        assert!(matches!(cli.command, Command::Status { job: Some(3), .. }));
        let cli = Cli::try_parse_from(["copilot", "--color=always", "summary", "--window", "1h"])
            .unwrap();
        assert!(cli.color.enabled());
        assert!(matches!(
            cli.command,
            Command::Summary {
                window: Some(Seconds(3600))
            }
        ));
        assert!(Cli::try_parse_from(["copilot", "agents", "--color", "sometimes"]).is_err());
    }
}
