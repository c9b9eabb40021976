//! `ChirpError` and the server's negative result codes.

/// A negative result code of a Chirp server (chirp_protocol.h).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChirpCode {
    NotAuthenticated,
    NotAuthorized,
    DoesntExist,
    AlreadyExists,
    TooBig,
    NoSpace,
    NoMemory,
    InvalidRequest,
    TooManyOpen,
    Busy,
    TryAgain,
    BadFd,
    IsDir,
    NotDir,
    NotEmpty,
    CrossDeviceLink,
    Offline,
    TimedOut,
    Disconnected,
    GroupUnknown,
    NameTooLong,
    /// A code this client does not know.
    Other(i64),
}

impl ChirpCode {
    /// The code for a negative result, if it is one.
    pub fn from_result(n: i64) -> Option<ChirpCode> {
        use ChirpCode::*;
        Some(match n {
            0.. => return None,
            -1 => NotAuthenticated,
            -2 => NotAuthorized,
            -3 => DoesntExist,
            -4 => AlreadyExists,
            -5 => TooBig,
            -6 => NoSpace,
            -7 => NoMemory,
            -8 => InvalidRequest,
            -9 => TooManyOpen,
            -10 => Busy,
            -11 => TryAgain,
            -12 => BadFd,
            -13 => IsDir,
            -14 => NotDir,
            -15 => NotEmpty,
            -16 => CrossDeviceLink,
            -17 => Offline,
            -18 => TimedOut,
            -19 => Disconnected,
            -20 => GroupUnknown,
            -24 => NameTooLong,
            n => Other(n),
        })
    }

    /// Whether the same request may succeed later (the server is busy or overloaded).
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            ChirpCode::Busy
                | ChirpCode::TryAgain
                | ChirpCode::TimedOut
                | ChirpCode::Offline
                | ChirpCode::Disconnected
                | ChirpCode::TooManyOpen
                | ChirpCode::NoMemory
        )
    }
}

impl std::fmt::Display for ChirpCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = match self {
            ChirpCode::NotAuthenticated => "not authenticated",
            ChirpCode::NotAuthorized => "permission denied",
            ChirpCode::DoesntExist => "no such file or directory",
            ChirpCode::AlreadyExists => "already exists",
            ChirpCode::TooBig => "too big",
            ChirpCode::NoSpace => "no space left on the server",
            ChirpCode::NoMemory => "server out of memory",
            ChirpCode::InvalidRequest => "invalid request",
            ChirpCode::TooManyOpen => "too many open files",
            ChirpCode::Busy => "busy",
            ChirpCode::TryAgain => "try again",
            ChirpCode::BadFd => "bad file descriptor",
            ChirpCode::IsDir => "is a directory",
            ChirpCode::NotDir => "not a directory",
            ChirpCode::NotEmpty => "directory not empty",
            ChirpCode::CrossDeviceLink => "cross-device link",
            ChirpCode::Offline => "offline",
            ChirpCode::TimedOut => "timed out",
            ChirpCode::Disconnected => "disconnected",
            ChirpCode::GroupUnknown => "unknown group",
            ChirpCode::NameTooLong => "name too long",
            ChirpCode::Other(n) => return write!(f, "error code {n}"),
        };
        f.write_str(text)
    }
}

/// Why a Chirp operation failed. After anything but [`ChirpError::Server`] and
/// [`ChirpError::BadPath`] the connection is unusable (the client refuses further requests).
#[derive(Debug, thiserror::Error)]
pub enum ChirpError {
    #[error("cannot connect to chirp://{addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("chirp://{addr}: no authentication method was accepted (tried {tried})")]
    Auth { addr: String, tried: String },
    #[error("chirp {op} {path}: {code}")]
    Server {
        op: &'static str,
        path: String,
        code: ChirpCode,
    },
    #[error("chirp {op}: no answer within {secs} s")]
    Timeout { op: &'static str, secs: u64 },
    #[error("chirp {op}: the server closed the connection")]
    Disconnected { op: &'static str },
    #[error("chirp {op}: connection failed: {source}")]
    Io {
        op: &'static str,
        source: std::io::Error,
    },
    #[error("chirp {op}: unexpected answer: {detail}")]
    Protocol { op: &'static str, detail: String },
    #[error("chirp {op} {path}: {size} bytes is more than the limit of {limit}")]
    TooLarge {
        op: &'static str,
        path: String,
        size: u64,
        limit: u64,
    },
    #[error("chirp {op} {path}: the server has {got} bytes, {expected} were expected")]
    Short {
        op: &'static str,
        path: String,
        expected: u64,
        got: u64,
    },
    #[error("chirp {op} {path}: {reason}")]
    Local {
        op: &'static str,
        path: String,
        reason: String,
    },
    #[error("chirp path {path:?}: {reason}")]
    BadPath { path: String, reason: &'static str },
    #[error("this chirp connection broke earlier; connect again")]
    Broken,
    #[error("invalid chirp ticket: {0}")]
    Ticket(String),
}

impl ChirpError {
    /// Whether trying again (on a new connection) may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            ChirpError::Server { code, .. } => code.is_transient(),
            ChirpError::Connect { .. }
            | ChirpError::Timeout { .. }
            | ChirpError::Disconnected { .. }
            | ChirpError::Io { .. }
            | ChirpError::Broken
            | ChirpError::Short { .. } => true,
            ChirpError::Auth { .. }
            | ChirpError::BadPath { .. }
            | ChirpError::Protocol { .. }
            | ChirpError::TooLarge { .. }
            | ChirpError::Local { .. }
            | ChirpError::Ticket(_) => false,
        }
    }

    /// The server's code, if the server refused the request.
    pub fn code(&self) -> Option<ChirpCode> {
        match self {
            ChirpError::Server { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether the connection is still in step after this error (it happened between
    /// requests, not in the middle of one).
    pub(crate) fn leaves_connection_clean(&self) -> bool {
        matches!(self, ChirpError::Server { .. } | ChirpError::BadPath { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_and_explain() {
        assert_eq!(ChirpCode::from_result(0), None);
        assert_eq!(ChirpCode::from_result(12), None);
        assert_eq!(ChirpCode::from_result(-3), Some(ChirpCode::DoesntExist));
        assert_eq!(
            ChirpCode::from_result(-2).unwrap().to_string(),
            "permission denied"
        );
        assert_eq!(ChirpCode::from_result(-77), Some(ChirpCode::Other(-77)));
        assert!(ChirpCode::Busy.is_transient());
        assert!(!ChirpCode::NotAuthorized.is_transient());
        let e = ChirpError::Server {
            op: "getfile",
            path: "/x".into(),
            code: ChirpCode::DoesntExist,
        };
        assert_eq!(e.to_string(), "chirp getfile /x: no such file or directory");
        assert!(!e.is_transient() && e.leaves_connection_clean());
        let cut = ChirpError::Disconnected { op: "getfile" };
        assert!(cut.is_transient() && !cut.leaves_connection_clean());
    }
}
