//! copilot's output archives: the agent packs a job's declared outputs and logs into a
//! deterministic tar.gz, hashing every file ([`pack`]); the CLI unpacks a downloaded archive,
//! refusing anything but plain files and directories at relative paths ([`unpack`]).

pub mod fuzzing;
pub mod pack;
pub mod unpack;

#[cfg(any(test, feature = "testutil"))]
pub mod testutil {
    //! Test support: an archive's entries in memory.

    /// Unpacks a tar.gz into path → content (no safety checks: for archives tests made).
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
}
