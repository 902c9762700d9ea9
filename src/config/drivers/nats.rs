//! `[brokers.<name>.nats]`, with its `stream` and `consumer` tables for JetStream.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::tls::{self, TLS_KEYS, TlsConfig};
use super::*;
use crate::config::{DriverTable, ValueKind};
use crate::config::{Secret, SecretUrl};
use crate::handler::RetryPolicy;

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
///
/// ```toml
/// [brokers.orders.nats]
/// url = "nats://127.0.0.1:4222"
/// mode = "jetstream"
/// stream = { name = "ORDERS", subjects = ["orders.>"] }
/// consumer = { ack_wait = "30s", max_ack_pending = 256 }
/// ```
///
/// TLS is on when the `tls` table is present and enabled, or when a URL is `tls://` or
/// `wss://` (see [`NatsConfig::uses_tls`]); it needs the crate's `tls` feature.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// The server: `nats://host:port`, `tls://` for TLS, `ws://` or `wss://` for WebSocket
    /// (plain or with TLS).
    #[serde(default)]
    pub url: Option<SecretUrl>,
    /// Several servers of a cluster (besides or instead of `url`), all WebSocket or none.
    #[serde(default)]
    pub urls: Vec<SecretUrl>,
    /// The client name the server shows for this connection; the connection's name when unset.
    #[serde(default)]
    pub name: Option<String>,
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
    /// An NKey seed (`SU…`) to authenticate with.
    #[serde(default)]
    pub nkey: Option<Secret>,
    /// A credentials file (`.creds`, a user JWT and its NKey seed) to authenticate with.
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
    /// How many delivered messages a core subscription buffers before the server's messages
    /// are dropped as a slow consumer. The default, 65,536, is async-nats's own: a burst that
    /// the client alone would hold is not dropped here. Each buffered message keeps its
    /// payload, so a lower limit bounds memory where messages are large.
    #[serde(default = "default_pending_limit")]
    pub pending_limit: usize,
    /// Retries of a failing handler before the message is dead-lettered. In JetStream mode,
    /// `attempts` is the number of deliveries and the backoff is the `nak` delay.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// The subject failed messages go to; `{topic}` is replaced by the subject they were
    /// published to. Empty turns dead-lettering off.
    #[serde(default = "default_dead_letter")]
    pub dead_letter_subject: String,
    /// JetStream: the stream that captures the topics. Without it each subscription looks the
    /// stream up by its subject, and publishing needs a stream to exist already.
    #[serde(default)]
    pub stream: Option<Box<NatsStreamConfig>>,
    /// JetStream: the consumers that subscriptions create.
    #[serde(default)]
    pub consumer: Box<NatsConsumerConfig>,
    /// TLS settings: the table turns TLS on for `nats://` URLs too. `tls://` and `wss://` URLs
    /// use TLS whatever the table says, with the system's trusted roots when it is absent or
    /// disabled. A `ws://` URL cannot be combined with an enabled table.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: None,
            urls: Vec::new(),
            name: None,
            mode: NatsMode::default(),
            token: None,
            user: None,
            password: None,
            nkey: None,
            credentials_file: None,
            pending_limit: default_pending_limit(),
            retry: RetryPolicy::default(),
            dead_letter_subject: default_dead_letter(),
            stream: None,
            consumer: Box::default(),
            tls: None,
        }
    }
}

/// Where a JetStream stream keeps its messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NatsStorage {
    /// On disk: survives a server restart.
    #[default]
    File,
    /// In memory: lost when the server stops.
    Memory,
}

/// When a JetStream stream lets go of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NatsRetention {
    /// When the stream's limits (age, count, size) say so.
    #[default]
    Limits,
    /// Once every consumer has acknowledged it.
    Interest,
    /// Once one consumer has acknowledged it; at most one consumer per subject.
    Workqueue,
}

/// What to do when the configured stream does not exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NatsMissingStream {
    /// Create it with these settings.
    #[default]
    Create,
    /// Fail to connect: the stream is managed elsewhere.
    Fail,
}

/// Where a new consumer starts in its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NatsDeliver {
    /// With the messages published after the consumer was created.
    #[default]
    New,
    /// With the first message the stream holds.
    All,
}

/// `[brokers.<name>.nats.stream]`: the JetStream stream of a connection.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsStreamConfig {
    /// The stream's name.
    pub name: String,
    /// The subjects it captures, wildcards allowed (`orders.>`); needed to create it.
    #[serde(default)]
    pub subjects: Vec<String>,
    /// Where it keeps messages.
    #[serde(default)]
    pub storage: NatsStorage,
    /// When it lets go of them.
    #[serde(default)]
    pub retention: NatsRetention,
    /// What to do when the stream does not exist: `create` it or `fail`.
    #[serde(default)]
    pub missing: NatsMissingStream,
    /// How long the stream remembers message ids to drop duplicate publishes (server default
    /// when unset, two minutes).
    #[serde(default, with = "humantime_serde")]
    pub duplicate_window: Option<Duration>,
    /// How long it keeps a message (forever when unset).
    #[serde(default, with = "humantime_serde")]
    pub max_age: Option<Duration>,
}

/// `[brokers.<name>.nats.consumer]`: the JetStream consumers subscriptions create.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConsumerConfig {
    /// The durable consumer's name for a group; `{group}` and `{topic}` are replaced, and every
    /// character a consumer name cannot hold becomes `_`.
    pub durable_name: String,
    /// Where a new consumer starts: `new` or `all`.
    pub deliver: NatsDeliver,
    /// How long the server waits for an acknowledgement before it delivers again.
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    /// The server's limit on deliveries of one message (unlimited when unset). Failed messages
    /// are dead-lettered after `retry.attempts` deliveries, so this only bounds deliveries that
    /// never came back, and must be at least `retry.attempts`.
    pub max_deliver: Option<i64>,
    /// Delays of the server's redeliveries after an `ack_wait` timeout, in place of `ack_wait`.
    #[serde(deserialize_with = "durations")]
    pub backoff: Vec<Duration>,
    /// How many delivered messages may wait for their acknowledgement at once.
    pub max_ack_pending: i64,
}

impl Default for NatsConsumerConfig {
    fn default() -> Self {
        NatsConsumerConfig {
            durable_name: "{group}-{topic}".to_owned(),
            deliver: NatsDeliver::default(),
            ack_wait: Duration::from_secs(30),
            max_deliver: None,
            backoff: Vec::new(),
            max_ack_pending: 256,
        }
    }
}

fn default_pending_limit() -> usize {
    65_536
}

fn durations<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<Duration>, D::Error> {
    let texts = Vec::<humantime_serde::Serde<Duration>>::deserialize(deserializer)?;
    Ok(texts
        .into_iter()
        .map(humantime_serde::Serde::into_inner)
        .collect())
}

impl NatsConfig {
    /// Every configured server URL: `url` first, then `urls`.
    pub fn all_urls(&self) -> impl Iterator<Item = &SecretUrl> {
        self.url.iter().chain(&self.urls)
    }

    /// The TLS settings in force, if the `tls` table turns TLS on.
    pub fn tls(&self) -> Option<&TlsConfig> {
        tls::active(self.tls.as_ref())
    }

    /// Whether the connection uses TLS: the `tls` table turns it on, or a URL is `tls://` or
    /// `wss://`.
    pub fn uses_tls(&self) -> bool {
        self.tls().is_some()
            || self
                .all_urls()
                .any(|url| matches!(url.scheme(), "tls" | "wss"))
    }

    /// Whether the servers are reached over WebSocket (`ws://` or `wss://` URLs).
    pub fn uses_websocket(&self) -> bool {
        self.all_urls().any(is_websocket)
    }
}

impl NatsConfig {
    /// The key of a `ws://` URL, and what is wrong with it, while the `tls` table turns TLS
    /// on: the client never upgrades a plain WebSocket connection, so that server would be
    /// reached without TLS.
    pub(crate) fn plain_websocket_with_tls(&self) -> Option<(&'static str, String)> {
        self.tls()?;
        let plain = |url: &&SecretUrl| url.scheme() == "ws";
        let (key, url) = match self.url.iter().find(plain) {
            Some(url) => ("url", url),
            None => ("urls", self.urls.iter().find(plain)?),
        };
        let message =
            format!("`{url}` is WebSocket without TLS, but the tls table turns TLS on; use wss://");
        Some((key, message))
    }
}

fn is_websocket(url: &SecretUrl) -> bool {
    matches!(url.scheme(), "ws" | "wss")
}

impl DriverTable for NatsConfig {
    const TABLE: &'static str = "nats";
    const KEYS: &'static [(&'static str, ValueKind)] = &[
        ("url", ValueKind::Text),
        ("urls", ValueKind::List),
        ("name", ValueKind::Text),
        ("mode", ValueKind::Text),
        ("token", ValueKind::Text),
        ("user", ValueKind::Text),
        ("password", ValueKind::Text),
        ("nkey", ValueKind::Text),
        ("credentials_file", ValueKind::Text),
        ("pending_limit", ValueKind::Integer),
        RETRY_KEYS[0],
        RETRY_KEYS[1],
        RETRY_KEYS[2],
        RETRY_KEYS[3],
        ("dead_letter_subject", ValueKind::Text),
        ("stream.name", ValueKind::Text),
        ("stream.subjects", ValueKind::List),
        ("stream.storage", ValueKind::Text),
        ("stream.retention", ValueKind::Text),
        ("stream.missing", ValueKind::Text),
        ("stream.duplicate_window", ValueKind::Text),
        ("stream.max_age", ValueKind::Text),
        ("consumer.durable_name", ValueKind::Text),
        ("consumer.deliver", ValueKind::Text),
        ("consumer.ack_wait", ValueKind::Text),
        ("consumer.max_deliver", ValueKind::Integer),
        ("consumer.backoff", ValueKind::List),
        ("consumer.max_ack_pending", ValueKind::Integer),
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
        let schemes = ["nats", "tls", "ws", "wss"];
        check_urls(self.url.iter(), "url", &schemes)?;
        check_urls(self.urls.iter(), "urls", &schemes)?;
        self.validate_transport()?;
        match (&self.user, &self.password) {
            (Some(_), None) => return Err(invalid("password", "`user` is set without it")),
            (None, Some(_)) => return Err(invalid("user", "`password` is set without it")),
            _ => {}
        }
        let methods = [
            ("token", self.token.is_some()),
            ("user", self.user.is_some()),
            ("nkey", self.nkey.is_some()),
            ("credentials_file", self.credentials_file.is_some()),
        ];
        let mut chosen = methods.iter().filter(|(_, set)| *set).map(|(key, _)| *key);
        if let (Some(first), Some(second)) = (chosen.next(), chosen.next()) {
            return Err(invalid(
                second,
                &format!("give one way to authenticate; `{first}` is set too"),
            ));
        }
        if self
            .nkey
            .as_ref()
            .is_some_and(|seed| !seed.expose().starts_with('S'))
        {
            return Err(invalid("nkey", "not an NKey seed (a seed starts with `S`)"));
        }
        if self.pending_limit == 0 {
            return Err(invalid("pending_limit", "must be at least 1"));
        }
        validate_retry(&self.retry)?;
        if let Some(stream) = &self.stream {
            stream.validate()?;
        }
        self.consumer.validate(&self.retry)
    }
}

impl NatsConfig {
    /// Checks that the URLs and the `tls` table agree.
    fn validate_transport(&self) -> Result<(), (String, String)> {
        tls::validate(self.tls.as_ref())?;
        // The client speaks either the NATS protocol or WebSocket to every server of a
        // connection, so a list that mixes them cannot work.
        if self.uses_websocket() && !self.all_urls().all(is_websocket) {
            return Err(invalid(
                "urls",
                "mixes WebSocket URLs (ws://, wss://) with nats:// or tls:// ones; give one kind",
            ));
        }
        if let Some((key, message)) = self.plain_websocket_with_tls() {
            return Err(invalid(key, &message));
        }
        Ok(())
    }
}

impl NatsStreamConfig {
    fn validate(&self) -> Result<(), (String, String)> {
        if !is_valid_name(&self.name) {
            return Err(invalid(
                "stream.name",
                "must be a non-empty name without spaces, `.`, `*`, `>`, `/` or `\\`",
            ));
        }
        if self.missing == NatsMissingStream::Create && self.subjects.is_empty() {
            return Err(invalid(
                "stream.subjects",
                "empty; a stream to create needs the subjects it captures",
            ));
        }
        if let Some(subject) = self
            .subjects
            .iter()
            .find(|subject| !is_valid_subject(subject))
        {
            return Err(invalid(
                "stream.subjects",
                &format!("`{subject}` is not a valid subject"),
            ));
        }
        Ok(())
    }
}

impl NatsConsumerConfig {
    fn validate(&self, retry: &RetryPolicy) -> Result<(), (String, String)> {
        if !self.durable_name.contains("{group}") {
            return Err(invalid(
                "consumer.durable_name",
                "must contain `{group}` so every group gets its own consumer",
            ));
        }
        if self.ack_wait.is_zero() {
            return Err(invalid("consumer.ack_wait", "must be longer than zero"));
        }
        if self.max_ack_pending < 1 {
            return Err(invalid("consumer.max_ack_pending", "must be at least 1"));
        }
        if let Some(max_deliver) = self.max_deliver {
            if max_deliver < i64::from(retry.attempts) {
                return Err(invalid(
                    "consumer.max_deliver",
                    &format!(
                        "must be at least retry.attempts ({}), or the server stops delivering \
                         before the message is dead-lettered",
                        retry.attempts
                    ),
                ));
            }
            if usize::try_from(max_deliver).is_ok_and(|max| max <= self.backoff.len()) {
                return Err(invalid(
                    "consumer.max_deliver",
                    "must be greater than the number of `consumer.backoff` delays",
                ));
            }
        }
        Ok(())
    }
}

fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || ".*>/\\".contains(c))
}

fn is_valid_subject(subject: &str) -> bool {
    !subject.is_empty()
        && !subject.chars().any(|c| c.is_whitespace() || c.is_control())
        && subject.split('.').all(|token| !token.is_empty())
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, ConfigErrorKind, DriverConfig};
    use std::collections::BTreeMap;

    fn parse(table: &str) -> Result<Config, crate::ConfigError> {
        let text = format!("[brokers.events]\ndriver = \"nats\"\n[brokers.events.nats]\n{table}");
        Config::from_toml_with_env(&text, &BTreeMap::new())
    }

    #[test]
    fn a_jetstream_connection_parses_with_its_stream_and_consumer() {
        let config = parse(
            r#"
            url = "nats://127.0.0.1:4222"
            mode = "jetstream"
            stream = { name = "ORDERS", subjects = ["orders.>"], storage = "memory" }
            consumer = { ack_wait = "5s", backoff = ["1s", "2s"], max_deliver = 5 }
            "#,
        )
        .unwrap();

        let DriverConfig::Nats(nats) = &config.brokers["events"] else {
            panic!("not nats: {config:?}");
        };
        let stream = nats.stream.as_ref().unwrap();
        assert_eq!(stream.name, "ORDERS");
        assert_eq!(stream.storage, super::NatsStorage::Memory);
        assert_eq!(nats.consumer.backoff.len(), 2);
        assert_eq!(nats.consumer.ack_wait, std::time::Duration::from_secs(5));
    }

    #[test]
    fn two_ways_to_authenticate_are_refused_naming_the_key() {
        let error = parse(
            r#"
            url = "nats://127.0.0.1:4222"
            token = "abc"
            nkey = "SUAB"
            "#,
        )
        .unwrap_err();

        assert_eq!(error.kind(), ConfigErrorKind::InvalidValue);
        assert_eq!(error.key_path(), Some("nats.nkey"));
    }

    #[test]
    fn a_stream_to_create_needs_subjects() {
        let error = parse(
            r#"
            url = "nats://127.0.0.1:4222"
            stream = { name = "ORDERS" }
            "#,
        )
        .unwrap_err();

        assert_eq!(error.key_path(), Some("nats.stream.subjects"));
    }

    #[test]
    fn tls_is_on_for_an_enabled_table_and_for_tls_and_wss_urls() {
        let uses_tls = |table: &str| {
            let config = parse(table).unwrap();
            let DriverConfig::Nats(nats) = &config.brokers["events"] else {
                panic!("not nats: {config:?}");
            };
            nats.uses_tls()
        };

        assert!(!uses_tls(r#"url = "nats://127.0.0.1:4222""#));
        assert!(uses_tls(r#"url = "tls://127.0.0.1:4222""#));
        assert!(uses_tls(r#"url = "wss://127.0.0.1:443""#));
        assert!(uses_tls("url = \"nats://127.0.0.1:4222\"\ntls = {}"));
        assert!(!uses_tls(
            "url = \"nats://127.0.0.1:4222\"\ntls = { enabled = false }"
        ));
    }

    #[test]
    fn websocket_and_nats_urls_are_not_mixed() {
        let error = parse(
            r#"
            url = "ws://127.0.0.1:8080"
            urls = ["nats://127.0.0.1:4222"]
            "#,
        )
        .unwrap_err();

        assert_eq!(error.key_path(), Some("nats.urls"));
    }

    #[test]
    fn a_plain_websocket_url_with_a_tls_table_is_refused() {
        let error = parse("url = \"ws://127.0.0.1:8080\"\ntls = {}").unwrap_err();

        assert_eq!(error.key_path(), Some("nats.url"));
        assert!(error.message().contains("wss://"), "{error}");
    }

    #[test]
    fn max_deliver_below_the_attempts_is_refused() {
        let error = parse(
            r#"
            url = "nats://127.0.0.1:4222"
            retry = { attempts = 4 }
            consumer = { max_deliver = 2 }
            "#,
        )
        .unwrap_err();

        assert_eq!(error.key_path(), Some("nats.consumer.max_deliver"));
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let config = parse(
            r#"
            url = "nats://alice:hunter2@127.0.0.1:4222"
            nkey = "SUSECRETSEED"
            "#,
        )
        .unwrap();

        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("SUSECRETSEED"), "{shown}");
    }

    #[test]
    fn nested_keys_can_be_overridden_from_the_environment() {
        let text = "[brokers.events]\ndriver = \"nats\"\n[brokers.events.nats]\n\
                    url = \"nats://127.0.0.1:4222\"\n";
        let vars = BTreeMap::from([
            ("BROKER_EVENTS_NATS_STREAM_NAME".to_owned(), "S1".to_owned()),
            (
                "BROKER_EVENTS_NATS_STREAM_SUBJECTS".to_owned(),
                "a.>,b.>".to_owned(),
            ),
            (
                "BROKER_EVENTS_NATS_CONSUMER_BACKOFF".to_owned(),
                "1s,3s".to_owned(),
            ),
        ]);

        let config = Config::from_toml_with_env(text, &vars).unwrap();

        let DriverConfig::Nats(nats) = &config.brokers["events"] else {
            panic!("not nats");
        };
        assert_eq!(nats.stream.as_ref().unwrap().subjects, ["a.>", "b.>"]);
        assert_eq!(nats.consumer.backoff.len(), 2);
    }
}
