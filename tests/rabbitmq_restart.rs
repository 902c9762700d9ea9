//! A real restart of a RabbitMQ server, on a node of this test's own.
//!
//! The shared server on 5672 is left alone: the test starts a second node (its own name, ports
//! and data directory) from the local RabbitMQ installation, stops it (or kills it, as a crash
//! would) under a running provider and starts it again on the same data. It needs the
//! `rabbitmq-server` that scripts/brokers installs (`RABBITMQ_SERVER` names another one).

#![cfg(feature = "rabbitmq")]

mod rabbitmq_support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use broker::config::{RabbitMqConfig, SecretUrl};
use broker::rabbitmq::RabbitMqProvider;
use broker::{Context, Message, Provider, ProviderExt, RetryPolicy};
use rabbitmq_support::{Listener, Node};
use tokio::sync::mpsc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_loses_no_confirmed_message() {
    restart_under_load(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_crash_loses_no_confirmed_message() {
    restart_under_load(true).await;
}

/// Publishes and consumes on a node of its own while the node restarts (or crashes and
/// starts again), then checks that every confirmed message was consumed.
async fn restart_under_load(crash: bool) {
    let mut node = tokio::task::spawn_blocking(|| Node::start(Listener::Plain))
        .await
        .unwrap();
    let config = RabbitMqConfig {
        url: Some(SecretUrl::parse(&node.url()).unwrap()),
        exchange: "restart".to_owned(),
        reconnect_backoff: Duration::from_millis(100),
        reconnect_max_backoff: Duration::from_millis(500),
        retry: RetryPolicy {
            initial_backoff: Duration::from_millis(10),
            ..RetryPolicy::default()
        },
        ..RabbitMqConfig::default()
    };
    let ctx = Context::new().with_timeout(Duration::from_secs(20));
    let provider = Arc::new(
        RabbitMqProvider::connect(&ctx, "restart", config)
            .await
            .unwrap_or_else(|error| panic!("{error}\n{}", node.log())),
    );
    let (sender, mut receiver) = mpsc::unbounded_channel::<String>();
    let subscription = provider
        .subscribe_group_fn(
            &Context::new(),
            "orders",
            "durable",
            move |_ctx: Context, message: Message| {
                let _ = sender.send(message.id);
                std::future::ready(Ok::<(), std::io::Error>(()))
            },
        )
        .await
        .unwrap();

    let confirmed = Arc::new(Mutex::new(Vec::new()));
    let done = tokio_util::sync::CancellationToken::new();
    let publishers: Vec<_> = (0..3)
        .map(|publisher| {
            let (provider, confirmed, done) =
                (Arc::clone(&provider), Arc::clone(&confirmed), done.clone());
            tokio::spawn(async move {
                let mut i = 0;
                while !done.is_cancelled() {
                    let message = Message::new(format!("publisher {publisher} message {i}"));
                    let id = message.id.clone();
                    let ctx = Context::new().with_timeout(Duration::from_secs(60));
                    if let Err(error) = provider.publish(&ctx, "orders", message).await {
                        panic!("publish {i} of {publisher} failed: {error}");
                    }
                    confirmed.lock().unwrap().push(id);
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = confirmed.lock().unwrap().len();
    node = tokio::task::spawn_blocking(move || {
        node.restart(crash);
        node
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    done.cancel();
    for publisher in publishers {
        tokio::time::timeout(Duration::from_secs(90), publisher)
            .await
            .expect("publishing finishes")
            .expect("every publish succeeds");
    }
    let confirmed = confirmed.lock().unwrap().clone();
    assert!(
        confirmed.len() > before,
        "publishing resumed after the restart"
    );

    let mut seen: HashMap<String, usize> = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while confirmed.iter().any(|id| !seen.contains_key(id)) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, receiver.recv()).await {
            Ok(Some(id)) => *seen.entry(id).or_default() += 1,
            _ => break,
        }
    }
    let missing = confirmed
        .iter()
        .filter(|id| !seen.contains_key(*id))
        .count();
    let duplicates: usize = seen.values().map(|count| count - 1).sum();
    eprintln!(
        "{}: {} confirmed ({before} before), {missing} missing, {duplicates} duplicates",
        if crash { "crash" } else { "restart" },
        confirmed.len()
    );
    assert_eq!(missing, 0, "every confirmed message was consumed");

    subscription.stop().await;
    provider.close().await.unwrap();
    tokio::task::spawn_blocking(move || drop(node))
        .await
        .unwrap();
}
