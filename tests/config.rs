//! Configuration files: the shipped ones parse, every mistake names its file, connection and
//! key, environment variables override values, and secrets stay out of `Debug` and logs.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use broker::config::{DriverConfig, NatsMode};
use broker::{Config, ConfigError, ConfigErrorKind, Error, Manager};

fn path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn load(relative: &str) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path(relative)).unwrap();
    Config::from_toml_with_env(&text, &BTreeMap::new())
}

fn invalid(name: &str) -> ConfigError {
    let file = path(&format!("testdata/invalid/{name}"));
    match Config::from_file(&file) {
        Ok(config) => panic!("{name} was accepted: {config:?}"),
        Err(error) => {
            assert_eq!(error.file(), Some(file.as_path()), "{error}");
            assert!(
                error.to_string().contains(name),
                "the message names the file: {error}"
            );
            error
        }
    }
}

fn assert_names(error: &ConfigError, kind: ConfigErrorKind, connection: &str, key: &str) {
    assert_eq!(error.kind(), kind, "{error}");
    assert_eq!(error.connection_name(), Some(connection), "{error}");
    assert_eq!(error.key_path(), Some(key), "{error}");
    let message = error.to_string();
    assert!(message.contains(connection), "{message}");
    assert!(message.contains(key), "{message}");
}

#[test]
fn the_example_configuration_has_the_three_connections() {
    let config = load("config.toml").unwrap();

    let DriverConfig::Kafka(kafka) = &config.brokers["user_events"] else {
        panic!("user_events is not kafka: {config:?}");
    };
    assert_eq!(kafka.brokers, ["localhost:9092"]);
    assert_eq!(kafka.group_id.as_deref(), Some("my_app_group"));

    let DriverConfig::RabbitMq(rabbitmq) = &config.brokers["notifications"] else {
        panic!("notifications is not rabbitmq: {config:?}");
    };
    assert_eq!(rabbitmq.exchange, "app_exchange");
    assert_eq!(
        rabbitmq.url.as_ref().unwrap().expose().as_str(),
        "amqp://guest:guest@localhost:5672/"
    );

    let DriverConfig::Nats(nats) = &config.brokers["system_logs"] else {
        panic!("system_logs is not nats: {config:?}");
    };
    assert_eq!(nats.url.as_ref().unwrap().host_port(), "localhost:4222");
    assert_eq!(nats.mode, NatsMode::Core);
}

#[test]
fn the_reference_and_memory_configurations_parse() {
    let reference = load("testdata/reference.toml").unwrap();
    let memory = load("testdata/memory.toml").unwrap();

    let drivers: Vec<_> = reference
        .brokers
        .values()
        .map(DriverConfig::driver)
        .collect();
    assert_eq!(
        drivers,
        [
            "kafka", "memory", "nats", "nats", "nats", "nats", "nats", "rabbitmq", "rabbitmq"
        ]
    );
    assert!(memory.brokers.values().all(|c| c.driver() == "memory"));
}

#[test]
fn an_unknown_key_is_named() {
    let error = invalid("unknown_key.toml");
    assert_names(
        &error,
        ConfigErrorKind::UnknownKey,
        "user_events",
        "kafka.group",
    );
}

#[test]
fn a_missing_key_is_named() {
    let error = invalid("missing_key.toml");
    assert_names(
        &error,
        ConfigErrorKind::MissingKey,
        "user_events",
        "kafka.brokers",
    );
}

#[test]
fn a_missing_driver_is_named() {
    let error = invalid("missing_driver.toml");
    assert_names(
        &error,
        ConfigErrorKind::MissingKey,
        "notifications",
        "driver",
    );
}

#[test]
fn a_driver_table_that_does_not_match_the_driver_is_named() {
    let error = invalid("driver_mismatch.toml");
    assert_names(
        &error,
        ConfigErrorKind::DriverMismatch,
        "notifications",
        "rabbitmq",
    );
}

#[test]
fn an_unknown_driver_is_named() {
    let error = invalid("unknown_driver.toml");
    assert_names(
        &error,
        ConfigErrorKind::UnknownDriver,
        "notifications",
        "driver",
    );
    assert!(error.message().contains("activemq"), "{error}");
}

#[test]
fn a_url_with_the_wrong_scheme_is_named_without_its_password() {
    let error = invalid("bad_url.toml");
    assert_names(
        &error,
        ConfigErrorKind::InvalidValue,
        "notifications",
        "rabbitmq.url",
    );
    assert!(error.message().contains("http"), "{error}");
    assert!(!error.to_string().contains("guest:guest"), "{error}");
}

#[test]
fn a_url_without_a_host_is_named() {
    let error = invalid("unparsable_url.toml");
    assert_names(
        &error,
        ConfigErrorKind::InvalidValue,
        "system_logs",
        "nats.url",
    );
}

#[test]
fn an_empty_broker_list_is_named() {
    let error = invalid("empty_brokers.toml");
    assert_names(
        &error,
        ConfigErrorKind::InvalidValue,
        "user_events",
        "kafka.brokers",
    );
}

#[test]
fn a_client_certificate_without_its_key_is_named() {
    let error = invalid("tls_certificate_without_key.toml");
    assert_names(
        &error,
        ConfigErrorKind::InvalidValue,
        "user_events",
        "kafka.tls.key_file",
    );
}

#[test]
fn a_tls_table_beside_a_plain_amqp_url_is_named() {
    let error = invalid("tls_table_with_plain_url.toml");
    assert_names(
        &error,
        ConfigErrorKind::InvalidValue,
        "notifications",
        "rabbitmq.url",
    );
}

#[test]
fn a_broker_address_without_port_is_named() {
    let error = invalid("bad_broker_address.toml");
    assert_names(
        &error,
        ConfigErrorKind::InvalidValue,
        "user_events",
        "kafka.brokers[1]",
    );
    assert!(error.message().contains("kafka-without-port"), "{error}");
}

#[test]
fn a_bad_duration_is_named() {
    let error = invalid("bad_duration.toml");
    assert_names(
        &error,
        ConfigErrorKind::InvalidValue,
        "local",
        "memory.retry.initial_backoff",
    );
}

#[test]
fn a_syntax_error_gives_its_line() {
    let error = invalid("syntax.toml");
    assert_eq!(error.kind(), ConfigErrorKind::Syntax);
    assert!(error.message().contains("line 3"), "{error}");
}

#[test]
fn a_file_without_connections_is_an_error() {
    let error = invalid("no_connections.toml");
    assert_eq!(error.kind(), ConfigErrorKind::MissingKey);
    assert_eq!(error.key_path(), Some("brokers"));
}

#[test]
fn a_missing_file_is_named() {
    let missing = path("testdata/does-not-exist.toml");
    let error = Config::from_file(&missing).unwrap_err();

    assert_eq!(error.kind(), ConfigErrorKind::Io);
    assert!(error.to_string().contains("does-not-exist.toml"), "{error}");
}

fn with_env(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path("config.toml")).unwrap();
    let vars = vars
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect();
    Config::from_toml_with_env(&text, &vars)
}

#[test]
fn environment_variables_override_values() {
    let config = with_env(&[
        ("BROKER_USER_EVENTS_KAFKA_BROKERS", "host1:9092, host2:9092"),
        ("BROKER_USER_EVENTS_KAFKA_RETRY_ATTEMPTS", "7"),
        ("BROKER_USER_EVENTS_KAFKA_RETRY_INITIAL_BACKOFF", "1s"),
        ("BROKER_SYSTEM_LOGS_NATS_MODE", "jetstream"),
        ("BROKER_SYSTEM_LOGS_NATS_URL", "nats://10.1.2.3:4223"),
        ("UNRELATED_VARIABLE", "ignored"),
    ])
    .unwrap();

    let DriverConfig::Kafka(kafka) = &config.brokers["user_events"] else {
        panic!("{config:?}")
    };
    assert_eq!(kafka.brokers, ["host1:9092", "host2:9092"]);
    assert_eq!(kafka.retry.attempts, 7);
    assert_eq!(kafka.retry.initial_backoff, Duration::from_secs(1));
    assert_eq!(kafka.group_id.as_deref(), Some("my_app_group"));

    let DriverConfig::Nats(nats) = &config.brokers["system_logs"] else {
        panic!("{config:?}")
    };
    assert_eq!(nats.mode, NatsMode::Jetstream);
    assert_eq!(nats.url.as_ref().unwrap().host_port(), "10.1.2.3:4223");
}

#[test]
fn environment_variables_turn_tls_on_and_off() {
    let config = with_env(&[
        ("BROKER_USER_EVENTS_KAFKA_TLS_CA_FILE", "/etc/kafka/ca.pem"),
        ("BROKER_USER_EVENTS_KAFKA_TLS_SERVER_NAME", "kafka.internal"),
        ("BROKER_SYSTEM_LOGS_NATS_TLS_ENABLED", "false"),
    ])
    .unwrap();

    let DriverConfig::Kafka(kafka) = &config.brokers["user_events"] else {
        panic!("{config:?}")
    };
    let tls = kafka.tls().expect("a tls key turns TLS on");
    assert_eq!(tls.ca_file.as_deref(), Some(Path::new("/etc/kafka/ca.pem")));
    assert_eq!(tls.server_name.as_deref(), Some("kafka.internal"));

    let DriverConfig::Nats(nats) = &config.brokers["system_logs"] else {
        panic!("{config:?}")
    };
    assert!(nats.tls().is_none(), "enabled = false turns it off");
}

#[test]
fn an_environment_variable_can_switch_a_connection_to_memory() {
    let config = with_env(&[("BROKER_NOTIFICATIONS_DRIVER", "memory")]);

    // The rabbitmq table no longer matches the driver, and the error says so.
    let error = config.unwrap_err();
    assert_names(
        &error,
        ConfigErrorKind::DriverMismatch,
        "notifications",
        "rabbitmq",
    );

    let text = std::fs::read_to_string(path("testdata/memory.toml")).unwrap();
    let vars = BTreeMap::from([(
        "BROKER_USER_EVENTS_MEMORY_BUFFER".to_owned(),
        "8".to_owned(),
    )]);
    let config = Config::from_toml_with_env(&text, &vars).unwrap();
    let DriverConfig::Memory(memory) = &config.brokers["user_events"] else {
        panic!("{config:?}")
    };
    assert_eq!(memory.buffer, 8);
}

#[test]
fn a_misspelled_environment_variable_is_an_error() {
    let error = with_env(&[("BROKER_USER_EVENTS_KAFKA_BROKER", "host:9092")]).unwrap_err();

    assert_names(
        &error,
        ConfigErrorKind::UnknownKey,
        "user_events",
        "BROKER_USER_EVENTS_KAFKA_BROKER",
    );
}

#[test]
fn an_environment_value_of_the_wrong_kind_is_named() {
    let error = with_env(&[("BROKER_USER_EVENTS_KAFKA_RETRY_ATTEMPTS", "many")]).unwrap_err();

    assert_names(
        &error,
        ConfigErrorKind::InvalidValue,
        "user_events",
        "kafka.retry.attempts",
    );
    assert!(
        error
            .message()
            .contains("BROKER_USER_EVENTS_KAFKA_RETRY_ATTEMPTS"),
        "{error}"
    );
}

const SECRETS: [&str; 2] = ["rabbit-secret-password", "nats-secret-token"];

#[test]
fn secrets_never_appear_in_debug_output() {
    let config = Config::from_file(path("testdata/secrets.toml")).unwrap();

    let debug = format!("{config:?} {config:#?}");
    for secret in SECRETS {
        assert!(!debug.contains(secret), "{secret} leaked: {debug}");
    }
    assert!(debug.contains("***"), "{debug}");
}

/// A writer for log output that keeps everything in memory.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn secrets_never_appear_in_logs_or_errors() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    // Nothing listens on port 1, so both connections fail, and log and report why.
    let vars = BTreeMap::from([
        (
            "BROKER_NOTIFICATIONS_RABBITMQ_URL".to_owned(),
            "amqp://app:rabbit-secret-password@127.0.0.1:1/".to_owned(),
        ),
        (
            "BROKER_SYSTEM_LOGS_NATS_URL".to_owned(),
            "nats://127.0.0.1:1".to_owned(),
        ),
    ]);
    let text = std::fs::read_to_string(path("testdata/secrets.toml")).unwrap();
    let config = Config::from_toml_with_env(&text, &vars).unwrap();
    let ctx = broker::Context::new().with_timeout(Duration::from_secs(3));
    let error = Manager::connect(&ctx, config).await.unwrap_err();

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let report = format!("{error} {error:?} {logs}");
    assert!(!logs.is_empty(), "the failed connect was logged");
    for secret in SECRETS {
        assert!(!report.contains(secret), "{secret} leaked: {report}");
    }
}

#[tokio::test]
async fn a_failed_connection_is_named() {
    let vars = BTreeMap::from([(
        "BROKER_SYSTEM_LOGS_NATS_URL".to_owned(),
        "nats://127.0.0.1:1".to_owned(),
    )]);
    let text = "[brokers.local]\ndriver = \"memory\"\n\n[brokers.system_logs]\ndriver = \"nats\"\n\
                [brokers.system_logs.nats]\nurl = \"nats://localhost:4222\"\n";
    let config = Config::from_toml_with_env(text, &vars).unwrap();
    let ctx = broker::Context::new().with_timeout(Duration::from_secs(3));

    let error = Manager::connect(&ctx, config).await.unwrap_err();

    let origin = error.origin().unwrap_or_else(|| panic!("{error:?}"));
    assert_eq!(origin.connection, "system_logs", "{error}");
    assert_eq!(origin.operation, broker::Operation::Connect, "{error}");
    assert!(error.to_string().contains("system_logs"), "{error}");
    assert!(!matches!(error, Error::Config(_)));
}
