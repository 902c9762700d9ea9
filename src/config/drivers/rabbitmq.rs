//! `[brokers.<name>.rabbitmq]`.

use serde::Deserialize;

use super::*;
use crate::config::SecretUrl;
use crate::config::{DriverTable, ValueKind};
use crate::handler::RetryPolicy;

/// The type of a RabbitMQ exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExchangeKind {
    /// Routing keys match binding patterns (`*` one word, `#` any).
    #[default]
    Topic,
    /// Routing keys match bindings exactly.
    Direct,
    /// Every bound queue gets every message.
    Fanout,
}

/// `[brokers.<name>.rabbitmq]`: a RabbitMQ server or cluster.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RabbitMqConfig {
    /// The server, `amqp://user:password@host:port/vhost` or `amqps://…`.
    #[serde(default)]
    pub url: Option<SecretUrl>,
    /// Several servers of a cluster, tried in turn (besides or instead of `url`).
    #[serde(default)]
    pub urls: Vec<SecretUrl>,
    /// The exchange messages are published to; declared durable when missing.
    pub exchange: String,
    /// The exchange's type.
    #[serde(default)]
    pub exchange_type: ExchangeKind,
    /// How many unacknowledged messages a consumer holds at once.
    #[serde(default = "default_prefetch")]
    pub prefetch: u16,
    /// Retries of a failing handler before the message is dead-lettered.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// The exchange failed messages go to; `{exchange}` is replaced by `exchange`.
    #[serde(default = "default_dead_letter_exchange")]
    pub dead_letter_exchange: String,
}

impl Default for RabbitMqConfig {
    fn default() -> Self {
        RabbitMqConfig {
            url: None,
            urls: Vec::new(),
            exchange: String::new(),
            exchange_type: ExchangeKind::default(),
            prefetch: default_prefetch(),
            retry: RetryPolicy::default(),
            dead_letter_exchange: default_dead_letter_exchange(),
        }
    }
}

impl RabbitMqConfig {
    /// Every configured server URL: `url` first, then `urls`.
    pub fn all_urls(&self) -> impl Iterator<Item = &SecretUrl> {
        self.url.iter().chain(&self.urls)
    }
}

impl DriverTable for RabbitMqConfig {
    const TABLE: &'static str = "rabbitmq";
    const KEYS: &'static [(&'static str, ValueKind)] = &[
        ("url", ValueKind::Text),
        ("urls", ValueKind::List),
        ("exchange", ValueKind::Text),
        ("exchange_type", ValueKind::Text),
        ("prefetch", ValueKind::Integer),
        RETRY_KEYS[0],
        RETRY_KEYS[1],
        RETRY_KEYS[2],
        RETRY_KEYS[3],
        ("dead_letter_exchange", ValueKind::Text),
    ];

    fn validate(&self) -> Result<(), (String, String)> {
        if self.url.is_none() && self.urls.is_empty() {
            return Err(invalid("url", "missing; give `url` or `urls`"));
        }
        check_urls(self.url.iter(), "url", &["amqp", "amqps"])?;
        check_urls(self.urls.iter(), "urls", &["amqp", "amqps"])?;
        if self.exchange.is_empty() {
            return Err(invalid("exchange", "the exchange name is empty"));
        }
        if self.prefetch == 0 {
            return Err(invalid("prefetch", "must be at least 1"));
        }
        validate_retry(&self.retry)
    }
}
