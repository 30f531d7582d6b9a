//! Webhook signatures (the Svix scheme): HMAC-SHA256, keyed with the endpoint secret's UTF-8
//! bytes, over `{id}.{timestamp}.{body}`, where `id` is the `Webhook-Id` header (the
//! notification id in decimal), `timestamp` the `Webhook-Timestamp` header (Unix seconds) and
//! `body` the raw request body. `Webhook-Signature` carries `v1,<base64 of the MAC>`, one per
//! valid secret, separated by a space: during a rotation both the new and the previous secret
//! sign, so a receiver holding either accepts the request.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Header with the notification id (stable across attempts: receivers dedupe on it).
pub const HEADER_ID: &str = "webhook-id";
/// Header with the signing time in Unix seconds.
pub const HEADER_TIMESTAMP: &str = "webhook-timestamp";
/// Header with the signatures.
pub const HEADER_SIGNATURE: &str = "webhook-signature";
/// Header with the event type.
pub const HEADER_EVENT: &str = "webhook-event";
/// Header with the attempt number (1 for the first).
pub const HEADER_ATTEMPT: &str = "webhook-attempt";

/// The MAC of one message under one secret, base64 (standard alphabet, padded).
pub fn mac_base64(secret: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    STANDARD.encode(mac.finalize().into_bytes())
}

/// The `Webhook-Signature` header value for `secrets` (current first, then previous).
pub fn signature_header(secrets: &[&str], id: &str, timestamp: i64, body: &[u8]) -> String {
    secrets
        .iter()
        .map(|s| format!("v1,{}", mac_base64(s.as_bytes(), id, timestamp, body)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Why [`verify`] refused a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The timestamp is further from now than the tolerance (a replay, or a wrong clock).
    #[error("timestamp outside the tolerance")]
    StaleTimestamp,
    /// No `v1` signature in the header matches.
    #[error("no matching signature")]
    NoMatch,
}

/// Receiver-side check: true when one of the header's `v1` signatures is the MAC of
/// `{id}.{timestamp}.{body}` under `secret` and `timestamp` is within `tolerance_secs` of `now`.
pub fn verify(
    secret: &str,
    id: &str,
    timestamp: i64,
    body: &[u8],
    header: &str,
    now: i64,
    tolerance_secs: i64,
) -> Result<(), VerifyError> {
    if (now - timestamp).abs() > tolerance_secs {
        return Err(VerifyError::StaleTimestamp);
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    for sig in header.split(' ') {
        let Some(b64) = sig.strip_prefix("v1,") else {
            continue;
        };
        let Ok(raw) = STANDARD.decode(b64) else {
            continue;
        };
        // `verify_slice` compares in constant time.
        if mac.clone().verify_slice(&raw).is_ok() {
            return Ok(());
        }
    }
    Err(VerifyError::NoMatch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_an_independent_hmac_tool() {
        // printf '7.100.{}' | openssl dgst -sha256 -hmac new-secret-0123456 -binary | base64
        assert_eq!(
            mac_base64(b"new-secret-0123456", "7", 100, b"{}"),
            "tueHc611UMTU/j74MVRqd1BrGX1aRwQELJ1dYaW5t6Y="
        );
    }

    #[test]
    fn signature_verifies_under_each_rotated_secret_and_fails_when_tampered() {
        let header = signature_header(
            &["new-secret-0123456", "old-secret-0123456"],
            "7",
            100,
            b"{}",
        );
        assert_eq!(header.split(' ').count(), 2);
        assert!(verify("new-secret-0123456", "7", 100, b"{}", &header, 100, 300).is_ok());
        assert!(verify("old-secret-0123456", "7", 100, b"{}", &header, 100, 300).is_ok());
        assert_eq!(
            verify("new-secret-0123456", "7", 100, b"{ }", &header, 100, 300),
            Err(VerifyError::NoMatch)
        );
        assert_eq!(
            verify("new-secret-0123456", "7", 100, b"{}", &header, 1000, 300),
            Err(VerifyError::StaleTimestamp)
        );
    }
}
