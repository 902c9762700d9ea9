//! The `Manager`: lookup by name, the typed escape hatch, ping and graceful close.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use broker::{
    Context, Error, Handler, Manager, MemoryProvider, Message, Provider, ProviderExt,
    SubscribeOptions, Subscription,
};

async fn memory_manager() -> Manager {
    Manager::from_file(Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/memory.toml"))
        .await
        .unwrap()
}

#[tokio::test]
async fn connections_are_found_by_name() {
    let manager = memory_manager().await;

    let names: Vec<_> = manager.names().collect();
    assert_eq!(names, ["notifications", "system_logs", "user_events"]);
    let provider = manager.get("user_events").unwrap();
    assert_eq!(provider.name(), "user_events");
    assert_eq!(provider.driver(), "memory");
    assert_eq!(provider.to_string(), "memory(user_events)");
}

#[tokio::test]
async fn an_unknown_name_lists_the_known_ones() {
    let manager = memory_manager().await;

    let error = manager.get("orders").unwrap_err();

    let Error::UnknownConnection { name, known } = &error else {
        panic!("{error:?}")
    };
    assert_eq!(name, "orders");
    assert_eq!(known, &["notifications", "system_logs", "user_events"]);
    assert!(
        error
            .to_string()
            .contains("notifications, system_logs, user_events")
    );
}

/// A provider type no connection uses, to ask the manager for the wrong one.
#[derive(Debug)]
struct Elsewhere;

impl fmt::Display for Elsewhere {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("elsewhere")
    }
}

#[async_trait]
impl Provider for Elsewhere {
    fn driver(&self) -> &'static str {
        "elsewhere"
    }

    fn name(&self) -> &str {
        "elsewhere"
    }

    async fn publish(&self, _: &Context, _: &str, _: Message) -> broker::Result<()> {
        Ok(())
    }

    async fn subscribe(
        &self,
        _: &Context,
        _: &str,
        _: SubscribeOptions,
        _: Arc<dyn Handler>,
    ) -> broker::Result<Subscription> {
        unreachable!("never subscribed to")
    }

    async fn ping(&self, _: &Context) -> broker::Result<()> {
        Ok(())
    }

    async fn close(&self) -> broker::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn the_typed_lookup_reaches_the_concrete_driver() {
    let manager = memory_manager().await;

    let memory: Arc<MemoryProvider> = manager.get_as("system_logs").unwrap();
    assert_eq!(memory.config().buffer, 1024);
    let dynamic = manager.get("system_logs").unwrap();
    assert!(dynamic.downcast_ref::<MemoryProvider>().is_some());

    let wrong = manager.get_as::<Elsewhere>("system_logs").unwrap_err();
    assert!(
        matches!(&wrong, Error::WrongDriver { connection, actual: "memory", .. } if connection == "system_logs"),
        "{wrong:?}"
    );
}

#[tokio::test]
async fn ping_reaches_every_connection() {
    let manager = memory_manager().await;

    manager.ping(&Context::new()).await.unwrap();
    manager.get("notifications").unwrap().close().await.unwrap();
    let error = manager.ping(&Context::new()).await.unwrap_err();

    assert!(matches!(&error, Error::Closed { origin } if origin.connection == "notifications"));
}

#[tokio::test]
async fn close_drains_subscriptions_first() {
    let manager = memory_manager().await;
    let provider = manager.get("user_events").unwrap();
    let (started, finished) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );

    let flags = (started.clone(), finished.clone());
    provider
        .subscribe_fn(&Context::new(), "signups", move |_: Context, _: Message| {
            let (started, finished) = flags.clone();
            async move {
                started.store(true, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(300)).await;
                finished.store(true, Ordering::SeqCst);
                Ok::<(), Error>(())
            }
        })
        .await
        .unwrap()
        .detach();
    provider
        .publish(&Context::new(), "signups", Message::new("new user"))
        .await
        .unwrap();
    while !started.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    manager.close().await.unwrap();

    assert!(finished.load(Ordering::SeqCst));
    let after = provider
        .publish(&Context::new(), "signups", Message::new("late"))
        .await;
    assert!(matches!(after, Err(Error::Closed { .. })), "{after:?}");
}
