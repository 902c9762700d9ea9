//! JetStream through the common interface, then through the native async-nats client: a
//! durable group consumes orders, a failing order is redelivered and dead-lettered, and the
//! stream's state is read with the escape hatch.
//!
//! ```text
//! nats-server -js &                  # any NATS 2.9+ with JetStream
//! cargo run --example nats           # NATS_URL overrides nats://127.0.0.1:4222
//! ```

use std::time::Duration;

use broker::nats::NatsProvider;
use broker::{Context, Manager, Message, ProviderExt};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();

    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
    let manager = Manager::from_toml(&format!(
        r#"
        [brokers.orders]
        driver = "nats"

        [brokers.orders.nats]
        url = "{url}"
        mode = "jetstream"
        retry = {{ attempts = 3, initial_backoff = "200ms" }}
        stream = {{ name = "EXAMPLE_ORDERS", subjects = ["example.orders.>"], storage = "memory" }}
        "#
    ))
    .await?;
    let orders = manager.get("orders")?;

    let dead = orders
        .subscribe_fn(
            &Context::new(),
            "example.orders.created.dlq",
            |_ctx: Context, message: Message| async move {
                tracing::warn!(id = %message.id, error = ?message.header("dead_letter_error"), "dead letter");
                Ok::<(), broker::Error>(())
            },
        )
        .await?;
    let workers = orders
        .subscribe_group_fn(
            &Context::new(),
            "example.orders.created",
            "billing",
            |_ctx: Context, message: Message| async move {
                let body = String::from_utf8_lossy(&message.body).into_owned();
                if body.contains("broken") {
                    return Err(format!("cannot bill {body}").into());
                }
                tracing::info!(%body, "billed");
                Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
            },
        )
        .await?;

    let ctx = Context::from_request_id("example-request").with_timeout(Duration::from_secs(10));
    for body in ["order 1", "order 2 (broken)", "order 3"] {
        orders
            .publish(&ctx, "example.orders.created", Message::new(body))
            .await?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The native client, for what the common interface does not cover.
    let native = manager.get_as::<NatsProvider>("orders")?;
    if let Some(jetstream) = native.jetstream() {
        let mut stream = jetstream.get_stream("EXAMPLE_ORDERS").await?;
        let state = &stream.info().await?.state;
        tracing::info!(messages = state.messages, "stream state");
    }

    workers.stop().await;
    dead.stop().await;
    manager.close().await?;
    Ok(())
}
