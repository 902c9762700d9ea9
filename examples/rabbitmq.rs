//! Publishes to and consumes from a RabbitMQ server: a consumer group with two members, a
//! handler that fails on one message (which is retried, then dead-lettered), and the amqprs
//! connection behind the provider.
//!
//! ```text
//! cargo run --example rabbitmq                    # amqp://guest:guest@127.0.0.1:5672/%2f
//! RABBITMQ_URL=amqp://user:pass@host:5672/vhost cargo run --example rabbitmq
//! ```

#[cfg(feature = "rabbitmq")]
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use broker::rabbitmq::RabbitMqProvider;
    use broker::{Context, Manager, Message, ProviderExt};

    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();

    let url = std::env::var("RABBITMQ_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let manager = Manager::from_toml(&format!(
        r#"
        [brokers.orders]
        driver = "rabbitmq"

        [brokers.orders.rabbitmq]
        url = "{url}"
        exchange = "broker.example"
        retry = {{ attempts = 2, initial_backoff = "100ms" }}
        "#
    ))
    .await?;

    // The typed lookup reaches the amqprs connection, for what the common interface lacks.
    let rabbitmq = manager.get_as::<RabbitMqProvider>("orders")?;
    if let Some(connection) = rabbitmq.connection() {
        tracing::info!(
            server = connection.server_properties().version(),
            "connected to {rabbitmq}"
        );
    }

    let orders = manager.get("orders")?;
    let handled = Arc::new(AtomicUsize::new(0));
    let mut members = Vec::new();
    for member in 1..=2 {
        let handled = handled.clone();
        let subscription = orders
            .subscribe_group_fn(
                &Context::new(),
                "order.created",
                "billing",
                move |_ctx: Context, message: Message| {
                    let handled = handled.clone();
                    async move {
                        if message.header("broken").is_some() {
                            return Err("this order cannot be billed".into());
                        }
                        tracing::info!(member, body = %String::from_utf8_lossy(&message.body), "billed");
                        handled.fetch_add(1, Ordering::SeqCst);
                        Ok::<(), broker::BoxError>(())
                    }
                },
            )
            .await?;
        members.push(subscription);
    }

    let ctx = Context::new().with_timeout(Duration::from_secs(10));
    for number in 1..=4 {
        let message = Message::new(format!("order {number}"));
        orders.publish(&ctx, "order.created", message).await?;
    }
    let broken = Message::new("order 5").with_header("broken", "yes");
    orders.publish(&ctx, "order.created", broken).await?;
    tracing::info!("published; the broken order goes to order.created.dlq on broker.example.dlx");

    tokio::time::timeout(Duration::from_secs(10), async {
        while handled.load(Ordering::SeqCst) < 4 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .map_err(|_| "not every order was billed in time")?;

    for member in members {
        member.stop().await;
    }
    manager.close().await?;
    Ok(())
}

#[cfg(not(feature = "rabbitmq"))]
fn main() {
    eprintln!("this example needs the `rabbitmq` feature");
}
