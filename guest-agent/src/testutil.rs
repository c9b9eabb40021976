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
