//! The agent's local status page, like the web app inside Test4Theory's VM: what this agent is
//! doing for the volunteer who runs it. [`Board`] holds what the session tells it (connection,
//! each slot's job and phase, the last jobs finished); [`serve`] shows it on a loopback address
//! (`[status] listen`, off by default) as a page that reloads itself every 5 s
//! (`GET /`) and as JSON (`GET /status.json`). The BOINC wrapper forwards that port to the
//! volunteer's 127.0.0.1 and gives BOINC the address as `web_graphics_url`.
//!
//! The page shows job names, phases and outcomes only: no tokens, URLs or environment.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use copilot_dashboard::html::{duration_ms, esc, utc};
use copilot_protocol::wire::{Assignment, DoneReport, Phase};
use serde::{Deserialize, Serialize};

/// Finished jobs the page lists.
const RECENT: usize = 10;

/// A job a slot is working on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotView {
    pub job: u64,
    pub attempt: u32,
    pub name: String,
    /// `staging`, `running` or `uploading`.
    pub phase: String,
    /// Unix milliseconds when the job started, and when it entered its phase.
    pub started_ms: u64,
    pub phase_ms: u64,
}

/// A job this agent finished.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinishedView {
    pub job: u64,
    pub name: String,
    /// The outcome for people (`exited with code 0`, …).
    pub outcome: String,
    pub succeeded: bool,
    pub run_ms: u64,
    pub at_ms: u64,
}

/// What the page shows, also served as JSON.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusView {
    pub agent: String,
    pub version: String,
    /// The manager's XMPP address.
    pub manager: String,
    /// `connecting`, `online`, or `waiting for the manager`.
    pub link: String,
    pub since_ms: u64,
    pub now_ms: u64,
    /// One entry per slot; `None` when the slot waits for work.
    pub slots: Vec<Option<SlotView>>,
    pub jobs_succeeded: u64,
    pub jobs_failed: u64,
    /// The latest first.
    pub recent: Vec<FinishedView>,
}

/// Now as unix milliseconds.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::Staging => "staging",
        Phase::Running => "running",
        Phase::Uploading => "uploading",
    }
}

/// What the session reports, for the page.
#[derive(Debug)]
pub struct Board {
    view: Mutex<StatusView>,
}

impl Board {
    /// A board for `slots` slots of agent `agent` working for `manager`.
    pub fn new(agent: &str, manager: &str, slots: usize) -> Arc<Board> {
        let now = now_ms();
        Arc::new(Board {
            view: Mutex::new(StatusView {
                agent: agent.to_owned(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                manager: manager.to_owned(),
                link: "connecting".into(),
                since_ms: now,
                now_ms: now,
                slots: vec![None; slots],
                jobs_succeeded: 0,
                jobs_failed: 0,
                recent: Vec::new(),
            }),
        })
    }

    fn edit(&self, f: impl FnOnce(&mut StatusView)) {
        // Plain data for a page: a panic elsewhere leaves nothing worth refusing to show.
        f(&mut self.view.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// The connection to the manager changed.
    pub fn link(&self, state: &str) {
        self.edit(|v| v.link = state.to_owned());
    }

    /// Slot `slot` started `job`.
    pub fn started(&self, slot: usize, job: &Assignment) {
        let now = now_ms();
        self.edit(|v| {
            if let Some(s) = v.slots.get_mut(slot) {
                *s = Some(SlotView {
                    job: job.job,
                    attempt: job.attempt,
                    name: job.name.clone(),
                    phase: phase_name(Phase::Staging).into(),
                    started_ms: now,
                    phase_ms: now,
                });
            }
        });
    }

    /// Slot `slot`'s job entered `phase`.
    pub fn phase(&self, slot: usize, phase: Phase) {
        let now = now_ms();
        self.edit(|v| {
            if let Some(Some(s)) = v.slots.get_mut(slot) {
                s.phase = phase_name(phase).into();
                s.phase_ms = now;
            }
        });
    }

    /// Slot `slot` finished its job with `report`.
    pub fn finished(&self, slot: usize, name: &str, report: &DoneReport) {
        let now = now_ms();
        self.edit(|v| {
            if let Some(s) = v.slots.get_mut(slot) {
                *s = None;
            }
            let succeeded = report.outcome.succeeded();
            if succeeded {
                v.jobs_succeeded += 1;
            } else {
                v.jobs_failed += 1;
            }
            let mut recent: VecDeque<FinishedView> = std::mem::take(&mut v.recent).into();
            recent.push_front(FinishedView {
                job: report.job,
                name: name.to_owned(),
                outcome: report.outcome.describe(),
                succeeded,
                run_ms: report.timings.run_ms,
                at_ms: now,
            });
            recent.truncate(RECENT);
            v.recent = recent.into();
        });
    }

    /// What the page shows now.
    pub fn snapshot(&self) -> StatusView {
        let mut v = self.view.lock().unwrap_or_else(|p| p.into_inner()).clone();
        v.now_ms = now_ms();
        v
    }
}

/// The page for people.
pub fn page(v: &StatusView) -> String {
    let mut s = String::with_capacity(4096);
    let _ = write!(
        s,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"5\"><meta name=\"viewport\" content=\"width=device-width\">\
         <title>copilot agent {agent}</title><style>\
         body{{font:15px/1.5 system-ui,sans-serif;margin:24px;color:#1d2430;background:#f6f7f9}}\
         h1{{font-size:20px}} .box{{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:12px 16px;margin:12px 0}}\
         table{{border-collapse:collapse;width:100%}} td,th{{text-align:left;padding:4px 8px;border-bottom:1px solid #dde1e7}}\
         .ok{{color:#1f9d55}} .bad{{color:#d33c3c}} .muted{{color:#6a7383}}</style></head><body>\
         <h1>copilot agent <b>{agent}</b></h1><div class=\"box\" id=\"summary\">This computer works for \
         <b>{manager}</b>: <span id=\"link\">{link}</span> since {since}. \
         Jobs done here: <b id=\"succeeded\">{ok}</b>, failed: <b id=\"failed\">{bad}</b>.</div>\
         <div class=\"box\"><b>Now</b><table id=\"slots\">",
        agent = esc(&v.agent),
        manager = esc(&v.manager),
        link = esc(&v.link),
        since = utc(v.since_ms),
        ok = v.jobs_succeeded,
        bad = v.jobs_failed,
    );
    for (i, slot) in v.slots.iter().enumerate() {
        match slot {
            Some(j) => {
                let _ = write!(
                    s,
                    "<tr><td>slot {}</td><td>job {} <b>{}</b> (attempt {})</td><td>{} for {}</td></tr>",
                    i + 1,
                    j.job,
                    esc(&j.name),
                    j.attempt,
                    esc(&j.phase),
                    duration_ms(v.now_ms.saturating_sub(j.phase_ms))
                );
            }
            None => {
                let _ = write!(
                    s,
                    "<tr><td>slot {}</td><td class=\"muted\" colspan=\"2\">waiting for work</td></tr>",
                    i + 1
                );
            }
        }
    }
    s.push_str("</table></div><div class=\"box\"><b>Recently</b><table id=\"recent\">");
    if v.recent.is_empty() {
        s.push_str("<tr><td class=\"muted\">no job finished yet</td></tr>");
    }
    for f in &v.recent {
        let _ = write!(
            s,
            "<tr><td>{}</td><td>job {} <b>{}</b></td><td class=\"{}\">{}</td><td>ran {}</td></tr>",
            utc(f.at_ms),
            f.job,
            esc(&f.name),
            if f.succeeded { "ok" } else { "bad" },
            esc(&f.outcome),
            duration_ms(f.run_ms)
        );
    }
    let _ = write!(
        s,
        "</table></div><p class=\"muted\">copilot-agent {} · this page reloads every 5 s · \
         <a href=\"/status.json\">JSON</a></p></body></html>",
        esc(&v.version)
    );
    s
}

/// Serve the page on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    board: Arc<Board>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/", get(html))
        .route("/status.json", get(json))
        .with_state(board);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn html(State(board): State<Arc<Board>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        page(&board.snapshot()),
    )
        .into_response()
}

async fn json(State(board): State<Arc<Board>>) -> Response {
    Json(board.snapshot()).into_response()
}

#[cfg(test)]
mod tests {
    use copilot_protocol::wire::{Outcome, Timings};

    use super::*;
    use crate::testutil::assignment;

    fn report(job: u64, outcome: Outcome) -> DoneReport {
        DoneReport {
            agent: "vm".into(),
            job,
            attempt: 1,
            outcome,
            timings: Timings {
                stage_in_ms: 1,
                run_ms: 2500,
                stage_out_ms: 1,
                cpu_ms: None,
            },
            archive: None,
            files: vec![],
            sandbox: Default::default(),
            volunteer: None,
            want_more: true,
        }
    }

    #[test]
    fn the_board_follows_jobs_through_their_slots() {
        let b = Board::new("vm-<1>", "manager@example.org", 2);
        b.link("online");
        b.started(1, &assignment(7, "mc-pi#3"));
        b.phase(1, Phase::Running);
        let v = b.snapshot();
        assert_eq!(v.slots[0], None);
        let s = v.slots[1].as_ref().unwrap();
        assert_eq!(
            (s.job, s.name.as_str(), s.phase.as_str()),
            (7, "mc-pi#3", "running")
        );
        let html = page(&v);
        assert!(html.contains("job 7 <b>mc-pi#3</b> (attempt 1)</td><td>running for"));
        assert!(html.contains("<b>vm-&lt;1&gt;</b>"), "escaped");
        assert!(html.contains("<span id=\"link\">online</span>"));
        b.finished(1, "mc-pi#3", &report(7, Outcome::Exited { code: 0 }));
        for i in 0..12 {
            b.finished(0, "x", &report(100 + i, Outcome::Exited { code: 1 }));
        }
        let v = b.snapshot();
        assert_eq!(v.slots, vec![None, None]);
        assert_eq!((v.jobs_succeeded, v.jobs_failed), (1, 12));
        assert_eq!(v.recent.len(), RECENT);
        assert_eq!(v.recent[0].job, 111, "latest first");
        let html = page(&v);
        assert!(html.contains("<b id=\"succeeded\">1</b>"));
        assert!(html.contains("exited with code 1") && html.contains("ran 2.5 s"));
        // A slot the agent does not have is ignored.
        b.started(9, &assignment(1, "x"));
        assert_eq!(b.snapshot().slots.len(), 2);
    }
}
