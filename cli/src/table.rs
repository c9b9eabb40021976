//! Plain-text tables for people: jobs, state counts, agents. No colours, so output is the same
//! on a terminal, in a pipe and in a log.

use std::collections::BTreeMap;

use copilot_protocol::api::{AgentView, JobView, OutcomeView};
use copilot_protocol::sandbox::SandboxReport;
use copilot_protocol::JobState;

/// Columns left-aligned, separated by two spaces, trailing spaces trimmed.
pub fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut s = String::new();
        for (cell, w) in cells.zip(&widths) {
            s.push_str(cell);
            s.extend(std::iter::repeat_n(' ', w + 2 - cell.chars().count()));
        }
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    };
    let mut out = line(&mut header.iter().copied());
    for row in rows {
        out.push_str(&line(&mut row.iter().map(String::as_str)));
    }
    out
}

/// A short outcome for a table cell.
pub fn outcome_cell(o: Option<&OutcomeView>) -> String {
    match o {
        None => "-".into(),
        Some(o) => match (o.kind.as_str(), o.exit_code, o.signal) {
            ("exited", Some(code), _) => format!("exit {code}"),
            ("killed", _, Some(sig)) => format!("signal {sig}"),
            ("limit-exceeded", _, _) => match &o.limit {
                Some(limit) => format!("{limit} limit"),
                None => "limit exceeded".into(),
            },
            (kind, _, _) => kind.to_owned(),
        },
    }
}

/// The jobs table: id, name, state, attempt, agent, outcome.
pub fn jobs(jobs: &[JobView]) -> String {
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            vec![
                j.id.to_string(),
                j.name.clone(),
                j.state.to_string(),
                format!("{}/{}", j.attempt, j.max_retries + 1),
                j.agent.clone().unwrap_or_else(|| "-".into()),
                outcome_cell(j.outcome.as_ref()),
            ]
        })
        .collect();
    render(
        &["ID", "NAME", "STATE", "ATTEMPT", "AGENT", "OUTCOME"],
        &rows,
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

/// `12s ago`, `5m ago`, `3h ago`, `2d ago`.
pub fn ago(now_ms: u64, then_ms: u64) -> String {
    let s = now_ms.saturating_sub(then_ms) / 1000;
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        3600..86400 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
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

/// The agents table.
pub fn agents(agents: &[AgentView], now_ms: u64) -> String {
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
    render(
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
        let t = jobs(&[
            job(7, "mc-pi#0", JobState::Done, None),
            job(12, "fail", JobState::Failed, Some(exit3)),
            job(13, "hello", JobState::Queued, None),
            job(14, "hog", JobState::Failed, Some(cpu)),
        ]);
        let want = "\
ID  NAME     STATE   ATTEMPT  AGENT    OUTCOME
7   mc-pi#0  done    1/4      agent-1  -
12  fail     failed  1/4      agent-1  exit 3
13  hello    queued  1/4      -        -
14  hog      failed  1/4      agent-1  cpu limit
";
        assert_eq!(t, want);
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
    fn agents_table_and_ages() {
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
        let t = agents(&[a, full, fresh], 126_000);
        assert_eq!(
            t,
            "NAME     STATUS  VERSION  RUNNING  DONE  LAST SEEN  SANDBOX\n\
             agent-1  online  0.1.0    4,5      9     2m ago     missing uid,nproc\n\
             agent-2  online  0.1.0    4,5      9     2m ago     full\n\
             agent-3  online  0.1.0    4,5      9     2m ago     -\n"
        );
        assert_eq!(ago(5_000, 1_000), "4s ago");
        assert_eq!(ago(0, 1_000), "0s ago");
        assert_eq!(ago(2 * 86_400_000, 0), "2d ago");
    }
}
