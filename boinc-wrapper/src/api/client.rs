//! [`Client`]: the application's side of the conversation with the BOINC client, put together
//! from the channels and messages: [`Client::poll`] takes control messages and heartbeats,
//! [`Client::report`] sends the status, [`Client::gone`] says when the client has disappeared
//! (its process is gone, or no heartbeat for [`HEARTBEAT_GIVEUP`], as `libboinc_api` does).

use std::time::{Duration, Instant};

use super::channel::{Channel, Channels, SendError};
use super::msg::{self, AppStatus, Control};

/// No heartbeat for this long means the client is gone (`HEARTBEAT_GIVEUP_SECS`).
pub const HEARTBEAT_GIVEUP: Duration = Duration::from_secs(30);

/// Something the client said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Control(Control),
    /// The client suspended (true) or allowed (false) network activity; sent on changes only.
    NetworkSuspended(bool),
}

/// Why the client counts as gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gone {
    /// Its process no longer exists.
    Exited { pid: i32 },
    /// It sent no heartbeat for [`HEARTBEAT_GIVEUP`].
    Silent,
}

impl std::fmt::Display for Gone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Gone::Exited { pid } => write!(f, "the BOINC client (pid {pid}) no longer exists"),
            Gone::Silent => write!(
                f,
                "no heartbeat from the BOINC client for {} s",
                HEARTBEAT_GIVEUP.as_secs()
            ),
        }
    }
}

/// The application's link to the client.
#[derive(Debug)]
pub struct Client {
    channels: Channels,
    client_pid: Option<i32>,
    last_heartbeat: Instant,
    network_suspended: bool,
    /// Malformed messages seen (logged the first few times only: the client is not hostile,
    /// but a broken one must not flood the volunteer's disk).
    malformed: u64,
}

/// Malformed messages logged before the log goes quiet.
const MALFORMED_LOGGED: u64 = 5;

impl Client {
    /// A client on `channels`; `client_pid` from init_data (None: heartbeats only).
    pub fn new(channels: Channels, client_pid: Option<i32>, now: Instant) -> Client {
        Client {
            channels,
            client_pid,
            last_heartbeat: now,
            network_suspended: false,
            malformed: 0,
        }
    }

    fn malformed(&mut self, channel: Channel, error: &msg::MsgError) {
        self.malformed += 1;
        if self.malformed <= MALFORMED_LOGGED {
            tracing::warn!(
                ?channel,
                "ignoring a malformed message from the client: {error}"
            );
        }
    }

    /// Take what the client sent since the last poll.
    pub fn poll(&mut self, now: Instant) -> Vec<Event> {
        let mut events = Vec::new();
        if let Some(text) = self.channels.receive(Channel::ProcessControlRequest) {
            match msg::parse_control(&text) {
                Ok(controls) => events.extend(controls.into_iter().map(Event::Control)),
                Err(e) => self.malformed(Channel::ProcessControlRequest, &e),
            }
        }
        if let Some(text) = self.channels.receive(Channel::Heartbeat) {
            match msg::parse_heartbeat(&text) {
                Ok(h) => {
                    if h.heartbeat {
                        self.last_heartbeat = now;
                    }
                    if h.network_suspended != self.network_suspended {
                        self.network_suspended = h.network_suspended;
                        events.push(Event::NetworkSuspended(h.network_suspended));
                    }
                }
                Err(e) => self.malformed(Channel::Heartbeat, &e),
            }
        }
        events
    }

    /// Send the status if the client has read the previous one; false if it had not (the
    /// caller tries again at its next report).
    pub fn report(&self, status: &AppStatus) -> bool {
        match self.channels.send(Channel::AppStatus, &status.to_message()) {
            Ok(()) => true,
            Err(SendError::Busy) => false,
            Err(e) => {
                // to_message always fits; this would be a bug, not a client problem.
                tracing::error!("cannot send the app status: {e}");
                false
            }
        }
    }

    /// Whether the client is gone, and why.
    pub fn gone(&self, now: Instant) -> Option<Gone> {
        if let Some(pid) = self.client_pid {
            if !crate::proctree::alive(pid) {
                return Some(Gone::Exited { pid });
            }
        }
        (now.duration_since(self.last_heartbeat) > HEARTBEAT_GIVEUP).then_some(Gone::Silent)
    }
}

#[cfg(test)]
mod tests {
    use super::super::shm::LocalSegment;
    use super::*;

    /// The application's and the client's ends of one shared segment.
    fn pair() -> (Client, Channels) {
        let seg = LocalSegment::new();
        let app = Channels::new(Box::new(seg.clone()));
        let client = Channels::new(Box::new(seg));
        (Client::new(app, None, Instant::now()), client)
    }

    #[test]
    fn controls_and_network_changes_become_events() {
        let (mut app, client) = pair();
        let t = Instant::now();
        assert!(app.poll(t).is_empty());
        client
            .send(Channel::ProcessControlRequest, "<suspend/>")
            .unwrap();
        client
            .send(Channel::Heartbeat, "<heartbeat/><network_suspended/>")
            .unwrap();
        assert_eq!(
            app.poll(t),
            vec![
                Event::Control(Control::Suspend),
                Event::NetworkSuspended(true)
            ]
        );
        assert!(!client.pending(Channel::ProcessControlRequest));
        client.send(Channel::Heartbeat, "<heartbeat/>").unwrap();
        client
            .send(Channel::ProcessControlRequest, "<<garbage")
            .unwrap();
        assert_eq!(app.poll(t), vec![Event::NetworkSuspended(false)]);
        assert!(
            !client.pending(Channel::ProcessControlRequest),
            "garbage consumed"
        );
    }

    #[test]
    fn silence_for_thirty_seconds_means_gone() {
        let (mut app, client) = pair();
        let t0 = Instant::now();
        assert_eq!(app.gone(t0 + Duration::from_secs(29)), None);
        client.send(Channel::Heartbeat, "<heartbeat/>").unwrap();
        app.poll(t0 + Duration::from_secs(20));
        assert_eq!(app.gone(t0 + Duration::from_secs(45)), None);
        assert_eq!(app.gone(t0 + Duration::from_secs(51)), Some(Gone::Silent));
    }

    #[test]
    fn a_dead_client_pid_means_gone() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        child.wait().unwrap();
        let (app, _client) = pair();
        let app = Client {
            client_pid: Some(pid),
            ..app
        };
        assert_eq!(app.gone(Instant::now()), Some(Gone::Exited { pid }));
        let me = Client {
            client_pid: Some(std::process::id() as i32),
            ..pair().0
        };
        assert_eq!(me.gone(Instant::now()), None);
    }

    #[test]
    fn status_waits_until_the_client_read_the_last_one() {
        let (app, client) = pair();
        let s = AppStatus {
            fraction_done: Some(0.5),
            ..AppStatus::default()
        };
        assert!(app.report(&s));
        assert!(!app.report(&s), "previous not read yet");
        let got = client.receive(Channel::AppStatus).unwrap();
        assert_eq!(AppStatus::parse(&got).unwrap().fraction_done, Some(0.5));
        assert!(app.report(&s));
    }
}
