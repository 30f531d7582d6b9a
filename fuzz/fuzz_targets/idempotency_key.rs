//! Any bytes as an `Idempotency-Key` header value: parsed as an RFC 8941 sf-string or refused,
//! never a panic; an accepted key is at most 255 characters of printable ASCII.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(key) = gateway::idempotency::parse_sf_string(data) {
        assert!(key.len() <= 255);
        assert!(key.bytes().all(|b| (0x20..=0x7e).contains(&b)));
    }
});
