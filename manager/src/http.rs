//! The manager's HTTP side: the storage service (inputs in, output archives in, both out), the
//! JSON API (submit, list, show, results, agents), as in `copilot_protocol::api`, its
//! aggregated views for people (`views`, as in `copilot_protocol::summary`), the web dashboard
//! under `/ui` (`web`), and the Prometheus metrics (`GET /metrics`, see [`crate::metrics`]).
//!
//! Authorization is a bearer token: the API token for everything people do, an attempt's upload
//! token for its output upload and its stored inputs. Bodies stream to disk through
//! [`Blobs`] with size limits (413) and digest checks (422). Every error is an [`ApiError`]
//! JSON body saying what to do.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, LazyLock, Mutex};

use axum::body::{to_bytes, Body};
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderName, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use copilot_protocol::api::{
    ApiError, Stored, SubmitRequest, SubmitResponse, CONTENT_SHA256_HEADER,
};
use copilot_protocol::job::InputSource;
use copilot_protocol::{JobId, JobState, Sha256};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use tokio_util::io::ReaderStream;

use crate::blobs::{BlobError, Blobs};
use crate::metrics::{refusal_reason, Metrics};
use crate::queue::{same_token, Queue, QueueError};
use crate::Shared;
use copilot_xmpp::LogLimiter;

/// Largest submit request body.
const MAX_SUBMIT_BYTES: usize = 32 << 20;

mod views;
mod web;

/// Serve the storage service, API and dashboard on `listener` (TCP, or TLS over TCP) until
/// `shutdown` resolves.
pub async fn serve<L>(
    listener: L,
    shared: Arc<Shared>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    axum::serve(listener, app_until(shared, stop.clone()).await?)
        .with_graceful_shutdown(web::stopped(stop))
        .await
}

/// The HTTP service of `shared` as a router (its blob store opened). Its dashboard's event
/// streams end when the router is dropped.
pub async fn app(shared: Arc<Shared>) -> std::io::Result<Router> {
    // The sender is dropped at once: nothing will say stop.
    app_until(shared, tokio::sync::watch::channel(false).1).await
}

/// [`app`], whose dashboard's event streams also end once `stop` says so (so that a graceful
/// shutdown does not wait for open pages).
async fn app_until(
    shared: Arc<Shared>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<Router> {
    let blobs = Blobs::open(&shared.config.data_dir)
        .await
        .map_err(std::io::Error::other)?;
    let views = Arc::new(views::Views::new());
    let (stamp_tx, stamps) = tokio::sync::watch::channel(String::new());
    tokio::spawn(web::watch_stamps(
        shared.clone(),
        views.clone(),
        stamp_tx,
        stop.clone(),
    ));
    let app = App {
        shared,
        blobs,
        views,
        stamps,
    };
    // The validators read archives the way the API serves them.
    if !app.shared.config.validators.is_empty() {
        tokio::spawn(crate::validate::run(
            app.shared.clone(),
            app.clone(),
            web::stopped(stop),
        ));
    }
    Ok(router(app))
}

#[derive(Clone)]
struct App {
    shared: Arc<Shared>,
    blobs: Blobs,
    views: Arc<views::Views>,
    /// The latest stamp of jobs and agents (see [`stamp`]), for the dashboard's events.
    stamps: tokio::sync::watch::Receiver<String>,
}

/// A stamp of the state of jobs and agents: it changes whenever a job changes state or an
/// agent comes, goes, takes or finishes a job.
async fn stamp(shared: &Arc<Shared>) -> Answer<String> {
    use std::hash::{Hash, Hasher};
    let last = db(shared, |q| q.last_event_id()).await?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for a in shared.fleet.list().agents {
        (a.name, a.online, a.running, a.version, a.jobs_done).hash(&mut h);
    }
    Ok(format!("{last}-{:x}", h.finish()))
}

impl App {
    /// See [`stamp`].
    async fn stamp(&self) -> Answer<String> {
        stamp(&self.shared).await
    }
}

fn router(app: App) -> Router {
    Router::new()
        .route("/inputs/{sha256}", put(put_input).get(get_input))
        .route("/outputs/{job}/{attempt}", put(put_output))
        .route("/api/jobs", get(list_jobs).post(submit))
        .route("/api/jobs/{id}", get(show_job))
        .route("/api/jobs/{id}/output", get(job_output))
        .route("/api/jobs/{id}/events", get(views::job_events))
        .route("/api/jobs/{id}/files/{*path}", get(views::job_file))
        .route("/api/agents", get(agents))
        .route("/api/summary", get(views::summary))
        .route("/api/batches/{name}", get(views::batch))
        .route("/api/contributions", get(views::contributions))
        .route("/api/volunteers", get(volunteers))
        // No token by default (`http.metrics_public`): Prometheus scrapes it, and it reveals
        // only counts (no job names, agent names, addresses or tokens).
        .route("/metrics", get(metrics))
        .merge(web::routes())
        .fallback(|| async { fail(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(middleware::from_fn_with_state(app.clone(), count_requests))
        .with_state(app)
}

/// The route class of a request path, one of [`crate::metrics::ROUTES`].
fn route_class(path: &str) -> &'static str {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match parts.as_slice() {
        ["inputs", _] => "inputs",
        ["outputs", _, _] => "outputs",
        ["api", "jobs"] => "jobs",
        ["api", "jobs", _] => "job",
        ["api", "jobs", _, "output"] => "job_output",
        ["api", "jobs", _, "events"] | ["api", "jobs", _, "files", ..] => "job_files",
        ["api", "agents"] => "agents",
        ["api", "summary"] => "summary",
        ["api", "batches", _] => "batch",
        ["api", "contributions"] => "contributions",
        ["api", "volunteers"] => "volunteers",
        ["metrics"] => "metrics",
        [""] | ["ui", ..] => "ui",
        _ => "other",
    }
}

/// Count every request by route class and status class.
async fn count_requests(
    State(app): State<App>,
    req: axum::extract::Request,
    next: Next,
) -> Response {
    let route = route_class(req.uri().path());
    let resp = next.run(req).await;
    app.shared
        .metrics
        .http_request(route, resp.status().as_u16());
    resp
}

async fn metrics(State(app): State<App>, headers: HeaderMap) -> Answer<Response> {
    if !app.shared.config.http.metrics_public {
        require_api(&app, &headers)?;
    }
    let counts = db(&app.shared, |q| q.counts()).await?;
    let online = app.shared.fleet.online_count() as u64;
    let text = app.shared.metrics.render(&counts, online);
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

/// An error answer: status and message.
#[derive(Debug)]
struct Fail(StatusCode, String);

fn fail(status: StatusCode, msg: impl Into<String>) -> Fail {
    Fail(status, msg.into())
}

fn internal(e: impl std::fmt::Display) -> Fail {
    tracing::error!("internal error: {e}");
    fail(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("internal error ({e}); try again later or see the manager log"),
    )
}

/// The manager's disk is full: 507, which agents retry with backoff, and a warning logged a
/// few times a minute (a full disk fails every write until someone frees space).
fn disk_full(e: impl std::fmt::Display) -> Fail {
    static LOG: LazyLock<Mutex<LogLimiter>> =
        LazyLock::new(|| Mutex::new(LogLimiter::new(5, std::time::Duration::from_secs(60))));
    let allowed = LOG
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .check(std::time::Instant::now());
    if let Some(suppressed) = allowed {
        tracing::warn!(suppressed, "storage full, refusing a write: {e}");
    }
    fail(
        StatusCode::INSUFFICIENT_STORAGE,
        format!("the manager's storage is full ({e}); try again later"),
    )
}

impl IntoResponse for Fail {
    fn into_response(self) -> Response {
        (self.0, Json(ApiError { error: self.1 })).into_response()
    }
}

impl From<QueueError> for Fail {
    fn from(e: QueueError) -> Fail {
        let status = match &e {
            QueueError::UnknownJob(_) => StatusCode::NOT_FOUND,
            QueueError::StaleLease { .. } | QueueError::BadTransition(_) => StatusCode::CONFLICT,
            QueueError::TokenInvalid => StatusCode::FORBIDDEN,
            QueueError::Sqlite(_) if e.is_disk_full() => return disk_full(e),
            QueueError::Sqlite(_) | QueueError::Corrupt(_) => return internal(e),
        };
        fail(status, e.to_string())
    }
}

impl From<BlobError> for Fail {
    fn from(e: BlobError) -> Fail {
        let status = match &e {
            BlobError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            BlobError::DigestMismatch { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            BlobError::Body(_) => StatusCode::BAD_REQUEST,
            BlobError::Io { .. } if e.is_disk_full() => return disk_full(e),
            BlobError::Io { .. } => return internal(e),
        };
        fail(status, e.to_string())
    }
}

type Answer<T> = Result<T, Fail>;

/// Run a queue operation off the async workers.
async fn db<T: Send + 'static>(
    shared: &Arc<Shared>,
    f: impl FnOnce(&Queue) -> Result<T, QueueError> + Send + 'static,
) -> Answer<T> {
    let shared = shared.clone();
    tokio::task::spawn_blocking(move || f(&shared.queue))
        .await
        .map_err(internal)?
        .map_err(Fail::from)
}

fn bearer(headers: &HeaderMap) -> Answer<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| {
            fail(
                StatusCode::UNAUTHORIZED,
                "send the token as `Authorization: Bearer <token>`",
            )
        })
}

fn require_api(app: &App, headers: &HeaderMap) -> Answer<()> {
    if same_token(bearer(headers)?, &app.shared.config.api_token) {
        Ok(())
    } else {
        Err(fail(
            StatusCode::UNAUTHORIZED,
            "wrong API token; use the api_token of the manager's config",
        ))
    }
}

fn path<T>(p: Result<Path<T>, PathRejection>) -> Answer<T> {
    p.map(|Path(t)| t)
        .map_err(|e| fail(StatusCode::BAD_REQUEST, format!("bad path: {e}")))
}

fn parse_sha(s: &str) -> Answer<Sha256> {
    s.parse()
        .map_err(|e| fail(StatusCode::BAD_REQUEST, format!("{e}")))
}

/// Refuse early when the announced length is over `limit`.
fn check_length(headers: &HeaderMap, limit: u64) -> Answer<()> {
    let len = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match len {
        Some(n) if n > limit => Err(Fail::from(BlobError::TooLarge { limit })),
        _ => Ok(()),
    }
}

fn stored(created: bool, st: Stored) -> Response {
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    (status, Json(st)).into_response()
}

/// Which counter of bytes sent a download adds to.
#[derive(Clone, Copy, Debug)]
enum Served {
    Input,
    Output,
}

/// A response streaming `body` (`size` bytes, its digest in `x-content-sha256` when known),
/// counting the bytes sent.
fn download(
    app: &App,
    body: impl Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static,
    size: u64,
    sha256: Option<Sha256>,
    kind: &'static str,
    served: Served,
) -> Response {
    let mut headers = vec![
        (header::CONTENT_TYPE, kind.to_owned()),
        (header::CONTENT_LENGTH, size.to_string()),
    ];
    if let Some(sha) = sha256 {
        headers.push((
            HeaderName::from_static(CONTENT_SHA256_HEADER),
            sha.to_string(),
        ));
    }
    let shared = app.shared.clone();
    let body = body.inspect(move |chunk| {
        if let Ok(c) = chunk {
            let m = &shared.metrics;
            let counter = match served {
                Served::Input => &m.input_bytes_served,
                Served::Output => &m.output_bytes_served,
            };
            Metrics::add(counter, c.len() as u64);
        }
    });
    let mut resp = Body::from_stream(body).into_response();
    for (name, value) in headers {
        // The values are MIME types, decimal or hex digits: valid header values.
        if let Ok(v) = value.parse() {
            resp.headers_mut().insert(name, v);
        }
    }
    resp
}

/// Count a refused upload by its reason.
fn count_refusal<T>(family: &crate::metrics::Family<9>, answer: Answer<T>) -> Answer<T> {
    if let Err(Fail(status, _)) = &answer {
        family.inc(refusal_reason(status.as_u16()));
    }
    answer
}

async fn put_input(
    State(app): State<App>,
    sha: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Answer<Response> {
    let answer = store_input(&app, sha, headers, body).await;
    count_refusal(&app.shared.metrics.input_refusals, answer)
}

async fn store_input(
    app: &App,
    sha: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Answer<Response> {
    require_api(app, &headers)?;
    let sha = parse_sha(&path(sha)?)?;
    let limit = app.shared.config.jobs.max_input_size.0;
    check_length(&headers, limit)?;
    let (st, created) = app
        .blobs
        .put_input(&sha, body.into_data_stream(), limit)
        .await?;
    if created {
        Metrics::add(&app.shared.metrics.input_bytes_stored, st.size);
        tracing::info!(%sha, size = st.size, "input stored");
    }
    Ok(stored(created, st))
}

async fn get_input(
    State(app): State<App>,
    sha: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Answer<Response> {
    let sha = parse_sha(&path(sha)?)?;
    let token = bearer(&headers)?.to_owned();
    if !same_token(&token, &app.shared.config.api_token)
        && !db(&app.shared, move |q| q.token_may_read_input(&token, &sha)).await?
    {
        return Err(fail(
            StatusCode::FORBIDDEN,
            "this token may not read this input (not the API token, nor the upload token of a running job that lists it)",
        ));
    }
    match app.blobs.open_input(&sha).await? {
        Some(blob) => Ok(download(
            &app,
            ReaderStream::new(blob.file),
            blob.size,
            Some(sha),
            "application/octet-stream",
            Served::Input,
        )),
        None => Err(fail(
            StatusCode::NOT_FOUND,
            format!("input {sha} is not stored"),
        )),
    }
}

async fn put_output(
    State(app): State<App>,
    ids: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Answer<Response> {
    let answer = store_output(&app, ids, headers, body).await;
    count_refusal(&app.shared.metrics.output_refusals, answer)
}

async fn store_output(
    app: &App,
    ids: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Answer<Response> {
    let (job, attempt) = path(ids)?;
    let (Ok(job), Ok(attempt)) = (job.parse::<JobId>(), attempt.parse::<u32>()) else {
        return Err(fail(
            StatusCode::BAD_REQUEST,
            "the path must be /outputs/<job id>/<attempt>, both numbers",
        ));
    };
    let token = bearer(&headers)?.to_owned();
    let expected = headers
        .get(CONTENT_SHA256_HEADER)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            fail(
                StatusCode::BAD_REQUEST,
                format!("send the archive's sha256 in the {CONTENT_SHA256_HEADER} header"),
            )
        })
        .and_then(parse_sha)?;
    db(&app.shared, move |q| {
        q.authorize_upload(job, attempt, &token)
    })
    .await?;
    let limit = app.shared.config.jobs.max_output_size.0;
    check_length(&headers, limit)?;
    let st = app
        .blobs
        .put_output(job, attempt, &expected, body.into_data_stream(), limit)
        .await?;
    if let Err(e) = db(&app.shared, move |q| q.record_archive(job, attempt, st)).await {
        // The lease went away while the body streamed: the file belongs to no attempt.
        app.blobs.remove_output(job, attempt).await?;
        return Err(e);
    }
    Metrics::add(&app.shared.metrics.output_bytes_stored, st.size);
    tracing::info!(job, attempt, sha = %st.sha256, size = st.size, "output archive stored");
    Ok(stored(true, st))
}

async fn submit(State(app): State<App>, headers: HeaderMap, body: Body) -> Answer<Response> {
    require_api(&app, &headers)?;
    let bytes = to_bytes(body, MAX_SUBMIT_BYTES).await.map_err(|e| {
        fail(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("submit body unreadable or over {MAX_SUBMIT_BYTES} bytes ({e}); submit fewer jobs at once"),
        )
    })?;
    let req: SubmitRequest = serde_json::from_slice(&bytes).map_err(|e| {
        fail(
            StatusCode::BAD_REQUEST,
            format!("the body is not a valid submit request: {e}"),
        )
    })?;
    if req.jobs.is_empty() {
        return Err(fail(StatusCode::BAD_REQUEST, "the request has no jobs"));
    }
    let mut sizes: HashMap<Sha256, Option<u64>> = HashMap::new();
    for (i, spec) in req.jobs.iter().enumerate() {
        let bad = |msg: String| {
            fail(
                StatusCode::BAD_REQUEST,
                format!("job {i} ({}): {msg}", spec.name),
            )
        };
        spec.validate().map_err(|e| bad(e.to_string()))?;
        let validators = &app.shared.config.validators;
        if let Some(v) = spec.replication.as_ref().and_then(|r| r.validator.as_ref()) {
            if !validators.contains_key(v) {
                let known: Vec<&str> = validators.keys().map(String::as_str).collect();
                return Err(bad(format!(
                    "validator {v:?} is not one of this manager's [validators] ({})",
                    if known.is_empty() {
                        "it has none".to_owned()
                    } else {
                        known.join(", ")
                    }
                )));
            }
        }
        app.shared
            .config
            .jobs
            .max_limits
            .check(&spec.limits)
            .map_err(|e| bad(e.to_string()))?;
        for input in &spec.inputs {
            let InputSource::Stored { sha256, size } = &input.source else {
                continue;
            };
            let have = match sizes.get(sha256) {
                Some(s) => *s,
                None => {
                    let s = app.blobs.input_size(sha256).await?;
                    sizes.insert(*sha256, s);
                    s
                }
            };
            match have {
                None => {
                    return Err(bad(format!(
                        "input {:?} ({sha256}) is not stored; upload it first with PUT /inputs/{sha256}",
                        input.name
                    )))
                }
                Some(have) if have != *size => {
                    return Err(bad(format!(
                        "input {:?} ({sha256}) is stored with {have} bytes, not {size}",
                        input.name
                    )))
                }
                Some(_) => {}
            }
        }
    }
    let default_retries = app.shared.config.jobs.max_retries;
    let ids = db(&app.shared, move |q| q.submit(&req.jobs, default_retries)).await?;
    Metrics::add(&app.shared.metrics.jobs_submitted, ids.len() as u64);
    tracing::info!(count = ids.len(), first = ids.first(), "jobs submitted");
    app.shared.work_available.notify_waiters();
    Ok((StatusCode::CREATED, Json(SubmitResponse { ids })).into_response())
}

#[derive(Deserialize)]
struct ListQuery {
    state: Option<String>,
}

async fn list_jobs(
    State(app): State<App>,
    query: Result<Query<ListQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Answer<Response> {
    require_api(&app, &headers)?;
    let Query(query) =
        query.map_err(|e| fail(StatusCode::BAD_REQUEST, format!("bad query: {e}")))?;
    let state = query
        .state
        .map(|s| s.parse::<JobState>())
        .transpose()
        .map_err(|e| {
            fail(
                StatusCode::BAD_REQUEST,
                format!("{e}; use one of queued, assigned, running, uploading, done, failed, lost"),
            )
        })?;
    let list = db(&app.shared, move |q| q.list(state)).await?;
    Ok(Json(list).into_response())
}

fn job_id(id: Result<Path<String>, PathRejection>) -> Answer<JobId> {
    path(id)?
        .parse()
        .map_err(|_| fail(StatusCode::BAD_REQUEST, "a job id is a number"))
}

async fn show_job(
    State(app): State<App>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Answer<Response> {
    require_api(&app, &headers)?;
    let id = job_id(id)?;
    match db(&app.shared, move |q| q.job(id)).await? {
        Some(view) => Ok(Json(view).into_response()),
        None => Err(QueueError::UnknownJob(id).into()),
    }
}

async fn job_output(
    State(app): State<App>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Answer<Response> {
    require_api(&app, &headers)?;
    serve_output(&app, job_id(id)?).await
}

/// Where the stored output archive of job `id` is: the attempt that made it, what was stored,
/// and its Chirp URL when it is not in the manager's own store.
async fn stored_archive(app: &App, id: JobId) -> Answer<(u32, Stored, Option<String>)> {
    let (attempt, st) = db(&app.shared, move |q| q.archive_of(id))
        .await?
        .ok_or_else(|| no_archive(id))?;
    let url = db(&app.shared, move |q| q.archive_url_of(id)).await?;
    Ok((attempt, st, url))
}

fn no_archive(id: JobId) -> Fail {
    fail(
        StatusCode::NOT_FOUND,
        format!("job {id} has no stored output archive (yet)"),
    )
}

/// The Chirp output store that holds the archive at `url`.
fn chirp_store(app: &App, url: &str) -> Answer<Arc<crate::chirp_outputs::ChirpOutputs>> {
    app.shared.outputs.clone().ok_or_else(|| {
        fail(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the archive is in {url}, but this manager has no Chirp output store configured"
            ),
        )
    })
}

/// The stored output archive of job `id`, from the storage service or the Chirp output store.
async fn serve_output(app: &App, id: JobId) -> Answer<Response> {
    let (attempt, st, url) = stored_archive(app, id).await?;
    if let Some(url) = url {
        return chirp_output(app, url, st);
    }
    let blob = app
        .blobs
        .open_output(id, attempt)
        .await?
        .ok_or_else(|| no_archive(id))?;
    Ok(download(
        app,
        ReaderStream::new(blob.file),
        blob.size,
        Some(st.sha256),
        "application/gzip",
        Served::Output,
    ))
}

/// Streams an archive kept in the Chirp output store. A failure half-way cuts the body (the
/// client sees fewer bytes than the length says, and its digest check fails).
fn chirp_output(app: &App, url: String, st: Stored) -> Answer<Response> {
    let outputs = chirp_store(app, &url)?;
    let (mut writer, reader) = tokio::io::duplex(256 * 1024);
    tokio::spawn(async move {
        if let Err(e) = outputs.read(&url, &mut writer).await {
            tracing::warn!(%url, "serving an archive from Chirp failed: {e}");
        }
    });
    Ok(download(
        app,
        ReaderStream::new(reader),
        st.size,
        Some(st.sha256),
        "application/gzip",
        Served::Output,
    ))
}

async fn agents(State(app): State<App>, headers: HeaderMap) -> Answer<Response> {
    require_api(&app, &headers)?;
    Ok(Json(app.shared.fleet.list()).into_response())
}

async fn volunteers(State(app): State<App>, headers: HeaderMap) -> Answer<Response> {
    require_api(&app, &headers)?;
    Ok(Json(db(&app.shared, |q| q.volunteers()).await?).into_response())
}

/// Test helpers shared with other modules' tests: an in-process [`Server`].
#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use copilot_protocol::api::{AgentList, JobList, JobView};
    use copilot_protocol::job::JobInput;
    use copilot_protocol::units::Bytes;
    use copilot_protocol::JobSpec;
    use futures::FutureExt;
    use reqwest::{Client, RequestBuilder};

    use super::*;
    use crate::config::{HttpConfig, ManagerConfig};
    use crate::queue::Claim;

    const TOKEN: &str = "api-token-for-tests";
    const HOUR: Duration = Duration::from_secs(3600);

    pub(crate) struct Server {
        _dir: tempfile::TempDir,
        pub(crate) shared: Arc<Shared>,
        pub(crate) base: String,
        pub(crate) http: Client,
    }

    impl Server {
        pub(crate) async fn start() -> Server {
            Self::start_with(HttpConfig::default()).await
        }

        /// A server with these HTTP settings (its address replaces `listen` and `public_url`).
        pub(crate) async fn start_with(http: HttpConfig) -> Server {
            let dir = tempfile::tempdir().unwrap();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let mut config = ManagerConfig::loopback(dir.path(), TOKEN, addr);
            config.http = HttpConfig {
                listen: addr,
                public_url: format!("http://{addr}"),
                ..http
            };
            config.jobs.max_output_size = Bytes(1000);
            config.jobs.max_input_size = Bytes(1000);
            let shared = Arc::new(Shared::open(config, None).unwrap());
            tokio::spawn(serve(listener, shared.clone(), std::future::pending()));
            Server {
                _dir: dir,
                shared,
                base: format!("http://{addr}"),
                http: Client::new(),
            }
        }

        pub(crate) fn req(&self, method: reqwest::Method, path: &str) -> RequestBuilder {
            self.http
                .request(method, format!("{}{path}", self.base))
                .bearer_auth(TOKEN)
        }

        /// GET `path` with the API token.
        pub(crate) async fn get(&self, path: &str) -> reqwest::Response {
            self.req(reqwest::Method::GET, path).send().await.unwrap()
        }

        pub(crate) async fn put_input(&self, data: &'static [u8]) -> Sha256 {
            let sha = Sha256::of(data);
            let r = self
                .req(reqwest::Method::PUT, &format!("/inputs/{sha}"))
                .body(data)
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success(), "{}", r.status());
            sha
        }

        pub(crate) async fn submit(&self, specs: Vec<JobSpec>) -> reqwest::Response {
            self.req(reqwest::Method::POST, "/api/jobs")
                .json(&SubmitRequest { jobs: specs })
                .send()
                .await
                .unwrap()
        }

        async fn job(&self, id: JobId) -> JobView {
            self.get(&format!("/api/jobs/{id}"))
                .await
                .json()
                .await
                .unwrap()
        }

        fn blob_files(&self) -> usize {
            let mut n = 0;
            for d in std::fs::read_dir(self._dir.path().join("blobs")).unwrap() {
                n += std::fs::read_dir(d.unwrap().path()).unwrap().count();
            }
            n
        }

        /// Submit a job with one declared output and claim it.
        async fn claimed(&self) -> Claim {
            let mut s = spec();
            s.outputs = vec!["out.txt".into()];
            assert_eq!(self.submit(vec![s]).await.status(), StatusCode::CREATED);
            self.shared
                .queue
                .claim("agent", None, HOUR, HOUR)
                .unwrap()
                .unwrap()
        }

        pub(crate) fn upload(
            &self,
            c: &Claim,
            attempt: u32,
            token: &str,
            body: impl Into<reqwest::Body> + AsRef<[u8]>,
        ) -> RequestBuilder {
            let sha = Sha256::of(body.as_ref());
            self.http
                .put(format!("{}/outputs/{}/{attempt}", self.base, c.job))
                .bearer_auth(token)
                .header(CONTENT_SHA256_HEADER, sha.to_string())
                .body(body)
        }
    }

    pub(crate) fn spec() -> JobSpec {
        JobSpec::new("job", &["sh", "run.sh"])
    }

    async fn error_of(r: reqwest::Response) -> String {
        r.json::<ApiError>().await.unwrap().error
    }

    #[tokio::test]
    async fn inputs_round_trip_with_digest_check() {
        let s = Server::start().await;
        let sha = Sha256::of(b"#!/bin/sh\necho hi\n");
        let put = || {
            s.req(reqwest::Method::PUT, &format!("/inputs/{sha}"))
                .body(&b"#!/bin/sh\necho hi\n"[..])
        };
        let r = put().send().await.unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        let st: Stored = r.json().await.unwrap();
        assert_eq!((st.sha256, st.size), (sha, 18));
        assert_eq!(put().send().await.unwrap().status(), StatusCode::OK);
        let r = s.get(&format!("/inputs/{sha}")).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            r.headers()[CONTENT_SHA256_HEADER].to_str().unwrap(),
            sha.to_string()
        );
        assert_eq!(&r.bytes().await.unwrap()[..], b"#!/bin/sh\necho hi\n");
        let missing = Sha256::of(b"nope");
        let r = s.get(&format!("/inputs/{missing}")).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        let r = s.get("/inputs/xyz").await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert!(error_of(r).await.contains("sha256"));
    }

    #[tokio::test]
    async fn wrong_digest_and_oversized_inputs_store_nothing() {
        let s = Server::start().await;
        let claimed = Sha256::of(b"one thing");
        let r = s
            .req(reqwest::Method::PUT, &format!("/inputs/{claimed}"))
            .body("another thing")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert!(error_of(r)
            .await
            .contains(&Sha256::of(b"another thing").to_string()));
        let big = vec![b'x'; 1001];
        let r = s
            .req(
                reqwest::Method::PUT,
                &format!("/inputs/{}", Sha256::of(&big)),
            )
            .body(big)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
        // Without a length up front, the limit is enforced while streaming.
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
            vec![Ok(vec![b'y'; 600]), Ok(vec![b'y'; 600])];
        let r = s
            .req(
                reqwest::Method::PUT,
                &format!("/inputs/{}", Sha256::of(&[b'y'; 1200])),
            )
            .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(s.blob_files(), 0);
        assert_eq!(
            std::fs::read_dir(s._dir.path().join("tmp"))
                .unwrap()
                .count(),
            0
        );
    }

    #[tokio::test]
    async fn requests_without_the_api_token_are_refused() {
        let s = Server::start().await;
        let sha = Sha256::of(b"x");
        let cases = [
            s.http.get(format!("{}/api/jobs", s.base)),
            s.http
                .get(format!("{}/api/agents", s.base))
                .bearer_auth("wrong-token"),
            s.http
                .post(format!("{}/api/jobs", s.base))
                .bearer_auth("wrong-token")
                .body("{}"),
            s.http.put(format!("{}/inputs/{sha}", s.base)).body("x"),
            s.http
                .get(format!("{}/api/jobs/1", s.base))
                .header("authorization", TOKEN),
        ];
        for req in cases {
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
            assert!(error_of(r).await.contains("token"));
        }
        let r = s
            .http
            .get(format!("{}/inputs/{sha}", s.base))
            .bearer_auth("guess")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert_eq!(s.blob_files(), 0);
    }

    #[tokio::test]
    async fn submit_refuses_limits_over_the_maximums() {
        let s = Server::start().await;
        let mut at_max = spec();
        at_max.limits.wall_time = Some(copilot_protocol::units::Seconds(24 * 3600));
        at_max.limits.memory = Some(Bytes(1 << 40));
        let mut over = spec();
        over.limits.wall_time = Some(copilot_protocol::units::Seconds(48 * 3600));
        let r = s.submit(vec![at_max.clone(), over]).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let msg = error_of(r).await;
        assert!(
            msg.starts_with("job 1 ")
                && msg.contains("limits.wall_time")
                && msg.contains("172800 s")
                && msg.contains("maximum of 1day (86400 s)"),
            "{msg}"
        );
        let mut big_output = spec();
        big_output.limits.output = Some(Bytes((1 << 30) + 1));
        let r = s.submit(vec![big_output]).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert!(error_of(r).await.contains("limits.output"));
        assert_eq!(
            s.shared.queue.list(None).unwrap().jobs.len(),
            0,
            "nothing was queued"
        );
        let r = s.submit(vec![at_max]).await;
        assert_eq!(r.status(), StatusCode::CREATED, "at the maximum is allowed");
    }

    #[tokio::test]
    async fn submit_checks_specs_and_stored_inputs() {
        let s = Server::start().await;
        let sha = Sha256::of(b"data");
        let mut with_input = spec();
        with_input.inputs = vec![JobInput {
            name: "data.txt".into(),
            source: InputSource::Stored {
                sha256: sha,
                size: 4,
            },
        }];
        let r = s.submit(vec![with_input.clone()]).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let msg = error_of(r).await;
        assert!(
            msg.contains("not stored") && msg.contains(&format!("PUT /inputs/{sha}")),
            "{msg}"
        );
        let mut bad = spec();
        bad.command.clear();
        let r = s.submit(vec![spec(), bad]).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert!(error_of(r).await.starts_with("job 1 "));
        let r = s
            .req(reqwest::Method::POST, "/api/jobs")
            .body("{\"jobs\": 3}")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            s.shared.queue.list(None).unwrap().jobs.len(),
            0,
            "nothing was queued"
        );

        s.put_input(b"data").await;
        let notified = s.shared.work_available.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let r = s.submit(vec![with_input, spec()]).await;
        assert_eq!(r.status(), StatusCode::CREATED);
        let ids = r.json::<SubmitResponse>().await.unwrap().ids;
        assert_eq!(ids.len(), 2);
        assert!(
            notified.now_or_never().is_some(),
            "submit wakes held work requests"
        );
        let v = s.job(ids[0]).await;
        assert_eq!(
            (v.state, v.max_retries, v.spec.inputs.len()),
            (JobState::Queued, 3, 1)
        );
        s.shared.queue.claim("a", None, HOUR, HOUR).unwrap();
        let r = s.get("/api/jobs?state=queued").await;
        let list: JobList = r.json().await.unwrap();
        assert_eq!(
            list.jobs.iter().map(|j| j.id).collect::<Vec<_>>(),
            vec![ids[1]]
        );
        assert_eq!(list.counts[&JobState::Assigned], 1);
        let r = s.get("/api/jobs?state=sleeping").await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let r = s.get("/api/jobs/999").await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        let r = s.get("/api/jobs/../../etc").await;
        assert!(r.status().is_client_error());
    }

    #[tokio::test]
    async fn outputs_need_the_attempts_upload_token() {
        let s = Server::start().await;
        let c = s.claimed().await;
        let other = s.claimed().await;
        let body: &'static [u8] = b"pretend tar.gz";
        for (attempt, token) in [
            (1, "0".repeat(64)),
            (1, other.upload_token.clone()),
            (2, c.upload_token.clone()),
        ] {
            let r = s.upload(&c, attempt, &token, body).send().await.unwrap();
            assert_eq!(r.status(), StatusCode::FORBIDDEN, "attempt {attempt}");
        }
        let r = s
            .http
            .put(format!("{}/outputs/{}/1", s.base, c.job))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        let r = s
            .http
            .put(format!("{}/outputs/{}/1", s.base, c.job))
            .bearer_auth(&c.upload_token)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "digest header missing");
        let r = s.upload(&c, 1, &c.upload_token, body).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        let st: Stored = r.json().await.unwrap();
        assert_eq!(
            st,
            Stored {
                sha256: Sha256::of(body),
                size: body.len() as u64
            }
        );
        assert_eq!(s.shared.queue.archive_of(c.job).unwrap(), Some((1, st)));
        let v = s.job(c.job).await;
        assert_eq!((v.state, v.archive), (JobState::Uploading, Some(st)));
        let r = s.get(&format!("/api/jobs/{}/output", c.job)).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(&r.bytes().await.unwrap()[..], body);
        let r = s.get(&format!("/api/jobs/{}/output", other.job)).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        // Once the lease is gone, so is the token.
        s.shared.queue.release_agent("agent", "offline").unwrap();
        let r = s.upload(&c, 1, &c.upload_token, body).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
    }

    #[tokio::test]
    async fn expired_tokens_are_refused() {
        let s = Server::start().await;
        assert_eq!(s.submit(vec![spec()]).await.status(), StatusCode::CREATED);
        let c = s
            .shared
            .queue
            .claim("agent", None, HOUR, Duration::ZERO)
            .unwrap()
            .unwrap();
        let r = s
            .upload(&c, 1, &c.upload_token, &b"x"[..])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert!(error_of(r).await.contains("expired"));
        assert_eq!(s.shared.queue.archive_of(c.job).unwrap(), None);
    }

    #[tokio::test]
    async fn bad_output_bodies_record_nothing() {
        let s = Server::start().await;
        let c = s.claimed().await;
        let big: &'static [u8] = &[b'z'; 1001];
        let r = s.upload(&c, 1, &c.upload_token, big).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let r = s
            .http
            .put(format!("{}/outputs/{}/1", s.base, c.job))
            .bearer_auth(&c.upload_token)
            .header(CONTENT_SHA256_HEADER, Sha256::of(b"abd").to_string())
            .body("abc")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(s.shared.queue.archive_of(c.job).unwrap(), None);
        let outputs = s._dir.path().join("outputs");
        assert_eq!(std::fs::read_dir(outputs).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn upload_tokens_read_only_their_jobs_inputs() {
        let s = Server::start().await;
        let mine = s.put_input(b"mine").await;
        let theirs = s.put_input(b"theirs").await;
        let mut sp = spec();
        sp.inputs = vec![JobInput {
            name: "m".into(),
            source: InputSource::Stored {
                sha256: mine,
                size: 4,
            },
        }];
        assert_eq!(s.submit(vec![sp]).await.status(), StatusCode::CREATED);
        let c = s
            .shared
            .queue
            .claim("agent", None, HOUR, HOUR)
            .unwrap()
            .unwrap();
        let get = |sha: Sha256| {
            s.http
                .get(format!("{}/inputs/{sha}", s.base))
                .bearer_auth(&c.upload_token)
                .send()
        };
        assert_eq!(get(mine).await.unwrap().status(), StatusCode::OK);
        assert_eq!(get(theirs).await.unwrap().status(), StatusCode::FORBIDDEN);
    }

    #[tokio::test]
    async fn metrics_can_require_the_api_token() {
        let s = Server::start_with(HttpConfig {
            metrics_public: false,
            ..HttpConfig::default()
        })
        .await;
        let url = format!("{}/metrics", s.base);
        let r = s.http.get(&url).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        let r = s.get("/metrics").await;
        assert_eq!(r.status(), StatusCode::OK);
        assert!(r
            .text()
            .await
            .unwrap()
            .contains("copilot_jobs_submitted_total 0\n"));
        let public = Server::start().await;
        let r = public
            .http
            .get(format!("{}/metrics", public.base))
            .send()
            .await;
        assert_eq!(r.unwrap().status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn agents_and_unknown_routes() {
        let s = Server::start().await;
        s.shared
            .fleet
            .seen("vm-1", "vm-1@localhost/r", Some("0.1.0"))
            .unwrap();
        let r = s.get("/api/agents").await;
        let list: AgentList = r.json().await.unwrap();
        assert_eq!(list.agents.len(), 1);
        assert_eq!(list.agents[0].name, "vm-1");
        let r = s.get("/api/volunteers").await;
        assert_eq!(r.status(), StatusCode::OK);
        let list: copilot_protocol::api::VolunteerList = r.json().await.unwrap();
        assert!(list.volunteers.is_empty());
        let r = s.get("/nothing/here").await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert!(error_of(r).await.contains("no such endpoint"));
    }

    #[test]
    fn a_full_disk_is_507_and_other_storage_errors_are_500() {
        let full = BlobError::Io {
            path: "/data/tmp/x.part".into(),
            source: std::io::ErrorKind::StorageFull.into(),
        };
        assert_eq!(Fail::from(full).0, StatusCode::INSUFFICIENT_STORAGE);
        let denied = BlobError::Io {
            path: "/data/tmp/x.part".into(),
            source: std::io::ErrorKind::PermissionDenied.into(),
        };
        assert_eq!(Fail::from(denied).0, StatusCode::INTERNAL_SERVER_ERROR);
        let sqlite = |code| {
            QueueError::Sqlite(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(code),
                None,
            ))
        };
        let full = sqlite(rusqlite::ffi::SQLITE_FULL);
        assert!(full.is_disk_full());
        assert_eq!(Fail::from(full).0, StatusCode::INSUFFICIENT_STORAGE);
        let busy = sqlite(rusqlite::ffi::SQLITE_BUSY);
        assert_eq!(Fail::from(busy).0, StatusCode::INTERNAL_SERVER_ERROR);
    }
}
