//! The shop's data (SPEC section 1): entity kinds, the fields of mutable records with their
//! types and rules, and the immutable facts (tickets, stock movements).
//!
//! Products, categories and customers are *mutable records*: a set of named fields merged one
//! by one (SPEC rule 3). Their schema is a table of [`FieldSpec`]s, so that validation, the
//! store's columns and the merge all read the same list. Tickets and stock movements are
//! *facts*: written once, never overwritten; only a ticket's `status` and `notes` change later.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::decimal;
use crate::ids::{EntityId, PosId};

/// The kinds of entity that travel between terminals (the envelope's `type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntityKind {
    /// A catalog product.
    Product,
    /// A product category.
    Category,
    /// A customer.
    Customer,
    /// A sale (its lines, payments and status).
    Ticket,
    /// A stock movement.
    Stock,
    /// A cashier account (user name, role, password or PIN hash), shared by every till.
    User,
    /// A till's cash session: opened with a float, closed with the counted cash.
    CashSession,
    /// The end-of-day totals of a closed cash session: written once, never edited.
    ZReport,
    /// A till's identity: the key it signs its changes with, or its revocation
    /// ([`crate::signature`]).
    Terminal,
}

impl EntityKind {
    /// Every kind, in a fixed order.
    pub const ALL: [EntityKind; 9] = [
        EntityKind::Product,
        EntityKind::Category,
        EntityKind::Customer,
        EntityKind::Ticket,
        EntityKind::Stock,
        EntityKind::User,
        EntityKind::CashSession,
        EntityKind::ZReport,
        EntityKind::Terminal,
    ];

    /// The name used on the wire and in `entity_type` columns.
    pub fn as_str(self) -> &'static str {
        match self {
            EntityKind::Product => "product",
            EntityKind::Category => "category",
            EntityKind::Customer => "customer",
            EntityKind::Ticket => "ticket",
            EntityKind::Stock => "stock",
            EntityKind::User => "user",
            EntityKind::CashSession => "cash_session",
            EntityKind::ZReport => "z_report",
            EntityKind::Terminal => "terminal",
        }
    }

    /// The mutable fields of this kind (tickets: status and notes; stock movements: none).
    pub fn fields(self) -> &'static [FieldSpec] {
        match self {
            EntityKind::Product => PRODUCT_FIELDS,
            EntityKind::Category => CATEGORY_FIELDS,
            EntityKind::Customer => CUSTOMER_FIELDS,
            EntityKind::Ticket => TICKET_FIELDS,
            EntityKind::Stock => &[],
            EntityKind::User => USER_FIELDS,
            EntityKind::CashSession => CASH_SESSION_FIELDS,
            EntityKind::ZReport => Z_REPORT_FIELDS,
            EntityKind::Terminal => &[],
        }
    }

    /// A record merged field by field (created, and for most kinds edited and deleted), not
    /// a fact carried whole like a sale or a stock movement.
    pub fn is_record(self) -> bool {
        matches!(
            self,
            EntityKind::Product
                | EntityKind::Category
                | EntityKind::Customer
                | EntityKind::User
                | EntityKind::CashSession
                | EntityKind::ZReport
        )
    }

    /// Whether a change of this kind may carry `action` (`create`, `update`, `delete`) as a
    /// record write. A Z report is only ever created (an immutable fact, like a sale); a
    /// cash session is opened and closed, never deleted. A peer's change breaking this is
    /// refused as unsupported, so no till can rewrite another's end-of-day totals.
    pub fn allows_record_action(self, action: &str) -> bool {
        match (self, action) {
            (EntityKind::ZReport, "create") => true,
            (EntityKind::ZReport, _) => false,
            (EntityKind::CashSession, "create" | "update") => true,
            (EntityKind::CashSession, _) => false,
            (kind, "create" | "update" | "delete") => kind.is_record(),
            _ => false,
        }
    }

    /// The spec of the mutable field called `name` (JSON camelCase), if there is one.
    pub fn field(self, name: &str) -> Option<&'static FieldSpec> {
        self.fields().iter().find(|spec| spec.name == name)
    }
}

impl fmt::Display for EntityKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EntityKind {
    type Err = EntityError;

    fn from_str(raw: &str) -> Result<EntityKind, EntityError> {
        EntityKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == raw)
            .ok_or_else(|| EntityError::UnknownKind(raw.chars().take(40).collect()))
    }
}

/// The type of a mutable field, with its rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldType {
    /// Non-empty text up to the given length.
    Text(usize),
    /// Text up to the given length, or null.
    OptText(usize),
    /// The id of another record, or null.
    OptRef,
    /// A decimal amount, at least 0 (and at most 1 when `max_one`).
    Amount {
        /// True for rates (0..1).
        max_one: bool,
    },
    /// A decimal amount at least 0, or null.
    OptAmount,
    /// true or false.
    Bool,
    /// An integer.
    Int,
    /// An RFC 3339 timestamp.
    Timestamp,
    /// A ticket status (completed, cancelled, refunded, partially_refunded).
    TicketStatus,
    /// A cashier's role: admin, manager or cashier (POSPlus's roles).
    Role,
    /// A decimal amount of either sign (a cash difference), or null.
    OptSignedAmount,
    /// A cash session's state: open or closed.
    SessionStatus,
    /// A calendar day, `YYYY-MM-DD`.
    Date,
    /// Prices per store of a chain (docs/CHAIN.md, "Per-store prices"): an object from
    /// store id (`[A-Za-z0-9_-]`, 1 to 32 characters, as in `[uplink] store`) to an amount
    /// at least 0, at most [`MAX_STORE_PRICES`] stores; or null (an empty object is null).
    StorePrices,
}

/// Most stores a product's `storePrices` may name (a chain has 10 to 1,000 stores).
pub const MAX_STORE_PRICES: usize = 1_000;

/// A store id as `[uplink] store` takes it: `[A-Za-z0-9_-]`, 1 to 32 characters.
pub fn is_store_id(text: &str) -> bool {
    (1..=32).contains(&text.len())
        && text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The price a product's `storePrices` (its canonical value) sets for `store`, if any.
pub fn store_price(store_prices: Option<&Value>, store: &str) -> Option<Decimal> {
    store_prices?.get(store)?.as_str().and_then(|text| decimal::parse(text).ok())
}

/// One mutable field of a record kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldSpec {
    /// JSON (camelCase) name.
    pub name: &'static str,
    /// SQL (snake_case) column.
    pub column: &'static str,
    /// Type and rules.
    pub ty: FieldType,
    /// Must be present when the record is created locally.
    pub required: bool,
}

const fn field(name: &'static str, column: &'static str, ty: FieldType, required: bool) -> FieldSpec {
    FieldSpec { name, column, ty, required }
}

const TEXT: usize = 500;
/// Longest reference of a stock movement or payment (a delivery note, a card slip).
pub const REFERENCE_CHARS: usize = TEXT;
const LONG_TEXT: usize = 4000;

static PRODUCT_FIELDS: &[FieldSpec] = &[
    field("sku", "sku", FieldType::Text(64), true),
    field("barcode", "barcode", FieldType::OptText(64), false),
    field("name", "name", FieldType::Text(TEXT), true),
    field("description", "description", FieldType::OptText(LONG_TEXT), false),
    field("categoryId", "category_id", FieldType::OptRef, false),
    field("price", "price", FieldType::Amount { max_one: false }, true),
    field("cost", "cost", FieldType::OptAmount, false),
    field("discountRate", "discount_rate", FieldType::Amount { max_one: true }, false),
    field("minStock", "min_stock", FieldType::OptAmount, false),
    field("maxStock", "max_stock", FieldType::OptAmount, false),
    field("unit", "unit", FieldType::OptText(32), false),
    field("isActive", "is_active", FieldType::Bool, false),
    field("imageUrl", "image_url", FieldType::OptText(LONG_TEXT), false),
    field("createdAt", "created_at", FieldType::Timestamp, false),
    // Last: a record's metadata numbers its fields by position (`meta.rs`).
    field("storePrices", "store_prices", FieldType::StorePrices, false),
];

static CATEGORY_FIELDS: &[FieldSpec] = &[
    field("name", "name", FieldType::Text(TEXT), true),
    field("description", "description", FieldType::OptText(LONG_TEXT), false),
    field("parentId", "parent_id", FieldType::OptRef, false),
    field("displayOrder", "display_order", FieldType::Int, false),
    field("isActive", "is_active", FieldType::Bool, false),
    field("createdAt", "created_at", FieldType::Timestamp, false),
];

static CUSTOMER_FIELDS: &[FieldSpec] = &[
    field("name", "name", FieldType::Text(TEXT), true),
    field("email", "email", FieldType::OptText(TEXT), false),
    field("phone", "phone", FieldType::OptText(64), false),
    field("notes", "notes", FieldType::OptText(LONG_TEXT), false),
    field("createdAt", "created_at", FieldType::Timestamp, false),
];

/// Cashier accounts. `passwordHash` holds a PHC string (argon2id for passwords and PINs set
/// through possync, or a bcrypt hash imported from POSPlus): only hashes travel and are
/// stored; the API never answers them.
static USER_FIELDS: &[FieldSpec] = &[
    field("username", "username", FieldType::Text(64), true),
    field("firstName", "first_name", FieldType::OptText(TEXT), false),
    field("lastName", "last_name", FieldType::OptText(TEXT), false),
    field("email", "email", FieldType::OptText(TEXT), false),
    field("role", "role", FieldType::Role, true),
    field("isActive", "is_active", FieldType::Bool, false),
    field("passwordHash", "password_hash", FieldType::OptText(200), false),
    field("lastLogin", "last_login", FieldType::OptText(64), false),
    field("createdAt", "created_at", FieldType::Timestamp, false),
];

/// A till's cash sessions (POSPlus `cash_sessions`). Opened by the till with its float;
/// closed by the same till with the counted cash, when `expectedCash` (float + cash taken -
/// cash given back) and `difference` (counted - expected) are computed and the Z report is
/// written. Only the till that opened a session writes it (docs/DESIGN.md, "Cash sessions").
static CASH_SESSION_FIELDS: &[FieldSpec] = &[
    field("posId", "pos_id", FieldType::Text(64), true),
    field("openedBy", "opened_by", FieldType::OptRef, false),
    field("openingCash", "opening_cash", FieldType::Amount { max_one: false }, true),
    field("openedAt", "opened_at", FieldType::Timestamp, true),
    field("status", "status", FieldType::SessionStatus, true),
    field("closedBy", "closed_by", FieldType::OptRef, false),
    field("closedAt", "closed_at", FieldType::Timestamp, false),
    field("countedCash", "counted_cash", FieldType::OptAmount, false),
    field("expectedCash", "expected_cash", FieldType::OptSignedAmount, false),
    field("difference", "difference", FieldType::OptSignedAmount, false),
    field("zReportId", "z_report_id", FieldType::OptRef, false),
    field("notes", "notes", FieldType::OptText(LONG_TEXT), false),
];

/// The end-of-day report of one closed cash session (POSPlus `z_reports`, with the session's
/// cash count and the refunds given back). Created once, in the same write as the close.
static Z_REPORT_FIELDS: &[FieldSpec] = &[
    field("sessionId", "session_id", FieldType::OptRef, true),
    field("posId", "pos_id", FieldType::Text(64), true),
    field("userId", "user_id", FieldType::OptRef, false),
    field("reportDate", "report_date", FieldType::Date, true),
    field("ticketCount", "ticket_count", FieldType::Int, true),
    field("totalSales", "total_sales", FieldType::Amount { max_one: false }, true),
    field("totalDiscount", "total_discount", FieldType::Amount { max_one: false }, true),
    field("totalRefunds", "total_refunds", FieldType::Amount { max_one: false }, true),
    field("totalCash", "total_cash", FieldType::Amount { max_one: false }, true),
    field("totalCard", "total_card", FieldType::Amount { max_one: false }, true),
    field("totalTransfer", "total_transfer", FieldType::Amount { max_one: false }, true),
    field("totalCheck", "total_check", FieldType::Amount { max_one: false }, true),
    field("totalOther", "total_other", FieldType::Amount { max_one: false }, true),
    field("openingCash", "opening_cash", FieldType::Amount { max_one: false }, true),
    field("countedCash", "counted_cash", FieldType::OptAmount, false),
    field("expectedCash", "expected_cash", FieldType::OptSignedAmount, false),
    field("difference", "difference", FieldType::OptSignedAmount, false),
    field("createdAt", "created_at", FieldType::Timestamp, true),
];

/// The states of a cash session.
pub const SESSION_STATUSES: [&str; 2] = ["open", "closed"];

/// The roles a cashier account may have.
pub const USER_ROLES: [&str; 3] = ["admin", "manager", "cashier"];

static TICKET_FIELDS: &[FieldSpec] = &[
    field("status", "status", FieldType::TicketStatus, true),
    field("notes", "notes", FieldType::OptText(LONG_TEXT), false),
];

/// Why an entity or one of its fields is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntityError {
    /// The entity type is not one of product, category, customer, ticket, stock.
    #[error("unknown entity type {0:?}")]
    UnknownKind(String),
    /// The field does not exist on this kind, or cannot be written.
    #[error("unknown field {field:?} for {kind}")]
    UnknownField {
        /// The entity kind.
        kind: EntityKind,
        /// The offending field name.
        field: String,
    },
    /// The field's value breaks its rule.
    #[error("invalid {field}: {reason}")]
    InvalidField {
        /// The field name (JSON).
        field: String,
        /// What is wrong, in words.
        reason: String,
    },
    /// A required field is missing on create.
    #[error("missing required field {0}")]
    MissingField(&'static str),
    /// The body is not a JSON object.
    #[error("expected a JSON object of fields")]
    NotAnObject,
}

fn invalid(field: &str, reason: impl Into<String>) -> EntityError {
    EntityError::InvalidField { field: field.to_string(), reason: reason.into() }
}

impl FieldSpec {
    /// Checks `value` against this field's rules and returns its canonical form (amounts as
    /// canonical decimal strings, text trimmed of nothing, null for absent optionals).
    pub fn canonicalize(&self, value: Value) -> Result<Value, EntityError> {
        let name = self.name;
        match self.ty {
            FieldType::Text(max) => match &value {
                Value::String(text) if text.trim().is_empty() => Err(invalid(name, "must not be empty")),
                Value::String(text) => check_text(name, text, max).map(|()| value),
                _ => Err(invalid(name, "expected a string")),
            },
            FieldType::OptText(max) => match &value {
                Value::Null => Ok(Value::Null),
                Value::String(text) => check_text(name, text, max).map(|()| value),
                _ => Err(invalid(name, "expected a string or null")),
            },
            FieldType::OptRef => match &value {
                Value::Null => Ok(Value::Null),
                Value::String(text) => match EntityId::parse(text.as_str()) {
                    Ok(_) => Ok(value),
                    Err(err) => Err(invalid(name, err.to_string())),
                },
                _ => Err(invalid(name, "expected an id string or null")),
            },
            FieldType::Amount { max_one } => {
                let amount = decimal::from_json(&value).map_err(|err| invalid(name, err.to_string()))?;
                check_amount(name, amount, max_one)
            }
            FieldType::OptAmount => {
                if value.is_null() {
                    return Ok(Value::Null);
                }
                let amount = decimal::from_json(&value).map_err(|err| invalid(name, err.to_string()))?;
                check_amount(name, amount, false)
            }
            FieldType::Bool => match &value {
                Value::Bool(_) => Ok(value),
                _ => Err(invalid(name, "expected true or false")),
            },
            FieldType::Int => match value.as_i64() {
                Some(_) => Ok(value),
                None => Err(invalid(name, "expected an integer")),
            },
            FieldType::Timestamp => match value.as_str().and_then(crate::time::parse_rfc3339_ms) {
                Some(ms) => Ok(Value::String(crate::time::rfc3339_ms(ms))),
                None => Err(invalid(name, "expected an RFC 3339 timestamp")),
            },
            FieldType::TicketStatus => match value.as_str().map(TicketStatus::from_str) {
                Some(Ok(status)) => Ok(Value::String(status.as_str().to_string())),
                _ => Err(invalid(name, "expected completed, cancelled, refunded or partially_refunded")),
            },
            FieldType::Role => match value.as_str() {
                Some(role) if USER_ROLES.contains(&role) => Ok(value),
                _ => Err(invalid(name, "expected admin, manager or cashier")),
            },
            FieldType::OptSignedAmount => {
                if value.is_null() {
                    return Ok(Value::Null);
                }
                let amount = decimal::from_json(&value).map_err(|err| invalid(name, err.to_string()))?;
                Ok(Value::String(decimal::to_text(amount)))
            }
            FieldType::SessionStatus => match value.as_str() {
                Some(status) if SESSION_STATUSES.contains(&status) => Ok(value),
                _ => Err(invalid(name, "expected open or closed")),
            },
            FieldType::Date => match value.as_str() {
                Some(day) if crate::time::is_date(day) => Ok(value),
                _ => Err(invalid(name, "expected a date YYYY-MM-DD")),
            },
            FieldType::StorePrices => match value {
                Value::Null => Ok(Value::Null),
                Value::Object(prices) => {
                    if prices.len() > MAX_STORE_PRICES {
                        return Err(invalid(name, format!("names more than {MAX_STORE_PRICES} stores")));
                    }
                    let mut canonical = Map::new();
                    for (store, price) in prices {
                        if !is_store_id(&store) {
                            return Err(invalid(
                                name,
                                format!("{store:?} is not a store id ([A-Za-z0-9_-], 1 to 32 characters)"),
                            ));
                        }
                        let amount = decimal::from_json(&price)
                            .map_err(|err| invalid(name, format!("store {store}: {err}")))?;
                        canonical.insert(store, check_amount(name, amount, false)?);
                    }
                    Ok(if canonical.is_empty() { Value::Null } else { Value::Object(canonical) })
                }
                _ => Err(invalid(name, "expected an object of store id to price, or null")),
            },
        }
    }
}

/// Text fields hold what a person typed: at most `max` characters and no control
/// characters (a NUL truncates the text in C code, receipts and the sqlite3 shell; others
/// garble receipts and terminals). Long free text (descriptions, notes: a `max` of
/// `LONG_TEXT` and more) may hold line breaks and tabs; short fields (SKUs, names,
/// barcodes) are one line. The same rule holds for changes from peers, which are
/// validated by the same field table.
pub fn check_text(name: &str, text: &str, max: usize) -> Result<(), EntityError> {
    if text.chars().count() > max {
        return Err(invalid(name, format!("longer than {max} characters")));
    }
    let multiline = text_allows_line_breaks(max);
    let allowed = |c: char| multiline && matches!(c, '\n' | '\r' | '\t');
    if let Some(bad) = text.chars().find(|&c| c.is_control() && !allowed(c)) {
        return Err(invalid(
            name,
            format!("must not contain control characters (found U+{:04X})", u32::from(bad)),
        ));
    }
    Ok(())
}

/// Does a text field of at most `max` characters take line breaks and tabs (free text)?
pub fn text_allows_line_breaks(max: usize) -> bool {
    max >= LONG_TEXT
}

fn check_amount(name: &str, amount: Decimal, max_one: bool) -> Result<Value, EntityError> {
    if amount.is_sign_negative() && !amount.is_zero() {
        return Err(invalid(name, "must not be negative"));
    }
    if max_one && amount > Decimal::ONE {
        return Err(invalid(name, "must be between 0 and 1"));
    }
    Ok(Value::String(decimal::to_text(amount)))
}

/// A validated set of field values of one record (keys are the static field names).
pub type FieldMap = BTreeMap<&'static str, Value>;

/// Validates a JSON object of fields for `kind`: every key must be a writable field, every
/// value must pass its rule. `id`, `updatedAt` and `stock` are ignored (they are not fields
/// a writer sets). Returns the canonical values.
pub fn parse_fields(kind: EntityKind, body: &Value) -> Result<FieldMap, EntityError> {
    let object = body.as_object().ok_or(EntityError::NotAnObject)?;
    let mut fields = FieldMap::new();
    for (name, value) in object {
        insert_field(&mut fields, kind, name, value.clone())?;
    }
    Ok(fields)
}

/// [`parse_fields`] on an object taken by value: its values move into the field map.
pub fn parse_field_object(kind: EntityKind, object: Map<String, Value>) -> Result<FieldMap, EntityError> {
    let mut fields = FieldMap::new();
    for (name, value) in object {
        insert_field(&mut fields, kind, &name, value)?;
    }
    Ok(fields)
}

/// Checks one field of a body and adds its canonical value (`id`, `updatedAt` and `stock`
/// are not fields a write sets, and are skipped).
fn insert_field(
    fields: &mut FieldMap,
    kind: EntityKind,
    name: &str,
    value: Value,
) -> Result<(), EntityError> {
    if matches!(name, "id" | "updatedAt" | "stock") {
        return Ok(());
    }
    let spec = kind
        .field(name)
        .ok_or_else(|| EntityError::UnknownField { kind, field: name.chars().take(64).collect() })?;
    fields.insert(spec.name, spec.canonicalize(value)?);
    Ok(())
}

/// Checks that every required field of `kind` is present (for creates).
pub fn check_required(kind: EntityKind, fields: &FieldMap) -> Result<(), EntityError> {
    match kind.fields().iter().find(|spec| spec.required && !fields.contains_key(spec.name)) {
        Some(spec) => Err(EntityError::MissingField(spec.name)),
        None => Ok(()),
    }
}

macro_rules! string_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vdoc])* #[serde(rename = $text)] $variant),+
        }

        impl $name {
            /// The text form used in JSON and SQL.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl FromStr for $name {
            type Err = EntityError;
            fn from_str(raw: &str) -> Result<Self, EntityError> {
                match raw {
                    $($text => Ok($name::$variant),)+
                    _ => Err(invalid(stringify!($name), format!("unknown value {:?}", raw.chars().take(40).collect::<String>()))),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

string_enum!(
    /// The state of a ticket.
    TicketStatus {
        /// Sold and paid.
        Completed = "completed",
        /// Voided; its stock went back.
        Cancelled = "cancelled",
        /// Fully refunded; its stock went back.
        Refunded = "refunded",
        /// Some lines refunded.
        PartiallyRefunded = "partially_refunded",
    }
);

string_enum!(
    /// How a payment was made.
    PaymentMethod {
        /// Cash.
        Cash = "cash",
        /// Card.
        Card = "card",
        /// Bank transfer.
        Transfer = "transfer",
        /// Cheque.
        Check = "check",
        /// Anything else.
        Other = "other",
    }
);

string_enum!(
    /// Why stock moved.
    MovementType {
        /// Goods received.
        In = "in",
        /// Goods out (loss, transfer).
        Out = "out",
        /// A correction, including a stock count.
        Adjustment = "adjustment",
        /// Sold on a ticket.
        Sale = "sale",
        /// Returned by a refund or cancel.
        Return = "return",
    }
);

/// One line of a ticket. Immutable once sold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TicketLine {
    /// The product sold.
    pub product_id: EntityId,
    /// The product's name at the time of sale.
    pub product_name: String,
    /// The product's SKU at the time of sale.
    pub product_sku: String,
    /// Quantity sold (positive).
    #[serde(with = "decimal::json")]
    pub quantity: Decimal,
    /// Unit price before discount.
    #[serde(with = "decimal::json")]
    pub unit_price: Decimal,
    /// Discount rate applied (0..1).
    #[serde(with = "decimal::json")]
    pub discount_rate: Decimal,
    /// Discount in money.
    #[serde(with = "decimal::json")]
    pub discount_amount: Decimal,
    /// quantity * unitPrice - discountAmount.
    #[serde(with = "decimal::json")]
    pub total_amount: Decimal,
}

/// One payment of a ticket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Payment {
    /// cash, card, transfer, check or other.
    pub method: PaymentMethod,
    /// Amount paid (positive).
    #[serde(with = "decimal::json")]
    pub amount: Decimal,
    /// Card slip, transfer reference...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
}

/// A stock movement: a signed delta of one product's stock. Immutable; stock is their sum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StockMovement {
    /// Unique id.
    pub id: EntityId,
    /// The product whose stock moves.
    pub product_id: EntityId,
    /// Why it moved.
    #[serde(rename = "type")]
    pub kind: MovementType,
    /// Signed delta.
    #[serde(with = "decimal::json")]
    pub quantity: Decimal,
    /// Ticket id, count reference, delivery note...
    #[serde(default)]
    pub reference: Option<String>,
    /// The terminal that recorded it.
    pub pos_id: PosId,
    /// When it was recorded (RFC 3339).
    pub created_at: String,
}

/// A sale as it was made: the immutable part of a ticket, with the movements it caused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Sale {
    /// Ticket id.
    pub id: EntityId,
    /// Receipt number, unique across terminals.
    pub ticket_number: String,
    /// The terminal that sold.
    pub pos_id: PosId,
    /// The customer, if any.
    #[serde(default)]
    pub customer_id: Option<EntityId>,
    /// The cash session open on the selling till at the time, if any (absent on the wire
    /// when none, so sales without one keep the form older tills write and read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cash_session_id: Option<EntityId>,
    /// What was sold.
    pub lines: Vec<TicketLine>,
    /// How it was paid.
    pub payments: Vec<Payment>,
    /// Sum of quantity * unitPrice.
    #[serde(with = "decimal::json")]
    pub subtotal: Decimal,
    /// Sum of line discounts.
    #[serde(with = "decimal::json")]
    pub discount_amount: Decimal,
    /// subtotal - discountAmount.
    #[serde(with = "decimal::json")]
    pub total_amount: Decimal,
    /// Notes at sale time.
    #[serde(default)]
    pub notes: Option<String>,
    /// When sold (RFC 3339).
    pub created_at: String,
    /// One `sale` movement per line.
    pub movements: Vec<StockMovement>,
}

impl Sale {
    /// Checks the sale's internal consistency (what a peer could get wrong): at least one
    /// line, positive quantities, non-negative prices, sums that add up, movements that
    /// match the lines.
    pub fn validate(&self) -> Result<(), EntityError> {
        if self.lines.is_empty() {
            return Err(invalid("lines", "a sale needs at least one line"));
        }
        let mut subtotal = Decimal::ZERO;
        let mut discount = Decimal::ZERO;
        for line in &self.lines {
            if line.quantity <= Decimal::ZERO {
                return Err(invalid("quantity", "must be positive"));
            }
            if line.unit_price.is_sign_negative() && !line.unit_price.is_zero() {
                return Err(invalid("unitPrice", "must not be negative"));
            }
            // A peer can send any amounts: overflow is an invalid sale, never a panic.
            let too_large = || invalid("lines", "amounts too large");
            let gross = line.quantity.checked_mul(line.unit_price).ok_or_else(too_large)?;
            subtotal = subtotal.checked_add(gross).ok_or_else(too_large)?;
            discount = discount.checked_add(line.discount_amount).ok_or_else(too_large)?;
        }
        let total = subtotal.checked_sub(discount).ok_or_else(|| invalid("lines", "amounts too large"))?;
        if subtotal != self.subtotal || discount != self.discount_amount || total != self.total_amount {
            return Err(invalid("totalAmount", "does not match the lines"));
        }
        if self.payments.iter().any(|payment| payment.amount <= Decimal::ZERO) {
            return Err(invalid("payments", "amounts must be positive"));
        }
        for line in &self.lines {
            check_text("productName", &line.product_name, TEXT)?;
            check_text("productSku", &line.product_sku, TEXT)?;
        }
        for payment in &self.payments {
            if let Some(reference) = &payment.reference {
                check_text("reference", reference, TEXT)?;
            }
        }
        if let Some(notes) = &self.notes {
            check_text("notes", notes, LONG_TEXT)?;
        }
        if self.movements.iter().any(|movement| movement.kind != MovementType::Sale) {
            return Err(invalid("movements", "a sale only moves stock by sale movements"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn store_prices_are_an_object_of_store_ids_to_amounts() {
        let fields =
            parse_fields(EntityKind::Product, &json!({"storePrices": {"s2": 2.2, "s1": "1.990"}})).unwrap();
        assert_eq!(fields["storePrices"], json!({"s1": "1.99", "s2": "2.2"}));
        assert_eq!(store_price(fields.get("storePrices"), "s1"), Some(Decimal::new(199, 2)));
        assert_eq!(store_price(fields.get("storePrices"), "s3"), None);
        assert_eq!(store_price(None, "s1"), None);
        for empty in [json!({}), Value::Null] {
            let fields = parse_fields(EntityKind::Product, &json!({ "storePrices": empty })).unwrap();
            assert_eq!(fields["storePrices"], Value::Null, "one form for no store prices");
        }
        let too_many: Map<String, Value> =
            (0..=MAX_STORE_PRICES).map(|n| (format!("s{n}"), json!(1))).collect();
        let bad = [
            json!({"s1": -1}),
            json!({"s1": "cheap"}),
            json!({"s1": null}),
            json!({"": 1}),
            json!({"s 1": 1}),
            json!({"s1\u{0}": 1}),
            json!({"a-very-long-store-id-of-33-bytes!": 1}),
            json!([["s1", 1]]),
            json!("s1=1"),
            Value::Object(too_many),
        ];
        for prices in bad {
            let refused = parse_fields(EntityKind::Product, &json!({ "storePrices": prices.clone() }));
            assert!(refused.is_err(), "{prices}");
        }
    }

    #[test]
    fn fields_are_validated_and_canonicalized() {
        let fields = parse_fields(
            EntityKind::Product,
            &json!({"id": "p1", "sku": "A-1", "name": "Tea", "price": "2.50", "discountRate": 0.1}),
        )
        .unwrap();
        assert_eq!(fields["price"], json!("2.5"));
        assert_eq!(fields["discountRate"], json!("0.1"));
        assert!(!fields.contains_key("id"));
        check_required(EntityKind::Product, &fields).unwrap();

        let bad = [
            json!({"price": -1}),
            json!({"discountRate": 1.5}),
            json!({"name": ""}),
            json!({"name": 3}),
            json!({"isActive": "yes"}),
            json!({"colour": "red"}),
            json!({"createdAt": "noon"}),
            json!([1]),
            json!({"sku": "A\u{0}1"}),
            json!({"sku": "A\n1"}),
            json!({"name": "Tea\u{7f}"}),
            json!({"barcode": "123\u{1b}[2J"}),
            json!({"description": "bad \u{0} byte"}),
            json!({"name": "Tea\u{85}"}),
        ];
        for body in bad {
            assert!(parse_fields(EntityKind::Product, &body).is_err(), "{body}");
        }
        // Free text keeps its line breaks and tabs; any script's letters are fine.
        let text = parse_fields(
            EntityKind::Product,
            &json!({"name": "Thé vert 緑茶", "description": "line 1\r\nline 2\tend"}),
        )
        .unwrap();
        assert_eq!(text["description"], json!("line 1\r\nline 2\tend"));
        assert_eq!(
            check_required(EntityKind::Product, &FieldMap::new()),
            Err(EntityError::MissingField("sku"))
        );
    }

    #[test]
    fn kinds_and_enums_parse_from_text() {
        assert_eq!("stock".parse::<EntityKind>().unwrap(), EntityKind::Stock);
        assert!("sale".parse::<EntityKind>().is_err());
        assert_eq!("partially_refunded".parse::<TicketStatus>().unwrap(), TicketStatus::PartiallyRefunded);
        assert!("bitcoin".parse::<PaymentMethod>().is_err());
    }
}
