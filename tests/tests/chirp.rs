//! End to end with Chirp storage: a job whose input lives on a real `chirp_server` and whose
//! outputs go to it (through a per-attempt ticket), over real Prosody, manager and agent
//! processes. The agents' own address may only read there: only the ticket lets them write.

use std::time::Duration;

use copilot_protocol::{JobState, Sha256};
use copilot_stack::ChirpServer;
use copilot_storage::chirp::{Auth, ChirpClient};
use copilot_tests::{Harness, Setup};

#[test]
fn chirp_inputs_and_outputs_flow_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let acl = format!(
        "unix:{} rwlda\naddress:127.0.0.1 rl\n",
        copilot_stack::unix_user()
    );
    let Some(server) = ChirpServer::start_or_skip(dir.path(), &acl) else {
        return;
    };
    let words = "pear\napple\nfig\n";
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = ChirpClient::connect(&server.address(), &[Auth::Unix], Duration::from_secs(10))
            .await
            .unwrap();
        c.mkdir_all("/data/set 1", 0o755).await.unwrap();
        c.putfile_atomic(
            "/data/set 1/words.txt",
            0o644,
            words.len() as u64,
            &mut words.as_bytes(),
            &mut |_: &[u8]| {},
        )
        .await
        .unwrap();
    });

    let h = Harness::start(Setup {
        agents: 1,
        manager_toml: Some(format!(
            "[outputs]\nchirp = \"chirp://{}/copilot/outputs\"\nchirp_auth = [\"unix\"]\n",
            server.address()
        )),
        ..Setup::default()
    });
    let job = h.write_job(
        "sort",
        &format!(
            r#"
name = "sort"
command = ["sh", "-c", "sort words.txt > sorted.txt"]
outputs = ["sorted.txt"]

[[inputs]]
url = "chirp://{}/data/set%201/words.txt"
sha256 = "{}"
"#,
            server.address(),
            Sha256::of(words.as_bytes())
        ),
        &[],
    );
    let ids = h.submit(&job);
    let done = h.wait_final(&ids, Duration::from_secs(90));
    let j = &done[0];
    assert_eq!(j.state, JobState::Done, "{:?} {:?}", j.outcome, j.note);
    assert_eq!(j.attempt, 1, "{:?}", j.note);
    let at = j.archive_url.as_deref().expect("the archive is in Chirp");
    assert!(
        at.starts_with(&format!("chirp://{}/copilot/outputs/up-", server.address())),
        "{at}"
    );
    // The results come through the manager, digests checked by the CLI.
    let out = h.results(j.id);
    assert_eq!(
        std::fs::read_to_string(out.join("sorted.txt")).unwrap(),
        "apple\nfig\npear\n"
    );
    // And the archive really lives on the Chirp server.
    let on_disk = server.root().join(
        at.split("/copilot/")
            .nth(1)
            .map(|p| format!("copilot/{p}"))
            .unwrap(),
    );
    let size = std::fs::metadata(&on_disk).unwrap().len();
    assert_eq!(Some(size), j.archive.map(|a| a.size));
}
