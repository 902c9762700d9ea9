//! `[brokers.<name>.rabbitmq]`.

use std::time::Duration;

use serde::Deserialize;

use super::tls::{self, TLS_KEYS, TlsConfig};
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
    /// The server, `amqp://user:password@host:port/vhost`, or `amqps://…` for TLS (port 5671
    /// by default; needs the crate's `tls` feature).
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
    /// How many handlers of one subscription run at once (at most `prefetch`); with 1, messages
    /// are handled one at a time in the order they arrive.
    #[serde(default = "default_concurrency")]
    pub concurrency: u16,
    /// Retries of a failing handler before the message is dead-lettered.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// The exchange failed messages go to; `{exchange}` is replaced by `exchange`.
    #[serde(default = "default_dead_letter_exchange")]
    pub dead_letter_exchange: String,
    /// The routing key failed messages are published with to the dead-letter exchange;
    /// `{topic}` is replaced by the subscription's topic.
    #[serde(default = "default_dead_letter")]
    pub dead_letter_topic: String,
    /// Whether each subscription declares a durable queue named after its dead-letter topic,
    /// bound to the dead-letter exchange, where failed messages wait to be read.
    #[serde(default = "default_true")]
    pub dead_letter_queue: bool,
    /// The name of a consumer group's durable queue; `{topic}` and `{group}` are replaced.
    #[serde(default = "default_queue")]
    pub queue: String,
    /// How long a consumer group's queue may go unused (no consumer) before the server deletes
    /// it, with the messages in it; zero keeps it forever.
    #[serde(default, with = "humantime_serde")]
    pub queue_expires: Duration,
    /// Whether `publish` waits for the broker's publisher confirm.
    #[serde(default = "default_true")]
    pub confirms: bool,
    /// The heartbeat interval asked of the server, in whole seconds; the smaller of this and the
    /// server's wins, and zero takes the server's. A connection that misses two heartbeats is
    /// considered lost.
    #[serde(default = "default_heartbeat", with = "humantime_serde")]
    pub heartbeat: Duration,
    /// The name the connection shows in the management UI; empty for the connection's own
    /// name.
    #[serde(default)]
    pub connection_name: String,
    /// The first wait before reconnecting after the connection was lost.
    #[serde(default = "default_reconnect_backoff", with = "humantime_serde")]
    pub reconnect_backoff: Duration,
    /// The longest wait between two reconnection attempts.
    #[serde(default = "default_reconnect_max_backoff", with = "humantime_serde")]
    pub reconnect_max_backoff: Duration,
    /// How `amqps://` servers are checked and which client certificate they are shown. When
    /// absent, `amqps://` servers are checked against the system's trusted roots; when present
    /// and enabled, every URL must be `amqps://`.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

fn default_concurrency() -> u16 {
    1
}

fn default_queue() -> String {
    "{topic}.{group}".to_owned()
}

fn default_true() -> bool {
    true
}

fn default_heartbeat() -> Duration {
    Duration::from_secs(60)
}

fn default_reconnect_backoff() -> Duration {
    Duration::from_millis(100)
}

fn default_reconnect_max_backoff() -> Duration {
    Duration::from_secs(10)
}

/// AMQP short strings (names, routing keys) hold at most this many bytes.
const MAX_NAME_BYTES: usize = 255;

impl Default for RabbitMqConfig {
    fn default() -> Self {
        RabbitMqConfig {
            url: None,
            urls: Vec::new(),
            exchange: String::new(),
            exchange_type: ExchangeKind::default(),
            prefetch: default_prefetch(),
            concurrency: default_concurrency(),
            retry: RetryPolicy::default(),
            dead_letter_exchange: default_dead_letter_exchange(),
            dead_letter_topic: default_dead_letter(),
            dead_letter_queue: true,
            queue: default_queue(),
            queue_expires: Duration::ZERO,
            confirms: true,
            heartbeat: default_heartbeat(),
            connection_name: String::new(),
            reconnect_backoff: default_reconnect_backoff(),
            reconnect_max_backoff: default_reconnect_max_backoff(),
            tls: None,
        }
    }
}

impl RabbitMqConfig {
    /// Every configured server URL: `url` first, then `urls`.
    pub fn all_urls(&self) -> impl Iterator<Item = &SecretUrl> {
        self.url.iter().chain(&self.urls)
    }

    /// The TLS settings of `amqps://` URLs, when the `tls` table is present and enabled.
    pub fn tls(&self) -> Option<&TlsConfig> {
        tls::active(self.tls.as_ref())
    }

    /// The dead-letter exchange's name, with `{exchange}` replaced.
    pub fn dead_letter_exchange_name(&self) -> String {
        self.dead_letter_exchange
            .replace("{exchange}", &self.exchange)
    }

    /// Checks the settings as the configuration parser does, for settings built in code:
    /// `Err` holds the key at fault and what is wrong with it.
    pub fn check(&self) -> Result<(), (String, String)> {
        DriverTable::validate(self)
    }

    /// The routing key of the dead letters of `topic`.
    pub fn dead_letter_topic_for(&self, topic: &str) -> String {
        self.dead_letter_topic.replace("{topic}", topic)
    }

    /// The durable queue of consumer group `group` on `topic`.
    pub fn queue_name(&self, topic: &str, group: &str) -> String {
        self.queue
            .replace("{topic}", topic)
            .replace("{group}", group)
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
        ("concurrency", ValueKind::Integer),
        RETRY_KEYS[0],
        RETRY_KEYS[1],
        RETRY_KEYS[2],
        RETRY_KEYS[3],
        ("dead_letter_exchange", ValueKind::Text),
        ("dead_letter_topic", ValueKind::Text),
        ("dead_letter_queue", ValueKind::Boolean),
        ("queue", ValueKind::Text),
        ("queue_expires", ValueKind::Text),
        ("confirms", ValueKind::Boolean),
        ("heartbeat", ValueKind::Text),
        ("connection_name", ValueKind::Text),
        ("reconnect_backoff", ValueKind::Text),
        ("reconnect_max_backoff", ValueKind::Text),
        TLS_KEYS[0],
        TLS_KEYS[1],
        TLS_KEYS[2],
        TLS_KEYS[3],
        TLS_KEYS[4],
    ];

    fn validate(&self) -> Result<(), (String, String)> {
        if self.url.is_none() && self.urls.is_empty() {
            return Err(invalid("url", "missing; give `url` or `urls`"));
        }
        check_urls(self.url.iter(), "url", &["amqp", "amqps"])?;
        check_urls(self.urls.iter(), "urls", &["amqp", "amqps"])?;
        tls::validate(self.tls.as_ref())?;
        if self.tls().is_some() {
            // TLS is chosen per URL, as every AMQP client does; a table that would silently
            // not apply to a plain URL is a mistake worth reporting.
            for (key, url) in self
                .url
                .iter()
                .map(|url| ("url", url))
                .chain(self.urls.iter().map(|url| ("urls", url)))
            {
                if url.scheme() != "amqps" {
                    return Err(invalid(
                        key,
                        &format!("`{url}` is not amqps://, so the tls table would not apply to it"),
                    ));
                }
            }
        }
        if self.exchange.is_empty() {
            return Err(invalid("exchange", "the exchange name is empty"));
        }
        if self.exchange.len() > MAX_NAME_BYTES {
            return Err(invalid("exchange", "longer than 255 bytes"));
        }
        if self.dead_letter_exchange_name().len() > MAX_NAME_BYTES {
            return Err(invalid("dead_letter_exchange", "longer than 255 bytes"));
        }
        if self.dead_letter_exchange_name() == self.exchange
            && (self.exchange_type == ExchangeKind::Fanout || self.dead_letter_topic == "{topic}")
        {
            return Err(invalid(
                "dead_letter_exchange",
                "dead letters would go back to the queues they failed in; use another exchange \
                 or a `dead_letter_topic` that differs from the topic",
            ));
        }
        if !self.queue.contains("{group}") {
            return Err(invalid(
                "queue",
                "must contain `{group}`, or every group would share one queue",
            ));
        }
        if u32::try_from(self.queue_expires.as_millis()).is_err() {
            return Err(invalid("queue_expires", "at most 49 days"));
        }
        if self.heartbeat.as_secs() > u64::from(u16::MAX) || self.heartbeat.subsec_nanos() != 0 {
            return Err(invalid("heartbeat", "whole seconds, at most 65535"));
        }
        if self.connection_name.len() > MAX_NAME_BYTES {
            return Err(invalid("connection_name", "longer than 255 bytes"));
        }
        if self.reconnect_backoff > self.reconnect_max_backoff {
            return Err(invalid(
                "reconnect_backoff",
                "longer than `reconnect_max_backoff`",
            ));
        }
        for url in self.all_urls() {
            let vhost = url.expose().path().trim_start_matches('/');
            if vhost.len() > MAX_NAME_BYTES {
                return Err(invalid("url", "the virtual host is longer than 255 bytes"));
            }
        }
        if self.prefetch == 0 {
            return Err(invalid("prefetch", "must be at least 1"));
        }
        if self.concurrency == 0 || self.concurrency > self.prefetch {
            return Err(invalid(
                "concurrency",
                "must be at least 1 and at most `prefetch`",
            ));
        }
        validate_retry(&self.retry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> RabbitMqConfig {
        RabbitMqConfig {
            url: SecretUrl::parse("amqp://guest:guest@localhost:5672/%2f").ok(),
            exchange: "orders".to_owned(),
            ..RabbitMqConfig::default()
        }
    }

    fn key_of(config: &RabbitMqConfig) -> Option<String> {
        config.validate().err().map(|(key, _)| key)
    }

    #[test]
    fn names_are_built_from_their_templates() {
        let config = valid();

        assert_eq!(config.queue_name("created", "billing"), "created.billing");
        assert_eq!(config.dead_letter_exchange_name(), "orders.dlx");
        assert_eq!(config.dead_letter_topic_for("created"), "created.dlq");
        assert_eq!(key_of(&config), None);
    }

    #[test]
    fn invalid_settings_name_their_key() {
        let shared_queue = RabbitMqConfig {
            queue: "{topic}".to_owned(),
            ..valid()
        };
        let looping = RabbitMqConfig {
            dead_letter_exchange: "{exchange}".to_owned(),
            dead_letter_topic: "{topic}".to_owned(),
            ..valid()
        };
        let long_name = RabbitMqConfig {
            connection_name: "n".repeat(300),
            ..valid()
        };
        let slow_first = RabbitMqConfig {
            reconnect_backoff: Duration::from_secs(60),
            ..valid()
        };

        assert_eq!(key_of(&shared_queue).as_deref(), Some("queue"));
        assert_eq!(key_of(&looping).as_deref(), Some("dead_letter_exchange"));
        assert_eq!(key_of(&long_name).as_deref(), Some("connection_name"));
        assert_eq!(key_of(&slow_first).as_deref(), Some("reconnect_backoff"));
    }

    #[test]
    fn dead_letters_may_be_a_topic_of_the_same_exchange() {
        let config = RabbitMqConfig {
            dead_letter_exchange: "{exchange}".to_owned(),
            ..valid()
        };

        assert_eq!(key_of(&config), None);
    }
}
