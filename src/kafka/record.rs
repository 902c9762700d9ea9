//! How a [`Message`] becomes a Kafka record and back, and which partition a key picks.

use std::collections::BTreeMap;

use bytes::Bytes;
use rskafka::chrono::DateTime;
use rskafka::record::{Record, RecordAndOffset};

use crate::message::Message;

/// The record header that carries the message id.
pub const ID_HEADER: &str = "message_id";

/// The message header whose value becomes the record key, which picks the partition.
pub const KEY_HEADER: &str = "partition_key";

/// The record for `message`: its body as value, its headers plus the id, its time as the
/// record timestamp, and its `partition_key` header as the key.
pub(crate) fn to_record(message: &Message) -> Record {
    let mut headers: BTreeMap<String, Vec<u8>> = message
        .headers
        .iter()
        .map(|(key, value)| (key.clone(), value.as_bytes().to_vec()))
        .collect();
    headers.insert(ID_HEADER.to_owned(), message.id.as_bytes().to_vec());

    Record {
        key: message
            .header(KEY_HEADER)
            .map(|key| key.as_bytes().to_vec()),
        value: Some(message.body.to_vec()),
        headers,
        timestamp: DateTime::from_timestamp_millis(message.timestamp_millis()).unwrap_or_default(),
    }
}

/// The message for a fetched record. A record from another client without a `message_id`
/// header gets `<topic>-<partition>-<offset>` as its id; a record key without a
/// `partition_key` header becomes one. Headers whose values are not UTF-8 are skipped.
///
/// The record's header names and values move into the message, and `body` is its value, taken
/// out of it beforehand: nothing is copied. A caller that needs the message more than once
/// passes a clone of the record and of the body for each.
pub(crate) fn to_message(
    topic: &str,
    partition: i32,
    fetched: RecordAndOffset,
    body: Bytes,
) -> Message {
    let RecordAndOffset { record, offset } = fetched;
    let mut id = None;
    let mut headers = crate::message::Headers::new();
    for (key, value) in record.headers {
        match String::from_utf8(value) {
            Ok(value) if key == ID_HEADER => id = Some(value),
            Ok(value) => {
                headers.insert(key, value);
            }
            Err(_) => tracing::debug!(
                topic,
                partition,
                offset,
                header = %key,
                "skipping a header whose value is not UTF-8"
            ),
        }
    }
    if let Some(key) = record.key {
        headers
            .entry(KEY_HEADER.to_owned())
            .or_insert_with(|| String::from_utf8_lossy(&key).into_owned());
    }

    Message {
        id: id.unwrap_or_else(|| fallback_id(topic, partition, offset)),
        headers,
        body,
        timestamp: Message::timestamp_from_millis(record.timestamp.timestamp_millis()),
    }
}

/// The record's value, taken out of it without a copy, as a message body.
pub(crate) fn take_body(fetched: &mut RecordAndOffset) -> Bytes {
    fetched
        .record
        .value
        .take()
        .map(Bytes::from)
        .unwrap_or_default()
}

/// `<topic>-<partition>-<offset>`, built without the formatting machinery: every record from a
/// client that sets no `message_id` header takes this path.
fn fallback_id(topic: &str, partition: i32, offset: i64) -> String {
    let mut digits = itoa::Buffer::new();
    let partition = digits.format(partition);
    let mut id = String::with_capacity(topic.len() + partition.len() + 22);
    id.push_str(topic);
    id.push('-');
    id.push_str(partition);
    id.push('-');
    id.push_str(digits.format(offset));
    id
}

/// The partition the Java client's default partitioner picks for `key`: murmur2 of the key,
/// made positive, modulo the partition count.
pub fn partition_for_key(key: &[u8], partitions: i32) -> i32 {
    let positive = murmur2(key) & 0x7fff_ffff;
    positive % partitions.max(1)
}

/// MurmurHash2, 32-bit, with the seed Kafka uses.
fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;

    // Kafka hashes the length as a Java int; keys beyond 2 GiB do not exist in practice.
    let mut hash = SEED ^ (data.len() as u32);
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        hash = hash.wrapping_mul(M);
        hash ^= k;
    }

    let rest = chunks.remainder();
    if !rest.is_empty() {
        for (index, byte) in rest.iter().enumerate().rev() {
            hash ^= u32::from(*byte) << (8 * index);
        }
        hash = hash.wrapping_mul(M);
    }

    hash ^= hash >> 13;
    hash = hash.wrapping_mul(M);
    hash ^= hash >> 15;
    hash as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_the_java_client() {
        // Values from the Java client's own tests of its partitioner hash.
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
        ];
        for (key, expected) in cases {
            assert_eq!(murmur2(key), expected, "{}", String::from_utf8_lossy(key));
        }
    }

    #[test]
    fn a_message_survives_the_record() {
        let message = Message::new("body")
            .with_header("kind", "test")
            .with_header(KEY_HEADER, "customer-7");

        let mut fetched = RecordAndOffset {
            record: to_record(&message),
            offset: 5,
        };
        let body = take_body(&mut fetched);
        let back = to_message("t", 0, fetched, body);

        assert_eq!(back, message);
    }

    #[test]
    fn a_foreign_record_gets_an_id_and_its_key_as_a_header() {
        let record = Record {
            key: Some(b"k".to_vec()),
            value: None,
            headers: BTreeMap::from([("bad".to_owned(), vec![0xff, 0xfe])]),
            timestamp: DateTime::from_timestamp_millis(1_000).unwrap(),
        };

        let message = to_message(
            "orders",
            2,
            RecordAndOffset { record, offset: 9 },
            Bytes::new(),
        );

        assert_eq!(message.id, "orders-2-9");
        assert_eq!(message.header(KEY_HEADER), Some("k"));
        assert_eq!(message.header("bad"), None);
        assert!(message.body.is_empty());
    }
}
