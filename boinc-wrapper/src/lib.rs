//! copilot's BOINC wrapper as a library: the BOINC application API in Rust ([`api`]), the job
//! file ([`job`]), the agent's per-session config ([`agent_config`]), the volunteer's identity
//! ([`volunteer`]), where the agent runs ([`backend`]) and the main loop ([`session`]);
//! [`fuzzing`] holds the parsers' promises for the fuzz targets. The
//! `copilot-boinc-wrapper` binary (`main.rs`) puts them together. docs/BOINC.md describes it
//! for project admins and volunteers.

pub mod agent_config;
pub mod api;
pub mod backend;
pub mod fuzzing;
pub mod job;
pub mod proctree;
pub mod session;
pub mod volunteer;
