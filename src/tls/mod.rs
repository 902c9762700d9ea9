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

use crate::error::{Error, Origin};

/// The error of a connection that asks for TLS in a build without the `tls` feature.
#[cfg_attr(feature = "tls", allow(dead_code))]
pub(crate) fn not_built(origin: Origin) -> Error {
    Error::Unsupported {
        origin,
        reason: "the settings ask for TLS, which needs the `tls` feature of the broker crate"
            .to_owned(),
    }
}
