//! `copilot up`: a whole local stack (Prosody, manager, agents) in the foreground until Ctrl-C
//! or SIGTERM; then everything is stopped, nothing is left running.

use std::path::PathBuf;
use std::time::Duration;

use copilot_protocol::login::login_link;
use copilot_protocol::units::Seconds;
use copilot_stack::{default_bin_dir, LocalStack, StackError, StackOptions};

/// How long `up` waits for the agents to come online before it just warns.
const AGENTS_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the stack could not run.
#[derive(Debug, thiserror::Error)]
pub enum UpError {
    #[error(transparent)]
    Stack(#[from] StackError),
    #[error("stack task failed")]
    Task(#[from] tokio::task::JoinError),
    #[error("waiting for signals: {0}")]
    Signal(std::io::Error),
}

/// Run a stack in `dir` with `agents` agents until a signal or until a part of it dies. Says
/// where the manager, its dashboard and the state dir are: as lines for people, or (`json`) as
/// one JSON object.
pub async fn up(dir: PathBuf, agents: usize, lease: Seconds, json: bool) -> Result<(), UpError> {
    // Take over SIGINT/SIGTERM before starting anything: a signal that came while the stack
    // starts must stop it, not kill this process and leave its children running.
    let signals = Signals::new()?;
    let mut opts = StackOptions::new(dir, default_bin_dir()?);
    opts.agents = agents;
    opts.lease = lease;
    let stack = tokio::task::spawn_blocking(move || LocalStack::start(opts)).await??;
    let now = copilot_manager::fleet::now_ms() / 1000;
    let dashboard = login_link(&stack.manager_url(), stack.api_token(), now);
    if !json {
        println!("manager:   {}", stack.manager_url());
        println!("dashboard: {dashboard}");
        println!("state:     {}", stack.dir().display());
        println!("use it:    export COPILOT_STACK={}", stack.dir().display());
    }
    let (stack, online) = tokio::task::spawn_blocking(move || {
        let online = stack.wait_agents_online(agents, AGENTS_TIMEOUT);
        (stack, online)
    })
    .await?;
    if json {
        let about = serde_json::json!({
            "manager": stack.manager_url(),
            "dashboard": dashboard,
            "dir": stack.dir(),
            "agents_online": online.is_ok(),
        });
        println!("{about}");
    }
    match online {
        Err(e) => eprintln!("warning: {e}"),
        Ok(()) if !json => println!("{agents} agent(s) online; Ctrl-C stops the stack"),
        Ok(()) => {}
    }
    let outcome = watch(stack, signals).await;
    match outcome {
        Ok((stack, crashed)) => {
            eprintln!("stopping the stack");
            tokio::task::spawn_blocking(move || stack.stop()).await??;
            crashed.map_or(Ok(()), |e| Err(e.into()))
        }
        Err(e) => Err(e),
    }
}

/// SIGTERM and SIGINT, caught.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Signals, UpError> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate()).map_err(UpError::Signal)?,
            int: signal(SignalKind::interrupt()).map_err(UpError::Signal)?,
        })
    }
}

/// Wait for Ctrl-C/SIGTERM, checking every second that the manager and Prosody still run.
/// Returns the stack and, if a part died, why.
async fn watch(
    mut stack: LocalStack,
    signals: Signals,
) -> Result<(LocalStack, Option<StackError>), UpError> {
    let Signals { mut term, mut int } = signals;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = term.recv() => return Ok((stack, None)),
            _ = int.recv() => return Ok((stack, None)),
            _ = tick.tick() => {
                if let Err(e) = stack.check_alive() {
                    return Ok((stack, Some(e)));
                }
            }
        }
    }
}
