//! An agent's session ends on its own: with `idle_timeout` set, an agent that gets no job for
//! that long goes offline and exits with status 0 (the VM image powers off on that status).

use std::time::{Duration, Instant};

use copilot_tests::{Harness, Setup};

#[test]
fn an_idle_agent_goes_offline_and_exits_with_status_0() {
    let mut h = Harness::start(Setup {
        agents: 0,
        agent_toml: Some("idle_timeout = \"2s\"\n".into()),
        ..Setup::default()
    });
    let work = h.path("idle-agent");
    std::fs::create_dir_all(&work).unwrap();
    let server = h.stack.prosody().server();
    let config = h
        .stack
        .register_agent("idle-1", &server, Some(&work))
        .unwrap();
    let mut agent = h.spawn_agent("idle-1", &config, &[]);
    let log = h.path("idle-1.log");

    h.wait_agent("idle-1", true, Duration::from_secs(30));
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = agent.exited().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the idle agent is still running");
        std::thread::sleep(Duration::from_millis(100));
    };
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(0), "{status}; log:\n{text}");
    assert!(text.contains("ending the session"), "{text}");
    h.wait_agent("idle-1", false, Duration::from_secs(30));
}
