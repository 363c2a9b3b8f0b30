//! Two tills with one identity (issue 13, item 2): a till restored from a backup that sold
//! before meeting a peer recovers its own history from the peer's copies. The peers' originals
//! and the sales made in between both end on every till, exactly once, under the till's own
//! origin and a new one (`<posId>-r<k>`), and the tills end identical.

mod common;

use std::path::{Path, PathBuf};

use common::{ManualClock, Terminal, sync, terminal};
use possync_core::entity::PaymentMethod;
use possync_core::protocol::StampedChange;
use possync_core::{EntityId, EntityKind, PosId, Seq};
use possync_store::{
    PaymentRequest, PeerRef, RecoveryError, RefundLine, SaleLineRequest, SaleRequest, Store, StoreError,
};
use rust_decimal::Decimal;
use serde_json::json;

const P: PeerRef<'static> = PeerRef { id: "p", name: "p" };

fn pos(name: &str) -> PosId {
    PosId::parse(name).unwrap()
}

fn id(raw: &str) -> EntityId {
    EntityId::parse(raw).unwrap()
}

/// The highest change of `origin` the till holds.
fn held(till: &Terminal, origin: &str) -> u64 {
    till.store.summary().get(&pos(origin)).0
}

/// Sells one of `product`; returns the ticket id.
fn sell(till: &mut Terminal, clock: &ManualClock, product: &str) -> String {
    clock.advance(1000);
    let request = SaleRequest {
        id: None,
        customer_id: None,
        lines: vec![SaleLineRequest {
            product_id: id(product),
            quantity: Decimal::ONE,
            unit_price: None,
            discount_rate: None,
        }],
        payments: vec![PaymentRequest {
            method: PaymentMethod::Card,
            amount: Decimal::from(10_000),
            reference: None,
        }],
        notes: None,
    };
    till.store.record_sale(&request).unwrap()["id"].as_str().unwrap().to_string()
}

fn set_price(till: &mut Terminal, clock: &ManualClock, product: &str, price: i64) {
    clock.advance(1000);
    till.store.update_record(EntityKind::Product, &id(product), &json!({ "price": price })).unwrap();
}

fn count_stock(till: &mut Terminal, clock: &ManualClock, product: &str, counted: i64) {
    clock.advance(1000);
    till.store.count_stock(&id(product), Decimal::from(counted), Some("count")).unwrap();
}

/// Closes the till's database (SQLite folds the WAL back into the file).
fn close(till: Terminal) -> (String, PathBuf) {
    let Terminal { name, path, store } = till;
    drop(store);
    assert!(!wal(&path).exists(), "the WAL is folded back at close");
    (name, path)
}

fn wal(path: &Path) -> PathBuf {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    PathBuf::from(wal)
}

fn open(name: String, path: PathBuf, clock: &ManualClock, seed: u64) -> Terminal {
    let store = Store::open(&path, common::env(clock, 0, seed)).unwrap();
    Terminal { name, path, store }
}

/// A peer's copies of `origin`'s changes after `after`, as a catch-up carries them.
fn copies_of(peer: &Terminal, origin: &str, after: u64) -> Vec<StampedChange> {
    let changes = peer.store.reader().unwrap().origin_changes(&pos(origin), Seq(after), 10_000).unwrap();
    changes
        .into_iter()
        .map(|wire| {
            let stamp = wire.peek_stamp().unwrap();
            StampedChange { origin: stamp.origin, seq: stamp.seq, wire }
        })
        .collect()
}

/// Syncs both ways until nothing moves.
fn exchange(a: &mut Terminal, b: &mut Terminal) {
    for _ in 0..10 {
        let one = sync(a, b, 40);
        let two = sync(b, a, 40);
        if one.applied + one.conflicts + two.applied + two.conflicts == 0 && !one.gap && !two.gap {
            return;
        }
    }
    panic!("{} and {} never went quiet", a.name, b.name);
}

/// What must hold on every till at the end.
fn assert_sound(till: &Terminal, tickets: &[String]) {
    for ticket in tickets {
        let count = till.count(&format!("SELECT COUNT(*) AS n FROM tickets WHERE id = '{ticket}'"));
        assert_eq!(count, 1, "{}: ticket {ticket}", till.name);
    }
    let off = till.count(
        "SELECT COUNT(*) AS n FROM products p
         WHERE CAST(p.stock AS REAL) <> COALESCE((SELECT SUM(CAST(m.quantity AS REAL)) FROM stock_movements m
                                                  WHERE m.product_id = p.id), 0)",
    );
    assert_eq!(off, 0, "{}: stock is the sum of the movements", till.name);
    let twice = till.count(
        "SELECT COUNT(*) AS n FROM (SELECT ticket_number FROM tickets GROUP BY ticket_number HAVING COUNT(*) > 1)",
    );
    assert_eq!(twice, 0, "{}: ticket numbers are unique", till.name);
}

struct Scenario {
    clock: ManualClock,
    t: Terminal,
    p: Terminal,
    /// Every sale T made before its disk died (1..150).
    originals: Vec<String>,
    /// The sales T made after the restore, before meeting P.
    in_between: Vec<String>,
    /// P's sales.
    p_sales: Vec<String>,
    /// T's own ticket refunded in between.
    refunded_in_between: String,
    _dir: tempfile::TempDir,
}

/// T writes 1..150 (sales, price edits, stock counts, a refund); P takes them all; T's disk
/// dies and is restored from a backup taken at 100; T then writes 101..120 with other
/// sales, a count, a new product, a price edit and a refund, while P sells too.
fn restored_till_that_sold_in_between() -> Scenario {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_700_000_000_000);
    let mut t = terminal(&dir, "t", &clock, 0);
    let mut p = terminal(&dir, "p", &clock, 0);
    for (product, price) in [("tea", 2), ("cake", 4)] {
        t.store
            .create_record(
                EntityKind::Product,
                &json!({"id": product, "sku": product, "name": product, "price": price}),
            )
            .unwrap();
    }
    count_stock(&mut t, &clock, "tea", 500);
    count_stock(&mut t, &clock, "cake", 300);
    sync(&mut t, &mut p, 50);
    p.store
        .create_record(EntityKind::Product, &json!({"id": "bun", "sku": "bun", "name": "Bun", "price": 1}))
        .unwrap();
    sync(&mut p, &mut t, 50);
    let mut originals = Vec::new();
    let mut step = 0;
    while held(&t, "t") < 100 {
        step += 1;
        if step % 10 == 0 {
            set_price(&mut t, &clock, "tea", 2 + step);
        } else {
            originals.push(sell(&mut t, &clock, ["tea", "cake", "bun"][step as usize % 3]));
        }
    }
    sync(&mut t, &mut p, 50);

    // The backup, taken at T's change 100.
    let backup = dir.path().join("t-backup.db");
    let (name, path) = close(t);
    std::fs::copy(&path, &backup).unwrap();
    let mut t = open(name, path, &clock, 1);

    // P creates a product T edits before its disk dies (the backup lacks it).
    p.store
        .create_record(
            EntityKind::Product,
            &json!({"id": "scone", "sku": "scone", "name": "Scone", "price": 3}),
        )
        .unwrap();
    sync(&mut p, &mut t, 50);
    set_price(&mut t, &clock, "scone", 5);
    count_stock(&mut t, &clock, "cake", 250);
    while held(&t, "t") < 149 {
        step += 1;
        if step % 8 == 0 {
            set_price(&mut t, &clock, "tea", 2 + step);
        } else {
            originals.push(sell(&mut t, &clock, ["tea", "cake", "scone"][step as usize % 3]));
        }
    }
    let refund = [RefundLine { product_id: id("tea"), quantity: Decimal::ONE }];
    let first_tea = originals.iter().rev().find(|ticket| {
        t.count(&format!(
            "SELECT COUNT(*) AS n FROM ticket_lines WHERE ticket_id = '{ticket}' AND product_id = 'tea'"
        )) == 1
    });
    t.store.refund_ticket(&id(first_tea.unwrap()), Some(&refund), None).unwrap();
    assert_eq!(held(&t, "t"), 150);
    sync(&mut t, &mut p, 50);
    assert_eq!(held(&p, "t"), 150);

    // The disk dies; the backup is restored.
    let (name, path) = close(t);
    std::fs::remove_file(&path).unwrap();
    std::fs::copy(&backup, &path).unwrap();
    let mut t = open(name, path, &clock, 2);
    assert_eq!(held(&t, "t"), 100);

    // Before meeting any peer, T sells: 101..120, other content.
    count_stock(&mut t, &clock, "tea", 400);
    clock.advance(1000);
    t.store
        .create_record(
            EntityKind::Product,
            &json!({"id": "muffin", "sku": "muffin", "name": "Muffin", "price": 3}),
        )
        .unwrap();
    set_price(&mut t, &clock, "tea", 9);
    let mut in_between = Vec::new();
    while held(&t, "t") < 118 {
        in_between.push(sell(&mut t, &clock, ["tea", "muffin"][in_between.len() % 2]));
    }
    let refunded_in_between = in_between[0].clone();
    t.store.refund_ticket(&id(&refunded_in_between), None, Some("returned")).unwrap();
    in_between.push(sell(&mut t, &clock, "cake"));
    assert_eq!(held(&t, "t"), 120);

    // P sells and edits meanwhile.
    let p_sales = vec![sell(&mut p, &clock, "cake"), sell(&mut p, &clock, "scone")];
    set_price(&mut p, &clock, "cake", 6);
    Scenario { clock, t, p, originals, in_between, p_sales, refunded_in_between, _dir: dir }
}

#[test]
fn a_restored_till_that_sold_in_between_recovers_and_every_sale_ends_on_both_tills_once() {
    let Scenario { clock, mut t, mut p, originals, in_between, p_sales, refunded_in_between, _dir } =
        restored_till_that_sold_in_between();
    assert_eq!(in_between.len(), 16);
    let copies = copies_of(&p, "t", 90);
    assert_eq!(copies.len(), 60);

    let report = t.store.recover_own_history(P, copies.clone()).unwrap();
    assert!(report.recovered());
    assert_eq!(report.origin, Some(pos("t")));
    assert_eq!(report.first_displaced, Some(Seq(101)));
    assert_eq!((report.displaced, report.reissued, report.taken_back), (20, 20, 0), "{report:?}");
    assert!(report.not_reissued.is_empty(), "{:?}", report.not_reissued);
    assert_eq!(report.new_origin, Some(pos("t-r1")));
    assert_eq!(report.reissued_seqs, Some((Seq(2), Seq(21))), "the new origin's enrollment is 1");
    // T's edit of the scone (change 101) needs P's scone, which the backup lacks: the
    // copies from there on wait for the catch-up, as any.
    assert!(report.applied.gap, "{:?}", report.applied);
    // Every sale made in between had a number an original sale holds.
    assert_eq!(report.renumbered.len(), in_between.len(), "{:?}", report.renumbered);
    assert_eq!(t.store.writing_origin(), &pos("t-r1"));
    assert_eq!(t.store.own_origins(), &[pos("t"), pos("t-r1")]);
    assert_eq!(held(&t, "t-r1"), 21);
    let audit =
        t.query("SELECT status, conflict_reason, details FROM p2p_sync_logs WHERE message_type = 'recovery'");
    assert_eq!(audit.len(), 1, "{audit:?}");
    assert_eq!(
        audit[0]["conflictReason"],
        json!(
            "recovered: 20 own changes from seq 101 of t displaced by p's copies; re-issued 20 as t-r1 2..21"
        )
    );
    let set_aside = t.query(
        "SELECT COUNT(*) AS n, MIN(seq) AS first, MAX(seq) AS last, MIN(outcome) AS outcome, MIN(new_origin) AS new
         FROM displaced_changes",
    );
    assert_eq!(
        set_aside[0],
        json!({"n": 20, "first": 101, "last": 120, "outcome": "reissued", "new": "t-r1"})
    );

    exchange(&mut t, &mut p);
    assert_eq!(held(&t, "t"), 150);
    assert_eq!(held(&p, "t-r1"), 21);
    assert_eq!(t.dump(), p.dump());
    let everything: Vec<String> = originals.iter().chain(&in_between).chain(&p_sales).cloned().collect();
    for till in [&t, &p] {
        assert_sound(till, &everything);
        assert_eq!(till.count("SELECT COUNT(*) AS n FROM tickets"), everything.len() as i64, "{}", till.name);
        assert_eq!(
            till.query(&format!("SELECT status FROM tickets WHERE id = '{refunded_in_between}'")),
            vec![json!({"status": "refunded"})]
        );
        // The price set in between is an edit made at recovery time: it wins.
        assert_eq!(till.query("SELECT price FROM products WHERE id = 'tea'"), vec![json!({"price": "9"})]);
    }
    assert_eq!(
        t.store.reader().unwrap().origin_changes(&pos("t"), Seq(0), 1000).unwrap(),
        p.store.reader().unwrap().origin_changes(&pos("t"), Seq(0), 1000).unwrap(),
        "T holds the peers' history of its origin"
    );
    let forks = p.count("SELECT COUNT(*) AS n FROM p2p_sync_logs WHERE conflict_reason LIKE 'fork:%'");
    assert_eq!(forks, 0);

    // A second call changes nothing.
    let dump = t.dump();
    let again = t.store.recover_own_history(P, copies).unwrap();
    assert!(!again.recovered(), "{again:?}");
    assert_eq!((again.displaced, again.reissued, again.applied.applied), (0, 0, 0), "{again:?}");
    assert_eq!(t.dump(), dump);
    assert_eq!(t.count("SELECT COUNT(*) AS n FROM displaced_changes"), 20);
    assert_eq!(t.count("SELECT COUNT(*) AS n FROM p2p_sync_logs WHERE message_type = 'recovery'"), 1);

    // Reopened, T keeps writing as its new origin; its next ticket number is a new one.
    let (name, path) = close(t);
    let mut t = open(name, path, &clock, 3);
    assert_eq!(t.store.writing_origin(), &pos("t-r1"));
    assert_eq!(t.store.own_origins(), &[pos("t"), pos("t-r1")]);
    assert_eq!(t.store.reader().unwrap().own_origins().unwrap(), (pos("t-r1"), vec![pos("t"), pos("t-r1")]));
    assert_eq!(p.store.reader().unwrap().own_origins().unwrap(), (pos("p"), vec![pos("p")]));
    let after = sell(&mut t, &clock, "tea");
    assert_eq!((held(&t, "t"), held(&t, "t-r1")), (150, 22));
    exchange(&mut t, &mut p);
    assert_eq!(t.dump(), p.dump());
    let everything: Vec<String> = everything.into_iter().chain([after]).collect();
    assert_sound(&t, &everything);
    assert_sound(&p, &everything);
    // A till does not revoke any origin it writes or wrote as.
    assert!(t.store.revoke_terminal(&pos("t"), None).is_err());
    assert!(t.store.revoke_terminal(&pos("t-r1"), None).is_err());
}

#[test]
fn a_forged_copy_changes_nothing() {
    let Scenario { mut t, p, _dir, .. } = restored_till_that_sold_in_between();
    let evil = terminal(&_dir, "evil", &ManualClock::new(1_700_000_000_000), 0);
    let dump = t.dump();
    let summary = t.store.summary().clone();
    let logs = t.count("SELECT COUNT(*) AS n FROM p2p_sync_logs");
    let copies = copies_of(&p, "t", 100);

    // Edited after signing (the first differing copy, or a later one), or signed by another
    // till's key: the whole call is refused.
    let mut edited_first = copies.clone();
    edited_first[0].wire.edit_data(|data| data["price"] = json!("0.01"));
    let mut edited_later = copies.clone();
    edited_later[30].wire.edit_data(|data| data["notes"] = json!("forged"));
    let mut resigned = copies.clone();
    evil.store.sign(&mut resigned[0].wire);
    for (forged, seq) in [(edited_first, 101), (edited_later, 131), (resigned, 101)] {
        let err = t.store.recover_own_history(P, forged).unwrap_err();
        assert!(
            matches!(&err, StoreError::Recovery(RecoveryError::NotSigned { seq: refused, .. }) if refused.0 == seq),
            "{err}"
        );
        assert_eq!(t.dump(), dump);
        assert_eq!(t.store.summary(), &summary);
        assert_eq!(t.store.writing_origin(), &pos("t"));
        assert_eq!(t.count("SELECT COUNT(*) AS n FROM p2p_sync_logs"), logs);
        assert_eq!(t.count("SELECT COUNT(*) AS n FROM displaced_changes"), 0);
    }
    // Copies of another till's origin, or with a hole, are refused as well.
    let err = t.store.recover_own_history(P, copies_of(&p, "p", 0)).unwrap_err();
    assert!(matches!(err, StoreError::Recovery(RecoveryError::NotOwnOrigin { .. })), "{err}");
    let mut holed = copies;
    holed.remove(5);
    let err = t.store.recover_own_history(P, holed).unwrap_err();
    assert!(matches!(err, StoreError::Recovery(RecoveryError::NotContiguous { .. })), "{err}");
    assert_eq!(t.dump(), dump);
}

#[test]
fn a_restored_till_that_wrote_nothing_only_takes_its_changes_back() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_700_000_000_000);
    let mut t = terminal(&dir, "t", &clock, 0);
    let mut p = terminal(&dir, "p", &clock, 0);
    t.store
        .create_record(EntityKind::Product, &json!({"id": "tea", "sku": "T", "name": "Tea", "price": 2}))
        .unwrap();
    let backup = dir.path().join("t-backup.db");
    let (name, path) = close(t);
    std::fs::copy(&path, &backup).unwrap();
    let mut t = open(name, path, &clock, 1);
    for _ in 0..5 {
        sell(&mut t, &clock, "tea");
    }
    sync(&mut t, &mut p, 50);
    let (name, path) = close(t);
    std::fs::remove_file(&path).unwrap();
    std::fs::copy(&backup, &path).unwrap();
    let mut t = open(name, path, &clock, 2);
    assert_eq!(held(&t, "t"), 2);

    let report = t.store.recover_own_history(P, copies_of(&p, "t", 0)).unwrap();
    assert!(!report.recovered(), "{report:?}");
    assert_eq!((report.displaced, report.applied.applied, report.applied.skipped), (0, 5, 2), "{report:?}");
    assert_eq!(t.store.writing_origin(), &pos("t"));
    assert_eq!(t.dump(), p.dump());
    assert_eq!(t.count("SELECT COUNT(*) AS n FROM displaced_changes"), 0);
}
