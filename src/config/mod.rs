//! Configuration: the TOML model, its validation and its environment overrides.
//!
//! ```toml
//! [brokers.user_events]
//! driver = "kafka"
//!
//! [brokers.user_events.kafka]
//! brokers = ["localhost:9092"]
//! group_id = "my_app_group"
//! ```
//!
//! Each connection is a table `[brokers.<name>]` with a `driver` (`kafka`, `rabbitmq`, `nats`
//! or `memory`) and a table named after that driver. The reference configuration,
//! `testdata/reference.toml`, lists every key with its default.
//!
//! Any value can be overridden from the environment: `BROKER_<CONNECTION>_<KEY>`, with the
//! connection name and the key path (driver table included) upper-cased and every `.` or `-`
//! turned into `_`. `BROKER_USER_EVENTS_KAFKA_BROKERS=host1:9092,host2:9092` replaces the
//! broker list of `user_events`; `BROKER_USER_EVENTS_KAFKA_RETRY_ATTEMPTS=5` sets
//! `retry.attempts`; `BROKER_USER_EVENTS_DRIVER=memory` switches the connection to the
//! in-memory driver. Lists are comma-separated. A variable that starts like a connection's
//! but names no key is an error, so a typo does not go unnoticed.

mod drivers;
mod env;
mod secret;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

pub use drivers::{
    Assignor, ExchangeKind, KafkaCompression, KafkaConfig, KafkaSasl, MemoryConfig, NatsConfig,
    NatsMode, RabbitMqConfig, SaslMechanism, StartOffset, TlsConfig,
};
pub use drivers::{
    NatsConsumerConfig, NatsDeliver, NatsMissingStream, NatsRetention, NatsStorage,
    NatsStreamConfig,
};
pub use secret::{Secret, SecretUrl};

/// The configuration of every named connection.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The connections by name.
    pub brokers: BTreeMap<String, DriverConfig>,
}

/// One connection's driver and its settings.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum DriverConfig {
    /// Apache Kafka.
    Kafka(KafkaConfig),
    /// RabbitMQ.
    RabbitMq(RabbitMqConfig),
    /// NATS, core or JetStream.
    Nats(NatsConfig),
    /// The in-process driver.
    Memory(MemoryConfig),
}

impl DriverConfig {
    /// The driver's name as written in `driver = "…"`.
    pub fn driver(&self) -> &'static str {
        match self {
            DriverConfig::Kafka(_) => "kafka",
            DriverConfig::RabbitMq(_) => "rabbitmq",
            DriverConfig::Nats(_) => "nats",
            DriverConfig::Memory(_) => "memory",
        }
    }
}

/// The drivers a connection can name.
pub const DRIVERS: &[&str] = &["kafka", "rabbitmq", "nats", "memory"];

impl Config {
    /// Reads `path`, applies the process environment's overrides, and validates the result.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|error| {
            ConfigError::new(
                ConfigErrorKind::Io,
                format!("cannot read the file: {error}"),
            )
            .in_file(path)
        })?;
        Config::parse(&text, &env::process_overrides()).map_err(|error| error.in_file(path))
    }

    /// Parses TOML text, applies the process environment's overrides, and validates the result.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, &env::process_overrides())
    }

    /// Parses TOML text with overrides taken from `vars` instead of the process environment
    /// (only variables starting with `BROKER_` are read).
    pub fn from_toml_with_env(
        text: &str,
        vars: &BTreeMap<String, String>,
    ) -> Result<Config, ConfigError> {
        Config::parse(text, vars)
    }

    fn parse(text: &str, vars: &BTreeMap<String, String>) -> Result<Config, ConfigError> {
        let mut document: toml::Table = text.parse().map_err(|error: toml::de::Error| {
            ConfigError::new(ConfigErrorKind::Syntax, error.message().to_owned())
                .at_line(text, error.span())
        })?;

        if let Some(key) = document.keys().find(|key| *key != "brokers") {
            return Err(ConfigError::new(
                ConfigErrorKind::UnknownKey,
                "unknown top-level key; connections go in [brokers.<name>] tables",
            )
            .key(key));
        }
        let connections = match document.get_mut("brokers") {
            Some(toml::Value::Table(connections)) => connections,
            Some(_) => {
                return Err(ConfigError::new(
                    ConfigErrorKind::InvalidValue,
                    "expected a table of connections",
                )
                .key("brokers"));
            }
            None => {
                return Err(ConfigError::new(
                    ConfigErrorKind::MissingKey,
                    "no connections: add a [brokers.<name>] table",
                )
                .key("brokers"));
            }
        };

        env::apply(connections, vars)?;

        let mut brokers = BTreeMap::new();
        for (name, value) in connections.iter() {
            let connection = parse_connection(value).map_err(|error| error.connection(name))?;
            brokers.insert(name.clone(), connection);
        }
        Ok(Config { brokers })
    }
}

/// The settings of one driver's table, as the parser and the environment overrides see them.
trait DriverTable: DeserializeOwned + Default {
    /// The table's name, which is also the driver's.
    const TABLE: &'static str;

    /// Every key of the table (dotted for nested tables) and the kind of value it takes.
    const KEYS: &'static [(&'static str, ValueKind)];

    /// Checks what serde cannot: empty lists, URL schemes, pairs of keys. Errors give the key
    /// within the table.
    fn validate(&self) -> Result<(), (String, String)>;
}

/// The kind of value a key takes, to read it from an environment variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ValueKind {
    Text,
    Integer,
    Float,
    Boolean,
    List,
}

fn parse_connection(value: &toml::Value) -> Result<DriverConfig, ConfigError> {
    let Some(table) = value.as_table() else {
        return Err(ConfigError::new(
            ConfigErrorKind::InvalidValue,
            "expected a table with `driver` and the driver's settings",
        ));
    };

    if let Some(key) = table
        .keys()
        .find(|key| *key != "driver" && !DRIVERS.contains(&key.as_str()))
    {
        return Err(ConfigError::new(
            ConfigErrorKind::UnknownKey,
            format!(
                "unknown key; a connection has `driver` and one of the tables {}",
                DRIVERS.join(", ")
            ),
        )
        .key(key));
    }

    let driver = match table.get("driver") {
        None => {
            return Err(ConfigError::new(
                ConfigErrorKind::MissingKey,
                format!("missing; expected one of {}", DRIVERS.join(", ")),
            )
            .key("driver"));
        }
        Some(toml::Value::String(driver)) if DRIVERS.contains(&driver.as_str()) => driver.as_str(),
        Some(other) => {
            return Err(ConfigError::new(
                ConfigErrorKind::UnknownDriver,
                format!(
                    "unknown driver {other}; expected one of {}",
                    DRIVERS.join(", ")
                ),
            )
            .key("driver"));
        }
    };

    if let Some(other) = DRIVERS
        .iter()
        .find(|table_name| **table_name != driver && table.contains_key(**table_name))
    {
        return Err(ConfigError::new(
            ConfigErrorKind::DriverMismatch,
            format!("the table `{other}` does not match driver = \"{driver}\""),
        )
        .key(*other));
    }

    Ok(match driver {
        "kafka" => DriverConfig::Kafka(parse_table(table)?),
        "rabbitmq" => DriverConfig::RabbitMq(parse_table(table)?),
        "nats" => DriverConfig::Nats(parse_table(table)?),
        _ => DriverConfig::Memory(parse_table(table)?),
    })
}

fn parse_table<T: DriverTable>(connection: &toml::Table) -> Result<T, ConfigError> {
    let settings = match connection.get(T::TABLE) {
        Some(value) => {
            let deserializer = value.clone();
            serde_path_to_error::deserialize(deserializer).map_err(|error| {
                let path = error.path().to_string();
                let message = error.inner().message().to_owned();
                serde_error(T::TABLE, &path, message)
            })?
        }
        // The in-memory driver works with no settings at all; the others need an address.
        None if T::TABLE == "memory" => T::default(),
        None => {
            return Err(ConfigError::new(
                ConfigErrorKind::MissingKey,
                format!(
                    "missing the [{}] table with the driver's settings",
                    T::TABLE
                ),
            )
            .key(T::TABLE));
        }
    };

    settings.validate().map_err(|(key, message)| {
        ConfigError::new(ConfigErrorKind::InvalidValue, message).key(format!("{}.{key}", T::TABLE))
    })?;
    Ok(settings)
}

/// Turns a serde error inside a driver table into one that names the full key.
fn serde_error(table: &str, path: &str, message: String) -> ConfigError {
    let mut key = table.to_owned();
    if !path.is_empty() && path != "." {
        key = format!("{key}.{path}");
    }

    let field = |prefix: &str| {
        message
            .strip_prefix(prefix)
            .and_then(|rest| rest.split('`').next())
            .map(str::to_owned)
    };
    // The path already ends in an unknown field, but stops at the table that misses a field.
    if field("unknown field `").is_some() {
        ConfigError::new(ConfigErrorKind::UnknownKey, message).key(key)
    } else if let Some(field) = field("missing field `") {
        ConfigError::new(ConfigErrorKind::MissingKey, message).key(format!("{key}.{field}"))
    } else {
        ConfigError::new(ConfigErrorKind::InvalidValue, message).key(key)
    }
}

/// What kind of mistake a [`ConfigError`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigErrorKind {
    /// The file could not be read.
    Io,
    /// The text is not valid TOML.
    Syntax,
    /// A key that is not part of the configuration.
    UnknownKey,
    /// A required key is missing.
    MissingKey,
    /// `driver` names no known driver.
    UnknownDriver,
    /// A driver table that does not match the connection's `driver`.
    DriverMismatch,
    /// A value of the wrong type or out of range: a bad URL, an empty broker list.
    InvalidValue,
}

/// An invalid configuration: what is wrong, and in which file, connection and key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    kind: ConfigErrorKind,
    file: Option<PathBuf>,
    connection: Option<String>,
    key: Option<String>,
    message: String,
}

impl ConfigError {
    fn new(kind: ConfigErrorKind, message: impl Into<String>) -> Self {
        ConfigError {
            kind,
            file: None,
            connection: None,
            key: None,
            message: message.into(),
        }
    }

    /// An invalid value found while connecting, such as an unreadable certificate file.
    #[cfg(feature = "tls")]
    pub(crate) fn invalid_value(connection: &str, key: &str, message: impl Into<String>) -> Self {
        ConfigError::new(ConfigErrorKind::InvalidValue, message)
            .connection(connection)
            .key(key)
    }

    fn in_file(mut self, file: &Path) -> Self {
        self.file.get_or_insert_with(|| file.to_owned());
        self
    }

    fn connection(mut self, connection: &str) -> Self {
        self.connection.get_or_insert_with(|| connection.to_owned());
        self
    }

    fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    fn at_line(mut self, text: &str, span: Option<std::ops::Range<usize>>) -> Self {
        if let Some(span) = span {
            let line = text[..span.start.min(text.len())].lines().count().max(1);
            self.message = format!("line {line}: {}", self.message);
        }
        self
    }

    /// What kind of mistake this is.
    pub fn kind(&self) -> ConfigErrorKind {
        self.kind
    }

    /// The file, when the configuration came from one.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// The connection's name, when the mistake is inside one.
    pub fn connection_name(&self) -> Option<&str> {
        self.connection.as_deref()
    }

    /// The key, dotted from the connection's table (for example `kafka.brokers`).
    pub fn key_path(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// What is wrong.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("invalid configuration")?;
        if let Some(file) = &self.file {
            write!(f, " in {}", file.display())?;
        }
        if let Some(connection) = &self.connection {
            write!(f, ", connection `{connection}`")?;
        }
        if let Some(key) = &self.key {
            write!(f, ", key `{key}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference configuration documents every key that environment overrides know of.
    #[test]
    fn the_reference_configuration_shows_every_key() {
        let reference: toml::Table = include_str!("../../testdata/reference.toml")
            .parse()
            .unwrap();
        let connections = reference["brokers"].as_table().unwrap();

        fn check<T: DriverTable>(connections: &toml::Table) {
            let tables: Vec<_> = connections
                .values()
                .filter_map(|connection| connection.get(T::TABLE))
                .collect();
            for (key, _) in T::KEYS {
                let found = tables.iter().any(|table| {
                    key.split('.')
                        .try_fold(*table, |value, part| value.get(part))
                        .is_some()
                });
                assert!(found, "{}.{key} is missing from the reference", T::TABLE);
            }
        }
        check::<KafkaConfig>(connections);
        check::<RabbitMqConfig>(connections);
        check::<NatsConfig>(connections);
        check::<MemoryConfig>(connections);
    }
}
