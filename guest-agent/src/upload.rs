//! Stage-out, part two: stream the packed archive to the job's upload URL.
//!
//! One HTTP PUT with the job's bearer token and the archive's sha256 in
//! [`CONTENT_SHA256_HEADER`]. Connection errors, timeouts and 5xx answers are retried with
//! backoff; a 4xx answer is final and its JSON `error` text is passed on.

use std::path::{Path, PathBuf};

use copilot_protocol::api::{ApiError, Stored, CONTENT_SHA256_HEADER};
use copilot_protocol::Sha256;
use reqwest::{StatusCode, Url};

use crate::stage::error_chain;
use crate::transfer::{transient_status, Retryable, Transfer};

/// Longest server error text kept in a message.
const MAX_ERROR_TEXT: usize = 500;

/// Why the archive could not be uploaded.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("cannot read archive {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("upload to {url} failed: {reason}")]
    Transport { url: String, reason: String },
    #[error("upload refused with HTTP {status}: {message}")]
    Refused { status: StatusCode, message: String },
    #[error("the server stored sha256 {got} ({got_size} bytes), the archive is {want} ({want_size} bytes)")]
    Mismatch {
        want: Sha256,
        want_size: u64,
        got: Sha256,
        got_size: u64,
    },
}

impl Retryable for UploadError {
    fn is_retryable(&self) -> bool {
        match self {
            UploadError::Transport { .. } => true,
            UploadError::Refused { status, .. } => transient_status(*status),
            UploadError::Io { .. } | UploadError::Mismatch { .. } => false,
        }
    }
}

/// PUTs the archive at `path` (whose digest and size are given) to `url`.
pub async fn upload(
    transfer: &Transfer,
    path: &Path,
    sha256: Sha256,
    size: u64,
    url: &Url,
    token: &str,
) -> Result<(), UploadError> {
    transfer
        .retrying("upload of the output archive", || {
            put_once(transfer, path, sha256, size, url, token)
        })
        .await?;
    tracing::debug!(%sha256, size, "archive uploaded");
    Ok(())
}

async fn put_once(
    transfer: &Transfer,
    path: &Path,
    sha256: Sha256,
    size: u64,
    url: &Url,
    token: &str,
) -> Result<(), UploadError> {
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|source| UploadError::Io {
            path: path.to_owned(),
            source,
        })?;
    let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
    let transport = |e: reqwest::Error| UploadError::Transport {
        url: url.to_string(),
        reason: error_chain(&e.without_url()),
    };
    let resp = transfer
        .client
        .put(url.clone())
        .timeout(transfer.timeout)
        .bearer_auth(token)
        .header(CONTENT_SHA256_HEADER, sha256.to_string())
        .header(reqwest::header::CONTENT_LENGTH, size)
        .header(reqwest::header::CONTENT_TYPE, "application/gzip")
        .body(body)
        .send()
        .await
        .map_err(transport)?;
    let status = resp.status();
    let text = resp.text().await.map_err(transport)?;
    if !status.is_success() {
        return Err(UploadError::Refused {
            status,
            message: server_message(&text),
        });
    }
    match serde_json::from_str::<Stored>(&text) {
        Ok(stored) if (stored.sha256, stored.size) != (sha256, size) => {
            Err(UploadError::Mismatch {
                want: sha256,
                want_size: size,
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
mod tests {
    use super::*;
    use crate::testserver::{settings, TestServer};

    async fn setup(server: &TestServer) -> (tempfile::TempDir, PathBuf, Sha256, u64, Url) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.tar.gz");
        let data = b"pretend this is a tar.gz".repeat(100);
        std::fs::write(&path, &data).unwrap();
        let url = format!("{}/outputs/7/1", server.base).parse().unwrap();
        (dir, path, Sha256::of(&data), data.len() as u64, url)
    }

    #[tokio::test]
    async fn archive_is_streamed_with_token_and_digest() {
        let server = TestServer::start().await;
        let (_dir, path, sha, size, url) = setup(&server).await;
        let t = Transfer::new(&settings()).unwrap();
        upload(&t, &path, sha, size, &url, "tok").await.unwrap();
        let puts = server.puts();
        assert_eq!(puts.len(), 1);
        assert_eq!(puts[0].path, "/outputs/7/1");
        assert_eq!(puts[0].body, std::fs::read(&path).unwrap());
        assert_eq!(puts[0].authorization.as_deref(), Some("Bearer tok"));
        assert_eq!(puts[0].content_sha256, Some(sha.to_string()));
    }

    #[tokio::test]
    async fn server_errors_are_retried() {
        let server = TestServer::start().await;
        let (_dir, path, sha, size, url) = setup(&server).await;
        server.answer_puts_with(&[503]);
        let t = Transfer::new(&settings()).unwrap();
        upload(&t, &path, sha, size, &url, "tok").await.unwrap();
        let puts = server.puts();
        assert_eq!(puts.len(), 2);
        assert_eq!(
            puts[1].body.len() as u64,
            size,
            "the retry sent the whole file"
        );
    }

    #[tokio::test]
    async fn client_errors_are_final_and_explained() {
        let server = TestServer::start().await;
        let (_dir, path, sha, size, url) = setup(&server).await;
        server.answer_puts_with(&[403]);
        let t = Transfer::new(&settings()).unwrap();
        let err = upload(&t, &path, sha, size, &url, "tok").await.unwrap_err();
        assert!(err.to_string().contains("scripted failure 403"), "{err}");
        assert!(
            matches!(err, UploadError::Refused { status, .. } if status == StatusCode::FORBIDDEN)
        );
        assert_eq!(server.puts().len(), 1);
    }

    #[tokio::test]
    async fn a_wrong_stored_digest_is_an_error() {
        let server = TestServer::start().await;
        let (_dir, path, _sha, size, url) = setup(&server).await;
        let t = Transfer::new(&settings()).unwrap();
        let claimed = Sha256::of(b"not the file");
        let err = upload(&t, &path, claimed, size, &url, "tok")
            .await
            .unwrap_err();
        assert!(matches!(err, UploadError::Mismatch { .. }), "{err}");
    }

    #[test]
    fn server_messages_are_extracted() {
        assert_eq!(
            server_message(r#"{"error":"token expired"}"#),
            "token expired"
        );
        assert_eq!(server_message("plain text\n"), "plain text");
        assert_eq!(server_message(""), "(no message)");
        assert_eq!(server_message(&"x".repeat(2000)).len(), MAX_ERROR_TEXT);
    }
}
