//! The Kafka driver across a broker restart. The test starts its own nisshi on a free port,
//! with its storage in a file so records survive the restart, and nothing else sees the
//! outage.

mod conformance;
mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use broker::config::KafkaConfig;
use broker::kafka::KafkaProvider;
use broker::{Context, Message, Provider, RetryPolicy, SubscribeOptions};
use conformance::{Inbox, TIMEOUT};
use support::Nisshi;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_acknowledged_is_lost_across_a_broker_restart() {
    let mut nisshi = Nisshi::start();
    let config = KafkaConfig {
        brokers: vec![format!("127.0.0.1:{}", nisshi.port)],
        partitions: 2,
        heartbeat_interval: Duration::from_millis(300),
        session_timeout: Duration::from_secs(6),
        fetch_max_wait: Duration::from_millis(100),
        request_timeout: Duration::from_secs(20),
        retry: RetryPolicy {
            initial_backoff: Duration::from_millis(10),
            ..RetryPolicy::default()
        },
        ..KafkaConfig::default()
    };
    let ctx = Context::new().with_timeout(TIMEOUT);
    let provider = Arc::new(
        KafkaProvider::connect(&ctx, "restart", config)
            .await
            .unwrap(),
    );
    let topic = "restart.topic";
    let inbox = Inbox::default();
    let _subscription = provider
        .subscribe(
            &Context::new(),
            topic,
            SubscribeOptions::group("restart-group"),
            Arc::new(inbox.handler()),
        )
        .await
        .unwrap();

    let mut sent = Vec::new();
    for index in 0..20 {
        let message = Message::new(format!("before {index}"));
        provider
            .publish(&ctx, topic, message.clone())
            .await
            .unwrap();
        sent.push(message);
    }
    inbox.wait_for(sent.len()).await;

    nisshi.kill();
    let publisher = {
        let provider = Arc::clone(&provider);
        tokio::spawn(async move {
            // Published while the broker is down: each waits for it, up to its deadline.
            let ctx = Context::new().with_timeout(TIMEOUT);
            let mut sent = Vec::new();
            for index in 0..20 {
                let message = Message::new(format!("during {index}"));
                provider
                    .publish(&ctx, topic, message.clone())
                    .await
                    .unwrap();
                sent.push(message);
            }
            sent
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    nisshi.restart();
    sent.extend(publisher.await.unwrap());

    let waited = tokio::time::timeout(TIMEOUT * 2, async {
        loop {
            let received: std::collections::HashSet<String> = inbox.ids().into_iter().collect();
            if sent.iter().all(|message| received.contains(&message.id)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;

    let mut deliveries: HashMap<String, usize> = HashMap::new();
    for id in inbox.ids() {
        *deliveries.entry(id).or_default() += 1;
    }
    let missing = sent
        .iter()
        .filter(|m| !deliveries.contains_key(&m.id))
        .count();
    let duplicates: usize = deliveries.values().map(|count| count - 1).sum();
    println!(
        "delivered {} of {}, {duplicates} duplicates",
        deliveries.len(),
        sent.len()
    );
    assert!(
        waited.is_ok(),
        "{missing} acknowledged messages were not delivered"
    );
    provider.close().await.unwrap();
}
