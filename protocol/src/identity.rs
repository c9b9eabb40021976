//! Agent identity tokens. An agent that logs in anonymously (SASL ANONYMOUS on an agents-only
//! XMPP host: no per-VM account or password, and a new random JID on every login) proves its
//! name with a token in its work requests: the project's Ed25519 key (the one that signs
//! assignments, see [`crate::signing`]) signed "this agent name, until this time". The manager
//! checks it against its own public key; nothing secret is baked into the image, and a token
//! names one agent, so a leaked one is only good for that name until it expires.
//!
//! A token is `v1.<agent name, base64>.<expiry, unix seconds>.<signature, base64>`; the signed
//! bytes are [`DOMAIN`], the name's length (`u32`, big-endian) and bytes, and the expiry
//! (`u64`, big-endian).

use base64ct::{Base64, Encoding};

use crate::signing::{PublicKey, SigningKey, SIGNATURE_LEN};

/// The first bytes of every signed token: nothing signed for another purpose passes for one.
pub const DOMAIN: &[u8] = b"copilot agent token v1\0";
/// Longest token accepted, in bytes.
pub const MAX_TOKEN_BYTES: usize = 512;

/// Why a token does not prove an agent's name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("not an agent token (want v1.<name>.<expiry>.<signature>)")]
    Malformed,
    #[error("the token's signature is not the project's")]
    BadSignature,
    #[error("the token is for agent {token_agent:?}, not {agent:?}")]
    WrongAgent { token_agent: String, agent: String },
    #[error("the token expired at {expires} (unix time)")]
    Expired { expires: u64 },
}

/// A signed statement that an agent may use a name until a time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentToken {
    pub agent: String,
    /// Unix time (seconds) after which the token is void.
    pub expires: u64,
    signature: [u8; SIGNATURE_LEN],
}

fn signed_bytes(agent: &str, expires: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(DOMAIN.len() + 12 + agent.len());
    b.extend_from_slice(DOMAIN);
    b.extend_from_slice(&(agent.len() as u32).to_be_bytes());
    b.extend_from_slice(agent.as_bytes());
    b.extend_from_slice(&expires.to_be_bytes());
    b
}

impl AgentToken {
    /// A token for `agent`, valid until `expires` (unix seconds), signed with `key`.
    pub fn issue(key: &SigningKey, agent: &str, expires: u64) -> AgentToken {
        AgentToken {
            agent: agent.to_owned(),
            expires,
            signature: key.sign_bytes(&signed_bytes(agent, expires)),
        }
    }

    /// The token as text, for an agent's config.
    pub fn encode(&self) -> String {
        format!(
            "v1.{}.{}.{}",
            Base64::encode_string(self.agent.as_bytes()),
            self.expires,
            Base64::encode_string(&self.signature)
        )
    }

    /// A token from its text; never panics, whatever the text.
    pub fn decode(text: &str) -> Result<AgentToken, TokenError> {
        if text.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Malformed);
        }
        let mut parts = text.trim().split('.');
        let (Some("v1"), Some(agent), Some(expires), Some(sig), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(TokenError::Malformed);
        };
        let agent = Base64::decode_vec(agent)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .filter(|a| !a.is_empty())
            .ok_or(TokenError::Malformed)?;
        let expires = expires.parse().map_err(|_| TokenError::Malformed)?;
        let mut signature = [0u8; SIGNATURE_LEN];
        match Base64::decode(sig, &mut signature) {
            Ok(d) if d.len() == SIGNATURE_LEN => {}
            _ => return Err(TokenError::Malformed),
        }
        Ok(AgentToken {
            agent,
            expires,
            signature,
        })
    }

    /// Whether this token, signed by `key`, lets `agent` use its name at `now` (unix seconds).
    pub fn verify(&self, key: &PublicKey, agent: &str, now: u64) -> Result<(), TokenError> {
        if !key.verifies(&signed_bytes(&self.agent, self.expires), &self.signature) {
            return Err(TokenError::BadSignature);
        }
        if self.agent != agent {
            return Err(TokenError::WrongAgent {
                token_agent: self.agent.clone(),
                agent: agent.to_owned(),
            });
        }
        if self.expires < now {
            return Err(TokenError::Expired {
                expires: self.expires,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_proves_one_name_until_it_expires() {
        let (key, _) = SigningKey::generate().unwrap();
        let public = key.public_key();
        let text = AgentToken::issue(&key, "vm-42", 1_000).encode();
        assert!(text.starts_with("v1."), "{text}");
        let t = AgentToken::decode(&text).unwrap();
        assert_eq!((t.agent.as_str(), t.expires), ("vm-42", 1_000));
        t.verify(&public, "vm-42", 999).unwrap();
        t.verify(&public, "vm-42", 1_000).unwrap();
        assert_eq!(
            t.verify(&public, "vm-42", 1_001),
            Err(TokenError::Expired { expires: 1_000 })
        );
        assert!(matches!(
            t.verify(&public, "vm-43", 0),
            Err(TokenError::WrongAgent { .. })
        ));
        let (other, _) = SigningKey::generate().unwrap();
        assert_eq!(
            t.verify(&other.public_key(), "vm-42", 0),
            Err(TokenError::BadSignature)
        );
        // A longer life, a changed name: the signature no longer matches.
        let mut parts: Vec<&str> = text.split('.').collect();
        parts[2] = "9999999999";
        let forged = AgentToken::decode(&parts.join(".")).unwrap();
        assert_eq!(
            forged.verify(&public, "vm-42", 0),
            Err(TokenError::BadSignature)
        );
        let renamed = text.replacen(
            &Base64::encode_string(b"vm-42"),
            &Base64::encode_string(b"vm-4"),
            1,
        );
        let renamed = AgentToken::decode(&renamed).unwrap();
        assert_eq!(
            renamed.verify(&public, "vm-4", 0),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        for text in [
            "",
            "v1",
            "v2.dm0.1.AAAA",
            "v1.dm0.1",
            "v1..1.AAAA",
            "v1.dm0.x.AAAA",
            "v1.dm0.1.AAAA",
            "v1.dm0.1.AAAA.extra",
            "v1.%%%.1.AAAA",
            &"v1.".repeat(300),
        ] {
            assert_eq!(
                AgentToken::decode(text),
                Err(TokenError::Malformed),
                "{text:?}"
            );
        }
    }
}
