//! Kafka over TLS, against a nisshi of the test's own that accepts only TLS connections: the
//! producer, the fetcher and the group coordinator connection all run over it, certificates
//! are checked, and a bad setting is a clear error.

mod conformance;
mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use broker::config::{KafkaConfig, KafkaSasl, SaslMechanism, Secret, TlsConfig};
use broker::kafka::KafkaProvider;
use broker::{Context, Error, Message, Operation, Provider, SubscribeOptions};
use conformance::{Inbox, TIMEOUT};
use support::Nisshi;

fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/tls")
        .join(name)
}

/// A nisshi that speaks only TLS, with the test authority's certificate for 127.0.0.1.
fn tls_nisshi() -> Nisshi {
    let cert = testdata("server.pem");
    let key = testdata("server.key");
    Nisshi::start_with(&[
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ])
}

fn trusting_the_test_authority() -> TlsConfig {
    TlsConfig {
        ca_file: Some(testdata("ca.pem")),
        ..TlsConfig::default()
    }
}

fn settings(nisshi: &Nisshi, tls: Option<TlsConfig>) -> KafkaConfig {
    KafkaConfig {
        brokers: vec![nisshi.address()],
        heartbeat_interval: Duration::from_millis(300),
        session_timeout: Duration::from_secs(6),
        fetch_max_wait: Duration::from_millis(100),
        request_timeout: Duration::from_secs(3),
        tls,
        ..KafkaConfig::default()
    }
}

/// Publishes one message to a new topic and waits for a group member to receive it.
async fn round_trip(provider: &KafkaProvider) {
    let topic = format!("tls.{}", uuid::Uuid::now_v7().simple());
    let inbox = Inbox::default();
    let _subscription = provider
        .subscribe(
            &Context::new(),
            &topic,
            SubscribeOptions::group(format!("{topic}.group")),
            Arc::new(inbox.handler()),
        )
        .await
        .unwrap();

    let sent = Message::new("over TLS").with_header("kind", "tls");
    let ctx = Context::new().with_timeout(TIMEOUT);
    provider.publish(&ctx, &topic, sent.clone()).await.unwrap();

    let (_, received) = inbox.wait_for(1).await.remove(0);
    assert_eq!(received.id, sent.id);
    assert_eq!(received.body, sent.body);
    assert_eq!(
        received.headers.get("kind").map(String::as_str),
        Some("tls")
    );
}

/// Whether `error` is a connect error of the connection `connection`.
fn is_connect_error(error: &Error, connection: &str) -> bool {
    matches!(error, Error::Broker { origin, .. } | Error::DeadlineExceeded { origin }
        if origin.operation == Operation::Connect && origin.connection == connection)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_member_publishes_and_consumes_over_tls() {
    let nisshi = tls_nisshi();
    let config = settings(&nisshi, Some(trusting_the_test_authority()));
    let ctx = Context::new().with_timeout(TIMEOUT);

    let provider = KafkaProvider::connect(&ctx, "secure", config)
        .await
        .unwrap();

    round_trip(&provider).await;
    provider.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_authentication_runs_inside_tls() {
    let mut nisshi = Nisshi::start();
    nisshi.create_user("carol", "carol-password", "scram512");
    let cert = testdata("server.pem");
    let key = testdata("server.key");
    nisshi.restart_with(&[
        "--authentication",
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ]);
    let config = KafkaConfig {
        sasl: Some(KafkaSasl {
            mechanism: SaslMechanism::ScramSha512,
            username: "carol".to_owned(),
            password: Secret::new("carol-password"),
        }),
        ..settings(&nisshi, Some(trusting_the_test_authority()))
    };
    let ctx = Context::new().with_timeout(TIMEOUT);

    let provider = KafkaProvider::connect(&ctx, "secure", config)
        .await
        .unwrap();

    round_trip(&provider).await;
    provider.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_configured_server_name_is_the_one_checked() {
    let nisshi = tls_nisshi();
    let ctx = Context::new().with_timeout(TIMEOUT);

    // The certificate names localhost as well as 127.0.0.1, the address connected to.
    let expected = TlsConfig {
        server_name: Some("localhost".to_owned()),
        ..trusting_the_test_authority()
    };
    let provider = KafkaProvider::connect(&ctx, "named", settings(&nisshi, Some(expected)))
        .await
        .unwrap();
    round_trip(&provider).await;
    provider.close().await.unwrap();

    let other = TlsConfig {
        server_name: Some("wrong.example".to_owned()),
        ..trusting_the_test_authority()
    };
    let error = KafkaProvider::connect(&ctx, "misnamed", settings(&nisshi, Some(other)))
        .await
        .unwrap_err();
    assert!(is_connect_error(&error, "misnamed"), "{error:?}");
    println!("{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_the_authority_did_not_sign_is_refused() {
    let nisshi = tls_nisshi();
    let untrusting = TlsConfig {
        ca_file: Some(testdata("untrusted-ca.pem")),
        ..TlsConfig::default()
    };
    let ctx = Context::new().with_timeout(TIMEOUT);

    let error = KafkaProvider::connect(&ctx, "untrusting", settings(&nisshi, Some(untrusting)))
        .await
        .unwrap_err();

    assert!(is_connect_error(&error, "untrusting"), "{error:?}");
    println!("{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_client_gets_an_error_from_a_tls_broker_not_a_hang() {
    let nisshi = tls_nisshi();
    let ctx = Context::new().with_timeout(TIMEOUT);

    let error = KafkaProvider::connect(&ctx, "plain", settings(&nisshi, None))
        .await
        .unwrap_err();

    assert!(is_connect_error(&error, "plain"), "{error:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_tls_files_name_their_key() {
    let nisshi = tls_nisshi();
    let ctx = Context::new().with_timeout(TIMEOUT);
    let cases = [
        (
            TlsConfig {
                ca_file: Some(testdata("missing.pem")),
                ..TlsConfig::default()
            },
            "kafka.tls.ca_file",
        ),
        (
            TlsConfig {
                cert_file: Some(testdata("client.pem")),
                // A certificate where the key should be.
                key_file: Some(testdata("client.pem")),
                ..trusting_the_test_authority()
            },
            "kafka.tls.key_file",
        ),
        (
            TlsConfig {
                server_name: Some("not a name".to_owned()),
                ..trusting_the_test_authority()
            },
            "kafka.tls.server_name",
        ),
    ];

    for (tls, key) in cases {
        let error = KafkaProvider::connect(&ctx, "files", settings(&nisshi, Some(tls)))
            .await
            .unwrap_err();
        let Error::Config(error) = &error else {
            panic!("expected a configuration error for {key}: {error:?}");
        };
        assert_eq!(error.connection_name(), Some("files"), "{error}");
        assert_eq!(error.key_path(), Some(key), "{error}");
        println!("{error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_is_presented_when_configured() {
    // nisshi does not ask for client certificates, so this checks that a valid pair loads
    // and the connection works with it; brokers that require one are covered by the
    // RabbitMQ and NATS tests, which share this code.
    let nisshi = tls_nisshi();
    let with_certificate = TlsConfig {
        cert_file: Some(testdata("client.pem")),
        key_file: Some(testdata("client.key")),
        ..trusting_the_test_authority()
    };
    let ctx = Context::new().with_timeout(TIMEOUT);

    let provider =
        KafkaProvider::connect(&ctx, "mutual", settings(&nisshi, Some(with_certificate)))
            .await
            .unwrap();

    round_trip(&provider).await;
    provider.close().await.unwrap();
}
