//! Sessions and CSRF tokens, both stateless and signed with HMAC-SHA256 under a key drawn at
//! random when the process starts (so a relay restart logs everyone out, and no key is ever
//! configured or stored).
//!
//! - The session cookie is `v1.<expires unix seconds>.<nonce hex>.<mac hex>`; the MAC covers the
//!   expiry and the nonce, so neither can be changed or made up without the key.
//! - The CSRF token of a session is `HMAC(key, "csrf" | nonce)`: tied to that one session, so a
//!   token read from another session (or another relay process) is refused.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The name of the session cookie.
pub const COOKIE: &str = "relay_dashboard";

/// How long a login lasts, seconds.
pub const SESSION_SECONDS: i64 = 8 * 3600;

/// A verified session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    nonce: String,
    /// When it stops being accepted (unix seconds).
    pub expires: i64,
}

/// The per-process signing key.
pub struct Keys {
    key: [u8; 32],
}

impl Keys {
    /// A fresh random key.
    pub fn random() -> Self {
        Keys {
            key: rand::random(),
        }
    }

    fn mac(&self, label: &[u8], parts: &[&[u8]]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(label);
        for p in parts {
            // Length-prefixed, so ("ab", "c") and ("a", "bc") sign differently.
            mac.update(&(p.len() as u64).to_be_bytes());
            mac.update(p);
        }
        mac
    }

    /// A new session expiring `SESSION_SECONDS` after `now`, and its cookie value.
    pub fn issue(&self, now: i64) -> (Session, String) {
        let nonce = hex::encode(rand::random::<[u8; 16]>());
        let expires = now + SESSION_SECONDS;
        let tag = self
            .mac(
                b"session",
                &[expires.to_string().as_bytes(), nonce.as_bytes()],
            )
            .finalize()
            .into_bytes();
        let value = format!("v1.{expires}.{nonce}.{}", hex::encode(tag));
        (Session { nonce, expires }, value)
    }

    /// The session a cookie value stands for, if it was issued by this process and has not
    /// expired at `now`.
    pub fn verify(&self, value: &str, now: i64) -> Option<Session> {
        let mut parts = value.split('.');
        let (Some("v1"), Some(expires), Some(nonce), Some(tag), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return None;
        };
        let tag = hex::decode(tag).ok()?;
        self.mac(b"session", &[expires.as_bytes(), nonce.as_bytes()])
            .verify_slice(&tag)
            .ok()?;
        let expires: i64 = expires.parse().ok()?;
        (expires > now).then(|| Session {
            nonce: nonce.to_owned(),
            expires,
        })
    }

    /// The CSRF token every form of `session` carries.
    pub fn csrf_token(&self, session: &Session) -> String {
        hex::encode(
            self.mac(b"csrf", &[session.nonce.as_bytes()])
                .finalize()
                .into_bytes(),
        )
    }

    /// Whether `given` is `session`'s CSRF token (compared in constant time).
    pub fn check_csrf(&self, session: &Session, given: &str) -> bool {
        match hex::decode(given) {
            Ok(tag) => self
                .mac(b"csrf", &[session.nonce.as_bytes()])
                .verify_slice(&tag)
                .is_ok(),
            Err(_) => false,
        }
    }
}

/// The value of cookie `name` in a `Cookie` header.
pub fn cookie_value<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_session_verifies_until_it_expires() {
        let keys = Keys::random();
        let (session, cookie) = keys.issue(1000);
        assert_eq!(keys.verify(&cookie, 1001), Some(session));
        assert_eq!(keys.verify(&cookie, 1000 + SESSION_SECONDS), None);
    }

    #[test]
    fn tampered_or_foreign_cookie_is_refused() {
        let keys = Keys::random();
        let (_, cookie) = keys.issue(1000);
        let longer = cookie.replacen(".", ".9", 1);
        assert_eq!(keys.verify(&longer, 1001), None, "expiry changed");
        assert_eq!(Keys::random().verify(&cookie, 1001), None, "other process");
        assert_eq!(keys.verify("v1.99999999999.00.00", 1001), None);
        assert_eq!(keys.verify("", 1001), None);
    }

    #[test]
    fn csrf_token_belongs_to_its_session() {
        let keys = Keys::random();
        let (a, _) = keys.issue(1000);
        let (b, _) = keys.issue(1000);
        let token = keys.csrf_token(&a);
        assert!(keys.check_csrf(&a, &token));
        assert!(!keys.check_csrf(&b, &token));
        assert!(!keys.check_csrf(&a, ""));
        assert!(!keys.check_csrf(&a, "not hex"));
    }

    #[test]
    fn cookie_is_found_among_others() {
        let h = "a=1; relay_dashboard=v1.2.3.4; b=2";
        assert_eq!(cookie_value(h, COOKIE), Some("v1.2.3.4"));
        assert_eq!(cookie_value("a=1", COOKIE), None);
    }
}
