#![no_main]
//! The job_file check of copilot_protocol::fuzzing.
libfuzzer_sys::fuzz_target!(|data: &[u8]| copilot_protocol::fuzzing::job_file(data));
