//! Cash sessions and Z reports on real SQLite files: open, sell, refund, close; the figures;
//! the drawer's rules; and every till ending with the same sessions and reports.

mod common;

use common::{ManualClock, sync, terminal};
use possync_core::entity::{MovementType, PaymentMethod};
use possync_core::{EntityId, EntityKind, WireChange};
use possync_store::{
    CashSessionError, CloseCashSession, OpenCashSession, PaymentRequest, RefundLine, SaleLineRequest,
    SaleRequest, SessionQuery, StoreError,
};
use rust_decimal::Decimal;
use serde_json::{Value, json};

fn dec(raw: &str) -> Decimal {
    raw.parse().unwrap()
}

fn id(raw: &str) -> EntityId {
    EntityId::parse(raw).unwrap()
}

fn sale(quantity: &str, payments: &[(PaymentMethod, &str)]) -> SaleRequest {
    SaleRequest {
        id: None,
        customer_id: None,
        lines: vec![SaleLineRequest {
            product_id: id("tea"),
            quantity: dec(quantity),
            unit_price: None,
            discount_rate: None,
        }],
        payments: payments
            .iter()
            .map(|(method, amount)| PaymentRequest { method: *method, amount: dec(amount), reference: None })
            .collect(),
        notes: None,
    }
}

fn open(float: &str) -> OpenCashSession {
    OpenCashSession { id: None, opening_cash: dec(float), opened_by: None, notes: None }
}

fn close(counted: &str) -> CloseCashSession {
    CloseCashSession { counted_cash: dec(counted), closed_by: None, notes: None }
}

fn shop(dir: &tempfile::TempDir, clock: &ManualClock) -> (common::Terminal, common::Terminal) {
    let mut a = terminal(dir, "a", clock, 0);
    let b = terminal(dir, "b", clock, 0);
    a.store
        .create_record(
            EntityKind::Product,
            &json!({"id": "tea", "sku": "T1", "name": "Tea", "price": "2.50"}),
        )
        .unwrap();
    a.store.adjust_stock(&id("tea"), dec("100"), MovementType::In, None).unwrap();
    (a, b)
}

#[test]
fn a_session_counts_its_sales_change_and_refunds_and_its_z_report_reaches_every_till() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_700_000_000_000);
    let (mut a, mut b) = shop(&dir, &clock);
    sync(&mut a, &mut b, 100);

    let before = a.store.record_sale(&sale("1", &[(PaymentMethod::Cash, "2.5")])).unwrap();
    assert_eq!(before["cashSessionId"], Value::Null, "no session open: the sale records none");

    clock.advance(1000);
    let session = a.store.open_cash_session(&open("100")).unwrap();
    let session_id = id(session["id"].as_str().unwrap());
    assert_eq!((session["status"].clone(), session["openingCash"].clone()), (json!("open"), json!(100.0)));
    assert!(matches!(
        a.store.open_cash_session(&open("5")),
        Err(StoreError::CashSession(CashSessionError::AlreadyOpen(open))) if open == session_id
    ));

    clock.advance(1000);
    // 4 teas (10.00) paid with 20 in cash: 10 change handed back.
    let cash = a.store.record_sale(&sale("4", &[(PaymentMethod::Cash, "20")])).unwrap();
    assert_eq!(cash["cashSessionId"], json!(session_id.as_str()));
    // 2 teas (5.00) by card.
    a.store.record_sale(&sale("2", &[(PaymentMethod::Card, "5")])).unwrap();
    // 3 teas (7.50): 2.50 cash, 5.00 card; then 2 of them refunded: 5.00 back, 2.50 from
    // the drawer (what the ticket took in cash) and the rest to the card.
    let mixed =
        a.store.record_sale(&sale("3", &[(PaymentMethod::Cash, "2.5"), (PaymentMethod::Card, "5")])).unwrap();
    clock.advance(1000);
    a.store
        .refund_ticket(
            &id(mixed["id"].as_str().unwrap()),
            Some(&[RefundLine { product_id: id("tea"), quantity: dec("2") }]),
            None,
        )
        .unwrap();
    // The sale made before the session was opened, refunded now: its 2.50 cash leaves the
    // drawer of the session open now.
    a.store.cancel_ticket(&id(before["id"].as_str().unwrap()), Some("wrong tea")).unwrap();

    let now = possync_core::time::rfc3339_ms(clock.0.load(std::sync::atomic::Ordering::SeqCst));
    let current = a.store.reader().unwrap().current_cash_session(a.pos_id().as_str(), &now).unwrap().unwrap();
    // 100 float + 10 (cash sale) + 2.5 (mixed) - 2.5 (mixed refund) - 2.5 (cancel) = 107.5
    assert_eq!(current["totals"]["expectedCash"], json!(107.5), "{current}");

    clock.advance(1000);
    let closed = a.store.close_cash_session(&session_id, &close("107")).unwrap();
    let (session, report) = (&closed["session"], &closed["zReport"]);
    assert_eq!(session["status"], json!("closed"));
    assert_eq!(session["expectedCash"], json!(107.5));
    assert_eq!(session["countedCash"], json!(107.0));
    assert_eq!(session["difference"], json!(-0.5));
    assert_eq!(session["zReportId"], report["id"]);
    assert_eq!(report["sessionId"], json!(session_id.as_str()));
    assert_eq!(report["ticketCount"], json!(3));
    assert_eq!(report["totalSales"], json!(22.5));
    assert_eq!(report["totalCash"], json!(12.5), "cash net of the change handed back");
    assert_eq!(report["totalCard"], json!(10.0));
    assert_eq!(report["totalRefunds"], json!(7.5));
    assert_eq!(report["difference"], json!(-0.5));
    assert_eq!(report["reportDate"], json!("2023-11-14"));

    // The drawer's rules: closed once, a new session may open after.
    assert!(matches!(
        a.store.close_cash_session(&session_id, &close("1")),
        Err(StoreError::CashSession(CashSessionError::Closed(_)))
    ));
    let changes = a.count("SELECT COUNT(*) FROM sync_changes");
    assert!(a.store.delete_record(EntityKind::CashSession, &session_id).is_err());
    let report_id = id(report["id"].as_str().unwrap());
    assert!(a.store.update_record(EntityKind::ZReport, &report_id, &json!({"totalCash": 1})).is_err());
    assert_eq!(a.count("SELECT COUNT(*) FROM sync_changes"), changes, "refused calls write nothing");

    // Every till holds the same sessions and reports; only the till that opened one closes it.
    let report_sync = sync(&mut a, &mut b, 100);
    assert_eq!(report_sync.errors, 0);
    assert_eq!(a.dump(), b.dump());
    let reader = b.store.reader().unwrap();
    let reports = reader.list_z_reports(&possync_store::reader::DayQuery {
        day: Some("2023-11-14".into()),
        ..Default::default()
    });
    assert_eq!(reports.unwrap(), vec![report.clone()]);
    let sessions =
        reader.list_cash_sessions(&SessionQuery { status: Some("closed".into()), ..Default::default() });
    assert_eq!(sessions.unwrap().len(), 1);
    let second = a.store.open_cash_session(&open("50")).unwrap();
    sync(&mut a, &mut b, 100);
    assert!(matches!(
        b.store.close_cash_session(&id(second["id"].as_str().unwrap()), &close("50")),
        Err(StoreError::CashSession(CashSessionError::OtherTill { .. }))
    ));
}

#[test]
fn a_required_session_refuses_sales_without_one_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_700_000_000_000);
    let (mut a, _) = shop(&dir, &clock);
    a.store.set_setting("pos_require_cash_session", "true").unwrap();
    let tickets = a.count("SELECT COUNT(*) FROM tickets");
    assert!(matches!(
        a.store.record_sale(&sale("1", &[(PaymentMethod::Cash, "2.5")])),
        Err(StoreError::CashSession(CashSessionError::NoneOpen))
    ));
    assert_eq!(a.count("SELECT COUNT(*) FROM tickets"), tickets);
    let session = a.store.open_cash_session(&open("0")).unwrap();
    let ticket = a.store.record_sale(&sale("1", &[(PaymentMethod::Cash, "2.5")])).unwrap();
    assert_eq!(ticket["cashSessionId"], session["id"]);
    // Bad input: a negative float, an unknown cashier; nothing stored.
    let bad = OpenCashSession { opening_cash: dec("-1"), ..open("0") };
    assert!(matches!(a.store.open_cash_session(&bad), Err(StoreError::Invalid(_))));
    let sessions = a.count("SELECT COUNT(*) FROM cash_sessions");
    a.store.close_cash_session(&id(session["id"].as_str().unwrap()), &close("2.5")).unwrap();
    let ghost = OpenCashSession { opened_by: Some(id("nobody")), ..open("0") };
    assert!(matches!(a.store.open_cash_session(&ghost), Err(StoreError::Invalid(_))));
    assert_eq!(a.count("SELECT COUNT(*) FROM cash_sessions"), sessions);
}

#[test]
fn a_peer_cannot_rewrite_a_z_report() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_700_000_000_000);
    let (mut a, mut b) = shop(&dir, &clock);
    let session = a.store.open_cash_session(&open("10")).unwrap();
    let closed = a.store.close_cash_session(&id(session["id"].as_str().unwrap()), &close("10")).unwrap();
    sync(&mut a, &mut b, 100);
    let dump = b.dump();
    // A forged update of the report (a change from a till of the shop, well stamped).
    let forged = WireChange::new(
        "z_report",
        "update",
        &json!({
            "id": closed["zReport"]["id"],
            "totalCash": "1000",
            "sync": {"origin": "a", "seq": 99, "ctx": {"a": 99}},
        }),
    );
    let report = b.store.apply_batch(possync_store::PeerRef { id: "x", name: "x" }, vec![forged]).unwrap();
    assert_eq!(report.applied, 0);
    assert_eq!(b.dump(), dump, "the report is unchanged");
}
