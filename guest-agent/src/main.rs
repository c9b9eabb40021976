//! `copilot-agent`: the guest agent binary. Loads the config, logs in to XMPP and serves jobs
//! until SIGTERM or Ctrl-C (jobs still running are released: the manager requeues them), until
//! it has been idle for its `idle_timeout`, or until it has drained after SIGUSR1 or at the
//! config's `drain_at`.
//!
//! Exit status: 0 when the session is over (stopped, idle for the timeout, or drained), 1 on
//! any error (bad config, no login, a lost connection). The VM image's init powers the VM off
//! after a 0 and restarts the agent after anything else.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use copilot_agent::config::AgentConfig;
use copilot_protocol::units::Seconds;

/// The copilot guest agent: asks the job manager for work over XMPP, stages inputs, runs the
/// payload, uploads outputs and reports.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Config file (TOML); environment variables COPILOT_AGENT_* override it.
    #[arg(
        long,
        env = "COPILOT_AGENT_CONFIG",
        required_unless_present = "check_sandbox"
    )]
    config: Option<PathBuf>,
    /// Print which payload protections are active on this host, and exit.
    #[arg(long)]
    check_sandbox: bool,
    /// Give up if the first XMPP login has not succeeded after this long.
    #[arg(long, default_value = "60s")]
    login_timeout: Seconds,
}

async fn terminated() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
}

/// Resolves on SIGUSR1: take no new job, end once the running ones are reported. Registers
/// the handler at once (not on first poll), so no SIGUSR1 is missed from here on.
fn drain_requested() -> impl std::future::Future<Output = ()> {
    let usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1());
    async move {
        match usr1 {
            Ok(mut usr1) => {
                usr1.recv().await;
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGUSR1 (drain): {e}");
                std::future::pending::<()>().await;
            }
        }
    }
}

async fn agent(args: Args) -> anyhow::Result<()> {
    let drain = drain_requested();
    let path = args.config.context("--config is required")?;
    // The file holds the XMPP password: payloads (other uids) must not read it.
    match copilot_agent::config::protect_file(&path) {
        Ok(Some(changed)) => {
            tracing::warn!(path = %path.display(), "config file made root-only: {changed}")
        }
        Ok(None) => {}
        Err(e) => anyhow::bail!("cannot make {} readable by root only: {e}", path.display()),
    }
    let config = AgentConfig::load(&path).with_context(|| format!("loading {}", path.display()))?;
    copilot_agent::session::run(
        config,
        args.login_timeout.as_duration(),
        terminated(),
        drain,
    )
    .await
    .context("agent session")
}

/// Prints what the sandbox does on this host; exits 0 even when protections are missing (the
/// report says which).
fn check_sandbox(config: Option<&std::path::Path>) -> ExitCode {
    let base_uid = match config.map(AgentConfig::load).transpose() {
        Ok(cfg) => cfg.map_or(copilot_agent::sandbox::DEFAULT_BASE_UID, |c| {
            c.sandbox.base_uid
        }),
        Err(e) => {
            eprintln!("copilot-agent: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("payload sandbox on this host:");
    for p in copilot_agent::sandbox::check(base_uid, config) {
        println!("  {p}");
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    // A drain request that comes before the handler is installed must not kill the agent
    // (SIGUSR1's default action): ignore it until then. Handlers reset to the default on exec,
    // so payloads are not affected once the handler is in place.
    // SAFETY: installing SIG_IGN runs no code of ours in signal context; no other thread
    // exists yet.
    if let Err(e) = unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGUSR1,
            nix::sys::signal::SigHandler::SigIgn,
        )
    } {
        eprintln!("copilot-agent: cannot ignore SIGUSR1 during startup: {e}");
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if args.check_sandbox {
        return check_sandbox(args.config.as_deref());
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("copilot-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(agent(args));
    // Do not wait for blocking tasks (a stuck transfer) on the way out.
    rt.shutdown_timeout(Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("copilot-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}
