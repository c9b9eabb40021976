//! A Chirp server as the output store (`[outputs] chirp`), the Storage Manager role of the
//! original Co-Pilot, without its world-writable directories.
//!
//! Each attempt gets a fresh directory `<base>/up-<random>` and a [`Ticket`] registered by the
//! manager that may only write (`w`) there, for as long as an upload token lives. A background
//! task keeps a few such upload slots ready, so that handing out a job never waits for RSA key
//! generation; when none is ready the attempt uploads to the storage service instead. When the
//! agent reports, the manager reads the archive back from Chirp, hashing it, and records it only
//! if digest and size match the report: a cut or altered upload is never accepted. Results are
//! then served from Chirp through the manager's API. Directories left by attempts that never
//! reported are removed once their tickets have expired.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use copilot_protocol::api::Stored;
use copilot_protocol::digest::Hasher;
use copilot_protocol::Sha256;
use copilot_storage::chirp::{Auth, ChirpClient, ChirpError, Ticket};
use copilot_storage::chirp_store::{parse_url, ChirpStore};
use copilot_storage::{Credential, StorageError, Url};
use tokio::io::AsyncWrite;

/// Upload slots kept ready.
const POOL: usize = 4;
/// Name of the archive inside an attempt's directory.
const ARCHIVE: &str = "output.tar.gz";

/// A prepared place for one attempt's upload.
#[derive(Debug)]
pub struct Slot {
    /// `chirp://host:port/<base>/up-<random>/output.tar.gz`
    pub url: String,
    /// The ticket's private key (PEM on one line, see `Ticket::to_token`): the attempt's upload
    /// credential.
    pub ticket_pem: String,
}

/// Why the Chirp output store failed.
#[derive(Debug, thiserror::Error)]
pub enum OutputStoreError {
    #[error("outputs.chirp: {0}")]
    Storage(#[from] StorageError),
    #[error("outputs.chirp: {0}")]
    Chirp(#[from] ChirpError),
    #[error("the archive in Chirp is {got} ({got_size} bytes), the agent reported {want} ({want_size} bytes)")]
    Mismatch {
        want: Sha256,
        want_size: u64,
        got: Sha256,
        got_size: u64,
    },
    #[error("{url} is not in the output store")]
    Foreign { url: String },
}

/// The output store on one Chirp server.
#[derive(Debug)]
pub struct ChirpOutputs {
    base: Url,
    addr: String,
    /// The directory below which attempts' directories are made.
    dir: String,
    store: ChirpStore,
    ticket_secs: u64,
    max_size: u64,
    ready: Mutex<VecDeque<Slot>>,
}

impl ChirpOutputs {
    /// The store at `base_url` (checked: the manager can list it, creating it if needed).
    pub async fn open(
        base_url: &str,
        auths: Vec<Auth>,
        timeout: Duration,
        ticket_ttl: Duration,
        max_size: u64,
    ) -> Result<ChirpOutputs, OutputStoreError> {
        let base: Url = base_url.parse().map_err(|e| StorageError::BadUrl {
            url: base_url.to_owned(),
            reason: format!("{e}"),
        })?;
        let (addr, dir) = parse_url(&base)?;
        let dir = dir.trim_end_matches('/').to_owned();
        let outputs = ChirpOutputs {
            base,
            addr,
            dir,
            store: ChirpStore::new(timeout).with_auths(auths),
            ticket_secs: ticket_ttl.as_secs().max(1),
            max_size,
            ready: Mutex::new(VecDeque::new()),
        };
        let mut c = outputs.connect().await?;
        c.mkdir_all(&outputs.dir, 0o755).await?;
        c.getdir(&outputs.dir).await?;
        tracing::info!(base = %outputs.base, subject = c.subject(), "Chirp output store ready");
        Ok(outputs)
    }

    async fn connect(&self) -> Result<ChirpClient, OutputStoreError> {
        Ok(self.store.connect(&self.base, &Credential::None).await?.0)
    }

    /// A ready slot, if there is one.
    pub fn take(&self) -> Option<Slot> {
        self.lock().pop_front()
    }

    /// A slot taken but not used.
    pub fn give_back(&self, slot: Slot) {
        self.lock().push_front(slot);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Slot>> {
        self.ready.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes one slot: a directory, a ticket that may only write there.
    async fn make_slot(&self, c: &mut ChirpClient) -> Result<Slot, OutputStoreError> {
        let dir = format!("{}/up-{:032x}", self.dir, rand::random::<u128>());
        c.mkdir(&dir, 0o755).await?;
        let ticket = tokio::task::spawn_blocking(Ticket::generate)
            .await
            .map_err(|e| ChirpError::Ticket(format!("key generation stopped: {e}")))??;
        c.ticket_register(&ticket, self.ticket_secs).await?;
        c.ticket_modify(&ticket, &dir, "w").await?;
        let url = format!("chirp://{}{}/{ARCHIVE}", self.addr, encode(&dir));
        Ok(Slot {
            url,
            ticket_pem: ticket.to_token()?,
        })
    }

    /// Keeps [`POOL`] slots ready and removes abandoned directories, until `stop` resolves.
    /// `ready` is called when a slot is added to an empty pool (requests may be waiting).
    pub async fn run(&self, ready: impl Fn(), stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let mut last_sweep = tokio::time::Instant::now();
        let mut conn: Option<ChirpClient> = None;
        loop {
            let wait = if self.lock().len() >= POOL {
                Duration::from_millis(200)
            } else {
                let made = async {
                    let c = match conn.as_mut() {
                        Some(c) => c,
                        None => conn.insert(self.connect().await?),
                    };
                    self.make_slot(c).await
                };
                match made.await {
                    Ok(slot) => {
                        let was_empty = {
                            let mut pool = self.lock();
                            pool.push_back(slot);
                            pool.len() == 1
                        };
                        if was_empty {
                            ready();
                        }
                        Duration::ZERO
                    }
                    Err(e) => {
                        tracing::warn!("cannot prepare a Chirp upload slot: {e}");
                        conn = None;
                        Duration::from_secs(2)
                    }
                }
            };
            if last_sweep.elapsed() > Duration::from_secs(60) {
                last_sweep = tokio::time::Instant::now();
                if let Err(e) = self.sweep().await {
                    tracing::warn!("cannot clean up the Chirp output store: {e}");
                }
            }
            tokio::select! {
                () = &mut stop => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Removes attempt directories older than a ticket's life that hold no archive: uploads
    /// that never completed, whose tickets have expired anyway. Directories with an archive
    /// are results and stay.
    async fn sweep(&self) -> Result<(), OutputStoreError> {
        let mut c = self.connect().await?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        for name in c.getdir(&self.dir).await? {
            if !name.starts_with("up-") {
                continue;
            }
            let dir = format!("{}/{name}", self.dir);
            let st = c.stat(&dir).await?;
            if now - st.mtime < self.ticket_secs as i64 * 2 {
                continue;
            }
            if c.stat(&format!("{dir}/{ARCHIVE}")).await.is_err() {
                tracing::info!(%dir, "removing an abandoned upload directory");
                c.rmall(&dir).await?;
            }
        }
        Ok(())
    }

    /// The path of `url` in this store, or an error if it points elsewhere.
    fn own_path(&self, url: &str) -> Result<String, OutputStoreError> {
        let foreign = || OutputStoreError::Foreign {
            url: url.to_owned(),
        };
        let parsed: Url = url.parse().map_err(|_| foreign())?;
        let (addr, path) = parse_url(&parsed)?;
        let inside = path
            .strip_prefix(&self.dir)
            .is_some_and(|rest| rest.starts_with("/up-") && !rest.contains("/../"));
        if addr != self.addr || !inside {
            return Err(foreign());
        }
        Ok(path)
    }

    /// Reads the archive at `url` back and checks it is what the agent reported.
    pub async fn verify(&self, url: &str, want: Stored) -> Result<(), OutputStoreError> {
        let path = self.own_path(url)?;
        let mut c = self.connect().await?;
        let mut hasher = Hasher::new();
        let limit = self.max_size.min(want.size);
        c.getfile(&path, &mut tokio::io::sink(), limit, &mut |b: &[u8]| {
            hasher.update(b)
        })
        .await?;
        let (sha256, size) = hasher.finish();
        if (sha256, size) != (want.sha256, want.size) {
            return Err(OutputStoreError::Mismatch {
                want: want.sha256,
                want_size: want.size,
                got: sha256,
                got_size: size,
            });
        }
        Ok(())
    }

    /// Streams the archive at `url` into `out`.
    pub async fn read(
        &self,
        url: &str,
        out: &mut (impl AsyncWrite + Unpin + Send),
    ) -> Result<u64, OutputStoreError> {
        let path = self.own_path(url)?;
        let mut c = self.connect().await?;
        Ok(c.getfile(&path, out, self.max_size, &mut |_: &[u8]| {})
            .await?)
    }
}

/// Percent-encodes a Chirp path for a URL (space, `%` and other bytes URLs do not carry).
fn encode(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || b"/-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use copilot_stack::ChirpServer;
    use copilot_storage::{no_progress, Retry, Settings, Transfers, Upload};

    use super::*;

    #[test]
    fn paths_encode_into_urls_that_decode_back() {
        let dir = "/copilot outputs/100%/up-1";
        let url: Url = format!("chirp://127.0.0.1:9094{}/x", encode(dir))
            .parse()
            .unwrap();
        assert_eq!(parse_url(&url).unwrap().1, format!("{dir}/x"));
    }

    /// A Chirp server where the manager (by its unix user) may do anything and everyone on
    /// this host (by address) may only read.
    fn server() -> Option<(tempfile::TempDir, ChirpServer)> {
        let dir = tempfile::tempdir().unwrap();
        let acl = format!(
            "unix:{} rwlda\naddress:127.0.0.1 rl\n",
            copilot_stack::unix_user()
        );
        ChirpServer::start_or_skip(dir.path(), &acl).map(|s| (dir, s))
    }

    async fn slot(o: &ChirpOutputs) -> Slot {
        for _ in 0..300 {
            if let Some(s) = o.take() {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no upload slot was prepared");
    }

    #[tokio::test]
    async fn chirp_slots_take_only_their_uploads_and_verify_them() {
        let Some((dir, s)) = server() else { return };
        let base = format!("chirp://{}/copilot/outputs", s.address());
        let t = Duration::from_secs(10);
        let o = ChirpOutputs::open(
            &base,
            vec![Auth::Unix],
            t,
            Duration::from_secs(600),
            1 << 20,
        )
        .await
        .unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let o = std::sync::Arc::new(o);
        let pool = tokio::spawn({
            let o = o.clone();
            async move {
                o.run(|| {}, async {
                    let _ = stop_rx.await;
                })
                .await
            }
        });
        let slot = slot(&o).await;
        assert!(slot.url.starts_with(&format!("{base}/up-")), "{}", slot.url);

        let archive = dir.path().join("out.tar.gz");
        std::fs::write(&archive, b"pretend tar.gz").unwrap();
        let upload = Upload {
            sha256: Sha256::of(b"pretend tar.gz"),
            size: 14,
        };
        let agent = Transfers::new(Settings {
            extra_root_pem: None,
            timeout: t,
            retry: Retry { retries: 0 },
        })
        .unwrap();
        let url: Url = slot.url.parse().unwrap();
        // Without the ticket this host may only read.
        let err = agent
            .put(&archive, &url, upload, &Credential::None, &no_progress())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("permission denied"), "{err}");
        let ticket = Ticket::from_pem(&slot.ticket_pem).unwrap();
        agent
            .put(
                &archive,
                &url,
                upload,
                &Credential::Ticket(Box::new(ticket.clone())),
                &no_progress(),
            )
            .await
            .unwrap();
        // The ticket writes there and nowhere else.
        let elsewhere: Url = format!("{base}/elsewhere.tar.gz").parse().unwrap();
        let err = agent
            .put(
                &archive,
                &elsewhere,
                upload,
                &Credential::Ticket(Box::new(ticket)),
                &no_progress(),
            )
            .await
            .unwrap_err();
        assert!(err.to_string().contains("permission denied"), "{err}");

        let want = Stored {
            sha256: upload.sha256,
            size: upload.size,
        };
        o.verify(&slot.url, want).await.unwrap();
        let wrong = Stored {
            sha256: Sha256::of(b"other"),
            ..want
        };
        let err = o.verify(&slot.url, wrong).await.unwrap_err();
        assert!(matches!(err, OutputStoreError::Mismatch { .. }), "{err}");
        let longer = Stored { size: 15, ..want };
        assert!(o.verify(&slot.url, longer).await.is_err());
        let mut back = Vec::new();
        assert_eq!(o.read(&slot.url, &mut back).await.unwrap(), 14);
        assert_eq!(back, b"pretend tar.gz");
        for foreign in [
            format!("chirp://{}/etc/passwd", s.address()),
            format!("chirp://127.0.0.2:1/copilot/outputs/up-1/{ARCHIVE}"),
            "not a url".to_owned(),
        ] {
            let err = o.verify(&foreign, want).await.unwrap_err();
            assert!(
                matches!(err, OutputStoreError::Foreign { .. }),
                "{foreign}: {err}"
            );
        }
        let _ = stop_tx.send(());
        pool.await.unwrap();
    }
}
