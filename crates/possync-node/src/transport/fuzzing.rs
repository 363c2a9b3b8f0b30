//! Entry points for the fuzz targets in `fuzz/` (cargo feature `fuzzing`, off in every other
//! build): the secure channel's sans-IO half, fed with bytes an attacker chooses.
//!
//! The channel's parsers are private to `transport`; these wrappers expose exactly what a
//! device on the shop LAN can reach: the bytes before the WebSocket upgrade, the first
//! handshake message (before it knows the secret) and, for a peer that knows the secret, any
//! sequence of sealed chunks.

use super::codec::{self, HANDSHAKE_MESSAGE_LEN, Opener, Sealer};
use super::plain_http;
pub use super::{TransportError, derive_psk};

/// Whether the peer port would answer these first bytes as a plain HTTP request (with 404):
/// `Some(true)`; `Some(false)` for a WebSocket upgrade or not HTTP; `None` when incomplete.
pub fn is_plain_http_request(head: &[u8]) -> Option<bool> {
    plain_http::is_plain_request(head)
}

/// Reads `message` as the initiator's first handshake message on a responder holding the
/// shop secret `secret`, as `accept` does. True when it authenticates.
pub fn responder_accepts(secret: &str, message: &[u8]) -> bool {
    let Ok(mut handshake) = codec::responder(&derive_psk(secret)) else { return false };
    let mut payload = [0u8; 2 * HANDSHAKE_MESSAGE_LEN];
    handshake.read_message(message, &mut payload).is_ok()
}

/// Largest number of frame bytes one sealed chunk carries.
pub const MAX_CHUNK_DATA: usize = codec::MAX_CHUNK_DATA;

/// Largest transport message (ciphertext with tag) the channel accepts.
pub const MAX_TRANSPORT_MESSAGE: usize = codec::MAX_TRANSPORT_MESSAGE;

/// Bytes the authentication tag adds to a sealed message.
pub const TAG_LEN: usize = codec::TAG_LEN;

/// One direction of an established channel: the initiator's sealer and the responder's
/// opener, after a real handshake in memory (key confirmation checked).
pub struct Channel {
    sealer: Sealer,
    opener: Opener,
}

impl Channel {
    /// Runs the three handshake messages between two ends holding `secret`.
    ///
    /// # Panics
    /// If the in-memory handshake between two honest ends fails: a bug, which is what a fuzz
    /// target must report.
    pub fn established(secret: &str) -> Channel {
        let psk = derive_psk(secret);
        let mut initiator = codec::initiator(&psk).expect("the Noise pattern is valid");
        let mut responder = codec::responder(&psk).expect("the Noise pattern is valid");
        let mut message = [0u8; 2 * HANDSHAKE_MESSAGE_LEN];
        let mut payload = [0u8; 2 * HANDSHAKE_MESSAGE_LEN];
        let length = initiator.write_message(&[], &mut message).expect("first message");
        responder.read_message(&message[..length], &mut payload).expect("first message authenticates");
        let length = responder.write_message(&[], &mut message).expect("second message");
        initiator.read_message(&message[..length], &mut payload).expect("second message authenticates");
        let (mut sealer, _) = codec::split(initiator).expect("initiator transport mode");
        let (_, mut opener) = codec::split(responder).expect("responder transport mode");
        let confirmation = sealer.seal_confirmation().expect("confirmation seals");
        opener.open_confirmation(&confirmation).expect("confirmation authenticates");
        Channel { sealer, opener }
    }

    /// Seals `flag` followed by `data` as the next transport message, whatever the flag (a
    /// peer holding the secret can send any plaintext). `None` when the plaintext is too long
    /// to seal at all.
    pub fn seal(&mut self, flag: u8, data: &[u8]) -> Option<Vec<u8>> {
        let mut plaintext = Vec::with_capacity(data.len() + 1);
        plaintext.push(flag);
        plaintext.extend_from_slice(data);
        self.sealer.seal_plaintext(&plaintext).ok()
    }

    /// Opens the next transport message on the receiving side, as `SecureReceiver::recv`
    /// does: a frame when this message completes one.
    pub fn open(
        &mut self,
        message: &[u8],
        max_frame_bytes: usize,
    ) -> Result<Option<Vec<u8>>, TransportError> {
        self.opener.open(message, max_frame_bytes)
    }
}
