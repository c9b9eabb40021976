//! What stage-in and upload share: the HTTP client, the per-transfer timeout, retries with
//! exponential backoff and jitter, and the rule that the job's bearer token goes only to the
//! origin of its upload URL.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use rand::Rng;
use reqwest::Url;

use crate::config::TransferSettings;

/// First retry delay; doubles with each retry, plus up to half of it as jitter.
const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// Longest delay between two tries.
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// An HTTP client with the agent's transfer settings.
#[derive(Clone, Debug)]
pub struct Transfer {
    pub(crate) client: reqwest::Client,
    /// Longest time one try (request and body) may take.
    pub(crate) timeout: Duration,
    /// Tries after the first one.
    retries: u32,
}

/// Whether a failed try is worth another one.
pub(crate) trait Retryable: Display {
    fn is_retryable(&self) -> bool;
}

/// Whether an HTTP status says "try again later".
pub(crate) fn transient_status(status: reqwest::StatusCode) -> bool {
    status.is_server_error()
        || status == reqwest::StatusCode::TOO_MANY_REQUESTS
        || status == reqwest::StatusCode::REQUEST_TIMEOUT
}

impl Transfer {
    /// A client for these settings.
    pub fn new(settings: &TransferSettings) -> Result<Transfer, reqwest::Error> {
        let client = reqwest::Client::builder()
            .user_agent(concat!("copilot-agent/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Transfer {
            client,
            timeout: settings.timeout.as_duration(),
            retries: settings.retries,
        })
    }

    /// Runs `op` until it succeeds, fails for good, or the retries are used up.
    pub(crate) async fn retrying<T, E, F, Fut>(&self, what: &str, mut op: F) -> Result<T, E>
    where
        E: Retryable,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let mut retry = 0;
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(e) if e.is_retryable() && retry < self.retries => {
                    let delay = backoff(retry);
                    retry += 1;
                    tracing::warn!(
                        "{what} failed ({e}); retry {retry} of {} in {delay:?}",
                        self.retries
                    );
                    tokio::time::sleep(delay).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Delay before retry number `retry` (0-based): exponential, capped, with jitter.
fn backoff(retry: u32) -> Duration {
    let exp = BACKOFF_BASE
        .saturating_mul(1u32 << retry.min(16))
        .min(BACKOFF_MAX);
    let jitter_ms = rand::thread_rng().gen_range(0..=exp.as_millis() as u64 / 2);
    exp + Duration::from_millis(jitter_ms)
}

/// The origin of an http(s) URL: scheme, host and port (the default port made explicit).
type Origin = (String, String, u16);

fn origin(url: &Url) -> Option<Origin> {
    let scheme = url.scheme();
    if scheme != "http" && scheme != "https" {
        return None;
    }
    Some((
        scheme.to_owned(),
        url.host_str()?.to_owned(),
        url.port_or_known_default()?,
    ))
}

/// A bearer token bound to the origin (scheme, host, port) it may be sent to.
#[derive(Clone)]
pub struct ScopedToken {
    origin: Option<Origin>,
    token: String,
}

impl std::fmt::Debug for ScopedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScopedToken")
            .field("origin", &self.origin)
            .field("token", &"<redacted>")
            .finish()
    }
}

impl ScopedToken {
    /// The token, to be sent only to the origin of `url` (never, if `url` is not http(s)).
    pub fn new(url: &Url, token: &str) -> ScopedToken {
        ScopedToken {
            origin: origin(url),
            token: token.to_owned(),
        }
    }

    /// The token if `url` has the same origin.
    pub fn for_url(&self, url: &Url) -> Option<&str> {
        let theirs = origin(url)?;
        (self.origin.as_ref() == Some(&theirs)).then_some(self.token.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!(backoff(0) >= BACKOFF_BASE && backoff(0) <= BACKOFF_BASE * 3 / 2);
        assert!(backoff(3) >= BACKOFF_BASE * 8);
        assert!(backoff(40) <= BACKOFF_MAX * 3 / 2);
    }

    #[test]
    fn token_goes_only_to_its_origin() {
        let home: Url = "http://127.0.0.1:8080/outputs/1/1".parse().unwrap();
        let t = ScopedToken::new(&home, "s3cret");
        let ok: Url = "http://127.0.0.1:8080/inputs/abc".parse().unwrap();
        assert_eq!(t.for_url(&ok), Some("s3cret"));
        for other in [
            "http://127.0.0.1:8081/inputs/abc",
            "https://127.0.0.1:8080/inputs/abc",
            "http://localhost:8080/inputs/abc",
            "http://127.0.0.1.evil.org:8080/x",
        ] {
            assert_eq!(t.for_url(&other.parse().unwrap()), None, "{other}");
        }
        let ftp: Url = "ftp://127.0.0.1:8080/x".parse().unwrap();
        assert_eq!(ScopedToken::new(&ftp, "s3cret").for_url(&ftp), None);
        let default_port: Url = "https://example.org/x".parse().unwrap();
        let t = ScopedToken::new(&default_port, "s3cret");
        let explicit: Url = "https://example.org:443/y".parse().unwrap();
        assert_eq!(t.for_url(&explicit), Some("s3cret"));
        assert!(!format!("{t:?}").contains("s3cret"));
    }
}
