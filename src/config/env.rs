//! Environment overrides: `BROKER_<CONNECTION>_<KEY>` replaces a connection's value.

use std::collections::BTreeMap;

use super::drivers::{KafkaConfig, MemoryConfig, NatsConfig, RabbitMqConfig};
use super::{ConfigError, ConfigErrorKind, DriverTable, ValueKind};

const PREFIX: &str = "BROKER_";

/// The process's variables that start with `BROKER_`.
pub(super) fn process_overrides() -> BTreeMap<String, String> {
    std::env::vars()
        .filter(|(name, _)| name.starts_with(PREFIX))
        .collect()
}

/// Writes every override in `vars` into the connections' tables.
pub(super) fn apply(
    connections: &mut toml::Table,
    vars: &BTreeMap<String, String>,
) -> Result<(), ConfigError> {
    let mut used = Vec::new();
    let mut prefixes = Vec::new();

    for (name, connection) in connections.iter_mut() {
        let Some(connection) = connection.as_table_mut() else {
            continue;
        };
        let prefix = format!("{PREFIX}{}_", env_name(name));

        let driver_var = format!("{prefix}DRIVER");
        if let Some(driver) = vars.get(&driver_var) {
            connection.insert("driver".to_owned(), toml::Value::String(driver.clone()));
            used.push(driver_var);
        }

        let driver = connection.get("driver").and_then(toml::Value::as_str);
        if let Some((table, keys)) = driver.and_then(keys_of) {
            for (key, kind) in keys {
                let path = format!("{table}.{key}");
                let var = format!("{prefix}{}", env_name(&path));
                if let Some(text) = vars.get(&var) {
                    let value = parse_value(text, *kind).map_err(|message| {
                        ConfigError::new(
                            ConfigErrorKind::InvalidValue,
                            format!("from the environment variable {var}: {message}"),
                        )
                        .connection(name)
                        .key(&path)
                    })?;
                    set(connection, &path, value);
                    used.push(var);
                }
            }
        }
        prefixes.push((name.clone(), prefix));
    }

    for var in vars.keys().filter(|var| !used.contains(var)) {
        if let Some((name, _)) = prefixes.iter().find(|(_, prefix)| var.starts_with(prefix)) {
            return Err(ConfigError::new(
                ConfigErrorKind::UnknownKey,
                format!("the environment variable {var} names no key of this connection"),
            )
            .connection(name)
            .key(var.clone()));
        }
    }
    Ok(())
}

/// The table and keys of the driver named `driver`.
fn keys_of(driver: &str) -> Option<(&'static str, &'static [(&'static str, ValueKind)])> {
    fn of<T: DriverTable>() -> (&'static str, &'static [(&'static str, ValueKind)]) {
        (T::TABLE, T::KEYS)
    }
    match driver {
        "kafka" => Some(of::<KafkaConfig>()),
        "rabbitmq" => Some(of::<RabbitMqConfig>()),
        "nats" => Some(of::<NatsConfig>()),
        "memory" => Some(of::<MemoryConfig>()),
        _ => None,
    }
}

/// `user-events.kafka.group_id` → `USER_EVENTS_KAFKA_GROUP_ID`.
fn env_name(path: &str) -> String {
    path.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

fn parse_value(text: &str, kind: ValueKind) -> Result<toml::Value, String> {
    Ok(match kind {
        ValueKind::Text => toml::Value::String(text.to_owned()),
        ValueKind::Integer => toml::Value::Integer(
            text.trim()
                .parse()
                .map_err(|_| format!("`{text}` is not a whole number"))?,
        ),
        ValueKind::Float => toml::Value::Float(
            text.trim()
                .parse()
                .map_err(|_| format!("`{text}` is not a number"))?,
        ),
        ValueKind::Boolean => toml::Value::Boolean(
            text.trim()
                .parse()
                .map_err(|_| format!("`{text}` is not true or false"))?,
        ),
        ValueKind::List => toml::Value::Array(
            text.split(',')
                .map(str::trim)
                .filter(|item| !item.is_empty())
                .map(|item| toml::Value::String(item.to_owned()))
                .collect(),
        ),
    })
}

/// Sets the dotted `path` in `table`, creating the tables on the way.
fn set(table: &mut toml::Table, path: &str, value: toml::Value) {
    let (parents, last) = match path.rsplit_once('.') {
        Some((parents, last)) => (Some(parents), last),
        None => (None, path),
    };
    let mut current = table;
    for part in parents.into_iter().flat_map(|parents| parents.split('.')) {
        let entry = current
            .entry(part.to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        current = entry.as_table_mut().expect("made a table just above");
    }
    current.insert(last.to_owned(), value);
}
