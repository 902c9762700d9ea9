//! The settings table of each driver, one module per driver, and the checks they share.

mod kafka;
mod memory;
mod nats;
mod rabbitmq;
mod tls;

use super::ValueKind;
use super::secret::SecretUrl;
use crate::handler::RetryPolicy;

pub use kafka::{Assignor, KafkaCompression, KafkaConfig, KafkaSasl, SaslMechanism, StartOffset};
pub use memory::MemoryConfig;
pub use nats::{
    NatsConfig, NatsConsumerConfig, NatsDeliver, NatsMissingStream, NatsMode, NatsRetention,
    NatsStorage, NatsStreamConfig,
};
pub use rabbitmq::{ExchangeKind, RabbitMqConfig};
pub use tls::TlsConfig;

/// The keys of the `retry` table every driver has, for environment overrides.
const RETRY_KEYS: [(&str, ValueKind); 4] = [
    ("retry.attempts", ValueKind::Integer),
    ("retry.initial_backoff", ValueKind::Text),
    ("retry.max_backoff", ValueKind::Text),
    ("retry.multiplier", ValueKind::Float),
];

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
