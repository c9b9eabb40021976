//! Connecting to the XMPP server: plain TCP to a loopback address, with TCP_NODELAY.
//!
//! tokio-xmpp's own TCP connector leaves Nagle's algorithm on, which delays every small stanza
//! by ~40 ms. Plaintext is refused for non-loopback addresses: credentials must not cross a
//! network in clear (STARTTLS with a pinned project CA is on the roadmap). Every byte read
//! passes a [`DepthGuard`], so hostile nesting cannot reach the recursive XML parser.

use std::borrow::Cow;
use std::io;

use sasl::common::ChannelBinding;
use tokio::io::BufStream;
use tokio::net::TcpStream;
use tokio_xmpp::connect::ServerConnector;
use tokio_xmpp::jid::Jid;
use tokio_xmpp::xmlstream::{initiate_stream, PendingFeaturesRecv, StreamHeader, Timeouts};
use tokio_xmpp::Error;

use crate::depth::DepthGuard;

/// Connects over plain TCP to `addr` (host:port), which must resolve to a loopback address.
#[derive(Debug, Clone)]
pub struct LoopbackConnector {
    addr: String,
}

impl LoopbackConnector {
    /// A connector for `addr` (`host:port`).
    pub fn new(addr: impl Into<String>) -> Self {
        Self { addr: addr.into() }
    }
}

impl ServerConnector for LoopbackConnector {
    type Stream = BufStream<DepthGuard<TcpStream>>;

    async fn connect(
        &self,
        jid: &Jid,
        ns: &'static str,
        timeouts: Timeouts,
    ) -> Result<(PendingFeaturesRecv<Self::Stream>, ChannelBinding), Error> {
        let addr = tokio::net::lookup_host(&self.addr)
            .await?
            .find(|a| a.ip().is_loopback())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "{} is not a loopback address: plaintext XMPP is allowed only on loopback",
                        self.addr
                    ),
                )
            })?;
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let header = StreamHeader {
            to: Some(Cow::Owned(jid.domain().to_string())),
            from: None,
            id: None,
        };
        let pending =
            initiate_stream(BufStream::new(DepthGuard::new(tcp)), ns, header, timeouts).await?;
        Ok((pending, ChannelBinding::None))
    }
}
