//! Browser logins to the manager's dashboard without a server-side session store: a login code
//! (in a link that `copilot dashboard` or `copilot up` prints) and the session cookie it is
//! exchanged for are both `<expiry>.<mac>`, where `expiry` is a unix time in seconds and `mac`
//! is HMAC-SHA256 keyed with the manager's API token over a purpose tag and the expiry.
//!
//! Whoever holds the API token can mint either, so the CLI makes login links locally; the
//! manager checks them with the same token. Both die at their expiry or when the API token
//! changes, and a restart of the manager does not log anybody out. The two purposes use
//! different tags, so a login code is never a valid cookie or the other way round.

use hmac::{Hmac, Mac};

/// How long a login code printed by the CLI stays valid.
pub const LOGIN_CODE_TTL_SECS: u64 = 12 * 3600;
/// How long a dashboard session lasts.
pub const SESSION_TTL_SECS: u64 = 7 * 24 * 3600;
/// The longest any code or cookie may be valid for, counted from now; longer ones are refused.
pub const MAX_TTL_SECS: u64 = 30 * 24 * 3600;

/// What a token stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// A login code, exchanged once for a session cookie.
    Login,
    /// The dashboard's session cookie.
    Session,
}

impl Purpose {
    fn tag(self) -> &'static [u8] {
        match self {
            Purpose::Login => b"copilot-dashboard-login-v1:",
            Purpose::Session => b"copilot-dashboard-session-v1:",
        }
    }
}

/// Why a login code or session cookie was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LoginError {
    #[error("not a login code or session (want <expiry>.<64 hex digits>)")]
    Malformed,
    #[error("it expired; get a fresh link with `copilot dashboard`")]
    Expired,
    #[error("it is valid for too long (more than {MAX_TTL_SECS} s from now)")]
    TooLong,
    #[error("it was not made with this manager's API token")]
    BadMac,
}

fn mac(api_token: &str, purpose: Purpose, expiry: u64) -> Hmac<sha2::Sha256> {
    // HMAC accepts keys of any length: new_from_slice cannot fail for it.
    let mut m = <Hmac<sha2::Sha256> as Mac>::new_from_slice(api_token.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    m.update(purpose.tag());
    m.update(expiry.to_string().as_bytes());
    m
}

/// A code or cookie value for `purpose`, valid until `expiry` (unix seconds).
pub fn mint(api_token: &str, purpose: Purpose, expiry: u64) -> String {
    let tag = mac(api_token, purpose, expiry).finalize().into_bytes();
    format!("{expiry}.{}", hex::encode(tag))
}

/// Check a code or cookie value for `purpose` at unix time `now`; returns its expiry.
pub fn verify(api_token: &str, purpose: Purpose, value: &str, now: u64) -> Result<u64, LoginError> {
    let (expiry, tag) = value.split_once('.').ok_or(LoginError::Malformed)?;
    if expiry.is_empty() || expiry.len() > 20 || !expiry.bytes().all(|b| b.is_ascii_digit()) {
        return Err(LoginError::Malformed);
    }
    let expiry: u64 = expiry.parse().map_err(|_| LoginError::Malformed)?;
    let mut raw = [0u8; 32];
    if tag.len() != 64 || hex::decode_to_slice(tag, &mut raw).is_err() {
        return Err(LoginError::Malformed);
    }
    // Constant-time comparison.
    mac(api_token, purpose, expiry)
        .verify_slice(&raw)
        .map_err(|_| LoginError::BadMac)?;
    if expiry <= now {
        return Err(LoginError::Expired);
    }
    if expiry - now > MAX_TTL_SECS {
        return Err(LoginError::TooLong);
    }
    Ok(expiry)
}

/// A link that logs a browser in to the dashboard of the manager at `manager_url` for
/// [`LOGIN_CODE_TTL_SECS`] from `now` (unix seconds), then shows its work page.
pub fn login_link(manager_url: &str, api_token: &str, now: u64) -> String {
    let code = mint(api_token, Purpose::Login, now + LOGIN_CODE_TTL_SECS);
    format!("{}/ui/login?code={code}", manager_url.trim_end_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    #[test]
    fn codes_verify_with_their_token_and_purpose_only() {
        let code = mint("tok", Purpose::Login, NOW + 60);
        assert_eq!(verify("tok", Purpose::Login, &code, NOW), Ok(NOW + 60));
        assert_eq!(
            verify("other", Purpose::Login, &code, NOW),
            Err(LoginError::BadMac)
        );
        assert_eq!(
            verify("tok", Purpose::Session, &code, NOW),
            Err(LoginError::BadMac)
        );
        assert_eq!(
            verify("tok", Purpose::Login, &code, NOW + 60),
            Err(LoginError::Expired)
        );
        // A changed expiry breaks the MAC.
        let (_, tag) = code.split_once('.').unwrap();
        let forged = format!("{}.{tag}", NOW + 6000);
        assert_eq!(
            verify("tok", Purpose::Login, &forged, NOW),
            Err(LoginError::BadMac)
        );
        let far = mint("tok", Purpose::Session, NOW + MAX_TTL_SECS + 1);
        assert_eq!(
            verify("tok", Purpose::Session, &far, NOW),
            Err(LoginError::TooLong)
        );
    }

    #[test]
    fn login_links_carry_a_code_for_the_manager() {
        let link = login_link("http://127.0.0.1:8080/", "tok", NOW);
        let code = link
            .strip_prefix("http://127.0.0.1:8080/ui/login?code=")
            .unwrap();
        assert_eq!(
            verify("tok", Purpose::Login, code, NOW + 60),
            Ok(NOW + LOGIN_CODE_TTL_SECS)
        );
    }

    #[test]
    fn malformed_values_are_refused_without_panicking() {
        let good = mint("tok", Purpose::Login, NOW + 1);
        let (_, tag) = good.split_once('.').unwrap();
        for bad in [
            String::new(),
            ".".into(),
            "123".into(),
            format!(".{tag}"),
            format!("+5.{tag}"),
            format!("99999999999999999999999.{tag}"),
            format!("{}.{}", NOW + 1, &tag[1..]),
            format!("{}.{}x", NOW + 1, &tag[1..]),
            format!("{}.{tag}.", NOW + 1),
            "é.é".into(),
        ] {
            assert_eq!(
                verify("tok", Purpose::Login, &bad, NOW),
                Err(LoginError::Malformed),
                "{bad:?}"
            );
        }
    }
}
