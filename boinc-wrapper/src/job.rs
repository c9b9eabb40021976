//! The job file (`copilot_job.xml`, a file of the app version, opened by its logical name): how
//! this app version runs copilot sessions. The counterpart of vboxwrapper's `vbox_job.xml`, and
//! like it XML, so that project admins keep one format; but strict: unknown elements are
//! errors, so a typo does not pass silently. docs/BOINC.md lists every element.

use std::path::Path;

use copilot_protocol::units::Seconds;
use serde::Deserialize;

/// The job file's logical name.
pub const JOB_FILE: &str = "copilot_job.xml";
/// Largest job file read.
const MAX_JOB_FILE: u64 = 64 * 1024;

/// Why the job file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum JobFileError {
    #[error("cannot read the job file {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("the job file is larger than {MAX_JOB_FILE} bytes")]
    TooLarge,
    #[error("the job file is not valid: {0}")]
    Parse(String),
    #[error("the job file is not valid: {0}")]
    Invalid(String),
}

/// Where sessions run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// copilot-agent as a process on the volunteer's host.
    #[default]
    Process,
    /// The copilot VM image under QEMU.
    Qemu,
}

/// How QEMU runs the VM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM if a bounded probe boot shows that it works here, else TCG.
    #[default]
    Auto,
    /// KVM, without probing.
    Kvm,
    /// TCG (emulation): works everywhere, slower.
    Tcg,
}

/// The job file.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename = "copilot_job")]
pub struct JobFile {
    /// `process` or `qemu`.
    #[serde(default)]
    pub backend: BackendKind,
    /// Logical name of the agent binary (process backend).
    #[serde(default = "default_agent")]
    pub agent: String,
    /// Logical name of the agent config template (XMPP server, account, manager).
    #[serde(default = "default_agent_config")]
    pub agent_config: String,
    /// How long one work unit serves jobs, counted in run time (the client's elapsed time;
    /// suspended time does not count).
    #[serde(default = "default_session", deserialize_with = "duration")]
    pub session: Seconds,
    /// The agent stops taking new jobs this long before the session ends (and before the
    /// work unit's deadline); the job it runs then may finish in that time.
    #[serde(default = "default_drain", deserialize_with = "duration")]
    pub drain: Seconds,
    /// After a stop request (quit, end of session, client gone), how long the agent has to end
    /// its session before everything is killed.
    #[serde(default = "default_stop_grace", deserialize_with = "duration")]
    pub stop_grace: Seconds,
    /// Least time between two checkpoints, whatever the client's checkpoint period; the
    /// default is the client's period for the process backend and 10 minutes for qemu (each
    /// writes the VM's memory to disk).
    #[serde(default, deserialize_with = "optional_duration")]
    pub checkpoint_interval: Option<Seconds>,
    /// qemu: the VM's memory in MiB.
    #[serde(default = "default_memory_mb")]
    pub memory_mb: u32,
    /// qemu: `auto`, `kvm` or `tcg`.
    #[serde(default)]
    pub accel: Accel,
}

fn default_agent() -> String {
    "copilot-agent".into()
}
fn default_agent_config() -> String {
    "copilot_agent.toml".into()
}
fn default_session() -> Seconds {
    Seconds(24 * 3600)
}
fn default_drain() -> Seconds {
    Seconds(3600)
}
fn default_stop_grace() -> Seconds {
    Seconds(30)
}
fn default_memory_mb() -> u32 {
    256
}
/// Least VM memory the image boots and runs a job in.
const MIN_MEMORY_MB: u32 = 128;
/// Most VM memory the wrapper asks for.
const MAX_MEMORY_MB: u32 = 64 * 1024;
/// Default least time between two checkpoints of a VM.
const QEMU_CHECKPOINT_INTERVAL: Seconds = Seconds(600);

/// A duration as text ("90s", "2h", or seconds): XML has no numbers, only text.
fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Seconds, D::Error> {
    let text = String::deserialize(d)?;
    text.parse().map_err(serde::de::Error::custom)
}

fn optional_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Seconds>, D::Error> {
    duration(d).map(Some)
}

/// A logical file name: a plain name inside the slot dir.
fn check_logical(what: &str, name: &str) -> Result<(), JobFileError> {
    if name.is_empty()
        || name.len() > 255
        || name.contains('/')
        || name == "."
        || name == ".."
        || name.contains('\0')
    {
        return Err(JobFileError::Invalid(format!(
            "<{what}> {name:?} is not a plain file name"
        )));
    }
    Ok(())
}

impl JobFile {
    /// Parse the job file's text.
    pub fn parse(text: &str) -> Result<JobFile, JobFileError> {
        if text.len() as u64 > MAX_JOB_FILE {
            return Err(JobFileError::TooLarge);
        }
        let job: JobFile = quick_xml::de::from_str(text)
            .map_err(|e| JobFileError::Parse(e.to_string().chars().take(200).collect()))?;
        check_logical("agent", &job.agent)?;
        check_logical("agent_config", &job.agent_config)?;
        if job.session.0 == 0 {
            return Err(JobFileError::Invalid("<session> must be positive".into()));
        }
        if job.drain >= job.session {
            return Err(JobFileError::Invalid(format!(
                "<drain> ({}) must be shorter than <session> ({})",
                job.drain, job.session
            )));
        }
        if !(MIN_MEMORY_MB..=MAX_MEMORY_MB).contains(&job.memory_mb) {
            return Err(JobFileError::Invalid(format!(
                "<memory_mb> must be between {MIN_MEMORY_MB} and {MAX_MEMORY_MB}"
            )));
        }
        Ok(job)
    }

    /// Least time between two checkpoints.
    pub fn min_checkpoint_interval(&self) -> Seconds {
        self.checkpoint_interval.unwrap_or(match self.backend {
            BackendKind::Process => Seconds(0),
            BackendKind::Qemu => QEMU_CHECKPOINT_INTERVAL,
        })
    }

    /// Read the job file at `path` (already resolved from its logical name).
    pub fn load(path: &Path) -> Result<JobFile, JobFileError> {
        use std::io::Read;
        let read = |error| JobFileError::Read {
            path: path.display().to_string(),
            error,
        };
        let mut text = String::new();
        std::fs::File::open(path)
            .map_err(read)?
            .take(MAX_JOB_FILE + 1)
            .read_to_string(&mut text)
            .map_err(read)?;
        Self::parse(&text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_examples_are_valid() {
        let doc = include_str!("../../docs/BOINC.md");
        let examples: Vec<JobFile> = doc
            .split("```xml\n")
            .filter(|s| s.starts_with("<copilot_job>"))
            .filter_map(|s| s.split("```").next())
            .map(|e| JobFile::parse(e).unwrap())
            .collect();
        assert_eq!(
            examples.len(),
            2,
            "docs/BOINC.md has two <copilot_job> examples"
        );
        assert_eq!(examples[0].backend, BackendKind::Process);
        assert_eq!(examples[0].session, Seconds(12 * 3600));
        assert_eq!(examples[1].backend, BackendKind::Qemu);
        assert_eq!(examples[1].memory_mb, 256);
    }

    #[test]
    fn defaults_and_durations() {
        let job = JobFile::parse("<copilot_job/>").unwrap();
        assert_eq!(job.agent, "copilot-agent");
        assert_eq!(job.agent_config, "copilot_agent.toml");
        assert_eq!(job.session, Seconds(86400));
        assert_eq!(job.drain, Seconds(3600));
        assert_eq!(job.stop_grace, Seconds(30));
        let job = JobFile::parse(
            "<copilot_job><session>90s</session><drain>10</drain><backend>qemu</backend></copilot_job>",
        )
        .unwrap();
        assert_eq!((job.session, job.drain), (Seconds(90), Seconds(10)));
        assert_eq!(job.backend, BackendKind::Qemu);
        assert_eq!((job.memory_mb, job.accel), (256, Accel::Auto));
        assert_eq!(job.min_checkpoint_interval(), Seconds(600));
        let job = JobFile::parse(
            "<copilot_job><backend>qemu</backend><memory_mb>512</memory_mb><accel>tcg</accel><checkpoint_interval>2m</checkpoint_interval></copilot_job>",
        )
        .unwrap();
        assert_eq!((job.memory_mb, job.accel), (512, Accel::Tcg));
        assert_eq!(job.min_checkpoint_interval(), Seconds(120));
        assert_eq!(
            JobFile::parse("<copilot_job/>")
                .unwrap()
                .min_checkpoint_interval(),
            Seconds(0)
        );
    }

    #[test]
    fn mistakes_are_named() {
        let err = JobFile::parse("<copilot_job><sesion>1h</sesion></copilot_job>").unwrap_err();
        assert!(err.to_string().contains("sesion"), "{err}");
        let err = JobFile::parse("<copilot_job><backend>vbox</backend></copilot_job>").unwrap_err();
        assert!(err.to_string().contains("vbox"), "{err}");
        let err = JobFile::parse("<copilot_job><agent>../x</agent></copilot_job>").unwrap_err();
        assert!(err.to_string().contains("plain file name"), "{err}");
        let err =
            JobFile::parse("<copilot_job><session>1h</session><drain>2h</drain></copilot_job>")
                .unwrap_err();
        assert!(err.to_string().contains("shorter"), "{err}");
        assert!(JobFile::parse("<copilot_job><session>soon</session></copilot_job>").is_err());
        assert!(JobFile::parse("<copilot_job>").is_err());
        let err =
            JobFile::parse("<copilot_job><memory_mb>16</memory_mb></copilot_job>").unwrap_err();
        assert!(err.to_string().contains("memory_mb"), "{err}");
        assert!(JobFile::parse("<copilot_job><memory_mb>lots</memory_mb></copilot_job>").is_err());
        assert!(JobFile::parse("<copilot_job><accel>hvf</accel></copilot_job>").is_err());
    }
}
