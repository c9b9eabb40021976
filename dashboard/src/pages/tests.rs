use std::collections::BTreeMap;

use copilot_protocol::api::{BoincVolunteer, OutcomeView};
use copilot_protocol::histogram::parse_csv;
use copilot_protocol::summary::{
    Activity, BatchSummary, HostContribution, JobEvent, Replica, VolunteerContribution,
};
use copilot_protocol::{JobSpec, Sha256};

use super::*;

fn job_view(id: u64, name: &str, state: JobState) -> JobView {
    JobView {
        id,
        name: name.into(),
        state,
        attempt: 1,
        max_retries: 2,
        agent: Some("agent-<1>".into()),
        created_ms: 1_000,
        updated_ms: 2_000,
        outcome: None,
        archive: None,
        archive_url: None,
        files: vec![],
        timings_ms: Some([10, 2_000, 30]),
        sandbox: None,
        note: None,
        replica: None,
        spec: JobSpec::new(name, &["sh", "run.sh"]),
    }
}

fn counts(pairs: &[(JobState, u64)]) -> BTreeMap<JobState, u64> {
    let mut c: BTreeMap<JobState, u64> = JobState::ALL.iter().map(|s| (*s, 0)).collect();
    c.extend(pairs.iter().copied());
    c
}

#[test]
fn the_work_page_shows_counts_causes_batches_and_jobs() {
    let s = Summary {
        now_ms: 60_000,
        counts: counts(&[(JobState::Done, 9), (JobState::Failed, 1)]),
        agents_online: 2,
        agents_known: 3,
        activity: Activity {
            start_ms: 0,
            bucket_ms: 10_000,
            assigned: vec![0, 4, 6, 0, 0, 0],
            done: vec![0, 3, 6, 0, 0, 0],
            failed: vec![0, 0, 1, 0, 0, 0],
            queued: vec![0, 6, 0, 0, 0, 0],
        },
        failures: vec![CauseCount {
            cause: "exit 3".into(),
            count: 1,
        }],
        lost_attempts: vec![],
        batches: vec![BatchSummary {
            name: "mc <pi>".into(),
            jobs: 10,
            counts: counts(&[(JobState::Done, 9), (JobState::Failed, 1)]),
            first_id: 1,
            last_id: 10,
            updated_ms: 50_000,
        }],
    };
    let p = work(&s, &[job_view(10, "mc <pi>#9", JobState::Failed)]);
    assert_eq!(p.nav, Nav::Work);
    let b = &p.body;
    assert!(b.contains("<div class=\"num\" id=\"count-done\">9</div>"));
    assert!(b.contains("<div class=\"num\" id=\"count-queued\">0</div>"));
    assert!(b.contains("id=\"agents-online\">2</div>") && b.contains("of 3"));
    assert!(b.contains("data-done=\"9\" data-failed=\"1\" data-assigned=\"10\""));
    assert!(b.contains("<td>exit 3</td><td>1</td>"));
    assert!(b.contains("No attempt was lost."));
    assert!(b.contains("<tr data-batch=\"mc &lt;pi&gt;\"><td><a href=\"/ui/batches/mc%20%3Cpi%3E\">mc &lt;pi&gt;</a>"));
    assert!(b.contains("<tr data-job=\"10\" data-state=\"failed\"><td><a href=\"/ui/jobs/10\">10</a></td><td>mc &lt;pi&gt;#9</td>"));
    assert!(!b.contains("<pi>"), "everything from jobs is escaped");
}

#[test]
fn the_fleet_page_marks_missing_protections_and_shows_volunteers() {
    let mut a = AgentView {
        name: "vm-1".into(),
        jid: Some("vm-1@localhost/x".into()),
        online: true,
        version: "0.1.0".into(),
        running: vec![4],
        jobs_done: 7,
        last_seen_ms: 1_000,
        sandbox: Some(SandboxReport {
            active: [Protection::Session].into(),
            missing: [Protection::Uid].into(),
        }),
        volunteer: Some(BoincVolunteer {
            user_id: 42,
            host_id: 7,
            team_id: 3,
        }),
    };
    let b = fleet(
        &AgentList {
            agents: vec![a.clone()],
        },
        5_000,
    )
    .body;
    assert!(b.contains("id=\"agents-online\">1<") && b.contains("id=\"agents-lacking\">1<"));
    assert!(b.contains("<span class=\"prot on\">session</span>"));
    assert!(b.contains("no uid</span>"));
    assert!(b.contains("user 42, host 7, team 3"));
    assert!(b.contains("<a href=\"/ui/jobs/4\">4</a>"));
    a.volunteer = None;
    a.online = false;
    a.sandbox = None;
    let b = fleet(&AgentList { agents: vec![a] }, 5_000).body;
    assert!(b.contains("data-online=\"false\"") && b.contains("no job yet"));
    assert!(!b.contains("user 42"));
    assert!(fleet(&AgentList { agents: vec![] }, 0)
        .body
        .contains("No agent"));
}

#[test]
fn the_job_page_shows_phases_logs_files_plots_and_history() {
    use JobState::*;
    let mut j = job_view(3, "mc-pi#2", Done);
    j.outcome = Some(OutcomeView {
        kind: "exited".into(),
        exit_code: Some(0),
        signal: None,
        limit: None,
        text: "exited with code 0".into(),
    });
    let csv = "lo,hi,count\n0,1,5\n1,2,7\n";
    let file = |path: &str, data: &str| FileView {
        path: path.into(),
        size: data.len() as u64,
        sha256: Sha256::of(data.as_bytes()),
    };
    let ev = |attempt, from: &str, to, at_ms| JobEvent {
        attempt,
        from: from.into(),
        to,
        at_ms,
        why: "x <y>".into(),
    };
    let d = JobDetail {
        job: j,
        events: JobEvents {
            job: 3,
            events: vec![
                ev(0, "new", Queued, 1_000),
                ev(1, "queued", Assigned, 1_200),
                ev(1, "assigned", Running, 1_300),
                ev(1, "running", Uploading, 3_300),
                ev(1, "uploading", Done, 3_400),
            ],
        },
        files: vec![
            FileEntry {
                view: file("histogram.csv", csv),
                check: Check::Matches,
                preview: Some(Excerpt {
                    text: csv.into(),
                    cut: false,
                }),
                histograms: Some(Ok(vec![parse_csv(csv).unwrap()])),
            },
            FileEntry {
                view: file("bad.csv", "x"),
                check: Check::Differs,
                preview: None,
                histograms: Some(Err("line 1: header".into())),
            },
            FileEntry {
                view: file(STDOUT_ENTRY, "pi"),
                check: Check::Unchecked,
                preview: Some(Excerpt {
                    text: "pi".into(),
                    cut: false,
                }),
                histograms: None,
            },
        ],
        stdout: Some(Excerpt {
            text: "<b>pi ~ 3.14</b>".into(),
            cut: true,
        }),
        stderr: None,
        archive_note: None,
        now_ms: 10_000,
    };
    let b = job(&d).body;
    assert!(b.contains("Part of batch <a href=\"/ui/batches/mc-pi\">mc-pi</a>"));
    assert!(b.contains("<span id=\"outcome\" class=\"outcome ok\">exited with code 0</span>"));
    assert!(b.contains("<tr data-phase=\"queued\"><td><i class=\"key ph-queued\"></i>queued</td><td>200 ms</td><td>-</td></tr>"));
    assert!(b.contains("<tr data-phase=\"running\"><td><i class=\"key ph-running\"></i>running</td><td>2.0 s</td><td>2.0 s</td></tr>"));
    assert!(b.contains("<pre class=\"text\" id=\"stdout\">…\n&lt;b&gt;pi ~ 3.14&lt;/b&gt;</pre>"));
    assert!(b.contains(&format!(
        "<code class=\"sha\" title=\"{0}\">{0}</code>",
        Sha256::of(csv.as_bytes())
    )));
    assert!(b.contains("<a href=\"/ui/jobs/3/files/_copilot/stdout.txt\" download>"));
    assert!(b.contains("✓ verified") && b.contains("✗ differs"));
    assert!(b.contains("<figure class=\"plot\" data-file=\"histogram.csv\">"));
    assert!(b.contains("data-series=\"1\" data-bins=\"2\""));
    assert!(b.contains("<code>bad.csv</code> is not plotted: line 1: header"));
    assert!(b.contains("id=\"preview-histogram.csv\""));
    assert!(
        !b.contains("id=\"preview-_copilot"),
        "logs are shown once, as logs"
    );
    assert!(b.contains("x &lt;y&gt;"));
}

#[test]
fn the_job_page_says_whether_a_replica_counts() {
    let mut j = job_view(8, "vote", JobState::Done);
    j.spec.replication = Some(copilot_protocol::job::Replication {
        replicas: 3,
        quorum: 2,
        validator: Some("close".into()),
    });
    j.replica = Some(copilot_protocol::api::ReplicaView {
        group: 7,
        validation: copilot_protocol::api::Validation::Outvoted,
        verdicts: vec![copilot_protocol::api::VerdictView {
            other: 7,
            same: false,
            detail: "difference 0.2 > 0.01".into(),
        }],
    });
    let d = JobDetail {
        job: j,
        events: JobEvents {
            job: 8,
            events: vec![],
        },
        files: vec![],
        stdout: None,
        stderr: None,
        archive_note: None,
        now_ms: 10_000,
    };
    let b = job(&d).body;
    assert!(
        b.contains("<span id=\"validation\" class=\"outcome bad\">outvoted</span> · one of 3 replicas (group <a href=\"/ui/jobs/7\">7</a>), quorum 2"),
        "{b}"
    );
    assert!(
        b.contains("<dt>validator close</dt><dd><div class=\"verdict\">differs from job <a href=\"/ui/jobs/7\">7</a>: <code>difference 0.2 &gt; 0.01</code></div></dd>"),
        "{b}"
    );
    // A job that is not replicated says nothing about it.
    let d = JobDetail {
        job: job_view(9, "single", JobState::Done),
        ..d
    };
    assert!(!job(&d).body.contains("validation"));
}

#[test]
fn the_batch_page_overlays_replicas_with_their_mean_and_plots_the_sum() {
    let h = |v: f64| {
        parse_csv(&format!("0,1,{v}\n1,2,{}\n", v * 2.0))
            .unwrap()
            .bins
    };
    let replicas: Vec<Replica> = (0..3)
        .map(|i| Replica {
            job: i + 1,
            label: format!("mc-pi#{i}"),
            bins: h(i as f64 + 1.0),
        })
        .collect();
    let sum = copilot_protocol::histogram::sum(
        &replicas
            .iter()
            .map(|r| r.bins.as_slice())
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let v = BatchView {
        name: "mc-pi".into(),
        counts: counts(&[(JobState::Done, 3)]),
        jobs: vec![job_view(1, "mc-pi#0", JobState::Done)],
        plots: vec![BatchPlot {
            path: "histogram.csv".into(),
            name: String::new(),
            title: String::new(),
            replicas,
            sum: Some(sum),
            problems: vec!["job 9: binning differs".into()],
        }],
    };
    let b = batch(&v, 0).body;
    assert!(b.contains("id=\"batch-jobs\">3<"));
    assert!(b.contains("<div class=\"plots\" data-plot=\"histogram.csv\">"));
    // Three replicas and the mean on one plot; the sum (6, 12) on the other.
    assert!(b.contains("data-series=\"4\" data-bins=\"2\""));
    assert!(b.contains("class=\"series s0 bold\" data-label=\"mean\" data-total=\"6\""));
    assert!(b.contains("data-label=\"sum\" data-total=\"18\""));
    assert!(b.contains("<a href=\"/ui/jobs/2\">mc-pi#1</a>"));
    assert!(b.contains("job 9: binning differs"));
    assert!(!b.contains("The first"));
    let many = BatchView {
        plots: vec![],
        jobs: (0..BATCH_ROWS as u64 + 5)
            .map(|i| job_view(i, &format!("mc-pi#{i}"), JobState::Queued))
            .collect(),
        ..v
    };
    let b = batch(&many, 0).body;
    assert!(b.contains("No histograms yet"));
    assert_eq!(b.matches("<tr data-job=").count(), BATCH_ROWS);
    assert!(b.contains("The first 200 of 205 jobs"));
}

#[test]
fn contributions_list_hosts_and_volunteers() {
    let c = Contributions {
        hosts: vec![HostContribution {
            agent: "agent-1".into(),
            jobs_done: 8,
            jobs_failed: 1,
            host_failures: 2,
            run_seconds: 90.0,
            volunteer: Some(BoincVolunteer {
                user_id: 42,
                host_id: 7,
                team_id: 0,
            }),
        }],
        volunteers: vec![VolunteerContribution {
            user_id: 42,
            hosts: 1,
            jobs_done: 8,
            run_seconds: 90.0,
            cpu_seconds: 61.0,
        }],
    };
    let b = contributions(&c).body;
    assert!(b.contains("<tr data-agent=\"agent-1\" data-jobs-done=\"8\">"));
    assert!(b.contains("1 min 30 s"));
    assert!(b.contains("1 min 1 s"), "the volunteer's CPU time");
    assert!(b.contains("user 42, host 7"));
    assert!(b.contains("<td>user 42</td><td>1</td><td>8</td>"));
    let b = contributions(&Contributions::default()).body;
    assert!(b.contains("No agent has reported") && b.contains("No agent runs under BOINC"));
}

#[test]
fn the_login_form_escapes_where_it_goes_next() {
    let p = login("/ui/jobs/1\"><script>", Some("wrong token"));
    assert_eq!(p.nav, Nav::None);
    assert!(p
        .body
        .contains("value=\"/ui/jobs/1&quot;&gt;&lt;script&gt;\""));
    assert!(p.body.contains("id=\"login-error\">wrong token<"));
    assert!(error("No such job", "<x>").body.contains("&lt;x&gt;"));
}
