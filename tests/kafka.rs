//! The Kafka driver against a real broker (nisshi, or any Kafka, at `TEST_KAFKA_ADDR`,
//! 127.0.0.1:9092 by default): the conformance suite, consumer groups, interoperability with
//! plain rskafka, and dead letters.

mod conformance;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use broker::config::KafkaConfig;
use broker::kafka::{DEAD_LETTER_OFFSET_HEADER, KEY_HEADER, KafkaProvider, partition_for_key};
use broker::{Context, Error, Message, Provider, RetryPolicy, SubscribeOptions};
use conformance::{ATTEMPTS, Driver, Inbox, TIMEOUT};
use rskafka::chrono::{TimeZone, Utc};
use rskafka::client::partition::Compression;
use rskafka::record::Record;

fn address() -> String {
    std::env::var("TEST_KAFKA_ADDR").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

fn settings(partitions: i32) -> KafkaConfig {
    KafkaConfig {
        brokers: vec![address()],
        partitions,
        heartbeat_interval: Duration::from_millis(300),
        session_timeout: Duration::from_secs(6),
        rebalance_timeout: Duration::from_secs(10),
        fetch_max_wait: Duration::from_millis(100),
        request_timeout: Duration::from_secs(10),
        retry: RetryPolicy {
            attempts: ATTEMPTS,
            initial_backoff: Duration::from_millis(10),
            ..RetryPolicy::default()
        },
        ..KafkaConfig::default()
    }
}

async fn connect(partitions: i32) -> Arc<KafkaProvider> {
    let ctx = Context::new().with_timeout(TIMEOUT);
    Arc::new(
        KafkaProvider::connect(&ctx, "kafka-test", settings(partitions))
            .await
            .unwrap_or_else(|error| panic!("cannot reach Kafka at {}: {error}", address())),
    )
}

fn topic() -> String {
    format!("kafka-test.{}", uuid::Uuid::now_v7().simple())
}

fn group() -> SubscribeOptions {
    SubscribeOptions::group(format!("group-{}", uuid::Uuid::now_v7().simple()))
}

struct Kafka;

#[async_trait]
impl Driver for Kafka {
    async fn connect(&self) -> Arc<dyn Provider> {
        connect(1).await
    }

    async fn dead_broker_error(&self) -> Result<Error, &'static str> {
        let config = KafkaConfig {
            brokers: vec!["127.0.0.1:1".to_owned()],
            request_timeout: Duration::from_secs(2),
            ..settings(1)
        };
        let ctx = Context::new().with_timeout(Duration::from_secs(5));
        Ok(KafkaProvider::connect(&ctx, "dead", config)
            .await
            .unwrap_err())
    }
}

conformance_tests!(Kafka);

async fn publish_numbered(provider: &KafkaProvider, topic: &str, count: usize) -> Vec<Message> {
    let ctx = Context::new().with_timeout(TIMEOUT);
    let mut sent = Vec::new();
    for index in 0..count {
        let message = Message::new(format!("record {index}"));
        provider
            .publish(&ctx, topic, message.clone())
            .await
            .unwrap();
        sent.push(message);
    }
    sent
}

fn ids(messages: &[Message]) -> HashSet<String> {
    messages.iter().map(|message| message.id.clone()).collect()
}

async fn subscribe(
    provider: &KafkaProvider,
    topic: &str,
    options: SubscribeOptions,
    inbox: &Inbox,
) -> broker::Subscription {
    provider
        .subscribe(&Context::new(), topic, options, Arc::new(inbox.handler()))
        .await
        .unwrap()
}

/// Waits until the two inboxes hold `count` messages between them.
async fn wait_for_total(first: &Inbox, second: &Inbox, count: usize) {
    let waited = tokio::time::timeout(TIMEOUT, async {
        while first.len() + second.len() < count {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "got {} + {} of {count}",
        first.len(),
        second.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_members_split_four_partitions_and_handle_each_record_once() {
    let provider = connect(4).await;
    let topic = topic();
    let options = group();
    let (first, second) = (Inbox::default(), Inbox::default());
    let _a = subscribe(&provider, &topic, options.clone(), &first).await;
    let _b = subscribe(&provider, &topic, options, &second).await;

    let sent = publish_numbered(&provider, &topic, 100).await;
    wait_for_total(&first, &second, sent.len()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut received = first.ids();
    received.extend(second.ids());
    assert_eq!(received.len(), sent.len(), "no record was handled twice");
    assert_eq!(received.into_iter().collect::<HashSet<_>>(), ids(&sent));
    assert!(
        first.len() > 0 && second.len() > 0,
        "both members got partitions"
    );
    provider.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_a_member_leaves_the_other_takes_over_its_partitions() {
    let provider = connect(4).await;
    let topic = topic();
    let options = group();
    let (staying, leaving) = (Inbox::default(), Inbox::default());
    let _stays = subscribe(&provider, &topic, options.clone(), &staying).await;
    let leaves = subscribe(&provider, &topic, options, &leaving).await;

    let before = publish_numbered(&provider, &topic, 40).await;
    wait_for_total(&staying, &leaving, before.len()).await;
    leaves.stop().await;
    let after = publish_numbered(&provider, &topic, 40).await;
    staying.wait_for(staying.len() + 1).await;
    wait_for_total(&staying, &leaving, before.len() + after.len()).await;

    let mut received = staying.ids();
    received.extend(leaving.ids());
    let mut expected = ids(&before);
    expected.extend(ids(&after));
    assert_eq!(
        received.len(),
        expected.len(),
        "no record was handled twice"
    );
    assert_eq!(received.into_iter().collect::<HashSet<_>>(), expected);
    assert!(ids(&after).is_subset(&staying.ids().into_iter().collect()));
    provider.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_member_resumes_from_the_committed_offsets() {
    let provider = connect(2).await;
    let topic = topic();
    let options = group();
    let first_run = Inbox::default();
    let running = subscribe(&provider, &topic, options.clone(), &first_run).await;

    let early = publish_numbered(&provider, &topic, 20).await;
    first_run.wait_for(early.len()).await;
    running.stop().await;

    let late = publish_numbered(&provider, &topic, 20).await;
    let second_run = Inbox::default();
    let _restarted = subscribe(&provider, &topic, options, &second_run).await;
    second_run.wait_for(late.len()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    assert_eq!(
        first_run.ids().into_iter().collect::<HashSet<_>>(),
        ids(&early)
    );
    assert_eq!(
        second_run.ids().len(),
        late.len(),
        "nothing handled was delivered again"
    );
    assert_eq!(
        second_run.ids().into_iter().collect::<HashSet<_>>(),
        ids(&late)
    );
    provider.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_rskafka_reads_our_records_with_headers_key_and_timestamp() {
    let provider = connect(3).await;
    let topic = topic();
    let sent = Message::new("interop")
        .with_header("kind", "interop")
        .with_header(KEY_HEADER, "customer-42");
    let ctx = Context::from_request_id("interop-request");
    provider.publish(&ctx, &topic, sent.clone()).await.unwrap();

    let mut found = None;
    for partition in 0..3 {
        let client = provider.partition_client(&topic, partition).await.unwrap();
        let (records, _) = client.fetch_records(0, 1..1_000_000, 100).await.unwrap();
        if let Some(record) = records.into_iter().next() {
            found = Some((partition, record.record));
        }
    }

    let (partition, record) = found.expect("the record is in one of the partitions");
    let header = |key: &str| record.headers.get(key).map(|value| value.as_slice());
    assert_eq!(record.value.as_deref(), Some(&b"interop"[..]));
    assert_eq!(record.key.as_deref(), Some(&b"customer-42"[..]));
    assert_eq!(header("kind"), Some(&b"interop"[..]));
    assert_eq!(header("trace_id"), Some(&b"interop-request"[..]));
    assert_eq!(header("message_id"), Some(sent.id.as_bytes()));
    assert_eq!(record.timestamp.timestamp_millis(), sent.timestamp_millis());
    assert_eq!(
        partition,
        partition_for_key(b"customer-42", 3),
        "the key picked the partition"
    );
    provider.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_from_plain_rskafka_are_consumed_with_their_headers() {
    let provider = connect(1).await;
    let topic = topic();
    let inbox = Inbox::default();
    let _subscription = subscribe(&provider, &topic, SubscribeOptions::default(), &inbox).await;

    let client = provider.partition_client(&topic, 0).await.unwrap();
    let record = Record {
        key: Some(b"k-1".to_vec()),
        value: Some(b"from rskafka".to_vec()),
        headers: BTreeMap::from([
            ("origin".to_owned(), b"plain".to_vec()),
            ("trace_id".to_owned(), b"foreign-trace".to_vec()),
        ]),
        timestamp: Utc.timestamp_millis_opt(1_700_000_000_123).unwrap(),
    };
    let offsets = client
        .produce(vec![record], Compression::NoCompression)
        .await
        .unwrap();

    let (ctx, message) = inbox.wait_for(1).await.remove(0);
    assert_eq!(&message.body[..], b"from rskafka");
    assert_eq!(message.header("origin"), Some("plain"));
    assert_eq!(message.header(KEY_HEADER), Some("k-1"));
    assert_eq!(message.id, format!("{topic}-0-{}", offsets[0]));
    assert_eq!(message.timestamp_millis(), 1_700_000_000_123);
    assert_eq!(ctx.trace_id(), "foreign-trace");
    provider.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_record_is_dead_lettered_with_its_position_while_others_flow() {
    let provider = connect(1).await;
    let topic = topic();
    let dead = Inbox::default();
    let _dead = subscribe(
        &provider,
        &format!("{topic}.dlq"),
        SubscribeOptions::default(),
        &dead,
    )
    .await;
    let handled = Inbox::default();
    let record = handled.handler();
    let _subscription = provider
        .subscribe(
            &Context::new(),
            &topic,
            group(),
            Arc::new(move |ctx: Context, message: Message| {
                let poison = message.header("poison").is_some();
                let recorded = broker::Handler::call(&record, ctx, message);
                async move {
                    if poison {
                        return Err(broker::BoxError::from("cannot handle poison"));
                    }
                    recorded.await
                }
            }),
        )
        .await
        .unwrap();

    let ctx = Context::new().with_timeout(TIMEOUT);
    let poison = Message::new("bad").with_header("poison", "1");
    provider
        .publish(&ctx, &topic, poison.clone())
        .await
        .unwrap();
    let after = publish_numbered(&provider, &topic, 5).await;

    handled.wait_for(after.len()).await;
    let (_, dead_letter) = dead.wait_for(1).await.remove(0);
    assert_eq!(dead_letter.id, poison.id);
    assert_eq!(dead_letter.header(DEAD_LETTER_OFFSET_HEADER), Some("0"));
    assert_eq!(dead_letter.header("dead_letter_attempts"), Some("3"));
    assert_eq!(ids(&after), handled.ids().into_iter().collect());
    provider.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_record_the_log_no_longer_holds_is_not_retried_and_others_flow() {
    let provider = connect(1).await;
    let topic = topic();
    let ctx = Context::new().with_timeout(TIMEOUT);
    // Publishing creates the topic, whose partition the handler needs; the group starts after
    // this record, at the end of the partition.
    publish_numbered(&provider, &topic, 1).await;
    let log = Arc::new(provider.partition_client(&topic, 0).await.unwrap());

    let attempts = Arc::new(AtomicU32::new(0));
    let handled = Inbox::default();
    let record = handled.handler();
    let counter = Arc::clone(&attempts);
    let _subscription = provider
        .subscribe(
            &Context::new(),
            &topic,
            group(),
            Arc::new(move |ctx: Context, message: Message| {
                let doomed = message.header("doomed").is_some();
                let recorded = broker::Handler::call(&record, ctx, message);
                let (counter, log) = (Arc::clone(&counter), Arc::clone(&log));
                async move {
                    if doomed {
                        counter.fetch_add(1, Ordering::SeqCst);
                        // Retention takes the record (and the one before it) while its first
                        // attempt runs, so its retries find nothing to read again.
                        log.delete_records(2, 5_000).await?;
                        return Err(broker::BoxError::from("fails while the log drops it"));
                    }
                    recorded.await
                }
            }),
        )
        .await
        .unwrap();

    let doomed = Message::new("doomed").with_header("doomed", "1");
    provider.publish(&ctx, &topic, doomed).await.unwrap();
    let after = publish_numbered(&provider, &topic, 3).await;

    handled.wait_for(after.len()).await;
    assert_eq!(
        attempts.load(Ordering::SeqCst),
        1,
        "the gone record is not retried"
    );
    assert_eq!(
        handled.ids().into_iter().collect::<HashSet<_>>(),
        ids(&after)
    );
    provider.close().await.unwrap();
}
