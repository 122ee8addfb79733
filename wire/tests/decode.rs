//! encode and decode: round trips (whole batches and batches assembled from pieces), the
//! send time rewritten in place, every limit named in its error, and hostile bytes never
//! panic.

use proptest::prelude::*;
use wire::{
    Batch, Context, DecodeError, Event, EventKind, Item, Limits, Property, Purpose, Value, decode,
    encode,
};

fn event(n: u8) -> Event {
    Event {
        message_id: [n.max(1); 16],
        timestamp_ms: 1_700_000_000_000 + i64::from(n),
        kind: EventKind::CartAdd,
        name: Some("Added".into()),
        properties: vec![
            Property {
                key: "color".into(),
                value: Value::String("red".into()),
            },
            Property {
                key: "size".into(),
                value: Value::Int(42),
            },
            Property {
                key: "score".into(),
                value: Value::Float(0.5),
            },
            Property {
                key: "gift".into(),
                value: Value::Bool(true),
            },
        ],
        items: vec![Item {
            product_id: "sku-1".into(),
            category: Some("shoes".into()),
            price: 4999,
            quantity: 2,
            name: Some("Runner".into()),
        }],
        purpose: Purpose::Analytics,
        ..Default::default()
    }
}

fn batch(events: Vec<Event>) -> Batch {
    Batch {
        write_key: "demo".into(),
        sent_at_ms: 1_700_000_000_500,
        consent: 0b1111,
        context: Context {
            page_url: Some("https://shop.example/p/1".into()),
            anonymous_id: Some("anon-1".into()),
            session_id: Some("s-1".into()),
            screen_width: 1280,
            screen_height: 720,
            ..Default::default()
        },
        events,
    }
}

#[test]
fn full_batch_round_trips() {
    let b = batch(vec![event(1), event(2)]);
    assert_eq!(decode(&encode(&b), &Limits::default()), Ok(b));
}

#[test]
fn empty_and_largest_batches_round_trip() {
    let empty = Batch {
        write_key: "k".into(),
        ..Batch::default()
    };
    assert_eq!(decode(&encode(&empty), &Limits::default()), Ok(empty));
    let largest = batch(vec![event(7); wire::decode::MAX_EVENTS]);
    assert_eq!(decode(&encode(&largest), &Limits::default()), Ok(largest));
}

#[test]
fn oversized_body_names_size_and_limit() {
    let limits = Limits {
        max_bytes: 100,
        ..Limits::default()
    };
    let bytes = encode(&batch(vec![event(1)]));
    assert_eq!(
        decode(&bytes, &limits),
        Err(DecodeError::TooLarge {
            bytes: bytes.len(),
            limit: 100
        })
    );
}

#[test]
fn too_many_events_is_rejected() {
    let limits = Limits {
        max_events: 2,
        ..Limits::default()
    };
    let err = decode(&encode(&batch(vec![event(1), event(2), event(3)])), &limits).unwrap_err();
    assert_eq!(err.to_string(), "events has 3 elements, limit 2");
}

#[test]
fn too_many_properties_names_the_event() {
    let limits = Limits {
        max_properties: 3,
        ..Limits::default()
    };
    let err = decode(&encode(&batch(vec![event(1), event(2)])), &limits).unwrap_err();
    assert_eq!(
        err.to_string(),
        "events[0].properties has 4 elements, limit 3"
    );
}

#[test]
fn too_many_items_names_the_event() {
    let mut e = event(2);
    e.items = vec![e.items[0].clone(); 3];
    let limits = Limits {
        max_items: 2,
        ..Limits::default()
    };
    let err = decode(&encode(&batch(vec![event(1), e])), &limits).unwrap_err();
    assert_eq!(err.to_string(), "events[1].items has 3 elements, limit 2");
}

#[test]
fn long_strings_name_the_field_and_limit() {
    let mut e = event(1);
    e.properties[1].value = Value::String("x".repeat(300));
    let limits = Limits {
        max_string_bytes: 256,
        ..Limits::default()
    };
    let err = decode(&encode(&batch(vec![e])), &limits).unwrap_err();
    assert_eq!(
        err.to_string(),
        "events[0].properties[1].value is 300 bytes, limit 256"
    );

    let mut b = batch(vec![]);
    b.context.page_url = Some("u".repeat(5000));
    let err = decode(&encode(&b), &Limits::default()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "context.page_url is 5000 bytes, limit 4096"
    );
}

#[test]
fn nesting_deeper_than_allowed_is_rejected() {
    let limits = Limits {
        max_depth: 3,
        ..Limits::default()
    };
    let err = decode(&encode(&batch(vec![event(1)])), &limits).unwrap_err();
    assert!(matches!(err, DecodeError::Malformed(_)), "{err:?}");
    // The documented default accepts the deepest valid batch.
    assert!(decode(&encode(&batch(vec![event(1)])), &Limits::default()).is_ok());
}

#[test]
fn contract_violations_are_named() {
    let mut e = event(1);
    e.message_id = [0; 16];
    assert_eq!(
        decode(&encode(&batch(vec![e])), &Limits::default())
            .unwrap_err()
            .to_string(),
        "events[0].message_id is all zeros"
    );
    let mut e = event(1);
    e.properties[2].value = Value::Float(f64::NAN);
    assert_eq!(
        decode(&encode(&batch(vec![e])), &Limits::default())
            .unwrap_err()
            .to_string(),
        "events[0].properties[2].value is not a finite number"
    );
    let mut b = batch(vec![]);
    b.write_key.clear();
    assert_eq!(
        decode(&encode(&b), &Limits::default())
            .unwrap_err()
            .to_string(),
        "write_key is empty"
    );
}

#[test]
fn unknown_enum_values_are_named() {
    // Two encodings that differ only in the kind byte locate it; patch it to an unknown value.
    let with_kind = |kind| {
        let mut e = event(1);
        e.kind = kind;
        encode(&batch(vec![e]))
    };
    let (a, b) = (
        with_kind(EventKind::CartAdd),
        with_kind(EventKind::ProductViewed),
    );
    let diff: Vec<usize> = (0..a.len()).filter(|&i| a[i] != b[i]).collect();
    assert_eq!(diff.len(), 1);
    let mut patched = a;
    patched[diff[0]] = 200;
    assert_eq!(
        decode(&patched, &Limits::default())
            .unwrap_err()
            .to_string(),
        "events[0].kind has unknown value 200"
    );
}

#[test]
fn garbage_and_other_buffers_are_not_batches() {
    assert_eq!(decode(b"", &Limits::default()), Err(DecodeError::NotABatch));
    assert_eq!(
        decode(b"{\"json\":true}", &Limits::default()),
        Err(DecodeError::NotABatch)
    );
}

fn arb_string() -> impl Strategy<Value = String> {
    ".{0,40}"
}

fn arb_opt() -> impl Strategy<Value = Option<String>> {
    proptest::option::of(arb_string())
}

fn arb_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        arb_string().prop_map(Value::String),
        any::<i64>().prop_map(Value::Int),
        (-1e15f64..1e15).prop_map(Value::Float),
        any::<bool>().prop_map(Value::Bool),
    ]
}

fn arb_event() -> impl Strategy<Value = Event> {
    (
        any::<[u8; 16]>().prop_filter("non-zero id", |id| *id != [0; 16]),
        any::<i64>(),
        0u8..12,
        arb_opt(),
        proptest::collection::vec(
            ("[a-z]{1,12}", arb_value()).prop_map(|(key, value)| Property { key, value }),
            0..6,
        ),
        proptest::collection::vec(
            (
                "[a-z0-9]{1,10}",
                arb_opt(),
                any::<i64>(),
                any::<u32>(),
                arb_opt(),
            )
                .prop_map(|(product_id, category, price, quantity, name)| Item {
                    product_id,
                    category,
                    price,
                    quantity,
                    name,
                }),
            0..4,
        ),
        (
            arb_opt(),
            arb_opt(),
            arb_opt(),
            any::<i64>(),
            arb_opt(),
            any::<u8>(),
            any::<u8>(),
            0u8..4,
        ),
    )
        .prop_map(
            |(message_id, timestamp_ms, kind, name, properties, items, rest)| {
                let (
                    user_id,
                    previous_id,
                    order_id,
                    revenue,
                    currency,
                    consent_granted,
                    consent_denied,
                    purpose,
                ) = rest;
                Event {
                    message_id,
                    timestamp_ms,
                    kind: EventKind::from_u8(kind).unwrap(),
                    name,
                    properties,
                    items,
                    user_id,
                    previous_id,
                    order_id,
                    revenue,
                    currency,
                    consent_granted,
                    consent_denied,
                    purpose: Purpose::from_u8(purpose).unwrap(),
                }
            },
        )
}

fn arb_batch() -> impl Strategy<Value = Batch> {
    (
        "[a-z]{1,20}",
        any::<i64>(),
        any::<u8>(),
        (
            arb_opt(),
            arb_opt(),
            arb_opt(),
            arb_opt(),
            any::<u16>(),
            any::<u16>(),
        ),
        proptest::collection::vec(arb_event(), 0..8),
    )
        .prop_map(
            |(
                write_key,
                sent_at_ms,
                consent,
                (page_url, referrer, session_id, anonymous_id, w, h),
                events,
            )| Batch {
                write_key,
                sent_at_ms,
                consent,
                context: Context {
                    page_url,
                    referrer,
                    session_id,
                    anonymous_id,
                    screen_width: w,
                    screen_height: h,
                    ..Default::default()
                },
                events,
            },
        )
}

proptest! {
    #[test]
    fn encode_then_decode_is_identity(b in arb_batch()) {
        prop_assert_eq!(decode(&encode(&b), &Limits::default()), Ok(b));
    }

    #[test]
    fn batches_assembled_from_pieces_are_the_encoded_batch(b in arb_batch(), sent_at in any::<i64>()) {
        let pieces: Vec<Vec<u8>> = b.events.iter().map(wire::encode::event).collect();
        let bytes = wire::encode::assemble(
            b.write_key.as_bytes(),
            b.sent_at_ms,
            b.consent,
            &wire::encode::context(&b.context),
            pieces.iter().map(Vec::as_slice),
        );
        prop_assert_eq!(&bytes, &encode(&b));
        // The send time is rewritten in place when the field is there (a zero time is the
        // default, which FlatBuffers leaves out).
        let mut restamped = bytes.clone();
        prop_assert_eq!(wire::encode::set_sent_at(&mut restamped, sent_at), b.sent_at_ms != 0);
        let expected = Batch { sent_at_ms: if b.sent_at_ms != 0 { sent_at } else { 0 }, ..b };
        prop_assert_eq!(decode(&restamped, &Limits::default()), Ok(expected));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = decode(&bytes, &Limits::default());
    }

    #[test]
    fn arbitrary_bytes_behind_the_identifier_never_panic(bytes in proptest::collection::vec(any::<u8>(), 8..2048)) {
        let mut bytes = bytes;
        bytes[4..8].copy_from_slice(b"PEB1");
        let _ = decode(&bytes, &Limits::default());
    }

    #[test]
    fn truncated_batches_are_errors_not_panics(b in arb_batch(), cut in 0.0f64..1.0) {
        let bytes = encode(&b);
        let len = (bytes.len() as f64 * cut) as usize;
        // Cutting only trailing padding may leave every referenced byte in place; then the
        // batch must come back unchanged. Anything else is an error.
        if let Ok(decoded) = decode(&bytes[..len], &Limits::default()) {
            prop_assert_eq!(decoded, b);
        }
    }

    #[test]
    fn flipped_bytes_never_panic(b in arb_batch(), at in any::<prop::sample::Index>(), to in any::<u8>()) {
        let mut bytes = encode(&b);
        let i = at.index(bytes.len());
        bytes[i] = to;
        let _ = decode(&bytes, &Limits::default());
        let _ = wire::encode::set_sent_at(&mut bytes, 1);
    }

    #[test]
    fn rewriting_the_send_time_of_any_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let mut bytes = bytes;
        let _ = wire::encode::set_sent_at(&mut bytes, 1);
    }
}
