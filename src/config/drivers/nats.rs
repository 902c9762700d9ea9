//! `[brokers.<name>.nats]`.

use serde::Deserialize;

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
