//! `copilot submit`: parse job files, upload their local inputs to the storage service (each
//! distinct file once, with a progress bar), and queue the jobs in one request.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use copilot_protocol::api::SubmitRequest;
use copilot_protocol::digest::Hasher;
use copilot_protocol::job::JobError;
use copilot_protocol::{JobFile, JobId, JobSpec, Sha256};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Read;

use crate::client::{Client, ClientError};

/// Why submitting failed.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("{path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}")]
    Job {
        path: PathBuf,
        #[source]
        source: JobError,
    },
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// The jobs queued from one job file.
#[derive(Debug)]
pub struct Submitted {
    pub file: PathBuf,
    pub ids: Vec<JobId>,
}

/// A parsed job file and the directory its relative paths are taken from.
struct Parsed {
    file: PathBuf,
    base: PathBuf,
    job: JobFile,
}

/// Submit every job in `files`: all or nothing (one request after all uploads succeeded).
pub async fn submit(client: &Client, files: &[PathBuf]) -> Result<Vec<Submitted>, SubmitError> {
    let mut parsed = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file).map_err(|source| SubmitError::Read {
            path: file.clone(),
            source,
        })?;
        let job = JobFile::parse(&text).map_err(|source| SubmitError::Job {
            path: file.clone(),
            source,
        })?;
        let base = file
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        parsed.push(Parsed {
            file: file.clone(),
            base,
            job,
        });
    }
    let mut locals: Vec<PathBuf> = parsed
        .iter()
        .flat_map(|p| p.job.local_paths(&p.base))
        .collect();
    locals.sort();
    locals.dedup();
    let stored = upload_all(client, &locals).await?;

    let mut specs: Vec<JobSpec> = Vec::new();
    let mut per_file = Vec::new();
    for p in parsed {
        let got = p
            .job
            .into_specs(&p.base, |path| stored.get(path).copied())
            .map_err(|source| SubmitError::Job {
                path: p.file.clone(),
                source,
            })?;
        per_file.push((p.file, got.len()));
        specs.extend(got);
    }
    let mut ids = client
        .submit(&SubmitRequest { jobs: specs })
        .await?
        .into_iter();
    Ok(per_file
        .into_iter()
        .map(|(file, n)| Submitted {
            file,
            ids: ids.by_ref().take(n).collect(),
        })
        .collect())
}

/// Hash and upload each local file; returns digest and size by path.
async fn upload_all(
    client: &Client,
    paths: &[PathBuf],
) -> Result<HashMap<PathBuf, (Sha256, u64)>, SubmitError> {
    let mut digests = Vec::new();
    for path in paths {
        let p = path.clone();
        let digest = tokio::task::spawn_blocking(move || hash_file(&p))
            .await
            .map_err(|e| SubmitError::Read {
                path: path.clone(),
                source: std::io::Error::other(e),
            })?
            .map_err(|source| SubmitError::Read {
                path: path.clone(),
                source,
            })?;
        digests.push((path.clone(), digest));
    }
    let total: u64 = digests.iter().map(|(_, (_, size))| size).sum();
    let bar = ProgressBar::new(total).with_style(
        ProgressStyle::with_template("uploading {msg} {wide_bar} {bytes}/{total_bytes}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut out = HashMap::new();
    for (path, (sha256, size)) in digests {
        bar.set_message(
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|source| SubmitError::Read {
                path: path.clone(),
                source,
            })?;
        let counter = bar.clone();
        let body = tokio_util::io::ReaderStream::new(file).inspect(move |chunk| {
            if let Ok(c) = chunk {
                counter.inc(c.len() as u64);
            }
        });
        client.upload_input(&path, sha256, size, body).await?;
        out.insert(path, (sha256, size));
    }
    bar.finish_and_clear();
    Ok(out)
}

fn hash_file(path: &Path) -> std::io::Result<(Sha256, u64)> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Hasher::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(h.finish());
        }
        h.update(&buf[..n]);
    }
}
