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
            timestamp: Message::now(),
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

    /// The current time in whole milliseconds, as a message's timestamp holds it.
    pub(crate) fn now() -> SystemTime {
        truncate_to_millis(SystemTime::now())
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

/// The id and time a delivered message is given when it arrives without them.
///
/// A driver builds a delivered message again for each attempt of its handler and for its dead
/// letter; each of those builds must see the same id and time. They are fixed on first use, so
/// messages that carry their own cost nothing.
///
/// The id is this process's random prefix and a number it hands out in turn, such as
/// `9b1e4c07d2a85f36-42`: unique within the process, and across processes unless two draw the
/// same 64-bit prefix. Messages from clients that set no id of their own get one each, so it
/// is made with a counter and a few digits rather than a clock read, random bits and a UUID.
#[cfg(any(feature = "rabbitmq", feature = "nats"))]
#[derive(Debug, Default)]
pub(crate) struct Fallback {
    // Each 0 until first used, then the value plus one. Atomics rather than `OnceLock`s: one
    // `Fallback` is made for every delivered message, and a `OnceLock`'s first use takes its
    // slow path.
    number: std::sync::atomic::AtomicU64,
    millis: std::sync::atomic::AtomicU64,
}

#[cfg(any(feature = "rabbitmq", feature = "nats"))]
impl Fallback {
    /// A fresh id, the same on every call.
    pub(crate) fn id(&self) -> String {
        static PREFIX: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);

        let prefix = PREFIX.get_or_init(|| {
            let random = uuid::Uuid::now_v7().as_u64_pair().1;
            format!("{random:016x}-")
        });
        let number = fixed_on_first_use(&self.number, || NEXT.fetch_add(1, Ordering::Relaxed));
        let mut digits = itoa::Buffer::new();
        let digits = digits.format(number);
        let mut id = String::with_capacity(prefix.len() + digits.len());
        id.push_str(prefix);
        id.push_str(digits);
        id
    }

    /// The time of the first call.
    pub(crate) fn time(&self) -> SystemTime {
        let millis = fixed_on_first_use(&self.millis, || {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(0))
        });
        UNIX_EPOCH + Duration::from_millis(millis)
    }
}

/// The value `cell` holds (plus one), or else the one `make` makes, stored for later calls.
/// When two threads race, both return the value stored first.
#[cfg(any(feature = "rabbitmq", feature = "nats"))]
fn fixed_on_first_use(cell: &std::sync::atomic::AtomicU64, make: impl FnOnce() -> u64) -> u64 {
    use std::sync::atomic::Ordering;

    match cell.load(Ordering::Relaxed) {
        0 => {
            let made = make();
            let stored = made.saturating_add(1);
            match cell.compare_exchange(0, stored, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => made,
                Err(stored) => stored - 1,
            }
        }
        stored => stored - 1,
    }
}

/// The millisecond a UUIDv7 id was made in (its first 48 bits), or `None` for other ids.
///
/// [`Message::new`] takes its id and its time from the clock one after the other, so the two
/// nearly always agree. A driver whose broker keeps no time of its own can then leave the time
/// out of the message's headers and read it back from the id: every header costs the client a
/// map entry and a few allocations on both ends.
#[cfg(feature = "nats")]
pub(crate) fn id_millis(id: &str) -> Option<i64> {
    let uuid = uuid::Uuid::try_parse(id).ok()?;
    if uuid.get_version_num() != 7 {
        return None;
    }
    let bytes = uuid.as_bytes();
    let mut millis = [0; 8];
    millis[2..].copy_from_slice(&bytes[..6]);
    i64::try_from(u64::from_be_bytes(millis)).ok()
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

    #[cfg(feature = "nats")]
    #[test]
    fn a_new_message_id_holds_its_millisecond() {
        let message = Message::new("a");

        let millis = id_millis(&message.id).unwrap();

        assert!((message.timestamp_millis() - millis).abs() <= 1);
        assert_eq!(id_millis("not-a-uuid"), None);
        assert_eq!(id_millis("67e55044-10b1-426f-9247-bb680e5fe0c8"), None);
    }

    #[cfg(any(feature = "rabbitmq", feature = "nats"))]
    #[test]
    fn a_fallback_id_is_the_same_on_every_call_and_differs_from_others() {
        let first = Fallback::default();
        let second = Fallback::default();

        assert_eq!(first.id(), first.id());
        assert_ne!(first.id(), second.id());
        assert_eq!(first.time(), first.time());
        let id = first.id();
        let (prefix, number) = id.split_once('-').unwrap();
        assert_eq!(prefix.len(), 16);
        assert!(number.parse::<u64>().is_ok());
    }

    #[test]
    fn headers_are_set_and_read() {
        let mut message = Message::new("x").with_header("kind", "test");
        message.set_header("kind", "replaced");

        assert_eq!(message.header("kind"), Some("replaced"));
        assert_eq!(message.header("missing"), None);
    }
}
