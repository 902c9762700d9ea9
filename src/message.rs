//! The one message type every driver sends and delivers.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::context::new_id;

/// Message headers: text keys and text values, kept in key order.
pub type Headers = BTreeMap<String, String>;

/// A message: an id, headers, a body and the time it was created.
///
/// The body is [`Bytes`], so cloning a message or handing it to several subscribers does not
/// copy the payload. The timestamp has millisecond precision, the precision every broker keeps,
/// so a message compares equal to itself after a round trip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// A unique id; [`Message::new`] fills a time-ordered UUID.
    pub id: String,
    /// Headers, including `trace_id` once published.
    pub headers: Headers,
    /// The payload.
    pub body: Bytes,
    /// When the message was created, in whole milliseconds.
    pub timestamp: SystemTime,
}

impl Message {
    /// A message with a fresh unique id, no headers and the current time.
    pub fn new(body: impl Into<Bytes>) -> Self {
        Message {
            id: new_id(),
            headers: Headers::new(),
            body: body.into(),
            timestamp: truncate_to_millis(SystemTime::now()),
        }
    }

    /// This message with the header `key` set to `value`.
    pub fn with_header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.set_header(key, value);
        self
    }

    /// This message with the id `id`.
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }

    /// Sets the header `key` to `value`, replacing any earlier value.
    pub fn set_header(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.headers.insert(key.into(), value.into());
    }

    /// The value of the header `key`.
    pub fn header(&self, key: &str) -> Option<&str> {
        self.headers.get(key).map(String::as_str)
    }

    /// The trace id this message carries, if any.
    pub fn trace_id(&self) -> Option<&str> {
        self.header(crate::propagation::TRACE_ID_HEADER)
    }

    /// The timestamp as milliseconds since the Unix epoch (0 for times before it).
    pub fn timestamp_millis(&self) -> i64 {
        self.timestamp
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| {
                i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX)
            })
    }

    /// The time `millis` milliseconds after the Unix epoch, as drivers read it off the wire.
    pub fn timestamp_from_millis(millis: i64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(u64::try_from(millis).unwrap_or(0))
    }
}

fn truncate_to_millis(time: SystemTime) -> SystemTime {
    let millis = time
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis());
    UNIX_EPOCH + Duration::from_millis(u64::try_from(millis).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_messages_get_unique_ids_and_millisecond_time() {
        let a = Message::new("a");
        let b = Message::new("b");

        assert_ne!(a.id, b.id);
        assert_eq!(
            Message::timestamp_from_millis(a.timestamp_millis()),
            a.timestamp
        );
    }

    #[test]
    fn headers_are_set_and_read() {
        let mut message = Message::new("x").with_header("kind", "test");
        message.set_header("kind", "replaced");

        assert_eq!(message.header("kind"), Some("replaced"));
        assert_eq!(message.header("missing"), None);
    }
}
