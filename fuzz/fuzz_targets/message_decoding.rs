//! Any bytes as what a consumer decodes from the wire: a message id property, and JSON headers
//! mapped to an AMQP field table and back. No panics; the round trip keeps every object key.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = text.parse::<outbox::MessageId>().map(|id| id.parts());
    }
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) {
        let table = consumer_lib::headers::from_json(&value);
        let back = consumer_lib::headers::to_json(&table);
        if let (Some(a), Some(b)) = (value.as_object(), back.as_object()) {
            for key in a.keys().filter(|k| k.len() <= 255) {
                assert!(b.contains_key(key), "header {key} lost in the round trip");
            }
        }
    }
});
