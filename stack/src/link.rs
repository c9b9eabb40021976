//! [`Link`]: a TCP forwarder on 127.0.0.1 that stands for the network between agents and a
//! server, so fault tests can break it the way real networks break: [`Link::cut`] partitions it
//! (no byte crosses in either direction and no new connection reaches the server, but nothing is
//! closed: TCP buffers fill and both ends wait, as they do when a route disappears) until
//! [`Link::heal`]; [`Link::cut_streams_after`] ends the next connections that send more than a
//! given number of bytes towards the server right there (an upload cut in the middle).
//!
//! Blocking std threads: one acceptor, two pumps per connection. Dropping the link closes its
//! connections and its listener.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;

use crate::error::io;
use crate::StackError;

/// Bytes moved per read.
const CHUNK: usize = 16 * 1024;

/// The next connections to end once they sent this many bytes towards the server.
#[derive(Debug, Clone, Copy)]
struct StreamCut {
    after: u64,
    remaining: u32,
}

#[derive(Debug, Default)]
struct State {
    cut: Mutex<bool>,
    healed: Condvar,
    stream_cut: Mutex<Option<StreamCut>>,
    streams_cut: AtomicU32,
    closing: AtomicBool,
    open: Mutex<Vec<TcpStream>>,
}

/// Poisoning only means a pump thread panicked; the data under the lock is still valid.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl State {
    /// Block while the link is cut.
    fn pass(&self) {
        let mut cut = lock(&self.cut);
        while *cut && !self.closing.load(Ordering::SeqCst) {
            cut = self.healed.wait(cut).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Whether a connection that has sent `sent` bytes upstream and now sends `n` more is to be
    /// ended; if so, how many of the `n` still go through first. Claims one of the cuts.
    fn claim_stream_cut(&self, sent: u64, n: usize) -> Option<usize> {
        let mut rule = lock(&self.stream_cut);
        let r = (*rule)?;
        let total = sent + n as u64;
        if total <= r.after {
            return None;
        }
        *rule = (r.remaining > 1).then_some(StreamCut {
            remaining: r.remaining - 1,
            ..r
        });
        self.streams_cut.fetch_add(1, Ordering::SeqCst);
        // r.after - sent < n, so it fits a usize.
        Some(r.after.saturating_sub(sent) as usize)
    }
}

/// A cuttable TCP path from a local port to `upstream`.
#[derive(Debug)]
pub struct Link {
    port: u16,
    upstream: SocketAddr,
    state: Arc<State>,
}

impl Link {
    /// Listen on a free port of 127.0.0.1 and forward every connection to `upstream`.
    pub fn start(upstream: SocketAddr) -> Result<Link, StackError> {
        let port = crate::free_port()?;
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port))
            .map_err(io(format!("binding a link to {upstream} on port {port}")))?;
        let state = Arc::new(State::default());
        let s = Arc::clone(&state);
        thread::Builder::new()
            .name(format!("link-{port}"))
            .spawn(move || accept(listener, upstream, s))
            .map_err(io("starting a link thread"))?;
        Ok(Link {
            port,
            upstream,
            state,
        })
    }

    /// The local port that leads to the upstream.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:port`, as a client's config names it.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// Partition: from now on no byte crosses and no new connection reaches the upstream.
    pub fn cut(&self) {
        *lock(&self.state.cut) = true;
        tracing::info!(port = self.port, upstream = %self.upstream, "link cut");
    }

    /// End the partition: what waited flows on.
    pub fn heal(&self) {
        *lock(&self.state.cut) = false;
        self.state.healed.notify_all();
        tracing::info!(port = self.port, upstream = %self.upstream, "link healed");
    }

    /// End each of the next `count` connections that send more than `after` bytes towards the
    /// upstream, at that byte: both directions are shut down there.
    pub fn cut_streams_after(&self, after: u64, count: u32) {
        *lock(&self.state.stream_cut) = (count > 0).then_some(StreamCut {
            after,
            remaining: count,
        });
    }

    /// How many connections [`Link::cut_streams_after`] has ended so far.
    pub fn streams_cut(&self) -> u32 {
        self.state.streams_cut.load(Ordering::SeqCst)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.state.closing.store(true, Ordering::SeqCst);
        self.heal();
        for s in lock(&self.state.open).drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        // Wake the acceptor, which then sees `closing` and returns.
        let _ = TcpStream::connect(self.addr());
    }
}

fn accept(listener: TcpListener, upstream: SocketAddr, state: Arc<State>) {
    for client in listener.incoming() {
        if state.closing.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else { continue };
        let s = Arc::clone(&state);
        // A connection that cannot be set up is dropped, as an unreachable server would be.
        let _ = thread::Builder::new()
            .name("link-conn".into())
            .spawn(move || connect(client, upstream, s));
    }
}

fn connect(client: TcpStream, upstream: SocketAddr, state: Arc<State>) {
    // During a cut the client's connection stays pending, as a SYN into a partition would.
    state.pass();
    let Ok(server) = TcpStream::connect(upstream) else {
        return;
    };
    let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    {
        let mut open = lock(&state.open);
        open.retain(|s| s.peer_addr().is_ok());
        for s in [&client, &server] {
            if let Ok(s) = s.try_clone() {
                open.push(s);
            }
        }
    }
    if state.closing.load(Ordering::SeqCst) {
        return;
    }
    let s = Arc::clone(&state);
    let _ = thread::Builder::new()
        .name("link-down".into())
        .spawn(move || pump(s2, c2, &s, false));
    pump(client, server, &state, true);
}

/// Copy `from` → `to` until either side ends; `upstream` is the direction towards the server.
fn pump(mut from: TcpStream, mut to: TcpStream, state: &State, upstream: bool) {
    let mut buf = vec![0u8; CHUNK];
    let mut sent = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        state.pass();
        if upstream {
            if let Some(keep) = state.claim_stream_cut(sent, n) {
                let _ = to.write_all(&buf[..keep]);
                let _ = to.shutdown(Shutdown::Both);
                let _ = from.shutdown(Shutdown::Both);
                return;
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        sent += n as u64;
    }
    let _ = to.shutdown(Shutdown::Write);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// An upstream that echoes every connection back.
    fn echo() -> SocketAddr {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = l.local_addr().unwrap();
        thread::spawn(move || {
            for c in l.incoming().flatten() {
                thread::spawn(move || {
                    let mut w = c.try_clone().unwrap();
                    let mut r = c;
                    let _ = std::io::copy(&mut r, &mut w);
                });
            }
        });
        addr
    }

    fn client(link: &Link) -> TcpStream {
        let c = TcpStream::connect(link.addr()).unwrap();
        c.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        c
    }

    #[test]
    fn bytes_cross_until_cut_and_flow_on_after_heal() {
        let link = Link::start(echo()).unwrap();
        let mut c = client(&link);
        let mut buf = [0u8; 5];
        c.write_all(b"hello").unwrap();
        c.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");

        link.cut();
        c.write_all(b"again").unwrap();
        let err = c.read_exact(&mut buf).unwrap_err();
        assert!(
            matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
            "{err:?}"
        );
        // A connection opened during the cut is held too.
        let mut late = client(&link);
        late.write_all(b"late!").unwrap();
        assert!(late.read_exact(&mut buf).is_err());

        link.heal();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"again");
        late.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        late.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"late!");
    }

    /// An upstream that sends what each connection carried, once it ends, to the receiver.
    fn recorder() -> (SocketAddr, std::sync::mpsc::Receiver<Vec<u8>>) {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        thread::spawn(move || {
            for mut c in l.incoming().flatten() {
                let tx = tx.clone();
                thread::spawn(move || {
                    let mut got = Vec::new();
                    let _ = c.read_to_end(&mut got);
                    let _ = tx.send(got);
                });
            }
        });
        (addr, rx)
    }

    #[test]
    fn a_stream_cut_ends_the_next_big_sender_at_its_byte_and_only_that_many() {
        let (upstream, received) = recorder();
        let link = Link::start(upstream).unwrap();
        link.cut_streams_after(10, 1);
        let wait = Duration::from_secs(10);

        let mut c = client(&link);
        c.write_all(b"0123456789abcdef").unwrap();
        assert_eq!(received.recv_timeout(wait).unwrap(), b"0123456789");
        // The sender sees its connection end.
        c.set_read_timeout(Some(wait)).unwrap();
        assert_eq!(c.read(&mut [0u8; 1]).unwrap_or(0), 0);
        assert_eq!(link.streams_cut(), 1);

        // The rule is used up: the next connection carries everything.
        let mut d = client(&link);
        d.write_all(b"0123456789abcdef").unwrap();
        d.shutdown(Shutdown::Write).unwrap();
        assert_eq!(received.recv_timeout(wait).unwrap(), b"0123456789abcdef");
        assert_eq!(link.streams_cut(), 1);
    }
}
