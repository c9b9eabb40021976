//! `Client`: the manager's HTTP API as typed calls (see `copilot_protocol::api`), with a typed
//! error for each way a call can fail.

use std::path::Path;

use copilot_protocol::api::{
    AgentList, ApiError, JobList, JobView, Stored, SubmitRequest, SubmitResponse,
};
use copilot_protocol::summary::{BatchView, Summary};
use copilot_protocol::{JobId, JobState, Sha256};
use futures::{Stream, StreamExt};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::de::DeserializeOwned;

/// Why an API call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the manager at {url} (is it running? see --manager/--stack)")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error(
        "the manager refused the API token ({status}): {message}; check --token/COPILOT_TOKEN"
    )]
    Unauthorized { status: StatusCode, message: String },
    #[error("{what}: the manager answered {status}: {message}")]
    Api {
        what: String,
        status: StatusCode,
        message: String,
    },
    #[error("{what}: the answer is not what the API promises: {reason}")]
    BadAnswer { what: String, reason: String },
    #[error("{what}: reading the answer failed")]
    Body {
        what: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{0} is not a valid manager URL (want e.g. http://127.0.0.1:8080)")]
    BadUrl(String),
    #[error("the project CA is not usable: {0}")]
    Ca(#[source] reqwest::Error),
}

/// A connection to one manager with one API token.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    /// A client for the manager at `base` (e.g. `http://127.0.0.1:8080`), trusting the
    /// certificates in `ca_pem` beside the public CAs for an `https://` one.
    pub fn new(base: &str, token: &str, ca_pem: Option<&[u8]>) -> Result<Client, ClientError> {
        let base = base.trim_end_matches('/').to_owned();
        if reqwest::Url::parse(&base).is_err() || !base.starts_with("http") {
            return Err(ClientError::BadUrl(base));
        }
        let mut builder = reqwest::Client::builder();
        if let Some(pem) = ca_pem {
            for cert in reqwest::Certificate::from_pem_bundle(pem).map_err(ClientError::Ca)? {
                builder = builder.add_root_certificate(cert);
            }
        }
        Ok(Client {
            http: builder.build().map_err(ClientError::Ca)?,
            base,
            token: token.to_owned(),
        })
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token)
    }

    /// Send, and turn connection failures and non-2xx answers into errors.
    async fn send(&self, what: &str, req: RequestBuilder) -> Result<Response, ClientError> {
        let resp = req
            .send()
            .await
            .map_err(|source| ClientError::Unreachable {
                url: self.base.clone(),
                source,
            })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let text = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<ApiError>(&text)
            .map(|e| e.error)
            .unwrap_or_else(|_| text.chars().take(300).collect());
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(ClientError::Unauthorized { status, message });
        }
        Err(ClientError::Api {
            what: what.to_owned(),
            status,
            message,
        })
    }

    async fn json<T: DeserializeOwned>(
        &self,
        what: &str,
        req: RequestBuilder,
    ) -> Result<T, ClientError> {
        let body = self
            .send(what, req)
            .await?
            .bytes()
            .await
            .map_err(|source| ClientError::Body {
                what: what.to_owned(),
                source,
            })?;
        serde_json::from_slice(&body).map_err(|e| ClientError::BadAnswer {
            what: what.to_owned(),
            reason: e.to_string(),
        })
    }

    /// PUT a local file to the storage service under its digest. `body` streams the file's
    /// bytes (the caller counts them for a progress bar).
    pub async fn upload_input<S>(
        &self,
        path: &Path,
        sha256: Sha256,
        size: u64,
        body: S,
    ) -> Result<Stored, ClientError>
    where
        S: Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static,
    {
        let what = format!("uploading {}", path.display());
        let req = self
            .request(Method::PUT, &format!("/inputs/{sha256}"))
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .header(reqwest::header::CONTENT_LENGTH, size)
            .body(reqwest::Body::wrap_stream(body));
        let stored: Stored = self.json(&what, req).await?;
        if stored.sha256 != sha256 || stored.size != size {
            return Err(ClientError::BadAnswer {
                what,
                reason: format!(
                    "stored {} ({} bytes), expected {sha256} ({size} bytes)",
                    stored.sha256, stored.size
                ),
            });
        }
        Ok(stored)
    }

    /// POST /api/jobs.
    pub async fn submit(&self, req: &SubmitRequest) -> Result<Vec<JobId>, ClientError> {
        let what = "submitting jobs";
        let resp: SubmitResponse = self
            .json(what, self.request(Method::POST, "/api/jobs").json(req))
            .await?;
        // One id per job, or per replica of a replicated job.
        let expected: usize = req
            .jobs
            .iter()
            .map(|j| j.replication.as_ref().map_or(1, |r| r.replicas as usize))
            .sum();
        if resp.ids.len() != expected {
            return Err(ClientError::BadAnswer {
                what: what.into(),
                reason: format!("{} ids for {expected} jobs and replicas", resp.ids.len()),
            });
        }
        Ok(resp.ids)
    }

    /// GET /api/jobs[?state=S].
    pub async fn jobs(&self, state: Option<JobState>) -> Result<JobList, ClientError> {
        let mut req = self.request(Method::GET, "/api/jobs");
        if let Some(s) = state {
            req = req.query(&[("state", s.to_string())]);
        }
        self.json("listing jobs", req).await
    }

    /// GET /api/jobs/{id}.
    pub async fn job(&self, id: JobId) -> Result<JobView, ClientError> {
        self.json(
            &format!("job {id}"),
            self.request(Method::GET, &format!("/api/jobs/{id}")),
        )
        .await
    }

    /// GET /api/jobs/{id}/output as a byte stream.
    pub async fn output(
        &self,
        id: JobId,
    ) -> Result<impl Stream<Item = Result<bytes::Bytes, ClientError>>, ClientError> {
        let what = format!("output of job {id}");
        let resp = self
            .send(
                &what,
                self.request(Method::GET, &format!("/api/jobs/{id}/output")),
            )
            .await?;
        Ok(resp.bytes_stream().map(move |r| {
            r.map_err(|source| ClientError::Body {
                what: what.clone(),
                source,
            })
        }))
    }

    /// GET /api/summary[?window=S].
    pub async fn summary(&self, window_secs: Option<u64>) -> Result<Summary, ClientError> {
        let mut req = self.request(Method::GET, "/api/summary");
        if let Some(w) = window_secs {
            req = req.query(&[("window", w.to_string())]);
        }
        self.json("the summary", req).await
    }

    /// GET /api/batches/{name}.
    pub async fn batch(&self, name: &str) -> Result<BatchView, ClientError> {
        let mut url =
            reqwest::Url::parse(&self.base).map_err(|_| ClientError::BadUrl(self.base.clone()))?;
        url.path_segments_mut()
            .map_err(|()| ClientError::BadUrl(self.base.clone()))?
            .pop_if_empty()
            .extend(["api", "batches", name]);
        let req = self.http.get(url).bearer_auth(&self.token);
        self.json(&format!("batch {name}"), req).await
    }

    /// The manager's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The API token.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// GET /api/agents.
    pub async fn agents(&self) -> Result<AgentList, ClientError> {
        self.json("listing agents", self.request(Method::GET, "/api/agents"))
            .await
    }
}
