//! One connection to one Kafka broker for the consumer-group requests rskafka does not make:
//! framing, request headers, and the choice of each API's version.

use std::collections::HashMap;
use std::io;
use std::ops::RangeInclusive;
use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use kafka_protocol::messages::{
    ApiVersionsRequest, RequestHeader, ResponseHeader, SaslAuthenticateRequest,
    SaslHandshakeRequest,
};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, Request, StrBytes};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::tls::ClientTls;
use crate::config::KafkaSasl;

/// The largest response accepted, to bound memory when a peer sends garbage.
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// What went wrong talking to a broker.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WireError {
    #[error("cannot reach {address}: {source}")]
    Connect { address: String, source: io::Error },
    #[error("connection to {address} failed: {source}")]
    Io { address: String, source: io::Error },
    #[cfg(feature = "tls")]
    #[error("TLS handshake with {address} failed: {source}")]
    Tls { address: String, source: io::Error },
    #[error("{address} did not answer within {timeout:?}")]
    Timeout { address: String, timeout: Duration },
    #[error("cannot encode or decode a request to {address}: {message}")]
    Protocol { address: String, message: String },
    #[error("authentication to {address} failed: {message}")]
    Authentication { address: String, message: String },
    #[error("{address} supports no version of API {api_key} in {ours:?}")]
    Version {
        address: String,
        api_key: i16,
        ours: RangeInclusive<i16>,
    },
}

/// The byte stream under a connection: plain TCP, or TLS over it.
trait Transport: AsyncRead + AsyncWrite + Send + Sync + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Sync + Unpin> Transport for T {}

/// A connection that sends one request at a time and reads its response.
pub(crate) struct Connection {
    address: String,
    stream: Box<dyn Transport>,
    client_id: StrBytes,
    correlation_id: i32,
    versions: HashMap<i16, RangeInclusive<i16>>,
    /// Set while a request is on the wire: a request abandoned half-way (its future dropped)
    /// leaves bytes the next one would misread, so the connection is not used again.
    interrupted: bool,
}

impl Connection {
    /// Connects to `address` (over TLS when `tls` is set), learns which API versions it
    /// supports, and authenticates when `sasl` is set.
    pub(crate) async fn open(
        address: &str,
        client_id: &str,
        sasl: Option<&KafkaSasl>,
        tls: Option<&ClientTls>,
        timeout: Duration,
    ) -> Result<Connection, WireError> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(address))
            .await
            .map_err(|_| WireError::Timeout {
                address: address.to_owned(),
                timeout,
            })?
            .map_err(|source| WireError::Connect {
                address: address.to_owned(),
                source,
            })?;
        // Small requests (heartbeats, commits) must not wait for Nagle's algorithm.
        stream.set_nodelay(true).map_err(|source| WireError::Io {
            address: address.to_owned(),
            source,
        })?;
        let stream: Box<dyn Transport> = match tls {
            None => Box::new(stream),
            #[cfg(feature = "tls")]
            Some(config) => Box::new(handshake(address, stream, config, timeout).await?),
            #[cfg(not(feature = "tls"))]
            Some(never) => match *never {},
        };

        let mut connection = Connection {
            address: address.to_owned(),
            stream,
            client_id: StrBytes::from_string(client_id.to_owned()),
            correlation_id: 0,
            versions: HashMap::new(),
            interrupted: false,
        };
        let supported = connection
            .send(&ApiVersionsRequest::default(), 0, timeout)
            .await?;
        connection.versions = supported
            .api_keys
            .iter()
            .map(|api| (api.api_key, api.min_version..=api.max_version))
            .collect();
        if let Some(sasl) = sasl {
            connection.authenticate(sasl, timeout).await?;
        }
        Ok(connection)
    }

    /// Runs the SASL exchange: a handshake that picks the mechanism, then as many
    /// authenticate round trips as the mechanism needs.
    async fn authenticate(&mut self, sasl: &KafkaSasl, timeout: Duration) -> Result<(), WireError> {
        let mechanism = sasl.mechanism.name();
        let handshake =
            SaslHandshakeRequest::default().with_mechanism(StrBytes::from_static_str(mechanism));
        let version = self.version::<SaslHandshakeRequest>(1..=1)?;
        let offered = self.send(&handshake, version, timeout).await?;
        if offered.error_code != 0 {
            let offered: Vec<&str> = offered.mechanisms.iter().map(|m| m.as_str()).collect();
            return Err(self.authentication_error(format!(
                "the broker does not offer {mechanism}; it offers {}",
                offered.join(", ")
            )));
        }

        let config = rsasl::config::SASLConfig::with_credentials(
            None,
            sasl.username.clone(),
            sasl.password.expose().to_owned(),
        )
        .map_err(|error| self.authentication_error(error))?;
        let name = rsasl::prelude::Mechname::parse(mechanism.as_bytes())
            .map_err(|error| self.authentication_error(error))?;
        let mut session = rsasl::prelude::SASLClient::new(config)
            .start_suggested(&[name])
            .map_err(|error| self.authentication_error(error))?;

        let version = self.version::<SaslAuthenticateRequest>(0..=1)?;
        let mut received: Option<Vec<u8>> = None;
        loop {
            let mut reply = io::Cursor::new(Vec::new());
            let state = session
                .step(received.as_deref(), &mut reply)
                .map_err(|error| self.authentication_error(error))?;
            if state.has_sent_message() {
                let request = SaslAuthenticateRequest::default()
                    .with_auth_bytes(bytes::Bytes::from(reply.into_inner()));
                let answer = self.send(&request, version, timeout).await?;
                if answer.error_code != 0 {
                    let message = answer.error_message.map(|m| m.to_string());
                    return Err(self.authentication_error(
                        message.unwrap_or_else(|| format!("error code {}", answer.error_code)),
                    ));
                }
                received = Some(answer.auth_bytes.to_vec());
            }
            if state.is_finished() {
                return Ok(());
            }
        }
    }

    /// The newest version of `R` that both this client (`ours`) and the broker support.
    pub(crate) fn version<R: Request>(&self, ours: RangeInclusive<i16>) -> Result<i16, WireError> {
        let theirs = self.versions.get(&R::KEY);
        let chosen = theirs.and_then(|theirs| {
            let high = (*ours.end()).min(*theirs.end());
            let low = (*ours.start()).max(*theirs.start());
            (low <= high).then_some(high)
        });
        chosen.ok_or_else(|| WireError::Version {
            address: self.address.clone(),
            api_key: R::KEY,
            ours,
        })
    }

    /// Sends `request` as `version` and waits at most `timeout` for its response.
    pub(crate) async fn send<R: Request>(
        &mut self,
        request: &R,
        version: i16,
        timeout: Duration,
    ) -> Result<R::Response, WireError> {
        let address = self.address.clone();
        tokio::time::timeout(timeout, self.exchange(request, version))
            .await
            .map_err(|_| WireError::Timeout { address, timeout })?
    }

    async fn exchange<R: Request>(
        &mut self,
        request: &R,
        version: i16,
    ) -> Result<R::Response, WireError> {
        if self.interrupted {
            return Err(self.io_error(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "an earlier request was abandoned half-way",
            )));
        }
        self.interrupted = true;
        self.correlation_id = self.correlation_id.wrapping_add(1);
        let correlation_id = self.correlation_id;
        let header = RequestHeader::default()
            .with_request_api_key(R::KEY)
            .with_request_api_version(version)
            .with_correlation_id(correlation_id)
            .with_client_id(Some(self.client_id.clone()));

        let mut body = BytesMut::new();
        header
            .encode(&mut body, R::header_version(version))
            .and_then(|()| request.encode(&mut body, version))
            .map_err(|error| self.protocol_error(error))?;
        let mut frame = BytesMut::with_capacity(body.len() + 4);
        frame.put_i32(frame_length(body.len()));
        frame.extend_from_slice(&body);
        self.stream
            .write_all(&frame)
            .await
            .map_err(|source| self.io_error(source))?;

        let length = self
            .stream
            .read_i32()
            .await
            .map_err(|source| self.io_error(source))?;
        let length = usize::try_from(length)
            .ok()
            .filter(|length| *length <= MAX_RESPONSE_BYTES)
            .ok_or_else(|| self.protocol_error(format!("bad response length {length}")))?;
        let mut response = vec![0; length];
        self.stream
            .read_exact(&mut response)
            .await
            .map_err(|source| self.io_error(source))?;

        let mut response = bytes::Bytes::from(response);
        let header = ResponseHeader::decode(&mut response, R::Response::header_version(version))
            .map_err(|error| self.protocol_error(error))?;
        if header.correlation_id != correlation_id {
            return Err(self.protocol_error(format!(
                "response to request {} arrived for request {correlation_id}",
                header.correlation_id
            )));
        }
        let decoded = R::Response::decode(&mut response, version)
            .map_err(|error| self.protocol_error(error))?;
        self.interrupted = false;
        if response.has_remaining() {
            tracing::trace!(
                broker = %self.address,
                api_key = R::KEY,
                left = response.remaining(),
                "response had bytes past its end"
            );
        }
        Ok(decoded)
    }

    fn io_error(&self, source: io::Error) -> WireError {
        WireError::Io {
            address: self.address.clone(),
            source,
        }
    }

    fn authentication_error(&self, error: impl std::fmt::Display) -> WireError {
        WireError::Authentication {
            address: self.address.clone(),
            message: error.to_string(),
        }
    }

    fn protocol_error(&self, error: impl std::fmt::Display) -> WireError {
        WireError::Protocol {
            address: self.address.clone(),
            message: error.to_string(),
        }
    }
}

/// Runs the TLS handshake on `stream`, checking the broker's certificate against the host
/// of `address` (or the configured `server_name`, which the verifier substitutes).
#[cfg(feature = "tls")]
async fn handshake(
    address: &str,
    stream: TcpStream,
    config: &ClientTls,
    timeout: Duration,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, WireError> {
    let failed = |source| WireError::Tls {
        address: address.to_owned(),
        source,
    };
    let host = address
        .rsplit_once(':')
        .map_or(address, |(host, _port)| host)
        .trim_start_matches('[')
        .trim_end_matches(']');
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|error| failed(io::Error::new(io::ErrorKind::InvalidInput, error)))?;
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::clone(config));
    tokio::time::timeout(timeout, connector.connect(name, stream))
        .await
        .map_err(|_| WireError::Timeout {
            address: address.to_owned(),
            timeout,
        })?
        .map_err(failed)
}

fn frame_length(length: usize) -> i32 {
    // Requests are a few kilobytes at most; anything that does not fit is a bug worth seeing.
    i32::try_from(length).unwrap_or(i32::MAX)
}
