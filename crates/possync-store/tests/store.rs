//! The store end to end on real SQLite files: local writes, validation, sync between two
//! terminals, conflicts and their audit rows.

mod common;

use common::{ManualClock, sync, terminal};
use possync_core::entity::{MovementType, PaymentMethod};
use possync_core::{EntityId, EntityKind, PosId, Seq};
use possync_store::{PaymentRequest, Resolution, SaleLineRequest, SaleRequest, Store, StoreError};
use rust_decimal::Decimal;
use serde_json::{Value, json};

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
    // A's key enrollment, the category, the product, the stock movement.
    assert_eq!((report.applied, report.conflicts, report.errors), (4, 0, 0));

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
    // The spec's seven settings, plus `p2p_max_clock_ahead`,
    // `p2p_peer_max_changes_per_second` and `pos_require_cash_session`.
    assert_eq!(a.count("SELECT COUNT(*) FROM settings"), 10);
    assert_eq!(
        a.count(
            "SELECT COUNT(*) FROM settings WHERE key IN ('p2p_enabled', 'p2p_auto_sync',
             'p2p_conflict_resolution', 'p2p_heartbeat_interval', 'p2p_reconnect_max_attempts',
             'p2p_sync_batch_size', 'p2p_log_retention_days')"
        ),
        7
    );
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
    // Written so by A itself (signed with its key): the sale is still refused.
    a.store.sign(&mut changes[0]);
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
    assert_eq!(on_c.len(), 4, "A's key enrollment, product and sale, and Z's change: {on_c:?}");
    assert_eq!(on_b, on_c, "B relays every change byte for byte");
    assert_eq!(on_a, on_c[..3], "A's own changes arrive at C as A wrote them");
    assert!(on_c[3].1.contains(data), "the foreign change is kept verbatim: {}", on_c[3].1);
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
    // A's key enrollment, then the three.
    assert_eq!(a.count("SELECT COUNT(*) FROM sync_changes"), 4);
    assert_eq!(a.count("SELECT MAX(seq) FROM sync_changes"), 4);
    assert_eq!(a.count("SELECT COUNT(*) FROM tickets"), 1);
    assert_eq!(a.store.drain_outbox().len(), 4);
    assert_eq!(a.store.summary().get(&a.pos_id()), possync_core::Seq(4));
    // Committed and durable: a reopened store holds the same, and a peer converges on it.
    let path = a.path.clone();
    drop(a);
    let mut a = common::Terminal {
        name: "a".into(),
        path: path.clone(),
        store: Store::open(&path, common::env(&clock, 0, 2)).unwrap(),
    };
    assert_eq!(a.store.summary().get(&a.pos_id()), possync_core::Seq(4));
    assert_eq!(a.count("SELECT COUNT(*) FROM sync_vv"), 1);
    let report = sync(&mut a, &mut b, 100);
    assert_eq!((report.applied, report.errors), (4, 0), "{report:?}");
    assert_eq!(a.dump(), b.dump());
    // Writes after the group are ordinary transactions again.
    a.store.update_record(EntityKind::Product, &id("tea"), &json!({"price": 4})).unwrap();
    assert_eq!(a.count("SELECT MAX(seq) FROM sync_changes"), 5);
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
    // The key enrollment, the product and the first sale, then one sale a batch.
    assert_eq!(sizes, [3, 1, 1]);
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

#[test]
fn a_change_stamped_at_the_end_of_time_is_held_back_and_blocks_nothing_else() {
    // Issue 13, item 4: one update stamped with the largest clock value used to overflow the
    // receiver's clock on its next edits (a negative stamp, "database content is corrupt",
    // sales refused). Now a stamp further ahead than `p2p_max_clock_ahead` (1 h by default)
    // is held back: not applied, logged as an error with `clockAheadMs`, retried later.
    use possync_core::hlc::MAX_MS;
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_700_000_000_000);
    let mut a = terminal(&dir, "a", &clock, 0);
    let mut b = terminal(&dir, "b", &clock, 0);
    let mut evil = terminal(&dir, "evil", &clock, (MAX_MS - 1_700_000_000_000) as i64);
    a.store
        .create_record(EntityKind::Product, &json!({"id": "tea", "sku": "T1", "name": "Tea", "price": 1}))
        .unwrap();
    a.store
        .create_record(EntityKind::Product, &json!({"id": "cake", "sku": "C1", "name": "Cake", "price": 3}))
        .unwrap();
    sync(&mut a, &mut evil, 100);
    evil.store.update_record(EntityKind::Product, &id("tea"), &json!({"price": 99})).unwrap();
    evil.store.update_record(EntityKind::Product, &id("cake"), &json!({"price": 98})).unwrap();
    // The last stamp there is: the counter at its top too.
    let since = a.store.summary().clone();
    let mut forged = evil.store.reader().unwrap().select_changes(&since, 0, 100).unwrap().changes;
    assert_eq!(forged.len(), 3, "evil's key enrollment and its two edits");
    let text = serde_json::to_string(&forged[1])
        .unwrap()
        .replace(&format!("{MAX_MS}-0"), &format!("{MAX_MS}-65535"));
    forged[1] = serde_json::from_str(&text).unwrap();
    // Evil signs what it forged: it is its own change, only its clock is poisoned.
    evil.store.sign(&mut forged[1]);
    let report =
        a.store.apply_batch(possync_store::PeerRef { id: "evil", name: "evil" }, forged.clone()).unwrap();
    // Evil's key enrollment is stamped at the end of time too (its clock was dragged there):
    // held back, and its two edits wait behind it.
    assert_eq!((report.applied, report.held_back, report.waiting), (0, 1, 2), "{report:?}");
    assert!(!report.gap, "a change waiting behind a held-back one is not a gap to ask for at once");
    let limit = 3_600_000;
    assert_eq!(report.retry_at_ms, Some(MAX_MS - limit));
    let rows = a.query("SELECT status, conflict_reason, details FROM p2p_sync_logs ORDER BY id DESC LIMIT 3");
    let held = &rows[2];
    assert_eq!(held["status"], json!("error"), "{held}");
    assert!(held["conflictReason"].as_str().unwrap().starts_with("clock ahead:"), "{held}");
    let details: Value = serde_json::from_str(held["details"].as_str().unwrap()).unwrap();
    assert_eq!(details["heldBack"], json!(true));
    assert!(details["clockAheadMs"].as_u64().unwrap() > 100 * 365 * 86_400_000, "{details}");
    assert!(rows[0]["conflictReason"].as_str().unwrap().starts_with("waiting:"), "{}", rows[0]);
    assert_eq!(a.store.summary().get(&PosId::parse("evil").unwrap()), Seq(0), "nothing of evil is held");

    // Later local edits and sales: no overflow, every row readable, sales go on.
    for price in 2..10 {
        a.store.update_record(EntityKind::Product, &id("cake"), &json!({"price": price})).unwrap();
    }
    a.store.update_record(EntityKind::Product, &id("tea"), &json!({"price": 2})).unwrap();
    a.store.record_sale(&sale("tea", "1", "200")).unwrap();
    a.store.record_sale(&sale("cake", "1", "200")).unwrap();
    assert_eq!(a.count("SELECT COUNT(*) FROM sync_changes WHERE hlc < 0"), 0);
    let max_local = a.count(
        "SELECT MAX(hlc) FROM sync_changes WHERE origin = (SELECT idx FROM sync_origins WHERE pos_id = 'a')",
    );
    assert!(
        (max_local >> 16) <= 1_700_000_000_000 + 3_600_000,
        "the clock did not follow the forged stamp: {}",
        max_local >> 16
    );
    let reader = a.store.reader().unwrap();
    let tea = reader.record(EntityKind::Product, &id("tea")).unwrap().unwrap();
    let cake = reader.record(EntityKind::Product, &id("cake")).unwrap().unwrap();
    assert_eq!(cake["price"], json!(9.0));
    assert_eq!(tea["price"], json!(2.0), "the forged price never landed");
    assert_eq!(tea["stock"], json!(-1.0));
    drop(reader);
    // Every honest terminal ends identical: b holds the forged changes back the same way.
    sync(&mut a, &mut b, 100);
    let report = b.store.apply_batch(possync_store::PeerRef { id: "evil", name: "evil" }, forged).unwrap();
    assert_eq!(report.held_back, 1);
    sync(&mut b, &mut a, 100);
    assert_eq!(a.dump(), b.dump());
    assert_eq!(b.count("SELECT COUNT(*) FROM sync_changes WHERE hlc < 0"), 0);
}

#[test]
fn a_till_two_hours_ahead_is_held_back_until_the_clock_catches_up_then_every_till_agrees() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_700_000_000_000);
    let mut a = terminal(&dir, "a", &clock, 0);
    let mut b = terminal(&dir, "b", &clock, 0);
    let mut ahead = terminal(&dir, "ahead", &clock, 2 * 3_600_000);
    a.store
        .create_record(EntityKind::Product, &json!({"id": "tea", "sku": "T1", "name": "Tea", "price": 1}))
        .unwrap();
    sync(&mut a, &mut ahead, 100);
    sync(&mut a, &mut b, 100);
    ahead.store.update_record(EntityKind::Product, &id("tea"), &json!({"price": 50})).unwrap();
    ahead.store.record_sale(&sale("tea", "1", "50")).unwrap();
    let report = sync(&mut ahead, &mut a, 100);
    // Its key enrollment (stamped 2 h ahead like its edits) is held back first.
    assert_eq!((report.applied, report.errors, report.gap), (0, 1, false), "{report:?}");
    assert!(report.retry_at_ms.is_some() && report.must_retry(), "{report:?}");
    let alert = a
        .store
        .reader()
        .unwrap()
        .dashboard_rows(clock.0.load(std::sync::atomic::Ordering::SeqCst))
        .unwrap()
        .alert_clock_ahead;
    assert_eq!(alert.len(), 1, "{alert:?}");
    assert_eq!((&alert[0]["origin"], &alert[0]["heldBack"]), (&json!(ahead.name), &json!(1)), "{alert:?}");
    // A's own edit meanwhile, stamped at its (right) time.
    a.store.update_record(EntityKind::Product, &id("tea"), &json!({"price": 3})).unwrap();
    sync(&mut a, &mut b, 100);
    // An hour and a minute later the first change is within the hour allowed: applied, and
    // the sale behind it too, on every till; the later stamp wins the price everywhere.
    clock.advance(3_660_000);
    for t in [&mut a, &mut b] {
        let report = sync(&mut ahead, t, 100);
        assert_eq!((report.applied + report.conflicts, report.errors), (3, 0), "{}: {report:?}", t.name);
    }
    sync(&mut a, &mut ahead, 100);
    for t in [&a, &b, &ahead] {
        let tea = t.store.reader().unwrap().record(EntityKind::Product, &id("tea")).unwrap().unwrap();
        assert_eq!(tea["price"], json!(50.0), "{}", t.name);
        assert_eq!(tea["stock"], json!(-1.0), "{}", t.name);
    }
    assert_eq!(a.dump(), b.dump());
    assert_eq!(a.dump(), ahead.dump());
}

#[test]
fn an_edit_after_a_change_stamped_far_ahead_still_wins_on_every_terminal() {
    // A shop that accepts clocks up to a year ahead (`p2p_max_clock_ahead` raised): a till
    // whose clock runs a year ahead has its edit merged by its stamp; a later edit of the
    // same record here is stamped after it (not at this clock's time), so it wins here and
    // everywhere, and this terminal's clock stays where it was for other records.
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_700_000_000_000);
    let mut a = terminal(&dir, "a", &clock, 0);
    let mut b = terminal(&dir, "b", &clock, 0);
    let mut ahead = terminal(&dir, "ahead", &clock, 365 * 86_400_000);
    for t in [&mut a, &mut b] {
        t.store.set_setting("p2p_max_clock_ahead", &(366u64 * 86_400_000).to_string()).unwrap();
    }
    a.store
        .create_record(EntityKind::Product, &json!({"id": "tea", "sku": "T1", "name": "Tea", "price": 1}))
        .unwrap();
    sync(&mut a, &mut ahead, 100);
    ahead.store.update_record(EntityKind::Product, &id("tea"), &json!({"price": 50})).unwrap();
    sync(&mut ahead, &mut a, 100);
    a.store.update_record(EntityKind::Product, &id("tea"), &json!({"price": 3})).unwrap();
    a.store
        .create_record(EntityKind::Product, &json!({"id": "jam", "sku": "J1", "name": "Jam", "price": 4}))
        .unwrap();
    sync(&mut a, &mut b, 100);
    sync(&mut ahead, &mut b, 100);
    sync(&mut a, &mut ahead, 100);
    for t in [&a, &b, &ahead] {
        let tea = t.store.reader().unwrap().record(EntityKind::Product, &id("tea")).unwrap().unwrap();
        assert_eq!(tea["price"], json!(3.0), "{}", t.name);
    }
    assert_eq!(a.dump(), b.dump());
    assert_eq!(a.dump(), ahead.dump());
    let jam = a.store.reader().unwrap().record(EntityKind::Product, &id("jam")).unwrap().unwrap();
    assert!(jam["updatedAt"].as_str().unwrap().starts_with("2023-11-14"), "{jam}");
}

#[test]
fn a_conflict_names_the_till_where_the_edit_was_made_not_the_one_that_relayed_it() {
    // Issue 10, item 10: A's edit reaches C through B; C's conflict row names A.
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_700_000_000_000);
    let mut a = terminal(&dir, "a", &clock, 0);
    let mut b = terminal(&dir, "b", &clock, 0);
    let mut c = terminal(&dir, "c", &clock, 0);
    a.store
        .create_record(EntityKind::Product, &json!({"id": "tea", "sku": "T1", "name": "Tea", "price": 1}))
        .unwrap();
    sync(&mut a, &mut c, 100); // C has met A once (learns its name)
    sync(&mut a, &mut b, 100);
    clock.advance(1000);
    c.store.update_record(EntityKind::Product, &id("tea"), &json!({"price": 2})).unwrap();
    clock.advance(10);
    a.store.update_record(EntityKind::Product, &id("tea"), &json!({"price": 3})).unwrap();
    sync(&mut a, &mut b, 100);
    sync(&mut b, &mut c, 100); // A's edit, relayed by B
    let rows = c.query("SELECT peer_id, peer_name, notes FROM p2p_conflicts");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["peerId"], json!("a"));
    assert_eq!(rows[0]["peerName"], json!("a"));
    let notes = rows[0]["notes"].as_str().unwrap();
    assert!(notes.contains("received through b"), "{notes}");
}

#[test]
fn a_manual_decision_on_one_till_closes_the_conflict_on_every_till() {
    // Issue 10, item 3: the decision travels like any change and closes B's copy too, in the
    // decider's name; deciding it again on B is refused.
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_700_000_000_000);
    let (mut a, mut b) = two_manual_tills_with_tea(&dir, &clock);
    sync(&mut a, &mut b, 100);
    clock.advance(1000);
    a.store.update_record(EntityKind::Product, &id("tea"), &json!({"price": 5})).unwrap();
    b.store.update_record(EntityKind::Product, &id("tea"), &json!({"price": 6})).unwrap();
    sync(&mut a, &mut b, 100);
    sync(&mut b, &mut a, 100);
    let open = |t: &common::Terminal| t.count("SELECT COUNT(*) FROM p2p_conflicts WHERE resolved_by IS NULL");
    assert_eq!((open(&a), open(&b)), (1, 1));
    let on_a = a.query("SELECT id FROM p2p_conflicts")[0]["id"].as_i64().unwrap();
    a.store.resolve_conflict(on_a, &Resolution::Remote, "manager-anna").unwrap();
    sync(&mut a, &mut b, 100);
    assert_eq!((open(&a), open(&b)), (0, 0));
    let row = &b.query("SELECT id, resolved_by, resolved_at, final_data, notes FROM p2p_conflicts")[0];
    assert_eq!(row["resolvedBy"], json!("manager-anna"));
    assert!(row["resolvedAt"].is_string());
    assert!(row["notes"].as_str().unwrap().contains("Decided by manager-anna"), "{row}");
    assert!(row["finalData"].as_str().unwrap().contains("\"price\":6"), "{row}");
    let again = b.store.resolve_conflict(row["id"].as_i64().unwrap(), &Resolution::Local, "manager-bob");
    assert!(matches!(again, Err(StoreError::ConflictResolved(_))), "{again:?}");
    assert_eq!(a.dump(), b.dump());
    let tea = b.store.reader().unwrap().record(EntityKind::Product, &id("tea")).unwrap().unwrap();
    assert_eq!(tea["price"], json!(6.0));
}

#[test]
fn daily_volume_counts_each_change_once_and_duplicates_apart() {
    // Issue 10, item 12: a change delivered twice (a till connected to two others) is one change.
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_700_000_000_000);
    let mut a = terminal(&dir, "a", &clock, 0);
    let mut b = terminal(&dir, "b", &clock, 0);
    a.store
        .create_record(EntityKind::Product, &json!({"id": "tea", "sku": "T1", "name": "Tea", "price": 1}))
        .unwrap();
    let all = a.store.reader().unwrap().select_changes(&Default::default(), 0, 100).unwrap().changes;
    for relay in ["a", "c"] {
        b.store.apply_batch(possync_store::PeerRef { id: relay, name: relay }, all.clone()).unwrap();
    }
    let rows = b.store.reader().unwrap().dashboard_rows(1_700_000_000_000).unwrap();
    let today = rows.daily_volume.last().unwrap();
    // A's key enrollment and the product, each once, and each once again as a duplicate.
    assert_eq!((today["changes"].as_i64(), today["duplicates"].as_i64()), (Some(2), Some(2)), "{today}");
}

#[test]
fn conflict_snapshots_are_full_records_with_one_json_type_per_field() {
    // Issue 10, item 5: local, remote and final data all hold every field, amounts as numbers,
    // in system rows and manually resolved rows alike.
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_700_000_000_000);
    let mut a = terminal(&dir, "a", &clock, 0);
    let mut b = terminal(&dir, "b", &clock, 0);
    b.store.set_setting("p2p_conflict_resolution", "manual").unwrap();
    a.store
        .create_record(
            EntityKind::Product,
            &json!({"id": "tea", "sku": "T1", "name": "Tea", "price": "1.50", "cost": "0.80"}),
        )
        .unwrap();
    sync(&mut a, &mut b, 100);
    for (t, price) in [(&mut a, "2.25"), (&mut b, "3.10")] {
        clock.advance(10);
        t.store.update_record(EntityKind::Product, &id("tea"), &json!({"price": price})).unwrap();
    }
    sync(&mut a, &mut b, 100);
    sync(&mut b, &mut a, 100);
    let conflict_id = b.query("SELECT id FROM p2p_conflicts")[0]["id"].as_i64().unwrap();
    b.store.resolve_conflict(conflict_id, &Resolution::Remote, "anna").unwrap();
    for t in [&a, &b] {
        for row in t.query("SELECT local_data, remote_data, final_data FROM p2p_conflicts") {
            for column in ["localData", "remoteData", "finalData"] {
                let snapshot: serde_json::Value =
                    serde_json::from_str(row[column].as_str().unwrap()).unwrap();
                assert!(snapshot["price"].is_number(), "{}: {column} {snapshot}", t.name);
                assert!(snapshot["cost"].is_number(), "{}: {column} {snapshot}", t.name);
                assert_eq!(snapshot["name"], json!("Tea"), "{}: {column} {snapshot}", t.name);
                assert!(
                    snapshot.as_object().unwrap().contains_key("barcode"),
                    "every field, null when unset"
                );
            }
        }
    }
}

#[test]
fn two_contents_for_one_origin_and_seq_are_refused_and_logged_never_silent() {
    // Issue 13, item 3: a forged "a:2" (or a clone's) meeting the real one.
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_700_000_000_000);
    let mut a = terminal(&dir, "a", &clock, 0);
    let mut b = terminal(&dir, "b", &clock, 0);
    a.store
        .create_record(EntityKind::Product, &json!({"id": "tea", "sku": "T1", "name": "Tea", "price": 1}))
        .unwrap();
    a.store.update_record(EntityKind::Product, &id("tea"), &json!({"price": 2})).unwrap();
    sync(&mut a, &mut b, 100);
    let dump = b.dump();
    // The same numbers, other content.
    let real = a.store.reader().unwrap().select_changes(&Default::default(), 0, 100).unwrap().changes;
    let text = serde_json::to_string(&real[2]).unwrap().replace("\"price\":\"2\"", "\"price\":\"0.01\"");
    assert!(text.contains("0.01"), "{text}");
    let forged: possync_core::WireChange = serde_json::from_str(&text).unwrap();
    let report =
        b.store.apply_batch(possync_store::PeerRef { id: "forger", name: "forger" }, vec![forged]).unwrap();
    assert_eq!((report.forks, report.errors, report.skipped), (1, 1, 0));
    let row = &b.query("SELECT status, conflict_reason FROM p2p_sync_logs ORDER BY id DESC LIMIT 1")[0];
    assert_eq!(row["status"], json!("error"));
    assert!(row["conflictReason"].as_str().unwrap().starts_with("fork:"), "{row}");
    assert_eq!(b.dump(), dump, "nothing changed");
    // The honest duplicate is still only a duplicate.
    let report = b.store.apply_batch(possync_store::PeerRef { id: "a", name: "a" }, real).unwrap();
    assert_eq!((report.forks, report.skipped), (0, 3));
}

#[test]
fn imports_upsert_once_count_once_and_record_past_sales_without_moving_stock() {
    use possync_core::entity::{Payment, TicketLine, TicketStatus};
    use possync_store::{HistoricalSale, ProductKey, Upserted};

    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_700_000_000_000);
    let mut a = terminal(&dir, "a", &clock, 0);
    let mut b = terminal(&dir, "b", &clock, 0);
    let tea = json!({"sku": "T1", "name": "Tea", "price": "2.5"});
    assert_eq!(a.store.upsert_record(EntityKind::Product, &id("tea"), &tea).unwrap(), Upserted::Created);
    let changes = a.count("SELECT COUNT(*) FROM sync_changes");
    assert_eq!(a.store.upsert_record(EntityKind::Product, &id("tea"), &tea).unwrap(), Upserted::Unchanged);
    assert_eq!(a.count("SELECT COUNT(*) FROM sync_changes"), changes, "an unchanged upsert writes nothing");
    let cheaper = json!({"sku": "T1", "name": "Tea", "price": 2.4});
    assert_eq!(a.store.upsert_record(EntityKind::Product, &id("tea"), &cheaper).unwrap(), Upserted::Updated);
    let update: String = a.query("SELECT payload FROM sync_changes ORDER BY seq DESC LIMIT 1")[0]["payload"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(update.contains("\"price\"") && !update.contains("\"name\""), "only the changed field: {update}");
    assert_eq!(a.store.live_product_by(ProductKey::Sku, "T1").unwrap(), Some(id("tea")));
    assert_eq!(a.store.live_product_by(ProductKey::Barcode, "T1").unwrap(), None);

    // A count with a given id is written once: a second one cannot undo later sales.
    let count = id("count-tea");
    assert!(a.store.count_stock_once(&count, &id("tea"), dec("10"), None).unwrap().is_some());
    a.store.record_sale(&sale("tea", "2", "5")).unwrap();
    assert!(a.store.count_stock_once(&count, &id("tea"), dec("10"), None).unwrap().is_none());
    let stock = |terminal: &common::Terminal| {
        terminal.store.reader().unwrap().record(EntityKind::Product, &id("tea")).unwrap().unwrap()["stock"]
            .clone()
    };
    assert_eq!(stock(&a), json!(8.0));

    // A past sale: no stock movement, its own number and date, its final status.
    let line = TicketLine {
        product_id: id("tea"),
        product_name: "Tea".into(),
        product_sku: "T1".into(),
        quantity: dec("3"),
        unit_price: dec("2.5"),
        discount_rate: Decimal::ZERO,
        discount_amount: Decimal::ZERO,
        total_amount: dec("7.5"),
    };
    let past = HistoricalSale {
        id: id("old-1"),
        ticket_number: "AAAA-PP-T-1".into(),
        customer_id: None,
        lines: vec![line],
        payments: vec![Payment { method: PaymentMethod::Cash, amount: dec("7.5"), reference: None }],
        subtotal: dec("7.5"),
        discount_amount: Decimal::ZERO,
        total_amount: dec("7.5"),
        notes: None,
        created_at: "2025-11-20T10:00:00.000Z".into(),
        status: TicketStatus::Refunded,
        cash_session_id: None,
    };
    assert!(a.store.record_historical_sale(past.clone()).unwrap());
    assert!(!a.store.record_historical_sale(past.clone()).unwrap(), "the same ticket id is recorded once");
    assert_eq!(stock(&a), json!(8.0), "a past sale moves no stock");
    let wrong = HistoricalSale { id: id("old-2"), total_amount: dec("9"), ..past.clone() };
    assert!(matches!(a.store.record_historical_sale(wrong), Err(StoreError::Invalid(_))));
    assert_eq!(
        a.query("SELECT ticket_number, status, created_at FROM tickets WHERE id = 'old-1'"),
        vec![
            json!({"ticketNumber": "AAAA-PP-T-1", "status": "refunded", "createdAt": "2025-11-20T10:00:00.000Z"})
        ]
    );

    // All of it travels as ordinary changes, and ends the same on the other terminal.
    let report = sync(&mut a, &mut b, 100);
    assert_eq!(report.errors, 0);
    assert_eq!(a.dump(), b.dump());
    assert_eq!(stock(&b), json!(8.0));
}

#[test]
fn a_rehearsal_leaves_nothing_and_all_or_nothing_keeps_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_700_000_000_000);
    let mut a = terminal(&dir, "a", &clock, 0);
    let category = |name: &str| json!({"id": name, "name": name});
    let created = a
        .store
        .rehearse(|store| {
            store.create_record(EntityKind::Category, &category("c1")).unwrap();
            store.create_record(EntityKind::Category, &category("c2")).unwrap();
            2
        })
        .unwrap();
    assert_eq!(created, 2);
    assert_eq!(a.count("SELECT COUNT(*) FROM categories"), 0);
    assert_eq!(a.count("SELECT COUNT(*) FROM sync_changes"), 0);
    assert_eq!(a.store.summary().get(&a.pos_id()).0, 0, "the version vector is rolled back too");
    assert!(a.store.drain_outbox().is_empty());

    let failed: Result<(), &str> = a
        .store
        .all_or_nothing(|store| {
            store.create_record(EntityKind::Category, &category("c1")).unwrap();
            Err("stopped half way")
        })
        .unwrap();
    assert_eq!(failed, Err("stopped half way"));
    assert_eq!(a.count("SELECT COUNT(*) FROM categories"), 0, "nothing of a failed job is kept");

    let kept: Result<(), &str> = a
        .store
        .all_or_nothing(|store| {
            store.create_record(EntityKind::Category, &category("c1")).unwrap();
            // A rejected write inside is rolled back alone.
            assert!(store.create_record(EntityKind::Category, &category("c1")).is_err());
            store.create_record(EntityKind::Category, &category("c2")).unwrap();
            Ok(())
        })
        .unwrap();
    assert_eq!(kept, Ok(()));
    assert_eq!(a.count("SELECT COUNT(*) FROM categories"), 2);
    // The key enrollment and the two categories.
    assert_eq!(a.count("SELECT MAX(seq) FROM sync_changes"), 3, "no gap left by the rejected write");
    // The next local write goes on from there.
    a.store.create_record(EntityKind::Category, &category("c3")).unwrap();
    assert_eq!(a.count("SELECT MAX(seq) FROM sync_changes"), 4);
}

#[test]
fn a_cashier_accounts_conflict_is_shown_without_its_password_hash_and_resolves_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_700_000_000_000);
    let mut a = terminal(&dir, "a", &clock, 0);
    let mut b = terminal(&dir, "b", &clock, 0);
    for t in [&mut a, &mut b] {
        t.store.set_setting("p2p_conflict_resolution", "manual").unwrap();
    }
    a.store
        .create_record(
            EntityKind::User,
            &json!({"id": "u1", "username": "alice", "role": "cashier", "passwordHash": "$argon2id$v=19$old"}),
        )
        .unwrap();
    sync(&mut a, &mut b, 100);
    // The password changed on both tills while apart.
    a.store
        .update_record(EntityKind::User, &id("u1"), &json!({"passwordHash": "$argon2id$v=19$from-a"}))
        .unwrap();
    clock.advance(1_000);
    b.store
        .update_record(EntityKind::User, &id("u1"), &json!({"passwordHash": "$argon2id$v=19$from-b"}))
        .unwrap();
    sync(&mut b, &mut a, 100);
    let shown = a.store.reader().unwrap().conflicts(Some(10), None).unwrap();
    assert_eq!(shown.len(), 1, "{shown:?}");
    assert_eq!(shown[0]["entityName"], json!("alice"), "POSPlus's entity_name: the readable name");
    let text = shown[0].to_string();
    assert!(!text.contains("from-a") && !text.contains("from-b") && !text.contains("$old"), "{text}");
    assert!(text.contains("(hidden)"), "{text}");
    // Taking the remote version writes B's real hash back, not the placeholder.
    let conflict = shown[0]["id"].as_i64().unwrap();
    a.store.resolve_conflict(conflict, &possync_store::Resolution::Remote, "manager").unwrap();
    let user = a.store.reader().unwrap().record(EntityKind::User, &id("u1")).unwrap().unwrap();
    assert_eq!(user["passwordHash"], json!("$argon2id$v=19$from-b"));
}

#[test]
fn the_readers_counts_follow_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_700_000_000_000);
    let mut a = terminal(&dir, "a", &clock, 0);
    let mut b = terminal(&dir, "b", &clock, 0);
    for (id, sku) in [("tea", "T1"), ("cake", "C1")] {
        a.store
            .create_record(EntityKind::Product, &json!({"id": id, "sku": sku, "name": id, "price": 2}))
            .unwrap();
    }
    a.store.delete_record(EntityKind::Product, &EntityId::parse("cake").unwrap()).unwrap();
    a.store.record_sale(&sale("tea", "1", "5")).unwrap();
    a.store.record_sale(&sale("tea", "2", "5")).unwrap();
    sync(&mut a, &mut b, 100);
    b.store.record_sale(&sale("tea", "1", "5")).unwrap();
    let reader = b.store.reader().unwrap();
    assert_eq!(reader.count_records(EntityKind::Product).unwrap(), 1, "the deleted one is not counted");
    assert_eq!(reader.count_records(EntityKind::Ticket).unwrap(), 3);
    assert_eq!(reader.ticket_count_of(&a.pos_id()).unwrap(), 2);
    assert_eq!(reader.ticket_count_of(&b.pos_id()).unwrap(), 1);
    assert_eq!(reader.duplicate_ticket_numbers().unwrap(), 0);
    assert_eq!(reader.conflict_count().unwrap(), 0);
}

#[test]
fn heads_tell_two_histories_of_an_origin_apart() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_700_000_000_000);
    let mut a = terminal(&dir, "a", &clock, 0);
    let mut b = terminal(&dir, "b", &clock, 0);
    a.store.create_record(EntityKind::Category, &json!({"id": "c1", "name": "Tea"})).unwrap();
    sync(&mut a, &mut b, 100);
    let (summary, heads) = a.store.summary_with_heads().unwrap();
    assert_eq!(heads.len(), 1, "one origin, one head: {heads:?}");
    let reader = b.store.reader().unwrap();
    assert_eq!(reader.diverged_heads(&summary, &heads).unwrap(), vec![], "the same history");
    let mut other = heads.clone();
    other.insert(a.pos_id(), "0000000000000000".into());
    assert_eq!(
        reader.diverged_heads(&summary, &other).unwrap(),
        vec![(a.pos_id(), summary.get(&a.pos_id()))]
    );
    // A number B does not hold yet is not compared.
    a.store.create_record(EntityKind::Category, &json!({"id": "c2", "name": "Cake"})).unwrap();
    let (ahead, mut ahead_heads) = a.store.summary_with_heads().unwrap();
    ahead_heads.insert(a.pos_id(), "0000000000000000".into());
    assert_eq!(reader.diverged_heads(&ahead, &ahead_heads).unwrap(), vec![]);
}

#[test]
fn a_deferred_fsync_is_owed_after_a_durable_write_and_catch_up_stops_at_the_position_given() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_700_000_000_000);
    let mut a = terminal(&dir, "a", &clock, 0);
    assert!(!a.store.take_unsynced(), "fsyncs at commit unless deferred");
    a.store.defer_fsync();
    a.store.create_record(EntityKind::Category, &json!({"id": "c1", "name": "One"})).unwrap();
    let first = a.store.log_position().unwrap();
    assert!(a.store.take_unsynced(), "a durable write owes its fsync");
    assert!(!a.store.take_unsynced(), "owed once");
    let refused = a.store.create_record(EntityKind::Category, &json!({"id": "c2"}));
    assert!(refused.is_err(), "a category needs a name");
    assert!(!a.store.take_unsynced(), "a write that was rolled back owes nothing");
    a.store.create_record(EntityKind::Category, &json!({"id": "c2", "name": "Two"})).unwrap();
    a.store.create_record(EntityKind::Category, &json!({"id": "c3", "name": "Three"})).unwrap();
    assert!(a.store.log_position().unwrap() > first);
    assert!(a.store.wal_path().exists(), "{}", a.store.wal_path().display());

    let reader = a.store.reader().unwrap();
    let nothing_held = possync_core::VersionVector::new();
    let durable = reader.select_changes_up_to(&nothing_held, 0, 100, first).unwrap();
    let ids: Vec<String> =
        durable.changes.iter().map(|change| change.data_object().unwrap()["id"].to_string()).collect();
    // The enrollment and the first category: nothing after the position.
    assert_eq!(durable.changes.len(), 2, "{ids:?}");
    assert!(ids[1].contains("c1"), "{ids:?}");
    assert!(!durable.has_more, "what lies past the position comes live, once durable");
    let everything = reader.select_changes(&nothing_held, 0, 100).unwrap();
    assert_eq!(everything.changes.len(), 4);
    assert_eq!(
        reader.changes_after(0, 100, first).unwrap().len(),
        1,
        "the feed shows what is durable (not the key)"
    );
    assert_eq!(reader.changes_after(0, 100, u64::MAX).unwrap().len(), 3);
}

// --- found by the whole-node simulation with `manual` periods (session 11) -------------------

/// Two tills, both on `manual`, and a product "tea" created on A (not synced yet).
fn two_manual_tills_with_tea(
    dir: &tempfile::TempDir,
    clock: &ManualClock,
) -> (common::Terminal, common::Terminal) {
    let mut a = terminal(dir, "a", clock, 0);
    let mut b = terminal(dir, "b", clock, 0);
    for t in [&mut a, &mut b] {
        t.store.set_setting("p2p_conflict_resolution", "manual").unwrap();
    }
    a.store
        .create_record(EntityKind::Product, &json!({"id": "tea", "sku": "T1", "name": "Tea", "price": 1}))
        .unwrap();
    (a, b)
}

/// Two tills, B on `manual`; a product whose price both edit while apart (B keeps its own,
/// open conflict; A takes the newer). Returns (a, b, the conflict id on B).
fn a_price_conflict_open_on_b(
    dir: &tempfile::TempDir,
    clock: &ManualClock,
) -> (common::Terminal, common::Terminal, i64) {
    let mut a = terminal(dir, "a", clock, 0);
    let mut b = terminal(dir, "b", clock, 0);
    b.store.set_setting("p2p_conflict_resolution", "manual").unwrap();
    a.store
        .create_record(EntityKind::Product, &json!({"id": "tea", "sku": "T1", "name": "Tea", "price": 1}))
        .unwrap();
    sync(&mut a, &mut b, 100);
    clock.advance(10);
    b.store.update_record(EntityKind::Product, &id("tea"), &json!({"price": 3})).unwrap();
    clock.advance(10);
    a.store.update_record(EntityKind::Product, &id("tea"), &json!({"price": 5})).unwrap();
    sync(&mut a, &mut b, 100);
    sync(&mut b, &mut a, 100);
    let open = b.query("SELECT id FROM p2p_conflicts WHERE resolved_by IS NULL");
    assert_eq!(open.len(), 1, "{open:?}");
    (a, b, open[0]["id"].as_i64().unwrap())
}

#[test]
fn a_later_edit_of_another_field_does_not_close_a_manual_conflict_it_leaves_unsettled() {
    // Seed 30025 of the simulation: a later edit made with both versions in view closed B's
    // open conflict as "superseded" though it did not write the contested field: B kept its
    // price, A the other, and nothing said so any more.
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_700_000_000_000);
    let (mut a, mut b, conflict) = a_price_conflict_open_on_b(&dir, &clock);
    let open = |t: &common::Terminal| t.count("SELECT COUNT(*) FROM p2p_conflicts WHERE resolved_by IS NULL");
    clock.advance(10);
    a.store.update_record(EntityKind::Product, &id("tea"), &json!({"name": "Green tea"})).unwrap();
    sync(&mut a, &mut b, 100);
    assert_eq!(open(&b), 1, "the name edit leaves the prices apart: still open");
    clock.advance(10);
    a.store.update_record(EntityKind::Product, &id("tea"), &json!({"price": 4})).unwrap();
    sync(&mut a, &mut b, 100);
    assert_eq!(open(&b), 0, "a later price settles it");
    let row = &b.query(&format!("SELECT resolved_by FROM p2p_conflicts WHERE id = {conflict}"))[0];
    assert_eq!(row["resolvedBy"], json!("superseded"));
    assert_eq!(a.dump(), b.dump());
}

#[test]
fn deciding_a_conflict_for_the_deleted_version_leaves_every_till_with_the_same_record() {
    // Seed 30073: deciding "keep it deleted" on a record already deleted wrote nothing, and
    // the tombstone's fields (which a later concurrent edit can bring back) stayed different
    // on the deciding till.
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_700_000_000_000);
    let (mut a, mut b, _) = a_price_conflict_open_on_b(&dir, &clock);
    assert_ne!(a.dump(), b.dump(), "the prices differ while the conflict is open");
    // A deletes the product, having seen both prices; B keeps its conflict open (the delete
    // writes no price).
    clock.advance(10);
    a.store.delete_record(EntityKind::Product, &id("tea")).unwrap();
    sync(&mut a, &mut b, 100);
    let open = b.query("SELECT id FROM p2p_conflicts WHERE resolved_by IS NULL");
    assert_eq!(open.len(), 1, "{open:?}");
    b.store.resolve_conflict(open[0]["id"].as_i64().unwrap(), &Resolution::Local, "manager").unwrap();
    sync(&mut b, &mut a, 100);
    assert_eq!(a.dump(), b.dump(), "one record, deleted, with the same fields on both tills");
}

#[test]
fn deciding_a_ticket_status_conflict_travels_as_a_status_change_every_till_accepts() {
    // Seed 30019: the decision on a ticket's status went out as a plain ticket update, which
    // every other till refused ("unsupported change ticket/update").
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_700_000_000_000);
    let (mut a, mut b) = two_manual_tills_with_tea(&dir, &clock);
    let ticket = a.store.record_sale(&sale("tea", "2", "2")).unwrap()["id"].as_str().unwrap().to_string();
    sync(&mut a, &mut b, 100);
    clock.advance(10);
    a.store.cancel_ticket(&id(&ticket), None).unwrap();
    clock.advance(10);
    b.store.refund_ticket(&id(&ticket), None, Some("returned")).unwrap();
    sync(&mut a, &mut b, 100);
    sync(&mut b, &mut a, 100);
    let on_a = a.query("SELECT id FROM p2p_conflicts WHERE resolved_by IS NULL");
    assert_eq!(on_a.len(), 1, "{on_a:?}");
    a.store.resolve_conflict(on_a[0]["id"].as_i64().unwrap(), &Resolution::Remote, "manager").unwrap();
    let report = sync(&mut a, &mut b, 100);
    assert_eq!(report.errors, 0, "B accepts the decision: {report:?}");
    assert_eq!(b.count("SELECT COUNT(*) FROM p2p_conflicts WHERE resolved_by IS NULL"), 0, "B's copy closed");
    assert_eq!(a.dump(), b.dump());
    let status = b.query(&format!("SELECT status FROM tickets WHERE id = '{ticket}'"));
    assert_eq!(status[0]["status"], json!("refunded"));
}
