//! Kafka: `broker` against rskafka used directly.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use broker::config::{KafkaConfig, StartOffset};
use broker::kafka::KafkaProvider;
use broker::{Context, Provider};
use futures_util::{StreamExt, TryStreamExt};
use hdrhistogram::Histogram;
use rskafka::chrono::DateTime;
use rskafka::client::partition::{OffsetAt, PartitionClient, UnknownTopicHandling};
use rskafka::client::producer::aggregator::RecordAggregator;
use rskafka::client::producer::{BatchProducer, BatchProducerBuilder};
use rskafka::client::{Client, ClientBuilder};
use rskafka::record::Record;

use crate::record as record_latency;
use crate::report::Report;
use crate::{
    BODY, SENT_HEADER, Settings, compare_latency, compare_throughput, histogram, latency_through,
    message, new_group, now_ns, paced, soak, time_consume,
};

type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

const PARTITIONS: i32 = 4;

pub(crate) async fn run(settings: &Settings, report: &mut Report) -> BenchResult<()> {
    let address = std::env::var("TEST_KAFKA_ADDR").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let config = KafkaConfig {
        brokers: vec![address.clone()],
        partitions: PARTITIONS,
        start_offset: StartOffset::Earliest,
        fetch_max_wait: Duration::from_millis(100),
        heartbeat_interval: Duration::from_millis(500),
        ..KafkaConfig::default()
    };
    let ctx = Context::new().with_timeout(Duration::from_secs(30));
    let provider = Arc::new(KafkaProvider::connect(&ctx, "bench", config.clone()).await?);
    let native = Arc::new(ClientBuilder::new(vec![address]).build().await?);
    let messages = settings.messages;

    compare_throughput(
        report,
        "kafka",
        "publish (batched, acked)",
        messages,
        || publish_broker(&provider, messages, settings.concurrency),
        || publish_native(&native, &config, messages, settings.concurrency),
    )
    .await?;

    compare_throughput(
        report,
        "kafka",
        "consume (group member vs plain fetch)",
        messages,
        || consume_broker(&provider, &native, &config, messages),
        || consume_native(&native, &config, messages),
    )
    .await?;

    compare_latency(
        report,
        "kafka",
        "latency",
        || async { latency_through(provider.clone(), &topic(), settings).await },
        || latency_native(&native, &config, settings),
    )
    .await?;

    if !settings.soak.is_zero() {
        report.add_soak(soak(&*provider, "kafka", &topic(), settings).await?);
    }

    provider.close().await?;
    Ok(())
}

fn topic() -> String {
    format!("bench.{}", uuid::Uuid::now_v7().simple())
}

fn record() -> Record {
    Record {
        key: None,
        value: Some(BODY.to_vec()),
        headers: [("bench".to_owned(), b"1".to_vec())].into(),
        timestamp: DateTime::from_timestamp_millis(message().timestamp_millis())
            .unwrap_or_default(),
    }
}

async fn publish_broker(
    provider: &KafkaProvider,
    messages: usize,
    concurrency: usize,
) -> BenchResult<Duration> {
    let topic = topic();
    let ctx = Context::new();
    // The first publish creates the topic; it is not part of the timing.
    provider.publish(&ctx, &topic, message()).await?;

    let start = Instant::now();
    futures_util::stream::iter(0..messages)
        .map(|_| provider.publish(&ctx, &topic, message()))
        .buffer_unordered(concurrency)
        .try_collect::<()>()
        .await?;
    Ok(start.elapsed())
}

async fn native_producers(
    client: &Client,
    config: &KafkaConfig,
    topic: &str,
) -> BenchResult<Vec<BatchProducer<RecordAggregator>>> {
    let mut producers = Vec::new();
    for partition in partition_clients(client, topic).await? {
        producers.push(
            BatchProducerBuilder::new(Arc::new(partition))
                .with_linger(config.linger)
                .build(RecordAggregator::new(config.max_batch_bytes)),
        );
    }
    Ok(producers)
}

async fn partition_clients(client: &Client, topic: &str) -> BenchResult<Vec<PartitionClient>> {
    if !client.list_topics().await?.iter().any(|t| t.name == topic) {
        client
            .controller_client()?
            .create_topic(topic, PARTITIONS, 1, 5_000)
            .await?;
    }
    let mut partitions = Vec::new();
    for partition in 0..PARTITIONS {
        partitions.push(
            client
                .partition_client(topic, partition, UnknownTopicHandling::Retry)
                .await?,
        );
    }
    Ok(partitions)
}

async fn publish_native(
    client: &Client,
    config: &KafkaConfig,
    messages: usize,
    concurrency: usize,
) -> BenchResult<Duration> {
    let topic = topic();
    let producers = native_producers(client, config, &topic).await?;

    let start = Instant::now();
    futures_util::stream::iter(0..messages)
        .map(|index| producers[index % producers.len()].produce(record()))
        .buffer_unordered(concurrency)
        .try_collect::<Vec<_>>()
        .await?;
    Ok(start.elapsed())
}

/// Fills a new topic with `messages` records, as the consume workloads' input.
async fn filled_topic(
    client: &Client,
    config: &KafkaConfig,
    messages: usize,
) -> BenchResult<String> {
    let topic = topic();
    let producers = native_producers(client, config, &topic).await?;
    futures_util::stream::iter(0..messages)
        .map(|index| producers[index % producers.len()].produce(record()))
        .buffer_unordered(256)
        .try_collect::<Vec<_>>()
        .await?;
    Ok(topic)
}

async fn consume_broker(
    provider: &KafkaProvider,
    client: &Client,
    config: &KafkaConfig,
    messages: usize,
) -> BenchResult<Duration> {
    let topic = filled_topic(client, config, messages).await?;
    // Timing starts once the subscription is live, as the native side has nothing to join.
    time_consume(provider, &topic, new_group(), messages).await
}

async fn consume_native(
    client: &Client,
    config: &KafkaConfig,
    messages: usize,
) -> BenchResult<Duration> {
    let topic = filled_topic(client, config, messages).await?;
    let partitions = partition_clients(client, &topic).await?;
    let max_bytes = config.fetch_max_bytes;

    let start = Instant::now();
    let read =
        futures_util::future::try_join_all(partitions.into_iter().map(|partition| async move {
            let end = partition.get_offset(OffsetAt::Latest).await?;
            let mut offset = 0;
            let mut count = 0usize;
            while offset < end {
                let (records, _) = partition.fetch_records(offset, 1..max_bytes, 100).await?;
                for record in records {
                    std::hint::black_box(&record.record.value);
                    offset = record.offset + 1;
                    count += 1;
                }
            }
            Ok::<_, rskafka::client::error::Error>(count)
        }))
        .await?;
    let elapsed = start.elapsed();
    assert_eq!(
        read.iter().sum::<usize>(),
        messages,
        "native consumer read every record"
    );
    Ok(elapsed)
}

async fn latency_native(
    client: &Arc<Client>,
    config: &KafkaConfig,
    settings: &Settings,
) -> BenchResult<Histogram<u64>> {
    let topic = topic();
    let producers = Arc::new(native_producers(client, config, &topic).await?);
    let latencies = Arc::new(Mutex::new(histogram()));
    let stop = tokio_util::sync::CancellationToken::new();

    let mut readers = Vec::new();
    for partition in partition_clients(client, &topic).await? {
        let (latencies, stop) = (Arc::clone(&latencies), stop.clone());
        readers.push(tokio::spawn(async move {
            let mut offset = partition.get_offset(OffsetAt::Latest).await?;
            while !stop.is_cancelled() {
                let (records, _) = partition.fetch_records(offset, 1..1_048_576, 100).await?;
                for record in records {
                    let sent = record
                        .record
                        .headers
                        .get(SENT_HEADER)
                        .and_then(|value| std::str::from_utf8(value).ok()?.parse::<u64>().ok());
                    record_latency(&latencies, sent);
                    offset = record.offset + 1;
                }
            }
            Ok::<_, rskafka::client::error::Error>(())
        }));
    }

    paced(
        settings.latency_rate,
        settings.latency_duration,
        |sequence, _| {
            let producers = Arc::clone(&producers);
            async move {
                tokio::spawn(async move {
                    let mut record = record();
                    record
                        .headers
                        .insert(SENT_HEADER.to_owned(), now_ns().to_string().into_bytes());
                    let _ = producers[sequence % producers.len()].produce(record).await;
                });
                Ok(())
            }
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    for reader in readers {
        reader.await??;
    }
    let histogram = latencies.lock().unwrap().clone();
    Ok(histogram)
}
