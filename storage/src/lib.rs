//! Where job data lives: storage adapters chosen by URL scheme. `chirp` is a client for the
//! Chirp file server of the Cooperative Computing Tools.

pub mod chirp;
