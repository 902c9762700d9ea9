//! How a [`Message`] travels as a NATS message: body as payload, everything else in headers.

use std::str::FromStr;
use std::time::SystemTime;

use async_nats::{HeaderMap, HeaderName, HeaderValue};
use bytes::Bytes;

use super::{MESSAGE_ID_HEADER, ORIGINAL_ID_HEADER, TIMESTAMP_HEADER};
use crate::message::{Headers, Message};

/// The NATS headers of `message`: its own headers, its id and its timestamp.
///
/// Fails, saying why, when a header cannot be written as a NATS header or uses a name the
/// driver reserves.
pub(crate) fn encode(message: &Message) -> Result<HeaderMap, String> {
    let mut headers = user_headers(message)?;
    headers.insert(
        header_name(MESSAGE_ID_HEADER)?,
        header_value(MESSAGE_ID_HEADER, &message.id)?,
    );
    Ok(headers)
}

/// The NATS headers of a dead letter: like [`encode`], but with its own de-duplication id, so
/// a stream that also holds the original does not drop it as a duplicate. The message's id
/// travels in the [`ORIGINAL_ID_HEADER`].
pub(crate) fn encode_dead_letter(message: &Message) -> Result<HeaderMap, String> {
    let mut headers = user_headers(message)?;
    let dedup_id = format!("{}.dead-letter", message.id);
    headers.insert(
        header_name(MESSAGE_ID_HEADER)?,
        header_value(MESSAGE_ID_HEADER, &dedup_id)?,
    );
    headers.insert(
        header_name(ORIGINAL_ID_HEADER)?,
        header_value(ORIGINAL_ID_HEADER, &message.id)?,
    );
    Ok(headers)
}

/// The message's own headers and its timestamp.
fn user_headers(message: &Message) -> Result<HeaderMap, String> {
    let mut headers = HeaderMap::new();
    for (name, value) in &message.headers {
        if is_reserved(name) {
            return Err(format!(
                "the header `{name}` is reserved: the driver carries the message's id and time in it"
            ));
        }
        headers.insert(header_name(name)?, header_value(name, value)?);
    }
    headers.insert(
        header_name(TIMESTAMP_HEADER)?,
        HeaderValue::from(message.timestamp_millis()),
    );
    Ok(headers)
}

/// The [`Message`] a NATS message carries.
///
/// A message from another client may lack the id or time headers: `fallback_id` and
/// `fallback_time` fill them in.
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

    Message {
        id: original_id.or(id).unwrap_or_else(fallback_id),
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

fn header_name(name: &str) -> Result<HeaderName, String> {
    if name.is_empty() {
        return Err("a header name is empty".to_owned());
    }
    HeaderName::from_str(name).map_err(|_| {
        format!("`{name}` is not a valid NATS header name (printable ASCII without `:`)")
    })
}

fn header_value(name: &str, value: &str) -> Result<HeaderValue, String> {
    HeaderValue::from_str(value)
        .map_err(|_| format!("the value of the header `{name}` holds a line break"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::new_id;

    #[test]
    fn every_field_survives_encoding() {
        let message = Message::new("body")
            .with_header("trace_id", "t-1")
            .with_header("Content-Type", "text/plain");

        let headers = encode(&message).unwrap();
        let decoded = decode(
            Some(&headers),
            message.body.clone(),
            || unreachable!("the id travels"),
            || unreachable!("the time travels"),
        );

        assert_eq!(decoded, message);
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

        assert!(encode(&reserved).unwrap_err().contains("reserved"));
        assert!(encode(&colon).is_err());
        assert!(encode(&newline).is_err());
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
