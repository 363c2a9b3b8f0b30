//! Every text frame a peer sends goes through `Message::parse`. A frame it accepts encodes to
//! a frame that parses to the same message (what a relay sends on is what it received).
#![no_main]
use libfuzzer_sys::fuzz_target;
use possync_core::protocol::message::{Message, peek_type_action};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = peek_type_action(text);
    if let Ok(message) = Message::parse(text) {
        let _ = (message.body.kind(), message.body.action());
        let encoded = message.encode();
        let again = Message::parse(&encoded).expect("an encoded message parses");
        assert_eq!(again, message, "{text} encoded as {encoded}");
        assert_eq!(again.encode(), encoded, "encoding is stable");
    }
});
