//! The store's side of the chain of stores (docs/CHAIN.md), on real files: store-prefixed
//! ticket numbers, a store's runs applied at the head office (catalog refused, origin
//! attributed to its store, stock per store), the head office's runs applied at a till with
//! the cursor in the same transaction, and per-origin selection.

mod common;

use common::{ManualClock, Terminal, terminal};
use possync_core::{EntityKind, Seq};
use rust_decimal::Decimal;
use serde_json::json;

fn sale(till: &mut Terminal, product: &str, quantity: i64) -> serde_json::Value {
    let request: possync_store::SaleRequest = serde_json::from_value(json!({
        "lines": [{"productId": product, "quantity": quantity}],
        "payments": [{"method": "cash", "amount": 100}],
    }))
    .unwrap();
    till.store.record_sale(&request).unwrap()
}

/// Everything `origin` wrote, as the uploader would send it.
fn run_of(from: &Terminal, origin: &possync_core::PosId) -> Vec<possync_core::WireChange> {
    from.store.reader().unwrap().origin_changes(origin, Seq(0), 1000).unwrap()
}

#[test]
fn a_chain_tills_ticket_numbers_start_with_its_store() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_800_000_000_000);
    let mut hq = terminal(&dir, "hq", &clock, 0);
    hq.store
        .create_record(EntityKind::Product, &json!({"id": "p1", "sku": "P1", "name": "Tea", "price": 2}))
        .unwrap();
    let mut till = terminal(&dir, "t1", &clock, 0);
    let catalog = run_of(&hq, &hq.pos_id());
    till.store.apply_chain_down("DOWN", 1, &hq.pos_id(), catalog).unwrap();
    let before = sale(&mut till, "p1", 1);
    till.store.set_chain_store(Some("s042".into()));
    let after = sale(&mut till, "p1", 1);
    let prefix = &till.store.identity().ticket_prefix;
    assert_eq!(before["ticketNumber"], format!("{prefix}-000001"));
    assert_eq!(after["ticketNumber"], format!("s042-{prefix}-000002"));
}

#[test]
fn the_head_office_applies_a_stores_runs_refuses_its_catalog_writes_and_counts_stock_per_store() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_800_000_000_000);
    let mut hq = terminal(&dir, "hq", &clock, 0);
    hq.store
        .create_record(EntityKind::Product, &json!({"id": "p1", "sku": "P1", "name": "Tea", "price": 2}))
        .unwrap();
    let catalog = run_of(&hq, &hq.pos_id());
    let mut a = terminal(&dir, "a1", &clock, 0);
    let mut b = terminal(&dir, "b1", &clock, 0);
    for till in [&mut a, &mut b] {
        let report = till.store.apply_chain_down("DOWN", 1, &hq.pos_id(), catalog.clone()).unwrap();
        // Head office's key enrollment and the product.
        assert_eq!(report.applied, 2);
        assert_eq!(till.store.reader().unwrap().chain_cursor("DOWN").unwrap(), 1);
        assert_eq!(till.store.reader().unwrap().chain_hq_origins().unwrap(), vec![hq.pos_id()]);
    }
    let p1 = possync_core::EntityId::parse("p1".to_string()).unwrap();
    a.store.adjust_stock(&p1, Decimal::from(10), possync_core::entity::MovementType::In, None).unwrap();
    sale(&mut a, "p1", 3);
    a.store.update_record(EntityKind::Product, &p1, &json!({"price": 9})).unwrap();
    sale(&mut a, "p1", 1);
    b.store.adjust_stock(&p1, Decimal::from(5), possync_core::entity::MovementType::In, None).unwrap();
    sale(&mut b, "p1", 2);

    let report = hq.store.apply_chain_batch("s1", &a.pos_id(), run_of(&a, &a.pos_id())).unwrap();
    assert_eq!(
        (report.applied, report.errors, report.gap),
        (4, 1, false),
        "the price edit refused, the rest applied"
    );
    assert_eq!(
        hq.store.summary().get(&a.pos_id()),
        Seq(5),
        "the refused change holds its seq: nothing blocked behind it"
    );
    hq.store.apply_chain_batch("s2", &b.pos_id(), run_of(&b, &b.pos_id())).unwrap();
    // Applying a run again changes nothing (at-least-once delivery).
    let again = hq.store.apply_chain_batch("s2", &b.pos_id(), run_of(&b, &b.pos_id())).unwrap();
    assert_eq!((again.applied, again.skipped), (0, 3));

    let reader = hq.store.reader().unwrap();
    assert_eq!(reader.chain_origin_store(&a.pos_id()).unwrap().as_deref(), Some("s1"));
    assert_eq!(
        reader.chain_stock("p1").unwrap(),
        json!({"productId": "p1", "stores": [{"storeId": "s1", "stock": "6"}, {"storeId": "s2", "stock": "3"}], "total": "9"})
    );
    let price: Vec<_> = hq.query("SELECT price FROM products WHERE id = 'p1'");
    assert_eq!(price, vec![json!({"price": "2"})], "HQ's price stands");
    let stores = reader.chain_stores().unwrap();
    assert_eq!(stores.len(), 2);
    assert_eq!(stores[0]["tickets"], 2);
    // Store 2's run (its till's key enrollment, a stock movement, a sale) came twice.
    assert_eq!(stores[1]["changesReceived"], 6);
    assert_eq!(stores[1]["changesApplied"], 3);
}

#[test]
fn a_head_office_run_with_a_gap_leaves_the_cursor_where_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_800_000_000_000);
    let mut hq = terminal(&dir, "hq", &clock, 0);
    for i in 0..3 {
        hq.store
            .create_record(EntityKind::Category, &json!({"id": format!("c{i}"), "name": "Drinks"}))
            .unwrap();
    }
    let mut till = terminal(&dir, "t1", &clock, 0);
    let all = run_of(&hq, &hq.pos_id());
    till.store.apply_chain_down("DOWN", 5, &hq.pos_id(), all[..1].to_vec()).unwrap();
    let report = till.store.apply_chain_down("DOWN", 9, &hq.pos_id(), all[2..].to_vec()).unwrap();
    assert!(report.gap);
    assert_eq!(till.store.reader().unwrap().chain_cursor("DOWN").unwrap(), 5, "not past the missing change");
    let report = till.store.apply_chain_down("DOWN", 9, &hq.pos_id(), all[1..].to_vec()).unwrap();
    assert_eq!((report.applied, report.gap), (3, false));
    assert_eq!(till.store.reader().unwrap().chain_cursor("DOWN").unwrap(), 9);
}
