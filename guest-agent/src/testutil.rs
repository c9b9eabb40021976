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

/// Unpacks a tar.gz into path → content.
pub fn unpack(bytes: &[u8]) -> std::collections::BTreeMap<String, Vec<u8>> {
    use std::io::Read;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(bytes));
    let mut out = std::collections::BTreeMap::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().to_string_lossy().into_owned();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        assert!(out.insert(path, data).is_none(), "duplicate entry");
    }
    out
}
