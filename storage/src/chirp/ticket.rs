//! Chirp tickets: an RSA key pair whose public half is registered with a Chirp server under the
//! subject `ticket:<md5 of the public key PEM>`, with rights limited to chosen directories. The
//! holder of the private half authenticates by signing the server's random challenge. The
//! manager makes one per job attempt, so that attempt's agent can write to its output directory
//! and nowhere else.

use base64ct::Encoding;
use md5::{Digest, Md5};
use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey, LineEnding};
use rsa::{Pkcs1v15Sign, RsaPrivateKey};

use super::ChirpError;

/// Bits of the keys [`Ticket::generate`] makes.
pub const TICKET_BITS: usize = 2048;

/// A ticket's private key, with the public key text and digest the server knows it by.
#[derive(Clone)]
pub struct Ticket {
    key: RsaPrivateKey,
    /// The public key as `openssl rsa -pubout` prints it (SubjectPublicKeyInfo PEM, LF).
    public_pem: String,
    /// md5 of `public_pem`, lower-case hex: the server's name for the ticket.
    digest: String,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket")
            .field("digest", &self.digest)
            .finish_non_exhaustive()
    }
}

fn bad(e: impl std::fmt::Display) -> ChirpError {
    ChirpError::Ticket(e.to_string())
}

impl Ticket {
    /// A new key pair of [`TICKET_BITS`] bits.
    pub fn generate() -> Result<Ticket, ChirpError> {
        let key = RsaPrivateKey::new(&mut rand::thread_rng(), TICKET_BITS).map_err(bad)?;
        Ticket::from_key(key)
    }

    /// A ticket from its private key in PEM (PKCS#8 `PRIVATE KEY` or PKCS#1 `RSA PRIVATE
    /// KEY`). Lines starting with `#` are skipped, so the ticket files the `chirp` tool writes
    /// load too; white space inside the base64 body does not matter, so a PEM whose newlines
    /// became spaces (as in an XML attribute) loads as well.
    pub fn from_pem(text: &str) -> Result<Ticket, ChirpError> {
        let not_pem = || bad("not an RSA private key in PEM");
        let kept: String = text
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n");
        let body = kept
            .split_once("PRIVATE KEY-----")
            .and_then(|(_, rest)| rest.split_once("-----END"))
            .map(|(body, _)| body)
            .ok_or_else(not_pem)?;
        let b64: String = body.chars().filter(|c| !c.is_whitespace()).collect();
        let der = base64ct::Base64::decode_vec(&b64).map_err(|_| not_pem())?;
        let key = RsaPrivateKey::from_pkcs8_der(&der)
            .or_else(|_| RsaPrivateKey::from_pkcs1_der(&der))
            .map_err(|e| bad(format!("not an RSA private key in PEM: {e}")))?;
        Ticket::from_key(key)
    }

    fn from_key(key: RsaPrivateKey) -> Result<Ticket, ChirpError> {
        let public_pem = key
            .to_public_key()
            .to_public_key_pem(LineEnding::LF)
            .map_err(bad)?;
        let digest = hex::encode(Md5::digest(public_pem.as_bytes()));
        Ok(Ticket {
            key,
            public_pem,
            digest,
        })
    }

    /// The private key as PKCS#8 PEM: what the holder needs to authenticate.
    pub fn to_pem(&self) -> Result<String, ChirpError> {
        Ok(self
            .key
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(bad)?
            .to_string())
    }

    /// The private key as one line (the PEM with its newlines turned into spaces), for places
    /// that carry no newlines, such as an XML attribute; [`Ticket::from_pem`] reads it back.
    pub fn to_token(&self) -> Result<String, ChirpError> {
        Ok(self
            .to_pem()?
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" "))
    }

    /// The public key text sent to `ticket_register`.
    pub fn public_pem(&self) -> &str {
        &self.public_pem
    }

    /// md5 hex of the public key: the ticket's name on the wire.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// The server's subject for this ticket, as used in `ticket_modify` and ACLs.
    pub fn subject(&self) -> String {
        format!("ticket:{}", self.digest)
    }

    /// The answer to a challenge: the challenge itself, PKCS#1 v1.5-signed without a digest
    /// (what `openssl pkeyutl -sign` does, and what the server verifies).
    pub(crate) fn sign(&self, challenge: &[u8]) -> Result<Vec<u8>, ChirpError> {
        self.key
            .sign(Pkcs1v15Sign::new_unprefixed(), challenge)
            .map_err(bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trip_keeps_the_digest_and_skips_comments() {
        let t = Ticket::generate().unwrap();
        assert_eq!(t.digest().len(), 32);
        assert!(t.public_pem().starts_with("-----BEGIN PUBLIC KEY-----\n"));
        let file = format!("# Chirp Ticket\n# made by a test\n{}", t.to_pem().unwrap());
        let back = Ticket::from_pem(&file).unwrap();
        assert_eq!(back.digest(), t.digest());
        // As an XML attribute value normalises it: newlines become spaces.
        let flat = t.to_pem().unwrap().replace('\n', " ");
        assert_eq!(Ticket::from_pem(&flat).unwrap().digest(), t.digest());
        let token = t.to_token().unwrap();
        assert!(!token.contains('\n'));
        assert_eq!(Ticket::from_pem(&token).unwrap().digest(), t.digest());
        assert_eq!(back.subject(), format!("ticket:{}", t.digest()));
        assert!(!format!("{t:?}").contains("PRIVATE"));
        let sig = t.sign(&[7u8; 64]).unwrap();
        assert_eq!(sig.len(), TICKET_BITS / 8);
    }

    #[test]
    fn garbage_is_a_clear_error() {
        let err =
            Ticket::from_pem("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
                .unwrap_err();
        assert!(err.to_string().contains("not an RSA private key"), "{err}");
        assert!(Ticket::from_pem("").is_err());
    }
}
