//! Publishing: one batching producer per partition, shared by concurrent publishes, and topic
//! creation on first use.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use rskafka::client::Client;
use rskafka::client::error::{Error as ClientError, ProtocolError};
use rskafka::client::partition::{Compression, PartitionClient, UnknownTopicHandling};
use rskafka::client::producer::aggregator::RecordAggregator;
use rskafka::client::producer::{BatchProducer, BatchProducerBuilder};
use tokio::sync::OnceCell;

use super::record::{KEY_HEADER, partition_for_key, to_record};
use crate::config::{KafkaCompression, KafkaConfig};
use crate::error::BoxError;
use crate::message::Message;

/// Where a published record landed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Placed {
    pub(crate) partition: i32,
    pub(crate) offset: i64,
}

/// The producers of every topic published to so far.
pub(crate) struct Producer {
    client: Arc<Client>,
    config: KafkaConfig,
    topics: Mutex<HashMap<String, Arc<OnceCell<Arc<TopicProducer>>>>>,
}

struct TopicProducer {
    partitions: Vec<BatchProducer<RecordAggregator>>,
    next: AtomicUsize,
}

impl Producer {
    pub(crate) fn new(client: Arc<Client>, config: KafkaConfig) -> Self {
        Producer {
            client,
            config,
            topics: Mutex::new(HashMap::new()),
        }
    }

    /// Publishes `message` to `topic` and returns once the broker acknowledged it.
    ///
    /// Concurrent publishes to one partition share a produce request: each waits at most
    /// `linger` for company.
    pub(crate) async fn send(&self, topic: &str, message: &Message) -> Result<Placed, BoxError> {
        let producer = self.topic(topic).await?;
        let count = producer.partitions.len();
        let partition = match message.header(KEY_HEADER) {
            Some(key) => partition_for_key(key.as_bytes(), i32::try_from(count)?),
            None => i32::try_from(producer.next.fetch_add(1, Ordering::Relaxed) % count)?,
        };

        let offset = producer.partitions[usize::try_from(partition)?]
            .produce(to_record(message))
            .await?;
        Ok(Placed { partition, offset })
    }

    async fn topic(&self, topic: &str) -> Result<Arc<TopicProducer>, BoxError> {
        let cell = {
            let mut topics = self.topics.lock().unwrap_or_else(PoisonError::into_inner);
            Arc::clone(topics.entry(topic.to_owned()).or_default())
        };
        let producer = cell
            .get_or_try_init(|| async {
                let count = ensure_topic(&self.client, &self.config, topic).await?;
                let mut partitions = Vec::new();
                for partition in 0..count {
                    let client = partition_client(&self.client, topic, partition).await?;
                    let producer = BatchProducerBuilder::new(Arc::new(client))
                        .with_linger(self.config.linger)
                        .with_compression(compression(self.config.compression))
                        .build(RecordAggregator::new(self.config.max_batch_bytes));
                    partitions.push(producer);
                }
                Ok::<_, BoxError>(Arc::new(TopicProducer {
                    partitions,
                    next: AtomicUsize::new(0),
                }))
            })
            .await?;
        Ok(Arc::clone(producer))
    }
}

/// A client for one partition that waits for a topic the broker does not know yet.
pub(crate) async fn partition_client(
    client: &Client,
    topic: &str,
    partition: i32,
) -> Result<PartitionClient, ClientError> {
    client
        .partition_client(topic, partition, UnknownTopicHandling::Retry)
        .await
}

/// The partition count of `topic`, creating the topic first when it is missing and
/// `create_topics` allows it.
pub(crate) async fn ensure_topic(
    client: &Client,
    config: &KafkaConfig,
    topic: &str,
) -> Result<i32, BoxError> {
    if let Some(count) = partition_count(client, topic).await? {
        return Ok(count);
    }
    if !config.create_topics {
        return Err(format!("topic `{topic}` does not exist and create_topics is off").into());
    }

    let timeout = i32::try_from(config.request_timeout.as_millis()).unwrap_or(i32::MAX);
    let created = client
        .controller_client()?
        .create_topic(topic, config.partitions, config.replication_factor, timeout)
        .await;
    match created {
        Ok(()) => tracing::info!(topic, partitions = config.partitions, "created topic"),
        Err(ClientError::ServerError {
            protocol_error: ProtocolError::TopicAlreadyExists,
            ..
        }) => {}
        Err(error) => return Err(error.into()),
    }

    // A new topic can take a moment to show in the metadata.
    for _ in 0..50 {
        if let Some(count) = partition_count(client, topic).await? {
            return Ok(count);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Err(format!("topic `{topic}` was created but does not show in the metadata").into())
}

/// The partition counts of `topics` (missing topics are left out).
pub(crate) async fn partition_counts(
    client: &Client,
    topics: &[String],
) -> Result<HashMap<String, i32>, ClientError> {
    // TODO: ask for these topics only; listing every topic is wasteful on large clusters.
    let listed = client.list_topics().await?;
    Ok(listed
        .into_iter()
        .filter(|listed| topics.contains(&listed.name))
        .map(|listed| {
            let count = i32::try_from(listed.partitions.len()).unwrap_or(i32::MAX);
            (listed.name, count)
        })
        .collect())
}

async fn partition_count(client: &Client, topic: &str) -> Result<Option<i32>, ClientError> {
    let counts = partition_counts(client, &[topic.to_owned()]).await?;
    Ok(counts.get(topic).copied().filter(|count| *count > 0))
}

fn compression(setting: KafkaCompression) -> Compression {
    match setting {
        KafkaCompression::None => Compression::NoCompression,
        KafkaCompression::Gzip => Compression::Gzip,
        KafkaCompression::Snappy => Compression::Snappy,
    }
}
