//! The local brokers the test suite needs answer on their ports, each in its own protocol.
//!
//! Addresses come from `TEST_RABBITMQ_ADDR`, `TEST_NATS_ADDR` and `TEST_KAFKA_ADDR`, with the
//! loopback defaults that `scripts/brokers` starts.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TIMEOUT: Duration = Duration::from_secs(10);

fn address(variable: &str, default: &str) -> String {
    std::env::var(variable).unwrap_or_else(|_| default.to_owned())
}

async fn connect(address: &str) -> TcpStream {
    tokio::time::timeout(TIMEOUT, TcpStream::connect(address))
        .await
        .unwrap_or_else(|_| panic!("connecting to {address} timed out"))
        .unwrap_or_else(|error| panic!("nothing answers on {address}: {error}"))
}

async fn read_some(stream: &mut TcpStream, address: &str) -> Vec<u8> {
    let mut buffer = vec![0; 4096];
    let read = tokio::time::timeout(TIMEOUT, stream.read(&mut buffer))
        .await
        .unwrap_or_else(|_| panic!("{address} sent nothing"))
        .unwrap();
    buffer.truncate(read);
    buffer
}

#[tokio::test]
async fn rabbitmq_answers_the_amqp_handshake() {
    let address = address("TEST_RABBITMQ_ADDR", "127.0.0.1:5672");
    let mut stream = connect(&address).await;

    stream.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
    let reply = read_some(&mut stream, &address).await;

    // A method frame (type 1) on channel 0 carrying connection.start (class 10, method 10).
    assert!(reply.len() > 11, "short reply from {address}: {reply:?}");
    assert_eq!(reply[0], 1, "frame type");
    assert_eq!(&reply[7..11], &[0, 10, 0, 10], "connection.start");
}

#[tokio::test]
async fn nats_answers_with_its_info_and_jetstream() {
    let address = address("TEST_NATS_ADDR", "127.0.0.1:4222");
    let mut stream = connect(&address).await;

    let info = String::from_utf8_lossy(&read_some(&mut stream, &address).await).into_owned();

    assert!(info.starts_with("INFO "), "{info}");
    assert!(
        info.contains("\"jetstream\":true"),
        "JetStream is off: {info}"
    );
}

#[tokio::test]
async fn kafka_answers_api_versions() {
    let address = address("TEST_KAFKA_ADDR", "127.0.0.1:9092");
    let mut stream = connect(&address).await;

    // ApiVersions (key 18) version 0, correlation id 7, client id "ping".
    let mut request = Vec::new();
    request.extend_from_slice(&18i16.to_be_bytes());
    request.extend_from_slice(&0i16.to_be_bytes());
    request.extend_from_slice(&7i32.to_be_bytes());
    request.extend_from_slice(&4i16.to_be_bytes());
    request.extend_from_slice(b"ping");
    let mut framed = (request.len() as i32).to_be_bytes().to_vec();
    framed.extend_from_slice(&request);
    stream.write_all(&framed).await.unwrap();

    let mut header = [0u8; 10];
    tokio::time::timeout(TIMEOUT, stream.read_exact(&mut header))
        .await
        .unwrap_or_else(|_| panic!("{address} did not answer ApiVersions"))
        .unwrap();
    assert_eq!(
        i32::from_be_bytes(header[4..8].try_into().unwrap()),
        7,
        "correlation id"
    );
    assert_eq!(
        i16::from_be_bytes(header[8..10].try_into().unwrap()),
        0,
        "error code"
    );
}
