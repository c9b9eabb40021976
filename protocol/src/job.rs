//! Job files and job specs.
//!
//! A physicist writes a [`JobFile`] (TOML). The CLI uploads its local inputs and turns it into a
//! [`JobSpec`], which is what the manager stores and what it hands to agents. Both are validated
//! with the same rules: the agent, too, checks names and paths before it touches its disk.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::units::{Bytes, Seconds};
use crate::Sha256;

/// Largest job file (and serialized job spec) accepted, in bytes.
pub const MAX_JOB_FILE_BYTES: usize = 64 * 1024;
/// Most command-line words.
pub const MAX_ARGS: usize = 256;
/// Longest command-line word, environment value or URL, in bytes.
pub const MAX_WORD_BYTES: usize = 4096;
/// Most inputs, and most declared outputs.
pub const MAX_FILES: usize = 256;
/// Most environment variables.
pub const MAX_ENV: usize = 128;
/// Longest output path, in bytes.
pub const MAX_PATH_BYTES: usize = 1024;
/// Most retries a job may ask for.
pub const MAX_RETRIES: u32 = 100;

/// What is wrong with a job file or spec. Every message says which field and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    #[error("job file is {size} bytes; the limit is {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("job file is not valid TOML for a job: {0}")]
    Syntax(String),
    #[error("`command` is empty: give the program and its arguments, e.g. command = [\"sh\", \"run.sh\"]")]
    EmptyCommand,
    #[error("`command` has {0} words; the limit is {MAX_ARGS}")]
    TooManyArgs(usize),
    #[error("`{field}` is invalid: {reason}")]
    Field { field: String, reason: String },
    #[error("input {name:?}: {reason}")]
    Input { name: String, reason: String },
    #[error("output {path:?}: {reason}")]
    Output { path: String, reason: String },
    #[error("job has {count} {what}; the limit is {limit}")]
    TooMany {
        what: &'static str,
        count: usize,
        limit: usize,
    },
}

fn field(field: &str, reason: impl Into<String>) -> JobError {
    JobError::Field {
        field: field.to_owned(),
        reason: reason.into(),
    }
}

/// Resource limits of one job. Missing values take the agent's defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Wall-clock time of the payload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wall_time: Option<Seconds>,
    /// CPU time of the payload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_time: Option<Seconds>,
    /// Memory of the payload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Bytes>,
    /// Disk space of the work dir.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<Bytes>,
    /// Processes the payload may run at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processes: Option<u32>,
    /// Bytes kept of each of stdout and stderr.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Bytes>,
}

/// One input as written in a job file: a local `path` (uploaded by `copilot submit`) or a `url`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputEntry {
    /// File name in the job's work dir; defaults to the last part of `path` or `url`.
    #[serde(default)]
    pub name: Option<String>,
    /// A local file, relative to the job file.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// An `http(s)://` or `chirp://host:port/path` URL the agent fetches itself.
    #[serde(default)]
    pub url: Option<String>,
    /// Expected digest of a URL input (checked by the agent while it downloads).
    #[serde(default)]
    pub sha256: Option<Sha256>,
}

/// A job file, as a physicist writes it (see examples/ and docs/JOBS.md).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobFile {
    /// A short label shown in listings.
    #[serde(default)]
    pub name: Option<String>,
    /// Program and arguments, run in the job's work dir.
    pub command: Vec<String>,
    /// Files staged into the work dir before the command runs.
    #[serde(default)]
    pub inputs: Vec<InputEntry>,
    /// Files (relative to the work dir) packed and returned after the command ran.
    #[serde(default)]
    pub outputs: Vec<String>,
    /// Environment variables for the command (the rest of the environment is scrubbed).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Resource limits.
    #[serde(default)]
    pub limits: Limits,
    /// How often the job is retried when its agent vanishes or staging fails.
    #[serde(default)]
    pub max_retries: Option<u32>,
    /// How many identical job instances to submit (each gets `COPILOT_INSTANCE` = 0..count-1).
    #[serde(default)]
    pub count: Option<u32>,
    /// Whether the payload may use the network. With `false` the agent runs it in a network
    /// namespace of its own (only a loopback device, down) where the host allows one.
    #[serde(default = "yes")]
    pub network: bool,
    /// Run each instance on this many distinct agents (2 to [`MAX_REPLICAS`]; unset: once).
    #[serde(default)]
    pub replicas: Option<u32>,
    /// How many replicas' outputs must agree for the result to count (default: all of them).
    #[serde(default)]
    pub quorum: Option<u32>,
    /// Which of the manager's validators (`[validators.NAME]` in its config) decides whether
    /// two replicas' outputs agree (default: the same paths with the same sha256s).
    #[serde(default)]
    pub validator: Option<String>,
}

/// Most replicas of one job.
pub const MAX_REPLICAS: u32 = 10;

/// Longest validator name.
pub const MAX_VALIDATOR_NAME: usize = 64;

/// A job that runs on several distinct agents; its result counts once `quorum` of them
/// returned the same outputs: the same paths with the same sha256s, or outputs that the
/// manager's `validator` command says agree.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Replication {
    pub replicas: u32,
    pub quorum: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validator: Option<String>,
}

impl Replication {
    /// From a job file's `replicas`, `quorum` and `validator`: `None` for a job that runs once.
    pub fn from_fields(
        replicas: Option<u32>,
        quorum: Option<u32>,
        validator: Option<&str>,
    ) -> Result<Option<Replication>, JobError> {
        match (replicas, quorum, validator) {
            (None | Some(1), None, None) => Ok(None),
            (None | Some(1), Some(_), _) => Err(field("quorum", "needs replicas of 2 or more")),
            (None | Some(1), None, Some(_)) => {
                Err(field("validator", "needs replicas of 2 or more"))
            }
            (Some(replicas), quorum, validator) => {
                let r = Replication {
                    replicas,
                    quorum: quorum.unwrap_or(replicas),
                    validator: validator.map(str::to_owned),
                };
                r.validate()?;
                Ok(Some(r))
            }
        }
    }

    fn validate(&self) -> Result<(), JobError> {
        if !(2..=MAX_REPLICAS).contains(&self.replicas) {
            return Err(field(
                "replicas",
                format!("must be between 2 and {MAX_REPLICAS}"),
            ));
        }
        if !(1..=self.replicas).contains(&self.quorum) {
            return Err(field("quorum", "must be between 1 and replicas"));
        }
        if let Some(v) = &self.validator {
            if !valid_validator_name(v) {
                return Err(field(
                    "validator",
                    format!(
                        "must be 1 to {MAX_VALIDATOR_NAME} letters, digits, '-' or '_' \
                         (a name from the manager's [validators])"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Whether `name` can name a validator: 1 to [`MAX_VALIDATOR_NAME`] ASCII letters, digits,
/// `-` or `_` (the manager's config uses the same rule).
pub fn valid_validator_name(name: &str) -> bool {
    (1..=MAX_VALIDATOR_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn yes() -> bool {
    true
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_true(b: &bool) -> bool {
    *b
}

/// Where a job input comes from, after submission.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum InputSource {
    /// Stored by the manager's storage service under its digest.
    Stored { sha256: Sha256, size: u64 },
    /// Fetched by the agent from a URL, verified if a digest is given.
    Url {
        url: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sha256: Option<Sha256>,
    },
}

/// One input of a submitted job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobInput {
    pub name: String,
    pub source: InputSource,
}

/// A submitted job: what the manager stores and hands out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub name: String,
    pub command: Vec<String>,
    #[serde(default)]
    pub inputs: Vec<JobInput>,
    #[serde(default)]
    pub outputs: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
    /// See [`JobFile::network`].
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub network: bool,
    /// Run on several distinct agents, accepted by a quorum (see [`Replication`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<Replication>,
}

impl JobFile {
    /// Parse and validate a job file's text.
    pub fn parse(text: &str) -> Result<JobFile, JobError> {
        if text.len() > MAX_JOB_FILE_BYTES {
            return Err(JobError::TooLarge {
                size: text.len(),
                limit: MAX_JOB_FILE_BYTES,
            });
        }
        let file: JobFile = toml::from_str(text).map_err(|e| {
            JobError::Syntax(
                e.to_string()
                    .trim_end()
                    .replace('\n', " ")
                    .replace("  ", " "),
            )
        })?;
        file.validate()?;
        Ok(file)
    }

    /// Check everything that can be checked without the file system.
    pub fn validate(&self) -> Result<(), JobError> {
        if let Some(name) = &self.name {
            validate_label(name)?;
        }
        validate_command(&self.command)?;
        validate_env(&self.env)?;
        validate_outputs(&self.outputs)?;
        validate_retries(self.max_retries)?;
        Replication::from_fields(self.replicas, self.quorum, self.validator.as_deref())?;
        if let Some(c) = self.count {
            if c == 0 || c > 100_000 {
                return Err(field("count", "must be between 1 and 100000"));
            }
            // Instances are named `name#<i>`, and those names must be valid labels too.
            let name = self
                .name
                .clone()
                .unwrap_or_else(|| default_name(&self.command));
            let longest = name.len() + 1 + (c - 1).to_string().len();
            if longest > MAX_LABEL_BYTES {
                return Err(field(
                    "name",
                    format!("is too long for count = {c}: the instances' names `{name}#<i>` would be {longest} bytes; the limit is {MAX_LABEL_BYTES}"),
                ));
            }
        }
        check_count("inputs", self.inputs.len(), MAX_FILES)?;
        let mut names = BTreeSet::new();
        for entry in &self.inputs {
            let name = entry.effective_name()?;
            validate_input_name(&name)?;
            if !names.insert(name.clone()) {
                return Err(JobError::Input {
                    name,
                    reason: "two inputs have this name".into(),
                });
            }
            match (&entry.path, &entry.url) {
                (Some(_), None) => {
                    if entry.sha256.is_some() {
                        return Err(JobError::Input {
                            name,
                            reason: "sha256 is computed for local files; give it only with url"
                                .into(),
                        });
                    }
                }
                (None, Some(url)) => validate_url(&name, url)?,
                _ => {
                    return Err(JobError::Input {
                        name,
                        reason: "give exactly one of `path` (a local file) or `url`".into(),
                    })
                }
            }
        }
        Ok(())
    }

    /// The local files this job file refers to, resolved against `base` (the job file's dir).
    pub fn local_paths(&self, base: &Path) -> Vec<PathBuf> {
        self.inputs
            .iter()
            .filter_map(|e| e.path.as_ref().map(|p| base.join(p)))
            .collect()
    }

    /// Build the job spec(s), given the digest and size of each stored local file (looked up by
    /// its resolved path). A job file with `count = N` gives N specs.
    pub fn into_specs(
        self,
        base: &Path,
        stored: impl Fn(&Path) -> Option<(Sha256, u64)>,
    ) -> Result<Vec<JobSpec>, JobError> {
        self.validate()?;
        let mut inputs = Vec::with_capacity(self.inputs.len());
        for entry in &self.inputs {
            let name = entry.effective_name()?;
            let source = match (&entry.path, &entry.url) {
                (Some(p), _) => {
                    let full = base.join(p);
                    let (sha256, size) = stored(&full).ok_or_else(|| JobError::Input {
                        name: name.clone(),
                        reason: format!("local file {} was not uploaded", full.display()),
                    })?;
                    InputSource::Stored { sha256, size }
                }
                (None, Some(url)) => InputSource::Url {
                    url: url.clone(),
                    sha256: entry.sha256,
                },
                (None, None) => unreachable!("validate() checked that each input has a source"),
            };
            inputs.push(JobInput { name, source });
        }
        let name = self
            .name
            .clone()
            .unwrap_or_else(|| default_name(&self.command));
        let count = self.count.unwrap_or(1);
        let replication =
            Replication::from_fields(self.replicas, self.quorum, self.validator.as_deref())?;
        let specs = (0..count)
            .map(|i| {
                let mut env = self.env.clone();
                if self.count.is_some() {
                    env.insert("COPILOT_INSTANCE".into(), i.to_string());
                }
                JobSpec {
                    name: if self.count.is_some() {
                        format!("{name}#{i}")
                    } else {
                        name.clone()
                    },
                    command: self.command.clone(),
                    inputs: inputs.clone(),
                    outputs: self.outputs.clone(),
                    env,
                    limits: self.limits.clone(),
                    max_retries: self.max_retries,
                    network: self.network,
                    replication: replication.clone(),
                }
            })
            .collect();
        Ok(specs)
    }
}

impl InputEntry {
    /// `name`, or the last part of `path` or `url`.
    pub fn effective_name(&self) -> Result<String, JobError> {
        if let Some(n) = &self.name {
            return Ok(n.clone());
        }
        let from_path = self
            .path
            .as_ref()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned());
        let from_url = self.url.as_ref().and_then(|u| {
            u.split(['?', '#'])
                .next()
                .and_then(|u| u.rsplit('/').next())
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        });
        from_path.or(from_url).ok_or_else(|| JobError::Input {
            name: String::new(),
            reason: "cannot derive a file name; give `name`".into(),
        })
    }
}

impl JobSpec {
    /// A job named `name` that runs `command`, with no inputs, outputs, environment or limits.
    pub fn new(name: impl Into<String>, command: &[&str]) -> JobSpec {
        JobSpec {
            name: name.into(),
            command: command.iter().map(|w| (*w).to_owned()).collect(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            env: BTreeMap::new(),
            limits: Limits::default(),
            max_retries: None,
            network: true,
            replication: None,
        }
    }

    /// Check a spec that came from outside (the API or the wire) with the job-file rules.
    pub fn validate(&self) -> Result<(), JobError> {
        validate_label(&self.name)?;
        validate_command(&self.command)?;
        validate_env(&self.env)?;
        validate_outputs(&self.outputs)?;
        validate_retries(self.max_retries)?;
        if let Some(r) = &self.replication {
            r.validate()?;
        }
        check_count("inputs", self.inputs.len(), MAX_FILES)?;
        let mut names = BTreeSet::new();
        for input in &self.inputs {
            validate_input_name(&input.name)?;
            if !names.insert(&input.name) {
                return Err(JobError::Input {
                    name: input.name.clone(),
                    reason: "two inputs have this name".into(),
                });
            }
            if let InputSource::Url { url, .. } = &input.source {
                validate_url(&input.name, url)?;
            }
        }
        Ok(())
    }
}

/// The last `*.sh`/`*.awk` word of the command, else its program, without directories or
/// control characters, at most 64 characters; `job` if nothing is left.
fn default_name(command: &[String]) -> String {
    let name: String = command
        .iter()
        .rev()
        .find(|w| w.ends_with(".sh") || w.ends_with(".awk"))
        .or(command.first())
        .and_then(|w| w.rsplit('/').next())
        .map(|w| {
            w.chars()
                .filter(|c| !c.is_control())
                .take(64)
                .collect::<String>()
                .trim()
                .to_owned()
        })
        .unwrap_or_default();
    if name.is_empty() {
        "job".into()
    } else {
        name
    }
}

fn check_count(what: &'static str, count: usize, limit: usize) -> Result<(), JobError> {
    if count > limit {
        return Err(JobError::TooMany { what, count, limit });
    }
    Ok(())
}

/// Longest job name, in bytes.
pub const MAX_LABEL_BYTES: usize = 128;

fn validate_label(name: &str) -> Result<(), JobError> {
    if name.is_empty() || name.len() > MAX_LABEL_BYTES || name.chars().any(char::is_control) {
        return Err(field(
            "name",
            format!("must be 1 to {MAX_LABEL_BYTES} bytes of printable characters"),
        ));
    }
    Ok(())
}

fn validate_retries(r: Option<u32>) -> Result<(), JobError> {
    match r {
        Some(n) if n > MAX_RETRIES => Err(field(
            "max_retries",
            format!("{n} is more than the limit of {MAX_RETRIES}"),
        )),
        _ => Ok(()),
    }
}

/// Command words: 1 to [`MAX_ARGS`], each at most [`MAX_WORD_BYTES`], no NUL bytes.
pub fn validate_command(command: &[String]) -> Result<(), JobError> {
    if command.is_empty() || command[0].is_empty() {
        return Err(JobError::EmptyCommand);
    }
    if command.len() > MAX_ARGS {
        return Err(JobError::TooManyArgs(command.len()));
    }
    for (i, w) in command.iter().enumerate() {
        if w.len() > MAX_WORD_BYTES || !wire_safe_text(w) {
            return Err(field(
                &format!("command[{i}]"),
                format!("must be at most {MAX_WORD_BYTES} bytes without control characters (tab and newline are fine)"),
            ));
        }
    }
    Ok(())
}

/// Whether `s` can travel in XML element text unchanged: no control characters but tab and
/// newline (XML forbids most of them and turns a carriage return into a newline).
pub fn wire_safe_text(s: &str) -> bool {
    !s.chars().any(|c| c.is_control() && c != '\n' && c != '\t')
}

/// Environment: names like shell variables, values without NUL, bounded.
pub fn validate_env(env: &BTreeMap<String, String>) -> Result<(), JobError> {
    check_count("environment variables", env.len(), MAX_ENV)?;
    for (k, v) in env {
        let mut chars = k.chars();
        let ok_start = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
        if !ok_start || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') || k.len() > 128 {
            return Err(field(
                &format!("env.{k}"),
                "names are letters, digits and _, not starting with a digit",
            ));
        }
        if v.len() > MAX_WORD_BYTES || !wire_safe_text(v) {
            return Err(field(
                &format!("env.{k}"),
                format!("value must be at most {MAX_WORD_BYTES} bytes without control characters (tab and newline are fine)"),
            ));
        }
    }
    Ok(())
}

/// An input name is one plain file name: no directories, no `.` or `..`, no NUL.
pub fn validate_input_name(name: &str) -> Result<(), JobError> {
    let bad = |reason: &str| JobError::Input {
        name: name.chars().take(80).collect(),
        reason: reason.into(),
    };
    if name.is_empty() || name.len() > 255 {
        return Err(bad("name must be 1 to 255 bytes"));
    }
    if name == "." || name == ".." || name.contains(['/', '\\', '\0']) {
        return Err(bad("name must be a plain file name (no /, \\, . or ..)"));
    }
    Ok(())
}

/// Output paths are relative, inside the work dir, unique, and bounded in number and length.
pub fn validate_outputs(outputs: &[String]) -> Result<(), JobError> {
    check_count("outputs", outputs.len(), MAX_FILES)?;
    let mut seen = BTreeSet::new();
    for p in outputs {
        validate_output_path(p)?;
        if !seen.insert(p) {
            return Err(JobError::Output {
                path: p.clone(),
                reason: "listed twice".into(),
            });
        }
    }
    Ok(())
}

/// One output path: relative, only normal components, at most [`MAX_PATH_BYTES`].
pub fn validate_output_path(p: &str) -> Result<(), JobError> {
    let bad = |reason: &str| JobError::Output {
        path: p.chars().take(80).collect(),
        reason: reason.into(),
    };
    if p.is_empty() || p.len() > MAX_PATH_BYTES || p.contains('\0') || p.contains('\\') {
        return Err(bad("must be 1 to 1024 bytes, no NUL or backslash"));
    }
    let path = Path::new(p);
    if !path.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(bad(
            "must be a relative path inside the work dir (no /, . or ..)",
        ));
    }
    if p.starts_with("_copilot") {
        return Err(bad("_copilot/ is reserved for the job's logs"));
    }
    Ok(())
}

fn validate_url(name: &str, url: &str) -> Result<(), JobError> {
    let ok_scheme = ["http://", "https://", "chirp://"]
        .iter()
        .any(|s| url.starts_with(s));
    if !ok_scheme || url.len() > MAX_WORD_BYTES || url.chars().any(|c| c.is_whitespace()) {
        return Err(JobError::Input {
            name: name.to_owned(),
            reason: "url must be http://, https:// or chirp://, without spaces (write a space in a chirp path as %20)".into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MC: &str = r#"
name = "mc-pi"
command = ["sh", "mc.sh", "1000"]
outputs = ["histogram.csv"]
env = { SEED = "42" }
max_retries = 2

[[inputs]]
path = "mc.sh"

[[inputs]]
url = "https://example.org/data/calib.txt"
sha256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

[limits]
wall_time = "5m"
output = "1MiB"
"#;

    #[test]
    fn parses_a_full_job_file() {
        let f = JobFile::parse(MC).unwrap();
        assert_eq!(f.name.as_deref(), Some("mc-pi"));
        assert_eq!(f.limits.wall_time, Some(Seconds(300)));
        assert_eq!(f.limits.output, Some(Bytes(1 << 20)));
        assert_eq!(f.inputs[1].effective_name().unwrap(), "calib.txt");
        let base = Path::new("/jobs");
        assert_eq!(f.local_paths(base), vec![PathBuf::from("/jobs/mc.sh")]);
        let specs = f
            .into_specs(base, |p| {
                (p == Path::new("/jobs/mc.sh")).then(|| (Sha256::of(b"x"), 1))
            })
            .unwrap();
        assert_eq!(specs.len(), 1);
        assert_eq!(specs[0].inputs[0].name, "mc.sh");
        assert!(matches!(
            specs[0].inputs[0].source,
            InputSource::Stored { size: 1, .. }
        ));
        specs[0].validate().unwrap();
    }

    #[test]
    fn chirp_urls_are_inputs_too() {
        let f = JobFile::parse(
            "command = [\"true\"]\n[[inputs]]\nurl = \"chirp://127.0.0.1:9094/data/calib%20v2.dat\"",
        )
        .unwrap();
        let spec = &f.into_specs(Path::new("."), |_| None).unwrap()[0];
        assert_eq!(spec.inputs[0].name, "calib%20v2.dat");
        spec.validate().unwrap();
    }

    #[test]
    fn derived_and_numbered_names_are_valid_labels() {
        // Found by fuzzing: a command whose program holds tabs gave a name with tabs.
        let f = JobFile::parse("command = [\"a\\t\\tb\\n\"]").unwrap();
        let spec = &f.into_specs(Path::new("."), |_| None).unwrap()[0];
        assert_eq!(spec.name, "ab");
        spec.validate().unwrap();
        let f = JobFile::parse("command = [\"\\t\"]").unwrap();
        assert_eq!(
            f.into_specs(Path::new("."), |_| None).unwrap()[0].name,
            "job"
        );
        // A name that fits alone but not with `#<i>` is refused up front.
        let long = "n".repeat(126);
        let err = JobFile::parse(&format!("name = \"{long}\"\ncommand = [\"x\"]\ncount = 11"))
            .unwrap_err();
        assert!(err.to_string().contains("too long for count = 11"), "{err}");
        let f =
            JobFile::parse(&format!("name = \"{long}\"\ncommand = [\"x\"]\ncount = 10")).unwrap();
        for spec in f.into_specs(Path::new("."), |_| None).unwrap() {
            spec.validate().unwrap();
        }
    }

    #[test]
    fn count_makes_numbered_instances() {
        let f = JobFile::parse("command = [\"true\"]\ncount = 3").unwrap();
        let specs = f.into_specs(Path::new("."), |_| None).unwrap();
        assert_eq!(specs.len(), 3);
        assert_eq!(specs[2].name, "true#2");
        assert_eq!(specs[2].env["COPILOT_INSTANCE"], "2");
    }

    #[test]
    fn network_is_on_unless_a_job_turns_it_off() {
        let on = JobFile::parse("command = [\"true\"]").unwrap();
        assert!(on.network);
        let spec = &on.into_specs(Path::new("."), |_| None).unwrap()[0];
        assert!(spec.network);
        let json = serde_json::to_string(spec).unwrap();
        assert!(!json.contains("network"), "{json}");

        let off = JobFile::parse("command = [\"true\"]\nnetwork = false").unwrap();
        let spec = &off.into_specs(Path::new("."), |_| None).unwrap()[0];
        assert!(!spec.network);
        let back: JobSpec = serde_json::from_str(&serde_json::to_string(spec).unwrap()).unwrap();
        assert!(!back.network);
    }

    #[test]
    fn unknown_fields_are_rejected_with_their_name() {
        let err = JobFile::parse("command = [\"true\"]\ncomand = 1").unwrap_err();
        assert!(err.to_string().contains("comand"), "{err}");
    }

    #[test]
    fn bad_job_files_get_clear_errors() {
        let cases = [
            ("command = []", "command"),
            (
                "command = [\"x\"]\noutputs = [\"../etc/passwd\"]",
                "relative path",
            ),
            ("command = [\"x\"]\noutputs = [\"/abs\"]", "relative path"),
            ("command = [\"x\"]\noutputs = [\"a\", \"a\"]", "twice"),
            (
                "command = [\"x\"]\n[[inputs]]\nname = \"../x\"\nurl = \"http://h/x\"",
                "plain file name",
            ),
            ("command = [\"x\"]\n[[inputs]]\nurl = \"ftp://h/x\"", "http"),
            ("command = [\"x\"]\n[[inputs]]\nname = \"a\"", "exactly one"),
            ("command = [\"x\"]\nenv = { \"1A\" = \"v\" }", "env.1A"),
            ("command = [\"x\"]\nmax_retries = 1000", "max_retries"),
            (
                "command = [\"x\"]\n[limits]\nwall_time = \"soon\"",
                "duration",
            ),
            ("command = [\"x\"]\n[limits]\nmemory = \"lots\"", "size"),
            ("command = \"sh run.sh\"", "TOML"),
        ];
        for (text, want) in cases {
            let err = JobFile::parse(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err}");
        }
        let huge = format!(
            "command = [\"x\"]\nname = \"{}\"",
            "a".repeat(MAX_JOB_FILE_BYTES)
        );
        assert!(matches!(
            JobFile::parse(&huge),
            Err(JobError::TooLarge { .. })
        ));
    }

    #[test]
    fn spec_json_round_trip() {
        let f = JobFile::parse(MC).unwrap();
        let specs = f
            .into_specs(Path::new("/jobs"), |_| Some((Sha256::of(b"y"), 2)))
            .unwrap();
        let json = serde_json::to_string(&specs[0]).unwrap();
        let back: JobSpec = serde_json::from_str(&json).unwrap();
        assert_eq!(back, specs[0]);
    }

    #[test]
    fn replicas_and_quorum_become_the_specs_replication() {
        let specs = |text: &str| JobFile::parse(text)?.into_specs(Path::new("/jobs"), |_| None);
        let s = specs("command = [\"x\"]\nreplicas = 3\nquorum = 2\ncount = 2\n").unwrap();
        assert_eq!(s.len(), 2);
        for spec in &s {
            assert_eq!(
                spec.replication,
                Some(Replication {
                    replicas: 3,
                    quorum: 2,
                    validator: None,
                })
            );
            spec.validate().unwrap();
        }
        // The quorum defaults to every replica; one replica is no replication.
        let all = specs("command = [\"x\"]\nreplicas = 2\n").unwrap();
        assert_eq!(all[0].replication.as_ref().map(|r| r.quorum), Some(2));
        let v = specs("command = [\"x\"]\nreplicas = 2\nvalidator = \"close-enough_2\"\n").unwrap();
        assert_eq!(
            v[0].replication
                .as_ref()
                .and_then(|r| r.validator.as_deref()),
            Some("close-enough_2")
        );
        assert_eq!(
            specs("command = [\"x\"]\nreplicas = 1\n").unwrap()[0].replication,
            None
        );
        for (text, field) in [
            ("replicas = 11", "replicas"),
            ("replicas = 0", "replicas"),
            ("replicas = 2\nquorum = 3", "quorum"),
            ("replicas = 2\nquorum = 0", "quorum"),
            ("quorum = 2", "quorum"),
            ("validator = \"close\"", "validator"),
            ("replicas = 2\nvalidator = \"\"", "validator"),
            ("replicas = 2\nvalidator = \"../bin/sh\"", "validator"),
        ] {
            let err = specs(&format!("command = [\"x\"]\n{text}\n")).unwrap_err();
            assert!(err.to_string().contains(field), "{text}: {err}");
        }
        // A spec from the API is checked the same way.
        let mut bad = JobSpec::new("j", &["x"]);
        bad.replication = Some(Replication {
            replicas: 2,
            quorum: 5,
            validator: None,
        });
        assert!(bad.validate().is_err());
        bad.replication = Some(Replication {
            replicas: 2,
            quorum: 2,
            validator: Some("a b".into()),
        });
        assert!(bad.validate().is_err());
    }
}
