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
    let stores = reader.chain_stores("2000-01-01").unwrap();
    assert_eq!(stores.len(), 2);
    assert_eq!(stores[0]["tickets"], 2);
    assert_eq!(stores[0]["salesPerDay"].as_array().map(Vec::len), Some(1), "{stores:?}");
    // Days before `since_day` are not listed; the ticket count is of all time.
    let later = reader.chain_stores("2100-01-01").unwrap();
    assert_eq!((later[0]["tickets"].clone(), later[0]["salesPerDay"].clone()), (json!(2), json!([])));
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

/// Applies everything the head office wrote that `till` lacks, as its downlink would.
fn down(hq: &Terminal, till: &mut Terminal) -> possync_store::ApplyReport {
    let all = run_of(hq, &hq.pos_id());
    let held = till.store.summary().get(&hq.pos_id()).0 as usize;
    till.store.apply_chain_down("DOWN", all.len() as u64, &hq.pos_id(), all[held..].to_vec()).unwrap()
}

/// Uploads everything `till` wrote to the head office, as store `store`.
fn up(till: &Terminal, store: &str, hq: &mut Terminal) -> possync_store::ApplyReport {
    hq.store.apply_chain_batch(store, &till.pos_id(), run_of(till, &till.pos_id())).unwrap()
}

fn customers(till: &Terminal) -> Vec<serde_json::Value> {
    till.query(
        "SELECT id, name, email, phone, notes, created_at, updated_at, deleted FROM customers ORDER BY id",
    )
}

fn conflicts(till: &Terminal) -> i64 {
    till.count("SELECT COUNT(*) FROM p2p_conflicts")
}

#[test]
fn a_customer_is_known_in_every_store_and_every_store_ends_with_the_same_customer() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_800_000_000_000);
    let mut hq = terminal(&dir, "hq", &clock, 0);
    hq.store.create_record(EntityKind::Category, &json!({"id": "cat", "name": "Drinks"})).unwrap();
    // Store s1 has two tills on one LAN; s2 and s3 one each.
    let mut a1 = terminal(&dir, "a1", &clock, 0);
    let mut a2 = terminal(&dir, "a2", &clock, 0);
    let mut b1 = terminal(&dir, "b1", &clock, 0);
    let mut c1 = terminal(&dir, "c1", &clock, 0);
    for (till, store) in [(&mut a1, "s1"), (&mut a2, "s1"), (&mut b1, "s2"), (&mut c1, "s3")] {
        till.store.set_chain_store(Some(store.into()));
        down(&hq, till);
    }
    let id = possync_core::EntityId::parse("cust-1".to_string()).unwrap();

    // Created in store s1: the head office re-publishes it, every store gets it.
    a1.store
        .create_record(EntityKind::Customer, &json!({"id": "cust-1", "name": "Ana", "phone": "1"}))
        .unwrap();
    up(&a1, "s1", &mut hq);
    for till in [&mut a1, &mut b1, &mut c1] {
        let report = down(&hq, till);
        assert!(!report.gap && report.errors == 0, "{}: {report:?}", till.name);
    }
    assert_eq!(customers(&b1), customers(&a1), "store s2 knows the customer created in s1");
    assert_eq!(conflicts(&a1), 0, "the copy of its own write is no conflict at the store that made it");

    // Edited in s2: s1 and s3 get the edit; s3 never held s1's till, and needs not to.
    clock.advance(1_000);
    b1.store.update_record(EntityKind::Customer, &id, &json!({"phone": "2"})).unwrap();
    up(&b1, "s2", &mut hq);
    for till in [&mut a1, &mut c1] {
        let report = down(&hq, till);
        assert!(!report.gap && report.errors == 0 && report.conflicts == 0, "{}: {report:?}", till.name);
    }
    assert_eq!(customers(&c1)[0]["phone"], "2");
    assert_eq!(customers(&a1), customers(&c1));

    // Concurrent edits in s1 and s3 (s3's later), reaching the head office in either order:
    // the later edit wins everywhere.
    clock.advance(1_000);
    a1.store.update_record(EntityKind::Customer, &id, &json!({"name": "Ana A."})).unwrap();
    clock.advance(1_000);
    c1.store.update_record(EntityKind::Customer, &id, &json!({"name": "Ana C."})).unwrap();
    up(&c1, "s3", &mut hq);
    up(&a1, "s1", &mut hq);
    for till in [&mut a1, &mut b1, &mut c1] {
        let report = down(&hq, till);
        assert!(!report.gap && report.errors == 0, "{}: {report:?}", till.name);
    }
    assert_eq!(customers(&hq)[0]["name"], "Ana C.");
    for till in [&a1, &b1, &c1] {
        assert_eq!(customers(till), customers(&hq), "{} ends with the head office's customer", till.name);
    }
    assert!(conflicts(&hq) >= 1 && conflicts(&a1) >= 1, "a real conflict is recorded");
    // What a1 reports to the head office: none open (last-write-wins decided), some today.
    let (open, last_day) = a1.store.reader().unwrap().conflict_summary().unwrap();
    assert_eq!((open, last_day), (0, conflicts(&a1) as u64));

    // The head office edits the customer: its context names store tills' writes, which
    // every store holds as copies.
    clock.advance(1_000);
    hq.store.update_record(EntityKind::Customer, &id, &json!({"notes": "VIP"})).unwrap();
    for till in [&mut a1, &mut b1, &mut c1] {
        let report = down(&hq, till);
        assert!(!report.gap && report.errors == 0 && report.conflicts == 0, "{}: {report:?}", till.name);
    }

    // The other till of store s1 learns it all over the LAN.
    let report = common::sync(&mut a1, &mut a2, 100);
    assert!(!report.gap && report.errors == 0, "{report:?}");

    // A later edit anywhere is sequential everywhere: no conflict row is added.
    let before: Vec<i64> = [&hq, &a1, &a2, &b1, &c1].iter().map(|till| conflicts(till)).collect();
    clock.advance(1_000);
    b1.store.update_record(EntityKind::Customer, &id, &json!({"email": "ana@example.com"})).unwrap();
    up(&b1, "s2", &mut hq);
    for till in [&mut a1, &mut b1, &mut c1] {
        down(&hq, till);
    }
    common::sync(&mut a1, &mut a2, 100);
    let after: Vec<i64> = [&hq, &a1, &a2, &b1, &c1].iter().map(|till| conflicts(till)).collect();
    assert_eq!(before, after, "no phantom conflict");
    for till in [&a1, &a2, &b1, &c1] {
        assert_eq!(customers(till), customers(&hq), "{} is identical to the head office", till.name);
    }
    assert_eq!(customers(&hq)[0]["email"], "ana@example.com");
    assert_eq!(customers(&hq)[0]["notes"], "VIP");
}

/// A copy of another till's write signed by `till` (what only the head office may send).
fn forged_copy(till: &Terminal, of: &Terminal) -> possync_core::WireChange {
    use possync_core::{Change, ChangeBody, CopyOf, VersionVector};
    let original = run_of(of, &of.pos_id()).pop().unwrap();
    let original = Change::from_wire(&original).unwrap();
    let seq = till.store.summary().get(&till.pos_id()).next();
    let mut ctx = VersionVector::new();
    ctx.observe(&of.pos_id(), original.seq);
    let mut fields = possync_core::FieldMap::new();
    fields.insert("name", json!("Mallory"));
    let copy = Change {
        origin: till.pos_id(),
        seq,
        hlc: original.hlc,
        ctx,
        entity: EntityKind::Customer,
        id: original.id.clone(),
        body: ChangeBody::Upsert { create: false, fields },
        copy_of: Some(CopyOf { origin: of.pos_id(), seq: original.seq }),
    };
    let mut wire = copy.to_wire();
    till.store.sign(&mut wire);
    wire
}

#[test]
fn only_the_head_office_re_publishes_another_tills_write() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_800_000_000_000);
    let mut hq = terminal(&dir, "hq", &clock, 0);
    let mut a1 = terminal(&dir, "a1", &clock, 0);
    let mut b1 = terminal(&dir, "b1", &clock, 0);
    a1.store.set_chain_store(Some("s1".into()));
    b1.store.set_chain_store(Some("s2".into()));
    a1.store.create_record(EntityKind::Customer, &json!({"id": "cust-1", "name": "Ana"})).unwrap();
    up(&a1, "s1", &mut hq);

    // A plain till (no chain) refuses the head office's copies like invalid changes.
    let lan = |from: &Terminal, to: &mut Terminal| {
        let peer = possync_store::PeerRef { id: "hq", name: "hq" };
        to.store.apply_batch(peer, run_of(from, &from.pos_id())).unwrap()
    };
    let mut plain = terminal(&dir, "plain", &clock, 0);
    let report = lan(&hq, &mut plain);
    assert_eq!(report.errors, 1, "{report:?}");
    assert!(customers(&plain).is_empty());
    assert_eq!(
        plain.count("SELECT COUNT(*) FROM p2p_sync_logs WHERE status = 'error' AND details LIKE '%not the head office%'"),
        1
    );

    // A store's till that gets the copy over the LAN before it knows the head office waits
    // for its downlink, which then applies it.
    let report = lan(&hq, &mut b1);
    assert_eq!((report.waiting, report.errors), (1, 0), "{report:?}");
    assert!(customers(&b1).is_empty());
    let report = down(&hq, &mut b1);
    assert_eq!((report.errors, report.gap), (0, false), "{report:?}");
    assert_eq!(customers(&b1)[0]["name"], "Ana");

    // A store till cannot pass its own write off as a copy: the head office refuses it.
    let forged = forged_copy(&b1, &a1);
    let report = hq.store.apply_chain_batch("s2", &b1.pos_id(), vec![forged]).unwrap();
    assert_eq!(report.errors, 1, "{report:?}");
    assert_eq!(customers(&hq)[0]["name"], "Ana");
}
