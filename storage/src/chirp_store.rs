//! Chirp storage: `chirp://host[:port]/path` URLs (port 9094 by default; the path is
//! percent-decoded, so `%20` is a space and `%25` a percent sign). Each transfer opens its own
//! connection and authenticates with the given ticket first, then with the store's methods
//! (address, hostname, unix by default). A download that breaks starts over (getfile has no
//! offset); an upload writes the file in place, so whoever reads it must check its digest (the
//! manager does, before it accepts an output).

use std::path::Path;
use std::time::Duration;

use copilot_protocol::digest::Hasher;

use crate::chirp::{Auth, ChirpClient};
use crate::{shown_url, Credential, Download, Progress, Storage, StorageError, Upload, Url};

/// Chirp's registered port.
pub const DEFAULT_PORT: u16 = 9094;

/// Connections to Chirp servers, made per transfer.
#[derive(Clone, Debug)]
pub struct ChirpStore {
    timeout: Duration,
    /// Methods tried after a ticket.
    auths: Vec<Auth>,
}

/// The server address and the decoded path of a `chirp://` URL.
pub fn parse_url(url: &Url) -> Result<(String, String), StorageError> {
    let bad = |reason: &str| StorageError::BadUrl {
        url: shown_url(url),
        reason: reason.to_owned(),
    };
    if url.scheme() != "chirp" {
        return Err(bad("not a chirp:// URL"));
    }
    let host = url
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| bad("no host"))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad("user names and passwords do not go in chirp URLs"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad("chirp URLs have no query or fragment"));
    }
    let path =
        decode(url.path()).ok_or_else(|| bad("the path is not valid percent-encoded UTF-8"))?;
    if !path.starts_with('/') || path.len() < 2 {
        return Err(bad("no path"));
    }
    let port = url.port().unwrap_or(DEFAULT_PORT);
    Ok((format!("{host}:{port}"), path))
}

fn decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl ChirpStore {
    /// A store whose connections wait `timeout` for any answer.
    pub fn new(timeout: Duration) -> ChirpStore {
        ChirpStore {
            timeout,
            auths: vec![Auth::Address, Auth::Hostname, Auth::Unix],
        }
    }

    /// The same store proving who it is with `auths` (after any ticket).
    pub fn with_auths(self, auths: Vec<Auth>) -> ChirpStore {
        ChirpStore { auths, ..self }
    }

    /// Connects to the server of `url` and returns the client and the path.
    pub async fn connect(
        &self,
        url: &Url,
        cred: &Credential,
    ) -> Result<(ChirpClient, String), StorageError> {
        let (addr, path) = parse_url(url)?;
        let mut auths = Vec::with_capacity(self.auths.len() + 1);
        if let Credential::Ticket(t) = cred {
            auths.push(Auth::Ticket(t.clone()));
        }
        auths.extend(self.auths.iter().cloned());
        let client = ChirpClient::connect(&addr, &auths, self.timeout).await?;
        Ok((client, path))
    }
}

impl Storage for ChirpStore {
    async fn get_once(
        &self,
        url: &Url,
        into: &mut Download,
        cred: &Credential,
        progress: &Progress,
    ) -> Result<(), StorageError> {
        let (mut client, path) = self.connect(url, cred).await?;
        into.restart().await?;
        let limit = into.limit();
        let mut seen = Hasher::new();
        let got = {
            let file = into.file().await?;
            let mut on_chunk = |b: &[u8]| {
                seen.update(b);
                progress(seen.len());
            };
            client.getfile(&path, file, limit, &mut on_chunk).await
        };
        into.adopt(seen);
        got?;
        Ok(())
    }

    async fn put_once(
        &self,
        src: &Path,
        url: &Url,
        upload: Upload,
        cred: &Credential,
        progress: &Progress,
    ) -> Result<(), StorageError> {
        let (mut client, path) = self.connect(url, cred).await?;
        let mut file = crate::open_local(src).await?;
        let mut sent = 0u64;
        let mut on_chunk = |b: &[u8]| {
            sent += b.len() as u64;
            progress(sent);
        };
        client
            .putfile(&path, 0o644, upload.size, &mut file, &mut on_chunk)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_give_address_and_decoded_path() {
        let u: Url = "chirp://127.0.0.1:9123/a%20b/100%25/x".parse().unwrap();
        assert_eq!(
            parse_url(&u).unwrap(),
            ("127.0.0.1:9123".into(), "/a b/100%/x".into())
        );
        let u: Url = "chirp://storage.example.org/data/f".parse().unwrap();
        assert_eq!(parse_url(&u).unwrap().0, "storage.example.org:9094");
        for bad in [
            "chirp://h:1/",
            "chirp://u:p@h:1/x",
            "chirp://h:1/x?q=1",
            "chirp://h:1/%zz",
            "chirp://h:1/%ff",
            "http://h:1/x",
        ] {
            let u: Url = bad.parse().unwrap();
            assert!(parse_url(&u).is_err(), "{bad}");
        }
    }
}
