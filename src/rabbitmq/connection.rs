//! The connection and its replacement after a loss.
//!
//! amqprs does not reconnect. A [`Link`] holds the current [`Session`] (a connection with its
//! publishing channel) and a supervisor task that notices when it is lost (network failure,
//! missed heartbeats, the server closing the connection or the publishing channel), drops it,
//! and opens a new one with capped exponential backoff. Publishers and consumers wait for the
//! next session through [`Link::session`].

use std::sync::{Arc, Weak};
use std::time::Duration;

use amqprs::Close;
use amqprs::callbacks::ConnectionCallback;
use amqprs::channel::Channel;
use amqprs::connection::{Connection, OpenConnectionArguments};
use async_trait::async_trait;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::DRIVER;
use super::codec::check_short;
use super::confirms::Publisher;
use super::error::RabbitMqError;
use super::tls::{Tls, is_tls};
use super::topology::{ChannelWatch, declare_exchanges};
use crate::config::{RabbitMqConfig, SecretUrl};

/// How long one connection attempt may take during reconnection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// How often the supervisor checks that the connection is still open, besides the client's
/// own failure notice.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// How long closing a channel or connection may wait for the server's answer: a half-open
/// connection never answers.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Closes `channel`, best effort and without waiting long.
pub(super) async fn close_channel(channel: Channel) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, channel.close()).await;
}

/// Closes `connection`, best effort and without waiting long.
async fn close_connection(connection: Connection) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, connection.close()).await;
}

/// One open connection with its publishing channel.
pub(super) struct Session {
    pub(super) connection: Connection,
    pub(super) publisher: Publisher,
    /// Fired once the connection is gone.
    pub(super) lost: CancellationToken,
    /// `host:port` of the server.
    pub(super) address: String,
    /// Whether the connection runs over TLS.
    pub(super) tls: bool,
}

impl Session {
    /// Closes the publishing channel and the connection, best effort.
    async fn close(&self) {
        self.lost.cancel();
        close_channel(self.publisher.channel().clone()).await;
        close_connection(self.connection.clone()).await;
    }
}

/// The current session of a provider, replaced after each loss.
pub(super) struct Link {
    name: String,
    config: RabbitMqConfig,
    /// How `amqps://` servers are reached, kept for reconnections.
    tls: Option<Tls>,
    current: watch::Sender<Option<Arc<Session>>>,
    closing: CancellationToken,
}

impl Link {
    /// Connects to the first configured server that answers and starts the supervisor;
    /// `amqps://` servers are reached through `tls`.
    pub(super) async fn open(
        name: &str,
        config: &RabbitMqConfig,
        tls: Option<Tls>,
    ) -> Result<Arc<Link>, RabbitMqError> {
        let session = open_any(name, config, tls.as_ref()).await?;
        tracing::info!(
            connection = %name,
            driver = %DRIVER,
            address = %session.address,
            tls = session.tls,
            "connected"
        );

        let link = Arc::new(Link {
            name: name.to_owned(),
            config: config.clone(),
            tls,
            current: watch::Sender::new(Some(Arc::new(session))),
            closing: CancellationToken::new(),
        });
        tokio::spawn(supervise(Arc::downgrade(&link), link.closing.clone()));
        Ok(link)
    }

    /// The current session, if connected.
    pub(super) fn current(&self) -> Option<Arc<Session>> {
        self.current.borrow().clone()
    }

    /// The current session if it is connected and the link is not closing, without waiting.
    pub(super) fn live(&self) -> Option<Arc<Session>> {
        if self.closing.is_cancelled() {
            return None;
        }
        self.current
            .borrow()
            .as_ref()
            .filter(|session| !session.lost.is_cancelled())
            .cloned()
    }

    /// The current session, waiting for a reconnection if needed; `None` once closing.
    pub(super) async fn session(&self) -> Option<Arc<Session>> {
        if let Some(session) = self.live() {
            return Some(session);
        }

        let mut receiver = self.current.subscribe();
        tokio::select! {
            biased;
            _ = self.closing.cancelled() => None,
            session = receiver.wait_for(|session| {
                session.as_ref().is_some_and(|session| !session.lost.is_cancelled())
            }) => {
                session.ok().and_then(|session| session.clone())
            }
        }
    }

    /// Whether [`Link::close`] has been called.
    pub(super) fn is_closing(&self) -> bool {
        self.closing.is_cancelled()
    }

    /// Stops reconnecting and closes the current session.
    pub(super) async fn close(&self) {
        self.closing.cancel();
        if let Some(session) = self.current.send_replace(None) {
            session.close().await;
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.closing.cancel();
        // Ends the session's watcher, whose handle on the connection would keep it open.
        if let Some(session) = self.current.borrow().as_ref() {
            session.lost.cancel();
        }
    }
}

/// Watches the current session and replaces it when it is lost, until the link closes.
async fn supervise(link: Weak<Link>, closing: CancellationToken) {
    loop {
        let Some(session) = link.upgrade().and_then(|link| link.current()) else {
            return;
        };
        tokio::select! {
            biased;
            _ = closing.cancelled() => return,
            _ = session.lost.cancelled() => {}
        }
        if closing.is_cancelled() {
            return;
        }

        let Some((name, config, tls)) = link
            .upgrade()
            .map(|link| (link.name.clone(), link.config.clone(), link.tls.clone()))
        else {
            return;
        };
        tracing::warn!(
            connection = %name,
            driver = %DRIVER,
            address = %session.address,
            "connection lost; reconnecting"
        );
        if let Some(link) = link.upgrade() {
            link.current.send_replace(None);
        }
        // The old connection may still be half open; close it without waiting on it.
        tokio::spawn(async move {
            let _ = tokio::time::timeout(CONNECT_TIMEOUT, session.close()).await;
        });

        let mut attempt: u32 = 0;
        let replacement = loop {
            attempt = attempt.saturating_add(1);
            let delay = backoff(&config, attempt);
            tracing::info!(
                connection = %name,
                driver = %DRIVER,
                attempt,
                delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                "reconnecting after a delay"
            );
            tokio::select! {
                _ = closing.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            let opened =
                tokio::time::timeout(CONNECT_TIMEOUT, open_any(&name, &config, tls.as_ref())).await;
            match opened {
                Ok(Ok(session)) => break session,
                Ok(Err(error)) => tracing::warn!(
                    connection = %name,
                    driver = %DRIVER,
                    attempt,
                    error = %error,
                    "reconnection failed"
                ),
                Err(_) => tracing::warn!(
                    connection = %name,
                    driver = %DRIVER,
                    attempt,
                    "reconnection timed out"
                ),
            }
        };

        let Some(link) = link.upgrade() else {
            replacement.close().await;
            return;
        };
        if closing.is_cancelled() {
            replacement.close().await;
            return;
        }
        tracing::info!(
            connection = %name,
            driver = %DRIVER,
            address = %replacement.address,
            tls = replacement.tls,
            attempt,
            "reconnected"
        );
        link.current.send_replace(Some(Arc::new(replacement)));
    }
}

/// The wait before reconnection attempt `attempt` (1 for the first).
pub(super) fn backoff(config: &RabbitMqConfig, attempt: u32) -> Duration {
    let exponent = attempt.saturating_sub(1).min(30);
    config
        .reconnect_backoff
        .saturating_mul(1 << exponent)
        .min(config.reconnect_max_backoff)
}

/// Tries every configured server in turn; the error is the last server's.
async fn open_any(
    name: &str,
    config: &RabbitMqConfig,
    tls: Option<&Tls>,
) -> Result<Session, RabbitMqError> {
    let mut last = None;
    for url in config.all_urls() {
        match open_session(name, config, url, tls).await {
            Ok(session) => return Ok(session),
            Err(error) => {
                tracing::debug!(
                    connection = %name,
                    driver = %DRIVER,
                    address = %url.host_port(),
                    error = %error,
                    "cannot connect"
                );
                last = Some(error);
            }
        }
    }
    Err(last.unwrap_or_else(|| RabbitMqError::Invalid {
        what: "a server list",
        value: String::new(),
        reason: "no server is configured",
    }))
}

/// `host:port` of `url`, with AMQP's default ports filled in.
pub(super) fn address_of(url: &SecretUrl) -> String {
    format!(
        "{}:{}",
        url.expose().host_str().unwrap_or_default(),
        port_of(url)
    )
}

/// The port of `url`: 5671 for `amqps://` and 5672 for `amqp://` unless it names one.
fn port_of(url: &SecretUrl) -> u16 {
    let default = if is_tls(url) { 5671 } else { 5672 };
    url.expose().port().unwrap_or(default)
}

async fn open_session(
    name: &str,
    config: &RabbitMqConfig,
    url: &SecretUrl,
    tls: Option<&Tls>,
) -> Result<Session, RabbitMqError> {
    let address = address_of(url);
    let args = arguments(name, config, url, tls)?;

    let connection = Connection::open(&args)
        .await
        .map_err(|error| connect_error(&address, is_tls(url), error))?;
    let lost = CancellationToken::new();
    connection
        .register_callback(LossCallback {
            name: name.to_owned(),
            lost: lost.clone(),
        })
        .await?;
    tokio::spawn(watch_connection(connection.clone(), lost.clone()));

    let setup = async {
        let channel = connection.open_channel(None).await?;
        let watch = ChannelWatch::register(&channel).await?;
        declare_exchanges(&channel, &watch, config).await?;
        close_channel(channel).await;

        let channel = connection.open_channel(None).await?;
        Publisher::new(channel, config.confirms, lost.clone(), address.clone()).await
    };
    match setup.await {
        Ok(publisher) => Ok(Session {
            connection,
            publisher,
            lost,
            address,
            tls: is_tls(url),
        }),
        Err(error) => {
            lost.cancel();
            close_connection(connection).await;
            Err(error)
        }
    }
}

/// The amqprs arguments of a connection to `url`, over `tls` when it is `amqps://`.
fn arguments(
    name: &str,
    config: &RabbitMqConfig,
    secret_url: &SecretUrl,
    tls: Option<&Tls>,
) -> Result<OpenConnectionArguments, RabbitMqError> {
    let url = secret_url.expose();
    let host = url.host_str().unwrap_or_default();
    let port = port_of(secret_url);
    let user = percent_decode(url.username());
    let user = if user.is_empty() {
        "guest".to_owned()
    } else {
        user
    };
    let password = url
        .password()
        .map_or_else(|| "guest".to_owned(), percent_decode);
    let vhost = match url.path().trim_start_matches('/') {
        "" => "/".to_owned(),
        path => percent_decode(path),
    };
    let heartbeat = u16::try_from(config.heartbeat.as_secs()).unwrap_or(u16::MAX);
    let connection_name = match config.connection_name.as_str() {
        "" => name,
        configured => configured,
    };
    check_short("a virtual host", &vhost)?;
    check_short("a connection name", connection_name)?;

    let mut args = OpenConnectionArguments::new(host, port, &user, &password);
    args.virtual_host(&vhost)
        .heartbeat(heartbeat)
        .connection_name(connection_name);
    if is_tls(secret_url) {
        // The provider builds its TLS whenever a server is amqps://, so this is a slip of
        // this driver's, reported rather than answered with a plain connection.
        let Some(tls) = tls else {
            return Err(RabbitMqError::invalid(
                "a server URL",
                host,
                "amqps:// was given no TLS settings",
            ));
        };
        tls.apply(&mut args, url.host());
    }
    Ok(args)
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let decoded = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match decoded {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Words of rustls's messages about a failed handshake.
const TLS_SIGNS: [&str; 3] = ["certificate", "alert", "handshake"];

/// Names a failed connection attempt.
///
/// RabbitMQ answers bad credentials by closing the socket in the middle of the handshake,
/// without a reason the client can read (amqprs does not ask for the
/// `authentication_failure_close` capability). So a server that accepted the TCP connection
/// and then hung up, or refused the handshake, is reported as refusing the login; a server
/// that could not be reached at all is [`RabbitMqError::Unreachable`].
///
/// Over TLS, rustls's refusals (a certificate that is not trusted or not valid for the
/// server's name) and the server's alerts (a client certificate missing or refused) come as
/// I/O errors whose text amqprs keeps: those are [`RabbitMqError::Tls`]. A server that
/// refuses the client's certificate may reset the connection before its alert is read,
/// which then looks like a refused login.
fn connect_error(address: &str, tls: bool, error: amqprs::error::Error) -> RabbitMqError {
    let text = error.to_string();
    if tls && TLS_SIGNS.iter().any(|sign| text.contains(sign)) {
        return RabbitMqError::Tls {
            address: address.to_owned(),
            source: error,
        };
    }
    let hung_up = [
        "ACCESS_REFUSED",
        "reset by peer",
        "peer shutdown",
        "interrupted",
    ]
    .iter()
    .any(|sign| text.contains(sign));
    if hung_up || matches!(error, amqprs::error::Error::ConnectionOpenError(_)) {
        // A server that requires a client certificate checks it only after the TLS handshake
        // (with TLS 1.3), and its alert is often lost in the reset that follows.
        let certificate = if tls {
            ", and the client certificate if the server requires one"
        } else {
            ""
        };
        RabbitMqError::AccessRefused {
            address: address.to_owned(),
            detail: format!(
                "the server ended the login handshake ({text}); check the user, password and \
                 virtual host{certificate}"
            ),
        }
    } else {
        RabbitMqError::Unreachable {
            address: address.to_owned(),
            source: error,
        }
    }
}

/// Fires `lost` when the client reports a network failure or the connection closes.
async fn watch_connection(connection: Connection, lost: CancellationToken) {
    let closed = async {
        let mut tick = tokio::time::interval(CHECK_INTERVAL);
        loop {
            tick.tick().await;
            if !connection.is_open() {
                return;
            }
        }
    };
    tokio::select! {
        _ = lost.cancelled() => {}
        _ = connection.listen_network_io_failure() => {}
        _ = closed => {}
    }
    lost.cancel();
}

/// Logs what the server says about the connection and fires `lost` when it closes it.
struct LossCallback {
    name: String,
    lost: CancellationToken,
}

#[async_trait]
impl ConnectionCallback for LossCallback {
    async fn close(
        &mut self,
        _connection: &Connection,
        close: Close,
    ) -> Result<(), amqprs::error::Error> {
        tracing::warn!(
            connection = %self.name,
            driver = %DRIVER,
            code = close.reply_code(),
            reason = %close.reply_text(),
            "the server closed the connection"
        );
        self.lost.cancel();
        Ok(())
    }

    async fn blocked(&mut self, _connection: &Connection, reason: String) {
        tracing::warn!(connection = %self.name, driver = %DRIVER, reason, "the server blocked publishing");
    }

    async fn unblocked(&mut self, _connection: &Connection) {
        tracing::info!(connection = %self.name, driver = %DRIVER, "the server unblocked publishing");
    }

    async fn secret_updated(&mut self, _connection: &Connection) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args_for(url: &str) -> OpenConnectionArguments {
        let config = RabbitMqConfig {
            heartbeat: Duration::from_secs(15),
            ..RabbitMqConfig::default()
        };
        arguments("orders", &config, &SecretUrl::parse(url).unwrap(), None).unwrap()
    }

    #[test]
    fn urls_become_connection_arguments() {
        let args = args_for("amqp://user:p%40ss@rabbit.local:5673/%2f");

        assert_eq!(args.get_host(), "rabbit.local");
        assert_eq!(args.get_port(), 5673);
        assert_eq!(args.get_virtual_host(), "/");
        assert_eq!(args.get_heartbeat(), 15);
        assert_eq!(args.get_connection_name(), Some("orders"));
    }

    #[test]
    fn the_virtual_host_and_port_have_defaults() {
        assert_eq!(args_for("amqp://rabbit.local").get_virtual_host(), "/");
        assert_eq!(args_for("amqp://rabbit.local/").get_port(), 5672);
        assert_eq!(args_for("amqp://h/sales").get_virtual_host(), "sales");
        assert_eq!(args_for("amqp://h/a%2Fb").get_virtual_host(), "a/b");
    }

    #[test]
    fn percent_escapes_are_decoded_and_broken_ones_kept() {
        assert_eq!(percent_decode("p%40ss%2f"), "p@ss/");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }

    #[test]
    fn tls_urls_default_to_port_5671() {
        let url = SecretUrl::parse("amqps://h/").unwrap();

        assert_eq!(address_of(&url), "h:5671");
        assert_eq!(
            address_of(&SecretUrl::parse("amqps://h:5000/").unwrap()),
            "h:5000"
        );
    }

    #[test]
    fn a_tls_url_is_never_opened_without_tls() {
        let url = SecretUrl::parse("amqps://h/").unwrap();

        assert!(arguments("orders", &RabbitMqConfig::default(), &url, None).is_err());
    }

    #[cfg(feature = "tls")]
    #[test]
    fn only_tls_urls_open_tls() {
        let ca_file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/tls/ca.pem");
        let config = RabbitMqConfig {
            url: SecretUrl::parse("amqps://h/").ok(),
            exchange: "orders".to_owned(),
            tls: Some(crate::config::TlsConfig {
                ca_file: Some(ca_file),
                ..crate::config::TlsConfig::default()
            }),
            ..RabbitMqConfig::default()
        };
        let origin =
            || crate::error::Origin::new(DRIVER, "orders", crate::error::Operation::Connect, "");
        let tls = Tls::for_servers("orders", &config, origin).unwrap();
        let secure = arguments(
            "orders",
            &config,
            config.url.as_ref().unwrap(),
            tls.as_ref(),
        );
        let plain = SecretUrl::parse("amqp://h/").unwrap();
        let plain = arguments("orders", &config, &plain, tls.as_ref());

        assert!(secure.unwrap().get_tls_adaptor().is_some());
        assert!(plain.unwrap().get_tls_adaptor().is_none());
    }

    #[test]
    fn reconnection_waits_grow_and_are_capped() {
        let config = RabbitMqConfig {
            reconnect_backoff: Duration::from_millis(100),
            reconnect_max_backoff: Duration::from_millis(350),
            ..RabbitMqConfig::default()
        };

        assert_eq!(backoff(&config, 1), Duration::from_millis(100));
        assert_eq!(backoff(&config, 2), Duration::from_millis(200));
        assert_eq!(backoff(&config, 3), Duration::from_millis(350));
        assert_eq!(backoff(&config, u32::MAX), Duration::from_millis(350));
    }
}
