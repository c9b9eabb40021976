//! The 8 message channels in the shared segment and their pending-flag discipline
//! (`MSG_CHANNEL` in the client's `lib/app_ipc.cpp`).
//!
//! Byte 0 of a channel is the pending flag, the text starts at byte 1 and is NUL-terminated
//! within the channel. The sender writes only into a channel whose flag is clear, text first
//! and the flag last; the receiver copies the text out and then clears the flag. So at most one
//! message waits per channel, and a sender whose message was not read yet tries again later.

use std::sync::atomic::{AtomicU8, Ordering};

use super::shm::{Segment, CHANNEL_SIZE};

/// Longest message text: the channel less the flag and the terminating NUL.
pub const MAX_TEXT: usize = CHANNEL_SIZE - 2;

/// A channel, in segment order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Channel {
    /// Client → app: `<quit/>`, `<suspend/>`, `<resume/>`, `<abort/>`, …
    ProcessControlRequest = 0,
    /// App → client (unused by current clients).
    ProcessControlReply = 1,
    /// Client → app: graphics mode requests.
    GraphicsRequest = 2,
    /// App → client: `web_graphics_url`, `remote_desktop_addr`.
    GraphicsReply = 3,
    /// Client → app, about once a second: `<heartbeat/>` and host state.
    Heartbeat = 4,
    /// App → client: CPU time, fraction done, `other_pid`, `want_network`.
    AppStatus = 5,
    /// App → client: trickle-up messages.
    TrickleUp = 6,
    /// Client → app: trickle-down messages.
    TrickleDown = 7,
}

/// Why a message could not be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("the previous message on this channel has not been read yet")]
    Busy,
    #[error("a message of {0} bytes does not fit a channel (at most {MAX_TEXT})")]
    TooLong(usize),
    #[error("a message may not contain a NUL byte")]
    Nul,
}

/// The channels of one attached segment.
pub struct Channels {
    segment: Box<dyn Segment>,
}

impl std::fmt::Debug for Channels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channels").finish_non_exhaustive()
    }
}

impl Channels {
    /// The channels of `segment`.
    pub fn new(segment: Box<dyn Segment>) -> Channels {
        Channels { segment }
    }

    fn channel(&self, c: Channel) -> &[AtomicU8] {
        let start = c as usize * CHANNEL_SIZE;
        &self.segment.bytes()[start..start + CHANNEL_SIZE]
    }

    /// Whether a message waits on `c`.
    pub fn pending(&self, c: Channel) -> bool {
        self.channel(c)[0].load(Ordering::Acquire) != 0
    }

    /// Take the waiting message of `c`, if any: its text up to the first NUL (or the end of the
    /// channel), lossily decoded; the flag is cleared afterwards.
    pub fn receive(&self, c: Channel) -> Option<String> {
        let ch = self.channel(c);
        if ch[0].load(Ordering::Acquire) == 0 {
            return None;
        }
        let text: Vec<u8> = ch[1..]
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .take_while(|&b| b != 0)
            .take(MAX_TEXT)
            .collect();
        ch[0].store(0, Ordering::Release);
        Some(String::from_utf8_lossy(&text).into_owned())
    }

    /// Send `text` on `c` if the channel is free.
    pub fn send(&self, c: Channel, text: &str) -> Result<(), SendError> {
        if text.len() > MAX_TEXT {
            return Err(SendError::TooLong(text.len()));
        }
        if text.as_bytes().contains(&0) {
            return Err(SendError::Nul);
        }
        let ch = self.channel(c);
        if ch[0].load(Ordering::Acquire) != 0 {
            return Err(SendError::Busy);
        }
        for (slot, b) in ch[1..].iter().zip(text.bytes().chain(std::iter::once(0))) {
            slot.store(b, Ordering::Relaxed);
        }
        ch[0].store(1, Ordering::Release);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::shm::LocalSegment;
    use super::*;

    fn local() -> Channels {
        Channels::new(Box::new(LocalSegment::new()))
    }

    #[test]
    fn a_message_is_received_once_and_frees_the_channel() {
        let ch = local();
        assert_eq!(ch.receive(Channel::AppStatus), None);
        ch.send(Channel::AppStatus, "<x>1</x>").unwrap();
        assert!(ch.pending(Channel::AppStatus));
        assert_eq!(ch.send(Channel::AppStatus, "<y/>"), Err(SendError::Busy));
        assert_eq!(ch.receive(Channel::AppStatus).as_deref(), Some("<x>1</x>"));
        assert_eq!(ch.receive(Channel::AppStatus), None);
        ch.send(Channel::AppStatus, "<y/>").unwrap();
        assert_eq!(ch.receive(Channel::AppStatus).as_deref(), Some("<y/>"));
        // Other channels are untouched.
        assert!(!ch.pending(Channel::Heartbeat));
    }

    #[test]
    fn sizes_are_strict() {
        let ch = local();
        let max = "a".repeat(MAX_TEXT);
        ch.send(Channel::TrickleUp, &max).unwrap();
        assert_eq!(ch.receive(Channel::TrickleUp).unwrap().len(), MAX_TEXT);
        assert_eq!(
            ch.send(Channel::TrickleUp, &format!("{max}a")),
            Err(SendError::TooLong(MAX_TEXT + 1))
        );
        assert_eq!(ch.send(Channel::TrickleUp, "a\0b"), Err(SendError::Nul));
    }

    #[test]
    fn garbage_from_the_client_is_read_within_the_channel() {
        let seg = LocalSegment::new();
        // A flag set with no NUL anywhere in the channel, and invalid UTF-8.
        let base = Channel::Heartbeat as usize * CHANNEL_SIZE;
        for b in &seg.bytes()[base..base + CHANNEL_SIZE] {
            b.store(0xff, Ordering::Relaxed);
        }
        let ch = Channels::new(Box::new(seg));
        let text = ch.receive(Channel::Heartbeat).unwrap();
        assert_eq!(text.chars().count(), MAX_TEXT);
        assert!(!ch.pending(Channel::Heartbeat));
        assert!(
            !ch.pending(Channel::AppStatus),
            "the next channel was not touched"
        );
    }
}
