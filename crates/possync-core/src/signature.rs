//! Each till writes only as itself: every change carries its origin's Ed25519 signature.
//!
//! A till has a signing key of its own (made at its first start, kept in its database) and
//! makes its public key known with an `enroll` change of its own origin (`type: terminal`),
//! which travels like any change: relayed, caught up, over the chain's backbone. From the
//! seq of that change on, every change of the origin must be signed by that key; a receiver
//! refuses (logs, counts, alerts) a change whose signature is missing or wrong, so a peer
//! holding the shop secret cannot write as another till, nor as the receiver itself.
//!
//! What is signed is the change exactly as it travels: a domain tag, `type`, `action` and
//! the `data` text (which holds origin, seq and clock). The signature sits beside `data`
//! (`sig`, base64), so the text that is signed is the text that is carried, byte for byte,
//! from the origin's log to every receiver's log; nothing is re-encoded to check it.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};

use crate::change::WireChange;

/// Why a signature or key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The change has no `sig` while its origin signs every change.
    #[error("unsigned, but its origin signs every change")]
    Missing,
    /// `sig` is not 64 bytes of base64.
    #[error("malformed signature")]
    Malformed,
    /// The signature does not match the change and the origin's key.
    #[error("signature does not match the origin's key")]
    Mismatch,
    /// A public key that is not 32 bytes of base64 or not a valid Ed25519 point.
    #[error("malformed public key")]
    BadKey,
}

const DOMAIN: &[u8] = b"possync/change/v1\0";

/// The bytes a change's signature covers.
fn signed_bytes(wire: &WireChange) -> Vec<u8> {
    let data = wire.data.get().as_bytes();
    let mut message =
        Vec::with_capacity(DOMAIN.len() + wire.entity.len() + wire.action.len() + data.len() + 2);
    message.extend_from_slice(DOMAIN);
    message.extend_from_slice(wire.entity.as_bytes());
    message.push(0);
    message.extend_from_slice(wire.action.as_bytes());
    message.push(0);
    message.extend_from_slice(data);
    message
}

/// A till's signing key.
#[derive(Clone)]
pub struct TillKey(SigningKey);

impl std::fmt::Debug for TillKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TillKey({})", self.public_text())
    }
}

impl TillKey {
    /// The key made from 32 secret bytes (the caller's randomness, or the stored key).
    pub fn from_bytes(secret: [u8; 32]) -> TillKey {
        TillKey(SigningKey::from_bytes(&secret))
    }

    /// The stored form of the secret key (base64).
    pub fn secret_text(&self) -> String {
        BASE64.encode(self.0.to_bytes())
    }

    /// Reads the stored form back.
    pub fn from_secret_text(text: &str) -> Result<TillKey, SignatureError> {
        let bytes: [u8; 32] =
            BASE64.decode(text).ok().and_then(|bytes| bytes.try_into().ok()).ok_or(SignatureError::BadKey)?;
        Ok(TillKey::from_bytes(bytes))
    }

    /// The public key, as it is enrolled (base64 of 32 bytes).
    pub fn public_text(&self) -> String {
        BASE64.encode(self.0.verifying_key().to_bytes())
    }

    /// The public key.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    /// Signs `wire` (sets its `sig`).
    pub fn sign(&self, wire: &mut WireChange) {
        let signature = self.0.sign(&signed_bytes(wire));
        wire.sig = Some(BASE64.encode(signature.to_bytes()));
    }
}

/// An origin's enrolled public key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

impl PublicKey {
    /// Parses an enrolled key (base64 of 32 bytes, a valid point).
    pub fn parse(text: &str) -> Result<PublicKey, SignatureError> {
        let bytes: [u8; 32] =
            BASE64.decode(text).ok().and_then(|bytes| bytes.try_into().ok()).ok_or(SignatureError::BadKey)?;
        VerifyingKey::from_bytes(&bytes).map(PublicKey).map_err(|_| SignatureError::BadKey)
    }

    /// The enrolled form (base64).
    pub fn text(&self) -> String {
        BASE64.encode(self.0.to_bytes())
    }

    /// Checks `wire`'s signature against this key.
    pub fn verify(&self, wire: &WireChange) -> Result<(), SignatureError> {
        let sig = wire.sig.as_deref().ok_or(SignatureError::Missing)?;
        let bytes: [u8; 64] = BASE64
            .decode(sig)
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or(SignatureError::Malformed)?;
        self.0
            .verify(&signed_bytes(wire), &Signature::from_bytes(&bytes))
            .map_err(|_| SignatureError::Mismatch)
    }
}

/// Checks many changes' signatures at once (Ed25519 batch verification: several times
/// cheaper per signature than one by one). True when every one is valid; false when any is
/// missing, malformed or wrong (then check them one by one to find which).
pub fn verify_all(changes: &[(PublicKey, &WireChange)]) -> bool {
    let mut messages = Vec::with_capacity(changes.len());
    let mut signatures = Vec::with_capacity(changes.len());
    let mut keys = Vec::with_capacity(changes.len());
    for (key, wire) in changes {
        let Some(bytes) = wire
            .sig
            .as_deref()
            .and_then(|sig| BASE64.decode(sig).ok())
            .and_then(|bytes| <[u8; 64]>::try_from(bytes).ok())
        else {
            return false;
        };
        messages.push(signed_bytes(wire));
        signatures.push(Signature::from_bytes(&bytes));
        keys.push(key.0);
    }
    let messages: Vec<&[u8]> = messages.iter().map(Vec::as_slice).collect();
    ed25519_dalek::verify_batch(&messages, &signatures, &keys).is_ok()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn wire() -> WireChange {
        WireChange::new(
            "category",
            "create",
            &json!({"id": "c1", "name": "Tea", "sync": {"origin": "a", "seq": 1}}),
        )
    }

    #[test]
    fn a_signed_change_verifies_and_any_edit_breaks_it() {
        let key = TillKey::from_bytes([7; 32]);
        let other = TillKey::from_bytes([8; 32]);
        let mut change = wire();
        assert_eq!(key.public().verify(&change), Err(SignatureError::Missing));
        key.sign(&mut change);
        assert_eq!(key.public().verify(&change), Ok(()));
        assert_eq!(other.public().verify(&change), Err(SignatureError::Mismatch));
        // The stored and enrolled forms read back.
        assert_eq!(PublicKey::parse(&key.public_text()), Ok(key.public()));
        assert_eq!(TillKey::from_secret_text(&key.secret_text()).unwrap().public(), key.public());
        // Through the log's text and back: still valid.
        let text = serde_json::to_string(&change).unwrap();
        let back: WireChange = serde_json::from_str(&text).unwrap();
        assert_eq!(key.public().verify(&back), Ok(()));
        // Another action, another data, a garbled signature: refused.
        let mut edited = change.clone();
        edited.action = "update".into();
        assert_eq!(key.public().verify(&edited), Err(SignatureError::Mismatch));
        let mut edited = change.clone();
        edited.edit_data(|data| data["name"] = json!("Coffee"));
        assert_eq!(key.public().verify(&edited), Err(SignatureError::Mismatch));
        let mut edited = change.clone();
        edited.sig = Some("not base64!".into());
        assert_eq!(key.public().verify(&edited), Err(SignatureError::Malformed));
        assert_eq!(PublicKey::parse("AAAA"), Err(SignatureError::BadKey));
    }

    #[test]
    fn a_batch_verifies_only_when_every_signature_does() {
        let (a, b) = (TillKey::from_bytes([1; 32]), TillKey::from_bytes([2; 32]));
        let mut changes = vec![wire(), wire(), wire()];
        a.sign(&mut changes[0]);
        b.sign(&mut changes[1]);
        a.sign(&mut changes[2]);
        let keyed = |keys: [&TillKey; 3]| -> Vec<(PublicKey, &WireChange)> {
            keys.iter().map(|key| key.public()).zip(changes.iter()).collect()
        };
        assert!(verify_all(&keyed([&a, &b, &a])));
        assert!(!verify_all(&keyed([&a, &a, &a])), "one wrong key fails the batch");
        let mut unsigned = changes.clone();
        unsigned[2].sig = None;
        let keys = [a.public(), b.public(), a.public()];
        let pairs: Vec<(PublicKey, &WireChange)> = keys.into_iter().zip(unsigned.iter()).collect();
        assert!(!verify_all(&pairs), "an unsigned change fails the batch");
    }
}
