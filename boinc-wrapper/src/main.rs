//! `copilot-boinc-wrapper`: not wired up yet; exits non-zero so no work unit is ever reported
//! done by a stub.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("copilot-boinc-wrapper: not implemented yet");
    ExitCode::FAILURE
}
