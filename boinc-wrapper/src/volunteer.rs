//! The volunteer's identity as the agent carries it: BOINC user, host and team ids, and a
//! per-host token. The token is an HMAC-SHA256 of the host id keyed with the account
//! authenticator, so the project (which knows every authenticator) can check that credit
//! claimed for a user really comes from that user's host, while the token reveals nothing
//! about the authenticator itself. The authenticator never leaves the wrapper.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::api::init_data::InitData;

/// Domain separation for the token, and its version.
const TOKEN_CONTEXT: &str = "copilot-boinc-host-token-v1";

/// Who the agent works for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Volunteer {
    pub user_id: i64,
    pub host_id: i64,
    pub team_id: i64,
    /// 64 hex digits; `None` when the client gave no authenticator.
    pub host_token: Option<String>,
}

/// `hex(HMAC-SHA256(key = authenticator, TOKEN_CONTEXT ":" host_id))`.
pub fn host_token(authenticator: &str, host_id: i64) -> String {
    // HMAC accepts keys of any length, so new_from_slice cannot fail; the expect documents it.
    let mut mac = Hmac::<Sha256>::new_from_slice(authenticator.as_bytes())
        .expect("HMAC takes keys of any length");
    mac.update(format!("{TOKEN_CONTEXT}:{host_id}").as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

impl Volunteer {
    /// The identity in init_data.xml.
    pub fn from_init_data(d: &InitData) -> Volunteer {
        let auth = d.authenticator.trim();
        Volunteer {
            user_id: d.userid,
            host_id: d.hostid,
            team_id: d.teamid,
            host_token: (!auth.is_empty()).then(|| host_token(auth, d.hostid)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_depends_on_host_and_key_and_hides_the_key() {
        let a = host_token("0123456789abcdef", 1);
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(a, host_token("0123456789abcdef", 1), "deterministic");
        assert_ne!(a, host_token("0123456789abcdef", 2));
        assert_ne!(a, host_token("0123456789abcdee", 1));
        assert!(!a.contains("0123456789abcdef"));
        // Computed independently (Python's hmac module).
        assert_eq!(
            a,
            "4db8b07767232ac6378c1e45cd8929d077a0590cc4a956ee188a0e6df384d6ee"
        );
    }

    #[test]
    fn identity_from_init_data() {
        let d = InitData {
            userid: 42,
            hostid: 7,
            teamid: 3,
            authenticator: " secret ".into(),
            ..InitData::default()
        };
        let v = Volunteer::from_init_data(&d);
        assert_eq!((v.user_id, v.host_id, v.team_id), (42, 7, 3));
        assert_eq!(
            v.host_token.as_deref(),
            Some(host_token("secret", 7).as_str())
        );
        let anon = Volunteer::from_init_data(&InitData::default());
        assert_eq!(anon.host_token, None);
    }
}
