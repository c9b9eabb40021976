//! `copilot-agent`: the guest agent binary. Loads the config, logs in to XMPP and serves jobs
//! until SIGTERM or Ctrl-C.

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
    #[arg(long, env = "COPILOT_AGENT_CONFIG")]
    config: PathBuf,
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

async fn agent(args: Args) -> anyhow::Result<()> {
    let config = AgentConfig::load(&args.config)
        .with_context(|| format!("loading {}", args.config.display()))?;
    copilot_agent::session::run(config, args.login_timeout.as_duration(), terminated())
        .await
        .context("agent session")
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
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
