//! Signed work: the manager signs every assignment with the project's Ed25519 key, and an agent
//! acts only on assignments that verify against the public key in its config. A rogue XMPP
//! account or a compromised XMPP server can deliver stanzas to an agent, but cannot make it run
//! anything: it does not hold the private key.
//!
//! What is signed is [`canonical_bytes`]: a byte encoding of every field of the [`Assignment`]
//! (job, attempt, lease, name, command, environment, inputs with their URLs and digests,
//! outputs, limits, network, upload URL and token) and of its [`Seal`]'s recipient (agent name
//! and bare JID) and expiry. It is defined here, independent of XML, so that no XML
//! serializer's choices (attribute order, escaping, white space) matter; docs/PROTOCOL.md
//! spells it out with an example.
//!
//! Keys: the private key is PKCS#8 (v1 or v2) in PEM (`-----BEGIN PRIVATE KEY-----`, what
//! `copilot keygen` and `openssl genpkey -algorithm ed25519` write); the public key is its 32
//! raw bytes in standard base64 ([`PublicKey`]'s `Display` and `FromStr`).

use std::fmt;
use std::str::FromStr;

use base64ct::{Base64, Encoding};
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};

use crate::wire::{Assignment, Refusal, WireInput};

/// Length of an Ed25519 signature, in bytes.
pub const SIGNATURE_LEN: usize = 64;
/// Length of an Ed25519 public key, in bytes.
pub const PUBLIC_KEY_LEN: usize = 32;
/// The first bytes of every signed message: no signature made for anything else (another
/// payload, another version of this encoding) can pass for an assignment's.
pub const DOMAIN: &[u8] = b"copilot assignment v1\0";

const PEM_BEGIN: &str = "-----BEGIN PRIVATE KEY-----";
const PEM_END: &str = "-----END PRIVATE KEY-----";

/// The signature on an assignment, with what it binds the assignment to besides its content:
/// the one agent it is for and the time after which it is void.
#[derive(Clone, PartialEq, Eq)]
pub struct Seal {
    /// The recipient agent's name (as in its work requests).
    pub agent: String,
    /// The recipient's bare JID, as the XMPP server reported the requester's address.
    pub jid: String,
    /// Unix time (seconds) after which the assignment must not be acted on.
    pub expires: u64,
    /// Ed25519 signature over [`canonical_bytes`].
    pub signature: [u8; SIGNATURE_LEN],
}

impl Seal {
    /// The signature in standard base64, as it travels.
    pub fn signature_base64(&self) -> String {
        Base64::encode_string(&self.signature)
    }

    /// A signature from its base64 text (white space around it ignored); `None` unless it is
    /// exactly [`SIGNATURE_LEN`] bytes.
    pub fn signature_from_base64(text: &str) -> Option<[u8; SIGNATURE_LEN]> {
        let mut out = [0u8; SIGNATURE_LEN];
        match Base64::decode(text.trim(), &mut out) {
            Ok(d) if d.len() == SIGNATURE_LEN => Some(out),
            _ => None,
        }
    }
}

impl fmt::Debug for Seal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Seal")
            .field("agent", &self.agent)
            .field("jid", &self.jid)
            .field("expires", &self.expires)
            .field("signature", &self.signature_base64())
            .finish()
    }
}

/// A key that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error(
        "not a PEM private key (want -----BEGIN PRIVATE KEY----- … -----END PRIVATE KEY-----)"
    )]
    NotPem,
    #[error("not an Ed25519 private key in PKCS#8: {0}")]
    BadPrivateKey(String),
    #[error("not an Ed25519 public key: want {PUBLIC_KEY_LEN} bytes in base64")]
    BadPublicKey,
    #[error("cannot generate a key: {0}")]
    Generate(String),
}

/// The manager's signing key (the project's private key).
pub struct SigningKey(Ed25519KeyPair);

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey(public {})", self.public_key())
    }
}

/// Two keys are the same when their public halves are.
impl PartialEq for SigningKey {
    fn eq(&self, other: &Self) -> bool {
        self.public_key() == other.public_key()
    }
}

impl Eq for SigningKey {}

impl SigningKey {
    /// A fresh key from the system's random source, and its PKCS#8 PEM text (for the key file).
    pub fn generate() -> Result<(SigningKey, String), KeyError> {
        let rng = ring::rand::SystemRandom::new();
        let der =
            Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| KeyError::Generate(e.to_string()))?;
        let pem = pem_encode(der.as_ref());
        Ok((Self::from_pem(&pem)?, pem))
    }

    /// A key from PKCS#8 (v1 or v2) PEM text.
    pub fn from_pem(text: &str) -> Result<SigningKey, KeyError> {
        let der = pem_decode(text)?;
        Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
            .map(SigningKey)
            .map_err(|e| KeyError::BadPrivateKey(e.to_string()))
    }

    /// The public half, for agents' configs.
    pub fn public_key(&self) -> PublicKey {
        let mut k = [0u8; PUBLIC_KEY_LEN];
        k.copy_from_slice(self.0.public_key().as_ref());
        PublicKey(k)
    }

    /// An Ed25519 signature over `msg` (callers prefix their own domain string).
    pub(crate) fn sign_bytes(&self, msg: &[u8]) -> [u8; SIGNATURE_LEN] {
        let mut signature = [0u8; SIGNATURE_LEN];
        signature.copy_from_slice(self.0.sign(msg).as_ref());
        signature
    }

    /// Seal `a` for the agent `agent` at the bare JID `jid`, void after `expires` (unix
    /// seconds). Replaces any seal it had.
    pub fn seal(&self, a: &mut Assignment, agent: &str, jid: &str, expires: u64) {
        let signature = self.sign_bytes(&canonical_bytes(a, agent, jid, expires));
        a.seal = Some(Seal {
            agent: agent.to_owned(),
            jid: jid.to_owned(),
            expires,
            signature,
        });
    }
}

/// The project's public key, as agents hold it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey([u8; PUBLIC_KEY_LEN]);

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&Base64::encode_string(&self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        let mut k = [0u8; PUBLIC_KEY_LEN];
        match Base64::decode(s.trim(), &mut k) {
            Ok(d) if d.len() == PUBLIC_KEY_LEN => Ok(PublicKey(k)),
            _ => Err(KeyError::BadPublicKey),
        }
    }
}

impl<'de> serde::Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Who an agent is, for checking that an assignment was sealed for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recipient<'a> {
    pub agent: &'a str,
    /// The agent's bare JID, as its server bound it.
    pub jid: &'a str,
}

impl PublicKey {
    /// Whether `signature` is this key's over `msg`.
    pub(crate) fn verifies(&self, msg: &[u8], signature: &[u8; SIGNATURE_LEN]) -> bool {
        UnparsedPublicKey::new(&ED25519, &self.0)
            .verify(msg, signature)
            .is_ok()
    }

    /// Whether `a` carries a seal by this key, for `me`, that has not expired at `now` (unix
    /// seconds). Replays within the expiry are the caller's to catch (it remembers what it
    /// has run). The checks run in this order, so a refusal names an authenticated fact:
    /// unsigned, bad signature, another recipient, expired.
    pub fn check(&self, a: &Assignment, me: &Recipient<'_>, now: u64) -> Result<(), Refusal> {
        let seal = a.seal.as_ref().ok_or(Refusal::Unsigned)?;
        let msg = canonical_bytes(a, &seal.agent, &seal.jid, seal.expires);
        if !self.verifies(&msg, &seal.signature) {
            return Err(Refusal::BadSignature);
        }
        if seal.agent != me.agent || !same_bare_jid(&seal.jid, me.jid) {
            return Err(Refusal::WrongAgent);
        }
        if seal.expires < now {
            return Err(Refusal::Expired);
        }
        Ok(())
    }
}

/// JIDs' local parts and domains are case-insensitive (servers fold them); this compares them
/// so, which is all an XMPP server's normalisation changes in the plain JIDs copilot uses.
fn same_bare_jid(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// The bare part (`user@domain`) of a JID.
pub fn bare_jid(jid: &str) -> &str {
    jid.split_once('/').map_or(jid, |(bare, _)| bare)
}

/// The canonical encoding of `a` sealed for `agent` at `jid` until `expires`: what is signed.
///
/// [`DOMAIN`], then each field in a fixed order. Numbers are big-endian (`u64` 8 bytes, `u32`
/// 4 bytes, a flag 1 byte); a string is its length as a `u32` and its UTF-8 bytes; a list is
/// its length as a `u32` and its items; an optional value is a `0` byte when absent, else a `1`
/// byte and the value. Strings that travel in XML attributes have each white-space character
/// replaced by a space first, as XML servers pass them on (the decoder refuses control
/// characters in attributes, so an agent's copy never has one). The seal's own signature is
/// not part of it.
pub fn canonical_bytes(a: &Assignment, agent: &str, jid: &str, expires: u64) -> Vec<u8> {
    // Every field named, none left out with `..`: a new field must be added here to compile.
    let Assignment {
        job,
        attempt,
        lease_secs,
        name,
        command,
        env,
        inputs,
        outputs,
        limits,
        network,
        upload_url,
        upload_token,
        seal: _,
    } = a;
    let mut w = Canon(DOMAIN.to_vec());
    w.u64(*job);
    w.u32(*attempt);
    w.u32(*lease_secs);
    w.attr(name);
    w.len(command.len());
    for word in command {
        w.text(word);
    }
    w.len(env.len());
    for (k, v) in env {
        w.attr(k);
        w.text(v);
    }
    w.len(inputs.len());
    for WireInput {
        name,
        url,
        sha256,
        size,
    } in inputs
    {
        w.attr(name);
        w.attr(url);
        w.opt(sha256.as_ref(), |w, d| w.0.extend_from_slice(d.as_bytes()));
        w.opt(size.as_ref(), |w, s| w.u64(*s));
    }
    w.len(outputs.len());
    for o in outputs {
        w.attr(o);
    }
    let secs = |s: Option<crate::units::Seconds>| s.map(|s| s.0);
    let bytes = |b: Option<crate::units::Bytes>| b.map(|b| b.0);
    for limit in [
        secs(limits.wall_time),
        secs(limits.cpu_time),
        bytes(limits.memory),
        bytes(limits.disk),
        limits.processes.map(u64::from),
        bytes(limits.output),
    ] {
        w.opt(limit.as_ref(), |w, v| w.u64(*v));
    }
    w.0.push(u8::from(*network));
    w.attr(upload_url);
    w.attr(upload_token);
    w.attr(agent);
    w.attr(jid);
    w.u64(expires);
    w.0
}

/// The writer of [`canonical_bytes`].
struct Canon(Vec<u8>);

impl Canon {
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn len(&mut self, n: usize) {
        // Every list and string in a valid payload is far below 4 GiB (64 KiB in all).
        self.u32(u32::try_from(n).unwrap_or(u32::MAX));
    }
    /// Element text: as is.
    fn text(&mut self, s: &str) {
        self.len(s.len());
        self.0.extend_from_slice(s.as_bytes());
    }
    /// An attribute value: white space as a server passes it on (one byte each, so the
    /// length does not change).
    fn attr(&mut self, s: &str) {
        if s.contains(|c: char| c.is_whitespace() && c != ' ') {
            self.text(&s.replace(char::is_whitespace, " "));
        } else {
            self.text(s);
        }
    }
    fn opt<T>(&mut self, v: Option<&T>, put: impl FnOnce(&mut Self, &T)) {
        match v {
            None => self.0.push(0),
            Some(v) => {
                self.0.push(1);
                put(self, v);
            }
        }
    }
}

fn pem_encode(der: &[u8]) -> String {
    let b64 = Base64::encode_string(der);
    let mut out = String::from(PEM_BEGIN);
    out.push('\n');
    for chunk in b64.as_bytes().chunks(64) {
        // Base64 output is ASCII, so any chunk of it is valid UTF-8.
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(PEM_END);
    out.push('\n');
    out
}

fn pem_decode(text: &str) -> Result<Vec<u8>, KeyError> {
    let body = text
        .trim()
        .strip_prefix(PEM_BEGIN)
        .and_then(|rest| rest.strip_suffix(PEM_END))
        .ok_or(KeyError::NotPem)?;
    let b64: String = body.split_whitespace().collect();
    Base64::decode_vec(&b64).map_err(|_| KeyError::NotPem)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::units::{Bytes, Seconds};
    use crate::{Limits, Sha256};

    const ME: Recipient<'static> = Recipient {
        agent: "agent-1",
        jid: "agent-1@localhost",
    };
    const NOW: u64 = 1_764_900_000;

    fn assignment() -> Assignment {
        Assignment {
            job: 17,
            attempt: 1,
            lease_secs: 60,
            name: "mc-pi#3".into(),
            command: vec!["sh".into(), "mc.sh".into(), "20000".into()],
            env: [("COPILOT_INSTANCE".to_string(), "3".to_string())].into(),
            inputs: vec![WireInput {
                name: "mc.sh".into(),
                url: "http://127.0.0.1:8080/inputs/5f3c".into(),
                sha256: Some(Sha256::of(b"mc")),
                size: Some(1043),
            }],
            outputs: vec!["result.txt".into()],
            limits: Limits {
                wall_time: Some(Seconds(300)),
                output: Some(Bytes(1 << 20)),
                ..Limits::default()
            },
            network: true,
            upload_url: "http://127.0.0.1:8080/outputs/17/1".into(),
            upload_token: "9c1e".into(),
            seal: None,
        }
    }

    fn key() -> SigningKey {
        SigningKey::generate().unwrap().0
    }

    fn sealed(k: &SigningKey) -> Assignment {
        let mut a = assignment();
        k.seal(&mut a, ME.agent, ME.jid, NOW + 600);
        a
    }

    #[test]
    fn the_encoding_of_a_small_assignment_is_fixed() {
        // The example in docs/PROTOCOL.md: changing the encoding breaks every deployed agent.
        let a = Assignment {
            job: 1,
            attempt: 2,
            lease_secs: 60,
            name: "a".into(),
            command: vec!["true".into()],
            env: BTreeMap::new(),
            inputs: vec![],
            outputs: vec![],
            limits: Limits {
                wall_time: Some(Seconds(300)),
                ..Limits::default()
            },
            network: false,
            upload_url: "u".into(),
            upload_token: "t".into(),
            seal: None,
        };
        let bytes = canonical_bytes(&a, "vm-1", "vm-1@localhost", 1_764_900_000);
        assert_eq!(
            hex::encode(&bytes),
            concat!(
                "636f70696c6f742061737369676e6d656e7420763100", // "copilot assignment v1\0"
                "0000000000000001",                             // job 1
                "00000002",                                     // attempt 2
                "0000003c",                                     // lease 60
                "0000000161",                                   // name "a"
                "00000001",
                "0000000474727565",                     // command ["true"]
                "00000000",                             // env {}
                "00000000",                             // inputs []
                "00000000",                             // outputs []
                "01000000000000012c",                   // wall-time 300
                "0000000000",                           // the other five limits: none
                "00",                                   // network false
                "0000000175",                           // upload url "u"
                "0000000174",                           // token "t"
                "00000004766d2d31",                     // agent "vm-1"
                "0000000e766d2d31406c6f63616c686f7374", // jid "vm-1@localhost"
                "0000000069323ca0",                     // expires 1764900000
            )
        );
    }

    #[test]
    fn every_field_changes_the_signed_bytes() {
        let base = assignment();
        let sign = |a: &Assignment| canonical_bytes(a, ME.agent, ME.jid, NOW);
        let reference = sign(&base);
        type Change = fn(&mut Assignment);
        let changes: &[(&str, Change)] = &[
            ("job", |a| a.job += 1),
            ("attempt", |a| a.attempt += 1),
            ("lease", |a| a.lease_secs += 1),
            ("name", |a| a.name.push('x')),
            ("command word", |a| a.command[2].push('0')),
            ("command split", |a| {
                a.command = vec!["sh mc.sh".into(), "20000".into()]
            }),
            ("env value", |a| {
                a.env.insert("COPILOT_INSTANCE".into(), "4".into());
            }),
            ("env added", |a| {
                a.env.insert("LD_PRELOAD".into(), "/tmp/x.so".into());
            }),
            ("input url", |a| a.inputs[0].url.push('x')),
            ("input digest", |a| {
                a.inputs[0].sha256 = Some(Sha256::of(b"evil"))
            }),
            ("input digest dropped", |a| a.inputs[0].sha256 = None),
            ("input size", |a| a.inputs[0].size = Some(1)),
            ("output", |a| a.outputs.push("more".into())),
            ("limit", |a| a.limits.wall_time = None),
            ("memory limit", |a| a.limits.memory = Some(Bytes(1))),
            ("network", |a| a.network = false),
            ("upload url", |a| a.upload_url.push('x')),
            ("upload token", |a| a.upload_token.push('x')),
        ];
        for (what, change) in changes {
            let mut a = assignment();
            change(&mut a);
            assert_ne!(sign(&a), reference, "{what} is not covered");
        }
        assert_ne!(canonical_bytes(&base, "agent-2", ME.jid, NOW), reference);
        assert_ne!(
            canonical_bytes(&base, ME.agent, "agent-2@localhost", NOW),
            reference
        );
        assert_ne!(canonical_bytes(&base, ME.agent, ME.jid, NOW + 1), reference);
    }

    #[test]
    fn a_sealed_assignment_verifies_for_its_agent_until_it_expires() {
        let k = key();
        let a = sealed(&k);
        let public = k.public_key();
        assert_eq!(public.check(&a, &ME, NOW), Ok(()));
        assert_eq!(public.check(&a, &ME, NOW + 600), Ok(()));
        assert_eq!(public.check(&a, &ME, NOW + 601), Err(Refusal::Expired));
        let other = Recipient {
            agent: "agent-2",
            jid: "agent-2@localhost",
        };
        assert_eq!(public.check(&a, &other, NOW), Err(Refusal::WrongAgent));
        let same_account = Recipient {
            agent: "agent-2",
            jid: ME.jid,
        };
        assert_eq!(
            public.check(&a, &same_account, NOW),
            Err(Refusal::WrongAgent)
        );
        let folded = Recipient {
            agent: ME.agent,
            jid: "Agent-1@LocalHost",
        };
        assert_eq!(public.check(&a, &folded, NOW), Ok(()));
    }

    #[test]
    fn unsigned_tampered_and_foreign_assignments_are_refused() {
        let k = key();
        let public = k.public_key();
        assert_eq!(
            public.check(&assignment(), &ME, NOW),
            Err(Refusal::Unsigned)
        );
        let mut tampered = sealed(&k);
        tampered.command[1] = "mc.sH".into();
        assert_eq!(
            public.check(&tampered, &ME, NOW),
            Err(Refusal::BadSignature)
        );
        // Re-addressing a sealed assignment breaks its signature, and so does extending it.
        for change in [
            |s: &mut Seal| s.agent = "agent-2".into(),
            |s: &mut Seal| s.expires += 3600,
            |s: &mut Seal| s.signature[0] ^= 1,
        ] {
            let mut a = sealed(&k);
            change(a.seal.as_mut().unwrap());
            assert_eq!(public.check(&a, &ME, NOW), Err(Refusal::BadSignature));
        }
        let stranger = key();
        assert_eq!(
            public.check(&sealed(&stranger), &ME, NOW),
            Err(Refusal::BadSignature)
        );
    }

    #[test]
    fn whitespace_in_attributes_is_signed_as_a_server_passes_it_on() {
        let k = key();
        let mut sent = assignment();
        sent.upload_token = "-----BEGIN\nKEY-----".into();
        k.seal(&mut sent, ME.agent, ME.jid, NOW + 1);
        let mut received = sent.clone();
        received.upload_token = "-----BEGIN KEY-----".into();
        assert_eq!(k.public_key().check(&received, &ME, NOW), Ok(()));
        // Element text is signed as is: a newline in a command word is not a space.
        let mut sent = assignment();
        sent.command[2] = "a\nb".into();
        k.seal(&mut sent, ME.agent, ME.jid, NOW + 1);
        let mut received = sent.clone();
        received.command[2] = "a b".into();
        assert_eq!(
            k.public_key().check(&received, &ME, NOW),
            Err(Refusal::BadSignature)
        );
    }

    #[test]
    fn keys_round_trip_through_their_text_forms() {
        let (k, pem) = SigningKey::generate().unwrap();
        assert!(pem.starts_with(PEM_BEGIN), "{pem}");
        let again = SigningKey::from_pem(&pem).unwrap();
        assert_eq!(again.public_key(), k.public_key());
        let public: PublicKey = k.public_key().to_string().parse().unwrap();
        assert_eq!(public, k.public_key());
        // What `openssl genpkey -algorithm ed25519` writes (PKCS#8 v1, no public key inside).
        let openssl = "-----BEGIN PRIVATE KEY-----\n\
                       MC4CAQAwBQYDK2VwBCIEIJ1hsZ3v/VpguoRK9JLsLMREScVpezJpGXA7rAMcrn9g\n\
                       -----END PRIVATE KEY-----\n";
        let k = SigningKey::from_pem(openssl).unwrap();
        // RFC 8032 §7.1, test 1: this secret key's public key.
        assert_eq!(
            k.public_key().to_string(),
            "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="
        );
    }

    #[test]
    fn bad_key_text_is_an_error_not_a_panic() {
        for text in [
            "",
            "garbage",
            PEM_BEGIN,
            "-----BEGIN PRIVATE KEY-----\n!!\n-----END PRIVATE KEY-----",
        ] {
            assert!(SigningKey::from_pem(text).is_err(), "{text:?}");
        }
        let not_ed25519 = pem_encode(b"\x30\x03\x02\x01\x00");
        assert!(matches!(
            SigningKey::from_pem(&not_ed25519),
            Err(KeyError::BadPrivateKey(_))
        ));
        for text in [
            "",
            "AAAA",
            "not base64!",
            &Base64::encode_string(&[0u8; 33]),
        ] {
            assert_eq!(
                text.parse::<PublicKey>(),
                Err(KeyError::BadPublicKey),
                "{text:?}"
            );
        }
    }
}
