//! `copilot`: run the manager, submit jobs, watch them, fetch their results, run a local stack.
//! A thin layer over the modules: argument parsing, settings, and error reporting.

mod client;
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
/// over XMPP; this command talks to the manager, or runs one.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Manager base URL [default: http://127.0.0.1:8080, or the --stack's]
    #[arg(long, global = true, env = "COPILOT_MANAGER")]
    manager: Option<String>,
    /// API token [default: the --stack's]
    #[arg(long, global = true, env = "COPILOT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// State dir of a `copilot up` stack: read its client.toml for URL and token
    #[arg(long, global = true, env = "COPILOT_STACK")]
    stack: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
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
        /// Print the API's JSON instead
        #[arg(long)]
        json: bool,
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
    Agents {
        /// Print the API's JSON instead
        #[arg(long)]
        json: bool,
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
            cli.stack.as_deref(),
        )?;
        Ok(Client::new(&s.url, &s.token)?)
    };
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
            for s in submit::submit(&client, files).await? {
                eprintln!(
                    "{}: {} job{} queued",
                    s.file.display(),
                    s.ids.len(),
                    if s.ids.len() == 1 { "" } else { "s" }
                );
                for id in s.ids {
                    out!("{id}")?;
                }
            }
        }
        Command::Status { job, state, json } => status(&client()?, *job, *state, *json).await?,
        Command::Wait { jobs, timeout } => {
            let waited = watch::wait(&client()?, jobs, timeout.map(Seconds::as_duration)).await?;
            match waited {
                Waited::AllDone => out!("{n}/{n} jobs done", n = jobs.len())?,
                Waited::Failed(failed) => {
                    out!(
                        "{}/{} jobs done; failed: {}",
                        jobs.len() - failed.len(),
                        jobs.len(),
                        join(&failed)
                    )?;
                    return Ok(ExitCode::FAILURE);
                }
                Waited::TimedOut(pending) => {
                    bail!("timed out; still not final: {}", join(&pending));
                }
            }
        }
        Command::Results {
            job,
            output,
            max_size,
        } => results(&client()?, *job, output, *max_size).await?,
        Command::Agents { json } => {
            let list = client()?.agents().await?;
            if *json {
                out!("{}", serde_json::to_string_pretty(&list)?)?;
            } else {
                write!(
                    std::io::stdout().lock(),
                    "{}",
                    table::agents(&list.agents, now_ms())
                )?;
            }
        }
        Command::Up { dir, agents, lease } => {
            up::up(dir.clone(), *agents, *lease)
                .await
                .context("local stack")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn status(
    client: &Client,
    job: Option<JobId>,
    state: Option<JobState>,
    json: bool,
) -> anyhow::Result<()> {
    match job {
        Some(id) => {
            let j = client.job(id).await?;
            if json {
                out!("{}", serde_json::to_string_pretty(&j)?)?;
            } else {
                write!(
                    std::io::stdout().lock(),
                    "{}",
                    table::jobs(std::slice::from_ref(&j))
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
                out!("{}", serde_json::to_string_pretty(&list)?)?;
            } else {
                write!(std::io::stdout().lock(), "{}", table::jobs(&list.jobs))?;
                out!("{}", table::counts(&list.counts))?;
            }
        }
    }
    Ok(())
}

async fn results(client: &Client, job: JobId, dir: &Path, max: Bytes) -> anyhow::Result<()> {
    let got = results::fetch(client, job, dir, max.0)
        .await
        .with_context(|| format!("results of job {job}"))?;
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
    }
}
