//! The store end to end on real SQLite files: local writes, validation, sync between two
//! terminals, conflicts and their audit rows.

mod common;

use common::{ManualClock, sync, terminal};
use possync_core::entity::{MovementType, PaymentMethod};
use possync_core::{EntityId, EntityKind};
use possync_store::{PaymentRequest, Resolution, SaleLineRequest, SaleRequest, Store, StoreError};
use rust_decimal::Decimal;
use serde_json::json;

fn dec(raw: &str) -> Decimal {
    raw.parse().unwrap()
}

fn id(raw: &str) -> EntityId {
    EntityId::parse(raw).unwrap()
}

fn sale(product: &str, quantity: &str, paid: &str) -> SaleRequest {
    SaleRequest {
        id: None,
        customer_id: None,
        lines: vec![SaleLineRequest {
            product_id: id(product),
            quantity: dec(quantity),
            unit_price: None,
            discount_rate: None,
        }],
        payments: vec![PaymentRequest { method: PaymentMethod::Cash, amount: dec(paid), reference: None }],
        notes: None,
    }
}

#[test]
fn init_refuses_to_overwrite_and_open_needs_init() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_700_000_000_000);
    let a = terminal(&dir, "a", &clock, 0);
    let again = Store::init(&a.path, None, "x", common::env(&clock, 0, 1));
    assert!(matches!(again, Err(StoreError::AlreadyInitialized(_))), "{again:?}");
    let missing = Store::open(&dir.path().join("none.db"), common::env(&clock, 0, 1));
    assert!(matches!(missing, Err(StoreError::NotInitialized(_))));
}

#[test]
fn local_writes_validate_and_leave_nothing_behind_when_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_700_000_000_000);
    let mut a = terminal(&dir, "a", &clock, 0);
    let tea = a
        .store
        .create_record(EntityKind::Product, &json!({"id": "tea", "sku": "T1", "name": "Tea", "price": 2.5}))
        .unwrap();
    assert_eq!(tea["price"], json!(2.5));
    assert_eq!(tea["stock"], json!(0.0));
    assert_eq!(tea["isActive"], json!(true));
    let changes_before = a.count("SELECT COUNT(*) FROM sync_changes");

    let rejected = [
        a.store
            .create_record(EntityKind::Product, &json!({"sku": "T1", "name": "Other", "price": 1}))
            .unwrap_err(),
        a.store
            .create_record(EntityKind::Product, &json!({"sku": "T2", "name": "Bad", "price": -1}))
            .unwrap_err(),
        a.store
            .create_record(
                EntityKind::Product,
                &json!({"sku": "T3", "name": "Cat", "price": 1, "categoryId": "nope"}),
            )
            .unwrap_err(),
        a.store.record_sale(&sale("unknown", "1", "10")).unwrap_err(),
        a.store.record_sale(&sale("tea", "1", "1")).unwrap_err(),
        a.store.record_sale(&SaleRequest { lines: vec![], ..sale("tea", "1", "5") }).unwrap_err(),
        a.store.update_record(EntityKind::Product, &id("ghost"), &json!({"price": 1})).unwrap_err(),
        a.store.adjust_stock(&id("tea"), dec("-1"), MovementType::In, None).unwrap_err(),
    ];
    assert!(matches!(rejected[0], StoreError::Duplicate { field: "sku", .. }), "{:?}", rejected[0]);
    assert!(matches!(rejected[1], StoreError::Invalid(_)));
    assert!(matches!(rejected[6], StoreError::NotFound { .. }));
    assert_eq!(a.count("SELECT COUNT(*) FROM sync_changes"), changes_before);
    assert_eq!(a.count("SELECT COUNT(*) FROM tickets"), 0);
    assert_eq!(a.count("SELECT COUNT(*) FROM products"), 1);
}

#[test]
fn sales_refunds_and_counts_move_stock() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_700_000_000_000);
    let mut a = terminal(&dir, "a", &clock, 0);
    a.store
        .create_record(
            EntityKind::Product,
            &json!({"id": "tea", "sku": "T1", "name": "Tea", "price": "2.50", "discountRate": 0.1}),
        )
        .unwrap();
    a.store.adjust_stock(&id("tea"), dec("10"), MovementType::In, Some("delivery 1")).unwrap();
    let ticket = a.store.record_sale(&sale("tea", "3", "10")).unwrap();
    assert_eq!(ticket["subtotal"], json!(7.5));
    assert_eq!(ticket["discountAmount"], json!(0.75));
    assert_eq!(ticket["totalAmount"], json!(6.75));
    assert_eq!(ticket["status"], json!("completed"));
    let ticket_id = id(ticket["id"].as_str().unwrap());
    assert!(ticket["ticketNumber"].as_str().unwrap().ends_with("-000001"));

    let stock = |a: &common::Terminal| {
        a.store.reader().unwrap().record(EntityKind::Product, &id("tea")).unwrap().unwrap()["stock"].clone()
    };
    assert_eq!(stock(&a), json!(7.0));
    let partial = a
        .store
        .refund_ticket(
            &ticket_id,
            Some(&[possync_store::RefundLine { product_id: id("tea"), quantity: dec("1") }]),
            Some("broken"),
        )
        .unwrap();
    assert_eq!(partial["status"], json!("partially_refunded"));
    assert_eq!(stock(&a), json!(8.0));
    assert!(
        a.store
            .refund_ticket(
                &ticket_id,
                Some(&[possync_store::RefundLine { product_id: id("tea"), quantity: dec("3") }]),
                None
            )
            .is_err()
    );
    let full = a.store.refund_ticket(&ticket_id, None, None).unwrap();
    assert_eq!(full["status"], json!("refunded"));
    assert_eq!(stock(&a), json!(10.0));
    assert!(a.store.cancel_ticket(&ticket_id, None).is_err());

    let count = a.store.count_stock(&id("tea"), dec("4"), Some("inventory")).unwrap();
    assert_eq!(count["quantity"], json!(-6.0));
    assert_eq!(stock(&a), json!(4.0));
}

#[test]
fn two_terminals_sync_both_ways_and_end_identical() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_700_000_000_000);
    let mut a = terminal(&dir, "a", &clock, 0);
    let mut b = terminal(&dir, "b", &clock, 250);
    a.store.create_record(EntityKind::Category, &json!({"id": "drinks", "name": "Drinks"})).unwrap();
    a.store
        .create_record(
            EntityKind::Product,
            &json!({"id": "tea", "sku": "T1", "name": "Tea", "price": 2.5, "categoryId": "drinks"}),
        )
        .unwrap();
    a.store.adjust_stock(&id("tea"), dec("10"), MovementType::In, None).unwrap();
    let report = sync(&mut a, &mut b, 2);
    assert_eq!((report.applied, report.conflicts, report.errors), (3, 0, 0));

    // Both sell the same product while apart: both sales count.
    clock.advance(1000);
    a.store.record_sale(&sale("tea", "2", "5")).unwrap();
    b.store.record_sale(&sale("tea", "3", "10")).unwrap();
    sync(&mut a, &mut b, 100);
    sync(&mut b, &mut a, 100);
    assert_eq!(a.dump(), b.dump());
    assert_eq!(
        a.store.reader().unwrap().record(EntityKind::Product, &id("tea")).unwrap().unwrap()["stock"],
        json!(5.0)
    );
    assert_eq!(a.count("SELECT COUNT(*) FROM p2p_conflicts"), 0);

    // Sequential edit: no conflict.
    clock.advance(1000);
    a.store.update_record(EntityKind::Product, &id("tea"), &json!({"price": 3})).unwrap();
    sync(&mut a, &mut b, 100);
    clock.advance(1000);
    b.store.update_record(EntityKind::Product, &id("tea"), &json!({"price": 4})).unwrap();
    sync(&mut b, &mut a, 100);
    assert_eq!(a.count("SELECT COUNT(*) FROM p2p_conflicts"), 0);
    assert_eq!(b.count("SELECT COUNT(*) FROM p2p_conflicts"), 0);

    // Concurrent edits of the same field: a conflict row on both sides, same winner.
    clock.advance(1000);
    a.store
        .update_record(EntityKind::Product, &id("tea"), &json!({"price": 5, "name": "Green tea"}))
        .unwrap();
    clock.advance(10);
    b.store.update_record(EntityKind::Product, &id("tea"), &json!({"price": 6})).unwrap();
    sync(&mut a, &mut b, 100);
    sync(&mut b, &mut a, 100);
    assert_eq!(a.dump(), b.dump());
    let tea = a.store.reader().unwrap().record(EntityKind::Product, &id("tea")).unwrap().unwrap();
    assert_eq!((tea["price"].clone(), tea["name"].clone()), (json!(6.0), json!("Green tea")));
    for t in [&a, &b] {
        let rows = t.query("SELECT conflict_type, resolution_strategy, resolved_by, local_data, remote_data, final_data, notes FROM p2p_conflicts");
        assert_eq!(rows.len(), 1, "{}: {rows:?}", t.name);
        assert_eq!(rows[0]["conflictType"], json!("update_conflict"));
        assert_eq!(rows[0]["resolvedBy"], json!("system"));
        assert_eq!(t.count("SELECT COUNT(*) FROM p2p_sync_logs WHERE status = 'conflict'"), 1);
    }

    // Duplicate delivery changes nothing and is logged as skipped.
    let dump = b.dump();
    let all = a.store.reader().unwrap().select_changes(&Default::default(), 0, 10_000).unwrap();
    let report = b.store.apply_batch(possync_store::PeerRef { id: "a", name: "a" }, all.changes).unwrap();
    assert_eq!(report.applied + report.conflicts, 0);
    assert_eq!(b.dump(), dump);
}

#[test]
fn delete_against_concurrent_update_and_manual_resolution() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_700_000_000_000);
    let mut a = terminal(&dir, "a", &clock, 0);
    let mut b = terminal(&dir, "b", &clock, 0);
    a.store.create_record(EntityKind::Customer, &json!({"id": "c1", "name": "Ann"})).unwrap();
    sync(&mut a, &mut b, 100);
    clock.advance(100);
    a.store.delete_record(EntityKind::Customer, &id("c1")).unwrap();
    clock.advance(100);
    b.store.update_record(EntityKind::Customer, &id("c1"), &json!({"phone": "555"})).unwrap();
    sync(&mut a, &mut b, 100);
    sync(&mut b, &mut a, 100);
    assert_eq!(a.dump(), b.dump());
    // The update is newer: the customer lives on, everywhere.
    assert!(a.store.reader().unwrap().record(EntityKind::Customer, &id("c1")).unwrap().is_some());
    assert_eq!(a.count("SELECT COUNT(*) FROM p2p_conflicts WHERE conflict_type = 'delete_conflict'"), 1);

    // Manual: the conflict stays open until a person resolves it.
    b.store.set_setting("p2p_conflict_resolution", "manual").unwrap();
    clock.advance(100);
    a.store.update_record(EntityKind::Customer, &id("c1"), &json!({"name": "Anna"})).unwrap();
    b.store.update_record(EntityKind::Customer, &id("c1"), &json!({"name": "Annie"})).unwrap();
    sync(&mut a, &mut b, 100);
    let open = b.query("SELECT id, resolved_by FROM p2p_conflicts WHERE resolved_by IS NULL");
    assert_eq!(open.len(), 1);
    let conflict_id = open[0]["id"].as_i64().unwrap();
    assert_eq!(
        b.store.reader().unwrap().record(EntityKind::Customer, &id("c1")).unwrap().unwrap()["name"],
        json!("Annie")
    );
    let resolved = b.store.resolve_conflict(conflict_id, &Resolution::Remote, "manager-7").unwrap();
    assert_eq!(resolved["resolvedBy"], json!("manager-7"));
    assert!(matches!(
        b.store.resolve_conflict(conflict_id, &Resolution::Local, "x"),
        Err(StoreError::ConflictResolved(_))
    ));
    sync(&mut b, &mut a, 100);
    sync(&mut a, &mut b, 100);
    assert_eq!(a.dump(), b.dump());
    assert_eq!(
        a.store.reader().unwrap().record(EntityKind::Customer, &id("c1")).unwrap().unwrap()["name"],
        json!("Anna")
    );
}

#[test]
fn gaps_are_refused_and_caught_up_later() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_700_000_000_000);
    let mut a = terminal(&dir, "a", &clock, 0);
    let mut b = terminal(&dir, "b", &clock, 0);
    for i in 0..3 {
        a.store.create_record(EntityKind::Customer, &json!({"id": format!("c{i}"), "name": "X"})).unwrap();
    }
    let all = a.store.reader().unwrap().select_changes(&Default::default(), 0, 100).unwrap();
    let peer = possync_store::PeerRef { id: "a", name: "a" };
    let report = b.store.apply_batch(peer, all.changes[2..].to_vec()).unwrap();
    assert!(report.gap);
    assert_eq!(report.applied, 0);
    sync(&mut a, &mut b, 100);
    assert_eq!(a.dump(), b.dump());
}

#[test]
fn the_seed_analysis_queries_run() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_700_000_000_000);
    let a = terminal(&dir, "a", &clock, 0);
    for sql in [
        "SELECT * FROM p2p_conflicts WHERE created_at >= datetime('now', '-24 hours') ORDER BY created_at DESC",
        "SELECT * FROM v_p2p_connection_health WHERE last_event >= datetime('now', '-1 hour')",
        "SELECT status, COUNT(*) as count, ROUND(COUNT(*) * 100.0 / SUM(COUNT(*)) OVER(), 2) as percentage FROM p2p_sync_logs WHERE created_at >= datetime('now', '-24 hours') GROUP BY status",
        "SELECT peer_name, SUM(messages_sent) as total_messages, SUM(bytes_sent) as total_bytes, AVG(sync_duration_ms) as avg_sync_time FROM p2p_connection_metrics WHERE created_at >= datetime('now', '-24 hours') GROUP BY peer_name",
        "SELECT * FROM v_p2p_recent_activity",
        "SELECT * FROM v_p2p_conflict_summary",
    ] {
        a.query(sql);
    }
    assert_eq!(a.count("SELECT COUNT(*) FROM settings"), 7);
}

#[test]
fn a_peer_sale_with_overflowing_amounts_is_refused_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_700_000_000_000);
    let mut a = terminal(&dir, "a", &clock, 0);
    let mut b = terminal(&dir, "b", &clock, 0);
    a.store
        .create_record(EntityKind::Product, &json!({"id": "tea", "sku": "T1", "name": "Tea", "price": 2.5}))
        .unwrap();
    sync(&mut a, &mut b, 100);
    a.store.record_sale(&sale("tea", "1", "5")).unwrap();
    let mut changes = a.store.reader().unwrap().select_changes(b.store.summary(), 0, 100).unwrap().changes;
    assert_eq!(changes.len(), 1);
    let huge = json!(999_999_999_999_999u64);
    changes[0].edit_data(|data| {
        data["lines"][0]["quantity"] = huge.clone();
        data["lines"][0]["unitPrice"] = huge;
    });
    let report = b.store.apply_batch(possync_store::PeerRef { id: "a", name: "a" }, changes).unwrap();
    assert_eq!((report.applied, report.errors), (0, 1));
    assert!(report.rejections[0].contains("too large"), "{:?}", report.rejections);
    assert_eq!(b.count("SELECT COUNT(*) FROM tickets"), 0);
    assert_eq!(b.count("SELECT COUNT(*) FROM p2p_sync_logs WHERE status = 'error'"), 1);
}

#[test]
fn relayed_changes_keep_the_bytes_their_origin_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_700_000_000_000);
    let (mut a, mut b, mut c) =
        (terminal(&dir, "a", &clock, 0), terminal(&dir, "b", &clock, 0), terminal(&dir, "c", &clock, 0));
    a.store
        .create_record(EntityKind::Product, &json!({"id": "tea", "sku": "T1", "name": "Tea", "price": 2.5}))
        .unwrap();
    a.store.record_sale(&sale("tea", "2", "5")).unwrap();
    // A change from another writer, spaced and ordered its own way: B stores and relays it
    // as written, it is never re-encoded.
    let data = r#"{ "name": "Coffee",  "sku": "C1", "id": "coffee", "price": "3.10",
        "sync": {"seq": 1, "origin": "z", "hlc": "1700000000000-0", "ctx": {"z": 1}} }"#;
    let foreign: possync_core::WireChange =
        serde_json::from_str(&format!(r#"{{"type":"product","action":"create","data":{data}}}"#)).unwrap();
    let report = b.store.apply_batch(possync_store::PeerRef { id: "z", name: "z" }, vec![foreign]).unwrap();
    assert_eq!(report.applied, 1, "{report:?}");
    sync(&mut a, &mut b, 100);
    sync(&mut b, &mut c, 100);
    let payloads = |terminal: &common::Terminal| {
        terminal
            .query("SELECT o.pos_id || '/' || s.seq AS change, s.payload FROM sync_changes s JOIN sync_origins o ON o.idx = s.origin ORDER BY change")
            .into_iter()
            .map(|row| (row["change"].as_str().unwrap().to_string(), row["payload"].as_str().unwrap().to_string()))
            .collect::<Vec<_>>()
    };
    let (on_a, on_b, on_c) = (payloads(&a), payloads(&b), payloads(&c));
    assert_eq!(on_c.len(), 3, "{on_c:?}");
    assert_eq!(on_b, on_c, "B relays every change byte for byte");
    assert_eq!(on_a, on_c[..2], "A's own changes arrive at C as A wrote them");
    assert!(on_c[2].1.contains(data), "the foreign change is kept verbatim: {}", on_c[2].1);
    assert!(c.dump().contains("Coffee"), "and applied");
}

#[test]
fn a_group_commit_keeps_the_good_writes_and_rolls_back_the_bad_one_alone() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_700_000_000_000);
    let (mut a, mut b) = (terminal(&dir, "a", &clock, 0), terminal(&dir, "b", &clock, 0));
    let (tea, refused, sold, nested) = a
        .store
        .group_commit(|store| {
            let tea = store.create_record(
                EntityKind::Product,
                &json!({"id": "tea", "sku": "T1", "name": "Tea", "price": 2.5}),
            );
            let refused = store.record_sale(&sale("no-such-product", "1", "5"));
            let sold = store.record_sale(&sale("tea", "2", "5"));
            let nested = store.group_commit(|store| {
                store.update_record(EntityKind::Product, &id("tea"), &json!({"price": 3}))
            });
            (tea, refused, sold, nested)
        })
        .unwrap();
    assert!(tea.is_ok() && sold.is_ok(), "{tea:?} {sold:?}");
    assert!(refused.is_err(), "a sale of an unknown product is refused");
    assert!(nested.unwrap().is_ok(), "a group inside a group joins it");
    // The refused sale took no seq: the log has no gap, and the outbox holds the three.
    assert_eq!(a.count("SELECT COUNT(*) FROM sync_changes"), 3);
    assert_eq!(a.count("SELECT MAX(seq) FROM sync_changes"), 3);
    assert_eq!(a.count("SELECT COUNT(*) FROM tickets"), 1);
    assert_eq!(a.store.drain_outbox().len(), 3);
    assert_eq!(a.store.summary().get(&a.pos_id()), possync_core::Seq(3));
    // Committed and durable: a reopened store holds the same, and a peer converges on it.
    let path = a.path.clone();
    drop(a);
    let mut a = common::Terminal {
        name: "a".into(),
        path: path.clone(),
        store: Store::open(&path, common::env(&clock, 0, 2)).unwrap(),
    };
    assert_eq!(a.store.summary().get(&a.pos_id()), possync_core::Seq(3));
    assert_eq!(a.count("SELECT COUNT(*) FROM sync_vv"), 1);
    let report = sync(&mut a, &mut b, 100);
    assert_eq!((report.applied, report.errors), (3, 0), "{report:?}");
    assert_eq!(a.dump(), b.dump());
    // Writes after the group are ordinary transactions again.
    a.store.update_record(EntityKind::Product, &id("tea"), &json!({"price": 4})).unwrap();
    assert_eq!(a.count("SELECT MAX(seq) FROM sync_changes"), 4);
}

/// A sale of `lines` lines of one product.
fn big_sale(product: &str, lines: usize) -> SaleRequest {
    let line = SaleLineRequest {
        product_id: id(product),
        quantity: dec("1"),
        unit_price: None,
        discount_rate: None,
    };
    SaleRequest { lines: vec![line; lines], ..sale(product, "1", &lines.to_string()) }
}

#[test]
fn a_write_whose_change_no_peer_could_receive_is_refused_and_leaves_nothing() {
    use possync_core::protocol::MAX_CHANGE_BYTES;
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_700_000_000_000);
    let mut a = terminal(&dir, "a", &clock, 0);
    a.store
        .create_record(EntityKind::Product, &json!({"id": "tea", "sku": "T1", "name": "Tea", "price": 1}))
        .unwrap();
    let changes_before = a.count("SELECT COUNT(*) FROM sync_changes");
    let seq_before = a.store.summary().get(&a.pos_id());

    // About 343 bytes a line: 13,000 lines is about 4.5 MB of change data.
    let refused = a.store.record_sale(&big_sale("tea", 13_000)).map(|_| ()).unwrap_err();
    match &refused {
        StoreError::TooLarge { kind: EntityKind::Ticket, bytes, limit } => {
            assert_eq!(*limit, MAX_CHANGE_BYTES);
            assert!(*bytes > MAX_CHANGE_BYTES, "{bytes}");
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert!(refused.to_string().contains("split it"), "{refused}");
    assert_eq!(a.count("SELECT COUNT(*) FROM sync_changes"), changes_before);
    assert_eq!(a.count("SELECT COUNT(*) FROM tickets"), 0);
    assert_eq!(a.count("SELECT COUNT(*) FROM stock_movements"), 0);
    assert_eq!(a.store.summary().get(&a.pos_id()), seq_before);

    // The next write takes the next seq: nothing was consumed by the refused one.
    a.store.update_record(EntityKind::Product, &id("tea"), &json!({"price": 2})).unwrap();
    assert_eq!(a.store.summary().get(&a.pos_id()).0, seq_before.0 + 1);
}

#[test]
fn catch_up_batches_are_cut_by_size_so_every_frame_fits() {
    use possync_core::protocol::MAX_BATCH_BYTES;
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_700_000_000_000);
    let mut a = terminal(&dir, "a", &clock, 0);
    let mut b = terminal(&dir, "b", &clock, 0);
    a.store
        .create_record(EntityKind::Product, &json!({"id": "tea", "sku": "T1", "name": "Tea", "price": 1}))
        .unwrap();
    // Three sales of about 2.4 MB each: under the change limit, but two would not fit a frame.
    for _ in 0..3 {
        a.store.record_sale(&big_sale("tea", 7_000)).unwrap();
    }
    let reader = a.store.reader().unwrap();
    let since = b.store.summary().clone();
    let (mut cursor, mut sizes) = (0, Vec::new());
    loop {
        let selection = reader.select_changes(&since, cursor, 100).unwrap();
        let bytes: usize = selection.changes.iter().map(|c| serde_json::to_string(c).unwrap().len()).sum();
        assert!(bytes <= MAX_BATCH_BYTES, "a batch of {bytes} bytes");
        sizes.push(selection.changes.len());
        cursor = selection.next_cursor;
        if !selection.has_more {
            break;
        }
    }
    // The product with the first sale, then one sale a batch.
    assert_eq!(sizes, [2, 1, 1]);
    assert_eq!(sizes.iter().sum::<usize>() as u64, a.store.summary().get(&a.pos_id()).0);
    drop(reader);
    sync(&mut a, &mut b, 100);
    assert_eq!(a.dump(), b.dump());
}

#[test]
fn a_conflict_the_local_version_wins_is_logged_skipped_as_the_seed_says() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_700_000_000_000);
    let mut a = terminal(&dir, "a", &clock, 0);
    let mut b = terminal(&dir, "b", &clock, 0);
    a.store
        .create_record(EntityKind::Product, &json!({"id": "tea", "sku": "T1", "name": "Tea", "price": 1}))
        .unwrap();
    sync(&mut a, &mut b, 100);
    clock.advance(1000);
    a.store.update_record(EntityKind::Product, &id("tea"), &json!({"price": 5})).unwrap();
    clock.advance(10);
    b.store.update_record(EntityKind::Product, &id("tea"), &json!({"price": 6})).unwrap();
    // B's edit is newer: on B the local version wins (skipped), on A the remote one (conflict).
    sync(&mut a, &mut b, 100);
    sync(&mut b, &mut a, 100);
    assert_eq!(a.dump(), b.dump());
    let last_status = |t: &common::Terminal| {
        t.query("SELECT status, conflict_reason FROM p2p_sync_logs WHERE entity_id = 'tea' ORDER BY id DESC LIMIT 1")[0].clone()
    };
    let on_b = last_status(&b);
    assert_eq!(on_b["status"], json!("skipped"), "{on_b}");
    assert!(on_b["conflictReason"].as_str().unwrap().contains("local version is kept"), "{on_b}");
    assert_eq!(last_status(&a)["status"], json!("conflict"));
    for t in [&a, &b] {
        assert_eq!(t.count("SELECT COUNT(*) FROM p2p_conflicts"), 1, "{}", t.name);
    }
}
