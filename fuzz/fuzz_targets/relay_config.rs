//! Any text as the relay's TOML configuration: parsed and validated without panicking; an
//! accepted configuration passes its own validation.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(config) = outbox_relay::Config::parse(text)
    {
        let _ = config.validate();
        let _ = config.redacted();
    }
});
