//! Changes from peers, catch-up batches and the chain's backbone: `WireChange` read from JSON,
//! its stamp peeked, then decoded and validated. A change that decodes encodes to one that
//! decodes to the same change.
#![no_main]
use libfuzzer_sys::fuzz_target;
use possync_core::protocol::message::StampedChange;
use possync_core::{Change, WireChange};

fuzz_target!(|data: &[u8]| {
    let Ok(wire) = serde_json::from_slice::<WireChange>(data) else { return };
    let _ = wire.peek_stamp();
    let _ = wire.data_object();
    if let Ok(change) = Change::from_wire(&wire) {
        let encoded = change.to_wire();
        let again = Change::from_wire(&encoded).expect("an encoded change decodes");
        assert_eq!(again, change);
        let stamp = encoded.peek_stamp().expect("an encoded change has a stamp");
        assert_eq!((stamp.origin, stamp.seq), (change.origin.clone(), change.seq));
    }
    let _ = StampedChange::new(wire, "data");
});
