//! Sales, refunds, cancellations and stock: the facts of the shop.
//!
//! A sale is one change carrying the whole ticket (lines, payments) and one `sale` stock
//! movement per line, written in one transaction: it reaches every terminal whole or not at
//! all, exactly once. Stock is never written as a number: it is the sum of movements, cached
//! on the product row and updated in the same transaction as each movement (SPEC rule 4).

use std::collections::BTreeMap;

use possync_core::entity::{
    FieldMap, MovementType, Payment, PaymentMethod, Sale, StockMovement, TicketLine, TicketStatus,
};
use possync_core::{ChangeBody, EntityId, EntityKind, RecordState, TicketAction, decimal};
use rusqlite::{OptionalExtension, params};
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::CashSessionError;
use crate::error::{Result, StoreError};
use crate::local::local_version;
use crate::{Store, meta, records};

/// One line of a sale as the till asks for it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SaleLineRequest {
    /// The product sold.
    pub product_id: EntityId,
    /// How many (positive).
    #[serde(with = "decimal::json")]
    pub quantity: Decimal,
    /// Price per unit; the product's price when absent.
    #[serde(default, with = "decimal::json_opt")]
    pub unit_price: Option<Decimal>,
    /// Discount rate 0..1; the product's when absent.
    #[serde(default, with = "decimal::json_opt")]
    pub discount_rate: Option<Decimal>,
}

/// One payment as the till reports it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PaymentRequest {
    /// cash, card, transfer, check or other.
    pub method: PaymentMethod,
    /// Amount (positive).
    #[serde(with = "decimal::json")]
    pub amount: Decimal,
    /// Card slip, transfer reference...
    #[serde(default)]
    pub reference: Option<String>,
}

/// A sale as the till asks for it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SaleRequest {
    /// Ticket id; a UUIDv7 when absent.
    #[serde(default)]
    pub id: Option<EntityId>,
    /// The customer, if any.
    #[serde(default)]
    pub customer_id: Option<EntityId>,
    /// What is sold.
    pub lines: Vec<SaleLineRequest>,
    /// How it is paid; together at least the total.
    pub payments: Vec<PaymentRequest>,
    /// Free text.
    #[serde(default)]
    pub notes: Option<String>,
}

/// A sale made before this terminal used possync, as an import brings it: its id, number,
/// date, lines, payments and totals are kept as they were, and its status is the one it
/// ended with. It moves no stock: an import brings stock as counted (one count per
/// product), which already reflects every old sale, so moving it again would count each
/// old sale twice.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoricalSale {
    /// Ticket id (deterministic, so that importing twice writes it once).
    pub id: EntityId,
    /// Receipt number, unique across terminals (the importer prefixes it).
    pub ticket_number: String,
    /// The customer, if any (must be a live customer).
    pub customer_id: Option<EntityId>,
    /// What was sold.
    pub lines: Vec<TicketLine>,
    /// How it was paid (may be empty for old data).
    pub payments: Vec<Payment>,
    /// Sum of quantity * unitPrice of the lines.
    pub subtotal: Decimal,
    /// Sum of the lines' discounts.
    pub discount_amount: Decimal,
    /// subtotal - discountAmount.
    pub total_amount: Decimal,
    /// Notes.
    pub notes: Option<String>,
    /// When it was sold (RFC 3339).
    pub created_at: String,
    /// The status it ended with.
    pub status: TicketStatus,
    /// The cash session it was sold in (an imported session), if any.
    pub cash_session_id: Option<EntityId>,
}

/// A line to refund: which product, how many.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RefundLine {
    /// The product.
    pub product_id: EntityId,
    /// How many (positive, at most what is left to refund).
    #[serde(with = "decimal::json")]
    pub quantity: Decimal,
}

/// What [`Store::record_sale_once`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum SaleOutcome {
    /// The sale is new and was recorded: the ticket.
    Recorded(Value),
    /// This till already recorded a sale with this id and the same content (the till
    /// re-sent it after losing the answer): nothing was written; the stored ticket.
    AlreadyRecorded(Value),
}

/// An arithmetic result, or a clear error instead of an overflow panic.
fn checked(value: Option<Decimal>) -> Result<Decimal> {
    value.ok_or_else(|| StoreError::invalid("amount", "too large"))
}

/// Money is rounded to cents.
fn money(value: Decimal) -> Decimal {
    value.round_dp(2).normalize()
}

impl Store {
    /// Records a sale: validates it against the catalog, writes the ticket, its lines, its
    /// payments and its stock movements in one transaction, and returns the ticket.
    pub fn record_sale(&mut self, request: &SaleRequest) -> Result<Value> {
        if request.lines.is_empty() {
            return Err(StoreError::invalid("lines", "a sale needs at least one line"));
        }
        if request.payments.is_empty() {
            return Err(StoreError::invalid("payments", "a sale needs at least one payment"));
        }
        if request.notes.as_ref().is_some_and(|notes| notes.chars().count() > 4000) {
            return Err(StoreError::invalid("notes", "longer than 4000 characters"));
        }
        let id = match &request.id {
            Some(id) => id.clone(),
            None => self.new_id(),
        };
        let created_at = self.now_rfc3339();
        self.write(true, |store| {
            if store.ticket_exists(&id)? {
                return Err(StoreError::AlreadyExists { kind: EntityKind::Ticket, id: id.clone() });
            }
            if let Some(customer) = &request.customer_id {
                store.live_record(EntityKind::Customer, customer).map_err(|_| {
                    StoreError::invalid("customerId", format!("customer {customer} does not exist"))
                })?;
            }
            let mut lines = Vec::with_capacity(request.lines.len());
            for line in &request.lines {
                lines.push(store.price_line(line)?);
            }
            let mut subtotal = Decimal::ZERO;
            let mut discount = Decimal::ZERO;
            for line in &lines {
                subtotal = checked(subtotal.checked_add(line.quantity * line.unit_price))?;
                discount = checked(discount.checked_add(line.discount_amount))?;
            }
            let total = checked(subtotal.checked_sub(discount))?;
            for amount in [subtotal, discount, total] {
                // Amounts travel as JSON numbers: they must stay exact (15 significant digits).
                decimal::parse(&amount.to_string()).map_err(|err| {
                    StoreError::invalid("totalAmount", format!("total not representable: {err}"))
                })?;
            }
            let mut payments = Vec::with_capacity(request.payments.len());
            for payment in &request.payments {
                if payment.amount <= Decimal::ZERO {
                    return Err(StoreError::invalid("payments", "amounts must be positive"));
                }
                payments.push(Payment {
                    method: payment.method,
                    amount: payment.amount,
                    reference: payment.reference.clone(),
                });
            }
            let mut paid = Decimal::ZERO;
            for payment in &payments {
                paid = checked(paid.checked_add(payment.amount))?;
            }
            if paid < total {
                return Err(StoreError::invalid(
                    "payments",
                    format!("payments of {paid} do not cover the total of {total}"),
                ));
            }
            let cash_session_id = store.open_cash_session_id()?;
            if cash_session_id.is_none() && store.settings.require_cash_session {
                return Err(CashSessionError::NoneOpen.into());
            }
            let ticket_number = store.next_ticket_number()?;
            let mut movements = Vec::with_capacity(lines.len());
            for line in &lines {
                movements.push(StockMovement {
                    id: store.new_id(),
                    product_id: line.product_id.clone(),
                    kind: MovementType::Sale,
                    quantity: -line.quantity,
                    reference: Some(id.to_string()),
                    pos_id: store.identity.pos_id.clone(),
                    created_at: created_at.clone(),
                });
            }
            let sale = Sale {
                id: id.clone(),
                ticket_number,
                pos_id: store.identity.pos_id.clone(),
                customer_id: request.customer_id.clone(),
                cash_session_id,
                lines,
                payments,
                subtotal,
                discount_amount: discount,
                total_amount: total,
                notes: request.notes.clone(),
                created_at: created_at.clone(),
                movements,
            };
            sale.validate()?;
            let change = store.emit_local(
                EntityKind::Ticket,
                &id,
                ChangeBody::Sale(Box::new(sale.clone())),
                &Default::default(),
                None,
            )?;
            let state = sale_state(&sale, local_version(&change), change.ctx.clone());
            store.insert_sale(&sale, &state)?;
            store.ticket_json(&id)
        })
    }

    /// Records a sale made before possync (see [`HistoricalSale`]): one `sale` change with no
    /// stock movement, then, if it ended cancelled or refunded, one status change with no
    /// `return` movement. Returns false, writing nothing, when the ticket id exists already.
    pub fn record_historical_sale(&mut self, request: HistoricalSale) -> Result<bool> {
        if request.notes.as_ref().is_some_and(|notes| notes.chars().count() > 4000) {
            return Err(StoreError::invalid("notes", "longer than 4000 characters"));
        }
        if possync_core::time::parse_rfc3339_ms(&request.created_at).is_none() {
            return Err(StoreError::invalid("createdAt", "expected an RFC 3339 timestamp"));
        }
        for amount in [request.subtotal, request.discount_amount, request.total_amount] {
            decimal::parse(&amount.to_string()).map_err(|err| {
                StoreError::invalid("totalAmount", format!("total not representable: {err}"))
            })?;
        }
        self.write(true, |store| {
            if store.ticket_exists(&request.id)? {
                return Ok(false);
            }
            if let Some(customer) = &request.customer_id
                && !store.is_live(EntityKind::Customer, customer)?
            {
                return Err(StoreError::invalid("customerId", format!("customer {customer} does not exist")));
            }
            let status = request.status;
            let sale = Sale {
                id: request.id,
                ticket_number: request.ticket_number,
                pos_id: store.identity.pos_id.clone(),
                customer_id: request.customer_id,
                cash_session_id: request.cash_session_id,
                lines: request.lines,
                payments: request.payments,
                subtotal: request.subtotal,
                discount_amount: request.discount_amount,
                total_amount: request.total_amount,
                notes: request.notes,
                created_at: request.created_at,
                movements: Vec::new(),
            };
            sale.validate()?;
            let id = sale.id.clone();
            let change = store.emit_local(
                EntityKind::Ticket,
                &id,
                ChangeBody::Sale(Box::new(sale)),
                &Default::default(),
                None,
            )?;
            let ChangeBody::Sale(sale) = &change.body else {
                return Err(StoreError::InvalidState("a sale change without its sale".into()));
            };
            let state = sale_state(sale, local_version(&change), change.ctx.clone());
            store.insert_sale(sale, &state)?;
            let action = match status {
                TicketStatus::Completed => return Ok(true),
                TicketStatus::Cancelled => TicketAction::Cancel,
                TicketStatus::Refunded | TicketStatus::PartiallyRefunded => TicketAction::Refund,
            };
            let mut fields = FieldMap::new();
            fields.insert("status", json!(status.as_str()));
            store.emit_ticket_status(&id, state, action, fields, Vec::new())?;
            Ok(true)
        })
    }

    /// Records a sale exactly once per ticket id: tills choose their ticket ids and re-send
    /// a sale whose answer was lost. A re-sent sale (same id, same customer, lines,
    /// payments and notes, sold on this till) answers the stored ticket and writes nothing;
    /// a different sale under a used id is [`StoreError::AlreadyExists`].
    pub fn record_sale_once(&mut self, request: &SaleRequest) -> Result<SaleOutcome> {
        if let Some(id) = &request.id
            && self.ticket_exists(id)?
        {
            if self.is_recorded_as(id, request)? {
                return Ok(SaleOutcome::AlreadyRecorded(self.ticket_json(id)?));
            }
            return Err(StoreError::AlreadyExists { kind: EntityKind::Ticket, id: id.clone() });
        }
        self.record_sale(request).map(SaleOutcome::Recorded)
    }

    /// Is ticket `id` the sale `request` asks for? Prices and discount rates the request
    /// leaves to the catalog are not compared (the catalog may have changed since).
    fn is_recorded_as(&self, id: &EntityId, request: &SaleRequest) -> Result<bool> {
        let stored_decimal =
            |raw: &str| decimal::parse_stored(raw).map_err(|err| StoreError::Corrupt(err.to_string()));
        let (pos_id, customer_id, notes): (String, Option<String>, Option<String>) = self
            .conn
            .prepare_cached("SELECT pos_id, customer_id, notes FROM tickets WHERE id = ?1")?
            .query_row([id.as_str()], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?;
        if pos_id != self.identity.pos_id.as_str()
            || customer_id.as_deref() != request.customer_id.as_ref().map(EntityId::as_str)
            || notes != request.notes
        {
            return Ok(false);
        }
        let lines: Vec<(String, String, String, String)> = self
            .conn
            .prepare_cached(
                "SELECT product_id, quantity, unit_price, discount_rate FROM ticket_lines
                 WHERE ticket_id = ?1 ORDER BY line_no",
            )?
            .query_map([id.as_str()], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)))?
            .collect::<rusqlite::Result<_>>()?;
        if lines.len() != request.lines.len() {
            return Ok(false);
        }
        for ((product, quantity, unit_price, discount_rate), asked) in lines.iter().zip(&request.lines) {
            let (unit_price, discount_rate) = (stored_decimal(unit_price)?, stored_decimal(discount_rate)?);
            if product != asked.product_id.as_str()
                || stored_decimal(quantity)? != asked.quantity
                || asked.unit_price.is_some_and(|price| price != unit_price)
                || asked.discount_rate.is_some_and(|rate| rate != discount_rate)
            {
                return Ok(false);
            }
        }
        let payments: Vec<(String, String, Option<String>)> = self
            .conn
            .prepare_cached(
                "SELECT method, amount, reference FROM ticket_payments WHERE ticket_id = ?1 ORDER BY line_no",
            )?
            .query_map([id.as_str()], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
            .collect::<rusqlite::Result<_>>()?;
        if payments.len() != request.payments.len() {
            return Ok(false);
        }
        for ((method, amount, reference), asked) in payments.iter().zip(&request.payments) {
            if method != asked.method.as_str()
                || stored_decimal(amount)? != asked.amount
                || *reference != asked.reference
            {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Refunds a ticket: some lines (`lines`) or everything not yet refunded (`None`).
    /// Stock comes back by `return` movements.
    pub fn refund_ticket(
        &mut self,
        id: &EntityId,
        lines: Option<&[RefundLine]>,
        reason: Option<&str>,
    ) -> Result<Value> {
        self.change_ticket(id, TicketAction::Refund, lines, reason)
    }

    /// Cancels (voids) a ticket; all its stock not yet refunded comes back.
    pub fn cancel_ticket(&mut self, id: &EntityId, reason: Option<&str>) -> Result<Value> {
        self.change_ticket(id, TicketAction::Cancel, None, reason)
    }

    /// A person's decision on a ticket's status conflict (`resolve_conflict`): the chosen
    /// `status` (and `notes`) written as a status change without returns, the only kind of
    /// change a ticket takes after its sale (the stock both sides moved stays moved: those
    /// movements are facts). Labelled `cancel` when the chosen status is `cancelled`, else
    /// `refund`; a receiving till merges its fields like any status change. Runs inside the
    /// caller's write.
    pub(crate) fn decide_ticket_status(
        &mut self,
        id: &EntityId,
        state: RecordState,
        fields: possync_core::FieldMap,
    ) -> Result<Value> {
        let cancelled =
            fields.get("status").and_then(Value::as_str) == Some(TicketStatus::Cancelled.as_str());
        let action = if cancelled { TicketAction::Cancel } else { TicketAction::Refund };
        self.emit_ticket_status(id, state, action, fields, Vec::new())?;
        self.ticket_json(id)
    }

    /// Emits a ticket's status change (`fields`: `status`, maybe `notes`; `returns`: the
    /// stock coming back) and records it in the ticket's state, as the merge records it on
    /// every other till: the fields and, since every write sets it, the existence.
    fn emit_ticket_status(
        &mut self,
        id: &EntityId,
        mut state: RecordState,
        action: TicketAction,
        fields: possync_core::FieldMap,
        returns: Vec<StockMovement>,
    ) -> Result<()> {
        let body = ChangeBody::TicketStatus { action, fields: fields.clone(), returns };
        let newest = state.newest().cloned();
        let change = self.emit_local(EntityKind::Ticket, id, body, &state.ctx, newest.as_ref())?;
        let version = local_version(&change);
        for (name, value) in fields {
            state.values.insert(name, value);
            state.versions.insert(name, version.clone());
        }
        state.existence = Some(version);
        state.ctx = change.ctx;
        records::save(&self.conn, &mut self.origins, EntityKind::Ticket, id, &state)
    }

    fn change_ticket(
        &mut self,
        id: &EntityId,
        action: TicketAction,
        lines: Option<&[RefundLine]>,
        reason: Option<&str>,
    ) -> Result<Value> {
        if let Some(reason) = reason {
            possync_core::entity::check_text("reason", reason, 4000)?;
        }
        let now = self.now_rfc3339();
        self.write(true, |store| {
            let state = records::load(&store.conn, &store.origins, EntityKind::Ticket, id)?
                .ok_or_else(|| StoreError::not_found(EntityKind::Ticket, id))?;
            let status = state.values.get("status").and_then(Value::as_str).unwrap_or_default().to_string();
            match (action, status.as_str()) {
                (_, "completed") | (TicketAction::Refund, "partially_refunded") => {}
                _ => {
                    let verb = match action {
                        TicketAction::Refund => "refunded",
                        TicketAction::Cancel => "cancelled",
                    };
                    return Err(StoreError::InvalidState(format!(
                        "ticket {id} is {status}: it cannot be {verb}"
                    )));
                }
            }
            let remaining = store.refundable(id)?;
            let wanted: BTreeMap<EntityId, Decimal> = match lines {
                None => remaining.clone(),
                Some([]) => return Err(StoreError::invalid("lines", "nothing to refund")),
                Some(lines) => {
                    let mut wanted = BTreeMap::new();
                    for line in lines {
                        if line.quantity <= Decimal::ZERO {
                            return Err(StoreError::invalid("quantity", "must be positive"));
                        }
                        *wanted.entry(line.product_id.clone()).or_insert(Decimal::ZERO) += line.quantity;
                    }
                    for (product, quantity) in &wanted {
                        let left = remaining.get(product).copied().unwrap_or_default();
                        if *quantity > left {
                            return Err(StoreError::invalid(
                                "quantity",
                                format!("only {left} of product {product} left to refund on this ticket"),
                            ));
                        }
                    }
                    wanted
                }
            };
            let wanted: Vec<(EntityId, Decimal)> =
                wanted.into_iter().filter(|(_, quantity)| !quantity.is_zero()).collect();
            if wanted.is_empty() && action == TicketAction::Refund {
                return Err(StoreError::InvalidState(format!("ticket {id} has nothing left to refund")));
            }
            let everything_back =
                wanted.iter().all(|(product, quantity)| remaining.get(product) == Some(quantity))
                    && remaining.iter().filter(|(_, left)| !left.is_zero()).count() == wanted.len();
            let new_status = match action {
                TicketAction::Cancel => TicketStatus::Cancelled,
                TicketAction::Refund if everything_back => TicketStatus::Refunded,
                TicketAction::Refund => TicketStatus::PartiallyRefunded,
            };
            let mut returns = Vec::with_capacity(wanted.len());
            for (product, quantity) in wanted {
                returns.push(StockMovement {
                    id: store.new_id(),
                    product_id: product,
                    kind: MovementType::Return,
                    quantity,
                    reference: Some(id.to_string()),
                    pos_id: store.identity.pos_id.clone(),
                    created_at: now.clone(),
                });
            }
            let mut fields = FieldMap::new();
            fields.insert("status", json!(new_status.as_str()));
            if let Some(reason) = reason {
                fields.insert("notes", json!(reason));
            }
            store.emit_ticket_status(id, state, action, fields, returns.clone())?;
            for movement in &returns {
                store.insert_movement(movement)?;
            }
            store.ticket_json(id)
        })
    }

    /// Adjusts a product's stock by a signed quantity (`in` > 0, `out` < 0, `adjustment`
    /// either way). Returns the movement.
    pub fn adjust_stock(
        &mut self,
        product_id: &EntityId,
        quantity: Decimal,
        kind: MovementType,
        reference: Option<&str>,
    ) -> Result<Value> {
        match kind {
            MovementType::In if quantity <= Decimal::ZERO => {
                return Err(StoreError::invalid("quantity", "an `in` movement must be positive"));
            }
            MovementType::Out if quantity >= Decimal::ZERO => {
                return Err(StoreError::invalid("quantity", "an `out` movement must be negative"));
            }
            MovementType::Adjustment if quantity.is_zero() => {
                return Err(StoreError::invalid("quantity", "must not be zero"));
            }
            MovementType::Sale | MovementType::Return => {
                return Err(StoreError::invalid("type", "sale and return movements come from tickets"));
            }
            _ => {}
        }
        self.record_movement(None, product_id, quantity, kind, reference, false)
    }

    /// Records a stock count: an adjustment of (counted - stock as this terminal sees it).
    pub fn count_stock(
        &mut self,
        product_id: &EntityId,
        counted: Decimal,
        reference: Option<&str>,
    ) -> Result<Value> {
        if counted.is_sign_negative() && !counted.is_zero() {
            return Err(StoreError::invalid("counted", "must not be negative"));
        }
        let stock = records::product_stock(&self.conn, product_id)?;
        self.record_movement(None, product_id, counted - stock, MovementType::Adjustment, reference, true)
    }

    /// Records a stock count once: a count (as [`Store::count_stock`]) whose movement has
    /// the given id. When a movement with this id exists already, nothing is written and
    /// `None` is returned, so a later count from the same source cannot undo the sales made
    /// since. A count equal to the current stock is still written (a zero adjustment): it is
    /// what marks the product as counted.
    pub fn count_stock_once(
        &mut self,
        movement_id: &EntityId,
        product_id: &EntityId,
        counted: Decimal,
        reference: Option<&str>,
    ) -> Result<Option<Value>> {
        if counted.is_sign_negative() && !counted.is_zero() {
            return Err(StoreError::invalid("counted", "must not be negative"));
        }
        let exists = self
            .conn
            .prepare_cached("SELECT 1 FROM stock_movements WHERE id = ?1")?
            .query_row([movement_id.as_str()], |_| Ok(()))
            .optional()?
            .is_some();
        if exists {
            return Ok(None);
        }
        let stock = records::product_stock(&self.conn, product_id)?;
        let quantity = checked(counted.checked_sub(stock))?;
        self.record_movement(
            Some(movement_id),
            product_id,
            quantity,
            MovementType::Adjustment,
            reference,
            true,
        )
        .map(Some)
    }

    fn record_movement(
        &mut self,
        id: Option<&EntityId>,
        product_id: &EntityId,
        quantity: Decimal,
        kind: MovementType,
        reference: Option<&str>,
        count: bool,
    ) -> Result<Value> {
        if let Some(reference) = reference {
            possync_core::entity::check_text("reference", reference, possync_core::entity::REFERENCE_CHARS)?;
        }
        let quantity = decimal::parse(&quantity.to_string())
            .map_err(|err| StoreError::invalid("quantity", err.to_string()))?;
        let created_at = self.now_rfc3339();
        self.write(true, |store| {
            if !store.is_live(EntityKind::Product, product_id)? {
                return Err(StoreError::not_found(EntityKind::Product, product_id));
            }
            let movement = StockMovement {
                id: id.cloned().unwrap_or_else(|| store.new_id()),
                product_id: product_id.clone(),
                kind,
                quantity,
                reference: reference.map(str::to_string),
                pos_id: store.identity.pos_id.clone(),
                created_at,
            };
            let body = ChangeBody::Movement { count, movement: movement.clone() };
            store.emit_local(EntityKind::Stock, &movement.id, body, &Default::default(), None)?;
            store.insert_movement(&movement)?;
            Ok(movement_json(&movement))
        })
    }

    /// Prices one requested line from the catalog.
    fn price_line(&self, line: &SaleLineRequest) -> Result<TicketLine> {
        if line.quantity <= Decimal::ZERO {
            return Err(StoreError::invalid("quantity", "must be positive"));
        }
        let product = self.live_record(EntityKind::Product, &line.product_id).map_err(|_| {
            StoreError::invalid("productId", format!("product {} does not exist", line.product_id))
        })?;
        let amount = |name: &str| -> Decimal {
            product
                .values
                .get(name)
                .and_then(Value::as_str)
                .and_then(|raw| decimal::parse(raw).ok())
                .unwrap_or_default()
        };
        let text =
            |name: &str| product.values.get(name).and_then(Value::as_str).unwrap_or_default().to_string();
        // In a chain, the head office may set this store's own price (`storePrices`).
        let catalog_price = || {
            self.identity
                .chain_store
                .as_deref()
                .and_then(|store| possync_core::entity::store_price(product.values.get("storePrices"), store))
                .unwrap_or_else(|| amount("price"))
        };
        let unit_price = line.unit_price.unwrap_or_else(catalog_price);
        if unit_price.is_sign_negative() && !unit_price.is_zero() {
            return Err(StoreError::invalid("unitPrice", "must not be negative"));
        }
        let discount_rate = line.discount_rate.unwrap_or_else(|| amount("discountRate"));
        if discount_rate < Decimal::ZERO || discount_rate > Decimal::ONE {
            return Err(StoreError::invalid("discountRate", "must be between 0 and 1"));
        }
        let gross = checked(line.quantity.checked_mul(unit_price))?;
        let discount_amount = money(checked(gross.checked_mul(discount_rate))?);
        Ok(TicketLine {
            product_id: line.product_id.clone(),
            product_name: text("name"),
            product_sku: text("sku"),
            quantity: line.quantity.normalize(),
            unit_price: unit_price.normalize(),
            discount_rate: discount_rate.normalize(),
            discount_amount,
            total_amount: (gross - discount_amount).normalize(),
        })
    }

    pub(crate) fn next_ticket_number(&mut self) -> Result<String> {
        let counter: u64 =
            meta::node_value(&self.conn, "ticket_counter")?.and_then(|raw| raw.parse().ok()).unwrap_or(0) + 1;
        meta::set_node_value(&self.conn, "ticket_counter", &counter.to_string())?;
        Ok(match &self.identity.chain_store {
            // In a chain: `<store>-<till>-<counter>`, unique across every store's tills.
            Some(store) => format!("{store}-{}-{counter:06}", self.identity.ticket_prefix),
            None => format!("{}-{counter:06}", self.identity.ticket_prefix),
        })
    }

    pub(crate) fn ticket_exists(&self, id: &EntityId) -> Result<bool> {
        Ok(self
            .conn
            .prepare_cached("SELECT 1 FROM tickets WHERE id = ?1")?
            .query_row([id.as_str()], |_| Ok(()))
            .optional()?
            .is_some())
    }

    /// Quantity sold minus quantity already returned, per product, for a ticket.
    pub(crate) fn refundable(&self, id: &EntityId) -> Result<BTreeMap<EntityId, Decimal>> {
        let mut left: BTreeMap<EntityId, Decimal> = BTreeMap::new();
        let mut statement = self.conn.prepare_cached(
            "SELECT product_id, quantity FROM stock_movements WHERE reference = ?1 AND type IN ('sale', 'return')",
        )?;
        for row in statement
            .query_map([id.as_str()], |row| Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?)))?
        {
            let (product, quantity) = row?;
            let product = EntityId::parse(product).map_err(|err| StoreError::Corrupt(err.to_string()))?;
            let quantity =
                decimal::parse_stored(&quantity).map_err(|err| StoreError::Corrupt(err.to_string()))?;
            // Sale movements are negative, returns positive: what is left is minus the sum.
            *left.entry(product).or_insert(Decimal::ZERO) -= quantity;
        }
        Ok(left)
    }

    /// Inserts a sale's facts (ticket, lines, payments, movements). The ticket must be new.
    pub(crate) fn insert_sale(&mut self, sale: &Sale, state: &RecordState) -> Result<()> {
        let meta = meta::encode(EntityKind::Ticket, state, &mut self.origins, &self.conn)?;
        self.conn
            .prepare_cached(
                "INSERT INTO tickets (id, ticket_number, pos_id, customer_id, subtotal, discount_amount, total_amount,
                                      status, notes, created_at, updated_at, sync_meta, cash_session_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            )?
            .execute(params![
                sale.id.as_str(),
                sale.ticket_number,
                sale.pos_id.as_str(),
                sale.customer_id.as_ref().map(EntityId::as_str),
                decimal::to_text(sale.subtotal),
                decimal::to_text(sale.discount_amount),
                decimal::to_text(sale.total_amount),
                state.values.get("status").and_then(Value::as_str).unwrap_or("completed"),
                state.values.get("notes").and_then(Value::as_str),
                sale.created_at,
                state.updated_at(),
                meta,
                sale.cash_session_id.as_ref().map(EntityId::as_str),
            ])?;
        for (line_no, line) in sale.lines.iter().enumerate() {
            self.conn
                .prepare_cached(
                    "INSERT INTO ticket_lines (ticket_id, line_no, product_id, product_name, product_sku, quantity,
                                               unit_price, discount_rate, discount_amount, total_amount)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                )?
                .execute(params![
                    sale.id.as_str(),
                    line_no as i64,
                    line.product_id.as_str(),
                    line.product_name,
                    line.product_sku,
                    decimal::to_text(line.quantity),
                    decimal::to_text(line.unit_price),
                    decimal::to_text(line.discount_rate),
                    decimal::to_text(line.discount_amount),
                    decimal::to_text(line.total_amount),
                ])?;
        }
        for (line_no, payment) in sale.payments.iter().enumerate() {
            self.conn
                .prepare_cached(
                    "INSERT INTO ticket_payments (ticket_id, line_no, method, amount, reference)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )?
                .execute(params![
                    sale.id.as_str(),
                    line_no as i64,
                    payment.method.as_str(),
                    decimal::to_text(payment.amount),
                    payment.reference,
                ])?;
        }
        for movement in &sale.movements {
            self.insert_movement(movement)?;
        }
        Ok(())
    }

    /// Inserts a stock movement once (by id) and adds it to the product's cached stock.
    /// Returns false when it was already there.
    pub(crate) fn insert_movement(&mut self, movement: &StockMovement) -> Result<bool> {
        let inserted = self
            .conn
            .prepare_cached(
                "INSERT OR IGNORE INTO stock_movements (id, product_id, type, quantity, reference, pos_id, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                movement.id.as_str(),
                movement.product_id.as_str(),
                movement.kind.as_str(),
                decimal::to_text(movement.quantity),
                movement.reference,
                movement.pos_id.as_str(),
                movement.created_at,
            ])?;
        if inserted == 0 {
            return Ok(false);
        }
        let stock: Option<String> = self
            .conn
            .prepare_cached("SELECT stock FROM products WHERE id = ?1")?
            .query_row([movement.product_id.as_str()], |row| row.get(0))
            .optional()?;
        if let Some(stock) = stock {
            let stock = decimal::parse_stored(&stock)
                .map_err(|err| StoreError::Corrupt(format!("products.stock: {err}")))?;
            self.conn.prepare_cached("UPDATE products SET stock = ?2 WHERE id = ?1")?.execute(params![
                movement.product_id.as_str(),
                decimal::to_text(checked(stock.checked_add(movement.quantity))?)
            ])?;
        }
        Ok(true)
    }

    /// The ticket as the API shows it (from the writer connection).
    pub(crate) fn ticket_json(&self, id: &EntityId) -> Result<Value> {
        crate::reader::ticket_json(&self.conn, id)?
            .ok_or_else(|| StoreError::not_found(EntityKind::Ticket, id))
    }
}

/// The mutable part of a freshly sold ticket.
pub(crate) fn sale_state(
    sale: &Sale,
    version: possync_core::Version,
    ctx: possync_core::VersionVector,
) -> RecordState {
    let mut state = RecordState { ctx, existence: Some(version.clone()), ..RecordState::default() };
    state.values.insert("status", json!(TicketStatus::Completed.as_str()));
    state.versions.insert("status", version.clone());
    if let Some(notes) = &sale.notes {
        state.values.insert("notes", json!(notes));
        state.versions.insert("notes", version);
    }
    state
}

/// A movement as the API shows it.
pub(crate) fn movement_json(movement: &StockMovement) -> Value {
    serde_json::to_value(movement).unwrap_or(Value::Null)
}
