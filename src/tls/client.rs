//! The rustls client configuration, built from a `tls` table.

use std::path::Path;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::config::{ConfigError, TlsConfig};
use crate::error::Result;

/// Builds the client configuration `settings` describe, for the connection `connection`
/// whose tls table is `table` (for example `kafka.tls`), reading every file it names.
///
/// A file that is missing or holds no usable PEM gives a configuration error naming the
/// connection and the key.
pub(crate) fn client_config(
    settings: &TlsConfig,
    connection: &str,
    table: &str,
) -> Result<Arc<ClientConfig>> {
    let fail = |key: &str, message: String| {
        ConfigError::invalid_value(connection, &format!("{table}.{key}"), message)
    };

    let provider = provider().map_err(|message| fail("enabled", message))?;

    let mut roots = RootCertStore::empty();
    match &settings.ca_file {
        Some(path) => {
            for certificate in
                read_certificates(path).map_err(|message| fail("ca_file", message))?
            {
                roots
                    .add(certificate)
                    .map_err(|error| fail("ca_file", format!("`{}`: {error}", path.display())))?;
            }
        }
        None => {
            // Unreadable entries of the system store are skipped, as browsers and curl do;
            // only a store with nothing usable is an error.
            let system = rustls_native_certs::load_native_certs();
            let (added, _ignored) = roots.add_parsable_certificates(system.certs);
            if added == 0 {
                return Err(fail(
                    "ca_file",
                    "is not set and the system has no trusted root certificates; name a PEM \
                     file of the broker's certificate authorities"
                        .to_owned(),
                )
                .into());
            }
        }
    }

    let mut verifier: Arc<dyn ServerCertVerifier> =
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|error| fail("ca_file", error.to_string()))?;
    if let Some(name) = &settings.server_name {
        let name = ServerName::try_from(name.clone())
            .map_err(|error| fail("server_name", format!("`{name}`: {error}")))?;
        verifier = Arc::new(ExpectedName {
            inner: verifier,
            name,
        });
    }

    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| fail("enabled", error.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match (&settings.cert_file, &settings.key_file) {
        (Some(cert_file), Some(key_file)) => {
            let chain =
                read_certificates(cert_file).map_err(|message| fail("cert_file", message))?;
            let key = PrivateKeyDer::from_pem_file(key_file).map_err(|error| {
                // The message says what is wrong with the file, never what is in it.
                let problem = match error {
                    pem::Error::NoItemsFound => "holds no PEM private key".to_owned(),
                    other => other.to_string(),
                };
                fail("key_file", format!("`{}`: {problem}", key_file.display()))
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|error| fail("key_file", error.to_string()))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// The process-wide provider if the application installed one, Graviola otherwise.
fn provider() -> Result<Arc<CryptoProvider>, String> {
    if let Some(installed) = CryptoProvider::get_default() {
        return Ok(installed.clone());
    }
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    {
        Ok(Arc::new(rustls_graviola::default_provider()))
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        Err(
            "the built-in crypto provider supports x86_64 and aarch64 only; install a rustls \
             CryptoProvider for this architecture with CryptoProvider::install_default"
                .to_owned(),
        )
    }
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certificates = CertificateDer::pem_file_iter(path)
        .and_then(|certificates| certificates.collect::<Result<Vec<_>, _>>())
        .map_err(|error| format!("`{}`: {error}", path.display()))?;
    if certificates.is_empty() {
        return Err(format!("`{}` holds no PEM certificate", path.display()));
    }
    Ok(certificates)
}

/// Checks the broker's certificate against a configured name instead of the host the
/// client connected to. Clients that take no server name (rskafka names the host itself)
/// get the override this way too.
#[derive(Debug)]
struct ExpectedName {
    inner: Arc<dyn ServerCertVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for ExpectedName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _connected_to: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
