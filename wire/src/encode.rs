//! [`Batch`] to FlatBuffers bytes.

use alloc::vec::Vec;

use flatbuffers::{FlatBufferBuilder, WIPOffset};

use crate::generated::wire::fb;
use crate::model::{Batch, Context, Event, Item, Property, Value};

/// Encodes a batch as one FlatBuffers `EventBatch` with the `PEB1` file identifier.
///
/// Encoding does not check [`Limits`](crate::Limits): the tracker keeps its batches within
/// them, and the collector checks them anyway.
pub fn encode(batch: &Batch) -> Vec<u8> {
    let mut fbb = FlatBufferBuilder::with_capacity(256 + 128 * batch.events.len());
    let write_key = fbb.create_string(&batch.write_key);
    let context = context(&mut fbb, &batch.context);
    let events: Vec<_> = batch.events.iter().map(|e| event(&mut fbb, e)).collect();
    let events = fbb.create_vector(&events);
    let root = fb::EventBatch::create(
        &mut fbb,
        &fb::EventBatchArgs {
            write_key: Some(write_key),
            sent_at_ms: batch.sent_at_ms,
            consent: batch.consent,
            context: Some(context),
            events: Some(events),
        },
    );
    fb::finish_event_batch_buffer(&mut fbb, root);
    fbb.finished_data().to_vec()
}

fn opt_str<'a>(
    fbb: &mut FlatBufferBuilder<'a>,
    s: &Option<alloc::string::String>,
) -> Option<WIPOffset<&'a str>> {
    s.as_deref().map(|s| fbb.create_string(s))
}

fn context<'a>(fbb: &mut FlatBufferBuilder<'a>, c: &Context) -> WIPOffset<fb::Context<'a>> {
    let args = fb::ContextArgs {
        page_url: opt_str(fbb, &c.page_url),
        referrer: opt_str(fbb, &c.referrer),
        utm_source: opt_str(fbb, &c.utm_source),
        utm_medium: opt_str(fbb, &c.utm_medium),
        utm_campaign: opt_str(fbb, &c.utm_campaign),
        utm_term: opt_str(fbb, &c.utm_term),
        utm_content: opt_str(fbb, &c.utm_content),
        locale: opt_str(fbb, &c.locale),
        timezone: opt_str(fbb, &c.timezone),
        screen_width: c.screen_width,
        screen_height: c.screen_height,
        session_id: opt_str(fbb, &c.session_id),
        anonymous_id: opt_str(fbb, &c.anonymous_id),
        user_id: opt_str(fbb, &c.user_id),
    };
    fb::Context::create(fbb, &args)
}

fn event<'a>(fbb: &mut FlatBufferBuilder<'a>, e: &Event) -> WIPOffset<fb::Event<'a>> {
    let name = opt_str(fbb, &e.name);
    let properties = if e.properties.is_empty() {
        None
    } else {
        let props: Vec<_> = e.properties.iter().map(|p| property(fbb, p)).collect();
        Some(fbb.create_vector(&props))
    };
    let items = if e.items.is_empty() {
        None
    } else {
        let items: Vec<_> = e.items.iter().map(|i| item(fbb, i)).collect();
        Some(fbb.create_vector(&items))
    };
    let message_id = fb::MessageId::new(&e.message_id);
    let args = fb::EventArgs {
        message_id: Some(&message_id),
        timestamp_ms: e.timestamp_ms,
        kind: fb::EventKind(e.kind as u8),
        name,
        properties,
        items,
        user_id: opt_str(fbb, &e.user_id),
        previous_id: opt_str(fbb, &e.previous_id),
        order_id: opt_str(fbb, &e.order_id),
        revenue: e.revenue,
        currency: opt_str(fbb, &e.currency),
        consent_granted: e.consent_granted,
        consent_denied: e.consent_denied,
        purpose: fb::Purpose(e.purpose as u8),
    };
    fb::Event::create(fbb, &args)
}

fn property<'a>(fbb: &mut FlatBufferBuilder<'a>, p: &Property) -> WIPOffset<fb::Property<'a>> {
    let key = fbb.create_string(&p.key);
    let (value_type, value) = match &p.value {
        Value::String(s) => {
            let value = fbb.create_string(s);
            let v = fb::StringValue::create(fbb, &fb::StringValueArgs { value: Some(value) });
            (fb::Value::StringValue, v.as_union_value())
        }
        Value::Int(value) => {
            let v = fb::IntValue::create(fbb, &fb::IntValueArgs { value: *value });
            (fb::Value::IntValue, v.as_union_value())
        }
        Value::Float(value) => {
            let v = fb::FloatValue::create(fbb, &fb::FloatValueArgs { value: *value });
            (fb::Value::FloatValue, v.as_union_value())
        }
        Value::Bool(value) => {
            let v = fb::BoolValue::create(fbb, &fb::BoolValueArgs { value: *value });
            (fb::Value::BoolValue, v.as_union_value())
        }
    };
    fb::Property::create(
        fbb,
        &fb::PropertyArgs {
            key: Some(key),
            value_type,
            value: Some(value),
        },
    )
}

fn item<'a>(fbb: &mut FlatBufferBuilder<'a>, i: &Item) -> WIPOffset<fb::Item<'a>> {
    let args = fb::ItemArgs {
        product_id: Some(fbb.create_string(&i.product_id)),
        category: opt_str(fbb, &i.category),
        price: i.price,
        quantity: i.quantity,
        name: opt_str(fbb, &i.name),
    };
    fb::Item::create(fbb, &args)
}
