//! Any bytes as init_data.xml and as a job file: parsed or refused, never a panic.
#![no_main]

use copilot_boinc::api::init_data::InitData;
use copilot_boinc::job::JobFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(d) = InitData::parse(&text) {
        let (lo, hi) = d.fraction_range();
        assert!(lo <= hi);
    }
    let _ = JobFile::parse(&text);
});
