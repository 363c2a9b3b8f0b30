//! The secure channel's input: what a device on the LAN sends before it knows the shop
//! secret (the bytes before the WebSocket upgrade, the first handshake message), and what a
//! peer holding the secret can send once the channel is up (any sealed plaintext, any raw
//! bytes). The receiving side is checked against a model of the chunk reassembly: a frame is
//! delivered exactly when its last chunk arrives, refused past the frame limit, and every
//! message that is not the next sealed one is refused.
#![no_main]
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use possync_node::transport::fuzzing::{self, Channel, MAX_TRANSPORT_MESSAGE, TAG_LEN, TransportError};

#[derive(Debug, Arbitrary)]
enum Op {
    /// The sending peer seals `flag` + `data`.
    Sealed { flag: u8, data: Vec<u8> },
    /// The sending peer seals a chunk, then a byte of the message is flipped on the way.
    Tampered { flag: u8, data: Vec<u8>, at: u16 },
    /// Bytes that were never sealed.
    Raw(Vec<u8>),
}

#[derive(Debug, Arbitrary)]
struct Input {
    http_head: Vec<u8>,
    first_handshake_message: Vec<u8>,
    /// The frame limit, from 1 byte to 64 KiB.
    limit: u16,
    ops: Vec<Op>,
}

fuzz_target!(|input: Input| {
    let _ = fuzzing::is_plain_http_request(&input.http_head);
    // Without the secret nothing authenticates.
    assert!(!fuzzing::responder_accepts("the shop's secret", &input.first_handshake_message));

    let limit = usize::from(input.limit).max(1);
    let mut channel = Channel::established("the shop's secret");
    let mut partial: Vec<u8> = Vec::new();
    for op in input.ops {
        let (message, plaintext) = match op {
            Op::Sealed { flag, data } => match channel.seal(flag, &data) {
                Some(message) => (message, Some((flag, data))),
                None => return,
            },
            Op::Tampered { flag, data, at } => match channel.seal(flag, &data) {
                Some(mut message) => {
                    let at = usize::from(at) % message.len();
                    message[at] ^= 0x01;
                    (message, None)
                }
                None => return,
            },
            Op::Raw(bytes) => (bytes, None),
        };
        let opened = channel.open(&message, limit);
        let Some((flag, data)) = plaintext else {
            assert!(
                matches!(opened, Err(TransportError::Decrypt)),
                "unsealed or tampered bytes opened: {opened:?}"
            );
            return;
        };
        if 1 + data.len() + TAG_LEN > MAX_TRANSPORT_MESSAGE {
            assert!(matches!(opened, Err(TransportError::Decrypt)), "an oversized message opened");
            return;
        }
        if flag > 1 {
            assert!(matches!(opened, Err(TransportError::Decrypt)), "flag {flag} accepted");
            return;
        }
        if partial.len() + data.len() > limit {
            assert!(
                matches!(opened, Err(TransportError::FrameTooLarge { .. })),
                "over the limit: {opened:?}"
            );
            return;
        }
        partial.extend_from_slice(&data);
        match opened {
            Ok(Some(frame)) => {
                assert_eq!(flag, 1, "a frame delivered before its last chunk");
                assert_eq!(frame, partial, "the frame is not what was sent");
                partial.clear();
            }
            Ok(None) => assert_eq!(flag, 0, "the last chunk did not deliver its frame"),
            Err(error) => panic!("a valid chunk refused: {error}"),
        }
    }
});
