//! copilot's output archives: the agent packs a job's declared outputs and logs into a
//! deterministic tar.gz, hashing every file ([`pack`]); the CLI unpacks a downloaded archive,
//! refusing anything but plain files and directories at relative paths ([`unpack`]); the
//! manager reads stored archives for its dashboard without unpacking them ([`read`]).

pub mod fuzzing;
pub mod pack;
pub mod read;
pub mod unpack;

#[cfg(any(test, feature = "testutil"))]
pub mod testutil {
    //! Test support: an archive's entries in memory.

    /// A tar.gz with these files, after a `_copilot/` directory entry (readers skip those).
    pub fn targz(files: &[(&str, &[u8])]) -> Vec<u8> {
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let mut tar = tar::Builder::new(gz);
        let mut dir = tar::Header::new_gnu();
        dir.set_entry_type(tar::EntryType::Directory);
        dir.set_size(0);
        dir.set_mode(0o755);
        tar.append_data(&mut dir, "_copilot/", std::io::empty())
            .unwrap();
        for (path, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            tar.append_data(&mut h, path, *data).unwrap();
        }
        tar.into_inner().unwrap().finish().unwrap()
    }

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
