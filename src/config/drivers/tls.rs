//! `[brokers.<name>.<driver>.tls]`: the TLS settings every driver shares.

use std::path::PathBuf;

use serde::Deserialize;

use super::invalid;
use crate::config::ValueKind;

/// `[brokers.<name>.<driver>.tls]`: how the client checks the broker's certificate and,
/// when the broker asks for one, which certificate it shows in return.
///
/// The table's presence turns TLS on (`enabled = false` turns it off again, for example
/// from an environment variable). Connections need the crate's `tls` feature.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Whether TLS is used.
    #[serde(default = "enabled")]
    pub enabled: bool,
    /// A PEM file of the certificate authorities to trust. When absent, the system's
    /// trusted roots are used.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// A PEM file with the client's certificate chain, for brokers that require client
    /// certificates. Needs `key_file`.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// A PEM file with the private key of `cert_file`. Its contents are never logged.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// The name the broker's certificate must carry, when it differs from the host the
    /// client connects to (for example when connecting by IP address).
    #[serde(default)]
    pub server_name: Option<String>,
}

fn enabled() -> bool {
    true
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            enabled: true,
            ca_file: None,
            cert_file: None,
            key_file: None,
            server_name: None,
        }
    }
}

/// The keys of the `tls` table, for environment overrides.
pub(super) const TLS_KEYS: [(&str, ValueKind); 5] = [
    ("tls.enabled", ValueKind::Boolean),
    ("tls.ca_file", ValueKind::Text),
    ("tls.cert_file", ValueKind::Text),
    ("tls.key_file", ValueKind::Text),
    ("tls.server_name", ValueKind::Text),
];

impl TlsConfig {
    /// Checks that the client certificate and its key come together.
    fn validate(&self) -> Result<(), (String, String)> {
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) => Err(invalid(
                "tls.key_file",
                "is missing: tls.cert_file needs the key of its certificate",
            )),
            (None, Some(_)) => Err(invalid(
                "tls.cert_file",
                "is missing: tls.key_file needs the certificate it belongs to",
            )),
            _ => Ok(()),
        }
    }
}

/// The TLS settings in force: the table when it is present and enabled.
pub(super) fn active(tls: Option<&TlsConfig>) -> Option<&TlsConfig> {
    tls.filter(|tls| tls.enabled)
}

/// Checks the table, when there is one.
pub(super) fn validate(tls: Option<&TlsConfig>) -> Result<(), (String, String)> {
    tls.map_or(Ok(()), TlsConfig::validate)
}
