//! A tiny blocking HTTP/1.0 GET over std::net (and rustls for HTTPS), enough to ask the local
//! manager whether it is up and which agents it sees (HTTP/1.0 means no chunked bodies: the body
//! ends at EOF).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{ClientConfig, ClientConnection, StreamOwned};

use crate::StackError;

/// A byte stream: TCP, or TLS over TCP.
trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// Largest answer read.
const MAX_BODY: u64 = 16 << 20;

/// GET `path` from `addr` with a bearer token, over TLS with `tls` if given (the server's name:
/// its IP address); returns (status, body).
pub(crate) fn get(
    addr: SocketAddr,
    path: &str,
    token: &str,
    tls: Option<&Arc<ClientConfig>>,
) -> Result<(u16, Vec<u8>), StackError> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let url = format!("{scheme}://{addr}{path}");
    let fail = |reason: String| StackError::Http {
        url: url.clone(),
        reason,
    };
    let timeout = Duration::from_secs(5);
    let tcp = TcpStream::connect_timeout(&addr, timeout).map_err(|e| fail(e.to_string()))?;
    tcp.set_read_timeout(Some(timeout))
        .and_then(|()| tcp.set_write_timeout(Some(timeout)))
        .map_err(|e| fail(e.to_string()))?;
    let mut s: Box<dyn ReadWrite> = match tls {
        None => Box::new(tcp),
        Some(config) => {
            let name = ServerName::IpAddress(addr.ip().into());
            let conn =
                ClientConnection::new(Arc::clone(config), name).map_err(|e| fail(e.to_string()))?;
            Box::new(StreamOwned::new(conn, tcp))
        }
    };
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nAccept: application/json\r\n\r\n"
    )
    .map_err(|e| fail(e.to_string()))?;
    let mut raw = Vec::new();
    s.take(MAX_BODY)
        .read_to_end(&mut raw)
        .map_err(|e| fail(e.to_string()))?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| fail("no end of headers".into()))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| fail(format!("bad status line in {head:?}")))?;
    Ok((status, raw[split + 4..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn reads_status_and_body_and_sends_the_token() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.ends_with(b"\r\n\r\n") {
                let n = c.read(&mut buf).unwrap();
                assert!(n > 0, "request ended early");
                req.extend_from_slice(&buf[..n]);
            }
            let req = String::from_utf8(req).unwrap();
            c.write_all(b"HTTP/1.0 401 Unauthorized\r\nContent-Type: application/json\r\n\r\n{\"error\":\"x\"}")
                .unwrap();
            req
        });
        let (status, body) = get(addr, "/api/jobs", "s3cret", None).unwrap();
        let req = server.join().unwrap();
        assert_eq!(status, 401);
        assert_eq!(body, b"{\"error\":\"x\"}");
        assert!(req.starts_with("GET /api/jobs HTTP/1.0\r\n"), "{req}");
        assert!(req.contains("Authorization: Bearer s3cret\r\n"), "{req}");
    }
}
