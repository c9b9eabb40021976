//! The aggregated views of `copilot_protocol::summary` (summary, job events, batches with their
//! plots, contributions) and the job page's details, built from the queue's read paths, the
//! fleet and the stored archives; and the JSON API routes that serve them. The dashboard
//! ([`super::web`]) renders the same views, so the CLI and the pages always agree.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use copilot_dashboard::pages::{Check, Excerpt, FileEntry, JobDetail};
use copilot_protocol::api::{FileView, JobView, Stored, STDERR_ENTRY, STDOUT_ENTRY};
use copilot_protocol::histogram::{self, Format};
use copilot_protocol::summary::{
    BatchPlot, BatchView, Contributions, JobEvent, JobEvents, Replica, Summary,
    VolunteerContribution,
};
use copilot_protocol::units::Seconds;
use copilot_protocol::{JobId, JobState};
use serde::Deserialize;
use tokio::io::AsyncSeekExt;

use super::{
    chirp_store, db, download, fail, internal, job_id, no_archive, path, require_api,
    stored_archive, Answer, App, Fail, Served,
};
use copilot_archive::read::{self as archive, Contents, Member, ReadError};

use crate::archive::ArchiveCache;
use crate::fleet::now_ms;
use crate::queue::QueueError;
use crate::stats::Stats;

/// Jobs on the work page's "recent" list.
pub(super) const RECENT: u32 = 20;
/// Replicas read for a batch's plots.
const MAX_REPLICAS: usize = 200;
/// Bytes of an output file shown as a preview, and of a log shown as its tail.
const PREVIEW: usize = 4 << 10;
const LOG_TAIL: usize = 8 << 10;
/// Memory for cached archive scans.
const ARCHIVE_CACHE: usize = 64 << 20;

/// What the views keep between requests.
#[derive(Debug)]
pub(super) struct Views {
    pub(super) stats: Stats,
    pub(super) archives: ArchiveCache,
    /// Dashboard pages listening to the event stream now.
    pub(super) listeners: std::sync::atomic::AtomicUsize,
}

impl Views {
    pub(super) fn new() -> Views {
        Views {
            stats: Stats::new(),
            archives: ArchiveCache::new(ARCHIVE_CACHE),
            listeners: std::sync::atomic::AtomicUsize::new(0),
        }
    }
}

fn unknown_job(id: JobId) -> Fail {
    Fail::from(QueueError::UnknownJob(id))
}

/// `text` cut to at most `max` bytes on a character boundary: from the start, or (`from_end`)
/// keeping the end; `None` if it is not text (invalid UTF-8 inside, or NUL bytes).
fn text_excerpt(bytes: &[u8], max: usize, from_end: bool) -> Option<(String, bool)> {
    let (mut part, mut cut) = if bytes.len() > max {
        if from_end {
            (&bytes[bytes.len() - max..], true)
        } else {
            (&bytes[..max], true)
        }
    } else {
        (bytes, false)
    };
    if from_end {
        // Skip a character cut at the start.
        let skip = part
            .iter()
            .take(3)
            .take_while(|b| (**b & 0xC0) == 0x80)
            .count();
        part = &part[skip..];
        cut |= skip > 0;
    }
    let text = match std::str::from_utf8(part) {
        Ok(t) => t,
        // A character cut at the end of what we kept.
        Err(e) if e.error_len().is_none() && e.valid_up_to() + 4 > part.len() => {
            cut = true;
            std::str::from_utf8(&part[..e.valid_up_to()]).ok()?
        }
        Err(_) => return None,
    };
    (!text.contains('\0')).then(|| (text.to_owned(), cut))
}

/// The job page's entry for one reported file, from the archive's scan when there is one.
fn file_entry(f: &FileView, m: Option<&Member>) -> FileEntry {
    let check = match m {
        None => Check::Unchecked,
        Some(m) if m.sha256 == f.sha256 && m.size == f.size => Check::Matches,
        Some(_) => Check::Differs,
    };
    let preview = m.and_then(|m| {
        let (text, cut) = text_excerpt(&m.head, PREVIEW, false)?;
        Some(Excerpt {
            text,
            cut: cut || m.size > m.head.len() as u64,
        })
    });
    let histograms = Format::of_path(&f.path).and_then(|format| {
        let m = m?;
        Some(match &m.whole {
            Some(whole) => histogram::parse(format, whole).map_err(|e| e.to_string()),
            None => Err(format!(
                "{} bytes; files over {} are not plotted",
                m.size,
                archive::WHOLE
            )),
        })
    });
    FileEntry {
        view: f.clone(),
        check,
        preview,
        histograms,
    }
}

fn log_tail(contents: Option<&Contents>, path: &str) -> Option<Excerpt> {
    let m = contents?.get(path)?;
    if m.size == 0 {
        return None;
    }
    let (text, cut) = text_excerpt(&m.tail, LOG_TAIL, true)?;
    Some(Excerpt {
        text,
        cut: cut || m.size > m.tail.len() as u64,
    })
}

impl App {
    /// The summary, with the activity of the last `window` seconds (default: since the first
    /// event of the last day).
    pub(super) async fn summary(&self, window: Option<u64>) -> Answer<Summary> {
        let now = now_ms();
        let app = self.clone();
        let activity = tokio::task::spawn_blocking(move || {
            app.views.stats.refresh(&app.shared.queue, now)?;
            Ok::<_, QueueError>(app.views.stats.activity(now, window))
        })
        .await
        .map_err(internal)??;
        let agents = self.shared.fleet.list().agents;
        Ok(Summary {
            now_ms: now,
            counts: db(&self.shared, |q| q.counts()).await?,
            agents_online: agents.iter().filter(|a| a.online).count() as u64,
            agents_known: agents.len() as u64,
            activity,
            failures: db(&self.shared, |q| q.failure_causes()).await?,
            lost_attempts: self.views.stats.lost_attempts(),
            batches: db(&self.shared, |q| q.batches()).await?,
        })
    }

    pub(super) async fn job(&self, id: JobId) -> Answer<JobView> {
        db(&self.shared, move |q| q.job(id))
            .await?
            .ok_or_else(|| unknown_job(id))
    }

    pub(super) async fn job_events(&self, id: JobId) -> Answer<JobEvents> {
        let rows = db(&self.shared, move |q| q.job_events(id)).await?;
        if rows.is_empty() {
            return Err(unknown_job(id));
        }
        Ok(JobEvents {
            job: id,
            events: rows
                .into_iter()
                .map(|e| JobEvent {
                    attempt: e.attempt,
                    from: e.from,
                    to: e.to,
                    at_ms: e.at,
                    why: e.why,
                })
                .collect(),
        })
    }

    pub(super) async fn contributions(&self) -> Answer<Contributions> {
        let mut hosts = db(&self.shared, |q| q.host_contributions()).await?;
        let credit = db(&self.shared, |q| q.volunteers()).await?;
        let fleet = self.shared.fleet.list().agents;
        let mut volunteers: BTreeMap<u64, VolunteerContribution> = BTreeMap::new();
        for h in &mut hosts {
            h.volunteer = fleet
                .iter()
                .find(|a| a.name == h.agent)
                .and_then(|a| a.volunteer);
            if let Some(v) = h.volunteer {
                let c = volunteers
                    .entry(v.user_id)
                    .or_insert(VolunteerContribution {
                        user_id: v.user_id,
                        hosts: 0,
                        jobs_done: 0,
                        run_seconds: 0.0,
                        cpu_seconds: credit
                            .volunteers
                            .iter()
                            .filter(|c| c.user_id == v.user_id)
                            .map(|c| c.cpu_seconds)
                            .sum(),
                    });
                c.hosts += 1;
                c.jobs_done += h.jobs_done;
                c.run_seconds += h.run_seconds;
            }
        }
        let mut volunteers: Vec<VolunteerContribution> = volunteers.into_values().collect();
        volunteers.sort_by_key(|v| std::cmp::Reverse(v.jobs_done));
        Ok(Contributions { hosts, volunteers })
    }

    /// The stored archive of `id` opened for reading from the start, and what it is.
    async fn open_archive(&self, id: JobId) -> Answer<(std::fs::File, u32, Stored)> {
        let (attempt, st, url) = stored_archive(self, id).await?;
        let file = match url {
            None => {
                let blob = self
                    .blobs
                    .open_output(id, attempt)
                    .await?
                    .ok_or_else(|| no_archive(id))?;
                blob.file.into_std().await
            }
            Some(url) => {
                let outputs = chirp_store(self, &url)?;
                let mut spool = self.blobs.scratch_file().await?;
                outputs.read(&url, &mut spool).await.map_err(internal)?;
                spool.rewind().await.map_err(internal)?;
                spool.into_std().await
            }
        };
        Ok((file, attempt, st))
    }

    /// The scan of `job`'s archive (from the cache when it was read before); `Ok(None)` when
    /// it has none, `Err` with a sentence for people when it cannot be shown.
    async fn contents(&self, job: &JobView) -> Result<Option<Arc<Contents>>, String> {
        let Some(st) = job.archive else {
            return Ok(None);
        };
        if st.size > archive::MAX_SCAN {
            return Err(format!(
                "The archive is {}; archives over {} are not previewed here: download it.",
                copilot_protocol::units::Bytes(st.size),
                copilot_protocol::units::Bytes(archive::MAX_SCAN)
            ));
        }
        let (file, attempt, st) = self.open_archive(job.id).await.map_err(|f| f.1)?;
        if let Some(hit) = self.views.archives.get(job.id, attempt, st.sha256) {
            return Ok(Some(hit));
        }
        let scanned = tokio::task::spawn_blocking(move || archive::scan(file))
            .await
            .map_err(|e| format!("reading the archive failed: {e}"))?
            .map_err(|e| format!("The stored archive could not be read: {e}"))?;
        let scanned = Arc::new(scanned);
        self.views
            .archives
            .put(job.id, attempt, st.sha256, scanned.clone());
        Ok(Some(scanned))
    }

    /// Everything the job page shows.
    pub(super) async fn job_detail(&self, id: JobId) -> Answer<JobDetail> {
        let job = self.job(id).await?;
        let events = self.job_events(id).await?;
        let (contents, archive_note) = match self.contents(&job).await {
            Ok(c) => (c, None),
            Err(note) => (None, Some(note)),
        };
        let files = job
            .files
            .iter()
            .map(|f| file_entry(f, contents.as_deref().and_then(|c| c.get(&f.path))))
            .collect();
        Ok(JobDetail {
            stdout: log_tail(contents.as_deref(), STDOUT_ENTRY),
            stderr: log_tail(contents.as_deref(), STDERR_ENTRY),
            job,
            events,
            files,
            archive_note,
            now_ms: now_ms(),
        })
    }

    /// A batch, and a plot per histogram its done jobs returned.
    pub(super) async fn batch(&self, name: String) -> Answer<BatchView> {
        let wanted = name.clone();
        let jobs = db(&self.shared, move |q| q.batch_jobs(&wanted)).await?;
        if jobs.is_empty() {
            return Err(fail(
                StatusCode::NOT_FOUND,
                format!("there is no batch {name:?} (no job is called {name:?} or {name}#<n>)"),
            ));
        }
        let mut counts: BTreeMap<JobState, u64> = JobState::ALL.iter().map(|s| (*s, 0)).collect();
        for j in &jobs {
            *counts.entry(j.state).or_default() += 1;
        }
        // (file, histogram name) → title and replicas.
        let mut groups: BTreeMap<(String, String), (String, Vec<Replica>)> = BTreeMap::new();
        let mut problems = Vec::new();
        let done = jobs.iter().filter(|j| j.state == JobState::Done);
        for j in done.take(MAX_REPLICAS) {
            let contents = match self.contents(j).await {
                Ok(Some(c)) => c,
                Ok(None) => continue,
                Err(e) => {
                    problems.push(format!("{}: {e}", j.name));
                    continue;
                }
            };
            for m in &contents.members {
                let (Some(format), Some(whole)) = (Format::of_path(&m.path), &m.whole) else {
                    continue;
                };
                match histogram::parse(format, whole) {
                    Ok(hs) => {
                        for h in hs {
                            let g = groups
                                .entry((m.path.clone(), h.name))
                                .or_insert_with(|| (h.title, Vec::new()));
                            g.1.push(Replica {
                                job: j.id,
                                label: j.name.clone(),
                                bins: h.bins,
                            });
                        }
                    }
                    Err(e) => problems.push(format!("{}: {} is not plotted: {e}", j.name, m.path)),
                }
            }
        }
        let plots = groups
            .into_iter()
            .map(|((path, name), (title, replicas))| {
                let mut plot_problems = Vec::new();
                let first = replicas.first().map(|r| (r.label.clone(), r.bins.clone()));
                let sum = first.and_then(|(label, bins)| {
                    let same: Vec<&[histogram::Bin]> = replicas
                        .iter()
                        .filter(|r| {
                            let ok = histogram::same_binning(&bins, &r.bins);
                            if !ok {
                                plot_problems.push(format!(
                                    "{}: the binning of {path} differs from {label}'s; left out of the sum",
                                    r.label
                                ));
                            }
                            ok
                        })
                        .map(|r| r.bins.as_slice())
                        .collect();
                    histogram::sum(&same).ok()
                });
                BatchPlot {
                    path,
                    name,
                    title,
                    replicas,
                    sum,
                    problems: plot_problems,
                }
            })
            .collect::<Vec<_>>();
        let mut plots = plots;
        if let Some(first) = plots.first_mut() {
            first.problems.extend(problems);
        }
        Ok(BatchView {
            name,
            counts,
            jobs,
            plots,
        })
    }

    /// One reported output file of job `id`, streamed out of its stored archive.
    pub(super) async fn file(&self, id: JobId, path: String) -> Answer<Response> {
        let job = self.job(id).await?;
        let Some(f) = job.files.iter().find(|f| f.path == path).cloned() else {
            return Err(fail(
                StatusCode::NOT_FOUND,
                format!("job {id} reported no output file {path:?}"),
            ));
        };
        let (file, _, _) = self.open_archive(id).await?;
        let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<bytes::Bytes>>(4);
        let (found_tx, found_rx) = tokio::sync::oneshot::channel::<Result<(), ReadError>>();
        let wanted = f.path.clone();
        tokio::task::spawn_blocking(move || {
            let mut found = Some(found_tx);
            let err_tx = tx.clone();
            let r = archive::extract(
                file,
                &wanted,
                || {
                    if let Some(f) = found.take() {
                        let _ = f.send(Ok(()));
                    }
                },
                |chunk| {
                    tx.blocking_send(Ok(bytes::Bytes::copy_from_slice(chunk)))
                        .map_err(|_| std::io::Error::other("the client went away"))
                },
            );
            if let Err(e) = r {
                match found.take() {
                    Some(f) => {
                        let _ = f.send(Err(e));
                    }
                    // Cut the body: the client sees fewer bytes than announced.
                    None => {
                        let _ = err_tx.blocking_send(Err(std::io::Error::other(e.to_string())));
                    }
                }
            }
        });
        match found_rx.await {
            Ok(Ok(())) => {}
            Ok(Err(ReadError::NotFound(p))) => {
                return Err(fail(
                    StatusCode::NOT_FOUND,
                    format!("{p} is reported but not in job {id}'s stored archive"),
                ))
            }
            Ok(Err(e)) => return Err(internal(e)),
            Err(_) => return Err(internal("the archive reader stopped")),
        }
        let body = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|chunk| (chunk, rx))
        });
        let text = matches!(
            f.path.rsplit_once('.').map(|(_, ext)| ext.to_ascii_lowercase()),
            Some(ext) if ["txt", "csv", "yoda", "log", "dat", "json", "tsv", "out", "err"].contains(&ext.as_str())
        ) || f.path == STDOUT_ENTRY
            || f.path == STDERR_ENTRY;
        let kind = if text {
            "text/plain; charset=utf-8"
        } else {
            "application/octet-stream"
        };
        let mut resp = download(self, body, f.size, Some(f.sha256), kind, Served::Output);
        // Job outputs are never rendered as pages of the manager's origin.
        let h = resp.headers_mut();
        h.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("sandbox; default-src 'none'"),
        );
        Ok(resp)
    }
}

/// A job id and the rest of the path (a file in its archive).
pub(super) fn named_job(
    id: Result<Path<(String, String)>, PathRejection>,
) -> Answer<(JobId, String)> {
    let (id, rest) = path(id)?;
    let id = job_id(Ok(Path(id)))?;
    Ok((id, rest))
}

#[derive(Deserialize)]
pub(super) struct SummaryQuery {
    /// The activity window, e.g. `10m`, `1h`, `86400`.
    window: Option<String>,
}

/// The window of a summary query.
pub(super) fn window(query: Result<Query<SummaryQuery>, QueryRejection>) -> Answer<Option<u64>> {
    let Query(q) = query.map_err(|e| fail(StatusCode::BAD_REQUEST, format!("bad query: {e}")))?;
    q.window
        .map(|w| {
            w.parse::<Seconds>()
                .map(|s| s.0)
                .map_err(|e| fail(StatusCode::BAD_REQUEST, format!("window: {e}")))
        })
        .transpose()
}

pub(super) async fn summary(
    State(app): State<App>,
    query: Result<Query<SummaryQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Answer<Response> {
    require_api(&app, &headers)?;
    let w = window(query)?;
    Ok(Json(app.summary(w).await?).into_response())
}

pub(super) async fn job_events(
    State(app): State<App>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Answer<Response> {
    require_api(&app, &headers)?;
    let id = job_id(id)?;
    Ok(Json(app.job_events(id).await?).into_response())
}

pub(super) async fn job_file(
    State(app): State<App>,
    p: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> Answer<Response> {
    require_api(&app, &headers)?;
    let (id, file) = named_job(p)?;
    app.file(id, file).await
}

pub(super) async fn batch(
    State(app): State<App>,
    name: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Answer<Response> {
    require_api(&app, &headers)?;
    let name = path(name)?;
    Ok(Json(app.batch(name).await?).into_response())
}

pub(super) async fn contributions(State(app): State<App>, headers: HeaderMap) -> Answer<Response> {
    require_api(&app, &headers)?;
    Ok(Json(app.contributions().await?).into_response())
}

impl crate::validate::Archives for App {
    async fn open(&self, job: JobId) -> Result<std::fs::File, String> {
        self.open_archive(job)
            .await
            .map(|(f, _, _)| f)
            .map_err(|f| f.1)
    }

    fn scratch(&self) -> Result<tempfile::TempDir, String> {
        self.blobs.scratch_dir().map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excerpts_cut_on_character_boundaries_and_refuse_binary() {
        assert_eq!(text_excerpt(b"abc", 10, false), Some(("abc".into(), false)));
        assert_eq!(
            text_excerpt(b"abcdef", 4, false),
            Some(("abcd".into(), true))
        );
        assert_eq!(
            text_excerpt(b"abcdef", 4, true),
            Some(("cdef".into(), true))
        );
        // "é" is two bytes: cut in its middle, it is left out.
        let s = "aéé".as_bytes();
        assert_eq!(text_excerpt(s, 4, false), Some(("aé".into(), true)));
        assert_eq!(text_excerpt(s, 3, true), Some(("é".into(), true)));
        assert_eq!(text_excerpt(b"a\0b", 10, false), None);
        assert_eq!(text_excerpt(b"\xff\xfeab", 10, false), None);
    }
}
