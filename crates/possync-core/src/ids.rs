//! Identifiers: terminals (`PosId`), records (`EntityId`) and change sequence numbers (`Seq`).
//!
//! Ids are strings so that any POS application can supply its own, but they are parsed once at
//! the edge (length and charset checked) and carried as newtypes afterwards, so an unchecked
//! string can never reach the store or the wire.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest id a caller may supply (SPEC section 1).
pub const MAX_ID_LEN: usize = 64;

/// Why a string is not a valid id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The id is the empty string.
    #[error("id is empty")]
    Empty,
    /// The id is longer than [`MAX_ID_LEN`] bytes.
    #[error("id is {0} bytes long, at most {MAX_ID_LEN} allowed")]
    TooLong(usize),
    /// The id holds whitespace or a control character.
    #[error("id contains whitespace or control characters")]
    BadCharacter,
}

fn check_id(raw: &str) -> Result<(), IdError> {
    if raw.is_empty() {
        return Err(IdError::Empty);
    }
    if raw.len() > MAX_ID_LEN {
        return Err(IdError::TooLong(raw.len()));
    }
    if raw.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(IdError::BadCharacter);
    }
    Ok(())
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Parses a caller-supplied id.
            pub fn parse(raw: impl Into<String>) -> Result<Self, IdError> {
                let raw = raw.into();
                check_id(&raw)?;
                Ok(Self(raw))
            }

            /// A fresh UUIDv7 id built from the given time and random bytes (the caller owns
            /// the clock and the RNG, so this stays deterministic under simulation).
            pub fn generate(unix_ms: u64, random: [u8; 10]) -> Self {
                Self(uuid_v7(unix_ms, random))
            }

            /// The id as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(raw: String) -> Result<Self, IdError> {
                Self::parse(raw)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
    };
}

string_id!(
    /// The identity of one terminal (one possync node). Chosen at `possync init`, never changes.
    PosId
);
string_id!(
    /// The id of a product, category, customer, ticket or stock movement; unique across terminals.
    EntityId
);

/// Builds a UUIDv7 string from a millisecond timestamp and 10 random bytes.
fn uuid_v7(unix_ms: u64, random: [u8; 10]) -> String {
    uuid::Builder::from_unix_timestamp_millis(unix_ms, &random).into_uuid().hyphenated().to_string()
}

/// The position of a change in its origin terminal's change log: 1, 2, 3... with no gaps.
///
/// Every terminal numbers its own changes; a peer's knowledge is summarised by the highest
/// contiguous `Seq` it holds per origin (a [`crate::VersionVector`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Seq(pub u64);

impl Seq {
    /// The sequence number that follows this one.
    pub fn next(self) -> Seq {
        Seq(self.0 + 1)
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;

    #[test]
    fn ids_are_checked() {
        assert_eq!(EntityId::parse(""), Err(IdError::Empty));
        assert_eq!(EntityId::parse("a b"), Err(IdError::BadCharacter));
        assert_eq!(EntityId::parse("x".repeat(65)), Err(IdError::TooLong(65)));
        assert!(EntityId::parse("x".repeat(64)).is_ok());
        assert!(serde_json::from_str::<PosId>("\"\"").is_err());
    }

    #[test]
    fn generated_ids_are_uuid_v7_and_sort_by_time() {
        let a = EntityId::generate(1_700_000_000_000, [1; 10]);
        let b = EntityId::generate(1_700_000_000_001, [0; 10]);
        assert_eq!(Uuid::parse_str(a.as_str()).unwrap().get_version_num(), 7);
        assert!(a < b);
    }
}
