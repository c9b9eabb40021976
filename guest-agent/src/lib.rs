//! The copilot guest agent as a library: configuration, the check of each assignment's
//! signature (`trust`), and the execution of one job assignment (stage inputs, run the
//! payload, pack and upload outputs, report).
//!
//! The binary (`main.rs`) and the XMPP session drive it.

pub mod cache;
pub mod config;
pub mod executor;
pub mod sandbox;
pub mod session;
pub mod stage;
pub mod status;
pub mod transfer;
pub mod trust;

#[cfg(test)]
mod testutil;
