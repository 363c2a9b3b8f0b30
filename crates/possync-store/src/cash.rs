//! Cash sessions and Z reports: what a till's drawer held, and the day's totals.
//!
//! A cash session is a record of the till that opened it (POSPlus `cash_sessions`): opened
//! with the float (`openingCash`), closed with the cash counted in the drawer. At the close
//! the till computes, from what it holds, the cash it expected and the difference, and
//! writes the session's Z report (POSPlus `z_reports`) in the same transaction: one change
//! creating the report, one closing the session. A Z report is never edited afterwards (the
//! wire refuses `update`/`delete` of one, see [`EntityKind::allows_record_action`]), so every
//! till holds the same end-of-day figures.
//!
//! Only the till that opened a session writes it (a session is that till's drawer), and it
//! holds at most one open session. Every sale made while one is open records it
//! (`tickets.cash_session_id`); with `pos_require_cash_session` a sale without one is
//! refused. The rules for change and refunds are in docs/DESIGN.md, "Cash sessions".

use std::collections::BTreeMap;

use possync_core::entity::{self, FieldMap, PaymentMethod};
use possync_core::{EntityId, EntityKind, RecordState, decimal};
use rusqlite::{Connection, OptionalExtension, params};
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::{CashSessionError, Result, StoreError};
use crate::meta::Origins;
use crate::reader::{DayQuery, paging};
use crate::{Store, StoreReader, records};

/// Opening a cash session, as the till asks for it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OpenCashSession {
    /// The session's id; a UUIDv7 when absent (a till re-sending after a lost answer
    /// chooses it).
    #[serde(default)]
    pub id: Option<EntityId>,
    /// The float put in the drawer (at least 0).
    #[serde(with = "decimal::json")]
    pub opening_cash: Decimal,
    /// The cashier account opening it, if the till has accounts.
    #[serde(default)]
    pub opened_by: Option<EntityId>,
    /// Free text.
    #[serde(default)]
    pub notes: Option<String>,
}

/// Closing a cash session, as the till asks for it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CloseCashSession {
    /// The cash counted in the drawer (at least 0).
    #[serde(with = "decimal::json")]
    pub counted_cash: Decimal,
    /// The cashier account closing it.
    #[serde(default)]
    pub closed_by: Option<EntityId>,
    /// Free text (replaces the session's notes when given).
    #[serde(default)]
    pub notes: Option<String>,
}

/// The figures of a session so far: what its Z report says when it closes now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionTotals {
    /// Tickets sold in the session (whatever became of them later).
    pub ticket_count: i64,
    /// Sum of their totals.
    pub total_sales: Decimal,
    /// Sum of their discounts.
    pub total_discount: Decimal,
    /// What they took per payment method; cash net of the change given back.
    pub by_method: BTreeMap<PaymentMethod, Decimal>,
    /// Value of the goods returned at this till during the session (refunds and cancels).
    pub total_refunds: Decimal,
    /// The part of those refunds paid back from the drawer.
    pub cash_refunded: Decimal,
    /// Float + cash taken - cash refunded.
    pub expected_cash: Decimal,
}

impl SessionTotals {
    /// The totals as Z report fields (without session, till, user, dates and count).
    fn report_fields(&self, opening_cash: Decimal) -> Value {
        let method = |method| decimal::to_text(self.by_method.get(&method).copied().unwrap_or_default());
        json!({
            "ticketCount": self.ticket_count,
            "totalSales": decimal::to_text(self.total_sales),
            "totalDiscount": decimal::to_text(self.total_discount),
            "totalRefunds": decimal::to_text(self.total_refunds),
            "totalCash": method(PaymentMethod::Cash),
            "totalCard": method(PaymentMethod::Card),
            "totalTransfer": method(PaymentMethod::Transfer),
            "totalCheck": method(PaymentMethod::Check),
            "totalOther": method(PaymentMethod::Other),
            "openingCash": decimal::to_text(opening_cash),
            "expectedCash": decimal::to_text(self.expected_cash),
        })
    }
}

fn money(value: Decimal) -> Decimal {
    value.round_dp(2).normalize()
}

fn stored_decimal(column: &str, raw: &str) -> Result<Decimal> {
    decimal::parse_stored(raw).map_err(|err| StoreError::Corrupt(format!("{column}: {err}")))
}

fn overflow() -> StoreError {
    StoreError::invalid("amount", "too large")
}

/// The id of the open session of till `pos_id`, if it has one.
pub(crate) fn open_session_of(conn: &Connection, pos_id: &str) -> Result<Option<EntityId>> {
    let id: Option<String> = conn
        .prepare_cached(
            "SELECT id FROM cash_sessions WHERE pos_id = ?1 AND status = 'open' AND deleted = 0
             ORDER BY opened_at DESC, id DESC LIMIT 1",
        )?
        .query_row([pos_id], |row| row.get(0))
        .optional()?;
    id.map(|id| EntityId::parse(id).map_err(|err| StoreError::Corrupt(err.to_string()))).transpose()
}

/// The totals of session `id` of till `pos_id`, opened at `opened_at` with `opening_cash`,
/// as they stand at `until` (RFC 3339).
pub(crate) fn session_totals(
    conn: &Connection,
    id: &EntityId,
    pos_id: &str,
    opened_at: &str,
    opening_cash: Decimal,
    until: &str,
) -> Result<SessionTotals> {
    let mut totals = SessionTotals::default();
    // What each ticket of the session took in cash (net of change), for refunds below.
    let mut cash_taken: BTreeMap<String, Decimal> = BTreeMap::new();
    let tickets: Vec<(String, String, String)> = conn
        .prepare_cached("SELECT id, total_amount, discount_amount FROM tickets WHERE cash_session_id = ?1")?
        .query_map([id.as_str()], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
        .collect::<rusqlite::Result<_>>()?;
    for (ticket, total, discount) in tickets {
        let total = stored_decimal("tickets.total_amount", &total)?;
        totals.ticket_count += 1;
        totals.total_sales = totals.total_sales.checked_add(total).ok_or_else(overflow)?;
        totals.total_discount = totals
            .total_discount
            .checked_add(stored_decimal("tickets.discount_amount", &discount)?)
            .ok_or_else(overflow)?;
        let payments: Vec<(String, String)> = conn
            .prepare_cached(
                "SELECT method, amount FROM ticket_payments WHERE ticket_id = ?1 ORDER BY line_no",
            )?
            .query_map([ticket.as_str()], |row| Ok((row.get(0)?, row.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        let mut paid = BTreeMap::<PaymentMethod, Decimal>::new();
        let mut paid_total = Decimal::ZERO;
        for (method, amount) in payments {
            let method: PaymentMethod =
                method.parse().map_err(|_| StoreError::Corrupt(format!("payment method {method:?}")))?;
            let amount = stored_decimal("ticket_payments.amount", &amount)?;
            *paid.entry(method).or_default() += amount;
            paid_total = paid_total.checked_add(amount).ok_or_else(overflow)?;
        }
        // Payments cover at least the total; the excess was handed back as change, in cash.
        let change = (paid_total - total).max(Decimal::ZERO);
        if let Some(cash) = paid.get_mut(&PaymentMethod::Cash) {
            *cash = (*cash - change).max(Decimal::ZERO);
            cash_taken.insert(ticket, *cash);
        }
        for (method, amount) in paid {
            let sum = totals.by_method.entry(method).or_default();
            *sum = sum.checked_add(amount).ok_or_else(overflow)?;
        }
    }
    // Goods returned at this till while the session was open: each valued at its line's net
    // unit price, paid back from the drawer up to what its ticket took in cash.
    let returns: Vec<(String, String, String)> = conn
        .prepare_cached(
            "SELECT reference, product_id, quantity FROM stock_movements
             WHERE type = 'return' AND pos_id = ?1 AND created_at >= ?2 AND created_at <= ?3
               AND reference IS NOT NULL",
        )?
        .query_map(params![pos_id, opened_at, until], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut refunded: BTreeMap<String, Decimal> = BTreeMap::new();
    for (ticket, product, quantity) in returns {
        let quantity = stored_decimal("stock_movements.quantity", &quantity)?;
        let lines: Vec<(String, String)> = conn
            .prepare_cached(
                "SELECT quantity, total_amount FROM ticket_lines WHERE ticket_id = ?1 AND product_id = ?2",
            )?
            .query_map([ticket.as_str(), product.as_str()], |row| Ok((row.get(0)?, row.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        let (mut sold, mut value) = (Decimal::ZERO, Decimal::ZERO);
        for (line_quantity, line_total) in lines {
            sold += stored_decimal("ticket_lines.quantity", &line_quantity)?;
            value += stored_decimal("ticket_lines.total_amount", &line_total)?;
        }
        if sold.is_zero() {
            continue;
        }
        let unit = value.checked_div(sold).ok_or_else(overflow)?;
        let amount = money(unit.checked_mul(quantity).ok_or_else(overflow)?);
        *refunded.entry(ticket).or_default() += amount;
    }
    for (ticket, amount) in refunded {
        totals.total_refunds = totals.total_refunds.checked_add(amount).ok_or_else(overflow)?;
        let cash = match cash_taken.get(&ticket) {
            Some(cash) => *cash,
            // A ticket of an earlier session: what it took in cash, net of change.
            None => ticket_cash(conn, &ticket)?,
        };
        totals.cash_refunded += amount.min(cash);
    }
    let cash_in = totals.by_method.get(&PaymentMethod::Cash).copied().unwrap_or_default();
    totals.expected_cash = opening_cash
        .checked_add(cash_in)
        .and_then(|sum| sum.checked_sub(totals.cash_refunded))
        .ok_or_else(overflow)?;
    Ok(totals)
}

/// What a ticket took in cash, net of the change handed back.
fn ticket_cash(conn: &Connection, ticket: &str) -> Result<Decimal> {
    let row: Option<(String, Option<String>, Option<String>)> = conn
        .prepare_cached(
            "SELECT t.total_amount,
                    (SELECT group_concat(amount, ' ') FROM ticket_payments WHERE ticket_id = t.id AND method = 'cash'),
                    (SELECT group_concat(amount, ' ') FROM ticket_payments WHERE ticket_id = t.id)
             FROM tickets t WHERE t.id = ?1",
        )?
        .query_row([ticket], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
        .optional()?;
    let Some((total, cash, all)) = row else { return Ok(Decimal::ZERO) };
    let sum = |list: Option<String>| -> Result<Decimal> {
        let mut sum = Decimal::ZERO;
        for amount in list.unwrap_or_default().split_whitespace() {
            sum += stored_decimal("ticket_payments.amount", amount)?;
        }
        Ok(sum)
    };
    let (cash, all) = (sum(cash)?, sum(all)?);
    let change = (all - stored_decimal("tickets.total_amount", &total)?).max(Decimal::ZERO);
    Ok((cash - change).max(Decimal::ZERO))
}

impl Store {
    /// Opens a cash session on this till with its float. Refused when one is open already.
    /// Returns the session as the API shows it.
    pub fn open_cash_session(&mut self, request: &OpenCashSession) -> Result<Value> {
        let id = match &request.id {
            Some(id) => id.clone(),
            None => self.new_id(),
        };
        let mut body = json!({
            "posId": self.identity.pos_id.as_str(),
            "openingCash": decimal::to_text(request.opening_cash),
            "openedAt": self.now_rfc3339(),
            "status": "open",
            "openedBy": request.opened_by.as_ref().map(EntityId::as_str),
        });
        if let Some(notes) = &request.notes {
            body["notes"] = json!(notes);
        }
        let fields = entity::parse_fields(EntityKind::CashSession, &body)?;
        entity::check_required(EntityKind::CashSession, &fields)?;
        self.write(true, |store| {
            if records::load(&store.conn, &store.origins, EntityKind::CashSession, &id)?.is_some() {
                return Err(StoreError::AlreadyExists { kind: EntityKind::CashSession, id: id.clone() });
            }
            if let Some(open) = open_session_of(&store.conn, store.identity.pos_id.as_str())? {
                return Err(CashSessionError::AlreadyOpen(open).into());
            }
            store.check_user("openedBy", request.opened_by.as_ref())?;
            store.write_fields(EntityKind::CashSession, &id, RecordState::default(), fields, true)
        })
    }

    /// Closes this till's cash session `id` with the cash counted: computes the expected
    /// cash and the difference and writes the session's Z report, in one transaction.
    /// Returns `{"session": ..., "zReport": ...}` as the API shows them.
    pub fn close_cash_session(&mut self, id: &EntityId, request: &CloseCashSession) -> Result<Value> {
        let counted = entity::parse_fields(
            EntityKind::CashSession,
            &json!({"countedCash": decimal::to_text(request.counted_cash), "notes": request.notes}),
        )?;
        let now = self.now_rfc3339();
        self.write(true, |store| {
            let state = store.live_record(EntityKind::CashSession, id)?;
            let text =
                |name: &str| state.values.get(name).and_then(Value::as_str).unwrap_or_default().to_string();
            let pos_id = text("posId");
            if pos_id != store.identity.pos_id.as_str() {
                return Err(CashSessionError::OtherTill { id: id.clone(), pos_id }.into());
            }
            if text("status") != "open" {
                return Err(CashSessionError::Closed(id.clone()).into());
            }
            store.check_user("closedBy", request.closed_by.as_ref())?;
            let opening_cash = stored_decimal("cash_sessions.opening_cash", &text("openingCash"))?;
            let totals = session_totals(&store.conn, id, &pos_id, &text("openedAt"), opening_cash, &now)?;
            let difference = request.counted_cash.checked_sub(totals.expected_cash).ok_or_else(overflow)?;

            let report_id = store.new_id();
            let mut report = totals.report_fields(opening_cash);
            let user = request.closed_by.as_ref().map(EntityId::as_str);
            for (name, value) in [
                ("sessionId", json!(id.as_str())),
                ("posId", json!(pos_id)),
                ("userId", json!(user)),
                ("reportDate", json!(&now[..10])),
                ("countedCash", json!(decimal::to_text(request.counted_cash))),
                ("difference", json!(decimal::to_text(difference))),
                ("createdAt", json!(now)),
            ] {
                report[name] = value;
            }
            let report = entity::parse_fields(EntityKind::ZReport, &report)?;
            entity::check_required(EntityKind::ZReport, &report)?;
            let report =
                store.write_fields(EntityKind::ZReport, &report_id, RecordState::default(), report, true)?;

            let mut closing: FieldMap = counted.clone();
            if request.notes.is_none() {
                closing.remove("notes");
            }
            for (name, value) in [
                ("status", json!("closed")),
                ("closedAt", json!(now)),
                ("closedBy", json!(user)),
                ("expectedCash", json!(decimal::to_text(totals.expected_cash))),
                ("difference", json!(decimal::to_text(difference))),
                ("zReportId", json!(report_id.as_str())),
            ] {
                if let Some(spec) = EntityKind::CashSession.field(name) {
                    closing.insert(spec.name, spec.canonicalize(value)?);
                }
            }
            let session = store.write_fields(EntityKind::CashSession, id, state, closing, false)?;
            Ok(json!({"session": session, "zReport": report}))
        })
    }

    /// The open cash session of this till, if any (what a sale records).
    pub fn open_cash_session_id(&self) -> Result<Option<EntityId>> {
        open_session_of(&self.conn, self.identity.pos_id.as_str())
    }

    /// `user`, when given, must be a live cashier account.
    fn check_user(&self, field: &str, user: Option<&EntityId>) -> Result<()> {
        match user {
            Some(user) if !self.is_live(EntityKind::User, user)? => {
                Err(StoreError::invalid(field, format!("user {user} does not exist")))
            }
            _ => Ok(()),
        }
    }
}

/// Filters for lists of cash sessions.
#[derive(Debug, Clone, Default)]
pub struct SessionQuery {
    /// Sessions of this till only.
    pub pos_id: Option<String>,
    /// `open` or `closed` only.
    pub status: Option<String>,
    /// At most this many (default 100, at most 1000).
    pub limit: Option<u32>,
    /// Skip this many.
    pub offset: Option<u32>,
}

impl StoreReader {
    /// Cash sessions, newest first.
    pub fn list_cash_sessions(&self, query: &SessionQuery) -> Result<Vec<Value>> {
        let (limit, offset) = paging(query.limit, query.offset);
        self.records_by(
            EntityKind::CashSession,
            "SELECT id FROM cash_sessions WHERE deleted = 0 AND (?1 IS NULL OR pos_id = ?1)
               AND (?2 IS NULL OR status = ?2) ORDER BY opened_at DESC, id DESC LIMIT ?3 OFFSET ?4",
            params![query.pos_id, query.status, limit, offset],
        )
    }

    /// Z reports, newest first.
    pub fn list_z_reports(&self, query: &DayQuery) -> Result<Vec<Value>> {
        let (limit, offset) = paging(query.limit, query.offset);
        self.records_by(
            EntityKind::ZReport,
            "SELECT id FROM z_reports WHERE deleted = 0 AND (?1 IS NULL OR report_date = ?1)
               AND (?2 IS NULL OR pos_id = ?2) ORDER BY created_at DESC, id DESC LIMIT ?3 OFFSET ?4",
            params![query.day, query.pos_id, limit, offset],
        )
    }

    /// The open session of till `pos_id` with its figures so far (`totals`: what its Z
    /// report would say if it closed now), or `None`.
    pub fn current_cash_session(&self, pos_id: &str, now: &str) -> Result<Option<Value>> {
        let Some(id) = open_session_of(&self.conn, pos_id)? else { return Ok(None) };
        let origins = Origins::load(&self.conn)?;
        let Some(state) = records::load(&self.conn, &origins, EntityKind::CashSession, &id)? else {
            return Ok(None);
        };
        let text =
            |name: &str| state.values.get(name).and_then(Value::as_str).unwrap_or_default().to_string();
        let opening_cash = stored_decimal("cash_sessions.opening_cash", &text("openingCash"))?;
        let totals = session_totals(&self.conn, &id, pos_id, &text("openedAt"), opening_cash, now)?;
        let mut session = records::api_json(EntityKind::CashSession, &id, &state, None);
        let mut figures = totals.report_fields(opening_cash);
        if let Value::Object(figures) = &mut figures {
            for value in figures.values_mut() {
                if let Value::String(text) = value
                    && let Ok(amount) = decimal::parse(text)
                {
                    *value = decimal::to_json(amount);
                }
            }
        }
        session["totals"] = figures;
        Ok(Some(session))
    }

    fn records_by<P: rusqlite::Params>(&self, kind: EntityKind, sql: &str, params: P) -> Result<Vec<Value>> {
        let ids: Vec<String> = self
            .conn
            .prepare_cached(sql)?
            .query_map(params, |row| row.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let id = EntityId::parse(id).map_err(|err| StoreError::Corrupt(err.to_string()))?;
            out.extend(self.record(kind, &id)?);
        }
        Ok(out)
    }
}
