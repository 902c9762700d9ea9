//! `[brokers.<name>.kafka]`.

use serde::Deserialize;

use super::*;
use crate::config::{DriverTable, ValueKind};
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
    #[serde(default = "default_client_id")]
    pub client_id: String,
    /// Retries of a failing handler before the message is dead-lettered.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Where failed messages go; `{topic}` is replaced by their topic. Empty: nowhere.
    #[serde(default = "default_dead_letter")]
    pub dead_letter_topic: String,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: Vec::new(),
            group_id: None,
            client_id: default_client_id(),
            retry: RetryPolicy::default(),
            dead_letter_topic: default_dead_letter(),
        }
    }
}

impl DriverTable for KafkaConfig {
    const TABLE: &'static str = "kafka";
    const KEYS: &'static [(&'static str, ValueKind)] = &[
        ("brokers", ValueKind::List),
        ("group_id", ValueKind::Text),
        ("client_id", ValueKind::Text),
        RETRY_KEYS[0],
        RETRY_KEYS[1],
        RETRY_KEYS[2],
        RETRY_KEYS[3],
        ("dead_letter_topic", ValueKind::Text),
    ];

    fn validate(&self) -> Result<(), (String, String)> {
        if self.brokers.is_empty() {
            return Err(invalid("brokers", "the broker list is empty"));
        }
        for (index, broker) in self.brokers.iter().enumerate() {
            check_host_port(broker).map_err(|message| (format!("brokers[{index}]"), message))?;
        }
        validate_retry(&self.retry)
    }
}
