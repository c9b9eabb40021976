//! Test support shared by the agent's unit tests.

/// Transfer settings for tests: two retries, 1 MiB input limit.
pub fn settings() -> crate::config::TransferSettings {
    crate::config::TransferSettings {
        timeout: copilot_protocol::units::Seconds(30),
        retries: 2,
        max_input_size: copilot_protocol::units::Bytes(1 << 20),
        cache_size: copilot_protocol::units::Bytes(1 << 20),
    }
}

/// The smallest valid agent config: an account on a loopback server, unsigned work.
pub(crate) const CONFIG: &str = "[xmpp]\njid = \"a@localhost\"\npassword = \"pw\"\n\
                                 insecure_loopback = true\n[trust]\ninsecure_unsigned_jobs = true\n";

/// An unsigned assignment of `job` (attempt 1) that runs `true`, with nothing to stage and an
/// upload URL nobody listens on (port 9).
pub(crate) fn assignment(
    job: copilot_protocol::JobId,
    name: &str,
) -> copilot_protocol::wire::Assignment {
    copilot_protocol::wire::Assignment {
        job,
        attempt: 1,
        lease_secs: 60,
        name: name.into(),
        command: vec!["true".into()],
        env: Default::default(),
        inputs: vec![],
        outputs: vec![],
        limits: Default::default(),
        network: true,
        upload_url: format!("http://127.0.0.1:9/outputs/{job}/1"),
        upload_token: "t".into(),
        seal: None,
    }
}
