//! The crate's error type.
//!
//! Every error says where it happened: the driver, the named connection, the operation and,
//! where there is one, the topic or address. The native client's error stays reachable
//! through [`std::error::Error::source`].

use std::fmt;

use crate::config::ConfigError;

/// A boxed error from a native client or a handler.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What the caller was doing when an error happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Operation {
    /// Opening the connection.
    Connect,
    /// Sending a message.
    Publish,
    /// Setting up a subscription.
    Subscribe,
    /// Acknowledging, rejecting or dead-lettering a delivered message.
    Ack,
    /// Checking that the broker answers.
    Ping,
    /// Closing the connection.
    Close,
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Operation::Connect => "connect",
            Operation::Publish => "publish",
            Operation::Subscribe => "subscribe",
            Operation::Ack => "ack",
            Operation::Ping => "ping",
            Operation::Close => "close",
        })
    }
}

/// Where an operation ran: driver, connection, operation and target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The driver, for example `kafka`.
    pub driver: &'static str,
    /// The connection's name in the configuration, for example `user_events`.
    pub connection: String,
    /// What was being done.
    pub operation: Operation,
    /// The topic, or the address for connection-level operations; empty when there is none.
    pub target: String,
}

impl Origin {
    /// An origin for `operation` on `target` through the connection `connection`.
    pub fn new(
        driver: &'static str,
        connection: impl Into<String>,
        operation: Operation,
        target: impl Into<String>,
    ) -> Self {
        Origin {
            driver,
            connection: connection.into(),
            operation,
            target: target.into(),
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} on {}",
            self.driver, self.operation, self.connection
        )?;
        if !self.target.is_empty() {
            write!(f, " ({})", self.target)?;
        }
        Ok(())
    }
}

/// Why the context stopped an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The context was cancelled.
    Cancelled,
    /// The context's deadline passed.
    DeadlineExceeded,
}

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stop::Cancelled => "the context was cancelled",
            Stop::DeadlineExceeded => "the context's deadline passed",
        })
    }
}

/// Everything that can go wrong in `broker`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is invalid; the error names the file, the connection and the key.
    #[error(transparent)]
    Config(#[from] ConfigError),

    /// No connection has this name.
    #[error("no connection named `{name}`; known connections: {}", known.join(", "))]
    UnknownConnection {
        /// The name that was asked for.
        name: String,
        /// Every configured name.
        known: Vec<String>,
    },

    /// A typed lookup asked for another driver than the connection uses.
    #[error("connection `{connection}` uses the {actual} driver, not {expected}")]
    WrongDriver {
        /// The connection's name.
        connection: String,
        /// The type that was asked for.
        expected: &'static str,
        /// The driver the connection uses.
        actual: &'static str,
    },

    /// The context was cancelled before the operation finished.
    #[error("{origin}: cancelled")]
    Cancelled {
        /// Where it happened.
        origin: Origin,
    },

    /// The context's deadline passed before the operation finished.
    #[error("{origin}: deadline exceeded")]
    DeadlineExceeded {
        /// Where it happened.
        origin: Origin,
    },

    /// The provider was closed.
    #[error("{origin}: the connection is closed")]
    Closed {
        /// Where it happened.
        origin: Origin,
    },

    /// The driver cannot do this.
    #[error("{origin}: not supported: {reason}")]
    Unsupported {
        /// Where it happened.
        origin: Origin,
        /// Why, and what to do instead.
        reason: String,
    },

    /// The broker or the client failed.
    #[error("{origin}: {source}")]
    Broker {
        /// Where it happened.
        origin: Origin,
        /// The native client's error.
        #[source]
        source: BoxError,
    },
}

impl Error {
    /// The error a context gives when it stops `origin`.
    pub fn stopped(stop: Stop, origin: Origin) -> Self {
        match stop {
            Stop::Cancelled => Error::Cancelled { origin },
            Stop::DeadlineExceeded => Error::DeadlineExceeded { origin },
        }
    }

    /// A broker or client failure at `origin`.
    pub fn broker(origin: Origin, source: impl Into<BoxError>) -> Self {
        Error::Broker {
            origin,
            source: source.into(),
        }
    }

    /// Where the error happened, when it happened in an operation.
    pub fn origin(&self) -> Option<&Origin> {
        match self {
            Error::Cancelled { origin }
            | Error::DeadlineExceeded { origin }
            | Error::Closed { origin }
            | Error::Unsupported { origin, .. }
            | Error::Broker { origin, .. } => Some(origin),
            Error::Config(_) | Error::UnknownConnection { .. } | Error::WrongDriver { .. } => None,
        }
    }

    /// Whether the context stopped the operation (cancelled or past its deadline).
    pub fn is_stopped(&self) -> bool {
        matches!(
            self,
            Error::Cancelled { .. } | Error::DeadlineExceeded { .. }
        )
    }
}
