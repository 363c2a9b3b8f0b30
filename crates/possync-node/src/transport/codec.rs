//! The sans-IO half of the secure channel: building the Noise handshake states, and
//! turning frames into sealed transport messages and back.
//!
//! Nothing here touches a socket or a clock. [`Sealer`] and [`Opener`] each own one
//! direction's nonce counter over a shared [`StatelessTransportState`], so the two halves
//! of a split channel need no lock to encrypt or decrypt.

use std::sync::Arc;

use snow::{HandshakeState, StatelessTransportState};

use super::TransportError;

/// The Noise protocol name; both sides must use exactly this.
pub(super) const NOISE_PATTERN: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";

/// Mixed into the handshake hash: a peer speaking another version of this channel (or
/// another protocol over Noise with the same key) fails the handshake instead of
/// misreading our frames.
pub(super) const PROLOGUE: &[u8] = b"possync/p2p/v1";

/// Length of the ChaChaPoly authentication tag that ends every sealed message.
pub(super) const TAG_LEN: usize = 16;

/// Length of each handshake message: a 32-byte X25519 ephemeral key and the tag of the
/// (empty) encrypted payload.
pub(super) const HANDSHAKE_MESSAGE_LEN: usize = 32 + TAG_LEN;

/// Largest transport message (ciphertext with tag) this channel sends or accepts.
///
/// Noise allows 65,535 bytes; we use 4 KiB so that the WebSocket layer's buffers, which
/// keep the capacity of the largest message they have carried, stay small on every
/// connection (see "Memory" in the module docs).
pub(super) const MAX_TRANSPORT_MESSAGE: usize = 4096;

/// Bytes a chunk adds to its data: the flag byte and the tag.
pub(super) const CHUNK_OVERHEAD: usize = 1 + TAG_LEN;

/// Largest number of frame bytes one chunk carries.
pub(super) const MAX_CHUNK_DATA: usize = MAX_TRANSPORT_MESSAGE - CHUNK_OVERHEAD;

/// Chunk flag: more chunks of this frame follow.
pub(super) const FLAG_MORE: u8 = 0;

/// Chunk flag: this chunk ends the frame.
pub(super) const FLAG_LAST: u8 = 1;

/// Nonce of the key-confirmation message, the initiator's first transport message.
const CONFIRMATION_NONCE: u64 = 0;

/// Handshake state for the dialling side.
pub(super) fn initiator(psk: &[u8; 32]) -> Result<HandshakeState, snow::Error> {
    builder(psk)?.build_initiator()
}

/// Handshake state for the accepting side.
pub(super) fn responder(psk: &[u8; 32]) -> Result<HandshakeState, snow::Error> {
    builder(psk)?.build_responder()
}

fn builder(psk: &[u8; 32]) -> Result<snow::Builder<'_>, snow::Error> {
    let params = NOISE_PATTERN.parse()?;
    snow::Builder::new(params).prologue(PROLOGUE)?.psk(0, psk)
}

/// Turns a finished handshake into the two directions of the session.
pub(super) fn split(handshake: HandshakeState) -> Result<(Sealer, Opener), snow::Error> {
    let cipher = Arc::new(handshake.into_stateless_transport_mode()?);
    let sealer = Sealer { cipher: Arc::clone(&cipher), nonce: CONFIRMATION_NONCE };
    let opener = Opener { cipher, nonce: CONFIRMATION_NONCE, partial: Vec::new() };
    Ok((sealer, opener))
}

/// Cuts a frame into the data of its chunks, each with its "last" flag. An empty frame
/// is one empty last chunk.
pub(super) fn chunks(frame: &[u8]) -> impl Iterator<Item = (&[u8], bool)> {
    let chunk_count = frame.len().div_ceil(MAX_CHUNK_DATA).max(1);
    (0..chunk_count).map(move |index| {
        let start = index * MAX_CHUNK_DATA;
        let end = frame.len().min(start + MAX_CHUNK_DATA);
        (&frame[start..end], index + 1 == chunk_count)
    })
}

/// Seals frames into transport messages, one direction of a session.
pub(super) struct Sealer {
    /// The session keys, shared with the [`Opener`] of the same session.
    cipher: Arc<StatelessTransportState>,
    /// Nonce of the next message we seal; the peer expects exactly this one next.
    nonce: u64,
}

impl Sealer {
    /// Seals the key-confirmation message: an empty plaintext, so just a tag.
    ///
    /// The initiator sends it right after the handshake; it is never a valid chunk (a chunk
    /// has at least its flag byte), so it cannot be mistaken for a frame.
    pub(super) fn seal_confirmation(&mut self) -> Result<Vec<u8>, TransportError> {
        self.seal_plaintext(&[])
    }

    /// Splits a frame into chunks and seals each, calling `emit` with every message in
    /// order.
    #[cfg(test)]
    pub(super) fn seal_frame(
        &mut self,
        frame: &[u8],
        mut emit: impl FnMut(Vec<u8>),
    ) -> Result<(), TransportError> {
        for (data, last) in chunks(frame) {
            emit(self.seal_chunk(data, last)?);
        }
        Ok(())
    }

    /// Seals one chunk: flag byte, then up to [`MAX_CHUNK_DATA`] bytes of the frame.
    pub(super) fn seal_chunk(&mut self, data: &[u8], last: bool) -> Result<Vec<u8>, TransportError> {
        debug_assert!(data.len() <= MAX_CHUNK_DATA);
        let mut plaintext = [0u8; MAX_CHUNK_DATA + 1];
        let Some(body) = plaintext.get_mut(1..=data.len()) else {
            return Err(TransportError::FrameTooLarge { limit: MAX_CHUNK_DATA });
        };
        body.copy_from_slice(data);
        plaintext[0] = if last { FLAG_LAST } else { FLAG_MORE };
        self.seal_plaintext(&plaintext[..=data.len()])
    }

    pub(super) fn seal_plaintext(&mut self, plaintext: &[u8]) -> Result<Vec<u8>, TransportError> {
        let mut message = vec![0u8; plaintext.len() + TAG_LEN];
        let written = self
            .cipher
            .write_message(self.nonce, plaintext, &mut message)
            // Only fails on a message too long (ruled out by the chunk size) or an
            // exhausted nonce: either way this session can send no more.
            .map_err(|_| TransportError::Closed)?;
        message.truncate(written);
        self.nonce = self.nonce.checked_add(1).ok_or(TransportError::Closed)?;
        Ok(message)
    }
}

/// Opens transport messages and reassembles frames, the other direction of a session.
pub(super) struct Opener {
    /// The session keys, shared with the [`Sealer`] of the same session.
    cipher: Arc<StatelessTransportState>,
    /// Nonce the next message must have been sealed with: a replayed, dropped or reordered
    /// message fails to authenticate.
    nonce: u64,
    /// Data of the frame being reassembled; empty (and unallocated) between frames.
    partial: Vec<u8>,
}

impl Opener {
    /// Checks the initiator's key-confirmation message (responder side).
    pub(super) fn open_confirmation(&mut self, message: &[u8]) -> Result<(), TransportError> {
        let mut plaintext = [0u8; MAX_TRANSPORT_MESSAGE];
        let length = self.open_plaintext(message, &mut plaintext)?;
        if length != 0 {
            return Err(TransportError::Decrypt);
        }
        Ok(())
    }

    /// Opens one transport message. Returns the frame when this message completes one,
    /// `None` when more chunks are needed.
    ///
    /// Refuses a frame as soon as its data would pass `max_frame_bytes`, and never
    /// reserves more than that. After an error the opener must not be used again.
    pub(super) fn open(
        &mut self,
        message: &[u8],
        max_frame_bytes: usize,
    ) -> Result<Option<Vec<u8>>, TransportError> {
        let mut plaintext = [0u8; MAX_TRANSPORT_MESSAGE];
        let length = self.open_plaintext(message, &mut plaintext)?;
        let Some((&flag, data)) = plaintext[..length].split_first() else {
            // An empty plaintext is the confirmation message, never a chunk.
            return Err(TransportError::Decrypt);
        };
        let last = match flag {
            FLAG_MORE => false,
            FLAG_LAST => true,
            _ => return Err(TransportError::Decrypt),
        };
        let needed = self.partial.len() + data.len();
        if needed > max_frame_bytes {
            self.partial = Vec::new();
            return Err(TransportError::FrameTooLarge { limit: max_frame_bytes });
        }
        if needed > self.partial.capacity() {
            // Grow geometrically like Vec would, but never past the limit.
            let target = needed.max(self.partial.capacity() * 2).min(max_frame_bytes);
            self.partial.reserve_exact(target - self.partial.len());
        }
        self.partial.extend_from_slice(data);
        if last { Ok(Some(std::mem::take(&mut self.partial))) } else { Ok(None) }
    }

    /// True while a frame is half reassembled.
    pub(super) fn is_mid_frame(&self) -> bool {
        !self.partial.is_empty()
    }

    fn open_plaintext(&mut self, message: &[u8], plaintext: &mut [u8]) -> Result<usize, TransportError> {
        if message.len() < TAG_LEN || message.len() > MAX_TRANSPORT_MESSAGE {
            return Err(TransportError::Decrypt);
        }
        let length =
            self.cipher.read_message(self.nonce, message, plaintext).map_err(|_| TransportError::Decrypt)?;
        self.nonce = self.nonce.checked_add(1).ok_or(TransportError::Decrypt)?;
        Ok(length)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PSK: [u8; 32] = [7; 32];

    /// Runs the three handshake messages in memory and returns the initiator's and the
    /// responder's session halves, confirmation already checked.
    fn session() -> ((Sealer, Opener), (Sealer, Opener)) {
        let mut initiator = initiator(&PSK).unwrap();
        let mut responder = responder(&PSK).unwrap();
        let mut message = [0u8; 128];
        let mut payload = [0u8; 128];
        let length = initiator.write_message(&[], &mut message).unwrap();
        assert_eq!(length, HANDSHAKE_MESSAGE_LEN);
        responder.read_message(&message[..length], &mut payload).unwrap();
        let length = responder.write_message(&[], &mut message).unwrap();
        assert_eq!(length, HANDSHAKE_MESSAGE_LEN);
        initiator.read_message(&message[..length], &mut payload).unwrap();
        let (mut initiator_sealer, initiator_opener) = split(initiator).unwrap();
        let (responder_sealer, mut responder_opener) = split(responder).unwrap();
        let confirmation = initiator_sealer.seal_confirmation().unwrap();
        assert_eq!(confirmation.len(), TAG_LEN);
        responder_opener.open_confirmation(&confirmation).unwrap();
        ((initiator_sealer, initiator_opener), (responder_sealer, responder_opener))
    }

    fn seal(sealer: &mut Sealer, frame: &[u8]) -> Vec<Vec<u8>> {
        let mut messages = Vec::new();
        sealer.seal_frame(frame, |message| messages.push(message)).unwrap();
        messages
    }

    fn open_all(
        opener: &mut Opener,
        messages: &[Vec<u8>],
        limit: usize,
    ) -> Result<Vec<Vec<u8>>, TransportError> {
        let mut frames = Vec::new();
        for message in messages {
            if let Some(frame) = opener.open(message, limit)? {
                frames.push(frame);
            }
        }
        Ok(frames)
    }

    #[test]
    fn frames_of_every_size_round_trip() {
        let ((mut sealer, _), (_, mut opener)) = session();
        for size in
            [0, 1, MAX_CHUNK_DATA - 1, MAX_CHUNK_DATA, MAX_CHUNK_DATA + 1, 3 * MAX_CHUNK_DATA, 100_000]
        {
            let frame: Vec<u8> = (0..size).map(|index| (index % 251) as u8).collect();
            let messages = seal(&mut sealer, &frame);
            assert_eq!(messages.len(), size.div_ceil(MAX_CHUNK_DATA).max(1), "size {size}");
            assert!(messages.iter().all(|message| message.len() <= MAX_TRANSPORT_MESSAGE));
            assert_eq!(open_all(&mut opener, &messages, 1 << 20).unwrap(), vec![frame]);
            assert!(!opener.is_mid_frame());
        }
    }

    #[test]
    fn both_directions_use_separate_keys() {
        let ((mut initiator_sealer, mut initiator_opener), (mut responder_sealer, mut responder_opener)) =
            session();
        let from_initiator = seal(&mut initiator_sealer, b"a");
        let from_responder = seal(&mut responder_sealer, b"a");
        assert_ne!(from_initiator, from_responder);
        // A message reflected back to its sender does not open.
        assert!(matches!(initiator_opener.open(&from_initiator[0], 100), Err(TransportError::Decrypt)));
        assert_eq!(open_all(&mut responder_opener, &from_initiator, 100).unwrap(), vec![b"a".to_vec()]);
    }

    #[test]
    fn a_flipped_bit_anywhere_fails_to_decrypt() {
        let ((mut sealer, _), _) = session();
        let message = seal(&mut sealer, b"{\"type\":\"ticket\"}").remove(0);
        for index in 0..message.len() {
            let ((mut sealer, _), (_, mut opener)) = session();
            let mut tampered = seal(&mut sealer, b"{\"type\":\"ticket\"}").remove(0);
            tampered[index] ^= 0x01;
            assert!(matches!(opener.open(&tampered, 100), Err(TransportError::Decrypt)), "byte {index}");
        }
    }

    #[test]
    fn replayed_reordered_and_dropped_messages_fail() {
        // Replay.
        let ((mut sealer, _), (_, mut opener)) = session();
        let first = seal(&mut sealer, b"one").remove(0);
        opener.open(&first, 100).unwrap();
        assert!(matches!(opener.open(&first, 100), Err(TransportError::Decrypt)));

        // Reorder.
        let ((mut sealer, _), (_, mut opener)) = session();
        let first = seal(&mut sealer, b"one").remove(0);
        let second = seal(&mut sealer, b"two").remove(0);
        assert!(matches!(opener.open(&second, 100), Err(TransportError::Decrypt)));
        let _ = first;

        // Drop: a missing chunk in the middle of a frame.
        let ((mut sealer, _), (_, mut opener)) = session();
        let mut messages = seal(&mut sealer, &[b'x'; 3 * MAX_CHUNK_DATA]);
        messages.remove(1);
        assert!(matches!(open_all(&mut opener, &messages, 1 << 20), Err(TransportError::Decrypt)));

        // A message from another session with the same secret.
        let ((mut other_sealer, _), _) = session();
        let (_, (_, mut opener)) = session();
        let foreign = seal(&mut other_sealer, b"one").remove(0);
        assert!(matches!(opener.open(&foreign, 100), Err(TransportError::Decrypt)));
    }

    #[test]
    fn malformed_messages_fail() {
        let (_, (_, mut opener)) = session();
        for message in [vec![], vec![0; TAG_LEN - 1], vec![0; TAG_LEN], vec![0; MAX_TRANSPORT_MESSAGE + 1]] {
            assert!(matches!(opener.open(&message, 100), Err(TransportError::Decrypt)));
        }
    }

    #[test]
    fn authenticated_but_invalid_chunks_fail() {
        // A confirmation where a chunk is expected.
        let ((mut sealer, _), (_, mut opener)) = session();
        let empty = sealer.seal_confirmation().unwrap();
        assert!(matches!(opener.open(&empty, 100), Err(TransportError::Decrypt)));

        // An unknown flag.
        let ((mut sealer, _), (_, mut opener)) = session();
        let bad_flag = sealer.seal_plaintext(&[2, b'x']).unwrap();
        assert!(matches!(opener.open(&bad_flag, 100), Err(TransportError::Decrypt)));

        // A chunk where the confirmation is expected.
        let mut initiator = initiator(&PSK).unwrap();
        let mut responder = responder(&PSK).unwrap();
        let (mut message, mut payload) = ([0u8; 128], [0u8; 128]);
        let length = initiator.write_message(&[], &mut message).unwrap();
        responder.read_message(&message[..length], &mut payload).unwrap();
        let length = responder.write_message(&[], &mut message).unwrap();
        initiator.read_message(&message[..length], &mut payload).unwrap();
        let (mut sealer, _) = split(initiator).unwrap();
        let (_, mut opener) = split(responder).unwrap();
        let chunk = sealer.seal_chunk(b"", true).unwrap();
        assert!(matches!(opener.open_confirmation(&chunk), Err(TransportError::Decrypt)));
    }

    #[test]
    fn an_oversized_frame_is_refused_before_it_is_buffered() {
        let ((mut sealer, _), (_, mut opener)) = session();
        let limit = 2 * MAX_CHUNK_DATA + 10;
        let messages = seal(&mut sealer, &vec![b'x'; limit + 1]);
        assert_eq!(messages.len(), 3);
        assert!(opener.open(&messages[0], limit).unwrap().is_none());
        assert!(opener.open(&messages[1], limit).unwrap().is_none());
        assert!(opener.partial.capacity() <= limit);
        assert!(
            matches!(opener.open(&messages[2], limit), Err(TransportError::FrameTooLarge { limit: l }) if l == limit)
        );
        assert_eq!(opener.partial.capacity(), 0);

        // Exactly at the limit is fine, and the buffer never grows past it.
        let ((mut sealer, _), (_, mut opener)) = session();
        let frame = vec![b'y'; limit];
        let messages = seal(&mut sealer, &frame);
        assert_eq!(open_all(&mut opener, &messages, limit).unwrap(), vec![frame]);
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|byte| format!("{byte:02x}")).collect()
    }

    /// A full transcript with fixed ephemeral keys, as published in `docs/PROTOCOL.md`
    /// ("Secure channel") for implementers to check against. Checked independently with a
    /// from-the-spec Python implementation (hashlib BLAKE2s, `cryptography` X25519 and
    /// ChaCha20-Poly1305).
    #[test]
    fn the_published_test_vector() {
        let psk = crate::transport::derive_psk("correct horse battery staple");
        let initiator_ephemeral = [0x11u8; 32];
        let responder_ephemeral = [0x22u8; 32];
        let params = NOISE_PATTERN.parse().unwrap();
        let mut initiator = snow::Builder::new(params)
            .prologue(PROLOGUE)
            .unwrap()
            .psk(0, &psk)
            .unwrap()
            .fixed_ephemeral_key_for_testing_only(&initiator_ephemeral)
            .build_initiator()
            .unwrap();
        let params = NOISE_PATTERN.parse().unwrap();
        let mut responder = snow::Builder::new(params)
            .prologue(PROLOGUE)
            .unwrap()
            .psk(0, &psk)
            .unwrap()
            .fixed_ephemeral_key_for_testing_only(&responder_ephemeral)
            .build_responder()
            .unwrap();
        let (mut first, mut second, mut payload) = ([0u8; 64], [0u8; 64], [0u8; 64]);
        let first_length = initiator.write_message(&[], &mut first).unwrap();
        responder.read_message(&first[..first_length], &mut payload).unwrap();
        let second_length = responder.write_message(&[], &mut second).unwrap();
        initiator.read_message(&second[..second_length], &mut payload).unwrap();
        let (mut initiator_sealer, _) = split(initiator).unwrap();
        let (mut responder_sealer, mut responder_opener) = split(responder).unwrap();
        let confirmation = initiator_sealer.seal_confirmation().unwrap();
        let ping = initiator_sealer.seal_chunk(br#"{"type":"ping"}"#, true).unwrap();
        let pong = responder_sealer.seal_chunk(br#"{"type":"pong"}"#, true).unwrap();
        responder_opener.open_confirmation(&confirmation).unwrap();
        assert_eq!(responder_opener.open(&ping, 100).unwrap().unwrap(), br#"{"type":"ping"}"#);

        let transcript = [
            ("psk", hex(&psk)),
            ("handshake 1", hex(&first[..first_length])),
            ("handshake 2", hex(&second[..second_length])),
            ("confirmation", hex(&confirmation)),
            ("initiator chunk", hex(&ping)),
            ("responder chunk", hex(&pong)),
        ];
        for (name, bytes) in &transcript {
            println!("{name}: {bytes}");
        }
        assert_eq!(transcript.map(|(_, bytes)| bytes), TEST_VECTOR);
    }

    const TEST_VECTOR: [&str; 6] = [
        "c5a75045b2ce38684412506ad8200ffdbb6c720fabe9d25184bcb0cc709796d8",
        "7b4e909bbe7ffe44c465a220037d608ee35897d31ef972f07f74892cb0f73f13\
         75fd873f89cb67af7fd4965bf0109be2",
        "0faa684ed28867b97f4a6a2dee5df8ce974e76b7018e3f22a1c4cf2678570f20\
         66da436bb3be8cb716d117d74754c4a3",
        "0d0e31175b5b70c3e5641cfe86c3901d",
        "f014f3d3e40151937a9396025831472478c26851350689c4c9f682948e95721a",
        "1240c951216e9654b6a7dbcbeba2ec045744edf04b1f482f280da9af7f9d2788",
    ];

    #[test]
    fn a_wrong_psk_fails_the_first_handshake_message() {
        let mut initiator = initiator(&[1; 32]).unwrap();
        let mut responder = responder(&[2; 32]).unwrap();
        let (mut message, mut payload) = ([0u8; 128], [0u8; 128]);
        let length = initiator.write_message(&[], &mut message).unwrap();
        assert!(responder.read_message(&message[..length], &mut payload).is_err());
    }
}
