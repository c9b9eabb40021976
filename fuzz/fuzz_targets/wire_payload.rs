#![no_main]
//! The wire_payload check of copilot_protocol::fuzzing.
libfuzzer_sys::fuzz_target!(|data: &[u8]| copilot_protocol::fuzzing::wire_payload(data));
