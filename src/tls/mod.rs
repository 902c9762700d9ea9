//! TLS for every driver: one rustls client configuration built from the connection's `tls`
//! table.
//!
//! The crypto comes from the process-wide rustls provider when the application installed
//! one, and from Graviola, a pure-Rust provider, otherwise, so TLS adds no C of its own.
//! Without the crate's `tls` feature a connection that asks for TLS is refused.

#[cfg(feature = "tls")]
mod client;

#[cfg(feature = "tls")]
pub(crate) use client::client_config;

use crate::config::TlsConfig;
use crate::error::{Error, Origin, Result};

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

/// The client configuration of `settings` (TLS is off when they are `None`), for the
/// connection `connection` whose tls table is `table`; `origin` names the connection in
/// the error of a build without TLS.
pub(crate) fn configure(
    settings: Option<&TlsConfig>,
    connection: &str,
    table: &str,
    origin: impl Fn() -> Origin,
) -> Result<Option<ClientTls>> {
    let Some(settings) = settings else {
        return Ok(None);
    };
    #[cfg(feature = "tls")]
    {
        let _ = origin;
        client_config(settings, connection, table).map(Some)
    }
    #[cfg(not(feature = "tls"))]
    {
        let _ = (settings, connection, table);
        Err(not_built(origin()))
    }
}

/// The error of a connection that asks for TLS in a build without the `tls` feature.
#[cfg_attr(feature = "tls", allow(dead_code))]
pub(crate) fn not_built(origin: Origin) -> Error {
    Error::Unsupported {
        origin,
        reason: "the settings ask for TLS, which needs the `tls` feature of the broker crate"
            .to_owned(),
    }
}
