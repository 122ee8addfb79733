//! Segment definitions (reading them as the collector reads its config, checking them, the
//! compiled form) and the from-scratch evaluator: membership at a time, and exact deadlines.
//! Times are fixed by the tests, never the wall clock.

use std::collections::BTreeMap;

use figment::Figment;
use figment::providers::{Format, Toml};
use profile_cache::lifecycle::LifecycleThresholds;
use profile_cache::segments::{
    DEMO_SEGMENTS, Evaluation, Metric, Predicate, Segment, SegmentInput, TimeField, WindowKey,
    compile,
};
use profile_cache::{ConsentStatus, Lifecycle, Purpose};
use proptest::prelude::*;
use serde_json::json;
use time::OffsetDateTime;
use time::macros::datetime;

/// On the hour, so window buckets line up with the times below.
const NOW: OffsetDateTime = datetime!(2026-11-29 12:00:00 UTC);
const MS: time::Duration = time::Duration::milliseconds(1);
const DAY_MS: i64 = 86_400_000;

fn ms(n: i64) -> time::Duration {
    time::Duration::milliseconds(n)
}

fn minutes(n: i64) -> time::Duration {
    time::Duration::minutes(n)
}

fn hours(n: i64) -> time::Duration {
    time::Duration::hours(n)
}

fn days(n: i64) -> time::Duration {
    time::Duration::days(n)
}

#[derive(serde::Deserialize)]
struct Config {
    segments: Vec<serde_json::Value>,
}

/// The `[[segments]]` tables of a TOML document, read the way the collector reads its
/// config (figment).
fn tables(toml: &str) -> Vec<serde_json::Value> {
    let config: Config = Figment::from(Toml::string(toml))
        .extract()
        .unwrap_or_else(|e| panic!("{e}"));
    config.segments
}

fn compile_toml(toml: &str) -> Result<Vec<Segment>, Vec<String>> {
    compile(&tables(toml), &LifecycleThresholds::default())
        .map_err(|e| e.0.iter().map(ToString::to_string).collect())
}

fn problems(toml: &str) -> Vec<String> {
    match compile_toml(toml) {
        Ok(segments) => panic!("{} segments compiled, expected problems", segments.len()),
        Err(problems) => problems,
    }
}

fn one_segment(condition: &str) -> String {
    format!("[[segments]]\nname = \"s\"\ncondition = {condition}\n")
}

/// The segment `s` with this condition (a TOML inline table).
fn segment(condition: &str) -> Segment {
    match compile_toml(&one_segment(condition)) {
        Ok(mut segments) => segments.remove(0),
        Err(problems) => panic!("{problems:?}"),
    }
}

fn demo(name: &str) -> Segment {
    let segments = compile_toml(DEMO_SEGMENTS).unwrap_or_else(|e| panic!("{e:?}"));
    segments
        .into_iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no demo segment {name}"))
}

fn at(member: bool, deadline: Option<OffsetDateTime>) -> Evaluation {
    Evaluation { member, deadline }
}

// ------------------------------------------------------------------ definitions

#[test]
fn demo_segments_parse_and_check() {
    let segments = compile_toml(DEMO_SEGMENTS).unwrap_or_else(|e| panic!("{e:?}"));
    let names: Vec<&str> = segments.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "highly_engaged",
            "engaged",
            "unengaged",
            "recent_buyers",
            "loyal_customers",
            "high_value",
            "cart_abandoners_30m",
            "cart_abandoners_24h",
            "lifecycle_new",
            "lifecycle_active",
            "lifecycle_dormant",
            "lifecycle_churned",
            "shoe_browsers",
        ]
    );
    assert!(segments.iter().all(|s| !s.description.is_empty()));
    assert_eq!(
        serde_json::to_string(&demo("cart_abandoners_30m")).unwrap(),
        concat!(
            r#"{"name":"cart_abandoners_30m","description":"Cart left for 30 minutes without ordering","#,
            r#""condition":{"op":"all","of":[{"op":"cart_not_empty"},"#,
            r#"{"op":"older_than","field":"cart_updated_at","ms":1800000},"#,
            r#"{"op":"no_order_since","field":"cart_updated_at"}]}}"#
        )
    );
}

#[test]
fn the_compiled_form_is_plain_json_tagged_by_op() {
    let s = segment(
        r#"{ all = [
            { cart = "empty" },
            { trait = { name = "vip", equals = true } },
            { trait = { name = "plan", in = ["pro", 3, 0.75] } },
            { trait = { name = "email", exists = false } },
            { event_count = { event = "product_viewed", category = "shoes", within = "24h", at_least = 3 } },
            { event_count = { event = "Signed Up", at_most = 0 } },
            { metric = { field = "revenue", at_least = 50000, at_most = 90000 } },
            { any = [
                { within = { field = "last_order_at", duration = "7d" } },
                { older_than = { field = "last_seen", duration = "1h 30m" } },
            ] },
            { consent_granted = "marketing" },
            { no_order_since = "cart_updated_at" },
        ] }"#,
    );
    let compiled = json!({"name": "s", "condition": {"op": "all", "of": [
        {"op": "not", "of": {"op": "cart_not_empty"}},
        {"op": "trait_in", "name": "vip", "values": ["true"]},
        {"op": "trait_in", "name": "plan", "values": ["pro", "3", "0.75"]},
        {"op": "not", "of": {"op": "trait_exists", "name": "email"}},
        {"op": "window_count", "event": "product_viewed", "category": "shoes", "hours": 24, "min": 3},
        {"op": "count", "event": "Signed Up", "max": 0},
        {"op": "metric", "field": "revenue", "min": 50000, "max": 90000},
        {"op": "any", "of": [
            {"op": "within", "field": "last_order_at", "ms": 604_800_000},
            {"op": "older_than", "field": "last_seen", "ms": 5_400_000},
        ]},
        {"op": "consent_granted", "purpose": "marketing"},
        {"op": "no_order_since", "field": "cart_updated_at"},
    ]}});
    assert_eq!(serde_json::to_value(&s).unwrap(), compiled);
    assert_eq!(serde_json::from_value::<Segment>(compiled).unwrap(), s);
}

#[test]
fn lifecycle_stages_compile_to_recency_tests_with_the_thresholds() {
    let thresholds = LifecycleThresholds::default();
    let toml = r#"
        [[segments]]
        name = "dormant"
        condition = { lifecycle = "dormant" }
        [[segments]]
        name = "churned"
        condition = { lifecycle = "churned" }
    "#;
    let segments = compile(&tables(toml), &thresholds).unwrap();
    assert_eq!(
        serde_json::to_value(&segments[0].condition).unwrap(),
        json!({"op": "all", "of": [
            {"op": "older_than", "field": "last_seen", "ms": 30 * DAY_MS},
            {"op": "within", "field": "last_seen", "ms": 90 * DAY_MS},
        ]})
    );
    assert_eq!(
        serde_json::to_value(&segments[1].condition).unwrap(),
        json!({"op": "older_than", "field": "last_seen", "ms": 90 * DAY_MS})
    );
}

#[test]
fn every_problem_of_every_definition_names_its_segment_and_field() {
    let toml = r#"
        [[segments]]
        name = "cart_abandoners"
        condition = { all = [
          { cart = "not_empty" },
          { older_than = { field = "cart_updated_at", duration = "30x" } },
        ] }

        [[segments]]
        name = "loyal"
        condition = { all = [
          { metric = { field = "orders" } },
          { event_count = { event = "product_viewed", category = "shoes", at_least = 5, at_most = 2 } },
          { any = [] },
        ] }

        [[segments]]
        name = "Big Spenders"
        condition = { metric = { field = "revenue", at_least = 50000 } }

        [[segments]]
        name = "loyal"
        description = "a second segment of the name"
        condition = { cart = "empty" }

        [[segments]]
        description = "no name"
        condition = { cart = "empty" }

        [[segments]]
        name = "typo"
        descripton = "a misspelt field"
        condition = { cart = "empty" }
    "#;
    assert_eq!(
        problems(toml),
        [
            r#"segment "cart_abandoners": condition.all[1].older_than.duration: "30x" is not a duration like "30m", "24h" or "7d": unknown time unit "x", supported units: ns, us/µs, ms, sec, min, hours, days, weeks, months, years (and few variations)"#,
            r#"segment "loyal": condition.all[0].metric: needs at_least, at_most or both"#,
            r#"segment "loyal": condition.all[1].event_count: at_least (5) is greater than at_most (2)"#,
            r#"segment "loyal": condition.all[1].event_count.category: needs within: counts by category are kept for the last 7 days only"#,
            r#"segment "loyal": condition.all[2].any: is an empty list, expected at least one condition"#,
            r#"segment "Big Spenders": name: "Big Spenders" is not a segment name: use 1 to 64 lowercase letters, digits, _ or -, starting with a letter"#,
            r#"segment "loyal": name: "loyal" is already the name of segments[1]"#,
            "segments[4]: missing field `name`",
            "segment \"typo\": descripton: unknown field `descripton`, expected one of `name`, `description`, `condition`",
        ]
    );
}

#[test]
fn each_problem_of_a_condition_is_named() {
    let cases = [
        // Unknown fields, conditions and values.
        (
            r#"{ metric = { field = "orders", at_least = 3, atleast = 4 } }"#,
            "condition.metric.atleast: unknown field `atleast`, expected one of `field`, `at_least`, `at_most`",
        ),
        (
            r#"{ carts = "empty" }"#,
            "condition: unknown variant `carts`, expected one of `all`, `any`, `not`, `metric`, `event_count`, `trait`, `lifecycle`, `within`, `older_than`, `cart`, `no_order_since`, `consent_granted`",
        ),
        (
            r#"{ within = { field = "last_login", duration = "7d" } }"#,
            "condition.within.field: unknown variant `last_login`, expected one of `first_seen`, `last_seen`, `last_order_at`, `last_engaged_at`, `cart_updated_at`",
        ),
        (
            r#"{ metric = { field = "order", at_least = 3 } }"#,
            "condition.metric.field: unknown variant `order`, expected one of `events`, `page_views`, `sessions`, `orders`, `revenue`, `email_opens`, `email_clicks`",
        ),
        (
            r#"{ lifecycle = "old" }"#,
            "condition.lifecycle: unknown variant `old`, expected one of `new`, `active`, `dormant`, `churned`",
        ),
        (
            r#"{ consent_granted = "ads" }"#,
            "condition.consent_granted: unknown variant `ads`, expected one of `necessary`, `analytics`, `personalization`, `marketing`",
        ),
        (
            r#"{ cart = "full" }"#,
            "condition.cart: unknown variant `full`, expected `empty` or `not_empty`",
        ),
        // Type mismatches.
        (
            r#"{ metric = { field = "orders", at_least = "3" } }"#,
            r#"condition.metric.at_least: invalid type: string "3", expected i64"#,
        ),
        (
            r#"{ metric = { field = "orders", at_least = 2.5 } }"#,
            "condition.metric.at_least: invalid type: floating point `2.5`, expected i64",
        ),
        (
            r#"{ within = { field = "last_seen", duration = 30 } }"#,
            r#"condition.within.duration: invalid type: integer `30`, expected a duration like "30m", "24h" or "7d""#,
        ),
        (
            r#"{ trait = { name = "plan", equals = ["pro"] } }"#,
            "condition.trait.equals: invalid type: sequence, expected a string, number or boolean",
        ),
        (
            r#"{ all = { cart = "empty" } }"#,
            "condition.all: invalid type: map, expected a sequence",
        ),
        (
            r#"{ cart = "empty", lifecycle = "new" }"#,
            "condition: invalid value: map, expected map with a single key",
        ),
        // Durations.
        (
            r#"{ within = { field = "last_seen", duration = "10" } }"#,
            r#"condition.within.duration: "10" is not a duration like "30m", "24h" or "7d": time unit needed, for example 10sec or 10ms"#,
        ),
        (
            r#"{ within = { field = "last_seen", duration = "0s" } }"#,
            r#"condition.within.duration: "0s" must be greater than zero"#,
        ),
        (
            r#"{ older_than = { field = "last_seen", duration = "1500us" } }"#,
            r#"condition.older_than.duration: "1500us" is not a whole number of milliseconds"#,
        ),
        (
            r#"{ older_than = { field = "first_seen", duration = "101years" } }"#,
            r#"condition.older_than.duration: "101years" is longer than 36500d"#,
        ),
        // Windows.
        (
            r#"{ event_count = { event = "page", within = "90m", at_least = 1 } }"#,
            r#"condition.event_count.within: "90m" is not a whole number of hours (event counts are kept in hourly buckets)"#,
        ),
        (
            r#"{ event_count = { event = "page", within = "8d", at_least = 1 } }"#,
            r#"condition.event_count.within: "8d" is longer than 7d, the longest window kept"#,
        ),
        (
            r#"{ event_count = { event = "", at_least = 1 } }"#,
            "condition.event_count.event: is empty",
        ),
        (
            r#"{ event_count = { event = "product_viewed", category = "", within = "1h", at_least = 1 } }"#,
            "condition.event_count.category: is empty",
        ),
        // Bounds.
        (
            r#"{ metric = { field = "revenue", at_least = 9007199254740992 } }"#,
            "condition.metric.at_least: 9007199254740992 is beyond ±9007199254740991, the largest exact count",
        ),
        (
            r#"{ event_count = { event = "page", at_most = -9007199254740992 } }"#,
            "condition.event_count.at_most: -9007199254740992 is beyond ±9007199254740991, the largest exact count",
        ),
        // Traits.
        (
            r#"{ trait = { name = "plan" } }"#,
            "condition.trait: needs exactly one of equals, in or exists",
        ),
        (
            r#"{ trait = { name = "plan", equals = "pro", exists = true } }"#,
            "condition.trait: needs exactly one of equals, in or exists",
        ),
        (
            r#"{ trait = { name = "plan", in = [] } }"#,
            "condition.trait.in: is an empty list, expected at least one value",
        ),
        (
            r#"{ trait = { name = "", exists = true } }"#,
            "condition.trait.name: is empty",
        ),
        // Nesting and the rest.
        (
            r#"{ not = { all = [] } }"#,
            "condition.not.all: is an empty list, expected at least one condition",
        ),
        (
            r#"{ no_order_since = "last_order_at" }"#,
            "condition.no_order_since: last_order_at cannot be compared with itself",
        ),
    ];
    for (condition, expected) in cases {
        assert_eq!(
            problems(&one_segment(condition)),
            [format!("segment \"s\": {expected}")],
            "{condition}"
        );
    }
}

#[test]
fn names_fit_a_redis_key_part_and_an_api_path() {
    let long = "a".repeat(64);
    for good in ["a", "cart_abandoners-2", long.as_str()] {
        let toml = format!("[[segments]]\nname = \"{good}\"\ncondition = {{ cart = \"empty\" }}\n");
        assert!(compile_toml(&toml).is_ok(), "{good}");
    }
    let too_long = "a".repeat(65);
    for bad in [
        "",
        "2fast",
        "Cart",
        "a b",
        "a:b",
        "a/b",
        "{a}",
        "café",
        too_long.as_str(),
    ] {
        let toml = format!("[[segments]]\nname = \"{bad}\"\ncondition = {{ cart = \"empty\" }}\n");
        assert_eq!(
            problems(&toml),
            [format!(
                "segment {bad:?}: name: {bad:?} is not a segment name: use 1 to 64 lowercase letters, digits, _ or -, starting with a letter"
            )]
        );
    }
}

// ------------------------------------------------------------------ each condition

#[test]
fn metrics_compare_with_inclusive_bounds() {
    let loyal = segment(r#"{ metric = { field = "orders", at_least = 3 } }"#);
    let few = segment(r#"{ metric = { field = "email_clicks", at_least = 1, at_most = 2 } }"#);
    let refunded = segment(r#"{ metric = { field = "revenue", at_most = -1 } }"#);
    let mut input = SegmentInput {
        orders: 2,
        ..SegmentInput::default()
    };
    assert_eq!(loyal.evaluate(&input, NOW), at(false, None));
    input.orders = 3;
    assert_eq!(loyal.evaluate(&input, NOW), at(true, None));
    for (clicks, member) in [(0, false), (1, true), (2, true), (3, false)] {
        input.email_clicks = clicks;
        assert_eq!(few.evaluate(&input, NOW), at(member, None), "{clicks}");
    }
    input.revenue = -500;
    assert_eq!(refunded.evaluate(&input, NOW), at(true, None));
    input.revenue = 0;
    assert_eq!(refunded.evaluate(&input, NOW), at(false, None));
}

#[test]
fn event_counts_read_the_counts_by_name() {
    let signed_up = segment(r#"{ event_count = { event = "Signed Up", at_least = 1 } }"#);
    let never_viewed = segment(r#"{ event_count = { event = "product_viewed", at_most = 0 } }"#);
    let mut input = SegmentInput::default();
    assert_eq!(signed_up.evaluate(&input, NOW), at(false, None));
    assert_eq!(never_viewed.evaluate(&input, NOW), at(true, None));
    input.counts = BTreeMap::from([("Signed Up".into(), 1), ("product_viewed".into(), 4)]);
    assert_eq!(signed_up.evaluate(&input, NOW), at(true, None));
    assert_eq!(never_viewed.evaluate(&input, NOW), at(false, None));
}

#[test]
fn traits_compare_as_stored_text() {
    let pro = segment(r#"{ trait = { name = "plan", equals = "pro" } }"#);
    let paying = segment(r#"{ trait = { name = "plan", in = ["pro", "team"] } }"#);
    let vip = segment(r#"{ trait = { name = "vip", equals = true } }"#);
    let adult = segment(r#"{ trait = { name = "age", in = [18, 19] } }"#);
    let score = segment(r#"{ trait = { name = "score", equals = 0.75 } }"#);
    let has_email = segment(r#"{ trait = { name = "email", exists = true } }"#);
    let no_email = segment(r#"{ trait = { name = "email", exists = false } }"#);
    let traits = |pairs: &[(&str, &str)]| SegmentInput {
        traits: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..SegmentInput::default()
    };
    let none = traits(&[]);
    for s in [&pro, &paying, &vip, &adult, &score, &has_email] {
        assert!(!s.condition.holds(&none, NOW), "{}", s.name);
    }
    assert!(no_email.condition.holds(&none, NOW));

    let team = traits(&[
        ("plan", "team"),
        ("vip", "true"),
        ("age", "19"),
        ("score", "0.75"),
    ]);
    assert!(!pro.condition.holds(&team, NOW));
    assert!(paying.condition.holds(&team, NOW));
    assert!(vip.condition.holds(&team, NOW));
    assert!(adult.condition.holds(&team, NOW));
    assert!(score.condition.holds(&team, NOW));

    let other = traits(&[
        ("plan", "Pro"),
        ("vip", "false"),
        ("age", "20"),
        ("email", ""),
    ]);
    assert!(!pro.condition.holds(&other, NOW));
    assert!(!vip.condition.holds(&other, NOW));
    assert!(!adult.condition.holds(&other, NOW));
    assert!(has_email.condition.holds(&other, NOW));
    assert!(!no_email.condition.holds(&other, NOW));
}

#[test]
fn consent_counts_only_when_granted() {
    let marketing = segment(r#"{ consent_granted = "marketing" }"#);
    let necessary = segment(r#"{ consent_granted = "necessary" }"#);
    let mut input = SegmentInput::default();
    assert_eq!(marketing.evaluate(&input, NOW), at(false, None));
    assert_eq!(necessary.evaluate(&input, NOW), at(true, None));
    input
        .consent
        .insert(Purpose::Marketing, ConsentStatus::Denied);
    assert_eq!(marketing.evaluate(&input, NOW), at(false, None));
    input
        .consent
        .insert(Purpose::Marketing, ConsentStatus::Granted);
    assert_eq!(marketing.evaluate(&input, NOW), at(true, None));
}

#[test]
fn cart_state_and_orders_since_a_time() {
    let empty = segment(r#"{ cart = "empty" }"#);
    let not_empty = segment(r#"{ cart = "not_empty" }"#);
    let no_order = segment(r#"{ no_order_since = "cart_updated_at" }"#);
    let changed = NOW - hours(2);
    let mut input = SegmentInput::default();
    assert_eq!(empty.evaluate(&input, NOW), at(true, None));
    assert_eq!(not_empty.evaluate(&input, NOW), at(false, None));
    // No cart change yet: nothing to be "since".
    assert_eq!(no_order.evaluate(&input, NOW), at(false, None));
    input.cart_lines = 2;
    input.cart_updated_at = Some(changed);
    assert_eq!(empty.evaluate(&input, NOW), at(false, None));
    assert_eq!(not_empty.evaluate(&input, NOW), at(true, None));
    assert_eq!(no_order.evaluate(&input, NOW), at(true, None));
    input.last_order_at = Some(changed - MS);
    assert_eq!(no_order.evaluate(&input, NOW), at(true, None));
    // An order at the very time of the change is the change (an order empties the cart).
    input.last_order_at = Some(changed);
    assert_eq!(no_order.evaluate(&input, NOW), at(false, None));
}

#[test]
fn within_holds_until_exactly_the_duration_has_passed() {
    let s = segment(r#"{ within = { field = "last_order_at", duration = "7d" } }"#);
    let order = NOW - days(2);
    let input = SegmentInput {
        last_order_at: Some(order),
        ..SegmentInput::default()
    };
    assert_eq!(s.evaluate(&input, NOW), at(true, Some(order + days(7))));
    assert_eq!(
        s.evaluate(&input, order + days(7) - MS),
        at(true, Some(order + days(7)))
    );
    assert_eq!(s.evaluate(&input, order + days(7)), at(false, None));
    // Never ordered: never within.
    assert_eq!(s.evaluate(&SegmentInput::default(), NOW), at(false, None));
    // A time ahead of now (a client clock ahead of ours) counts as just now.
    let ahead = SegmentInput {
        last_order_at: Some(NOW + hours(1)),
        ..SegmentInput::default()
    };
    assert_eq!(
        s.evaluate(&ahead, NOW),
        at(true, Some(NOW + hours(1) + days(7)))
    );
}

#[test]
fn older_than_holds_from_exactly_the_duration_on() {
    let s = segment(r#"{ older_than = { field = "last_seen", duration = "30d" } }"#);
    let seen = NOW - days(29);
    let input = SegmentInput {
        last_seen: Some(seen),
        ..SegmentInput::default()
    };
    assert_eq!(s.evaluate(&input, NOW), at(false, Some(seen + days(30))));
    assert_eq!(s.evaluate(&input, seen + days(30)), at(true, None));
    assert_eq!(s.evaluate(&SegmentInput::default(), NOW), at(false, None));
    let ahead = SegmentInput {
        last_seen: Some(NOW + minutes(5)),
        ..SegmentInput::default()
    };
    assert_eq!(
        s.evaluate(&ahead, NOW),
        at(false, Some(NOW + minutes(5) + days(30)))
    );
}

#[test]
fn a_cart_abandoner_enters_30_minutes_after_the_last_change_unless_an_order_follows() {
    let s = demo("cart_abandoners_30m");
    let day = demo("cart_abandoners_24h");
    let changed = NOW - minutes(10);
    let mut input = SegmentInput {
        cart_lines: 1,
        cart_updated_at: Some(changed),
        last_order_at: Some(changed - days(3)),
        ..SegmentInput::default()
    };
    assert_eq!(
        s.evaluate(&input, NOW),
        at(false, Some(changed + minutes(30)))
    );
    assert_eq!(
        s.evaluate(&input, changed + minutes(30) - MS),
        at(false, Some(changed + minutes(30)))
    );
    assert_eq!(s.evaluate(&input, changed + minutes(30)), at(true, None));
    assert_eq!(
        day.evaluate(&input, NOW),
        at(false, Some(changed + hours(24)))
    );
    assert_eq!(day.evaluate(&input, changed + hours(24)), at(true, None));

    // The order that empties the cart also moves cart_updated_at: out, for good.
    input.cart_lines = 0;
    input.cart_updated_at = Some(NOW);
    input.last_order_at = Some(NOW);
    assert_eq!(s.evaluate(&input, NOW), at(false, None));
    // A cart left again after an order counts from the new change.
    input.cart_lines = 1;
    input.cart_updated_at = Some(NOW + minutes(1));
    assert_eq!(s.evaluate(&input, NOW), at(false, Some(NOW + minutes(31))));
}

#[test]
fn windowed_counts_cover_the_current_hour_and_the_hours_before_it() {
    let s = segment(
        r#"{ event_count = { event = "product_viewed", category = "shoes", within = "24h", at_least = 3 } }"#,
    );
    let mut input = SegmentInput::default();
    // NOW is 12:00. The 24-hour window covers the buckets from 13:00 yesterday on: a view at
    // 12:30 yesterday left it at 12:00 today, one at 13:10 yesterday leaves at 13:00 today.
    input.record("product_viewed", &["shoes"], NOW - hours(23) - minutes(30));
    input.record("product_viewed", &["shoes"], NOW - hours(22) - minutes(50));
    input.record("product_viewed", &["socks"], NOW - hours(2));
    input.record("page", &[], NOW - hours(1));
    input.record("product_viewed", &["shoes", "socks"], NOW - hours(16));
    assert_eq!(s.evaluate(&input, NOW), at(false, None));
    input.record("product_viewed", &["shoes"], NOW - MS);
    assert_eq!(s.evaluate(&input, NOW), at(true, Some(NOW + hours(1))));
    assert_eq!(
        s.evaluate(&input, NOW + hours(1) - MS),
        at(true, Some(NOW + hours(1)))
    );
    assert_eq!(s.evaluate(&input, NOW + hours(1)), at(false, None));
}

#[test]
fn an_upper_bound_on_a_window_is_met_when_enough_buckets_leave() {
    let s = segment(r#"{ event_count = { event = "page", within = "2h", at_most = 1 } }"#);
    let mut input = SegmentInput::default();
    input.record("page", &[], NOW - minutes(50)); // bucket 11:00, leaves at 13:00
    input.record("page", &[], NOW - minutes(40)); // bucket 11:00
    input.record("page", &[], NOW + minutes(5)); // bucket 12:00, leaves at 14:00
    let half_past = NOW + minutes(30);
    assert_eq!(
        s.evaluate(&input, half_past),
        at(false, Some(NOW + hours(1)))
    );
    assert_eq!(s.evaluate(&input, NOW + hours(1)), at(true, None));
}

#[test]
fn an_event_counts_once_per_distinct_category_of_its_items() {
    let mut input = SegmentInput::default();
    let t = NOW + minutes(59) + ms(59_999);
    input.record("product_viewed", &["shoes", "shoes", "socks"], t);
    input.record("product_viewed", &[], NOW);
    let hour = NOW.unix_timestamp() / 3_600;
    let key = |category: Option<&str>| WindowKey {
        event: "product_viewed".into(),
        category: category.map(String::from),
    };
    assert_eq!(
        input.windows,
        BTreeMap::from([
            (key(None), BTreeMap::from([(hour, 2)])),
            (key(Some("shoes")), BTreeMap::from([(hour, 1)])),
            (key(Some("socks")), BTreeMap::from([(hour, 1)])),
        ])
    );
}

#[test]
fn lifecycle_segments_change_at_the_thresholds() {
    let first = NOW - days(10);
    let last = NOW - days(3);
    let input = SegmentInput {
        first_seen: Some(first),
        last_seen: Some(last),
        ..SegmentInput::default()
    };
    let stages = [
        ("lifecycle_new", at(true, Some(first + days(14)))),
        ("lifecycle_active", at(false, Some(first + days(14)))),
        ("lifecycle_dormant", at(false, Some(last + days(30)))),
        ("lifecycle_churned", at(false, Some(last + days(90)))),
    ];
    for (name, expected) in stages {
        assert_eq!(demo(name).evaluate(&input, NOW), expected, "{name}");
    }
    let later = [
        (first + days(14), "lifecycle_active", last + days(30)),
        (last + days(30), "lifecycle_dormant", last + days(90)),
    ];
    for (t, name, leaves) in later {
        assert_eq!(
            demo(name).evaluate(&input, t),
            at(true, Some(leaves)),
            "{name}"
        );
    }
    assert_eq!(
        demo("lifecycle_churned").evaluate(&input, last + days(90)),
        at(true, None)
    );
}

// ------------------------------------------------------------------ deadlines through all / any / not

#[test]
fn not_keeps_the_deadline_of_its_condition() {
    let s = segment(r#"{ not = { within = { field = "last_engaged_at", duration = "30d" } } }"#);
    let engaged = NOW - days(1);
    let input = SegmentInput {
        last_engaged_at: Some(engaged),
        ..SegmentInput::default()
    };
    assert_eq!(s.evaluate(&input, NOW), at(false, Some(engaged + days(30))));
    assert_eq!(s.evaluate(&input, engaged + days(30)), at(true, None));
    // Never engaged: in, for good.
    assert_eq!(s.evaluate(&SegmentInput::default(), NOW), at(true, None));
}

#[test]
fn all_that_holds_ends_at_the_first_condition_to_change() {
    let s = demo("loyal_customers");
    let input = SegmentInput {
        orders: 3,
        last_order_at: Some(NOW - days(80)),
        ..SegmentInput::default()
    };
    assert_eq!(s.evaluate(&input, NOW), at(true, Some(NOW + days(10))));
}

#[test]
fn all_that_fails_starts_when_its_last_failing_condition_changes() {
    let s = segment(
        r#"{ all = [
            { older_than = { field = "cart_updated_at", duration = "30m" } },
            { older_than = { field = "last_seen", duration = "1h" } },
        ] }"#,
    );
    let input = SegmentInput {
        cart_updated_at: Some(NOW - minutes(20)),
        last_seen: Some(NOW - minutes(5)),
        ..SegmentInput::default()
    };
    assert_eq!(s.evaluate(&input, NOW), at(false, Some(NOW + minutes(55))));
}

#[test]
fn all_whose_conditions_never_hold_together_has_no_deadline() {
    // Ordered in the last hour (true until NOW + 30m) and cart older than 2 hours (false
    // until NOW + 1h): the first turns false before the second turns true. Combining the
    // children's deadlines would say NOW + 1h; nothing changes then.
    let s = segment(
        r#"{ all = [
            { within = { field = "last_order_at", duration = "1h" } },
            { older_than = { field = "cart_updated_at", duration = "2h" } },
        ] }"#,
    );
    let input = SegmentInput {
        last_order_at: Some(NOW - minutes(30)),
        cart_updated_at: Some(NOW - hours(1)),
        ..SegmentInput::default()
    };
    assert_eq!(s.evaluate(&input, NOW), at(false, None));
    assert!(!s.condition.holds(&input, NOW + hours(1)));
}

#[test]
fn any_that_holds_ends_when_its_last_holding_condition_changes() {
    let s = segment(
        r#"{ any = [
            { within = { field = "last_order_at", duration = "7d" } },
            { within = { field = "last_engaged_at", duration = "7d" } },
            { cart = "not_empty" },
        ] }"#,
    );
    let mut input = SegmentInput {
        last_order_at: Some(NOW - days(5)),
        last_engaged_at: Some(NOW - days(1)),
        ..SegmentInput::default()
    };
    assert_eq!(s.evaluate(&input, NOW), at(true, Some(NOW + days(6))));
    input.cart_lines = 1;
    assert_eq!(s.evaluate(&input, NOW), at(true, None));
}

#[test]
fn any_that_fails_starts_at_the_first_condition_to_change() {
    let s = segment(
        r#"{ any = [
            { older_than = { field = "last_seen", duration = "30d" } },
            { older_than = { field = "cart_updated_at", duration = "30m" } },
        ] }"#,
    );
    let input = SegmentInput {
        last_seen: Some(NOW),
        cart_updated_at: Some(NOW - minutes(10)),
        ..SegmentInput::default()
    };
    assert_eq!(s.evaluate(&input, NOW), at(false, Some(NOW + minutes(20))));
}

#[test]
fn engagement_levels_move_with_the_window_and_recency() {
    let highly = demo("highly_engaged");
    let engaged = demo("engaged");
    let unengaged = demo("unengaged");
    let mut input = SegmentInput {
        last_engaged_at: Some(NOW - days(2)),
        ..SegmentInput::default()
    };
    input
        .consent
        .insert(Purpose::Marketing, ConsentStatus::Granted);
    input.record("email_clicked", &[], NOW - days(3));
    input.record("email_clicked", &[], NOW - days(2));
    // Clicks at 12:00 three and two days ago: the first one's bucket (12:00 to 13:00) leaves
    // the 7-day window four days from now, and the last engagement is 30 days old 28 days
    // from now.
    let drops = NOW + days(4);
    assert_eq!(highly.evaluate(&input, NOW), at(true, Some(drops)));
    assert_eq!(engaged.evaluate(&input, NOW), at(false, Some(drops)));
    assert_eq!(
        unengaged.evaluate(&input, NOW),
        at(false, Some(NOW + days(28)))
    );
    assert_eq!(
        engaged.evaluate(&input, drops),
        at(true, Some(NOW + days(28)))
    );
    assert_eq!(unengaged.evaluate(&input, NOW + days(28)), at(true, None));
}

// ------------------------------------------------------------------ properties

fn time_field() -> impl Strategy<Value = TimeField> {
    prop_oneof![
        Just(TimeField::FirstSeen),
        Just(TimeField::LastSeen),
        Just(TimeField::LastOrderAt),
        Just(TimeField::LastEngagedAt),
        Just(TimeField::CartUpdatedAt),
    ]
}

fn bound() -> impl Strategy<Value = Option<i64>> {
    proptest::option::of(0..5_i64)
}

fn leaf() -> impl Strategy<Value = Predicate> {
    prop_oneof![
        (time_field(), 1..3 * DAY_MS).prop_map(|(field, ms)| Predicate::Within { field, ms }),
        (time_field(), 1..3 * DAY_MS).prop_map(|(field, ms)| Predicate::OlderThan { field, ms }),
        (any::<bool>(), 1..=48_i64, bound(), bound()).prop_map(|(shoes, hours, min, max)| {
            Predicate::WindowCount {
                event: "product_viewed".into(),
                category: shoes.then(|| "shoes".into()),
                hours,
                min,
                max,
            }
        }),
        (bound(), bound()).prop_map(|(min, max)| Predicate::Metric {
            field: Metric::Orders,
            min,
            max,
        }),
        Just(Predicate::CartNotEmpty),
        time_field().prop_map(|field| Predicate::NoOrderSince { field }),
        Just(Predicate::ConsentGranted {
            purpose: Purpose::Marketing
        }),
        Just(Predicate::TraitIn {
            name: "plan".into(),
            values: vec!["pro".into()],
        }),
    ]
}

fn predicate() -> impl Strategy<Value = Predicate> {
    leaf().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 1..4).prop_map(|of| Predicate::All { of }),
            prop::collection::vec(inner.clone(), 1..4).prop_map(|of| Predicate::Any { of }),
            inner.prop_map(|p| Predicate::Not { of: Box::new(p) }),
        ]
    })
}

/// Times within three days of NOW, in whole milliseconds.
fn time_near() -> impl Strategy<Value = Option<OffsetDateTime>> {
    proptest::option::of((-3 * DAY_MS..DAY_MS).prop_map(|offset| NOW + ms(offset)))
}

fn input() -> impl Strategy<Value = SegmentInput> {
    let times = (
        time_near(),
        time_near(),
        time_near(),
        time_near(),
        time_near(),
    );
    let views = prop::collection::vec((-60..3_i64, any::<bool>(), 0..60 * 60_000_i64), 0..8);
    (
        times,
        0..5_u64,
        0..2_usize,
        any::<bool>(),
        any::<bool>(),
        views,
    )
        .prop_map(|(times, orders, cart_lines, marketing, pro, views)| {
            let (first_seen, last_seen, last_order_at, last_engaged_at, cart_updated_at) = times;
            let mut input = SegmentInput {
                first_seen,
                last_seen,
                last_order_at,
                last_engaged_at,
                cart_updated_at,
                orders,
                cart_lines,
                ..SegmentInput::default()
            };
            if marketing {
                input
                    .consent
                    .insert(Purpose::Marketing, ConsentStatus::Granted);
            }
            if pro {
                input.traits.insert("plan".into(), "pro".into());
            }
            for (hour, shoes, within) in views {
                let categories: &[&str] = if shoes { &["shoes"] } else { &["socks"] };
                input.record("product_viewed", categories, NOW + hours(hour) + ms(within));
            }
            input
        })
}

proptest! {
    #[test]
    fn membership_holds_until_the_deadline_and_changes_at_it(
        p in predicate(),
        input in input(),
        now in (0..4 * DAY_MS).prop_map(|offset| NOW + ms(offset)),
        fraction in 0.0..1.0_f64,
        later in 0..10 * DAY_MS,
    ) {
        let e = p.evaluate(&input, now);
        prop_assert_eq!(e.member, p.holds(&input, now));
        match e.deadline {
            Some(deadline) => {
                prop_assert!(deadline > now);
                let between = now + ms(((deadline - now).whole_milliseconds() as f64 * fraction) as i64);
                prop_assert_eq!(p.holds(&input, between), e.member);
                prop_assert_eq!(p.holds(&input, deadline - MS), e.member);
                prop_assert_ne!(p.holds(&input, deadline), e.member);
            }
            None => {
                // Every time in the inputs is within a week of NOW: nothing changes later.
                prop_assert_eq!(p.holds(&input, now + ms(later)), e.member);
                prop_assert_eq!(p.holds(&input, now + days(3_650)), e.member);
            }
        }
    }

    #[test]
    fn the_next_deadline_follows_from_evaluating_at_the_deadline(
        p in predicate(),
        input in input(),
        now in (0..4 * DAY_MS).prop_map(|offset| NOW + ms(offset)),
    ) {
        // Evaluating again at each deadline walks every change, each later than the last.
        let mut e = p.evaluate(&input, now);
        let mut t = now;
        while let Some(deadline) = e.deadline {
            prop_assert!(deadline > t);
            let next = p.evaluate(&input, deadline);
            prop_assert_ne!(next.member, e.member);
            (t, e) = (deadline, next);
        }
    }

    #[test]
    fn lifecycle_segments_agree_with_the_lifecycle_stage(
        first in -200 * DAY_MS..DAY_MS,
        last in -200 * DAY_MS..DAY_MS,
        now in 0..DAY_MS,
    ) {
        let thresholds = LifecycleThresholds::default();
        let segments = compile(&tables(DEMO_SEGMENTS), &thresholds).unwrap();
        let (first, last, now) = (NOW + ms(first), NOW + ms(last), NOW + ms(now));
        let input = SegmentInput {
            first_seen: Some(first),
            last_seen: Some(last),
            ..SegmentInput::default()
        };
        let stage = thresholds.stage(first, last, now);
        for (name, stage_of) in [
            ("lifecycle_new", Lifecycle::New),
            ("lifecycle_active", Lifecycle::Active),
            ("lifecycle_dormant", Lifecycle::Dormant),
            ("lifecycle_churned", Lifecycle::Churned),
        ] {
            let s = segments.iter().find(|s| s.name == name).unwrap();
            prop_assert_eq!(s.condition.holds(&input, now), stage == stage_of, "{}", name);
        }
    }

    #[test]
    fn the_compiled_form_survives_json(p in predicate()) {
        let text = serde_json::to_string(&p).unwrap();
        prop_assert_eq!(serde_json::from_str::<Predicate>(&text).unwrap(), p);
    }

    #[test]
    fn any_condition_tree_compiles_or_names_its_problems(condition in tree()) {
        let table = json!({"name": "s", "condition": condition});
        match compile(&[table], &LifecycleThresholds::default()) {
            Ok(segments) => prop_assert_eq!(segments.len(), 1),
            Err(errors) => {
                prop_assert!(!errors.0.is_empty());
                for e in errors.0 {
                    prop_assert!(e.to_string().starts_with("segment \"s\": condition"), "{}", e);
                }
            }
        }
    }
}

/// Trees of the words of the language, valid or not.
fn tree() -> impl Strategy<Value = serde_json::Value> {
    let words = prop::sample::select(vec![
        "all",
        "any",
        "not",
        "metric",
        "event_count",
        "trait",
        "lifecycle",
        "within",
        "older_than",
        "cart",
        "no_order_since",
        "consent_granted",
        "field",
        "duration",
        "at_least",
        "at_most",
        "event",
        "category",
        "name",
        "equals",
        "in",
        "exists",
        "orders",
        "last_seen",
        "cart_updated_at",
        "not_empty",
        "new",
        "marketing",
        "7d",
        "90m",
        "0s",
        "30x",
    ]);
    let leaf = prop_oneof![
        words.clone().prop_map(serde_json::Value::from),
        (-3..100_i64).prop_map(serde_json::Value::from),
        any::<bool>().prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 32, 3, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(serde_json::Value::from),
            prop::collection::btree_map(words.clone(), inner, 1..3).prop_map(|m| {
                serde_json::Value::Object(m.into_iter().map(|(k, v)| (k.into(), v)).collect())
            }),
        ]
    })
}
