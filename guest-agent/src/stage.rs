//! Stage-in: download a job's inputs into its work dir.
//!
//! Each input is streamed to `<dir>/<name>` while its sha256 and size are computed and checked
//! against the assignment (and the agent's input size limit). The job's bearer token is sent
//! only to the origin of its upload URL. Transient failures (connection errors, timeouts, 5xx)
//! are retried with backoff; a file that failed is deleted.

use std::path::{Path, PathBuf};

use copilot_protocol::digest::Hasher;
use copilot_protocol::wire::WireInput;
use copilot_protocol::Sha256;
use futures::StreamExt;
use reqwest::{StatusCode, Url};
use tokio::io::AsyncWriteExt;

use crate::transfer::{transient_status, Retryable, ScopedToken, Transfer};

/// Why an input could not be staged.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("input {name:?}: {reason}")]
    BadInput { name: String, reason: String },
    #[error("input {name:?}: {url} answered HTTP {status}")]
    Status {
        name: String,
        url: String,
        status: StatusCode,
    },
    #[error("input {name:?}: download from {url} failed: {reason}")]
    Transport {
        name: String,
        url: String,
        reason: String,
    },
    #[error("input {name:?} is larger than {limit} bytes")]
    TooLarge { name: String, limit: u64 },
    #[error("input {name:?} has {got} bytes, the job says {expected}")]
    SizeMismatch {
        name: String,
        expected: u64,
        got: u64,
    },
    #[error("input {name:?} has sha256 {got}, the job says {expected}")]
    DigestMismatch {
        name: String,
        expected: Sha256,
        got: Sha256,
    },
    #[error("input {name:?}: cannot write {}: {source}", path.display())]
    Io {
        name: String,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl Retryable for StageError {
    fn is_retryable(&self) -> bool {
        match self {
            StageError::Status { status, .. } => transient_status(*status),
            StageError::Transport { .. } => true,
            _ => false,
        }
    }
}

/// An error's message followed by its sources, `a: b: c`.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Downloads every input into `dir`, one after another. `max_size` bounds each input.
pub async fn stage_inputs(
    transfer: &Transfer,
    inputs: &[WireInput],
    dir: &Path,
    token: &ScopedToken,
    max_size: u64,
) -> Result<(), StageError> {
    for input in inputs {
        stage_input(transfer, input, dir, token, max_size).await?;
    }
    Ok(())
}

/// Downloads one input to `dir/<name>`; on failure no file is left behind.
pub async fn stage_input(
    transfer: &Transfer,
    input: &WireInput,
    dir: &Path,
    token: &ScopedToken,
    max_size: u64,
) -> Result<(), StageError> {
    let name = &input.name;
    let bad = |reason: String| StageError::BadInput {
        name: name.clone(),
        reason,
    };
    copilot_protocol::job::validate_input_name(name).map_err(|e| bad(e.to_string()))?;
    let url: Url = input
        .url
        .parse()
        .map_err(|e| bad(format!("bad URL {:?}: {e}", input.url)))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad(format!("URL {:?} is not http(s)", input.url)));
    }
    let limit = match input.size {
        Some(size) if size > max_size => {
            return Err(StageError::TooLarge {
                name: name.clone(),
                limit: max_size,
            })
        }
        Some(size) => size,
        None => max_size,
    };
    let path = dir.join(name);
    let what = format!("download of input {name:?}");
    let result = transfer
        .retrying(&what, || fetch(transfer, input, &url, &path, token, limit))
        .await;
    match result {
        Ok((sha256, size)) => {
            tracing::debug!(input = %name, %sha256, size, "input staged");
            Ok(())
        }
        Err(e) => {
            if let Err(rm) = tokio::fs::remove_file(&path).await {
                if rm.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!("cannot remove failed input {}: {rm}", path.display());
                }
            }
            Err(e)
        }
    }
}

/// One try: GET `url` into `path` (truncating it), hashing as the bytes arrive.
async fn fetch(
    transfer: &Transfer,
    input: &WireInput,
    url: &Url,
    path: &Path,
    token: &ScopedToken,
    limit: u64,
) -> Result<(Sha256, u64), StageError> {
    let name = &input.name;
    let shown = shown_url(url);
    let transport = |e: reqwest::Error| StageError::Transport {
        name: name.clone(),
        url: shown.clone(),
        reason: error_chain(&e.without_url()),
    };
    let too_large = || StageError::TooLarge {
        name: name.clone(),
        limit,
    };
    let io = |source| StageError::Io {
        name: name.clone(),
        path: path.to_owned(),
        source,
    };
    let mut req = transfer.client.get(url.clone()).timeout(transfer.timeout);
    if let Some(t) = token.for_url(url) {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.map_err(transport)?;
    if !resp.status().is_success() {
        return Err(StageError::Status {
            name: name.clone(),
            url: shown.clone(),
            status: resp.status(),
        });
    }
    if resp.content_length().is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let mut file = tokio::fs::File::create(path).await.map_err(io)?;
    let mut hasher = Hasher::new();
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(transport)?;
        if hasher.len() + chunk.len() as u64 > limit {
            return Err(too_large());
        }
        hasher.update(&chunk);
        file.write_all(&chunk).await.map_err(io)?;
    }
    file.flush().await.map_err(io)?;
    let (got, size) = hasher.finish();
    if let Some(expected) = input.size.filter(|&s| s != size) {
        return Err(StageError::SizeMismatch {
            name: name.clone(),
            expected,
            got: size,
        });
    }
    if let Some(expected) = input.sha256.filter(|&d| d != got) {
        return Err(StageError::DigestMismatch {
            name: name.clone(),
            expected,
            got,
        });
    }
    Ok((got, size))
}

/// The URL without query and fragment (which may carry credentials), for messages.
fn shown_url(url: &Url) -> String {
    let mut u = url.clone();
    u.set_query(None);
    u.set_fragment(None);
    u.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testserver::{settings, TestServer};

    fn input(name: &str, url: String, data: &[u8]) -> WireInput {
        WireInput {
            name: name.into(),
            url,
            sha256: Some(Sha256::of(data)),
            size: Some(data.len() as u64),
        }
    }

    fn token_for(server: &TestServer) -> ScopedToken {
        ScopedToken::new(
            &format!("{}/outputs/1/1", server.base).parse().unwrap(),
            "tok",
        )
    }

    #[tokio::test]
    async fn good_input_is_staged_and_verified() {
        let server = TestServer::start().await;
        let data = b"echo hello\n".repeat(1000);
        let url = server.serve("run.sh", &data);
        let dir = tempfile::tempdir().unwrap();
        let t = Transfer::new(&settings()).unwrap();
        let mut inputs = vec![input("run.sh", url.clone(), &data)];
        inputs.push(WireInput {
            name: "unverified.sh".into(),
            url,
            sha256: None,
            size: None,
        });
        stage_inputs(&t, &inputs, dir.path(), &token_for(&server), 1 << 20)
            .await
            .unwrap();
        assert_eq!(std::fs::read(dir.path().join("run.sh")).unwrap(), data);
        assert_eq!(
            std::fs::read(dir.path().join("unverified.sh")).unwrap(),
            data
        );
    }

    #[tokio::test]
    async fn wrong_digest_fails_and_leaves_no_file() {
        let server = TestServer::start().await;
        let url = server.serve("data", b"the real content");
        let dir = tempfile::tempdir().unwrap();
        let t = Transfer::new(&settings()).unwrap();
        let mut inp = input("data", url, b"the real content");
        inp.sha256 = Some(Sha256::of(b"something else"));
        let err = stage_input(&t, &inp, dir.path(), &token_for(&server), 1 << 20)
            .await
            .unwrap_err();
        assert!(matches!(err, StageError::DigestMismatch { .. }), "{err}");
        assert!(!dir.path().join("data").exists());
        assert_eq!(server.seen().len(), 1, "a digest mismatch is not retried");
    }

    #[tokio::test]
    async fn size_limits_are_enforced() {
        let server = TestServer::start().await;
        let data = vec![7u8; 5000];
        let url = server.serve("big", &data);
        let dir = tempfile::tempdir().unwrap();
        let t = Transfer::new(&settings()).unwrap();
        let mut inp = input("big", url, &data);
        inp.size = None;
        let err = stage_input(&t, &inp, dir.path(), &token_for(&server), 4096)
            .await
            .unwrap_err();
        assert!(
            matches!(err, StageError::TooLarge { limit: 4096, .. }),
            "{err}"
        );
        assert!(!dir.path().join("big").exists());
        inp.size = Some(100);
        let err = stage_input(&t, &inp, dir.path(), &token_for(&server), 1 << 20)
            .await
            .unwrap_err();
        assert!(
            matches!(err, StageError::TooLarge { limit: 100, .. }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn token_goes_only_to_the_upload_origin() {
        let home = TestServer::start().await;
        let elsewhere = TestServer::start().await;
        let dir = tempfile::tempdir().unwrap();
        let t = Transfer::new(&settings()).unwrap();
        let inputs = [
            input("a", home.serve("a", b"from home"), b"from home"),
            input(
                "b",
                elsewhere.serve("b", b"from elsewhere"),
                b"from elsewhere",
            ),
        ];
        stage_inputs(&t, &inputs, dir.path(), &token_for(&home), 1 << 20)
            .await
            .unwrap();
        let at_home = home.seen();
        assert_eq!(at_home.len(), 1);
        assert_eq!(at_home[0].authorization.as_deref(), Some("Bearer tok"));
        let there = elsewhere.seen();
        assert_eq!(there.len(), 1);
        assert_eq!(there[0].authorization, None);
    }

    #[tokio::test]
    async fn missing_input_is_an_http_error_without_retries() {
        let server = TestServer::start().await;
        let dir = tempfile::tempdir().unwrap();
        let t = Transfer::new(&settings()).unwrap();
        let inp = input("x", format!("{}/files/nothing", server.base), b"x");
        let err = stage_input(&t, &inp, dir.path(), &token_for(&server), 1 << 20)
            .await
            .unwrap_err();
        assert!(
            matches!(err, StageError::Status { status, .. } if status == StatusCode::NOT_FOUND),
            "{err}"
        );
        assert_eq!(server.seen().len(), 1);
    }

    #[tokio::test]
    async fn hostile_names_and_urls_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let t = Transfer::new(&settings()).unwrap();
        let token = ScopedToken::new(&"http://127.0.0.1:1/".parse().unwrap(), "tok");
        for (name, url) in [
            ("../escape", "http://127.0.0.1:1/x"),
            ("ok", "file:///etc/passwd"),
            ("ok", "not a url"),
        ] {
            let inp = input(name, url.into(), b"");
            let err = stage_input(&t, &inp, dir.path(), &token, 1 << 20)
                .await
                .unwrap_err();
            assert!(
                matches!(err, StageError::BadInput { .. }),
                "{name} {url}: {err}"
            );
        }
    }
}
