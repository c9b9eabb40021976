#![no_main]
//! The BOINC channel messages' check (copilot_boinc::fuzzing).
libfuzzer_sys::fuzz_target!(|data: &[u8]| copilot_boinc::fuzzing::boinc_message(data));
