//! Values that must never reach a log line or `Debug` output.

use std::fmt;

use serde::{Deserialize, Deserializer};
use url::Url;

/// A password, token or key. `Debug` and `Display` print `***`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// A secret holding `value`.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for handing to a client. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// A broker URL that may carry a password. `Debug` and `Display` show it with the password
/// replaced by `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(Url);

impl SecretUrl {
    /// Parses `text` as a URL.
    pub fn parse(text: &str) -> Result<Self, url::ParseError> {
        Url::parse(text).map(SecretUrl)
    }

    /// The URL with its password, for handing to a client. Never log it.
    pub fn expose(&self) -> &Url {
        &self.0
    }

    /// The URL's scheme, for example `amqp`.
    pub fn scheme(&self) -> &str {
        self.0.scheme()
    }

    /// `host:port` (the port only when the URL gives one), safe to log.
    pub fn host_port(&self) -> String {
        let host = self.0.host_str().unwrap_or_default();
        match self.0.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        }
    }

    fn redacted(&self) -> Url {
        let mut url = self.0.clone();
        if url.password().is_some() {
            // Only URLs that cannot have a password refuse this, and this one has one.
            let _ = url.set_password(Some("***"));
        } else if !url.username().is_empty() {
            // A user without a password is how NATS URLs carry a token (`nats://token@host`).
            let _ = url.set_username("***");
        }
        url
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}\"", self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.redacted())
    }
}

impl<'de> Deserialize<'de> for SecretUrl {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        SecretUrl::parse(&text).map_err(|error| {
            // The text may hold a password, so the error names only what is wrong.
            serde::de::Error::custom(format_args!("not a valid URL: {error}"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_hidden_from_debug_and_display() {
        let secret = Secret::new("hunter2");

        assert_eq!(format!("{secret:?}"), "\"***\"");
        assert_eq!(secret.to_string(), "***");
        assert_eq!(secret.expose(), "hunter2");
    }

    #[test]
    fn a_token_in_place_of_the_user_is_hidden() {
        let url = SecretUrl::parse("nats://s3cr3t-token@localhost:4222").unwrap();

        assert_eq!(url.to_string(), "nats://***@localhost:4222");
        assert!(!format!("{url:?}").contains("s3cr3t-token"));
    }

    #[test]
    fn url_passwords_are_hidden_but_the_rest_shows() {
        let url = SecretUrl::parse("amqp://guest:hunter2@localhost:5672/").unwrap();

        assert_eq!(url.to_string(), "amqp://guest:***@localhost:5672/");
        assert!(!format!("{url:?}").contains("hunter2"));
        assert_eq!(url.host_port(), "localhost:5672");
        assert_eq!(url.expose().password(), Some("hunter2"));
    }
}
