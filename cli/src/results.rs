//! `copilot results`: download a job's output archive, check it against the digest the storage
//! service recorded, unpack it safely and check every file against the agent's file list.

use std::collections::BTreeMap;
use std::io::{Seek, Write};
use std::path::{Path, PathBuf};

use copilot_protocol::api::JobView;
use copilot_protocol::digest::Hasher;
use copilot_protocol::{JobId, Sha256};
use futures::StreamExt;

use crate::client::{Client, ClientError};
use copilot_archive::unpack::{unpack, UnpackError, Unpacked};

/// Why results could not be fetched or did not verify.
#[derive(Debug, thiserror::Error)]
pub enum ResultsError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("job {id} has no stored output yet (state {state}); try `copilot wait {id}` first")]
    NoArchive { id: JobId, state: String },
    #[error("the downloaded archive is {got_size} bytes with sha256 {got}; the manager recorded {want_size} bytes with sha256 {want}")]
    ArchiveMismatch {
        want: Sha256,
        want_size: u64,
        got: Sha256,
        got_size: u64,
    },
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Unpack(#[from] UnpackError),
    #[error("unpacked files do not match the agent's list:\n  {}", .0.join("\n  "))]
    FilesMismatch(Vec<String>),
}

/// What `results` wrote.
#[derive(Debug)]
pub struct Fetched {
    pub job: JobView,
    /// Relative path → size, every file verified.
    pub files: BTreeMap<String, u64>,
    /// Declared outputs that are not in the archive.
    pub missing: Vec<String>,
}

/// Fetch job `id`'s outputs into `dest`, writing at most `max_bytes` of files.
pub async fn fetch(
    client: &Client,
    id: JobId,
    dest: &Path,
    max_bytes: u64,
) -> Result<Fetched, ResultsError> {
    let job = client.job(id).await?;
    let Some(archive) = job.archive else {
        return Err(ResultsError::NoArchive {
            id,
            state: job.state.to_string(),
        });
    };
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| ResultsError::Io { path, source }
    };
    std::fs::create_dir_all(dest).map_err(io_err(dest))?;
    // The download goes to an unnamed temp file beside the results, gone when dropped.
    let mut tmp = tempfile::tempfile_in(dest).map_err(io_err(dest))?;
    let mut hasher = Hasher::new();
    let mut body = Box::pin(client.output(id).await?);
    // Drawn only on a terminal (indicatif hides itself otherwise).
    let bar = indicatif::ProgressBar::new(archive.size).with_style(
        indicatif::ProgressStyle::with_template(
            "downloading job {msg} {wide_bar} {bytes}/{total_bytes}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(id.to_string());
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        bar.inc(chunk.len() as u64);
        hasher.update(&chunk);
        if hasher.len() > archive.size {
            break; // more than recorded: the digest check below fails
        }
        tmp.write_all(&chunk).map_err(io_err(dest))?;
    }
    bar.finish_and_clear();
    let (got, got_size) = hasher.finish();
    if got != archive.sha256 || got_size != archive.size {
        return Err(ResultsError::ArchiveMismatch {
            want: archive.sha256,
            want_size: archive.size,
            got,
            got_size,
        });
    }
    tmp.rewind().map_err(io_err(dest))?;
    let target = dest.to_owned();
    let unpacked = tokio::task::spawn_blocking(move || unpack(tmp, &target, max_bytes))
        .await
        .map_err(|e| ResultsError::Io {
            path: dest.to_owned(),
            source: std::io::Error::other(e),
        })??;
    let problems = compare(&job, &unpacked);
    if !problems.is_empty() {
        return Err(ResultsError::FilesMismatch(problems));
    }
    let missing = job
        .spec
        .outputs
        .iter()
        .filter(|o| {
            let dir = format!("{o}/");
            !unpacked.keys().any(|p| p == *o || p.starts_with(&dir))
        })
        .cloned()
        .collect();
    Ok(Fetched {
        files: unpacked.iter().map(|(p, u)| (p.clone(), u.size)).collect(),
        missing,
        job,
    })
}

/// Differences between the agent's file list and what was unpacked, one line each.
fn compare(job: &JobView, unpacked: &BTreeMap<String, Unpacked>) -> Vec<String> {
    let mut problems = Vec::new();
    for f in &job.files {
        match unpacked.get(&f.path) {
            None => problems.push(format!("{}: listed but not in the archive", f.path)),
            Some(u) if u.sha256 != f.sha256 || u.size != f.size => problems.push(format!(
                "{}: {} bytes sha256 {}, the agent reported {} bytes sha256 {}",
                f.path, u.size, u.sha256, f.size, f.sha256
            )),
            Some(_) => {}
        }
    }
    for p in unpacked.keys() {
        if !job.files.iter().any(|f| &f.path == p) {
            problems.push(format!("{p}: in the archive but not listed by the agent"));
        }
    }
    problems
}
