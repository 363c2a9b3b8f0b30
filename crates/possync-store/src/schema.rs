//! The database schema, as versioned migrations (rusqlite_migration, tracked in
//! `PRAGMA user_version`). A migration is never edited once released: add a new one.
//!
//! Table and column names of the audit trail (`p2p_*`), its views and `settings` are fixed by
//! SPEC section 3 (the seed's migration 007) so that the seed's analysis queries run
//! unmodified. Money and quantities are TEXT holding exact decimals. `created_at` of the audit
//! tables is `YYYY-MM-DD HH:MM:SS` UTC, the form `datetime('now', ...)` compares against.

use rusqlite_migration::{M, Migrations};

/// Every migration, in order.
pub fn migrations() -> Migrations<'static> {
    Migrations::new(vec![
        M::up(V1_INITIAL),
        M::up(V_TERMINALS),
        M::up(V_CHAIN),
        M::up(V_USERS),
        M::up(V_CASH),
        M::up(V_KEYS),
        M::up(V_STORE_PRICES),
        M::up(V_CHAIN_COPIES),
        M::up(V_DISPLACED),
        M::up(V_CONFLICT_FIELDS),
    ])
}

/// The terminals this node has heard of by name, so that the audit trail can name the till
/// where an edit was made (its origin), not only the peer that passed it on.
///
/// And the two sides of each open (`manual`) conflict, as the record's context right after
/// it: a change that has seen both (a person's decision on another till, or any later edit
/// made with both in view) closes the conflict on every till.
const V_TERMINALS: &str = r#"
CREATE TABLE sync_terminals (
    pos_id  TEXT PRIMARY KEY,
    name    TEXT NOT NULL,
    seen_at TEXT NOT NULL
) WITHOUT ROWID;

CREATE TABLE conflict_sides (
    conflict_id INTEGER PRIMARY KEY REFERENCES p2p_conflicts(id) ON DELETE CASCADE,
    ctx         TEXT NOT NULL
);
"#;

/// The settings (SPEC section 3): key, default value, type, description.
pub const DEFAULT_SETTINGS: &[(&str, &str, &str, &str)] = &[
    ("p2p_enabled", "true", "boolean", "Peer-to-peer sync on or off"),
    ("p2p_auto_sync", "true", "boolean", "Catch up automatically with every peer on connect"),
    (
        "p2p_conflict_resolution",
        "last_write_wins",
        "string",
        "last_write_wins, local_wins, remote_wins or manual (only last_write_wins guarantees identical terminals)",
    ),
    ("pos_require_cash_session", "false", "boolean", "Refuse sales on a till that has no open cash session"),
    (
        "p2p_heartbeat_interval",
        "30000",
        "number",
        "Milliseconds between pings; silence for interval + 10 s is a dead peer",
    ),
    (
        "p2p_reconnect_max_attempts",
        "10",
        "number",
        "Redials of a lost peer before giving up until it is seen again",
    ),
    ("p2p_sync_batch_size", "100", "number", "Changes per catch-up batch"),
    ("p2p_log_retention_days", "30", "number", "Days of sync logs, conflicts and connection metrics kept"),
    (
        "p2p_max_clock_ahead",
        "3600000",
        "number",
        "Milliseconds a remote change may be stamped ahead of this clock; further ahead it is held back until the clock catches up",
    ),
    (
        "p2p_peer_max_changes_per_second",
        "1000",
        "number",
        "Live changes one peer may push per second (bursts of 10 s worth pass); faster, its frames are read no faster",
    ),
];

const V1_INITIAL: &str = r#"
-- This terminal's identity and counters.
CREATE TABLE node_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

-- Terminals that originated changes, numbered locally to keep sync metadata small.
CREATE TABLE sync_origins (
    idx    INTEGER PRIMARY KEY,
    pos_id TEXT NOT NULL UNIQUE
);

-- Every change this node holds, in the order it applied them (log_id: causal order).
CREATE TABLE sync_changes (
    log_id      INTEGER PRIMARY KEY,
    origin      INTEGER NOT NULL REFERENCES sync_origins(idx),
    seq         INTEGER NOT NULL,
    hlc         INTEGER,
    entity_type TEXT NOT NULL,
    entity_id   TEXT NOT NULL,
    action      TEXT NOT NULL,
    rejected    INTEGER NOT NULL DEFAULT 0,
    payload     TEXT NOT NULL,
    UNIQUE (origin, seq)
);

-- The node's version vector: all of origin's changes 1..=seq are in sync_changes.
CREATE TABLE sync_vv (
    origin INTEGER PRIMARY KEY REFERENCES sync_origins(idx),
    seq    INTEGER NOT NULL
);

CREATE TABLE categories (
    id            TEXT PRIMARY KEY,
    name          TEXT,
    description   TEXT,
    parent_id     TEXT,
    display_order INTEGER,
    is_active     INTEGER,
    created_at    TEXT,
    updated_at    TEXT,
    deleted       INTEGER NOT NULL DEFAULT 0,
    sync_meta     TEXT NOT NULL
);

CREATE TABLE products (
    id            TEXT PRIMARY KEY,
    sku           TEXT,
    barcode       TEXT,
    name          TEXT,
    description   TEXT,
    category_id   TEXT,
    price         TEXT,
    cost          TEXT,
    discount_rate TEXT,
    stock         TEXT NOT NULL DEFAULT '0',
    min_stock     TEXT,
    max_stock     TEXT,
    unit          TEXT,
    is_active     INTEGER,
    image_url     TEXT,
    created_at    TEXT,
    updated_at    TEXT,
    deleted       INTEGER NOT NULL DEFAULT 0,
    sync_meta     TEXT NOT NULL
);
CREATE INDEX products_sku ON products(sku) WHERE deleted = 0;
CREATE INDEX products_barcode ON products(barcode) WHERE deleted = 0 AND barcode IS NOT NULL;
CREATE INDEX products_category ON products(category_id);

CREATE TABLE customers (
    id         TEXT PRIMARY KEY,
    name       TEXT,
    email      TEXT,
    phone      TEXT,
    notes      TEXT,
    created_at TEXT,
    updated_at TEXT,
    deleted    INTEGER NOT NULL DEFAULT 0,
    sync_meta  TEXT NOT NULL
);

CREATE TABLE tickets (
    id              TEXT PRIMARY KEY,
    ticket_number   TEXT NOT NULL,
    pos_id          TEXT NOT NULL,
    customer_id     TEXT,
    subtotal        TEXT NOT NULL,
    discount_amount TEXT NOT NULL,
    total_amount    TEXT NOT NULL,
    status          TEXT NOT NULL,
    notes           TEXT,
    created_at      TEXT NOT NULL,
    updated_at      TEXT,
    sync_meta       TEXT NOT NULL
);
CREATE INDEX tickets_created ON tickets(created_at);
CREATE INDEX tickets_pos ON tickets(pos_id, created_at);

CREATE TABLE ticket_lines (
    ticket_id       TEXT NOT NULL REFERENCES tickets(id),
    line_no         INTEGER NOT NULL,
    product_id      TEXT NOT NULL,
    product_name    TEXT NOT NULL,
    product_sku     TEXT NOT NULL,
    quantity        TEXT NOT NULL,
    unit_price      TEXT NOT NULL,
    discount_rate   TEXT NOT NULL,
    discount_amount TEXT NOT NULL,
    total_amount    TEXT NOT NULL,
    PRIMARY KEY (ticket_id, line_no)
) WITHOUT ROWID;

CREATE TABLE ticket_payments (
    ticket_id TEXT NOT NULL REFERENCES tickets(id),
    line_no   INTEGER NOT NULL,
    method    TEXT NOT NULL,
    amount    TEXT NOT NULL,
    reference TEXT,
    PRIMARY KEY (ticket_id, line_no)
) WITHOUT ROWID;

CREATE TABLE stock_movements (
    id         TEXT PRIMARY KEY,
    product_id TEXT NOT NULL,
    type       TEXT NOT NULL,
    quantity   TEXT NOT NULL,
    reference  TEXT,
    pos_id     TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX stock_movements_product ON stock_movements(product_id, created_at);
CREATE INDEX stock_movements_reference ON stock_movements(reference);

-- The seed's audit trail (migration 007 of POSPlus), plus id and created_at.
CREATE TABLE p2p_sync_logs (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    peer_id             TEXT,
    peer_name           TEXT,
    message_type        TEXT,
    message_action      TEXT,
    -- CHECKs are written with OR rather than IN: SQLite builds a throwaway index for an IN
    -- list on every insert (12-15% of the apply path in the engine benchmark).
    entity_type         TEXT CHECK (entity_type = 'product' OR entity_type = 'category' OR entity_type = 'customer'
                                    OR entity_type = 'ticket' OR entity_type = 'stock'),
    entity_id           TEXT,
    status              TEXT NOT NULL CHECK (status = 'success' OR status = 'conflict' OR status = 'error'
                                             OR status = 'skipped'),
    conflict_reason     TEXT,
    resolution_strategy TEXT,
    details             TEXT,
    created_at          DATETIME NOT NULL DEFAULT (datetime('now'))
);
CREATE INDEX idx_p2p_sync_logs_created ON p2p_sync_logs(created_at);
CREATE INDEX idx_p2p_sync_logs_peer ON p2p_sync_logs(peer_id, created_at);

CREATE TABLE p2p_conflicts (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    peer_id             TEXT,
    peer_name           TEXT,
    entity_type         TEXT NOT NULL,
    entity_id           TEXT NOT NULL,
    conflict_type       TEXT NOT NULL,
    local_data          TEXT,
    remote_data         TEXT,
    local_updated_at    TEXT,
    remote_updated_at   TEXT,
    resolution_strategy TEXT NOT NULL,
    final_data          TEXT,
    resolved_by         TEXT,
    resolved_at         DATETIME,
    notes               TEXT,
    created_at          DATETIME NOT NULL DEFAULT (datetime('now'))
);
CREATE INDEX idx_p2p_conflicts_created ON p2p_conflicts(created_at);
CREATE INDEX idx_p2p_conflicts_entity ON p2p_conflicts(entity_type, entity_id);

CREATE TABLE p2p_connection_metrics (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    peer_id           TEXT NOT NULL,
    peer_name         TEXT,
    event_type        TEXT NOT NULL CHECK (event_type = 'connected' OR event_type = 'disconnected'
                                           OR event_type = 'reconnected' OR event_type = 'heartbeat_timeout'
                                           OR event_type = 'sync_completed' OR event_type = 'sync_failed'),
    messages_sent     INTEGER DEFAULT 0,
    messages_received INTEGER DEFAULT 0,
    bytes_sent        INTEGER DEFAULT 0,
    bytes_received    INTEGER DEFAULT 0,
    sync_duration_ms  INTEGER,
    error_message     TEXT,
    created_at        DATETIME NOT NULL DEFAULT (datetime('now'))
);
CREATE INDEX idx_p2p_connection_metrics_created ON p2p_connection_metrics(created_at);
CREATE INDEX idx_p2p_connection_metrics_peer ON p2p_connection_metrics(peer_id, created_at);

CREATE VIEW v_p2p_recent_activity AS
SELECT peer_id, peer_name, message_type, message_action, entity_type, status,
       COUNT(*) AS count, MAX(created_at) AS last_activity
FROM p2p_sync_logs
WHERE created_at >= datetime('now', '-1 hour')
GROUP BY peer_id, peer_name, message_type, message_action, entity_type, status;

CREATE VIEW v_p2p_conflict_summary AS
SELECT peer_id, peer_name, entity_type, conflict_type, resolution_strategy,
       COUNT(*) AS conflict_count,
       SUM(CASE WHEN resolved_by IS NULL THEN 1 ELSE 0 END) AS open_count,
       MAX(created_at) AS last_conflict
FROM p2p_conflicts
WHERE created_at >= datetime('now', '-24 hours')
GROUP BY peer_id, peer_name, entity_type, conflict_type, resolution_strategy;

CREATE VIEW v_p2p_connection_health AS
SELECT peer_id, peer_name, event_type,
       COUNT(*) AS event_count,
       SUM(messages_sent) AS total_messages_sent,
       SUM(messages_received) AS total_messages_received,
       SUM(bytes_sent) AS total_bytes_sent,
       SUM(bytes_received) AS total_bytes_received,
       AVG(sync_duration_ms) AS avg_sync_duration_ms,
       MAX(created_at) AS last_event
FROM p2p_connection_metrics
WHERE created_at >= datetime('now', '-1 hour')
GROUP BY peer_id, peer_name, event_type;

CREATE TABLE settings (
    key         TEXT PRIMARY KEY,
    value       TEXT NOT NULL,
    type        TEXT NOT NULL,
    description TEXT
);
"#;

/// The chain of stores (docs/CHAIN.md).
const V_CHAIN: &str = r#"
-- A store till: how far it has applied each backbone stream (stream sequence of the last
-- message applied), advanced in the transaction that applied the message.
CREATE TABLE chain_cursor (
    stream TEXT PRIMARY KEY,
    seq    INTEGER NOT NULL
) WITHOUT ROWID;

-- A store till: the head office's origins (never uploaded by a store).
CREATE TABLE chain_hq_origins (
    pos_id TEXT PRIMARY KEY
) WITHOUT ROWID;

-- The head office: which store each origin (terminal) belongs to, learnt from the subject
-- its changes came on, and what it sent.
CREATE TABLE chain_origins (
    pos_id           TEXT PRIMARY KEY,
    store_id         TEXT NOT NULL,
    first_seen_at    TEXT NOT NULL,
    last_received_at TEXT NOT NULL,
    changes_received INTEGER NOT NULL DEFAULT 0,
    changes_applied  INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX chain_origins_store ON chain_origins(store_id);
"#;

/// Cashier accounts, a mutable record like customers (docs/DESIGN.md, "Cashier accounts").
/// `password_hash` is a PHC string (argon2id, or an imported bcrypt hash), never a password.
const V_USERS: &str = r#"
CREATE TABLE users (
    id            TEXT PRIMARY KEY,
    username      TEXT,
    first_name    TEXT,
    last_name     TEXT,
    email         TEXT,
    role          TEXT,
    is_active     INTEGER,
    password_hash TEXT,
    last_login    TEXT,
    created_at    TEXT,
    updated_at    TEXT,
    deleted       INTEGER NOT NULL DEFAULT 0,
    sync_meta     TEXT NOT NULL
);
CREATE INDEX users_username ON users(username) WHERE deleted = 0;

-- POSPlus compatibility of the audit trail (its migration 007): the audit log's entity_type
-- CHECK admits 'user' and POSPlus's other entity types ('payment', 'cash_session',
-- 'z_report'), and a conflict row names its record (`entity_name`). SQLite cannot change a
-- CHECK in place, so the log is rebuilt (same columns, rows, ids and indexes; the view that
-- reads it is recreated).
ALTER TABLE p2p_conflicts ADD COLUMN entity_name TEXT;
DROP VIEW v_p2p_recent_activity;
CREATE TABLE p2p_sync_logs_v4 (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    peer_id             TEXT,
    peer_name           TEXT,
    message_type        TEXT,
    message_action      TEXT,
    entity_type         TEXT CHECK (entity_type = 'product' OR entity_type = 'category' OR entity_type = 'customer'
                                    OR entity_type = 'ticket' OR entity_type = 'stock' OR entity_type = 'user'
                                    OR entity_type = 'payment' OR entity_type = 'cash_session'
                                    OR entity_type = 'z_report'),
    entity_id           TEXT,
    status              TEXT NOT NULL CHECK (status = 'success' OR status = 'conflict' OR status = 'error'
                                             OR status = 'skipped'),
    conflict_reason     TEXT,
    resolution_strategy TEXT,
    details             TEXT,
    created_at          DATETIME NOT NULL DEFAULT (datetime('now'))
);
INSERT INTO p2p_sync_logs_v4 SELECT * FROM p2p_sync_logs;
DROP TABLE p2p_sync_logs;
ALTER TABLE p2p_sync_logs_v4 RENAME TO p2p_sync_logs;
CREATE INDEX idx_p2p_sync_logs_created ON p2p_sync_logs(created_at);
CREATE INDEX idx_p2p_sync_logs_peer ON p2p_sync_logs(peer_id, created_at);
CREATE VIEW v_p2p_recent_activity AS
SELECT peer_id, peer_name, message_type, message_action, entity_type, status,
       COUNT(*) AS count, MAX(created_at) AS last_activity
FROM p2p_sync_logs
WHERE created_at >= datetime('now', '-1 hour')
GROUP BY peer_id, peer_name, message_type, message_action, entity_type, status;
"#;

/// Cash sessions and Z reports (docs/DESIGN.md, "Cash sessions"), records like users; the
/// session a ticket was sold in. Columns follow the field tables of `possync_core::entity`.
const V_CASH: &str = r#"
CREATE TABLE cash_sessions (
    id            TEXT PRIMARY KEY,
    pos_id        TEXT,
    opened_by     TEXT,
    opening_cash  TEXT,
    opened_at     TEXT,
    status        TEXT,
    closed_by     TEXT,
    closed_at     TEXT,
    counted_cash  TEXT,
    expected_cash TEXT,
    difference    TEXT,
    z_report_id   TEXT,
    notes         TEXT,
    updated_at    TEXT,
    deleted       INTEGER NOT NULL DEFAULT 0,
    sync_meta     TEXT NOT NULL
);
CREATE INDEX cash_sessions_pos ON cash_sessions(pos_id, status, opened_at);

CREATE TABLE z_reports (
    id             TEXT PRIMARY KEY,
    session_id     TEXT,
    pos_id         TEXT,
    user_id        TEXT,
    report_date    TEXT,
    ticket_count   INTEGER,
    total_sales    TEXT,
    total_discount TEXT,
    total_refunds  TEXT,
    total_cash     TEXT,
    total_card     TEXT,
    total_transfer TEXT,
    total_check    TEXT,
    total_other    TEXT,
    opening_cash   TEXT,
    counted_cash   TEXT,
    expected_cash  TEXT,
    difference     TEXT,
    created_at     TEXT,
    updated_at     TEXT,
    deleted        INTEGER NOT NULL DEFAULT 0,
    sync_meta      TEXT NOT NULL
);
CREATE INDEX z_reports_day ON z_reports(report_date, pos_id);

ALTER TABLE tickets ADD COLUMN cash_session_id TEXT;
CREATE INDEX tickets_cash_session ON tickets(cash_session_id) WHERE cash_session_id IS NOT NULL;
"#;

/// Each till's signing key and the revoked tills (docs/DESIGN.md, "Each till writes only as
/// itself"), and the audit log's CHECK admitting `terminal` rows (rebuilt as in version 4).
const V_KEYS: &str = r#"
CREATE TABLE terminal_keys (
    pos_id      TEXT PRIMARY KEY,
    public_key  TEXT NOT NULL,
    since_seq   INTEGER NOT NULL,
    enrolled_at TEXT NOT NULL
) WITHOUT ROWID;

CREATE TABLE terminal_revocations (
    pos_id         TEXT PRIMARY KEY,
    until_seq      INTEGER NOT NULL,
    revoked_by     TEXT NOT NULL,
    revoked_by_seq INTEGER NOT NULL,
    reason         TEXT,
    revoked_at     TEXT NOT NULL
) WITHOUT ROWID;

DROP VIEW v_p2p_recent_activity;
CREATE TABLE p2p_sync_logs_v6 (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    peer_id             TEXT,
    peer_name           TEXT,
    message_type        TEXT,
    message_action      TEXT,
    entity_type         TEXT CHECK (entity_type = 'product' OR entity_type = 'category' OR entity_type = 'customer'
                                    OR entity_type = 'ticket' OR entity_type = 'stock' OR entity_type = 'user'
                                    OR entity_type = 'payment' OR entity_type = 'cash_session'
                                    OR entity_type = 'z_report' OR entity_type = 'terminal'),
    entity_id           TEXT,
    status              TEXT NOT NULL CHECK (status = 'success' OR status = 'conflict' OR status = 'error'
                                             OR status = 'skipped'),
    conflict_reason     TEXT,
    resolution_strategy TEXT,
    details             TEXT,
    created_at          DATETIME NOT NULL DEFAULT (datetime('now'))
);
INSERT INTO p2p_sync_logs_v6 SELECT * FROM p2p_sync_logs;
DROP TABLE p2p_sync_logs;
ALTER TABLE p2p_sync_logs_v6 RENAME TO p2p_sync_logs;
CREATE INDEX idx_p2p_sync_logs_created ON p2p_sync_logs(created_at);
CREATE INDEX idx_p2p_sync_logs_peer ON p2p_sync_logs(peer_id, created_at);
CREATE VIEW v_p2p_recent_activity AS
SELECT peer_id, peer_name, message_type, message_action, entity_type, status,
       COUNT(*) AS count, MAX(created_at) AS last_activity
FROM p2p_sync_logs
WHERE created_at >= datetime('now', '-1 hour')
GROUP BY peer_id, peer_name, message_type, message_action, entity_type, status;
"#;

/// A product's price per store of a chain (`storePrices`, docs/CHAIN.md "Per-store prices"):
/// a JSON object of store id to canonical decimal text, written by the head office.
const V_STORE_PRICES: &str = r#"
ALTER TABLE products ADD COLUMN store_prices TEXT;
"#;

/// Chain-wide customers (docs/CHAIN.md): on a node that applies the head office's copies of
/// other stores' customer writes, the highest seq of each such store till that a copy held
/// here re-published. A context naming that till's write up to this seq is satisfied.
const V_CHAIN_COPIES: &str = r#"
CREATE TABLE chain_copied (
    pos_id TEXT PRIMARY KEY,
    seq    INTEGER NOT NULL
) WITHOUT ROWID;
"#;

/// A till's own changes set aside when it recovered its history from a peer's copies
/// (`recovery.rs`, docs/DESIGN.md "Two tills with one identity"): the exact wire text of each,
/// which recovery set it aside (`recovery`, the k of the origin `<posId>-r<k>` it was re-issued
/// under), from which peer, and what became of it (`reissued_seq`: its number under the new
/// origin; `outcome`: why it was not re-issued, or `reissued`).
const V_DISPLACED: &str = r#"
CREATE TABLE displaced_changes (
    id           INTEGER PRIMARY KEY,
    recovery     INTEGER NOT NULL,
    origin       TEXT NOT NULL,
    seq          INTEGER NOT NULL,
    entity_type  TEXT NOT NULL,
    entity_id    TEXT NOT NULL,
    payload      TEXT NOT NULL,
    displaced_by TEXT NOT NULL,
    displaced_at TEXT NOT NULL,
    new_origin   TEXT NOT NULL,
    reissued_seq INTEGER,
    outcome      TEXT NOT NULL
);
CREATE INDEX displaced_changes_origin ON displaced_changes(origin, seq);
"#;

/// The fields an open (`manual`) conflict contests (a JSON array of names; NULL for a row
/// written before this column): a later edit supersedes the conflict only if it writes all
/// of them (docs/DESIGN.md, "A decision is a fact of the shop").
const V_CONFLICT_FIELDS: &str = r#"
ALTER TABLE conflict_sides ADD COLUMN fields TEXT;
"#;

#[cfg(test)]
mod tests {
    #[test]
    fn migrations_are_valid() {
        super::migrations().validate().unwrap();
    }

    #[test]
    fn the_users_migration_keeps_the_audit_log_and_admits_user_rows() {
        let mut conn = rusqlite::Connection::open_in_memory().unwrap();
        let migrations = super::migrations();
        migrations.to_version(&mut conn, 3).unwrap();
        conn.execute(
            "INSERT INTO p2p_sync_logs (peer_id, entity_type, status) VALUES ('a', 'product', 'success')",
            [],
        )
        .unwrap();
        assert!(
            conn.execute(
                "INSERT INTO p2p_sync_logs (peer_id, entity_type, status) VALUES ('a', 'user', 'success')",
                []
            )
            .is_err(),
            "version 3 refuses user rows"
        );
        migrations.to_latest(&mut conn).unwrap();
        let kept: (i64, String) = conn
            .query_row("SELECT id, entity_type FROM p2p_sync_logs", [], |row| Ok((row.get(0)?, row.get(1)?)))
            .unwrap();
        assert_eq!(kept, (1, "product".to_string()));
        conn.execute(
            "INSERT INTO p2p_sync_logs (peer_id, entity_type, status) VALUES ('a', 'user', 'success')",
            [],
        )
        .unwrap();
        assert!(
            conn.execute(
                "INSERT INTO p2p_sync_logs (peer_id, entity_type, status) VALUES ('a', 'dragon', 'success')",
                []
            )
            .is_err(),
            "the CHECK still refuses unknown kinds"
        );
        let next: i64 = conn.query_row("SELECT MAX(id) FROM p2p_sync_logs", [], |row| row.get(0)).unwrap();
        assert_eq!(next, 2, "ids go on after the kept rows");
        let viewed: i64 =
            conn.query_row("SELECT COUNT(*) FROM v_p2p_recent_activity", [], |row| row.get(0)).unwrap();
        assert_eq!(viewed, 2, "the view reads the rebuilt table");
        for kind in ["payment", "cash_session", "z_report"] {
            conn.execute(
                "INSERT INTO p2p_sync_logs (peer_id, entity_type, status) VALUES ('a', ?1, 'success')",
                [kind],
            )
            .unwrap();
        }
        conn.execute("UPDATE p2p_conflicts SET entity_name = 'x' WHERE 0", []).unwrap();
    }
}
