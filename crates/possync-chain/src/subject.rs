//! Subject and stream names of one chain.
//!
//! ```text
//! stream POSSYNC_<C>_UP    subjects possync.<c>.up.>     store <s>'s till publishes origin <o> on possync.<c>.up.<s>.<o>
//! stream POSSYNC_<C>_DOWN  subjects possync.<c>.down.>   HQ publishes its own origin <h> on     possync.<c>.down.<h>
//! ```
//!
//! One subject per origin is what makes racing uploaders safe: JetStream's
//! `Nats-Expected-Last-Subject-Sequence` header is checked per subject, so two tills
//! uploading the same origin cannot both append after the same message. The store id in the
//! subject is what the server's permissions check (a store's user may publish only under
//! `possync.<c>.up.<s>.>`), and what HQ uses to attribute an origin to a store.
//!
//! Chain and store ids are short tokens (`[A-Za-z0-9_-]`, at most 32 bytes): they appear in
//! subjects, stream names and ticket numbers. Origins are posIds; a posId that cannot be a
//! subject token (one with `.`, `*` or `>`) cannot take part in a chain.

use possync_core::PosId;

/// Longest chain or store id.
pub const MAX_TOKEN_LEN: usize = 32;

/// Why a name is not usable on the backbone.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    /// A chain or store id is empty, too long or has a character outside `[A-Za-z0-9_-]`.
    #[error("invalid {what} {value:?}: use 1 to {MAX_TOKEN_LEN} letters, digits, '-' or '_'")]
    BadId {
        /// "chain id" or "store id".
        what: &'static str,
        /// The value given.
        value: String,
    },
    /// A posId holds a character that subjects reserve (`.`, `*`, `>`).
    #[error("posId {0:?} cannot be a NATS subject token ('.', '*' and '>' are reserved)")]
    BadOrigin(String),
    /// A subject that is not one of this chain's.
    #[error("subject {0:?} is not a possync subject of this chain")]
    Foreign(String),
}

fn check_id(what: &'static str, value: &str) -> Result<(), SubjectError> {
    let valid = !value.is_empty()
        && value.len() <= MAX_TOKEN_LEN
        && value.bytes().all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_');
    if valid { Ok(()) } else { Err(SubjectError::BadId { what, value: value.to_string() }) }
}

/// Checks that a posId can be a subject token.
pub fn check_origin(origin: &PosId) -> Result<(), SubjectError> {
    if origin.as_str().bytes().any(|byte| matches!(byte, b'.' | b'*' | b'>')) {
        return Err(SubjectError::BadOrigin(origin.to_string()));
    }
    Ok(())
}

/// A chain's id (checked).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChainId(String);

impl ChainId {
    /// Parses a chain id.
    pub fn parse(value: impl Into<String>) -> Result<ChainId, SubjectError> {
        let value = value.into();
        check_id("chain id", &value)?;
        Ok(ChainId(value))
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A store's id (checked).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StoreId(String);

impl StoreId {
    /// Parses a store id.
    pub fn parse(value: impl Into<String>) -> Result<StoreId, SubjectError> {
        let value = value.into();
        check_id("store id", &value)?;
        Ok(StoreId(value))
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for StoreId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which way a subject carries changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Direction {
    /// Store to HQ: origin `origin` of store `store`.
    Up {
        /// The store that published.
        store: StoreId,
    },
    /// HQ to every store.
    Down,
}

/// A subject of this chain, read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedSubject {
    /// Up (with the store) or down.
    pub direction: Direction,
    /// The origin whose changes the subject carries.
    pub origin: PosId,
}

/// The names of one chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    /// The chain.
    chain: ChainId,
}

impl Subjects {
    /// The names of chain `chain`.
    pub fn new(chain: ChainId) -> Subjects {
        Subjects { chain }
    }

    /// The chain.
    pub fn chain(&self) -> &ChainId {
        &self.chain
    }

    /// `POSSYNC_<C>_UP` (upper case: stream names are case sensitive, this keeps one form).
    pub fn up_stream(&self) -> String {
        format!("POSSYNC_{}_UP", self.stream_token())
    }

    /// `POSSYNC_<C>_DOWN`.
    pub fn down_stream(&self) -> String {
        format!("POSSYNC_{}_DOWN", self.stream_token())
    }

    /// `possync.<c>.up.>`: what the UP stream holds.
    pub fn up_wildcard(&self) -> String {
        format!("possync.{}.up.>", self.chain.0)
    }

    /// `possync.<c>.up.<s>.>`: everything store `store` may publish.
    pub fn store_wildcard(&self, store: &StoreId) -> String {
        format!("possync.{}.up.{}.>", self.chain.0, store.0)
    }

    /// `possync.<c>.down.>`: what the DOWN stream holds.
    pub fn down_wildcard(&self) -> String {
        format!("possync.{}.down.>", self.chain.0)
    }

    /// `possync.<c>.up.<s>.<o>`.
    pub fn up(&self, store: &StoreId, origin: &PosId) -> Result<String, SubjectError> {
        check_origin(origin)?;
        Ok(format!("possync.{}.up.{}.{}", self.chain.0, store.0, origin))
    }

    /// `possync.<c>.down.<o>`.
    pub fn down(&self, origin: &PosId) -> Result<String, SubjectError> {
        check_origin(origin)?;
        Ok(format!("possync.{}.down.{}", self.chain.0, origin))
    }

    /// `possync.<c>.status.<s>.<o>`: where till `origin` of store `store` reports its
    /// uplink every few seconds (plain NATS, no stream: only the latest report matters).
    pub fn status(&self, store: &StoreId, origin: &PosId) -> Result<String, SubjectError> {
        check_origin(origin)?;
        Ok(format!("possync.{}.status.{}.{}", self.chain.0, store.0, origin))
    }

    /// `possync.<c>.status.>`: every till's reports, which the head office listens to.
    pub fn status_wildcard(&self) -> String {
        format!("possync.{}.status.>", self.chain.0)
    }

    /// Reads a status subject of this chain back into its store and till.
    pub fn parse_status(&self, subject: &str) -> Result<(StoreId, PosId), SubjectError> {
        let foreign = || SubjectError::Foreign(subject.chars().take(200).collect());
        match subject.split('.').collect::<Vec<_>>().as_slice() {
            ["possync", chain, "status", store, origin] if *chain == self.chain.0 => Ok((
                StoreId::parse(*store).map_err(|_| foreign())?,
                PosId::parse(*origin).map_err(|_| foreign())?,
            )),
            _ => Err(foreign()),
        }
    }

    /// Reads a subject of this chain back into its direction, store and origin.
    pub fn parse(&self, subject: &str) -> Result<ParsedSubject, SubjectError> {
        let foreign = || SubjectError::Foreign(subject.chars().take(200).collect());
        let tokens: Vec<&str> = subject.split('.').collect();
        if tokens.len() < 4 || tokens[0] != "possync" || tokens[1] != self.chain.0 {
            return Err(foreign());
        }
        let (direction, origin) = match (tokens[2], tokens.len()) {
            ("up", 5) => {
                (Direction::Up { store: StoreId::parse(tokens[3]).map_err(|_| foreign())? }, tokens[4])
            }
            ("down", 4) => (Direction::Down, tokens[3]),
            _ => return Err(foreign()),
        };
        let origin = PosId::parse(origin).map_err(|_| foreign())?;
        Ok(ParsedSubject { direction, origin })
    }

    fn stream_token(&self) -> String {
        self.chain.0.to_ascii_uppercase().replace('-', "_")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subjects() -> Subjects {
        Subjects::new(ChainId::parse("acme").unwrap())
    }

    fn pos(id: &str) -> PosId {
        PosId::parse(id).unwrap()
    }

    #[test]
    fn names_follow_the_layout() {
        let subjects = subjects();
        let store = StoreId::parse("s042").unwrap();
        assert_eq!(subjects.up_stream(), "POSSYNC_ACME_UP");
        assert_eq!(subjects.down_stream(), "POSSYNC_ACME_DOWN");
        assert_eq!(subjects.up(&store, &pos("till-1")).unwrap(), "possync.acme.up.s042.till-1");
        assert_eq!(subjects.down(&pos("hq-1")).unwrap(), "possync.acme.down.hq-1");
        assert_eq!(subjects.store_wildcard(&store), "possync.acme.up.s042.>");
    }

    #[test]
    fn subjects_parse_back() {
        let subjects = subjects();
        let store = StoreId::parse("s042").unwrap();
        let parsed = subjects.parse("possync.acme.up.s042.till-1").unwrap();
        assert_eq!(parsed, ParsedSubject { direction: Direction::Up { store }, origin: pos("till-1") });
        let down = subjects.parse("possync.acme.down.hq-1").unwrap();
        assert_eq!(down.direction, Direction::Down);
    }

    #[test]
    fn foreign_and_malformed_subjects_are_refused() {
        let subjects = subjects();
        for subject in [
            "possync.other.up.s1.t1",
            "possync.acme.up.s1",
            "possync.acme.up.s1.t1.extra",
            "possync.acme.sideways.t1",
            "possync.acme.up.s!1.t1",
            "nats.acme.up.s1.t1",
            "",
        ] {
            assert!(matches!(subjects.parse(subject), Err(SubjectError::Foreign(_))), "{subject}");
        }
    }

    #[test]
    fn status_subjects_name_the_store_and_the_till() {
        let subjects = subjects();
        let store = StoreId::parse("s042").unwrap();
        let subject = subjects.status(&store, &pos("till-1")).unwrap();
        assert_eq!(subject, "possync.acme.status.s042.till-1");
        assert_eq!(subjects.parse_status(&subject).unwrap(), (store, pos("till-1")));
        assert_eq!(subjects.status_wildcard(), "possync.acme.status.>");
        for subject in [
            "possync.other.status.s1.t1",
            "possync.acme.status.s1",
            "possync.acme.status.s1.t1.x",
            "possync.acme.up.s1.t1",
            "possync.acme.status.s!.t1",
        ] {
            assert!(subjects.parse_status(subject).is_err(), "{subject}");
        }
    }

    #[test]
    fn ids_and_origins_are_checked() {
        assert!(ChainId::parse("").is_err());
        assert!(ChainId::parse("a.b").is_err());
        assert!(StoreId::parse("x".repeat(33)).is_err());
        assert!(StoreId::parse("store_7-b").is_ok());
        let subjects = subjects();
        let store = StoreId::parse("s1").unwrap();
        assert_eq!(subjects.up(&store, &pos("a.b")), Err(SubjectError::BadOrigin("a.b".into())));
        assert!(subjects.down(&pos("x>")).is_err());
    }
}
