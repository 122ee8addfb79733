//! From a verified wire batch to profile updates: consent filter, enrichment (received-at,
//! clock-skew correction) and grouping by profile. Pure functions, no I/O.

use std::collections::BTreeMap;

use profile_cache::model::{MAX_ID_BYTES, check_id, check_person_id};
use profile_cache::{
    ConsentChange, ConsentMask, Context, Event, EventKind, IdError, Item, ProfileId, ProfileUpdate,
    Purpose, Value,
};
use serde::Serialize;
use time::{Duration, OffsetDateTime};

use crate::config::{Config, FieldFilter, SourceConfig};

/// An event the collector did not accept, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rejected {
    /// The event's index in the batch.
    pub index: usize,
    /// Why, e.g. `consent: analytics not granted`.
    pub reason: String,
}

/// A batch turned into profile updates.
#[derive(Debug, Default)]
pub struct Prepared {
    /// One update per profile, events in batch order.
    pub updates: Vec<ProfileUpdate>,
    /// The batch index of each event of each update, in the order of `updates`: what an
    /// answer names an event by, should the store drop an update (an erased person).
    pub positions: Vec<Vec<usize>>,
    /// Events left out, in batch order.
    pub rejected: Vec<Rejected>,
    /// How many of `rejected` lacked consent.
    pub consent_dropped: usize,
    /// Properties and traits left out by the source's filters (data minimisation).
    pub minimized: usize,
}

/// What the configuration adds for one batch: purposes per event kind, and the filters of
/// the batch's source. The default adds nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rules<'a> {
    /// `consent.purposes`.
    pub purposes: Option<&'a BTreeMap<EventKind, Purpose>>,
    /// `sources.<write key>`.
    pub source: Option<&'a SourceConfig>,
}

impl<'a> Rules<'a> {
    /// The rules of `config` for batches sent with `write_key`.
    pub fn of(config: &'a Config, write_key: &str) -> Rules<'a> {
        Rules {
            purposes: Some(&config.consent.purposes).filter(|p| !p.is_empty()),
            source: config.sources.get(write_key),
        }
    }

    fn filter(&self, kind: EventKind) -> Option<&'a FieldFilter> {
        let source = self.source?;
        Some(if kind == EventKind::Identify {
            &source.traits
        } else {
            &source.properties
        })
    }
}

/// Why a batch as a whole cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityError {
    /// The field.
    pub field: &'static str,
    /// What is wrong.
    pub problem: String,
    /// The limit broken, when one is.
    pub limit: Option<usize>,
}

/// Filters, enriches and groups the events of `batch`, received at `received_at`.
///
/// Timestamps are corrected for the client's clock as Segment does:
/// `timestamp = received_at - (sent_at - client_timestamp)`, and never later than
/// `received_at`. An event without a client timestamp gets `received_at`.
///
/// Besides each event's declared purpose and its kind's least purpose, an event needs the
/// purpose `rules` name for its kind; properties (traits, for `identify`) the source's
/// filters do not keep are left out.
///
/// # Errors
/// The batch has neither a valid anonymous id nor a valid user id.
pub fn prepare(
    batch: wire::Batch,
    received_at: OffsetDateTime,
    rules: &Rules<'_>,
) -> Result<Prepared, IdentityError> {
    let ctx = batch.context;
    let anonymous_id = valid_id("context.anonymous_id", ctx.anonymous_id)?;
    let user_id = valid_id("context.user_id", ctx.user_id)?;
    if anonymous_id.is_none() && user_id.is_none() {
        return Err(IdentityError {
            field: "context.anonymous_id",
            problem: "a batch needs an anonymous id or a user id".into(),
            limit: None,
        });
    }
    let context = Context {
        page_url: ctx.page_url,
        referrer: ctx.referrer,
        utm_source: ctx.utm_source,
        utm_medium: ctx.utm_medium,
        utm_campaign: ctx.utm_campaign,
        utm_term: ctx.utm_term,
        utm_content: ctx.utm_content,
        locale: ctx.locale,
        timezone: ctx.timezone,
        screen: (ctx.screen_width > 0 && ctx.screen_height > 0)
            .then_some((ctx.screen_width, ctx.screen_height)),
        session_id: ctx.session_id,
    };
    let mask = ConsentMask(batch.consent);
    let mut prepared = Prepared::default();
    for (index, e) in batch.events.into_iter().enumerate() {
        let reject = |reason: String| Rejected { index, reason };
        // The kind's least purpose (wire's table, shared with the tracker) as well as the
        // declared one: a tracker cannot send page views as `necessary` to skip consent.
        let least = purpose(e.kind.least_purpose());
        let kind = kind(e.kind);
        let purpose = purpose(e.purpose);
        let configured = rules.purposes.and_then(|p| p.get(&kind)).copied();
        let needed = [purpose, least].into_iter().chain(configured);
        if let Some(missing) = needed.into_iter().find(|p| !mask.allows(*p)) {
            prepared.consent_dropped += 1;
            prepared
                .rejected
                .push(reject(format!("consent: {missing} not granted")));
            continue;
        }
        // Identify and alias name the user they are about; everything else belongs to the
        // batch's user, or to the anonymous visitor.
        let event_user = match kind {
            EventKind::Identify | EventKind::Alias => e.user_id.clone(),
            _ => None,
        };
        let owner = match event_user.as_deref().or(user_id.as_deref()) {
            Some(u) => ProfileId::user(u).map(|p| (p, Some(u.to_string()))),
            None => anonymous_id
                .as_deref()
                .map_or(Err(profile_cache::IdError::Empty), |a| {
                    Ok((ProfileId::anonymous(a)?, None))
                }),
        };
        let (profile, profile_user) = match owner {
            Ok(owner) => owner,
            Err(err) => {
                prepared.rejected.push(reject(format!("user_id: {err}")));
                continue;
            }
        };
        if let Some(item) = e.items.iter().find(|i| check_id(&i.product_id).is_err()) {
            let err = check_id(&item.product_id)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            prepared.rejected.push(reject(format!("product_id: {err}")));
            continue;
        }
        let event = Event {
            message_id: uuid::Uuid::from_bytes(e.message_id),
            kind,
            name: e.name,
            timestamp: corrected(e.timestamp_ms, batch.sent_at_ms, received_at),
            received_at,
            properties: {
                let filter = rules.filter(kind);
                let before = e.properties.len();
                let kept: Vec<_> = e
                    .properties
                    .into_iter()
                    .filter(|p| filter.is_none_or(|f| f.keeps(&p.key)))
                    .map(|p| (p.key, value(p.value)))
                    .collect();
                prepared.minimized += before - kept.len();
                kept
            },
            items: e
                .items
                .into_iter()
                .map(|i| Item {
                    product_id: i.product_id,
                    category: i.category,
                    price: i.price,
                    quantity: i.quantity,
                    name: i.name,
                })
                .collect(),
            user_id: e.user_id,
            previous_id: e.previous_id,
            order_id: e.order_id,
            revenue: e.revenue,
            currency: e.currency,
            consent: (kind == EventKind::ConsentChange).then_some(ConsentChange {
                granted: ConsentMask(e.consent_granted),
                denied: ConsentMask(e.consent_denied & !e.consent_granted),
            }),
            purpose,
        };
        match prepared.updates.iter().position(|u| u.profile == profile) {
            Some(i) => {
                prepared.updates[i].events.push(event);
                prepared.positions[i].push(index);
            }
            None => {
                prepared.updates.push(ProfileUpdate {
                    profile,
                    anonymous_id: anonymous_id.clone(),
                    user_id: profile_user,
                    context: context.clone(),
                    events: vec![event],
                });
                prepared.positions.push(vec![index]);
            }
        }
    }
    Ok(prepared)
}

fn valid_id(field: &'static str, id: Option<String>) -> Result<Option<String>, IdentityError> {
    match id {
        None => Ok(None),
        Some(id) if id.is_empty() => Ok(None),
        Some(id) => match check_person_id(&id) {
            Ok(()) => Ok(Some(id)),
            Err(e) => Err(IdentityError {
                field,
                problem: e.to_string(),
                limit: matches!(e, IdError::TooLong { .. }).then_some(MAX_ID_BYTES),
            }),
        },
    }
}

fn corrected(client_ms: i64, sent_at_ms: i64, received_at: OffsetDateTime) -> OffsetDateTime {
    if client_ms <= 0 || sent_at_ms <= 0 {
        return received_at;
    }
    // Saturating: hostile values must not overflow; the clamp below bounds the result.
    let offset = Duration::milliseconds(sent_at_ms.saturating_sub(client_ms));
    received_at
        .checked_sub(offset)
        .map_or(received_at, |t| t.min(received_at))
        .max(OffsetDateTime::UNIX_EPOCH)
}

fn kind(k: wire::EventKind) -> EventKind {
    match k {
        wire::EventKind::Page => EventKind::Page,
        wire::EventKind::Track => EventKind::Track,
        wire::EventKind::Identify => EventKind::Identify,
        wire::EventKind::Alias => EventKind::Alias,
        wire::EventKind::ConsentChange => EventKind::ConsentChange,
        wire::EventKind::ProductViewed => EventKind::ProductViewed,
        wire::EventKind::CartAdd => EventKind::CartAdd,
        wire::EventKind::CartRemove => EventKind::CartRemove,
        wire::EventKind::CheckoutStarted => EventKind::CheckoutStarted,
        wire::EventKind::OrderCompleted => EventKind::OrderCompleted,
        wire::EventKind::EmailOpened => EventKind::EmailOpened,
        wire::EventKind::EmailClicked => EventKind::EmailClicked,
    }
}

fn purpose(p: wire::Purpose) -> Purpose {
    match p {
        wire::Purpose::Necessary => Purpose::Necessary,
        wire::Purpose::Analytics => Purpose::Analytics,
        wire::Purpose::Personalization => Purpose::Personalization,
        wire::Purpose::Marketing => Purpose::Marketing,
    }
}

fn value(v: wire::Value) -> Value {
    match v {
        wire::Value::String(s) => Value::String(s),
        wire::Value::Int(i) => Value::Int(i),
        wire::Value::Float(f) => Value::Float(f),
        wire::Value::Bool(b) => Value::Bool(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ConsentConfig, FieldFilter, WriteKey};

    const AT: OffsetDateTime = time::macros::datetime!(2026-11-29 12:00 UTC);

    fn event(n: u8, kind: wire::EventKind, props: &[(&str, &str)]) -> wire::Event {
        wire::Event {
            message_id: [n; 16],
            kind,
            purpose: wire::Purpose::Analytics,
            properties: props
                .iter()
                .map(|(k, v)| wire::Property {
                    key: (*k).into(),
                    value: wire::Value::String((*v).into()),
                })
                .collect(),
            ..wire::Event::default()
        }
    }

    fn batch(consent: u8, events: Vec<wire::Event>) -> wire::Batch {
        wire::Batch {
            write_key: "web".into(),
            consent,
            context: wire::Context {
                anonymous_id: Some("v1".into()),
                ..wire::Context::default()
            },
            events,
            ..wire::Batch::default()
        }
    }

    fn config() -> Config {
        let mut config = Config {
            write_keys: vec![WriteKey {
                key: "web".into(),
                origins: vec![],
            }],
            consent: ConsentConfig {
                purposes: [(EventKind::Track, Purpose::Marketing)].into(),
            },
            ..Config::default()
        };
        config.sources.insert(
            "web".into(),
            SourceConfig {
                properties: FieldFilter {
                    allow: None,
                    deny: vec!["email".into()],
                },
                traits: FieldFilter {
                    allow: Some(vec!["plan".into()]),
                    deny: vec![],
                },
                ..SourceConfig::default()
            },
        );
        config
    }

    #[test]
    fn a_kind_needs_the_purpose_the_configuration_names_for_it() {
        let config = config();
        let events = vec![
            event(1, wire::EventKind::Track, &[]),
            event(2, wire::EventKind::Page, &[]),
        ];
        // Analytics granted, marketing not.
        let p = prepare(
            batch(0b0011, events.clone()),
            AT,
            &Rules::of(&config, "web"),
        )
        .unwrap();
        assert_eq!(
            p.rejected,
            [Rejected {
                index: 0,
                reason: "consent: marketing not granted".into()
            }]
        );
        assert_eq!(p.consent_dropped, 1);
        assert_eq!(p.updates[0].events.len(), 1);
        // Without the rules both go through; with marketing granted too, both as well.
        let p = prepare(batch(0b0011, events.clone()), AT, &Rules::default()).unwrap();
        assert_eq!(p.updates[0].events.len(), 2);
        let p = prepare(batch(0b1011, events), AT, &Rules::of(&config, "web")).unwrap();
        assert_eq!(p.updates[0].events.len(), 2);
    }

    #[test]
    fn a_source_keeps_only_the_properties_and_traits_its_filters_allow() {
        let config = config();
        let events = vec![
            event(
                1,
                wire::EventKind::Page,
                &[("email", "a@b.c"), ("path", "/")],
            ),
            event(
                2,
                wire::EventKind::Identify,
                &[("plan", "pro"), ("email", "a@b.c"), ("age", "40")],
            ),
        ];
        let mut b = batch(0b0011, events);
        b.context.user_id = Some("ada".into());
        b.events[1].user_id = Some("ada".into());
        let p = prepare(b, AT, &Rules::of(&config, "web")).unwrap();
        let keys = |i: usize| -> Vec<&str> {
            p.updates[0].events[i]
                .properties
                .iter()
                .map(|(k, _)| k.as_str())
                .collect()
        };
        assert_eq!(keys(0), ["path"]);
        assert_eq!(keys(1), ["plan"]);
        assert_eq!(p.minimized, 3);
        // Another write key has no filters.
        assert!(Rules::of(&config, "other").source.is_none());
    }

    #[test]
    fn a_filter_allows_what_is_listed_and_never_what_is_denied() {
        let f = FieldFilter {
            allow: Some(vec!["a".into(), "b".into()]),
            deny: vec!["b".into()],
        };
        assert!(f.keeps("a"));
        assert!(!f.keeps("b"));
        assert!(!f.keeps("c"));
        assert!(!f.keeps("A"));
        assert!(FieldFilter::default().keeps("anything"));
    }
}
