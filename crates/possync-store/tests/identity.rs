//! Each till writes only as itself (issue 13, item 3): a change is merged only if its origin
//! signed it; a forged one is refused, logged and counted, never silent, and the real one
//! still lands; a revoked till's later changes are refused on every till.

mod common;

use common::{ManualClock, sync, terminal};
use possync_core::{EntityKind, Seq, WireChange};
use possync_store::PeerRef;
use serde_json::json;

/// A change of `origin` numbered `seq` that writes a price, as a forger would make it.
fn price_change(origin: &str, seq: u64, price: &str) -> WireChange {
    WireChange::new(
        "product",
        "update",
        &json!({
            "id": "tea",
            "price": price,
            "sync": {"origin": origin, "seq": seq, "hlc": "1700000099000-0", "ctx": {origin: seq}},
        }),
    )
}

/// A till's own edit of the tea's price (a change in its name, signed by it).
fn set_tea_price(till: &mut common::Terminal, price: serde_json::Value) {
    let tea = possync_core::EntityId::parse("tea").unwrap();
    till.store.update_record(EntityKind::Product, &tea, &json!({ "price": price })).unwrap();
}

#[test]
fn a_change_written_in_another_tills_name_is_refused_and_the_real_one_still_lands() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_700_000_000_000);
    let mut a = terminal(&dir, "a", &clock, 0);
    let mut b = terminal(&dir, "b", &clock, 0);
    let mut evil = terminal(&dir, "evil", &clock, 0);
    a.store
        .create_record(EntityKind::Product, &json!({"id": "tea", "sku": "T1", "name": "Tea", "price": 2}))
        .unwrap();
    sync(&mut a, &mut b, 100);
    sync(&mut a, &mut evil, 100);
    let next = a.store.summary().get(&a.pos_id()).next();
    let dump = b.dump();

    // Signed by another till's key, unsigned, or signed by A and then edited: all refused.
    let mut signed_by_evil = price_change("a", next.0, "0.01");
    evil.store.sign(&mut signed_by_evil);
    let unsigned = price_change("a", next.0, "0.02");
    let mut edited = price_change("a", next.0, "3");
    a.store.sign(&mut edited);
    edited.edit_data(|data| data["price"] = json!("0.03"));
    for forged in [signed_by_evil, unsigned, edited] {
        let report = b.store.apply_batch(PeerRef { id: "evil", name: "evil" }, vec![forged]).unwrap();
        assert_eq!(
            (report.applied, report.forged, report.errors, report.gap),
            (0, 1, 1, false),
            "{report:?}"
        );
    }
    assert_eq!(b.dump(), dump, "nothing of the forgeries is kept");
    assert_eq!(b.store.summary().get(&a.pos_id()), Seq(next.0 - 1), "the number is still free");
    let rows = b.query(
        "SELECT status, conflict_reason, details FROM p2p_sync_logs WHERE conflict_reason LIKE 'forged:%'",
    );
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert!(rows[0]["details"].as_str().unwrap().contains("\"forged\":true"), "{rows:?}");
    let alerts = b.store.reader().unwrap().dashboard_rows(1_700_000_000_000).unwrap().alert_forged;
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0]["origin"], json!("a"));

    // A's real change with that number lands, and the tills agree.
    set_tea_price(&mut a, json!(3));
    let report = sync(&mut a, &mut b, 100);
    assert_eq!((report.applied, report.forged), (1, 0), "{report:?}");
    assert_eq!(a.dump(), b.dump());
}

#[test]
fn a_change_claiming_the_receivers_own_origin_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_700_000_000_000);
    let mut b = terminal(&dir, "b", &clock, 0);
    let evil = terminal(&dir, "evil", &clock, 0);
    b.store
        .create_record(EntityKind::Product, &json!({"id": "tea", "sku": "T1", "name": "Tea", "price": 2}))
        .unwrap();
    let dump = b.dump();
    let next = b.store.summary().get(&b.pos_id()).next();
    let mut forged = price_change("b", next.0, "0.01");
    evil.store.sign(&mut forged);
    let report = b.store.apply_batch(PeerRef { id: "evil", name: "evil" }, vec![forged]).unwrap();
    assert_eq!((report.applied, report.forged), (0, 1), "{report:?}");
    assert_eq!(b.dump(), dump);
    // B's next write takes that number itself.
    set_tea_price(&mut b, json!(3));
    assert_eq!(b.store.summary().get(&b.pos_id()), next);
}

#[test]
fn a_revoked_till_is_refused_after_its_last_change_on_every_till() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_700_000_000_000);
    let mut a = terminal(&dir, "a", &clock, 0);
    let mut b = terminal(&dir, "b", &clock, 0);
    let mut lost = terminal(&dir, "lost", &clock, 0);
    lost.store
        .create_record(EntityKind::Product, &json!({"id": "tea", "sku": "T1", "name": "Tea", "price": 2}))
        .unwrap();
    sync(&mut lost, &mut a, 100);
    let held = a.store.summary().get(&lost.pos_id());
    // The till is stolen: A revokes it. Its changes up to what A holds stay valid.
    let revocation = a.store.revoke_terminal(&lost.pos_id(), Some("stolen")).unwrap();
    assert_eq!(revocation["untilSeq"], json!(held.0));
    assert!(a.store.revoke_terminal(&a.pos_id(), None).is_err(), "a till cannot revoke itself");
    sync(&mut a, &mut b, 100);
    sync(&mut lost, &mut b, 100);
    // What the thief writes afterwards is refused everywhere.
    clock.advance(1000);
    set_tea_price(&mut lost, json!(0.01));
    for till in [&mut a, &mut b] {
        let report = sync(&mut lost, till, 100);
        let last = till.query("SELECT conflict_reason FROM p2p_sync_logs ORDER BY id DESC LIMIT 1");
        assert_eq!((report.applied, report.forged), (0, 1), "{}: {report:?} {last:?}", till.name);
        let reason = till.query("SELECT conflict_reason FROM p2p_sync_logs ORDER BY id DESC LIMIT 1");
        assert!(reason[0]["conflictReason"].as_str().unwrap().starts_with("revoked:"), "{reason:?}");
    }
    assert_eq!(a.dump(), b.dump());
    assert_eq!(a.store.summary().get(&lost.pos_id()), held);
    let listed = b.store.reader().unwrap().terminals().unwrap();
    let lost_row = listed.iter().find(|row| row["posId"] == json!("lost")).unwrap();
    assert_eq!(
        (lost_row["revokedAfterSeq"].clone(), lost_row["revokeReason"].clone()),
        (json!(held.0), json!("stolen"))
    );
    assert!(lost_row["publicKey"].is_string());
}

#[test]
fn one_forged_change_in_a_batch_of_real_ones_is_found_and_the_real_ones_applied() {
    // Signatures are checked a batch at a time; a bad one makes the batch check fail, and
    // each change is then checked alone.
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_700_000_000_000);
    let mut a = terminal(&dir, "a", &clock, 0);
    let mut b = terminal(&dir, "b", &clock, 0);
    let evil = terminal(&dir, "evil", &clock, 0);
    a.store
        .create_record(EntityKind::Product, &json!({"id": "tea", "sku": "T1", "name": "Tea", "price": 2}))
        .unwrap();
    sync(&mut a, &mut b, 100);
    let tea = possync_core::EntityId::parse("tea").unwrap();
    for price in 3..6 {
        a.store.update_record(EntityKind::Product, &tea, &json!({"price": price})).unwrap();
    }
    let mut batch = a.store.reader().unwrap().select_changes(b.store.summary(), 0, 100).unwrap().changes;
    assert_eq!(batch.len(), 3);
    let next = a.store.summary().get(&a.pos_id()).next();
    let mut forged = price_change("a", next.0, "0.01");
    evil.store.sign(&mut forged);
    // The forgery claims the number after the real three, in the same batch.
    batch.push(forged);
    let report = b.store.apply_batch(PeerRef { id: "evil", name: "evil" }, batch).unwrap();
    assert_eq!((report.applied, report.forged), (3, 1), "{report:?}");
    assert_eq!(a.dump(), b.dump());
}

#[test]
fn signatures_checked_before_the_writer_count_only_with_the_origins_enrolled_key() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_700_000_000_000);
    let mut a = terminal(&dir, "a", &clock, 0);
    let mut b = terminal(&dir, "b", &clock, 0);
    let evil = terminal(&dir, "evil", &clock, 0);
    let mut dupe = terminal(&dir, "dupe", &clock, 0);
    a.store
        .create_record(EntityKind::Product, &json!({"id": "tea", "sku": "T1", "name": "Tea", "price": 2}))
        .unwrap();
    sync(&mut a, &mut b, 100);
    let next = a.store.summary().get(&a.pos_id()).next();

    // A till that never met A takes a forged enrollment of A with the forger's key (trust on
    // first use): its directory now checks A's changes against the wrong key.
    let mut enroll = WireChange::new(
        "terminal",
        "enroll",
        &json!({"id": "a", "publicKey": evil.store.public_key(),
                "sync": {"origin": "a", "seq": 1, "hlc": "1700000000001-0", "ctx": {"a": 1}}}),
    );
    evil.store.sign(&mut enroll);
    let report = dupe.store.apply_batch(PeerRef { id: "evil", name: "evil" }, vec![enroll]).unwrap();
    assert_eq!(report.applied, 1, "{report:?}");
    let mut forged = price_change("a", next.0, "0.01");
    evil.store.sign(&mut forged);
    let wrong = dupe.store.key_directory().verify(std::slice::from_ref(&forged));
    assert_eq!(wrong.checked(), 1, "the poisoned directory vouches for the forgery");

    // B's writer holds A's real key: a check made with another key counts for nothing.
    let dump = b.dump();
    let report = b
        .store
        .apply_batch_verified(PeerRef { id: "evil", name: "evil" }, vec![forged], Some(wrong))
        .unwrap();
    assert_eq!((report.applied, report.forged), (0, 1), "{report:?}");
    assert_eq!(b.dump(), dump);

    // A's real change, checked with B's own directory, lands.
    set_tea_price(&mut a, json!(3));
    let real = a.store.reader().unwrap().select_changes(&b.store.summary().clone(), 0, 10).unwrap().changes;
    let checked = b.store.key_directory().verify(&real);
    assert_eq!(checked.checked(), real.len());
    let report = b.store.apply_batch_verified(PeerRef { id: "a", name: "a" }, real, Some(checked)).unwrap();
    assert_eq!((report.applied, report.forged), (1, 0), "{report:?}");
    assert_eq!(a.dump(), b.dump());
}
