//! `free_port()`: a TCP port on 127.0.0.1 that nobody listens on, below the ephemeral range.

use std::collections::HashSet;
use std::net::{Ipv4Addr, TcpListener};
use std::sync::Mutex;

use rand::Rng;

use crate::StackError;

/// Lowest port handed out.
const LOW: u16 = 20_000;
/// Highest port handed out: the ephemeral range starts at 32768, and a listening port there may
/// collide with a client socket (or its TIME_WAIT) and block a restart.
const HIGH: u16 = 32_000;

/// Ports already handed out by this process, so two stacks in one test binary never share one.
static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A port in 20000..=32000 on 127.0.0.1 that could be bound just now and was not handed out
/// before by this process. Another process may still take it before the caller binds it.
pub fn free_port() -> Result<u16, StackError> {
    // A poisoned lock only means another thread panicked while inserting: the set is still usable.
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let given = given.get_or_insert_with(HashSet::new);
    let span = u32::from(HIGH - LOW) + 1;
    let start = rand::thread_rng().gen_range(0..span);
    for i in 0..span {
        // (start + i) % span < span <= u16::MAX - LOW, so the sum fits a u16.
        let port = LOW + ((start + i) % span) as u16;
        if given.contains(&port) {
            continue;
        }
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            given.insert(port);
            return Ok(port);
        }
    }
    Err(StackError::NoFreePort {
        low: LOW,
        high: HIGH,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_bindable_and_below_the_ephemeral_range() {
        let a = free_port().unwrap();
        let b = free_port().unwrap();
        assert_ne!(a, b);
        for p in [a, b] {
            assert!((LOW..=HIGH).contains(&p));
            TcpListener::bind((Ipv4Addr::LOCALHOST, p)).unwrap();
        }
    }
}
