//! `[brokers.<name>.kafka]`.

use std::time::Duration;

use serde::Deserialize;

use super::tls::{self, TLS_KEYS, TlsConfig};
use super::{RETRY_KEYS, check_host_port, default_dead_letter, invalid, validate_retry};
use crate::config::{DriverTable, Secret, ValueKind};
use crate::handler::RetryPolicy;

/// `[brokers.<name>.kafka]`: an Apache Kafka cluster.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap brokers as `host:port`; at least one.
    pub brokers: Vec<String>,
    /// The consumer group subscriptions join when they name none.
    #[serde(default)]
    pub group_id: Option<String>,
    /// The client id the broker sees.
    #[serde(default = "defaults::client_id")]
    pub client_id: String,
    /// Whether publishing or subscribing to a missing topic creates it.
    #[serde(default = "defaults::yes")]
    pub create_topics: bool,
    /// The partitions of a topic this client creates.
    #[serde(default = "defaults::partitions")]
    pub partitions: i32,
    /// The replication factor of a topic this client creates.
    #[serde(default = "defaults::replication_factor")]
    pub replication_factor: i16,
    /// How produce requests are compressed.
    #[serde(default)]
    pub compression: KafkaCompression,
    /// How long a publish waits for others to share its produce request.
    #[serde(default = "defaults::linger", with = "humantime_serde")]
    pub linger: Duration,
    /// The largest produce request, in bytes of records.
    #[serde(default = "defaults::max_batch_bytes")]
    pub max_batch_bytes: usize,
    /// The most record bytes one fetch asks for.
    #[serde(default = "defaults::fetch_max_bytes")]
    pub fetch_max_bytes: i32,
    /// How long the broker may hold a fetch that has no records yet.
    #[serde(default = "defaults::fetch_max_wait", with = "humantime_serde")]
    pub fetch_max_wait: Duration,
    /// How long the coordinator waits for a heartbeat before it drops a member.
    #[serde(default = "defaults::session_timeout", with = "humantime_serde")]
    pub session_timeout: Duration,
    /// How often a member heartbeats; well below `session_timeout`.
    #[serde(default = "defaults::heartbeat_interval", with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// How long a rebalance waits for every member to rejoin.
    #[serde(default = "defaults::rebalance_timeout", with = "humantime_serde")]
    pub rebalance_timeout: Duration,
    /// Where a group without a committed offset starts reading.
    #[serde(default)]
    pub start_offset: StartOffset,
    /// How the group leader shares partitions among members.
    #[serde(default)]
    pub assignor: Assignor,
    /// How long one request to a broker may take, retries included.
    #[serde(default = "defaults::request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Retries of a failing handler before the message is dead-lettered.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Where failed messages go; `{topic}` is replaced by their topic. Empty: nowhere.
    #[serde(default = "default_dead_letter")]
    pub dead_letter_topic: String,
    /// SASL authentication; none when absent.
    #[serde(default)]
    pub sasl: Option<KafkaSasl>,
    /// TLS to every broker; plain TCP when absent.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

/// `[brokers.<name>.kafka.sasl]`: how the client authenticates to every broker.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSasl {
    /// The mechanism.
    pub mechanism: SaslMechanism,
    /// The user name.
    pub username: String,
    /// The password; never logged.
    pub password: Secret,
}

/// A SASL mechanism Kafka brokers offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum SaslMechanism {
    /// `PLAIN`: the password itself goes to the broker, so use it only over TLS.
    #[serde(rename = "plain")]
    Plain,
    /// `SCRAM-SHA-256`.
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    /// `SCRAM-SHA-512`.
    #[serde(rename = "scram-sha-512")]
    ScramSha512,
}

impl SaslMechanism {
    /// The mechanism's name in the Kafka protocol.
    pub fn name(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// The compression of produce requests: pure-Rust codecs only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KafkaCompression {
    /// No compression.
    #[default]
    None,
    /// gzip.
    Gzip,
    /// Snappy.
    Snappy,
}

/// Where a consumer group without a committed offset starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartOffset {
    /// At the oldest record still kept.
    Earliest,
    /// After the newest record: only records published from now on.
    #[default]
    Latest,
}

/// How the group leader shares partitions among the members of a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Assignor {
    /// Consecutive ranges of each topic's partitions (Kafka's `range`).
    #[default]
    Range,
    /// Partitions dealt out in turn (Kafka's `roundrobin`).
    Roundrobin,
}

mod defaults {
    use std::time::Duration;

    pub(super) fn client_id() -> String {
        "broker".to_owned()
    }

    pub(super) fn yes() -> bool {
        true
    }

    pub(super) fn partitions() -> i32 {
        1
    }

    pub(super) fn replication_factor() -> i16 {
        1
    }

    pub(super) fn linger() -> Duration {
        Duration::from_millis(5)
    }

    pub(super) fn max_batch_bytes() -> usize {
        1024 * 1024
    }

    pub(super) fn fetch_max_bytes() -> i32 {
        1024 * 1024
    }

    pub(super) fn fetch_max_wait() -> Duration {
        Duration::from_millis(500)
    }

    pub(super) fn session_timeout() -> Duration {
        Duration::from_secs(10)
    }

    pub(super) fn heartbeat_interval() -> Duration {
        Duration::from_secs(3)
    }

    pub(super) fn rebalance_timeout() -> Duration {
        Duration::from_secs(30)
    }

    pub(super) fn request_timeout() -> Duration {
        Duration::from_secs(30)
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: Vec::new(),
            group_id: None,
            client_id: defaults::client_id(),
            create_topics: true,
            partitions: defaults::partitions(),
            replication_factor: defaults::replication_factor(),
            compression: KafkaCompression::default(),
            linger: defaults::linger(),
            max_batch_bytes: defaults::max_batch_bytes(),
            fetch_max_bytes: defaults::fetch_max_bytes(),
            fetch_max_wait: defaults::fetch_max_wait(),
            session_timeout: defaults::session_timeout(),
            heartbeat_interval: defaults::heartbeat_interval(),
            rebalance_timeout: defaults::rebalance_timeout(),
            start_offset: StartOffset::default(),
            assignor: Assignor::default(),
            request_timeout: defaults::request_timeout(),
            retry: RetryPolicy::default(),
            dead_letter_topic: default_dead_letter(),
            sasl: None,
            tls: None,
        }
    }
}

impl DriverTable for KafkaConfig {
    const TABLE: &'static str = "kafka";
    const KEYS: &'static [(&'static str, ValueKind)] = &[
        ("brokers", ValueKind::List),
        ("group_id", ValueKind::Text),
        ("client_id", ValueKind::Text),
        ("create_topics", ValueKind::Boolean),
        ("partitions", ValueKind::Integer),
        ("replication_factor", ValueKind::Integer),
        ("compression", ValueKind::Text),
        ("linger", ValueKind::Text),
        ("max_batch_bytes", ValueKind::Integer),
        ("fetch_max_bytes", ValueKind::Integer),
        ("fetch_max_wait", ValueKind::Text),
        ("session_timeout", ValueKind::Text),
        ("heartbeat_interval", ValueKind::Text),
        ("rebalance_timeout", ValueKind::Text),
        ("start_offset", ValueKind::Text),
        ("assignor", ValueKind::Text),
        ("request_timeout", ValueKind::Text),
        RETRY_KEYS[0],
        RETRY_KEYS[1],
        RETRY_KEYS[2],
        RETRY_KEYS[3],
        ("dead_letter_topic", ValueKind::Text),
        ("sasl.mechanism", ValueKind::Text),
        ("sasl.username", ValueKind::Text),
        ("sasl.password", ValueKind::Text),
        TLS_KEYS[0],
        TLS_KEYS[1],
        TLS_KEYS[2],
        TLS_KEYS[3],
        TLS_KEYS[4],
    ];

    fn validate(&self) -> Result<(), (String, String)> {
        if self.brokers.is_empty() {
            return Err(invalid("brokers", "the broker list is empty"));
        }
        for (index, broker) in self.brokers.iter().enumerate() {
            check_host_port(broker).map_err(|message| (format!("brokers[{index}]"), message))?;
        }
        if self.partitions < 1 {
            return Err(invalid("partitions", "must be at least 1"));
        }
        if self.replication_factor < 1 {
            return Err(invalid("replication_factor", "must be at least 1"));
        }
        if self.fetch_max_bytes < 1 {
            return Err(invalid("fetch_max_bytes", "must be at least 1"));
        }
        if self.fetch_max_wait < Duration::from_millis(1) {
            // A zero wait is refused by some brokers, and would spin on an idle partition.
            return Err(invalid("fetch_max_wait", "must be at least 1ms"));
        }
        if self.heartbeat_interval >= self.session_timeout {
            return Err(invalid(
                "heartbeat_interval",
                "must be shorter than session_timeout",
            ));
        }
        if self.max_batch_bytes == 0 {
            return Err(invalid("max_batch_bytes", "must be at least 1"));
        }
        tls::validate(self.tls.as_ref())?;
        validate_retry(&self.retry)
    }
}

impl KafkaConfig {
    /// The TLS settings in force, if TLS is on.
    pub fn tls(&self) -> Option<&TlsConfig> {
        tls::active(self.tls.as_ref())
    }
}
