//! The web dashboard in a real headless Chromium (Debian's), on a real stack that ran a small
//! batch: the numbers on the pages are the manager's, a click leads to a job and its histogram,
//! the batch overlays its replicas and sums them, pages update by themselves, and each agent's
//! local status page shows what it did. Screenshots go to `target/<profile>/dashboard/`.
//!
//! Without Chromium (or where it cannot start) the test prints `skipped: <reason>`.

use std::time::{Duration, Instant};

use copilot_protocol::api::{AgentList, JobList};
use copilot_protocol::summary::Summary;
use copilot_protocol::JobState;
use copilot_tests::browser::Browser;
use copilot_tests::{bin_dir, Harness, Setup};

const SAMPLES: u64 = 20_000;
const BINS: usize = 12;
const REPLICAS: usize = 4;

fn mc_pi() -> String {
    format!(
        r#"
name = "mc-pi"
command = ["sh", "mc.sh"]
count = {REPLICAS}
outputs = ["result.txt", "histogram.csv"]

[[inputs]]
path = "mc.sh"

[env]
SAMPLES = "{SAMPLES}"
BINS = "{BINS}"
"#
    )
}

const FAIL: &str = r#"
name = "fail"
command = ["sh", "-c", "echo 'about to fail' >&2; exit 3"]
max_retries = 0
"#;

const HELLO: &str = r#"
name = "hello"
command = ["sh", "-c", "echo hello"]
"#;

/// Unwrap a browser step, or fail the test saying what the page was doing.
fn step<T>(what: &str, r: Result<T, String>) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// The address of each agent's status page, from its log.
fn status_pages(h: &Harness) -> Vec<(String, String)> {
    let mut pages = Vec::new();
    for n in 1..=h.stack.agent_count() {
        let name = copilot_stack::LocalStack::agent_name(n);
        let log = h.stack.dir().join("logs").join(format!("{name}.log"));
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let url = text
            .lines()
            .find_map(|l| l.split("status page on ").nth(1))
            .unwrap_or_else(|| panic!("{name} logged no status page:\n{text}"))
            .trim()
            .to_owned();
        pages.push((name, url));
    }
    pages
}

#[test]
fn dashboard_shows_the_batch_its_plots_and_the_fleet_in_chromium() {
    let started = Instant::now();
    let h = Harness::start(Setup {
        agents: 2,
        agent_toml: Some("[status]\nlisten = \"127.0.0.1:0\"\n".into()),
        ..Setup::default()
    });
    let mc = h.write_job(
        "mc-pi",
        &mc_pi(),
        &[("mc.sh", include_str!("../../examples/mc-pi/mc.sh"))],
    );
    let mut ids = h.submit(&mc);
    assert_eq!(ids.len(), REPLICAS);
    ids.extend(h.submit(&h.write_job("fail", FAIL, &[])));
    let jobs = h.wait_final(&ids, Duration::from_secs(120));
    let dir = bin_dir().join("dashboard");
    let mut b = match Browser::start(&h.path("chromium.log")) {
        Ok(b) => b,
        Err(reason) => {
            println!("skipped: {reason}");
            return;
        }
    };

    // Log in with the link `copilot dashboard` prints: it lands on the work page.
    let link = h.cli_ok(&["dashboard"]).trim().to_owned();
    assert!(link.contains("/ui/login?code="), "{link}");
    step("logging in", b.goto(&link));
    assert_eq!(step("location", b.location()), "/ui/");

    // Every count on the page is the manager's.
    let list: JobList = h.jobs();
    for state in JobState::ALL {
        let shown = step("a count", b.text(&format!("#count-{state}")));
        assert_eq!(shown, list.counts[&state].to_string(), "{state}");
    }
    assert_eq!(list.counts[&JobState::Done], REPLICAS as u64);
    assert_eq!(list.counts[&JobState::Failed], 1);
    let summary: Summary = h.api("/api/summary");
    assert_eq!(step("agents", b.text("#agents-online")), "2");
    assert_eq!(
        step("failures", b.text("table.causes td")),
        summary.failures[0].cause
    );
    assert_eq!(summary.failures[0].cause, "exit 3");
    assert_eq!(
        step("batch size", b.text("tr[data-batch='mc-pi'] td.n")),
        REPLICAS.to_string()
    );
    let plotted = step(
        "throughput",
        b.eval("document.querySelector('svg.activity').dataset.done"),
    );
    assert_eq!(plotted.as_str(), Some(&*REPLICAS.to_string()));
    step("screenshot", b.screenshot(&dir.join("work.png")));

    // A job finishing while the page is open shows up without a reload.
    step("marking the page", b.eval("window.copilotMark = 7"));
    let hello = h.submit(&h.write_job("hello", HELLO, &[]));
    h.wait_final(&hello, Duration::from_secs(60));
    let done = REPLICAS + 1;
    step(
        "the page to update itself",
        b.wait_for(
            "the done count to update in place",
            &format!(
                "document.getElementById('count-done').textContent === '{done}' \
                 && window.copilotMark === 7 && Number(document.body.dataset.refreshes) > 0"
            ),
            Duration::from_secs(20),
        ),
    );

    // Click through to the first replica and check its files against the manager's record.
    let first = jobs.iter().find(|j| j.name == "mc-pi#0").expect("mc-pi#0");
    step(
        "clicking the job",
        b.click(&format!("tr[data-job='{}'] a", first.id)),
    );
    assert_eq!(
        step("location", b.location()),
        format!("/ui/jobs/{}", first.id)
    );
    assert_eq!(step("outcome", b.text("#outcome")), "exited with code 0");
    for f in &first.files {
        let row = format!("tr[data-file='{}']", f.path);
        assert_eq!(
            step("a digest", b.text(&format!("{row} code.sha"))),
            f.sha256.to_string()
        );
        assert_eq!(
            step(
                "a size",
                b.eval(&format!(
                    "document.querySelector(\"{row} td.n\").dataset.size"
                ))
            ),
            serde_json::json!(f.size.to_string())
        );
    }
    let verified = step(
        "checks",
        b.eval("[...document.querySelectorAll('table.files td')].filter(t => t.textContent.includes('verified')).length"),
    );
    assert_eq!(verified.as_u64(), Some(first.files.len() as u64));
    let bins = step(
        "the histogram",
        b.eval("document.querySelector(\"figure[data-file='histogram.csv'] svg\").dataset.bins"),
    );
    assert_eq!(bins.as_str(), Some(&*BINS.to_string()));
    assert!(step("stdout", b.text("#stdout")).starts_with("pi ~ "));
    step("screenshot", b.screenshot(&dir.join("job.png")));

    // On to its batch: the replicas overlaid with their mean, and their sum.
    step("clicking the batch", b.click("a[href='/ui/batches/mc-pi']"));
    assert_eq!(step("location", b.location()), "/ui/batches/mc-pi");
    let overlay = step(
        "the overlay",
        b.eval("document.querySelector('figure.overlay svg').dataset.series"),
    );
    assert_eq!(overlay.as_str(), Some(&*(REPLICAS + 1).to_string()));
    let total = step(
        "the sum",
        b.eval("document.querySelector(\"figure.merged path[data-label='sum']\").dataset.total"),
    );
    // Every sample of every replica falls in one bin.
    assert_eq!(
        total.as_str(),
        Some(&*(SAMPLES * REPLICAS as u64).to_string())
    );
    step("screenshot", b.screenshot(&dir.join("batch.png")));

    // The fleet and the contributions, reached from the navigation.
    step("clicking Fleet", b.click("header nav a[href='/ui/fleet']"));
    let agents: AgentList = h.api("/api/agents");
    for a in &agents.agents {
        let row = format!("tr[data-agent='{}']", a.name);
        assert_eq!(
            step("an agent's jobs", b.text(&format!("{row} td.n"))),
            a.jobs_done.to_string()
        );
    }
    step(
        "clicking Contributions",
        b.click("header nav a[href='/ui/contributions']"),
    );
    let credited = step(
        "contributions",
        b.eval("[...document.querySelectorAll('tr[data-jobs-done]')].reduce((n, r) => n + Number(r.dataset.jobsDone), 0)"),
    );
    assert_eq!(credited.as_u64(), Some(done as u64));
    step("screenshot", b.screenshot(&dir.join("contributions.png")));

    // Each agent's own status page says what it did.
    for (name, url) in status_pages(&h) {
        step("an agent's status page", b.goto(&url));
        let a = agents.agents.iter().find(|a| a.name == name).unwrap();
        let shown: u64 = step("jobs done", b.text("#succeeded")).parse().unwrap();
        let failed: u64 = step("jobs failed", b.text("#failed")).parse().unwrap();
        assert_eq!(shown, a.jobs_done, "{name}");
        assert!(failed <= 1, "{name}: {failed}");
        assert_eq!(step("link", b.text("#link")), "online");
    }
    step("screenshot", b.screenshot(&dir.join("agent.png")));
    drop(b);
    println!(
        "dashboard test: {:.1} s, screenshots in {}",
        started.elapsed().as_secs_f64(),
        dir.display()
    );
}
