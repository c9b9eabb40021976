//! Connecting to the XMPP server: plain TCP to a loopback address, with TCP_NODELAY.
//!
//! tokio-xmpp's own TCP connector leaves Nagle's algorithm on, which delays every small stanza
//! by ~40 ms. Plaintext is refused for non-loopback addresses: credentials must not cross a
//! network in clear (STARTTLS with a pinned project CA is on the roadmap). The one exception is
//! an address the config names explicitly (`plaintext_host`): a VM under user-mode networking
//! reaches the host's loopback at 10.0.2.2, through the hypervisor and no network. Every byte read
//! passes a [`DepthGuard`], so hostile nesting cannot reach the recursive XML parser.

use std::borrow::Cow;
use std::io;
use std::net::IpAddr;

use sasl::common::ChannelBinding;
use tokio::io::BufStream;
use tokio::net::TcpStream;
use tokio_xmpp::connect::ServerConnector;
use tokio_xmpp::jid::Jid;
use tokio_xmpp::xmlstream::{initiate_stream, PendingFeaturesRecv, StreamHeader, Timeouts};
use tokio_xmpp::Error;

use crate::depth::DepthGuard;

/// Connects over plain TCP to `addr` (host:port), which must resolve to a loopback address
/// or to `plaintext_host`.
#[derive(Debug, Clone)]
pub struct LoopbackConnector {
    addr: String,
    plaintext_host: Option<IpAddr>,
}

impl LoopbackConnector {
    /// A connector for `addr` (`host:port`), allowed to reach `plaintext_host` too.
    pub fn new(addr: impl Into<String>, plaintext_host: Option<IpAddr>) -> Self {
        Self {
            addr: addr.into(),
            plaintext_host,
        }
    }

    /// Whether plaintext may go to `ip`.
    fn allowed(&self, ip: IpAddr) -> bool {
        ip.is_loopback() || Some(ip) == self.plaintext_host
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
            .find(|a| self.allowed(a.ip()))
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "{} is not a loopback address: plaintext XMPP is allowed only on loopback \
                         (and to an address set as plaintext_host)",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_goes_to_loopback_and_the_named_host_only() {
        let nat: IpAddr = "10.0.2.2".parse().unwrap();
        let strict = LoopbackConnector::new("127.0.0.1:5222", None);
        assert!(strict.allowed("127.0.0.1".parse().unwrap()));
        assert!(strict.allowed("::1".parse().unwrap()));
        assert!(!strict.allowed(nat));
        let vm = LoopbackConnector::new("10.0.2.2:5222", Some(nat));
        assert!(vm.allowed(nat));
        assert!(vm.allowed("127.0.0.1".parse().unwrap()));
        assert!(!vm.allowed("10.0.2.3".parse().unwrap()));
    }
}
