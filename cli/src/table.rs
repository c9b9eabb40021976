//! Plain-text tables for people: jobs, state counts, agents, causes, batches. Colours (states,
//! online or offline) only when asked for: on a terminal, without NO_COLOR (see `main.rs`);
//! in a pipe or a log the text is plain. Widths never count the colour codes.

use std::collections::BTreeMap;

use copilot_protocol::api::{AgentView, JobView, OutcomeView};
use copilot_protocol::sandbox::SandboxReport;
use copilot_protocol::summary::{BatchSummary, CauseCount};
use copilot_protocol::units::ago;
use copilot_protocol::JobState;

/// An ANSI colour for a cell, or none.
pub type Paint<'a> = &'a dyn Fn(usize, &str) -> Option<&'static str>;

/// No colours.
pub const PLAIN: Paint<'static> = &|_, _| None;

/// Columns left-aligned, separated by two spaces, trailing spaces trimmed.
pub fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    render_painted(header, rows, PLAIN)
}

/// Like [`render`], each body cell wrapped in the colour `paint(column, text)` gives.
pub fn render_painted(header: &[&str], rows: &[Vec<String>], paint: Paint<'_>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>, painted: bool| {
        let mut s = String::new();
        for (col, (cell, w)) in cells.zip(&widths).enumerate() {
            match paint(col, cell).filter(|_| painted) {
                Some(code) => s.push_str(&format!("\x1b[{code}m{cell}\x1b[0m")),
                None => s.push_str(cell),
            }
            s.extend(std::iter::repeat_n(' ', w + 2 - cell.chars().count()));
        }
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    };
    let mut out = line(&mut header.iter().copied(), false);
    for row in rows {
        out.push_str(&line(&mut row.iter().map(String::as_str), true));
    }
    out
}

/// The colour of a job state or agent status: green for done and online, red for failed,
/// yellow for jobs in flight and lost attempts, dim for offline.
pub fn state_colour(text: &str) -> Option<&'static str> {
    match text {
        "done" | "online" => Some("32"),
        "failed" => Some("31"),
        "assigned" | "running" | "uploading" | "lost" => Some("33"),
        "offline" => Some("2"),
        _ => None,
    }
}

/// A short outcome for a table cell.
pub fn outcome_cell(o: Option<&OutcomeView>) -> String {
    o.map_or_else(|| "-".into(), OutcomeView::short)
}

/// The jobs table: id, name, state, attempt, agent, outcome (with a replica's group and
/// validation); states coloured if `colour`.
pub fn jobs(jobs: &[JobView], colour: bool) -> String {
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            vec![
                j.id.to_string(),
                j.name.clone(),
                j.state.to_string(),
                format!("{}/{}", j.attempt, j.max_retries + 1),
                j.agent.clone().unwrap_or_else(|| "-".into()),
                match &j.replica {
                    Some(r) => format!(
                        "{} · replica of {}: {}",
                        outcome_cell(j.outcome.as_ref()),
                        r.group,
                        r.validation
                    ),
                    None => outcome_cell(j.outcome.as_ref()),
                },
            ]
        })
        .collect();
    let paint = |col: usize, text: &str| (colour && col == 2).then(|| state_colour(text))?;
    render_painted(
        &["ID", "NAME", "STATE", "ATTEMPT", "AGENT", "OUTCOME"],
        &rows,
        &paint,
    )
}

/// `3 done, 1 failed, 2 queued (6 jobs)`, in life-cycle order, zero counts left out.
pub fn counts(counts: &BTreeMap<JobState, u64>) -> String {
    let total: u64 = counts.values().sum();
    let parts: Vec<String> = JobState::ALL
        .iter()
        .filter_map(|s| {
            counts
                .get(s)
                .filter(|n| **n > 0)
                .map(|n| format!("{n} {s}"))
        })
        .collect();
    if parts.is_empty() {
        return "no jobs".into();
    }
    format!(
        "{} ({total} job{})",
        parts.join(", "),
        if total == 1 { "" } else { "s" }
    )
}

/// Counts by cause, most frequent first.
pub fn causes(rows: &[CauseCount]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|c| vec![c.count.to_string(), c.cause.clone()])
        .collect();
    render(&["COUNT", "CAUSE"], &rows)
}

/// The batches table: name, jobs, done, failed, other, ids.
pub fn batches(batches: &[BatchSummary]) -> String {
    let rows: Vec<Vec<String>> = batches
        .iter()
        .map(|b| {
            let done = b.counts.get(&JobState::Done).copied().unwrap_or(0);
            let failed = b.counts.get(&JobState::Failed).copied().unwrap_or(0);
            vec![
                b.name.clone(),
                b.jobs.to_string(),
                done.to_string(),
                failed.to_string(),
                (b.jobs - done - failed).to_string(),
                format!("{}-{}", b.first_id, b.last_id),
            ]
        })
        .collect();
    render(&["BATCH", "JOBS", "DONE", "FAILED", "OTHER", "IDS"], &rows)
}

/// `full`, or what the host lacks (`missing uid,nproc`); `-` before the first report.
pub fn sandbox_cell(s: Option<&SandboxReport>) -> String {
    match s {
        None => "-".into(),
        Some(s) if s.missing.is_empty() => "full".into(),
        Some(s) => {
            let missing: Vec<&str> = s.missing.iter().map(|p| p.as_str()).collect();
            format!("missing {}", missing.join(","))
        }
    }
}

/// The agents table; online or offline coloured if `colour`.
pub fn agents(agents: &[AgentView], now_ms: u64, colour: bool) -> String {
    let rows: Vec<Vec<String>> = agents
        .iter()
        .map(|a| {
            let running: Vec<String> = a.running.iter().map(u64::to_string).collect();
            vec![
                a.name.clone(),
                if a.online { "online" } else { "offline" }.into(),
                a.version.clone(),
                if running.is_empty() {
                    "-".into()
                } else {
                    running.join(",")
                },
                a.jobs_done.to_string(),
                ago(now_ms, a.last_seen_ms),
                sandbox_cell(a.sandbox.as_ref()),
            ]
        })
        .collect();
    let paint = |col: usize, text: &str| (colour && col == 1).then(|| state_colour(text))?;
    render_painted(
        &[
            "NAME",
            "STATUS",
            "VERSION",
            "RUNNING",
            "DONE",
            "LAST SEEN",
            "SANDBOX",
        ],
        &rows,
        &paint,
    )
}

#[cfg(test)]
mod tests {
    use copilot_protocol::sandbox::Protection;

    use super::*;

    fn job(id: u64, name: &str, state: JobState, outcome: Option<OutcomeView>) -> JobView {
        JobView {
            id,
            name: name.into(),
            state,
            attempt: 1,
            max_retries: 3,
            agent: (state != JobState::Queued).then(|| "agent-1".into()),
            created_ms: 0,
            updated_ms: 0,
            outcome,
            archive: None,
            archive_url: None,
            files: vec![],
            timings_ms: None,
            sandbox: None,
            note: None,
            replica: None,
            spec: copilot_protocol::JobSpec::new(name, &["true"]),
        }
    }

    #[test]
    fn jobs_table_aligns_columns() {
        let exit3 = OutcomeView {
            kind: "exited".into(),
            exit_code: Some(3),
            signal: None,
            limit: None,
            text: "exited with 3".into(),
        };
        let cpu = OutcomeView {
            kind: "limit-exceeded".into(),
            exit_code: None,
            signal: None,
            limit: Some("cpu".into()),
            text: "stopped at its cpu limit".into(),
        };
        let list = [
            job(7, "mc-pi#0", JobState::Done, None),
            job(12, "fail", JobState::Failed, Some(exit3)),
            job(13, "hello", JobState::Queued, None),
            job(14, "hog", JobState::Failed, Some(cpu)),
        ];
        let t = jobs(&list, false);
        let want = "\
ID  NAME     STATE   ATTEMPT  AGENT    OUTCOME
7   mc-pi#0  done    1/4      agent-1  -
12  fail     failed  1/4      agent-1  exit 3
13  hello    queued  1/4      -        -
14  hog      failed  1/4      agent-1  cpu limit
";
        assert_eq!(t, want);
        // In colour the codes wrap the state, and the columns stay where they were.
        let c = jobs(&list, true);
        assert!(
            c.contains("7   mc-pi#0  \x1b[32mdone\x1b[0m    1/4"),
            "{c:?}"
        );
        assert!(c.contains("\x1b[31mfailed\x1b[0m  1/4"));
        assert!(c.contains("hello    queued  1/4"), "queued is not coloured");
        assert!(c.starts_with("ID  NAME"), "the header is plain");
        assert_eq!(
            c.replace("\x1b[32m", "")
                .replace("\x1b[31m", "")
                .replace("\x1b[0m", ""),
            want
        );
    }

    #[test]
    fn batches_and_causes_tables() {
        let b = BatchSummary {
            name: "mc-pi".into(),
            jobs: 10,
            counts: BTreeMap::from([(JobState::Done, 8), (JobState::Failed, 1)]),
            first_id: 3,
            last_id: 12,
            updated_ms: 0,
        };
        assert_eq!(
            batches(&[b]),
            "BATCH  JOBS  DONE  FAILED  OTHER  IDS\nmc-pi  10    8     1       1      3-12\n"
        );
        let c = CauseCount {
            cause: "exit 3".into(),
            count: 2,
        };
        assert_eq!(causes(&[c]), "COUNT  CAUSE\n2      exit 3\n");
    }

    #[test]
    fn counts_follow_the_life_cycle_and_skip_zeros() {
        let c = BTreeMap::from([
            (JobState::Queued, 2),
            (JobState::Done, 3),
            (JobState::Failed, 1),
            (JobState::Lost, 0),
        ]);
        assert_eq!(counts(&c), "2 queued, 3 done, 1 failed (6 jobs)");
        assert_eq!(counts(&BTreeMap::new()), "no jobs");
        assert_eq!(
            counts(&BTreeMap::from([(JobState::Done, 1)])),
            "1 done (1 job)"
        );
    }

    #[test]
    fn agents_table_shows_sandbox_and_age() {
        let a = AgentView {
            name: "agent-1".into(),
            jid: Some("agent-1@localhost/x".into()),
            online: true,
            version: "0.1.0".into(),
            running: vec![4, 5],
            jobs_done: 9,
            last_seen_ms: 1_000,
            sandbox: Some(SandboxReport {
                missing: [Protection::Uid, Protection::Nproc].into(),
                ..SandboxReport::default()
            }),
            volunteer: None,
        };
        let full = AgentView {
            name: "agent-2".into(),
            sandbox: Some(SandboxReport {
                active: [Protection::Uid].into(),
                ..SandboxReport::default()
            }),
            ..a.clone()
        };
        let fresh = AgentView {
            name: "agent-3".into(),
            sandbox: None,
            ..a.clone()
        };
        let t = agents(&[a.clone(), full, fresh], 126_000, false);
        assert_eq!(
            t,
            "NAME     STATUS  VERSION  RUNNING  DONE  LAST SEEN  SANDBOX\n\
             agent-1  online  0.1.0    4,5      9     2m ago     missing uid,nproc\n\
             agent-2  online  0.1.0    4,5      9     2m ago     full\n\
             agent-3  online  0.1.0    4,5      9     2m ago     -\n"
        );
        let off = AgentView { online: false, ..a };
        assert!(agents(&[off], 126_000, true).contains("\x1b[2moffline\x1b[0m"));
    }
}
