#![no_main]
//! The init_data.xml and job file check (copilot_boinc::fuzzing).
libfuzzer_sys::fuzz_target!(|data: &[u8]| copilot_boinc::fuzzing::boinc_init_data(data));
