//! # possync-store
//!
//! The terminal's SQLite database, and the only crate that knows SQL. It owns:
//!
//! - the entity tables (SPEC section 1) and their sync metadata (`meta`);
//! - local writes as a library API: records, sales, refunds, stock ([`local`], [`sales`]);
//! - the merge of remote change batches, one transaction per batch, with the audit rows
//!   ([`apply`]);
//! - change selection for catch-up ([`select`]);
//! - the audit trail, settings and read-only queries ([`audit`], [`settings`], [`reader`]).
//!
//! One [`Store`] is the single writer (one connection). Reads go through [`StoreReader`]s,
//! separate read-only connections, so that queries from the API never wait on a batch being
//! applied (WAL mode).
//!
//! The store reads the wall clock and randomness only through [`Environment`], so a
//! simulation can run many terminals on a virtual clock and a seeded RNG.

pub mod apply;
pub mod audit;
mod bulk;
pub mod cash;
pub mod chain;
mod error;
mod keys;
pub mod local;
mod meta;
pub mod reader;
mod records;
pub mod recovery;
pub mod sales;
mod schema;
pub mod select;
pub mod settings;

use std::path::{Path, PathBuf};

use possync_core::protocol::MAX_CHANGE_BYTES;
use possync_core::{
    Change, ChangeBody, EntityId, EntityKind, Hlc, HybridClock, PosId, Seq, VersionVector, WireChange,
};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use rusqlite::{Connection, OpenFlags, params};

pub use crate::apply::{ApplyReport, PeerRef};
pub use crate::audit::{ConnectionEvent, ConnectionEventKind, Resolution};
pub use crate::cash::{CloseCashSession, OpenCashSession, SessionQuery};
pub use crate::chain::ChainRun;
pub use crate::error::CashSessionError;
pub use crate::error::RecoveryError;
pub use crate::error::{Result, StoreError};
pub use crate::keys::{KeyDirectory, Verified};
pub use crate::local::{ProductKey, Upserted};
pub use crate::reader::StoreReader;
pub use crate::recovery::OwnHistoryRecovery;
pub use crate::sales::{
    HistoricalSale, PaymentRequest, RefundLine, SaleLineRequest, SaleOutcome, SaleRequest,
};
pub use crate::select::Selection;
pub use crate::settings::{SettingRow, Settings};

use crate::meta::Origins;

/// The database file name inside a data directory.
pub const DB_FILE: &str = "possync.db";

/// Where the store gets time and randomness from.
pub trait Environment: Send {
    /// Wall-clock time, Unix milliseconds.
    fn now_ms(&self) -> u64;
    /// Ten random bytes (for UUIDv7 ids).
    fn random_bytes(&mut self) -> [u8; 10];
}

/// The real environment: system clock and an OS-seeded RNG.
#[derive(Debug)]
pub struct SystemEnvironment {
    rng: StdRng,
}

impl Default for SystemEnvironment {
    fn default() -> SystemEnvironment {
        SystemEnvironment { rng: StdRng::from_os_rng() }
    }
}

impl Environment for SystemEnvironment {
    fn now_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
    }

    fn random_bytes(&mut self) -> [u8; 10] {
        let mut bytes = [0u8; 10];
        self.rng.fill_bytes(&mut bytes);
        bytes
    }
}

/// A change written to this node's log, to be sent to peers. (Not back to the peer it came
/// from: each connection's `Session` knows what its peer holds and skips what it has.)
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    /// The change, in wire form.
    pub change: WireChange,
}

/// This terminal's identity, as stored at init.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeIdentity {
    /// The posId.
    pub pos_id: PosId,
    /// The human name.
    pub pos_name: String,
    /// The prefix of this terminal's ticket numbers.
    pub ticket_prefix: String,
    /// The chain store this till belongs to (set from the node's `[uplink]` configuration,
    /// not stored): ticket numbers then start with it, so they are unique chain-wide.
    pub chain_store: Option<String>,
}

/// The writer: the one connection that changes the database.
pub struct Store {
    /// The writer connection.
    conn: Connection,
    /// The database file.
    path: PathBuf,
    /// This terminal.
    identity: NodeIdentity,
    /// The origin this till writes its new changes as: its posId, or `<posId>-r<k>` after
    /// its k-th recovery of its own history ([`recovery`]).
    writing_origin: PosId,
    /// Every origin this till has written as (its posId first, then each `<posId>-r<k>`):
    /// a change claiming one of them claims to be this till's own.
    own_origins: Vec<PosId>,
    /// Local numbering of origins (cached).
    origins: Origins,
    /// The clock that stamps local writes.
    clock: HybridClock,
    /// Time and randomness.
    env: Box<dyn Environment>,
    /// What this node holds: every origin's changes 1..=vv[origin].
    vv: VersionVector,
    /// Settings, cached.
    settings: Settings,
    /// Changes written since the last [`Store::drain_outbox`].
    outbox: Vec<Outgoing>,
    /// `sync_vv` rows advanced by the open transaction, written once each before it commits
    /// (origin number, seq).
    vv_dirty: Vec<(i64, Seq)>,
    /// The last audit timestamp formatted: (Unix second, `YYYY-MM-DD HH:MM:SS`).
    sqlite_now: (u64, String),
    /// True while [`Store::group_commit`] holds a transaction open: each write inside it is a
    /// savepoint.
    in_group: bool,
    /// Set by a person's conflict decision for the one local write that carries it: who
    /// decided, written into the change's `data.sync.decidedBy` so that every till closes
    /// its copy of the conflict with the same name.
    decided_by: Option<String>,
    /// False while no open conflict with recorded sides exists (the common case, with any
    /// strategy but `manual`): applying a change then skips looking for conflicts it closes.
    /// Set when such a conflict is written; cleared only at open.
    open_decidable: bool,
    /// Origins whose next change was held back because it is stamped too far ahead of this
    /// terminal's clock (origin, that change's seq). Changes after it are not gaps to ask
    /// for again (they wait for it), see [`apply`]. A hint only: an entry counts while the
    /// origin's next change is still that seq.
    held_back: std::collections::HashMap<PosId, Seq>,
    /// Origins whose next change was refused as forged or revoked (origin, that seq): the
    /// changes after it wait for the real one (not a gap to ask for again at once).
    refused: std::collections::HashMap<PosId, Seq>,
    /// This till's signing key ([`keys`]).
    till_key: possync_core::signature::TillKey,
    /// The keys and revocations this till knows.
    keyring: keys::Keyring,
    /// The enrolled keys shared with the receiving tasks ([`keys::KeyDirectory`]).
    key_directory: keys::KeyDirectory,
    /// The open batch of writes ([`Store::begin_batch`]), if any.
    batch: Option<Batch>,
    /// Where a durable commit's fsync happens ([`Store::defer_fsync`]).
    fsync: Fsync,
    /// The signing thread of [`Store::sign_in_background`], if asked for.
    signer: Option<bulk::BackgroundSigner>,
    /// How many writes' savepoints are open inside the group (a write can call another).
    open_writes: usize,
    /// Whether groups hand their changes to [`Store::signer`] ([`Store::set_sign_aside`]).
    sign_aside: bool,
}

/// A batch of writes inside a group: one savepoint for all of them, and what to restore in
/// memory if one fails.
struct Batch {
    /// The version vector before the batch.
    vv_before: VersionVector,
    /// The `sync_vv` rows to write before the batch.
    dirty_before: Vec<(i64, Seq)>,
    /// The outbox length before the batch.
    outbox_before: usize,
    /// True once a write of the batch failed: the batch will be rolled back whole.
    failed: bool,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

/// Where a durable commit (a till's own write) is made to survive a power cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fsync {
    /// In the commit itself (`synchronous = FULL`): the commit returns once it is on disk.
    AtCommit,
    /// By the owner of the store, after the commit ([`Store::defer_fsync`]); `true` once a
    /// durable write has committed since the last [`Store::take_unsynced`].
    Deferred { unsynced: bool },
}

fn open_writer(path: &Path) -> Result<Connection> {
    let mut conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    // Checkpoints normally run on their own connection ([`Checkpointer`]), off the apply
    // path; the writer only checkpoints itself as a safety net if the WAL grows past ~40 MB.
    conn.pragma_update(None, "wal_autocheckpoint", WRITER_AUTOCHECKPOINT_PAGES)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.set_prepared_statement_cache_capacity(64);
    schema::migrations().to_latest(&mut conn)?;
    Ok(conn)
}

/// WAL pages after which the writer checkpoints by itself (SQLite's default is 1,000).
const WRITER_AUTOCHECKPOINT_PAGES: i64 = 10_000;

/// Copies the WAL back into the database file from a connection of its own, so that the
/// fsyncs of a checkpoint do not land inside a commit on the sync path (they did with
/// SQLite's automatic checkpoint, which runs in whichever commit crosses the threshold).
/// A PASSIVE checkpoint never waits for the writer or the readers.
pub struct Checkpointer {
    /// A read-write connection used only for checkpoints.
    conn: Connection,
}

impl Checkpointer {
    /// Opens the checkpoint connection to an initialised database.
    pub fn open(path: &Path) -> Result<Checkpointer> {
        let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(Checkpointer { conn })
    }

    /// Runs one PASSIVE checkpoint; returns (WAL frames, frames checkpointed).
    pub fn run(&self) -> Result<(i64, i64)> {
        Ok(self.conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| Ok((row.get(1)?, row.get(2)?)))?)
    }
}

/// A short ticket prefix derived from the posId: 4 characters of Crockford base32.
fn ticket_prefix(pos_id: &PosId) -> String {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    // FNV-1a: stable across versions and platforms.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in pos_id.as_str().bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (0..4).map(|i| char::from(ALPHABET[((hash >> (i * 5)) & 31) as usize])).collect()
}

impl Store {
    /// Creates a new node database at `path` (SPEC `possync init`). Refuses if one exists.
    pub fn init(
        path: &Path,
        pos_id: Option<PosId>,
        pos_name: &str,
        mut env: Box<dyn Environment>,
    ) -> Result<Store> {
        if path.exists() {
            let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
            let initialised: bool = conn
                .query_row("SELECT 1 FROM sqlite_master WHERE name = 'node_meta'", [], |_| Ok(()))
                .map(|()| true)
                .or_else(
                    |err| if err == rusqlite::Error::QueryReturnedNoRows { Ok(false) } else { Err(err) },
                )?;
            if initialised {
                return Err(StoreError::AlreadyInitialized(path.display().to_string()));
            }
        }
        let pos_id = pos_id.unwrap_or_else(|| PosId::generate(env.now_ms(), env.random_bytes()));
        let conn = open_writer(path)?;
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let setup = || -> Result<()> {
            meta::set_node_value(&conn, "pos_id", pos_id.as_str())?;
            meta::set_node_value(&conn, "pos_name", pos_name)?;
            meta::set_node_value(&conn, "ticket_prefix", &ticket_prefix(&pos_id))?;
            meta::set_node_value(&conn, "ticket_counter", "0")?;
            settings::insert_defaults(&conn)?;
            conn.execute("INSERT INTO sync_origins (pos_id) VALUES (?1)", [pos_id.as_str()])?;
            Ok(())
        };
        if let Err(err) = setup() {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(err);
        }
        conn.execute_batch("COMMIT")?;
        drop(conn);
        Store::open(path, env)
    }

    /// Opens an existing node database (migrating it if needed).
    pub fn open(path: &Path, mut env: Box<dyn Environment>) -> Result<Store> {
        if !path.exists() {
            return Err(StoreError::NotInitialized(path.display().to_string()));
        }
        let conn = open_writer(path)?;
        let not_initialised = || StoreError::NotInitialized(path.display().to_string());
        let pos_id = meta::node_value(&conn, "pos_id")?.ok_or_else(not_initialised)?;
        let pos_id =
            PosId::parse(pos_id).map_err(|err| StoreError::Corrupt(format!("node_meta.pos_id: {err}")))?;
        let identity = NodeIdentity {
            pos_id,
            pos_name: meta::node_value(&conn, "pos_name")?.unwrap_or_default(),
            ticket_prefix: meta::node_value(&conn, "ticket_prefix")?.unwrap_or_default(),
            chain_store: None,
        };
        let (writing_origin, own_origins) = recovery::load_own_origins(&conn, &identity.pos_id)?;
        let origins = Origins::load(&conn)?;
        let vv = reader::load_vv(&conn, &origins)?;
        let last_hlc: Option<i64> =
            conn.query_row("SELECT MAX(hlc) FROM sync_changes", [], |row| row.get(0))?;
        let stored_clock: Option<i64> = meta::node_value(&conn, "clock")?.and_then(|raw| raw.parse().ok());
        let restored = last_hlc
            .max(stored_clock)
            .map(Hlc::from_i64)
            .transpose()
            .map_err(|err| StoreError::Corrupt(err.to_string()))?;
        // Settings added by a later version get their default row (existing values are kept).
        settings::insert_defaults(&conn)?;
        let settings = Settings::load(&conn)?;
        let till_key = keys::own_key(&conn, || env.random_bytes())?;
        let keyring = keys::Keyring::load(&conn)?;
        let key_directory = keyring.directory();
        let open_decidable: bool = conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM conflict_sides s JOIN p2p_conflicts c ON c.id = s.conflict_id
                            WHERE c.resolved_by IS NULL)",
            [],
            |row| row.get(0),
        )?;
        Ok(Store {
            conn,
            path: path.to_path_buf(),
            identity,
            writing_origin,
            own_origins,
            origins,
            clock: HybridClock::new(restored.unwrap_or_default()),
            env,
            vv,
            settings,
            outbox: Vec::new(),
            decided_by: None,
            open_decidable,
            held_back: std::collections::HashMap::new(),
            refused: std::collections::HashMap::new(),
            till_key,
            keyring,
            key_directory,
            vv_dirty: Vec::new(),
            sqlite_now: (u64::MAX, String::new()),
            in_group: false,
            fsync: Fsync::AtCommit,
            batch: None,
            signer: None,
            open_writes: 0,
            sign_aside: true,
        })
    }

    /// This node's version vector with, for each origin, the fingerprint of the change it
    /// holds at that number: what a `hello` carries (`summary` and `heads`).
    pub fn summary_with_heads(&self) -> Result<(VersionVector, std::collections::BTreeMap<PosId, String>)> {
        let mut heads = std::collections::BTreeMap::new();
        for (origin, seq) in self.vv.iter() {
            if let Some(head) = reader::fingerprint_at(&self.conn, origin, seq)? {
                heads.insert(origin.clone(), head);
            }
        }
        Ok((self.vv.clone(), heads))
    }

    /// A new read-only connection to the same database.
    pub fn reader(&self) -> Result<StoreReader> {
        StoreReader::open(&self.path)
    }

    /// This terminal's identity.
    pub fn identity(&self) -> &NodeIdentity {
        &self.identity
    }

    /// The origin this till writes its new changes as: its posId, or `<posId>-r<k>` once it
    /// has recovered its own history ([`Store::recover_own_history`]).
    pub fn writing_origin(&self) -> &PosId {
        &self.writing_origin
    }

    /// Every origin this till has written as (its posId first): a change of any of them is
    /// one of its own.
    pub fn own_origins(&self) -> &[PosId] {
        &self.own_origins
    }

    /// Whether `origin` is one this till has written as.
    pub fn is_own_origin(&self, origin: &PosId) -> bool {
        self.own_origins.contains(origin)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What this node holds: the summary sent to peers at handshake.
    pub fn summary(&self) -> &VersionVector {
        &self.vv
    }

    /// The current settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Changes one setting (validated); takes effect at once.
    pub fn set_setting(&mut self, key: &str, value: &str) -> Result<Settings> {
        let mut next = self.settings.clone();
        next.apply(key, value)?;
        self.conn.execute("UPDATE settings SET value = ?2 WHERE key = ?1", params![key, value.trim()])?;
        self.settings = next;
        Ok(self.settings.clone())
    }

    /// Prepares the writer connection for one long transaction of many writes, such as an
    /// import: a page cache of `cache_kib` KiB, so that dirty pages are not spilled to the
    /// WAL before the commit (then written again and again), and statement journals in
    /// memory, so that the savepoint of each write does not write the pages it changes to
    /// a temporary file first. The memory is only taken as pages are used.
    pub fn tune_for_long_transactions(&mut self, cache_kib: u32) -> Result<()> {
        self.conn.pragma_update(None, "cache_size", -i64::from(cache_kib))?;
        self.conn.pragma_update(None, "temp_store", "MEMORY")?;
        Ok(())
    }

    /// Caps the database at `pages` pages (SQLite's `max_page_count`; never below its
    /// current size) and answers the cap. A write that would grow it further fails as on a
    /// full disk ([`StoreError::is_storage_full`]) and leaves nothing behind. For tests of
    /// what a full disk does, and for operators who want a hard size limit.
    pub fn set_max_page_count(&mut self, pages: u32) -> Result<i64> {
        Ok(self.conn.query_row(&format!("PRAGMA max_page_count = {pages}"), [], |row| row.get(0))?)
    }

    /// Takes the changes written since the last call, in log order, for broadcast and relay.
    pub fn drain_outbox(&mut self) -> Vec<Outgoing> {
        std::mem::take(&mut self.outbox)
    }

    /// Wall-clock now, from the environment.
    pub fn now_ms(&self) -> u64 {
        self.env.now_ms()
    }

    /// Brings the store back to its last committed state after a write was interrupted by a
    /// panic (a bug): rolls back any open transaction and reloads the in-memory state from
    /// the database. The node's writer thread calls it so that one bad job cannot stop every
    /// later write.
    pub fn recover(&mut self) -> Result<()> {
        self.in_group = false;
        self.batch = None;
        self.open_writes = 0;
        self.discard_signing();
        if !self.conn.is_autocommit() {
            self.conn.execute_batch("ROLLBACK")?;
        }
        self.conn.pragma_update(None, "synchronous", "NORMAL")?;
        self.origins = Origins::load(&self.conn)?;
        self.vv = reader::load_vv(&self.conn, &self.origins)?;
        self.vv_dirty.clear();
        self.outbox.clear();
        self.settings = Settings::load(&self.conn)?;
        Ok(())
    }

    /// Runs several writes in one durable transaction: group commit.
    ///
    /// Every write that `body` makes (each call such as [`Store::record_sale`] or
    /// [`Store::update_record`]) runs in a savepoint of one transaction, committed with one
    /// fsync at the end. A write that fails is rolled back alone, as it would be on its own;
    /// the others stand. Nothing is durable, and nothing should be acknowledged to whoever
    /// asked for the writes, until this returns `Ok`; on `Err` (the commit failed) none of
    /// them happened. The node's writer thread groups the till's writes that are waiting at
    /// the same time, so that concurrent writers share one fsync instead of queueing for one
    /// each. A group inside a group is the same group.
    pub fn group_commit<R>(&mut self, body: impl FnOnce(&mut Store) -> R) -> Result<R> {
        if self.in_group {
            return Ok(body(self));
        }
        self.run_grouped(body, |_| true)
    }

    /// Runs `body` like [`Store::group_commit`] (each write a savepoint that sees the ones
    /// before it), then rolls the whole transaction back: a rehearsal, such as an import's
    /// dry run, that counts what would happen and leaves nothing behind, in the database
    /// or in memory (version vector, outbox, origins, settings, clock).
    pub fn rehearse<R>(&mut self, body: impl FnOnce(&mut Store) -> R) -> Result<R> {
        self.run_grouped(body, |_| false)
    }

    /// Runs `body` like [`Store::group_commit`], but all or nothing: its writes are committed
    /// (one durable transaction) only if it returns `Ok`; on `Err` every write it made is
    /// rolled back, even those that succeeded, as by [`Store::rehearse`]. For a long job
    /// such as an import that must not leave half of itself behind when it stops on an error.
    pub fn all_or_nothing<T, E>(
        &mut self,
        body: impl FnOnce(&mut Store) -> std::result::Result<T, E>,
    ) -> Result<std::result::Result<T, E>> {
        self.run_grouped(body, std::result::Result::is_ok)
    }

    /// One transaction around `body`'s writes (each a savepoint), committed when `keep` says
    /// so and rolled back otherwise, in the database and in memory.
    fn run_grouped<R>(
        &mut self,
        body: impl FnOnce(&mut Store) -> R,
        keep: impl FnOnce(&R) -> bool,
    ) -> Result<R> {
        if self.in_group {
            return Err(StoreError::InvalidState("this cannot run inside a group of writes".into()));
        }
        self.begin_durable()?;
        if let Err(err) = self.conn.execute_batch("BEGIN IMMEDIATE") {
            self.end_durable(false)?;
            return Err(err.into());
        }
        let vv_before = self.vv.clone();
        let clock_before = self.clock.clone();
        let outbox_before = self.outbox.len();
        self.vv_dirty.clear();
        self.in_group = true;
        let value = body(self);
        let closed = self.close_forgotten_batch();
        self.in_group = false;
        let keep = keep(&value);
        let committed = if let Err(err) = closed {
            Err(err)
        } else if !keep {
            Ok(())
        } else if self.conn.is_autocommit() {
            // A failed write can make SQLite roll back the whole transaction (disk full, I/O
            // error); the writes after it then refused to run, see `write_in_group`.
            Err(StoreError::InvalidState("the group's transaction was rolled back".into()))
        } else {
            // The changes still being signed are logged before the commit (`bulk`).
            self.log_signed(true)
                .and_then(|()| self.flush_vv())
                .and_then(|()| {
                    meta::set_node_value(&self.conn, "clock", &self.clock.last().to_i64().to_string())
                })
                .and_then(|()| Ok(self.conn.execute_batch("COMMIT")?))
        };
        if !keep || committed.is_err() {
            self.discard_signing();
            if !self.conn.is_autocommit() {
                let _ = self.conn.execute_batch("ROLLBACK");
            }
            self.vv = vv_before;
            self.clock = clock_before;
            self.vv_dirty.clear();
            self.outbox.truncate(outbox_before);
            self.origins = Origins::load(&self.conn)?;
            self.settings = Settings::load(&self.conn)?;
        }
        self.end_durable(keep && committed.is_ok())?;
        committed.map(|()| value)
    }

    /// Runs `body` in one write transaction. On error everything is rolled back, in the
    /// database and in the in-memory state (version vector, outbox, origin cache). Inside
    /// [`Store::group_commit`] the transaction is a savepoint of the group's.
    pub(crate) fn write<T>(
        &mut self,
        durable: bool,
        body: impl FnOnce(&mut Store) -> Result<T>,
    ) -> Result<T> {
        if self.in_group {
            return self.write_in_group(body);
        }
        if durable {
            // A sale acknowledged to the till must survive a power cut: fsync this commit.
            self.begin_durable()?;
        }
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        let vv_before = self.vv.clone();
        let outbox_before = self.outbox.len();
        self.vv_dirty.clear();
        let result = body(self).and_then(|value| {
            self.flush_vv()?;
            meta::set_node_value(&self.conn, "clock", &self.clock.last().to_i64().to_string())?;
            self.conn.execute_batch("COMMIT")?;
            Ok(value)
        });
        if result.is_err() {
            let _ = self.conn.execute_batch("ROLLBACK");
            self.vv_dirty.clear();
            self.vv = vv_before;
            self.outbox.truncate(outbox_before);
            self.origins = Origins::load(&self.conn)?;
        }
        if durable {
            self.end_durable(result.is_ok())?;
        }
        result
    }

    /// Makes the next commit durable: with [`Fsync::AtCommit`], SQLite fsyncs the WAL in the
    /// commit (`synchronous = FULL`); deferred, the commit only writes the WAL (the
    /// connection's usual `NORMAL`) and [`Store::end_durable`] records that an fsync is owed.
    fn begin_durable(&mut self) -> Result<()> {
        if self.fsync == Fsync::AtCommit {
            self.conn.pragma_update(None, "synchronous", "FULL")?;
        }
        Ok(())
    }

    /// Closes what [`Store::begin_durable`] opened; `committed`: a durable write was committed.
    fn end_durable(&mut self, committed: bool) -> Result<()> {
        match &mut self.fsync {
            Fsync::AtCommit => self.conn.pragma_update(None, "synchronous", "NORMAL")?,
            Fsync::Deferred { unsynced } => *unsynced |= committed,
        }
        Ok(())
    }

    /// Leaves the fsync of the till's durable writes to the owner of the store (the node's
    /// writer thread), so that the next writes can run while the last ones reach the disk
    /// (a pipelined group commit). A durable commit then only writes the WAL, and the owner
    /// must, before it tells anyone that the write happened (its caller, the peers, a
    /// catch-up), fsync the WAL file ([`Store::wal_path`]) when [`Store::take_unsynced`]
    /// says so. SQLite recovers a WAL to its last complete transaction, so the fsync makes
    /// every transaction committed before it durable, as `synchronous = FULL` would have.
    pub fn defer_fsync(&mut self) {
        self.fsync = Fsync::Deferred { unsynced: false };
    }

    /// True when a durable write was committed without its fsync since the last call (always
    /// false unless [`Store::defer_fsync`] was called).
    pub fn take_unsynced(&mut self) -> bool {
        match &mut self.fsync {
            Fsync::AtCommit => false,
            Fsync::Deferred { unsynced } => std::mem::take(unsynced),
        }
    }

    /// The database's write-ahead log, which a deferred fsync must flush.
    pub fn wal_path(&self) -> PathBuf {
        let mut wal = self.path.clone().into_os_string();
        wal.push("-wal");
        PathBuf::from(wal)
    }

    /// The position of the last change in this node's log (0 when empty): what a catch-up
    /// may be served up to once it is durable ([`StoreReader::select_changes_up_to`]).
    pub fn log_position(&self) -> Result<u64> {
        let last: i64 = self
            .conn
            .prepare_cached("SELECT COALESCE(MAX(log_id), 0) FROM sync_changes")?
            .query_row([], |row| row.get(0))?;
        Ok(u64::try_from(last).unwrap_or(0))
    }

    /// Opens a batch inside a group ([`Store::all_or_nothing`], [`Store::rehearse`],
    /// [`Store::group_commit`]): the writes until [`Store::end_batch`] share one savepoint
    /// instead of one each. That is cheaper for a long run of small writes (SQLite copies
    /// every page a savepoint changes, once per savepoint), but one failed write fails the
    /// whole batch: the writes after it in the batch are refused, and `end_batch` rolls
    /// them all back; the caller then redoes them one by one (each in its own savepoint).
    pub fn begin_batch(&mut self) -> Result<()> {
        if !self.in_group || self.batch.is_some() || self.open_writes > 0 {
            return Err(StoreError::InvalidState(
                "a batch runs inside a group, between its writes, one at a time".into(),
            ));
        }
        if self.conn.is_autocommit() {
            return Err(StoreError::InvalidState("the group's transaction was rolled back".into()));
        }
        // A batch starts with no row of an earlier write pending (`bulk`).
        self.log_pending_between_writes(true)?;
        self.conn.prepare_cached("SAVEPOINT group_batch")?.execute([])?;
        self.batch = Some(Batch {
            vv_before: self.vv.clone(),
            dirty_before: self.vv_dirty.clone(),
            outbox_before: self.outbox.len(),
            failed: false,
        });
        Ok(())
    }

    /// Closes the batch: `true` when every write of it stands, `false` when one failed and
    /// the whole batch was rolled back (in the database and in memory).
    pub fn end_batch(&mut self) -> Result<bool> {
        let Some(batch) = self.batch.take() else {
            return Err(StoreError::InvalidState("no batch is open".into()));
        };
        // The changes still being signed are logged inside the batch's savepoint.
        if !batch.failed && self.log_signed(true).is_ok() {
            self.conn.prepare_cached("RELEASE group_batch")?.execute([])?;
            return Ok(true);
        }
        self.discard_signing();
        let rolled_back = if self.conn.is_autocommit() {
            Ok(())
        } else {
            self.conn.execute_batch("ROLLBACK TO group_batch; RELEASE group_batch")
        };
        self.vv = batch.vv_before;
        self.vv_dirty = batch.dirty_before;
        self.outbox.truncate(batch.outbox_before);
        self.origins = Origins::load(&self.conn)?;
        rolled_back?;
        Ok(false)
    }

    /// A batch still open when its group ends is closed (rolled back if a write failed).
    fn close_forgotten_batch(&mut self) -> Result<()> {
        if self.batch.is_some() {
            self.end_batch()?;
        }
        Ok(())
    }

    /// [`Store::write`] inside a group: a savepoint, rolled back alone on error (inside a
    /// batch, the batch's savepoint, rolled back whole at its end).
    fn write_in_group<T>(&mut self, body: impl FnOnce(&mut Store) -> Result<T>) -> Result<T> {
        if self.conn.is_autocommit() {
            // An earlier write's failure ended the group's transaction: running this one
            // would commit it on its own, outside the group.
            return Err(StoreError::InvalidState("the group's transaction was rolled back".into()));
        }
        if let Some(batch) = &self.batch {
            if batch.failed {
                return Err(StoreError::InvalidState("an earlier write of this batch failed".into()));
            }
            let result = body(self);
            if result.is_err()
                && let Some(batch) = &mut self.batch
            {
                batch.failed = true;
            }
            return result;
        }
        if self.open_writes == 0 {
            // The earlier writes' rows whose signature is back are logged here, between two
            // writes, never inside a write's savepoint (`bulk`).
            self.log_pending_between_writes(false)?;
        }
        // Prepared once: a group can hold thousands of writes.
        self.conn.prepare_cached("SAVEPOINT group_write")?.execute([])?;
        let vv_before = self.vv.clone();
        let dirty_before = self.vv_dirty.clone();
        let outbox_before = self.outbox.len();
        let signing_before = self.signing_pending();
        self.open_writes += 1;
        let result = body(self);
        self.open_writes -= 1;
        match &result {
            Ok(_) => {
                self.conn.prepare_cached("RELEASE group_write")?.execute([])?;
            }
            Err(_) => {
                let rolled_back = if self.conn.is_autocommit() {
                    Ok(())
                } else {
                    self.conn.execute_batch("ROLLBACK TO group_write; RELEASE group_write")
                };
                self.vv = vv_before;
                self.vv_dirty = dirty_before;
                self.outbox.truncate(outbox_before);
                self.drop_signing_after(signing_before);
                self.origins = Origins::load(&self.conn)?;
                rolled_back?;
            }
        }
        result
    }

    /// Logs the rows of a group's earlier writes whose signature is back (all of them,
    /// waiting, when `wait`). Those writes stand, so a row that cannot be logged fails the
    /// whole group: its transaction is rolled back (what a failed commit does), and every
    /// later write of the group, and its commit, are refused.
    fn log_pending_between_writes(&mut self, wait: bool) -> Result<()> {
        let logged = self.log_signed(wait);
        if logged.is_err() {
            self.discard_signing();
            if !self.conn.is_autocommit() {
                let _ = self.conn.execute_batch("ROLLBACK");
            }
        }
        logged
    }

    /// Stamps and logs a local write; returns the change (also queued in the outbox).
    /// `newest`: the newest write the record holds. The write is stamped after it even when
    /// that write's stamp is ahead of this terminal's clock (a clock does not follow remote
    /// stamps far into the future, see `hlc::MAX_OBSERVED_AHEAD_MS`), so that it wins on
    /// every terminal as it does here; a record stamped at the very end of time cannot be
    /// written over at all, and says so.
    pub(crate) fn emit_local(
        &mut self,
        kind: EntityKind,
        id: &EntityId,
        body: ChangeBody,
        ctx_before: &VersionVector,
        newest: Option<&possync_core::merge::Version>,
    ) -> Result<Change> {
        if !matches!(body, ChangeBody::Enroll { .. }) && !self.is_enrolled() {
            self.enroll()?;
        }
        let seq = self.vv.get(&self.writing_origin).next();
        let mut hlc = self.clock.tick(self.env.now_ms());
        if let Some(floor) = newest.and_then(|version| version.hlc)
            && hlc <= floor
        {
            hlc = floor.next().ok_or_else(|| {
                StoreError::InvalidState(format!(
                    "{kind} {id} was last written with a clock stamp at the end of time ({floor}) by a terminal whose clock is wrong or forged; no later edit can sort after it"
                ))
            })?;
        }
        let mut ctx = ctx_before.clone();
        ctx.observe(&self.writing_origin, seq);
        let change = Change {
            origin: self.writing_origin.clone(),
            seq,
            hlc: Some(hlc),
            ctx,
            entity: kind,
            id: id.clone(),
            body,
            copy_of: None,
        };
        let mut wire = change.to_wire();
        if let Some(user) = self.decided_by.take() {
            wire = possync_core::change::with_decided_by(&wire, &user);
        }
        let bytes = wire.data.get().len();
        if bytes > MAX_CHANGE_BYTES {
            return Err(StoreError::TooLarge { kind, bytes, limit: MAX_CHANGE_BYTES });
        }
        if self.signs_in_background() {
            // Logged once signed (`bulk`); the version vector moves now.
            let origin_idx = self.origins.idx(&self.conn, &change.origin)?;
            let row = bulk::PendingRow {
                origin_idx,
                seq,
                hlc: change.hlc,
                entity_type: kind.as_str(),
                entity_id: id.as_str().to_string(),
            };
            self.submit_for_signing(wire, row)?;
            self.advance_vv(origin_idx, &change.origin, seq);
            if self.batch.is_some() {
                // Inside a batch's one savepoint, every pending row is the batch's own.
                self.log_signed(false)?;
            }
            return Ok(change);
        }
        self.sign(&mut wire);
        self.append_change(&change.origin, seq, change.hlc, kind.as_str(), id.as_str(), &wire, false)?;
        self.outbox.push(Outgoing { change: wire });
        Ok(change)
    }

    /// Appends a change to the log and advances the version vector (its `sync_vv` row is
    /// written once per transaction, by [`Store::flush_vv`] before the commit).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn append_change(
        &mut self,
        origin: &PosId,
        seq: Seq,
        hlc: Option<Hlc>,
        entity_type: &str,
        entity_id: &str,
        wire: &WireChange,
        rejected: bool,
    ) -> Result<()> {
        let origin_idx = self.origins.idx(&self.conn, origin)?;
        self.insert_change_row(origin_idx, seq, hlc, entity_type, entity_id, wire, rejected)?;
        self.advance_vv(origin_idx, origin, seq);
        Ok(())
    }

    /// Inserts a change's `sync_changes` row.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn insert_change_row(
        &mut self,
        origin_idx: i64,
        seq: Seq,
        hlc: Option<Hlc>,
        entity_type: &str,
        entity_id: &str,
        wire: &WireChange,
        rejected: bool,
    ) -> Result<()> {
        // `data` is copied as the text it already is; only `type` and `action` are written.
        let mut payload = Vec::with_capacity(wire.data.get().len() + 64);
        serde_json::to_writer(&mut payload, wire).map_err(|err| StoreError::Corrupt(err.to_string()))?;
        let payload = String::from_utf8(payload).map_err(|err| StoreError::Corrupt(err.to_string()))?;
        self.conn
            .prepare_cached(
                "INSERT INTO sync_changes (origin, seq, hlc, entity_type, entity_id, action, rejected, payload)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute(params![
                origin_idx,
                seq.0 as i64,
                hlc.map(Hlc::to_i64),
                entity_type,
                entity_id,
                wire.action,
                rejected,
                payload
            ])?;
        Ok(())
    }

    /// Records that the open transaction holds `origin`'s change `seq`.
    fn advance_vv(&mut self, origin_idx: i64, origin: &PosId, seq: Seq) {
        match self.vv_dirty.iter_mut().find(|(idx, _)| *idx == origin_idx) {
            Some((_, held)) => *held = (*held).max(seq),
            None => self.vv_dirty.push((origin_idx, seq)),
        }
        self.vv.observe(origin, seq);
    }

    /// Writes the `sync_vv` rows the open transaction advanced (inside it, before COMMIT).
    fn flush_vv(&mut self) -> Result<()> {
        let mut upsert = self.conn.prepare_cached(
            "INSERT INTO sync_vv (origin, seq) VALUES (?1, ?2)
             ON CONFLICT (origin) DO UPDATE SET seq = excluded.seq",
        )?;
        for (origin_idx, seq) in self.vv_dirty.drain(..) {
            upsert.execute(params![origin_idx, seq.0 as i64])?;
        }
        Ok(())
    }

    /// A fresh UUIDv7 id.
    pub(crate) fn new_id(&mut self) -> EntityId {
        let now = self.env.now_ms();
        EntityId::generate(now, self.env.random_bytes())
    }

    /// Now, as an RFC 3339 timestamp.
    pub(crate) fn now_rfc3339(&self) -> String {
        possync_core::time::rfc3339_ms(self.env.now_ms())
    }

    /// Now, in the audit tables' `YYYY-MM-DD HH:MM:SS` form.
    /// (Formatted once per second: every audit row of a batch would otherwise pay for it.)
    pub(crate) fn now_sqlite(&mut self) -> String {
        let second = self.env.now_ms() / 1000;
        if self.sqlite_now.0 != second {
            self.sqlite_now = (second, possync_core::time::sqlite_datetime(second * 1000));
        }
        self.sqlite_now.1.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticket_prefix_is_short_and_stable() {
        let pos = PosId::parse("pos-a").unwrap();
        assert_eq!(ticket_prefix(&pos).len(), 4);
        assert_eq!(ticket_prefix(&pos), ticket_prefix(&pos));
        assert_ne!(ticket_prefix(&pos), ticket_prefix(&PosId::parse("pos-b").unwrap()));
    }

    #[test]
    fn a_write_that_fails_inside_a_group_is_rolled_back_alone() {
        let dir = tempfile::tempdir().unwrap();
        let pos = PosId::parse("a").unwrap();
        let env = Box::new(SystemEnvironment::default());
        let mut store = Store::init(&dir.path().join("a.db"), Some(pos.clone()), "a", env).unwrap();
        let category = |id: &str| serde_json::json!({"id": id, "name": format!("Category {id}")});
        let (kept, failed, after) = store
            .group_commit(|store| {
                let kept = store.create_record(EntityKind::Category, &category("c1"));
                // Fails after writing: a record, its change-log row, a seq and an outbox entry.
                let failed: Result<()> = store.write(true, |store| {
                    store.create_record(EntityKind::Category, &category("c2"))?;
                    Err(StoreError::InvalidState("fails after writing".into()))
                });
                let after = store.create_record(EntityKind::Category, &category("c3"));
                (kept, failed, after)
            })
            .unwrap();
        assert!(kept.is_ok() && failed.is_err() && after.is_ok());
        let reader = store.reader().unwrap();
        let rows = reader.query_json("SELECT id FROM categories ORDER BY id").unwrap();
        assert_eq!(rows, vec![serde_json::json!({"id": "c1"}), serde_json::json!({"id": "c3"})]);
        let seqs = reader.query_json("SELECT seq, entity_id FROM sync_changes ORDER BY seq").unwrap();
        assert_eq!(
            seqs,
            vec![
                serde_json::json!({"seq": 1, "entityId": "a"}),
                serde_json::json!({"seq": 2, "entityId": "c1"}),
                serde_json::json!({"seq": 3, "entityId": "c3"})
            ],
            "the till's key enrollment first; the failed write's seq is given to the next write: no gap"
        );
        let vv = reader.query_json("SELECT seq FROM sync_vv").unwrap();
        assert_eq!(vv, vec![serde_json::json!({"seq": 3})]);
        assert_eq!(store.summary().get(&pos), Seq(3));
        assert_eq!(store.drain_outbox().len(), 3);
    }
}
