//! copilot's BOINC wrapper as a library: the BOINC application API in Rust ([`api`]) and the
//! view of the wrapper's process tree it needs ([`proctree`]).

pub mod api;
pub mod proctree;
