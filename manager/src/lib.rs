//! The copilot job manager: a durable job queue with leases (SQLite), a storage service and JSON
//! API over HTTP, and a dispatcher that hands jobs to agents over XMPP.

pub mod archive;
pub mod blobs;
pub mod chirp_outputs;
pub mod config;
pub mod dispatch;
pub mod fleet;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod http;
pub mod metrics;
pub mod penalty;
pub mod queue;
pub mod stats;
pub mod tls;
pub mod validate;

use fleet::Fleet;

/// Everything the manager's tasks share.
#[derive(Debug)]
pub struct Shared {
    pub config: config::ManagerConfig,
    pub queue: queue::Queue,
    pub fleet: Fleet,
    /// Woken whenever jobs are queued (submitted or requeued), so held work requests are answered.
    pub work_available: tokio::sync::Notify,
    /// Woken whenever a done report is recorded, so replicas wait no longer than needed for
    /// their validator.
    pub replica_done: tokio::sync::Notify,
    /// Counters and gauges served at `GET /metrics`.
    pub metrics: metrics::Metrics,
    /// The Chirp output store, when `[outputs] chirp` is set.
    pub outputs: Option<std::sync::Arc<chirp_outputs::ChirpOutputs>>,
}

impl Shared {
    /// The state of a manager with `config`: its queue opened, no agent known yet.
    pub fn open(
        config: config::ManagerConfig,
        outputs: Option<std::sync::Arc<chirp_outputs::ChirpOutputs>>,
    ) -> Result<Shared, queue::QueueError> {
        Ok(Shared {
            queue: queue::Queue::open(&config.db_path())?,
            config,
            fleet: Fleet::new(),
            work_available: tokio::sync::Notify::new(),
            replica_done: tokio::sync::Notify::new(),
            metrics: metrics::Metrics::new(),
            outputs,
        })
    }
}

/// Why the manager stopped.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("cannot create the data dir {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("job queue: {0}")]
    Queue(#[from] queue::QueueError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP service failed: {0}")]
    Http(std::io::Error),
    #[error("HTTPS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("XMPP security settings: {0}")]
    XmppSecurity(#[from] copilot_xmpp::TrustError),
    #[error("XMPP: {0}")]
    Xmpp(#[from] copilot_xmpp::XmppError),
    #[error(transparent)]
    Outputs(#[from] chirp_outputs::OutputStoreError),
}

/// Run the manager until `shutdown` resolves: open the queue, serve HTTP, log in to XMPP,
/// dispatch jobs and sweep expired leases.
pub async fn run(
    config: config::ManagerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ManagerError> {
    use std::sync::Arc;
    use std::time::Duration;
    use tracing::info;

    std::fs::create_dir_all(&config.data_dir).map_err(|source| ManagerError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    let outputs = match &config.outputs.chirp {
        None => None,
        Some(url) => Some(Arc::new(
            chirp_outputs::ChirpOutputs::open(
                url,
                // Checked when the config was loaded.
                config.outputs.auths().unwrap_or_default(),
                Duration::from_secs(60),
                config.jobs.upload_token_ttl.as_duration(),
                config.jobs.max_output_size.0,
            )
            .await?,
        )),
    };
    let addr = config.http.listen;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ManagerError::Listen { addr, source })?;
    let mut conn = copilot_xmpp::Connection::start(copilot_xmpp::XmppConfig {
        jid: copilot_protocol::wire::manager_address(&config.xmpp.jid),
        password: config.xmpp.password.clone(),
        server: config.xmpp.server.clone(),
        security: config.xmpp.security()?,
    })?;
    match &config.signing_key {
        Some(key) => info!(public_key = %key.public_key(), "assignments are signed"),
        None => tracing::warn!(
            "no trust.signing_key: assignments go out unsigned, and agents refuse them unless \
             they set trust.insecure_unsigned_jobs (for development only)"
        ),
    }
    let shared = Arc::new(Shared::open(config, outputs.clone())?);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let http = match &shared.config.http {
        crate::config::HttpConfig {
            tls_cert: Some(cert),
            tls_key: Some(key),
            ..
        } => {
            let tls = tls::TlsListener::new(listener, tls::server_config(cert, key)?);
            tokio::spawn(http::serve(tls, shared.clone(), stopped()))
        }
        _ => tokio::spawn(http::serve(listener, shared.clone(), stopped())),
    };
    let slots = outputs.map(|o| {
        let stop = stopped();
        let shared = shared.clone();
        tokio::spawn(async move { o.run(|| shared.work_available.notify_waiters(), stop).await })
    });
    info!(%addr, "storage and API listening");
    conn.wait_online(Duration::from_secs(30)).await?;
    // The first Online event was consumed above; announce ourselves.
    let xmpp = conn.sender();
    xmpp.presence(None, true)?;
    let dispatcher = dispatch::Dispatcher::new(shared.clone(), xmpp);
    let sweeper = tokio::spawn(dispatch::sweep_leases(
        shared.clone(),
        Duration::from_secs(1),
        stopped(),
    ));
    let dispatching = tokio::spawn(dispatcher.run(conn, stopped()));
    shutdown.await;
    info!("shutting down");
    let _ = stop_tx.send(true);
    let _ = sweeper.await;
    let _ = dispatching.await;
    if let Some(slots) = slots {
        let _ = slots.await;
    }
    match http.await {
        Ok(r) => r.map_err(ManagerError::Http),
        Err(_) => Ok(()),
    }
}
