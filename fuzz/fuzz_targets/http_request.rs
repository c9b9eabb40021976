#![no_main]
//! The manager's HTTP service check (copilot_manager::fuzzing).
libfuzzer_sys::fuzz_target!(|data: &[u8]| copilot_manager::fuzzing::http_request(data));
