//! Shared types of copilot: job files, job states, the XMPP wire payloads, the manager's JSON
//! API and its aggregated views, histograms returned by jobs, dashboard login codes, and the
//! signing of assignments. This crate does no I/O; every parser in it is strict, bounded and never panics on input.

pub mod api;
pub mod digest;
pub mod fuzzing;
pub mod histogram;
pub mod identity;
pub mod job;
pub mod login;
pub mod sandbox;
pub mod signing;
pub mod state;
pub mod summary;
pub mod units;
pub mod wire;

pub use digest::Sha256;
pub use job::{JobFile, JobSpec, Limits};
pub use state::JobState;

/// A job's identifier: the manager's queue row id, shown to people as a plain number.
pub type JobId = u64;
