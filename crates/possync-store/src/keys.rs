//! Each till writes only as itself (issue 13, item 3): the till's signing key, the keys its
//! peers enrolled, revoked tills, and the check every remote change passes before it is
//! merged.
//!
//! A till signs every change it writes ([`possync_core::signature`]). The first time it
//! writes, it enrolls its key with a `terminal`/`enroll` change of its own origin, signed by
//! that key; the change travels like any other, so every till (and head office, over the
//! chain) learns the key in the origin's own order, before the changes it covers. From then
//! on a change of that origin is merged only if that key signed it: one refused is logged
//! (`forged: ...`), counted and alerted, is not held (the real change can still come), and
//! is not a gap to ask for again. A till that has not enrolled yet is trusted on first use
//! (its changes before its enrollment are unsigned, as every change was before this
//! version). A `terminal`/`revoke` change (`possync revoke`, `POST
//! /api/terminals/{posId}/revoke`) makes every till refuse the revoked till's changes after
//! the seq it names (the lowest one wins, whatever the order they arrive in).
//!
//! In memory, an enrolled key or a revocation counts only once the change that made it is
//! held (its seq within the version vector), so a transaction rolled back forgets it too.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use possync_core::protocol::StampedChange;
use possync_core::signature::{PublicKey, SignatureError, TillKey};
use possync_core::{
    Change, ChangeBody, EntityId, EntityKind, PosId, Seq, StampPeek, VersionVector, WireChange,
};
use rusqlite::{Connection, params};
use serde_json::{Value, json};

use crate::error::{Result, StoreError};
use crate::{Store, meta};

/// An enrolled key: valid from the origin's change `since` (the enrollment) on.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Enrolled {
    key: PublicKey,
    since: Seq,
}

/// A revocation: the revoked till's changes after `until` are refused.
#[derive(Debug, Clone)]
pub(crate) struct Revoked {
    until: Seq,
    by: PosId,
    by_seq: Seq,
}

/// The keys and revocations this till knows.
#[derive(Debug, Default)]
pub(crate) struct Keyring {
    enrolled: HashMap<PosId, Enrolled>,
    revoked: HashMap<PosId, Revoked>,
}

impl Keyring {
    /// Reads the tables.
    pub(crate) fn load(conn: &Connection) -> Result<Keyring> {
        let mut ring = Keyring::default();
        let mut statement = conn.prepare("SELECT pos_id, public_key, since_seq FROM terminal_keys")?;
        let rows = statement.query_map([], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?, row.get::<_, i64>(2)?))
        })?;
        for row in rows {
            let (pos_id, key, since) = row?;
            let pos_id = PosId::parse(pos_id).map_err(|err| StoreError::Corrupt(err.to_string()))?;
            let key =
                PublicKey::parse(&key).map_err(|err| StoreError::Corrupt(format!("terminal_keys: {err}")))?;
            ring.enrolled.insert(pos_id, Enrolled { key, since: Seq(since as u64) });
        }
        let mut statement =
            conn.prepare("SELECT pos_id, until_seq, revoked_by, revoked_by_seq FROM terminal_revocations")?;
        let rows = statement.query_map([], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, i64>(1)?,
                row.get::<_, String>(2)?,
                row.get::<_, i64>(3)?,
            ))
        })?;
        for row in rows {
            let (pos_id, until, by, by_seq) = row?;
            let corrupt = |err: possync_core::ids::IdError| StoreError::Corrupt(err.to_string());
            ring.revoked.insert(
                PosId::parse(pos_id).map_err(corrupt)?,
                Revoked {
                    until: Seq(until as u64),
                    by: PosId::parse(by).map_err(corrupt)?,
                    by_seq: Seq(by_seq as u64),
                },
            );
        }
        Ok(ring)
    }

    /// The directory of the enrolled keys, for the receiving tasks.
    pub(crate) fn directory(&self) -> KeyDirectory {
        let directory = KeyDirectory::default();
        for (pos_id, enrolled) in &self.enrolled {
            directory.insert(pos_id.clone(), enrolled.key);
        }
        directory
    }

    /// `origin`'s key, if its enrollment is held.
    fn key(&self, origin: &PosId, vv: &VersionVector) -> Option<Enrolled> {
        self.enrolled.get(origin).filter(|enrolled| enrolled.since <= vv.get(origin)).copied()
    }

    /// `origin`'s revocation, if the change that made it is held.
    fn revocation(&self, origin: &PosId, vv: &VersionVector) -> Option<&Revoked> {
        self.revoked.get(origin).filter(|revoked| revoked.by_seq <= vv.get(&revoked.by))
    }
}

/// The keys this till has seen enrolled, shared with the tasks that receive changes so that
/// they check signatures before handing a batch to the single writer (which then only
/// compares keys). Loose on purpose: it may hold a key whose enrollment was rolled back, and
/// lag behind one just committed. The writer trusts a check only if it was made with the key
/// its own keyring holds for that origin ([`Verified`]), so a stale or wrong entry costs a
/// second check, never a forged change accepted.
#[derive(Debug, Clone, Default)]
pub struct KeyDirectory(Arc<RwLock<HashMap<PosId, PublicKey>>>);

impl KeyDirectory {
    fn insert(&self, pos_id: PosId, key: PublicKey) {
        self.0.write().unwrap_or_else(PoisonError::into_inner).insert(pos_id, key);
    }

    /// Checks the signatures of `changes` against the keys known here, all at once (Ed25519
    /// batch verification). A change whose origin has no key here, or any change of a batch
    /// that does not verify as a whole, is left unchecked: the writer checks it alone.
    pub fn verify(&self, changes: &[WireChange]) -> Verified {
        let keys = self.0.read().unwrap_or_else(PoisonError::into_inner);
        Verified::check(&Stamped::peek(changes).entries(), 1, |origin, _| keys.get(origin).copied())
    }

    /// [`KeyDirectory::verify`] for changes whose stamps the frame parser read already.
    pub fn verify_stamped(&self, changes: &[StampedChange]) -> Verified {
        let keys = self.0.read().unwrap_or_else(PoisonError::into_inner);
        Verified::check(&Stamped::entries_of(changes), 1, |origin, _| keys.get(origin).copied())
    }
}

/// A change with its stamp (origin, seq) when it has a readable one.
pub(crate) type StampEntry<'a> = (Option<(&'a PosId, Seq)>, &'a WireChange);

/// The stamps of changes that arrived without them read (`peek_stamp`), held while they are
/// looked at as [`StampEntry`]s.
pub(crate) struct Stamped<'a> {
    changes: &'a [WireChange],
    stamps: Vec<Option<StampPeek>>,
}

impl<'a> Stamped<'a> {
    /// Reads the stamp of each change.
    pub(crate) fn peek(changes: &'a [WireChange]) -> Stamped<'a> {
        Stamped { changes, stamps: changes.iter().map(WireChange::peek_stamp).collect() }
    }

    /// Each change with its stamp.
    pub(crate) fn entries(&self) -> Vec<StampEntry<'_>> {
        self.stamps
            .iter()
            .zip(self.changes)
            .map(|(stamp, wire)| (stamp.as_ref().map(|s| (&s.origin, s.seq)), wire))
            .collect()
    }

    /// The entries of changes whose stamps were read already.
    pub(crate) fn entries_of(changes: &[StampedChange]) -> Vec<StampEntry<'_>> {
        changes.iter().map(|change| (Some((&change.origin, change.seq)), &change.wire)).collect()
    }
}

/// For each change of a batch, the key its signature was found valid with, if it was checked
/// before the batch reached the writer ([`KeyDirectory::verify`]).
#[derive(Debug, Clone, Default)]
pub struct Verified(Vec<Option<PublicKey>>);

impl Verified {
    /// Nothing checked yet: the writer checks every change.
    pub fn nothing(count: usize) -> Verified {
        Verified(vec![None; count])
    }

    /// Checks the signed changes whose origin `key_of` knows, all at once (Ed25519 batch
    /// verification), when there are at least `min` of them. When the batch does not verify
    /// as a whole, or is too small, nothing counts as checked.
    fn check(
        changes: &[StampEntry<'_>],
        min: usize,
        key_of: impl Fn(&PosId, Seq) -> Option<PublicKey>,
    ) -> Verified {
        let mut keyed = Vec::with_capacity(changes.len());
        let mut with = vec![None; changes.len()];
        for (index, (stamp, wire)) in changes.iter().enumerate() {
            let Some((origin, seq)) = stamp else { continue };
            if let Some(key) = key_of(origin, *seq)
                && wire.sig.is_some()
            {
                keyed.push((key, *wire));
                with[index] = Some(key);
            }
        }
        if keyed.len() < min.max(1) || !possync_core::signature::verify_all(&keyed) {
            return Verified::nothing(changes.len());
        }
        Verified(with)
    }

    /// How many changes were checked.
    pub fn checked(&self) -> usize {
        self.0.iter().flatten().count()
    }

    /// The key change `index` was checked with.
    pub(crate) fn key(&self, index: usize) -> Option<PublicKey> {
        self.0.get(index).copied().flatten()
    }
}

/// The signing key stored in `node_meta`, made (from `random`) the first time.
pub(crate) fn own_key(conn: &Connection, mut random: impl FnMut() -> [u8; 10]) -> Result<TillKey> {
    if let Some(stored) = meta::node_value(conn, "signing_key")? {
        return TillKey::from_secret_text(&stored)
            .map_err(|err| StoreError::Corrupt(format!("node_meta.signing_key: {err}")));
    }
    let mut secret = [0u8; 32];
    for chunk in secret.chunks_mut(10) {
        let bytes = random();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    let key = TillKey::from_bytes(secret);
    meta::set_node_value(conn, "signing_key", &key.secret_text())?;
    Ok(key)
}

/// Why a remote change is refused before it is merged.
pub(crate) struct Refusal {
    /// `forged: ...` or `revoked: ...`.
    pub(crate) reason: String,
}

impl Store {
    /// Signs `wire` as this till: what every change it writes carries. Public for tools and
    /// tests that craft changes in this till's name (a change edited after signing no longer
    /// verifies anywhere).
    pub fn sign(&self, wire: &mut WireChange) {
        self.till_key.sign(wire);
    }

    /// This till's public key, as enrolled.
    pub fn public_key(&self) -> String {
        self.till_key.public_text()
    }

    /// Whether this till's key is enrolled (its enroll change is held).
    pub(crate) fn is_enrolled(&self) -> bool {
        self.keyring.key(&self.writing_origin, &self.vv).is_some()
    }

    /// Writes this till's enroll change of the origin it writes as (inside the caller's
    /// transaction).
    pub(crate) fn enroll(&mut self) -> Result<()> {
        let own = self.writing_origin.clone();
        let id = EntityId::parse(own.as_str()).map_err(|err| StoreError::Corrupt(err.to_string()))?;
        let public_key = self.till_key.public_text();
        let change = self.emit_local(
            EntityKind::Terminal,
            &id,
            ChangeBody::Enroll { public_key },
            &Default::default(),
            None,
        )?;
        self.record_key(&own, self.till_key.public(), change.seq)
    }

    /// Which of `changes` are signed by their origin's enrolled key, checked all at once
    /// (batch verification is several times cheaper per signature than one by one, and the
    /// single writer pays for every remote change). A change not covered (its origin not
    /// enrolled yet, a bad signature somewhere in the batch) is checked alone by
    /// [`Store::check_origin`].
    pub(crate) fn preverify(&self, changes: &[StampEntry<'_>]) -> Verified {
        // One signature alone costs the same checked here or by `check_origin`.
        Verified::check(changes, 2, |origin, seq| {
            self.keyring
                .key(origin, &self.vv)
                .filter(|enrolled| seq > enrolled.since)
                .map(|enrolled| enrolled.key)
        })
    }

    /// The keys this till has seen enrolled, for checking signatures off the writer.
    pub fn key_directory(&self) -> KeyDirectory {
        self.key_directory.clone()
    }

    /// Checks a remote change of `origin` numbered `seq` (the next one this till needs)
    /// against the origin's key and revocation. `verified_with`: the key its signature was
    /// already found valid with (in its batch, here or in the task that received it); it
    /// counts only if it is the origin's enrolled key.
    pub(crate) fn check_origin(
        &self,
        origin: &PosId,
        seq: Seq,
        wire: &WireChange,
        verified_with: Option<PublicKey>,
    ) -> Option<Refusal> {
        if let Some(until) = self.keyring.revocation(origin, &self.vv).map(|revoked| revoked.until)
            && seq > until
        {
            return Some(Refusal {
                reason: format!(
                    "revoked: till {origin} is revoked after its change {until}; change {seq} refused"
                ),
            });
        }
        // This till's own origin is checked like any other: against its enrolled key (its
        // own, once it has written). A till restored from a backup takes its own changes
        // back from its peers, its enrollment first.
        let key = self.keyring.key(origin, &self.vv)?.key;
        if verified_with == Some(key) {
            return None;
        }
        key.verify(wire).err().map(|err| Refusal {
            reason: format!(
                "forged: change {seq} of {origin} {}",
                match err {
                    SignatureError::Missing => "is not signed, but that till signs every change".to_string(),
                    other => format!("is refused: {other}"),
                }
            ),
        })
    }

    /// Checks an `enroll` change (signed by the key it enrolls; one key per till) and
    /// records the key; or records a revocation. Returns a refusal for a bad enrollment.
    pub(crate) fn apply_identity(&mut self, change: &Change, wire: &WireChange) -> Result<Option<Refusal>> {
        let (origin, seq) = (&change.origin, change.seq);
        match &change.body {
            ChangeBody::Enroll { public_key } => {
                let Ok(key) = PublicKey::parse(public_key) else {
                    return Ok(Some(Refusal {
                        reason: format!("forged: change {seq} of {origin} enrolls a malformed key"),
                    }));
                };
                if key.verify(wire).is_err() {
                    return Ok(Some(Refusal {
                        reason: format!(
                            "forged: change {seq} of {origin} enrolls a key that did not sign it"
                        ),
                    }));
                }
                if let Some(known) = self.keyring.key(origin, &self.vv)
                    && known.key != key
                {
                    return Ok(Some(Refusal {
                        reason: format!(
                            "forged: change {seq} of {origin} enrolls a second key for a till already enrolled"
                        ),
                    }));
                }
                self.record_key(origin, key, seq)?;
                Ok(None)
            }
            ChangeBody::Revoke { until_seq, reason } => {
                // The id is a posId (checked when the change was decoded).
                let Ok(revoked) = PosId::parse(change.id.as_str()) else {
                    return Ok(Some(Refusal {
                        reason: format!("forged: change {seq} of {origin} revokes no till"),
                    }));
                };
                self.record_revocation(&revoked, *until_seq, origin, seq, reason.as_deref())?;
                Ok(None)
            }
            _ => Ok(None),
        }
    }

    pub(crate) fn record_key(&mut self, pos_id: &PosId, key: PublicKey, since: Seq) -> Result<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO terminal_keys (pos_id, public_key, since_seq, enrolled_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (pos_id) DO UPDATE SET public_key = excluded.public_key, since_seq = excluded.since_seq,
                 enrolled_at = excluded.enrolled_at",
            )?
            .execute(params![pos_id.as_str(), key.text(), since.0 as i64, self.now_rfc3339()])?;
        self.keyring.enrolled.insert(pos_id.clone(), Enrolled { key, since });
        self.key_directory.insert(pos_id.clone(), key);
        Ok(())
    }

    pub(crate) fn record_revocation(
        &mut self,
        revoked: &PosId,
        until: Seq,
        by: &PosId,
        by_seq: Seq,
        reason: Option<&str>,
    ) -> Result<()> {
        // The lowest `until` wins, whatever order revocations arrive in: every till ends
        // refusing the same changes.
        if let Some(held) = self.keyring.revocation(revoked, &self.vv)
            && held.until <= until
        {
            return Ok(());
        }
        self.conn
            .prepare_cached(
                "INSERT INTO terminal_revocations (pos_id, until_seq, revoked_by, revoked_by_seq, reason, revoked_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (pos_id) DO UPDATE SET until_seq = excluded.until_seq, revoked_by = excluded.revoked_by,
                 revoked_by_seq = excluded.revoked_by_seq, reason = excluded.reason, revoked_at = excluded.revoked_at",
            )?
            .execute(params![revoked.as_str(), until.0 as i64, by.as_str(), by_seq.0 as i64, reason, self.now_rfc3339()])?;
        self.keyring.revoked.insert(revoked.clone(), Revoked { until, by: by.clone(), by_seq });
        Ok(())
    }

    /// Revokes till `pos_id` (lost or stolen): every till refuses its changes after the last
    /// one this till holds. Returns the revocation as the API shows it.
    pub fn revoke_terminal(&mut self, pos_id: &PosId, reason: Option<&str>) -> Result<Value> {
        if self.is_own_origin(pos_id) {
            return Err(StoreError::InvalidState("a till cannot revoke itself".into()));
        }
        if let Some(reason) = reason {
            possync_core::entity::check_text("reason", reason, 500)?;
        }
        let id =
            EntityId::parse(pos_id.as_str()).map_err(|err| StoreError::invalid("posId", err.to_string()))?;
        self.write(true, |store| {
            let until = store.vv.get(pos_id);
            let body = ChangeBody::Revoke { until_seq: until, reason: reason.map(str::to_string) };
            let change = store.emit_local(EntityKind::Terminal, &id, body, &Default::default(), None)?;
            let own = store.writing_origin.clone();
            store.record_revocation(pos_id, until, &own, change.seq, reason)?;
            Ok(json!({"posId": pos_id.as_str(), "untilSeq": until.0, "reason": reason}))
        })
    }
}
