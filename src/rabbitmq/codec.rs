//! How a [`Message`] travels as AMQP properties, headers and body.

use amqprs::{BasicProperties, DELIVERY_MODE_PERSISTENT, FieldTable, FieldValue, ShortStr};
use bytes::Bytes;

use super::DRIVER;
use super::error::RabbitMqError;
use crate::message::{Fallback, Headers, Message};

/// The header that keeps the timestamp's milliseconds: AMQP's `timestamp` has whole seconds.
pub(super) const TIMESTAMP_MS_HEADER: &str = "x-broker-timestamp-ms";

/// The longest AMQP short string: names, routing keys and header names.
pub(super) const MAX_SHORT: usize = 255;

/// Checks that `value` fits an AMQP short string, so the client never has to refuse it.
pub(super) fn check_short(what: &'static str, value: &str) -> Result<(), RabbitMqError> {
    if value.len() > MAX_SHORT {
        return Err(RabbitMqError::invalid(what, value, "longer than 255 bytes"));
    }
    Ok(())
}

/// Checks that `message` can be sent: its id and header names fit short strings, its header
/// values long strings. [`encode`] fails on the same messages; checking first lets a publish
/// refuse a message before it waits for anything.
pub(super) fn check(message: &Message) -> Result<(), RabbitMqError> {
    check_short("a message id", &message.id)?;
    for (key, value) in &message.headers {
        if key.len() > MAX_SHORT {
            return Err(RabbitMqError::invalid(
                "a header name",
                key,
                "longer than 255 bytes",
            ));
        }
        if u32::try_from(value.len()).is_err() {
            return Err(RabbitMqError::invalid("a header value", value, "too long"));
        }
    }
    Ok(())
}

/// The properties of `message`: persistent, with its id, its time in seconds (and in
/// milliseconds in a header) and every header as a long string. The body goes as it is.
pub(super) fn encode(message: &Message) -> Result<BasicProperties, RabbitMqError> {
    check_short("a message id", &message.id)?;

    let mut table = FieldTable::new();
    for (key, value) in &message.headers {
        let name = short(key)
            .ok_or_else(|| RabbitMqError::invalid("a header name", key, "longer than 255 bytes"))?;
        let value = value
            .as_str()
            .try_into()
            .map_err(|_| RabbitMqError::invalid("a header value", value, "too long"))?;
        table.insert(name, FieldValue::S(value));
    }
    let millis = message.timestamp_millis();
    if let Some(name) = short(TIMESTAMP_MS_HEADER) {
        table.insert(name, FieldValue::l(millis));
    }

    // The builder's `finish` copies the whole set, header table included.
    let seconds = u64::try_from(millis / 1000).unwrap_or(0);
    let mut properties = BasicProperties::default();
    properties
        .with_message_id(&message.id)
        .with_timestamp(seconds)
        .with_delivery_mode(DELIVERY_MODE_PERSISTENT)
        .with_headers(table);
    Ok(properties)
}

/// The message a delivery carries. Missing pieces are filled in: the id from `fallback`, the
/// time from the `timestamp` property or else from `fallback`. Headers of any AMQP type become
/// text; arrays and tables, which have no single text form, are skipped with a debug log.
pub(super) fn decode(properties: &BasicProperties, body: Bytes, fallback: &Fallback) -> Message {
    let mut headers = Headers::new();
    let mut millis = None;
    if let Some(table) = properties.headers() {
        for (name, value) in table.as_ref() {
            let name: &str = name.as_ref();
            if name == TIMESTAMP_MS_HEADER {
                millis = integer(value);
                continue;
            }
            match text(value) {
                Some(text) => {
                    headers.insert(name.to_owned(), text);
                }
                None => tracing::debug!(
                    driver = %DRIVER,
                    header = name,
                    "header skipped: arrays, tables and non-UTF-8 bytes have no text form"
                ),
            }
        }
    }

    let millis = millis.or_else(|| {
        properties
            .timestamp()
            .and_then(|seconds| i64::try_from(seconds).ok())
            .map(|seconds| seconds.saturating_mul(1000))
    });
    Message {
        id: properties
            .message_id()
            .cloned()
            .unwrap_or_else(|| fallback.id()),
        headers,
        body,
        timestamp: millis.map_or_else(|| fallback.time(), Message::timestamp_from_millis),
    }
}

fn short(text: &str) -> Option<ShortStr> {
    text.try_into().ok()
}

fn integer(value: &FieldValue) -> Option<i64> {
    match value {
        FieldValue::b(v) => Some(i64::from(*v)),
        FieldValue::B(v) => Some(i64::from(*v)),
        FieldValue::s(v) => Some(i64::from(*v)),
        FieldValue::u(v) => Some(i64::from(*v)),
        FieldValue::I(v) => Some(i64::from(*v)),
        FieldValue::i(v) => Some(i64::from(*v)),
        FieldValue::l(v) => Some(*v),
        FieldValue::T(v) => i64::try_from(*v).ok(),
        FieldValue::S(v) => v.as_ref().trim().parse().ok(),
        _ => None,
    }
}

/// The text form of a header value, or `None` for arrays and tables.
fn text(value: &FieldValue) -> Option<String> {
    Some(match value {
        FieldValue::t(v) => v.to_string(),
        FieldValue::b(v) => v.to_string(),
        FieldValue::B(v) => v.to_string(),
        FieldValue::s(v) => v.to_string(),
        FieldValue::u(v) => v.to_string(),
        FieldValue::I(v) => v.to_string(),
        FieldValue::i(v) => v.to_string(),
        FieldValue::l(v) => v.to_string(),
        FieldValue::f(v) => v.to_string(),
        FieldValue::d(v) => v.to_string(),
        FieldValue::T(v) => v.to_string(),
        FieldValue::S(v) => v.as_ref().clone(),
        FieldValue::V => String::new(),
        FieldValue::x(v) => {
            let bytes: Vec<u8> = v.clone().into();
            match String::from_utf8(bytes) {
                Ok(text) => text,
                Err(_) => return None,
            }
        }
        FieldValue::D(v) => decimal_text(&v.to_string())?,
        FieldValue::A(_) | FieldValue::F(_) => return None,
    })
}

/// `123.45` from the client's `Decimal(2, 12345)`: the parts of a decimal are private to it,
/// and only its text form shows them.
fn decimal_text(shown: &str) -> Option<String> {
    let inner = shown.strip_prefix("Decimal(")?.strip_suffix(')')?;
    let (scale, value) = inner.split_once(',')?;
    let scale: usize = scale.trim().parse().ok()?;
    let value: i64 = value.trim().parse().ok()?;
    let digits = value.unsigned_abs().to_string();
    let sign = if value < 0 { "-" } else { "" };
    if scale == 0 {
        return Some(format!("{sign}{digits}"));
    }
    let digits = format!("{digits:0>width$}", width = scale + 1);
    let (whole, fraction) = digits.split_at(digits.len() - scale);
    Some(format!("{sign}{whole}.{fraction}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_survives_encoding() {
        let message = Message::new("body")
            .with_header("a", "1")
            .with_header("trace_id", "t");

        let properties = encode(&message).unwrap();
        let decoded = decode(&properties, message.body.clone(), &Fallback::default());

        assert_eq!(decoded, message);
    }

    #[test]
    fn header_values_of_other_types_become_text() {
        let mut table = FieldTable::new();
        table.insert("n".try_into().unwrap(), FieldValue::I(-5));
        table.insert("b".try_into().unwrap(), FieldValue::t(true));
        table.insert("d".try_into().unwrap(), FieldValue::d(1.5));
        table.insert(
            "nested".try_into().unwrap(),
            FieldValue::F(FieldTable::new()),
        );
        let properties = BasicProperties::default().with_headers(table).finish();

        let message = decode(&properties, Bytes::from_static(b"x"), &Fallback::default());

        assert_eq!(message.header("n"), Some("-5"));
        assert_eq!(message.header("b"), Some("true"));
        assert_eq!(message.header("d"), Some("1.5"));
        assert_eq!(message.header("nested"), None);
        assert!(!message.id.is_empty());
    }

    #[test]
    fn decimals_read_as_numbers() {
        let text = |scale, value| {
            decimal_text(&FieldValue::D(amqprs::DecimalValue::new(scale, value)).to_string())
        };

        assert_eq!(text(2, 12345).as_deref(), Some("123.45"));
        assert_eq!(text(3, -5).as_deref(), Some("-0.005"));
        assert_eq!(text(0, 7).as_deref(), Some("7"));
    }

    #[test]
    fn long_header_names_are_refused() {
        let message = Message::new("x").with_header("k".repeat(300), "v");

        assert!(matches!(
            encode(&message),
            Err(RabbitMqError::Invalid { .. })
        ));
    }
}
