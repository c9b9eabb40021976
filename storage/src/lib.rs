//! Where job data lives: storage adapters chosen by URL scheme, `http://`/`https://`
//! ([`http::HttpStore`]) and `chirp://host:port/path` ([`chirp_store::ChirpStore`], over the
//! [`chirp`] client), behind the [`Storage`] trait.
//!
//! [`Transfers`] is what agents, the manager and the CLI use: it streams a file to or from a URL,
//! hashing it (sha256) while it flows and never reading it twice, enforces size limits and the
//! expected size and digest, retries transient failures with backoff (an HTTP download resumes
//! with a Range request where the server allows), removes a file whose download failed, and
//! reports progress.

pub mod chirp;
pub mod chirp_store;
pub mod http;
mod retry;
#[cfg(any(test, feature = "testserver"))]
pub mod testserver;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use copilot_protocol::api::Stored;
use copilot_protocol::digest::Hasher;
use copilot_protocol::Sha256;
use tokio::io::AsyncWriteExt;

pub use reqwest::{StatusCode, Url};
pub use retry::Retry;

/// Called with the bytes moved so far.
pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

/// A [`Progress`] that ignores everything.
pub fn no_progress() -> Progress {
    Arc::new(|_| {})
}

/// What proves our right to a URL.
#[derive(Clone, Debug, Default)]
pub enum Credential {
    #[default]
    None,
    /// An HTTP bearer token (the caller decides which origins may see it).
    Bearer(String),
    /// A Chirp ticket, tried before the store's other methods.
    Ticket(Box<chirp::Ticket>),
}

/// What a download must look like.
#[derive(Clone, Copy, Debug)]
pub struct GetSpec {
    pub sha256: Option<Sha256>,
    pub size: Option<u64>,
    /// Largest size accepted.
    pub limit: u64,
}

/// Why a transfer failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("bad URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("{url} answered HTTP {status}{}", message.as_deref().map(|m| format!(": {m}")).unwrap_or_default())]
    Status {
        url: String,
        status: StatusCode,
        /// The server's explanation, if it gave one.
        message: Option<String>,
    },
    #[error("transfer with {url} failed: {reason}")]
    Transport { url: String, reason: String },
    #[error("{url} is larger than {limit} bytes")]
    TooLarge { url: String, limit: u64 },
    #[error("{url} has {got} bytes, {expected} were expected")]
    SizeMismatch {
        url: String,
        expected: u64,
        got: u64,
    },
    #[error("{url} has sha256 {got}, {expected} was expected")]
    DigestMismatch {
        url: String,
        expected: Sha256,
        got: Sha256,
    },
    #[error(
        "the server stored sha256 {got} ({got_size} bytes), the file is {want} ({want_size} bytes)"
    )]
    StoredMismatch {
        want: Sha256,
        want_size: u64,
        got: Sha256,
        got_size: u64,
    },
    #[error("{}: {source}", path.display())]
    Local {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Chirp(#[from] chirp::ChirpError),
}

impl StorageError {
    /// Whether another try may succeed: connection trouble, timeouts, an overloaded server.
    pub fn is_retryable(&self) -> bool {
        match self {
            StorageError::Status { status, .. } => http::transient_status(*status),
            StorageError::Transport { .. } => true,
            StorageError::Chirp(e) => e.is_transient(),
            _ => false,
        }
    }
}

/// A download in progress: the file, and the digest of what it holds so far (so that a resumed
/// transfer never reads the file again).
#[derive(Debug)]
pub struct Download {
    path: PathBuf,
    file: Option<tokio::fs::File>,
    hasher: Hasher,
    limit: u64,
    url: String,
}

impl Download {
    fn new(path: &Path, url: &Url, limit: u64) -> Download {
        Download {
            path: path.to_owned(),
            file: None,
            hasher: Hasher::new(),
            limit,
            url: shown_url(url),
        }
    }

    /// Bytes received so far.
    pub fn len(&self) -> u64 {
        self.hasher.len()
    }

    /// Whether nothing was received yet.
    pub fn is_empty(&self) -> bool {
        self.hasher.is_empty()
    }

    /// The limit on the whole file.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    fn local(&self) -> impl FnOnce(std::io::Error) -> StorageError + '_ {
        move |source| StorageError::Local {
            path: self.path.clone(),
            source,
        }
    }

    /// Starts over: an empty file and a fresh digest.
    pub async fn restart(&mut self) -> Result<(), StorageError> {
        let file = tokio::fs::File::create(&self.path)
            .await
            .map_err(self.local())?;
        self.file = Some(file);
        self.hasher = Hasher::new();
        Ok(())
    }

    /// The size limit refuses a file of `total` bytes (if known).
    pub fn check_total(&self, total: Option<u64>) -> Result<(), StorageError> {
        match total {
            Some(n) if n > self.limit => Err(StorageError::TooLarge {
                url: self.url.clone(),
                limit: self.limit,
            }),
            _ => Ok(()),
        }
    }

    /// Appends the next piece.
    pub async fn append(&mut self, chunk: &[u8]) -> Result<(), StorageError> {
        if self.len() + chunk.len() as u64 > self.limit {
            return Err(StorageError::TooLarge {
                url: self.url.clone(),
                limit: self.limit,
            });
        }
        if self.file.is_none() {
            self.restart().await?;
        }
        self.hasher.update(chunk);
        let path = self.path.clone();
        let local = move |source| StorageError::Local { path, source };
        match self.file.as_mut() {
            Some(f) => f.write_all(chunk).await.map_err(local),
            None => Ok(()),
        }
    }

    /// The file, for adapters that stream into it directly; they hash what they write and hand
    /// the digest over with [`Download::adopt`].
    pub async fn file(&mut self) -> Result<&mut tokio::fs::File, StorageError> {
        if self.file.is_none() {
            self.restart().await?;
        }
        let path = self.path.clone();
        self.file.as_mut().ok_or(StorageError::Local {
            path,
            source: std::io::ErrorKind::NotFound.into(),
        })
    }

    /// Takes the digest of everything an adapter wrote through [`Download::file`] since
    /// [`Download::restart`].
    pub fn adopt(&mut self, hasher: Hasher) {
        self.hasher = hasher;
    }

    async fn finish(mut self) -> Result<Stored, StorageError> {
        if let Some(mut f) = self.file.take() {
            f.flush().await.map_err(self.local())?;
        } else {
            // An empty file still exists afterwards.
            self.restart().await?;
        }
        let (sha256, size) = self.hasher.finish();
        Ok(Stored { sha256, size })
    }
}

/// Opens a local file to upload.
pub(crate) async fn open_local(src: &Path) -> Result<tokio::fs::File, StorageError> {
    tokio::fs::File::open(src)
        .await
        .map_err(|source| StorageError::Local {
            path: src.to_owned(),
            source,
        })
}

/// An upload: the file and what it must arrive as.
#[derive(Clone, Copy, Debug)]
pub struct Upload {
    pub sha256: Sha256,
    pub size: u64,
}

/// One storage system, reached by URL.
pub trait Storage: Send + Sync {
    /// One try at fetching `url` into `into`; it may continue where an earlier try stopped
    /// (what `into` holds) or start over with [`Download::restart`].
    fn get_once(
        &self,
        url: &Url,
        into: &mut Download,
        cred: &Credential,
        progress: &Progress,
    ) -> impl Future<Output = Result<(), StorageError>> + Send;

    /// One try at storing the file at `src` (which is `upload`) at `url`.
    fn put_once(
        &self,
        src: &Path,
        url: &Url,
        upload: Upload,
        cred: &Credential,
        progress: &Progress,
    ) -> impl Future<Output = Result<(), StorageError>> + Send;
}

/// Transfer settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Longest an HTTP request may take; for Chirp, longest wait for any answer or chunk.
    pub timeout: Duration,
    pub retry: Retry,
    /// A CA (PEM) to trust for HTTPS beside the public ones: the project's own, for its
    /// manager's storage service.
    pub extra_root_pem: Option<Vec<u8>>,
}

/// The adapters, picked by URL scheme, with retries.
#[derive(Clone, Debug)]
pub struct Transfers {
    pub http: http::HttpStore,
    pub chirp: chirp_store::ChirpStore,
    retry: Retry,
}

/// The URL without query and fragment (which may carry credentials), for messages.
pub fn shown_url(url: &Url) -> String {
    let mut u = url.clone();
    u.set_query(None);
    u.set_fragment(None);
    u.to_string()
}

enum Scheme {
    Http,
    Chirp,
}

fn scheme(url: &Url) -> Result<Scheme, StorageError> {
    match url.scheme() {
        "http" | "https" => Ok(Scheme::Http),
        "chirp" => Ok(Scheme::Chirp),
        other => Err(StorageError::BadUrl {
            url: shown_url(url),
            reason: format!("scheme {other:?} is not http, https or chirp"),
        }),
    }
}

/// Whether `url` is one this crate can transfer.
pub fn supported(url: &Url) -> bool {
    scheme(url).is_ok()
}

impl Transfers {
    /// Adapters with these settings.
    pub fn new(settings: Settings) -> Result<Transfers, StorageError> {
        Ok(Transfers {
            http: http::HttpStore::new(settings.timeout, settings.extra_root_pem.as_deref())?,
            chirp: chirp_store::ChirpStore::new(settings.timeout),
            retry: settings.retry,
        })
    }

    /// Downloads `url` to `dest`, checked against `spec`; on failure no file is left.
    pub async fn get(
        &self,
        url: &Url,
        dest: &Path,
        spec: &GetSpec,
        cred: &Credential,
        progress: &Progress,
    ) -> Result<Stored, StorageError> {
        let kind = scheme(url)?;
        let limit = match spec.size {
            Some(size) if size > spec.limit => {
                return Err(StorageError::TooLarge {
                    url: shown_url(url),
                    limit: spec.limit,
                })
            }
            Some(size) => size,
            None => spec.limit,
        };
        let mut into = Download::new(dest, url, limit);
        let mut retry = 0;
        let result = loop {
            let r = match kind {
                Scheme::Http => self.http.get_once(url, &mut into, cred, progress).await,
                Scheme::Chirp => self.chirp.get_once(url, &mut into, cred, progress).await,
            };
            match r {
                Ok(()) => break into.finish().await.and_then(|got| check(url, spec, got)),
                Err(e)
                    if self
                        .pause_to_retry(&e, &mut retry, "download of", url)
                        .await => {}
                Err(e) => break Err(e),
            }
        };
        if result.is_err() {
            if let Err(rm) = tokio::fs::remove_file(dest).await {
                if rm.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!("cannot remove failed download {}: {rm}", dest.display());
                }
            }
        }
        result
    }

    /// Uploads the file at `src` (whose digest and size are `upload`) to `url`.
    pub async fn put(
        &self,
        src: &Path,
        url: &Url,
        upload: Upload,
        cred: &Credential,
        progress: &Progress,
    ) -> Result<(), StorageError> {
        let kind = scheme(url)?;
        let mut retry = 0;
        loop {
            let r = match kind {
                Scheme::Http => self.http.put_once(src, url, upload, cred, progress).await,
                Scheme::Chirp => self.chirp.put_once(src, url, upload, cred, progress).await,
            };
            match r {
                Err(e) if self.pause_to_retry(&e, &mut retry, "upload to", url).await => {}
                other => return other,
            }
        }
    }

    /// After a failed try: if `e` is worth another and retries are left, logs, waits the
    /// backoff and returns true.
    async fn pause_to_retry(
        &self,
        e: &StorageError,
        retry: &mut u32,
        what: &str,
        url: &Url,
    ) -> bool {
        if !e.is_retryable() {
            return false;
        }
        let Some(delay) = self.retry.delay(*retry) else {
            return false;
        };
        *retry += 1;
        tracing::warn!(
            "{what} {} failed ({e}); retry {retry} of {} in {delay:?}",
            shown_url(url),
            self.retry.retries
        );
        tokio::time::sleep(delay).await;
        true
    }
}

/// The finished download against what it should be.
fn check(url: &Url, spec: &GetSpec, got: Stored) -> Result<Stored, StorageError> {
    if let Some(expected) = spec.size.filter(|&s| s != got.size) {
        return Err(StorageError::SizeMismatch {
            url: shown_url(url),
            expected,
            got: got.size,
        });
    }
    if let Some(expected) = spec.sha256.filter(|&d| d != got.sha256) {
        return Err(StorageError::DigestMismatch {
            url: shown_url(url),
            expected,
            got: got.sha256,
        });
    }
    Ok(got)
}
