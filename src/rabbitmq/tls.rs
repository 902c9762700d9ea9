//! TLS for `amqps://` servers.
//!
//! The rustls configuration is built once, when the provider connects, from the `tls` table
//! (or from the system's trusted roots when there is no table), and every connection to an
//! `amqps://` server goes through it, reconnections included. `amqp://` servers stay plain.

use amqprs::connection::OpenConnectionArguments;
use url::Host;

use crate::config::{RabbitMqConfig, SecretUrl};
use crate::error::{Origin, Result};

/// How a provider opens TLS to its `amqps://` servers.
#[cfg(feature = "tls")]
#[derive(Clone)]
pub(super) struct Tls {
    /// Shared by every connection of the provider, so reconnections can resume the session.
    connector: tokio_rustls::TlsConnector,
    /// The table's `server_name`, sent as the server name when the URL holds an IP address.
    server_name: Option<String>,
}

/// How a provider opens TLS to its `amqps://` servers: never, in a build without the `tls`
/// feature, so this type has no values.
#[cfg(not(feature = "tls"))]
#[derive(Clone)]
pub(super) enum Tls {}

/// Whether `url` asks for TLS.
pub(super) fn is_tls(url: &SecretUrl) -> bool {
    url.scheme() == "amqps"
}

/// Whether any configured server asks for TLS.
fn wanted(config: &RabbitMqConfig) -> bool {
    config.all_urls().any(is_tls)
}

#[cfg(feature = "tls")]
impl Tls {
    /// The TLS of the connection `name`, when one of its servers is `amqps://`: the `tls`
    /// table's settings, or the system's trusted roots without one.
    ///
    /// Files the table names are read here, so a missing one fails the connect with a
    /// configuration error naming its key (`rabbitmq.tls.ca_file`, for example). `_origin` is
    /// only needed by builds without TLS.
    pub(super) fn for_servers(
        name: &str,
        config: &RabbitMqConfig,
        _origin: impl FnOnce() -> Origin,
    ) -> Result<Option<Tls>> {
        if !wanted(config) {
            return Ok(None);
        }

        let system = crate::config::TlsConfig::default();
        let settings = config.tls().unwrap_or(&system);
        let client = crate::tls::client_config(settings, name, "rabbitmq.tls")?;
        Ok(Some(Tls {
            connector: tokio_rustls::TlsConnector::from(client),
            server_name: settings.server_name.clone(),
        }))
    }

    /// Makes `args`, a connection to `host`, open TLS first.
    pub(super) fn apply(&self, args: &mut OpenConnectionArguments, host: Option<Host<&str>>) {
        let domain = self.domain(host);
        args.tls_adaptor(amqprs::tls::TlsAdaptor::new(self.connector.clone(), domain));
    }

    /// The server name of the handshake with `host`.
    ///
    /// It is the URL's host name, sent as SNI. amqprs turns an IP address into an IP server
    /// name, for which rustls sends no SNI; there the `server_name` setting, when given, is
    /// sent instead, as the name a proxy or a server of several names would route by. Either
    /// way the certificate is checked against `server_name` when it is set (the verifier of
    /// `crate::tls` sees to that), and against the host otherwise.
    fn domain(&self, host: Option<Host<&str>>) -> String {
        match (host, &self.server_name) {
            (Some(Host::Domain(name)), _) => name.to_owned(),
            (_, Some(server_name)) => server_name.clone(),
            // Without brackets: amqprs parses the domain as a server name, not a URL host.
            (Some(Host::Ipv6(address)), None) => address.to_string(),
            (Some(Host::Ipv4(address)), None) => address.to_string(),
            (None, None) => String::new(),
        }
    }
}

#[cfg(not(feature = "tls"))]
impl Tls {
    /// Refuses a configuration with an `amqps://` server, which this build cannot open: the
    /// error names `origin`, the connect of the connection `_name`.
    pub(super) fn for_servers(
        _name: &str,
        config: &RabbitMqConfig,
        origin: impl FnOnce() -> Origin,
    ) -> Result<Option<Tls>> {
        if wanted(config) {
            return Err(crate::tls::not_built(origin()));
        }
        Ok(None)
    }

    /// Never called: there is no `Tls` to call it on.
    pub(super) fn apply(&self, _args: &mut OpenConnectionArguments, _host: Option<Host<&str>>) {
        match *self {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Operation;

    fn config_for(url: &str) -> RabbitMqConfig {
        RabbitMqConfig {
            url: SecretUrl::parse(url).ok(),
            exchange: "orders".to_owned(),
            ..RabbitMqConfig::default()
        }
    }

    fn origin() -> Origin {
        Origin::new("rabbitmq", "orders", Operation::Connect, "h:5671")
    }

    #[test]
    fn plain_servers_need_no_tls() {
        let tls = Tls::for_servers("orders", &config_for("amqp://h/"), origin);

        assert!(matches!(tls, Ok(None)));
    }

    #[cfg(not(feature = "tls"))]
    #[test]
    fn tls_servers_are_refused_without_the_feature() {
        let tls = Tls::for_servers("orders", &config_for("amqps://h/"), origin);

        assert!(
            matches!(tls, Err(crate::Error::Unsupported { origin: refused, .. }) if refused == origin())
        );
    }

    #[cfg(feature = "tls")]
    mod with_tls {
        use std::path::PathBuf;

        use super::*;
        use crate::config::TlsConfig;

        fn testdata(file: &str) -> PathBuf {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("testdata/tls")
                .join(file)
        }

        fn tls_with(settings: TlsConfig) -> Result<Option<Tls>> {
            let config = RabbitMqConfig {
                tls: Some(settings),
                ..config_for("amqps://h/")
            };
            Tls::for_servers("orders", &config, origin)
        }

        fn trusting(server_name: Option<&str>) -> Tls {
            tls_with(TlsConfig {
                ca_file: Some(testdata("ca.pem")),
                server_name: server_name.map(str::to_owned),
                ..TlsConfig::default()
            })
            .unwrap()
            .unwrap()
        }

        #[test]
        fn the_handshake_names_the_url_host() {
            let tls = trusting(Some("rabbit.internal"));
            let v6 = "::1".parse().unwrap();

            assert_eq!(
                tls.domain(Some(Host::Domain("rabbit.local"))),
                "rabbit.local"
            );
            assert_eq!(tls.domain(Some(Host::Ipv6(v6))), "rabbit.internal");
            assert_eq!(trusting(None).domain(Some(Host::Ipv6(v6))), "::1");
            assert_eq!(
                trusting(None).domain(Some(Host::Ipv4([127, 0, 0, 1].into()))),
                "127.0.0.1"
            );
        }
    }
}
