//! Any bytes on a channel: the control, heartbeat and status parsers return a value or an
//! error, never panic; a parsed status renders to a message that fits a channel and parses.
#![no_main]

use copilot_boinc::api::channel::MAX_TEXT;
use copilot_boinc::api::msg::{parse_control, parse_heartbeat, AppStatus};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = parse_control(&text);
    let _ = parse_heartbeat(&text);
    if let Ok(status) = AppStatus::parse(&text) {
        let m = status.to_message();
        assert!(m.len() <= MAX_TEXT);
        AppStatus::parse(&m).expect("a rendered status parses");
    }
});
