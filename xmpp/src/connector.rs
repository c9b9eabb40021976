//! Connecting to the XMPP server, with TCP_NODELAY (tokio-xmpp's own connector leaves Nagle's
//! algorithm on, which delays every small stanza by ~40 ms), in one of two [`Security`] modes:
//!
//! - [`Security::Tls`]: STARTTLS is required, and the server's certificate must chain to the
//!   project CA the config pins (no system roots: a certificate any public CA issued for the
//!   name is not enough). A server that offers no STARTTLS is refused.
//! - [`Security::InsecureLoopback`]: plaintext, refused for any address but loopback and the
//!   one the config names explicitly (`plaintext_host`: a VM under user-mode networking reaches
//!   the host's loopback at 10.0.2.2, through the hypervisor and no network).
//!
//! Every byte read passes a [`DepthGuard`], so hostile nesting cannot reach the recursive XML
//! parser.

use std::borrow::Cow;
use std::io;
use std::net::IpAddr;
use std::sync::Arc;

use futures::{SinkExt, StreamExt};
use sasl::common::ChannelBinding;
use tokio::io::{AsyncRead, AsyncWrite, BufStream};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;
use tokio_util::either::Either;
use tokio_xmpp::connect::ServerConnector;
use tokio_xmpp::error::ProtocolError;
use tokio_xmpp::jid::Jid;
use tokio_xmpp::parsers::starttls;
use tokio_xmpp::xmlstream::{
    initiate_stream, FallibleStreamElement, PendingFeaturesRecv, ReadError, StreamHeader, Timeouts,
    XmppStreamElement,
};
use tokio_xmpp::Error;

use crate::depth::DepthGuard;

/// How the connection is protected.
#[derive(Clone, Debug)]
pub enum Security {
    /// STARTTLS, with the server's certificate checked against this pinned CA only.
    Tls(TlsTrust),
    /// Plaintext to loopback (and to `plaintext_host`) only: for a server on the same machine.
    InsecureLoopback { plaintext_host: Option<IpAddr> },
}

/// The TLS client settings for a pinned CA.
#[derive(Clone)]
pub struct TlsTrust {
    config: Arc<ClientConfig>,
    /// How many certificates are pinned, for Debug.
    pinned: usize,
}

impl std::fmt::Debug for TlsTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TlsTrust({} pinned CA certificate(s))", self.pinned)
    }
}

/// Why a config's XMPP security settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("cannot read the project CA {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: io::Error,
    },
    #[error("{0}")]
    Config(&'static str),
    #[error("the CA holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)")]
    NoCertificate,
    #[error("the CA's PEM is malformed: {0}")]
    Pem(String),
    #[error("the CA certificate is not usable as a trust anchor: {0}")]
    Anchor(String),
    #[error("cannot set up TLS: {0}")]
    Tls(String),
}

impl TlsTrust {
    /// Trust exactly the certificates in `pem` (one or more `CERTIFICATE` blocks).
    pub fn from_pem(pem: &[u8]) -> Result<TlsTrust, TrustError> {
        let mut roots = RootCertStore::empty();
        let mut pinned = 0;
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| TrustError::Pem(e.to_string()))?;
            roots
                .add(cert)
                .map_err(|e| TrustError::Anchor(e.to_string()))?;
            pinned += 1;
        }
        if pinned == 0 {
            return Err(TrustError::NoCertificate);
        }
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TrustError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(TlsTrust {
            config: Arc::new(config),
            pinned,
        })
    }

    /// The rustls client settings: only the pinned CA is trusted.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        Arc::clone(&self.config)
    }
}

/// The project CA a config pins, as PEM: the file `ca`, or `ca_pem` itself; both set is an
/// error, neither is `None`.
pub fn project_ca(
    ca: Option<&std::path::Path>,
    ca_pem: Option<&str>,
) -> Result<Option<Vec<u8>>, TrustError> {
    match (ca, ca_pem) {
        (Some(_), Some(_)) => Err(TrustError::Config(
            "xmpp.ca and xmpp.ca_pem are both set: give the project CA once",
        )),
        (Some(path), None) => std::fs::read(path)
            .map(Some)
            .map_err(|source| TrustError::Read {
                path: path.to_owned(),
                source,
            }),
        (None, Some(pem)) => Ok(Some(pem.as_bytes().to_vec())),
        (None, None) => Ok(None),
    }
}

impl Security {
    /// The security a config asks for: a pinned CA (`ca`, a PEM file, or `ca_pem`, the PEM
    /// itself) for STARTTLS, or, only when it says `insecure_loopback`, plaintext to loopback
    /// and `plaintext_host`. Anything ambiguous is an error, never a silent downgrade.
    pub fn from_config(
        ca: Option<&std::path::Path>,
        ca_pem: Option<&str>,
        insecure_loopback: bool,
        plaintext_host: Option<IpAddr>,
    ) -> Result<Security, TrustError> {
        match (project_ca(ca, ca_pem)?, insecure_loopback) {
            (Some(_), true) => Err(TrustError::Config(
                "xmpp.insecure_loopback is set beside a pinned CA: choose TLS (the CA) or plaintext",
            )),
            (Some(pem), false) if plaintext_host.is_none() => {
                Ok(Security::Tls(TlsTrust::from_pem(&pem)?))
            }
            (Some(_), false) => Err(TrustError::Config(
                "xmpp.plaintext_host only applies with insecure_loopback = true",
            )),
            (None, true) => Ok(Security::InsecureLoopback { plaintext_host }),
            (None, false) => Err(TrustError::Config(
                "pin the project CA for STARTTLS (xmpp.ca = \"/path/ca.pem\" or xmpp.ca_pem), or \
                 set xmpp.insecure_loopback = true for a plaintext server on this machine",
            )),
        }
    }
}

/// The byte stream under the XMPP stream: plain TCP, or TLS over TCP.
pub type Transport = BufStream<DepthGuard<Either<TcpStream, TlsStream<TcpStream>>>>;

/// Connects to `addr` (host:port) as its [`Security`] allows.
#[derive(Debug, Clone)]
pub struct Connector {
    addr: String,
    security: Security,
}

impl Connector {
    /// A connector for `addr` (`host:port`).
    pub fn new(addr: impl Into<String>, security: Security) -> Self {
        Self {
            addr: addr.into(),
            security,
        }
    }

    /// Whether a TCP connection to `ip` may be made.
    fn allowed(&self, ip: IpAddr) -> bool {
        match &self.security {
            Security::Tls(_) => true,
            Security::InsecureLoopback { plaintext_host } => {
                ip.is_loopback() || Some(ip) == *plaintext_host
            }
        }
    }

    async fn tcp(&self) -> Result<TcpStream, Error> {
        let addr = tokio::net::lookup_host(&self.addr)
            .await?
            .find(|a| self.allowed(a.ip()))
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "{} is not a loopback address: plaintext XMPP (insecure_loopback) is \
                         allowed only on loopback (and to an address set as plaintext_host); \
                         pin the project CA to use TLS",
                        self.addr
                    ),
                )
            })?;
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        Ok(tcp)
    }
}

/// Open an XMPP stream to `jid`'s domain over `io`, every byte read passing a depth guard.
async fn open_stream<S: AsyncRead + AsyncWrite + Unpin>(
    io: S,
    jid: &Jid,
    ns: &'static str,
    timeouts: Timeouts,
) -> Result<PendingFeaturesRecv<BufStream<DepthGuard<S>>>, Error> {
    let header = StreamHeader {
        to: Some(Cow::Owned(jid.domain().to_string())),
        from: None,
        id: None,
    };
    Ok(initiate_stream(BufStream::new(DepthGuard::new(io)), ns, header, timeouts).await?)
}

/// Ask for STARTTLS on a fresh plaintext stream and wait for the server's `<proceed/>`;
/// returns the TCP connection, ready for the TLS handshake.
async fn starttls(
    tcp: TcpStream,
    jid: &Jid,
    ns: &'static str,
    timeouts: Timeouts,
) -> Result<TcpStream, Error> {
    let plain = open_stream(tcp, jid, ns, timeouts).await?;
    let (features, mut stream) = plain.recv_features::<FallibleStreamElement>().await?;
    if !features.can_starttls() {
        return Err(Error::Protocol(ProtocolError::NoTls));
    }
    stream
        .send(&XmppStreamElement::Starttls(starttls::Nonza::Request(
            starttls::Request,
        )))
        .await?;
    loop {
        match stream
            .next()
            .await
            .map(|v| v.and_then(|v| v.into_read_error()))
        {
            Some(Ok(XmppStreamElement::Starttls(starttls::Nonza::Proceed(_)))) => break,
            Some(Ok(_)) | Some(Err(ReadError::SoftTimeout)) => {}
            Some(Err(ReadError::HardError(e))) => return Err(e.into()),
            Some(Err(ReadError::ParseError(e))) => {
                return Err(io::Error::new(io::ErrorKind::InvalidData, e).into())
            }
            None | Some(Err(ReadError::StreamFooterReceived)) => return Err(Error::Disconnected),
        }
    }
    // Nothing is buffered: the server sends nothing after <proceed/> until the handshake.
    Ok(stream.into_inner().into_inner().into_inner())
}

impl ServerConnector for Connector {
    type Stream = Transport;

    async fn connect(
        &self,
        jid: &Jid,
        ns: &'static str,
        timeouts: Timeouts,
    ) -> Result<(PendingFeaturesRecv<Self::Stream>, ChannelBinding), Error> {
        let tcp = self.tcp().await?;
        let io = match &self.security {
            Security::InsecureLoopback { .. } => Either::Left(tcp),
            Security::Tls(trust) => {
                let tcp = starttls(tcp, jid, ns, timeouts).await?;
                let name = ServerName::try_from(jid.domain().to_string()).map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("{} is not a TLS server name: {e}", jid.domain()),
                    )
                })?;
                let tls = TlsConnector::from(trust.client_config())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| {
                        io::Error::new(
                            e.kind(),
                            format!("TLS with the XMPP server {} failed: {e}", self.addr),
                        )
                    })?;
                Either::Right(tls)
            }
        };
        let pending = open_stream(io, jid, ns, timeouts).await?;
        Ok((pending, ChannelBinding::None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_goes_to_loopback_and_the_named_host_only() {
        let nat: IpAddr = "10.0.2.2".parse().unwrap();
        let plain = |host| Security::InsecureLoopback {
            plaintext_host: host,
        };
        let strict = Connector::new("127.0.0.1:5222", plain(None));
        assert!(strict.allowed("127.0.0.1".parse().unwrap()));
        assert!(strict.allowed("::1".parse().unwrap()));
        assert!(!strict.allowed(nat));
        let vm = Connector::new("10.0.2.2:5222", plain(Some(nat)));
        assert!(vm.allowed(nat));
        assert!(vm.allowed("127.0.0.1".parse().unwrap()));
        assert!(!vm.allowed("10.0.2.3".parse().unwrap()));
    }

    #[test]
    fn a_config_pins_a_ca_or_says_insecure_loopback_and_never_both() {
        let nat: IpAddr = "10.0.2.2".parse().unwrap();
        assert!(matches!(
            Security::from_config(None, None, true, Some(nat)),
            Ok(Security::InsecureLoopback { plaintext_host: Some(h) }) if h == nat
        ));
        let err = |r: Result<Security, TrustError>| r.unwrap_err().to_string();
        assert!(err(Security::from_config(None, None, false, None)).contains("pin the project CA"));
        assert!(err(Security::from_config(None, Some("x"), true, None)).contains("choose"));
        assert!(err(Security::from_config(
            Some(std::path::Path::new("/a")),
            Some("x"),
            false,
            None
        ))
        .contains("both set"));
        assert!(err(Security::from_config(
            Some(std::path::Path::new("/nonexistent/ca.pem")),
            None,
            false,
            None
        ))
        .contains("/nonexistent/ca.pem"));
        assert!(err(Security::from_config(None, None, false, Some(nat))).contains("pin"));
    }

    #[test]
    fn a_pinned_ca_must_be_pem_certificates() {
        assert!(matches!(
            TlsTrust::from_pem(b"no pem here"),
            Err(TrustError::NoCertificate)
        ));
        let garbage = b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n";
        assert!(TlsTrust::from_pem(garbage).is_err());
    }
}
