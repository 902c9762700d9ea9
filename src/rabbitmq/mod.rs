//! The RabbitMQ driver, on [amqprs](https://docs.rs/amqprs) (pure Rust, AMQP 0-9-1).
//!
//! ```toml
//! [brokers.orders]
//! driver = "rabbitmq"
//!
//! [brokers.orders.rabbitmq]
//! url = "amqp://guest:guest@localhost:5672/%2f"
//! exchange = "orders"
//! ```
//!
//! # How the model maps onto AMQP
//!
//! - **Topics.** A topic is a routing key on the configured exchange (`exchange`, of type
//!   `exchange_type`: `topic` by default, `direct` or `fanout`). The exchange is declared durable
//!   when the connection opens; if it already exists with another type or durability, connecting
//!   fails with [`RabbitMqError::TopologyMismatch`]. With a topic exchange a subscription may
//!   use the patterns `*` (one word) and `#` (any words).
//! - **Messages.** The id is the `message_id` property, the time the `timestamp` property in
//!   seconds plus the milliseconds in the `x-broker-timestamp-ms` header, every header a long
//!   string in the headers table, and the body the content. Messages are persistent (delivery
//!   mode 2). Headers another client sent with other AMQP types arrive as text (integers,
//!   floats, decimals, booleans, timestamps as seconds, UTF-8 byte arrays); arrays, nested
//!   tables (such as RabbitMQ's own `x-death`) and other bytes are skipped with a debug log. A
//!   message without `message_id` gets a fresh id, and one without a time the time it arrived.
//!   The header `x-broker-timestamp-ms` is this driver's own and never reaches a handler.
//! - **Publishing.** `publish` returns once the server's publisher confirm arrived (unless
//!   `confirms = false`, then once it was written). A negative confirm is
//!   [`RabbitMqError::Nacked`]. Messages are sent `mandatory`, so one that no queue is bound
//!   for is returned by the server and `publish` fails with [`RabbitMqError::Unroutable`]:
//!   nothing is dropped silently (without confirms, `publish` has returned by then and the
//!   return is only logged). Many publishes may be in flight on the one publishing channel.
//! - **Groups.** A consumer group reads one durable queue, named by the `queue` template
//!   (`{topic}.{group}` by default), bound to the exchange with the topic. Subscribers of a group
//!   share its messages; every group gets every message. A subscription without a group reads
//!   an exclusive, auto-deleted, server-named queue of its own, which goes away with it (and
//!   with the connection: messages published while reconnecting do not reach it).
//! - **Acks.** Acknowledgements are manual, with `prefetch` unacknowledged deliveries at most
//!   per subscription. A subscription runs its handler on one delivery at a time, in order,
//!   or on up to `concurrency` at once (concurrently within the subscription's task).
//!   `Ok` acks. Handling one at a time, a run of handled deliveries is acked with one
//!   `multiple` ack: the run ends when no further delivery has arrived, at half the
//!   `prefetch`, before a delivery that is rejected or requeued, and when the subscription
//!   stops. A lost connection redelivers the handled deliveries of an unfinished run, as it
//!   does those still in a handler (at least once). An error is retried in-process with the `retry` policy. When every attempt
//!   failed, the message, with the `dead_letter_*` headers of [`propagation::dead_letter`], is
//!   published to the dead-letter exchange (`dead_letter_exchange`, a durable topic exchange)
//!   with the routing key `dead_letter_topic` (`{topic}.dlq` by default), and once that is
//!   confirmed the delivery is acked. If that publish fails the delivery is rejected without
//!   requeue instead: the queue's `x-dead-letter-exchange` and `x-dead-letter-routing-key`
//!   arguments send it the same way, but without the error headers. With `dead_letter_queue`
//!   on (the default) every subscription declares a durable queue named after its dead-letter
//!   topic, bound to the dead-letter exchange, where dead letters wait to be read. Setting
//!   `dead_letter_exchange = "{exchange}"` instead makes dead letters a topic like any other,
//!   for subscribers of `{topic}.dlq`. A delivery whose retries are cut short by a stopping
//!   subscription is requeued.
//! - **Connection loss.** amqprs does not reconnect; this driver does. When the connection is
//!   lost (network failure, missed heartbeats, the server closing it), it reconnects with
//!   capped exponential backoff (`reconnect_backoff` up to `reconnect_max_backoff`, trying each
//!   server of `url` and `urls` in turn), declares the exchanges again and restarts every
//!   subscription. A publish during the outage waits for the new connection until its context
//!   stops; a publish whose confirm was lost with the connection is sent again on the new one.
//!   So delivery is at least once: duplicates are possible, loss of a confirmed message is not.
//! - **Errors.** Failures are [`Error::Broker`] with a [`RabbitMqError`] source (see
//!   [`RabbitMqError::of`]), naming the driver, connection, operation and topic: bad
//!   credentials are [`RabbitMqError::AccessRefused`], a server that cannot be reached
//!   [`RabbitMqError::Unreachable`], a failed TLS handshake [`RabbitMqError::Tls`]. A context that stops an operation gives
//!   [`Error::Cancelled`] or [`Error::DeadlineExceeded`], and a closed provider
//!   [`Error::Closed`].
//!
//! # TLS
//!
//! TLS is chosen per server, by its URL: `amqps://` servers are reached over TLS (port 5671
//! unless the URL names one) and `amqp://` servers in plain text. It needs the crate's `tls`
//! feature; without it, connecting with an `amqps://` server fails with
//! [`Error::Unsupported`] before any connection is tried.
//!
//! ```toml
//! [brokers.orders.rabbitmq]
//! url = "amqps://app:secret@rabbit.example.com/%2f"
//! exchange = "orders"
//!
//! [brokers.orders.rabbitmq.tls]
//! ca_file = "/etc/broker/rabbit-ca.pem"   # the system's roots when absent
//! cert_file = "/etc/broker/client.pem"    # only for servers that ask for a client
//! key_file = "/etc/broker/client.key"     # certificate (`ssl_options.verify`)
//! ```
//!
//! The `tls` table ([`TlsConfig`](crate::config::TlsConfig)) is optional: without it an
//! `amqps://` server's certificate is checked against the system's trusted roots, with no
//! client certificate. With it, every URL must be `amqps://`. The certificate and key files
//! are read when the provider connects (a missing or unreadable one is an [`Error::Config`]
//! naming its key, such as `rabbitmq.tls.ca_file`) and the one rustls configuration is
//! reused by every reconnection. The crypto is the process's default rustls provider when
//! the application installed one, and a pure-Rust one otherwise; none has to be installed.
//!
//! The server's certificate must carry the URL's host name, or `server_name` when it is set
//! (for example when the URL holds an IP address). The handshake sends the URL's host name
//! as SNI; for an IP address it sends `server_name` when set, and nothing otherwise. A
//! certificate that is not trusted or carries another name, and a client certificate the
//! server refused or did not get, fail the connect with [`RabbitMqError::Tls`].
//!
//! # The amqprs client
//!
//! [`RabbitMqProvider::connection`] gives the current amqprs [`Connection`] and
//! [`RabbitMqProvider::open_channel`] a [`Channel`] of one's own, for what this interface does
//! not cover (other exchanges, `basic.get`, queue inspection). amqprs itself is re-exported as
//! [`amqprs`] so its types match.
//!
//! # Not supported yet
//!
//! - Exchange types `headers` and others than `topic`, `direct` and `fanout`.
//!
//! [`propagation::dead_letter`]: crate::propagation::dead_letter

mod codec;
mod confirms;
mod connection;
mod consumer;
mod error;
mod tls;
mod topology;

use std::fmt;
use std::sync::Arc;

use amqprs::channel::Channel;
use amqprs::connection::Connection;
use async_trait::async_trait;

pub use amqprs;
pub use error::RabbitMqError;

use self::codec::check_short;
use self::connection::{Link, address_of, close_channel};
use self::consumer::Consumer;
use self::tls::Tls;
use crate::config::RabbitMqConfig;
use crate::context::Context;
use crate::error::{Error, Operation, Origin, Result};
use crate::handler::{Dispatcher, Handler, Source};
use crate::message::Message;
use crate::propagation;
use crate::provider::{Provider, SubscribeOptions};
use crate::subscription::{Subscription, Subscriptions};

const DRIVER: &str = "rabbitmq";

/// A connection to a RabbitMQ server or cluster.
///
/// Usually made by the [`Manager`](crate::Manager) from a configuration file; it can be made
/// directly too, and reached from the manager with its type to use amqprs itself:
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), broker::Error> {
/// use std::time::Duration;
///
/// use broker::config::{RabbitMqConfig, SecretUrl};
/// use broker::rabbitmq::RabbitMqProvider;
/// use broker::{Context, Message, Provider};
///
/// let config = RabbitMqConfig {
///     url: SecretUrl::parse("amqp://guest:guest@localhost:5672/%2f").ok(),
///     exchange: "orders".to_owned(),
///     ..RabbitMqConfig::default()
/// };
/// let ctx = Context::new().with_timeout(Duration::from_secs(10));
/// let orders = RabbitMqProvider::connect(&ctx, "orders", config).await?;
///
/// // Fails with `RabbitMqError::Unroutable` until some queue is bound to `created`.
/// orders.publish(&ctx, "created", Message::new("order 1")).await?;
///
/// // The amqprs channel, for what the common interface does not cover.
/// let channel = orders.open_channel(&ctx).await?;
/// # drop(channel);
/// orders.close().await?;
/// # Ok(())
/// # }
/// ```
pub struct RabbitMqProvider {
    inner: Arc<Inner>,
    subscriptions: Subscriptions,
}

/// What the provider and its consumers share.
struct Inner {
    name: String,
    config: RabbitMqConfig,
    /// `host:port` of the first configured server, for `Display` while disconnected.
    address: String,
    link: Arc<Link>,
}

impl RabbitMqProvider {
    /// Connects the connection `name` within `ctx`: checks the settings, opens the connection,
    /// declares the exchanges and opens the publishing channel. Each configured server is tried
    /// in turn.
    pub async fn connect(ctx: &Context, name: &str, config: RabbitMqConfig) -> Result<Self> {
        let address = config.all_urls().next().map(address_of).unwrap_or_default();
        let origin = || Origin::new(DRIVER, name, Operation::Connect, address.as_str());
        config.check().map_err(|(key, message)| {
            Error::broker(origin(), RabbitMqError::InvalidSetting { key, message })
        })?;
        let tls = Tls::for_servers(name, &config, origin)?;
        let link = ctx
            .run(origin, async {
                Link::open(name, &config, tls)
                    .await
                    .map_err(|error| Error::broker(origin(), error))
            })
            .await?;
        Ok(RabbitMqProvider {
            inner: Arc::new(Inner {
                name: name.to_owned(),
                config,
                address,
                link,
            }),
            subscriptions: Subscriptions::new(),
        })
    }

    /// The connection's settings.
    pub fn config(&self) -> &RabbitMqConfig {
        &self.inner.config
    }

    /// The current amqprs connection, or `None` while reconnecting.
    ///
    /// It is replaced after a reconnection, so keep it only for a short while.
    pub fn connection(&self) -> Option<Connection> {
        self.inner
            .link
            .current()
            .map(|session| session.connection.clone())
    }

    /// Opens a new amqprs channel on the current connection, for what this crate does not do.
    ///
    /// The caller owns the channel and should register its callbacks and close it.
    pub async fn open_channel(&self, ctx: &Context) -> Result<Channel> {
        let origin = || self.origin(Operation::Connect, "");
        self.check_open(Operation::Connect, "")?;
        ctx.run(origin, async {
            let session = self
                .inner
                .link
                .session()
                .await
                .ok_or_else(|| Error::Closed { origin: origin() })?;
            session
                .connection
                .open_channel(None)
                .await
                .map_err(|error| Error::broker(origin(), RabbitMqError::from(error)))
        })
        .await
    }

    fn origin(&self, operation: Operation, target: &str) -> Origin {
        Origin::new(DRIVER, &self.inner.name, operation, target)
    }

    fn check_open(&self, operation: Operation, target: &str) -> Result<()> {
        if self.subscriptions.is_closing() || self.inner.link.is_closing() {
            return Err(Error::Closed {
                origin: self.origin(operation, target),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl Provider for RabbitMqProvider {
    fn driver(&self) -> &'static str {
        DRIVER
    }

    fn name(&self) -> &str {
        &self.inner.name
    }

    async fn publish(&self, ctx: &Context, topic: &str, mut message: Message) -> Result<()> {
        let origin = || self.origin(Operation::Publish, topic);
        self.check_open(Operation::Publish, topic)?;
        check_short("a routing key", topic).map_err(|error| Error::broker(origin(), error))?;
        propagation::inject(ctx, &mut message);
        codec::check(&message).map_err(|error| Error::broker(origin(), error))?;

        let exchange = &self.inner.config.exchange;
        let published = ctx
            .run(origin, async {
                let mut waited = false;
                loop {
                    let session = match self.inner.link.live() {
                        Some(session) => session,
                        // Boxed, as waiting for a reconnection is rare and its state would
                        // otherwise make every publish larger to allocate and move.
                        None => match Box::pin(self.inner.link.session()).await {
                            Some(session) => session,
                            None => return Err(Error::Closed { origin: origin() }),
                        },
                    };
                    if waited {
                        tracing::debug!(
                            connection = %self.inner.name,
                            driver = %DRIVER,
                            topic,
                            "publishing again on the new connection"
                        );
                    }
                    // Encoded for each attempt, so the first one copies nothing it does not send.
                    let properties =
                        codec::encode(&message).map_err(|error| Error::broker(origin(), error))?;
                    let publisher = &session.publisher;
                    let sent = publisher.send(exchange, topic, properties, message.body.to_vec());
                    match publisher.confirmed(sent, exchange, topic).await {
                        Ok(()) => return Ok(()),
                        Err(RabbitMqError::ConnectionLost { .. })
                            if !self.inner.link.is_closing() => {}
                        Err(error) => return Err(Error::broker(origin(), error)),
                    }

                    // The confirm was lost with the connection: send it again on the next.
                    session.lost.cancelled().await;
                    waited = true;
                }
            })
            .await;
        if published.as_ref().is_err_and(Error::is_stopped) && self.inner.link.current().is_none() {
            tracing::warn!(
                connection = %self.inner.name,
                driver = %DRIVER,
                topic,
                address = %self.inner.address,
                "publish stopped by its context while the connection was being re-established"
            );
        }
        published
    }

    async fn subscribe(
        &self,
        ctx: &Context,
        topic: &str,
        options: SubscribeOptions,
        handler: Arc<dyn Handler>,
    ) -> Result<Subscription> {
        let origin = || self.origin(Operation::Subscribe, topic);
        self.check_open(Operation::Subscribe, topic)?;
        check_short("a routing key", topic).map_err(|error| Error::broker(origin(), error))?;

        let dispatcher = Dispatcher::new(
            handler,
            self.inner.config.retry.clone(),
            Source {
                driver: DRIVER,
                connection: self.inner.name.as_str().into(),
                topic: topic.into(),
            },
        );
        let consumer = Consumer {
            inner: Arc::clone(&self.inner),
            topic: topic.to_owned(),
            group: options.group,
            dispatcher,
        };
        let live = ctx
            .run(origin, async {
                let Some(session) = self.inner.link.session().await else {
                    return Err(Error::Closed { origin: origin() });
                };
                consumer
                    .start(&session)
                    .await
                    .map_err(|error| Error::broker(origin(), error))
            })
            .await?;

        tracing::debug!(connection = %self.inner.name, driver = %DRIVER, topic, "subscribed");
        Ok(self
            .subscriptions
            .spawn(ctx, topic, |stop| consumer.run(live, stop)))
    }

    async fn ping(&self, ctx: &Context) -> Result<()> {
        let origin = || self.origin(Operation::Ping, "");
        self.check_open(Operation::Ping, "")?;
        ctx.run(origin, async {
            let Some(session) = self.inner.link.current() else {
                return Err(Error::broker(
                    origin(),
                    RabbitMqError::ConnectionLost {
                        address: self.inner.address.clone(),
                    },
                ));
            };
            let channel = session
                .connection
                .open_channel(None)
                .await
                .map_err(|error| Error::broker(origin(), RabbitMqError::from(error)))?;
            close_channel(channel).await;
            Ok(())
        })
        .await
    }

    async fn close(&self) -> Result<()> {
        self.subscriptions.close().await;
        self.inner.link.close().await;
        tracing::info!(connection = %self.inner.name, driver = %DRIVER, "closed");
        Ok(())
    }
}

impl fmt::Display for RabbitMqProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let address = self.inner.link.current().map_or_else(
            || self.inner.address.clone(),
            |session| session.address.clone(),
        );
        write!(f, "{DRIVER}({}: {address})", self.inner.name)
    }
}

impl fmt::Debug for RabbitMqProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitMqProvider")
            .field("name", &self.inner.name)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}
