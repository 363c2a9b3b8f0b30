//! The schema of a POSPlus database after its migration 011, written from what POSPlus
//! migrations 001-011 define (no POSPlus code), shared by the import tests and benchmark.

#![allow(dead_code)]

/// The migration files POSPlus records in its `migrations` table, in order.
pub const MIGRATIONS: [&str; 11] = [
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

/// The tables of a POSPlus database after migration 011. `damaged` drops the UNIQUE on
/// `products.sku` (a hand-edited or corrupt file), so that duplicate SKUs can be stored.
pub fn schema(damaged: bool) -> String {
    let sku = if damaged { "sku TEXT NOT NULL" } else { "sku TEXT NOT NULL UNIQUE" };
    format!(
        "
CREATE TABLE migrations (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE,
  executed_at DATETIME DEFAULT CURRENT_TIMESTAMP);
CREATE TABLE roles (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE, description TEXT,
  created_at DATETIME DEFAULT CURRENT_TIMESTAMP, updated_at DATETIME DEFAULT CURRENT_TIMESTAMP);
CREATE TABLE users (id INTEGER PRIMARY KEY AUTOINCREMENT, username TEXT NOT NULL UNIQUE, email TEXT NOT NULL UNIQUE,
  password_hash TEXT NOT NULL, first_name TEXT NOT NULL, last_name TEXT NOT NULL, role_id INTEGER NOT NULL,
  is_active BOOLEAN DEFAULT 1, last_login DATETIME, created_at DATETIME DEFAULT CURRENT_TIMESTAMP,
  updated_at DATETIME DEFAULT CURRENT_TIMESTAMP);
CREATE TABLE categories (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, description TEXT,
  parent_id INTEGER, is_active BOOLEAN DEFAULT 1, display_order INTEGER DEFAULT 0,
  created_at DATETIME DEFAULT CURRENT_TIMESTAMP, updated_at DATETIME DEFAULT CURRENT_TIMESTAMP);
CREATE TABLE products (id INTEGER PRIMARY KEY AUTOINCREMENT, {sku}, barcode TEXT UNIQUE, name TEXT NOT NULL,
  description TEXT, category_id INTEGER NOT NULL, price REAL NOT NULL CHECK(price >= 0),
  cost REAL NOT NULL DEFAULT 0 CHECK(cost >= 0),
  discount_rate REAL NOT NULL DEFAULT 0 CHECK(discount_rate >= 0 AND discount_rate <= 1),
  stock INTEGER NOT NULL DEFAULT 0 CHECK(stock >= 0), min_stock INTEGER DEFAULT 0 CHECK(min_stock >= 0),
  max_stock INTEGER CHECK(max_stock IS NULL OR max_stock >= min_stock), unit TEXT NOT NULL DEFAULT 'pcs',
  is_active BOOLEAN DEFAULT 1, image_url TEXT, created_at DATETIME DEFAULT CURRENT_TIMESTAMP,
  updated_at DATETIME DEFAULT CURRENT_TIMESTAMP);
CREATE TABLE cash_sessions (id INTEGER PRIMARY KEY AUTOINCREMENT, user_id INTEGER NOT NULL,
  opening_cash REAL NOT NULL DEFAULT 0, closing_cash REAL, expected_cash REAL, difference REAL,
  started_at DATETIME DEFAULT CURRENT_TIMESTAMP, closed_at DATETIME, status TEXT NOT NULL DEFAULT 'open', notes TEXT);
CREATE TABLE tickets (id INTEGER PRIMARY KEY AUTOINCREMENT, ticket_number TEXT NOT NULL UNIQUE,
  user_id INTEGER NOT NULL, customer_id INTEGER, session_id INTEGER NOT NULL,
  subtotal REAL NOT NULL DEFAULT 0 CHECK(subtotal >= 0), discount_amount REAL NOT NULL DEFAULT 0,
  total_amount REAL NOT NULL DEFAULT 0, status TEXT NOT NULL DEFAULT 'pending'
  CHECK(status IN ('pending', 'completed', 'cancelled', 'refunded', 'partially_refunded')), notes TEXT,
  created_at DATETIME DEFAULT CURRENT_TIMESTAMP, updated_at DATETIME DEFAULT CURRENT_TIMESTAMP);
CREATE TABLE ticket_lines (id INTEGER PRIMARY KEY AUTOINCREMENT, ticket_id INTEGER NOT NULL,
  product_id INTEGER NOT NULL, product_name TEXT NOT NULL, product_sku TEXT NOT NULL,
  quantity REAL NOT NULL CHECK(quantity > 0), unit_price REAL NOT NULL CHECK(unit_price >= 0),
  discount_rate REAL NOT NULL DEFAULT 0, discount_amount REAL NOT NULL DEFAULT 0,
  total_amount REAL NOT NULL CHECK(total_amount >= 0), created_at DATETIME DEFAULT CURRENT_TIMESTAMP);
CREATE TABLE payments (id INTEGER PRIMARY KEY AUTOINCREMENT, ticket_id INTEGER NOT NULL,
  method TEXT NOT NULL CHECK(method IN ('cash', 'card', 'transfer', 'check', 'other')),
  amount REAL NOT NULL CHECK(amount > 0), reference TEXT, notes TEXT, created_at DATETIME DEFAULT CURRENT_TIMESTAMP);
CREATE TABLE stock_logs (id INTEGER PRIMARY KEY AUTOINCREMENT, product_id INTEGER NOT NULL,
  type TEXT NOT NULL, quantity REAL NOT NULL, previous_stock REAL NOT NULL, new_stock REAL NOT NULL,
  reference TEXT, user_id INTEGER NOT NULL, notes TEXT, created_at DATETIME DEFAULT CURRENT_TIMESTAMP);
CREATE TABLE z_reports (id INTEGER PRIMARY KEY AUTOINCREMENT, session_id INTEGER NOT NULL UNIQUE,
  user_id INTEGER NOT NULL, total_sales REAL NOT NULL DEFAULT 0, total_discount REAL NOT NULL DEFAULT 0,
  total_cash REAL NOT NULL DEFAULT 0, total_card REAL NOT NULL DEFAULT 0, total_transfer REAL NOT NULL DEFAULT 0,
  total_check REAL NOT NULL DEFAULT 0, total_other REAL NOT NULL DEFAULT 0, ticket_count INTEGER NOT NULL DEFAULT 0,
  report_date DATE NOT NULL, created_at DATETIME DEFAULT CURRENT_TIMESTAMP);
CREATE TABLE customers (id INTEGER PRIMARY KEY AUTOINCREMENT, customer_number TEXT UNIQUE, first_name TEXT,
  last_name TEXT, company_name TEXT, email TEXT, phone TEXT, address TEXT, city TEXT, postal_code TEXT,
  country TEXT, is_active BOOLEAN DEFAULT 1, notes TEXT, created_at DATETIME DEFAULT CURRENT_TIMESTAMP,
  updated_at DATETIME DEFAULT CURRENT_TIMESTAMP);
CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL,
  type TEXT NOT NULL CHECK(type IN ('string', 'number', 'boolean', 'json')), description TEXT,
  updated_at DATETIME DEFAULT CURRENT_TIMESTAMP);
CREATE TABLE store_settings (id INTEGER PRIMARY KEY CHECK (id = 1), store_name_fr TEXT NOT NULL DEFAULT '',
  print_preview_enabled INTEGER NOT NULL DEFAULT 0);
"
    )
}
