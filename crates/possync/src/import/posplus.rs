//! The POSPlus importer: reads a POSPlus SQLite file (schema of its migrations 001-011) and
//! writes its catalog, customers, tickets and stock into the node through the store's
//! public write API, so that every imported row is an ordinary local change that syncs.
//!
//! Why it works the way it does (the rules, with examples, are in `docs/IMPORT.md`):
//!
//! - POSPlus ids are per-till autoincrement integers: the same integer is a different row on
//!   another till. Ids here are name-based UUIDv5s of what identifies a row across tills:
//!   the SKU for a product, the path of names for a category, the customer number (else the
//!   till and the integer), the till and the integer for a ticket. Two tills importing
//!   copies of one catalog write the same ids, and their changes merge field by field.
//!   A ticket's id starts with its POSPlus id (a UUIDv8, see [`ticket_id`]), so that a
//!   till's tickets, lines and payments are appended to their tables in import order.
//! - POSPlus stock is an absolute number; possync's stock is a sum of movements. The stock
//!   is brought in as one count per product (an adjustment of counted - current), written
//!   once per till and product, and old tickets are recorded without stock movements.
//! - POSPlus money is REAL: every amount is converted to an exact decimal rounded to cents
//!   (half away from zero), and every value that changed in rounding is reported.
//! - The whole import is one transaction: a row the store rejects is rolled back alone and
//!   listed with its reason; anything else that fails rolls everything back.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::Path;
use std::str::FromStr;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use possync_core::entity::{Payment, PaymentMethod, TicketLine, TicketStatus};
use possync_core::{EntityId, PosId};
use possync_store::{HistoricalSale, ProductKey, Store, StoreError, Upserted};
use rusqlite::types::Value as Sql;
use rusqlite::{Connection, OpenFlags};
use rust_decimal::{Decimal, RoundingStrategy};
use serde::Serialize;
use serde_json::{Map, Value, json};
use uuid::Uuid;

/// The POSPlus migration files this importer knows (their names, as POSPlus records them in
/// its `migrations` table). A file that lists any other was written by a POSPlus version
/// whose schema this importer has not read.
pub const KNOWN_MIGRATIONS: [&str; 11] = [
    "001_initial_schema.sql",
    "002_remove_taxes.sql",
    "003_insert_default_admin.sql",
    "004_fix_admin_role.sql",
    "005_force_logout_after_role_fix.sql",
    "006_fix_system_admin_permission.sql",
    "007_p2p_conflict_resolution.sql",
    "008_store_settings.sql",
    "009_fix_partial_refund_stats.sql",
    "010_add_partially_refunded_status.sql",
    "011_add_print_preview_setting.sql",
];

/// The tables and columns the importer reads (a file without them is not a POSPlus file).
const REQUIRED: &[(&str, &[&str])] = &[
    ("categories", &["id", "name", "description", "parent_id", "is_active", "display_order", "created_at"]),
    (
        "products",
        &[
            "id",
            "sku",
            "barcode",
            "name",
            "description",
            "category_id",
            "price",
            "cost",
            "discount_rate",
            "stock",
            "min_stock",
            "max_stock",
            "unit",
            "is_active",
            "image_url",
            "created_at",
        ],
    ),
    (
        "customers",
        &[
            "id",
            "customer_number",
            "first_name",
            "last_name",
            "company_name",
            "email",
            "phone",
            "address",
            "city",
            "postal_code",
            "country",
            "notes",
            "created_at",
        ],
    ),
    (
        "tickets",
        &[
            "id",
            "ticket_number",
            "customer_id",
            "subtotal",
            "discount_amount",
            "total_amount",
            "status",
            "notes",
            "created_at",
            "session_id",
        ],
    ),
    (
        "ticket_lines",
        &[
            "id",
            "ticket_id",
            "product_id",
            "product_name",
            "product_sku",
            "quantity",
            "unit_price",
            "discount_rate",
            "discount_amount",
            "total_amount",
        ],
    ),
    ("payments", &["id", "ticket_id", "method", "amount", "reference"]),
    ("settings", &["key", "value"]),
    (
        "users",
        &[
            "id",
            "username",
            "email",
            "password_hash",
            "first_name",
            "last_name",
            "role_id",
            "is_active",
            "last_login",
            "created_at",
        ],
    ),
    ("roles", &["id", "name"]),
    (
        "cash_sessions",
        &[
            "id",
            "user_id",
            "opening_cash",
            "closing_cash",
            "expected_cash",
            "difference",
            "started_at",
            "closed_at",
            "status",
            "notes",
        ],
    ),
    ("stock_logs", &["id"]),
    (
        "z_reports",
        &[
            "id",
            "session_id",
            "user_id",
            "total_sales",
            "total_discount",
            "total_cash",
            "total_card",
            "total_transfer",
            "total_check",
            "total_other",
            "ticket_count",
            "report_date",
            "created_at",
        ],
    ),
];

/// The POSPlus settings that possync has under the same name and meaning.
const MAPPED_SETTINGS: [&str; 6] = [
    "p2p_enabled",
    "p2p_auto_sync",
    "p2p_conflict_resolution",
    "p2p_heartbeat_interval",
    "p2p_reconnect_max_attempts",
    "p2p_sync_batch_size",
];

/// Rows written as one batch (one savepoint) when none of them fails.
const BATCH_ROWS: usize = 2048;

/// A ticket row with its lines and payments.
type TicketRows = (Vec<Sql>, Vec<Vec<Sql>>, Vec<Vec<Sql>>);

/// How many rows between two drains of the store's outbox (no node reads it during an
/// import: the changes are in the log, and peers get them by catch-up).
const OUTBOX_DRAIN_EVERY: u64 = 1024;

/// Why an import could not run or stopped (a rejected row is not an error: it is skipped
/// and listed in the summary).
#[derive(Debug, thiserror::Error)]
pub enum PosplusError {
    /// The file does not exist or cannot be opened.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The file.
        path: String,
        /// SQLite's reason.
        source: rusqlite::Error,
    },
    /// The file is not a POSPlus database (not SQLite, no `migrations` table, a table or
    /// column missing).
    #[error("{path} is not a POSPlus database: {reason}")]
    NotPosplus {
        /// The file.
        path: String,
        /// What is missing.
        reason: String,
    },
    /// The file's schema comes from a POSPlus migration this importer does not know.
    #[error(
        "{path} has a POSPlus schema version this importer does not know: migration {migration:?} is not one of 001-011"
    )]
    UnknownVersion {
        /// The file.
        path: String,
        /// The unknown migration's name.
        migration: String,
    },
    /// Reading the POSPlus file failed during the import.
    #[error("reading the POSPlus database failed: {0}")]
    Read(#[from] rusqlite::Error),
    /// The node's database failed (not a rejected row: SQLite itself).
    #[error("writing to the node's database failed: {0}")]
    Store(#[from] StoreError),
}

/// A POSPlus database, opened read-only and checked.
#[derive(Debug)]
pub struct Source {
    /// The read-only connection.
    conn: Connection,
    /// The last migration applied (the schema version).
    version: String,
}

impl Source {
    /// Opens `path` read-only and checks that it is a POSPlus database of a known version.
    pub fn open(path: &Path) -> Result<Source, PosplusError> {
        let shown = path.display().to_string();
        if !path.is_file() {
            return Err(PosplusError::NotPosplus { path: shown, reason: "no such file".into() });
        }
        let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|source| PosplusError::Open { path: shown.clone(), source })?;
        let not_posplus = |reason: String| PosplusError::NotPosplus { path: shown.clone(), reason };
        let tables: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'table'")
            .and_then(|mut statement| statement.query_map([], |row| row.get(0))?.collect())
            .map_err(|err| not_posplus(format!("not a SQLite database ({err})")))?;
        if !tables.iter().any(|table| table == "migrations") {
            return Err(not_posplus("it has no `migrations` table".into()));
        }
        let applied: Vec<String> = conn
            .prepare("SELECT name FROM migrations ORDER BY name")
            .and_then(|mut statement| statement.query_map([], |row| row.get(0))?.collect())
            .map_err(|err| not_posplus(format!("its `migrations` table cannot be read ({err})")))?;
        if let Some(unknown) = applied.iter().find(|name| !KNOWN_MIGRATIONS.contains(&name.as_str())) {
            return Err(PosplusError::UnknownVersion { path: shown, migration: unknown.clone() });
        }
        if !applied.iter().any(|name| name == KNOWN_MIGRATIONS[0]) {
            return Err(not_posplus(format!("its `migrations` table does not list {}", KNOWN_MIGRATIONS[0])));
        }
        for (table, columns) in REQUIRED {
            if !tables.iter().any(|name| name == table) {
                return Err(not_posplus(format!("table `{table}` is missing")));
            }
            let present: Vec<String> = conn
                .prepare(&format!("SELECT name FROM pragma_table_info('{table}')"))
                .and_then(|mut statement| statement.query_map([], |row| row.get(0))?.collect())?;
            if let Some(column) = columns.iter().find(|column| !present.iter().any(|name| name == *column)) {
                return Err(not_posplus(format!("column `{table}.{column}` is missing")));
            }
        }
        let version = applied.last().cloned().unwrap_or_default();
        Ok(Source { conn, version })
    }

    fn count(&self, table: &str) -> Result<u64, PosplusError> {
        let count: i64 =
            self.conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |row| row.get(0))?;
        Ok(u64::try_from(count).unwrap_or(0))
    }
}

/// Choices of one import.
#[derive(Debug, Clone)]
pub struct Options {
    /// Bring each product's stock in as a count.
    pub import_stock: bool,
}

/// The terminal's progress bar (hidden when stderr is not a terminal).
#[derive(Debug)]
pub struct Progress {
    /// The bar.
    bar: ProgressBar,
}

impl Progress {
    /// A bar drawn on stderr when `visible`, else one that draws nothing.
    pub fn new(visible: bool) -> Progress {
        let bar = if visible {
            ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr())
        } else {
            ProgressBar::hidden()
        };
        if let Ok(style) =
            ProgressStyle::with_template("{msg:>12} [{bar:40}] {human_pos}/{human_len} rows ({eta} left)")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        Progress { bar }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// Counts of one table.
#[derive(Debug, Default, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TableCounts {
    /// Rows read from the POSPlus file.
    pub read: u64,
    /// Records created in the node.
    pub created: u64,
    /// Records that existed and had fields updated.
    pub updated: u64,
    /// Records that existed with the same values (nothing written).
    pub unchanged: u64,
    /// Rows not imported (each listed in `skipped` with its reason).
    pub skipped: u64,
}

/// A row that was not imported.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Skipped {
    /// The POSPlus table.
    pub table: &'static str,
    /// The row's POSPlus id (or key for settings).
    pub posplus_id: String,
    /// Why.
    pub reason: String,
}

/// A value that changed in rounding.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rounded {
    /// The POSPlus table.
    pub table: &'static str,
    /// The row's POSPlus id.
    pub posplus_id: i64,
    /// The column.
    pub column: &'static str,
    /// The value as POSPlus stored it (the shortest text of the REAL).
    pub original: String,
    /// The value imported.
    pub imported: String,
}

/// A POSPlus table that is not imported, and why.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NotImported {
    /// The POSPlus table.
    pub table: &'static str,
    /// Its rows.
    pub rows: u64,
    /// Why.
    pub reason: String,
}

/// What an import did (or, in a dry run, would do).
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    /// True for `--dry-run`: nothing was written.
    pub dry_run: bool,
    /// The POSPlus schema version (last migration applied).
    pub schema_version: String,
    /// Counts per table.
    pub tables: BTreeMap<&'static str, TableCounts>,
    /// Every row not imported, with its reason.
    pub skipped: Vec<Skipped>,
    /// Every value that had to be rounded.
    pub rounded: Vec<Rounded>,
    /// Tables not imported.
    pub not_imported: Vec<NotImported>,
    /// Things imported differently from the file (a missing parent category dropped...).
    pub warnings: Vec<String>,
}

impl Summary {
    /// The summary as text for people.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "POSPlus import (schema {}){}",
            self.schema_version,
            if self.dry_run { ": DRY RUN, nothing was written" } else { "" }
        );
        let _ = writeln!(
            out,
            "{:<14} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "table", "read", "created", "updated", "unchanged", "skipped"
        );
        for (table, counts) in &self.tables {
            let _ = writeln!(
                out,
                "{:<14} {:>9} {:>9} {:>9} {:>9} {:>9}",
                table, counts.read, counts.created, counts.updated, counts.unchanged, counts.skipped
            );
        }
        if !self.skipped.is_empty() {
            let _ = writeln!(out, "skipped rows ({}):", self.skipped.len());
            for skipped in &self.skipped {
                let _ = writeln!(out, "  {} #{}: {}", skipped.table, skipped.posplus_id, skipped.reason);
            }
        }
        let _ = writeln!(
            out,
            "rounded values: {} (money to cents, quantities to thousandths, rates to 4 places; half away from zero)",
            self.rounded.len()
        );
        for rounded in self.rounded.iter().take(5) {
            let _ = writeln!(
                out,
                "  {} #{} {}: {} -> {}",
                rounded.table, rounded.posplus_id, rounded.column, rounded.original, rounded.imported
            );
        }
        if self.rounded.len() > 5 {
            let _ = writeln!(out, "  ... and {} more (--json lists them all)", self.rounded.len() - 5);
        }
        for not in &self.not_imported {
            let _ = writeln!(out, "not imported: {} ({} rows): {}", not.table, not.rows, not.reason);
        }
        for warning in &self.warnings {
            let _ = writeln!(out, "warning: {warning}");
        }
        out
    }

    fn table(&mut self, table: &'static str) -> &mut TableCounts {
        self.tables.entry(table).or_default()
    }

    fn skip(&mut self, table: &'static str, id: impl ToString, reason: impl Into<String>) {
        self.table(table).skipped += 1;
        self.skipped.push(Skipped { table, posplus_id: id.to_string(), reason: reason.into() });
    }

    fn count(&mut self, table: &'static str, outcome: Upserted) {
        let counts = self.table(table);
        match outcome {
            Upserted::Created => counts.created += 1,
            Upserted::Updated => counts.updated += 1,
            Upserted::Unchanged | Upserted::Deleted => counts.unchanged += 1,
        }
    }
}

/// Imports `source` into `store` (inside the caller's transaction: see the module doc).
pub fn import(
    store: &mut Store,
    source: &Source,
    options: &Options,
    progress: &Progress,
) -> Result<Summary, PosplusError> {
    let total = ["categories", "products", "customers", "cash_sessions", "tickets", "z_reports", "settings"]
        .iter()
        .map(|table| source.count(table))
        .sum::<Result<u64, _>>()?;
    progress.bar.set_length(total);
    let pos_id = store.identity().pos_id.clone();
    let ticket_prefix = store.identity().ticket_prefix.clone();
    let mut importer = Importer {
        store,
        source,
        options,
        progress,
        pos_id,
        ticket_prefix,
        summary: Summary { schema_version: source.version.clone(), ..Summary::default() },
        categories: HashMap::new(),
        products: HashMap::new(),
        customers: HashMap::new(),
        users: HashMap::new(),
        sessions: HashMap::new(),
        first_of_sku: HashMap::new(),
        rows: 0,
    };
    importer.categories()?;
    importer.products()?;
    importer.customers()?;
    importer.users()?;
    importer.cash_sessions()?;
    importer.tickets()?;
    importer.z_reports()?;
    importer.settings()?;
    importer.not_imported()?;
    importer.store.drain_outbox();
    Ok(importer.summary)
}

/// The state of one import run.
struct Importer<'a> {
    /// The node's store (inside the import's transaction).
    store: &'a mut Store,
    /// The POSPlus file.
    source: &'a Source,
    /// The choices.
    options: &'a Options,
    /// The bar.
    progress: &'a Progress,
    /// This till (part of the ids of per-till data).
    pos_id: PosId,
    /// This till's ticket prefix (imported ticket numbers start with it).
    ticket_prefix: String,
    /// What is being reported.
    summary: Summary,
    /// POSPlus category id -> imported id.
    categories: HashMap<i64, EntityId>,
    /// POSPlus product id -> imported id.
    products: HashMap<i64, EntityId>,
    /// POSPlus customer id -> imported id.
    customers: HashMap<i64, EntityId>,
    /// POSPlus user id -> imported cashier account id.
    users: HashMap<i64, EntityId>,
    /// POSPlus cash session id -> imported id.
    sessions: HashMap<i64, EntityId>,
    /// SKU -> the first POSPlus product with it, and its imported id.
    first_of_sku: HashMap<String, (i64, EntityId)>,
    /// Rows handled so far (for the bar and the outbox drain).
    rows: u64,
}

/// One POSPlus row written as a record (what it did), or the reason it is skipped.
type RowOutcome = Result<Upserted, String>;

/// A row the store refused is skipped; SQLite failing is the end of the import.
fn rejected(err: StoreError) -> Result<String, PosplusError> {
    match err {
        StoreError::Sqlite(_) | StoreError::Migration(_) | StoreError::Corrupt(_) => Err(err.into()),
        other => Ok(other.to_string()),
    }
}

impl Importer<'_> {
    /// Writes one POSPlus row as a possync record: counted in `table`'s summary when
    /// written, skipped with the store's reason when refused (`None`); a database failure
    /// stops the import.
    fn upsert(
        &mut self,
        table: &'static str,
        posplus_id: i64,
        kind: possync_core::EntityKind,
        target: &EntityId,
        body: Map<String, Value>,
    ) -> Result<Option<Upserted>, PosplusError> {
        match self.store.upsert_record(kind, target, &Value::Object(body)) {
            Ok(outcome) => {
                self.summary.count(table, outcome);
                Ok(Some(outcome))
            }
            Err(err) => {
                let reason = rejected(err)?;
                self.summary.skip(table, posplus_id, reason);
                Ok(None)
            }
        }
    }

    fn step(&mut self, message: &'static str) {
        self.rows += 1;
        if self.rows.is_multiple_of(256) {
            self.progress.bar.set_message(message);
            self.progress.bar.set_position(self.rows);
        }
        if self.rows.is_multiple_of(OUTBOX_DRAIN_EVERY) {
            self.store.drain_outbox();
        }
    }

    fn categories(&mut self) -> Result<(), PosplusError> {
        struct Row {
            id: i64,
            name: Option<String>,
            description: Option<String>,
            parent: Option<i64>,
            active: Sql,
            order: Sql,
            created_at: Option<String>,
        }
        let rows: Vec<Row> = self
            .source
            .conn
            .prepare(
                "SELECT id, name, description, parent_id, is_active, display_order, created_at
                 FROM categories ORDER BY id",
            )?
            .query_map([], |row| {
                Ok(Row {
                    id: row.get(0)?,
                    name: text(row.get(1)?),
                    description: text(row.get(2)?),
                    parent: integer(&row.get(3)?),
                    active: row.get(4)?,
                    order: row.get(5)?,
                    created_at: text(row.get(6)?),
                })
            })?
            .collect::<Result<_, _>>()?;
        let by_id: HashMap<i64, &Row> = rows.iter().map(|row| (row.id, row)).collect();
        // The path of names from the root identifies a category across tills; parents first.
        let mut ordered: Vec<(usize, String, &Row)> = Vec::with_capacity(rows.len());
        for row in &rows {
            self.summary.table("categories").read += 1;
            let Some(name) = row.name.as_deref().filter(|name| !name.trim().is_empty()) else {
                self.summary.skip("categories", row.id, "no name");
                continue;
            };
            let mut path = vec![name.to_string()];
            let mut parent = row.parent;
            let mut broken = None;
            while let Some(parent_id) = parent {
                if path.len() > 64 || parent_id == row.id {
                    broken = Some("its parents form a cycle".to_string());
                    break;
                }
                match by_id.get(&parent_id) {
                    Some(parent_row) => {
                        path.push(parent_row.name.clone().unwrap_or_default());
                        parent = parent_row.parent;
                    }
                    None => {
                        broken = Some(format!("parent category #{parent_id} is missing"));
                        break;
                    }
                }
            }
            if let Some(reason) = broken {
                self.summary.skip("categories", row.id, reason);
                continue;
            }
            path.reverse();
            ordered.push((path.len(), path.join("\u{1f}"), row));
        }
        ordered.sort_by_key(|(depth, _, row)| (*depth, row.id));
        let mut first_of_path: HashMap<String, i64> = HashMap::new();
        for (_, path, row) in ordered {
            self.step("categories");
            let id = derived_id(&format!("category:path:{path}"));
            if let Some(first) = first_of_path.get(&path) {
                self.summary.warnings.push(format!(
                    "categories #{}: same name and parent as #{first}: imported as one category",
                    row.id
                ));
                self.summary.table("categories").unchanged += 1;
                self.categories.insert(row.id, id);
                continue;
            }
            let parent_id = match row.parent {
                None => None,
                Some(parent) => match self.categories.get(&parent) {
                    Some(id) => Some(id.clone()),
                    None => {
                        self.summary.skip(
                            "categories",
                            row.id,
                            format!("parent category #{parent} was skipped"),
                        );
                        continue;
                    }
                },
            };
            let mut body = Map::new();
            body.insert("name".into(), json!(row.name));
            body.insert("description".into(), json!(row.description));
            body.insert("parentId".into(), json!(parent_id.as_ref().map(EntityId::as_str)));
            body.insert("isActive".into(), json!(flag(&row.active)));
            body.insert("displayOrder".into(), json!(integer(&row.order).unwrap_or(0)));
            self.created_at(&mut body, "categories", row.id, row.created_at.as_deref());
            if self.upsert("categories", row.id, possync_core::EntityKind::Category, &id, body)?.is_some() {
                first_of_path.insert(path, row.id);
                self.categories.insert(row.id, id);
            }
        }
        Ok(())
    }

    fn products(&mut self) -> Result<(), PosplusError> {
        let mut statement = self.source.conn.prepare(
            "SELECT id, sku, barcode, name, description, category_id, price, cost, discount_rate, stock,
                    min_stock, max_stock, unit, is_active, image_url, created_at
             FROM products ORDER BY id",
        )?;
        let mut rows = statement.query([])?;
        let mut chunk = Vec::with_capacity(BATCH_ROWS);
        loop {
            let row = rows.next()?;
            if let Some(row) = row {
                self.step("products");
                chunk.push((0..16).map(|i| row.get(i)).collect::<Result<Vec<Sql>, _>>()?);
            }
            if chunk.len() == BATCH_ROWS || (row.is_none() && !chunk.is_empty()) {
                self.in_batches(
                    &chunk,
                    |importer, row| importer.product_row(row),
                    |importer, row| importer.forget_product(row),
                )?;
                chunk.clear();
            }
            if row.is_none() {
                return Ok(());
            }
        }
    }

    /// Forgets what a product row left in the maps (before it is redone).
    fn forget_product(&mut self, values: &[Sql]) {
        let id = integer(&values[0]).unwrap_or_default();
        self.products.remove(&id);
        if let Some(sku) = text(values[1].clone())
            && self.first_of_sku.get(&sku).is_some_and(|(first, _)| *first == id)
        {
            self.first_of_sku.remove(&sku);
        }
    }

    /// One product row: the product, then its stock count.
    fn product_row(&mut self, values: &[Sql]) -> Result<(), PosplusError> {
        let id = integer(&values[0]).unwrap_or_default();
        self.summary.table("products").read += 1;
        let Some(sku) = text(values[1].clone()).filter(|sku| !sku.trim().is_empty()) else {
            self.summary.skip("products", id, "no sku");
            return Ok(());
        };
        if let Some((first, first_id)) = self.first_of_sku.get(&sku) {
            let reason = format!("duplicate sku {sku:?} (POSPlus product #{first} has it)");
            self.products.insert(id, first_id.clone());
            self.summary.skip("products", id, reason);
            return Ok(());
        }
        let category = match integer(&values[5]) {
            None => {
                self.summary.skip("products", id, "no category");
                return Ok(());
            }
            Some(category) => match self.categories.get(&category) {
                Some(target) => target.clone(),
                None => {
                    self.summary.skip("products", id, format!("missing category #{category}"));
                    return Ok(());
                }
            },
        };
        let mut body = Map::new();
        let mut bad = None;
        for (column, index, field, kind) in [
            ("price", 6, "price", Amount::Money),
            ("cost", 7, "cost", Amount::Money),
            ("discount_rate", 8, "discountRate", Amount::Rate),
            ("min_stock", 10, "minStock", Amount::Quantity),
            ("max_stock", 11, "maxStock", Amount::Quantity),
        ] {
            if values[index] == Sql::Null {
                continue;
            }
            match self.amount("products", id, column, &values[index], kind) {
                Ok(value) if value.is_sign_negative() && !value.is_zero() => {
                    bad = Some(format!("negative {}", column.replace('_', " ")));
                    break;
                }
                Ok(value) => {
                    body.insert(field.into(), json!(value.to_string()));
                }
                Err(reason) => {
                    bad = Some(format!("{column}: {reason}"));
                    break;
                }
            }
        }
        if let Some(reason) = bad {
            self.summary.skip("products", id, reason);
            return Ok(());
        }
        let barcode = text(values[2].clone()).filter(|barcode| !barcode.trim().is_empty());
        body.insert("sku".into(), json!(sku));
        body.insert("barcode".into(), json!(barcode));
        body.insert("name".into(), json!(text(values[3].clone())));
        body.insert("description".into(), json!(text(values[4].clone())));
        body.insert("categoryId".into(), json!(category.as_str()));
        body.insert("unit".into(), json!(text(values[12].clone())));
        body.insert("isActive".into(), json!(flag(&values[13])));
        body.insert("imageUrl".into(), json!(text(values[14].clone())));
        self.created_at(&mut body, "products", id, text(values[15].clone()).as_deref());
        // The catalog is matched by SKU, then barcode: a product already in the node
        // (created by hand, or imported from another till's copy) is updated in place.
        let target = match self.store.live_product_by(ProductKey::Sku, &sku)? {
            Some(existing) => existing,
            None => match barcode.as_deref() {
                Some(barcode) => self.store.live_product_by(ProductKey::Barcode, barcode)?,
                None => None,
            }
            .unwrap_or_else(|| product_id_for_sku(&sku)),
        };
        let Some(outcome) = self.upsert("products", id, possync_core::EntityKind::Product, &target, body)?
        else {
            return Ok(());
        };
        self.first_of_sku.insert(sku, (id, target.clone()));
        self.products.insert(id, target.clone());
        if outcome == Upserted::Deleted {
            self.summary.warnings.push(format!(
                "products #{id}: deleted on this terminal since: left deleted, stock not counted"
            ));
            return Ok(());
        }
        if self.options.import_stock {
            self.stock(id, &target, &values[9])?;
        }
        Ok(())
    }

    /// One count per product and till: written once, never again (see `count_stock_once`).
    fn stock(&mut self, id: i64, product: &EntityId, raw: &Sql) -> Result<(), PosplusError> {
        self.summary.table("stock").read += 1;
        let counted = match self.amount("products", id, "stock", raw, Amount::Quantity) {
            Ok(counted) if counted.is_sign_negative() && !counted.is_zero() => {
                self.summary.skip("stock", id, format!("negative stock {counted}: not counted"));
                return Ok(());
            }
            Ok(counted) => counted,
            Err(reason) => {
                self.summary.skip("stock", id, format!("stock: {reason}"));
                return Ok(());
            }
        };
        let movement = derived_id(&format!("stock-count:{}:{}", self.pos_id, product));
        match self.store.count_stock_once(&movement, product, counted, Some("posplus import")) {
            Ok(Some(_)) => self.summary.table("stock").created += 1,
            Ok(None) => self.summary.table("stock").unchanged += 1,
            Err(err) => {
                let reason = rejected(err)?;
                self.summary.skip("stock", id, reason);
            }
        }
        Ok(())
    }

    fn customers(&mut self) -> Result<(), PosplusError> {
        let mut statement = self.source.conn.prepare(
            "SELECT id, customer_number, first_name, last_name, company_name, email, phone, address, city,
                    postal_code, country, notes, created_at
             FROM customers ORDER BY id",
        )?;
        let mut rows = statement.query([])?;
        let mut chunk = Vec::with_capacity(BATCH_ROWS);
        loop {
            let row = rows.next()?;
            if let Some(row) = row {
                self.step("customers");
                chunk.push((0..13).map(|i| row.get(i)).collect::<Result<Vec<Sql>, _>>()?);
            }
            if chunk.len() == BATCH_ROWS || (row.is_none() && !chunk.is_empty()) {
                self.in_batches(
                    &chunk,
                    |importer, row| importer.customer_row(row),
                    |importer, values| {
                        importer.customers.remove(&integer(&values[0]).unwrap_or_default());
                    },
                )?;
                chunk.clear();
            }
            if row.is_none() {
                return Ok(());
            }
        }
    }

    fn customer_row(&mut self, values: &[Sql]) -> Result<(), PosplusError> {
        let id = integer(&values[0]).unwrap_or_default();
        self.summary.table("customers").read += 1;
        let field = |index: usize| text(values[index].clone()).filter(|value| !value.trim().is_empty());
        let person = [field(2), field(3)]
            .into_iter()
            .flatten()
            .map(|part| part.trim().to_string())
            .collect::<Vec<_>>();
        let name = match (person.is_empty(), field(4)) {
            (false, Some(company)) => format!("{} ({})", person.join(" "), company.trim()),
            (false, None) => person.join(" "),
            (true, Some(company)) => company.trim().to_string(),
            (true, None) => {
                self.summary.skip("customers", id, "no first, last or company name");
                return Ok(());
            }
        };
        let place = [field(9), field(8)].into_iter().flatten().collect::<Vec<_>>().join(" ");
        let address = [field(7), Some(place).filter(|place| !place.is_empty()), field(10)]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>();
        let notes = [field(11), (!address.is_empty()).then(|| format!("Address: {}", address.join(", ")))]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>();
        let target = match field(1) {
            Some(number) => derived_id(&format!("customer:number:{number}")),
            None => derived_id(&format!("customer:{}:{id}", self.pos_id)),
        };
        let mut body = Map::new();
        body.insert("name".into(), json!(name));
        body.insert("email".into(), json!(field(5)));
        body.insert("phone".into(), json!(field(6)));
        body.insert("notes".into(), json!((!notes.is_empty()).then(|| notes.join("\n"))));
        self.created_at(&mut body, "customers", id, field(12).as_deref());
        if self.upsert("customers", id, possync_core::EntityKind::Customer, &target, body)?.is_some() {
            self.customers.insert(id, target);
        }
        Ok(())
    }

    /// Cashier accounts, with their bcrypt hash kept as it is (the node checks it at login),
    /// matched by username: the same cashier imported on every till of the shop is one
    /// account. A role possync does not have is a skipped row.
    fn users(&mut self) -> Result<(), PosplusError> {
        let mut statement = self.source.conn.prepare(
            "SELECT u.id, u.username, u.email, u.password_hash, u.first_name, u.last_name, r.name, u.is_active,
                    u.last_login, u.created_at
             FROM users u LEFT JOIN roles r ON r.id = u.role_id ORDER BY u.id",
        )?;
        let rows = statement
            .query_map([], |row| (0..10).map(|i| row.get(i)).collect::<Result<Vec<Sql>, _>>())?
            .collect::<Result<Vec<_>, _>>()?;
        for values in rows {
            let id = integer(&values[0]).unwrap_or_default();
            self.summary.table("users").read += 1;
            let field = |index: usize| text(values[index].clone()).filter(|value| !value.trim().is_empty());
            let Some(username) = field(1) else {
                self.summary.skip("users", id, "no username");
                continue;
            };
            let Some(role) = field(6).as_deref().and_then(possync_role) else {
                let role = field(6).unwrap_or_else(|| "none".into());
                self.summary.skip("users", id, format!("role {role:?} is not admin, manager or cashier"));
                continue;
            };
            let mut body = Map::new();
            body.insert("username".into(), json!(username.trim()));
            body.insert("email".into(), json!(field(2)));
            body.insert("passwordHash".into(), json!(field(3)));
            body.insert("firstName".into(), json!(field(4)));
            body.insert("lastName".into(), json!(field(5)));
            body.insert("role".into(), json!(role));
            body.insert("isActive".into(), json!(flag(&values[7])));
            body.insert("lastLogin".into(), json!(field(8).and_then(|raw| rfc3339(&raw))));
            self.created_at(&mut body, "users", id, field(9).as_deref());
            let target = derived_id(&format!("user:username:{}", username.trim()));
            if self.upsert("users", id, possync_core::EntityKind::User, &target, body)?.is_some() {
                self.users.insert(id, target);
            }
        }
        Ok(())
    }

    /// This till's cash sessions, as POSPlus left them (open or closed, with its figures).
    /// An open one is imported only when this till has no open session of its own: a till
    /// holds one open session at a time.
    fn cash_sessions(&mut self) -> Result<(), PosplusError> {
        self.import_rows(
            "cash_sessions",
            "cash sessions",
            "SELECT s.id, s.user_id, s.opening_cash, s.closing_cash, s.expected_cash, s.difference, s.started_at,
                    s.closed_at, s.status, s.notes, (SELECT MIN(z.id) FROM z_reports z WHERE z.session_id = s.id)
             FROM cash_sessions s ORDER BY s.id",
            11,
            Self::cash_session,
        )
    }

    /// Imports every row of `sql` (its first `columns` columns, the POSPlus id first) with
    /// `import`, counting each in `table`'s summary or skipping it with its reason.
    fn import_rows(
        &mut self,
        table: &'static str,
        progress: &'static str,
        sql: &str,
        columns: usize,
        import: fn(&mut Self, i64, &[Sql]) -> Result<RowOutcome, PosplusError>,
    ) -> Result<(), PosplusError> {
        let rows = self
            .source
            .conn
            .prepare(sql)?
            .query_map([], |row| (0..columns).map(|i| row.get(i)).collect::<Result<Vec<Sql>, _>>())?
            .collect::<Result<Vec<_>, _>>()?;
        for values in rows {
            self.step(progress);
            let id = integer(&values[0]).unwrap_or_default();
            self.summary.table(table).read += 1;
            match import(self, id, &values)? {
                Ok(outcome) => self.summary.count(table, outcome),
                Err(reason) => self.summary.skip(table, id, reason),
            }
        }
        Ok(())
    }

    /// One cash session: `Ok(Ok(outcome))`, or `Ok(Err(reason))` when it is skipped.
    fn cash_session(&mut self, id: i64, values: &[Sql]) -> Result<RowOutcome, PosplusError> {
        let status = match text(values[8].clone()).as_deref() {
            Some("open") => "open",
            Some("closed") => "closed",
            other => return Ok(Err(format!("unknown status {other:?}"))),
        };
        let Some(opened_at) = text(values[6].clone()).as_deref().and_then(rfc3339) else {
            return Ok(Err(format!("started_at {:?} is not a date", text(values[6].clone()))));
        };
        let target = derived_id(&format!("cash_session:{}:{id}", self.pos_id));
        if status == "open"
            && let Some(open) = self.store.open_cash_session_id()?
            && open != target
        {
            return Ok(Err(format!("open, and this till already has the open session {open}")));
        }
        let mut body = Map::new();
        body.insert("posId".into(), json!(self.pos_id.as_str()));
        body.insert("status".into(), json!(status));
        body.insert("openedAt".into(), json!(opened_at));
        body.insert("openedBy".into(), json!(integer(&values[1]).and_then(|user| self.users.get(&user))));
        body.insert("notes".into(), json!(text(values[9].clone())));
        match self.amount("cash_sessions", id, "opening_cash", &values[2], Amount::Money) {
            Ok(amount) => body.insert("openingCash".into(), json!(amount.to_string())),
            Err(reason) => return Ok(Err(format!("opening_cash: {reason}"))),
        };
        if status == "closed" {
            for (column, index, field) in [
                ("closing_cash", 3, "countedCash"),
                ("expected_cash", 4, "expectedCash"),
                ("difference", 5, "difference"),
            ] {
                if matches!(values[index], Sql::Null) {
                    continue;
                }
                match self.amount("cash_sessions", id, column, &values[index], Amount::Money) {
                    Ok(amount) => body.insert(field.into(), json!(amount.to_string())),
                    Err(reason) => return Ok(Err(format!("{column}: {reason}"))),
                };
            }
            let closed_at = text(values[7].clone()).as_deref().and_then(rfc3339);
            body.insert("closedAt".into(), json!(closed_at));
            if let Some(report) = integer(&values[10]) {
                body.insert(
                    "zReportId".into(),
                    json!(derived_id(&format!("z_report:{}:{report}", self.pos_id))),
                );
            }
        }
        match self.store.upsert_record(possync_core::EntityKind::CashSession, &target, &Value::Object(body)) {
            Ok(outcome) => {
                self.sessions.insert(id, target);
                Ok(Ok(outcome))
            }
            Err(err) => Ok(Err(rejected(err)?)),
        }
    }

    /// The Z reports of the imported sessions, as POSPlus computed them (POSPlus keeps no
    /// refund total: it is imported as 0). A report is never edited: importing a changed
    /// copy of one skips it with the reason.
    fn z_reports(&mut self) -> Result<(), PosplusError> {
        self.import_rows(
            "z_reports",
            "z reports",
            "SELECT z.id, z.session_id, z.user_id, z.total_sales, z.total_discount, z.total_cash, z.total_card,
                    z.total_transfer, z.total_check, z.total_other, z.ticket_count, z.report_date, z.created_at,
                    s.opening_cash, s.closing_cash, s.expected_cash, s.difference
             FROM z_reports z LEFT JOIN cash_sessions s ON s.id = z.session_id ORDER BY z.id",
            17,
            Self::z_report,
        )
    }

    /// One Z report: `Ok(Ok(outcome))`, or `Ok(Err(reason))` when it is skipped.
    fn z_report(&mut self, id: i64, values: &[Sql]) -> Result<RowOutcome, PosplusError> {
        let session = integer(&values[1]);
        let Some(session_id) = session.and_then(|session| self.sessions.get(&session)).cloned() else {
            let session = session.map_or_else(|| "null".into(), |session| session.to_string());
            return Ok(Err(format!("its cash session #{session} was not imported")));
        };
        let Some(day) = text(values[11].clone()).map(|day| day.chars().take(10).collect::<String>()) else {
            return Ok(Err("no report_date".into()));
        };
        if !possync_core::time::is_date(&day) {
            return Ok(Err(format!("report_date {day:?} is not a date")));
        }
        let mut body = Map::new();
        body.insert("sessionId".into(), json!(session_id.as_str()));
        body.insert("posId".into(), json!(self.pos_id.as_str()));
        body.insert("userId".into(), json!(integer(&values[2]).and_then(|user| self.users.get(&user))));
        body.insert("reportDate".into(), json!(day));
        body.insert("ticketCount".into(), json!(integer(&values[10]).unwrap_or_default()));
        body.insert("totalRefunds".into(), json!("0"));
        for (column, index, field, required) in [
            ("total_sales", 3, "totalSales", true),
            ("total_discount", 4, "totalDiscount", true),
            ("total_cash", 5, "totalCash", true),
            ("total_card", 6, "totalCard", true),
            ("total_transfer", 7, "totalTransfer", true),
            ("total_check", 8, "totalCheck", true),
            ("total_other", 9, "totalOther", true),
            ("opening_cash", 13, "openingCash", true),
            ("closing_cash", 14, "countedCash", false),
            ("expected_cash", 15, "expectedCash", false),
            ("difference", 16, "difference", false),
        ] {
            if !required && matches!(values[index], Sql::Null) {
                continue;
            }
            match self.amount("z_reports", id, column, &values[index], Amount::Money) {
                Ok(amount) => body.insert(field.into(), json!(amount.to_string())),
                Err(reason) => return Ok(Err(format!("{column}: {reason}"))),
            };
        }
        self.created_at(&mut body, "z_reports", id, text(values[12].clone()).as_deref());
        if !body.contains_key("createdAt") {
            body.insert("createdAt".into(), json!(format!("{day}T00:00:00.000Z")));
        }
        let target = derived_id(&format!("z_report:{}:{id}", self.pos_id));
        match self.store.upsert_record(possync_core::EntityKind::ZReport, &target, &Value::Object(body)) {
            Ok(outcome) => Ok(Ok(outcome)),
            Err(err) => Ok(Err(rejected(err)?)),
        }
    }

    /// Tickets with their lines and payments, read as three streams ordered by ticket id
    /// and walked together (one pass over each table).
    fn tickets(&mut self) -> Result<(), PosplusError> {
        let conn = &self.source.conn;
        let mut tickets = conn.prepare(
            "SELECT id, ticket_number, customer_id, subtotal, discount_amount, total_amount, status, notes, created_at,
                    session_id
             FROM tickets ORDER BY id",
        )?;
        let mut lines = conn.prepare(
            "SELECT ticket_id, id, product_id, product_name, product_sku, quantity, unit_price, discount_rate,
                    discount_amount, total_amount
             FROM ticket_lines ORDER BY ticket_id, id",
        )?;
        let mut payments = conn.prepare(
            "SELECT ticket_id, id, method, amount, reference FROM payments ORDER BY ticket_id, id",
        )?;
        let mut ticket_rows = tickets.query([])?;
        let mut line_rows = Stream::new(lines.query([])?, 10);
        let mut payment_rows = Stream::new(payments.query([])?, 5);
        let mut chunk = Vec::with_capacity(BATCH_ROWS);
        while let Some(row) = ticket_rows.next()? {
            self.step("tickets");
            let ticket: Vec<Sql> = (0..10).map(|i| row.get(i)).collect::<Result<_, _>>()?;
            let id = integer(&ticket[0]).unwrap_or_default();
            for (table, orphan) in line_rows
                .orphans_before(id)?
                .into_iter()
                .map(|row| ("ticket_lines", row))
                .chain(payment_rows.orphans_before(id)?.into_iter().map(|row| ("payments", row)))
            {
                let orphan_id = integer(&orphan[1]).unwrap_or_default();
                let ticket_id = integer(&orphan[0]).map_or_else(|| "null".into(), |id| id.to_string());
                self.summary.skip(table, orphan_id, format!("its ticket #{ticket_id} does not exist"));
            }
            let ticket_lines = line_rows.take(id)?;
            let ticket_payments = payment_rows.take(id)?;
            self.summary.table("tickets").read += 1;
            self.summary.table("ticket_lines").read += ticket_lines.len() as u64;
            self.summary.table("payments").read += ticket_payments.len() as u64;
            chunk.push((ticket, ticket_lines, ticket_payments));
            if chunk.len() == BATCH_ROWS {
                self.in_batches(&chunk, Self::ticket_row, |_, _| {})?;
                chunk.clear();
            }
        }
        if !chunk.is_empty() {
            self.in_batches(&chunk, Self::ticket_row, |_, _| {})?;
        }
        for (table, orphan) in line_rows
            .rest()?
            .into_iter()
            .map(|row| ("ticket_lines", row))
            .chain(payment_rows.rest()?.into_iter().map(|row| ("payments", row)))
        {
            let orphan_id = integer(&orphan[1]).unwrap_or_default();
            let ticket_id = integer(&orphan[0]).map_or_else(|| "null".into(), |id| id.to_string());
            self.summary.skip(table, orphan_id, format!("its ticket #{ticket_id} does not exist"));
        }
        Ok(())
    }

    /// One ticket with its lines and payments.
    fn ticket_row(&mut self, (ticket, lines, payments): &TicketRows) -> Result<(), PosplusError> {
        let id = integer(&ticket[0]).unwrap_or_default();
        match self.ticket(id, ticket, lines, payments)? {
            Ok(created) => self.count_ticket(created, lines.len() as u64, payments.len() as u64),
            Err(reason) => {
                self.summary.skip("tickets", id, reason);
                self.summary.table("ticket_lines").skipped += lines.len() as u64;
                self.summary.table("payments").skipped += payments.len() as u64;
            }
        }
        Ok(())
    }

    /// Runs `each` over `rows` as one batch of writes (one savepoint: see
    /// `Store::begin_batch`); if a write of the batch failed, the batch was rolled back:
    /// what the rows left in the summary and the maps is undone (`forget`), and they are
    /// redone one by one, each write in its own savepoint, so that only the failing rows
    /// are skipped.
    fn in_batches<R>(
        &mut self,
        rows: &[R],
        each: fn(&mut Self, &R) -> Result<(), PosplusError>,
        forget: fn(&mut Self, &R),
    ) -> Result<(), PosplusError> {
        let mark = (
            self.summary.tables.clone(),
            self.summary.skipped.len(),
            self.summary.rounded.len(),
            self.summary.warnings.len(),
        );
        self.store.begin_batch()?;
        let mut outcome = Ok(());
        for row in rows {
            outcome = each(self, row);
            if outcome.is_err() {
                break;
            }
        }
        let kept = self.store.end_batch()?;
        outcome?;
        if kept {
            return Ok(());
        }
        self.summary.tables = mark.0;
        self.summary.skipped.truncate(mark.1);
        self.summary.rounded.truncate(mark.2);
        self.summary.warnings.truncate(mark.3);
        for row in rows {
            forget(self, row);
        }
        for row in rows {
            each(self, row)?;
        }
        Ok(())
    }

    fn count_ticket(&mut self, created: bool, lines: u64, payments: u64) {
        for (table, count) in [("tickets", 1), ("ticket_lines", lines), ("payments", payments)] {
            let counts = self.summary.table(table);
            if created {
                counts.created += count;
            } else {
                counts.unchanged += count;
            }
        }
    }

    /// One ticket: `Ok(Ok(created))`, or `Ok(Err(reason))` when it is skipped.
    fn ticket(
        &mut self,
        id: i64,
        ticket: &[Sql],
        lines: &[Vec<Sql>],
        payments: &[Vec<Sql>],
    ) -> Result<Result<bool, String>, PosplusError> {
        let status = match text(ticket[6].clone()).as_deref() {
            Some("completed") => TicketStatus::Completed,
            Some("cancelled") => TicketStatus::Cancelled,
            Some("refunded") => TicketStatus::Refunded,
            Some("partially_refunded") => TicketStatus::PartiallyRefunded,
            Some("pending") => return Ok(Err("pending: never completed".into())),
            other => return Ok(Err(format!("unknown status {other:?}"))),
        };
        if lines.is_empty() {
            return Ok(Err("no lines".into()));
        }
        let Some(created_at) = text(ticket[8].clone()).as_deref().and_then(rfc3339) else {
            return Ok(Err(format!("created_at {:?} is not a date", text(ticket[8].clone()))));
        };
        let mut sale_lines = Vec::with_capacity(lines.len());
        let mut subtotal = Decimal::ZERO;
        let mut discount = Decimal::ZERO;
        for line in lines {
            let line_id = integer(&line[1]).unwrap_or_default();
            let mut amount = |column: &'static str, index: usize, kind: Amount| {
                self.amount("ticket_lines", line_id, column, &line[index], kind)
                    .map_err(|reason| format!("line #{line_id} {column}: {reason}"))
            };
            let parsed = (|| {
                Ok::<_, String>((
                    amount("quantity", 5, Amount::Quantity)?,
                    amount("unit_price", 6, Amount::Money)?,
                    amount("discount_rate", 7, Amount::Rate)?,
                    amount("discount_amount", 8, Amount::Money)?,
                    amount("total_amount", 9, Amount::Money)?,
                ))
            })();
            let (quantity, unit_price, discount_rate, discount_amount, total_amount) = match parsed {
                Ok(values) => values,
                Err(reason) => return Ok(Err(reason)),
            };
            if quantity <= Decimal::ZERO {
                return Ok(Err(format!("line #{line_id}: quantity must be positive")));
            }
            if [unit_price, discount_rate, discount_amount, total_amount]
                .iter()
                .any(|value| value.is_sign_negative() && !value.is_zero())
            {
                return Ok(Err(format!("line #{line_id}: negative amount")));
            }
            let sku = text(line[4].clone()).unwrap_or_default();
            let product = match integer(&line[2]).and_then(|product| self.products.get(&product)) {
                Some(product) => product.clone(),
                None if !sku.trim().is_empty() => self
                    .store
                    .live_product_by(ProductKey::Sku, &sku)?
                    .unwrap_or_else(|| product_id_for_sku(&sku)),
                None => return Ok(Err(format!("line #{line_id}: no product and no sku"))),
            };
            let Some(gross) = quantity.checked_mul(unit_price) else {
                return Ok(Err(format!("line #{line_id}: amounts too large")));
            };
            subtotal = match subtotal.checked_add(gross) {
                Some(sum) => sum,
                None => return Ok(Err("amounts too large".into())),
            };
            discount = match discount.checked_add(discount_amount) {
                Some(sum) => sum,
                None => return Ok(Err("amounts too large".into())),
            };
            sale_lines.push(TicketLine {
                product_id: product,
                product_name: text(line[3].clone())
                    .filter(|name| !name.trim().is_empty())
                    .unwrap_or_else(|| sku.clone()),
                product_sku: sku,
                quantity: quantity.normalize(),
                unit_price: unit_price.normalize(),
                discount_rate: discount_rate.normalize(),
                discount_amount: discount_amount.normalize(),
                total_amount: total_amount.normalize(),
            });
        }
        let total = subtotal - discount;
        let mut totals = Vec::with_capacity(3);
        for (column, index) in [("subtotal", 3), ("discount_amount", 4), ("total_amount", 5)] {
            match self.amount("tickets", id, column, &ticket[index], Amount::Money) {
                Ok(value) => totals.push(value),
                Err(reason) => return Ok(Err(format!("{column}: {reason}"))),
            }
        }
        let computed = [cents(subtotal), cents(discount), cents(total)];
        if computed != totals[..] {
            return Ok(Err(format!(
                "totals (subtotal {}, discount {}, total {}) do not match its lines ({}, {}, {})",
                totals[0], totals[1], totals[2], computed[0], computed[1], computed[2]
            )));
        }
        let mut sale_payments = Vec::with_capacity(payments.len());
        for payment in payments {
            let payment_id = integer(&payment[1]).unwrap_or_default();
            let Some(method) =
                text(payment[2].clone()).and_then(|method| PaymentMethod::from_str(&method).ok())
            else {
                return Ok(Err(format!(
                    "payment #{payment_id}: unknown method {:?}",
                    text(payment[2].clone())
                )));
            };
            let amount = match self.amount("payments", payment_id, "amount", &payment[3], Amount::Money) {
                Ok(amount) if amount > Decimal::ZERO => amount,
                Ok(_) => return Ok(Err(format!("payment #{payment_id}: amount must be positive"))),
                Err(reason) => return Ok(Err(format!("payment #{payment_id}: {reason}"))),
            };
            sale_payments.push(Payment {
                method,
                amount: amount.normalize(),
                reference: text(payment[4].clone()),
            });
        }
        let customer_id = match integer(&ticket[2]) {
            None => None,
            Some(customer) => match self.customers.get(&customer) {
                Some(target) => Some(target.clone()),
                None => {
                    self.summary.warnings.push(format!(
                        "tickets #{id}: customer #{customer} was not imported: ticket imported without customer"
                    ));
                    None
                }
            },
        };
        let number = text(ticket[1].clone())
            .filter(|number| !number.trim().is_empty())
            .unwrap_or_else(|| id.to_string());
        let ticket_id = ticket_id(&self.pos_id, id);
        // A ticket imported by a version that gave tickets plain UUIDv5 ids is not imported
        // a second time under its new id.
        if self.store.has_ticket(&derived_id(&format!("ticket:{}:{id}", self.pos_id)))? {
            return Ok(Ok(false));
        }
        let sale = HistoricalSale {
            id: ticket_id,
            ticket_number: format!("{}-PP-{number}", self.ticket_prefix),
            customer_id,
            lines: sale_lines,
            payments: sale_payments,
            subtotal: subtotal.normalize(),
            discount_amount: discount.normalize(),
            total_amount: total.normalize(),
            notes: text(ticket[7].clone()),
            created_at,
            status,
            cash_session_id: integer(&ticket[9]).and_then(|session| self.sessions.get(&session).cloned()),
        };
        match self.store.record_historical_sale(sale) {
            Ok(created) => Ok(Ok(created)),
            Err(err) => Ok(Err(rejected(err)?)),
        }
    }

    /// Settings that possync has under the same name are set (validated); the others have
    /// no meaning for possync and are listed once.
    fn settings(&mut self) -> Result<(), PosplusError> {
        let rows: Vec<(String, Option<String>)> = self
            .source
            .conn
            .prepare("SELECT key, value FROM settings ORDER BY key")?
            .query_map([], |row| Ok((row.get(0)?, text(row.get(1)?))))?
            .collect::<Result<_, _>>()?;
        let mut unmapped = Vec::new();
        for (key, value) in rows {
            self.step("settings");
            self.summary.table("settings").read += 1;
            if !MAPPED_SETTINGS.contains(&key.as_str()) {
                unmapped.push(key);
                continue;
            }
            let value = value.unwrap_or_default();
            let mut next = self.store.settings().clone();
            if let Err(err) = next.apply(&key, &value) {
                self.summary.skip("settings", &key, err.to_string());
                continue;
            }
            if next == *self.store.settings() {
                self.summary.table("settings").unchanged += 1;
                continue;
            }
            match self.store.set_setting(&key, &value) {
                Ok(_) => self.summary.table("settings").updated += 1,
                Err(err) => {
                    let reason = rejected(err)?;
                    self.summary.skip("settings", &key, reason);
                }
            }
        }
        if !unmapped.is_empty() {
            self.summary.table("settings").read -= unmapped.len() as u64;
            self.summary.not_imported.push(NotImported {
                table: "settings",
                rows: unmapped.len() as u64,
                reason: format!("no possync equivalent: {}", unmapped.join(", ")),
            });
        }
        Ok(())
    }

    /// POSPlus's stock history is left out: the stock comes from one count per product.
    fn not_imported(&mut self) -> Result<(), PosplusError> {
        let table = "stock_logs";
        let rows = self.source.count(table)?;
        let reason = "not replayed: the stock comes from one count per product, which already includes them";
        self.summary.not_imported.push(NotImported { table, rows, reason: reason.into() });
        Ok(())
    }

    /// Sets `createdAt` from a POSPlus timestamp; a malformed one is left out (the node
    /// stamps the record with now) and reported.
    fn created_at(&mut self, body: &mut Map<String, Value>, table: &'static str, id: i64, raw: Option<&str>) {
        match raw.map(|raw| (raw, rfc3339(raw))) {
            None => {}
            Some((_, Some(at))) => {
                body.insert("createdAt".into(), json!(at));
            }
            Some((raw, None)) => {
                self.summary
                    .warnings
                    .push(format!("{table} #{id}: created_at {raw:?} is not a date: left out"));
            }
        }
    }

    /// An exact amount from a POSPlus number, rounded as its kind says; a value that
    /// changed in rounding is recorded.
    fn amount(
        &mut self,
        table: &'static str,
        id: i64,
        column: &'static str,
        raw: &Sql,
        kind: Amount,
    ) -> Result<Decimal, String> {
        let exact = match raw {
            Sql::Integer(value) => Decimal::from(*value),
            Sql::Real(value) if value.is_finite() => {
                // The shortest decimal text that reads back as the same double: what POSPlus
                // showed (1.3000000000000003 stays that, 2.675 is 2.675, not 2.67499...).
                Decimal::from_str(&value.to_string()).map_err(|_| format!("{value} is out of range"))?
            }
            Sql::Real(value) => return Err(format!("{value} is not a number")),
            Sql::Text(text) => Decimal::from_str(text.trim())
                .or_else(|_| Decimal::from_scientific(text.trim()))
                .map_err(|_| format!("{:?} is not a number", text.chars().take(40).collect::<String>()))?,
            Sql::Null => return Err("missing".into()),
            Sql::Blob(_) => return Err("a blob, not a number".into()),
        };
        let rounded =
            exact.round_dp_with_strategy(kind.places(), RoundingStrategy::MidpointAwayFromZero).normalize();
        if rounded != exact.normalize() {
            self.summary.rounded.push(Rounded {
                table,
                posplus_id: id,
                column,
                original: match raw {
                    Sql::Real(value) => value.to_string(),
                    _ => exact.to_string(),
                },
                imported: rounded.to_string(),
            });
        }
        Ok(rounded)
    }
}

/// How an amount is rounded.
#[derive(Debug, Clone, Copy)]
enum Amount {
    /// Money: cents.
    Money,
    /// Quantities: thousandths (grams of a kilo, millilitres of a litre).
    Quantity,
    /// Rates (0..1): four places (a percentage with two decimals).
    Rate,
}

impl Amount {
    fn places(self) -> u32 {
        match self {
            Amount::Money => 2,
            Amount::Quantity => 3,
            Amount::Rate => 4,
        }
    }
}

/// Rows of one ticket-ordered stream (lines or payments), taken ticket by ticket.
struct Stream<'stmt> {
    /// The query, ordered by ticket id.
    rows: rusqlite::Rows<'stmt>,
    /// How many columns to read.
    columns: usize,
    /// The row read but not taken yet.
    peeked: Option<Vec<Sql>>,
    /// True once the query is exhausted.
    done: bool,
}

impl<'stmt> Stream<'stmt> {
    fn new(rows: rusqlite::Rows<'stmt>, columns: usize) -> Stream<'stmt> {
        Stream { rows, columns, peeked: None, done: false }
    }

    fn peek(&mut self) -> rusqlite::Result<Option<&Vec<Sql>>> {
        if self.peeked.is_none() && !self.done {
            match self.rows.next()? {
                Some(row) => {
                    self.peeked = Some((0..self.columns).map(|i| row.get(i)).collect::<Result<_, _>>()?)
                }
                None => self.done = true,
            }
        }
        Ok(self.peeked.as_ref())
    }

    /// The rows whose ticket id sorts before `ticket` (their ticket does not exist).
    fn orphans_before(&mut self, ticket: i64) -> rusqlite::Result<Vec<Vec<Sql>>> {
        let mut orphans = Vec::new();
        while let Some(row) = self.peek()? {
            if integer(&row[0]).is_some_and(|id| id >= ticket) {
                break;
            }
            orphans.extend(self.peeked.take());
        }
        Ok(orphans)
    }

    /// The rows of ticket `ticket`.
    fn take(&mut self, ticket: i64) -> rusqlite::Result<Vec<Vec<Sql>>> {
        let mut taken = Vec::new();
        while let Some(row) = self.peek()? {
            if integer(&row[0]) != Some(ticket) {
                break;
            }
            taken.extend(self.peeked.take());
        }
        Ok(taken)
    }

    /// Everything left (rows of tickets after the last one).
    fn rest(&mut self) -> rusqlite::Result<Vec<Vec<Sql>>> {
        let mut rest = Vec::new();
        while self.peek()?.is_some() {
            rest.extend(self.peeked.take());
        }
        Ok(rest)
    }
}

/// The namespace of every id the POSPlus import derives.
fn namespace() -> Uuid {
    Uuid::new_v5(&Uuid::NAMESPACE_OID, b"possync.import.posplus")
}

/// A UUIDv5 of `name` in the import's namespace.
pub fn derived_id(name: &str) -> EntityId {
    // Invariant: a hyphenated UUID is 36 characters of hex digits and hyphens, a valid id.
    EntityId::parse(Uuid::new_v5(&namespace(), name.as_bytes()).hyphenated().to_string())
        .expect("a UUID is a valid id")
}

/// A ticket's id: the UUIDv5 of `ticket:<posId>:<POSPlus id>` (see [`derived_id`]) with its
/// first 48 bits replaced by the POSPlus id, big-endian, and marked as a UUIDv8 (custom
/// layout). Still derived from nothing but the till and the POSPlus id, so the same ticket
/// gets the same id on every run; but the tickets of one till sort by their POSPlus id,
/// the order they are imported in, so each ticket, its lines and its payments are appended
/// at the end of their tables' indexes instead of on a random page of each (the tables are
/// far larger than the page cache for a big shop: that was most of the cost of writing
/// them).
pub fn ticket_id(pos_id: &PosId, posplus_id: i64) -> EntityId {
    let name = format!("ticket:{pos_id}:{posplus_id}");
    let mut bytes = *Uuid::new_v5(&namespace(), name.as_bytes()).as_bytes();
    // Ids outside 0..2^48 keep their low 48 bits: still unique (the rest is the hash).
    bytes[..6].copy_from_slice(&posplus_id.to_be_bytes()[2..]);
    bytes[6] = (bytes[6] & 0x0f) | 0x80;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    // Invariant: a hyphenated UUID is 36 characters of hex digits and hyphens, a valid id.
    EntityId::parse(Uuid::from_bytes(bytes).hyphenated().to_string()).expect("a UUID is a valid id")
}

/// possync's role for a POSPlus role name (`Administrator`, `Manager`, `Cashier`, in any
/// case; French `Caissier` and `Gérant` too).
fn possync_role(name: &str) -> Option<&'static str> {
    let name = name.trim().to_lowercase();
    if name.starts_with("admin") {
        Some("admin")
    } else if name.contains("manager") || name.starts_with("gérant") || name.starts_with("gerant") {
        Some("manager")
    } else if name.contains("cashier") || name.starts_with("caissi") {
        Some("cashier")
    } else {
        None
    }
}

/// The id a product with this SKU gets when the node has none with it yet.
pub fn product_id_for_sku(sku: &str) -> EntityId {
    derived_id(&format!("product:sku:{sku}"))
}

/// A POSPlus `YYYY-MM-DD HH:MM:SS` (UTC) timestamp (or an RFC 3339 one) as RFC 3339.
fn rfc3339(raw: &str) -> Option<String> {
    let raw = raw.trim();
    let candidate = if raw.len() == 19 && raw.as_bytes().get(10) == Some(&b' ') {
        format!("{}T{}Z", &raw[..10], &raw[11..])
    } else {
        raw.to_string()
    };
    possync_core::time::parse_rfc3339_ms(&candidate).map(possync_core::time::rfc3339_ms)
}

fn cents(value: Decimal) -> Decimal {
    value.round_dp_with_strategy(2, RoundingStrategy::MidpointAwayFromZero).normalize()
}

fn text(value: Sql) -> Option<String> {
    match value {
        Sql::Text(text) => Some(text),
        Sql::Integer(value) => Some(value.to_string()),
        Sql::Real(value) => Some(value.to_string()),
        Sql::Null | Sql::Blob(_) => None,
    }
}

fn integer(value: &Sql) -> Option<i64> {
    match value {
        Sql::Integer(value) => Some(*value),
        Sql::Text(text) => text.trim().parse().ok(),
        _ => None,
    }
}

/// A POSPlus BOOLEAN (0/1; absent means the default, true).
fn flag(value: &Sql) -> bool {
    match value {
        Sql::Integer(value) => *value != 0,
        Sql::Text(text) => !matches!(text.trim(), "0" | "false"),
        _ => true,
    }
}
