//! End to end over a real Prosody: jobs submitted with the `copilot` CLI run on real agent
//! processes, and their outputs come back verified; killed agents and a restarted manager lose
//! nothing and record nothing twice.

use std::time::Duration;

use copilot_protocol::api::JobView;
use copilot_protocol::sandbox::Protection;
use copilot_protocol::units::Seconds;
use copilot_protocol::JobState;
use copilot_stack::LocalStack;
use copilot_tests::squares::{check_square, squares, SQUARE_SH};
use copilot_tests::{Harness, Setup};

fn agent_index(stack: &LocalStack, name: &str) -> usize {
    (1..=stack.agent_count())
        .find(|n| LocalStack::agent_name(*n) == name)
        .unwrap_or_else(|| panic!("no agent named {name}"))
}

#[test]
fn thirty_jobs_on_three_agents_all_come_back_verified() {
    let h = Harness::start(Setup {
        agents: 3,
        ..Setup::default()
    });
    let job = h.write_job("squares", &squares(30, "0"), &[("square.sh", SQUARE_SH)]);
    let ids = h.submit(&job);
    assert_eq!(ids.len(), 30);
    let jobs = h.wait_final(&ids, Duration::from_secs(120));
    for j in &jobs {
        assert_eq!(j.attempt, 1, "job {} needed a retry: {:?}", j.id, j.note);
        check_square(&h, j);
    }
    let agents: copilot_protocol::api::AgentList = h.api("/api/agents");
    assert_eq!(agents.agents.iter().filter(|a| a.online).count(), 3);
    let done: u64 = agents.agents.iter().map(|a| a.jobs_done).sum();
    assert_eq!(done, 30, "{agents:?}");

    // Each job and each agent carry the sandbox report: as root a uid of the job's own.
    let root = nix::unistd::geteuid().is_root();
    for j in &jobs {
        let s = j
            .sandbox
            .as_ref()
            .expect("a job that ran has a sandbox report");
        assert_eq!(
            s.active.contains(&Protection::Uid),
            root,
            "job {}: {s:?}",
            j.id
        );
    }
    let table = h.cli_ok(&["agents"]);
    assert!(table.contains("SANDBOX"), "{table}");
    for a in &agents.agents {
        let s = a
            .sandbox
            .as_ref()
            .expect("an agent that ran jobs has a report");
        assert_eq!(s.missing.contains(&Protection::Uid), !root, "{a:?}");
        // What this host lacks, as `copilot agents` shows it.
        let lacks: Vec<&str> = s.missing.iter().map(|p| p.as_str()).collect();
        let cell = if lacks.is_empty() {
            "full".to_owned()
        } else {
            format!("missing {}", lacks.join(","))
        };
        assert!(table.contains(&cell), "{cell:?} not in\n{table}");
    }
}

#[test]
fn a_killed_agents_job_is_requeued_and_done_once_by_another() {
    let mut h = Harness::start(Setup {
        agents: 2,
        ..Setup::default()
    });
    let job = h.write_job("slow", &squares(1, "3"), &[("square.sh", SQUARE_SH)]);
    let ids = h.submit(&job);
    let running = h.wait_for("the job to run", Duration::from_secs(30), |l| {
        l.jobs
            .iter()
            .any(|j| j.id == ids[0] && j.state == JobState::Running)
    });
    let victim = running.jobs[0]
        .agent
        .clone()
        .expect("a running job has an agent");
    let n = agent_index(&h.stack, &victim);
    h.stack.kill_agent(n).unwrap();

    let jobs = h.wait_final(&ids, Duration::from_secs(60));
    let j = &jobs[0];
    assert_eq!(j.attempt, 2, "{j:?}");
    assert_ne!(j.agent.as_deref(), Some(victim.as_str()));
    check_square(&h, j);
    // Recorded once: one archive, one copy of each file.
    let squares = j.files.iter().filter(|f| f.path == "square.txt").count();
    assert_eq!(squares, 1);
    let agents: copilot_protocol::api::AgentList = h.api("/api/agents");
    let total: u64 = agents.agents.iter().map(|a| a.jobs_done).sum();
    assert_eq!(total, 1, "{agents:?}");
    let dead = agents.agents.iter().find(|a| a.name == victim).unwrap();
    assert!(!dead.online && dead.jobs_done == 0, "{dead:?}");
}

/// Run `count` square jobs on two agents; once `done_before` are done, `interrupt` the stack;
/// return the harness and the jobs once all are final.
fn interrupted_batch(
    count: u32,
    done_before: usize,
    interrupt: impl FnOnce(&mut Harness),
) -> (Harness, Vec<JobView>) {
    let mut h = Harness::start(Setup {
        agents: 2,
        lease: Seconds(10),
        manager_toml: Some("[jobs]\nhold = \"5s\"\n".into()),
        ..Setup::default()
    });
    let job = h.write_job("batch", &squares(count, "0.2"), &[("square.sh", SQUARE_SH)]);
    let ids = h.submit(&job);
    h.wait_for("a few jobs to finish", Duration::from_secs(60), |l| {
        l.jobs.iter().filter(|j| j.state == JobState::Done).count() >= done_before
    });
    interrupt(&mut h);
    let jobs = h.wait_final(&ids, Duration::from_secs(180));
    assert_eq!(jobs.len(), count as usize);
    (h, jobs)
}

#[test]
fn restarting_the_manager_mid_batch_loses_nothing() {
    let (h, jobs) = interrupted_batch(20, 4, |h| h.stack.restart_manager().unwrap());
    for j in &jobs {
        // A job in flight during the restart may have needed a second attempt, no more.
        assert!(j.attempt <= 2, "job {} took {} attempts", j.id, j.attempt);
        check_square(&h, j);
    }
}

#[test]
fn restarting_the_xmpp_server_mid_batch_loses_nothing() {
    let (h, jobs) = interrupted_batch(12, 3, |h| h.stack.prosody().restart().unwrap());
    // A stopping server tells the manager that every agent went offline, so the jobs they held
    // are requeued (their late reports are refused as stale): attempts may be spent, but every
    // job ends done, verified, with one archive.
    for j in &jobs {
        check_square(&h, j);
        let squares = j.files.iter().filter(|f| f.path == "square.txt").count();
        assert_eq!(squares, 1, "job {}", j.id);
    }
}

#[test]
fn an_agent_with_two_slots_runs_two_jobs_at_once() {
    let h = Harness::start(Setup {
        agents: 1,
        agent_toml: Some("slots = 2\n".into()),
        ..Setup::default()
    });
    // Each instance leaves a marker and waits (20 s at most) until it sees two: with one slot
    // the first would see only itself.
    // The jobs run under their own uids (when the agent is root): the marker dir must be
    // reachable and writable for them.
    let markers = h.path("markers");
    std::fs::create_dir(&markers).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(h.path(""), std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(&markers, std::fs::Permissions::from_mode(0o777)).unwrap();
    let job = format!(
        r#"
name = "pair"
command = ["sh", "pair.sh"]
outputs = ["seen.txt"]
count = 2
env = {{ MARKERS = "{}" }}

[[inputs]]
path = "pair.sh"
"#,
        markers.display()
    );
    let script = "touch \"$MARKERS/$COPILOT_INSTANCE\"\ni=0\n\
        while [ $i -lt 200 ]; do\n\
          n=$(ls \"$MARKERS\" | wc -l)\n\
          [ \"$n\" -ge 2 ] && break\n\
          sleep 0.1; i=$((i + 1))\n\
        done\n\
        echo $n > seen.txt\n";
    let file = h.write_job("pair", &job, &[("pair.sh", script)]);
    let ids = h.submit(&file);
    let jobs = h.wait_final(&ids, Duration::from_secs(60));
    for j in &jobs {
        assert_eq!(j.state, JobState::Done, "{j:?}");
        assert_eq!(j.agent.as_deref(), Some("agent-1"));
        let seen = std::fs::read_to_string(h.results(j.id).join("seen.txt")).unwrap();
        assert_eq!(seen.trim(), "2", "job {} ran alone", j.id);
    }
}

/// Arguments and environment values with newlines and tabs reach the payload byte for byte
/// through the real XMPP server (which would turn them into spaces in attribute values).
#[test]
fn arguments_and_environment_arrive_byte_for_byte() {
    let h = Harness::start(Setup::default());
    let job = h.write_job(
        "echo",
        r#"
name = "echo"
command = ["sh", "-c", "printf '%s|%s' \"$MULTI\" \"$1\" > out.txt", "sh", "arg\nline\ttab"]
outputs = ["out.txt"]

[env]
MULTI = "env\nline\ttab  two spaces"
"#,
        &[],
    );
    let ids = h.submit(&job);
    let j = &h.wait_final(&ids, Duration::from_secs(60))[0];
    assert_eq!(j.state, JobState::Done, "{:?}", j.outcome);
    let out = h.results(j.id);
    assert_eq!(
        std::fs::read_to_string(out.join("out.txt")).unwrap(),
        "env\nline\ttab  two spaces|arg\nline\ttab"
    );
}

#[test]
fn jobs_flow_over_https_with_the_project_ca() {
    let h = Harness::start(Setup {
        agents: 2,
        https: true,
        ..Setup::default()
    });
    assert!(h.stack.manager_url().starts_with("https://"));
    let job = h.write_job("secure", &squares(4, "0"), &[("square.sh", SQUARE_SH)]);
    // The CLI uploads the input and submits over HTTPS (the stack's client file names the CA).
    let ids = h.submit(&job);
    let jobs = h.wait_final(&ids, Duration::from_secs(120));
    // Agents were told the https:// URL, so they fetched the input and uploaded the archive
    // over HTTPS, trusting the CA they pin for XMPP; the CLI fetches and verifies the results
    // the same way.
    let manager: toml::Table = std::fs::read_to_string(h.stack.dir().join("manager.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let public = manager["http"]["public_url"].as_str().unwrap();
    assert!(public.starts_with("https://"), "{public}");
    for j in &jobs {
        check_square(&h, j);
    }
    // Plain HTTP to the same port gets no HTTP answer.
    let addr = h
        .stack
        .manager_url()
        .trim_start_matches("https://")
        .to_owned();
    let mut tcp = std::net::TcpStream::connect(&addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    std::io::Write::write_all(&mut tcp, b"GET /api/jobs HTTP/1.0\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    let _ = std::io::Read::read_to_end(&mut tcp, &mut answer);
    assert!(
        !answer.starts_with(b"HTTP/"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
}

#[test]
fn replicated_jobs_run_on_distinct_agents_and_only_agreeing_outputs_count() {
    let h = Harness::start(Setup {
        agents: 3,
        ..Setup::default()
    });
    // The same answer from every replica, and a different one from each.
    let agree = h.write_job(
        "agree",
        "name = \"agree\"\ncommand = [\"sh\", \"-c\", \"echo 42 > answer.txt\"]\n\
         outputs = [\"answer.txt\"]\nreplicas = 2\nquorum = 2\n",
        &[],
    );
    let differ = h.write_job(
        "differ",
        "name = \"differ\"\ncommand = [\"sh\", \"-c\", \"head -c 16 /dev/urandom > answer.txt\"]\n\
         outputs = [\"answer.txt\"]\nreplicas = 2\n",
        &[],
    );
    let agreeing = h.submit(&agree);
    let differing = h.submit(&differ);
    assert_eq!(
        (agreeing.len(), differing.len()),
        (2, 2),
        "a job per replica"
    );
    let all: Vec<_> = agreeing.iter().chain(&differing).copied().collect();
    let jobs = h.wait_final(&all, Duration::from_secs(120));
    let of =
        |ids: &[u64]| -> Vec<&JobView> { jobs.iter().filter(|j| ids.contains(&j.id)).collect() };
    for group in [of(&agreeing), of(&differing)] {
        assert!(group.iter().all(|j| j.state == JobState::Done), "{group:?}");
        assert_ne!(
            group[0].agent, group[1].agent,
            "replicas on one agent: {group:?}"
        );
    }
    let validation = |j: &JobView| j.replica.as_ref().expect("a replica view").validation;
    use copilot_protocol::api::Validation;
    assert!(of(&agreeing)
        .iter()
        .all(|j| validation(j) == Validation::Valid));
    assert!(of(&differing)
        .iter()
        .all(|j| validation(j) == Validation::NoQuorum));
    // `copilot status` says so.
    let table = h.cli_ok(&["status"]);
    assert!(
        table.contains(&format!("replica of {}: valid", agreeing[0])),
        "{table}"
    );
    assert!(
        table.contains(&format!("replica of {}: no-quorum", differing[0])),
        "{table}"
    );
}

/// A validator for answers that are numbers: they agree when they differ by less than 0.01.
const CLOSE_VALIDATOR: &str = "awk 'NR == FNR { a = $1; next } \
    { d = a - $1; if (d < 0) d = -d; print \"difference\", d; exit !(d < 0.01) }' \
    \"$1/answer.txt\" \"$2/answer.txt\"";

#[test]
fn replicas_go_to_different_volunteers_and_a_validator_judges_unequal_outputs() {
    let mut h = Harness::start(Setup {
        agents: 0,
        manager_toml: Some(format!(
            "[validators.close]\ncommand = [\"sh\", \"-c\", {CLOSE_VALIDATOR:?}, \"close\"]\n"
        )),
        ..Setup::default()
    });
    // Two agents of BOINC user 7, one of user 8: every pair of replicas needs user 8's.
    let server = h.stack.prosody().server();
    let agents: Vec<(String, copilot_stack::Supervised)> =
        [("vol7-a", 7), ("vol7-b", 7), ("vol8", 8)]
            .into_iter()
            .map(|(name, user)| {
                let work = h.path(name);
                std::fs::create_dir_all(&work).unwrap();
                let config = h.stack.register_agent(name, &server, Some(&work)).unwrap();
                let config =
                    format!("{config}\n[volunteer]\nuser_id = {user}\nhost_id = {user}0\n");
                (name.to_owned(), h.spawn_agent(name, &config, &[]))
            })
            .collect();
    for (name, _) in &agents {
        h.wait_agent(name, true, Duration::from_secs(30));
    }
    let user = |agent: &str| if agent == "vol8" { 8 } else { 7 };

    // Answers that differ in their last digits, and answers far apart.
    let close = h.write_job(
        "close",
        "name = \"close\"\ncount = 2\nreplicas = 2\nvalidator = \"close\"\noutputs = [\"answer.txt\"]\n\
         command = [\"sh\", \"-c\", \"printf '0.50%s\\\\n' $(od -An -N4 -tu4 /dev/urandom | tr -d ' ') > answer.txt\"]\n",
        &[],
    );
    let far = h.write_job(
        "far",
        "name = \"far\"\nreplicas = 2\nvalidator = \"close\"\noutputs = [\"answer.txt\"]\n\
         command = [\"sh\", \"-c\", \"od -An -N8 -tu8 /dev/urandom | tr -d ' ' > answer.txt\"]\n",
        &[],
    );
    let close_ids = h.submit(&close);
    let far_ids = h.submit(&far);
    assert_eq!(
        (close_ids.len(), far_ids.len()),
        (4, 2),
        "a job per replica"
    );
    let all: Vec<u64> = close_ids.iter().chain(&far_ids).copied().collect();
    h.wait_final(&all, Duration::from_secs(120));
    use copilot_protocol::api::Validation;
    // The validator runs once both replicas are done: wait for its verdicts.
    let list = h.wait_for("the validator's verdicts", Duration::from_secs(60), |l| {
        l.jobs.iter().filter(|j| all.contains(&j.id)).all(|j| {
            j.replica
                .as_ref()
                .is_some_and(|r| r.validation != Validation::Pending)
        })
    });
    let jobs: Vec<&JobView> = list.jobs.iter().filter(|j| all.contains(&j.id)).collect();
    let mut groups: std::collections::BTreeMap<u64, Vec<&JobView>> = Default::default();
    for j in &jobs {
        assert_eq!(j.state, JobState::Done, "{j:?}");
        groups
            .entry(j.replica.as_ref().unwrap().group)
            .or_default()
            .push(j);
    }
    assert_eq!(groups.len(), 3);
    for (group, replicas) in &groups {
        let users: Vec<u64> = replicas
            .iter()
            .map(|j| user(j.agent.as_deref().unwrap()))
            .collect();
        assert_eq!(users.len(), 2);
        assert_ne!(
            users[0], users[1],
            "group {group}: both replicas on one volunteer's agents"
        );
        let expected = if far_ids.contains(group) {
            Validation::NoQuorum
        } else {
            Validation::Valid
        };
        for j in replicas {
            assert_eq!(j.replica.as_ref().unwrap().validation, expected, "{j:?}");
        }
    }
    // A far replica's view says what the validator said.
    let far = h.job(far_ids[0]);
    let said = &far.replica.as_ref().unwrap().verdicts;
    assert_eq!(said.len(), 1, "{far:?}");
    assert_eq!((said[0].other, said[0].same), (far_ids[1], false));
    assert!(said[0].detail.starts_with("difference "), "{said:?}");
    let metrics = h.metrics_text();
    let verdicts: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("copilot_validator_verdicts_total "))
        .and_then(|v| v.parse().ok())
        .expect("the verdict counter");
    assert!(
        verdicts >= 1.0,
        "the far replicas differ: the validator was asked\n{metrics}"
    );
    assert!(
        metrics.contains("copilot_validator_failures_total 0"),
        "{metrics}"
    );

    // A job may only name a validator the manager has.
    let unknown = h.write_job(
        "unknown",
        "command = [\"true\"]\nreplicas = 2\nvalidator = \"nearly\"\n",
        &[],
    );
    let out = h.cli(&["submit", unknown.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        text.contains("validator \"nearly\" is not one of this manager's [validators] (close)"),
        "{text}"
    );
}
