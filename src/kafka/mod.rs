//! The Kafka driver, on rskafka, with a consumer-group member of our own.
//!
//! # How the model maps onto Kafka
//!
//! - **Topics** are Kafka topics. Publishing or subscribing to a missing topic creates it with
//!   `partitions` and `replication_factor`, unless `create_topics = false`.
//! - **Messages** are records: the body is the value, every header a record header, the id the
//!   `message_id` header, the time the record timestamp (milliseconds). The `partition_key`
//!   header, when present, is also the record key, and picks the partition with the Java
//!   client's default partitioner (murmur2), so keyed records land where other Kafka clients
//!   put them; records without a key are spread over the partitions in turn. A record from
//!   another client without `message_id` gets `<topic>-<partition>-<offset>` as id, and its key
//!   becomes the `partition_key` header.
//! - **`publish`** returns once the partition leader acknowledged the record. Concurrent
//!   publishes to one partition share one produce request: each waits at most `linger` for
//!   company, and a request holds at most `max_batch_bytes`.
//! - **Groups** are Kafka consumer groups, joined through the group coordinator with the
//!   standard `consumer` protocol and the `range` (default) or `roundrobin` assignor, so
//!   members of other Kafka clients can share a group. A subscription without a group takes
//!   the connection's `group_id`; without either it reads every partition on its own, from the
//!   end, and commits nothing.
//! - **Acknowledgement** is the offset commit: each partition is read in order, and the offset
//!   after the records whose handlers succeeded is committed after each fetched batch, every
//!   partition's in one request that handling does not wait for. A record's first attempt
//!   takes its headers and value without a copy; when that attempt fails, the retries read the
//!   record again from the log (a record that retention or compaction removed in between is
//!   logged as an error and not retried). A record whose handler failed on every attempt is
//!   published to the dead-letter topic (`{topic}.dlq`) with the error, the attempt count and
//!   its partition and offset in its headers, then committed, so a poison record never blocks
//!   its partition.
//! - **Rebalances**: a member learns of one from its heartbeat, lets in-flight handlers finish,
//!   commits, and joins again. A partition without a committed offset starts at
//!   `start_offset`, and that position is committed at once so its next owner starts there too.
//! - **Delivery** is at-least-once: after a crash, or a commit that failed, records since the
//!   last commit are delivered again.
//! - **Security**: SASL (`PLAIN`, `SCRAM-SHA-256`, `SCRAM-SHA-512`) and TLS, each on when its
//!   table is present, together Kafka's `SASL_SSL`. TLS needs the crate's `tls` feature and
//!   covers every connection, the group coordinator's included. The feature turns on
//!   rskafka's TLS transport, which compiles `ring`, the one C dependency this driver gains:
//!   rskafka offers no other way to TLS.
//!
//! The escape hatch, [`KafkaProvider::client`], gives rskafka's `Client`.

mod consumer;
mod group;
mod producer;
mod record;
mod tls;
mod wire;

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use rskafka::BackoffConfig;
use rskafka::client::partition::PartitionClient;
use rskafka::client::{Client, ClientBuilder, Credentials, SaslConfig};

use crate::config::{KafkaConfig, SaslMechanism};
use crate::context::Context;
use crate::error::{Error, Operation, Origin, Result};
use crate::handler::{Dispatcher, Handler, Source};
use crate::message::Message;
use crate::propagation;
use crate::provider::{Provider, SubscribeOptions};
use crate::subscription::{Subscription, Subscriptions};

pub use consumer::{DEAD_LETTER_OFFSET_HEADER, DEAD_LETTER_PARTITION_HEADER};
pub use record::{ID_HEADER, KEY_HEADER, partition_for_key};

use consumer::Consumer;
use group::{GroupSettings, Member};
use producer::Producer;
use tls::ClientTls;

const DRIVER: &str = "kafka";

/// A connection to a Kafka cluster.
pub struct KafkaProvider {
    shared: Arc<Shared>,
    subscriptions: Subscriptions,
}

/// What the provider's publishers and consumers share.
pub(crate) struct Shared {
    pub(crate) name: String,
    pub(crate) config: KafkaConfig,
    pub(crate) client: Arc<Client>,
    pub(crate) producer: Producer,
    /// The TLS of coordinator connections, the same as rskafka's.
    pub(crate) tls: Option<ClientTls>,
}

impl KafkaProvider {
    /// Connects to the cluster: the first reachable bootstrap broker answers with the
    /// cluster's metadata.
    pub async fn connect(ctx: &Context, name: &str, config: KafkaConfig) -> Result<Self> {
        let origin = || Origin::new(DRIVER, name, Operation::Connect, config.brokers.join(","));
        // rskafka retries forever unless told otherwise; every request gets a deadline.
        let backoff = BackoffConfig {
            deadline: Some(config.request_timeout),
            ..BackoffConfig::default()
        };
        let mut builder = ClientBuilder::new(config.brokers.clone())
            .client_id(config.client_id.as_str())
            .backoff_config(backoff);
        if let Some(sasl) = &config.sasl {
            let credentials =
                Credentials::new(sasl.username.clone(), sasl.password.expose().to_owned());
            builder = builder.sasl_config(match sasl.mechanism {
                SaslMechanism::Plain => SaslConfig::Plain(credentials),
                SaslMechanism::ScramSha256 => SaslConfig::ScramSha256(credentials),
                SaslMechanism::ScramSha512 => SaslConfig::ScramSha512(credentials),
            });
        }
        let tls = tls::configure(config.tls(), name, origin)?;
        #[cfg(feature = "tls")]
        if let Some(tls) = &tls {
            builder = builder.tls_config(Arc::clone(tls));
        }
        let client = ctx
            .run(origin, async {
                builder
                    .build()
                    .await
                    .map_err(|error| Error::broker(origin(), error))
            })
            .await?;

        let client = Arc::new(client);
        tracing::debug!(connection = name, driver = %DRIVER, brokers = ?config.brokers, "connected");
        Ok(KafkaProvider {
            shared: Arc::new(Shared {
                name: name.to_owned(),
                producer: Producer::new(Arc::clone(&client), config.clone()),
                config,
                client,
                tls,
            }),
            subscriptions: Subscriptions::new(),
        })
    }

    /// rskafka's client, for what this crate does not cover.
    pub fn client(&self) -> &Arc<Client> {
        &self.shared.client
    }

    /// rskafka's client for one partition of a topic, to produce or fetch directly.
    pub async fn partition_client(&self, topic: &str, partition: i32) -> Result<PartitionClient> {
        producer::partition_client(&self.shared.client, topic, partition)
            .await
            .map_err(|error| Error::broker(self.origin(Operation::Connect, topic), error))
    }

    /// The connection's settings.
    pub fn config(&self) -> &KafkaConfig {
        &self.shared.config
    }

    fn origin(&self, operation: Operation, target: &str) -> Origin {
        Origin::new(DRIVER, &self.shared.name, operation, target)
    }

    fn check_open(&self, operation: Operation, target: &str) -> Result<()> {
        self.subscriptions
            .check_open(|| self.origin(operation, target))
    }

    async fn start_subscription(
        &self,
        ctx: &Context,
        topic: &str,
        group: Option<String>,
        dispatcher: Dispatcher,
    ) -> Result<Subscription> {
        let origin = || self.origin(Operation::Subscribe, topic);
        let fail = |error| Error::broker(origin(), error);
        let config = &self.shared.config;
        let count = producer::ensure_topic(&self.shared.client, config, topic)
            .await
            .map_err(fail)?;
        let mut consumer = Consumer::new(Arc::clone(&self.shared), topic, dispatcher);

        let Some(group) = group else {
            let positions = consumer.positions_alone(count).await.map_err(fail)?;
            return Ok(self
                .subscriptions
                .spawn(ctx, topic, |stop| consumer.run_alone(positions, stop)));
        };

        let settings = GroupSettings {
            bootstrap: config.brokers.clone(),
            client_id: config.client_id.clone(),
            session_timeout: config.session_timeout,
            rebalance_timeout: config.rebalance_timeout,
            request_timeout: config.request_timeout,
            assignor: config.assignor,
            sasl: config.sasl.clone(),
            tls: self.shared.tls.clone(),
        };
        let mut member = Member::new(&group, topic, settings);
        let positions = consumer.join(&mut member).await.map_err(fail)?;
        Ok(self.subscriptions.spawn(ctx, topic, |stop| {
            consumer.run_in_group(member, positions, stop)
        }))
    }
}

#[async_trait]
impl Provider for KafkaProvider {
    fn driver(&self) -> &'static str {
        DRIVER
    }

    fn name(&self) -> &str {
        &self.shared.name
    }

    async fn publish(&self, ctx: &Context, topic: &str, mut message: Message) -> Result<()> {
        self.check_open(Operation::Publish, topic)?;
        propagation::inject(ctx, &mut message);
        let origin = || self.origin(Operation::Publish, topic);
        ctx.run(origin, async {
            let placed = self
                .shared
                .producer
                .send(topic, &message)
                .await
                .map_err(|error| Error::broker(origin(), error))?;
            tracing::trace!(
                connection = %self.shared.name,
                topic,
                partition = placed.partition,
                offset = placed.offset,
                "published"
            );
            Ok(())
        })
        .await
    }

    async fn subscribe(
        &self,
        ctx: &Context,
        topic: &str,
        options: SubscribeOptions,
        handler: Arc<dyn Handler>,
    ) -> Result<Subscription> {
        self.check_open(Operation::Subscribe, topic)?;
        let group = options
            .group
            .or_else(|| self.shared.config.group_id.clone());
        let dispatcher = Dispatcher::new(
            handler,
            self.shared.config.retry.clone(),
            Source {
                driver: DRIVER,
                connection: self.shared.name.as_str().into(),
                topic: topic.into(),
            },
        );

        let origin = || self.origin(Operation::Subscribe, topic);
        ctx.run(
            origin,
            self.start_subscription(ctx, topic, group, dispatcher),
        )
        .await
    }

    async fn ping(&self, ctx: &Context) -> Result<()> {
        self.check_open(Operation::Ping, "")?;
        let origin = || self.origin(Operation::Ping, &self.shared.config.brokers.join(","));
        ctx.run(origin, async {
            self.shared
                .client
                .list_topics()
                .await
                .map(drop)
                .map_err(|error| Error::broker(origin(), error))
        })
        .await
    }

    async fn close(&self) -> Result<()> {
        self.subscriptions.close().await;
        tracing::info!(connection = %self.shared.name, driver = %DRIVER, "closed");
        Ok(())
    }
}

impl fmt::Display for KafkaProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{DRIVER}({}: {})",
            self.shared.name,
            self.shared.config.brokers.join(",")
        )
    }
}

impl fmt::Debug for KafkaProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaProvider")
            .field("name", &self.shared.name)
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}
