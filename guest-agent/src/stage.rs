//! Stage-in: fetch a job's inputs into its work dir.
//!
//! Each input is streamed to `<dir>/<name>` (over HTTP(S) or Chirp, see copilot-storage) while
//! its sha256 and size are computed and checked against the assignment and the agent's input
//! size limit. The attempt's credential goes only to the server it belongs to. A file that
//! failed is deleted; transient failures are retried with backoff. Inputs with a declared
//! sha256 come from the [`InputCache`] when it has them, and go into it after a download.

use std::path::Path;

use copilot_protocol::wire::WireInput;
use copilot_storage::{GetSpec, StorageError, Transfers, Url};

use crate::cache::InputCache;
use crate::transfer::JobCredentials;

/// Why an input could not be staged.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("input {name:?}: {reason}")]
    BadInput { name: String, reason: String },
    #[error("input {name:?}: {source}")]
    Transfer {
        name: String,
        #[source]
        source: StorageError,
    },
}

/// Where inputs come from: the transfers, the attempt's credentials, the cache (if any) and
/// the size bound of each input.
#[derive(Debug, Clone, Copy)]
pub struct Sources<'a> {
    pub transfers: &'a Transfers,
    pub creds: &'a JobCredentials,
    pub cache: Option<&'a InputCache>,
    pub max_size: u64,
}

/// Fetches every input into `dir`, one after another.
pub async fn stage_inputs(
    from: Sources<'_>,
    inputs: &[WireInput],
    dir: &Path,
) -> Result<(), StageError> {
    for input in inputs {
        stage_input(from, input, dir).await?;
    }
    Ok(())
}

/// Fetches one input to `dir/<name>`; on failure no file is left behind.
pub async fn stage_input(
    from: Sources<'_>,
    input: &WireInput,
    dir: &Path,
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
    if !copilot_storage::supported(&url) {
        return Err(bad(format!("URL {:?} is not http(s) or chirp", input.url)));
    }
    let dest = dir.join(name);
    let cache = from.cache.zip(input.sha256);
    if let Some((cache, sha)) = cache {
        if cache.fetch(&sha, &dest).await {
            tracing::debug!(input = %name, %sha, "input staged from the cache");
            return Ok(());
        }
    }
    let spec = GetSpec {
        sha256: input.sha256,
        size: input.size,
        limit: from.max_size,
    };
    let got = from
        .transfers
        .get(
            &url,
            &dest,
            &spec,
            &from.creds.for_input(&url),
            &copilot_storage::no_progress(),
        )
        .await
        .map_err(|source| StageError::Transfer {
            name: name.clone(),
            source,
        })?;
    tracing::debug!(input = %name, sha256 = %got.sha256, size = got.size, "input staged");
    if let Some((cache, sha)) = cache {
        cache.insert(&sha, &dest).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use copilot_protocol::Sha256;
    use copilot_storage::testserver::TestServer;

    use super::*;
    use crate::testutil::settings;

    fn input(name: &str, url: String, data: &[u8]) -> WireInput {
        WireInput {
            name: name.into(),
            url,
            sha256: Some(Sha256::of(data)),
            size: Some(data.len() as u64),
        }
    }

    fn creds_for(server: &TestServer) -> JobCredentials {
        let upload = format!("{}/outputs/1/1", server.base).parse().unwrap();
        JobCredentials::new(&upload, "tok").unwrap()
    }

    fn sources<'a>(
        t: &'a Transfers,
        creds: &'a JobCredentials,
        cache: Option<&'a InputCache>,
    ) -> Sources<'a> {
        Sources {
            transfers: t,
            creds,
            cache,
            max_size: 1 << 20,
        }
    }

    #[tokio::test]
    async fn inputs_are_staged_verified_and_the_token_goes_home_only() {
        let home = TestServer::start().await;
        let elsewhere = TestServer::start().await;
        let dir = tempfile::tempdir().unwrap();
        let t = crate::transfer::transfers(&settings(), None).unwrap();
        let inputs = [
            input("a", home.serve("a", b"from home"), b"from home"),
            input(
                "b",
                elsewhere.serve("b", b"from elsewhere"),
                b"from elsewhere",
            ),
        ];
        let creds = creds_for(&home);
        stage_inputs(sources(&t, &creds, None), &inputs, dir.path())
            .await
            .unwrap();
        assert_eq!(std::fs::read(dir.path().join("a")).unwrap(), b"from home");
        assert_eq!(
            std::fs::read(dir.path().join("b")).unwrap(),
            b"from elsewhere"
        );
        assert_eq!(home.seen()[0].authorization.as_deref(), Some("Bearer tok"));
        assert_eq!(elsewhere.seen()[0].authorization, None);
    }

    #[tokio::test]
    async fn a_cached_input_is_not_fetched_again() {
        let server = TestServer::start().await;
        let tmp = tempfile::tempdir().unwrap();
        let cache = InputCache::new(&tmp.path().join("cache"), 1 << 20).unwrap();
        let t = crate::transfer::transfers(&settings(), None).unwrap();
        let creds = creds_for(&server);
        let data = b"event generator".repeat(100);
        let shared = input("gen", server.serve("gen", &data), &data);
        let mut unverified = shared.clone();
        unverified.name = "gen-unverified".into();
        unverified.sha256 = None;
        for job in ["job-1", "job-2"] {
            let dir = tmp.path().join(job);
            std::fs::create_dir(&dir).unwrap();
            let inputs = [shared.clone(), unverified.clone()];
            stage_inputs(sources(&t, &creds, Some(&cache)), &inputs, &dir)
                .await
                .unwrap();
            assert_eq!(std::fs::read(dir.join("gen")).unwrap(), data);
            assert_eq!(std::fs::read(dir.join("gen-unverified")).unwrap(), data);
        }
        // The verified input came once from the server, then from the cache; the one without
        // a digest is never cached.
        assert_eq!(server.seen().len(), 3);
        assert_eq!(cache.stats(), (1, 1));
    }

    #[tokio::test]
    async fn a_bad_digest_names_the_input_and_leaves_no_file() {
        let server = TestServer::start().await;
        let dir = tempfile::tempdir().unwrap();
        let t = crate::transfer::transfers(&settings(), None).unwrap();
        let mut inp = input("data", server.serve("data", b"real"), b"real");
        inp.sha256 = Some(Sha256::of(b"other"));
        let creds = creds_for(&server);
        let err = stage_input(sources(&t, &creds, None), &inp, dir.path())
            .await
            .unwrap_err();
        assert!(
            matches!(&err, StageError::Transfer { name, source: StorageError::DigestMismatch { .. } } if name == "data"),
            "{err}"
        );
        assert!(err.to_string().starts_with("input \"data\": "), "{err}");
        assert!(!dir.path().join("data").exists());
    }

    #[tokio::test]
    async fn hostile_names_and_urls_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let t = crate::transfer::transfers(&settings(), None).unwrap();
        let creds = JobCredentials::new(&"http://127.0.0.1:1/".parse().unwrap(), "tok").unwrap();
        for (name, url) in [
            ("../escape", "http://127.0.0.1:1/x"),
            ("ok", "file:///etc/passwd"),
            ("ok", "not a url"),
        ] {
            let inp = input(name, url.into(), b"");
            let err = stage_input(sources(&t, &creds, None), &inp, dir.path())
                .await
                .unwrap_err();
            assert!(
                matches!(err, StageError::BadInput { .. }),
                "{name} {url}: {err}"
            );
        }
    }
}
