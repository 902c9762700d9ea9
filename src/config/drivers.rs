//! The settings table of each driver.

use serde::Deserialize;

use super::secret::{Secret, SecretUrl};
use super::{DriverTable, ValueKind};
use crate::handler::RetryPolicy;

/// The keys of the `retry` table every driver has, for environment overrides.
const RETRY_KEYS: [(&str, ValueKind); 4] = [
    ("retry.attempts", ValueKind::Integer),
    ("retry.initial_backoff", ValueKind::Text),
    ("retry.max_backoff", ValueKind::Text),
    ("retry.multiplier", ValueKind::Float),
];

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

/// Which NATS a connection uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NatsMode {
    /// Core NATS: fast, at-most-once, nothing stored.
    #[default]
    Core,
    /// JetStream: stored, acknowledged, at-least-once.
    Jetstream,
}

/// `[brokers.<name>.nats]`: a NATS server or cluster.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// The server, `nats://host:port` (or `tls://`).
    #[serde(default)]
    pub url: Option<SecretUrl>,
    /// Several servers of a cluster (besides or instead of `url`).
    #[serde(default)]
    pub urls: Vec<SecretUrl>,
    /// Core NATS or JetStream.
    #[serde(default)]
    pub mode: NatsMode,
    /// A token to authenticate with.
    #[serde(default)]
    pub token: Option<Secret>,
    /// A user name, with `password`.
    #[serde(default)]
    pub user: Option<String>,
    /// The user's password.
    #[serde(default)]
    pub password: Option<Secret>,
    /// Retries of a failing handler before the message is dead-lettered.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// The subject failed messages go to; `{topic}` is replaced by their subject.
    #[serde(default = "default_dead_letter")]
    pub dead_letter_subject: String,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: None,
            urls: Vec::new(),
            mode: NatsMode::default(),
            token: None,
            user: None,
            password: None,
            retry: RetryPolicy::default(),
            dead_letter_subject: default_dead_letter(),
        }
    }
}

impl NatsConfig {
    /// Every configured server URL: `url` first, then `urls`.
    pub fn all_urls(&self) -> impl Iterator<Item = &SecretUrl> {
        self.url.iter().chain(&self.urls)
    }
}

impl DriverTable for NatsConfig {
    const TABLE: &'static str = "nats";
    const KEYS: &'static [(&'static str, ValueKind)] = &[
        ("url", ValueKind::Text),
        ("urls", ValueKind::List),
        ("mode", ValueKind::Text),
        ("token", ValueKind::Text),
        ("user", ValueKind::Text),
        ("password", ValueKind::Text),
        RETRY_KEYS[0],
        RETRY_KEYS[1],
        RETRY_KEYS[2],
        RETRY_KEYS[3],
        ("dead_letter_subject", ValueKind::Text),
    ];

    fn validate(&self) -> Result<(), (String, String)> {
        if self.url.is_none() && self.urls.is_empty() {
            return Err(invalid("url", "missing; give `url` or `urls`"));
        }
        let schemes = ["nats", "tls", "ws", "wss"];
        check_urls(self.url.iter(), "url", &schemes)?;
        check_urls(self.urls.iter(), "urls", &schemes)?;
        match (&self.user, &self.password) {
            (Some(_), None) => return Err(invalid("password", "`user` is set without it")),
            (None, Some(_)) => return Err(invalid("user", "`password` is set without it")),
            _ => {}
        }
        if self.token.is_some() && self.user.is_some() {
            return Err(invalid("token", "give either `token` or `user`, not both"));
        }
        validate_retry(&self.retry)
    }
}

/// `[brokers.<name>.memory]`: in-process topics. Every key is optional.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryConfig {
    /// How many messages each consumer group holds before `publish` waits for room.
    pub buffer: usize,
    /// Retries of a failing handler before the message is dead-lettered.
    pub retry: RetryPolicy,
    /// Where failed messages go; `{topic}` is replaced by their topic. Empty: nowhere.
    pub dead_letter_topic: String,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            buffer: 1024,
            retry: RetryPolicy::default(),
            dead_letter_topic: default_dead_letter(),
        }
    }
}

impl DriverTable for MemoryConfig {
    const TABLE: &'static str = "memory";
    const KEYS: &'static [(&'static str, ValueKind)] = &[
        ("buffer", ValueKind::Integer),
        RETRY_KEYS[0],
        RETRY_KEYS[1],
        RETRY_KEYS[2],
        RETRY_KEYS[3],
        ("dead_letter_topic", ValueKind::Text),
    ];

    fn validate(&self) -> Result<(), (String, String)> {
        if self.buffer == 0 {
            return Err(invalid("buffer", "must be at least 1"));
        }
        validate_retry(&self.retry)
    }
}

fn default_client_id() -> String {
    "broker".to_owned()
}

fn default_dead_letter() -> String {
    "{topic}.dlq".to_owned()
}

fn default_dead_letter_exchange() -> String {
    "{exchange}.dlx".to_owned()
}

fn default_prefetch() -> u16 {
    64
}

fn invalid(key: &str, message: &str) -> (String, String) {
    (key.to_owned(), message.to_owned())
}

fn validate_retry(retry: &RetryPolicy) -> Result<(), (String, String)> {
    if retry.attempts == 0 {
        return Err(invalid("retry.attempts", "must be at least 1"));
    }
    if !(retry.multiplier >= 1.0 && retry.multiplier.is_finite()) {
        return Err(invalid(
            "retry.multiplier",
            "must be a number of at least 1",
        ));
    }
    Ok(())
}

fn check_host_port(address: &str) -> Result<(), String> {
    let valid = address
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if valid {
        Ok(())
    } else {
        Err(format!("`{address}` is not host:port"))
    }
}

fn check_urls<'a>(
    urls: impl Iterator<Item = &'a SecretUrl>,
    key: &str,
    schemes: &[&str],
) -> Result<(), (String, String)> {
    for url in urls {
        if !schemes.contains(&url.scheme()) {
            return Err((
                key.to_owned(),
                format!(
                    "`{url}` has the scheme `{}`; expected {}",
                    url.scheme(),
                    schemes.join(" or ")
                ),
            ));
        }
        if url.expose().host_str().is_none_or(str::is_empty) {
            return Err((key.to_owned(), format!("`{url}` names no host")));
        }
    }
    Ok(())
}
