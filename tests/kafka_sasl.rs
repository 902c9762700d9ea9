//! SASL authentication to Kafka, against a nisshi of the test's own that requires it: the
//! producer, the fetcher and the group coordinator connection all authenticate.

mod conformance;
mod support;

use std::sync::Arc;
use std::time::Duration;

use broker::config::{KafkaConfig, KafkaSasl, SaslMechanism, Secret};
use broker::kafka::KafkaProvider;
use broker::{Context, Error, Message, Provider, SubscribeOptions};
use conformance::{Inbox, TIMEOUT};
use support::Nisshi;

fn settings(nisshi: &Nisshi, mechanism: SaslMechanism, user: &str, password: &str) -> KafkaConfig {
    KafkaConfig {
        brokers: vec![nisshi.address()],
        heartbeat_interval: Duration::from_millis(300),
        session_timeout: Duration::from_secs(6),
        fetch_max_wait: Duration::from_millis(100),
        request_timeout: Duration::from_secs(5),
        sasl: Some(KafkaSasl {
            mechanism,
            username: user.to_owned(),
            password: Secret::new(password),
        }),
        ..KafkaConfig::default()
    }
}

/// A nisshi that requires authentication and knows `alice` (SCRAM-SHA-256) and `bob`
/// (SCRAM-SHA-512). Users are created while it is open, then it restarts locked.
fn locked_nisshi() -> Nisshi {
    let mut nisshi = Nisshi::start();
    nisshi.create_user("alice", "alice-password", "scram256");
    nisshi.create_user("bob", "bob-password", "scram512");
    nisshi.restart_with(&["--authentication"]);
    nisshi
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_users_publish_and_consume_in_a_group() {
    let nisshi = locked_nisshi();

    for (mechanism, user) in [
        (SaslMechanism::ScramSha256, "alice"),
        (SaslMechanism::ScramSha512, "bob"),
    ] {
        let config = settings(&nisshi, mechanism, user, &format!("{user}-password"));
        let ctx = Context::new().with_timeout(TIMEOUT);
        let provider = KafkaProvider::connect(&ctx, "sasl", config).await.unwrap();
        let topic = format!("sasl.{user}");
        let inbox = Inbox::default();
        let _subscription = provider
            .subscribe(
                &Context::new(),
                &topic,
                SubscribeOptions::group(format!("{user}-group")),
                Arc::new(inbox.handler()),
            )
            .await
            .unwrap();

        let sent = Message::new(format!("from {user}"));
        provider.publish(&ctx, &topic, sent.clone()).await.unwrap();

        let (_, received) = inbox.wait_for(1).await.remove(0);
        assert_eq!(received.id, sent.id);
        provider.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_a_clear_connect_error() {
    let nisshi = locked_nisshi();
    let config = settings(
        &nisshi,
        SaslMechanism::ScramSha256,
        "alice",
        "not-her-password",
    );
    let ctx = Context::new().with_timeout(Duration::from_secs(15));

    let error = KafkaProvider::connect(&ctx, "sasl", config)
        .await
        .unwrap_err();

    assert!(
        matches!(&error, Error::Broker { origin, .. } | Error::DeadlineExceeded { origin }
            if origin.operation == broker::Operation::Connect && origin.connection == "sasl"),
        "{error:?}"
    );
    assert!(!format!("{error} {error:?}").contains("not-her-password"));
    println!("{error}");
}
