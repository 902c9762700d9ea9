//! How a [`Message`] travels as a NATS message: body as payload, everything else in headers.

use std::time::SystemTime;

use async_nats::header::NATS_MESSAGE_ID;
use async_nats::{HeaderMap, HeaderName, HeaderValue};
use bytes::Bytes;
use serde::Deserialize;
use serde::de::IntoDeserializer;

use super::{MESSAGE_ID_HEADER, ORIGINAL_ID_HEADER, TIMESTAMP_HEADER};
use crate::message::{Headers, Message, id_millis};
use crate::propagation::TRACE_ID_HEADER;

// Reserved names are built once, without the validation and copy a parsed name costs.
const ORIGINAL_ID: HeaderName = HeaderName::from_static(ORIGINAL_ID_HEADER);
const TIMESTAMP: HeaderName = HeaderName::from_static(TIMESTAMP_HEADER);
const TRACE_ID: HeaderName = HeaderName::from_static(TRACE_ID_HEADER);

/// The NATS headers and payload of `message`: its own headers, its id, its timestamp (unless
/// its UUIDv7 id holds the same millisecond), and `trace_id` in the trace header when the
/// message carries none.
///
/// The trace id goes straight into the NATS headers, as [`crate::propagation::inject`] would
/// have put it into the message's, without the message's map holding it on the way. Taking the
/// message lets its header names and values move into the NATS headers instead of being
/// copied. Fails, saying why, when a header cannot be written as a NATS header or uses a name
/// the driver reserves.
pub(crate) fn encode(message: Message, trace_id: &str) -> Result<(HeaderMap, Bytes), String> {
    let timestamp = timestamp_unless_in(&message.id, &message);
    let traced = message.headers.contains_key(TRACE_ID_HEADER);
    let mut headers = user_headers(message.headers, timestamp)?;
    if !traced {
        headers.insert(TRACE_ID, header_value(TRACE_ID_HEADER, trace_id)?);
    }
    headers.insert(
        NATS_MESSAGE_ID,
        header_value(MESSAGE_ID_HEADER, message.id)?,
    );
    Ok((headers, message.body))
}

/// The NATS headers of `message`, like [`encode`], for a message that is sent more than once.
pub(crate) fn encode_headers(message: &Message, trace_id: &str) -> Result<HeaderMap, String> {
    let timestamp = timestamp_unless_in(&message.id, message);
    let mut headers = user_headers(&message.headers, timestamp)?;
    if !message.headers.contains_key(TRACE_ID_HEADER) {
        headers.insert(TRACE_ID, header_value(TRACE_ID_HEADER, trace_id)?);
    }
    headers.insert(
        NATS_MESSAGE_ID,
        header_value(MESSAGE_ID_HEADER, message.id.as_str())?,
    );
    Ok(headers)
}

/// The NATS headers of a dead letter: like [`encode`], but with its own de-duplication id, so
/// a stream that also holds the original does not drop it as a duplicate. The message's id
/// travels in the [`ORIGINAL_ID_HEADER`]. Its trace id is the one it was delivered with.
pub(crate) fn encode_dead_letter(message: &Message) -> Result<HeaderMap, String> {
    let timestamp = timestamp_unless_in(&message.id, message);
    let mut headers = user_headers(&message.headers, timestamp)?;
    let dedup_id = format!("{}.dead-letter", message.id);
    headers.insert(NATS_MESSAGE_ID, header_value(MESSAGE_ID_HEADER, dedup_id)?);
    headers.insert(
        ORIGINAL_ID,
        header_value(ORIGINAL_ID_HEADER, message.id.as_str())?,
    );
    Ok(headers)
}

/// A message's own headers, moved or copied as `fields` holds them, and its timestamp if it
/// needs a header of its own.
fn user_headers<K, V>(
    fields: impl IntoIterator<Item = (K, V)>,
    timestamp_millis: Option<i64>,
) -> Result<HeaderMap, String>
where
    K: AsRef<str> + Into<String>,
    V: AsRef<str> + Into<String>,
{
    let mut headers = HeaderMap::new();
    for (name, value) in fields {
        let value = header_value(name.as_ref(), value)?;
        headers.insert(header_name(name)?, value);
    }
    if let Some(millis) = timestamp_millis {
        headers.insert(TIMESTAMP, HeaderValue::from(millis));
    }
    Ok(headers)
}

/// The message's timestamp in milliseconds, or `None` when `id` (the id the receiver reads)
/// holds that same millisecond already.
fn timestamp_unless_in(id: &str, message: &Message) -> Option<i64> {
    let millis = message.timestamp_millis();
    (id_millis(id) != Some(millis)).then_some(millis)
}

/// The [`Message`] a NATS message carries.
///
/// Without the time header the time is the one a UUIDv7 id holds. A message from another
/// client may lack the id or time headers: `fallback_id` and `fallback_time` fill them in.
pub(crate) fn decode(
    headers: Option<&HeaderMap>,
    payload: Bytes,
    fallback_id: impl FnOnce() -> String,
    fallback_time: impl FnOnce() -> SystemTime,
) -> Message {
    let mut id = None;
    let mut original_id = None;
    let mut timestamp = None;
    let mut fields = Headers::new();

    for (name, values) in headers.into_iter().flat_map(HeaderMap::iter) {
        let name: &str = name.as_ref();
        let Some(value) = values.last().map(HeaderValue::as_str) else {
            continue;
        };
        if name == MESSAGE_ID_HEADER {
            id = Some(value.to_owned());
        } else if name == ORIGINAL_ID_HEADER {
            original_id = Some(value.to_owned());
        } else if name == TIMESTAMP_HEADER {
            timestamp = value
                .parse::<i64>()
                .ok()
                .map(Message::timestamp_from_millis);
        } else {
            fields.insert(name.to_owned(), value.to_owned());
        }
    }

    let id = original_id.or(id);
    let timestamp = timestamp.or_else(|| {
        let millis = id_millis(id.as_deref()?)?;
        Some(Message::timestamp_from_millis(millis))
    });
    Message {
        id: id.unwrap_or_else(fallback_id),
        headers: fields,
        body: payload,
        timestamp: timestamp.unwrap_or_else(fallback_time),
    }
}

fn is_reserved(name: &str) -> bool {
    [MESSAGE_ID_HEADER, ORIGINAL_ID_HEADER, TIMESTAMP_HEADER]
        .iter()
        .any(|reserved| name.eq_ignore_ascii_case(reserved))
}

fn header_name(name: impl AsRef<str> + Into<String>) -> Result<HeaderName, String> {
    let text = name.as_ref();
    if text.is_empty() {
        return Err("a header name is empty".to_owned());
    }
    if is_reserved(text) {
        return Err(format!(
            "the header `{text}` is reserved: the driver carries the message's id and time in it"
        ));
    }
    if !text
        .bytes()
        .all(|byte| byte.is_ascii_graphic() && byte != b':')
    {
        return Err(format!(
            "`{text}` is not a valid NATS header name (printable ASCII without `:`)"
        ));
    }
    HeaderName::try_from(name.into()).map_err(|error| error.to_string())
}

fn header_value(name: &str, value: impl AsRef<str> + Into<String>) -> Result<HeaderValue, String> {
    // async-nats panics on a value with a line break, so it is refused here first.
    if has_line_break(value.as_ref()) {
        return Err(format!(
            "the value of the header `{name}` holds a line break"
        ));
    }
    // `HeaderValue::from` would scan the text a second time; its serde form, a plain string,
    // takes the text as it is.
    HeaderValue::deserialize(value.into().into_deserializer())
        .map_err(|error: serde::de::value::Error| format!("the header `{name}`: {error}"))
}

/// Whether `text` holds a carriage return or a line feed (each one byte in UTF-8).
fn has_line_break(text: &str) -> bool {
    // Values are short and nearly never hold one: blocks of 16 bytes are looked at whole,
    // which the compiler turns into a few vector instructions instead of a branch per byte.
    let is_break = |found: bool, byte: &u8| found | (*byte == b'\r') | (*byte == b'\n');
    let mut blocks = text.as_bytes().chunks_exact(16);
    blocks
        .by_ref()
        .any(|block| block.iter().fold(false, is_break))
        || blocks.remainder().iter().fold(false, is_break)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::context::new_id;

    #[test]
    fn every_field_survives_encoding() {
        let message = Message::new("body")
            .with_header("trace_id", "t-1")
            .with_header("Content-Type", "text/plain");

        let (headers, body) = encode(message.clone(), "request").unwrap();
        let decoded = decode(
            Some(&headers),
            body,
            || unreachable!("the id travels"),
            || unreachable!("the time travels"),
        );

        assert_eq!(decoded, message);
        assert_eq!(encode_headers(&message, "request").unwrap(), headers);
    }

    #[test]
    fn a_message_without_a_trace_id_carries_the_given_one() {
        let message = Message::new("body").with_header("k", "v");

        let (headers, body) = encode(message.clone(), "request").unwrap();
        let decoded = decode(Some(&headers), body, new_id, SystemTime::now);

        assert_eq!(
            decoded,
            message.clone().with_header(TRACE_ID_HEADER, "request")
        );
        assert_eq!(encode_headers(&message, "request").unwrap(), headers);
        assert!(encode(message, "a\nb").unwrap_err().contains("line break"));
    }

    #[test]
    fn header_values_are_the_ones_the_client_makes() {
        for text in ["", "1", "a value with spaces", "ünïcödé"] {
            assert_eq!(header_value("k", text).unwrap(), HeaderValue::from(text));
        }
        let long = format!("{}\n{}", "x".repeat(20), "y".repeat(20));
        for text in ["a\rb", "\n", "end\r\n", &long, &long[..21], &long[20..]] {
            assert!(header_value("k", text).is_err(), "{text:?}");
        }
    }

    #[test]
    fn the_time_header_is_left_out_only_when_the_id_holds_the_same_time() {
        let uuid = "01890a5d-ac96-774b-bcce-b302099a8057";
        let in_id = Message::timestamp_from_millis(0x0189_0a5d_ac96);
        let same = Message::new("x")
            .with_id(uuid)
            .with_header(TRACE_ID_HEADER, "t");
        let same = Message {
            timestamp: in_id,
            ..same
        };
        let later = Message {
            timestamp: in_id + Duration::from_millis(1),
            ..same.clone()
        };
        let not_uuid = Message {
            timestamp: in_id,
            ..same.clone().with_id("order-1")
        };

        for message in [same.clone(), later, not_uuid] {
            let (headers, body) = encode(message.clone(), "t").unwrap();
            let decoded = decode(Some(&headers), body, new_id, SystemTime::now);

            assert_eq!(decoded, message);
            assert_eq!(
                headers.get(TIMESTAMP_HEADER).is_none(),
                message == same,
                "{message:?}"
            );
        }
    }

    #[test]
    fn new_messages_usually_travel_without_the_time_header() {
        let carried = (0..100)
            .filter(|_| {
                let (headers, _) = encode(Message::new("x"), "t").unwrap();
                headers.get(TIMESTAMP_HEADER).is_some()
            })
            .count();

        assert!(carried < 10, "{carried} of 100 carried the time header");
    }

    #[test]
    fn a_dead_letter_keeps_its_id_but_not_its_dedup_id() {
        let message = Message::new("body").with_header("k", "v");

        let headers = encode_dead_letter(&message).unwrap();
        let decoded = decode(
            Some(&headers),
            message.body.clone(),
            new_id,
            SystemTime::now,
        );

        assert_ne!(headers.get(MESSAGE_ID_HEADER).unwrap().as_str(), message.id);
        assert_eq!(decoded, message);
    }

    #[test]
    fn reserved_and_invalid_headers_are_refused() {
        let reserved = Message::new("x").with_header(MESSAGE_ID_HEADER, "mine");
        let colon = Message::new("x").with_header("a:b", "v");
        let newline = Message::new("x").with_header("a", "v\r\nX: y");

        assert!(encode(reserved, "t").unwrap_err().contains("reserved"));
        assert!(encode(colon, "t").is_err());
        assert!(encode(newline, "t").is_err());
    }

    #[test]
    fn a_foreign_uuid_v7_id_gives_its_time() {
        let mut headers = HeaderMap::new();
        headers.insert(MESSAGE_ID_HEADER, "01890a5d-ac96-774b-bcce-b302099a8057");
        let v4 = "9c5b94b1-35ad-49bb-b118-8e8fc24abf80";
        let mut other = HeaderMap::new();
        other.insert(MESSAGE_ID_HEADER, v4);
        let arrived = Message::timestamp_from_millis(1_700_000_000_123);

        let v7 = decode(Some(&headers), Bytes::new(), new_id, || arrived);
        let v4 = decode(Some(&other), Bytes::new(), new_id, || arrived);

        assert_eq!(
            v7.timestamp,
            Message::timestamp_from_millis(0x0189_0a5d_ac96)
        );
        assert_eq!(v4.timestamp, arrived);
    }

    #[test]
    fn foreign_messages_get_the_fallback_id_and_time() {
        let time = Message::timestamp_from_millis(1_700_000_000_123);

        let decoded = decode(
            None,
            Bytes::from_static(b"x"),
            || "seq-7".to_owned(),
            || time,
        );

        assert_eq!(decoded.id, "seq-7");
        assert_eq!(decoded.timestamp, time);
        assert!(decoded.headers.is_empty());
    }
}
