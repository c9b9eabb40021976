//! `copilot-boinc-wrapper`: the BOINC application that runs a copilot agent session under a
//! volunteer's BOINC client. Started by the client in the task's slot dir; reads init_data.xml
//! and the job file, writes the agent's config, starts the backend and runs the session loop
//! (see the library's `session` module). Its exit code is what the client reads:
//!
//! | exit | when | finish file |
//! |---|---|---|
//! | 0 | the session ended (drained or at its end) | `boinc_finish_called` = 0 |
//! | 0 | the client asked us to quit, or is gone | none: the client restarts the task |
//! | 194 | the client aborted the task | none |
//! | 195 | the agent failed | `boinc_finish_called` = 195 and the reason |
//! | 206 | bad init_data.xml, job file, agent config or shared memory | `boinc_finish_called` = 206 |
//! | 0 + `boinc_temporary_exit` | the backend could not start (retried in 10 min) | none |

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use copilot_boinc::agent_config;
use copilot_boinc::api::channel::Channels;
use copilot_boinc::api::client::Client;
use copilot_boinc::api::exit::ExitCode as BoincExit;
use copilot_boinc::api::files;
use copilot_boinc::api::init_data::InitData;
use copilot_boinc::api::shm;
use copilot_boinc::backend::process::{become_subreaper, ProcessBackend};
use copilot_boinc::job::{BackendKind, JobFile, JOB_FILE};
use copilot_boinc::session::{Ending, Session, Timeline};
use copilot_boinc::volunteer::Volunteer;

/// Seconds after which the client should retry a task whose backend could not start.
const RETRY_DELAY_SECS: u32 = 600;

/// Why the wrapper could not run the session.
#[derive(Debug)]
enum MainError {
    /// Setup failed: a broken app version or client (final).
    Init(anyhow::Error),
    /// The backend could not start (maybe transient: retried later).
    Start(anyhow::Error),
    /// Driving the backend failed halfway.
    Run(anyhow::Error),
}

/// Everything the session needs, read and checked before anything starts.
struct Setup {
    init: InitData,
    job: JobFile,
    agent_program: PathBuf,
    agent_config: PathBuf,
}

fn setup(slot: &Path) -> anyhow::Result<Setup> {
    let init = InitData::load(slot).context("reading init_data.xml")?;
    tracing::info!(?init, "task");
    let job_path = files::resolve(slot, JOB_FILE)?;
    let job = JobFile::load(&job_path)?;
    if job.backend == BackendKind::Qemu {
        anyhow::bail!("the qemu backend is not available in this version of the wrapper");
    }
    let agent_program = files::resolve(slot, &job.agent)?;
    let template = files::resolve(slot, &job.agent_config)?;
    let volunteer = Volunteer::from_init_data(&init);
    let work_dir = slot.join("agent");
    std::fs::create_dir_all(&work_dir)
        .with_context(|| format!("creating {}", work_dir.display()))?;
    let timeline = Timeline::new(&job, &init);
    let agent_config = agent_config::write(
        &template,
        slot,
        &agent_config::Session {
            host_id: init.hostid,
            result_name: &init.result_name,
            work_dir: &work_dir,
            volunteer: &volunteer,
            drain_at: timeline.drain_at(),
        },
    )?;
    Ok(Setup {
        init,
        job,
        agent_program,
        agent_config,
    })
}

fn run(slot: &Path) -> Result<Ending, MainError> {
    let s = setup(slot).map_err(MainError::Init)?;
    let segment = shm::attach(slot, s.init.shm_key)
        .context("attaching the client's shared memory")
        .map_err(MainError::Init)?;
    let client = Client::new(Channels::new(segment), s.init.client_pid(), Instant::now());
    if let Err(e) = become_subreaper() {
        tracing::warn!("cannot become a child subreaper ({e}): orphans of the agent may escape");
    }
    let backend = ProcessBackend::start(&s.agent_program, &s.agent_config, slot)
        .context("starting copilot-agent")
        .map_err(MainError::Start)?;
    Session::new(client, backend, &s.job, &s.init, Instant::now())
        .run()
        .context("driving the agent")
        .map_err(MainError::Run)
}

/// Write a finish file, logging (not failing) if that is impossible.
fn finish(slot: &Path, code: BoincExit, message: Option<&str>) {
    if let Err(e) = files::finish(slot, i32::from(code.code()), message) {
        tracing::error!("{e}");
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();
    let slot = match std::env::current_dir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("copilot-boinc-wrapper: no working directory: {e}");
            return BoincExit::InitFailure.into();
        }
    };
    tracing::info!(version = env!("CARGO_PKG_VERSION"), slot = %slot.display(), "copilot-boinc-wrapper starting");
    let code = match run(&slot) {
        Ok(Ending::Finished) => {
            finish(&slot, BoincExit::Success, None);
            BoincExit::Success
        }
        Ok(Ending::Failed(why)) => {
            tracing::error!("{why}");
            finish(&slot, BoincExit::ChildFailed, Some(&why));
            BoincExit::ChildFailed
        }
        Ok(Ending::Quit) => BoincExit::Success,
        Ok(Ending::ClientGone(gone)) => {
            tracing::warn!("exiting: {gone}");
            BoincExit::Success
        }
        Ok(Ending::Aborted) => BoincExit::AbortedByClient,
        Err(MainError::Init(e)) => {
            tracing::error!("{e:#}");
            finish(&slot, BoincExit::InitFailure, Some(&format!("{e:#}")));
            BoincExit::InitFailure
        }
        Err(MainError::Start(e)) => {
            tracing::error!("{e:#}; asking the client to retry in {RETRY_DELAY_SECS} s");
            if let Err(e) = files::temporary_exit(&slot, RETRY_DELAY_SECS, &format!("{e:#}")) {
                tracing::error!("{e}");
            }
            BoincExit::Success
        }
        Err(MainError::Run(e)) => {
            tracing::error!("{e:#}");
            finish(&slot, BoincExit::ChildFailed, Some(&format!("{e:#}")));
            BoincExit::ChildFailed
        }
    };
    tracing::info!(exit = code.code(), "copilot-boinc-wrapper done");
    code.into()
}
