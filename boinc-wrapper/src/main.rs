//! `copilot-boinc-wrapper`: the BOINC application that runs a copilot agent session under a
//! volunteer's BOINC client. Started by the client in the task's slot dir; reads init_data.xml
//! and the job file, writes the agent's config, starts the backend (the agent as a process, or
//! the VM image under QEMU) and runs the session loop (see the library's `session` module). Its
//! exit code is what the client reads:
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
use copilot_boinc::backend::qemu::{self, Image, QemuBackend, VmSpec};
use copilot_boinc::backend::Backend;
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

/// Where the agent runs, resolved.
enum Where {
    Process { agent_program: PathBuf },
    Vm(VmSpec),
}

/// Everything the session needs, read and checked before anything starts.
struct Setup {
    init: InitData,
    job: JobFile,
    agent_config: PathBuf,
    place: Where,
}

fn setup(slot: &Path) -> anyhow::Result<Setup> {
    let init = InitData::load(slot).context("reading init_data.xml")?;
    tracing::info!(?init, "task");
    let job_path = files::resolve(slot, JOB_FILE)?;
    let job = JobFile::load(&job_path)?;
    let template = files::resolve(slot, &job.agent_config)?;
    let volunteer = Volunteer::from_init_data(&init);
    let in_vm = job.backend == BackendKind::Qemu;
    let work_dir = if in_vm {
        PathBuf::from(agent_config::GUEST_WORK_DIR)
    } else {
        let dir = slot.join("agent");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        dir
    };
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
            in_vm,
        },
    )?;
    let place = match job.backend {
        BackendKind::Process => Where::Process {
            agent_program: files::resolve(slot, &job.agent)?,
        },
        BackendKind::Qemu => {
            let image = Image {
                kernel: files::resolve(slot, qemu::KERNEL_FILE)?,
                initramfs: files::resolve(slot, qemu::INITRAMFS_FILE)?,
            };
            for f in [&image.kernel, &image.initramfs] {
                anyhow::ensure!(
                    f.is_file(),
                    "the app version has no VM image file {}",
                    f.display()
                );
            }
            Where::Vm(VmSpec {
                qemu: PathBuf::new(),
                image,
                memory_mb: job.memory_mb,
                accel: job.accel,
                agent_config: agent_config.clone(),
                dir: slot.to_owned(),
                kvm_cache: (!init.project_dir.is_empty())
                    .then(|| Path::new(&init.project_dir).join("copilot-kvm-verdict")),
            })
        }
    };
    Ok(Setup {
        init,
        job,
        agent_config,
        place,
    })
}

fn drive(client: Client, backend: impl Backend, s: &Setup) -> Result<Ending, MainError> {
    Session::new(client, backend, &s.job, &s.init, Instant::now())
        .run()
        .context("driving the agent")
        .map_err(MainError::Run)
}

fn run(slot: &Path) -> Result<Ending, MainError> {
    let s = setup(slot).map_err(MainError::Init)?;
    let segment = shm::attach(slot, s.init.shm_key)
        .context("attaching the client's shared memory")
        .map_err(MainError::Init)?;
    let client = Client::new(Channels::new(segment), s.init.client_pid(), Instant::now());
    match &s.place {
        Where::Process { agent_program } => {
            if let Err(e) = become_subreaper() {
                tracing::warn!(
                    "cannot become a child subreaper ({e}): orphans of the agent may escape"
                );
            }
            let backend = ProcessBackend::start(agent_program, &s.agent_config, slot)
                .context("starting copilot-agent")
                .map_err(MainError::Start)?;
            drive(client, backend, &s)
        }
        Where::Vm(spec) => {
            let qemu = qemu::find_qemu()
                .context("no qemu-system-x86_64 on PATH (or in $COPILOT_QEMU)")
                .map_err(MainError::Start)?;
            let spec = VmSpec {
                qemu,
                ..spec.clone()
            };
            let backend = QemuBackend::start(&spec)
                .context("starting the VM")
                .map_err(MainError::Start)?;
            drive(client, backend, &s)
        }
    }
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
