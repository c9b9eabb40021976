//! The BOINC application API, in Rust: what `libboinc_api` gives a C++ application, for a
//! wrapper that talks to the client itself.
//!
//! - [`shm`]: the shared segment (mmap'ed file or System V), behind a trait;
//! - [`channel`]: its 8 channels and their pending-flag discipline;
//! - [`msg`]: control messages, heartbeats and the app status report;
//! - [`init_data`]: reading `init_data.xml`;
//! - [`files`]: soft links, `boinc_finish_called`, `boinc_temporary_exit`;
//! - [`exit`]: the exit codes the client understands;
//! - [`client`]: [`client::Client`], which puts them together: poll, report, notice when the
//!   client is gone.

pub mod channel;
pub mod client;
pub mod exit;
pub mod files;
pub mod init_data;
pub mod msg;
pub mod shm;
