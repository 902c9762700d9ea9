//! The TLS of a Kafka connection: one rustls configuration for rskafka's connections and the
//! coordinator connections of this driver.

use crate::config::TlsConfig;
use crate::error::{Origin, Result};

/// A client configuration ready for connections. In builds without the `tls` feature the type
/// has no values, so an `Option<ClientTls>` is always `None` there.
#[cfg(feature = "tls")]
pub(crate) type ClientTls = std::sync::Arc<rustls::ClientConfig>;
#[cfg(not(feature = "tls"))]
pub(crate) type ClientTls = NoTls;

/// The client configuration of a build without TLS: there is none.
#[cfg(not(feature = "tls"))]
#[derive(Debug, Clone)]
pub(crate) enum NoTls {}

/// The client configuration of `settings` (TLS is off when they are `None`) for the
/// connection `connection`; `origin` names the connection in the error of a build without
/// TLS.
pub(crate) fn configure(
    settings: Option<&TlsConfig>,
    connection: &str,
    origin: impl Fn() -> Origin,
) -> Result<Option<ClientTls>> {
    let Some(settings) = settings else {
        return Ok(None);
    };
    #[cfg(feature = "tls")]
    {
        let _ = origin;
        crate::tls::client_config(settings, connection, "kafka.tls").map(Some)
    }
    #[cfg(not(feature = "tls"))]
    {
        let _ = (settings, connection);
        Err(crate::tls::not_built(origin()))
    }
}
