//! What goes wrong with RabbitMQ, as the `source` of [`Error::Broker`](crate::Error::Broker).

use std::fmt;

/// A RabbitMQ failure. It is the `source` of [`Error::Broker`](crate::Error::Broker); reach it
/// with [`RabbitMqError::of`] to match on what happened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RabbitMqError {
    /// The server refused the credentials, or the user may not use the virtual host.
    #[error("{address} refused the login: {detail}")]
    AccessRefused {
        /// The server's `host:port`.
        address: String,
        /// What the server or the client said.
        detail: String,
    },

    /// The server could not be reached, or the connection could not be opened.
    #[error("cannot connect to {address}: {source}")]
    Unreachable {
        /// The server's `host:port`.
        address: String,
        /// The client's error.
        #[source]
        source: amqprs::error::Error,
    },

    /// The TLS handshake failed: the server's certificate is not trusted or not valid for its
    /// name, or the server refused the client's certificate or its absence.
    #[error("TLS with {address} failed: {source}")]
    Tls {
        /// The server's `host:port`.
        address: String,
        /// The client's error, with rustls's or the server's reason.
        #[source]
        source: amqprs::error::Error,
    },

    /// An exchange or queue exists with other settings than the ones configured (AMQP reply
    /// 406 `PRECONDITION_FAILED`).
    #[error("{kind} `{name}` exists with other settings: {detail}")]
    TopologyMismatch {
        /// `exchange` or `queue`.
        kind: &'static str,
        /// Its name.
        name: String,
        /// What the server said.
        detail: String,
    },

    /// No queue is bound for the message's routing key: the server returned it.
    #[error("no queue is bound to `{routing_key}` on exchange `{exchange}`: {detail}")]
    Unroutable {
        /// The exchange the message was published to.
        exchange: String,
        /// Its routing key (the topic).
        routing_key: String,
        /// The server's reply text, for example `NO_ROUTE`.
        detail: String,
    },

    /// The server refused to take the message (a negative publisher confirm).
    #[error("the server refused the message (negative publisher confirm)")]
    Nacked,

    /// The server closed the channel an operation ran on.
    #[error("the server closed the channel: {code} {text}")]
    ChannelClosed {
        /// The AMQP reply code, for example 404.
        code: u16,
        /// The server's reply text.
        text: String,
    },

    /// The connection was lost before the operation finished.
    #[error("the connection to {address} was lost")]
    ConnectionLost {
        /// The server's `host:port`.
        address: String,
    },

    /// A name or header cannot be sent in AMQP.
    #[error("`{value}` cannot be used as {what}: {reason}")]
    Invalid {
        /// What it was meant to be: a routing key, a queue name, a header name.
        what: &'static str,
        /// The value, shortened when long.
        value: String,
        /// Why not.
        reason: &'static str,
    },

    /// A setting of [`RabbitMqConfig`](crate::config::RabbitMqConfig) is invalid.
    #[error("the setting `{key}` is invalid: {message}")]
    InvalidSetting {
        /// The key within the `rabbitmq` table.
        key: String,
        /// What is wrong with it.
        message: String,
    },

    /// Any other error of the client.
    #[error(transparent)]
    Client(#[from] amqprs::error::Error),
}

impl RabbitMqError {
    /// The RabbitMQ error behind a crate error, if there is one.
    pub fn of(error: &crate::Error) -> Option<&RabbitMqError> {
        match error {
            crate::Error::Broker { source, .. } => source.downcast_ref(),
            _ => None,
        }
    }

    /// The error for a channel the server closed with `code` and `text`, named by what was
    /// being declared.
    pub(super) fn from_close(code: u16, text: &str, kind: &'static str, name: &str) -> Self {
        match code {
            406 => RabbitMqError::TopologyMismatch {
                kind,
                name: name.to_owned(),
                detail: text.to_owned(),
            },
            _ => RabbitMqError::ChannelClosed {
                code,
                text: text.to_owned(),
            },
        }
    }

    pub(super) fn invalid(what: &'static str, value: &str, reason: &'static str) -> Self {
        RabbitMqError::Invalid {
            what,
            value: Shortened(value).to_string(),
            reason,
        }
    }
}

/// A value shown by its first 64 characters.
struct Shortened<'a>(&'a str);

impl fmt::Display for Shortened<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut chars = self.0.char_indices();
        match chars.nth(64) {
            Some((end, _)) => write!(f, "{}…", &self.0[..end]),
            None => f.write_str(self.0),
        }
    }
}
