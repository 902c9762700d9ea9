//! Publishes and subscribes on three connections of the in-memory driver, so it runs with no
//! broker installed, and shows a request id travelling from publisher to handler.
//!
//! ```text
//! cargo run --example memory                              # testdata/memory.toml
//! cargo run --example memory -- --config other.toml
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use broker::{Context, Manager, Message, ProviderExt};

const ROUNDS: usize = 3;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();

    let path = config_path()?;
    let manager = Manager::from_file(&path).await?;
    let names: Vec<String> = manager.names().map(str::to_owned).collect();
    tracing::info!(config = %path, connections = ?names, "manager ready");

    let received = Arc::new(AtomicUsize::new(0));
    let mut subscriptions = Vec::new();
    for name in &names {
        let provider = manager.get(name)?;
        let count = received.clone();
        let subscription = provider
            .subscribe_fn(
                &Context::new(),
                "demo",
                move |ctx: Context, message: Message| {
                    let count = count.clone();
                    async move {
                        // The handler's span already carries trace_id, connection, driver and topic.
                        tracing::info!(
                            body = %String::from_utf8_lossy(&message.body),
                            request_id = ctx.request_id(),
                            "received"
                        );
                        count.fetch_add(1, Ordering::SeqCst);
                        Ok::<(), broker::Error>(())
                    }
                },
            )
            .await?;
        subscriptions.push(subscription);
    }

    for round in 1..=ROUNDS {
        let ctx = Context::new().with_timeout(Duration::from_secs(5));
        for name in &names {
            let message = Message::new(format!("round {round} on {name}"));
            manager.get(name)?.publish(&ctx, "demo", message).await?;
        }
        tracing::info!(request_id = ctx.request_id(), round, "published");
    }

    let expected = ROUNDS * names.len();
    tokio::time::timeout(Duration::from_secs(5), async {
        while received.load(Ordering::SeqCst) < expected {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .map_err(|_| {
        format!(
            "only {} of {expected} messages arrived",
            received.load(Ordering::SeqCst)
        )
    })?;

    for subscription in subscriptions {
        subscription.stop().await;
    }
    manager.close().await?;
    tracing::info!(messages = expected, "done");
    Ok(())
}

fn config_path() -> Result<String, String> {
    let mut args = std::env::args().skip(1);
    match (args.next().as_deref(), args.next()) {
        (None, _) => Ok(concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/memory.toml").to_owned()),
        (Some("--config"), Some(path)) => Ok(path),
        _ => Err("usage: memory [--config PATH]".to_owned()),
    }
}
