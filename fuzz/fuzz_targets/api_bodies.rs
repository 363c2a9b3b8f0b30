//! What the API's JSON bodies reach: sales, refunds, record writes and cash sessions, parsed
//! as the API parses them and written into a real store (a catalog of three products, a
//! category, a customer).
//!
//! Checked (SPEC section 8): a refused call changes nothing (the store's canonical dump is
//! the same before and after), an accepted one advances the store's version vector, and
//! nothing panics.
#![no_main]
use std::cell::RefCell;
use std::path::PathBuf;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use possync_core::{EntityId, EntityKind, PosId};
use possync_store::{
    CloseCashSession, OpenCashSession, RefundLine, SaleOutcome, SaleRequest, Store, SystemEnvironment,
};
use serde_json::{Value, json};

#[derive(Debug, Arbitrary)]
enum Call<'a> {
    /// A sale built from parts (lines of the known products, payments), so that most are
    /// well formed and reach the store's checks.
    BuiltSale {
        id: Option<&'a str>,
        customer: bool,
        lines: Vec<Line<'a>>,
        payments: Vec<(u8, Amount<'a>)>,
    },
    Sale(&'a [u8]),
    SaleOnce(&'a [u8]),
    Refund {
        ticket: u8,
        lines: &'a [u8],
        reason: Option<&'a str>,
    },
    Cancel {
        ticket: u8,
        reason: Option<&'a str>,
    },
    Create {
        kind: u8,
        body: &'a [u8],
    },
    Update {
        kind: u8,
        id: &'a str,
        body: &'a [u8],
    },
    Delete {
        kind: u8,
        id: &'a str,
    },
    OpenCash(&'a [u8]),
    CloseCash {
        session: &'a str,
        body: &'a [u8],
    },
}

#[derive(Debug, Arbitrary)]
struct Line<'a> {
    product: u8,
    quantity: Amount<'a>,
    unit_price: Option<Amount<'a>>,
    discount_rate: Option<Amount<'a>>,
}

/// An amount: mostly a plausible one (cents), sometimes any text.
#[derive(Debug, Arbitrary)]
enum Amount<'a> {
    Cents(u16),
    Whole(u8),
    Text(&'a str),
}

impl Amount<'_> {
    fn json(&self) -> Value {
        match self {
            Amount::Cents(cents) => json!(format!("{}.{:02}", cents / 100, cents % 100)),
            Amount::Whole(units) => json!(units),
            Amount::Text(text) => json!(text),
        }
    }
}

const METHODS: [&str; 6] = ["cash", "card", "transfer", "check", "other", "bitcoin"];

const KINDS: [EntityKind; 6] = [
    EntityKind::Product,
    EntityKind::Category,
    EntityKind::Customer,
    EntityKind::User,
    EntityKind::CashSession,
    EntityKind::ZReport,
];

struct Harness {
    store: Store,
    tickets: Vec<EntityId>,
    writes: u32,
}

thread_local! {
    static HARNESS: RefCell<Option<Harness>> = const { RefCell::new(None) };
}

/// A fresh store with a small catalog, in memory-backed storage when the machine has it.
fn fresh() -> Harness {
    let base =
        if PathBuf::from("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
    let dir = base.join(format!("possync-fuzz-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a scratch directory");
    let path = dir.join("node.db");
    let pos_id = PosId::parse("till-f").expect("a valid posId");
    let mut store = Store::init(&path, Some(pos_id), "Fuzz", Box::new(SystemEnvironment::default()))
        .expect("a new store");
    store.create_record(EntityKind::Category, &json!({"id": "cat-1", "name": "Drinks"})).expect("category");
    for p in 1..=3 {
        let body = json!({"id": format!("p-{p}"), "sku": format!("SKU-{p}"), "name": format!("Product {p}"),
                          "price": format!("{p}.50"), "categoryId": "cat-1"});
        store.create_record(EntityKind::Product, &body).expect("product");
    }
    store.create_record(EntityKind::Customer, &json!({"id": "cust-1", "name": "Ada"})).expect("customer");
    Harness { store, tickets: Vec::new(), writes: 0 }
}

fn dump(store: &Store) -> String {
    store.reader().and_then(|reader| reader.canonical_dump()).expect("the dump reads")
}

fn id(raw: &str) -> Option<EntityId> {
    EntityId::parse(raw).ok()
}

fn run(harness: &mut Harness, call: Call<'_>) -> Option<Result<Value, possync_store::StoreError>> {
    let store = &mut harness.store;
    let ticket = |index: u8| harness.tickets.get(usize::from(index) % harness.tickets.len().max(1)).cloned();
    Some(match call {
        Call::BuiltSale { id, customer, lines, payments } => {
            let lines: Vec<Value> = lines
                .iter()
                .map(|line| {
                    let product = format!("p-{}", line.product % 4);
                    let mut body = json!({"productId": product, "quantity": line.quantity.json()});
                    if let Some(price) = &line.unit_price {
                        body["unitPrice"] = price.json();
                    }
                    if let Some(rate) = &line.discount_rate {
                        body["discountRate"] = rate.json();
                    }
                    body
                })
                .collect();
            let payments: Vec<Value> = payments
                .iter()
                .map(|(method, amount)| json!({"method": METHODS[usize::from(*method) % METHODS.len()], "amount": amount.json()}))
                .collect();
            let mut body = json!({"lines": lines, "payments": payments});
            if let Some(id) = id {
                body["id"] = json!(id);
            }
            if customer {
                body["customerId"] = json!("cust-1");
            }
            store.record_sale(&serde_json::from_value::<SaleRequest>(body).ok()?)
        }
        Call::Sale(body) => store.record_sale(&serde_json::from_slice::<SaleRequest>(body).ok()?),
        Call::SaleOnce(body) => store
            .record_sale_once(&serde_json::from_slice::<SaleRequest>(body).ok()?)
            .map(|outcome| match outcome {
                SaleOutcome::Recorded(ticket) => ticket,
                SaleOutcome::AlreadyRecorded(_) => json!("Replayed"),
            }),
        Call::Refund { ticket: index, lines, reason } => {
            let lines: Option<Vec<RefundLine>> = serde_json::from_slice(lines).ok()?;
            store.refund_ticket(&ticket(index)?, lines.as_deref(), reason)
        }
        Call::Cancel { ticket: index, reason } => store.cancel_ticket(&ticket(index)?, reason),
        Call::Create { kind, body } => {
            store.create_record(KINDS[usize::from(kind) % KINDS.len()], &serde_json::from_slice(body).ok()?)
        }
        Call::Update { kind, id: raw, body } => store.update_record(
            KINDS[usize::from(kind) % KINDS.len()],
            &id(raw)?,
            &serde_json::from_slice(body).ok()?,
        ),
        Call::Delete { kind, id: raw } => {
            store.delete_record(KINDS[usize::from(kind) % KINDS.len()], &id(raw)?).map(|()| Value::Null)
        }
        Call::OpenCash(body) => {
            store.open_cash_session(&serde_json::from_slice::<OpenCashSession>(body).ok()?)
        }
        Call::CloseCash { session, body } => {
            store.close_cash_session(&id(session)?, &serde_json::from_slice::<CloseCashSession>(body).ok()?)
        }
    })
}

fuzz_target!(|calls: Vec<Call<'_>>| {
    HARNESS.with(|cell| {
        let mut slot = cell.borrow_mut();
        // A store that grew from many accepted writes is replaced, to keep the dump cheap.
        if slot.as_ref().is_none_or(|harness| harness.writes > 500) {
            *slot = Some(fresh());
        }
        let harness = slot.as_mut().expect("set above");
        for call in calls.into_iter().take(16) {
            let before_dump = dump(&harness.store);
            let before_summary = harness.store.summary().clone();
            let Some(result) = run(harness, call) else { continue };
            match result {
                Err(error) => {
                    assert_eq!(
                        harness.store.summary(),
                        &before_summary,
                        "refused ({error}) but a change was written"
                    );
                    assert_eq!(dump(&harness.store), before_dump, "refused ({error}) but the data changed");
                }
                Ok(answer) => {
                    harness.writes += 1;
                    if let Some(ticket) =
                        answer.get("ticketNumber").and(answer.get("id")).and_then(Value::as_str)
                    {
                        harness.tickets.extend(id(ticket));
                    }
                    let after = harness.store.summary();
                    // A sale re-sent with the same id and body is answered without a write.
                    let replay = answer == json!("Replayed");
                    assert!(
                        replay || after != &before_summary,
                        "accepted but no change was written: {answer}"
                    );
                }
            }
        }
    });
});
