//! loadgen: simulated shop visitors sending event batches to the collector, or, with
//! `--raw-redis`, the same events written straight to Redis as a baseline.
//!
//! All batches are generated (and, for HTTP, encoded) before the clock starts, from `--seed`,
//! so two runs with the same flags send the same bytes (the same visitors, profiles and
//! message ids; only the timestamps differ) and the measurement is of the receiver, not of
//! the generator. Progress goes to stderr; stdout gets exactly one JSON line:
//! `{"events_sent":..,"events_acked":..,"events_per_sec":..,"p50_ms":..,"p99_ms":..,"errors":..,
//! "events_refused":..,"events_spooled":..,"retries":..,"answers_lost":..,"max_ms":..}`.
//! The exit status is non-zero when `errors` is.
//!
//! For fault tests, HTTP mode can pace the first attempts (`--rate`), retry every
//! unacknowledged batch with the same bytes, hence the same message ids, until a deadline
//! (`--retry-for`), and write the acknowledged events per profile (`--acked-by-profile`),
//! which must then equal the profiles' event counters exactly (once merged anonymous
//! profiles are added to the user profiles they were merged into).
//!
//! - `shop`: the catalog and the visitors' journeys, as `wire::Batch`es.
//! - `http`: POSTs encoded batches, retrying refusals (and, with `--retry-for`, lost
//!   answers) with the same bytes.
//! - `raw`: one plain pipeline per batch, the collector's per-event write mix.
//! - `stats`: counters, latencies and the JSON line.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context as _;
use clap::Parser;
use rand::{RngExt as _, SeedableRng as _};

/// Simulated shop traffic for the collector (or for Redis directly, as a baseline).
#[derive(Parser, Debug)]
#[command(version, about, args_override_self = true)]
struct Args {
    /// The collector's batch endpoint, e.g. http://127.0.0.1:8080/v1/fb.
    #[arg(
        long,
        required_unless_present_any = ["raw_redis", "store"],
        conflicts_with_all = ["raw_redis", "store"]
    )]
    url: Option<String>,
    /// Write the events straight to this Redis with plain pipelined commands instead.
    #[arg(long, value_name = "REDIS_URL", conflicts_with = "store")]
    raw_redis: Option<String>,
    /// Apply the events to this Redis through the collector's own code (batch to profile
    /// updates, then the profile store's script), without HTTP.
    #[arg(long, value_name = "REDIS_URL")]
    store: Option<String>,
    /// With `--store`: evaluate the segments of this TOML file (`[[segments]]` tables, as
    /// the collector's `segments_file`) on every update.
    #[arg(long, value_name = "FILE", requires = "store")]
    segments: Option<std::path::PathBuf>,
    /// The write key put in every batch.
    #[arg(long, default_value = "demo")]
    write_key: String,
    /// Events in total.
    #[arg(long, default_value_t = 200_000)]
    events: u64,
    /// Distinct visitors (each with an anonymous id; some identify themselves).
    #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u32).range(1..))]
    visitors: u32,
    /// Events per batch (each batch holds one visitor's events).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=500))]
    batch: u32,
    /// Requests (or Redis connections) in flight at once.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    concurrency: u32,
    /// Seed for the simulation; random (and printed on stderr) if not given.
    #[arg(long)]
    seed: Option<u64>,
    /// HTTP: start batches at this many events per second at most (retries not counted),
    /// so that a run lasts `events / rate` seconds; as fast as possible if not given.
    #[arg(long, value_name = "EVENTS_PER_SEC", requires = "url", value_parser = positive_rate)]
    rate: Option<f64>,
    /// HTTP: retry every batch that is not acknowledged (503 or 429, connection refused or
    /// dropped, no answer within `--timeout`) with the same bytes until it is, for at most
    /// this long after its first attempt (e.g. `30s`); then it counts as an error. Without
    /// it, only 503s are retried, three times.
    #[arg(long, value_name = "DURATION", requires = "url", value_parser = duration)]
    retry_for: Option<std::time::Duration>,
    /// HTTP: how long to wait for an answer before the attempt counts as lost.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = duration)]
    timeout: std::time::Duration,
    /// HTTP: write the acknowledged events per profile to this file, as a JSON object of
    /// profile id (`a:<anonymous id>`, `u:<user id>`) to count, each event under the profile
    /// the collector's grouping sends it to. An anonymous profile merged into a user profile
    /// (its hash's `merged_into`) has its events counted there instead.
    #[arg(long, value_name = "FILE", requires = "url")]
    acked_by_profile: Option<std::path::PathBuf>,
}

fn duration(text: &str) -> Result<std::time::Duration, String> {
    humantime_serde::re::humantime::parse_duration(text).map_err(|e| e.to_string())
}

fn positive_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(rate),
        _ => Err(format!(
            "{text:?} is not a positive number of events per second"
        )),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(summary) => {
            println!("{}", summary.json());
            if summary.errors > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}

#[tokio::main]
async fn run(args: Args) -> anyhow::Result<stats::Summary> {
    let seed = args.seed.unwrap_or_else(|| rand::rng().random());
    eprintln!(
        "loadgen: seed {seed}, {} events, {} visitors, {} per batch, concurrency {}",
        args.events, args.visitors, args.batch, args.concurrency
    );
    let started = Instant::now();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let batches = shop::generate(
        &mut rng,
        &args.write_key,
        args.events,
        args.visitors,
        args.batch,
    );
    eprintln!(
        "loadgen: generated {} batches in {:.2}s",
        batches.len(),
        started.elapsed().as_secs_f64()
    );
    let concurrency = args.concurrency as usize;
    if let Some(url) = &args.url {
        let options = http::Options {
            concurrency,
            rate: args.rate,
            retry: match args.retry_for {
                Some(limit) => http::Retry::Until(limit),
                None => http::Retry::Refusals(http::MAX_RETRIES),
            },
            timeout: args.timeout,
        };
        let (summary, by_profile) = http::run(url, batches, &options).await?;
        if let Some(path) = &args.acked_by_profile {
            let json = serde_json::to_string_pretty(&by_profile)?;
            std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(summary)
    } else if let Some(redis_url) = &args.raw_redis {
        raw::run(redis_url, batches, concurrency)
            .await
            .context("raw redis mode")
    } else if let Some(redis_url) = &args.store {
        store::run(redis_url, args.segments.as_deref(), batches, concurrency)
            .await
            .context("store mode")
    } else {
        anyhow::bail!("one of --url, --raw-redis or --store is required")
    }
}

mod shop {
    //! A small shop and its visitors: each batch continues one visitor's journey (pages,
    //! product views, cart changes, checkouts, orders, identifies, email opens and clicks).

    use rand::RngExt as _;
    use rand::rngs::SmallRng;
    use wire::{Batch, Context, Event, EventKind, Item, Property, Purpose, Value};

    const SITE: &str = "https://shop.example";
    const CATEGORIES: [&str; 12] = [
        "shoes",
        "shirts",
        "trousers",
        "jackets",
        "dresses",
        "bags",
        "watches",
        "hats",
        "socks",
        "sportswear",
        "kids",
        "accessories",
    ];
    const ADJECTIVES: [&str; 8] = [
        "Classic", "Urban", "Trail", "Linen", "Merino", "Canvas", "Vintage", "Everyday",
    ];
    const PRODUCTS_PER_CATEGORY: usize = 40;
    const LOCALES: [(&str, &str); 6] = [
        ("en-GB", "Europe/London"),
        ("de-DE", "Europe/Berlin"),
        ("fr-FR", "Europe/Paris"),
        ("en-US", "America/New_York"),
        ("nl-NL", "Europe/Amsterdam"),
        ("es-ES", "Europe/Madrid"),
    ];
    const SCREENS: [(u16, u16); 5] = [
        (390, 844),
        (414, 896),
        (1280, 800),
        (1440, 900),
        (1920, 1080),
    ];
    /// (utm_source, utm_medium, utm_campaign, referrer)
    const CAMPAIGNS: [(&str, &str, &str, &str); 4] = [
        ("google", "cpc", "brand-search", "https://www.google.com/"),
        ("newsletter", "email", "spring-sale", ""),
        (
            "instagram",
            "social",
            "new-arrivals",
            "https://www.instagram.com/",
        ),
        (
            "partner",
            "affiliate",
            "summer-deals",
            "https://deals.example/",
        ),
    ];
    const SEARCHES: [&str; 6] = [
        "running shoes",
        "rain jacket",
        "linen shirt",
        "gift",
        "sale",
        "black dress",
    ];

    /// A product in the catalog.
    struct Product {
        id: String,
        category: &'static str,
        name: String,
        price: i64,
    }

    /// Where one visitor is in their journey.
    struct Visitor {
        anonymous_id: String,
        user_id: Option<String>,
        session_id: String,
        locale: usize,
        screen: usize,
        campaign: Option<usize>,
        page_url: String,
        /// Product index and quantity.
        cart: Vec<(usize, u32)>,
        checkout_started: bool,
        last_product: Option<usize>,
    }

    /// `events` events in batches of at most `batch`, each batch from one of `visitors`
    /// visitors chosen at random, consent granted for every purpose.
    pub fn generate(
        rng: &mut SmallRng,
        write_key: &str,
        events: u64,
        visitors: u32,
        batch: u32,
    ) -> Vec<Batch> {
        let catalog = catalog(rng);
        let mut visitors: Vec<Visitor> = (0..visitors).map(|_| new_visitor(rng)).collect();
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let all_purposes = [
            Purpose::Necessary,
            Purpose::Analytics,
            Purpose::Personalization,
            Purpose::Marketing,
        ]
        .iter()
        .fold(0u8, |mask, p| mask | p.bit());
        let mut batches = Vec::with_capacity(events.div_ceil(u64::from(batch)) as usize);
        let mut left = events;
        while left > 0 {
            let n = left.min(u64::from(batch)) as usize;
            left -= n as u64;
            let v = rng.random_range(0..visitors.len());
            let visitor = &mut visitors[v];
            if rng.random_bool(0.15) {
                new_session(rng, visitor);
            }
            // Events a few seconds apart, the last one just before the batch is sent.
            let mut events = Vec::with_capacity(n);
            let mut t = now_ms - 1_000 * n as i64;
            for _ in 0..n {
                t += rng.random_range(200..1_000);
                events.push(next_event(rng, &catalog, visitor, t));
            }
            let (utm_source, utm_medium, utm_campaign, referrer) = match visitor.campaign {
                Some(c) => {
                    let (s, m, c, r) = CAMPAIGNS[c];
                    (Some(s), Some(m), Some(c), (!r.is_empty()).then_some(r))
                }
                None => (None, None, None, None),
            };
            let (locale, timezone) = LOCALES[visitor.locale];
            let (screen_width, screen_height) = SCREENS[visitor.screen];
            batches.push(Batch {
                write_key: write_key.into(),
                sent_at_ms: now_ms,
                consent: all_purposes,
                context: Context {
                    page_url: Some(visitor.page_url.clone()),
                    referrer: referrer.map(Into::into),
                    utm_source: utm_source.map(Into::into),
                    utm_medium: utm_medium.map(Into::into),
                    utm_campaign: utm_campaign.map(Into::into),
                    utm_term: None,
                    utm_content: None,
                    locale: Some(locale.into()),
                    timezone: Some(timezone.into()),
                    screen_width,
                    screen_height,
                    session_id: Some(visitor.session_id.clone()),
                    anonymous_id: Some(visitor.anonymous_id.clone()),
                    // The user id the visitor has when the batch is sent, as the tracker's
                    // batch context carries it: already in the batch whose events include
                    // the identify, so a visitor who identifies in their first batch never
                    // has events on the anonymous profile.
                    user_id: visitor.user_id.clone(),
                },
                events,
            });
        }
        batches
    }

    fn catalog(rng: &mut SmallRng) -> Vec<Product> {
        let mut products = Vec::with_capacity(CATEGORIES.len() * PRODUCTS_PER_CATEGORY);
        for category in CATEGORIES {
            for i in 0..PRODUCTS_PER_CATEGORY {
                let adjective = ADJECTIVES[rng.random_range(0..ADJECTIVES.len())];
                products.push(Product {
                    id: format!("sku-{category}-{i:03}"),
                    category,
                    name: format!("{adjective} {} {i}", category.trim_end_matches('s')),
                    // Prices in cents, 9.90 to 249.90.
                    price: rng.random_range(1..25) * 1_000 - 10,
                });
            }
        }
        products
    }

    fn random_id(rng: &mut SmallRng) -> String {
        let mut bytes = [0u8; 16];
        rng.fill(&mut bytes[..]);
        uuid::Builder::from_random_bytes(bytes)
            .into_uuid()
            .to_string()
    }

    fn new_visitor(rng: &mut SmallRng) -> Visitor {
        let mut v = Visitor {
            anonymous_id: random_id(rng),
            user_id: None,
            session_id: String::new(),
            locale: rng.random_range(0..LOCALES.len()),
            screen: rng.random_range(0..SCREENS.len()),
            campaign: None,
            page_url: format!("{SITE}/"),
            cart: Vec::new(),
            checkout_started: false,
            last_product: None,
        };
        new_session(rng, &mut v);
        v
    }

    fn new_session(rng: &mut SmallRng, v: &mut Visitor) {
        v.session_id = random_id(rng);
        v.campaign = rng
            .random_bool(0.4)
            .then(|| rng.random_range(0..CAMPAIGNS.len()));
        v.page_url = match v.campaign {
            Some(c) => {
                let (s, m, c, _) = CAMPAIGNS[c];
                format!("{SITE}/?utm_source={s}&utm_medium={m}&utm_campaign={c}")
            }
            None => format!("{SITE}/"),
        };
    }

    fn message_id(rng: &mut SmallRng) -> [u8; 16] {
        let mut id = [0u8; 16];
        rng.fill(&mut id[..]);
        // A version-4 UUID: random, and never all zero.
        *uuid::Builder::from_random_bytes(id).into_uuid().as_bytes()
    }

    fn string(key: &str, value: impl Into<String>) -> Property {
        Property {
            key: key.into(),
            value: Value::String(value.into()),
        }
    }

    fn item(p: &Product, quantity: u32) -> Item {
        Item {
            product_id: p.id.clone(),
            category: Some(p.category.into()),
            price: p.price,
            quantity,
            name: Some(p.name.clone()),
        }
    }

    /// The visitor's next event, chosen by weights that depend on where they are.
    fn next_event(rng: &mut SmallRng, catalog: &[Product], v: &mut Visitor, t: i64) -> Event {
        let has_cart = !v.cart.is_empty();
        let weights: [(EventKind, u32); 10] = [
            (EventKind::Page, 300),
            (EventKind::ProductViewed, 300),
            (EventKind::CartAdd, 100),
            (EventKind::CartRemove, if has_cart { 30 } else { 0 }),
            (EventKind::CheckoutStarted, if has_cart { 40 } else { 0 }),
            (
                EventKind::OrderCompleted,
                if has_cart && v.checkout_started {
                    150
                } else {
                    0
                },
            ),
            (
                EventKind::Identify,
                if v.user_id.is_none() { 30 } else { 3 },
            ),
            (EventKind::Track, 50),
            (
                EventKind::EmailOpened,
                if v.user_id.is_some() { 20 } else { 0 },
            ),
            (
                EventKind::EmailClicked,
                if v.user_id.is_some() { 10 } else { 0 },
            ),
        ];
        let total: u32 = weights.iter().map(|(_, w)| w).sum();
        let mut pick = rng.random_range(0..total);
        let kind = weights
            .iter()
            .find(|(_, w)| {
                if pick < *w {
                    true
                } else {
                    pick -= w;
                    false
                }
            })
            .map_or(EventKind::Page, |(k, _)| *k);

        let mut e = Event {
            message_id: message_id(rng),
            timestamp_ms: t,
            kind,
            purpose: Purpose::Analytics,
            ..Event::default()
        };
        match kind {
            EventKind::Page => {
                let (path, title) = match rng.random_range(0..4) {
                    0 => ("/".to_string(), "Home".to_string()),
                    1 | 2 => {
                        let c = CATEGORIES[rng.random_range(0..CATEGORIES.len())];
                        (format!("/c/{c}"), format!("Category: {c}"))
                    }
                    _ => ("/sale".to_string(), "Sale".to_string()),
                };
                v.page_url = format!("{SITE}{path}");
                e.name = Some(title.clone());
                e.properties = vec![string("path", path), string("title", title)];
            }
            EventKind::ProductViewed => {
                // Visitors browse within a category more often than not.
                let i = match v.last_product {
                    Some(last) if rng.random_bool(0.6) => {
                        let base = last - last % PRODUCTS_PER_CATEGORY;
                        base + rng.random_range(0..PRODUCTS_PER_CATEGORY)
                    }
                    _ => rng.random_range(0..catalog.len()),
                };
                let p = &catalog[i];
                v.last_product = Some(i);
                v.page_url = format!("{SITE}/p/{}", p.id);
                e.items = vec![item(p, 1)];
            }
            EventKind::CartAdd => {
                let i = v
                    .last_product
                    .unwrap_or_else(|| rng.random_range(0..catalog.len()));
                let quantity = if rng.random_bool(0.8) {
                    1
                } else {
                    rng.random_range(2..4)
                };
                match v.cart.iter_mut().find(|(p, _)| *p == i) {
                    Some(line) => line.1 += quantity,
                    None => v.cart.push((i, quantity)),
                }
                v.checkout_started = false;
                e.items = vec![item(&catalog[i], quantity)];
            }
            EventKind::CartRemove => {
                let line = rng.random_range(0..v.cart.len());
                let (i, quantity) = v.cart.remove(line);
                v.checkout_started = false;
                e.items = vec![item(&catalog[i], quantity)];
            }
            EventKind::CheckoutStarted => {
                v.checkout_started = true;
                v.page_url = format!("{SITE}/checkout");
                e.items = v.cart.iter().map(|(i, q)| item(&catalog[*i], *q)).collect();
                e.revenue = cart_total(catalog, &v.cart);
                e.currency = Some("EUR".into());
            }
            EventKind::OrderCompleted => {
                let order_id = format!("ord-{}", &random_id(rng)[..13]);
                v.page_url = format!("{SITE}/order/{order_id}");
                e.items = v.cart.iter().map(|(i, q)| item(&catalog[*i], *q)).collect();
                e.revenue = cart_total(catalog, &v.cart);
                e.currency = Some("EUR".into());
                e.order_id = Some(order_id);
                v.cart.clear();
                v.checkout_started = false;
            }
            EventKind::Identify => {
                let user_id = v
                    .user_id
                    .get_or_insert_with(|| format!("user-{}", &random_id(rng)[..8]))
                    .clone();
                e.user_id = Some(user_id.clone());
                e.properties = vec![
                    string("email", format!("{user_id}@example.com")),
                    string(
                        "plan",
                        if rng.random_bool(0.2) {
                            "gold"
                        } else {
                            "basic"
                        },
                    ),
                    Property {
                        key: "newsletter".into(),
                        value: Value::Bool(rng.random_bool(0.5)),
                    },
                    Property {
                        key: "birth_year".into(),
                        value: Value::Int(rng.random_range(1950..2006)),
                    },
                    Property {
                        key: "nps".into(),
                        value: Value::Float(f64::from(rng.random_range(0..=100u8)) / 10.0),
                    },
                ];
            }
            EventKind::Track => {
                if rng.random_bool(0.7) {
                    let query = SEARCHES[rng.random_range(0..SEARCHES.len())];
                    e.name = Some("search".into());
                    e.properties = vec![string("query", query)];
                    v.page_url = format!("{SITE}/search?q={}", query.replace(' ', "+"));
                } else {
                    let i = v
                        .last_product
                        .unwrap_or_else(|| rng.random_range(0..catalog.len()));
                    e.name = Some("wishlist_add".into());
                    e.properties = vec![string("product_id", catalog[i].id.clone())];
                }
            }
            EventKind::EmailOpened | EventKind::EmailClicked => {
                e.purpose = Purpose::Marketing;
                e.name = Some("spring-sale".into());
                e.properties = vec![string("email_id", "spring-sale-2")];
                if kind == EventKind::EmailClicked {
                    e.properties.push(string("link", format!("{SITE}/sale")));
                }
            }
            EventKind::Alias | EventKind::ConsentChange => {}
        }
        e
    }

    fn cart_total(catalog: &[Product], cart: &[(usize, u32)]) -> i64 {
        cart.iter()
            .map(|(i, q)| catalog[*i].price * i64::from(*q))
            .sum()
    }
}

mod stats {
    //! What a run counted and measured, and the one JSON line that reports it.

    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use serde::Serialize;

    /// Shared counters, updated by the workers and read by the progress reporter.
    #[derive(Default)]
    pub struct Counters {
        /// Events in batches that have been sent (retries not counted again).
        pub sent: AtomicU64,
        /// Events the receiver acknowledged.
        pub acked: AtomicU64,
        /// Batches that failed for good.
        pub errors: AtomicU64,
        /// Events in answers that refused a batch (503, 429), counted per answer.
        pub refused: AtomicU64,
        /// Acknowledged events the receiver had spooled (`"spooled": true`).
        pub spooled: AtomicU64,
        /// Attempts after a batch's first.
        pub retries: AtomicU64,
        /// Attempts sent (or being sent) that got no answer: connection dropped, timed out.
        pub lost: AtomicU64,
    }

    impl Counters {
        /// Adds `n` to `counter`.
        pub fn add(counter: &AtomicU64, n: u64) {
            counter.fetch_add(n, Ordering::Relaxed);
        }

        /// Reads `counter`.
        pub fn get(counter: &AtomicU64) -> u64 {
            counter.load(Ordering::Relaxed)
        }
    }

    /// The final report, printed as one JSON line in this field order.
    #[derive(Debug, Serialize)]
    pub struct Summary {
        /// Events in the batches sent.
        pub events_sent: u64,
        /// Events acknowledged (HTTP: `accepted`; raw: written).
        pub events_acked: u64,
        /// Acknowledged events per second of wall time.
        pub events_per_sec: f64,
        /// Median request (or pipeline) latency.
        pub p50_ms: f64,
        /// 99th percentile request (or pipeline) latency.
        pub p99_ms: f64,
        /// Batches that failed for good.
        pub errors: u64,
        /// Events in refusals (503, 429), once per answer: a batch refused twice counts
        /// twice.
        pub events_refused: u64,
        /// Acknowledged events that the receiver had spooled rather than applied.
        pub events_spooled: u64,
        /// Attempts after a batch's first (refusals and lost answers retried).
        pub retries: u64,
        /// Attempts that got no answer (connection refused not included: that request was
        /// never sent).
        pub answers_lost: u64,
        /// The slowest request (or pipeline).
        pub max_ms: f64,
    }

    impl Summary {
        /// Builds the report from the counters, all latencies (in microseconds) and the
        /// wall time.
        pub fn new(counters: &Counters, mut latencies_us: Vec<u32>, elapsed: Duration) -> Self {
            latencies_us.sort_unstable();
            let acked = Counters::get(&counters.acked);
            let secs = elapsed.as_secs_f64().max(1e-9);
            let max_us = latencies_us.last().copied().unwrap_or(0);
            Summary {
                events_sent: Counters::get(&counters.sent),
                events_acked: acked,
                events_per_sec: round(acked as f64 / secs, 1),
                p50_ms: round(percentile(&latencies_us, 0.50) / 1000.0, 3),
                p99_ms: round(percentile(&latencies_us, 0.99) / 1000.0, 3),
                errors: Counters::get(&counters.errors),
                events_refused: Counters::get(&counters.refused),
                events_spooled: Counters::get(&counters.spooled),
                retries: Counters::get(&counters.retries),
                answers_lost: Counters::get(&counters.lost),
                max_ms: round(f64::from(max_us) / 1000.0, 3),
            }
        }

        /// The JSON line.
        pub fn json(&self) -> String {
            serde_json::to_string(self).unwrap_or_else(|_| "{}".into())
        }
    }

    /// Nearest-rank percentile of sorted values; 0 when there are none.
    fn percentile(sorted: &[u32], q: f64) -> f64 {
        if sorted.is_empty() {
            return 0.0;
        }
        let rank = (q * sorted.len() as f64).ceil() as usize;
        f64::from(sorted[rank.clamp(1, sorted.len()) - 1])
    }

    fn round(x: f64, decimals: i32) -> f64 {
        let f = 10f64.powi(decimals);
        (x * f).round() / f
    }

    /// Runs `apply` over every batch from one task per context (a connection, a store),
    /// timing each call; `apply` returns the events acknowledged or an error, reported once
    /// per task.
    pub async fn drive<C, F, Fut>(
        batches: Vec<wire::Batch>,
        contexts: Vec<C>,
        apply: F,
    ) -> anyhow::Result<Summary>
    where
        C: Clone + Send + 'static,
        F: Fn(C, wire::Batch) -> Fut + Clone + Send + 'static,
        Fut: std::future::Future<Output = Result<u64, String>> + Send,
    {
        use std::sync::Arc;
        use std::sync::atomic::AtomicUsize;

        let total: u64 = batches.iter().map(|b| b.events.len() as u64).sum();
        let batches = Arc::new(batches);
        let counters = Arc::new(Counters::default());
        let next = Arc::new(AtomicUsize::new(0));
        let progress = spawn_progress(counters.clone(), total);
        let started = std::time::Instant::now();
        let workers: Vec<_> = contexts
            .into_iter()
            .map(|ctx| {
                let (batches, counters, next) = (batches.clone(), counters.clone(), next.clone());
                let apply = apply.clone();
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    let mut reported = false;
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(batch) = batches.get(i) else { break };
                        Counters::add(&counters.sent, batch.events.len() as u64);
                        let batch = batch.clone();
                        let t = std::time::Instant::now();
                        let result = apply(ctx.clone(), batch).await;
                        latencies.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
                        match result {
                            Ok(acked) => Counters::add(&counters.acked, acked),
                            Err(err) => {
                                Counters::add(&counters.errors, 1);
                                if !reported {
                                    eprintln!("loadgen: batch {i}: {err}");
                                    reported = true;
                                }
                            }
                        }
                    }
                    latencies
                })
            })
            .collect();
        let mut latencies = Vec::new();
        for worker in workers {
            latencies.extend(worker.await?);
        }
        let elapsed = started.elapsed();
        progress.abort();
        Ok(Summary::new(&counters, latencies, elapsed))
    }

    /// Prints progress on stderr every two seconds until aborted.
    pub fn spawn_progress(
        counters: std::sync::Arc<Counters>,
        total: u64,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            tick.tick().await;
            loop {
                tick.tick().await;
                let acked = Counters::get(&counters.acked);
                eprintln!(
                    "loadgen: {}/{total} events sent, {acked} acked ({:.0}/s), {} errors, {} retries",
                    Counters::get(&counters.sent),
                    acked as f64 / started.elapsed().as_secs_f64(),
                    Counters::get(&counters.errors),
                    Counters::get(&counters.retries),
                );
            }
        })
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn summary_reports_throughput_and_nearest_rank_percentiles() {
            let counters = Counters::default();
            Counters::add(&counters.sent, 1_000);
            Counters::add(&counters.acked, 990);
            Counters::add(&counters.errors, 1);
            Counters::add(&counters.refused, 40);
            Counters::add(&counters.spooled, 60);
            Counters::add(&counters.retries, 3);
            Counters::add(&counters.lost, 1);
            // 1..=100 ms, unsorted.
            let latencies: Vec<u32> = (1..=100).rev().map(|ms| ms * 1_000).collect();
            let s = Summary::new(&counters, latencies, Duration::from_millis(500));
            assert_eq!(
                s.json(),
                concat!(
                    r#"{"events_sent":1000,"events_acked":990,"events_per_sec":1980.0,"#,
                    r#""p50_ms":50.0,"p99_ms":99.0,"errors":1,"events_refused":40,"#,
                    r#""events_spooled":60,"retries":3,"answers_lost":1,"max_ms":100.0}"#
                )
            );
            assert_eq!(percentile(&[], 0.5), 0.0);
            assert_eq!(percentile(&[7], 0.99), 7.0);
        }
    }
}

mod http {
    //! HTTP mode: encoded batches POSTed by `concurrency` workers, optionally paced. A batch
    //! is retried with the same bytes (the collector dedupes by message id what it did
    //! apply): on 503 three times by default, or, with [`Retry::Until`], on every refusal
    //! and lost answer until acknowledged or out of time.

    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use std::time::Duration;

    use axum::body::Bytes;
    use reqwest::StatusCode;
    use time::OffsetDateTime;
    use tokio::time::Instant;

    use crate::stats::{Counters, Summary};

    /// Retries of one batch answered 503 before it counts as an error, by default.
    pub const MAX_RETRIES: u32 = 3;
    /// The longest `Retry-After` honoured; a bench should not stall on a bad header.
    const MAX_RETRY_AFTER: Duration = Duration::from_secs(5);
    /// The first wait after a lost answer or a refused connection, doubled up to
    /// [`MAX_BACKOFF`].
    const FIRST_BACKOFF: Duration = Duration::from_millis(50);
    /// The longest wait between two attempts after lost answers.
    const MAX_BACKOFF: Duration = Duration::from_secs(1);
    /// Error details printed on stderr; the rest are only counted.
    const MAX_REPORTED_ERRORS: u64 = 5;

    /// Which unacknowledged batches are sent again.
    #[derive(Debug, Clone, Copy)]
    pub enum Retry {
        /// 503s, at most this many times; anything else is an error.
        Refusals(u32),
        /// 503s, 429s, refused connections and lost answers, until this long after the
        /// batch's first attempt.
        Until(Duration),
    }

    /// How to send.
    #[derive(Debug, Clone)]
    pub struct Options {
        /// Workers, each with one request in flight.
        pub concurrency: usize,
        /// Events per second for first attempts, if paced.
        pub rate: Option<f64>,
        /// What is retried.
        pub retry: Retry,
        /// How long to wait for an answer.
        pub timeout: Duration,
    }

    /// One batch, ready to send.
    struct Prepared {
        body: Bytes,
        events: u64,
        /// Events per profile, by the collector's own grouping (`ingest::pipeline`).
        profiles: Vec<(String, u64)>,
        /// When its first attempt may start, from the start of the run.
        start_at: Duration,
    }

    /// What the collector acknowledged for one batch.
    #[derive(Debug, PartialEq, Eq)]
    struct Ack {
        accepted: u64,
        spooled: bool,
    }

    /// Sends every batch to `url`; reports, with the acknowledged events per profile.
    ///
    /// # Errors
    /// The HTTP client cannot be built.
    pub async fn run(
        url: &str,
        batches: Vec<wire::Batch>,
        options: &Options,
    ) -> anyhow::Result<(Summary, BTreeMap<String, u64>)> {
        let total: u64 = batches.iter().map(|b| b.events.len() as u64).sum();
        let mut before = 0u64;
        let prepared: Arc<Vec<Prepared>> = Arc::new(
            batches
                .into_iter()
                .map(|b| {
                    let start_at = options.rate.map_or(Duration::ZERO, |rate| {
                        Duration::from_secs_f64(before as f64 / rate)
                    });
                    before += b.events.len() as u64;
                    prepare(b, start_at)
                })
                .collect(),
        );
        let bytes: usize = prepared.iter().map(|p| p.body.len()).sum();
        eprintln!(
            "loadgen: encoded {} batches, {:.1} MB, posting to {url}{}",
            prepared.len(),
            bytes as f64 / 1e6,
            options
                .rate
                .map(|r| format!(" at {r} events/s"))
                .unwrap_or_default()
        );
        let client = reqwest::Client::builder()
            // Load goes to the address given, never through a proxy from the environment.
            .no_proxy()
            .pool_max_idle_per_host(options.concurrency)
            .tcp_nodelay(true)
            .timeout(options.timeout)
            .build()?;
        let counters = Arc::new(Counters::default());
        let next = Arc::new(AtomicUsize::new(0));
        let reported = Arc::new(AtomicU64::new(0));
        let progress = crate::stats::spawn_progress(counters.clone(), total);
        let started = Instant::now();
        let workers: Vec<_> = (0..options.concurrency)
            .map(|_| {
                let (client, url, prepared) = (client.clone(), url.to_string(), prepared.clone());
                let (counters, next, reported) = (counters.clone(), next.clone(), reported.clone());
                let retry = options.retry;
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    let mut by_profile: BTreeMap<String, u64> = BTreeMap::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(batch) = prepared.get(i) else {
                            break;
                        };
                        tokio::time::sleep_until(started + batch.start_at).await;
                        Counters::add(&counters.sent, batch.events);
                        let sender = Sender {
                            client: &client,
                            url: &url,
                            counters: &counters,
                            retry,
                        };
                        let result = sender.send(batch, &mut latencies).await;
                        let result = result.and_then(|ack| {
                            // Every event of these batches is valid and consented: one left
                            // out would make the per-profile report wrong.
                            if ack.accepted == batch.events {
                                Ok(ack)
                            } else {
                                Err(format!(
                                    "{} of {} events accepted",
                                    ack.accepted, batch.events
                                ))
                            }
                        });
                        match result {
                            Ok(ack) => {
                                Counters::add(&counters.acked, ack.accepted);
                                if ack.spooled {
                                    Counters::add(&counters.spooled, ack.accepted);
                                }
                                for (profile, n) in &batch.profiles {
                                    *by_profile.entry(profile.clone()).or_default() += n;
                                }
                            }
                            Err(err) => {
                                Counters::add(&counters.errors, 1);
                                if reported.fetch_add(1, Ordering::Relaxed) < MAX_REPORTED_ERRORS {
                                    eprintln!("loadgen: batch {i}: {err}");
                                }
                            }
                        }
                    }
                    (latencies, by_profile)
                })
            })
            .collect();
        let mut latencies = Vec::new();
        let mut by_profile: BTreeMap<String, u64> = BTreeMap::new();
        for worker in workers {
            let (l, profiles) = worker.await?;
            latencies.extend(l);
            for (profile, n) in profiles {
                *by_profile.entry(profile).or_default() += n;
            }
        }
        let elapsed = started.elapsed();
        progress.abort();
        Ok((Summary::new(&counters, latencies, elapsed), by_profile))
    }

    /// Encodes `batch` and groups its events by profile as the collector will.
    fn prepare(batch: wire::Batch, start_at: Duration) -> Prepared {
        let body = Bytes::from(wire::encode(&batch));
        let events = batch.events.len() as u64;
        let profiles = match ingest::pipeline::prepare(
            batch,
            OffsetDateTime::now_utc(),
            &ingest::pipeline::Rules::default(),
        ) {
            Ok(prepared) => prepared
                .updates
                .iter()
                .map(|u| (u.profile.to_string(), u.events.len() as u64))
                .collect(),
            // The collector refuses such a batch as a whole; nothing to count.
            Err(_) => Vec::new(),
        };
        Prepared {
            body,
            events,
            profiles,
            start_at,
        }
    }

    /// One worker's way of sending a batch.
    struct Sender<'a> {
        client: &'a reqwest::Client,
        url: &'a str,
        counters: &'a Counters,
        retry: Retry,
    }

    /// One attempt's outcome.
    enum Attempt {
        Acked(Ack),
        /// 503 or 429: not taken, retry after this long.
        Refused(Duration),
        /// No connection: the request was never sent.
        NotSent(String),
        /// Sent (or partly), no answer: it may or may not have been applied.
        Lost(String),
        /// Any other answer: an error.
        Failed(String),
    }

    impl Sender<'_> {
        /// POSTs one batch until acknowledged or out of retries. Every attempt's latency
        /// goes to `latencies` (microseconds).
        async fn send(&self, batch: &Prepared, latencies: &mut Vec<u32>) -> Result<Ack, String> {
            let first = Instant::now();
            let mut retries = 0u32;
            let mut backoff = FIRST_BACKOFF;
            loop {
                let t = Instant::now();
                let attempt = self.attempt(&batch.body).await;
                latencies.push(micros(t.elapsed()));
                if let Attempt::Lost(_) = attempt {
                    Counters::add(&self.counters.lost, 1);
                }
                let wait = match attempt {
                    Attempt::Acked(ack) => return Ok(ack),
                    Attempt::Failed(err) => return Err(err),
                    Attempt::Refused(retry_after) => {
                        Counters::add(&self.counters.refused, batch.events);
                        backoff = FIRST_BACKOFF;
                        match self.retry {
                            Retry::Refusals(max) if retries >= max => {
                                return Err(format!("refused {} times", retries + 1));
                            }
                            _ => retry_after,
                        }
                    }
                    Attempt::NotSent(err) | Attempt::Lost(err) => {
                        if let Retry::Refusals(_) = self.retry {
                            return Err(err);
                        }
                        let wait = backoff;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        wait
                    }
                };
                if let Retry::Until(limit) = self.retry
                    && first.elapsed() + wait > limit
                {
                    return Err(format!(
                        "not acknowledged within {limit:?} ({} attempts)",
                        retries + 1
                    ));
                }
                tokio::time::sleep(wait).await;
                retries += 1;
                Counters::add(&self.counters.retries, 1);
            }
        }

        async fn attempt(&self, body: &Bytes) -> Attempt {
            let response = self
                .client
                .post(self.url)
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .body(body.clone())
                .send()
                .await;
            let response = match response {
                Ok(r) => r,
                Err(err) if err.is_connect() => return Attempt::NotSent(format!("{err}")),
                Err(err) => return Attempt::Lost(format!("request failed: {err}")),
            };
            let status = response.status();
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let text = match response.bytes().await {
                Ok(text) => text,
                Err(err) => return Attempt::Lost(format!("reading the answer: {err}")),
            };
            if status == StatusCode::OK {
                return match parse_ack(&text) {
                    Ok(ack) => Attempt::Acked(ack),
                    Err(err) => Attempt::Failed(err),
                };
            }
            let refused = status == StatusCode::SERVICE_UNAVAILABLE
                || (status == StatusCode::TOO_MANY_REQUESTS
                    && matches!(self.retry, Retry::Until(_)));
            if refused {
                let wait = retry_after
                    .unwrap_or(Duration::from_secs(1))
                    .min(MAX_RETRY_AFTER);
                return Attempt::Refused(wait);
            }
            let body = String::from_utf8_lossy(&text);
            let body: String = body.chars().take(300).collect();
            Attempt::Failed(format!("{status}: {body}"))
        }
    }

    /// The `accepted` count and `spooled` flag of a 200 answer.
    fn parse_ack(text: &[u8]) -> Result<Ack, String> {
        let json: serde_json::Value = serde_json::from_slice(text)
            .map_err(|e| format!("200 with a body that is not JSON: {e}"))?;
        let accepted = json["accepted"]
            .as_u64()
            .ok_or_else(|| format!("200 without an accepted count: {json}"))?;
        Ok(Ack {
            accepted,
            spooled: json["spooled"].as_bool().unwrap_or(false),
        })
    }

    fn micros(d: Duration) -> u32 {
        u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn an_answer_says_what_was_accepted_and_whether_it_was_spooled() {
            assert_eq!(
                parse_ack(br#"{"accepted":20,"rejected":[]}"#),
                Ok(Ack {
                    accepted: 20,
                    spooled: false
                })
            );
            assert_eq!(
                parse_ack(br#"{"accepted":3,"rejected":[],"spooled":true}"#),
                Ok(Ack {
                    accepted: 3,
                    spooled: true
                })
            );
            assert_eq!(
                parse_ack(br#"{"rejected":[]}"#),
                Err(r#"200 without an accepted count: {"rejected":[]}"#.to_string())
            );
        }

        #[test]
        fn events_are_counted_for_the_profile_the_collector_gives_them() {
            let event = |n: u8, kind: wire::EventKind, user: Option<&str>| wire::Event {
                message_id: [n; 16],
                timestamp_ms: 1,
                kind,
                purpose: wire::Purpose::Analytics,
                user_id: user.map(Into::into),
                ..wire::Event::default()
            };
            let batch = wire::Batch {
                write_key: "k".into(),
                sent_at_ms: 1,
                consent: 0b1111,
                context: wire::Context {
                    anonymous_id: Some("visitor-1".into()),
                    ..wire::Context::default()
                },
                events: vec![
                    event(1, wire::EventKind::Page, None),
                    event(2, wire::EventKind::Identify, Some("alice")),
                    event(3, wire::EventKind::Page, None),
                ],
            };
            let prepared = prepare(batch, Duration::from_millis(5));
            assert_eq!(prepared.events, 3);
            assert_eq!(prepared.start_at, Duration::from_millis(5));
            assert_eq!(
                prepared.profiles,
                vec![("a:visitor-1".to_string(), 2), ("u:alice".to_string(), 1)]
            );
        }
    }
}

mod store {
    //! Store mode: the collector's work without HTTP. Each batch goes through
    //! `ingest::pipeline::prepare` and `RedisProfiles::apply` (one script call per profile,
    //! dedupe included), from `concurrency` tasks sharing one multiplexed connection as the
    //! collector does. Set against raw mode, it prices the script; against the collector,
    //! it prices HTTP and decoding.

    use std::path::Path;

    use anyhow::Context as _;
    use profile_cache::{ProfileConfig, RedisProfiles};
    use time::OffsetDateTime;
    use wire::Batch;

    use crate::stats::Summary;

    /// Applies every batch, evaluating the segments of `segments` if given, and reports.
    ///
    /// # Errors
    /// The segments do not check, or Redis cannot be reached.
    pub async fn run(
        url: &str,
        segments: Option<&Path>,
        batches: Vec<Batch>,
        concurrency: usize,
    ) -> anyhow::Result<Summary> {
        let config = ingest::Config {
            segments_file: segments.map(Into::into),
            ..ingest::Config::default()
        };
        let segments = config.segments()?;
        let store = RedisProfiles::connect(url, ProfileConfig::default())
            .await
            .with_context(|| format!("connecting to {url}"))?
            .with_segments(&segments)
            .await?;
        eprintln!("loadgen: applying {} batches to {url}", batches.len());
        crate::stats::drive(
            batches,
            vec![store; concurrency],
            |store, batch| async move {
                let prepared = ingest::pipeline::prepare(
                    batch,
                    OffsetDateTime::now_utc(),
                    &ingest::pipeline::Rules::default(),
                )
                .map_err(|e| format!("{}: {}", e.field, e.problem))?;
                let report = store
                    .apply(&prepared.updates)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(report.applied + report.duplicates)
            },
        )
        .await
    }
}

mod raw {
    //! Raw mode, the baseline: for each batch one pipeline of plain commands making the
    //! writes the collector's apply script makes (profile-cache `apply.lua`), without its
    //! reads, checks, dedupe lookups or atomicity, over `concurrency` connections.
    //!
    //! Per event: `ZADD` dedupe, `HINCRBY` events and counts, then by kind `HINCRBY`
    //! page views, `HSET` traits, `ZADD` viewed + `ZINCRBY` categories, `HINCRBY` cart,
    //! order counters and bought categories, email counters; and `XADD stream:events
    //! MAXLEN ~` with an event JSON like the collector's. Per profile and batch: `HSET` id
    //! and first/last seen, `SADD` ids, trim recently viewed.

    use anyhow::Context as _;
    use profile_cache::keys::{EVENT_STREAM, ProfileKeys};
    use profile_cache::{ProfileConfig, ProfileId};
    use serde_json::json;
    use std::sync::Arc;
    use wire::{Batch, Event, EventKind};

    use crate::stats::Summary;

    /// Writes every batch to Redis at `url` and reports.
    ///
    /// # Errors
    /// Redis cannot be reached.
    pub async fn run(
        url: &str,
        batches: Vec<Batch>,
        concurrency: usize,
    ) -> anyhow::Result<Summary> {
        let client = redis::Client::open(url).with_context(|| format!("redis url {url}"))?;
        let mut connections = Vec::with_capacity(concurrency);
        for _ in 0..concurrency {
            connections.push(
                client
                    .get_multiplexed_async_connection()
                    .await
                    .context("connecting")?,
            );
        }
        eprintln!("loadgen: writing {} batches to {url}", batches.len());
        let config = Arc::new(ProfileConfig::default());
        crate::stats::drive(batches, connections, move |mut con, batch| {
            let config = config.clone();
            async move {
                // Built in the timed section: the collector builds its calls too.
                let pipe = pipeline(&batch, &config, now_ms());
                pipe.query_async::<()>(&mut con)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(batch.events.len() as u64)
            }
        })
        .await
    }

    /// The profile an event belongs to, and its user id if known, by the collector's rule:
    /// identify and alias name their user; other events belong to the batch's user, else to
    /// the anonymous visitor.
    fn owner<'a>(batch: &'a Batch, e: &'a Event) -> Option<(ProfileId, Option<&'a str>)> {
        let user = match e.kind {
            EventKind::Identify | EventKind::Alias => e.user_id.as_deref(),
            _ => None,
        }
        .or(batch.context.user_id.as_deref());
        match user {
            Some(u) => Some((ProfileId::user(u).ok()?, Some(u))),
            None => Some((
                ProfileId::anonymous(batch.context.anonymous_id.as_deref()?).ok()?,
                None,
            )),
        }
    }

    /// The writes for one batch, profile by profile as the collector groups them.
    fn pipeline(batch: &Batch, config: &ProfileConfig, now: i64) -> redis::Pipeline {
        let mut profiles: Vec<(ProfileId, Option<&str>, Vec<&Event>)> = Vec::new();
        for e in &batch.events {
            let Some((profile, user)) = owner(batch, e) else {
                continue;
            };
            match profiles.iter_mut().find(|(p, _, _)| *p == profile) {
                Some((_, _, events)) => events.push(e),
                None => profiles.push((profile, user, vec![e])),
            }
        }
        let context = context_json(batch);
        let stream_max = redis::streams::StreamMaxlen::Approx(config.event_stream_max_len as usize);
        let viewed_max = isize::try_from(config.recently_viewed_max).unwrap_or(isize::MAX);
        let mut pipe = redis::pipe();
        for (profile, user, events) in &profiles {
            let k = ProfileKeys::new(profile);
            let (mut first_seen, mut last_seen) = (i64::MAX, i64::MIN);
            for e in events {
                let ts = e.timestamp_ms;
                first_seen = first_seen.min(ts);
                last_seen = last_seen.max(ts);
                let kind = kind_name(e.kind);
                let count_name = match (&e.name, e.kind) {
                    (Some(name), EventKind::Track) if !name.is_empty() => name.as_str(),
                    _ => kind,
                };
                let id = uuid::Uuid::from_bytes(e.message_id);
                pipe.zadd(&k.dedupe, id.simple().to_string(), now).ignore();
                pipe.hincr(&k.profile, "events", 1).ignore();
                pipe.hincr(&k.counts, count_name, 1).ignore();
                match e.kind {
                    EventKind::Page => {
                        pipe.hincr(&k.profile, "page_views", 1).ignore();
                    }
                    EventKind::Identify if !e.properties.is_empty() => {
                        let traits: Vec<(&str, String)> = e
                            .properties
                            .iter()
                            .map(|p| (p.key.as_str(), value_string(&p.value)))
                            .collect();
                        pipe.hset_multiple(&k.traits, &traits).ignore();
                    }
                    EventKind::ProductViewed => {
                        for item in &e.items {
                            pipe.zadd(&k.viewed, &item.product_id, ts).ignore();
                            if let Some(category) = &item.category {
                                pipe.zincr(&k.cat_viewed, category, 1).ignore();
                            }
                        }
                    }
                    EventKind::CartAdd | EventKind::CartRemove => {
                        let sign = if e.kind == EventKind::CartAdd { 1 } else { -1 };
                        for item in &e.items {
                            let delta = sign * i64::from(item.quantity);
                            pipe.hincr(&k.cart, &item.product_id, delta).ignore();
                        }
                        pipe.hset(&k.profile, "cart_updated_at", ts).ignore();
                    }
                    EventKind::OrderCompleted => {
                        pipe.hincr(&k.profile, "orders", 1).ignore();
                        pipe.hincr(&k.profile, "revenue", e.revenue).ignore();
                        pipe.hset_multiple(
                            &k.profile,
                            &[
                                ("last_order_at", ts.to_string()),
                                ("currency", e.currency.clone().unwrap_or_default()),
                            ],
                        )
                        .ignore();
                        for item in &e.items {
                            if let Some(category) = &item.category {
                                pipe.zincr(&k.cat_bought, category, item.quantity).ignore();
                            }
                        }
                        pipe.del(&k.cart).ignore();
                    }
                    EventKind::EmailOpened | EventKind::EmailClicked => {
                        let field = if e.kind == EventKind::EmailOpened {
                            "email_opens"
                        } else {
                            "email_clicks"
                        };
                        pipe.hincr(&k.profile, field, 1).ignore();
                        pipe.hset(&k.profile, "last_engaged_at", ts).ignore();
                    }
                    _ => {}
                }
                let entry = event_json(profile, batch, e, &context, now).to_string();
                pipe.xadd_maxlen(
                    EVENT_STREAM,
                    stream_max,
                    "*",
                    &[
                        ("profile", profile.as_str()),
                        ("kind", kind),
                        ("event", entry.as_str()),
                    ],
                )
                .ignore();
            }
            pipe.hset_multiple(
                &k.profile,
                &[
                    ("id", profile.as_str().to_string()),
                    ("first_seen", first_seen.to_string()),
                    ("last_seen", last_seen.to_string()),
                ],
            )
            .ignore();
            if let Some(user) = user {
                pipe.hset(&k.profile, "user_id", *user).ignore();
                pipe.sadd(&k.ids, format!("user:{user}")).ignore();
            }
            if let Some(anonymous) = &batch.context.anonymous_id {
                pipe.sadd(&k.ids, format!("anon:{anonymous}")).ignore();
            }
            pipe.zremrangebyrank(&k.viewed, 0, -(viewed_max + 1))
                .ignore();
        }
        pipe
    }

    /// The batch context as the collector's stream entries carry it.
    fn context_json(batch: &Batch) -> serde_json::Value {
        let c = &batch.context;
        json!({
            "page_url": c.page_url,
            "referrer": c.referrer,
            "utm_source": c.utm_source,
            "utm_medium": c.utm_medium,
            "utm_campaign": c.utm_campaign,
            "utm_term": c.utm_term,
            "utm_content": c.utm_content,
            "locale": c.locale,
            "timezone": c.timezone,
            "screen": [c.screen_width, c.screen_height],
            "session_id": c.session_id,
        })
    }

    /// An event JSON of the same shape and size as the collector's stream entry.
    fn event_json(
        profile: &ProfileId,
        batch: &Batch,
        e: &Event,
        context: &serde_json::Value,
        now: i64,
    ) -> serde_json::Value {
        let properties: serde_json::Map<String, serde_json::Value> = e
            .properties
            .iter()
            .map(|p| {
                let v = match &p.value {
                    wire::Value::String(s) => json!(s),
                    wire::Value::Int(i) => json!(i),
                    wire::Value::Float(f) => json!(f),
                    wire::Value::Bool(b) => json!(b),
                };
                (p.key.clone(), v)
            })
            .collect();
        let items: Vec<_> = e
            .items
            .iter()
            .map(|i| {
                json!({
                    "product_id": i.product_id,
                    "category": i.category,
                    "price": i.price,
                    "quantity": i.quantity,
                    "name": i.name,
                })
            })
            .collect();
        json!({
            "profile": profile.as_str(),
            "message_id": uuid::Uuid::from_bytes(e.message_id),
            "kind": kind_name(e.kind),
            "name": e.name,
            "timestamp": e.timestamp_ms,
            "received_at": now,
            "properties": properties,
            "items": items,
            "user_id": e.user_id,
            "previous_id": e.previous_id,
            "order_id": e.order_id,
            "revenue": e.revenue,
            "currency": e.currency,
            "consent": null,
            "purpose": profile_cache::Purpose::ALL[e.purpose as usize].as_str(),
            "anonymous_id": batch.context.anonymous_id,
            "context": context,
        })
    }

    /// The name the collector uses (`profile_cache` lists kinds in wire order).
    fn kind_name(kind: EventKind) -> &'static str {
        profile_cache::EventKind::ALL[kind as usize].as_str()
    }

    fn value_string(v: &wire::Value) -> String {
        match v {
            wire::Value::String(s) => s.clone(),
            wire::Value::Int(i) => i.to_string(),
            wire::Value::Float(f) => f.to_string(),
            wire::Value::Bool(b) => b.to_string(),
        }
    }

    fn now_ms() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use rand::SeedableRng as _;
    use rand::rngs::SmallRng;
    use wire::EventKind;

    use super::shop;

    fn generate(seed: u64, events: u64, visitors: u32, batch: u32) -> Vec<wire::Batch> {
        shop::generate(
            &mut SmallRng::seed_from_u64(seed),
            "k",
            events,
            visitors,
            batch,
        )
    }

    #[test]
    fn same_seed_generates_the_same_events() {
        let strip = |batches: Vec<wire::Batch>| -> Vec<wire::Batch> {
            // Only the clock differs between two runs.
            batches
                .into_iter()
                .map(|mut b| {
                    b.sent_at_ms = 0;
                    b.events.iter_mut().for_each(|e| e.timestamp_ms = 0);
                    b
                })
                .collect()
        };
        assert_eq!(
            strip(generate(7, 500, 10, 20)),
            strip(generate(7, 500, 10, 20))
        );
        assert_ne!(
            strip(generate(7, 500, 10, 20)),
            strip(generate(8, 500, 10, 20))
        );
    }

    #[test]
    fn batches_split_the_requested_events_one_visitor_each() {
        let batches = generate(1, 1_005, 50, 20);
        assert_eq!(batches.len(), 51);
        assert_eq!(batches.iter().map(|b| b.events.len()).sum::<usize>(), 1_005);
        assert!(batches.iter().all(|b| (1..=20).contains(&b.events.len())));
        assert!(
            batches
                .iter()
                .all(|b| b.write_key == "k" && b.consent == 0b1111)
        );
        let visitors: HashSet<_> = batches
            .iter()
            .map(|b| b.context.anonymous_id.clone().unwrap())
            .collect();
        assert!(
            visitors.len() <= 50 && visitors.len() > 20,
            "{} visitors",
            visitors.len()
        );
    }

    #[test]
    fn every_event_has_a_unique_nonzero_message_id() {
        let batches = generate(2, 20_000, 100, 50);
        let ids: HashSet<[u8; 16]> = batches
            .iter()
            .flat_map(|b| b.events.iter().map(|e| e.message_id))
            .collect();
        assert_eq!(ids.len(), 20_000);
        assert!(!ids.contains(&[0; 16]));
    }

    #[test]
    fn every_batch_survives_the_collectors_decoder() {
        for batch in generate(3, 5_000, 100, 100) {
            let decoded = wire::decode(&wire::encode(&batch), &wire::Limits::default());
            assert_eq!(decoded.as_ref(), Ok(&batch));
        }
    }

    #[test]
    fn journeys_mix_browsing_commerce_identity_and_email() {
        let events: Vec<wire::Event> = generate(4, 20_000, 200, 20)
            .into_iter()
            .flat_map(|b| b.events)
            .collect();
        let kinds: HashSet<EventKind> = events.iter().map(|e| e.kind).collect();
        for kind in [
            EventKind::Page,
            EventKind::Track,
            EventKind::Identify,
            EventKind::ProductViewed,
            EventKind::CartAdd,
            EventKind::CartRemove,
            EventKind::CheckoutStarted,
            EventKind::OrderCompleted,
            EventKind::EmailOpened,
            EventKind::EmailClicked,
        ] {
            assert!(kinds.contains(&kind), "no {kind:?} in 20000 events");
        }
        for order in events
            .iter()
            .filter(|e| e.kind == EventKind::OrderCompleted)
        {
            let total: i64 = order
                .items
                .iter()
                .map(|i| i.price * i64::from(i.quantity))
                .sum();
            assert!(!order.items.is_empty());
            assert_eq!(order.revenue, total);
            assert!(order.order_id.is_some());
        }
        for view in events.iter().filter(|e| e.kind == EventKind::ProductViewed) {
            assert!(view.items[0].category.is_some());
        }
    }
}
