//! The fuzz targets' regression tests: every input in `fuzz/corpus/<target>/` (the seeds and
//! what the fuzzer kept) and `fuzz/regressions/<target>/` (inputs of crashes it found, fixed
//! since) goes through the same check as the fuzz target, on every `scripts/test`. Run the
//! fuzzers themselves with scripts/fuzz.

use std::path::PathBuf;

fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut out = Vec::new();
    for kind in ["corpus", "regressions"] {
        let dir = root.join(kind).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_file() && path.file_name().is_some_and(|n| n != ".gitkeep") {
                let data = std::fs::read(&path).unwrap();
                out.push((path, data));
            }
        }
    }
    out.sort();
    out
}

fn replay(target: &str, check: fn(&[u8])) {
    let all = inputs(target);
    assert!(!all.is_empty(), "fuzz/corpus/{target} has no seeds");
    for (path, data) in &all {
        let caught = std::panic::catch_unwind(|| check(data));
        assert!(
            caught.is_ok(),
            "{} fails the {target} check",
            path.display()
        );
    }
    println!("{target}: {} inputs replayed", all.len());
}

#[test]
fn fuzz_wire_payload_inputs_pass() {
    replay("wire_payload", copilot_protocol::fuzzing::wire_payload);
}

#[test]
fn fuzz_job_file_inputs_pass() {
    replay("job_file", copilot_protocol::fuzzing::job_file);
}

#[test]
fn fuzz_unpack_inputs_pass() {
    replay("unpack", copilot_archive::fuzzing::unpack_archive);
}

#[test]
fn fuzz_http_request_inputs_pass() {
    replay("http_request", copilot_manager::fuzzing::http_request);
}
