//! A guard on the bytes an XMPP server sends us: it counts XML element nesting as the bytes
//! stream past and fails the read once a stream nests deeper than [`MAX_STREAM_DEPTH`].
//!
//! The XML parser under tokio-xmpp builds elements recursively, one stack frame per level (and
//! minidom drops them recursively), so a stanza nested a few hundred levels deep aborts the
//! process with a stack overflow. Servers bound stanza size, not depth. Counting here, before the
//! parser sees anything, turns such a stanza into a dropped connection (the client reconnects)
//! instead of a crash. The counter understands what a server sends: tags, quoted attribute
//! values, self-closing tags, and skips `<?…?>` and `<!…>` constructs.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Deepest nesting accepted, counting the stream element as level 1 (a stanza is level 2, a
/// copilot payload level 3). Real traffic stays below 10.
pub const MAX_STREAM_DEPTH: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lex {
    Text,
    /// Just after `<`.
    Open,
    /// Inside a start tag; `slash` if the last significant byte was `/`.
    StartTag {
        slash: bool,
    },
    /// Inside a quoted attribute value.
    Quoted {
        quote: u8,
    },
    /// Inside an end tag.
    EndTag,
    /// Inside `<?…>` or `<!…>`: skipped up to `>`.
    Skip,
}

/// Counts element depth over a byte stream.
#[derive(Clone, Debug)]
pub struct DepthCounter {
    lex: Lex,
    depth: usize,
    max: usize,
}

/// The stream nested too deep.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the server sent XML nested deeper than {0} levels; dropping the connection")]
pub struct TooDeep(pub usize);

impl DepthCounter {
    /// A counter at the start of a stream, allowing `max` levels.
    pub fn new(max: usize) -> Self {
        Self {
            lex: Lex::Text,
            depth: 0,
            max,
        }
    }

    /// Feed the next bytes.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), TooDeep> {
        for &b in bytes {
            self.lex = match (self.lex, b) {
                (Lex::Text, b'<') => Lex::Open,
                (Lex::Text, _) => Lex::Text,
                (Lex::Open, b'/') => Lex::EndTag,
                (Lex::Open, b'?' | b'!') => Lex::Skip,
                (Lex::Open, _) => {
                    self.depth += 1;
                    if self.depth > self.max {
                        return Err(TooDeep(self.max));
                    }
                    Lex::StartTag { slash: false }
                }
                (Lex::StartTag { .. }, b'"' | b'\'') => Lex::Quoted { quote: b },
                (Lex::StartTag { slash }, b'>') => {
                    if slash {
                        self.depth = self.depth.saturating_sub(1);
                    }
                    Lex::Text
                }
                (Lex::StartTag { .. }, b'/') => Lex::StartTag { slash: true },
                (Lex::StartTag { slash }, b) if b.is_ascii_whitespace() => Lex::StartTag { slash },
                (Lex::StartTag { .. }, _) => Lex::StartTag { slash: false },
                (Lex::Quoted { quote }, b) if b == quote => Lex::StartTag { slash: false },
                (Lex::Quoted { quote }, _) => Lex::Quoted { quote },
                (Lex::EndTag, b'>') => {
                    self.depth = self.depth.saturating_sub(1);
                    Lex::Text
                }
                (Lex::EndTag, _) => Lex::EndTag,
                (Lex::Skip, b'>') => Lex::Text,
                (Lex::Skip, _) => Lex::Skip,
            };
        }
        Ok(())
    }
}

/// A stream whose reads go through a [`DepthCounter`]; writes pass through untouched.
#[derive(Debug)]
pub struct DepthGuard<S> {
    inner: S,
    counter: DepthCounter,
}

impl<S> DepthGuard<S> {
    /// Guard `inner`, allowing [`MAX_STREAM_DEPTH`] levels.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            counter: DepthCounter::new(MAX_STREAM_DEPTH),
        }
    }

    /// The guarded stream.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for DepthGuard<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let fresh = &buf.filled()[before..];
                match this.counter.feed(fresh) {
                    Ok(()) => Poll::Ready(Ok(())),
                    Err(e) => {
                        tracing::warn!("{e}");
                        // A failed read hands out no bytes.
                        buf.set_filled(before);
                        Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)))
                    }
                }
            }
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for DepthGuard<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
        xmlns:stream='http://etherx.jabber.org/streams' id='x' version='1.0'>\
        <iq type='result' id='a&apos;b' to='a@b/c'><assign xmlns='urn:copilot:1' v='1' \
        name='x > y / z'><arg>sh</arg><env name='A' value='&lt;b&gt;'/><upload url='u' \
        token='t'/></assign></iq><message><body>a &lt; b</body></message>";

    #[test]
    fn real_stanzas_pass_whatever_the_chunking() {
        for chunk in [1, 2, 3, 7, 64, STREAM.len()] {
            let mut c = DepthCounter::new(4);
            for part in STREAM.as_bytes().chunks(chunk) {
                c.feed(part).unwrap();
            }
            // Back at the stream level after the last stanza.
            assert_eq!(c.depth, 1, "chunk size {chunk}");
        }
    }

    #[test]
    fn nesting_past_the_limit_is_refused() {
        let mut c = DepthCounter::new(MAX_STREAM_DEPTH);
        c.feed(b"<stream:stream><iq>").unwrap();
        let deep = "<x>".repeat(MAX_STREAM_DEPTH);
        assert_eq!(c.feed(deep.as_bytes()), Err(TooDeep(MAX_STREAM_DEPTH)));
    }

    #[test]
    fn self_closing_and_closed_siblings_do_not_add_up() {
        let mut c = DepthCounter::new(3);
        c.feed(b"<s><iq>").unwrap();
        for _ in 0..1000 {
            c.feed(b"<a/><b x='1' /><c></c>").unwrap();
        }
        assert_eq!(c.depth, 2);
    }

    #[tokio::test]
    async fn the_guard_fails_the_read() {
        use tokio::io::AsyncReadExt;
        let deep = format!("<s>{}", "<x>".repeat(100));
        let mut g = DepthGuard::new(deep.as_bytes());
        let mut out = Vec::new();
        let err = g.read_to_end(&mut out).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
