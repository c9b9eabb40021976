//! `copilot-boinc-wrapper`: the BOINC application that will run copilot sessions under a
//! volunteer's BOINC client (BOINC app API over shared memory, init_data.xml, suspend/resume/quit
//! mapped to the agent or its VM). Not built yet: it has its own issue. Until then it refuses to
//! run and exits non-zero, so no work unit is ever reported as done by a stub.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "copilot-boinc-wrapper {}: not implemented yet; run copilot-agent directly",
        env!("CARGO_PKG_VERSION")
    );
    ExitCode::FAILURE
}
