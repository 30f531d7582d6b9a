//! The `Idempotency-Key` value: an RFC 8941 sf-string (the IETF draft's definition), at most 255
//! characters, and what is derived from it: the request fingerprint and the key sent upstream.

use sha2::{Digest, Sha256};

/// Longest key accepted, in characters of the unescaped string.
pub const MAX_KEY_LEN: usize = 255;

/// Parses a header value as an RFC 8941 sf-string: a double-quoted string of printable ASCII in
/// which only `"` and `\` are escaped. Parameters (`;a=1`) and other item types are refused.
pub fn parse_sf_string(raw: &[u8]) -> Result<String, &'static str> {
    let inner = raw
        .strip_prefix(b"\"")
        .ok_or("must be an RFC 8941 string: a double-quoted value such as \"8e03978e\"")?;
    let mut out = String::new();
    let mut bytes = inner.iter();
    loop {
        match bytes.next() {
            None => return Err("the string is not closed by a double quote"),
            Some(b'"') => break,
            Some(b'\\') => match bytes.next() {
                Some(c @ (b'"' | b'\\')) => out.push(*c as char),
                _ => return Err("a backslash may only escape '\"' or '\\'"),
            },
            Some(c @ 0x20..=0x7e) => out.push(*c as char),
            Some(_) => return Err("only printable ASCII characters are allowed"),
        }
    }
    if bytes.next().is_some() {
        return Err("nothing may follow the closing double quote (no parameters)");
    }
    if out.is_empty() {
        return Err("the key must not be empty");
    }
    if out.len() > MAX_KEY_LEN {
        return Err("the key is longer than 255 characters");
    }
    Ok(out)
}

/// SHA-256 over method, path with query, and body: a reused key with any of them changed is a
/// different request (422).
pub fn fingerprint(method: &http::Method, path_and_query: &str, body: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(method.as_str().as_bytes());
    h.update([0]);
    h.update(path_and_query.as_bytes());
    h.update([0]);
    h.update(body);
    h.finalize().into()
}

/// The key forwarded upstream: the same for every gateway and every retry of (caller, key), so a
/// provider that dedupes on it also fences a retry that happens after our own lease expired; and
/// it reveals neither the caller nor the client's key.
pub fn upstream_key(caller: &str, key: &str) -> String {
    let mut h = Sha256::new();
    h.update(caller.as_bytes());
    h.update([0]);
    h.update(key.as_bytes());
    format!("\"{}\"", hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_printable_strings_are_keys() {
        assert_eq!(parse_sf_string(b"\"abc-123\"").unwrap(), "abc-123");
        assert_eq!(parse_sf_string(b"\"a\\\"b\\\\c\"").unwrap(), "a\"b\\c");
    }

    #[test]
    fn malformed_keys_are_refused() {
        for bad in [
            &b"abc"[..],
            b"\"abc",
            b"\"\"",
            b"\"a\";p=1",
            b"\"a\\nb\"",
            b"\"caf\xc3\xa9\"",
            b"\"tab\there\"",
        ] {
            assert!(
                parse_sf_string(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = format!("\"{}\"", "k".repeat(256));
        assert!(parse_sf_string(long.as_bytes()).is_err());
        let max = format!("\"{}\"", "k".repeat(255));
        assert!(parse_sf_string(max.as_bytes()).is_ok());
    }

    #[test]
    fn upstream_key_depends_on_caller_and_key() {
        assert_eq!(upstream_key("a", "k"), upstream_key("a", "k"));
        assert_ne!(upstream_key("a", "k"), upstream_key("b", "k"));
        assert_ne!(upstream_key("a\0k", ""), upstream_key("a", "\0k"));
        assert!(parse_sf_string(upstream_key("a", "k").as_bytes()).is_ok());
    }
}
