//! The in-memory driver against the conformance suite, and its own behaviour.

mod conformance;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use broker::config::MemoryConfig;
use broker::{Context, Error, MemoryProvider, Message, Provider, RetryPolicy};

use conformance::{ATTEMPTS, Driver};

struct Memory;

fn settings() -> MemoryConfig {
    MemoryConfig {
        retry: RetryPolicy {
            attempts: ATTEMPTS,
            initial_backoff: Duration::from_millis(10),
            ..RetryPolicy::default()
        },
        ..MemoryConfig::default()
    }
}

#[async_trait]
impl Driver for Memory {
    async fn connect(&self) -> Arc<dyn Provider> {
        Arc::new(MemoryProvider::new("conformance", settings()))
    }

    async fn dead_broker_error(&self) -> Result<Error, &'static str> {
        // In-process topics have no address to be unreachable at; a closed provider is the
        // nearest thing, and its ping must fail clearly.
        let provider = self.connect().await;
        provider.close().await.unwrap();
        Ok(provider.ping(&Context::new()).await.unwrap_err())
    }
}

conformance_tests!(Memory);

#[tokio::test]
async fn publish_waits_for_room_in_a_full_group_until_the_deadline() {
    let provider = MemoryProvider::new(
        "bounded",
        MemoryConfig {
            buffer: 2,
            ..settings()
        },
    );
    let topic = "bounded.topic";
    let stopped = provider
        .subscribe(
            &Context::new(),
            topic,
            broker::SubscribeOptions::group("idle"),
            Arc::new(|_: Context, _: Message| async { Ok::<(), Error>(()) }),
        )
        .await
        .unwrap();
    stopped.stop().await;

    let ctx = Context::new().with_timeout(Duration::from_millis(200));
    provider
        .publish(&ctx, topic, Message::new("1"))
        .await
        .unwrap();
    provider
        .publish(&ctx, topic, Message::new("2"))
        .await
        .unwrap();
    let third = provider.publish(&ctx, topic, Message::new("3")).await;

    assert!(
        matches!(third, Err(Error::DeadlineExceeded { .. })),
        "{third:?}"
    );
    assert_eq!(provider.pending(topic, "idle"), 2);
}

#[tokio::test]
async fn a_named_group_keeps_messages_for_its_next_member() {
    let provider = MemoryProvider::new("durable", settings());
    let topic = "durable.topic";
    let options = broker::SubscribeOptions::group("workers");
    let first = provider
        .subscribe(
            &Context::new(),
            topic,
            options.clone(),
            Arc::new(|_: Context, _: Message| async { Ok::<(), Error>(()) }),
        )
        .await
        .unwrap();
    first.stop().await;

    let sent = Message::new("waiting");
    provider
        .publish(&Context::new(), topic, sent.clone())
        .await
        .unwrap();

    let inbox = conformance::Inbox::default();
    let _second = provider
        .subscribe(&Context::new(), topic, options, Arc::new(inbox.handler()))
        .await
        .unwrap();
    let received = inbox.wait_for(1).await;
    assert_eq!(received[0].1.id, sent.id);
}

#[tokio::test]
async fn operations_on_a_closed_provider_fail_with_closed() {
    let provider = MemoryProvider::new("closed", settings());
    provider.close().await.unwrap();

    let published = provider
        .publish(&Context::new(), "t", Message::new("x"))
        .await;

    assert!(
        matches!(published, Err(Error::Closed { .. })),
        "{published:?}"
    );
}
