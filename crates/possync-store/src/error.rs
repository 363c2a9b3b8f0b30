//! The store's errors: one enum, one doc line per variant, mapped to HTTP statuses by the API.

use possync_core::{ChangeError, EntityError, EntityId, EntityKind, PosId, Seq};

/// Why a store call failed. A failed write leaves nothing behind (its transaction rolls back).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed (disk full, locked, I/O...).
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A schema migration failed.
    #[error("database migration failed: {0}")]
    Migration(#[from] rusqlite_migration::Error),
    /// The database holds something this version cannot read.
    #[error("database content is corrupt: {0}")]
    Corrupt(String),
    /// The data directory already holds a node (`init` refuses to overwrite it).
    #[error("a possync node already exists at {0}")]
    AlreadyInitialized(String),
    /// The database was never initialised with `possync init`.
    #[error("no possync node at {0}: run `possync init` first")]
    NotInitialized(String),
    /// The input is invalid (bad field, negative price, empty sale...).
    #[error(transparent)]
    Invalid(#[from] EntityError),
    /// A remote change could not be decoded.
    #[error(transparent)]
    BadChange(#[from] ChangeError),
    /// The record does not exist (or is deleted).
    #[error("{kind} {id} not found")]
    NotFound {
        /// Its kind.
        kind: EntityKind,
        /// Its id.
        id: EntityId,
    },
    /// A record with this id already exists.
    #[error("{kind} {id} already exists")]
    AlreadyExists {
        /// Its kind.
        kind: EntityKind,
        /// Its id.
        id: EntityId,
    },
    /// Another live record already has this unique key (a product's SKU or barcode, a
    /// cashier's username).
    #[error("{field} {value:?} is already used by {kind} {other}")]
    Duplicate {
        /// The kind of record.
        kind: EntityKind,
        /// sku, barcode or username.
        field: &'static str,
        /// The value.
        value: String,
        /// The product holding it.
        other: EntityId,
    },
    /// The operation is not allowed in the record's state (refund of a cancelled ticket...).
    #[error("{0}")]
    InvalidState(String),
    /// No conflict with this id.
    #[error("conflict {0} not found")]
    ConflictNotFound(i64),
    /// The conflict was already resolved.
    #[error("conflict {0} is already resolved")]
    ConflictResolved(i64),
    /// The write would make a change larger than any peer accepts
    /// ([`possync_core::protocol::MAX_CHANGE_BYTES`]); nothing was written.
    #[error(
        "this {kind} would be a change of {bytes} bytes, over the limit of {limit} bytes that peers accept: split it (a sale into several tickets)"
    )]
    TooLarge {
        /// The record's kind.
        kind: EntityKind,
        /// Size of the change's data.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
    /// A cash session call breaks the drawer's rules (one open session per till...).
    #[error(transparent)]
    CashSession(#[from] CashSessionError),
    /// Unknown setting, or a value of the wrong type.
    #[error("{0}")]
    BadSetting(String),
    /// A recovery of the till's own history was refused ([`crate::recovery`]); nothing changed.
    #[error(transparent)]
    Recovery(#[from] RecoveryError),
}

/// Shorthand for store results.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

impl StoreError {
    /// Did SQLite find no room to write: the disk (or the file system quota) is full, or
    /// the database reached its `max_page_count`? Such a write changed nothing and can
    /// succeed once room is made; the API answers it as 507 `storage_full`.
    pub fn is_storage_full(&self) -> bool {
        matches!(self, StoreError::Sqlite(rusqlite::Error::SqliteFailure(error, _))
            if error.code == rusqlite::ErrorCode::DiskFull)
    }

    pub(crate) fn not_found(kind: EntityKind, id: &EntityId) -> StoreError {
        StoreError::NotFound { kind, id: id.clone() }
    }

    pub(crate) fn invalid(field: &str, reason: impl Into<String>) -> StoreError {
        StoreError::Invalid(EntityError::InvalidField { field: field.to_string(), reason: reason.into() })
    }
}

/// Why a cash session call is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CashSessionError {
    /// A sale needs an open session (`pos_require_cash_session`) and this till has none.
    #[error("no cash session is open on this till: open one before selling (pos_require_cash_session is on)")]
    NoneOpen,
    /// This till already has an open session.
    #[error("cash session {0} is already open on this till: close it first")]
    AlreadyOpen(EntityId),
    /// The session was closed already.
    #[error("cash session {0} is already closed")]
    Closed(EntityId),
    /// The session belongs to another till's drawer.
    #[error("cash session {id} belongs to till {pos_id}: only that till closes it")]
    OtherTill {
        /// The session.
        id: EntityId,
        /// The till that opened it.
        pos_id: String,
    },
}

/// Why a recovery of the till's own history was refused. Nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecoveryError {
    /// A recovery runs alone: not inside a group of writes, nor while changes are signed in
    /// the background.
    #[error("a recovery of the till's own history cannot run inside a group of writes")]
    Busy,
    /// The copies are not of an origin this till has written as.
    #[error("change {seq} of {origin} is not one of this till's own changes")]
    NotOwnOrigin {
        /// The origin they claim.
        origin: PosId,
        /// The first seq.
        seq: Seq,
    },
    /// The copies are not one run of one origin, numbered without a gap, with the stamps
    /// their data carries.
    #[error(
        "the peer's copies are not one contiguous run of {origin}: expected change {expected}, found {found}"
    )]
    NotContiguous {
        /// The run's origin.
        origin: PosId,
        /// The seq expected at that place.
        expected: Seq,
        /// What was there (origin and seq, as stamped and as read from its data).
        found: String,
    },
    /// A copy that differs from the till's own history, or comes after such a copy, is not
    /// signed by this till's key: a forgery, not the till's own change.
    #[error("forged: the peer's change {seq} of {origin} is not signed by this till's key ({reason})")]
    NotSigned {
        /// The origin.
        origin: PosId,
        /// The copy's seq.
        seq: Seq,
        /// What the signature check said.
        reason: String,
    },
    /// A change to set aside is a head office's copy of a store's write: re-issued under a
    /// new origin it would be a copy the stores cannot place (not supported).
    #[error("change {seq} of {origin} is a head office's copy: a head office's copies cannot be re-issued")]
    HeadOfficeCopy {
        /// The origin.
        origin: PosId,
        /// Its seq.
        seq: Seq,
    },
    /// `<posId>-r<k>` is not a valid posId (the posId is too long to take the suffix).
    #[error("no new origin can be made from this till's posId: {0}")]
    NoNewOrigin(String),
}
