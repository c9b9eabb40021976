#![no_main]
//! The unpacker's check (copilot_archive::fuzzing).
libfuzzer_sys::fuzz_target!(|data: &[u8]| copilot_archive::fuzzing::unpack_archive(data));
