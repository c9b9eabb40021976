//! Files the client and the application exchange in the slot dir: logical names that are
//! `<soft_link>` files pointing into the project dir ([`resolve`]), and the files that tell
//! the client how the application ended ([`finish`], [`temporary_exit`]).

use std::io::Read;
use std::path::{Path, PathBuf};

/// Written before a final exit; holds the exit status (`BOINC_FINISH_CALLED_FILE`).
pub const FINISH_CALLED_FILE: &str = "boinc_finish_called";
/// Written before an exit the client should retry later (`TEMPORARY_EXIT_FILE`).
pub const TEMPORARY_EXIT_FILE: &str = "boinc_temporary_exit";
/// Bytes of a logical-name file looked at for a `<soft_link>`.
const MAX_LINK_FILE: u64 = 4096;

/// Why a file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{}: malformed <soft_link>", path.display())]
    BadLink { path: PathBuf },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FilesError + '_ {
    move |error| FilesError::Io {
        path: path.to_owned(),
        error,
    }
}

/// The physical path of logical file `name` in `slot_dir` (`boinc_resolve_filename`): if the
/// file holds `<soft_link>target</soft_link>`, the target (relative to the slot dir); otherwise
/// the file itself. A missing file resolves to itself as well (the caller finds it missing).
pub fn resolve(slot_dir: &Path, name: &str) -> Result<PathBuf, FilesError> {
    let path = slot_dir.join(name);
    let f = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(path),
        Err(e) => return Err(io(&path)(e)),
    };
    let mut head = Vec::new();
    f.take(MAX_LINK_FILE)
        .read_to_end(&mut head)
        .map_err(io(&path))?;
    let text = String::from_utf8_lossy(&head);
    let Some(rest) = text.trim_start().strip_prefix("<soft_link>") else {
        return Ok(path);
    };
    let target = rest
        .split_once("</soft_link>")
        .map(|(t, _)| t.trim())
        .filter(|t| !t.is_empty() && !t.contains('\0') && !t.contains('<'))
        .ok_or_else(|| FilesError::BadLink { path: path.clone() })?;
    Ok(slot_dir.join(target))
}

/// Write `boinc_finish_called` with `status` (and a message for the volunteer, if any): the
/// client then takes the exit that follows as the task's end, not as a crash.
pub fn finish(slot_dir: &Path, status: i32, message: Option<&str>) -> Result<(), FilesError> {
    let path = slot_dir.join(FINISH_CALLED_FILE);
    let mut text = format!("{status}\n");
    if let Some(m) = message {
        text.push_str(&format!("{}\n\n", one_line(m)));
    }
    std::fs::write(&path, text).map_err(io(&path))
}

/// Write `boinc_temporary_exit`: the exit that follows means "run me again in `delay_secs`".
pub fn temporary_exit(slot_dir: &Path, delay_secs: u32, reason: &str) -> Result<(), FilesError> {
    let path = slot_dir.join(TEMPORARY_EXIT_FILE);
    std::fs::write(&path, format!("{delay_secs}\n{}\n", one_line(reason))).map_err(io(&path))
}

/// A message made safe for the client's line-based reader: one line, at most 200 bytes.
fn one_line(m: &str) -> String {
    m.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .scan(0usize, |len, c| {
            *len += c.len_utf8();
            (*len <= 200).then_some(c)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soft_links_resolve_relative_to_the_slot() {
        let dir = tempfile::tempdir().unwrap();
        let slot = dir.path();
        std::fs::write(
            slot.join("copilot_job.xml"),
            "<soft_link>../../projects/p/copilot_job_1.00.xml</soft_link>\n",
        )
        .unwrap();
        assert_eq!(
            resolve(slot, "copilot_job.xml").unwrap(),
            slot.join("../../projects/p/copilot_job_1.00.xml")
        );
        std::fs::write(slot.join("plain"), "<job/>").unwrap();
        assert_eq!(resolve(slot, "plain").unwrap(), slot.join("plain"));
        assert_eq!(resolve(slot, "missing").unwrap(), slot.join("missing"));
        std::fs::write(slot.join("broken"), "<soft_link>x").unwrap();
        assert!(matches!(
            resolve(slot, "broken"),
            Err(FilesError::BadLink { .. })
        ));
        std::fs::write(slot.join("empty"), "<soft_link> </soft_link>").unwrap();
        assert!(resolve(slot, "empty").is_err());
    }

    #[test]
    fn finish_and_temporary_exit_files() {
        let dir = tempfile::tempdir().unwrap();
        finish(dir.path(), 0, None).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join(FINISH_CALLED_FILE)).unwrap(),
            "0\n"
        );
        finish(dir.path(), 195, Some("agent\nfailed")).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join(FINISH_CALLED_FILE)).unwrap(),
            "195\nagent failed\n\n"
        );
        temporary_exit(dir.path(), 300, &"x".repeat(500)).unwrap();
        let t = std::fs::read_to_string(dir.path().join(TEMPORARY_EXIT_FILE)).unwrap();
        assert!(t.starts_with("300\nxxx"));
        assert_eq!(t.len(), 4 + 200 + 1);
    }
}
