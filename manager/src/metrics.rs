//! The manager's counters and gauges, rendered in the Prometheus text exposition format 0.0.4
//! for `GET /metrics`.
//!
//! Everything is a plain atomic held by [`Shared`](crate::Shared): no locks, no global state.
//! Labelled families have a fixed, small set of label values known at compile time, so the
//! output's cardinality is bounded whatever agents or clients send. Gauges that other parts of
//! the manager already know (jobs by state, agents online) are read at scrape time and passed to
//! [`Metrics::render`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use copilot_protocol::sandbox::Protection;
use copilot_protocol::wire::{DoneReport, Outcome};
use copilot_protocol::JobState;

/// A counter (or gauge) per label value, the values fixed at compile time.
#[derive(Debug)]
pub struct Family<const N: usize> {
    values: [&'static str; N],
    counts: [AtomicU64; N],
}

impl<const N: usize> Family<N> {
    const fn new(values: [&'static str; N]) -> Self {
        Self {
            values,
            counts: [const { AtomicU64::new(0) }; N],
        }
    }

    /// Add one to the sample labelled `value`; a value not in the family is a bug and counts
    /// nowhere.
    pub fn inc(&self, value: &str) {
        debug_assert!(self.values.contains(&value), "unknown label value {value}");
        if let Some(i) = self.values.iter().position(|v| *v == value) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The sample labelled `value` (0 for an unknown value).
    pub fn get(&self, value: &str) -> u64 {
        self.values
            .iter()
            .position(|v| *v == value)
            .map_or(0, |i| self.counts[i].load(Ordering::Relaxed))
    }
}

/// Upper bounds (seconds) of the buckets of the phase duration histograms.
const SECONDS_BUCKETS: [f64; 12] = [
    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 7200.0,
];

/// A Prometheus histogram of durations: a count per bucket of [`SECONDS_BUCKETS`] (and one
/// for the rest) and their sum in milliseconds.
#[derive(Debug)]
pub struct Seconds {
    buckets: [AtomicU64; SECONDS_BUCKETS.len() + 1],
    sum_ms: AtomicU64,
}

impl Seconds {
    const fn new() -> Self {
        Self {
            buckets: [const { AtomicU64::new(0) }; SECONDS_BUCKETS.len() + 1],
            sum_ms: AtomicU64::new(0),
        }
    }

    /// Count one duration of `ms` milliseconds.
    pub fn observe_ms(&self, ms: u64) {
        let secs = ms as f64 / 1000.0;
        let i = SECONDS_BUCKETS
            .iter()
            .position(|le| secs <= *le)
            .unwrap_or(SECONDS_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ms.fetch_add(ms, Ordering::Relaxed);
    }
}

/// Route classes of the HTTP service, for `copilot_http_requests_total`; `other` last.
pub const ROUTES: [&str; 14] = [
    "inputs",
    "outputs",
    "jobs",
    "job",
    "job_output",
    "job_files",
    "agents",
    "summary",
    "batch",
    "contributions",
    "volunteers",
    "metrics",
    "ui",
    "other",
];
/// Status classes for `copilot_http_requests_total`.
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The kind of a reported outcome, the label of `copilot_reports_recorded_total`.
pub fn outcome_kind(o: &Outcome) -> &'static str {
    match o {
        Outcome::Exited { code: 0 } => "succeeded",
        Outcome::Exited { .. } => "exited_nonzero",
        Outcome::Killed { .. } => "killed",
        Outcome::TimedOut => "timed_out",
        Outcome::LimitExceeded { .. } => "limit_exceeded",
        Outcome::StageInFailed(_) => "stage_in_failed",
        Outcome::SetupFailed(_) => "setup_failed",
        Outcome::StageOutFailed(_) => "stage_out_failed",
        Outcome::Refused(_) => "refused",
    }
}

/// Why an upload was refused, from the HTTP status of the refusal.
pub fn refusal_reason(status: u16) -> &'static str {
    match status {
        400 => "bad_request",
        401 => "unauthenticated",
        403 => "forbidden",
        404 => "not_found",
        409 => "conflict",
        413 => "too_large",
        422 => "digest_mismatch",
        500..=599 => "internal",
        _ => "other",
    }
}

/// The manager's counters and the gauges it keeps itself.
#[derive(Debug)]
pub struct Metrics {
    pub jobs_submitted: AtomicU64,
    pub assignments: AtomicU64,
    /// Done reports recorded, by outcome kind (see [`outcome_kind`]).
    pub reports_recorded: Family<9>,
    pub reports_duplicate: AtomicU64,
    /// Done reports refused: `stale_lease`, `unknown_job` or `error` (the queue failed).
    pub reports_refused: Family<3>,
    /// Jobs whose lease ran out (requeued or failed by the sweeper).
    pub lease_expiries: AtomicU64,
    /// Known agents that went offline (their leases were released).
    pub agent_releases: AtomicU64,
    /// Jobs released because their agent went offline.
    pub jobs_released: AtomicU64,
    /// Work requests being held now, waiting for work.
    pub held_requests: AtomicU64,
    pub input_bytes_stored: AtomicU64,
    pub output_bytes_stored: AtomicU64,
    /// Bytes of stored inputs sent (to agents staging them in, or anyone with the API token).
    pub input_bytes_served: AtomicU64,
    /// Bytes of output archives and files sent (results downloads, the dashboard).
    pub output_bytes_served: AtomicU64,
    /// Phase durations of recorded reports, as the agents measured them.
    pub stage_in_seconds: Seconds,
    pub run_seconds: Seconds,
    pub stage_out_seconds: Seconds,
    /// Recorded reports by sandbox protection, active or missing (see [`Metrics::recorded`]).
    sandbox: [[AtomicU64; 2]; Protection::ALL.len()],
    /// Input upload refusals by reason (see [`refusal_reason`]).
    pub input_refusals: Family<9>,
    /// Output upload refusals by reason (see [`refusal_reason`]).
    pub output_refusals: Family<9>,
    /// Malformed or unexpected stanzas from agents.
    pub bad_stanzas: AtomicU64,
    /// Cooldowns started for senders of too many refused requests.
    pub agents_cooled_down: AtomicU64,
    /// Verdicts of validator commands on pairs of replicas.
    pub validator_verdicts: AtomicU64,
    /// Comparisons a validator command could not make (it failed, timed out, or an archive
    /// could not be read).
    pub validator_failures: AtomicU64,
    /// HTTP requests by route class ([`ROUTES`]) and status class.
    http: [[AtomicU64; 5]; ROUTES.len()],
}

const REFUSAL_REASONS: [&str; 9] = [
    "bad_request",
    "unauthenticated",
    "forbidden",
    "not_found",
    "conflict",
    "too_large",
    "digest_mismatch",
    "internal",
    "other",
];

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Counts one held work request while alive.
#[derive(Debug)]
pub struct Held<'a>(&'a AtomicU64);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    /// Everything at zero.
    pub const fn new() -> Self {
        Self {
            jobs_submitted: AtomicU64::new(0),
            assignments: AtomicU64::new(0),
            reports_recorded: Family::new([
                "succeeded",
                "exited_nonzero",
                "killed",
                "timed_out",
                "limit_exceeded",
                "stage_in_failed",
                "setup_failed",
                "stage_out_failed",
                "refused",
            ]),
            reports_duplicate: AtomicU64::new(0),
            reports_refused: Family::new(["stale_lease", "unknown_job", "error"]),
            lease_expiries: AtomicU64::new(0),
            agent_releases: AtomicU64::new(0),
            jobs_released: AtomicU64::new(0),
            held_requests: AtomicU64::new(0),
            input_bytes_stored: AtomicU64::new(0),
            output_bytes_stored: AtomicU64::new(0),
            input_bytes_served: AtomicU64::new(0),
            output_bytes_served: AtomicU64::new(0),
            stage_in_seconds: Seconds::new(),
            run_seconds: Seconds::new(),
            stage_out_seconds: Seconds::new(),
            sandbox: [const { [const { AtomicU64::new(0) }; 2] }; Protection::ALL.len()],
            input_refusals: Family::new(REFUSAL_REASONS),
            output_refusals: Family::new(REFUSAL_REASONS),
            bad_stanzas: AtomicU64::new(0),
            agents_cooled_down: AtomicU64::new(0),
            validator_verdicts: AtomicU64::new(0),
            validator_failures: AtomicU64::new(0),
            http: [const { [const { AtomicU64::new(0) }; 5] }; ROUTES.len()],
        }
    }

    /// Add `n` to `counter`.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Count a recorded done report: its outcome, its phase durations, and the sandbox
    /// protections its payload had or lacked (reports of payloads that never started say
    /// nothing about the sandbox).
    pub fn recorded(&self, report: &DoneReport) {
        self.reports_recorded.inc(outcome_kind(&report.outcome));
        let t = report.timings;
        self.stage_in_seconds.observe_ms(t.stage_in_ms);
        self.run_seconds.observe_ms(t.run_ms);
        self.stage_out_seconds.observe_ms(t.stage_out_ms);
        for (i, p) in Protection::ALL.iter().enumerate() {
            if report.sandbox.active.contains(p) {
                self.sandbox[i][0].fetch_add(1, Ordering::Relaxed);
            } else if report.sandbox.missing.contains(p) {
                self.sandbox[i][1].fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Count a work request as held until the returned guard is dropped.
    pub fn hold(&self) -> Held<'_> {
        self.held_requests.fetch_add(1, Ordering::Relaxed);
        Held(&self.held_requests)
    }

    /// Count an HTTP request to a route class (one of [`ROUTES`]) answered with `status`.
    pub fn http_request(&self, route: &str, status: u16) {
        let r = ROUTES
            .iter()
            .position(|x| *x == route)
            .unwrap_or(ROUTES.len() - 1);
        let s = usize::from(status / 100).clamp(1, 5) - 1;
        self.http[r][s].fetch_add(1, Ordering::Relaxed);
    }

    /// The text exposition: these metrics plus the job counts by state and agents online.
    pub fn render(&self, jobs: &BTreeMap<JobState, u64>, agents_online: u64) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut out = Out(String::with_capacity(4096));
        out.head("copilot_jobs", "gauge", "Jobs in the queue by state.");
        for (state, n) in jobs {
            out.sample("copilot_jobs", &[("state", state.as_str())], *n);
        }
        out.counter(
            "copilot_jobs_submitted_total",
            "Jobs submitted through the API.",
            get(&self.jobs_submitted),
        );
        out.counter(
            "copilot_assignments_total",
            "Jobs assigned to agents (attempts started).",
            get(&self.assignments),
        );
        out.family(
            "copilot_reports_recorded_total",
            "counter",
            "Done reports recorded, by the outcome the agent reported.",
            "outcome",
            &self.reports_recorded,
        );
        out.counter(
            "copilot_reports_duplicate_total",
            "Retransmitted done reports acknowledged as duplicates.",
            get(&self.reports_duplicate),
        );
        out.family(
            "copilot_reports_refused_total",
            "counter",
            "Done reports refused: for an attempt without a lease (stale_lease), an unknown job, or a queue error.",
            "reason",
            &self.reports_refused,
        );
        out.counter(
            "copilot_lease_expiries_total",
            "Jobs whose lease ran out without progress (requeued or failed).",
            get(&self.lease_expiries),
        );
        out.counter(
            "copilot_agent_releases_total",
            "Known agents that went offline; the jobs they held were released.",
            get(&self.agent_releases),
        );
        out.counter(
            "copilot_jobs_released_total",
            "Jobs released (requeued or failed) because their agent went offline.",
            get(&self.jobs_released),
        );
        out.head("copilot_agents_online", "gauge", "Agents online now.");
        out.sample("copilot_agents_online", &[], agents_online);
        out.head(
            "copilot_held_work_requests",
            "gauge",
            "Agents' work requests held now, waiting for a job.",
        );
        out.sample("copilot_held_work_requests", &[], get(&self.held_requests));
        out.counter(
            "copilot_input_bytes_stored_total",
            "Bytes of new inputs stored.",
            get(&self.input_bytes_stored),
        );
        out.counter(
            "copilot_output_bytes_stored_total",
            "Bytes of output archives stored.",
            get(&self.output_bytes_stored),
        );
        out.counter(
            "copilot_input_bytes_served_total",
            "Bytes of stored inputs sent (stage-in by agents, or downloads with the API token).",
            get(&self.input_bytes_served),
        );
        out.counter(
            "copilot_output_bytes_served_total",
            "Bytes of output archives and files sent (results and dashboard downloads).",
            get(&self.output_bytes_served),
        );
        for (name, help, h) in [
            (
                "copilot_stage_in_seconds",
                "Time agents spent staging inputs in, per recorded report.",
                &self.stage_in_seconds,
            ),
            (
                "copilot_run_seconds",
                "Time payloads ran, per recorded report.",
                &self.run_seconds,
            ),
            (
                "copilot_stage_out_seconds",
                "Time agents spent packing and uploading outputs, per recorded report.",
                &self.stage_out_seconds,
            ),
        ] {
            out.histogram(name, help, h);
        }
        out.head(
            "copilot_sandbox_reports_total",
            "counter",
            "Recorded reports whose payload had (active) or lacked (missing) each sandbox protection.",
        );
        for (p, row) in Protection::ALL.iter().zip(&self.sandbox) {
            for (status, n) in ["active", "missing"].iter().zip(row) {
                out.sample(
                    "copilot_sandbox_reports_total",
                    &[("protection", p.as_str()), ("status", status)],
                    get(n),
                );
            }
        }
        out.head(
            "copilot_upload_refusals_total",
            "counter",
            "Uploads refused, by kind (input, output) and reason.",
        );
        for (kind, fam) in [
            ("input", &self.input_refusals),
            ("output", &self.output_refusals),
        ] {
            for (value, n) in fam.values.iter().zip(&fam.counts) {
                out.sample(
                    "copilot_upload_refusals_total",
                    &[("kind", kind), ("reason", value)],
                    get(n),
                );
            }
        }
        out.counter(
            "copilot_bad_stanzas_total",
            "Malformed or unexpected stanzas received from agents.",
            get(&self.bad_stanzas),
        );
        out.counter(
            "copilot_agent_cooldowns_total",
            "Senders told to retry later after too many refused requests.",
            get(&self.agents_cooled_down),
        );
        out.counter(
            "copilot_validator_verdicts_total",
            "Pairs of replicas a validator command compared.",
            get(&self.validator_verdicts),
        );
        out.counter(
            "copilot_validator_failures_total",
            "Comparisons of replicas that failed (the validator failed or timed out, or an archive was unreadable).",
            get(&self.validator_failures),
        );
        out.head(
            "copilot_http_requests_total",
            "counter",
            "HTTP requests answered, by route class and status class.",
        );
        for (route, row) in ROUTES.iter().zip(&self.http) {
            for (class, n) in STATUS_CLASSES.iter().zip(row) {
                let n = get(n);
                // Only classes that happened: most routes never answer 1xx or 3xx.
                if n > 0 {
                    out.sample(
                        "copilot_http_requests_total",
                        &[("route", route), ("status", class)],
                        n,
                    );
                }
            }
        }
        out.0
    }
}

/// The exposition being written.
struct Out(String);

impl Out {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.sample_text(name, labels, &value.to_string());
    }

    fn sample_text(&mut self, name: &str, labels: &[(&str, &str)], value: &str) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", escape_label(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }

    fn histogram(&mut self, name: &str, help: &str, h: &Seconds) {
        self.head(name, "histogram", help);
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0;
        for (le, n) in SECONDS_BUCKETS.iter().zip(&h.buckets) {
            cumulative += n.load(Ordering::Relaxed);
            self.sample(&bucket, &[("le", &le.to_string())], cumulative);
        }
        // The last bucket counts everything above the largest bound.
        cumulative += h.buckets[SECONDS_BUCKETS.len()].load(Ordering::Relaxed);
        self.sample(&bucket, &[("le", "+Inf")], cumulative);
        let sum = h.sum_ms.load(Ordering::Relaxed) as f64 / 1000.0;
        self.sample_text(&format!("{name}_sum"), &[], &sum.to_string());
        self.sample(&format!("{name}_count"), &[], cumulative);
    }

    fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.head(name, "counter", help);
        self.sample(name, &[], value);
    }

    fn family<const N: usize>(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        label: &str,
        fam: &Family<N>,
    ) {
        self.head(name, kind, help);
        for (value, n) in fam.values.iter().zip(&fam.counts) {
            self.sample(name, &[(label, value)], n.load(Ordering::Relaxed));
        }
    }
}

/// A label value as the text format wants it: backslash, double quote and newline escaped.
pub fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// HELP text as the text format wants it: backslash and newline escaped.
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// A strict parser of the text format, for tests here and in other modules.
#[cfg(test)]
pub(crate) mod tests {
    use std::collections::{BTreeMap, HashSet};

    use super::*;

    fn valid_metric_name(n: &str) -> bool {
        let mut c = n.chars();
        c.next()
            .is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
            && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || x == ':')
    }

    fn valid_label_name(n: &str) -> bool {
        let mut c = n.chars();
        !n.starts_with("__")
            && c.next()
                .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
            && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
    }

    /// Parse `{k="v",...}` (after the name) up to the closing brace; returns the labels and the
    /// rest of the line.
    fn parse_labels(line: &str) -> (Vec<(String, String)>, &str) {
        let mut labels = Vec::new();
        let mut rest = line;
        loop {
            if let Some(r) = rest.strip_prefix('}') {
                return (labels, r);
            }
            let eq = rest
                .find('=')
                .unwrap_or_else(|| panic!("no = in labels: {line}"));
            let name = &rest[..eq];
            assert!(valid_label_name(name), "bad label name {name:?}: {line}");
            assert!(
                !labels.iter().any(|(k, _)| k == name),
                "label {name} twice: {line}"
            );
            rest = rest[eq + 1..]
                .strip_prefix('"')
                .unwrap_or_else(|| panic!("label value not quoted: {line}"));
            let mut value = String::new();
            let mut chars = rest.char_indices();
            let end = loop {
                match chars.next() {
                    None => panic!("unterminated label value: {line}"),
                    Some((i, '"')) => break i,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, '\\')) => value.push('\\'),
                        Some((_, '"')) => value.push('"'),
                        Some((_, 'n')) => value.push('\n'),
                        other => panic!("bad escape {other:?} in label value: {line}"),
                    },
                    Some((_, c)) => value.push(c),
                }
            };
            labels.push((name.to_owned(), value));
            rest = &rest[end + 1..];
            if let Some(r) = rest.strip_prefix(',') {
                rest = r;
                assert!(!rest.starts_with('}'), "trailing comma: {line}");
            } else {
                assert!(rest.starts_with('}'), "labels not closed: {line}");
            }
        }
    }

    /// The key of a sample in [`parse_strict`]'s answer.
    pub(crate) fn key(name: &str, labels: &[(&str, &str)]) -> String {
        let mut l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        l.sort();
        format!("{name}{{{}}}", l.join(","))
    }

    /// Parse a text exposition (format 0.0.4), panicking on anything the format does not allow
    /// or that we never write: every sample after its family's `# TYPE`, families contiguous,
    /// valid names, label values properly escaped, no duplicate samples, counters not negative,
    /// histogram buckets in order, cumulative, and ending in `+Inf` equal to `_count`.
    /// Returns the samples by [`key`].
    pub(crate) fn parse_strict(text: &str) -> BTreeMap<String, f64> {
        assert!(text.ends_with('\n'), "the exposition ends with a newline");
        let mut types: BTreeMap<String, String> = BTreeMap::new();
        let mut helps: HashSet<String> = HashSet::new();
        let mut done: HashSet<String> = HashSet::new();
        let mut current: Option<String> = None;
        let mut samples = BTreeMap::new();
        // A histogram's last bucket so far: its bound and value.
        let mut last_bucket: BTreeMap<String, (f64, f64)> = BTreeMap::new();
        let mut enter = |name: &str, current: &mut Option<String>| {
            if current.as_deref() != Some(name) {
                assert!(!done.contains(name), "family {name} is not contiguous");
                if let Some(prev) = current.take() {
                    done.insert(prev);
                }
                *current = Some(name.to_owned());
            }
        };
        for line in text.lines() {
            assert!(!line.is_empty(), "empty line");
            if let Some(rest) = line.strip_prefix("# ") {
                let (kw, rest) = rest.split_once(' ').expect("comment keyword");
                let (name, arg) = rest.split_once(' ').unwrap_or((rest, ""));
                assert!(valid_metric_name(name), "bad metric name {name:?}");
                enter(name, &mut current);
                assert!(
                    !samples
                        .keys()
                        .any(|k: &String| k.starts_with(&format!("{name}{{"))),
                    "{kw} for {name} after its samples"
                );
                match kw {
                    "HELP" => {
                        assert!(helps.insert(name.to_owned()), "two HELPs for {name}");
                        let mut chars = arg.chars();
                        while let Some(c) = chars.next() {
                            if c == '\\' {
                                assert!(
                                    matches!(chars.next(), Some('\\' | 'n')),
                                    "bad escape in HELP: {line}"
                                );
                            }
                        }
                    }
                    "TYPE" => {
                        assert!(
                            ["counter", "gauge", "histogram", "summary", "untyped"].contains(&arg),
                            "bad type: {line}"
                        );
                        assert!(
                            types.insert(name.to_owned(), arg.to_owned()).is_none(),
                            "two TYPEs for {name}"
                        );
                    }
                    _ => panic!("unexpected comment: {line}"),
                }
                continue;
            }
            assert!(!line.starts_with('#'), "bad comment: {line}");
            let name_end = line
                .find(['{', ' '])
                .unwrap_or_else(|| panic!("no value: {line}"));
            let name = &line[..name_end];
            assert!(valid_metric_name(name), "bad metric name {name:?}");
            // A histogram's samples are <family>_bucket, _sum and _count.
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .filter_map(|suffix| name.strip_suffix(suffix))
                .find(|base| types.get(*base).is_some_and(|t| t == "histogram"))
                .unwrap_or(name);
            let kind = types
                .get(family)
                .unwrap_or_else(|| panic!("sample {name} without a preceding TYPE"))
                .clone();
            enter(family, &mut current);
            let (labels, rest) = match line[name_end..].strip_prefix('{') {
                Some(r) => parse_labels(r),
                None => (Vec::new(), &line[name_end..]),
            };
            let rest = rest
                .strip_prefix(' ')
                .unwrap_or_else(|| panic!("no space before the value: {line}"));
            let mut fields = rest.split(' ');
            let value = match fields.next().expect("value") {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                "NaN" => f64::NAN,
                v => v
                    .parse::<f64>()
                    .unwrap_or_else(|_| panic!("bad value {v:?}: {line}")),
            };
            if let Some(ts) = fields.next() {
                ts.parse::<i64>()
                    .unwrap_or_else(|_| panic!("bad timestamp: {line}"));
            }
            assert!(fields.next().is_none(), "trailing fields: {line}");
            if kind == "counter" || kind == "histogram" {
                assert!(value >= 0.0, "negative counter: {line}");
            }
            if kind == "histogram" && name.ends_with("_bucket") {
                let le = labels
                    .iter()
                    .find(|(k, _)| k == "le")
                    .unwrap_or_else(|| panic!("bucket without le: {line}"));
                let bound = match le.1.as_str() {
                    "+Inf" => f64::INFINITY,
                    v => v
                        .parse::<f64>()
                        .unwrap_or_else(|_| panic!("bad le: {line}")),
                };
                let (prev_bound, prev) = last_bucket
                    .insert(family.to_owned(), (bound, value))
                    .unwrap_or((f64::NEG_INFINITY, 0.0));
                assert!(bound > prev_bound, "buckets not in order: {line}");
                assert!(value >= prev, "buckets not cumulative: {line}");
            }
            if kind == "histogram" && name.ends_with("_count") {
                let (bound, inf) = last_bucket
                    .get(family)
                    .copied()
                    .unwrap_or_else(|| panic!("count before buckets: {line}"));
                assert!(
                    bound == f64::INFINITY && inf == value,
                    "the +Inf bucket is not the count: {line}"
                );
            }
            let labels: Vec<(&str, &str)> = labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            assert!(
                samples.insert(key(name, &labels), value).is_none(),
                "duplicate sample: {line}"
            );
        }
        samples
    }

    #[test]
    fn the_parser_refuses_what_the_format_does_not_allow() {
        let ok = "# HELP a_total x \\\\ y\n# TYPE a_total counter\na_total{k=\"q\\\"\\\\\\n\"} 3\n";
        let s = parse_strict(ok);
        assert_eq!(s[&key("a_total", &[("k", "q\"\\\n")])], 3.0);
        let h = "# HELP h x\n# TYPE h histogram\nh_bucket{le=\"0.5\"} 1\nh_bucket{le=\"+Inf\"} 3\nh_sum 2.25\nh_count 3\n";
        let s = parse_strict(h);
        assert_eq!(s[&key("h_sum", &[])], 2.25);
        for bad in [
            "a 1\n",
            "# TYPE a gauge\na{k=\"x\\t\"} 1\n",
            "# TYPE a gauge\na{k=\"x} 1\n",
            "# TYPE a gauge\na{k=x} 1\n",
            "# TYPE 1a gauge\n1a 1\n",
            "# TYPE a gauge\na 1\na 2\n",
            "# TYPE a gauge\n# TYPE b gauge\nb 1\na 1\n",
            "# TYPE a counter\na -1\n",
            "# TYPE a gauge\na one\n",
            "# TYPE a gauge\na 1",
            "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
            "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n",
            "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 1\n",
            "# TYPE h histogram\nh_bucket 1\nh_sum 1\nh_count 1\n",
            "# TYPE h gauge\nh_bucket{le=\"1\"} 1\n",
        ] {
            assert!(
                std::panic::catch_unwind(|| parse_strict(bad)).is_err(),
                "accepted {bad:?}"
            );
        }
    }

    #[test]
    fn the_rendered_exposition_parses() {
        let m = Metrics::new();
        m.input_refusals.inc("too_large");
        let jobs: BTreeMap<JobState, u64> = JobState::ALL.iter().map(|s| (*s, 1)).collect();
        let s = parse_strict(&m.render(&jobs, 4));
        assert_eq!(s[&key("copilot_agents_online", &[])], 4.0);
        assert_eq!(s[&key("copilot_jobs", &[("state", "lost")])], 1.0);
        let refused = |kind, reason| {
            s[&key(
                "copilot_upload_refusals_total",
                &[("kind", kind), ("reason", reason)],
            )]
        };
        assert_eq!(refused("input", "too_large"), 1.0);
        assert_eq!(refused("output", "too_large"), 0.0);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(escape_help("x\\y\nz"), "x\\\\y\\nz");
    }

    #[test]
    fn every_outcome_kind_is_a_label_of_the_family() {
        use copilot_protocol::wire::Limit;
        let m = Metrics::new();
        for o in [
            Outcome::Exited { code: 0 },
            Outcome::Exited { code: 1 },
            Outcome::Killed { signal: 9 },
            Outcome::TimedOut,
            Outcome::LimitExceeded {
                limit: Limit::Memory,
            },
            Outcome::StageInFailed(String::new()),
            Outcome::SetupFailed(String::new()),
            Outcome::StageOutFailed(String::new()),
            Outcome::Refused(copilot_protocol::wire::Refusal::Expired),
        ] {
            m.reports_recorded.inc(outcome_kind(&o));
            assert_eq!(m.reports_recorded.get(outcome_kind(&o)), 1, "{o:?}");
        }
        assert_eq!(
            outcome_kind(&Outcome::LimitExceeded { limit: Limit::Cpu }),
            "limit_exceeded"
        );
    }

    #[test]
    fn families_count_only_their_values() {
        let m = Metrics::new();
        m.reports_recorded.inc("killed");
        m.reports_recorded.inc("killed");
        assert_eq!(m.reports_recorded.get("killed"), 2);
        assert_eq!(m.reports_recorded.get("succeeded"), 0);
        assert_eq!(m.reports_recorded.get("nope"), 0);
        m.http_request("jobs", 201);
        m.http_request("nonsense", 999);
        let text = m.render(&BTreeMap::new(), 0);
        assert!(text.contains("copilot_http_requests_total{route=\"jobs\",status=\"2xx\"} 1\n"));
        assert!(text.contains("copilot_http_requests_total{route=\"other\",status=\"5xx\"} 1\n"));
        {
            let _a = m.hold();
            let _b = m.hold();
            assert_eq!(m.held_requests.load(Ordering::Relaxed), 2);
        }
        assert_eq!(m.held_requests.load(Ordering::Relaxed), 0);
    }
}
