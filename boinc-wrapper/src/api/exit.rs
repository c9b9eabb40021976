//! BOINC's exit codes for applications (`lib/error_numbers.h`): what the client reads from an
//! application's exit status. [`ExitCode`] names the ones this crate uses; the numbers are
//! fixed by the client and must never change.

/// An application exit status with a meaning to the BOINC client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitCode {
    /// Success (after `boinc_finish_called`), or a quit/temporary exit the client asked for.
    Success = 0,
    /// The state file could not be written.
    StatefileWrite = 192,
    /// Killed by a signal.
    Signal = 193,
    /// The client sent `<abort/>`.
    AbortedByClient = 194,
    /// A child process (here: the agent or the VM) failed.
    ChildFailed = 195,
    DiskLimitExceeded = 196,
    TimeLimitExceeded = 197,
    MemLimitExceeded = 198,
    /// The client is exiting.
    ClientExiting = 199,
    UnstartedLate = 200,
    MissingCoproc = 201,
    AbortedByProject = 202,
    AbortedViaGui = 203,
    Unknown = 204,
    OutOfMemory = 205,
    /// The application could not initialise (bad init_data.xml, job file, shared memory).
    InitFailure = 206,
    NoSubTasks = 207,
    SubTaskFailure = 208,
    OverdueExceeded = 209,
}

impl ExitCode {
    /// The number the process exits with.
    pub fn code(self) -> u8 {
        self as u8
    }
}

impl From<ExitCode> for std::process::ExitCode {
    fn from(c: ExitCode) -> Self {
        std::process::ExitCode::from(c.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_match_the_client() {
        assert_eq!(ExitCode::Success.code(), 0);
        assert_eq!(ExitCode::AbortedByClient.code(), 194);
        assert_eq!(ExitCode::ChildFailed.code(), 195);
        assert_eq!(ExitCode::ClientExiting.code(), 199);
        assert_eq!(ExitCode::InitFailure.code(), 206);
        assert_eq!(ExitCode::OverdueExceeded.code(), 209);
    }
}
