//! HTTP(S) storage: GET with resume (a retry asks for the rest with `Range`), and PUT of a
//! streamed file with a bearer token and its sha256 in [`CONTENT_SHA256_HEADER`], answered by
//! a [`Stored`] record (the manager's storage service) that must match.

use std::path::Path;
use std::time::Duration;

use copilot_protocol::api::{ApiError, Stored, CONTENT_SHA256_HEADER};
use futures::StreamExt;
use reqwest::header::{CONTENT_RANGE, RANGE};
use reqwest::{StatusCode, Url};

use crate::{shown_url, Credential, Download, Progress, Storage, StorageError, Upload};

/// Longest server error text kept in a message.
const MAX_ERROR_TEXT: usize = 500;

/// Whether an HTTP status says "try again later".
pub fn transient_status(status: StatusCode) -> bool {
    status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
}

/// An HTTP client with a per-request timeout.
#[derive(Clone, Debug)]
pub struct HttpStore {
    client: reqwest::Client,
    timeout: Duration,
}

/// An error's message followed by its sources, `a: b: c`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

impl HttpStore {
    /// A client whose requests (headers and body) may take `timeout` each, trusting the
    /// certificates in `extra_root_pem` for HTTPS beside the public CAs.
    pub fn new(
        timeout: Duration,
        extra_root_pem: Option<&[u8]>,
    ) -> Result<HttpStore, StorageError> {
        let setup = |e: reqwest::Error| StorageError::Transport {
            url: String::new(),
            reason: error_chain(&e),
        };
        let mut builder =
            reqwest::Client::builder().user_agent(concat!("copilot/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = extra_root_pem {
            for cert in reqwest::Certificate::from_pem_bundle(pem).map_err(setup)? {
                builder = builder.add_root_certificate(cert);
            }
        }
        let client = builder.build().map_err(setup)?;
        Ok(HttpStore { client, timeout })
    }

    fn transport(url: &Url) -> impl Fn(reqwest::Error) -> StorageError + '_ {
        move |e| StorageError::Transport {
            url: shown_url(url),
            reason: error_chain(&e.without_url()),
        }
    }
}

/// Where a `206 Partial Content` answer starts (`Content-Range: bytes START-END/TOTAL`).
fn range_start(resp: &reqwest::Response) -> Option<u64> {
    let v = resp.headers().get(CONTENT_RANGE)?.to_str().ok()?;
    let range = v.strip_prefix("bytes ")?;
    range.split('-').next()?.trim().parse().ok()
}

impl Storage for HttpStore {
    async fn get_once(
        &self,
        url: &Url,
        into: &mut Download,
        cred: &Credential,
        progress: &Progress,
    ) -> Result<(), StorageError> {
        let transport = Self::transport(url);
        let mut req = self.client.get(url.clone()).timeout(self.timeout);
        if let Credential::Bearer(t) = cred {
            req = req.bearer_auth(t);
        }
        let have = into.len();
        if have > 0 {
            req = req.header(RANGE, format!("bytes={have}-"));
        }
        let resp = req.send().await.map_err(&transport)?;
        let status = resp.status();
        let resumed = status == StatusCode::PARTIAL_CONTENT && range_start(&resp) == Some(have);
        if !status.is_success() {
            return Err(StorageError::Status {
                url: shown_url(url),
                status,
                message: None,
            });
        }
        if resumed {
            tracing::info!(url = %shown_url(url), from = have, "download resumed");
            into.check_total(resp.content_length().map(|n| n + have))?;
        } else {
            // A full answer (the server ignores ranges, or this is the first try).
            into.restart().await?;
            into.check_total(resp.content_length())?;
        }
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(&transport)?;
            into.append(&chunk).await?;
            progress(into.len());
        }
        Ok(())
    }

    async fn put_once(
        &self,
        src: &Path,
        url: &Url,
        upload: Upload,
        cred: &Credential,
        progress: &Progress,
    ) -> Result<(), StorageError> {
        let file = crate::open_local(src).await?;
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let progress = progress.clone();
        let stream =
            tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024).inspect(move |chunk| {
                if let Ok(c) = chunk {
                    let n = sent.fetch_add(c.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    progress(n + c.len() as u64);
                }
            });
        let transport = Self::transport(url);
        let mut req = self
            .client
            .put(url.clone())
            .timeout(self.timeout)
            .header(CONTENT_SHA256_HEADER, upload.sha256.to_string())
            .header(reqwest::header::CONTENT_LENGTH, upload.size)
            .header(reqwest::header::CONTENT_TYPE, "application/gzip")
            .body(reqwest::Body::wrap_stream(stream));
        if let Credential::Bearer(t) = cred {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.map_err(&transport)?;
        let status = resp.status();
        let text = resp.text().await.map_err(&transport)?;
        if !status.is_success() {
            return Err(StorageError::Status {
                url: shown_url(url),
                status,
                message: Some(server_message(&text)),
            });
        }
        match serde_json::from_str::<Stored>(&text) {
            Ok(stored) if (stored.sha256, stored.size) != (upload.sha256, upload.size) => {
                Err(StorageError::StoredMismatch {
                    want: upload.sha256,
                    want_size: upload.size,
                    got: stored.sha256,
                    got_size: stored.size,
                })
            }
            Ok(_) => Ok(()),
            Err(e) => {
                tracing::warn!("upload answer is not a Stored record ({e}); trusting the status");
                Ok(())
            }
        }
    }
}

/// The `error` text of a JSON error body, or the body itself, shortened.
fn server_message(body: &str) -> String {
    let text = match serde_json::from_str::<ApiError>(body) {
        Ok(e) => e.error,
        Err(_) if body.trim().is_empty() => "(no message)".to_owned(),
        Err(_) => body.trim().to_owned(),
    };
    text.chars().take(MAX_ERROR_TEXT).collect()
}

#[cfg(test)]
mod tests;
