//! XMPP transport for copilot.
//!
//! [`Connection`] runs one tokio-xmpp client on a dedicated thread with a `current_thread`
//! runtime (tokio-xmpp 6 stalls on a multi-threaded runtime) and talks to the rest of the program
//! over channels, so callers may use any runtime. It tracks IQ requests itself, answers are
//! routed back to the caller that asked, and incoming requests, messages and presence come out as
//! [`Incoming`] events. [`connector`] requires STARTTLS with a pinned project CA (or, only when
//! the config says `insecure_loopback`, plaintext to loopback), sets TCP_NODELAY (tokio-xmpp does
//! not, which costs ~40 ms per stanza) and guards reads against hostile XML nesting ([`depth`]). [`LogLimiter`] keeps
//! a peer from flooding the log.

mod connection;
pub mod connector;
pub mod depth;
mod ratelimit;

pub use connection::{Connection, Incoming, IqKind, Sender, XmppConfig, XmppError};
pub use connector::{project_ca, Security, TlsTrust, TrustError};
pub use ratelimit::LogLimiter;

/// Re-exported so users of this crate build elements with the same minidom.
pub use minidom::Element;
