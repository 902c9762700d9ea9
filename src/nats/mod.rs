//! The NATS driver, on [async-nats](https://docs.rs/async-nats): core NATS or JetStream, as the
//! connection's `mode` says.
//!
//! # Mapping
//!
//! - **Topics** are subjects. Wildcards (`orders.*`, `orders.>`) work in subscriptions. In
//!   JetStream mode a topic must be captured by a stream: the configured `stream` (created at
//!   connect when missing, unless `missing = "fail"`), or else whichever stream captures the
//!   subject.
//! - **Body** is the payload. **Headers** are NATS headers, one value each; a header name must
//!   be printable ASCII without `:`, a value must hold no line break, and NATS trims spaces at
//!   the ends of values. A header that cannot be written fails the publish.
//! - **Id** travels in the [`MESSAGE_ID_HEADER`] (`Nats-Msg-Id`), which JetStream also uses to
//!   drop duplicate publishes within the stream's duplicate window, so publishing the same
//!   message twice stores it once. **Timestamp** travels in the [`TIMESTAMP_HEADER`] as
//!   milliseconds since the Unix epoch, unless the id is a UUIDv7 made in that same
//!   millisecond (as ids from [`Message::new`] nearly always are): then the id carries it, and
//!   the message is one header shorter. A dead letter keeps its id in the
//!   [`ORIGINAL_ID_HEADER`] and gets a `Nats-Msg-Id` of its own, so a stream that holds the
//!   original does not drop it as a duplicate. These three names are reserved: a message may
//!   not carry them as its own headers. A message from another client without them gets the
//!   id `{stream}:{sequence}` (JetStream) or a fresh id (core), and the time its UUIDv7
//!   `Nats-Msg-Id` holds, or else the time the stream stored it (JetStream) or the time it
//!   arrived (core).
//! - **Trace id** travels in the `trace_id` header (see [`crate::propagation`]).
//!
//! Each subscription handles its messages one at a time, in the order they arrive; more
//! subscriptions (of one group, to share the work) handle more at once.
//!
//! # Core NATS: at most once
//!
//! `publish` returns once the message is written and flushed to the server: the server has it,
//! but core NATS stores nothing, so a message nobody subscribes to is gone, and a message lost
//! in a disconnection is not sent again. A subscription with a group is a queue group (each
//! message goes to one member); without a group every subscriber gets every message.
//!
//! Core NATS cannot redeliver. A failing handler is retried in this process with the `retry`
//! policy; when every attempt failed, the message is logged with its trace id and published to
//! the dead-letter subject (`{topic}.dlq` by default; empty turns it off), itself a core publish
//! that reaches only current subscribers of that subject. Messages buffered for a subscription
//! when it stops are dropped (and counted in a warning). Each subscription buffers at most
//! `pending_limit` messages; past that the server's messages are dropped and a slow-consumer
//! warning is logged.
//!
//! # JetStream: at least once
//!
//! `publish` returns once the stream acknowledged the message. While the server is
//! unreachable, it keeps trying (with the same `Nats-Msg-Id`, so a retry is not stored twice)
//! until the context's deadline.
//!
//! A subscription is a pull consumer with explicit acknowledgements filtered on the topic:
//! durable and shared by the members of a group (named by `consumer.durable_name`, by default
//! `{group}-{topic}`), or an ephemeral one of its own without a group, deleted when the
//! subscription stops. `subscribe` returns once the consumer exists. A new consumer starts
//! with the messages published after it was created unless `consumer.deliver = "all"`.
//!
//! Each delivery runs the handler once. `Ok` acknowledges the message. `Err` (or a panic) sends
//! a `nak` with the `retry` policy's backoff as delay, so the server delivers it again; after
//! `retry.attempts` deliveries (the server's delivery count) the message is published to the
//! dead-letter subject with the error headers of [`crate::propagation::dead_letter`], then
//! terminated. If the dead-letter subject is captured by a stream it is stored there;
//! otherwise it is a core publish. While a handler runs, the server is told every half
//! `consumer.ack_wait` that it is still at work; a message whose subscriber vanished is
//! delivered again after `consumer.ack_wait`. At most `consumer.max_ack_pending` messages are
//! unacknowledged at once, and a subscription pulls at most 100 at a time. When a
//! subscription stops, the in-flight handler finishes and is acknowledged, and messages
//! already pulled but not started are given back with a `nak`. A consumer the server lost
//! (deleted, or gone with a restart) is created again, starting after the last message the
//! subscription handled.
//!
//! # Connection
//!
//! The settings are [`NatsConfig`], the `[brokers.<name>.nats]` table: servers, client name,
//! one way to authenticate (user and password, token, NKey seed or credentials file; without
//! them, a `user:password@` or `token@` in a URL is used), TLS, mode, retry policy,
//! dead-letter subject, and for JetStream the `stream` and `consumer` tables.
//!
//! The first connect retries with backoff until the connect context's deadline, so a server
//! that is still starting is waited for; a refused authentication or TLS handshake fails at
//! once. After that
//! the client reconnects by itself with capped exponential backoff, resubscribes, and logs
//! every connection event. Publishing while disconnected waits up to the context's deadline,
//! then fails with [`Error::DeadlineExceeded`]; a core message queued by then may still be
//! sent once the connection is back. Every error names the connection, the operation and the
//! subject.
//!
//! # TLS and WebSocket
//!
//! TLS is on when the `tls` table is present and enabled (`[brokers.<name>.nats.tls]`, the keys
//! every driver shares), or when a URL is `tls://` or `wss://`; then every server of the
//! connection must speak TLS. The client checks the server's certificate against the table's
//! `ca_file` (the system's trusted roots without one, also when only the URL asks for TLS),
//! against `server_name` instead of the host when it is set, and shows `cert_file` and
//! `key_file` to servers that verify clients. The rustls configuration is the crate's own (see
//! the `tls` feature), so no process-wide crypto provider is needed. async-nats still reads
//! the system's trusted roots on each TLS connect, even with a `ca_file`, and fails when the
//! system store reports errors (for example `SSL_CERT_FILE` naming a missing file). On a
//! `nats://` or `tls://` URL the connection starts in plain text and upgrades to TLS after
//! the server's first message, as NATS servers expect; starting with TLS (a server's
//! `handshake_first`) is not offered.
//!
//! `ws://` and `wss://` URLs reach the server's WebSocket listener instead, plain or with TLS;
//! the NATS protocol over it is the same. A connection uses WebSocket for every server or for
//! none, and a `ws://` URL with the `tls` table on is refused rather than used without TLS.
//!
//! Failures of TLS are final, like a refused login: a certificate the client does not trust,
//! a name that does not match, a client certificate the server refuses. So is a server that
//! demands TLS from a connection that does not turn it on. A build without the `tls` feature
//! refuses a connection that asks for TLS before it sends anything.
//!
//! # Errors
//!
//! Each error's [`Origin`] names the connection, the operation and the subject (the server
//! addresses for connect, ping and close):
//!
//! - [`Error::Broker`] when the server or the client failed: refused authentication, a failed
//!   TLS handshake, no stream captures a subject, a publish the stream rejected, a consumer
//!   that cannot be created. The async-nats error is its [`source`](std::error::Error::source).
//! - [`Error::Cancelled`] and [`Error::DeadlineExceeded`] when the context stopped the
//!   operation, for example a publish during an outage.
//! - [`Error::Config`] when a file the `tls` table names cannot be read or used, naming the key
//!   (for example `nats.tls.ca_file`).
//! - [`Error::Unsupported`] for a message whose headers NATS cannot carry, and for TLS in a
//!   build without the `tls` feature.
//! - [`Error::Closed`] for any operation after [`Provider::close`].
//!
//! # Dead letters
//!
//! The dead-letter subject is made from the subject the message was published to, so a
//! wildcard subscription to `orders.*` dead-letters a message of `orders.eu` to
//! `orders.eu.dlq`. A subscription whose pattern also matches its dead-letter subjects (for
//! example `orders.>`) receives its own dead letters; one that fails again is dropped (core)
//! or terminated (JetStream) rather than dead-lettered a second time. A template outside the
//! pattern, such as `dlq.{topic}`, avoids that.
//!
//! Handler failures are not errors of an operation: they are logged (with the trace id) and
//! dead-lettered as described above.
//!
//! [`NatsProvider::client`] and [`NatsProvider::jetstream`] give the native client for what
//! this interface does not cover.

mod codec;
mod core;
mod jetstream;

use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::{Client, ConnectError, ConnectErrorKind, ConnectOptions, Event, ServerAddr};
use async_trait::async_trait;
use futures_util::future::{self, BoxFuture};
use futures_util::{FutureExt, TryFutureExt};
use url::Url;

#[cfg(feature = "tls")]
use crate::config::ConfigError;
use crate::config::{NatsConfig, NatsMode, SecretUrl};
use crate::context::Context;
use crate::error::{Error, Operation, Origin, Result};
use crate::handler::{Dispatcher, Handler, Source};
use crate::message::Message;
use crate::propagation;
use crate::provider::{Provider, SubscribeOptions};
use crate::subscription::{Subscription, Subscriptions};

const DRIVER: &str = "nats";

/// The header that carries a message's id; JetStream de-duplicates publishes by it.
pub const MESSAGE_ID_HEADER: &str = "Nats-Msg-Id";

/// On a dead letter: the message's id, because its `Nats-Msg-Id` differs from the original's so
/// a stream holding both does not drop it as a duplicate.
pub const ORIGINAL_ID_HEADER: &str = "Broker-Msg-Id";

/// The header that carries a message's timestamp, in milliseconds since the Unix epoch.
pub const TIMESTAMP_HEADER: &str = "Broker-Timestamp-Ms";

/// How long closing waits for the client to flush what it still holds.
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// How long dead-lettering a message may take before the message is given up on.
const DEAD_LETTER_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection to a NATS server or cluster, in core or JetStream mode.
pub struct NatsProvider {
    shared: Arc<Shared>,
    subscriptions: Subscriptions,
}

/// What the provider and its subscriptions share.
struct Shared {
    name: String,
    address: String,
    config: NatsConfig,
    client: Client,
    jetstream: Option<async_nats::jetstream::Context>,
}

impl Shared {
    fn origin(&self, operation: Operation, target: &str) -> Origin {
        Origin::new(DRIVER, &self.name, operation, target)
    }

    fn source(&self, topic: &str) -> Source {
        Source {
            driver: DRIVER,
            connection: self.name.as_str().into(),
            topic: topic.into(),
        }
    }

    /// Where a message from `subject` goes once every attempt to handle it failed.
    fn dead_letter_target(&self, subject: &str, message: &Message) -> DeadLetter {
        let template = &self.config.dead_letter_subject;
        if template.is_empty() {
            DeadLetter::Off
        } else if message
            .header(propagation::DEAD_LETTER_TOPIC_HEADER)
            .is_some()
        {
            DeadLetter::AlreadyDead
        } else {
            DeadLetter::To(template.replace("{topic}", subject))
        }
    }
}

/// Where a message goes once every attempt to handle it failed.
enum DeadLetter {
    /// To this subject.
    To(String),
    /// Nowhere: dead-lettering is off.
    Off,
    /// Nowhere: it is a dead letter already (a subscription that also reads its dead-letter
    /// subjects), and dead-lettering it again could loop.
    AlreadyDead,
}

impl DeadLetter {
    /// Why a message is dropped instead of dead-lettered, for the logs.
    fn reason(&self) -> &'static str {
        match self {
            DeadLetter::To(_) => "",
            DeadLetter::Off => "no dead-letter subject is set",
            DeadLetter::AlreadyDead => "it is a dead letter already and is not dead-lettered twice",
        }
    }
}

impl NatsProvider {
    /// Connects the connection `name` within `ctx`, waiting for a server that is still
    /// starting until the context's deadline. In JetStream mode it also makes sure the
    /// configured stream exists.
    pub async fn connect(ctx: &Context, name: &str, config: NatsConfig) -> Result<NatsProvider> {
        let address = config
            .all_urls()
            .map(|url| url.host_port())
            .collect::<Vec<_>>()
            .join(",");
        let origin = || Origin::new(DRIVER, name, Operation::Connect, address.as_str());

        // Credentials in URLs go through the connect options (see `connect_options`): the
        // client would only log them.
        let servers = config
            .all_urls()
            .map(|url| ServerAddr::from_url(without_credentials(url.expose())))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| Error::broker(origin(), error))?;
        let options = connect_options(name, &config)
            .await
            .map_err(|error| Error::broker(origin(), error))?;
        let options = with_tls(options, name, &config, origin)?;
        let client = ctx
            .run(
                origin,
                first_connect(name, options, servers, config.uses_tls(), origin),
            )
            .await?;

        let jetstream = match config.mode {
            NatsMode::Core => None,
            NatsMode::Jetstream => {
                let context = async_nats::jetstream::new(client.clone());
                let prepared = ctx
                    .run(origin, jetstream::prepare(&context, &config, origin))
                    .await;
                if let Err(error) = prepared {
                    // Best effort: the setup error is the one worth reporting.
                    let _ = client.drain().await;
                    return Err(error);
                }
                Some(context)
            }
        };

        tracing::info!(
            connection = %name,
            driver = %DRIVER,
            address = %address,
            mode = ?config.mode,
            tls = config.uses_tls(),
            websocket = config.uses_websocket(),
            "connected to NATS"
        );
        Ok(NatsProvider {
            shared: Arc::new(Shared {
                name: name.to_owned(),
                address,
                config,
                client,
                jetstream,
            }),
            subscriptions: Subscriptions::new(),
        })
    }

    /// The native async-nats client, for what this interface does not cover.
    pub fn client(&self) -> &Client {
        &self.shared.client
    }

    /// The JetStream context, in JetStream mode.
    pub fn jetstream(&self) -> Option<&async_nats::jetstream::Context> {
        self.shared.jetstream.as_ref()
    }

    /// The connection's settings.
    pub fn config(&self) -> &NatsConfig {
        &self.shared.config
    }

    fn check_open(&self, operation: Operation, target: &str) -> Result<()> {
        self.subscriptions
            .check_open(|| self.shared.origin(operation, target))
    }
}

/// The client options of a connection: name, authentication, reconnect backoff and logging.
async fn connect_options(name: &str, config: &NatsConfig) -> Result<ConnectOptions, String> {
    let mut options = match &config.credentials_file {
        Some(path) => ConnectOptions::with_credentials_file(path)
            .await
            .map_err(|error| {
                format!(
                    "cannot read the credentials file {}: {error}",
                    path.display()
                )
            })?,
        None => ConnectOptions::new(),
    };
    if let Some(token) = &config.token {
        options = options.token(token.expose().to_owned());
    }
    if let (Some(user), Some(password)) = (&config.user, &config.password) {
        options = options.user_and_password(user.clone(), password.expose().to_owned());
    }
    if let Some(seed) = &config.nkey {
        options = options.nkey(seed.expose().to_owned());
    }
    let configured = config.token.is_some()
        || config.user.is_some()
        || config.nkey.is_some()
        || config.credentials_file.is_some();
    if !configured {
        // The client ignores credentials in server URLs, so they are applied here:
        // `nats://user:password@host` or `nats://token@host`.
        if let Some(url) = config
            .all_urls()
            .map(SecretUrl::expose)
            .find(|url| !url.username().is_empty())
        {
            let user = percent_decode(url.username());
            options = match url.password() {
                Some(password) => options.user_and_password(user, percent_decode(password)),
                None => options.token(user),
            };
        }
    }

    let events_name = name.to_owned();
    let delays_name = name.to_owned();
    Ok(options
        .name(config.name.as_deref().unwrap_or(name))
        .subscription_capacity(config.pending_limit)
        .max_reconnects(None)
        .reconnect_delay_callback(move |attempt| {
            let delay = reconnect_delay(attempt);
            if attempt > 1 {
                tracing::info!(
                    connection = %delays_name,
                    driver = %DRIVER,
                    attempt,
                    delay_ms = delay.as_millis(),
                    "reconnecting to NATS"
                );
            }
            delay
        })
        .event_callback(move |event| {
            let name = events_name.clone();
            async move { log_event(&name, event) }
        }))
}

/// `options` with the TLS the connection asks for: the rustls configuration built from the
/// `tls` table (the system's roots when a `tls://` or `wss://` URL asks for TLS without one).
#[cfg(feature = "tls")]
fn with_tls(
    options: ConnectOptions,
    name: &str,
    config: &NatsConfig,
    origin: impl Fn() -> Origin,
) -> Result<ConnectOptions> {
    if !config.uses_tls() {
        return Ok(options);
    }
    // Parsed configurations refuse this already; one built in code may not have been.
    if let Some((key, message)) = config.plain_websocket_with_tls() {
        return Err(ConfigError::invalid_value(name, &format!("nats.{key}"), message).into());
    }
    let default = crate::config::TlsConfig::default();
    let settings = config.tls().unwrap_or(&default);
    let client_config = crate::tls::client_config(settings, name, "nats.tls")?;

    tracing::debug!(
        connection = %name,
        driver = %DRIVER,
        address = %origin().target,
        client_certificate = settings.cert_file.is_some(),
        "TLS on"
    );
    let mut options = options.tls_client_config(Arc::unwrap_or_clone(client_config));
    // Over WebSocket, TLS comes from the wss:// URL; `require_tls` is about upgrading a NATS
    // connection.
    if !config.uses_websocket() {
        options = options.require_tls(true);
    }
    // TODO: offer async-nats's `tls_first` (TLS before the server's INFO, for servers whose
    // tls block sets `handshake_first`, nats-server 2.10.4 and later) once the tests have
    // such a server to run against; untested, it could break unnoticed.
    Ok(options)
}

/// `options` unchanged, or the refusal of a connection that asks for TLS in a build without
/// the `tls` feature.
#[cfg(not(feature = "tls"))]
fn with_tls(
    options: ConnectOptions,
    _name: &str,
    config: &NatsConfig,
    origin: impl Fn() -> Origin,
) -> Result<ConnectOptions> {
    if config.uses_tls() {
        return Err(crate::tls::not_built(origin()));
    }
    Ok(options)
}

/// `url` without its user and password.
fn without_credentials(url: &Url) -> Url {
    let mut bare = url.clone();
    // Only URLs that cannot carry credentials refuse these, and those have none to remove.
    let _ = bare.set_username("");
    let _ = bare.set_password(None);
    bare
}

/// `text` with every `%XX` escape of a URL's user or password decoded.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let escaped = (bytes[index] == b'%')
            .then(|| text.get(index + 1..index + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                decoded.push(byte);
                index += 3;
            }
            None => {
                decoded.push(bytes[index]);
                index += 1;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

/// Connects, trying again with backoff until it works, the server refuses the login or the
/// TLS handshake, or the caller's context stops it. `tls` says whether the connection asked
/// for TLS.
async fn first_connect(
    name: &str,
    options: ConnectOptions,
    servers: Vec<ServerAddr>,
    tls: bool,
    origin: impl Fn() -> Origin,
) -> Result<Client> {
    let mut attempt: u32 = 1;
    loop {
        // A server that demands TLS from a connection that gave no TLS configuration makes the
        // client build one with the process's default crypto provider, and it panics when
        // there is none: report that instead of unwinding.
        let connecting = AssertUnwindSafe(options.clone().connect(servers.as_slice()));
        let error = match connecting.catch_unwind().await {
            Ok(Ok(client)) => return Ok(client),
            Ok(Err(error)) => error,
            Err(_) => return Err(Error::broker(origin(), TlsDemanded(None))),
        };
        if is_tls_failure(&error) && !tls {
            return Err(Error::broker(origin(), TlsDemanded(Some(error))));
        }
        // Waiting does not change a refused login or a certificate that does not fit.
        if is_tls_failure(&error)
            || matches!(
                error.kind(),
                ConnectErrorKind::Authentication | ConnectErrorKind::AuthorizationViolation
            )
        {
            return Err(Error::broker(origin(), error));
        }

        let delay = Duration::from_millis(100)
            .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1)))
            .min(Duration::from_secs(2));
        tracing::info!(
            connection = %name,
            driver = %DRIVER,
            attempt,
            delay_ms = delay.as_millis(),
            error = %error,
            "NATS is not reachable yet; trying again"
        );
        tokio::time::sleep(delay).await;
        attempt = attempt.saturating_add(1);
    }
}

/// The failure of a server that demands TLS from a connection that did not ask for it.
#[derive(Debug, thiserror::Error)]
#[error(
    "the server requires TLS, which this connection does not turn on: give it a `nats.tls` \
     table or tls:// URLs (with the crate's `tls` feature)"
)]
struct TlsDemanded(#[source] Option<ConnectError>);

/// Whether connecting failed in TLS: setting it up, or a handshake rustls refused (a
/// certificate that does not fit, an alert from the server).
fn is_tls_failure(error: &ConnectError) -> bool {
    error.kind() == ConnectErrorKind::Tls || is_handshake_failure(error)
}

fn is_handshake_failure(error: &ConnectError) -> bool {
    // The client passes the TLS stream's I/O error on, with rustls's error inside.
    std::error::Error::source(error)
        .and_then(|source| source.downcast_ref::<std::io::Error>())
        .and_then(std::io::Error::get_ref)
        .is_some_and(|inner| inner.is::<async_nats::rustls::Error>())
}

/// The wait before reconnect attempt `attempt` (1 for the first): none, then 100 ms doubling
/// up to 5 s.
fn reconnect_delay(attempt: usize) -> Duration {
    if attempt <= 1 {
        return Duration::ZERO;
    }
    let exponent = u32::try_from(attempt - 2).unwrap_or(u32::MAX).min(16);
    Duration::from_millis(100)
        .saturating_mul(1 << exponent)
        .min(Duration::from_secs(5))
}

fn log_event(name: &str, event: Event) {
    match event {
        Event::Connected => tracing::info!(connection = %name, driver = %DRIVER, "NATS connected"),
        Event::Disconnected => {
            tracing::warn!(connection = %name, driver = %DRIVER, "NATS disconnected")
        }
        Event::LameDuckMode => tracing::warn!(
            connection = %name,
            driver = %DRIVER,
            "the NATS server is shutting down (lame duck mode)"
        ),
        Event::Draining => tracing::info!(connection = %name, driver = %DRIVER, "NATS draining"),
        Event::Closed => tracing::info!(connection = %name, driver = %DRIVER, "NATS closed"),
        Event::SlowConsumer(sid) => tracing::warn!(
            connection = %name,
            driver = %DRIVER,
            subscription = sid,
            "slow consumer: the subscription's buffer is full and messages were dropped"
        ),
        Event::ServerError(error) => {
            tracing::warn!(connection = %name, driver = %DRIVER, error = %error, "NATS server error")
        }
        Event::ClientError(error) => {
            tracing::warn!(connection = %name, driver = %DRIVER, error = %error, "NATS client error")
        }
    }
}

#[async_trait]
impl Provider for NatsProvider {
    fn driver(&self) -> &'static str {
        DRIVER
    }

    fn name(&self) -> &str {
        &self.shared.name
    }

    // Written out rather than as an `async fn`, so that the message is encoded before the
    // future is made: the future, which lives until the server has the message, then keeps no
    // room for it, and a core publish fits one allocation small enough for the allocator's
    // per-thread cache. Hundreds of publishes in flight otherwise take the allocator's shared
    // lock for every one.
    fn publish<'a, 'b, 'c, 'f>(
        &'a self,
        ctx: &'b Context,
        topic: &'c str,
        message: Message,
    ) -> BoxFuture<'f, Result<()>>
    where
        'a: 'f,
        'b: 'f,
        'c: 'f,
        Self: 'f,
    {
        if let Err(error) = self.check_open(Operation::Publish, topic) {
            return Box::pin(future::ready(Err(error)));
        }
        // The codec writes the context's request id as the trace id, as
        // `propagation::inject` does, straight into the NATS headers.
        let trace_id = ctx.request_id();
        let origin = move || self.shared.origin(Operation::Publish, topic);
        let unsupported = |reason| Error::Unsupported {
            origin: origin(),
            reason,
        };

        match &self.shared.jetstream {
            None => match codec::encode(message, trace_id) {
                Ok((headers, body)) => {
                    let sent = core::publish(&self.shared.client, topic, headers, body)
                        .map_err(move |error| Error::broker(origin(), error));
                    Box::pin(ctx.run(origin, sent))
                }
                Err(reason) => Box::pin(future::ready(Err(unsupported(reason)))),
            },
            Some(context) => {
                let headers = match codec::encode_headers(&message, trace_id) {
                    Ok(headers) => headers,
                    Err(reason) => return Box::pin(future::ready(Err(unsupported(reason)))),
                };
                let acknowledged = async move {
                    let encode = || codec::encode_headers(&message, trace_id);
                    let body = message.body.clone();
                    jetstream::publish(&self.shared.name, context, topic, headers, body, encode)
                        .await
                        .map_err(|error| Error::broker(origin(), error))
                };
                Box::pin(ctx.run(origin, acknowledged))
            }
        }
    }

    async fn subscribe(
        &self,
        ctx: &Context,
        topic: &str,
        options: SubscribeOptions,
        handler: Arc<dyn Handler>,
    ) -> Result<Subscription> {
        self.check_open(Operation::Subscribe, topic)?;
        let origin = || self.shared.origin(Operation::Subscribe, topic);
        let dispatcher = Dispatcher::new(
            handler,
            self.shared.config.retry.clone(),
            self.shared.source(topic),
        );
        let group = options.group;

        let subscription = match &self.shared.jetstream {
            None => {
                let consumer = ctx
                    .run(
                        origin,
                        core::Consumer::start(&self.shared, topic, group.as_deref(), dispatcher),
                    )
                    .await?;
                self.subscriptions
                    .spawn(ctx, topic, |stop| consumer.run(stop))
            }
            Some(context) => {
                let consumer = ctx
                    .run(
                        origin,
                        jetstream::Consumer::start(
                            &self.shared,
                            context,
                            topic,
                            group.as_deref(),
                            dispatcher,
                        ),
                    )
                    .await?;
                self.subscriptions
                    .spawn(ctx, topic, |stop| consumer.run(stop))
            }
        };

        tracing::debug!(
            connection = %self.shared.name,
            driver = %DRIVER,
            topic,
            group = group.as_deref().unwrap_or(""),
            "subscribed"
        );
        Ok(subscription)
    }

    async fn ping(&self, ctx: &Context) -> Result<()> {
        self.check_open(Operation::Ping, &self.shared.address)?;
        let origin = || self.shared.origin(Operation::Ping, &self.shared.address);
        let state = self.shared.client.connection_state();
        if state != State::Connected {
            return Err(Error::broker(
                origin(),
                format!("not connected to the server (the client is {state})"),
            ));
        }
        ctx.run(origin, async {
            core::round_trip(&self.shared.client)
                .await
                .map_err(|error| Error::broker(origin(), error))
        })
        .await
    }

    async fn close(&self) -> Result<()> {
        if self.subscriptions.is_closing() {
            return Ok(());
        }
        self.subscriptions.close().await;

        let origin = || self.shared.origin(Operation::Close, &self.shared.address);
        let flushed = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, self.shared.client.flush()).await;
        let result = match flushed {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(Error::broker(origin(), error)),
            Err(_) => Err(Error::broker(
                origin(),
                format!(
                    "the client could not flush within {CLOSE_FLUSH_TIMEOUT:?}: \
                     messages it still held may be lost"
                ),
            )),
        };
        if let Err(error) = self.shared.client.drain().await {
            tracing::debug!(connection = %self.shared.name, error = %error, "drain failed");
        }
        tracing::info!(connection = %self.shared.name, driver = %DRIVER, "closed");
        result
    }
}

impl fmt::Display for NatsProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{DRIVER}({}: {})", self.shared.name, self.shared.address)
    }
}

impl fmt::Debug for NatsProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsProvider")
            .field("name", &self.shared.name)
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_credentials_are_percent_decoded() {
        assert_eq!(percent_decode("p%40ss%3Aw0rd"), "p@ss:w0rd");
        assert_eq!(percent_decode("plain"), "plain");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }

    #[test]
    fn reconnects_back_off_up_to_a_cap() {
        assert_eq!(reconnect_delay(1), Duration::ZERO);
        assert_eq!(reconnect_delay(2), Duration::from_millis(100));
        assert_eq!(reconnect_delay(4), Duration::from_millis(400));
        assert_eq!(reconnect_delay(60), Duration::from_secs(5));
    }
}
