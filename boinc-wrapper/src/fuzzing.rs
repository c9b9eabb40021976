//! The wrapper's parsers' promises, for the fuzz targets (fuzz/) and their regression tests:
//! whatever the bytes, each parser returns a value or an error and never panics, and what it
//! accepts holds together. A panic here is a broken promise.

use crate::api::channel::MAX_TEXT;
use crate::api::init_data::InitData;
use crate::api::msg::{parse_control, parse_heartbeat, AppStatus};
use crate::job::JobFile;

/// Bytes as a message on a channel: control and heartbeat messages parse or are refused; a
/// status that parses renders to a message that fits a channel and parses back to itself.
pub fn boinc_message(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = parse_control(&text);
    let _ = parse_heartbeat(&text);
    if let Ok(status) = AppStatus::parse(&text) {
        let m = status.to_message();
        assert!(
            m.len() <= MAX_TEXT,
            "a rendered status does not fit a channel"
        );
        let back = AppStatus::parse(&m).expect("a rendered status parses");
        assert_eq!(back.to_message(), m, "a status changes on its way back");
    }
}

/// Bytes as init_data.xml and as a job file: parsed or refused; accepted init data has a sane
/// fraction range and client pid.
pub fn boinc_init_data(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(d) = InitData::parse(&text) {
        let (lo, hi) = d.fraction_range();
        assert!(
            (0.0..=1.0).contains(&lo) && lo <= hi && hi <= 1.0,
            "fraction range {lo}..{hi}"
        );
        assert!(d.client_pid().is_none_or(|p| p > 0));
    }
    if let Ok(job) = JobFile::parse(&text) {
        assert!(
            job.drain < job.session,
            "drain {} not below session {}",
            job.drain,
            job.session
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_pass() {
        boinc_message(b"<heartbeat/><wss>1e6</wss><network_suspended/>");
        boinc_message(
            b"<current_cpu_time>1.5e0</current_cpu_time><fraction_done>2</fraction_done>",
        );
        boinc_message(&[0xff, b'<', 0]);
        boinc_init_data(b"<app_init_data><hostid>1</hostid></app_init_data>");
        boinc_init_data(b"<copilot_job><session>1h</session></copilot_job>");
        boinc_init_data(b"\xff\xfe<");
    }
}
