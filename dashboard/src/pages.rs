//! The dashboard's pages, rendered from the manager's API views: work (counts, activity,
//! failures, batches, recent jobs), fleet, one job, one batch with its plots, contributions,
//! and the login form. Each returns a [`Page`]; the manager wraps it in [`crate::html::document`]
//! or sends the body alone when the page refreshes itself.
//!
//! Elements that tests and scripts read carry stable `id`s or `data-` attributes (job counts
//! `#count-<state>`, rows `data-job`, `data-batch`, `data-agent`), documented in
//! docs/DASHBOARD.md.

use std::fmt::Write as _;

use copilot_protocol::api::{
    AgentList, AgentView, FileView, JobView, Validation, STDERR_ENTRY, STDOUT_ENTRY,
};
use copilot_protocol::histogram::{Bin, Histogram};
use copilot_protocol::job::InputSource;
use copilot_protocol::sandbox::{Protection, SandboxReport};
use copilot_protocol::summary::{
    batch_of, BatchPlot, BatchView, CauseCount, Contributions, JobEvents, Summary,
};
use copilot_protocol::JobState;

use crate::html::{
    self, ago, bytes, duration_ms, empty, esc, state_badge, table, url_part, url_path, Nav, Page,
    BASE,
};
use crate::plot::{self, Look, Series};

fn job_link(id: u64) -> String {
    format!("<a href=\"{BASE}/jobs/{id}\">{id}</a>")
}

fn batch_link(name: &str) -> String {
    format!(
        "<a href=\"{BASE}/batches/{}\">{}</a>",
        url_part(name),
        esc(name)
    )
}

/// The jobs table: id, name, state, attempt, agent, outcome, last change.
fn jobs_table(jobs: &[JobView], now_ms: u64) -> String {
    if jobs.is_empty() {
        return empty("No jobs yet: submit some with `copilot submit job.toml`.");
    }
    let mut s = String::from(
        "<table class=\"jobs\"><thead><tr><th>ID</th><th>Name</th><th>State</th><th>Attempt</th>\
         <th>Agent</th><th>Outcome</th><th>Updated</th></tr></thead><tbody>",
    );
    for j in jobs {
        let _ = write!(
            s,
            "<tr data-job=\"{id}\" data-state=\"{st}\"><td>{link}</td><td>{name}</td><td>{badge}</td>\
             <td>{}/{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            j.attempt,
            j.max_retries + 1,
            esc(j.agent.as_deref().unwrap_or("-")),
            esc(&j.outcome.as_ref().map_or_else(|| "-".into(), |o| o.short())),
            ago(now_ms, j.updated_ms),
            id = j.id,
            st = j.state,
            link = job_link(j.id),
            name = esc(&j.name),
            badge = state_badge(j.state),
        );
    }
    s.push_str("</tbody></table>");
    s
}

/// A bar made of one segment per state, widths in proportion to the counts.
fn progress(counts: &std::collections::BTreeMap<JobState, u64>) -> String {
    let total: u64 = counts.values().sum();
    let mut s = String::from("<span class=\"progress\">");
    if total > 0 {
        for (st, n) in counts.iter().filter(|(_, n)| **n > 0) {
            let _ = write!(
                s,
                "<span class=\"seg st-{st}\" style=\"width:{:.2}%\" title=\"{n} {st}\"></span>",
                *n as f64 * 100.0 / total as f64
            );
        }
    }
    s.push_str("</span>");
    s
}

fn causes(rows: &[CauseCount], none: &str) -> String {
    if rows.is_empty() {
        return empty(none);
    }
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|c| vec![esc(&c.cause).to_string(), c.count.to_string()])
        .collect();
    table("causes", &["Cause", "Count"], &rows)
}

/// The work page: jobs by state, activity plots, failures by cause, batches, recent jobs.
pub fn work(s: &Summary, recent: &[JobView]) -> Page {
    let mut b = String::from("<h1>Work</h1><section class=\"cards\">");
    for st in JobState::ALL {
        let n = s.counts.get(&st).copied().unwrap_or(0);
        let _ = write!(
            b,
            "<div class=\"card st-{st}\"><div class=\"num\" id=\"count-{st}\">{n}</div>\
             <div class=\"label\">{st}</div></div>"
        );
    }
    let _ = write!(
        b,
        "<div class=\"card\"><div class=\"num\" id=\"agents-online\">{}</div>\
         <div class=\"label\">agents online <small>of {}</small></div></div></section>",
        s.agents_online, s.agents_known
    );
    let per = duration_ms(s.activity.bucket_ms);
    let _ = write!(
        b,
        "<section class=\"row\"><div class=\"panel\"><h2>Throughput <small>jobs done \
         <i class=\"key done\"></i> and failed <i class=\"key failed\"></i> per {per}; \
         attempts started <i class=\"key rate\"></i></small></h2>{}</div>\
         <div class=\"panel\"><h2>Queue depth <small>jobs waiting for an agent; now \
         <b id=\"queue-depth\">{}</b></small></h2>{}</div></section>",
        plot::throughput(&s.activity),
        s.counts.get(&JobState::Queued).copied().unwrap_or(0),
        plot::queue_depth(&s.activity),
    );
    let _ = write!(
        b,
        "<section class=\"row\"><div class=\"panel\"><h2>Failures by cause \
         <small>jobs failed for good</small></h2>{}</div>\
         <div class=\"panel\"><h2>Lost attempts by cause <small>retried, or failed the job once \
         no retry was left</small></h2>{}</div></section>",
        causes(&s.failures, "No job has failed."),
        causes(&s.lost_attempts, "No attempt was lost."),
    );
    b.push_str("<section class=\"panel\"><h2>Batches</h2>");
    if s.batches.is_empty() {
        b.push_str(&empty("No batches yet."));
    } else {
        b.push_str(
            "<table class=\"batches\"><thead><tr><th>Batch</th><th>Jobs</th><th>Progress</th>\
             <th>Done</th><th>Failed</th><th>Other</th><th>IDs</th><th>Updated</th></tr></thead><tbody>",
        );
        for bt in &s.batches {
            let done = bt.counts.get(&JobState::Done).copied().unwrap_or(0);
            let failed = bt.counts.get(&JobState::Failed).copied().unwrap_or(0);
            let _ = write!(
                b,
                "<tr data-batch=\"{}\"><td>{}</td><td class=\"n\">{}</td><td>{}</td>\
                 <td class=\"n\">{done}</td><td class=\"n\">{failed}</td><td class=\"n\">{}</td>\
                 <td>{}–{}</td><td>{}</td></tr>",
                esc(&bt.name),
                batch_link(&bt.name),
                bt.jobs,
                progress(&bt.counts),
                bt.jobs - done - failed,
                bt.first_id,
                bt.last_id,
                ago(s.now_ms, bt.updated_ms),
            );
        }
        b.push_str("</tbody></table>");
    }
    let _ = write!(
        b,
        "</section><section class=\"panel\"><h2>Recent jobs</h2>{}</section>",
        jobs_table(recent, s.now_ms)
    );
    Page {
        title: "Work".into(),
        nav: Nav::Work,
        body: b,
    }
}

/// The protections of a sandbox report: active ones plain, missing ones marked.
fn sandbox_cell(s: Option<&SandboxReport>) -> String {
    let Some(s) = s.filter(|s| !s.is_empty()) else {
        return "<span class=\"muted\">no job yet</span>".into();
    };
    let mut out = String::new();
    for p in Protection::ALL {
        if s.active.contains(&p) {
            let _ = write!(out, "<span class=\"prot on\">{}</span> ", p.as_str());
        } else if s.missing.contains(&p) {
            let _ = write!(
                out,
                "<span class=\"prot off\" title=\"this host could not give it\">no {}</span> ",
                p.as_str()
            );
        }
    }
    out
}

fn volunteer_cell(a: &AgentView) -> String {
    match &a.volunteer {
        Some(v) => {
            let team = if v.team_id > 0 {
                format!(", team {}", v.team_id)
            } else {
                String::new()
            };
            format!("user {}, host {}{team}", v.user_id, v.host_id)
        }
        None => "<span class=\"muted\">-</span>".into(),
    }
}

/// The fleet page: every agent the manager knows, online ones first.
pub fn fleet(list: &AgentList, now_ms: u64) -> Page {
    let online = list.agents.iter().filter(|a| a.online).count();
    let lacking = list
        .agents
        .iter()
        .filter(|a| a.sandbox.as_ref().is_some_and(|s| !s.missing.is_empty()))
        .count();
    let running: usize = list.agents.iter().map(|a| a.running.len()).sum();
    let mut b = format!(
        "<h1>Fleet</h1><section class=\"cards\">\
         <div class=\"card\"><div class=\"num\" id=\"agents-online\">{online}</div><div class=\"label\">online</div></div>\
         <div class=\"card\"><div class=\"num\" id=\"agents-known\">{}</div><div class=\"label\">known</div></div>\
         <div class=\"card\"><div class=\"num\" id=\"jobs-running\">{running}</div><div class=\"label\">jobs held</div></div>\
         <div class=\"card{}\"><div class=\"num\" id=\"agents-lacking\">{lacking}</div><div class=\"label\">with a weaker sandbox</div></div>\
         </section><section class=\"panel\">",
        list.agents.len(),
        if lacking > 0 { " warn" } else { "" }
    );
    if list.agents.is_empty() {
        b.push_str(&empty(
            "No agent has spoken to the manager yet. Start one with `copilot-agent --config agent.toml`.",
        ));
    } else {
        b.push_str(
            "<table class=\"agents\"><thead><tr><th>Agent</th><th>Status</th><th>Version</th>\
             <th>Running</th><th>Done</th><th>Last seen</th><th>Sandbox</th><th>BOINC volunteer</th>\
             </tr></thead><tbody>",
        );
        for a in &list.agents {
            let running = if a.running.is_empty() {
                "-".to_string()
            } else {
                a.running
                    .iter()
                    .map(|id| job_link(*id))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let _ = write!(
                b,
                "<tr data-agent=\"{name}\" data-online=\"{online}\"><td title=\"{jid}\">{name}</td>\
                 <td><span class=\"badge {cls}\">{status}</span></td><td>{version}</td><td>{running}</td>\
                 <td class=\"n\">{done}</td><td>{seen}</td><td class=\"sandbox\">{sandbox}</td><td>{vol}</td></tr>",
                name = esc(&a.name),
                online = a.online,
                jid = esc(a.jid.as_deref().unwrap_or("offline")),
                cls = if a.online { "on" } else { "off" },
                status = if a.online { "online" } else { "offline" },
                version = esc(&a.version),
                done = a.jobs_done,
                seen = ago(now_ms, a.last_seen_ms),
                sandbox = sandbox_cell(a.sandbox.as_ref()),
                vol = volunteer_cell(a),
            );
        }
        b.push_str("</tbody></table>");
    }
    b.push_str(
        "<p class=\"note\">Agents come and go with their XMPP presence. The sandbox column is what \
         each agent's last job had; <span class=\"prot off\">no …</span> marks protections its \
         host could not give (see docs/ARCHITECTURE.md, Sandbox).</p></section>",
    );
    Page {
        title: "Fleet".into(),
        nav: Nav::Fleet,
        body: b,
    }
}

/// Whether an output file's bytes were checked against the digest the agent reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Not read (too large, or the archive could not be read).
    Unchecked,
    /// Read from the stored archive; its sha256 matches the report.
    Matches,
    /// Read from the stored archive; its sha256 differs.
    Differs,
}

/// The beginning of a text file, or the end of a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Excerpt {
    pub text: String,
    /// Whether there is more than `text` (after it for a preview, before it for a tail).
    pub cut: bool,
}

/// An output file as the job page shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct FileEntry {
    pub view: FileView,
    pub check: Check,
    /// The beginning of the file, when it is text.
    pub preview: Option<Excerpt>,
    /// Its histograms when its name says it holds some, or why they could not be read.
    pub histograms: Option<Result<Vec<Histogram>, String>>,
}

/// What the job page shows.
#[derive(Debug, Clone)]
pub struct JobDetail {
    pub job: JobView,
    pub events: JobEvents,
    /// The output files (the job's `_copilot/` logs included), in the agent's order.
    pub files: Vec<FileEntry>,
    /// The ends of stdout and stderr.
    pub stdout: Option<Excerpt>,
    pub stderr: Option<Excerpt>,
    /// Why the archive's contents are not shown, if they are not.
    pub archive_note: Option<String>,
    pub now_ms: u64,
}

fn definition(b: &mut String, term: &str, value: &str) {
    let _ = write!(b, "<dt>{term}</dt><dd>{value}</dd>");
}

fn excerpt(b: &mut String, id: &str, title: &str, e: &Excerpt, tail: bool) {
    let note = match (e.cut, tail) {
        (false, _) => "",
        (true, true) => " <small>(the end)</small>",
        (true, false) => " <small>(the beginning)</small>",
    };
    let _ = write!(
        b,
        "<h3>{title}{note}</h3><pre class=\"text\" id=\"{id}\">{}{}</pre>",
        if e.cut && tail { "…\n" } else { "" },
        esc(&e.text)
    );
    if e.cut && !tail {
        b.push_str("<p class=\"muted\">…</p>");
    }
}

/// Colour of replica `i` of `n`: spread over the palette.
fn colour(i: usize) -> usize {
    i % plot::COLOURS
}

/// A plot of one file's histogram with its legend.
fn single_plot(b: &mut String, path: &str, h: &Histogram) {
    let label = if h.name.is_empty() {
        path.to_owned()
    } else {
        format!("{path}: {}", h.name)
    };
    let title = if h.title.is_empty() { &label } else { &h.title };
    let total: f64 = h.bins.iter().map(|b| b.value).sum();
    let _ = write!(
        b,
        "<figure class=\"plot\" data-file=\"{}\"><figcaption>{} <small>{} bins, total {}</small></figcaption>{}</figure>",
        esc(path),
        esc(title),
        h.bins.len(),
        fmt_total(total),
        plot::histograms(
            title,
            &[Series {
                label: label.clone(),
                bins: &h.bins,
                look: Look::Filled,
                colour: 0,
            }]
        )
    );
}

fn fmt_total(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v:.4}")
    }
}

/// The job page: description, phases, outcome, logs, files with previews and plots, history.
pub fn job(d: &JobDetail) -> Page {
    let j = &d.job;
    let batch = batch_of(&j.name);
    let mut b = format!(
        "<h1>Job {} <span class=\"name\">{}</span> {}</h1>",
        j.id,
        esc(&j.name),
        state_badge(j.state)
    );
    if batch != j.name {
        let _ = write!(b, "<p>Part of batch {}.</p>", batch_link(batch));
    }
    // Description.
    b.push_str("<section class=\"row\"><div class=\"panel\"><h2>Description</h2><dl>");
    let command: Vec<String> = j.spec.command.iter().map(|w| esc(w).to_string()).collect();
    definition(
        &mut b,
        "command",
        &format!("<code>{}</code>", command.join(" ")),
    );
    if !j.spec.env.is_empty() {
        let env: Vec<String> = j
            .spec
            .env
            .iter()
            .map(|(k, v)| format!("<code>{}={}</code>", esc(k), esc(v)))
            .collect();
        definition(&mut b, "environment", &env.join(" "));
    }
    if !j.spec.inputs.is_empty() {
        let inputs: Vec<String> = j
            .spec
            .inputs
            .iter()
            .map(|i| match &i.source {
                InputSource::Stored { size, .. } => {
                    format!("<code>{}</code> ({})", esc(&i.name), bytes(*size))
                }
                InputSource::Url { url, .. } => {
                    format!("<code>{}</code> from {}", esc(&i.name), esc(url))
                }
            })
            .collect();
        definition(&mut b, "inputs", &inputs.join(", "));
    }
    if !j.spec.outputs.is_empty() {
        let outputs: Vec<String> = j
            .spec
            .outputs
            .iter()
            .map(|o| format!("<code>{}</code>", esc(o)))
            .collect();
        definition(&mut b, "outputs", &outputs.join(" "));
    }
    let l = &j.spec.limits;
    let mut limits = Vec::new();
    if let Some(v) = l.wall_time {
        limits.push(format!("wall time {v}"));
    }
    if let Some(v) = l.cpu_time {
        limits.push(format!("CPU time {v}"));
    }
    if let Some(v) = l.memory {
        limits.push(format!("memory {v}"));
    }
    if let Some(v) = l.disk {
        limits.push(format!("disk {v}"));
    }
    if let Some(v) = l.processes {
        limits.push(format!("{v} processes"));
    }
    if let Some(v) = l.output {
        limits.push(format!("output {v}"));
    }
    if !j.spec.network {
        limits.push("no network".into());
    }
    if !limits.is_empty() {
        definition(&mut b, "limits", &esc(&limits.join(", ")).to_string());
    }
    definition(
        &mut b,
        "attempts",
        &format!("{} of at most {}", j.attempt, j.max_retries + 1),
    );
    definition(
        &mut b,
        "agent",
        &esc(j.agent.as_deref().unwrap_or("-")).to_string(),
    );
    definition(&mut b, "submitted", &html::utc(j.created_ms));
    definition(&mut b, "updated", &ago(d.now_ms, j.updated_ms));
    b.push_str("</dl></div>");

    // Outcome and phases.
    b.push_str("<div class=\"panel\"><h2>Outcome</h2><dl>");
    match &j.outcome {
        Some(o) => definition(
            &mut b,
            "outcome",
            &format!(
                "<span id=\"outcome\" class=\"outcome {}\">{}</span>",
                if j.state == JobState::Done {
                    "ok"
                } else {
                    "bad"
                },
                esc(&o.text)
            ),
        ),
        None => definition(&mut b, "outcome", "<span id=\"outcome\">not yet</span>"),
    }
    if let Some(n) = &j.note {
        definition(&mut b, "note", &esc(n).to_string());
    }
    if let (Some(r), Some(rep)) = (&j.replica, &j.spec.replication) {
        definition(
            &mut b,
            "replica",
            &format!(
                "<span id=\"validation\" class=\"outcome {}\">{}</span> · one of {} replicas \
                 (group {}), quorum {}",
                match r.validation {
                    Validation::Valid => "ok",
                    Validation::Pending => "",
                    Validation::Outvoted | Validation::NoQuorum => "bad",
                },
                r.validation,
                rep.replicas,
                job_link(r.group),
                rep.quorum
            ),
        );
        if let (false, Some(name)) = (r.verdicts.is_empty(), &rep.validator) {
            let mut said = String::new();
            for v in &r.verdicts {
                let _ = write!(
                    said,
                    "<div class=\"verdict\">{} job {}: <code>{}</code></div>",
                    if v.same {
                        "agrees with"
                    } else {
                        "differs from"
                    },
                    job_link(v.other),
                    esc(&v.detail)
                );
            }
            definition(&mut b, &format!("validator {}", esc(name)), &said);
        }
    }
    if let Some(s) = &j.sandbox {
        definition(&mut b, "sandbox", &sandbox_cell(Some(s)));
    }
    if let Some(a) = &j.archive {
        definition(
            &mut b,
            "archive",
            &format!(
                "{} <code class=\"sha\">{}</code> <a href=\"{BASE}/jobs/{}/output\">download .tar.gz</a>",
                bytes(a.size),
                a.sha256,
                j.id
            ),
        );
    }
    b.push_str("</dl>");
    let phases = d.events.phases(j.attempt);
    let seen = [
        ("queued", phases.queued_ms),
        ("staging", phases.staging_ms),
        ("running", phases.running_ms),
        ("uploading", phases.uploading_ms),
    ];
    let total: u64 = seen.iter().filter_map(|(_, v)| *v).sum();
    let _ = write!(
        b,
        "<h3>Phases of attempt {} <small>as the manager saw them</small></h3><div class=\"phases\">",
        j.attempt
    );
    for (name, v) in seen {
        if let Some(ms) = v.filter(|_| total > 0) {
            let _ = write!(
                b,
                "<span class=\"ph ph-{name}\" style=\"flex-grow:{:.4}\" title=\"{name} {}\"></span>",
                ms.max(1) as f64 / total.max(1) as f64,
                duration_ms(ms)
            );
        }
    }
    b.push_str("</div><table class=\"timings\"><thead><tr><th>Phase</th><th>Manager saw</th><th>Agent measured</th></tr></thead><tbody>");
    let agent = j.timings_ms;
    let cell = |v: Option<u64>| v.map_or_else(|| "-".into(), duration_ms);
    for (i, (name, v)) in seen.iter().enumerate() {
        // The agent measures stage-in, run and stage-out.
        let measured = i.checked_sub(1).and_then(|k| agent.map(|t| t[k]));
        let _ = write!(
            b,
            "<tr data-phase=\"{name}\"><td><i class=\"key ph-{name}\"></i>{name}</td><td>{}</td><td>{}</td></tr>",
            cell(*v),
            cell(measured)
        );
    }
    b.push_str("</tbody></table></div></section>");

    // Logs.
    if d.stdout.is_some() || d.stderr.is_some() {
        b.push_str("<section class=\"panel\"><h2>Logs</h2>");
        if let Some(e) = &d.stdout {
            excerpt(&mut b, "stdout", "stdout", e, true);
        }
        if let Some(e) = &d.stderr {
            excerpt(&mut b, "stderr", "stderr", e, true);
        }
        b.push_str("</section>");
    }

    // Files.
    b.push_str("<section class=\"panel\"><h2>Output files</h2>");
    if let Some(n) = &d.archive_note {
        let _ = write!(b, "<p class=\"note\">{}</p>", esc(n));
    }
    if d.files.is_empty() {
        b.push_str(&empty("No output files (yet)."));
    } else {
        b.push_str(
            "<table class=\"files\"><thead><tr><th>File</th><th>Size</th><th>sha256</th>\
             <th>Check</th><th></th></tr></thead><tbody>",
        );
        for f in &d.files {
            let v = &f.view;
            let check = match f.check {
                Check::Unchecked => "<span class=\"muted\">not read</span>",
                Check::Matches => "<span class=\"ok\" title=\"the stored bytes have the digest the agent reported\">✓ verified</span>",
                Check::Differs => "<span class=\"bad\">✗ differs from the report</span>",
            };
            let _ = write!(
                b,
                "<tr data-file=\"{p}\"><td><code>{p}</code></td><td class=\"n\" data-size=\"{size}\">{}</td>\
                 <td><code class=\"sha\" title=\"{sha}\">{sha}</code></td><td>{check}</td>\
                 <td><a href=\"{BASE}/jobs/{id}/files/{href}\" download>download</a></td></tr>",
                bytes(v.size),
                p = esc(&v.path),
                size = v.size,
                sha = v.sha256,
                id = j.id,
                href = url_path(&v.path),
            );
        }
        b.push_str("</tbody></table>");
    }
    for f in &d.files {
        let path = &f.view.path;
        match &f.histograms {
            Some(Ok(hs)) => {
                for h in hs {
                    single_plot(&mut b, path, h);
                }
            }
            Some(Err(e)) => {
                let _ = write!(
                    b,
                    "<p class=\"note\"><code>{}</code> is not plotted: {}</p>",
                    esc(path),
                    esc(e)
                );
            }
            None => {}
        }
        if let Some(p) = &f.preview {
            if path != STDOUT_ENTRY && path != STDERR_ENTRY {
                let id = format!("preview-{}", url_part(path));
                excerpt(
                    &mut b,
                    &id,
                    &format!("<code>{}</code>", esc(path)),
                    p,
                    false,
                );
            }
        }
    }
    b.push_str("</section>");

    // History.
    b.push_str("<section class=\"panel\"><h2>History</h2>");
    let rows: Vec<Vec<String>> = d
        .events
        .events
        .iter()
        .map(|e| {
            vec![
                html::utc(e.at_ms),
                e.attempt.to_string(),
                format!("{} → {}", esc(&e.from), state_badge(e.to)),
                esc(&e.why).to_string(),
            ]
        })
        .collect();
    b.push_str(&table(
        "events",
        &["Time", "Attempt", "Change", "Why"],
        &rows,
    ));
    b.push_str("</section>");
    Page {
        title: format!("Job {}", j.id),
        nav: Nav::Work,
        body: b,
    }
}

/// Jobs listed on a batch's page (the API and `copilot batch` have them all).
pub const BATCH_ROWS: usize = 200;

/// The bin-by-bin mean of `sum` over `n` replicas.
fn mean(sum: &[Bin], n: usize) -> Vec<Bin> {
    sum.iter()
        .map(|b| Bin {
            value: b.value / n.max(1) as f64,
            ..*b
        })
        .collect()
}

fn batch_plot(b: &mut String, p: &BatchPlot) {
    let what = if p.name.is_empty() {
        p.path.clone()
    } else {
        format!("{}: {}", p.path, p.name)
    };
    let title = if p.title.is_empty() { &what } else { &p.title };
    let mut series: Vec<Series<'_>> = p
        .replicas
        .iter()
        .enumerate()
        .map(|(i, r)| Series {
            label: r.label.clone(),
            bins: &r.bins,
            look: Look::Line,
            colour: colour(i),
        })
        .collect();
    let avg = p.sum.as_ref().map(|s| mean(s, p.replicas.len()));
    if let Some(avg) = &avg {
        series.push(Series {
            label: "mean".into(),
            bins: avg,
            look: Look::Bold,
            colour: 0,
        });
    }
    let _ = write!(
        b,
        "<div class=\"plots\" data-plot=\"{}\"><figure class=\"plot overlay\"><figcaption>{} \
         <small>{} replicas overlaid, with their mean</small></figcaption>{}<ul class=\"legend\">",
        esc(&what),
        esc(title),
        p.replicas.len(),
        plot::histograms(title, &series),
    );
    for (i, r) in p.replicas.iter().enumerate().take(24) {
        let _ = write!(
            b,
            "<li><i class=\"key s{}\"></i><a href=\"{BASE}/jobs/{}\">{}</a></li>",
            colour(i),
            r.job,
            esc(&r.label)
        );
    }
    if p.replicas.len() > 24 {
        let _ = write!(b, "<li>… {} more</li>", p.replicas.len() - 24);
    }
    if avg.is_some() {
        b.push_str("<li><i class=\"key mean\"></i>mean</li>");
    }
    b.push_str("</ul></figure>");
    if let Some(sum) = &p.sum {
        let total: f64 = sum.iter().map(|b| b.value).sum();
        let _ = write!(
            b,
            "<figure class=\"plot merged\"><figcaption>{} <small>merged: the sum of {} replicas, total {}</small></figcaption>{}</figure>",
            esc(title),
            p.replicas.len(),
            fmt_total(total),
            plot::histograms(
                &format!("{title} (sum)"),
                &[Series {
                    label: "sum".into(),
                    bins: sum,
                    look: Look::Filled,
                    colour: 0,
                }]
            )
        );
    }
    b.push_str("</div>");
    for problem in &p.problems {
        let _ = write!(b, "<p class=\"note\">{}</p>", esc(problem));
    }
}

/// The batch page: progress, the plots of the replicas' histograms, the jobs.
pub fn batch(v: &BatchView, now_ms: u64) -> Page {
    let total: u64 = v.counts.values().sum();
    let mut b = format!(
        "<h1>Batch <span class=\"name\">{}</span></h1><section class=\"cards\">",
        esc(&v.name)
    );
    let _ = write!(
        b,
        "<div class=\"card\"><div class=\"num\" id=\"batch-jobs\">{total}</div><div class=\"label\">jobs</div></div>"
    );
    for (st, n) in v.counts.iter().filter(|(_, n)| **n > 0) {
        let _ = write!(
            b,
            "<div class=\"card st-{st}\"><div class=\"num\" id=\"count-{st}\">{n}</div><div class=\"label\">{st}</div></div>"
        );
    }
    let _ = write!(b, "</section><p>{}</p>", progress(&v.counts));
    b.push_str("<section class=\"panel\"><h2>Results</h2>");
    if v.plots.is_empty() {
        b.push_str(&empty(
            "No histograms yet: done jobs' *.csv (lo,hi,count) and *.yoda outputs are plotted here.",
        ));
    }
    for p in &v.plots {
        batch_plot(&mut b, p);
    }
    let shown = &v.jobs[..v.jobs.len().min(BATCH_ROWS)];
    let _ = write!(
        b,
        "</section><section class=\"panel\"><h2>Jobs</h2>{}",
        jobs_table(shown, now_ms)
    );
    if v.jobs.len() > shown.len() {
        let _ = write!(
            b,
            "<p class=\"note\">The first {} of {} jobs; all of them: <code>copilot batch {}</code>.</p>",
            shown.len(),
            v.jobs.len(),
            esc(&v.name)
        );
    }
    b.push_str("</section>");
    Page {
        title: format!("Batch {}", v.name),
        nav: Nav::Work,
        body: b,
    }
}

/// A number with a bar behind it, the bar's width relative to `max`.
fn bar_cell(text: &str, v: f64, max: f64) -> String {
    let pct = if max > 0.0 { v / max * 100.0 } else { 0.0 };
    format!(
        "<span class=\"hbar\"><span style=\"width:{pct:.1}%\"></span><b>{}</b></span>",
        esc(text)
    )
}

/// The contributions page: jobs and run time per host and per BOINC volunteer.
pub fn contributions(c: &Contributions) -> Page {
    let mut b = String::from("<h1>Contributions</h1><section class=\"panel\"><h2>Per host</h2>");
    if c.hosts.is_empty() {
        b.push_str(&empty("No agent has reported a job yet."));
    } else {
        let max_jobs = c.hosts.iter().map(|h| h.jobs_done).max().unwrap_or(0) as f64;
        let max_run = c.hosts.iter().map(|h| h.run_seconds).fold(0.0, f64::max);
        b.push_str(
            "<table class=\"hosts\"><thead><tr><th>Agent</th><th>Jobs done</th><th>Run time</th>\
             <th>Payload failures</th><th>Host failures</th><th>BOINC volunteer</th></tr></thead><tbody>",
        );
        for h in &c.hosts {
            let vol = h.volunteer.map_or_else(
                || "<span class=\"muted\">-</span>".to_string(),
                |v| format!("user {}, host {}", v.user_id, v.host_id),
            );
            let _ = write!(
                b,
                "<tr data-agent=\"{name}\" data-jobs-done=\"{done}\"><td>{name}</td><td>{}</td><td>{}</td>\
                 <td class=\"n\">{}</td><td class=\"n\">{}</td><td>{vol}</td></tr>",
                bar_cell(&h.jobs_done.to_string(), h.jobs_done as f64, max_jobs),
                bar_cell(&html::seconds(h.run_seconds), h.run_seconds, max_run),
                h.jobs_failed,
                h.host_failures,
                name = esc(&h.agent),
                done = h.jobs_done,
            );
        }
        b.push_str("</tbody></table>");
    }
    b.push_str(
        "</section><section class=\"panel\"><h2>Per volunteer <small>BOINC users</small></h2>",
    );
    if c.volunteers.is_empty() {
        b.push_str(&empty(
            "No agent runs under BOINC (or none has said whom it computes for): volunteers appear \
             here once agents started by the BOINC wrapper report jobs.",
        ));
    } else {
        let rows: Vec<Vec<String>> = c
            .volunteers
            .iter()
            .map(|v| {
                vec![
                    format!("user {}", v.user_id),
                    v.hosts.to_string(),
                    v.jobs_done.to_string(),
                    html::seconds(v.run_seconds),
                    html::seconds(v.cpu_seconds),
                ]
            })
            .collect();
        b.push_str(&table(
            "volunteers",
            &["Volunteer", "Hosts", "Jobs done", "Run time", "CPU time"],
            &rows,
        ));
    }
    b.push_str(
        "<p class=\"note\">Run time is the wall-clock time of the payloads of done jobs, as each \
         agent measured it; CPU time is what their payloads used, as credited to the volunteer.</p></section>",
    );
    Page {
        title: "Contributions".into(),
        nav: Nav::Contributions,
        body: b,
    }
}

/// The login form; `next` is where to go afterwards, `error` why the last try failed.
pub fn login(next: &str, error: Option<&str>) -> Page {
    let mut b = String::from("<h1>Log in</h1><section class=\"panel login\">");
    if let Some(e) = error {
        let _ = write!(b, "<p class=\"bad\" id=\"login-error\">{}</p>", esc(e));
    }
    let _ = write!(
        b,
        "<form method=\"post\" action=\"{BASE}/login\"><input type=\"hidden\" name=\"next\" value=\"{}\">\
         <label>API token <input type=\"password\" name=\"token\" autocomplete=\"current-password\" autofocus required></label>\
         <button type=\"submit\">Log in</button></form>\
         <p class=\"note\">The token is the manager's <code>api_token</code>. Or run \
         <code>copilot dashboard</code>, which prints a link that logs you in.</p></section>",
        esc(next)
    );
    Page {
        title: "Log in".into(),
        nav: Nav::None,
        body: b,
    }
}

/// A page saying what went wrong.
pub fn error(title: &str, message: &str) -> Page {
    Page {
        title: title.into(),
        nav: Nav::Work,
        body: format!(
            "<h1>{}</h1><section class=\"panel\"><p class=\"bad\">{}</p></section>",
            esc(title),
            esc(message)
        ),
    }
}

#[cfg(test)]
mod tests;
