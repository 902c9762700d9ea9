//! The RabbitMQ driver over TLS (`amqps://`), against nodes of this test binary's own.
//!
//! The shared server on 5672 has no TLS listener, so these tests start their own nodes (see
//! `rabbitmq_support`) with the certificates of `testdata/tls`: one that asks for client
//! certificates and one that requires them, each shared by the tests that need it, and one
//! of its own for the restart. They need the `rabbitmq-server` that scripts/brokers installs.

#![cfg(all(feature = "rabbitmq", feature = "tls"))]

mod rabbitmq_support;

use std::time::Duration;

use broker::config::{RabbitMqConfig, SecretUrl, TlsConfig};
use broker::rabbitmq::{RabbitMqError, RabbitMqProvider};
use broker::{Context, Error, Manager, Message, Provider, ProviderExt, RetryPolicy};
use rabbitmq_support::{Listener, Node, testdata};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(20);

const ASKS_FOR_CERTIFICATES: Listener = Listener::Tls {
    client_certificate_required: false,
};

const REQUIRES_CERTIFICATES: Listener = Listener::Tls {
    client_certificate_required: true,
};

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}

fn ctx() -> Context {
    Context::new().with_timeout(WAIT)
}

/// The node of `listener` this binary shares, started on first use.
async fn shared(listener: Listener) -> &'static Node {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    tokio::task::spawn_blocking(move || Node::shared(listener))
        .await
        .expect("the node starts")
}

/// Settings for `url` over TLS with `tls`, on an exchange of their own.
fn config(url: &str, tls: TlsConfig) -> RabbitMqConfig {
    RabbitMqConfig {
        url: Some(SecretUrl::parse(url).expect("a node URL")),
        exchange: unique("tls-exchange"),
        tls: Some(tls),
        reconnect_backoff: Duration::from_millis(100),
        reconnect_max_backoff: Duration::from_millis(500),
        retry: RetryPolicy {
            initial_backoff: Duration::from_millis(10),
            ..RetryPolicy::default()
        },
        ..RabbitMqConfig::default()
    }
}

/// Trusts the test authority, the one that signed the nodes' certificates.
fn trusting() -> TlsConfig {
    TlsConfig {
        ca_file: Some(testdata("ca.pem")),
        ..TlsConfig::default()
    }
}

/// Trusts the test authority and shows the test client certificate.
fn with_client_certificate() -> TlsConfig {
    TlsConfig {
        cert_file: Some(testdata("client.pem")),
        key_file: Some(testdata("client.key")),
        ..trusting()
    }
}

/// Publishes one message to a new topic and waits for a group subscriber to get it.
async fn round_trip(provider: &RabbitMqProvider) {
    let topic = unique("orders");
    let (sender, mut receiver) = mpsc::unbounded_channel();
    let subscription = provider
        .subscribe_group_fn(&ctx(), &topic, "billing", move |_ctx, message: Message| {
            let _ = sender.send(message);
            std::future::ready(Ok::<(), std::io::Error>(()))
        })
        .await
        .expect("subscribing over TLS succeeds");

    let sent = Message::new("over tls").with_header("kind", "created");
    provider
        .publish(&ctx(), &topic, sent.clone())
        .await
        .expect("publishing over TLS succeeds");
    let got = tokio::time::timeout(WAIT, receiver.recv())
        .await
        .expect("the message arrives in time")
        .expect("the subscription is running");

    assert_eq!(got.id, sent.id);
    assert_eq!(got.body, sent.body);
    assert_eq!(got.headers.get("kind").map(String::as_str), Some("created"));
    subscription.stop().await;
}

/// Connects the connection `name`, expecting a failure that names it.
async fn refused(name: &str, config: RabbitMqConfig) -> Error {
    let error = RabbitMqProvider::connect(&ctx(), name, config)
        .await
        .expect_err("the handshake fails");

    assert_eq!(
        error.origin().map(|origin| origin.connection.as_str()),
        Some(name)
    );
    assert!(error.to_string().contains(name), "{error}");
    error
}

fn is_tls(error: &Error) -> bool {
    matches!(RabbitMqError::of(error), Some(RabbitMqError::Tls { .. }))
}

#[tokio::test]
async fn messages_go_round_over_tls_with_the_configured_authority() {
    let node = shared(ASKS_FOR_CERTIFICATES).await;
    let config = config(&node.url_at("localhost"), trusting());

    let provider = RabbitMqProvider::connect(&ctx(), "tls", config)
        .await
        .unwrap_or_else(|error| panic!("{error}\n{}", node.log()));
    round_trip(&provider).await;
    provider.ping(&ctx()).await.unwrap();

    // The driver hands rustls its provider: none was installed for the process.
    assert!(rustls::crypto::CryptoProvider::get_default().is_none());
    provider.close().await.unwrap();
}

#[tokio::test]
async fn a_required_client_certificate_is_shown() {
    let node = shared(REQUIRES_CERTIFICATES).await;

    let provider = RabbitMqProvider::connect(
        &ctx(),
        "mutual",
        config(&node.url(), with_client_certificate()),
    )
    .await
    .unwrap_or_else(|error| panic!("{error}\n{}", node.log()));
    round_trip(&provider).await;
    provider.close().await.unwrap();

    let error = refused("anonymous", config(&node.url(), trusting())).await;

    // The server checks the client's certificate after the TLS 1.3 handshake; its alert is
    // read, or lost in the reset that follows, which looks like a refused login.
    assert!(
        matches!(
            RabbitMqError::of(&error),
            Some(RabbitMqError::Tls { .. } | RabbitMqError::AccessRefused { .. })
        ),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_server_the_authority_did_not_sign_is_refused() {
    let node = shared(ASKS_FOR_CERTIFICATES).await;
    let untrusted = TlsConfig {
        ca_file: Some(testdata("untrusted-ca.pem")),
        ..TlsConfig::default()
    };

    let error = refused("untrusting", config(&node.url_at("localhost"), untrusted)).await;

    assert!(is_tls(&error), "{error:?}");
    assert!(error.to_string().contains("certificate"), "{error}");
}

#[tokio::test]
async fn the_certificate_must_carry_the_configured_server_name() {
    let node = shared(ASKS_FOR_CERTIFICATES).await;
    let named = |server_name: &str| TlsConfig {
        server_name: Some(server_name.to_owned()),
        ..trusting()
    };

    let error = refused("misnamed", config(&node.url(), named("wrong.example"))).await;
    assert!(is_tls(&error), "{error:?}");
    let provider =
        RabbitMqProvider::connect(&ctx(), "named", config(&node.url(), named("localhost")))
            .await
            .unwrap_or_else(|error| panic!("{error}\n{}", node.log()));
    provider.close().await.unwrap();
}

#[tokio::test]
async fn a_missing_authority_file_names_its_key() {
    let missing = TlsConfig {
        ca_file: Some(testdata("no-such-ca.pem")),
        ..TlsConfig::default()
    };
    // Nothing listens there: the file is read before any connection is tried.
    let config = config("amqps://guest:guest@127.0.0.1:1/%2f", missing);

    let error = RabbitMqProvider::connect(&ctx(), "missing", config)
        .await
        .unwrap_err();

    let Error::Config(error) = &error else {
        panic!("a configuration error: {error:?}");
    };
    assert_eq!(error.key_path(), Some("rabbitmq.tls.ca_file"));
    assert_eq!(error.connection_name(), Some("missing"));
}

#[tokio::test]
async fn the_manager_connects_amqps_from_toml() {
    let node = shared(REQUIRES_CERTIFICATES).await;
    let manager = Manager::from_toml(&format!(
        r#"
        [brokers.events]
        driver = "rabbitmq"

        [brokers.events.rabbitmq]
        url = "{url}"
        exchange = "{exchange}"

        [brokers.events.rabbitmq.tls]
        ca_file = "{ca}"
        cert_file = "{cert}"
        key_file = "{key}"
        "#,
        url = node.url_at("localhost"),
        exchange = unique("manager-exchange"),
        ca = testdata("ca.pem").display(),
        cert = testdata("client.pem").display(),
        key = testdata("client.key").display(),
    ))
    .await
    .unwrap_or_else(|error| panic!("{error}\n{}", node.log()));

    manager.ping(&ctx()).await.unwrap();
    manager.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnections_after_a_restart_use_tls_again() {
    let mut node = tokio::task::spawn_blocking(|| Node::start(ASKS_FOR_CERTIFICATES))
        .await
        .unwrap();
    let provider = RabbitMqProvider::connect(&ctx(), "restarted", config(&node.url(), trusting()))
        .await
        .unwrap_or_else(|error| panic!("{error}\n{}", node.log()));
    round_trip(&provider).await;

    node = tokio::task::spawn_blocking(move || {
        node.restart(false);
        node
    })
    .await
    .unwrap();

    // The node has no plain listener: reconnecting at all means over TLS. Subscribing
    // waits for the new connection.
    round_trip(&provider).await;

    provider.close().await.unwrap();
    tokio::task::spawn_blocking(move || drop(node))
        .await
        .unwrap();
}
