//! Money and quantities from outside (API bodies, changes, imports): a parsed decimal prints
//! back to text that parses to the same value, and its JSON form reads back the same.
#![no_main]
use libfuzzer_sys::fuzz_target;
use possync_core::decimal;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(value) = decimal::parse(text) {
        let printed = decimal::to_text(value);
        assert_eq!(decimal::parse(&printed).ok(), Some(value), "{text:?} printed as {printed:?}");
        assert_eq!(decimal::from_json(&decimal::to_json(value)).ok(), Some(value));
    }
    let _ = decimal::parse_stored(text);
    if let Ok(json) = serde_json::from_str::<serde_json::Value>(text) {
        let _ = decimal::from_json(&json);
    }
});
